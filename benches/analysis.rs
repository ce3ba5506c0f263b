//! Criterion benches of one EnFF-F2P analysis (9 flow steps, σ_min = 0.01, λ = 0.05, arctan
//! observation) and of its two heavy kernels, on the CPU backend, over the grid of
//! `enff::bench::DEFAULT_GRID`. Names carry the backend: `cpu/enff_f2p_analysis/n20_d10000`,
//! `cpu/flow_logits/n20_d10000`, `cpu/flow_update/n20_d10000`. Throughput is the counted flops
//! (criterion prints them as elements/s, i.e. FLOP/s).
//!
//! `cargo bench --bench analysis` (about a minute); filter with e.g. `-- n20_d100000`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use enff::backend::cpu::Cpu;
use enff::backend::{Backend, DeviceBuffer, FlowUpdate, Guidance};
use enff::bench::{
    bench_config, flops_per_analysis, BenchProblem, BENCH_GUIDANCE_SCALE, BENCH_OBS_NOISE_STD,
    BENCH_SIGMA_MIN, DEFAULT_FLOW_STEPS, DEFAULT_GRID,
};
use enff::filter::{Enff, Filter, Observation};
use enff::flow::{Path, PathKind};
use enff::rng::{NoiseKey, Stream};

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
}

/// One full analysis per iteration; resetting the ensemble to the forecast is not timed.
fn analysis(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut group = c.benchmark_group(format!("{}/enff_f2p_analysis", cpu.name()));
    configure(&mut group);
    for (n, d) in DEFAULT_GRID {
        let mut problem = BenchProblem::new(&cpu, n, d).expect("bench problem");
        let mut filter =
            Enff::<Cpu>::new(bench_config(PathKind::F2p, DEFAULT_FLOW_STEPS)).expect("config");
        group.throughput(Throughput::Elements(
            flops_per_analysis(n, d, DEFAULT_FLOW_STEPS) as u64,
        ));
        let mut cycle = 0u32;
        group.bench_function(format!("n{n}_d{d}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    cpu.copy(&problem.forecast, &mut problem.ensemble)
                        .expect("reset");
                    let obs = Observation {
                        y: &problem.y,
                        operator: &problem.operator,
                        noise_std: BENCH_OBS_NOISE_STD,
                    };
                    cycle = cycle.wrapping_add(1);
                    let start = Instant::now();
                    filter
                        .analyse(
                            &cpu,
                            &mut problem.ensemble,
                            Some(&problem.previous),
                            &obs,
                            cycle,
                        )
                        .expect("analysis");
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

/// The state at the start of an F2P flow (`x_prev + σ_min ε`) and the weights of its first step.
fn flow_inputs(
    cpu: &Cpu,
    problem: &BenchProblem<Cpu>,
) -> (<Cpu as Backend>::Buffer, <Cpu as Backend>::Buffer) {
    let (n, d) = (problem.forecast.rows(), problem.forecast.cols());
    let mut x = cpu.zeros(n, d).expect("state");
    let key = NoiseKey::new(7, Stream::FlowSource, 1);
    cpu.fill_normal(&mut x, key, Some(&problem.previous), BENCH_SIGMA_MIN)
        .expect("source sample");
    let mut w = cpu.zeros(n, n).expect("weights");
    let path = Path::new(PathKind::F2p, BENCH_SIGMA_MIN).expect("path");
    cpu.flow_logits(
        &x,
        &problem.forecast,
        Some(&problem.previous),
        path.at(1.0 / 9.0),
        None,
        &mut w,
    )
    .expect("logits");
    cpu.softmax_rows(&mut w).expect("softmax");
    (x, w)
}

/// The pairwise log-weights kernel alone (`3·n²·d` counted flops), computed from scratch.
fn flow_logits(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut group = c.benchmark_group(format!("{}/flow_logits", cpu.name()));
    configure(&mut group);
    let path = Path::new(PathKind::F2p, BENCH_SIGMA_MIN).expect("path");
    for (n, d) in DEFAULT_GRID {
        let problem = BenchProblem::new(&cpu, n, d).expect("bench problem");
        let (x, mut logits) = flow_inputs(&cpu, &problem);
        group.throughput(Throughput::Elements((3 * n * n * d) as u64));
        group.bench_function(format!("n{n}_d{d}"), |b| {
            b.iter(|| {
                cpu.flow_logits(
                    &x,
                    &problem.forecast,
                    Some(&problem.previous),
                    path.at(1.0 / 9.0),
                    None,
                    &mut logits,
                )
                .expect("logits");
                black_box(&logits);
            })
        });
    }
    group.finish();
}

/// The fused velocity + arctan guidance + Euler update (`2·n²·d` counted flops). It includes
/// the pairwise distances of the next step, which the CPU backend fuses into the update.
fn flow_update(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut group = c.benchmark_group(format!("{}/flow_update", cpu.name()));
    configure(&mut group);
    let path = Path::new(PathKind::F2p, BENCH_SIGMA_MIN).expect("path");
    let t = 1.0 / 9.0;
    for (n, d) in DEFAULT_GRID {
        let problem = BenchProblem::new(&cpu, n, d).expect("bench problem");
        let (mut x, w) = flow_inputs(&cpu, &problem);
        let scale = BENCH_GUIDANCE_SCALE / (BENCH_OBS_NOISE_STD * BENCH_OBS_NOISE_STD);
        group.throughput(Throughput::Elements((2 * n * n * d) as u64));
        group.bench_function(format!("n{n}_d{d}"), |b| {
            b.iter(|| {
                let update = FlowUpdate {
                    eval: None,
                    weights: &w,
                    target: &problem.forecast,
                    source: Some(&problem.previous),
                    path: path.at(t),
                    guidance: Some(Guidance {
                        operator: &problem.operator,
                        y: &problem.y,
                        scale,
                        horizon: 1.0 - t,
                    }),
                    h_new: t,
                    previous: None,
                    clamp: None,
                };
                cpu.flow_update(&mut x, &update, None).expect("update");
                black_box(&x);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, analysis, flow_logits, flow_update);
criterion_main!(benches);
