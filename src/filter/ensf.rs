//! The Ensemble Score Filter (EnSF, Bao et al. 2024, as in the EnFF reference; ENFF_SPEC §2.6,
//! §4.2): a reverse-time SDE from noise to the analysis, driven by a Monte-Carlo prior score
//! built on the forecast ensemble and a damped likelihood score evaluated at the current state.
//!
//! It reuses the flow kernels: the prior score `ŝ_i = Σ_j W_ij (α x_f^(j) − x_i)/β²` is the
//! fused update's velocity with `cx = −1/β²` and targets `(α/β²) x_f`, the likelihood score is
//! its guidance with zero look-ahead, and the clamp and the drift `f(τ, x) = −(1−ε_α)/α · x`
//! are the update's clamp and previous-velocity term.

use crate::backend::{Backend, DeviceBuffer, FlowUpdate, Guidance, PathCoefficients};
use crate::error::{Error, Result};
use crate::filter::enff::check_flow_inputs;
use crate::filter::{Filter, Observation};
use crate::rng::{NoiseKey, Stream};

/// How the reverse-time dynamics are integrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreSampler {
    /// Euler–Maruyama on the reverse SDE (the reference's default).
    #[default]
    EulerMaruyama,
    /// Euler on the probability-flow ODE (`g²/2`, no noise).
    ProbabilityFlow,
}

/// Configuration of [`Ensf`].
#[derive(Clone, Debug, PartialEq)]
pub struct EnsfConfig {
    /// `ε_α ∈ (0, 1]`: α(1) = ε_α.
    pub eps_alpha: f32,
    /// `ε_β ∈ (0, 1]`: β(0)² = ε_β.
    pub eps_beta: f32,
    /// Pseudo-time steps (the reference's K grid points = flow_steps + 1).
    pub flow_steps: usize,
    /// Component-wise clamp of the total score (1000 in the reference).
    pub max_score: f32,
    /// Euler–Maruyama or the probability-flow ODE.
    pub sampler: ScoreSampler,
    /// Multiplicative inflation (1.0 = none).
    pub inflation: f32,
    /// Seed of the source and diffusion noise.
    pub seed: u64,
}

impl EnsfConfig {
    /// The reference defaults `ε_α = 0.5`, `ε_β = 0.025`, clamp 1000, Euler–Maruyama.
    pub fn new(flow_steps: usize) -> Self {
        EnsfConfig {
            eps_alpha: 0.5,
            eps_beta: 0.025,
            flow_steps,
            max_score: 1000.0,
            sampler: ScoreSampler::EulerMaruyama,
            inflation: 1.0,
            seed: 0,
        }
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("filter.eps_alpha", self.eps_alpha),
            ("filter.eps_beta", self.eps_beta),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(Error::invalid(
                    name,
                    v,
                    "must lie in (0, 1] (defaults 0.5 and 0.025)",
                ));
            }
        }
        if self.flow_steps < 1 || self.flow_steps > crate::rng::MAX_STEP as usize - 1 {
            return Err(Error::invalid(
                "filter.flow_steps",
                self.flow_steps,
                "EnSF needs at least 1 step (it is accurate from about 50)",
            ));
        }
        if !(self.max_score.is_finite() && self.max_score > 0.0) {
            return Err(Error::invalid(
                "filter.max_score",
                self.max_score,
                "the score clamp must be positive (1000 in the reference)",
            ));
        }
        if !(self.inflation.is_finite() && self.inflation > 0.0) {
            return Err(Error::invalid(
                "filter.inflation",
                self.inflation,
                "inflation is a positive factor, 1.0 = none",
            ));
        }
        Ok(())
    }

    /// `α(τ) = 1 − τ(1 − ε_α)`.
    pub fn alpha(&self, tau: f64) -> f64 {
        1.0 - tau * (1.0 - self.eps_alpha as f64)
    }

    /// `β(τ)² = ε_β + τ(1 − ε_β)`.
    pub fn beta2(&self, tau: f64) -> f64 {
        self.eps_beta as f64 + tau * (1.0 - self.eps_beta as f64)
    }

    /// Drift coefficient `d ln α / dτ = −(1 − ε_α)/α(τ)`.
    pub fn drift(&self, tau: f64) -> f64 {
        -(1.0 - self.eps_alpha as f64) / self.alpha(tau)
    }

    /// Squared diffusion `g² = (1 − ε_β) + 2(1 − ε_α) β²/α`.
    pub fn g2(&self, tau: f64) -> f64 {
        (1.0 - self.eps_beta as f64)
            + 2.0 * (1.0 - self.eps_alpha as f64) * self.beta2(tau) / self.alpha(tau)
    }
}

struct Workspace<B: Backend> {
    x: B::Buffer,
    xc: B::Buffer,
    weights: B::Buffer,
}

/// The Ensemble Score Filter.
pub struct Ensf<B: Backend> {
    config: EnsfConfig,
    work: Option<Workspace<B>>,
}

impl<B: Backend> Ensf<B> {
    /// A validated EnSF.
    pub fn new(config: EnsfConfig) -> Result<Self> {
        config.validate()?;
        Ok(Ensf { config, work: None })
    }

    fn workspace(&mut self, backend: &B, n: usize, d: usize) -> Result<&mut Workspace<B>> {
        if self
            .work
            .as_ref()
            .is_none_or(|w| w.x.rows() != n || w.x.cols() != d)
        {
            self.work = Some(Workspace {
                x: backend.zeros(n, d)?,
                xc: backend.zeros(n, d)?,
                weights: backend.zeros(n, n)?,
            });
        }
        Ok(self.work.as_mut().expect("just set"))
    }

    /// Runs the analysis from given start noise `z` (`n × d`) and, for Euler–Maruyama, the
    /// diffusion noises `xi[k]` of each step (the golden-vector tests use this).
    pub fn analyse_with_noise(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
        z: &B::Buffer,
        xi: &[B::Buffer],
    ) -> Result<()> {
        self.analyse_with_noise_steps(backend, ensemble, obs, z, xi, self.config.flow_steps)
    }

    /// As [`Ensf::analyse_with_noise`], stopping after the first `steps` steps of the grid.
    pub fn analyse_with_noise_steps(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
        z: &B::Buffer,
        xi: &[B::Buffer],
        steps: usize,
    ) -> Result<()> {
        if xi.len() < steps.min(self.config.flow_steps) {
            return Err(Error::shape(
                "diffusion noises",
                format!("{} buffers", steps.min(self.config.flow_steps)),
                format!("{} buffers", xi.len()),
            ));
        }
        check_flow_inputs(backend, ensemble, None, obs, false)?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        self.workspace(backend, n, d)?;
        let w = self.work.as_mut().expect("workspace");
        backend.copy(z, &mut w.x)?;
        self.integrate(backend, ensemble, obs, steps, |k, out, mean, scale| {
            backend.copy(&xi[k], out)?;
            // out = mean + scale·ξ, done on the host for this test entry point.
            let (mut o, m) = (backend.read(out)?, backend.read(mean)?);
            for (v, mv) in o.iter_mut().zip(m) {
                *v = mv + scale * *v;
            }
            backend.write(out, &o)
        })
    }

    fn integrate(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
        steps: usize,
        mut noise: impl FnMut(usize, &mut B::Buffer, &B::Buffer, f32) -> Result<()>,
    ) -> Result<()> {
        let cfg = self.config.clone();
        let w = self.work.as_mut().expect("workspace");
        let k_steps = cfg.flow_steps;
        let dtau = -1.0 / k_steps as f64;
        let s2 = (obs.noise_std as f64).powi(2);
        let target: &B::Buffer = ensemble;
        for k in 0..k_steps.min(steps) {
            let tau = 1.0 - k as f64 / k_steps as f64;
            let (alpha, beta2) = (cfg.alpha(tau), cfg.beta2(tau));
            let beta = beta2.sqrt();
            let g2 = cfg.g2(tau);
            backend.copy(&w.x, &mut w.xc)?;
            let path = PathCoefficients {
                t: tau as f32,
                a: alpha as f32,
                b: 0.0,
                da: 0.0,
                db: 0.0,
                s: beta as f32,
                ds: (-1.0 / beta) as f32,
            };
            backend.flow_logits(&w.xc, target, None, path, None, &mut w.weights)?;
            backend.softmax_rows(&mut w.weights)?;
            let h_new = match cfg.sampler {
                ScoreSampler::EulerMaruyama => -dtau * g2,
                ScoreSampler::ProbabilityFlow => -dtau * g2 / 2.0,
            };
            backend.flow_update(
                &mut w.x,
                &FlowUpdate {
                    eval: Some(&w.xc),
                    weights: &w.weights,
                    target,
                    source: None,
                    path,
                    guidance: Some(Guidance {
                        operator: obs.operator,
                        y: obs.y,
                        scale: ((1.0 - tau) / s2) as f32,
                        horizon: 0.0,
                    }),
                    h_new: h_new as f32,
                    previous: Some((&w.xc, (dtau * cfg.drift(tau)) as f32)),
                    clamp: Some(cfg.max_score),
                },
                None,
            )?;
            if cfg.sampler == ScoreSampler::EulerMaruyama {
                let scale = ((-dtau).sqrt() * g2.sqrt()) as f32;
                noise(k, &mut w.xc, &w.x, scale)?;
                std::mem::swap(&mut w.x, &mut w.xc);
            }
        }
        backend.inflate(&mut w.x, cfg.inflation)?;
        std::mem::swap(ensemble, &mut w.x);
        backend.sync()
    }
}

impl<B: Backend> Filter<B> for Ensf<B> {
    fn name(&self) -> String {
        "ensf".into()
    }

    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        _previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        cycle: u32,
    ) -> Result<()> {
        check_flow_inputs(backend, ensemble, None, obs, false)?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let seed = self.config.seed;
        let key = NoiseKey::new(seed, Stream::FlowSource, cycle);
        let w = self.workspace(backend, n, d)?;
        backend.fill_normal(&mut w.x, key, None, 1.0)?;
        let steps = self.config.flow_steps;
        self.integrate(backend, ensemble, obs, steps, |k, out, mean, scale| {
            backend.fill_normal(out, key.with_step(k as u32 + 1), Some(mean), scale)
        })
    }
}
