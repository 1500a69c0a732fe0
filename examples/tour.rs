//! The towline tour: four real gRPC backends, the towline stack in front of them, and faults.
//!
//! ```text
//! cargo run --release --example tour [-- --strategy peak-ewma --phase-seconds 4 --concurrency 32]
//! ```
//!
//! The stack is what a production client would run: `RetryLayer` (gRFC A6, with a budget) over a
//! health-gated `BalanceLayer` (a `grpc.health.v1` watch per endpoint, outlier detection, the
//! strategy you pick) over a `PoolLayer` per endpoint (two HTTP/2 connections each), driven
//! through a plain tonic-generated client. Load runs through five phases — steady, one backend
//! slowed by 20 ms, one stopped, one reporting NOT_SERVING, all recovered — and a table shows
//! what each phase looked like to the caller and where the traffic went.
//! `--strategy round-robin|p2c|peak-ewma|hash` swaps the balancing strategy; nothing else changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use towline::BoxError;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{
    BalanceConfig, BalanceConfigBuilder, BalanceLayer, ConsistentHash, EndpointState, PeakEwma,
    PowerOfTwoChoices, RoundRobin,
};
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load, LoadReport};

const BACKENDS: usize = 4;

struct Args {
    strategy: String,
    phase: Duration,
    concurrency: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        strategy: "peak-ewma".into(),
        phase: Duration::from_secs(4),
        concurrency: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let positive = |name: &str, v: String| {
            v.parse::<u64>()
                .ok()
                .filter(|v| (1..=600).contains(v))
                .ok_or_else(|| format!("{name} needs a number from 1 to 600"))
        };
        match flag.as_str() {
            "--strategy" => args.strategy = value("--strategy")?,
            "--phase-seconds" => {
                args.phase =
                    Duration::from_secs(positive("--phase-seconds", value("--phase-seconds")?)?)
            }
            "--concurrency" => {
                args.concurrency = positive("--concurrency", value("--concurrency")?)? as usize
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; use --strategy round-robin|p2c|peak-ewma|hash, \
                     --phase-seconds N, --concurrency N"
                ));
            }
        }
    }
    Ok(args)
}

fn with_strategy(config: BalanceConfigBuilder, name: &str) -> Result<BalanceConfigBuilder, String> {
    Ok(match name {
        "round-robin" => config.strategy(RoundRobin::new()),
        "p2c" => config.strategy(PowerOfTwoChoices::new()),
        "peak-ewma" => config.strategy(PeakEwma::new()),
        // The tour's calls carry a `tenant` header; each tenant sticks to one backend.
        "hash" => config.strategy(ConsistentHash::header(http::HeaderName::from_static(
            "tenant",
        ))),
        other => {
            return Err(format!(
                "unknown strategy {other}: use round-robin, p2c, peak-ewma or hash"
            ));
        }
    })
}

/// One phase of the tour: what changes before it, and its name.
struct Phase {
    name: &'static str,
    about: &'static str,
}

const PHASES: [Phase; 5] = [
    Phase {
        name: "steady",
        about: "four healthy backends",
    },
    Phase {
        name: "slow",
        about: "backend-1 answers 20 ms slower",
    },
    Phase {
        name: "stopped",
        about: "backend-2 stopped (process gone); backend-1 fast again",
    },
    Phase {
        name: "not-serving",
        about: "backend-2 restarted; backend-3 reports NOT_SERVING",
    },
    Phase {
        name: "recovered",
        about: "every backend healthy again",
    },
];

async fn enter(phase: usize, backends: &[Backend]) -> Result<(), BoxError> {
    match phase {
        1 => backends[1].set_latency(Duration::from_millis(20)),
        2 => {
            backends[1].clear_faults();
            backends[2].stop().await;
        }
        3 => {
            backends[2].restart().await?;
            backends[3].set_health(ServingStatus::NotServing).await;
        }
        4 => backends[3].set_health(ServingStatus::Serving).await,
        _ => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let backends = Backend::start_many(BACKENDS).await?;
    println!(
        "towline tour: {BACKENDS} backends on loopback, strategy {}, {} in flight, {:?} per phase",
        args.strategy, args.concurrency, args.phase
    );

    let pool = PoolConfig::builder()
        .size(2)
        // Under a balancer, a pool should give up quickly: the balancer has other endpoints.
        .wait_timeout(Duration::from_millis(500))
        .backoff(Backoff::new(
            Jitter::Grpc,
            Duration::from_millis(200),
            Duration::from_secs(2),
            1.6,
        )?)
        .build()?;
    let balance = with_strategy(BalanceConfig::builder(), &args.strategy)?
        .health_check(HealthCheck::watch(""))
        .reconnect_backoff(Backoff::new(
            Jitter::Grpc,
            Duration::from_millis(200),
            Duration::from_secs(2),
            1.6,
        )?)
        .target("tour")
        .build()?;
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            balance,
        ))
        .layer(PoolLayer::new(pool.clone()))
        .service(pool.connector());
    let stack = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::builder().build()?))
        .service(balance.clone());
    tokio::time::timeout(
        Duration::from_secs(10),
        balance.wait_until(|s| {
            s.iter().filter(|e| e.state == EndpointState::Ready).count() == BACKENDS
        }),
    )
    .await
    .map_err(|_| "the backends did not become ready in 10 s")?;
    let client = EchoClient::new(stack);

    let mut reports: Vec<LoadReport<String>> = Vec::new();
    for (i, phase) in PHASES.iter().enumerate() {
        enter(i, &backends).await?;
        let bar = ProgressBar::new(args.phase.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:40}] {msg}")?.progress_chars("=> "),
        );
        bar.set_prefix(phase.name);
        bar.set_message(phase.about);
        let ticker = {
            let bar = bar.clone();
            let started = tokio::time::Instant::now();
            tokio::spawn(async move {
                loop {
                    bar.set_position(started.elapsed().as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let client = client.clone();
        let payload = Arc::new(vec![0u8; 64]);
        let report = Load::new(args.concurrency)
            .calls(u64::MAX)
            .duration(args.phase)
            .run(move |n| {
                let mut client = client.clone();
                let mut request = tonic::Request::new(EchoRequest {
                    payload: payload.to_vec(),
                    ..Default::default()
                });
                let tenant = format!("tenant-{}", n % 64);
                request
                    .metadata_mut()
                    .insert("tenant", tenant.parse().expect("ASCII"));
                async move { Ok(client.unary(request).await?.into_inner().backend) }
            })
            .await;
        ticker.abort();
        bar.finish_with_message(format!("{} — {report}", phase.about));
        reports.push(report);
    }

    println!();
    let ids: Vec<&str> = backends.iter().map(Backend::id).collect();
    print!(
        "{:<12} {:>9} {:>9} {:>9} {:>7}",
        "phase", "req/s", "p50", "p99", "failed"
    );
    for id in &ids {
        print!(" {id:>10}");
    }
    println!();
    for (phase, report) in PHASES.iter().zip(&reports) {
        print!(
            "{:<12} {:>9.0} {:>9.2?} {:>9.2?} {:>7}",
            phase.name,
            report.throughput(),
            report.p50(),
            report.p99(),
            report.failed()
        );
        let share: BTreeMap<&str, u64> = ids
            .iter()
            .map(|id| (*id, report.tally().get(*id).copied().unwrap_or(0)))
            .collect();
        for id in &ids {
            print!(
                " {:>9.1}%",
                100.0 * share[id] as f64 / report.calls().max(1) as f64
            );
        }
        println!();
    }
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
    Ok(())
}
