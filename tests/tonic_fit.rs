//! towline stacks as tonic and tower expect them: the generated client's `with_interceptor`
//! over every stack, and endpoint connects that fail or panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Uri;

use tokio::time::timeout;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tower::ServiceBuilder;
use towline::backoff::{Backoff, Jitter};
use towline::balance::{
    Balance, BalanceConfig, BalanceLayer, EndpointService, EndpointSnapshot, EndpointState,
};
use towline::connect::Connect;
use towline::discover::Static;
use towline::metrics::MetricsLayer;
use towline::pool::{Pool, PoolConfig, PoolLayer};
use towline::retry::{Retry, RetryLayer, RetryPolicy};
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

/// The usual stack over `backends`: retry over a balancer over pools of two connections.
fn retry_over_balance_over_pool(
    backends: &[Backend],
) -> Retry<Balance<Pool<tonic::transport::Channel>>> {
    ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::builder().build().unwrap()))
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .layer(PoolLayer::new(
            PoolConfig::builder().size(2).build().unwrap(),
        ))
        .service(Connect::new())
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
    let stack = retry_over_balance_over_pool(&backends);
    let mut client = EchoClient::with_interceptor(stack, tenant());
    assert_eq!(seen_tenant(&mut client).await, "acme");
}

#[tokio::test]
async fn with_interceptor_over_metrics_over_retry_over_balance_over_pool() {
    let backends = Backend::start_many(2).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new("tonic_fit"))
        .service(retry_over_balance_over_pool(&backends));
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
        .service(retry_over_balance_over_pool(&backends));
    let mut client = EchoClient::with_interceptor(stack, |_: tonic::Request<()>| {
        Err(tonic::Status::permission_denied("no tenant"))
    });
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "no tenant");
    assert_eq!(backends.iter().map(Backend::calls).sum::<u64>(), 0);
}

/// Whether `uri` names the same `host:port` as `backend`.
fn is(backend: &Backend, uri: &Uri) -> bool {
    uri.authority() == backend.uri().authority()
}

/// Waits until the endpoint of `bad` is down for a reason containing `why` and the one of
/// `good` is ready; then checks that `good` serves every call and that `bad` keeps being
/// retried (its connect `attempts` keep growing).
async fn down_with_reason_and_retried<S: EndpointService>(
    balance: Balance<S>,
    bad: &Backend,
    good: &Backend,
    why: &str,
    attempts: &AtomicUsize,
) where
    S::Body: Default,
{
    wait_for(&balance, "the bad endpoint down, saying why", |s| {
        s.iter().any(|e| {
            is(bad, &e.uri)
                && e.state == EndpointState::Down
                && e.reason.as_deref().is_some_and(|r| r.contains(why))
        })
    })
    .await;
    wait_for(&balance, "the good endpoint ready", |s| {
        s.iter()
            .any(|e| is(good, &e.uri) && e.state == EndpointState::Ready)
    })
    .await;

    let mut client = EchoClient::new(balance.clone());
    for _ in 0..10 {
        let reply = client.unary(EchoRequest::default()).await.unwrap();
        assert_eq!(reply.get_ref().backend, good.id());
    }
    assert_eq!(good.calls(), 10);
    assert_eq!(bad.connections_accepted(), 0);

    // Retried with the reconnect backoff (50 ms, up to 200 ms): a few more attempts soon.
    let seen = attempts.load(Ordering::SeqCst);
    timeout(Duration::from_secs(5), async {
        while attempts.load(Ordering::SeqCst) < seen + 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the bad endpoint is no longer retried ({} attempts): {:#?}",
            attempts.load(Ordering::SeqCst),
            balance.snapshot()
        )
    });
}

#[tokio::test]
async fn a_panicking_configure_leaves_its_endpoint_down_and_retried() {
    let backends = Backend::start_many(2).await.unwrap();
    let (bad, good) = (&backends[0], &backends[1]);
    let attempts = Arc::new(AtomicUsize::new(0));
    let connect = {
        let (bad, attempts) = (bad.uri(), attempts.clone());
        Connect::new().configure(move |endpoint| {
            if endpoint.uri().authority() == bad.authority() {
                attempts.fetch_add(1, Ordering::SeqCst);
                panic!("no TLS config for {bad}");
            }
            endpoint
        })
    };
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .service(connect);
    down_with_reason_and_retried(
        balance,
        bad,
        good,
        "Connect::configure panicked: no TLS config for",
        &attempts,
    )
    .await;
}

#[tokio::test]
async fn a_failing_try_configure_leaves_its_endpoint_down_with_its_error() {
    let backends = Backend::start_many(2).await.unwrap();
    let (bad, good) = (&backends[0], &backends[1]);
    let attempts = Arc::new(AtomicUsize::new(0));
    let connect = {
        let (bad, attempts) = (bad.uri(), attempts.clone());
        Connect::new().try_configure(move |endpoint| {
            if endpoint.uri().authority() == bad.authority() {
                attempts.fetch_add(1, Ordering::SeqCst);
                return Err("no client certificate for this host");
            }
            Ok(endpoint)
        })
    };
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .service(connect);
    down_with_reason_and_retried(
        balance,
        bad,
        good,
        "Connect::try_configure failed: no client certificate for this host",
        &attempts,
    )
    .await;
}

#[tokio::test]
async fn an_endpoint_task_that_panics_is_down_and_restarted_with_backoff() {
    // A user's own `MakeService` that panics in `call`: the panic unwinds through the balancer's
    // endpoint task itself.
    let backends = Backend::start_many(2).await.unwrap();
    let (bad, good) = (&backends[0], &backends[1]);
    let attempts = Arc::new(AtomicUsize::new(0));
    let make = {
        let (bad, attempts) = (bad.uri(), attempts.clone());
        tower::service_fn(move |uri: Uri| {
            if uri.authority() == bad.authority() {
                attempts.fetch_add(1, Ordering::SeqCst);
                panic!("custom connector exploded");
            }
            tower::ServiceExt::oneshot(Connect::new(), uri)
        })
    };
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config(),
        ))
        .service(make);
    down_with_reason_and_retried(
        balance,
        bad,
        good,
        "its connection task panicked: custom connector exploded",
        &attempts,
    )
    .await;
}
