//! What the balancer records through the `metrics` facade. Handles are registered once per
//! balancer; only the driver records, never a call.

use metrics::{Counter, Gauge};

use super::endpoint::EndpointState;

/// Endpoints in each state, by `state` and `grpc.target`.
pub const ENDPOINTS: &str = "towline.balance.endpoints";
/// Outlier ejections (gRFC A50 or failure accrual), by `grpc.target`.
pub const EJECTIONS: &str = "towline.balance.ejections";
/// Health-check verdict changes, by `to` (`serving` / `not_serving`) and `grpc.target`.
pub const HEALTH_TRANSITIONS: &str = "towline.balance.health_transitions";

const STATES: [EndpointState; 6] = [
    EndpointState::Connecting,
    EndpointState::Down,
    EndpointState::Ready,
    EndpointState::Unhealthy,
    EndpointState::Ejected,
    EndpointState::Draining,
];

pub(crate) struct BalanceMetrics {
    endpoints: [Gauge; 6],
    pub(crate) ejections: Counter,
    pub(crate) became_serving: Counter,
    pub(crate) became_not_serving: Counter,
}

impl BalanceMetrics {
    pub(crate) fn new(target: &str) -> Self {
        metrics::describe_gauge!(ENDPOINTS, "Endpoints known to the balancer, by state");
        metrics::describe_counter!(EJECTIONS, "Endpoints ejected by outlier detection");
        metrics::describe_counter!(HEALTH_TRANSITIONS, "Health-check verdict changes");
        let target = target.to_owned();
        BalanceMetrics {
            endpoints: STATES.map(|state| {
                metrics::gauge!(ENDPOINTS, "state" => state.as_str(), "grpc.target" => target.clone())
            }),
            ejections: metrics::counter!(EJECTIONS, "grpc.target" => target.clone()),
            became_serving: metrics::counter!(HEALTH_TRANSITIONS, "to" => "serving", "grpc.target" => target.clone()),
            became_not_serving: metrics::counter!(HEALTH_TRANSITIONS, "to" => "not_serving", "grpc.target" => target),
        }
    }

    pub(crate) fn set_endpoints(&self, states: impl Iterator<Item = EndpointState>) {
        let mut counts = [0u32; 6];
        for state in states {
            if let Some(i) = STATES.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
        }
        for (gauge, n) in self.endpoints.iter().zip(counts) {
            gauge.set(f64::from(n));
        }
    }
}
