//! The same servers and calls as `src/main.rs`, through a stack built layer by layer (its own
//! settings: no per-method timeout, towline's default outlier detection, two connections per
//! server): `cargo run -p greeter --bin layered`.
//!
//! It starts three greeter servers on loopback (in production these are your servers), then
//! calls them through metrics → retry → health-gated balance → connection pools → connect,
//! until every server has answered.

use greeter::demo;
use greeter::proto::greeter_client::GreeterClient;
use tower::ServiceBuilder;
use towline::balance::{BalanceConfig, BalanceLayer, RoundRobin};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::metrics::MetricsLayer;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};

#[tokio::main]
async fn main() -> Result<(), towline::BoxError> {
    let servers = demo::serve_on_loopback(3).await?;
    let servers = servers.iter().map(|addr| format!("http://{addr}"));

    let stack = ServiceBuilder::new()
        // gRFC A66 `grpc.client.call.duration`, through the `metrics` facade.
        .layer(MetricsLayer::new("greeter"))
        // gRFC A6: UNAVAILABLE retried up to 3 attempts, under a retry budget.
        .layer(RetryLayer::new(
            RetryPolicy::builder().max_attempts(3).build()?,
        ))
        // Only servers whose grpc.health.v1 Watch says SERVING take calls.
        .layer(BalanceLayer::new(
            Static::try_new(servers)?,
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

    demo::greet_each(&mut client, 3).await
}
