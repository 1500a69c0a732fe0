//! One endpoint as the balancer sees it: the load figures calls update without locks, and the
//! condition (connection, health, ejection, draining) the driver owns.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Uri;
#[cfg(test)]
use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::{Notify, mpsc};
use tonic::body::Body;
use tower_service::Service;

use crate::clock::Clock;
use crate::outlier::OutlierDetection;
use crate::{BoxError, discover};

/// What the balancer needs of each endpoint's service: tonic's `Channel`, a
/// [`Pool`](crate::pool::Pool), or anything else that serves gRPC over
/// `http::Request<tonic::body::Body>`, can be cloned per call and shared across tasks.
/// Implemented for every such service.
pub trait EndpointService:
    Service<Request<Body>, Response = Response<Self::Body>, Error: Into<BoxError>, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The response body.
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static;
}

impl<S, B> EndpointService for S
where
    S: Service<Request<Body>, Response = Response<B>, Error: Into<BoxError>, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static,
    B: http_body::Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static,
{
    type Body = B;
}

/// What the balancer needs of the `MakeService` that connects it to an endpoint
/// ([`Connect`](crate::connect::Connect), a [`PoolLayer`](crate::pool::PoolLayer) over it, …).
/// Implemented for every such service.
pub trait MakeEndpoint:
    Service<Uri, Response = Self::Endpoint, Error: Into<BoxError>, Future: Send>
    + Clone
    + Send
    + 'static
{
    /// The service it makes for each endpoint.
    type Endpoint: EndpointService;
}

impl<M> MakeEndpoint for M
where
    M: Service<Uri, Error: Into<BoxError>, Future: Send> + Clone + Send + 'static,
    M::Response: EndpointService,
{
    type Endpoint = M::Response;
}

/// The per-endpoint signals calls raise without going through the driver.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// A call saw the connection fail: the endpoint task should reconnect.
    pub(crate) broken: Notify,
    /// A call found the endpoint's service not ready, or failed with the service's own
    /// `UNAVAILABLE` (a pool whose connection broke): the endpoint task should check the
    /// service's readiness, and take the endpoint out of rotation until it is ready again.
    pub(crate) not_ready: Notify,
    /// Why, as the call saw it, for the endpoint's snapshot.
    not_ready_reason: Mutex<Option<String>>,
    /// The generation of the connection calls currently use.
    pub(crate) generation: AtomicU64,
    /// The last connection generation whose `too_many_pings` GOAWAY was counted.
    ping_strike_generation: AtomicU64,
    pub(crate) draining: AtomicBool,
}

impl Signals {
    /// Asks the endpoint task to check its service's readiness.
    pub(crate) fn check_readiness(&self, reason: impl FnOnce() -> String) {
        *self
            .not_ready_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason());
        // `notify_one` keeps a permit: a task busy elsewhere checks as soon as it can.
        self.not_ready.notify_one();
    }

    /// A bare connection (one the balancer owns) was closed by the server for our keepalive
    /// pings: later connections ping half as often (gRFC A8). Counted once per connection
    /// `generation`, however many calls it fails.
    pub(crate) fn note_ping_strike(&self, target: &Uri, generation: u64) {
        if self
            .ping_strike_generation
            .swap(generation, Ordering::AcqRel)
            != generation
        {
            crate::connect::note_too_many_pings(target);
        }
    }

    pub(crate) fn take_not_ready_reason(&self) -> Option<String> {
        self.not_ready_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// What calls tell the driver (rarely: only at thresholds).
#[derive(Debug)]
pub(crate) enum CallEvent {
    /// The endpoint's failure streak reached the failure-accrual threshold.
    FailureStreak(EndpointId),
    /// A draining endpoint's last call finished.
    Drained(EndpointId),
}

/// What calls need to report back, shared by every endpoint of a balancer: the outlier
/// settings, the driver's mailbox, and whether round trips are timed at all.
#[derive(Debug)]
pub(crate) struct Feedback {
    pub(crate) detection: Option<OutlierDetection>,
    pub(crate) events: mpsc::UnboundedSender<CallEvent>,
    /// The strategy reads RTT estimates (see `Strategy::uses_rtt`): only then does each call
    /// read the clock twice to time its round trip.
    pub(crate) measures_rtt: bool,
}

#[cfg(test)]
impl Load {
    /// An endpoint no balancer knows, for tests of its figures and of strategies: the default
    /// RTT 30 ms, decaying over 10 s.
    pub(crate) fn unattached(id: EndpointId, uri: Uri, weight: u32) -> Self {
        let ewma = EwmaConfig::new(Duration::from_millis(30), Duration::from_secs(10));
        let meta = discover::Endpoint::weighted(weight);
        Load::new(id, uri, meta, ewma, Clock::new(), Feedback::unread(None))
    }
}

#[cfg(test)]
impl Feedback {
    /// Feedback that no driver reads, for tests of one endpoint's figures.
    pub(crate) fn unread(detection: Option<OutlierDetection>) -> Arc<Self> {
        Arc::new(Feedback {
            detection,
            events: mpsc::unbounded_channel().0,
            measures_rtt: true,
        })
    }
}

/// How messages name an endpoint: `host:port`, or for a Unix socket its path
/// (`unix:/run/app.sock`, `unix-abstract:name`), since a socket's key has the authority
/// `localhost` whatever the socket (see [`unix_key`](crate::channel::unix_key)).
pub(crate) fn authority(uri: &Uri) -> String {
    match crate::channel::target::unix_socket(uri) {
        Some(Ok(socket)) => match socket.strip_prefix('\0') {
            // Named as its key has it: percent-encoded, so that a NUL in the name shows.
            Some(_) => {
                let path = uri.path();
                format!("unix-abstract:{}", path.strip_prefix('/').unwrap_or(path))
            }
            None => format!("unix:{socket}"),
        },
        Some(Err(_)) => uri.to_string(),
        None => uri
            .authority()
            .map_or_else(|| uri.to_string(), ToString::to_string),
    }
}

/// A stable id for one discovered endpoint (a re-inserted address gets a new one).
pub(crate) type EndpointId = u64;

/// The figures a call updates as it runs, shared between the table, strategies and in-flight
/// calls, without locks.
///
/// Laid out in order (`repr(C)`), from a cache line's start: what a peak-EWMA pick reads of
/// each of its two candidates (the RTT estimate and the calls in flight) is one line, where
/// the compiler's order spread it over two or three, each a fetch when endpoints are many.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Load {
    /// The round-trip estimate, written by every call and read by picks, without a lock.
    rtt: PeakEwma,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) id: EndpointId,
    pub(crate) uri: Uri,
    /// Discovery's weight for it: changed in place when only the weight changes (a DNS SRV
    /// update), without reconnecting.
    weight: AtomicU32,
    // Outcomes since the last outlier-detection interval, and the current failure streak.
    pub(crate) successes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) consecutive_failures: AtomicU32,
    /// The current failure streak reached the failure-accrual threshold and was reported: the
    /// driver hears of a streak once, not of every failing call past the threshold. Cleared by
    /// a success (a new streak) and when an ejection ends (its probe may report again).
    streak_reported: AtomicBool,
    pub(crate) signals: Signals,
    /// Where its calls report back (shared by every endpoint of the balancer).
    pub(crate) feedback: Arc<Feedback>,
}

impl Load {
    pub(crate) fn new(
        id: EndpointId,
        uri: Uri,
        meta: discover::Endpoint,
        ewma: EwmaConfig,
        clock: Clock,
        feedback: Arc<Feedback>,
    ) -> Self {
        Load {
            id,
            uri,
            weight: AtomicU32::new(meta.weight),
            in_flight: AtomicUsize::new(0),
            rtt: PeakEwma::new(ewma, clock),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            streak_reported: AtomicBool::new(false),
            signals: Signals::default(),
            feedback,
        }
    }

    /// Its static weight from discovery (at least 1).
    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Applies a new weight from discovery; true if it changed.
    pub(crate) fn set_weight(&self, weight: u32) -> bool {
        self.weight.swap(weight.max(1), Ordering::Relaxed) != weight.max(1)
    }

    /// Feeds one round trip, which ended at `now`, to the estimate.
    #[cfg(test)]
    pub(crate) fn observe_rtt(&self, rtt: Duration, now: Instant) {
        let rtt_ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        self.rtt.observe(rtt_ns, self.rtt.clock.ns_at(now));
    }

    /// The time now on the clock round trips are timed with ([`Clock`]): ns since its epoch.
    #[inline]
    pub(crate) fn rtt_clock(&self) -> u64 {
        self.rtt.clock.now_ns()
    }

    /// Feeds one round trip, sent at `sent_ns` and over at `now_ns` (both read from
    /// [`rtt_clock`](Self::rtt_clock)), to the estimate.
    pub(crate) fn observe_round_trip(&self, sent_ns: u64, now_ns: u64) {
        self.rtt.observe(now_ns.saturating_sub(sent_ns), now_ns);
    }

    /// Forgets the old connection's round trips (see `PeakEwma::forget`).
    pub(crate) fn forget_rtt(&self) {
        self.rtt.forget(self.rtt.clock.now_ns());
    }

    /// The decayed peak-EWMA round-trip estimate.
    pub(crate) fn rtt_estimate(&self) -> Duration {
        Duration::from_nanos(self.rtt.estimate_ns(self.rtt.clock.now_ns()) as u64)
    }

    /// Records a call's outcome; returns the failure streak after it.
    pub(crate) fn record_outcome(&self, success: bool) -> u32 {
        if success {
            self.successes.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            if self.streak_reported.load(Ordering::Relaxed) {
                self.streak_reported.store(false, Ordering::Relaxed);
            }
            0
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
        }
    }

    /// Whether a failure streak at the threshold is news for the driver: true once per streak
    /// (and once more after each ejection ends, see [`rearm_streak`](Self::rearm_streak)).
    pub(crate) fn report_streak(&self) -> bool {
        !self.streak_reported.swap(true, Ordering::AcqRel)
    }

    /// An ejection ended: the next failure of a streak that goes on (the probe) is news again,
    /// as linkerd's failure accrual shuts the endpoint again after a failed probe.
    pub(crate) fn rearm_streak(&self) {
        self.streak_reported.store(false, Ordering::Release);
    }

    /// This interval's outcomes, and a fresh count for the next: taken in one step per counter,
    /// so that a call completing meanwhile counts in one interval or the next, never in none.
    pub(crate) fn take_outcomes(&self) -> (u64, u64) {
        (
            self.successes.swap(0, Ordering::Relaxed),
            self.failures.swap(0, Ordering::Relaxed),
        )
    }
}

/// Peak-EWMA settings: the estimate before any measurement, and how fast old figures fade.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EwmaConfig {
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
}

impl EwmaConfig {
    pub(crate) fn new(default_rtt: Duration, decay: Duration) -> Self {
        EwmaConfig { default_rtt, decay }
    }
}

/// Finagle's peak EWMA, as tower and linkerd use it: a slower response raises the estimate at
/// once, faster ones pull it down gradually, and with no traffic it decays toward zero so that
/// an endpoint that was slow once is tried again.
///
/// Unlike tower's, the default RTT only stands in until the first measurement, which replaces it:
/// averaging from the default would take a whole decay period (10 s) to tell a 1 ms endpoint from
/// a 20 ms one.
///
/// Lock-free, as every call writes it and picks read it: the estimate is one atomic, changed by
/// compare-and-swap, so that no sample is lost to a concurrent one; when it was written is another.
/// A reader (or a writer's decay) that sees one half of a concurrent write decays the new value
/// from the old time or the reverse: an estimate off by one call's decay, which a choice among
/// endpoints does not notice.
#[derive(Debug)]
#[repr(C)]
struct PeakEwma {
    /// What its times are read from and counted from: one for every endpoint of a balancer.
    clock: Clock,
    /// Decay periods per ns: a multiplication, where dividing by the period would cost a
    /// division's latency on every call.
    decays_per_ns: f64,
    default_ns: f64,
    /// The estimate in ns, as `f64` bits.
    estimate_ns: AtomicU64,
    /// When it was last written, in ns on `clock`.
    updated_ns: AtomicU64,
    /// Whether the estimate is a measurement, not the default (or a new connection's cap).
    measured: AtomicBool,
}

impl PeakEwma {
    fn new(config: EwmaConfig, clock: Clock) -> Self {
        let default_ns = config.default_rtt.as_nanos() as f64;
        PeakEwma {
            clock,
            decays_per_ns: 1.0 / config.decay.as_nanos().max(1) as f64,
            default_ns,
            estimate_ns: AtomicU64::new(default_ns.to_bits()),
            updated_ns: AtomicU64::new(clock.now_ns()),
            measured: AtomicBool::new(false),
        }
    }

    /// A new connection: what the old one measured no longer describes the endpoint (it may be
    /// a new process on a new path), so the next measurement replaces the estimate, as for a new
    /// endpoint. Until then the estimate is no higher than the default: a peak the old
    /// connection recorded as it died (a keepalive or deadline timeout) must not starve it, and
    /// one that was fast keeps its lower estimate rather than look worse than a stranger.
    fn forget(&self, now_ns: u64) {
        let estimate = self.estimate_ns(now_ns).min(self.default_ns);
        self.measured.store(false, Ordering::Relaxed);
        self.estimate_ns
            .store(estimate.to_bits(), Ordering::Relaxed);
        self.updated_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Feeds one round trip of `rtt_ns`, which ended at `now_ns` (on its clock): integers, which
    /// a call computes from two clock reads without converting either to a `Duration`.
    fn observe(&self, rtt_ns: u64, now_ns: u64) {
        let rtt_ns = to_f64(rtt_ns);
        // The first measurement replaces the default (a load first: the swap is a locked
        // instruction, needed once per connection).
        let first =
            !self.measured.load(Ordering::Relaxed) && !self.measured.swap(true, Ordering::Relaxed);
        let mut current = self.estimate_ns.load(Ordering::Relaxed);
        loop {
            let estimate = f64::from_bits(current);
            let next = if first || rtt_ns > estimate {
                rtt_ns
            } else {
                let updated = self.updated_ns.load(Ordering::Relaxed);
                let elapsed = to_f64(now_ns.saturating_sub(updated));
                let keep = decayed(elapsed * self.decays_per_ns);
                estimate * keep + rtt_ns * (1.0 - keep)
            };
            match self.estimate_ns.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(changed) => current = changed,
            }
        }
        self.updated_ns.store(now_ns, Ordering::Relaxed);
    }

    /// The estimate at `now_ns` (on its clock), decayed since it was written.
    fn estimate_ns(&self, now_ns: u64) -> f64 {
        let (estimate, updated_ns) = self.read();
        let elapsed = to_f64(now_ns.saturating_sub(updated_ns));
        estimate * decayed(elapsed * self.decays_per_ns)
    }

    /// The estimate, and when it was written (ns on its clock).
    fn read(&self) -> (f64, u64) {
        let estimate = f64::from_bits(self.estimate_ns.load(Ordering::Relaxed));
        (estimate, self.updated_ns.load(Ordering::Relaxed))
    }
}

/// `n` as `f64`, through `i64`: x86-64 converts a signed integer in one instruction, an unsigned
/// one in four of longer latency, on the path of every pick and every round trip. ns and call
/// counts stay far below 2^63 (292 years); anything above is taken as 2^63.
pub(crate) fn to_f64(n: u64) -> f64 {
    n.min(i64::MAX as u64) as i64 as f64
}

/// `e^-x` for `x ≥ 0`, the share of an estimate left after `x` decay periods. Between calls `x`
/// is tiny (microseconds over a 10 s decay), where the series' first terms are exact to well
/// under one part in 10^9 and cost a few multiplications instead of an `exp`, on every call.
fn decayed(x: f64) -> f64 {
    if x < 1e-3 {
        // `x * (1 / 6)`: the compiler keeps a division by 6 (it is not exact), whose latency
        // would be most of this.
        1.0 - x * (1.0 - x * (0.5 - x * (1.0 / 6.0)))
    } else {
        (-x).exp()
    }
}

/// Whether `b`'s RTT estimate times `b_factor` is below `a`'s times `a_factor`, both decayed to
/// the same moment. Every estimate decays by the same factor per unit of time, so that moment
/// cancels out: the comparison reads no clock, and computes one `exp` of the time between the
/// two estimates' updates (toward zero, so that it never overflows).
pub(crate) fn rtt_cost_below(b: &Load, b_factor: f64, a: &Load, a_factor: f64) -> bool {
    let (a_estimate, a_updated) = a.rtt.read();
    let (b_estimate, b_updated) = b.rtt.read();
    // Endpoints of one balancer share the clock; others (tests' endpoints) are compared on
    // `a`'s.
    let b_updated = b.rtt.clock.shift_to(b_updated, &a.rtt.clock);
    let (a_cost, b_cost) = (a_estimate * a_factor, b_estimate * b_factor);
    let decays_per_ns = a.rtt.decays_per_ns;
    if b_updated >= a_updated {
        // `a` was written earlier: it has decayed for longer since.
        let between = to_f64(b_updated - a_updated);
        b_cost < a_cost * decayed(between * decays_per_ns)
    } else {
        let between = to_f64(a_updated - b_updated);
        b_cost * decayed(between * decays_per_ns) < a_cost
    }
}

/// What a strategy may look at when it picks: the endpoint's address, weight and current load.
/// Cheap to clone.
#[derive(Clone)]
pub struct Candidate {
    pub(crate) load: Arc<Load>,
}

impl Candidate {
    /// The endpoint's address, as discovery named it.
    pub fn uri(&self) -> &Uri {
        &self.load.uri
    }

    /// Its static weight from discovery (at least 1).
    pub fn weight(&self) -> u32 {
        self.load.weight()
    }

    /// Calls sent to it that have not finished (to the end of the response body).
    pub fn in_flight(&self) -> usize {
        self.load.in_flight.load(Ordering::Relaxed)
    }

    /// Its peak-EWMA round-trip estimate, measured from each request's send to the first data of
    /// its response.
    pub fn rtt_estimate(&self) -> Duration {
        self.load.rtt_estimate()
    }
}

impl fmt::Debug for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Candidate")
            .field("uri", self.uri())
            .field("weight", &self.weight())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Where an endpoint stands, as [`Balance::snapshot`](super::Balance::snapshot) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndpointState {
    /// Opening a connection, waiting for its first health report, or connected through a
    /// service that is not ready (a pool with no live connection, reconnecting on its own).
    Connecting,
    /// The last connection attempt failed; the next one is scheduled with backoff.
    Down,
    /// Connected and healthy: gets calls.
    Ready,
    /// Connected, but its health check says it should not get calls.
    Unhealthy,
    /// Ejected by outlier detection until its ejection time passes.
    Ejected,
    /// Removed by discovery: gets no new calls, finishing the ones in flight.
    Draining,
}

impl EndpointState {
    /// Lower-case name, for logs, metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Connecting => "connecting",
            EndpointState::Down => "down",
            EndpointState::Ready => "ready",
            EndpointState::Unhealthy => "unhealthy",
            EndpointState::Ejected => "ejected",
            EndpointState::Draining => "draining",
        }
    }
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One endpoint in a [`Balance::snapshot`](super::Balance::snapshot).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointSnapshot {
    /// Its address.
    pub uri: Uri,
    /// Where it stands.
    pub state: EndpointState,
    /// Whether the balancer is sending it calls right now (ready, or anything connected while
    /// the panic threshold is crossed).
    pub receiving: bool,
    /// Calls in flight.
    pub in_flight: usize,
    /// Peak-EWMA round-trip estimate: measured under strategies that read it
    /// ([`PeakEwma`](super::PeakEwma), see [`Strategy::uses_rtt`](super::Strategy::uses_rtt));
    /// under the others, the configured default RTT, decaying.
    pub rtt_estimate: Duration,
    /// Static weight from discovery.
    pub weight: u32,
    /// How many times outlier detection has ejected it.
    pub ejections: u32,
    /// Why it is not ready, when it is not (the last connect error, the health status, …).
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_a_unix_socket_by_its_path_not_localhost() {
        use crate::channel::{abstract_key, unix_key};
        assert_eq!(authority(&unix_key("/run/app.sock")), "unix:/run/app.sock");
        assert_eq!(authority(&unix_key("app.sock")), "unix:app.sock");
        assert_eq!(
            authority(&unix_key("/run/my app.sock")),
            "unix:/run/my app.sock"
        );
        assert_eq!(
            authority(&abstract_key("my\0app")),
            "unix-abstract:my%00app"
        );
        assert_eq!(
            authority(&"http://10.0.0.1:50051".parse().unwrap()),
            "10.0.0.1:50051"
        );
    }

    fn ewma() -> PeakEwma {
        PeakEwma::new(
            EwmaConfig::new(Duration::from_millis(30), Duration::from_secs(10)),
            Clock::new(),
        )
    }

    /// The estimate's figures at moments of Tokio's clock (paused in these tests, so that its
    /// clock is Tokio's).
    impl PeakEwma {
        fn observe_at(&self, rtt: Duration, at: Instant) {
            self.observe(rtt.as_nanos() as u64, self.clock.ns_at(at));
        }

        fn estimate(&self, at: Instant) -> Duration {
            Duration::from_nanos(self.estimate_ns(self.clock.ns_at(at)) as u64)
        }

        fn forget_at(&self, at: Instant) {
            self.forget(self.clock.ns_at(at));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let e = ewma();
        let t0 = Instant::now();
        assert_eq!(e.estimate(t0), Duration::from_millis(30));
        // The first measurement replaces the default, even when it is faster.
        e.observe_at(Duration::from_millis(2), t0);
        assert_eq!(e.estimate(t0), Duration::from_millis(2));
        e.observe_at(Duration::from_millis(100), t0);
        assert_eq!(
            e.estimate(t0),
            Duration::from_millis(100),
            "a peak is taken at once"
        );
        // A fast response 1 s later pulls the estimate down only part of the way.
        let t1 = t0 + Duration::from_secs(1);
        e.observe_at(Duration::from_millis(1), t1);
        let after = e.estimate(t1);
        assert!(
            after > Duration::from_millis(80) && after < Duration::from_millis(100),
            "{after:?}"
        );
        // With no traffic for a minute it fades toward zero.
        assert!(e.estimate(t1 + Duration::from_secs(60)) < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_forgets_the_old_peak_but_keeps_a_low_estimate() {
        let t0 = Instant::now();
        let e = ewma();
        e.observe_at(Duration::from_millis(2), t0);
        e.observe_at(Duration::from_secs(1), t0);
        e.forget_at(t0);
        assert_eq!(
            e.estimate(t0),
            Duration::from_millis(30),
            "capped at the default"
        );
        // Unmeasured again: the next round trip replaces the estimate even though it is faster.
        e.observe_at(Duration::from_millis(3), t0);
        assert_eq!(e.estimate(t0), Duration::from_millis(3));

        let fast = ewma();
        fast.observe_at(Duration::from_millis(2), t0);
        fast.forget_at(t0);
        assert_eq!(
            fast.estimate(t0),
            Duration::from_millis(2),
            "a low estimate is kept"
        );
    }

    #[test]
    fn concurrent_round_trips_lose_no_peak() {
        let e = ewma();
        let t0 = e.clock.now_ns();
        e.observe(1_000, t0);
        // Four threads feed round trips at the same instant (no decay between them): whatever
        // the interleaving, the estimate ends at the largest, as under a lock. A write computed
        // from a stale estimate (a lost update) would leave a smaller one.
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let e = &e;
                scope.spawn(move || {
                    for i in 0..20_000u64 {
                        e.observe(1_000 + (i * 4 + thread) % 50_000, t0);
                    }
                });
            }
        });
        assert_eq!(e.estimate_ns(t0), (1_000 + 49_999) as f64);
    }

    #[tokio::test(start_paused = true)]
    async fn costs_compare_without_a_clock_as_they_would_with_one() {
        let load = || Load::unattached(1, Uri::from_static("http://a:1"), 1);
        let (a, b) = (load(), load());
        let t0 = Instant::now();
        a.observe_rtt(Duration::from_millis(40), t0);
        // `b` is faster but was measured 5 s later, and `a` has decayed meanwhile.
        let t1 = t0 + Duration::from_secs(5);
        b.observe_rtt(Duration::from_millis(20), t1);
        for now in [
            t1,
            t1 + Duration::from_secs(30),
            t1 + Duration::from_secs(3600),
        ] {
            for (fa, fb) in [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (1.0, 5.0), (3.0, 1.0)] {
                let (ea, eb) = (
                    a.rtt.estimate_ns(a.rtt.clock.ns_at(now)),
                    b.rtt.estimate_ns(b.rtt.clock.ns_at(now)),
                );
                let direct = eb * fb < ea * fa;
                assert_eq!(rtt_cost_below(&b, fb, &a, fa), direct, "{fa} {fb}");
                let direct = ea * fa < eb * fb;
                assert_eq!(rtt_cost_below(&a, fa, &b, fb), direct, "{fa} {fb}");
            }
        }
    }

    #[test]
    fn counts_convert_to_f64_exactly_and_saturate_past_2_63() {
        assert_eq!(to_f64(0), 0.0);
        assert_eq!(to_f64(30_000_000), 30_000_000.0);
        assert_eq!(to_f64(1 << 53), (1u64 << 53) as f64);
        assert_eq!(to_f64(u64::MAX), i64::MAX as f64);
        assert!(to_f64(u64::MAX) > 0.0);
    }

    #[test]
    fn decay_is_exp_to_within_a_part_in_a_billion() {
        for x in [0.0, 1e-9, 1e-6, 1e-4, 9.99e-4, 1e-3, 0.5, 3.0, 700.0, 1e6] {
            let exact = f64::exp(-x);
            assert!((decayed(x) - exact).abs() <= exact * 1e-9, "{x}");
        }
    }

    #[test]
    fn outcomes_track_the_failure_streak() {
        let load = Load::unattached(1, Uri::from_static("http://a:1"), 1);
        assert_eq!(load.record_outcome(false), 1);
        assert_eq!(load.record_outcome(false), 2);
        assert_eq!(load.record_outcome(true), 0);
        assert_eq!(load.record_outcome(false), 1);
        assert_eq!(load.successes.load(Ordering::Relaxed), 1);
        assert_eq!(load.failures.load(Ordering::Relaxed), 3);
    }
}
