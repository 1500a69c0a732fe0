//! `slow-backend` and `kill-backend`: towline's strategies side by side with tonic's
//! `Channel::balance_list`, over the same four backends in one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{
    Balance, BalanceConfig, BalanceConfigBuilder, BalanceLayer, EndpointState, PeakEwma,
    PowerOfTwoChoices, RoundRobin,
};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};
use towline::{BoxError, ConfigError};

use crate::support::{BoxScenario, Figures, Settings, micros, print_table};

const BACKENDS: usize = 4;
const CONCURRENCY: usize = 32;
const SLOW_BY: Duration = Duration::from_millis(20);

/// The bounds a gRPC client service needs to drive an `EchoClient`.
trait Stack:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<BoxError>,
        ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                          + Send
                          + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Stack for S where
    S: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<BoxError>,
            ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                              + Send
                              + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

fn quick_reconnect() -> Backoff {
    Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(100),
        Duration::from_secs(1),
        1.6,
    )
    .expect("valid")
}

fn towline(
    backends: &[Backend],
    config: BalanceConfigBuilder,
) -> Result<Balance<Channel>, ConfigError> {
    let config = config.reconnect_backoff(quick_reconnect()).build()?;
    Ok(ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config,
        ))
        .service(Connect::new()))
}

async fn ready(balance: &Balance<Channel>, n: usize) -> Result<(), BoxError> {
    let all =
        balance.wait_until(|s| s.iter().filter(|e| e.state == EndpointState::Ready).count() == n);
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .map_err(|_| "endpoints did not become ready in 10 s".into())
}

fn tonic_balance_list(backends: &[Backend]) -> Channel {
    Channel::balance_list(backends.iter().map(|b| Endpoint::from(b.uri())))
}

/// Runs `load` through `client`, tagging each call with the backend that served it.
async fn drive<S: Stack>(load: &Load, client: EchoClient<S>, slow: &str) -> (Figures, f64) {
    let report = load
        .run(move |_| {
            let mut client = client.clone();
            async move {
                let request = EchoRequest {
                    payload: vec![0; 64],
                    ..Default::default()
                };
                Ok(client.unary(request).await?.into_inner().backend)
            }
        })
        .await;
    let share =
        report.tally().get(slow).copied().unwrap_or(0) as f64 / report.calls().max(1) as f64;
    (Figures::from(&report), share)
}

pub fn slow_backend(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backends = Backend::start_many(BACKENDS).await?;
        let slow = backends[BACKENDS - 1].id().to_owned();
        backends[BACKENDS - 1].set_latency(SLOW_BY);
        let fast_only = &backends[..BACKENDS - 1];

        let rr = towline(
            &backends,
            BalanceConfig::builder().strategy(RoundRobin::new()),
        )?;
        let p2c = towline(
            &backends,
            BalanceConfig::builder().strategy(PowerOfTwoChoices::new()),
        )?;
        let ewma = towline(
            &backends,
            BalanceConfig::builder().strategy(PeakEwma::new()),
        )?;
        let baseline = towline(
            fast_only,
            BalanceConfig::builder().strategy(RoundRobin::new()),
        )?;
        for b in [&rr, &p2c, &ewma] {
            ready(b, BACKENDS).await?;
        }
        ready(&baseline, BACKENDS - 1).await?;
        let tonic = tonic_balance_list(&backends);

        let load = Load::new(CONCURRENCY)
            .calls(settings.calls)
            .duration(settings.duration);
        let warm = Load::new(CONCURRENCY).calls(500);
        let names = [
            "3 fast backends only (reference)",
            "tonic balance_list",
            "towline round robin",
            "towline p2c",
            "towline peak-EWMA",
        ];
        let mut rounds: Vec<Vec<(Figures, f64)>> = vec![Vec::new(); names.len()];
        for round in 0..=settings.rounds {
            // Round 0 warms every stack up (connections, and peak-EWMA's estimates); not counted.
            let load = if round == 0 { &warm } else { &load };
            let results = [
                drive(load, EchoClient::new(baseline.clone()), &slow).await,
                drive(load, EchoClient::new(tonic.clone()), &slow).await,
                drive(load, EchoClient::new(rr.clone()), &slow).await,
                drive(load, EchoClient::new(p2c.clone()), &slow).await,
                drive(load, EchoClient::new(ewma.clone()), &slow).await,
            ];
            if round > 0 {
                for (i, r) in results.into_iter().enumerate() {
                    rounds[i].push(r);
                }
            }
        }
        let summary: Vec<(Figures, f64)> = rounds
            .iter()
            .map(|r| {
                let figures: Vec<Figures> = r.iter().map(|(f, _)| *f).collect();
                let share = r.iter().map(|(_, s)| s).sum::<f64>() / r.len() as f64;
                (Figures::median(&figures), share)
            })
            .collect();
        let reference_p99 = summary[0].0.p99.as_secs_f64();
        let mut rows = Vec::new();
        let mut json = Vec::new();
        for (name, (f, share)) in names.iter().zip(&summary) {
            let ratio = f.p99.as_secs_f64() / reference_p99.max(1e-9);
            rows.push(vec![
                name.to_string(),
                format!("{:.0}", f.rps),
                micros(f.p50),
                micros(f.p99),
                format!("{ratio:.2}"),
                format!("{:.1} %", share * 100.0),
                f.failed.to_string(),
            ]);
            json.push(serde_json::json!({
                "variant": name,
                "figures": f.json(),
                "p99_vs_fast_only": ratio,
                "slow_backend_share": share,
            }));
        }
        print_table(
            &[
                "variant",
                "req/s",
                "p50",
                "p99",
                "p99 / fast-only",
                "to slow backend",
                "failed",
            ],
            &rows,
        );
        println!(
            "  one of {BACKENDS} backends is {SLOW_BY:?} slower; {CONCURRENCY} calls in flight"
        );
        Ok(serde_json::json!({
            "backends": BACKENDS,
            "slow_by_ms": SLOW_BY.as_millis() as u64,
            "concurrency": CONCURRENCY,
            "rounds": settings.rounds,
            "variants": json,
        }))
    })
}

/// What one kill-backend run saw, in milliseconds since the backend was stopped.
#[derive(Debug, Default)]
struct Timeline {
    start: Option<tokio::time::Instant>,
    stopped_at_ms: AtomicU64,
    restarted_at_ms: AtomicU64,
    last_failure_ms: AtomicU64,
    first_call_back_ms: AtomicU64,
}

impl Timeline {
    fn now_ms(&self) -> u64 {
        self.start.expect("set").elapsed().as_millis() as u64
    }
}

async fn kill_run<S: Stack>(
    client: EchoClient<S>,
    victim: &Backend,
    settings: Settings,
) -> Result<serde_json::Value, BoxError> {
    let timeline = Arc::new(Timeline {
        start: Some(tokio::time::Instant::now()),
        first_call_back_ms: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let victim_id = victim.id().to_owned();
    let t = timeline.clone();
    // Up for a quarter, down for a quarter, then half the run to come back: long enough for a
    // reconnect under the 100 ms..1 s backoff (+20% jitter) to show.
    let phase = settings.duration.max(Duration::from_secs(1));
    let load = Load::new(CONCURRENCY).calls(u64::MAX).duration(phase * 4);
    let run = tokio::spawn(async move {
        load.run(move |_| {
            let mut client = client.clone();
            let (t, victim_id) = (t.clone(), victim_id.clone());
            async move {
                match client.unary(EchoRequest::default()).await {
                    Ok(reply) => {
                        let backend = reply.into_inner().backend;
                        let restarted = t.restarted_at_ms.load(Ordering::Relaxed);
                        if backend == victim_id && restarted > 0 {
                            t.first_call_back_ms
                                .fetch_min(t.now_ms(), Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    Err(status) => {
                        t.last_failure_ms.fetch_max(t.now_ms(), Ordering::Relaxed);
                        Err(status)
                    }
                }
            }
        })
        .await
    });
    tokio::time::sleep(phase).await;
    victim.stop().await;
    timeline
        .stopped_at_ms
        .store(timeline.now_ms(), Ordering::Relaxed);
    tokio::time::sleep(phase).await;
    victim.restart().await?;
    timeline
        .restarted_at_ms
        .store(timeline.now_ms(), Ordering::Relaxed);
    let report = run.await?;

    let stopped = timeline.stopped_at_ms.load(Ordering::Relaxed);
    let restarted = timeline.restarted_at_ms.load(Ordering::Relaxed);
    let last_failure = timeline.last_failure_ms.load(Ordering::Relaxed);
    let back = timeline.first_call_back_ms.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "calls": report.calls(),
        "failed": report.failed(),
        // Failures stop once the balancer has routed around the dead backend.
        "routed_around_ms": (report.failed() > 0).then(|| last_failure.saturating_sub(stopped)),
        "calls_again_after_restart_ms": (back != u64::MAX).then(|| back.saturating_sub(restarted)),
        "p99_us": report.p99().as_micros() as u64,
    }))
}

pub fn kill_backend(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backends = Backend::start_many(BACKENDS).await?;
        let victim = &backends[BACKENDS - 1];
        let names = [
            "tonic balance_list",
            "towline round robin (passive only)",
            "towline peak-EWMA + health watch",
            "towline peak-EWMA + health watch + retry",
        ];
        let mut results = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let result = match i {
                0 => {
                    kill_run(
                        EchoClient::new(tonic_balance_list(&backends)),
                        victim,
                        settings,
                    )
                    .await?
                }
                1 => {
                    let b = towline(
                        &backends,
                        BalanceConfig::builder().strategy(RoundRobin::new()),
                    )?;
                    ready(&b, BACKENDS).await?;
                    kill_run(EchoClient::new(b), victim, settings).await?
                }
                _ => {
                    let config = BalanceConfig::builder()
                        .strategy(PeakEwma::new())
                        .health_check(HealthCheck::watch(""));
                    let b = towline(&backends, config)?;
                    ready(&b, BACKENDS).await?;
                    if i == 2 {
                        kill_run(EchoClient::new(b), victim, settings).await?
                    } else {
                        let retry = RetryLayer::new(RetryPolicy::builder().build()?);
                        kill_run(
                            EchoClient::new(ServiceBuilder::new().layer(retry).service(b)),
                            victim,
                            settings,
                        )
                        .await?
                    }
                }
            };
            results.push((name, result));
        }
        let ms =
            |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |ms| format!("{ms} ms"));
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|(name, r)| {
                vec![
                    name.to_string(),
                    r["calls"].to_string(),
                    r["failed"].to_string(),
                    ms(&r["routed_around_ms"]),
                    ms(&r["calls_again_after_restart_ms"]),
                    micros(Duration::from_micros(r["p99_us"].as_u64().unwrap_or(0))),
                ]
            })
            .collect();
        print_table(
            &[
                "variant",
                "calls",
                "failed",
                "last failure after stop",
                "back after restart",
                "p99",
            ],
            &rows,
        );
        println!(
            "  one of {BACKENDS} backends stopped at 1/4 of the run and restarted at 1/2; {CONCURRENCY} in flight; \
             towline reconnect backoff 100 ms x1.6 up to 1 s"
        );
        Ok(serde_json::json!({
            "backends": BACKENDS,
            "concurrency": CONCURRENCY,
            "variants": results.iter().map(|(n, r)| serde_json::json!({"variant": n, "result": r})).collect::<Vec<_>>(),
        }))
    })
}
