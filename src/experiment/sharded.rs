//! Sharded twin experiments: the experiment's driver ([`super::Experiment::run_placed`]) over
//! the [`Slabs`] placement of `crate::distributed`, and the check of what can be sharded.

use super::{Config, CycleState, Experiment, Report, RunOptions};
use crate::backend::Backend;
use crate::cycle::CycleMetrics;
use crate::distributed::Slabs;
use crate::error::{Error, Result};
use crate::flow::GuidanceKind;
use crate::model::System;
use crate::partition::{halo, local_observe, refuse, Shard, Slab};

/// Checks that `config` can run over `ranks` ranks: an EnFF filter on Lorenz-96, with every
/// rank owning at least two components and one observation, and, with covariance guidance,
/// slabs wide enough for the halo of its windows ([`halo::check`]).
pub fn check_shardable(config: &Config, ranks: usize) -> Result<()> {
    let kind = config.filter_kind()?;
    if !kind.is_enff() {
        return Err(refuse(
            ranks,
            format!("the filter `{kind}` has no sharded analysis"),
            "use filter.kind=enff-f2p or enff-ot, or run in one process",
        ));
    }
    let enff = config.enff_config()?;
    let model = config.model_with_theta(0.0)?;
    let System::Lorenz96(_) = &model.system else {
        return Err(refuse(
            ranks,
            format!(
                "the model {} cannot be sharded (only Lorenz-96 exchanges halo cells between \
                 ranks)",
                model.name()
            ),
            "run this model in one process",
        ));
    };
    let d = model.dim();
    if ranks > d {
        return Err(refuse(
            ranks,
            format!("more ranks than state components (d = {d})"),
            format!("use at most {} ranks, or a larger model.d", d / 2),
        ));
    }
    if 2 * ranks > d {
        return Err(refuse(
            ranks,
            format!("Lorenz-96 needs at least 2 components per rank, and d = {d}"),
            format!("use at most {} ranks, or a larger model.d", d / 2),
        ));
    }
    let op = config.observation_operator()?;
    for rank in 0..ranks {
        local_observe(&op, &Slab::of(d, rank, ranks), ranks)?;
    }
    if enff.guidance == GuidanceKind::Covariance && ranks > 1 {
        let radius = enff.loc_radius.ok_or_else(|| {
            crate::partition::refuse(
                ranks,
                "global covariance guidance (filter.loc_radius = none) needs every observation \
                 on every rank"
                    .to_string(),
                "set filter.loc_radius (4 is typical) to localize the gains on the ring",
            )
        })?;
        halo::check(d, ranks, &op, radius)?;
    }
    Ok(())
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
/// Every rank must call this with the same experiment (see [`crate::partition::check_same_config`]).
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

    #[test]
    fn unshardable_settings_are_refused_with_the_setting_named() {
        let base = crate::experiment::preset("lorenz96_bao2024")
            .unwrap()
            .config;
        assert!(check_shardable(&base, 4).is_ok());
        let refused = |sets: &[&str], ranks: usize, needle: &str| {
            let mut c = base.clone();
            for s in sets {
                c.set(s).unwrap();
            }
            let e = check_shardable(&c, ranks).unwrap_err();
            assert!(e.to_string().contains(needle), "{sets:?}: {e}");
        };
        refused(&["filter.kind=letkf"], 2, "has no sharded analysis");
        refused(
            &[
                "filter.guidance=covariance",
                "filter.loc_radius=4",
                "model.d=41",
            ],
            3,
            "halo components",
        );
        refused(&["model.d=7"], 4, "at least 2 components per rank");
        refused(&["model.d=7"], 8, "more ranks than state components");
        refused(
            &["model.d=20", "observe.every=8"],
            4,
            "holds no observed component",
        );
        let ks = crate::experiment::preset("ks_512").unwrap().config;
        let e = check_shardable(&ks, 2).unwrap_err();
        assert!(e.to_string().contains("cannot be sharded"), "{e}");
    }
}
