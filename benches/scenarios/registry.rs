//! `registry`: backends that register themselves in etcd, a client that discovers them from it,
//! and what happens to the calls when a backend crashes, etcd restarts, and history is compacted.
//!
//! A real single-member etcd (`testkit::EtcdCluster`, a child process) and four testkit backends,
//! each announcing itself with a `Registration` on a 2 s lease. The client is the full stack with
//! defaults: `RetryLayer` (`RetryPolicy::default()`) → `BalanceLayer` (`BalanceConfig::default()`,
//! discovery `Etcd` with its defaults: reconnect backoff 200 ms doubling to 5 s) → `PoolLayer`
//! (`PoolConfig::default()`) → `pool.connector()`. Load: 32 calls in flight, closed loop, each
//! with a 2 s deadline, for a fixed duration; the events below happen at fixed offsets into it:
//!
//! 1. **crash**: one backend's registration is abandoned (keepalives stop, the lease is not
//!    revoked, as in a crash) and the backend stopped. It is restarted on the same port once the
//!    balancer has removed it, unregistered.
//! 2. **etcd restart**: the etcd process is SIGKILLed, stays down for a while, and is started again
//!    on the same ports and data dir. Right after it serves again, the crashed backend registers
//!    again: that change must reach the balancer.
//! 3. **churn and compaction**: a fifth backend registers and deregisters under fresh keys many
//!    times in a row (staying registered at the end: 10 keys in a quick run, 40 in a full one), then etcd is compacted at its current
//!    revision. The balancer's watch is connected through it: this checks that a compaction under
//!    a live watch loses nothing (a watch resuming from a compacted revision, after an outage, is
//!    tested in `tests/etcd.rs`).
//!
//! The registrations reconnect to etcd with a 50 ms to 500 ms backoff: with a 2 s TTL a longer one
//! could miss the lease's whole grace period after the restart (etcd renews every lease by its TTL
//! when its leader starts) and the key would expire under a live backend.
//!
//! Figures (`target/scenarios/registry.json`, `figures`; everything else is in `details`):
//!
//! - `lease_ttl_ms`: the registrations' lease TTL;
//! - `removed_after_crash_ms`: from the abandon (the backend stopped right after) until the
//!   balancer's snapshot no longer lists the endpoint; goal `≤ lease_ttl_ms + 500` (the lease had
//!   at most its TTL left, and etcd checks expiries every 500 ms);
//! - `failed_calls`: calls the caller saw fail over the whole run; goal 0 with `RetryLayer`;
//! - `failed_during_etcd_outage`: those of them that ended between the etcd kill and the moment
//!   the restarted etcd served again;
//! - `resync_after_etcd_restart_ms`: from the moment the restarted etcd serves until the
//!   registration made right then is listed in the balancer's snapshot. The `Etcd` source keeps
//!   reconnecting (with backoff) while etcd starts, so when its last attempt fell close to the
//!   start this is just the time an event takes; otherwise its backoff adds to it. `details`
//!   also counts it from the moment the etcd process was started again;
//! - `missed_events`: at the end, the addresses etcd holds under the prefix (read with
//!   `etcdctl`) against the endpoints the balancer lists, after letting it settle for up to 5 s:
//!   the size of their symmetric difference; goal 0.
//!
//! Without `etcd` and `etcdctl` the scenario says so loudly and is skipped; under `CI=true` that
//! is a failure.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout};
use tower::{Layer as _, ServiceBuilder};
use towline::BoxError;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{Balance, BalanceConfig, BalanceLayer, EndpointSnapshot, EndpointState};
use towline::discover::etcd::{Etcd, Registration};
use towline::pool::{Pool, PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, EtcdCluster, Load, require_etcd};

use crate::balance::ready;
use crate::support::{BoxScenario, Settings, Skipped, details, note, print_table};

const BACKENDS: usize = 4;
const CONCURRENCY: usize = 32;
const DEADLINE: Duration = Duration::from_secs(2);
const TTL: Duration = Duration::from_secs(2);
const PREFIX: &str = "/towline/scenarios/registry/";
/// The bound on any one wait for the balancer to see a change.
const WAIT: Duration = Duration::from_secs(15);
/// How long the final comparison waits for the balancer to agree with etcd.
const SETTLE: Duration = Duration::from_secs(5);
/// A safety bound on the calls of the run; its duration is what ends it.
const MAX_CALLS: u64 = 5_000_000;

type Balanced = Balance<Pool<tonic::transport::Channel>>;

/// The registrations' reconnect backoff: 50 ms doubling to 500 ms, well under the TTL.
fn registration_backoff() -> Result<Backoff, BoxError> {
    Ok(Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(50),
        Duration::from_millis(500),
        2.0,
    )?)
}

async fn register(
    etcd: &EtcdCluster,
    addr: String,
    name: Option<String>,
) -> Result<Registration, BoxError> {
    let mut builder = Registration::builder(etcd.urls(), PREFIX, addr)
        .ttl(TTL)
        .backoff(registration_backoff()?);
    if let Some(name) = name {
        builder = builder.name(name);
    }
    Ok(builder.register().await?)
}

/// `host:port` of every endpoint the balancer lists and is not draining.
fn listed(snapshot: &[EndpointSnapshot]) -> BTreeSet<String> {
    snapshot
        .iter()
        .filter(|e| e.state != EndpointState::Draining)
        .filter_map(|e| e.uri.authority().map(|a| a.as_str().to_owned()))
        .collect()
}

fn lists(snapshot: &[EndpointSnapshot], addr: &str) -> bool {
    snapshot
        .iter()
        .any(|e| e.uri.authority().is_some_and(|a| a.as_str() == addr))
}

/// Waits until `done` holds for the balancer's snapshot; how long that took, or an error naming
/// `what` after [`WAIT`].
async fn wait_for(
    balance: &Balanced,
    what: &str,
    done: impl FnMut(&[EndpointSnapshot]) -> bool,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    timeout(WAIT, balance.wait_until(done))
        .await
        .map_err(|_| format!("the balancer did not see {what} within {WAIT:?}"))?;
    Ok(started.elapsed())
}

/// The addresses registered under the prefix, as etcd holds them now.
async fn registered(etcd: &EtcdCluster) -> Result<BTreeSet<String>, BoxError> {
    let mut addrs = BTreeSet::new();
    for (key, value) in etcd.get_prefix(PREFIX).await? {
        let addr = if value.trim_start().starts_with('{') {
            let json: serde_json::Value = serde_json::from_str(&value)?;
            json["addr"]
                .as_str()
                .ok_or_else(|| format!("{key}: no addr in {value}"))?
                .to_owned()
        } else {
            value.trim().to_owned()
        };
        addrs.insert(addr);
    }
    Ok(addrs)
}

/// Milliseconds since `t0`.
fn ms_since(t0: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(t0).as_millis() as u64
}

/// When each event happened, from the start of the load.
#[derive(Debug, Default)]
struct Events {
    crash_ms: u64,
    removed_after_crash: Duration,
    etcd_kill_ms: u64,
    etcd_restart_ms: u64,
    etcd_serving_ms: u64,
    reregistered_in: Duration,
    resync: Duration,
    churn_started_ms: u64,
    churn_registrations: usize,
    compacted_revision: i64,
    compacted_ms: u64,
    churn_seen_after_compaction: Duration,
    done_ms: u64,
}

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        if !require_etcd("registry") {
            return Err(Skipped(
                "needs etcd and etcdctl (apt-get install etcd-server etcd-client)".into(),
            )
            .into());
        }
        // quick: phase 1 s, outage 1 s, 10 churn registrations, 11 s of load;
        // full: phase 4 s, outage 3 s, 40 churn registrations, 22 s.
        let phase = settings
            .duration
            .clamp(Duration::from_secs(1), Duration::from_secs(4));
        let outage = phase.min(Duration::from_secs(3));
        let churn = 10 * phase.as_secs() as usize;
        let crash_at = phase;
        let kill_at = crash_at + TTL + Duration::from_millis(1500) + phase / 2;
        let restart_at = kill_at + outage;
        // etcd start-up, the re-registration, the churn and the compaction, then a phase of load.
        let load_for = restart_at + Duration::from_secs(3) + phase * 2;

        let mut etcd = EtcdCluster::start(1).await?;
        let backends = Backend::start_many(BACKENDS + 1).await?;
        let (backends, extra) = backends.split_at(BACKENDS);
        let extra = &extra[0];
        let mut registrations = Vec::new();
        for backend in backends {
            registrations.push(register(&etcd, backend.addr().to_string(), None).await?);
        }
        let pool = PoolConfig::default();
        let balance = ServiceBuilder::new()
            .layer(BalanceLayer::new(
                Etcd::builder(etcd.urls(), PREFIX).build()?,
                BalanceConfig::default(),
            ))
            .service(PoolLayer::new(pool.clone()).layer(pool.connector()));
        ready(&balance, BACKENDS).await?;
        let retry = RetryLayer::new(RetryPolicy::default());
        let client = EchoClient::new(ServiceBuilder::new().layer(retry).service(balance.clone()));

        // Every failed call: when it ended (ms from the start) and its code.
        let failures: Arc<Mutex<Vec<(u64, tonic::Code)>>> = Arc::default();
        let t0 = Instant::now();
        let load = {
            let failures = failures.clone();
            tokio::spawn(async move {
                Load::new(CONCURRENCY)
                    .calls(MAX_CALLS)
                    .duration(load_for)
                    .run(move |_| {
                        let (mut client, failures) = (client.clone(), failures.clone());
                        async move {
                            let mut request = tonic::Request::new(EchoRequest::default());
                            request.set_timeout(DEADLINE);
                            let result = client.unary(request).await;
                            if let Err(status) = &result {
                                failures
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push((ms_since(t0, Instant::now()), status.code()));
                            }
                            result.map(|_| ())
                        }
                    })
                    .await
            })
        };

        let mut ev = Events::default();
        let victim = &backends[BACKENDS - 1];
        let victim_addr = victim.addr().to_string();

        // 1. A backend crashes: its lease is left to expire.
        sleep_until(t0 + crash_at).await;
        let crashed = registrations.pop().expect("one registration per backend");
        crashed.abandon();
        let crashed_at = Instant::now();
        victim.stop().await;
        ev.crash_ms = ms_since(t0, crashed_at);
        wait_for(&balance, "the crashed backend removed", |s| {
            !lists(s, &victim_addr)
        })
        .await?;
        ev.removed_after_crash = crashed_at.elapsed();
        victim.restart().await?;

        // 2. etcd is SIGKILLed and restarted; the victim registers again right after.
        sleep_until(t0 + kill_at).await;
        etcd.kill(0);
        ev.etcd_kill_ms = ms_since(t0, Instant::now());
        sleep_until(t0 + restart_at).await;
        ev.etcd_restart_ms = ms_since(t0, Instant::now());
        etcd.restart(0).await?;
        let serving = Instant::now();
        ev.etcd_serving_ms = ms_since(t0, serving);
        let again = register(&etcd, victim_addr.clone(), None).await?;
        ev.reregistered_in = serving.elapsed();
        wait_for(&balance, "the re-registered backend", |s| {
            lists(s, &victim_addr)
        })
        .await?;
        ev.resync = serving.elapsed();
        registrations.push(again);

        // 3. Churn under fresh keys, then a compaction at the current revision.
        ev.churn_started_ms = ms_since(t0, Instant::now());
        let extra_addr = extra.addr().to_string();
        for i in 0..churn {
            let registration =
                register(&etcd, extra_addr.clone(), Some(format!("churn-{i}"))).await?;
            if i + 1 < churn {
                registration.deregister().await?;
            } else {
                registrations.push(registration);
            }
        }
        ev.churn_registrations = churn;
        ev.compacted_revision = etcd.revision().await?;
        etcd.compact(ev.compacted_revision).await?;
        let compacted = Instant::now();
        ev.compacted_ms = ms_since(t0, compacted);
        wait_for(&balance, "the churned backend", |s| lists(s, &extra_addr)).await?;
        ev.churn_seen_after_compaction = compacted.elapsed();
        ev.done_ms = ms_since(t0, Instant::now());

        let report = load.await?;
        if ev.done_ms > load_for.as_millis() as u64 {
            return Err(format!(
                "the events took {} ms, longer than the load ({} ms): the machine is too slow for this run",
                ev.done_ms,
                load_for.as_millis()
            )
            .into());
        }

        // The end: what etcd holds against what the balancer lists, once it has settled.
        let in_etcd = registered(&etcd).await?;
        let _ = timeout(SETTLE, balance.wait_until(|s| listed(s) == in_etcd)).await;
        let in_balancer = listed(&balance.snapshot());
        let missed: Vec<&String> = in_etcd.symmetric_difference(&in_balancer).collect();

        let failures =
            std::mem::take(&mut *failures.lock().unwrap_or_else(PoisonError::into_inner));
        let during_outage = failures
            .iter()
            .filter(|(at, _)| (ev.etcd_kill_ms..=ev.etcd_serving_ms).contains(at))
            .count();
        let mut by_code = std::collections::BTreeMap::<String, u64>::new();
        for (_, code) in &failures {
            *by_code.entry(format!("{code:?}")).or_default() += 1;
        }

        let ttl_ms = TTL.as_millis() as u64;
        let removed_ms = ev.removed_after_crash.as_millis() as u64;
        let resync_ms = ev.resync.as_millis() as u64;
        let held = |ok: bool| if ok { "yes" } else { "NO" }.to_owned();
        print_table(
            &["figure", "value", "goal", "held"],
            &[
                vec![
                    "lease TTL".into(),
                    format!("{ttl_ms} ms"),
                    String::new(),
                    String::new(),
                ],
                vec![
                    "removed after crash".into(),
                    format!("{removed_ms} ms"),
                    format!("≤ {} ms", ttl_ms + 500),
                    held(removed_ms <= ttl_ms + 500),
                ],
                vec![
                    "failed calls".into(),
                    format!("{} of {}", failures.len(), report.calls()),
                    "0".into(),
                    held(failures.is_empty()),
                ],
                vec![
                    "failed during etcd outage".into(),
                    during_outage.to_string(),
                    "0".into(),
                    held(during_outage == 0),
                ],
                vec![
                    "resync after etcd restart".into(),
                    format!("{resync_ms} ms"),
                    String::new(),
                    String::new(),
                ],
                vec![
                    "missed events".into(),
                    missed.len().to_string(),
                    "0".into(),
                    held(missed.is_empty()),
                ],
            ],
        );
        note(format!(
            "{BACKENDS} backends registered in a single-member etcd with a {ttl_ms} ms lease; {CONCURRENCY} calls in flight \
             for {} ms, each with a {} ms deadline, through RetryLayer → BalanceLayer (Etcd discovery) → PoolLayer, all defaults",
            load_for.as_millis(),
            DEADLINE.as_millis()
        ));
        note(format!(
            "crash (lease abandoned, backend stopped) at {} ms; etcd SIGKILLed at {} ms, restarted at {} ms, serving at {} ms; \
             {churn} registrations churned and etcd compacted at revision {} at {} ms",
            ev.crash_ms,
            ev.etcd_kill_ms,
            ev.etcd_restart_ms,
            ev.etcd_serving_ms,
            ev.compacted_revision,
            ev.compacted_ms,
        ));
        details(serde_json::json!({
            "backends": BACKENDS,
            "concurrency": CONCURRENCY,
            "deadline_ms": DEADLINE.as_millis() as u64,
            "load_ms": load_for.as_millis() as u64,
            "calls": report.calls(),
            "failures_by_code": by_code,
            "p99_us": report.p99().as_micros() as u64,
            "max_latency_us": report.percentile(1.0).as_micros() as u64,
            "events_ms": {
                "crash": ev.crash_ms,
                "etcd_kill": ev.etcd_kill_ms,
                "etcd_restart": ev.etcd_restart_ms,
                "etcd_serving": ev.etcd_serving_ms,
                "churn_started": ev.churn_started_ms,
                "compacted": ev.compacted_ms,
                "events_done": ev.done_ms,
            },
            "reregistration_took_ms": ev.reregistered_in.as_millis() as u64,
            // The same resync, counted from when the etcd process was started again (its start-up,
            // about a second of it an election, included).
            "resync_from_etcd_start_ms": ev.resync.as_millis() as u64 + ev.etcd_serving_ms - ev.etcd_restart_ms,
            "churn_registrations": ev.churn_registrations,
            "compacted_revision": ev.compacted_revision,
            "churn_seen_after_compaction_ms": ev.churn_seen_after_compaction.as_millis() as u64,
            "endpoints_in_etcd": in_etcd,
            "endpoints_in_balancer": in_balancer,
            "missed": missed,
        }));
        // Deregistered before etcd goes, so nothing waits on it.
        for registration in registrations {
            registration.deregister().await?;
        }
        Ok(serde_json::json!({
            "lease_ttl_ms": ttl_ms,
            "removed_after_crash_ms": removed_ms,
            "failed_calls": failures.len(),
            "failed_during_etcd_outage": during_outage,
            "resync_after_etcd_restart_ms": resync_ms,
            "missed_events": missed.len(),
        }))
    })
}
