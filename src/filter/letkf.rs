//! The local ensemble transform Kalman filter (ENFF_SPEC §6.5): an ETKF for every state
//! component with the observations inside its Gaspari–Cohn radius, weighted by the taper
//! (R-localization, `√ρ` scaling of the observed anomalies and innovations).
//!
//! Distances are measured on the model's geometry (a ring for Lorenz-96 and
//! Kuramoto–Sivashinsky, a torus for Navier–Stokes, where the components at one grid point share
//! one local analysis), or on the flattened index ring (`filter.loc_distance = flattened`, the
//! reference's convention). A filter built without a geometry uses the flattened ring.
//!
//! Two implementations:
//! * the batched analysis of [`Backend::letkf_analysis`], used on backends that prefer it (the
//!   GPU, [`Backend::on_device`]) for ensembles of up to [`LETKF_MAX_MEMBERS`]
//!   members: one workgroup per grid cell forms the local `n × n` matrix and diagonalizes it
//!   with a cyclic Jacobi solver in f32, so nothing of size `d` or `m` crosses to the host; its
//!   CPU twin runs the same algorithm on the host ([`Letkf::with_batched`] forces it);
//! * the reference in f64 on the host: on the CPU backend, for every ensemble larger than
//!   [`LETKF_MAX_MEMBERS`] on the GPU (the ensemble then crosses to the host and back once per
//!   analysis), and with [`Letkf::with_host_reference`]. It runs in parallel over components.
//!
//! Accuracy of the f32 batched analysis: the local matrices have eigenvalues ≥ n − 1, so the
//! Jacobi solver's rounding error stays near f32 precision; the analysis agrees with the f64
//! reference to about 1e-5 relative to the ensemble's spread (checked in the tests).

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rayon::prelude::*;

use crate::backend::{Backend, DeviceBuffer, LocalAnalysis, LETKF_MAX_MEMBERS};
use crate::error::{Error, Result};
use crate::filter::ensemble_kalman::{check_inputs, observed_ensemble};
use crate::filter::{Filter, Observation};
use crate::localization::{check_radius, Localization};
use crate::model::{DistanceKind, Geometry};

/// LETKF radius used when `filter.loc_radius` is not set.
pub const DEFAULT_LETKF_RADIUS: f64 = 4.0;

/// The LETKF.
pub struct Letkf<B: Backend> {
    radius: f64,
    inflation: f32,
    geometry: Option<Geometry>,
    distance: DistanceKind,
    host_reference: bool,
    batched: bool,
    hx: Option<B::Buffer>,
}

impl<B: Backend> Letkf<B> {
    /// A validated LETKF with Gaspari–Cohn radius `radius` (grid points, DAPPER's 1.82
    /// convention) and multiplicative inflation, localizing on the flattened index ring until
    /// [`Letkf::with_geometry`] gives it the model's geometry.
    pub fn new(radius: f64, inflation: f32) -> Result<Self> {
        check_radius(radius)?;
        crate::backend::check_inflation(inflation)?;
        Ok(Letkf {
            radius,
            inflation,
            geometry: None,
            distance: DistanceKind::Flattened,
            host_reference: false,
            batched: false,
            hx: None,
        })
    }

    /// Localizes on `geometry` (the model's), or on the flattened index ring (`kind`).
    pub fn with_geometry(mut self, geometry: Geometry, kind: DistanceKind) -> Self {
        self.geometry = Some(geometry);
        self.distance = kind;
        self
    }

    /// Always runs the f64 host reference instead of the batched analysis.
    pub fn with_host_reference(mut self, on: bool) -> Self {
        self.host_reference = on;
        self
    }

    /// Runs the batched analysis ([`Backend::letkf_analysis`]) whenever the ensemble fits it,
    /// also on backends that prefer the host reference (the CPU twin, for checks).
    pub fn with_batched(mut self, on: bool) -> Self {
        self.batched = on;
        self
    }

    /// The localization for a state of dimension `d`.
    pub fn localization(&self, d: usize) -> Result<Localization> {
        match self.geometry {
            Some(g) => Localization::new(self.radius, g, self.distance, d),
            None => Localization::new(
                self.radius,
                Geometry::Flattened { len: d },
                DistanceKind::Flattened,
                d,
            ),
        }
    }

    /// The f64 reference analysis on the host (no inflation).
    fn host_analysis(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        obs: &Observation<'_, B>,
        loc: &Localization,
        op: &crate::observe::Observe,
    ) -> Result<()> {
        let (n, d) = (ensemble.rows(), ensemble.cols());
        let hx = backend.read(observed_ensemble(backend, ensemble, obs, &mut self.hx)?)?;
        let m = hx.len() / n;
        let n1 = (n.max(2) - 1) as f64;
        let sigma = obs.noise_std as f64;
        let y = backend.read(obs.y)?;
        let x = backend.read(ensemble)?;
        let mut ybar = vec![0.0f64; m];
        for row in hx.chunks(m.max(1)) {
            for (a, &v) in ybar.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        ybar.iter_mut().for_each(|v| *v /= n as f64);
        // Scaled observed anomalies (n × m) and innovations (m).
        let ay: Vec<f64> = (0..n * m)
            .map(|e| (hx[e] as f64 - ybar[e % m]) / sigma)
            .collect();
        let dy: Vec<f64> = (0..m).map(|k| (y[k] as f64 - ybar[k]) / sigma).collect();
        let columns: Vec<Vec<f32>> = (0..d)
            .into_par_iter()
            .map(|k| {
                let xcol: Vec<f64> = (0..n).map(|i| x[i * d + k] as f64).collect();
                let mean = xcol.iter().sum::<f64>() / n as f64;
                let a: DVector<f64> = DVector::from_iterator(n, xcol.iter().map(|v| v - mean));
                let local = loc.local_observations(k, op, m);
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
                // w·a = (Uᵀ Ã d)ᵀ Λ⁻¹ (Uᵀ a), T a = U diag(√(n1/λ)) Uᵀ a.
                let ua = u.tr_mul(&a);
                let ub = u.tr_mul(&(&at * dt));
                let wa: f64 = (0..n).map(|l| ub[l] * ua[l] / lam[l]).sum();
                let aa = u * DVector::from_fn(n, |l, _| ua[l] * (n1 / lam[l]).sqrt());
                let mean_a = mean + wa;
                (0..n).map(|i| (mean_a + aa[i]) as f32).collect()
            })
            .collect();
        let mut out = vec![0.0f32; n * d];
        for (k, col) in columns.iter().enumerate() {
            for i in 0..n {
                out[i * d + k] = col[i];
            }
        }
        crate::error::check_finite(
            "LETKF analysis",
            &out,
            d,
            "the local analysis blew up; check the inputs",
        )?;
        backend.write(ensemble, &out)
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
        let loc = self.localization(d)?;
        // On a device the batched kernel keeps the ensemble where it is; on the CPU the f64
        // host reference is faster than the twin's Jacobi solver (the twin serves the parity
        // checks and `with_batched`).
        let batched = (self.batched || backend.on_device()) && !self.host_reference;
        if !batched || n > LETKF_MAX_MEMBERS {
            if n > LETKF_MAX_MEMBERS && batched {
                log::debug!(
                    "LETKF with n = {n} > {LETKF_MAX_MEMBERS} members: host analysis in f64"
                );
            }
            self.host_analysis(backend, ensemble, obs, &loc, &op)?;
        } else {
            let local = LocalAnalysis::new(&loc, &op, obs.noise_std);
            observed_ensemble(backend, ensemble, obs, &mut self.hx)?;
            let hx = self.hx.as_ref().expect("just observed");
            backend.letkf_analysis(ensemble, hx, obs.y, &local)?;
            backend.check_finite(ensemble, "LETKF analysis")?;
        }
        backend.inflate(ensemble, self.inflation)?;
        backend.sync()
    }
}
