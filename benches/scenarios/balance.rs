//! `slow-backend` and `kill-backend`: towline's strategies side by side with tonic's
//! `Channel::balance_list`, over the same four backends in one run.

use std::time::Duration;

use http::Uri;
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

use crate::fault::{FaultReport, Phases, fault_run, json_ms, millis};
use crate::support::{BoxScenario, Figures, Settings, Stack, micros, note, print_table};

const BACKENDS: usize = 4;
const CONCURRENCY: usize = 32;
const SLOW_BY: Duration = Duration::from_millis(20);

/// Reconnect backoff 100 ms × 1.6 up to 1 s (±20%): short enough for a comeback to show
/// within a run.
pub fn quick_reconnect() -> Backoff {
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
    towline_over(backends, config, Connect::new())
}

/// A towline balancer over `backends`, connecting through `connect`, with [`quick_reconnect`].
pub fn towline_over(
    backends: &[Backend],
    config: BalanceConfigBuilder,
    connect: Connect,
) -> Result<Balance<Channel>, ConfigError> {
    let config = config.reconnect_backoff(quick_reconnect()).build()?;
    Ok(ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config,
        ))
        .service(connect))
}

/// Waits (up to 10 s) until `n` endpoints are ready.
pub async fn ready<S: Clone + Send + Sync + 'static>(
    balance: &Balance<S>,
    n: usize,
) -> Result<(), BoxError> {
    let all =
        balance.wait_until(|s| s.iter().filter(|e| e.state == EndpointState::Ready).count() == n);
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .map_err(|_| "endpoints did not become ready in 10 s".into())
}

pub fn tonic_balance_list(backends: &[Backend]) -> Channel {
    tonic_balance_list_over(backends.iter().map(Backend::uri))
}

/// tonic's `Channel::balance_list` over `uris`, each with tonic's default `Endpoint` settings.
pub fn tonic_balance_list_over(uris: impl IntoIterator<Item = Uri>) -> Channel {
    Channel::balance_list(uris.into_iter().map(Endpoint::from))
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
        note(format!(
            "one of {BACKENDS} backends is {SLOW_BY:?} slower; {CONCURRENCY} calls in flight"
        ));
        Ok(serde_json::json!({
            "backends": BACKENDS,
            "slow_by_ms": SLOW_BY.as_millis() as u64,
            "concurrency": CONCURRENCY,
            "rounds": settings.rounds,
            "variants": json,
        }))
    })
}

/// Stops `victim` after `phases.before` and restarts it `phases.during` later.
async fn kill_run<S: Stack>(
    client: EchoClient<S>,
    victim: &Backend,
    phases: Phases,
) -> Result<FaultReport, BoxError> {
    let stop = async {
        victim.stop().await;
        Ok(())
    };
    let restart = async { Ok(victim.restart().await?) };
    fault_run(
        client,
        CONCURRENCY,
        victim.id(),
        phases,
        None,
        stop,
        restart,
    )
    .await
}

pub fn kill_backend(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backends = Backend::start_many(BACKENDS).await?;
        let victim = &backends[BACKENDS - 1];
        // Up for a quarter, down for a quarter, then half the run to come back: long enough for a
        // reconnect under the 100 ms..1 s backoff (+20% jitter) to show.
        let phase = settings.duration.max(Duration::from_secs(1));
        let phases = Phases {
            before: phase,
            during: phase,
            after: phase * 2,
        };
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
                        phases,
                    )
                    .await?
                }
                1 => {
                    let b = towline(
                        &backends,
                        BalanceConfig::builder().strategy(RoundRobin::new()),
                    )?;
                    ready(&b, BACKENDS).await?;
                    kill_run(EchoClient::new(b), victim, phases).await?
                }
                _ => {
                    let config = BalanceConfig::builder()
                        .strategy(PeakEwma::new())
                        .health_check(HealthCheck::watch(""));
                    let b = towline(&backends, config)?;
                    ready(&b, BACKENDS).await?;
                    if i == 2 {
                        kill_run(EchoClient::new(b), victim, phases).await?
                    } else {
                        let retry = RetryLayer::new(RetryPolicy::builder().build()?);
                        let client = EchoClient::new(ServiceBuilder::new().layer(retry).service(b));
                        kill_run(client, victim, phases).await?
                    }
                }
            };
            results.push((name, result));
        }
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|(name, r)| {
                vec![
                    name.to_string(),
                    r.calls.to_string(),
                    r.failed.to_string(),
                    millis(r.last_failure_after_fault),
                    millis(r.back_after_repair),
                    micros(r.p99),
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
        note(format!(
            "one of {BACKENDS} backends stopped at 1/4 of the run and restarted at 1/2; {CONCURRENCY} in flight; \
             towline reconnect backoff 100 ms x1.6 up to 1 s"
        ));
        let variants: Vec<_> = results
            .iter()
            .map(|(name, r)| {
                serde_json::json!({
                    "variant": name,
                    "result": {
                        "calls": r.calls,
                        "failed": r.failed,
                        // Failures stop once the balancer has routed around the dead backend.
                        "routed_around_ms": json_ms(r.last_failure_after_fault),
                        "calls_again_after_restart_ms": json_ms(r.back_after_repair),
                        "p99_us": r.p99.as_micros() as u64,
                    },
                })
            })
            .collect();
        Ok(serde_json::json!({
            "backends": BACKENDS,
            "concurrency": CONCURRENCY,
            "variants": variants,
        }))
    })
}
