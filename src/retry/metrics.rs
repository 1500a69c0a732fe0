//! The retry metrics, gRFC A96 names, registered once per layer so calls only touch handles.

use std::time::Duration;

use metrics::{Counter, Histogram, Unit};

/// gRFC A96: retries per call (recorded for calls that retried at least once).
pub const CALL_RETRIES: &str = "grpc.client.call.retries";
/// gRFC A96: transparent retries per call (recorded for calls that made at least one).
pub const CALL_TRANSPARENT_RETRIES: &str = "grpc.client.call.transparent_retries";
/// gRFC A96: the total time, in seconds, a call spent in backoff (recorded for calls that retried).
pub const CALL_RETRY_DELAY: &str = "grpc.client.call.retry_delay";
/// Retries refused because the budget was spent.
pub const BUDGET_EXHAUSTED: &str = "towline.retry.budget_exhausted";

#[derive(Clone)]
pub(crate) struct RetryMetrics {
    retries: Histogram,
    transparent_retries: Histogram,
    retry_delay: Histogram,
    pub(crate) budget_exhausted: Counter,
}

impl RetryMetrics {
    pub(crate) fn new() -> Self {
        metrics::describe_histogram!(CALL_RETRIES, Unit::Count, "Retries made by a call");
        metrics::describe_histogram!(
            CALL_TRANSPARENT_RETRIES,
            Unit::Count,
            "Transparent retries made by a call"
        );
        metrics::describe_histogram!(
            CALL_RETRY_DELAY,
            Unit::Seconds,
            "Time a call spent waiting between attempts"
        );
        metrics::describe_counter!(
            BUDGET_EXHAUSTED,
            Unit::Count,
            "Retries refused because the retry budget was spent"
        );
        RetryMetrics {
            retries: metrics::histogram!(CALL_RETRIES),
            transparent_retries: metrics::histogram!(CALL_TRANSPARENT_RETRIES),
            retry_delay: metrics::histogram!(CALL_RETRY_DELAY),
            budget_exhausted: metrics::counter!(BUDGET_EXHAUSTED),
        }
    }

    /// Records a finished call's retries; calls without any record nothing.
    pub(crate) fn record_call(&self, retries: u32, transparent: u32, delay: Duration) {
        if retries > 0 {
            self.retries.record(retries);
            self.retry_delay.record(delay);
        }
        if transparent > 0 {
            self.transparent_retries.record(transparent);
        }
    }
}
