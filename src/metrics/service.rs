//! [`Metrics`], the service [`MetricsLayer`](super::MetricsLayer) makes, and its future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower_service::Service;

use super::body::{MetricsBody, Recording, SentBody};
use super::layer::{Level, Shared};
use crate::BoxError;
use crate::status::{classify_response, code_from_error};

/// Records gRFC A66 metrics for every call through the service it wraps. Made by
/// [`MetricsLayer`](super::MetricsLayer); usable as the transport of any tonic-generated client.
pub struct Metrics<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Metrics<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Metrics { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Metrics<S> {
    fn clone(&self) -> Self {
        Metrics {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("inner", &self.inner)
            .field("level", &self.shared.level)
            .finish_non_exhaustive()
    }
}

impl<S, RB> Service<Request<Body>> for Metrics<S>
where
    S: Service<Request<Body>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<MetricsBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture<S::Future> {
        let method = self.shared.method(request.uri().path());
        let (request, sent) = match self.shared.level {
            Level::Call => (request, None),
            Level::Attempt => {
                method.started().increment(1);
                let sent = Arc::new(AtomicU64::new(0));
                let request = request.map(|body| Body::new(SentBody::new(body, sent.clone())));
                (request, Some(sent))
            }
        };
        let recording = Recording::start(method, sent);
        ResponseFuture {
            inner: self.inner.call(request),
            recording: Some(recording),
        }
    }
}

pin_project! {
    /// The response future of [`Metrics`]. An error ends the recording with the error's code;
    /// a response hands it to the [`MetricsBody`]. Dropped before it resolves: `CANCELLED`.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        recording: Option<Recording>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<MetricsBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut recording = this
            .recording
            .take()
            .expect("ResponseFuture polled after it completed");
        Poll::Ready(match result {
            Ok(response) => {
                recording.head_code = classify_response(&response).code();
                Ok(response.map(|body| MetricsBody::new(body, recording)))
            }
            Err(err) => {
                let err = err.into();
                recording.finish(code_from_error(&*err));
                Err(err)
            }
        })
    }
}
