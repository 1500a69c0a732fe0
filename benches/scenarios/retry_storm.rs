//! `retry-storm`: every backend fails with UNAVAILABLE for a while, then recovers.
//!
//! The same closed-loop load through `RetryLayer` (max 5 attempts, 5–50 ms gRFC A6 backoff) with
//! no budget, with the gRFC A6 token bucket and with the Finagle percentage budget, each variant on
//! a fresh budget. During the storm, attempts per call (what the backends see, divided by the
//! calls made) is the amplification: naive retries multiply the load on a failing fleet by
//! up to max_attempts; a budget should keep it near 1. After the storm, every call should succeed.

use std::time::Duration;

use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;
use towline::retry::{RetryBudget, RetryLayer, RetryPolicy};
use towline::testkit::pb::echo_client::EchoClient;
use towline::testkit::{Backend, Load};

use crate::overhead::drive;
use crate::support::{BoxScenario, Figures, Settings, print_table};

const BACKENDS: usize = 2;
const CONCURRENCY: usize = 16;
const MAX_ATTEMPTS: u32 = 5;

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backends = Backend::start_many(BACKENDS).await?;
        // tonic's own balancer over every backend: "all backends" fail, not just one.
        let channel = Channel::balance_list(backends.iter().map(|b| Endpoint::from(b.uri())));
        let storm = settings.duration;
        let recovery = settings.duration / 2;

        let variants: [(&str, &str, Option<RetryBudget>); 3] = [
            ("no budget", "-", None),
            (
                "A6 token bucket",
                "maxTokens 10, tokenRatio 0.1",
                Some(RetryBudget::token_bucket(10.0, 0.1)?),
            ),
            (
                "percentage budget",
                "10 % of calls over 10 s, +1/s",
                Some(RetryBudget::percent(Duration::from_secs(10), 1, 0.1)?),
            ),
        ];

        let mut rows = Vec::new();
        let mut json = Vec::new();
        for (variant, about, budget) in variants {
            let mut policy = RetryPolicy::builder()
                .max_attempts(MAX_ATTEMPTS)
                .initial_backoff(Duration::from_millis(5))
                .max_backoff(Duration::from_millis(50));
            policy = match budget {
                Some(budget) => policy.budget(budget),
                None => policy.no_budget(),
            };
            let client = EchoClient::new(
                ServiceBuilder::new()
                    .layer(RetryLayer::new(policy.build()?))
                    .service(channel.clone()),
            );
            // Warm the connections with healthy calls.
            drive(&Load::new(CONCURRENCY).calls(200), client.clone()).await;

            for backend in &backends {
                backend.fail_fraction(1.0, Code::Unavailable);
            }
            let before = attempts(&backends);
            let load = Load::new(CONCURRENCY).calls(settings.calls).duration(storm);
            let Figures {
                calls: storm_calls,
                failed: storm_failed,
                ..
            } = drive(&load, client.clone()).await;
            let storm_attempts = attempts(&backends) - before;
            let amplification = storm_attempts as f64 / storm_calls.max(1) as f64;

            for backend in &backends {
                backend.clear_faults();
            }
            let before = attempts(&backends);
            let load = Load::new(CONCURRENCY)
                .calls(settings.calls)
                .duration(recovery);
            let Figures { calls, failed, .. } = drive(&load, client.clone()).await;
            let recovered_attempts = attempts(&backends) - before;
            let success = 1.0 - failed as f64 / calls.max(1) as f64;

            rows.push(vec![
                variant.to_string(),
                about.to_string(),
                storm_calls.to_string(),
                storm_attempts.to_string(),
                format!("{amplification:.3}"),
                format!("{:.1} %", 100.0 * success),
            ]);
            json.push(serde_json::json!({
                "variant": variant,
                "budget": about,
                "storm": {
                    "calls": storm_calls,
                    "failed": storm_failed,
                    "attempts": storm_attempts,
                    "amplification": amplification,
                },
                "recovery": {
                    "calls": calls,
                    "failed": failed,
                    "attempts": recovered_attempts,
                    "success_rate": success,
                },
            }));
        }
        print_table(
            &[
                "variant",
                "budget",
                "storm calls",
                "attempts",
                "attempts/call",
                "success after recovery",
            ],
            &rows,
        );
        Ok(serde_json::json!({
            "backends": BACKENDS,
            "concurrency": CONCURRENCY,
            "max_attempts": MAX_ATTEMPTS,
            "storm_ms": storm.as_millis() as u64,
            "recovery_ms": recovery.as_millis() as u64,
            "variants": json,
        }))
    })
}

fn attempts(backends: &[Backend]) -> u64 {
    backends.iter().map(Backend::calls).sum()
}
