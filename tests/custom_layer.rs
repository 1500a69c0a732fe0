//! The layer in `examples/custom_layer.rs`, run against a real testkit backend.

#[path = "../examples/custom_layer.rs"]
#[allow(dead_code)]
mod example;

use std::time::Duration;

use example::auth::AuthLayer;
use tower::{ServiceBuilder, ServiceExt};
use towline::connect::Connect;
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

#[tokio::test]
async fn adds_token_and_default_deadline_and_keeps_the_callers_own() {
    let backend = Backend::start().await.unwrap();
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(AuthLayer::new("t0ken", Duration::from_secs(3)).unwrap())
        .service(channel);
    let mut client = EchoClient::new(stack);

    let seen = client
        .unary(EchoRequest::default())
        .await
        .unwrap()
        .into_inner()
        .request_headers;
    assert_eq!(seen["authorization"], "Bearer t0ken");
    assert_eq!(seen["grpc-timeout"], "3000000u");

    let mut req = tonic::Request::new(EchoRequest::default());
    req.set_timeout(Duration::from_millis(250));
    let seen = client
        .unary(req)
        .await
        .unwrap()
        .into_inner()
        .request_headers;
    assert_eq!(seen["authorization"], "Bearer t0ken");
    // tonic encodes the caller's deadline in microseconds; the layer must not replace it.
    assert_eq!(seen["grpc-timeout"], "250000u");
}

#[tokio::test]
async fn the_default_deadline_bounds_a_slow_call() {
    let backend = Backend::start().await.unwrap();
    backend.set_latency(Duration::from_secs(5));
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(AuthLayer::new("t0ken", Duration::from_millis(50)).unwrap())
        .service(channel);
    let started = std::time::Instant::now();
    let status = EchoClient::new(stack)
        .unary(EchoRequest::default())
        .await
        .unwrap_err();
    // Both ends enforce grpc-timeout: tonic's channel reports CANCELLED ("Timeout expired"),
    // the server DEADLINE_EXCEEDED; whichever fires first, the call ends near 50 ms, not 5 s.
    assert!(
        matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.calls(), 1);
}

#[test]
fn a_token_that_is_not_a_header_value_is_rejected_up_front() {
    assert!(AuthLayer::new("bad\ntoken", Duration::from_secs(1)).is_err());
}
