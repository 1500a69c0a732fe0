//! Per-endpoint middleware: a tower layer between `BalanceLayer` and `PoolLayer`.
//!
//! Below `BalanceLayer` sits a `MakeService` (`Service<Uri>`): the balancer calls it once per
//! endpoint and sends that endpoint's calls to the service it returns. A layer there therefore
//! wraps each endpoint's service on its own, after the balancer chose it:
//!
//! - a layer that needs nothing from the endpoint goes in with `ServiceBuilder::map_response`
//!   (here a concurrency limit per endpoint; a saturated endpoint is not ready, so the balancer
//!   sends the next call elsewhere);
//! - a layer that must know which endpoint it wraps goes in with a `Service<Uri>` of your own,
//!   here a `tower::service_fn` that opens the pool, then wraps it with the URI in hand (it
//!   tags each call with `x-endpoint`, which the testkit backend echoes back).
//!
//! Run it with `cargo run --example per_endpoint`.

use http::{HeaderValue, Request, Uri};
use tonic::body::Body;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, ServiceBuilder, ServiceExt};
use towline::BoxError;
use towline::balance::{BalanceConfig, BalanceLayer};
use towline::connect::Connect;
use towline::discover::Static;
use towline::pool::{PoolConfig, PoolLayer};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let backends = Backend::start_many(3).await?;
    let discovery = || Static::new(backends.iter().map(Backend::uri));

    // The same layer on every endpoint: at most 64 calls in flight on each.
    let limited = ServiceBuilder::new()
        .layer(BalanceLayer::new(discovery(), BalanceConfig::default()))
        .map_response(|pool| ConcurrencyLimit::new(pool, 64))
        .layer(PoolLayer::new(PoolConfig::default()))
        .service(Connect::new());
    EchoClient::new(limited)
        .unary(EchoRequest::default())
        .await?;

    // A layer that knows its endpoint: each call carries the address it was sent to.
    let pools = PoolLayer::new(PoolConfig::default()).layer(Connect::new());
    let tagged_pools = tower::service_fn(move |uri: Uri| {
        let pools = pools.clone();
        async move {
            let tag = HeaderValue::try_from(uri.to_string())?;
            let pool = pools.oneshot(uri).await?;
            Ok::<_, BoxError>(
                ServiceBuilder::new()
                    .map_request(tag_with(tag))
                    .service(pool),
            )
        }
    });
    let tagged = BalanceLayer::new(discovery(), BalanceConfig::default()).layer(tagged_pools);
    let mut client = EchoClient::new(tagged);

    for _ in 0..6 {
        let reply = client.unary(EchoRequest::default()).await?.into_inner();
        let served_by = backends.iter().find(|b| b.id() == reply.backend);
        let sent_to = &reply.request_headers["x-endpoint"];
        println!("{sent_to} served by {}", reply.backend);
        if served_by.map(|b| b.uri().to_string()).as_ref() != Some(sent_to) {
            return Err(format!("tagged {sent_to}, served by {}", reply.backend).into());
        }
    }
    Ok(())
}

/// Sets `x-endpoint` on every request.
fn tag_with(tag: HeaderValue) -> impl Fn(Request<Body>) -> Request<Body> + Clone {
    move |mut request| {
        request.headers_mut().insert("x-endpoint", tag.clone());
        request
    }
}
