//! Result files: `summary.json` and `metrics.csv`, each written to a temporary file and renamed
//! into place, so no result file is ever left half-written.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::run::{CycleMetrics, Report};
use crate::error::{Error, Result};

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = {
        let mut name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "out".into());
        name.push(format!(".{}.tmp", std::process::id()));
        path.with_file_name(name)
    };
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}

/// The per-cycle metrics as CSV text (header + one row per cycle).
pub fn metrics_csv(report: &Report) -> String {
    metrics_rows_csv(&report.metrics)
}

/// Writes `DIR/metrics.csv` alone (e.g. the cycles completed before a divergence).
pub fn write_metrics(dir: &Path, rows: &[CycleMetrics]) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write_atomic(&dir.join("metrics.csv"), metrics_rows_csv(rows).as_bytes())
}

/// CSV text of metric rows (header + one row per cycle).
pub fn metrics_rows_csv(rows: &[CycleMetrics]) -> String {
    let mut s = String::from(
        "cycle,time,rmse_forecast,spread_forecast,rmse,spread,seconds_forecast,seconds_analysis,ess\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{:.6e},{:.6e},{:.6e},{:.6e},{:.6e},{:.6e},{}",
            r.cycle,
            r.time,
            r.rmse_forecast,
            r.spread_forecast,
            r.rmse,
            r.spread,
            r.seconds_forecast,
            r.seconds_analysis,
            r.ess.map_or(String::new(), |e| format!("{e:.3}"))
        );
    }
    s
}

/// Writes `DIR/summary.json` and `DIR/metrics.csv`, creating `DIR` if needed.
pub fn write_report(dir: &Path, report: &Report) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let summary = serde_json::to_string_pretty(&report.summary)
        .map_err(|e| Error::invalid("summary", e, "internal serialization error"))?;
    write_atomic(&dir.join("metrics.csv"), metrics_csv(report).as_bytes())?;
    write_atomic(&dir.join("summary.json"), summary.as_bytes())
}
