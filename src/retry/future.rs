//! [`ResponseFuture`]: one call through [`Retry`](super::Retry), attempt after attempt.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::{Code, Status};
use tower_service::Service;

use super::body::ReplayBody;
use super::layer::Shared;
use super::policy::RetryPolicy;
use crate::BoxError;
use crate::status::{ResponseStatus, classify_response, code_from_error, is_unprocessed};

/// gRFC A6: the number of attempts that preceded this one, on every attempt after the first.
pub const GRPC_PREVIOUS_RPC_ATTEMPTS: HeaderName =
    HeaderName::from_static("grpc-previous-rpc-attempts");

/// gRFC A6: the server's pushback, in the trailers (of a Trailers-Only response, its headers).
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

pin_project! {
    /// The future of a call through [`Retry`](super::Retry).
    ///
    /// When no retry is possible it is the inner future and nothing else. Otherwise it moves
    /// through named states: `Calling` (an attempt in flight), `Backoff` (sleeping before the next
    /// one) and `WaitingForReady` (driving the inner service's `poll_ready`, which every attempt
    /// after the first waits for). Dropping it drops whichever of these it is in: the attempt is
    /// cancelled and the sleep with it; it spawns nothing.
    pub struct ResponseFuture<S, F> {
        #[pin]
        kind: Kind<S, F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, F> {
        Passthrough { #[pin] future: F },
        // Boxed, so that a pass-through future is the size of the inner one.
        Retrying { #[pin] state: State<F>, retry: Box<RetryState<S>> },
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Backoff { sleep: Pin<Box<Sleep>> },
        WaitingForReady,
    }
}

/// What a retrying call keeps between attempts.
pub(crate) struct RetryState<S> {
    service: S,
    /// The request's head, copied into every attempt.
    parts: Parts,
    /// The template every attempt's body is cloned from.
    body: ReplayBody,
    /// The next attempt's body, cloned as soon as an attempt fails: it supersedes the failed
    /// attempt's body, which stops reading from the caller's.
    next_body: Option<ReplayBody>,
    policy: RetryPolicy,
    shared: Arc<Shared>,
    deadline: Option<Instant>,
    /// Attempts counted against `max_attempts`, the one in flight included.
    attempts: u32,
    transparent: u32,
    retries_since_pushback: u32,
    previous_delay: Duration,
    total_delay: Duration,
}

enum Decision<T> {
    Done(T),
    /// Retry after this delay (zero: at once).
    Retry(Duration),
}

/// The resolution of tokio's timers: a sleep may end up to this much after its deadline.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// `grpc-retry-pushback-ms`, as gRFC A6 reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushback {
    After(Duration),
    /// Negative or malformed: the server asks not to retry.
    Stop,
}

pub(crate) fn pushback(headers: &HeaderMap) -> Option<Pushback> {
    let value = headers.get(GRPC_RETRY_PUSHBACK_MS)?.as_bytes();
    let ms = (!value.is_empty() && value.iter().all(u8::is_ascii_digit))
        .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
        .flatten();
    Some(ms.map_or(Pushback::Stop, |ms| {
        Pushback::After(Duration::from_millis(ms))
    }))
}

impl<S, F> ResponseFuture<S, F> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn retrying(future: F, retry: RetryState<S>) -> Self {
        ResponseFuture {
            kind: Kind::Retrying {
                state: State::Calling { future },
                retry: Box::new(retry),
            },
        }
    }
}

impl<S> RetryState<S> {
    pub(crate) fn new(
        service: S,
        parts: Parts,
        body: ReplayBody,
        policy: RetryPolicy,
        shared: Arc<Shared>,
        deadline: Option<Instant>,
    ) -> Self {
        RetryState {
            service,
            parts,
            body,
            next_body: None,
            policy,
            shared,
            deadline,
            attempts: 1,
            transparent: 0,
            retries_since_pushback: 0,
            previous_delay: Duration::ZERO,
            total_delay: Duration::ZERO,
        }
    }

    /// An attempt ended: return its outcome, or retry.
    fn on_attempt<B, E: Into<BoxError>>(
        &mut self,
        result: Result<Response<B>, E>,
    ) -> Decision<Result<Response<B>, BoxError>> {
        let budget = self.policy.budget();
        match result {
            Ok(res) => match classify_response(&res) {
                ResponseStatus::TrailersOnly(code) if code != Code::Ok => {
                    self.next_body = Some(self.body.clone());
                    match self.after_failure(code, pushback(res.headers())) {
                        Some(delay) => Decision::Retry(delay),
                        None => Decision::Done(Ok(res)),
                    }
                }
                // Headers arrived: committed (gRFC A6), whatever the trailers will say.
                ResponseStatus::TrailersOnly(_) | ResponseStatus::InTrailers => {
                    if let Some(budget) = budget {
                        budget.on_success();
                    }
                    Decision::Done(Ok(res))
                }
                ResponseStatus::NotGrpc(_) => Decision::Done(Ok(res)),
            },
            Err(err) => {
                self.next_body = Some(self.body.clone());
                let err = err.into();
                if is_unprocessed(&*err)
                    && self.transparent < self.policy.max_transparent_retries()
                    && self.body.is_replayable()
                    && self.deadline.is_none_or(|d| Instant::now() < d)
                {
                    // gRFC A6: the server never saw it, so retry at once, outside
                    // max_attempts and the budget.
                    self.transparent += 1;
                    return Decision::Retry(Duration::ZERO);
                }
                match self.after_failure(code_from_error(&*err), None) {
                    Some(delay) => Decision::Retry(delay),
                    None => Decision::Done(Err(super::into_status(err))),
                }
            }
        }
    }

    /// A failure with `code` before the call was committed: the delay before the next attempt,
    /// or `None` to give the failure to the caller.
    fn after_failure(&mut self, code: Code, pushback: Option<Pushback>) -> Option<Duration> {
        let policy = self.policy.inner();
        if !policy.retryable.contains(code) {
            return None;
        }
        if let Some(budget) = &policy.budget {
            budget.on_retryable_failure();
        }
        if self.attempts >= policy.max_attempts || !self.body.is_replayable() {
            return None;
        }
        let (delay, previous) = match pushback {
            Some(Pushback::Stop) => return None,
            // The server's delay, and the backoff starts over (as grpc-go does).
            Some(Pushback::After(delay)) => {
                self.retries_since_pushback = 0;
                (delay, Duration::ZERO)
            }
            None => {
                self.retries_since_pushback += 1;
                let delay = policy
                    .backoff
                    .delay(self.retries_since_pushback, self.previous_delay);
                (delay, delay)
            }
        };
        // Never retry past the call's deadline: an attempt that could not start in time would
        // only fail with DEADLINE_EXCEEDED and hide the real failure.
        // Never retry past the call's deadline: an attempt that could not start in time would
        // only fail with DEADLINE_EXCEEDED and hide the real failure. Tokio's timers fire on
        // millisecond ticks, rounded up, so the backoff must end a tick before the deadline.
        let past_deadline = |deadline: Instant| {
            Instant::now()
                .checked_add(delay.saturating_add(TIMER_TICK))
                .is_none_or(|at| at >= deadline)
        };
        if self.deadline.is_some_and(past_deadline) {
            return None;
        }
        if policy.budget.as_ref().is_some_and(|b| !b.try_retry()) {
            self.shared.metrics.budget_exhausted.increment(1);
            return None;
        }
        self.attempts += 1;
        self.previous_delay = previous;
        self.total_delay = self.total_delay.saturating_add(delay);
        Some(delay)
    }

    /// The next attempt's request: the saved head, its attempt count, what is left of the
    /// deadline, and the replayed body.
    fn next_request(&mut self) -> Result<Request<Body>, Status> {
        let mut parts = self.parts.clone();
        let previous = self.attempts + self.transparent - 1;
        parts
            .headers
            .insert(GRPC_PREVIOUS_RPC_ATTEMPTS, HeaderValue::from(previous));
        if let Some(deadline) = self.deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Status::deadline_exceeded(
                    "towline retry: the call's deadline passed before the next attempt",
                ));
            }
            parts.headers.insert(
                crate::deadline::GRPC_TIMEOUT,
                crate::deadline::to_header_value(remaining),
            );
        }
        let body = self.next_body.take().unwrap_or_else(|| self.body.clone());
        Ok(Request::from_parts(parts, Body::new(body)))
    }

    fn finish(&self) {
        self.shared
            .metrics
            .record_call(self.attempts - 1, self.transparent, self.total_delay);
    }
}

impl<S, F, B> Future for ResponseFuture<S, F>
where
    S: Service<Request<Body>, Response = Response<B>, Future = F>,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<B>, S::Error>>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (mut state, retry) = match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                return future.poll(cx).map_err(super::into_status);
            }
            KindProj::Retrying { state, retry } => (state, retry),
        };
        loop {
            match state.as_mut().project() {
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    match retry.on_attempt(result) {
                        Decision::Done(output) => {
                            retry.finish();
                            return Poll::Ready(output);
                        }
                        Decision::Retry(delay) if delay.is_zero() => {
                            state.set(State::WaitingForReady);
                        }
                        Decision::Retry(delay) => state.set(State::Backoff {
                            sleep: Box::pin(tokio::time::sleep(delay)),
                        }),
                    }
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    state.set(State::WaitingForReady);
                }
                StateProj::WaitingForReady => {
                    if let Err(err) = ready!(retry.service.poll_ready(cx)) {
                        retry.finish();
                        return Poll::Ready(Err(super::into_status(err)));
                    }
                    let req = match retry.next_request() {
                        Ok(req) => req,
                        Err(status) => {
                            retry.finish();
                            return Poll::Ready(Err(Box::new(status)));
                        }
                    };
                    let future = retry.service.call(req);
                    state.set(State::Calling { future });
                }
            }
        }
    }
}

impl<S, F> fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Retrying { state, .. } => match state {
                State::Calling { .. } => "Calling",
                State::Backoff { .. } => "Backoff",
                State::WaitingForReady => "WaitingForReady",
            },
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn a_pass_through_future_is_the_size_of_the_inner_one() {
        type Inner = std::future::Ready<Result<Response<Body>, BoxError>>;
        type Svc = tower::util::BoxCloneService<Request<Body>, Response<Body>, BoxError>;
        let inner = std::mem::size_of::<Inner>();
        let ours = std::mem::size_of::<ResponseFuture<Svc, Inner>>();
        assert!(
            ours <= inner + 2 * std::mem::size_of::<usize>(),
            "{ours} vs {inner}"
        );
    }

    #[test]
    fn pushback_is_read_as_grfc_a6_says() {
        assert_eq!(pushback(&HeaderMap::new()), None);
        assert_eq!(
            pushback(&headers("250")),
            Some(Pushback::After(Duration::from_millis(250)))
        );
        assert_eq!(
            pushback(&headers("0")),
            Some(Pushback::After(Duration::ZERO))
        );
        for bad in ["-1", "", "1.5", "abc", " 5", "99999999999999999999999"] {
            assert_eq!(pushback(&headers(bad)), Some(Pushback::Stop), "{bad:?}");
        }
    }
}
