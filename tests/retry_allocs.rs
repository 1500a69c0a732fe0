//! Heap allocations a retry-eligible call through `RetryLayer` adds over a real tonic call whose
//! first attempt succeeds: the one the layer documents for a tonic call (the box of the first
//! attempt's body; the header list of a tonic call is kept without one), nothing else: not the
//! inner service's clone, which is made only when an attempt fails.
//! Client and server run on one current-thread runtime, so the count covers both ends: a
//! replayed body that changed what goes on the wire (an exact size hint makes hyper add a
//! `content-length` header, which both ends then encode and decode) shows here.

use std::future::poll_fn;

use tower::{Layer, Service, ServiceExt};
use towline::connect::Connect;
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

#[path = "support/alloc.rs"]
mod alloc;
use alloc::allocations;

const CALLS: u64 = 500;

/// Allocations per call of `CALLS` unary calls through `client`, after a warm-up.
async fn per_call<S>(mut client: EchoClient<S>) -> f64
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<towline::BoxError> + Send,
    S::Error: Into<towline::BoxError>,
{
    let request = || EchoRequest {
        payload: vec![0; 64],
        ..Default::default()
    };
    for _ in 0..50 {
        client.unary(request()).await.unwrap();
    }
    let before = allocations();
    for _ in 0..CALLS {
        client.unary(request()).await.unwrap();
    }
    (allocations() - before) as f64 / CALLS as f64
}

#[tokio::test]
async fn a_retryable_call_over_tonic_adds_only_what_a_replay_needs() {
    let backend = Backend::start().await.unwrap();
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();

    // A tonic `Channel`'s clone allocates, and so does its first `poll_ready`: what tower's
    // `Retry` would pay per call, cloning its inner service for later attempts. `RetryLayer`
    // clones only when an attempt fails, so none of it shows below.
    let before = allocations();
    for _ in 0..CALLS {
        let mut clone = channel.clone();
        poll_fn(|cx| Service::<http::Request<tonic::body::Body>>::poll_ready(&mut clone, cx))
            .await
            .unwrap();
    }
    let clone_cost = (allocations() - before) as f64 / CALLS as f64;
    assert!(
        clone_cost >= 1.0,
        "{clone_cost:.2}: the clone this test shows is not paid"
    );

    let bare = per_call(EchoClient::new(channel.clone())).await;
    let retried = per_call(EchoClient::new(
        RetryLayer::new(RetryPolicy::default()).layer(channel.clone()),
    ))
    .await;
    let added = retried - bare;
    // tonic's request carries only `te` and `content-type`, kept without the header list.
    assert!(
        added <= 1.0 + 0.1,
        "RetryLayer added {added:.2} allocations per call (bare {bare:.2}, with retry \
         {retried:.2}); 1 is the layer's own (the first attempt's body box), and the inner \
         service's clone ({clone_cost:.2}) is not made per call"
    );
}
