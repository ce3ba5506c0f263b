//! One experiment over several processes: the state split into slabs, one per rank.
//!
//! Each rank (an MPI process, see the `mpi` cargo feature) owns a contiguous slab of the state
//! components, `[start, start + len)`, for all `n` members, on its own backend. The Ensemble
//! Flow Filter needs only one collective per velocity evaluation: its pairwise logits
//! `ℓ_ij = −‖x_i − μ_j‖² / (2s²) + bias_j` are sums over state components (and the Monte-Carlo
//! bias a sum over observations), so every rank computes the partial `n × n` matrix of its slab,
//! one element-wise sum over ranks gives every rank the full matrix, and the softmax, velocity,
//! guidance and update that follow are the same or component-wise on every rank. The messages
//! are `n²` floats per flow step, whatever `d`.
//!
//! What else is split:
//! - observations: a built-in operator observes components one by one, so each rank keeps the
//!   observations of its own components ([`local_observe`]); a user-defined operator is refused
//!   (nothing says it is component-wise);
//! - the Lorenz-96 forecast exchanges two halo cells on the left and one on the right with the
//!   neighbouring ranks at every Runge–Kutta stage ([`l96`]); the other models cannot be
//!   sharded and say so ([`check_shardable`]);
//! - covariance guidance: its local gains read the forecast and endpoints within the
//!   localization window, so each rank extends its slab by halo components taken from its
//!   neighbours, once per analysis for the forecast and once per guidance stage for the
//!   endpoints ([`halo`]);
//! - random numbers: every draw is keyed by the global component index ([`fill_normal_slab`]),
//!   so the numbers do not depend on the number of ranks;
//! - metrics: partial sums over the slabs, summed over ranks ([`run`]).
//!
//! The truth (`1 × d`) is integrated in full on every rank: it is `n` times smaller than the
//! ensemble, and every rank then draws the same observation noise with the single-process
//! generator, which keeps runs over any number of ranks equal to the single-process run up to
//! the rounding of the summed logits.
//!
//! [`Comm`] is the seam: [`SingleProcess`] is the trivial one-rank implementation (every
//! collective is a copy), and `distributed::mpi::MpiComm` (feature `mpi`) the real one.

use crate::error::Result;
use crate::experiment::Config;
use crate::flow::GuidanceKind;
use crate::model::System;

pub mod bench;
pub mod l96;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod run;

pub use crate::partition::{
    agree, check_same_config, fill_normal_slab, halo, local_observe, local_operator, refuse, Comm,
    Shard, SingleProcess, Slab,
};
pub use run::{run_sharded, ShardedReport, Slabs};

/// Environment variables through which launchers announce the size of the job they started:
/// Open MPI's `mpirun`, PMI (MPICH's Hydra, Intel MPI, Slurm's `srun --mpi=pmi2`) and PMIx.
const SIZE_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// Variables whose presence alone says the process was started by an MPI launcher.
const LAUNCH_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"];

/// The size of the job an MPI launcher says it started, if this process was started by one
/// (0 when the launcher does not say); `ENFF_MPI=1` counts as a launch.
pub fn launched_size() -> Option<usize> {
    let forced = std::env::var("ENFF_MPI").is_ok_and(|v| v == "1");
    let size = SIZE_VARIABLES
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok());
    let launched = LAUNCH_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    match (size, launched || forced) {
        (Some(s), _) => Some(s),
        (None, true) => Some(0),
        (None, false) => None,
    }
}

/// Checks that `config` can run over `ranks` ranks: an EnFF filter on Lorenz-96, with every
/// rank owning at least two components and one observation, and, with covariance guidance,
/// slabs wide enough for the halo of its windows ([`halo::check`]).
pub fn check_shardable(config: &Config, ranks: usize) -> Result<()> {
    let kind = config.filter.kind.as_str();
    if !matches!(kind, "enff-f2p" | "enff-ot") {
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
        halo::check(d, ranks, &op, enff.loc_radius)?;
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
