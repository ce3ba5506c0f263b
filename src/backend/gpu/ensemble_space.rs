//! Ensemble-space kernels of the Kalman-type filters on the GPU: the observed-anomaly products
//! of the ETKF and EnKF (`shaders/ensemble_space_products.wgsl`) and the batched LETKF
//! (`shaders/ensemble_space_letkf.wgsl`). CPU twins: `backend/cpu/ensemble_space.rs`.
//!
//! Both need their inputs in single storage bindings; an ensemble split into member blocks
//! (too large for one binding) falls back to the CPU twins on the host.

use std::sync::Mutex;

use bytemuck::{Pod, Zeroable};

use super::{groups_2d, make_kernel, shape_err, Access, Gpu, GpuBuffer, Kernel};
use crate::backend::cpu::ensemble_space as twin;
use crate::backend::{Backend, LocalAnalysis};
use crate::error::{Error, Result};

/// Mirror of `ProductParams` in `shaders/ensemble_space_products.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct ProductParams {
    n: u32,
    m: u32,
    e: u32,
    groups_x: u32,
}

/// Mirror of `LetkfParams` in `shaders/ensemble_space_letkf.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct LetkfParams {
    n: u32,
    d: u32,
    m: u32,
    nx: u32,
    ny: u32,
    fields: u32,
    every: u32,
    offset: u32,
    groups_x: u32,
    reach_cells: u32,
    _pad0: u32,
    _pad1: u32,
    radius: f32,
    reach: f32,
    inv_s2: f32,
    n1: f32,
}

/// The pipelines and the scratch buffer of the ensemble-space kernels.
pub(super) struct EnsembleSpaceKernels {
    obs_mean: Kernel,
    products: Kernel,
    letkf: Kernel,
    ybar: Mutex<Option<wgpu::Buffer>>,
}

impl EnsembleSpaceKernels {
    pub(super) fn new(device: &wgpu::Device) -> Self {
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let products = module(
            "obs_products",
            include_str!("../../../shaders/ensemble_space_products.wgsl"),
        );
        let letkf = module(
            "letkf",
            include_str!("../../../shaders/ensemble_space_letkf.wgsl"),
        );
        use Access::*;
        EnsembleSpaceKernels {
            obs_mean: make_kernel(
                device,
                "obs_mean",
                &products,
                "obs_mean",
                &[(1, Read), (4, ReadWrite)],
            ),
            products: make_kernel(
                device,
                "obs_products",
                &products,
                "products",
                &[
                    (1, Read),
                    (2, Read),
                    (3, Read),
                    (4, ReadWrite),
                    (5, ReadWrite),
                ],
            ),
            letkf: make_kernel(
                device,
                "letkf",
                &letkf,
                "main",
                &[(1, ReadWrite), (2, Read), (3, Read)],
            ),
            ybar: Mutex::new(None),
        }
    }
}

impl Gpu {
    /// [`Backend::observed_products`] on the device.
    pub(super) fn observed_products_gpu(
        &self,
        hx: &GpuBuffer,
        y: &GpuBuffer,
        eta: Option<&GpuBuffer>,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        let (n, m) = (hx.rows, hx.cols);
        let e = eta.map_or(0, |b| b.rows);
        shape_err("observation", y, 1, m)?;
        if let Some(eta) = eta {
            shape_err("observation perturbations", eta, e, m)?;
        }
        shape_err(
            "observed-products output",
            out,
            twin::observed_products_rows(n, e),
            n,
        )?;
        let split = hx.chunks.len() != 1
            || out.chunks.len() != 1
            || y.chunks.len() != 1
            || eta.is_some_and(|b| b.chunks.len() != 1);
        if split || n == 0 || m == 0 {
            // Too large for one binding: the CPU twin on the host.
            let (hxv, yv) = (self.read(hx)?, self.read(y)?);
            let etav = eta.map(|b| self.read(b)).transpose()?;
            let mut host = vec![0.0f32; out.rows * out.cols];
            twin::observed_products(&hxv, n, &yv, etav.as_deref(), &mut host)?;
            return self.write(out, &host);
        }
        let ybar = {
            let mut slot = self
                .ens_space
                .ybar
                .lock()
                .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
            self.scratch_buf(&mut slot, m, "observation means")?.clone()
        };
        let count = twin::observed_products_rows(n, e) * n;
        let (gx, gy) = groups_2d(count)?;
        let params = ProductParams {
            n: super::u32_of(n, "ensemble size")?,
            m: super::u32_of(m, "observation dimension")?,
            e: e as u32,
            groups_x: gx,
        };
        let mean_groups = super::groups_1d(m as u64)?;
        self.dispatch(
            &self.ens_space.obs_mean,
            &params,
            &[&hx.chunks[0], &ybar],
            (mean_groups.0, mean_groups.1, 1),
        )?;
        let eta_buf = eta.map_or(&self.dummy_ro, |b| &b.chunks[0]);
        self.dispatch(
            &self.ens_space.products,
            &params,
            &[&hx.chunks[0], &y.chunks[0], eta_buf, &ybar, &out.chunks[0]],
            (gx, gy, 1),
        )
    }

    /// [`Backend::letkf_analysis`] on the device: one workgroup per grid cell.
    pub(super) fn letkf_gpu(
        &self,
        ensemble: &mut GpuBuffer,
        hx: &GpuBuffer,
        y: &GpuBuffer,
        local: &LocalAnalysis,
    ) -> Result<()> {
        let (n, d, m) = (ensemble.rows, ensemble.cols, hx.cols);
        local.check(n, d, m)?;
        shape_err("observed ensemble", hx, n, m)?;
        shape_err("observation", y, 1, m)?;
        if ensemble.chunks.len() != 1 || hx.chunks.len() != 1 || y.chunks.len() != 1 {
            // Too large for one binding: the CPU twin on the host.
            let mut x = self.read(ensemble)?;
            let (hxv, yv) = (self.read(hx)?, self.read(y)?);
            twin::letkf_analysis(&mut x, n, &hxv, &yv, local)?;
            return self.write(ensemble, &x);
        }
        let cells = local.cells();
        let (gx, gy) = groups_2d(cells)?;
        let reach = 2.0 * 1.82 * local.radius;
        let params = LetkfParams {
            n: n as u32,
            d: super::u32_of(d, "state dimension")?,
            m: super::u32_of(m, "observation dimension")?,
            nx: local.nx as u32,
            ny: local.ny as u32,
            fields: local.fields as u32,
            every: local.every as u32,
            offset: local.offset as u32,
            groups_x: gx,
            reach_cells: reach.floor().min(u32::MAX as f32) as u32,
            radius: local.radius,
            reach,
            inv_s2: 1.0 / (local.noise_std * local.noise_std),
            n1: (n - 1) as f32,
            ..Default::default()
        };
        self.dispatch(
            &self.ens_space.letkf,
            &params,
            &[&ensemble.chunks[0], &hx.chunks[0], &y.chunks[0]],
            (gx, gy, 1),
        )
    }
}
