//! Ensemble Kalman filters in ensemble space (ENFF_SPEC §6.3–6.4): the deterministic
//! symmetric-square-root ETKF and the EnKF with perturbed observations.
//!
//! Both reduce to `X_a = G · X_f` with an `n × n` matrix `G` built on the host in f64 from
//! `n × n` products of the observed anomalies; the work proportional to `d` is one
//! [`Backend::ensemble_transform`] on the device. (The observed ensemble `h(X)` is read to the
//! host for the `n × n` products.)

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::backend::{Backend, DeviceBuffer};
use crate::error::{check_positive, Error, Result};
use crate::filter::{Filter, Observation};
use crate::rng::{self, NoiseKey, Stream};

/// Eigenvalue floor of the ensemble-space matrices (as in the reference).
const EIG_FLOOR: f64 = 1e-9;

/// Observed anomalies of a forecast, on the host: `A_y` (`n × m`, unscaled), `ȳ`, and `h(X)`.
pub(crate) struct ObservedAnomalies {
    pub n: usize,
    pub m: usize,
    pub hx: Vec<f32>,
    pub mean: Vec<f64>,
}

impl ObservedAnomalies {
    pub(crate) fn of<B: Backend>(
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
        scratch: &mut Option<B::Buffer>,
    ) -> Result<Self> {
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let m = obs.operator.obs_dim(d)?;
        if scratch
            .as_ref()
            .is_none_or(|b| b.rows() != n || b.cols() != m)
        {
            *scratch = Some(backend.zeros(n, m)?);
        }
        let hxb = scratch.as_mut().expect("just set");
        backend.observe(obs.operator, ensemble, hxb)?;
        let hx = backend.read(hxb)?;
        let mut mean = vec![0.0f64; m];
        for row in hx.chunks(m.max(1)) {
            for (a, &v) in mean.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        mean.iter_mut().for_each(|v| *v /= n as f64);
        Ok(ObservedAnomalies { n, m, hx, mean })
    }

    fn anomaly(&self, i: usize, k: usize) -> f64 {
        self.hx[i * self.m + k] as f64 - self.mean[k]
    }

    /// `A_y A_yᵀ` (`n × n`), unscaled.
    pub(crate) fn gram(&self) -> DMatrix<f64> {
        let n = self.n;
        let mut g = DMatrix::<f64>::zeros(n, n);
        let anomalies: Vec<f64> = (0..n * self.m)
            .map(|e| self.anomaly(e / self.m.max(1), e % self.m.max(1)))
            .collect();
        for i in 0..n {
            for j in 0..=i {
                let (ai, aj) = (
                    &anomalies[i * self.m..(i + 1) * self.m],
                    &anomalies[j * self.m..(j + 1) * self.m],
                );
                let v: f64 = ai.iter().zip(aj).map(|(a, b)| a * b).sum();
                g[(i, j)] = v;
                g[(j, i)] = v;
            }
        }
        g
    }

    /// `A_y r` for an `m`-vector `r` (as f64).
    pub(crate) fn project(&self, r: &[f64]) -> DVector<f64> {
        DVector::from_iterator(
            self.n,
            (0..self.n).map(|i| (0..self.m).map(|k| self.anomaly(i, k) * r[k]).sum::<f64>()),
        )
    }
}

/// Checks the inputs every ensemble Kalman filter needs.
pub(crate) fn check_inputs<B: Backend>(
    backend: &B,
    ensemble: &B::Buffer,
    obs: &Observation<'_, B>,
    min_members: usize,
) -> Result<()> {
    let (n, d) = (ensemble.rows(), ensemble.cols());
    if n < min_members {
        return Err(Error::invalid(
            "ensemble.n",
            n,
            format!("this filter needs at least {min_members} members"),
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
    backend.check_finite(obs.y, "observation")?;
    backend.check_finite(ensemble, "forecast ensemble")?;
    backend.sync()
}

/// Uploads `G` (row-major, f32) and replaces the ensemble by `G · X`, then inflates.
pub(crate) fn apply_transform<B: Backend>(
    backend: &B,
    ensemble: &mut B::Buffer,
    g: &DMatrix<f64>,
    work: &mut Option<(B::Buffer, B::Buffer)>,
    inflation: f32,
) -> Result<()> {
    let (n, d) = (ensemble.rows(), ensemble.cols());
    if work
        .as_ref()
        .is_none_or(|(w, x)| w.rows() != n || x.rows() != n || x.cols() != d)
    {
        *work = Some((backend.zeros(n, n)?, backend.zeros(n, d)?));
    }
    let (wb, out) = work.as_mut().expect("just set");
    let host: Vec<f32> = (0..n * n).map(|e| g[(e / n, e % n)] as f32).collect();
    if host.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: "ensemble transform".into(),
            location: "n x n matrix".into(),
            value: f64::NAN,
            hint: "the observed ensemble is degenerate or non-finite; check the inputs".into(),
        });
    }
    backend.write(wb, &host)?;
    backend.ensemble_transform(wb, ensemble, out)?;
    std::mem::swap(ensemble, out);
    backend.inflate(ensemble, inflation)?;
    backend.sync()
}

/// The deterministic symmetric-square-root ETKF (ENFF_SPEC §6.4, the reference's "ESRF"):
/// `C = A_y A_yᵀ/σ² + (n−1)I`, `T = √(n−1) C^{-1/2}`, `w = C⁻¹ A_y (y − ȳ)/σ²`,
/// `x̄_a = x̄ + wᵀA`, `A_a = T A`. No localization.
pub struct Etkf<B: Backend> {
    inflation: f32,
    hx: Option<B::Buffer>,
    work: Option<(B::Buffer, B::Buffer)>,
}

impl<B: Backend> Etkf<B> {
    /// A validated ETKF with multiplicative inflation (1.0 = none).
    pub fn new(inflation: f32) -> Result<Self> {
        crate::backend::check_inflation(inflation)?;
        Ok(Etkf {
            inflation,
            hx: None,
            work: None,
        })
    }

    /// The `n × n` transform `G` with `X_a = G X_f` for one observation (host, f64).
    pub fn transform(
        &mut self,
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
    ) -> Result<DMatrix<f64>> {
        let oa = ObservedAnomalies::of(backend, ensemble, obs, &mut self.hx)?;
        let n = oa.n;
        let n1 = (n.max(2) - 1) as f64;
        let s2 = (obs.noise_std as f64).powi(2);
        let y = backend.read(obs.y)?;
        let innov: Vec<f64> = y
            .iter()
            .zip(&oa.mean)
            .map(|(&yk, &mk)| (yk as f64 - mk) / s2)
            .collect();
        let c = oa.gram() / s2 + DMatrix::<f64>::identity(n, n) * n1;
        let eig = SymmetricEigen::new(c);
        let lam = eig.eigenvalues.map(|l| l.max(EIG_FLOOR));
        let u = &eig.eigenvectors;
        let c_inv = u * DMatrix::from_diagonal(&lam.map(|l| 1.0 / l)) * u.transpose();
        let t = u * DMatrix::from_diagonal(&lam.map(|l| (n1 / l).sqrt())) * u.transpose();
        let w = &c_inv * oa.project(&innov);
        // X_a,i = x̄ + Σ_j (w_j + T_ij)(x_j − x̄) = Σ_j G_ij x_j
        let mut g = DMatrix::<f64>::zeros(n, n);
        for i in 0..n {
            let mut row_sum = 0.0;
            for j in 0..n {
                g[(i, j)] = w[j] + t[(i, j)];
                row_sum += g[(i, j)];
            }
            let mean_part = (1.0 - row_sum) / n as f64;
            for j in 0..n {
                g[(i, j)] += mean_part;
            }
        }
        Ok(g)
    }
}

impl<B: Backend> Filter<B> for Etkf<B> {
    fn name(&self) -> String {
        "etkf".into()
    }

    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        _previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        _cycle: u32,
    ) -> Result<()> {
        check_inputs(backend, ensemble, obs, 2)?;
        let g = self.transform(backend, ensemble, obs)?;
        apply_transform(backend, ensemble, &g, &mut self.work, self.inflation)
    }
}

/// The stochastic EnKF with perturbed observations (ENFF_SPEC §6.3), in ensemble space:
/// `x_a,i = x_i + K (y + σ η_i − h(x_i))`, `K = P_xy (P_yy + σ²I)⁻¹`, evaluated as
/// `Aᵀ (A_y A_yᵀ + (n−1)σ² I)⁻¹ A_y r_i` (exact without localization). The perturbations
/// `η_i ~ N(0, I_m)` are not centred, as in the reference.
pub struct EnkfPo<B: Backend> {
    inflation: f32,
    seed: u64,
    hx: Option<B::Buffer>,
    work: Option<(B::Buffer, B::Buffer)>,
}

impl<B: Backend> EnkfPo<B> {
    /// A validated EnKF-PO with multiplicative inflation and the seed of its perturbations.
    pub fn new(inflation: f32, seed: u64) -> Result<Self> {
        crate::backend::check_inflation(inflation)?;
        Ok(EnkfPo {
            inflation,
            seed,
            hx: None,
            work: None,
        })
    }

    /// The transform `G` for given standard-normal perturbations `eta` (`n × m`, row-major).
    pub fn transform_with_perturbations(
        &mut self,
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
        eta: &[f32],
    ) -> Result<DMatrix<f64>> {
        let oa = ObservedAnomalies::of(backend, ensemble, obs, &mut self.hx)?;
        let (n, m) = (oa.n, oa.m);
        if eta.len() != n * m {
            return Err(Error::shape(
                "observation perturbations",
                format!("{n} x {m}"),
                format!("{} values", eta.len()),
            ));
        }
        let n1 = (n.max(2) - 1) as f64;
        let sigma = obs.noise_std as f64;
        let y = backend.read(obs.y)?;
        let mut big_m = DMatrix::<f64>::zeros(n, n);
        let mut r = vec![0.0f64; m];
        for i in 0..n {
            for k in 0..m {
                r[k] = y[k] as f64 + sigma * eta[i * m + k] as f64 - oa.hx[i * m + k] as f64;
            }
            big_m.set_column(i, &oa.project(&r));
        }
        let c = oa.gram() + DMatrix::<f64>::identity(n, n) * (n1 * sigma * sigma);
        let z = match c.clone().cholesky() {
            Some(ch) => ch.solve(&big_m),
            None => {
                c.pseudo_inverse(1e-12)
                    .map_err(|e| Error::invalid("EnKF gain", e, "degenerate observed ensemble"))?
                    * big_m
            }
        };
        // x_a,i = x_i + Σ_j Z_ji (x_j − x̄)
        let mut g = DMatrix::<f64>::identity(n, n);
        for i in 0..n {
            let col_sum: f64 = (0..n).map(|l| z[(l, i)]).sum();
            for j in 0..n {
                g[(i, j)] += z[(j, i)] - col_sum / n as f64;
            }
        }
        Ok(g)
    }

    /// Runs the analysis with given perturbations (the golden-vector tests use this).
    pub fn analyse_with_perturbations(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
        eta: &[f32],
    ) -> Result<()> {
        check_inputs(backend, ensemble, obs, 2)?;
        let g = self.transform_with_perturbations(backend, ensemble, obs, eta)?;
        apply_transform(backend, ensemble, &g, &mut self.work, self.inflation)
    }
}

impl<B: Backend> Filter<B> for EnkfPo<B> {
    fn name(&self) -> String {
        "enkf".into()
    }

    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        _previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        cycle: u32,
    ) -> Result<()> {
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let m = obs.operator.obs_dim(d)?;
        let key = NoiseKey::new(self.seed, Stream::Filter, cycle);
        let mut eta = vec![0.0f32; n * m];
        for (i, row) in eta.chunks_mut(m.max(1)).enumerate() {
            rng::fill_normal_row(&key, i as u32, row);
        }
        self.analyse_with_perturbations(backend, ensemble, obs, &eta)
    }
}
