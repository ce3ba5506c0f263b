//! The wgpu backend: every kernel operation as a WGSL compute shader (`shaders/`), each with a
//! CPU twin of the same name in `backend/cpu` and a parity test.
//!
//! Work is recorded into one command encoder and submitted only when the host needs a result
//! (a read, the metrics, the error flags) or the parameter ring is full, so an analysis of many
//! flow steps is one submission. Kernel parameters go into a uniform ring addressed with
//! dynamic offsets. Errors inside kernels (non-finite weights or inputs) raise flags in a small
//! device buffer that the host reads once per analysis ([`Backend::sync`]).
//!
//! Large ensembles are split into member blocks ("chunks") whenever `rows × cols × 4` bytes
//! exceed the largest storage binding the adapter allows.
//!
//! One `Gpu` is one in-order stream of work: calls from several threads are serialized, and a
//! deferred error is reported by whichever call syncs first. Give independent pipelines of work
//! their own `Gpu`.
//!
//! Files: `context.rs` (adapter choice and limits), `pipelines.rs` (the kernel table),
//! `recorder.rs` (command recording, the parameter ring, error flags, read-back), `params.rs`
//! (the uniform structs, each naming its WGSL mirror), and one file per kernel family holding
//! the host side of its shaders: `flow.rs`, `ensemble.rs`, `noise.rs`, `models.rs`, `gain.rs`
//! (covariance guidance), `ensemble_space.rs` (ETKF/EnKF products, batched LETKF),
//! `spectral.rs` (FFT, Kuramoto–Sivashinsky) and `stencil.rs` (Navier–Stokes). This file holds
//! the buffers, the device set-up and the `Backend` implementation, which hands every kernel
//! operation to its family.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytemuck::Pod;

use super::{check_path, Backend, DeviceBuffer, EnsembleStats, FlowUpdate, PathCoefficients};
use crate::error::{Error, Result};
use crate::model::{Model, System};
use crate::observe::{ObservationOperator, Observe};
use crate::rng::NoiseKey;
use observe::pointwise_code;

#[macro_use]
mod observe;

pub mod context;
mod ensemble;
mod ensemble_space;
mod flow;
mod gain;
mod models;
mod noise;
mod params;
mod pipelines;
mod recorder;
mod spectral;
mod stencil;

pub use context::{list_adapters, AdapterSummary};
pub use gain::{gain_space, GainSpace, GPU_MAX_ENS_MEMBERS, GPU_MAX_WINDOW};
use params::*;
use pipelines::{make_kernel, Access, Kernel, Kernels};
use recorder::Recorder;

/// Bytes reserved per dispatch in the parameter ring (≥ every params struct, aligned).
const PARAM_SLOT: u64 = 256;
/// Parameter ring size: dispatches per submission.
const RING_BYTES: u64 = 1 << 20;
/// Error-flag slots (pairs of u32: raised, first flat index).
const FLAG_SLOTS: usize = 16;
/// Threads per workgroup of the 1-D kernels.
const WG: u64 = 256;
/// Tile size of the pairwise-distance kernel (pairs per side).
const LOGIT_TILE: u32 = 32;
/// Components per shared-memory step of the pairwise-distance kernel.
const LOGIT_TK: u32 = 32;
/// Workgroups the pairwise-distance kernel aims to launch (split over d when n is small).
const LOGIT_TARGET_GROUPS: u64 = 2048;

/// Options for opening the GPU backend.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Accept a software adapter (lavapipe, llvmpipe, WARP). `--backend auto` does not.
    pub allow_software: bool,
    /// Split buffers into member blocks of at most this many bytes (tests force tiny blocks).
    pub max_chunk_bytes: Option<u64>,
    /// Plan runs as if the device had at most this much memory (bytes): a cap below the
    /// device-local memory the adapter reports, or a budget where it reports none.
    pub memory_limit: Option<u64>,
}

/// A `rows × cols` f32 matrix on the GPU, split into member blocks when it is large.
pub struct GpuBuffer {
    rows: usize,
    cols: usize,
    rows_per_chunk: usize,
    chunks: Vec<wgpu::Buffer>,
}

impl GpuBuffer {
    /// Number of member blocks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    fn chunk_rows(&self, c: usize) -> (usize, usize) {
        let r0 = c * self.rows_per_chunk;
        (r0, (r0 + self.rows_per_chunk).min(self.rows))
    }

    fn single(&self, what: &str) -> Result<&wgpu::Buffer> {
        if self.chunks.len() != 1 {
            return Err(Error::TooLarge {
                detail: format!(
                    "{what} ({} x {}) must fit one storage binding on this device",
                    self.rows, self.cols
                ),
            });
        }
        Ok(&self.chunks[0])
    }
}

impl DeviceBuffer for GpuBuffer {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// Device buffers reused across calls (grown on demand, never per flow step once warm).
#[derive(Default)]
struct Scratch {
    partial: Option<wgpu::Buffer>,
    acc: Option<wgpu::Buffer>,
    colsum: Option<wgpu::Buffer>,
    colsq: Option<wgpu::Buffer>,
    stats_part: Option<wgpu::Buffer>,
    rk: Vec<wgpu::Buffer>,
}

/// The wgpu backend.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    summary: AdapterSummary,
    /// Member-block size limit (the device's storage binding, or smaller when forced).
    max_binding: u64,
    /// The device's own storage-binding limit (scratch buffers may use all of it).
    hw_max_binding: u64,
    kernels: Kernels,
    /// FFT and Kuramoto–Sivashinsky kernels (`spectral.rs`).
    spectral: spectral::Spectral,
    /// Navier–Stokes kernels (`stencil.rs`).
    stencil: stencil::Stencil,
    ens_space: ensemble_space::EnsembleSpaceKernels,
    rec: Mutex<Recorder>,
    scratch: Mutex<Scratch>,
    ring: wgpu::Buffer,
    flags: wgpu::Buffer,
    readback: wgpu::Buffer,
    readback_lock: Mutex<()>,
    result2: wgpu::Buffer,
    dummy_ro: wgpu::Buffer,
    dummy_rw: [wgpu::Buffer; 2],
    uncaptured: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicBool>,
    /// Device buffers created so far (matrices and scratch; not transient read-back staging).
    allocations: std::sync::atomic::AtomicU64,
    /// See [`GpuOptions::memory_limit`].
    memory_limit: Option<u64>,
    /// Held for the whole of each backend call, so that the dispatches of one call (which
    /// share scratch buffers) are never interleaved with another thread's.
    call: parking_lot::ReentrantMutex<()>,
    /// The covariance-guidance kernels, built on first use (`gain.rs`).
    gain_kernels: std::sync::OnceLock<gain::GainKernels>,
}

fn flag_reset() -> Vec<u32> {
    (0..FLAG_SLOTS).flat_map(|_| [0u32, u32::MAX]).collect()
}

fn groups_1d(threads: u64) -> Result<(u32, u32)> {
    let g = threads.div_ceil(WG).max(1);
    let x = g.min(65_535);
    let y = g.div_ceil(x);
    if y > 65_535 {
        return Err(Error::TooLarge {
            detail: format!("{threads} threads exceed one dispatch (65535² workgroups of {WG})"),
        });
    }
    Ok((x as u32, y as u32))
}

/// Workgroups for `count` independent items: `(x, y)` with `x ≤ 65535`.
fn groups_2d(count: usize) -> Result<(u32, u32)> {
    let x = count.clamp(1, 65_535);
    let y = count.div_ceil(x).max(1);
    if y > 65_535 {
        return Err(Error::TooLarge {
            detail: format!("{count} workgroups exceed one dispatch"),
        });
    }
    Ok((x as u32, y as u32))
}

fn shape_err(name: &str, b: &GpuBuffer, rows: usize, cols: usize) -> Result<()> {
    if b.rows != rows || b.cols != cols {
        return Err(Error::shape(
            name,
            format!("{rows} x {cols}"),
            format!("{} x {}", b.rows, b.cols),
        ));
    }
    Ok(())
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::TooLarge {
        detail: format!("{what} = {v} exceeds the GPU kernels' 32-bit indexing"),
    })
}

impl Gpu {
    /// Opens the best adapter the environment allows (see [`context`]).
    pub fn new(options: GpuOptions) -> Result<Self> {
        let inst = context::instance();
        let adapter = context::choose_adapter(&inst, options.allow_software)?;
        let summary = AdapterSummary::of(&adapter);
        let limits = adapter.limits();
        if limits.max_storage_buffers_per_shader_stage < 9 {
            return Err(Error::Gpu(format!(
                "adapter {} allows {} storage buffers per stage; enff's kernels need 9",
                summary.name, limits.max_storage_buffers_per_shader_stage
            )));
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("enff"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Gpu(format!("requesting a device from {}: {e}", summary.name)))?;
        let uncaptured: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        {
            let sink = uncaptured.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut g) = sink.lock() {
                    g.get_or_insert_with(|| e.to_string());
                }
            }));
        }
        let lost = Arc::new(AtomicBool::new(false));
        {
            let flag = lost.clone();
            device.set_device_lost_callback(move |_reason, _msg| {
                flag.store(true, Ordering::SeqCst);
            });
        }
        let hw_max_binding =
            (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size) & !3;
        let mut max_binding = hw_max_binding;
        if let Some(m) = options.max_chunk_bytes {
            max_binding = max_binding.min(m.max(4) & !3);
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = Kernels::new(&device);
        let spectral = spectral::Spectral::new(&device);
        let stencil = stencil::Stencil::new(&device);
        let ens_space = ensemble_space::EnsembleSpaceKernels::new(&device);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("building the compute pipelines: {e}")));
        }
        let storage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let mk = |label: &str, size: u64, usage: wgpu::BufferUsages| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let ring = mk(
            "enff params ring",
            RING_BYTES,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let flags = mk("enff error flags", (FLAG_SLOTS * 8) as u64, storage);
        queue.write_buffer(&flags, 0, bytemuck::cast_slice(&flag_reset()));
        let readback = mk(
            "enff small readback",
            256,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let result2 = mk("enff stats result", 16, storage);
        let dummy_ro = mk("enff placeholder ro", 16, storage);
        let dummy_rw = [
            mk("enff placeholder rw 0", 16, storage),
            mk("enff placeholder rw 1", 16, storage),
        ];
        log::debug!("GPU backend on {}", summary.line());
        Ok(Gpu {
            device,
            queue,
            summary,
            max_binding,
            hw_max_binding,
            kernels,
            spectral,
            stencil,
            ens_space,
            rec: Mutex::new(Recorder {
                encoder: None,
                ring: Vec::with_capacity(RING_BYTES as usize),
                pending: Vec::new(),
            }),
            scratch: Mutex::new(Scratch::default()),
            ring,
            flags,
            readback,
            readback_lock: Mutex::new(()),
            result2,
            dummy_ro,
            dummy_rw,
            uncaptured,
            lost,
            allocations: std::sync::atomic::AtomicU64::new(0),
            memory_limit: options.memory_limit,
            call: parking_lot::ReentrantMutex::new(()),
            gain_kernels: std::sync::OnceLock::new(),
        })
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    /// Largest member-block size in bytes.
    pub fn max_chunk_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Exclusive use of the device's stream of work for one backend call (re-entrant).
    fn exclusive(&self) -> parking_lot::ReentrantMutexGuard<'_, ()> {
        self.call.lock()
    }

    /// Destroys the device as a driver reset would; every later call reports a lost device.
    /// For testing the error path.
    pub fn simulate_device_loss(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.device.destroy();
    }

    fn builtin_obs(&self, op: &dyn ObservationOperator) -> Result<Observe> {
        op.builtin().ok_or_else(|| Error::Unsupported {
            backend: "gpu".into(),
            what: format!("the user-defined observation operator `{}`", op.name()),
            fix: "use a built-in operator (identity/arctan/tanh with subsampling) or --backend cpu"
                .into(),
        })
    }
}

impl Backend for Gpu {
    type Buffer = GpuBuffer;

    fn name(&self) -> &'static str {
        "gpu"
    }

    fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    fn memory_capacity(&self) -> Option<u64> {
        match (self.memory_limit, self.summary.device_memory) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn describe(&self) -> String {
        format!(
            "GPU backend on {} ({} {}{})",
            self.summary.name,
            self.summary.backend,
            self.summary.device_type,
            if self.summary.is_software {
                ", software"
            } else {
                ""
            }
        )
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<GpuBuffer> {
        let _call = self.exclusive();
        let row_bytes = (cols.max(1) * 4) as u64;
        if row_bytes > self.max_binding {
            return Err(Error::TooLarge {
                detail: format!(
                    "one member of {cols} components needs {:.1} MiB, more than the largest \
                     storage binding of {} ({:.1} MiB); reduce model.d",
                    row_bytes as f64 / 1048576.0,
                    self.summary.name,
                    self.max_binding as f64 / 1048576.0
                ),
            });
        }
        let rows_per_chunk = ((self.max_binding / row_bytes) as usize).max(1);
        let n_chunks = rows.div_ceil(rows_per_chunk).max(1);
        let mut chunks = Vec::with_capacity(n_chunks);
        for c in 0..n_chunks {
            let r = (rows - (c * rows_per_chunk).min(rows)).min(rows_per_chunk);
            // New buffers are zero-initialised by wgpu.
            chunks.push(self.new_buffer("enff matrix", (r * cols * 4) as u64)?);
        }
        Ok(GpuBuffer {
            rows,
            cols,
            rows_per_chunk,
            chunks,
        })
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<GpuBuffer> {
        let _call = self.exclusive();
        let mut b = self.zeros(rows, cols)?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn write(&self, buf: &mut GpuBuffer, data: &[f32]) -> Result<()> {
        let _call = self.exclusive();
        if data.len() != buf.rows * buf.cols {
            return Err(Error::shape(
                "buffer write",
                format!(
                    "{} values ({} x {})",
                    buf.rows * buf.cols,
                    buf.rows,
                    buf.cols
                ),
                format!("{} values", data.len()),
            ));
        }
        self.health()?;
        // Work recorded earlier must see the old contents: submit it before the write.
        self.flush()?;
        for (c, chunk) in buf.chunks.iter().enumerate() {
            let (r0, r1) = buf.chunk_rows(c);
            let part = &data[r0 * buf.cols..r1 * buf.cols];
            if !part.is_empty() {
                self.queue
                    .write_buffer(chunk, 0, bytemuck::cast_slice(part));
            }
        }
        Ok(())
    }

    fn read(&self, buf: &GpuBuffer) -> Result<Vec<f32>> {
        let _call = self.exclusive();
        self.health()?;
        let total = (buf.rows * buf.cols * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("enff readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut rec = self.lock_rec()?;
            let enc = self.encoder(&mut rec);
            for (c, chunk) in buf.chunks.iter().enumerate() {
                let (r0, r1) = buf.chunk_rows(c);
                let bytes = ((r1 - r0) * buf.cols * 4) as u64;
                if bytes > 0 {
                    enc.copy_buffer_to_buffer(
                        chunk,
                        0,
                        &staging,
                        (r0 * buf.cols * 4) as u64,
                        bytes,
                    );
                }
            }
            self.flush_locked(&mut rec);
        }
        if total == 0 {
            return Ok(Vec::new());
        }
        let bytes = self.map_read(&staging, total)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn copy(&self, src: &GpuBuffer, dst: &mut GpuBuffer) -> Result<()> {
        let _call = self.exclusive();
        shape_err("copy destination", dst, src.rows, src.cols)?;
        self.health()?;
        let mut rec = self.lock_rec()?;
        let enc = self.encoder(&mut rec);
        for (c, (s, d)) in src.chunks.iter().zip(&dst.chunks).enumerate() {
            let (r0, r1) = src.chunk_rows(c);
            let bytes = ((r1 - r0) * src.cols * 4) as u64;
            if bytes > 0 {
                enc.copy_buffer_to_buffer(s, 0, d, 0, bytes);
            }
        }
        Ok(())
    }

    fn fill_normal(
        &self,
        out: &mut GpuBuffer,
        key: NoiseKey,
        mean: Option<&GpuBuffer>,
        scale: f32,
    ) -> Result<()> {
        noise::fill_normal(self, out, key, mean, scale)
    }

    fn inflate(&self, ensemble: &mut GpuBuffer, gamma: f32) -> Result<()> {
        ensemble::inflate(self, ensemble, gamma)
    }

    fn check_finite(&self, buf: &GpuBuffer, name: &str) -> Result<()> {
        ensemble::check_finite(self, buf, name)
    }

    fn sync(&self) -> Result<()> {
        let _call = self.exclusive();
        self.health()?;
        let pending = {
            let mut rec = self.lock_rec()?;
            std::mem::take(&mut rec.pending)
        };
        if pending.is_empty() {
            self.flush()?;
            return self.wait();
        }
        let bytes = self.read_small(&self.flags, (FLAG_SLOTS * 8) as u64)?;
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        self.queue
            .write_buffer(&self.flags, 0, bytemuck::cast_slice(&flag_reset()));
        for (slot, (name, cols)) in pending.iter().enumerate() {
            if words[2 * slot] != 0 {
                let idx = words[2 * slot + 1] as usize;
                let location = if *cols > 0 {
                    format!("member {}, component {}", idx / cols, idx % cols)
                } else {
                    format!("index {idx}")
                };
                return Err(Error::NonFinite {
                    name: name.clone(),
                    location,
                    value: f64::NAN,
                    hint: "check the inputs; a non-finite ensemble usually means the filter \
                           diverged (reduce guidance_scale or the model step)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    fn advance(&self, model: &Model, states: &mut GpuBuffer, steps: usize) -> Result<()> {
        models::advance(self, model, states, steps)
    }

    fn observe(
        &self,
        operator: &dyn ObservationOperator,
        x: &GpuBuffer,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        ensemble::observe(self, operator, x, out)
    }

    fn observed_moments(
        &self,
        operator: &dyn ObservationOperator,
        x: &GpuBuffer,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        ensemble::observed_moments(self, operator, x, out)
    }

    fn log_likelihoods(
        &self,
        operator: &dyn ObservationOperator,
        x: &GpuBuffer,
        y: &GpuBuffer,
        obs_noise_std: f32,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        ensemble::log_likelihoods(self, operator, x, y, obs_noise_std, out)
    }

    fn flow_logits(
        &self,
        x: &GpuBuffer,
        target: &GpuBuffer,
        source: Option<&GpuBuffer>,
        path: PathCoefficients,
        bias: Option<&GpuBuffer>,
        logits: &mut GpuBuffer,
    ) -> Result<()> {
        flow::flow_logits(self, x, target, source, path, bias, logits)
    }

    fn softmax_rows(&self, logits: &mut GpuBuffer) -> Result<()> {
        flow::softmax_rows(self, logits)
    }

    fn flow_update(
        &self,
        state: &mut GpuBuffer,
        up: &FlowUpdate<'_, Self>,
        velocity_out: Option<&mut GpuBuffer>,
    ) -> Result<()> {
        flow::flow_update(self, state, up, velocity_out)
    }

    fn observed_products(
        &self,
        hx: &GpuBuffer,
        y: &GpuBuffer,
        eta: Option<&GpuBuffer>,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        self.observed_products_gpu(hx, y, eta, out)
    }

    fn on_device(&self) -> bool {
        true
    }

    fn letkf_analysis(
        &self,
        ensemble: &mut GpuBuffer,
        hx: &GpuBuffer,
        y: &GpuBuffer,
        local: &super::LocalAnalysis,
    ) -> Result<()> {
        self.letkf_gpu(ensemble, hx, y, local)
    }

    fn gain_step(&self, state: &mut GpuBuffer, step: &super::GainStep<'_, Self>) -> Result<()> {
        gain::gain_step(self, state, step)
    }

    fn local_gains(
        &self,
        g: &super::LocalGains<'_, Self>,
        gain: &mut GpuBuffer,
        hbar: &mut GpuBuffer,
    ) -> Result<()> {
        let _one = self.exclusive();
        gain::local_gains(self, g, gain, hbar)
    }

    fn ensemble_stats(&self, ensemble: &GpuBuffer, truth: &GpuBuffer) -> Result<EnsembleStats> {
        ensemble::ensemble_stats(self, ensemble, truth)
    }
}
