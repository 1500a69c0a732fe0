//! BalanceLayer over real tonic backends: strategies, health gating, failover, discovery.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::Uri;
use tokio::time::timeout;
use tonic::Code;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{
    Balance, BalanceConfig, BalanceConfigBuilder, BalanceLayer, ConsistentHash, EndpointService,
    EndpointSnapshot, EndpointState, PeakEwma, PowerOfTwoChoices, RoundRobin, WeightedRoundRobin,
};
use towline::connect::Connect;
use towline::discover::{self, Change, Static};
use towline::health::HealthCheck;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

type Channel = tonic::transport::Channel;

/// Settings that make a test quick: reconnect after 50 ms, calls wait at most 2 s.
fn config() -> BalanceConfigBuilder {
    BalanceConfig::builder()
        .reconnect_backoff(
            Backoff::new(
                Jitter::Grpc,
                Duration::from_millis(50),
                Duration::from_millis(500),
                1.6,
            )
            .unwrap(),
        )
        .endpoint_wait(Duration::from_secs(2))
        .outlier_detection(None)
}

fn balance<D: discover::Discover>(discovery: D, config: BalanceConfig) -> Balance<Channel> {
    ServiceBuilder::new()
        .layer(BalanceLayer::new(discovery, config))
        .service(Connect::new())
}

async fn wait_for<S: EndpointService>(
    balance: &Balance<S>,
    what: &str,
    done: impl FnMut(&[EndpointSnapshot]) -> bool,
) {
    timeout(Duration::from_secs(10), balance.wait_until(done))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:#?}", balance.snapshot()));
}

fn count(snapshot: &[EndpointSnapshot], state: EndpointState) -> usize {
    snapshot.iter().filter(|e| e.state == state).count()
}

async fn all_ready(balance: &Balance<Channel>, n: usize) {
    wait_for(balance, "every endpoint ready", |s| {
        count(s, EndpointState::Ready) == n
    })
    .await;
}

/// `n` backends behind a balancer built from `config`, every endpoint ready.
async fn ready_stack(n: usize, config: BalanceConfigBuilder) -> (Vec<Backend>, Balance<Channel>) {
    let backends = Backend::start_many(n).await.unwrap();
    let b = balance(
        Static::new(backends.iter().map(Backend::uri)),
        config.build().unwrap(),
    );
    all_ready(&b, n).await;
    (backends, b)
}

/// The call failed with `UNAVAILABLE`, and its message says why.
fn assert_unavailable(status: &tonic::Status, why: &str) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(why), "{}", status.message());
}

fn state_of(balance: &Balance<Channel>, uri: &Uri) -> EndpointState {
    balance
        .snapshot()
        .iter()
        .find(|e| &e.uri == uri)
        .map(|e| e.state)
        .expect("endpoint known")
}

async fn call(client: &mut EchoClient<Balance<Channel>>) -> Result<String, tonic::Status> {
    Ok(client
        .unary(EchoRequest::default())
        .await?
        .into_inner()
        .backend)
}

/// Calls one after another and counts which backend served each.
async fn spread(balance: &Balance<Channel>, n: usize) -> BTreeMap<String, usize> {
    let mut client = EchoClient::new(balance.clone());
    let mut tally = BTreeMap::new();
    for _ in 0..n {
        *tally.entry(call(&mut client).await.unwrap()).or_default() += 1;
    }
    tally
}

#[tokio::test]
async fn round_robin_spreads_calls_evenly() {
    let (_backends, b) = ready_stack(4, config().strategy(RoundRobin::new())).await;
    let tally = spread(&b, 400).await;
    assert_eq!(
        tally.values().copied().collect::<Vec<_>>(),
        vec![100; 4],
        "{tally:?}"
    );
}

#[tokio::test]
async fn weighted_round_robin_follows_the_weights() {
    let backends = Backend::start_many(3).await.unwrap();
    let weights = [5, 2, 1];
    let b = balance(
        Static::weighted(backends.iter().map(Backend::uri).zip(weights)),
        config()
            .strategy(WeightedRoundRobin::new())
            .build()
            .unwrap(),
    );
    all_ready(&b, 3).await;
    let tally = spread(&b, 800).await;
    assert_eq!(tally["backend-0"], 500, "{tally:?}");
    assert_eq!(tally["backend-1"], 200, "{tally:?}");
    assert_eq!(tally["backend-2"], 100, "{tally:?}");
}

#[tokio::test]
async fn consistent_hash_is_sticky_and_stable_when_an_unrelated_endpoint_leaves() {
    let backends = Backend::start_many(4).await.unwrap();
    let (updates, discovery) = discover::channel(8);
    for backend in &backends {
        updates
            .send(Change::Insert(backend.uri(), Default::default()))
            .await
            .unwrap();
    }
    let b = balance(
        discovery,
        config()
            .strategy(ConsistentHash::header("x-tenant"))
            .build()
            .unwrap(),
    );
    all_ready(&b, 4).await;
    let client = EchoClient::new(b.clone());
    let route = |tenant: String| {
        let mut client = client.clone();
        async move {
            let mut req = tonic::Request::new(EchoRequest::default());
            req.metadata_mut()
                .insert("x-tenant", tenant.parse().unwrap());
            client.unary(req).await.unwrap().into_inner().backend
        }
    };
    let mut before = HashMap::new();
    for i in 0..200 {
        let tenant = format!("tenant-{i}");
        let first = route(tenant.clone()).await;
        assert_eq!(route(tenant.clone()).await, first, "{tenant} is not sticky");
        before.insert(tenant, first);
    }
    let mut used: Vec<&String> = before.values().collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 4, "200 keys reach every backend");

    updates
        .send(Change::Remove(backends[3].uri()))
        .await
        .unwrap();
    wait_for(&b, "backend-3 gone", |s| s.len() == 3).await;
    for (tenant, was) in &before {
        let now = route(tenant.clone()).await;
        if was != "backend-3" {
            assert_eq!(&now, was, "{tenant} moved though its backend stayed");
        } else {
            assert_ne!(now, "backend-3");
        }
    }
}

#[tokio::test]
async fn peak_ewma_and_p2c_route_around_a_slow_backend() {
    for (name, strategy) in [
        (
            "peak-ewma",
            Box::new(|c: BalanceConfigBuilder| c.strategy(PeakEwma::new())) as Box<dyn Fn(_) -> _>,
        ),
        (
            "p2c",
            Box::new(|c: BalanceConfigBuilder| c.strategy(PowerOfTwoChoices::new())),
        ),
    ] {
        let backends = Backend::start_many(3).await.unwrap();
        // Far slower than anything CPU contention does to the others, so the test means the
        // same on a loaded CI machine.
        backends[2].set_latency(Duration::from_millis(200));
        let b = balance(
            Static::new(backends.iter().map(Backend::uri)),
            strategy(config()).build().unwrap(),
        );
        all_ready(&b, 3).await;
        let client = EchoClient::new(b.clone());
        let report = Load::new(8)
            .calls(600)
            .run(move |_| {
                let mut client = client.clone();
                async move {
                    Ok(client
                        .unary(EchoRequest::default())
                        .await?
                        .into_inner()
                        .backend)
                }
            })
            .await;
        assert_eq!(report.failed(), 0);
        let slow = report.tally().get("backend-2").copied().unwrap_or(0);
        // Round robin would give it 200 of 600 (and the run would take 15 s).
        assert!(
            slow < 30,
            "{name}: the slow backend got {slow} of 600: {:?}",
            report.tally()
        );
    }
}

#[tokio::test]
async fn a_backend_set_not_serving_gets_no_calls_after_the_watch_update() {
    let (backends, b) = ready_stack(
        3,
        config()
            .strategy(RoundRobin::new())
            .health_check(HealthCheck::watch("")),
    )
    .await;

    backends[1].set_health(ServingStatus::NotServing).await;
    wait_for(&b, "backend-1 unhealthy", |s| {
        count(s, EndpointState::Unhealthy) == 1
    })
    .await;
    let before = backends[1].calls();
    let tally = spread(&b, 100).await;
    assert_eq!(backends[1].calls(), before, "{tally:?}");
    assert_eq!(tally.values().sum::<usize>(), 100);
    let snapshot = b.snapshot();
    let unhealthy = snapshot
        .iter()
        .find(|e| e.state == EndpointState::Unhealthy)
        .unwrap();
    assert_eq!(unhealthy.uri, backends[1].uri());
    assert!(!unhealthy.receiving);
    assert!(
        unhealthy.reason.as_deref().unwrap().contains("NOT_SERVING"),
        "{unhealthy:?}"
    );

    backends[1].set_health(ServingStatus::Serving).await;
    all_ready(&b, 3).await;
    assert!(spread(&b, 30).await.contains_key("backend-1"));
}

#[tokio::test]
async fn periodic_checks_apply_rise_and_fall() {
    let backends = Backend::start_many(2).await.unwrap();
    let check = HealthCheck::check("")
        .interval(Duration::from_millis(30))
        .timeout(Duration::from_millis(500))
        .rise(2)
        .fall(2);
    let b = balance(
        Static::new(backends.iter().map(Backend::uri)),
        config().health_check(check).build().unwrap(),
    );
    all_ready(&b, 2).await;
    backends[0].set_health(ServingStatus::NotServing).await;
    wait_for(&b, "backend-0 unhealthy after two failed checks", |s| {
        count(s, EndpointState::Unhealthy) == 1
    })
    .await;
    assert_eq!(state_of(&b, &backends[0].uri()), EndpointState::Unhealthy);
    let before = backends[0].calls();
    spread(&b, 20).await;
    assert_eq!(backends[0].calls(), before);
    backends[0].set_health(ServingStatus::Serving).await;
    all_ready(&b, 2).await;
}

#[tokio::test]
async fn a_server_without_the_health_service_counts_as_healthy() {
    let plain = Backend::builder()
        .id("plain")
        .without_health_service()
        .start()
        .await
        .unwrap();
    let b = balance(
        Static::new([plain.uri()]),
        config()
            .health_check(HealthCheck::watch(""))
            .build()
            .unwrap(),
    );
    all_ready(&b, 1).await;
    assert_eq!(spread(&b, 5).await["plain"], 5);
}

#[tokio::test]
async fn a_stopped_backend_gets_no_calls_and_gets_them_back_after_restart() {
    let (backends, b) = ready_stack(
        3,
        config()
            .strategy(RoundRobin::new())
            .health_check(HealthCheck::watch("")),
    )
    .await;

    backends[2].stop().await;
    // The health stream breaks with the connection: no call is needed to notice.
    wait_for(&b, "backend-2 out", |s| count(s, EndpointState::Ready) == 2).await;
    let tally = spread(&b, 60).await;
    assert_eq!(
        tally.values().sum::<usize>(),
        60,
        "no call fails: {tally:?}"
    );
    assert!(!tally.contains_key("backend-2"));
    let down = b
        .snapshot()
        .into_iter()
        .find(|e| e.uri == backends[2].uri())
        .unwrap();
    assert!(
        matches!(down.state, EndpointState::Down | EndpointState::Connecting),
        "{down:?}"
    );

    backends[2].restart().await.unwrap();
    all_ready(&b, 3).await;
    assert!(spread(&b, 30).await.contains_key("backend-2"));
}

#[tokio::test]
async fn without_health_checks_a_failed_call_takes_a_dead_backend_out() {
    let (backends, b) = ready_stack(2, config().strategy(RoundRobin::new())).await;
    backends[0].stop().await;
    let mut client = EchoClient::new(b.clone());
    let mut failed = 0;
    for _ in 0..40 {
        if let Err(status) = call(&mut client).await {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            failed += 1;
        }
    }
    // The call that meets the dead connection fails (RetryLayer is the answer to that); the
    // endpoint is then taken out and reconnected with backoff, so later calls succeed.
    assert!(failed <= 2, "{failed} calls failed");
    assert_ne!(state_of(&b, &backends[0].uri()), EndpointState::Ready);
}

#[tokio::test]
async fn panic_threshold_spreads_over_every_connected_endpoint() {
    let (backends, b) = ready_stack(
        4,
        config()
            .strategy(RoundRobin::new())
            .health_check(HealthCheck::watch(""))
            .panic_threshold(0.5),
    )
    .await;
    for backend in &backends[1..] {
        backend.set_health(ServingStatus::NotServing).await;
    }
    wait_for(&b, "three unhealthy", |s| {
        count(s, EndpointState::Unhealthy) == 3
    })
    .await;
    assert!(b.in_panic());
    let tally = spread(&b, 40).await;
    assert_eq!(
        tally.len(),
        4,
        "one ready of four is below 50%: spread over all {tally:?}"
    );

    // With none ready there is nothing to protect: fail fast and say why.
    backends[0].set_health(ServingStatus::NotServing).await;
    wait_for(&b, "four unhealthy", |s| {
        count(s, EndpointState::Unhealthy) == 4
    })
    .await;
    assert!(!b.in_panic());
    let status = call(&mut EchoClient::new(b.clone())).await.unwrap_err();
    assert_unavailable(&status, "all 4 endpoints unhealthy");
}

#[tokio::test]
async fn no_endpoints_fails_fast_with_the_reason() {
    let (_updates, discovery) = discover::channel(1);
    let b = balance(
        discovery,
        config()
            .endpoint_wait(Duration::from_millis(50))
            .build()
            .unwrap(),
    );
    let status = call(&mut EchoClient::new(b)).await.unwrap_err();
    assert_unavailable(&status, "no endpoints discovered");
}

#[tokio::test]
async fn a_call_waits_for_the_first_endpoint_to_connect() {
    let backend = Backend::start().await.unwrap();
    let (updates, discovery) = discover::channel(1);
    let b = balance(discovery, config().build().unwrap());
    let mut client = EchoClient::new(b.clone());
    let pending = tokio::spawn(async move { call(&mut client).await });
    updates
        .send(Change::Insert(backend.uri(), Default::default()))
        .await
        .unwrap();
    assert_eq!(pending.await.unwrap().unwrap(), backend.id());
}

#[tokio::test]
async fn discovery_adds_and_removes_under_load_without_a_failed_call() {
    let backends = Backend::start_many(4).await.unwrap();
    for backend in &backends {
        backend.set_latency(Duration::from_millis(2));
    }
    let (updates, discovery) = discover::channel(8);
    for backend in &backends[..2] {
        updates
            .send(Change::Insert(backend.uri(), Default::default()))
            .await
            .unwrap();
    }
    let b = balance(
        discovery,
        config().strategy(RoundRobin::new()).build().unwrap(),
    );
    all_ready(&b, 2).await;

    let client = EchoClient::new(b.clone());
    let load = Load::new(16).calls(3_000).duration(Duration::from_secs(20));
    let load = tokio::spawn(async move {
        load.run(move |_| {
            let mut client = client.clone();
            async move {
                Ok(client
                    .unary(EchoRequest::default())
                    .await?
                    .into_inner()
                    .backend)
            }
        })
        .await
    });
    // Add two, then remove the first two, while calls are in flight.
    for backend in &backends[2..] {
        updates
            .send(Change::Insert(backend.uri(), Default::default()))
            .await
            .unwrap();
    }
    wait_for(&b, "four ready", |s| count(s, EndpointState::Ready) == 4).await;
    for backend in &backends[..2] {
        updates.send(Change::Remove(backend.uri())).await.unwrap();
    }
    wait_for(&b, "the removed ones drained", |s| s.len() == 2).await;
    let after_removal: Vec<u64> = backends[..2].iter().map(Backend::calls).collect();

    let report = load.await.unwrap();
    assert_eq!(report.failed(), 0, "{:?}", report.failures());
    assert_eq!(report.calls(), 3_000);
    let now: Vec<u64> = backends[..2].iter().map(Backend::calls).collect();
    assert_eq!(
        now, after_removal,
        "a removed endpoint got a call after it drained"
    );
    assert!(report.tally().contains_key("backend-3"));
}

#[tokio::test]
async fn layering_twice_gives_the_same_balancer_and_both_serve() {
    let backends = Backend::start_many(2).await.unwrap();
    let stack = ServiceBuilder::new().layer(BalanceLayer::new(
        Static::new(backends.iter().map(Backend::uri)),
        config().build().unwrap(),
    ));
    let first: Balance<Channel> = stack.service(Connect::new());
    let second: Balance<Channel> = stack.service(Connect::new());
    assert_eq!(first.failure(), None);
    assert_eq!(second.failure(), None);
    assert!(first.same_balancer(&second));
    all_ready(&second, 2).await;
    assert_eq!(spread(&first, 4).await.values().sum::<usize>(), 4);
    assert_eq!(spread(&second, 4).await.values().sum::<usize>(), 4);
    // One balancer: one connection per backend, not one per layering.
    assert!(
        backends.iter().all(|b| b.connections_accepted() == 1),
        "{:?}",
        backends
            .iter()
            .map(Backend::connections_accepted)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_failed_balancer_says_so_at_construction() {
    use tower::Layer;
    // Layered over a `MakeService` of another endpoint type: that handle cannot be the
    // balancer already started, and says so at once.
    let layer = BalanceLayer::new(Static::new([]), BalanceConfig::default());
    let first: Balance<Channel> = layer.layer(Connect::new());
    assert_eq!(first.failure(), None);
    assert!(!first.is_failed());
    let make = tower::service_fn(|_: Uri| async { Ok::<_, towline::BoxError>(never_ready()) });
    let other: Balance<Gated> = layer.layer(make);
    assert!(other.is_failed());
    let reason = other.failure().expect("the other balancer is failed");
    assert!(
        reason.contains("another kind of endpoint service"),
        "{reason}"
    );
    assert!(other.snapshot().is_empty());
    // Clones share the verdict, and every call states it.
    assert_eq!(other.clone().failure(), Some(reason));
    let status = tower::ServiceExt::oneshot(
        other.clone(),
        http::Request::new(tonic::body::Body::empty()),
    )
    .await
    .unwrap_err()
    .downcast::<tonic::Status>()
    .unwrap();
    assert_unavailable(&status, reason);

    let outside = std::thread::spawn(|| balance(Static::new([]), BalanceConfig::default()))
        .join()
        .unwrap();
    assert!(
        outside
            .failure()
            .is_some_and(|r| r.contains("outside a Tokio runtime")),
        "{outside:?}"
    );
    let status = call(&mut EchoClient::new(outside)).await.unwrap_err();
    assert_unavailable(&status, "outside a Tokio runtime");

    // The one-shot use, checked by the compiler.
    let backends = Backend::start_many(2).await.unwrap();
    let once: Balance<Channel> = BalanceLayer::new(
        Static::new(backends.iter().map(Backend::uri)),
        config().build().unwrap(),
    )
    .into_balance(Connect::new());
    assert_eq!(once.failure(), None);
    all_ready(&once, 2).await;
    assert_eq!(spread(&once, 4).await.values().sum::<usize>(), 4);
}

#[tokio::test]
async fn without_health_checks_a_restarted_backend_is_reconnected_with_backoff() {
    let (backends, b) = ready_stack(2, config().strategy(RoundRobin::new())).await;
    backends[1].stop().await;
    let mut client = EchoClient::new(b.clone());
    // The first call that meets the dead connection takes the endpoint out.
    while state_of(&b, &backends[1].uri()) == EndpointState::Ready {
        let _ = call(&mut client).await;
    }
    wait_for(&b, "a failed reconnect", |s| {
        s.iter().any(|e| e.state == EndpointState::Down)
    })
    .await;
    backends[1].restart().await.unwrap();
    all_ready(&b, 2).await;
    assert!(spread(&b, 20).await.contains_key("backend-1"));
}

#[tokio::test]
async fn calls_lost_with_a_dead_connection_do_not_eject_the_endpoint() {
    let backends = Backend::start_many(2).await.unwrap();
    let detection = towline::outlier::OutlierDetection::builder()
        .consecutive_failures(Some(3))
        .max_ejection_percent(50)
        .build()
        .unwrap();
    let b = balance(
        Static::new(backends.iter().map(Backend::uri)),
        config()
            .strategy(RoundRobin::new())
            .outlier_detection(detection)
            .build()
            .unwrap(),
    );
    all_ready(&b, 2).await;
    // Eight calls in flight on backend-1 when it dies: all fail with the connection.
    backends[1].set_latency(Duration::from_secs(30));
    let client = EchoClient::new(b.clone());
    let in_flight: Vec<_> = (0..16)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { call(&mut client).await })
        })
        .collect();
    while backends[1].calls() < 8 {
        tokio::task::yield_now().await;
    }
    backends[1].stop().await;
    let failed = futures::future::join_all(in_flight)
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().is_err())
        .count();
    assert_eq!(failed, 8);
    backends[1].clear_faults();
    backends[1].restart().await.unwrap();
    // Back as soon as it reconnects, not after an ejection time.
    all_ready(&b, 2).await;
    assert!(
        b.snapshot().iter().all(|e| e.ejections == 0),
        "{:#?}",
        b.snapshot()
    );
}

#[tokio::test]
async fn a_finished_stream_stops_counting_as_in_flight_before_it_is_dropped() {
    let (_backends, b) = ready_stack(1, config()).await;
    let mut client = EchoClient::new(b.clone());
    let request = EchoRequest {
        count: 3,
        ..Default::default()
    };
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let mut n = 0;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
    // tonic stops polling the body after the trailers; the call is over all the same.
    assert_eq!(b.snapshot()[0].in_flight, 0);
    drop(stream);
}

/// An endpoint service whose calls fail with whatever error it was made with.
#[derive(Clone)]
struct Failing(fn() -> towline::BoxError);

impl tower::Service<http::Request<tonic::body::Body>> for Failing {
    type Response = http::Response<tonic::body::Body>;
    type Error = towline::BoxError;
    type Future = std::future::Ready<Result<Self::Response, towline::BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), towline::BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Err((self.0)()))
    }
}

/// What a pool answers after dropping the broken connection under a call.
fn pool_connection_reset() -> towline::BoxError {
    Box::new(tonic::Status::unavailable("pool: connection reset"))
}

/// One endpoint whose every call fails with `error`, behind a balancer built from `config`, ready.
async fn failing_endpoint(
    error: fn() -> towline::BoxError,
    config: BalanceConfigBuilder,
) -> Balance<Failing> {
    let make =
        tower::service_fn(move |_: Uri| async move { Ok::<_, towline::BoxError>(Failing(error)) });
    let b: Balance<Failing> = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new([Uri::from_static("http://a:1")]),
            config.build().unwrap(),
        ))
        .service(make);
    wait_for(&b, "ready", |s| count(s, EndpointState::Ready) == 1).await;
    b
}

/// Gives the balancer's driver every chance to act on a wrong signal, then checks that the one
/// endpoint is still ready.
async fn assert_still_ready(b: &Balance<Failing>) {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let snapshot = b.snapshot();
    assert_eq!(snapshot[0].state, EndpointState::Ready, "{snapshot:#?}");
}

#[tokio::test]
async fn only_a_raw_transport_error_takes_an_endpoint_down() {
    use tower::ServiceExt;
    for (error, goes_down) in [
        // A pool answers with a Status after dropping just the broken connection: keep the
        // endpoint (and the pool's other connections).
        (pool_connection_reset as fn() -> _, false),
        // A channel's raw transport error: the connection itself is gone.
        (
            || {
                Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                    as towline::BoxError
            },
            true,
        ),
    ] {
        let b = failing_endpoint(error, config()).await;
        let request = http::Request::new(tonic::body::Body::empty());
        let err = b.clone().oneshot(request).await.unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        if goes_down {
            timeout(
                Duration::from_secs(5),
                b.wait_until(|s| s[0].state != EndpointState::Ready),
            )
            .await
            .unwrap();
        } else {
            assert_still_ready(&b).await;
        }
    }
}

/// One backend reporting NOT_SERVING behind a balancer that waits `endpoint_wait` for it.
async fn one_unhealthy_backend(endpoint_wait: Duration) -> (Vec<Backend>, Balance<Channel>) {
    let (backends, b) = ready_stack(
        1,
        config()
            .health_check(HealthCheck::watch(""))
            .endpoint_wait(endpoint_wait),
    )
    .await;
    backends[0].set_health(ServingStatus::NotServing).await;
    wait_for(&b, "unhealthy", |s| count(s, EndpointState::Unhealthy) == 1).await;
    (backends, b)
}

/// An Echo request with an optional `WaitForReady` and an optional deadline.
fn request(wait_for_ready: Option<bool>, timeout: Option<Duration>) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest::default());
    if let Some(wait) = wait_for_ready {
        request
            .extensions_mut()
            .insert(towline::balance::WaitForReady(wait));
    }
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

#[tokio::test]
async fn wait_for_ready_false_fails_at_once_and_true_waits_for_the_endpoint() {
    let (backends, b) = one_unhealthy_backend(Duration::from_millis(300)).await;
    let mut client = EchoClient::new(b.clone());

    // Every endpoint in transient failure: a call that is not wait-for-ready fails at once.
    let started = tokio::time::Instant::now();
    let status = client.unary(request(Some(false), None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // Without the extension it waits out `endpoint_wait`.
    let started = tokio::time::Instant::now();
    client.unary(request(None, None)).await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    // Wait-for-ready waits past `endpoint_wait`, up to its deadline, for the endpoint to heal.
    let mut waiting = client.clone();
    let call = tokio::spawn(async move {
        waiting
            .unary(request(Some(true), Some(Duration::from_secs(10))))
            .await
    });
    // Heal only once the call is waiting longer than `endpoint_wait` would have let it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished());
    backends[0].set_health(ServingStatus::Serving).await;
    let reply = timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_inner().backend, "backend-0");
}

#[tokio::test]
async fn no_call_waits_for_an_endpoint_past_its_own_deadline() {
    let (_backends, b) = one_unhealthy_backend(Duration::from_secs(5)).await;
    let client = EchoClient::new(b.clone());

    for wait_for_ready in [None, Some(true)] {
        let request = request(wait_for_ready, Some(Duration::from_millis(200)));
        let started = tokio::time::Instant::now();
        let status = client.clone().unary(request).await.unwrap_err();
        let waited = started.elapsed();
        // The 200 ms deadline ends the wait, not the 5 s endpoint_wait.
        assert!(
            (Duration::from_millis(200)..Duration::from_secs(2)).contains(&waited),
            "{wait_for_ready:?}: waited {waited:?}"
        );
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("NOT_SERVING"), "{status:?}");
    }
}

/// An endpoint that never has room for another call, like a pool whose connections are all busy
/// or reconnecting: its `poll_ready` stays pending (a [`Gated`] whose gate never opens).
fn never_ready() -> Gated {
    Gated::default()
}

/// A balancer whose every endpoint is served by `gated` (clones of one service: one gate).
fn gated_balance(
    gated: &Gated,
    discovery: impl discover::Discover,
    config: BalanceConfig,
) -> Balance<Gated> {
    let gated = gated.clone();
    let make = tower::service_fn(move |_: Uri| {
        let service = gated.clone();
        async move { Ok::<_, towline::BoxError>(service) }
    });
    ServiceBuilder::new()
        .layer(BalanceLayer::new(discovery, config))
        .service(make)
}

/// A request with this `grpc-timeout`.
fn with_timeout(timeout: &'static str) -> http::Request<tonic::body::Body> {
    let mut request = http::Request::new(tonic::body::Body::empty());
    request
        .headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
    request
}

/// A call with a 250 ms deadline to a balancer over `gated` whose discovery names no endpoint
/// for the call's first 100 ms, then one: the call's outcome, and how long it took.
async fn call_before_discovery(
    gated: &Gated,
) -> (
    Result<http::Response<towline::balance::TrackedBody<tonic::body::Body>>, towline::BoxError>,
    Duration,
) {
    use tower::ServiceExt;
    let (updates, discovery) = discover::channel(1);
    let b = gated_balance(gated, discovery, config().build().unwrap());
    let started = tokio::time::Instant::now();
    let call = tokio::spawn(b.clone().oneshot(with_timeout("250m")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    updates
        .send(Change::Insert(
            Uri::from_static("http://a:1"),
            Default::default(),
        ))
        .await
        .unwrap();
    let outcome = timeout(Duration::from_secs(5), call)
        .await
        .expect("the call outlived its deadline")
        .unwrap();
    (outcome, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_on_a_picked_endpoint_ends_at_its_deadline() {
    use tower::ServiceExt;
    let b = gated_balance(
        &never_ready(),
        Static::new([Uri::from_static("http://a:1")]),
        config().build().unwrap(),
    );
    b.wait_until(|s| s.iter().all(|e| e.state == EndpointState::Ready))
        .await;

    let request = with_timeout("250m");
    let started = tokio::time::Instant::now();
    let err = timeout(Duration::from_secs(5), b.clone().oneshot(request))
        .await
        .expect("the call outlived its deadline")
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    let status = err.downcast::<tonic::Status>().unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains("deadline of 250 ms exceeded while a:1 was not ready"),
        "{status:?}"
    );
    // The call never went out: the endpoint's in-flight count is back to zero, and the wait is
    // no round trip, so the RTT estimate is still the 30 ms default (decayed), not 250 ms.
    let endpoint = &b.snapshot()[0];
    assert_eq!(endpoint.in_flight, 0);
    assert!(
        endpoint.rtt_estimate <= Duration::from_millis(30),
        "{:?}",
        endpoint.rtt_estimate
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_that_waited_for_an_endpoint_has_only_the_rest_of_its_deadline_left() {
    // The endpoint that appears after 100 ms is never ready.
    let (outcome, took) = call_before_discovery(&never_ready()).await;
    assert_eq!(took, Duration::from_millis(250));
    let status = outcome.unwrap_err().downcast::<tonic::Status>().unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn outlier_detection_counts_answers_not_broken_connections() {
    use tower::ServiceExt;
    use towline::outlier::OutlierDetection;
    for (error, ejected) in [
        // A pool's verdict that the connection under the call broke: not the backend's answer.
        (pool_connection_reset as fn() -> _, false),
        // A client-side deadline: the backend did not answer in time. That counts.
        (
            || Box::new(tonic::Status::deadline_exceeded("Timeout expired")) as towline::BoxError,
            true,
        ),
    ] {
        let detection = OutlierDetection::builder()
            .consecutive_failures(Some(3))
            .build()
            .unwrap();
        let b = failing_endpoint(error, config().outlier_detection(detection)).await;
        for _ in 0..5 {
            let request = http::Request::new(tonic::body::Body::empty());
            b.clone().oneshot(request).await.unwrap_err();
        }
        if ejected {
            wait_for(&b, "ejected", |s| count(s, EndpointState::Ejected) == 1).await;
        } else {
            assert_still_ready(&b).await;
            assert_eq!(b.snapshot()[0].ejections, 0);
        }
    }
}

/// Issue 13, 2.8: when the pool connection that carries the health `Watch` breaks, the pool
/// replaces that one connection and the watch goes on over the other: the endpoint stays in
/// rotation, its other connection is kept, and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_connection_of_a_pool_is_the_pools_business() {
    use std::sync::{Arc, Mutex, PoisonError};
    use towline::pool::{PoolConfig, PoolLayer};
    use towline::testkit::ECHO_SERVICE;

    let backend = Backend::builder().id("pooled").start().await.unwrap();
    let pool = PoolConfig::builder().size(2).build().unwrap();
    let b = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new([backend.uri()]),
            config()
                .health_check(HealthCheck::watch(ECHO_SERVICE))
                .build()
                .unwrap(),
        ))
        .layer(PoolLayer::new(pool.clone()))
        .service(pool.connector());
    wait_for(&b, "ready", |s| count(s, EndpointState::Ready) == 1).await;
    // The endpoint is ready on its first connection; the pool's second may still be on its
    // way (and the server counts a connection in its own accept task).
    until_open_connections(&backend, 2).await;
    assert_eq!(backend.connections_accepted(), 2);

    // Every moment the endpoint is out of rotation, recorded.
    let flaps = Arc::new(Mutex::new(Vec::new()));
    let watch = {
        let (b, flaps) = (b.clone(), flaps.clone());
        tokio::spawn(async move {
            b.wait_until(|s| {
                if s[0].state != EndpointState::Ready {
                    flaps
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!("{}: {:?}", s[0].state, s[0].reason));
                }
                false
            })
            .await;
        })
    };
    let retry = towline::retry::RetryLayer::new(towline::retry::RetryPolicy::default());
    let client = EchoClient::new(ServiceBuilder::new().layer(retry).service(b.clone()));
    let driver = Load::new(4).duration(Duration::from_millis(1500));
    let load = driver.run(move |_| {
        let mut client = client.clone();
        async move { client.unary(EchoRequest::default()).await.map(|_| ()) }
    });
    let breaks = async {
        // One connection at a time, the watch's included: each is replaced on its own.
        for number in 1..=2 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(
                backend.drop_connection(number),
                "connection {number} was open"
            );
        }
    };
    let (report, ()) = tokio::join!(load, breaks);
    watch.abort();
    assert_eq!(report.failed(), 0, "{:?}", report.failures());
    let flaps = flaps.lock().unwrap_or_else(PoisonError::into_inner).clone();
    assert!(flaps.is_empty(), "the endpoint left rotation: {flaps:#?}");
    // One replacement per broken connection (the pool's own), and connection 2 outlived the
    // first break (asserted above): a pool rebuilt at each break would have closed it and opened
    // two each time, six in all. tonic's `Channel` may reconnect once by itself when a call
    // reaches the dead connection before the pool has dropped it: at most five.
    until_open_connections(&backend, 2).await;
    let accepted = backend.connections_accepted();
    assert!((4..=5).contains(&accepted), "{accepted} connections");
}

/// Until `backend` has `n` connections open (the testkit counts them as its server accepts and
/// drops them: there is no event to wait on), for at most 5 s.
async fn until_open_connections(backend: &Backend, n: u64) {
    timeout(Duration::from_secs(5), async {
        while backend.open_connections() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {n} connections open after 5 s",
            backend.open_connections()
        )
    });
}

/// An endpoint service that is not ready until its gate opens, then answers every call at once
/// (Trailers-Only `OK`): the shape of a pool waiting for a free stream.
#[derive(Clone, Default)]
struct Gated {
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    waker: std::sync::Arc<futures::task::AtomicWaker>,
    /// The `grpc-timeout` of the last call it answered.
    last_timeout: std::sync::Arc<std::sync::Mutex<Option<http::HeaderValue>>>,
}

impl Gated {
    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake();
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Gated {
    type Response = http::Response<tonic::body::Body>;
    type Error = towline::BoxError;
    type Future = std::future::Ready<Result<Self::Response, towline::BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), towline::BoxError>> {
        self.waker.register(cx.waker());
        if self.open.load(std::sync::atomic::Ordering::SeqCst) {
            std::task::Poll::Ready(Ok(()))
        } else {
            std::task::Poll::Pending
        }
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        *self.last_timeout.lock().unwrap() = request.headers().get("grpc-timeout").cloned();
        let mut response = http::Response::new(tonic::body::Body::empty());
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        std::future::ready(Ok(response))
    }
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_measures_from_the_send_not_from_the_pick() {
    use tower::ServiceExt;
    let gated = Gated::default();
    let b = gated_balance(
        &gated,
        Static::new([Uri::from_static("http://a:1")]),
        config().strategy(PeakEwma::new()).build().unwrap(),
    );
    b.wait_until(|s| s.iter().all(|e| e.state == EndpointState::Ready))
        .await;

    let call = tokio::spawn(
        b.clone()
            .oneshot(http::Request::new(tonic::body::Body::empty())),
    );
    // The call waits 150 ms for the endpoint's readiness (a busy pool), then is answered at once.
    tokio::time::sleep(Duration::from_millis(150)).await;
    gated.open();
    let response = timeout(Duration::from_secs(5), call)
        .await
        .expect("the call ends once the endpoint is ready")
        .unwrap()
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "0");
    // The round trip took no time at all: the wait before the send is not the endpoint's latency.
    let rtt = b.snapshot()[0].rtt_estimate;
    assert!(rtt < Duration::from_millis(10), "{rtt:?}");
}

#[tokio::test]
async fn a_long_stream_is_one_round_trip_to_its_first_message() {
    use futures::StreamExt;
    let (_backends, b) = ready_stack(1, config().strategy(PeakEwma::new())).await;
    let mut client = EchoClient::new(b.clone());
    // Ten messages 100 ms apart: the first arrives after ~100 ms, the stream lasts ~1 s.
    let started = std::time::Instant::now();
    let mut stream = client
        .server_stream(EchoRequest {
            count: 10,
            interval_ms: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while let Some(message) = stream.next().await {
        message.unwrap();
        received += 1;
    }
    assert_eq!(received, 10);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The estimate is the time to the first message, not the stream's second.
    let rtt = b.snapshot()[0].rtt_estimate;
    assert!(
        rtt >= Duration::from_millis(90) && rtt < Duration::from_millis(500),
        "{rtt:?}"
    );
}

#[tokio::test]
async fn a_weight_change_from_discovery_keeps_the_connection_and_moves_the_traffic() {
    let backends = Backend::start_many(2).await.unwrap();
    let (updates, discovery) = discover::channel(4);
    for backend in &backends {
        updates
            .send(Change::Insert(
                backend.uri(),
                discover::Endpoint::weighted(1),
            ))
            .await
            .unwrap();
    }
    let b = balance(
        discovery,
        config()
            .strategy(WeightedRoundRobin::new())
            .build()
            .unwrap(),
    );
    all_ready(&b, 2).await;
    let tally = spread(&b, 100).await;
    assert_eq!(tally["backend-0"], 50, "{tally:?}");
    let connections: Vec<u64> = backends.iter().map(Backend::connections_accepted).collect();

    // Discovery (a DNS SRV record) gives backend-0 weight 3: the same endpoint, weighed anew.
    updates
        .send(Change::Insert(
            backends[0].uri(),
            discover::Endpoint::weighted(3),
        ))
        .await
        .unwrap();
    wait_for(&b, "the new weight", |s| {
        s.iter()
            .any(|e| e.uri == backends[0].uri() && e.weight == 3)
    })
    .await;
    let snapshot = b.snapshot();
    assert_eq!(snapshot.len(), 2, "no endpoint drained: {snapshot:#?}");
    assert_eq!(count(&snapshot, EndpointState::Ready), 2, "{snapshot:#?}");
    let tally = spread(&b, 100).await;
    assert_eq!(tally["backend-0"], 75, "{tally:?}");
    assert_eq!(tally["backend-1"], 25, "{tally:?}");
    let after: Vec<u64> = backends.iter().map(Backend::connections_accepted).collect();
    assert_eq!(after, connections, "no endpoint reconnected");
}

/// `n` in-memory endpoints that answer at once, every one ready.
async fn many_ready(n: usize) -> Balance<Gated> {
    let gated = Gated::default();
    gated.open();
    let uris = (0..n).map(|i| -> Uri {
        format!("http://10.{}.{}.{}:1", i >> 16, (i >> 8) & 255, i & 255)
            .parse()
            .unwrap()
    });
    let b = gated_balance(&gated, Static::new(uris), config().build().unwrap());
    // Polled rather than woken per change: this test is about the cost of one look at the table.
    timeout(Duration::from_secs(60), async {
        while count(&b.snapshot(), EndpointState::Ready) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every endpoint ready");
    b
}

/// The quickest of a few snapshots.
fn snapshot_time(b: &Balance<Gated>) -> Duration {
    (0..5)
        .map(|_| {
            let started = std::time::Instant::now();
            assert!(b.snapshot().iter().all(|e| e.receiving));
            started.elapsed()
        })
        .min()
        .unwrap()
}

#[tokio::test]
async fn a_snapshot_costs_in_proportion_to_the_endpoints() {
    let small = snapshot_time(&many_ready(200).await);
    let large = snapshot_time(&many_ready(2000).await);
    // Ten times the endpoints: about ten times the time (a search per endpoint made it 100×).
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 30.0,
        "{small:?} for 200, {large:?} for 2000: {ratio:.1}×"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_on_while_a_hash_ring_is_rebuilt() {
    use tower::ServiceExt;
    const ENDPOINTS: usize = 30;
    let gated = Gated::default();
    gated.open();
    let (updates, discovery) = discover::channel(ENDPOINTS);
    let uri = |i: usize| -> Uri { format!("http://10.0.0.{i}:1").parse().unwrap() };
    for i in 0..ENDPOINTS {
        updates
            .send(Change::Insert(uri(i), Default::default()))
            .await
            .unwrap();
    }
    // The most points per endpoint: every rebuild hashes ~500,000 points and sorts them.
    let ring =
        ConsistentHash::by(|_| None).points_per_weight(towline::balance::MAX_POINTS_PER_ENDPOINT);
    let b = gated_balance(&gated, discovery, config().strategy(ring).build().unwrap());
    timeout(Duration::from_secs(120), async {
        while count(&b.snapshot(), EndpointState::Ready) < ENDPOINTS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every endpoint ready");

    // Calls in a loop on another task, each timed, from before one endpoint leaves (a rebuild)
    // until it has left.
    let (calling, called) = tokio::sync::oneshot::channel();
    let rebuilt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = tokio::spawn({
        let (b, rebuilt) = (b.clone(), rebuilt.clone());
        async move {
            let mut calling = Some(calling);
            let (mut slowest, mut calls) = (Duration::ZERO, 0u64);
            let started = std::time::Instant::now();
            while !rebuilt.load(std::sync::atomic::Ordering::SeqCst)
                && started.elapsed() < Duration::from_secs(30)
            {
                let call = std::time::Instant::now();
                let response = b
                    .clone()
                    .oneshot(http::Request::new(tonic::body::Body::empty()))
                    .await
                    .unwrap();
                assert_eq!(response.headers()["grpc-status"], "0");
                slowest = slowest.max(call.elapsed());
                calls += 1;
                if let Some(calling) = calling.take() {
                    let _ = calling.send(());
                }
                tokio::task::yield_now().await;
            }
            (slowest, calls)
        }
    });
    called.await.expect("the caller made its first call");
    updates.send(Change::Remove(uri(0))).await.unwrap();
    wait_for(&b, "the endpoint to leave", |s| s.len() == ENDPOINTS - 1).await;
    rebuilt.store(true, std::sync::atomic::Ordering::SeqCst);
    let (slowest, calls) = caller.await.unwrap();
    assert!(calls > 1, "calls went on during the rebuild: {calls}");
    // The rebuild takes ~300 ms in a debug build: a call that waited for it would show it. The
    // bound leaves room for a busy machine descheduling the caller.
    assert!(
        slowest < Duration::from_millis(100),
        "a call waited {slowest:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_that_waited_for_a_ready_endpoint_is_sent_with_the_rest_of_its_deadline() {
    // The endpoint that appears after 100 ms is ready at once.
    let gated = Gated::default();
    gated.open();
    let (outcome, _) = call_before_discovery(&gated).await;
    outcome.unwrap();
    let sent = gated
        .last_timeout
        .lock()
        .unwrap()
        .clone()
        .expect("sent with a deadline");
    let left = towline::deadline::parse(sent.as_bytes()).unwrap();
    assert!(
        left <= Duration::from_millis(150),
        "sent with {left:?} of 250 ms left"
    );
}

/// A strategy that counts how often it is given a new candidate set.
struct CountingUpdates(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl towline::balance::Strategy for CountingUpdates {
    fn update(&mut self, _: &[towline::balance::Candidate]) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn pick(&self, _: &http::request::Parts, _: &[towline::balance::Candidate]) -> usize {
        0
    }
}

#[tokio::test]
async fn endpoints_ready_at_once_rebuild_the_strategy_a_few_times_not_once_each() {
    const ENDPOINTS: usize = 300;
    let updates = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gated = Gated::default();
    gated.open();
    let uris = (0..ENDPOINTS).map(|i| {
        format!("http://10.0.{}.{}:1", i / 250, i % 250 + 1)
            .parse::<Uri>()
            .unwrap()
    });
    let config = config()
        .strategy(CountingUpdates(updates.clone()))
        .build()
        .unwrap();
    let b = gated_balance(&gated, Static::new(uris), config);
    timeout(
        Duration::from_secs(10),
        b.wait_until(|s| s.len() == ENDPOINTS && count(s, EndpointState::Ready) == ENDPOINTS),
    )
    .await
    .expect("every endpoint ready");
    // The endpoints' reports are applied once per wake-up of the balancer's task, so the
    // candidate set (and with it a hash ring, a weighted schedule) is rebuilt a few times,
    // where one rebuild per endpoint made starting N endpoints cost N rebuilds of up to N.
    let rebuilds = updates.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        rebuilds <= ENDPOINTS / 10,
        "{rebuilds} rebuilds for {ENDPOINTS} endpoints becoming ready"
    );
}
