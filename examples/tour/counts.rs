//! What the layers did in a phase, read from their own metrics.

use metrics_util::debugging::{DebugValue, Snapshotter};
use towline::metrics::CALL_DURATION;
use towline::retry::metrics::{BUDGET_EXHAUSTED, CALL_RETRIES, CALL_TRANSPARENT_RETRIES};

/// What the layers did during one phase, from their own metrics (README "Metrics").
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LayerCounts {
    /// Retries made (`grpc.client.call.retries`, summed over calls).
    pub(crate) retries: u64,
    /// Transparent retries made (`grpc.client.call.transparent_retries`, summed).
    pub(crate) transparent_retries: u64,
    /// Retries the budget refused (`towline.retry.budget_exhausted`).
    pub(crate) retries_refused: u64,
    /// Outlier ejections (`towline.balance.ejections`).
    pub(crate) ejections: u64,
    /// Health verdict changes (`towline.balance.health_transitions`).
    pub(crate) health_transitions: u64,
    /// RPCs the call-level `MetricsLayer` saw end (`grpc.client.call.duration` samples): one per
    /// Echo call, one per `Produce` batch.
    pub(crate) rpcs: u64,
    /// Batches `BatchLayer` sent (`towline.batch.size` samples).
    pub(crate) batches: u64,
}

impl LayerCounts {
    /// Everything recorded since the last call: the debugging recorder's snapshot resets counters
    /// and drains histograms.
    pub(crate) fn take(snapshotter: &Snapshotter) -> Self {
        let mut counts = LayerCounts::default();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let name = key.key().name();
            match value {
                DebugValue::Counter(n) => match name {
                    BUDGET_EXHAUSTED => counts.retries_refused += n,
                    towline::balance::metrics::EJECTIONS => counts.ejections += n,
                    towline::balance::metrics::HEALTH_TRANSITIONS => counts.health_transitions += n,
                    _ => {}
                },
                DebugValue::Histogram(values) => {
                    let sum = values.iter().map(|v| v.0).sum::<f64>().round() as u64;
                    match name {
                        CALL_RETRIES => counts.retries += sum,
                        CALL_TRANSPARENT_RETRIES => counts.transparent_retries += sum,
                        CALL_DURATION => counts.rpcs += values.len() as u64,
                        // BatchLayer's histogram of items per batch sent.
                        "towline.batch.size" => counts.batches += values.len() as u64,
                        _ => {}
                    }
                }
                DebugValue::Gauge(_) => {}
            }
        }
        counts
    }
}
