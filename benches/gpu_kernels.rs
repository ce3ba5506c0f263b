//! Criterion benches of the GPU kernels (one flow step's pairwise log-weights, softmax and
//! fused update, the Philox noise, and a whole EnFF-F2P analysis), named with the backend:
//! `gpu/flow_logits/n20_d1000000` …. Each iteration ends with `sync`, so the time is the
//! device's. Without a hardware adapter the benches are skipped with a message; set
//! `ENFF_BENCH_SOFTWARE=1` to time a software adapter anyway (correctness only: lavapipe is
//! slower than the CPU path).
//!
//! `cargo bench --bench gpu_kernels`; filter with e.g. `-- n20_d1000000`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use enff::backend::gpu::{Gpu, GpuOptions};
use enff::backend::{Backend, FlowUpdate, Guidance};
use enff::bench::{
    bench_config, BenchProblem, BENCH_GUIDANCE_SCALE, BENCH_OBS_NOISE_STD, BENCH_SIGMA_MIN,
    DEFAULT_FLOW_STEPS,
};
use enff::filter::{Enff, Filter, Observation};
use enff::flow::{Path, PathKind};
use enff::rng::{NoiseKey, Stream};

const GRID: [(usize, usize); 4] = [
    (20, 10_000),
    (20, 1_000_000),
    (100, 100_000),
    (1000, 100_000),
];

fn open() -> Option<Gpu> {
    let allow_software = std::env::var("ENFF_BENCH_SOFTWARE").is_ok_and(|v| v == "1");
    match Gpu::new(GpuOptions {
        allow_software,
        ..Default::default()
    }) {
        Ok(g) => {
            eprintln!("GPU benches on {}", g.adapter().line());
            Some(g)
        }
        Err(e) => {
            eprintln!("SKIPPING GPU benches: {e}");
            None
        }
    }
}

fn kernels(c: &mut Criterion) {
    let Some(gpu) = open() else { return };
    let path = Path::new(PathKind::F2p, BENCH_SIGMA_MIN).expect("path");
    let t = 1.0 / 9.0;
    let scale = BENCH_GUIDANCE_SCALE / (BENCH_OBS_NOISE_STD * BENCH_OBS_NOISE_STD);
    let mut group = c.benchmark_group("gpu");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (n, d) in GRID {
        let mut problem = match BenchProblem::new(&gpu, n, d) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("gpu n={n} d={d}: skipped ({e})");
                continue;
            }
        };
        let mut x = gpu.zeros(n, d).expect("state");
        gpu.fill_normal(
            &mut x,
            NoiseKey::new(7, Stream::FlowSource, 1),
            Some(&problem.previous),
            BENCH_SIGMA_MIN,
        )
        .expect("noise");
        let mut w = gpu.zeros(n, n).expect("weights");
        let label = format!("n{n}_d{d}");
        group.throughput(Throughput::Elements((3 * n * n * d) as u64));
        group.bench_function(format!("flow_logits/{label}"), |b| {
            b.iter(|| {
                gpu.flow_logits(
                    &x,
                    &problem.forecast,
                    Some(&problem.previous),
                    path.at(t),
                    None,
                    &mut w,
                )
                .expect("logits");
                gpu.sync().expect("sync");
            })
        });
        group.throughput(Throughput::Elements((n * n) as u64));
        group.bench_function(format!("softmax_rows/{label}"), |b| {
            b.iter(|| {
                gpu.flow_logits(
                    &x,
                    &problem.forecast,
                    Some(&problem.previous),
                    path.at(t),
                    None,
                    &mut w,
                )
                .expect("logits");
                gpu.softmax_rows(&mut w).expect("softmax");
                gpu.sync().expect("sync");
            })
        });
        group.throughput(Throughput::Elements((2 * n * n * d) as u64));
        group.bench_function(format!("flow_update/{label}"), |b| {
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
                    h_new: 1e-6,
                    previous: None,
                    clamp: None,
                };
                gpu.flow_update(&mut x, &update, None).expect("update");
                gpu.sync().expect("sync");
            })
        });
        group.throughput(Throughput::Elements((n * d) as u64));
        group.bench_function(format!("fill_normal/{label}"), |b| {
            b.iter(|| {
                gpu.fill_normal(&mut x, NoiseKey::new(7, Stream::FlowSource, 2), None, 1.0)
                    .expect("noise");
                gpu.sync().expect("sync");
            })
        });
        let mut filter =
            Enff::<Gpu>::new(bench_config(PathKind::F2p, DEFAULT_FLOW_STEPS)).expect("config");
        let mut cycle = 0u32;
        group.throughput(Throughput::Elements(enff::bench::flops_per_analysis(
            n,
            d,
            DEFAULT_FLOW_STEPS,
        ) as u64));
        group.bench_function(format!("enff_f2p_analysis/{label}"), |b| {
            b.iter(|| {
                gpu.copy(&problem.forecast, &mut problem.ensemble)
                    .expect("reset");
                let obs = Observation {
                    y: &problem.y,
                    operator: &problem.operator,
                    noise_std: BENCH_OBS_NOISE_STD,
                };
                cycle = cycle.wrapping_add(1);
                filter
                    .analyse(
                        &gpu,
                        &mut problem.ensemble,
                        Some(&problem.previous),
                        &obs,
                        cycle,
                    )
                    .expect("analysis");
                black_box(&problem.ensemble);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
