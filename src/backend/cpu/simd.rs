//! Inner loops of the CPU flow kernels, compiled twice: once for the baseline target and once
//! with AVX2 + FMA, chosen at run time. Both variants give results that agree to f32 rounding.
//!
//! The pairwise-distance loop is written with AVX2 intrinsics and register-blocked over
//! 2 members × 4 means (8 accumulators, 6 loads per 8 vector FMAs); the other loops are plain
//! element-wise Rust that the compiler vectorizes inside the `avx2,fma` functions.

use std::sync::OnceLock;

use crate::observe::Pointwise;

/// Lanes of the explicit accumulators of the portable distance loop (four 256-bit registers).
const LANES: usize = 32;

/// True when the AVX2 + FMA variants can run on this processor.
pub fn has_fma() -> bool {
    static FMA: OnceLock<bool> = OnceLock::new();
    *FMA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Runs `$body` (an expression using `$fma` as a `const bool`) in an `avx2,fma` function when
/// the processor has them, else in a baseline one.
macro_rules! dispatch {
    ($name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? => $impl:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            $impl::<true>($($arg),*)
        }
    };
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

// ---- pairwise distances ----------------------------------------------------------------------

/// `Σ_k (a_k − b_k)²` with lane-parallel f32 partial sums.
#[inline(always)]
fn sumsq_diff<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            let t = x[l] - y[l];
            acc[l] = madd::<FMA>(t, t, acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        let t = x - y;
        tail = madd::<FMA>(t, t, tail);
    }
    // Pairwise fold of the lanes.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

/// Portable pairwise distances of one block (see [`distance_block`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn distance_block_impl<const FMA: bool>(
    x: &[f32],
    x_stride: usize,
    mu: &[f32],
    mu_stride: usize,
    n_x: usize,
    n_mu: usize,
    w: usize,
    acc: &mut [f64],
) {
    for i in 0..n_x {
        let xi = &x[i * x_stride..i * x_stride + w];
        for j in 0..n_mu {
            let mj = &mu[j * mu_stride..j * mu_stride + w];
            acc[i * n_mu + j] += sumsq_diff::<FMA>(xi, mj) as f64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `acc[a*n_mu + b] += Σ_{c < w8} (x_a[c] − mu_b[c])²` for the `I × J` tile of rows
    /// `xs[a]`, `ms[b]`, in f32 lanes, each tile sum added to its f64 accumulator.
    ///
    /// # Safety
    /// Every `xs[a]` and `ms[b]` must point at `w8` readable floats (`w8` a multiple of 8),
    /// and the CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const I: usize, const J: usize>(
        xs: [*const f32; I],
        ms: [*const f32; J],
        w8: usize,
        acc: &mut [f64],
        row0: usize,
        col0: usize,
        n_mu: usize,
    ) {
        let mut s = [[_mm256_setzero_ps(); J]; I];
        let mut c = 0;
        while c < w8 {
            let mut xv = [_mm256_setzero_ps(); I];
            for a in 0..I {
                // SAFETY: c + 8 <= w8 and xs[a] has w8 readable floats (caller contract).
                xv[a] = unsafe { _mm256_loadu_ps(xs[a].add(c)) };
            }
            for b in 0..J {
                // SAFETY: as above for ms[b].
                let m = unsafe { _mm256_loadu_ps(ms[b].add(c)) };
                for a in 0..I {
                    let d = _mm256_sub_ps(xv[a], m);
                    s[a][b] = _mm256_fmadd_ps(d, d, s[a][b]);
                }
            }
            c += 8;
        }
        if J == 4 {
            // Four sums of a tile row at once: two rounds of horizontal adds, fold the halves,
            // widen to f64 and add to the four accumulators of the row.
            for (a, sa) in s.iter().enumerate() {
                let t01 = _mm256_hadd_ps(sa[0], sa[1]);
                let t23 = _mm256_hadd_ps(sa[2], sa[3]);
                let u = _mm256_hadd_ps(t01, t23);
                let r = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u));
                let dst = &mut acc[(row0 + a) * n_mu + col0..(row0 + a) * n_mu + col0 + 4];
                // SAFETY: `dst` holds 4 f64 (loadu/storeu need no alignment).
                unsafe {
                    let old = _mm256_loadu_pd(dst.as_ptr());
                    _mm256_storeu_pd(dst.as_mut_ptr(), _mm256_add_pd(old, _mm256_cvtps_pd(r)));
                }
            }
        } else {
            for a in 0..I {
                for b in 0..J {
                    acc[(row0 + a) * n_mu + col0 + b] += hsum(s[a][b]) as f64;
                }
            }
        }
    }

    /// [`super::combine2`] on two rows of `8·V` values: `v_r = cx·x_r + Σ_j w_r[j]·(ca·a_j +
    /// cb·b_j)`, with the operations of `combine_impl::<true>` (`fma(wb, b, fma(wa, a, e))`, or
    /// `fma(wa, a, e)` when `b` is absent or `wb = 0`; zero weights skipped) for each row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. Slices are bounds-checked: each row `v_r` (and `x_r`)
    /// must hold `8·V` values, and `a`, `b` every row `j < weights.len()` from `j · stride`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // lane-indexed accumulators of two rows
    pub(super) unsafe fn combine2<const V: usize>(
        v: [&mut [f32]; 2],
        x: [Option<&[f32]>; 2],
        cx: f32,
        weights: [&[f32]; 2],
        src: super::Sources<'_>,
    ) {
        let w = 8 * V;
        let mut acc = [[_mm256_setzero_ps(); V]; 2];
        let cxv = _mm256_set1_ps(cx);
        for (accr, xr) in acc.iter_mut().zip(x) {
            if let Some(xr) = xr {
                let xr = &xr[..w];
                for (k, e) in accr.iter_mut().enumerate() {
                    // SAFETY: 8·k + 8 <= w values of `xr`.
                    *e = _mm256_mul_ps(cxv, unsafe { _mm256_loadu_ps(xr.as_ptr().add(8 * k)) });
                }
            }
        }
        let [acc0, acc1] = &mut acc;
        let (w0s, w1s) = (weights[0], &weights[1][..weights[0].len()]);
        for (j, (&w0, &w1)) in w0s.iter().zip(w1s).enumerate() {
            if w0 == 0.0 && w1 == 0.0 {
                continue;
            }
            let at = j * src.stride;
            let aj = &src.a[at..at + w];
            let (wa0, wa1) = (_mm256_set1_ps(w0 * src.ca), _mm256_set1_ps(w1 * src.ca));
            let load = |s: &[f32], k: usize| {
                // SAFETY: `s` holds w = 8·V values and k < V.
                unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * k)) }
            };
            match src.b {
                None => match (w0 != 0.0, w1 != 0.0) {
                    (true, true) => {
                        for k in 0..V {
                            let av = load(aj, k);
                            acc0[k] = _mm256_fmadd_ps(wa0, av, acc0[k]);
                            acc1[k] = _mm256_fmadd_ps(wa1, av, acc1[k]);
                        }
                    }
                    (true, false) => {
                        for k in 0..V {
                            acc0[k] = _mm256_fmadd_ps(wa0, load(aj, k), acc0[k]);
                        }
                    }
                    _ => {
                        for k in 0..V {
                            acc1[k] = _mm256_fmadd_ps(wa1, load(aj, k), acc1[k]);
                        }
                    }
                },
                Some(b) => {
                    let bj = &b[at..at + w];
                    let (sb0, sb1) = (w0 * src.cb, w1 * src.cb);
                    let (wb0, wb1) = (_mm256_set1_ps(sb0), _mm256_set1_ps(sb1));
                    for (on, two, wa, wb, accr) in [
                        (w0 != 0.0, sb0 != 0.0, wa0, wb0, &mut *acc0),
                        (w1 != 0.0, sb1 != 0.0, wa1, wb1, &mut *acc1),
                    ] {
                        match (on, two) {
                            (true, true) => {
                                for k in 0..V {
                                    let e = _mm256_fmadd_ps(wa, load(aj, k), accr[k]);
                                    accr[k] = _mm256_fmadd_ps(wb, load(bj, k), e);
                                }
                            }
                            (true, false) => {
                                for k in 0..V {
                                    accr[k] = _mm256_fmadd_ps(wa, load(aj, k), accr[k]);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        for (vr, accr) in v.into_iter().zip(&acc) {
            let vr = &mut vr[..w];
            for (k, e) in accr.iter().enumerate() {
                // SAFETY: 8·k + 8 <= w values of `vr`.
                unsafe { _mm256_storeu_ps(vr.as_mut_ptr().add(8 * k), *e) };
            }
        }
    }

    /// Register-blocked pairwise distances of one block (see [`super::distance_block`]).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the slices must hold the rows the strides describe
    /// (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn distance_block(
        x: &[f32],
        x_stride: usize,
        mu: &[f32],
        mu_stride: usize,
        n_x: usize,
        n_mu: usize,
        w: usize,
        acc: &mut [f64],
    ) {
        let w8 = w & !7;
        let xp = |i: usize| x[i * x_stride..].as_ptr();
        let mp = |j: usize| mu[j * mu_stride..].as_ptr();
        let mut i = 0;
        // SAFETY (all tile calls): the caller checked that every row i < n_x of x and
        // j < n_mu of mu has w >= w8 floats from its start; AVX2 + FMA are enabled here.
        while i + 2 <= n_x {
            let xs = [xp(i), xp(i + 1)];
            let mut j = 0;
            while j + 4 <= n_mu {
                let ms = [mp(j), mp(j + 1), mp(j + 2), mp(j + 3)];
                unsafe { tile::<2, 4>(xs, ms, w8, acc, i, j, n_mu) };
                j += 4;
            }
            while j < n_mu {
                unsafe { tile::<2, 1>(xs, [mp(j)], w8, acc, i, j, n_mu) };
                j += 1;
            }
            i += 2;
        }
        if i < n_x {
            let xs = [xp(i)];
            let mut j = 0;
            while j + 4 <= n_mu {
                let ms = [mp(j), mp(j + 1), mp(j + 2), mp(j + 3)];
                unsafe { tile::<1, 4>(xs, ms, w8, acc, i, j, n_mu) };
                j += 4;
            }
            while j < n_mu {
                unsafe { tile::<1, 1>(xs, [mp(j)], w8, acc, i, j, n_mu) };
                j += 1;
            }
        }
        if w8 < w {
            for i in 0..n_x {
                let xi = &x[i * x_stride + w8..i * x_stride + w];
                for j in 0..n_mu {
                    let mj = &mu[j * mu_stride + w8..j * mu_stride + w];
                    let mut t = 0.0f32;
                    for (a, b) in xi.iter().zip(mj) {
                        let d = a - b;
                        t = d.mul_add(d, t);
                    }
                    acc[i * n_mu + j] += t as f64;
                }
            }
        }
    }
}

/// For one block of `w` components: `acc[i*n_mu + j] += Σ_c (x_i[c] − mu_j[c])²`, where row
/// `i` of the block starts at `x[i * x_stride]` and row `j` of the means at `mu[j * mu_stride]`.
/// Sums are formed from the differences, in f32 within the block, and added to the f64 `acc`.
///
/// Panics if a slice is shorter than its rows require.
#[allow(clippy::too_many_arguments)]
pub fn distance_block(
    x: &[f32],
    x_stride: usize,
    mu: &[f32],
    mu_stride: usize,
    n_x: usize,
    n_mu: usize,
    w: usize,
    acc: &mut [f64],
) {
    if n_x == 0 || n_mu == 0 || w == 0 {
        return;
    }
    assert!(
        x.len() >= (n_x - 1) * x_stride + w,
        "distance_block: x too short"
    );
    assert!(
        mu.len() >= (n_mu - 1) * mu_stride + w,
        "distance_block: mu too short"
    );
    assert!(acc.len() >= n_x * n_mu, "distance_block: acc too short");
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above) and
        // the row extents were checked against the slice lengths.
        unsafe { avx2::distance_block(x, x_stride, mu, mu_stride, n_x, n_mu, w, acc) };
        return;
    }
    distance_block_impl::<false>(x, x_stride, mu, mu_stride, n_x, n_mu, w, acc)
}

// ---- path means and velocity targets ---------------------------------------------------------

/// `out[j*w + c] = ca·a[j*stride + c] + cb·b[j*stride + c]` for `n` rows of `w` components
/// (`b = None` means `cb·b = 0`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mix_block_impl<const FMA: bool>(
    out: &mut [f32],
    a: &[f32],
    b: Option<&[f32]>,
    ca: f32,
    cb: f32,
    n: usize,
    stride: usize,
    w: usize,
) {
    for (j, o) in out.chunks_exact_mut(w).take(n).enumerate() {
        let ar = &a[j * stride..j * stride + w];
        match b {
            Some(b) => {
                let br = &b[j * stride..j * stride + w];
                for ((o, &x), &y) in o.iter_mut().zip(ar).zip(br) {
                    *o = madd::<FMA>(cb, y, ca * x);
                }
            }
            None => {
                for (o, &x) in o.iter_mut().zip(ar) {
                    *o = ca * x;
                }
            }
        }
    }
}

dispatch!(mix_block_fma(out: &mut [f32], a: &[f32], b: Option<&[f32]>, ca: f32, cb: f32, n: usize, stride: usize, w: usize) => mix_block_impl);

/// Materializes `n` rows of `ca·a + cb·b` (rows `stride` apart in `a`, `b`) as an `n × w`
/// block, best variant.
#[allow(clippy::too_many_arguments)]
pub fn mix_block(
    out: &mut [f32],
    a: &[f32],
    b: Option<&[f32]>,
    ca: f32,
    cb: f32,
    n: usize,
    stride: usize,
    w: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { mix_block_fma(out, a, b, ca, cb, n, stride, w) };
        return;
    }
    mix_block_impl::<false>(out, a, b, ca, cb, n, stride, w)
}

// ---- weighted combination --------------------------------------------------------------------

/// The weighted combination one weight at a time over the whole row: how a long row is
/// combined, and the definition the register-blocked short-row path must reproduce bit for
/// bit (tested).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_by_weight<const FMA: bool>(
    v: &mut [f32],
    x: Option<&[f32]>,
    cx: f32,
    weights: &[f32],
    a: &[f32],
    ca: f32,
    b: Option<&[f32]>,
    cb: f32,
    stride: usize,
) {
    let w = v.len();
    match x {
        Some(x) if cx != 0.0 => {
            for (e, &xv) in v.iter_mut().zip(&x[..w]) {
                *e = cx * xv;
            }
        }
        _ => v.iter_mut().for_each(|e| *e = 0.0),
    }
    for (j, &wij) in weights.iter().enumerate() {
        if wij == 0.0 {
            continue;
        }
        let (wa, wb) = (wij * ca, wij * cb);
        let aj = &a[j * stride..j * stride + w];
        match b {
            Some(b) if wb != 0.0 => {
                let bj = &b[j * stride..j * stride + w];
                for ((e, &av), &bv) in v.iter_mut().zip(aj).zip(bj) {
                    *e = madd::<FMA>(wb, bv, madd::<FMA>(wa, av, *e));
                }
            }
            _ => {
                for (e, &av) in v.iter_mut().zip(aj) {
                    *e = madd::<FMA>(wa, av, *e);
                }
            }
        }
    }
}

/// `v[c] = cx·x[c] + Σ_j weights[j] · (ca·a_j[c] + cb·b_j[c])` over the non-zero weights,
/// with row `j` of `a` (and `b`) at `j * stride`; `x = None` or `cx = 0` drop the first term.
///
/// A short row (at most [`PAIR_WIDTH`] values: a small state, or the last block of a larger
/// one) is combined as one chunk of whole vectors kept in registers across all the weights
/// (then its last few values), instead of being loaded and stored once per weight; a longer row
/// one weight at a time, streaming through L1. Every value sees the same operations in the same
/// order (`j` ascending) either way.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_impl<const FMA: bool>(
    v: &mut [f32],
    x: Option<&[f32]>,
    cx: f32,
    weights: &[f32],
    a: &[f32],
    ca: f32,
    b: Option<&[f32]>,
    cb: f32,
    stride: usize,
) {
    let w = v.len();
    if w > PAIR_WIDTH {
        // A long row: one weight at a time.
        combine_by_weight::<FMA>(v, x, cx, weights, a, ca, b, cb, stride);
        return;
    }
    let x = x.filter(|_| cx != 0.0);
    macro_rules! chunk {
        ($v:literal) => {
            combine_chunk::<FMA, $v>(v, x, cx, weights, a, ca, b, cb, stride, 0)
        };
    }
    let vectors = w / 8;
    match vectors {
        1 => chunk!(1),
        2 => chunk!(2),
        3 => chunk!(3),
        4 => chunk!(4),
        5 => chunk!(5),
        6 => chunk!(6),
        7 => chunk!(7),
        8 => chunk!(8),
        _ => {}
    }
    let c0 = 8 * vectors;
    if c0 < w {
        combine_tail::<FMA>(v, x, cx, weights, a, ca, b, cb, stride, c0);
    }
}

/// Most 8-lane vectors of a row kept in registers by [`combine_impl`] and [`combine2`] (eight
/// AVX2 vectors: enough independent multiply-add chains to keep both units busy).
const COMBINE_VECTORS: usize = 8;

/// [`combine_impl`] on the `8·V` values from `c0`, accumulated in `V` vectors of 8 lanes
/// (registers).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_chunk<const FMA: bool, const V: usize>(
    v: &mut [f32],
    x: Option<&[f32]>,
    cx: f32,
    weights: &[f32],
    a: &[f32],
    ca: f32,
    b: Option<&[f32]>,
    cb: f32,
    stride: usize,
    c0: usize,
) {
    let mut acc = [[0.0f32; 8]; V];
    if let Some(x) = x {
        for (q, e) in acc.iter_mut().enumerate() {
            let xs = lanes(x, c0 + 8 * q);
            for l in 0..8 {
                e[l] = cx * xs[l];
            }
        }
    }
    match b {
        Some(b) => {
            for (j, &wij) in weights.iter().enumerate() {
                if wij == 0.0 {
                    continue;
                }
                let (wa, wb) = (wij * ca, wij * cb);
                let at = j * stride + c0;
                // Whole-chunk slices: the lane loads below need no further bounds checks.
                let aj = &a[at..at + 8 * V];
                if wb != 0.0 {
                    let bj = &b[at..at + 8 * V];
                    for (q, e) in acc.iter_mut().enumerate() {
                        let (av, bv) = (lanes(aj, 8 * q), lanes(bj, 8 * q));
                        for l in 0..8 {
                            e[l] = madd::<FMA>(wb, bv[l], madd::<FMA>(wa, av[l], e[l]));
                        }
                    }
                } else {
                    for (q, e) in acc.iter_mut().enumerate() {
                        let av = lanes(aj, 8 * q);
                        for l in 0..8 {
                            e[l] = madd::<FMA>(wa, av[l], e[l]);
                        }
                    }
                }
            }
        }
        None => {
            for (j, &wij) in weights.iter().enumerate() {
                if wij == 0.0 {
                    continue;
                }
                let wa = wij * ca;
                let at = j * stride + c0;
                let aj = &a[at..at + 8 * V];
                for (q, e) in acc.iter_mut().enumerate() {
                    let av = lanes(aj, 8 * q);
                    for l in 0..8 {
                        e[l] = madd::<FMA>(wa, av[l], e[l]);
                    }
                }
            }
        }
    }
    for (q, e) in acc.iter().enumerate() {
        v[c0 + 8 * q..c0 + 8 * q + 8].copy_from_slice(e);
    }
}

/// The 8 values of `s` from `at`.
#[inline(always)]
fn lanes(s: &[f32], at: usize) -> &[f32; 8] {
    s[at..at + 8].try_into().expect("8 values")
}

/// [`combine_impl`] on the values from `c0` to the end of `v`, one weight at a time (the whole
/// row when `c0 = 0`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_tail<const FMA: bool>(
    v: &mut [f32],
    x: Option<&[f32]>,
    cx: f32,
    weights: &[f32],
    a: &[f32],
    ca: f32,
    b: Option<&[f32]>,
    cb: f32,
    stride: usize,
    c0: usize,
) {
    let v = &mut v[c0..];
    let w = v.len();
    match x {
        Some(x) => {
            for (e, &xv) in v.iter_mut().zip(&x[c0..c0 + w]) {
                *e = cx * xv;
            }
        }
        None => v.iter_mut().for_each(|e| *e = 0.0),
    }
    for (j, &wij) in weights.iter().enumerate() {
        if wij == 0.0 {
            continue;
        }
        let (wa, wb) = (wij * ca, wij * cb);
        let at = j * stride + c0;
        let aj = &a[at..at + w];
        match b {
            Some(b) if wb != 0.0 => {
                let bj = &b[at..at + w];
                for ((e, &av), &bv) in v.iter_mut().zip(aj).zip(bj) {
                    *e = madd::<FMA>(wb, bv, madd::<FMA>(wa, av, *e));
                }
            }
            _ => {
                for (e, &av) in v.iter_mut().zip(aj) {
                    *e = madd::<FMA>(wa, av, *e);
                }
            }
        }
    }
}

dispatch!(combine_fma(v: &mut [f32], x: Option<&[f32]>, cx: f32, weights: &[f32], a: &[f32], ca: f32, b: Option<&[f32]>, cb: f32, stride: usize) => combine_impl);

/// Weighted combination of one block row, best variant:
/// `v[c] = cx·x[c] + Σ_j weights[j] · (ca·a_j[c] + cb·b_j[c])` with row `j` of `a` (and `b`)
/// at `j * stride`; `x = None` or `cx = 0` drop the first term. Zero weights (the one-hot case
/// at small σ_min) cost nothing.
#[allow(clippy::too_many_arguments)]
pub fn combine(
    v: &mut [f32],
    x: Option<&[f32]>,
    cx: f32,
    weights: &[f32],
    a: &[f32],
    ca: f32,
    b: Option<&[f32]>,
    cb: f32,
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { combine_fma(v, x, cx, weights, a, ca, b, cb, stride) };
        return;
    }
    combine_impl::<false>(v, x, cx, weights, a, ca, b, cb, stride)
}

/// Longest row that [`combine`] keeps in registers and [`combine2`] combines two members at a
/// time (longer rows take two [`combine`] calls, streaming).
pub const PAIR_WIDTH: usize = 8 * COMBINE_VECTORS;

/// The rows shared by the weighted combinations of several members: `ca·a_j + cb·b_j` with
/// row `j` of `a` (and `b`) at `j · stride`.
#[derive(Clone, Copy, Debug)]
pub struct Sources<'a> {
    /// First source rows.
    pub a: &'a [f32],
    /// Coefficient of `a`.
    pub ca: f32,
    /// Second source rows, if any.
    pub b: Option<&'a [f32]>,
    /// Coefficient of `b`.
    pub cb: f32,
    /// Distance between consecutive rows of `a` and `b`.
    pub stride: usize,
}

/// [`combine`] for two members at once (rows `v[0]`, `v[1]` of the same length, with their
/// own `x` and weights and the same sources): the same values as two calls. Rows of whole
/// vectors up to [`PAIR_WIDTH`] values are combined side by side with AVX2 + FMA, sharing every
/// load of the sources and giving twice the independent chains of one short row; otherwise
/// (and without AVX2) it makes the two calls.
pub fn combine2(
    v: [&mut [f32]; 2],
    x: [Option<&[f32]>; 2],
    cx: f32,
    weights: [&[f32]; 2],
    src: Sources<'_>,
) {
    let [v0, v1] = v;
    let w = v0.len();
    let Sources {
        a,
        ca,
        b,
        cb,
        stride,
    } = src;
    #[cfg(target_arch = "x86_64")]
    if has_fma() && w % 8 == 0 && (8..=PAIR_WIDTH).contains(&w) && v1.len() == w {
        let x = x.map(|xr| xr.filter(|_| cx != 0.0));
        macro_rules! pair {
            ($v:literal) => {
                // SAFETY: the processor supports AVX2 and FMA (checked just above); the
                // kernel checks every slice it reads against its length.
                unsafe { avx2::combine2::<$v>([v0, v1], x, cx, weights, src) }
            };
        }
        match w / 8 {
            1 => pair!(1),
            2 => pair!(2),
            3 => pair!(3),
            4 => pair!(4),
            5 => pair!(5),
            6 => pair!(6),
            7 => pair!(7),
            _ => pair!(8),
        }
        return;
    }
    combine(v0, x[0], cx, weights[0], a, ca, b, cb, stride);
    combine(v1, x[1], cx, weights[1], a, ca, b, cb, stride);
}

/// `v[c] = cx · x[c] + Σ_j weights[j] · u[j*u_stride + c]` for `c < v.len()`, skipping zero
/// weights.
pub fn combine_row(v: &mut [f32], x: &[f32], cx: f32, weights: &[f32], u: &[f32], u_stride: usize) {
    combine(v, Some(x), cx, weights, u, 1.0, None, 0.0, u_stride)
}

// ---- ensemble-space products -----------------------------------------------------------------

/// `acc[r·n + j] += a[j] · b[r]` for every row `r < b.len()` and `j < n = a.len()`, in f64:
/// a product then a sum in every lane (no fused multiply-add), so each entry rounds exactly as
/// the scalar `acc += a · b` does; called once per `k`, it sums every entry in `k` order.
#[inline(always)]
fn outer_acc_impl<const FMA: bool>(acc: &mut [f64], a: &[f64], b: &[f64]) {
    let n = a.len();
    if n == 0 {
        return;
    }
    for (row, &br) in acc.chunks_exact_mut(n).zip(b) {
        for (o, &aj) in row.iter_mut().zip(a) {
            *o += aj * br;
        }
    }
}

dispatch!(outer_acc_fma(acc: &mut [f64], a: &[f64], b: &[f64]) => outer_acc_impl);

/// `acc[r·n + j] += a[j] · b[r]` (f64, unfused: bit for bit the scalar loop), best variant.
pub fn outer_acc(acc: &mut [f64], a: &[f64], b: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { outer_acc_fma(acc, a, b) };
        return;
    }
    outer_acc_impl::<false>(acc, a, b)
}

/// `out[j] = (e[j] / sum) as f32`: a row of softmax weights from its exponentials. Correctly
/// rounded division in every lane, so the vector loop gives the scalar loop's values.
#[inline(always)]
fn normalize_impl<const FMA: bool>(out: &mut [f32], e: &[f64], sum: f64) {
    for (o, &ej) in out.iter_mut().zip(e) {
        *o = (ej / sum) as f32;
    }
}

dispatch!(normalize_fma(out: &mut [f32], e: &[f64], sum: f64) => normalize_impl);

/// `out[j] = (e[j] / sum) as f32` (softmax normalization), best variant.
pub fn normalize(out: &mut [f32], e: &[f64], sum: f64) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { normalize_fma(out, e, sum) };
        return;
    }
    normalize_impl::<false>(out, e, sum)
}

/// The mean and the sum of squared deviations, in f64, of columns `k..k + mean.len()` of the
/// `n × d` row-major `data`: `mean[c] = (Σ_i x_ic)/n`, `ss[c] = Σ_i (x_ic − mean[c])²`, each sum
/// from 0 in row order (the lanes hold different columns, so the vector loops give the scalar
/// loops' values).
#[inline(always)]
fn column_moments_impl<const FMA: bool>(
    data: &[f32],
    n: usize,
    d: usize,
    k: usize,
    mean: &mut [f64],
    ss: &mut [f64],
) {
    let w = mean.len();
    let ss = &mut ss[..w];
    mean.iter_mut().for_each(|v| *v = 0.0);
    for i in 0..n {
        let row = &data[i * d + k..i * d + k + w];
        for (s, &x) in mean.iter_mut().zip(row) {
            *s += x as f64;
        }
    }
    mean.iter_mut().for_each(|v| *v /= n as f64);
    ss.iter_mut().for_each(|v| *v = 0.0);
    for i in 0..n {
        let row = &data[i * d + k..i * d + k + w];
        for ((s, &x), &mu) in ss.iter_mut().zip(row).zip(mean.iter()) {
            let dv = x as f64 - mu;
            *s += dv * dv;
        }
    }
}

dispatch!(column_moments_fma(data: &[f32], n: usize, d: usize, k: usize, mean: &mut [f64], ss: &mut [f64]) => column_moments_impl);

/// Column means and sums of squared deviations of an `n × d` block (see
/// `column_moments_impl`), best variant.
pub fn column_moments(
    data: &[f32],
    n: usize,
    d: usize,
    k: usize,
    mean: &mut [f64],
    ss: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { column_moments_fma(data, n, d, k, mean, ss) };
        return;
    }
    column_moments_impl::<false>(data, n, d, k, mean, ss)
}

/// `out[j] = (dist[j] · inv + bias_j) as f32` with `bias_j = bias[j]` or `0.0`: one row of
/// flow log-weights from its summed pairwise distances (each lane rounds as the scalar code).
#[inline(always)]
fn logits_row_impl<const FMA: bool>(out: &mut [f32], dist: &[f64], inv: f64, bias: Option<&[f32]>) {
    match bias {
        Some(b) => {
            for ((o, &s), &bj) in out.iter_mut().zip(dist).zip(b) {
                *o = (s * inv + bj as f64) as f32;
            }
        }
        None => {
            for (o, &s) in out.iter_mut().zip(dist) {
                *o = (s * inv + 0.0) as f32;
            }
        }
    }
}

dispatch!(logits_row_fma(out: &mut [f32], dist: &[f64], inv: f64, bias: Option<&[f32]>) => logits_row_impl);

/// `out[j] = (dist[j] · inv + bias_j) as f32` (see `logits_row_impl`), best variant.
pub fn logits_row(out: &mut [f32], dist: &[f64], inv: f64, bias: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { logits_row_fma(out, dist, inv, bias) };
        return;
    }
    logits_row_impl::<false>(out, dist, inv, bias)
}

// ---- guidance and the integrator update ------------------------------------------------------

/// Range reduction of Cephes `atanf` for `|x|`: `atan|x| = y0 + atan(num/den)` with
/// `|num/den| ≤ tan(π/8)`. Returns `(num, den, y0)`; branch-free.
#[inline(always)]
fn atan_reduce(ax: f32) -> (f32, f32, f32) {
    let big = ax > 2.414_213_6; // tan(3π/8)
    let mid = ax > 0.414_213_57; // tan(π/8)
    let num = if big {
        -1.0
    } else if mid {
        ax - 1.0
    } else {
        ax
    };
    let den = if big {
        ax
    } else if mid {
        ax + 1.0
    } else {
        1.0
    };
    let y0 = if big {
        std::f32::consts::FRAC_PI_2
    } else if mid {
        std::f32::consts::FRAC_PI_4
    } else {
        0.0
    };
    (num, den, y0)
}

/// `atan(z)` for `|z| ≤ tan(π/8)`: the degree-9 odd polynomial of Cephes `atanf`.
#[inline(always)]
fn atan_poly<const FMA: bool>(z: f32) -> f32 {
    // Estrin's scheme: a short dependency chain, so that the out-of-order core overlaps more
    // vectors of the (latency-bound) guidance loop.
    let zz = z * z;
    let z4 = zz * zz;
    let p01 = madd::<FMA>(1.997_771_1e-1, zz, -3.333_295e-1);
    let p23 = madd::<FMA>(8.053_744_5e-2, zz, -1.387_768_6e-1);
    let p = madd::<FMA>(z4, p23, p01);
    madd::<FMA>(z * zz, p, z)
}

/// `arctan(x)` in f32 (Cephes `atanf`: reduction to `|z| ≤ tan(π/8)` and a degree-9 odd
/// polynomial; within 2 ulp of the correctly rounded value), branch-free so that it vectorizes.
#[inline(always)]
pub fn atan_fast(x: f32) -> f32 {
    let (num, den, y0) = atan_reduce(x.abs());
    (y0 + atan_poly::<false>(num / den)).copysign(x)
}

/// `(arctan x, 1/(1 + x²))` with a single division (the reduction's quotient and the
/// derivative share one reciprocal); a few ulp from the separately rounded values.
#[cfg(test)]
fn atan_and_derivative<const FMA: bool>(x: f32) -> (f32, f32) {
    let (z, y0, dh) = atan_stage1::<FMA>(x);
    (atan_stage2::<FMA>(z, y0), dh)
}

/// First half of [`atan_and_derivative`]: the signed reduced argument `z`, the signed offset
/// `y0` (so that `atan x = y0 + atan z`) and the derivative `1/(1 + x²)`.
#[inline(always)]
fn atan_stage1<const FMA: bool>(x: f32) -> (f32, f32, f32) {
    // Beyond 1e12, atan(x) = ±π/2 in f32 and 1/(1 + x²) is negligible (≤ 1e-24); the clamp
    // keeps den · (1 + x²) ≈ |x|³ finite. (A NaN fails the comparison and propagates.)
    let ax = x.abs();
    let ax = if ax > 1e12 { 1e12 } else { ax };
    let (num, den, y0) = atan_reduce(ax);
    let q = madd::<FMA>(ax, ax, 1.0);
    let inv = 1.0 / (den * q);
    let z = num * q * inv;
    // atan is odd: flip both parts when x is negative.
    let sign = x.to_bits() & 0x8000_0000;
    let flip = |v: f32| f32::from_bits(v.to_bits() ^ sign);
    (flip(z), flip(y0), den * inv)
}

/// Second half of [`atan_and_derivative`]: `atan x = y0 + atan z`.
#[inline(always)]
fn atan_stage2<const FMA: bool>(z: f32, y0: f32) -> f32 {
    y0 + atan_poly::<FMA>(z)
}

/// Elements per pass of the two-pass arctan guidance.
const GUIDE_CHUNK: usize = 64;

/// Adds observation guidance to the velocity of one block row, for an operator observing
/// every component (`y` holds the block's observations): `v += scale · h'(x̂)(y − h(x̂))` with
/// `x̂ = x + horizon · v` (ENFF_SPEC §3.1).
#[inline(always)]
fn guide_full_impl<const FMA: bool>(
    v: &mut [f32],
    x: &[f32],
    y: &[f32],
    pointwise: Pointwise,
    scale: f32,
    horizon: f32,
) {
    let w = v.len();
    let (x, y) = (&x[..w], &y[..w]);
    match pointwise {
        Pointwise::Identity => {
            for ((vc, &xc), &yc) in v.iter_mut().zip(x).zip(y) {
                let xh = madd::<FMA>(horizon, *vc, xc);
                *vc = madd::<FMA>(scale, yc - xh, *vc);
            }
        }
        Pointwise::Arctan => {
            // Two passes over short chunks: each pass has a short dependency chain, so the
            // out-of-order core overlaps many more vectors than in one long pass.
            let (mut zs, mut y0s, mut dhs) = (
                [0.0f32; GUIDE_CHUNK],
                [0.0f32; GUIDE_CHUNK],
                [0.0f32; GUIDE_CHUNK],
            );
            for ((vch, xch), ych) in v
                .chunks_mut(GUIDE_CHUNK)
                .zip(x.chunks(GUIDE_CHUNK))
                .zip(y.chunks(GUIDE_CHUNK))
            {
                let c = vch.len();
                for ((((vc, &xc), z), y0), dh) in vch
                    .iter()
                    .zip(xch)
                    .zip(&mut zs[..c])
                    .zip(&mut y0s[..c])
                    .zip(&mut dhs[..c])
                {
                    (*z, *y0, *dh) = atan_stage1::<FMA>(madd::<FMA>(horizon, *vc, xc));
                }
                for ((((vc, &yc), &z), &y0), &dh) in vch
                    .iter_mut()
                    .zip(ych)
                    .zip(&zs[..c])
                    .zip(&y0s[..c])
                    .zip(&dhs[..c])
                {
                    let h = atan_stage2::<FMA>(z, y0);
                    *vc = madd::<FMA>(scale * dh, yc - h, *vc);
                }
            }
        }
        Pointwise::Tanh => {
            for ((vc, &xc), &yc) in v.iter_mut().zip(x).zip(y) {
                let xh = madd::<FMA>(horizon, *vc, xc);
                let t = xh.tanh();
                *vc = madd::<FMA>(scale * (1.0 - t * t), yc - t, *vc);
            }
        }
    }
}

dispatch!(guide_full_fma(v: &mut [f32], x: &[f32], y: &[f32], pointwise: Pointwise, scale: f32, horizon: f32) => guide_full_impl);

/// Guidance of one block row for a built-in operator observing every component, best variant:
/// `v += scale · h'(x̂)(y − h(x̂))` with `x̂ = x + horizon · v` (ENFF_SPEC §3.1); `y` holds the
/// block's observations.
pub fn guide_full(
    v: &mut [f32],
    x: &[f32],
    y: &[f32],
    pointwise: Pointwise,
    scale: f32,
    horizon: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { guide_full_fma(v, x, y, pointwise, scale, horizon) };
        return;
    }
    guide_full_impl::<false>(v, x, y, pointwise, scale, horizon)
}

/// The Euler / Heun update of one block row: `st[c] += h_new·v[c] (+ h_old·v_old[c])`.
#[inline(always)]
fn step_impl<const FMA: bool>(st: &mut [f32], v: &[f32], h_new: f32, old: Option<(&[f32], f32)>) {
    let w = st.len();
    let v = &v[..w];
    match old {
        Some((pv, hp)) => {
            for ((s, &vc), &pc) in st.iter_mut().zip(v).zip(&pv[..w]) {
                *s = madd::<FMA>(hp, pc, madd::<FMA>(h_new, vc, *s));
            }
        }
        None => {
            for (s, &vc) in st.iter_mut().zip(v) {
                *s = madd::<FMA>(h_new, vc, *s);
            }
        }
    }
}

dispatch!(step_fma(st: &mut [f32], v: &[f32], h_new: f32, old: Option<(&[f32], f32)>) => step_impl);

/// Integrator update of one block row, best variant: `st[c] += h_new·v[c] (+ h_old·v_old[c])`.
pub fn step(st: &mut [f32], v: &[f32], h_new: f32, old: Option<(&[f32], f32)>) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { step_fma(st, v, h_new, old) };
        return;
    }
    step_impl::<false>(st, v, h_new, old)
}

// ---- prefetch ---------------------------------------------------------------------------------

/// Asks the cache to start loading `data` (a hint: no effect on results). The flow kernels
/// stream `3n` rows at once, more streams than the hardware prefetchers follow, so they
/// prefetch each row's next block by hand.
#[inline(always)]
pub fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in data.chunks(16) {
            // SAFETY: prefetching is a hint that cannot fault; the pointer is in bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast::<i8>()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

// ---- finiteness ------------------------------------------------------------------------------

/// True when every value is finite (no NaN, no ±∞); a branch-free scan that vectorizes.
#[inline(always)]
fn all_finite_impl<const FMA: bool>(data: &[f32]) -> bool {
    // A float is non-finite exactly when its exponent bits are all ones.
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        let mut bad = 0u32;
        for &v in c {
            bad |= ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
        }
        if bad != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|v| v.is_finite())
}

dispatch!(all_finite_fma(data: &[f32]) -> bool => all_finite_impl);

/// True when every value of `data` is finite, best variant.
pub fn all_finite(data: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        return unsafe { all_finite_fma(data) };
    }
    all_finite_impl::<false>(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(len: usize, f: f32, phase: f32) -> Vec<f32> {
        (0..len).map(|k| (k as f32 * f + phase).sin()).collect()
    }

    #[test]
    fn blocked_combination_equals_the_weight_by_weight_loop() {
        let stride = 301;
        let a = wave(23 * stride, 0.173, 0.3);
        let b = wave(23 * stride, 0.311, -1.1);
        let x = wave(stride, 0.07, 0.9);
        for n in [1usize, 2, 3, 20, 23] {
            // Dense weights, one-hot, and a few zeros among them.
            let dense: Vec<f32> = (0..n).map(|j| 0.5 / (j as f32 + 1.5)).collect();
            let one_hot: Vec<f32> = (0..n).map(|j| if j == n / 2 { 1.0 } else { 0.0 }).collect();
            let sparse: Vec<f32> = (0..n).map(|j| if j % 3 == 0 { 0.0 } else { 0.3 }).collect();
            for weights in [&dense, &one_hot, &sparse] {
                for w in [1usize, 7, 8, 9, 40, 63, 64, 65, 127, 256, 300] {
                    for (bx, cx, cb) in [(true, 0.7, -0.4), (false, 0.0, 0.0), (true, 0.0, 1.3)] {
                        let bb = bx.then_some(&b[..]);
                        let xx = bx.then_some(&x[..]);
                        let mut got = vec![f32::NAN; w];
                        let mut want = vec![f32::NAN; w];
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        // The best variant (fused when the CPU has FMA) and the portable one.
                        combine(&mut got, xx, cx, weights, &a, 1.1, bb, cb, stride);
                        if has_fma() {
                            combine_by_weight::<true>(
                                &mut want, xx, cx, weights, &a, 1.1, bb, cb, stride,
                            );
                        } else {
                            combine_by_weight::<false>(
                                &mut want, xx, cx, weights, &a, 1.1, bb, cb, stride,
                            );
                        }
                        assert_eq!(bits(&got), bits(&want), "n {n}, w {w}, b {bx}");
                        combine_impl::<false>(&mut got, xx, cx, weights, &a, 1.1, bb, cb, stride);
                        combine_by_weight::<false>(
                            &mut want, xx, cx, weights, &a, 1.1, bb, cb, stride,
                        );
                        assert_eq!(bits(&got), bits(&want), "portable: n {n}, w {w}, b {bx}");
                    }
                }
            }
        }
    }

    #[test]
    fn paired_combination_equals_two_single_ones() {
        let stride = 97;
        let a = wave(21 * stride, 0.173, 0.3);
        let b = wave(21 * stride, 0.311, -1.1);
        let x0 = wave(stride, 0.07, 0.9);
        let x1 = wave(stride, 0.13, -0.4);
        let n = 21;
        // Zero weights in different places for the two rows (and some in both).
        let w0: Vec<f32> = (0..n)
            .map(|j| {
                if j % 3 == 0 {
                    0.0
                } else {
                    0.2 + j as f32 * 0.01
                }
            })
            .collect();
        let w1: Vec<f32> = (0..n)
            .map(|j| {
                if j % 4 < 2 {
                    0.0
                } else {
                    0.9 / (j as f32 + 1.0)
                }
            })
            .collect();
        for w in [7usize, 8, 16, 40, 56, 64, 65, 72] {
            for (with_b, cx, cb) in [(false, 0.6, 0.0), (true, 0.0, -0.7), (true, 1.2, 0.0)] {
                let src = Sources {
                    a: &a,
                    ca: 0.9,
                    b: with_b.then_some(&b[..]),
                    cb,
                    stride,
                };
                let (mut p0, mut p1) = (vec![f32::NAN; w], vec![f32::NAN; w]);
                combine2(
                    [&mut p0, &mut p1],
                    [Some(&x0[..]), Some(&x1[..])],
                    cx,
                    [&w0, &w1],
                    src,
                );
                let (mut s0, mut s1) = (vec![f32::NAN; w], vec![f32::NAN; w]);
                combine(&mut s0, Some(&x0), cx, &w0, &a, 0.9, src.b, cb, stride);
                combine(&mut s1, Some(&x1), cx, &w1, &a, 0.9, src.b, cb, stride);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p0), bits(&s0), "row 0, w {w}, b {with_b}");
                assert_eq!(bits(&p1), bits(&s1), "row 1, w {w}, b {with_b}");
            }
        }
    }

    #[test]
    fn column_moments_equal_the_column_by_column_sums() {
        let (n, d) = (7, 150);
        let data = wave(n * d, 0.377, 0.2);
        for (k, w) in [(0usize, 1usize), (3, 64), (100, 50), (0, 150)] {
            let (mut mean, mut ss) = (vec![0.0f64; w], vec![0.0f64; w]);
            column_moments(&data, n, d, k, &mut mean, &mut ss);
            for c in 0..w {
                let mut s = 0.0f64;
                for i in 0..n {
                    s += data[i * d + k + c] as f64;
                }
                let mu = s / n as f64;
                let mut q = 0.0f64;
                for i in 0..n {
                    let dv = data[i * d + k + c] as f64 - mu;
                    q += dv * dv;
                }
                assert_eq!(
                    (mean[c].to_bits(), ss[c].to_bits()),
                    (mu.to_bits(), q.to_bits())
                );
            }
        }
    }

    #[test]
    fn vector_row_helpers_round_like_the_scalar_formulas() {
        let e: Vec<f64> = (0..37).map(|j| (-(j as f64) * 0.61).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut out = vec![0.0f32; 37];
        normalize(&mut out, &e, sum);
        for (o, &ej) in out.iter().zip(&e) {
            assert_eq!(o.to_bits(), ((ej / sum) as f32).to_bits());
        }
        let dist: Vec<f64> = (0..37).map(|j| j as f64 * 0.37).collect();
        let bias = wave(37, 0.5, 0.1);
        for b in [None, Some(&bias[..])] {
            logits_row(&mut out, &dist, -12.5, b);
            for (j, o) in out.iter().enumerate() {
                let bj = b.map_or(0.0, |b| b[j] as f64);
                assert_eq!(o.to_bits(), ((dist[j] * -12.5 + bj) as f32).to_bits());
            }
        }
        // A zero distance keeps the sign the scalar `dist · inv + 0.0` gives it (+0).
        logits_row(&mut out[..1], &[0.0], -12.5, None);
        assert_eq!(out[0].to_bits(), 0.0f32.to_bits());
        let mut acc = vec![-0.0f64; 3 * 5];
        let a: Vec<f64> = (0..5).map(|j| j as f64 * 0.3 - 0.6).collect();
        outer_acc(&mut acc, &a, &[1.5, -2.0, 0.25]);
        for r in 0..3 {
            for j in 0..5 {
                let want = -0.0 + a[j] * [1.5, -2.0, 0.25][r];
                assert_eq!(acc[r * 5 + j].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn fma_and_plain_variants_agree() {
        let a = wave(1001, 0.37, 0.0);
        let b: Vec<f32> = (0..1001).map(|k| (k as f32 * 0.11).cos()).collect();
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let plain = sumsq_diff::<false>(&a, &b) as f64;
        assert!((plain - exact).abs() < 1e-5 * exact);
        let mut acc = vec![0.0f64; 1];
        distance_block(&a, 0, &b, 0, 1, 1, 1001, &mut acc);
        assert!((acc[0] - exact).abs() < 1e-5 * exact);
    }

    #[test]
    fn blocked_distances_match_f64_for_odd_tiles() {
        // 7 members x 6 means (2x4 tiles plus 2x1, 1x4 and 1x1 remainders), 45 columns
        // (5 vectors plus a 5-column tail), rows padded to stride 50 and 47.
        let (nx, nm, w, sx, sm) = (7, 6, 45, 50, 47);
        let x = wave(nx * sx, 0.173, 0.3);
        let mu = wave(nm * sm, 0.311, -1.1);
        let mut acc = vec![0.5f64; nx * nm];
        distance_block(&x, sx, &mu, sm, nx, nm, w, &mut acc);
        for i in 0..nx {
            for j in 0..nm {
                let want: f64 = (0..w)
                    .map(|c| (x[i * sx + c] as f64 - mu[j * sm + c] as f64).powi(2))
                    .sum();
                let got = acc[i * nm + j] - 0.5;
                assert!(
                    (got - want).abs() < 1e-5 * want.max(1.0),
                    "({i},{j}) {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn combine_skips_zero_weights_and_mixes_two_sources() {
        let (n, w, stride) = (3, 19, 23);
        let a = wave(n * stride, 0.2, 0.0);
        let b = wave(n * stride, 0.7, 1.0);
        let x = wave(w, 0.05, 0.5);
        let weights = [0.25f32, 0.0, 0.75];
        let mut v = vec![9.0f32; w];
        combine(
            &mut v,
            Some(&x),
            0.5,
            &weights,
            &a,
            2.0,
            Some(&b),
            -1.0,
            stride,
        );
        for c in 0..w {
            let want = 0.5 * x[c]
                + (0..n)
                    .map(|j| weights[j] * (2.0 * a[j * stride + c] - b[j * stride + c]))
                    .sum::<f32>();
            assert!((v[c] - want).abs() < 1e-6, "{c}: {} vs {want}", v[c]);
        }
    }

    #[test]
    fn fast_arctan_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        for k in -200_000..=200_000 {
            let x = k as f32 * 1e-4 * (1.0 + (k as f32).abs() * 1e-4);
            let (got, want) = (atan_fast(x) as f64, (x as f64).atan());
            worst = worst.max((got - want).abs() / want.abs().max(1e-30));
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(atan_fast(f32::INFINITY), std::f32::consts::FRAC_PI_2);
        let mut worst_d = 0.0f64;
        for k in -200_000..=200_000 {
            let x = k as f32 * 1e-4 * (1.0 + (k as f32).abs() * 1e-3);
            let (h, dh) = atan_and_derivative::<true>(x);
            let want = (x as f64).atan();
            let want_d = 1.0 / (1.0 + (x as f64).powi(2));
            worst = worst.max((h as f64 - want).abs() / want.abs().max(1e-30));
            worst_d = worst_d.max((dh as f64 - want_d).abs() / want_d);
        }
        assert!(
            worst < 5e-7,
            "worst relative error of the fused arctan {worst}"
        );
        assert!(
            worst_d < 5e-7,
            "worst relative error of the derivative {worst_d}"
        );
        let (h, dh) = atan_and_derivative::<false>(-3e30);
        assert_eq!(h, -std::f32::consts::FRAC_PI_2);
        assert!(dh > 0.0 && dh <= 1e-24, "{dh}");
        assert!(atan_and_derivative::<true>(f32::NAN).0.is_nan());
        assert_eq!(atan_fast(-0.0).to_bits(), (-0.0f32).to_bits());
        assert!(atan_fast(f32::NAN).is_nan());
    }

    #[test]
    fn finiteness_scan_finds_nan_and_infinity_anywhere() {
        let mut v = vec![1.0f32; 200];
        assert!(all_finite(&v));
        for (k, bad) in [
            (3, f32::NAN),
            (130, f32::INFINITY),
            (199, f32::NEG_INFINITY),
        ] {
            let mut w = v.clone();
            w[k] = bad;
            assert!(!all_finite(&w), "missed {bad} at {k}");
        }
        v[5] = f32::MAX;
        assert!(all_finite(&v));
    }
}
