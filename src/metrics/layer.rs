//! [`MetricsLayer`] and the per-method handle cache.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use ::metrics::{Counter, Histogram, Unit};
use tonic::Code;
use tower_layer::Layer;

use super::service::Metrics;
use super::{
    ATTEMPT_DURATION, ATTEMPT_RCVD_SIZE, ATTEMPT_SENT_SIZE, ATTEMPT_STARTED, CALL_DURATION, METHOD,
    OTHER_METHOD, STATUS, TARGET,
};
use crate::status::code_name;

/// How many distinct methods one layer labels before the rest are recorded as `"other"`.
pub const DEFAULT_MAX_METHODS: usize = 256;

/// What one [`MetricsLayer`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Level {
    /// One `grpc.client.call.duration` per call: place the layer above `RetryLayer`.
    Call,
    /// `grpc.client.attempt.*` per attempt: place the layer under `RetryLayer`.
    Attempt,
}

/// Records gRFC A66 client metrics for every call through it. See the [module docs](super).
///
/// Cheap to clone; every service it makes shares one handle cache.
#[derive(Clone)]
pub struct MetricsLayer {
    shared: Arc<Shared>,
}

impl MetricsLayer {
    /// Call level: `grpc.client.call.duration`, labelled `grpc.target = target`.
    pub fn new(target: impl Into<String>) -> Self {
        Self::with_level(target, Level::Call)
    }

    /// Attempt level: `grpc.client.attempt.started`, `.duration` and the message sizes,
    /// labelled `grpc.target = target`.
    pub fn attempts(target: impl Into<String>) -> Self {
        Self::with_level(target, Level::Attempt)
    }

    /// Either level.
    pub fn with_level(target: impl Into<String>, level: Level) -> Self {
        MetricsLayer {
            shared: Arc::new(Shared::new(target.into(), level, DEFAULT_MAX_METHODS)),
        }
    }

    /// Label at most `n` distinct methods; later ones are recorded as `"other"`. Bounds the
    /// number of series a misbehaving caller can create. Default [`DEFAULT_MAX_METHODS`].
    pub fn max_methods(self, n: usize) -> Self {
        MetricsLayer {
            shared: Arc::new(Shared::new(
                self.shared.target.clone(),
                self.shared.level,
                n,
            )),
        }
    }

    /// The level it records at.
    pub fn level(&self) -> Level {
        self.shared.level
    }

    /// The `grpc.target` label it records.
    pub fn target(&self) -> &str {
        &self.shared.target
    }
}

impl fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsLayer")
            .field("target", &self.shared.target)
            .field("level", &self.shared.level)
            .field("max_methods", &self.shared.max_methods)
            .finish()
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics::new(inner, self.shared.clone())
    }
}

/// How many methods a call finds without a lock or a hash (see [`Shared::method`]).
const FAST_METHODS: usize = 8;

/// The state every service of one layer shares: the handle cache.
pub(crate) struct Shared {
    target: String,
    pub(crate) level: Level,
    max_methods: usize,
    methods: RwLock<HashMap<Box<str>, Arc<MethodMetrics>>>,
    /// The first methods the layer labelled, in the order they came, each set once under the
    /// `methods` write lock. A client calls one or a few methods over and over, and tonic's
    /// clients are cloned for every call (so is this layer's service, fresh each time): the cache
    /// must be the layer's, not one service's, to be warm. Set once, never replaced: a later
    /// method is looked up in `methods`.
    first: [OnceLock<Arc<MethodMetrics>>; FAST_METHODS],
    other: Arc<MethodMetrics>,
}

impl Shared {
    fn new(target: String, level: Level, max_methods: usize) -> Self {
        match level {
            Level::Call => {
                ::metrics::describe_histogram!(
                    CALL_DURATION,
                    Unit::Seconds,
                    "End-to-end time of a gRPC call, to the end of its response"
                );
            }
            Level::Attempt => {
                ::metrics::describe_counter!(
                    ATTEMPT_STARTED,
                    Unit::Count,
                    "gRPC call attempts started"
                );
                ::metrics::describe_histogram!(
                    ATTEMPT_DURATION,
                    Unit::Seconds,
                    "Time of one gRPC call attempt, to the end of its response"
                );
                ::metrics::describe_histogram!(
                    ATTEMPT_SENT_SIZE,
                    Unit::Bytes,
                    "Compressed message bytes an attempt sent"
                );
                ::metrics::describe_histogram!(
                    ATTEMPT_RCVD_SIZE,
                    Unit::Bytes,
                    "Compressed message bytes an attempt received"
                );
            }
        }
        let other = Arc::new(MethodMetrics::new(OTHER_METHOD.into(), &target, level));
        Shared {
            target,
            level,
            max_methods,
            methods: RwLock::new(HashMap::new()),
            first: Default::default(),
            other,
        }
    }

    /// The handles for a request path: its own, or `"other"`'s. One of the first
    /// [`FAST_METHODS`] methods is found by a string compare, without a lock or a hash; a later
    /// one takes a read lock and a hash; only the first call of a new method takes the write
    /// lock, and once the cap is reached (or for a path that is no method) no call does.
    pub(crate) fn method(&self, path: &str) -> Arc<MethodMetrics> {
        // Slots fill in order, so the first empty one ends the scan.
        for slot in &self.first {
            match slot.get() {
                Some(method) if method.is_path(path) => return method.clone(),
                Some(_) => {}
                None => break,
            }
        }
        {
            let methods = self.methods.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(found) = methods.get(path) {
                return found.clone();
            }
            if methods.len() >= self.max_methods {
                return self.other.clone();
            }
        }
        let Some(name) = method_name(path) else {
            return self.other.clone();
        };
        let mut methods = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = methods.get(path) {
            return found.clone();
        }
        if methods.len() >= self.max_methods {
            return self.other.clone();
        }
        let entry = Arc::new(MethodMetrics::new(name.into(), &self.target, self.level));
        methods.insert(path.into(), entry.clone());
        if let Some(slot) = self.first.iter().find(|slot| slot.get().is_none()) {
            // Under the write lock: no other insert races for this slot.
            let _ = slot.set(entry.clone());
        }
        entry
    }
}

/// `package.Service/Method` from `/package.Service/Method`; `None` for anything else.
fn method_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix('/')?;
    let (service, method) = name.split_once('/')?;
    let valid = !service.is_empty() && !method.is_empty() && !method.contains('/');
    valid.then_some(name)
}

/// One method's handles, each resolved the first time it is needed (so a recorder only sees the
/// series that occur) and kept for the life of the layer.
pub(crate) struct MethodMetrics {
    method: String,
    target: String,
    level: Level,
    started: OnceLock<Counter>,
    by_status: [OnceLock<StatusHandles>; 17],
}

pub(crate) struct StatusHandles {
    pub(crate) duration: Histogram,
    pub(crate) sizes: Option<(Histogram, Histogram)>,
}

impl MethodMetrics {
    /// Whether `path` is `/` and this method's name.
    fn is_path(&self, path: &str) -> bool {
        path.strip_prefix('/') == Some(self.method.as_str())
    }

    fn new(method: String, target: &str, level: Level) -> Self {
        MethodMetrics {
            method,
            target: target.to_owned(),
            level,
            started: OnceLock::new(),
            by_status: Default::default(),
        }
    }

    pub(crate) fn started(&self) -> &Counter {
        self.started.get_or_init(|| {
            ::metrics::counter!(
                ATTEMPT_STARTED,
                METHOD => self.method.clone(),
                TARGET => self.target.clone()
            )
        })
    }

    pub(crate) fn for_status(&self, code: Code) -> &StatusHandles {
        let slot = &self.by_status[(code as usize).min(16)];
        slot.get_or_init(|| {
            let labels = vec![
                ::metrics::Label::new(METHOD, self.method.clone()),
                ::metrics::Label::new(TARGET, self.target.clone()),
                ::metrics::Label::from_static_parts(STATUS, code_name(code)),
            ];
            match self.level {
                Level::Call => StatusHandles {
                    duration: ::metrics::histogram!(CALL_DURATION, labels.clone()),
                    sizes: None,
                },
                Level::Attempt => StatusHandles {
                    duration: ::metrics::histogram!(ATTEMPT_DURATION, labels.clone()),
                    sizes: Some((
                        ::metrics::histogram!(ATTEMPT_SENT_SIZE, labels.clone()),
                        ::metrics::histogram!(ATTEMPT_RCVD_SIZE, labels.clone()),
                    )),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_slash_method_paths_name_a_method() {
        assert_eq!(method_name("/pkg.Svc/Call"), Some("pkg.Svc/Call"));
        for bad in [
            "", "/", "//", "/svc", "/svc/", "//m", "svc/m", "/a/b/c", "/a/b/", "*",
        ] {
            assert_eq!(method_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn methods_past_the_cap_share_other() {
        let shared = Shared::new("t".into(), Level::Call, 2);
        let a = shared.method("/s/a");
        let b = shared.method("/s/b");
        let c = shared.method("/s/c");
        assert_eq!(a.method, "s/a");
        assert_eq!(b.method, "s/b");
        assert_eq!(c.method, OTHER_METHOD);
        assert!(Arc::ptr_eq(&a, &shared.method("/s/a")), "cached");
        assert!(Arc::ptr_eq(&shared.method("nonsense"), &shared.other));
        assert_eq!(shared.methods.read().unwrap().len(), 2);
    }

    #[test]
    fn the_first_methods_are_found_without_the_map_and_later_ones_through_it() {
        let shared = Shared::new("t".into(), Level::Call, 64);
        let paths: Vec<String> = (0..FAST_METHODS + 3).map(|i| format!("/s/m{i}")).collect();
        let made: Vec<_> = paths.iter().map(|p| shared.method(p)).collect();
        assert!(Arc::ptr_eq(&shared.method("/other"), &shared.other));
        let fast: Vec<_> = shared.first.iter().map_while(OnceLock::get).collect();
        assert_eq!(fast.len(), FAST_METHODS, "filled in order, up to its size");
        for (slot, first) in fast.iter().zip(&made) {
            assert!(Arc::ptr_eq(slot, first));
        }
        // Every method, fast or not, keeps its own handles on later calls.
        for round in 0..3 {
            for (path, made) in paths.iter().zip(&made) {
                assert!(Arc::ptr_eq(&shared.method(path), made), "{round} {path}");
            }
        }
        assert_eq!(shared.methods.read().unwrap().len(), FAST_METHODS + 3);
    }
}
