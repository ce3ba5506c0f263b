//! The batched FFT (`shaders/spectral_fft.wgsl`) and the Kuramoto–Sivashinsky forecast
//! (`shaders/spectral_ks.wgsl`) on the GPU, for every member at once. CPU twins: `backend/cpu/spectral.rs`.
//!
//! The ensemble stays on the device for the whole forecast: each chunk of members is copied
//! into a packed buffer, transformed, stepped in Fourier space (seven spectra per member) and
//! transformed back. One ETDRK4 step is four nonlinear terms (tangle, inverse FFT, squaring
//! forward FFT, untangle: `2 + 2P` dispatches for `P` FFT passes) and four stage
//! combinations. The coefficient and twiddle tables are uploaded once per model; the spectra
//! and packed buffers are allocated once per ensemble size and reused.

use std::sync::Mutex;

use bytemuck::{Pod, Zeroable};

use super::{groups_1d, make_kernel, u32_of, Access, Gpu, GpuBuffer, Kernel};
use crate::backend::cpu::spectral::{twiddle_table, FftPlan};
use crate::error::{Error, Result};
use crate::model::KuramotoSivashinsky;

/// Mirror of `FftParams` in `shaders/spectral_fft.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct FftParams {
    m: u32,
    batch: u32,
    ns: u32,
    radix: u32,
    inverse: u32,
    square: u32,
    tw_stride: u32,
    _pad: u32,
}

/// Mirror of `KsParams` in `shaders/spectral_ks.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct KsParams {
    m: u32,
    batch: u32,
    mode: u32,
    slot: u32,
    scale: f32,
    _pad: [u32; 3],
}

const _: () = {
    assert!(std::mem::size_of::<FftParams>().is_multiple_of(16));
    assert!(std::mem::size_of::<KsParams>().is_multiple_of(16));
};

/// Spectrum slots of the ETDRK4 step (see `shaders/spectral_ks.wgsl`).
const V: u32 = 0;
const N1: u32 = 1;
const N2A: u32 = 2;
const N2B: u32 = 3;
const N3: u32 = 4;
const A: u32 = 5;
const BC: u32 = 6;
/// Spectra per member.
const SLOTS: usize = 7;

/// Which model the uploaded tables belong to: `(d, dt bits, DL bits)`.
type TableKey = (usize, u32, u64);

/// Device tables and work buffers of the spectral kernels, reused across calls.
#[derive(Default)]
pub(super) struct SpectralScratch {
    /// Complex FFT length whose twiddles are in `fft_tw`.
    fft_len: usize,
    fft_tw: Option<wgpu::Buffer>,
    /// Model whose tables are in `coef` and `real_tw`.
    ks_key: Option<TableKey>,
    coef: Option<wgpu::Buffer>,
    real_tw: Option<wgpu::Buffer>,
    spec: Option<wgpu::Buffer>,
    packed: [Option<wgpu::Buffer>; 2],
}

/// Pipelines and scratch of the spectral kernels.
pub(super) struct Spectral {
    fft: Kernel,
    unpack: Kernel,
    pack: Kernel,
    stage: Kernel,
    scratch: Mutex<SpectralScratch>,
}

impl Spectral {
    pub(super) fn new(device: &wgpu::Device) -> Spectral {
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let fft = module("fft", include_str!("../../../shaders/spectral_fft.wgsl"));
        let ks = module("ks", include_str!("../../../shaders/spectral_ks.wgsl"));
        use Access::*;
        Spectral {
            fft: make_kernel(
                device,
                "fft_pass",
                &fft,
                "pass_main",
                &[(1, Read), (2, ReadWrite), (3, Read)],
            ),
            unpack: make_kernel(
                device,
                "ks_unpack_forward",
                &ks,
                "unpack_forward",
                &[(1, ReadWrite), (2, ReadWrite), (3, Read), (4, Read)],
            ),
            pack: make_kernel(
                device,
                "ks_pack_inverse",
                &ks,
                "pack_inverse",
                &[(1, ReadWrite), (2, ReadWrite), (4, Read)],
            ),
            stage: make_kernel(
                device,
                "ks_etdrk4_stage",
                &ks,
                "stage",
                &[(1, ReadWrite), (3, Read)],
            ),
            scratch: Mutex::new(SpectralScratch::default()),
        }
    }
}

fn poisoned() -> Error {
    Error::Gpu("spectral scratch poisoned by an earlier panic".into())
}

/// The ETDRK4 step of every member: buffers of one chunk.
struct KsBuffers {
    fft_tw: wgpu::Buffer,
    coef: wgpu::Buffer,
    real_tw: wgpu::Buffer,
    spec: wgpu::Buffer,
    packed: [wgpu::Buffer; 2],
}

impl Gpu {
    /// A device buffer holding `data`, created now (for tables uploaded once per model).
    pub(super) fn table_buffer(&self, label: &str, data: &[f32]) -> Result<wgpu::Buffer> {
        let buf = self.new_buffer(label, (data.len() * 4) as u64)?;
        self.queue.write_buffer(&buf, 0, bytemuck::cast_slice(data));
        Ok(buf)
    }

    /// Twiddles of `plan` and two packed work buffers of `floats` values each.
    fn fft_buffers(
        &self,
        s: &mut SpectralScratch,
        plan: &FftPlan,
        floats: usize,
    ) -> Result<(wgpu::Buffer, [wgpu::Buffer; 2])> {
        if s.fft_len != plan.len() || s.fft_tw.is_none() {
            s.fft_tw = Some(self.table_buffer("enff fft twiddles", plan.twiddles())?);
            s.fft_len = plan.len();
        }
        let [p0, p1] = &mut s.packed;
        let a = self.scratch_buf(p0, floats, "FFT work buffer")?.clone();
        let b = self.scratch_buf(p1, floats, "FFT work buffer")?.clone();
        Ok((s.fft_tw.clone().expect("just set"), [a, b]))
    }

    /// Records the passes of one batched FFT, ping-ponging between `bufs[start]` and the other
    /// buffer; returns the index of the buffer that holds the result.
    #[allow(clippy::too_many_arguments)]
    fn record_fft(
        &self,
        plan: &FftPlan,
        tw: &wgpu::Buffer,
        bufs: [&wgpu::Buffer; 2],
        start: usize,
        batch: usize,
        inverse: bool,
        square_first: bool,
    ) -> Result<usize> {
        let m = plan.len();
        let mut cur = start;
        for (p, (ns, radix)) in plan.passes().into_iter().enumerate() {
            let params = FftParams {
                m: m as u32,
                batch: u32_of(batch, "FFT batch")?,
                ns: ns as u32,
                radix: radix as u32,
                inverse: inverse as u32,
                square: (square_first && p == 0) as u32,
                tw_stride: (m / (ns * radix)) as u32,
                _pad: 0,
            };
            let g = groups_1d((batch * m / radix) as u64)?;
            self.dispatch(
                &self.spectral.fft,
                &params,
                &[bufs[cur], bufs[1 - cur], tw],
                (g.0, g.1, 1),
            )?;
            cur = 1 - cur;
        }
        Ok(cur)
    }

    fn copy_bytes(&self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) -> Result<()> {
        let mut rec = self.lock_rec()?;
        self.encoder(&mut rec)
            .copy_buffer_to_buffer(src, 0, dst, 0, bytes);
        Ok(())
    }

    /// Unnormalized complex FFT of every row of `data` (`rows × 2m` floats: `m` interleaved
    /// complex values per row, `m` a power of two), in place, all rows of a member block in one
    /// dispatch per pass. Twin: [`FftPlan::transform`].
    pub fn fft_rows(&self, data: &mut GpuBuffer, inverse: bool) -> Result<()> {
        if !data.cols.is_multiple_of(2) || data.cols == 0 {
            return Err(Error::shape(
                "FFT rows",
                "an even number of columns (interleaved re, im)",
                data.cols,
            ));
        }
        let plan = FftPlan::new(data.cols / 2)?;
        let rows_max = data.rows_per_chunk.min(data.rows).max(1);
        let (tw, packed) = {
            let mut s = self.spectral.scratch.lock().map_err(|_| poisoned())?;
            self.fft_buffers(&mut s, &plan, rows_max * data.cols)?
        };
        for (c, chunk) in data.chunks.iter().enumerate() {
            let (r0, r1) = data.chunk_rows(c);
            if r1 == r0 {
                continue;
            }
            let bytes = ((r1 - r0) * data.cols * 4) as u64;
            self.copy_bytes(chunk, &packed[0], bytes)?;
            let res = self.record_fft(
                &plan,
                &tw,
                [&packed[0], &packed[1]],
                0,
                r1 - r0,
                inverse,
                false,
            )?;
            self.copy_bytes(&packed[res], chunk, bytes)?;
        }
        Ok(())
    }

    fn ks_dispatch(
        &self,
        kernel: &Kernel,
        params: KsParams,
        buffers: &[&wgpu::Buffer],
        threads: usize,
    ) -> Result<()> {
        let g = groups_1d(threads as u64)?;
        self.dispatch(kernel, &params, buffers, (g.0, g.1, 1))
    }

    /// `slot_to = N(slot_from)` for every member of the chunk: tangle, inverse FFT, squaring
    /// forward FFT, untangle times `i·g`.
    fn ks_nonlinear(
        &self,
        plan: &FftPlan,
        b: &KsBuffers,
        base: KsParams,
        from: u32,
        to: u32,
    ) -> Result<()> {
        let (m, batch) = (plan.len(), base.batch as usize);
        self.ks_dispatch(
            &self.spectral.pack,
            KsParams { slot: from, ..base },
            &[&b.spec, &b.packed[0], &b.real_tw],
            batch * m,
        )?;
        let bufs = [&b.packed[0], &b.packed[1]];
        let r = self.record_fft(plan, &b.fft_tw, bufs, 0, batch, true, false)?;
        let r = self.record_fft(plan, &b.fft_tw, bufs, r, batch, false, true)?;
        self.ks_dispatch(
            &self.spectral.unpack,
            KsParams {
                slot: to,
                mode: 1,
                ..base
            },
            &[&b.spec, &b.packed[r], &b.coef, &b.real_tw],
            batch * (m + 1),
        )
    }

    /// Kuramoto–Sivashinsky forecast of every member (ETDRK4 in Fourier space, the CPU model's
    /// f32 coefficient tables). Power-of-two grids only.
    pub(super) fn advance_ks(
        &self,
        ks: &KuramotoSivashinsky,
        states: &mut GpuBuffer,
        steps: usize,
    ) -> Result<()> {
        let d = ks.d();
        if !d.is_power_of_two() {
            return Err(Error::invalid(
                "model.d",
                d,
                "the GPU Kuramoto–Sivashinsky forecast needs a power-of-two grid (its FFT is \
                 radix 2/4): use 256, 512, 1024 or 2048, or --backend cpu for other sizes",
            ));
        }
        let m = d / 2;
        let plan = FftPlan::new(m)?;
        let bins = m + 1;
        let rows_max = states.rows_per_chunk.min(states.rows).max(1);
        let bufs = {
            let mut s = self.spectral.scratch.lock().map_err(|_| poisoned())?;
            let key = (d, ks.dt().to_bits(), ks.domain_pi_multiple().to_bits());
            if s.ks_key != Some(key) || s.coef.is_none() || s.real_tw.is_none() {
                s.coef = Some(self.table_buffer("enff ks etdrk4 tables", &ks.etdrk4_table())?);
                s.real_tw =
                    Some(self.table_buffer("enff ks real twiddles", &twiddle_table(d, m + 1))?);
                s.ks_key = Some(key);
            }
            let spec = self
                .scratch_buf(&mut s.spec, SLOTS * rows_max * bins * 2, "KS spectra")?
                .clone();
            let (fft_tw, packed) = self.fft_buffers(&mut s, &plan, rows_max * d)?;
            KsBuffers {
                fft_tw,
                coef: s.coef.clone().expect("just set"),
                real_tw: s.real_tw.clone().expect("just set"),
                spec,
                packed,
            }
        };
        let scale = (1.0 / d as f64) as f32;
        for (c, chunk) in states.chunks.iter().enumerate() {
            let (r0, r1) = states.chunk_rows(c);
            let batch = r1 - r0;
            if batch == 0 {
                continue;
            }
            let base = KsParams {
                m: m as u32,
                batch: u32_of(batch, "members")?,
                mode: 0,
                slot: V,
                scale,
                _pad: [0; 3],
            };
            let bytes = (batch * d * 4) as u64;
            let pk = [&bufs.packed[0], &bufs.packed[1]];
            // The state row is its own packed signal z_j = x_{2j} + i x_{2j+1}.
            self.copy_bytes(chunk, pk[0], bytes)?;
            let r = self.record_fft(&plan, &bufs.fft_tw, pk, 0, batch, false, false)?;
            self.ks_dispatch(
                &self.spectral.unpack,
                base,
                &[&bufs.spec, pk[r], &bufs.coef, &bufs.real_tw],
                batch * bins,
            )?;
            for _ in 0..steps {
                for (from, to, mode) in [(V, N1, 0), (A, N2A, 1), (BC, N2B, 2), (BC, N3, 3)] {
                    self.ks_nonlinear(&plan, &bufs, base, from, to)?;
                    self.ks_dispatch(
                        &self.spectral.stage,
                        KsParams { mode, ..base },
                        &[&bufs.spec, &bufs.coef],
                        batch * bins,
                    )?;
                }
            }
            self.ks_dispatch(
                &self.spectral.pack,
                base,
                &[&bufs.spec, pk[0], &bufs.real_tw],
                batch * m,
            )?;
            let r = self.record_fft(&plan, &bufs.fft_tw, pk, 0, batch, true, false)?;
            self.copy_bytes(pk[r], chunk, bytes)?;
        }
        Ok(())
    }
}
