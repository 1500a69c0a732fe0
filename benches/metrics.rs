//! ns per call of `MetricsLayer` over an immediately ready service, against the bare service.
//!
//! Each iteration makes a request, calls the service, resolves the response future and reads the
//! (Trailers-Only, `grpc-status: 0`) response body to its end, so the whole recording runs.
//! Two groups: against a no-op recorder (the layer's own cost) and against a Prometheus recorder
//! drained by a render every 100 ms, as a scraper would (what production pays).
//!
//! ```sh
//! cargo bench --bench metrics            # or: -- --quick
//! ```

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, Uri};
use http_body::Body as _;
use tonic::body::Body;
use tower::{Layer, Service};
use towline::metrics::MetricsLayer;

/// An inner service that answers at once with a Trailers-Only OK.
#[derive(Clone)]
struct Immediate;

impl Service<Request<Body>> for Immediate {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let mut res = Response::new(Body::empty());
        res.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        res.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        ready(Ok(res))
    }
}

/// One call, driven to the end of its body with a no-op waker (everything is ready at once).
fn one_call<S, B>(svc: &mut S, uri: &Uri)
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut req = Request::new(Body::empty());
    *req.uri_mut() = uri.clone();
    let fut = pin!(svc.call(req));
    let Poll::Ready(Ok(res)) = fut.poll(&mut cx) else {
        panic!("not ready")
    };
    let mut body = pin!(res.into_body());
    while let Poll::Ready(Some(_)) = body.as_mut().poll_frame(&mut cx) {}
    std::hint::black_box(body.is_end_stream());
}

fn bench(c: &mut Criterion) {
    let uri = Uri::from_static("http://bench.test/towline.testkit.v1.Echo/Unary");
    let other = Uri::from_static("http://bench.test/not-a-method");

    // The layer's own cost: handles resolved against a recorder that discards everything.
    let noop = metrics::NoopRecorder;
    metrics::with_local_recorder(&noop, || {
        variants(c, "metrics_layer_noop_recorder", &uri, &other)
    });

    // What production pays: a Prometheus recorder, whose histogram samples are buffered until a
    // render drains them; a thread renders every 100 ms, as a scraper would.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the bench's only recorder");
    let _scraper = std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::hint::black_box(handle.render());
        }
    });
    variants(c, "metrics_layer_prometheus", &uri, &other);
}

fn variants(c: &mut Criterion, group: &str, uri: &Uri, other: &Uri) {
    let mut group = c.benchmark_group(group);

    let mut bare = Immediate;
    group.bench_function("bare", |b| b.iter(|| one_call(&mut bare, uri)));

    let mut call = MetricsLayer::new("bench").layer(Immediate);
    group.bench_function("call_level", |b| b.iter(|| one_call(&mut call, uri)));

    let mut attempt = MetricsLayer::attempts("bench").layer(Immediate);
    group.bench_function("attempt_level", |b| b.iter(|| one_call(&mut attempt, uri)));

    let mut call = MetricsLayer::new("bench").layer(Immediate);
    group.bench_function("call_level_other_method", |b| {
        b.iter(|| one_call(&mut call, other))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
