//! The strategy in `examples/custom_strategy.rs`, balancing real backends.

#[path = "../examples/custom_strategy.rs"]
#[allow(dead_code)]
mod example;

use std::collections::BTreeMap;
use std::time::Duration;

use example::canary::Canary;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use towline::balance::{Balance, BalanceConfig, BalanceLayer, EndpointState};
use towline::connect::Connect;
use towline::discover::Static;
use towline::health::HealthCheck;
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

async fn spread(balance: &Balance<tonic::transport::Channel>, n: u32) -> BTreeMap<String, u32> {
    let mut client = EchoClient::new(balance.clone());
    let mut share = BTreeMap::new();
    for _ in 0..n {
        let backend = client
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner()
            .backend;
        *share.entry(backend).or_default() += 1;
    }
    share
}

#[tokio::test]
async fn the_canary_gets_its_share_and_nothing_once_unhealthy() {
    let backends = Backend::start_many(4).await.unwrap();
    let config = BalanceConfig::builder()
        .strategy(Canary::new(backends[3].uri(), 10))
        .health_check(HealthCheck::watch(""))
        .build()
        .unwrap();
    let balance: Balance<_> = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config,
        ))
        .service(Connect::new());
    let all_ready = |n: usize| {
        move |s: &[towline::balance::EndpointSnapshot]| {
            s.iter().filter(|e| e.state == EndpointState::Ready).count() == n
        }
    };
    tokio::time::timeout(Duration::from_secs(10), balance.wait_until(all_ready(4)))
        .await
        .unwrap();

    let share = spread(&balance, 2000).await;
    // Binomial(2000, 0.1): mean 200, sd ~13.4; 140..=260 is over four standard deviations.
    assert!((140..=260).contains(&share["backend-3"]), "{share:?}");
    for stable in ["backend-0", "backend-1", "backend-2"] {
        // The other 90% are split exactly evenly, give or take one call.
        let expected = (2000 - share["backend-3"]) / 3;
        assert!(share[stable].abs_diff(expected) <= 1, "{share:?}");
    }

    // The balancer, not the strategy, keeps an unhealthy canary out.
    backends[3].set_health(ServingStatus::NotServing).await;
    tokio::time::timeout(Duration::from_secs(10), balance.wait_until(all_ready(3)))
        .await
        .unwrap();
    let share = spread(&balance, 300).await;
    assert_eq!(share.get("backend-3"), None, "{share:?}");
    assert_eq!(share.values().sum::<u32>(), 300);
}
