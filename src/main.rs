//! The `enff` command: run twin experiments and benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use enff::backend::gpu::{Gpu, GpuOptions};
use enff::backend::{cpu::Cpu, Backend};
use enff::experiment::{output, preset, Experiment, Report, DEFAULT_PRESET, PRESETS};

#[derive(Parser)]
#[command(
    name = "enff",
    version,
    about = "Ensemble Flow Filter data assimilation: twin experiments and benchmarks",
    long_about = "Runs data-assimilation twin experiments with the Ensemble Flow Filter \
                  (EnFF). With no command, runs the default preset (lorenz96_bao2024)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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

#[derive(clap::Args, Clone, Debug)]
struct RunArgs {
    /// Preset to run (see `enff presets`).
    #[arg(default_value = DEFAULT_PRESET)]
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
    /// Output folder for summary.json and metrics.csv (default: runs/<preset>-<filter>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the configuration that would run, validated, and exit.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a twin experiment and write summary.json and metrics.csv.
    Run(RunArgs),
    /// List the presets with their expected RMSE.
    Presets,
    /// Show the backends this build can use.
    Info,
    /// Time one EnFF analysis over a grid of ensemble sizes and state dimensions.
    Bench(BenchArgs),
    /// Run several filters on identical truth, observations and initial ensemble, and
    /// tabulate their skill and cost (also written as compare.csv and compare.md).
    Compare(CompareArgs),
}

#[derive(clap::Args, Clone, Debug)]
struct CompareArgs {
    /// Preset to run.
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
    /// Output folder (default: runs/compare-<preset>).
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Time baseline-filter analyses instead (comma-separated: letkf, letkf-batched, enkf, etkf)
    /// over d ∈ {1e3, 1e4, 1e5}, n = 20 (or the --size grid).
    #[arg(long, value_delimiter = ',')]
    filters: Vec<String>,
}

fn main() -> ExitCode {
    // Mesa's device-select layer prints "XDG_RUNTIME_DIR is invalid" on every Vulkan instance
    // in headless sessions; it selects nothing enff needs.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(RunArgs {
            preset: DEFAULT_PRESET.into(),
            filter: None,
            sets: Vec::new(),
            backend: BackendChoice::Auto,
            seed: None,
            out: None,
            dry_run: false,
        }),
        Some(Command::Run(args)) => run(args),
        Some(Command::Compare(args)) => compare(args),
        Some(Command::Presets) => presets(),
        Some(Command::Info) => info(),
        Some(Command::Bench(args)) => bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn presets() -> Result<()> {
    for name in PRESETS {
        let p = preset(name)?;
        println!("{name}\n    {}", p.description);
        println!(
            "    expected rmse {:.3}–{:.3} ({})",
            p.expected_rmse.0, p.expected_rmse.1, p.expected_source
        );
    }
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

fn bench(args: BenchArgs) -> Result<()> {
    let path = match args.path.as_str() {
        "f2p" => enff::flow::PathKind::F2p,
        "ot" => enff::flow::PathKind::Ot,
        other => anyhow::bail!("--path {other}: use f2p or ot"),
    };
    let grid: Vec<(usize, usize)> = if !args.sizes.is_empty() {
        args.sizes
            .iter()
            .map(|s| {
                let (n, d) = s
                    .split_once('x')
                    .with_context(|| format!("--size {s}: write NxD, e.g. 20x10000"))?;
                Ok((
                    n.trim()
                        .parse()
                        .with_context(|| format!("--size {s}: bad N"))?,
                    parse_count(d).with_context(|| format!("--size {s}: bad D"))?,
                ))
            })
            .collect::<Result<_>>()?
    } else if args.quick {
        enff::bench::QUICK_GRID.to_vec()
    } else {
        enff::bench::DEFAULT_GRID.to_vec()
    };
    let grid = if args.cycles && args.sizes.is_empty() {
        if args.quick {
            vec![(20, 10_000)]
        } else {
            vec![
                (20, 10_000),
                (100, 10_000),
                (20, 100_000),
                (100, 100_000),
                (20, 1_000_000),
                (100, 1_000_000),
            ]
        }
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
    if args.cycles {
        return bench_cycles(&args, &grid, &cpu, gpu.as_ref(), run_cpu);
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
    for (n, d) in grid {
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
    }
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
fn cycle_row<B: Backend + 'static>(
    backend: &B,
    n: usize,
    d: usize,
    flow_steps: usize,
    cycles: usize,
) -> Result<enff::experiment::Summary> {
    let p = preset("lorenz96_bao2024")?;
    let mut cfg = p.config.clone();
    for s in [
        format!("model.d={d}"),
        format!("ensemble.n={n}"),
        format!("filter.flow_steps={flow_steps}"),
        format!("experiment.cycles={cycles}"),
        "experiment.burn_in=0".into(),
        "experiment.spinup=100".into(),
    ] {
        cfg.set(&s)?;
    }
    let exp = Experiment::new(p.name, cfg, None)?;
    Ok(exp.run(backend, |_| {})?.summary)
}

fn bench_cycles(
    args: &BenchArgs,
    grid: &[(usize, usize)],
    cpu: &Cpu,
    gpu: Option<&Gpu>,
    run_cpu: bool,
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
    for &(n, d) in grid {
        // RK4 as five passes (4 stages + combine) over x and the stage vectors: 20 n·d floats
        // moved per model step; the floor is one read and one write of the ensemble (8 n·d B).
        let steps = 10.0;
        let moved = 20.0 * 4.0 * (n * d) as f64 * steps;
        let floor = 8.0 * (n * d) as f64 * steps;
        let mut rows: Vec<(&str, enff::experiment::Summary)> = Vec::new();
        if run_cpu {
            let est = (n * d) as f64 * (steps + 4.0 * n as f64 * args.flow_steps as f64) / cpu_rate
                * cycles as f64;
            if est > args.cpu_budget * cycles as f64 {
                println!("cpu   {n:>5} {d:>9}  skipped: estimated {est:.0} s (--cpu-budget)");
            } else {
                let s = cycle_row(cpu, n, d, args.flow_steps, cycles)?;
                cpu_rate = (n * d) as f64 * (steps + 4.0 * n as f64 * args.flow_steps as f64)
                    / s.seconds_per_cycle.max(1e-9);
                rows.push(("cpu", s));
            }
        }
        if let Some(g) = gpu {
            match cycle_row(g, n, d, args.flow_steps, cycles) {
                Ok(s) => rows.push(("gpu", s)),
                Err(e) => println!("gpu   {n:>5} {d:>9}  does not fit: {e:#}"),
            }
        }
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
    }
    println!(
        "  *: forecast traffic counted as 20·4·n·d bytes per model step (four RK stages and the \
         combination as separate passes, as the GPU runs them); floor = one read and one write \
         of the ensemble per step (8·n·d bytes), per cycle."
    );
    Ok(())
}

/// Parses counts such as `10000`, `1e5` or `1_000_000`.
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

fn compare(args: CompareArgs) -> Result<()> {
    let p = preset(&args.preset)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("compare-{}", p.name)));
    // Build and validate every configuration before running anything.
    let mut experiments = Vec::new();
    for f in &args.filters {
        let mut config = p.config.clone();
        config.set(&format!("filter.kind={f}"))?;
        if f == "kf" {
            config.set("ensemble.n=1")?;
        }
        for s in &args.sets {
            match s.split_once(':') {
                Some((only, rest)) if !only.contains('=') => {
                    if only == f {
                        config.set(rest)?;
                    }
                }
                _ => config.set(s)?,
            }
        }
        if let Some(seed) = args.seed {
            config.experiment.seed = seed;
        }
        let expected = (config.filter == p.config.filter).then_some(p.expected_rmse);
        experiments.push((f.clone(), Experiment::new(p.name, config, expected)?));
    }
    let gpu = match args.backend {
        BackendChoice::Cpu => None,
        BackendChoice::Gpu => Some(Gpu::new(GpuOptions {
            allow_software: true,
            ..Default::default()
        })?),
        BackendChoice::Auto => match Gpu::new(GpuOptions::default()) {
            Ok(g) => Some(g),
            Err(e) => {
                if std::env::var("ENFF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    anyhow::bail!("ENFF_REQUIRE_GPU=1 and no hardware GPU: {e}");
                }
                log::info!("no hardware GPU adapter ({e}); running on the CPU");
                None
            }
        },
    };
    let mut rows = Vec::new();
    for (f, exp) in &experiments {
        let dir = out.join(f);
        let report = match &gpu {
            Some(g) => run_on(g, exp, &dir),
            None => run_on(&Cpu::new(), exp, &dir),
        };
        match report {
            Ok(r) => {
                output::write_report(&dir, &r)?;
                rows.push((f.clone(), Some(r.summary), String::new()));
            }
            Err(e) => rows.push((f.clone(), None, format!("{e:#}"))),
        }
    }
    let mut md = String::from(
        "| filter | rmse_mean | spread_mean | s/analysis | s/cycle |\n|---|---|---|---|---|\n",
    );
    let mut csv =
        String::from("filter,rmse_mean,spread_mean,seconds_per_analysis,seconds_per_cycle,error\n");
    println!(
        "enff compare: {} ({} cycles, burn-in {}, seed {})",
        p.name,
        experiments[0].1.config().experiment.cycles,
        experiments[0].1.config().experiment.burn_in,
        experiments[0].1.config().experiment.seed
    );
    println!(
        "{:<10} {:>10} {:>12} {:>12} {:>10}",
        "filter", "rmse_mean", "spread_mean", "s/analysis", "s/cycle"
    );
    for (f, s, err) in &rows {
        match s {
            Some(s) => {
                let per = s.seconds_analysis / s.cycles as f64;
                println!(
                    "{f:<10} {:>10.4} {:>12.4} {:>12.5} {:>10.5}",
                    s.rmse_mean, s.spread_mean, per, s.seconds_per_cycle
                );
                md.push_str(&format!(
                    "| {f} | {:.4} | {:.4} | {:.5} | {:.5} |\n",
                    s.rmse_mean, s.spread_mean, per, s.seconds_per_cycle
                ));
                csv.push_str(&format!(
                    "{f},{},{},{},{},\n",
                    s.rmse_mean, s.spread_mean, per, s.seconds_per_cycle
                ));
            }
            None => {
                let short = err.lines().next().unwrap_or("").replace(',', ";");
                println!("{f:<10} failed: {short}");
                md.push_str(&format!("| {f} | failed: {short} | | | |\n"));
                csv.push_str(&format!("{f},,,,,{short}\n"));
            }
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    output::write_atomic(&out.join("compare.csv"), csv.as_bytes())?;
    output::write_atomic(&out.join("compare.md"), md.as_bytes())?;
    println!("  results      {}", out.display());
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    let p = preset(&args.preset)?;
    let mut config = p.config.clone();
    if let Some(f) = &args.filter {
        config.set(&format!("filter.kind={f}"))?;
    }
    for s in &args.sets {
        config.set(s)?;
    }
    if let Some(seed) = args.seed {
        config.experiment.seed = seed;
    }
    // The preset's expected RMSE belongs to its own filter settings.
    let expected = (config.filter == p.config.filter).then_some(p.expected_rmse);
    let experiment = Experiment::new(p.name, config, expected)?;
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(experiment.config())?);
        let est = experiment.memory_estimate();
        println!(
            "memory estimate: {:.3} GiB ({:.4} GiB per member)",
            est.total as f64 / (1u64 << 30) as f64,
            est.per_member as f64 / (1u64 << 30) as f64
        );
        for (name, b) in &est.parts {
            println!("  {name:<32} {:>10.1} MiB", *b as f64 / (1u64 << 20) as f64);
        }
        return Ok(());
    }
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-{}",
            experiment.name(),
            experiment.config().filter.kind
        ))
    });
    // The grid models (KS, NS) have no GPU kernels yet: `auto` runs them on the CPU.
    let cpu_only = matches!(
        experiment.config().model.system,
        enff::experiment::config::SystemKind::Ks | enff::experiment::config::SystemKind::Ns
    );
    let backend = if cpu_only && args.backend == BackendChoice::Auto {
        log::info!("this model has no GPU kernels yet: running on the CPU");
        BackendChoice::Cpu
    } else {
        args.backend
    };
    let report = match backend {
        BackendChoice::Cpu => run_on(&Cpu::new(), &experiment, &out)?,
        BackendChoice::Gpu => {
            let gpu = Gpu::new(GpuOptions {
                allow_software: true,
                ..Default::default()
            })
            .context("--backend gpu")?;
            run_on(&gpu, &experiment, &out)?
        }
        BackendChoice::Auto => match Gpu::new(GpuOptions::default()) {
            Ok(gpu) => {
                log::info!("running on the GPU: {}", gpu.describe());
                run_on(&gpu, &experiment, &out)?
            }
            Err(e) => {
                if std::env::var("ENFF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    anyhow::bail!("ENFF_REQUIRE_GPU=1 and no hardware GPU: {e}");
                }
                log::info!("no hardware GPU adapter ({e}); running on the CPU");
                run_on(&Cpu::new(), &experiment, &out)?
            }
        },
    };
    output::write_report(&out, &report)
        .with_context(|| format!("writing results to {}", out.display()))?;
    print_summary(&report, &out);
    Ok(())
}

fn run_on<B: Backend + 'static>(
    backend: &B,
    experiment: &Experiment,
    out: &std::path::Path,
) -> Result<Report> {
    let cycles = experiment.config().experiment.cycles as u64;
    let bar = ProgressBar::new(cycles);
    bar.set_style(
        ProgressStyle::with_template("{spinner} cycle {pos}/{len} [{bar:30}] rmse {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    log::info!(
        "{}: n={} d={} on {}",
        experiment.name(),
        experiment.config().ensemble.n,
        experiment.config().state_dim(),
        backend.describe()
    );
    let mut rows = Vec::with_capacity(cycles as usize);
    let report = experiment.run(backend, |m| {
        bar.set_message(format!("{:.4}", m.rmse));
        bar.inc(1);
        rows.push(m.clone());
    });
    bar.finish_and_clear();
    match report {
        Ok(r) => Ok(r),
        Err(e @ enff::Error::Diverged { .. }) => {
            // Keep what was measured before the blow-up.
            output::write_metrics(out, &rows)
                .with_context(|| format!("writing partial metrics to {}", out.display()))?;
            Err(anyhow::Error::new(e).context(format!(
                "the metrics of the {} completed cycles are in {}",
                rows.len(),
                out.join("metrics.csv").display()
            )))
        }
        Err(e) => Err(e.into()),
    }
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
