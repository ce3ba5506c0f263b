//! Criterion bench of one whole small assimilation cycle on the CPU backend with one thread:
//! `lorenz96_sakov2008` (Lorenz-96, d = 40, identity observation of every component, σ_y = 1)
//! with n = 20 members, as `enff compare lorenz96_sakov2008 --filters etkf,enff-f2p --set
//! ensemble.n=20` runs it. One iteration is one [`enff::cycle::Cycle::step`]: truth and
//! ensemble forecast (one RK4 step), observation, analysis (ETKF, or EnFF-F2P with the
//! preset's 9 flow steps) and the forecast and analysis metrics. Names carry the backend:
//! `cpu/small_cycle/etkf_n20_d40`, `cpu/small_cycle/enff_f2p_n20_d40`.
//!
//! Throughput is the counted arithmetic of a cycle (printed as elements/s, i.e. FLOP/s; see
//! [`flops_per_cycle`]), so the report shows how far the cycle is from its arithmetic.
//!
//! `cargo bench --bench small_cycle` (about 20 s). The thread pool is built with one thread
//! here, whatever `RAYON_NUM_THREADS` says.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::cycle::OneProcess;
use enff::experiment::{Experiment, RunOptions};

/// Members and components of the small cycle.
const N: usize = 20;
const D: usize = 40;

/// Cycles run before timing (past the initial transient of the filter).
const WARM_UP_CYCLES: usize = 200;

/// The experiment of the bench: the preset with `n = 20` and the given filter.
fn experiment(filter: &str) -> Experiment {
    let preset = enff::experiment::preset("lorenz96_sakov2008").expect("preset");
    let mut config = preset.config;
    for assignment in [
        format!("ensemble.n={N}"),
        format!("filter.kind={filter}"),
        // Room for every iteration criterion asks for.
        "experiment.cycles=100000000".to_string(),
    ] {
        config.set(&assignment).expect("setting");
    }
    Experiment::new(preset.name, config, None).expect("experiment")
}

/// Counted floating-point operations of one cycle (multiply-adds count 2): the forecast of
/// `n + 1` states (one classic RK4 step of Lorenz-96: 4 right-hand sides of 4 operations per
/// component and 10 for the stage combinations), the observation and its noise, the two
/// metrics passes (about 6 per value each), and the analysis:
///
/// - ETKF: the observed products `2·n·(n + 1)·m`, the symmetric eigen-decomposition of the
///   `n × n` matrix (about `9·n³` for the tridiagonal reduction, its accumulation and the QR
///   sweeps), the two `n × n` products `U·f(Λ)·Uᵀ` (`4·n³`) and the transform `2·n²·d`;
/// - EnFF-F2P: per flow step, the pairwise distances and the weighted combination
///   (`5·n²·d`, as in the "One EnFF analysis" table of BENCHMARKS.md), `n²` exponentials of the
///   softmax (counted as 20 each) and the source draw (about 30 per value).
fn flops_per_cycle(filter: &str, flow_steps: usize) -> u64 {
    let (n, d, m) = (N as u64, D as u64, D as u64);
    let forecast = (n + 1) * d * (4 * 4 + 10);
    let observe_and_metrics = 2 * m + 2 * 6 * n * d;
    let analysis = match filter {
        "etkf" => 2 * n * (n + 1) * m + 9 * n * n * n + 4 * n * n * n + 2 * n * n * d,
        _ => flow_steps as u64 * (5 * n * n * d + 20 * n * n) + 30 * n * d,
    };
    forecast + observe_and_metrics + analysis
}

fn small_cycle(c: &mut Criterion) {
    // One worker: the cycle runs on the calling thread, as with RAYON_NUM_THREADS=1.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
    let cpu = Cpu::new();
    let mut group = c.benchmark_group(format!("{}/small_cycle", cpu.name()));
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for filter in ["etkf", "enff-f2p"] {
        let exp = experiment(filter);
        let flow_steps = exp.config().filter.flow_steps;
        let mut stepper = exp
            .stepper(&cpu, Box::new(OneProcess::new(D)), &RunOptions::default())
            .expect("stepper");
        for _ in 0..WARM_UP_CYCLES {
            stepper.step().expect("warm-up cycle");
        }
        group.throughput(Throughput::Elements(flops_per_cycle(filter, flow_steps)));
        let name = format!("{}_n{N}_d{D}", filter.replace('-', "_"));
        group.bench_function(name, |b| {
            b.iter(|| black_box(stepper.step().expect("cycle").metrics.rmse))
        });
    }
    group.finish();
}

/// The scalar cores of the two analyses alone, the part of the floor that does not
/// vectorize without changing the numbers: the ETKF's eigen-decomposition of its `n × n`
/// matrix (nalgebra, f64) and the `flow_steps · n²` f64 exponentials of EnFF's softmax (libm).
/// With the vector work at the core's peak rate they give a floor estimate of the cycle.
fn small_cycle_floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/small_cycle_floor");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    // The ETKF's matrix C = A Aᵀ/σ² + (n − 1) I of the warmed-up bench ensemble (identity
    // observation, σ_y = 1: A holds the members' anomalies).
    let cpu = Cpu::new();
    let exp = experiment("etkf");
    let mut stepper = exp
        .stepper(&cpu, Box::new(OneProcess::new(D)), &RunOptions::default())
        .expect("stepper");
    for _ in 0..WARM_UP_CYCLES {
        stepper.step().expect("warm-up cycle");
    }
    let x = cpu.read(stepper.ensemble()).expect("ensemble");
    let sigma = exp.config().observe.noise_std as f64;
    let mean: Vec<f64> = (0..D)
        .map(|k| (0..N).map(|i| x[i * D + k] as f64).sum::<f64>() / N as f64)
        .collect();
    let a = nalgebra::DMatrix::<f64>::from_fn(N, D, |i, k| x[i * D + k] as f64 - mean[k]);
    let cmat = &a * a.transpose() / (sigma * sigma)
        + nalgebra::DMatrix::<f64>::identity(N, N) * (N - 1) as f64;
    group.bench_function(format!("etkf_eigen_n{N}"), |b| {
        b.iter(|| nalgebra::SymmetricEigen::new(black_box(cmat.clone())).eigenvalues[0])
    });
    let flow_steps = experiment("enff-f2p").config().filter.flow_steps;
    let logits: Vec<f64> = (0..N * N).map(|k| ((k * 37) % 97) as f64 * -0.8).collect();
    group.bench_function(format!("enff_exp_{}", flow_steps * N * N), |b| {
        b.iter(|| {
            let mut s = 0.0f64;
            for _ in 0..flow_steps {
                for &l in black_box(&logits).iter() {
                    s += l.exp();
                }
            }
            s
        })
    });
    group.finish();
}

criterion_group!(benches, small_cycle, small_cycle_floor);
criterion_main!(benches);
