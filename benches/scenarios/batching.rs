//! `batching`: records/s and per-record latency of a real `Log.Produce` RPC, one record per call
//! vs `BatchLayer` at (100 items, 100 ms linger) and (1000 items, 10 ms linger).
//!
//! Every variant runs against the same testkit backend over one connection, interleaved round by
//! round. Latency is per record: from the caller's `call` to its own result. Records come from
//! four producer tasks that each keep their share of the records outstanding (as a pipelining
//! producer does); the batched variants keep `max_items × max_in_flight` outstanding, enough to
//! fill every batch in flight, the unbatched one 64. (Twice that, so that as many again wait in
//! the pending room, measured lower records/s and a p99 several times the linger here: the
//! extra records only queue.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::{Layer, Service, ServiceExt};
use towline::batch::{BatchConfig, BatchLayer, Batcher};
use towline::connect::Connect;
use towline::testkit::Backend;
use towline::testkit::pb::{ProduceRequest, ProduceResponse, log_client::LogClient};

use crate::support::{BoxScenario, Figures, Settings, micros, note, print_table};

/// 64-byte records, as the overhead scenario's payloads.
static RECORD: [u8; 64] = [7; 64];
/// Records outstanding in the unbatched variant (the CPU is saturated near 64 calls in flight
/// on 2 cores).
const UNBATCHED_CONCURRENCY: usize = 64;
/// Producer tasks; each keeps its share of the outstanding records.
const PRODUCERS: usize = 4;
/// (max items, linger) of the batched variants.
const BATCHED: [(usize, Duration); 2] = [
    (100, Duration::from_millis(100)),
    (1000, Duration::from_millis(10)),
];

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backend = Backend::start().await?;
        let channel = Connect::new().oneshot(backend.uri()).await?;
        let client = LogClient::new(channel);
        // Batched runs are bounded like the others in time; in records they get 200 × the calls,
        // since each record costs a fraction of a call.
        let batched_records = settings.calls * 200;

        let unbatched = unbatched_service(client.clone());
        let mut variants = Vec::new();
        for (max_items, linger) in BATCHED {
            let config = BatchConfig::builder()
                .max_items(max_items)
                .linger(linger)
                .build()?;
            let concurrency = max_items * config.max_in_flight();
            let batch = BatchLayer::new(Records, config).layer(produce(client.clone()));
            variants.push((max_items, linger, concurrency, batch));
        }

        // Warm every path (connection, allocator) before measuring.
        let warm = Duration::from_secs(1);
        drive(&unbatched, UNBATCHED_CONCURRENCY, 2_000, warm).await;
        for (.., concurrency, batch) in &variants {
            drive(batch, *concurrency, 20_000, warm).await;
        }

        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); 1 + variants.len()];
        for _ in 0..settings.rounds {
            let (calls, duration) = (settings.calls, settings.duration);
            runs[0].push(drive(&unbatched, UNBATCHED_CONCURRENCY, calls, duration).await);
            for (i, (.., concurrency, batch)) in variants.iter().enumerate() {
                runs[i + 1].push(drive(batch, *concurrency, batched_records, duration).await);
            }
        }
        let figures: Vec<Figures> = runs.iter().map(|r| Figures::median(r)).collect();
        let failed: u64 = figures.iter().map(|f| f.failed).sum();
        if failed > 0 {
            return Err(format!("{failed} records failed").into());
        }

        let base = figures[0];
        let mut rows = vec![vec![
            "unbatched".to_string(),
            UNBATCHED_CONCURRENCY.to_string(),
            format!("{:.0}", base.rps),
            micros(base.p50),
            micros(base.p99),
            "-".into(),
            "1.00".into(),
        ]];
        let mut json = vec![serde_json::json!({
            "variant": "unbatched",
            "concurrency": UNBATCHED_CONCURRENCY,
            "figures": base.json(),
        })];
        for ((max_items, linger, concurrency, ..), f) in variants.iter().zip(&figures[1..]) {
            let speedup = f.rps / base.rps.max(1e-9);
            rows.push(vec![
                format!("batched ({max_items} items, {} ms)", linger.as_millis()),
                concurrency.to_string(),
                format!("{:.0}", f.rps),
                micros(f.p50),
                micros(f.p99),
                format!("{}", f.p99 <= *linger),
                format!("{speedup:.2}"),
            ]);
            json.push(serde_json::json!({
                "variant": "batched",
                "max_items": max_items,
                "linger_ms": linger.as_millis() as u64,
                "concurrency": concurrency,
                "figures": f.json(),
                "p99_within_linger": f.p99 <= *linger,
                "speedup": speedup,
            }));
        }
        print_table(
            &[
                "variant",
                "outstanding",
                "records/s",
                "p50/record",
                "p99/record",
                "p99 ≤ linger",
                "× unbatched",
            ],
            &rows,
        );
        note("seed: 50167 records/s; goal: ≥ 1000000 records/s with p99 added latency ≤ linger");
        Ok(serde_json::json!({ "rounds": settings.rounds, "runs": json }))
    })
}

/// Drives `records` calls (at most `duration`) through `svc` from `PRODUCERS` tasks, each
/// keeping `window / PRODUCERS` calls outstanding: the way a producer pipelines records, rather
/// than one task per record in flight (whose scheduling would dominate at a million records/s).
/// Latency is per record, from `call` to its own result.
async fn drive<S>(svc: &S, window: usize, records: u64, duration: Duration) -> Figures
where
    S: Service<Bytes, Error = Status> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let per_producer = window.div_ceil(PRODUCERS).max(1);
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..PRODUCERS {
        let (mut svc, next) = (svc.clone(), next.clone());
        producers.spawn(async move {
            let mut outstanding = FuturesUnordered::new();
            let mut latencies = Histogram::new();
            let mut failed = 0u64;
            loop {
                while outstanding.len() < per_producer
                    && Instant::now() < deadline
                    && next.fetch_add(1, Ordering::Relaxed) < records
                {
                    // Wait for room, reaping results meanwhile so that no finished record waits
                    // on its producer to be counted.
                    let ready = std::future::poll_fn(|cx| {
                        while let Poll::Ready(Some(done)) = outstanding.poll_next_unpin(cx) {
                            let (latency, ok): (Duration, bool) = done;
                            latencies.record(latency);
                            failed += u64::from(!ok);
                        }
                        svc.poll_ready(cx)
                    })
                    .await;
                    if ready.is_err() {
                        failed += 1;
                        continue;
                    }
                    let t0 = Instant::now();
                    let call = svc.call(Bytes::from_static(&RECORD));
                    outstanding.push(async move {
                        let ok = call.await.is_ok();
                        (t0.elapsed(), ok)
                    });
                }
                match outstanding.next().await {
                    Some((latency, ok)) => {
                        latencies.record(latency);
                        failed += u64::from(!ok);
                    }
                    None => return (latencies, failed),
                }
            }
        });
    }
    let (mut latencies, mut failed) = (Histogram::new(), 0);
    while let Some(part) = producers.join_next().await {
        let (part, part_failed) = part.expect("a producer task panicked");
        latencies.merge(&part);
        failed += part_failed;
    }
    let elapsed = started.elapsed();
    Figures {
        calls: latencies.count,
        failed,
        rps: latencies.count as f64 / elapsed.as_secs_f64().max(1e-9),
        p50: latencies.percentile(0.50),
        p99: latencies.percentile(0.99),
    }
}

/// Exact latencies at 1 µs resolution up to 1 s (longer ones count as 1 s), in a fixed array:
/// recording millions of records never reallocates (a growing `Vec` of them paused its producer
/// for milliseconds at each doubling, which showed up in the tail).
struct Histogram {
    counts: Vec<u32>,
    count: u64,
}

impl Histogram {
    const MAX_MICROS: usize = 1_000_000;

    fn new() -> Self {
        Histogram {
            counts: vec![0; Self::MAX_MICROS + 1],
            count: 0,
        }
    }

    fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as usize).min(Self::MAX_MICROS);
        self.counts[micros] += 1;
        self.count += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
    }

    /// Nearest rank, as `LoadReport::percentile`.
    fn percentile(&self, q: f64) -> Duration {
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (micros, n) in self.counts.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                return Duration::from_micros(micros as u64);
            }
        }
        Duration::ZERO
    }
}

/// One record per `Produce` call, its result checked.
fn unbatched_service(client: LogClient<Channel>) -> UnbatchedService {
    tower::util::BoxCloneService::new(tower::service_fn(move |record: Bytes| {
        let mut client = client.clone();
        async move {
            let request = ProduceRequest {
                key: String::new(),
                records: vec![record],
            };
            let results = client.produce(request).await?.into_inner().results;
            match results.first() {
                Some(r) if r.code == 0 => Ok(r.offset),
                _ => Err(Status::internal("record rejected")),
            }
        }
    }))
}

type UnbatchedService = tower::util::BoxCloneService<Bytes, u64, Status>;

type ProduceService =
    tower::util::BoxCloneService<ProduceRequest, tonic::Response<ProduceResponse>, Status>;

fn produce(client: LogClient<Channel>) -> ProduceService {
    tower::util::BoxCloneService::new(tower::service_fn(move |request: ProduceRequest| {
        let mut client = client.clone();
        async move { client.produce(request).await }
    }))
}

/// Records without a key, merged into one `Produce` call, an offset back per record.
#[derive(Debug, Clone, Copy)]
struct Records;

impl Batcher for Records {
    type Item = Bytes;
    type Key = ();
    type Request = ProduceRequest;
    type Response = tonic::Response<ProduceResponse>;
    type Output = u64;

    fn key(&mut self, _: &Bytes) {}

    fn weight(&mut self, record: &Bytes) -> usize {
        record.len()
    }

    fn merge(&mut self, _: &(), records: Vec<Bytes>) -> ProduceRequest {
        ProduceRequest {
            key: String::new(),
            records,
        }
    }

    fn split(&mut self, _: &(), _: usize, response: Self::Response) -> Vec<Result<u64, Status>> {
        let results = response.into_inner().results.into_iter();
        results
            .map(|r| match Code::from_i32(r.code) {
                Code::Ok => Ok(r.offset),
                code => Err(Status::new(code, r.message)),
            })
            .collect()
    }
}
