//! [`PerMethodLayer`]: what the service config says per method that a call itself carries:
//! its `timeout` (as `grpc-timeout`) and `waitForReady` (as a
//! [`WaitForReady`](crate::balance::WaitForReady) extension the balancer reads).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
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
    routes: HashMap<Box<str>, CallSettings>,
    default: CallSettings,
}

impl Routes {
    fn settings_for(&self, path: &str) -> CallSettings {
        if let Some(settings) = self.routes.get(path) {
            return *settings;
        }
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.rsplit_once('/'))
            .map(|(service, _)| service);
        service
            .and_then(|s| self.routes.get(s))
            .copied()
            .unwrap_or(self.default)
    }
}

impl PerMethodLayer {
    pub(crate) fn new(routes: HashMap<Box<str>, CallSettings>, default: CallSettings) -> Self {
        PerMethodLayer {
            routes: Arc::new(Routes { routes, default }),
        }
    }

    /// The timeout a request path gets, if any.
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        self.routes.settings_for(path).timeout
    }

    /// The `waitForReady` a request path gets, if its config sets one.
    pub fn wait_for_ready_for(&self, path: &str) -> Option<bool> {
        self.routes.settings_for(path).wait_for_ready
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
        let settings = self.routes.settings_for(req.uri().path());
        if let Some(configured) = settings.timeout {
            let own = deadline::from_headers(req.headers());
            if own.is_none_or(|own| configured < own) {
                req.headers_mut().insert(
                    deadline::GRPC_TIMEOUT,
                    deadline::to_header_value(configured),
                );
            }
        }
        if let Some(wait) = settings.wait_for_ready
            && req.extensions().get::<WaitForReady>().is_none()
        {
            req.extensions_mut().insert(WaitForReady(wait));
        }
        self.inner.call(req)
    }
}
