//! Data assimilation around your own model: a builder for the filters of enff, driven one
//! cycle at a time by your code.
//!
//! [`Assimilator::builder`] takes a filter (by name, tuned with `filter.*` settings as on the
//! command line), an observation operator (a built-in [`Observe`] or your own
//! [`ObservationOperator`]), the observation noise, an initial ensemble and, optionally, a
//! forecast model: a closure that advances one member in place, a vector field
//! ([`Dynamics`]) integrated by Runge–Kutta, or a built-in [`Model`]. [`AssimilatorBuilder::build`]
//! places everything on a backend — the CPU reference or the GPU — and each cycle is then
//! [`Assimilator::forecast`] followed by [`Assimilator::analyse`]. A forecast made elsewhere
//! enters with [`Assimilator::set_ensemble`].
//!
//! Backends: the CPU runs everything. On the GPU the analysis runs on the device with the
//! built-in observation operators; forecasts by closure or by a user vector field run on the
//! host (the ensemble is copied down and back each cycle), built-in models on the device. A
//! user observation operator on the GPU is refused with [`Error::Unsupported`].
//!
//! ```
//! use enff::backend::cpu::Cpu;
//! use enff::observe::Observe;
//! use enff::{Assimilator, Ensemble};
//!
//! # fn main() -> enff::Result<()> {
//! // A damped rotation of the plane, advanced by a closure (one member in place).
//! let (c, s) = (0.3f32.cos() * 0.99, 0.3f32.sin() * 0.99);
//! let step = move |x: &mut [f32]| {
//!     let (a, b) = (x[0], x[1]);
//!     x[0] = c * a - s * b;
//!     x[1] = s * a + c * b;
//! };
//! let initial = Ensemble::from_rows(&[
//!     vec![1.0, 0.2], vec![0.8, -0.1], vec![1.2, 0.1], vec![0.9, 0.3], vec![1.1, -0.2],
//! ])?;
//! let cpu = Cpu::new();
//! let mut da = Assimilator::builder()
//!     .filter("enff-ot")
//!     .set("filter.flow_steps=10")
//!     .operator(Observe::identity())
//!     .obs_noise_std(0.1)
//!     .forecast_fn(step)
//!     .initial_ensemble(initial)
//!     .seed(1)
//!     .build(&cpu)?;
//! let mut truth = [1.0f32, 0.0];
//! for _ in 0..5 {
//!     step(&mut truth);
//!     da.forecast()?;
//!     da.analyse(&truth)?; // a perfect observation, for the example
//! }
//! let mean = da.mean()?;
//! assert!((mean[0] - truth[0] as f64).abs() < 0.3);
//! assert_eq!(da.cycle(), 6);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::{cpu::Cpu, Backend, DeviceBuffer};
use crate::cycle::EnsembleStages;
use crate::error::{check_finite, check_positive, Error, Result};
use crate::experiment::{build_filter, build_filter_on, preset, Config, DEFAULT_PRESET};
use crate::model::{Dynamics, Model, Scheme, System};
use crate::observe::{ObservationOperator, Observe};
use crate::Ensemble;

/// A forecast closure: advances one member (a state of length `d`) in place.
pub type MemberStep = dyn Fn(&mut [f32]) + Send + Sync;

/// How the assimilator forecasts.
#[derive(Clone)]
enum Forecast {
    /// No model: forecasts come from outside ([`Assimilator::set_ensemble`]).
    None,
    /// A model run by the backend (`steps` model steps per cycle); user vector fields run on
    /// the host when the backend cannot integrate them.
    Model { model: Model, steps: usize },
    /// A closure applied to every member on the host.
    Closure(Arc<MemberStep>),
}

/// Builds an [`Assimilator`]; see the [module documentation](self).
pub struct AssimilatorBuilder {
    config: Option<Config>,
    deferred: Option<Error>,
    operator: Arc<dyn ObservationOperator>,
    noise_std: Option<f32>,
    forecast: Forecast,
    initial: Option<Ensemble>,
    previous: Option<Ensemble>,
    first_cycle: u32,
    /// The `filter.*` settings given, in order (a change of guidance resolves against them).
    sets: Vec<String>,
    /// The guidance of the starting configuration (the default preset's).
    base_guidance: crate::flow::GuidanceKind,
}

impl Default for AssimilatorBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl AssimilatorBuilder {
    /// EnFF-F2P with the default preset's settings, identity observations, seed 0.
    pub fn new() -> Self {
        let (config, deferred) = match preset(DEFAULT_PRESET) {
            Ok(p) => (Some(p.config), None),
            Err(e) => (None, Some(e)),
        };
        let base_guidance = config
            .as_ref()
            .map_or(crate::flow::GuidanceKind::Local, |c| c.filter.guidance);
        AssimilatorBuilder {
            config,
            deferred,
            operator: Arc::new(Observe::identity()),
            noise_std: None,
            forecast: Forecast::None,
            initial: None,
            previous: None,
            first_cycle: 1,
            sets: Vec::new(),
            base_guidance,
        }
        .seed(0)
    }

    fn with_config(self, f: impl FnOnce(&mut Config) -> Result<()>) -> Self {
        let mut s = self;
        let r = match s.config.as_mut() {
            Some(c) => f(c),
            None => Ok(()),
        };
        s.defer(r)
    }

    fn defer(mut self, r: Result<()>) -> Self {
        if let (Err(e), None) = (r, &self.deferred) {
            self.deferred = Some(e);
        }
        self
    }

    /// The filter: `enff-f2p` (default), `enff-ot`, `ensf`, `etkf`, `letkf`, `enkf` or `bpf`.
    pub fn filter(mut self, name: &str) -> Self {
        let assignment = format!("filter.kind={name}");
        self.sets.push(assignment.clone());
        self.with_config(|c| c.set(&assignment))
    }

    /// One `filter.key=value` setting, as `--set` on the command line (e.g.
    /// `filter.sigma_min=0.05`, `filter.inflation=1.02`). Errors surface at [`Self::build`].
    pub fn set(mut self, assignment: &str) -> Self {
        self.sets.push(assignment.to_string());
        self.with_config(|c| {
            check_filter_key(assignment, c)?;
            c.set(assignment)
        })
    }

    /// Seed of the filter's random streams (source noise, perturbed observations, resampling).
    pub fn seed(self, seed: u64) -> Self {
        self.with_config(|c| {
            c.experiment.seed = seed;
            Ok(())
        })
    }

    /// The observation operator `h` (default: the identity).
    pub fn operator(mut self, op: impl ObservationOperator + 'static) -> Self {
        self.operator = Arc::new(op);
        self
    }

    /// [`Self::operator`] for an operator already behind an `Arc`.
    pub fn operator_arc(mut self, op: Arc<dyn ObservationOperator>) -> Self {
        self.operator = op;
        self
    }

    /// Observation noise std `σ_y` (diagonal `R = σ_y² I`); required.
    pub fn obs_noise_std(mut self, std: f32) -> Self {
        self.noise_std = Some(std);
        self
    }

    /// The initial ensemble (`n × d`, rows = members); required.
    pub fn initial_ensemble(mut self, ensemble: Ensemble) -> Self {
        self.initial = Some(ensemble);
        self
    }

    /// The previous analysis EnFF-F2P flows from at the first analysis (default: the initial
    /// ensemble itself, as in a twin experiment's first cycle).
    pub fn previous_analysis(mut self, ensemble: Ensemble) -> Self {
        self.previous = Some(ensemble);
        self
    }

    /// Number of the first analysis cycle (default 1). With the seed it picks the random
    /// numbers of the analysis, so a restarted run continues with new noise.
    pub fn first_cycle(mut self, cycle: u32) -> Self {
        self.first_cycle = cycle;
        self
    }

    /// Forecasts with a closure that advances one member in place; members run in parallel.
    pub fn forecast_fn(mut self, step: impl Fn(&mut [f32]) + Send + Sync + 'static) -> Self {
        self.forecast = Forecast::Closure(Arc::new(step));
        self
    }

    /// Forecasts with a user vector field `dx/dt = f(x)`: `steps` Runge–Kutta steps of `dt`
    /// per cycle (Kutta's 3/8 rule).
    pub fn dynamics(mut self, f: impl Dynamics + 'static, dt: f32, steps: usize) -> Self {
        match Model::new(System::Custom(Arc::new(f)), dt, Scheme::Rk4ThreeEighths) {
            Ok(model) => {
                self.forecast = Forecast::Model { model, steps };
                self
            }
            Err(e) => self.defer(Err(e)),
        }
    }

    /// Forecasts with a model (built-in or custom), `steps` model steps per cycle.
    pub fn model(mut self, model: Model, steps: usize) -> Self {
        self.forecast = Forecast::Model { model, steps };
        self
    }

    /// The builder, or the first error met so far (an unknown filter or setting, a value out
    /// of range), before an ensemble is given: lets a caller refuse a bad configuration up
    /// front.
    pub fn validated(self) -> Result<Self> {
        if let Some(e) = self.deferred {
            return Err(e);
        }
        if let Some(c) = &self.config {
            let mut c = c.clone();
            c.resolve_guidance(self.base_guidance, &self.sets);
            c.validate()?;
            c.filter_kind()?;
        }
        Ok(self)
    }

    /// Checks everything and places the ensemble on `backend`.
    pub fn build<B: Backend + 'static>(self, backend: &B) -> Result<Assimilator<'_, B>> {
        let mut config = match (self.deferred, self.config) {
            (Some(e), _) => return Err(e),
            (None, Some(c)) => c,
            (None, None) => return Err(Error::invalid("filter", "none", "choose a filter")),
        };
        let initial = self.initial.ok_or_else(|| {
            Error::invalid(
                "initial ensemble",
                "none",
                "give the builder an n x d ensemble with .initial_ensemble(..)",
            )
        })?;
        let (n, d) = (initial.n(), initial.d());
        if config.filter_kind()? == crate::filter::FilterKind::Kf {
            return Err(Error::invalid(
                "filter.kind",
                "kf",
                "the exact Kalman filter runs in twin experiments of the rotation2d preset only: \
                 choose an ensemble filter (etkf is its ensemble counterpart)",
            ));
        }
        config.ensemble.n = n;
        // The geometry localizing filters use: the forecast model's; for the caller's own
        // forecast a ring of the ensemble's d components when the configured model is the
        // default Lorenz-96 (at least 4 components), else none (a state without spatial
        // structure: global gains, and localization is refused).
        let (geometry, kf_model) = match &self.forecast {
            Forecast::Model { model, .. } => (model.geometry(), Some(model.clone())),
            _ => {
                let ring = config.model.system == crate::experiment::config::SystemKind::Lorenz96;
                let g = if ring && d >= 4 {
                    crate::model::Geometry::Ring { len: d }
                } else if ring {
                    crate::model::Geometry::None
                } else {
                    config.model()?.geometry()
                };
                (g, None)
            }
        };
        // A guidance chosen here brings its own defaults for the settings not given (those
        // that depend on the geometry follow the state's).
        for w in config.resolve_guidance_on(self.base_guidance, &self.sets, geometry.is_spatial()) {
            log::warn!("{w}");
        }
        config.validate()?;
        let noise_std = self.noise_std.ok_or_else(|| {
            Error::invalid(
                "obs_noise_std",
                "none",
                "set the observation noise std with .obs_noise_std(..)",
            )
        })?;
        check_positive(
            "obs_noise_std",
            noise_std as f64,
            "the observation noise std must be a finite positive number",
        )?;
        check_finite(
            "initial ensemble",
            initial.as_slice(),
            d,
            "the ensemble must be finite",
        )?;
        let m = self.operator.obs_dim(d)?;
        if let Forecast::Model { model, .. } = &self.forecast {
            if model.dim() != d {
                return Err(Error::shape(
                    "forecast model",
                    format!("state dimension {d} (the ensemble's)"),
                    format!("{} ({})", model.dim(), model.name()),
                ));
            }
        }
        if backend.name() != "cpu" && self.operator.builtin().is_none() {
            return Err(Error::Unsupported {
                backend: backend.name().to_string(),
                what: format!("the user observation operator `{}`", self.operator.name()),
                fix: "run on the CPU backend, or express h with enff::observe::Observe".into(),
            });
        }
        let filter = match &kf_model {
            Some(model) => build_filter::<B>(&config, model)?,
            None => build_filter_on::<B>(&config, geometry, d)?,
        };
        let ensemble = backend.upload(n, d, initial.as_slice())?;
        let mut stages =
            EnsembleStages::new(backend, filter, ensemble, self.operator.clone(), noise_std)?;
        if let Some(p) = &self.previous {
            if (p.n(), p.d()) != (n, d) {
                return Err(Error::shape(
                    "previous analysis",
                    format!("{n} x {d} (the ensemble's shape)"),
                    format!("{} x {}", p.n(), p.d()),
                ));
            }
            check_finite(
                "previous analysis",
                p.as_slice(),
                d,
                "the previous analysis must be finite",
            )?;
            // Filters without a previous analysis keep none; the others default to the
            // initial ensemble.
            if let Some(previous) = stages.previous_mut() {
                backend.write(previous, p.as_slice())?;
            }
        }
        let y = backend.zeros(1, m)?;
        Ok(Assimilator {
            backend,
            stages,
            y,
            forecast: self.forecast,
            cycle: self.first_cycle,
            n,
            d,
            m,
        })
    }
}

/// Accepts `filter.*` settings other than the filter's name, which has its own call.
pub(crate) fn check_filter_key(assignment: &str, config: &Config) -> Result<()> {
    let key = assignment
        .split_once('=')
        .map_or(assignment, |(k, _)| k)
        .trim();
    if key.starts_with("filter.") && key != "filter.kind" {
        return Ok(());
    }
    let known = crate::experiment::config::setting_keys(
        &serde_json::to_value(config).unwrap_or(serde_json::Value::Null),
    )
    .into_iter()
    .filter(|k| k.starts_with("filter.") && k != "filter.kind")
    .collect::<Vec<_>>()
    .join(", ");
    Err(Error::UnknownSetting {
        key: key.to_string(),
        known: format!("{known} (the filter is chosen by name, the seed separately)"),
    })
}

/// A filter, an ensemble on a backend and a forecast model, advanced one cycle at a time.
pub struct Assimilator<'b, B: Backend> {
    backend: &'b B,
    /// The filter, the ensemble and the previous analysis: the cycle's ensemble stages.
    stages: EnsembleStages<'b, B>,
    y: B::Buffer,
    forecast: Forecast,
    cycle: u32,
    n: usize,
    d: usize,
    m: usize,
}

impl Assimilator<'static, Cpu> {
    /// A new builder (the same as [`AssimilatorBuilder::new`]).
    pub fn builder() -> AssimilatorBuilder {
        AssimilatorBuilder::new()
    }
}

impl<'b, B: Backend + 'static> Assimilator<'b, B> {
    /// Ensemble size `n`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// State dimension `d`.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Observation dimension `m`.
    pub fn m(&self) -> usize {
        self.m
    }

    /// The cycle number the next analysis gets.
    pub fn cycle(&self) -> u32 {
        self.cycle
    }

    /// The filter's name.
    pub fn filter_name(&self) -> String {
        self.stages.filter().name()
    }

    /// The backend.
    pub fn backend(&self) -> &'b B {
        self.backend
    }

    /// The ensemble as it lives on the backend.
    pub fn buffer(&self) -> &B::Buffer {
        self.stages.ensemble()
    }

    /// Advances every member to the next observation time with the builder's model; the
    /// current ensemble becomes the previous analysis.
    pub fn forecast(&mut self) -> Result<()> {
        let forecast = self.forecast.clone();
        match forecast {
            Forecast::None => {
                return Err(Error::invalid(
                    "forecast model",
                    "none",
                    "give the builder a model (.forecast_fn, .dynamics or .model) or pass \
                     forecasts made elsewhere to set_ensemble",
                ))
            }
            Forecast::Model { model, steps } => {
                self.stages.keep_previous()?;
                match self
                    .backend
                    .advance(&model, self.stages.ensemble_mut(), steps)
                {
                    Err(Error::Unsupported { .. }) if matches!(model.system, System::Custom(_)) => {
                        // A user vector field: integrate on the host.
                        let cpu = Cpu::new();
                        let mut host = cpu.upload(
                            self.n,
                            self.d,
                            &self.backend.read(self.stages.ensemble())?,
                        )?;
                        cpu.advance(&model, &mut host, steps)?;
                        self.backend
                            .write(self.stages.ensemble_mut(), &cpu.read(&host)?)?;
                    }
                    other => other?,
                }
            }
            Forecast::Closure(step) => {
                self.stages.keep_previous()?;
                let mut host = self.backend.read(self.stages.ensemble())?;
                host.par_chunks_mut(self.d).for_each(|member| step(member));
                check_finite(
                    "forecast ensemble",
                    &host,
                    self.d,
                    "the forecast closure produced a non-finite value",
                )?;
                self.backend.write(self.stages.ensemble_mut(), &host)?;
            }
        }
        self.backend
            .check_finite(self.stages.ensemble(), "forecast ensemble")?;
        Ok(())
    }

    /// Replaces the ensemble by a forecast made elsewhere (same `n × d`); the current ensemble
    /// becomes the previous analysis.
    pub fn set_ensemble(&mut self, forecast: &Ensemble) -> Result<()> {
        if (forecast.n(), forecast.d()) != (self.n, self.d) {
            return Err(Error::shape(
                "forecast ensemble",
                format!("{} x {}", self.n, self.d),
                format!("{} x {}", forecast.n(), forecast.d()),
            ));
        }
        check_finite(
            "forecast ensemble",
            forecast.as_slice(),
            self.d,
            "the forecast must be finite",
        )?;
        self.stages.keep_previous()?;
        self.backend
            .write(self.stages.ensemble_mut(), forecast.as_slice())
    }

    /// Starts afresh from a forecast made elsewhere, as an assimilator just built with it
    /// would: the ensemble becomes `forecast`, the previous analysis `previous` (default: the
    /// forecast itself) and the next analysis gets number `cycle`. The buffers and the filter
    /// are reused, so a caller analysing many forecasts of one shape builds once; the analysis
    /// that follows equals [`crate::experiment::assimilate::assimilate`] on the same inputs.
    pub fn restart(
        &mut self,
        forecast: &Ensemble,
        previous: Option<&Ensemble>,
        cycle: u32,
    ) -> Result<()> {
        for (what, e) in [
            ("forecast ensemble", Some(forecast)),
            ("previous analysis", previous),
        ] {
            let Some(e) = e else { continue };
            if (e.n(), e.d()) != (self.n, self.d) {
                return Err(Error::shape(
                    what,
                    format!("{} x {}", self.n, self.d),
                    format!("{} x {}", e.n(), e.d()),
                ));
            }
            check_finite(what, e.as_slice(), self.d, "the ensemble must be finite")?;
        }
        self.backend
            .write(self.stages.ensemble_mut(), forecast.as_slice())?;
        if let Some(p) = self.stages.previous_mut() {
            self.backend
                .write(p, previous.unwrap_or(forecast).as_slice())?;
        }
        self.cycle = cycle;
        Ok(())
    }

    /// The analysis for observation `y` (length `m`): replaces the forecast by the analysis
    /// and moves on to the next cycle.
    pub fn analyse(&mut self, y: &[f32]) -> Result<()> {
        if y.len() != self.m {
            return Err(Error::shape(
                "observation",
                format!(
                    "{} values (h = {} on d = {})",
                    self.m,
                    self.stages.operator().name(),
                    self.d
                ),
                format!("{} values", y.len()),
            ));
        }
        check_finite("observation", y, 0, "observations must be finite")?;
        self.backend.write(&mut self.y, y)?;
        self.stages.analyse(&self.y, self.cycle)?;
        self.backend.sync()?;
        self.cycle += 1;
        Ok(())
    }

    /// The ensemble, copied to the host.
    pub fn ensemble(&self) -> Result<Ensemble> {
        Ensemble::from_vec(self.n, self.d, self.backend.read(self.stages.ensemble())?)
    }

    /// The ensemble mean.
    pub fn mean(&self) -> Result<Vec<f64>> {
        Ok(self.ensemble()?.mean())
    }

    /// `h(x)` of one state, e.g. to make synthetic observations of a truth.
    pub fn observe(&self, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != self.d {
            return Err(Error::shape(
                "state",
                format!("{} values", self.d),
                format!("{} values", x.len()),
            ));
        }
        let mut y = vec![0.0; self.m];
        self.stages.operator().apply(x, &mut y);
        Ok(y)
    }

    /// RMSE of the ensemble mean against `truth` and the spread, reduced on the backend.
    pub fn stats(&self, truth: &[f32]) -> Result<crate::backend::EnsembleStats> {
        if truth.len() != self.d {
            return Err(Error::shape(
                "truth",
                format!("{} values", self.d),
                format!("{} values", truth.len()),
            ));
        }
        let t = self.backend.upload(1, self.d, truth)?;
        debug_assert_eq!(t.cols(), self.d);
        self.backend.ensemble_stats(self.stages.ensemble(), &t)
    }
}
