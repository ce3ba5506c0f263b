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
//!   members: one workgroup per grid cell forms the local `n × n` matrix and applies its
//!   inverse and inverse square root to the cell's anomalies in f32 (by a Chebyshev recurrence
//!   where the spread is not far above the observation noise, else after a cyclic Jacobi
//!   diagonalization), so nothing of size `d` or `m` crosses to the host; its CPU twin runs
//!   the same algorithm on the host ([`Letkf::with_batched`] forces it);
//! * the reference in f64 on the host: on the CPU backend, for every ensemble larger than
//!   [`LETKF_MAX_MEMBERS`] on the GPU (the ensemble then crosses to the host and back once per
//!   analysis), and with [`Letkf::with_host_reference`]. It runs in parallel over components;
//!   each local transform applies `A⁻¹` and `A^{-1/2}` to the component's anomalies by a
//!   Chebyshev expansion on `A`'s spectrum ([`local_transform`], exact to about 1e-13; the
//!   eigendecomposition where the spread is far above the observation noise, or always with
//!   [`Letkf::with_local_solver`]).
//!
//! Accuracy of the f32 batched analysis: the local matrices have eigenvalues ≥ n − 1, so the
//! Jacobi solver's and the recurrence's rounding errors stay near f32 precision; the analysis agrees with the f64
//! reference to about 1e-5 relative to the ensemble's spread (checked in the tests).

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::backend::{Backend, DeviceBuffer, LocalAnalysis, LETKF_MAX_MEMBERS};
use crate::error::{Error, Result};
use crate::filter::ensemble_kalman::{check_inputs, observed_ensemble};
use crate::filter::local_transform::{self, Solver};
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
    solver: Solver,
    hx: Option<B::Buffer>,
}

/// Per-thread buffers of the host analysis.
#[derive(Default)]
struct Local {
    a: Vec<f64>,
    at: Vec<f64>,
    dt: Vec<f64>,
    s: local_transform::Scratch,
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
            solver: Solver::Chebyshev,
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

    /// How the host analysis computes each local transform: [`Solver::Chebyshev`] (the
    /// default: exact to about 1e-13, with the eigendecomposition where the spread bound asks for
    /// a high degree) or [`Solver::Eigen`] (always the eigendecomposition).
    pub fn with_local_solver(mut self, solver: Solver) -> Self {
        self.solver = solver;
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
        // Scaled observed anomalies (m × n: one observation's members together) and
        // innovations (m).
        let ay_t: Vec<f64> = (0..m * n)
            .map(|e| {
                let (q, i) = (e / n, e % n);
                (hx[i * m + q] as f64 - ybar[q]) / sigma
            })
            .collect();
        let dy: Vec<f64> = (0..m).map(|k| (y[k] as f64 - ybar[k]) / sigma).collect();
        // One local transform per component, in blocks of components written component-major
        // (`d × n`) and transposed once at the end.
        const BLOCK: usize = 16;
        let solver = self.solver;
        let fallbacks = AtomicUsize::new(0);
        let mut out_t = vec![0.0f32; d * n];
        out_t.par_chunks_mut(BLOCK * n).enumerate().for_each_init(
            Local::default,
            |lc, (block, chunk)| {
                for (j, col) in chunk.chunks_exact_mut(n).enumerate() {
                    let k = block * BLOCK + j;
                    lc.a.clear();
                    lc.a.extend((0..n).map(|i| x[i * d + k] as f64));
                    let mean = lc.a.iter().sum::<f64>() / n as f64;
                    lc.a.iter_mut().for_each(|v| *v -= mean);
                    let local = loc.local_observations(k, op, m);
                    if local.is_empty() {
                        for (o, &v) in col.iter_mut().zip(&lc.a) {
                            *o = (mean + v) as f32;
                        }
                        continue;
                    }
                    let ml = local.len();
                    lc.at.resize(n * ml, 0.0);
                    lc.dt.clear();
                    for (row, &(q, rho)) in lc.at.chunks_exact_mut(n).zip(&local) {
                        let s = rho.sqrt();
                        for (r, &v) in row.iter_mut().zip(&ay_t[q * n..(q + 1) * n]) {
                            *r = v * s;
                        }
                        lc.dt.push(dy[q] * s);
                    }
                    let (wa, used) =
                        local_transform::transform(solver, &lc.at, &lc.dt, &lc.a, n, &mut lc.s);
                    if used != solver {
                        fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    let mean_a = mean + wa;
                    for (o, &v) in col.iter_mut().zip(&lc.s.out) {
                        *o = (mean_a + v) as f32;
                    }
                }
            },
        );
        let fallbacks = fallbacks.into_inner();
        if fallbacks > 0 {
            log::debug!(
                "LETKF: {fallbacks} of {d} local analyses took the eigendecomposition (spread far \
                 above the observation noise)"
            );
        }
        let mut out = vec![0.0f32; n * d];
        for (k, col) in out_t.chunks_exact(n).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * d + k] = v;
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
        // host reference is faster than the twin (the twin serves the parity
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
