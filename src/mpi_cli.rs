//! `enff` under an MPI launcher (cargo feature `mpi`): `run` sharded over the ranks, `info`
//! listing every rank's device, `bench --mpi` timing sharded flow steps.
//!
//! Start-up (configuration, checks, output folder, backend) is agreed on by all ranks: when one
//! rank fails, every rank prints an error and exits non-zero. A failure after the run started
//! (when the other ranks may wait in a collective) ends the whole job with `MPI_Abort`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use enff::distributed::mpi::MpiWorld;
use enff::distributed::{self, Comm, Shard};
use enff::experiment::Experiment;

use super::{
    output_dir, print_summary, write_run, AnyBackend, BenchArgs, Command, Gpu, RunArgs, Source, Ui,
};
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

/// Refuses run options that a sharded run does not have.
fn check_args(args: &RunArgs) -> Result<()> {
    let refused = [
        (args.seeds != 1, "--seeds"),
        (args.resume.is_some(), "--resume"),
        (args.checkpoint_every != 0, "--checkpoint-every"),
        (args.on_divergence != "stop", "--on-divergence"),
        (args.check_every_step, "--check-every-step"),
        (args.dry_run, "--dry-run"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(on, _)| *on) {
        anyhow::bail!("{flag} is not available in a run over MPI ranks; run in one process for it");
    }
    Ok(())
}

/// The experiment, its checks, and this rank's output folder and backend.
fn start(args: &RunArgs, comm: &dyn Comm) -> Result<(Experiment, Option<PathBuf>, AnyBackend)> {
    check_args(args)?;
    let mut src = Source::load(&args.preset)?;
    src.apply(args.filter.as_deref(), &args.sets, args.seed)?;
    let experiment = src.experiment()?;
    distributed::check_shardable(experiment.config(), comm.size())?;
    let out = if comm.rank() == 0 {
        Some(output_dir(
            args.out.as_deref(),
            PathBuf::from("runs").join(format!(
                "{}-{}",
                experiment.name(),
                experiment.config().filter.kind
            )),
            args.force,
        )?)
    } else {
        None
    };
    let backend = AnyBackend::choose(args.backend, Some(experiment.config()))?;
    Ok((experiment, out, backend))
}

fn run(world: &MpiWorld, args: RunArgs, ui: Ui) -> Result<()> {
    let comm = world.comm();
    let comm: Arc<dyn Comm> = comm;
    let (rank, size) = (comm.rank(), comm.size());
    let (experiment, out, backend) = agree(comm.as_ref(), start(&args, comm.as_ref()))?;
    let hash = enff::experiment::checkpoint::config_hash(experiment.config());
    let hash = u64::from_str_radix(&hash, 16).unwrap_or(0);
    distributed::check_same_config(comm.as_ref(), hash)?;
    let device = on_backend!(&backend, b => b.describe());
    let lines = comm.gather_lines(&format!("{} on {}", host_name(), device))?;
    for (r, line) in lines.iter().enumerate() {
        log::info!("rank {r} of {size}: {line}");
    }
    let shard = Shard::new(comm.clone(), experiment.config().state_dim());
    log::info!(
        "{}: n={} d={} over {size} ranks ({}..{} components each)",
        experiment.name(),
        experiment.config().ensemble.n,
        shard.slab.d,
        shard.slab.d / size,
        shard.slab.d.div_ceil(size)
    );
    // Test hook: a panic on one rank must end the whole job.
    if std::env::var("ENFF_TEST_PANIC_RANK").is_ok_and(|r| r == rank.to_string()) {
        panic!("injected panic on rank {rank} (ENFF_TEST_PANIC_RANK)");
    }
    let bar = if rank == 0 {
        ui.bar(
            experiment.config().experiment.cycles as u64,
            "{spinner} cycle {pos}/{len} [{bar:30}] rmse {msg} eta {eta}",
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let n = experiment.config().ensemble.n;
    let d = shard.slab.d;
    let snapshots = out.as_ref().map(|o| o.join("ensembles"));
    let every = args.save_ensembles.filter(|&e| e > 0);
    let outcome = on_backend!(&backend, b => distributed::run_sharded(
        &experiment,
        b,
        &shard,
        &enff::experiment::RunOptions {
            stream_metrics: out.clone(),
            ..Default::default()
        },
        |m| {
            bar.set_message(format!("{:.4}", m.rmse));
            bar.inc(1);
        },
        |state| {
            if every.is_none_or(|e| state.cycle % e != 0) {
                return Ok(());
            };
            let x = state.gather_ensemble()?;
            match &snapshots {
                Some(dir) => {
                    std::fs::create_dir_all(dir).map_err(|e| enff::io::io_err(dir, e))?;
                    enff::io::npy::write_npy(
                        &dir.join(format!("cycle_{:04}.npy", state.cycle)),
                        &[n, d],
                        &x,
                        enff::io::npy::NpyDtype::F4,
                    )
                }
                None => Ok(()),
            }
        },
    ));
    bar.finish_and_clear();
    let sharded = match outcome {
        Ok(r) => r,
        Err(e) => {
            // The other ranks may be waiting in a collective: end the whole job.
            print_error(rank, size, &e.to_string());
            world.abort(1);
        }
    };
    let mut comm_seconds = [sharded.seconds_collectives];
    comm.sum_f64(&mut comm_seconds)?;
    log::info!(
        "collectives: {:.3} s per rank on average",
        comm_seconds[0] / size as f64
    );
    if let Some(out) = out {
        let report = &sharded.report;
        let written = write_run(&out, &experiment, report).and_then(|_| {
            if args.plots.no_plots {
                return Ok(());
            }
            enff::experiment::plots::write_run_plots(&out, report, None)
                .map(|_| ())
                .with_context(|| format!("writing plots to {}", out.display()))
        });
        if let Err(e) = written {
            print_error(0, size, &format!("{e:#}"));
            world.abort(1);
        }
        if ui.json {
            println!("{}", serde_json::to_string_pretty(&report.summary)?);
        } else {
            print_summary(report, &out);
        }
    }
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
