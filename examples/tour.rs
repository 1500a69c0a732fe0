//! The towline tour: real gRPC backends, bounded load, and what it looked like.
//!
//! ```text
//! cargo run --release --example tour [-- --calls 50000 --concurrency 32 --seconds 20]
//! ```
//!
//! Today it starts four testkit backends and drives load through a plain tonic client
//! (`Channel::balance_list`), the baseline every towline layer is measured against. Each layer
//! joins the tour as it lands.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::{Channel, Endpoint};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

struct Args {
    calls: u64,
    concurrency: usize,
    seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        calls: 50_000,
        concurrency: 32,
        seconds: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match flag.as_str() {
            "--calls" => args.calls = value("--calls")?,
            "--concurrency" => args.concurrency = value("--concurrency")? as usize,
            "--seconds" => args.seconds = value("--seconds")?,
            other => {
                return Err(format!(
                    "unknown argument {other}; use --calls N, --concurrency N, --seconds N"
                ));
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = parse_args()?;
    let backends = Backend::start_many(4).await?;
    println!("towline tour: {} backends on loopback", backends.len());
    for backend in &backends {
        println!("  {} at {}", backend.id(), backend.addr());
    }

    let endpoints = backends.iter().map(|b| Endpoint::from(b.uri()));
    let client = EchoClient::new(Channel::balance_list(endpoints));

    let bar = ProgressBar::new(args.calls);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:40}] {pos}/{len} calls {per_sec} ({elapsed}, bounded at {msg})",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix("baseline");
    bar.set_message(format!("{}s", args.seconds));
    let progress = bar.clone();

    let payload = Arc::new(vec![0u8; 64]);
    let report = Load::new(args.concurrency)
        .calls(args.calls)
        .duration(Duration::from_secs(args.seconds))
        .on_call(move || progress.inc(1))
        .run(move |i| {
            let mut client = client.clone();
            let request = EchoRequest {
                message: format!("call {i}"),
                payload: payload.to_vec(),
                ..Default::default()
            };
            async move { Ok(client.unary(request).await?.into_inner().backend) }
        })
        .await;
    bar.finish();

    println!();
    println!(
        "plain tonic, balance_list over {} backends:",
        backends.len()
    );
    println!("  {report}");
    for (code, n) in report.failures() {
        println!("  failed with {code}: {n}");
    }
    println!("  traffic share:");
    for backend in &backends {
        let n = report.tally().get(backend.id()).copied().unwrap_or(0);
        let share = 100.0 * n as f64 / report.calls().max(1) as f64;
        println!("    {:<10} {:>7} calls {:>5.1}%", backend.id(), n, share);
    }
    Ok(())
}
