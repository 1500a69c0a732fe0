use std::any::Any;
use std::fmt;
use std::time::Duration;

use super::endpoint::EwmaConfig;
use super::strategy::{ConsistentHash, PeakEwma, Strategy};
use crate::ConfigError;
use crate::backoff::Backoff;
use crate::health::HealthCheck;
use crate::outlier::OutlierDetection;

/// How a [`Balance`](super::Balance) chooses, gates and reconnects endpoints.
/// Build with [`BalanceConfig::builder`]; every field is checked by `build`.
pub struct BalanceConfig {
    pub(crate) strategy: Box<dyn Strategy>,
    pub(crate) health_check: Option<HealthCheck>,
    pub(crate) outlier_detection: Option<OutlierDetection>,
    pub(crate) panic_threshold: f64,
    pub(crate) endpoint_wait: Duration,
    pub(crate) reconnect: Backoff,
    pub(crate) ewma: EwmaConfig,
    pub(crate) target: String,
    /// Why the strategy given cannot be used, found when it was set (see `build`).
    strategy_invalid: Option<String>,
}

impl fmt::Debug for BalanceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceConfig")
            .field("health_check", &self.health_check)
            .field("outlier_detection", &self.outlier_detection)
            .field("panic_threshold", &self.panic_threshold)
            .field("endpoint_wait", &self.endpoint_wait)
            .field("reconnect", &self.reconnect)
            .field("ewma", &self.ewma)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig::builder()
            .build()
            .expect("the defaults are valid")
    }
}

impl BalanceConfig {
    /// Starts from the defaults: [`PeakEwma`] strategy (default RTT 30 ms, decay 10 s), no active
    /// health check, [`OutlierDetection::default`], panic threshold 50%, calls wait up to 3 s
    /// for a ready endpoint, reconnect backoff 1 s × 1.6 up to 120 s with ±20% jitter (gRPC's
    /// connection-backoff defaults).
    pub fn builder() -> BalanceConfigBuilder {
        BalanceConfigBuilder {
            config: BalanceConfig {
                strategy: Box::new(PeakEwma::new()),
                health_check: None,
                outlier_detection: Some(OutlierDetection::default()),
                panic_threshold: 0.5,
                endpoint_wait: Duration::from_secs(3),
                reconnect: Backoff::grpc_connection(),
                ewma: EwmaConfig::new(Duration::from_millis(30), Duration::from_secs(10)),
                target: "towline".to_owned(),
                strategy_invalid: None,
            },
        }
    }
}

/// Builds a [`BalanceConfig`].
#[derive(Debug)]
pub struct BalanceConfigBuilder {
    config: BalanceConfig,
}

impl BalanceConfigBuilder {
    /// How to choose among ready endpoints: `RoundRobin`, `PowerOfTwoChoices`, `PeakEwma`,
    /// `WeightedRoundRobin`, `ConsistentHash`, or your own [`Strategy`].
    pub fn strategy(mut self, strategy: impl Strategy) -> Self {
        // A built-in strategy given something unusable (a bad header name) says so here, so
        // that `build` fails naming it rather than every call hashing nothing.
        self.config.strategy_invalid = (&strategy as &dyn Any)
            .downcast_ref::<ConsistentHash>()
            .and_then(|hash| hash.invalid().map(str::to_owned));
        self.config.strategy = Box::new(strategy);
        self
    }

    /// Run this active health check on every endpoint (default: none).
    pub fn health_check(mut self, check: impl Into<Option<HealthCheck>>) -> Self {
        self.config.health_check = check.into();
        self
    }

    /// Passive outlier detection, or `None` to turn it off.
    pub fn outlier_detection(mut self, detection: impl Into<Option<OutlierDetection>>) -> Self {
        self.config.outlier_detection = detection.into();
        self
    }

    /// When fewer than this fraction of endpoints are ready (but some are), spread calls over
    /// every connected endpoint rather than overload the few (Envoy's panic threshold). `0`
    /// turns it off. Between 0 and 1; default 0.5.
    pub fn panic_threshold(mut self, fraction: f64) -> Self {
        self.config.panic_threshold = fraction;
        self
    }

    /// How long a call waits for a ready endpoint (none discovered yet, all connecting or all
    /// unhealthy) before it fails with `UNAVAILABLE` saying why. Zero fails at once.
    pub fn endpoint_wait(mut self, wait: Duration) -> Self {
        self.config.endpoint_wait = wait;
        self
    }

    /// Backoff between connection attempts to an endpoint that is down. Default:
    /// [`Backoff::grpc_connection`].
    pub fn reconnect_backoff(mut self, backoff: Backoff) -> Self {
        self.config.reconnect = backoff;
        self
    }

    /// The RTT assumed for an endpoint before it has answered (peak-EWMA), default 30 ms. Must
    /// be > 0. After a reconnect the endpoint's estimate is capped at it until the new connection
    /// has answered, so a peak its old connection recorded while dying does not keep it starved.
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.config.ewma.default_rtt = rtt;
        self
    }

    /// How quickly old RTT figures fade (peak-EWMA). Must be > 0.
    pub fn rtt_decay(mut self, decay: Duration) -> Self {
        self.config.ewma.decay = decay;
        self
    }

    /// The name the balancer's metrics carry as `grpc.target` (e.g. the service it reaches).
    /// Default `towline`. Must not be empty.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.config.target = target.into();
        self
    }

    /// Checks every field.
    pub fn build(self) -> Result<BalanceConfig, ConfigError> {
        let c = &self.config;
        if !(0.0..=1.0).contains(&c.panic_threshold) {
            return Err(ConfigError::new(
                "balance.panic_threshold",
                "must be between 0 and 1",
            ));
        }
        if c.target.is_empty() {
            return Err(ConfigError::new("balance.target", "must not be empty"));
        }
        if c.ewma.default_rtt.is_zero() {
            return Err(ConfigError::new(
                "balance.default_rtt",
                "must be greater than zero",
            ));
        }
        if c.ewma.decay.is_zero() {
            return Err(ConfigError::new(
                "balance.rtt_decay",
                "must be greater than zero",
            ));
        }
        if let Some(problem) = &c.strategy_invalid {
            return Err(ConfigError::new("balance.strategy.header", problem.clone()));
        }
        if let Some(check) = &c.health_check {
            check.validate()?;
        }
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (
                BalanceConfig::builder().panic_threshold(1.5),
                "balance.panic_threshold",
            ),
            (
                BalanceConfig::builder().panic_threshold(f64::NAN),
                "balance.panic_threshold",
            ),
            (
                BalanceConfig::builder().default_rtt(Duration::ZERO),
                "balance.default_rtt",
            ),
            (
                BalanceConfig::builder().rtt_decay(Duration::ZERO),
                "balance.rtt_decay",
            ),
            (
                BalanceConfig::builder().health_check(HealthCheck::check("").fall(0)),
                "health_check.fall",
            ),
            (
                BalanceConfig::builder().strategy(ConsistentHash::header("x user")),
                "balance.strategy.header",
            ),
        ];
        for (builder, field) in cases {
            assert_eq!(builder.build().unwrap_err().field(), field);
        }
    }
}
