//! `hedging`: gRFC A6 hedging against one slow backend.
//!
//! Four backends behind round robin, one of them 50 ms slow. The same load through the stack
//! built from a service config without and with a `hedgingPolicy` (3 attempts, 5 ms apart),
//! interleaved round by round: p50/p99 side by side, and backend calls per logical call (the
//! extra load hedging costs).

use std::time::Duration;

use tower::{Layer, ServiceBuilder};
use towline::balance::BalanceLayer;
use towline::config::ServiceConfig;
use towline::connect::Connect;
use towline::discover::Static;
use towline::testkit::pb::echo_client::EchoClient;
use towline::testkit::{Backend, Load};

use crate::overhead::drive;
use crate::support::{BoxScenario, Figures, Settings, micros, print_table};

const CONCURRENCY: usize = 16;
const SLOW: Duration = Duration::from_millis(50);

const PLAIN: &str = r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#;
const HEDGED: &str = r#"{
  "methodConfig": [{"name": [{"service": "towline.testkit.v1.Echo"}],
    "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.005s",
                      "nonFatalStatusCodes": ["UNAVAILABLE"]}}],
  "retryThrottling": {"maxTokens": 100, "tokenRatio": 1},
  "loadBalancingConfig": [{"round_robin": {}}]
}"#;

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backends = Backend::start_many(4).await?;
        backends[0].set_latency(SLOW);
        let client = |json: &str| -> Result<_, towline::BoxError> {
            let config = ServiceConfig::from_json(json)?;
            let balance = BalanceLayer::new(
                Static::new(backends.iter().map(Backend::uri)),
                config.balance_config().build()?,
            )
            .layer(Connect::new());
            Ok(EchoClient::new(
                ServiceBuilder::new()
                    .option_layer(config.hedge_layer())
                    .service(balance),
            ))
        };
        let (plain, hedged) = (client(PLAIN)?, client(HEDGED)?);
        let load = Load::new(CONCURRENCY)
            .calls(settings.calls / 10)
            .duration(settings.duration);
        let warm = Load::new(CONCURRENCY).calls(200);
        drive(&warm, plain.clone()).await;
        drive(&warm, hedged.clone()).await;

        let served = || backends.iter().map(Backend::calls).sum::<u64>();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut a_amp, mut b_amp) = (Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            let before = served();
            let f = drive(&load, plain.clone()).await;
            a_amp.push((served() - before) as f64 / f.calls.max(1) as f64);
            a.push(f);
            let before = served();
            let f = drive(&load, hedged.clone()).await;
            b_amp.push((served() - before) as f64 / f.calls.max(1) as f64);
            b.push(f);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (a_amp, b_amp) = (mean(&a_amp), mean(&b_amp));
        let (a, b) = (Figures::median(&a), Figures::median(&b));
        if a.failed + b.failed > 0 {
            return Err(format!("{} calls failed", a.failed + b.failed).into());
        }
        let p99_ratio = b.p99.as_secs_f64() / a.p99.as_secs_f64().max(1e-9);
        let rows = vec![
            vec![
                "round robin".into(),
                format!("{:.0}", a.rps),
                micros(a.p50),
                micros(a.p99),
                format!("{a_amp:.2}"),
            ],
            vec![
                "round robin + hedging (3 × 5 ms)".into(),
                format!("{:.0}", b.rps),
                micros(b.p50),
                micros(b.p99),
                format!("{b_amp:.2}"),
            ],
            vec![
                "ratio hedged/plain".into(),
                format!("{:.3}", b.rps / a.rps.max(1e-9)),
                format!("{:.3}", b.p50.as_secs_f64() / a.p50.as_secs_f64().max(1e-9)),
                format!("{p99_ratio:.3}"),
                String::new(),
            ],
        ];
        print_table(
            &["variant", "req/s", "p50", "p99", "backend calls/call"],
            &rows,
        );
        Ok(serde_json::json!({
            "rounds": settings.rounds,
            "concurrency": CONCURRENCY,
            "slow_backend_latency_ms": SLOW.as_millis() as u64,
            "plain": a.json(),
            "hedged": b.json(),
            "backend_calls_per_call": { "plain": a_amp, "hedged": b_amp },
            "ratio": { "p99": p99_ratio },
        }))
    })
}
