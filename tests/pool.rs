//! `PoolLayer` against real testkit backends over real HTTP/2.

use std::collections::BTreeMap;
use std::time::Duration;

use towline::backoff::{Backoff, Jitter};

use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic::transport::Channel;
use tower::{Service, ServiceBuilder, ServiceExt};
use towline::connect::Connect;
use towline::pool::{Pool, PoolConfig, PoolConfigBuilder, PoolLayer};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, CONNECTION_HEADER, LATENCY_HEADER};

type Body = tonic::body::Body;

/// A reconnect backoff short enough for a test: `initial_ms`, ×1.6, at most `max_ms`.
fn quick_backoff(initial_ms: u64, max_ms: u64) -> Backoff {
    Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(initial_ms),
        Duration::from_millis(max_ms),
        1.6,
    )
    .unwrap()
}

async fn make_pool(
    backend: &Backend,
    config: PoolConfigBuilder,
) -> Result<Pool<Channel>, towline::BoxError> {
    ServiceBuilder::new()
        .layer(PoolLayer::new(config.build()?))
        .service(Connect::new())
        .oneshot(backend.uri())
        .await
}

/// One unary call; returns the number of the server connection that carried it.
async fn call(pool: &Pool<Channel>) -> Result<u64, tonic::Status> {
    let reply = EchoClient::new(pool.clone())
        .unary(EchoRequest::default())
        .await?;
    let connection = reply
        .metadata()
        .get(CONNECTION_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("the testkit numbers its connections");
    Ok(connection)
}

/// Runs `n` calls at once and tallies the connections that carried them.
async fn concurrent_calls(pool: &Pool<Channel>, n: usize) -> BTreeMap<u64, usize> {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { call(&pool).await })
        })
        .collect();
    let mut tally = BTreeMap::new();
    for handle in calls {
        let connection = timeout(Duration::from_secs(10), handle)
            .await
            .expect("no call hangs")
            .expect("no panic")
            .expect("the call succeeds");
        *tally.entry(connection).or_default() += 1;
    }
    tally
}

/// Polls `condition` until it holds, for conditions no signal announces (the server's side of
/// a TCP close). Panics after `within`.
async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn opens_n_connections_and_spreads_calls_by_load() {
    let backend = Backend::start().await.unwrap();
    backend.set_latency(Duration::from_millis(200));
    let pool = make_pool(&backend, PoolConfig::builder().size(4))
        .await
        .unwrap();
    let stats = pool.stats();
    assert_eq!(
        (stats.open, stats.connects, stats.idle),
        (4, 4, 4),
        "{stats:?}"
    );

    // All 40 are in flight together, so least-loaded routing gives each connection 10.
    let tally = concurrent_calls(&pool, 40).await;
    assert_eq!(tally.len(), 4, "{tally:?}");
    assert!(tally.values().all(|n| *n == 10), "{tally:?}");
    assert_eq!(backend.connections_accepted(), 4);
    assert_eq!(backend.open_connections(), 4);
    assert_eq!(pool.stats().in_flight, vec![0; 4]);
}

#[tokio::test]
async fn grows_when_every_connection_is_at_its_stream_limit() {
    let backend = Backend::builder()
        .max_concurrent_streams(2)
        .start()
        .await
        .unwrap();
    backend.set_latency(Duration::from_millis(300));
    let config = PoolConfig::builder()
        .min_connections(1)
        .max_connections(4)
        .max_streams_per_connection(2);
    let pool = make_pool(&backend, config).await.unwrap();
    assert_eq!(pool.stats().open, 1);

    let tally = concurrent_calls(&pool, 8).await;
    // Four connections, two streams each: never more than the server allows on one.
    assert_eq!(tally.len(), 4, "{tally:?}");
    assert!(tally.values().all(|n| *n == 2), "{tally:?}");
    assert_eq!(backend.connections_accepted(), 4);
    let stats = pool.stats();
    assert_eq!(
        (stats.open, stats.connects, stats.failures),
        (4, 4, 0),
        "{stats:?}"
    );

    // At max_connections the pool does not grow further: the overflow shares the four.
    let tally = concurrent_calls(&pool, 12).await;
    assert_eq!(tally.values().sum::<usize>(), 12);
    assert_eq!(backend.connections_accepted(), 4);
}

#[tokio::test]
async fn idle_connections_above_min_are_reaped() {
    let backend = Backend::start().await.unwrap();
    backend.set_latency(Duration::from_millis(200));
    let config = PoolConfig::builder()
        .min_connections(1)
        .max_connections(3)
        .max_streams_per_connection(1)
        .idle_timeout(Duration::from_secs(30));
    let pool = make_pool(&backend, config).await.unwrap();
    let tally = concurrent_calls(&pool, 3).await;
    assert_eq!(tally.len(), 3, "{tally:?}");
    assert_eq!(pool.stats().open, 3);
    eventually("three server connections", Duration::from_secs(5), || {
        backend.open_connections() == 3
    })
    .await;
    // A client kept alive (its handle holds a view of all three connections) must not keep the
    // reaped ones open.
    backend.clear_faults();
    let mut kept = EchoClient::new(pool.clone());
    kept.unary(EchoRequest::default()).await.unwrap();

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(29)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(pool.stats().reaps, 0, "reaped before the idle timeout");
    assert_eq!(pool.stats().open, 3);

    tokio::time::advance(Duration::from_secs(2)).await;
    for _ in 0..100 {
        if pool.stats().reaps == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let stats = pool.stats();
    assert_eq!((stats.reaps, stats.open), (2, 1), "{stats:?}");
    tokio::time::resume();

    // The reaped connections are really closed; min_connections stays open and working.
    eventually(
        "the server to see two closes",
        Duration::from_secs(5),
        || backend.open_connections() == 1,
    )
    .await;
    call(&pool).await.unwrap();
    kept.unary(EchoRequest::default()).await.unwrap();
    assert_eq!(backend.connections_accepted(), 3);
}

#[tokio::test]
async fn a_restarted_backend_is_reconnected_with_backoff_and_no_call_hangs() {
    let backend = Backend::start().await.unwrap();
    let config = PoolConfig::builder()
        .size(1)
        .backoff(quick_backoff(100, 400))
        .wait_timeout(Duration::from_secs(1));
    let pool = make_pool(&backend, config).await.unwrap();
    call(&pool).await.unwrap();

    // A call in flight when the server dies fails at once with UNAVAILABLE.
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut request = tonic::Request::new(EchoRequest::default());
            request
                .metadata_mut()
                .insert(LATENCY_HEADER, "10000".parse().unwrap());
            EchoClient::new(pool).unary(request).await
        })
    };
    eventually("the slow call to arrive", Duration::from_secs(5), || {
        backend.calls() == 2
    })
    .await;
    let down = Instant::now();
    backend.stop().await;
    let status = timeout(Duration::from_secs(2), slow)
        .await
        .expect("the in-flight call does not hang")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(pool.stats().open, 0, "a broken connection leaves at once");

    // While the backend is down, calls wait at most wait_timeout, then fail with a clear status.
    for _ in 0..2 {
        let started = Instant::now();
        let status = timeout(Duration::from_secs(3), call(&pool))
            .await
            .expect("a call while down does not hang")
            .unwrap_err();
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let message = status.message();
        assert!(
            message.starts_with(&format!("no connection to {}", backend.uri())),
            "{message}"
        );
        assert!(
            message.contains("retrying in") || message.contains("connecting"),
            "{message}"
        );
        assert!(towline::status::is_unprocessed(&status), "{status:?}");
    }

    // Backoff, not a tight loop: 100 ms growing ×1.6 to 400 ms is a handful of attempts in ~2 s.
    let stats = pool.stats();
    let elapsed = down.elapsed().as_secs_f64();
    assert!(
        (3..=(elapsed / 0.08) as u64 + 2).contains(&stats.failures),
        "{} failed attempts in {elapsed:.2}s: {stats:?}",
        stats.failures
    );
    assert!(stats.failures <= 12, "{stats:?}");
    assert_eq!(stats.disconnections, 1);

    backend.restart().await.unwrap();
    // The next call waits for the reconnect (at most one backoff, ≤ 480 ms) and succeeds.
    timeout(Duration::from_secs(3), call(&pool))
        .await
        .expect("no hang")
        .expect("reconnected");
    assert_eq!(backend.connections_accepted(), 2, "one new connection");
    let stats = pool.stats();
    assert_eq!((stats.open, stats.connects), (1, 2), "{stats:?}");
}

#[tokio::test]
async fn poll_ready_is_pending_without_a_connection_and_wakes_when_one_is_up() {
    let backend = Backend::start().await.unwrap();
    backend.stop().await;
    let config = PoolConfig::builder()
        .lazy(true)
        .size(1)
        .backoff(quick_backoff(50, 200))
        .wait_timeout(Duration::from_secs(30));
    let mut pool = make_pool(&backend, config).await.unwrap();
    let observer = pool.clone();
    {
        let mut ready = ServiceExt::<http::Request<Body>>::ready(&mut pool);
        assert!(futures::poll!(&mut ready).is_pending());
        // The wait started a connect, which fails: still pending, retrying with backoff.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while observer.stats().failures == 0 {
            assert!(std::time::Instant::now() < deadline, "no connect attempt");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(futures::poll!(&mut ready).is_pending());
        backend.restart().await.unwrap();
        timeout(Duration::from_secs(5), ready)
            .await
            .expect("woken once a connection is up")
            .unwrap();
    }
    // Ready means a connection is reserved: the call goes through.
    let response = pool.call(http::Request::new(Body::empty())).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert!(pool.stats().failures >= 1);
    assert_eq!(backend.connections_accepted(), 1);
}

#[tokio::test]
async fn lazy_pools_connect_on_the_first_call_and_eager_ones_fail_on_a_dead_target() {
    let backend = Backend::start().await.unwrap();
    let lazy = make_pool(&backend, PoolConfig::builder().lazy(true).size(2))
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let stats = lazy.stats();
    assert_eq!((stats.open, stats.connecting), (0, 0), "{stats:?}");
    assert_eq!(backend.connections_accepted(), 0);
    call(&lazy).await.unwrap();
    assert!(backend.connections_accepted() >= 1);

    backend.stop().await;
    let err = make_pool(&backend, PoolConfig::builder().size(2))
        .await
        .unwrap_err();
    let status = err.downcast::<tonic::Status>().expect("a Status");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("no connection to"), "{status:?}");
}

#[tokio::test]
async fn bad_config_fails_when_built_naming_the_field() {
    let err = PoolConfig::builder().size(0).build().unwrap_err();
    assert_eq!(err.field(), "pool.max_connections");
    let err = PoolConfig::builder()
        .min_connections(3)
        .max_connections(2)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "pool.min_connections");
    assert!(err.to_string().contains("min_connections"), "{err}");
    let err = PoolConfig::builder()
        .connect_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "pool.connect_timeout");
}

/// tonic's lazy `Channel` "connects" at once and fails only on its first call (tonic #643). The
/// pool must not take that for a working connection and reconnect in a loop: a connection that
/// breaks before it completed a call counts as a failed attempt and is backed off.
#[tokio::test]
async fn a_lazy_connector_against_a_dead_target_is_backed_off_not_looped() {
    let backend = Backend::start().await.unwrap();
    backend.stop().await;
    let config = PoolConfig::builder()
        .size(1)
        .lazy(true)
        .backoff(quick_backoff(100, 400))
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let pool: Pool<Channel> = ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(Connect::new().lazy())
        .oneshot(backend.uri())
        .await
        .unwrap();

    // Four callers hammer the pool for 1.5 s; every call fails fast with UNAVAILABLE.
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut calls = 0;
                while started.elapsed() < Duration::from_millis(1500) && calls < 500 {
                    let status = timeout(Duration::from_secs(2), call(&pool))
                        .await
                        .expect("no call hangs")
                        .unwrap_err();
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for worker in workers {
        calls += worker.await.unwrap();
    }
    let stats = pool.stats();
    // 100 ms ×1.6 up to 400 ms: about six attempts in 1.5 s. A reconnect per failed call would
    // be one per call.
    assert!(calls >= 8, "{calls} calls");
    assert!(stats.connects <= 10, "{calls} calls, {stats:?}");
    assert_eq!(stats.failures, stats.connects, "{stats:?}");

    backend.restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // The channel the pool holds may be one made before the restart; the first call through it
    // tells. Each try is bounded by wait_timeout, so this loop ends.
    loop {
        match timeout(Duration::from_secs(2), call(&pool))
            .await
            .expect("no hang")
        {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "never reconnected");
    }
}

/// A connector whose connections never come up.
#[derive(Clone)]
struct NeverConnects;

impl Service<http::Uri> for NeverConnects {
    type Response = Channel;
    type Error = towline::BoxError;
    type Future = futures::future::Pending<Result<Channel, towline::BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        futures::future::pending()
    }
}

/// A connector that has failed for good.
#[derive(Clone)]
struct OutOfOrder;

impl Service<http::Uri> for OutOfOrder {
    type Response = Channel;
    type Error = towline::BoxError;
    type Future = futures::future::Pending<Result<Channel, towline::BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Err("connector out of order".into()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        futures::future::pending()
    }
}

#[tokio::test]
async fn a_connect_that_hangs_times_out_and_the_call_says_so() {
    let config = PoolConfig::builder()
        .lazy(true)
        .connect_timeout(Duration::from_millis(100))
        .wait_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let pool = ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(NeverConnects)
        .oneshot("http://127.0.0.1:9".parse().unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let status = timeout(Duration::from_secs(3), call(&pool))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("connect timed out after 100ms"),
        "{status:?}"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.failures, stats.connects, stats.open),
        (1, 0, 0),
        "{stats:?}"
    );
    assert!(stats.retry_in.is_some(), "backing off after the timeout");
}

/// Under a balancer, `poll_ready` is the readiness signal: an error means this endpoint's pool
/// is dead for good, which is what a failed connector means.
#[tokio::test]
async fn a_failed_connector_fails_poll_ready_for_good() {
    let config = PoolConfig::builder().lazy(true).build().unwrap();
    let mut pool = ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(OutOfOrder)
        .oneshot("http://127.0.0.1:9".parse().unwrap())
        .await
        .unwrap();
    for _ in 0..2 {
        let err = timeout(
            Duration::from_secs(3),
            ServiceExt::<http::Request<Body>>::ready(&mut pool),
        )
        .await
        .expect("no hang")
        .unwrap_err();
        let status = err.downcast::<tonic::Status>().expect("a Status");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("connector failed"), "{status:?}");
    }
}

/// Under `BalanceLayer` each endpoint gets its own pool: the balancer's `MakeService` is the
/// pool layer over the connector.
#[tokio::test]
async fn composes_under_the_balancer_one_pool_per_endpoint() {
    use towline::balance::{BalanceConfig, BalanceLayer};
    use towline::discover::Static;

    let backends = Backend::start_many(2).await.unwrap();
    for backend in &backends {
        backend.set_latency(Duration::from_millis(100));
    }
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(|b| b.uri())),
            BalanceConfig::builder().build().unwrap(),
        ))
        .layer(PoolLayer::new(
            PoolConfig::builder().size(2).build().unwrap(),
        ))
        .service(Connect::new());
    let client = EchoClient::new(balance);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.unary(EchoRequest::default()).await })
        })
        .collect();
    for call in calls {
        timeout(Duration::from_secs(10), call)
            .await
            .expect("no hang")
            .unwrap()
            .expect("the call succeeds");
    }
    for backend in &backends {
        assert!(backend.calls() > 0, "{} got no calls", backend.id());
        assert_eq!(backend.connections_accepted(), 2, "{}", backend.id());
    }
}

#[tokio::test]
async fn an_idle_timeout_of_duration_max_means_never_not_a_panic() {
    let backend = Backend::start().await.unwrap();
    let config = PoolConfig::builder()
        .min_connections(0)
        .max_connections(2)
        .idle_timeout(Duration::MAX)
        .backoff(quick_backoff(50, 200))
        .wait_timeout(Duration::from_secs(5));
    let pool = make_pool(&backend, config).await.unwrap();
    call(&pool).await.unwrap();
    // The background task planned a reap (at "never") after that call; it must still be alive to
    // replace the connection once it breaks.
    backend.stop().await;
    let _ = call(&pool).await;
    backend.restart().await.unwrap();
    call(&pool).await.unwrap();
}

/// A connector whose first connection comes up and whose later ones never do.
#[derive(Clone, Default)]
struct ConnectsOnce {
    made: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Service<http::Uri> for ConnectsOnce {
    type Response = Channel;
    type Error = towline::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Channel, towline::BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        use futures::FutureExt as _;
        if self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Connect::new()
                .oneshot(uri)
                .map(|r| r.map_err(Into::into))
                .boxed()
        } else {
            futures::future::pending().boxed()
        }
    }
}

/// Issue 16 §3: a caller parked because every stream is taken (and another connection is on
/// its way) proceeds as soon as a stream ends, not only when the connect finishes.
#[tokio::test]
async fn a_caller_waiting_for_a_stream_proceeds_when_one_ends() {
    let backend = Backend::start().await.unwrap();
    backend.set_latency(Duration::from_millis(300));
    let connector = ConnectsOnce::default();
    let config = PoolConfig::builder()
        .min_connections(1)
        .max_connections(2)
        .max_streams_per_connection(1)
        // Far beyond the test's bound: the waiter must not get through by timing out.
        .connect_timeout(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let pool = ServiceBuilder::new()
        .layer(PoolLayer::new(config))
        .service(connector.clone())
        .oneshot(backend.uri())
        .await
        .unwrap();
    let started = Instant::now();
    let first = tokio::spawn({
        let pool = pool.clone();
        async move { call(&pool).await }
    });
    eventually("the first call in flight", Duration::from_secs(5), || {
        pool.stats().in_flight == [1]
    })
    .await;
    // The one stream is taken: this caller parks while a second connection is being opened
    // (and that connect never finishes).
    let second = tokio::spawn({
        let pool = pool.clone();
        async move { call(&pool).await }
    });
    let first = timeout(Duration::from_secs(3), first)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap();
    let second = timeout(Duration::from_secs(3), second)
        .await
        .expect("the parked caller proceeds when the first call's stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(first, second, "both on the one connection");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "the second call waited for the first: {:?}",
        started.elapsed()
    );
    assert_eq!(backend.connections_accepted(), 1);
    let stats = pool.stats();
    assert_eq!((stats.open, stats.connecting), (1, 1), "{stats:?}");
    assert_eq!(
        connector.made.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the pool did try to grow"
    );
}

/// Issue 16 §5, in miniature: a server allowing 10 streams per connection, 50 calls of 20 ms
/// kept in flight, through clones made per call of a handle that never calls itself (a tonic
/// client's usual shape). A pool that starts with one connection grows to the 6 the load needs
/// (5 full ones, then one more while every one is at 90 %), not to its maximum of 8, spreads
/// the calls over all 6, and no call fails (a stream over the server's limit would be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grows_to_what_the_load_needs_and_spreads_it() {
    const STREAMS: u32 = 10;
    const IN_FLIGHT: usize = 50;
    const CALLS: u64 = 1_500;
    let backend = Backend::builder()
        .max_concurrent_streams(STREAMS)
        .start()
        .await
        .unwrap();
    backend.set_latency(Duration::from_millis(20));
    let config = PoolConfig::builder()
        .min_connections(1)
        .max_connections(8)
        .max_streams_per_connection(STREAMS as usize);
    let pool = make_pool(&backend, config).await.unwrap();
    let report = towline::testkit::Load::new(IN_FLIGHT)
        .calls(CALLS)
        .duration(Duration::from_secs(20))
        .run({
            let pool = pool.clone();
            move |_| {
                let pool = pool.clone();
                async move { call(&pool).await }
            }
        })
        .await;
    assert_eq!(report.failed(), 0, "{:?}", report.failures());
    assert_eq!(report.calls(), CALLS, "all made within the time bound");
    let stats = pool.stats();
    assert_eq!((stats.open, stats.connects), (6, 6), "{stats:?}");
    let tally = report.tally();
    assert_eq!(tally.len(), 6, "{tally:?}");
    // An even share is 250; the first connection carries more while the pool grows.
    assert!(tally.values().all(|&n| n >= 150), "{tally:?}");
}
