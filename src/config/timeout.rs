//! [`MethodTimeoutLayer`]: each method's `timeout` from the service config, as `grpc-timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::deadline;

/// Sets each call's `grpc-timeout` from its method's configured timeout; a call whose own
/// deadline is shorter keeps it (the service config's `timeout` is an upper bound, as in gRPC).
///
/// It only writes a header: tonic's `Channel` and the server enforce it, and a
/// [`RetryLayer`](crate::retry::RetryLayer) inside this one spreads its attempts within it. It
/// touches no response, so its future is the inner service's own. Build it with
/// [`ServiceConfig::timeout_layer`](super::ServiceConfig::timeout_layer).
#[derive(Debug, Clone)]
pub struct MethodTimeoutLayer {
    routes: Arc<Routes>,
}

#[derive(Debug, Default)]
struct Routes {
    /// Keyed by `/pkg.Service/Method` and by `pkg.Service`; `None` is "no timeout" (a more
    /// specific config without one overrides a default that has one).
    routes: HashMap<Box<str>, Option<Duration>>,
    default: Option<Duration>,
}

impl Routes {
    fn timeout_for(&self, path: &str) -> Option<Duration> {
        if let Some(t) = self.routes.get(path) {
            return *t;
        }
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.rsplit_once('/'))
            .map(|(service, _)| service);
        match service.and_then(|s| self.routes.get(s)) {
            Some(t) => *t,
            None => self.default,
        }
    }
}

impl MethodTimeoutLayer {
    pub(crate) fn new(
        routes: HashMap<Box<str>, Option<Duration>>,
        default: Option<Duration>,
    ) -> Self {
        MethodTimeoutLayer {
            routes: Arc::new(Routes { routes, default }),
        }
    }

    /// The timeout a request path gets, if any.
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        self.routes.timeout_for(path)
    }
}

impl<S> Layer<S> for MethodTimeoutLayer {
    type Service = MethodTimeout<S>;

    fn layer(&self, inner: S) -> MethodTimeout<S> {
        MethodTimeout {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// The service [`MethodTimeoutLayer`] makes.
#[derive(Debug, Clone)]
pub struct MethodTimeout<S> {
    inner: S,
    routes: Arc<Routes>,
}

impl<S, B> Service<Request<B>> for MethodTimeout<S>
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
        if let Some(configured) = self.routes.timeout_for(req.uri().path()) {
            let own = deadline::from_headers(req.headers());
            if own.is_none_or(|own| configured < own) {
                req.headers_mut().insert(
                    deadline::GRPC_TIMEOUT,
                    deadline::to_header_value(configured),
                );
            }
        }
        self.inner.call(req)
    }
}
