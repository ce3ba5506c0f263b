//! Real-to-complex FFTs of even length for the spectral models (ENFF_SPEC §8.4, §8.5).
//!
//! A real signal of even length `len` is packed into `len / 2` complex values
//! (`z_j = x_{2j} + i x_{2j+1}`), transformed by one half-length complex FFT (rustfft) and
//! untangled into the `len / 2 + 1` non-negative-frequency bins. The conventions are numpy's
//! `rfft` / `irfft`: the forward transform is unnormalized, the inverse divides by `len` and
//! ignores the imaginary parts of the zero and Nyquist bins.
//!
//! Plans and twiddle factors are built once; every transform works in caller-provided scratch
//! and never allocates.

use std::fmt;
use std::sync::Arc;

/// Complex numbers of the spectra (num-complex's, as re-exported by rustfft).
pub use rustfft::num_complex::Complex;
use rustfft::{Fft, FftNum, FftPlanner};

use crate::error::{Error, Result};

/// A planned real FFT of one even length, in precision `T` (f32 for the models, f64 for
/// reference computations).
#[derive(Clone)]
pub struct RealFft<T: FftNum> {
    len: usize,
    forward: Arc<dyn Fft<T>>,
    inverse: Arc<dyn Fft<T>>,
    /// `e^{-2πik/len}` for `k = 0..=len/2`, computed in f64.
    twiddles: Vec<Complex<T>>,
    /// Complex scratch the half-length plans need (in place).
    plan_scratch: usize,
}

impl<T: FftNum> fmt::Debug for RealFft<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealFft").field("len", &self.len).finish()
    }
}

fn from_f64<T: FftNum>(v: f64) -> T {
    // FromPrimitive::from_f64 never fails for f32/f64 (the only FftNum floats).
    T::from_f64(v).unwrap_or_else(T::zero)
}

impl<T: FftNum> RealFft<T> {
    /// Plans the real FFT of length `len` (even, at least 2).
    pub fn new(len: usize) -> Result<Self> {
        if len < 2 || !len.is_multiple_of(2) {
            return Err(Error::invalid(
                "FFT length",
                len,
                "the real FFT needs an even length of at least 2 (e.g. 256, 512, 1024)",
            ));
        }
        let half = len / 2;
        let mut planner = FftPlanner::<T>::new();
        let forward = planner.plan_fft_forward(half);
        let inverse = planner.plan_fft_inverse(half);
        let plan_scratch = forward
            .get_inplace_scratch_len()
            .max(inverse.get_inplace_scratch_len());
        let twiddles = (0..=half)
            .map(|k| {
                let a = -std::f64::consts::TAU * k as f64 / len as f64;
                Complex::new(from_f64(a.cos()), from_f64(a.sin()))
            })
            .collect();
        Ok(RealFft {
            len,
            forward,
            inverse,
            twiddles,
            plan_scratch,
        })
    }

    /// Length of the real signal.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a planned FFT has a positive length.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of complex bins of the spectrum, `len / 2 + 1`.
    pub fn spectrum_len(&self) -> usize {
        self.len / 2 + 1
    }

    /// Complex values of scratch that [`RealFft::forward`] and [`RealFft::inverse`] need.
    pub fn scratch_len(&self) -> usize {
        self.len / 2 + self.plan_scratch
    }

    /// Complex scratch of the packed transforms (the plans' own scratch only).
    pub(crate) fn packed_scratch_len(&self) -> usize {
        self.plan_scratch
    }

    /// `spectrum = rfft(x)` (unnormalized, `len / 2 + 1` bins).
    pub fn forward(&self, x: &[T], spectrum: &mut [Complex<T>], scratch: &mut [Complex<T>]) {
        let half = self.len / 2;
        let (packed, rest) = scratch.split_at_mut(half);
        for (z, pair) in packed.iter_mut().zip(x.chunks_exact(2)) {
            *z = Complex::new(pair[0], pair[1]);
        }
        self.forward_packed(packed, spectrum, rest);
    }

    /// `x = irfft(spectrum)` (divided by `len`; imaginary parts of bins 0 and `len / 2` are
    /// ignored).
    pub fn inverse(&self, spectrum: &[Complex<T>], x: &mut [T], scratch: &mut [Complex<T>]) {
        let half = self.len / 2;
        let (packed, rest) = scratch.split_at_mut(half);
        self.inverse_packed(spectrum, packed, rest);
        for (pair, z) in x.chunks_exact_mut(2).zip(packed.iter()) {
            pair[0] = z.re;
            pair[1] = z.im;
        }
    }

    /// Forward transform of a signal already packed as `z_j = x_{2j} + i x_{2j+1}`; `packed`
    /// is overwritten. `scratch` holds at least [`RealFft::packed_scratch_len`] values.
    pub(crate) fn forward_packed(
        &self,
        packed: &mut [Complex<T>],
        spectrum: &mut [Complex<T>],
        scratch: &mut [Complex<T>],
    ) {
        let half = self.len / 2;
        self.forward
            .process_with_scratch(packed, &mut scratch[..self.plan_scratch]);
        let two = from_f64::<T>(0.5);
        // X_k = E_k + W^k O_k with E_k = (Z_k + conj Z_{M−k}) / 2, O_k = (Z_k − conj Z_{M−k}) / 2i.
        for k in 0..=half {
            let zk = packed[k % half];
            let zmk = packed[(half - k) % half].conj();
            let e = (zk + zmk) * two;
            let d = (zk - zmk) * two;
            let o = Complex::new(d.im, -d.re);
            spectrum[k] = e + self.twiddles[k] * o;
        }
    }

    /// Inverse transform into the packed form (`x_{2j} = re z_j`, `x_{2j+1} = im z_j`, already
    /// divided by `len`). `scratch` holds at least [`RealFft::packed_scratch_len`] values.
    pub(crate) fn inverse_packed(
        &self,
        spectrum: &[Complex<T>],
        packed: &mut [Complex<T>],
        scratch: &mut [Complex<T>],
    ) {
        let half = self.len / 2;
        let scale = from_f64::<T>(1.0 / self.len as f64);
        // Bin 0 and the Nyquist bin: real parts only (numpy's irfft convention).
        let (a0, am) = (spectrum[0].re, spectrum[half].re);
        packed[0] = Complex::new((a0 + am) * scale, (a0 - am) * scale);
        for k in 1..half {
            let xk = spectrum[k];
            let xmk = spectrum[half - k].conj();
            // Z_k = E_k + i O_k, E_k = (X_k + conj X_{M−k}) / 2, O_k = (X_k − conj X_{M−k}) W^{−k} / 2;
            // the factor 1/2 and the 1/M of the inverse transform make 1/len.
            let e = xk + xmk;
            let o = (xk - xmk) * self.twiddles[k].conj();
            packed[k] = Complex::new(e.re - o.im, e.im + o.re) * scale;
        }
        self.inverse
            .process_with_scratch(packed, &mut scratch[..self.plan_scratch]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dft(x: &[f64]) -> Vec<Complex<f64>> {
        let n = x.len();
        (0..=n / 2)
            .map(|k| {
                x.iter()
                    .enumerate()
                    .fold(Complex::new(0.0, 0.0), |s, (j, &v)| {
                        let a = -std::f64::consts::TAU * (k * j) as f64 / n as f64;
                        s + Complex::new(v * a.cos(), v * a.sin())
                    })
            })
            .collect()
    }

    #[test]
    fn real_fft_matches_a_naive_dft_and_inverts() {
        for len in [2usize, 4, 6, 10, 16, 30, 64] {
            let f = RealFft::<f64>::new(len).unwrap();
            let x: Vec<f64> = (0..len).map(|j| ((j * 7 + 3) % 11) as f64 - 4.5).collect();
            let mut spec = vec![Complex::new(0.0, 0.0); f.spectrum_len()];
            let mut scratch = vec![Complex::new(0.0, 0.0); f.scratch_len()];
            f.forward(&x, &mut spec, &mut scratch);
            for (a, b) in spec.iter().zip(naive_dft(&x)) {
                assert!((a - b).norm() < 1e-10 * len as f64, "len {len}: {a} vs {b}");
            }
            let mut back = vec![0.0; len];
            f.inverse(&spec, &mut back, &mut scratch);
            for (a, b) in back.iter().zip(&x) {
                assert!((a - b).abs() < 1e-12, "len {len}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn odd_or_tiny_fft_lengths_are_refused() {
        for len in [0usize, 1, 3, 1023] {
            assert!(RealFft::<f32>::new(len).is_err());
        }
    }
}
