//! [`ServiceBuilderExt`]: towline's layers as `tower::ServiceBuilder` methods.

use tower::ServiceBuilder;
use tower::layer::util::Stack;

use crate::balance::{BalanceConfig, BalanceLayer};
use crate::metrics::MetricsLayer;
use crate::pool::{PoolConfig, PoolLayer};
use crate::retry::{HedgeLayer, HedgePolicy, RetryLayer, RetryPolicy};

/// towline's layers as [`ServiceBuilder`] methods, in the manner of
/// `tower_http::ServiceBuilderExt`.
///
/// Each method is `.layer(TheLayer::new(..))` and nothing more: the stack it builds is the same
/// type, with the same behaviour, as the explicit layers, so the two styles mix freely with each
/// other and with any tower layer.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), towline::ConfigError> {
/// use http::Uri;
/// use tower::ServiceBuilder;
/// use towline::ServiceBuilderExt;
/// use towline::balance::BalanceConfig;
/// use towline::connect::Connect;
/// use towline::discover::Static;
/// use towline::pool::PoolConfig;
/// use towline::retry::RetryPolicy;
///
/// let endpoints = Static::new([
///     Uri::from_static("http://10.0.0.1:50051"),
///     Uri::from_static("http://10.0.0.2:50051"),
/// ]);
/// let channel = ServiceBuilder::new()
///     .call_metrics("greeter") // one grpc.client.call.duration per call
///     .grpc_retry(RetryPolicy::builder().build()?)
///     .attempt_metrics("greeter") // grpc.client.attempt.* per attempt
///     .balance(endpoints, BalanceConfig::default())
///     .pool(PoolConfig::builder().size(2).build()?)
///     .service(Connect::new());
/// // `channel` goes to any tonic-generated client: `GreeterClient::new(channel)`.
/// # fn grpc_service<T: tonic::client::GrpcService<tonic::body::Body>>(_: T) {}
/// # grpc_service(channel);
/// # Ok(()) }
/// ```
///
/// The retry method is `grpc_retry` because `ServiceBuilder` already has an inherent `retry`
/// (tower's, for a `tower::retry::Policy`), and an inherent method always wins over a trait's;
/// `grpc_hedge` follows it.
///
/// Sealed: implemented for `ServiceBuilder` only, so methods can be added without breaking you.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Call-level gRFC A66 metrics labelled `grpc.target = target`: [`MetricsLayer::new`].
    /// Place it above the retry layer, so that it sees one call however many attempts it takes.
    fn call_metrics(self, target: impl Into<String>) -> ServiceBuilder<Stack<MetricsLayer, L>>;

    /// Attempt-level gRFC A66 metrics labelled `grpc.target = target`:
    /// [`MetricsLayer::attempts`]. Place it under the retry layer.
    fn attempt_metrics(self, target: impl Into<String>) -> ServiceBuilder<Stack<MetricsLayer, L>>;

    /// gRFC A6 retries of every call with `policy`: [`RetryLayer::new`]. For per-method
    /// policies, build the [`RetryLayer`] and pass it to [`layer`](ServiceBuilder::layer).
    fn grpc_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// gRFC A6 hedging of every call with `policy`: [`HedgeLayer::new`].
    fn grpc_hedge(self, policy: HedgePolicy) -> ServiceBuilder<Stack<HedgeLayer, L>>;

    /// Health-gated balancing over the endpoints `discovery` names: [`BalanceLayer::new`].
    /// The layer below it makes one service per endpoint (a [`pool`](Self::pool) or a connector).
    fn balance<D>(
        self,
        discovery: D,
        config: BalanceConfig,
    ) -> ServiceBuilder<Stack<BalanceLayer<D>, L>>;

    /// A pool of connections per endpoint: [`PoolLayer::new`]. The layer below it connects one
    /// target ([`Connect`](crate::connect::Connect)).
    fn pool(self, config: PoolConfig) -> ServiceBuilder<Stack<PoolLayer, L>>;
}

impl<L> sealed::Sealed<L> for ServiceBuilder<L> {}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn call_metrics(self, target: impl Into<String>) -> ServiceBuilder<Stack<MetricsLayer, L>> {
        self.layer(MetricsLayer::new(target))
    }

    fn attempt_metrics(self, target: impl Into<String>) -> ServiceBuilder<Stack<MetricsLayer, L>> {
        self.layer(MetricsLayer::attempts(target))
    }

    fn grpc_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::new(policy))
    }

    fn grpc_hedge(self, policy: HedgePolicy) -> ServiceBuilder<Stack<HedgeLayer, L>> {
        self.layer(HedgeLayer::new(policy))
    }

    fn balance<D>(
        self,
        discovery: D,
        config: BalanceConfig,
    ) -> ServiceBuilder<Stack<BalanceLayer<D>, L>> {
        self.layer(BalanceLayer::new(discovery, config))
    }

    fn pool(self, config: PoolConfig) -> ServiceBuilder<Stack<PoolLayer, L>> {
        self.layer(PoolLayer::new(config))
    }
}

mod sealed {
    // Public in a private module: nameable in the trait's bounds, not implementable outside.
    #[allow(unreachable_pub)]
    pub trait Sealed<T> {}
}
