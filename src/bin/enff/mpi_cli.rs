//! `enff` under an MPI launcher (cargo feature `mpi`): `run` sharded over the ranks, `info`
//! listing every rank's device, `bench --mpi` timing sharded flow steps.
//!
//! Start-up (configuration, checks, output folder, backend) is agreed on by all ranks: when one
//! rank fails, every rank prints an error and exits non-zero. A failure after the run started
//! (when the other ranks may wait in a collective) ends the whole job with `MPI_Abort`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use enff::distributed::mpi::MpiWorld;
use enff::distributed::{self, Comm, Shard};
use enff::experiment::Experiment;

use super::{AnyBackend, BenchArgs, Command, Gpu, RunArgs, Ui};
use enff::backend::Backend;

/// Runs `command` on this rank of `world`.
pub(super) fn main(world: &MpiWorld, command: Option<Command>, ui: Ui) -> Result<()> {
    let comm = world.comm();
    match command {
        None => run(world, super::default_run_args(), ui),
        Some(Command::Run(args)) => run(world, args, ui),
        Some(Command::Info) => info(comm.as_ref()),
        Some(Command::Bench(args)) if args.mpi => bench(world, args),
        Some(_) => {
            anyhow::bail!(
                "under an MPI launcher enff runs `run`, `info` and `bench --mpi`; start other \
                 commands without mpirun"
            )
        }
    }
}

/// Prints a rank's error as one write, so that the lines of several ranks do not interleave.
pub(super) fn print_error(rank: usize, size: usize, message: &str) {
    use std::io::Write;
    let line = format!("error (MPI rank {rank} of {size}): {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Fails on every rank when `local` failed on any rank (see [`distributed::agree`]).
fn agree<T>(comm: &dyn Comm, local: Result<T>) -> Result<T> {
    let mut flag = [u64::from(local.is_err())];
    comm.max_u64(&mut flag)?;
    match local {
        Err(e) => Err(e),
        Ok(_) if flag[0] != 0 => Err(anyhow::anyhow!(
            "another MPI rank could not start (its error is printed by that rank)"
        )),
        Ok(v) => Ok(v),
    }
}

/// What a rank starts from: the experiment (or the checkpoint it resumes), this rank's output
/// folder (the root's is created or checked; the others only name it) and its backend.
struct Start {
    experiment: Experiment,
    resume: Option<enff::experiment::Checkpoint>,
    out: PathBuf,
    backend: AnyBackend,
}

/// The experiment, its checks, and this rank's output folder and backend.
fn start(args: &RunArgs, comm: &dyn Comm) -> Result<Start> {
    anyhow::ensure!(args.seeds >= 1, "--seeds 0: run at least one seed");
    let (experiment, resume, out) = match &args.resume {
        Some(dir) => {
            let (experiment, ck) = super::resumed_experiment(args, dir)?;
            (experiment, Some(ck), dir.clone())
        }
        None => {
            let experiment = super::run_experiment_of(args)?;
            let out = if comm.rank() == 0 && !args.dry_run {
                super::run_output_dir(args, &experiment)?
            } else {
                args.out.clone().unwrap_or_default()
            };
            (experiment, None, out)
        }
    };
    enff::experiment::check_shardable(experiment.config(), comm.size())?;
    let backend = AnyBackend::choose(args.backend, Some(experiment.config()))?;
    Ok(Start {
        experiment,
        resume,
        out,
        backend,
    })
}

fn run(world: &MpiWorld, args: RunArgs, ui: Ui) -> Result<()> {
    let comm = world.comm();
    let comm: Arc<dyn Comm> = comm;
    let (rank, size) = (comm.rank(), comm.size());
    let start = agree(comm.as_ref(), start(&args, comm.as_ref()))?;
    let experiment = &start.experiment;
    let hash = enff::experiment::checkpoint::config_hash(experiment.config());
    let hash = u64::from_str_radix(&hash, 16).unwrap_or(0);
    distributed::check_same_config(comm.as_ref(), hash)?;
    if args.dry_run {
        return if rank == 0 {
            super::dry_run(experiment, ui)
        } else {
            Ok(())
        };
    }
    let device = on_backend!(&start.backend, b => b.describe());
    let lines = comm.gather_lines(&format!("{} on {}", host_name(), device))?;
    for (r, line) in lines.iter().enumerate() {
        log::info!("rank {r} of {size}: {line}");
    }
    let d = experiment.config().state_dim();
    log::info!(
        "{}: n={} d={d} over {size} ranks ({}..{} components each)",
        experiment.name(),
        experiment.config().ensemble.n,
        d / size,
        d.div_ceil(size)
    );
    // Test hook: a panic on one rank must end the whole job.
    if std::env::var("ENFF_TEST_PANIC_RANK").is_ok_and(|r| r == rank.to_string()) {
        panic!("injected panic on rank {rank} (ENFF_TEST_PANIC_RANK)");
    }
    let comm_before = comm.seconds_in_collectives();
    let place = super::Where::Ranks(comm.clone());
    if let Err(e) = super::run_experiment(
        &args,
        ui,
        &place,
        experiment,
        &start.out,
        &start.backend,
        start.resume,
    ) {
        // The other ranks may be waiting in a collective: end the whole job.
        print_error(rank, size, &format!("{e:#}"));
        world.abort(1);
    }
    let mut comm_seconds = [comm.seconds_in_collectives() - comm_before];
    comm.sum_f64(&mut comm_seconds)?;
    log::info!(
        "collectives: {:.3} s per rank on average",
        comm_seconds[0] / size as f64
    );
    Ok(())
}

/// This machine's name, for `enff info` and the run log.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// `enff info` under an MPI launcher: the device `--backend auto` picks on every rank.
fn info(comm: &dyn Comm) -> Result<()> {
    let device = match Gpu::new(Default::default()) {
        Ok(g) => format!("gpu {}", g.describe()),
        Err(_) => format!("cpu {}", enff::backend::cpu::Cpu::new().describe()),
    };
    let lines = comm.gather_lines(&format!("{}: --backend auto uses {device}", host_name()))?;
    if comm.rank() == 0 {
        println!("MPI world of {} ranks", comm.size());
        for (r, line) in lines.iter().enumerate() {
            println!("rank {r}: {line}");
        }
    }
    Ok(())
}

/// `enff bench --mpi`: time per sharded flow step (compute and allreduce) for the --size grid
/// (strong scaling: NxD is the whole state; --weak: D components per rank), then the latency
/// of the n²-float allreduce for n = 20 … 1000.
fn bench(world: &MpiWorld, args: BenchArgs) -> Result<()> {
    let comm: Arc<dyn Comm> = world.comm();
    let (rank, size) = (comm.rank(), comm.size());
    let backend = agree(comm.as_ref(), AnyBackend::choose(args.backend, None))?;
    let sizes = if args.sizes.is_empty() {
        vec!["20x100000".to_string(), "100x100000".to_string()]
    } else {
        args.sizes.clone()
    };
    let grid = agree(
        comm.as_ref(),
        sizes
            .iter()
            .map(|s| super::parse_size(s))
            .collect::<Result<Vec<_>>>(),
    )?;
    let device = on_backend!(&backend, b => b.describe());
    if rank == 0 {
        println!(
            "# enff bench --mpi: {size} ranks, {} scaling, {} flow steps, median of {} reps; rank 0 on {device}",
            if args.weak { "weak" } else { "strong" },
            args.flow_steps,
            args.reps
        );
        println!("| ranks | n | d | d per rank | ms / flow step | compute ms | allreduce ms |");
        println!("|---|---|---|---|---|---|---|");
    }
    for (n, dd) in grid {
        let d = if args.weak { dd * size } else { dd };
        anyhow::ensure!(
            d >= 2 * size,
            "--size {n}x{dd}: every rank needs at least 2 components"
        );
        let shard = Shard::new(comm.clone(), d);
        let t = on_backend!(&backend, b => distributed::bench::time_flow_steps(b, &shard, n, args.flow_steps, args.reps))?;
        if rank == 0 {
            println!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
                t.ranks,
                t.n,
                t.d,
                t.slab,
                t.seconds_per_step * 1e3,
                (t.seconds_per_step - t.seconds_collective) * 1e3,
                t.seconds_collective * 1e3
            );
        }
    }
    if rank == 0 {
        println!();
        println!("| ranks | n | allreduce of n² f32 (µs) |");
        println!("|---|---|---|");
    }
    let shard = Shard::new(comm.clone(), 2 * size);
    for n in [20usize, 50, 100, 200, 500, 1000] {
        let t = distributed::bench::time_allreduce(&shard, n * n, args.reps.max(5))?;
        if rank == 0 {
            println!("| {size} | {n} | {:.1} |", t * 1e6);
        }
    }
    Ok(())
}
