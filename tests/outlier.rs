//! Outlier ejection in the balancer: exact ejection times with `tokio::time::pause` over an
//! in-memory endpoint service, and the same behaviour end to end over real backends.

use std::collections::BTreeMap;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use tokio::time::{Instant, timeout};
use tonic::body::Body;
use tower::{Service, ServiceBuilder, ServiceExt};
use towline::BoxError;
use towline::balance::{
    Balance, BalanceConfig, BalanceLayer, EndpointSnapshot, EndpointState, RoundRobin,
};
use towline::connect::Connect;
use towline::discover::Static;
use towline::outlier::{FailurePercentageEjection, OutlierDetection, SuccessRateEjection};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

/// An endpoint that answers at once, Trailers-Only: `UNAVAILABLE` if its host starts with "bad".
#[derive(Clone)]
struct Answer {
    failing: bool,
}

impl Service<Request<Body>> for Answer {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let response = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", if self.failing { "14" } else { "0" })
            .body(Body::empty())
            .expect("a valid response");
        std::future::ready(Ok(response))
    }
}

fn in_memory(hosts: &[&str], detection: OutlierDetection) -> Balance<Answer> {
    let uris: Vec<Uri> = hosts
        .iter()
        .map(|h| format!("http://{h}:1").parse().unwrap())
        .collect();
    let make = tower::service_fn(|uri: Uri| async move {
        Ok::<_, BoxError>(Answer {
            failing: uri.host().unwrap_or_default().starts_with("bad"),
        })
    });
    let config = BalanceConfig::builder()
        .strategy(RoundRobin::new())
        .outlier_detection(detection)
        .build()
        .unwrap();
    ServiceBuilder::new()
        .layer(BalanceLayer::new(Static::new(uris), config))
        .service(make)
}

async fn send(balance: &Balance<Answer>, n: usize) -> BTreeMap<String, usize> {
    let mut by_host = BTreeMap::new();
    for _ in 0..n {
        let request = Request::post("/towline.testkit.v1.Echo/Unary")
            .body(Body::empty())
            .unwrap();
        let response = balance.clone().oneshot(request).await.unwrap();
        let status = response.headers()["grpc-status"]
            .to_str()
            .unwrap()
            .to_owned();
        *by_host.entry(status).or_default() += 1;
    }
    by_host
}

fn state(snapshot: &[EndpointSnapshot], host: &str) -> EndpointState {
    snapshot
        .iter()
        .find(|e| e.uri.host() == Some(host))
        .unwrap()
        .state
}

/// Waits for a condition; on the paused clock a condition that never comes fails the test after an
/// hour of virtual time rather than spinning through outlier intervals forever.
async fn until(balance: &Balance<Answer>, done: impl FnMut(&[EndpointSnapshot]) -> bool) {
    timeout(Duration::from_secs(3600), balance.wait_until(done))
        .await
        .unwrap_or_else(|_| panic!("condition never met: {:#?}", balance.snapshot()));
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_for_base_time_times_multiplier() {
    let detection = OutlierDetection::builder()
        .consecutive_failures(Some(3))
        .success_rate(None)
        .failure_percentage(None)
        .base_ejection_time(Duration::from_secs(30))
        .max_ejection_percent(50)
        .interval(Duration::from_secs(1000))
        .build()
        .unwrap();
    let b = in_memory(&["good1", "good2", "bad"], detection);
    until(&b, |s| s.iter().all(|e| e.state == EndpointState::Ready)).await;

    // Round robin over three: the bad one fails every third call; its third failure ejects it.
    let outcomes = send(&b, 9).await;
    assert_eq!(outcomes["14"], 3, "{outcomes:?}");
    until(&b, |s| state(s, "bad") == EndpointState::Ejected).await;
    let ejected_at = Instant::now();
    assert_eq!(
        send(&b, 30).await.get("14"),
        None,
        "no call reaches an ejected endpoint"
    );

    until(&b, |s| state(s, "bad") == EndpointState::Ready).await;
    assert_eq!(ejected_at.elapsed(), Duration::from_secs(30));

    // Ejected again: the multiplier doubles the time.
    send(&b, 9).await;
    until(&b, |s| state(s, "bad") == EndpointState::Ejected).await;
    let ejected_at = Instant::now();
    until(&b, |s| state(s, "bad") == EndpointState::Ready).await;
    assert_eq!(ejected_at.elapsed(), Duration::from_secs(60));
    assert_eq!(b.snapshot().iter().map(|e| e.ejections).sum::<u32>(), 2);
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejection_runs_each_interval() {
    let detection = OutlierDetection::builder()
        .consecutive_failures(None)
        .failure_percentage(None)
        .success_rate(Some(SuccessRateEjection::default()))
        .interval(Duration::from_secs(10))
        .base_ejection_time(Duration::from_secs(30))
        .build()
        .unwrap();
    let b = in_memory(&["a", "b", "c", "d", "bad"], detection);
    until(&b, |s| s.iter().all(|e| e.state == EndpointState::Ready)).await;
    let start = Instant::now();
    // 120 calls each: above request_volume (100) for all five, so the interval judges them.
    send(&b, 600).await;
    until(&b, |s| state(s, "bad") == EndpointState::Ejected).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(10),
        "ejected at the first interval"
    );
    let snapshot = b.snapshot();
    assert_eq!(
        snapshot
            .iter()
            .filter(|e| e.state == EndpointState::Ejected)
            .count(),
        1
    );
    until(&b, |s| state(s, "bad") == EndpointState::Ready).await;
    assert_eq!(start.elapsed(), Duration::from_secs(40));
}

#[tokio::test(start_paused = true)]
async fn failure_percentage_needs_enough_hosts() {
    let detection = OutlierDetection::builder()
        .consecutive_failures(None)
        .success_rate(None)
        .failure_percentage(Some(FailurePercentageEjection::default()))
        .interval(Duration::from_secs(10))
        .build()
        .unwrap();
    // Four hosts: below minimum_hosts (5), so a host failing every call is never judged.
    let b = in_memory(&["a", "b", "c", "bad"], detection);
    until(&b, |s| s.iter().all(|e| e.state == EndpointState::Ready)).await;
    send(&b, 400).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(state(&b.snapshot(), "bad"), EndpointState::Ready);
}

#[tokio::test]
async fn a_failing_real_backend_is_ejected_and_tried_again_later() {
    let backends = Backend::start_many(3).await.unwrap();
    backends[0].fail_fraction(1.0, tonic::Code::Unavailable);
    let detection = OutlierDetection::builder()
        .consecutive_failures(Some(3))
        .base_ejection_time(Duration::from_millis(200))
        .max_ejection_percent(50)
        .build()
        .unwrap();
    let config = BalanceConfig::builder()
        .strategy(RoundRobin::new())
        .outlier_detection(detection)
        .build()
        .unwrap();
    let b: Balance<tonic::transport::Channel> = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config,
        ))
        .service(Connect::new());
    let wait = |what: &'static str, done: fn(&[EndpointSnapshot]) -> bool| {
        let b = b.clone();
        async move {
            timeout(Duration::from_secs(10), b.wait_until(done))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:#?}", b.snapshot()))
        }
    };
    wait("all ready", |s| {
        s.iter().all(|e| e.state == EndpointState::Ready)
    })
    .await;
    let mut client = EchoClient::new(b.clone());
    let mut failed = 0;
    for _ in 0..9 {
        failed += usize::from(client.unary(EchoRequest::default()).await.is_err());
    }
    assert_eq!(
        failed, 3,
        "round robin sends every third call to the failing backend"
    );
    wait("backend-0 ejected", |s| {
        s.iter().any(|e| e.state == EndpointState::Ejected)
    })
    .await;
    let before = backends[0].calls();
    for _ in 0..10 {
        client.unary(EchoRequest::default()).await.unwrap();
    }
    assert_eq!(
        backends[0].calls(),
        before,
        "no call reaches the ejected backend"
    );
    // After the ejection time it is tried again.
    wait("backend-0 back", |s| {
        s.iter().all(|e| e.state == EndpointState::Ready)
    })
    .await;
    backends[0].clear_faults();
    for _ in 0..9 {
        client.unary(EchoRequest::default()).await.unwrap();
    }
    assert!(backends[0].calls() > before);
}
