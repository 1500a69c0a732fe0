//! [`Retry`]: the service [`RetryLayer`](super::RetryLayer) makes.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::body::Body;
use tower_service::Service;

use super::NoRetry;
use super::budget::RetryBudget;
use super::future::{ResponseFuture, Retries, RetryState};
use super::head::Head;
use super::layer::Shared;
use super::policy::RetryPolicy;
use super::source::Source;
use crate::BoxError;
use crate::status::CallEnd;

/// Retries the calls of `S` as its [`RetryPolicy`] says. Made by [`RetryLayer`](super::RetryLayer).
///
/// Its error is a [`BoxError`] that always holds a [`tonic::Status`] (see
/// [`status_from_error`](crate::status::status_from_error)), so a transport failure reaches the
/// caller as `UNAVAILABLE` rather than tonic's `UNKNOWN`, whether or not it was retried.
///
/// # What a call costs
/// A call that can be retried (by its policy, or transparently) keeps what a later attempt
/// needs, and nothing else; no lock is taken and the retry state is not boxed. Its heap
/// allocations, for a unary call whose first attempt succeeds:
/// - one box for the first attempt's body (tonic's `Body` boxes any body but an empty one):
///   the request body was read when the call was made, since a unary body is ready at once,
///   and every attempt gets a reference-counted copy of its bytes;
/// - one list of the request's headers, so that an attempt can be sent again, unless it has
///   only the two tonic puts on every call (`te`, `content-type`): those are kept as their
///   places in the list. Metadata of the caller's own, or a `grpc-timeout`, costs the list.
///
/// Besides: one reference count up and down (what the calls share), one atomic update of a
/// percentage budget (dated by the CPU's counter, not the OS clock), and one read of the OS
/// clock for a call with a `grpc-timeout` (the start it counts from).
///
/// The request's extensions are kept as values when they are all of the types tonic and towline
/// put there (tonic's `GrpcMethod`, [`WaitForReady`](crate::balance::WaitForReady),
/// [`CallEnd`], [`NoRetry`]); a request carrying any other extension pays for a copy of the
/// map (`http::Extensions::clone`: the map, its table and one box per value).
///
/// A call whose attempt fails boxes, once, what only retries need (counts, backoff, the next
/// attempt), besides what its new attempt's request costs.
///
/// A streaming request body (one not ready in a single frame when the call is made) is kept by a
/// [`ReplayBody`](super::ReplayBody) instead: one shared buffer more, and its list of frames.
/// A token bucket's [`CallEnd`] costs three more (its handle, and its slot in each map).
///
/// The inner service is not cloned per call (tower's `Retry` does, for the `poll_ready` of later
/// attempts: for a balancer, two reference counts up and down per call; for a tonic `Channel`,
/// allocations). Later attempts go through a clone made when an attempt fails, from a spare
/// clone of the inner service taken at the first call (shared by the clones of this `Retry`,
/// under a lock taken only then). So a later attempt goes through a clone of the service as it
/// was at the first call: a change made through [`get_mut`](Self::get_mut) after that reaches
/// first attempts only.
///
/// A call that cannot be retried at all (a policy of one attempt, or [`NoRetry`], with
/// `max_transparent_retries(0)`; or a body over `max_replay_bytes`) is the inner future, nothing
/// kept, nothing allocated. One of `max_attempts(1)` still gets gRFC A6's transparent retries by
/// default, which need the same copies as above: set `max_transparent_retries(0)` to drop them.
pub struct Retry<S> {
    inner: S,
    scope: Arc<Scope<S>>,
}

/// What the calls through one [`Retry`] and its clones share: the layer's policies, and the
/// spare clone of the inner service that later attempts are cloned from.
pub(crate) struct Scope<S> {
    pub(crate) shared: Arc<Shared>,
    /// Cloned from the inner service at the first call (the layer cannot: it does not know
    /// whether the service is `Clone`).
    spare: OnceLock<Mutex<S>>,
}

impl<S: Clone> Scope<S> {
    /// A service for a later attempt; it has not been polled ready.
    pub(crate) fn service(&self) -> Option<S> {
        let spare = self.spare.get()?;
        // A clone that panicked left nothing half-changed: the spare is only ever read.
        Some(spare.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

impl<S> Retry<S> {
    /// Wraps `inner`, retrying every call with `policy`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        tower_layer::Layer::layer(&super::RetryLayer::new(policy), inner)
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Retry {
            inner,
            scope: Arc::new(Scope {
                shared,
                spare: OnceLock::new(),
            }),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Retry<S> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            scope: self.scope.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("default", &self.scope.shared.default)
            .finish_non_exhaustive()
    }
}

impl<S, ResBody> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(super::into_status)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let policy = self.scope.shared.policy_for_uri(req.uri());
        let max_bytes = policy.max_replay_bytes();
        // Nothing to retry: the inner future as it is, no allocation. Without transparent
        // retries only the policy's are left, and there are none for a policy of one attempt or
        // a `NoRetry` call.
        if policy.max_transparent_retries() == 0
            && (policy.max_attempts() <= 1 || req.extensions().get::<NoRetry>().is_some())
        {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // The body is swapped in place rather than through `into_parts`/`from_parts`: the head
        // stays where it is, not moved twice.
        let body = match Source::new(std::mem::take(req.body_mut()), max_bytes) {
            Ok(body) => body,
            // A body that cannot be replayed (over the cap by its size hint, or as it was read,
            // or failed): sent once, the inner future as it is.
            Err(body) => {
                *req.body_mut() = body;
                return ResponseFuture::passthrough(self.inner.call(req));
            }
        };
        // The first attempt sends the caller's own head; later ones a copy.
        let mut head = Head::keep(&req);
        // `NoRetry` as the copy found it: no lookup of its own.
        let retries = if policy.max_attempts() > 1 && !head.no_retry() {
            Retries::Policy
        } else {
            // gRFC A6: transparent retries apply to every call, whatever its policy, since the
            // request provably never reached the server; a `NoRetry` call included, as in grpc-go.
            Retries::TransparentOnly
        };
        // A percentage budget dates the call on its own clock (the CPU's counter: see
        // `crate::clock`).
        if retries == Retries::Policy
            && let Some(budget) = policy.budget()
        {
            budget.on_call();
        }
        // The OS clock (a vDSO call, tens of ns) only for the start a `grpc-timeout` counts from
        // (its value is read from the kept head only if an attempt fails): a deadline is on
        // Tokio's clock, as its timers are.
        let started = head.has_timeout().then(Instant::now);
        // A token bucket hears how a committed call ends: from its body, or from the layer
        // below that reads its trailers, through this (see `CallEnd`). Every attempt carries it.
        let counts_outcomes =
            retries == Retries::Policy && policy.budget().is_some_and(RetryBudget::counts_outcomes);
        if counts_outcomes {
            let end = CallEnd::new();
            head.set_call_end(end.clone());
            req.extensions_mut().insert(end);
        }
        *req.body_mut() = body.attempt(body.supersede());
        // The spare later attempts' services are cloned from, before the call takes `inner` out
        // of its ready state (a clone is not ready).
        if self.scope.spare.get().is_none() {
            let _ = self.scope.spare.set(Mutex::new(self.inner.clone()));
        }
        let future = self.inner.call(req);
        ResponseFuture::retrying(
            future,
            RetryState::new(
                head,
                body,
                retries,
                counts_outcomes,
                self.scope.clone(),
                started,
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::future::{Ready, ready};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic::Code;
    use tower::ServiceExt;

    use super::*;

    /// Answers each call with the next code of its script (then `OK`), counting its clones.
    #[derive(Clone)]
    struct Scripted {
        codes: Arc<Mutex<Vec<Code>>>,
        clones: Arc<AtomicUsize>,
    }

    struct Counted(Scripted);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.clones.fetch_add(1, Ordering::SeqCst);
            Counted(self.0.clone())
        }
    }

    impl Service<Request<Body>> for Counted {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = Ready<Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            let code = self.0.codes.lock().unwrap().pop().unwrap_or(Code::Ok);
            let mut res = Response::new(Body::empty());
            let value = http::HeaderValue::from(code as i32);
            res.headers_mut().insert("grpc-status", value);
            ready(Ok(res))
        }
    }

    fn request() -> Request<Body> {
        Request::new(Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"\0\0\0\0\x01x"),
        )))
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_bucket_hears_of_every_trailers_only_success() {
        let scripted = Scripted {
            codes: Arc::new(Mutex::new(vec![Code::Unavailable])),
            clones: Arc::new(AtomicUsize::new(0)),
        };
        let budget = crate::retry::RetryBudget::token_bucket(10.0, 0.5).unwrap();
        let policy = RetryPolicy::builder()
            .max_attempts(2)
            .budget(budget.clone())
            .build()
            .unwrap();
        let mut retry = Retry::new(Counted(scripted), policy);
        // A failure takes a token; its retry's success gives half of one back.
        retry.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(budget.tokens(), Some(9.5));
        // A first attempt's success too.
        retry.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(budget.tokens(), Some(10.0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_service_is_cloned_when_an_attempt_fails_not_per_call() {
        let scripted = Scripted {
            codes: Arc::new(Mutex::new(Vec::new())),
            clones: Arc::new(AtomicUsize::new(0)),
        };
        let clones = scripted.clones.clone();
        let mut retry = Retry::new(Counted(scripted.clone()), RetryPolicy::default());
        for _ in 0..10 {
            let res = retry.ready().await.unwrap().call(request()).await.unwrap();
            assert_eq!(res.headers()["grpc-status"], "0");
        }
        assert_eq!(clones.load(Ordering::SeqCst), 1, "the spare alone");

        // Two failures, then OK: one clone for the later attempts, kept between them.
        scripted
            .codes
            .lock()
            .unwrap()
            .extend([Code::Unavailable, Code::Unavailable]);
        let res = retry.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "0", "the third attempt");
        assert!(scripted.codes.lock().unwrap().is_empty(), "three attempts");
        assert_eq!(clones.load(Ordering::SeqCst), 2);
    }
}
