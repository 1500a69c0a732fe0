//! [`HedgeLayer`]: gRFC A6 hedging. Up to `max_attempts` copies of a call, `delay` apart; the
//! first response that is not a non-fatal failure wins and the others are cancelled.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::Code;
use tonic::body::Body;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use super::budget::RetryBudget;
use super::future::GRPC_PREVIOUS_RPC_ATTEMPTS;
use super::policy::{CodeSet, DEFAULT_MAX_REPLAY_BYTES, MAX_ATTEMPTS_CAP};
use super::source::Whole;
use crate::status::{ResponseStatus, classify_response, code_from_error};
use crate::{BoxError, ConfigError, deadline};

/// A gRFC A6 hedging policy: validated, immutable, cheap to clone (clones share one budget).
///
/// Build one with [`HedgePolicy::builder`] (or [`HedgePolicy::new`] for the three required
/// settings); every setting is checked by [`build`](HedgePolicyBuilder::build), whose error
/// names the field.
///
/// ```
/// use std::time::Duration;
/// use tonic::Code;
/// use towline::retry::{HedgePolicy, RetryBudget};
///
/// let policy = HedgePolicy::builder()
///     .max_attempts(3)
///     .delay(Duration::from_millis(20))
///     .non_fatal_codes([Code::Unavailable])
///     .budget(RetryBudget::token_bucket(10.0, 0.1)?)
///     .max_replay_bytes(16 * 1024)
///     .build()?;
/// assert_eq!(policy.max_attempts(), 3);
///
/// let err = HedgePolicy::builder().max_attempts(1).build().unwrap_err();
/// assert_eq!(err.field(), "hedge_policy.max_attempts");
/// assert!(HedgePolicy::new(2, Duration::ZERO, [Code::Ok]).is_err());
/// # Ok::<(), towline::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct HedgePolicy(Arc<Inner>);

struct Inner {
    max_attempts: u32,
    delay: Duration,
    non_fatal: CodeSet,
    budget: Option<RetryBudget>,
    max_replay_bytes: usize,
}

impl HedgePolicy {
    /// A builder: 2 attempts, no delay, no non-fatal code, no budget, 64 KiB of request body.
    pub fn builder() -> HedgePolicyBuilder {
        HedgePolicyBuilder::default()
    }

    /// Up to `max_attempts` copies (> 1; above 5 is capped at 5, gRFC A6), one every `delay`
    /// (zero sends them all at once); a failure with a `non_fatal` code lets the others go on
    /// and sends the next copy at once. No budget; request bodies up to 64 KiB are hedged.
    pub fn new(
        max_attempts: u32,
        delay: Duration,
        non_fatal: impl IntoIterator<Item = Code>,
    ) -> Result<Self, ConfigError> {
        HedgePolicy::builder()
            .max_attempts(max_attempts)
            .delay(delay)
            .non_fatal_codes(non_fatal)
            .build()
    }

    /// Hedges draw from this budget (gRFC A6 `retryThrottling`: no hedge while the bucket is at
    /// or below half). Share it with a [`RetryPolicy`](super::RetryPolicy) by passing clones.
    pub fn budget(self, budget: RetryBudget) -> Self {
        self.with(|i| i.budget = Some(budget))
    }

    /// The cap on the request body buffered so that copies can be sent (0 is taken as 1; the
    /// builder's [`max_replay_bytes`](HedgePolicyBuilder::max_replay_bytes) rejects it instead).
    /// A bigger request is sent once.
    pub fn max_replay_bytes(self, max: usize) -> Self {
        self.with(|i| i.max_replay_bytes = max.max(1))
    }

    fn with(self, set: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            max_attempts: self.0.max_attempts,
            delay: self.0.delay,
            non_fatal: self.0.non_fatal,
            budget: self.0.budget.clone(),
            max_replay_bytes: self.0.max_replay_bytes,
        };
        set(&mut inner);
        HedgePolicy(Arc::new(inner))
    }

    /// Copies per call, the first included (2 to 5).
    pub fn max_attempts(&self) -> u32 {
        self.0.max_attempts
    }

    /// The delay between copies.
    pub fn delay(&self) -> Duration {
        self.0.delay
    }

    /// Whether a failure with this code lets the other copies go on.
    pub fn is_non_fatal(&self, code: Code) -> bool {
        self.0.non_fatal.contains(code)
    }
}

/// Builds a [`HedgePolicy`]; every setting is checked by [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct HedgePolicyBuilder {
    max_attempts: u32,
    delay: Duration,
    non_fatal: Vec<Code>,
    budget: Option<RetryBudget>,
    max_replay_bytes: usize,
}

impl Default for HedgePolicyBuilder {
    fn default() -> Self {
        HedgePolicyBuilder {
            max_attempts: 2,
            delay: Duration::ZERO,
            non_fatal: Vec::new(),
            budget: None,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
        }
    }
}

impl HedgePolicyBuilder {
    /// Copies per call, the first included: more than 1; above 5 is capped at 5 (gRFC A6).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The delay between copies (zero sends them all at once).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The codes whose failure lets the other copies go on and sends the next one at once (not
    /// `OK`).
    pub fn non_fatal_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.non_fatal = codes.into_iter().collect();
        self
    }

    /// The budget hedges draw from (gRFC A6 `retryThrottling`). Share one with a
    /// [`RetryPolicy`](super::RetryPolicy) by passing clones.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The cap on the request body buffered so that copies can be sent (> 0; default 64 KiB).
    /// A bigger request is sent once.
    pub fn max_replay_bytes(mut self, max: usize) -> Self {
        self.max_replay_bytes = max;
        self
    }

    /// Checks every setting; the error names the first bad one.
    pub fn build(self) -> Result<HedgePolicy, ConfigError> {
        if self.max_attempts < 2 {
            return Err(ConfigError::new(
                "hedge_policy.max_attempts",
                "must be greater than 1",
            ));
        }
        if self.non_fatal.contains(&Code::Ok) {
            return Err(ConfigError::new(
                "hedge_policy.non_fatal_codes",
                "must not contain OK",
            ));
        }
        if self.max_replay_bytes == 0 {
            return Err(ConfigError::new(
                "hedge_policy.max_replay_bytes",
                "must be greater than zero",
            ));
        }
        Ok(HedgePolicy(Arc::new(Inner {
            max_attempts: self.max_attempts.min(MAX_ATTEMPTS_CAP),
            delay: self.delay,
            non_fatal: self.non_fatal.into_iter().collect(),
            budget: self.budget,
            max_replay_bytes: self.max_replay_bytes,
        })))
    }
}

impl fmt::Debug for HedgePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgePolicy")
            .field("max_attempts", &self.0.max_attempts)
            .field("delay", &self.0.delay)
            .field("non_fatal", &self.0.non_fatal)
            .field("budget", &self.0.budget)
            .field("max_replay_bytes", &self.0.max_replay_bytes)
            .finish()
    }
}

/// Hedges calls by their path (`/pkg.Service/Method`), most specific policy first; `None` is
/// "not hedged" (so a method can opt out of a default policy). Cheap to clone.
///
/// How a hedged call runs (gRFC A6): the request body is buffered first (up to
/// `max_replay_bytes`, else the call is sent once), so hedge only unary and server-streaming
/// methods. Copy `n` is sent `n × delay` after the first, on a clone of the inner service once
/// it is ready, carrying `grpc-previous-rpc-attempts` and what is left of the call's
/// `grpc-timeout`. The first response with headers, or a Trailers-Only failure whose code is not
/// non-fatal, or an error whose code is not non-fatal, is the call's result; the other copies
/// are dropped (cancelled). A non-fatal failure sends the next copy at once; when every copy has
/// failed non-fatally the last failure is returned. With a budget, no copy is sent while it is
/// spent. Calls whose path has no policy, and calls that carry [`NoRetry`](super::NoRetry), go
/// straight through: the inner future as it is, no allocation. Hedges are not yet counted in metrics (gRFC A96's
/// `grpc.client.call.hedges`).
#[derive(Clone)]
pub struct HedgeLayer {
    shared: Arc<Shared>,
}

struct Shared {
    default: Option<HedgePolicy>,
    routes: HashMap<Box<str>, Option<HedgePolicy>>,
}

impl Shared {
    fn policy_for(&self, path: &str) -> Option<&HedgePolicy> {
        if let Some(policy) = self.routes.get(path) {
            return policy.as_ref();
        }
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.rsplit_once('/'))
            .map(|(service, _)| service);
        match service.and_then(|s| self.routes.get(s)) {
            Some(policy) => policy.as_ref(),
            None => self.default.as_ref(),
        }
    }
}

impl HedgeLayer {
    /// Hedges every call with `policy` (`None`: only the routes added below).
    pub fn new(policy: impl Into<Option<HedgePolicy>>) -> Self {
        HedgeLayer {
            shared: Arc::new(Shared {
                default: policy.into(),
                routes: HashMap::new(),
            }),
        }
    }

    /// The policy for one method, `/pkg.Service/Method` (`None`: not hedged).
    pub fn method_policy(self, path: &str, policy: impl Into<Option<HedgePolicy>>) -> Self {
        self.route(path, policy.into())
    }

    /// The policy for every method of `pkg.Service` unless a method policy is more specific.
    pub fn service_policy(self, service: &str, policy: impl Into<Option<HedgePolicy>>) -> Self {
        self.route(service.trim_matches('/'), policy.into())
    }

    fn route(self, key: &str, policy: Option<HedgePolicy>) -> Self {
        let mut routes = self.shared.routes.clone();
        routes.insert(key.into(), policy);
        HedgeLayer {
            shared: Arc::new(Shared {
                default: self.shared.default.clone(),
                routes,
            }),
        }
    }

    /// The policy a request path gets, if any.
    pub fn policy_for(&self, path: &str) -> Option<&HedgePolicy> {
        self.shared.policy_for(path)
    }
}

impl fmt::Debug for HedgeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("default", &self.shared.default)
            .field("routes", &self.shared.routes)
            .finish()
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`HedgeLayer`] makes.
#[derive(Clone)]
pub struct Hedge<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Hedge<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<Body>> for Hedge<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = HedgeFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let policy = if req.extensions().get::<super::NoRetry>().is_some() {
            None
        } else {
            self.shared.policy_for(req.uri().path())
        };
        let Some(policy) = policy.cloned() else {
            return HedgeFuture {
                kind: HedgeKind::Passthrough {
                    future: self.inner.call(req),
                },
            };
        };
        // The service polled ready takes the first copy; clones wait for readiness themselves.
        let mut ready = self.inner.clone();
        std::mem::swap(&mut ready, &mut self.inner);
        HedgeFuture {
            kind: HedgeKind::Hedged {
                future: Box::pin(hedged(ready, policy, req)),
            },
        }
    }
}

pin_project! {
    /// The future of a call through [`Hedge`]: the inner future itself when the call is not
    /// hedged, else the hedging task (boxed: it owns every copy in flight).
    pub struct HedgeFuture<F, B> {
        #[pin]
        kind: HedgeKind<F, B>,
    }
}

pin_project! {
    #[project = HedgeKindProj]
    enum HedgeKind<F, B> {
        Passthrough { #[pin] future: F },
        Hedged { future: BoxFuture<'static, Result<Response<B>, BoxError>> },
    }
}

impl<F, B, E> Future for HedgeFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            HedgeKindProj::Passthrough { future } => future.poll(cx).map_err(Into::into),
            HedgeKindProj::Hedged { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B> fmt::Debug for HedgeFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            HedgeKind::Passthrough { .. } => "Passthrough",
            HedgeKind::Hedged { .. } => "Hedged",
        };
        f.debug_struct("HedgeFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

enum Buffered {
    Full(Bytes),
    Overflow(Body),
}

/// Reads the whole body if it fits in `max` bytes; otherwise gives back a body that replays
/// what was read, then the rest.
async fn buffer(mut body: Body, max: usize) -> Result<Buffered, BoxError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max {
                return Ok(Buffered::Overflow(super::source::once(
                    std::iter::once(buf.freeze()),
                    body,
                )));
            }
        }
        // gRPC requests carry no trailers; any other frame is dropped with the original body.
    }
    Ok(Buffered::Full(buf.freeze()))
}

type Attempt<B> = BoxFuture<'static, Result<Response<B>, BoxError>>;

async fn hedged<S, B>(
    mut first: S,
    policy: HedgePolicy,
    req: Request<Body>,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    let p = &*policy.0;
    let (parts, body) = req.into_parts();
    // Every copy keeps the caller's size hint (see `Whole`: an exact one changes the wire).
    let hint = http_body::Body::size_hint(&body);
    let bytes = match buffer(body, p.max_replay_bytes).await? {
        Buffered::Full(bytes) => bytes,
        Buffered::Overflow(body) => {
            return first
                .call(Request::from_parts(parts, body))
                .await
                .map_err(Into::into);
        }
    };
    // Saturating: a far deadline (or a far `delay` below) means "never", not an overflow panic.
    let deadline = deadline::from_headers(&parts.headers)
        .map(|timeout| deadline::instant_after(Instant::now(), timeout));
    let body = || Body::new(Whole::new(bytes.clone(), hint));
    // The caller's own request goes out whatever is left of its deadline: the server, not this
    // layer, answers a call that is already late.
    let first_copy = Request::from_parts(parts.clone(), body());
    // Hedge `n` (1 and up) carries its attempt count and what is left of the deadline; none is
    // made once the deadline has passed.
    let copy = |n: u32| -> Option<Request<Body>> {
        let mut parts = parts.clone();
        parts
            .headers
            .insert(GRPC_PREVIOUS_RPC_ATTEMPTS, HeaderValue::from(n));
        if let Some(deadline) = deadline {
            let left = deadline.checked_duration_since(Instant::now())?;
            parts
                .headers
                .insert(deadline::GRPC_TIMEOUT, deadline::to_header_value(left));
        }
        Some(Request::from_parts(parts, body()))
    };
    let spare = first.clone();

    if let Some(budget) = &p.budget {
        budget.on_call();
    }
    let mut inflight: FuturesUnordered<Attempt<B>> = FuturesUnordered::new();
    let fut = first.call(first_copy);
    inflight.push(Box::pin(async move { fut.await.map_err(Into::into) }));
    let mut sent = 1;
    let mut spent = false;
    let next = tokio::time::sleep(p.delay);
    tokio::pin!(next);
    let mut last: Option<Result<Response<B>, BoxError>>;

    loop {
        let may_hedge = !spent && sent < p.max_attempts;
        // Sends the next copy if the budget allows; false when no more will be sent.
        tokio::select! {
            Some(result) = inflight.next() => {
                let code = match &result {
                    Ok(res) => match classify_response(res) {
                        ResponseStatus::TrailersOnly(code) if code != Code::Ok => Some(code),
                        ResponseStatus::NotGrpc(code) => Some(code),
                        _ => None,
                    },
                    Err(err) => Some(code_from_error(&**err)),
                };
                match code {
                    None => {
                        if let Some(budget) = &p.budget {
                            budget.on_success();
                        }
                        return result;
                    }
                    Some(code) if p.non_fatal.contains(code) => {
                        if let Some(budget) = &p.budget {
                            budget.on_failure();
                        }
                        last = Some(result);
                        // A6: a non-fatal failure sends the next copy at once.
                        if may_hedge && !send(&spare, copy(sent), p, &mut inflight, &mut sent) {
                            spent = true;
                        }
                        next.as_mut().reset(deadline::instant_after(Instant::now(), p.delay));
                    }
                    Some(_) => return result,
                }
                if inflight.is_empty() {
                    return last.expect("a copy ended");
                }
            }
            () = &mut next, if may_hedge => {
                if !send(&spare, copy(sent), p, &mut inflight, &mut sent) {
                    spent = true;
                }
                next.as_mut().reset(deadline::instant_after(Instant::now(), p.delay));
            }
        }
    }
}

/// Sends the next copy if the budget allows and the deadline has not passed; false when no
/// more will be sent.
fn send<S, B>(
    spare: &S,
    req: Option<Request<Body>>,
    p: &Inner,
    inflight: &mut FuturesUnordered<Attempt<B>>,
    sent: &mut u32,
) -> bool
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    let Some(req) = req else { return false };
    if p.budget.as_ref().is_some_and(|b| !b.try_retry()) {
        return false;
    }
    let mut svc = spare.clone();
    inflight.push(Box::pin(async move {
        svc.ready().await.map_err(Into::into)?;
        svc.call(req).await.map_err(Into::into)
    }));
    *sent += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_route_wins_and_none_opts_out() {
        let p = |n| HedgePolicy::new(n, Duration::ZERO, []).unwrap();
        let layer = HedgeLayer::new(p(2))
            .service_policy("pkg.Echo", p(3))
            .method_policy("/pkg.Echo/Unary", None);
        assert!(layer.policy_for("/pkg.Echo/Unary").is_none());
        assert_eq!(
            layer.policy_for("/pkg.Echo/Other").unwrap().max_attempts(),
            3
        );
        assert_eq!(layer.policy_for("/x.Y/Z").unwrap().max_attempts(), 2);
    }

    /// Every copy of a hedged call keeps the size hint the caller's body had: from an exact one
    /// hyper would add a `content-length` header that tonic's own request lacks.
    #[tokio::test]
    async fn hedged_copies_keep_the_callers_size_hint() {
        #[derive(Clone)]
        struct Hints(Arc<std::sync::Mutex<Vec<http_body::SizeHint>>>);
        impl Service<Request<Body>> for Hints {
            type Response = Response<Body>;
            type Error = BoxError;
            type Future = std::future::Ready<Result<Response<Body>, BoxError>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: Request<Body>) -> Self::Future {
                let hint = http_body::Body::size_hint(req.body());
                self.0.lock().unwrap().push(hint);
                std::future::ready(Ok(Response::new(Body::empty())))
            }
        }
        // A body with tonic's encoder's hint: none (not exact).
        let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter([
            Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from_static(b"payload"))),
        ])));
        let caller = http_body::Body::size_hint(&body);
        assert_eq!(caller.exact(), None);
        let hints = Hints(Arc::default());
        let policy = HedgePolicy::new(2, Duration::ZERO, []).unwrap();
        hedged(hints.clone(), policy, Request::new(body))
            .await
            .unwrap();
        let seen = hints.0.lock().unwrap().clone();
        assert!(!seen.is_empty());
        for hint in seen {
            assert_eq!(
                (hint.lower(), hint.upper()),
                (caller.lower(), caller.upper())
            );
        }
    }

    /// Not hedged: the inner service is called as it is (no clone) and its future returned
    /// in place (no box).
    #[tokio::test]
    async fn an_unhedged_call_is_the_inner_future_itself() {
        type Inner = std::future::Ready<Result<Response<Body>, BoxError>>;
        let inner = std::mem::size_of::<Inner>();
        let ours = std::mem::size_of::<HedgeFuture<Inner, Body>>();
        assert!(
            ours <= inner + std::mem::size_of::<usize>(),
            "{ours} vs {inner}"
        );

        let clones = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Counted(Arc<std::sync::atomic::AtomicUsize>);
        impl Clone for Counted {
            fn clone(&self) -> Self {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Counted(self.0.clone())
            }
        }
        impl Service<Request<Body>> for Counted {
            type Response = Response<Body>;
            type Error = BoxError;
            type Future = Inner;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<Body>) -> Inner {
                std::future::ready(Ok(Response::new(Body::empty())))
            }
        }
        let counted = Counted(clones.clone());
        let mut svc = HedgeLayer::new(None)
            .method_policy(
                "/pkg.Echo/Hedged",
                HedgePolicy::new(2, Duration::ZERO, []).unwrap(),
            )
            .layer(counted);
        let req = Request::builder()
            .uri("/pkg.Echo/Plain")
            .body(Body::empty())
            .unwrap();
        let future = svc.ready().await.unwrap().call(req);
        assert!(format!("{future:?}").contains("Passthrough"));
        let cloned = clones.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(cloned, 0, "the service was not cloned");
        assert!(future.await.is_ok());
    }

    #[test]
    fn bad_policies_name_the_field() {
        let err = HedgePolicy::new(1, Duration::ZERO, []).unwrap_err();
        assert_eq!(err.field(), "hedge_policy.max_attempts");
        let err = HedgePolicy::new(2, Duration::ZERO, [Code::Ok]).unwrap_err();
        assert_eq!(err.field(), "hedge_policy.non_fatal_codes");
        let err = HedgePolicy::builder()
            .max_replay_bytes(0)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "hedge_policy.max_replay_bytes");
        assert!(err.to_string().contains("max_replay_bytes"), "{err}");
        assert_eq!(
            HedgePolicy::new(9, Duration::ZERO, [])
                .unwrap()
                .max_attempts(),
            5
        );
    }
}
