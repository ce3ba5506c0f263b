//! The cycle of a sharded twin experiment (see [`super`]): the loop of
//! [`crate::experiment::Experiment::run`] with the ensemble, the forecast, the observations
//! and the metrics of one slab.

use std::time::Instant;

use super::l96::SlabForecast;
use super::{check_shardable, fill_normal_slab, local_observe, Shard};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::experiment::config::InitialMean;
use crate::experiment::{CycleMetrics, Experiment, Report, RunIdentity, RunTimes, Summary};
use crate::filter::{Enff, Filter, Observation};
use crate::observe::ObservationOperator;
use crate::rng::{self, NoiseKey, Stream};

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

/// Runs `experiment` on this rank's slab of `shard` on `backend`, calling `on_cycle` after
/// every cycle with the metrics of the whole state (every rank gets the same numbers), and,
/// every `gather_every` cycles, `on_ensemble(cycle, x)` with the whole analysis ensemble `x`
/// (`n × d`, gathered on every rank: meant for snapshots, it moves `n·d` floats).
///
/// Every rank must call this with the same experiment (see [`super::check_same_config`]).
/// Supported: EnFF (F2P or OT) with local, Monte-Carlo or no guidance on Lorenz-96 (see
/// [`check_shardable`]); divergence stops the run (there are no checkpoints in sharded runs).
pub fn run_sharded<B: Backend + 'static>(
    experiment: &Experiment,
    backend: &B,
    shard: &Shard,
    gather_every: Option<usize>,
    mut on_cycle: impl FnMut(&CycleMetrics),
    mut on_ensemble: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<ShardedReport> {
    let cfg = experiment.config();
    let ranks = shard.comm.size();
    check_shardable(cfg, ranks)?;
    let seed = cfg.experiment.seed;
    let theta = rng::uniform(&NoiseKey::new(seed, Stream::Truth, 0).with_step(1), 0, 0)
        * std::f64::consts::TAU;
    let model = cfg.model_with_theta(theta)?;
    let op = cfg.observation_operator()?;
    let (n, d) = (cfg.ensemble.n, model.dim());
    if shard.slab.d != d {
        return Err(Error::shape(
            "shard",
            format!("a slab of d = {d}"),
            format!("a slab of d = {}", shard.slab.d),
        ));
    }
    let m = op.obs_dim(d)?;
    let (local_op, obs_range) = local_observe(&op, &shard.slab, ranks)?;
    let (start, len) = (shard.slab.start, shard.slab.len);
    let mut filter = Enff::<B>::new(cfg.enff_config()?)?
        .with_geometry(model.geometry())
        .with_shard(shard.clone());
    let obs_every = cfg.observe.obs_every;
    let started = Instant::now();
    let comm_before = shard.comm.seconds_in_collectives();

    // The truth in full (every rank integrates it), the ensemble by slab.
    let mut truth = backend.zeros(1, d)?;
    experiment.initial_truth(backend, &model, &mut truth)?;
    let mut truth_slab = backend.zeros(1, len)?;
    let slice_truth = |truth: &B::Buffer, into: &mut B::Buffer| -> Result<()> {
        let host = backend.read(truth)?;
        backend.write(into, &host[start..start + len])
    };
    slice_truth(&truth, &mut truth_slab)?;
    let mut ensemble = backend.zeros(n, len)?;
    let centre = match cfg.ensemble.init_mean {
        InitialMean::Truth => Some(&truth_slab),
        InitialMean::Zero => None,
    };
    fill_normal_slab(
        backend,
        &mut ensemble,
        NoiseKey::new(seed, Stream::InitialEnsemble, 0),
        start,
        centre,
        cfg.ensemble.init_std,
    )?;
    let mut previous = if filter.needs_previous_analysis() {
        Some(backend.zeros(n, len)?)
    } else {
        None
    };
    let mut hx = backend.zeros(1, m)?;
    let mut y = backend.zeros(1, m)?;
    let mut y_local = backend.zeros(1, obs_range.len())?;
    let mut forecast = SlabForecast::new();
    let mut host = vec![0.0f32; n * len];

    let mut metrics = Vec::with_capacity(cfg.experiment.cycles);
    let (mut total_forecast, mut total_analysis) = (0.0f64, 0.0f64);
    for k in 0..cfg.experiment.cycles {
        let cycle = k + 1;
        let t_forecast = Instant::now();
        if let Some(p) = previous.as_mut() {
            backend.copy(&ensemble, p)?;
        }
        if k > 0 {
            host.copy_from_slice(&backend.read(&ensemble)?);
            forecast.advance(&model, shard, &mut host, n, obs_every)?;
            backend.write(&mut ensemble, &host)?;
            backend.sync()?;
        }
        let seconds_forecast = t_forecast.elapsed().as_secs_f64();
        if k > 0 {
            backend.advance(&model, &mut truth, obs_every)?;
            slice_truth(&truth, &mut truth_slab)?;
        }
        let fc = global_stats(backend, shard, &ensemble, &truth_slab)?;

        // The observation of the whole truth (the single-process draw), then this slab's part.
        backend.observe(&op, &truth, &mut hx)?;
        backend.fill_normal(
            &mut y,
            NoiseKey::new(seed, Stream::Observation, cycle as u32),
            Some(&hx),
            cfg.observe.noise_std,
        )?;
        let y_host = backend.read(&y)?;
        backend.write(&mut y_local, &y_host[obs_range.clone()])?;

        let t_analysis = Instant::now();
        let obs = Observation {
            y: &y_local,
            operator: &local_op,
            noise_std: cfg.observe.noise_std,
        };
        filter
            .analyse(
                backend,
                &mut ensemble,
                previous.as_ref(),
                &obs,
                cycle as u32,
            )
            .map_err(|e| match e {
                Error::Diverged { stage, detail, .. } => Error::Diverged {
                    cycle,
                    stage,
                    detail,
                },
                Error::NonFinite { .. } => Error::Diverged {
                    cycle,
                    stage: "analysis".into(),
                    detail: e.to_string(),
                },
                other => other,
            })?;
        let an = global_stats(backend, shard, &ensemble, &truth_slab)?;
        let seconds_analysis = t_analysis.elapsed().as_secs_f64();
        if !(an.0.is_finite() && an.1.is_finite() && fc.0.is_finite() && fc.1.is_finite()) {
            return Err(Error::Diverged {
                cycle,
                stage: "metrics".into(),
                detail: format!(
                    "non-finite RMSE or spread (forecast {} / {}, analysis {} / {})",
                    fc.0, fc.1, an.0, an.1
                ),
            });
        }
        total_forecast += seconds_forecast;
        total_analysis += seconds_analysis;
        let row = CycleMetrics {
            cycle,
            time: (cfg.experiment.spinup + k * obs_every) as f64 * model.dt as f64,
            rmse_forecast: fc.0,
            spread_forecast: fc.1,
            rmse: an.0,
            spread: an.1,
            seconds_forecast,
            seconds_analysis,
            ess: None,
        };
        on_cycle(&row);
        metrics.push(row);
        if gather_every.is_some_and(|e| e > 0 && cycle % e == 0) {
            let whole = gather(backend, shard, &ensemble, n)?;
            on_ensemble(cycle, &whole)?;
        }
    }
    let summary = Summary::of_run(
        RunIdentity {
            preset: experiment.name().to_string(),
            filter: filter.name(),
            backend: backend.name().to_string(),
            device: format!(
                "{} ranks; rank 0 on {} (slab {}..{} of {})",
                ranks,
                backend.describe(),
                start,
                start + len,
                d
            ),
            model: model.name(),
            observation: op.name(),
            n,
            d,
            m,
            seed,
            expected_rmse: experiment.expected_rmse(),
        },
        cfg,
        &metrics,
        RunTimes {
            total: started.elapsed().as_secs_f64(),
            forecast: total_forecast,
            analysis: total_analysis,
        },
        Vec::new(),
        None,
    );
    Ok(ShardedReport {
        report: Report { summary, metrics },
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

/// RMSE and spread of the whole ensemble from every slab's partial sums: each rank's squared
/// error and variance sums (`len ·` its slab's mean square) are summed over ranks.
fn global_stats<B: Backend>(
    backend: &B,
    shard: &Shard,
    ensemble: &B::Buffer,
    truth: &B::Buffer,
) -> Result<(f64, f64)> {
    let local = backend.ensemble_stats(ensemble, truth)?;
    let len = shard.slab.len as f64;
    let mut sums = [
        local.rmse * local.rmse * len,
        local.spread * local.spread * len,
    ];
    shard.comm.sum_f64(&mut sums)?;
    let d = shard.slab.d as f64;
    Ok(((sums[0] / d).sqrt(), (sums[1] / d).sqrt()))
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
            Some(2),
            |_| {},
            |_, x| {
                assert_eq!(x.len(), 5 * 13);
                snapshots += 1;
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
