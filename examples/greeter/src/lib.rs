//! The greeter's generated code and its server, shared by the clients (`src/main.rs`,
//! `src/bin/layered.rs`) and the server binary (`src/bin/server.rs`).

pub mod demo;

pub mod proto {
    tonic::include_proto!("helloworld");
}

use proto::greeter_server::{Greeter, GreeterServer};
use proto::{HelloReply, HelloRequest};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Answers `SayHello` with a greeting that names the server, so a client sees where calls went.
#[derive(Debug, Clone)]
pub struct MyGreeter {
    pub name: String,
}

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let message = format!("Hello {} from {}", request.into_inner().name, self.name);
        Ok(Response::new(HelloReply { message }))
    }
}

/// Serves the greeter and `grpc.health.v1` (reporting SERVING) on `listener` until the task ends.
pub async fn serve(listener: TcpListener, name: String) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GreeterServer<MyGreeter>>().await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GreeterServer::new(MyGreeter { name }))
        // TCP_NODELAY: without it, a small write that follows another (a health `Watch`'s
        // first answer after its headers) can wait for the client's delayed ACK, 40 ms.
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
}

// The README's Rust blocks compile (and run, unless `no_run`) as doctests of this crate.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
