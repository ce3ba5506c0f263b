//! The Kuramoto–Sivashinsky equation `u_t = −u u_x − u_xx − u_xxxx` on a periodic domain of
//! length `DL·π`, integrated by ETDRK4 in Fourier space (ENFF_SPEC §8.4).
//!
//! The state is the field on `d` equispaced grid points (f32). One call to
//! [`KuramotoSivashinsky::advance`] transforms a member to Fourier space, takes its ETDRK4
//! steps there and transforms back; all work happens in caller-provided complex scratch
//! ([`KuramotoSivashinsky::scratch_len`] values), so the forecast never allocates.

use std::fmt;
use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::FftNum;

use super::fft::RealFft;
use crate::error::{check_positive, Error, Result};

/// Number of contour points of the ETDRK4 coefficient integrals (ENFF_SPEC §8.4).
const CONTOUR_POINTS: usize = 16;

/// Model time integrated by the reference initial condition, `150` (ENFF_SPEC §8.4).
const INITIAL_CONDITION_TIME: f64 = 150.0;

/// ETDRK4 step of the reference initial condition, `0.25` (DAPPER's default, ENFF_SPEC §8.4):
/// the initial condition does not depend on the experiment's time step.
const INITIAL_CONDITION_STEP: f64 = 0.25;

/// ETDRK4 coefficients and FFT plan for one grid and time step, in precision `T`.
#[derive(Clone, Debug)]
pub(crate) struct Etdrk4<T: FftNum> {
    fft: RealFft<T>,
    /// `e^{hL}`.
    e: Vec<T>,
    /// `e^{hL/2}`.
    e2: Vec<T>,
    /// `Q`, `f1`, `f2`, `f3` of Kassam–Trefethen.
    q: Vec<T>,
    f1: Vec<T>,
    f2: Vec<T>,
    f3: Vec<T>,
    /// `−k/2`: the nonlinear term is `N(v̂) = i·(−k/2)·F[(F⁻¹v̂)²]`.
    g: Vec<T>,
}

fn cast<T: FftNum>(v: f64) -> T {
    T::from_f64(v).unwrap_or_else(T::zero)
}

impl<T: FftNum> Etdrk4<T> {
    /// Coefficients for `d` grid points (even), step `h`, domain `DL·π`; computed in f64.
    fn new(d: usize, h: f64, domain_pi_multiple: f64) -> Result<Self> {
        let fft = RealFft::<T>::new(d)?;
        let bins = d / 2 + 1;
        let mut c = Etdrk4 {
            fft,
            e: Vec::with_capacity(bins),
            e2: Vec::with_capacity(bins),
            q: Vec::with_capacity(bins),
            f1: Vec::with_capacity(bins),
            f2: Vec::with_capacity(bins),
            f3: Vec::with_capacity(bins),
            g: Vec::with_capacity(bins),
        };
        // Roots r_m = e^{iπ(m + 1/2)/M} on the upper unit half circle.
        let roots: Vec<Complex<f64>> = (0..CONTOUR_POINTS)
            .map(|m| {
                Complex::from_polar(
                    1.0,
                    std::f64::consts::PI * (m as f64 + 0.5) / CONTOUR_POINTS as f64,
                )
            })
            .collect();
        for b in 0..bins {
            // k = [0, 1, …, d/2 − 1, 0]·2/DL (the Nyquist wave number is set to 0).
            let k = if b == d / 2 {
                0.0
            } else {
                b as f64 * 2.0 / domain_pi_multiple
            };
            let l = k * k - k.powi(4);
            let hl = h * l;
            let (mut q, mut f1, mut f2, mut f3) = (0.0, 0.0, 0.0, 0.0);
            for r in &roots {
                let cl = hl + r;
                let ecl = cl.exp();
                let cl2 = cl * cl;
                let cl3 = cl2 * cl;
                q += (((cl * 0.5).exp() - 1.0) / cl).re;
                f1 += ((-4.0 - cl + ecl * (4.0 - 3.0 * cl + cl2)) / cl3).re;
                f2 += ((2.0 + cl + ecl * (cl - 2.0)) / cl3).re;
                f3 += ((-4.0 - 3.0 * cl - cl2 + ecl * (4.0 - cl)) / cl3).re;
            }
            let mean = h / CONTOUR_POINTS as f64;
            c.e.push(cast(hl.exp()));
            c.e2.push(cast((hl / 2.0).exp()));
            c.q.push(cast(q * mean));
            c.f1.push(cast(f1 * mean));
            c.f2.push(cast(f2 * mean));
            c.f3.push(cast(f3 * mean));
            c.g.push(cast(-0.5 * k));
        }
        Ok(c)
    }

    fn bins(&self) -> usize {
        self.e.len()
    }

    /// Complex scratch for [`Etdrk4::advance`]: seven spectra, one packed signal, FFT scratch.
    fn scratch_len(&self) -> usize {
        7 * self.bins() + self.fft.len() / 2 + self.fft.packed_scratch_len()
    }

    /// `out = N(v) = −½ i k F[(F⁻¹ v)²]`.
    fn nonlinear(
        &self,
        v: &[Complex<T>],
        out: &mut [Complex<T>],
        packed: &mut [Complex<T>],
        scratch: &mut [Complex<T>],
    ) {
        self.fft.inverse_packed(v, packed, scratch);
        for z in packed.iter_mut() {
            *z = Complex::new(z.re * z.re, z.im * z.im);
        }
        self.fft.forward_packed(packed, out, scratch);
        for (o, &g) in out.iter_mut().zip(&self.g) {
            // (a + ib)·(i g) = −b g + i a g
            *o = Complex::new(-o.im * g, o.re * g);
        }
    }

    /// Advances the grid values `x` by `steps` ETDRK4 steps.
    fn advance(&self, x: &mut [T], steps: usize, scratch: &mut [Complex<T>]) {
        if steps == 0 {
            return;
        }
        let bins = self.bins();
        let (v, rest) = scratch.split_at_mut(bins);
        let (n1, rest) = rest.split_at_mut(bins);
        let (n2a, rest) = rest.split_at_mut(bins);
        let (n2b, rest) = rest.split_at_mut(bins);
        let (n3, rest) = rest.split_at_mut(bins);
        let (a, rest) = rest.split_at_mut(bins);
        let (bc, rest) = rest.split_at_mut(bins);
        let (packed, fft_scratch) = rest.split_at_mut(self.fft.len() / 2);
        for (z, pair) in packed.iter_mut().zip(x.chunks_exact(2)) {
            *z = Complex::new(pair[0], pair[1]);
        }
        self.fft.forward_packed(packed, v, fft_scratch);
        let two = cast::<T>(2.0);
        for _ in 0..steps {
            self.nonlinear(v, n1, packed, fft_scratch);
            for k in 0..bins {
                a[k] = v[k] * self.e2[k] + n1[k] * self.q[k];
            }
            self.nonlinear(a, n2a, packed, fft_scratch);
            for k in 0..bins {
                bc[k] = v[k] * self.e2[k] + n2a[k] * self.q[k];
            }
            self.nonlinear(bc, n2b, packed, fft_scratch);
            for k in 0..bins {
                bc[k] = a[k] * self.e2[k] + (n2b[k] * two - n1[k]) * self.q[k];
            }
            self.nonlinear(bc, n3, packed, fft_scratch);
            for k in 0..bins {
                v[k] = v[k] * self.e[k]
                    + n1[k] * self.f1[k]
                    + (n2a[k] + n2b[k]) * (two * self.f2[k])
                    + n3[k] * self.f3[k];
            }
        }
        self.fft.inverse_packed(v, packed, fft_scratch);
        for (pair, z) in x.chunks_exact_mut(2).zip(packed.iter()) {
            pair[0] = z.re;
            pair[1] = z.im;
        }
    }
}

/// The Kuramoto–Sivashinsky model on `d` grid points with its f32 ETDRK4 coefficients
/// (ENFF_SPEC §8.4): a validated, cheaply clonable description shared by every forecast thread.
#[derive(Clone)]
pub struct KuramotoSivashinsky {
    d: usize,
    dt: f32,
    domain_pi_multiple: f64,
    etdrk4: Arc<Etdrk4<f32>>,
}

impl fmt::Debug for KuramotoSivashinsky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KuramotoSivashinsky")
            .field("d", &self.d)
            .field("dt", &self.dt)
            .field("domain_pi_multiple", &self.domain_pi_multiple)
            .finish()
    }
}

impl KuramotoSivashinsky {
    /// Smallest grid accepted on any domain; on a domain of `DL·π` the grid also needs at least
    /// `2·DL` points (see [`KuramotoSivashinsky::min_grid`]).
    pub const MIN_GRID: usize = 16;

    /// Fewest grid points for a domain of `DL·π`: `max(16, 2·DL)`, so that the highest resolved
    /// wave number `(d/2 − 1)·2/DL` (about 2) lies well inside the dissipative range `k > 1`.
    /// Coarser grids have no damped modes and blow up (256 for the paper's DL = 128).
    pub fn min_grid(domain_pi_multiple: f64) -> usize {
        let two_dl = (2.0 * domain_pi_multiple).ceil();
        if two_dl.is_finite() && two_dl < 1e9 {
            (two_dl as usize).next_multiple_of(2).max(Self::MIN_GRID)
        } else {
            usize::MAX
        }
    }

    /// The paper's domain length in multiples of π, `DL = 128` (ENFF_SPEC §8.4).
    pub const DOMAIN_PI_MULTIPLE: f64 = 128.0;

    /// A validated model on `d` grid points (even, at least
    /// [`KuramotoSivashinsky::min_grid`]), time step `dt` and domain length
    /// `domain_pi_multiple·π`; the ETDRK4 coefficients are computed in f64 and stored as f32.
    pub fn new(d: usize, dt: f32, domain_pi_multiple: f64) -> Result<Self> {
        check_positive(
            "domain_pi_multiple",
            domain_pi_multiple,
            "the domain length is DL·π with a finite positive DL (the paper uses 128)",
        )?;
        let min = Self::min_grid(domain_pi_multiple);
        if d < min || !d.is_multiple_of(2) {
            return Err(Error::invalid(
                "model.d",
                d,
                format!(
                    "Kuramoto–Sivashinsky on a domain of {domain_pi_multiple}π needs an even \
                     number of grid points, at least {min} (2·DL, so that the grid resolves the \
                     damped scales); the paper uses 256, 512 or 1024"
                ),
            ));
        }
        check_positive(
            "model.dt",
            dt as f64,
            "the Kuramoto–Sivashinsky step must be finite and positive (the paper uses 0.25)",
        )?;
        let etdrk4 = Etdrk4::<f32>::new(d, dt as f64, domain_pi_multiple)?;
        Ok(KuramotoSivashinsky {
            d,
            dt,
            domain_pi_multiple,
            etdrk4: Arc::new(etdrk4),
        })
    }

    /// The paper's model: `DL = 128` with `d` grid points and step `dt`.
    pub fn paper(d: usize, dt: f32) -> Result<Self> {
        Self::new(d, dt, Self::DOMAIN_PI_MULTIPLE)
    }

    /// Number of grid points (the state dimension).
    pub fn d(&self) -> usize {
        self.d
    }

    /// The time step the coefficients were computed for.
    pub fn dt(&self) -> f32 {
        self.dt
    }

    /// `DL` of the domain length `DL·π`.
    pub fn domain_pi_multiple(&self) -> f64 {
        self.domain_pi_multiple
    }

    /// The f32 ETDRK4 tables of the model, concatenated: `e^{hL}`, `e^{hL/2}`, `Q`, `f1`,
    /// `f2`, `f3` and `−k/2`, each with `d/2 + 1` values (one per real-FFT bin). The GPU
    /// forecast uploads exactly these, so both backends step with the same coefficients.
    pub fn etdrk4_table(&self) -> Vec<f32> {
        let c = &self.etdrk4;
        [&c.e, &c.e2, &c.q, &c.f1, &c.f2, &c.f3, &c.g]
            .iter()
            .flat_map(|v| v.iter().copied())
            .collect()
    }

    /// Complex scratch values [`KuramotoSivashinsky::advance`] needs per state.
    pub fn scratch_len(&self) -> usize {
        self.etdrk4.scratch_len()
    }

    /// Advances one state (`d` grid values) by `steps` ETDRK4 steps, in place.
    ///
    /// `scratch` must hold at least [`KuramotoSivashinsky::scratch_len`] values.
    pub fn advance(&self, x: &mut [f32], steps: usize, scratch: &mut [Complex<f32>]) {
        self.etdrk4.advance(x, steps, scratch);
    }

    /// The grid `x_j = DL·π·j/d`, `j = 1..=d` (ENFF_SPEC §8.4).
    pub fn grid(&self) -> Vec<f64> {
        (1..=self.d)
            .map(|j| self.domain_pi_multiple * std::f64::consts::PI * j as f64 / self.d as f64)
            .collect()
    }

    /// The reference initial condition (DAPPER-style, ENFF_SPEC §8.4): the field
    /// `cos(x/16)(1 + sin(x/16))` on [`KuramotoSivashinsky::grid`], integrated in f64 with
    /// 600 ETDRK4 steps of size 0.25 (model time 150, whatever the model's own `dt`), cast to
    /// f32. The experiment adds N(0, 1) noise from the truth stream and spins it up.
    pub fn reference_initial_condition(&self) -> Result<Vec<f32>> {
        let h = INITIAL_CONDITION_STEP;
        let coeffs = Etdrk4::<f64>::new(self.d, h, self.domain_pi_multiple)?;
        let mut u: Vec<f64> = self
            .grid()
            .iter()
            .map(|&x| (x / 16.0).cos() * (1.0 + (x / 16.0).sin()))
            .collect();
        let mut scratch = vec![Complex::new(0.0, 0.0); coeffs.scratch_len()];
        let steps = (INITIAL_CONDITION_TIME / h).round() as usize;
        coeffs.advance(&mut u, steps, &mut scratch);
        if let Some(j) = u.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: "Kuramoto–Sivashinsky initial condition".into(),
                location: format!("grid point {j}"),
                value: u[j],
                hint: format!(
                    "the reference field blew up on {} grid points with domain {}π",
                    self.d, self.domain_pi_multiple
                ),
            });
        }
        Ok(u.iter().map(|&v| v as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etdrk4_coefficients_at_zero_wave_number_are_the_exact_limits() {
        // At L = 0 the contour means must give the z → 0 limits of Kassam–Trefethen's
        // functions: E = E2 = 1, Q = h/2, f1 = f2 = f3 = h/6.
        let h = 0.25;
        let c = Etdrk4::<f64>::new(64, h, 128.0).unwrap();
        assert_eq!(c.e[0], 1.0);
        assert!((c.q[0] - h / 2.0).abs() < 1e-12, "Q {}", c.q[0]);
        for f in [c.f1[0], c.f2[0], c.f3[0]] {
            assert!((f - h / 6.0).abs() < 1e-12, "f {f}");
        }
        // The Nyquist wave number is set to 0 as well.
        assert_eq!(c.g[32], 0.0);
        assert_eq!(c.e[32], 1.0);
    }

    #[test]
    fn ks_refuses_grids_it_cannot_take() {
        for d in [0usize, 8, 15, 128, 254, 255, 1023] {
            let e = KuramotoSivashinsky::paper(d, 0.25).unwrap_err().to_string();
            assert!(e.contains("even") && e.contains("at least 256"), "{e}");
        }
        assert_eq!(KuramotoSivashinsky::min_grid(16.0), 32);
        assert_eq!(KuramotoSivashinsky::min_grid(3.0), 16);
        assert!(KuramotoSivashinsky::new(32, 0.25, 16.0).is_ok());
        assert!(KuramotoSivashinsky::paper(256, 0.0).is_err());
        assert!(KuramotoSivashinsky::new(256, 0.25, f64::NAN).is_err());
    }
}
