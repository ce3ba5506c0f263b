//! The CPU reference backend: every kernel operation in plain Rust, parallel over both cores
//! with rayon, f64 accumulation for reductions over `d`.
//!
//! Small kernels (below `PARALLEL_THRESHOLD` multiply-adds: a Lorenz-96 cycle at d = 40)
//! run on the calling thread and never touch the thread pool: handing a job to rayon from
//! outside the pool wakes a worker and puts the caller to sleep until it is done, which costs
//! more than the kernel. Such a run gives the same numbers as the split it replaces (one
//! part, combined as rayon would).
//!
//! Kernels do not allocate once warm: per-thread scratch lives in the backend and grows only
//! when a larger problem arrives.
//!
//! Every buffer carries a *stamp*, a number drawn afresh whenever the buffer is created, cloned
//! or mutably borrowed. The fused flow update uses stamps to hand the pairwise distances of the
//! next flow step to the next `flow_logits` call only when its inputs provably did not change
//! (see `flow.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use rustfft::num_complex::Complex;

use super::{Backend, DeviceBuffer, EnsembleStats, FlowUpdate, PathCoefficients};
use crate::error::{Error, Result};
use crate::model::{rk, Model, System};
use crate::observe::ObservationOperator;
use crate::rng::{self, NoiseKey};

mod ensemble;
pub mod ensemble_space;
mod flow;
pub mod gain;
mod lanes;
mod models;
mod noise;
pub mod simd;
pub mod spectral;

/// Column block size of the blocked flow kernels (values per member per block).
pub(crate) const BLOCK: usize = 256;

/// Components of a row drawn at a time by `fill_normal`.
const NOISE_CHUNK: usize = 2048;

/// Work below this many multiply-adds runs on one thread: on the calling thread, without
/// handing it to rayon's pool (a hand-off wakes a worker and blocks the caller until it is
/// done, which costs more than a small kernel).
const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Columns per chunk of the metrics' column moments.
const STATS_CHUNK: usize = 64;

/// Multiply-adds counted per observed value of an observation operator (arctan's
/// polynomial), for the parallel threshold.
const OBSERVE_COST: usize = 16;

/// Source of buffer stamps (never 0).
static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

fn fresh_stamp() -> u64 {
    NEXT_STAMP.fetch_add(1, Ordering::Relaxed)
}

/// A `rows × cols` f32 matrix in host memory.
#[derive(Debug)]
pub struct CpuBuffer {
    rows: usize,
    cols: usize,
    /// The values. Mutate only through [`CpuBuffer::data_mut`] or
    /// [`CpuBuffer::as_mut_slice`], which renew the stamp.
    data: Vec<f32>,
    /// Identifies this buffer *and* its contents: renewed on every mutable access.
    stamp: u64,
}

impl Clone for CpuBuffer {
    fn clone(&self) -> Self {
        CpuBuffer {
            rows: self.rows,
            cols: self.cols,
            data: self.data.clone(),
            stamp: fresh_stamp(),
        }
    }
}

impl PartialEq for CpuBuffer {
    fn eq(&self, other: &Self) -> bool {
        self.rows == other.rows && self.cols == other.cols && self.data == other.data
    }
}

impl CpuBuffer {
    fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        CpuBuffer {
            rows,
            cols,
            data,
            stamp: fresh_stamp(),
        }
    }

    /// The values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.data_mut()
    }

    /// The values for writing: renews the stamp first.
    fn data_mut(&mut self) -> &mut [f32] {
        self.stamp = fresh_stamp();
        &mut self.data
    }

    /// The current stamp (changes whenever the contents may have changed).
    pub(crate) fn stamp(&self) -> u64 {
        self.stamp
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
    /// Pairwise distances of the next flow step, accumulated by a fused flow update.
    pub(crate) f64b: Vec<f64>,
    /// Complex scratch of the spectral models (Kuramoto–Sivashinsky).
    pub(crate) c32: Vec<Complex<f32>>,
}

/// Scratch shared by the kernels: per-worker slots and what the last fused flow update left
/// for the next `flow_logits` call. One lock guards both, so they always agree.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) slots: Vec<Slot>,
    pub(crate) next_logits: Option<flow::NextLogits>,
}

pub(crate) fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// The CPU backend.
pub struct Cpu {
    scratch: Mutex<Scratch>,
    /// Unguided velocities for operators without a fused kernel (`n × d`, grown on demand).
    rows_scratch: Mutex<Vec<f32>>,
    /// A cap on the memory runs may use (bytes), below what the host reports.
    memory_limit: Option<u64>,
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
            scratch: Mutex::new(Scratch {
                slots: (0..threads).map(|_| Slot::default()).collect(),
                next_logits: None,
            }),
            rows_scratch: Mutex::new(Vec::new()),
            memory_limit: None,
        }
    }

    /// Caps the memory experiments may plan to use on this backend (bytes); a run whose
    /// estimate exceeds it is refused before allocating, with what would fit.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
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

    pub(crate) fn with_scratch<R>(&self, f: impl FnOnce(&mut Scratch) -> R) -> Result<R> {
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("CPU scratch lock poisoned by an earlier panic".into()))?;
        Ok(f(&mut guard))
    }

    pub(crate) fn with_slots<R>(&self, f: impl FnOnce(&mut [Slot]) -> R) -> Result<R> {
        self.with_scratch(|s| f(&mut s.slots))
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

/// A split of `0..len` into contiguous non-empty ranges whose starts are multiples of `align`
/// (one empty range when `len == 0`), computed without allocating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Split {
    len: usize,
    /// Length of every range but the last, a multiple of `align`.
    step: usize,
    count: usize,
}

impl Split {
    /// At most `parts` ranges.
    pub(crate) fn new(len: usize, parts: usize, align: usize) -> Self {
        let units = len.div_ceil(align).max(1);
        let per = units.div_ceil(parts.clamp(1, units));
        let step = per * align;
        Split {
            len,
            step,
            count: len.div_ceil(step).max(1),
        }
    }

    /// Number of ranges.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Range `p` as `(start, end)`.
    pub(crate) fn get(&self, p: usize) -> (usize, usize) {
        (
            (p * self.step).min(self.len),
            ((p + 1) * self.step).min(self.len),
        )
    }

    /// All ranges, in parallel.
    pub(crate) fn par_iter(self) -> impl IndexedParallelIterator<Item = (usize, usize)> {
        (0..self.count).into_par_iter().map(move |p| self.get(p))
    }

    /// Runs `work` on every range: on the calling thread when there is only one (no hand-off
    /// to the thread pool, whose wake-up costs more than a small kernel), else in parallel.
    pub(crate) fn for_each<F>(self, work: F)
    where
        F: Fn((usize, usize)) + Sync + Send,
    {
        if self.count == 1 {
            work(self.get(0));
        } else {
            self.par_iter().for_each(work);
        }
    }

    /// `reduce` over `map` of every range, as rayon's `map(..).reduce(identity, ..)` would
    /// combine them (the identity folded in first); on the calling thread when there is only
    /// one range.
    pub(crate) fn map_reduce<T, M, I, R>(self, map: M, identity: I, reduce: R) -> T
    where
        T: Send,
        M: Fn((usize, usize)) -> T + Sync + Send,
        I: Fn() -> T + Sync + Send,
        R: Fn(T, T) -> T + Sync + Send,
    {
        if self.count == 1 {
            reduce(identity(), map(self.get(0)))
        } else {
            self.par_iter().map(map).reduce(identity, reduce)
        }
    }
}

impl Backend for Cpu {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn memory_capacity(&self) -> Option<u64> {
        match (self.memory_limit, host_available_memory()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
        Ok(CpuBuffer::new(rows, cols, data))
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
        buf.data_mut().copy_from_slice(data);
        Ok(())
    }

    fn read(&self, buf: &CpuBuffer) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
    }

    fn copy(&self, src: &CpuBuffer, dst: &mut CpuBuffer) -> Result<()> {
        Cpu::same_shape("copy destination", dst, src.rows, src.cols)?;
        dst.data_mut().copy_from_slice(&src.data);
        Ok(())
    }

    fn fill_normal(
        &self,
        out: &mut CpuBuffer,
        key: NoiseKey,
        mean: Option<&CpuBuffer>,
        scale: f32,
    ) -> Result<()> {
        noise::fill_normal(self, out, key, mean, scale)
    }

    fn inflate(&self, ensemble: &mut CpuBuffer, gamma: f32) -> Result<()> {
        ensemble::inflate(self, ensemble, gamma)
    }

    fn check_finite(&self, buf: &CpuBuffer, name: &str) -> Result<()> {
        ensemble::check_finite(self, buf, name)
    }

    fn advance(&self, model: &Model, states: &mut CpuBuffer, steps: usize) -> Result<()> {
        models::advance(self, model, states, steps)
    }

    fn observe(
        &self,
        operator: &dyn ObservationOperator,
        x: &CpuBuffer,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        ensemble::observe(self, operator, x, out)
    }

    fn observed_moments(
        &self,
        operator: &dyn ObservationOperator,
        x: &CpuBuffer,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        ensemble::observed_moments(self, operator, x, out)
    }

    fn log_likelihoods(
        &self,
        operator: &dyn ObservationOperator,
        x: &CpuBuffer,
        y: &CpuBuffer,
        obs_noise_std: f32,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        ensemble::log_likelihoods(self, operator, x, y, obs_noise_std, out)
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

    fn gain_step(&self, state: &mut CpuBuffer, step: &super::GainStep<'_, Self>) -> Result<()> {
        gain::gain_step(self, state, step)
    }

    fn local_gains(
        &self,
        g: &super::LocalGains<'_, Self>,
        gain: &mut CpuBuffer,
        hbar: &mut CpuBuffer,
    ) -> Result<()> {
        let shape = super::check_local_gains(g, gain, hbar)?;
        gain::local_gains(
            &gain::GainInputs {
                x: g.forecast.as_slice(),
                xh: g.endpoint.as_slice(),
                index: g.index.as_slice(),
                taper: g.taper.as_slice(),
                shape,
                observe: g.observe,
                noise_std: g.noise_std,
                taus: g.taus,
            },
            gain.as_mut_slice(),
            hbar.as_mut_slice(),
        )
    }

    fn letkf_analysis(
        &self,
        ensemble: &mut CpuBuffer,
        hx: &CpuBuffer,
        y: &CpuBuffer,
        local: &super::LocalAnalysis,
    ) -> Result<()> {
        let n = ensemble.rows;
        ensemble_space::letkf_analysis(
            ensemble.as_mut_slice(),
            n,
            hx.as_slice(),
            y.as_slice(),
            local,
        )
    }

    fn ensemble_transform(
        &self,
        weights: &CpuBuffer,
        x: &CpuBuffer,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        flow::ensemble_transform(self, weights, x, out)
    }

    fn observed_products(
        &self,
        hx: &CpuBuffer,
        y: &CpuBuffer,
        eta: Option<&CpuBuffer>,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        let n = out.cols;
        let parallel = self.threads() > 1;
        self.with_slots(|slots| {
            ensemble_space::observed_products_in(
                &hx.data,
                n,
                &y.data,
                eta.map(|e| e.as_slice()),
                out.data_mut(),
                &mut slots[0].f64a,
                parallel,
            )
        })?
    }

    fn ensemble_stats(&self, ensemble: &CpuBuffer, truth: &CpuBuffer) -> Result<EnsembleStats> {
        ensemble::ensemble_stats(self, ensemble, truth)
    }
}

/// Host memory available to a new allocation (`MemAvailable` on Linux), bytes.
fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range_with_aligned_starts() {
        for len in [0usize, 1, 7, 255, 256, 257, 1000, 10_000, 100_003] {
            for parts in 1..=5 {
                for align in [1usize, 64, 256] {
                    let s = Split::new(len, parts, align);
                    assert!(s.count() >= 1 && s.count() <= parts.max(1));
                    let mut next = 0;
                    for p in 0..s.count() {
                        let (a, b) = s.get(p);
                        assert_eq!(a, next, "len {len} parts {parts} align {align}");
                        assert!(a % align == 0 && (b > a || len == 0));
                        next = b;
                    }
                    assert_eq!(next, len);
                    let collected: Vec<_> = s.par_iter().collect();
                    assert_eq!(collected.len(), s.count());
                }
            }
        }
    }

    #[test]
    fn one_part_runs_give_the_parallel_results() {
        for (len, parts) in [(1usize, 1usize), (100, 1), (1000, 3), (5000, 4)] {
            let split = Split::new(len, parts, 64);
            let f = |(a, b): (usize, usize)| (a..b).map(|k| (k as f64).sqrt()).sum::<f64>();
            let got = split.map_reduce(f, || 0.0, |a, b| a + b);
            let want = split.par_iter().map(f).reduce(|| 0.0, |a, b| a + b);
            assert_eq!(got.to_bits(), want.to_bits(), "len {len}, parts {parts}");
            let seen = std::sync::atomic::AtomicUsize::new(0);
            split.for_each(|(a, b)| {
                seen.fetch_add(b - a, Ordering::Relaxed);
            });
            assert_eq!(seen.into_inner(), len);
        }
    }

    #[test]
    fn ensemble_stats_equal_the_column_by_column_sums() {
        let cpu = Cpu::new();
        // One part and (with several threads) parallel parts; chunk edges at 64 columns.
        for (n, d) in [(1usize, 1usize), (2, 63), (20, 40), (5, 129), (20, 5000)] {
            let key = NoiseKey::new(5, crate::rng::Stream::User, d as u32);
            let mut ens = cpu.zeros(n, d).unwrap();
            cpu.fill_normal(&mut ens, key, None, 1.5).unwrap();
            let mut truth = cpu.zeros(1, d).unwrap();
            cpu.fill_normal(&mut truth, key.with_step(1), None, 1.0)
                .unwrap();
            let got = cpu.ensemble_stats(&ens, &truth).unwrap();
            let (x, t) = (ens.as_slice(), truth.as_slice());
            let (se, var) = Split::new(d, cpu.parts_for(n * d), 64)
                .par_iter()
                .map(|(k0, k1)| {
                    let (mut se, mut var) = (0.0f64, 0.0f64);
                    for k in k0..k1 {
                        let mut s = 0.0f64;
                        for i in 0..n {
                            s += x[i * d + k] as f64;
                        }
                        let mean = s / n as f64;
                        let mut ss = 0.0f64;
                        for i in 0..n {
                            let dv = x[i * d + k] as f64 - mean;
                            ss += dv * dv;
                        }
                        se += (mean - t[k] as f64).powi(2);
                        var += ss / (n.max(2) - 1) as f64;
                    }
                    (se, var)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            let rmse = (se / d as f64).sqrt();
            let spread = if n < 2 { 0.0 } else { (var / d as f64).sqrt() };
            assert_eq!(got.rmse.to_bits(), rmse.to_bits(), "n {n}, d {d}");
            assert_eq!(got.spread.to_bits(), spread.to_bits(), "n {n}, d {d}");
        }
    }

    #[test]
    fn buffer_stamps_change_on_every_mutable_access() {
        let cpu = Cpu::new();
        let mut a = cpu.upload(2, 3, &[1.0; 6]).unwrap();
        let s0 = a.stamp();
        let b = a.clone();
        assert_ne!(b.stamp(), s0);
        assert_eq!(a, b);
        a.as_mut_slice()[0] = 2.0;
        let s1 = a.stamp();
        assert_ne!(s1, s0);
        cpu.copy(&b, &mut a).unwrap();
        assert_ne!(a.stamp(), s1);
        let s2 = a.stamp();
        let _ = cpu.read(&a).unwrap();
        cpu.check_finite(&a, "a").unwrap();
        assert_eq!(a.stamp(), s2, "reads keep the stamp");
    }
}
