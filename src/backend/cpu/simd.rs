//! Inner loops of the CPU flow kernels, compiled twice: once for the baseline target and once
//! with AVX2 + FMA, chosen at run time. Both variants give results that agree to f32 rounding.

use std::sync::OnceLock;

/// Lanes of the explicit accumulators (four 256-bit registers).
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

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

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

/// For one block of `w` components: `acc[i*n + j] += Σ_c (x_i[c] − mu_j[c])²`, where row `i` of
/// the block starts at `x[i * x_stride]` and row `j` of the means at `mu[j * mu_stride]`.
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
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn distance_block_fma(
    x: &[f32],
    x_stride: usize,
    mu: &[f32],
    mu_stride: usize,
    n_x: usize,
    n_mu: usize,
    w: usize,
    acc: &mut [f64],
) {
    distance_block_impl::<true>(x, x_stride, mu, mu_stride, n_x, n_mu, w, acc)
}

/// Pairwise squared distances of one block (see [`distance_block_impl`]), best variant.
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
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { distance_block_fma(x, x_stride, mu, mu_stride, n_x, n_mu, w, acc) };
        return;
    }
    distance_block_impl::<false>(x, x_stride, mu, mu_stride, n_x, n_mu, w, acc)
}

/// `v[c] = cx · x[c] + Σ_j weights[j] · u[j*u_stride + c]` for `c < v.len()`, skipping zero
/// weights (one-hot weights are the common case at small σ_min).
#[inline(always)]
fn combine_row_impl<const FMA: bool>(
    v: &mut [f32],
    x: &[f32],
    cx: f32,
    weights: &[f32],
    u: &[f32],
    u_stride: usize,
) {
    let w = v.len();
    if cx == 0.0 {
        v.iter_mut().for_each(|e| *e = 0.0);
    } else {
        for (e, &xv) in v.iter_mut().zip(&x[..w]) {
            *e = cx * xv;
        }
    }
    for (j, &wij) in weights.iter().enumerate() {
        if wij == 0.0 {
            continue;
        }
        let uj = &u[j * u_stride..j * u_stride + w];
        for (e, &uv) in v.iter_mut().zip(uj) {
            *e = madd::<FMA>(wij, uv, *e);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn combine_row_fma(
    v: &mut [f32],
    x: &[f32],
    cx: f32,
    weights: &[f32],
    u: &[f32],
    u_stride: usize,
) {
    combine_row_impl::<true>(v, x, cx, weights, u, u_stride)
}

/// Weighted combination of one block row (see [`combine_row_impl`]), best variant.
pub fn combine_row(v: &mut [f32], x: &[f32], cx: f32, weights: &[f32], u: &[f32], u_stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the processor supports AVX2 and FMA (checked at run time just above).
        unsafe { combine_row_fma(v, x, cx, weights, u, u_stride) };
        return;
    }
    combine_row_impl::<false>(v, x, cx, weights, u, u_stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fma_and_plain_variants_agree() {
        let a: Vec<f32> = (0..1001).map(|k| (k as f32 * 0.37).sin()).collect();
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
}
