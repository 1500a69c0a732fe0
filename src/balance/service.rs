//! [`Balance`]: the service that picks an endpoint for each call.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tonic::body::Body;
use tower_service::Service;

use super::body::TrackedBody;
use super::config::BalanceConfig;
use super::driver::{Driver, DriverGuard};
use super::endpoint::{EndpointService, EndpointSnapshot, MakeEndpoint};
use super::future::ResponseFuture;
use super::metrics::BalanceMetrics;
use super::strategy::RoundRobin;
use super::table::{Condition, Shared};
use crate::BoxError;
use crate::discover::Discover;

/// A `Service<http::Request<tonic::body::Body>>` that sends each call to one of many endpoints:
/// only to endpoints that are connected, healthy and not ejected, chosen by a [`Strategy`].
/// Cheap to clone; every clone shares the endpoints. Usable as the transport of any
/// tonic-generated client.
///
/// `poll_ready` is always ready: the endpoint is chosen in `call` (hash strategies need the
/// request, and a call's wait for an endpoint is bounded by its own deadline), and the chosen
/// endpoint's readiness is asked at once: ready, the call goes out from `call` itself, and its
/// response future holds only the endpoint's future; not ready, the response future waits for
/// it. An endpoint whose service is not ready at once (a pool with no live connection) hands the call
/// to another endpoint and leaves rotation until it is ready again, as tower's `ReadyCache`
/// keeps p2c to ready services; with no other endpoint to go to, the call waits for it, never
/// past its deadline. A call that waited (for an endpoint, or for one's readiness) is sent with
/// what is left of its `grpc-timeout`, not the whole of it again.
///
/// [`Strategy`]: super::Strategy
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
    endpoint_wait: Duration,
    /// Why this balancer could not start, if it could not.
    failure: Option<&'static str>,
    _driver: Arc<DriverGuard>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Balance {
            shared: self.shared.clone(),
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
            ..
        } = config;
        let measures_rtt = strategy.uses_rtt();
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
            measures_rtt,
        );
        let task = runtime.spawn(driver.run(discovery, calls));
        Balance {
            shared,
            endpoint_wait,
            failure: None,
            _driver: Arc::new(DriverGuard(Some(task.abort_handle()))),
        }
    }

    /// A balancer that could not start: said at once in the log and by [`failure`](Self::failure),
    /// and by every call.
    pub(crate) fn failed(reason: &'static str) -> Self {
        tracing::error!(
            reason,
            "towline balancer failed at construction; every call will fail"
        );
        Balance {
            shared: Arc::new(Shared::failed(
                Box::new(RoundRobin::new()),
                reason,
                BalanceMetrics::new("towline"),
            )),
            endpoint_wait: Duration::ZERO,
            failure: Some(reason),
            _driver: Arc::new(DriverGuard(None)),
        }
    }

    /// Why this balancer could not start, if it could not: it was built outside a Tokio
    /// runtime, or its [`BalanceLayer`](super::BalanceLayer) had already started a balancer
    /// over another kind of endpoint service. Such a balancer knows no endpoint and fails every call with
    /// `UNAVAILABLE` and this reason; check it where the stack is built to fail there instead.
    pub fn failure(&self) -> Option<&str> {
        self.failure
    }

    /// Whether `self` and `other` are handles to one balancer (clones, or layerings of one
    /// [`BalanceLayer`](super::BalanceLayer)): the same endpoints and connections.
    pub fn same_balancer(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
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

    /// Reads every endpoint's condition and their version (see `Shared::with_conditions`).
    pub(crate) fn with_conditions<T>(
        &self,
        look: impl FnOnce(u64, &mut dyn Iterator<Item = Condition<'_>>) -> T,
    ) -> T {
        self.shared.with_conditions(look)
    }

    /// Waits until the endpoints' conditions differ from version `seen`.
    pub(crate) async fn conditions_changed(&self, seen: u64) {
        self.shared.conditions_changed(seen).await;
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
        ResponseFuture::new(&self.shared, self.endpoint_wait, request)
    }
}
