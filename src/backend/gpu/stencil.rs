//! The 2-D Navier–Stokes forecast on the GPU (`shaders/stencil_ns.wgsl`): the CPU model's Chorin
//! projection step (`model/ns.rs`), kernel by kernel, for every member and grid cell at once.
//!
//! One step is a predictor, a divergence, the configured Jacobi sweeps (warm-started from the
//! state's own pressure, ping-ponging between it and a scratch field) and the correction:
//! `3 + sweeps` dispatches. The per-member scratch `(u*, v*, b, p_tmp)` (`4n²` values) is
//! allocated once per ensemble size and reused; the forcing row once per model.

use std::sync::Mutex;

use bytemuck::{Pod, Zeroable};

use super::{groups_1d, make_kernel, u32_of, Access, Gpu, GpuBuffer, Kernel};
use crate::error::{Error, Result};
use crate::model::NavierStokes2d;

/// Mirror of `NsParams` in `shaders/stencil_ns.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct NsParams {
    n: u32,
    rows: u32,
    mode: u32,
    _pad: u32,
    dt: f32,
    nu: f32,
    inv_2h: f32,
    inv_h2: f32,
    inv_dt: f32,
    g: f32,
    cx: f32,
    cy: f32,
    cb: f32,
    _pad1: [u32; 3],
}

const _: () = assert!(std::mem::size_of::<NsParams>().is_multiple_of(16));

#[derive(Default)]
pub(super) struct StencilScratch {
    /// The forcing row uploaded to `forcing`.
    forcing_row: Vec<f32>,
    forcing: Option<wgpu::Buffer>,
    work: Option<wgpu::Buffer>,
}

/// Pipelines and scratch of the Navier–Stokes kernels.
pub(super) struct Stencil {
    predict: Kernel,
    divergence: Kernel,
    jacobi: Kernel,
    correct: Kernel,
    scratch: Mutex<StencilScratch>,
}

impl Stencil {
    pub(super) fn new(device: &wgpu::Device) -> Stencil {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("ns"),
            source: wgpu::ShaderSource::Wgsl(
                include_str!("../../../shaders/stencil_ns.wgsl").into(),
            ),
        });
        use Access::*;
        let k = |name: &'static str, entry: &str, binds: &[(u32, Access)]| {
            make_kernel(device, name, &module, entry, binds)
        };
        Stencil {
            predict: k(
                "ns_predict",
                "predict",
                &[(1, ReadWrite), (2, ReadWrite), (3, Read)],
            ),
            divergence: k("ns_divergence", "divergence", &[(2, ReadWrite)]),
            jacobi: k("ns_jacobi", "jacobi", &[(1, ReadWrite), (2, ReadWrite)]),
            correct: k("ns_correct", "correct", &[(1, ReadWrite), (2, ReadWrite)]),
            scratch: Mutex::new(StencilScratch::default()),
        }
    }
}

impl Gpu {
    /// Navier–Stokes forecast of every member: `steps` projection steps of the CPU model.
    pub(super) fn advance_ns(
        &self,
        ns: &NavierStokes2d,
        states: &mut GpuBuffer,
        steps: usize,
    ) -> Result<()> {
        let n = ns.n();
        let nn = n * n;
        let rows_max = states.rows_per_chunk.min(states.rows).max(1);
        let (forcing, work) = {
            let mut s =
                self.stencil.scratch.lock().map_err(|_| {
                    Error::Gpu("stencil scratch poisoned by an earlier panic".into())
                })?;
            if s.forcing.is_none() || s.forcing_row != ns.forcing_row() {
                s.forcing = Some(self.table_buffer("enff ns forcing", ns.forcing_row())?);
                s.forcing_row = ns.forcing_row().to_vec();
            }
            let work = self
                .scratch_buf(&mut s.work, 4 * nn * rows_max, "Navier–Stokes scratch")?
                .clone();
            (s.forcing.clone().expect("just set"), work)
        };
        // The constants exactly as the CPU model computes them (f32).
        let h = ns.spacing();
        let dt = ns.dt();
        let inv_2h = 1.0 / (2.0 * h);
        let (dx2, dy2) = (h * h, h * h);
        let denom = 2.0 * (dx2 + dy2);
        let base = NsParams {
            n: u32_of(n, "grid side")?,
            rows: 0,
            mode: 0,
            _pad: 0,
            dt,
            nu: ns.viscosity(),
            inv_2h,
            inv_h2: 1.0 / (h * h),
            inv_dt: 1.0 / dt,
            g: dt * inv_2h,
            cx: dy2 / denom,
            cy: dx2 / denom,
            cb: dx2 * dy2 / denom,
            _pad1: [0; 3],
        };
        let sweeps = ns.jacobi_sweeps();
        for (c, chunk) in states.chunks.iter().enumerate() {
            let (r0, r1) = states.chunk_rows(c);
            let rows = r1 - r0;
            if rows == 0 {
                continue;
            }
            let p = NsParams {
                rows: u32_of(rows, "members")?,
                ..base
            };
            u32_of(4 * nn * rows, "Navier–Stokes scratch index")?;
            let g = groups_1d((rows * nn) as u64)?;
            let groups = (g.0, g.1, 1);
            let k = &self.stencil;
            for _ in 0..steps {
                self.dispatch(&k.predict, &p, &[chunk, &work, &forcing], groups)?;
                self.dispatch(&k.divergence, &p, &[&work], groups)?;
                for s in 0..sweeps {
                    let mode = (s % 2) as u32;
                    self.dispatch(&k.jacobi, &NsParams { mode, ..p }, &[chunk, &work], groups)?;
                }
                let mode = (sweeps % 2) as u32;
                self.dispatch(&k.correct, &NsParams { mode, ..p }, &[chunk, &work], groups)?;
            }
        }
        Ok(())
    }
}
