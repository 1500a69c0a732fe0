//! `foreign-kill`: `kill-backend` against servers we did not write. Four grpc-core (Python
//! `grpcio`) or four grpc-js servers (`towline::testkit::Peer`), one of them SIGKILLed mid-run
//! (`Peer::kill`, as a crash: its connections reset, its port refuses), and never restarted.
//!
//! Variants, the same for each server kind, back to back in one process, each on a fresh set
//! of four newly started servers (none is reused or restarted):
//!
//! - `tonic balance_list`: `tonic::transport::Channel::balance_list` over the four endpoints;
//! - `towline default`: `BalanceLayer` with `BalanceConfig::default()` (peak-EWMA, no health
//!   check, outlier detection on, reconnect backoff 1 s × 1.6) over `PoolLayer` with
//!   `PoolConfig::default()`, connecting through `pool.connector()`;
//! - `towline default + retry`: the same under `RetryLayer::new(RetryPolicy::default())`.
//!
//! Load: 32 calls in flight, closed loop, each with a 2 s deadline sent as `grpc-timeout`. The
//! kill comes after the first phase; the load then runs on for the rest of the run.
//!
//! Figures, per (variant, server kind):
//!
//! - `calls`, `failed`: calls made, and calls the caller saw fail;
//! - `routed_around_ms`: from the kill to the **end of the last call that failed, or of the last
//!   call attempt that was sent to the killed server, whichever is later**. Attempts sent to the
//!   killed server are seen by a pass-through layer between the balancer and each endpoint's
//!   pool (it records when each attempt to the victim's address ended); tonic's `balance_list`
//!   cannot be instrumented that way, but it has no retries, so there each attempt is a call,
//!   and a call sent to the dead server after the kill fails: its last failed call is the same
//!   measure. Calls in flight on the victim when it is killed end after the kill and count.
//!   0 when nothing failed or went to the victim after the kill. When the last such call ended
//!   less than [`STILL_ROUTING`] before the end of the run, the variant did not route around
//!   the killed server within the run: `routed_around_ms` is then the whole time from the kill
//!   to the end of the run, and the table says `not within the run`;
//! - `over_deadline`: calls that ended later than their deadline + 100 ms (should be 0).
//!
//! `target/scenarios/foreign-kill.json` has these six fields per pair in `figures.variants`, and
//! the rest (failures by code and by message, when the last failing call was sent, p99, max
//! latency) in `figures.details`, keyed the same way.
//!
//! Without the foreign servers (`bash tests/peers/install.sh`) the scenario says so loudly and is
//! skipped; under `CI=true` that is a failure.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Uri;
use tokio::time::Instant;
use tower::{Layer as _, ServiceBuilder, ServiceExt as _};
use towline::BoxError;
use towline::balance::{BalanceConfig, BalanceLayer, MakeEndpoint};
use towline::discover::Static;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::pb::echo_client::EchoClient;
use towline::testkit::{Peer, PeerKind, require_peer};

use crate::balance::{ready, tonic_balance_list_over};
use crate::fault::{Deadline, FaultReport, Phases, failures_cell, fault_run, json_ms, millis};
use crate::support::{BoxScenario, Settings, Skipped, Stack, micros, note, print_table};

const SERVERS: usize = 4;
const CONCURRENCY: usize = 32;
const DEADLINE: Deadline = Deadline {
    timeout: Duration::from_secs(2),
    slack: Duration::from_millis(100),
};
/// A variant whose last failing call (or attempt at the killed server) ended less than this
/// before the end of the run has not routed around the killed server within the run.
const STILL_ROUTING: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
enum Variant {
    TonicBalanceList,
    Towline { retry: bool },
}

const VARIANTS: &[(&str, Variant)] = &[
    ("tonic balance_list", Variant::TonicBalanceList),
    ("towline default", Variant::Towline { retry: false }),
    ("towline default + retry", Variant::Towline { retry: true }),
];

/// When the last call attempt sent to one endpoint ended.
#[derive(Debug, Clone, Default)]
struct LastAttempt(Arc<Mutex<Option<Instant>>>);

impl LastAttempt {
    fn ended_now(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `make`, with every endpoint service it makes for `victim` noting in `last` when each call
/// attempt it was given ended. A pass-through otherwise: readiness and errors are the endpoint's.
fn record_attempts<M: MakeEndpoint>(make: M, victim: Uri, last: LastAttempt) -> impl MakeEndpoint {
    tower::service_fn(move |uri: Uri| {
        let last = (uri == victim).then(|| last.clone());
        let make = make.clone();
        async move {
            let endpoint = make.oneshot(uri).await.map_err(Into::into)?;
            Ok::<_, BoxError>(endpoint.map_future(move |attempt| {
                let last = last.clone();
                async move {
                    let result = attempt.await;
                    if let Some(last) = last {
                        last.ended_now();
                    }
                    result
                }
            }))
        }
    })
}

/// One (variant, server kind) run.
struct Outcome {
    variant: &'static str,
    server: PeerKind,
    report: FaultReport,
    /// See the module docs; `None`: not within the run.
    routed_around: Option<Duration>,
    /// From the kill to the end of the run.
    remaining: Duration,
}

impl Outcome {
    fn new(
        variant: &'static str,
        server: PeerKind,
        report: FaultReport,
        victim_attempts: Option<LastAttempt>,
    ) -> Outcome {
        let killed = report.fault_at;
        // No repair in this scenario: the "repair" is the end of the run's load.
        let remaining = report.repaired_at - killed;
        let last_attempt = victim_attempts
            .and_then(|last| last.get())
            .map(|at| at.saturating_duration_since(killed));
        let last = report.last_failure_after_fault.max(last_attempt);
        let routed_around = match last {
            Some(last) if last + STILL_ROUTING > remaining => None,
            Some(last) => Some(last),
            None => Some(Duration::ZERO),
        };
        Outcome {
            variant,
            server,
            report,
            routed_around,
            remaining,
        }
    }

    fn routed_around_ms(&self) -> u64 {
        self.routed_around.unwrap_or(self.remaining).as_millis() as u64
    }

    fn routed_around_cell(&self) -> String {
        match self.routed_around {
            Some(after) => millis(Some(after)),
            None => format!("{} ms (not within the run)", self.remaining.as_millis()),
        }
    }

    /// The contract: exactly these fields.
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "variant": self.variant,
            "server": self.server.to_string(),
            "calls": self.report.calls,
            "failed": self.report.failed,
            "routed_around_ms": self.routed_around_ms(),
            "over_deadline": self.report.over_deadline.unwrap_or(0),
        })
    }

    fn details_json(&self) -> serde_json::Value {
        let r = &self.report;
        serde_json::json!({
            "variant": self.variant,
            "server": self.server.to_string(),
            "failures": r.failures,
            "failure_messages": r.failure_messages,
            "routed_around_within_run": self.routed_around.is_some(),
            "last_failed_call_sent_ms": json_ms(r.last_failed_call_sent_after_fault),
            "last_failure_ms": json_ms(r.last_failure_after_fault),
            "run_after_kill_ms": self.remaining.as_millis() as u64,
            "p99_us": r.p99.as_micros() as u64,
            "max_latency_us": r.max_latency.as_micros() as u64,
        })
    }
}

/// Four fresh servers of `kind`, started side by side.
async fn start_servers(kind: PeerKind) -> Result<Vec<Peer>, BoxError> {
    let starts = (0..SERVERS).map(|i| Peer::builder(kind).id(format!("{kind}-{i}")).start());
    Ok(futures::future::try_join_all(starts).await?)
}

/// Kills `victim` after `phases.before`; the load runs on to the end (nothing is repaired).
async fn kill_run<S: Stack>(
    client: EchoClient<S>,
    victim: &Peer,
    phases: Phases,
) -> Result<FaultReport, BoxError> {
    let kill = async {
        victim.kill();
        Ok(())
    };
    fault_run(
        client,
        CONCURRENCY,
        victim.id(),
        phases,
        Some(DEADLINE),
        kill,
        async { Ok(()) },
    )
    .await
}

async fn run_variant(
    name: &'static str,
    variant: Variant,
    kind: PeerKind,
    phases: Phases,
) -> Result<Outcome, BoxError> {
    let servers = start_servers(kind).await?;
    let victim = &servers[SERVERS - 1];
    let uris = servers.iter().map(Peer::uri);
    let Variant::Towline { retry } = variant else {
        let client = EchoClient::new(tonic_balance_list_over(uris));
        let report = kill_run(client, victim, phases).await?;
        return Ok(Outcome::new(name, kind, report, None));
    };
    let pool = PoolConfig::default();
    let last = LastAttempt::default();
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(uris),
            BalanceConfig::default(),
        ))
        .service(record_attempts(
            PoolLayer::new(pool.clone()).layer(pool.connector()),
            victim.uri(),
            last.clone(),
        ));
    ready(&balance, SERVERS).await?;
    let report = if retry {
        let retry = RetryLayer::new(RetryPolicy::default());
        let client = EchoClient::new(ServiceBuilder::new().layer(retry).service(balance));
        kill_run(client, victim, phases).await?
    } else {
        kill_run(EchoClient::new(balance), victim, phases).await?
    };
    Ok(Outcome::new(name, kind, report, Some(last)))
}

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let kinds: Vec<PeerKind> = PeerKind::ALL
            .into_iter()
            .filter(|&kind| require_peer(kind, "foreign-kill"))
            .collect();
        if kinds.is_empty() {
            return Err(Skipped(
                "needs the grpc-core and grpc-js servers: run tests/peers/install.sh".into(),
            )
            .into());
        }
        // Up for a phase (at most 2 s), then twice the phase after the kill: quick, 1 s + 2 s;
        // full, 2 s + 8 s.
        let phase = settings.duration.max(Duration::from_secs(1));
        let phases = Phases {
            before: phase.min(Duration::from_secs(2)),
            during: phase * 2,
            after: Duration::ZERO,
        };
        let mut outcomes = Vec::new();
        for &kind in &kinds {
            for &(name, variant) in VARIANTS {
                outcomes.push(run_variant(name, variant, kind, phases).await?);
            }
        }

        let rows: Vec<Vec<String>> = outcomes
            .iter()
            .map(|o| {
                let r = &o.report;
                vec![
                    o.server.to_string(),
                    o.variant.to_owned(),
                    r.calls.to_string(),
                    failures_cell(r),
                    o.routed_around_cell(),
                    r.over_deadline.unwrap_or(0).to_string(),
                    micros(r.max_latency),
                    micros(r.p99),
                ]
            })
            .collect();
        print_table(
            &[
                "server",
                "variant",
                "calls",
                "failed",
                "routed around",
                "over deadline",
                "max latency",
                "p99",
            ],
            &rows,
        );
        note(format!(
            "{SERVERS} fresh servers per row, one SIGKILLed after {} ms and not restarted; the load runs {} ms more; \
             {CONCURRENCY} calls in flight, each with a {} ms deadline (over deadline: later than {} ms)",
            phases.before.as_millis(),
            phases.during.as_millis(),
            DEADLINE.timeout.as_millis(),
            (DEADLINE.timeout + DEADLINE.slack).as_millis(),
        ));
        note(format!(
            "routed around: from the kill to the end of the last failed call or of the last attempt sent to the killed \
             server (tonic: no retries, so its failed calls); not within the run when that was less than {} ms before the end",
            STILL_ROUTING.as_millis(),
        ));
        if kinds.len() < PeerKind::ALL.len() {
            note("NOT RUN against every server kind: run tests/peers/install.sh");
        }
        Ok(serde_json::json!({
            "servers_per_run": SERVERS,
            "concurrency": CONCURRENCY,
            "deadline_ms": DEADLINE.timeout.as_millis() as u64,
            "deadline_slack_ms": DEADLINE.slack.as_millis() as u64,
            "still_routing_window_ms": STILL_ROUTING.as_millis() as u64,
            "phases_ms": {
                "before_kill": phases.before.as_millis() as u64,
                "after_kill": phases.during.as_millis() as u64,
            },
            "variants": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
            "details": outcomes.iter().map(Outcome::details_json).collect::<Vec<_>>(),
        }))
    })
}
