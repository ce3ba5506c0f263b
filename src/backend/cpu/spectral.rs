//! CPU twins of `shaders/spectral_fft.wgsl` (batched Stockham FFT) and `shaders/spectral_ks.wgsl` (the real-FFT
//! packing and the ETDRK4 stage combinations of the Kuramoto–Sivashinsky forecast), operation
//! for operation, so that the GPU kernels can be checked against them tightly.
//!
//! **Complex FFT.** A batch of `batch` complex sequences of length `m` (a power of two), stored
//! as interleaved f32 pairs (`re, im`), member after member. The transform is Stockham's
//! autosort formulation: passes of radix 4 while the remaining factor allows, then one radix-2
//! pass when `log2 m` is odd. Pass `s` with `ns` = the product of the earlier radices reads
//! `src[j + r·m/R]` (`r < R`, `j < m/R`), multiplies by the twiddle `w_m^{r·(j mod ns)·m/(ns·R)}`,
//! takes an `R`-point DFT and writes `dst[(j div ns)·ns·R + (j mod ns) + r·ns]`; the output
//! comes out in natural order, the buffers ping-pong between passes. Twiddles `e^{−2πik/m}`
//! are computed in f64 and stored as f32; the inverse transform conjugates them and is
//! unnormalized.
//!
//! **Real transforms.** A real signal of even length `d` is read as `d/2` interleaved complex
//! values (`z_j = x_{2j} + i x_{2j+1}`, which is the signal's own memory layout), transformed by
//! one half-length complex FFT and untangled into the `d/2 + 1` bins ([`unpack_forward`]); the
//! inverse first tangles the bins into a packed half-length spectrum ([`pack_inverse`], which
//! also divides by `d`). The conventions are numpy's `rfft` / `irfft`, as in
//! [`crate::model::fft::RealFft`].

use crate::error::{Error, Result};

/// Largest complex FFT length the batched transform accepts (`2^24`).
pub const MAX_FFT_LEN: usize = 1 << 24;

/// A planned batched complex FFT of one power-of-two length (shared by the CPU twin and the GPU
/// kernels).
#[derive(Clone, Debug)]
pub struct FftPlan {
    m: usize,
    radices: Vec<usize>,
    /// `e^{−2πik/m}`, `k < m`, as interleaved f32 pairs (computed in f64).
    twiddles: Vec<f32>,
}

/// `e^{−2πik/len}` for `k < count`, as interleaved f32 pairs computed in f64.
pub fn twiddle_table(len: usize, count: usize) -> Vec<f32> {
    (0..count)
        .flat_map(|k| {
            let a = -std::f64::consts::TAU * k as f64 / len as f64;
            [a.cos() as f32, a.sin() as f32]
        })
        .collect()
}

impl FftPlan {
    /// Plans the complex FFT of length `m`: a power of two from 2 to [`MAX_FFT_LEN`].
    pub fn new(m: usize) -> Result<Self> {
        if !(2..=MAX_FFT_LEN).contains(&m) || !m.is_power_of_two() {
            return Err(Error::invalid(
                "FFT length",
                m,
                format!(
                    "the batched GPU FFT (Stockham, radix 2 and 4) takes power-of-two lengths \
                     from 2 to {MAX_FFT_LEN}: 2, 4, 8, …, 256, 512, 1024, …"
                ),
            ));
        }
        let mut radices = Vec::new();
        let mut rest = m;
        while rest.is_multiple_of(4) {
            radices.push(4);
            rest /= 4;
        }
        if rest == 2 {
            radices.push(2);
        }
        Ok(FftPlan {
            m,
            radices,
            twiddles: twiddle_table(m, m),
        })
    }

    /// The complex length `m`.
    pub fn len(&self) -> usize {
        self.m
    }

    /// Always false: a plan has a positive length.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The radix of every pass, in order (4s, then at most one 2).
    pub fn radices(&self) -> &[usize] {
        &self.radices
    }

    /// The twiddle table `e^{−2πik/m}` as interleaved f32 pairs.
    pub fn twiddles(&self) -> &[f32] {
        &self.twiddles
    }

    /// `(ns, radix)` of every pass.
    pub fn passes(&self) -> Vec<(usize, usize)> {
        let mut ns = 1;
        self.radices
            .iter()
            .map(|&r| {
                let p = (ns, r);
                ns *= r;
                p
            })
            .collect()
    }

    /// Transforms `batch` sequences in `data` (`batch·2m` floats) in place, using `scratch` of
    /// the same length; `square_first` squares the real and imaginary parts of the input
    /// elementwise as the first pass loads them (the KS nonlinearity). Refuses wrong lengths.
    pub fn transform(
        &self,
        data: &mut [f32],
        scratch: &mut [f32],
        inverse: bool,
        square_first: bool,
    ) -> Result<()> {
        let len = 2 * self.m;
        if data.is_empty() || !data.len().is_multiple_of(len) || scratch.len() < data.len() {
            return Err(Error::shape(
                "FFT batch",
                format!("a multiple of 2·{} floats and scratch as long", self.m),
                format!("{} floats, scratch {}", data.len(), scratch.len()),
            ));
        }
        let batch = data.len() / len;
        let scratch = &mut scratch[..data.len()];
        let mut in_data = true;
        for (p, (ns, radix)) in self.passes().into_iter().enumerate() {
            let square = square_first && p == 0;
            if in_data {
                fft_pass(data, scratch, self, batch, ns, radix, inverse, square);
            } else {
                fft_pass(scratch, data, self, batch, ns, radix, inverse, square);
            }
            in_data = !in_data;
        }
        if !in_data {
            data.copy_from_slice(scratch);
        }
        Ok(())
    }
}

#[inline(always)]
fn cmul(a: [f32; 2], b: [f32; 2]) -> [f32; 2] {
    [a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]]
}

#[inline(always)]
fn cadd(a: [f32; 2], b: [f32; 2]) -> [f32; 2] {
    [a[0] + b[0], a[1] + b[1]]
}

#[inline(always)]
fn csub(a: [f32; 2], b: [f32; 2]) -> [f32; 2] {
    [a[0] - b[0], a[1] - b[1]]
}

/// One Stockham pass over a batch: the CPU twin of `spectral_fft.wgsl::pass` (one loop iteration per
/// GPU thread).
#[allow(clippy::too_many_arguments)]
pub fn fft_pass(
    src: &[f32],
    dst: &mut [f32],
    plan: &FftPlan,
    batch: usize,
    ns: usize,
    radix: usize,
    inverse: bool,
    square: bool,
) {
    let m = plan.m;
    let quarter = m / radix;
    let tw_stride = m / (ns * radix);
    for b in 0..batch {
        let base = b * m;
        for j in 0..quarter {
            let k = j % ns;
            let mut v = [[0.0f32; 2]; 4];
            for (r, vr) in v.iter_mut().enumerate().take(radix) {
                let e = 2 * (base + j + r * quarter);
                let mut z = [src[e], src[e + 1]];
                if square {
                    z = [z[0] * z[0], z[1] * z[1]];
                }
                if r > 0 {
                    let t = 2 * (r * k * tw_stride);
                    let w = [
                        plan.twiddles[t],
                        if inverse {
                            -plan.twiddles[t + 1]
                        } else {
                            plan.twiddles[t + 1]
                        },
                    ];
                    z = cmul(z, w);
                }
                *vr = z;
            }
            let y = if radix == 2 {
                [cadd(v[0], v[1]), csub(v[0], v[1]), [0.0; 2], [0.0; 2]]
            } else {
                let a0 = cadd(v[0], v[2]);
                let a1 = csub(v[0], v[2]);
                let a2 = cadd(v[1], v[3]);
                let t = csub(v[1], v[3]);
                // Forward: multiply by −i; inverse: by +i.
                let a3 = if inverse {
                    [-t[1], t[0]]
                } else {
                    [t[1], -t[0]]
                };
                [cadd(a0, a2), cadd(a1, a3), csub(a0, a2), csub(a1, a3)]
            };
            let out = (j / ns) * ns * radix + k;
            for (r, yr) in y.iter().enumerate().take(radix) {
                let e = 2 * (base + out + r * ns);
                dst[e] = yr[0];
                dst[e + 1] = yr[1];
            }
        }
    }
}

/// Twin of `spectral_ks.wgsl::unpack_forward`: untangles `batch` packed half-length spectra (`m`
/// complex values each) into `m + 1` real-FFT bins each. `real_tw` holds `e^{−2πik/2m}` for
/// `k ≤ m` (see [`twiddle_table`]); `g`, when given, turns the bins into the KS nonlinear term
/// `i·g_k·X_k`.
pub fn unpack_forward(
    packed: &[f32],
    spectrum: &mut [f32],
    m: usize,
    batch: usize,
    real_tw: &[f32],
    g: Option<&[f32]>,
) {
    let bins = m + 1;
    for b in 0..batch {
        for k in 0..bins {
            let zi = 2 * (b * m + k % m);
            let zmi = 2 * (b * m + (m - k) % m);
            let zk = [packed[zi], packed[zi + 1]];
            let zmk = [packed[zmi], -packed[zmi + 1]];
            let s = cadd(zk, zmk);
            let e = [s[0] * 0.5, s[1] * 0.5];
            let t = csub(zk, zmk);
            let dd = [t[0] * 0.5, t[1] * 0.5];
            let o = [dd[1], -dd[0]];
            let w = [real_tw[2 * k], real_tw[2 * k + 1]];
            let mut x = cadd(e, cmul(w, o));
            if let Some(g) = g {
                x = [-x[1] * g[k], x[0] * g[k]];
            }
            let out = 2 * (b * bins + k);
            spectrum[out] = x[0];
            spectrum[out + 1] = x[1];
        }
    }
}

/// Twin of `spectral_ks.wgsl::pack_inverse`: tangles `batch` spectra of `m + 1` bins into packed
/// half-length spectra ready for the inverse complex FFT, divided by `2m` (the real length).
pub fn pack_inverse(spectrum: &[f32], packed: &mut [f32], m: usize, batch: usize, real_tw: &[f32]) {
    let bins = m + 1;
    let scale = (1.0 / (2 * m) as f64) as f32;
    for b in 0..batch {
        let s = |k: usize| {
            [
                spectrum[2 * (b * bins + k)],
                spectrum[2 * (b * bins + k) + 1],
            ]
        };
        for k in 0..m {
            let z = if k == 0 {
                let (a0, am) = (s(0)[0], s(m)[0]);
                [(a0 + am) * scale, (a0 - am) * scale]
            } else {
                let xk = s(k);
                let xm = s(m - k);
                let xmk = [xm[0], -xm[1]];
                let e = cadd(xk, xmk);
                let w = [real_tw[2 * k], -real_tw[2 * k + 1]];
                let o = cmul(csub(xk, xmk), w);
                [(e[0] - o[1]) * scale, (e[1] + o[0]) * scale]
            };
            packed[2 * (b * m + k)] = z[0];
            packed[2 * (b * m + k) + 1] = z[1];
        }
    }
}

/// Twin of `spectral_ks.wgsl::stage`: one ETDRK4 combination over `batch·bins` bins of the seven spectra
/// `spec = [v, n1, n2a, n2b, n3, a, bc]` (each `batch·bins` complex values, slot after slot).
/// `coef = [e, e2, q, f1, f2, f3, g]` (each `bins` values). Modes: 0: `a = v e2 + n1 q`;
/// 1: `bc = v e2 + n2a q`; 2: `bc = a e2 + (2 n2b − n1) q`;
/// 3: `v = v e + n1 f1 + (n2a + n2b)·2 f2 + n3 f3`.
pub fn etdrk4_stage(spec: &mut [f32], coef: &[f32], bins: usize, batch: usize, mode: u32) {
    let slot = batch * bins;
    for idx in 0..slot {
        let k = idx % bins;
        let c = |s: usize| coef[s * bins + k];
        let at =
            |spec: &[f32], s: usize| [spec[2 * (s * slot + idx)], spec[2 * (s * slot + idx) + 1]];
        let sc = |z: [f32; 2], f: f32| [z[0] * f, z[1] * f];
        let (target, z) = match mode {
            0 => (5, cadd(sc(at(spec, 0), c(1)), sc(at(spec, 1), c(2)))),
            1 => (6, cadd(sc(at(spec, 0), c(1)), sc(at(spec, 2), c(2)))),
            2 => {
                let t = csub(sc(at(spec, 3), 2.0), at(spec, 1));
                (6, cadd(sc(at(spec, 5), c(1)), sc(t, c(2))))
            }
            _ => {
                let s1 = cadd(sc(at(spec, 0), c(0)), sc(at(spec, 1), c(3)));
                let s2 = cadd(s1, sc(cadd(at(spec, 2), at(spec, 3)), 2.0 * c(4)));
                (0, cadd(s2, sc(at(spec, 4), c(5))))
            }
        };
        spec[2 * (target * slot + idx)] = z[0];
        spec[2 * (target * slot + idx) + 1] = z[1];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_use_radix_four_then_two() {
        assert_eq!(FftPlan::new(512).unwrap().radices(), &[4, 4, 4, 4, 2]);
        assert_eq!(FftPlan::new(256).unwrap().radices(), &[4, 4, 4, 4]);
        assert_eq!(FftPlan::new(2).unwrap().radices(), &[2]);
        for m in [0usize, 1, 3, 6, 384, MAX_FFT_LEN * 2] {
            let e = FftPlan::new(m).unwrap_err().to_string();
            assert!(e.contains("power-of-two") && e.contains("512"), "{e}");
        }
    }
}
