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

/// Grid row `r` (fixed horizontal index) of one `n × n` channel.
#[inline(always)]
fn row(a: &[f32], n: usize, r: usize) -> &[f32] {
    &a[r * n..(r + 1) * n]
}

/// Constants of the predictor (ENFF_SPEC §8.5 steps 1–2).
struct Predictor {
    dt: f32,
    nu: f32,
    inv_2h: f32,
    inv_h2: f32,
}

/// `(u*, v*)` at one point from its value (`c`), y-neighbours (`l` = j−1, `r` = j+1),
/// x-neighbours (`p` = i+1, `m` = i−1) and the forcing `f`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn predictor_point(
    k: &Predictor,
    (uc, ul, ur, up, um): (f32, f32, f32, f32, f32),
    (vc, vl, vr, vp, vm): (f32, f32, f32, f32, f32),
    f: f32,
) -> (f32, f32) {
    // Step 1: advection in non-conservative form, central differences.
    let ux = (up - um) * k.inv_2h;
    let uy = (ur - ul) * k.inv_2h;
    let vx = (vp - vm) * k.inv_2h;
    let vy = (vr - vl) * k.inv_2h;
    let au = uc * ux + vc * uy;
    let av = uc * vx + vc * vy;
    // Step 2: 5-point Laplacian, explicit Euler predictor.
    let lu = (up + um - 2.0 * uc) * k.inv_h2 + (ur + ul - 2.0 * uc) * k.inv_h2;
    let lv = (vp + vm - 2.0 * vc) * k.inv_h2 + (vr + vl - 2.0 * vc) * k.inv_h2;
    (
        uc + k.dt * (k.nu * lu - au + f),
        vc + k.dt * (k.nu * lv - av),
    )
}

/// One grid row of the predictor; `u = [row i, row i+1, row i−1]`, same for `v`.
#[inline(always)]
fn predictor_row(
    us: &mut [f32],
    vs: &mut [f32],
    u: [&[f32]; 3],
    v: [&[f32]; 3],
    f: &[f32],
    k: &Predictor,
) {
    let n = us.len();
    let at = |j: usize, jm: usize, jp: usize| {
        predictor_point(
            k,
            (u[0][j], u[0][jm], u[0][jp], u[1][j], u[2][j]),
            (v[0][j], v[0][jm], v[0][jp], v[1][j], v[2][j]),
            f[j],
        )
    };
    (us[0], vs[0]) = at(0, n - 1, 1);
    (us[n - 1], vs[n - 1]) = at(n - 1, n - 2, 0);
    // The interior over equal-length shifted slices, so that it vectorizes.
    let len = n - 2;
    let (usi, vsi) = (&mut us[1..n - 1], &mut vs[1..n - 1]);
    let (uc, ul, ur, up, um) = (
        &u[0][1..n - 1],
        &u[0][..len],
        &u[0][2..],
        &u[1][1..n - 1],
        &u[2][1..n - 1],
    );
    let (vc, vl, vr, vp, vm) = (
        &v[0][1..n - 1],
        &v[0][..len],
        &v[0][2..],
        &v[1][1..n - 1],
        &v[2][1..n - 1],
    );
    let fi = &f[1..n - 1];
    for j in 0..len {
        (usi[j], vsi[j]) = predictor_point(
            k,
            (uc[j], ul[j], ur[j], up[j], um[j]),
            (vc[j], vl[j], vr[j], vp[j], vm[j]),
            fi[j],
        );
    }
}

/// One grid row of `out = ((a_{i+1} − a_{i−1}) / 2h + (b_{j+1} − b_{j−1}) / 2h) · scale`.
#[inline(always)]
fn divergence_row(out: &mut [f32], ap: &[f32], am: &[f32], bc: &[f32], inv_2h: f32, scale: f32) {
    let n = out.len();
    let at = |j: usize, jm: usize, jp: usize| {
        ((ap[j] - am[j]) * inv_2h + (bc[jp] - bc[jm]) * inv_2h) * scale
    };
    out[0] = at(0, n - 1, 1);
    out[n - 1] = at(n - 1, n - 2, 0);
    let inner = out[1..n - 1]
        .iter_mut()
        .zip(ap[1..n - 1].iter().zip(&am[1..n - 1]))
        .zip(bc[..n - 2].iter().zip(&bc[2..]));
    for ((o, (&p, &m)), (&l, &r)) in inner {
        *o = ((p - m) * inv_2h + (r - l) * inv_2h) * scale;
    }
}

/// One grid row of step 5: `u = u* − g (p_{i+1} − p_{i−1})`, `v = v* − g (p_{j+1} − p_{j−1})`
/// with `g = dt / 2h`; `p = [row i, row i+1, row i−1]`.
#[inline(always)]
fn correction_row(u: &mut [f32], v: &mut [f32], us: &[f32], vs: &[f32], p: [&[f32]; 3], g: f32) {
    let n = u.len();
    let at = |j: usize, jm: usize, jp: usize| {
        (
            us[j] - g * (p[1][j] - p[2][j]),
            vs[j] - g * (p[0][jp] - p[0][jm]),
        )
    };
    (u[0], v[0]) = at(0, n - 1, 1);
    (u[n - 1], v[n - 1]) = at(n - 1, n - 2, 0);
    let len = n - 2;
    let (ui, vi) = (&mut u[1..n - 1], &mut v[1..n - 1]);
    let (usi, vsi) = (&us[1..n - 1], &vs[1..n - 1]);
    let (pp, pm, pl, pr) = (&p[1][1..n - 1], &p[2][1..n - 1], &p[0][..len], &p[0][2..]);
    for j in 0..len {
        ui[j] = usi[j] - g * (pp[j] - pm[j]);
        vi[j] = vsi[j] - g * (pr[j] - pl[j]);
    }
}

/// One Jacobi sweep over the grid, `src → dst`, coefficients `(cx, cy, cb)` of [`jacobi_row`].
#[inline(always)]
fn jacobi_sweep(n: usize, src: &[f32], dst: &mut [f32], b: &[f32], (cx, cy, cb): (f32, f32, f32)) {
    for i in 0..n {
        let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
        jacobi_row(
            &mut dst[i * n..(i + 1) * n],
            row(src, n, i),
            row(src, n, ip),
            row(src, n, im),
            row(b, n, i),
            cx,
            cy,
            cb,
        );
    }
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
    // The interior over equal-length shifted slices, so that it vectorizes.
    let len = n - 2;
    let o = &mut out[1..n - 1];
    let (u, d, l, r, bb) = (
        &up[1..n - 1],
        &dn[1..n - 1],
        &mid[..len],
        &mid[2..],
        &b[1..n - 1],
    );
    for j in 0..len {
        o[j] = cx * (u[j] + d[j]) + cy * (l[j] + r[j]) - cb * bb[j];
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
        if !(Self::MIN_GRID..=Self::MAX_GRID).contains(&n) || !n.is_multiple_of(2) {
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

    /// The forcing `f_u(y_j)` at every vertical index `j` (f32, computed in f64).
    pub fn forcing_row(&self) -> &[f32] {
        &self.forcing_row
    }

    /// Grid spacing `h = 2 / n` in f32, as the stencils use it.
    pub fn spacing(&self) -> f32 {
        (DOMAIN_SIZE / self.n as f64) as f32
    }

    /// Advances one state `(p, u, v)` by `steps` steps in place (ENFF_SPEC §8.5).
    ///
    /// `scratch` must hold at least [`NavierStokes2d::scratch_len`] values. The loops are
    /// compiled twice (baseline and AVX2) and chosen at run time; both give identical results
    /// (no fused multiply-adds).
    pub fn advance(&self, x: &mut [f32], steps: usize, scratch: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2 (checked just above).
            unsafe { self.advance_avx2(x, steps, scratch) };
            return;
        }
        self.advance_impl(x, steps, scratch);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn advance_avx2(&self, x: &mut [f32], steps: usize, scratch: &mut [f32]) {
        self.advance_impl(x, steps, scratch);
    }

    #[inline(always)]
    fn advance_impl(&self, x: &mut [f32], steps: usize, scratch: &mut [f32]) {
        for _ in 0..steps {
            self.predict(x, scratch);
            self.correct(x, scratch);
        }
    }

    /// One projection step: explicit advection–diffusion–forcing predictor `(u*, v*)`, then the
    /// pressure correction of [`NavierStokes2d::project`], warm-started from the state's `p`.
    pub fn step(&self, x: &mut [f32], scratch: &mut [f32]) {
        self.advance(x, 1, scratch);
    }

    /// Steps 1–2: `(u*, v*)` into `scratch[..2n²]`.
    #[inline(always)]
    fn predict(&self, x: &[f32], scratch: &mut [f32]) {
        let n = self.n;
        let nn = n * n;
        let h = self.spacing();
        let c = Predictor {
            dt: self.dt,
            nu: self.viscosity,
            inv_2h: 1.0 / (2.0 * h),
            inv_h2: 1.0 / (h * h),
        };
        let (us, rest) = scratch.split_at_mut(nn);
        let vs = &mut rest[..nn];
        let (u, v) = (&x[nn..2 * nn], &x[2 * nn..3 * nn]);
        let f = &self.forcing_row[..];
        for i in 0..n {
            let (ip, im) = ((i + 1) % n, (i + n - 1) % n);
            predictor_row(
                &mut us[i * n..(i + 1) * n],
                &mut vs[i * n..(i + 1) * n],
                [row(u, n, i), row(u, n, ip), row(u, n, im)],
                [row(v, n, i), row(v, n, ip), row(v, n, im)],
                f,
                &c,
            );
        }
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
    #[inline(always)]
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
            divergence_row(
                &mut b[i * n..(i + 1) * n],
                row(us, n, ip),
                row(us, n, im),
                row(vs, n, i),
                inv_2h,
                inv_dt,
            );
        }
        // Step 4: Jacobi sweeps, ping-ponging between the state's pressure and `ptmp`.
        let (p, uv) = x.split_at_mut(nn);
        let (dx2, dy2) = (h * h, h * h);
        let denom = 2.0 * (dx2 + dy2);
        let (cx, cy, cb) = (dy2 / denom, dx2 / denom, dx2 * dy2 / denom);
        let coeffs = (cx, cy, cb);
        for s in 0..self.jacobi_sweeps {
            if s % 2 == 0 {
                jacobi_sweep(n, p, ptmp, b, coeffs);
            } else {
                jacobi_sweep(n, ptmp, p, b, coeffs);
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
            correction_row(
                &mut u[i * n..(i + 1) * n],
                &mut v[i * n..(i + 1) * n],
                row(us, n, i),
                row(vs, n, i),
                [row(p, n, i), row(p, n, ip), row(p, n, im)],
                g,
            );
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
            divergence_row(
                &mut out[i * n..(i + 1) * n],
                row(u, n, ip),
                row(u, n, im),
                row(v, n, i),
                inv_2h,
                1.0,
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorized_and_baseline_steps_agree_bitwise() {
        let n = 24;
        let ns = NavierStokes2d::paper(n, 1e-3, 0.05).unwrap();
        let x0: Vec<f32> = (0..3 * n * n)
            .map(|k| ((k * 37 % 101) as f32 / 50.0 - 1.0) * 0.5)
            .collect();
        let mut scratch = vec![0.0f32; ns.scratch_len()];
        let (mut a, mut b) = (x0.clone(), x0);
        ns.advance(&mut a, 3, &mut scratch);
        ns.advance_impl(&mut b, 3, &mut scratch);
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(a, b);
    }

    #[test]
    fn ns_refuses_grids_and_settings_it_cannot_take() {
        for n in [0usize, 6, 7, 63, NavierStokes2d::MAX_GRID + 2] {
            let e = NavierStokes2d::paper(n, 1e-3, 0.05)
                .unwrap_err()
                .to_string();
            assert!(e.contains("even n from 8 to 16384"), "{e}");
        }
        assert!(NavierStokes2d::paper(64, 0.0, 0.05).is_err());
        assert!(NavierStokes2d::paper(64, 1e-3, f32::NAN).is_err());
        assert!(NavierStokes2d::new(64, 1e-3, -1.0, 0.05, 8.0, 100).is_err());
        assert!(NavierStokes2d::new(64, 1e-3, 1e-3, 0.05, 8.0, 0).is_err());
        let ns = NavierStokes2d::paper(10, 1e-3, 0.05).unwrap();
        assert_eq!((ns.dim(), ns.scratch_len()), (300, 400));
        let white = vec![0.0f32; 7];
        assert!(ns
            .gaussian_process_initial_condition(&white, GP_LENGTH_SCALE, 1.0)
            .is_err());
    }
}
