//! Ensemble Kalman filters in ensemble space (ENFF_SPEC §6.3–6.4): the deterministic
//! symmetric-square-root ETKF and the EnKF with perturbed observations, optionally localized.
//!
//! Without localization both reduce to `X_a = G · X_f` with an `n × n` matrix `G` built on the
//! host in f64 from `n × n` products of the observed anomalies. The work proportional to `d` or
//! `m` stays on the device: `h(X)`, its products ([`Backend::observed_products`], only
//! `(2n + 1) × n` values cross to the host) and one [`Backend::ensemble_transform`].
//!
//! The localized EnKF-PO (Schur product of the gain's covariances with a Gaspari–Cohn taper,
//! ENFF_SPEC §6.3) has no ensemble-space form: it solves an `m × m` system on the host in f64
//! and forms the localized increments there (in parallel over components), so on the GPU the
//! ensemble and `h(X)` cross to the host and back once per analysis.

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rayon::prelude::*;

use crate::backend::{Backend, DeviceBuffer};
use crate::error::{check_positive, Error, Result};
use crate::filter::{Filter, Observation};
use crate::localization::Localization;
use crate::observe::Observe;
use crate::rng::{NoiseKey, Stream};

/// Eigenvalue floor of the ensemble-space matrices (as in the reference).
const EIG_FLOOR: f64 = 1e-9;

/// Largest observation count of the localized EnKF-PO (its `m × m` solve is dense, on the host).
pub const MAX_LOCALIZED_ENKF_OBS: usize = 8192;

/// Device buffers an ensemble-space filter reuses across analyses.
pub(crate) struct Workspace<B: Backend> {
    hx: Option<B::Buffer>,
    products: Option<B::Buffer>,
    eta: Option<B::Buffer>,
    transform: Option<(B::Buffer, B::Buffer)>,
}

impl<B: Backend> Default for Workspace<B> {
    fn default() -> Self {
        Workspace {
            hx: None,
            products: None,
            eta: None,
            transform: None,
        }
    }
}

/// A buffer of the given shape in `slot`, reallocated only when the shape changes.
pub(crate) fn buffer<'a, B: Backend>(
    backend: &B,
    slot: &'a mut Option<B::Buffer>,
    rows: usize,
    cols: usize,
) -> Result<&'a mut B::Buffer> {
    if slot
        .as_ref()
        .is_none_or(|b| b.rows() != rows || b.cols() != cols)
    {
        *slot = Some(backend.zeros(rows, cols)?);
    }
    Ok(slot.as_mut().expect("just set"))
}

/// `h(X)` of the ensemble, on the device (`n × m`).
pub(crate) fn observed_ensemble<'a, B: Backend>(
    backend: &B,
    ensemble: &B::Buffer,
    obs: &Observation<'_, B>,
    slot: &'a mut Option<B::Buffer>,
) -> Result<&'a mut B::Buffer> {
    let (n, d) = (ensemble.rows(), ensemble.cols());
    let m = obs.operator.obs_dim(d)?;
    let hx = buffer(backend, slot, n, m)?;
    backend.observe(obs.operator, ensemble, hx)?;
    Ok(hx)
}

/// The ensemble-space products of a forecast on the host, in f64 (unscaled):
/// `gram = A_y A_yᵀ`, `innovation = A_y (y − ȳ)` and, with perturbations,
/// `perturbation[(l, i)] = ã_l · η_i`.
pub(crate) struct Products {
    pub gram: DMatrix<f64>,
    pub innovation: DVector<f64>,
    pub perturbation: Option<DMatrix<f64>>,
}

impl Products {
    /// Computes the products on the backend; only the `(n + 1 + e) × n` result is read back.
    pub(crate) fn of<B: Backend>(
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
        with_perturbations: bool,
        ws: &mut Workspace<B>,
    ) -> Result<Self> {
        let n = ensemble.rows();
        let hx = observed_ensemble(backend, ensemble, obs, &mut ws.hx)?;
        let e = if with_perturbations { n } else { 0 };
        let rows = crate::backend::cpu::ensemble_space::observed_products_rows(n, e);
        let out = buffer(backend, &mut ws.products, rows, n)?;
        let eta = if with_perturbations {
            ws.eta.as_ref()
        } else {
            None
        };
        backend.observed_products(hx, obs.y, eta, out)?;
        let v = backend.read(out)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                name: "observed-anomaly products".into(),
                location: format!("row {}, column {}", i / n, i % n),
                value: v[i] as f64,
                hint: "the observed ensemble or the observation is non-finite".into(),
            });
        }
        let at = |r: usize, c: usize| v[r * n + c] as f64;
        Ok(Products {
            gram: DMatrix::from_fn(n, n, at),
            innovation: DVector::from_fn(n, |j, _| at(n, j)),
            perturbation: with_perturbations
                .then(|| DMatrix::from_fn(n, n, |l, i| at(n + 1 + i, l))),
        })
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
    ws: Workspace<B>,
}

impl<B: Backend> Etkf<B> {
    /// A validated ETKF with multiplicative inflation (1.0 = none).
    pub fn new(inflation: f32) -> Result<Self> {
        crate::backend::check_inflation(inflation)?;
        Ok(Etkf {
            inflation,
            ws: Workspace::default(),
        })
    }

    /// The `n × n` transform `G` with `X_a = G X_f` for one observation (host, f64).
    pub fn transform(
        &mut self,
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
    ) -> Result<DMatrix<f64>> {
        let p = Products::of(backend, ensemble, obs, false, &mut self.ws)?;
        let n = ensemble.rows();
        let n1 = (n.max(2) - 1) as f64;
        let s2 = (obs.noise_std as f64).powi(2);
        let c = &p.gram / s2 + DMatrix::<f64>::identity(n, n) * n1;
        let eig = SymmetricEigen::new(c);
        let lam = eig.eigenvalues.map(|l| l.max(EIG_FLOOR));
        let u = &eig.eigenvectors;
        let ut = u.transpose();
        // U·diag(f(λ))·Uᵀ, the diagonal product as a column scaling of U (the same values as
        // the dense product with a diagonal matrix, whose off-diagonal terms add exact zeros).
        let scaled = |f: &dyn Fn(f64) -> f64| {
            let mut us = u.clone();
            for (mut col, &l) in us.column_iter_mut().zip(lam.iter()) {
                let s = f(l);
                col.iter_mut().for_each(|v| *v *= s);
            }
            us * &ut
        };
        let c_inv = scaled(&|l| 1.0 / l);
        let t = scaled(&|l| (n1 / l).sqrt());
        let w = &c_inv * (&p.innovation / s2);
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
        apply_transform(
            backend,
            ensemble,
            &g,
            &mut self.ws.transform,
            self.inflation,
        )
    }
}

/// The stochastic EnKF with perturbed observations (ENFF_SPEC §6.3):
/// `x_a,i = x_i + K (y + σ η_i − h(x_i))`, `K = P_xy (P_yy + σ²I)⁻¹`. The perturbations
/// `η_i ~ N(0, I_m)` are not centred, as in the reference.
///
/// Without localization it runs in ensemble space as
/// `Aᵀ (A_y A_yᵀ + (n−1)σ² I)⁻¹ A_y r_i` (exact). With a Gaspari–Cohn [`Localization`] the
/// covariances are tapered, `P_xy ∘ L_xy` and `P_yy ∘ L_yy`, with distances on the model's
/// geometry, and the analysis runs on the host (see the module notes).
pub struct EnkfPo<B: Backend> {
    inflation: f32,
    seed: u64,
    localization: Option<Localization>,
    ws: Workspace<B>,
}

impl<B: Backend> EnkfPo<B> {
    /// A validated global EnKF-PO with multiplicative inflation and the seed of its
    /// perturbations.
    pub fn new(inflation: f32, seed: u64) -> Result<Self> {
        crate::backend::check_inflation(inflation)?;
        Ok(EnkfPo {
            inflation,
            seed,
            localization: None,
            ws: Workspace::default(),
        })
    }

    /// The same filter with Gaspari–Cohn localization (`None` = global).
    pub fn with_localization(mut self, localization: Option<Localization>) -> Self {
        self.localization = localization;
        self
    }

    /// The localization in use, if any.
    pub fn localization(&self) -> Option<&Localization> {
        self.localization.as_ref()
    }

    /// The global transform `G` (`X_a = G X_f`) for the perturbations already in the
    /// workspace's `eta` buffer: `x_a,i = x_i + Σ_j Z_ji (x_j − x̄)` with
    /// `Z = (A_y A_yᵀ + (n−1)σ² I)⁻¹ A_y R` (`R` the perturbed innovations). With fewer
    /// observations than members the same `Z` is computed in observation space,
    /// `Z = A_y (A_yᵀ A_y + (n−1)σ² I)⁻¹ R`, from `h(X)` and `η` (`n × m`, smaller than the
    /// `n × n` products).
    fn global_transform(
        &mut self,
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
    ) -> Result<DMatrix<f64>> {
        let n = ensemble.rows();
        let m = obs.operator.obs_dim(ensemble.cols())?;
        let n1 = (n.max(2) - 1) as f64;
        let sigma = obs.noise_std as f64;
        let solve = |c: DMatrix<f64>, rhs: DMatrix<f64>| -> Result<DMatrix<f64>> {
            Ok(match c.clone().cholesky() {
                Some(ch) => ch.solve(&rhs),
                None => {
                    c.pseudo_inverse(1e-12).map_err(|e| {
                        Error::invalid("EnKF gain", e, "degenerate observed ensemble")
                    })? * rhs
                }
            })
        };
        let z = if m < n {
            let hx = backend.read(observed_ensemble(backend, ensemble, obs, &mut self.ws.hx)?)?;
            let eta = backend.read(self.ws.eta.as_ref().expect("perturbations drawn"))?;
            let y = backend.read(obs.y)?;
            let mut ybar = vec![0.0f64; m];
            for row in hx.chunks(m) {
                for (a, &v) in ybar.iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
            ybar.iter_mut().for_each(|v| *v /= n as f64);
            let ay = DMatrix::<f64>::from_fn(n, m, |i, q| hx[i * m + q] as f64 - ybar[q]);
            let r = DMatrix::<f64>::from_fn(m, n, |q, i| {
                y[q] as f64 + sigma * eta[i * m + q] as f64 - hx[i * m + q] as f64
            });
            let c = ay.transpose() * &ay + DMatrix::<f64>::identity(m, m) * (n1 * sigma * sigma);
            &ay * solve(c, r)?
        } else {
            let p = Products::of(backend, ensemble, obs, true, &mut self.ws)?;
            let e = p.perturbation.as_ref().expect("requested");
            // Column i: A_y r_i = A_y(y − ȳ) + σ A_y η_i − A_y ã_i.
            let mut big_m = DMatrix::<f64>::zeros(n, n);
            for i in 0..n {
                for l in 0..n {
                    big_m[(l, i)] = p.innovation[l] + sigma * e[(l, i)] - p.gram[(l, i)];
                }
            }
            let c = &p.gram + DMatrix::<f64>::identity(n, n) * (n1 * sigma * sigma);
            solve(c, big_m)?
        };
        let mut g = DMatrix::<f64>::identity(n, n);
        for i in 0..n {
            let col_sum: f64 = (0..n).map(|l| z[(l, i)]).sum();
            for j in 0..n {
                g[(i, j)] += z[(j, i)] - col_sum / n as f64;
            }
        }
        Ok(g)
    }

    /// Draws the perturbations of `cycle` into the workspace, on the device.
    fn draw_perturbations(&mut self, backend: &B, n: usize, m: usize, cycle: u32) -> Result<()> {
        let key = NoiseKey::new(self.seed, Stream::Filter, cycle);
        let eta = buffer(backend, &mut self.ws.eta, n, m)?;
        backend.fill_normal(eta, key, None, 1.0)
    }

    /// The global transform `G` for given standard-normal perturbations `eta` (`n × m`,
    /// row-major).
    pub fn transform_with_perturbations(
        &mut self,
        backend: &B,
        ensemble: &B::Buffer,
        obs: &Observation<'_, B>,
        eta: &[f32],
    ) -> Result<DMatrix<f64>> {
        let (n, m) = (ensemble.rows(), obs.operator.obs_dim(ensemble.cols())?);
        self.upload_perturbations(backend, n, m, eta)?;
        self.global_transform(backend, ensemble, obs)
    }

    fn upload_perturbations(&mut self, backend: &B, n: usize, m: usize, eta: &[f32]) -> Result<()> {
        if eta.len() != n * m {
            return Err(Error::shape(
                "observation perturbations",
                format!("{n} x {m}"),
                format!("{} values", eta.len()),
            ));
        }
        let buf = buffer(backend, &mut self.ws.eta, n, m)?;
        backend.write(buf, eta)
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
        let (n, m) = (ensemble.rows(), obs.operator.obs_dim(ensemble.cols())?);
        self.upload_perturbations(backend, n, m, eta)?;
        self.analyse_drawn(backend, ensemble, obs)
    }

    /// The analysis with the perturbations in the workspace.
    fn analyse_drawn(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
    ) -> Result<()> {
        match self.localization {
            None => {
                let g = self.global_transform(backend, ensemble, obs)?;
                apply_transform(
                    backend,
                    ensemble,
                    &g,
                    &mut self.ws.transform,
                    self.inflation,
                )
            }
            Some(loc) => {
                self.localized(backend, ensemble, obs, &loc)?;
                backend.inflate(ensemble, self.inflation)?;
                backend.sync()
            }
        }
    }

    /// The localized analysis on the host (f64): `S = P_yy ∘ L_yy + σ² I` (`m × m`),
    /// `Z = S⁻¹ [y + σ η_i − h(x_i)]_i`, `x_a,i = x_i + (P_xy ∘ L_xy) z_i`.
    fn localized(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
        loc: &Localization,
    ) -> Result<()> {
        let op: Observe = obs.operator.builtin().ok_or_else(|| Error::Unsupported {
            backend: backend.name().into(),
            what: format!(
                "a localized EnKF with the user-defined operator `{}`",
                obs.operator.name()
            ),
            fix: "localization needs observation locations: use a built-in operator, or leave \
                  filter.loc_radius unset for the global EnKF"
                .into(),
        })?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let m = obs.operator.obs_dim(d)?;
        if m > MAX_LOCALIZED_ENKF_OBS {
            return Err(Error::Unsupported {
                backend: backend.name().into(),
                what: format!(
                    "a localized EnKF-PO with m = {m} observations (a dense m x m solve; at \
                     most {MAX_LOCALIZED_ENKF_OBS})"
                ),
                fix: "use --filter letkf, observe fewer components, or leave filter.loc_radius \
                      unset for the global EnKF"
                    .into(),
            });
        }
        let hxb = observed_ensemble(backend, ensemble, obs, &mut self.ws.hx)?;
        let hx = backend.read(hxb)?;
        let eta = backend.read(self.ws.eta.as_ref().expect("perturbations drawn"))?;
        let y = backend.read(obs.y)?;
        let mut x = backend.read(ensemble)?;
        let n1 = (n.max(2) - 1) as f64;
        let sigma = obs.noise_std as f64;
        let col_mean = |v: &[f32], cols: usize| -> Vec<f64> {
            let mut mean = vec![0.0f64; cols];
            for row in v.chunks(cols.max(1)) {
                for (a, &b) in mean.iter_mut().zip(row) {
                    *a += b as f64;
                }
            }
            mean.iter_mut().for_each(|a| *a /= n as f64);
            mean
        };
        let ybar = col_mean(&hx, m);
        let xbar = col_mean(&x, d);
        // Observed anomalies, observation-major (m × n) for contiguous dot products.
        let ay: Vec<f64> = (0..m * n)
            .map(|e| {
                let (q, i) = (e / n, e % n);
                hx[i * m + q] as f64 - ybar[q]
            })
            .collect();
        let pos: Vec<usize> = (0..m).map(|q| op.component(q)).collect();
        let mut s = DMatrix::<f64>::zeros(m, m);
        for q in 0..m {
            for r in 0..=q {
                let rho = loc.taper(pos[q], pos[r]);
                let v = if rho > 0.0 {
                    rho * (0..n).map(|i| ay[q * n + i] * ay[r * n + i]).sum::<f64>() / n1
                } else {
                    0.0
                };
                s[(q, r)] = v;
                s[(r, q)] = v;
            }
            s[(q, q)] += sigma * sigma;
        }
        let innov = DMatrix::<f64>::from_fn(m, n, |q, i| {
            y[q] as f64 + sigma * eta[i * m + q] as f64 - hx[i * m + q] as f64
        });
        let z = match s.clone().cholesky() {
            Some(ch) => ch.solve(&innov),
            None => {
                s.pseudo_inverse(1e-12)
                    .map_err(|e| Error::invalid("EnKF gain", e, "degenerate observed ensemble"))?
                    * innov
            }
        };
        // Increments per component: (P_xy ∘ L_xy)[k, q] = ρ(k, q) Σ_j a_jk ã_jq / (n − 1).
        let increments: Vec<Vec<f64>> = (0..d)
            .into_par_iter()
            .map(|k| {
                let a: Vec<f64> = (0..n).map(|j| x[j * d + k] as f64 - xbar[k]).collect();
                let mut inc = vec![0.0f64; n];
                for (q, rho) in loc.local_observations(k, &op, m) {
                    let pxy = rho * (0..n).map(|j| a[j] * ay[q * n + j]).sum::<f64>() / n1;
                    for (i, v) in inc.iter_mut().enumerate() {
                        *v += pxy * z[(q, i)];
                    }
                }
                inc
            })
            .collect();
        for (k, inc) in increments.iter().enumerate() {
            for (i, v) in inc.iter().enumerate() {
                x[i * d + k] = (x[i * d + k] as f64 + v) as f32;
            }
        }
        crate::error::check_finite(
            "localized EnKF analysis",
            &x,
            d,
            "the analysis blew up; check the inputs",
        )?;
        backend.write(ensemble, &x)
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
        check_inputs(backend, ensemble, obs, 2)?;
        let (n, m) = (ensemble.rows(), obs.operator.obs_dim(ensemble.cols())?);
        self.draw_perturbations(backend, n, m, cycle)?;
        self.analyse_drawn(backend, ensemble, obs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::observe::Observe;
    use crate::rng::{NoiseKey, Stream};

    #[test]
    fn etkf_transform_equals_the_dense_diagonal_products() {
        // `U·f(Λ)·Uᵀ` with the diagonal product as a column scaling gives the values of the
        // dense products `U·diag(f(Λ))·Uᵀ` it replaced, bit for bit.
        let cpu = Cpu::new();
        for (n, d, sigma) in [
            (2usize, 3usize, 0.5f32),
            (7, 40, 1.0),
            (20, 40, 1.0),
            (33, 12, 0.2),
        ] {
            let key = NoiseKey::new(4, Stream::User, n as u32);
            let mut ens = cpu.zeros(n, d).unwrap();
            cpu.fill_normal(&mut ens, key, None, 1.0).unwrap();
            let mut y = cpu.zeros(1, d).unwrap();
            cpu.fill_normal(&mut y, key.with_step(1), None, 1.0)
                .unwrap();
            let op = Observe::arctan();
            let obs = Observation {
                y: &y,
                operator: &op,
                noise_std: sigma,
            };
            let got = Etkf::<Cpu>::new(1.0)
                .unwrap()
                .transform(&cpu, &ens, &obs)
                .unwrap();
            let p = Products::of(&cpu, &ens, &obs, false, &mut Workspace::default()).unwrap();
            let n1 = (n - 1) as f64;
            let s2 = (sigma as f64).powi(2);
            let c = &p.gram / s2 + DMatrix::<f64>::identity(n, n) * n1;
            let eig = SymmetricEigen::new(c);
            let lam = eig.eigenvalues.map(|l| l.max(EIG_FLOOR));
            let u = &eig.eigenvectors;
            let c_inv = u * DMatrix::from_diagonal(&lam.map(|l| 1.0 / l)) * u.transpose();
            let t = u * DMatrix::from_diagonal(&lam.map(|l| (n1 / l).sqrt())) * u.transpose();
            let w = &c_inv * (&p.innovation / s2);
            let mut want = DMatrix::<f64>::zeros(n, n);
            for i in 0..n {
                let mut row_sum = 0.0;
                for j in 0..n {
                    want[(i, j)] = w[j] + t[(i, j)];
                    row_sum += want[(i, j)];
                }
                let mean_part = (1.0 - row_sum) / n as f64;
                for j in 0..n {
                    want[(i, j)] += mean_part;
                }
            }
            let bits = |m: &DMatrix<f64>| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "n {n}, d {d}");
        }
    }
}
