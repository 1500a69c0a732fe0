//! The balancer's background work: follow discovery, keep one connection task per endpoint,
//! apply health verdicts, run outlier detection. It is the only writer of the endpoint table.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use futures::future::poll_fn;
use futures::stream::FusedStream;
use http::Uri;
use tokio::sync::futures::Notified;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tower::ServiceExt;

use super::endpoint::{
    CallEvent, EndpointId, EndpointService, EwmaConfig, Feedback, Load, MakeEndpoint, authority,
};
use super::table::{Connection, Counts, Health, Shared, Slot, Table};
use crate::BoxError;
use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::deadline::instant_after;
use crate::discover::{self, Change, Discover};
use crate::health::{HealthCheck, Verdict};
use crate::outlier::{Host, OutlierDetection};
use crate::status::describe_error;

/// What an endpoint's connection task tells the driver.
enum EndpointEvent<S> {
    Connecting(EndpointId),
    Connected(EndpointId, S, u64),
    Down(EndpointId, String),
    Health(EndpointId, Verdict),
    /// The endpoint's service is not ready (a pool with no live connection): out of rotation,
    /// with the reason, until `ServiceReady`.
    NotReady(EndpointId, String),
    ServiceReady(EndpointId),
}

pub(crate) struct Driver<M, S> {
    pub(crate) shared: Arc<Shared<S>>,
    pub(crate) make: M,
    pub(crate) health_check: Option<HealthCheck>,
    pub(crate) detection: Option<OutlierDetection>,
    pub(crate) reconnect: Backoff,
    pub(crate) ewma: EwmaConfig,
    /// The clock every endpoint's RTT estimate reads (see `Clock`).
    pub(crate) clock: Clock,
    pub(crate) feedback: Arc<Feedback>,
}

impl<M, S> Driver<M, S> {
    pub(crate) fn new(
        shared: Arc<Shared<S>>,
        make: M,
        health_check: Option<HealthCheck>,
        detection: Option<OutlierDetection>,
        reconnect: Backoff,
        ewma: EwmaConfig,
        measures_rtt: bool,
    ) -> (Self, mpsc::UnboundedReceiver<CallEvent>) {
        let (events, calls) = mpsc::unbounded_channel();
        let driver = Driver {
            shared,
            make,
            health_check,
            feedback: Arc::new(Feedback {
                detection: detection.clone(),
                events,
                measures_rtt,
            }),
            detection,
            reconnect,
            ewma,
            // Chosen as the balancer starts, inside its runtime: Tokio's clock if it is paused.
            // When no call is timed, only snapshots read it, and Tokio's will do.
            clock: if measures_rtt {
                Clock::new()
            } else {
                Clock::tokio()
            },
        };
        (driver, calls)
    }
}

/// The most endpoint reports applied in one table update: enough to take a thousand endpoints
/// becoming ready in a few updates, few enough that discovery and calls' events wait little.
const EVENT_BATCH: usize = 256;

struct Known {
    id: EndpointId,
    task: AbortHandle,
    /// The endpoint's shared state, kept to restart its task.
    load: Arc<Load>,
    /// How many times in a row its task ended (panicked) before it connected: the backoff step.
    restarts: u32,
}

impl<M, S> Driver<M, S>
where
    M: MakeEndpoint<Endpoint = S>,
    S: EndpointService,
{
    pub(crate) async fn run(
        self,
        discovery: impl Discover,
        mut calls: mpsc::UnboundedReceiver<CallEvent>,
    ) {
        let discovery = discovery.fuse();
        tokio::pin!(discovery);
        let (endpoint_tx, mut endpoint_rx) = mpsc::unbounded_channel::<EndpointEvent<S>>();
        let mut tasks = JoinSet::new();
        let mut known: HashMap<Uri, Known> = HashMap::new();
        let mut next_id: EndpointId = 0;
        let mut events = Vec::with_capacity(EVENT_BATCH);
        let interval = self
            .detection
            .as_ref()
            .map_or(Duration::from_secs(3600), |d| d.interval);
        let mut outlier_tick =
            tokio::time::interval_at(instant_after(Instant::now(), interval), interval);
        outlier_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let next_unejection = self.next_unejection();
            tokio::select! {
                change = discovery.next(), if !discovery.is_terminated() => match change {
                    Some(Ok(Change::Insert(uri, meta))) => {
                        if let Some(old) = known.get(&uri) {
                            // Besides its address, discovery says only an endpoint's weight: a
                            // new one (a DNS SRV update) applies in place, keeping the connection
                            // and the calls on it. (Destructured so that a new field must be
                            // decided on here.)
                            let discover::Endpoint { weight } = meta;
                            if old.load.weight() != weight.max(1) {
                                let id = old.id;
                                self.shared.update(|t| t.reweigh(id, weight));
                            }
                            continue;
                        }
                        next_id += 1;
                        let id = next_id;
                        let load = Arc::new(Load::new(
                            id,
                            uri.clone(),
                            meta,
                            self.ewma,
                            self.clock,
                            self.feedback.clone(),
                        ));
                        self.shared.update(|t| t.slots.push(Slot::new(load.clone())));
                        let task = tasks.spawn(endpoint_task(
                            id,
                            uri.clone(),
                            self.make.clone(),
                            load.clone(),
                            self.health_check.clone(),
                            self.reconnect,
                            endpoint_tx.clone(),
                        ));
                        known.insert(uri, Known { id, task, load, restarts: 0 });
                    }
                    Some(Ok(Change::Remove(uri))) => {
                        if let Some(old) = known.remove(&uri) {
                            self.drain(old);
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "discovery failed; keeping the last endpoint set");
                    }
                    None => tracing::debug!("discovery ended; keeping the last endpoint set"),
                },
                // Every report waiting goes into one table update: when many endpoints become
                // ready at once (a start, a network coming back), the candidate set and the
                // strategy's state (a hash ring) are rebuilt once per wake-up, not once each.
                1.. = endpoint_rx.recv_many(&mut events, EVENT_BATCH) => {
                    for event in &events {
                        if let EndpointEvent::Connected(id, ..) = event
                            && let Some(endpoint) = known.values_mut().find(|k| k.id == *id)
                        {
                            endpoint.restarts = 0;
                        }
                    }
                    self.apply(events.drain(..));
                }
                Some(event) = calls.recv() => match event {
                    CallEvent::FailureStreak(id) => self.eject_for_failures(id),
                    CallEvent::Drained(id) => self.shared.update(|t| {
                        t.slots.retain(|s| !(s.load.id == id && s.draining && s.load.in_flight.load(Ordering::Acquire) == 0));
                    }),
                },
                _ = outlier_tick.tick(), if self.detection.is_some() => self.evaluate_outliers(),
                _ = sleep_until_opt(next_unejection), if next_unejection.is_some() => {
                    let detection = self.detection.as_ref().expect("only set with detection");
                    let now = Instant::now();
                    self.with_hosts(Counts::Peek, |hosts, _| detection.uneject_expired(hosts, now));
                }
                Some(ended) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.restart_ended(ended, &mut known, &mut tasks, &endpoint_tx);
                }
            }
        }
    }

    /// An endpoint task never ends on its own: one that did panicked (in the user's
    /// `MakeService`, a health check, …). If its endpoint is still known, the endpoint must not
    /// stay "connecting" forever: it is down, saying why, and its task starts again after the
    /// reconnect backoff. A task that was aborted (its endpoint was removed) is done with.
    fn restart_ended(
        &self,
        ended: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
        known: &mut HashMap<Uri, Known>,
        tasks: &mut JoinSet<()>,
        endpoint_tx: &mpsc::UnboundedSender<EndpointEvent<S>>,
    ) {
        let (task_id, why) = match ended {
            Ok((task_id, ())) => (task_id, "its connection task ended".to_owned()),
            Err(err) if err.is_cancelled() => return,
            Err(err) => {
                let task_id = err.id();
                let why = match err.try_into_panic() {
                    Ok(panic) => format!(
                        "its connection task panicked: {}",
                        crate::connect::panic_message(&*panic)
                    ),
                    Err(err) => format!("its connection task failed: {err}"),
                };
                (task_id, why)
            }
        };
        // Aborted tasks of removed endpoints may still end here: only a known endpoint's current
        // task is restarted.
        let Some((uri, endpoint)) = known.iter_mut().find(|(_, k)| k.task.id() == task_id) else {
            return;
        };
        endpoint.restarts = endpoint.restarts.saturating_add(1);
        let delay = self.reconnect.delay(endpoint.restarts, Duration::ZERO);
        tracing::error!(
            endpoint = %authority(uri),
            reason = %why,
            "balancer endpoint task ended; restarting it after the reconnect backoff"
        );
        self.apply([EndpointEvent::Down(
            endpoint.id,
            format!(
                "{}: {why} (restarting in {:.1} s)",
                authority(uri),
                delay.as_secs_f64()
            ),
        )]);
        let task = endpoint_task(
            endpoint.id,
            uri.clone(),
            self.make.clone(),
            endpoint.load.clone(),
            self.health_check.clone(),
            self.reconnect,
            endpoint_tx.clone(),
        );
        endpoint.task = tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            task.await;
        });
    }

    /// Stops new calls to an endpoint; it leaves the table once its last call finishes.
    fn drain(&self, endpoint: Known) {
        endpoint.task.abort();
        self.shared.update(|t| {
            if let Some(slot) = t.slot_mut(endpoint.id) {
                slot.draining = true;
                // SeqCst: pairs with the last call's decrement (see `CallGuard::drop`).
                slot.load.signals.draining.store(true, Ordering::SeqCst);
                slot.service = None;
            }
            t.slots
                .retain(|s| !(s.draining && s.load.in_flight.load(Ordering::SeqCst) == 0));
        });
    }

    /// Applies endpoints' reports, in order, in one table update.
    fn apply(&self, events: impl IntoIterator<Item = EndpointEvent<S>>) {
        self.shared.update(|t| {
            for event in events {
                self.apply_one(t, event);
            }
        });
    }

    fn apply_one(&self, t: &mut Table<S>, event: EndpointEvent<S>) {
        match event {
            EndpointEvent::Connecting(id) => {
                if let Some(slot) = t.slot_mut(id) {
                    slot.connection = Connection::Connecting;
                }
            }
            EndpointEvent::Connected(id, service, generation) => {
                let healthy = if self.health_check.is_some() {
                    Health::Unknown
                } else {
                    Health::Serving
                };
                // A connection that raced with removal must not be kept for a draining endpoint.
                if let Some(slot) = t.slot_mut(id).filter(|s| !s.draining) {
                    slot.load.forget_rtt();
                    slot.connection = Connection::Connected;
                    slot.service = Some(service);
                    slot.service_ready = true;
                    slot.generation = generation;
                    slot.health = healthy;
                    slot.reason = None;
                }
            }
            EndpointEvent::NotReady(id, reason) => {
                if let Some(slot) = t.slot_mut(id) {
                    slot.service_ready = false;
                    slot.reason = Some(reason);
                    // The health verdict stands: a Watch that outlived the spell has nothing new
                    // to say (forgetting it would leave the endpoint waiting for a report that
                    // never comes), and one that ended reports afresh on its new stream.
                }
            }
            EndpointEvent::ServiceReady(id) => {
                if let Some(slot) = t.slot_mut(id) {
                    slot.service_ready = true;
                    if slot.health != Health::NotServing {
                        slot.reason = None;
                    }
                }
            }
            EndpointEvent::Down(id, reason) => {
                if let Some(slot) = t.slot_mut(id) {
                    slot.connection = Connection::Down;
                    slot.service = None;
                    slot.health = Health::Unknown;
                    slot.reason = Some(reason);
                }
            }
            EndpointEvent::Health(id, verdict) => {
                let Some(slot) = t.slots.iter_mut().find(|s| s.load.id == id) else {
                    return;
                };
                let was = slot.health;
                {
                    match verdict {
                        Verdict::Serving => {
                            if was != Health::Serving {
                                t.metrics.became_serving.increment(1);
                            }
                            slot.health = Health::Serving;
                            slot.reason = None;
                        }
                        Verdict::NotServing(reason) => {
                            if was != Health::NotServing {
                                t.metrics.became_not_serving.increment(1);
                            }
                            slot.health = Health::NotServing;
                            slot.reason = Some(reason);
                        }
                    }
                }
            }
        }
    }

    /// Runs `f` over the live endpoints' outlier state (with this interval's outcome counts,
    /// taken when `counts` says so) and the endpoints' ids, in one table update, and writes the
    /// ejections back.
    fn with_hosts<T>(&self, counts: Counts, f: impl FnOnce(&mut [Host], &[EndpointId]) -> T) -> T {
        self.shared.update(|t| {
            let (live, mut hosts) = t.outlier_hosts(counts);
            let ids: Vec<EndpointId> = live.iter().map(|&i| t.slots[i].load.id).collect();
            let ejections_before: u32 = hosts.iter().map(|h| h.ejection.count).sum();
            let result = f(&mut hosts, &ids);
            let ejections_after: u32 = hosts.iter().map(|h| h.ejection.count).sum();
            t.metrics
                .ejections
                .increment(u64::from(ejections_after - ejections_before));
            let mut ended = false;
            for (&i, host) in live.iter().zip(&hosts) {
                let slot = &mut t.slots[i];
                ended |= slot.ejection.ejected_at.is_some() && host.ejection.ejected_at.is_none();
                slot.ejection = host.ejection;
            }
            // An ejection ended: its probe may report a streak again, and so may an endpoint
            // whose streak the ejection limit kept in (there is room now).
            if ended {
                for &i in &live {
                    t.slots[i].load.rearm_streak();
                }
            }
            result
        })
    }

    fn evaluate_outliers(&self) {
        let Some(detection) = &self.detection else {
            return;
        };
        let now = Instant::now();
        self.with_hosts(Counts::Take, |hosts, _| {
            detection.evaluate(hosts, now, &mut |percent| fastrand::u32(0..100) < percent);
        });
    }

    /// An endpoint's failure streak reached the threshold (reported once per streak).
    fn eject_for_failures(&self, id: EndpointId) {
        let Some(detection) = &self.detection else {
            return;
        };
        let now = Instant::now();
        let ejected = self.with_hosts(Counts::Peek, |hosts, ids| {
            ids.iter()
                .position(|&live| live == id)
                .is_some_and(|index| detection.eject_for_failures(hosts, index, now))
        });
        if ejected {
            tracing::info!(endpoint = id, "ejected after consecutive failures");
        }
    }

    fn next_unejection(&self) -> Option<Instant> {
        let detection = self.detection.as_ref()?;
        self.shared.inspect(|t| {
            detection.next_unejection(t.slots.iter().filter(|s| !s.draining).map(|s| s.ejection))
        })
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Keeps one endpoint connected: connect, watch health, notice breakage, reconnect with backoff.
async fn endpoint_task<M, S>(
    id: EndpointId,
    uri: Uri,
    mut make: M,
    load: Arc<Load>,
    health_check: Option<HealthCheck>,
    backoff: Backoff,
    events: mpsc::UnboundedSender<EndpointEvent<S>>,
) where
    M: MakeEndpoint<Endpoint = S>,
    S: EndpointService,
{
    let mut failures: u32 = 0;
    let mut generation: u64 = 0;
    loop {
        let _ = events.send(EndpointEvent::Connecting(id));
        let ready: Result<(), BoxError> = make.ready().await.map(|_| ()).map_err(Into::into);
        let connected = match ready {
            Ok(()) => make.call(uri.clone()).await.map_err(Into::into),
            Err(err) => Err(err),
        };
        let service = match connected {
            Ok(service) => service,
            Err(err) => {
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures, Duration::ZERO);
                let reason = format!(
                    "connect to {} failed: {} (retrying in {:.1} s)",
                    authority(&uri),
                    describe_error(&*err),
                    delay.as_secs_f64()
                );
                let _ = events.send(EndpointEvent::Down(id, reason));
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        generation += 1;
        load.signals.generation.store(generation, Ordering::Release);
        let connected_at = Instant::now();
        // Listen for breakage before any call can reach the new connection.
        let broken = load.signals.broken.notified();
        tokio::pin!(broken);
        broken.as_mut().enable();
        let _ = events.send(EndpointEvent::Connected(id, service.clone(), generation));

        let reason =
            keep_service(id, &service, &load, health_check.as_ref(), &events, broken).await;
        // Reconnect at once after a connection that lived; back off after one that broke at once,
        // so that an endpoint which accepts and then fails never spins.
        if connected_at.elapsed() < backoff.initial() {
            failures = failures.saturating_add(1);
            let delay = backoff.delay(failures, Duration::ZERO);
            let _ = events.send(EndpointEvent::Down(
                id,
                format!("{reason} (reconnecting in {:.1} s)", delay.as_secs_f64()),
            ));
            tokio::time::sleep(delay).await;
        } else {
            failures = 0;
            let _ = events.send(EndpointEvent::Down(id, reason));
        }
    }
}

type Readiness = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// Serves one endpoint service until it must be replaced, and says why.
///
/// Meanwhile: runs the health check over it, and gates the endpoint on the service's own
/// readiness, as tower's `ReadyCache` does for p2c. When a call finds the service not ready, or
/// fails with the service's own `UNAVAILABLE` (a pool whose connection broke), its readiness is
/// checked at once: still ready (a pool with other live connections) changes nothing; not ready
/// (a pool with none) takes the endpoint out of rotation until the service is ready again (the
/// pool reconnected, with its own backoff). The service is replaced only when it fails for good
/// (its `poll_ready` errs), or when a bare connection (tonic's `Channel`) breaks under a call or
/// the health check.
async fn keep_service<S: EndpointService>(
    id: EndpointId,
    service: &S,
    load: &Load,
    health_check: Option<&HealthCheck>,
    events: &mpsc::UnboundedSender<EndpointEvent<S>>,
    mut broken: Pin<&mut Notified<'_>>,
) -> String {
    let health = async {
        match health_check {
            Some(check) => {
                let report = |verdict| {
                    let _ = events.send(EndpointEvent::Health(id, verdict));
                };
                let trouble = || {
                    load.signals
                        .check_readiness(|| "its health watch ended".to_owned())
                };
                crate::health::run(check, service.clone(), report, trouble).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(health);
    let mut recovering: Option<Readiness> = None;
    // Armed while the service is not ready but may be in a moment (a pool replacing a
    // connection its server aged out): the endpoint leaves rotation only when it fires.
    let mut grace: Option<(Pin<Box<tokio::time::Sleep>>, String)> = None;
    loop {
        tokio::select! {
            err = &mut health => {
                if crate::status::is_too_many_pings(&*err) {
                    let generation = load.signals.generation.load(Ordering::Acquire);
                    load.signals.note_ping_strike(&load.uri, generation);
                }
                return format!(
                    "connection failed under the health check: {}",
                    describe_error(&*err)
                );
            }
            _ = broken.as_mut() => return "a call failed on the connection".to_owned(),
            _ = load.signals.not_ready.notified(), if recovering.is_none() => {
                let mut probe = service.clone();
                match futures::poll!(poll_fn(|cx| probe.poll_ready(cx))) {
                    Poll::Ready(Ok(())) => {
                        load.signals.take_not_ready_reason();
                    }
                    Poll::Ready(Err(err)) => {
                        let err: BoxError = err.into();
                        return format!("the endpoint's service failed: {}", describe_error(&*err));
                    }
                    Poll::Pending => {
                        let reason = load.signals.take_not_ready_reason().unwrap_or_default();
                        let reason = if reason.is_empty() {
                            "not ready (no live connection)".to_owned()
                        } else {
                            format!("not ready: {reason}")
                        };
                        grace = Some((Box::pin(tokio::time::sleep(NOT_READY_GRACE)), reason));
                        recovering = Some(Box::pin(until_ready(service.clone())));
                    }
                }
            }
            reason = grace_over(&mut grace) => {
                let _ = events.send(EndpointEvent::NotReady(id, reason));
            }
            ready = wait_for(&mut recovering) => {
                recovering = None;
                match ready {
                    Ok(()) => {
                        load.signals.take_not_ready_reason();
                        // Ready within the grace: it never left rotation.
                        if grace.take().is_none() {
                            let _ = events.send(EndpointEvent::ServiceReady(id));
                        }
                    }
                    Err(err) => {
                        return format!("the endpoint's service failed: {}", describe_error(&*err));
                    }
                }
            }
        }
    }
}

/// Resolves once `service` is ready for a call: `poll_ready` on a fresh handle is ready at once.
///
/// The second look matters: a handle may turn ready without a usable connection (a pool past its
/// `wait_timeout` lets that handle's next call fail fast with `UNAVAILABLE`), and the endpoint
/// must not return to rotation for that.
async fn until_ready<S: EndpointService>(service: S) -> Result<(), BoxError> {
    loop {
        let mut waiting = service.clone();
        poll_fn(|cx| waiting.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        drop(waiting);
        let mut fresh = service.clone();
        match futures::poll!(poll_fn(|cx| fresh.poll_ready(cx))) {
            Poll::Ready(result) => return result.map_err(Into::into),
            Poll::Pending => continue,
        }
    }
}

/// How long an endpoint whose service is not ready stays in rotation, in case it is ready again
/// at once: a pool reconnects a connection its server closed gracefully (a max connection age,
/// gRFC A9) in about one round trip, and that is no reason to flap. Calls that pick it meanwhile
/// go to another endpoint. A server that is gone (a refused or failing connect) is out after it.
const NOT_READY_GRACE: Duration = Duration::from_millis(200);

/// Fires once the grace runs out, yielding the reason the endpoint is not ready.
async fn grace_over(grace: &mut Option<(Pin<Box<tokio::time::Sleep>>, String)>) -> String {
    match grace {
        Some((sleep, _)) => {
            sleep.await;
            grace.take().map(|(_, reason)| reason).unwrap_or_default()
        }
        None => std::future::pending().await,
    }
}

async fn wait_for(readiness: &mut Option<Readiness>) -> Result<(), BoxError> {
    match readiness {
        Some(readiness) => readiness.await,
        None => std::future::pending().await,
    }
}

/// Aborts the driver when the last balancer handle is dropped.
#[derive(Debug)]
pub(crate) struct DriverGuard(pub(crate) Option<AbortHandle>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
