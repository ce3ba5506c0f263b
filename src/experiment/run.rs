//! The one time loop of enff: truth, observations, forecast → analysis → metrics.

use std::time::Instant;

use serde::Serialize;

use super::config::{Config, InitialMean};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::filter::{Enff, Filter, Observation};
use crate::model::System;
use crate::observe::ObservationOperator;
use crate::rng::{self, NoiseKey, Stream};

/// Metrics of one assimilation cycle (after the analysis unless marked forecast).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CycleMetrics {
    /// Cycle number, 1-based.
    pub cycle: usize,
    /// Model time of the observation.
    pub time: f64,
    /// RMSE of the forecast mean against the truth.
    pub rmse_forecast: f64,
    /// Spread of the forecast.
    pub spread_forecast: f64,
    /// RMSE of the analysis mean against the truth.
    pub rmse: f64,
    /// Spread of the analysis.
    pub spread: f64,
    /// Wall time of the ensemble forecast, seconds.
    pub seconds_forecast: f64,
    /// Wall time of the analysis, seconds.
    pub seconds_analysis: f64,
    /// Effective sample size of a weighting filter (particle filter), else `None`.
    pub ess: Option<f64>,
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
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct Report {
    /// The summary.
    pub summary: Summary,
    /// One row per cycle.
    pub metrics: Vec<CycleMetrics>,
}

/// Device memory a run needs (see [`Experiment::memory_estimate`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Total bytes.
    pub total: u64,
    /// Bytes by buffer.
    pub parts: Vec<(String, u64)>,
    /// Bytes each additional member costs.
    pub per_member: u64,
}

/// Builds the filter named in the configuration for backend `B` and forecast `model`.
pub fn build_filter<B: Backend + 'static>(
    config: &Config,
    model: &crate::model::Model,
) -> Result<Box<dyn Filter<B>>> {
    let f = &config.filter;
    let seed = config.experiment.seed;
    Ok(match f.kind.as_str() {
        "enff-f2p" | "enff-ot" => {
            Box::new(Enff::<B>::new(config.enff_config()?)?.with_geometry(model.geometry()))
        }
        "ensf" => Box::new(crate::filter::Ensf::<B>::new(config.ensf_config())?),
        "etkf" => Box::new(crate::filter::Etkf::<B>::new(f.inflation)?),
        "letkf" => Box::new(crate::filter::Letkf::<B>::new(f.loc_radius, f.inflation)?),
        "enkf" => Box::new(crate::filter::EnkfPo::<B>::new(f.inflation, seed)?),
        "bpf" => Box::new(crate::filter::ParticleFilter::<B>::new(
            f.resampling,
            f.jitter,
            f.inflation,
            seed,
        )?),
        "kf" => Box::new(crate::filter::KalmanFilter::new(
            model,
            config.observe.obs_every,
            config.ensemble.init_std,
        )?),
        other => {
            return Err(Error::UnknownFilter {
                name: other.to_string(),
                known: super::config::FILTERS.join(", "),
            })
        }
    })
}

/// A validated twin experiment.
#[derive(Clone, Debug)]
pub struct Experiment {
    name: String,
    config: Config,
    expected_rmse: Option<(f64, f64)>,
}

impl Experiment {
    /// A validated experiment; `name` is the preset it came from (or `custom`).
    pub fn new(name: &str, config: Config, expected_rmse: Option<(f64, f64)>) -> Result<Self> {
        config.validate()?;
        Ok(Experiment {
            name: name.to_string(),
            config,
            expected_rmse,
        })
    }

    /// The experiment built from a preset.
    pub fn from_preset(name: &str) -> Result<Self> {
        let p = super::preset(name)?;
        Experiment::new(p.name, p.config, Some(p.expected_rmse))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The preset name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device memory the run needs, by buffer, in bytes (the GPU backend's layout: the CPU
    /// needs the same minus the Runge–Kutta stage buffers, which it keeps per thread).
    pub fn memory_estimate(&self) -> MemoryEstimate {
        let cfg = &self.config;
        let (n, d) = (cfg.ensemble.n as u64, cfg.state_dim() as u64);
        let m = self
            .config
            .observation_operator()
            .and_then(|op| op.obs_dim(d as usize))
            .unwrap_or(d as usize) as u64;
        let nd = 4 * n * d;
        let mut parts = vec![
            ("ensemble".to_string(), nd),
            ("flow state".to_string(), nd),
            ("truth, observation".to_string(), 4 * (d + 2 * m)),
            ("weights, pairwise partial sums".to_string(), {
                // As the GPU splits the distances: tiles of 32 (n ≤ 32) or 64 pairs, about
                // 2048 workgroups, slabs of at least 32 components.
                let tile = if n > 32 { 64 } else { 32 };
                let tiles = n.div_ceil(tile).pow(2);
                let slabs = 2048u64.div_ceil(tiles).clamp(1, d.div_ceil(32).max(1));
                4 * n * n * (slabs + 1)
            }),
        ];
        // Only the Runge–Kutta models keep four stage buffers on the device.
        if matches!(
            cfg.model.system,
            super::config::SystemKind::Lorenz63 | super::config::SystemKind::Lorenz96
        ) {
            parts.push(("model stages (4)".to_string(), 4 * nd));
        }
        if cfg.filter.kind == "enff-f2p" {
            parts.push(("previous analysis".to_string(), nd));
        }
        if cfg.filter.integrator == crate::flow::Integrator::Heun {
            parts.push(("Heun predictor and velocity".to_string(), 2 * nd));
        }
        let per_member = parts
            .iter()
            .filter(|p| p.1 % nd.max(1) == 0 && p.1 >= nd)
            .map(|p| p.1)
            .sum::<u64>()
            / n.max(1);
        MemoryEstimate {
            total: parts.iter().map(|p| p.1).sum(),
            parts,
            per_member,
        }
    }

    /// Runs the experiment on `backend`, calling `on_cycle` after every cycle.
    pub fn run<B: Backend + 'static>(
        &self,
        backend: &B,
        on_cycle: impl FnMut(&CycleMetrics),
    ) -> Result<Report> {
        self.run_inner(backend, on_cycle).map_err(|e| match e {
            Error::TooLarge { detail } => {
                let est = self.memory_estimate();
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                Error::TooLarge {
                    detail: format!(
                        "{detail}. This run (n = {}, d = {}) needs about {:.2} GiB on the {} \
                         backend ({:.3} GiB per member): reduce ensemble.n or model.d",
                        self.config.ensemble.n,
                        self.config.state_dim(),
                        gib(est.total),
                        backend.name(),
                        gib(est.per_member)
                    ),
                }
            }
            other => other,
        })
    }

    fn run_inner<B: Backend + 'static>(
        &self,
        backend: &B,
        mut on_cycle: impl FnMut(&CycleMetrics),
    ) -> Result<Report> {
        let cfg = &self.config;
        let seed = cfg.experiment.seed;
        let theta = rng::uniform(&NoiseKey::new(seed, Stream::Truth, 0).with_step(1), 0, 0)
            * std::f64::consts::TAU;
        let model = cfg.model_with_theta(theta)?;
        let op = cfg.observation_operator()?;
        let (n, d) = (cfg.ensemble.n, model.dim());
        let m = op.obs_dim(d)?;
        let obs_every = cfg.observe.obs_every;
        let mut filter = build_filter::<B>(cfg, &model)?;
        let started = Instant::now();

        // Truth: initial condition, then spin-up to the first observation time.
        let mut truth = backend.zeros(1, d)?;
        let truth_key = NoiseKey::new(seed, Stream::Truth, 0);
        match &model.system {
            System::Rotation2d(_) => {
                backend.write(&mut truth, &[cfg.experiment.truth_init_mean, 0.0])?;
            }
            // ENFF_SPEC §8.4: the reference field plus N(0, truth_init_std²) noise, then spin-up.
            System::KuramotoSivashinsky(ks) => {
                let mean = backend.upload(1, d, &ks.reference_initial_condition()?)?;
                backend.fill_normal(
                    &mut truth,
                    truth_key,
                    Some(&mean),
                    cfg.experiment.truth_init_std,
                )?;
            }
            // ENFF_SPEC §8.5: a projected Gaussian-process velocity field of std truth_init_std.
            System::NavierStokes2d(ns) => {
                let mut white = vec![0.0f32; 2 * ns.n() * ns.n()];
                rng::fill_normal_row(&truth_key, 0, &mut white);
                let x0 = ns.gaussian_process_initial_condition(
                    &white,
                    crate::model::ns::GP_LENGTH_SCALE,
                    cfg.experiment.truth_init_std,
                )?;
                backend.write(&mut truth, &x0)?;
            }
            _ => {
                let mean = backend.upload(1, d, &vec![cfg.experiment.truth_init_mean; d])?;
                backend.fill_normal(
                    &mut truth,
                    truth_key,
                    Some(&mean),
                    cfg.experiment.truth_init_std,
                )?;
            }
        }
        backend.advance(&model, &mut truth, cfg.experiment.spinup)?;
        backend
            .check_finite(&truth, "truth after spin-up")
            .map_err(|e| Error::Diverged {
                cycle: 0,
                stage: "truth spin-up".into(),
                detail: e.to_string(),
            })?;

        // Initial ensemble around the truth at the first observation time, or around zero.
        let mut ensemble = backend.zeros(n, d)?;
        let centre = match cfg.ensemble.init_mean {
            InitialMean::Truth => Some(&truth),
            InitialMean::Zero => None,
        };
        backend.fill_normal(
            &mut ensemble,
            NoiseKey::new(seed, Stream::InitialEnsemble, 0),
            centre,
            cfg.ensemble.init_std,
        )?;
        let mut previous = if filter.needs_previous_analysis() {
            Some(backend.zeros(n, d)?)
        } else {
            None
        };
        let mut hx = backend.zeros(1, m)?;
        let mut y = backend.zeros(1, m)?;

        let mut metrics = Vec::with_capacity(cfg.experiment.cycles);
        let (mut total_forecast, mut total_analysis) = (0.0f64, 0.0f64);
        for k in 0..cfg.experiment.cycles {
            let cycle = k + 1;
            let diverged = |stage: &str, e: Error| Error::Diverged {
                cycle,
                stage: stage.to_string(),
                detail: e.to_string(),
            };
            // Forecast (none on the first cycle: the ensemble starts at the first obs time).
            let t_forecast = Instant::now();
            if let Some(p) = previous.as_mut() {
                backend.copy(&ensemble, p)?;
            }
            if k > 0 {
                backend.advance(&model, &mut ensemble, obs_every)?;
                // Wait for queued device work so the forecast time is the real one.
                backend.sync()?;
            }
            let seconds_forecast = t_forecast.elapsed().as_secs_f64();
            if k > 0 {
                backend.advance(&model, &mut truth, obs_every)?;
            }
            let fc = backend.ensemble_stats(&ensemble, &truth)?;
            if !(fc.rmse.is_finite() && fc.spread.is_finite()) {
                let e = backend
                    .check_finite(&ensemble, "forecast ensemble")
                    .err()
                    .unwrap_or(Error::Gpu("non-finite forecast metrics".into()));
                return Err(diverged("forecast", e));
            }

            // Observation y = h(x_true) + σ_y η.
            backend.observe(&op, &truth, &mut hx)?;
            backend.fill_normal(
                &mut y,
                NoiseKey::new(seed, Stream::Observation, cycle as u32),
                Some(&hx),
                cfg.observe.noise_std,
            )?;

            // Analysis.
            let t_analysis = Instant::now();
            let obs = Observation {
                y: &y,
                operator: &op,
                noise_std: cfg.observe.noise_std,
            };
            filter
                .analyse(
                    backend,
                    &mut ensemble,
                    previous.as_ref(),
                    &obs,
                    cycle as u32,
                )
                .map_err(|e| match e {
                    Error::NonFinite { .. } => diverged("analysis", e),
                    other => other,
                })?;
            let an = backend.ensemble_stats(&ensemble, &truth)?;
            let seconds_analysis = t_analysis.elapsed().as_secs_f64();
            if !(an.rmse.is_finite() && an.spread.is_finite()) {
                let e = backend
                    .check_finite(&ensemble, "analysis ensemble")
                    .err()
                    .unwrap_or(Error::Gpu("non-finite analysis metrics".into()));
                return Err(diverged("analysis", e));
            }
            total_forecast += seconds_forecast;
            total_analysis += seconds_analysis;
            let row = CycleMetrics {
                cycle,
                time: (cfg.experiment.spinup + k * obs_every) as f64 * model.dt as f64,
                rmse_forecast: fc.rmse,
                spread_forecast: fc.spread,
                rmse: an.rmse,
                spread: an.spread,
                seconds_forecast,
                seconds_analysis,
                ess: filter.effective_sample_size(),
            };
            on_cycle(&row);
            metrics.push(row);
        }
        let seconds_total = started.elapsed().as_secs_f64();
        let kept = &metrics[cfg.experiment.burn_in..];
        let mean =
            |f: fn(&CycleMetrics) -> f64| kept.iter().map(f).sum::<f64>() / kept.len() as f64;
        let summary = Summary {
            preset: self.name.clone(),
            filter: filter.name(),
            backend: backend.name().to_string(),
            device: backend.describe(),
            model: model.name(),
            observation: op.name(),
            n,
            d,
            m,
            cycles: cfg.experiment.cycles,
            burn_in: cfg.experiment.burn_in,
            flow_steps: cfg.filter.flow_steps,
            sigma_min: cfg.filter.sigma_min,
            guidance_scale: cfg.filter.guidance_scale,
            seed,
            rmse_mean: mean(|r| r.rmse),
            spread_mean: mean(|r| r.spread),
            rmse_forecast_mean: mean(|r| r.rmse_forecast),
            rmse_last: metrics.last().map_or(f64::NAN, |r| r.rmse),
            expected_rmse: self.expected_rmse,
            seconds_total,
            seconds_per_cycle: seconds_total / cfg.experiment.cycles as f64,
            seconds_forecast: total_forecast,
            seconds_analysis: total_analysis,
        };
        Ok(Report { summary, metrics })
    }
}
