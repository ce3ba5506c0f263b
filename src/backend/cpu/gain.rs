//! CPU twin of `shaders/gain_guidance.wgsl`: the banded-gain step of covariance guidance
//! ([`crate::backend::GainStep`]), parallel over members.

use rayon::prelude::*;

use super::{Cpu, CpuBuffer};
use crate::backend::{check_gain_step, DeviceBuffer, GainStep};
use crate::error::Result;

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
        g.clip
            .as_ref()
            .map(|c| (c.linearization, c.forecast_var, c.scale, c.noise_var)),
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
    let clip = g.clip.as_ref().map(|c| {
        (
            c.linearization.as_slice(),
            c.forecast_var.as_slice(),
            c.scale,
            c.noise_var,
        )
    });
    let row = |(k, st): (usize, &mut [f32])| {
        let xe = &endpoint[k * d..(k + 1) * d];
        let v = &velocity[k * d..(k + 1) * d];
        // The innovations of this member, once per observation (not once per gain entry).
        let r: Vec<f32> = if hg != 0.0 {
            (0..m)
                .map(|q| {
                    let hx = op.pointwise.value(xe[op.component(q)]);
                    let r = match mean {
                        Some((hb, a)) => (y[q] - hb[q]) - a * (hx - hb[q]),
                        None => y[q] - hx,
                    };
                    match clip {
                        Some((lin, var, scale, noise_var)) => {
                            let c = op.component(q);
                            let dh = op.pointwise.derivative(lin[c]);
                            let bound = scale * (dh * dh * var[c].max(0.0) + noise_var).sqrt();
                            r.clamp(-bound, bound)
                        }
                        None => r,
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
