//! Covariance guidance on the GPU: the banded-gain step (`shaders/gain_guidance.wgsl`) and the
//! local gains of a stage (`shaders/gain_local.wgsl`); CPU twins in `backend/cpu/gain.rs`.
//! The pipelines are built on first use.

use std::sync::Mutex;

use bytemuck::{Pod, Zeroable};

use super::{groups_1d, groups_2d, make_kernel, pointwise_code, Access, Gpu, GpuBuffer, Kernel};
use crate::backend::{check_gain_step, check_local_gains, Backend, GainStep, LocalGains};
use crate::error::{Error, Result};

/// Widest localization window the observation-space kernel solves (`WMAX` in
/// `shaders/gain_local.wgsl`): its `w × w` system and a member tile stay within 16 KiB of
/// workgroup memory. Wider windows go to the ensemble-space kernel.
pub const GPU_MAX_WINDOW: usize = 48;

/// Largest ensemble the ensemble-space kernel solves (`NMAX` in `shaders/gain_local.wgsl`,
/// an `n × n` system in workgroup memory, any window width). Only a problem with both
/// `n` and `w` above these limits computes its gains on the host.
pub const GPU_MAX_ENS_MEMBERS: usize = 48;

/// Which kernel computes the local gains of an `n`-member ensemble with windows of `w`
/// entries: the CPU twin's choice (observation space when `w ≤ n`, else ensemble space)
/// within the kernels' limits, `None` when neither takes it.
pub fn gain_space(n: usize, w: usize) -> Option<GainSpace> {
    if w <= n {
        (w <= GPU_MAX_WINDOW).then_some(GainSpace::Observation)
    } else {
        // w > n > GPU_MAX_ENS_MEMBERS = GPU_MAX_WINDOW leaves no kernel.
        (n <= GPU_MAX_ENS_MEMBERS).then_some(GainSpace::Ensemble)
    }
}

/// The space a local-gain kernel solves in ([`gain_space`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GainSpace {
    /// `w × w` Woodbury system (`gains_main`).
    Observation,
    /// `n × n` system (`gains_ens_main`).
    Ensemble,
}

/// The covariance-guidance pipelines and the scratch of the local gains.
pub(super) struct GainKernels {
    step: Kernel,
    moments: Kernel,
    gains: Kernel,
    gains_ens: Kernel,
    /// Forecast and endpoint column means (`2·d`).
    moments_buf: Mutex<Option<wgpu::Buffer>>,
}

/// Mirror of `LocalGainParams` in `shaders/gain_local.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct LocalGainParams {
    n: u32,
    d: u32,
    w: u32,
    m: u32,
    every: u32,
    offset: u32,
    pointwise: u32,
    groups_x: u32,
    inv_sigma: f32,
    stages: u32,
    inv_n: f32,
    inv_n1: f32,
    with_var: u32,
    table0: u32,
    _pad1: u32,
    _pad2: u32,
    taus: [f32; MAX_DISPATCH_STAGES],
}

/// Stages one local-gain dispatch solves (`taus` in `shaders/gain_local.wgsl`); more stages
/// take more dispatches, each rebuilding the stage-independent matrix.
const MAX_DISPATCH_STAGES: usize = 32;

const _: () = assert!(
    std::mem::size_of::<LocalGainParams>().is_multiple_of(16)
        && std::mem::size_of::<LocalGainParams>() as u64 <= super::PARAM_SLOT
);

impl Default for LocalGainParams {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

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
    table: u32,
    h_vel: f32,
    h_gain: f32,
    has_mean: u32,
    alpha: f32,
    has_clip: u32,
    clip_scale: f32,
    _pad1: u32,
    _pad2: u32,
}

fn kernels(gpu: &Gpu) -> &GainKernels {
    gpu.gain_kernels.get_or_init(|| {
        let module = |label: &str, src: &str| {
            gpu.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(label),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                })
        };
        let step = module("gain_guidance", with_observe!("gain_guidance.wgsl"));
        let local = module("local_gains", with_observe!("gain_local.wgsl"));
        use Access::*;
        const LOCAL_BINDINGS: &[(u32, Access)] = &[
            (1, Read),
            (2, Read),
            (3, ReadWrite),
            (4, ReadWrite),
            (5, Read),
            (6, Read),
            (7, ReadWrite),
        ];
        GainKernels {
            step: make_kernel(
                &gpu.device,
                "gain_guidance",
                &step,
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
                ],
            ),
            moments: make_kernel(
                &gpu.device,
                "gain_moments",
                &local,
                "moments_main",
                LOCAL_BINDINGS,
            ),
            gains: make_kernel(
                &gpu.device,
                "local_gains",
                &local,
                "gains_main",
                LOCAL_BINDINGS,
            ),
            gains_ens: make_kernel(
                &gpu.device,
                "local_gains_ens",
                &local,
                "gains_ens_main",
                LOCAL_BINDINGS,
            ),
            moments_buf: Mutex::new(None),
        }
    })
}

/// [`Backend::local_gains`] on the device: two dispatches (one more per 32 stages), no
/// read-back, in the space
/// [`gain_space`] picks. Ensembles split into member blocks, and windows wider than
/// [`GPU_MAX_WINDOW`] with more than [`GPU_MAX_ENS_MEMBERS`] members, are
/// [`Error::Unsupported`]: the filter then chooses the host path
/// ([`crate::backend::local_gains_on_host`]).
pub(super) fn local_gains(
    gpu: &Gpu,
    g: &LocalGains<'_, Gpu>,
    gain: &mut GpuBuffer,
    hbar: &mut GpuBuffer,
) -> Result<()> {
    let shape = check_local_gains(g, gain, hbar)?;
    let split = [g.forecast, g.endpoint, g.index, g.taper, &*gain, &*hbar]
        .iter()
        .any(|b| b.chunks.len() != 1);
    let space = gain_space(shape.n, shape.w);
    let Some(space) = space.filter(|_| !split) else {
        let what = if split {
            "an ensemble split into member blocks".to_string()
        } else {
            format!(
                "windows of {} observations and {} members, above both kernels' limits \
                 ({GPU_MAX_WINDOW} and {GPU_MAX_ENS_MEMBERS})",
                shape.w, shape.n
            )
        };
        return Err(Error::Unsupported {
            backend: format!("gpu ({})", gpu.summary.name),
            what,
            fix: "compute the gains on the host (enff::backend::local_gains_on_host), as the \
                  filters do"
                .into(),
        });
    };
    let (n, d) = (shape.n, shape.d);
    if d == 0 {
        return Ok(());
    }
    let k = kernels(gpu);
    let moments = {
        let mut slot = k
            .moments_buf
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        gpu.scratch_buf(&mut slot, 2 * d, "gain moments")?.clone()
    };
    let (gx, gy) = groups_2d(d)?;
    let mut p = LocalGainParams {
        n: super::u32_of(n, "ensemble size")?,
        d: d as u32,
        w: shape.w as u32,
        m: super::u32_of(shape.m, "observation dimension")?,
        every: super::u32_of(g.observe.every, "observe.every")?,
        offset: super::u32_of(g.observe.offset, "observe.offset")?,
        pointwise: pointwise_code(g.observe.pointwise),
        groups_x: gx,
        inv_sigma: 1.0 / g.noise_std,
        inv_n: 1.0 / n as f32,
        inv_n1: 1.0 / (n - 1) as f32,
        with_var: (hbar.rows == 2) as u32,
        ..Default::default()
    };
    super::u32_of(n * d, "members × state dimension")?;
    super::u32_of(2 * d, "2 × state dimension")?;
    super::u32_of(
        g.taus.len() * d * shape.w,
        "stages × state dimension × window",
    )?;
    let buffers = [
        &g.forecast.chunks[0],
        &g.endpoint.chunks[0],
        &moments,
        &hbar.chunks[0],
        &g.index.chunks[0],
        &g.taper.chunks[0],
        &gain.chunks[0],
    ];
    let g1 = groups_1d(d as u64)?;
    gpu.dispatch(&k.moments, &p, &buffers, (g1.0, g1.1, 1))?;
    if g.taus.is_empty() {
        return Ok(());
    }
    let solve = match space {
        GainSpace::Observation => &k.gains,
        GainSpace::Ensemble => &k.gains_ens,
    };
    for (c, taus) in g.taus.chunks(MAX_DISPATCH_STAGES).enumerate() {
        p.table0 = (c * MAX_DISPATCH_STAGES) as u32;
        p.stages = taus.len() as u32;
        p.taus[..taus.len()].copy_from_slice(taus);
        gpu.dispatch(solve, &p, &buffers, (gx, gy, 1))?;
    }
    // A non-finite gain (an overflowed forecast) is reported at the next sync.
    gpu.check_finite(gain, "covariance guidance gain")
}

pub(super) fn gain_step(gpu: &Gpu, state: &mut GpuBuffer, g: &GainStep<'_, Gpu>) -> Result<()> {
    let (m, w) = check_gain_step(state, g)?;
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
    let ivar = match &g.clip {
        Some(c) => c.innovation_var.single("the innovation variances")?,
        None => y,
    };
    let k = &kernels(gpu).step;
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
            table: super::u32_of(g.table, "gain table")?,
            h_vel: g.h_velocity,
            h_gain: g.h_gain,
            has_mean: g.mean_obs.is_some() as u32,
            alpha: g.mean_obs.map_or(1.0, |p| p.1),
            has_clip: g.clip.is_some() as u32,
            clip_scale: g.clip.as_ref().map_or(0.0, |c| c.scale),
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
                ivar,
            ],
            (groups.0, groups.1, 1),
        )?;
    }
    Ok(())
}
