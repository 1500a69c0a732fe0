//! `summary`: every scenario's figures in one `target/scenarios/summary.json`, and the tables they
//! printed as `target/scenarios/summary.md` (what `docs/scenarios.md` is copied from).
//!
//! Nothing here chooses figures: the JSON holds each scenario's own document (the one it also
//! writes to `<name>.json`), and the markdown renders the tables and notes it printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::{Printed, Settings, scenarios_dir};

/// What one scenario produced.
pub struct Section {
    pub name: &'static str,
    pub about: &'static str,
    pub took: Duration,
    pub result: SectionResult,
}

pub enum SectionResult {
    Ran {
        figures: serde_json::Value,
        details: Option<serde_json::Value>,
        printed: Vec<Printed>,
    },
    Skipped(String),
}

/// Facts about the machine and the run that are cheap to read, taken when the run starts.
pub struct RunFacts {
    started: std::time::Instant,
    date_utc: String,
    load_average_at_start: Option<String>,
    cores: usize,
    cpu: Option<String>,
    git_commit: Option<String>,
    git_dirty: bool,
}

impl RunFacts {
    pub fn now() -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        RunFacts {
            started: std::time::Instant::now(),
            date_utc: command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_else(
                || {
                    let secs = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    format!("{secs} s after the Unix epoch")
                },
            ),
            load_average_at_start: load_average(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split_once(':'))
                        .map(|(_, model)| model.trim().to_owned())
                }),
            git_commit: command_output(
                "git",
                &[
                    "-C",
                    &repo.to_string_lossy(),
                    "rev-parse",
                    "--short",
                    "HEAD",
                ],
            ),
            git_dirty: command_output(
                "git",
                &["-C", &repo.to_string_lossy(), "status", "--porcelain"],
            )
            .is_some_and(|changes| !changes.is_empty()),
        }
    }
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// A command's trimmed stdout, when it ran and succeeded.
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Writes `summary.json` and `summary.md`; returns their paths.
pub fn write(
    sections: &[Section],
    facts: &RunFacts,
    settings: Settings,
    quick: bool,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = scenarios_dir()?;
    let took = facts.started.elapsed();
    let load_at_end = load_average();
    let command = format!(
        "cargo bench --bench scenarios -- summary{}",
        if quick { " --quick" } else { "" }
    );
    let scenarios: Vec<serde_json::Value> = sections
        .iter()
        .map(|s| {
            let mut entry = serde_json::json!({
                "scenario": s.name,
                "about": s.about,
                "took_s": round1(s.took),
            });
            match &s.result {
                SectionResult::Ran {
                    figures, details, ..
                } => {
                    entry["figures"] = figures.clone();
                    if let Some(details) = details {
                        entry["details"] = details.clone();
                    }
                }
                SectionResult::Skipped(why) => entry["skipped"] = why.as_str().into(),
            }
            entry
        })
        .collect();
    let document = serde_json::json!({
        "command": command,
        "quick": quick,
        "settings": {
            "rounds": settings.rounds,
            "calls": settings.calls,
            "duration_ms": settings.duration.as_millis() as u64,
        },
        "date_utc": facts.date_utc,
        "git_commit": facts.git_commit,
        "git_uncommitted_changes": facts.git_dirty,
        "machine": {
            "cores": facts.cores,
            "cpu": facts.cpu,
            "load_average_at_start": facts.load_average_at_start,
            "load_average_at_end": load_at_end,
        },
        "took_s": round1(took),
        "scenarios": scenarios,
    });
    let json_path = dir.join("summary.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)?)?;

    let mut md = String::from("# towline scenarios\n\n");
    md += &format!(
        "Produced by `{command}` on {}, at git commit {}{}. {} ({} round(s) per variant, each run \
         bounded by {} calls and {} ms). The whole run took {:.0} s.\n\n",
        facts.date_utc,
        facts.git_commit.as_deref().unwrap_or("(unknown)"),
        if facts.git_dirty {
            " with uncommitted changes"
        } else {
            ""
        },
        if quick {
            "A `--quick` run"
        } else {
            "A full run"
        },
        settings.rounds,
        settings.calls,
        settings.duration.as_millis(),
        took.as_secs_f64(),
    );
    md += &format!(
        "Machine: {} cores{}; load average (1, 5, 15 min) {} at the start, {} at the end. \
         Figures vary from run to run by 20–30% on these machines: compare variants within one \
         scenario, not across runs.\n\n",
        facts.cores,
        facts
            .cpu
            .as_deref()
            .map(|cpu| format!(" ({cpu})"))
            .unwrap_or_default(),
        facts.load_average_at_start.as_deref().unwrap_or("?"),
        load_at_end.as_deref().unwrap_or("?"),
    );
    md += "Every scenario's figures are also in `target/scenarios/<name>.json`, and all of them in \
           `target/scenarios/summary.json`. What each one measures is described at the top of \
           its source in `benches/scenarios/`.\n";
    for section in sections {
        md += &format!(
            "\n## {}\n\n{} (took {:.1} s)\n",
            section.name,
            section.about,
            section.took.as_secs_f64()
        );
        match &section.result {
            SectionResult::Skipped(why) => md += &format!("\n**Not run**: {why}.\n"),
            SectionResult::Ran { printed, .. } => {
                for item in printed {
                    match item {
                        Printed::Table { headers, rows } => {
                            md += "\n";
                            md += &markdown_table(headers, rows);
                        }
                        Printed::Note(text) => md += &format!("\n{}\n", escape(text)),
                    }
                }
            }
        }
    }
    let md_path = dir.join("summary.md");
    std::fs::write(&md_path, md)?;
    Ok((json_path, md_path))
}

fn round1(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn escape(cell: &str) -> String {
    cell.replace('|', "\\|")
}

fn markdown_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells.iter().map(|c| escape(c)).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = line(headers);
    out += &format!("|{}\n", "---|".repeat(headers.len()));
    for row in rows {
        out += &line(row);
    }
    out
}
