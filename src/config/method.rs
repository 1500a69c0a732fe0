//! [`PerMethodLayer`]: what the service config says per method that a call itself carries:
//! its `timeout` (as `grpc-timeout`) and `waitForReady` (as a
//! [`WaitForReady`](crate::balance::WaitForReady) extension the balancer reads).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::balance::WaitForReady;
use crate::deadline;

/// Applies each method's `timeout` and `waitForReady` to its calls.
///
/// - `timeout` becomes the call's `grpc-timeout`; a call whose own deadline is shorter keeps it
///   (the service config's `timeout` is an upper bound, as in gRPC). tonic's `Channel` and the
///   server enforce it, and a [`RetryLayer`](crate::retry::RetryLayer) inside this one spreads
///   its attempts within it.
/// - `waitForReady` becomes a [`WaitForReady`] request extension, which a
///   [`BalanceLayer`](crate::balance::BalanceLayer) below honours: `false` fails at once when
///   every endpoint is in transient failure, `true` waits for a ready endpoint until the deadline.
///   A call that already carries the extension keeps its own.
///
/// It touches no response, so its future is the inner service's own. Build it with
/// [`ServiceConfig::per_method_layer`](super::ServiceConfig::per_method_layer).
#[derive(Debug, Clone)]
pub struct PerMethodLayer {
    routes: Arc<Routes>,
}

/// What one method config says that a call carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CallSettings {
    pub(crate) timeout: Option<Duration>,
    pub(crate) wait_for_ready: Option<bool>,
}

#[derive(Debug, Default)]
struct Routes {
    /// Keyed by `/pkg.Service/Method` and by `pkg.Service`: the most specific config applies as
    /// a whole (one without a timeout overrides a default that has one, as in gRPC).
    routes: HashMap<Box<str>, Route>,
    default: Route,
}

/// A method config as calls get it: its timeout already in wire form.
#[derive(Debug, Default)]
struct Route {
    /// The timeout, and its `grpc-timeout` value. `grpc-timeout` is relative to when the call
    /// is sent, so one value serves every call: encoding it per call (a `format!`, an
    /// allocation) bought nothing.
    timeout: Option<(Duration, HeaderValue)>,
    wait_for_ready: Option<bool>,
}

impl From<CallSettings> for Route {
    fn from(settings: CallSettings) -> Self {
        Route {
            timeout: settings
                .timeout
                .map(|timeout| (timeout, deadline::to_header_value(timeout))),
            wait_for_ready: settings.wait_for_ready,
        }
    }
}

impl Routes {
    fn route_for(&self, path: &str) -> &Route {
        if let Some(route) = self.routes.get(path) {
            return route;
        }
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.rsplit_once('/'))
            .map(|(service, _)| service);
        service
            .and_then(|s| self.routes.get(s))
            .unwrap_or(&self.default)
    }
}

impl PerMethodLayer {
    pub(crate) fn new(routes: HashMap<Box<str>, CallSettings>, default: CallSettings) -> Self {
        let routes = routes
            .into_iter()
            .map(|(path, settings)| (path, settings.into()))
            .collect();
        PerMethodLayer {
            routes: Arc::new(Routes {
                routes,
                default: default.into(),
            }),
        }
    }

    /// The timeout a request path gets, if any.
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        self.routes
            .route_for(path)
            .timeout
            .as_ref()
            .map(|(t, _)| *t)
    }

    /// The `waitForReady` a request path gets, if its config sets one.
    pub fn wait_for_ready_for(&self, path: &str) -> Option<bool> {
        self.routes.route_for(path).wait_for_ready
    }
}

impl<S> Layer<S> for PerMethodLayer {
    type Service = PerMethod<S>;

    fn layer(&self, inner: S) -> PerMethod<S> {
        PerMethod {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// The service [`PerMethodLayer`] makes.
#[derive(Debug, Clone)]
pub struct PerMethod<S> {
    inner: S,
    routes: Arc<Routes>,
}

impl<S, B> Service<Request<B>> for PerMethod<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let route = self.routes.route_for(req.uri().path());
        if let Some((configured, value)) = &route.timeout {
            let own = deadline::from_headers(req.headers());
            if own.is_none_or(|own| *configured < own) {
                req.headers_mut()
                    .insert(deadline::GRPC_TIMEOUT, value.clone());
            }
        }
        if let Some(wait) = route.wait_for_ready
            && req.extensions().get::<WaitForReady>().is_none()
        {
            req.extensions_mut().insert(WaitForReady(wait));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{Ready, ready};

    /// Answers with the request it got, so that a test sees what the layer sent.
    #[derive(Clone)]
    struct Echo;

    impl Service<Request<()>> for Echo {
        type Response = Request<()>;
        type Error = std::convert::Infallible;
        type Future = Ready<Result<Request<()>, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            ready(Ok(req))
        }
    }

    fn layer(timeout: Duration) -> PerMethod<Echo> {
        let settings = CallSettings {
            timeout: Some(timeout),
            wait_for_ready: None,
        };
        PerMethodLayer::new(HashMap::new(), settings).layer(Echo)
    }

    async fn send(svc: &mut PerMethod<Echo>, own: Option<Duration>) -> Request<()> {
        let mut req = Request::builder().uri("/pkg.Echo/Unary").body(()).unwrap();
        if let Some(own) = own {
            req.headers_mut()
                .insert(deadline::GRPC_TIMEOUT, deadline::to_header_value(own));
        }
        let Ok(sent) = svc.call(req).await;
        sent
    }

    /// The value is encoded once, when the layer is built, and shared by every call; yet each
    /// call still gets the configured timeout in full, counted from when it is sent, and a
    /// shorter deadline of its own wins.
    #[tokio::test(start_paused = true)]
    async fn the_timeout_header_is_precomputed_and_still_right_for_every_call() {
        let configured = Duration::from_millis(1500);
        let mut svc = layer(configured);
        let first = send(&mut svc, None).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let later = send(&mut svc, None).await;
        let (a, b) = (
            &first.headers()[deadline::GRPC_TIMEOUT],
            &later.headers()[deadline::GRPC_TIMEOUT],
        );
        assert_eq!(deadline::parse(a.as_bytes()), Some(configured));
        assert_eq!(
            deadline::parse(b.as_bytes()),
            Some(configured),
            "relative: never stale"
        );
        assert_eq!(
            a.as_bytes().as_ptr(),
            b.as_bytes().as_ptr(),
            "one shared value"
        );

        let shorter = send(&mut svc, Some(Duration::from_millis(200))).await;
        assert_eq!(
            deadline::from_headers(shorter.headers()),
            Some(Duration::from_millis(200))
        );
        let longer = send(&mut svc, Some(Duration::from_secs(30))).await;
        assert_eq!(deadline::from_headers(longer.headers()), Some(configured));
    }
}
