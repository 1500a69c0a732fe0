//! Request bodies replayed by `towline::retry` over HTTP/2 to a real testkit backend: bodies
//! whose frames arrive while the first attempt is being sent (so they go through `ReplayBody`,
//! not the whole-body copy a unary request gets), within and beyond `max_replay_bytes`.

use std::time::Duration;

use futures::StreamExt as _;
use tonic::Code;
use tower::{ServiceBuilder, ServiceExt};
use towline::connect::Connect;
use towline::retry::{Retry, RetryLayer, RetryPolicy};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, EchoResponse, echo_client::EchoClient};

async fn client(
    backend: &Backend,
    max_replay_bytes: usize,
) -> EchoClient<Retry<tonic::transport::Channel>> {
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(5))
        .max_replay_bytes(max_replay_bytes)
        .no_budget()
        .build()
        .unwrap();
    let channel = Connect::new().oneshot(backend.uri()).await.unwrap();
    EchoClient::new(
        ServiceBuilder::new()
            .layer(RetryLayer::new(policy))
            .service(channel),
    )
}

/// `n` messages of `size` bytes (message `i` filled with `i`), each produced after a short wait:
/// none is ready when the call is made.
fn slow_messages(n: u8, size: usize) -> impl futures::Stream<Item = EchoRequest> + Send + 'static {
    futures::stream::iter(0..n).then(move |i| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        EchoRequest {
            payload: vec![i; size],
            ..Default::default()
        }
    })
}

fn expected(n: u8, size: usize) -> Vec<u8> {
    (0..n).flat_map(|i| vec![i; size]).collect()
}

/// Streams 20 slow messages of 100 bytes in one client-streaming call, bounded in time.
async fn stream_20x100(
    client: &mut EchoClient<Retry<tonic::transport::Channel>>,
) -> Result<EchoResponse, tonic::Status> {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.client_stream(slow_messages(20, 100)),
    )
    .await
    .expect("bounded")
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_body_streamed_in_several_frames_is_replayed_in_full_after_each_failure() {
    let backend = Backend::start().await.unwrap();
    let mut client = client(&backend, 64 * 1024).await;
    backend.fail_next(2, Code::Unavailable);
    let reply = stream_20x100(&mut client).await.unwrap();
    assert_eq!(backend.calls(), 3, "two failures, retried");
    assert_eq!(
        reply.payload,
        expected(20, 100),
        "every frame, in order, on the last attempt"
    );
    assert_eq!(reply.request_headers["grpc-previous-rpc-attempts"], "2");
}

#[tokio::test]
async fn beyond_the_cap_a_streamed_body_is_sent_once_in_full_and_not_retried() {
    let backend = Backend::start().await.unwrap();
    let mut client = client(&backend, 1000).await;
    // 20 x 100 bytes (plus framing) streams past the 1000-byte cap while it is sent.
    let reply = stream_20x100(&mut client).await.unwrap();
    assert_eq!(reply.payload, expected(20, 100), "never truncated");
    assert_eq!(backend.calls(), 1);

    // The failure comes after the server's latency, long after the stream (about 20 ms) went
    // past the cap: by then the body was not kept.
    backend.set_latency(Duration::from_millis(500));
    backend.fail_next(1, Code::Unavailable);
    let status = stream_20x100(&mut client).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the failure, not a retry of a partial body"
    );
    assert_eq!(backend.calls(), 2, "not retried: the body was not kept");
}
