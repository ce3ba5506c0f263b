//! Several seeds of one experiment: the experiment with its seed advanced, and the mean ± sample
//! standard deviation of their summaries (`seeds.csv`, the aggregate `summary.json`).

use std::path::Path;

use super::report::Summary;
use super::run::Experiment;
use super::sweep::{mean_std, seeds_csv};
use crate::error::Result;
use crate::io::write_atomic;

/// `experiment` with its seed advanced by `k` (seeds `seed, seed + 1, …`).
pub fn with_seed(experiment: &Experiment, k: usize) -> Result<Experiment> {
    let mut config = experiment.config().clone();
    config.experiment.seed = config.experiment.seed.wrapping_add(k as u64);
    Experiment::new(experiment.name(), config, experiment.expected_rmse())
}

/// Mean ± sample standard deviation of the summaries of several seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedStats {
    /// `rmse_mean` over the seeds: (mean, sample std).
    pub rmse: (f64, f64),
    /// `spread_mean` over the seeds: (mean, sample std).
    pub spread: (f64, f64),
}

impl SeedStats {
    /// The statistics of `summaries`.
    pub fn of(summaries: &[Summary]) -> SeedStats {
        let col = |g: fn(&Summary) -> f64| mean_std(&summaries.iter().map(g).collect::<Vec<_>>());
        SeedStats {
            rmse: col(|s| s.rmse_mean),
            spread: col(|s| s.spread_mean),
        }
    }
}

/// The aggregate of the seed runs of `experiment` as JSON (written as `summary.json`).
pub fn aggregate_json(experiment: &Experiment, summaries: &[Summary]) -> serde_json::Value {
    let stats = SeedStats::of(summaries);
    serde_json::json!({
        "preset": experiment.name(),
        "filter": experiment.config().filter.kind,
        "seeds": summaries.iter().map(|s| s.seed).collect::<Vec<_>>(),
        "rmse_mean": { "mean": stats.rmse.0, "std": stats.rmse.1 },
        "spread_mean": { "mean": stats.spread.0, "std": stats.spread.1 },
        "runs": summaries,
    })
}

/// Writes `DIR/seeds.csv` and the aggregate `DIR/summary.json`; returns the JSON text.
pub fn write_seed_results(
    dir: &Path,
    experiment: &Experiment,
    summaries: &[Summary],
) -> Result<String> {
    let text = serde_json::to_string_pretty(&aggregate_json(experiment, summaries))
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    write_atomic(&dir.join("seeds.csv"), seeds_csv(summaries).as_bytes())?;
    write_atomic(&dir.join("summary.json"), text.as_bytes())?;
    Ok(text)
}
