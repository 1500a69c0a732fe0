//! The full towline stack, observed: gRFC A66 metrics served to Prometheus, and readiness probes.
//!
//! ```text
//! cargo run --example prometheus                 # 300 calls, print what a scrape shows, exit
//! cargo run --example prometheus -- --serve      # then keep serving on 127.0.0.1:9464
//! cargo run --example prometheus -- --calls 1000 --addr 127.0.0.1:9000
//! ```
//!
//! Three testkit backends (one failing 10% of calls with `UNAVAILABLE`) behind
//! `MetricsLayer` (call level) → `RetryLayer` → `MetricsLayer` (attempt level) → `BalanceLayer`
//! (with `grpc.health.v1` checks) → `PoolLayer` → `Connect`. One small HTTP/1.1 server answers:
//!
//! - `GET /metrics`: Prometheus exposition from `metrics-exporter-prometheus`, with A66 buckets;
//! - `GET /health/live`: always `200` while the process runs;
//! - `GET /health/ready`: `200` while the stack is healthy or degraded, `503` while unhealthy,
//!   with the [`Readiness`] report as the body.
//!
//! The same readiness also drives a tonic-health `HealthReporter`, as a server that depends on
//! these upstreams would, to go `NOT_SERVING` when none of them is reachable.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tower::ServiceBuilder;
use towline::BoxError;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{BalanceConfig, BalanceLayer, EndpointState};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::metrics::{LATENCY_BUCKETS, MetricsLayer, SIZE_BUCKETS};
use towline::pool::{PoolConfig, PoolLayer};
use towline::readiness::Readiness;
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

struct Args {
    calls: u64,
    serve: bool,
    addr: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        calls: 300,
        serve: false,
        addr: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--serve" => args.serve = true,
            "--calls" => {
                args.calls = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--calls needs a number")?
            }
            "--addr" => {
                args.addr = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--addr needs HOST:PORT")?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;

    // 1. The recorder, installed before any layer is built, with gRFC A66's buckets.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("message_size".into()), SIZE_BUCKETS)?
        .install_recorder()?;

    // 2. Upstreams: three backends, one of them flaky.
    let backends = Backend::start_many(3).await?;
    backends[0].fail_fraction(0.1, Code::Unavailable);

    // 3. The stack.
    let reconnect = Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(50),
        Duration::from_secs(2),
        1.6,
    )?;
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(|b| b.uri())),
            BalanceConfig::builder()
                .target("echo")
                .health_check(HealthCheck::watch(""))
                .reconnect_backoff(reconnect)
                .build()?,
        ))
        .layer(PoolLayer::new(
            PoolConfig::builder().size(2).backoff(reconnect).build()?,
        ))
        .service(Connect::new());
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("echo"))
        .layer(RetryLayer::new(
            RetryPolicy::builder().max_attempts(3).build()?,
        ))
        .layer(MetricsLayer::attempts("echo"))
        .service(balance.clone());
    let client = EchoClient::new(stack);

    // 4. Readiness from the balancer, for the probe and for grpc.health.v1.
    let readiness = Readiness::new().source("echo", balance.clone());
    let reporter = tonic_health::server::HealthReporter::new();
    tokio::spawn(readiness.drive_health(reporter, "example.Frontend"));

    let addr = match (args.addr, args.serve) {
        (Some(addr), _) => addr,
        (None, true) => SocketAddr::from(([127, 0, 0, 1], 9464)),
        (None, false) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let addr = serve(addr, prometheus.clone(), readiness.clone()).await?;
    println!("serving http://{addr}/metrics, /health/live, /health/ready");

    balance
        .wait_until(|s| s.len() == 3 && s.iter().all(|e| e.state == EndpointState::Ready))
        .await;
    println!("ready: {}", get(addr, "/health/ready").await?);

    // 5. A bounded run.
    let report = Load::new(8)
        .calls(args.calls)
        .run(move |i| {
            let mut client = client.clone();
            async move {
                let request = EchoRequest {
                    message: format!("call {i}"),
                    ..Default::default()
                };
                client.unary(request).await.map(|r| r.into_inner().backend)
            }
        })
        .await;
    println!(
        "{} calls, {} failed, p50 {:?}, p99 {:?}",
        report.calls(),
        report.failed(),
        report.p50(),
        report.p99()
    );

    // 6. What a scrape shows, A66 series only.
    let metrics = get(addr, "/metrics").await?;
    println!("\n# a scrape of /metrics (grpc_* counts and sums):");
    for line in metrics.lines().filter(|l| {
        l.starts_with("grpc_")
            && !l.contains("_bucket")
            && (l.contains("_count") || l.contains("_sum") || l.contains("started"))
    }) {
        println!("{line}");
    }

    // 7. An upstream goes away: readiness degrades, the probe still says 200.
    backends[1].stop().await;
    balance
        .wait_until(|s| s.iter().any(|e| e.state != EndpointState::Ready))
        .await;
    println!(
        "\nafter stopping {}: {}",
        backends[1].id(),
        get(addr, "/health/ready").await?
    );

    if args.serve {
        println!("serving until interrupted (Ctrl-C)");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

/// The probe and metrics server: HTTP/1.1 on `addr`.
async fn serve(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    readiness: Readiness,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (prometheus, readiness) = (prometheus.clone(), readiness.clone());
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => (StatusCode::OK, prometheus.render()),
                    "/health/live" => (StatusCode::OK, "live\n".to_owned()),
                    "/health/ready" => {
                        let report = readiness.report();
                        let status = if report.state.is_ready() {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        (status, format!("{report}\n"))
                    }
                    _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                };
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(Full::new(Bytes::from(body)));
                async move { Ok::<_, Infallible>(response.expect("a valid response")) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// A plain HTTP/1.1 GET; returns "STATUS BODY".
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).unwrap_or("?");
    Ok(format!("{status} {}", body.trim_end()))
}
