//! Heap allocations a call through `Balance` adds on its success path: none, with a deadline
//! and a response that is not ready at once (as every real call's is). Its own test binary: it
//! installs a counting global allocator, counting per thread, on a current-thread runtime.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use tonic::body::Body;
use tower::Service;
use towline::BoxError;
use towline::balance::{
    Balance, BalanceConfig, ConsistentHash, EndpointState, RoundRobin, Strategy,
};
use towline::discover::Static;

#[path = "support/alloc.rs"]
mod alloc;
use alloc::allocations;

/// An endpoint whose response is pending once, then Trailers-Only `OK`: the shape of a real
/// call, whose response is never there at the first poll.
#[derive(Clone, Copy)]
struct Later;

struct LaterAnswer {
    polled: bool,
}

impl Future for LaterAnswer {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !std::mem::replace(&mut self.polled, true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut response = Response::new(Body::empty());
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Ok(response))
    }
}

impl Service<Request<Body>> for Later {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = LaterAnswer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> LaterAnswer {
        LaterAnswer { polled: false }
    }
}

fn request() -> Request<Body> {
    let mut request = Request::new(Body::empty());
    request
        .headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("5S"));
    // The key a ring hash reads (the other strategies ignore it).
    request
        .headers_mut()
        .insert("x-user", HeaderValue::from_static("user-7"));
    request
}

/// Allocations made by `calls` calls through `service`, each to the end of its response body.
async fn allocations_of<S, B>(service: &mut S, calls: u64) -> u64
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError>,
    B: http_body::Body<Error: std::fmt::Debug>,
{
    let before = allocations();
    for _ in 0..calls {
        poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
        let response = service.call(request()).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "0");
        response.into_body().collect().await.unwrap();
    }
    allocations() - before
}

#[tokio::test]
async fn a_call_with_a_deadline_allocates_nothing_in_the_balancer() {
    assert_balancer_allocates_nothing(RoundRobin::new(), &["http://a:1"]).await;
}

#[tokio::test]
async fn a_ring_hash_pick_allocates_nothing() {
    let strategy = ConsistentHash::header("x-user");
    assert_balancer_allocates_nothing(strategy, &["http://a:1", "http://b:1", "http://c:1"]).await;
}

/// Calls through a balancer over `endpoints` with `strategy` allocate no more than bare calls.
async fn assert_balancer_allocates_nothing(strategy: impl Strategy, endpoints: &[&'static str]) {
    let make = tower::service_fn(|_: Uri| async { Ok::<_, BoxError>(Later) });
    let mut balance = Balance::new(
        Static::new(endpoints.iter().map(|&e| Uri::from_static(e))),
        make,
        BalanceConfig::builder().strategy(strategy).build().unwrap(),
    );
    let n = endpoints.len();
    balance
        .wait_until(|s| s.len() == n && s.iter().all(|e| e.state == EndpointState::Ready))
        .await;
    const CALLS: u64 = 1000;
    // Warm both paths first (lazily built state, the timer wheel's first use).
    allocations_of(&mut Later, 10).await;
    allocations_of(&mut balance, 10).await;
    let bare = allocations_of(&mut Later, CALLS).await;
    let balanced = allocations_of(&mut balance, CALLS).await;
    eprintln!("{bare} allocations for {CALLS} bare calls, {balanced} through the balancer");
    // What the request and response make themselves is in both; the balancer adds nothing
    // (a little slack for the balancer's own task, which may run on this thread meanwhile).
    assert!(
        balanced <= bare + CALLS / 100,
        "{bare} allocations for {CALLS} bare calls, {balanced} through the balancer"
    );
}
