//! The `enff` command: run twin experiments and benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

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
    /// Filter: enff-f2p or enff-ot (default: the preset's).
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
}

fn main() -> ExitCode {
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
        Some(Command::Presets) => presets(),
        Some(Command::Info) => info(),
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
    println!("gpu: not available in this build (the CPU backend runs everything)");
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
    let experiment = Experiment::new(p.name, config, Some(p.expected_rmse))?;
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(experiment.config())?);
        return Ok(());
    }
    match args.backend {
        BackendChoice::Gpu => anyhow::bail!(
            "--backend gpu: this build has no GPU backend; use --backend cpu (or auto)"
        ),
        BackendChoice::Auto => {
            if std::env::var("ENFF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                anyhow::bail!(
                    "ENFF_REQUIRE_GPU=1 but this build has no GPU backend; unset it or use --backend cpu"
                );
            }
            log::info!("no GPU backend in this build: running on the CPU");
        }
        BackendChoice::Cpu => {}
    }
    let backend = Cpu::new();
    let report = run_on(&backend, &experiment)?;
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("{}-{}", experiment.name(), report.summary.filter))
    });
    output::write_report(&out, &report)
        .with_context(|| format!("writing results to {}", out.display()))?;
    print_summary(&report, &out);
    Ok(())
}

fn run_on<B: Backend + 'static>(backend: &B, experiment: &Experiment) -> Result<Report> {
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
    let report = experiment.run(backend, |m| {
        bar.set_message(format!("{:.4}", m.rmse));
        bar.inc(1);
    });
    bar.finish_and_clear();
    Ok(report?)
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
