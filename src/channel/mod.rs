//! [`Channel`]: a production gRPC client in one call, still made of towline's layers.
//!
//! In the spirit of grpc-go's `grpc.NewClient(target, grpc.WithDefaultServiceConfig(json))`:
//! a [gRPC target name](Target) and, if you have one, a standard service config.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // any tonic-generated client takes it: `GreeterClient::new(channel.clone())`
//! let channel = towline::Channel::builder("dns:///greeter.internal:50051")?
//!     .service_config(r#"{
//!         "methodConfig": [{"name": [{}], "timeout": "2s"}],
//!         "loadBalancingConfig": [{"round_robin": {}}]
//!     }"#)?
//!     .build()?;
//! # let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
//! # client.check(tonic_health::pb::HealthCheckRequest::default()).await?;
//! assert!(channel.ready_within(std::time::Duration::from_secs(5)).await);
//! println!("{:?}", channel.snapshot()); // every endpoint: state, calls in flight, why not ready
//! # Ok(()) }
//! ```
//!
//! ## The stack, outer to inner, and its defaults
//! | layer | default | change it with |
//! |---|---|---|
//! | [`MetricsLayer`](crate::metrics::MetricsLayer) | on, `grpc.target` = the canonical target | [`metrics(false)`](ChannelBuilder::metrics) |
//! | [`PerMethodLayer`](crate::config::PerMethodLayer) | from the service config's `timeout`/`waitForReady` | the service config |
//! | [`RetryLayer`](crate::retry::RetryLayer) | [`default_retry_policy`]: 3 attempts on `UNAVAILABLE`, A6 token bucket 10 / 0.1; or the service config's `retryPolicy` + `retryThrottling` | [`retry_policy`](ChannelBuilder::retry_policy), [`retry_layer`](ChannelBuilder::retry_layer) |
//! | [`HedgeLayer`](crate::retry::HedgeLayer) | only with a `hedgingPolicy` | the service config |
//! | [`Balance`](crate::balance::Balance) | [`PeakEwma`](crate::balance::PeakEwma), `Watch("")` health check, outlier detection; the service config's `loadBalancingConfig` replaces the strategy and outlier detection, its `healthCheckConfig` names the watched service | [`strategy`](ChannelBuilder::strategy), [`health_check`](ChannelBuilder::health_check), [`balance`](ChannelBuilder::balance) |
//! | [`Pool`](crate::pool::Pool) per endpoint | [`PoolConfig::default`](crate::pool::PoolConfig): 1–4 connections | [`pool`](ChannelBuilder::pool) |
//! | [`Connect`](crate::connect::Connect) | the pool's connect timeout (20 s) and keepalive, `TCP_NODELAY` | [`connect`](ChannelBuilder::connect), [`tls`](ChannelBuilder::tls) (feature `tls`) |
//!
//! Endpoints come from the target: `dns:` names are re-resolved every 30 s
//! ([`discover::dns`](crate::discover)), address lists and Unix sockets are fixed; or from
//! your own [`discovery`](ChannelBuilder::discovery). To put your own layer anywhere in the
//! stack (or leave one of towline's out), take the checked pieces with
//! [`into_parts`](ChannelBuilder::into_parts) and stack them with `tower::ServiceBuilder`.
//!
//! ## Types, not boxes
//! [`Channel`] names its layers' types: no `tower::buffer::Buffer` (tonic's own `Channel` is
//! one, with a worker task and a queue) and no boxed service. The per-call cost is the
//! layers' own (retries clone the request head; hedging, when configured, boxes its future).
//! Discovery is boxed once, when the channel is built.
//!
//! ## Unix domain sockets
//! `unix:/run/app.sock`, `unix:///run/app.sock`, `unix:relative.sock` and (Linux)
//! `unix-abstract:name` go through the same balancer and pool. Their endpoints are known by
//! keys of the form `unix://localhost/run/app.sock` ([`unix_key`], [`abstract_key`]), which
//! [`Connect`](crate::connect::Connect) dials as the socket, sending `:authority: localhost`.

mod builder;
mod pools;
mod service;
pub(crate) mod target;

pub use builder::{
    BoxDiscover, ChannelBuilder, ChannelParts, DEFAULT_RETRY_THROTTLING, default_retry_policy,
};
pub use pools::PoolEndpoint;
pub use service::{Balanced, Channel, ChannelBody, ResponseFuture};
pub use target::{DEFAULT_DNS_SERVER_PORT, DEFAULT_PORT, Target, abstract_key, unix_key};

impl Channel {
    /// Starts a builder for `target`, a gRPC target name (see [`Target`]); fails at once,
    /// naming what is wrong, if it is not one.
    pub fn builder(target: &str) -> Result<ChannelBuilder, crate::ConfigError> {
        ChannelBuilder::new(target)
    }
}
