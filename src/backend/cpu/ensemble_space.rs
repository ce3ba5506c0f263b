//! CPU twins of the ensemble-space kernels: the observed-anomaly products of the ETKF and the
//! EnKF (`shaders/ensemble_space_products.wgsl`) and the batched local analyses of the LETKF
//! (`shaders/ensemble_space_letkf.wgsl`). They follow the kernels' algorithms step for step (the
//! LETKF twin in f32, with the same Chebyshev recurrence and the same cyclic Jacobi
//! eigen-solver), so the GPU can be checked against them; the f64 LETKF of `filter::letkf`
//! stays the reference for both.

use rayon::prelude::*;

use super::lanes::{dot_lanes, jacobi_lanes, LANES, V};
use super::simd;
use crate::error::{Error, Result};
use crate::localization::{Localization, RHO_MIN};
use crate::model::Geometry;
use crate::observe::Observe;

/// Largest ensemble the batched LETKF kernel handles (its `n × n` matrices live in workgroup
/// memory). Larger ensembles run the host LETKF instead.
pub const LETKF_MAX_MEMBERS: usize = 32;

/// Sweeps of the cyclic Jacobi eigen-solver at most (it usually converges in 5–7).
pub const JACOBI_MAX_SWEEPS: u32 = 10;

/// The Jacobi iteration stops when `Σ_{p<q} a_pq² ≤ JACOBI_TOL · Σ_p a_pp²`.
pub const JACOBI_TOL: f32 = 1e-12;

/// Eigenvalue floor of the local ensemble-space matrices.
pub const EIG_FLOOR: f32 = 1e-9;

/// Relative accuracy the batched LETKF's Chebyshev degree is chosen for (f32).
pub const LETKF_CHEBYSHEV_TOL: f32 = 1e-6;

/// The highest Chebyshev degree of the batched LETKF for `n` members; a cell whose spectrum
/// bound asks for more takes the Jacobi eigen-solver.
pub fn letkf_max_degree(n: usize) -> u32 {
    2 * n as u32 + 8
}

/// The Chebyshev degree for a local matrix `A = (n − 1) I + C` whose `C` has its spectrum in
/// `[0, lam]` (`lam` a Gershgorin/trace bound), in f32 as the kernel computes it: the
/// coefficients of `(1 + t)^{-1}` on `t ∈ [0, β]`, `β = lam/(n − 1)`, decay like `ρ^{-k}`
/// (`ρ = x₀ + √(x₀² − 1)`, `x₀ = 1 + 2/β`) with tail at most `2/√(1 + β) · ρ^{-m} · ρ/(ρ − 1)`,
/// and those of `(1 + t)^{-1/2}` as fast. `u32::MAX` for a bound that is not finite.
pub fn letkf_chebyshev_degree(lam: f32, n1: f32) -> u32 {
    if !lam.is_finite() {
        return u32::MAX;
    }
    let beta = lam.max(0.0) / n1;
    if beta < 1e-6 {
        return 3;
    }
    let x0 = 1.0 + 2.0 / beta;
    let rho = x0 + (x0 * x0 - 1.0).sqrt();
    let lead = 2.0 / (1.0 + beta).sqrt() * rho / (rho - 1.0);
    let m = ((lead / LETKF_CHEBYSHEV_TOL).ln() / rho.ln()).ceil();
    if m.is_nan() || m >= 1e6 {
        return u32::MAX;
    }
    m.max(1.0) as u32 + 2
}

/// `cos(k·θ_j)` at the Chebyshev nodes `θ_j = π(j + ½)/N`, with the argument reduced exactly
/// (`(2j + 1)·k mod 4N` quarter-steps of `π/(2N)`), as the kernel computes it.
pub fn letkf_node_cos(k: u32, j: u32, nodes: u32) -> f32 {
    let r = ((2 * j + 1) * k) % (4 * nodes);
    (std::f32::consts::PI * r as f32 / (2 * nodes) as f32).cos()
}

/// Chebyshev coefficients (degree `m`, `m + 1` nodes) of `(1 + t)^{-1}` into `c1` and
/// `(1 + t)^{-1/2}` into `c2`, `t = β (x + 1)/2`, convention `f ≈ c₀/2 + Σ_{k≥1} c_k T_k`.
pub fn letkf_coefficients(m: u32, beta: f32, c1: &mut [f32], c2: &mut [f32]) {
    let nodes = m + 1;
    let f = 2.0 / nodes as f32;
    for k in 0..nodes {
        let (mut s1, mut s2) = (0.0f32, 0.0f32);
        for j in 0..nodes {
            let x = letkf_node_cos(1, j, nodes);
            let g1 = 1.0 / (1.0 + 0.5 * beta * (x + 1.0));
            let ck = letkf_node_cos(k, j, nodes);
            s1 += g1 * ck;
            s2 += g1.sqrt() * ck;
        }
        c1[k as usize] = f * s1;
        c2[k as usize] = f * s2;
    }
}

/// Everything a batched LETKF analysis needs to know about space and observations.
///
/// The state is `fields` components on each cell of an `nx × ny` periodic grid (a ring is
/// `ny = 1`, `fields = 1`); component `f · nx·ny + cell` is field `f` at `cell`. All components
/// of one cell share one local analysis. Observations come from a built-in operator with stride
/// `every` from `offset`, with noise std `noise_std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalAnalysis {
    /// Grid rows (ring length for a ring).
    pub nx: usize,
    /// Grid columns (1 for a ring).
    pub ny: usize,
    /// Components per cell.
    pub fields: usize,
    /// Observation stride.
    pub every: usize,
    /// First observed component.
    pub offset: usize,
    /// Gaspari–Cohn radius in grid spacings.
    pub radius: f32,
    /// Observation noise std `σ_y`.
    pub noise_std: f32,
}

impl LocalAnalysis {
    /// The local-analysis layout of a localization and a built-in operator.
    pub fn new(loc: &Localization, op: &Observe, noise_std: f32) -> Self {
        let (nx, ny, fields) = match loc.geometry {
            Geometry::Torus { nx, ny, fields } => (nx, ny, fields),
            Geometry::Ring { len } | Geometry::Flattened { len } => (len, 1, 1),
            Geometry::None => (0, 1, 1),
        };
        LocalAnalysis {
            nx,
            ny,
            fields,
            every: op.every,
            offset: op.offset,
            radius: loc.radius as f32,
            noise_std,
        }
    }

    /// Cells of the grid.
    pub fn cells(&self) -> usize {
        self.nx * self.ny
    }

    /// The state dimension the layout describes.
    pub fn dim(&self) -> usize {
        self.cells() * self.fields
    }

    /// Checks the layout against an `n × d` ensemble and `m` observations.
    pub fn check(&self, n: usize, d: usize, m: usize) -> Result<()> {
        if !(2..=LETKF_MAX_MEMBERS).contains(&n) {
            return Err(Error::invalid(
                "ensemble.n",
                n,
                format!(
                    "the batched LETKF handles 2 to {LETKF_MAX_MEMBERS} members; larger \
                     ensembles use the host LETKF"
                ),
            ));
        }
        if self.dim() != d || self.nx == 0 || self.ny == 0 {
            return Err(Error::shape(
                "LETKF layout",
                format!("{d} components"),
                format!("{} x {} cells x {} fields", self.nx, self.ny, self.fields),
            ));
        }
        if self.every == 0 || d <= self.offset || (d - self.offset).div_ceil(self.every) != m {
            return Err(Error::shape(
                "LETKF observations",
                format!("{m} observations"),
                format!("every {} from {} of {d}", self.every, self.offset),
            ));
        }
        crate::localization::check_radius(self.radius as f64)?;
        crate::error::check_positive(
            "observe.noise_std",
            self.noise_std as f64,
            "the observation noise std must be positive",
        )
    }

    /// Calls `f(q, ρ)` for every observation in the local analysis of `cell`, in the kernel's
    /// order (rows, then columns, then fields), with the kernel's f32 taper.
    pub fn for_each_local(&self, cell: usize, m: usize, mut f: impl FnMut(usize, f32)) {
        let (nx, ny) = (self.nx as i64, self.ny as i64);
        let reach = 2.0 * 1.82 * self.radius;
        let r = reach.floor() as i64;
        let (lo_x, hi_x) = (r.min((nx - 1) / 2), r.min(nx / 2));
        let (lo_y, hi_y) = (r.min((ny - 1) / 2), r.min(ny / 2));
        let (r0, c0) = ((cell / self.ny) as i64, (cell % self.ny) as i64);
        let cells = self.cells();
        for dr in -lo_x..=hi_x {
            for dc in -lo_y..=hi_y {
                let dist = ((dr * dr + dc * dc) as f32).sqrt();
                if dist > reach {
                    continue;
                }
                let rho = gaspari_cohn_f32(dist, self.radius);
                if rho <= RHO_MIN as f32 {
                    continue;
                }
                let c = ((r0 + dr).rem_euclid(nx) * ny + (c0 + dc).rem_euclid(ny)) as usize;
                for fld in 0..self.fields {
                    let comp = fld * cells + c;
                    if comp >= self.offset && (comp - self.offset).is_multiple_of(self.every) {
                        let q = (comp - self.offset) / self.every;
                        if q < m {
                            f(q, rho);
                        }
                    }
                }
            }
        }
    }
}

/// Gaspari–Cohn in f32, as the kernel evaluates it (same polynomial as
/// [`crate::localization::gaspari_cohn`]).
pub fn gaspari_cohn_f32(dist: f32, radius: f32) -> f32 {
    let z = dist.abs() / (1.82 * radius);
    let v = if z < 1.0 {
        1.0 - 5.0 / 3.0 * z * z + 5.0 / 8.0 * z * z * z + 0.5 * z.powi(4) - 0.25 * z.powi(5)
    } else if z < 2.0 {
        z.powi(5) / 12.0 - 0.5 * z.powi(4) + 5.0 / 8.0 * z * z * z + 5.0 / 3.0 * z * z - 5.0 * z
            + 4.0
            - 2.0 / (3.0 * z)
    } else {
        0.0
    };
    v.clamp(0.0, 1.0)
}

/// The Jacobi rotation `(c, s)` that zeroes `a_pq` of a symmetric matrix.
#[inline]
pub fn jacobi_rotation(app: f32, aqq: f32, apq: f32) -> (f32, f32) {
    if apq.abs() < 1e-30 {
        return (1.0, 0.0);
    }
    let theta = (aqq - app) / (2.0 * apq);
    let t = if theta.abs() > 1e18 {
        0.5 / theta
    } else {
        let sgn = if theta < 0.0 { -1.0 } else { 1.0 };
        sgn / (theta.abs() + (theta * theta + 1.0).sqrt())
    };
    let c = 1.0 / (t * t + 1.0).sqrt();
    (c, t * c)
}

/// Cyclic Jacobi eigen-decomposition of the symmetric `n × n` matrix `a` (row-major, f32), in
/// place: on return the diagonal of `a` holds the eigenvalues and the columns of `v` the
/// eigenvectors. Each rotation is `a ← Jᵀ a J` applied as a row pass then a column pass, as in
/// the kernel. Returns the number of sweeps run.
pub fn jacobi_eigen(a: &mut [f32], v: &mut [f32], n: usize) -> u32 {
    v.iter_mut().for_each(|x| *x = 0.0);
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let mut sweeps = 0;
    while sweeps < JACOBI_MAX_SWEEPS {
        let (mut off, mut diag) = (0.0f32, 0.0f32);
        for i in 0..n {
            diag += a[i * n + i] * a[i * n + i];
            for j in i + 1..n {
                off += a[i * n + j] * a[i * n + j];
            }
        }
        if off <= JACOBI_TOL * diag {
            break;
        }
        sweeps += 1;
        for p in 0..n.saturating_sub(1) {
            for q in p + 1..n {
                let (c, s) = jacobi_rotation(a[p * n + p], a[q * n + q], a[p * n + q]);
                for t in 0..n {
                    let (apt, aqt) = (a[p * n + t], a[q * n + t]);
                    a[p * n + t] = c * apt - s * aqt;
                    a[q * n + t] = s * apt + c * aqt;
                }
                for t in 0..n {
                    let (atp, atq) = (a[t * n + p], a[t * n + q]);
                    a[t * n + p] = c * atp - s * atq;
                    a[t * n + q] = s * atp + c * atq;
                    let (vtp, vtq) = (v[t * n + p], v[t * n + q]);
                    v[t * n + p] = c * vtp - s * vtq;
                    v[t * n + q] = s * vtp + c * vtq;
                }
            }
        }
    }
    sweeps
}

/// The batched LETKF (twin of `shaders/ensemble_space_letkf.wgsl`): replaces the forecast `x` (`n × d`,
/// row-major) by its analysis, without inflation. `hx` is `h(x)` (`n × m`), `y` the observation.
///
/// For every cell: `C = Σ_q ρ_q ã_q ã_qᵀ/σ² + (n−1) I` and `b = Σ_q ρ_q ã_q (y_q − ȳ_q)/σ²`
/// over the cell's local observations (`ã_q` the observed anomalies); every component of the
/// cell gets `x̄_a = x̄ + bᵀC⁻¹a`, `a_a = √(n−1) C^{-1/2} a`.
///
/// Sixteen cells are solved together, one per f32 lane. Where the Gershgorin/trace bound of
/// `C − (n−1) I` allows a Chebyshev degree of at most [`letkf_max_degree`] in every lane (a
/// spread not far above the observation noise), both matrix functions are applied to each
/// component's anomalies by the Chebyshev recurrence at the lanes' highest degree
/// ([`letkf_chebyshev_degree`], each lane with its own coefficients; the kernel uses each
/// cell's own degree). Otherwise `C = V Λ Vᵀ` by cyclic Jacobi, `w = C⁻¹ b`,
/// `T = √(n−1) C^{-1/2}`: the same rotations in the same order per lane (a lane whose matrix has
/// converged takes identity rotations while the others finish), each rotation updating only
/// rows and columns `p` and `q` of the symmetric matrix.
pub fn letkf_analysis(
    x: &mut [f32],
    n: usize,
    hx: &[f32],
    y: &[f32],
    local: &LocalAnalysis,
) -> Result<()> {
    let d = local.dim();
    let m = y.len();
    local.check(n, d, m)?;
    if x.len() != n * d || hx.len() != n * m {
        return Err(Error::shape(
            "LETKF inputs",
            format!("{n} x {d} ensemble and {n} x {m} observed ensemble"),
            format!("{} x {} values", x.len(), hx.len()),
        ));
    }
    let cells = local.cells();
    let fields = local.fields;
    let ctx = LetkfCtx {
        x,
        n,
        d,
        hx,
        y,
        local,
    };
    // Per block of LANES cells: the analysed columns of its cells, `fields × n` per cell.
    let per_cell = fields * n;
    let mut out = vec![0.0f32; cells * per_cell];
    out.par_chunks_mut(LANES * per_cell)
        .enumerate()
        .for_each_init(LetkfScratch::default, |sc, (blk, o)| {
            let c0 = blk * LANES;
            run_letkf_block(&ctx, c0, LANES.min(cells - c0), sc, o);
        });
    for (cell, col) in out.chunks(per_cell).enumerate() {
        for f in 0..fields {
            let k = f * cells + cell;
            for i in 0..n {
                x[i * d + k] = col[f * n + i];
            }
        }
    }
    Ok(())
}

/// What every block of [`letkf_analysis`] reads.
struct LetkfCtx<'a> {
    x: &'a [f32],
    n: usize,
    d: usize,
    hx: &'a [f32],
    y: &'a [f32],
    local: &'a LocalAnalysis,
}

/// Per-thread scratch of [`letkf_analysis`].
#[derive(Default)]
struct LetkfScratch {
    /// Local observations `(q, ρ)` of every lane, entry-major, padded with `ρ = 0`.
    entries: Vec<[(usize, f32); LANES]>,
    /// `C`, then its eigenvalues on the diagonal (`n × n`, both triangles).
    c: Vec<V>,
    /// Eigenvectors (`n × n`, columns).
    v: Vec<V>,
    /// `T` (`n × n`).
    t: Vec<V>,
    b: Vec<V>,
    col: Vec<V>,
    w: Vec<V>,
    vb: Vec<V>,
    sq: Vec<V>,
    a: Vec<V>,
    /// Chebyshev coefficients per lane (`(1 + t)^{-1}` and `(1 + t)^{-1/2}`), one lane's
    /// before they are spread over the lanes, and the `A^{-1/2}` series.
    c1: Vec<V>,
    c2: Vec<V>,
    coef: Vec<f32>,
    r2: Vec<V>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn letkf_block_avx2(
    c: &LetkfCtx<'_>,
    c0: usize,
    lanes: usize,
    sc: &mut LetkfScratch,
    out: &mut [f32],
) {
    letkf_block(c, c0, lanes, sc, out)
}

/// [`letkf_block`] compiled for AVX2 when the processor has it (the same arithmetic: no fused
/// multiply-adds, only the vector width differs).
fn run_letkf_block(
    c: &LetkfCtx<'_>,
    c0: usize,
    lanes: usize,
    sc: &mut LetkfScratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time).
        unsafe { letkf_block_avx2(c, c0, lanes, sc, out) };
        return;
    }
    letkf_block(c, c0, lanes, sc, out)
}

/// Cells `c0 .. c0 + lanes` of [`letkf_analysis`] into `out` (`lanes × fields × n`). Lanes past
/// `lanes` repeat the last cell and are dropped.
#[allow(clippy::needless_range_loop)] // lane-indexed structure-of-arrays code
#[inline(always)]
fn letkf_block(c: &LetkfCtx<'_>, c0: usize, lanes: usize, sc: &mut LetkfScratch, out: &mut [f32]) {
    let (n, m) = (c.n, c.y.len());
    let n1 = (n - 1) as f32;
    let inv_s2 = 1.0 / (c.local.noise_std * c.local.noise_std);
    let cell = |l: usize| c0 + l.min(lanes - 1);
    // The local observations of every lane, in the kernel's order, padded to the longest.
    sc.entries.clear();
    for l in 0..LANES {
        let mut e = 0;
        c.local.for_each_local(cell(l), m, |q, rho| {
            if sc.entries.len() == e {
                sc.entries.push([(0, 0.0); LANES]);
            }
            sc.entries[e][l] = (q, rho);
            e += 1;
        });
    }
    let zero = [0.0f32; LANES];
    sc.c.clear();
    sc.c.resize(n * n, zero);
    sc.b.clear();
    sc.b.resize(n, zero);
    sc.col.resize(n, zero);
    // C and b, one observation per lane at a time (a padding entry adds exact zeros).
    for ent in &sc.entries {
        let contiguous = (1..LANES).all(|l| ent[l].0 == ent[0].0 + l);
        for (i, col) in sc.col.iter_mut().enumerate() {
            let row = &c.hx[i * m..(i + 1) * m];
            if contiguous {
                col.copy_from_slice(&row[ent[0].0..ent[0].0 + LANES]);
            } else {
                for l in 0..LANES {
                    col[l] = row[ent[l].0];
                }
            }
        }
        let mut ybar = zero;
        for col in &sc.col {
            for l in 0..LANES {
                ybar[l] += col[l];
            }
        }
        let (mut wq, mut dq) = (zero, zero);
        for l in 0..LANES {
            ybar[l] /= n as f32;
            wq[l] = ent[l].1 * inv_s2;
            dq[l] = c.y[ent[l].0] - ybar[l];
        }
        for i in 0..n {
            let mut wa = zero;
            for l in 0..LANES {
                wa[l] = wq[l] * (sc.col[i][l] - ybar[l]);
            }
            let row = &mut sc.c[i * n..(i + 1) * n];
            for (cij, colj) in row.iter_mut().zip(&sc.col) {
                for l in 0..LANES {
                    cij[l] += wa[l] * (colj[l] - ybar[l]);
                }
            }
            for l in 0..LANES {
                sc.b[i][l] += wa[l] * dq[l];
            }
        }
    }
    for i in 0..n {
        for l in 0..LANES {
            sc.c[i * n + i][l] += n1;
        }
    }
    if letkf_chebyshev_block(c, c0, lanes, sc, out) {
        return;
    }
    jacobi_lanes(&mut sc.c, &mut sc.v, n);
    // λ (floored), vb = Vᵀb/λ, w = V vb, √((n−1)/λ), T = V diag(√((n−1)/λ)) Vᵀ.
    sc.vb.clear();
    sc.vb.resize(n, zero);
    sc.sq.clear();
    sc.sq.resize(n, zero);
    for k in 0..n {
        let mut acc = zero;
        for i in 0..n {
            for l in 0..LANES {
                acc[l] += sc.v[k * n + i][l] * sc.b[i][l];
            }
        }
        for l in 0..LANES {
            let lam = sc.c[k * n + k][l].max(EIG_FLOOR);
            sc.vb[k][l] = acc[l] / lam;
            sc.sq[k][l] = (n1 / lam).sqrt();
        }
    }
    sc.w.clear();
    sc.w.resize(n, zero);
    for i in 0..n {
        for k in 0..n {
            for l in 0..LANES {
                sc.w[i][l] += sc.v[k * n + i][l] * sc.vb[k][l];
            }
        }
    }
    sc.t.clear();
    sc.t.resize(n * n, zero);
    for i in 0..n {
        for j in 0..=i {
            let mut acc = zero;
            for k in 0..n {
                for l in 0..LANES {
                    acc[l] += sc.v[k * n + i][l] * sc.v[k * n + j][l] * sc.sq[k][l];
                }
            }
            sc.t[i * n + j] = acc;
            sc.t[j * n + i] = acc;
        }
    }
    // Every field of the cells: x̄_a = x̄ + wᵀa, a_a = T a.
    let cells = c.local.cells();
    let fields = c.local.fields;
    sc.a.resize(n, zero);
    for f in 0..fields {
        let mean = field_anomalies(c, f * cells + c0, lanes, &mut sc.a);
        let mut mean_a = zero;
        for (a, w) in sc.a.iter().zip(&sc.w) {
            for l in 0..LANES {
                mean_a[l] += w[l] * a[l];
            }
        }
        for i in 0..n {
            let mut acc = zero;
            for (tij, aj) in sc.t[i * n..(i + 1) * n].iter().zip(&sc.a) {
                for l in 0..LANES {
                    acc[l] += tij[l] * aj[l];
                }
            }
            for l in 0..lanes {
                out[(l * fields + f) * n + i] = mean[l] + mean_a[l] + acc[l];
            }
        }
    }
}

/// Loads field component `k0 + l` of lane `l` (lanes past `lanes` repeat the last cell) into
/// `a` as anomalies about the member mean, and returns that mean.
#[allow(clippy::needless_range_loop)] // lane-indexed structure-of-arrays code
#[inline(always)]
fn field_anomalies(c: &LetkfCtx<'_>, k0: usize, lanes: usize, a: &mut [V]) -> V {
    let (n, d) = (c.n, c.d);
    let mut mean = [0.0f32; LANES];
    for (i, ai) in a.iter_mut().enumerate() {
        let row = &c.x[i * d..(i + 1) * d];
        for l in 0..LANES {
            ai[l] = row[k0 + l.min(lanes - 1)];
            mean[l] += ai[l];
        }
    }
    for l in 0..LANES {
        mean[l] /= n as f32;
    }
    for ai in a.iter_mut() {
        for l in 0..LANES {
            ai[l] -= mean[l];
        }
    }
    mean
}

/// The Chebyshev path of [`letkf_block`] (the kernel's for a cell of small spread): with
/// `sc.c = A` and `sc.b` built, every lane's degree from its spectrum bound; when all are at most
/// [`letkf_max_degree`], every field's anomalies `a` get `A⁻¹a` and `√(n−1) A^{-1/2} a` by the
/// three-term recurrence `v_{k+1} = 2 M v_k − v_{k−1}`, `M = (2/λ̄)(A − (n−1) I) − I`, at the
/// lanes' highest degree (each lane with its own coefficients). Returns `false` (nothing
/// written) when a lane needs the Jacobi solver.
#[allow(clippy::needless_range_loop)] // lane-indexed structure-of-arrays code
#[inline(always)]
fn letkf_chebyshev_block(
    c: &LetkfCtx<'_>,
    c0: usize,
    lanes: usize,
    sc: &mut LetkfScratch,
    out: &mut [f32],
) -> bool {
    let n = c.n;
    let n1 = (n - 1) as f32;
    let zero = [0.0f32; LANES];
    // λ̄ per lane: the smaller of the trace and the largest absolute row sum of A − (n−1) I.
    let (mut lam, mut degree) = (zero, 0u32);
    for l in 0..LANES {
        let (mut trace, mut gersh) = (0.0f32, 0.0f32);
        for i in 0..n {
            let mut row = 0.0f32;
            for j in 0..n {
                let v = sc.c[i * n + j][l] - if i == j { n1 } else { 0.0 };
                row += v.abs();
            }
            trace += sc.c[i * n + i][l] - n1;
            gersh = gersh.max(row);
        }
        lam[l] = trace.min(gersh);
        degree = degree.max(letkf_chebyshev_degree(lam[l], n1));
    }
    if degree > letkf_max_degree(n) {
        return false;
    }
    let terms = degree as usize + 1;
    for buf in [&mut sc.c1, &mut sc.c2] {
        buf.clear();
        buf.resize(terms, zero);
    }
    sc.coef.resize(2 * terms, 0.0);
    let mut scale = zero;
    for l in 0..LANES {
        let (k1, k2) = sc.coef.split_at_mut(terms);
        letkf_coefficients(degree, lam[l].max(0.0) / n1, k1, k2);
        for k in 0..terms {
            sc.c1[k][l] = k1[k];
            sc.c2[k][l] = k2[k];
        }
        scale[l] = if lam[l] > 0.0 { 2.0 / lam[l] } else { 0.0 };
    }
    // M v = scale·(A v − (n−1) v) − v, row i.
    let m_row = |a: &[V], v: &[V], i: usize| {
        let acc = dot_lanes::<false>(&a[i * n..(i + 1) * n], v);
        let mut out = zero;
        for l in 0..LANES {
            out[l] = scale[l] * (acc[l] - n1 * v[i][l]) - v[i][l];
        }
        out
    };
    let cells = c.local.cells();
    let fields = c.local.fields;
    sc.a.resize(n, zero);
    for buf in [&mut sc.vb, &mut sc.sq, &mut sc.col, &mut sc.w, &mut sc.r2] {
        buf.clear();
        buf.resize(n, zero);
    }
    for f in 0..fields {
        let mean = field_anomalies(c, f * cells + c0, lanes, &mut sc.a);
        // vb = v_{k−1}, sq = v_k, col = v_{k+1}; w = r1 (the A⁻¹ series), r2 (the A^{-1/2}).
        let (prev, cur, next) = (&mut sc.vb, &mut sc.sq, &mut sc.col);
        let (r1, r2) = (&mut sc.w, &mut sc.r2);
        prev.copy_from_slice(&sc.a);
        for i in 0..n {
            cur[i] = m_row(&sc.c, &sc.a, i);
            for l in 0..LANES {
                r1[i][l] = 0.5 * sc.c1[0][l] * sc.a[i][l] + sc.c1[1][l] * cur[i][l];
                r2[i][l] = 0.5 * sc.c2[0][l] * sc.a[i][l] + sc.c2[1][l] * cur[i][l];
            }
        }
        for k in 2..terms {
            for i in 0..n {
                let mv = m_row(&sc.c, cur, i);
                for l in 0..LANES {
                    next[i][l] = 2.0 * mv[l] - prev[i][l];
                    r1[i][l] += sc.c1[k][l] * next[i][l];
                    r2[i][l] += sc.c2[k][l] * next[i][l];
                }
            }
            std::mem::swap(prev, cur);
            std::mem::swap(cur, next);
        }
        // x̄_a = x̄ + bᵀA⁻¹a = x̄ + b·r1/(n−1); a_a = √(n−1) A^{-1/2} a = r2.
        let mut wa = zero;
        for i in 0..n {
            for l in 0..LANES {
                wa[l] += sc.b[i][l] * r1[i][l];
            }
        }
        for i in 0..n {
            for l in 0..lanes {
                out[(l * fields + f) * n + i] = (mean[l] + wa[l] / n1) + r2[i][l];
            }
        }
    }
    true
}

/// Rows of the observed-products matrix for `n` members and `e` perturbation rows.
pub fn observed_products_rows(n: usize, e: usize) -> usize {
    n + 1 + e
}

/// The ensemble-space products of the observed anomalies `ã_i = h(x_i) − ȳ` (twin of
/// `shaders/ensemble_space_products.wgsl`, accumulated in f64): `out` is `(n + 1 + e) × n` with
/// rows `0..n` the Gram matrix `ã_i · ã_j`, row `n` the projected innovation `ã_j · (y − ȳ)`,
/// and rows `n + 1 + r` the projected perturbations `ã_j · η_r` (`eta` is `e × m`).
/// Unscaled: the filters divide by `σ²`.
pub fn observed_products(
    hx: &[f32],
    n: usize,
    y: &[f32],
    eta: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    observed_products_in(hx, n, y, eta, out, &mut Vec::new(), true)
}

/// Multiply-adds of [`observed_products`] below which it runs on the calling thread.
const PRODUCTS_PARALLEL_WORK: usize = 1 << 16;

/// [`observed_products`] with its f64 scratch in `scratch` (grown when too short; no other
/// allocation), on the calling thread unless `parallel` and the work is large.
///
/// Every output `o[r][j] = Σ_k ã_j[k] · z_r[k]` (`z_r` the anomaly `ã_r`, the innovation or a
/// perturbation) is summed in `k` order from `-0.0`, a product then a sum, exactly as
/// `Iterator::sum` of the products. The sums run as rank-one updates over `k` of a table
/// `Z` (`m × (n + 1 + e)`, component-major: row `k` holds `ã_·[k]`, `(y − ȳ)[k]`, `η_·[k]`),
/// so that the lanes of a vector hold different outputs and the order within each is kept.
pub(crate) fn observed_products_in(
    hx: &[f32],
    n: usize,
    y: &[f32],
    eta: Option<&[f32]>,
    out: &mut [f32],
    scratch: &mut Vec<f64>,
    parallel: bool,
) -> Result<()> {
    let m = y.len();
    let e = eta.map_or(0, |v| v.len() / m.max(1));
    let rows = observed_products_rows(n, e);
    if hx.len() != n * m || eta.is_some_and(|v| v.len() != e * m) || out.len() != rows * n {
        return Err(Error::shape(
            "observed products",
            format!("{n} x {m} observed ensemble, {} x {n} output", n + 1 + e),
            format!("{} and {} values", hx.len(), out.len()),
        ));
    }
    let need = m + m * rows + rows * n;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (ybar, rest) = scratch.split_at_mut(m);
    let (z, rest) = rest.split_at_mut(m * rows);
    let acc = &mut rest[..rows * n];
    ybar.iter_mut().for_each(|v| *v = 0.0);
    for row in hx.chunks(m.max(1)) {
        for (a, &v) in ybar.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    ybar.iter_mut().for_each(|v| *v /= n as f64);
    for (k, zk) in z.chunks_exact_mut(rows).enumerate() {
        let mu = ybar[k];
        for (j, v) in zk[..n].iter_mut().enumerate() {
            *v = hx[j * m + k] as f64 - mu;
        }
        zk[n] = y[k] as f64 - mu;
        if let Some(eta) = eta {
            for (r, v) in zk[n + 1..].iter_mut().enumerate() {
                *v = eta[r * m + k] as f64;
            }
        }
    }
    acc.iter_mut().for_each(|v| *v = -0.0);
    let z: &[f64] = z;
    // Rows r0..r0 + part of the output, over every component.
    let sum_rows = |r0: usize, part: &mut [f64]| {
        let count = part.len() / n.max(1);
        for zk in z.chunks_exact(rows) {
            simd::outer_acc(part, &zk[..n], &zk[r0..r0 + count]);
        }
    };
    let work = n * rows * m;
    if n > 0 && parallel && work >= PRODUCTS_PARALLEL_WORK {
        let per = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
        acc.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(p, part)| sum_rows(p * per, part));
    } else if n > 0 {
        sum_rows(0, acc);
    }
    for (o, &v) in out.iter_mut().zip(acc.iter()) {
        *o = v as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::{DMatrix, SymmetricEigen};

    /// A value in `[−1, 1)`.
    fn lcg(seed: &mut u64) -> f32 {
        2.0 * super::super::lanes::test_uniform(seed)
    }

    /// The products as dot products of whole rows, one output at a time (the definition
    /// [`observed_products_in`] must reproduce bit for bit).
    fn products_reference(hx: &[f32], n: usize, y: &[f32], eta: Option<&[f32]>) -> Vec<f32> {
        let m = y.len();
        let e = eta.map_or(0, |v| v.len() / m);
        let mut ybar = vec![0.0f64; m];
        for row in hx.chunks(m) {
            for (a, &v) in ybar.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        ybar.iter_mut().for_each(|v| *v /= n as f64);
        let anom: Vec<f64> = (0..n * m).map(|i| hx[i] as f64 - ybar[i % m]).collect();
        let innov: Vec<f64> = (0..m).map(|k| y[k] as f64 - ybar[k]).collect();
        let dot = |j: usize, v: &dyn Fn(usize) -> f64| -> f64 {
            (0..m).map(|k| anom[j * m + k] * v(k)).sum()
        };
        let mut out = vec![0.0f32; (n + 1 + e) * n];
        for (r, row) in out.chunks_mut(n).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                *o = if r < n {
                    dot(j, &|k| anom[r * m + k])
                } else if r == n {
                    dot(j, &|k| innov[k])
                } else {
                    dot(j, &|k| {
                        eta.expect("perturbations")[(r - n - 1) * m + k] as f64
                    })
                } as f32;
            }
        }
        out
    }

    #[test]
    fn observed_products_equal_the_row_by_row_dot_products() {
        let mut seed = 3;
        // Small (one thread) and large enough to split the rows over threads.
        for (n, m) in [
            (1usize, 1usize),
            (2, 3),
            (5, 40),
            (17, 9),
            (20, 40),
            (33, 101),
        ] {
            let hx: Vec<f32> = (0..n * m).map(|_| lcg(&mut seed)).collect();
            let y: Vec<f32> = (0..m).map(|_| 2.0 * lcg(&mut seed)).collect();
            let eta: Vec<f32> = (0..n * m).map(|_| lcg(&mut seed)).collect();
            for e in [None, Some(&eta[..])] {
                let want = products_reference(&hx, n, &y, e);
                for parallel in [false, true] {
                    let mut got = vec![f32::NAN; want.len()];
                    let mut scratch = vec![7.0; 3];
                    observed_products_in(&hx, n, &y, e, &mut got, &mut scratch, parallel).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "n {n}, m {m}, eta {}", e.is_some());
                }
            }
        }
    }

    #[test]
    fn jacobi_matches_a_double_precision_eigensolver() {
        let mut seed = 7;
        for n in [1usize, 2, 5, 17, 32] {
            let b: Vec<f32> = (0..n * n).map(|_| lcg(&mut seed)).collect();
            // Symmetric, with a spread of eigenvalues and some near-repeated ones.
            let mut a = vec![0.0f32; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f32>();
                }
                a[i * n + i] += (n - 1) as f32;
            }
            let reference = SymmetricEigen::new(DMatrix::from_fn(n, n, |i, j| a[i * n + j] as f64));
            let mut v = vec![0.0f32; n * n];
            let mut w = a.clone();
            let sweeps = jacobi_eigen(&mut w, &mut v, n);
            assert!(sweeps <= JACOBI_MAX_SWEEPS);
            let mut got: Vec<f64> = (0..n).map(|l| w[l * n + l] as f64).collect();
            let mut want: Vec<f64> = reference.eigenvalues.iter().copied().collect();
            got.sort_by(f64::total_cmp);
            want.sort_by(f64::total_cmp);
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            // Backward-stable in f32: eigenvalue errors of order n·ε·‖A‖.
            let tol = 4.0 * n as f64 * f32::EPSILON as f64 * scale;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol, "n={n}: {g} vs {w} (tolerance {tol})");
            }
            // V Λ Vᵀ reconstructs the matrix.
            for i in 0..n {
                for j in 0..n {
                    let r: f64 = (0..n)
                        .map(|l| (v[i * n + l] * v[j * n + l] * w[l * n + l]) as f64)
                        .sum();
                    assert!((r - a[i * n + j] as f64).abs() <= tol, "n={n}");
                }
            }
        }
    }

    #[test]
    fn local_enumeration_equals_the_geometry_neighbourhood() {
        use crate::model::DistanceKind;
        for (geometry, every, offset) in [
            (Geometry::Ring { len: 11 }, 1, 0),
            (Geometry::Ring { len: 40 }, 3, 2),
            (
                Geometry::Torus {
                    nx: 7,
                    ny: 6,
                    fields: 3,
                },
                2,
                1,
            ),
        ] {
            let d = geometry.dim().unwrap();
            let op = Observe::identity().subsample(every, offset).unwrap();
            let m = crate::observe::ObservationOperator::obs_dim(&op, d).unwrap();
            for kind in [DistanceKind::Geometry, DistanceKind::Flattened] {
                for radius in [0.3, 0.9, 1.7] {
                    let loc = Localization::new(radius, geometry, kind, d).unwrap();
                    let la = LocalAnalysis::new(&loc, &op, 1.0);
                    for cell in [0, la.cells() / 2, la.cells() - 1] {
                        let mut got = Vec::new();
                        la.for_each_local(cell, m, |q, rho| got.push((q, rho)));
                        got.sort_by_key(|p| p.0);
                        let want = loc.local_observations(cell, &op, m);
                        assert_eq!(
                            got.iter().map(|p| p.0).collect::<Vec<_>>(),
                            want.iter().map(|p| p.0).collect::<Vec<_>>(),
                            "{geometry:?} {kind:?} r={radius} cell={cell}"
                        );
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g.1 as f64 - w.1).abs() < 1e-5);
                        }
                    }
                }
            }
        }
    }
}
