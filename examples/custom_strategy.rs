//! Writing your own balancing strategy.
//!
//! The balancer does the hard parts — discovery, connections, health checks, outlier ejection,
//! draining, failing fast — and hands a [`Strategy`] only the endpoints that may take a call. A
//! strategy just picks one. This one sends a fixed share of calls to a canary endpoint and
//! round-robins the rest over the stable ones; if the canary is unhealthy or ejected it is simply
//! not among the candidates, and every call goes to the stable endpoints.
//!
//! Run it with `cargo run --example custom_strategy`.

pub mod canary {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Uri;
    use http::request::Parts;
    use towline::balance::{Candidate, Strategy};

    /// `percent` of calls to `canary`, the rest round robin over the others.
    #[derive(Debug)]
    pub struct Canary {
        canary: Uri,
        percent: u32,
        next: AtomicUsize,
    }

    impl Canary {
        /// `percent` is clamped to 100.
        pub fn new(canary: Uri, percent: u32) -> Self {
            Canary {
                canary,
                percent: percent.min(100),
                next: AtomicUsize::new(0),
            }
        }
    }

    impl Strategy for Canary {
        fn pick(&self, _request: &Parts, candidates: &[Candidate]) -> usize {
            let canary = candidates.iter().position(|c| c.uri() == &self.canary);
            let stable = candidates.len() - usize::from(canary.is_some());
            match canary {
                Some(canary) if stable == 0 || fastrand::u32(0..100) < self.percent => canary,
                _ => {
                    // The n-th stable candidate, skipping the canary's slot.
                    let n = self.next.fetch_add(1, Ordering::Relaxed) % stable;
                    match canary {
                        Some(canary) if n >= canary => n + 1,
                        _ => n,
                    }
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::collections::BTreeMap;
    use tower::ServiceBuilder;
    use towline::balance::{BalanceConfig, BalanceLayer, EndpointState};
    use towline::connect::Connect;
    use towline::discover::Static;
    use towline::testkit::Backend;
    use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

    let backends = Backend::start_many(4).await?;
    let canary = backends[3].uri();
    // Swapping strategy is this one argument; nothing else in the stack changes.
    let config = BalanceConfig::builder()
        .strategy(canary::Canary::new(canary, 10))
        .build()?;
    let balance = ServiceBuilder::new()
        .layer(BalanceLayer::new(
            Static::new(backends.iter().map(Backend::uri)),
            config,
        ))
        .service(Connect::new());
    balance
        .wait_until(|s| s.iter().all(|e| e.state == EndpointState::Ready))
        .await;

    let mut client = EchoClient::new(balance);
    let mut share = BTreeMap::<String, u32>::new();
    for _ in 0..1000 {
        let backend = client
            .unary(EchoRequest::default())
            .await?
            .into_inner()
            .backend;
        *share.entry(backend).or_default() += 1;
    }
    println!("1000 calls, 10% to the canary (backend-3):");
    for (backend, n) in share {
        println!("  {backend}: {n}");
    }
    Ok(())
}
