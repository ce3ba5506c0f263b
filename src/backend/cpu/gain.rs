//! CPU twins of the covariance-guidance kernels: the banded-gain step of
//! `shaders/gain_guidance.wgsl` ([`crate::backend::GainStep`], parallel over members) and the
//! local gains of `shaders/local_gains.wgsl` ([`crate::backend::LocalGains`], parallel over
//! components).

use rayon::prelude::*;

use super::{Cpu, CpuBuffer};
use crate::backend::{check_gain_step, DeviceBuffer, GainShape, GainStep};
use crate::error::{Error, Result};
use crate::observe::Observe;

pub(crate) fn gain_step(cpu: &Cpu, state: &mut CpuBuffer, g: &GainStep<'_, Cpu>) -> Result<()> {
    let (m, w) = check_gain_step(
        state,
        &g.observe,
        g.y,
        g.gain,
        g.index,
        g.endpoint,
        g.velocity,
        g.mean_obs.map(|p| p.0),
    )?;
    let (n, d) = (state.rows(), state.cols());
    if n == 0 || d == 0 {
        return Ok(());
    }
    let y = g.y.as_slice();
    let gain = g.gain.as_slice();
    let index = g.index.as_slice();
    let endpoint = g.endpoint.as_slice();
    let velocity = g.velocity.as_slice();
    let (hv, hg) = (g.h_velocity, g.h_gain);
    let op = g.observe;
    let mean = g.mean_obs.map(|(b, a)| (b.as_slice(), a));
    let row = |(k, st): (usize, &mut [f32])| {
        let xe = &endpoint[k * d..(k + 1) * d];
        let v = &velocity[k * d..(k + 1) * d];
        // The innovations of this member, once per observation (not once per gain entry).
        let r: Vec<f32> = if hg != 0.0 {
            (0..m)
                .map(|q| {
                    let hx = op.pointwise.value(xe[op.component(q)]);
                    match mean {
                        Some((hb, a)) => (y[q] - hb[q]) - a * (hx - hb[q]),
                        None => y[q] - hx,
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        for i in 0..d {
            let mut acc = 0.0f32;
            if hg != 0.0 {
                for c in 0..w {
                    let gk = gain[i * w + c];
                    if gk != 0.0 {
                        // Indices were written by the host as exact integers below m.
                        let q = (index[i * w + c] as usize).min(m - 1);
                        acc += gk * r[q];
                    }
                }
            }
            st[i] = st[i] + hv * v[i] + hg * acc;
        }
    };
    let states = state.as_mut_slice();
    if cpu.parts_for(n * d * w.max(1)) > 1 {
        states.par_chunks_mut(d).enumerate().for_each(row);
    } else {
        states.chunks_mut(d).enumerate().for_each(row);
    }
    Ok(())
}

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
    /// `τ`.
    pub tau: f32,
}

/// Per-thread scratch of [`local_gains`] (no allocation per component).
#[derive(Default)]
struct Scratch {
    /// Valid window entries: (entry, component, √ρ·h'/σ).
    entries: Vec<(usize, usize, f64)>,
    mat: Vec<f64>,
    rhs: Vec<f64>,
}

/// Components per parallel task of [`local_gains`].
const GAIN_CHUNK: usize = 32;

/// CPU twin of the local-gain kernels (`shaders/local_gains.wgsl`): the gains of one
/// covariance-guidance stage into `gain` (`d × w`) and the mean observed endpoint into `hbar`
/// (`m`). Accumulates in f64. Each component is solved in whichever space is smaller: with
/// `w_i ≤ n` window observations in observation space (the Woodbury form
/// `K_i = (1/σ) D^{1/2}(I + τ D^{1/2} BᵀB D^{1/2})⁻¹ D^{1/2} Bᵀ a_i`, a `w_i × w_i` Cholesky),
/// otherwise in ensemble space (`(I + τ G_i)⁻¹ a_i`, `n × n`), like the f64 reference
/// [`crate::filter::covariance::local_gains`]; both are the same matrix identity.
pub fn local_gains(g: &GainInputs<'_>, gain: &mut [f32], hbar: &mut [f32]) -> Result<()> {
    let GainShape { n, d, m, w } = g.shape;
    let op = g.observe;
    let len_ok = g.x.len() == n * d
        && g.xh.len() == n * d
        && g.index.len() == d * w
        && g.taper.len() == d * w
        && gain.len() == d * w
        && hbar.len() == m;
    if !len_ok || n < 2 {
        return Err(Error::shape(
            "covariance-guidance gain inputs",
            format!("n = {n} ≥ 2, d = {d}, w = {w}, m = {m}"),
            "buffers of other lengths".to_string(),
        ));
    }
    if d == 0 || w == 0 {
        return Ok(());
    }
    // Column means of the forecast and of the endpoints (the linearization point).
    let mut fmean = vec![0.0f64; d];
    let mut lin = vec![0.0f64; d];
    for (row, rowh) in g.x.chunks(d).zip(g.xh.chunks(d)) {
        for ((a, b), (&v, &vh)) in fmean.iter_mut().zip(lin.iter_mut()).zip(row.iter().zip(rowh)) {
            *a += v as f64;
            *b += vh as f64;
        }
    }
    let inv_n = 1.0 / n as f64;
    fmean.iter_mut().for_each(|v| *v *= inv_n);
    lin.iter_mut().for_each(|v| *v *= inv_n);
    // h̄ and h'(x̄̂₁)/σ of every observation.
    let sigma = g.noise_std as f64;
    let mut dh = vec![0.0f64; m];
    for (q, (hb, dq)) in hbar.iter_mut().zip(dh.iter_mut()).enumerate() {
        let c = op.component(q);
        let s: f64 = (0..n)
            .map(|k| op.pointwise.value(g.xh[k * d + c]) as f64)
            .sum();
        *hb = (s * inv_n) as f32;
        *dq = op.pointwise.derivative(lin[c] as f32) as f64 / sigma;
    }
    // Scaled anomalies, component-major: at[c·n + k] = (x[k, c] − x̄_c)/√(n − 1).
    let scale = 1.0 / ((n - 1) as f64).sqrt();
    let mut at = vec![0.0f64; n * d];
    at.par_chunks_mut(n.max(1) * 256)
        .enumerate()
        .for_each(|(blk, out)| {
            let c0 = blk * 256;
            for (cc, col) in out.chunks_mut(n).enumerate() {
                let c = c0 + cc;
                for (k, v) in col.iter_mut().enumerate() {
                    *v = (g.x[k * d + c] as f64 - fmean[c]) * scale;
                }
            }
        });
    let tau = g.tau as f64;
    gain.par_chunks_mut(w * GAIN_CHUNK)
        .enumerate()
        .for_each_init(Scratch::default, |sc, (blk, rows)| {
            for (ii, row) in rows.chunks_mut(w).enumerate() {
                let i = blk * GAIN_CHUNK + ii;
                let wrow = &g.index[i * w..(i + 1) * w];
                let trow = &g.taper[i * w..(i + 1) * w];
                sc.entries.clear();
                for (e, (&qf, &rho)) in wrow.iter().zip(trow).enumerate() {
                    if rho > 0.0 {
                        let q = (qf as usize).min(m - 1);
                        let s = (rho as f64).sqrt() * dh[q];
                        sc.entries.push((e, op.component(q), s));
                    }
                }
                row.iter_mut().for_each(|v| *v = 0.0);
                let wi = sc.entries.len();
                if wi == 0 {
                    continue;
                }
                let ai = &at[i * n..(i + 1) * n];
                let col = |c: usize| &at[c * n..(c + 1) * n];
                let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
                if wi <= n {
                    // Observation space: (I + τ S) z = D^{1/2} Bᵀ a_i, S = D^{1/2} BᵀB D^{1/2}.
                    sc.mat.resize(wi * wi, 0.0);
                    sc.rhs.resize(wi, 0.0);
                    for r in 0..wi {
                        let (_, cr, sr) = sc.entries[r];
                        let ar = col(cr);
                        for c in 0..=r {
                            let (_, cc, scc) = sc.entries[c];
                            let v = tau * sr * scc * dot(ar, col(cc));
                            sc.mat[r * wi + c] = v + if r == c { 1.0 } else { 0.0 };
                        }
                        sc.rhs[r] = sr * dot(ar, ai);
                    }
                    cholesky(&mut sc.mat, wi);
                    solve(&sc.mat, wi, &mut sc.rhs);
                    for (r, &(e, _, _)) in sc.entries.iter().enumerate() {
                        row[e] = ((trow[e] as f64).sqrt() / sigma * sc.rhs[r]) as f32;
                    }
                } else {
                    // Ensemble space: (I + τ G) v = a_i, G = Σ_e s_e² a_e a_eᵀ.
                    sc.mat.resize(n * n, 0.0);
                    sc.rhs.resize(n, 0.0);
                    sc.mat.iter_mut().for_each(|v| *v = 0.0);
                    for &(_, c, s) in &sc.entries {
                        let a = col(c);
                        let s2 = tau * s * s;
                        for r in 0..n {
                            let f = s2 * a[r];
                            for (mv, av) in sc.mat[r * n..r * n + r + 1].iter_mut().zip(a) {
                                *mv += f * av;
                            }
                        }
                    }
                    for r in 0..n {
                        sc.mat[r * n + r] += 1.0;
                    }
                    cholesky(&mut sc.mat, n);
                    sc.rhs.copy_from_slice(ai);
                    solve(&sc.mat, n, &mut sc.rhs);
                    for &(e, c, s) in &sc.entries {
                        let sq = (trow[e] as f64).sqrt();
                        row[e] = (sq / sigma * s * dot(col(c), &sc.rhs)) as f32;
                    }
                }
            }
        });
    if let Some(e) = gain.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: "covariance guidance gain".into(),
            location: format!("component {}, entry {}", e / w, e % w),
            value: gain[e] as f64,
            hint: "the forecast ensemble overflowed; check the model step".into(),
        });
    }
    Ok(())
}

/// In-place Cholesky factorization of the SPD matrix in the lower triangle of `l` (`n × n`),
/// with the diagonal floored at 1e-12 before the square root (the matrices here are `I + τ·S`,
/// `S ⪰ 0`, so round-off is the only way below 1).
fn cholesky(l: &mut [f64], n: usize) {
    for j in 0..n {
        let s = l[j * n + j] - l[j * n..j * n + j].iter().map(|v| v * v).sum::<f64>();
        let djj = s.max(1e-12).sqrt();
        l[j * n + j] = djj;
        for r in j + 1..n {
            let s = l[r * n + j]
                - (0..j)
                    .map(|k| l[r * n + k] * l[j * n + k])
                    .sum::<f64>();
            l[r * n + j] = s / djj;
        }
    }
}

/// Solves `L Lᵀ v = rhs` in place.
fn solve(l: &[f64], n: usize, v: &mut [f64]) {
    for r in 0..n {
        let s = v[r] - (0..r).map(|k| l[r * n + k] * v[k]).sum::<f64>();
        v[r] = s / l[r * n + r];
    }
    for r in (0..n).rev() {
        let s = v[r] - (r + 1..n).map(|k| l[k * n + r] * v[k]).sum::<f64>();
        v[r] = s / l[r * n + r];
    }
}
