//! [`RetryLayer`]: wraps a service in [`Retry`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::metrics::RetryMetrics;
use super::policy::RetryPolicy;
use super::service::Retry;

/// Applies gRFC A6 retries to every call of the service it wraps. Cheap to clone.
///
/// One policy applies by default; [`method_policy`](Self::method_policy) and
/// [`service_policy`](Self::service_policy) choose another one by the request's path
/// (`/pkg.Service/Method`), most specific first. A request that carries the
/// [`NoRetry`](super::NoRetry) extension gets no retries of the policy, only transparent ones.
///
/// Metric handles are registered when the layer is created, with the `metrics` recorder installed
/// at that moment: install the recorder first.
#[derive(Clone)]
pub struct RetryLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) default: RetryPolicy,
    /// Keyed by `/pkg.Service/Method` for methods and `pkg.Service` for services.
    pub(crate) routes: HashMap<Box<str>, RetryPolicy>,
    pub(crate) metrics: RetryMetrics,
}

impl RetryLayer {
    /// Retries every call with `policy`.
    pub fn new(policy: RetryPolicy) -> Self {
        RetryLayer {
            shared: Arc::new(Shared {
                default: policy,
                routes: HashMap::new(),
                metrics: RetryMetrics::new(),
            }),
        }
    }

    /// Uses `policy` for one method, named by its full path: `/pkg.Service/Method`.
    pub fn method_policy(self, path: &str, policy: RetryPolicy) -> Self {
        self.route(path, policy)
    }

    /// Uses `policy` for every method of a service, named `pkg.Service`, unless a
    /// [`method_policy`](Self::method_policy) is more specific.
    pub fn service_policy(self, service: &str, policy: RetryPolicy) -> Self {
        self.route(service.trim_matches('/'), policy)
    }

    fn route(mut self, key: &str, policy: RetryPolicy) -> Self {
        // Built once at start-up; `make_mut` copies only if the layer was already cloned.
        Arc::make_mut(&mut self.shared)
            .routes
            .insert(key.into(), policy);
        self
    }
}

impl Shared {
    /// The policy for a request's URI.
    pub(crate) fn policy_for_uri(&self, uri: &http::Uri) -> &RetryPolicy {
        self.policy_for(uri.path())
    }

    /// The policy for a request path, without allocating.
    pub(crate) fn policy_for(&self, path: &str) -> &RetryPolicy {
        if self.routes.is_empty() {
            return &self.default;
        }
        if let Some(policy) = self.routes.get(path) {
            return policy;
        }
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.rsplit_once('/'))
            .map(|(service, _)| service);
        service
            .and_then(|service| self.routes.get(service))
            .unwrap_or(&self.default)
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry::from_shared(inner, self.shared.clone())
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("default", &self.shared.default)
            .field("routes", &self.shared.routes)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_route_wins() {
        let policy = |n| RetryPolicy::builder().max_attempts(n).build().unwrap();
        let layer = RetryLayer::new(policy(2))
            .service_policy("pkg.Echo", policy(3))
            .method_policy("/pkg.Echo/Unary", policy(4));
        let s = &layer.shared;
        assert_eq!(s.policy_for("/pkg.Echo/Unary").max_attempts(), 4);
        assert_eq!(s.policy_for("/pkg.Echo/Other").max_attempts(), 3);
        assert_eq!(s.policy_for("/pkg.Other/Unary").max_attempts(), 2);
        assert_eq!(s.policy_for("garbage").max_attempts(), 2);
        assert_eq!(s.policy_for("").max_attempts(), 2);
    }

    #[test]
    fn routes_added_to_a_clone_leave_the_original_alone() {
        let policy = |n| RetryPolicy::builder().max_attempts(n).build().unwrap();
        let a = RetryLayer::new(policy(2));
        let b = a.clone().method_policy("/pkg.Echo/Unary", policy(4));
        assert_eq!(a.shared.policy_for("/pkg.Echo/Unary").max_attempts(), 2);
        assert_eq!(b.shared.policy_for("/pkg.Echo/Unary").max_attempts(), 4);
    }
}
