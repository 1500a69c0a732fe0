//! A greeter client on the full towline stack: `cargo run -p greeter`.
//!
//! It starts three greeter servers on loopback (in production these are your servers), then
//! calls them through metrics → retry → health-gated balance → connection pools → connect,
//! until every server has answered.

use std::collections::BTreeSet;
use std::time::Duration;

use greeter::proto::{HelloRequest, greeter_client::GreeterClient};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use towline::balance::{BalanceConfig, BalanceLayer, RoundRobin};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::metrics::MetricsLayer;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut servers = Vec::new();
    for i in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        servers.push(format!("http://{}", listener.local_addr()?).parse()?);
        tokio::spawn(greeter::serve(listener, format!("server-{i}")));
    }

    let stack = ServiceBuilder::new()
        // gRFC A66 `grpc.client.call.duration`, through the `metrics` facade.
        .layer(MetricsLayer::new("greeter"))
        // gRFC A6: UNAVAILABLE retried up to 3 attempts, under a retry budget.
        .layer(RetryLayer::new(
            RetryPolicy::builder().max_attempts(3).build()?,
        ))
        // Only servers whose grpc.health.v1 Watch says SERVING take calls.
        .layer(BalanceLayer::new(
            Static::new(servers),
            BalanceConfig::builder()
                .strategy(RoundRobin::new())
                .health_check(HealthCheck::watch("helloworld.Greeter"))
                .target("greeter")
                .build()?,
        ))
        // Two HTTP/2 connections per server, reconnected with backoff.
        .layer(PoolLayer::new(PoolConfig::builder().size(2).build()?))
        .service(Connect::new());
    let mut client = GreeterClient::new(stack);

    // Servers become ready one by one; keep calling (a bounded number of times) until each
    // has answered.
    let mut answered = BTreeSet::new();
    for _ in 0..100 {
        let mut request = tonic::Request::new(HelloRequest {
            name: "towline".into(),
        });
        request.set_timeout(Duration::from_secs(1));
        let message = client.say_hello(request).await?.into_inner().message;
        if answered.insert(message.clone()) {
            println!("{message}");
        }
        if answered.len() == 3 {
            return Ok(());
        }
    }
    Err(format!("only {} of 3 servers answered in 100 calls", answered.len()).into())
}
