//! The standard gRPC service config (the JSON grpc-go, grpc-java and Envoy users already have),
//! validated and turned into towline layers.
//!
//! ```
//! use std::time::Duration;
//! use towline::config::ServiceConfig;
//!
//! let config = ServiceConfig::from_json(r#"{
//!   "methodConfig": [{
//!     "name": [{"service": "towline.testkit.v1.Echo"}],
//!     "timeout": "1.5s",
//!     "retryPolicy": {
//!       "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
//!       "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
//!     }
//!   }],
//!   "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
//!   "loadBalancingConfig": [{"grpclb": {}}, {"round_robin": {}}],
//!   "healthCheckConfig": {"serviceName": ""}
//! }"#)?;
//! let mc = config.method_config("/towline.testkit.v1.Echo/Unary").unwrap();
//! assert_eq!(mc.timeout, Some(Duration::from_millis(1500)));
//!
//! let retry = config.retry_layer();          // Some(RetryLayer): per-method policies, throttling
//! let hedges = config.hedge_layer();        // None: no method has a hedgingPolicy
//! let per_method = config.per_method_layer(); // Some(PerMethodLayer): grpc-timeout, waitForReady
//! let balance = config.balance_config().build()?; // round_robin, Watch health checks
//! # let _ = (retry, hedges, per_method, balance);
//!
//! let err = ServiceConfig::from_json(r#"{"methodConfig": [{"name": [{}],
//!     "retryPolicy": {"maxAttempts": 1}}]}"#).unwrap_err();
//! assert_eq!(err.to_string(), "methodConfig[0].retryPolicy.maxAttempts: must be > 1");
//! # Ok::<(), towline::ConfigError>(())
//! ```
//!
//! ## What is read, and how it is checked
//! Every field of `methodConfig` (`name`, `timeout`, `waitForReady`, `retryPolicy`,
//! `hedgingPolicy`, `maxRequestMessageBytes`, `maxResponseMessageBytes`), `retryThrottling`,
//! `loadBalancingConfig` (and the deprecated `loadBalancingPolicy`) and `healthCheckConfig` is
//! checked as the gRFCs say (A6, A17, A42, A50, A58), and an error ([`ConfigError`]) names the
//! JSON path of the first bad field: `methodConfig[0].retryPolicy.maxAttempts: must be > 1`.
//!
//! What the spec says to ignore is ignored, and only that:
//! - unknown fields, anywhere (proto JSON rules; so a misspelt field is ignored too), and `null`
//!   values, which proto JSON reads as "not set";
//! - `maxAttempts` above 5 is treated as 5 (gRFC A6), with no error;
//! - in `loadBalancingConfig`, policies towline does not implement are skipped and the first
//!   supported one is used; a list with none supported is an error. The chosen policy's config
//!   must be valid: an invalid one is an error, it does not fall through.
//!
//! Two checks are stricter than grpc-go, on purpose: a `methodConfig` entry must have a non-empty
//! `name` list (grpc-go accepts one that matches nothing), and a `timeout` must be greater than
//! zero (a zero timeout fails every call).
//!
//! Names match as the spec says: `{service, method}` one method, `{service}` every method of
//! the service, `{}` every method (the default); the most specific wins, and the winner applies
//! whole (a method's own config with no `retryPolicy` means no retries even if the default has
//! one). The same name twice, anywhere in the list, is an error.
//!
//! ## What towline builds from it
//! - [`retry_layer`](ServiceConfig::retry_layer): a [`RetryLayer`](crate::retry::RetryLayer)
//!   with each method's `retryPolicy` (gRFC A6 backoff with ±20 % jitter), and `retryThrottling`
//!   as one [`RetryBudget::token_bucket`](crate::retry::RetryBudget::token_bucket) shared by
//!   every method; without `retryThrottling` retries are unthrottled, as in gRPC.
//! - [`hedge_layer`](ServiceConfig::hedge_layer): a [`HedgeLayer`](crate::retry::HedgeLayer)
//!   with each method's `hedgingPolicy`, drawing from the same `retryThrottling` bucket as the
//!   retry layer (every layer built from one `ServiceConfig` shares one bucket).
//! - [`per_method_layer`](ServiceConfig::per_method_layer): [`PerMethodLayer`], each method's
//!   `timeout` as its `grpc-timeout` (or the caller's own deadline when that is shorter), and its
//!   `waitForReady` as a [`WaitForReady`](crate::balance::WaitForReady) extension the balancer
//!   honours. Put it outside the retry layer so that retries honour the deadline.
//! - [`balance_config`](ServiceConfig::balance_config): a
//!   [`BalanceConfigBuilder`](crate::balance::BalanceConfigBuilder) with the chosen policy's
//!   strategy, `healthCheckConfig` as a `Watch` health check (gRFC A17), and `outlier_detection`
//!   as gRFC A50 outlier detection (off when the config has none, as in gRPC).
//!
//! ## What is checked but not (yet) applied
//! - `maxRequestMessageBytes` / `maxResponseMessageBytes`: available in [`MethodConfig`]; set
//!   them on the tonic client (`max_decoding_message_size`).
//! - `weighted_round_robin`: towline's [`WeightedRoundRobin`](crate::balance::WeightedRoundRobin)
//!   uses the weights discovery gives, not ORCA load reports, so the A58 periods and penalty are
//!   validated but unused. `ring_hash`: `requestHashHeader` (gRFC A76) picks the hashed header
//!   (without it each call hashes at random, as in A76); the ring sizes are validated but towline
//!   sizes its ring per endpoint. `pick_first`: `shuffleAddressList` is validated but unused.

mod build;
mod method;
mod parse;

use std::fmt;
use std::time::Duration;

use tonic::Code;

use crate::ConfigError;
use crate::outlier::OutlierDetection;

pub use method::{PerMethod, PerMethodLayer};

/// A parsed and validated gRPC service config.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    method_configs: Vec<MethodConfig>,
    retry_throttling: Option<RetryThrottling>,
    load_balancing: Option<LbPolicy>,
    health_check: Option<HealthCheckConfig>,
    /// `retryThrottling` as one token bucket, shared by every layer built from this config.
    budget: Option<crate::retry::RetryBudget>,
}

impl ServiceConfig {
    /// Parses and validates a service config; the error names the JSON path of the first bad
    /// field (`$` for the document itself).
    pub fn from_json(json: &str) -> Result<ServiceConfig, ConfigError> {
        parse::service_config(json)
    }

    /// The `methodConfig` entries, in order.
    pub fn method_configs(&self) -> &[MethodConfig] {
        &self.method_configs
    }

    /// The config that applies to a request path (`/pkg.Service/Method`): the entry naming the
    /// method, else the one naming its service, else the default (`{}`), else none.
    pub fn method_config(&self, path: &str) -> Option<&MethodConfig> {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        let find = |service: Option<&str>, method: Option<&str>| {
            self.method_configs.iter().find(|mc| {
                mc.names
                    .iter()
                    .any(|n| n.service.as_deref() == service && n.method.as_deref() == method)
            })
        };
        (!service.is_empty() && !method.is_empty())
            .then(|| find(Some(service), Some(method)))
            .flatten()
            .or_else(|| {
                (!service.is_empty())
                    .then(|| find(Some(service), None))
                    .flatten()
            })
            .or_else(|| find(None, None))
    }

    /// `retryThrottling`, if set.
    pub fn retry_throttling(&self) -> Option<&RetryThrottling> {
        self.retry_throttling.as_ref()
    }

    /// The load-balancing policy chosen from `loadBalancingConfig` (or `loadBalancingPolicy`),
    /// if either is set.
    pub fn load_balancing(&self) -> Option<&LbPolicy> {
        self.load_balancing.as_ref()
    }

    /// `healthCheckConfig`, if set.
    pub fn health_check(&self) -> Option<&HealthCheckConfig> {
        self.health_check.as_ref()
    }
}

/// One `methodConfig` entry.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The methods it applies to (never empty, no duplicates across the config).
    pub names: Vec<MethodName>,
    /// `waitForReady`, applied by [`ServiceConfig::per_method_layer`].
    pub wait_for_ready: Option<bool>,
    /// `timeout` (> 0).
    pub timeout: Option<Duration>,
    /// `maxRequestMessageBytes` (validated; not applied).
    pub max_request_message_bytes: Option<u64>,
    /// `maxResponseMessageBytes` (validated; not applied).
    pub max_response_message_bytes: Option<u64>,
    /// `retryPolicy`.
    pub retry_policy: Option<RetryPolicyConfig>,
    /// `hedgingPolicy`.
    pub hedging_policy: Option<HedgingPolicyConfig>,
}

/// One `name` entry: `{service, method}`, `{service}` (all its methods) or `{}` (the default).
/// An empty string is the same as an absent field.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct MethodName {
    /// The fully qualified service, `pkg.Service`.
    pub service: Option<String>,
    /// The method, `Method`; only with a service.
    pub method: Option<String>,
}

impl fmt::Display for MethodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.service, &self.method) {
            (Some(s), Some(m)) => write!(f, "/{s}/{m}"),
            (Some(s), None) => write!(f, "{s} (all methods)"),
            _ => f.write_str("{} (the default)"),
        }
    }
}

/// gRFC A6 `retryPolicy`, validated.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicyConfig {
    /// 2 to 5 (larger values were capped at 5).
    pub max_attempts: u32,
    /// > 0.
    pub initial_backoff: Duration,
    /// > 0.
    pub max_backoff: Duration,
    /// > 0.
    pub backoff_multiplier: f64,
    /// Not empty, no `OK`.
    pub retryable_status_codes: Vec<Code>,
}

/// gRFC A6 `hedgingPolicy`, validated; applied by [`ServiceConfig::hedge_layer`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HedgingPolicyConfig {
    /// 2 to 5 (larger values were capped at 5).
    pub max_attempts: u32,
    /// Between hedged attempts (default 0).
    pub hedging_delay: Duration,
    /// Codes that do not stop the other hedges (may be empty; no `OK`).
    pub non_fatal_status_codes: Vec<Code>,
}

/// gRFC A6 `retryThrottling`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RetryThrottling {
    /// In (0, 1000].
    pub max_tokens: f64,
    /// > 0 (three decimals used).
    pub token_ratio: f64,
}

/// gRFC A17 `healthCheckConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthCheckConfig {
    /// The `grpc.health.v1` service name (`""`: the whole server).
    pub service_name: String,
}

/// The load-balancing policy chosen from the config.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LbPolicy {
    /// `pick_first`.
    PickFirst {
        /// `shuffleAddressList` (validated; unused).
        shuffle_address_list: bool,
    },
    /// `round_robin`.
    RoundRobin,
    /// `weighted_round_robin` (gRFC A58).
    WeightedRoundRobin(WeightedRoundRobinConfig),
    /// `ring_hash` / `ring_hash_experimental` (gRFC A42, A76).
    RingHash(RingHashConfig),
    /// `outlier_detection` / `outlier_detection_experimental` (gRFC A50) over a child policy.
    OutlierDetection {
        /// The detection settings.
        detection: OutlierDetection,
        /// The policy that picks among non-ejected endpoints.
        child: Box<LbPolicy>,
    },
}

/// gRFC A58 `weighted_round_robin` config, validated (see the module docs for what is used).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WeightedRoundRobinConfig {
    /// `enableOobLoadReport`.
    pub enable_oob_load_report: bool,
    /// `oobReportingPeriod` (default 10 s).
    pub oob_reporting_period: Duration,
    /// `blackoutPeriod` (default 10 s).
    pub blackout_period: Duration,
    /// `weightExpirationPeriod` (default 3 min).
    pub weight_expiration_period: Duration,
    /// `weightUpdatePeriod` (default 1 s, at least 100 ms).
    pub weight_update_period: Duration,
    /// `errorUtilizationPenalty` (default 1.0, >= 0).
    pub error_utilization_penalty: f64,
}

/// gRFC A42 `ring_hash` config, validated.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RingHashConfig {
    /// `minRingSize` (default 1024, 1 to 8M).
    pub min_ring_size: u64,
    /// `maxRingSize` (default 4096, 1 to 8M, >= min).
    pub max_ring_size: u64,
    /// `requestHashHeader` (gRFC A76): the header whose value is hashed.
    pub request_hash_header: Option<http::HeaderName>,
}
