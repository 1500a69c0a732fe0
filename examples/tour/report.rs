//! The per-phase table and the JSON figures.

use std::path::Path;
use std::time::Duration;

use towline::BoxError;
use towline::testkit::{Backend, text_table};

use crate::timeline::Bucket;
use crate::{
    Args, BATCH_IN_FLIGHT, BATCH_LINGER, BATCH_MAX_ITEMS, BUCKET, Phase, PhaseResult, millis,
};

pub(crate) fn print_table(results: &[PhaseResult], backends: &[Backend]) {
    let mut headers = vec![
        "phase",
        "req/s",
        "p50 ms",
        "p99 ms",
        "failed",
        "retries",
        "refused",
        "ejections",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    headers.extend(backends.iter().map(|b| b.id().to_owned()));
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let mut row = vec![
                match r.phase {
                    Phase::Batching => format!("{}*", r.phase.name()),
                    _ => r.phase.name().to_owned(),
                },
                format!("{:.0}", r.report.throughput()),
                millis(r.report.p50()),
                millis(r.report.p99()),
                r.report.failed().to_string(),
                r.counts.retries.to_string(),
                r.counts.retries_refused.to_string(),
                r.counts.ejections.to_string(),
            ];
            row.extend(backends.iter().map(|b| format!("{:.1}%", r.share(b.id()))));
            row
        })
        .collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    print!("{}", text_table(&headers, &rows));
    println!(
        "\nreq/s, p50 and p99 are per call as the caller saw it (retries included); failed: calls that \
         returned an error;\nretries: retries the RetryLayer made (transparent ones not included); \
         refused: retries the budget refused;\nejections: outlier ejections; backend columns: share \
         of the successful calls each backend answered."
    );
    if let Some(batching) = results.iter().find(|r| r.phase == Phase::Batching) {
        let records = batching.report.calls();
        let batches = batching.counts.batches.max(1);
        println!(
            "* batching counts records, not calls: req/s is records/s, p50 and p99 are per record \
             (from its call to its own result,\n  linger {} ms included), failed counts records, \
             retries count Produce RPCs; {} records went out in {} Produce RPCs\n  ({:.1} records \
             each, up to {BATCH_MAX_ITEMS}), {} records outstanding.",
            BATCH_LINGER.as_millis(),
            records,
            batching.counts.batches,
            records as f64 / batches as f64,
            BATCH_MAX_ITEMS * BATCH_IN_FLIGHT,
        );
    }
}

pub(crate) fn write_json(
    path: &Path,
    args: &Args,
    results: &[PhaseResult],
    buckets: &[Bucket],
    backend_ids: &[String],
) -> Result<(), BoxError> {
    let micros = |d: Duration| d.as_micros() as u64;
    let phases: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let share: serde_json::Map<String, serde_json::Value> = backend_ids
                .iter()
                .map(|id| (id.clone(), serde_json::json!(r.share(id) / 100.0)))
                .collect();
            let endpoints: serde_json::Map<String, serde_json::Value> = backend_ids
                .iter()
                .zip(&r.endpoints)
                .map(|(id, (state, ejections))| {
                    let figures =
                        serde_json::json!({ "state": state.as_str(), "ejections": ejections });
                    (id.clone(), figures)
                })
                .collect();
            serde_json::json!({
                "phase": r.phase.name(),
                "about": r.phase.about(),
                "unit": if r.phase == Phase::Batching { "record" } else { "call" },
                "start_s": r.start,
                "end_s": r.end,
                "calls": r.report.calls(),
                "per_second": r.report.throughput(),
                "p50_us": micros(r.report.p50()),
                "p99_us": micros(r.report.p99()),
                "failed": r.report.failed(),
                "failures": r.report.failures(),
                "retries": r.counts.retries,
                "transparent_retries": r.counts.transparent_retries,
                "retries_refused": r.counts.retries_refused,
                "ejections": r.counts.ejections,
                "health_transitions": r.counts.health_transitions,
                "rpcs": r.counts.rpcs,
                "batches": r.counts.batches,
                "share": share,
                "endpoints_at_end": endpoints,
            })
        })
        .collect();
    let series: Vec<serde_json::Value> = buckets
        .iter()
        .map(|k| {
            let per_backend: serde_json::Map<String, serde_json::Value> = backend_ids
                .iter()
                .zip(&k.backends)
                .map(|(id, (calls, p99))| {
                    let p99 = p99.map(micros);
                    (
                        id.clone(),
                        serde_json::json!({ "calls": calls, "p99_us": p99 }),
                    )
                })
                .collect();
            serde_json::json!({
                "start_s": k.start,
                "calls": k.calls,
                "failed": k.failed,
                "p99_us": micros(k.p99),
                "backends": per_backend,
            })
        })
        .collect();
    let document = serde_json::json!({
        "strategy": args.strategy.as_str(),
        "discovery": args.discovery.as_str(),
        "concurrency": args.concurrency,
        "phase_seconds": args.phase.as_secs_f64(),
        "backends": backend_ids,
        "phases": phases,
        "timeline": { "bucket_ms": BUCKET.as_millis() as u64, "buckets": series },
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&document)?)?;
    Ok(())
}
