//! Experiment configuration: every setting of a twin experiment, serde-serializable, validated
//! before anything is allocated, and reachable by `--set section.key=value`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{check_positive, Error, Result};
use crate::filter::{EnffConfig, EnsfConfig, FilterKind, Resampling, ScoreSampler};
use crate::flow::{GuidanceKind, Integrator, PathKind};
use crate::model::{
    KuramotoSivashinsky, Lorenz63, Lorenz96, Model, NavierStokes2d, Rotation2d, Scheme, System,
};
use crate::observe::{ObservationOperator, Observe, Pointwise};

/// Which dynamical system to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemKind {
    /// Lorenz-63 (d = 3).
    Lorenz63,
    /// Lorenz-96 (d ≥ 4).
    Lorenz96,
    /// Exact plane rotation (d = 2).
    Rotation2d,
    /// Kuramoto–Sivashinsky on `model.d` grid points, domain 128π, ETDRK4 (ENFF_SPEC §8.4).
    Ks,
    /// 2-D incompressible Navier–Stokes on a `model.d × model.d` grid; the state `(p, u, v)`
    /// has `3·model.d²` values (ENFF_SPEC §8.5).
    Ns,
}

/// The forecast model section (`model.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// System to integrate.
    pub system: SystemKind,
    /// Size: the state dimension for Lorenz-96 and Kuramoto–Sivashinsky (grid points), the grid
    /// side `n` for Navier–Stokes (state dimension `3n²`); fixed (3, 2) for the others.
    pub d: usize,
    /// Lorenz-96 forcing `F`; Navier–Stokes forcing amplitude `A` (0.05); unused otherwise.
    pub forcing: f32,
    /// Model time step.
    pub dt: f32,
    /// Runge–Kutta variant.
    pub scheme: Scheme,
    /// Rotation angle per step (Rotation2D); negative = drawn uniformly in (0, 2π) from the seed.
    pub theta: f64,
}

/// The observation section (`observe.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserveConfig {
    /// Pointwise operator: identity, arctan or tanh.
    pub operator: Pointwise,
    /// Observe every `every`-th component (1 = all).
    pub every: usize,
    /// First observed component.
    pub offset: usize,
    /// Observation noise std `σ_y`.
    pub noise_std: f32,
    /// Model steps between observations (`obs_every`).
    pub obs_every: usize,
}

/// Where the initial ensemble is centred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialMean {
    /// On the truth at the first observation time.
    Truth,
    /// On zero (Lorenz-96 Bao 2024: a hard cold start).
    Zero,
}

/// The ensemble section (`ensemble.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleConfig {
    /// Number of members `n`.
    pub n: usize,
    /// Std of the initial ensemble around its mean.
    pub init_std: f32,
    /// Centre of the initial ensemble.
    pub init_mean: InitialMean,
}

/// The filter section (`filter.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Filter name: `enff-f2p`, `enff-ot`, `ensf`, `etkf`, `letkf`, `enkf`, `bpf` or `kf`.
    pub kind: String,
    /// EnFF noise floor σ_min.
    pub sigma_min: f32,
    /// EnFF guidance scale λ.
    pub guidance_scale: f32,
    /// EnFF flow steps (the paper's K grid points = flow_steps + 1).
    pub flow_steps: usize,
    /// `euler` or `heun`.
    pub integrator: Integrator,
    /// `local`, `monte_carlo`, `none` or `covariance`.
    pub guidance: GuidanceKind,
    /// Multiplicative inflation of the analysis (1.0 = none).
    pub inflation: f32,
    /// Particle filter: `multinomial` or `systematic` resampling.
    #[serde(default)]
    pub resampling: Resampling,
    /// Particle filter: std of the jitter added to the forecast before weighting (0 = none).
    #[serde(default)]
    pub jitter: f32,
    /// EnSF: `ε_α ∈ (0, 1]` (α at the noise end).
    #[serde(default = "default_eps_alpha")]
    pub eps_alpha: f32,
    /// EnSF: `ε_β ∈ (0, 1]` (β² at the data end).
    #[serde(default = "default_eps_beta")]
    pub eps_beta: f32,
    /// EnSF: component-wise clamp of the score.
    #[serde(default = "default_max_score")]
    pub max_score: f32,
    /// EnSF: `euler_maruyama` (SDE) or `probability_flow` (ODE).
    #[serde(default)]
    pub sampler: ScoreSampler,
    /// LETKF and EnKF: Gaspari–Cohn localization radius in grid points (DAPPER's 1.82
    /// convention). Unset: a global EnKF, and the LETKF's default radius 4.
    /// `"none"` in files and `--set` (unset).
    #[serde(default, with = "optional_radius")]
    pub loc_radius: Option<f64>,
    /// Where localization distances are measured: `geometry` (the model's ring or torus) or
    /// `flattened` (periodic index distance, the reference's convention).
    #[serde(default)]
    pub loc_distance: crate::model::DistanceKind,
    /// EnFF covariance guidance: number of guidance stages, 1 to `flow_steps`.
    #[serde(default = "default_gain_stages")]
    pub gain_stages: usize,
    /// EnFF covariance guidance: recompute the gains at every stage, re-linearized at that
    /// stage's endpoint mean (`true`), or build every stage's gains in one pass from the
    /// first stage's linearization (`false`); the same for linear `h`.
    #[serde(default = "default_relinearize")]
    pub relinearize: bool,
    /// EnFF covariance guidance: `homotopy` or `constant`.
    #[serde(default)]
    pub gain_schedule: crate::flow::GainSchedule,
    /// EnFF covariance guidance: innovation bound in standard deviations (0 = off).
    #[serde(default = "default_innovation_clip")]
    pub innovation_clip: f32,
    /// EnFF: largest adaptive prior-inflation factor per cycle (1.0 = off).
    #[serde(default = "default_adaptive_inflation")]
    pub adaptive_inflation: f32,
    /// EnFF: evaluate the transport weights at the member's unguided position (`true`) instead
    /// of its guided state (`false`, the paper's); Euler only.
    #[serde(default)]
    pub unguided_weights: bool,
}

fn default_innovation_clip() -> f32 {
    crate::filter::enff::DEFAULT_INNOVATION_CLIP
}

fn default_adaptive_inflation() -> f32 {
    1.0
}

/// The settings that belong to one EnFF guidance: the values a configuration gets when it
/// selects that guidance without setting them (`--set filter.guidance=covariance` on a preset
/// of another guidance gives the Kalman-consistent setting, not the old guidance's λ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuidanceDefaults {
    /// λ (`filter.guidance_scale`).
    pub guidance_scale: f32,
    /// `filter.gain_stages`.
    pub gain_stages: usize,
    /// `filter.innovation_clip`.
    pub innovation_clip: f32,
    /// `filter.adaptive_inflation` on a model with a spatial geometry (a cold start's
    /// safeguard for the localized gains); without one it is off (1.0): the global gain of a
    /// low-dimensional state needs no safeguard, and inflating it costs accuracy (Lorenz-63
    /// switched to covariance guidance: 0.68 with 1.3, 0.58 without; Rotation2D 0.17 / 0.095).
    pub adaptive_inflation: f32,
    /// `filter.loc_radius` on a model with a spatial geometry (without one the gain is global).
    pub loc_radius: Option<f64>,
    /// `filter.unguided_weights` on a model without a spatial geometry (a low-dimensional
    /// state, where the guidance's displacement reaches other members' paths); on a spatial
    /// model the members stay apart and the extra velocity evaluation would be wasted.
    pub unguided_weights: bool,
}

/// Keys that only covariance guidance reads (EnFF filters).
const COVARIANCE_ONLY_KEYS: [&str; 5] = [
    "filter.gain_stages",
    "filter.relinearize",
    "filter.gain_schedule",
    "filter.innovation_clip",
    "filter.loc_radius",
];

impl GuidanceDefaults {
    /// The defaults of `guidance`.
    pub fn of(guidance: GuidanceKind) -> Self {
        match guidance {
            // Kalman-consistent λ = 1 with the safeguards of lorenz96_bao2024_covariance.
            GuidanceKind::Covariance => GuidanceDefaults {
                guidance_scale: 1.0,
                gain_stages: crate::filter::enff::DEFAULT_GAIN_STAGES,
                innovation_clip: crate::filter::enff::DEFAULT_INNOVATION_CLIP,
                adaptive_inflation: 1.3,
                loc_radius: Some(4.0),
                unguided_weights: true,
            },
            // The paper's λ for Lorenz-96 (ENFF_SPEC §3.1), no adaptive inflation.
            _ => GuidanceDefaults {
                guidance_scale: 0.05,
                gain_stages: crate::filter::enff::DEFAULT_GAIN_STAGES,
                innovation_clip: crate::filter::enff::DEFAULT_INNOVATION_CLIP,
                adaptive_inflation: 1.0,
                loc_radius: None,
                unguided_weights: false,
            },
        }
    }
}

/// An optional radius written as a number or `"none"` (TOML has no null).
mod optional_radius {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(r) => s.serialize_f64(*r),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Radius {
            Number(f64),
            Text(String),
        }
        match Option::<Radius>::deserialize(d)? {
            None => Ok(None),
            Some(Radius::Number(r)) => Ok(Some(r)),
            Some(Radius::Text(t)) if t == "none" => Ok(None),
            Some(Radius::Text(t)) => t.parse::<f64>().map(Some).map_err(|_| {
                D::Error::custom(format!(
                    "expected a radius in grid points or \"none\" (unset), got {t:?}"
                ))
            }),
        }
    }
}

fn default_gain_stages() -> usize {
    crate::filter::enff::DEFAULT_GAIN_STAGES
}

fn default_relinearize() -> bool {
    crate::filter::enff::DEFAULT_RELINEARIZE
}

fn default_eps_alpha() -> f32 {
    0.5
}
fn default_eps_beta() -> f32 {
    0.025
}
fn default_max_score() -> f32 {
    1000.0
}

/// The run section (`experiment.*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Model steps of truth spin-up before the first observation.
    pub spinup: usize,
    /// Number of assimilation cycles.
    pub cycles: usize,
    /// Cycles excluded from the time means (`rmse_mean`, `spread_mean`).
    pub burn_in: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Mean of the truth initial condition (Rotation2D: its radius).
    pub truth_init_mean: f32,
    /// Std of the truth initial condition.
    pub truth_init_std: f32,
}

/// A whole twin experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Model section.
    pub model: ModelConfig,
    /// Observation section.
    pub observe: ObserveConfig,
    /// Ensemble section.
    pub ensemble: EnsembleConfig,
    /// Filter section.
    pub filter: FilterConfig,
    /// Run section.
    pub experiment: RunConfig,
}

impl Config {
    /// Checks every setting, naming the first bad one with its value and a fix.
    pub fn validate(&self) -> Result<()> {
        self.model()?;
        self.observation_operator()?.obs_dim(self.state_dim())?;
        check_positive(
            "observe.noise_std",
            self.observe.noise_std as f64,
            "the observation noise std must be a finite positive number",
        )?;
        if self.observe.obs_every == 0 {
            return Err(Error::invalid(
                "observe.obs_every",
                0,
                "observations need at least 1 model step between them",
            ));
        }
        if self.filter_kind()? == FilterKind::Kf {
            if self.ensemble.n != 1 {
                return Err(Error::invalid(
                    "ensemble.n",
                    self.ensemble.n,
                    "the Kalman filter carries the mean as its single member: set ensemble.n=1",
                ));
            }
            if self.model.system != SystemKind::Rotation2d {
                return Err(Error::invalid(
                    "filter.kind",
                    "kf",
                    "the Kalman filter needs a linear model: use the rotation2d preset",
                ));
            }
        } else if self.ensemble.n < 2 {
            return Err(Error::invalid(
                "ensemble.n",
                self.ensemble.n,
                "an ensemble filter needs at least 2 members (20 in the paper)",
            ));
        }
        if !(self.filter.jitter.is_finite() && self.filter.jitter >= 0.0) {
            return Err(Error::invalid(
                "filter.jitter",
                self.filter.jitter,
                "the particle filter's jitter std must be finite and non-negative (0 = none)",
            ));
        }
        check_positive(
            "filter.inflation",
            self.filter.inflation as f64,
            "inflation is a positive factor, 1.0 = none",
        )?;
        if !(self.ensemble.init_std.is_finite() && self.ensemble.init_std >= 0.0) {
            return Err(Error::invalid(
                "ensemble.init_std",
                self.ensemble.init_std,
                "the initial ensemble std must be finite and non-negative",
            ));
        }
        if self.experiment.cycles == 0 {
            return Err(Error::invalid(
                "experiment.cycles",
                0,
                "run at least one assimilation cycle",
            ));
        }
        if self.experiment.burn_in >= self.experiment.cycles {
            return Err(Error::invalid(
                "experiment.burn_in",
                self.experiment.burn_in,
                format!(
                    "burn-in must leave cycles to average: use fewer than experiment.cycles={}",
                    self.experiment.cycles
                ),
            ));
        }
        if self.experiment.cycles > u32::MAX as usize / 2 {
            return Err(Error::invalid(
                "experiment.cycles",
                self.experiment.cycles,
                "too many cycles for the random-number counter",
            ));
        }
        for (name, v) in [
            (
                "experiment.truth_init_mean",
                self.experiment.truth_init_mean,
            ),
            ("experiment.truth_init_std", self.experiment.truth_init_std),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(name, v, "use a finite number"));
            }
        }
        if self.filter_kind()?.is_enff() {
            // Covariance guidance without a spatial geometry uses the global gain.
            self.enff_config()?.validate()?;
        }
        if self.filter_kind()? == FilterKind::Ensf {
            self.ensf_config().validate()?;
        }
        if let Some(r) = self.filter.loc_radius {
            crate::localization::check_radius(r)?;
        }
        Ok(())
    }

    /// The EnSF configuration of the filter section.
    pub fn ensf_config(&self) -> EnsfConfig {
        EnsfConfig {
            eps_alpha: self.filter.eps_alpha,
            eps_beta: self.filter.eps_beta,
            flow_steps: self.filter.flow_steps,
            max_score: self.filter.max_score,
            sampler: self.filter.sampler,
            inflation: self.filter.inflation,
            seed: self.experiment.seed,
        }
    }

    /// State dimension implied by the model section.
    pub fn state_dim(&self) -> usize {
        match self.model.system {
            SystemKind::Lorenz63 => 3,
            SystemKind::Lorenz96 => self.model.d,
            SystemKind::Rotation2d => 2,
            SystemKind::Ks => self.model.d,
            SystemKind::Ns => self.model.d.saturating_mul(self.model.d).saturating_mul(3),
        }
    }

    /// The forecast model. Rotation2D with a negative `theta` gets its angle from `theta_draw`.
    pub fn model_with_theta(&self, theta_draw: f64) -> Result<Model> {
        let system = match self.model.system {
            SystemKind::Lorenz63 => {
                if self.model.d != 3 {
                    return Err(Error::invalid(
                        "model.d",
                        self.model.d,
                        "Lorenz-63 has exactly 3 variables: set model.d=3",
                    ));
                }
                System::Lorenz63(Lorenz63::default())
            }
            SystemKind::Lorenz96 => {
                System::Lorenz96(Lorenz96::new(self.model.d, self.model.forcing)?)
            }
            SystemKind::Rotation2d => {
                if self.model.d != 2 {
                    return Err(Error::invalid(
                        "model.d",
                        self.model.d,
                        "Rotation2D has exactly 2 variables: set model.d=2",
                    ));
                }
                let theta = if self.model.theta < 0.0 {
                    theta_draw
                } else {
                    self.model.theta
                };
                if !theta.is_finite() {
                    return Err(Error::invalid("model.theta", theta, "use a finite angle"));
                }
                System::Rotation2d(Rotation2d { theta })
            }
            SystemKind::Ks => System::KuramotoSivashinsky(KuramotoSivashinsky::paper(
                self.model.d,
                self.model.dt,
            )?),
            SystemKind::Ns => System::NavierStokes2d(NavierStokes2d::paper(
                self.model.d,
                self.model.dt,
                self.model.forcing,
            )?),
        };
        Model::new(system, self.model.dt, self.model.scheme)
    }

    /// The forecast model (Rotation2D angle as configured, or π/8 when it is to be drawn).
    pub fn model(&self) -> Result<Model> {
        self.model_with_theta(std::f64::consts::FRAC_PI_8)
    }

    /// The filter the configuration names ([`Error::UnknownFilter`] when none).
    pub fn filter_kind(&self) -> Result<FilterKind> {
        FilterKind::parse(&self.filter.kind)
    }

    /// The observation operator.
    pub fn observation_operator(&self) -> Result<Observe> {
        Observe::full(self.observe.operator).subsample(self.observe.every, self.observe.offset)
    }

    /// The EnFF configuration of the filter section.
    pub fn enff_config(&self) -> Result<EnffConfig> {
        let path = match self.filter_kind()? {
            FilterKind::EnffF2p => PathKind::F2p,
            FilterKind::EnffOt => PathKind::Ot,
            other => {
                return Err(Error::invalid(
                    "filter.kind",
                    other,
                    "EnFF settings belong to filter.kind=enff-f2p or enff-ot",
                ))
            }
        };
        Ok(EnffConfig {
            path,
            sigma_min: self.filter.sigma_min,
            guidance_scale: self.filter.guidance_scale,
            flow_steps: self.filter.flow_steps,
            integrator: self.filter.integrator,
            guidance: self.filter.guidance,
            inflation: self.filter.inflation,
            seed: self.experiment.seed,
            loc_radius: self.filter.loc_radius,
            gain_stages: self.filter.gain_stages,
            relinearize: self.filter.relinearize,
            gain_schedule: self.filter.gain_schedule,
            innovation_clip: self.filter.innovation_clip,
            adaptive_inflation: self.filter.adaptive_inflation,
            unguided_weights: self.filter.unguided_weights,
        })
    }

    /// After a configuration of guidance `before` had the `key=value` settings `sets`
    /// applied: when they changed an EnFF filter's guidance, the guidance-owned settings they
    /// did not name take the new guidance's defaults ([`GuidanceDefaults`]). Returns a warning
    /// for every setting named that the resolved guidance does not read.
    pub fn resolve_guidance(&mut self, before: GuidanceKind, sets: &[String]) -> Vec<String> {
        let spatial = self.model().is_ok_and(|m| m.geometry().is_spatial());
        self.resolve_guidance_on(before, sets, spatial)
    }

    /// [`Config::resolve_guidance`] for a state whose spatial structure is known apart from the
    /// configured model (`spatial`: the caller's own model has a ring or torus geometry).
    pub fn resolve_guidance_on(
        &mut self,
        before: GuidanceKind,
        sets: &[String],
        spatial: bool,
    ) -> Vec<String> {
        let named: Vec<String> = sets
            .iter()
            .map(|s| {
                s.split_once('=')
                    .map_or(s.as_str(), |(k, _)| k)
                    .trim()
                    .to_string()
            })
            .collect();
        let enff = self.filter_kind().is_ok_and(|k| k.is_enff());
        if !enff {
            return Vec::new();
        }
        let guidance = self.filter.guidance;
        if guidance != before {
            let d = GuidanceDefaults::of(guidance);
            let f = &mut self.filter;
            let unset = |k: &str| !named.iter().any(|n| n == k);
            if unset("filter.guidance_scale") {
                f.guidance_scale = d.guidance_scale;
            }
            if unset("filter.gain_stages") {
                f.gain_stages = d.gain_stages;
            }
            if unset("filter.innovation_clip") {
                f.innovation_clip = d.innovation_clip;
            }
            if unset("filter.adaptive_inflation") {
                f.adaptive_inflation = if spatial { d.adaptive_inflation } else { 1.0 };
            }
            if unset("filter.loc_radius") {
                f.loc_radius = d.loc_radius.filter(|_| spatial);
            }
            if unset("filter.unguided_weights") {
                f.unguided_weights = d.unguided_weights && !spatial;
            }
        }
        let mut warnings = Vec::new();
        if guidance != GuidanceKind::Covariance {
            for k in named
                .iter()
                .filter(|k| COVARIANCE_ONLY_KEYS.contains(&k.as_str()))
            {
                warnings.push(format!(
                    "{k} is read by covariance guidance only; filter.guidance = {} ignores it",
                    guidance.name()
                ));
            }
        }
        warnings
    }

    /// Applies one `section.key=value` override (e.g. `model.d=100000`).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment.split_once('=').ok_or_else(|| {
            Error::invalid(
                "--set",
                assignment,
                "write overrides as section.key=value, e.g. filter.sigma_min=0.01",
            )
        })?;
        let key = key.trim();
        let value = value.trim();
        let mut tree =
            serde_json::to_value(&*self).map_err(|e| Error::invalid("config", e, "internal"))?;
        let known = || setting_keys(&tree_of(self)).join(", ");
        let (section, field) = key.split_once('.').ok_or_else(|| Error::UnknownSetting {
            key: key.to_string(),
            known: known(),
        })?;
        let slot = tree
            .get_mut(section)
            .and_then(|s| s.get_mut(field))
            .ok_or_else(|| Error::UnknownSetting {
                key: key.to_string(),
                known: known(),
            })?;
        let bad = |expected: &str| Error::BadSettingValue {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        };
        let new = match slot {
            Value::Number(n) if n.is_u64() => value
                .parse::<u64>()
                .map(Value::from)
                .or_else(|_| {
                    // Accept 1e6-style integers.
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 2f64.powi(53))
                        .map(|f| Value::from(f as u64))
                        .ok_or(())
                })
                .map_err(|_| bad("a non-negative integer"))?,
            // An optional setting can be unset again.
            Value::Number(_) if value == "none" => Value::String(value.to_string()),
            Value::Number(_) => {
                let f = value.parse::<f64>().map_err(|_| bad("a number"))?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| bad("a finite number"))?
            }
            Value::Bool(_) => Value::Bool(value.parse::<bool>().map_err(|_| bad("true or false"))?),
            // An unset optional setting: a number if the value reads as one.
            Value::Null => match value
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                Some(n) => Value::Number(n),
                None => Value::String(value.to_string()),
            },
            _ => Value::String(value.to_string()),
        };
        *slot = new;
        let updated: Config = serde_json::from_value(tree).map_err(|e| {
            let expected = format!("a valid value ({e})");
            bad(&expected)
        })?;
        *self = updated;
        Ok(())
    }
}

fn tree_of(c: &Config) -> Value {
    serde_json::to_value(c).unwrap_or(Value::Null)
}

/// All `section.key` names of a configuration tree.
pub fn setting_keys(tree: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Value::Object(sections) = tree {
        for (s, fields) in sections {
            if let Value::Object(fields) = fields {
                for f in fields.keys() {
                    keys.push(format!("{s}.{f}"));
                }
            }
        }
    }
    keys
}
