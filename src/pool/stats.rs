//! What a pool is doing: [`PoolStats`] snapshots, and the gRFC A94 subchannel metrics.

use std::time::Duration;

use http::Uri;
use metrics::{Counter, Gauge};

/// A snapshot of one pool, from [`Pool::stats`](super::Pool::stats).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Connections up and taking calls.
    pub open: usize,
    /// Connection attempts under way.
    pub connecting: usize,
    /// Open connections with no call in flight.
    pub idle: usize,
    /// Calls in flight on each open connection (a call counts from the `poll_ready` that
    /// reserves its connection until its response body ends).
    pub in_flight: Vec<usize>,
    /// Connections opened since the pool started.
    pub connects: u64,
    /// Connection attempts that failed or timed out, plus connections that broke before they
    /// completed a single call (a handshake that works is not yet a working connection).
    pub failures: u64,
    /// Idle connections above `min_connections` closed after the idle timeout.
    pub reaps: u64,
    /// Connections removed because a call found them broken.
    pub disconnections: u64,
    /// While backing off after a failure: how long until the next attempt.
    pub retry_in: Option<Duration>,
}

/// gRFC A94 subchannel metrics through the `metrics` facade: handles made once per pool, so
/// recording is an atomic add, never a lookup or a string format.
pub(crate) struct Metrics {
    pub(crate) attempts_succeeded: Counter,
    pub(crate) attempts_failed: Counter,
    pub(crate) disconnections: Counter,
    pub(crate) open: Gauge,
}

impl Metrics {
    pub(crate) fn new(target: &Uri) -> Self {
        let target = target.to_string();
        Metrics {
            attempts_succeeded: metrics::counter!(
                "grpc.subchannel.connection_attempts_succeeded",
                "grpc.target" => target.clone()
            ),
            attempts_failed: metrics::counter!(
                "grpc.subchannel.connection_attempts_failed",
                "grpc.target" => target.clone()
            ),
            disconnections: metrics::counter!(
                "grpc.subchannel.disconnections",
                "grpc.target" => target.clone()
            ),
            open: metrics::gauge!("grpc.subchannel.open_connections", "grpc.target" => target),
        }
    }
}
