//! [`ResponseFuture`]: one call through the balancer, from the pick to the response, and the
//! deadlines that bound its waits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use http::{Request, Response, Uri};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};
use tower_service::Service;

use super::body::TrackedBody;
use super::endpoint::{EndpointId, EndpointService, authority};
use super::guard::CallGuard;
use super::table::{Picked, Shared, Unavailable, WaitFailed, unavailable_status};
use crate::BoxError;
use crate::deadline::instant_after;
use crate::status::{CallEnd, HumanDuration, ResponseStatus, classify_response, status_from_error};

/// A request extension: how this call waits when no endpoint can take it (gRPC's
/// `waitForReady`, settable per method from a service config).
///
/// - absent: wait up to the balancer's `endpoint_wait`, then fail with `UNAVAILABLE`;
/// - `WaitForReady(false)` (gRPC's default): fail at once when every endpoint is in transient
///   failure (down, unhealthy, ejected); while endpoints are still connecting, wait for them up
///   to `endpoint_wait`;
/// - `WaitForReady(true)`: wait for a ready endpoint until the call's deadline
///   (`grpc-timeout`), or `endpoint_wait` when it has none, so a call never waits unbounded.
///
/// Whichever applies, no call waits past its own deadline: when `grpc-timeout` ends before
/// `endpoint_wait`, the call fails at its deadline with `DEADLINE_EXCEEDED`, saying why no
/// endpoint could take it.
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.extensions_mut().insert(towline::balance::WaitForReady(true));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitForReady(pub bool);

/// How many endpoints one call may try when the chosen one turns out broken or not ready before
/// the request is sent (its `poll_ready` fails or is pending).
const MAX_FAILOVER: usize = 3;

pin_project! {
    /// The response future of [`Balance`]: waits for a ready endpoint if none is, waits for the
    /// chosen endpoint's readiness, then runs the call.
    pub struct ResponseFuture<S: Service<Request<Body>>> {
        // What a call that may still pick again needs: none once the call went out at its
        // first pick (the common case, which neither allocates it nor clones the table's `Arc`,
        // and moves a smaller future).
        slow: Option<Box<SlowPath<S>>>,
        // The caller's `grpc-timeout`, from when the call reached the balancer.
        call_deadline: Option<CallDeadline>,
        #[pin]
        state: State<S>,
    }
}

/// The state of a call that waits (for an endpoint, or for one's readiness) or fails over.
struct SlowPath<S> {
    shared: Arc<Shared<S>>,
    endpoint_wait: Duration,
    deadline: Option<WaitDeadline>,
    // The call waited before it was sent: its `grpc-timeout` must be cut to what is left.
    waited: bool,
    tried: Vec<EndpointId>,
}

const SLOW: &str = "a call that may pick again keeps its slow-path state";

type WaitForEndpoint = Pin<Box<dyn Future<Output = Result<Request<Body>, Status>> + Send>>;

/// A call whose chosen endpoint was not ready when it was picked.
struct NotYetReady<S> {
    request: Option<Request<Body>>,
    service: S,
    guard: Option<CallGuard>,
    // What the endpoint's readiness said at the pick, if it failed: a service that failed is
    // not asked again.
    failed: Option<BoxError>,
    // Armed only once readiness is pending.
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Request<Body>>> {
        // No endpoint may take calls yet; wait for one until the deadline.
        // The wait holds the request, and gives it back once an endpoint may take it.
        Waiting { wait: WaitForEndpoint },
        // An endpoint is chosen but was not ready at once; wait for its readiness, but not past
        // the call's deadline. Boxed: the common path, an endpoint ready at once, goes straight
        // to `Calling`, and a future that need not hold the request is a small one to move.
        Ready { ready: Box<NotYetReady<S>> },
        // The call is running on the chosen endpoint.
        // Bounded by the call's deadline: below, a tonic `Channel` that is reconnecting holds a
        // request in its buffer, where its own `grpc-timeout` timer has not started yet.
        Calling {
            #[pin] future: S::Future,
            guard: Option<CallGuard>,
            // Armed only once the response is pending, so a call without a deadline sets none;
            // kept in the future itself, so that a call with one allocates nothing for it.
            #[pin] expires: Option<tokio::time::Sleep>,
        },
        // The call cannot be served; the status says why.
        Failed { status: Option<Status> },
    }
}

impl<S> ResponseFuture<S>
where
    S: EndpointService,
{
    /// Picks an endpoint for `request` (or decides to wait for one, or fails saying why).
    pub(crate) fn new(
        shared: &Arc<Shared<S>>,
        endpoint_wait: Duration,
        request: Request<Body>,
    ) -> Self {
        let mut deadline = None;
        let call_deadline = crate::deadline::from_headers(request.headers())
            .map(|timeout| CallDeadline::new(Instant::now(), timeout));
        let state = Picker {
            shared,
            endpoint_wait,
            deadline: &mut deadline,
            call_deadline,
            tried: &[],
            waited: false,
        }
        .pick(request);
        let slow = match state {
            State::Calling { .. } => None,
            _ => Some(Box::new(SlowPath {
                shared: shared.clone(),
                endpoint_wait,
                deadline,
                waited: false,
                tried: Vec::new(),
            })),
        };
        ResponseFuture {
            slow,
            call_deadline,
            state,
        }
    }
}

impl<S: Service<Request<Body>>> fmt::Debug for ResponseFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting for an endpoint",
            State::Ready { .. } => "waiting for the endpoint's readiness",
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S: EndpointService> Future for ResponseFuture<S> {
    type Output = Result<Response<TrackedBody<S::Body>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let next = match this.state.project() {
                StateProj::Waiting { wait } => match ready!(wait.as_mut().poll(cx)) {
                    Ok(request) => {
                        this.slow.as_deref_mut().expect(SLOW).waited = true;
                        self.as_mut().repick(request)
                    }
                    Err(status) => State::Failed {
                        status: Some(status),
                    },
                },
                StateProj::Ready { ready } => match ready.poll_ready(cx) {
                    Poll::Pending => {
                        let slow = this.slow.as_deref_mut().expect(SLOW);
                        let NotYetReady {
                            request,
                            guard,
                            expires,
                            ..
                        } = &mut **ready;
                        let id = guard.as_ref().expect("guard is kept until sent").load.id;
                        // Not ready at once (a pool with no live connection, or one opening
                        // another): another endpoint takes the call, and this one's task checks
                        // whether it must leave rotation.
                        let first_look = expires.is_none();
                        if first_look {
                            let guard = guard.as_ref().expect("guard is kept until sent");
                            guard.load.signals.check_readiness(|| {
                                "a call found its connections not ready".to_owned()
                            });
                        }
                        if first_look
                            && slow.tried.len() + 1 < MAX_FAILOVER
                            && slow.shared.has_candidate_besides(&slow.tried, id)
                        {
                            drop(guard.take());
                            slow.tried.push(id);
                            slow.waited = true;
                            let request = request.take().expect("request is kept until sent");
                            self.as_mut().repick(request)
                        } else {
                            slow.waited = true;
                            // No other endpoint: wait for this one, as long as a call may wait
                            // for an endpoint (its deadline, or `endpoint_wait`).
                            let wait = *slow.deadline.get_or_insert_with(|| {
                                let wait_for_ready = request
                                    .as_ref()
                                    .and_then(|r| r.extensions().get::<WaitForReady>())
                                    .map(|w| w.0);
                                WaitDeadline::new(
                                    Instant::now(),
                                    slow.endpoint_wait,
                                    *this.call_deadline,
                                    wait_for_ready,
                                )
                            });
                            let expires = expires
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wait.at)));
                            if expires.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            // Never sent: dropping the guard releases the endpoint's in-flight slot.
                            let guard = guard.take().expect("guard is kept until sent");
                            State::Failed {
                                status: Some(wait.not_ready(&guard.load.uri, slow.endpoint_wait)),
                            }
                        }
                    }
                    Poll::Ready(Ok(())) => {
                        let waited = this.slow.as_deref().is_some_and(|slow| slow.waited);
                        let NotYetReady {
                            request,
                            service,
                            guard,
                            ..
                        } = &mut **ready;
                        let mut request = request.take().expect("request is kept until sent");
                        let guard = guard.take().expect("guard is kept until sent");
                        match this.call_deadline.filter(|_| waited) {
                            // Sent with what is left of the deadline, not all of it again.
                            Some(call_deadline) => match call_deadline.remaining() {
                                Some(left) => {
                                    request.headers_mut().insert(
                                        crate::deadline::GRPC_TIMEOUT,
                                        crate::deadline::to_header_value(left),
                                    );
                                    State::Calling {
                                        future: service.call(request),
                                        guard: Some(guard.sent()),
                                        expires: None,
                                    }
                                }
                                None => State::Failed {
                                    status: Some(call_deadline.exceeded(format_args!(
                                        "before the call could be sent to {}",
                                        authority(&guard.load.uri)
                                    ))),
                                },
                            },
                            None => State::Calling {
                                future: service.call(request),
                                guard: Some(guard.sent()),
                                expires: None,
                            },
                        }
                    }
                    Poll::Ready(Err(err)) => {
                        // The request was not sent: try another endpoint.
                        let slow = this.slow.as_deref_mut().expect(SLOW);
                        let NotYetReady { request, guard, .. } = &mut **ready;
                        let request = request.take().expect("request is kept until sent");
                        let guard = guard.take().expect("guard is kept until sent");
                        guard.connection_broken();
                        let id = guard.load.id;
                        drop(guard);
                        slow.tried.push(id);
                        slow.waited = true;
                        if slow.tried.len() < MAX_FAILOVER {
                            self.as_mut().repick(request)
                        } else {
                            State::Failed {
                                status: Some(status_from_error(err)),
                            }
                        }
                    }
                },
                StateProj::Calling {
                    future,
                    guard,
                    expires,
                } => {
                    let result = match future.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            let Some(deadline) = *this.call_deadline else {
                                return Poll::Pending;
                            };
                            let mut expires = expires;
                            if expires.is_none() {
                                expires.set(Some(tokio::time::sleep_until(deadline.at)));
                            }
                            if let Some(expires) = expires.as_pin_mut()
                                && expires.poll(cx).is_pending()
                            {
                                return Poll::Pending;
                            }
                            // Dropping the inner future cancels the call wherever it is.
                            let mut guard = guard.take().expect("polled after completion");
                            guard.finish(Code::DeadlineExceeded);
                            let uri = guard.load.uri.clone();
                            drop(guard);
                            return Poll::Ready(Err(Box::new(deadline.exceeded(format_args!(
                                "waiting for {}'s response",
                                authority(&uri)
                            )))));
                        }
                    };
                    let mut guard = guard.take().expect("polled after completion");
                    return Poll::Ready(match result {
                        Ok(response) => {
                            match classify_response(&response) {
                                ResponseStatus::TrailersOnly(code)
                                | ResponseStatus::NotGrpc(code) => guard.finish(code),
                                ResponseStatus::InTrailers => {}
                            }
                            guard.responded();
                            Ok(response.map(|inner| TrackedBody::new(inner, Some(guard))))
                        }
                        Err(err) => {
                            let err: BoxError = err.into();
                            guard.failed(&*err);
                            // Hand the caller a status classified as gRPC clients do (a closed
                            // connection is UNAVAILABLE, not tonic's CANCELLED); the transport
                            // error stays reachable as its source.
                            let status = status_from_error(err);
                            Err(Box::new(match this.call_deadline {
                                Some(deadline) if status.code() == Code::DeadlineExceeded => {
                                    deadline.restate(status)
                                }
                                _ => status,
                            }))
                        }
                    });
                }
                StateProj::Failed { status } => {
                    let status = status.take().expect("polled after completion");
                    return Poll::Ready(Err(Box::new(status)));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S> ResponseFuture<S>
where
    S: EndpointService,
{
    fn repick(self: Pin<&mut Self>, request: Request<Body>) -> State<S> {
        let this = self.project();
        let slow = this.slow.as_deref_mut().expect(SLOW);
        let picker = Picker {
            shared: &slow.shared,
            endpoint_wait: slow.endpoint_wait,
            deadline: &mut slow.deadline,
            call_deadline: *this.call_deadline,
            tried: &slow.tried,
            waited: slow.waited,
        };
        picker.pick(request)
    }
}

impl<S: EndpointService> NotYetReady<S> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.failed.take() {
            Some(err) => Poll::Ready(Err(err)),
            None => self.service.poll_ready(cx).map_err(Into::into),
        }
    }
}

/// The caller's deadline (`grpc-timeout`), fixed when the call reached the balancer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallDeadline {
    at: Instant,
    timeout: Duration,
}

impl CallDeadline {
    fn new(now: Instant, timeout: Duration) -> Self {
        CallDeadline {
            at: instant_after(now, timeout),
            timeout,
        }
    }

    /// What is left of it, if anything.
    fn remaining(&self) -> Option<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// `DEADLINE_EXCEEDED`, saying which deadline and when it passed.
    fn exceeded(&self, when: fmt::Arguments<'_>) -> Status {
        Status::deadline_exceeded(format!(
            "towline balance: deadline of {} exceeded {when}",
            HumanDuration(self.timeout)
        ))
    }

    /// A `DEADLINE_EXCEEDED` from below (tonic's own timer), restated with the deadline it was.
    fn restate(&self, status: Status) -> Status {
        let message = format!(
            "deadline of {} exceeded ({})",
            HumanDuration(self.timeout),
            status.message()
        );
        let mut restated = Status::new(status.code(), message);
        if let Some(source) = std::error::Error::source(&status) {
            restated.set_source(Arc::new(SourceText(crate::status::describe_error(source))));
        }
        restated
    }
}

/// The source of a restated status: the original's words (its own source type is not `Clone`).
#[derive(Debug)]
struct SourceText(String);

impl fmt::Display for SourceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceText {}

/// How long a call may wait for an endpoint, fixed at its first pick so failovers do not extend it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitDeadline {
    at: Instant,
    /// The call's own deadline ends the wait (rather than `endpoint_wait`).
    is_call_deadline: bool,
    call: Option<CallDeadline>,
}

impl WaitDeadline {
    fn new(
        now: Instant,
        endpoint_wait: Duration,
        call_deadline: Option<CallDeadline>,
        wait_for_ready: Option<bool>,
    ) -> Self {
        let wait_until = instant_after(now, endpoint_wait);
        let (at, is_call_deadline) = match (call_deadline, wait_for_ready) {
            (Some(call), Some(true)) => (call.at, true),
            (Some(call), _) if call.at < wait_until => (call.at, true),
            _ => (wait_until, false),
        };
        WaitDeadline {
            at,
            is_call_deadline,
            call: call_deadline,
        }
    }

    /// The status of a call whose wait ran out while the one endpoint it could go to was not
    /// ready.
    fn not_ready(&self, uri: &Uri, endpoint_wait: Duration) -> Status {
        let endpoint = authority(uri);
        match self.call.filter(|_| self.is_call_deadline) {
            Some(call) => call.exceeded(format_args!(
                "while {endpoint} was not ready to take the call"
            )),
            None => unavailable_status(&format!(
                "{endpoint} was not ready to take the call within {}",
                HumanDuration(endpoint_wait)
            )),
        }
    }

    /// The status of a call whose wait ran out while no endpoint could take it, for `reason`.
    fn expired(&self, reason: &str) -> Status {
        match self.call.filter(|_| self.is_call_deadline) {
            Some(call) => call.exceeded(format_args!("while waiting for an endpoint: {reason}")),
            None => unavailable_status(reason),
        }
    }
}

/// The unpinned fields a pick needs, borrowed from the future.
struct Picker<'a, S> {
    shared: &'a Arc<Shared<S>>,
    endpoint_wait: Duration,
    deadline: &'a mut Option<WaitDeadline>,
    call_deadline: Option<CallDeadline>,
    tried: &'a [EndpointId],
    /// The call waited (for an endpoint, or a failover): its deadline must be cut on sending.
    waited: bool,
}

impl<S> Picker<'_, S>
where
    S: EndpointService,
{
    /// Chooses an endpoint for `request`, or decides to wait for one, or fails saying why.
    fn pick(self, mut request: Request<Body>) -> State<S> {
        // A strategy that reads the request sees its head: the request is taken apart for it
        // and put back together (`http::Request` lends no `&Parts`). One that does not read it
        // is shown a blank head, and the request is not moved.
        let picked = match self.shared.blank_head() {
            Some(blank) => self.shared.pick(blank, self.tried),
            None => {
                let (parts, body) = request.into_parts();
                let picked = self.shared.pick(&parts, self.tried);
                request = Request::from_parts(parts, body);
                picked
            }
        };
        match picked {
            Ok(Picked {
                load,
                mut service,
                generation,
            }) => {
                let guard = CallGuard::new(
                    load,
                    generation,
                    request.extensions().get::<CallEnd>().cloned(),
                );
                // Most often the endpoint is ready at once: the call goes out now, and the
                // future never holds the request. A look that finds it not ready registers no
                // waker; the call's future asks again with its own.
                let failed = match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(Ok(())) if !self.waited => {
                        return State::Calling {
                            future: service.call(request),
                            guard: Some(guard.sent()),
                            expires: None,
                        };
                    }
                    // A call that waited is sent by `Ready`, which cuts its deadline to what is left.
                    Poll::Ready(Ok(())) | Poll::Pending => None,
                    Poll::Ready(Err(err)) => Some(err.into()),
                };
                State::Ready {
                    ready: Box::new(NotYetReady {
                        request: Some(request),
                        service,
                        guard: Some(guard),
                        failed,
                        expires: None,
                    }),
                }
            }
            Err(Unavailable { reason, settling }) => {
                let wait_for_ready = request.extensions().get::<WaitForReady>().map(|w| w.0);
                let call_deadline = self.call_deadline;
                let now = Instant::now();
                let deadline = *self.deadline.get_or_insert_with(|| {
                    WaitDeadline::new(now, self.endpoint_wait, call_deadline, wait_for_ready)
                });
                let fail_fast = wait_for_ready == Some(false);
                // After a failover there is no point waiting: the table has not caught up yet.
                if !self.tried.is_empty() || (fail_fast && !settling) {
                    return State::Failed {
                        status: Some(unavailable_status(&reason)),
                    };
                }
                if now >= deadline.at {
                    return State::Failed {
                        status: Some(deadline.expired(&reason)),
                    };
                }
                let shared = self.shared.clone();
                State::Waiting {
                    wait: Box::pin(async move {
                        match shared.wait_for_candidates(deadline.at, fail_fast).await {
                            Ok(()) => Ok(request),
                            Err(WaitFailed::Settled(reason)) => Err(unavailable_status(&reason)),
                            Err(WaitFailed::TimedOut(reason)) => Err(deadline.expired(&reason)),
                        }
                    }),
                }
            }
        }
    }
}
