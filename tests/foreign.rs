//! The stack against servers we did not write: grpc-core (Python `grpcio`) and grpc-js, started
//! as child processes on loopback (`towline::testkit::Peer`), next to towline's own testkit
//! backend where the behaviour is not specific to one implementation.
//!
//! Every test runs the **default** configuration a user runs (`BalanceConfig::default()` with no
//! health check, `PoolConfig::default()`, `RetryPolicy::default()`) unless it names what it
//! tunes, and asserts on what the caller sees: failed calls, calls that outlived their deadline,
//! and how long the balancer kept routing to a server that was gone.
//!
//! The peers are installed by `tests/peers/install.sh` (`.ci/run` runs it). Without them each
//! test prints a loud `FOREIGN SERVER TEST NOT RUN` notice and runs only its testkit part; with
//! `CI=true` it fails instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Uri;
use tokio::time::{Instant, sleep, timeout};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use towline::balance::{BalanceConfig, BalanceLayer, EndpointSnapshot, EndpointState};
use towline::discover::{self, Change, Static};
use towline::health::HealthCheck;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::status::status_from_error;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, LATENCY_HEADER, Load, Peer, PeerKind, require_peer};

mod support;
use support::BalanceView;

type Client = EchoClient<BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>>;

/// Every load call's deadline, sent as `grpc-timeout`.
const DEADLINE: Duration = Duration::from_secs(2);
/// How late a call may end after its deadline: timers and a busy 2-core machine.
const DEADLINE_SLACK: Duration = Duration::from_millis(150);
/// The bound: a server whose connections are gone leaves rotation within this.
const ROUTED_AROUND_WITHIN: Duration = Duration::from_secs(1);

/// The tests in this file start child processes and measure time: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Which server implementation a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// towline's in-process testkit backend (hyper + h2 + tonic).
    Testkit,
    Peer(PeerKind),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Testkit => f.write_str("testkit"),
            Kind::Peer(kind) => write!(f, "{kind}"),
        }
    }
}

/// The kinds a test runs against: the testkit (if `with_testkit`) and every installed peer.
fn kinds(test: &str, with_testkit: bool) -> Vec<Kind> {
    let mut kinds = Vec::new();
    if with_testkit {
        kinds.push(Kind::Testkit);
    }
    for kind in PeerKind::ALL {
        if require_peer(kind, test) {
            kinds.push(Kind::Peer(kind));
        }
    }
    kinds
}

/// How a test wants its servers started.
#[derive(Debug, Clone, Default)]
struct Options {
    without_health_service: bool,
    max_connection_age: Option<Duration>,
    max_concurrent_streams: Option<u32>,
}

/// One server of either kind.
enum Server {
    Testkit(Backend),
    Peer(Peer),
}

impl Server {
    async fn start(kind: Kind, id: String, options: &Options) -> Server {
        match kind {
            Kind::Testkit => {
                let mut builder = Backend::builder().id(id);
                if options.without_health_service {
                    builder = builder.without_health_service();
                }
                if let Some(max) = options.max_concurrent_streams {
                    builder = builder.max_concurrent_streams(max);
                }
                assert!(
                    options.max_connection_age.is_none(),
                    "the testkit has no max connection age"
                );
                Server::Testkit(builder.start().await.expect("start a testkit backend"))
            }
            Kind::Peer(kind) => {
                let mut builder = Peer::builder(kind).id(id);
                if options.without_health_service {
                    builder = builder.without_health_service();
                }
                if let Some(max) = options.max_concurrent_streams {
                    builder = builder.max_concurrent_streams(max);
                }
                if let Some(age) = options.max_connection_age {
                    builder = builder
                        .max_connection_age(age)
                        .max_connection_age_grace(Duration::from_secs(1));
                }
                Server::Peer(builder.start().await.expect("start a foreign server"))
            }
        }
    }

    async fn start_many(kind: Kind, n: usize, options: &Options) -> Vec<Server> {
        let mut servers = Vec::new();
        for i in 0..n {
            servers.push(Server::start(kind, format!("{kind}-{i}"), options).await);
        }
        servers
    }

    fn uri(&self) -> Uri {
        match self {
            Server::Testkit(backend) => backend.uri(),
            Server::Peer(peer) => peer.uri(),
        }
    }

    fn id(&self) -> String {
        match self {
            Server::Testkit(backend) => backend.id().to_owned(),
            Server::Peer(peer) => peer.id().to_owned(),
        }
    }

    /// Gone at once, as a crashed process: SIGKILL for a peer, listener and connections
    /// dropped for the testkit.
    async fn kill(&self) {
        match self {
            Server::Testkit(backend) => backend.stop().await,
            Server::Peer(peer) => peer.kill(),
        }
    }

    async fn set_latency(&self, latency: Duration) {
        match self {
            Server::Testkit(backend) => backend.set_latency(latency),
            Server::Peer(peer) => peer.set_latency(latency).await.expect("set latency"),
        }
    }

    /// `grpc.health.v1` says NOT_SERVING (for `""` and Echo) from now on.
    async fn set_not_serving(&self) {
        match self {
            Server::Testkit(backend) => {
                backend
                    .set_health(tonic_health::ServingStatus::NotServing)
                    .await
            }
            Server::Peer(peer) => peer.set_health("*", false).await.expect("set health"),
        }
    }

    fn peer(&self) -> &Peer {
        match self {
            Server::Peer(peer) => peer,
            Server::Testkit(_) => panic!("a peer-only test ran on the testkit"),
        }
    }
}

/// How the stack under test is built: always a balancer over a `PoolLayer` per endpoint.
#[derive(Debug, Clone, Default)]
struct Stack {
    /// `RetryLayer` with `RetryPolicy::default()` above the balancer.
    retry: bool,
    health_check: Option<HealthCheck>,
    pool: Option<PoolConfig>,
}

struct Fixture {
    client: Client,
    balance: Arc<dyn BalanceView>,
    servers: Vec<Server>,
}

impl Fixture {
    async fn start(kind: Kind, n: usize, options: &Options, stack: Stack) -> Fixture {
        let servers = Server::start_many(kind, n, options).await;
        let discovery = Static::new(servers.iter().map(Server::uri));
        let (client, balance) = build(discovery, stack);
        let fixture = Fixture {
            client,
            balance,
            servers,
        };
        fixture.wait_ready(n).await;
        fixture
    }

    async fn wait_ready(&self, n: usize) {
        timeout(
            Duration::from_secs(10),
            self.balance.wait_until(Box::new(move |snapshot| {
                snapshot
                    .iter()
                    .filter(|e| e.state == EndpointState::Ready)
                    .count()
                    == n
            })),
        )
        .await
        .unwrap_or_else(|_| panic!("endpoints not ready: {:#?}", self.balance.snapshot()));
    }

    fn state_of(&self, server: usize) -> Option<EndpointSnapshot> {
        let uri = self.servers[server].uri();
        self.balance.snapshot().into_iter().find(|e| e.uri == uri)
    }

    /// Resolves when the endpoint of `server` is not ready (not in rotation), with the time.
    async fn left_rotation(&self, server: usize) -> Instant {
        let uri = self.servers[server].uri();
        self.balance
            .wait_until(Box::new(move |snapshot| {
                snapshot
                    .iter()
                    .any(|e| e.uri == uri && e.state != EndpointState::Ready)
            }))
            .await;
        Instant::now()
    }
}

fn build<D: discover::Discover>(discovery: D, stack: Stack) -> (Client, Arc<dyn BalanceView>) {
    let pool = stack.pool.unwrap_or_default();
    let config = BalanceConfig::builder()
        .target("foreign")
        .health_check(stack.health_check)
        .build()
        .unwrap();
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(discovery, config))
        .layer(PoolLayer::new(pool.clone()))
        .service(pool.connector());
    let view: Arc<dyn BalanceView> = Arc::new(balance.clone());
    let client = if stack.retry {
        let stack = ServiceBuilder::new()
            .map_err(status_from_error)
            .map_response(|response: http::Response<_>| response.map(Body::new))
            .layer(RetryLayer::new(RetryPolicy::default()))
            .service(balance);
        EchoClient::new(BoxCloneSyncService::new(stack))
    } else {
        let stack = ServiceBuilder::new()
            .map_err(status_from_error)
            .map_response(|response: http::Response<_>| response.map(Body::new))
            .service(balance);
        EchoClient::new(BoxCloneSyncService::new(stack))
    };
    (client, view)
}

/// One call as the caller saw it.
#[derive(Debug, Clone)]
struct Call {
    started: Instant,
    ended: Instant,
    outcome: Result<String, Status>,
}

impl Call {
    fn latency(&self) -> Duration {
        self.ended - self.started
    }
}

/// Drives `concurrency` callers through `client` for `duration`, each call with `deadline` and,
/// if given, a per-call server latency; records every call.
async fn drive(
    client: &Client,
    concurrency: usize,
    duration: Duration,
    deadline: Duration,
    latency: Option<Duration>,
) -> Vec<Call> {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let record = calls.clone();
    let client = client.clone();
    Load::new(concurrency)
        .calls(200_000)
        .duration(duration)
        .run(move |_| {
            let mut client = client.clone();
            let record = record.clone();
            async move {
                let mut request = tonic::Request::new(EchoRequest::default());
                request.set_timeout(deadline);
                if let Some(latency) = latency {
                    request.metadata_mut().insert(
                        LATENCY_HEADER,
                        latency.as_millis().to_string().parse().unwrap(),
                    );
                }
                let started = Instant::now();
                let outcome = client
                    .unary(request)
                    .await
                    .map(|response| response.into_inner().backend);
                let call = Call {
                    started,
                    ended: Instant::now(),
                    outcome: outcome.clone(),
                };
                record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(call);
                outcome.map(|_| ())
            }
        })
        .await;
    Arc::try_unwrap(calls)
        .map(|calls| calls.into_inner().unwrap_or_else(PoisonError::into_inner))
        .unwrap_or_else(|calls| calls.lock().unwrap_or_else(PoisonError::into_inner).clone())
}

fn failures(calls: &[Call]) -> BTreeMap<String, usize> {
    let mut by_message = BTreeMap::new();
    for call in calls {
        if let Err(status) = &call.outcome {
            *by_message
                .entry(format!("{:?}: {}", status.code(), status.message()))
                .or_default() += 1;
        }
    }
    by_message
}

fn over_deadline(calls: &[Call], deadline: Duration) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| c.latency() > deadline + DEADLINE_SLACK)
        .collect()
}

/// Kills server 1 of 4 under load and returns the calls, when it was killed, and when its
/// endpoint left rotation.
async fn kill_under_load(fixture: &Fixture) -> (Vec<Call>, Instant, Option<Instant>) {
    let load = drive(
        &fixture.client,
        KILL_IN_FLIGHT,
        Duration::from_millis(2500),
        DEADLINE,
        None,
    );
    let fault = async {
        sleep(Duration::from_millis(700)).await;
        let killed = Instant::now();
        fixture.servers[1].kill().await;
        let left = timeout(Duration::from_secs(5), fixture.left_rotation(1))
            .await
            .ok();
        (killed, left)
    };
    let (calls, (killed, left)) = tokio::join!(load, fault);
    (calls, killed, left)
}

fn assert_routed_around(kind: Kind, fixture: &Fixture, killed: Instant, left: Option<Instant>) {
    let left = left.unwrap_or_else(|| {
        panic!(
            "{kind}: the killed server's endpoint never left rotation: {:#?}",
            fixture.state_of(1)
        )
    });
    let after = left - killed;
    eprintln!("{kind}: the killed server left rotation {after:?} after the kill");
    assert!(
        after < ROUTED_AROUND_WITHIN,
        "{kind}: left rotation only {after:?} after the kill"
    );
}

/// Issue 13, 2.1: the default `BalanceConfig` (no health check) over a default `PoolLayer`, with
/// a `RetryLayer`: a killed server leaves rotation within 1 s and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_rotation_and_with_retries_no_call_fails() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("a_killed_server_leaves_rotation", true) {
        let stack = Stack {
            retry: true,
            ..Stack::default()
        };
        let fixture = Fixture::start(kind, 4, &Options::default(), stack).await;
        let (calls, killed, left) = kill_under_load(&fixture).await;
        assert_routed_around(kind, &fixture, killed, left);
        assert_only_committed_calls_failed(kind, &calls);
        assert!(over_deadline(&calls, DEADLINE).is_empty(), "{kind}");
        let after_kill = calls.iter().filter(|c| c.started > killed).count();
        assert!(
            after_kill > 100,
            "{kind}: only {after_kill} calls after the kill"
        );
        // The endpoint says why it is out.
        let endpoint = fixture.state_of(1).unwrap();
        let reason = endpoint.reason.clone().unwrap_or_default();
        assert!(!reason.contains("code: '"), "{kind}: {reason}");
        assert!(reason.len() < 300, "{kind}: {reason}");
    }
}

/// Without a `RetryLayer` the calls in flight on the killed server fail, but fast, with
/// `UNAVAILABLE`; none waits out its deadline in a pool that has no connection left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retries_only_the_calls_in_flight_fail_and_none_waits_out_its_deadline() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("without_retries_only_the_calls_in_flight_fail", true) {
        let fixture = Fixture::start(kind, 4, &Options::default(), Stack::default()).await;
        let (calls, killed, left) = kill_under_load(&fixture).await;
        assert_routed_around(kind, &fixture, killed, left);
        let failed: Vec<&Call> = calls.iter().filter(|c| c.outcome.is_err()).collect();
        assert!(
            failed.len() <= 32,
            "{kind}: {} calls failed: {:#?}",
            failed.len(),
            failures(&calls)
        );
        for call in &failed {
            let status = call.outcome.as_ref().unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{kind}: {status:?}");
            assert!(
                call.latency() < Duration::from_millis(500),
                "{kind}: a failed call took {:?}: {status:?}",
                call.latency()
            );
        }
        assert!(over_deadline(&calls, DEADLINE).is_empty(), "{kind}");
    }
}

/// A server without `grpc.health.v1`: a configured `Watch` gets `UNIMPLEMENTED` and treats it as
/// healthy, and the endpoint is still gated on its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_without_a_health_service_leaves_rotation() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("a_killed_server_without_a_health_service", true) {
        let options = Options {
            without_health_service: true,
            ..Options::default()
        };
        let stack = Stack {
            retry: true,
            health_check: Some(HealthCheck::watch("")),
            ..Stack::default()
        };
        let fixture = Fixture::start(kind, 4, &options, stack).await;
        let (calls, killed, left) = kill_under_load(&fixture).await;
        assert_routed_around(kind, &fixture, killed, left);
        assert_only_committed_calls_failed(kind, &calls);
        assert!(over_deadline(&calls, DEADLINE).is_empty(), "{kind}");
    }
}

/// Calls in flight while a server is killed under load.
const KILL_IN_FLIGHT: usize = 16;

/// With retries, the only calls a kill may fail are those whose response had begun (gRFC A6:
/// committed, never replayed), cut mid-body: `UNAVAILABLE`, saying so. At most the calls in
/// flight at the kill; grpc-js sends response headers early, so several of those on the killed
/// server can be committed (up to 5 seen).
fn assert_only_committed_calls_failed(kind: Kind, calls: &[Call]) {
    let failed = failures(calls);
    let uncommitted: Vec<_> = failed
        .keys()
        .filter(|f| !f.contains("while reading the response"))
        .collect();
    assert!(uncommitted.is_empty(), "{kind}: {failed:#?}");
    let committed: usize = failed.values().sum();
    if committed > 0 {
        eprintln!("{kind}: {committed} calls cut mid-response by the kill: {failed:?}");
    }
    assert!(committed <= KILL_IN_FLIGHT, "{kind}: {failed:#?}");
}

/// Issue 13, 2.2: a server stopping with a grace period (GOAWAY, listener closed) drains: the
/// calls in flight finish, new calls go elsewhere at once, no call fails or stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_drains_without_a_failed_or_stalled_call() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("a_graceful_stop_drains", false) {
        let stack = Stack {
            retry: true,
            ..Stack::default()
        };
        let fixture = Fixture::start(kind, 4, &Options::default(), stack).await;
        // Calls take 200 ms on every server, so some are always in flight on the one stopping.
        let latency = Duration::from_millis(200);
        let load = drive(
            &fixture.client,
            16,
            Duration::from_millis(2500),
            DEADLINE,
            Some(latency),
        );
        let stop = async {
            sleep(Duration::from_millis(700)).await;
            let began = Instant::now();
            fixture.servers[0]
                .peer()
                .graceful_stop(Duration::from_secs(3))
                .await
                .expect("graceful stop");
            let left = timeout(Duration::from_secs(5), fixture.left_rotation(0))
                .await
                .ok();
            (began, left)
        };
        let (calls, (began, left)) = tokio::join!(load, stop);
        let left = left.unwrap_or_else(|| panic!("{kind}: the stopping server stayed in rotation"));
        eprintln!(
            "{kind}: left rotation {:?} after the stop began",
            left - began
        );
        assert!(left - began < ROUTED_AROUND_WITHIN, "{kind}");
        // grpcio's `server.stop` cancels, server-side, the calls that reach it in the instant
        // its shutdown begins, before its GOAWAY can reach us: `CANCELLED` from the server, not
        // a transport failure, and not retryable. Those alone are tolerated, and counted.
        let (cancelled_by_server, other): (Vec<&Call>, Vec<&Call>) =
            calls.iter().filter(|c| c.outcome.is_err()).partition(|c| {
                kind == Kind::Peer(PeerKind::GrpcCore)
                    && c.outcome
                        .as_ref()
                        .is_err_and(|s| s.code() == Code::Cancelled)
                    && c.started.max(began) - c.started.min(began) < Duration::from_millis(100)
            });
        if !cancelled_by_server.is_empty() {
            eprintln!(
                "{kind}: {} calls cancelled by the server as its shutdown began",
                cancelled_by_server.len()
            );
        }
        assert!(
            cancelled_by_server.len() <= 4,
            "{kind}: {cancelled_by_server:#?}"
        );
        assert!(other.is_empty(), "{kind}: {:#?}", failures(&calls));
        // No stall: a call takes its 200 ms, plus at most a transparent retry elsewhere.
        let slowest = calls.iter().map(Call::latency).max().unwrap_or_default();
        assert!(
            slowest < latency * 3,
            "{kind}: the slowest call took {slowest:?}"
        );
        // The calls in flight when it began were served by it, to their end.
        let served_by_stopping = calls
            .iter()
            .filter(|c| c.started < began && c.ended > began)
            .filter(|c| c.outcome.as_ref().ok() == Some(&fixture.servers[0].id()))
            .count();
        assert!(
            served_by_stopping > 0,
            "{kind}: no call finished on the stopping server"
        );
        fixture.servers[0]
            .peer()
            .wait_stopped()
            .await
            .expect("the server stopped");
    }
}

/// Issue 13, 2.3: a server with a 1.5 s max connection age under load costs no failed call,
/// and its endpoint does not flap out of rotation at each age-out, health `Watch` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_costs_nothing() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("max_connection_age_costs_nothing", false) {
        let options = Options {
            max_connection_age: Some(Duration::from_millis(1500)),
            ..Options::default()
        };
        let stack = Stack {
            retry: true,
            health_check: Some(HealthCheck::watch("")),
            ..Stack::default()
        };
        let fixture = Fixture::start(kind, 2, &options, stack).await;
        // Record every time an endpoint is seen out of rotation.
        let flaps = Arc::new(Mutex::new(Vec::<String>::new()));
        let watch = {
            let (balance, flaps) = (fixture.balance.clone(), flaps.clone());
            tokio::spawn(async move {
                balance
                    .wait_until(Box::new(move |snapshot| {
                        for e in snapshot.iter().filter(|e| e.state != EndpointState::Ready) {
                            flaps
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(format!("{} {}: {:?}", e.uri, e.state, e.reason));
                        }
                        false
                    }))
                    .await;
            })
        };
        let calls = drive(
            &fixture.client,
            8,
            Duration::from_secs(5),
            DEADLINE,
            Some(Duration::from_millis(20)),
        )
        .await;
        watch.abort();
        let slowest = calls.iter().map(Call::latency).max().unwrap_or_default();
        eprintln!("{kind}: {} calls, the slowest {slowest:?}", calls.len());
        assert!(
            failures(&calls).is_empty(),
            "{kind}: {:#?}",
            failures(&calls)
        );
        let flaps = flaps.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert!(
            flaps.is_empty(),
            "{kind}: endpoints left rotation: {flaps:#?}"
        );
        assert!(calls.len() > 200, "{kind}: only {} calls", calls.len());
    }
}

/// Issue 13, 2.4 (gRFC A8): grpc-core answers keepalive pings more frequent than it allows with
/// GOAWAY `too_many_pings`; towline doubles the interval for that target and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_backs_off_when_the_server_says_too_many_pings() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("keepalive_backs_off", false) {
        let interval = Duration::from_millis(200);
        let pool = PoolConfig::builder()
            .keepalive(interval, Duration::from_secs(5))
            .build()
            .unwrap();
        let stack = Stack {
            retry: true,
            health_check: Some(HealthCheck::watch("")),
            pool: Some(pool),
        };
        let fixture = Fixture::start(kind, 1, &Options::default(), stack).await;
        let uri = fixture.servers[0].uri();
        // Quiet calls of 1.5 s: only pings cross the connection meanwhile, as under a health
        // Watch (grpc-core forgives pings only when it has sent data since the last one), and
        // grpc-core ends them "Too many pings" after about a second at this interval.
        let calls = drive(
            &fixture.client,
            1,
            Duration::from_secs(6),
            Duration::from_secs(5),
            Some(Duration::from_millis(1500)),
        )
        .await;
        let now = towline::connect::keepalive_interval_for(&uri, interval);
        eprintln!("{kind}: keepalive interval for {uri} is now {now:?} (configured {interval:?})");
        match kind {
            Kind::Peer(PeerKind::GrpcCore) => assert!(
                now >= interval * 2,
                "{kind}: the server's too_many_pings was not seen, interval still {now:?}"
            ),
            // grpc-js enforces no ping policy: nothing to back off from.
            _ => assert_eq!(now, interval, "{kind}"),
        }
        assert!(
            failures(&calls).is_empty(),
            "{kind}: {:#?}",
            failures(&calls)
        );
        assert!(calls.len() >= 3, "{kind}: only {} calls", calls.len());
    }
}

/// Issue 13, 2.5 (gRFC A6): a stream refused above `max_concurrent_streams` (before the client
/// has the server's SETTINGS) is retried transparently, whatever the retry policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_retried_transparently_with_max_attempts_1() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("refused_streams_are_retried_transparently", true) {
        let options = Options {
            max_concurrent_streams: Some(1),
            ..Options::default()
        };
        let server = Server::start(kind, format!("{kind}-streams"), &options).await;
        server.set_latency(Duration::from_millis(100)).await;
        for round in 0..3 {
            // A fresh connection each round: the race is with its first SETTINGS.
            let channel = PoolConfig::default()
                .connector()
                .lazy()
                .endpoint(server.uri())
                .connect_lazy();
            let policy = RetryPolicy::builder().max_attempts(1).build().unwrap();
            let client = EchoClient::new(
                ServiceBuilder::new()
                    .layer(RetryLayer::new(policy))
                    .service(channel),
            );
            let calls = (0..6).map(|_| {
                let mut client = client.clone();
                async move {
                    let mut request = tonic::Request::new(EchoRequest::default());
                    request.set_timeout(Duration::from_secs(5));
                    client.unary(request).await
                }
            });
            let results = futures::future::join_all(calls).await;
            for result in results {
                if let Err(status) = result {
                    panic!("{kind}, round {round}: {status:?}");
                }
            }
        }
    }
}

/// Issue 13, 2.6: a call that waited in the balancer is sent with what is left of its deadline,
/// so the server sees the remaining time and the call ends within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_is_sent_with_the_rest_of_its_deadline() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("a_call_that_waited_is_sent_with_the_rest", true) {
        let server = Server::start(kind, format!("{kind}-late"), &Options::default()).await;
        let (updates, discovery) = discover::channel(1);
        let (client, _balance) = build(discovery, Stack::default());
        let deadline = Duration::from_millis(1500);
        let call = tokio::spawn({
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(EchoRequest::default());
                request.set_timeout(deadline);
                let started = Instant::now();
                let reply = client.unary(request).await;
                (started.elapsed(), reply)
            }
        });
        // The call waits 500 ms for an endpoint to be discovered.
        sleep(Duration::from_millis(500)).await;
        updates
            .send(Change::Insert(server.uri(), Default::default()))
            .await
            .unwrap();
        let (elapsed, reply) = call.await.unwrap();
        let reply = reply
            .unwrap_or_else(|s| panic!("{kind}: {s:?}"))
            .into_inner();
        let left: u64 = match kind {
            Kind::Testkit => {
                towline::deadline::parse(reply.request_headers["grpc-timeout"].as_bytes())
                    .unwrap()
                    .as_millis() as u64
            }
            Kind::Peer(_) => reply.request_headers["x-deadline-remaining-ms"]
                .parse()
                .unwrap(),
        };
        eprintln!("{kind}: the server saw {left} ms left after a {elapsed:?} call");
        assert!(
            left <= 1100,
            "{kind}: the server saw {left} ms left of a 1500 ms deadline after a 500 ms wait"
        );
        assert!(left >= 500, "{kind}: {left} ms");
    }
}

/// Issue 13, 2.7: errors say what happened, once, in words: a client-side deadline names the
/// deadline; an endpoint that cannot connect names the refused address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_happened() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("errors_say_what_happened", true) {
        let fixture = Fixture::start(kind, 1, &Options::default(), Stack::default()).await;
        let mut client = fixture.client.clone();
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(Duration::from_millis(300));
        request
            .metadata_mut()
            .insert(LATENCY_HEADER, "1000".parse().unwrap());
        let started = Instant::now();
        let status = client.unary(request).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(300) + DEADLINE_SLACK);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{kind}: {status:?}");
        assert!(
            !status.message().contains("transport error") && !status.message().contains("code: '"),
            "{kind}: {status:?}"
        );

        fixture.servers[0].kill().await;
        let reason = timeout(Duration::from_secs(5), async {
            loop {
                // A call tells the balancer the connection is gone.
                let mut probe = tonic::Request::new(EchoRequest::default());
                probe.set_timeout(Duration::from_millis(300));
                let _ = client.unary(probe).await;
                if let Some(reason) = fixture
                    .state_of(0)
                    .filter(|e| e.state != EndpointState::Ready)
                    .and_then(|e| e.reason)
                {
                    return reason;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{kind}: no reason: {:?}", fixture.state_of(0)));
        eprintln!("{kind}: {reason}");
        assert!(!reason.contains("code: '"), "{kind}: {reason}");
        assert!(reason.len() < 250, "{kind}: {reason}");
    }
}

/// Issue 13, 2.9 (gRFC A6, where grpc-go and grpc-core agree), against real servers' pushback
/// trailers: a pushback that says stop (negative; or two values, which only grpc-js can send)
/// ends retrying, and a retry says how many attempts came before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_servers_pushback_and_count_attempts() {
    let _serial = SERIAL.lock().await;
    for kind in kinds("retries_follow_the_servers_pushback", false) {
        let server = Server::start(kind, format!("{kind}-retry"), &Options::default()).await;
        let peer = server.peer();
        let channel = PoolConfig::default()
            .connector()
            .lazy()
            .endpoint(server.uri())
            .connect_lazy();
        let policy = RetryPolicy::builder()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(10))
            .build()
            .unwrap();
        let mut client = EchoClient::new(
            ServiceBuilder::new()
                .layer(RetryLayer::new(policy))
                .service(channel),
        );

        // Two failures, then an answer: the third attempt says two came before it.
        peer.fail_next(2, Code::Unavailable, None).await.unwrap();
        let reply = client
            .unary(EchoRequest::default())
            .await
            .unwrap_or_else(|s| panic!("{kind}: {s:?}"))
            .into_inner();
        assert_eq!(
            reply
                .request_headers
                .get("grpc-previous-rpc-attempts")
                .map(String::as_str),
            Some("2"),
            "{kind}: {:?}",
            reply.request_headers
        );

        // A pushback that says stop: no retry, whatever the policy allows.
        let stops: &[&str] = match kind {
            Kind::Peer(PeerKind::GrpcJs) => &["-1", "10,20"],
            // grpc-core sends only integers, and only one value.
            _ => &["-1"],
        };
        for pushback in stops {
            let before = peer.calls().await.unwrap();
            peer.fail_next(1, Code::Unavailable, Some(pushback))
                .await
                .unwrap();
            let status = client.unary(EchoRequest::default()).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{kind} {pushback}");
            assert_eq!(
                peer.calls().await.unwrap() - before,
                1,
                "{kind}: pushback {pushback} was retried"
            );
        }
    }
}

/// The one-call client as a user builds it first: `Channel::builder(target)?.build()?`, no
/// service config, every default (peak-EWMA, a `Watch("")` health check, outlier detection,
/// retries under a token bucket, pools). Against each server kind: a server whose health
/// service says NOT_SERVING gets no call, a server without a health service at all serves
/// (its `UNIMPLEMENTED` Watch passes, as gRFC A17 says), and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_call_channel_with_its_defaults_gates_on_health() {
    let _serial = SERIAL.lock().await;
    for kind in kinds(
        "the_one_call_channel_with_its_defaults_gates_on_health",
        true,
    ) {
        let mut servers = Server::start_many(kind, 2, &Options::default()).await;
        let without_health = Options {
            without_health_service: true,
            ..Options::default()
        };
        servers.push(Server::start(kind, format!("{kind}-2"), &without_health).await);
        servers[1].set_not_serving().await;
        let addresses: Vec<String> = servers
            .iter()
            .map(|s| s.uri().authority().expect("an address").to_string())
            .collect();
        let channel = towline::Channel::builder(&format!("ipv4:{}", addresses.join(",")))
            .expect("a valid target")
            .build()
            .expect("the defaults build");
        let uris: Vec<Uri> = servers.iter().map(Server::uri).collect();
        let expected = [
            EndpointState::Ready,
            EndpointState::Unhealthy,
            EndpointState::Ready,
        ];
        timeout(
            Duration::from_secs(10),
            channel.balance().wait_until(|endpoints| {
                uris.iter()
                    .zip(expected)
                    .all(|(uri, state)| endpoints.iter().any(|e| &e.uri == uri && e.state == state))
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{kind}: not gated as expected: {:#?}", channel.snapshot()));

        // 16 in flight, so that peak-EWMA spreads the calls over both healthy servers.
        let client = EchoClient::new(channel.clone());
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..4 {
            let calls = (0..16).map(|_| {
                let mut client = client.clone();
                async move { client.unary(EchoRequest::default()).await }
            });
            for reply in futures::future::join_all(calls).await {
                let reply = reply.unwrap_or_else(|status| panic!("{kind}: {status:?}"));
                *served.entry(reply.into_inner().backend).or_default() += 1;
            }
        }
        assert_eq!(served.get(&servers[1].id()), None, "{kind}: {served:?}");
        assert_eq!(served.values().sum::<usize>(), 64, "{kind}: {served:?}");
        assert!(
            served.contains_key(&servers[2].id()),
            "{kind}: the server without a health service got no call: {served:?}"
        );
    }
}
