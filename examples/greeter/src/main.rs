//! A greeter client in one call, on towline's default stack: `cargo run -p greeter`.
//!
//! It starts three greeter servers on loopback (in production these are your servers) and
//! calls them through a `towline::Channel` until every server has answered.

use greeter::demo;
use greeter::proto::greeter_client::GreeterClient;

#[tokio::main]
async fn main() -> Result<(), towline::BoxError> {
    let servers = demo::serve_on_loopback(3).await?;
    let addresses: Vec<String> = servers.iter().map(ToString::to_string).collect();
    let target = format!("ipv4:{}", addresses.join(","));

    // Any gRPC target name: "ipv4:10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051",
    // "dns:///greeter.internal:50051", "unix:/run/greeter.sock", …
    let service_config = r#"{
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "helloworld.Greeter"},
        "methodConfig": [{"name": [{}], "timeout": "1s"}]
    }"#;
    let channel = towline::Channel::builder(&target)?
        .service_config(service_config)?
        .build()?;
    let mut client = GreeterClient::new(channel);

    demo::greet_each(&mut client, 3).await
}
