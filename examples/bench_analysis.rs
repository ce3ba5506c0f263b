//! Times one EnFF-F2P analysis (9 flow steps) on the CPU backend over the benchmark grid.
//!
//! `cargo run --release --example bench_analysis [-- [quick] [reps=N] [NxD ...]]`

use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::bench::{bench_analysis, format_table, DEFAULT_FLOW_STEPS, DEFAULT_GRID, QUICK_GRID};
use enff::flow::PathKind;

fn main() -> anyhow::Result<()> {
    let mut grid: Vec<(usize, usize)> = DEFAULT_GRID.to_vec();
    let mut custom = Vec::new();
    let mut reps = 11;
    for a in std::env::args().skip(1) {
        if a == "quick" {
            grid = QUICK_GRID.to_vec();
        } else if let Some(r) = a.strip_prefix("reps=") {
            reps = r.parse()?;
        } else if let Some((n, d)) = a.split_once('x') {
            custom.push((n.parse()?, d.parse()?));
        } else {
            anyhow::bail!("unknown argument `{a}`: use quick, reps=N or NxD (e.g. 20x100000)");
        }
    }
    if !custom.is_empty() {
        grid = custom;
    }
    let cpu = Cpu::new();
    println!("{}", cpu.describe());
    let mut rows = Vec::new();
    for (n, d) in grid {
        rows.push(bench_analysis(
            &cpu,
            n,
            d,
            DEFAULT_FLOW_STEPS,
            PathKind::F2p,
            reps,
            2,
        )?);
    }
    print!("{}", format_table(&rows));
    Ok(())
}
