//! The towline tour: four real gRPC backends, the full towline stack in front of them, and faults.
//!
//! ```text
//! cargo run --release --example tour
//! cargo run --release --example tour -- --strategy round-robin --phase-seconds 4 --concurrency 32
//! cargo run --release --example tour -- --json                 # also write target/tour/tour.json
//! cargo run --release --example tour -- --json figures.json    # … or to a path of your choice
//! cargo run --release --example tour -- --discovery etcd       # backends registered in etcd
//! ```
//!
//! The stack is what a production client would run, outer to inner: `MetricsLayer` (gRFC A66,
//! call level) → `RetryLayer` (gRFC A6: up to 3 attempts, with A6's retry throttling as the
//! budget: 100 tokens, 0.1 back per success) → a health-gated `BalanceLayer` (a `grpc.health.v1`
//! watch per endpoint, outlier detection scaled down to the tour's seconds, the strategy you pick;
//! peak-EWMA by default) → a `PoolLayer` per endpoint (two HTTP/2 connections each), driven
//! through plain tonic-generated clients. After a one-second warm-up that is not measured, load
//! runs through eight phases:
//!
//! | phase | what changes |
//! |---|---|
//! | steady | nothing: four healthy backends |
//! | slow | backend-1 answers 20 ms slower |
//! | stopped | backend-2 stopped (process gone) 250 ms in, under traffic; backend-1 fast again |
//! | not-serving | backend-2 restarted; backend-3 reports `NOT_SERVING` |
//! | recovered | every backend healthy again |
//! | all-failing | every backend fails every call with `UNAVAILABLE`, for half a phase |
//! | recovered-2 | the failures stop |
//! | batching | `Log.Produce` records through `BatchLayer` over the same stack |
//!
//! A progress bar runs per phase; then a table shows each phase as the caller saw it (req/s,
//! p50, p99, failed calls), what the layers did (retries made, retries the budget refused,
//! ejections: counted by a `metrics` recorder from the layers' own metrics, not estimated) and
//! where the traffic went. A chart of p99 latency and traffic share per backend over time (250 ms
//! buckets, phases marked) is written to `$CARGO_TARGET_DIR/tour/tour.svg` (`target/tour/tour.svg`
//! without it). With `--json [PATH]` the per-phase figures and the time series are also written
//! as JSON, to PATH or else to `tour.json` beside the chart.
//!
//! Flags: `--strategy round-robin|p2c|peak-ewma|hash` swaps the balancing strategy and nothing
//! else (`hash` keys on the calls' `tenant` header); `--phase-seconds N` (default 7, so the tour
//! takes about a minute) and `--concurrency N` (calls in flight, default 32) size the load.
//! `--discovery etcd` (default `static`) starts a single-member etcd in a temporary directory
//! (needs `etcd` and `etcdctl` on the PATH: Debian `etcd-server`, `etcd-client`), has the four
//! backends register themselves in it on 2 s leases, and balances over what it discovers there:
//! the backend the `stopped` phase stops leaves its lease to expire (it leaves the balancer about
//! 2 s later, as after a crash), and registers again when `not-serving` restarts it.

mod chart;
mod counts;
mod registry;
mod report;
mod timeline;

use chart::draw_chart;
use counts::LayerCounts;
use registry::Registry;
use report::{print_table, write_json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use timeline::Timeline;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use metrics_util::debugging::DebuggingRecorder;
use tokio::time::Instant;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Status};
use tonic_health::ServingStatus;
use tower::{Layer, ServiceBuilder, ServiceExt};
use towline::BoxError;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{
    BalanceConfig, BalanceConfigBuilder, BalanceLayer, ConsistentHash, EndpointState, PeakEwma,
    PowerOfTwoChoices, RoundRobin,
};
use towline::batch::{BatchConfig, BatchLayer, Batcher};
use towline::discover::{Discover, Static};
use towline::health::HealthCheck;
use towline::metrics::MetricsLayer;
use towline::outlier::OutlierDetection;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryBudget, RetryLayer, RetryPolicy};
use towline::testkit::pb::log_client::LogClient;
use towline::testkit::pb::{EchoRequest, ProduceRequest, ProduceResponse, echo_client::EchoClient};
use towline::testkit::{BACKEND_HEADER, Backend, Load, LoadReport};

const BACKENDS: usize = 4;
/// Echo calls carry one of this many `tenant` header values (what `--strategy hash` keys on).
const TENANTS: u64 = 64;
/// Batching-phase records carry one of this many tenants; each tenant's records batch together.
const BATCH_TENANTS: u64 = 4;
/// Records per batch at most, and the longest a record waits for its batch to fill.
const BATCH_MAX_ITEMS: usize = 100;
const BATCH_LINGER: Duration = Duration::from_millis(5);
/// Batch RPCs in flight at once; the phase keeps `BATCH_MAX_ITEMS × BATCH_IN_FLIGHT` records
/// outstanding, enough to fill every batch in flight.
const BATCH_IN_FLIGHT: usize = 8;
/// 64-byte payloads, as in the benchmarks.
const PAYLOAD: [u8; 64] = [7; 64];
/// The time series' resolution.
const BUCKET: Duration = Duration::from_millis(250);
/// Load before the first phase, not measured.
const WARM_UP: Duration = Duration::from_secs(1);
/// What the slow phase adds to backend-1's answers.
const SLOWDOWN: Duration = Duration::from_millis(20);

const USAGE: &str = "usage: cargo run --release --example tour -- \
    [--strategy round-robin|p2c|peak-ewma|hash] [--discovery static|etcd] [--phase-seconds N] \
    [--concurrency N] [--json [PATH]]";

#[derive(Debug, Clone, Copy)]
enum StrategyName {
    RoundRobin,
    PowerOfTwoChoices,
    PeakEwma,
    Hash,
}

impl StrategyName {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "round-robin" => Ok(StrategyName::RoundRobin),
            "p2c" => Ok(StrategyName::PowerOfTwoChoices),
            "peak-ewma" => Ok(StrategyName::PeakEwma),
            "hash" => Ok(StrategyName::Hash),
            other => Err(format!(
                "--strategy: unknown strategy {other:?}; use round-robin, p2c, peak-ewma or hash"
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            StrategyName::RoundRobin => "round-robin",
            StrategyName::PowerOfTwoChoices => "p2c",
            StrategyName::PeakEwma => "peak-ewma",
            StrategyName::Hash => "hash",
        }
    }

    fn apply(self, config: BalanceConfigBuilder) -> BalanceConfigBuilder {
        match self {
            StrategyName::RoundRobin => config.strategy(RoundRobin::new()),
            StrategyName::PowerOfTwoChoices => config.strategy(PowerOfTwoChoices::new()),
            StrategyName::PeakEwma => config.strategy(PeakEwma::new()),
            // Every call carries a `tenant` header; each tenant sticks to one backend.
            StrategyName::Hash => config.strategy(ConsistentHash::header(
                http::HeaderName::from_static("tenant"),
            )),
        }
    }
}

/// Where the balancer learns the backends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiscoveryName {
    /// The four addresses, fixed (`discover::Static`).
    Static,
    /// A single-member etcd the backends register in (`discover::etcd`); see `registry.rs`.
    Etcd,
}

impl DiscoveryName {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "static" => Ok(DiscoveryName::Static),
            "etcd" => Ok(DiscoveryName::Etcd),
            other => Err(format!(
                "--discovery: unknown discovery {other:?}; use static or etcd"
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            DiscoveryName::Static => "static",
            DiscoveryName::Etcd => "etcd",
        }
    }
}

struct Args {
    strategy: StrategyName,
    discovery: DiscoveryName,
    phase: Duration,
    concurrency: usize,
    /// Where to write the JSON figures, if asked to.
    json: Option<PathBuf>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        strategy: StrategyName::PeakEwma,
        discovery: DiscoveryName::Static,
        phase: Duration::from_secs(7),
        concurrency: 32,
        json: None,
    };
    let mut args = args.into_iter().peekable();
    while let Some(flag) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .filter(|v| !v.starts_with("--"))
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |flag: &str, value: String, max: u64| {
            value
                .parse::<u64>()
                .ok()
                .filter(|v| (1..=max).contains(v))
                .ok_or_else(|| {
                    format!("{flag} needs a whole number from 1 to {max}, not {value:?}")
                })
        };
        match flag.as_str() {
            "--strategy" => parsed.strategy = StrategyName::parse(&value("--strategy")?)?,
            "--discovery" => parsed.discovery = DiscoveryName::parse(&value("--discovery")?)?,
            "--phase-seconds" => {
                let seconds = number("--phase-seconds", value("--phase-seconds")?, 600)?;
                parsed.phase = Duration::from_secs(seconds);
            }
            "--concurrency" => {
                let calls = number("--concurrency", value("--concurrency")?, 10_000)?;
                parsed.concurrency = calls as usize;
            }
            "--json" => {
                // The path is optional: `--json` alone writes beside the chart.
                let path = args.next_if(|v| !v.starts_with("--"));
                parsed.json =
                    Some(path.map_or_else(|| output_dir().join("tour.json"), PathBuf::from));
            }
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(parsed)
}

/// `$CARGO_TARGET_DIR/tour`, or `target/tour` in the crate (as the benchmarks locate theirs).
fn output_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("tour")
}

/// One phase of the tour, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Steady,
    Slow,
    Stopped,
    NotServing,
    Recovered,
    AllFailing,
    RecoveredAgain,
    Batching,
}

impl Phase {
    const ALL: [Phase; 8] = [
        Phase::Steady,
        Phase::Slow,
        Phase::Stopped,
        Phase::NotServing,
        Phase::Recovered,
        Phase::AllFailing,
        Phase::RecoveredAgain,
        Phase::Batching,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Slow => "slow",
            Phase::Stopped => "stopped",
            Phase::NotServing => "not-serving",
            Phase::Recovered => "recovered",
            Phase::AllFailing => "all-failing",
            Phase::RecoveredAgain => "recovered-2",
            Phase::Batching => "batching",
        }
    }

    fn about(self) -> &'static str {
        match self {
            Phase::Steady => "four healthy backends",
            Phase::Slow => "backend-1 answers 20 ms slower",
            Phase::Stopped => "backend-2 stopped 250 ms in (process gone); backend-1 fast again",
            Phase::NotServing => "backend-2 restarted; backend-3 reports NOT_SERVING",
            Phase::Recovered => "every backend healthy again",
            Phase::AllFailing => "every backend fails every call with UNAVAILABLE",
            Phase::RecoveredAgain => "the failures stop",
            Phase::Batching => "Log.Produce records batched by BatchLayer over the same stack",
        }
    }

    /// How long the phase runs: a full phase, but "all failing" is brief (half of one).
    fn length(self, phase: Duration) -> Duration {
        match self {
            Phase::AllFailing => phase / 2,
            _ => phase,
        }
    }

    /// How long into the phase its fault lands, or `None`: before the phase's first call. A
    /// crash comes under traffic, so that calls in flight to the stopped backend fail (and are
    /// retried).
    fn fault_delay(self) -> Option<Duration> {
        match self {
            Phase::Stopped => Some(Duration::from_millis(250)),
            _ => None,
        }
    }

    /// Applies the phase's faults (or lifts the previous phase's). With etcd discovery, the
    /// stopped backend's registration is abandoned (its key expires, as after a crash) and the
    /// restarted one registers again.
    async fn enter(
        self,
        backends: &[Backend],
        registry: Option<&Registry>,
    ) -> Result<(), BoxError> {
        match self {
            Phase::Steady | Phase::Batching => {}
            Phase::Slow => backends[1].set_latency(SLOWDOWN),
            Phase::Stopped => {
                backends[1].clear_faults();
                if let Some(registry) = registry {
                    registry.crashed(2);
                }
                backends[2].stop().await;
            }
            Phase::NotServing => {
                backends[2].restart().await?;
                if let Some(registry) = registry {
                    registry.restarted(2, &backends[2]).await?;
                }
                backends[3].set_health(ServingStatus::NotServing).await;
            }
            Phase::Recovered => backends[3].set_health(ServingStatus::Serving).await,
            Phase::AllFailing => {
                for backend in backends {
                    backend.fail_fraction(1.0, Code::Unavailable);
                }
            }
            Phase::RecoveredAgain => backends.iter().for_each(Backend::clear_faults),
        }
        Ok(())
    }
}

/// What one phase looked like.
struct PhaseResult {
    phase: Phase,
    /// Seconds since the tour started.
    start: f64,
    end: f64,
    /// Echo calls, or records in the batching phase; tagged by the backend that answered.
    report: LoadReport<String>,
    counts: LayerCounts,
    /// Per backend at the phase's end: the balancer's state for it and its ejections so far.
    endpoints: Vec<(EndpointState, u32)>,
}

impl PhaseResult {
    /// The share (0–100%) of the phase's calls that `backend` answered.
    fn share(&self, backend: &str) -> f64 {
        let answered = self.report.tally().get(backend).copied().unwrap_or(0);
        100.0 * answered as f64 / self.report.calls().max(1) as f64
    }
}

/// The whole stack, outer to inner: metrics → retry → balance → pool → connector.
type Stack = towline::metrics::Metrics<towline::retry::Retry<Balanced>>;
type Balanced = towline::balance::Balance<towline::pool::Pool<tonic::transport::Channel>>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("tour: {message}");
            std::process::exit(2);
        }
    };

    // The recorder goes in before any layer is built: layers resolve their metric handles once.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .map_err(|_| "another metrics recorder is already installed")?;

    let backends = Backend::start_many(BACKENDS).await?;
    let registry = match args.discovery {
        DiscoveryName::Static => None,
        DiscoveryName::Etcd => match Registry::start(&backends).await {
            Ok(registry) => Some(registry),
            Err(err) => {
                eprintln!("tour: {err}");
                std::process::exit(1);
            }
        },
    };
    println!(
        "towline tour: {BACKENDS} backends on loopback, strategy {}, {} calls in flight, {:?} per phase",
        args.strategy.as_str(),
        args.concurrency,
        args.phase
    );
    if let Some(registry) = &registry {
        println!(
            "discovery: etcd at {}, backends registered under {} with {:?} leases",
            registry.url(),
            registry::PREFIX,
            registry::TTL
        );
    }

    let (stack, balance) = match &registry {
        None => build_stack(
            args.strategy,
            Static::new(backends.iter().map(Backend::uri)),
        )?,
        Some(registry) => build_stack(args.strategy, registry.discovery()?)?,
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        balance.wait_until(|s| {
            s.iter().filter(|e| e.state == EndpointState::Ready).count() == BACKENDS
        }),
    )
    .await
    .map_err(|_| "the backends did not become ready in 10 s")?;

    let echo = EchoClient::new(stack.clone());
    let produce = produce_batched(LogClient::new(stack))?;

    // Connections, allocator and RTT estimates warm up outside the figures.
    let warm_up = PhaseProgress::warm_up(WARM_UP);
    run_echo(
        &echo,
        args.concurrency,
        WARM_UP,
        &warm_up,
        &Timeline::discard(),
    )
    .await;
    warm_up.clear();
    // Whatever was recorded while connecting and warming up belongs to no phase.
    LayerCounts::take(&snapshotter);
    let timeline = Timeline::new(backends.iter().map(|b| b.id().to_owned()).collect());

    let mut results = Vec::new();
    for phase in Phase::ALL {
        let fault_delay = phase.fault_delay();
        if fault_delay.is_none() {
            phase.enter(&backends, registry.as_ref()).await?;
        }
        let length = phase.length(args.phase);
        let progress = PhaseProgress::start(phase, length);
        let start = timeline.now();
        let load = async {
            match phase {
                Phase::Batching => run_records(&produce, length, &progress, &timeline).await,
                _ => run_echo(&echo, args.concurrency, length, &progress, &timeline).await,
            }
        };
        let fault = async {
            match fault_delay {
                Some(delay) => {
                    tokio::time::sleep(delay).await;
                    phase.enter(&backends, registry.as_ref()).await
                }
                None => Ok(()),
            }
        };
        let (report, entered) = tokio::join!(load, fault);
        entered?;
        let end = timeline.now();
        progress.finish(phase, &report);
        results.push(PhaseResult {
            phase,
            start,
            end,
            report,
            counts: LayerCounts::take(&snapshotter),
            endpoints: endpoint_states(&balance, &backends),
        });
    }

    println!();
    print_table(&results, &backends);
    println!("\nendpoints at the end:");
    for endpoint in balance.snapshot() {
        println!(
            "  {:<24} {:<10} rtt {:>8.2?}  ejections {}",
            endpoint.uri.to_string(),
            endpoint.state.to_string(),
            endpoint.rtt_estimate,
            endpoint.ejections
        );
    }

    let buckets = timeline.buckets();
    let dir = output_dir();
    std::fs::create_dir_all(&dir)?;
    let chart = dir.join("tour.svg");
    draw_chart(
        &chart,
        &results,
        &buckets,
        &timeline.backend_ids,
        args.strategy,
    )?;
    println!("\nchart: {}", chart.display());
    if let Some(path) = &args.json {
        write_json(path, &args, &results, &buckets, &timeline.backend_ids)?;
        println!("figures: {}", path.display());
    }
    if let Some(registry) = &registry {
        registry.deregister_all().await;
    }
    Ok(())
}

/// The balancer's view of each backend, in the backends' order.
fn endpoint_states(balance: &Balanced, backends: &[Backend]) -> Vec<(EndpointState, u32)> {
    let snapshot = balance.snapshot();
    backends
        .iter()
        .map(|backend| {
            let address = backend.addr().to_string();
            snapshot
                .iter()
                .find(|e| e.uri.authority().map(|a| a.as_str()) == Some(address.as_str()))
                .map_or((EndpointState::Draining, 0), |e| (e.state, e.ejections))
        })
        .collect()
}

/// Assembles metrics → retry → health-gated balance → pool over what `discovery` names; returns
/// the stack and the balancer (for its snapshot).
fn build_stack(
    strategy: StrategyName,
    discovery: impl Discover,
) -> Result<(Stack, Balanced), BoxError> {
    let reconnect = Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(200),
        Duration::from_secs(2),
        1.6,
    )?;
    let pool = PoolConfig::builder()
        .size(2)
        // Under a balancer, a pool should give up quickly: the balancer has other endpoints.
        .wait_timeout(Duration::from_millis(500))
        .backoff(reconnect)
        .build()?;
    // gRFC A50's timings (10 s interval, 30 s base ejection) would outlast the tour's phases:
    // scaled down so that an ejection shows up, and ends, within a phase or two.
    let outliers = OutlierDetection::builder()
        .interval(Duration::from_secs(1))
        .base_ejection_time(Duration::from_secs(2))
        .max_ejection_time(Duration::from_secs(10))
        .build()?;
    let balance_config = strategy
        .apply(BalanceConfig::builder())
        .health_check(HealthCheck::watch(""))
        .outlier_detection(outliers)
        .reconnect_backoff(reconnect)
        .target("tour")
        .build()?;
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(discovery, balance_config))
        .layer(PoolLayer::new(pool.clone()))
        .service(pool.connector());
    // gRFC A6 retry throttling: a failure takes a token, a success gives 0.1 back, and at or
    // below half the tokens nobody retries. 100 tokens cover the calls in flight when one
    // backend crashes; when every backend fails, retries stop after about 50. (The default
    // percentage budget earns retries from the last 10 s of calls: after tens of thousands of
    // healthy calls it lets every failing call of a short outage make all its attempts.)
    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .budget(RetryBudget::token_bucket(100.0, 0.1)?)
        .build()?;
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("tour"))
        .layer(RetryLayer::new(retry))
        .service(balance.clone());
    Ok((stack, balance))
}

/// A progress bar for one phase, advanced by time, with a live count of calls.
struct PhaseProgress {
    bar: ProgressBar,
    calls: Arc<AtomicU64>,
    ticker: tokio::task::JoinHandle<()>,
}

impl PhaseProgress {
    fn start(phase: Phase, length: Duration) -> Self {
        Self::named(phase.name(), phase.about(), length)
    }

    fn warm_up(length: Duration) -> Self {
        Self::named(
            "warm-up",
            "connections and RTT estimates, not measured",
            length,
        )
    }

    fn named(name: &'static str, about: &'static str, length: Duration) -> Self {
        let bar = ProgressBar::new(length.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {msg}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(name);
        let calls = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (bar, calls) = (bar.clone(), calls.clone());
            let started = Instant::now();
            tokio::spawn(async move {
                loop {
                    bar.set_position(started.elapsed().as_millis() as u64);
                    bar.set_message(format!("{about} — {} calls", calls.load(Ordering::Relaxed)));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        PhaseProgress { bar, calls, ticker }
    }

    /// Counts one completed call (for `Load::on_call`).
    fn counter(&self) -> impl Fn() + Send + Sync + 'static {
        let calls = self.calls.clone();
        move || {
            calls.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn clear(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }

    fn finish(self, phase: Phase, report: &LoadReport<String>) {
        self.ticker.abort();
        self.bar
            .finish_with_message(format!("{} — {report}", phase.about()));
    }
}

/// Closed-loop Echo load through the stack for `length`; each call is tagged with the backend
/// that answered.
async fn run_echo(
    client: &EchoClient<Stack>,
    concurrency: usize,
    length: Duration,
    progress: &PhaseProgress,
    timeline: &Timeline,
) -> LoadReport<String> {
    let (client, timeline) = (client.clone(), timeline.clone());
    Load::new(concurrency)
        .calls(u64::MAX)
        .duration(length)
        .on_call(progress.counter())
        .run(move |n| {
            let (mut client, timeline) = (client.clone(), timeline.clone());
            let mut request = tonic::Request::new(EchoRequest {
                payload: PAYLOAD.to_vec(),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert("tenant", AsciiMetadataValue::from(n % TENANTS));
            async move {
                let started = Instant::now();
                let outcome = client
                    .unary(request)
                    .await
                    .map(|reply| reply.into_inner().backend);
                timeline.record(started, &outcome);
                outcome
            }
        })
        .await
}

/// The batching phase's service: one call per record, merged into `Log.Produce` RPCs per tenant.
type RecordService = towline::batch::Batch<(u64, Bytes), String>;

fn produce_batched(client: LogClient<Stack>) -> Result<RecordService, BoxError> {
    let config = BatchConfig::builder()
        .max_items(BATCH_MAX_ITEMS)
        .linger(BATCH_LINGER)
        .max_in_flight(BATCH_IN_FLIGHT)
        .build()?;
    let rpc = tower::service_fn(move |request: tonic::Request<ProduceRequest>| {
        let mut client = client.clone();
        async move { client.produce(request).await }
    });
    Ok(BatchLayer::new(TenantRecords, config).layer(rpc))
}

/// Drives records through the batching service for `length`, enough outstanding to fill every
/// batch in flight; each record is tagged with the backend that stored it.
async fn run_records(
    records: &RecordService,
    length: Duration,
    progress: &PhaseProgress,
    timeline: &Timeline,
) -> LoadReport<String> {
    let (records, timeline) = (records.clone(), timeline.clone());
    Load::new(BATCH_MAX_ITEMS * BATCH_IN_FLIGHT)
        .calls(u64::MAX)
        .duration(length)
        .on_call(progress.counter())
        .run(move |n| {
            let (records, timeline) = (records.clone(), timeline.clone());
            async move {
                let started = Instant::now();
                let record = (n % BATCH_TENANTS, Bytes::from_static(&PAYLOAD));
                let outcome = records.oneshot(record).await;
                timeline.record(started, &outcome);
                outcome
            }
        })
        .await
}

/// `(tenant, record)` items; a tenant's records share a `Produce` call, sent with the tenant's
/// `tenant` header (so that `--strategy hash` keeps a tenant on one backend). Each record's result
/// is the id of the backend that stored it.
#[derive(Debug, Clone, Copy)]
struct TenantRecords;

impl Batcher for TenantRecords {
    type Item = (u64, Bytes);
    type Key = u64;
    type Request = tonic::Request<ProduceRequest>;
    type Response = tonic::Response<ProduceResponse>;
    type Output = String;

    fn key(&mut self, (tenant, _): &Self::Item) -> u64 {
        *tenant
    }

    fn weight(&mut self, (_, record): &Self::Item) -> usize {
        record.len()
    }

    fn merge(&mut self, tenant: &u64, items: Vec<Self::Item>) -> Self::Request {
        let records = items.into_iter().map(|(_, record)| record).collect();
        let mut request = tonic::Request::new(ProduceRequest {
            key: format!("tenant-{tenant}"),
            records,
        });
        request
            .metadata_mut()
            .insert("tenant", AsciiMetadataValue::from(*tenant));
        request
    }

    fn split(
        &mut self,
        _: &u64,
        _: usize,
        response: Self::Response,
    ) -> Vec<Result<String, Status>> {
        let backend = response
            .metadata()
            .get(BACKEND_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_owned();
        let results = response.into_inner().results.into_iter();
        results
            .map(|result| match Code::from_i32(result.code) {
                Code::Ok => Ok(backend.clone()),
                code => Err(Status::new(code, result.message)),
            })
            .collect()
    }
}

fn millis(latency: Duration) -> String {
    format!("{:.2}", latency.as_secs_f64() * 1e3)
}
