//! Every call of the tour in time order, bucketed for the chart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;
use towline::testkit::nearest_rank;

use crate::BUCKET;

/// One completed call (or record) for the time series: when it ended, how long it took, and
/// which backend answered (`None`: it failed).
#[derive(Debug, Clone, Copy)]
struct Sample {
    ended_ms: u32,
    latency_us: u32,
    backend: Option<u8>,
}

/// Every call of the tour, for the chart. (The per-phase table comes from `LoadReport`s; this
/// keeps the time of each call, which a report does not.)
#[derive(Clone)]
pub(crate) struct Timeline {
    started: Instant,
    pub(crate) backend_ids: Arc<[String]>,
    /// `None`: keep nothing.
    samples: Arc<Mutex<Option<Vec<Sample>>>>,
}

impl Timeline {
    pub(crate) fn new(backend_ids: Vec<String>) -> Self {
        Timeline {
            started: Instant::now(),
            backend_ids: backend_ids.into(),
            samples: Arc::new(Mutex::new(Some(Vec::new()))),
        }
    }

    /// A timeline that keeps nothing (for the warm-up).
    pub(crate) fn discard() -> Self {
        Timeline {
            started: Instant::now(),
            backend_ids: Arc::new([]),
            samples: Arc::new(Mutex::new(None)),
        }
    }

    /// Seconds since the tour started.
    pub(crate) fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub(crate) fn record(&self, call_started: Instant, outcome: &Result<String, Status>) {
        let sample = Sample {
            ended_ms: self.started.elapsed().as_millis() as u32,
            latency_us: call_started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
            backend: outcome.as_ref().ok().and_then(|id| {
                let index = self.backend_ids.iter().position(|known| known == id)?;
                u8::try_from(index).ok()
            }),
        };
        if let Some(samples) = self.lock().as_mut() {
            samples.push(sample);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Sample>>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The samples in `BUCKET`-wide time buckets, from the start of the tour.
    pub(crate) fn buckets(&self) -> Vec<Bucket> {
        let width_ms = BUCKET.as_millis() as u32;
        let mut grouped: BTreeMap<u32, Vec<Sample>> = BTreeMap::new();
        for sample in self.lock().iter().flatten() {
            grouped
                .entry(sample.ended_ms / width_ms)
                .or_default()
                .push(*sample);
        }
        grouped
            .into_iter()
            .map(|(index, samples)| Bucket::new(index, &samples, self.backend_ids.len()))
            .collect()
    }
}

/// One time bucket of the series.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    /// Its start, in seconds since the tour started.
    pub(crate) start: f64,
    pub(crate) calls: u64,
    pub(crate) failed: u64,
    /// p99 over every call that ended in it.
    pub(crate) p99: Duration,
    /// Per backend: calls it answered and their p99 (`None` without calls).
    pub(crate) backends: Vec<(u64, Option<Duration>)>,
}

impl Bucket {
    fn new(index: u32, samples: &[Sample], backends: usize) -> Self {
        let all: Vec<u32> = samples.iter().map(|s| s.latency_us).collect();
        let per_backend = (0..backends)
            .map(|b| {
                let mine: Vec<u32> = samples
                    .iter()
                    .filter(|s| s.backend == Some(b as u8))
                    .map(|s| s.latency_us)
                    .collect();
                (mine.len() as u64, (!mine.is_empty()).then(|| p99(mine)))
            })
            .collect();
        Bucket {
            start: f64::from(index) * BUCKET.as_secs_f64(),
            calls: samples.len() as u64,
            failed: samples.iter().filter(|s| s.backend.is_none()).count() as u64,
            p99: p99(all),
            backends: per_backend,
        }
    }

    /// The share (0–100%) of the bucket's calls that backend `b` answered.
    pub(crate) fn share(&self, b: usize) -> f64 {
        100.0 * self.backends[b].0 as f64 / self.calls.max(1) as f64
    }

    pub(crate) fn failed_share(&self) -> f64 {
        100.0 * self.failed as f64 / self.calls.max(1) as f64
    }
}

/// Nearest-rank 99th percentile, the definition `LoadReport::percentile` uses.
fn p99(mut latencies_us: Vec<u32>) -> Duration {
    latencies_us.sort_unstable();
    Duration::from_micros(nearest_rank(&latencies_us, 0.99).map_or(0, u64::from))
}
