//! CPU twins of the covariance-guidance kernels: the banded-gain step of
//! `shaders/gain_guidance.wgsl` ([`crate::backend::GainStep`], parallel over members) and the
//! local gains of `shaders/gain_local.wgsl` ([`crate::backend::LocalGains`], parallel over
//! components).

use rayon::prelude::*;

use super::lanes::{cholesky_lanes, dot2_lanes, dot_lanes, fmadd, solve_lanes, LANES, V};
use super::{Cpu, CpuBuffer};
use crate::backend::{check_gain_step, DeviceBuffer, GainShape, GainStep};
use crate::error::{Error, Result};
use crate::observe::{Observe, Pointwise};

pub(crate) fn gain_step(cpu: &Cpu, state: &mut CpuBuffer, g: &GainStep<'_, Cpu>) -> Result<()> {
    let (m, w) = check_gain_step(state, g)?;
    let (n, d) = (state.rows(), state.cols());
    if n == 0 || d == 0 {
        return Ok(());
    }
    let hg = g.h_gain;
    let parallel = cpu.parts_for(n * d * w.max(1)) > 1;
    // The innovations of every member, observation-major (r[q·np + k], rows padded with zeros
    // to whole vectors), once per observation.
    let np = n.next_multiple_of(MEMBER_CHUNK);
    let mut rbuf = cpu
        .rows_scratch
        .lock()
        .map_err(|_| Error::Gpu("CPU scratch lock poisoned by an earlier panic".into()))?;
    let r = super::grow(&mut rbuf, if hg != 0.0 { m * np } else { 0 });
    let inn = Innovations {
        n,
        np,
        d,
        y: g.y.as_slice(),
        endpoint: g.endpoint.as_slice(),
        op: g.observe,
        mean: g.mean_obs.map(|(b, a)| (b.as_slice(), a)),
        clip: g
            .clip
            .as_ref()
            .map(|c| (&c.innovation_var.as_slice()[m..2 * m], c.scale)),
    };
    if hg != 0.0 {
        let one = |(blk, out): (usize, &mut [f32])| run_innovations(&inn, blk, out);
        if parallel {
            r.par_chunks_mut(np * QB).enumerate().for_each(one);
        } else {
            r.chunks_mut(np * QB).enumerate().for_each(one);
        }
    }
    let apply = Apply {
        n,
        np,
        d,
        m,
        w,
        r,
        gain: &g.gain.as_slice()[g.table * d * w..(g.table + 1) * d * w],
        index: g.index.as_slice(),
        velocity: g.velocity.as_slice(),
        hv: g.h_velocity,
        hg,
        state: super::flow::SyncPtr(state.as_mut_slice().as_mut_ptr()),
    };
    let blocks = d.div_ceil(STEP_BLOCK);
    if parallel {
        (0..blocks)
            .into_par_iter()
            .for_each_init(StepScratch::default, |sc, b| run_apply(&apply, sc, b));
    } else {
        let mut sc = StepScratch::default();
        (0..blocks).for_each(|b| run_apply(&apply, &mut sc, b));
    }
    Ok(())
}

/// Observations per block of the innovations of [`gain_step`].
const QB: usize = 64;

/// What the innovations of [`gain_step`] read.
struct Innovations<'a> {
    n: usize,
    /// Row length of the innovations (`n` padded to whole vectors).
    np: usize,
    d: usize,
    y: &'a [f32],
    endpoint: &'a [f32],
    op: Observe,
    /// `(h̄, anomaly weight)` of the innovation split.
    mean: Option<(&'a [f32], f32)>,
    /// `(innovation variances, scale)` of the innovation bound.
    clip: Option<(&'a [f32], f32)>,
}

/// The innovations of observations `blk·QB ..` into `out` (`r[j·np + k]`, padding members 0):
/// per member, h at the block's components (a contiguous, vectorizable run when every
/// component is observed), then scattered into `out`.
#[inline(always)]
fn innovations_block(c: &Innovations<'_>, blk: usize, out: &mut [f32]) {
    let (n, d, op) = (c.n, c.d, c.op);
    let q0 = blk * QB;
    let nq = out.len() / c.np;
    let mut hx = [0.0f32; QB];
    for k in 0..n {
        let row = &c.endpoint[k * d..(k + 1) * d];
        if op.every == 1 {
            let c0 = op.component(q0);
            for (h, &x) in hx[..nq].iter_mut().zip(&row[c0..c0 + nq]) {
                *h = h_fast(op.pointwise, x);
            }
        } else {
            for (j, h) in hx[..nq].iter_mut().enumerate() {
                *h = h_fast(op.pointwise, row[op.component(q0 + j)]);
            }
        }
        for (j, &h) in hx[..nq].iter().enumerate() {
            let q = q0 + j;
            let r = match c.mean {
                Some((hb, a)) => (c.y[q] - hb[q]) - a * (h - hb[q]),
                None => c.y[q] - h,
            };
            out[j * c.np + k] = match c.clip {
                Some((var, scale)) => {
                    let bound = scale * var[q].max(0.0).sqrt();
                    r.clamp(-bound, bound)
                }
                None => r,
            };
        }
    }
    // The padding members (summed by the update, never written back): zero, not stale data.
    if c.np > n {
        for row in out.chunks_exact_mut(c.np) {
            row[n..].fill(0.0);
        }
    }
}

/// What the update of [`gain_step`] reads and writes.
struct Apply<'a> {
    n: usize,
    /// Row length of `r` (`n` padded to whole vectors).
    np: usize,
    d: usize,
    m: usize,
    w: usize,
    /// Innovations, observation-major (`m × np`, padding 0).
    r: &'a [f32],
    gain: &'a [f32],
    index: &'a [f32],
    velocity: &'a [f32],
    hv: f32,
    hg: f32,
    state: super::flow::SyncPtr,
}

/// The observation index stored (as an exact integer below `m`, written by the host) in a
/// window table, clamped below `m`. Below 2²³ by the exponent trick (the integer is the
/// mantissa of `q + 2²³`: one add instead of a saturating float-to-integer conversion).
#[inline(always)]
fn obs_index(qf: f32, m: usize) -> usize {
    const TWO23: f32 = 8_388_608.0;
    let q = if m <= 1 << 23 {
        ((qf + TWO23).to_bits() & 0x007f_ffff) as usize
    } else {
        qf as usize
    };
    q.min(m - 1)
}

/// Per-task scratch of [`gain_step`]'s update.
#[derive(Default)]
struct StepScratch {
    /// `K r` of the block's components (`(i1 − i0) × n`).
    acc: Vec<f32>,
    /// One component's nonzero gains and the offsets of their innovation rows.
    entries: Vec<(f32, usize)>,
}

/// Components `b·STEP_BLOCK ..` of every member: the gain times the innovations (vectorized
/// over members, in `acc`), then `x ← x + hv·v + hg·(K r)`.
#[inline(always)]
fn apply_block<const AVX: bool>(c: &Apply<'_>, sc: &mut StepScratch, b: usize) {
    let (n, d, w) = (c.n, c.d, c.w);
    let (i0, i1) = (b * STEP_BLOCK, ((b + 1) * STEP_BLOCK).min(d));
    let acc = super::grow(&mut sc.acc, (i1 - i0) * n);
    acc.iter_mut().for_each(|v| *v = 0.0);
    if c.hg != 0.0 {
        for (i, a) in (i0..i1).zip(acc.chunks_mut(n)) {
            sc.entries.clear();
            for (&gk, &qf) in c.gain[i * w..(i + 1) * w]
                .iter()
                .zip(&c.index[i * w..(i + 1) * w])
            {
                if gk != 0.0 {
                    let q = obs_index(qf, c.m);
                    sc.entries.push((gk, q * c.np));
                }
            }
            // Up to four vectors of members per pass over the entries, their sums in
            // registers (every member sums its entries in window order).
            let mut k0 = 0;
            while k0 < n {
                let left = (n - k0).div_ceil(MEMBER_CHUNK);
                let out = &mut a[k0..];
                k0 += match left {
                    1 => kr::<AVX, 1>(c.r, &sc.entries, k0, out),
                    2 => kr::<AVX, 2>(c.r, &sc.entries, k0, out),
                    3 => kr::<AVX, 3>(c.r, &sc.entries, k0, out),
                    _ => kr::<AVX, 4>(c.r, &sc.entries, k0, out),
                };
            }
        }
    }
    for k in 0..n {
        for i in i0..i1 {
            let e = k * d + i;
            // SAFETY: blocks own disjoint column ranges [i0, i1) of every row, and `e` is
            // inside the n × d state.
            unsafe {
                let p = c.state.get().add(e);
                *p = *p + c.hv * c.velocity[e] + c.hg * acc[(i - i0) * n + k];
            }
        }
    }
}

/// [`gain_times_innovations`] in AVX2 vectors when `AVX` (the same arithmetic).
#[inline(always)]
fn kr<const AVX: bool, const C: usize>(
    r: &[f32],
    entries: &[(f32, usize)],
    k0: usize,
    out: &mut [f32],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only in `apply_avx2`, which runs on processors with AVX2.
        return unsafe { gain_times_innovations_avx2::<C>(r, entries, k0, out) };
    }
    gain_times_innovations::<C>(r, entries, k0, out)
}

/// [`gain_times_innovations`] with the `C` vectors of sums held in AVX2 registers (the same
/// products and sums, in the same order).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn gain_times_innovations_avx2<const C: usize>(
    r: &[f32],
    entries: &[(f32, usize)],
    k0: usize,
    out: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let mut s = [_mm256_setzero_ps(); C];
    for &(g, o) in entries {
        let row = &r[o + k0..o + k0 + C * MEMBER_CHUNK];
        let gv = _mm256_set1_ps(g);
        for (j, sj) in s.iter_mut().enumerate() {
            // SAFETY: `row` holds C·8 floats, so 8 from offset 8j are in bounds.
            let v = unsafe { _mm256_loadu_ps(row.as_ptr().add(j * MEMBER_CHUNK)) };
            *sj = _mm256_add_ps(*sj, _mm256_mul_ps(gv, v));
        }
    }
    let mut buf = [0.0f32; 4 * MEMBER_CHUNK];
    for (j, sj) in s.iter().enumerate() {
        // SAFETY: C ≤ 4, so 8 floats from offset 8j are inside `buf`.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr().add(j * MEMBER_CHUNK), *sj) };
    }
    for (dst, &v) in out.iter_mut().zip(&buf[..C * MEMBER_CHUNK]) {
        *dst = v;
    }
    C * MEMBER_CHUNK
}

/// Members per vector of [`apply_block`] (the innovation rows are padded to a multiple).
const MEMBER_CHUNK: usize = 8;

/// `out[j] = Σ_e g_e·r[o_e + k0 + j]` over `entries = (g_e, o_e)` in order, for the members
/// `k0 ..` of `C` vectors (the padding members computed, not written); returns the members
/// covered.
#[inline(always)]
fn gain_times_innovations<const C: usize>(
    r: &[f32],
    entries: &[(f32, usize)],
    k0: usize,
    out: &mut [f32],
) -> usize {
    let mut s = [[0.0f32; MEMBER_CHUNK]; C];
    for &(g, o) in entries {
        let row = &r[o + k0..o + k0 + C * MEMBER_CHUNK];
        for (sc, rc) in s.iter_mut().zip(row.chunks_exact(MEMBER_CHUNK)) {
            for (x, &v) in sc.iter_mut().zip(rc) {
                *x += g * v;
            }
        }
    }
    for (dst, &v) in out.iter_mut().zip(s.iter().flatten()) {
        *dst = v;
    }
    C * MEMBER_CHUNK
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn innovations_avx2(c: &Innovations<'_>, blk: usize, out: &mut [f32]) {
    innovations_block(c, blk, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn apply_avx2(c: &Apply<'_>, sc: &mut StepScratch, b: usize) {
    apply_block::<true>(c, sc, b)
}

/// [`innovations_block`] compiled for AVX2 when the processor has it (the same arithmetic, no
/// fused multiply-adds: only the vector width differs).
fn run_innovations(c: &Innovations<'_>, blk: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time).
        unsafe { innovations_avx2(c, blk, out) };
        return;
    }
    innovations_block(c, blk, out)
}

/// [`apply_block`] compiled for AVX2 when the processor has it (same arithmetic).
fn run_apply(c: &Apply<'_>, sc: &mut StepScratch, b: usize) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time).
        unsafe { apply_avx2(c, sc, b) };
        return;
    }
    apply_block::<false>(c, sc, b)
}

/// One column block of the first moment pass of [`local_gains`].
struct MomentSums<'a> {
    x: &'a [f32],
    xh: &'a [f32],
    n: usize,
    d: usize,
    op: Observe,
    /// First column of the block.
    c0: usize,
    /// Also the forecast's sums of squared deviations.
    with_sq: bool,
}

/// Per column, in f64 and in member order: the forecast mean `fm`, the endpoint mean `ln`,
/// the sum of `h(x̂₁)` and (with `with_sq`) the forecast's sum of squared deviations.
#[inline(always)]
fn moments_block(
    c: &MomentSums<'_>,
    fm: &mut [f64],
    ln: &mut [f64],
    hs: &mut [f64],
    sq: &mut [f64],
) {
    let (n, d, c0, cols) = (c.n, c.d, c.c0, fm.len());
    let inv_n = 1.0 / n as f64;
    for k in 0..n {
        let xr = &c.x[k * d + c0..k * d + c0 + cols];
        let hr = &c.xh[k * d + c0..k * d + c0 + cols];
        for j in 0..cols {
            fm[j] += xr[j] as f64;
            ln[j] += hr[j] as f64;
            hs[j] += h_fast(c.op.pointwise, hr[j]) as f64;
        }
    }
    fm.iter_mut().for_each(|v| *v *= inv_n);
    ln.iter_mut().for_each(|v| *v *= inv_n);
    if c.with_sq {
        for k in 0..n {
            let xr = &c.x[k * d + c0..k * d + c0 + cols];
            for j in 0..cols {
                sq[j] += (xr[j] as f64 - fm[j]).powi(2);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn moments_avx2(
    c: &MomentSums<'_>,
    fm: &mut [f64],
    ln: &mut [f64],
    hs: &mut [f64],
    sq: &mut [f64],
) {
    moments_block(c, fm, ln, hs, sq)
}

/// [`moments_block`] compiled for AVX2 when the processor has it (same arithmetic).
fn run_moments(c: &MomentSums<'_>, fm: &mut [f64], ln: &mut [f64], hs: &mut [f64], sq: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time).
        unsafe { moments_avx2(c, fm, ln, hs, sq) };
        return;
    }
    moments_block(c, fm, ln, hs, sq)
}

/// Columns (or observations) per task of the moment passes of [`local_gains`].
const MOMENT_COLS: usize = 256;

/// `hb[j] = mean_k h(xh[k, comp(q0 + j)])`, summed in f64 in member order (a contiguous,
/// vectorizable run when every component is observed).
#[inline(always)]
fn mean_obs_block(xh: &[f32], n: usize, d: usize, op: Observe, q0: usize, hb: &mut [f32]) {
    let mut hs = [0.0f64; MOMENT_COLS];
    let hs = &mut hs[..hb.len()];
    for k in 0..n {
        let row = &xh[k * d..(k + 1) * d];
        if op.every == 1 {
            let c0 = op.component(q0);
            for (s, &x) in hs.iter_mut().zip(&row[c0..c0 + hb.len()]) {
                *s += h_fast(op.pointwise, x) as f64;
            }
        } else {
            for (j, s) in hs.iter_mut().enumerate() {
                *s += h_fast(op.pointwise, row[op.component(q0 + j)]) as f64;
            }
        }
    }
    let inv_n = 1.0 / n as f64;
    for (v, s) in hb.iter_mut().zip(hs.iter()) {
        *v = (s * inv_n) as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn mean_obs_avx2(xh: &[f32], n: usize, d: usize, op: Observe, q0: usize, hb: &mut [f32]) {
    mean_obs_block(xh, n, d, op, q0, hb)
}

/// [`mean_obs_block`] compiled for AVX2 when the processor has it (same arithmetic).
fn run_mean_obs(xh: &[f32], n: usize, d: usize, op: Observe, q0: usize, hb: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time).
        unsafe { mean_obs_avx2(xh, n, d, op, q0, hb) };
        return;
    }
    mean_obs_block(xh, n, d, op, q0, hb)
}

/// `h(x)`, with the branch-free f32 arctan of the flow kernels (within 2 ulp of libm's).
#[inline(always)]
fn h_fast(p: Pointwise, x: f32) -> f32 {
    match p {
        Pointwise::Arctan => super::simd::atan_fast(x),
        _ => p.value(x),
    }
}

/// Components per task of [`gain_step`].
const STEP_BLOCK: usize = 256;

/// The inputs of [`local_gains`], as host slices (row-major, see [`crate::backend::LocalGains`]).
pub struct GainInputs<'a> {
    /// Forecast ensemble (`n × d`).
    pub x: &'a [f32],
    /// Predicted endpoints `x̂₁` (`n × d`).
    pub xh: &'a [f32],
    /// Window observation indices (`d × w`).
    pub index: &'a [f32],
    /// Window tapers (`d × w`, 0 = padding).
    pub taper: &'a [f32],
    /// Sizes.
    pub shape: GainShape,
    /// Observation operator.
    pub observe: Observe,
    /// `σ_y`.
    pub noise_std: f32,
    /// `τ_s` of every stage (one `d × w` table each).
    pub taus: &'a [f32],
}

/// The precision of the twin's algebra (the kernel's; the gain table is written without a
/// conversion, so this stays f32).
type F = f32;

/// What every block of [`local_gains`] reads.
struct Ctx<'a> {
    /// Scaled forecast anomalies, row-major like the ensemble (`n × d`).
    ar: &'a [F],
    /// `h'(x̄̂₁[comp(q)])/σ` per observation.
    dh: &'a [F],
    index: &'a [f32],
    taper: &'a [f32],
    op: Observe,
    n: usize,
    d: usize,
    m: usize,
    w: usize,
    taus: &'a [f32],
    inv_sigma: F,
    /// Solve in observation space (`w ≤ n`) rather than ensemble space.
    obs_space: bool,
}

/// Per-thread scratch of [`local_gains`] (allocated once per thread, not per component).
#[derive(Default)]
struct Scratch {
    /// Window component of every entry and lane.
    comp: Vec<[usize; LANES]>,
    /// `√ρ·h'/σ` of every entry and lane (0 for padding).
    s: Vec<V>,
    /// `√ρ` of every entry and lane.
    sq: Vec<V>,
    /// Gathered anomalies (observation space: `w × n`; ensemble space: `n`).
    a: Vec<V>,
    /// Anomalies of the block's own components (`n`).
    ai: Vec<V>,
    /// The stage-independent matrix (`S` or `G`, `w × w` or `n × n`, lower triangle).
    raw: Vec<V>,
    /// The system matrix of a stage, `I + τ·raw`, factored in place.
    mat: Vec<V>,
    /// The right-hand side shared by the stages.
    rhs0: Vec<V>,
    /// Right-hand side, then solution.
    rhs: Vec<V>,
    /// Ensemble space: `u_eᵀv` per entry.
    dots: Vec<V>,
}

/// The first of the lanes' components when they are consecutive (a ring observed everywhere,
/// away from its seam), so that a row's values load as one contiguous run.
#[inline(always)]
fn consecutive(comp: &[usize; LANES]) -> Option<usize> {
    let c0 = comp[0];
    (comp[LANES - 1] == c0 + LANES - 1 && (1..LANES).all(|l| comp[l] == c0 + l)).then_some(c0)
}

/// `dst[l] = ar[row + comp[l]]`, one contiguous load when `run` (from [`consecutive`]) says so.
#[inline(always)]
fn gather(ar: &[F], row: usize, comp: &[usize; LANES], run: Option<usize>, dst: &mut V) {
    match run {
        Some(c0) => dst.copy_from_slice(&ar[row + c0..row + c0 + LANES]),
        None => {
            for l in 0..LANES {
                dst[l] = ar[row + comp[l]];
            }
        }
    }
}

/// `mat = I + τ·raw` on the lower triangle of a `k × k` matrix (the only part the Cholesky
/// factorization reads; the upper triangle is left as it was).
#[inline(always)]
fn stage_matrix(raw: &[V], mat: &mut Vec<V>, k: usize, tau: F) {
    mat.resize(k * k, [0.0; LANES]);
    for r in 0..k {
        for c in 0..=r {
            let (x, diag) = (raw[r * k + c], if c == r { 1.0 } else { 0.0 });
            let mut y = [0.0; LANES];
            for l in 0..LANES {
                y[l] = tau * x[l] + diag;
            }
            mat[r * k + c] = y;
        }
    }
}

/// `out[e] = Σ_r u[r·w + e]·v[r]` for every entry `e` (summed over `r` in order, four entries
/// at a time with their accumulators in registers).
#[inline(always)]
fn entry_dots<const FMA: bool>(u: &[V], v: &[V], w: usize, out: &mut Vec<V>) {
    out.clear();
    out.resize(w, [0.0; LANES]);
    const E: usize = 4;
    let mut e0 = 0;
    while e0 + E <= w {
        let mut acc = [[0.0f32; LANES]; E];
        for (r, vr) in v.iter().enumerate() {
            for (j, a) in acc.iter_mut().enumerate() {
                fmadd::<FMA>(a, &u[r * w + e0 + j], vr);
            }
        }
        out[e0..e0 + E].copy_from_slice(&acc);
        e0 += E;
    }
    for e in e0..w {
        let mut acc = [0.0f32; LANES];
        for (r, vr) in v.iter().enumerate() {
            fmadd::<FMA>(&mut acc, &u[r * w + e], vr);
        }
        out[e] = acc;
    }
}

/// The gains of components `i0 .. i0 + lanes` of every stage: stage `s` into the table at
/// `out + s·d·w` (rows `i0 ..`, `lanes × w` values), one component per lane. The
/// stage-independent matrix (`O(n²·w)`) is built once; each stage factors `I + τ_s·raw`.
#[inline(always)]
fn block<const FMA: bool>(c: &Ctx<'_>, i0: usize, lanes: usize, sc: &mut Scratch, out: *mut f32) {
    let table = |s: usize| {
        // SAFETY: `out` points at `S` tables of `d × w` values; rows `i0 .. i0 + lanes` of each
        // belong to this block alone (blocks own disjoint component ranges).
        unsafe { std::slice::from_raw_parts_mut(out.add(s * c.d * c.w + i0 * c.w), lanes * c.w) }
    };
    let (n, w, m) = (c.n, c.w, c.m);
    sc.comp.resize(w, [0; LANES]);
    sc.s.resize(w, [0.0; LANES]);
    sc.sq.resize(w, [0.0; LANES]);
    sc.ai.resize(n, [0.0; LANES]);
    // Window entries: ρ and h'/σ per lane (the square roots below, one vector at a time).
    for l in 0..LANES {
        let i = i0 + l.min(lanes - 1);
        for e in 0..w {
            let rho = if l < lanes { c.taper[i * w + e] } else { 0.0 };
            if rho > 0.0 {
                let q = obs_index(c.index[i * w + e], m);
                sc.comp[e][l] = c.op.component(q);
                sc.sq[e][l] = rho as F;
                sc.s[e][l] = c.dh[q];
            } else {
                sc.comp[e][l] = i;
                sc.sq[e][l] = 0.0;
                sc.s[e][l] = 0.0;
            }
        }
    }
    for (sq, s) in sc.sq.iter_mut().zip(sc.s.iter_mut()) {
        for l in 0..LANES {
            sq[l] = sq[l].sqrt();
            s[l] *= sq[l];
        }
    }
    // The block's own anomalies (lanes are consecutive components unless the block is short).
    let own: [usize; LANES] = std::array::from_fn(|l| i0 + l.min(lanes - 1));
    let run = consecutive(&own);
    for r in 0..n {
        gather(c.ar, r * c.d, &own, run, &mut sc.ai[r]);
    }
    if c.obs_space {
        // (I + τ S) z = r, S_ef = s_e s_f a_eᵀa_f, r_e = s_e a_eᵀa_i; gain = √ρ_e/σ · z_e.
        sc.a.resize(w * n, [0.0; LANES]);
        for e in 0..w {
            let run = consecutive(&sc.comp[e]);
            for r in 0..n {
                gather(c.ar, r * c.d, &sc.comp[e], run, &mut sc.a[e * n + r]);
            }
        }
        sc.raw.resize(w * w, [0.0; LANES]);
        sc.rhs0.resize(w, [0.0; LANES]);
        for e in 0..w {
            let ae = &sc.a[e * n..(e + 1) * n];
            let se = sc.s[e];
            let mut put = |f: usize, acc: V| {
                let sf = sc.s[f];
                let cell = &mut sc.raw[e * w + f];
                for l in 0..LANES {
                    cell[l] = se[l] * sf[l] * acc[l];
                }
            };
            let mut f = 0;
            while f < e {
                let (x0, x1) = (&sc.a[f * n..(f + 1) * n], &sc.a[(f + 1) * n..(f + 2) * n]);
                let (g0, g1) = dot2_lanes::<FMA>(x0, x1, ae);
                put(f, g0);
                put(f + 1, g1);
                f += 2;
            }
            if f == e {
                put(e, dot_lanes::<FMA>(ae, ae));
            }
            let acc = dot_lanes::<FMA>(ae, &sc.ai);
            let se = sc.s[e];
            for (rv, (sv, av)) in sc.rhs0[e].iter_mut().zip(se.iter().zip(acc)) {
                *rv = sv * av;
            }
        }
        for (st, &tau) in c.taus.iter().enumerate() {
            stage_matrix(&sc.raw, &mut sc.mat, w, tau as F);
            cholesky_lanes::<FMA>(&mut sc.mat, w);
            sc.rhs.clear();
            sc.rhs.extend_from_slice(&sc.rhs0);
            solve_lanes::<FMA>(&sc.mat, w, &mut sc.rhs);
            write_gains(&sc.sq, c.inv_sigma, &mut sc.rhs, lanes, table(st));
        }
    } else {
        // (I + τ G) v = a_i, G = Σ_e u_e u_eᵀ with u_e = s_e a_e (gathered row-major:
        // ut[r·w + e]); gain = √ρ_e/σ · u_eᵀv.
        sc.a.resize(n * w, [0.0; LANES]);
        for e in 0..w {
            let (f, run) = (sc.s[e], consecutive(&sc.comp[e]));
            for r in 0..n {
                let mut v = [0.0; LANES];
                gather(c.ar, r * c.d, &sc.comp[e], run, &mut v);
                for l in 0..LANES {
                    v[l] *= f[l];
                }
                sc.a[r * w + e] = v;
            }
        }
        sc.raw.resize(n * n, [0.0; LANES]);
        for r in 0..n {
            let ur = &sc.a[r * w..(r + 1) * w];
            let mut t = 0;
            while t < r {
                let (x0, x1) = (&sc.a[t * w..(t + 1) * w], &sc.a[(t + 1) * w..(t + 2) * w]);
                let (g0, g1) = dot2_lanes::<FMA>(x0, x1, ur);
                sc.raw[r * n + t] = g0;
                sc.raw[r * n + t + 1] = g1;
                t += 2;
            }
            if t == r {
                sc.raw[r * n + r] = dot_lanes::<FMA>(ur, ur);
            }
        }
        for (st, &tau) in c.taus.iter().enumerate() {
            stage_matrix(&sc.raw, &mut sc.mat, n, tau as F);
            cholesky_lanes::<FMA>(&mut sc.mat, n);
            sc.rhs.clear();
            sc.rhs.extend_from_slice(&sc.ai);
            solve_lanes::<FMA>(&sc.mat, n, &mut sc.rhs);
            entry_dots::<FMA>(&sc.a, &sc.rhs, w, &mut sc.dots);
            write_gains(&sc.sq, c.inv_sigma, &mut sc.dots, lanes, table(st));
        }
    }
}

/// `out[l·w + e] = √ρ_e·(1/σ)·z_e` for the first `lanes` lanes: the products lane-wise in
/// place in `z`, then transposed into the table rows.
#[inline(always)]
fn write_gains(sq: &[V], inv_sigma: F, z: &mut [V], lanes: usize, out: &mut [f32]) {
    let w = z.len();
    for (ze, se) in z.iter_mut().zip(sq) {
        for l in 0..LANES {
            ze[l] *= se[l] * inv_sigma;
        }
    }
    for (l, row) in out.chunks_exact_mut(w).take(lanes).enumerate() {
        for (o, ze) in row.iter_mut().zip(z.iter()) {
            *o = ze[l];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(c: &Ctx<'_>, i0: usize, lanes: usize, sc: &mut Scratch, out: *mut f32) {
    block::<true>(c, i0, lanes, sc, out)
}

fn run_block(c: &Ctx<'_>, i0: usize, lanes: usize, sc: &mut Scratch, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time).
        unsafe { block_avx2(c, i0, lanes, sc, out) };
        return;
    }
    block::<false>(c, i0, lanes, sc, out)
}

/// CPU twin of the local-gain kernels (`shaders/gain_local.wgsl`): the gains of the
/// covariance-guidance stages `g.taus` into `gain` (`S` tables of `d × w`, the
/// stage-independent matrix built once per component) and the mean observed endpoint into
/// `hbar` (`m`). Means are summed in f64, the algebra runs in f32 like the kernel's, sixteen
/// components at a time, one per lane, in whichever space
/// is smaller: with windows of `w ≤ n` observations in observation space (the Woodbury form
/// `K_i = (1/σ) D^{1/2}(I + τ D^{1/2} BᵀB D^{1/2})⁻¹ D^{1/2} Bᵀ a_i`, a `w × w` Cholesky),
/// otherwise in ensemble space (`(I + τ G_i)⁻¹ a_i`, `n × n`) like the f64 reference
/// [`crate::filter::covariance::local_gains`]; both are the same matrix identity. Padding
/// entries (`ρ = 0`) get `s = 0`: an identity row in observation space, no term in `G_i`.
pub fn local_gains(g: &GainInputs<'_>, gain: &mut [f32], hbar: &mut [f32]) -> Result<()> {
    let GainShape { n, d, m, w } = g.shape;
    let op = g.observe;
    let len_ok = g.x.len() == n * d
        && g.xh.len() == n * d
        && g.index.len() == d * w
        && g.taper.len() == d * w
        && (g.taus.is_empty() || gain.len() == g.taus.len() * d * w)
        && (hbar.len() == m || hbar.len() == 2 * m);
    if !len_ok || n < 2 {
        return Err(Error::shape(
            "covariance-guidance gain inputs",
            format!(
                "n = {n} ≥ 2, d = {d}, w = {w}, m = {m}, S = {}",
                g.taus.len()
            ),
            "buffers of other lengths".to_string(),
        ));
    }
    if d == 0 || w == 0 || m == 0 {
        if !g.taus.is_empty() {
            gain.iter_mut().for_each(|v| *v = 0.0);
        }
        return Ok(());
    }
    // Per component, in f64 and in member order, in parallel over blocks of columns read row
    // by row: the forecast mean, the endpoint mean (the linearization point), the sum of
    // h(x̂₁) and the forecast's sum of squared deviations.
    const COLS: usize = MOMENT_COLS;
    let inv_n = 1.0 / n as f64;
    if g.taus.is_empty() && hbar.len() == m {
        // Only h̄ (a later stage of a shared linearization): the same sums of h(x̂₁), on the
        // observed components alone.
        hbar.par_chunks_mut(COLS)
            .enumerate()
            .for_each(|(blk, hb)| run_mean_obs(g.xh, n, d, op, blk * COLS, hb));
        return Ok(());
    }
    let mut fmean = vec![0.0f64; d];
    let mut lin = vec![0.0f64; d];
    let mut hsum = vec![0.0f64; d];
    let mut sq = vec![0.0f64; d];
    fmean
        .par_chunks_mut(COLS)
        .zip(lin.par_chunks_mut(COLS))
        .zip(hsum.par_chunks_mut(COLS).zip(sq.par_chunks_mut(COLS)))
        .enumerate()
        .for_each(|(blk, ((fm, ln), (hs, sqv)))| {
            let sums = MomentSums {
                x: g.x,
                xh: g.xh,
                n,
                d,
                op,
                c0: blk * COLS,
                with_sq: hbar.len() == 2 * m,
            };
            run_moments(&sums, fm, ln, hs, sqv);
        });
    // h̄ and h'(x̄̂₁)/σ of every observation, and (when asked for, row 1 of `hbar`) the
    // linearized innovation variance h'(x̄̂₁)²·var(x_f) + σ² of the innovation bound.
    let sigma = g.noise_std as f64;
    let mut dh = vec![0.0 as F; m];
    let (hbar, ivar) = hbar.split_at_mut(m);
    for (q, (hb, dq)) in hbar.iter_mut().zip(dh.iter_mut()).enumerate() {
        let c = op.component(q);
        *hb = (hsum[c] * inv_n) as f32;
        let dhc = op.pointwise.derivative(lin[c] as f32) as f64;
        *dq = (dhc / sigma) as F;
        if let Some(v) = ivar.get_mut(q) {
            let var = sq[c] / (n - 1) as f64;
            *v = (dhc * dhc * var + sigma * sigma) as f32;
        }
    }
    if g.taus.is_empty() {
        return Ok(());
    }
    // Scaled anomalies, row-major like the ensemble: ar[k·d + c] = (x[k, c] − x̄_c)/√(n − 1).
    let scale = 1.0 / ((n - 1) as f64).sqrt();
    let mut ar = vec![0.0 as F; n * d];
    ar.par_chunks_mut(d).enumerate().for_each(|(k, row)| {
        for ((v, &x), &mc) in row.iter_mut().zip(&g.x[k * d..(k + 1) * d]).zip(&fmean) {
            *v = ((x as f64 - mc) * scale) as F;
        }
    });
    let ctx = Ctx {
        ar: &ar,
        dh: &dh,
        index: g.index,
        taper: g.taper,
        op,
        n,
        d,
        m,
        w,
        taus: g.taus,
        inv_sigma: (1.0 / sigma) as F,
        obs_space: w <= n,
    };
    let out = super::flow::SyncPtr(gain.as_mut_ptr());
    (0..d.div_ceil(LANES))
        .into_par_iter()
        .for_each_init(Scratch::default, |sc, blk| {
            let i0 = blk * LANES;
            let lanes = LANES.min(ctx.d - i0);
            run_block(&ctx, i0, lanes, sc, out.get());
        });
    if let Some(e) = gain.iter().position(|v| !v.is_finite()) {
        let (table, e) = (e / (d * w), e % (d * w));
        return Err(Error::NonFinite {
            name: "covariance guidance gain".into(),
            location: format!("stage {}, component {}, entry {}", table + 1, e / w, e % w),
            value: gain[e] as f64,
            hint: "the forecast ensemble overflowed; check the model step".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::lanes::test_uniform as rand;
    use super::*;

    /// Window indices decode exactly (the exponent trick below 2²³, the plain conversion above)
    /// and are clamped below `m`.
    #[test]
    fn observation_indices_decode_exactly_and_clamp() {
        for q in [0usize, 1, 2, 17, 999, 65_535, 1 << 20, (1 << 23) - 1] {
            assert_eq!(obs_index(q as f32, 1 << 23), q);
            assert_eq!(obs_index(q as f32, q + 1), q);
        }
        assert_eq!(obs_index(12.0, 10), 9);
        assert_eq!(obs_index(16_777_216.0, 1 << 25), 16_777_216);
        assert!(obs_index(-3.0, 10) < 10);
        assert!(obs_index(f32::NAN, 10) < 10);
    }

    /// The per-entry dot products equal the row-by-row accumulation bit for bit (odd window
    /// lengths, fewer and more entries than a block).
    #[test]
    fn entry_dots_equal_the_row_by_row_sums_exactly() {
        let mut seed = 5u64;
        for (n, w) in [(3usize, 1usize), (20, 29), (7, 4), (5, 11)] {
            let u: Vec<V> = (0..n * w)
                .map(|_| std::array::from_fn(|_| rand(&mut seed)))
                .collect();
            let v: Vec<V> = (0..n)
                .map(|_| std::array::from_fn(|_| rand(&mut seed)))
                .collect();
            let mut got = Vec::new();
            entry_dots::<true>(&u, &v, w, &mut got);
            let mut plain = Vec::new();
            entry_dots::<false>(&u, &v, w, &mut plain);
            let (mut want, mut want_plain) = (vec![[0.0f32; LANES]; w], vec![[0.0f32; LANES]; w]);
            for (r, vr) in v.iter().enumerate() {
                let ur = &u[r * w..(r + 1) * w];
                for ((a, b), ue) in want.iter_mut().zip(want_plain.iter_mut()).zip(ur) {
                    fmadd::<true>(a, ue, vr);
                    fmadd::<false>(b, ue, vr);
                }
            }
            assert_eq!(got, want, "n {n}, w {w}");
            assert_eq!(plain, want_plain, "n {n}, w {w}, no FMA");
        }
    }

    /// The update's gain-times-innovation sums equal member-by-member sums in window order, bit
    /// for bit, for every number of vectors, on both code paths.
    #[test]
    fn gain_times_innovations_equals_the_member_by_member_sums() {
        let mut seed = 9u64;
        let (m, np) = (13usize, 32usize);
        let r: Vec<f32> = (0..m * np).map(|_| rand(&mut seed)).collect();
        let entries: Vec<(f32, usize)> = [3usize, 0, 12, 7, 7, 5]
            .iter()
            .map(|&q| (rand(&mut seed), q * np))
            .collect();
        let members = |k0: usize, len: usize| -> Vec<f32> {
            (k0..k0 + len)
                .map(|k| {
                    let mut s = 0.0f32;
                    for &(g, o) in &entries {
                        s += g * r[o + k];
                    }
                    s
                })
                .collect()
        };
        for c in 1..=4usize {
            let k0 = 32 - 8 * c;
            let mut out = vec![f32::NAN; 8 * c];
            let covered = match c {
                1 => kr::<false, 1>(&r, &entries, k0, &mut out),
                2 => kr::<false, 2>(&r, &entries, k0, &mut out),
                3 => kr::<false, 3>(&r, &entries, k0, &mut out),
                _ => kr::<false, 4>(&r, &entries, k0, &mut out),
            };
            assert_eq!(covered, 8 * c);
            assert_eq!(out, members(k0, 8 * c), "{c} vectors, portable");
            #[cfg(target_arch = "x86_64")]
            if crate::backend::cpu::simd::has_fma() {
                let mut avx = vec![f32::NAN; 8 * c - 3];
                match c {
                    1 => kr::<true, 1>(&r, &entries, k0, &mut avx),
                    2 => kr::<true, 2>(&r, &entries, k0, &mut avx),
                    3 => kr::<true, 3>(&r, &entries, k0, &mut avx),
                    _ => kr::<true, 4>(&r, &entries, k0, &mut avx),
                };
                assert_eq!(avx, out[..8 * c - 3], "{c} vectors, AVX2 (short output)");
            }
        }
    }
}
