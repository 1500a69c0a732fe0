//! The end-to-end scenario harness: real testkit backends, bounded load, side-by-side figures.
//!
//! ```text
//! cargo bench --bench scenarios                # every scenario
//! cargo bench --bench scenarios -- overhead    # the scenarios whose name contains "overhead"
//! cargo bench --bench scenarios -- hedging     # p99 with one slow backend, with and without hedging
//! cargo bench --bench scenarios -- scale       # the balancer at 10, 100, 1,000 endpoints; churn
//! cargo bench --bench scenarios -- --quick     # a few seconds each (CI smoke run)
//! cargo bench --bench scenarios -- summary     # every scenario, then summary.json and summary.md
//! ```
//!
//! Each scenario prints a table and writes `target/scenarios/<name>.json`; `summary` also writes
//! `target/scenarios/summary.json` (every scenario's figures and the machine's load) and
//! `summary.md` (the printed tables in markdown, copied to `docs/scenarios.md`).
//! `blackhole` needs root and iproute2, `foreign-kill` the grpc-core and grpc-js servers
//! (`bash tests/peers/install.sh`), and `registry` `etcd` and `etcdctl` (Debian `etcd-server`,
//! `etcd-client`); without them each says so loudly and is skipped (under `CI=true` that is a
//! failure). The machine is noisy:
//! a scenario always runs the variants it compares in one process, interleaved round by round,
//! and reports their ratios.

mod alloc;
mod balance;
mod batching;
mod blackhole;
mod cpu;
mod fault;
mod foreign_kill;
mod hedging;
mod output;
mod overhead;
mod pool;
mod registry;
mod retry_storm;
mod scale;
mod summary;
mod support;
mod trivial;

use std::process::ExitCode;
use std::time::Instant;

use summary::{RunFacts, Section, SectionResult};
use support::{Settings, Skipped};

/// Counts allocations and live heap bytes (`scale`: bytes held per endpoint) over mimalloc
/// (`alloc.rs` says why not glibc's malloc). A relaxed atomic add per allocation, on every
/// variant alike.
#[global_allocator]
static ALLOCATOR: alloc::Counting<mimalloc::MiMalloc> = alloc::Counting(mimalloc::MiMalloc);

/// The argument that runs every scenario and then writes the summary.
const SUMMARY: &str = "summary";

type Run = fn(Settings) -> support::BoxScenario;

const SCENARIOS: &[(&str, &str, Run)] = &[
    (
        "overhead",
        "a bare Channel vs the same Channel under a pass-through tower layer; vs towline's full stack (64 in flight); tonic balance_list vs the full stack over 4 backends: req/s and CPU per call",
        overhead::run,
    ),
    (
        "pool",
        "500 in flight, 100 streams per connection: one Channel vs PoolLayer with 1, 4, 8 connections; connect-per-call vs the pool",
        pool::run,
    ),
    (
        "slow-backend",
        "4 backends, one 20 ms slower: p50/p99 for tonic balance_list and towline round robin, p2c, peak-EWMA",
        balance::slow_backend,
    ),
    (
        "kill-backend",
        "4 backends, one stopped and restarted mid-run: failed calls, time to route around it and back",
        balance::kill_backend,
    ),
    (
        "retry-storm",
        "every backend fails, then recovers: retry amplification with and without a budget",
        retry_storm::run,
    ),
    (
        "batching",
        "Log.Produce one record per call vs BatchLayer at (100 items, 100 ms), (1000 items, 10 ms)",
        batching::run,
    ),
    (
        "hedging",
        "4 backends, one 50 ms slow: p50/p99 under round robin without and with a hedgingPolicy from a service config",
        hedging::run,
    ),
    (
        "blackhole",
        "4 backends in network namespaces, one blackholed mid-run then healed: failed calls, time to route around it, deadlines kept, with and without HTTP/2 keepalive",
        blackhole::run,
    ),
    (
        "foreign-kill",
        "4 grpc-core or 4 grpc-js servers, one SIGKILLed mid-run: failed calls, time to route around it, deadlines kept, for tonic balance_list and towline's defaults with and without retry",
        foreign_kill::run,
    ),
    (
        "registry",
        "4 backends registered in a real etcd on 2 s leases, discovered under load: one crashes, etcd is SIGKILLed and restarted, history churned and compacted",
        registry::run,
    ),
    (
        "scale",
        "the balancer at 10, 100, 1,000 endpoints (round robin, peak-EWMA, ring hash): pick cost, rebuild time, bytes per endpoint; churn of 10% of 100 endpoints per second under load",
        scale::run,
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let summary = args.iter().any(|a| a == SUMMARY);
    // cargo passes `--bench`; every other flag is ours or libtest's, and ignored.
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--") && *a != SUMMARY)
        .map(String::as_str)
        .collect();
    let selected: Vec<_> = SCENARIOS
        .iter()
        .filter(|(name, ..)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .collect();
    if selected.is_empty() {
        eprintln!("no scenario matches {filters:?}; scenarios:");
        for (name, about, _) in SCENARIOS {
            eprintln!("  {name:<12} {about}");
        }
        eprintln!(
            "  {SUMMARY:<12} every scenario, then target/scenarios/summary.json and summary.md"
        );
        return ExitCode::FAILURE;
    }

    let facts = summary.then(RunFacts::now);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let settings = Settings::new(quick);
    let mut sections = Vec::new();
    for &&(name, about, run) in &selected {
        println!(
            "\n== {name}: {about}{}",
            if quick { " (quick)" } else { "" }
        );
        let started = Instant::now();
        let outcome = runtime.block_on(run(settings));
        let took = started.elapsed();
        let printed = support::take_printed();
        let details = support::take_details();
        let result = match outcome {
            Ok(figures) => match support::write_json(name, quick, figures.clone(), details.clone())
            {
                Ok(path) => {
                    println!("wrote {} ({:.1} s)", path.display(), took.as_secs_f64());
                    SectionResult::Ran {
                        figures,
                        details,
                        printed,
                    }
                }
                Err(err) => {
                    eprintln!("{name}: could not write its figures: {err}");
                    return ExitCode::FAILURE;
                }
            },
            Err(err) => match err.downcast::<Skipped>() {
                Ok(skipped) => {
                    println!("{name}: {skipped}; no figures written");
                    SectionResult::Skipped(skipped.0)
                }
                Err(err) => {
                    eprintln!("{name} failed: {err}");
                    return ExitCode::FAILURE;
                }
            },
        };
        sections.push(Section {
            name,
            about,
            took,
            result,
        });
    }
    if let Some(facts) = facts {
        match summary::write(&sections, &facts, settings, quick) {
            Ok((json, md)) => println!("\nwrote {} and {}", json.display(), md.display()),
            Err(err) => {
                eprintln!("summary: could not write it: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
