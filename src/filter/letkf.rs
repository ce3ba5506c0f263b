//! The local ensemble transform Kalman filter (ENFF_SPEC §6.5): an ETKF for every state
//! component with the observations inside its Gaspari–Cohn radius, weighted by the taper
//! (R-localization, `√ρ` scaling of the observed anomalies and innovations).
//!
//! Distances are measured on the flattened index ring of length `d` (the reference's convention,
//! the natural one for Lorenz-96). The local analyses run on the host in f64, in parallel over
//! components; on the GPU backend the ensemble crosses to the host and back once per analysis.

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rayon::prelude::*;

use crate::backend::{Backend, DeviceBuffer};
use crate::error::{Error, Result};
use crate::filter::ensemble_kalman::check_inputs;
use crate::filter::localization::{gaspari_cohn, ring_distance};
use crate::filter::{Filter, Observation};

/// Taper below which an observation is left out of a local analysis (as in the reference).
const RHO_MIN: f64 = 1e-6;

/// The LETKF.
pub struct Letkf<B: Backend> {
    radius: f64,
    inflation: f32,
    hx: Option<B::Buffer>,
}

impl<B: Backend> Letkf<B> {
    /// A validated LETKF with Gaspari–Cohn radius `radius` (grid points, DAPPER's 1.82
    /// convention) and multiplicative inflation.
    pub fn new(radius: f64, inflation: f32) -> Result<Self> {
        if !(radius.is_finite() && radius > 0.0) {
            return Err(Error::invalid(
                "filter.loc_radius",
                radius,
                "the localization radius must be positive (tuned in 1-16 grid points)",
            ));
        }
        crate::backend::check_inflation(inflation)?;
        Ok(Letkf {
            radius,
            inflation,
            hx: None,
        })
    }
}

impl<B: Backend> Filter<B> for Letkf<B> {
    fn name(&self) -> String {
        "letkf".into()
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
        let op = obs.operator.builtin().ok_or_else(|| Error::Unsupported {
            backend: backend.name().into(),
            what: format!(
                "LETKF with the user-defined operator `{}`",
                obs.operator.name()
            ),
            fix: "LETKF needs observation locations: use a built-in operator".into(),
        })?;
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let oa =
            super::ensemble_kalman::ObservedAnomalies::of(backend, ensemble, obs, &mut self.hx)?;
        let m = oa.m;
        let n1 = (n.max(2) - 1) as f64;
        let sigma = obs.noise_std as f64;
        let y = backend.read(obs.y)?;
        let x = backend.read(ensemble)?;
        // Scaled observed anomalies (n × m) and innovations (m).
        let ay: Vec<f64> = (0..n * m)
            .map(|e| (oa.hx[e] as f64 - oa.mean[e % m]) / sigma)
            .collect();
        let dy: Vec<f64> = (0..m).map(|k| (y[k] as f64 - oa.mean[k]) / sigma).collect();
        let obs_pos: Vec<usize> = (0..m).map(|k| op.component(k)).collect();
        let reach = (2.0 * 1.82 * self.radius).ceil() as usize;
        let radius = self.radius;
        let columns: Vec<Vec<f32>> = (0..d)
            .into_par_iter()
            .map(|k| {
                let xcol: Vec<f64> = (0..n).map(|i| x[i * d + k] as f64).collect();
                let mean = xcol.iter().sum::<f64>() / n as f64;
                let a: DVector<f64> = DVector::from_iterator(n, xcol.iter().map(|v| v - mean));
                // Local observations with their tapers.
                let local: Vec<(usize, f64)> = (0..m)
                    .filter(|&q| ring_distance(obs_pos[q], k, d) <= reach)
                    .map(|q| {
                        (
                            q,
                            gaspari_cohn(ring_distance(obs_pos[q], k, d) as f64, radius),
                        )
                    })
                    .filter(|&(_, rho)| rho > RHO_MIN)
                    .collect();
                if local.is_empty() {
                    return xcol.iter().map(|&v| v as f32).collect();
                }
                let ml = local.len();
                let mut at = DMatrix::<f64>::zeros(n, ml);
                let mut dt = DVector::<f64>::zeros(ml);
                for (c, &(q, rho)) in local.iter().enumerate() {
                    let s = rho.sqrt();
                    for i in 0..n {
                        at[(i, c)] = ay[i * m + q] * s;
                    }
                    dt[c] = dy[q] * s;
                }
                let c = &at * at.transpose() + DMatrix::<f64>::identity(n, n) * n1;
                let eig = SymmetricEigen::new(c);
                let lam = eig.eigenvalues.map(|l| l.max(1e-9));
                let u = &eig.eigenvectors;
                let c_inv = u * DMatrix::from_diagonal(&lam.map(|l| 1.0 / l)) * u.transpose();
                let t = u * DMatrix::from_diagonal(&lam.map(|l| (n1 / l).sqrt())) * u.transpose();
                let w = &c_inv * (&at * dt);
                let mean_a = mean + w.dot(&a);
                let aa = &t * &a;
                (0..n).map(|i| (mean_a + aa[i]) as f32).collect()
            })
            .collect();
        let mut out = vec![0.0f32; n * d];
        for (k, col) in columns.iter().enumerate() {
            for i in 0..n {
                out[i * d + k] = col[i];
            }
        }
        if let Some(e) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: "LETKF analysis".into(),
                location: format!("member {}, component {}", e / d, e % d),
                value: out[e] as f64,
                hint: "the local analysis blew up; check the inputs".into(),
            });
        }
        backend.write(ensemble, &out)?;
        backend.inflate(ensemble, self.inflation)?;
        backend.sync()
    }
}
