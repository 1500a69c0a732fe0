//! `pool`: one endpoint whose server allows 100 concurrent streams per connection, 500 calls in
//! flight: a single `Channel` against `PoolLayer` with 1, 4 and 8 connections, interleaved round
//! by round. Then `connect-per-call` (a fresh channel for every call, the anti-pattern users
//! start from) against a pool at the same, smaller load, reported as a ratio.

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
        Ok(serde_json::json!({
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
