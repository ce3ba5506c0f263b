//! The [`Slabs`] placement of the one cycle stepper ([`crate::cycle::Cycle`]): the forecast,
//! the noise and the metrics of one slab (the experiment drives it: see
//! `crate::experiment::sharded`).

use super::l96::SlabForecast;
use super::{fill_normal_slab, Shard};
use crate::backend::{Backend, EnsembleStats};
use crate::cycle::Placement;
use crate::error::Result;
use crate::model::Model;
use crate::observe::ObservationOperator;
use crate::partition::Slab;
use crate::rng::NoiseKey;

/// The state in slabs of components over MPI ranks: this rank's slab of every member, the
/// Lorenz-96 forecast with halo exchanges, metrics summed over the ranks.
pub struct Slabs {
    shard: Shard,
    forecast: SlabForecast,
    host: Vec<f32>,
}

impl Slabs {
    /// The placement of `shard`'s slab.
    pub fn new(shard: Shard) -> Self {
        Slabs {
            shard,
            forecast: SlabForecast::new(),
            host: Vec::new(),
        }
    }
}

impl<B: Backend> Placement<B> for Slabs {
    fn slab(&self) -> Slab {
        self.shard.slab
    }

    fn shard(&self) -> Option<Shard> {
        Some(self.shard.clone())
    }

    fn is_root(&self) -> bool {
        self.shard.comm.rank() == 0
    }

    fn describe(&self, device: &str) -> String {
        let slab = self.shard.slab;
        format!(
            "{} ranks; rank {} on {device} (slab {}..{} of {})",
            self.shard.comm.size(),
            self.shard.comm.rank(),
            slab.start,
            slab.end(),
            slab.d
        )
    }

    /// Through the host: the halo exchange of every Runge–Kutta stage runs there.
    fn forecast(
        &mut self,
        backend: &B,
        model: &Model,
        ensemble: &mut B::Buffer,
        steps: usize,
    ) -> Result<()> {
        use crate::backend::DeviceBuffer;
        let n = ensemble.rows();
        self.host.clear();
        self.host.extend_from_slice(&backend.read(ensemble)?);
        self.forecast
            .advance(model, &self.shard, &mut self.host, n, steps)?;
        backend.write(ensemble, &self.host)
    }

    /// RMSE and spread of the whole ensemble from every slab's partial sums: each rank's
    /// squared error and variance sums (`len ·` its slab's mean square) are summed over ranks.
    fn stats(&self, backend: &B, ensemble: &B::Buffer, truth: &B::Buffer) -> Result<EnsembleStats> {
        let local = backend.ensemble_stats(ensemble, truth)?;
        let len = self.shard.slab.len as f64;
        let mut sums = [
            local.rmse * local.rmse * len,
            local.spread * local.spread * len,
        ];
        self.shard.comm.sum_f64(&mut sums)?;
        let d = self.shard.slab.d as f64;
        Ok(EnsembleStats {
            rmse: (sums[0] / d).sqrt(),
            spread: (sums[1] / d).sqrt(),
        })
    }

    fn fill_normal(
        &self,
        backend: &B,
        out: &mut B::Buffer,
        key: NoiseKey,
        mean: Option<&B::Buffer>,
        scale: f32,
    ) -> Result<()> {
        fill_normal_slab(backend, out, key, self.shard.slab.start, mean, scale)
    }

    fn gather(&self, backend: &B, part: &B::Buffer) -> Result<Vec<f32>> {
        use crate::backend::DeviceBuffer;
        gather(backend, &self.shard, part, part.rows())
    }

    fn ranks(&self) -> usize {
        self.shard.comm.size()
    }

    fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.shard.comm.sum_f64(values)
    }
}

/// The whole `n × d` ensemble on every rank: each rank places its slab in a zero matrix and
/// the matrices are summed (exact: every entry is one rank's value plus zeros).
pub fn gather<B: Backend>(
    backend: &B,
    shard: &Shard,
    ensemble: &B::Buffer,
    n: usize,
) -> Result<Vec<f32>> {
    let (d, start, len) = (shard.slab.d, shard.slab.start, shard.slab.len);
    let part = backend.read(ensemble)?;
    let mut whole = vec![0.0f32; n * d];
    for i in 0..n {
        whole[i * d + start..i * d + start + len].copy_from_slice(&part[i * len..(i + 1) * len]);
    }
    shard.comm.sum_f32(&mut whole)?;
    Ok(whole)
}

/// The observation operator of a slab for a library caller with its own operator (see
/// [`super::local_operator`]).
pub fn slab_operator(
    op: &dyn ObservationOperator,
    shard: &Shard,
) -> Result<(crate::observe::Observe, std::ops::Range<usize>)> {
    super::local_operator(op, &shard.slab, shard.comm.size())
}
