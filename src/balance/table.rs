//! The endpoint table: every known endpoint's condition (written only by the driver), and the
//! candidate list calls pick from (read by every call, under a read lock).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use http::Request;
use http::request::Parts;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::Status;

use super::endpoint::{Candidate, EndpointId, EndpointSnapshot, EndpointState, Load};
use super::metrics::BalanceMetrics;
use super::strategy::Strategy;
use crate::outlier::{Ejection, Host};

/// What the driver knows about an endpoint's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Connection {
    Connecting,
    Connected,
    Down,
}

/// What active health checking last said. `Unknown` until the first report when a check is
/// configured (gRFC A17: not ready before the first health response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Unknown,
    Serving,
    NotServing,
}

pub(crate) struct Slot<S> {
    pub(crate) load: Arc<Load>,
    pub(crate) service: Option<S>,
    /// The service's own readiness, as the endpoint task last saw it: a pool with no live
    /// connection is connected (it keeps reconnecting) but not ready.
    pub(crate) service_ready: bool,
    pub(crate) generation: u64,
    pub(crate) connection: Connection,
    pub(crate) health: Health,
    pub(crate) ejection: Ejection,
    pub(crate) draining: bool,
    pub(crate) reason: Option<String>,
    /// Whether it is a candidate, as of the last rebuild (for snapshots, without a search).
    receiving: bool,
    /// Its state and reason as of the last rebuild: a rebuild that changes either is a change
    /// of the table's conditions (see `Table::conditions`).
    shown: (EndpointState, Option<String>),
}

impl<S> Slot<S> {
    pub(crate) fn new(load: Arc<Load>) -> Self {
        Slot {
            load,
            service: None,
            service_ready: false,
            generation: 0,
            connection: Connection::Connecting,
            health: Health::Unknown,
            ejection: Ejection::default(),
            draining: false,
            reason: None,
            receiving: false,
            shown: (EndpointState::Connecting, None),
        }
    }

    fn state(&self) -> EndpointState {
        match (self.draining, self.connection, self.health) {
            (true, ..) => EndpointState::Draining,
            (_, Connection::Connecting, _) => EndpointState::Connecting,
            (_, Connection::Down, _) => EndpointState::Down,
            _ if !self.service_ready => EndpointState::Connecting,
            _ if self.ejection.ejected_at.is_some() => EndpointState::Ejected,
            (_, Connection::Connected, Health::Unknown) => EndpointState::Connecting,
            (_, Connection::Connected, Health::NotServing) => EndpointState::Unhealthy,
            (_, Connection::Connected, Health::Serving) => EndpointState::Ready,
        }
    }

    fn connected(&self) -> bool {
        !self.draining
            && self.connection == Connection::Connected
            && self.service_ready
            && self.service.is_some()
    }
}

pub(crate) struct Table<S> {
    strategy: Box<dyn Strategy>,
    panic_threshold: f64,
    pub(crate) slots: Vec<Slot<S>>,
    candidates: Vec<Candidate>,
    services: Vec<(S, u64)>,
    panic: bool,
    /// A candidate's weight changed in place: the strategy must see the set again.
    reweighed: bool,
    /// Counts changes of any endpoint's state or reason, or of the set of endpoints: what a
    /// readiness check reads. Other updates (an outlier interval that ejects no one, a
    /// reconnect attempt of an endpoint already down for the same reason) leave it.
    conditions: u64,
    shown_slots: usize,
    unavailable: Arc<str>,
    /// Some endpoint may still become ready on its own: it is connecting (or awaiting its first
    /// health report), or nothing has been discovered yet.
    settling: bool,
    pub(crate) metrics: BalanceMetrics,
}

/// A new candidate set, with the slots it was taken from, waiting for its strategy.
struct NextCandidates {
    candidates: Vec<Candidate>,
    chosen: Vec<usize>,
}

/// Whether reading the outcome counts for outlier detection ends their interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counts {
    /// Read them and start the next interval from zero, in one step.
    Take,
    /// Read them only.
    Peek,
}

/// Why no endpoint can take a call right now.
#[derive(Debug, Clone)]
pub(crate) struct Unavailable {
    pub(crate) reason: Arc<str>,
    /// Whether waiting may help (an endpoint is connecting), as opposed to every endpoint being in
    /// transient failure (down, unhealthy, ejected).
    pub(crate) settling: bool,
}

/// An endpoint chosen for one call.
pub(crate) struct Picked<S> {
    pub(crate) load: Arc<Load>,
    pub(crate) service: S,
    pub(crate) generation: u64,
}

pub(crate) struct Shared<S> {
    table: RwLock<Table<S>>,
    changed: Notify,
    /// The head shown to a strategy that does not read the request's
    /// ([`Strategy::reads_request`]), fixed with the strategy's kind at construction: such a
    /// pick moves no request apart and back together, two copies of its head per call.
    blank_head: Option<Parts>,
}

impl<S: Clone> Shared<S> {
    pub(crate) fn new(
        strategy: Box<dyn Strategy>,
        panic_threshold: f64,
        metrics: BalanceMetrics,
    ) -> Self {
        let blank_head = (!strategy.reads_request()).then(|| Request::new(()).into_parts().0);
        Shared {
            blank_head,
            table: RwLock::new(Table {
                strategy,
                panic_threshold,
                slots: Vec::new(),
                candidates: Vec::new(),
                services: Vec::new(),
                panic: false,
                reweighed: false,
                conditions: 0,
                shown_slots: 0,
                unavailable: "no endpoints discovered yet".into(),
                settling: true,
                metrics,
            }),
            changed: Notify::new(),
        }
    }

    /// A table that never has endpoints: every call fails with `reason`.
    pub(crate) fn failed(
        strategy: Box<dyn Strategy>,
        reason: impl Into<Arc<str>>,
        metrics: BalanceMetrics,
    ) -> Self {
        let shared = Shared::new(strategy, 0.0, metrics);
        shared.write().unavailable = reason.into();
        shared
    }

    fn read(&self) -> RwLockReadGuard<'_, Table<S>> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table<S>> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes endpoints' conditions, then recomputes the candidates and wakes waiting calls.
    ///
    /// When the candidate set changes, the strategy's new state (a hash ring, a weighted
    /// schedule) is built off the write lock ([`Strategy::prepare`]), while calls go on picking
    /// from the old set, and swapped in with the new set at once. Only the driver writes the
    /// table, so nothing else changes it in between.
    pub(crate) fn update<T>(&self, change: impl FnOnce(&mut Table<S>) -> T) -> T {
        let (result, next) = {
            let mut table = self.write();
            let result = change(&mut table);
            (result, table.rebuild())
        };
        if let Some(next) = next {
            let prepared = self.read().strategy.prepare(&next.candidates);
            self.write().install(next, prepared);
        }
        self.changed.notify_waiters();
        result
    }

    /// Reads the table without changing it.
    pub(crate) fn inspect<T>(&self, look: impl FnOnce(&Table<S>) -> T) -> T {
        look(&self.read())
    }

    /// Picks an endpoint for a call, skipping `exclude` (endpoints that already failed this call).
    /// The chosen endpoint's in-flight count is raised before the lock is released.
    pub(crate) fn pick(
        &self,
        parts: &Parts,
        exclude: &[EndpointId],
    ) -> Result<Picked<S>, Unavailable> {
        let table = self.read();
        let candidates = &table.candidates;
        if candidates.is_empty() {
            return Err(table.why_unavailable());
        }
        // Strategies return an index in range; the division is for those that do not.
        let mut index = table.strategy.pick(parts, candidates);
        if index >= candidates.len() {
            index %= candidates.len();
        }
        if exclude.contains(&candidates[index].load.id) {
            index = (0..candidates.len())
                .find(|&i| !exclude.contains(&candidates[i].load.id))
                .ok_or_else(|| Unavailable {
                    reason: table.unavailable_after_failover(candidates.len()),
                    settling: false,
                })?;
        }
        let load = candidates[index].load.clone();
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        let (service, generation) = table.services[index].clone();
        Ok(Picked {
            load,
            service,
            generation,
        })
    }

    /// The head to show the strategy instead of the request's, when it does not read it.
    pub(crate) fn blank_head(&self) -> Option<&Parts> {
        self.blank_head.as_ref()
    }

    /// Whether an endpoint other than `exclude` (tried already) and `current` may take calls.
    pub(crate) fn has_candidate_besides(
        &self,
        exclude: &[EndpointId],
        current: EndpointId,
    ) -> bool {
        self.read()
            .candidates
            .iter()
            .any(|c| c.load.id != current && !exclude.contains(&c.load.id))
    }

    /// Waits until some endpoint may take calls, or fails at `deadline` saying why none can.
    /// With `while_settling`, it also fails as soon as no endpoint is still connecting (gRPC's
    /// behaviour for calls that are not wait-for-ready).
    pub(crate) async fn wait_for_candidates(
        &self,
        deadline: Instant,
        while_settling: bool,
    ) -> Result<(), WaitFailed> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let unavailable = {
                let table = self.read();
                if !table.candidates.is_empty() {
                    return Ok(());
                }
                if while_settling && !table.settling {
                    return Err(WaitFailed::Settled(table.unavailable.clone()));
                }
                table.unavailable.clone()
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Err(WaitFailed::TimedOut(unavailable)),
            }
        }
    }

    /// Waits until `done` holds for the snapshot, checking after every change.
    pub(crate) async fn wait_until(&self, mut done: impl FnMut(&[EndpointSnapshot]) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.snapshot()) {
                return;
            }
            notified.await;
        }
    }

    /// Reads every endpoint's address, state and reason, as of the last rebuild, with the
    /// version of those conditions (see [`conditions_changed`](Self::conditions_changed)):
    /// what a readiness check needs, without a snapshot's copies.
    pub(crate) fn with_conditions<T>(
        &self,
        look: impl FnOnce(u64, &mut dyn Iterator<Item = Condition<'_>>) -> T,
    ) -> T {
        let table = self.read();
        let mut conditions = table.slots.iter().map(|slot| Condition {
            uri: &slot.load.uri,
            state: slot.shown.0,
            reason: slot.shown.1.as_deref(),
        });
        look(table.conditions, &mut conditions)
    }

    /// Waits until some endpoint's state or reason, or the set of endpoints, differs from what
    /// version `seen` of the conditions had.
    pub(crate) async fn conditions_changed(&self, seen: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.read().conditions != seen {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<EndpointSnapshot> {
        let table = self.read();
        table
            .slots
            .iter()
            .map(|slot| EndpointSnapshot {
                uri: slot.load.uri.clone(),
                state: slot.state(),
                receiving: slot.receiving,
                in_flight: slot.load.in_flight.load(Ordering::Relaxed),
                rtt_estimate: slot.load.rtt_estimate(),
                weight: slot.load.weight(),
                ejections: slot.ejection.count,
                reason: slot.reason.clone(),
            })
            .collect()
    }

    pub(crate) fn in_panic(&self) -> bool {
        self.read().panic
    }
}

/// One endpoint's condition, as a readiness check reads it.
pub(crate) struct Condition<'a> {
    pub(crate) uri: &'a http::Uri,
    pub(crate) state: EndpointState,
    pub(crate) reason: Option<&'a str>,
}

/// Why [`Shared::wait_for_candidates`] gave up, with the reason no endpoint can take calls.
#[derive(Debug)]
pub(crate) enum WaitFailed {
    /// No endpoint is still connecting, and the caller asked not to wait for recovery.
    Settled(Arc<str>),
    /// The wait's deadline passed.
    TimedOut(Arc<str>),
}

pub(crate) fn unavailable_status(reason: &str) -> Status {
    Status::unavailable(format!("towline balance: {reason}"))
}

impl<S: Clone> Table<S> {
    /// Discovery gave endpoint `id` a new weight: applied in place, keeping its connection and
    /// its calls; weighted strategies rebuild with it.
    pub(crate) fn reweigh(&mut self, id: EndpointId, weight: u32) {
        if let Some(slot) = self.slot_mut(id)
            && slot.load.set_weight(weight)
        {
            self.reweighed = true;
        }
    }

    pub(crate) fn slot_mut(&mut self, id: EndpointId) -> Option<&mut Slot<S>> {
        self.slots.iter_mut().find(|s| s.load.id == id)
    }

    /// The live (not draining) endpoints as outlier detection sees them, in table order, with
    /// their indices in `slots`.
    pub(crate) fn outlier_hosts(&self, counts: Counts) -> (Vec<usize>, Vec<Host>) {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !self.slots[i].draining)
            .collect();
        let hosts = live
            .iter()
            .map(|&i| {
                let slot = &self.slots[i];
                let (successes, failures) = match counts {
                    Counts::Take => slot.load.take_outcomes(),
                    Counts::Peek => (
                        slot.load.successes.load(Ordering::Relaxed),
                        slot.load.failures.load(Ordering::Relaxed),
                    ),
                };
                Host {
                    successes,
                    failures,
                    ejection: slot.ejection,
                }
            })
            .collect();
        (live, hosts)
    }

    fn why_unavailable(&self) -> Unavailable {
        Unavailable {
            reason: self.unavailable.clone(),
            settling: self.settling,
        }
    }

    fn unavailable_after_failover(&self, tried: usize) -> Arc<str> {
        format!("all {tried} ready endpoints failed this call before it was sent").into()
    }

    /// Recomputes which endpoints take calls. Runs under the write lock after every change;
    /// a new candidate set is returned to be installed with its strategy (see `Shared::update`).
    fn rebuild(&mut self) -> Option<NextCandidates> {
        let live = self.slots.iter().filter(|s| !s.draining).count();
        let ready: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].connected() && self.slots[i].state() == EndpointState::Ready)
            .collect();
        let connected: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].connected())
            .collect();
        // Envoy's panic threshold: with too few ready endpoints (but some), spread over every
        // connected one rather than overload the few. With none ready, fail fast and say why.
        self.panic = !ready.is_empty()
            && connected.len() > ready.len()
            && (ready.len() as f64) < self.panic_threshold * live as f64;
        let chosen = if self.panic { connected } else { ready };

        let unchanged = chosen.len() == self.candidates.len()
            && chosen
                .iter()
                .zip(&self.candidates)
                .all(|(&i, c)| self.slots[i].load.id == c.load.id);
        let next = if unchanged && !std::mem::take(&mut self.reweighed) {
            // The same endpoints, perhaps on new connections.
            self.services = self.services_of(&chosen);
            None
        } else {
            Some(NextCandidates {
                candidates: chosen
                    .iter()
                    .map(|&i| Candidate {
                        load: self.slots[i].load.clone(),
                    })
                    .collect(),
                chosen: chosen.clone(),
            })
        };
        for slot in &mut self.slots {
            slot.receiving = false;
        }
        for &i in &chosen {
            self.slots[i].receiving = true;
        }
        let mut changed = self.slots.len() != self.shown_slots;
        self.shown_slots = self.slots.len();
        for slot in &mut self.slots {
            let state = slot.state();
            if slot.shown.0 != state || slot.shown.1 != slot.reason {
                slot.shown = (state, slot.reason.clone());
                changed = true;
            }
        }
        if changed {
            self.conditions += 1;
        }
        self.settling = self
            .slots
            .iter()
            .any(|s| !s.draining && s.shown.0 == EndpointState::Connecting);
        if chosen.is_empty() {
            self.unavailable = self.describe_unavailable(live).into();
        }
        self.metrics
            .set_endpoints(self.slots.iter().map(Slot::state));
        next
    }

    /// The services of the slots at `chosen`, with their connection generations.
    fn services_of(&self, chosen: &[usize]) -> Vec<(S, u64)> {
        chosen
            .iter()
            .map(|&i| {
                let slot = &self.slots[i];
                let service = slot
                    .service
                    .clone()
                    .expect("connected slots have a service");
                (service, slot.generation)
            })
            .collect()
    }

    /// Swaps in a new candidate set and the strategy prepared for it (or, for a strategy that
    /// prepares nothing off the lock, updates it here).
    fn install(&mut self, next: NextCandidates, prepared: Option<Box<dyn Strategy>>) {
        self.services = self.services_of(&next.chosen);
        self.candidates = next.candidates;
        match prepared {
            Some(strategy) => self.strategy = strategy,
            None => self.strategy.update(&self.candidates),
        }
    }

    fn describe_unavailable(&self, live: usize) -> String {
        if live == 0 {
            return "no endpoints discovered".into();
        }
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        for slot in self.slots.iter().filter(|s| !s.draining) {
            *by_state.entry(slot.state().as_str()).or_default() += 1;
        }
        let noun = if live == 1 { "endpoint" } else { "endpoints" };
        let mut why = if by_state.len() == 1 {
            let state = by_state.keys().next().expect("one state");
            format!("all {live} {noun} {state}")
        } else {
            let parts: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
            format!("no ready endpoint among {live}: {}", parts.join(", "))
        };
        if let Some(reason) = self
            .slots
            .iter()
            .filter(|s| !s.draining)
            .find_map(|s| s.reason.as_deref())
        {
            why.push_str(" (");
            why.push_str(reason);
            why.push(')');
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::endpoint::Load;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn taking_an_intervals_counts_loses_no_completion() {
        let shared: Shared<()> = Shared::new(
            Box::new(super::super::strategy::RoundRobin::new()),
            0.0,
            BalanceMetrics::new("test"),
        );
        let load = Arc::new(Load::unattached(1, http::Uri::from_static("http://a:1"), 1));
        shared.update(|t| t.slots.push(Slot::new(load.clone())));
        const PER_THREAD: u64 = 1_000_000;
        let done = Arc::new(AtomicBool::new(false));
        // Callers and the driver start together, so that intervals end while calls complete.
        let start = Arc::new(std::sync::Barrier::new(3));
        let callers: Vec<_> = (0..2)
            .map(|n| {
                let load = load.clone();
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..PER_THREAD {
                        load.record_outcome((i + n) % 2 == 0);
                    }
                })
            })
            .collect();
        // The driver ends intervals while calls complete: every completion lands in one.
        let (mut successes, mut failures) = (0, 0);
        let evaluator = {
            let done = done.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut intervals = 0u64;
                while !done.load(Ordering::Acquire) || intervals == 0 {
                    let (_, hosts) = shared.update(|t| t.outlier_hosts(Counts::Take));
                    successes += hosts[0].successes;
                    failures += hosts[0].failures;
                    intervals += 1;
                }
                let (_, hosts) = shared.update(|t| t.outlier_hosts(Counts::Take));
                (
                    successes + hosts[0].successes,
                    failures + hosts[0].failures,
                    intervals,
                )
            })
        };
        for caller in callers {
            caller.join().unwrap();
        }
        done.store(true, Ordering::Release);
        let (successes, failures, intervals) = evaluator.join().unwrap();
        assert!(intervals > 1, "{intervals}");
        assert_eq!(
            successes + failures,
            2 * PER_THREAD,
            "{successes} + {failures}"
        );
        assert_eq!(successes, PER_THREAD);
    }
}
