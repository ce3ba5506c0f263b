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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytemuck::Pod;

use super::{check_path, Backend, DeviceBuffer, EnsembleStats, FlowUpdate, PathCoefficients};
use crate::error::{Error, Result};
use crate::model::{Model, Scheme, System};
use crate::observe::{ObservationOperator, Observe, Pointwise};
use crate::rng::NoiseKey;

/// The WGSL source of `shaders/<file>` with the shared observation maps of
/// `shaders/observe.wgsl` prepended (WGSL has no includes).
macro_rules! with_observe {
    ($file:literal) => {
        concat!(
            include_str!("../../../shaders/observe.wgsl"),
            "\n",
            include_str!(concat!("../../../shaders/", $file))
        )
    };
}

pub mod context;
mod ensemble_space;
mod gain;
mod params;
mod spectral;
mod stencil;

pub use context::{list_adapters, AdapterSummary};
pub use gain::{gain_space, GainSpace, GPU_MAX_ENS_MEMBERS, GPU_MAX_WINDOW};
use params::*;

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Uniform,
    Read,
    ReadWrite,
}

struct Kernel {
    name: &'static str,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    /// Storage binding numbers in the order buffers are passed to `dispatch`.
    bindings: Vec<u32>,
}

struct Kernels {
    logits: Kernel,
    logits_big: Kernel,
    logits_reduce: Kernel,
    softmax: Kernel,
    update: Kernel,
    update_tiled: Kernel,
    noise: Kernel,
    colsum: Kernel,
    colsq: Kernel,
    inflate: Kernel,
    stats_partial: Kernel,
    stats_final: Kernel,
    finite: Kernel,
    observe: Kernel,
    obs_sum: Kernel,
    obs_sq: Kernel,
    obs_final: Kernel,
    loglik: Kernel,
    model_stage: Kernel,
    model_combine: Kernel,
}

struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    ring: Vec<u8>,
    /// Names (and column counts) of the checks owning each flag slot since the last sync.
    pending: Vec<(String, usize)>,
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

fn pointwise_code(p: Pointwise) -> u32 {
    match p {
        Pointwise::Identity => 0,
        Pointwise::Arctan => 1,
        Pointwise::Tanh => 2,
    }
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

    fn lock_rec(&self) -> Result<std::sync::MutexGuard<'_, Recorder>> {
        self.rec
            .lock()
            .map_err(|_| Error::Gpu("command recorder poisoned by an earlier panic".into()))
    }

    fn health(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::Gpu(format!(
                "the device {} was lost; restart the run (or use --backend cpu)",
                self.summary.name
            )));
        }
        if let Some(msg) = self.uncaptured.lock().ok().and_then(|mut g| g.take()) {
            return Err(Error::Gpu(msg));
        }
        Ok(())
    }

    /// Submits everything recorded so far.
    fn flush_locked(&self, rec: &mut Recorder) {
        if let Some(enc) = rec.encoder.take() {
            if !rec.ring.is_empty() {
                self.queue.write_buffer(&self.ring, 0, &rec.ring);
            }
            self.queue.submit(Some(enc.finish()));
        }
        rec.ring.clear();
    }

    fn flush(&self) -> Result<()> {
        let mut rec = self.lock_rec()?;
        self.flush_locked(&mut rec);
        Ok(())
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
        self.health()
    }

    fn encoder<'a>(&self, rec: &'a mut Recorder) -> &'a mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("enff"),
                })
        })
    }

    /// Records one dispatch of `kernel` with `params` and storage `buffers` (in the kernel's
    /// binding order).
    fn dispatch<P: Pod>(
        &self,
        kernel: &Kernel,
        params: &P,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        debug_assert_eq!(buffers.len(), kernel.bindings.len(), "{}", kernel.name);
        if self.lost.load(Ordering::SeqCst) {
            return self.health();
        }
        let mut rec = self.lock_rec()?;
        if rec.ring.len() as u64 + PARAM_SLOT > RING_BYTES {
            self.flush_locked(&mut rec);
        }
        let offset = rec.ring.len() as u32;
        let bytes = bytemuck::bytes_of(params);
        rec.ring.extend_from_slice(bytes);
        rec.ring.resize(offset as usize + PARAM_SLOT as usize, 0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.ring,
                offset: 0,
                size: wgpu::BufferSize::new(PARAM_SLOT),
            }),
        }];
        for (b, buf) in kernel.bindings.iter().zip(buffers) {
            entries.push(wgpu::BindGroupEntry {
                binding: *b,
                resource: buf.as_entire_binding(),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        let enc = self.encoder(&mut rec);
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bg, &[offset]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        Ok(())
    }

    /// Number of device buffers created so far (matrices and scratch). A run whose count stops
    /// growing after its first cycles allocates nothing per cycle or per flow step.
    pub fn buffers_allocated(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    fn new_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.health()?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::TooLarge {
                detail: format!(
                    "allocating {:.1} MiB on {} failed: {e}",
                    bytes as f64 / 1048576.0,
                    self.summary.name
                ),
            });
        }
        Ok(buf)
    }

    /// A scratch buffer of at least `floats` values, grown on demand.
    fn scratch_buf<'a>(
        &self,
        slot: &'a mut Option<wgpu::Buffer>,
        floats: usize,
        label: &str,
    ) -> Result<&'a wgpu::Buffer> {
        let bytes = (floats.max(4) * 4) as u64;
        if bytes > self.hw_max_binding {
            return Err(Error::TooLarge {
                detail: format!(
                    "{label} needs {:.1} MiB, more than the largest storage binding ({:.1} MiB)",
                    bytes as f64 / 1048576.0,
                    self.hw_max_binding as f64 / 1048576.0
                ),
            });
        }
        if slot.as_ref().is_none_or(|b| b.size() < bytes) {
            let size = bytes
                .next_power_of_two()
                .min(self.hw_max_binding)
                .max(bytes);
            *slot = Some(self.new_buffer(label, size)?);
        }
        Ok(slot.as_ref().expect("just set"))
    }

    /// Registers a flag slot for a deferred check named `name`.
    fn flag_slot(&self, name: &str, cols: usize) -> Result<u32> {
        let full = {
            let rec = self.lock_rec()?;
            rec.pending.len() >= FLAG_SLOTS && !rec.pending.iter().any(|(n, _)| n == name)
        };
        if full {
            self.sync()?;
        }
        let mut rec = self.lock_rec()?;
        if let Some(i) = rec.pending.iter().position(|(n, _)| n == name) {
            return Ok(i as u32);
        }
        rec.pending.push((name.to_string(), cols));
        Ok((rec.pending.len() - 1) as u32)
    }

    fn read_small(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        // One small staging buffer: hold its lock from the copy until it is unmapped.
        let _staging = self
            .readback_lock
            .lock()
            .map_err(|_| Error::Gpu("readback lock poisoned by an earlier panic".into()))?;
        {
            let mut rec = self.lock_rec()?;
            self.encoder(&mut rec)
                .copy_buffer_to_buffer(src, 0, &self.readback, 0, bytes);
            self.flush_locked(&mut rec);
        }
        self.map_read(&self.readback, bytes)
    }

    fn map_read(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("buffer mapping callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping a buffer for reading: {e}")))?;
        let out = {
            let view = buf
                .get_mapped_range(0..bytes)
                .map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?;
            view.to_vec()
        };
        buf.unmap();
        Ok(out)
    }

    /// Column sums of `x` into the scratch colsum buffer (and optionally squared deviations).
    fn column_moments(&self, x: &GpuBuffer, with_var: bool) -> Result<()> {
        let (n, d) = (x.rows, x.cols);
        let mut s = self
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        let colsum = self.scratch_buf(&mut s.colsum, d, "column sums")?.clone();
        let colsq = if with_var {
            Some(
                self.scratch_buf(&mut s.colsq, d, "column variances")?
                    .clone(),
            )
        } else {
            None
        };
        drop(s);
        let g = groups_1d(d as u64)?;
        for (c, buf) in x.chunks.iter().enumerate() {
            let (r0, r1) = x.chunk_rows(c);
            let p = EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: d as u32,
                first: (c == 0) as u32,
                inv_n: 1.0 / n as f32,
                ..Default::default()
            };
            self.dispatch(&self.kernels.colsum, &p, &[buf, &colsum], (g.0, g.1, 1))?;
        }
        if let Some(colsq) = colsq {
            for (c, buf) in x.chunks.iter().enumerate() {
                let (r0, r1) = x.chunk_rows(c);
                let p = EnsembleParams {
                    rows: (r1 - r0) as u32,
                    cols: d as u32,
                    first: (c == 0) as u32,
                    inv_n: 1.0 / n as f32,
                    ..Default::default()
                };
                self.dispatch(
                    &self.kernels.colsq,
                    &p,
                    &[buf, &colsum, &colsq],
                    (g.0, g.1, 1),
                )?;
            }
        }
        Ok(())
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

impl Kernels {
    fn new(device: &wgpu::Device) -> Kernels {
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let logits = module(
            "flow_logits",
            include_str!("../../../shaders/flow_logits.wgsl"),
        );
        let softmax = module("softmax", include_str!("../../../shaders/softmax.wgsl"));
        let update = module("flow_update", with_observe!("flow_update.wgsl"));
        let noise = module("noise", include_str!("../../../shaders/noise.wgsl"));
        let ens = module("ensemble", with_observe!("ensemble.wgsl"));
        let models = module("models", include_str!("../../../shaders/models.wgsl"));
        use Access::*;
        // Both update entry points read and write the same buffers.
        const UPDATE_BINDINGS: &[(u32, Access)] = &[
            (1, Read),
            (2, Read),
            (3, Read),
            (4, Read),
            (5, ReadWrite),
            (6, Read),
            (7, ReadWrite),
            (8, Read),
            (9, ReadWrite),
        ];
        let k =
            |name: &'static str, m: &wgpu::ShaderModule, entry: &str, binds: &[(u32, Access)]| {
                make_kernel(device, name, m, entry, binds)
            };
        Kernels {
            logits: k(
                "flow_logits",
                &logits,
                "distances",
                &[(1, Read), (2, Read), (3, Read), (4, ReadWrite)],
            ),
            logits_big: k(
                "flow_logits_big",
                &logits,
                "distances_big",
                &[(1, Read), (2, Read), (3, Read), (4, ReadWrite)],
            ),
            logits_reduce: k(
                "flow_logits_reduce",
                &logits,
                "reduce",
                &[(4, ReadWrite), (5, Read), (6, ReadWrite)],
            ),
            softmax: k(
                "softmax_rows",
                &softmax,
                "main",
                &[(1, ReadWrite), (2, ReadWrite)],
            ),
            update: k("flow_update", &update, "main", UPDATE_BINDINGS),
            update_tiled: k("flow_update_tiled", &update, "tiled", UPDATE_BINDINGS),
            noise: k("fill_normal", &noise, "main", &[(1, ReadWrite), (2, Read)]),
            colsum: k("colsum", &ens, "colsum", &[(1, Read), (2, ReadWrite)]),
            colsq: k(
                "colsq",
                &ens,
                "colsq",
                &[(1, Read), (2, ReadWrite), (3, ReadWrite)],
            ),
            inflate: k(
                "inflate",
                &ens,
                "inflate",
                &[(2, ReadWrite), (3, ReadWrite)],
            ),
            stats_partial: k(
                "stats_partial",
                &ens,
                "stats_partial",
                &[(1, Read), (2, ReadWrite), (3, ReadWrite), (5, ReadWrite)],
            ),
            stats_final: k(
                "stats_final",
                &ens,
                "stats_final",
                &[(2, ReadWrite), (5, ReadWrite)],
            ),
            finite: k("check_finite", &ens, "finite", &[(1, Read), (4, ReadWrite)]),
            observe: k("observe", &ens, "observe", &[(1, Read), (2, ReadWrite)]),
            obs_sum: k("obs_sum", &ens, "obs_sum", &[(1, Read), (2, ReadWrite)]),
            obs_sq: k("obs_sq", &ens, "obs_sq", &[(1, Read), (2, ReadWrite)]),
            obs_final: k("obs_final", &ens, "obs_final", &[(2, ReadWrite)]),
            loglik: k(
                "log_likelihoods",
                &ens,
                "loglik",
                &[(1, Read), (2, ReadWrite), (6, Read)],
            ),
            model_stage: k(
                "model_stage",
                &models,
                "stage",
                &[
                    (1, ReadWrite),
                    (2, Read),
                    (3, Read),
                    (4, Read),
                    (5, ReadWrite),
                ],
            ),
            model_combine: k(
                "model_combine",
                &models,
                "combine",
                &[
                    (1, ReadWrite),
                    (2, Read),
                    (3, Read),
                    (4, Read),
                    (5, ReadWrite),
                ],
            ),
        }
    }
}

fn make_kernel(
    device: &wgpu::Device,
    name: &'static str,
    module: &wgpu::ShaderModule,
    entry: &str,
    binds: &[(u32, Access)],
) -> Kernel {
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: wgpu::BufferSize::new(PARAM_SLOT),
        },
        count: None,
    }];
    for &(b, access) in binds {
        debug_assert!(access != Access::Uniform);
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: b,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: access == Access::Read,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(name),
        entries: &entries,
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(&pl),
        module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    });
    Kernel {
        name,
        pipeline,
        layout,
        bindings: binds.iter().map(|b| b.0).collect(),
    }
}

impl Backend for Gpu {
    type Buffer = GpuBuffer;

    fn name(&self) -> &'static str {
        "gpu"
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
        let _call = self.exclusive();
        let (rows, cols) = (out.rows, out.cols);
        super::check_noise_mean(out, mean)?;
        if cols == 0 {
            return Ok(());
        }
        let kw = key.key_words();
        let ctr = key.counter(0, 0);
        for (c, chunk) in out.chunks.iter().enumerate() {
            let (r0, r1) = out.chunk_rows(c);
            let (has_mean, mbuf) = match mean {
                None => (0, &self.dummy_ro),
                Some(m) if m.rows == 1 && rows != 1 => (1, m.single("noise mean row")?),
                Some(m) => (2, &m.chunks[c]),
            };
            let p = NoiseParams {
                key0: kw[0],
                key1: kw[1],
                ctr2: ctr[2],
                ctr3: ctr[3],
                rows: (r1 - r0) as u32,
                cols: u32_of(cols, "columns")?,
                row0: r0 as u32,
                has_mean,
                scale,
                mean_row0: 0,
                _pad: [0; 2],
            };
            let g = groups_1d(((r1 - r0) * cols.div_ceil(4)) as u64)?;
            self.dispatch(&self.kernels.noise, &p, &[chunk, mbuf], (g.0, g.1, 1))?;
        }
        Ok(())
    }

    fn inflate(&self, ensemble: &mut GpuBuffer, gamma: f32) -> Result<()> {
        let _call = self.exclusive();
        super::check_inflation(gamma)?;
        if gamma == 1.0 || ensemble.rows < 2 {
            return Ok(());
        }
        self.column_moments(ensemble, false)?;
        let colsum = {
            let s = self
                .scratch
                .lock()
                .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
            s.colsum.clone().expect("column sums allocated")
        };
        for (c, chunk) in ensemble.chunks.iter().enumerate() {
            let (r0, r1) = ensemble.chunk_rows(c);
            let p = EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: ensemble.cols as u32,
                inv_n: 1.0 / ensemble.rows as f32,
                gamma,
                ..Default::default()
            };
            let g = groups_1d(((r1 - r0) * ensemble.cols) as u64)?;
            self.dispatch(&self.kernels.inflate, &p, &[&colsum, chunk], (g.0, g.1, 1))?;
        }
        Ok(())
    }

    fn check_finite(&self, buf: &GpuBuffer, name: &str) -> Result<()> {
        let _call = self.exclusive();
        let slot = self.flag_slot(name, buf.cols)?;
        for (c, chunk) in buf.chunks.iter().enumerate() {
            let (r0, r1) = buf.chunk_rows(c);
            let p = EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: buf.cols as u32,
                flag_slot: slot,
                row0: r0 as u32,
                ..Default::default()
            };
            let g = groups_1d(((r1 - r0) * buf.cols) as u64)?;
            self.dispatch(
                &self.kernels.finite,
                &p,
                &[chunk, &self.flags],
                (g.0, g.1, 1),
            )?;
        }
        Ok(())
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
        let _call = self.exclusive();
        let d = model.dim();
        shape_err("model state", states, states.rows, d)?;
        if steps == 0 || states.rows == 0 {
            return Ok(());
        }
        let (system, p0, p1, p2) = match &model.system {
            System::Lorenz63(l) => (0u32, l.sigma, l.rho, l.beta),
            System::Lorenz96(l) => (1u32, l.forcing, 0.0, 0.0),
            System::Rotation2d(_) => {
                // A 2 x 2 rotation: cheaper on the host than a dispatch, and exact in f64.
                let mut host = self.read(states)?;
                for row in host.chunks_mut(2) {
                    crate::model::rk::advance_state(model, row, steps, &mut []);
                }
                return self.write(states, &host);
            }
            System::Custom(_) => {
                return Err(Error::Unsupported {
                    backend: "gpu".into(),
                    what: format!("the user-defined model `{}`", model.name()),
                    fix: "use a built-in model or --backend cpu".into(),
                })
            }
            System::KuramotoSivashinsky(ks) => return self.advance_ks(ks, states, steps),
            System::NavierStokes2d(ns) => return self.advance_ns(ns, states, steps),
        };
        // Stage coefficients (argument = x + dt Σ c·k) and final weights.
        let (stages, weights): ([[f32; 3]; 4], [f32; 4]) = match model.scheme {
            Scheme::Rk4ThreeEighths => (
                [
                    [0.0, 0.0, 0.0],
                    [1.0 / 3.0, 0.0, 0.0],
                    [-1.0 / 3.0, 1.0, 0.0],
                    [1.0, -1.0, 1.0],
                ],
                [1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0],
            ),
            Scheme::Rk4Classic => (
                [
                    [0.0, 0.0, 0.0],
                    [0.5, 0.0, 0.0],
                    [0.0, 0.5, 0.0],
                    [0.0, 0.0, 1.0],
                ],
                [1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
            ),
        };
        let rows_per_chunk = states.rows_per_chunk;
        let kbufs: Vec<wgpu::Buffer> = {
            let mut s = self
                .scratch
                .lock()
                .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
            let need = (rows_per_chunk.min(states.rows) * d * 4) as u64;
            if s.rk.len() < 4 || s.rk[0].size() < need {
                s.rk.clear();
                for _ in 0..4 {
                    s.rk.push(self.new_buffer(
                        "enff rk stages",
                        need.next_power_of_two().min(self.hw_max_binding).max(need),
                    )?);
                }
            }
            s.rk.clone()
        };
        for (c, chunk) in states.chunks.iter().enumerate() {
            let (r0, r1) = states.chunk_rows(c);
            let rows = (r1 - r0) as u32;
            let g = groups_1d(((r1 - r0) * d) as u64)?;
            for _ in 0..steps {
                for (s, coef) in stages.iter().enumerate() {
                    let p = ModelParams {
                        rows,
                        d: d as u32,
                        system,
                        _pad: 0,
                        dt: model.dt,
                        p0,
                        p1,
                        p2,
                        c1: coef[0],
                        c2: coef[1],
                        c3: coef[2],
                        c4: 0.0,
                    };
                    let ins: [&wgpu::Buffer; 3] = [
                        if s > 0 { &kbufs[0] } else { &self.dummy_ro },
                        if s > 1 { &kbufs[1] } else { &self.dummy_ro },
                        if s > 2 { &kbufs[2] } else { &self.dummy_ro },
                    ];
                    self.dispatch(
                        &self.kernels.model_stage,
                        &p,
                        &[chunk, ins[0], ins[1], ins[2], &kbufs[s]],
                        (g.0, g.1, 1),
                    )?;
                }
                let p = ModelParams {
                    rows,
                    d: d as u32,
                    system,
                    _pad: 0,
                    dt: model.dt,
                    p0,
                    p1,
                    p2,
                    c1: weights[0],
                    c2: weights[1],
                    c3: weights[2],
                    c4: weights[3],
                };
                self.dispatch(
                    &self.kernels.model_combine,
                    &p,
                    &[chunk, &kbufs[0], &kbufs[1], &kbufs[2], &kbufs[3]],
                    (g.0, g.1, 1),
                )?;
            }
        }
        Ok(())
    }

    fn observe(
        &self,
        operator: &dyn ObservationOperator,
        x: &GpuBuffer,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        let _call = self.exclusive();
        let op = self.builtin_obs(operator)?;
        let m = operator.obs_dim(x.cols)?;
        shape_err("observation output", out, x.rows, m)?;
        if out.chunks.len() != 1 && out.rows_per_chunk != x.rows_per_chunk {
            return Err(Error::Unsupported {
                backend: "gpu".into(),
                what: "observing an ensemble whose state and observation blocks differ".into(),
                fix: "observe fewer members at a time".into(),
            });
        }
        let single_out = out.chunks.len() == 1;
        for (c, chunk) in x.chunks.iter().enumerate() {
            let (r0, r1) = x.chunk_rows(c);
            if single_out && r0 > 0 {
                return Err(Error::Unsupported {
                    backend: "gpu".into(),
                    what: "observing a split ensemble into one observation block".into(),
                    fix: "observe fewer members at a time".into(),
                });
            }
            let p = EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: x.cols as u32,
                m: m as u32,
                every: op.every as u32,
                offset: op.offset as u32,
                pointwise: pointwise_code(op.pointwise),
                ..Default::default()
            };
            let g = groups_1d(((r1 - r0) * m) as u64)?;
            let dst = if single_out {
                &out.chunks[0]
            } else {
                &out.chunks[c]
            };
            self.dispatch(&self.kernels.observe, &p, &[chunk, dst], (g.0, g.1, 1))?;
        }
        Ok(())
    }

    fn observed_moments(
        &self,
        operator: &dyn ObservationOperator,
        x: &GpuBuffer,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        let _call = self.exclusive();
        let op = self.builtin_obs(operator)?;
        let (n, d) = (x.rows, x.cols);
        let m = operator.obs_dim(d)?;
        shape_err("observed moments", out, 2, m)?;
        if m == 0 {
            return Ok(());
        }
        let dst = out.single("observed moments")?;
        let g = groups_1d(m as u64)?;
        let params = |c: usize| -> Result<EnsembleParams> {
            let (r0, r1) = x.chunk_rows(c);
            Ok(EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: u32_of(d, "state dimension")?,
                first: (c == 0) as u32,
                m: u32_of(m, "observation dimension")?,
                every: u32_of(op.every, "observe.every")?,
                offset: u32_of(op.offset, "observe.offset")?,
                pointwise: pointwise_code(op.pointwise),
                inv_n: 1.0 / n.max(1) as f32,
                inv_n1: 1.0 / n.max(2).saturating_sub(1) as f32,
                ..Default::default()
            })
        };
        for kernel in [&self.kernels.obs_sum, &self.kernels.obs_sq] {
            for (c, chunk) in x.chunks.iter().enumerate() {
                self.dispatch(kernel, &params(c)?, &[chunk, dst], (g.0, g.1, 1))?;
            }
        }
        self.dispatch(&self.kernels.obs_final, &params(0)?, &[dst], (g.0, g.1, 1))
    }

    fn log_likelihoods(
        &self,
        operator: &dyn ObservationOperator,
        x: &GpuBuffer,
        y: &GpuBuffer,
        obs_noise_std: f32,
        out: &mut GpuBuffer,
    ) -> Result<()> {
        let _call = self.exclusive();
        let op = self.builtin_obs(operator)?;
        let (n, d) = (x.rows, x.cols);
        let m = operator.obs_dim(d)?;
        shape_err("observation", y, 1, m)?;
        shape_err("log-likelihood output", out, 1, n)?;
        crate::error::check_positive(
            "observe.noise_std",
            obs_noise_std as f64,
            "the observation noise std must be positive",
        )?;
        let ybuf = y.single("observation")?;
        let obuf = out.single("log-likelihoods")?;
        for (c, chunk) in x.chunks.iter().enumerate() {
            let (r0, r1) = x.chunk_rows(c);
            let p = EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: d as u32,
                row0: r0 as u32,
                m: m as u32,
                every: op.every as u32,
                offset: op.offset as u32,
                pointwise: pointwise_code(op.pointwise),
                neg_inv_2s2: -1.0 / (2.0 * obs_noise_std * obs_noise_std),
                ..Default::default()
            };
            let rows = (r1 - r0) as u32;
            let (gx, gy) = (rows.min(65_535), rows.div_ceil(65_535).max(1));
            self.dispatch(&self.kernels.loglik, &p, &[chunk, obuf, ybuf], (gx, gy, 1))?;
        }
        Ok(())
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
        let _call = self.exclusive();
        let (n, d) = (x.rows, x.cols);
        shape_err("flow target", target, n, d)?;
        if let Some(s) = source {
            shape_err("flow source", s, n, d)?;
        }
        shape_err("flow log-weights", logits, n, n)?;
        if let Some(b) = bias {
            shape_err("log-weight bias", b, 1, n)?;
        }
        check_path(&path, source.is_some())?;
        let logits_buf = logits.single("flow log-weights")?;
        // Large ensembles are compute-bound: 64 x 64 tiles with 4 x 4 pairs per invocation.
        let big = n > 32;
        let tile = if big { 64 } else { LOGIT_TILE };
        let tiles = (n as u64).div_ceil(tile as u64).pow(2);
        let max_slabs = (d as u64).div_ceil(LOGIT_TK as u64).max(1);
        let want = LOGIT_TARGET_GROUPS.div_ceil(tiles).clamp(1, max_slabs);
        let slab_len = ((d as u64).div_ceil(want))
            .next_multiple_of(LOGIT_TK as u64)
            .max(LOGIT_TK as u64);
        let n_slabs = (d as u64).div_ceil(slab_len).max(1);
        if n_slabs > 65_535 {
            return Err(Error::TooLarge {
                detail: format!("d = {d} needs {n_slabs} slabs, more than one dispatch allows"),
            });
        }
        let partial = {
            let mut s = self
                .scratch
                .lock()
                .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
            self.scratch_buf(
                &mut s.partial,
                n_slabs as usize * n * n,
                "pairwise partial sums",
            )?
            .clone()
        };
        let use_source = source.is_some() && path.b != 0.0;
        for (cx, xb) in x.chunks.iter().enumerate() {
            let (xr0, xr1) = x.chunk_rows(cx);
            for (ct, tb) in target.chunks.iter().enumerate() {
                let (tr0, tr1) = target.chunk_rows(ct);
                let sb = match source {
                    Some(s) if use_source => &s.chunks[ct],
                    _ => &self.dummy_ro,
                };
                let p = LogitParams {
                    n_x: (xr1 - xr0) as u32,
                    n_t: (tr1 - tr0) as u32,
                    d: u32_of(d, "d")?,
                    slab_len: slab_len as u32,
                    n_total: n as u32,
                    row0_x: xr0 as u32,
                    row0_t: tr0 as u32,
                    n_slabs: n_slabs as u32,
                    a: path.a,
                    b: path.b,
                    has_source: use_source as u32,
                    has_bias: 0,
                    neg_inv_2s2: 0.0,
                    _pad: [0; 3],
                };
                let gx = ((xr1 - xr0) as u32).div_ceil(tile);
                let gy = ((tr1 - tr0) as u32).div_ceil(tile);
                let kernel = if big {
                    &self.kernels.logits_big
                } else {
                    &self.kernels.logits
                };
                self.dispatch(
                    kernel,
                    &p,
                    &[xb, tb, sb, &partial],
                    (gx, gy, n_slabs as u32),
                )?;
            }
        }
        let s = path.s as f64;
        let p = LogitParams {
            n_total: n as u32,
            n_slabs: n_slabs as u32,
            has_bias: bias.is_some() as u32,
            neg_inv_2s2: (-1.0 / (2.0 * s * s)) as f32,
            ..Default::default()
        };
        let bias_buf = match bias {
            Some(b) => b.single("log-weight bias")?,
            None => &self.dummy_ro,
        };
        let g = groups_1d((n * n) as u64)?;
        self.dispatch(
            &self.kernels.logits_reduce,
            &p,
            &[&partial, bias_buf, logits_buf],
            (g.0, g.1, 1),
        )
    }

    fn softmax_rows(&self, logits: &mut GpuBuffer) -> Result<()> {
        let _call = self.exclusive();
        let n = logits.cols;
        if logits.rows != n {
            return Err(Error::shape(
                "flow log-weights",
                "a square n x n matrix",
                format!("{} x {}", logits.rows, n),
            ));
        }
        let slot = self.flag_slot("flow log-weights", n)?;
        let buf = logits.single("flow log-weights")?;
        let p = SoftmaxParams {
            n: n as u32,
            flag_slot: slot,
            _pad: [0; 2],
        };
        let rows = n as u32;
        let (gx, gy) = (rows.clamp(1, 65_535), rows.div_ceil(65_535).max(1));
        self.dispatch(&self.kernels.softmax, &p, &[buf, &self.flags], (gx, gy, 1))
    }

    fn flow_update(
        &self,
        state: &mut GpuBuffer,
        up: &FlowUpdate<'_, Self>,
        mut velocity_out: Option<&mut GpuBuffer>,
    ) -> Result<()> {
        let _call = self.exclusive();
        let (n, d) = (state.rows, state.cols);
        shape_err("flow weights", up.weights, n, n)?;
        shape_err("flow target", up.target, n, d)?;
        if let Some(e) = up.eval {
            shape_err("flow evaluation point", e, n, d)?;
        }
        if let Some(s) = up.source {
            shape_err("flow source", s, n, d)?;
        }
        if let Some((v, _)) = up.previous {
            shape_err("previous velocity", v, n, d)?;
        }
        if let Some(v) = velocity_out.as_deref() {
            shape_err("velocity output", v, n, d)?;
        }
        check_path(&up.path, up.source.is_some())?;
        let guidance = match &up.guidance {
            Some(g) => {
                let op = self.builtin_obs(g.operator)?;
                let m = g.operator.obs_dim(d)?;
                shape_err("observation", g.y, 1, m)?;
                Some((op, m, g.scale, g.horizon, g.y.single("observation")?))
            }
            None => None,
        };
        let wbuf = up.weights.single("flow weights")?;
        let pth = up.path;
        let cx = (pth.ds as f64 / pth.s as f64) as f32;
        let ua = pth.da - cx * pth.a;
        let ub = pth.db - cx * pth.b;
        let use_source = up.source.is_some() && ub != 0.0;
        let t_chunks = up.target.chunks.len();
        let acc = if t_chunks > 1 {
            let mut s = self
                .scratch
                .lock()
                .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
            Some(
                self.scratch_buf(
                    &mut s.acc,
                    state.rows_per_chunk.min(n) * d,
                    "velocity accumulator",
                )?
                .clone(),
            )
        } else {
            None
        };
        let g = groups_1d(d as u64)?;
        for ci in 0..state.chunks.len() {
            let (sr0, sr1) = state.chunk_rows(ci);
            for cj in 0..t_chunks {
                let (tr0, tr1) = up.target.chunk_rows(cj);
                let last = cj + 1 == t_chunks;
                let (op, m, scale, horizon, ybuf) = match &guidance {
                    Some((op, m, s, h, y)) => (Some(*op), *m, *s, *h, *y),
                    None => (None, 0, 0.0, 0.0, &self.dummy_ro),
                };
                let p = UpdateParams {
                    n_rows: (sr1 - sr0) as u32,
                    n_t: (tr1 - tr0) as u32,
                    d: u32_of(d, "d")?,
                    n_total: n as u32,
                    row0_state: sr0 as u32,
                    row0_t: tr0 as u32,
                    has_source: use_source as u32,
                    has_eval: up.eval.is_some() as u32,
                    has_prev: up.previous.is_some() as u32,
                    has_vel_out: velocity_out.is_some() as u32,
                    first: (cj == 0) as u32,
                    last: last as u32,
                    guided: op.is_some() as u32,
                    obs_every: op.map_or(1, |o| o.every as u32),
                    obs_offset: op.map_or(0, |o| o.offset as u32),
                    obs_m: m as u32,
                    pointwise: op.map_or(0, |o| pointwise_code(o.pointwise)),
                    cx,
                    ua,
                    ub,
                    h_new: up.h_new,
                    h_old: up.previous.map_or(0.0, |(_, h)| h),
                    scale,
                    horizon,
                    clamp: up.clamp.unwrap_or(0.0),
                    _pad: [0; 3],
                };
                let src = match up.source {
                    Some(s) if use_source => &s.chunks[cj],
                    _ => &self.dummy_ro,
                };
                let eval = up.eval.map_or(&self.dummy_ro, |e| &e.chunks[ci]);
                let prev = up.previous.map_or(&self.dummy_ro, |(v, _)| &v.chunks[ci]);
                let vout = velocity_out
                    .as_deref_mut()
                    .map_or(&self.dummy_rw[0], |v| &v.chunks[ci]);
                let accb = acc.as_ref().unwrap_or(&self.dummy_rw[1]);
                // More than 32 means per target block: a tiled matrix product.
                let (kernel, groups) = if tr1 - tr0 > 32 {
                    let gx = u32_of(d.div_ceil(64), "d / 64")?;
                    let gy = ((sr1 - sr0) as u32).div_ceil(64);
                    if gx > 65_535 || gy > 65_535 {
                        return Err(Error::TooLarge {
                            detail: format!("d = {d} is too large for one tiled dispatch"),
                        });
                    }
                    (&self.kernels.update_tiled, (gx, gy, 1))
                } else {
                    (&self.kernels.update, (g.0, g.1, 1))
                };
                self.dispatch(
                    kernel,
                    &p,
                    &[
                        wbuf,
                        &up.target.chunks[cj],
                        src,
                        eval,
                        &state.chunks[ci],
                        prev,
                        vout,
                        ybuf,
                        accb,
                    ],
                    groups,
                )?;
            }
        }
        Ok(())
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
        let _call = self.exclusive();
        let (n, d) = (ensemble.rows, ensemble.cols);
        shape_err("truth", truth, 1, d)?;
        if n == 0 || d == 0 {
            return Err(Error::invalid(
                "ensemble",
                format!("{n} x {d}"),
                "metrics need at least one member and one component",
            ));
        }
        self.column_moments(ensemble, true)?;
        let g = groups_1d(d as u64)?;
        let count = g.0 as usize * g.1 as usize;
        let (colsum, colsq, part) = {
            let mut s = self
                .scratch
                .lock()
                .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
            let part = self
                .scratch_buf(&mut s.stats_part, 2 * count, "metric partial sums")?
                .clone();
            (
                s.colsum.clone().expect("allocated"),
                s.colsq.clone().expect("allocated"),
                part,
            )
        };
        let p = EnsembleParams {
            rows: n as u32,
            cols: d as u32,
            inv_n: 1.0 / n as f32,
            inv_n1: 1.0 / (n.max(2) - 1) as f32,
            count: count as u32,
            ..Default::default()
        };
        self.dispatch(
            &self.kernels.stats_partial,
            &p,
            &[truth.single("truth")?, &colsum, &colsq, &part],
            (g.0, g.1, 1),
        )?;
        self.dispatch(
            &self.kernels.stats_final,
            &p,
            &[&self.result2, &part],
            (1, 1, 1),
        )?;
        let bytes = self.read_small(&self.result2, 8)?;
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        Ok(EnsembleStats {
            rmse: (v[0] as f64 / d as f64).sqrt(),
            spread: if n < 2 {
                0.0
            } else {
                (v[1] as f64 / d as f64).sqrt()
            },
        })
    }
}
