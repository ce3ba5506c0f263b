//! The lane vocabulary of the CPU's batched ensemble-space solvers: sixteen small problems
//! (one per component or grid cell) solved together, one per f32 lane, by the local gains of
//! covariance guidance (`gain.rs`: Cholesky factorizations of `I + τ·G`) and the batched LETKF
//! (`ensemble_space.rs`: Jacobi eigen-decompositions of `(n − 1)·I + G`). Both build the same
//! ensemble-space matrix `G = Σ_q ρ_q b_q b_qᵀ` of their window's observed anomalies.
//!
//! The lanes are independent, so the blocking below (two rows per pass of [`dot2_lanes`], four
//! rows per Cholesky column) only changes which sums are in flight together, never the order in
//! which one lane's sum is formed: every blocked kernel equals its one-at-a-time form bit for
//! bit (tested), with or without fused multiply-adds.

use super::ensemble_space::{JACOBI_MAX_SWEEPS, JACOBI_TOL};

/// Problems solved together, one per f32 lane (two AVX2 registers per operation).
pub(super) const LANES: usize = 16;

/// One value per lane.
pub(super) type V = [f32; LANES];

#[inline(always)]
pub(super) fn fmadd<const FMA: bool>(acc: &mut V, a: &V, b: &V) {
    for l in 0..LANES {
        acc[l] = if FMA {
            a[l].mul_add(b[l], acc[l])
        } else {
            acc[l] + a[l] * b[l]
        };
    }
}

/// Lane-wise dot product `Σ_r x[r]·y[r]` (two accumulator chains).
#[inline(always)]
pub(super) fn dot_lanes<const FMA: bool>(x: &[V], y: &[V]) -> V {
    let mut a0 = [0.0f32; LANES];
    let mut a1 = [0.0f32; LANES];
    let mut xc = x.chunks_exact(2);
    let mut yc = y.chunks_exact(2);
    for (xp, yp) in (&mut xc).zip(&mut yc) {
        fmadd::<FMA>(&mut a0, &xp[0], &yp[0]);
        fmadd::<FMA>(&mut a1, &xp[1], &yp[1]);
    }
    for (xv, yv) in xc.remainder().iter().zip(yc.remainder()) {
        fmadd::<FMA>(&mut a0, xv, yv);
    }
    for l in 0..LANES {
        a0[l] += a1[l];
    }
    a0
}

/// Lane-wise dot products of the rows `x0` and `x1` with `y`, two rows at once (`y` loaded once,
/// four accumulator chains in flight); each result equals `dot_lanes(x_i, y)` bit for bit.
#[inline(always)]
pub(super) fn dot2_lanes<const FMA: bool>(x0: &[V], x1: &[V], y: &[V]) -> (V, V) {
    let len = y.len();
    let (x0, x1) = (&x0[..len], &x1[..len]);
    let (mut a0, mut a1) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (mut b0, mut b1) = ([0.0f32; LANES], [0.0f32; LANES]);
    for ((p0, p1), yp) in x0
        .chunks_exact(2)
        .zip(x1.chunks_exact(2))
        .zip(y.chunks_exact(2))
    {
        fmadd::<FMA>(&mut a0, &p0[0], &yp[0]);
        fmadd::<FMA>(&mut a1, &p0[1], &yp[1]);
        fmadd::<FMA>(&mut b0, &p1[0], &yp[0]);
        fmadd::<FMA>(&mut b1, &p1[1], &yp[1]);
    }
    if len % 2 == 1 {
        fmadd::<FMA>(&mut a0, &x0[len - 1], &y[len - 1]);
        fmadd::<FMA>(&mut b0, &x1[len - 1], &y[len - 1]);
    }
    for l in 0..LANES {
        a0[l] += a1[l];
        b0[l] += b1[l];
    }
    (a0, b0)
}

/// Rows of the Cholesky update computed together (their accumulators stay in registers and
/// share the pivot row's loads).
const CHOL_ROWS: usize = 4;

/// In-place lane-wise Cholesky of the `k × k` lower triangle of `mat` (diagonal floored at
/// 1e-12: the matrices are `I + τ·S`, `S ⪰ 0`, so only round-off can go below 1). The rows
/// below a pivot are updated [`CHOL_ROWS`] at a time, each summed in the same order as one at
/// a time (the result does not depend on the blocking).
#[inline(always)]
pub(super) fn cholesky_lanes<const FMA: bool>(mat: &mut [V], k: usize) {
    for j in 0..k {
        let mut s = mat[j * k + j];
        let mut acc = [0.0f32; LANES];
        for t in 0..j {
            let v = mat[j * k + t];
            fmadd::<FMA>(&mut acc, &v, &v);
        }
        let mut dj = [0.0f32; LANES];
        for l in 0..LANES {
            s[l] -= acc[l];
            dj[l] = s[l].max(1e-12).sqrt();
        }
        mat[j * k + j] = dj;
        let mut r = j + 1;
        while r + CHOL_ROWS <= k {
            let mut acc = [[0.0f32; LANES]; CHOL_ROWS];
            for t in 0..j {
                let y = mat[j * k + t];
                for (u, a) in acc.iter_mut().enumerate() {
                    fmadd::<FMA>(a, &mat[(r + u) * k + t], &y);
                }
            }
            for (u, a) in acc.iter().enumerate() {
                sub_div(&mut mat[(r + u) * k + j], a, &dj);
            }
            r += CHOL_ROWS;
        }
        for r in r..k {
            let mut acc = [0.0f32; LANES];
            for t in 0..j {
                let (x, y) = (mat[r * k + t], mat[j * k + t]);
                fmadd::<FMA>(&mut acc, &x, &y);
            }
            sub_div(&mut mat[r * k + j], &acc, &dj);
        }
    }
}

/// `v ← (v − a)/d`, lane-wise.
#[inline(always)]
fn sub_div(v: &mut V, a: &V, d: &V) {
    let mut x = *v;
    for l in 0..LANES {
        x[l] = (x[l] - a[l]) / d[l];
    }
    *v = x;
}

/// Lane-wise `L Lᵀ v = rhs` in place.
#[inline(always)]
pub(super) fn solve_lanes<const FMA: bool>(mat: &[V], k: usize, v: &mut [V]) {
    for r in 0..k {
        let mut acc = [0.0f32; LANES];
        for t in 0..r {
            fmadd::<FMA>(&mut acc, &mat[r * k + t], &v[t]);
        }
        for l in 0..LANES {
            v[r][l] = (v[r][l] - acc[l]) / mat[r * k + r][l];
        }
    }
    for r in (0..k).rev() {
        let mut acc = [0.0f32; LANES];
        for t in r + 1..k {
            fmadd::<FMA>(&mut acc, &mat[t * k + r], &v[t]);
        }
        for l in 0..LANES {
            v[r][l] = (v[r][l] - acc[l]) / mat[r * k + r][l];
        }
    }
}

/// [`jacobi_rotation`](super::ensemble_space::jacobi_rotation) of every lane (branch-free
/// selects, the same arithmetic).
#[allow(clippy::needless_range_loop)] // lane-indexed structure-of-arrays code
#[inline(always)]
pub(super) fn rotation_lanes(app: &V, aqq: &V, apq: &V, c: &mut V, s: &mut V) {
    for l in 0..LANES {
        let small = apq[l].abs() < 1e-30;
        let den = if small { 1.0 } else { 2.0 * apq[l] };
        let theta = (aqq[l] - app[l]) / den;
        let sgn = if theta < 0.0 { -1.0 } else { 1.0 };
        let t_far = 0.5 / theta;
        let t_near = sgn / (theta.abs() + (theta * theta + 1.0).sqrt());
        let t = if theta.abs() > 1e18 { t_far } else { t_near };
        let cc = 1.0 / (t * t + 1.0).sqrt();
        c[l] = if small { 1.0 } else { cc };
        s[l] = if small { 0.0 } else { t * cc };
    }
}

/// Cyclic Jacobi eigen-decomposition of sixteen symmetric `n × n` matrices at once (`a`, both
/// triangles, one matrix per lane), in place: the diagonal receives the eigenvalues and the
/// rows of `v` the eigenvectors (`v[k·n + t]`, component `t` of vector `k`). The convergence
/// test and the rotation order are those of
/// [`jacobi_eigen`](super::ensemble_space::jacobi_eigen), per lane; a converged lane takes
/// identity rotations. Each rotation updates rows and columns `p`, `q` only (the two-sided
/// update written for a symmetric matrix).
#[allow(clippy::needless_range_loop)] // lane-indexed structure-of-arrays code
#[inline(always)]
pub(super) fn jacobi_lanes(a: &mut [V], v: &mut Vec<V>, n: usize) {
    let zero = [0.0f32; LANES];
    v.clear();
    v.resize(n * n, zero);
    for i in 0..n {
        v[i * n + i] = [1.0; LANES];
    }
    let mut active = [true; LANES];
    for _ in 0..JACOBI_MAX_SWEEPS {
        let (mut off, mut diag) = (zero, zero);
        for i in 0..n {
            for l in 0..LANES {
                diag[l] += a[i * n + i][l] * a[i * n + i][l];
            }
            for j in i + 1..n {
                for l in 0..LANES {
                    off[l] += a[i * n + j][l] * a[i * n + j][l];
                }
            }
        }
        for l in 0..LANES {
            active[l] = active[l] && off[l] > JACOBI_TOL * diag[l];
        }
        if !active.iter().any(|&x| x) {
            break;
        }
        let (mut c, mut s) = (zero, zero);
        for p in 0..n.saturating_sub(1) {
            for q in p + 1..n {
                let (app, aqq, apq) = (a[p * n + p], a[q * n + q], a[p * n + q]);
                rotation_lanes(&app, &aqq, &apq, &mut c, &mut s);
                for l in 0..LANES {
                    if !active[l] {
                        c[l] = 1.0;
                        s[l] = 0.0;
                    }
                }
                for t in (0..p).chain(p + 1..q).chain(q + 1..n) {
                    let (apt, aqt) = (a[p * n + t], a[q * n + t]);
                    let (mut np, mut nq) = (zero, zero);
                    for l in 0..LANES {
                        np[l] = c[l] * apt[l] - s[l] * aqt[l];
                        nq[l] = s[l] * apt[l] + c[l] * aqt[l];
                    }
                    a[p * n + t] = np;
                    a[t * n + p] = np;
                    a[q * n + t] = nq;
                    a[t * n + q] = nq;
                }
                let (mut npp, mut nqq, mut npq) = (zero, zero, zero);
                for l in 0..LANES {
                    let (cl, sl) = (c[l], s[l]);
                    let cs = cl * sl;
                    npp[l] = cl * cl * app[l] - 2.0 * cs * apq[l] + sl * sl * aqq[l];
                    nqq[l] = sl * sl * app[l] + 2.0 * cs * apq[l] + cl * cl * aqq[l];
                    npq[l] = cs * (app[l] - aqq[l]) + (cl * cl - sl * sl) * apq[l];
                }
                a[p * n + p] = npp;
                a[q * n + q] = nqq;
                a[p * n + q] = npq;
                a[q * n + p] = npq;
                // Eigenvectors stored as rows (`v[k·n + t]` = component t of vector k): the
                // update of vectors p and q reads and writes two contiguous rows.
                let (head, tail) = v.split_at_mut(q * n);
                for (vp, vq) in head[p * n..(p + 1) * n].iter_mut().zip(&mut tail[..n]) {
                    let (vtp, vtq) = (*vp, *vq);
                    for l in 0..LANES {
                        vp[l] = c[l] * vtp[l] - s[l] * vtq[l];
                        vq[l] = s[l] * vtp[l] + c[l] * vtq[l];
                    }
                }
            }
        }
    }
}

/// A value in `[−0.5, 0.5)` from a 64-bit linear congruential generator: the random inputs of
/// the lane kernels' tests (here, `gain.rs` and `ensemble_space.rs`).
#[cfg(test)]
pub(super) fn test_uniform(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ensemble_space::jacobi_eigen;

    /// The two-row dot product equals two one-row products bit for bit, on odd and even
    /// lengths (with and without fused multiply-adds).
    #[test]
    fn two_row_dots_equal_one_row_dots_exactly() {
        let mut seed = 7u64;
        for len in [0usize, 1, 2, 7, 20, 29] {
            let mut rows = [vec![], vec![], vec![]];
            for r in rows.iter_mut() {
                *r = (0..len)
                    .map(|_| std::array::from_fn(|_| test_uniform(&mut seed)))
                    .collect::<Vec<V>>();
            }
            let (a, b) = dot2_lanes::<true>(&rows[0], &rows[1], &rows[2]);
            assert_eq!(a, dot_lanes::<true>(&rows[0], &rows[2]), "len {len}");
            assert_eq!(b, dot_lanes::<true>(&rows[1], &rows[2]), "len {len}");
            let (a, b) = dot2_lanes::<false>(&rows[0], &rows[1], &rows[2]);
            assert_eq!(a, dot_lanes::<false>(&rows[0], &rows[2]), "len {len}");
            assert_eq!(b, dot_lanes::<false>(&rows[1], &rows[2]), "len {len}");
        }
    }

    /// The blocked Cholesky equals the row-at-a-time factorization bit for bit (sizes below,
    /// at and around the block of rows), and factors the matrix.
    #[test]
    fn blocked_cholesky_equals_the_row_at_a_time_factorization() {
        fn reference<const FMA: bool>(mat: &mut [V], k: usize) {
            for j in 0..k {
                let mut s = mat[j * k + j];
                let mut acc = [0.0f32; LANES];
                for t in 0..j {
                    let v = mat[j * k + t];
                    fmadd::<FMA>(&mut acc, &v, &v);
                }
                let mut dj = [0.0f32; LANES];
                for l in 0..LANES {
                    s[l] -= acc[l];
                    dj[l] = s[l].max(1e-12).sqrt();
                }
                mat[j * k + j] = dj;
                for r in j + 1..k {
                    let mut acc = [0.0f32; LANES];
                    for t in 0..j {
                        fmadd::<FMA>(&mut acc, &mat[r * k + t], &mat[j * k + t]);
                    }
                    for l in 0..LANES {
                        mat[r * k + j][l] = (mat[r * k + j][l] - acc[l]) / dj[l];
                    }
                }
            }
        }
        let mut seed = 11u64;
        for k in [1usize, 3, 4, 5, 9, 20, 23] {
            // I + BBᵀ with a random k × 6 B per lane (lower triangle).
            let b: Vec<V> = (0..k * 6)
                .map(|_| std::array::from_fn(|_| test_uniform(&mut seed)))
                .collect();
            let mut m = vec![[0.0f32; LANES]; k * k];
            for r in 0..k {
                for c in 0..=r {
                    m[r * k + c] = dot_lanes::<true>(&b[r * 6..r * 6 + 6], &b[c * 6..c * 6 + 6]);
                    if r == c {
                        m[r * k + c].iter_mut().for_each(|v| *v += 1.0);
                    }
                }
            }
            let (mut plain, mut want_plain) = (m.clone(), m.clone());
            cholesky_lanes::<false>(&mut plain, k);
            reference::<false>(&mut want_plain, k);
            let (mut got, mut want) = (m.clone(), m.clone());
            cholesky_lanes::<true>(&mut got, k);
            reference::<true>(&mut want, k);
            for r in 0..k {
                for c in 0..=r {
                    assert_eq!(got[r * k + c], want[r * k + c], "k {k}, [{r}, {c}]");
                    let (p, w) = (plain[r * k + c], want_plain[r * k + c]);
                    assert_eq!(p, w, "k {k}, [{r}, {c}], no FMA");
                }
            }
            // L Lᵀ rebuilds the matrix.
            for r in 0..k {
                for c in 0..=r {
                    for l in 0..LANES {
                        let back: f32 =
                            (0..=c).map(|t| got[r * k + t][l] * got[c * k + t][l]).sum();
                        let want = m[r * k + c][l];
                        assert!(
                            (back - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "k {k} lane {l}"
                        );
                    }
                }
            }
        }
    }

    /// Sixteen symmetric matrices (odd size; lane 3 already diagonal, so it converges at once
    /// and takes identity rotations while the others sweep): the lane solver's eigenvalues equal
    /// the scalar solver's, its eigenvectors are orthonormal and rebuild each matrix.
    #[test]
    fn lane_jacobi_equals_the_scalar_solver_per_lane() {
        let n = 13;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = || test_uniform(&mut seed);
        let mut mats = vec![vec![0.0f32; n * n]; LANES];
        for (l, m) in mats.iter_mut().enumerate() {
            for i in 0..n {
                for j in 0..=i {
                    let v = if l == 3 && i != j { 0.0 } else { rand() };
                    m[i * n + j] = v;
                    m[j * n + i] = v;
                }
                m[i * n + i] += (n - 1) as f32 + l as f32;
            }
        }
        let mut a: Vec<V> = (0..n * n)
            .map(|e| std::array::from_fn(|l| mats[l][e]))
            .collect();
        let mut v = Vec::new();
        jacobi_lanes(&mut a, &mut v, n);
        for (l, m) in mats.iter().enumerate() {
            let (mut s, mut sv) = (m.clone(), vec![0.0f32; n * n]);
            jacobi_eigen(&mut s, &mut sv, n);
            let mut want: Vec<f32> = (0..n).map(|k| s[k * n + k]).collect();
            let mut got: Vec<f32> = (0..n).map(|k| a[k * n + k][l]).collect();
            want.sort_by(f32::total_cmp);
            got.sort_by(f32::total_cmp);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs(),
                    "lane {l}: eigenvalue {g} vs {w}"
                );
            }
            for i in 0..n {
                for j in 0..n {
                    let dot: f32 = (0..n).map(|k| v[k * n + i][l] * v[k * n + j][l]).sum();
                    let back: f32 = (0..n)
                        .map(|k| a[k * n + k][l] * v[k * n + i][l] * v[k * n + j][l])
                        .sum();
                    let id = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - id).abs() < 1e-5, "lane {l}: VᵀV[{i},{j}] = {dot}");
                    assert!(
                        (back - m[i * n + j]).abs() < 1e-4 * (n as f32),
                        "lane {l}: [{i},{j}]"
                    );
                }
            }
        }
    }
}
