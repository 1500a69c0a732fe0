//! [`Pool`]: the per-target service, one handle of many onto a set of connections.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tonic::{Code, Status};
use tower_service::Service;

use super::body::PoolBody;
use super::conn::{InFlight, SharedError, breaks_connection, status_with_source};
use super::shared::{Pick, Shared, View};
use super::stats::PoolStats;
use crate::BoxError;

/// A pool of connections to one target: a `Service` over the connections' request type that
/// sends each call on the least-loaded open connection.
///
/// Cheap to clone; clones share the connections. The connections and the background task that
/// maintains them live until the last clone is dropped.
///
/// # Readiness
/// `poll_ready` returns `Ready(Ok)` once a connection is reserved for the next call (the
/// reservation counts as a call in flight on it, so handles picking at once never overfill a
/// connection; a handle dropped while ready frees it), and
/// `Pending` (with the waker registered) while no connection is up, or while every connection
/// is at `max_streams_per_connection` and another is being opened. A handle that has waited
/// `wait_timeout` for a connection turns ready and its next call fails at once with
/// `UNAVAILABLE` ("no connection to …: connection refused (retrying in 1.6 s)"): the one way to give a tonic client a
/// status it can act on (tonic reports a `poll_ready` error as `UNKNOWN`). `Ready(Err)` is kept
/// for a pool that can never connect again (its connector failed).
///
/// Under a balancer that polls every endpoint's `poll_ready`, a pool whose target is down is
/// `Pending` for `wait_timeout`, then ready for one call that fails at once with `UNAVAILABLE`
/// (whose source marks it as never sent, so a retry layer may retry it elsewhere), then
/// `Pending` again: at most one failed call per handle per `wait_timeout`.
///
/// # Errors
/// Every error is a boxed [`tonic::Status`]. A call whose connection broke fails with
/// `UNAVAILABLE`, the connection leaves the rotation at once, and the pool opens a replacement.
pub struct Pool<S> {
    shared: Arc<Shared<S>>,
    /// Dropped with the last handle, which stops the worker.
    _alive: Arc<oneshot::Sender<()>>,
    waiter: u64,
    /// The pool's connections as this handle last saw them.
    view: Option<View<S>>,
    ready: Option<Reserved<S>>,
    wait: Option<Pin<Box<Sleep>>>,
    fail: Option<Status>,
}

struct Reserved<S> {
    service: S,
    /// Counts the call on its connection from now: dropped unused, it frees the stream.
    guard: InFlight,
}

impl<S> Pool<S> {
    pub(crate) fn new(shared: Arc<Shared<S>>, alive: Arc<oneshot::Sender<()>>) -> Self {
        Pool {
            waiter: shared.waiter_id(),
            shared,
            _alive: alive,
            view: None,
            ready: None,
            wait: None,
            fail: None,
        }
    }

    /// The target this pool connects to.
    pub fn target(&self) -> &Uri {
        &self.shared.core.target
    }

    /// What the pool is doing now.
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }
}

impl<S> Clone for Pool<S> {
    fn clone(&self) -> Self {
        // With the view, so that a clone made per call (as tonic clients often are) need not
        // fetch the current one for its first call.
        let mut pool = Pool::new(self.shared.clone(), self._alive.clone());
        pool.view = self.view.clone();
        pool
    }
}

impl<S> Drop for Pool<S> {
    fn drop(&mut self) {
        if self.wait.is_some() {
            self.shared.forget_waiter(self.waiter);
        }
    }
}

impl<S> fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", self.target())
            .field("ready", &self.ready.is_some())
            .field("waiting", &self.wait.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req, B> Service<Req> for Pool<S>
where
    S: Service<Req, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<PoolBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.fail.is_some() {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(reserved) = &mut self.ready {
                if reserved.guard.conn().is_broken() {
                    self.ready = None;
                    continue;
                }
                match reserved.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(err)) => {
                        // The connection's own service failed: that connection is done.
                        reserved
                            .guard
                            .conn()
                            .mark_broken(SharedError::from(err.into()));
                        self.ready = None;
                        continue;
                    }
                }
            }
            if self.wait.is_none() {
                // A handle cloned per call from one that never called (a tonic client's usual
                // shape) has no view of its own, or one the pool has outgrown: it takes the
                // current one rather than the state lock.
                let view = self.view.get_or_insert_with(|| self.shared.current_view());
                let mut picked = self.shared.pick_from(view);
                if picked.is_none() && !self.shared.is_current(view) {
                    *view = self.shared.current_view();
                    picked = self.shared.pick_from(view);
                }
                if let Some((service, guard)) = picked {
                    self.ready = Some(Reserved { service, guard });
                    continue;
                }
            }
            let expired = match &mut self.wait {
                Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
                None => false,
            };
            match self.shared.pick(self.waiter, cx.waker(), expired) {
                Pick::Ready(service, guard, view) => {
                    self.wait = None;
                    self.view = Some(view);
                    self.ready = Some(Reserved { service, guard });
                }
                Pick::Wait => {
                    let timeout = self.shared.core.config.wait_timeout;
                    let sleep = self
                        .wait
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Pick::Fail(status) => {
                    self.wait = None;
                    self.fail = Some(status);
                    return Poll::Ready(Ok(()));
                }
                Pick::Closed(status) => {
                    if self.wait.take().is_some() {
                        self.shared.forget_waiter(self.waiter);
                    }
                    return Poll::Ready(Err(Box::new(status)));
                }
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(status) = self.fail.take() {
            return ResponseFuture::failed(status);
        }
        let Some(Reserved { mut service, guard }) = self.ready.take() else {
            return ResponseFuture::failed(Status::failed_precondition(
                "towline Pool::call without a successful poll_ready",
            ));
        };
        ResponseFuture {
            kind: Kind::Call {
                future: service.call(req),
                guard: Some(guard),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Pool`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Call { #[pin] future: F, guard: Option<InFlight> },
        Failed { status: Option<Status> },
    }
}

impl<F> ResponseFuture<F> {
    fn failed(status: Status) -> Self {
        ResponseFuture {
            kind: Kind::Failed {
                status: Some(status),
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<PoolBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Failed { status } => {
                Poll::Ready(Err(Box::new(status.take().unwrap_or_else(|| {
                    Status::internal("ResponseFuture polled after completion")
                }))))
            }
            KindProj::Call { future, guard } => {
                let result = std::task::ready!(future.poll(cx));
                let guard = guard.take();
                Poll::Ready(match result {
                    Ok(response) => {
                        if let Some(guard) = &guard {
                            guard.conn().mark_proven();
                            if crate::status::is_too_many_pings_status(response.headers()) {
                                guard.conn().too_many_pings();
                            }
                        }
                        Ok(response.map(|body| PoolBody::new(body, guard)))
                    }
                    Err(err) => Err(Box::new(call_failed(err.into(), guard))),
                })
            }
        }
    }
}

/// The status for a failed call; a broken connection leaves the rotation here.
fn call_failed(err: BoxError, guard: Option<InFlight>) -> Status {
    match guard.filter(|_| breaks_connection(&*err)) {
        Some(guard) => connection_broke(err, &guard, ""),
        None => crate::status::status_from_error(err),
    }
}

/// Takes the call's connection out of rotation, and says so: `UNAVAILABLE` "connection to … broke
/// {when}: {cause}", with the error as its source.
pub(super) fn connection_broke(err: BoxError, guard: &InFlight, when: &str) -> Status {
    let err = SharedError::from(err);
    let conn = guard.conn();
    conn.mark_broken(err.clone());
    status_with_source(
        Code::Unavailable,
        format!(
            "connection to {} broke{when}: {}",
            conn.target(),
            crate::status::describe_error(&*err)
        ),
        Some(&err),
    )
}
