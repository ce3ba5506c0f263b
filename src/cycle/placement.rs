//! Where the state of a cycle lives: in one process ([`OneProcess`]), or in slabs of
//! components over several ranks (`crate::distributed::Slabs`). The stepper is written once
//! against [`Placement`]; what differs between the two is passed in here, not branched on in
//! the cycle.

use crate::backend::{Backend, EnsembleStats};
use crate::error::Result;
use crate::model::Model;
use crate::partition::{Shard, Slab};
use crate::rng::NoiseKey;

/// How a cycle's state is split between processes, and the operations that depend on it.
pub trait Placement<B: Backend> {
    /// The components of the state this process holds.
    fn slab(&self) -> Slab;

    /// The handle a filter receives to sum its partial statistics over the processes
    /// (`None` in one process).
    fn shard(&self) -> Option<Shard>;

    /// True on the process that writes results (rank 0).
    fn is_root(&self) -> bool {
        true
    }

    /// How the run is placed, for the summary's device line (`device` describes the backend).
    fn describe(&self, device: &str) -> String {
        device.to_string()
    }

    /// Advances this process's part of the ensemble (`n × slab.len`) by `steps` model steps.
    fn forecast(
        &mut self,
        backend: &B,
        model: &Model,
        ensemble: &mut B::Buffer,
        steps: usize,
    ) -> Result<()>;

    /// RMSE and spread of the whole ensemble, from this process's part and the truth of the
    /// same components.
    fn stats(&self, backend: &B, ensemble: &B::Buffer, truth: &B::Buffer) -> Result<EnsembleStats>;

    /// Normal draws keyed by global component: [`Backend::fill_normal`] of this process's
    /// components.
    fn fill_normal(
        &self,
        backend: &B,
        out: &mut B::Buffer,
        key: NoiseKey,
        mean: Option<&B::Buffer>,
        scale: f32,
    ) -> Result<()>;

    /// The whole `rows × d` matrix on the host, assembled from every process's part (a
    /// collective: every process calls it).
    fn gather(&self, backend: &B, part: &B::Buffer) -> Result<Vec<f32>>;

    /// Number of processes holding a part of the state.
    fn ranks(&self) -> usize {
        1
    }

    /// Element-wise sum over the processes, in place (a collective; identity in one process).
    fn sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// The whole state in this process.
#[derive(Clone, Copy, Debug)]
pub struct OneProcess {
    d: usize,
}

impl OneProcess {
    /// One process holding all `d` components.
    pub fn new(d: usize) -> Self {
        OneProcess { d }
    }
}

impl<B: Backend> Placement<B> for OneProcess {
    fn slab(&self) -> Slab {
        Slab::whole(self.d)
    }

    fn shard(&self) -> Option<Shard> {
        None
    }

    fn forecast(
        &mut self,
        backend: &B,
        model: &Model,
        ensemble: &mut B::Buffer,
        steps: usize,
    ) -> Result<()> {
        backend.advance(model, ensemble, steps)
    }

    fn stats(&self, backend: &B, ensemble: &B::Buffer, truth: &B::Buffer) -> Result<EnsembleStats> {
        backend.ensemble_stats(ensemble, truth)
    }

    fn fill_normal(
        &self,
        backend: &B,
        out: &mut B::Buffer,
        key: NoiseKey,
        mean: Option<&B::Buffer>,
        scale: f32,
    ) -> Result<()> {
        backend.fill_normal(out, key, mean, scale)
    }

    fn gather(&self, backend: &B, part: &B::Buffer) -> Result<Vec<f32>> {
        backend.read(part)
    }
}
