//! Heap allocations a retry-eligible call through `RetryLayer` adds over a real tonic call whose
//! first attempt succeeds: the two the layer documents (the header list kept for a replay, the
//! box of the first attempt's body) and what cloning the inner service costs, nothing else.
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

    // The layer clones its inner service per call (for later attempts' `poll_ready`, as tower's
    // `Retry` does); a tonic `Channel`'s clone allocates, and so does its first `poll_ready`.
    let before = allocations();
    for _ in 0..CALLS {
        let mut clone = channel.clone();
        poll_fn(|cx| Service::<http::Request<tonic::body::Body>>::poll_ready(&mut clone, cx))
            .await
            .unwrap();
    }
    let clone_cost = (allocations() - before) as f64 / CALLS as f64;

    let bare = per_call(EchoClient::new(channel.clone())).await;
    let retried = per_call(EchoClient::new(
        RetryLayer::new(RetryPolicy::default()).layer(channel.clone()),
    ))
    .await;
    let added = retried - bare;
    assert!(
        added <= 2.0 + clone_cost + 0.1,
        "RetryLayer added {added:.2} allocations per call (bare {bare:.2}, with retry \
         {retried:.2}); 2 are the layer's own and {clone_cost:.2} its inner service's clone"
    );
}
