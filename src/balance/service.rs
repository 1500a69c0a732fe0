use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Frame;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};
use tower_layer::Layer;
use tower_service::Service;

use super::config::BalanceConfig;
use super::driver::{CallEvent, Driver, DriverGuard, Feedback, authority};
use super::endpoint::{EndpointId, EndpointSnapshot, Load};
use super::metrics::BalanceMetrics;
use super::strategy::RoundRobin;
use super::table::{Picked, Shared, Unavailable, WaitFailed, unavailable_status};
use crate::BoxError;
use crate::deadline::instant_after;
use crate::discover::Discover;
use crate::status::{
    CallEnd, HumanDuration, ResponseStatus, classify_response, code_from_error, code_from_trailers,
    status_from_error,
};

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

/// What the balancer needs of each endpoint's service: tonic's `Channel`, a
/// [`Pool`](crate::pool::Pool), or anything else that serves gRPC over
/// `http::Request<tonic::body::Body>`, can be cloned per call and shared across tasks.
/// Implemented for every such service.
pub trait EndpointService:
    Service<Request<Body>, Response = Response<Self::Body>, Error: Into<BoxError>, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The response body.
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static;
}

impl<S, B> EndpointService for S
where
    S: Service<Request<Body>, Response = Response<B>, Error: Into<BoxError>, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static,
    B: http_body::Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static,
{
    type Body = B;
}

/// What the balancer needs of the `MakeService` that connects it to an endpoint
/// ([`Connect`](crate::connect::Connect), a [`PoolLayer`](crate::pool::PoolLayer) over it, …).
/// Implemented for every such service.
pub trait MakeEndpoint:
    Service<Uri, Response = Self::Endpoint, Error: Into<BoxError>, Future: Send>
    + Clone
    + Send
    + 'static
{
    /// The service it makes for each endpoint.
    type Endpoint: EndpointService;
}

impl<M> MakeEndpoint for M
where
    M: Service<Uri, Error: Into<BoxError>, Future: Send> + Clone + Send + 'static,
    M::Response: EndpointService,
{
    type Endpoint = M::Response;
}

/// Balances calls over the endpoints a [`Discover`] names, connecting to each through a
/// `MakeService`. See the [module docs](super).
///
/// **One balancer per layer.** A discovery is a stream with one consumer, so a `BalanceLayer`
/// makes one [`Balance`]: the first [`layer`](Layer::layer) call takes the discovery, and every
/// later one has nothing to balance over. Such a balancer is built failed, and says so at once:
/// an error is logged (`tracing::error!`), [`Balance::failure`] returns the reason, and every call
/// fails with `UNAVAILABLE` and that reason. To share one balancer among clients, layer once and
/// clone the [`Balance`] (clones share its endpoints). Where a one-shot use should be checked by
/// the compiler, [`into_balance`](Self::into_balance) consumes the layer, and [`Balance::new`]
/// takes the discovery directly.
///
/// (A `Clone` layer that cloned its discovery for each balancer would give each its own stream
/// only for discoveries that can be copied; a fed channel cannot, and towline would have to
/// start a discovery per balancer rather than share one, as tower's `MakeBalanceLayer` does with
/// a discovery *factory*. The one-shot layer keeps `ServiceBuilder` stacks working for any
/// discovery.)
pub struct BalanceLayer<D> {
    inner: Mutex<Option<(D, BalanceConfig)>>,
}

impl<D> BalanceLayer<D> {
    /// Endpoints from `discovery`, chosen and gated as `config` says.
    pub fn new(discovery: D, config: BalanceConfig) -> Self {
        BalanceLayer {
            inner: Mutex::new(Some((discovery, config))),
        }
    }

    /// Starts the balancer over `make`, consuming the layer: the one-shot use
    /// [`layer`](Layer::layer) allows, checked by the compiler. Same as [`Balance::new`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use towline::balance::{BalanceConfig, BalanceLayer};
    /// use towline::connect::Connect;
    /// use towline::discover::Static;
    ///
    /// let layer = BalanceLayer::new(Static::new([]), BalanceConfig::default());
    /// let balance = layer.into_balance(Connect::new());
    /// assert!(balance.failure().is_none());
    /// # }
    /// ```
    pub fn into_balance<M>(self, make: M) -> Balance<M::Endpoint>
    where
        D: Discover,
        M: MakeEndpoint,
    {
        match self
            .inner
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some((discovery, config)) => Balance::new(discovery, make, config),
            // Only `layer` takes the discovery, and it borrows the layer: unreachable from an
            // owned one, but a failed balancer rather than a panic all the same.
            None => Balance::failed(ALREADY_LAYERED),
        }
    }
}

const ALREADY_LAYERED: &str =
    "this BalanceLayer was already layered once; its discovery feeds only the first balancer";

impl<D> fmt::Debug for BalanceLayer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer").finish_non_exhaustive()
    }
}

impl<D, M> Layer<M> for BalanceLayer<D>
where
    D: Discover,
    M: MakeEndpoint,
{
    type Service = Balance<M::Endpoint>;

    /// Starts the balancer. A `BalanceLayer` owns its discovery stream, so it makes one balancer:
    /// layering it a second time gives a failed balancer, logged as an error at once, whose
    /// [`failure`](Balance::failure) and calls say why (see the [type docs](BalanceLayer)).
    fn layer(&self, make: M) -> Balance<M::Endpoint> {
        let taken = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match taken {
            Some((discovery, config)) => Balance::new(discovery, make, config),
            None => Balance::failed(ALREADY_LAYERED),
        }
    }
}

/// A `Service<http::Request<tonic::body::Body>>` that sends each call to one of many endpoints:
/// only to endpoints that are connected, healthy and not ejected, chosen by a [`Strategy`].
/// Cheap to clone; every clone shares the endpoints. Usable as the transport of any
/// tonic-generated client.
///
/// `poll_ready` is always ready: the endpoint is chosen in `call` (hash strategies need the
/// request), and the chosen endpoint's own readiness is checked by the response future. An
/// endpoint whose service is not ready at once (a pool with no live connection) hands the call
/// to another endpoint and leaves rotation until it is ready again, as tower's `ReadyCache`
/// keeps p2c to ready services; with no other endpoint to go to, the call waits for it, never
/// past its deadline. A call that waited (for an endpoint, or for one's readiness) is sent with
/// what is left of its `grpc-timeout`, not the whole of it again.
///
/// [`Strategy`]: super::Strategy
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
    feedback: Arc<Feedback>,
    endpoint_wait: Duration,
    /// Why this balancer could not start, if it could not.
    failure: Option<&'static str>,
    _driver: Arc<DriverGuard>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Balance {
            shared: self.shared.clone(),
            feedback: self.feedback.clone(),
            endpoint_wait: self.endpoint_wait,
            failure: self.failure,
            _driver: self._driver.clone(),
        }
    }
}

impl<S> fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("endpoint_wait", &self.endpoint_wait)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl<S: Clone + Send + Sync + 'static> Balance<S> {
    /// Starts a balancer over `discovery`, connecting through `make`. Must run inside a Tokio
    /// runtime (it spawns the task that follows discovery and keeps connections); outside one,
    /// it is built failed: [`failure`](Self::failure) and every call say so.
    pub fn new<D, M>(discovery: D, make: M, config: BalanceConfig) -> Self
    where
        D: Discover,
        M: MakeEndpoint<Endpoint = S>,
        S: EndpointService,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Balance::failed(
                "the balancer was built outside a Tokio runtime, so it cannot connect",
            );
        };
        let BalanceConfig {
            strategy,
            health_check,
            outlier_detection,
            panic_threshold,
            endpoint_wait,
            reconnect,
            ewma,
            target,
        } = config;
        // The strategy lives in the endpoint table, where picks read it and updates rebuild it.
        let shared = Arc::new(Shared::new(
            strategy,
            panic_threshold,
            BalanceMetrics::new(&target),
        ));
        let (driver, calls) = Driver::new(
            shared.clone(),
            make,
            health_check,
            outlier_detection,
            reconnect,
            ewma,
        );
        let feedback = driver.feedback.clone();
        let task = runtime.spawn(driver.run(discovery, calls));
        Balance {
            shared,
            feedback,
            endpoint_wait,
            failure: None,
            _driver: Arc::new(DriverGuard(Some(task.abort_handle()))),
        }
    }

    /// A balancer that could not start: said at once in the log and by [`failure`](Self::failure),
    /// and by every call.
    fn failed(reason: &'static str) -> Self {
        tracing::error!(
            reason,
            "towline balancer failed at construction; every call will fail"
        );
        let (events, _) = tokio::sync::mpsc::unbounded_channel::<CallEvent>();
        Balance {
            shared: Arc::new(Shared::failed(
                Box::new(RoundRobin::new()),
                reason,
                BalanceMetrics::new("towline"),
            )),
            feedback: Arc::new(Feedback {
                detection: None,
                events,
            }),
            endpoint_wait: Duration::ZERO,
            failure: Some(reason),
            _driver: Arc::new(DriverGuard(None)),
        }
    }

    /// Why this balancer could not start, if it could not: its [`BalanceLayer`] was already
    /// layered once, or it was built outside a Tokio runtime. Such a balancer knows no endpoint
    /// and fails every call with `UNAVAILABLE` and this reason; check it where the stack is
    /// built to fail there instead.
    pub fn failure(&self) -> Option<&str> {
        self.failure
    }

    /// Whether this balancer could not start (see [`failure`](Self::failure)).
    pub fn is_failed(&self) -> bool {
        self.failure.is_some()
    }

    /// Every known endpoint: its state, in-flight calls, latency estimate and why it is not ready.
    pub fn snapshot(&self) -> Vec<EndpointSnapshot> {
        self.shared.snapshot()
    }

    /// Waits until `done` holds for the [`snapshot`](Self::snapshot), checking it again after
    /// every change in the endpoint table (a connection, a health verdict, an ejection, a
    /// discovery change). For start-up gates and readiness probes:
    /// `balance.wait_until(|s| s.iter().any(|e| e.state == EndpointState::Ready)).await`.
    ///
    /// [`EndpointState`]: super::EndpointState
    pub async fn wait_until(&self, done: impl FnMut(&[EndpointSnapshot]) -> bool) {
        self.shared.wait_until(done).await;
    }

    /// Whether fewer endpoints are ready than the panic threshold allows, so calls are spread
    /// over every connected endpoint.
    pub fn in_panic(&self) -> bool {
        self.shared.in_panic()
    }
}

impl<S: EndpointService> Service<Request<Body>> for Balance<S> {
    type Response = Response<TrackedBody<S::Body>>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture<S> {
        let mut deadline = None;
        let call_deadline = crate::deadline::from_headers(request.headers())
            .map(|timeout| CallDeadline::new(Instant::now(), timeout));
        let state = Picker {
            shared: &self.shared,
            feedback: &self.feedback,
            endpoint_wait: self.endpoint_wait,
            deadline: &mut deadline,
            call_deadline,
            tried: &[],
        }
        .pick(request);
        ResponseFuture {
            shared: self.shared.clone(),
            feedback: self.feedback.clone(),
            endpoint_wait: self.endpoint_wait,
            deadline,
            call_deadline,
            waited: false,
            tried: Vec::new(),
            state,
        }
    }
}

pin_project! {
    /// The response future of [`Balance`]: waits for a ready endpoint if none is, waits for the
    /// chosen endpoint's readiness, then runs the call.
    pub struct ResponseFuture<S: Service<Request<Body>>> {
        shared: Arc<Shared<S>>,
        feedback: Arc<Feedback>,
        endpoint_wait: Duration,
        deadline: Option<WaitDeadline>,
        // The caller's `grpc-timeout`, from when the call reached the balancer.
        call_deadline: Option<CallDeadline>,
        // The call waited before it was sent: its `grpc-timeout` must be cut to what is left.
        waited: bool,
        tried: Vec<EndpointId>,
        #[pin]
        state: State<S>,
    }
}

type WaitForEndpoint = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Request<Body>>> {
        // No endpoint may take calls yet; wait for one until the deadline.
        Waiting { request: Option<Request<Body>>, wait: WaitForEndpoint },
        // An endpoint is chosen; wait for its readiness, but not past the call's deadline.
        Ready {
            request: Option<Request<Body>>,
            service: S,
            guard: Option<CallGuard>,
            // Armed only once readiness is pending, so the common path sets no timer.
            expires: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        // The call is running on the chosen endpoint.
        // Bounded by the call's deadline: below, a tonic `Channel` that is reconnecting holds a
        // request in its buffer, where its own `grpc-timeout` timer has not started yet.
        Calling {
            #[pin] future: S::Future,
            guard: Option<CallGuard>,
            // Armed only once the response is pending, so a call without a deadline sets none.
            expires: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        // The call cannot be served; the status says why.
        Failed { status: Option<Status> },
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
                StateProj::Waiting { request, wait } => match ready!(wait.as_mut().poll(cx)) {
                    Ok(()) => {
                        *this.waited = true;
                        let request = request.take().expect("request is kept until sent");
                        self.as_mut().repick(request)
                    }
                    Err(status) => State::Failed {
                        status: Some(status),
                    },
                },
                StateProj::Ready {
                    request,
                    service,
                    guard,
                    expires,
                } => match service.poll_ready(cx) {
                    Poll::Pending => {
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
                            && this.tried.len() + 1 < MAX_FAILOVER
                            && this.shared.has_candidate_besides(this.tried, id)
                        {
                            drop(guard.take());
                            this.tried.push(id);
                            *this.waited = true;
                            let request = request.take().expect("request is kept until sent");
                            self.as_mut().repick(request)
                        } else {
                            *this.waited = true;
                            // No other endpoint: wait for this one, as long as a call may wait
                            // for an endpoint (its deadline, or `endpoint_wait`).
                            let wait = *this.deadline.get_or_insert_with(|| {
                                let wait_for_ready = request
                                    .as_ref()
                                    .and_then(|r| r.extensions().get::<WaitForReady>())
                                    .map(|w| w.0);
                                WaitDeadline::new(
                                    Instant::now(),
                                    *this.endpoint_wait,
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
                                status: Some(wait.not_ready(&guard.load.uri, *this.endpoint_wait)),
                            }
                        }
                    }
                    Poll::Ready(Ok(())) => {
                        let mut request = request.take().expect("request is kept until sent");
                        let guard = guard.take().expect("guard is kept until sent");
                        match this.call_deadline.filter(|_| *this.waited) {
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
                        let err: BoxError = err.into();
                        let request = request.take().expect("request is kept until sent");
                        let guard = guard.take().expect("guard is kept until sent");
                        guard.connection_broken();
                        let id = guard.load.id;
                        drop(guard);
                        this.tried.push(id);
                        *this.waited = true;
                        if this.tried.len() < MAX_FAILOVER {
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
                            let expires = expires.get_or_insert_with(|| {
                                Box::pin(tokio::time::sleep_until(deadline.at))
                            });
                            if expires.as_mut().poll(cx).is_pending() {
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
                            Ok(response.map(|inner| TrackedBody {
                                inner,
                                guard: Some(guard),
                            }))
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
    S: Service<Request<Body>> + Clone + Send + Sync + 'static,
{
    fn repick(self: Pin<&mut Self>, request: Request<Body>) -> State<S> {
        let this = self.project();
        let picker = Picker {
            shared: this.shared,
            feedback: this.feedback,
            endpoint_wait: *this.endpoint_wait,
            deadline: this.deadline,
            call_deadline: *this.call_deadline,
            tried: this.tried,
        };
        picker.pick(request)
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
    feedback: &'a Arc<Feedback>,
    endpoint_wait: Duration,
    deadline: &'a mut Option<WaitDeadline>,
    call_deadline: Option<CallDeadline>,
    tried: &'a [EndpointId],
}

impl<S> Picker<'_, S>
where
    S: Service<Request<Body>> + Clone + Send + Sync + 'static,
{
    /// Chooses an endpoint for `request`, or decides to wait for one, or fails saying why.
    fn pick(self, request: Request<Body>) -> State<S> {
        let (parts, body) = request.into_parts();
        let picked = self.shared.pick(&parts, self.tried);
        let wait_for_ready = parts.extensions.get::<WaitForReady>().map(|w| w.0);
        let call_deadline = self.call_deadline;
        let request = Some(Request::from_parts(parts, body));
        match picked {
            Ok(Picked {
                load,
                service,
                generation,
            }) => State::Ready {
                guard: Some(CallGuard::new(
                    load,
                    generation,
                    self.feedback.clone(),
                    request
                        .as_ref()
                        .and_then(|r| r.extensions().get::<CallEnd>().cloned()),
                )),
                request,
                service,
                expires: None,
            },
            Err(Unavailable { reason, settling }) => {
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
                    request,
                    wait: Box::pin(async move {
                        shared
                            .wait_for_candidates(deadline.at, fail_fast)
                            .await
                            .map_err(|unavailable| match unavailable {
                                WaitFailed::Settled(reason) => unavailable_status(&reason),
                                WaitFailed::TimedOut(reason) => deadline.expired(&reason),
                            })
                    }),
                }
            }
        }
    }
}

/// Tracks one call on one endpoint: its in-flight count, its outcome for outlier detection and
/// its round-trip time, until the end of the response body (or until it is dropped).
pub(crate) struct CallGuard {
    load: Arc<Load>,
    generation: u64,
    feedback: Arc<Feedback>,
    /// A layer above that wants the call's final code (the retry layer's token bucket).
    end: Option<CallEnd>,
    started: Instant,
    recorded: bool,
    /// Whether the call's time is a round trip to feed the endpoint's RTT estimate: only once
    /// the request went out, and not when the connection failed under it. A wait for the
    /// endpoint's readiness or a dead connection's timeout is no measure of the endpoint, and a
    /// peak estimator would keep that one outlier for many decay periods.
    measures_rtt: bool,
}

impl CallGuard {
    fn new(
        load: Arc<Load>,
        generation: u64,
        feedback: Arc<Feedback>,
        end: Option<CallEnd>,
    ) -> Self {
        CallGuard {
            load,
            generation,
            feedback,
            end,
            started: Instant::now(),
            recorded: false,
            measures_rtt: false,
        }
    }

    /// The request went out on the endpoint.
    fn sent(mut self) -> Self {
        self.measures_rtt = true;
        self
    }

    /// Records the call's final code, once.
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        if let Some(end) = self.end.take() {
            end.report(code);
        }
        let Some(detection) = &self.feedback.detection else {
            return;
        };
        let streak = self.load.record_outcome(!detection.is_failure(code));
        // At the threshold and beyond: once an ejection ends, the next failure (the probe) shuts
        // the endpoint again, as linkerd's failure accrual does.
        if detection
            .consecutive_failures
            .is_some_and(|threshold| streak >= threshold)
        {
            let _ = self
                .feedback
                .events
                .send(CallEvent::FailureStreak(self.load.id));
        }
    }

    /// The inner service failed the call (servers answer with a response, so this is about the
    /// connection, or the inner service's own verdict).
    fn failed(&mut self, err: &(dyn std::error::Error + 'static)) {
        let code = code_from_error(err);
        // UNAVAILABLE as an error (servers answer with responses, so it is never theirs) means
        // a connection broke. A raw transport error: the connection this endpoint holds, which
        // its connection task replaces. A `Status`: the inner service's own verdict, e.g. a
        // pool that already dropped the broken connection and keeps its others, so the endpoint
        // stays. Either way outlier detection, which judges answers, does not count it: it
        // would keep a backend that is back up ejected for a whole ejection time.
        if code == Code::Unavailable {
            self.recorded = true;
            self.measures_rtt = false;
            match err.downcast_ref::<Status>() {
                // The service keeps its own connections (a pool): it may have others, or none
                // left; the endpoint task looks at its readiness.
                Some(status) => self
                    .load
                    .signals
                    .check_readiness(|| status.message().to_owned()),
                None => {
                    if crate::status::is_too_many_pings(err) {
                        self.too_many_pings();
                    }
                    self.connection_broken();
                }
            }
        } else {
            self.finish(code);
        }
    }

    /// The call is over: its outcome is known, or it never will be.
    fn end(guard: &mut Option<CallGuard>, code: Code) {
        if let Some(mut guard) = guard.take() {
            guard.finish(code);
        }
    }

    /// The server ended this call for our keepalive pings and is closing the connection
    /// (grpc-core): later connections ping half as often (gRFC A8). A pool notes it itself;
    /// a bare connection the balancer owns is noted here, once per connection.
    fn too_many_pings(&self) {
        self.load
            .signals
            .note_ping_strike(&self.load.uri, self.generation);
    }

    /// Tells the endpoint's connection task that its connection failed, unless it has already
    /// been replaced since this call began.
    fn connection_broken(&self) {
        let signals = &self.load.signals;
        if signals.generation.load(Ordering::Acquire) == self.generation {
            // `notify_waiters` stores no permit: the many calls that fail together when a
            // connection dies must not leave one behind to tear down its replacement.
            signals.broken.notify_waiters();
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.measures_rtt {
            self.load.observe_rtt(self.started.elapsed());
        }
        // SeqCst pairs with the driver's store of `draining` then load of `in_flight`: one of
        // the two sides must see the other's write, or a drained endpoint would never leave.
        let before = self.load.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.load.signals.draining.load(Ordering::SeqCst) {
            let _ = self.feedback.events.send(CallEvent::Drained(self.load.id));
        }
    }
}

pin_project! {
    /// A response body that tells the balancer when the call really ends (its last frame) and how
    /// (its `grpc-status` trailer), for in-flight counts, RTT and outlier detection.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<CallGuard>,
    }
}

impl<B> fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("finished", &self.guard.is_none())
            .finish_non_exhaustive()
    }
}

/// An empty body that tracks no call. tonic's generated `with_interceptor` requires the
/// response body to be `Default`: an interceptor that rejects a request answers with a default
/// body, which has no call on any endpoint to account for.
impl<B: Default> Default for TrackedBody<B> {
    fn default() -> Self {
        TrackedBody {
            inner: B::default(),
            guard: None,
        }
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            // Trailers are always the last frame, and tonic stops polling after them: the call
            // ends here (in-flight count, RTT).
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = code_from_trailers(Some(trailers));
                    if code == Code::Unavailable
                        && crate::status::is_too_many_pings_status(trailers)
                        && let Some(guard) = this.guard.as_ref()
                    {
                        guard.too_many_pings();
                    }
                    CallGuard::end(this.guard, code);
                }
            }
            Some(Err(_)) => CallGuard::end(this.guard, Code::Unavailable),
            // A gRPC stream that ends without trailers ended abnormally.
            None => CallGuard::end(this.guard, code_from_trailers(None)),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
