//! Several filters on the same truth, observations and initial ensemble (Lorenz-96, d = 40,
//! the `lorenz96_sakov2008` setting, shortened), with the RMSE/spread chart of all of them.
//!
//! ```sh
//! cargo run --release --example compare_filters
//! ```

use enff::backend::cpu::Cpu;
use enff::experiment::{plots, preset, Experiment};

fn main() -> anyhow::Result<()> {
    let p = preset("lorenz96_sakov2008")?;
    let cpu = Cpu::new();
    let mut curves = Vec::new();
    println!(
        "{:<9} {:>10} {:>12} {:>14}",
        "filter", "rmse_mean", "spread_mean", "ms/analysis"
    );
    for (filter, sets) in [
        ("enff-f2p", &[][..]),
        ("enff-ot", &[][..]),
        ("etkf", &["filter.inflation=1.02"][..]),
        ("letkf", &["filter.inflation=1.02"][..]),
        ("enkf", &["filter.inflation=1.05"][..]),
    ] {
        let mut config = p.config.clone();
        config.set(&format!("filter.kind={filter}"))?;
        config.set("experiment.cycles=300")?;
        config.set("experiment.burn_in=100")?;
        for s in sets {
            config.set(s)?;
        }
        let report = Experiment::new(p.name, config, None)?.run(&cpu, |_| {})?;
        let s = &report.summary;
        println!(
            "{filter:<9} {:>10.4} {:>12.4} {:>14.3}",
            s.rmse_mean,
            s.spread_mean,
            1e3 * s.seconds_analysis / s.cycles as f64
        );
        curves.push((filter.to_string(), report.metrics));
    }
    let dir = std::env::temp_dir().join("enff-compare-filters");
    let files = plots::write_compare_plot(&dir, "lorenz96_sakov2008, 300 cycles", &curves)?;
    for f in files {
        println!("chart: {}", f.display());
    }
    Ok(())
}
