//! The banded-gain step of covariance guidance on the GPU (`shaders/gain_guidance.wgsl`; CPU
//! twin `backend/cpu/gain.rs`). The pipeline is built on first use.

use bytemuck::{Pod, Zeroable};

use super::{groups_1d, make_kernel, pointwise_code, Access, Gpu, GpuBuffer, Kernel};
use crate::backend::{check_gain_step, GainStep};
use crate::error::{Error, Result};

/// Mirror of `GainParams` in `shaders/gain_guidance.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct GainParams {
    rows: u32,
    d: u32,
    w: u32,
    m: u32,
    every: u32,
    offset: u32,
    pointwise: u32,
    _pad0: u32,
    h_vel: f32,
    h_gain: f32,
    has_mean: u32,
    alpha: f32,
    has_clip: u32,
    clip_scale: f32,
    noise_var: f32,
    _pad1: u32,
}

fn kernel(gpu: &Gpu) -> &Kernel {
    gpu.gain_kernel.get_or_init(|| {
        let module = gpu
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("gain_guidance"),
                source: wgpu::ShaderSource::Wgsl(
                    include_str!("../../../shaders/gain_guidance.wgsl").into(),
                ),
            });
        use Access::*;
        make_kernel(
            &gpu.device,
            "gain_guidance",
            &module,
            "main",
            &[
                (1, ReadWrite),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, Read),
                (6, Read),
                (7, Read),
                (8, Read),
                (9, Read),
            ],
        )
    })
}

pub(super) fn gain_step(gpu: &Gpu, state: &mut GpuBuffer, g: &GainStep<'_, Gpu>) -> Result<()> {
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
    let d = state.cols;
    if state.rows == 0 || d == 0 {
        return Ok(());
    }
    for b in [g.endpoint, g.velocity] {
        if b.rows_per_chunk != state.rows_per_chunk {
            return Err(Error::Unsupported {
                backend: "gpu".into(),
                what: "a guidance step over buffers split into different member blocks".into(),
                fix: "allocate the state, endpoint and velocity with the same shape".into(),
            });
        }
    }
    let gain = g.gain.single("the banded gain")?;
    let index = g.index.single("the gain observation index")?;
    let y = g.y.single("the observation")?;
    let hbar = match g.mean_obs {
        Some((b, _)) => b.single("the mean observed endpoint")?,
        None => y,
    };
    let (lin, var) = match &g.clip {
        Some(c) => (
            c.linearization.single("the clip linearization point")?,
            c.forecast_var.single("the clip forecast variance")?,
        ),
        None => (y, y),
    };
    let k = kernel(gpu);
    for c in 0..state.chunks.len() {
        let (r0, r1) = state.chunk_rows(c);
        let p = GainParams {
            rows: super::u32_of(r1 - r0, "members per block")?,
            d: super::u32_of(d, "state dimension")?,
            w: super::u32_of(w, "gain window")?,
            m: m as u32,
            every: super::u32_of(g.observe.every, "observe.every")?,
            offset: super::u32_of(g.observe.offset, "observe.offset")?,
            pointwise: pointwise_code(g.observe.pointwise),
            h_vel: g.h_velocity,
            h_gain: g.h_gain,
            has_mean: g.mean_obs.is_some() as u32,
            alpha: g.mean_obs.map_or(1.0, |p| p.1),
            has_clip: g.clip.is_some() as u32,
            clip_scale: g.clip.as_ref().map_or(0.0, |c| c.scale),
            noise_var: g.clip.as_ref().map_or(0.0, |c| c.noise_var),
            ..Default::default()
        };
        super::u32_of((r1 - r0) * d, "members × state dimension")?;
        let groups = groups_1d(((r1 - r0) * d) as u64)?;
        gpu.dispatch(
            k,
            &p,
            &[
                &state.chunks[c],
                &g.velocity.chunks[c],
                &g.endpoint.chunks[c],
                gain,
                index,
                y,
                hbar,
                lin,
                var,
            ],
            (groups.0, groups.1, 1),
        )?;
    }
    Ok(())
}
