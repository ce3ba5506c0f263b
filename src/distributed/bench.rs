//! Timing of sharded EnFF analyses: time per flow step, split into the work of this rank's
//! slab and the collectives (the sum of the partial logits).

use std::time::Instant;

use super::{local_observe, Shard};
use crate::backend::Backend;
use crate::error::Result;
use crate::filter::{Enff, EnffConfig, Filter, Observation};
use crate::observe::Observe;
use crate::rng::{NoiseKey, Stream};

/// One timed configuration of a sharded analysis (the slowest rank's figures).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlowStepTiming {
    /// Number of ranks.
    pub ranks: usize,
    /// Ensemble size.
    pub n: usize,
    /// Global state dimension.
    pub d: usize,
    /// Largest slab.
    pub slab: usize,
    /// Median seconds per flow step (analysis time / flow steps) over the repetitions.
    pub seconds_per_step: f64,
    /// Of which in collectives (median over repetitions).
    pub seconds_collective: f64,
}

/// Times `reps` EnFF-F2P analyses (`flow_steps` steps, arctan of every component, local
/// guidance) of an `n × d` ensemble sharded over `shard`'s ranks; every rank must call this
/// with the same arguments. Returns the slowest rank's median time per flow step and its
/// collective part.
pub fn time_flow_steps<B: Backend>(
    backend: &B,
    shard: &Shard,
    n: usize,
    flow_steps: usize,
    reps: usize,
) -> Result<FlowStepTiming> {
    let slab = shard.slab;
    let op = Observe::arctan();
    let (local, range) = local_observe(&op, &slab, shard.comm.size())?;
    let mut filter =
        Enff::<B>::new(EnffConfig::f2p(0.1, 1.0, flow_steps))?.with_shard(shard.clone());
    let mut forecast = backend.zeros(n, slab.len)?;
    let mut fresh = backend.zeros(n, slab.len)?;
    let key = NoiseKey::new(11, Stream::User, 0);
    super::fill_normal_slab(backend, &mut fresh, key, slab.start, None, 1.0)?;
    let mut prev = backend.zeros(n, slab.len)?;
    super::fill_normal_slab(backend, &mut prev, key.with_step(1), slab.start, None, 1.0)?;
    let mut truth = backend.zeros(1, slab.len)?;
    super::fill_normal_slab(backend, &mut truth, key.with_step(2), slab.start, None, 1.0)?;
    let mut y = backend.zeros(1, range.len())?;
    backend.observe(&local, &truth, &mut y)?;
    let mut times = Vec::with_capacity(reps);
    let mut comms = Vec::with_capacity(reps);
    for rep in 0..reps.max(1) + 1 {
        backend.copy(&fresh, &mut forecast)?;
        backend.sync()?;
        let c0 = shard.comm.seconds_in_collectives();
        let t0 = Instant::now();
        filter.analyse(
            backend,
            &mut forecast,
            Some(&prev),
            &Observation {
                y: &y,
                operator: &local,
                noise_std: 1.0,
            },
            rep as u32 + 1,
        )?;
        backend.sync()?;
        let t = t0.elapsed().as_secs_f64();
        let c = shard.comm.seconds_in_collectives() - c0;
        // The first analysis allocates its workspace: not timed.
        if rep > 0 {
            times.push(t / flow_steps as f64);
            comms.push(c / flow_steps as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t, c) = (median(&mut times), median(&mut comms));
    // The slowest rank sets the pace: maxima over ranks (nanoseconds as integers).
    let mut worst = [(t * 1e9) as u64, (c * 1e9) as u64, slab.len as u64];
    shard.comm.max_u64(&mut worst)?;
    Ok(FlowStepTiming {
        ranks: shard.comm.size(),
        n,
        d: slab.d,
        slab: worst[2] as usize,
        seconds_per_step: worst[0] as f64 * 1e-9,
        seconds_collective: worst[1] as f64 * 1e-9,
    })
}

/// Median seconds of one element-wise sum over ranks of `count` f32 values (`reps` timed
/// calls after one warm-up), the slowest rank's.
pub fn time_allreduce(shard: &Shard, count: usize, reps: usize) -> Result<f64> {
    let mut v = vec![1.0f32; count];
    shard.comm.sum_f32(&mut v)?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        shard.comm.sum_f32(&mut v)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let mut worst = [(times[times.len() / 2] * 1e9) as u64];
    shard.comm.max_u64(&mut worst)?;
    Ok(worst[0] as f64 * 1e-9)
}
