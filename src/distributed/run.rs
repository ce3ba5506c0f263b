//! Sharded twin experiments (see [`super`]): the [`Slabs`] placement of the one cycle stepper
//! ([`crate::cycle::Cycle`]), with the forecast, the noise and the metrics of one slab, and
//! [`run_sharded`], the experiment's driver over it.

use super::l96::SlabForecast;
use super::{check_shardable, fill_normal_slab, Shard};
use crate::backend::{Backend, EnsembleStats};
use crate::cycle::{CycleMetrics, Placement};
use crate::error::{Error, Result};
use crate::experiment::{CycleState, Experiment, Report, RunOptions};
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

/// What a sharded run produced: the report (the same on every rank) and where the time went.
#[derive(Clone, Debug)]
pub struct ShardedReport {
    /// Summary and per-cycle metrics, from the metrics summed over ranks.
    pub report: Report,
    /// Number of ranks.
    pub ranks: usize,
    /// Seconds this rank spent in collectives (logit sums, halo exchanges, metric sums).
    pub seconds_collectives: f64,
}

/// Runs `experiment` on this rank's slab of `shard` on `backend` with `options`
/// (checkpoints, resumption, divergence policy: the single-process run's, see
/// [`Experiment::run_placed`]), calling `on_cycle` after every cycle with the metrics of the
/// whole state (every rank gets the same numbers) and `on_state` with the cycle's state
/// (its [`CycleState::gather_ensemble`] assembles the whole ensemble on every rank).
///
/// Every rank must call this with the same experiment (see [`super::check_same_config`]).
/// Supported: EnFF (F2P or OT) on Lorenz-96 (see [`check_shardable`]).
pub fn run_sharded<B: Backend + 'static>(
    experiment: &Experiment,
    backend: &B,
    shard: &Shard,
    options: &RunOptions,
    on_cycle: impl FnMut(&CycleMetrics),
    on_state: impl FnMut(&CycleState<'_, B>) -> Result<()>,
) -> Result<ShardedReport> {
    let cfg = experiment.config();
    let ranks = shard.comm.size();
    check_shardable(cfg, ranks)?;
    let d = cfg.state_dim();
    if shard.slab.d != d {
        return Err(Error::shape(
            "shard",
            format!("a slab of d = {d}"),
            format!("a slab of d = {}", shard.slab.d),
        ));
    }
    let comm_before = shard.comm.seconds_in_collectives();
    let report = experiment.run_placed(
        backend,
        Box::new(Slabs::new(shard.clone())),
        options,
        on_cycle,
        on_state,
    )?;
    Ok(ShardedReport {
        report,
        ranks,
        seconds_collectives: shard.comm.seconds_in_collectives() - comm_before,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn one_shard_runs_the_single_process_experiment() {
        let mut config = crate::experiment::preset("lorenz96_bao2024")
            .unwrap()
            .config;
        for s in [
            "model.d=13",
            "ensemble.n=5",
            "experiment.spinup=50",
            "experiment.cycles=4",
            "experiment.burn_in=0",
            "filter.flow_steps=5",
        ] {
            config.set(s).unwrap();
        }
        let exp = Experiment::new("t", config, None).unwrap();
        let cpu = Cpu::new();
        let want = exp.run(&cpu, |_| {}).unwrap();
        let mut snapshots = 0;
        let got = run_sharded(
            &exp,
            &cpu,
            &Shard::single(13),
            &RunOptions::default(),
            |_| {},
            |state| {
                if state.cycle % 2 == 0 {
                    assert_eq!(state.gather_ensemble()?.len(), 5 * 13);
                    snapshots += 1;
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(snapshots, 2);
        assert_eq!(got.ranks, 1);
        for (w, g) in want.metrics.iter().zip(&got.report.metrics) {
            for (a, b) in [
                (w.rmse, g.rmse),
                (w.spread, g.spread),
                (w.rmse_forecast, g.rmse_forecast),
                (w.spread_forecast, g.spread_forecast),
            ] {
                assert!(
                    (a - b).abs() <= 1e-12 * a.abs(),
                    "cycle {}: {a} vs {b}",
                    w.cycle
                );
            }
        }
    }
}
