//! A trivial gRPC service and calls driven through it on one thread: what a layer costs with no
//! network to hide it. Shared by `benches/layers.rs` (each layer) and the `scale` scenario (the
//! balancer at 10 to 1,000 endpoints).
//!
//! One call is what a tonic client does per unary call, minus the codec: an `http::Request<Body>`
//! with the head tonic sends (`POST`, the method's path, `te: trailers`,
//! `content-type: application/grpc`, the `tonic::GrpcMethod` extension) and a 21-byte body (one
//! gRPC frame); wait for `poll_ready`, `call`, await the response, check it says
//! `grpc-status: 0`, and read its body to the end. The trivial service reads the request body to
//! its end (as a connection would send it) and answers Trailers-Only: `grpc-status: 0` in the
//! headers, an empty body. Every future is ready at once.

use std::convert::Infallible;
use std::future::{Future, Ready, poll_fn, ready};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tonic::GrpcMethod;
use tonic::body::Body;
use tower::Service;
use towline::BoxError;

use crate::{alloc, cpu};

const SERVICE: &str = "towline.testkit.v1.Echo";
const METHOD: &str = "Unary";
const PATH: &str = "http://bench.test/towline.testkit.v1.Echo/Unary";
/// A gRPC frame: uncompressed, 16 bytes of message.
const FRAME: &[u8] = b"\0\0\0\0\x10payload-16-bytes";

/// The longest one batch may run, whatever its call count: a regression that makes calls slow
/// must not make a bench run for hours.
const BATCH_TIME_LIMIT: Duration = Duration::from_secs(3);

/// The request a tonic client sends for a unary call (codec aside).
pub fn request() -> Request<Body> {
    let mut request = Request::new(Body::new(Full::new(Bytes::from_static(FRAME))));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_static(PATH);
    let headers = request.headers_mut();
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    request
        .extensions_mut()
        .insert(GrpcMethod::new(SERVICE, METHOD));
    request
}

/// The trivial service: reads the request body to its end, answers Trailers-Only OK.
#[derive(Debug, Clone, Copy)]
pub struct Immediate;

impl Service<Request<Body>> for Immediate {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Answer {
        Answer {
            body: Some(request.into_body()),
        }
    }
}

/// [`Immediate`]'s response future: the request body read, then the answer.
pub struct Answer {
    body: Option<Body>,
}

impl Future for Answer {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        while let Some(body) = &mut self.body {
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(_)) => {}
                Poll::Ready(None) => self.body = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        let mut response = Response::new(Body::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Ok(response))
    }
}

/// The trivial connector (a `MakeEndpoint`): every endpoint is an [`Immediate`], at once.
#[derive(Debug, Clone, Copy)]
pub struct Connector;

impl Service<Uri> for Connector {
    type Response = Immediate;
    type Error = Infallible;
    type Future = Ready<Result<Immediate, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        ready(Ok(Immediate))
    }
}

/// A distinct address for endpoint `i` (never dialled: the connector is trivial).
pub fn endpoint_uri(i: usize) -> Uri {
    format!(
        "http://10.{}.{}.{}:50051",
        i / 62_500,
        i / 250 % 250,
        i % 250 + 1
    )
    .parse()
    .expect("a valid URI")
}

/// One measured batch of calls.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub calls: u64,
    /// The thread's CPU time: every call is ready at once, so it differs from wall-clock time
    /// only by the time other processes held the core, which on a shared machine would
    /// otherwise land on whichever variant was running.
    pub cpu: Duration,
    pub allocations: u64,
}

impl Sample {
    pub fn ns_per_call(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.calls.max(1) as f64
    }

    pub fn allocs_per_call(&self) -> f64 {
        self.allocations as f64 / self.calls.max(1) as f64
    }
}

/// `calls` calls in sequence (or as many as fit in [`BATCH_TIME_LIMIT`]), each with a request
/// from `request`, measured as a whole on this thread. Nothing in it yields (every future is
/// ready at once), so the task never moves between threads while it runs.
pub async fn batch<S, B>(
    service: &mut S,
    calls: u64,
    mut request: impl FnMut() -> Request<Body>,
) -> Result<Sample, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let allocations = alloc::allocations();
    let started = Instant::now();
    let cpu = cpu::thread();
    let mut done = 0;
    while done < calls {
        one_call(service, request()).await?;
        done += 1;
        if done % 1024 == 0 && started.elapsed() > BATCH_TIME_LIMIT {
            break;
        }
    }
    let cpu = cpu::thread() - cpu;
    Ok(Sample {
        calls: done,
        cpu,
        allocations: alloc::allocations() - allocations,
    })
}

/// One call, as a tonic client makes it (see the module docs).
async fn one_call<S, B>(service: &mut S, request: Request<Body>) -> Result<(), BoxError>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    let response = service.call(request).await.map_err(Into::into)?;
    let status = response.headers().get("grpc-status");
    if status.map(HeaderValue::as_bytes) != Some(b"0") {
        return Err(format!(
            "a call answered {status:?} ({:?}), not grpc-status 0",
            response.headers().get("grpc-message")
        )
        .into());
    }
    let mut body = pin!(response.into_body());
    while let Some(frame) = body.frame().await {
        frame.map_err(Into::into)?;
    }
    Ok(())
}

/// The median of `values` (NaN when there are none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
