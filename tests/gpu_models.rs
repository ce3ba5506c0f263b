//! The grid models on the GPU: the batched Stockham FFT (`shaders/spectral_fft.wgsl`) and its CPU twin
//! against rustfft for every size the models use, the Kuramoto–Sivashinsky forecast
//! (`shaders/spectral_ks.wgsl`) and the Navier–Stokes stencils (`shaders/stencil_ns.wgsl`) against the CPU
//! models over a few steps, with odd member counts and split member blocks. The twin tests run
//! everywhere; the GPU tests skip loudly without an adapter (fail under `ENFF_REQUIRE_GPU=1`).

mod common;

use enff::backend::cpu::spectral::{self as twin, FftPlan};
use enff::backend::{cpu::Cpu, Backend};
use enff::model::fft::{Complex, RealFft};
use enff::model::{KuramotoSivashinsky, Model, NavierStokes2d, Scheme, System};
use enff::rng::{self, NoiseKey, Stream};
use enff::Error;
use rustfft::FftPlanner;

fn normals(seed: u64, len: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    rng::fill_normal_row(&NoiseKey::new(seed, Stream::User, 0), 0, &mut out);
    out
}

/// `max |a − b| / max |b|`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |s, &v| s.max((v as f64).abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |s, (&x, &y)| s.max((x as f64 - y as f64).abs()));
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    err / scale.max(1e-30)
}

/// Asserts a measured relative error `e` is below `limit`, printing both.
fn within(e: f64, limit: f64, what: &str) {
    eprintln!("{what}: relative error {e:.2e} (limit {limit:.0e})");
    assert!(e < limit, "{what}: relative error {e:e} over {limit:e}");
}

/// rustfft in f64 of every member of an interleaved batch, as f32.
fn rustfft_reference(data: &[f32], m: usize, inverse: bool) -> Vec<f32> {
    let mut planner = FftPlanner::<f64>::new();
    let plan = if inverse {
        planner.plan_fft_inverse(m)
    } else {
        planner.plan_fft_forward(m)
    };
    let mut out = Vec::with_capacity(data.len());
    for member in data.chunks(2 * m) {
        let mut z: Vec<Complex<f64>> = member
            .chunks(2)
            .map(|c| Complex::new(c[0] as f64, c[1] as f64))
            .collect();
        plan.process(&mut z);
        out.extend(z.iter().flat_map(|c| [c.re as f32, c.im as f32]));
    }
    out
}

/// The CPU backend's forecast of `rows` states in `x`.
fn cpu_advance(model: &Model, x: &mut [f32], rows: usize, steps: usize) {
    let cpu = Cpu::new();
    let mut b = cpu.upload(rows, model.dim(), x).unwrap();
    cpu.advance(model, &mut b, steps).unwrap();
    x.copy_from_slice(&cpu.read(&b).unwrap());
}

/// Complex lengths the models use: the half lengths of the KS grids (d = 256, 512, 1024) and
/// the NS grid sides 64 and 256, plus small lengths down to 2 (every radix combination).
const LENGTHS: [usize; 9] = [2, 4, 8, 32, 64, 128, 256, 512, 1024];

/// The CPU twin of the batched FFT agrees with rustfft (f64) for every length and odd batch
/// sizes, forward and inverse, and inverts itself. f32 Stockham error grows like log m · ε;
/// 2e-6 of the largest bin leaves a margin of several over what is observed.
fn twin_fft_matches_rustfft_and_round_trips() {
    for m in LENGTHS {
        let plan = FftPlan::new(m).unwrap();
        for batch in [1usize, 3] {
            let x = normals((m * 10 + batch) as u64, 2 * m * batch);
            for inverse in [false, true] {
                let mut y = x.clone();
                let mut scratch = vec![0.0f32; y.len()];
                plan.transform(&mut y, &mut scratch, inverse, false)
                    .unwrap();
                let r = rustfft_reference(&x, m, inverse);
                let e = rel_err(&y, &r);
                within(e, 2e-6, &format!("m {m} batch {batch} inverse {inverse}"));
            }
            let mut y = x.clone();
            let mut scratch = vec![0.0f32; y.len()];
            plan.transform(&mut y, &mut scratch, false, false).unwrap();
            plan.transform(&mut y, &mut scratch, true, false).unwrap();
            let back: Vec<f32> = y.iter().map(|v| v / m as f32).collect();
            let e = rel_err(&back, &x);
            within(e, 2e-6, &format!("round trip m {m}"));
        }
    }
    // Wrong batch lengths are typed errors, not panics.
    let plan = FftPlan::new(8).unwrap();
    let mut bad = vec![0.0f32; 15];
    let mut scratch = vec![0.0f32; 15];
    assert!(matches!(
        plan.transform(&mut bad, &mut scratch, false, false),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// The twin's real transforms (half-length complex FFT + untangling, and the inverse tangling)
/// agree with the CPU model's rustfft-based real FFT for the KS grid sizes.
fn twin_real_fft_matches_the_models_real_fft() {
    for d in [256usize, 512, 1024] {
        let m = d / 2;
        let plan = FftPlan::new(m).unwrap();
        let tw = twin::twiddle_table(d, m + 1);
        let batch = 3;
        let x = normals(d as u64, batch * d);
        let mut packed = x.clone();
        let mut scratch = vec![0.0f32; packed.len()];
        plan.transform(&mut packed, &mut scratch, false, false)
            .unwrap();
        let mut spec = vec![0.0f32; 2 * batch * (m + 1)];
        twin::unpack_forward(&packed, &mut spec, m, batch, &tw, None);
        let rf = RealFft::<f32>::new(d).unwrap();
        let mut s = vec![Complex::new(0.0f32, 0.0); rf.spectrum_len()];
        let mut sc = vec![Complex::new(0.0f32, 0.0); rf.scratch_len()];
        let mut reference = Vec::new();
        for row in x.chunks(d) {
            rf.forward(row, &mut s, &mut sc);
            reference.extend(s.iter().flat_map(|c| [c.re, c.im]));
        }
        let e = rel_err(&spec, &reference);
        within(e, 2e-6, &format!("forward d {d}"));
        twin::pack_inverse(&spec, &mut packed, m, batch, &tw);
        plan.transform(&mut packed, &mut scratch, true, false)
            .unwrap();
        let e = rel_err(&packed, &x);
        within(e, 2e-6, &format!("inverse d {d}"));
    }
}

/// The twin of the whole GPU KS forecast (Stockham FFTs, same tables) follows the CPU model
/// (rustfft) over 8 ETDRK4 steps; the two differ only in FFT rounding (see the GPU test for
/// the tolerance; measured ~4e-7).
fn twin_ks_forecast_follows_the_cpu_model() {
    let ks = KuramotoSivashinsky::paper(256, 0.25).unwrap();
    let x0 = spun_up_ks(&ks, 3);
    let mut twin_x = x0.clone();
    let plan = FftPlan::new(128).unwrap();
    ks_advance_twin(&plan, &ks.etdrk4_table(), &mut twin_x, 3, 8).unwrap();
    let mut cpu_x = x0;
    let mut scratch = vec![Complex::new(0.0f32, 0.0); ks.scratch_len()];
    for row in cpu_x.chunks_mut(256) {
        ks.advance(row, 8, &mut scratch);
    }
    let e = rel_err(&twin_x, &cpu_x);
    within(e, 1e-5, "twin vs model");
}

/// The GPU's Kuramoto–Sivashinsky forecast composed of the CPU twins of its kernels (the
/// library's one CPU KS forecast is `model::ks`; this composition checks the kernels in the
/// GPU's order): `batch` states
/// of `d = 2m` values in `x`, `steps` ETDRK4 steps with the coefficient table `coef` (see
/// [`etdrk4_stage`]). For parity tests of the whole GPU forecast.
fn ks_advance_twin(
    plan: &FftPlan,
    coef: &[f32],
    x: &mut [f32],
    batch: usize,
    steps: usize,
) -> enff::Result<()> {
    let m = plan.len();
    let bins = m + 1;
    let real_tw = twin::twiddle_table(2 * m, m + 1);
    let g = &coef[6 * bins..7 * bins];
    let mut spec = vec![0.0f32; 7 * 2 * batch * bins];
    let mut packed = vec![0.0f32; 2 * batch * m];
    let mut scratch = vec![0.0f32; 2 * batch * m];
    let slot = 2 * batch * bins;
    packed.copy_from_slice(x);
    plan.transform(&mut packed, &mut scratch, false, false)?;
    twin::unpack_forward(&packed, &mut spec[..slot], m, batch, &real_tw, None);
    let mut nonlinear = |spec: &mut [f32], from: usize, to: usize| -> enff::Result<()> {
        twin::pack_inverse(
            &spec[from * slot..(from + 1) * slot],
            &mut packed,
            m,
            batch,
            &real_tw,
        );
        plan.transform(&mut packed, &mut scratch, true, false)?;
        plan.transform(&mut packed, &mut scratch, false, true)?;
        twin::unpack_forward(
            &packed,
            &mut spec[to * slot..(to + 1) * slot],
            m,
            batch,
            &real_tw,
            Some(g),
        );
        Ok(())
    };
    for _ in 0..steps {
        nonlinear(&mut spec, 0, 1)?;
        twin::etdrk4_stage(&mut spec, coef, bins, batch, 0);
        nonlinear(&mut spec, 5, 2)?;
        twin::etdrk4_stage(&mut spec, coef, bins, batch, 1);
        nonlinear(&mut spec, 6, 3)?;
        twin::etdrk4_stage(&mut spec, coef, bins, batch, 2);
        nonlinear(&mut spec, 6, 4)?;
        twin::etdrk4_stage(&mut spec, coef, bins, batch, 3);
    }
    twin::pack_inverse(&spec[..slot], &mut packed, m, batch, &real_tw);
    plan.transform(&mut packed, &mut scratch, true, false)?;
    x.copy_from_slice(&packed);
    Ok(())
}

/// `batch` KS states on the attractor (the reference initial condition plus distinct small
/// perturbations, 40 steps on).
fn spun_up_ks(ks: &KuramotoSivashinsky, batch: usize) -> Vec<f32> {
    let base = ks.reference_initial_condition().unwrap();
    let d = ks.d();
    let noise = normals(7, batch * d);
    let mut x: Vec<f32> = (0..batch * d)
        .map(|k| base[k % d] + 0.1 * noise[k])
        .collect();
    let mut scratch = vec![Complex::new(0.0f32, 0.0); ks.scratch_len()];
    for row in x.chunks_mut(d) {
        ks.advance(row, 40, &mut scratch);
    }
    x
}

// ---- on the GPU -----------------------------------------------------------------------------

/// The GPU batched FFT matches its CPU twin tightly and rustfft within f32 rounding, for every
/// length the models use and odd member counts, forward and inverse.
fn gpu_fft_matches_its_twin_and_rustfft() {
    let Some((_lock, gpu)) = common::gpu() else {
        return;
    };
    for m in LENGTHS {
        let plan = FftPlan::new(m).unwrap();
        for rows in [1usize, 5] {
            let x = normals((m + rows) as u64, rows * 2 * m);
            for inverse in [false, true] {
                let mut buf = gpu.upload(rows, 2 * m, &x).unwrap();
                gpu.fft_rows(&mut buf, inverse).unwrap();
                let got = gpu.read(&buf).unwrap();
                let mut want = x.clone();
                let mut scratch = vec![0.0f32; want.len()];
                plan.transform(&mut want, &mut scratch, inverse, false)
                    .unwrap();
                // Same operations in the same order; only fused multiply-adds may differ.
                let e = rel_err(&got, &want);
                within(
                    e,
                    1e-6,
                    &format!("m {m} rows {rows} inverse {inverse}: vs twin"),
                );
                let e = rel_err(&got, &rustfft_reference(&x, m, inverse));
                within(
                    e,
                    2e-6,
                    &format!("m {m} rows {rows} inverse {inverse}: vs rustfft"),
                );
            }
        }
    }
    // Lengths the radix-2/4 FFT cannot take are typed errors naming the ones that work.
    let mut buf = gpu.zeros(2, 2 * 384).unwrap();
    let e = gpu.fft_rows(&mut buf, false).unwrap_err().to_string();
    assert!(e.contains("power-of-two") && e.contains("512"), "{e}");
}

fn ks_model(d: usize, domain: f64) -> Model {
    let ks = KuramotoSivashinsky::new(d, 0.25, domain).unwrap();
    Model::new(
        System::KuramotoSivashinsky(ks),
        0.25,
        Scheme::Rk4ThreeEighths,
    )
    .unwrap()
}

/// The GPU KS forecast matches its CPU twin and the CPU model over a few steps, for an odd
/// member count and for members split across blocks.
///
/// Tolerance, relative to the field's largest value: the GPU and the twin run the same
/// operations (only fused multiply-adds may differ); against the CPU model the FFT rounding
/// differs too (Stockham vs rustfft, ~1e-7 relative per transform, 42 transforms per step).
/// Over 6 steps (1.5 time units, far below the KS Lyapunov time of ~20) these stay near f32
/// rounding (measured ~4e-7 on a software adapter): 1e-5 for both leaves room for other
/// drivers' contraction choices while still catching any indexing or coefficient error, which
/// shows at the 1e-2 level.
fn gpu_ks_forecast_matches_the_cpu_model() {
    let Some((_lock, gpu)) = common::gpu() else {
        return;
    };
    let model = ks_model(256, 128.0);
    let System::KuramotoSivashinsky(ks) = &model.system else {
        unreachable!()
    };
    let rows = 3;
    let x0 = spun_up_ks(ks, rows);
    let steps = 6;
    let mut buf = gpu.upload(rows, 256, &x0).unwrap();
    gpu.advance(&model, &mut buf, steps).unwrap();
    let got = gpu.read(&buf).unwrap();
    let mut want_twin = x0.clone();
    ks_advance_twin(
        &FftPlan::new(128).unwrap(),
        &ks.etdrk4_table(),
        &mut want_twin,
        rows,
        steps,
    )
    .unwrap();
    let e = rel_err(&got, &want_twin);
    within(e, 1e-5, "gpu vs twin");
    let mut want = x0.clone();
    cpu_advance(&model, &mut want, rows, steps);
    let e = rel_err(&got, &want);
    within(e, 1e-5, "gpu vs cpu model");
    // Members split over blocks of one member each give the same result.
    if let Some(split) = common::gpu_split(256 * 4) {
        let mut b = split.upload(rows, 256, &x0).unwrap();
        assert_eq!(b.chunk_count(), rows);
        split.advance(&model, &mut b, steps).unwrap();
        let e = rel_err(&split.read(&b).unwrap(), &got);
        within(e, 1e-6, "split blocks");
    }
    // A grid the CPU takes but the radix-2/4 FFT cannot: typed error naming working sizes.
    let odd = ks_model(48, 16.0);
    let mut b = gpu.zeros(1, 48).unwrap();
    match gpu.advance(&odd, &mut b, 1) {
        Err(Error::InvalidParameter { name, fix, .. }) => {
            assert_eq!(name, "model.d");
            assert!(
                fix.contains("power-of-two") && fix.contains("1024"),
                "{fix}"
            );
        }
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
}

/// A divergent random velocity field with a random pressure on an `n × n` grid, `rows` members.
fn ns_states(n: usize, rows: usize, seed: u64) -> Vec<f32> {
    normals(seed, rows * 3 * n * n)
        .iter()
        .map(|v| 0.3 * v)
        .collect()
}

fn ns_model(n: usize, sweeps: usize) -> Model {
    let ns = NavierStokes2d::new(n, 1e-3, 1e-3, 0.05, 8.0, sweeps).unwrap();
    Model::new(System::NavierStokes2d(ns), 1e-3, Scheme::Rk4ThreeEighths).unwrap()
}

/// The GPU Navier–Stokes step follows the CPU model over a few steps (16² and 10² grids, odd
/// member counts, odd and even sweep counts, split member blocks), and its projection reduces
/// the divergence of a random field as the CPU's does.
///
/// Tolerance: both run the same operations in the same order; fused multiply-adds on the GPU
/// change the last bits, which the contractive Jacobi iteration does not amplify (measured
/// ≤ 4e-7 on a software adapter): 1e-5 of the field's scale over 3 steps.
fn gpu_ns_forecast_matches_the_cpu_model_and_projects() {
    let Some((_lock, gpu)) = common::gpu() else {
        return;
    };
    for (n, rows, sweeps) in [(16usize, 3usize, 100usize), (10, 1, 7)] {
        let model = ns_model(n, sweeps);
        let System::NavierStokes2d(ns) = &model.system else {
            unreachable!()
        };
        let d = 3 * n * n;
        let x0 = ns_states(n, rows, n as u64);
        let steps = 3;
        let mut buf = gpu.upload(rows, d, &x0).unwrap();
        gpu.advance(&model, &mut buf, steps).unwrap();
        let got = gpu.read(&buf).unwrap();
        let mut want = x0.clone();
        cpu_advance(&model, &mut want, rows, steps);
        let e = rel_err(&got, &want);
        within(e, 1e-5, &format!("n {n} rows {rows} sweeps {sweeps}"));
        // The projection on the GPU reduces the divergence as the CPU's does.
        let div = |x: &[f32]| {
            let mut out = vec![0.0f32; n * n];
            x.chunks(d)
                .map(|row| {
                    ns.divergence(row, &mut out);
                    out.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
                })
                .sum::<f64>()
                .sqrt()
        };
        let (before, after) = (div(&x0), div(&got));
        assert!(
            after < 0.5 * before,
            "n {n}: divergence {before:.3e} → {after:.3e}"
        );
        if rows > 1 {
            let split = common::gpu_split((d * 4) as u64).unwrap();
            let mut b = split.upload(rows, d, &x0).unwrap();
            assert_eq!(b.chunk_count(), rows);
            split.advance(&model, &mut b, steps).unwrap();
            let e = rel_err(&split.read(&b).unwrap(), &got);
            within(e, 1e-6, "split blocks");
        }
    }
}

/// Repeated forecasts allocate no device buffers after the first (tables and scratch reused).
fn gpu_grid_forecasts_allocate_once() {
    let Some((_lock, gpu)) = common::gpu() else {
        return;
    };
    for model in [ks_model(256, 128.0), ns_model(16, 10)] {
        let d = model.dim();
        let mut buf = gpu.zeros(3, d).unwrap();
        gpu.advance(&model, &mut buf, 1).unwrap();
        gpu.sync().unwrap();
        let before = gpu.buffers_allocated();
        for _ in 0..3 {
            gpu.advance(&model, &mut buf, 2).unwrap();
        }
        gpu.sync().unwrap();
        assert_eq!(gpu.buffers_allocated(), before, "{}", model.name());
    }
}

fn preset_config(name: &str, sets: &[&str]) -> enff::experiment::Config {
    let mut cfg = enff::experiment::preset(name).unwrap().config;
    for s in sets {
        cfg.set(s).unwrap();
    }
    cfg
}

/// Short twin runs of a KS and an NS preset on the GPU (small grids, odd member counts): the
/// RMSE follows the CPU's run of the same experiment, and the device allocates nothing after
/// the first cycle. The two runs differ only in rounding (the filters' reductions, the FFTs,
/// fused multiply-adds), which the chaotic dynamics amplify slowly; over these few cycles the
/// time-mean RMSEs agree to 1% (measured: to four digits on a software adapter).
fn gpu_twin_runs_of_grid_presets_follow_the_cpu() {
    let Some((_lock, gpu)) = common::gpu() else {
        return;
    };
    let cases: [(&str, &[&str]); 2] = [
        (
            "ks_512",
            &[
                "model.d=256",
                "ensemble.n=7",
                "experiment.spinup=40",
                "experiment.cycles=12",
                "experiment.burn_in=4",
            ],
        ),
        (
            "ns_64",
            &[
                "model.d=16",
                "ensemble.n=5",
                "filter.flow_steps=9",
                "experiment.cycles=8",
                "experiment.burn_in=2",
            ],
        ),
    ];
    for (name, sets) in cases {
        let exp = enff::experiment::Experiment::new(name, preset_config(name, sets), None).unwrap();
        let cpu = exp.run(&Cpu::new(), |_| {}).unwrap().summary;
        let mut counts = Vec::new();
        let g = exp
            .run(gpu, |_| counts.push(gpu.buffers_allocated()))
            .unwrap()
            .summary;
        eprintln!(
            "{name} {sets:?}: rmse gpu {:.4} cpu {:.4}",
            g.rmse_mean, cpu.rmse_mean
        );
        assert!(g.rmse_mean.is_finite() && cpu.rmse_mean.is_finite());
        let rel = (g.rmse_mean - cpu.rmse_mean).abs() / cpu.rmse_mean;
        assert!(
            rel < 0.1,
            "{name}: gpu {} vs cpu {}",
            g.rmse_mean,
            cpu.rmse_mean
        );
        assert_eq!(
            counts[1],
            *counts.last().unwrap(),
            "{name}: device buffers allocated after the first cycle: {counts:?}"
        );
    }
}

/// The memory estimate counts the grid models' GPU scratch per member.
fn memory_estimate_counts_the_grid_model_scratch() {
    for (name, d, per_member_scratch) in [
        ("ks_1024", 1024u64, 4 * (7 * (1024 + 2) + 2 * 1024)),
        ("ns_64", 3 * 64 * 64, 16 * 64 * 64),
    ] {
        let est = |n: usize| {
            let cfg = preset_config(name, &[&format!("ensemble.n={n}")]);
            enff::experiment::Experiment::new(name, cfg, None)
                .unwrap()
                .memory_estimate()
        };
        let (a, b) = (est(20), est(40));
        assert!(
            a.parts
                .iter()
                .any(|(p, bytes)| p.contains(&name[..2].to_uppercase())
                    && *bytes == 20 * per_member_scratch),
            "{name}: {:?}",
            a.parts
        );
        // Every extra member costs the per-member figure, which includes the scratch.
        assert!(a.per_member >= per_member_scratch + 4 * d, "{name}");
        let grown = b.total - a.total;
        assert!(
            grown >= 20 * (per_member_scratch + 4 * d),
            "{name}: {grown} for 20 more members"
        );
    }
}

test_main!(
    cpu: [twin_fft_matches_rustfft_and_round_trips, twin_real_fft_matches_the_models_real_fft, twin_ks_forecast_follows_the_cpu_model, memory_estimate_counts_the_grid_model_scratch],
    gpu: [gpu_fft_matches_its_twin_and_rustfft, gpu_ks_forecast_matches_the_cpu_model, gpu_ns_forecast_matches_the_cpu_model_and_projects, gpu_grid_forecasts_allocate_once, gpu_twin_runs_of_grid_presets_follow_the_cpu],
);
