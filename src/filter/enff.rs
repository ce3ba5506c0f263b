//! The Ensemble Flow Filter (ENFF_SPEC §4.1): every member flows from a source sample to the
//! analysis along the Monte-Carlo marginal velocity of a probability path whose target is the
//! forecast ensemble, steered by observation guidance.

use crate::backend::{
    Backend, DeviceBuffer, FlowUpdate, GainStep, Guidance, InnovationClip, LocalGains,
};
use crate::error::{check_positive, Error, Result};
use crate::filter::covariance::{self, DeviceGains};
use crate::filter::{Filter, Observation};
use crate::flow::{time_grid, GainSchedule, GuidanceKind, Integrator, Path, PathKind};
use crate::model::Geometry;
use crate::observe::Observe;
use crate::partition::halo::{HaloBuffers, HaloPlan};
use crate::rng::{NoiseKey, Stream};

/// Configuration of [`Enff`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EnffConfig {
    /// Probability path: `ot` or `f2p`.
    pub path: PathKind,
    /// Noise floor / kernel bandwidth `σ_min > 0`.
    pub sigma_min: f32,
    /// Guidance scale `λ ≥ 0` (the spec's constant schedule).
    pub guidance_scale: f32,
    /// Number of velocity-evaluation steps (Euler) or Heun steps; the paper's `K` grid points
    /// equal `flow_steps + 1`.
    pub flow_steps: usize,
    /// `euler` (the reference) or `heun`.
    pub integrator: Integrator,
    /// `local` (the paper's), `monte_carlo` (exact, the particle-filter bridge), `none` or
    /// `covariance` (localized Kalman-gain guidance, [`crate::filter::covariance`]).
    pub guidance: GuidanceKind,
    /// Multiplicative inflation of the analysis (1.0 = none).
    pub inflation: f32,
    /// Seed of the source noise (combined with the cycle number).
    pub seed: u64,
    /// Covariance guidance: Gaspari–Cohn localization radius in grid spacings; `None` is the
    /// global gain (every component sees every observation, no taper), which is also used for
    /// models without a spatial geometry.
    #[serde(default = "default_loc_radius")]
    pub loc_radius: Option<f64>,
    /// Covariance guidance: number of guidance stages, `1 ..= flow_steps`.
    #[serde(default = "default_gain_stages")]
    pub gain_stages: usize,
    /// Covariance guidance: `false` (default) builds the gains of every stage in one pass at
    /// the first stage, from one linearization of `h` (the stage-independent `O(n²·w)` part
    /// shared, one small factorization per stage); `true` recomputes them at every stage,
    /// re-linearized at that stage's endpoint mean (an iterated EnKF in pseudo-time, the gain
    /// cost times the stages). Both are the same for linear `h`.
    #[serde(default = "default_relinearize")]
    pub relinearize: bool,
    /// Covariance guidance: `homotopy` (tempered stages, exact Kalman mean for linear `h`) or
    /// `constant` (`λ·K·(y − h(x̂₁))` at every step).
    #[serde(default)]
    pub gain_schedule: GainSchedule,
    /// Covariance guidance: innovations are clamped to `±c·√(var h(x_f) + σ_y²)` per
    /// observation (a background check that bounds a stage's step by about `c` forecast
    /// standard deviations where `h` saturates); 0 = off.
    #[serde(default = "default_innovation_clip")]
    pub innovation_clip: f32,
    /// Adaptive prior inflation: before the analysis the forecast is inflated by the factor
    /// the innovation statistics ask for, `γ² = (‖y − h̄‖² − m σ_y²)/Σ_q var h_q`, limited to
    /// `[1, adaptive_inflation]`; 1.0 = off.
    #[serde(default = "default_adaptive_inflation")]
    pub adaptive_inflation: f32,
    /// Where the transport weights are evaluated: `false` (the paper's) at the guided state
    /// `x`; `true` at the member's unguided position (the source sample carried by the
    /// transport alone), so that the guidance's displacement never hands a member over to
    /// another member's path. Euler only; costs one extra velocity evaluation per step.
    #[serde(default)]
    pub unguided_weights: bool,
}

fn default_innovation_clip() -> f32 {
    DEFAULT_INNOVATION_CLIP
}

fn default_adaptive_inflation() -> f32 {
    1.0
}

/// Default bound of covariance guidance's innovations, in standard deviations.
pub const DEFAULT_INNOVATION_CLIP: f32 = 2.0;

fn default_loc_radius() -> Option<f64> {
    Some(4.0)
}

fn default_gain_stages() -> usize {
    DEFAULT_GAIN_STAGES
}

fn default_relinearize() -> bool {
    DEFAULT_RELINEARIZE
}

/// Default of [`EnffConfig::relinearize`].
pub const DEFAULT_RELINEARIZE: bool = false;

/// Default number of covariance-guidance stages.
pub const DEFAULT_GAIN_STAGES: usize = 4;

impl EnffConfig {
    /// EnFF-F2P with the given `σ_min`, `λ` and flow steps (Euler, local guidance).
    pub fn f2p(sigma_min: f32, guidance_scale: f32, flow_steps: usize) -> Self {
        EnffConfig {
            path: PathKind::F2p,
            sigma_min,
            guidance_scale,
            flow_steps,
            integrator: Integrator::Euler,
            guidance: GuidanceKind::Local,
            inflation: 1.0,
            seed: 0,
            loc_radius: default_loc_radius(),
            gain_stages: DEFAULT_GAIN_STAGES,
            relinearize: DEFAULT_RELINEARIZE,
            gain_schedule: GainSchedule::Homotopy,
            innovation_clip: DEFAULT_INNOVATION_CLIP,
            adaptive_inflation: 1.0,
            unguided_weights: false,
        }
    }

    /// EnFF-OT with the given `σ_min`, `λ` and flow steps (Euler, local guidance).
    pub fn ot(sigma_min: f32, guidance_scale: f32, flow_steps: usize) -> Self {
        EnffConfig {
            path: PathKind::Ot,
            ..EnffConfig::f2p(sigma_min, guidance_scale, flow_steps)
        }
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        Path::new(self.path, self.sigma_min)?;
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(Error::invalid(
                "filter.guidance_scale",
                self.guidance_scale,
                "λ must be finite and non-negative (0 disables local guidance)",
            ));
        }
        if self.flow_steps < 1 {
            return Err(Error::invalid(
                "filter.flow_steps",
                self.flow_steps,
                "EnFF needs at least 1 flow step (the paper's K=5 grid points = 4 steps)",
            ));
        }
        if self.flow_steps > crate::rng::MAX_STEP as usize {
            return Err(Error::invalid(
                "filter.flow_steps",
                self.flow_steps,
                format!("at most {} flow steps are supported", crate::rng::MAX_STEP),
            ));
        }
        check_positive(
            "filter.inflation",
            self.inflation as f64,
            "inflation is a positive factor, 1.0 = none",
        )?;
        if !(self.adaptive_inflation.is_finite() && self.adaptive_inflation >= 1.0) {
            return Err(Error::invalid(
                "filter.adaptive_inflation",
                self.adaptive_inflation,
                "the largest adaptive inflation factor per cycle, at least 1.0 (1.0 = off; \
                 1.2-1.5 is typical)",
            ));
        }
        if !(self.innovation_clip.is_finite() && self.innovation_clip >= 0.0) {
            return Err(Error::invalid(
                "filter.innovation_clip",
                self.innovation_clip,
                "the innovation bound is a non-negative number of standard deviations \
                 (0 = off, 2-3 is typical)",
            ));
        }
        if self.guidance == GuidanceKind::Covariance {
            if !(self.guidance_scale.is_finite() && self.guidance_scale > 0.0) {
                return Err(Error::invalid(
                    "filter.guidance_scale",
                    self.guidance_scale,
                    "covariance guidance needs λ > 0 (λ = 1 reproduces the Kalman mean)",
                ));
            }
            if let Some(r) = self.loc_radius {
                covariance::check_radius(r)?;
            }
            if self.gain_stages == 0 || self.gain_stages > self.flow_steps {
                return Err(Error::invalid(
                    "filter.gain_stages",
                    self.gain_stages,
                    format!(
                        "between 1 and flow_steps = {} guidance stages (one per flow step at \
                         most; 4 is typical)",
                        self.flow_steps
                    ),
                ));
            }
            if self.integrator != Integrator::Euler {
                return Err(Error::invalid(
                    "filter.integrator",
                    "heun",
                    "covariance guidance steps with Euler (its stages are exact per step)",
                ));
            }
        }
        if self.unguided_weights && self.integrator != Integrator::Euler {
            return Err(Error::invalid(
                "filter.unguided_weights",
                true,
                "the unguided transport position is carried by Euler steps: set \
                 filter.integrator = \"euler\" or filter.unguided_weights = false",
            ));
        }
        Ok(())
    }

    /// Number of covariance-guidance stages actually used.
    pub fn stage_count(&self) -> usize {
        match self.gain_schedule {
            GainSchedule::Constant => self.flow_steps,
            GainSchedule::Homotopy => self.gain_stages.clamp(1, self.flow_steps),
        }
    }
}

/// Device buffers an analysis reuses from cycle to cycle.
struct Workspace<B: Backend> {
    x: B::Buffer,
    weights: B::Buffer,
    bias: Option<B::Buffer>,
    heun: Option<(B::Buffer, B::Buffer)>,
    /// The unguided transport position ([`EnffConfig::unguided_weights`]).
    transport: Option<B::Buffer>,
}

/// The Ensemble Flow Filter.
pub struct Enff<B: Backend> {
    config: EnffConfig,
    path: Path,
    work: Option<Workspace<B>>,
    step_checks: bool,
    fault: Option<super::InjectedFault>,
    geometry: Option<Geometry>,
    gains: Option<DeviceGains<B>>,
    moments: Option<B::Buffer>,
    /// Sharded covariance guidance: the slab extended by halo components.
    halo: Option<HaloBuffers<B>>,
    last_inflation: f32,
    /// Sharded run: this rank's slab and the communicator that sums the partial logits.
    shard: Option<crate::partition::Shard>,
}

impl<B: Backend> Enff<B> {
    /// A validated EnFF.
    pub fn new(config: EnffConfig) -> Result<Self> {
        config.validate()?;
        let path = Path::new(config.path, config.sigma_min)?;
        Ok(Enff {
            config,
            path,
            work: None,
            step_checks: false,
            fault: None,
            geometry: None,
            gains: None,
            moments: None,
            halo: None,
            last_inflation: 1.0,
            shard: None,
        })
    }

    /// Runs this filter on one slab of a sharded state ([`crate::partition`]): the ensemble
    /// passed to the analysis holds the slab's components, the observation those of the slab,
    /// the source noise is keyed by global component, and the partial logits are summed over
    /// ranks before every softmax. Covariance guidance extends the slab by halo components
    /// ([`crate::partition::halo`]).
    pub fn with_shard(mut self, shard: crate::partition::Shard) -> Self {
        self.shard = Some(shard);
        self
    }

    /// Sets the model geometry that covariance guidance localizes on (the experiment passes
    /// [`crate::model::Model::geometry`]).
    pub fn with_geometry(mut self, geometry: Geometry) -> Self {
        self.geometry = Some(geometry);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &EnffConfig {
        &self.config
    }

    /// The adaptive prior-inflation factor of the last analysis (1.0 when off or not needed).
    pub fn last_inflation(&self) -> f32 {
        self.last_inflation
    }

    fn workspace(&mut self, backend: &B, n: usize, d: usize) -> Result<&mut Workspace<B>> {
        let fits = self
            .work
            .as_ref()
            .is_some_and(|w| w.x.rows() == n && w.x.cols() == d);
        let want_bias = self.config.guidance == GuidanceKind::MonteCarlo;
        let want_heun = self.config.integrator == Integrator::Heun
            || self.config.guidance == GuidanceKind::Covariance;
        let want_transport = self.config.unguided_weights;
        if !fits
            || self.work.as_ref().is_some_and(|w| {
                w.bias.is_some() != want_bias
                    || w.heun.is_some() != want_heun
                    || w.transport.is_some() != want_transport
            })
        {
            self.work = Some(Workspace {
                x: backend.zeros(n, d)?,
                weights: backend.zeros(n, n)?,
                bias: if want_bias {
                    Some(backend.zeros(1, n)?)
                } else {
                    None
                },
                heun: if want_heun {
                    Some((backend.zeros(n, d)?, backend.zeros(n, d)?))
                } else {
                    None
                },
                transport: if want_transport {
                    Some(backend.zeros(n, d)?)
                } else {
                    None
                },
            });
        }
        Ok(self.work.as_mut().expect("workspace just created"))
    }

    fn check_inputs(
        &self,
        backend: &B,
        ensemble: &B::Buffer,
        previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
    ) -> Result<()> {
        check_flow_inputs(backend, ensemble, previous, obs, self.path.needs_source())
    }

    /// Runs the analysis from a given standard-normal source noise `noise` (`n × d`) instead of
    /// drawing it; the golden-vector tests use this.
    pub fn analyse_with_noise(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        noise: &B::Buffer,
    ) -> Result<()> {
        self.check_inputs(backend, ensemble, previous, obs)?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        if noise.rows() != n || noise.cols() != d {
            return Err(Error::shape(
                "source noise",
                format!("{n} x {d}"),
                format!("{} x {}", noise.rows(), noise.cols()),
            ));
        }
        let sigma_min = self.config.sigma_min;
        let needs_source = self.path.needs_source();
        let w = self.workspace(backend, n, d)?;
        backend.copy(noise, &mut w.x)?;
        if needs_source {
            // x0 = x_prev + σ_min ε: scale the noise, then add the previous analysis.
            let mut host = backend.read(&w.x)?;
            let prev = backend.read(previous.expect("checked"))?;
            for (v, p) in host.iter_mut().zip(prev) {
                *v = p + sigma_min * *v;
            }
            backend.write(&mut w.x, &host)?;
        }
        self.flow(backend, ensemble, previous, obs)
    }

    /// Draws the source sample for `cycle` into the workspace.
    fn draw_source(
        &mut self,
        backend: &B,
        n: usize,
        d: usize,
        previous: Option<&B::Buffer>,
        cycle: u32,
    ) -> Result<()> {
        let key = NoiseKey::new(self.config.seed, Stream::FlowSource, cycle);
        let sigma_min = self.config.sigma_min;
        let needs_source = self.path.needs_source();
        let start = self.shard.as_ref().map_or(0, |s| s.slab.start);
        let w = self.workspace(backend, n, d)?;
        let (mean, scale) = if needs_source {
            (previous, sigma_min)
        } else {
            (None, 1.0)
        };
        crate::partition::fill_normal_slab(backend, &mut w.x, key, start, mean, scale)
    }

    /// Integrates the flow from the source sample in the workspace and writes the analysis:
    /// adaptive prior inflation, the covariance-guidance set-up, then per flow step the
    /// weights and one integrator step (Euler, Heun, or a covariance stage), then the
    /// posterior inflation.
    fn flow(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
    ) -> Result<()> {
        let cfg = self.config.clone();
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let fault = self.fault.take();
        let poisoned_y = match fault {
            Some(super::InjectedFault::Guidance) => {
                let mut host = backend.read(obs.y)?;
                host[0] = f32::NAN;
                Some(backend.upload(1, host.len(), &host)?)
            }
            _ => None,
        };
        let obs = &Observation::<B> {
            y: poisoned_y.as_ref().unwrap_or(obs.y),
            operator: obs.operator,
            noise_std: obs.noise_std,
        };
        self.adaptive_inflation(backend, ensemble, obs)?;
        let covariance = self.prepare_covariance(backend, ensemble, obs)?;
        let mut gains_owned = self.gains.take();
        let mut halo_owned = self.halo.take();
        let ctx = FlowContext {
            backend,
            target: ensemble,
            source: if self.path.needs_source() {
                previous
            } else {
                None
            },
            path: self.path,
            shard: self.shard.clone(),
            checks: self.step_checks,
            steps: cfg.flow_steps,
        };
        let w = self.workspace(backend, n, d)?;
        if let Some(bias) = w.bias.as_mut() {
            backend.log_likelihoods(obs.operator, ctx.target, obs.y, obs.noise_std, bias)?;
        }
        let local = (cfg.guidance == GuidanceKind::Local && cfg.guidance_scale > 0.0).then_some(
            LocalGuidance {
                operator: obs.operator,
                y: obs.y,
                scale: cfg.guidance_scale / (obs.noise_std * obs.noise_std),
            },
        );
        let grid = time_grid(cfg.flow_steps);
        let mut stage_no = 0usize;
        if let Some(u) = w.transport.as_mut() {
            backend.copy(&w.x, u)?;
        }
        for k in 0..cfg.flow_steps {
            let (t0, t1) = (grid[k], grid[k + 1]);
            if fault == Some(super::InjectedFault::FlowStep(k + 1)) {
                let mut host = backend.read(&w.x)?;
                host[0] = f32::NAN;
                backend.write(&mut w.x, &host)?;
            }
            // The weights at the guided state, or at the unguided transport position, which
            // then moves by the transport velocity alone.
            let at = w.transport.as_ref().unwrap_or(&w.x);
            ctx.weights(k, at, t0, w.bias.as_ref(), &mut w.weights)?;
            if let Some(u) = w.transport.as_mut() {
                backend.flow_update(u, &ctx.update(&w.weights, t0, None, t1 - t0), None)?;
            }
            let stage = covariance.as_ref().and_then(|p| p.at[k].map(|s| (p, s)));
            match (cfg.integrator, w.heun.as_mut(), stage) {
                (Integrator::Heun, Some((x_pred, v1)), _) => ctx.heun_step(
                    k,
                    &mut w.x,
                    &mut w.weights,
                    w.bias.as_ref(),
                    x_pred,
                    v1,
                    (t0, t1),
                    local.as_ref(),
                )?,
                (Integrator::Euler, Some((x_hat, v)), Some((plan, at))) => {
                    stage_no += 1;
                    let gains = gains_owned.as_mut().expect("prepared with the stages");
                    let stage = CovarianceStep {
                        observe: plan.op,
                        y: obs.y,
                        noise_std: obs.noise_std,
                        at,
                        shared: &plan.shared_taus,
                        clip: (cfg.innovation_clip > 0.0).then_some(cfg.innovation_clip),
                    };
                    ctx.covariance_step(
                        &mut w.x,
                        &w.weights,
                        x_hat,
                        v,
                        (t0, t1),
                        &stage,
                        gains,
                        halo_owned.as_mut(),
                    )
                    .map_err(|e| {
                        ctx.at_step(k, &format!("covariance guidance stage {stage_no}"), e)
                    })?
                }
                _ => ctx.euler_step(&mut w.x, &w.weights, (t0, t1), local.as_ref())?,
            }
            if ctx.checks {
                // The weights were finite, so the velocity (a convex combination of finite
                // targets along the path) is too: a non-finite state comes from the guidance.
                backend
                    .check_finite(&w.x, "flow state")
                    .and_then(|_| backend.sync())
                    .map_err(|e| ctx.at_step(k, "guidance", e))?;
            }
        }
        backend.inflate(&mut w.x, cfg.inflation)?;
        // Hand the flowed buffer over instead of copying it: the workspace keeps the forecast's
        // buffer (same shape), which the next analysis overwrites with its source sample.
        std::mem::swap(&mut w.x, ensemble);
        self.gains = gains_owned;
        self.halo = halo_owned;
        // The one host round trip of an analysis: deferred error flags (non-finite inputs or
        // weights) and device errors.
        backend.sync()
    }

    /// Adaptive prior inflation (ENFF's covariance guidance safeguard): inflates the forecast
    /// by the factor its observed moments call for (summed over ranks in a sharded run).
    fn adaptive_inflation(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
    ) -> Result<()> {
        self.last_inflation = 1.0;
        let max = self.config.adaptive_inflation;
        if max <= 1.0 {
            return Ok(());
        }
        let m = obs.operator.obs_dim(ensemble.cols())?;
        if self.moments.as_ref().is_none_or(|b| b.cols() != m) {
            self.moments = Some(backend.zeros(2, m)?);
        }
        let mb = self.moments.as_mut().expect("allocated");
        backend.observed_moments(obs.operator, ensemble, mb)?;
        let mom = backend.read(mb)?;
        let y = backend.read(obs.y)?;
        let mut sums = super::inflation::innovation_sums(&mom[..m], &mom[m..], &y);
        if let Some(shard) = self.shard.as_ref() {
            // Each rank holds the observations of its slab: one factor for all.
            shard.comm.sum_f64(&mut sums)?;
        }
        let gamma = super::inflation::factor_from_sums(sums, obs.noise_std, max);
        if gamma > 1.0 {
            backend.inflate(ensemble, gamma)?;
        }
        self.last_inflation = gamma;
        Ok(())
    }

    /// Covariance guidance: the local gains' static windows of this forecast (on the slab
    /// extended by halo components in a sharded run) and the plan of its stages; `None` for
    /// the other guidances.
    fn prepare_covariance(
        &mut self,
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
    ) -> Result<Option<CovariancePlan>> {
        let cfg = &self.config;
        if cfg.guidance != GuidanceKind::Covariance {
            return Ok(None);
        }
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let op = obs.operator.builtin().ok_or_else(|| Error::Unsupported {
            backend: backend.name().into(),
            what: format!(
                "covariance guidance with the user-defined operator `{}`",
                obs.operator.name()
            ),
            fix: "covariance guidance needs observation locations: use a built-in operator".into(),
        })?;
        // Without a spatial geometry (or a radius) the gain is global: no geometry needed.
        let geometry = self.geometry.unwrap_or(Geometry::None);
        let radius = cfg.loc_radius.filter(|_| geometry.is_spatial());
        let mut stage_at: Vec<Option<StagePlan>> = vec![None; cfg.flow_steps];
        let count = cfg.stage_count();
        let stages = covariance::stages(cfg.gain_schedule, count, cfg.guidance_scale as f64);
        let (taus, table_of) = covariance::stage_tables(&stages);
        for (s, &(tau, weight)) in stages.iter().enumerate() {
            stage_at[covariance::stage_step(s, count, cfg.flow_steps)] = Some(StagePlan {
                number: s,
                tau: tau as f32,
                weight: weight as f32,
                table: if cfg.relinearize { 0 } else { table_of[s] },
            });
        }
        let shared_taus = if cfg.relinearize { Vec::new() } else { taus };
        let tables = shared_taus.len().max(1);
        match self.shard.as_ref().filter(|s| s.comm.size() > 1) {
            // Sharded: the gains and the gain step run on the slab extended by halo components
            // (crate::partition::halo); the forecast and the observations are extended here,
            // once per analysis.
            Some(s) => {
                if geometry != (Geometry::Ring { len: s.slab.d }) {
                    return Err(crate::partition::refuse(
                        s.comm.size(),
                        format!("covariance guidance on the geometry {geometry:?}"),
                        "sharded covariance guidance localizes on a ring (Lorenz-96)",
                    ));
                }
                let Some(radius) = radius else {
                    return Err(crate::partition::refuse(
                        s.comm.size(),
                        "global covariance guidance (filter.loc_radius = none) needs every \
                         observation on every rank"
                            .to_string(),
                        "set filter.loc_radius (4 is typical) to localize the gains on the ring",
                    ));
                };
                let plan = HaloPlan::new(&s.slab, s.comm.size(), &op, radius)?;
                let mut h = HaloBuffers::prepare(backend, plan, n, self.halo.take())?;
                let fc = plan.extend(s, &backend.read(ensemble)?, n)?;
                backend.write(&mut h.forecast, &fc)?;
                let y = plan.extend_observations(s, &op, &backend.read(obs.y)?)?;
                backend.write(&mut h.y, &y)?;
                self.gains = Some(DeviceGains::prepare(
                    backend,
                    plan.op,
                    plan.ext_len,
                    Geometry::Ring { len: plan.ext_len },
                    Some(radius),
                    tables,
                    self.gains.take(),
                )?);
                self.halo = Some(h);
            }
            // The static windows are built and uploaded once; the gains stay on the backend.
            None => {
                self.gains = Some(DeviceGains::prepare(
                    backend,
                    op,
                    d,
                    geometry,
                    radius,
                    tables,
                    self.gains.take(),
                )?);
            }
        }
        Ok(Some(CovariancePlan {
            op,
            at: stage_at,
            shared_taus,
        }))
    }
}

/// The covariance-guidance stages of one analysis.
struct CovariancePlan {
    op: Observe,
    /// The stage of every flow step that has one.
    at: Vec<Option<StagePlan>>,
    /// When the stages share one linearization: the exponents of the gain tables the first
    /// stage builds (empty when every stage computes its own gains).
    shared_taus: Vec<f32>,
}

/// One covariance-guidance stage of the plan.
#[derive(Clone, Copy, Debug)]
struct StagePlan {
    /// 0-based stage number.
    number: usize,
    /// Tempering exponent `τ` the stage's gain ends at.
    tau: f32,
    /// Weight of the gain term (`τ_{s+1} − τ_s` for the homotopy).
    weight: f32,
    /// The gain table the stage applies.
    table: usize,
}

/// Local guidance `λ/σ_y² · J_hᵀ(y − h(x̂₁))` (ENFF_SPEC §3.1) without its look-ahead.
struct LocalGuidance<'a, B: Backend> {
    operator: &'a dyn crate::observe::ObservationOperator,
    y: &'a B::Buffer,
    /// `λ / σ_y²`.
    scale: f32,
}

/// What every flow step of one analysis reads.
struct FlowContext<'a, B: Backend> {
    backend: &'a B,
    /// The forecast ensemble, the path's target.
    target: &'a B::Buffer,
    /// The path's source ensemble (F2P: the previous analysis).
    source: Option<&'a B::Buffer>,
    path: Path,
    /// Sharded run: the partial logits are summed over the ranks.
    shard: Option<crate::partition::Shard>,
    /// Check the state after every step.
    checks: bool,
    steps: usize,
}

/// One covariance-guidance stage of a flow step.
struct CovarianceStep<'a, B: Backend> {
    observe: Observe,
    y: &'a B::Buffer,
    noise_std: f32,
    at: StagePlan,
    /// [`CovariancePlan::shared_taus`].
    shared: &'a [f32],
    clip: Option<f32>,
}

impl<B: Backend> FlowContext<'_, B> {
    /// A non-finite value met at flow step `k` (0-based), named for the user.
    fn at_step(&self, k: usize, what: &str, e: Error) -> Error {
        match e {
            Error::NonFinite { .. } => Error::Diverged {
                cycle: 0,
                stage: format!("analysis, flow step {} of {}: {what}", k + 1, self.steps),
                detail: e.to_string(),
            },
            other => other,
        }
    }

    /// The update at pseudo-time `t` from the state itself: velocity, guidance (if any),
    /// step `h_new`.
    fn update<'g>(
        &'g self,
        weights: &'g B::Buffer,
        t: f32,
        local: Option<&'g LocalGuidance<'g, B>>,
        h_new: f32,
    ) -> FlowUpdate<'g, B> {
        FlowUpdate {
            eval: None,
            weights,
            target: self.target,
            source: self.source,
            path: self.path.at(t),
            guidance: local.map(|g| Guidance {
                operator: g.operator,
                y: g.y,
                scale: g.scale,
                horizon: 1.0 - t,
            }),
            h_new,
            previous: None,
            clamp: None,
        }
    }

    /// One Euler step from `t0` to `t1`: `x ← x + Δ·(v̂(x, t0) + guidance)`.
    fn euler_step(
        &self,
        x: &mut B::Buffer,
        weights: &B::Buffer,
        (t0, t1): (f32, f32),
        local: Option<&LocalGuidance<'_, B>>,
    ) -> Result<()> {
        let up = self.update(weights, t0, local, t1 - t0);
        self.backend.flow_update(x, &up, None)
    }

    /// One Heun step from `t0` to `t1` (the weights at `(x, t0)` are in `weights`): the
    /// predictor `x̃ = x + Δ·v(x, t0)`, keeping `v(x, t0)` in `v1`, then the corrector
    /// `x ← x + Δ/2·(v(x, t0) + v(x̃, t1))` with the weights at `(x̃, t1)`.
    #[allow(clippy::too_many_arguments)]
    fn heun_step(
        &self,
        k: usize,
        x: &mut B::Buffer,
        weights: &mut B::Buffer,
        bias: Option<&B::Buffer>,
        x_pred: &mut B::Buffer,
        v1: &mut B::Buffer,
        (t0, t1): (f32, f32),
        local: Option<&LocalGuidance<'_, B>>,
    ) -> Result<()> {
        let backend = self.backend;
        let dt = t1 - t0;
        backend.copy(x, x_pred)?;
        backend.flow_update(x_pred, &self.update(weights, t0, local, dt), Some(v1))?;
        self.weights(k, x_pred, t1, bias, weights)?;
        let corrector = FlowUpdate {
            eval: Some(x_pred),
            previous: Some((v1, 0.5 * dt)),
            ..self.update(weights, t1, local, 0.5 * dt)
        };
        backend.flow_update(x, &corrector, None)
    }

    /// One covariance-guidance stage (see [`crate::filter::covariance`]): the unguided
    /// velocity and the predicted endpoint `x̂₁ = x + (1 − t0)·v̂` (in `x_hat`, `v`), then
    /// `x ← x + Δ·v̂ + weight·K(τ)(y − h(x̂₁))` with this stage's local gains; in a sharded run
    /// on the slab extended by the neighbours' halo components.
    #[allow(clippy::too_many_arguments)]
    fn covariance_step(
        &self,
        x: &mut B::Buffer,
        weights: &B::Buffer,
        x_hat: &mut B::Buffer,
        v: &mut B::Buffer,
        (t0, t1): (f32, f32),
        stage: &CovarianceStep<'_, B>,
        gains: &mut DeviceGains<B>,
        halo: Option<&mut HaloBuffers<B>>,
    ) -> Result<()> {
        let backend = self.backend;
        let dt = t1 - t0;
        backend.copy(x, x_hat)?;
        backend.flow_update(x_hat, &self.update(weights, t0, None, 1.0 - t0), Some(v))?;
        match (halo, self.shard.as_ref()) {
            (Some(h), Some(s)) => {
                // The endpoints extended by the neighbours' halo, and the state and velocity
                // padded to the extended segment.
                let n = x.rows();
                let plan = h.plan;
                let xh = plan.extend(s, &backend.read(x_hat)?, n)?;
                backend.write(&mut h.endpoint, &xh)?;
                backend.write(&mut h.state, &plan.pad(&backend.read(x)?, n))?;
                backend.write(&mut h.velocity, &plan.pad(&backend.read(v)?, n))?;
                let HaloBuffers {
                    plan,
                    forecast,
                    y,
                    endpoint,
                    state,
                    velocity,
                } = h;
                let at = StageAt {
                    observe: plan.op,
                    forecast,
                    endpoint,
                    y,
                    velocity,
                    noise_std: stage.noise_std,
                    stage: stage.at,
                    shared: stage.shared,
                    dt,
                    clip: stage.clip,
                };
                covariance_stage(backend, state, &at, gains)?;
                backend.write(x, &plan.interior(&backend.read(state)?, n))
            }
            _ => {
                let at = StageAt {
                    observe: stage.observe,
                    forecast: self.target,
                    endpoint: x_hat,
                    y: stage.y,
                    velocity: v,
                    noise_std: stage.noise_std,
                    stage: stage.at,
                    shared: stage.shared,
                    dt,
                    clip: stage.clip,
                };
                covariance_stage(backend, x, &at, gains)
            }
        }
    }

    /// The velocity weights at `x` and pseudo-time `t` (ENFF_SPEC §2.2): pairwise logits (summed
    /// over the ranks of a sharded run), then a row softmax.
    fn weights(
        &self,
        k: usize,
        x: &B::Buffer,
        t: f32,
        bias: Option<&B::Buffer>,
        weights: &mut B::Buffer,
    ) -> Result<()> {
        let backend = self.backend;
        backend.flow_logits(x, self.target, self.source, self.path.at(t), bias, weights)?;
        if let Some(s) = &self.shard {
            s.sum_partial(backend, weights)?;
        }
        backend
            .softmax_rows(weights)
            .and_then(|_| if self.checks { backend.sync() } else { Ok(()) })
            .map_err(|e| self.at_step(k, "weights", e))
    }
}
/// What one covariance-guidance stage reads (see [`covariance_stage`]).
struct StageAt<'a, B: Backend> {
    observe: Observe,
    forecast: &'a B::Buffer,
    endpoint: &'a B::Buffer,
    y: &'a B::Buffer,
    velocity: &'a B::Buffer,
    noise_std: f32,
    stage: StagePlan,
    /// [`CovariancePlan::shared_taus`].
    shared: &'a [f32],
    dt: f32,
    /// The innovation bound's scale, when on.
    clip: Option<f32>,
}

/// One covariance-guidance stage on `state`: the stage's gains, linearized at the mean of
/// the endpoints, with the mean observed endpoint h̄ for the innovation split (on the
/// backend), then `x ← x + Δ·v̂ + weight·K(τ)(y − h(x̂₁))`. With a shared linearization the
/// first stage builds the gain tables of every stage and a later stage only computes its
/// endpoints' `h̄`.
fn covariance_stage<B: Backend>(
    backend: &B,
    state: &mut B::Buffer,
    at: &StageAt<'_, B>,
    g: &mut DeviceGains<B>,
) -> Result<()> {
    let one = [at.stage.tau];
    let first = at.stage.number == 0;
    // The exponents whose tables this stage computes (none when they are there already), and
    // where they are linearized.
    let (taus, table, endpoint) = if at.shared.is_empty() {
        (Some(&one[..]), 0, at.endpoint)
    } else {
        let group = at.stage.table / g.group;
        let table = at.stage.table % g.group;
        let several = at.shared.len() > g.group;
        if first && several {
            let lin = match g.lin_endpoint.take() {
                Some(b) if b.rows() == at.endpoint.rows() && b.cols() == at.endpoint.cols() => b,
                _ => backend.zeros(at.endpoint.rows(), at.endpoint.cols())?,
            };
            g.lin_endpoint = Some(lin);
            backend.copy(at.endpoint, g.lin_endpoint.as_mut().expect("just set"))?;
        }
        let taus = (first || g.loaded != Some(group)).then(|| {
            let start = group * g.group;
            &at.shared[start..(start + g.group).min(at.shared.len())]
        });
        g.loaded = Some(group);
        let endpoint = match (&g.lin_endpoint, first || !several) {
            (Some(lin), false) => lin,
            _ => at.endpoint,
        };
        (taus, table, endpoint)
    };
    if !first && !at.shared.is_empty() {
        // This stage's h̄ alone (no exponents: no gains).
        let stats = LocalGains {
            observe: at.observe,
            forecast: at.forecast,
            endpoint: at.endpoint,
            index: &g.index,
            taper: &g.taper,
            noise_std: at.noise_std,
            taus: &[],
        };
        local_gains_anywhere(
            backend,
            &stats,
            &mut g.gain,
            &mut g.stage_hbar,
            &mut g.host_logged,
        )?;
    }
    let Some(taus) = taus else {
        return apply_stage(backend, state, at, g, table, &g.stage_hbar);
    };
    // The last group of several may hold fewer exponents than the buffer has tables: its
    // remaining tables repeat the last exponent.
    let padded: Vec<f32>;
    let taus = if at.shared.is_empty() || taus.len() == g.group {
        taus
    } else {
        padded = (0..g.group).map(|k| taus[k.min(taus.len() - 1)]).collect();
        &padded[..]
    };
    let inputs = LocalGains {
        observe: at.observe,
        forecast: at.forecast,
        endpoint,
        index: &g.index,
        taper: &g.taper,
        noise_std: at.noise_std,
        taus,
    };
    local_gains_anywhere(
        backend,
        &inputs,
        &mut g.gain,
        &mut g.hbar,
        &mut g.host_logged,
    )?;
    let hbar = if first || at.shared.is_empty() {
        &g.hbar
    } else {
        &g.stage_hbar
    };
    apply_stage(backend, state, at, g, table, hbar)
}

/// [`Backend::local_gains`], or, for a problem the backend's kernels do not take (on the GPU:
/// member blocks, or windows and ensembles above both kernels' limits), the same on the host,
/// chosen here and said once (`logged`).
fn local_gains_anywhere<B: Backend>(
    backend: &B,
    inputs: &LocalGains<'_, B>,
    gain: &mut B::Buffer,
    hbar: &mut B::Buffer,
    logged: &mut bool,
) -> Result<()> {
    match backend.local_gains(inputs, gain, hbar) {
        Err(Error::Unsupported { what, .. }) => {
            if !*logged {
                *logged = true;
                log::info!(
                    "covariance guidance on the {} backend: {what}; its local gains are \
                     computed on the host, reading the ensembles back every stage",
                    backend.name()
                );
            }
            crate::backend::local_gains_on_host(backend, inputs, gain, hbar)
        }
        other => other,
    }
}

/// `x ← x + Δ·v̂ + weight·K(τ)(y − h(x̂₁))` with the stage's gain table, the innovation split
/// about `hbar` (row 0).
fn apply_stage<B: Backend>(
    backend: &B,
    state: &mut B::Buffer,
    at: &StageAt<'_, B>,
    g: &DeviceGains<B>,
    table: usize,
    hbar: &B::Buffer,
) -> Result<()> {
    backend.gain_step(
        state,
        &GainStep {
            observe: at.observe,
            y: at.y,
            gain: &g.gain,
            table,
            index: &g.index,
            endpoint: at.endpoint,
            velocity: at.velocity,
            h_velocity: at.dt,
            h_gain: at.stage.weight,
            mean_obs: Some((hbar, covariance::ANOMALY_WEIGHT)),
            clip: at.clip.map(|scale| InnovationClip {
                innovation_var: &g.hbar,
                scale,
            }),
        },
    )
}

impl<B: Backend> Filter<B> for Enff<B> {
    fn place(&mut self, shard: crate::partition::Shard) -> Result<()> {
        self.shard = Some(shard);
        Ok(())
    }

    fn name(&self) -> String {
        match self.config.path {
            PathKind::Ot => "enff-ot".into(),
            PathKind::F2p => "enff-f2p".into(),
        }
    }

    fn needs_previous_analysis(&self) -> bool {
        self.path.needs_source()
    }

    fn set_step_checks(&mut self, on: bool) {
        self.step_checks = on;
    }

    fn inject_fault(&mut self, fault: Option<super::InjectedFault>) {
        self.fault = fault;
    }

    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        cycle: u32,
    ) -> Result<()> {
        self.check_inputs(backend, ensemble, previous, obs)?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        self.draw_source(backend, n, d, previous, cycle)?;
        self.flow(backend, ensemble, previous, obs)
    }
}

/// Checks what every flow or score analysis needs: at least 2 members, σ_y > 0, an observation
/// of the right length, finite inputs (and the previous analysis when `needs_source`).
pub(crate) fn check_flow_inputs<B: Backend>(
    backend: &B,
    ensemble: &B::Buffer,
    previous: Option<&B::Buffer>,
    obs: &Observation<'_, B>,
    needs_source: bool,
) -> Result<()> {
    let (n, d) = (ensemble.rows(), ensemble.cols());
    if n < 2 {
        return Err(Error::invalid(
            "ensemble.n",
            n,
            "flow and score filters need at least 2 members (20 in the paper's experiments)",
        ));
    }
    check_positive(
        "observe.noise_std",
        obs.noise_std as f64,
        "the observation noise std σ_y must be positive",
    )?;
    let m = obs.operator.obs_dim(d)?;
    if obs.y.rows() != 1 || obs.y.cols() != m {
        return Err(Error::shape(
            "observation",
            format!("1 x {m} (h = {})", obs.operator.name()),
            format!("{} x {}", obs.y.rows(), obs.y.cols()),
        ));
    }
    if needs_source {
        match previous {
            Some(p) if p.rows() == n && p.cols() == d => {}
            Some(p) => {
                return Err(Error::shape(
                    "previous analysis",
                    format!("{n} x {d}"),
                    format!("{} x {}", p.rows(), p.cols()),
                ))
            }
            None => {
                return Err(Error::invalid(
                    "previous analysis",
                    "none",
                    "EnFF-F2P flows from the previous analysis: pass it to analyse",
                ))
            }
        }
        backend.check_finite(previous.expect("checked"), "previous analysis")?;
    }
    backend.check_finite(obs.y, "observation")?;
    backend.check_finite(ensemble, "forecast ensemble")?;
    // Backends that defer checks (the GPU) report them here, before the ensemble is touched.
    backend.sync()
}
