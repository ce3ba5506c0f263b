//! `enff bench --cycles`: whole Lorenz-96 cycles (forecast and EnFF-F2P analysis) of the
//! `lorenz96_bao2024` preset at a given size, and the traffic model their rows are read against.

use crate::backend::Backend;
use crate::cycle::CycleMetrics;
use crate::error::Result;
use crate::experiment::{preset, Experiment, Summary};

/// Model steps per cycle of the preset (observations every 0.1 time units, dt = 0.01).
pub const STEPS_PER_CYCLE: usize = 10;

/// The sizes `(n, d)` of the cycle benchmark (`quick`: one small row).
pub fn cycle_grid(quick: bool) -> Vec<(usize, usize)> {
    if quick {
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
}

/// Bytes one cycle's forecast moves, as the GPU runs it, and the floor: the Runge–Kutta step as
/// five passes (four stages and the combination) over the state and the stage vectors counts
/// `20·4·n·d` bytes per model step; the floor is one read and one write of the ensemble
/// (`8·n·d` bytes) per step.
pub fn forecast_traffic(n: usize, d: usize) -> (f64, f64) {
    let steps = STEPS_PER_CYCLE as f64;
    let nd = (n * d) as f64;
    (20.0 * 4.0 * nd * steps, 8.0 * nd * steps)
}

/// A cycle's work in member-components (`n·d` per model step, `4·n²·d` per flow step), the
/// unit the benchmark estimates the time of a row with from the previous row's rate.
pub fn cycle_work(n: usize, d: usize, flow_steps: usize) -> f64 {
    (n * d) as f64 * (STEPS_PER_CYCLE as f64 + 4.0 * n as f64 * flow_steps as f64)
}

/// Runs `cycles` cycles of `lorenz96_bao2024` at `n` members and `d` components with
/// `flow_steps` flow steps on `backend` (spin-up 100 steps, no burn-in), calling `on_cycle`
/// after each; returns the run's summary (its forecast and analysis times).
pub fn cycle_row<B: Backend + 'static>(
    backend: &B,
    n: usize,
    d: usize,
    flow_steps: usize,
    cycles: usize,
    on_cycle: impl FnMut(&CycleMetrics),
) -> Result<Summary> {
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
    Ok(exp.run(backend, on_cycle)?.summary)
}
