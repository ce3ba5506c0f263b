//! How the state is split between processes: contiguous slabs of components, the
//! collectives a filter needs across them ([`Comm`]: summed logits and statistics, neighbour
//! exchanges), halo extensions for localized gains ([`halo`]), and noise keyed by global
//! component so that every split draws the same numbers.
//!
//! A filter receives a [`Shard`] (its slab and the communicator) as a handle and never knows
//! how the ranks were started; [`SingleProcess`] is the trivial one-rank communicator, and
//! `crate::distributed` supplies the MPI one and drives sharded runs.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::observe::{ObservationOperator, Observe};
use crate::rng::{self, NoiseKey};

pub mod halo;

/// The collectives a sharded run needs.
pub trait Comm: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place; every rank receives the result.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks of f64 values (metrics), in place.
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Element-wise maximum over ranks (flags and hashes), in place.
    fn max_u64(&self, values: &mut [u64]) -> Result<()>;
    /// Periodic neighbour exchange: sends `to_left` to rank − 1 and `to_right` to rank + 1
    /// (modulo the size); `from_left` receives what rank − 1 sent to its right and
    /// `from_right` what rank + 1 sent to its left.
    fn exchange(
        &self,
        to_left: &[f32],
        to_right: &[f32],
        from_left: &mut [f32],
        from_right: &mut [f32],
    ) -> Result<()>;
    /// Gathers one line of text per rank on rank 0 (in rank order); the other ranks get an
    /// empty list.
    fn gather_lines(&self, line: &str) -> Result<Vec<String>>;
    /// Seconds spent inside collectives so far (benchmarks split compute from communication).
    fn seconds_in_collectives(&self) -> f64;
}

/// The one-process [`Comm`]: every collective is the identity (the exchange a copy).
#[derive(Debug, Default)]
pub struct SingleProcess;

impl Comm for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn max_u64(&self, _values: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn exchange(
        &self,
        to_left: &[f32],
        to_right: &[f32],
        from_left: &mut [f32],
        from_right: &mut [f32],
    ) -> Result<()> {
        // This rank is its own neighbour on both sides.
        from_left.copy_from_slice(to_right);
        from_right.copy_from_slice(to_left);
        Ok(())
    }
    fn gather_lines(&self, line: &str) -> Result<Vec<String>> {
        Ok(vec![line.to_string()])
    }
    fn seconds_in_collectives(&self) -> f64 {
        0.0
    }
}

/// A contiguous range of state components, `[start, start + len)` out of `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slab {
    /// First component (global index).
    pub start: usize,
    /// Number of components.
    pub len: usize,
    /// Global state dimension.
    pub d: usize,
}

impl Slab {
    /// The slab of `rank` out of `size` for `d` components: as even as possible, the first
    /// `d mod size` ranks holding one component more.
    pub fn of(d: usize, rank: usize, size: usize) -> Slab {
        let size = size.max(1);
        let (base, extra) = (d / size, d % size);
        Slab {
            start: rank * base + rank.min(extra),
            len: base + usize::from(rank < extra),
            d,
        }
    }

    /// One past the last component.
    pub fn end(&self) -> usize {
        self.start + self.len
    }

    /// The whole state as one slab.
    pub fn whole(d: usize) -> Slab {
        Slab {
            start: 0,
            len: d,
            d,
        }
    }
}

/// This process's part of a sharded run: the communicator and the slab it owns.
#[derive(Clone)]
pub struct Shard {
    /// The communicator shared by all ranks of the run.
    pub comm: Arc<dyn Comm>,
    /// The components this rank owns.
    pub slab: Slab,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Shard(rank {} of {}, components {}..{} of {})",
            self.comm.rank(),
            self.comm.size(),
            self.slab.start,
            self.slab.end(),
            self.slab.d
        )
    }
}

impl Shard {
    /// The shard of `comm`'s rank for a state of `d` components.
    pub fn new(comm: Arc<dyn Comm>, d: usize) -> Shard {
        let slab = Slab::of(d, comm.rank(), comm.size());
        Shard { comm, slab }
    }

    /// The one-process shard owning the whole state.
    pub fn single(d: usize) -> Shard {
        Shard {
            comm: Arc::new(SingleProcess),
            slab: Slab::whole(d),
        }
    }

    /// Sums the partial logits of every rank's slab into the full `n × n` matrix, in place on
    /// the backend (one host round trip and one element-wise sum of `n²` floats).
    pub fn sum_partial<B: Backend>(&self, backend: &B, buf: &mut B::Buffer) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut host = backend.read(buf)?;
        self.comm.sum_f32(&mut host)?;
        backend.write(buf, &host)
    }
}

/// An [`Error::Distributed`] for a run over `ranks` ranks.
pub fn refuse(ranks: usize, what: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::Distributed {
        ranks,
        what: what.into(),
        fix: fix.into(),
    }
}

/// The observations of `slab` under the built-in operator `op`: the operator seen from the slab
/// (its offset shifted into the slab) and the range of global observation indices it observes.
///
/// A slab that observes nothing is refused: every rank needs at least one observation.
pub fn local_observe(
    op: &Observe,
    slab: &Slab,
    ranks: usize,
) -> Result<(Observe, std::ops::Range<usize>)> {
    let first = if slab.start > op.offset {
        (slab.start - op.offset).div_ceil(op.every)
    } else {
        0
    };
    let end = if slab.end() > op.offset {
        (slab.end() - op.offset).div_ceil(op.every)
    } else {
        0
    };
    if first >= end {
        return Err(refuse(
            ranks,
            format!(
                "the slab of components {}..{} holds no observed component (h = {})",
                slab.start,
                slab.end(),
                op.name()
            ),
            format!(
                "every rank needs at least one observation: use at most {} ranks, or observe \
                 more components",
                (slab.d / op.every).max(1)
            ),
        ));
    }
    let local = Observe {
        offset: op.component(first) - slab.start,
        ..*op
    };
    Ok((local, first..end))
}

/// The slab view of any observation operator: built-ins are component-wise and are split with
/// [`local_observe`]; a user-defined operator is refused, since nothing tells that it observes
/// components one by one.
pub fn local_operator(
    op: &dyn ObservationOperator,
    slab: &Slab,
    ranks: usize,
) -> Result<(Observe, std::ops::Range<usize>)> {
    match op.builtin() {
        Some(b) => local_observe(&b, slab, ranks),
        None => Err(refuse(
            ranks,
            format!(
                "the observation operator `{}` is not known to be component-wise, so its \
                 observations cannot be split by state slab",
                op.name()
            ),
            "use a built-in operator (identity, arctan, tanh with observe.every/offset), or \
             run in one process",
        )),
    }
}

/// `out[i, k] = mean[i, k] + scale · z(key, i, start + k)`: [`Backend::fill_normal`] for a slab
/// whose first component is the global component `start`, so that every rank draws the numbers
/// the single-process run draws for the same components. `mean` is `rows × cols` or `1 × cols`.
pub fn fill_normal_slab<B: Backend>(
    backend: &B,
    out: &mut B::Buffer,
    key: NoiseKey,
    start: usize,
    mean: Option<&B::Buffer>,
    scale: f32,
) -> Result<()> {
    use crate::backend::DeviceBuffer;
    if start == 0 {
        return backend.fill_normal(out, key, mean, scale);
    }
    let (rows, cols) = (out.rows(), out.cols());
    crate::backend::check_noise_mean(out, mean)?;
    let mean = mean.map(|m| backend.read(m)).transpose()?;
    let mut host = vec![0.0f32; rows * cols];
    for (i, row) in host.chunks_mut(cols.max(1)).enumerate() {
        rng::fill_normal_at(&key, i as u32, start, row);
        match &mean {
            Some(m) => {
                let mrow = if m.len() == cols {
                    &m[..]
                } else {
                    &m[i * cols..(i + 1) * cols]
                };
                for (v, &mu) in row.iter_mut().zip(mrow) {
                    *v = mu + scale * *v;
                }
            }
            None if scale != 1.0 => row.iter_mut().for_each(|v| *v *= scale),
            None => {}
        }
    }
    backend.write(out, &host)
}

/// Fails on every rank when any rank's `local` result is an error: a rank that failed returns
/// its own error, the others an [`Error::Distributed`] saying that another rank failed. Used at
/// start-up, before the first collective of the run, so that no rank waits for one that left.
pub fn agree<T>(comm: &dyn Comm, local: Result<T>) -> Result<T> {
    let mut flag = [u64::from(local.is_err())];
    comm.max_u64(&mut flag)?;
    match local {
        Err(e) => Err(e),
        Ok(_) if flag[0] != 0 => Err(refuse(
            comm.size(),
            "another rank could not start (its error is printed above)",
            "fix the error that rank reports",
        )),
        Ok(v) => Ok(v),
    }
}

/// Checks that every rank runs the same configuration: compares `hash` (of the resolved
/// configuration) across ranks, failing on every rank when they differ.
pub fn check_same_config(comm: &dyn Comm, hash: u64) -> Result<()> {
    // max(h) == h and max(!h) == !h on every rank ⇔ all ranks hold the same h.
    let mut v = [hash, !hash];
    comm.max_u64(&mut v)?;
    if v[0] != hash || v[1] != !hash {
        return Err(refuse(
            comm.size(),
            format!(
                "the ranks were started with different configurations (rank {} has hash {hash:016x})",
                comm.rank()
            ),
            "start every rank with the same preset, file, --set and --seed arguments",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::error::Error;
    use crate::observe::{ObservationOperator, Observe};
    use crate::rng::{self, NoiseKey};
    use std::sync::Arc;

    #[test]
    fn slabs_cover_the_state_evenly_in_order() {
        for d in [4usize, 7, 10, 41] {
            for size in 1..=4usize.min(d) {
                let slabs: Vec<Slab> = (0..size).map(|r| Slab::of(d, r, size)).collect();
                assert_eq!(slabs[0].start, 0);
                for w in slabs.windows(2) {
                    assert_eq!(w[0].end(), w[1].start);
                }
                assert_eq!(slabs.last().unwrap().end(), d);
                let (lo, hi) = (
                    slabs.iter().map(|s| s.len).min().unwrap(),
                    slabs.iter().map(|s| s.len).max().unwrap(),
                );
                assert!(hi - lo <= 1, "d={d} size={size}: {slabs:?}");
            }
        }
    }

    #[test]
    fn local_observations_partition_the_global_ones() {
        for (every, offset) in [(1usize, 0usize), (2, 1), (3, 0), (3, 2)] {
            let op = Observe::arctan().subsample(every, offset).unwrap();
            let d = 23;
            let m = op.obs_dim(d).unwrap();
            let x: Vec<f32> = (0..d).map(|k| 0.1 * k as f32 - 1.0).collect();
            let mut full = vec![0.0; m];
            op.apply(&x, &mut full);
            let mut joined = Vec::new();
            for rank in 0..3 {
                let slab = Slab::of(d, rank, 3);
                let (local, range) = local_observe(&op, &slab, 3).unwrap();
                assert_eq!(local.obs_dim(slab.len).unwrap(), range.len());
                let mut part = vec![0.0; range.len()];
                local.apply(&x[slab.start..slab.end()], &mut part);
                assert_eq!(&part[..], &full[range.clone()]);
                joined.extend(range);
            }
            assert_eq!(joined, (0..m).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_slab_without_observations_is_refused() {
        let op = Observe::identity().subsample(8, 0).unwrap();
        let err = local_observe(&op, &Slab::of(12, 1, 3), 3).unwrap_err();
        assert!(matches!(err, Error::Distributed { ranks: 3, .. }), "{err}");
    }

    /// The sum of all components: every observation depends on the whole state.
    #[derive(Debug)]
    struct Total;

    impl ObservationOperator for Total {
        fn name(&self) -> String {
            "total".into()
        }
        fn obs_dim(&self, _d: usize) -> Result<usize> {
            Ok(1)
        }
        fn apply(&self, x: &[f32], y: &mut [f32]) {
            y[0] = x.iter().sum();
        }
        fn adjoint(&self, _x: &[f32], r: &[f32], out: &mut [f32]) {
            out.iter_mut().for_each(|v| *v = r[0]);
        }
    }

    #[test]
    fn a_user_defined_operator_is_refused_and_built_ins_are_split() {
        let slab = Slab::of(10, 1, 2);
        let err = local_operator(&Total, &slab, 2).unwrap_err();
        assert!(
            matches!(&err, Error::Distributed { what, .. } if what.contains("`total`")),
            "{err}"
        );
        let (local, range) = local_operator(&Observe::identity(), &slab, 2).unwrap();
        assert_eq!((local.offset, range), (0, 5..10));
    }

    #[test]
    fn the_one_process_comm_is_its_own_neighbour() {
        let c = SingleProcess;
        let (mut l, mut r) = ([0.0f32; 2], [0.0f32; 1]);
        c.exchange(&[1.0], &[2.0, 3.0], &mut l, &mut r).unwrap();
        assert_eq!((l, r), ([2.0, 3.0], [1.0]));
        let comm: Arc<dyn Comm> = Arc::new(SingleProcess);
        assert!(agree(comm.as_ref(), Ok(3)).is_ok());
        assert!(check_same_config(comm.as_ref(), 42).is_ok());
    }

    #[test]
    fn slab_noise_equals_the_columns_of_the_full_draw() {
        use crate::backend::cpu::Cpu;
        let cpu = Cpu::new();
        let (n, d) = (3, 13);
        let key = NoiseKey::new(7, rng::Stream::InitialEnsemble, 2);
        let mean: Vec<f32> = (0..d).map(|k| k as f32).collect();
        let mean_full = cpu.upload(1, d, &mean).unwrap();
        let mut full = cpu.zeros(n, d).unwrap();
        cpu.fill_normal(&mut full, key, Some(&mean_full), 0.5)
            .unwrap();
        let full = cpu.read(&full).unwrap();
        for rank in 0..3 {
            let s = Slab::of(d, rank, 3);
            let m = cpu.upload(1, s.len, &mean[s.start..s.end()]).unwrap();
            let mut part = cpu.zeros(n, s.len).unwrap();
            fill_normal_slab(&cpu, &mut part, key, s.start, Some(&m), 0.5).unwrap();
            let part = cpu.read(&part).unwrap();
            for i in 0..n {
                assert_eq!(
                    &part[i * s.len..(i + 1) * s.len],
                    &full[i * d + s.start..i * d + s.end()]
                );
            }
        }
    }
}
