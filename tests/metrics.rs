//! `MetricsLayer` and `Readiness` on real backends, read back by scraping a real `/metrics`
//! endpoint served from `metrics-exporter-prometheus`.
//!
//! The `metrics` recorder is global, so this binary installs one Prometheus recorder for all of
//! its tests; every test labels its calls with its own `grpc.target` so that counts never mix.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tower::{Service, ServiceBuilder, ServiceExt};
use towline::backoff::{Backoff, Jitter};
use towline::balance::{BalanceConfig, BalanceLayer, EndpointState};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::metrics::{LATENCY_BUCKETS, MetricsLayer, SIZE_BUCKETS};
use towline::pool::{PoolConfig, PoolLayer};
use towline::readiness::{Readiness, State};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

const UNARY: &str = "towline.testkit.v1.Echo/Unary";
const STREAM: &str = "towline.testkit.v1.Echo/ServerStream";

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration".into()), LATENCY_BUCKETS)
            .unwrap()
            .set_buckets_for_metric(Matcher::Suffix("message_size".into()), SIZE_BUCKETS)
            .unwrap()
            .install_recorder()
            .expect("the only recorder this test binary installs")
    })
}

/// Serves `GET /metrics` over HTTP/1.1 on a loopback port, for as long as the test runs.
async fn serve_metrics() -> SocketAddr {
    let handle = prometheus().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/metrics" {
                    handle.render()
                } else {
                    String::new()
                };
                let status = if body.is_empty() { 404 } else { 200 };
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// `GET /metrics` over a plain TCP connection, as a scraper does.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the one sample named `name` carrying every label in `labels` (`None` if none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(rest) => {
                let (labels, value) = rest.split_once("} ").unwrap();
                (labels, value)
            }
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue, // a longer name
            },
        };
        let all = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            assert!(found.is_none(), "two samples match {name} {labels:?}");
            found = Some(value.trim().parse().unwrap());
        }
    }
    found
}

fn labels<'a>(method: &'a str, target: &'a str, status: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![("grpc_method", method), ("grpc_target", target)];
    if !status.is_empty() {
        l.push(("grpc_status", status));
    }
    l
}

fn hello() -> EchoRequest {
    EchoRequest {
        message: "hello".into(), // 7 bytes on the wire: tag, length, 5 bytes
        ..Default::default()
    }
}

#[tokio::test]
async fn scraped_counts_and_status_labels_after_mixed_calls() {
    let addr = serve_metrics().await;
    let backend = Backend::start().await.unwrap();
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("mixed"))
        .service(channel);
    let mut client = EchoClient::new(stack);

    for _ in 0..5 {
        client.unary(hello()).await.unwrap();
    }
    backend.fail_next(3, Code::Unavailable);
    for _ in 0..3 {
        let err = client.unary(hello()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
    backend.fail_next(2, Code::NotFound);
    for _ in 0..2 {
        client.unary(hello()).await.unwrap_err();
    }
    client.unary(hello()).await.unwrap();

    let text = scrape(addr).await;
    let count = |status| {
        sample(
            &text,
            "grpc_client_call_duration_count",
            &labels(UNARY, "mixed", status),
        )
    };
    assert_eq!(count("OK"), Some(6.0), "{text}");
    assert_eq!(count("UNAVAILABLE"), Some(3.0));
    assert_eq!(count("NOT_FOUND"), Some(2.0));
    assert_eq!(
        count("INTERNAL"),
        None,
        "no series for codes that never occurred"
    );
    // A66 latency buckets are rendered; every OK call took less than 100 s.
    assert_eq!(
        sample(
            &text,
            "grpc_client_call_duration_bucket",
            &[
                ("grpc_target", "mixed"),
                ("grpc_status", "OK"),
                ("le", "100")
            ]
        ),
        Some(6.0)
    );
    assert!(
        text.contains("# TYPE grpc_client_call_duration histogram"),
        "{text}"
    );
    // Call level records no attempt metrics.
    assert_eq!(
        sample(
            &text,
            "grpc_client_attempt_started",
            &[("grpc_target", "mixed")]
        ),
        None
    );
}

#[tokio::test]
async fn attempt_level_under_retry_counts_every_attempt() {
    let addr = serve_metrics().await;
    let backend = Backend::start().await.unwrap();
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();
    let policy = RetryPolicy::builder()
        .max_attempts(4)
        .initial_backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("retried"))
        .layer(RetryLayer::new(policy))
        .layer(MetricsLayer::attempts("retried"))
        .service(channel);
    let mut client = EchoClient::new(stack);

    backend.fail_next(2, Code::Unavailable);
    client.unary(hello()).await.unwrap();
    backend.fail_next(1, Code::PermissionDenied); // not retryable
    client.unary(hello()).await.unwrap_err();

    let text = scrape(addr).await;
    let m = |name: &str, status: &str| sample(&text, name, &labels(UNARY, "retried", status));
    assert_eq!(m("grpc_client_attempt_started", ""), Some(4.0), "{text}");
    assert_eq!(
        m("grpc_client_attempt_duration_count", "UNAVAILABLE"),
        Some(2.0)
    );
    assert_eq!(m("grpc_client_attempt_duration_count", "OK"), Some(1.0));
    assert_eq!(
        m("grpc_client_attempt_duration_count", "PERMISSION_DENIED"),
        Some(1.0)
    );
    assert_eq!(m("grpc_client_call_duration_count", "OK"), Some(1.0));
    assert_eq!(
        m("grpc_client_call_duration_count", "PERMISSION_DENIED"),
        Some(1.0)
    );
    assert_eq!(m("grpc_client_call_duration_count", "UNAVAILABLE"), None);

    // Message bytes, without gRPC framing: every attempt sent the same 7-byte message.
    let sent = "grpc_client_attempt_sent_total_compressed_message_size_sum";
    assert_eq!(m(sent, "UNAVAILABLE"), Some(14.0));
    assert_eq!(m(sent, "OK"), Some(7.0));
    let rcvd = "grpc_client_attempt_rcvd_total_compressed_message_size_sum";
    assert_eq!(
        m(rcvd, "UNAVAILABLE"),
        Some(0.0),
        "Trailers-Only: no message"
    );
    let ok_rcvd = m(rcvd, "OK").unwrap();
    assert!(
        ok_rcvd > 7.0,
        "an EchoResponse echoes the message and more: {ok_rcvd}"
    );
}

#[tokio::test]
async fn duration_runs_to_the_end_of_a_streaming_body() {
    let addr = serve_metrics().await;
    let backend = Backend::start().await.unwrap();
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("streaming"))
        .layer(MetricsLayer::attempts("streaming"))
        .service(channel);
    let mut client = EchoClient::new(stack);

    let started = Instant::now();
    let mut stream = client
        .server_stream(EchoRequest {
            count: 5,
            interval_ms: 10,
            ..hello()
        })
        .await
        .unwrap()
        .into_inner();
    let headers_after = started.elapsed();
    let mut messages = 0;
    while stream.message().await.unwrap().is_some() {
        messages += 1;
    }
    assert_eq!(messages, 5);

    let text = scrape(addr).await;
    for name in ["grpc_client_call_duration", "grpc_client_attempt_duration"] {
        let l = labels(STREAM, "streaming", "OK");
        assert_eq!(sample(&text, &format!("{name}_count"), &l), Some(1.0));
        let sum = sample(&text, &format!("{name}_sum"), &l).unwrap();
        assert!(sum >= 0.050, "{name} recorded {sum}s for a 50 ms stream");
        // Measured well past the headers, which came before the 50 ms of messages.
        assert!(
            sum >= headers_after.as_secs_f64() + 0.025,
            "{name} recorded {sum}s, headers came after {headers_after:?}"
        );
        assert!(sum < 5.0, "{name} recorded {sum}s");
    }
}

/// A response whose body never ends, for drop tests.
fn endless_response() -> Response<tonic::body::Body> {
    let body = http_body_util::StreamBody::new(futures::stream::pending::<
        Result<http_body::Frame<Bytes>, tonic::Status>,
    >());
    Response::builder()
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::new(body))
        .unwrap()
}

fn request(path: &str) -> Request<tonic::body::Body> {
    Request::builder()
        .uri(format!("http://example.test{path}"))
        .body(tonic::body::Body::empty())
        .unwrap()
}

#[tokio::test]
async fn drops_errors_and_bad_paths_are_recorded_with_bounded_labels() {
    let addr = serve_metrics().await;
    let inner = tower::service_fn(|req: Request<tonic::body::Body>| async move {
        match req.uri().path() {
            "/fail/refused" => Err(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )) as towline::BoxError),
            "/fail/status" => Err(Box::new(tonic::Status::aborted("no")) as towline::BoxError),
            _ => Ok(endless_response()),
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(MetricsLayer::new("edges").max_methods(3))
        .service(inner);

    // A body dropped before it ended: CANCELLED.
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(request("/a.S/m1"))
        .await
        .unwrap();
    drop(res);
    // A response future dropped before it resolved: CANCELLED too.
    let slow = tower::service_fn(|_: Request<tonic::body::Body>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, Infallible>(endless_response())
    });
    let mut slow = ServiceBuilder::new()
        .layer(MetricsLayer::new("edges").max_methods(3))
        .service(slow);
    let fut = slow.ready().await.unwrap().call(request("/a.S/m1"));
    drop(fut);
    // Errors from the inner service: their code.
    for path in ["/fail/refused", "/fail/status"] {
        svc.ready()
            .await
            .unwrap()
            .call(request(path))
            .await
            .unwrap_err();
    }
    // Paths that are not /service/method, and methods past the cap of 3: "other".
    for path in [
        "/",
        "/nonsense",
        "/a/b/c",
        "//x",
        "/a.S/m2",
        "/a.S/m3",
        "/a.S/m4",
    ] {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(request(path))
            .await
            .unwrap();
        let mut body = res.into_body();
        // Reading never ends; drop it after one poll.
        let _ = tokio::time::timeout(Duration::from_millis(1), body.frame()).await;
    }

    let text = scrape(addr).await;
    let count = |method, status| {
        sample(
            &text,
            "grpc_client_call_duration_count",
            &labels(method, "edges", status),
        )
    };
    assert_eq!(count("a.S/m1", "CANCELLED"), Some(2.0), "{text}");
    assert_eq!(count("fail/refused", "UNAVAILABLE"), Some(1.0));
    assert_eq!(count("fail/status", "ABORTED"), Some(1.0));
    // m1 and the two failures took the 3 slots (the second layer had its own: m1).
    assert_eq!(count("other", "CANCELLED"), Some(7.0));
    let methods: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("grpc_client_call_duration_count{") && l.contains("grpc_target=\"edges\"")
        })
        .filter_map(|l| l.split("grpc_method=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        methods.into_iter().collect::<Vec<_>>(),
        ["a.S/m1", "fail/refused", "fail/status", "other"]
    );
}

/// A stack whose readiness follows its backends: Balance over Pool over Connect.
#[tokio::test]
async fn readiness_follows_backends_and_drives_grpc_health() {
    let backends = Backend::start_many(2).await.unwrap();
    let quick = Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(20),
        Duration::from_millis(200),
        1.6,
    )
    .unwrap();
    let pool = PoolConfig::builder()
        .size(2)
        .backoff(quick)
        .wait_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    // Without traffic, only an active health check notices a backend that went away.
    let config = BalanceConfig::builder()
        .health_check(HealthCheck::watch(""))
        .reconnect_backoff(quick)
        .outlier_detection(None)
        .build()
        .unwrap();
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(|b| b.uri())),
            config,
        ))
        .layer(PoolLayer::new(pool))
        .service(Connect::new());
    let readiness = Readiness::new().source("orders", balance.clone());

    // grpc.health.v1 served over real HTTP/2, as an upstream-dependent server would.
    let reporter = tonic_health::server::HealthReporter::new();
    let health_addr = serve_health(reporter.clone()).await;
    let driver = tokio::spawn(readiness.drive_health(reporter, "orders.Frontend"));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "orders.Frontend".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    // Watch sends every change; skip to the one we want, within a bound.
    let mut next_status = async |want: i32| {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let msg = watch.message().await.unwrap().expect("watch stream open");
                if msg.status == want {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("health never became {want}"))
    };

    let wait = |state: State| {
        let readiness = readiness.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                let mut report = readiness.report();
                while report.state != state {
                    report = readiness.changed(&report).await;
                }
                report
            })
            .await
            .unwrap_or_else(|_| panic!("never {state}: {}", readiness.report()))
        }
    };

    let report = wait(State::Healthy).await;
    assert_eq!(report.to_string(), "healthy");
    next_status(serving).await;

    backends[0].stop().await;
    let report = wait(State::Degraded).await;
    let text = report.to_string();
    assert!(
        text.starts_with("degraded: orders: 1 of 2 endpoints ready ("),
        "{text}"
    );
    assert!(text.contains(&backends[0].addr().to_string()), "{text}");

    backends[1].stop().await;
    let report = wait(State::Unhealthy).await;
    assert!(
        report
            .to_string()
            .starts_with("unhealthy: orders: 0 of 2 endpoints ready"),
        "{report}"
    );
    next_status(not_serving).await;
    let check = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "orders.Frontend".into(),
        })
        .await
        .unwrap();
    assert_eq!(check.get_ref().status, not_serving);

    backends[0].restart().await.unwrap();
    wait(State::Degraded).await;
    next_status(serving).await;
    backends[1].restart().await.unwrap();
    wait(State::Healthy).await;
    assert!(
        balance
            .snapshot()
            .iter()
            .all(|e| e.state == EndpointState::Ready)
    );
    driver.abort();
}

/// Serves `grpc.health.v1` from `reporter` over HTTP/2 on a loopback port.
async fn serve_health(reporter: tonic_health::server::HealthReporter) -> SocketAddr {
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(service.clone()),
                    );
            tokio::spawn(conn);
        }
    });
    addr
}

/// A bare pool as a readiness source: unhealthy with no connection, healthy once one is open.
#[tokio::test]
async fn readiness_of_a_pool_follows_its_connections() {
    let backend = Backend::start().await.unwrap();
    let quick = Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(20),
        Duration::from_millis(100),
        1.6,
    )
    .unwrap();
    let config = PoolConfig::builder()
        .size(2)
        .backoff(quick)
        .wait_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let pool = ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(Connect::new())
        .oneshot(backend.uri())
        .await
        .unwrap();
    let readiness = Readiness::new()
        .source("inventory", pool.clone())
        .interval(Duration::from_millis(20));
    let wait = |state: State| {
        let readiness = readiness.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                let mut report = readiness.report();
                while report.state != state {
                    report = readiness.changed(&report).await;
                }
                report
            })
            .await
            .unwrap_or_else(|_| panic!("never {state}: {}", readiness.report()))
        }
    };
    wait(State::Healthy).await;

    backend.stop().await;
    // A pool learns of a dead connection from a call on it.
    let mut client = EchoClient::new(pool.clone());
    let unhealthy = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let _ = client.unary(hello()).await;
            let report = readiness.report();
            if report.state == State::Unhealthy {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the pool never went unhealthy");
    assert!(
        unhealthy.to_string().starts_with("unhealthy: inventory: "),
        "{unhealthy}"
    );
    assert!(
        unhealthy.to_string().contains(&backend.addr().to_string()),
        "{unhealthy}"
    );

    backend.restart().await.unwrap();
    wait(State::Healthy).await;
}
