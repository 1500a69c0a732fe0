//! `ServiceBuilderExt` builds the stack the explicit layers build: the same type (checked by the
//! compiler), and over real backends, through a generated tonic client, a stack that measures
//! calls and attempts, retries, balances and pools.

use std::time::Duration;

use metrics::{SharedString, Unit};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::time::timeout;
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;
use towline::ServiceBuilderExt;
use towline::balance::{Balance, BalanceConfig, BalanceLayer, EndpointState, RoundRobin};
use towline::connect::Connect;
use towline::discover::Static;
use towline::metrics::{ATTEMPT_STARTED, CALL_DURATION, Metrics, MetricsLayer};
use towline::pool::{Pool, PoolConfig, PoolLayer};
use towline::retry::{Retry, RetryLayer, RetryPolicy};
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

/// call metrics → retry → attempt metrics → balance → pool → connect.
type Stack = Metrics<Retry<Metrics<Balance<Pool<Channel>>>>>;

const POOL_SIZE: usize = 2;

fn policy() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(5))
        .no_budget()
        .build()
        .unwrap()
}

fn balance_config() -> BalanceConfig {
    BalanceConfig::builder()
        .strategy(RoundRobin::new())
        .outlier_detection(None)
        .build()
        .unwrap()
}

fn pool_config() -> PoolConfig {
    PoolConfig::builder().size(POOL_SIZE).build().unwrap()
}

fn endpoints(backends: &[Backend]) -> Static {
    Static::new(backends.iter().map(Backend::uri))
}

/// The stack from tower's `layer` and towline's layer types.
fn explicit(backends: &[Backend], target: &str) -> Stack {
    ServiceBuilder::new()
        .layer(MetricsLayer::new(target))
        .layer(RetryLayer::new(policy()))
        .layer(MetricsLayer::attempts(target))
        .layer(BalanceLayer::new(endpoints(backends), balance_config()))
        .layer(PoolLayer::new(pool_config()))
        .service(Connect::new())
}

/// The same stack from the extension; its return type is the compiler's check that it is the
/// same stack.
fn extended(backends: &[Backend], target: &str) -> Stack {
    ServiceBuilder::new()
        .call_metrics(target)
        .grpc_retry(policy())
        .attempt_metrics(target)
        .balance(endpoints(backends), balance_config())
        .pool(pool_config())
        .service(Connect::new())
}

/// One metric in a snapshot: its key, unit, description and value.
type Recorded = (CompositeKey, Option<Unit>, Option<SharedString>, DebugValue);

/// The recorded total of one metric of `target`: a counter's value, or a histogram's number of
/// samples.
fn total(snapshot: &[Recorded], name: &str, target: &str) -> usize {
    snapshot
        .iter()
        .filter(|(key, ..)| {
            let key = key.key();
            key.name() == name
                && key
                    .labels()
                    .any(|label| label.key() == "grpc.target" && label.value() == target)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => usize::try_from(*n).unwrap(),
            DebugValue::Histogram(samples) => samples.len(),
            DebugValue::Gauge(_) => 0,
        })
        .sum()
}

#[tokio::test]
async fn the_extension_stack_measures_retries_balances_and_pools_through_a_generated_client() {
    // Installed before any layer registers a metric (the layers cache their handles).
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).expect("the only recorder in this test binary");

    let backends = Backend::start_many(2).await.unwrap();
    let stack = extended(&backends, "extended");
    let balance = stack.get_ref().get_ref().get_ref();
    timeout(
        Duration::from_secs(10),
        balance.wait_until(|endpoints| {
            endpoints.len() == 2 && endpoints.iter().all(|e| e.state == EndpointState::Ready)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("endpoints not ready: {:#?}", balance.snapshot()));

    // Each backend fails its next call: those two attempts are retried, on the other backend.
    for backend in &backends {
        backend.fail_next(1, Code::Unavailable);
    }
    let calls = 6;
    let mut client = EchoClient::new(stack);
    for n in 0..calls {
        timeout(
            Duration::from_secs(10),
            client.unary(EchoRequest {
                message: format!("call {n}"),
                ..Default::default()
            }),
        )
        .await
        .expect("a call within 10 s")
        .unwrap_or_else(|status| panic!("call {n} failed: {status:?}"));
    }

    // Retried: every call succeeded, over two more attempts than calls. (A snapshot takes the
    // values out of the recorder: one for both.)
    let recorded = snapshotter.snapshot().into_vec();
    assert_eq!(total(&recorded, CALL_DURATION, "extended"), calls);
    assert_eq!(total(&recorded, ATTEMPT_STARTED, "extended"), calls + 2);
    let served: Vec<u64> = backends.iter().map(Backend::calls).collect();
    assert_eq!(served.iter().sum::<u64>(), calls as u64 + 2, "{served:?}");
    // Balanced round robin: the eight attempts split evenly.
    assert_eq!(served, [4, 4]);
    // Pooled: each backend holds the pool's connections (the server counts them once it has
    // accepted them, which it does not signal: polled, bounded).
    for backend in &backends {
        timeout(Duration::from_secs(5), async {
            while backend.open_connections() != POOL_SIZE as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            let open = backend.open_connections();
            panic!("{} has {open} connections, not {POOL_SIZE}", backend.id())
        });
    }
}

#[tokio::test]
async fn explicit_layers_serve_the_same_client() {
    let backends = Backend::start_many(1).await.unwrap();
    let mut client = EchoClient::new(explicit(&backends, "explicit"));
    let reply = timeout(
        Duration::from_secs(10),
        client.unary(EchoRequest::default()),
    )
    .await
    .expect("a call within 10 s")
    .unwrap();
    assert_eq!(reply.get_ref().backend, backends[0].id());
}
