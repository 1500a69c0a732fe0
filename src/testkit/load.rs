use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tonic::Status;

use crate::status::code_name;

/// Bounded closed-loop load: `concurrency` workers call one after another until `calls` have
/// been made or `duration` has passed, whichever comes first. Both bounds always apply.
///
/// Each call returns `Ok(tag)` or a `Status`. Tags are tallied (return the serving backend's id
/// to see the traffic share), failures are counted by code, and every call's latency is kept for
/// exact percentiles.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// use std::time::Duration;
/// use towline::testkit::{Backend, Load, pb::{echo_client::EchoClient, EchoRequest}};
///
/// let backend = Backend::start().await?;
/// let client = EchoClient::new(tonic::transport::Endpoint::from(backend.uri()).connect_lazy());
/// let report = Load::new(8)
///     .calls(200)
///     .duration(Duration::from_secs(10))
///     .run(move |_| {
///         let mut client = client.clone();
///         async move { Ok(client.unary(EchoRequest::default()).await?.into_inner().backend) }
///     })
///     .await;
/// assert_eq!(report.calls(), 200);
/// assert_eq!(report.tally()[backend.id()], 200);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Load {
    concurrency: usize,
    calls: u64,
    duration: Duration,
    on_call: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl fmt::Debug for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load")
            .field("concurrency", &self.concurrency)
            .field("calls", &self.calls)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl Load {
    /// `concurrency` calls in flight (at least 1). Defaults: 10,000 calls, 10 seconds.
    pub fn new(concurrency: usize) -> Self {
        Load {
            concurrency: concurrency.max(1),
            calls: 10_000,
            duration: Duration::from_secs(10),
            on_call: None,
        }
    }

    /// Stop after this many calls.
    pub fn calls(mut self, calls: u64) -> Self {
        self.calls = calls;
        self
    }

    /// Stop starting calls after this long.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Called once after each call completes (to drive a progress bar).
    pub fn on_call(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_call = Some(Arc::new(f));
        self
    }

    /// Runs the load on the current runtime; `call(i)` makes call number `i`.
    pub async fn run<F, Fut, T>(&self, call: F) -> LoadReport<T>
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Status>> + Send + 'static,
        T: Ord + Hash + Send + 'static,
    {
        let call = Arc::new(call);
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + self.duration;
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.concurrency {
            let (call, next, limit, on_call) =
                (call.clone(), next.clone(), self.calls, self.on_call.clone());
            workers.spawn(async move {
                let mut part = LoadReport::empty();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit || Instant::now() >= deadline {
                        return part;
                    }
                    let t0 = Instant::now();
                    let outcome = call(i).await;
                    part.record(t0.elapsed(), outcome);
                    if let Some(on_call) = &on_call {
                        on_call();
                    }
                }
            });
        }
        let mut report = LoadReport::empty();
        while let Some(part) = workers.join_next().await {
            match part {
                Ok(part) => report.merge(part),
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(_) => {}
            }
        }
        report.elapsed = started.elapsed();
        report.latencies.sort_unstable();
        report
    }
}

/// What a [`Load`] run saw.
#[derive(Debug, Clone)]
pub struct LoadReport<T> {
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: BTreeMap<&'static str, u64>,
    tally: BTreeMap<T, u64>,
}

impl<T: Ord> LoadReport<T> {
    fn empty() -> Self {
        LoadReport {
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            failures: BTreeMap::new(),
            tally: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<T, Status>) {
        self.latencies.push(latency);
        match outcome {
            Ok(tag) => *self.tally.entry(tag).or_default() += 1,
            Err(status) => *self.failures.entry(code_name(status.code())).or_default() += 1,
        }
    }

    fn merge(&mut self, other: LoadReport<T>) {
        self.latencies.extend(other.latencies);
        for (code, n) in other.failures {
            *self.failures.entry(code).or_default() += n;
        }
        for (tag, n) in other.tally {
            *self.tally.entry(tag).or_default() += n;
        }
    }

    /// Calls completed, failed ones included.
    pub fn calls(&self) -> u64 {
        self.latencies.len() as u64
    }

    /// Calls that returned a `Status`.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Failed calls by code name (`"UNAVAILABLE"`).
    pub fn failures(&self) -> &BTreeMap<&'static str, u64> {
        &self.failures
    }

    /// Successful calls by the tag they returned.
    pub fn tally(&self) -> &BTreeMap<T, u64> {
        &self.tally
    }

    /// Wall time of the run.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Completed calls per second.
    pub fn throughput(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency below which a fraction `q` (0.0 to 1.0) of calls completed (nearest rank).
    pub fn percentile(&self, q: f64) -> Duration {
        nearest_rank(&self.latencies, q).unwrap_or_default()
    }

    /// Median latency.
    pub fn p50(&self) -> Duration {
        self.percentile(0.50)
    }

    /// 99th percentile latency.
    pub fn p99(&self) -> Duration {
        self.percentile(0.99)
    }
}

impl<T: Ord> fmt::Display for LoadReport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls in {:.2?} ({:.0} req/s), p50 {:.2?}, p99 {:.2?}, {} failed",
            self.calls(),
            self.elapsed,
            self.throughput(),
            self.p50(),
            self.p99(),
            self.failed()
        )
    }
}

/// Lays out a plain-text table for a report: each column as wide as its widest cell, a rule under
/// the headers, the first column (the row's name) left-aligned and the others (figures)
/// right-aligned. Rows shorter than the headers leave the rest blank.
///
/// ```
/// let table = towline::testkit::text_table(
///     &["variant", "req/s"],
///     &[vec!["channel".into(), "19300".into()], vec!["pool".into(), "9".into()]],
/// );
/// assert_eq!(table, "variant  req/s\n-------  -----\nchannel  19300\npool         9\n");
/// ```
pub fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .filter_map(|row| row.get(i))
                .map(|cell| cell.chars().count())
                .chain([headers[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let cell = cells.next().unwrap_or("");
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    let rules: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    line(&mut rules.iter().map(String::as_str));
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The nearest-rank `q` quantile (0.0 to 1.0) of `sorted`, which must be in ascending order:
/// the smallest value with at least `q` of the values at or below it. `None` when it is empty.
///
/// ```
/// assert_eq!(towline::testkit::nearest_rank(&[1, 2, 3, 4], 0.5), Some(2));
/// assert_eq!(towline::testkit::nearest_rank(&[1, 2, 3, 4], 0.99), Some(4));
/// assert_eq!(towline::testkit::nearest_rank::<u32>(&[], 0.5), None);
/// ```
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_at_the_call_bound_and_counts_outcomes() {
        let report = Load::new(4)
            .calls(100)
            .run(|i| async move {
                if i % 10 == 0 {
                    Err(Status::unavailable("x"))
                } else {
                    Ok(i % 2)
                }
            })
            .await;
        assert_eq!(report.calls(), 100);
        assert_eq!(report.failed(), 10);
        assert_eq!(report.failures()["UNAVAILABLE"], 10);
        assert_eq!(report.tally()[&1], 50);
        assert_eq!(report.tally()[&0], 40);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_time_bound() {
        let report = Load::new(2)
            .calls(u64::MAX)
            .duration(Duration::from_millis(100))
            .run(|_| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(())
            })
            .await;
        // Two workers, 10 ms per call, 100 ms: ten rounds each (plus the call in flight at the end).
        assert!((20..=22).contains(&report.calls()), "{}", report.calls());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut report = LoadReport::<()>::empty();
        for ms in (1..=100).rev() {
            report.record(Duration::from_millis(ms), Ok(()));
        }
        report.latencies.sort_unstable();
        assert_eq!(report.p50(), Duration::from_millis(50));
        assert_eq!(report.p99(), Duration::from_millis(99));
        assert_eq!(report.percentile(1.0), Duration::from_millis(100));
        assert_eq!(report.percentile(0.0), Duration::from_millis(1));
        assert_eq!(LoadReport::<()>::empty().p99(), Duration::ZERO);
    }
}
