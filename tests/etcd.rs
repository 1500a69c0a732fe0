//! etcd discovery and registration against a real etcd: `etcd` (Debian `etcd-server`) started as
//! child processes on loopback (one member, or a three-member cluster), driven with `etcdctl`
//! (Debian `etcd-client`), with real tonic backends behind `BalanceLayer` + `RetryLayer`.
//!
//! Without `etcd` and `etcdctl` each test says so loudly and passes; under `CI=true` it fails.
#![cfg(feature = "etcd")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tower::ServiceBuilder;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{Balance, BalanceConfig, BalanceLayer, EndpointSnapshot, EndpointState};
use towline::connect::Connect;
use towline::discover::etcd::{Etcd, INVALID_VALUES, Registration};
use towline::discover::{Change, Update};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, EtcdCluster, require_etcd};

/// Long enough for a loaded machine; every wait is for a signal, bounded by this.
const WAIT: Duration = Duration::from_secs(20);
/// The whole of any one test.
const TEST_LIMIT: Duration = Duration::from_secs(90);

type Channel = tonic::transport::Channel;

// ---------------------------------------------------------------------------------------------
// etcd as child processes

/// A TCP proxy in front of an etcd member that the test can cut (every connection dropped, new
/// ones closed at once) and restore: etcd unreachable for the client while it keeps working
/// for `etcdctl`.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                k.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

// ---------------------------------------------------------------------------------------------
// clients

/// Quick reconnects for tests: 50 ms doubling to 500 ms.
fn quick_backoff() -> Backoff {
    Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(50),
        Duration::from_millis(500),
        2.0,
    )
    .unwrap()
}

fn discovery(urls: &[String], prefix: &str) -> Etcd {
    Etcd::builder(urls, prefix)
        .backoff(quick_backoff())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

async fn register(urls: &[String], prefix: &str, backend: &Backend, ttl: Duration) -> Registration {
    Registration::builder(urls, prefix, backend.addr().to_string())
        .ttl(ttl)
        .backoff(quick_backoff())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(2))
        .register()
        .await
        .expect("registered")
}

fn balance(discovery: Etcd) -> Balance<Channel> {
    let config = BalanceConfig::builder()
        .reconnect_backoff(quick_backoff())
        .endpoint_wait(Duration::from_secs(2))
        .outlier_detection(None)
        .build()
        .unwrap();
    ServiceBuilder::new()
        .layer(BalanceLayer::new(discovery, config))
        .service(Connect::new())
}

fn lists(snapshot: &[EndpointSnapshot], backend: &Backend) -> bool {
    let addr = backend.addr().to_string();
    snapshot
        .iter()
        .any(|e| e.uri.authority().is_some_and(|a| a.as_str() == addr))
}

fn ready(snapshot: &[EndpointSnapshot], backend: &Backend) -> bool {
    let addr = backend.addr().to_string();
    snapshot.iter().any(|e| {
        e.state == EndpointState::Ready && e.uri.authority().is_some_and(|a| a.as_str() == addr)
    })
}

async fn wait_for(
    balance: &Balance<Channel>,
    what: &str,
    done: impl FnMut(&[EndpointSnapshot]) -> bool,
) {
    timeout(WAIT, balance.wait_until(done))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:#?}", balance.snapshot()));
}

/// Calls through `RetryLayer` over the balancer, from `workers` tasks, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    workers: tokio::task::JoinSet<(u64, Vec<String>)>,
}

impl Traffic {
    fn start(balance: &Balance<Channel>, workers: usize) -> Traffic {
        let retry = RetryLayer::new(RetryPolicy::default());
        let client = EchoClient::new(ServiceBuilder::new().layer(retry).service(balance.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (mut client, stop) = (client.clone(), stop.clone());
            set.spawn(async move {
                let (mut calls, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    calls += 1;
                    if let Err(status) = client.unary(EchoRequest::default()).await {
                        failures.push(format!("{:?}: {}", status.code(), status.message()));
                    }
                }
                (calls, failures)
            });
        }
        Traffic { stop, workers: set }
    }

    /// Stops; returns the calls made and the failures.
    async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut calls, mut failures) = (0, Vec::new());
        while let Some(part) = self.workers.join_next().await {
            let (c, f) = part.expect("a traffic worker");
            calls += c;
            failures.extend(f);
        }
        (calls, failures)
    }
}

/// Waits until `backend` has received `more` calls beyond now: traffic reaches it.
async fn calls_grow(backend: &Backend, more: u64) {
    let target = backend.calls() + more;
    timeout(WAIT, async {
        while backend.calls() < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} got no traffic", backend.addr()));
}

fn plain(change: &Update) -> String {
    match change {
        Change::Insert(uri, endpoint) => format!("+{} w{}", authority(uri), endpoint.weight),
        Change::Remove(uri) => format!("-{}", authority(uri)),
    }
}

fn authority(uri: &http::Uri) -> &str {
    uri.authority().map_or("?", |a| a.as_str())
}

async fn next_change(discovery: &mut Etcd) -> String {
    let change = timeout(WAIT, discovery.next())
        .await
        .expect("a change within the wait")
        .expect("the stream goes on")
        .expect("discovery yields no errors");
    plain(&change)
}

/// The next `n` changes, sorted (the order within one read or one event batch is by URI).
async fn next_changes(discovery: &mut Etcd, n: usize) -> Vec<String> {
    let mut changes = Vec::new();
    for _ in 0..n {
        changes.push(next_change(discovery).await);
    }
    changes.sort();
    changes
}

/// Nothing more arrives within `quiet`.
async fn assert_quiet(discovery: &mut Etcd, quiet: Duration) {
    if let Ok(change) = timeout(quiet, discovery.next()).await {
        panic!("expected no change, got {change:?}");
    }
}

fn recorder() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder this test binary installs");
        snapshotter
    })
}

/// The invalid-values count for `prefix` so far. A snapshot of the debugging recorder drains its
/// counters, so every snapshot (of every test) is added to running totals.
fn invalid_values(prefix: &str) -> u64 {
    static TOTALS: OnceLock<Mutex<std::collections::HashMap<String, u64>>> = OnceLock::new();
    let mut totals = TOTALS.get_or_init(Mutex::default).lock().unwrap();
    for (key, .., value) in recorder().snapshot().into_vec() {
        if key.key().name() != INVALID_VALUES {
            continue;
        }
        let DebugValue::Counter(n) = value else {
            panic!("{INVALID_VALUES} is a counter, got {value:?}");
        };
        for label in key.key().labels().filter(|l| l.key() == "prefix") {
            *totals.entry(label.value().to_owned()).or_default() += n;
        }
    }
    totals.get(prefix).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// tests

#[tokio::test]
async fn the_first_read_inserts_everything_then_only_changes_arrive() {
    if !require_etcd("the_first_read_inserts_everything_then_only_changes_arrive") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let etcd = EtcdCluster::start(1).await.expect("etcd starts");
        etcd.put("/svc/a", "127.0.0.1:1001").await.expect("etcdctl");
        etcd.put("/svc/b", r#"{"addr":"127.0.0.1:1002","weight":2}"#)
            .await
            .expect("etcdctl");
        // Outside the prefix: never seen.
        etcd.put("/svc0", "127.0.0.1:9").await.expect("etcdctl");
        etcd.put("/sv", "127.0.0.1:9").await.expect("etcdctl");
        let mut discovery = discovery(&etcd.urls(), "/svc/");
        assert_eq!(
            next_changes(&mut discovery, 2).await,
            ["+127.0.0.1:1001 w1", "+127.0.0.1:1002 w2"]
        );
        // The same value again: nothing. A weight change: a re-insert.
        etcd.put("/svc/a", "127.0.0.1:1001").await.expect("etcdctl");
        etcd.put("/svc/b", r#"{"addr":"127.0.0.1:1002","weight":5}"#)
            .await
            .expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "+127.0.0.1:1002 w5");
        // A new address for a key: the new one in, then the old one out.
        etcd.put("/svc/a", "127.0.0.1:1003").await.expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "+127.0.0.1:1003 w1");
        assert_eq!(next_change(&mut discovery).await, "-127.0.0.1:1001");
        // The same address under a second key: one endpoint, no change until both are gone.
        etcd.put("/svc/a2", "127.0.0.1:1003")
            .await
            .expect("etcdctl");
        etcd.del("/svc/a").await.expect("etcdctl");
        etcd.put("/svc0", "127.0.0.1:9").await.expect("etcdctl");
        assert_quiet(&mut discovery, Duration::from_millis(300)).await;
        etcd.del("/svc/a2").await.expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "-127.0.0.1:1003");
        etcd.del("/svc/b").await.expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "-127.0.0.1:1002");
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test]
async fn values_that_do_not_parse_are_skipped_counted_and_the_watch_goes_on() {
    if !require_etcd("values_that_do_not_parse_are_skipped_counted_and_the_watch_goes_on") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let prefix = "/garbage/";
        let before = invalid_values(prefix);
        let etcd = EtcdCluster::start(1).await.expect("etcd starts");
        etcd.put("/garbage/a", "127.0.0.1:2001")
            .await
            .expect("etcdctl");
        etcd.put("/garbage/bad-at-start", "not an address")
            .await
            .expect("etcdctl");
        let mut discovery = discovery(&etcd.urls(), prefix);
        assert_eq!(next_change(&mut discovery).await, "+127.0.0.1:2001 w1");
        for bad in [
            "{\"addr\": ",
            r#"{"addr":"127.0.0.1:2002","weight":0}"#,
            r#"{"weight":3}"#,
            "127.0.0.1",
            "[1, 2]",
        ] {
            etcd.put("/garbage/g", bad).await.expect("etcdctl");
        }
        // The watch goes on: the next good value arrives, and nothing came before it.
        etcd.put("/garbage/b", "127.0.0.1:2003")
            .await
            .expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "+127.0.0.1:2003 w1");
        assert_eq!(invalid_values(prefix) - before, 6);
        // A key that named an endpoint and then holds garbage names none.
        etcd.put("/garbage/g", "127.0.0.1:2004")
            .await
            .expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "+127.0.0.1:2004 w1");
        etcd.put("/garbage/g", "127.0.0.1:99999")
            .await
            .expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "-127.0.0.1:2004");
        assert_eq!(invalid_values(prefix) - before, 7);
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_under_traffic_no_call_fails_none_reaches_a_removed_one() {
    if !require_etcd("endpoints_added_and_removed_under_traffic") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let etcd = EtcdCluster::start(1).await.expect("etcd starts");
        let urls = etcd.urls();
        let backends = Backend::start_many(3).await.unwrap();
        let ttl = Duration::from_secs(5);
        let a = register(&urls, "/echo/", &backends[0], ttl).await;
        let _b = register(&urls, "/echo/", &backends[1], ttl).await;
        let balance = balance(discovery(&urls, "/echo/"));
        wait_for(&balance, "a and b ready", |s| {
            ready(s, &backends[0]) && ready(s, &backends[1])
        })
        .await;
        let traffic = Traffic::start(&balance, 4);
        calls_grow(&backends[0], 50).await;

        let c = register(&urls, "/echo/", &backends[2], ttl).await;
        wait_for(&balance, "c ready", |s| ready(s, &backends[2])).await;
        calls_grow(&backends[2], 50).await;

        a.deregister().await.expect("deregistered");
        wait_for(&balance, "a gone", |s| !lists(s, &backends[0])).await;
        // Gone from the snapshot means drained too: no call in flight on it.
        let frozen = backends[0].calls();
        calls_grow(&backends[1], 200).await;
        calls_grow(&backends[2], 200).await;
        assert_eq!(
            backends[0].calls(),
            frozen,
            "a call reached a removed endpoint"
        );

        drop(c);
        wait_for(&balance, "c gone (deregistered on drop)", |s| {
            !lists(s, &backends[2])
        })
        .await;
        let frozen = backends[2].calls();
        calls_grow(&backends[1], 200).await;
        assert_eq!(
            backends[2].calls(),
            frozen,
            "a call reached a removed endpoint"
        );

        let (calls, failures) = traffic.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {calls} failed: {failures:?}",
            failures.len()
        );
        eprintln!("add/remove under traffic: {calls} calls, none failed");
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_registration_disappears_within_its_ttl() {
    if !require_etcd("a_crashed_registration_disappears_within_its_ttl") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let etcd = EtcdCluster::start(1).await.expect("etcd starts");
        let urls = etcd.urls();
        let backends = Backend::start_many(2).await.unwrap();
        let ttl = Duration::from_secs(2);
        let crashed = register(&urls, "/crash/", &backends[0], ttl).await;
        let _stays = register(&urls, "/crash/", &backends[1], ttl).await;
        let mut discovery = discovery(&urls, "/crash/");
        assert_eq!(next_changes(&mut discovery, 2).await.len(), 2);
        // Several keepalive rounds pass before the crash: the lease is being renewed.
        tokio::time::sleep(ttl * 2).await;
        assert_quiet(&mut discovery, Duration::from_millis(10)).await;

        crashed.abandon();
        let crashed_at = Instant::now();
        let gone = next_change(&mut discovery).await;
        let took = crashed_at.elapsed();
        assert_eq!(gone, format!("-{}", backends[0].addr()));
        eprintln!("crashed registration (TTL {ttl:?}) removed after {took:?}");
        // The lease had at most its TTL left; etcd checks expiries every 500 ms.
        assert!(took <= ttl + Duration::from_secs(2), "took {took:?}");

        // And a clean deregistration is seen at once.
        let clean = register(&urls, "/crash/", &backends[0], ttl).await;
        assert_eq!(
            next_change(&mut discovery).await,
            format!("+{} w1", backends[0].addr())
        );
        let t0 = Instant::now();
        clean.deregister().await.unwrap();
        assert_eq!(
            next_change(&mut discovery).await,
            format!("-{}", backends[0].addr())
        );
        eprintln!("deregistered endpoint removed after {:?}", t0.elapsed());
        assert!(t0.elapsed() < Duration::from_secs(1));
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_keeps_the_set_and_resyncs_without_failed_calls() {
    if !require_etcd("an_etcd_restart_keeps_the_set_and_resyncs_without_failed_calls") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let mut etcd = EtcdCluster::start(1).await.expect("etcd starts");
        let urls = etcd.urls();
        let backends = Backend::start_many(3).await.unwrap();
        let ttl = Duration::from_secs(5);
        let a = register(&urls, "/restart/", &backends[0], ttl).await;
        let lease = a.lease_id();
        etcd.put("/restart/b", &backends[1].addr().to_string())
            .await
            .expect("etcdctl");
        let balance = balance(discovery(&urls, "/restart/"));
        wait_for(&balance, "a and b ready", |s| {
            ready(s, &backends[0]) && ready(s, &backends[1])
        })
        .await;
        let traffic = Traffic::start(&balance, 4);

        etcd.kill(0);
        // etcd down: calls go on to both endpoints; nothing is removed.
        calls_grow(&backends[0], 100).await;
        calls_grow(&backends[1], 100).await;
        let snapshot = balance.snapshot();
        assert!(lists(&snapshot, &backends[0]) && lists(&snapshot, &backends[1]));

        etcd.restart(0).await.expect("etcd restarts");
        // Changes as soon as etcd is back, while the client may still be reconnecting.
        etcd.del("/restart/b").await.expect("etcdctl");
        etcd.put("/restart/c", &backends[2].addr().to_string())
            .await
            .expect("etcdctl");
        wait_for(&balance, "b gone and c ready", |s| {
            !lists(s, &backends[1]) && ready(s, &backends[2]) && ready(s, &backends[0])
        })
        .await;
        calls_grow(&backends[2], 100).await;
        let (calls, failures) = traffic.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {calls} failed: {failures:?}",
            failures.len()
        );
        // The registration outlived the restart (etcd renews leases when a leader starts).
        assert!(a.lease_id().is_some());
        eprintln!(
            "etcd restart: {calls} calls, none failed; lease {lease:?} -> {:?}",
            a.lease_id()
        );
        a.deregister().await.unwrap();
        wait_for(&balance, "a gone", |s| !lists(s, &backends[0])).await;
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_fail_over_in_a_three_member_cluster_without_failed_calls() {
    if !require_etcd("members_fail_over_in_a_three_member_cluster_without_failed_calls") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let mut etcd = EtcdCluster::start(3).await.expect("etcd starts");
        let urls = etcd.urls();
        let backends = Backend::start_many(4).await.unwrap();
        let ttl = Duration::from_secs(5);
        let registrations = [
            register(&urls, "/cluster/", &backends[0], ttl).await,
            register(&urls, "/cluster/", &backends[1], ttl).await,
        ];
        let balance = balance(discovery(&urls, "/cluster/"));
        wait_for(&balance, "0 and 1 ready", |s| {
            ready(s, &backends[0]) && ready(s, &backends[1])
        })
        .await;
        let traffic = Traffic::start(&balance, 4);
        // Each member in turn is killed, so the one the client uses is killed at some point;
        // a change is made while it is down, through the two others.
        for member in 0..3 {
            etcd.kill(member);
            let extra = &backends[2 + member % 2];
            if member % 2 == 0 {
                etcd.put(
                    &format!("/cluster/extra-{member}"),
                    &extra.addr().to_string(),
                )
                .await
                .expect("etcdctl");
                wait_for(&balance, "the extra endpoint ready", |s| ready(s, extra)).await;
                calls_grow(extra, 50).await;
            } else {
                etcd.del("/cluster/extra-0").await.expect("etcdctl");
                etcd.put(
                    &format!("/cluster/extra-{member}"),
                    &extra.addr().to_string(),
                )
                .await
                .expect("etcdctl");
                wait_for(&balance, "the extra endpoints swapped", |s| {
                    !lists(s, &backends[2]) && ready(s, extra)
                })
                .await;
            }
            etcd.restart(member).await.expect("etcd restarts");
        }
        // The registrations' keepalives failed over too: still listed after every member
        // restarted, and more than a TTL later.
        calls_grow(&backends[0], 100).await;
        let snapshot = balance.snapshot();
        assert!(lists(&snapshot, &backends[0]) && lists(&snapshot, &backends[1]));
        let (calls, failures) = traffic.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {calls} failed: {failures:?}",
            failures.len()
        );
        eprintln!("rolling kill of 3 members: {calls} calls, none failed");
        for registration in registrations {
            registration.deregister().await.unwrap();
        }
        wait_for(&balance, "registrations gone", |s| {
            !lists(s, &backends[0]) && !lists(s, &backends[1])
        })
        .await;
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test]
async fn a_resume_from_a_compacted_revision_emits_only_the_difference() {
    if !require_etcd("a_resume_from_a_compacted_revision_emits_only_the_difference") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let etcd = EtcdCluster::start(1).await.expect("etcd starts");
        for (key, port) in [("a", 3001), ("b", 3002), ("c", 3003)] {
            etcd.put(&format!("/compact/{key}"), &format!("127.0.0.1:{port}"))
                .await
                .expect("etcdctl");
        }
        // The client reaches etcd through a proxy the test cuts.
        let proxy = Proxy::start(etcd.client_port(0)).await;
        let mut discovery = discovery(&[proxy.url()], "/compact/");
        assert_eq!(next_changes(&mut discovery, 3).await.len(), 3);

        proxy.cut();
        // While the client is cut off: add, remove, re-weight, then compact every revision.
        etcd.put("/compact/d", "127.0.0.1:3004")
            .await
            .expect("etcdctl");
        etcd.del("/compact/a").await.expect("etcdctl");
        etcd.put("/compact/b", r#"{"addr":"127.0.0.1:3002","weight":4}"#)
            .await
            .expect("etcdctl");
        etcd.put("/compact/e", "127.0.0.1:3005")
            .await
            .expect("etcdctl");
        let revision = etcd
            .put("/compact/e", "127.0.0.1:3006")
            .await
            .expect("etcdctl");
        etcd.compact(revision).await.expect("etcdctl");
        // Cut off, it emits nothing.
        assert_quiet(&mut discovery, Duration::from_millis(300)).await;
        proxy.restore();

        let changes = next_changes(&mut discovery, 4).await;
        assert_eq!(
            changes,
            [
                "+127.0.0.1:3002 w4",
                "+127.0.0.1:3004 w1",
                "+127.0.0.1:3006 w1",
                "-127.0.0.1:3001"
            ],
            "only the difference; c stayed and is neither removed nor re-inserted"
        );
        assert_quiet(&mut discovery, Duration::from_millis(300)).await;
        // And the watch goes on from the fresh read.
        etcd.put("/compact/f", "127.0.0.1:3007")
            .await
            .expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, "+127.0.0.1:3007 w1");
    })
    .await
    .expect("test within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_lease_is_lost_registers_again() {
    if !require_etcd("a_registration_whose_lease_is_lost_registers_again") {
        return;
    }
    timeout(TEST_LIMIT, async {
        let etcd = EtcdCluster::start(1).await.expect("etcd starts");
        let urls = etcd.urls();
        let backend = Backend::start().await.unwrap();
        let ttl = Duration::from_secs(3);
        let registration = register(&urls, "/lost/", &backend, ttl).await;
        let mut discovery = discovery(&urls, "/lost/");
        let addr = backend.addr();
        assert_eq!(next_change(&mut discovery).await, format!("+{addr} w1"));
        let lease = registration.lease_id().expect("a lease");
        // Someone revokes the lease: the key goes, and the next keepalive (within TTL/3)
        // finds the lease gone and registers again on a new one.
        etcd.ctl(&["lease", "revoke", &format!("{lease:x}")])
            .await
            .expect("etcdctl");
        assert_eq!(next_change(&mut discovery).await, format!("-{addr}"));
        let t0 = Instant::now();
        assert_eq!(next_change(&mut discovery).await, format!("+{addr} w1"));
        eprintln!(
            "re-registered {:?} after the lease was revoked",
            t0.elapsed()
        );
        assert_ne!(registration.lease_id(), Some(lease));
        registration.deregister().await.unwrap();
        assert_eq!(next_change(&mut discovery).await, format!("-{addr}"));
    })
    .await
    .expect("test within its time limit");
}
