//! `pool`: one endpoint whose server allows 100 concurrent streams per connection, 500 calls in
//! flight: a single `Channel` against `PoolLayer` with 1, 4 and 8 connections, interleaved round
//! by round. Then `connect-per-call` (a fresh channel for every call, the anti-pattern users
//! start from) against a pool at the same, smaller load, reported as a ratio.
//!
//! Those runs are CPU-bound (the echo answers at once), so one connection is not the limit.
//! `stream_bound` is the case pools exist for: the same 100 streams per connection, but every
//! call takes 10 ms, so one `Channel` cannot exceed 100 / 10 ms = 10,000 calls/s however many
//! calls wait. A pool that starts with one connection (min 1, max 8) must grow to what the load
//! needs by itself.

use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use towline::connect::Connect;
use towline::pool::{PoolConfig, PoolLayer};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

use crate::support::{BoxScenario, Figures, Settings, micros, print_table};

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
            let pool = ServiceBuilder::new()
                .layer(PoolLayer::new(config))
                .service(Connect::new())
                .oneshot(backend.uri())
                .await?;
            variants.push((
                format!("pool, {size} conn"),
                Client::Pool(EchoClient::new(pool)),
            ));
        }

        // Warm every path: one call first (so each connection has the server's SETTINGS before
        // the burst), then a short run at full load.
        for (_, client) in &variants {
            drive(&Load::new(1).calls(50), client.clone()).await?;
            drive(&Load::new(IN_FLIGHT).calls(2_000), client.clone()).await?;
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
            Client::Channel(_) => unreachable!("variant 2 is the pool of 4"),
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
    let pool = ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(Connect::new())
        .oneshot(backend.uri())
        .await?;
    let opened_with = pool.stats().open;
    let variants = [
        ("channel", Client::Channel(EchoClient::new(channel))),
        (
            "pool, grows 1..8",
            Client::Pool(EchoClient::new(pool.clone())),
        ),
    ];
    // One call first (so each connection has the server's SETTINGS), then a short run at full
    // load: the pool grows during it, as it would in production.
    for (_, client) in &variants {
        drive(&Load::new(1).calls(10), client.clone()).await?;
        drive(
            &Load::new(IN_FLIGHT)
                .calls(4 * IN_FLIGHT as u64)
                .duration(settings.duration),
            client.clone(),
        )
        .await?;
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
    let stats = pool.stats();
    let channel = Figures::median(&rounds[0]);
    let pooled = Figures::median(&rounds[1]);
    let ratio = pooled.rps / channel.rps.max(1e-9);
    print_table(
        &[
            "stream-bound (10 ms/call)",
            "in flight",
            "connections",
            "req/s",
            "p50",
            "p99",
            "req/s vs channel",
        ],
        &[
            vec![
                variants[0].0.into(),
                IN_FLIGHT.to_string(),
                "1".into(),
                format!("{:.0}", channel.rps),
                micros(channel.p50),
                micros(channel.p99),
                "1.00".into(),
            ],
            vec![
                variants[1].0.into(),
                IN_FLIGHT.to_string(),
                format!("{opened_with} -> {}", stats.open),
                format!("{:.0}", pooled.rps),
                micros(pooled.p50),
                micros(pooled.p99),
                format!("{ratio:.2}"),
            ],
        ],
    );
    Ok(serde_json::json!({
        "in_flight": IN_FLIGHT,
        "server_max_concurrent_streams": STREAMS,
        "latency_ms": STREAM_BOUND_LATENCY.as_millis() as u64,
        "channel_rps": channel.rps.round(),
        "best_pool_rps": pooled.rps.round(),
        "best_pool_connections": stats.open,
        "ratio": (ratio * 100.0).round() / 100.0,
        "pool": { "min_connections": STREAM_BOUND_MIN, "max_connections": STREAM_BOUND_MAX,
                  "opened_with": opened_with, "connects": stats.connects },
        "channel_figures": channel.json(),
        "pool_figures": pooled.json(),
    }))
}

#[derive(Clone)]
enum Client {
    Channel(EchoClient<tonic::transport::Channel>),
    Pool(EchoClient<towline::pool::Pool<tonic::transport::Channel>>),
}

async fn drive(load: &Load, client: Client) -> Result<Figures, towline::BoxError> {
    let report = load
        .run(move |_| {
            let client = client.clone();
            async move {
                match client {
                    Client::Channel(mut c) => c.unary(request()).await.map(drop),
                    Client::Pool(mut c) => c.unary(request()).await.map(drop),
                }
            }
        })
        .await;
    let figures = Figures::from(&report);
    if figures.failed > 0 {
        return Err(format!("{} calls failed: {:?}", figures.failed, report.failures()).into());
    }
    Ok(figures)
}
