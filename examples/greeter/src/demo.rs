//! The demo's stand-ins for your servers, and its check that calls reach every one of them:
//! shared by the one-call client (`src/main.rs`) and the layered one (`src/bin/layered.rs`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::client::GrpcService;
use tonic::codegen::{Body, Bytes, StdError};

use crate::proto::{HelloRequest, greeter_client::GreeterClient};

/// Starts `count` greeter servers on loopback (`server-0`, `server-1`, …) and returns their
/// addresses.
pub async fn serve_on_loopback(count: usize) -> std::io::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::with_capacity(count);
    for i in 0..count {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addresses.push(listener.local_addr()?);
        tokio::spawn(crate::serve(listener, format!("server-{i}")));
    }
    Ok(addresses)
}

/// Calls `SayHello` until `count` different servers have answered (for at most 5 s), printing
/// each server's first answer. Servers become ready one by one, so the first calls may all go
/// to the same one.
pub async fn greet_each<T>(client: &mut GreeterClient<T>, count: usize) -> Result<(), StdError>
where
    // What tonic's generated client asks of its transport.
    T: GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut answered = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let request = HelloRequest {
            name: "towline".into(),
        };
        // The 5 s bound each call too: a server that never answers does not hold it up.
        let message = tokio::time::timeout_at(deadline, client.say_hello(request))
            .await
            .map_err(|_| format!("no answer within 5 s; {} servers answered", answered.len()))??
            .into_inner()
            .message;
        if answered.insert(message.clone()) {
            println!("{message}");
        }
        if answered.len() == count {
            return Ok(());
        }
    }
    Err(format!("only {} of {count} servers answered in 5 s", answered.len()).into())
}
