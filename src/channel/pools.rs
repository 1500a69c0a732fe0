//! The pools a [`Channel`](super::Channel)'s balancer makes, known weakly so that
//! [`Channel::pool_stats`](super::Channel::pool_stats) can read them without keeping a removed
//! endpoint's pool (and its connections) alive.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use http::{Request, Response, Uri};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower_service::Service;

use crate::BoxError;
use crate::connect::Connect;
use crate::pool::{MakeFuture, MakePool, Pool, PoolBody, PoolStats};

type TonicChannel = tonic::transport::Channel;

/// One endpoint's service in a [`Channel`](super::Channel): its [`Pool`], plus the anchor
/// that tells the channel's pool registry the pool is still in use. Calls go straight to the
/// pool.
pub struct PoolEndpoint {
    pool: Pool<TonicChannel>,
    /// A clone of `pool` that the registry knows weakly: dropped with the balancer's last
    /// handle on this endpoint, which is when the registry forgets it.
    anchor: Arc<Pool<TonicChannel>>,
}

impl Clone for PoolEndpoint {
    fn clone(&self) -> Self {
        PoolEndpoint {
            pool: (*self.anchor).clone(),
            anchor: self.anchor.clone(),
        }
    }
}

impl fmt::Debug for PoolEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pool.fmt(f)
    }
}

impl Service<Request<Body>> for PoolEndpoint {
    type Response = Response<PoolBody<Body>>;
    type Error = <Pool<TonicChannel> as Service<Request<Body>>>::Error;
    type Future = <Pool<TonicChannel> as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.pool.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.pool.call(request)
    }
}

/// The pools in use, weakly.
#[derive(Clone, Default)]
pub(crate) struct PoolRegistry(Arc<Mutex<Vec<Weak<Pool<TonicChannel>>>>>);

impl PoolRegistry {
    fn insert(&self, pool: &Arc<Pool<TonicChannel>>) {
        let mut pools = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    pub(crate) fn stats(&self) -> Vec<(Uri, PoolStats)> {
        let mut pools = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|p| p.strong_count() > 0);
        pools
            .iter()
            .filter_map(Weak::upgrade)
            .map(|pool| (pool.target().clone(), pool.stats()))
            .collect()
    }
}

/// The balancer's `MakeService`: a [`MakePool`] over [`Connect`] whose pools are recorded.
#[derive(Clone)]
pub(crate) struct MakePoolEndpoint {
    pub(crate) make: MakePool<Connect>,
    pub(crate) registry: PoolRegistry,
}

impl Service<Uri> for MakePoolEndpoint {
    type Response = PoolEndpoint;
    type Error = BoxError;
    type Future = MakeEndpointFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.make.poll_ready(cx)
    }

    fn call(&mut self, target: Uri) -> MakeEndpointFuture {
        MakeEndpointFuture {
            inner: self.make.call(target),
            registry: self.registry.clone(),
        }
    }
}

pin_project! {
    /// Resolves to a recorded [`PoolEndpoint`].
    pub(crate) struct MakeEndpointFuture {
        #[pin]
        inner: MakeFuture<TonicChannel>,
        registry: PoolRegistry,
    }
}

impl Future for MakeEndpointFuture {
    type Output = Result<PoolEndpoint, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let pool = std::task::ready!(this.inner.poll(cx))?;
        let anchor = Arc::new(pool.clone());
        this.registry.insert(&anchor);
        Poll::Ready(Ok(PoolEndpoint { pool, anchor }))
    }
}
