//! `enff compare`: several filters on identical truth, observations and initial ensemble, and
//! the tables that put them side by side (`compare.md`, `compare.csv`, JSON, the terminal).

use std::path::Path;

use super::report::Summary;
use super::run::Experiment;
use super::seeds::SeedStats;
use crate::error::Result;
use crate::io::write_atomic;

/// One filter's line of a comparison: its seeds' summaries, or the error that stopped it.
#[derive(Clone, Debug)]
pub struct CompareRow {
    /// The filter's name.
    pub filter: String,
    /// Its guidance (`local`, `covariance`, …) for EnFF; `-` for the other filters.
    pub guidance: String,
    /// The summaries of the seeds that ran.
    pub summaries: Vec<Summary>,
    /// The first error, if a seed failed (the row reports it instead of numbers).
    pub error: Option<String>,
}

impl CompareRow {
    /// The row of `experiment` (whose filter names the row) before any seed ran.
    pub fn new(experiment: &Experiment) -> CompareRow {
        let cfg = experiment.config();
        let guidance = if cfg.filter_kind().is_ok_and(|k| k.is_enff()) {
            cfg.filter.guidance.name().to_string()
        } else {
            "-".into()
        };
        CompareRow {
            filter: cfg.filter.kind.clone(),
            guidance,
            summaries: Vec::new(),
            error: None,
        }
    }
}

/// A comparison rendered for the terminal, Markdown, CSV and JSON.
#[derive(Clone, Debug)]
pub struct CompareTables {
    /// The terminal table.
    pub text: String,
    /// `compare.md`.
    pub markdown: String,
    /// `compare.csv`.
    pub csv: String,
    /// One object per filter.
    pub json: serde_json::Value,
}

impl CompareTables {
    /// The tables of `rows`, for the comparison `name` of `base` (the first row's experiment:
    /// cycles, burn-in and seed) over `seeds` seeds.
    pub fn build(name: &str, base: &Experiment, rows: &[CompareRow], seeds: usize) -> Self {
        let cfg = base.config();
        let mut markdown = String::from(
            "| filter | guidance | rmse_mean | spread_mean | s/analysis | s/cycle |\n\
             |---|---|---|---|---|---|\n",
        );
        let mut csv = String::from(
            "filter,guidance,rmse_mean,spread_mean,seconds_per_analysis,seconds_per_cycle,seeds,\
             rmse_std,spread_std,error\n",
        );
        let mut text = format!(
            "enff compare: {} ({} cycles, burn-in {}, seed {}{})\n",
            name,
            cfg.experiment.cycles,
            cfg.experiment.burn_in,
            cfg.experiment.seed,
            if seeds > 1 {
                format!(", {seeds} seeds: mean ± std")
            } else {
                String::new()
            }
        );
        text.push_str(&format!(
            "{:<10} {:<10} {:>18} {:>18} {:>12} {:>10}\n",
            "filter", "guidance", "rmse_mean", "spread_mean", "s/analysis", "s/cycle"
        ));
        let mut json = Vec::new();
        for row in rows {
            let (f, g) = (&row.filter, &row.guidance);
            if let Some(err) = &row.error {
                let short = err.lines().next().unwrap_or("").replace(',', ";");
                text.push_str(&format!("{f:<10} {g:<10} failed: {short}\n"));
                markdown.push_str(&format!("| {f} | {g} | failed: {short} | | | |\n"));
                csv.push_str(&format!("{f},{g},,,,,{},,,{short}\n", row.summaries.len()));
                json.push(serde_json::json!({ "filter": f, "guidance": g, "error": err }));
                continue;
            }
            let stats = SeedStats::of(&row.summaries);
            let mean_of = |g: fn(&Summary) -> f64| {
                super::sweep::mean_std(&row.summaries.iter().map(g).collect::<Vec<f64>>()).0
            };
            let per = mean_of(|s| s.seconds_analysis / s.cycles as f64);
            let per_cycle = mean_of(|s| s.seconds_per_cycle);
            let pm = |(m, sd): (f64, f64)| {
                if seeds > 1 {
                    format!("{m:.4} ± {sd:.4}")
                } else {
                    format!("{m:.4}")
                }
            };
            text.push_str(&format!(
                "{f:<10} {g:<10} {:>18} {:>18} {per:>12.5} {per_cycle:>10.5}\n",
                pm(stats.rmse),
                pm(stats.spread)
            ));
            markdown.push_str(&format!(
                "| {f} | {g} | {} | {} | {per:.5} | {per_cycle:.5} |\n",
                pm(stats.rmse),
                pm(stats.spread)
            ));
            csv.push_str(&format!(
                "{f},{g},{},{},{per},{per_cycle},{},{},{},\n",
                stats.rmse.0,
                stats.spread.0,
                row.summaries.len(),
                stats.rmse.1,
                stats.spread.1
            ));
            json.push(serde_json::json!({
                "filter": f,
                "guidance": g,
                "seeds": row.summaries.len(),
                "rmse_mean": stats.rmse.0,
                "rmse_std": stats.rmse.1,
                "spread_mean": stats.spread.0,
                "spread_std": stats.spread.1,
                "seconds_per_analysis": per,
                "seconds_per_cycle": per_cycle,
            }));
        }
        CompareTables {
            text,
            markdown,
            csv,
            json: serde_json::Value::Array(json),
        }
    }

    /// Writes `DIR/compare.csv` and `DIR/compare.md`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join("compare.csv"), self.csv.as_bytes())?;
        write_atomic(&dir.join("compare.md"), self.markdown.as_bytes())
    }
}
