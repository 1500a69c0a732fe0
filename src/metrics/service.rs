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

    fn call(&mut self, mut request: Request<Body>) -> ResponseFuture<S::Future> {
        let method = self.shared.method(request.uri().path());
        // The body is swapped in place: a request is a few hundred bytes to move.
        let sent = match self.shared.level {
            Level::Call => None,
            Level::Attempt => {
                method.started().increment(1);
                let sent = Arc::new(AtomicU64::new(0));
                let body = std::mem::replace(request.body_mut(), Body::empty());
                *request.body_mut() = Body::new(SentBody::new(body, sent.clone()));
                Some(sent)
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
                Ok(response.map(|body| MetricsBody::new(body, Some(recording))))
            }
            Err(err) => {
                let err = err.into();
                recording.finish(code_from_error(&*err));
                Err(err)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::HeaderMap;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use tonic::Status;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::metrics::MetricsLayer;

    type Frames = Vec<Result<Frame<Bytes>, Status>>;

    /// A response with these headers whose body yields these frames.
    fn response(
        http: u16,
        headers: &[(&'static str, &'static str)],
        frames: Frames,
    ) -> Response<Body> {
        let mut res = Response::builder().status(http);
        for (k, v) in headers {
            res = res.header(*k, *v);
        }
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        res.body(Body::new(body)).unwrap()
    }

    fn trailers(code: &'static str) -> Result<Frame<Bytes>, Status> {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        Ok(Frame::trailers(map))
    }

    /// `(status label, count)` of every call.duration series.
    fn durations(snapshotter: &Snapshotter) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == super::super::CALL_DURATION)
            .map(|(key, _, _, value)| {
                let status = key
                    .key()
                    .labels()
                    .find(|l| l.key() == "grpc.status")
                    .map(|l| l.value().to_owned())
                    .unwrap();
                let DebugValue::Histogram(samples) = value else {
                    panic!("a histogram")
                };
                (status, samples.len())
            })
            .collect();
        out.sort();
        out
    }

    async fn call(response: Response<Body>, read_body: bool) {
        let cell = std::sync::Mutex::new(Some(response));
        let inner = service_fn(move |_: Request<Body>| {
            let res = cell.lock().unwrap().take().unwrap();
            async move { Ok::<_, BoxError>(res) }
        });
        let svc = MetricsLayer::new("t").layer(inner);
        let req = Request::builder()
            .uri("/s.S/m")
            .body(Body::empty())
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        if read_body {
            let _ = res.into_body().collect().await;
        }
    }

    use tower_layer::Layer as _;

    #[tokio::test]
    async fn status_comes_from_head_trailers_or_body_error() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        let grpc = ("content-type", "application/grpc");

        // Trailers-Only, body never read (as tonic does for an error status): its code.
        call(response(200, &[grpc, ("grpc-status", "5")], vec![]), false).await;
        // Status in the trailers.
        let data = Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x")));
        call(response(200, &[grpc], vec![data, trailers("0")]), true).await;
        // A stream that ends without trailers ended abnormally.
        call(response(200, &[grpc], vec![]), true).await;
        // The body fails mid-stream.
        call(
            response(200, &[grpc], vec![Err(Status::data_loss("cut"))]),
            true,
        )
        .await;
        // A proxy's 503.
        call(response(503, &[], vec![]), true).await;
        // Headers only, then dropped before the trailers: CANCELLED.
        call(response(200, &[grpc], vec![trailers("0")]), false).await;

        assert_eq!(
            durations(&snapshotter),
            [
                ("CANCELLED".to_owned(), 1),
                ("DATA_LOSS".to_owned(), 1),
                ("NOT_FOUND".to_owned(), 1),
                ("OK".to_owned(), 1),
                ("UNAVAILABLE".to_owned(), 1),
                ("UNKNOWN".to_owned(), 1),
            ]
        );
    }
}
