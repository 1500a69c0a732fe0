//! [`ChannelBuilder`]: a target and a service config in, the default stack out.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tower::util::Either;
use tower_layer::Layer;

use super::pools::{MakePoolEndpoint, PoolRegistry};
use super::service::{Balanced, Channel, PerMethodStack};
use super::target::Target;
use crate::balance::{Balance, BalanceConfig, BalanceConfigBuilder, Strategy};
use crate::config::{PerMethodLayer, ServiceConfig};
use crate::connect::Connect;
use crate::discover::{Discover, Static, Update};
use crate::health::HealthCheck;
use crate::metrics::MetricsLayer;
use crate::pool::{PoolConfig, PoolLayer};
use crate::retry::{HedgeLayer, RetryBudget, RetryLayer, RetryPolicy};
use crate::{BoxError, ConfigError};

/// Where endpoints come from, boxed once when the channel is built (never per call).
pub type BoxDiscover = Pin<Box<dyn Stream<Item = Result<Update, BoxError>> + Send>>;

type BalanceOverride = Box<dyn FnOnce(BalanceConfigBuilder) -> BalanceConfigBuilder + Send>;
type ConnectOverride = Box<dyn FnOnce(Connect) -> Connect + Send>;

/// The A6 `retryThrottling` of the default retry policy: `maxTokens` 10, `tokenRatio` 0.1 (the
/// figures gRFC A6 and grpc-go's examples use): retries stop while more than half of the last
/// ~10 attempts' worth of tokens were spent on failures.
pub const DEFAULT_RETRY_THROTTLING: (f64, f64) = (10.0, 0.1);

/// Builds a [`Channel`] from a gRPC target name; see the [module docs](super) for the stack
/// and its defaults. Setters may come in any order: an explicit setter (`strategy`,
/// `health_check`, `retry_policy`, …) wins over what the service config says.
#[must_use = "call .build() to get the channel"]
pub struct ChannelBuilder {
    target_text: Arc<str>,
    target: Target,
    service_config: Option<ServiceConfig>,
    balance: Vec<BalanceOverride>,
    connect: Vec<ConnectOverride>,
    pool: PoolConfig,
    retry: Option<RetryLayer>,
    metrics: bool,
    discovery: Option<BoxDiscover>,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl fmt::Debug for ChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBuilder")
            .field("target", &self.target)
            .field("service_config", &self.service_config.is_some())
            .field("pool", &self.pool)
            .field("retry", &self.retry)
            .field("metrics", &self.metrics)
            .field("custom_discovery", &self.discovery.is_some())
            .finish_non_exhaustive()
    }
}

impl ChannelBuilder {
    pub(crate) fn new(target: &str) -> Result<Self, ConfigError> {
        Ok(ChannelBuilder {
            target: Target::parse(target)?,
            target_text: target.into(),
            service_config: None,
            balance: Vec::new(),
            connect: Vec::new(),
            pool: PoolConfig::default(),
            retry: None,
            metrics: true,
            discovery: None,
            #[cfg(feature = "tls")]
            tls: None,
        })
    }

    /// The parsed target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A standard gRPC service config (JSON, as grpc-go's `WithDefaultServiceConfig` takes
    /// it), validated now: the error names the JSON path of the first bad field. It supplies
    /// the retry (and hedging) policies with their `retryThrottling`, per-method timeouts and
    /// `waitForReady`, the load-balancing policy and the health check; see
    /// [`towline::config`](crate::config). What it does not say keeps the channel's
    /// defaults: a config with only a `timeout` keeps peak-EWMA, the health check and outlier
    /// detection, where grpc-go would fall back to `pick_first` without health checks. A
    /// `loadBalancingConfig` decides the strategy and outlier detection together (gRPC nests
    /// them); `healthCheckConfig` names the service the health check watches.
    pub fn service_config(self, json: &str) -> Result<Self, ConfigError> {
        Ok(self.with_service_config(ServiceConfig::from_json(json)?))
    }

    /// A service config already parsed.
    pub fn with_service_config(mut self, config: ServiceConfig) -> Self {
        self.service_config = Some(config);
        self
    }

    /// How the balancer picks among ready endpoints (default [`PeakEwma`](crate::balance::PeakEwma),
    /// or the service config's policy).
    pub fn strategy(self, strategy: impl Strategy) -> Self {
        self.balance(move |b| b.strategy(strategy))
    }

    /// The active health check on every endpoint, `None` for none (default: a
    /// `grpc.health.v1.Health/Watch` of the whole server, `""`, which servers without the
    /// health service pass, gRFC A17; or the service config's `healthCheckConfig`).
    pub fn health_check(self, check: impl Into<Option<HealthCheck>>) -> Self {
        let check = check.into();
        self.balance(move |b| b.health_check(check))
    }

    /// Any other balancer setting (`endpoint_wait`, `outlier_detection`, `panic_threshold`,
    /// reconnect backoff, …), applied after the defaults and the service config. Checked when
    /// the channel is built.
    pub fn balance(
        mut self,
        f: impl FnOnce(BalanceConfigBuilder) -> BalanceConfigBuilder + Send + 'static,
    ) -> Self {
        self.balance.push(Box::new(f));
        self
    }

    /// The pool each endpoint gets (default [`PoolConfig::default`]: 1 to 4 connections,
    /// 20 s connect timeout). Its connect timeout and keepalive reach the connector.
    pub fn pool(mut self, config: PoolConfig) -> Self {
        self.pool = config;
        self
    }

    /// Adjusts the connector, after the pool's settings (which it keeps, unless `f` sets
    /// the same ones): `.connect(|c| c.configure(|e| e.initial_stream_window_size(1 << 20)))`,
    /// `.connect(|c| c.keepalive(interval, timeout))`.
    pub fn connect(mut self, f: impl FnOnce(Connect) -> Connect + Send + 'static) -> Self {
        self.connect.push(Box::new(f));
        self
    }

    /// TLS for every endpoint: endpoints are `https://`, their certificates checked against
    /// `config` (`ClientTlsConfig::new().with_native_roots()` for the system's roots, or
    /// `.ca_certificate(..)`). With a Unix-socket target, `build` fails.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// One retry policy for every method, replacing the default and the service config's.
    pub fn retry_policy(self, policy: RetryPolicy) -> Self {
        self.retry_layer(RetryLayer::new(policy))
    }

    /// The retry layer itself (per-method policies, hedging is kept from the service config).
    pub fn retry_layer(mut self, layer: RetryLayer) -> Self {
        self.retry = Some(layer);
        self
    }

    /// Call metrics (gRFC A66 `grpc.client.call.duration`, labelled with the target) through
    /// the `metrics` facade: on by default.
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.metrics = enabled;
        self
    }

    /// Endpoints from `discovery` instead of the target's (the target still names the channel
    /// in metrics). Its keys are what [`Connect`] connects to: `http://` (`https://` with
    /// [`tls`](Self::tls)) URIs, or [Unix socket keys](super::unix_key).
    pub fn discovery(mut self, discovery: impl Discover) -> Self {
        self.discovery = Some(Box::pin(discovery));
        self
    }

    /// Checks everything and returns the pieces the default stack is made of, to compose
    /// yourself (say, with your own layer between the balancer and the pool, or in place of
    /// one of towline's). [`build`](Self::build) is these pieces, stacked.
    ///
    /// Per-endpoint middleware, a layer on each endpoint's pool under the balancer:
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), towline::ConfigError> {
    /// use std::time::Duration;
    /// use tower::{ServiceBuilder, Layer};
    /// use towline::balance::Balance;
    ///
    /// let parts = towline::Channel::builder("ipv4:10.0.0.1:50051,10.0.0.2:50051")?.into_parts()?;
    /// let per_endpoint = tower::limit::ConcurrencyLimitLayer::new(64);
    /// let make_endpoint = ServiceBuilder::new()
    ///     .map_response(move |pool| per_endpoint.layer(pool)) // each endpoint's pool, limited
    ///     .layer(parts.pool)
    ///     .service(parts.connect);
    /// let balance = Balance::new(parts.discovery, make_endpoint, parts.balance);
    /// let stack = ServiceBuilder::new()
    ///     .layer(parts.metrics.expect("metrics are on by default"))
    ///     .layer(parts.retry)
    ///     .service(balance);
    /// // `GreeterClient::new(stack)`
    /// # let _ = stack;
    /// # Ok(()) }
    /// ```
    pub fn into_parts(self) -> Result<ChannelParts, ConfigError> {
        let tls = self.tls_enabled();
        if tls && self.target.is_unix() && self.discovery.is_none() {
            return Err(ConfigError::new(
                "tls",
                "TLS over a Unix domain socket is not supported (tonic refuses it)",
            ));
        }
        let discovery = match self.discovery {
            Some(discovery) => discovery,
            None => target_discovery(&self.target, tls)?,
        };
        let label = self.target.to_string();
        let config = self.service_config;
        // A service config decides what it says and leaves the rest to the channel's defaults:
        // one that sets only a timeout keeps peak-EWMA, outlier detection and the health
        // check. (grpc-go would fall back to `pick_first` with no health check, a weaker client
        // that nobody asked for.) A `loadBalancingConfig` decides the strategy and outlier
        // detection together, as gRPC nests them; `healthCheckConfig` names the service watched.
        let mut balance = match config.as_ref().filter(|c| c.load_balancing().is_some()) {
            Some(config) => config.balance_config(),
            None => BalanceConfig::builder(),
        };
        let watched = config
            .as_ref()
            .and_then(ServiceConfig::health_check)
            .map_or("", |h| h.service_name.as_str());
        balance = balance.health_check(HealthCheck::watch(watched));
        for f in self.balance {
            balance = f(balance);
        }
        let balance = balance.target(label.clone()).build()?;
        let mut connect = self.pool.connector();
        for f in self.connect {
            connect = f(connect);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls {
            connect = connect.tls(tls);
        }
        let retry = match self.retry {
            Some(layer) => layer,
            None => match config.as_ref().and_then(ServiceConfig::retry_layer) {
                Some(layer) => layer,
                None => RetryLayer::new(default_retry_policy()),
            },
        };
        Ok(ChannelParts {
            discovery,
            balance,
            pool: PoolLayer::new(self.pool),
            connect,
            retry,
            hedge: config.as_ref().and_then(ServiceConfig::hedge_layer),
            per_method: config.as_ref().and_then(ServiceConfig::per_method_layer),
            metrics: self.metrics.then(|| MetricsLayer::new(label)),
            target: self.target_text,
        })
    }

    /// Builds the stack and starts the balancer (which resolves the target, connects and
    /// health-checks in the background). Must run inside a Tokio runtime.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field: a balancer or pool setting that cannot work, TLS
    /// over a Unix socket, a DNS resolver that cannot be set up, no Tokio runtime.
    pub fn build(self) -> Result<Channel, ConfigError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::new(
                "runtime",
                "Channel::build must be called inside a Tokio runtime (it spawns the balancer)",
            ));
        }
        self.into_parts()?.build()
    }

    fn tls_enabled(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        return false;
    }
}

/// The default retry policy: gRFC A6 defaults as towline's [`RetryPolicy`] has them (3
/// attempts, `UNAVAILABLE`, 100 ms × 2 up to 1 s with ±20 % jitter) throttled by an A6 token
/// bucket ([`DEFAULT_RETRY_THROTTLING`]).
pub fn default_retry_policy() -> RetryPolicy {
    let (max_tokens, token_ratio) = DEFAULT_RETRY_THROTTLING;
    RetryPolicy::builder()
        .budget(RetryBudget::token_bucket(max_tokens, token_ratio).expect("valid throttling"))
        .build()
        .expect("the default policy is valid")
}

fn target_discovery(target: &Target, tls: bool) -> Result<BoxDiscover, ConfigError> {
    if let Some(endpoints) = target.fixed_endpoints(tls) {
        return Ok(Box::pin(Static::new(endpoints)));
    }
    match target {
        #[cfg(feature = "dns")]
        Target::Dns { server, host, port } => {
            let mut dns = crate::discover::dns::Dns::a_aaaa(host.clone(), *port).scheme(if tls {
                "https"
            } else {
                "http"
            });
            if let Some(server) = server {
                dns = dns.nameserver(*server);
            }
            let dns = dns.build().map_err(|err| {
                ConfigError::new(format!("target.dns.{}", err.field()), err.to_string())
            })?;
            Ok(Box::pin(dns))
        }
        // The parser refuses names to resolve without the `dns` feature.
        _ => Err(ConfigError::new(
            "target",
            "resolving a name needs towline's `dns` feature",
        )),
    }
}

/// The pieces of a [`Channel`], checked and ready to stack (from
/// [`ChannelBuilder::into_parts`]). From outer to inner: `metrics` → `per_method` → `retry` →
/// `hedge` → a [`Balance`] over `discovery` with `balance` → `pool` → `connect`.
#[non_exhaustive]
pub struct ChannelParts {
    /// The target's endpoints.
    pub discovery: BoxDiscover,
    /// The balancer's settings (strategy, health check, outlier detection, …).
    pub balance: BalanceConfig,
    /// The pool every endpoint gets.
    pub pool: PoolLayer,
    /// The connector under the pool (its connect timeout, keepalive, TLS).
    pub connect: Connect,
    /// Retries (gRFC A6), with their budget.
    pub retry: RetryLayer,
    /// Hedging, when the service config has a `hedgingPolicy`.
    pub hedge: Option<HedgeLayer>,
    /// Per-method `timeout` and `waitForReady`, when the service config sets any.
    pub per_method: Option<PerMethodLayer>,
    /// Call metrics, unless turned off.
    pub metrics: Option<MetricsLayer>,
    /// The target as given.
    pub target: Arc<str>,
}

impl fmt::Debug for ChannelParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelParts")
            .field("balance", &self.balance)
            .field("pool", &self.pool)
            .field("connect", &self.connect)
            .field("retry", &self.retry)
            .field("hedge", &self.hedge)
            .field("per_method", &self.per_method.is_some())
            .field("metrics", &self.metrics)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl ChannelParts {
    /// Stacks the parts into the default [`Channel`]. Must run inside a Tokio runtime.
    pub fn build(self) -> Result<Channel, ConfigError> {
        let registry = PoolRegistry::default();
        let make = MakePoolEndpoint {
            make: self.pool.layer(self.connect),
            registry: registry.clone(),
        };
        let balanced: Balanced = Balance::new(self.discovery, make, self.balance);
        if let Some(failure) = balanced.failure() {
            return Err(ConfigError::new("balance", failure.to_owned()));
        }
        let hedged = match &self.hedge {
            Some(hedge) => Either::Left(hedge.layer(balanced.clone())),
            None => Either::Right(balanced.clone()),
        };
        let retried = self.retry.layer(hedged);
        let stack: PerMethodStack = match &self.per_method {
            Some(per_method) => Either::Left(per_method.layer(retried)),
            None => Either::Right(retried),
        };
        Ok(Channel::new(
            stack,
            self.metrics,
            balanced,
            registry,
            self.target,
        ))
    }
}
