//! One backend fails mid-run and is repaired: the timeline `kill-backend` (stop, restart) and
//! `blackhole` (packets dropped, then let through) both measure.
//!
//! Closed-loop load runs through the client for the whole run. The fault goes on after
//! `phases.before`, and is repaired `phases.during` later; the load goes on for `phases.after`.
//! Every time is measured on one clock, in milliseconds from the start of the run, and reported
//! relative to the fault or the repair.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use towline::BoxError;
use towline::testkit::Load;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

use crate::support::Stack;

/// A safety bound on the calls of one run; the time bound (the sum of the phases) is the one
/// that ends it. At the ~20–50k calls/s these machines manage, it is never reached.
const MAX_CALLS: u64 = 5_000_000;

/// How many distinct failure messages a [`FaultReport`] keeps.
pub const MAX_MESSAGES: usize = 20;

/// A run's three phases.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Healthy, before the fault.
    pub before: Duration,
    /// With the fault on.
    pub during: Duration,
    /// After the repair.
    pub after: Duration,
}

/// What the client saw of one fault.
#[derive(Debug)]
pub struct FaultReport {
    pub calls: u64,
    pub failed: u64,
    /// Failed calls by gRPC code name.
    pub failures: BTreeMap<&'static str, u64>,
    /// Failed calls by `CODE: message` (at most [`MAX_MESSAGES`] distinct ones; the rest are
    /// counted in `failures` only).
    pub failure_messages: BTreeMap<String, u64>,
    /// From the fault to the end of the last failed call: when calls stopped failing.
    pub last_failure_after_fault: Option<Duration>,
    /// From the fault to the start of the last call that then failed: the last call sent to the
    /// broken backend, as far as the caller can tell.
    pub last_failed_call_sent_after_fault: Option<Duration>,
    /// From the repair to the first call the repaired backend answered.
    pub back_after_repair: Option<Duration>,
    pub p99: Duration,
    /// The slowest call of the run.
    pub max_latency: Duration,
    /// With a deadline: calls that took longer than the deadline plus `slack`.
    pub over_deadline: Option<u64>,
    /// When the fault went on and when it was repaired, to place other observations.
    pub fault_at: Instant,
    pub repaired_at: Instant,
}

/// A call's deadline, sent as `grpc-timeout`, and how much later than it a call may end before
/// it counts as over (timers, scheduling on a loaded machine).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub timeout: Duration,
    pub slack: Duration,
}

/// Times in milliseconds since the start of the run; `UNSET` until they happen.
struct Timeline {
    start: Instant,
    fault_ms: AtomicU64,
    repair_ms: AtomicU64,
    last_failure_ms: AtomicU64,
    last_failed_call_sent_ms: AtomicU64,
    first_victim_reply_after_repair_ms: AtomicU64,
    over_deadline: AtomicU64,
    failure_messages: Mutex<BTreeMap<String, u64>>,
}

const UNSET: u64 = u64::MAX;

impl Timeline {
    fn new() -> Self {
        Timeline {
            start: Instant::now(),
            fault_ms: AtomicU64::new(UNSET),
            repair_ms: AtomicU64::new(UNSET),
            last_failure_ms: AtomicU64::new(UNSET),
            last_failed_call_sent_ms: AtomicU64::new(UNSET),
            first_victim_reply_after_repair_ms: AtomicU64::new(UNSET),
            over_deadline: AtomicU64::new(0),
            failure_messages: Mutex::new(BTreeMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn get(value: &AtomicU64) -> Option<u64> {
        Some(value.load(Ordering::Relaxed)).filter(|&ms| ms != UNSET)
    }

    /// Records a maximum in a field that starts `UNSET` (`fetch_max` would keep `UNSET`).
    fn raise(value: &AtomicU64, ms: u64) {
        let _ = value.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            (old == UNSET || old < ms).then_some(ms)
        });
    }

    /// Counts a failure by its code and message.
    fn failed_with(&self, status: &tonic::Status) {
        let message = format!("{:?}: {}", status.code(), status.message());
        let mut messages = self
            .failure_messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if messages.len() < MAX_MESSAGES || messages.contains_key(&message) {
            *messages.entry(message).or_default() += 1;
        }
    }

    /// `at − since` as a duration, when both happened.
    fn after(at: &AtomicU64, since: &AtomicU64) -> Option<Duration> {
        let (at, since) = (Self::get(at)?, Self::get(since)?);
        Some(Duration::from_millis(at.saturating_sub(since)))
    }
}

/// Drives `concurrency` calls in flight through `client` while `fault` and then `repair` run at
/// their phase boundaries. `victim_id` is the id the broken backend puts in its replies.
pub async fn fault_run<S: Stack>(
    client: EchoClient<S>,
    concurrency: usize,
    victim_id: &str,
    phases: Phases,
    deadline: Option<Deadline>,
    fault: impl Future<Output = Result<(), BoxError>>,
    repair: impl Future<Output = Result<(), BoxError>>,
) -> Result<FaultReport, BoxError> {
    let timeline = Arc::new(Timeline::new());
    let load = Load::new(concurrency)
        .calls(MAX_CALLS)
        .duration(phases.before + phases.during + phases.after);
    let (t, victim_id) = (timeline.clone(), victim_id.to_owned());
    let run = tokio::spawn(async move {
        load.run(move |_| {
            let mut client = client.clone();
            let (t, victim_id) = (t.clone(), victim_id.clone());
            async move {
                let mut request = tonic::Request::new(EchoRequest::default());
                if let Some(deadline) = deadline {
                    request.set_timeout(deadline.timeout);
                }
                let sent_ms = t.now_ms();
                let started = Instant::now();
                let result = client.unary(request).await;
                if deadline.is_some_and(|d| started.elapsed() > d.timeout + d.slack) {
                    t.over_deadline.fetch_add(1, Ordering::Relaxed);
                }
                match result {
                    Ok(reply) => {
                        if reply.into_inner().backend == victim_id
                            && Timeline::get(&t.repair_ms).is_some()
                        {
                            t.first_victim_reply_after_repair_ms
                                .fetch_min(t.now_ms(), Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    Err(status) => {
                        Timeline::raise(&t.last_failure_ms, t.now_ms());
                        Timeline::raise(&t.last_failed_call_sent_ms, sent_ms);
                        t.failed_with(&status);
                        Err(status)
                    }
                }
            }
        })
        .await
    });
    tokio::time::sleep(phases.before).await;
    fault.await?;
    let fault_at = Instant::now();
    timeline
        .fault_ms
        .store(timeline.now_ms(), Ordering::Relaxed);
    tokio::time::sleep(phases.during).await;
    repair.await?;
    let repaired_at = Instant::now();
    timeline
        .repair_ms
        .store(timeline.now_ms(), Ordering::Relaxed);
    let report = run.await?;

    let t = &timeline;
    Ok(FaultReport {
        calls: report.calls(),
        failed: report.failed(),
        failures: report.failures().clone(),
        failure_messages: std::mem::take(
            &mut *t
                .failure_messages
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ),
        last_failure_after_fault: Timeline::after(&t.last_failure_ms, &t.fault_ms),
        last_failed_call_sent_after_fault: Timeline::after(
            &t.last_failed_call_sent_ms,
            &t.fault_ms,
        ),
        back_after_repair: Timeline::after(&t.first_victim_reply_after_repair_ms, &t.repair_ms),
        p99: report.p99(),
        max_latency: report.percentile(1.0),
        over_deadline: deadline.map(|_| t.over_deadline.load(Ordering::Relaxed)),
        fault_at,
        repaired_at,
    })
}

/// `37 (32 deadline, 5 unavailable)`.
pub fn failures_cell(report: &FaultReport) -> String {
    if report.failed == 0 {
        return "0".to_owned();
    }
    let by_code: Vec<String> = report
        .failures
        .iter()
        .map(|(code, n)| {
            let word = code.split('_').next().unwrap_or(code).to_lowercase();
            format!("{n} {word}")
        })
        .collect();
    format!("{} ({})", report.failed, by_code.join(", "))
}

/// `123 ms`, or `-` when it never happened.
pub fn millis(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), |d| format!("{} ms", d.as_millis()))
}

/// Milliseconds for JSON, `null` when it never happened.
pub fn json_ms(d: Option<Duration>) -> serde_json::Value {
    d.map(|d| d.as_millis() as u64).into()
}
