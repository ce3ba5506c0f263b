//! The bootstrap particle filter (ENFF_SPEC §6.1): optional jitter, likelihood weights with a
//! max-subtracted softmax, resampling with replacement. Non-finite log-likelihoods are an
//! error (the reference turns them into uniform weights silently; we do not).

use nalgebra::DMatrix;

use crate::backend::{Backend, DeviceBuffer};
use crate::error::{Error, Result};
use crate::filter::ensemble_kalman::{apply_transform, check_inputs};
use crate::filter::{Filter, Observation};
use crate::rng::{self, NoiseKey, Stream};

/// How particles are resampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resampling {
    /// `n` indices drawn independently from the weights (the reference's choice).
    #[default]
    Multinomial,
    /// One uniform offset and `n` evenly spaced points (lower variance).
    Systematic,
}

/// The bootstrap particle filter.
pub struct ParticleFilter<B: Backend> {
    resampling: Resampling,
    jitter: f32,
    inflation: f32,
    seed: u64,
    loglik: Option<B::Buffer>,
    jittered: Option<B::Buffer>,
    work: Option<(B::Buffer, B::Buffer)>,
    last_ess: f64,
}

impl<B: Backend> ParticleFilter<B> {
    /// A validated particle filter: `jitter` ≥ 0 is the std of the noise added to the forecast
    /// before weighting (0 = none), `inflation` as for every filter.
    pub fn new(resampling: Resampling, jitter: f32, inflation: f32, seed: u64) -> Result<Self> {
        if !(jitter.is_finite() && jitter >= 0.0) {
            return Err(Error::invalid(
                "filter.jitter",
                jitter,
                "the jitter std must be finite and non-negative (0 = none)",
            ));
        }
        crate::backend::check_inflation(inflation)?;
        Ok(ParticleFilter {
            resampling,
            jitter,
            inflation,
            seed,
            loglik: None,
            jittered: None,
            work: None,
            last_ess: f64::NAN,
        })
    }

    /// Effective sample size `1 / Σ w²` of the last analysis.
    pub fn effective_sample_size(&self) -> f64 {
        self.last_ess
    }
}

/// Normalized weights from log-likelihoods, or an error naming the first non-finite one.
pub fn weights_from_log_likelihoods(loglik: &[f32], cycle: u32) -> Result<Vec<f64>> {
    if let Some(i) = loglik.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: "particle log-likelihoods".into(),
            location: format!("member {i}, cycle {cycle}"),
            value: loglik[i] as f64,
            hint: "a particle or the observation is non-finite; the weights are not made \
                   uniform silently"
                .into(),
        });
    }
    let max = loglik
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let w: Vec<f64> = loglik.iter().map(|&l| (l as f64 - max).exp()).collect();
    let s: f64 = w.iter().sum();
    Ok(w.into_iter().map(|v| v / s).collect())
}

/// Resampled indices for `weights` using `uniform(k)` ∈ [0, 1) draws.
pub fn resample(weights: &[f64], kind: Resampling, uniform: impl Fn(usize) -> f64) -> Vec<usize> {
    let n = weights.len();
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for &w in weights {
        acc += w;
        cdf.push(acc);
    }
    let pick = |u: f64| {
        let target = u * acc;
        cdf.partition_point(|&c| c <= target).min(n - 1)
    };
    match kind {
        Resampling::Multinomial => (0..n).map(|k| pick(uniform(k))).collect(),
        Resampling::Systematic => {
            let u0 = uniform(0);
            (0..n).map(|k| pick((k as f64 + u0) / n as f64)).collect()
        }
    }
}

impl<B: Backend> Filter<B> for ParticleFilter<B> {
    fn name(&self) -> String {
        "bpf".into()
    }

    fn effective_sample_size(&self) -> Option<f64> {
        Some(self.last_ess)
    }

    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        _previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        cycle: u32,
    ) -> Result<()> {
        check_inputs(backend, ensemble, obs, 1)?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        if self.jitter > 0.0 {
            if self
                .jittered
                .as_ref()
                .is_none_or(|b| b.rows() != n || b.cols() != d)
            {
                self.jittered = Some(backend.zeros(n, d)?);
            }
            let j = self.jittered.as_mut().expect("just set");
            let key = NoiseKey::new(self.seed, Stream::Filter, cycle).with_step(1);
            backend.fill_normal(j, key, Some(ensemble), self.jitter)?;
            std::mem::swap(ensemble, j);
        }
        if self.loglik.as_ref().is_none_or(|b| b.cols() != n) {
            self.loglik = Some(backend.zeros(1, n)?);
        }
        let ll = self.loglik.as_mut().expect("just set");
        backend.log_likelihoods(obs.operator, ensemble, obs.y, obs.noise_std, ll)?;
        let w = weights_from_log_likelihoods(&backend.read(ll)?, cycle)?;
        self.last_ess = 1.0 / w.iter().map(|v| v * v).sum::<f64>();
        let key = NoiseKey::new(self.seed, Stream::Filter, cycle).with_step(2);
        let idx = resample(&w, self.resampling, |k| rng::uniform(&key, 0, k));
        let mut g = DMatrix::<f64>::zeros(n, n);
        for (i, &j) in idx.iter().enumerate() {
            g[(i, j)] = 1.0;
        }
        apply_transform(backend, ensemble, &g, &mut self.work, self.inflation)
    }
}
