//! ns and heap allocations per call of each towline layer alone, and of the full stack, over a
//! trivial inner service: what a layer itself costs, with no network to hide it.
//!
//! ```sh
//! cargo bench --bench layers              # 15 rounds of 100,000 calls per variant (~1 min)
//! cargo bench --bench layers -- --quick   # 7 rounds of 20,000 calls (a few seconds; CI)
//! cargo bench --bench layers -- --only retry,balance-ewma   # those variants (and bare) only
//! ```
//!
//! `--only` writes its figures like any run, with `figures.only` naming the variants (null in a
//! run of all of them): it is for working on one layer (with `--quick`, or
//! under `valgrind --tool=callgrind`, whose instruction counts do not care what else the machine
//! is doing), not for the JSON a full run leaves.
//!
//! A harness of its own (`harness = false`) rather than criterion: the figures wanted are the
//! *difference* between each layer and the bare service measured side by side, and allocations
//! per call, written as one JSON document. Criterion measures one function at a time, in
//! sequence, and knows nothing of allocations.
//!
//! # What one call is
//! What a tonic client does per unary call, minus the codec, through a trivial service that
//! answers Trailers-Only `grpc-status: 0` at once (`benches/scenarios/trivial.rs` says exactly
//! what), on a current-thread Tokio runtime.
//!
//! # The variants
//! - `metrics`: `MetricsLayer::new` with no `metrics` recorder installed.
//! - `retry`: `RetryLayer` with `RetryPolicy::default()` (3 attempts, `UNAVAILABLE` retryable,
//!   the default budget); every first attempt succeeds.
//! - `balance-rr`, `balance-ewma`: `Balance` with `RoundRobin` / `PeakEwma` over 1 endpoint, and
//!   `balance-rr-100`, `balance-ewma-100` over 100 (default config otherwise: outlier detection
//!   on). Endpoints are trivial services made by a trivial `MakeEndpoint`, all ready before the
//!   measurement starts.
//! - `pool`: a `Pool` from `PoolLayer` (default config) over trivial connections.
//! - `full-stack`: `MetricsLayer` → `RetryLayer` → `BalanceLayer` (default config: peak-EWMA,
//!   1 endpoint) → `PoolLayer` → trivial connector, each with its defaults.
//!
//! # The figures
//! Each round measures `bare, metrics, bare, retry, bare, …, full-stack, bare`: a batch of calls
//! per variant, timed as a whole. Per variant and round, `added` is its ns per call minus the
//! mean of the bare batches just before and after it. Figures are medians over rounds:
//! - `ns_per_call`: the variant's time per call, in CPU time of the (only) thread running it
//!   (`CLOCK_THREAD_CPUTIME_ID`): every call is ready at once, so it differs from wall-clock
//!   time only by the time other processes hold the core, most of the noise on a shared
//!   machine;
//! - `added_ns`: what it adds over the bare service (the layer's own cost);
//! - `allocs_per_call`: heap allocations (and reallocations) per call it adds over the bare
//!   service (which makes its own, for the request and response heads and the boxed bodies:
//!   `figures.bare.allocs_per_call`), counted by a counting global allocator.
//!
//! Written to `target/scenarios/layers.json` as `figures.layers[] = {layer, ns_per_call,
//! added_ns, allocs_per_call}`, with `figures.bare` and the goals. Goals (issue 16): each layer
//! adds ≤ 150 ns and 0 allocations; the retry layer at most 3 allocations.

// The scenario harness's helpers; this bench uses only some of each.
#[path = "scenarios/alloc.rs"]
#[allow(dead_code, reason = "shared with the scenario harness")]
mod alloc;
#[path = "scenarios/cpu.rs"]
#[allow(dead_code, reason = "shared with the scenario harness")]
mod cpu;
#[path = "scenarios/output.rs"]
mod output;
#[path = "scenarios/trivial.rs"]
mod trivial;

use std::process::ExitCode;
use std::time::Duration;

use http::{Request, Response};
use tokio::runtime::Runtime;
use tonic::body::Body;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use towline::BoxError;
use towline::balance::{
    Balance, BalanceConfig, BalanceLayer, EndpointState, PeakEwma, RoundRobin, Strategy,
};
use towline::discover::Static;
use towline::metrics::MetricsLayer;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};

use trivial::{Connector, Immediate, Sample, endpoint_uri, median};

#[global_allocator]
static ALLOCATOR: alloc::Counting<std::alloc::System> = alloc::Counting(std::alloc::System);

/// Goals from issue 16, printed and written next to the figures.
const GOAL_ADDED_NS: f64 = 150.0;
const GOAL_ALLOCS: f64 = 0.0;
const GOAL_RETRY_ALLOCS: f64 = 3.0;

#[derive(Debug, Clone, Copy)]
struct Settings {
    rounds: usize,
    calls: u64,
    warmup_calls: u64,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Settings {
                rounds: 7,
                calls: 20_000,
                warmup_calls: 5_000,
            }
        } else {
            Settings {
                rounds: 15,
                calls: 100_000,
                warmup_calls: 20_000,
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|names| names.split(',').map(str::to_owned).collect());
    match run(Settings::new(quick), quick, only.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("layers: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: Settings, quick: bool, only: Option<&[String]>) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut bare = Variant::new("bare", &runtime, Immediate);
    let mut variants = vec![
        Variant::new(
            "metrics",
            &runtime,
            MetricsLayer::new("bench").layer(Immediate),
        ),
        Variant::new(
            "retry",
            &runtime,
            RetryLayer::new(RetryPolicy::default()).layer(Immediate),
        ),
        Variant::new(
            "balance-rr",
            &runtime,
            balance(&runtime, 1, RoundRobin::new())?,
        ),
        Variant::new(
            "balance-rr-100",
            &runtime,
            balance(&runtime, 100, RoundRobin::new())?,
        ),
        Variant::new(
            "balance-ewma",
            &runtime,
            balance(&runtime, 1, PeakEwma::new())?,
        ),
        Variant::new(
            "balance-ewma-100",
            &runtime,
            balance(&runtime, 100, PeakEwma::new())?,
        ),
        Variant::new(
            "pool",
            &runtime,
            runtime.block_on(
                PoolLayer::new(PoolConfig::default())
                    .layer(Connector)
                    .oneshot(endpoint_uri(0)),
            )?,
        ),
        Variant::new("full-stack", &runtime, full_stack(&runtime)?),
    ];
    if let Some(only) = only {
        if let Some(unknown) = only
            .iter()
            .find(|name| !variants.iter().any(|v| v.name == **name))
        {
            return Err(format!("--only: no variant named {unknown:?}").into());
        }
        variants.retain(|variant| only.iter().any(|name| name == variant.name));
    }

    // Warm every path (allocator caches, branch predictors, the balancers' first picks).
    bare.measure(settings.warmup_calls)?;
    for variant in &mut variants {
        variant.measure(settings.warmup_calls)?;
    }

    let mut bare_samples = Vec::new();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    let mut added_ns: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..settings.rounds {
        let mut before = bare.measure(settings.calls)?;
        bare_samples.push(before);
        for (i, variant) in variants.iter_mut().enumerate() {
            let sample = variant.measure(settings.calls)?;
            let after = bare.measure(settings.calls)?;
            bare_samples.push(after);
            added_ns[i]
                .push(sample.ns_per_call() - (before.ns_per_call() + after.ns_per_call()) / 2.0);
            samples[i].push(sample);
            before = after;
        }
    }

    let bare_ns = median(bare_samples.iter().map(Sample::ns_per_call));
    let bare_allocs = median(bare_samples.iter().map(Sample::allocs_per_call));
    let mut rows = vec![vec![
        "bare".to_string(),
        format!("{bare_ns:.0}"),
        "-".into(),
        format!("{bare_allocs:.2} (own)"),
        "-".into(),
    ]];
    let mut layers = Vec::new();
    for (i, variant) in variants.iter().enumerate() {
        let ns = median(samples[i].iter().map(Sample::ns_per_call));
        let added = median(added_ns[i].iter().copied());
        let allocs = median(samples[i].iter().map(Sample::allocs_per_call)) - bare_allocs;
        let goal_allocs = if variant.name == "retry" {
            GOAL_RETRY_ALLOCS
        } else {
            GOAL_ALLOCS
        };
        let met = if variant.name == "full-stack" {
            "-"
        } else if added <= GOAL_ADDED_NS && allocs <= goal_allocs + 0.005 {
            "yes"
        } else {
            "no"
        };
        rows.push(vec![
            variant.name.to_string(),
            format!("{ns:.0}"),
            format!("{added:+.0}"),
            format!("{allocs:+.2}"),
            met.into(),
        ]);
        layers.push(serde_json::json!({
            "layer": variant.name,
            "ns_per_call": round1(ns),
            "added_ns": round1(added),
            "allocs_per_call": output::round2(allocs),
        }));
    }

    println!(
        "\n== layers: each towline layer over a trivial service, {} rounds of {} calls{}",
        settings.rounds,
        settings.calls,
        if quick { " (quick)" } else { "" }
    );
    let headers = ["layer", "ns/call", "added ns", "allocs/call", "goal met"];
    for line in towline::testkit::text_table(&headers, &rows).lines() {
        println!("  {line}");
    }
    println!(
        "  medians over rounds; added = over the bare service measured just before and after; \
         allocs/call = added allocations (bare: its own). Goals: ≤ {GOAL_ADDED_NS} ns and \
         {GOAL_ALLOCS} allocations per layer, retry ≤ {GOAL_RETRY_ALLOCS}."
    );

    let figures = serde_json::json!({
        // The variants asked for with `--only` (null: all of them), so that a partial run's
        // JSON does not pass for a full one.
        "only": only,
        "rounds": settings.rounds,
        "calls_per_batch": settings.calls,
        "bare": {
            "ns_per_call": round1(bare_ns),
            "allocs_per_call": output::round2(bare_allocs),
        },
        "layers": layers,
        "goals": {
            "added_ns": GOAL_ADDED_NS,
            "allocs_per_call": GOAL_ALLOCS,
            "retry_allocs_per_call": GOAL_RETRY_ALLOCS,
        },
    });
    let path = output::write_json("layers", quick, figures, None)?;
    println!("wrote {}", path.display());
    Ok(())
}

type Batch<'a> = Box<dyn FnMut(u64) -> Result<Sample, BoxError> + 'a>;

/// A named service under measurement; `measure` runs a batch of calls through it.
struct Variant<'a> {
    name: &'static str,
    batch: Batch<'a>,
}

impl<'a> Variant<'a> {
    fn new<S, B>(name: &'static str, runtime: &'a Runtime, mut service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<B>> + 'a,
        S::Error: Into<BoxError>,
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let batch = Box::new(move |calls| {
            runtime.block_on(trivial::batch(&mut service, calls, trivial::request))
        });
        Variant { name, batch }
    }

    fn measure(&mut self, calls: u64) -> Result<Sample, BoxError> {
        (self.batch)(calls)
    }
}

/// A balancer over `endpoints` trivial endpoints, once every one is ready.
fn balance(
    runtime: &Runtime,
    endpoints: usize,
    strategy: impl Strategy,
) -> Result<Balance<Immediate>, BoxError> {
    let config = BalanceConfig::builder().strategy(strategy);
    runtime.block_on(async {
        let balance = Balance::new(
            Static::new((0..endpoints).map(endpoint_uri)),
            Connector,
            config.build()?,
        );
        all_ready(&balance, endpoints).await?;
        Ok(balance)
    })
}

/// Waits (at most 10 s) until `balance` has `endpoints` ready endpoints.
async fn all_ready<S: Clone + Send + Sync + 'static>(
    balance: &Balance<S>,
    endpoints: usize,
) -> Result<(), BoxError> {
    let ready = balance.wait_until(|snapshot| {
        snapshot.len() == endpoints && snapshot.iter().all(|e| e.state == EndpointState::Ready)
    });
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .map_err(|_| format!("{endpoints} trivial endpoints were not all ready within 10 s"))?;
    Ok(())
}

/// Metrics → retry → balance → pool → trivial connector, each with its defaults.
fn full_stack(
    runtime: &Runtime,
) -> Result<
    impl Service<
        Request<Body>,
        Response = Response<impl http_body::Body<Error: Into<BoxError>>>,
        Error: Into<BoxError>,
    >,
    BoxError,
> {
    runtime.block_on(async {
        let balance = BalanceLayer::new(Static::new([endpoint_uri(0)]), BalanceConfig::default())
            .into_balance(PoolLayer::new(PoolConfig::default()).layer(Connector));
        all_ready(&balance, 1).await?;
        Ok(ServiceBuilder::new()
            .layer(MetricsLayer::new("bench"))
            .layer(RetryLayer::new(RetryPolicy::default()))
            .service(balance))
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
