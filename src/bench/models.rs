//! Forecast throughput of the grid models (`enff bench --models`): model steps per second of a
//! whole ensemble for Kuramoto–Sivashinsky (d = 1024, n ∈ {20, 100}) and Navier–Stokes (64²
//! and 256², n = 20) on the CPU and, when given, the GPU in one run, plus whole cycles
//! (forecast + EnFF analysis) of the `ks_1024` and `ns_64` presets.
//!
//! A timed forecast is `backend.advance(model, ensemble, steps)` followed by `backend.sync()`
//! (which waits for the device), after one warm-up step that allocates every table and scratch
//! buffer. The ensemble starts on the model's attractor neighbourhood (KS: the reference
//! initial condition plus small noise; NS: the Gaussian-process initial condition), so the
//! timings see realistic values (no denormals, no blow-up).

use std::time::Instant;

use crate::backend::cpu::Cpu;
use crate::backend::gpu::Gpu;
use crate::backend::Backend;
use crate::error::Result;
use crate::experiment::{preset, Experiment};
use crate::model::ns::GP_LENGTH_SCALE;
use crate::model::{KuramotoSivashinsky, Model, NavierStokes2d, Scheme, System};
use crate::rng::{self, NoiseKey, Stream};

/// One timed forecast configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelBench {
    /// Backend name.
    pub backend: String,
    /// Model name.
    pub model: String,
    /// Ensemble size.
    pub n: usize,
    /// State dimension.
    pub d: usize,
    /// Model steps per timed forecast.
    pub steps: usize,
    /// Median seconds of one model step of the whole ensemble.
    pub seconds_per_step: f64,
}

impl ModelBench {
    /// Model steps of the whole ensemble per second.
    pub fn steps_per_second(&self) -> f64 {
        1.0 / self.seconds_per_step.max(1e-12)
    }
}

/// The grid-model forecasts timed by default, `(model, n)`; `quick` leaves out NS 256².
pub fn default_cases(quick: bool) -> Result<Vec<(Model, usize)>> {
    let ks = |d: usize| -> Result<Model> {
        Model::new(
            System::KuramotoSivashinsky(KuramotoSivashinsky::paper(d, 0.25)?),
            0.25,
            Scheme::Rk4ThreeEighths,
        )
    };
    let ns = |n: usize, dt: f32| -> Result<Model> {
        Model::new(
            System::NavierStokes2d(NavierStokes2d::paper(
                n,
                dt,
                NavierStokes2d::FORCING_AMPLITUDE,
            )?),
            dt,
            Scheme::Rk4ThreeEighths,
        )
    };
    let mut cases = vec![(ks(1024)?, 20), (ks(1024)?, 100), (ns(64, 1e-3)?, 20)];
    if !quick {
        cases.push((ns(256, 1e-4)?, 20));
    }
    Ok(cases)
}

/// A short name of a grid model: `KS d=1024`, `NS 64x64 dt=0.001`.
pub fn label(model: &Model) -> String {
    match &model.system {
        System::KuramotoSivashinsky(k) => format!("KS d={} dt={}", k.d(), k.dt()),
        System::NavierStokes2d(n) => format!("NS {0}x{0} dt={1}", n.n(), n.dt()),
        _ => model.name(),
    }
}

/// `n` initial states of `model` (row-major).
fn initial_states(model: &Model, n: usize) -> Result<Vec<f32>> {
    let d = model.dim();
    let mut noise = vec![0.0f32; n * d];
    rng::fill_normal_row(&NoiseKey::new(11, Stream::User, 0), 0, &mut noise);
    Ok(match &model.system {
        System::KuramotoSivashinsky(ks) => {
            let base = ks.reference_initial_condition()?;
            (0..n * d).map(|k| base[k % d] + 0.1 * noise[k]).collect()
        }
        System::NavierStokes2d(ns) => {
            let nn = ns.n() * ns.n();
            let base =
                ns.gaussian_process_initial_condition(&noise[..2 * nn], GP_LENGTH_SCALE, 1.0)?;
            (0..n * d).map(|k| base[k % d] + 0.01 * noise[k]).collect()
        }
        _ => noise,
    })
}

/// Times `reps` forecasts of `steps` model steps of `n` members on `backend` (median).
pub fn bench_forecast<B: Backend>(
    backend: &B,
    model: &Model,
    n: usize,
    steps: usize,
    reps: usize,
) -> Result<ModelBench> {
    let d = model.dim();
    let x0 = initial_states(model, n)?;
    let mut x = backend.upload(n, d, &x0)?;
    backend.advance(model, &mut x, 1)?;
    backend.sync()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        backend.write(&mut x, &x0)?;
        backend.sync()?;
        let t = Instant::now();
        backend.advance(model, &mut x, steps)?;
        backend.sync()?;
        times.push(t.elapsed().as_secs_f64() / steps as f64);
    }
    backend.check_finite(&x, "benchmark forecast")?;
    backend.sync()?;
    times.sort_by(f64::total_cmp);
    Ok(ModelBench {
        backend: backend.name().to_string(),
        model: label(model),
        n,
        d,
        steps,
        seconds_per_step: times[times.len() / 2],
    })
}

/// Steps per timed forecast: about 0.3 s of CPU work at the rates measured on two cores.
fn steps_for(model: &Model, n: usize, quick: bool) -> usize {
    let work = (model.dim() * n) as f64
        * match model.system {
            System::NavierStokes2d(_) => 100.0,
            _ => 20.0,
        };
    let steps = (3e7 / work).round().clamp(1.0, 100.0) as usize;
    if quick {
        steps.div_ceil(4)
    } else {
        steps
    }
}

/// Times the grid-model forecasts and preset cycles on the CPU and (when given) the GPU, and
/// prints the tables of `BENCHMARKS.md`.
pub fn run(cpu: &Cpu, gpu: Option<&Gpu>, quick: bool, reps: usize) -> Result<()> {
    println!("enff bench --models: grid-model forecasts, whole ensemble per model step");
    println!("  cpu: {}", cpu.describe());
    if let Some(g) = gpu {
        println!("  gpu: {}", g.adapter().line());
        if g.adapter().is_software {
            println!("  NOTE: software adapter: GPU figures check correctness only, not speed");
        }
    }
    println!(
        "{:<5} {:<22} {:>4} {:>7} {:>6} {:>12} {:>10}",
        "back", "model", "n", "d", "steps", "ms/step", "steps/s"
    );
    for (model, n) in default_cases(quick)? {
        let steps = steps_for(&model, n, quick);
        let mut rows = vec![bench_forecast(cpu, &model, n, steps, reps)?];
        if let Some(g) = gpu {
            rows.push(bench_forecast(g, &model, n, steps, reps)?);
        }
        for r in &rows {
            println!(
                "{:<5} {:<22} {:>4} {:>7} {:>6} {:>12.3} {:>10.1}",
                r.backend,
                r.model,
                r.n,
                r.d,
                r.steps,
                r.seconds_per_step * 1e3,
                r.steps_per_second()
            );
        }
        if rows.len() == 2 {
            println!(
                "      GPU/CPU forecast speed-up: {:.2}x",
                rows[0].seconds_per_step / rows[1].seconds_per_step
            );
        }
    }
    let cycles = if quick { 3 } else { 10 };
    println!(
        "full cycles: forecast + EnFF-F2P analysis per cycle (mean of {cycles} cycles; the \
         preset's observation interval and flow steps)"
    );
    println!(
        "{:<5} {:<8} {:>4} {:>7} {:>12} {:>12} {:>12}",
        "back", "preset", "n", "d", "fc+an s", "forecast s", "analysis s"
    );
    for name in ["ks_1024", "ns_64"] {
        let mut cfg = preset(name)?.config;
        for s in [
            format!("experiment.cycles={cycles}"),
            "experiment.burn_in=0".into(),
            "experiment.spinup=10".into(),
        ] {
            cfg.set(&s)?;
        }
        let exp = Experiment::new(name, cfg, None)?;
        let mut rows = vec![("cpu", exp.run(cpu, |_| {})?.summary)];
        if let Some(g) = gpu {
            rows.push(("gpu", exp.run(g, |_| {})?.summary));
        }
        for (b, s) in &rows {
            let per = |t: f64| t / s.cycles as f64;
            println!(
                "{:<5} {:<8} {:>4} {:>7} {:>12.4} {:>12.4} {:>12.4}",
                b,
                name,
                s.n,
                s.d,
                per(s.seconds_forecast + s.seconds_analysis),
                per(s.seconds_forecast),
                per(s.seconds_analysis)
            );
        }
    }
    Ok(())
}
