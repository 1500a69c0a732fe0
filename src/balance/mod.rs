//! Health-gated load balancing over discovered endpoints, with a strategy you can swap.
//!
//! [`BalanceLayer`] layers a `MakeService` (`Service<Uri>`: [`Connect`](crate::connect::Connect),
//! or a pool over it) and yields one [`Balance`]: a `Service<http::Request<tonic::body::Body>>`
//! that any tonic-generated client takes. Endpoints come from a [`Discover`](crate::discover)
//! source as `tower::discover::Change` events.
//!
//! An endpoint gets calls only while it is **connected** and its service **ready** (a pool with
//! no live connection is not), **healthy** (an active
//! [`HealthCheck`](crate::health::HealthCheck), if configured) and **not ejected** by
//! [outlier detection](crate::outlier). Among those, the [`Strategy`] chooses: [`RoundRobin`],
//! [`PowerOfTwoChoices`] on calls in flight, [`PeakEwma`] latency, [`WeightedRoundRobin`] on
//! static weights, [`ConsistentHash`] on a request key, or your own.
//!
//! - **Fail fast, never hang.** With no endpoint that may take calls, a call waits up to
//!   `endpoint_wait` for one, then fails with `UNAVAILABLE` saying why ("no endpoints discovered",
//!   "all 4 endpoints unhealthy (health status NOT_SERVING)").
//! - **Panic threshold.** When some but fewer than `panic_threshold` of the endpoints are ready,
//!   calls spread over every connected endpoint instead of overloading the few (Envoy).
//! - **Ready services only.** As tower's `ReadyCache` keeps p2c to ready services: a call that
//!   finds its endpoint's service not ready goes to another endpoint at once, and an endpoint
//!   whose service stays not ready for 200 ms leaves rotation until it is ready again. A pool
//!   keeps its own connections: one lost connection (under a call or a health `Watch`) is the
//!   pool's to replace, not a reason to rebuild the endpoint.
//! - **Reconnect with backoff.** A connection that fails (a refused connect, a call that hits a
//!   dead connection, a health stream that breaks) is replaced in the background with jittered
//!   exponential backoff, never in a tight loop.
//! - **Drain.** An endpoint removed by discovery gets no new call at once and finishes the calls
//!   it has.
//!
//! ```
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tower::ServiceBuilder;
//! use towline::balance::{BalanceConfig, BalanceLayer, PeakEwma};
//! use towline::connect::Connect;
//! use towline::discover::Static;
//! use towline::health::HealthCheck;
//! use towline::testkit::{Backend, pb::{echo_client::EchoClient, EchoRequest}};
//!
//! let backends = Backend::start_many(3).await?;
//! let discovery = Static::new(backends.iter().map(|b| b.uri()));
//! let config = BalanceConfig::builder()
//!     .strategy(PeakEwma::new())              // or RoundRobin::new(), ConsistentHash::header(..)
//!     .health_check(HealthCheck::watch(""))   // grpc.health.v1 Watch on every endpoint
//!     .build()?;
//! let balance = ServiceBuilder::new()
//!     .layer(BalanceLayer::new(discovery, config))
//!     .service(Connect::new());
//! let mut client = EchoClient::new(balance.clone());
//! let reply = client.unary(EchoRequest::default()).await?;
//! assert!(reply.get_ref().backend.starts_with("backend-"));
//! assert_eq!(balance.snapshot().len(), 3);
//! # Ok(()) }
//! ```

mod body;
mod config;
mod driver;
mod endpoint;
mod future;
mod guard;
mod layer;
pub mod metrics;
mod service;
mod strategy;
mod table;

pub use body::TrackedBody;
pub use config::{BalanceConfig, BalanceConfigBuilder};
pub use endpoint::{EndpointService, EndpointSnapshot, EndpointState, MakeEndpoint};
pub use future::{ResponseFuture, WaitForReady};
pub use layer::BalanceLayer;
pub use service::Balance;
pub use strategy::{
    Candidate, ConsistentHash, MAX_POINTS_PER_ENDPOINT, PeakEwma, PowerOfTwoChoices, RoundRobin,
    Strategy, WeightedRoundRobin,
};
pub(crate) use table::Condition;
