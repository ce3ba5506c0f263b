//! A Lorenz-96 twin experiment driven from Rust: build a preset, change it, run it, read the
//! per-cycle metrics.
//!
//! ```sh
//! cargo run --release --example lorenz96_twin
//! ```

use enff::backend::cpu::Cpu;
use enff::experiment::{preset, Experiment};

fn main() -> anyhow::Result<()> {
    let p = preset("lorenz96_bao2024")?;
    let mut config = p.config.clone();
    config.set("model.d=2000")?;
    config.set("filter.integrator=heun")?;
    config.set("filter.flow_steps=9")?;
    let experiment = Experiment::new(p.name, config, Some(p.expected_rmse))?;
    let backend = Cpu::new();
    let report = experiment.run(&backend, |m| {
        if m.cycle % 10 == 0 {
            println!(
                "cycle {:3}  rmse forecast {:.4}  analysis {:.4}  spread {:.4}",
                m.cycle, m.rmse_forecast, m.rmse, m.spread
            );
        }
    })?;
    let s = &report.summary;
    println!(
        "time-mean rmse after burn-in: {:.4} (expected {:.2}-{:.2}), {:.3} s per cycle",
        s.rmse_mean, p.expected_rmse.0, p.expected_rmse.1, s.seconds_per_cycle
    );
    Ok(())
}
