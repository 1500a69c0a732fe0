//! `PoolLayer`: several HTTP/2 connections per endpoint, reconnect with backoff, idle reaping.
//!
//! One HTTP/2 connection caps a client at what one TCP stream and one server event loop can
//! carry, and at the server's `SETTINGS_MAX_CONCURRENT_STREAMS`. [`PoolLayer`] wraps a
//! `MakeService` (such as [`Connect`](crate::connect::Connect)) so that each target gets a
//! [`Pool`]: a cheap-to-clone service that spreads calls over several connections and keeps
//! them healthy. Use it alone around one endpoint, or under a balancer that makes one pool per
//! endpoint.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), towline::BoxError> {
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use towline::pool::{PoolConfig, PoolLayer};
//! use towline::testkit::{Backend, pb::{echo_client::EchoClient, EchoRequest}};
//! # let backend = Backend::start().await?;
//!
//! let config = PoolConfig::builder()
//!     .size(4)                                   // four connections, opened up front
//!     .keepalive(Duration::from_secs(10), Duration::from_secs(5))
//!     .build()?;
//! let make_pool = ServiceBuilder::new()
//!     .layer(PoolLayer::new(config.clone()))
//!     .service(config.connector());              // Connect with the timeout and keepalive
//! let pool = make_pool.oneshot(backend.uri()).await?;
//! assert_eq!(pool.stats().open, 4);
//!
//! let mut client = EchoClient::new(pool.clone());  // any tonic-generated client
//! client.unary(EchoRequest::default()).await?;
//! assert_eq!(backend.connections_accepted(), 4);
//! # Ok(()) }
//! ```
//!
//! # What a pool does
//! - **Size.** `min_connections` are kept open; up to `max_connections` are opened on demand
//!   when every open connection is at 90 % of `max_streams_per_connection`. tonic's `Channel`
//!   hides h2's view of the server's `SETTINGS_MAX_CONCURRENT_STREAMS`, so that limit is
//!   configured, not read: set it to what the server announces. Set above it, the pool packs
//!   each connection past the server's limit and stops growing too soon: the surplus calls
//!   wait inside the connection (h2 holds them until a stream closes), which the pool cannot
//!   see. (500 calls of 10 ms against a server allowing 100 streams: configured 200, the pool
//!   stopped at 3 connections of ~166 calls each, at most 300 streams / 11 ms ≈ 27,000 calls/s
//!   however idle the CPU, and carried 26–31 % fewer calls per second than configured at 100,
//!   where it grew to 6.) Connections above `min` that stay idle for `idle_timeout` are
//!   closed.
//! - **Routing.** Each call goes to the open connection with the fewest calls in flight (a call
//!   counts from the `poll_ready` that reserves it until its response body ends), picked
//!   without a lock while that connection has room. While the pool may grow, no connection gets
//!   more than `max_streams_per_connection` calls: a new connection's h2 does not yet know the
//!   server's limit and would send them all, and the server refuse the surplus. When all are
//!   full and another is being opened, `poll_ready` waits for it or for a call to end,
//!   whichever comes first; at `max_connections` calls go to the least-loaded connection and
//!   h2 queues them.
//! - **Failure.** A call that fails with a connection-level error (`UNAVAILABLE`: refused,
//!   reset, GOAWAY, keepalive timeout; not a refused stream) takes its connection out of
//!   rotation at once; calls on it fail with `UNAVAILABLE` as the transport reports them, and a
//!   background task opens a replacement. tonic's `Channel` would reconnect on its own, lazily
//!   and without backoff, and report ready even when that failed (tonic #643), so the pool
//!   drops it and opens a fresh one through the `MakeService`, with gRPC's connection backoff
//!   (1 s, ×1.6, ±20 % jitter, at most 120 s) after each failed attempt. A connection that had
//!   served calls is replaced at once; one that broke before its first call counts as a failed
//!   attempt, so a server that accepts and drops connections cannot cause a reconnect loop.
//! - **No connection.** While none is up, `poll_ready` is `Pending`; after `wait_timeout` the
//!   call fails with `UNAVAILABLE`, saying why and when the next attempt is
//!   (`no connection to http://…: connect failed: connection refused (retrying in 1.6 s)`). The
//!   status's source is the connect error, so [`status::is_unprocessed`](crate::status::is_unprocessed)
//!   knows the call never left.
//! - **Stats and metrics.** [`Pool::stats`] gives open, connecting and idle connections, calls
//!   in flight per connection and the connect, failure, reap and disconnection counts. The gRFC
//!   A94 metrics `grpc.subchannel.connection_attempts_succeeded`, `.connection_attempts_failed`,
//!   `.disconnections` and `.open_connections` (labelled `grpc.target`) go to the `metrics`
//!   facade.
//!
//! # Known limits
//! - A connection that dies while idle is noticed by the first call that tries it (that call
//!   fails with `UNAVAILABLE`); tonic's `Channel` offers no way to watch its connection.
//!   HTTP/2 keepalive with [`keepalive_while_idle`](PoolConfigBuilder::keepalive_while_idle)
//!   makes hyper notice sooner, but the pool still learns of it from a call.
//! - A stream that breaks after its response headers fails in its body; the pool learns that
//!   the connection is gone from the next call on it.

mod body;
mod config;
mod conn;
mod layer;
mod service;
mod shared;
mod stats;
mod worker;

pub use body::PoolBody;
pub use config::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_STREAMS_PER_CONNECTION,
    DEFAULT_MIN_CONNECTIONS, DEFAULT_WAIT_TIMEOUT, PoolConfig, PoolConfigBuilder,
};
pub use conn::PoolConnectionError;
pub use layer::{MakeFuture, MakePool, PoolLayer};
pub use service::{Pool, ResponseFuture};
pub use stats::PoolStats;
