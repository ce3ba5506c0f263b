//! Result files: `config.toml`, `summary.json` and `metrics.csv`, each written to a temporary
//! file and renamed into place, so no result file is ever left half-written; output directories
//! that already hold files are refused unless the caller forces it.

use std::fs;
use std::path::{Path, PathBuf};

use super::config::Config;
use super::report::Report;
use crate::cycle::CycleMetrics;
use crate::error::{Error, Result};

use crate::io::{io_err, write_atomic};

/// The per-cycle metrics as CSV text (header + one row per cycle).
pub fn metrics_csv(report: &Report) -> String {
    metrics_rows_csv(&report.metrics)
}

/// The header line of `metrics.csv`.
const METRICS_HEADER: &str =
    "cycle,time,rmse_forecast,spread_forecast,rmse,spread,seconds_forecast,seconds_analysis,ess\n";

/// One `metrics.csv` line.
fn metrics_row_csv(r: &CycleMetrics) -> String {
    format!(
        "{},{},{:.6e},{:.6e},{:.6e},{:.6e},{:.6e},{:.6e},{}\n",
        r.cycle,
        r.time,
        r.rmse_forecast,
        r.spread_forecast,
        r.rmse,
        r.spread,
        r.seconds_forecast,
        r.seconds_analysis,
        r.ess.map_or(String::new(), |e| format!("{e:.3}"))
    )
}

/// CSV text of metric rows (header + one row per cycle).
pub fn metrics_rows_csv(rows: &[CycleMetrics]) -> String {
    let mut s = String::from(METRICS_HEADER);
    for r in rows {
        s.push_str(&metrics_row_csv(r));
    }
    s
}

/// `DIR/metrics.csv` written as a run goes: the header and the rows so far (a resumed run's
/// earlier cycles) at once, then one line per cycle as it ends, handed to the operating system
/// at once, so `tail -f` follows a long run and a killed run keeps its completed cycles.
/// A resumed run starts the file again from the checkpoint's rows, so no cycle appears twice.
pub struct MetricsStream {
    file: fs::File,
    path: PathBuf,
}

impl MetricsStream {
    /// Starts `DIR/metrics.csv` with `rows` (creating `DIR` if needed).
    pub fn create(dir: &Path, rows: &[CycleMetrics]) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let path = dir.join("metrics.csv");
        write_atomic(&path, metrics_rows_csv(rows).as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        Ok(MetricsStream { file, path })
    }

    /// Appends the line of one finished cycle.
    pub fn push(&mut self, row: &CycleMetrics) -> Result<()> {
        use std::io::Write as _;
        self.file
            .write_all(metrics_row_csv(row).as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| io_err(&self.path, e))
    }
}

/// Writes `DIR/summary.json` and `DIR/metrics.csv`, creating `DIR` if needed.
pub fn write_report(dir: &Path, report: &Report) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let summary = serde_json::to_string_pretty(&report.summary)
        .map_err(|e| Error::invalid("summary", e, "internal serialization error"))?;
    write_atomic(&dir.join("metrics.csv"), metrics_csv(report).as_bytes())?;
    write_atomic(&dir.join("summary.json"), summary.as_bytes())
}

/// True when `dir` is absent or an empty directory.
pub fn is_vacant(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !dir.exists(),
    }
}

/// Makes `dir` ready for a run's files: creates it, and refuses one that already holds files
/// ([`Error::OutputExists`]) unless `force`.
pub fn prepare_dir(dir: &Path, force: bool) -> Result<()> {
    if !force && !is_vacant(dir) {
        return Err(Error::OutputExists {
            path: dir.display().to_string(),
        });
    }
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))
}

/// The first of `base`, `base-2`, `base-3`, … that is absent or empty (for default output
/// directories, so that a repeated run never overwrites an earlier one).
pub fn vacant_dir(base: &Path) -> PathBuf {
    if is_vacant(base) {
        return base.to_path_buf();
    }
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    (2u64..)
        .map(|i| base.with_file_name(format!("{name}-{i}")))
        .find(|p| is_vacant(p))
        .unwrap_or_else(|| base.to_path_buf())
}

/// Writes `DIR/config.toml`: the fully resolved configuration under `name`, re-runnable with
/// `enff run DIR/config.toml`.
pub fn write_config(dir: &Path, name: &str, config: &Config) -> Result<()> {
    let text = super::file::to_toml(
        name,
        "Fully resolved experiment; run it again with: enff run <this file>",
        config,
    )?;
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write_atomic(&dir.join("config.toml"), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_no_file_under_the_final_name_or_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        // The final name is taken by a directory: the rename fails after the bytes were
        // written to the temporary file, which must then be gone.
        let target = dir.path().join("summary.json");
        fs::create_dir(&target).unwrap();
        let e = write_atomic(&target, b"{}").unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("summary.json"), "{e}");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["summary.json".to_string()], "{names:?}");
        assert!(target.is_dir());
        // A folder that cannot be created (its parent is a file) is a typed error too.
        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        let e = prepare_dir(&file.join("out"), false).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        let e = write_atomic(&file.join("metrics.csv"), b"x").unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    #[test]
    fn occupied_directories_are_refused_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        prepare_dir(&out, false).unwrap();
        prepare_dir(&out, false).unwrap(); // still empty
        fs::write(out.join("summary.json"), b"{}").unwrap();
        let e = prepare_dir(&out, false).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        prepare_dir(&out, true).unwrap();
        assert_eq!(vacant_dir(&out), dir.path().join("out-2"));
        fs::create_dir(dir.path().join("out-2")).unwrap();
        assert_eq!(vacant_dir(&out), dir.path().join("out-2"), "empty counts");
    }
}
