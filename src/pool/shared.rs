//! The state one pool's handles and its background worker share.
//!
//! Handles pick a connection from their [`View`] of the pool without a lock while the connection
//! it offers has room (a handle whose view is missing or stale first copies the current one,
//! an `Arc` under a read lock); otherwise (all are nearly full, none is up) under one short
//! lock, where waiting and growing are decided. The worker ([`super::worker`]) opens, replaces
//! and reaps connections. Per-call bookkeeping (in-flight counts, a connection breaking) is
//! atomics on the connection's [`ConnLoad`], so the hot path never waits on I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Uri;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::config::PoolConfig;
use super::conn::{ConnLoad, Core, InFlight, Parked, SharedError, lock, status_with_source};
use super::stats::{Metrics, PoolStats};
use crate::deadline::instant_after;

pub(crate) struct Conn<S> {
    service: S,
    load: Arc<ConnLoad>,
}

/// A handle's copy of the pool's connection list, read without the lock. It holds the services
/// weakly: a connection the pool drops closes even while idle handles still have its view.
pub(crate) struct View<S> {
    generation: u64,
    conns: Arc<[Seen<S>]>,
}

/// One connection in a [`View`]: its load, read directly, and its service, held weakly.
struct Seen<S> {
    load: Arc<ConnLoad>,
    conn: Weak<Conn<S>>,
}

impl<S> Clone for View<S> {
    fn clone(&self) -> Self {
        View {
            generation: self.generation,
            conns: self.conns.clone(),
        }
    }
}

struct State<S> {
    conns: Vec<Arc<Conn<S>>>,
    connecting: usize,
    /// A call has asked for a connection (lazy pools connect from then on).
    activated: bool,
    consecutive_failures: u32,
    next_attempt: Option<Instant>,
    last_error: Option<SharedError>,
    /// The pool can never connect again (its connector failed); handles fail their `poll_ready`.
    closed: Option<Status>,
    connects: u64,
    failures: u64,
    reaps: u64,
    disconnections: u64,
}

/// A pool's shared state; one per target.
pub(crate) struct Shared<S> {
    pub(crate) core: Arc<Core>,
    state: Mutex<State<S>>,
    /// `state.conns` as handles see them; replaced (under the state lock) whenever they change.
    /// Its own lock, held only to clone an `Arc`: a handle without a current view (a clone
    /// made per call from one that never called, or whose view the pool outgrew) takes it here
    /// instead of queueing on the state lock behind every other call.
    view: RwLock<View<S>>,
    next_waiter: AtomicU64,
    /// `view.generation`, readable without a lock: a handle's view is current while its
    /// generation is this.
    generation: AtomicU64,
}

/// What a handle's `poll_ready` gets from the pool.
pub(crate) enum Pick<S> {
    /// Use this connection, reserved (counted in flight) for the call; here is the current view
    /// for the next pick.
    Ready(S, InFlight, View<S>),
    /// Nothing usable now; the waker is registered.
    Wait,
    /// The handle waited its `wait_timeout` and there is still no connection: fail the call.
    Fail(Status),
    /// The pool is closed for good.
    Closed(Status),
}

fn near_full(in_flight: usize, max_streams: usize) -> bool {
    in_flight.saturating_mul(10) >= max_streams.saturating_mul(9)
}

impl<S> Shared<S> {
    pub(crate) fn new(target: Uri, config: Arc<PoolConfig>) -> Self {
        let metrics = Metrics::new(&target);
        Shared {
            core: Arc::new(Core {
                target,
                config,
                epoch: Instant::now(),
                wake_worker: Notify::new(),
                proven: AtomicBool::new(false),
                metrics,
                parked: Parked::default(),
            }),
            state: Mutex::new(State {
                conns: Vec::new(),
                connecting: 0,
                activated: false,
                consecutive_failures: 0,
                next_attempt: None,
                last_error: None,
                closed: None,
                connects: 0,
                failures: 0,
                reaps: 0,
                disconnections: 0,
            }),
            view: RwLock::new(View {
                generation: 0,
                conns: Arc::new([]),
            }),
            next_waiter: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// After every change to `st.conns` (under the state lock, which orders the changes): a
    /// new view, and a new generation that tells handles their views are stale.
    fn conns_changed(&self, st: &mut State<S>) {
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let view = View {
            generation,
            conns: st
                .conns
                .iter()
                .map(|conn| Seen {
                    load: conn.load.clone(),
                    conn: Arc::downgrade(conn),
                })
                .collect(),
        };
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = view;
        self.generation.store(generation, Ordering::Release);
    }

    /// The pool's connections as of now, for a handle whose own view is missing or stale.
    pub(crate) fn current_view(&self) -> View<S> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether `view` still shows the pool's connections.
    pub(crate) fn is_current(&self, view: &View<S>) -> bool {
        view.generation == self.generation.load(Ordering::Acquire)
    }

    #[cfg(test)]
    fn conns_of_view(&self, view: &View<S>) -> Vec<Arc<ConnLoad>> {
        view.conns.iter().map(|seen| seen.load.clone()).collect()
    }

    /// The lock-free pick: the least-loaded usable connection of a current `view`, reserved for
    /// one call if it has room. `None` when the locked [`pick`](Self::pick) must decide (a stale
    /// view, no usable connection, all nearly full: waiting and growing are decided under the
    /// lock).
    pub(crate) fn pick_from(&self, view: &View<S>) -> Option<(S, InFlight)>
    where
        S: Clone,
    {
        if !self.is_current(view) {
            return None;
        }
        let max_streams = self.core.config.max_streams;
        let mut best: Option<(&Seen<S>, usize)> = None;
        for seen in view.conns.iter() {
            if seen.load.is_broken() {
                continue;
            }
            let load = seen.load.in_flight();
            if best.is_none_or(|(_, least)| load < least) {
                best = Some((seen, load));
            }
        }
        let (seen, in_flight) = best?;
        if near_full(in_flight, max_streams) {
            return None;
        }
        let conn = seen.conn.upgrade()?;
        // Another handle may have filled it since the look above: then the lock decides.
        let reserved = InFlight::try_new(&seen.load, |n| !near_full(n, max_streams))?;
        Some((conn.service.clone(), reserved))
    }

    fn state(&self) -> MutexGuard<'_, State<S>> {
        lock(&self.state)
    }

    pub(crate) fn waiter_id(&self) -> u64 {
        self.next_waiter.fetch_add(1, Ordering::Relaxed)
    }

    /// Waiter `id` leaves without picking (its handle is dropped, or the pool closed). If it was
    /// no longer parked, it was woken for a stream that came free ([`Parked::wake_one`] takes
    /// the one it wakes off the list), and that stream would wait for another call to end: the
    /// wake goes on to the next waiter. (One more than needed, after a `wake_all`, costs that
    /// waiter a pick.)
    pub(crate) fn forget_waiter(&self, id: u64) {
        if !self.core.parked.unpark(id) {
            self.core.parked.wake_one();
        }
    }

    /// Picks the least-loaded usable connection for one call.
    ///
    /// `expired`: the caller has waited its `wait_timeout`; take any connection, however loaded,
    /// and if there is none, fail.
    pub(crate) fn pick(&self, waiter: u64, waker: &Waker, expired: bool) -> Pick<S>
    where
        S: Clone,
    {
        let mut st = self.state();
        if let Some(status) = &st.closed {
            return Pick::Closed(status.clone());
        }
        let max_streams = self.core.config.max_streams;
        // Again only when another handle's lock-free pick took the last stream of the chosen
        // connection between the look and the reservation.
        loop {
            let mut best: Option<(usize, usize)> = None;
            let mut alive = 0;
            for (i, conn) in st.conns.iter().enumerate() {
                if conn.load.is_broken() {
                    continue;
                }
                alive += 1;
                let load = conn.load.in_flight();
                if best.is_none_or(|(_, least)| load < least) {
                    best = Some((i, load));
                }
            }
            let Some((index, load)) = best else {
                st.activated = true;
                if expired {
                    self.core.parked.unpark(waiter);
                    return Pick::Fail(self.no_connection(&st, Instant::now()));
                }
                if self.core.parked.park(waiter, waker) {
                    // A lazy pool, or one whose connections all broke: the worker should connect.
                    self.core.wake_worker.notify_one();
                }
                return Pick::Wait;
            };
            // Another connection is on its way (or may be opened): the call waits for a stream
            // rather than pile onto a full connection (which h2 would queue, or the server
            // refuse). Otherwise (at `max_connections`, or waited out) it takes the least
            // loaded, however full.
            let mut may_wait = false;
            if near_full(load, max_streams) {
                let now = Instant::now();
                let backing_off = st.next_attempt.is_some_and(|at| at > now);
                let can_grow = alive + st.connecting < self.core.config.max && !backing_off;
                if can_grow {
                    self.core.wake_worker.notify_one();
                }
                may_wait = (can_grow || st.connecting > 0) && !expired;
                if load >= max_streams && may_wait {
                    self.core.parked.park(waiter, waker);
                    // A call ending now either sees this waiter, or its freed stream is seen
                    // here (SeqCst, as in `InFlight::drop`).
                    if st.conns[index].load.in_flight.load(Ordering::SeqCst) >= max_streams {
                        return Pick::Wait;
                    }
                }
            }
            let conn = &st.conns[index];
            let reserved = if may_wait {
                match InFlight::try_new(&conn.load, |n| n < max_streams) {
                    Some(reserved) => reserved,
                    None => continue,
                }
            } else {
                InFlight::new(conn.load.clone())
            };
            self.core.parked.unpark(waiter);
            return Pick::Ready(conn.service.clone(), reserved, self.current_view());
        }
    }

    /// The status a call gets when no connection came up in time.
    fn no_connection(&self, st: &State<S>, now: Instant) -> Status {
        let target = &self.core.target;
        let when = match st.next_attempt {
            Some(at) if at > now => format!("retrying in {:.1} s", (at - now).as_secs_f64()),
            _ if st.connecting > 0 => "connecting now".to_owned(),
            _ => "reconnecting".to_owned(),
        };
        let message = match &st.last_error {
            Some(err) => format!(
                "no connection to {target}: {} ({when})",
                crate::status::describe_error(&**err)
            ),
            None => format!(
                "no connection to {target} within {}: {when}",
                crate::status::HumanDuration(self.core.config.wait_timeout)
            ),
        };
        // The source keeps the connect error, so `status::is_unprocessed` sees the call never
        // left the client.
        status_with_source(Code::Unavailable, message, st.last_error.as_ref())
    }

    /// Polls until the first connections are made, for an eager pool: `Ok` once `min` are up,
    /// or once every first attempt has finished with at least one up; the last error if none is.
    pub(crate) fn poll_started(
        &self,
        waiter: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Status>> {
        let st = self.state();
        if let Some(status) = &st.closed {
            return Poll::Ready(Err(status.clone()));
        }
        let alive = st.conns.iter().filter(|c| !c.load.is_broken()).count();
        let settled = st.failures > 0 && st.connecting == 0;
        if alive >= self.core.config.min || (settled && alive > 0) {
            self.core.parked.unpark(waiter);
            return Poll::Ready(Ok(()));
        }
        if settled {
            self.core.parked.unpark(waiter);
            return Poll::Ready(Err(self.no_connection(&st, Instant::now())));
        }
        self.core.parked.park(waiter, cx.waker());
        Poll::Pending
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let st = self.state();
        let now = Instant::now();
        let in_flight: Vec<usize> = st
            .conns
            .iter()
            .filter(|c| !c.load.is_broken())
            .map(|c| c.load.in_flight())
            .collect();
        PoolStats {
            open: in_flight.len(),
            connecting: st.connecting,
            idle: in_flight.iter().filter(|n| **n == 0).count(),
            in_flight,
            connects: st.connects,
            failures: st.failures,
            reaps: st.reaps,
            disconnections: st.disconnections,
            retry_in: st.next_attempt.filter(|at| *at > now).map(|at| at - now),
        }
    }

    /// Removes broken and idle connections, and decides how many to open now and when to look
    /// again.
    pub(crate) fn plan(&self, now: Instant) -> Plan<S> {
        let config = &self.core.config;
        let metrics = &self.core.metrics;
        let mut st = self.state();
        if self.core.proven.swap(false, Ordering::AcqRel) {
            st.consecutive_failures = 0;
        }
        let mut dropped = Vec::new();

        let mut i = 0;
        while i < st.conns.len() {
            if !st.conns[i].load.is_broken() {
                i += 1;
                continue;
            }
            let conn = st.conns.remove(i);
            st.disconnections += 1;
            metrics.disconnections.increment(1);
            metrics.open.decrement(1.0);
            if let Some(err) = lock(&conn.load.error).clone() {
                st.last_error = Some(err);
            }
            if conn.load.proven.load(Ordering::Acquire) {
                // It worked: reconnect at once (gRPC does the same), back off only if that fails.
                st.next_attempt = None;
            } else {
                // It broke before serving one call: as good as a failed connect.
                st.failures += 1;
                st.consecutive_failures = st.consecutive_failures.saturating_add(1);
                st.next_attempt = Some(instant_after(
                    now,
                    config
                        .backoff
                        .delay(st.consecutive_failures, Duration::ZERO),
                ));
            }
            dropped.push(conn);
        }

        // Reap idle connections above `min`, newest first.
        let mut wake_at: Option<Instant> = None;
        let mut excess = st.conns.len().saturating_sub(config.min);
        let mut i = st.conns.len();
        while excess > 0 && i > 0 {
            i -= 1;
            let load = &st.conns[i].load;
            let reap_at = if load.in_flight() == 0 {
                let last = Duration::from_nanos(load.last_active.load(Ordering::Acquire));
                instant_after(self.core.epoch + last, config.idle_timeout)
            } else {
                instant_after(now, config.idle_timeout)
            };
            if reap_at <= now {
                dropped.push(st.conns.remove(i));
                st.reaps += 1;
                metrics.open.decrement(1.0);
                excess -= 1;
            } else {
                wake_at = Some(wake_at.map_or(reap_at, |at| at.min(reap_at)));
            }
        }

        if !dropped.is_empty() {
            self.conns_changed(&mut st);
        }
        let alive = st.conns.len();
        let mut want = if !config.lazy || st.activated {
            config.min
        } else {
            0
        };
        if alive == 0 && !self.core.parked.is_empty() {
            want = want.max(1);
        }
        if alive > 0
            && st
                .conns
                .iter()
                .all(|c| near_full(c.load.in_flight(), config.max_streams))
        {
            want = want.max(alive + 1);
        }
        let want = want.min(config.max);
        let mut start = want.saturating_sub(alive + st.connecting);
        if start > 0 {
            match st.next_attempt {
                Some(at) if at > now => {
                    start = 0;
                    wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                }
                // While connects are failing, probe with one at a time.
                _ if st.consecutive_failures > 0 => start = usize::from(st.connecting == 0),
                _ => {}
            }
        }
        st.connecting += start;
        // Calls wait for growth only while a connection is being opened. If none is (the load
        // fell before the worker looked, or backoff forbids it), let them pick again now.
        let wake = alive > 0 && st.connecting == 0;
        Plan {
            start,
            wake_at,
            dropped,
            wake,
        }
    }

    pub(crate) fn attempt_done(&self, result: Result<S, SharedError>, now: Instant) {
        let metrics = &self.core.metrics;
        let mut st = self.state();
        st.connecting = st.connecting.saturating_sub(1);
        match result {
            Ok(service) => {
                st.conns.push(Arc::new(Conn {
                    service,
                    load: Arc::new(ConnLoad::new(self.core.clone(), now)),
                }));
                self.conns_changed(&mut st);
                st.connects += 1;
                st.next_attempt = None;
                metrics.attempts_succeeded.increment(1);
                metrics.open.increment(1.0);
            }
            Err(err) => {
                st.failures += 1;
                st.consecutive_failures = st.consecutive_failures.saturating_add(1);
                let delay = self
                    .core
                    .config
                    .backoff
                    .delay(st.consecutive_failures, Duration::ZERO);
                st.next_attempt = Some(instant_after(now, delay));
                st.last_error = Some(err);
                metrics.attempts_failed.increment(1);
            }
        }
        drop(st);
        self.core.parked.wake_all();
    }

    /// The worker is gone: with `reason`, for good (handles fail); without, because every
    /// handle was dropped.
    pub(crate) fn shut_down(&self, reason: Option<Status>) {
        let mut st = self.state();
        let conns = std::mem::take(&mut st.conns);
        self.conns_changed(&mut st);
        self.core.metrics.open.decrement(conns.len() as f64);
        st.closed = Some(reason.unwrap_or_else(|| {
            Status::unavailable(format!("the pool for {} shut down", self.core.target))
        }));
        drop(st);
        drop(conns);
        self.core.parked.wake_all();
    }
}

/// What the worker does next, decided under the lock by [`Shared::plan`].
pub(crate) struct Plan<S> {
    /// Connection attempts to start now.
    pub(crate) start: usize,
    /// When to look again (a backoff or an idle deadline), if nothing wakes the worker first.
    pub(crate) wake_at: Option<Instant>,
    /// Connections taken out of the pool, dropped outside the lock.
    pub(crate) dropped: Vec<Arc<Conn<S>>>,
    /// Wake the parked handles (outside the lock) to pick again.
    pub(crate) wake: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(max_streams: usize) -> Shared<&'static str> {
        let config = PoolConfig::builder()
            .max_connections(4)
            .max_streams_per_connection(max_streams)
            .build()
            .unwrap();
        Shared::new("http://pool.test".parse().unwrap(), Arc::new(config))
    }

    #[test]
    fn a_current_view_picks_without_the_lock_until_the_connections_change() {
        let shared = shared(10);
        shared.attempt_done(Ok("a"), Instant::now());
        let Pick::Ready(service, first, view) = shared.pick(0, Waker::noop(), false) else {
            panic!("a connection is up")
        };
        assert_eq!(service, "a");
        let a = shared.conns_of_view(&view)[0].clone();
        assert_eq!(a.in_flight(), 1, "a pick reserves its stream");
        let (service, second) = shared.pick_from(&view).expect("the view is current");
        assert_eq!(service, "a");
        assert_eq!(a.in_flight(), 2);
        drop((first, second));
        assert_eq!(
            a.in_flight(),
            0,
            "a reservation dropped unused frees its stream"
        );

        // Nearly full: waiting and growing are decided under the lock.
        a.in_flight.store(9, Ordering::SeqCst);
        assert!(shared.pick_from(&view).is_none());
        a.in_flight.store(0, Ordering::SeqCst);

        // A second connection makes the view stale; the locked pick hands out the new one, and
        // from it the least-loaded connection.
        shared.attempt_done(Ok("b"), Instant::now());
        assert!(shared.pick_from(&view).is_none(), "stale");
        let Pick::Ready(service, _on_a, view) = shared.pick(0, Waker::noop(), false) else {
            panic!("two connections are up")
        };
        assert_eq!(service, "a");
        let (service, _on_b) = shared.pick_from(&view).unwrap();
        assert_eq!(service, "b");

        // A broken connection is skipped at once, before the worker removes it.
        shared.conns_of_view(&view)[0].mark_broken(Arc::new(std::io::Error::other("gone")));
        assert_eq!(shared.pick_from(&view).unwrap().0, "b");
    }

    /// Handles that pick at once (two runtime threads, or one handle that is ready but has not
    /// called yet) each see the others' reservations: while the pool may grow, a connection
    /// never gets more than `max_streams_per_connection` calls, which a new connection (whose
    /// h2 has not yet read the server's limit) would send, and the server refuse.
    #[test]
    fn reservations_keep_a_connection_within_its_stream_limit() {
        let shared = shared(2);
        shared.attempt_done(Ok("a"), Instant::now());
        let reserve = |waiter| match shared.pick(waiter, Waker::noop(), false) {
            Pick::Ready(_, reserved, _) => Some(reserved),
            Pick::Wait => None,
            _ => panic!("the pool is open"),
        };
        let first = reserve(0).expect("a free stream");
        let _second = reserve(1).expect("a free stream");
        assert!(
            reserve(2).is_none(),
            "both streams are reserved: wait for a third"
        );
        let view = shared.current_view();
        assert!(shared.pick_from(&view).is_none());
        assert_eq!(shared.conns_of_view(&view)[0].in_flight(), 2);
        drop(first);
        assert!(reserve(2).is_some(), "the freed stream goes to the waiter");
    }

    /// A waiter woken for a freed stream that leaves without picking (its handle dropped before
    /// it was polled again: a cancelled call) passes the wake on: the next waiter takes the
    /// stream rather than waiting for another call to end, or its `wait_timeout`.
    #[test]
    fn a_woken_waiter_that_leaves_passes_the_freed_stream_on() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = || Arc::new(Flag(AtomicBool::new(false)));
        let woken = |flag: &Arc<Flag>| flag.0.load(Ordering::SeqCst);

        let shared = shared(1);
        shared.attempt_done(Ok("a"), Instant::now());
        let Pick::Ready(_, in_flight, _) = shared.pick(0, Waker::noop(), false) else {
            panic!("a free stream")
        };
        let (first, second) = (flag(), flag());
        for (waiter, flag) in [(1, &first), (2, &second)] {
            let waker = Waker::from(flag.clone());
            assert!(matches!(shared.pick(waiter, &waker, false), Pick::Wait));
        }
        drop(in_flight);
        assert!(
            woken(&first),
            "the oldest waiter is woken for the freed stream"
        );
        assert!(!woken(&second));
        shared.forget_waiter(1);
        assert!(
            woken(&second),
            "the stream's wake went on to the next waiter"
        );
        assert!(
            matches!(shared.pick(2, Waker::noop(), false), Pick::Ready(..)),
            "and the stream is free for it"
        );
    }

    /// A handle with no view of its own (cloned per call from one that never called), or a
    /// stale one, picks from the pool's current view: it never queues on the state lock, which
    /// this test holds throughout.
    #[test]
    fn the_current_view_is_read_without_the_state_lock() {
        let shared = Arc::new(shared(10));
        shared.attempt_done(Ok("a"), Instant::now());
        let Pick::Ready(_, _on_a, stale) = shared.pick(0, Waker::noop(), false) else {
            panic!("a connection is up")
        };
        shared.attempt_done(Ok("b"), Instant::now());
        assert!(!shared.is_current(&stale));

        let state = shared.state();
        let (picked, got) = std::sync::mpsc::channel();
        let picker = std::thread::spawn({
            let shared = shared.clone();
            move || {
                let view = shared.current_view();
                let pick = shared.pick_from(&view).map(|(service, _)| service);
                picked.send((shared.is_current(&view), pick)).unwrap();
            }
        });
        let (current, pick) = got
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pick did not wait for the state lock");
        drop(state);
        picker.join().unwrap();
        assert!(current);
        assert_eq!(
            pick,
            Some("b"),
            "the least-loaded of the current connections"
        );
    }

    #[test]
    fn near_full_is_ninety_percent() {
        assert!(!near_full(89, 100));
        assert!(near_full(90, 100));
        assert!(!near_full(1, 2));
        assert!(near_full(2, 2));
        assert!(near_full(usize::MAX, usize::MAX));
    }
}
