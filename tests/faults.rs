//! Real network faults under the stack: each backend in its own network namespace, then one is
//! blackholed, has its link taken down, or is partitioned off, while load runs.
//!
//! Every test asserts that the balancer stops routing to the broken backend within the
//! configured detection time, that no call waits past its deadline, and that the backend gets
//! traffic again once the network heals.
//!
//! Needs root and iproute2 (`.ci/run` has both). Without them each test prints a loud notice and
//! returns; with `CI=true` it fails instead.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::{Instant, timeout};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{
    Balance, BalanceConfig, BalanceLayer, EndpointService, EndpointState, RoundRobin,
};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::status::status_from_error;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, ECHO_SERVICE, Load, NetNs, require_netns};

mod support;
use support::BalanceView;

/// The stack under test, whatever the balancer's endpoints are.
type Client = EchoClient<BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>>;

const BACKENDS: usize = 4;
/// Every call's deadline, sent as `grpc-timeout`.
const DEADLINE: Duration = Duration::from_millis(800);
/// How late a call may end after its deadline: timer resolution and a busy 2-core machine.
const DEADLINE_SLACK: Duration = Duration::from_millis(100);
/// HTTP/2 keepalive: a PING every interval, the connection is dead if unanswered within timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(200);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(300);
/// The active health check used when keepalive is off: `fall` failed checks, each cut at timeout.
const CHECK_INTERVAL: Duration = Duration::from_millis(150);
const CHECK_TIMEOUT: Duration = Duration::from_millis(200);
const CHECK_FALL: u32 = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Added to a configured detection time for scheduling on a loaded 2-core machine.
const DETECTION_SLACK: Duration = Duration::from_millis(700);

#[derive(Debug, Clone, Copy)]
enum Fault {
    Blackhole,
    LinkDown,
    Partition,
}

/// What the balancer's endpoints are.
#[derive(Debug, Clone, Copy)]
enum Endpoints {
    /// One tonic `Channel` per backend.
    Channel,
    /// A `PoolLayer` of connections per backend.
    Pool,
}

#[derive(Debug, Clone, Copy)]
enum Detection {
    /// HTTP/2 keepalive on every connection, health by `Watch` (silent under a blackhole).
    Keepalive,
    /// No keepalive; a periodic `Health/Check` with a timeout.
    HealthCheckTimeout,
}

impl Detection {
    /// The longest the stack is configured to take to notice a silent backend.
    fn time(self) -> Duration {
        match self {
            Detection::Keepalive => KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT,
            Detection::HealthCheckTimeout => {
                // A check may have just passed: wait one interval, then `fall` checks that each
                // time out, with ±10 % jitter on the intervals.
                CHECK_INTERVAL.mul_f64(1.1) * CHECK_FALL + CHECK_TIMEOUT * CHECK_FALL
            }
        }
    }
}

/// Four backends, each in its own namespace, behind retry over a health-gated round-robin
/// balancer. Round robin because it keeps offering the broken backend its share until the
/// balancer gates it: the test sees the gating, not a strategy steering away from slowness.
struct Fixture {
    // Declared before the namespaces so they close before the links go.
    client: Client,
    balance: Arc<dyn BalanceView>,
    backends: Vec<Backend>,
    namespaces: Vec<NetNs>,
}

impl Fixture {
    async fn start(detection: Detection, endpoints: Endpoints) -> Fixture {
        let namespaces: Vec<NetNs> = (0..BACKENDS)
            .map(|_| NetNs::create().expect("create a network namespace"))
            .collect();
        let mut backends = Vec::new();
        for (i, ns) in namespaces.iter().enumerate() {
            let backend = Backend::builder()
                .id(format!("backend-{i}"))
                .netns(ns)
                .start()
                .await
                .expect("start a backend inside its namespace");
            backends.push(backend);
        }
        let connect = Connect::new().configure(move |endpoint| {
            let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
            match detection {
                Detection::Keepalive => endpoint
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true),
                Detection::HealthCheckTimeout => endpoint,
            }
        });
        let health = match detection {
            Detection::Keepalive => HealthCheck::watch(ECHO_SERVICE),
            Detection::HealthCheckTimeout => HealthCheck::check(ECHO_SERVICE)
                .interval(CHECK_INTERVAL)
                .timeout(CHECK_TIMEOUT)
                .rise(1)
                .fall(CHECK_FALL),
        };
        let config = BalanceConfig::builder()
            .strategy(RoundRobin::new())
            .health_check(health)
            .outlier_detection(None)
            .reconnect_backoff(
                Backoff::new(
                    Jitter::Grpc,
                    Duration::from_millis(100),
                    Duration::from_millis(500),
                    1.6,
                )
                .unwrap(),
            )
            .build()
            .unwrap();
        let discovery = Static::new(backends.iter().map(Backend::uri));
        let balance_layer = BalanceLayer::new(discovery, config);
        let (client, balance) = match endpoints {
            Endpoints::Channel => {
                erase(ServiceBuilder::new().layer(balance_layer).service(connect))
            }
            // The tour's stack: two HTTP/2 connections per endpoint, each with the keepalive.
            Endpoints::Pool => {
                let mut pool = PoolConfig::builder()
                    .size(2)
                    .connect_timeout(CONNECT_TIMEOUT)
                    .wait_timeout(Duration::from_secs(10));
                if let Detection::Keepalive = detection {
                    pool = pool
                        .keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
                        .keepalive_while_idle(true);
                }
                let pool = pool.build().unwrap();
                erase(
                    ServiceBuilder::new()
                        .layer(balance_layer)
                        .layer(PoolLayer::new(pool.clone()))
                        .service(pool.connector()),
                )
            }
        };
        let fixture = Fixture {
            client,
            balance,
            backends,
            namespaces,
        };
        fixture
            .wait_for_state("every endpoint ready", |ready| ready == BACKENDS)
            .await;
        fixture
    }

    /// Waits (at most 10 s) until the number of ready endpoints satisfies `done`; returns when.
    async fn wait_for_state(
        &self,
        what: &str,
        done: impl Fn(usize) -> bool + Send + Sync,
    ) -> Instant {
        timeout(
            Duration::from_secs(10),
            self.balance.wait_until(Box::new(|snapshot| {
                done(
                    snapshot
                        .iter()
                        .filter(|e| e.state == EndpointState::Ready)
                        .count(),
                )
            })),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}: {:#?}",
                self.balance.snapshot()
            )
        });
        Instant::now()
    }

    /// Waits until the endpoint of `backend` is in a state other than ready; returns when.
    async fn wait_until_not_ready(&self, backend: usize, limit: Duration) -> Option<Instant> {
        let uri = self.backends[backend].uri();
        timeout(
            limit,
            self.balance.wait_until(Box::new(|snapshot| {
                snapshot
                    .iter()
                    .any(|e| e.uri == uri && e.state != EndpointState::Ready)
            })),
        )
        .await
        .ok()
        .map(|()| Instant::now())
    }

    fn inject(&self, backend: usize, fault: Fault) {
        let ns = &self.namespaces[backend];
        match fault {
            Fault::Blackhole => ns.blackhole(),
            Fault::LinkDown => ns.link_down(),
            Fault::Partition => ns.partition(),
        }
        .expect("inject the fault");
    }
}

/// Retry over `balance`, as a client of one type, and a view of the balancer.
fn erase<S: EndpointService>(balance: Balance<S>) -> (Client, Arc<dyn BalanceView>) {
    let retry = RetryLayer::new(
        RetryPolicy::builder()
            .initial_backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(50))
            .build()
            .unwrap(),
    );
    let stack = ServiceBuilder::new()
        // A concrete error type: a boxed one trips rustc's higher-ranked `Send` checks in `drive`.
        .map_err(status_from_error)
        .map_response(|response: http::Response<_>| response.map(Body::new))
        .layer(retry)
        .service(balance.clone());
    (
        EchoClient::new(BoxCloneSyncService::new(stack)),
        Arc::new(balance),
    )
}

/// One call as the caller saw it.
#[derive(Debug, Clone)]
struct Call {
    started: Instant,
    latency: Duration,
    outcome: Result<String, Code>,
}

/// Drives `concurrency` callers through `client` for `duration` (and at most `max_calls`),
/// recording every call.
async fn drive(
    client: &Client,
    concurrency: usize,
    duration: Duration,
    max_calls: u64,
) -> Vec<Call> {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let record = calls.clone();
    let client = client.clone();
    Load::new(concurrency)
        .calls(max_calls)
        .duration(duration)
        .run(move |_| {
            let mut client = client.clone();
            let record = record.clone();
            async move {
                let mut request = tonic::Request::new(EchoRequest::default());
                request.set_timeout(DEADLINE);
                let started = Instant::now();
                let outcome = client
                    .unary(request)
                    .await
                    .map(|response| response.into_inner().backend)
                    .map_err(|status| status.code());
                let call = Call {
                    started,
                    latency: started.elapsed(),
                    outcome: outcome.clone(),
                };
                record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(call);
                outcome.map_err(|code| tonic::Status::new(code, "recorded"))
            }
        })
        .await;
    std::mem::take(&mut *calls.lock().unwrap_or_else(PoisonError::into_inner))
}

fn assert_no_call_past_its_deadline(calls: &[Call]) {
    let slowest = calls.iter().max_by_key(|c| c.latency).expect("some calls");
    assert!(
        slowest.latency <= DEADLINE + DEADLINE_SLACK,
        "a call took {:?}, past its {DEADLINE:?} deadline: {slowest:?}",
        slowest.latency
    );
}

/// Breaks backend 0 with `fault` under load and checks detection, deadlines and recovery.
async fn routes_around(fault: Fault, detection: Detection, endpoints: Endpoints) {
    let fixture = Fixture::start(detection, endpoints).await;
    let broken = 0;
    let broken_id = fixture.backends[broken].id().to_string();
    let detection_limit = detection.time() + DETECTION_SLACK;

    // Load runs across the fault; the fault is injected while it runs.
    let load_time = Duration::from_secs(3);
    let load = drive(&fixture.client, 16, load_time, 200_000);
    let fault_and_detect = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let injected = Instant::now();
        fixture.inject(broken, fault);
        let detected = fixture.wait_until_not_ready(broken, detection_limit).await;
        (injected, detected, fixture.backends[broken].calls())
    };
    let (calls, (injected, detected, arrivals_at_detection)) = tokio::join!(load, fault_and_detect);

    let detected = detected.unwrap_or_else(|| {
        panic!(
            "{fault:?}: backend {broken} still ready {detection_limit:?} after the fault \
             (configured detection time {:?}): {:#?}",
            detection.time(),
            fixture.balance.snapshot()
        )
    });
    let detection_took = detected - injected;
    eprintln!(
        "{fault:?} with {detection:?}: routed around after {detection_took:?} \
         (configured {:?}); {} calls, {} failed",
        detection.time(),
        calls.len(),
        calls.iter().filter(|c| c.outcome.is_err()).count()
    );

    assert_no_call_past_its_deadline(&calls);

    // Every call that ended before the fault succeeded, and the broken backend had its share.
    // (Calls on the wire when it struck may fail, but only within their deadline.)
    let before: Vec<&Call> = calls
        .iter()
        .filter(|c| c.started + c.latency < injected)
        .collect();
    let failed_before: Vec<_> = before.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(
        failed_before.is_empty(),
        "{} calls failed before the fault, e.g. {:?} ({:?} before the fault); endpoints now: {:#?}",
        failed_before.len(),
        failed_before.first(),
        failed_before.first().map(|c| injected - c.started),
        fixture.balance.snapshot()
    );
    assert!(
        before
            .iter()
            .any(|c| c.outcome.as_deref() == Ok(broken_id.as_str())),
        "backend {broken} got no calls before the fault"
    );

    // Once the balancer has gated it, every call succeeds on the others.
    let after: Vec<&Call> = calls.iter().filter(|c| c.started >= detected).collect();
    assert!(
        after.len() > 100,
        "too few calls after detection: {}",
        after.len()
    );
    let failures: Vec<_> = after.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} calls failed after the balancer gated backend {broken}, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        after
            .iter()
            .all(|c| c.outcome.as_deref() != Ok(broken_id.as_str())),
        "a call started after detection was served by the broken backend"
    );
    // Nothing even reaches it: the balancer no longer sends it calls (under a blackhole the
    // requests would still arrive, only the replies would be lost).
    assert_eq!(
        fixture.backends[broken].calls(),
        arrivals_at_detection,
        "calls still reached backend {broken} after it was gated"
    );

    // Heal the network: the backend reconnects and gets its share again.
    fixture.namespaces[broken].heal().expect("heal the network");
    let healed = Instant::now();
    fixture
        .wait_for_state("the healed backend ready again", |ready| ready == BACKENDS)
        .await;
    eprintln!(
        "{fault:?}: ready again {:?} after healing",
        healed.elapsed()
    );
    let calls = drive(&fixture.client, 8, Duration::from_secs(1), 400).await;
    assert!(
        calls.iter().all(|c| c.outcome.is_ok()),
        "a call failed after healing"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.outcome.as_deref() == Ok(broken_id.as_str())),
        "the healed backend got no calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_backend_is_routed_around_by_keepalive() {
    if require_netns("blackholed_backend_is_routed_around_by_keepalive") {
        routes_around(Fault::Blackhole, Detection::Keepalive, Endpoints::Channel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_backend_is_routed_around_by_health_check_timeouts() {
    if require_netns("blackholed_backend_is_routed_around_by_health_check_timeouts") {
        routes_around(
            Fault::Blackhole,
            Detection::HealthCheckTimeout,
            Endpoints::Channel,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_backend_behind_pools_is_routed_around() {
    if require_netns("blackholed_backend_behind_pools_is_routed_around") {
        routes_around(Fault::Blackhole, Detection::Keepalive, Endpoints::Pool).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_whose_link_goes_down_is_routed_around() {
    if require_netns("backend_whose_link_goes_down_is_routed_around") {
        routes_around(Fault::LinkDown, Detection::Keepalive, Endpoints::Channel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_backend_is_routed_around() {
    if require_netns("partitioned_backend_is_routed_around") {
        routes_around(Fault::Partition, Detection::Keepalive, Endpoints::Channel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_partitioned_fails_each_call_by_its_deadline() {
    if !require_netns("every_backend_partitioned_fails_each_call_by_its_deadline") {
        return;
    }
    let fixture = Fixture::start(Detection::Keepalive, Endpoints::Pool).await;
    for backend in 0..BACKENDS {
        fixture.inject(backend, Fault::Partition);
    }
    let calls = drive(&fixture.client, 16, Duration::from_secs(2), 100_000).await;
    assert!(!calls.is_empty());
    assert_no_call_past_its_deadline(&calls);
    let unexpected: Vec<_> = calls
        .iter()
        .filter(|c| !matches!(c.outcome, Err(Code::DeadlineExceeded | Code::Unavailable)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} calls ended other than DEADLINE_EXCEEDED or UNAVAILABLE, e.g. {:?}",
        unexpected.len(),
        unexpected.first()
    );

    // The status says why: no endpoint could take the call.
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(DEADLINE);
    let status = fixture.client.clone().unary(request).await.unwrap_err();
    eprintln!("with every backend partitioned: {status:?}");
    assert!(status.message().contains("towline"), "{status:?}");

    for ns in &fixture.namespaces {
        ns.heal().expect("heal the network");
    }
    fixture
        .wait_for_state("every endpoint ready after healing", |ready| {
            ready == BACKENDS
        })
        .await;
    let calls = drive(&fixture.client, 8, Duration::from_secs(1), 400).await;
    assert!(
        calls.iter().all(|c| c.outcome.is_ok()),
        "a call failed after healing"
    );
}
