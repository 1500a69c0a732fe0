//! Test parts made of real tonic: an in-process gRPC [`Backend`] with fault controls, and a
//! bounded [`Load`] driver. Enabled by the `testkit` feature. [`peer`] runs foreign gRPC servers
//! (grpc-core, grpc-js) as child processes with the same kind of controls, and, with the `etcd`
//! feature, `EtcdCluster` runs real etcd members.
//!
//! towline's own tests, benchmarks and examples run on these, and they are public so that you can
//! test your own stack the same way: real HTTP/2 on loopback, real `grpc.health.v1`, faults you
//! switch at run time.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use std::time::Duration;
//! use towline::testkit::Backend;
//!
//! let backend = Backend::builder().id("primary").start().await?;
//! backend.set_latency(Duration::from_millis(20));   // every Echo call waits 20 ms
//! backend.fail_fraction(0.1, tonic::Code::Unavailable);
//! backend.set_health(tonic_health::ServingStatus::NotServing).await;
//! backend.stop().await;                              // listener and connections closed
//! backend.restart().await?;                          // same port again
//! # Ok(()) }
//! ```

mod backend;
#[cfg(feature = "etcd")]
mod etcd;
mod load;
#[cfg(target_os = "linux")]
mod netns;
pub mod peer;
mod produce;

pub use backend::{
    BACKEND_HEADER, Backend, BackendBuilder, CONNECTION_HEADER, ECHO_SERVICE, LATENCY_HEADER,
};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdCluster, etcd_support, require_etcd};
pub use load::{Load, LoadReport, nearest_rank, text_table};
#[cfg(target_os = "linux")]
pub use netns::{CI_ENV, NetNs, netns_support, require_netns};
pub use peer::{Peer, PeerBuilder, PeerKind, peer_support, require_peer};

/// Protobuf and tonic code for `towline.testkit.v1.Echo` and `towline.testkit.v1.Log`, generated
/// at build time.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("towline.testkit.v1");
}
