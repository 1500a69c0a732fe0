//! [`Channel`]: the default stack as one cloneable `Service`, with its types named.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::util::Either;
use tower_service::Service;

use super::pools::{PoolEndpoint, PoolRegistry};
use crate::BoxError;
use crate::balance::{Balance, EndpointSnapshot, TrackedBody};
use crate::config::PerMethod;
use crate::metrics::{Metrics, MetricsBody};
use crate::pool::{PoolBody, PoolStats};
use crate::retry::{Hedge, Retry};

/// The balancer over every endpoint's pool.
pub type Balanced = Balance<PoolEndpoint>;
/// Hedging when the service config has a `hedgingPolicy`, else the balancer itself.
pub(crate) type Hedged = Either<Hedge<Balanced>, Balanced>;
/// gRFC A6 retries.
pub(crate) type Retried = Retry<Hedged>;
/// Per-method `timeout` and `waitForReady` when the service config sets any.
pub(crate) type PerMethodStack = Either<PerMethod<Retried>, Retried>;

/// The response body the balancer's calls come back with.
type InnerBody = TrackedBody<PoolBody<Body>>;

/// The stack a [`ChannelBuilder`](super::ChannelBuilder) builds, as a cloneable
/// `Service<http::Request<tonic::body::Body>>` that any tonic-generated client takes
/// (`GreeterClient::new(channel)`, `GreeterClient::with_interceptor(channel, f)`).
///
/// Every clone shares one balancer, its endpoints' pools and the retry budget; cloning is a
/// few reference counts. The layer types are named (no `Buffer`, no boxed service): a call
/// goes through metrics, per-method settings, retry, (hedging,) balance and pool with no
/// boxing of its own beyond what those layers do.
#[derive(Clone)]
pub struct Channel {
    stack: Stack,
    balance: Balanced,
    pools: PoolRegistry,
    target: Arc<str>,
}

#[derive(Clone)]
enum Stack {
    Metered(Metrics<PerMethodStack>),
    Bare(PerMethodStack),
}

impl Channel {
    pub(crate) fn new(
        stack: PerMethodStack,
        metrics: Option<crate::metrics::MetricsLayer>,
        balance: Balanced,
        pools: PoolRegistry,
        target: Arc<str>,
    ) -> Self {
        let stack = match metrics {
            Some(layer) => Stack::Metered(tower_layer::Layer::layer(&layer, stack)),
            None => Stack::Bare(stack),
        };
        Channel {
            stack,
            balance,
            pools,
            target,
        }
    }

    /// The target it was built for, as given.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The balancer: [`snapshot`](Balance::snapshot) of every endpoint (state, calls in flight,
    /// latency, why it is not ready), [`wait_until`](Balance::wait_until) a condition holds,
    /// [`in_panic`](Balance::in_panic). It is a readiness [`Source`](crate::readiness::Source):
    /// `Readiness::new().source("greeter", channel.balance().clone())`.
    pub fn balance(&self) -> &Balanced {
        &self.balance
    }

    /// Every endpoint, as [`Balance::snapshot`] gives it.
    pub fn snapshot(&self) -> Vec<EndpointSnapshot> {
        self.balance.snapshot()
    }

    /// Waits until at least one endpoint takes calls, or `timeout` passes; returns whether one
    /// does. A start-up gate: calls made before it wait for an endpoint anyway (up to the
    /// balancer's `endpoint_wait`).
    pub async fn ready_within(&self, timeout: std::time::Duration) -> bool {
        let ready = self
            .balance
            .wait_until(|endpoints| endpoints.iter().any(|e| e.receiving));
        tokio::time::timeout(timeout, ready).await.is_ok()
    }

    /// The pool stats of every endpoint that has a pool now, by discovery key.
    pub fn pool_stats(&self) -> Vec<(http::Uri, PoolStats)> {
        self.pools.stats()
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("target", &self.target)
            .field("metrics", &matches!(self.stack, Stack::Metered(_)))
            .field("balance", &self.balance)
            .finish_non_exhaustive()
    }
}

impl Service<Request<Body>> for Channel {
    type Response = Response<ChannelBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.stack {
            Stack::Metered(service) => service.poll_ready(cx),
            Stack::Bare(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let kind = match &mut self.stack {
            Stack::Metered(service) => Kind::Metered {
                future: service.call(request),
            },
            Stack::Bare(service) => Kind::Bare {
                future: service.call(request),
            },
        };
        ResponseFuture { kind }
    }
}

type MeteredFuture = <Metrics<PerMethodStack> as Service<Request<Body>>>::Future;
type BareFuture = <PerMethodStack as Service<Request<Body>>>::Future;

pin_project! {
    /// The response future of [`Channel`].
    pub struct ResponseFuture {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Metered { #[pin] future: MeteredFuture },
        Bare { #[pin] future: BareFuture },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ChannelBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project().kind.project() {
            KindProj::Metered { future } => {
                std::task::ready!(future.poll(cx))?.map(|body| ChannelBody {
                    kind: BodyKind::Metered { body },
                })
            }
            KindProj::Bare { future } => {
                std::task::ready!(future.poll(cx))?.map(|body| ChannelBody {
                    kind: BodyKind::Bare { body },
                })
            }
        };
        Poll::Ready(Ok(response))
    }
}

pin_project! {
    /// The response body of [`Channel`]: the balancer's, measured by the metrics layer when
    /// metrics are on. `Default` (an empty body), as `with_interceptor` clients need.
    pub struct ChannelBody {
        #[pin]
        kind: BodyKind,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind {
        Metered { #[pin] body: MetricsBody<InnerBody> },
        Bare { #[pin] body: InnerBody },
    }
}

impl Default for ChannelBody {
    fn default() -> Self {
        ChannelBody {
            kind: BodyKind::Bare {
                body: InnerBody::default(),
            },
        }
    }
}

impl fmt::Debug for ChannelBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBody").finish_non_exhaustive()
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            BodyKindProj::Metered { body } => body.poll_frame(cx).map_err(Into::into),
            BodyKindProj::Bare { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Metered { body } => body.is_end_stream(),
            BodyKind::Bare { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.kind {
            BodyKind::Metered { body } => body.size_hint(),
            BodyKind::Bare { body } => body.size_hint(),
        }
    }
}
