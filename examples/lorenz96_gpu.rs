//! A Lorenz-96 twin experiment on the GPU when a hardware adapter is found, else on the CPU
//! (the log line says which). The preset `lorenz96_bao2024` with d = 2000 and 60 cycles.
//!
//! ```sh
//! cargo run --release --example lorenz96_gpu
//! ```

use enff::backend::gpu::{Gpu, GpuOptions};
use enff::backend::{cpu::Cpu, Backend};
use enff::experiment::{preset, Experiment, Report};

fn run<B: Backend + 'static>(backend: &B, experiment: &Experiment) -> enff::Result<Report> {
    experiment.run(backend, |m| {
        if m.cycle % 10 == 0 {
            println!(
                "cycle {:3}  rmse {:.4}  spread {:.4}  ({:.1} ms forecast, {:.1} ms analysis)",
                m.cycle,
                m.rmse,
                m.spread,
                1e3 * m.seconds_forecast,
                1e3 * m.seconds_analysis
            );
        }
    })
}

fn main() -> anyhow::Result<()> {
    // Mesa's device-select layer complains about XDG_RUNTIME_DIR in headless sessions.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let p = preset("lorenz96_bao2024")?;
    let mut config = p.config.clone();
    config.set("model.d=2000")?;
    config.set("experiment.cycles=60")?;
    config.set("experiment.burn_in=30")?;
    let experiment = Experiment::new(p.name, config, None)?;
    let report = match Gpu::new(GpuOptions::default()) {
        Ok(gpu) => {
            println!("backend: GPU, {}", gpu.describe());
            run(&gpu, &experiment)?
        }
        Err(e) => {
            println!("backend: CPU, no hardware GPU adapter ({e})");
            println!("         {}", Cpu::new().describe());
            run(&Cpu::new(), &experiment)?
        }
    };
    let s = &report.summary;
    println!(
        "{} on {}: time-mean rmse {:.4}, spread {:.4} over cycles {}-{}, {:.4} s per cycle",
        s.filter,
        s.backend,
        s.rmse_mean,
        s.spread_mean,
        s.burn_in + 1,
        s.cycles,
        s.seconds_per_cycle
    );
    Ok(())
}
