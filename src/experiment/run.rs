//! The one time loop of enff: truth, observations, forecast → analysis → metrics.

use std::time::Instant;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::checkpoint::{config_hash, Checkpoint, CheckpointHeader, DivergenceEvent};
use super::config::{Config, InitialMean};
use crate::backend::{Backend, EnsembleStats};
use crate::error::{Error, Result};
use crate::filter::{Enff, Filter, Observation};
use crate::flow::GuidanceKind;
use crate::model::System;
use crate::observe::ObservationOperator;
use crate::rng::{self, NoiseKey, Stream};

/// Metrics of one assimilation cycle (after the analysis unless marked forecast).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// What a run does when the ensemble, the weights or the metrics become non-finite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDivergence {
    /// Stop with [`Error::Diverged`] naming the cycle and stage (the default).
    #[default]
    Stop,
    /// Log the event and keep cycling: a failed analysis is replaced by the forecast, a failed
    /// forecast by a fresh draw of the initial ensemble; the cycle's metrics are kept (NaN
    /// where they were non-finite) and left out of the summary's means.
    Record,
}

impl OnDivergence {
    /// Parses `stop` or `record`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "stop" => Ok(OnDivergence::Stop),
            "record" => Ok(OnDivergence::Record),
            other => Err(Error::invalid(
                "--on-divergence",
                other,
                "use `stop` (end the run with an error) or `record` (log and keep cycling)",
            )),
        }
    }
}

/// Where a test-injected fault strikes ([`Fault`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultStage {
    /// A NaN in the forecast ensemble.
    Forecast,
    /// A NaN in the flow state at flow step `k` (1-based) of the analysis.
    FlowStep(usize),
    /// A NaN in the observation operator's output during guidance.
    Guidance,
    /// A NaN in the truth, so that only the metrics are non-finite.
    Metrics,
}

/// Faults a test injects into a run through [`RunOptions::fault`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Stop with [`Error::Interrupted`] once this cycle is complete (and checkpointed if due),
    /// as a killed process would.
    AbortAfter(usize),
    /// A NaN at this cycle and stage.
    NonFinite {
        /// Cycle (1-based).
        cycle: usize,
        /// Stage.
        stage: FaultStage,
    },
    /// The device reports itself lost at the start of this cycle.
    DeviceLost(usize),
    /// An allocation fails for lack of device memory at the start of this cycle.
    OutOfMemory(usize),
}

/// How to run: checkpoints, resumption, divergence policy.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Write a checkpoint every this many cycles (0: never) into `checkpoint_dir`.
    pub checkpoint_every: usize,
    /// Folder of the checkpoint file ([`super::checkpoint::CHECKPOINT_FILE`]).
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint instead of starting at cycle 1.
    pub resume: Option<Checkpoint>,
    /// What to do on a non-finite value.
    pub on_divergence: OnDivergence,
    /// Check the state after every flow step so a divergence names the step (slower).
    pub step_checks: bool,
    /// Test-only fault injection.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct Report {
    /// The summary.
    pub summary: Summary,
    /// One row per cycle.
    pub metrics: Vec<CycleMetrics>,
}

/// The state after one cycle's analysis, as it lives on the backend.
pub struct CycleState<'a, B: Backend> {
    /// The backend holding the buffers.
    pub backend: &'a B,
    /// Cycle number, 1-based.
    pub cycle: usize,
    /// Model time of the observation.
    pub time: f64,
    /// The truth (`1 × d`).
    pub truth: &'a B::Buffer,
    /// The analysis ensemble (`n × d`).
    pub ensemble: &'a B::Buffer,
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
        "letkf" => Box::new(
            crate::filter::Letkf::<B>::new(
                f.loc_radius
                    .unwrap_or(crate::filter::localization::DEFAULT_LETKF_RADIUS),
                f.inflation,
            )?
            .with_geometry(model.geometry(), f.loc_distance),
        ),
        "enkf" => {
            let localization = f
                .loc_radius
                .map(|r| {
                    crate::filter::localization::Localization::new(
                        r,
                        model.geometry(),
                        f.loc_distance,
                        model.dim(),
                    )
                })
                .transpose()?;
            Box::new(
                crate::filter::EnkfPo::<B>::new(f.inflation, seed)?.with_localization(localization),
            )
        }
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

/// What to try when the forecast of `model` blew up (appended to the divergence report).
fn forecast_hint(model: &crate::model::Model, cfg: &Config) -> String {
    use crate::model::System;
    let every = cfg.observe.obs_every;
    match &model.system {
        // Forward Euler with central advection amplifies grid-scale modes by about
        // 1 + (|u|·dt/h)²/2 per step, which viscosity no longer damps once a member's local
        // velocity grows: the step must shrink (ns_64's seed 715319214 blows up at dt = 1e-3
        // and runs with dt = 5e-4).
        System::NavierStokes2d(ns) => format!(
            "the explicit Navier–Stokes step is stable only while max|u|·dt/h stays well below \
             1 (h = {:.4}): halve model.dt and double observe.obs_every (now {} and {every}) to \
             keep the observation interval",
            ns.spacing(),
            model.dt
        ),
        System::KuramotoSivashinsky(_) => format!(
            "reduce model.dt (now {}) and raise observe.obs_every (now {every}) to keep the \
             observation interval (the paper uses dt = 0.25)",
            model.dt
        ),
        _ => "reduce model.dt or check the filter settings".to_string(),
    }
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

    /// The expected band of `rmse_mean`, if the experiment has one.
    pub fn expected_rmse(&self) -> Option<(f64, f64)> {
        self.expected_rmse
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
        // The grid models' GPU scratch (spectral.rs, stencil.rs), per member and fixed.
        let mut grid_per_member = 0u64;
        match cfg.model.system {
            super::config::SystemKind::Ks => {
                // Seven spectra of d/2 + 1 complex values and two packed signals of d/2.
                grid_per_member = 4 * (7 * (d + 2) + 2 * d);
                parts.push((
                    "KS spectra and FFT buffers".to_string(),
                    n * grid_per_member,
                ));
                // ETDRK4 tables (7 × (d/2 + 1) f32), FFT and real-FFT twiddles (d/2 + d/2 + 1).
                parts.push((
                    "KS ETDRK4 and twiddle tables".to_string(),
                    4 * 7 * (d / 2 + 1) + 8 * (d + 1),
                ));
            }
            super::config::SystemKind::Ns => {
                // u*, v*, the divergence and the Jacobi ping-pong pressure: 4 n² per member.
                grid_per_member = 4 * 4 * (d / 3);
                parts.push((
                    "NS scratch (u*, v*, b, p_tmp)".to_string(),
                    n * grid_per_member,
                ));
            }
            _ => {}
        }
        if cfg.filter.integrator == crate::flow::Integrator::Heun {
            parts.push(("Heun predictor and velocity".to_string(), 2 * nd));
        }
        if cfg.filter.kind.starts_with("enff") && cfg.filter.guidance == GuidanceKind::Covariance {
            // The static windows (observation index and taper) and the gain table of a stage,
            // d × w each, w the observations inside the Gaspari–Cohn support (2 · 1.82 ·
            // radius) of a component.
            let reach = 2.0 * 1.82 * cfg.filter.loc_radius.unwrap_or(4.0);
            let every = cfg.observe.every.max(1) as f64;
            let near = match cfg.model.system {
                super::config::SystemKind::Ns => {
                    let side = cfg.model.d as f64;
                    let cells = std::f64::consts::PI * reach * reach + 4.0 * reach + 1.0;
                    3.0 * cells.min(side * side)
                }
                _ => (2.0 * reach.floor() + 1.0).min(d as f64),
            };
            let w = (near / every).ceil().max(1.0) as u64;
            parts.push((
                "covariance-guidance gains (index, taper, table)".to_string(),
                3 * 4 * d * w,
            ));
            // The GPU's forecast and endpoint column means (2 d) and h̄ (m); the CPU twin's
            // component-major anomalies (n × d) and observation-major innovations (m × n)
            // instead. Both counted: the larger is the CPU's, about one ensemble.
            parts.push((
                "covariance-guidance scratch (means, h̄, anomalies, innovations)".to_string(),
                4 * (2 * d + m + n * (d + m)),
            ));
        }
        let per_member = parts
            .iter()
            .filter(|p| p.1 % nd.max(1) == 0 && p.1 >= nd)
            .map(|p| p.1)
            .sum::<u64>()
            / n.max(1)
            + grid_per_member;
        MemoryEstimate {
            total: parts.iter().map(|p| p.1).sum(),
            parts,
            per_member,
        }
    }

    /// Refuses, before anything is allocated, a run whose memory estimate exceeds `capacity`
    /// bytes (less a 10% reserve for the driver, shaders and transient buffers) on the backend
    /// named `backend`; the error states the estimate and the largest `ensemble.n` (and, for
    /// Lorenz-96, `model.d`) that would fit.
    pub fn check_memory(&self, capacity: u64, backend: &str) -> Result<()> {
        let usable = capacity / 10 * 9;
        let est = self.memory_estimate();
        if est.total <= usable {
            return Ok(());
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let fits = |cfg: &Config| Experiment::estimate_of(cfg) <= usable;
        // Largest value of one setting that fits, by bisection (the estimate grows with it).
        let largest = |set: &dyn Fn(&mut Config, usize), lo: usize, hi: usize| {
            let probe = |v: usize| {
                let mut c = self.config.clone();
                set(&mut c, v);
                fits(&c)
            };
            if !probe(lo) {
                return None;
            }
            let (mut lo, mut hi) = (lo, hi);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if probe(mid) {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            Some(lo)
        };
        let cfg = &self.config;
        let mut options = Vec::new();
        match largest(&|c, v| c.ensemble.n = v, 2, cfg.ensemble.n) {
            Some(n) => options.push(format!("ensemble.n ≤ {n} at d = {}", cfg.state_dim())),
            None => options.push("not even 2 members at this d".to_string()),
        }
        if cfg.model.system == super::config::SystemKind::Lorenz96 {
            if let Some(d) = largest(&|c, v| c.model.d = v, 4, cfg.model.d) {
                options.push(format!("model.d ≤ {d} at n = {}", cfg.ensemble.n));
            }
        }
        let parts = est
            .parts
            .iter()
            .map(|(name, b)| format!("{name} {:.2} GiB", gib(*b)))
            .collect::<Vec<_>>()
            .join(", ");
        Err(Error::TooLarge {
            detail: format!(
                "this run (n = {}, d = {}) needs about {:.2} GiB ({parts}) but the {backend} \
                 backend has {:.2} GiB ({:.2} GiB usable after a 10% reserve). What would fit: \
                 {}; or another backend (--backend cpu|gpu)",
                cfg.ensemble.n,
                cfg.state_dim(),
                gib(est.total),
                gib(capacity),
                gib(usable),
                options.join(", or ")
            ),
        })
    }

    fn estimate_of(config: &Config) -> u64 {
        Experiment {
            name: String::new(),
            config: config.clone(),
            expected_rmse: None,
        }
        .memory_estimate()
        .total
    }

    /// The truth at the first observation time: the system's initial condition, spun up.
    pub(crate) fn initial_truth<B: Backend>(
        &self,
        backend: &B,
        model: &crate::model::Model,
        truth: &mut B::Buffer,
    ) -> Result<()> {
        let cfg = &self.config;
        let d = model.dim();
        let truth_key = NoiseKey::new(cfg.experiment.seed, Stream::Truth, 0);
        match &model.system {
            System::Rotation2d(_) => {
                backend.write(truth, &[cfg.experiment.truth_init_mean, 0.0])?;
            }
            // ENFF_SPEC §8.4: the reference field plus N(0, truth_init_std²) noise, then spin-up.
            System::KuramotoSivashinsky(ks) => {
                let mean = backend.upload(1, d, &ks.reference_initial_condition()?)?;
                backend.fill_normal(
                    truth,
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
                backend.write(truth, &x0)?;
            }
            _ => {
                let mean = backend.upload(1, d, &vec![cfg.experiment.truth_init_mean; d])?;
                backend.fill_normal(
                    truth,
                    truth_key,
                    Some(&mean),
                    cfg.experiment.truth_init_std,
                )?;
            }
        }
        backend.advance(model, truth, cfg.experiment.spinup)?;
        backend
            .check_finite(truth, "truth after spin-up")
            .map_err(|e| Error::Diverged {
                cycle: 0,
                stage: "truth spin-up".into(),
                detail: e.to_string(),
            })
    }

    /// The initial ensemble around the truth or around zero; `draw` 0 at the start, the cycle
    /// number when a diverged ensemble is drawn afresh.
    fn initial_ensemble<B: Backend>(
        &self,
        backend: &B,
        truth: &B::Buffer,
        ensemble: &mut B::Buffer,
        draw: usize,
    ) -> Result<()> {
        let cfg = &self.config;
        let centre = match cfg.ensemble.init_mean {
            InitialMean::Truth => Some(truth),
            InitialMean::Zero => None,
        };
        backend.fill_normal(
            ensemble,
            NoiseKey::new(cfg.experiment.seed, Stream::InitialEnsemble, draw as u32),
            centre,
            cfg.ensemble.init_std,
        )
    }

    /// Runs the experiment on `backend`, calling `on_cycle` after every cycle. A run that
    /// cannot fit in the backend's memory (where it reports its size) is refused first.
    pub fn run<B: Backend + 'static>(
        &self,
        backend: &B,
        on_cycle: impl FnMut(&CycleMetrics),
    ) -> Result<Report> {
        self.run_with(backend, &RunOptions::default(), on_cycle)
    }

    /// [`Experiment::run`] that also hands the truth and the analysis ensemble, as they live on
    /// the backend, to `on_state` after every cycle (for plots and ensemble snapshots; see
    /// [`super::trace`]). An error from `on_state` stops the run.
    pub fn run_observed<B: Backend + 'static>(
        &self,
        backend: &B,
        on_cycle: impl FnMut(&CycleMetrics),
        on_state: impl FnMut(&CycleState<'_, B>) -> Result<()>,
    ) -> Result<Report> {
        self.run_full(backend, &RunOptions::default(), on_cycle, on_state)
    }

    /// [`Experiment::run`] with checkpoints, resumption and a divergence policy. When a
    /// checkpoint has been written, a failure later in the run comes back as
    /// [`Error::Resumable`], naming the checkpoint and how to continue.
    pub fn run_with<B: Backend + 'static>(
        &self,
        backend: &B,
        options: &RunOptions,
        on_cycle: impl FnMut(&CycleMetrics),
    ) -> Result<Report> {
        self.run_full(backend, options, on_cycle, |_| Ok(()))
    }

    /// [`Experiment::run_with`] and [`Experiment::run_observed`] together.
    pub fn run_full<B: Backend + 'static>(
        &self,
        backend: &B,
        options: &RunOptions,
        on_cycle: impl FnMut(&CycleMetrics),
        on_state: impl FnMut(&CycleState<'_, B>) -> Result<()>,
    ) -> Result<Report> {
        if let Some(capacity) = backend.memory_capacity() {
            self.check_memory(capacity, backend.name())?;
        }
        if let Some(ck) = &options.resume {
            ck.check_compatible(&self.config)?;
        }
        if options.checkpoint_every > 0 && options.checkpoint_dir.is_none() {
            return Err(Error::invalid(
                "--checkpoint-every",
                options.checkpoint_every,
                "checkpoints need a folder: give --out DIR",
            ));
        }
        let mut last_checkpoint = None;
        self.run_inner(backend, options, on_cycle, on_state, &mut last_checkpoint)
            .map_err(|e| match e {
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
            .map_err(|e| match (e, &last_checkpoint, &options.checkpoint_dir) {
                (e @ Error::Interrupted { .. }, _, _) => e,
                (e, Some(cycle), Some(dir)) => Error::Resumable {
                    hint: if backend.name() == "gpu" {
                        " (add --backend cpu to continue without the GPU)".into()
                    } else {
                        String::new()
                    },
                    source: Box::new(e),
                    cycle: *cycle,
                    dir: dir.display().to_string(),
                },
                (e, _, _) => e,
            })
    }

    fn run_inner<B: Backend + 'static>(
        &self,
        backend: &B,
        options: &RunOptions,
        mut on_cycle: impl FnMut(&CycleMetrics),
        mut on_state: impl FnMut(&CycleState<'_, B>) -> Result<()>,
        last_checkpoint: &mut Option<usize>,
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
        filter.set_step_checks(options.step_checks || options.fault.is_some());
        let started = Instant::now();
        let resume = options.resume.as_ref();
        let fault = options.fault;
        let nan_at =
            |cycle: usize, stage: FaultStage| fault == Some(Fault::NonFinite { cycle, stage });

        // Truth and initial ensemble: from the checkpoint, or drawn and spun up.
        let mut truth = backend.zeros(1, d)?;
        let mut ensemble = backend.zeros(n, d)?;
        if let Some(ck) = resume {
            if (ck.header.n, ck.header.d) != (n, d) {
                return Err(Error::shape(
                    "checkpoint ensemble",
                    format!("{n} × {d}"),
                    format!("{} × {}", ck.header.n, ck.header.d),
                ));
            }
            backend.write(&mut truth, &ck.truth)?;
            backend.write(&mut ensemble, &ck.ensemble)?;
            filter.restore_state(&ck.filter_state)?;
        } else {
            self.initial_truth(backend, &model, &mut truth)?;
            self.initial_ensemble(backend, &truth, &mut ensemble, 0)?;
        }
        let mut previous = if filter.needs_previous_analysis() {
            Some(backend.zeros(n, d)?)
        } else {
            None
        };
        // The forecast kept aside, to fall back on when an analysis fails (record mode).
        let mut fallback = if options.on_divergence == OnDivergence::Record {
            Some(backend.zeros(n, d)?)
        } else {
            None
        };
        let mut hx = backend.zeros(1, m)?;
        let mut y = backend.zeros(1, m)?;

        let mut metrics = Vec::with_capacity(cfg.experiment.cycles);
        let mut divergences = Vec::new();
        let (mut total_forecast, mut total_analysis, mut before) = (0.0f64, 0.0f64, 0.0f64);
        let first = match resume {
            Some(ck) => {
                metrics.extend(ck.header.metrics.iter().cloned());
                divergences.extend(ck.header.divergences.iter().cloned());
                [before, total_forecast, total_analysis] = ck.header.seconds;
                ck.header.cycle
            }
            None => 0,
        };
        for k in first..cfg.experiment.cycles {
            let cycle = k + 1;
            match fault {
                Some(Fault::DeviceLost(c)) if c == cycle => {
                    return Err(Error::Gpu(format!(
                        "the device was lost (injected at cycle {cycle}); restart the run (or \
                         use --backend cpu)"
                    )))
                }
                Some(Fault::OutOfMemory(c)) if c == cycle => {
                    return Err(Error::TooLarge {
                        detail: format!("out of device memory (injected at cycle {cycle})"),
                    })
                }
                _ => {}
            }
            let mut diverged: Option<DivergenceEvent> = None;
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
            if nan_at(cycle, FaultStage::Forecast) {
                poison(backend, &mut ensemble)?;
            }
            if nan_at(cycle, FaultStage::Metrics) {
                poison(backend, &mut truth)?;
            }
            let mut fc = backend.ensemble_stats(&ensemble, &truth)?;
            if !(fc.rmse.is_finite() && fc.spread.is_finite()) {
                let mut event = locate(backend, &ensemble, &truth, cycle, "forecast")?;
                if event.stage == "forecast" {
                    event.detail = format!("{}; {}", event.detail, forecast_hint(&model, cfg));
                }
                if options.on_divergence == OnDivergence::Stop || event.stage == "metrics" {
                    return Err(event.into_error());
                }
                // Record: start again from a fresh draw of the initial ensemble.
                self.initial_ensemble(backend, &truth, &mut ensemble, cycle)?;
                fc = backend.ensemble_stats(&ensemble, &truth)?;
                log::warn!("{} ; the ensemble was drawn afresh", event.message());
                diverged = Some(DivergenceEvent {
                    detail: format!("{}; the ensemble was drawn afresh", event.detail),
                    ..event
                });
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
            if let Some(f) = fallback.as_mut() {
                backend.copy(&ensemble, f)?;
            }
            filter.inject_fault(match fault {
                Some(Fault::NonFinite {
                    cycle: c,
                    stage: FaultStage::FlowStep(s),
                }) if c == cycle => Some(crate::filter::InjectedFault::FlowStep(s)),
                Some(Fault::NonFinite {
                    cycle: c,
                    stage: FaultStage::Guidance,
                }) if c == cycle => Some(crate::filter::InjectedFault::Guidance),
                _ => None,
            });
            let t_analysis = Instant::now();
            let obs = Observation {
                y: &y,
                operator: &op,
                noise_std: cfg.observe.noise_std,
            };
            let outcome = filter.analyse(
                backend,
                &mut ensemble,
                previous.as_ref(),
                &obs,
                cycle as u32,
            );
            let nan = EnsembleStats {
                rmse: f64::NAN,
                spread: f64::NAN,
            };
            let mut failure: Option<(String, String)> = None;
            let mut an = match outcome {
                Ok(()) => backend.ensemble_stats(&ensemble, &truth)?,
                // A filter that locates the failure itself (EnFF: flow step k).
                Err(Error::Diverged { stage, detail, .. }) => {
                    failure = Some((stage, detail));
                    nan
                }
                Err(e @ Error::NonFinite { .. }) => {
                    failure = Some(("analysis".to_string(), e.to_string()));
                    nan
                }
                Err(other) => return Err(other),
            };
            let seconds_analysis = t_analysis.elapsed().as_secs_f64();
            if !(an.rmse.is_finite() && an.spread.is_finite()) {
                let event = match failure.take() {
                    Some((stage, detail)) => DivergenceEvent {
                        cycle,
                        stage,
                        detail,
                    },
                    None => locate(backend, &ensemble, &truth, cycle, "analysis")?,
                };
                match (&mut fallback, options.on_divergence) {
                    (Some(f), OnDivergence::Record) if event.stage != "metrics" => {
                        backend.copy(f, &mut ensemble)?;
                        log::warn!("{}; the forecast was kept as the analysis", event.message());
                        an = backend.ensemble_stats(&ensemble, &truth)?;
                        diverged = Some(DivergenceEvent {
                            detail: format!("{}; the forecast was kept", event.detail),
                            ..event
                        });
                    }
                    _ => return Err(event.into_error()),
                }
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
            on_state(&CycleState {
                backend,
                cycle,
                time: row.time,
                truth: &truth,
                ensemble: &ensemble,
            })?;
            metrics.push(row);
            if let Some(event) = diverged {
                divergences.push(event);
            }
            let due = options.checkpoint_every > 0
                && (cycle % options.checkpoint_every == 0 || cycle == cfg.experiment.cycles);
            if let (true, Some(dir)) = (due, &options.checkpoint_dir) {
                let ck = Checkpoint {
                    header: CheckpointHeader {
                        format: 1,
                        enff_version: env!("CARGO_PKG_VERSION").to_string(),
                        config_hash: config_hash(cfg),
                        config: cfg.clone(),
                        preset: self.name.clone(),
                        expected_rmse: self.expected_rmse,
                        backend: backend.name().to_string(),
                        cycle,
                        n,
                        d,
                        metrics: metrics.clone(),
                        divergences: divergences.clone(),
                        seconds: [
                            before + started.elapsed().as_secs_f64(),
                            total_forecast,
                            total_analysis,
                        ],
                        filter_state_len: 0,
                    },
                    ensemble: backend.read(&ensemble)?,
                    truth: backend.read(&truth)?,
                    filter_state: filter.save_state(),
                };
                let ck = Checkpoint {
                    header: CheckpointHeader {
                        filter_state_len: ck.filter_state.len(),
                        ..ck.header
                    },
                    ..ck
                };
                ck.write(dir)?;
                *last_checkpoint = Some(cycle);
            }
            if fault == Some(Fault::AbortAfter(cycle)) && cycle < cfg.experiment.cycles {
                return Err(Error::Interrupted {
                    cycle,
                    checkpoint: last_checkpoint.map(|c| {
                        format!(
                            "{} (after cycle {c})",
                            options
                                .checkpoint_dir
                                .as_ref()
                                .map_or(String::new(), |d| d.display().to_string())
                        )
                    }),
                });
            }
        }
        let summary = Summary::of_run(
            RunIdentity {
                preset: self.name.clone(),
                filter: filter.name(),
                backend: backend.name().to_string(),
                device: backend.describe(),
                model: model.name(),
                observation: op.name(),
                n,
                d,
                m,
                seed,
                expected_rmse: self.expected_rmse,
            },
            cfg,
            &metrics,
            RunTimes {
                total: before + started.elapsed().as_secs_f64(),
                forecast: total_forecast,
                analysis: total_analysis,
            },
            divergences,
            resume.map(|ck| ck.header.cycle),
        );
        Ok(Report { summary, metrics })
    }
}

/// Puts a NaN into the first element of `buf` (fault injection).
fn poison<B: Backend>(backend: &B, buf: &mut B::Buffer) -> Result<()> {
    let mut host = backend.read(buf)?;
    host[0] = f32::NAN;
    backend.write(buf, &host)
}

/// Names the stage of a non-finite metric: the ensemble itself (`stage`) or, when the
/// ensemble is finite, the metrics (a non-finite truth or an overflow in the statistics).
fn locate<B: Backend>(
    backend: &B,
    ensemble: &B::Buffer,
    truth: &B::Buffer,
    cycle: usize,
    stage: &str,
) -> Result<DivergenceEvent> {
    // `check_finite` may defer its verdict to the next sync (GPU): take it now.
    let checked = backend
        .check_finite(ensemble, &format!("{stage} ensemble"))
        .and_then(|_| backend.sync());
    let event = match checked {
        Err(e @ Error::NonFinite { .. }) => DivergenceEvent {
            cycle,
            stage: stage.to_string(),
            detail: e.to_string(),
        },
        Err(other) => return Err(other),
        Ok(()) => {
            let truth_checked = backend
                .check_finite(truth, "truth")
                .and_then(|_| backend.sync());
            DivergenceEvent {
                cycle,
                stage: "metrics".to_string(),
                detail: match truth_checked {
                    Err(e) => e.to_string(),
                    Ok(()) => {
                        "the ensemble is finite but its RMSE or spread is not (overflow)".into()
                    }
                },
            }
        }
    };
    Ok(event)
}

impl DivergenceEvent {
    /// The event as the error that stops a run.
    pub fn into_error(self) -> Error {
        Error::Diverged {
            cycle: self.cycle,
            stage: self.stage,
            detail: self.detail,
        }
    }

    /// One line for the log.
    pub fn message(&self) -> String {
        format!(
            "divergence at cycle {} during {}: {}",
            self.cycle, self.stage, self.detail
        )
    }
}
