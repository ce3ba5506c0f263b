//! Two-dimensional incompressible Navier–Stokes on a periodic square, stepped by Chorin's
//! projection method with a warm-started Jacobi pressure solve (ENFF_SPEC §8.5).
//!
//! The state of one member is `(p, u, v)` on an `n × n` grid of the domain `[0, 2)²`,
//! flattened channel-major: index `c·n² + i·n + j` with channel `c ∈ {p, u, v}`, `i` the
//! horizontal (x) and `j` the vertical (y) grid index, so a grid row of fixed `i` is contiguous.
//! **The pressure is part of the state** (it is observed, and it warm-starts the next solve).
//! Every spatial operator is a periodic central difference; one step needs `4 n²` values of
//! caller-provided scratch ([`NavierStokes2d::scratch_len`]) and never allocates.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

use crate::error::{check_positive, Error, Result};

/// Side length of the periodic domain, `2` in both directions (ENFF_SPEC §8.5).
pub const DOMAIN_SIZE: f64 = 2.0;

/// Length scale `ℓ` of the squared-exponential initial-condition covariance (ENFF_SPEC §8.5).
pub const GP_LENGTH_SCALE: f64 = 0.2;

/// The incompressible Navier–Stokes model of ENFF_SPEC §8.5 on an `n × n` periodic grid.
#[derive(Clone, Debug)]
pub struct NavierStokes2d {
    n: usize,
    dt: f32,
    viscosity: f32,
    forcing_amplitude: f32,
    forcing_wavenumber: f32,
    jacobi_sweeps: usize,
    /// `f_u(y_j) = A sin(2πκ y_j / H)` at `y_j = j·Δy`, one value per vertical index.
    forcing_row: Arc<[f32]>,
}

/// Calls `f(j, j − 1, j + 1)` for every index of a periodic row of length `n ≥ 3`.
#[inline(always)]
fn periodic(n: usize, mut f: impl FnMut(usize, usize, usize)) {
    f(0, n - 1, 1);
    for j in 1..n - 1 {
        f(j, j - 1, j + 1);
    }
    f(n - 1, n - 2, 0);
}

/// Grid row `r` (fixed horizontal index) of one `n × n` channel.
#[inline(always)]
fn row(a: &[f32], n: usize, r: usize) -> &[f32] {
    &a[r * n..(r + 1) * n]
}

/// One Jacobi row: `out_j = cx (up_j + dn_j) + cy (mid_{j+1} + mid_{j−1}) − cb b_j`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn jacobi_row(
    out: &mut [f32],
    mid: &[f32],
    up: &[f32],
    dn: &[f32],
    b: &[f32],
    cx: f32,
    cy: f32,
    cb: f32,
) {
    let n = out.len();
    out[0] = cx * (up[0] + dn[0]) + cy * (mid[1] + mid[n - 1]) - cb * b[0];
    out[n - 1] = cx * (up[n - 1] + dn[n - 1]) + cy * (mid[0] + mid[n - 2]) - cb * b[n - 1];
    // The interior as zipped slices, so that it vectorizes.
    let inner = out[1..n - 1]
        .iter_mut()
        .zip(up[1..n - 1].iter().zip(&dn[1..n - 1]))
        .zip(mid[..n - 2].iter().zip(&mid[2..]))
        .zip(&b[1..n - 1]);
    for (((o, (&u, &d)), (&l, &r)), &bb) in inner {
        *o = cx * (u + d) + cy * (l + r) - cb * bb;
    }
}

impl NavierStokes2d {
    /// Smallest grid side accepted (the paper uses 10, 16, 64 and 256).
    pub const MIN_GRID: usize = 8;

    /// Largest grid side accepted (one member is then 3·16384² values, 3 GiB).
    pub const MAX_GRID: usize = 16384;

    /// The paper's viscosity `ν = 1e-3`.
    pub const VISCOSITY: f32 = 1e-3;

    /// The paper's forcing amplitude `A = 0.05`.
    pub const FORCING_AMPLITUDE: f32 = 0.05;

    /// The paper's forcing wave number `κ = 8` (so `f_u = 0.05 sin(8πy)`).
    pub const FORCING_WAVENUMBER: f32 = 8.0;

    /// The paper's Jacobi sweeps per pressure solve, 100.
    pub const JACOBI_SWEEPS: usize = 100;

    /// A validated model: grid side `n` (even, `MIN_GRID..=MAX_GRID`), step `dt`, viscosity
    /// `ν ≥ 0`, forcing `f_u = A sin(2πκ y / 2)` and `jacobi_sweeps ≥ 1` per step.
    pub fn new(
        n: usize,
        dt: f32,
        viscosity: f32,
        forcing_amplitude: f32,
        forcing_wavenumber: f32,
        jacobi_sweeps: usize,
    ) -> Result<Self> {
        if !(Self::MIN_GRID..=Self::MAX_GRID).contains(&n) || n % 2 != 0 {
            return Err(Error::invalid(
                "model.d",
                n,
                format!(
                    "for Navier–Stokes model.d is the grid side n (the state has 3·n² values): \
                     use an even n from {} to {} (the paper uses 10, 16, 64 or 256)",
                    Self::MIN_GRID,
                    Self::MAX_GRID
                ),
            ));
        }
        check_positive(
            "model.dt",
            dt as f64,
            "the Navier–Stokes step must be finite and positive (1e-3 on 64², 1e-4 on 256²)",
        )?;
        if !(viscosity.is_finite() && viscosity >= 0.0) {
            return Err(Error::invalid(
                "viscosity",
                viscosity,
                "use a finite non-negative viscosity (the paper uses 1e-3)",
            ));
        }
        for (name, value) in [
            ("model.forcing", forcing_amplitude),
            ("forcing wave number", forcing_wavenumber),
        ] {
            if !value.is_finite() {
                return Err(Error::invalid(
                    name,
                    value,
                    "use a finite value (the paper's forcing is 0.05·sin(8πy))",
                ));
            }
        }
        if jacobi_sweeps == 0 {
            return Err(Error::invalid(
                "jacobi_sweeps",
                0,
                "the pressure solve needs at least one Jacobi sweep (the paper uses 100)",
            ));
        }
        let dy = DOMAIN_SIZE / n as f64;
        let forcing_row = (0..n)
            .map(|j| {
                let y = j as f64 * dy;
                (forcing_amplitude as f64
                    * (std::f64::consts::TAU * forcing_wavenumber as f64 * y / DOMAIN_SIZE).sin())
                    as f32
            })
            .collect();
        Ok(NavierStokes2d {
            n,
            dt,
            viscosity,
            forcing_amplitude,
            forcing_wavenumber,
            jacobi_sweeps,
            forcing_row,
        })
    }

    /// The paper's model on an `n × n` grid with step `dt` and forcing amplitude `A`
    /// (ν = 1e-3, κ = 8, 100 Jacobi sweeps).
    pub fn paper(n: usize, dt: f32, forcing_amplitude: f32) -> Result<Self> {
        Self::new(
            n,
            dt,
            Self::VISCOSITY,
            forcing_amplitude,
            Self::FORCING_WAVENUMBER,
            Self::JACOBI_SWEEPS,
        )
    }

    /// Grid side `n`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// State dimension `3·n²` (channels p, u, v).
    pub fn dim(&self) -> usize {
        3 * self.n * self.n
    }

    /// The time step.
    pub fn dt(&self) -> f32 {
        self.dt
    }

    /// Viscosity `ν`.
    pub fn viscosity(&self) -> f32 {
        self.viscosity
    }

    /// Forcing amplitude `A`.
    pub fn forcing_amplitude(&self) -> f32 {
        self.forcing_amplitude
    }

    /// Forcing wave number `κ`.
    pub fn forcing_wavenumber(&self) -> f32 {
        self.forcing_wavenumber
    }

    /// Jacobi sweeps per pressure solve.
    pub fn jacobi_sweeps(&self) -> usize {
        self.jacobi_sweeps
    }

    /// Scratch values (f32) one step needs: `4·n²`.
    pub fn scratch_len(&self) -> usize {
        4 * self.n * self.n
    }

    fn spacing(&self) -> f32 {
        (DOMAIN_SIZE / self.n as f64) as f32
    }

    /// Advances one state `(p, u, v)` by `steps` steps in place (ENFF_SPEC §8.5).
    ///
    /// `scratch` must hold at least [`NavierStokes2d::scratch_len`] values.
    pub fn advance(&self, x: &mut [f32], steps: usize, scratch: &mut [f32]) {
        for _ in 0..steps {
            self.step(x, scratch);
        }
    }

    /// One projection step: explicit advection–diffusion–forcing predictor `(u*, v*)`, then
    /// [`NavierStokes2d::project`]-style pressure correction warm-started from the state's `p`.
    pub fn step(&self, x: &mut [f32], scratch: &mut [f32]) {
        let n = self.n;
        let nn = n * n;
        let h = self.spacing();
        let (dt, nu) = (self.dt, self.viscosity);
        let inv_2h = 1.0 / (2.0 * h);
        let inv_h2 = 1.0 / (h * h);
        let (us, rest) = scratch.split_at_mut(nn);
        let (vs, _) = rest.split_at_mut(nn);
        {
            let (_, uv) = x.split_at(nn);
            let (u, v) = uv.split_at(nn);
            let f = &self.forcing_row[..];
            for i in 0..n {
                let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
                let (uc, up, um) = (row(u, n, i), row(u, n, ip), row(u, n, im));
                let (vc, vp, vm) = (row(v, n, i), row(v, n, ip), row(v, n, im));
                let us_row = &mut us[i * n..(i + 1) * n];
                let vs_row = &mut vs[i * n..(i + 1) * n];
                periodic(n, |j, jm, jp| {
                    let (uu, vv) = (uc[j], vc[j]);
                    // Step 1: advection in non-conservative form.
                    let ux = (up[j] - um[j]) * inv_2h;
                    let uy = (uc[jp] - uc[jm]) * inv_2h;
                    let vx = (vp[j] - vm[j]) * inv_2h;
                    let vy = (vc[jp] - vc[jm]) * inv_2h;
                    let au = uu * ux + vv * uy;
                    let av = uu * vx + vv * vy;
                    // Step 2: 5-point Laplacian, explicit Euler predictor.
                    let lu =
                        (up[j] + um[j] - 2.0 * uu) * inv_h2 + (uc[jp] + uc[jm] - 2.0 * uu) * inv_h2;
                    let lv =
                        (vp[j] + vm[j] - 2.0 * vv) * inv_h2 + (vc[jp] + vc[jm] - 2.0 * vv) * inv_h2;
                    us_row[j] = uu + dt * (nu * lu - au + f[j]);
                    vs_row[j] = vv + dt * (nu * lv - av);
                });
            }
        }
        self.correct(x, scratch);
    }

    /// Chorin projection of the velocity channels of `x`, in place: solves `∇²p = ∇·(u, v)/dt`
    /// with the configured Jacobi sweeps warm-started from the state's pressure channel, then
    /// sets `(u, v) ← (u, v) − dt ∇p` (ENFF_SPEC §8.5 steps 3–5).
    ///
    /// `scratch` must hold at least [`NavierStokes2d::scratch_len`] values.
    pub fn project(&self, x: &mut [f32], scratch: &mut [f32]) {
        let nn = self.n * self.n;
        scratch[..2 * nn].copy_from_slice(&x[nn..3 * nn]);
        self.correct(x, scratch);
    }

    /// Steps 3–5 with the predicted velocity `(u*, v*)` in `scratch[..2n²]`: writes the new
    /// pressure and the corrected velocity into `x`.
    fn correct(&self, x: &mut [f32], scratch: &mut [f32]) {
        let n = self.n;
        let nn = n * n;
        let h = self.spacing();
        let dt = self.dt;
        let inv_2h = 1.0 / (2.0 * h);
        let (us, rest) = scratch.split_at_mut(nn);
        let (vs, rest) = rest.split_at_mut(nn);
        let (b, rest) = rest.split_at_mut(nn);
        let ptmp = &mut rest[..nn];
        // Step 3: b = (∂x u* + ∂y v*) / dt.
        let inv_dt = 1.0 / dt;
        for i in 0..n {
            let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
            let (usp, usm) = (&us[ip * n..(ip + 1) * n], &us[im * n..(im + 1) * n]);
            let vsc = &vs[i * n..(i + 1) * n];
            let brow = &mut b[i * n..(i + 1) * n];
            periodic(n, |j, jm, jp| {
                brow[j] = ((usp[j] - usm[j]) * inv_2h + (vsc[jp] - vsc[jm]) * inv_2h) * inv_dt;
            });
        }
        // Step 4: Jacobi sweeps, ping-ponging between the state's pressure and `ptmp`.
        let (p, uv) = x.split_at_mut(nn);
        let (dx2, dy2) = (h * h, h * h);
        let denom = 2.0 * (dx2 + dy2);
        let (cx, cy, cb) = (dy2 / denom, dx2 / denom, dx2 * dy2 / denom);
        let sweep = |src: &[f32], dst: &mut [f32]| {
            for i in 0..n {
                let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
                jacobi_row(
                    &mut dst[i * n..(i + 1) * n],
                    &src[i * n..(i + 1) * n],
                    &src[ip * n..(ip + 1) * n],
                    &src[im * n..(im + 1) * n],
                    &b[i * n..(i + 1) * n],
                    cx,
                    cy,
                    cb,
                );
            }
        };
        for s in 0..self.jacobi_sweeps {
            if s % 2 == 0 {
                sweep(p, ptmp);
            } else {
                sweep(ptmp, p);
            }
        }
        if self.jacobi_sweeps % 2 == 1 {
            p.copy_from_slice(ptmp);
        }
        // Step 5: u = u* − dt ∂x p, v = v* − dt ∂y p.
        let (u, v) = uv.split_at_mut(nn);
        let g = dt * inv_2h;
        for i in 0..n {
            let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
            let (pp, pm, pc) = (
                &p[ip * n..(ip + 1) * n],
                &p[im * n..(im + 1) * n],
                &p[i * n..(i + 1) * n],
            );
            let (usr, vsr) = (&us[i * n..(i + 1) * n], &vs[i * n..(i + 1) * n]);
            let (ur, vr) = (&mut u[i * n..(i + 1) * n], &mut v[i * n..(i + 1) * n]);
            periodic(n, |j, jm, jp| {
                ur[j] = usr[j] - g * (pp[j] - pm[j]);
                vr[j] = vsr[j] - g * (pc[jp] - pc[jm]);
            });
        }
    }

    /// The central-difference divergence `∂x u + ∂y v` of the velocity channels of `x`,
    /// written into `out` (`n²` values).
    pub fn divergence(&self, x: &[f32], out: &mut [f32]) {
        let n = self.n;
        let nn = n * n;
        let inv_2h = 1.0 / (2.0 * self.spacing());
        let (u, v) = (&x[nn..2 * nn], &x[2 * nn..3 * nn]);
        for i in 0..n {
            let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
            let orow = &mut out[i * n..(i + 1) * n];
            let (upr, umr) = (&u[ip * n..(ip + 1) * n], &u[im * n..(im + 1) * n]);
            let vc = &v[i * n..(i + 1) * n];
            periodic(n, |j, jm, jp| {
                orow[j] = (upr[j] - umr[j]) * inv_2h + (vc[jp] - vc[jm]) * inv_2h;
            });
        }
    }

    /// The Gaussian-process initial condition (ENFF_SPEC §8.5): `u₀`, `v₀` are white noise
    /// (`white`, `2·n²` standard normals: u's then v's) filtered in 2-D Fourier space by
    /// `√S`, `S = exp(−2π²ℓ²(k_x² + k_y²))` (`k` in cycles per unit length), standardized to
    /// mean 0 and standard deviation `std`; then one projection from `p = 0`. Returns `(p, u, v)`.
    pub fn gaussian_process_initial_condition(
        &self,
        white: &[f32],
        length_scale: f64,
        std: f32,
    ) -> Result<Vec<f32>> {
        let n = self.n;
        let nn = n * n;
        if white.len() != 2 * nn {
            return Err(Error::shape(
                "white noise of the initial condition",
                format!("2·n² = {} values", 2 * nn),
                white.len(),
            ));
        }
        check_positive(
            "GP length scale",
            length_scale,
            "use a positive length scale (the paper uses 0.2)",
        )?;
        if !(std.is_finite() && std >= 0.0) {
            return Err(Error::invalid(
                "experiment.truth_init_std",
                std,
                "the Gaussian-process std must be finite and non-negative (the paper uses 1)",
            ));
        }
        let mut planner = FftPlanner::<f64>::new();
        let forward = planner.plan_fft_forward(n);
        let inverse = planner.plan_fft_inverse(n);
        // fftfreq(n, d = Δx): cycles per unit length.
        let spacing = DOMAIN_SIZE / n as f64;
        let freq = |m: usize| -> f64 {
            let signed = if m < n.div_ceil(2) {
                m as f64
            } else {
                m as f64 - n as f64
            };
            signed / (n as f64 * spacing)
        };
        let filter: Vec<f64> = (0..n)
            .map(|m| (-std::f64::consts::PI.powi(2) * length_scale.powi(2) * freq(m).powi(2)).exp())
            .collect();
        let transpose = |a: &[Complex<f64>], t: &mut [Complex<f64>]| {
            for i in 0..n {
                for j in 0..n {
                    t[j * n + i] = a[i * n + j];
                }
            }
        };
        let mut state = vec![0.0f32; 3 * nn];
        let mut a = vec![Complex::new(0.0, 0.0); nn];
        let mut t = vec![Complex::new(0.0, 0.0); nn];
        for c in 0..2 {
            for (z, &w) in a.iter_mut().zip(&white[c * nn..(c + 1) * nn]) {
                *z = Complex::new(w as f64, 0.0);
            }
            forward.process(&mut a); // along j (y)
            transpose(&a, &mut t);
            forward.process(&mut t); // along i (x); t[ky·n + kx]
            for (idx, z) in t.iter_mut().enumerate() {
                // √S = exp(−π²ℓ²k_x²)·exp(−π²ℓ²k_y²).
                *z *= filter[idx / n] * filter[idx % n];
            }
            inverse.process(&mut t);
            transpose(&t, &mut a);
            inverse.process(&mut a);
            let mean = a.iter().map(|z| z.re).sum::<f64>() / nn as f64;
            let var = a.iter().map(|z| (z.re - mean).powi(2)).sum::<f64>() / nn as f64;
            let scale = if var > 0.0 {
                std as f64 / var.sqrt()
            } else {
                0.0
            };
            for (s, z) in state[(c + 1) * nn..(c + 2) * nn].iter_mut().zip(&a) {
                *s = ((z.re - mean) * scale) as f32;
            }
        }
        let mut scratch = vec![0.0f32; self.scratch_len()];
        self.project(&mut state, &mut scratch);
        Ok(state)
    }
}
