//! A towline stack built from a standard gRPC service config file.
//!
//! `cargo run --example service_config [path/to/service_config.json]` (default:
//! `examples/service_config.json`). The config's `loadBalancingConfig` and `healthCheckConfig`
//! configure the balancer, its `retryPolicy`/`retryThrottling` the retry layer, and its
//! `timeout`s a layer that sets `grpc-timeout`. Three testkit backends stand in for a service.

use std::time::{Duration, Instant};

use tower::{Layer, ServiceBuilder};
use towline::balance::BalanceLayer;
use towline::config::ServiceConfig;
use towline::connect::Connect;
use towline::discover::Static;
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/service_config.json").to_owned()
    });
    // A bad field fails here, naming its JSON path: `methodConfig[0].timeout: ...`.
    let config = ServiceConfig::from_json(&std::fs::read_to_string(&path)?)?;
    println!("{path}:");
    println!("  load balancing: {:?}", config.load_balancing());
    println!("  health check:   {:?}", config.health_check());

    let backends = Backend::start_many(3).await?;
    let balance = BalanceLayer::new(
        Static::new(backends.iter().map(Backend::uri)),
        config.balance_config().target("echo").build()?,
    )
    .layer(Connect::new());
    // Outer to inner: the per-method deadline, retries within it, then the balancer.
    let stack = ServiceBuilder::new()
        .option_layer(config.per_method_layer())
        .option_layer(config.retry_layer())
        .service(balance);
    let mut client = EchoClient::new(stack);

    let reply = client.unary(EchoRequest::default()).await?.into_inner();
    println!(
        "\na call: served by {}, grpc-timeout {}",
        reply.backend, reply.request_headers["grpc-timeout"]
    );

    for b in &backends {
        b.fail_next(1, tonic::Code::Unavailable);
    }
    let before: u64 = backends.iter().map(Backend::calls).sum();
    let reply = client.unary(EchoRequest::default()).await?.into_inner();
    let attempts = backends.iter().map(Backend::calls).sum::<u64>() - before;
    println!(
        "every backend fails its next call with UNAVAILABLE: the call still succeeds on {} after {attempts} attempts",
        reply.backend
    );

    for b in &backends {
        b.clear_faults();
        b.set_latency(Duration::from_secs(2));
    }
    let start = Instant::now();
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    println!(
        "every backend takes 2 s: the call ends {:?} after {:?} (the config's timeout)",
        status.code(),
        start.elapsed()
    );
    Ok(())
}
