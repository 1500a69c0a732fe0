//! [`PoolLayer`] and the `MakeService` it makes, [`MakePool`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::poll_fn;
use http::Uri;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use super::config::PoolConfig;
use super::service::Pool;
use super::shared::Shared;
use super::worker::run;
use crate::BoxError;

/// Layers a `MakeService` (`Service<Uri>`, such as [`Connect`](crate::connect::Connect)) into
/// one that answers each target with a [`Pool`] of connections to it.
#[derive(Debug, Clone)]
pub struct PoolLayer {
    config: Arc<PoolConfig>,
}

impl PoolLayer {
    /// A layer whose pools follow `config`.
    pub fn new(config: PoolConfig) -> Self {
        PoolLayer {
            config: Arc::new(config),
        }
    }

    /// The configuration every pool gets.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }
}

impl<M> Layer<M> for PoolLayer {
    type Service = MakePool<M>;

    fn layer(&self, make: M) -> MakePool<M> {
        MakePool {
            make,
            config: self.config.clone(),
        }
    }
}

/// A `Service<Uri>` whose response is a [`Pool`] of connections to that target, opened with the
/// wrapped `MakeService`. Each call starts a new, independent pool.
#[derive(Debug, Clone)]
pub struct MakePool<M> {
    make: M,
    config: Arc<PoolConfig>,
}

impl<M, S> Service<Uri> for MakePool<M>
where
    M: Service<Uri, Response = S> + Clone + Send + 'static,
    M::Error: Into<BoxError>,
    M::Future: Send + 'static,
    // Sync: handles read the connections' services through shared, lock-free views.
    S: Clone + Send + Sync + 'static,
{
    type Response = Pool<S>;
    type Error = BoxError;
    type Future = MakeFuture<S>;

    /// Always ready: each pool gets its own clone of the `MakeService`, and waits on its
    /// readiness before each connection attempt.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    /// Starts the pool's background task on the current tokio runtime. An eager pool resolves
    /// once its first connections are up, and fails with `UNAVAILABLE` if none could be opened;
    /// a lazy one resolves at once.
    fn call(&mut self, target: Uri) -> MakeFuture<S> {
        let make = self.make.clone();
        let config = self.config.clone();
        MakeFuture {
            inner: Box::pin(async move {
                let shared = Arc::new(Shared::new(target, config.clone()));
                let (alive, closed) = oneshot::channel();
                let pool = Pool::new(shared.clone(), Arc::new(alive));
                tokio::spawn(run(shared.clone(), make, closed));
                if !config.lazy {
                    let waiter = shared.waiter_id();
                    let guard = ForgetWaiter(&shared, waiter);
                    poll_fn(|cx| shared.poll_started(waiter, cx)).await?;
                    drop(guard);
                }
                Ok(pool)
            }),
        }
    }
}

/// Removes a waiter if the future that registered it is dropped while waiting.
struct ForgetWaiter<'a, S>(&'a Shared<S>, u64);

impl<S> Drop for ForgetWaiter<'_, S> {
    fn drop(&mut self) {
        self.0.forget_waiter(self.1);
    }
}

type BoxMake<S> = Pin<Box<dyn Future<Output = Result<Pool<S>, BoxError>> + Send>>;

/// The response future of [`MakePool`].
pub struct MakeFuture<S> {
    inner: BoxMake<S>,
}

impl<S> fmt::Debug for MakeFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeFuture").finish_non_exhaustive()
    }
}

impl<S> Future for MakeFuture<S> {
    type Output = Result<Pool<S>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
