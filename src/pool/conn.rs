//! One connection of a pool: its load and health, which calls update without the pool's lock,
//! and what a call's error says about it.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use http::Uri;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::config::PoolConfig;
use super::stats::Metrics;
use crate::BoxError;

pub(crate) type SharedError = Arc<dyn Error + Send + Sync>;

/// What every connection of a pool shares, free of the connection's service type.
pub(crate) struct Core {
    pub(crate) target: Uri,
    pub(crate) config: Arc<PoolConfig>,
    pub(crate) epoch: Instant,
    pub(crate) wake_worker: Notify,
    /// A connection served a call since the worker last looked: the backoff starts over.
    pub(crate) proven: AtomicBool,
    pub(crate) metrics: Metrics,
    /// Handles waiting for a connection, or for a free stream on one.
    pub(crate) parked: Parked,
}

impl Core {
    pub(crate) fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// The wakers of handles waiting in `poll_ready`, reachable from a call that ends (which knows
/// its connection, not the pool's service type), so a freed stream wakes one of them.
#[derive(Default)]
pub(crate) struct Parked {
    /// By waiter id: the oldest handle is woken first.
    wakers: Mutex<BTreeMap<u64, Waker>>,
    /// `wakers.len()`, read without the lock by every call that ends.
    count: AtomicUsize,
}

impl Parked {
    /// Registers (or refreshes) a waiter; `true` if it is the only one.
    pub(crate) fn park(&self, id: u64, waker: &Waker) -> bool {
        let mut wakers = lock(&self.wakers);
        match wakers.get_mut(&id) {
            Some(old) => old.clone_from(waker),
            None => {
                wakers.insert(id, waker.clone());
            }
        }
        self.count.store(wakers.len(), Ordering::SeqCst);
        wakers.len() == 1
    }

    /// Takes waiter `id` off the list; whether it was on it (not woken since it parked).
    pub(crate) fn unpark(&self, id: u64) -> bool {
        if self.count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let mut wakers = lock(&self.wakers);
        let parked = wakers.remove(&id).is_some();
        self.count.store(wakers.len(), Ordering::SeqCst);
        parked
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count.load(Ordering::SeqCst) == 0
    }

    /// Wakes one waiter (the oldest handle) to take a stream that came free. Waking all would
    /// have every parked caller pick again for the one stream, on every call that ends.
    pub(crate) fn wake_one(&self) {
        if self.is_empty() {
            return;
        }
        let waker = {
            let mut wakers = lock(&self.wakers);
            let first = wakers.pop_first();
            self.count.store(wakers.len(), Ordering::SeqCst);
            first
        };
        if let Some((_, waker)) = waker {
            waker.wake();
        }
    }

    /// Wakes every waiter; each picks again.
    pub(crate) fn wake_all(&self) {
        if self.is_empty() {
            return;
        }
        let wakers = {
            let mut wakers = lock(&self.wakers);
            self.count.store(0, Ordering::SeqCst);
            std::mem::take(&mut *wakers)
        };
        wakers.into_values().for_each(Waker::wake);
    }
}

/// One connection's load and health, updated by calls without the pool's lock.
pub(crate) struct ConnLoad {
    pub(crate) core: Arc<Core>,
    pub(crate) in_flight: AtomicUsize,
    /// When the last call on it finished (or it opened), in nanoseconds since the epoch.
    pub(crate) last_active: AtomicU64,
    pub(crate) broken: AtomicBool,
    /// Has completed a call: the connection works, not just its handshake.
    pub(crate) proven: AtomicBool,
    pub(crate) error: Mutex<Option<SharedError>>,
}

impl ConnLoad {
    pub(crate) fn new(core: Arc<Core>, now: Instant) -> Self {
        ConnLoad {
            last_active: AtomicU64::new(core.nanos(now)),
            core,
            in_flight: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            proven: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    pub(crate) fn target(&self) -> &Uri {
        &self.core.target
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Takes the connection out of rotation at once; the worker removes and replaces it.
    pub(crate) fn mark_broken(&self, error: SharedError) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            // Once per connection, however many calls its GOAWAY fails.
            if crate::status::is_too_many_pings(&*error) {
                crate::connect::note_too_many_pings(&self.core.target);
            }
            *lock(&self.error) = Some(error);
            self.core.wake_worker.notify_one();
        }
    }

    /// The server ended a call on this connection for our keepalive pings (grpc-core's
    /// "Too many pings"): it is closing the connection; replace it, pinging less (gRFC A8).
    pub(crate) fn too_many_pings(&self) {
        if !self.broken.load(Ordering::Acquire) {
            crate::connect::note_too_many_pings(&self.core.target);
            self.mark_broken(Arc::new(TooManyPings));
        }
    }

    pub(crate) fn mark_proven(&self) {
        if !self.proven.load(Ordering::Relaxed) && !self.proven.swap(true, Ordering::AcqRel) {
            self.core.proven.store(true, Ordering::Release);
        }
    }
}

/// Counts a call in flight on a connection from the `poll_ready` that reserves the connection
/// for it until its response (body included) is done, or until the reservation or the response
/// is dropped.
///
/// Counting from the reservation, not from `call`, is what keeps a connection within its
/// stream limit: handles that pick at once each see the others' reservations.
pub(crate) struct InFlight(Arc<ConnLoad>);

impl InFlight {
    /// One more call on `conn`, however loaded (at `max_connections`, h2 queues it).
    pub(crate) fn new(conn: Arc<ConnLoad>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(conn)
    }

    /// One more call on `conn` if `admit` allows its count as it is: the look and the count are
    /// one atomic step, so handles picking at once cannot overfill it between the two.
    pub(crate) fn try_new(conn: &Arc<ConnLoad>, admit: impl Fn(usize) -> bool) -> Option<Self> {
        conn.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                admit(n).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight(conn.clone()))
    }

    pub(crate) fn conn(&self) -> &ConnLoad {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        // Stamp first, so whoever sees the count drop to zero sees a fresh stamp.
        let now = conn.core.nanos(Instant::now());
        conn.last_active.store(now, Ordering::Release);
        // SeqCst, as `Shared::pick` parks (SeqCst) before it looks at the load (SeqCst): of a
        // call ending and a caller parking at once, one always sees the other, without a fence.
        let was = conn.in_flight.fetch_sub(1, Ordering::SeqCst);
        // A stream came free: a caller waiting for one may take it.
        if was <= conn.core.config.max_streams {
            conn.core.parked.wake_one();
        }
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("in_flight", &self.0.in_flight())
            .finish()
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a call's error means its connection is gone (so the pool must drop it), as opposed
/// to one stream failing: any `UNAVAILABLE` transport error except a refused stream.
pub(crate) fn breaks_connection(err: &(dyn Error + 'static)) -> bool {
    let refused_stream = std::iter::successors(Some(err), |&e: &&(dyn Error + 'static)| e.source())
        .any(|e| {
            e.downcast_ref::<h2::Error>().is_some_and(|h2| {
                h2.reason() == Some(h2::Reason::REFUSED_STREAM) && !h2.is_go_away()
            })
        });
    !refused_stream && crate::status::code_from_error(err) == Code::Unavailable
}

/// A status the pool makes about its own connections, with `source` under a marker that says so
/// (see [`PoolConnectionError`]).
pub(crate) fn status_with_source(
    code: Code,
    message: String,
    source: Option<&SharedError>,
) -> Status {
    let mut status = Status::new(code, message);
    if let Some(source) = source {
        status.set_source(Arc::new(PoolConnectionError(source.clone())));
    }
    status
}

/// The source of every status a pool makes about one of its connections (broken, not up, the
/// pool closed): what happened to that connection is the pool's business, which it handles by
/// itself (replacing it, with backoff). Layers above tell such a status from a bare connection's
/// failure by this marker: the balancer takes neither a pool's `UNAVAILABLE` nor its health
/// check's failure through the pool as a reason to rebuild the endpoint.
///
/// A service of your own that keeps its own connections can mark its statuses the same way
/// ([`PoolConnectionError::new`]), and the balancer treats it as it treats a pool.
#[derive(Debug)]
pub struct PoolConnectionError(pub(crate) SharedError);

impl PoolConnectionError {
    /// Marks `cause` as a connection failure its service handles by itself.
    pub fn new(cause: impl Into<BoxError>) -> Self {
        PoolConnectionError(Arc::from(cause.into()))
    }
}

impl fmt::Display for PoolConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The status above says it in words; the source below names the cause.
        f.write_str("")
    }
}

impl Error for PoolConnectionError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.0)
    }
}

/// Why a connection whose server objected to our keepalive pings was replaced.
#[derive(Debug)]
pub(crate) struct TooManyPings;

impl fmt::Display for TooManyPings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server closed the connection for too many keepalive pings")
    }
}

impl Error for TooManyPings {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(BoxError);
    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("transport error")
        }
    }
    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn connection_level_errors_break_the_connection_and_stream_level_ones_do_not() {
        let io = |kind| Wrapped(Box::new(std::io::Error::from(kind)));
        assert!(breaks_connection(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(breaks_connection(&io(
            std::io::ErrorKind::ConnectionRefused
        )));
        let refused = Wrapped(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert!(
            !breaks_connection(&refused),
            "one refused stream, not a dead connection"
        );
        let cancelled = Wrapped(Box::new(h2::Error::from(h2::Reason::CANCEL)));
        assert!(!breaks_connection(&cancelled));
        let deadline = Wrapped(Box::new(tower::timeout::error::Elapsed::new()));
        assert!(!breaks_connection(&deadline));
        let internal = Wrapped(Box::new(Status::internal("not a transport failure")));
        assert!(!breaks_connection(&internal));
    }
}
