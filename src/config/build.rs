//! The towline layers a [`ServiceConfig`] describes.

use std::collections::HashMap;

use http::request::Parts;

use super::method::CallSettings;
use super::{LbPolicy, MethodConfig, PerMethodLayer, RetryPolicyConfig, ServiceConfig};
use crate::balance::{
    BalanceConfig, BalanceConfigBuilder, Candidate, ConsistentHash, RoundRobin, Strategy,
    WeightedRoundRobin,
};
use crate::health::HealthCheck;
use crate::retry::{HedgeLayer, HedgePolicy, Jitter, RetryBudget, RetryLayer, RetryPolicy};

impl ServiceConfig {
    /// A [`RetryLayer`] with each method's `retryPolicy`, or `None` when no method has one.
    ///
    /// Methods whose config has no `retryPolicy` (a `hedgingPolicy` is
    /// [`hedge_layer`](Self::hedge_layer)'s) and methods no config names are not retried. With `retryThrottling`, every policy draws from one
    /// shared [`RetryBudget::token_bucket`]; without it retries are not throttled (gRFC A6).
    /// Backoff is gRFC A6's: `min(initialBackoff × backoffMultiplier^(n−1), maxBackoff)` with
    /// ±20 % jitter (a `maxBackoff` below `initialBackoff` caps every delay at `maxBackoff`).
    pub fn retry_layer(&self) -> Option<RetryLayer> {
        if self
            .method_configs
            .iter()
            .all(|mc| mc.retry_policy.is_none())
        {
            return None;
        }
        let budget = self.budget.clone();
        let policy = |mc: &MethodConfig| match &mc.retry_policy {
            Some(p) => retry_policy(p, budget.clone()),
            None => no_retries(),
        };
        let default = self.default_config().map_or_else(no_retries, policy);
        let mut layer = RetryLayer::new(default);
        for mc in &self.method_configs {
            for name in &mc.names {
                layer = match (&name.service, &name.method) {
                    (Some(s), Some(m)) => layer.method_policy(&format!("/{s}/{m}"), policy(mc)),
                    (Some(s), None) => layer.service_policy(s, policy(mc)),
                    _ => layer,
                };
            }
        }
        Some(layer)
    }

    /// A [`HedgeLayer`] with each method's `hedgingPolicy`, or `None` when no method has one.
    /// With `retryThrottling`, hedges draw from the same token bucket as the retry layer's
    /// retries. Put it inside the retry layer: a method has one or the other, never both.
    pub fn hedge_layer(&self) -> Option<HedgeLayer> {
        if self
            .method_configs
            .iter()
            .all(|mc| mc.hedging_policy.is_none())
        {
            return None;
        }
        let policy = |mc: &MethodConfig| {
            mc.hedging_policy.as_ref().map(|h| {
                let p = HedgePolicy::new(
                    h.max_attempts,
                    h.hedging_delay,
                    h.non_fatal_status_codes.iter().copied(),
                )
                .expect("hedgingPolicy was validated");
                match &self.budget {
                    Some(budget) => p.budget(budget.clone()),
                    None => p,
                }
            })
        };
        let mut layer = HedgeLayer::new(self.default_config().and_then(policy));
        for mc in &self.method_configs {
            for name in &mc.names {
                layer = match (&name.service, &name.method) {
                    (Some(s), Some(m)) => layer.method_policy(&format!("/{s}/{m}"), policy(mc)),
                    (Some(s), None) => layer.service_policy(s, policy(mc)),
                    _ => layer,
                };
            }
        }
        Some(layer)
    }

    /// A [`PerMethodLayer`] with each method's `timeout` and `waitForReady`, or `None` when no
    /// method sets either.
    pub fn per_method_layer(&self) -> Option<PerMethodLayer> {
        let settings = |mc: &MethodConfig| CallSettings {
            timeout: mc.timeout,
            wait_for_ready: mc.wait_for_ready,
        };
        if self
            .method_configs
            .iter()
            .all(|mc| settings(mc) == CallSettings::default())
        {
            return None;
        }
        let mut routes = HashMap::new();
        for mc in &self.method_configs {
            for name in &mc.names {
                match (&name.service, &name.method) {
                    (Some(s), Some(m)) => routes.insert(format!("/{s}/{m}").into(), settings(mc)),
                    (Some(s), None) => routes.insert(s.as_str().into(), settings(mc)),
                    _ => None,
                };
            }
        }
        let default = self.default_config().map(settings).unwrap_or_default();
        Some(PerMethodLayer::new(routes, default))
    }

    /// A [`BalanceConfigBuilder`] with the chosen load-balancing policy's strategy,
    /// `healthCheckConfig` as a `grpc.health.v1.Health/Watch` check on every endpoint (gRFC A17),
    /// and gRFC A50 outlier detection when the policy is `outlier_detection` (off otherwise, as in
    /// gRPC, where towline's own default would turn it on). With no policy in the config the
    /// strategy is gRPC's default, `pick_first`. Set the rest (`endpoint_wait`, `target`, …) on
    /// the builder before `build`.
    pub fn balance_config(&self) -> BalanceConfigBuilder {
        let mut builder = BalanceConfig::builder()
            .health_check(
                self.health_check
                    .as_ref()
                    .map(|h| HealthCheck::watch(h.service_name.clone())),
            )
            .outlier_detection(None);
        let mut policy = self.load_balancing.as_ref();
        if let Some(LbPolicy::OutlierDetection { detection, child }) = policy {
            builder = builder.outlier_detection(detection.clone());
            policy = Some(child);
        }
        match policy {
            None | Some(LbPolicy::PickFirst { .. }) => builder.strategy(PickFirst),
            Some(LbPolicy::RoundRobin) => builder.strategy(RoundRobin::new()),
            Some(LbPolicy::WeightedRoundRobin(_)) => builder.strategy(WeightedRoundRobin::new()),
            Some(LbPolicy::RingHash(ring)) => match &ring.request_hash_header {
                Some(header) => builder.strategy(ConsistentHash::header(header.clone())),
                None => builder.strategy(ConsistentHash::by(|_| None)),
            },
            Some(LbPolicy::OutlierDetection { .. }) => {
                unreachable!("outlier_detection is never nested (the parser refuses it)")
            }
        }
    }

    /// The `{}` entry, if any.
    fn default_config(&self) -> Option<&MethodConfig> {
        self.method_configs.iter().find(|mc| {
            mc.names
                .iter()
                .any(|n| n.service.is_none() && n.method.is_none())
        })
    }
}

fn retry_policy(p: &RetryPolicyConfig, budget: Option<RetryBudget>) -> RetryPolicy {
    let builder = RetryPolicy::builder()
        .max_attempts(p.max_attempts)
        .retryable_codes(p.retryable_status_codes.iter().copied())
        // A6 allows maxBackoff < initialBackoff: every delay is then maxBackoff.
        .initial_backoff(p.initial_backoff.min(p.max_backoff))
        .max_backoff(p.max_backoff)
        .backoff_multiplier(p.backoff_multiplier)
        .jitter(Jitter::Grpc);
    match budget {
        Some(budget) => builder.budget(budget),
        None => builder.no_budget(),
    }
    .build()
    .expect("retryPolicy was validated")
}

fn no_retries() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(1)
        .no_budget()
        .build()
        .expect("a one-attempt policy is valid")
}

/// gRPC's `pick_first`: every call to the first candidate, in the balancer's order; when it is
/// not ready (down, unhealthy or ejected) calls move to the next one.
#[derive(Debug, Clone, Copy)]
struct PickFirst;

impl Strategy for PickFirst {
    fn reads_request(&self) -> bool {
        false
    }

    fn pick(&self, _: &Parts, _: &[Candidate]) -> usize {
        0
    }
}
