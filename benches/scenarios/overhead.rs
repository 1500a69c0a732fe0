//! `overhead`: what towline costs on a real gRPC call, against what a user would otherwise run.
//!
//! Three comparisons, each a bare variant and a towline one run under the same load, interleaved
//! `bare, towline, bare, towline, …, bare`:
//! - a bare `Channel` against that channel under a pass-through layer (forwards `poll_ready` and
//!   `call`, nothing else), at one call in flight (latency-bound) and at 64 (CPU-bound on two
//!   cores): what a tower layer's existence costs;
//! - `full_stack`: a bare `Channel` to one backend against towline's full stack over the same
//!   backend (`MetricsLayer` → `RetryLayer` → `BalanceLayer` → `PoolLayer` → `Connect`, each with
//!   its defaults), at 64 in flight;
//! - `vs_balance_list`: tonic's `Channel::balance_list` over four backends against the full stack
//!   over the same four, at 64 in flight: the peer users would otherwise pick. Also against
//!   `BalanceLayer` → `PoolLayer` → `Connect` alone (`balance_pool`), which splits the full
//!   stack's cost into what replaces `balance_list` (balancing and connections) and what comes on
//!   top of it (metrics and retry, per call).
//!
//! Figures per variant are medians over rounds. `ratio_rps` is the towline run's req/s over the
//! mean of the bare runs just before and after it, `ratio_cpu_per_call` the same for CPU time per
//! call: the process's CPU time (user + system, `getrusage`, client and in-process backends
//! together) over the run, divided by the calls it made. CPU time is far steadier than req/s on
//! a shared machine; both ratios are medians over rounds. `allocs_per_call` is the same for heap
//! allocations (the scenario binary's counting allocator), servers included: the same servers on
//! both sides, so a difference is the client's.

use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::Channel;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use towline::BoxError;
use towline::balance::{Balance, BalanceConfig, BalanceLayer};
use towline::connect::Connect;
use towline::discover::Static;
use towline::metrics::MetricsLayer;
use towline::pool::{Pool, PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

use crate::balance::{ready, tonic_balance_list};
use crate::support::{BoxScenario, Figures, Settings, Stack, micros, print_table};
use crate::trivial::median;
use crate::{alloc, cpu};

const CONCURRENCY: [usize; 2] = [1, 64];
/// In flight for the full-stack comparisons: CPU-bound on two cores.
const FULL_STACK_IN_FLIGHT: usize = 64;
const BACKENDS: usize = 4;

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backend = Backend::start().await?;
        let channel = Connect::new().oneshot(backend.uri()).await?;
        let bare = EchoClient::new(channel.clone());
        let layered = EchoClient::new(PassThroughLayer.layer(channel));

        let mut rows = Vec::new();
        let mut json = Vec::new();
        for concurrency in CONCURRENCY {
            let c = compare(settings, concurrency, &bare, &layered).await?;
            rows.extend(c.rows("channel", "pass-through layer", concurrency));
            json.push(serde_json::json!({
                "concurrency": concurrency,
                "channel": c.bare.json(),
                "pass_through_layer": c.towline.json(),
                "ratio": {
                    "rps": c.ratio_rps,
                    "p50": c.ratio(|f| f.p50.as_secs_f64()),
                    "p99": c.ratio(|f| f.p99.as_secs_f64()),
                    "cpu_per_call": c.ratio_cpu_per_call,
                },
            }));
        }

        let stack = EchoClient::new(full_stack(std::slice::from_ref(&backend)).await?);
        let full = compare(settings, FULL_STACK_IN_FLIGHT, &bare, &stack).await?;
        rows.extend(full.rows("channel", "full stack", FULL_STACK_IN_FLIGHT));
        // The CPU figures are the whole process's: the clients, connections and backend above
        // must not idle (timers, connection tasks) through the runs below.
        drop((bare, layered, stack, backend));

        let backends = Backend::start_many(BACKENDS).await?;
        let balance_list = EchoClient::new(tonic_balance_list(&backends));
        let balance = balance_pool(&backends).await?;
        let stack = EchoClient::new(over_balance(balance.clone()));
        let vs = compare(settings, FULL_STACK_IN_FLIGHT, &balance_list, &stack).await?;
        rows.extend(vs.rows(
            "tonic balance_list, 4 backends",
            "full stack, 4 backends",
            FULL_STACK_IN_FLIGHT,
        ));
        let balance = EchoClient::new(balance);
        let vs_balance = compare(settings, FULL_STACK_IN_FLIGHT, &balance_list, &balance).await?;
        rows.extend(vs_balance.rows(
            "tonic balance_list, 4 backends",
            "balance + pool, 4 backends",
            FULL_STACK_IN_FLIGHT,
        ));

        print_table(
            &[
                "variant",
                "in flight",
                "req/s",
                "p50",
                "p99",
                "CPU/call",
                "allocs/call",
            ],
            &rows,
        );
        Ok(serde_json::json!({
            "rounds": settings.rounds,
            "runs": json,
            "full_stack": {
                "in_flight": FULL_STACK_IN_FLIGHT,
                "ratio_rps": full.ratio_rps,
                "ratio_cpu_per_call": full.ratio_cpu_per_call,
                "channel": full.bare.json(),
                "full_stack": full.towline.json(),
            },
            "vs_balance_list": {
                "in_flight": FULL_STACK_IN_FLIGHT,
                "backends": BACKENDS,
                "ratio_rps": vs.ratio_rps,
                "ratio_cpu_per_call": vs.ratio_cpu_per_call,
                "balance_list": vs.bare.json(),
                "full_stack": vs.towline.json(),
                "balance_pool": {
                    "ratio_rps": vs_balance.ratio_rps,
                    "ratio_cpu_per_call": vs_balance.ratio_cpu_per_call,
                    "balance_list": vs_balance.bare.json(),
                    "balance_pool": vs_balance.towline.json(),
                },
            },
        }))
    })
}

/// towline's full stack over `backends`, each layer with its defaults, once every endpoint is
/// ready.
async fn full_stack(backends: &[Backend]) -> Result<impl Stack, BoxError> {
    Ok(over_balance(balance_pool(backends).await?))
}

/// `BalanceLayer` → `PoolLayer` → `Connect` over `backends` with their defaults: what stands
/// where `balance_list` does, once every endpoint is ready.
async fn balance_pool(backends: &[Backend]) -> Result<Balance<Pool<Channel>>, BoxError> {
    let balance = BalanceLayer::new(
        Static::new(backends.iter().map(Backend::uri)),
        BalanceConfig::default(),
    )
    .into_balance(PoolLayer::new(PoolConfig::default()).layer(Connect::new()));
    ready(&balance, backends.len()).await?;
    Ok(balance)
}

/// The per-call layers of the full stack, with their defaults, over `balance`.
fn over_balance(balance: Balance<Pool<Channel>>) -> impl Stack {
    ServiceBuilder::new()
        .layer(MetricsLayer::new("overhead"))
        .layer(RetryLayer::new(RetryPolicy::default()))
        .service(balance)
}

/// One run's figures and the process CPU time and heap allocations per call it took.
#[derive(Debug, Clone, Copy)]
struct Run {
    figures: Figures,
    cpu_per_call: Duration,
    allocs_per_call: f64,
}

impl Run {
    async fn measure<S: Stack>(load: &Load, client: &EchoClient<S>) -> Run {
        let (cpu, allocations) = (cpu::process(), alloc::allocations());
        let figures = drive(load, client.clone()).await;
        let calls = figures.calls.max(1);
        Run {
            figures,
            cpu_per_call: (cpu::process() - cpu) / calls as u32,
            allocs_per_call: (alloc::allocations() - allocations) as f64 / calls as f64,
        }
    }
}

/// A bare variant against a towline one, interleaved round by round (see the module docs).
#[derive(Debug)]
struct Comparison {
    bare: Measured,
    towline: Measured,
    ratio_rps: f64,
    ratio_cpu_per_call: f64,
}

/// A variant's medians over rounds.
#[derive(Debug, Clone, Copy)]
struct Measured {
    figures: Figures,
    cpu_per_call: Duration,
    allocs_per_call: f64,
}

impl Measured {
    fn median(runs: &[Run]) -> Measured {
        let figures: Vec<Figures> = runs.iter().map(|r| r.figures).collect();
        Measured {
            figures: Figures::median(&figures),
            cpu_per_call: Duration::from_secs_f64(median(
                runs.iter().map(|r| r.cpu_per_call.as_secs_f64()),
            )),
            allocs_per_call: median(runs.iter().map(|r| r.allocs_per_call)),
        }
    }

    fn json(&self) -> serde_json::Value {
        let mut json = self.figures.json();
        json["cpu_per_call_us"] = (self.cpu_per_call.as_nanos() as f64 / 1e3).into();
        json["allocs_per_call"] = self.allocs_per_call.into();
        json
    }
}

async fn compare<A: Stack, B: Stack>(
    settings: Settings,
    in_flight: usize,
    bare: &EchoClient<A>,
    towline: &EchoClient<B>,
) -> Result<Comparison, BoxError> {
    // Warm both paths (connections, allocator, branch predictors) before measuring.
    let warm = Load::new(in_flight).calls(500);
    drive(&warm, bare.clone()).await;
    drive(&warm, towline.clone()).await;

    let load = Load::new(in_flight)
        .calls(settings.calls)
        .duration(settings.duration);
    let mut bare_runs = vec![Run::measure(&load, bare).await];
    let mut towline_runs = Vec::new();
    let (mut ratio_rps, mut ratio_cpu) = (Vec::new(), Vec::new());
    for _ in 0..settings.rounds.max(1) {
        let run = Run::measure(&load, towline).await;
        let after = Run::measure(&load, bare).await;
        let before = bare_runs.last().expect("measured first");
        ratio_rps
            .push(run.figures.rps / ((before.figures.rps + after.figures.rps) / 2.0).max(1e-9));
        let bare_cpu = (before.cpu_per_call + after.cpu_per_call).as_secs_f64() / 2.0;
        ratio_cpu.push(run.cpu_per_call.as_secs_f64() / bare_cpu.max(1e-12));
        towline_runs.push(run);
        bare_runs.push(after);
    }
    let failed: u64 = bare_runs
        .iter()
        .chain(&towline_runs)
        .map(|r| r.figures.failed)
        .sum();
    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    Ok(Comparison {
        bare: Measured::median(&bare_runs),
        towline: Measured::median(&towline_runs),
        ratio_rps: median(ratio_rps),
        ratio_cpu_per_call: median(ratio_cpu),
    })
}

impl Comparison {
    /// The towline variant's median over the bare variant's, for a figure without its own
    /// per-round ratio (latencies).
    fn ratio(&self, figure: impl Fn(&Figures) -> f64) -> f64 {
        figure(&self.towline.figures) / figure(&self.bare.figures).max(1e-12)
    }

    fn rows(&self, bare: &str, towline: &str, in_flight: usize) -> Vec<Vec<String>> {
        let mut rows: Vec<Vec<String>> = [(bare, &self.bare), (towline, &self.towline)]
            .into_iter()
            .map(|(variant, m)| {
                vec![
                    variant.to_string(),
                    in_flight.to_string(),
                    format!("{:.0}", m.figures.rps),
                    micros(m.figures.p50),
                    micros(m.figures.p99),
                    format!("{:.1} µs", m.cpu_per_call.as_nanos() as f64 / 1e3),
                    format!("{:.1}", m.allocs_per_call),
                ]
            })
            .collect();
        rows.push(vec![
            format!("ratio {towline} / {bare}"),
            in_flight.to_string(),
            format!("{:.3}", self.ratio_rps),
            format!("{:.3}", self.ratio(|f| f.p50.as_secs_f64())),
            format!("{:.3}", self.ratio(|f| f.p99.as_secs_f64())),
            format!("{:.3}", self.ratio_cpu_per_call),
            format!(
                "{:.3}",
                self.towline.allocs_per_call / self.bare.allocs_per_call.max(1e-9)
            ),
        ]);
        rows
    }
}

pub async fn drive<S>(load: &Load, client: EchoClient<S>) -> Figures
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<towline::BoxError> + Send,
    S::Error: Into<towline::BoxError>,
{
    let report = load
        .run(move |_| {
            let mut client = client.clone();
            async move {
                client
                    .unary(EchoRequest {
                        payload: vec![0; 64],
                        ..Default::default()
                    })
                    .await?;
                Ok(())
            }
        })
        .await;
    Figures::from(&report)
}

/// Forwards everything: the cost measured is the layer's existence, nothing it does.
#[derive(Debug, Clone, Copy)]
struct PassThroughLayer;

impl<S> Layer<S> for PassThroughLayer {
    type Service = PassThrough<S>;
    fn layer(&self, inner: S) -> PassThrough<S> {
        PassThrough(inner)
    }
}

#[derive(Debug, Clone)]
struct PassThrough<S>(S);

impl<S: Service<R>, R> Service<R> for PassThrough<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.0.call(req)
    }
}
