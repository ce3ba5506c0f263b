//! Uniform parameter blocks of the WGSL kernels. Each struct is `#[repr(C)]` + `Pod`, padded to
//! 16 bytes, and names its WGSL mirror; the WGSL struct names this file.

use bytemuck::{Pod, Zeroable};

/// Mirror of `LogitParams` in `shaders/flow_logits.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LogitParams {
    pub n_x: u32,
    pub n_t: u32,
    pub d: u32,
    pub slab_len: u32,
    pub n_total: u32,
    pub row0_x: u32,
    pub row0_t: u32,
    pub n_slabs: u32,
    pub a: f32,
    pub b: f32,
    pub has_source: u32,
    pub has_bias: u32,
    pub neg_inv_2s2: f32,
    pub _pad: [u32; 3],
}

/// Mirror of `SoftmaxParams` in `shaders/flow_softmax.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SoftmaxParams {
    pub n: u32,
    pub flag_slot: u32,
    pub _pad: [u32; 2],
}

/// Mirror of `UpdateParams` in `shaders/flow_update.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct UpdateParams {
    pub n_rows: u32,
    pub n_t: u32,
    pub d: u32,
    pub n_total: u32,
    pub row0_state: u32,
    pub row0_t: u32,
    pub has_source: u32,
    pub has_eval: u32,
    pub has_prev: u32,
    pub has_vel_out: u32,
    pub first: u32,
    pub last: u32,
    pub guided: u32,
    pub obs_every: u32,
    pub obs_offset: u32,
    pub obs_m: u32,
    pub pointwise: u32,
    pub cx: f32,
    pub ua: f32,
    pub ub: f32,
    pub h_new: f32,
    pub h_old: f32,
    pub scale: f32,
    pub horizon: f32,
    pub clamp: f32,
    pub _pad: [u32; 3],
}

/// Mirror of `NoiseParams` in `shaders/noise.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NoiseParams {
    pub key0: u32,
    pub key1: u32,
    pub ctr2: u32,
    pub ctr3: u32,
    pub rows: u32,
    pub cols: u32,
    pub row0: u32,
    pub has_mean: u32,
    pub scale: f32,
    pub mean_row0: u32,
    pub _pad: [u32; 2],
}

/// Mirror of `EnsembleParams` in `shaders/ensemble.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct EnsembleParams {
    pub rows: u32,
    pub cols: u32,
    pub first: u32,
    pub flag_slot: u32,
    pub row0: u32,
    pub m: u32,
    pub every: u32,
    pub offset: u32,
    pub pointwise: u32,
    pub count: u32,
    pub _pad: [u32; 2],
    pub inv_n: f32,
    pub inv_n1: f32,
    pub gamma: f32,
    pub neg_inv_2s2: f32,
}

/// Mirror of `ModelParams` in `shaders/models.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ModelParams {
    pub rows: u32,
    pub d: u32,
    pub system: u32,
    pub _pad: u32,
    pub dt: f32,
    pub p0: f32,
    pub p1: f32,
    pub p2: f32,
    pub c1: f32,
    pub c2: f32,
    pub c3: f32,
    pub c4: f32,
}

const _: () = {
    assert!(std::mem::size_of::<LogitParams>().is_multiple_of(16));
    assert!(std::mem::size_of::<SoftmaxParams>().is_multiple_of(16));
    assert!(std::mem::size_of::<UpdateParams>().is_multiple_of(16));
    assert!(std::mem::size_of::<NoiseParams>().is_multiple_of(16));
    assert!(std::mem::size_of::<EnsembleParams>().is_multiple_of(16));
    assert!(std::mem::size_of::<ModelParams>().is_multiple_of(16));
};
