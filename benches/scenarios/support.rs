//! What every scenario shares: run sizes, the table printer, the JSON writer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use towline::BoxError;
use towline::testkit::LoadReport;

pub use crate::output::{scenarios_dir, write_json};

pub type BoxScenario = Pin<Box<dyn Future<Output = Result<serde_json::Value, BoxError>>>>;

/// The bounds a gRPC client service needs to drive an `EchoClient`.
pub trait Stack:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<BoxError>,
        ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                          + Send
                          + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Stack for S where
    S: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<BoxError>,
            ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                              + Send
                              + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// How big each measured run is. `--quick` keeps every scenario to a few seconds.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Interleaved rounds per variant.
    pub rounds: usize,
    /// Bounds of one measured run.
    pub calls: u64,
    pub duration: Duration,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Settings {
                rounds: 1,
                calls: 3_000,
                duration: Duration::from_millis(700),
            }
        } else {
            Settings {
                rounds: 3,
                calls: 100_000,
                duration: Duration::from_secs(4),
            }
        }
    }
}

/// The figures of one measured run.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub calls: u64,
    pub failed: u64,
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
}

impl<T: Ord> From<&LoadReport<T>> for Figures {
    fn from(report: &LoadReport<T>) -> Self {
        Figures {
            calls: report.calls(),
            failed: report.failed(),
            rps: report.throughput(),
            p50: report.p50(),
            p99: report.p99(),
        }
    }
}

impl Figures {
    /// The median of each figure across rounds (robust to one noisy round).
    pub fn median(rounds: &[Figures]) -> Figures {
        fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
            v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
            v[v.len() / 2]
        }
        Figures {
            calls: rounds.iter().map(|f| f.calls).sum(),
            failed: rounds.iter().map(|f| f.failed).sum(),
            rps: mid(rounds.iter().map(|f| f.rps).collect()),
            p50: mid(rounds.iter().map(|f| f.p50).collect()),
            p99: mid(rounds.iter().map(|f| f.p99).collect()),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls,
            "failed": self.failed,
            "rps": self.rps.round(),
            "p50_us": self.p50.as_micros() as u64,
            "p99_us": self.p99.as_micros() as u64,
        })
    }
}

/// What a scenario printed, kept so that `summary` can render the same tables as markdown
/// instead of choosing its figures a second time.
#[derive(Debug, Clone)]
pub enum Printed {
    Table {
        headers: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    Note(String),
}

static PRINTED: Mutex<Vec<Printed>> = Mutex::new(Vec::new());

fn keep(printed: Printed) {
    PRINTED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(printed);
}

/// Everything printed through [`print_table`] and [`note`] since the last call.
pub fn take_printed() -> Vec<Printed> {
    std::mem::take(&mut *PRINTED.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Prints a line under a scenario's table (its setup, what the figures mean).
pub fn note(text: impl Into<String>) {
    let text = text.into();
    println!("  {text}");
    keep(Printed::Note(text));
}

static DETAILS: Mutex<Option<serde_json::Value>> = Mutex::new(None);

/// Sets the scenario's `details`: figures beside its contract, written next to `figures` in its
/// JSON document (and in the summary's).
pub fn details(value: serde_json::Value) {
    *DETAILS.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
}

/// The details set through [`details`] since the last call.
pub fn take_details() -> Option<serde_json::Value> {
    DETAILS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// A scenario that could not run here (missing privileges); `main` reports it and writes no
/// figures for it.
#[derive(Debug)]
pub struct Skipped(pub String);

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped: {}", self.0)
    }
}

impl std::error::Error for Skipped {}

/// Prints a text table (see `testkit::text_table`) and keeps it for the summary.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    keep(Printed::Table {
        headers: headers.iter().map(|h| h.to_string()).collect(),
        rows: rows.to_vec(),
    });
    for line in towline::testkit::text_table(headers, rows).lines() {
        println!("  {line}");
    }
}

pub fn micros(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}
