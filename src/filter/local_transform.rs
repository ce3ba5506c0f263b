//! One local ensemble transform in f64 (ENFF_SPEC §6.5), the per-component step of the host
//! LETKF.
//!
//! A local analysis updates one state component, whose member anomalies are `a` (length `n`),
//! from the localized, scaled observed anomalies `Ỹ` (`n × ml`) and innovations `d̃` (`ml`).
//! With `A = (n − 1) I + Ỹ Ỹᵀ` it needs only two numbers of `A`'s eigendecomposition applied to
//! `a`: the mean increment `w̄ · a = (Ỹ d̃)ᵀ A⁻¹ a` and the transformed anomalies
//! `T a = √(n − 1) A^{-1/2} a` (the symmetric square root). Two ways to get them:
//!
//! * [`Solver::Eigen`]: the symmetric eigendecomposition of `A` (nalgebra), `O(n³)` with a
//!   large constant;
//! * [`Solver::Chebyshev`]: both matrix functions of `A` applied to the one vector `a` by a
//!   Chebyshev expansion on `A`'s spectrum. `A`'s eigenvalues lie in `[n − 1, n − 1 + λ̄]`
//!   with `λ̄` a Gershgorin/trace bound on `Ỹ Ỹᵀ`, so the functions `(1 + t)^{-1}` and
//!   `(1 + t)^{-1/2}` of `t = (A − (n − 1) I)/(n − 1) ∈ [0, β]`, `β = λ̄/(n − 1)`, are analytic
//!   in a Bernstein ellipse whose size fixes the degree for a relative error of
//!   [`CHEBYSHEV_TOL`] a priori. Each degree costs one `n × n` matrix–vector product, so a
//!   cycling ensemble (`β` of order 1: degree ≈ 11) costs a few thousand multiply-adds instead
//!   of an eigendecomposition. When the bound asks for a degree above [`max_degree`] (a spread
//!   far larger than the observation noise, as in a cold start) the cell falls back to the
//!   eigendecomposition. Both give the same numbers to about 1e-10 relative (tested to 1e-9),
//!   far below the f32 ensemble's rounding.

use nalgebra::{DMatrix, SymmetricEigen};

/// Relative accuracy the Chebyshev degree is chosen for.
pub const CHEBYSHEV_TOL: f64 = 1e-10;

/// How a local transform is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solver {
    /// Symmetric eigendecomposition of `A`.
    Eigen,
    /// Chebyshev expansion of `A⁻¹ a` and `A^{-1/2} a`, eigendecomposition beyond
    /// [`max_degree`].
    Chebyshev,
}

/// The highest Chebyshev degree used for `n` members before falling back to the
/// eigendecomposition (the degree where the two cost about the same).
pub fn max_degree(n: usize) -> usize {
    2 * n + 8
}

/// Reusable buffers for [`transform`] (sized on first use).
#[derive(Default)]
pub(crate) struct Scratch {
    c: Vec<f64>,
    b: Vec<f64>,
    v_prev: Vec<f64>,
    v: Vec<f64>,
    v_next: Vec<f64>,
    r1: Vec<f64>,
    r2: Vec<f64>,
    c1: Vec<f64>,
    c2: Vec<f64>,
    t_prev: Vec<f64>,
    t: Vec<f64>,
    nodes: Vec<f64>,
    g1: Vec<f64>,
    g2: Vec<f64>,
    /// The transformed anomalies `T a` of the last call.
    pub(crate) out: Vec<f64>,
}

/// One local transform: `at` is `Ỹᵀ` (`ml × n`, row-major: one observation's `n` anomalies
/// after another), `dt` is `d̃` (`ml`), `a` the component's member anomalies (`n`). Returns
/// `w̄ · a` and which solver actually ran (a Chebyshev request may fall back to the eigen
/// solver), and leaves `T a` in `scratch.out`.
///
/// # Panics
/// If `a` does not hold `n` values or `at` does not hold `n · dt.len()` values.
pub(crate) fn transform(
    solver: Solver,
    at: &[f64],
    dt: &[f64],
    a: &[f64],
    n: usize,
    scratch: &mut Scratch,
) -> (f64, Solver) {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked just above).
        return unsafe { transform_avx2(solver, at, dt, a, n, scratch) };
    }
    transform_generic(solver, at, dt, a, n, scratch)
}

/// [`transform_generic`] compiled for AVX2 (the same arithmetic: Rust contracts no
/// multiply-add into a fused one, only the vector width differs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn transform_avx2(
    solver: Solver,
    at: &[f64],
    dt: &[f64],
    a: &[f64],
    n: usize,
    scratch: &mut Scratch,
) -> (f64, Solver) {
    transform_generic(solver, at, dt, a, n, scratch)
}

#[inline(always)]
fn transform_generic(
    solver: Solver,
    at: &[f64],
    dt: &[f64],
    a: &[f64],
    n: usize,
    scratch: &mut Scratch,
) -> (f64, Solver) {
    let ml = dt.len();
    assert!(
        at.len() == n * ml && a.len() == n,
        "local transform: {} anomalies for {n} members and {ml} observations, {} state anomalies",
        at.len(),
        a.len()
    );
    let n1 = (n.max(2) - 1) as f64;
    let s = scratch;
    s.out.resize(n, 0.0);
    // b = Ỹ d̃ and C = Ỹ Ỹᵀ, one observation (a row of `at`) at a time: contiguous
    // multiply-adds of length n.
    s.b.clear();
    s.b.resize(n, 0.0);
    s.c.clear();
    s.c.resize(n * n, 0.0);
    for (row, &dq) in at.chunks_exact(n).zip(dt) {
        axpy(&mut s.b, dq, row);
        for (ci, &ri) in s.c.chunks_exact_mut(n).zip(row) {
            axpy(ci, ri, row);
        }
    }
    if solver == Solver::Chebyshev {
        if let Some(wa) = chebyshev(a, n, n1, s) {
            return (wa, Solver::Chebyshev);
        }
    }
    (eigen(a, n, n1, s), Solver::Eigen)
}

/// `y += f · x`.
#[inline(always)]
fn axpy(y: &mut [f64], f: f64, x: &[f64]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += f * b;
    }
}

/// `y = C v` for the symmetric `n × n` matrix `c` (a sum of its rows).
#[inline(always)]
fn symv(y: &mut [f64], c: &[f64], v: &[f64], n: usize) {
    y.iter_mut().for_each(|a| *a = 0.0);
    for (row, &vj) in c.chunks_exact(n).zip(v) {
        axpy(y, vj, row);
    }
}

#[inline(always)]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    // Four partial sums: the compiler keeps them in vector registers.
    let mut acc = [0.0f64; 4];
    let (xc, xr) = x.split_at(x.len() - x.len() % 4);
    let (yc, yr) = y.split_at(xc.len());
    for (p, q) in xc.chunks_exact(4).zip(yc.chunks_exact(4)) {
        for l in 0..4 {
            acc[l] += p[l] * q[l];
        }
    }
    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (p, q) in xr.iter().zip(yr) {
        sum += p * q;
    }
    sum
}

/// The eigendecomposition path (`s.c` holds `Ỹ Ỹᵀ`).
fn eigen(a: &[f64], n: usize, n1: f64, s: &mut Scratch) -> f64 {
    if s.c.iter().chain(&s.b).chain(a).any(|v| !v.is_finite()) {
        // The eigen-solver need not stop on NaN: hand the non-finite value on (the analysis
        // reports it as a typed error).
        s.out.iter_mut().for_each(|v| *v = f64::NAN);
        return f64::NAN;
    }
    let m = DMatrix::<f64>::from_fn(n, n, |i, j| s.c[i * n + j] + if i == j { n1 } else { 0.0 });
    let eig = SymmetricEigen::new(m);
    let u = &eig.eigenvectors;
    let mut wa = 0.0;
    s.out.iter_mut().for_each(|v| *v = 0.0);
    for l in 0..n {
        let lam = eig.eigenvalues[l].max(1e-9);
        let col = u.column(l);
        let ua: f64 = (0..n).map(|i| col[i] * a[i]).sum();
        let ub: f64 = (0..n).map(|i| col[i] * s.b[i]).sum();
        wa += ub * ua / lam;
        let f = ua * (n1 / lam).sqrt();
        for (o, &ci) in s.out.iter_mut().zip(col.iter()) {
            *o += f * ci;
        }
    }
    wa
}

/// The Chebyshev path, or `None` when the spectrum bound asks for a degree above
/// [`max_degree`] or is not finite.
#[inline(always)]
fn chebyshev(a: &[f64], n: usize, n1: f64, s: &mut Scratch) -> Option<f64> {
    // λ̄ ≥ λ_max(C): the smaller of the trace and the largest absolute row sum.
    let trace: f64 = (0..n).map(|i| s.c[i * n + i]).sum();
    let gersh =
        s.c.chunks_exact(n)
            .map(|row| row.iter().map(|v| v.abs()).sum::<f64>())
            .fold(0.0f64, f64::max);
    let lam = trace.min(gersh);
    if !lam.is_finite() {
        return None;
    }
    if lam <= 0.0 {
        // No observed spread: A = (n − 1) I.
        s.out.copy_from_slice(a);
        return Some(dot(&s.b, a) / n1);
    }
    let beta = lam / n1;
    // Chebyshev coefficients of 1/(1 + t), t = β (x + 1)/2, decay like ρ^{-k} with
    // ρ = x₀ + √(x₀² − 1), x₀ = 1 + 2/β (the pole at t = −1); their tail past degree m is
    // at most 2/√(1 + β) · ρ^{-m} · ρ/(ρ − 1). The inverse square root's decay as fast.
    let x0 = 1.0 + 2.0 / beta;
    let rho = x0 + (x0 * x0 - 1.0).sqrt();
    let lead = 2.0 / (1.0 + beta).sqrt() * rho / (rho - 1.0);
    let m = ((lead / CHEBYSHEV_TOL).ln() / rho.ln()).ceil().max(1.0) as usize + 2;
    if m > max_degree(n) {
        return None;
    }
    coefficients(m, beta, s);
    // M = (2/λ̄) C − I has its spectrum in [−1, 1]; v_k = T_k(M) a.
    let scale = 2.0 / lam;
    s.r1.clear();
    s.r1.extend(a.iter().map(|&v| 0.5 * s.c1[0] * v));
    s.r2.clear();
    s.r2.extend(a.iter().map(|&v| 0.5 * s.c2[0] * v));
    s.v_prev.clear();
    s.v_prev.extend_from_slice(a);
    s.v.resize(n, 0.0);
    s.v_next.resize(n, 0.0);
    symv(&mut s.v, &s.c, a, n);
    for (v, &ai) in s.v.iter_mut().zip(a) {
        *v = scale * *v - ai;
    }
    for k in 1..=m {
        let (c1, c2) = (s.c1[k], s.c2[k]);
        for i in 0..n {
            s.r1[i] += c1 * s.v[i];
            s.r2[i] += c2 * s.v[i];
        }
        if k == m {
            break;
        }
        symv(&mut s.v_next, &s.c, &s.v, n);
        for i in 0..n {
            s.v_next[i] = 2.0 * (scale * s.v_next[i] - s.v[i]) - s.v_prev[i];
        }
        std::mem::swap(&mut s.v_prev, &mut s.v);
        std::mem::swap(&mut s.v, &mut s.v_next);
    }
    // A⁻¹ = g₁/(n − 1), √(n − 1) A^{-1/2} = g₂.
    s.out.copy_from_slice(&s.r2);
    Some(dot(&s.b, &s.r1) / n1)
}

/// Chebyshev interpolation coefficients (degree `m`, `m + 1` nodes) of `1/(1 + t)` into `s.c1`
/// and `(1 + t)^{-1/2}` into `s.c2`, `t = β (x + 1)/2`, in the convention
/// `f ≈ c₀/2 + Σ_{k ≥ 1} c_k T_k`.
#[inline(always)]
fn coefficients(m: usize, beta: f64, s: &mut Scratch) {
    let nodes = m + 1;
    s.nodes.clear();
    s.g1.clear();
    s.g2.clear();
    for j in 0..nodes {
        let x = (std::f64::consts::PI * (j as f64 + 0.5) / nodes as f64).cos();
        let inv = 1.0 / (1.0 + 0.5 * beta * (x + 1.0));
        s.nodes.push(x);
        s.g1.push(inv);
        s.g2.push(inv.sqrt());
    }
    s.c1.clear();
    s.c1.resize(nodes, 0.0);
    s.c2.clear();
    s.c2.resize(nodes, 0.0);
    // T_k at the nodes by the three-term recurrence.
    s.t_prev.clear();
    s.t_prev.resize(nodes, 1.0);
    s.t.clear();
    s.t.extend_from_slice(&s.nodes);
    let f = 2.0 / nodes as f64;
    s.c1[0] = f * s.g1.iter().sum::<f64>();
    s.c2[0] = f * s.g2.iter().sum::<f64>();
    for k in 1..nodes {
        s.c1[k] = f * dot(&s.g1, &s.t);
        s.c2[k] = f * dot(&s.g2, &s.t);
        for j in 0..nodes {
            let next = 2.0 * s.nodes[j] * s.t[j] - s.t_prev[j];
            s.t_prev[j] = s.t[j];
            s.t[j] = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform numbers in [-1, 1) from a SplitMix64 stream.
    struct Uniform(u64);
    impl Uniform {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    /// Random anomalies (`ml × n` with spread `spread`), innovations and a state anomaly.
    fn case(n: usize, ml: usize, spread: f64, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = Uniform(seed);
        let mut at: Vec<f64> = (0..n * ml).map(|_| spread * rng.next()).collect();
        // Anomalies: zero mean over members, per observation.
        for row in at.chunks_exact_mut(n) {
            let mean = row.iter().sum::<f64>() / n as f64;
            row.iter_mut().for_each(|v| *v -= mean);
        }
        let dt = (0..ml).map(|_| 2.0 * rng.next()).collect();
        let a = (0..n).map(|_| spread * rng.next()).collect();
        (at, dt, a)
    }

    #[test]
    fn chebyshev_equals_the_eigendecomposition() {
        let mut s = Scratch::default();
        let mut used = [0usize; 2];
        for (seed, &(n, ml)) in [
            (20, 29),
            (7, 3),
            (13, 13),
            (21, 1),
            (33, 17),
            (2, 5),
            (48, 61),
        ]
        .iter()
        .enumerate()
        {
            for (k, &spread) in [0.0, 1e-4, 0.05, 0.2, 0.5, 1.0, 3.0, 10.0]
                .iter()
                .enumerate()
            {
                let (at, dt, a) = case(n, ml, spread, (seed * 10 + k) as u64);
                let (wa_e, used_e) = transform(Solver::Eigen, &at, &dt, &a, n, &mut s);
                assert_eq!(used_e, Solver::Eigen);
                let ta_e = s.out.clone();
                let (wa_c, used_c) = transform(Solver::Chebyshev, &at, &dt, &a, n, &mut s);
                used[(used_c == Solver::Chebyshev) as usize] += 1;
                let scale = a.iter().map(|v| v.abs()).fold(1e-300, f64::max);
                let wscale = wa_e.abs().max(scale);
                assert!(
                    (wa_e - wa_c).abs() <= 1e-9 * wscale,
                    "n {n}, ml {ml}, spread {spread}: w·a {wa_c} vs {wa_e}"
                );
                for (i, (x, y)) in s.out.iter().zip(&ta_e).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-9 * scale,
                        "n {n}, ml {ml}, spread {spread}, member {i}: {x} vs {y}"
                    );
                }
            }
        }
        // Both paths were exercised: the expansion for small spreads, the fallback for large.
        assert!(used[1] > 20 && used[0] > 3, "{used:?}");
    }

    #[test]
    fn the_degree_grows_with_the_spread_and_falls_back_beyond_the_cap() {
        let mut s = Scratch::default();
        let (n, ml) = (20, 29);
        let (at, dt, a) = case(n, ml, 0.2, 1);
        assert_eq!(
            transform(Solver::Chebyshev, &at, &dt, &a, n, &mut s).1,
            Solver::Chebyshev
        );
        let small = s.c1.len();
        let (at, dt, a) = case(n, ml, 0.5, 1);
        assert_eq!(
            transform(Solver::Chebyshev, &at, &dt, &a, n, &mut s).1,
            Solver::Chebyshev
        );
        assert!(s.c1.len() > small, "{} vs {small}", s.c1.len());
        let (at, dt, a) = case(n, ml, 20.0, 1);
        assert_eq!(
            transform(Solver::Chebyshev, &at, &dt, &a, n, &mut s).1,
            Solver::Eigen
        );
    }

    #[test]
    fn non_finite_anomalies_take_the_eigen_path() {
        let mut s = Scratch::default();
        let (mut at, dt, a) = case(5, 4, 0.3, 2);
        at[3] = f64::INFINITY;
        let (wa, solver) = transform(Solver::Chebyshev, &at, &dt, &a, 5, &mut s);
        assert_eq!(solver, Solver::Eigen);
        assert!(wa.is_nan() && s.out.iter().all(|v| v.is_nan()));
    }
}
