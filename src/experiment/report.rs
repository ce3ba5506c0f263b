//! What a run reports: its summary (`summary.json`) and the per-cycle metrics.

use serde::Serialize;

use super::config::Config;
use crate::cycle::{CycleMetrics, DivergenceEvent};

/// What identifies a run in its [`Summary`], besides its configuration and metrics.
pub(crate) struct RunIdentity {
    pub preset: String,
    pub filter: String,
    pub backend: String,
    pub device: String,
    pub model: String,
    pub observation: String,
    pub n: usize,
    pub d: usize,
    pub m: usize,
    pub seed: u64,
    pub expected_rmse: Option<(f64, f64)>,
}

/// Seconds a run spent: in all, in forecasts and in analyses.
pub(crate) struct RunTimes {
    pub total: f64,
    pub forecast: f64,
    pub analysis: f64,
}

impl Summary {
    /// The summary of a finished run (single-process or sharded): the time means over the
    /// cycles after the burn-in, leaving out the cycles named in `divergences` (NaN when no
    /// cycle is left).
    pub(crate) fn of_run(
        id: RunIdentity,
        cfg: &Config,
        metrics: &[CycleMetrics],
        times: RunTimes,
        divergences: Vec<DivergenceEvent>,
        resumed_from: Option<usize>,
    ) -> Summary {
        let bad: std::collections::HashSet<usize> = divergences.iter().map(|e| e.cycle).collect();
        let kept: Vec<&CycleMetrics> = metrics[cfg.experiment.burn_in.min(metrics.len())..]
            .iter()
            .filter(|r| !bad.contains(&r.cycle))
            .collect();
        let mean = |f: fn(&CycleMetrics) -> f64| {
            kept.iter().map(|r| f(r)).sum::<f64>() / kept.len() as f64
        };
        Summary {
            preset: id.preset,
            filter: id.filter,
            backend: id.backend,
            device: id.device,
            model: id.model,
            observation: id.observation,
            n: id.n,
            d: id.d,
            m: id.m,
            cycles: cfg.experiment.cycles,
            burn_in: cfg.experiment.burn_in,
            flow_steps: cfg.filter.flow_steps,
            sigma_min: cfg.filter.sigma_min,
            guidance_scale: cfg.filter.guidance_scale,
            seed: id.seed,
            rmse_mean: mean(|r| r.rmse),
            spread_mean: mean(|r| r.spread),
            rmse_forecast_mean: mean(|r| r.rmse_forecast),
            rmse_last: metrics.last().map_or(f64::NAN, |r| r.rmse),
            expected_rmse: id.expected_rmse,
            seconds_total: times.total,
            seconds_per_cycle: times.total / cfg.experiment.cycles.max(1) as f64,
            seconds_forecast: times.forecast,
            seconds_analysis: times.analysis,
            divergences,
            resumed_from,
        }
    }
}

/// The run summary written to `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Preset name (or `custom`).
    pub preset: String,
    /// Filter name.
    pub filter: String,
    /// Backend name.
    pub backend: String,
    /// Backend description (threads, adapter).
    pub device: String,
    /// Model description.
    pub model: String,
    /// Observation operator.
    pub observation: String,
    /// Ensemble size.
    pub n: usize,
    /// State dimension.
    pub d: usize,
    /// Observation dimension.
    pub m: usize,
    /// Assimilation cycles run.
    pub cycles: usize,
    /// Cycles excluded from the means.
    pub burn_in: usize,
    /// EnFF flow steps.
    pub flow_steps: usize,
    /// EnFF σ_min.
    pub sigma_min: f32,
    /// EnFF λ.
    pub guidance_scale: f32,
    /// Seed of every stream.
    pub seed: u64,
    /// Mean analysis RMSE over the cycles after burn-in.
    pub rmse_mean: f64,
    /// Mean analysis spread over the cycles after burn-in.
    pub spread_mean: f64,
    /// Mean forecast RMSE over the cycles after burn-in.
    pub rmse_forecast_mean: f64,
    /// Analysis RMSE of the last cycle.
    pub rmse_last: f64,
    /// The preset's expected band for `rmse_mean`, if any.
    pub expected_rmse: Option<(f64, f64)>,
    /// Total wall time of the cycle loop (including truth and observations), seconds.
    pub seconds_total: f64,
    /// `seconds_total / cycles`.
    pub seconds_per_cycle: f64,
    /// Total ensemble-forecast time, seconds.
    pub seconds_forecast: f64,
    /// Total analysis time, seconds.
    pub seconds_analysis: f64,
    /// Cycles where a non-finite value was met and the run went on
    /// (`--on-divergence record`); their metrics are left out of the means.
    pub divergences: Vec<DivergenceEvent>,
    /// The cycle this run was resumed after, if it continued a checkpoint.
    pub resumed_from: Option<usize>,
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct Report {
    /// The summary.
    pub summary: Summary,
    /// One row per cycle.
    pub metrics: Vec<CycleMetrics>,
}
