//! The one assimilation cycle of enff, as a stepper (ENFF_SPEC §9): each [`Cycle::step`]
//! advances the truth, observes it, forecasts the ensemble, analyses it and assesses the result,
//! and returns that cycle's metrics.
//!
//! ```text
//! truth:     x_true ← model.advance(x_true, Δt_obs)
//! observe:   y_k = h(x_true) + σ_y η
//! forecast:  ensemble ← model.advance(ensemble, Δt_obs)      (placement: one process or slabs)
//! analyse:   ensemble ← filter.analyse(ensemble, y_k)
//! assess:    rmse, spread (reduced where the data lives)
//! ```
//!
//! Drivers own the loop (argmin's solver and executor): `Experiment::run` in one process or
//! over MPI ranks, and attach what watches the cycles (metrics writer, checkpoints, traces,
//! progress) outside the stepper. What varies between drivers is passed in: the backend, the
//! [`Placement`] of the state, the filter, the divergence policy.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, DeviceBuffer, EnsembleStats};
use crate::error::{Error, Result};
use crate::filter::{Filter, InjectedFault, Observation};
use crate::model::{Model, System};
use crate::observe::{ObservationOperator, Observe};
use crate::partition::local_observe;
use crate::rng::{NoiseKey, Stream};

pub mod metrics;
pub mod placement;

pub use metrics::{CycleMetrics, DivergenceEvent, Fault, FaultStage, OnDivergence};
pub use placement::{OneProcess, Placement};

/// The initial ensemble of a twin experiment: normal draws of standard deviation `std` around
/// the truth (`on_truth`) or around zero.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InitialDraw {
    /// Centre the draws on the truth (else on zero).
    pub on_truth: bool,
    /// Standard deviation of the draws.
    pub std: f32,
}

/// What a twin-experiment cycle needs besides the backend, the placement and the filter.
#[derive(Clone, Debug)]
pub struct CycleSetup {
    /// The forecast model (also the truth's).
    pub model: Model,
    /// The observation operator of the whole state.
    pub operator: Observe,
    /// Observation noise std σ_y.
    pub noise_std: f32,
    /// Model steps between observations.
    pub obs_every: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Model steps of the truth before the first observation (for the cycle's model time).
    pub spinup: usize,
    /// Ensemble size.
    pub n: usize,
    /// The initial ensemble.
    pub initial: InitialDraw,
    /// What a non-finite value does.
    pub on_divergence: OnDivergence,
    /// Test-only fault injection.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// One cycle's result.
#[derive(Clone, Debug)]
pub struct CycleOutcome {
    /// The cycle's metrics.
    pub metrics: CycleMetrics,
    /// A divergence met and recovered from (`OnDivergence::Record`).
    pub divergence: Option<DivergenceEvent>,
}

/// The twin-experiment stepper: truth, observation, forecast, analysis and metrics of one cycle
/// per [`Cycle::step`], with the ensemble kept on the backend throughout.
pub struct Cycle<'b, B: Backend> {
    backend: &'b B,
    placement: Box<dyn Placement<B> + 'b>,
    /// The filter, this process's part of the ensemble and the previous analysis.
    stages: EnsembleStages<'b, B>,
    setup: CycleSetup,
    /// The truth (`1 × d`, whole on every process).
    truth: B::Buffer,
    /// This process's components of the truth, when it holds a slab.
    truth_part: Option<B::Buffer>,
    /// The forecast kept aside, to fall back on when an analysis fails (record mode).
    fallback: Option<B::Buffer>,
    hx: B::Buffer,
    y: B::Buffer,
    /// This process's observations, when it holds a slab.
    y_part: Option<(B::Buffer, std::ops::Range<usize>)>,
    completed: usize,
}

impl<'b, B: Backend + 'static> Cycle<'b, B> {
    /// A stepper starting from `truth` (`1 × d`, at the first observation time) with a fresh
    /// initial ensemble drawn where the placement puts it.
    pub fn new(
        backend: &'b B,
        placement: Box<dyn Placement<B> + 'b>,
        filter: Box<dyn Filter<B>>,
        setup: CycleSetup,
        truth: B::Buffer,
    ) -> Result<Self> {
        let d = setup.model.dim();
        let slab = placement.slab();
        if slab.d != d || truth.cols() != d {
            return Err(Error::shape(
                "placement",
                format!("a state of d = {d}"),
                format!("a slab of d = {}, a truth of {}", slab.d, truth.cols()),
            ));
        }
        let n = setup.n;
        let m = setup.operator.obs_dim(d)?;
        let ranks = placement.shard().map_or(1, |s| s.comm.size());
        let (local_op, y_part) = if slab.len == d {
            (setup.operator, None)
        } else {
            let (op, range) = local_observe(&setup.operator, &slab, ranks)?;
            (op, Some((backend.zeros(1, range.len())?, range)))
        };
        let truth_part = if slab.len == d {
            None
        } else {
            Some(backend.zeros(1, slab.len)?)
        };
        let fallback = if setup.on_divergence == OnDivergence::Record {
            Some(backend.zeros(n, slab.len)?)
        } else {
            None
        };
        let mut cycle = Cycle {
            backend,
            stages: EnsembleStages::new(
                backend,
                filter,
                backend.zeros(n, slab.len)?,
                Arc::new(local_op),
                setup.noise_std,
            )?,
            placement,
            truth,
            truth_part,
            fallback,
            hx: backend.zeros(1, m)?,
            y: backend.zeros(1, m)?,
            y_part,
            completed: 0,
            setup,
        };
        cycle.restrict_truth()?;
        cycle.draw_initial(0)?;
        Ok(cycle)
    }

    /// Continues after cycle `completed` from a saved truth (`d` values), whole ensemble
    /// (`n × d`) and filter state (a checkpoint).
    pub fn resume(
        &mut self,
        completed: usize,
        truth: &[f32],
        ensemble: &[f32],
        filter_state: &[f64],
    ) -> Result<()> {
        let slab = self.placement.slab();
        let n = self.setup.n;
        if truth.len() != slab.d || ensemble.len() != n * slab.d {
            return Err(Error::shape(
                "checkpoint ensemble",
                format!("{n} × {}", slab.d),
                format!("{} values and a truth of {}", ensemble.len(), truth.len()),
            ));
        }
        self.backend.write(&mut self.truth, truth)?;
        let part: Vec<f32> = ensemble
            .chunks(slab.d)
            .flat_map(|row| &row[slab.start..slab.end()])
            .copied()
            .collect();
        self.backend.write(&mut self.stages.ensemble, &part)?;
        self.restrict_truth()?;
        self.stages.filter.restore_state(filter_state)?;
        self.completed = completed;
        Ok(())
    }

    /// Cycles completed so far.
    pub fn completed(&self) -> usize {
        self.completed
    }

    /// The backend.
    pub fn backend(&self) -> &'b B {
        self.backend
    }

    /// The filter.
    pub fn filter(&self) -> &dyn Filter<B> {
        self.stages.filter.as_ref()
    }

    /// The placement of the state.
    pub fn placement(&self) -> &dyn Placement<B> {
        self.placement.as_ref()
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.setup.model
    }

    /// The truth (`1 × d`) at the last observation time.
    pub fn truth(&self) -> &B::Buffer {
        &self.truth
    }

    /// This process's part of the analysis ensemble (`n × len`; the whole `n × d` in one
    /// process).
    pub fn ensemble(&self) -> &B::Buffer {
        &self.stages.ensemble
    }

    /// The whole analysis ensemble on the host (a collective over the processes).
    pub fn gather_ensemble(&self) -> Result<Vec<f32>> {
        self.placement.gather(self.backend, &self.stages.ensemble)
    }

    /// Model time of cycle `cycle` (1-based).
    pub fn time_of(&self, cycle: usize) -> f64 {
        (self.setup.spinup + (cycle - 1) * self.setup.obs_every) as f64 * self.setup.model.dt as f64
    }

    fn truth_here(&self) -> &B::Buffer {
        self.truth_part.as_ref().unwrap_or(&self.truth)
    }

    /// Copies this process's components of the truth into its part.
    fn restrict_truth(&mut self) -> Result<()> {
        if let Some(part) = self.truth_part.as_mut() {
            let slab = self.placement.slab();
            let host = self.backend.read(&self.truth)?;
            self.backend.write(part, &host[slab.start..slab.end()])?;
        }
        Ok(())
    }

    /// Draws the initial ensemble; `draw` 0 at the start, the cycle number when a diverged
    /// ensemble is drawn afresh.
    fn draw_initial(&mut self, draw: usize) -> Result<()> {
        let key = NoiseKey::new(self.setup.seed, Stream::InitialEnsemble, draw as u32);
        let centre = if self.setup.initial.on_truth {
            Some(self.truth_part.as_ref().unwrap_or(&self.truth))
        } else {
            None
        };
        self.placement.fill_normal(
            self.backend,
            &mut self.stages.ensemble,
            key,
            centre,
            self.setup.initial.std,
        )
    }

    fn fault_at(&self, cycle: usize, stage: FaultStage) -> bool {
        self.setup.fault == Some(Fault::NonFinite { cycle, stage })
    }

    /// The forecast stage: keeps the previous analysis (for filters that need it) and
    /// advances the ensemble by one observation interval (none before the first cycle: the
    /// ensemble starts at the first observation time). Returns its wall time in seconds.
    pub fn forecast(&mut self) -> Result<f64> {
        let started = Instant::now();
        self.stages.keep_previous()?;
        if self.completed > 0 {
            self.placement.forecast(
                self.backend,
                &self.setup.model,
                &mut self.stages.ensemble,
                self.setup.obs_every,
            )?;
            // Wait for queued device work so the forecast time is the real one.
            self.backend.sync()?;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// The analysis stage for the observation in `self.y` at `cycle`.
    fn analyse(&mut self, cycle: usize) -> Result<()> {
        let y = match self.y_part.as_mut() {
            Some((part, range)) => {
                let host = self.backend.read(&self.y)?;
                self.backend.write(part, &host[range.clone()])?;
                &*part
            }
            None => &self.y,
        };
        self.stages.analyse(y, cycle as u32)
    }

    /// Advances one cycle: truth, observation, forecast, analysis, metrics.
    pub fn step(&mut self) -> Result<CycleOutcome> {
        let backend = self.backend;
        let k = self.completed;
        let cycle = k + 1;
        let mut diverged: Option<DivergenceEvent> = None;
        let seconds_forecast = self.forecast()?;
        if k > 0 {
            backend.advance(&self.setup.model, &mut self.truth, self.setup.obs_every)?;
        }
        if self.fault_at(cycle, FaultStage::Forecast) {
            poison(backend, &mut self.stages.ensemble)?;
        }
        if self.fault_at(cycle, FaultStage::Metrics) {
            poison(backend, &mut self.truth)?;
        }
        self.restrict_truth()?;
        let mut fc = self
            .placement
            .stats(backend, &self.stages.ensemble, self.truth_here())?;
        if !(fc.rmse.is_finite() && fc.spread.is_finite()) {
            let mut event = locate(
                backend,
                &self.stages.ensemble,
                self.truth_here(),
                cycle,
                "forecast",
            )?;
            self.agree_on_stage(&mut event, "forecast")?;
            if event.stage == "forecast" {
                event.detail = format!("{}; {}", event.detail, self.forecast_hint());
            }
            if self.setup.on_divergence == OnDivergence::Stop || event.stage == "metrics" {
                return Err(event.into_error());
            }
            // Record: start again from a fresh draw of the initial ensemble.
            self.draw_initial(cycle)?;
            fc = self
                .placement
                .stats(backend, &self.stages.ensemble, self.truth_here())?;
            log::warn!("{} ; the ensemble was drawn afresh", event.message());
            diverged = Some(DivergenceEvent {
                detail: format!("{}; the ensemble was drawn afresh", event.detail),
                ..event
            });
        }

        // Observation y = h(x_true) + σ_y η of the whole truth (every process draws the same).
        backend.observe(&self.setup.operator, &self.truth, &mut self.hx)?;
        backend.fill_normal(
            &mut self.y,
            NoiseKey::new(self.setup.seed, Stream::Observation, cycle as u32),
            Some(&self.hx),
            self.setup.noise_std,
        )?;

        // Analysis.
        if let Some(f) = self.fallback.as_mut() {
            backend.copy(&self.stages.ensemble, f)?;
        }
        self.stages.filter.inject_fault(match self.setup.fault {
            Some(Fault::NonFinite {
                cycle: c,
                stage: FaultStage::FlowStep(s),
            }) if c == cycle => Some(InjectedFault::FlowStep(s)),
            Some(Fault::NonFinite {
                cycle: c,
                stage: FaultStage::Guidance,
            }) if c == cycle => Some(InjectedFault::Guidance),
            _ => None,
        });
        let t_analysis = Instant::now();
        let outcome = self.analyse(cycle);
        let nan = EnsembleStats {
            rmse: f64::NAN,
            spread: f64::NAN,
        };
        let mut failure: Option<(String, String)> = match outcome {
            Ok(()) => None,
            // A filter that locates the failure itself (EnFF: flow step k).
            Err(Error::Diverged { stage, detail, .. }) => Some((stage, detail)),
            Err(e @ Error::NonFinite { .. }) => Some(("analysis".to_string(), e.to_string())),
            Err(other) => return Err(other),
        };
        let ranks = self.placement.ranks();
        let mut an = if failure.is_none() || ranks > 1 {
            // Over several processes the reduction runs on every one of them, failed or not.
            self.placement
                .stats(backend, &self.stages.ensemble, self.truth_here())?
        } else {
            nan
        };
        // Every process takes part in the agreement (no short cut past the collective).
        if self.agree(failure.is_some())? {
            an = nan;
        }
        let seconds_analysis = t_analysis.elapsed().as_secs_f64();
        if !(an.rmse.is_finite() && an.spread.is_finite()) {
            let event = match failure.take() {
                Some((stage, detail)) => DivergenceEvent {
                    cycle,
                    stage,
                    detail,
                },
                None => locate(
                    backend,
                    &self.stages.ensemble,
                    self.truth_here(),
                    cycle,
                    "analysis",
                )?,
            };
            let mut event = event;
            self.agree_on_stage(&mut event, "analysis")?;
            match (&self.fallback, self.setup.on_divergence) {
                (Some(f), OnDivergence::Record) if event.stage != "metrics" => {
                    backend.copy(f, &mut self.stages.ensemble)?;
                    log::warn!("{}; the forecast was kept as the analysis", event.message());
                    an = self
                        .placement
                        .stats(backend, &self.stages.ensemble, self.truth_here())?;
                    diverged = Some(DivergenceEvent {
                        detail: format!("{}; the forecast was kept", event.detail),
                        ..event
                    });
                }
                _ => return Err(event.into_error()),
            }
        }
        self.completed = cycle;
        Ok(CycleOutcome {
            metrics: CycleMetrics {
                cycle,
                time: self.time_of(cycle),
                rmse_forecast: fc.rmse,
                spread_forecast: fc.spread,
                rmse: an.rmse,
                spread: an.spread,
                seconds_forecast,
                seconds_analysis,
                ess: self.stages.filter.effective_sample_size(),
            },
            divergence: diverged,
        })
    }

    /// True when `flag` holds on any process (a collective over several processes).
    fn agree(&self, flag: bool) -> Result<bool> {
        if self.placement.ranks() == 1 {
            return Ok(flag);
        }
        let mut v = [if flag { 1.0 } else { 0.0 }];
        self.placement.sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Makes every process name the same stage for a divergence: the ensemble's (`stage`, or
    /// the filter's own) when it is non-finite on any process, else `metrics`; so that every
    /// process then stops, or recovers, in step.
    fn agree_on_stage(&self, event: &mut DivergenceEvent, stage: &str) -> Result<()> {
        let here = event.stage != "metrics";
        if self.agree(here)? && !here {
            event.stage = stage.to_string();
            event.detail = format!("non-finite values in the {stage} ensemble of another rank");
        }
        Ok(())
    }

    /// What to try when the forecast blew up (appended to the divergence report).
    fn forecast_hint(&self) -> String {
        let model = &self.setup.model;
        let every = self.setup.obs_every;
        match &model.system {
            // Forward Euler with central advection amplifies grid-scale modes by about
            // 1 + (|u|·dt/h)²/2 per step, which viscosity no longer damps once a member's local
            // velocity grows: the step must shrink (ns_64's seed 715319214 blows up at
            // dt = 1e-3 and runs with dt = 5e-4).
            System::NavierStokes2d(ns) => format!(
                "the explicit Navier–Stokes step is stable only while max|u|·dt/h stays well \
                 below 1 (h = {:.4}): halve model.dt and double observe.obs_every (now {} and \
                 {every}) to keep the observation interval",
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
}

/// The ensemble side of a cycle, shared by every driver: the filter, the ensemble on the
/// backend and the previous analysis (for filters that flow from it), with the stage that keeps
/// the previous analysis before a forecast and the analysis stage. The twin-experiment stepper
/// [`Cycle`] and the `Assimilator` (forecasts and observations from the caller) are built on it.
pub struct EnsembleStages<'b, B: Backend> {
    backend: &'b B,
    filter: Box<dyn Filter<B>>,
    ensemble: B::Buffer,
    previous: Option<B::Buffer>,
    operator: Arc<dyn ObservationOperator>,
    noise_std: f32,
}

impl<'b, B: Backend> EnsembleStages<'b, B> {
    /// The stages of `filter` on `ensemble`, observed through `operator` with noise std
    /// `noise_std`; the previous analysis starts as a copy of `ensemble` when the filter needs
    /// one.
    pub fn new(
        backend: &'b B,
        filter: Box<dyn Filter<B>>,
        ensemble: B::Buffer,
        operator: Arc<dyn ObservationOperator>,
        noise_std: f32,
    ) -> Result<Self> {
        let previous = if filter.needs_previous_analysis() {
            let mut p = backend.zeros(ensemble.rows(), ensemble.cols())?;
            backend.copy(&ensemble, &mut p)?;
            Some(p)
        } else {
            None
        };
        Ok(EnsembleStages {
            backend,
            filter,
            ensemble,
            previous,
            operator,
            noise_std,
        })
    }

    /// The filter.
    pub fn filter(&self) -> &dyn Filter<B> {
        self.filter.as_ref()
    }

    /// The ensemble (`n × d`, or this process's slab).
    pub fn ensemble(&self) -> &B::Buffer {
        &self.ensemble
    }

    /// The ensemble, to be advanced or replaced by a forecast.
    pub fn ensemble_mut(&mut self) -> &mut B::Buffer {
        &mut self.ensemble
    }

    /// The previous analysis, for filters that need one.
    pub fn previous_mut(&mut self) -> Option<&mut B::Buffer> {
        self.previous.as_mut()
    }

    /// The observation operator.
    pub fn operator(&self) -> &dyn ObservationOperator {
        self.operator.as_ref()
    }

    /// Keeps the current ensemble as the previous analysis (before a forecast replaces it).
    pub fn keep_previous(&mut self) -> Result<()> {
        if let Some(p) = self.previous.as_mut() {
            self.backend.copy(&self.ensemble, p)?;
        }
        Ok(())
    }

    /// Replaces the forecast by the analysis for the observation `y` (`1 × m`) of `cycle`.
    pub fn analyse(&mut self, y: &B::Buffer, cycle: u32) -> Result<()> {
        let obs = Observation {
            y,
            operator: self.operator.as_ref(),
            noise_std: self.noise_std,
        };
        self.filter.analyse(
            self.backend,
            &mut self.ensemble,
            self.previous.as_ref(),
            &obs,
            cycle,
        )
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
