//! Stack health: is this client able to reach what it depends on? [`Readiness`] aggregates any
//! number of sources — a [`Balance`]'s endpoint table, a [`Pool`]'s connections, or a check of your
//! own — into [`State::Healthy`], [`State::Degraded`] or [`State::Unhealthy`], with a reason per
//! source ("orders: 1 of 4 endpoints ready"), for a `/health/ready` probe or for `grpc.health.v1`.
//!
//! [`Readiness::drive_health`] keeps a tonic-health [`HealthReporter`] in step: `SERVING` while the
//! state is healthy or degraded, `NOT_SERVING` while it is unhealthy, so a server whose upstreams
//! are all unreachable stops taking traffic. It reacts at once to sources that can signal a change
//! (a balancer's endpoint table, via [`Balance::wait_until`]) and re-checks the others on an
//! interval.
//!
//! ```
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tower::ServiceBuilder;
//! use towline::balance::{BalanceConfig, BalanceLayer, EndpointState};
//! use towline::connect::Connect;
//! use towline::discover::Static;
//! use towline::health::HealthCheck;
//! use towline::readiness::{Check, Readiness, State};
//! use towline::testkit::Backend;
//!
//! let backends = Backend::start_many(2).await?;
//! // Without traffic, an active health check is what notices an upstream going away.
//! let config = BalanceConfig::builder().health_check(HealthCheck::watch("")).build()?;
//! let balance = ServiceBuilder::new()
//!     .layer(BalanceLayer::new(Static::new(backends.iter().map(|b| b.uri())), config))
//!     .service(Connect::new());
//! balance.wait_until(|s| s.len() == 2 && s.iter().all(|e| e.state == EndpointState::Ready)).await;
//!
//! let readiness = Readiness::new()
//!     .source("orders", balance.clone())
//!     .source("cache", towline::readiness::from_fn(|| Check::healthy()));
//! assert_eq!(readiness.report().state, State::Healthy);
//!
//! backends[0].stop().await;
//! balance.wait_until(|s| s.iter().any(|e| e.state != EndpointState::Ready)).await;
//! let report = readiness.report();
//! assert_eq!(report.state, State::Degraded);
//! assert!(report.to_string().contains("orders: 1 of 2 endpoints ready"), "{report}");
//! # Ok(()) }
//! ```

use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{FutureExt as _, select_all};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::balance::{Balance, Condition, EndpointSnapshot, EndpointState};
use crate::pool::Pool;

/// How healthy a source, or the whole stack, is. Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum State {
    /// Everything it depends on is reachable.
    Healthy,
    /// Reachable, with less capacity or redundancy than it should have.
    Degraded,
    /// Not reachable: calls will fail.
    Unhealthy,
}

impl State {
    /// Lower-case name, for logs and probe bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Degraded => "degraded",
            State::Unhealthy => "unhealthy",
        }
    }

    /// Whether traffic should be sent here: healthy or degraded.
    pub fn is_ready(self) -> bool {
        self != State::Unhealthy
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one source says: a state and, unless healthy with nothing to add, why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check {
    /// Its state.
    pub state: State,
    /// Why, in words ("1 of 4 endpoints ready").
    pub reason: Option<String>,
}

impl Check {
    /// Healthy, nothing to say.
    pub fn healthy() -> Self {
        Check {
            state: State::Healthy,
            reason: None,
        }
    }

    /// Degraded, because `reason`.
    pub fn degraded(reason: impl Into<String>) -> Self {
        Check {
            state: State::Degraded,
            reason: Some(reason.into()),
        }
    }

    /// Unhealthy, because `reason`.
    pub fn unhealthy(reason: impl Into<String>) -> Self {
        Check {
            state: State::Unhealthy,
            reason: Some(reason.into()),
        }
    }

    /// The same state with a reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// A future that resolves when a source's [`Check`] may have changed.
pub type Changed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Something whose health a [`Readiness`] aggregates.
pub trait Source: Send + Sync + 'static {
    /// Its health now.
    fn check(&self) -> Check;

    /// A future that resolves when [`check`](Self::check) may no longer return `since`; `None`
    /// (the default) for a source that cannot signal, which is re-checked on the interval.
    fn changed(&self, since: &Check) -> Option<Changed> {
        let _ = since;
        None
    }
}

/// A balancer: healthy when every endpoint (draining ones aside) is ready, degraded when some
/// are, unhealthy when none are or none have been discovered. Signals every change of its
/// endpoint table.
impl<S: Clone + Send + Sync + 'static> Source for Balance<S> {
    fn check(&self) -> Check {
        self.with_conditions(|_, endpoints| check_endpoints(endpoints))
    }

    /// Wakes on a change of some endpoint's state or reason, or of the set of endpoints, and
    /// only then checks again: the many table updates that change neither (an outlier interval,
    /// a health report that repeats) cost a version comparison, not a check over every endpoint.
    fn changed(&self, since: &Check) -> Option<Changed> {
        let balance = self.clone();
        let since = since.clone();
        Some(Box::pin(async move {
            loop {
                let (seen, check) =
                    balance.with_conditions(|seen, endpoints| (seen, check_endpoints(endpoints)));
                if check != since {
                    return;
                }
                balance.conditions_changed(seen).await;
            }
        }))
    }
}

/// The check of a balancer's [`snapshot`](Balance::snapshot).
pub fn balance_check(snapshot: &[EndpointSnapshot]) -> Check {
    check_endpoints(&mut snapshot.iter().map(|e| Condition {
        uri: &e.uri,
        state: e.state,
        reason: e.reason.as_deref(),
    }))
}

/// Healthy when every endpoint (draining ones aside) is ready, degraded when some are,
/// unhealthy when none are; the reason names the ones that are not ready, and why.
fn check_endpoints(endpoints: &mut dyn Iterator<Item = Condition<'_>>) -> Check {
    let (mut total, mut ready) = (0usize, 0usize);
    let mut not_ready = String::new();
    for e in endpoints.filter(|e| e.state != EndpointState::Draining) {
        total += 1;
        if e.state == EndpointState::Ready {
            ready += 1;
            continue;
        }
        not_ready.push_str(if not_ready.is_empty() { " (" } else { "; " });
        let _ = write!(not_ready, "{} {}", e.uri, e.state);
        if let Some(why) = e.reason {
            not_ready.push_str(": ");
            not_ready.push_str(why);
        }
    }
    if total == 0 {
        return Check::unhealthy("no endpoints discovered");
    }
    let mut reason = format!("{ready} of {total} endpoints ready");
    if ready == total {
        return Check::healthy().with_reason(reason);
    }
    reason.push_str(&not_ready);
    reason.push(')');
    if ready == 0 {
        Check::unhealthy(reason)
    } else {
        Check::degraded(reason)
    }
}

/// A pool: healthy with a connection open, degraded while it also waits to reconnect a broken
/// one, unhealthy with none open. Re-checked on the interval.
impl<S: Send + Sync + 'static> Source for Pool<S> {
    fn check(&self) -> Check {
        let stats = self.stats();
        let target = self.target();
        match (stats.open, stats.retry_in) {
            (0, Some(retry)) => Check::unhealthy(format!(
                "no connection to {target}, retrying in {:.1}s",
                retry.as_secs_f64()
            )),
            (0, None) if stats.connecting > 0 => {
                Check::unhealthy(format!("connecting to {target}"))
            }
            (0, None) => Check::unhealthy(format!("no connection to {target}")),
            (open, Some(retry)) => Check::degraded(format!(
                "{open} connections open to {target}, reconnecting in {:.1}s",
                retry.as_secs_f64()
            )),
            (open, None) => Check::healthy().with_reason(format!("{open} connections open")),
        }
    }
}

/// A source from a closure, re-checked on the interval.
pub fn from_fn<F>(check: F) -> FromFn<F>
where
    F: Fn() -> Check + Send + Sync + 'static,
{
    FromFn(check)
}

/// A [`Source`] from a closure; see [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F>(F);

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFn")
    }
}

impl<F> Source for FromFn<F>
where
    F: Fn() -> Check + Send + Sync + 'static,
{
    fn check(&self) -> Check {
        (self.0)()
    }
}

/// One source in a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceReport {
    /// The name it was added under.
    pub name: Arc<str>,
    /// Whether an unhealthy verdict here makes the whole stack unhealthy (else only degraded).
    pub required: bool,
    /// What it said.
    pub check: Check,
}

/// The health of the whole stack: the worst of its required sources (an optional source at
/// worst degrades it), and what each said. `Display` gives one line: `"degraded: orders: 1 of 4
/// endpoints ready (…)"`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The aggregate state.
    pub state: State,
    /// Every source, in the order they were added.
    pub sources: Vec<SourceReport>,
}

impl Report {
    /// `"name: reason"` for every source that is not healthy.
    pub fn reasons(&self) -> impl Iterator<Item = String> + '_ {
        self.sources
            .iter()
            .filter(|s| s.check.state != State::Healthy)
            .map(|s| match &s.check.reason {
                Some(reason) => format!("{}: {reason}", s.name),
                None => format!("{}: {}", s.name, s.check.state),
            })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.state.as_str())?;
        let mut sep = ": ";
        for reason in self.reasons() {
            write!(f, "{sep}{reason}")?;
            sep = "; ";
        }
        Ok(())
    }
}

struct Entry {
    name: Arc<str>,
    required: bool,
    source: Box<dyn Source>,
}

/// Aggregates sources into one [`Report`]. Cheap to clone; clones share the sources. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Readiness {
    entries: Arc<Vec<Entry>>,
    interval: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readiness")
            .field(
                "sources",
                &self.entries.iter().map(|e| &*e.name).collect::<Vec<_>>(),
            )
            .field("interval", &self.interval)
            .finish()
    }
}

impl Readiness {
    /// No sources yet (and so healthy). Sources that cannot signal are re-checked every second.
    pub fn new() -> Self {
        Readiness {
            entries: Arc::new(Vec::new()),
            interval: Duration::from_secs(1),
        }
    }

    /// Adds a required source: unhealthy here makes the stack unhealthy.
    pub fn source(self, name: impl Into<String>, source: impl Source) -> Self {
        self.push(name.into(), true, Box::new(source))
    }

    /// Adds an optional source: unhealthy here only makes the stack degraded.
    pub fn optional(self, name: impl Into<String>, source: impl Source) -> Self {
        self.push(name.into(), false, Box::new(source))
    }

    /// How often [`changed`](Self::changed) re-checks sources that cannot signal (at least 10 ms).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    fn push(mut self, name: String, required: bool, source: Box<dyn Source>) -> Self {
        let entry = Entry {
            name: name.into(),
            required,
            source,
        };
        match Arc::get_mut(&mut self.entries) {
            Some(entries) => entries.push(entry),
            None => {
                // Shared already: the clones keep the sources they had.
                let mut entries: Vec<Entry> = Vec::with_capacity(self.entries.len() + 1);
                for e in self.entries.iter() {
                    entries.push(Entry {
                        name: e.name.clone(),
                        required: e.required,
                        source: Box::new(Shared(self.entries.clone(), entries.len())),
                    });
                }
                entries.push(entry);
                self.entries = Arc::new(entries);
            }
        }
        self
    }

    /// Checks every source now.
    pub fn report(&self) -> Report {
        let sources: Vec<SourceReport> = self
            .entries
            .iter()
            .map(|e| SourceReport {
                name: e.name.clone(),
                required: e.required,
                check: e.source.check(),
            })
            .collect();
        let state = sources
            .iter()
            .map(|s| {
                if s.required {
                    s.check.state
                } else {
                    s.check.state.min(State::Degraded)
                }
            })
            .max()
            .unwrap_or(State::Healthy);
        Report { state, sources }
    }

    /// Waits until the report differs from `since`, and returns the new one: at once when a
    /// signalling source changes, else at the next interval that sees a change.
    pub async fn changed(&self, since: &Report) -> Report {
        loop {
            let now = self.report();
            if &now != since {
                return now;
            }
            let mut waits: Vec<Changed> = self
                .entries
                .iter()
                .zip(&now.sources)
                .filter_map(|(e, s)| e.source.changed(&s.check))
                .collect();
            waits.push(Box::pin(tokio::time::sleep(self.interval)));
            let _ = select_all(waits).await;
        }
    }

    /// Keeps `reporter`'s status for `service` in step with the stack: `SERVING` while it is
    /// healthy or degraded, `NOT_SERVING` while unhealthy. Runs until dropped; spawn it:
    /// `tokio::spawn(readiness.drive_health(reporter, "my.Service"))`.
    pub fn drive_health(
        &self,
        reporter: HealthReporter,
        service: impl Into<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let readiness = self.clone();
        let service = service.into();
        async move {
            let mut report = readiness.report();
            let mut serving = None;
            loop {
                let now = serving_status(report.state);
                if serving != Some(now) {
                    tracing::info!(service = %service, report = %report, "readiness changed");
                    reporter.set_service_status(&service, now).await;
                    serving = Some(now);
                }
                report = readiness.changed(&report).await;
            }
        }
        .boxed()
    }
}

/// The `grpc.health.v1` status a state maps to.
pub fn serving_status(state: State) -> ServingStatus {
    if state.is_ready() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// A source of an older, shared `Readiness`, by index.
struct Shared(Arc<Vec<Entry>>, usize);

impl Source for Shared {
    fn check(&self) -> Check {
        self.0[self.1].source.check()
    }

    fn changed(&self, since: &Check) -> Option<Changed> {
        self.0[self.1].source.changed(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn switch(initial: Check) -> (Arc<Mutex<Check>>, impl Source) {
        let cell = Arc::new(Mutex::new(initial));
        let read = cell.clone();
        (cell, from_fn(move || read.lock().unwrap().clone()))
    }

    #[test]
    fn worst_required_source_wins_and_optional_only_degrades() {
        let (a, src_a) = switch(Check::healthy());
        let (b, src_b) = switch(Check::healthy());
        let r = Readiness::new().source("a", src_a).optional("b", src_b);
        assert_eq!(r.report().state, State::Healthy);
        *b.lock().unwrap() = Check::unhealthy("down");
        assert_eq!(r.report().state, State::Degraded);
        assert_eq!(r.report().to_string(), "degraded: b: down");
        *a.lock().unwrap() = Check::unhealthy("gone");
        let report = r.report();
        assert_eq!(report.state, State::Unhealthy);
        assert_eq!(report.to_string(), "unhealthy: a: gone; b: down");
        assert_eq!(Readiness::new().report().state, State::Healthy);
    }

    #[test]
    fn adding_to_a_shared_readiness_keeps_the_clone_as_it_was() {
        let r = Readiness::new().source("a", from_fn(Check::healthy));
        let clone = r.clone();
        let r = r.source("b", from_fn(|| Check::unhealthy("x")));
        assert_eq!(clone.report().sources.len(), 1);
        assert_eq!(r.report().sources.len(), 2);
        assert_eq!(r.report().state, State::Unhealthy);
    }

    #[tokio::test(start_paused = true)]
    async fn polled_sources_are_seen_on_the_interval() {
        let (a, src) = switch(Check::healthy());
        let r = Readiness::new()
            .source("a", src)
            .interval(Duration::from_secs(5));
        let before = r.report();
        let start = tokio::time::Instant::now();
        let flip = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(12)).await;
            *a.lock().unwrap() = Check::unhealthy("down");
        });
        let after = r.changed(&before).await;
        assert_eq!(after.state, State::Unhealthy);
        assert_eq!(start.elapsed(), Duration::from_secs(15));
        flip.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drive_health_flips_the_reporter() {
        let (a, src) = switch(Check::healthy());
        let r = Readiness::new()
            .source("a", src)
            .interval(Duration::from_millis(100));
        let reporter = HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let driver = tokio::spawn(r.drive_health(reporter, "svc"));
        async fn status(service: &tonic_health::server::HealthService) -> i32 {
            use tonic_health::pb::health_server::Health;
            let req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: "svc".into(),
            });
            service.check(req).await.unwrap().into_inner().status
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(status(&service).await, ServingStatus::Serving as i32);
        *a.lock().unwrap() = Check::unhealthy("down");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(status(&service).await, ServingStatus::NotServing as i32);
        driver.abort();
    }
}
