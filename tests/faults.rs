//! Real network faults under the stack: backends in their own network namespaces.

use std::time::{Duration, Instant};

use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, NetNs, require_netns};

#[tokio::test]
async fn smoke_blackhole() {
    if !require_netns("smoke_blackhole") {
        return;
    }
    let ns = NetNs::create().unwrap();
    let backend = Backend::builder().netns(&ns).start().await.unwrap();
    let channel = tonic::transport::Endpoint::from(backend.uri())
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    client.unary(EchoRequest::default()).await.unwrap();
    ns.blackhole().unwrap();
    let mut req = tonic::Request::new(EchoRequest::default());
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = client.unary(req).await.unwrap_err();
    eprintln!("blackholed: {err:?} after {:?}", start.elapsed());
    ns.heal().unwrap();
    ns.link_down().unwrap();
    let mut req = tonic::Request::new(EchoRequest::default());
    req.set_timeout(Duration::from_millis(300));
    let err = client.unary(req).await.unwrap_err();
    eprintln!("link down: {err:?}");
    ns.heal().unwrap();
    ns.partition().unwrap();
    let mut req = tonic::Request::new(EchoRequest::default());
    req.set_timeout(Duration::from_millis(300));
    let err = client.unary(req).await.unwrap_err();
    eprintln!("partition: {err:?}");
    ns.heal().unwrap();
    let ok = client.unary(EchoRequest::default()).await;
    eprintln!("healed: {ok:?}");
}
