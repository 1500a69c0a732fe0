//! Where the benches write their figures: `target/scenarios/<name>.json`, one shape for all
//! (`scenario`, `quick`, `figures`, and `details` when there are any). Shared by the scenario
//! harness and `benches/layers.rs`.

use std::path::PathBuf;

/// `target/scenarios` (under `CARGO_TARGET_DIR` when set), created if missing.
pub fn scenarios_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("scenarios");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `target/scenarios/<name>.json`: `figures`, and `details` when the scenario set any.
pub fn write_json(
    name: &str,
    quick: bool,
    figures: serde_json::Value,
    details: Option<serde_json::Value>,
) -> std::io::Result<PathBuf> {
    let path = scenarios_dir()?.join(format!("{name}.json"));
    let mut document = serde_json::json!({
        "scenario": name,
        "quick": quick,
        "figures": figures,
    });
    if let Some(details) = details {
        document["details"] = details;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&document)?)?;
    Ok(path)
}

/// `x` to two decimals, as figures are written.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
