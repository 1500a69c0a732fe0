//! # towline
//!
//! Production-grade [tonic] gRPC clients from small, independent [`tower`] layers.
//!
//! Each concern a gRPC client needs in production — connection pooling, health-gated balancing,
//! retries, batching, metrics — is its own `tower::Layer`, so you stack the ones you want around a
//! connector and hand the result to any tonic-generated client. Layers only meet at
//! `tower::Service<http::Request<tonic::body::Body>>`, so they can be dropped, reordered or
//! replaced by your own.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tower::{ServiceBuilder, ServiceExt};
//! use towline::connect::Connect;
//! use towline::testkit::{Backend, pb::{echo_client::EchoClient, EchoRequest}};
//!
//! let backend = Backend::start().await?;
//! let channel = Connect::new().oneshot(backend.uri()).await?;
//! let stack = ServiceBuilder::new()
//!     // any tower layer composes here: towline's, tower's or your own
//!     .timeout(std::time::Duration::from_secs(1))
//!     .service(channel);
//! let mut client = EchoClient::new(stack);
//! let reply = client.unary(EchoRequest { message: "hi".into(), ..Default::default() }).await?;
//! assert_eq!(reply.get_ref().message, "hi");
//! # Ok(()) }
//! ```
//!
//! ## Modules
//! - [`backoff`]: exponential backoff with jitter, shared by retries and reconnects.
//! - [`balance`]: health-gated load balancing with swappable strategies.
//! - [`config`]: the standard gRPC service config (JSON), validated, built into towline layers.
//! - [`health`]: active `grpc.health.v1` checks; [`outlier`]: passive ejection (gRFC A50).
//! - [`metrics`]: `MetricsLayer`, gRFC A66 call and attempt metrics through the `metrics` facade.
//! - [`readiness`]: stack health (healthy / degraded / unhealthy, with reasons) for probes and
//!   `grpc.health.v1`.
//! - [`status`]: what a call ended with, from a response, its trailers or an error.
//! - [`connect`]: a `MakeService` from a target URI to a connected `Channel`.
//! - [`deadline`]: the call's deadline, as the `grpc-timeout` header carries it.
//! - [`channel`]: [`Channel`], the whole stack from a gRPC target name in one call.
//! - [`batch`]: many small calls into one batch RPC, flushed on count, bytes or linger time.
//! - [`discover`]: where endpoints come from: a static list or a channel you feed.
//! - [`pool`]: several HTTP/2 connections per endpoint, reconnect with backoff, idle reaping.
//! - [`retry`]: `RetryLayer`, gRFC A6 retries with jittered backoff, a budget and replayable bodies.
//! - [`ServiceBuilderExt`]: the layers as `ServiceBuilder` methods (`.grpc_retry(policy)`,
//!   `.balance(discovery, config)`, `.pool(config)`, …), as `tower_http::ServiceBuilderExt` does.
#![cfg_attr(
    feature = "testkit",
    doc = "- [`testkit`]: a real tonic backend with fault controls, and a load driver."
)]
//!
//! [tonic]: https://docs.rs/tonic
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
// No unsafe code. The library proper forbids it: no module can allow it back. The one exception
// is the testkit's network-namespace module (`setns(2)`, `geteuid(2)` through libc), which allows
// it for itself; a `forbid` could not be relaxed there, so with the `testkit` feature the crate
// `deny`s it instead and that module is the only `allow`.
#![cfg_attr(not(feature = "testkit"), forbid(unsafe_code))]
#![cfg_attr(feature = "testkit", deny(unsafe_code))]
// docs.rs builds with `--cfg docsrs` on nightly: `doc_cfg` marks feature-gated items with the
// features they need (it absorbed `doc_auto_cfg`, which nightly no longer knows).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backoff;
pub mod balance;
pub mod batch;
mod body;
pub mod channel;
mod clock;
pub mod config;
pub mod connect;
pub mod deadline;
pub mod discover;
mod error;
mod header;
pub mod health;
pub mod metrics;
pub mod outlier;
pub mod pool;
pub mod readiness;
pub mod retry;
pub mod status;

pub use channel::Channel;
pub use error::ConfigError;

// Exported at the root, as tower-http exports its `ServiceBuilderExt`.
mod builder_ext;
pub use builder_ext::ServiceBuilderExt;

#[cfg(feature = "testkit")]
pub mod testkit;

/// The boxed error type tower and tonic use between layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
