//! towline stacks as tonic and tower expect them: the generated client's `with_interceptor`
//! over every stack, and endpoint connects that fail or panic.

use std::time::Duration;

use tokio::time::timeout;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tower::ServiceBuilder;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{Balance, BalanceConfig, BalanceLayer, EndpointService, EndpointSnapshot};
use towline::connect::Connect;
use towline::discover::Static;
use towline::metrics::MetricsLayer;
use towline::pool::{PoolConfig, PoolLayer};
use towline::retry::{RetryLayer, RetryPolicy};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

fn quick_backoff() -> Backoff {
    Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(50),
        Duration::from_millis(200),
        1.6,
    )
    .unwrap()
}

fn config() -> BalanceConfig {
    BalanceConfig::builder()
        .reconnect_backoff(quick_backoff())
        .endpoint_wait(Duration::from_secs(2))
        .outlier_detection(None)
        .build()
        .unwrap()
}

async fn wait_for<S: EndpointService>(
    balance: &Balance<S>,
    what: &str,
    done: impl FnMut(&[EndpointSnapshot]) -> bool,
) {
    timeout(Duration::from_secs(10), balance.wait_until(done))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:#?}", balance.snapshot()));
}

/// Adds `x-tenant: acme` to every request, as an auth interceptor adds a token.
fn tenant() -> impl Interceptor + Clone {
    |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("x-tenant", MetadataValue::from_static("acme"));
        Ok(request)
    }
}

/// One call through `client`; the headers the backend saw.
async fn seen_tenant<T>(client: &mut EchoClient<T>) -> String
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<towline::BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<towline::BoxError> + Send,
{
    let reply = client
        .unary(EchoRequest::default())
        .await
        .expect("the call succeeds")
        .into_inner();
    reply
        .request_headers
        .get("x-tenant")
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn with_interceptor_over_balance_over_connect() {
    let backends = Backend::start_many(2).await.unwrap();
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .service(Connect::new());
    let mut client = EchoClient::with_interceptor(balance, tenant());
    assert_eq!(seen_tenant(&mut client).await, "acme");
}

#[tokio::test]
async fn with_interceptor_over_retry_over_balance_over_pool() {
    let backends = Backend::start_many(2).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::builder().build().unwrap()))
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .layer(PoolLayer::new(
            PoolConfig::builder().size(2).build().unwrap(),
        ))
        .service(Connect::new());
    let mut client = EchoClient::with_interceptor(stack, tenant());
    assert_eq!(seen_tenant(&mut client).await, "acme");
}

#[tokio::test]
async fn with_interceptor_over_metrics_over_retry_over_balance_over_pool() {
    let backends = Backend::start_many(2).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("tonic_fit"))
        .layer(RetryLayer::new(RetryPolicy::builder().build().unwrap()))
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .layer(PoolLayer::new(
            PoolConfig::builder().size(2).build().unwrap(),
        ))
        .service(Connect::new());
    let mut client = EchoClient::with_interceptor(stack, tenant());
    assert_eq!(seen_tenant(&mut client).await, "acme");
}

#[tokio::test]
async fn a_rejecting_interceptor_answers_without_reaching_a_backend() {
    // tonic answers a rejected request with a response over a default body: the reason the
    // generated `with_interceptor` requires `Default`.
    let backends = Backend::start_many(2).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("tonic_fit_rejected"))
        .layer(RetryLayer::new(RetryPolicy::builder().build().unwrap()))
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .layer(PoolLayer::new(
            PoolConfig::builder().size(2).build().unwrap(),
        ))
        .service(Connect::new());
    let mut client = EchoClient::with_interceptor(stack, |_: tonic::Request<()>| {
        Err(tonic::Status::permission_denied("no tenant"))
    });
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "no tenant");
    assert_eq!(backends.iter().map(Backend::calls).sum::<u64>(), 0);
}
