//! The CPU reference backend: every kernel operation in plain Rust, parallel over both cores
//! with rayon, f64 accumulation for reductions over `d`.
//!
//! Kernels do not allocate once warm: per-thread scratch lives in the backend and grows only
//! when a larger problem arrives.

use std::sync::Mutex;

use rayon::prelude::*;

use super::{Backend, DeviceBuffer, EnsembleStats, FlowUpdate, PathCoefficients};
use crate::error::{Error, Result};
use crate::model::{rk, Model, System};
use crate::observe::ObservationOperator;
use crate::rng::{self, NoiseKey};

mod flow;
pub mod simd;

/// Column block size of the blocked flow kernels (values per member per block).
pub(crate) const BLOCK: usize = 256;

/// Work below this many multiply-adds runs on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 16;

/// A `rows × cols` f32 matrix in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuBuffer {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuBuffer {
    /// The values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

impl DeviceBuffer for CpuBuffer {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// Per-worker scratch memory of the CPU kernels.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) f32a: Vec<f32>,
    pub(crate) f32b: Vec<f32>,
    pub(crate) f32c: Vec<f32>,
    pub(crate) f64a: Vec<f64>,
}

pub(crate) fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// The CPU backend.
pub struct Cpu {
    slots: Mutex<Vec<Slot>>,
    /// Unguided velocities for operators without a fused kernel (`n × d`, grown on demand).
    rows_scratch: Mutex<Vec<f32>>,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::new()
    }
}

impl Cpu {
    /// A CPU backend using rayon's global thread pool.
    pub fn new() -> Self {
        let threads = rayon::current_num_threads().max(1);
        Cpu {
            slots: Mutex::new((0..threads).map(|_| Slot::default()).collect()),
            rows_scratch: Mutex::new(Vec::new()),
        }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads().max(1)
    }

    /// How many parallel parts a job of `work` multiply-adds should be split into.
    pub(crate) fn parts_for(&self, work: usize) -> usize {
        if work < PARALLEL_THRESHOLD {
            1
        } else {
            self.threads()
        }
    }

    pub(crate) fn with_slots<R>(&self, f: impl FnOnce(&mut [Slot]) -> R) -> Result<R> {
        let mut guard = self
            .slots
            .lock()
            .map_err(|_| Error::Gpu("CPU scratch lock poisoned by an earlier panic".into()))?;
        Ok(f(&mut guard))
    }

    fn same_shape(name: &str, a: &CpuBuffer, rows: usize, cols: usize) -> Result<()> {
        if a.rows != rows || a.cols != cols {
            return Err(Error::shape(
                name,
                format!("{rows} x {cols}"),
                format!("{} x {}", a.rows, a.cols),
            ));
        }
        Ok(())
    }
}

/// Splits `0..len` into `parts` contiguous ranges whose starts are multiples of `align`.
pub(crate) fn ranges(len: usize, parts: usize, align: usize) -> Vec<(usize, usize)> {
    let units = len.div_ceil(align).max(1);
    let parts = parts.clamp(1, units);
    let per = units.div_ceil(parts);
    (0..parts)
        .map(|p| ((p * per * align).min(len), ((p + 1) * per * align).min(len)))
        .filter(|(a, b)| b > a || len == 0)
        .collect()
}

impl Backend for Cpu {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn describe(&self) -> String {
        format!(
            "CPU reference backend, {} threads, {} inner loops",
            self.threads(),
            if simd::has_fma() {
                "AVX2+FMA"
            } else {
                "portable"
            }
        )
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuBuffer> {
        let len = rows.checked_mul(cols).ok_or_else(|| Error::TooLarge {
            detail: format!("a {rows} x {cols} buffer overflows the address space"),
        })?;
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| Error::TooLarge {
            detail: format!(
                "cannot allocate a {rows} x {cols} buffer ({:.2} GiB) in host memory",
                len as f64 * 4.0 / (1u64 << 30) as f64
            ),
        })?;
        data.resize(len, 0.0);
        Ok(CpuBuffer { rows, cols, data })
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuBuffer> {
        let mut b = self.zeros(rows, cols)?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn write(&self, buf: &mut CpuBuffer, data: &[f32]) -> Result<()> {
        if data.len() != buf.data.len() {
            return Err(Error::shape(
                "buffer write",
                format!("{} values ({} x {})", buf.data.len(), buf.rows, buf.cols),
                format!("{} values", data.len()),
            ));
        }
        buf.data.copy_from_slice(data);
        Ok(())
    }

    fn read(&self, buf: &CpuBuffer) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
    }

    fn copy(&self, src: &CpuBuffer, dst: &mut CpuBuffer) -> Result<()> {
        Cpu::same_shape("copy destination", dst, src.rows, src.cols)?;
        dst.data.copy_from_slice(&src.data);
        Ok(())
    }

    fn fill_normal(
        &self,
        out: &mut CpuBuffer,
        key: NoiseKey,
        mean: Option<&CpuBuffer>,
        scale: f32,
    ) -> Result<()> {
        let (rows, cols) = (out.rows, out.cols);
        if let Some(m) = mean {
            if m.cols != cols || (m.rows != rows && m.rows != 1) {
                return Err(Error::shape(
                    "noise mean",
                    format!("{rows} x {cols} or 1 x {cols}"),
                    format!("{} x {}", m.rows, m.cols),
                ));
            }
        }
        if cols == 0 {
            return Ok(());
        }
        out.data
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, row)| {
                rng::fill_normal_row(&key, i as u32, row);
                match mean {
                    Some(m) => {
                        let mrow = if m.rows == 1 { m.row(0) } else { m.row(i) };
                        for (v, &mu) in row.iter_mut().zip(mrow) {
                            *v = mu + scale * *v;
                        }
                    }
                    None => row.iter_mut().for_each(|v| *v *= scale),
                }
            });
        Ok(())
    }

    fn inflate(&self, ensemble: &mut CpuBuffer, gamma: f32) -> Result<()> {
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(Error::invalid(
                "filter.inflation",
                gamma,
                "inflation must be a finite positive factor (1.0 = none)",
            ));
        }
        if gamma == 1.0 || ensemble.rows < 2 {
            return Ok(());
        }
        let (n, d) = (ensemble.rows, ensemble.cols);
        let inv_n = 1.0 / n as f64;
        let data_ptr = flow::SyncPtr(ensemble.data.as_mut_ptr());
        let parts = self.parts_for(n * d);
        ranges(d, parts, 64).into_par_iter().for_each(|(k0, k1)| {
            for k in k0..k1 {
                // SAFETY: parts own disjoint column ranges of the matrix.
                let mut s = 0.0f64;
                for i in 0..n {
                    s += unsafe { *data_ptr.get().add(i * d + k) } as f64;
                }
                let mean = s * inv_n;
                for i in 0..n {
                    unsafe {
                        let p = data_ptr.get().add(i * d + k);
                        *p = (mean + gamma as f64 * (*p as f64 - mean)) as f32;
                    }
                }
            }
        });
        Ok(())
    }

    fn check_finite(&self, buf: &CpuBuffer, name: &str) -> Result<()> {
        crate::error::check_finite(
            name,
            &buf.data,
            buf.cols,
            "check the inputs; a non-finite ensemble usually means the filter diverged",
        )
    }

    fn advance(&self, model: &Model, states: &mut CpuBuffer, steps: usize) -> Result<()> {
        let d = model.dim();
        if states.cols != d {
            return Err(Error::shape(
                "model state",
                format!("{d} components per member ({})", model.name()),
                format!("{} components", states.cols),
            ));
        }
        if steps == 0 || states.rows == 0 {
            return Ok(());
        }
        if matches!(model.system, System::Rotation2d(_)) {
            for row in states.data.chunks_mut(2) {
                rk::advance_state(model, row, steps, &mut []);
            }
            return Ok(());
        }
        let rows = states.rows;
        let parts = self.parts_for(rows * d * steps * 16).min(rows);
        let row_ranges = ranges(rows, parts, 1);
        self.with_slots(|slots| {
            let mut chunks: Vec<&mut [f32]> = Vec::with_capacity(row_ranges.len());
            let mut rest: &mut [f32] = &mut states.data;
            for (a, b) in &row_ranges {
                let (head, tail) = rest.split_at_mut((b - a) * d);
                chunks.push(head);
                rest = tail;
            }
            chunks
                .into_par_iter()
                .zip(slots.par_iter_mut())
                .for_each(|(chunk, slot)| {
                    let scratch = grow(&mut slot.f32a, rk::SCRATCH_VECTORS * d);
                    for row in chunk.chunks_mut(d) {
                        rk::advance_state(model, row, steps, scratch);
                    }
                });
        })
    }

    fn observe(
        &self,
        operator: &dyn ObservationOperator,
        x: &CpuBuffer,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        let m = operator.obs_dim(x.cols)?;
        Cpu::same_shape("observation output", out, x.rows, m)?;
        if m == 0 {
            return Ok(());
        }
        out.data
            .par_chunks_mut(m)
            .zip(x.data.par_chunks(x.cols.max(1)))
            .for_each(|(y, xi)| operator.apply(xi, y));
        Ok(())
    }

    fn log_likelihoods(
        &self,
        operator: &dyn ObservationOperator,
        x: &CpuBuffer,
        y: &CpuBuffer,
        obs_noise_std: f32,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        let (n, d) = (x.rows, x.cols);
        let m = operator.obs_dim(d)?;
        Cpu::same_shape("observation", y, 1, m)?;
        Cpu::same_shape("log-likelihood output", out, 1, n)?;
        crate::error::check_positive(
            "observe.noise_std",
            obs_noise_std as f64,
            "the observation noise std must be positive",
        )?;
        let inv = 1.0 / (2.0 * obs_noise_std as f64 * obs_noise_std as f64);
        self.with_slots(|slots| {
            let slot = &mut slots[0];
            let h = grow(&mut slot.f32a, m);
            for i in 0..n {
                operator.apply(x.row(i), h);
                let e: f64 = h
                    .iter()
                    .zip(&y.data)
                    .map(|(&hk, &yk)| ((yk - hk) as f64).powi(2))
                    .sum();
                out.data[i] = (-e * inv) as f32;
            }
        })
    }

    fn flow_logits(
        &self,
        x: &CpuBuffer,
        target: &CpuBuffer,
        source: Option<&CpuBuffer>,
        path: PathCoefficients,
        bias: Option<&CpuBuffer>,
        logits: &mut CpuBuffer,
    ) -> Result<()> {
        flow::flow_logits(self, x, target, source, path, bias, logits)
    }

    fn softmax_rows(&self, logits: &mut CpuBuffer) -> Result<()> {
        flow::softmax_rows(logits)
    }

    fn flow_update(
        &self,
        state: &mut CpuBuffer,
        update: &FlowUpdate<'_, Self>,
        velocity_out: Option<&mut CpuBuffer>,
    ) -> Result<()> {
        flow::flow_update(self, state, update, velocity_out)
    }

    fn ensemble_stats(&self, ensemble: &CpuBuffer, truth: &CpuBuffer) -> Result<EnsembleStats> {
        let (n, d) = (ensemble.rows, ensemble.cols);
        Cpu::same_shape("truth", truth, 1, d)?;
        if n == 0 || d == 0 {
            return Err(Error::invalid(
                "ensemble",
                format!("{n} x {d}"),
                "metrics need at least one member and one component",
            ));
        }
        let parts = self.parts_for(n * d);
        let data = &ensemble.data;
        let (se, var) = ranges(d, parts, 64)
            .into_par_iter()
            .map(|(k0, k1)| {
                let mut se = 0.0f64;
                let mut var = 0.0f64;
                for k in k0..k1 {
                    let mut s = 0.0f64;
                    for i in 0..n {
                        s += data[i * d + k] as f64;
                    }
                    let mean = s / n as f64;
                    let mut ss = 0.0f64;
                    for i in 0..n {
                        let dv = data[i * d + k] as f64 - mean;
                        ss += dv * dv;
                    }
                    se += (mean - truth.data[k] as f64).powi(2);
                    var += ss / (n.max(2) - 1) as f64;
                }
                (se, var)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        Ok(EnsembleStats {
            rmse: (se / d as f64).sqrt(),
            spread: if n < 2 { 0.0 } else { (var / d as f64).sqrt() },
        })
    }
}
