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
//!   sharded and say so (`crate::experiment::check_shardable`);
//! - covariance guidance: its local gains read the forecast and endpoints within the
//!   localization window, so each rank extends its slab by halo components taken from its
//!   neighbours, once per analysis for the forecast and once per guidance stage for the
//!   endpoints ([`halo`]);
//! - random numbers: every draw is keyed by the global component index ([`fill_normal_slab`]),
//!   so the numbers do not depend on the number of ranks;
//! - metrics: partial sums over the slabs, summed over ranks ([`Slabs`]).
//!
//! The truth (`1 × d`) is integrated in full on every rank: it is `n` times smaller than the
//! ensemble, and every rank then draws the same observation noise with the single-process
//! generator, which keeps runs over any number of ranks equal to the single-process run up to
//! the rounding of the summed logits.
//!
//! [`Comm`] is the seam: [`SingleProcess`] is the trivial one-rank implementation (every
//! collective is a copy), and `distributed::mpi::MpiComm` (feature `mpi`) the real one.

pub mod bench;
pub mod l96;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod run;

pub use crate::partition::{
    agree, check_same_config, fill_normal_slab, halo, local_observe, local_operator, refuse, Comm,
    Shard, SingleProcess, Slab,
};
pub use run::Slabs;

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
