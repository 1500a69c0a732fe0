//! README "Where timeouts go": what a call sees when its deadline passes, by where the deadline
//! is set, against a server that accepts connections and never answers.

use std::time::{Duration, Instant};

use greeter::proto::{HelloRequest, greeter_client::GreeterClient};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::{Channel, Uri};
use tower::ServiceBuilder;
use towline::balance::{Balance, BalanceConfig, BalanceLayer};
use towline::config::ServiceConfig;
use towline::connect::Connect;
use towline::discover::Static;
use towline::pool::{Pool, PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};

const DEADLINE: Duration = Duration::from_millis(200);
/// Far above the deadline, far below the balancer's 3 s `endpoint_wait`: a call that ends
/// within it ended at its deadline, not at some other bound.
const WITHIN: Duration = Duration::from_millis(1500);

/// A server that accepts every connection and holds it open without a byte of HTTP/2.
async fn silent_server() -> Uri {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    uri
}

/// The bottom of every stack here: a balancer over a pool, towline's defaults.
fn balanced(server: Uri) -> Balance<Pool<Channel>> {
    ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new([server]),
            BalanceConfig::default(),
        ))
        .layer(PoolLayer::new(PoolConfig::default()))
        .service(Connect::new())
}

fn request() -> tonic::Request<HelloRequest> {
    tonic::Request::new(HelloRequest {
        name: "towline".into(),
    })
}

/// Runs `call` and returns its status and how long it took.
async fn timed<F, T>(call: F) -> (tonic::Status, Duration)
where
    F: Future<Output = Result<T, tonic::Status>>,
    T: std::fmt::Debug,
{
    let start = Instant::now();
    let status = call.await.expect_err("the server never answers");
    (status, start.elapsed())
}

#[tokio::test]
async fn a_deadline_on_the_call_ends_it_deadline_exceeded_saying_why() {
    let server = silent_server().await;
    let stack = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::default()))
        .service(balanced(server));
    let mut client = GreeterClient::new(stack);

    let mut call = request();
    call.set_timeout(DEADLINE);
    let (status, took) = timed(client.say_hello(call)).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline of 200 ms exceeded"),
        "{status:?}"
    );
    assert!(took >= DEADLINE && took < WITHIN, "took {took:?}");
}

#[tokio::test]
async fn a_service_config_timeout_does_the_same_for_every_call() {
    let server = silent_server().await;
    let config = ServiceConfig::from_json(
        r#"{ "methodConfig": [{ "name": [{ "service": "helloworld.Greeter" }], "timeout": "0.2s" }] }"#,
    )
    .unwrap();
    let stack = ServiceBuilder::new()
        .option_layer(config.per_method_layer())
        .layer(RetryLayer::new(RetryPolicy::default()))
        .service(balanced(server));
    let mut client = GreeterClient::new(stack);

    let (status, took) = timed(client.say_hello(request())).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= DEADLINE && took < WITHIN, "took {took:?}");
}

#[tokio::test]
async fn tower_timeout_above_the_stack_ends_the_call_unknown() {
    let server = silent_server().await;
    let stack = ServiceBuilder::new()
        .timeout(DEADLINE)
        .layer(RetryLayer::new(RetryPolicy::default()))
        .service(balanced(server));
    let mut client = GreeterClient::new(stack);

    let (status, took) = timed(client.say_hello(request())).await;
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(status.message(), "request timed out");
    assert!(took >= DEADLINE && took < WITHIN, "took {took:?}");
}

#[tokio::test]
async fn tower_timeout_under_retry_ends_an_attempt_deadline_exceeded_not_retried() {
    let server = silent_server().await;
    let stack = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::default()))
        .timeout(DEADLINE)
        .service(balanced(server));
    let mut client = GreeterClient::new(stack);

    let (status, took) = timed(client.say_hello(request())).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // One attempt: the default policy retries UNAVAILABLE only.
    assert!(took >= DEADLINE && took < 2 * DEADLINE, "took {took:?}");
}
