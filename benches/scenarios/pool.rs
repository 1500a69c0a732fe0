//! `pool`: one endpoint whose server allows 100 concurrent streams per connection, 500 calls in
//! flight: a single `Channel` against `PoolLayer` with 1, 4 and 8 connections, interleaved round
//! by round. Then `connect-per-call` (a fresh channel for every call, the anti-pattern users
//! start from) against a pool at the same, smaller load, reported as a ratio.
//!
//! Those runs are CPU-bound (the echo answers at once), so one connection is not the limit.
//! `stream_bound` is the case pools exist for: the same 100 streams per connection, but every
//! call takes 10 ms, so one `Channel` cannot exceed 100 / 10 ms = 10,000 calls/s however many
//! calls wait. A pool that starts with one connection (min 1, max 8) must grow to what the load
//! needs by itself. As a control, as many plain `Channel`s as the pool grew to, calls dealt
//! round robin; and, to read a shortfall, CPU per call, the time the process waited for a CPU,
//! the service time of one call alone, and how the pool spread its calls.

use std::sync::Arc;
use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use towline::connect::Connect;
use towline::pool::{PoolConfig, PoolLayer};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

use crate::cpu;
use crate::output::round2;
use crate::support::{BoxScenario, Figures, Settings, micros, note, print_table};
use crate::trivial::median;

const STREAMS: u32 = 100;
const IN_FLIGHT: usize = 500;
const POOL_SIZES: [usize; 3] = [1, 4, 8];
/// connect-per-call opens a TCP connection per call: keep it to a load loopback can take
/// without running out of ports (every closed connection sits in TIME_WAIT).
const CONNECT_PER_CALL_IN_FLIGHT: usize = 16;
const CONNECT_PER_CALL_MAX_CALLS: u64 = 2_000;
/// Service time of the stream-bound run's backend.
const STREAM_BOUND_LATENCY: Duration = Duration::from_millis(10);
/// The stream-bound run's pool: starts with one connection and grows on its own.
const STREAM_BOUND_MIN: usize = 1;
const STREAM_BOUND_MAX: usize = 8;
/// Calls made one at a time to find the service time the client sees.
const FLOOR_CALLS: u64 = 50;

fn request() -> EchoRequest {
    EchoRequest {
        payload: vec![0; 64],
        ..Default::default()
    }
}

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backend = Backend::builder()
            .max_concurrent_streams(STREAMS)
            .start()
            .await?;

        let channel = Connect::new().oneshot(backend.uri()).await?;
        let mut variants = vec![(
            "channel".to_string(),
            Client::Channel(EchoClient::new(channel)),
        )];
        for size in POOL_SIZES {
            let config = PoolConfig::builder()
                .size(size)
                .max_streams_per_connection(STREAMS as usize)
                .build()?;
            let pool = pool_to(&backend, config).await?;
            variants.push((
                format!("pool, {size} conn"),
                Client::Pool(EchoClient::new(pool)),
            ));
        }

        for (_, client) in &variants {
            warm(client, settings).await?;
        }
        let load = Load::new(IN_FLIGHT)
            .calls(settings.calls)
            .duration(settings.duration);
        let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); variants.len()];
        for _ in 0..settings.rounds {
            for (i, (_, client)) in variants.iter().enumerate() {
                rounds[i].push(drive(&load, client.clone()).await?);
            }
        }
        let figures: Vec<Figures> = rounds.iter().map(|r| Figures::median(r)).collect();
        let base = figures[0];
        let mut rows = Vec::new();
        let mut json = Vec::new();
        for ((name, _), f) in variants.iter().zip(&figures) {
            rows.push(vec![
                name.clone(),
                IN_FLIGHT.to_string(),
                format!("{:.0}", f.rps),
                micros(f.p50),
                micros(f.p99),
                format!("{:.2}", f.rps / base.rps.max(1e-9)),
            ]);
            json.push(
                serde_json::json!({ "variant": name, "in_flight": IN_FLIGHT, "figures": f.json() }),
            );
        }
        print_table(
            &[
                "variant",
                "in flight",
                "req/s",
                "p50",
                "p99",
                "req/s vs channel",
            ],
            &rows,
        );

        // connect-per-call against a pool of 4 at the same load.
        let calls = settings.calls.min(CONNECT_PER_CALL_MAX_CALLS);
        let small = Load::new(CONNECT_PER_CALL_IN_FLIGHT)
            .calls(calls)
            .duration(settings.duration);
        let pool = match &variants[2].1 {
            Client::Pool(pool) => pool.clone(),
            Client::Channel(_) | Client::Channels(_) => unreachable!("variant 2 is the pool of 4"),
        };
        let uri = backend.uri();
        let fresh = small
            .run(move |_| {
                let uri = uri.clone();
                async move {
                    let channel = Connect::new()
                        .oneshot(uri)
                        .await
                        .map_err(|e| towline::status::status_from_error(e.into()))?;
                    EchoClient::new(channel).unary(request()).await?;
                    Ok(())
                }
            })
            .await;
        let fresh = Figures::from(&fresh);
        let pooled = drive(&small, Client::Pool(pool)).await?;
        let ratio = pooled.rps / fresh.rps.max(1e-9);
        print_table(
            &["variant", "in flight", "req/s", "p50", "p99"],
            &[
                vec![
                    "connect-per-call".into(),
                    CONNECT_PER_CALL_IN_FLIGHT.to_string(),
                    format!("{:.0}", fresh.rps),
                    micros(fresh.p50),
                    micros(fresh.p99),
                ],
                vec![
                    "pool, 4 conn".into(),
                    CONNECT_PER_CALL_IN_FLIGHT.to_string(),
                    format!("{:.0}", pooled.rps),
                    micros(pooled.p50),
                    micros(pooled.p99),
                ],
                vec![
                    "ratio pool/connect-per-call".into(),
                    CONNECT_PER_CALL_IN_FLIGHT.to_string(),
                    format!("{ratio:.2}"),
                    format!(
                        "{:.2}",
                        fresh.p50.as_secs_f64() / pooled.p50.as_secs_f64().max(1e-9)
                    ),
                    format!(
                        "{:.2}",
                        fresh.p99.as_secs_f64() / pooled.p99.as_secs_f64().max(1e-9)
                    ),
                ],
            ],
        );
        if fresh.failed + pooled.failed > 0 {
            return Err(format!(
                "{} connect-per-call and {} pooled calls failed",
                fresh.failed, pooled.failed
            )
            .into());
        }
        // The stream-bound run counts the process's CPU: nothing of this one stays open.
        drop((variants, backend));
        let stream_bound = stream_bound(settings).await?;
        Ok(serde_json::json!({
            "stream_bound": stream_bound,
            "rounds": settings.rounds,
            "server_max_concurrent_streams": STREAMS,
            "runs": json,
            "connect_per_call": {
                "in_flight": CONNECT_PER_CALL_IN_FLIGHT,
                "connect_per_call": fresh.json(),
                "pool_4": pooled.json(),
                "ratio_rps_pool_over_connect_per_call": ratio,
            },
        }))
    })
}

/// One `Channel` against a growing pool (min 1, max 8) over a backend allowing 100 streams per
/// connection with 10 ms per call, 500 calls in flight, interleaved round by round.
///
/// Beside them, as a control, as many plain `Channel`s as the pool grew to, with calls dealt
/// round robin: what the same connections carry with no pool at all. A pool that falls short
/// of the ideal (`in_flight` / one call's latency alone) while matching that control is not
/// the cause; so each variant also reports the process's CPU per call and how long its threads
/// waited for a CPU (the client, the backend and the load share one process and, on a shared
/// machine, the cores), and the pool reports how its calls were spread over its connections.
async fn stream_bound(settings: Settings) -> Result<serde_json::Value, towline::BoxError> {
    let backend = Backend::builder()
        .max_concurrent_streams(STREAMS)
        .start()
        .await?;
    backend.set_latency(STREAM_BOUND_LATENCY);
    let channel = Connect::new().oneshot(backend.uri()).await?;
    let config = PoolConfig::builder()
        .min_connections(STREAM_BOUND_MIN)
        .max_connections(STREAM_BOUND_MAX)
        .max_streams_per_connection(STREAMS as usize)
        .build()?;
    let pool = pool_to(&backend, config).await?;
    let opened_with = pool.stats().open;
    let channel = Client::Channel(EchoClient::new(channel));
    // One call at a time: the service time as the client sees it (the backend's 10 ms sleep
    // ends on the runtime's next 1 ms timer tick), the floor under every call's latency.
    let alone = Load::new(1)
        .calls(FLOOR_CALLS)
        .run({
            let channel = channel.clone();
            move |i| call(channel.clone(), i)
        })
        .await;
    if alone.failed() > 0 {
        return Err(format!("calls one at a time failed: {:?}", alone.failures()).into());
    }
    let floor = alone.p50();
    let ideal_rps = IN_FLIGHT as f64 / floor.as_secs_f64();

    // One call first (so each connection has the server's SETTINGS), then a short run at full
    // load: the pool grows during it, as it would in production.
    let pooled = Client::Pool(EchoClient::new(pool.clone()));
    for client in [&channel, &pooled] {
        warm(client, settings).await?;
    }
    let grown = pool.stats().open;
    let mut plain = Vec::with_capacity(grown);
    for _ in 0..grown {
        plain.push(EchoClient::new(
            Connect::new().oneshot(backend.uri()).await?,
        ));
    }
    let plain = Client::Channels(plain.into());
    warm(&plain, settings).await?;
    let variants = [
        ("channel".to_string(), channel),
        ("pool, grows 1..8".to_string(), pooled),
        (format!("{grown} channels, round robin"), plain),
    ];

    let load = Load::new(IN_FLIGHT)
        .calls(settings.calls)
        .duration(settings.duration);
    let mut rounds: Vec<Vec<Measured>> = vec![Vec::new(); variants.len()];
    for _ in 0..settings.rounds {
        for (i, (_, client)) in variants.iter().enumerate() {
            rounds[i].push(measure(&load, client.clone()).await?);
        }
    }
    // The spread over the pool's connections, sampled in a round of its own: the sampler's
    // work (a look at the pool's stats every millisecond) is in no measured round.
    let sampler = Sampler::start(pool.clone());
    measure(&load, variants[1].1.clone()).await?;
    let spread = sampler.stop().await?;
    let stats = pool.stats();
    let [channel, pooled, plain] = [0, 1, 2].map(|i| Measured::median(&rounds[i]));
    let ratio = pooled.figures.rps / channel.figures.rps.max(1e-9);
    let pool_over_plain = pooled.figures.rps / plain.figures.rps.max(1e-9);
    let connections = [
        "1".to_string(),
        format!("{opened_with} -> {}", stats.open),
        grown.to_string(),
    ];
    let rows = variants
        .iter()
        .zip([&channel, &pooled, &plain])
        .zip(connections)
        .map(|(((name, _), m), connections)| {
            vec![
                name.clone(),
                IN_FLIGHT.to_string(),
                connections,
                format!("{:.0}", m.figures.rps),
                micros(m.figures.p50),
                micros(m.figures.p99),
                format!("{:.2}", m.figures.rps / channel.figures.rps.max(1e-9)),
                format!("{:.1} µs", m.cpu_per_call.as_secs_f64() * 1e6),
                format!("{:.2}", m.cpu_wait),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &[
            "stream-bound (10 ms/call)",
            "in flight",
            "connections",
            "req/s",
            "p50",
            "p99",
            "req/s vs channel",
            "CPU/call",
            "CPU wait s/s",
        ],
        &rows,
    );
    note(format!(
        "one call alone takes {} (10 ms sleep, 1 ms timer ticks): at most {ideal_rps:.0} req/s for {IN_FLIGHT} in flight; \
         the pool's busiest connection carried {:.1} calls on average, its idlest {:.1}, \
         over {STREAMS} in {:.1} % of {} samples",
        micros(floor),
        spread.busiest(),
        spread.idlest(),
        spread.over_limit() * 100.0,
        spread.samples,
    ));
    Ok(serde_json::json!({
        "in_flight": IN_FLIGHT,
        "server_max_concurrent_streams": STREAMS,
        "latency_ms": STREAM_BOUND_LATENCY.as_millis() as u64,
        "channel_rps": channel.figures.rps.round(),
        "best_pool_rps": pooled.figures.rps.round(),
        "best_pool_connections": stats.open,
        "ratio": round2(ratio),
        "service_floor_us": floor.as_micros() as u64,
        "ideal_pool_rps": ideal_rps.round(),
        "plain_channels": {
            "connections": grown,
            "rps": plain.figures.rps.round(),
            "pool_over_plain": round2(pool_over_plain),
        },
        "cpu_per_call_us": {
            "channel": round2(channel.cpu_per_call.as_secs_f64() * 1e6),
            "pool": round2(pooled.cpu_per_call.as_secs_f64() * 1e6),
            "plain_channels": round2(plain.cpu_per_call.as_secs_f64() * 1e6),
        },
        "cpu_wait_s_per_s": {
            "channel": round2(channel.cpu_wait),
            "pool": round2(pooled.cpu_wait),
            "plain_channels": round2(plain.cpu_wait),
        },
        "pool_spread": {
            "samples": spread.samples,
            "busiest_mean": round2(spread.busiest()),
            "idlest_mean": round2(spread.idlest()),
            "over_limit_fraction": spread.over_limit(),
        },
        "pool": { "min_connections": STREAM_BOUND_MIN, "max_connections": STREAM_BOUND_MAX,
                  "opened_with": opened_with, "connects": stats.connects },
        "channel_figures": channel.figures.json(),
        "pool_figures": pooled.figures.json(),
        "plain_channels_figures": plain.figures.json(),
    }))
}

/// A pool of `config` over tonic `Channel`s to `backend`.
async fn pool_to(
    backend: &Backend,
    config: PoolConfig,
) -> Result<towline::pool::Pool<tonic::transport::Channel>, towline::BoxError> {
    ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(Connect::new())
        .oneshot(backend.uri())
        .await
}

/// Warms every path: one call first (so each connection has the server's SETTINGS before the
/// burst), then a short run at full load.
async fn warm(client: &Client, settings: Settings) -> Result<(), towline::BoxError> {
    drive(&Load::new(1).calls(10), client.clone()).await?;
    drive(
        &Load::new(IN_FLIGHT)
            .calls(4 * IN_FLIGHT as u64)
            .duration(settings.duration),
        client.clone(),
    )
    .await?;
    Ok(())
}

/// One measured run, with what it cost the process in CPU.
#[derive(Debug, Clone, Copy)]
struct Measured {
    figures: Figures,
    cpu_per_call: Duration,
    /// Seconds the process's threads spent ready to run but without a CPU, per second of the
    /// run: near 0 on a quiet machine; near 1 when other processes take the cores half the time.
    cpu_wait: f64,
}

impl Measured {
    fn median(rounds: &[Measured]) -> Measured {
        let figures: Vec<Figures> = rounds.iter().map(|m| m.figures).collect();
        Measured {
            figures: Figures::median(&figures),
            cpu_per_call: Duration::from_secs_f64(median(
                rounds.iter().map(|m| m.cpu_per_call.as_secs_f64()),
            )),
            cpu_wait: median(rounds.iter().map(|m| m.cpu_wait)),
        }
    }
}

async fn measure(load: &Load, client: Client) -> Result<Measured, towline::BoxError> {
    let (cpu, waited, started) = (cpu::process(), cpu_wait(), std::time::Instant::now());
    let figures = drive(load, client).await?;
    let (cpu, waited) = (cpu::process() - cpu, cpu_wait() - waited);
    Ok(Measured {
        figures,
        cpu_per_call: cpu / figures.calls.max(1) as u32,
        cpu_wait: waited.as_secs_f64() / started.elapsed().as_secs_f64(),
    })
}

/// The time this process's threads have spent runnable but waiting for a CPU (Linux's
/// `/proc/self/task/*/schedstat`, second field); zero where that is not available.
fn cpu_wait() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let nanos = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// How a pool's calls were spread over its connections, from samples of its stats.
#[derive(Debug, Default, Clone, Copy)]
struct Spread {
    samples: u64,
    busiest: u64,
    idlest: u64,
    over_limit: u64,
}

impl Spread {
    fn mean(&self, total: u64) -> f64 {
        total as f64 / self.samples.max(1) as f64
    }

    /// Calls in flight on the busiest connection, on average.
    fn busiest(&self) -> f64 {
        self.mean(self.busiest)
    }

    /// Calls in flight on the idlest connection, on average.
    fn idlest(&self) -> f64 {
        self.mean(self.idlest)
    }

    /// The fraction of samples with a connection over the server's stream limit (calls that
    /// h2 queues instead of sending).
    fn over_limit(&self) -> f64 {
        self.mean(self.over_limit)
    }
}

/// Samples a pool's per-connection load every millisecond until stopped.
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Spread>,
}

impl Sampler {
    fn start(pool: towline::pool::Pool<tonic::transport::Channel>) -> Sampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut spread = Spread::default();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            // A late tick is skipped, not made up in a burst of samples of one moment.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = &mut stopped => return spread,
                    _ = tick.tick() => {}
                }
                let in_flight = pool.stats().in_flight;
                spread.samples += 1;
                spread.busiest += in_flight.iter().max().copied().unwrap_or(0) as u64;
                spread.idlest += in_flight.iter().min().copied().unwrap_or(0) as u64;
                spread.over_limit += u64::from(in_flight.iter().any(|&n| n > STREAMS as usize));
            }
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Result<Spread, towline::BoxError> {
        let _ = self.stop.send(());
        Ok(self.task.await?)
    }
}

#[derive(Clone)]
enum Client {
    Channel(EchoClient<tonic::transport::Channel>),
    Pool(EchoClient<towline::pool::Pool<tonic::transport::Channel>>),
    /// Plain channels, call `i` on channel `i % n`.
    Channels(Arc<[EchoClient<tonic::transport::Channel>]>),
}

/// Call number `i` on `client`.
async fn call(client: Client, i: u64) -> Result<(), tonic::Status> {
    match client {
        Client::Channel(mut c) => c.unary(request()).await.map(drop),
        Client::Pool(mut c) => c.unary(request()).await.map(drop),
        Client::Channels(cs) => {
            let mut c = cs[i as usize % cs.len()].clone();
            c.unary(request()).await.map(drop)
        }
    }
}

async fn drive(load: &Load, client: Client) -> Result<Figures, towline::BoxError> {
    let report = load.run(move |i| call(client.clone(), i)).await;
    let figures = Figures::from(&report);
    if figures.failed > 0 {
        return Err(format!("{} calls failed: {:?}", figures.failed, report.failures()).into());
    }
    Ok(figures)
}
