//! The twin-experiment driver: a validated [`Experiment`], its memory check, and the one loop
//! over cycles around the stepper ([`crate::cycle::Cycle`]), with checkpoints and the
//! observers a caller attaches.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::checkpoint::{config_hash, Checkpoint, CheckpointHeader};
use super::config::{Config, InitialMean};
use super::output::MetricsStream;
use super::report::{Report, RunIdentity, RunTimes, Summary};
use crate::backend::Backend;
use crate::cycle::{
    Cycle, CycleMetrics, CycleSetup, DivergenceEvent, Fault, InitialDraw, OnDivergence, OneProcess,
    Placement,
};
use crate::error::{Error, Result};
use crate::filter::{Enff, Filter, FilterKind};
use crate::flow::GuidanceKind;
use crate::model::System;
use crate::observe::ObservationOperator;
use crate::rng::{self, NoiseKey, Stream};

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
    /// Write `metrics.csv` into this folder as the run goes (see
    /// [`super::output::MetricsStream`]), one line per finished cycle.
    pub stream_metrics: Option<PathBuf>,
    /// Test-only fault injection.
    #[doc(hidden)]
    pub fault: Option<Fault>,
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
    /// This process's part of the analysis ensemble (`n × d` in one process, `n × len` of
    /// its slab over MPI ranks).
    pub ensemble: &'a B::Buffer,
    /// Where the state lives.
    pub placement: &'a dyn Placement<B>,
}

impl<B: Backend> CycleState<'_, B> {
    /// The whole analysis ensemble (`n × d`) on the host: gathered from every process in a
    /// sharded run (a collective: every process calls it), read back in one.
    pub fn gather_ensemble(&self) -> Result<Vec<f32>> {
        self.placement.gather(self.backend, self.ensemble)
    }
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
    match config.filter_kind()? {
        FilterKind::Kf => Ok(Box::new(crate::filter::KalmanFilter::new(
            model,
            config.observe.obs_every,
            config.ensemble.init_std,
        )?)),
        _ => build_filter_on::<B>(config, model.geometry(), model.dim()),
    }
}

/// Builds the ensemble filter named in the configuration for backend `B` on a state of `dim`
/// components with `geometry` (the forecast model's, or the one a caller's own model is given:
/// [`crate::model::Geometry::None`] for a state without spatial structure). The exact Kalman
/// filter needs its model: [`build_filter`].
pub fn build_filter_on<B: Backend + 'static>(
    config: &Config,
    geometry: crate::model::Geometry,
    dim: usize,
) -> Result<Box<dyn Filter<B>>> {
    let f = &config.filter;
    let seed = config.experiment.seed;
    Ok(match config.filter_kind()? {
        FilterKind::EnffF2p | FilterKind::EnffOt => {
            Box::new(Enff::<B>::new(config.enff_config()?)?.with_geometry(geometry))
        }
        FilterKind::Ensf => Box::new(crate::filter::Ensf::<B>::new(config.ensf_config())?),
        FilterKind::Etkf => Box::new(crate::filter::Etkf::<B>::new(f.inflation)?),
        FilterKind::Letkf => Box::new(
            crate::filter::Letkf::<B>::new(
                f.loc_radius
                    .unwrap_or(crate::filter::letkf::DEFAULT_LETKF_RADIUS),
                f.inflation,
            )?
            .with_geometry(geometry, f.loc_distance),
        ),
        FilterKind::Enkf => {
            let localization = f
                .loc_radius
                .map(|r| crate::localization::Localization::new(r, geometry, f.loc_distance, dim))
                .transpose()?;
            Box::new(
                crate::filter::EnkfPo::<B>::new(f.inflation, seed)?.with_localization(localization),
            )
        }
        FilterKind::Bpf => Box::new(crate::filter::ParticleFilter::<B>::new(
            f.resampling,
            f.jitter,
            f.inflation,
            seed,
        )?),
        FilterKind::Kf => {
            return Err(Error::invalid(
                "filter.kind",
                "kf",
                "the exact Kalman filter needs its model (build_filter)",
            ))
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
        let kind = cfg.filter_kind().ok();
        if kind == Some(FilterKind::EnffF2p) {
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
        if kind.is_some_and(FilterKind::is_enff) && cfg.filter.unguided_weights {
            parts.push(("unguided transport position".to_string(), nd));
        }
        if kind.is_some_and(FilterKind::is_enff) && cfg.filter.guidance == GuidanceKind::Covariance
        {
            // The static windows (observation index and taper) and the gain table of a stage,
            // d × w each, w the observations inside the Gaspari–Cohn support (2 · 1.82 ·
            // radius) of a component.
            // The global gain (no radius, or no spatial geometry) sees all m observations.
            let every = cfg.observe.every.max(1) as f64;
            let spatial = cfg.model().is_ok_and(|m| m.geometry().is_spatial());
            let w = match cfg.filter.loc_radius.filter(|_| spatial) {
                None => m.max(1),
                Some(radius) => {
                    let reach = 2.0 * 1.82 * radius;
                    let near = match cfg.model.system {
                        super::config::SystemKind::Ns => {
                            let side = cfg.model.d as f64;
                            let cells = std::f64::consts::PI * reach * reach + 4.0 * reach + 1.0;
                            3.0 * cells.min(side * side)
                        }
                        _ => (2.0 * reach.floor() + 1.0).min(d as f64),
                    };
                    (near / every).ceil().max(1.0) as u64
                }
            };
            // One gain table, or (stages sharing one linearization) one per distinct exponent.
            let f = &cfg.filter;
            let tables = if f.relinearize || f.gain_schedule == crate::flow::GainSchedule::Constant
            {
                1
            } else {
                f.gain_stages.clamp(1, f.flow_steps.max(1)) as u64
            };
            parts.push((
                format!("covariance-guidance gains (index, taper, {tables} table(s))"),
                (2 + tables) * 4 * d * w,
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

    /// [`Experiment::run_with`] and [`Experiment::run_observed`] together, in one process.
    pub fn run_full<B: Backend + 'static>(
        &self,
        backend: &B,
        options: &RunOptions,
        on_cycle: impl FnMut(&CycleMetrics),
        on_state: impl FnMut(&CycleState<'_, B>) -> Result<()>,
    ) -> Result<Report> {
        let placement = OneProcess::new(self.config.state_dim());
        self.run_placed(backend, Box::new(placement), options, on_cycle, on_state)
    }

    /// [`Experiment::run_full`] with the state placed by `placement` (one process, or slabs
    /// over MPI ranks: see `crate::distributed`). Every process calls it; checkpoints are
    /// written by the root process.
    pub fn run_placed<'b, B: Backend + 'static>(
        &self,
        backend: &'b B,
        placement: Box<dyn Placement<B> + 'b>,
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
        self.drive(
            backend,
            placement,
            options,
            on_cycle,
            on_state,
            &mut last_checkpoint,
        )
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

    /// The stepper of this experiment on `backend`, placed by `placement`, before its first
    /// cycle (or after the checkpoint's last one).
    pub fn stepper<'b, B: Backend + 'static>(
        &self,
        backend: &'b B,
        placement: Box<dyn Placement<B> + 'b>,
        options: &RunOptions,
    ) -> Result<Cycle<'b, B>> {
        let cfg = &self.config;
        let seed = cfg.experiment.seed;
        let theta = rng::uniform(&NoiseKey::new(seed, Stream::Truth, 0).with_step(1), 0, 0)
            * std::f64::consts::TAU;
        let model = cfg.model_with_theta(theta)?;
        let op = cfg.observation_operator()?;
        let mut filter = build_filter::<B>(cfg, &model)?;
        filter.set_step_checks(options.step_checks || options.fault.is_some());
        if let Some(shard) = placement.shard() {
            filter.place(shard)?;
        }
        let mut truth = backend.zeros(1, model.dim())?;
        if options.resume.is_none() {
            self.initial_truth(backend, &model, &mut truth)?;
        }
        let setup = CycleSetup {
            n: cfg.ensemble.n,
            operator: op,
            noise_std: cfg.observe.noise_std,
            obs_every: cfg.observe.obs_every,
            seed,
            spinup: cfg.experiment.spinup,
            initial: InitialDraw {
                on_truth: cfg.ensemble.init_mean == InitialMean::Truth,
                std: cfg.ensemble.init_std,
            },
            on_divergence: options.on_divergence,
            fault: options.fault,
            model,
        };
        let mut stepper = Cycle::new(backend, placement, filter, setup, truth)?;
        if let Some(ck) = &options.resume {
            stepper.resume(ck.header.cycle, &ck.truth, &ck.ensemble, &ck.filter_state)?;
        }
        Ok(stepper)
    }

    /// The driver: the one loop over cycles, with the observers around the stepper.
    fn drive<'b, B: Backend + 'static>(
        &self,
        backend: &'b B,
        placement: Box<dyn Placement<B> + 'b>,
        options: &RunOptions,
        mut on_cycle: impl FnMut(&CycleMetrics),
        mut on_state: impl FnMut(&CycleState<'_, B>) -> Result<()>,
        last_checkpoint: &mut Option<usize>,
    ) -> Result<Report> {
        let cfg = &self.config;
        let started = Instant::now();
        let mut stepper = self.stepper(backend, placement, options)?;
        let fault = options.fault;
        let mut metrics = Vec::with_capacity(cfg.experiment.cycles);
        let mut divergences = Vec::new();
        let (mut total_forecast, mut total_analysis, mut before) = (0.0f64, 0.0f64, 0.0f64);
        if let Some(ck) = &options.resume {
            metrics.extend(ck.header.metrics.iter().cloned());
            divergences.extend(ck.header.divergences.iter().cloned());
            [before, total_forecast, total_analysis] = ck.header.seconds;
        }
        let mut stream = match &options.stream_metrics {
            Some(dir) if stepper.placement().is_root() => {
                Some(MetricsStream::create(dir, &metrics)?)
            }
            _ => None,
        };
        while stepper.completed() < cfg.experiment.cycles {
            let cycle = stepper.completed() + 1;
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
            let outcome = stepper.step()?;
            let row = outcome.metrics;
            total_forecast += row.seconds_forecast;
            total_analysis += row.seconds_analysis;
            on_cycle(&row);
            if let Some(s) = stream.as_mut() {
                s.push(&row)?;
            }
            on_state(&CycleState {
                backend,
                cycle,
                time: row.time,
                truth: stepper.truth(),
                ensemble: stepper.ensemble(),
                placement: stepper.placement(),
            })?;
            metrics.push(row);
            if let Some(event) = outcome.divergence {
                divergences.push(event);
            }
            let due = options.checkpoint_every > 0
                && (cycle % options.checkpoint_every == 0 || cycle == cfg.experiment.cycles);
            if let (true, Some(dir)) = (due, &options.checkpoint_dir) {
                let seconds = [
                    before + started.elapsed().as_secs_f64(),
                    total_forecast,
                    total_analysis,
                ];
                self.write_checkpoint(dir, &stepper, &metrics, &divergences, seconds)?;
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
        let (n, d) = (cfg.ensemble.n, stepper.model().dim());
        let op = cfg.observation_operator()?;
        let summary = Summary::of_run(
            RunIdentity {
                preset: self.name.clone(),
                filter: stepper.filter().name(),
                backend: backend.name().to_string(),
                device: stepper.placement().describe(&backend.describe()),
                model: stepper.model().name(),
                observation: op.name(),
                n,
                d,
                m: op.obs_dim(d)?,
                seed: cfg.experiment.seed,
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
            options.resume.as_ref().map(|ck| ck.header.cycle),
        );
        Ok(Report { summary, metrics })
    }

    /// Writes the checkpoint of `stepper` after its last cycle into `dir` (the whole ensemble
    /// is gathered on every process; the root process writes it).
    fn write_checkpoint<B: Backend + 'static>(
        &self,
        dir: &std::path::Path,
        stepper: &Cycle<'_, B>,
        metrics: &[CycleMetrics],
        divergences: &[DivergenceEvent],
        seconds: [f64; 3],
    ) -> Result<()> {
        let cfg = &self.config;
        let ensemble = stepper.gather_ensemble()?;
        if !stepper.placement().is_root() {
            return Ok(());
        }
        let filter_state = stepper.filter().save_state();
        let ck = Checkpoint {
            header: CheckpointHeader {
                format: 1,
                enff_version: env!("CARGO_PKG_VERSION").to_string(),
                config_hash: config_hash(cfg),
                config: cfg.clone(),
                preset: self.name.clone(),
                expected_rmse: self.expected_rmse,
                backend: stepper.backend().name().to_string(),
                cycle: stepper.completed(),
                n: cfg.ensemble.n,
                d: stepper.model().dim(),
                metrics: metrics.to_vec(),
                divergences: divergences.to_vec(),
                seconds,
                filter_state_len: filter_state.len(),
            },
            ensemble,
            truth: stepper.backend().read(stepper.truth())?,
            filter_state,
        };
        ck.write(dir)
    }
}
