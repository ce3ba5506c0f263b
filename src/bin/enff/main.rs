//! The `enff` command: run twin experiments, files of them, sweeps and benchmarks.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use enff::backend::gpu::{Gpu, GpuOptions};
use enff::backend::{cpu::Cpu, Backend};
use enff::cycle::{OneProcess, Placement};
use enff::experiment::compare::{CompareRow, CompareTables};
use enff::experiment::trace::{Recorder, Trace, TraceOptions};
use enff::experiment::{
    file, output, preset, seeds, sweep, Config, Experiment, OnDivergence, Report, RunOptions,
    Source, DEFAULT_PRESET, PRESETS,
};
use enff::filter::FilterKind;

#[derive(Parser)]
#[command(
    name = "enff",
    version,
    about = "Ensemble Flow Filter data assimilation: twin experiments, sweeps and benchmarks",
    long_about = "Runs data-assimilation twin experiments with the Ensemble Flow Filter \
                  (EnFF). With no command, runs the default preset (lorenz96_bao2024)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Hide progress bars and log lines (warnings and errors still go to stderr).
    #[arg(long, global = true)]
    quiet: bool,
    /// Print the result (run summary, seed statistics, sweep ranking, comparison) as JSON on
    /// stdout, and nothing else there.
    #[arg(long, global = true)]
    json: bool,
}

/// How results and progress are shown.
#[derive(Clone, Copy, Debug)]
struct Ui {
    quiet: bool,
    json: bool,
}

impl Ui {
    /// A progress bar on stderr (hidden with --quiet, and by indicatif when stderr is not a
    /// terminal).
    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    /// A hardware GPU when one is found, else the CPU.
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// The GPU backend (error when there is none).
    Gpu,
}

/// The backend a command runs on.
enum AnyBackend {
    Cpu(Cpu),
    Gpu(Box<Gpu>),
}

/// Runs `$body` with `$b` bound to the concrete backend.
macro_rules! on_backend {
    ($backend:expr, $b:ident => $body:expr) => {
        match $backend {
            AnyBackend::Cpu($b) => $body,
            AnyBackend::Gpu(g) => {
                let $b: &Gpu = g;
                $body
            }
        }
    };
}

#[cfg(feature = "mpi")]
mod mpi_cli;

impl AnyBackend {
    /// The backend for `choice` (every model has GPU kernels, so `config` does not matter).
    fn choose(choice: BackendChoice, config: Option<&Config>) -> Result<AnyBackend> {
        let _ = config;
        Ok(match choice {
            BackendChoice::Cpu => AnyBackend::Cpu(Cpu::new()),
            BackendChoice::Gpu => AnyBackend::Gpu(Box::new(
                Gpu::new(GpuOptions {
                    allow_software: true,
                    ..Default::default()
                })
                .context("--backend gpu")?,
            )),
            BackendChoice::Auto => match Gpu::new(GpuOptions::default()) {
                Ok(gpu) => {
                    log::info!("running on the GPU: {}", gpu.describe());
                    AnyBackend::Gpu(Box::new(gpu))
                }
                Err(e) => {
                    if std::env::var("ENFF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                        anyhow::bail!("ENFF_REQUIRE_GPU=1 and no hardware GPU: {e}");
                    }
                    log::info!("no hardware GPU adapter ({e}); running on the CPU");
                    AnyBackend::Cpu(Cpu::new())
                }
            },
        })
    }
}

#[derive(clap::Args, Clone, Debug)]
struct RunArgs {
    /// Preset name (see `enff preset list`) or experiment file (`my.toml`, e.g. from
    /// `enff preset show NAME > my.toml`): an existing path or a name ending in .toml is a file.
    #[arg(default_value = DEFAULT_PRESET, value_name = "PRESET|FILE")]
    preset: String,
    /// Filter: enff-f2p, enff-ot, ensf, etkf, letkf, enkf, bpf or kf (default: the preset's).
    #[arg(long)]
    filter: Option<String>,
    /// Override a setting, e.g. --set model.d=100000 --set filter.flow_steps=9.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Where the numbers live and the kernels run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Seed of every random stream (default: the preset's).
    #[arg(long)]
    seed: Option<u64>,
    /// Run K seeds (seed, seed+1, …) and report mean ± std of rmse_mean and spread_mean
    /// (seeds.csv; each seed's files in seed-<SEED>/).
    #[arg(long, default_value_t = 1, value_name = "K")]
    seeds: usize,
    /// Output folder for config.toml, summary.json and metrics.csv (default:
    /// runs/<preset>-<filter>, numbered -2, -3, … when taken).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write into an --out folder that already holds files (same-named files are replaced).
    #[arg(long)]
    force: bool,
    /// Print the configuration that would run (TOML, runnable as a file), validated, with
    /// its memory estimate, and exit.
    #[arg(long)]
    dry_run: bool,
    /// Write a checkpoint (ensemble, truth, metrics, resolved config) into the output folder
    /// every K cycles, atomically; continue an interrupted run with --resume.
    #[arg(long, value_name = "K", default_value_t = 0)]
    checkpoint_every: usize,
    /// Continue the run whose checkpoint is in DIR (its own configuration; results go to DIR).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// On a non-finite ensemble, weight or metric: stop (default) or record the event and
    /// keep cycling.
    #[arg(long, value_name = "stop|record", default_value = "stop")]
    on_divergence: String,
    /// Check the state after every flow step, so a divergence names the step and whether the
    /// weights or the guidance produced it (one device round trip per step).
    #[arg(long)]
    check_every_step: bool,
    #[command(flatten)]
    plots: PlotArgs,
    /// Write the analysis ensemble every EVERY cycles as OUT/ensembles/cycle_XXXX.npy.
    #[arg(long, value_name = "EVERY")]
    save_ensembles: Option<usize>,
}

#[derive(clap::Args, Clone, Debug, Default)]
struct PlotArgs {
    /// Skip the plots (rmse_spread, hovmoller or field; PNG and SVG).
    #[arg(long)]
    no_plots: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a twin experiment (preset or TOML file) and write config.toml, summary.json and
    /// metrics.csv.
    Run(RunArgs),
    /// List presets or export one as a TOML experiment file.
    Preset {
        #[command(subcommand)]
        command: PresetCommand,
    },
    /// List the presets with their expected RMSE (same as `enff preset list`).
    Presets,
    /// Show the backends this build can use.
    Info,
    /// Time one EnFF analysis over a grid of ensemble sizes and state dimensions.
    Bench(BenchArgs),
    /// Run several filters on identical truth, observations and initial ensemble, and
    /// tabulate their skill and cost (also written as compare.csv and compare.md).
    Compare(CompareArgs),
    /// Run every point of a grid (or of random draws) with several seeds, appending each run
    /// to results.csv (resumable), and rank the settings by mean RMSE.
    Sweep(SweepArgs),
    /// One analysis step for a model that lives elsewhere: forecast and observation in as
    /// .npy files, the analysis ensemble out.
    Assimilate(AssimilateArgs),
}

#[derive(Subcommand)]
enum PresetCommand {
    /// One line per preset: name, description, expected RMSE.
    List,
    /// Print a preset as a TOML experiment file with every setting (`> my.toml`, then
    /// `enff run my.toml`).
    Show(ShowArgs),
}

#[derive(clap::Args, Clone, Debug)]
struct ShowArgs {
    /// Preset name (or experiment file).
    #[arg(value_name = "PRESET|FILE")]
    preset: String,
    /// Filter to put in the file (default: the preset's).
    #[arg(long)]
    filter: Option<String>,
    /// Settings to change before printing (section.key=value).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args, Clone, Debug)]
struct SweepArgs {
    /// Preset name or experiment file: the base configuration.
    #[arg(value_name = "PRESET|FILE")]
    preset: String,
    /// A grid axis, e.g. --grid filter.sigma_min=1e-3,1e-2,1e-1 (repeatable; points are the
    /// cartesian product).
    #[arg(long = "grid", value_name = "KEY=V1,V2,…")]
    grids: Vec<String>,
    /// Draw N random points from the --range settings (seeded by experiment.seed).
    #[arg(long, value_name = "N", default_value_t = 0)]
    random: usize,
    /// A range for --random, uniform or log-uniform: --range filter.guidance_scale=0.01:1:log.
    #[arg(long = "range", value_name = "KEY=LO:HI[:log]")]
    ranges: Vec<String>,
    /// Seeds per point (seed, seed+1, …).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Filter of the base configuration (default: the preset's).
    #[arg(long)]
    filter: Option<String>,
    /// Change a setting of the base configuration (section.key=value).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// First seed (default: the preset's).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the numbers live and the kernels run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Sweep folder (default: runs/sweep-<preset>); re-running the same sweep there resumes it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Discard whatever the sweep folder holds and start afresh.
    #[arg(long)]
    force: bool,
    /// Rows of the best-settings table to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
}
#[derive(clap::Args, Clone, Debug)]
struct CompareArgs {
    /// Preset name or experiment file.
    #[arg(value_name = "PRESET|FILE")]
    preset: String,
    /// Comma-separated filters, e.g. enff-f2p,enff-ot,etkf,enkf,bpf.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "enff-f2p,enff-ot,ensf,etkf,enkf,bpf"
    )]
    filters: Vec<String>,
    /// Override a setting for every filter (section.key=value), or for one filter
    /// (etkf:filter.inflation=1.02).
    #[arg(long = "set", value_name = "[FILTER:]KEY=VALUE")]
    sets: Vec<String>,
    /// Where the numbers live and the kernels run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Seed of every random stream (default: the preset's).
    #[arg(long)]
    seed: Option<u64>,
    /// Seeds per filter (seed, seed+1, …): the table shows mean ± std over them.
    #[arg(long, default_value_t = 1, value_name = "K")]
    seeds: usize,
    /// Output folder (default: runs/compare-<preset>, numbered -2, -3, … when taken).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write into an --out folder that already holds files.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    plots: PlotArgs,
}

#[derive(clap::Args, Clone, Debug)]
struct BenchArgs {
    /// Small grid that finishes in seconds.
    #[arg(long)]
    quick: bool,
    /// Flow steps per analysis.
    #[arg(long, default_value_t = enff::bench::DEFAULT_FLOW_STEPS)]
    flow_steps: usize,
    /// Timed repetitions per grid point (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Probability path: f2p or ot.
    #[arg(long, default_value = "f2p")]
    path: String,
    /// Grid points as NxD (e.g. --size 20x10000 --size 100x10000); default: the standard grid.
    #[arg(long = "size", value_name = "NxD")]
    sizes: Vec<String>,
    /// Backends to time: cpu = the CPU alone; auto = the CPU and, when found, a hardware GPU;
    /// gpu = the CPU and any GPU adapter, software ones included (their timings say nothing
    /// about speed).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Skip CPU rows whose estimated time per analysis exceeds this many seconds.
    #[arg(long, default_value_t = 30.0)]
    cpu_budget: f64,
    /// Time whole Lorenz-96 cycles (forecast + analysis) instead of single analyses, over
    /// d ∈ {1e4, 1e5, 1e6} and n ∈ {20, 100} (or the --size grid).
    #[arg(long)]
    cycles: bool,
    /// Time the grid-model forecasts (KS d=1024, n=20/100; NS 64² and 256², n=20) in model
    /// steps per second, and whole ks_1024 / ns_64 cycles, instead of analyses.
    #[arg(long)]
    models: bool,
    /// Time filter analyses instead (comma-separated: letkf, letkf-batched, enkf, etkf, enff,
    /// enff-cov1, enff-cov2, enff-cov4, and enff-cov2-relin, enff-cov4-relin with the gains
    /// re-linearized at every stage) over d ∈ {1e3, 1e4, 1e5}, n = 20 (or the --size grid).
    #[arg(long, value_delimiter = ',')]
    filters: Vec<String>,
    /// Under mpirun: time sharded EnFF flow steps (compute and allreduce) over the --size
    /// grid, and the allreduce of n² floats for n = 20 … 1000.
    #[cfg(feature = "mpi")]
    #[arg(long)]
    mpi: bool,
    /// With --mpi: D in --size NxD is per rank (weak scaling) instead of the whole state.
    #[cfg(feature = "mpi")]
    #[arg(long)]
    weak: bool,
}

fn main() -> ExitCode {
    // Mesa's device-select layer prints "XDG_RUNTIME_DIR is invalid" on every Vulkan instance
    // in headless sessions; it selects nothing enff needs.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = Cli::parse();
    #[cfg(feature = "mpi")]
    let mpi_world = match enff::distributed::mpi::MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Only rank 0 of an MPI job logs below warnings.
    #[cfg(feature = "mpi")]
    let quiet_rank = mpi_world.as_ref().is_some_and(|w| w.rank() != 0);
    #[cfg(not(feature = "mpi"))]
    let quiet_rank = false;
    // Without the feature, N copies under mpirun would each run the whole experiment.
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = enff::distributed::launched_size().filter(|&n| n > 1) {
        eprintln!(
            "error: started by an MPI launcher as one of {n} processes, but this enff was built \
             without the `mpi` feature (each process would run the whole experiment alone): \
             rebuild with `cargo build --release --features mpi`"
        );
        return ExitCode::FAILURE;
    }
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if cli.quiet || quiet_rank {
        logger.filter_level(log::LevelFilter::Warn);
    }
    logger.format_timestamp(None).init();
    let ui = Ui {
        quiet: cli.quiet,
        json: cli.json,
    };
    // Under an MPI launcher (feature `mpi`): the sharded commands, see mpi_cli.
    #[cfg(feature = "mpi")]
    if let Some(world) = &mpi_world {
        return match mpi_cli::main(world, cli.command, ui) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                mpi_cli::print_error(world.rank(), world.size(), &format!("{e:#}"));
                ExitCode::FAILURE
            }
        };
    }
    let result = match cli.command {
        None => run(default_run_args(), ui),
        Some(Command::Run(args)) => run(args, ui),
        Some(Command::Compare(args)) => compare(args, ui),
        Some(Command::Preset {
            command: PresetCommand::List,
        })
        | Some(Command::Presets) => preset_list(),
        Some(Command::Preset {
            command: PresetCommand::Show(args),
        }) => preset_show(args),
        Some(Command::Sweep(args)) => sweep_command(args, ui),
        Some(Command::Assimilate(args)) => assimilate(args),
        Some(Command::Info) => info(),
        Some(Command::Bench(args)) => bench(args, ui),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments of `enff` with no command (`enff run` of the default preset).
fn default_run_args() -> RunArgs {
    RunArgs {
        preset: DEFAULT_PRESET.into(),
        filter: None,
        sets: Vec::new(),
        backend: BackendChoice::Auto,
        seed: None,
        seeds: 1,
        out: None,
        force: false,
        dry_run: false,
        checkpoint_every: 0,
        resume: None,
        on_divergence: "stop".into(),
        check_every_step: false,
        plots: PlotArgs::default(),
        save_ensembles: None,
    }
}

/// The output folder: `--out` (refused when it holds files, unless `force`), else the first
/// vacant one of `default`, `default-2`, ….
fn output_dir(out: Option<&Path>, default: PathBuf, force: bool) -> Result<PathBuf> {
    let dir = match out {
        Some(o) => o.to_path_buf(),
        None => output::vacant_dir(&default),
    };
    output::prepare_dir(&dir, force)?;
    Ok(dir)
}

fn preset_list() -> Result<()> {
    for name in PRESETS {
        let p = preset(name)?;
        println!(
            "{name:<22} {} — expected rmse {:.3}–{:.3}",
            p.description, p.expected_rmse.0, p.expected_rmse.1
        );
    }
    Ok(())
}

fn preset_show(args: ShowArgs) -> Result<()> {
    let mut src = Source::load(&args.preset)?;
    src.apply(args.filter.as_deref(), &args.sets, None)?;
    src.config.validate()?;
    let mut comment = String::new();
    if let Some(p) = &src.preset {
        comment.push_str(&format!("{}: {}\n", p.name, p.description));
        if let Some((a, b)) = src.expected(&src.config) {
            comment.push_str(&format!(
                "expected rmse_mean {a:.3}–{b:.3} ({})\n",
                p.expected_source
            ));
        }
    }
    comment.push_str("Run it with: enff run <this file>");
    print!("{}", file::to_toml(&src.name, &comment, &src.config)?);
    Ok(())
}

fn info() -> Result<()> {
    let cpu = Cpu::new();
    println!("cpu: {}", cpu.describe());
    let adapters = enff::backend::gpu::list_adapters();
    if adapters.is_empty() {
        println!(
            "gpu: no adapter found (WGPU_BACKEND={})",
            std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "all".into())
        );
    }
    for a in &adapters {
        println!("gpu: {}", a.line());
    }
    match Gpu::new(GpuOptions::default()) {
        Ok(g) => println!("--backend auto uses: {}", g.describe()),
        Err(e) => println!("--backend auto uses: the CPU ({e})"),
    }
    Ok(())
}

/// `enff bench --filters …`: baseline-filter analyses on the CPU and, when present, the GPU.
fn bench_filters(
    args: &BenchArgs,
    grid: &[(usize, usize)],
    cpu: &Cpu,
    gpu: Option<&Gpu>,
) -> Result<()> {
    let mut rows = Vec::new();
    for f in &args.filters {
        for &(n, d) in grid {
            let r = enff::bench::bench_filter(cpu, f, n, d, args.reps, 1)?;
            eprint!(
                "{}",
                enff::bench::format_filter_table(std::slice::from_ref(&r))
            );
            rows.push(r);
            if let Some(g) = gpu {
                let r = enff::bench::bench_filter(g, f, n, d, args.reps, 1)?;
                eprint!(
                    "{}",
                    enff::bench::format_filter_table(std::slice::from_ref(&r))
                );
                rows.push(r);
            }
        }
    }
    if let Some(g) = gpu {
        println!("gpu: {}", g.describe());
    }
    println!("cpu: {}", cpu.describe());
    print!("{}", enff::bench::format_filter_table(&rows));
    Ok(())
}

fn bench(args: BenchArgs, ui: Ui) -> Result<()> {
    #[cfg(feature = "mpi")]
    anyhow::ensure!(
        !args.mpi && !args.weak,
        "--mpi and --weak time sharded flow steps: start them with `mpirun -n N enff bench --mpi`"
    );
    let path = match args.path.as_str() {
        "f2p" => enff::flow::PathKind::F2p,
        "ot" => enff::flow::PathKind::Ot,
        other => anyhow::bail!("--path {other}: use f2p or ot"),
    };
    let grid: Vec<(usize, usize)> = if !args.sizes.is_empty() {
        args.sizes
            .iter()
            .map(|s| parse_size(s))
            .collect::<Result<_>>()?
    } else if args.quick {
        enff::bench::QUICK_GRID.to_vec()
    } else {
        enff::bench::DEFAULT_GRID.to_vec()
    };
    let grid = if args.cycles && args.sizes.is_empty() {
        enff::bench::cycles::cycle_grid(args.quick)
    } else {
        grid
    };
    let cpu = Cpu::new();
    let gpu = match args.backend {
        BackendChoice::Cpu => None,
        BackendChoice::Gpu => Some(Gpu::new(GpuOptions {
            allow_software: true,
            ..Default::default()
        })?),
        BackendChoice::Auto => match Gpu::new(GpuOptions::default()) {
            Ok(g) => Some(g),
            Err(e) => {
                log::info!("no hardware GPU for the benchmark ({e}); timing the CPU only");
                None
            }
        },
    };
    if !args.filters.is_empty() {
        let grid = if args.sizes.is_empty() {
            enff::bench::FILTER_GRID.to_vec()
        } else {
            grid
        };
        return bench_filters(&args, &grid, &cpu, gpu.as_ref());
    }
    // The CPU always runs: GPU figures are reported as ratios against it in the same run.
    let run_cpu = true;
    if args.models {
        return Ok(enff::bench::models::run(
            &cpu,
            gpu.as_ref(),
            args.quick,
            args.reps,
        )?);
    }
    if args.cycles {
        return bench_cycles(&args, &grid, &cpu, gpu.as_ref(), run_cpu, ui);
    }
    println!(
        "enff bench: one EnFF-{} analysis = {} flow steps (+ source noise, checks, copy)",
        args.path, args.flow_steps
    );
    if run_cpu {
        println!("  cpu: {}", cpu.describe());
    }
    if let Some(g) = &gpu {
        println!("  gpu: {}", g.adapter().line());
        if g.adapter().is_software {
            println!("  NOTE: software adapter: GPU figures check correctness only, not speed");
        }
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut ratios = Vec::new();
    let mut cpu_gflops = 20.0f64;
    let bar = ui.bar(
        grid.len() as u64,
        "{spinner} bench {pos}/{len} [{bar:30}] {msg} eta {eta}",
    );
    for (n, d) in grid {
        bar.set_message(format!("n={n} d={d}"));
        let mut cpu_row = None;
        if run_cpu {
            let est = enff::bench::flops_per_analysis(n, d, args.flow_steps) / (cpu_gflops * 1e9);
            if est > args.cpu_budget {
                notes.push(format!(
                    "cpu n={n} d={d}: skipped, estimated {est:.0} s per analysis (--cpu-budget {})",
                    args.cpu_budget
                ));
            } else {
                let reps = if est > 2.0 { 1 } else { args.reps };
                let r = enff::bench::bench_analysis(&cpu, n, d, args.flow_steps, path, reps, 1)?;
                cpu_gflops = r.gflops.max(1.0);
                cpu_row = Some(r.seconds_per_analysis);
                rows.push(r);
            }
        }
        if let Some(g) = &gpu {
            match enff::bench::bench_analysis(g, n, d, args.flow_steps, path, args.reps, 1) {
                Ok(r) => {
                    if let Some(c) = cpu_row {
                        ratios.push(format!(
                            "n={n} d={d}: GPU {:.2}x the CPU speed (cpu {:.3} ms, gpu {:.3} ms)",
                            c / r.seconds_per_analysis,
                            c * 1e3,
                            r.seconds_per_analysis * 1e3
                        ));
                    }
                    rows.push(r);
                }
                Err(enff::Error::TooLarge { detail }) => {
                    notes.push(format!("gpu n={n} d={d}: does not fit: {detail}"))
                }
                Err(e) => return Err(e.into()),
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    print!("{}", enff::bench::format_table(&rows));
    for r in ratios {
        println!("  {r}");
    }
    for note in notes {
        println!("  {note}");
    }
    Ok(())
}

/// One row of the cycle benchmark.
/// One row of `bench --cycles` on `backend`, its progress on `bar`.
fn cycle_row<B: Backend + 'static>(
    backend: &B,
    n: usize,
    d: usize,
    flow_steps: usize,
    cycles: usize,
    bar: &ProgressBar,
) -> Result<enff::experiment::Summary> {
    let label = format!("{} n={n} d={d}", backend.name());
    Ok(enff::bench::cycles::cycle_row(
        backend,
        n,
        d,
        flow_steps,
        cycles,
        |m| bar.set_message(format!("{label} cycle {} rmse {:.4}", m.cycle, m.rmse)),
    )?)
}

fn bench_cycles(
    args: &BenchArgs,
    grid: &[(usize, usize)],
    cpu: &Cpu,
    gpu: Option<&Gpu>,
    run_cpu: bool,
    ui: Ui,
) -> Result<()> {
    let cycles = if args.quick { 3 } else { 5 };
    println!(
        "enff bench --cycles: Lorenz-96 (RK4 3/8, 10 model steps per cycle), EnFF-F2P with {} \
         flow steps, {cycles} cycles per row",
        args.flow_steps
    );
    if let Some(g) = gpu {
        println!("  gpu: {}", g.adapter().line());
    }
    println!(
        "{:<5} {:>5} {:>9} {:>12} {:>12} {:>12} {:>13} {:>11}",
        "back", "n", "d", "s/cycle", "forecast s", "analysis s", "fcst GB/s*", "floor GB*"
    );
    let mut cpu_rate = 5e8f64; // member-components per second, refined after each CPU row
    let bar = ui.bar(
        grid.len() as u64,
        "{spinner} bench {pos}/{len} [{bar:30}] {msg} eta {eta}",
    );
    for &(n, d) in grid {
        bar.set_message(format!("n={n} d={d}"));
        let (moved, floor) = enff::bench::cycles::forecast_traffic(n, d);
        let work = enff::bench::cycles::cycle_work(n, d, args.flow_steps);
        let mut rows: Vec<(&str, enff::experiment::Summary)> = Vec::new();
        if run_cpu {
            let est = work / cpu_rate * cycles as f64;
            if est > args.cpu_budget * cycles as f64 {
                bar.suspend(|| {
                    println!("cpu   {n:>5} {d:>9}  skipped: estimated {est:.0} s (--cpu-budget)")
                });
            } else {
                let s = cycle_row(cpu, n, d, args.flow_steps, cycles, &bar)?;
                cpu_rate = work / s.seconds_per_cycle.max(1e-9);
                rows.push(("cpu", s));
            }
        }
        if let Some(g) = gpu {
            match cycle_row(g, n, d, args.flow_steps, cycles, &bar) {
                Ok(s) => rows.push(("gpu", s)),
                Err(e) => bar.suspend(|| println!("gpu   {n:>5} {d:>9}  does not fit: {e:#}")),
            }
        }
        bar.suspend(|| {
            for (name, s) in &rows {
                let per = |t: f64| t / s.cycles as f64;
                let f = per(s.seconds_forecast);
                println!(
                    "{:<5} {:>5} {:>9} {:>12.4} {:>12.4} {:>12.4} {:>13.1} {:>11.3}",
                    name,
                    n,
                    d,
                    per(s.seconds_forecast + s.seconds_analysis),
                    f,
                    per(s.seconds_analysis),
                    moved / f.max(1e-12) / 1e9,
                    floor / 1e9
                );
            }
            if rows.len() == 2 {
                let (c, g) = (&rows[0].1, &rows[1].1);
                println!(
                    "      GPU/CPU speed-up per cycle: {:.2}x",
                    (c.seconds_forecast + c.seconds_analysis)
                        / (g.seconds_forecast + g.seconds_analysis)
                );
            }
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "  *: forecast traffic counted as 20·4·n·d bytes per model step (four RK stages and the \
         combination as separate passes, as the GPU runs them); floor = one read and one write \
         of the ensemble per step (8·n·d bytes), per cycle."
    );
    Ok(())
}

/// Parses counts such as `10000`, `1e5` or `1_000_000`.
/// `--size NxD`.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (n, d) = s
        .split_once('x')
        .with_context(|| format!("--size {s}: write NxD, e.g. 20x10000"))?;
    Ok((
        n.trim()
            .parse()
            .with_context(|| format!("--size {s}: bad N"))?,
        parse_count(d).with_context(|| format!("--size {s}: bad D"))?,
    ))
}

fn parse_count(s: &str) -> Result<usize> {
    let t = s.trim().replace('_', "");
    if let Ok(v) = t.parse::<usize>() {
        return Ok(v);
    }
    let f: f64 = t.parse()?;
    anyhow::ensure!(
        f >= 1.0 && f.fract() == 0.0 && f < 1e15,
        "not a positive integer: {s}"
    );
    Ok(f as usize)
}

fn compare(args: CompareArgs, ui: Ui) -> Result<()> {
    anyhow::ensure!(args.seeds >= 1, "--seeds 0: run at least one seed");
    let src = Source::load(&args.preset)?;
    // Build and validate every configuration before running anything.
    let mut experiments = Vec::new();
    for f in &args.filters {
        let mut s = Source {
            name: src.name.clone(),
            config: src.config.clone(),
            preset: src.preset.clone(),
        };
        // The settings for this filter (all, and those prefixed `FILTER:`), applied together so
        // that a change of EnFF guidance resolves its defaults.
        let sets: Vec<String> = args
            .sets
            .iter()
            .filter_map(|set| match set.split_once(':') {
                Some((only, rest)) if !only.contains('=') => (only == f).then(|| rest.to_string()),
                _ => Some(set.clone()),
            })
            .collect();
        s.apply(Some(f), &sets, args.seed)?;
        if FilterKind::parse(f)? == FilterKind::Kf {
            s.config.set("ensemble.n=1")?;
        }
        experiments.push((f.clone(), s.experiment()?));
    }
    let out = output_dir(
        args.out.as_deref(),
        PathBuf::from("runs").join(format!("compare-{}", src.name)),
        args.force,
    )?;
    let backend = AnyBackend::choose(args.backend, Some(experiments[0].1.config()))?;
    // Per filter: the summaries of its seeds, or the first error.
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for (f, exp) in &experiments {
        let mut row = CompareRow::new(exp);
        for k in 0..args.seeds {
            let (exp, dir) = if args.seeds == 1 {
                (exp.clone(), out.join(f))
            } else {
                let e = seeds::with_seed(exp, k)?;
                let dir = out
                    .join(f)
                    .join(format!("seed-{}", e.config().experiment.seed));
                (e, dir)
            };
            let label = format!("{f} {}/{}", k + 1, args.seeds);
            let traced = trace_options(&args.plots, None, &dir);
            let options = RunOptions {
                stream_metrics: Some(dir.clone()),
                ..RunOptions::default()
            };
            match on_backend!(&backend, b => run_on(b, &exp, &dir, ui, &label, &options, &traced, &Where::One))
            {
                Ok((r, trace)) => {
                    write_run(&dir, &exp, &r)?;
                    write_plots(&args.plots, &dir, &r, &trace)?;
                    if k == 0 {
                        curves.push((f.clone(), r.metrics.clone()));
                    }
                    row.summaries.push(r.summary);
                }
                Err(e) => {
                    row.error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        rows.push(row);
    }
    let tables = CompareTables::build(&src.name, &experiments[0].1, &rows, args.seeds);
    tables.write(&out)?;
    if !args.plots.no_plots && !curves.is_empty() {
        enff::experiment::plots::write_compare_plot(
            &out,
            &format!("{}: rmse and spread of every filter", src.name),
            &curves,
        )?;
    }
    if ui.json {
        println!("{}", serde_json::to_string_pretty(&tables.json)?);
    } else {
        print!("{}", tables.text);
        println!("  results      {}", out.display());
    }
    Ok(())
}

/// Writes a finished run's files: config.toml, metrics.csv and summary.json.
fn write_run(dir: &Path, experiment: &Experiment, report: &Report) -> Result<()> {
    output::write_config(dir, experiment.name(), experiment.config())
        .and_then(|_| output::write_report(dir, report))
        .with_context(|| format!("writing results to {}", dir.display()))
}

/// The run's checkpoint, resumption and divergence options. Test hooks: `ENFF_TEST_ABORT_AFTER=K`
/// stops the run after cycle K as a killed process would, once its checkpoint is written;
/// `ENFF_TEST_NAN_FORECAST=K` puts a NaN into the forecast of cycle K.
/// `resume` is the checkpoint already read for `--resume` (read once: it holds the ensemble).
fn run_options(
    args: &RunArgs,
    out: &Path,
    resume: Option<enff::experiment::Checkpoint>,
) -> Result<RunOptions> {
    let cycle_of = |name: &str| -> Result<Option<usize>> {
        match std::env::var(name) {
            Ok(k) => {
                Ok(Some(k.parse().with_context(|| {
                    format!("{name} must be a cycle number")
                })?))
            }
            Err(_) => Ok(None),
        }
    };
    let fault = match (
        cycle_of("ENFF_TEST_ABORT_AFTER")?,
        cycle_of("ENFF_TEST_NAN_FORECAST")?,
    ) {
        (Some(k), _) => Some(enff::experiment::Fault::AbortAfter(k)),
        (None, Some(k)) => Some(enff::experiment::Fault::NonFinite {
            cycle: k,
            stage: enff::experiment::FaultStage::Forecast,
        }),
        (None, None) => None,
    };
    Ok(RunOptions {
        checkpoint_every: args.checkpoint_every,
        checkpoint_dir: (args.checkpoint_every > 0 || resume.is_some()).then(|| out.to_path_buf()),
        resume,
        on_divergence: OnDivergence::parse(&args.on_divergence)?,
        step_checks: args.check_every_step,
        stream_metrics: Some(out.to_path_buf()),
        fault,
    })
}

/// `--resume DIR`: the checkpoint and its own resolved configuration. Changes against it
/// (`--set`, `--filter`, `--seed`) are refused with the keys when the run starts.
fn resumed_experiment(
    args: &RunArgs,
    dir: &Path,
) -> Result<(Experiment, enff::experiment::Checkpoint)> {
    let ck = enff::experiment::Checkpoint::read(dir)?;
    let h = &ck.header;
    let mut config = h.config.clone();
    if let Some(f) = &args.filter {
        config.set(&format!("filter.kind={f}"))?;
    }
    for s in &args.sets {
        config.set(s)?;
    }
    if let Some(seed) = args.seed {
        config.experiment.seed = seed;
    }
    let experiment = Experiment::new(&h.preset, config, h.expected_rmse)?;
    Ok((experiment, ck))
}

/// Where a run's state lives: this process alone, or slabs over the ranks of an MPI job (the
/// root rank writes the results).
#[derive(Clone)]
enum Where {
    One,
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    Ranks(std::sync::Arc<dyn enff::distributed::Comm>),
}

impl Where {
    /// True on the process that writes results and prints.
    fn is_root(&self) -> bool {
        match self {
            Where::One => true,
            Where::Ranks(comm) => comm.rank() == 0,
        }
    }

    /// The placement of a state of `d` components.
    fn placement<'b, B: Backend + 'static>(&self, d: usize) -> Box<dyn Placement<B> + 'b> {
        match self {
            Where::One => Box::new(OneProcess::new(d)),
            Where::Ranks(comm) => Box::new(enff::distributed::Slabs::new(
                enff::distributed::Shard::new(comm.clone(), d),
            )),
        }
    }
}

fn run(args: RunArgs, ui: Ui) -> Result<()> {
    anyhow::ensure!(args.seeds >= 1, "--seeds 0: run at least one seed");
    if let Some(dir) = args.resume.clone() {
        let (experiment, ck) = resumed_experiment(&args, &dir)?;
        let backend = AnyBackend::choose(args.backend, Some(experiment.config()))?;
        return run_experiment(
            &args,
            ui,
            &Where::One,
            &experiment,
            &dir,
            &backend,
            Some(ck),
        );
    }
    let experiment = run_experiment_of(&args)?;
    if args.dry_run {
        return dry_run(&experiment, ui);
    }
    let out = run_output_dir(&args, &experiment)?;
    let backend = AnyBackend::choose(args.backend, Some(experiment.config()))?;
    run_experiment(&args, ui, &Where::One, &experiment, &out, &backend, None)
}

/// The experiment `enff run` was asked for (not a resumption).
fn run_experiment_of(args: &RunArgs) -> Result<Experiment> {
    anyhow::ensure!(
        args.seeds == 1 || args.checkpoint_every == 0,
        "--checkpoint-every with --seeds: checkpoint one seed at a time (--seed S)"
    );
    let mut src = Source::load(&args.preset)?;
    src.apply(args.filter.as_deref(), &args.sets, args.seed)?;
    Ok(src.experiment()?)
}

/// The output folder of `enff run` (created, or refused when it holds results).
fn run_output_dir(args: &RunArgs, experiment: &Experiment) -> Result<PathBuf> {
    output_dir(
        args.out.as_deref(),
        PathBuf::from("runs").join(format!(
            "{}-{}",
            experiment.name(),
            experiment.config().filter.kind
        )),
        args.force,
    )
}

/// Runs `experiment` (continuing `resume` when given) placed by `place`, and writes its
/// results, plots and summary into `out` on the root process.
fn run_experiment(
    args: &RunArgs,
    ui: Ui,
    place: &Where,
    experiment: &Experiment,
    out: &Path,
    backend: &AnyBackend,
    resume: Option<enff::experiment::Checkpoint>,
) -> Result<()> {
    if args.seeds > 1 {
        return run_seeds(experiment, args.seeds, out, backend, ui, &args.plots, place);
    }
    let options = run_options(args, out, resume)?;
    let traced = trace_options(&args.plots, args.save_ensembles, out);
    let (report, trace) = on_backend!(
        backend,
        b => run_on(b, experiment, out, ui, "", &options, &traced, place)
    )?;
    if !place.is_root() {
        return Ok(());
    }
    write_run(out, experiment, &report)?;
    write_plots(&args.plots, out, &report, &trace)?;
    if ui.json {
        println!("{}", serde_json::to_string_pretty(&report.summary)?);
    } else {
        print_summary(&report, out);
    }
    Ok(())
}

fn dry_run(experiment: &Experiment, ui: Ui) -> Result<()> {
    let est = experiment.memory_estimate();
    if ui.json {
        let v = serde_json::json!({ "config": experiment.config(), "memory": est });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    // Valid TOML throughout: the estimate is in comments, so the output runs as a file.
    print!(
        "{}",
        file::to_toml(
            experiment.name(),
            "Validated configuration (enff run --dry-run)",
            experiment.config()
        )?
    );
    println!(
        "\n# memory estimate: {:.3} GiB ({:.4} GiB per member)",
        est.total as f64 / (1u64 << 30) as f64,
        est.per_member as f64 / (1u64 << 30) as f64
    );
    for (name, b) in &est.parts {
        println!(
            "#   {name:<32} {:>10.1} MiB",
            *b as f64 / (1u64 << 20) as f64
        );
    }
    Ok(())
}

/// `--seeds K`: the experiment with seeds seed … seed+K-1, each in `OUT/seed-<SEED>/`, then
/// `OUT/seeds.csv` and `OUT/summary.json` with mean ± std over the seeds.
fn run_seeds(
    experiment: &Experiment,
    seeds: usize,
    out: &Path,
    backend: &AnyBackend,
    ui: Ui,
    plots: &PlotArgs,
    place: &Where,
) -> Result<()> {
    if place.is_root() {
        output::write_config(out, experiment.name(), experiment.config())?;
    }
    let mut summaries = Vec::new();
    for k in 0..seeds {
        let exp = seeds::with_seed(experiment, k)?;
        let dir = out.join(format!("seed-{}", exp.config().experiment.seed));
        let label = format!("seed {}/{seeds}", k + 1);
        let traced = trace_options(plots, None, &dir);
        let options = RunOptions {
            stream_metrics: place.is_root().then(|| dir.clone()),
            ..RunOptions::default()
        };
        let (report, trace) = on_backend!(
            backend,
            b => run_on(b, &exp, &dir, ui, &label, &options, &traced, place)
        )?;
        if place.is_root() {
            write_run(&dir, &exp, &report)?;
            write_plots(plots, &dir, &report, &trace)?;
        }
        summaries.push(report.summary);
    }
    if !place.is_root() {
        return Ok(());
    }
    let text = seeds::write_seed_results(out, experiment, &summaries)?;
    let stats = seeds::SeedStats::of(&summaries);
    let (rmse, spread) = (stats.rmse, stats.spread);
    if ui.json {
        println!("{text}");
        return Ok(());
    }
    let s0 = &summaries[0];
    println!(
        "enff run: {} with {} on {}, {seeds} seeds",
        s0.preset, s0.filter, s0.backend
    );
    println!("  {:>12} {:>12} {:>12}", "seed", "rmse_mean", "spread_mean");
    for s in &summaries {
        println!(
            "  {:>12} {:>12.4} {:>12.4}",
            s.seed, s.rmse_mean, s.spread_mean
        );
    }
    println!(
        "  {:>12} {:>12} {:>12}",
        "mean ± std",
        format!("{:.4} ± {:.4}", rmse.0, rmse.1),
        format!("{:.4} ± {:.4}", spread.0, spread.1)
    );
    if let Some((a, b)) = s0.expected_rmse {
        println!("  expected rmse {a:.3}–{b:.3}");
    }
    println!("  results      {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_on<B: Backend + 'static>(
    backend: &B,
    experiment: &Experiment,
    out: &Path,
    ui: Ui,
    label: &str,
    options: &RunOptions,
    traced: &TraceOptions,
    place: &Where,
) -> Result<(Report, Trace)> {
    let cycles = experiment.config().experiment.cycles as u64;
    let ui = Ui {
        quiet: ui.quiet || !place.is_root(),
        ..ui
    };
    let bar = ui.bar(
        cycles,
        "{spinner} {prefix}cycle {pos}/{len} [{bar:30}] rmse {msg} eta {eta}",
    );
    if !label.is_empty() {
        bar.set_prefix(format!("{label}: "));
    }
    log::info!(
        "{}: n={} d={} on {}",
        experiment.name(),
        experiment.config().ensemble.n,
        experiment.config().state_dim(),
        backend.describe()
    );
    let mut done = 0usize;
    if let Some(ck) = &options.resume {
        done = ck.header.cycle;
        bar.set_position(ck.header.cycle as u64);
        log::info!("resuming after cycle {}", ck.header.cycle);
    }
    // The configuration first, so that a run stopped at any point says what it ran.
    if place.is_root() {
        output::write_config(out, experiment.name(), experiment.config())
            .with_context(|| format!("writing {}", out.join("config.toml").display()))?;
    }
    let mut recorder = Recorder::<B>::new(experiment.config(), traced.clone())?;
    let report = experiment.run_placed(
        backend,
        place.placement(experiment.config().state_dim()),
        options,
        |m| {
            bar.set_message(format!("{:.4}", m.rmse));
            bar.inc(1);
            done = m.cycle;
        },
        |state| recorder.observe(state),
    );
    bar.finish_and_clear();
    match report {
        Ok(r) => Ok((r, recorder.finish())),
        Err(e) if matches!(e.root(), enff::Error::Diverged { .. }) => {
            let kept = match &options.stream_metrics {
                Some(dir) => format!(
                    "; the metrics of the {done} completed cycles are in {}",
                    dir.join("metrics.csv").display()
                ),
                None => String::new(),
            };
            Err(anyhow::Error::new(e).context(format!("the run stopped{kept}")))
        }
        Err(e) => Err(e.into()),
    }
}

fn sweep_command(args: SweepArgs, ui: Ui) -> Result<()> {
    let mut src = Source::load(&args.preset)?;
    src.apply(args.filter.as_deref(), &args.sets, args.seed)?;
    let grid = args
        .grids
        .iter()
        .map(|g| sweep::Axis::parse(g))
        .collect::<enff::Result<Vec<_>>>()?;
    let ranges = args
        .ranges
        .iter()
        .map(|r| sweep::Range::parse(r))
        .collect::<enff::Result<Vec<_>>>()?;
    let plan = sweep::Sweep::new(
        &src.name,
        src.config.clone(),
        grid,
        args.random,
        ranges,
        args.seeds,
    )?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("sweep-{}", src.name)));
    let backend = AnyBackend::choose(args.backend, Some(plan.base()))?;
    let bar = ui.bar(0, "{spinner} run {pos}/{len} [{bar:30}] {msg} eta {eta}");
    let mut current = String::new();
    let outcome = on_backend!(&backend, b => sweep::run_sweep(&plan, &out, args.force, b, |ev| {
        match ev {
            sweep::Event::Begin { runs, done } => {
                bar.set_length(runs as u64);
                bar.set_position(done as u64);
                bar.reset_eta();
                if done > 0 {
                    log::info!("{}: {done} of {runs} runs already done, resuming", out.display());
                }
            }
            sweep::Event::RunStart { point, seed } => {
                current = point
                    .settings
                    .iter()
                    .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
                    .collect::<Vec<_>>()
                    .join(" ");
                current.push_str(&format!(" seed={seed}"));
                bar.set_message(current.clone());
            }
            sweep::Event::Cycle(m) => bar.set_message(format!("{current} rmse {:.4}", m.rmse)),
            sweep::Event::RunEnd(_) => bar.inc(1),
        }
        ControlFlow::Continue(())
    }))
    .with_context(|| format!("sweep in {}", out.display()))?;
    bar.finish_and_clear();
    let ranking = sweep::rank(&plan, &outcome.rows);
    sweep::write_ranking(&out, &plan, &ranking)?;
    if ui.json {
        let rows: Vec<serde_json::Value> = ranking
            .iter()
            .map(|p| {
                serde_json::json!({
                    "point": p.point.index,
                    "settings": p.point.settings.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                    "runs": p.runs,
                    "failed": p.failed,
                    "rmse_mean": p.rmse.0,
                    "rmse_std": p.rmse.1,
                    "spread_mean": p.spread.0,
                    "spread_std": p.spread.1,
                    "seconds_per_cycle": p.seconds_per_cycle,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "enff sweep: {} — {} points × {} seeds; {} runs now, {} already done",
        plan.name(),
        plan.points().len(),
        plan.seeds(),
        outcome.ran,
        outcome.skipped
    );
    let keys = plan.keys();
    let short: Vec<&str> = keys
        .iter()
        .map(|k| k.rsplit('.').next().unwrap_or(k))
        .collect();
    let mut header = format!("{:>4} ", "rank");
    for k in &short {
        header.push_str(&format!("{:>w$} ", k, w = k.len().max(10)));
    }
    header.push_str(&format!(
        "{:>20} {:>20} {:>6}",
        "rmse_mean", "spread_mean", "failed"
    ));
    println!("{header}");
    for (i, p) in ranking.iter().take(args.top).enumerate() {
        let mut line = format!("{:>4} ", i + 1);
        for (k, (_, v)) in short.iter().zip(&p.point.settings) {
            line.push_str(&format!("{:>w$} ", v, w = k.len().max(10)));
        }
        let pm = |(m, s): (f64, f64)| {
            if p.runs == 0 {
                "—".to_string()
            } else {
                format!("{m:.4} ± {s:.4}")
            }
        };
        line.push_str(&format!(
            "{:>20} {:>20} {:>6}",
            pm(p.rmse),
            pm(p.spread),
            format!("{}/{}", p.failed, p.failed + p.runs)
        ));
        println!("{line}");
    }
    if ranking.len() > args.top {
        println!("  … {} more in best.csv", ranking.len() - args.top);
    }
    println!("  results      {}", out.display());
    Ok(())
}

fn print_summary(report: &Report, out: &std::path::Path) {
    let s = &report.summary;
    println!("enff run: {} with {} on {}", s.preset, s.filter, s.backend);
    println!("  model        {}", s.model);
    println!("  observation  {} (m = {})", s.observation, s.m);
    println!(
        "  ensemble     n = {}, d = {}, cycles = {} (burn-in {})",
        s.n, s.d, s.cycles, s.burn_in
    );
    println!(
        "  filter       flow_steps = {}, sigma_min = {}, guidance_scale = {}",
        s.flow_steps, s.sigma_min, s.guidance_scale
    );
    let band = s
        .expected_rmse
        .map(|(a, b)| format!("  (expected {a:.3}–{b:.3})"))
        .unwrap_or_default();
    println!("  rmse         {:.4} mean after burn-in{band}", s.rmse_mean);
    println!("  spread       {:.4} mean after burn-in", s.spread_mean);
    println!("  rmse_last    {:.4}", s.rmse_last);
    println!(
        "  time         {:.2} s total, {:.4} s/cycle (forecast {:.2} s, analysis {:.2} s)",
        s.seconds_total, s.seconds_per_cycle, s.seconds_forecast, s.seconds_analysis
    );
    println!("  results      {}", out.display());
}

/// What a run records for its plots and snapshots.
fn trace_options(
    plots: &PlotArgs,
    save_every: Option<usize>,
    out: &std::path::Path,
) -> TraceOptions {
    TraceOptions {
        fields: !plots.no_plots,
        save_every,
        save_dir: out.join("ensembles"),
        ..TraceOptions::default()
    }
}

/// Writes a run's plots into its output folder unless --no-plots.
fn write_plots(
    plots: &PlotArgs,
    out: &std::path::Path,
    report: &Report,
    trace: &Trace,
) -> Result<()> {
    if plots.no_plots {
        return Ok(());
    }
    let written = enff::experiment::plots::write_run_plots(out, report, Some(trace))
        .with_context(|| format!("writing plots to {}", out.display()))?;
    log::debug!("wrote {} plot files", written.len());
    Ok(())
}

#[derive(clap::Args, Clone, Debug)]
struct AssimilateArgs {
    /// Forecast ensemble, shape (n, d): one row per member; float32 or float64.
    #[arg(long, value_name = "F.npy")]
    forecast: PathBuf,
    /// Observation, shape (m,) or (1, m), m = the operator's output size.
    #[arg(long, value_name = "Y.npy")]
    obs: PathBuf,
    /// Observation noise std (R = S^2 I).
    #[arg(long, value_name = "S")]
    obs_noise_std: f32,
    /// Previous analysis, shape (n, d), the source of EnFF-F2P (default: the forecast).
    #[arg(long, value_name = "A.npy")]
    previous: Option<PathBuf>,
    /// Observation operator applied to the observed components: identity, arctan or tanh.
    #[arg(long, default_value = "identity")]
    obs_op: String,
    /// Observe every K-th component (1 = all).
    #[arg(long, default_value_t = 1, value_name = "K")]
    obs_every: usize,
    /// First observed component.
    #[arg(long, default_value_t = 0)]
    obs_offset: usize,
    /// Filter: enff-f2p, enff-ot, ensf, etkf, enkf, letkf or bpf.
    #[arg(long, default_value = "enff-f2p")]
    filter: String,
    /// Filter setting, e.g. --set filter.sigma_min=0.05 --set filter.flow_steps=9.
    #[arg(long = "set", value_name = "filter.KEY=VALUE")]
    sets: Vec<String>,
    /// Seed of the filter's random numbers.
    #[arg(long)]
    seed: u64,
    /// Cycle number of this analysis; with the seed it picks the random numbers (count it
    /// up when you call assimilate once per cycle).
    #[arg(long, default_value_t = 1)]
    cycle: u32,
    /// Where the analysis ensemble goes, shape (n, d), in the forecast's dtype.
    #[arg(long, value_name = "OUT.npy")]
    out: PathBuf,
    /// Where the numbers live and the kernels run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Cpu)]
    backend: BackendChoice,
}

fn assimilate(args: AssimilateArgs) -> Result<()> {
    use enff::experiment::assimilate::{assimilate_files, AnalysisSpec, AssimilateFiles};
    let spec = AnalysisSpec {
        filter: args.filter.clone(),
        sets: args.sets.clone(),
        obs_noise_std: args.obs_noise_std,
        operator: enff::observe::Observe::parse_pointwise(&args.obs_op).context("--obs-op")?,
        obs_every: args.obs_every,
        obs_offset: args.obs_offset,
        seed: args.seed,
        cycle: args.cycle,
    };
    let files = AssimilateFiles {
        forecast: args.forecast.clone(),
        obs: args.obs.clone(),
        previous: args.previous.clone(),
        out: args.out.clone(),
    };
    let outcome = match args.backend {
        BackendChoice::Cpu => assimilate_files(&Cpu::new(), &files, &spec)?,
        BackendChoice::Gpu => {
            let gpu = Gpu::new(GpuOptions {
                allow_software: true,
                ..Default::default()
            })
            .context("--backend gpu")?;
            assimilate_files(&gpu, &files, &spec)?
        }
        BackendChoice::Auto => match Gpu::new(GpuOptions::default()) {
            Ok(gpu) => assimilate_files(&gpu, &files, &spec)?,
            Err(e) => {
                log::info!("no hardware GPU adapter ({e}); running on the CPU");
                assimilate_files(&Cpu::new(), &files, &spec)?
            }
        },
    };
    println!(
        "enff assimilate: {} analysis of n = {} members, d = {}, m = {} observations -> {} ({})",
        outcome.filter,
        outcome.n,
        outcome.d,
        outcome.m,
        args.out.display(),
        outcome.dtype.descr()
    );
    Ok(())
}
