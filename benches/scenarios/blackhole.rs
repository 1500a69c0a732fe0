//! `blackhole`: one of four backends goes silent, and how long the client keeps sending it calls.
//!
//! Each backend listens in its own network namespace (`testkit::NetNs`). Mid-run, the victim's
//! namespace gets a blackhole route back to this process: requests still arrive, but no reply,
//! ACK, RST or FIN ever leaves. That is what a crashed host, a dead NAT entry or a cut path looks
//! like, and it is the worst case for a gRPC client: an HTTP/2 connection that hears nothing
//! looks exactly like one that is busy. Unlike `kill-backend` (where the kernel answers with a
//! RST and every stream fails at once), nothing tells the client. Only something with a clock
//! can notice:
//!
//! - the call's deadline (`grpc-timeout`): each call sent there fails with `DEADLINE_EXCEEDED`
//!   after the full deadline, and the connection stays "up";
//! - outlier detection (gRFC A50 plus failure accrual) counts those deadline failures and ejects
//!   the endpoint, but only after they have happened;
//! - peak-EWMA sees the calls pile up on the silent endpoint (its cost is RTT × pending) and
//!   stops choosing it before the deadlines even expire;
//! - an HTTP/2 keepalive PING unanswered within its timeout closes the connection: every call
//!   on it fails at once with `UNAVAILABLE` (which a `RetryLayer` may retry elsewhere within
//!   the deadline), and the balancer takes the endpoint down and reconnects with backoff; the
//!   reconnect cannot complete while the SYN-ACKs vanish.
//! - The health watch stream does not help: it is just as silent as the calls.
//!
//! Variants, each on fresh backends and namespaces: tonic's `balance_list` (deadlines only),
//! towline with round robin and with peak-EWMA (health watch, outlier detection on, no
//! keepalive), peak-EWMA with keepalive, that with `RetryLayer` on top, and that with a 1 s
//! connect timeout.
//!
//! Figures (times from the moment the blackhole route went in, or from the heal):
//!
//! - `failed`: calls the caller saw fail, by code;
//! - `last failing call sent`: when the last call that then failed was started: the last call
//!   routed to the silent backend, as far as the caller can tell (with retries, an attempt
//!   there that was retried elsewhere and succeeded is invisible, as it should be);
//! - `last failure`: when calls stopped failing ("time to route around it");
//! - `out of rotation`: towline only, from `Balance::snapshot()` polled every 5 ms: when the
//!   victim stopped receiving calls, and the state that took it out (`down` after keepalive
//!   closed the connection, `ejected` by outlier detection);
//! - `max latency` against the deadline, and `over deadline`: calls that ended later than the
//!   deadline plus a slack for timers on a loaded machine; it should be 0 for every variant;
//! - `in rotation after heal`: towline only: from removing the blackhole route until the victim
//!   is `receiving` again (`-`: not within the run, or it never left). A gap between this and
//!   the next figure is time in which the balancer could send the victim calls but its strategy
//!   chose the others;
//! - `answers after heal`: from removing the blackhole route to the first reply served by the
//!   victim (`-`: not within the run; an ejection lasts 30 s). A connect attempt begun during
//!   the blackhole completes only at one of the kernel's SYN retransmissions after the heal
//!   (about 20 s after it began, in a 12 s blackhole; plain sockets do the same), within the
//!   20 s connect timeout: the last variant's 1 s connect timeout starts fresh attempts instead.
//!   Once reconnected, peak-EWMA still holds the victim's estimate from before: the calls that
//!   failed there (after 500 ms or 1 s) were recorded as round trips, and that peak decays with
//!   a 10 s time constant, so the victim may get no calls for seconds after it is back.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Uri;
use tokio::time::Instant;
use tonic::transport::Channel;
use tower::ServiceBuilder;
use towline::BoxError;
use towline::balance::{Balance, BalanceConfig, EndpointState, PeakEwma, RoundRobin};
use towline::connect::Connect;
use towline::health::HealthCheck;
use towline::outlier::OutlierDetection;
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::echo_client::EchoClient;
use towline::testkit::{Backend, NetNs, require_netns};

use crate::balance::{ready, tonic_balance_list, towline_over};
use crate::fault::{Deadline, FaultReport, Phases, failures_cell, fault_run, json_ms, millis};
use crate::support::{BoxScenario, Settings, Skipped, Stack, micros, note, print_table};

const BACKENDS: usize = 4;
const CONCURRENCY: usize = 32;
const DEADLINE: Deadline = Deadline {
    timeout: Duration::from_secs(1),
    slack: Duration::from_millis(100),
};
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(250);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(250);
/// A connect attempt begun during the blackhole completes only well after the heal (the kernel's
/// SYN retransmissions; ~20 s after it began here, with plain sockets too): a short timeout
/// starts fresh attempts instead.
const SHORT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the victim's balancer state is sampled.
const WATCH_EVERY: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy)]
enum Strategy {
    RoundRobin,
    PeakEwma,
}

#[derive(Debug, Clone, Copy)]
enum Client {
    TonicBalanceList,
    Towline {
        strategy: Strategy,
        keepalive: bool,
        retry: bool,
        /// Replaces the 20 s default (gRPC's minimum connect timeout).
        connect_timeout: Option<Duration>,
    },
}

const VARIANTS: &[(&str, Client)] = &[
    ("tonic balance_list", Client::TonicBalanceList),
    (
        "towline round robin",
        Client::Towline {
            strategy: Strategy::RoundRobin,
            keepalive: false,
            retry: false,
            connect_timeout: None,
        },
    ),
    (
        "towline peak-EWMA",
        Client::Towline {
            strategy: Strategy::PeakEwma,
            keepalive: false,
            retry: false,
            connect_timeout: None,
        },
    ),
    (
        "towline peak-EWMA + keepalive",
        Client::Towline {
            strategy: Strategy::PeakEwma,
            keepalive: true,
            retry: false,
            connect_timeout: None,
        },
    ),
    (
        "towline peak-EWMA + keepalive + retry",
        Client::Towline {
            strategy: Strategy::PeakEwma,
            keepalive: true,
            retry: true,
            connect_timeout: None,
        },
    ),
    (
        "towline peak-EWMA + keepalive + retry + 1 s connect timeout",
        Client::Towline {
            strategy: Strategy::PeakEwma,
            keepalive: true,
            retry: true,
            connect_timeout: Some(SHORT_CONNECT_TIMEOUT),
        },
    ),
];

/// Four backends, each in a namespace of its own. Fields drop in order: the backends stop
/// before their namespaces are deleted.
struct Cluster {
    backends: Vec<Backend>,
    namespaces: Vec<NetNs>,
}

impl Cluster {
    async fn start() -> Result<Cluster, BoxError> {
        let mut cluster = Cluster {
            backends: Vec::new(),
            namespaces: Vec::new(),
        };
        for i in 0..BACKENDS {
            let ns = NetNs::create()?;
            let backend = Backend::builder()
                .id(format!("backend-{i}"))
                .netns(&ns)
                .start()
                .await?;
            cluster.namespaces.push(ns);
            cluster.backends.push(backend);
        }
        Ok(cluster)
    }

    fn victim(&self) -> (&Backend, &NetNs) {
        (&self.backends[BACKENDS - 1], &self.namespaces[BACKENDS - 1])
    }
}

/// The victim's place in the balancer at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct VictimState {
    state: EndpointState,
    receiving: bool,
}

/// Every change of the victim's state, with when it was seen.
type VictimStates = Arc<Mutex<Vec<(Instant, VictimState)>>>;

/// Samples the victim's snapshot entry until aborted, keeping every change.
fn watch_victim(
    balance: Balance<Channel>,
    victim: Uri,
) -> (tokio::task::JoinHandle<()>, VictimStates) {
    let changes = Arc::new(Mutex::new(Vec::new()));
    let sink = changes.clone();
    let task = tokio::spawn(async move {
        let mut last = None;
        loop {
            let now = balance
                .snapshot()
                .into_iter()
                .find(|e| e.uri == victim)
                .map(|e| VictimState {
                    state: e.state,
                    receiving: e.receiving,
                });
            if now.is_some() && now != last {
                let mut changes = sink.lock().unwrap_or_else(PoisonError::into_inner);
                changes.extend(now.map(|s| (Instant::now(), s)));
                last = now;
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    });
    (task, changes)
}

/// One variant's run: the caller's view, and the balancer's view of the victim (towline only).
struct Outcome {
    report: FaultReport,
    victim_states: Vec<(Instant, VictimState)>,
}

impl Outcome {
    /// When the victim stopped receiving calls after the blackhole, and in what state.
    fn out_of_rotation(&self) -> Option<(Duration, EndpointState)> {
        let fault = self.report.fault_at;
        self.victim_states
            .iter()
            .find(|(at, s)| *at >= fault && !s.receiving)
            .map(|(at, s)| (*at - fault, s.state))
    }

    /// From the heal until the victim received calls again, if it was out at the heal.
    fn back_in_rotation(&self) -> Option<Duration> {
        let healed = self.report.repaired_at;
        let at_heal = self.victim_states.iter().rfind(|(at, _)| *at < healed)?;
        if at_heal.1.receiving {
            return None;
        }
        self.victim_states
            .iter()
            .find(|(at, s)| *at >= healed && s.receiving)
            .map(|(at, _)| *at - healed)
    }

    fn json(&self, variant: &str) -> serde_json::Value {
        let r = &self.report;
        let signed_ms = |at: Instant| {
            if at >= r.fault_at {
                (at - r.fault_at).as_millis() as i64
            } else {
                -((r.fault_at - at).as_millis() as i64)
            }
        };
        serde_json::json!({
            "variant": variant,
            "calls": r.calls,
            "failed": r.failed,
            "failures": r.failures,
            "last_failed_call_sent_ms": json_ms(r.last_failed_call_sent_after_fault),
            "last_failure_ms": json_ms(r.last_failure_after_fault),
            "out_of_rotation": self.out_of_rotation().map(|(after, state)| serde_json::json!({
                "after_ms": after.as_millis() as u64,
                "state": state.as_str(),
            })),
            "back_in_rotation_after_heal_ms": json_ms(self.back_in_rotation()),
            "answers_after_heal_ms": json_ms(r.back_after_repair),
            "p99_us": r.p99.as_micros() as u64,
            "max_latency_us": r.max_latency.as_micros() as u64,
            "over_deadline": r.over_deadline,
            "victim_states_ms_from_blackhole": self.victim_states.iter().map(|(at, s)| serde_json::json!({
                "at_ms": signed_ms(*at),
                "state": s.state.as_str(),
                "receiving": s.receiving,
            })).collect::<Vec<_>>(),
        })
    }
}

async fn blackhole_run<S: Stack>(
    client: EchoClient<S>,
    cluster: &Cluster,
    phases: Phases,
) -> Result<FaultReport, BoxError> {
    let (victim, ns) = cluster.victim();
    let blackhole = async { Ok(ns.blackhole()?) };
    let heal = async { Ok(ns.heal()?) };
    fault_run(
        client,
        CONCURRENCY,
        victim.id(),
        phases,
        Some(DEADLINE),
        blackhole,
        heal,
    )
    .await
}

async fn run_variant(client: Client, phases: Phases) -> Result<Outcome, BoxError> {
    let cluster = Cluster::start().await?;
    let Client::Towline {
        strategy,
        keepalive,
        retry,
        connect_timeout,
    } = client
    else {
        let client = EchoClient::new(tonic_balance_list(&cluster.backends));
        return Ok(Outcome {
            report: blackhole_run(client, &cluster, phases).await?,
            victim_states: Vec::new(),
        });
    };
    let connect = Connect::new().configure(move |mut endpoint| {
        if keepalive {
            endpoint = endpoint
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
        }
        match connect_timeout {
            Some(timeout) => endpoint.connect_timeout(timeout),
            None => endpoint,
        }
    });
    let config = BalanceConfig::builder()
        .health_check(HealthCheck::watch(""))
        .outlier_detection(OutlierDetection::default());
    let config = match strategy {
        Strategy::RoundRobin => config.strategy(RoundRobin::new()),
        Strategy::PeakEwma => config.strategy(PeakEwma::new()),
    };
    let balance = towline_over(&cluster.backends, config, connect)?;
    ready(&balance, BACKENDS).await?;
    let (watcher, victim_states) = watch_victim(balance.clone(), cluster.victim().0.uri());
    let report = if retry {
        let retry = RetryLayer::new(RetryPolicy::builder().build()?);
        let client = EchoClient::new(ServiceBuilder::new().layer(retry).service(balance));
        blackhole_run(client, &cluster, phases).await
    } else {
        blackhole_run(EchoClient::new(balance), &cluster, phases).await
    };
    watcher.abort();
    let victim_states =
        std::mem::take(&mut *victim_states.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Outcome {
        report: report?,
        victim_states,
    })
}

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        if !require_netns("blackhole") {
            return Err(Skipped("needs root and iproute2 for network namespaces".into()).into());
        }
        // Healthy for one phase, blackholed for three (time for deadlines, ejection and
        // keepalive to act and for the rest to settle), healed for three (time to come back).
        let phase = settings.duration.max(Duration::from_secs(1));
        let phases = Phases {
            before: phase,
            during: phase * 3,
            after: phase * 3,
        };
        let mut outcomes = Vec::new();
        for (name, client) in VARIANTS {
            outcomes.push((*name, run_variant(*client, phases).await?));
        }

        let rows: Vec<Vec<String>> = outcomes
            .iter()
            .map(|(name, o)| {
                let r = &o.report;
                vec![
                    name.to_string(),
                    r.calls.to_string(),
                    failures_cell(r),
                    millis(r.last_failed_call_sent_after_fault),
                    millis(r.last_failure_after_fault),
                    o.out_of_rotation()
                        .map_or("-".to_owned(), |(after, state)| {
                            format!("{} ms ({state})", after.as_millis())
                        }),
                    micros(r.max_latency),
                    r.over_deadline.unwrap_or(0).to_string(),
                    millis(o.back_in_rotation()),
                    millis(r.back_after_repair),
                ]
            })
            .collect();
        print_table(
            &[
                "variant",
                "calls",
                "failed",
                "last failing call sent",
                "last failure",
                "out of rotation",
                "max latency",
                "over deadline",
                "in rotation after heal",
                "answers after heal",
            ],
            &rows,
        );
        note(format!(
            "one of {BACKENDS} backends (each in its own network namespace) blackholed after {} ms, healed {} ms later; \
             {CONCURRENCY} calls in flight, each with a {} ms deadline (over deadline: later than {} ms)",
            phases.before.as_millis(),
            phases.during.as_millis(),
            DEADLINE.timeout.as_millis(),
            (DEADLINE.timeout + DEADLINE.slack).as_millis(),
        ));
        note(format!(
            "towline: health watch, outlier detection (gRFC A50 defaults, eject after 7 failures in a row), \
             reconnect backoff 100 ms x1.6 up to 1 s, connect timeout 20 s unless named; keepalive: PING every {} ms, {} ms timeout; \
             retry: 3 attempts on UNAVAILABLE; times are from the blackhole (answers after heal: from the heal)",
            KEEPALIVE_INTERVAL.as_millis(),
            KEEPALIVE_TIMEOUT.as_millis(),
        ));
        Ok(serde_json::json!({
            "backends": BACKENDS,
            "concurrency": CONCURRENCY,
            "deadline_ms": DEADLINE.timeout.as_millis() as u64,
            "deadline_slack_ms": DEADLINE.slack.as_millis() as u64,
            "keepalive": {
                "interval_ms": KEEPALIVE_INTERVAL.as_millis() as u64,
                "timeout_ms": KEEPALIVE_TIMEOUT.as_millis() as u64,
            },
            "phases_ms": {
                "before": phases.before.as_millis() as u64,
                "blackholed": phases.during.as_millis() as u64,
                "healed": phases.after.as_millis() as u64,
            },
            "variants": outcomes.iter().map(|(name, o)| o.json(name)).collect::<Vec<_>>(),
        }))
    })
}
