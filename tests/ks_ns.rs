//! The Kuramoto–Sivashinsky (ENFF_SPEC §8.4) and 2-D Navier–Stokes (§8.5) benchmark systems:
//! the real FFT, ETDRK4 against an independent small-step reference, long-run sanity of KS, the
//! Chorin projection, typed errors for grids and steps that cannot work, and twin runs of the
//! `ks_*` / `ns_*` presets inside stated bands: the KS presets in full, the NS presets on small
//! grids and few cycles (their full runs are ignored tests). The file runs in about 10 s on two
//! cores with `cargo test --release`.

mod common;

use enff::backend::cpu::spectral::{self as twin, FftPlan};
use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::experiment::{preset, Experiment, Summary};
use enff::model::fft::{Complex, RealFft};
use enff::model::ns::GP_LENGTH_SCALE;
use enff::model::{KuramotoSivashinsky, Model, NavierStokes2d, Scheme, System};
use enff::rng::{self, NoiseKey, Stream};
use enff::Error;
use rustfft::FftPlanner;

type C64 = Complex<f64>;

fn normals(seed: u64, len: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    rng::fill_normal_row(&NoiseKey::new(seed, Stream::User, 0), 0, &mut out);
    out
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

// ---- real FFT -----------------------------------------------------------------------------

/// rfft → irfft gives the signal back to f32 rounding, the spectrum satisfies Parseval, and a
/// pure cosine lands in its own bin only.
fn real_fft_round_trip_recovers_the_signal_and_parseval_holds() {
    for len in [16usize, 256, 1024] {
        let f = RealFft::<f32>::new(len).unwrap();
        let x = normals(len as u64, len);
        let mut spec = vec![Complex::new(0.0f32, 0.0); f.spectrum_len()];
        let mut scratch = vec![Complex::new(0.0f32, 0.0); f.scratch_len()];
        f.forward(&x, &mut spec, &mut scratch);
        let mut back = vec![0.0f32; len];
        f.inverse(&spec, &mut back, &mut scratch);
        let err = x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 2e-6, "len {len}: round-trip error {err}");
        // Parseval: Σx² = (|X₀|² + |X_{N/2}|² + 2 Σ_{0<k<N/2} |X_k|²) / N.
        let energy: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
        let half = len / 2;
        let spectral: f64 = spec
            .iter()
            .enumerate()
            .map(|(k, z)| {
                let w = if k == 0 || k == half { 1.0 } else { 2.0 };
                w * (z.norm_sqr() as f64)
            })
            .sum::<f64>()
            / len as f64;
        assert!(
            (energy - spectral).abs() < 1e-5 * energy,
            "len {len}: Parseval {energy} vs {spectral}"
        );
    }
    let len = 64;
    let f = RealFft::<f64>::new(len).unwrap();
    let x: Vec<f64> = (0..len)
        .map(|j| (std::f64::consts::TAU * 5.0 * j as f64 / len as f64).cos())
        .collect();
    let mut spec = vec![C64::new(0.0, 0.0); f.spectrum_len()];
    let mut scratch = vec![C64::new(0.0, 0.0); f.scratch_len()];
    f.forward(&x, &mut spec, &mut scratch);
    for (k, z) in spec.iter().enumerate() {
        let expected = if k == 5 { len as f64 / 2.0 } else { 0.0 };
        assert!(
            (z.re - expected).abs() < 1e-10 && z.im.abs() < 1e-10,
            "bin {k}: {z}"
        );
    }
}

// ---- Kuramoto–Sivashinsky -----------------------------------------------------------------

/// The KS right-hand side in Fourier space, `L v + N(v)`, with a naive f64 DFT: written
/// independently of the crate's FFT and ETDRK4 (same truncation: Nyquist wave number 0).
fn ks_rhs_f64(v: &[C64], domain_pi_multiple: f64, d: usize, out: &mut [C64]) {
    let bins = d / 2 + 1;
    let tau = std::f64::consts::TAU;
    let k_of = |b: usize| {
        if b == d / 2 {
            0.0
        } else {
            b as f64 * 2.0 / domain_pi_multiple
        }
    };
    // u_j = irfft(v): real parts of bins 0 and d/2 only.
    let u: Vec<f64> = (0..d)
        .map(|j| {
            let mut s = v[0].re + v[d / 2].re * if j % 2 == 0 { 1.0 } else { -1.0 };
            for (b, vb) in v.iter().enumerate().take(d / 2).skip(1) {
                let a = tau * (b * j) as f64 / d as f64;
                s += 2.0 * (vb.re * a.cos() - vb.im * a.sin());
            }
            s / d as f64
        })
        .collect();
    for b in 0..bins {
        let mut sq = C64::new(0.0, 0.0);
        for (j, &uj) in u.iter().enumerate() {
            let a = -tau * (b * j) as f64 / d as f64;
            sq += C64::new(a.cos(), a.sin()) * (uj * uj);
        }
        let k = k_of(b);
        let l = k * k - k.powi(4);
        out[b] = v[b] * l + C64::new(0.0, -0.5 * k) * sq;
    }
}

/// Classic RK4 on the Fourier coefficients with `steps` steps of `dt`.
fn ks_reference(u0: &[f32], domain_pi_multiple: f64, t_end: f64, steps: usize) -> Vec<f64> {
    let d = u0.len();
    let bins = d / 2 + 1;
    let tau = std::f64::consts::TAU;
    let mut v: Vec<C64> = (0..bins)
        .map(|b| {
            u0.iter()
                .enumerate()
                .fold(C64::new(0.0, 0.0), |s, (j, &x)| {
                    let a = -tau * (b * j) as f64 / d as f64;
                    s + C64::new(a.cos(), a.sin()) * x as f64
                })
        })
        .collect();
    let dt = t_end / steps as f64;
    let zero = vec![C64::new(0.0, 0.0); bins];
    let (mut k1, mut k2, mut k3, mut k4, mut tmp) = (
        zero.clone(),
        zero.clone(),
        zero.clone(),
        zero.clone(),
        zero.clone(),
    );
    for _ in 0..steps {
        ks_rhs_f64(&v, domain_pi_multiple, d, &mut k1);
        for b in 0..bins {
            tmp[b] = v[b] + k1[b] * (0.5 * dt);
        }
        ks_rhs_f64(&tmp, domain_pi_multiple, d, &mut k2);
        for b in 0..bins {
            tmp[b] = v[b] + k2[b] * (0.5 * dt);
        }
        ks_rhs_f64(&tmp, domain_pi_multiple, d, &mut k3);
        for b in 0..bins {
            tmp[b] = v[b] + k3[b] * dt;
        }
        ks_rhs_f64(&tmp, domain_pi_multiple, d, &mut k4);
        for b in 0..bins {
            v[b] += (k1[b] + k2[b] * 2.0 + k3[b] * 2.0 + k4[b]) * (dt / 6.0);
        }
    }
    (0..d)
        .map(|j| {
            let mut s = v[0].re + v[d / 2].re * if j % 2 == 0 { 1.0 } else { -1.0 };
            for (b, vb) in v.iter().enumerate().take(d / 2).skip(1) {
                let a = tau * (b * j) as f64 / d as f64;
                s += 2.0 * (vb.re * a.cos() - vb.im * a.sin());
            }
            s / d as f64
        })
        .collect()
}

/// ETDRK4 (f32, the crate's) against classic RK4 with 4000 steps (f64, naive DFT) on a small,
/// stiff KS problem: d = 32 on a domain of 16π (wave numbers up to 1.9, |hL| up to 3 at
/// h = 0.25), a smooth three-mode start, integrated to t = 4. The error shrinks with the step
/// at close to fourth order until it meets the f32 floor.
fn ks_etdrk4_matches_a_small_step_reference() {
    let (d, dl, t_end) = (32usize, 16.0, 4.0);
    let x: Vec<f64> = (1..=d)
        .map(|j| dl * std::f64::consts::PI * j as f64 / d as f64)
        .collect();
    let u0: Vec<f32> = x
        .iter()
        .map(|&x| (x / 2.0).cos() * (1.0 + (x / 4.0).sin()) + 0.3 * (3.0 * x / 8.0).sin())
        .map(|v| v as f32)
        .collect();
    let reference = ks_reference(&u0, dl, t_end, 4000);
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut errors = Vec::new();
    for dt in [0.5f32, 0.25, 0.125] {
        let ks = KuramotoSivashinsky::new(d, dt, dl).unwrap();
        let model = Model::new(System::KuramotoSivashinsky(ks), dt, Scheme::Rk4Classic).unwrap();
        let cpu = Cpu::new();
        let mut buf = cpu.upload(1, d, &u0).unwrap();
        cpu.advance(&model, &mut buf, (t_end / dt as f64).round() as usize)
            .unwrap();
        let u = cpu.read(&buf).unwrap();
        let err = u
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0f64, f64::max);
        errors.push(err / scale);
    }
    eprintln!("KS ETDRK4 relative max errors at dt = 0.5, 0.25, 0.125: {errors:?}");
    assert!(errors[1] < 2e-3, "dt = 0.25 error {:.3e}", errors[1]);
    assert!(errors[2] < 3e-4, "dt = 0.125 error {:.3e}", errors[2]);
    // Halving the step gains at least 8x (fourth order would be 16x).
    assert!(errors[0] / errors[1] > 8.0, "{errors:?}");
    assert!(errors[1] / errors[2] > 8.0, "{errors:?}");
}

/// The paper's KS (d = 256, DL = 128, dt = 0.25) from the reference initial condition over
/// t = 2500 (10 000 steps): no NaN, the mean (a conserved quantity: the nonlinear term has no
/// k = 0 part) stays put, and the energy settles in the chaotic regime's range.
fn ks_long_run_statistics_are_sane() {
    let ks = KuramotoSivashinsky::paper(256, 0.25).unwrap();
    let mut u = ks.reference_initial_condition().unwrap();
    let mean0 = u.iter().map(|&v| v as f64).sum::<f64>() / u.len() as f64;
    let mut scratch = vec![Complex::new(0.0f32, 0.0); ks.scratch_len()];
    let mut energies = Vec::new();
    let mut max_abs = 0.0f32;
    for _ in 0..100 {
        ks.advance(&mut u, 100, &mut scratch);
        assert!(u.iter().all(|v| v.is_finite()));
        energies.push(rms(&u));
        max_abs = u.iter().fold(max_abs, |m, v| m.max(v.abs()));
    }
    let mean = u.iter().map(|&v| v as f64).sum::<f64>() / u.len() as f64;
    let (lo, hi) = energies[20..]
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &e| (lo.min(e), hi.max(e)));
    eprintln!(
        "KS d=256: rms {lo:.3}..{hi:.3}, max |u| {max_abs:.3}, mean {mean0:.2e} -> {mean:.2e}"
    );
    assert!(
        (mean - mean0).abs() < 1e-3,
        "mean drifted {mean0} -> {mean}"
    );
    assert!(lo > 0.8 && hi < 2.0, "rms range {lo}..{hi}");
    assert!(max_abs < 6.0, "max |u| {max_abs}");
}

// ---- Navier–Stokes ------------------------------------------------------------------------

/// A state with p = 0 and a velocity that is half gradient (divergent) and half rotational,
/// built from a few smooth Fourier modes on the [0, 2)² grid.
fn divergent_state(n: usize) -> Vec<f32> {
    let nn = n * n;
    let pi = std::f64::consts::PI;
    let mut x = vec![0.0f32; 3 * nn];
    for i in 0..n {
        for j in 0..n {
            let (px, py) = (
                pi * 2.0 * i as f64 / n as f64,
                pi * 2.0 * j as f64 / n as f64,
            );
            // φ = cos(px)cos(2py) + 0.5 sin(3px), ψ = sin(2px)sin(py)
            let phi_x = -(px.sin()) * (2.0 * py).cos() * pi + 1.5 * pi * (3.0 * px).cos();
            let phi_y = -2.0 * pi * px.cos() * (2.0 * py).sin();
            let psi_x = 2.0 * pi * (2.0 * px).cos() * py.sin();
            let psi_y = pi * (2.0 * px).sin() * py.cos();
            x[nn + i * n + j] = (phi_x + psi_y) as f32;
            x[2 * nn + i * n + j] = (phi_y - psi_x) as f32;
        }
    }
    x
}

/// One projection from p = 0 removes most of the divergence of a half-divergent field; a second
/// one, warm-started from the first pressure, removes more (the warm start the model relies on).
fn ns_projection_reduces_the_divergence() {
    let n = 32;
    let ns = NavierStokes2d::paper(n, 1e-3, 0.05).unwrap();
    let mut x = divergent_state(n);
    let mut div = vec![0.0f32; n * n];
    let mut scratch = vec![0.0f32; ns.scratch_len()];
    ns.divergence(&x, &mut div);
    let before = rms(&div);
    ns.project(&mut x, &mut scratch);
    ns.divergence(&x, &mut div);
    let once = rms(&div);
    ns.project(&mut x, &mut scratch);
    ns.divergence(&x, &mut div);
    let twice = rms(&div);
    eprintln!("NS 32²: divergence rms {before:.3e} -> {once:.3e} -> {twice:.3e}");
    assert!(before > 1.0, "{before}");
    assert!(once < 0.2 * before, "one projection: {before} -> {once}");
    assert!(
        twice < 0.5 * once,
        "warm-started second projection: {once} -> {twice}"
    );
    // The rotational part is kept: the velocity is not simply damped away.
    let speed = rms(&x[n * n..]);
    assert!(speed > 1.0, "velocity rms after projection {speed}");
}

/// The Gaussian-process initial condition is smooth, nearly divergence-free and of unit-order
/// amplitude, and the truth run from it stays bounded over 2000 steps (t = 2 on 32², dt = 1e-3).
fn ns_initial_condition_is_projected_and_the_flow_stays_bounded() {
    let n = 32;
    let nn = n * n;
    let ns = NavierStokes2d::paper(n, 1e-3, 0.05).unwrap();
    let white = normals(7, 2 * nn);
    let mut x = ns
        .gaussian_process_initial_condition(&white, GP_LENGTH_SCALE, 1.0)
        .unwrap();
    let (u_rms, v_rms) = (rms(&x[nn..2 * nn]), rms(&x[2 * nn..]));
    let mut div = vec![0.0f32; nn];
    ns.divergence(&x, &mut div);
    let div0 = rms(&div);
    // The field before its projection: (u₀, v₀) = (u, v) + dt ∇p.
    let mut raw = x.clone();
    let g = 1e-3 / (2.0 * 2.0 / n as f32);
    for i in 0..n {
        for j in 0..n {
            let p = |i: usize, j: usize| x[(i % n) * n + j % n];
            raw[nn + i * n + j] += g * (p(i + 1, j) - p(i + n - 1, j));
            raw[2 * nn + i * n + j] += g * (p(i, j + 1) - p(i, j + n - 1));
        }
    }
    let (raw_u, raw_v) = (rms(&raw[nn..2 * nn]), rms(&raw[2 * nn..]));
    ns.divergence(&raw, &mut div);
    let div_raw = rms(&div);
    eprintln!(
        "NS GP IC 32²: u rms {raw_u:.3} -> {u_rms:.3}, v rms {raw_v:.3} -> {v_rms:.3}, \
         divergence rms {div_raw:.3e} -> {div0:.3e}"
    );
    // Standardized to std 1 before the projection (the mean is 0, so rms = std) ...
    for r in [raw_u, raw_v] {
        assert!(
            (r - 1.0).abs() < 1e-3,
            "GP velocity rms before projection {r}"
        );
    }
    // ... which removes the divergent part (about half the variance of an isotropic field) and
    // most of the divergence (100 sweeps from p = 0 leave the longest waves partly unsolved).
    for r in [u_rms, v_rms] {
        assert!((0.5..0.9).contains(&r), "velocity rms {r}");
    }
    assert!(div0 < 0.3 * div_raw, "divergence rms {div_raw} -> {div0}");
    let mut scratch = vec![0.0f32; ns.scratch_len()];
    for _ in 0..20 {
        ns.advance(&mut x, 100, &mut scratch);
        assert!(x.iter().all(|v| v.is_finite()));
        let speed = rms(&x[nn..]);
        assert!((0.2..2.0).contains(&speed), "velocity rms {speed}");
    }
    ns.divergence(&x, &mut div);
    assert!(
        rms(&div) < 0.05,
        "divergence rms after 2000 steps {}",
        rms(&div)
    );
    // Pressure is part of the state: after the initial solve it settles to O(1).
    assert!(rms(&x[..nn]) < 5.0, "pressure rms {}", rms(&x[..nn]));
}

/// Channel-major flattening (ENFF_SPEC §1.1): index c·n² + i·n + j with j the vertical index;
/// the forcing 0.05·sin(8πy) drives u along rows of fixed j only.
fn ns_forcing_acts_on_u_along_the_vertical_index() {
    let n = 16;
    let nn = n * n;
    let dt = 1e-3;
    let ns = NavierStokes2d::new(n, dt, 0.0, 0.05, 8.0, 100).unwrap();
    let mut x = vec![0.0f32; 3 * nn];
    let mut scratch = vec![0.0f32; ns.scratch_len()];
    ns.step(&mut x, &mut scratch);
    for i in 0..n {
        for j in 0..n {
            let y = 2.0 * j as f64 / n as f64;
            let expected = dt as f64 * 0.05 * (8.0 * std::f64::consts::PI * y).sin();
            let u = x[nn + i * n + j] as f64;
            assert!(
                (u - expected).abs() < 1e-9,
                "u[{i},{j}] = {u}, expected {expected}"
            );
            assert_eq!(x[2 * nn + i * n + j], 0.0);
        }
    }
}

// ---- errors -------------------------------------------------------------------------------

fn config_with(name: &str, sets: &[&str]) -> enff::experiment::Config {
    let mut cfg = preset(name).unwrap().config;
    for s in sets {
        cfg.set(s).unwrap();
    }
    cfg
}

/// Odd or too-small grids are typed errors that name the sizes that work.
fn grids_that_cannot_be_taken_are_refused_naming_the_sizes_that_work() {
    for d in ["1023", "8", "0", "128", "255"] {
        let cfg = config_with("ks_1024", &[&format!("model.d={d}")]);
        match cfg.validate() {
            Err(Error::InvalidParameter { name, value, fix }) => {
                assert_eq!((name.as_str(), value.as_str()), ("model.d", d));
                assert!(
                    fix.contains("even") && fix.contains("at least 256"),
                    "{fix}"
                );
                assert!(fix.contains("1024"), "{fix}");
            }
            other => panic!("KS d = {d}: expected InvalidParameter, got {other:?}"),
        }
    }
    for n in ["63", "6", "20000"] {
        let cfg = config_with("ns_64", &[&format!("model.d={n}")]);
        match cfg.validate() {
            Err(Error::InvalidParameter { name, value, fix }) => {
                assert_eq!((name.as_str(), value.as_str()), ("model.d", n));
                assert!(fix.contains("even") && fix.contains("grid side"), "{fix}");
                assert!(fix.contains("64") && fix.contains("256"), "{fix}");
            }
            other => panic!("NS n = {n}: expected InvalidParameter, got {other:?}"),
        }
    }
    // model.d is the grid side for Navier–Stokes: the state has 3n² components.
    let cfg = config_with("ns_64", &["model.d=32"]);
    cfg.validate().unwrap();
    assert_eq!(cfg.state_dim(), 3 * 32 * 32);
}

/// A time step the explicit schemes cannot take ends the run with a divergence error that names
/// the cycle, not with NaN metrics.
fn unstable_time_steps_are_reported_as_divergence_with_the_cycle() {
    let cases: [(&str, &[&str]); 2] = [
        (
            "ns_64",
            &[
                "model.d=16",
                "model.dt=0.05",
                "experiment.cycles=40",
                "experiment.burn_in=0",
            ],
        ),
        (
            "ks_512",
            &[
                "model.d=256",
                "model.dt=2",
                "experiment.spinup=0",
                "experiment.cycles=40",
                "experiment.burn_in=0",
                "filter.flow_steps=2",
            ],
        ),
    ];
    for (name, sets) in cases {
        let cfg = config_with(name, sets);
        let exp = Experiment::new(name, cfg, None).unwrap();
        match exp.run(&Cpu::new(), |_| {}) {
            Err(Error::Diverged {
                cycle,
                stage,
                detail,
            }) => {
                eprintln!("{name} {sets:?}: diverged at cycle {cycle} during {stage}");
                assert!((2..=40).contains(&cycle), "{name}: cycle {cycle}");
                // The blow-up shows in the forecast or, when the forecast is merely huge, in
                // the analysis that follows it.
                assert!(
                    stage == "forecast" || stage.starts_with("analysis"),
                    "{name}: {stage}"
                );
                // A forecast blow-up says which setting to change.
                if stage == "forecast" {
                    let e = Error::Diverged {
                        cycle,
                        stage,
                        detail,
                    }
                    .to_string();
                    assert!(e.contains("model.dt") && e.contains("obs_every"), "{e}");
                }
            }
            other => panic!(
                "{name}: expected a divergence, got {:?}",
                other.map(|r| r.summary.rmse_mean)
            ),
        }
    }
}

/// The GPU backend runs the grid models (parity: tests/ks_ns.rs) and refuses KS grids its
/// radix-2/4 FFT cannot take with a typed error naming the sizes that work.
fn the_gpu_backend_runs_the_grid_models_and_refuses_grids_it_cannot_take() {
    let Some((_lock, gpu)) = common::gpu() else {
        return;
    };
    let model = config_with("ks_512", &[]).model().unwrap();
    let mut buf = gpu.zeros(2, 512).unwrap();
    gpu.advance(&model, &mut buf, 1).unwrap();
    assert!(gpu.read(&buf).unwrap().iter().all(|v| *v == 0.0));
    let model = config_with("ks_512", &["model.d=384"]).model().unwrap();
    let mut buf = gpu.zeros(2, 384).unwrap();
    match gpu.advance(&model, &mut buf, 1) {
        Err(Error::InvalidParameter { name, fix, .. }) => {
            assert_eq!(name, "model.d");
            assert!(
                fix.contains("power-of-two") && fix.contains("--backend cpu"),
                "{fix}"
            );
        }
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
}

// ---- twin runs of the presets ---------------------------------------------------------------

fn run(name: &str, sets: &[&str], seed: u64) -> Summary {
    let mut cfg = config_with(name, sets);
    cfg.experiment.seed = seed;
    let exp = Experiment::new(name, cfg, None).unwrap();
    exp.run(&Cpu::new(), |_| {}).unwrap().summary
}

/// The paper's KS benchmark as the preset defines it, all 1000 cycles (2.5 s on two cores):
/// the mean of the last 50 cycles must be inside the preset's band 0.045-0.07. enff measures
/// 0.049-0.052 over the training and the five test seeds; the paper reports 0.055-0.066, and an
/// RMSE this far below the observation error (σ_y = 0.1 in arctan space, ≈ 0.2 in state space
/// where |u| ≈ 1.3) shows the filter combining forecast and observations.
fn ks_1024_full_preset_is_inside_its_expected_band() {
    let p = preset("ks_1024").unwrap();
    assert_eq!(
        (p.config.state_dim(), p.config.filter.flow_steps),
        (1024, 4)
    );
    full_preset_is_inside_its_expected_band("ks_1024");
}

/// ks_512 as the preset defines it, all 1000 cycles (about 2 s): enff measures 0.059-0.076
/// over six seeds (0.0587 on the preset's seed); band 0.05-0.09.
fn ks_512_full_preset_is_inside_its_expected_band() {
    full_preset_is_inside_its_expected_band("ks_512");
}

/// ns_64's model, observations and filter on a 32² grid for 100 cycles, with 9 flow steps
/// instead of 99 (EnFF-F2P is flat in K: on 64² enff measures 0.0467 with 9 and 0.0462 with
/// 99). enff measures 0.048-0.049 over seeds 13-15 (the full ns_64 on 64²: 0.046); band
/// 0.04-0.06.
fn ns_64_short_twin_run_on_32_squared_is_inside_its_band() {
    let s = run(
        "ns_64",
        &[
            "model.d=32",
            "filter.flow_steps=9",
            "experiment.cycles=100",
            "experiment.burn_in=50",
        ],
        13,
    );
    eprintln!("ns_64 on 32², 100 cycles: rmse {:.4}", s.rmse_mean);
    assert_eq!(s.d, 3 * 32 * 32);
    assert!((0.04..0.06).contains(&s.rmse_mean), "{}", s.rmse_mean);
}

/// ns_256's settings (dt = 1e-4, 100 steps per cycle, weak guidance λ = 1e-3) on a 16² grid
/// for 10 cycles: the preset runs end to end and stays bounded. Its low RMSE needs the 256²
/// grid, whose viscosity damps the white noise of the initial ensemble
/// (`ns_256_grid_damps_white_noise_perturbations`; the full run is an ignored test); on 16² that
/// damping is negligible, so the RMSE stays near the initial ensemble-mean error 1/√20 ≈ 0.22
/// (enff: 0.155-0.198 over seeds 14-16). Band 0.1-0.25.
fn ns_256_short_twin_run_on_16_squared_stays_bounded() {
    let s = run(
        "ns_256",
        &["model.d=16", "experiment.cycles=10", "experiment.burn_in=5"],
        14,
    );
    eprintln!(
        "ns_256 on 16², 10 cycles: rmse {:.4} (forecast {:.4})",
        s.rmse_mean, s.rmse_forecast_mean
    );
    assert!((0.1..0.25).contains(&s.rmse_mean), "{}", s.rmse_mean);
}

// ---- full NS presets (15 s and 3 minutes on two cores: `cargo test --release -- --ignored`)

fn full_preset_is_inside_its_expected_band(name: &str) {
    let p = preset(name).unwrap();
    let exp = Experiment::new(p.name, p.config.clone(), Some(p.expected_rmse)).unwrap();
    let s = exp.run(&Cpu::new(), |_| {}).unwrap().summary;
    let (lo, hi) = p.expected_rmse;
    eprintln!("{name}: rmse {:.4} (band {lo}-{hi})", s.rmse_mean);
    assert!(
        (lo..hi).contains(&s.rmse_mean),
        "{name}: time-mean RMSE {} outside {lo}-{hi} ({})",
        s.rmse_mean,
        p.expected_source
    );
}

/// ns_64 with K = 100, all 200 cycles (about 15 s; 0.0462 on the preset seed).
fn ns_64_full_preset_is_inside_its_expected_band() {
    full_preset_is_inside_its_expected_band("ns_64");
}

/// The paper's NS benchmark on 256², all 60 cycles (about 3 minutes on two cores).
fn ns_256_full_preset_is_inside_its_expected_band() {
    full_preset_is_inside_its_expected_band("ns_256");
}

/// The mechanism the ns_256 preset relies on: on the paper's 256² grid with dt = 1e-4, the
/// model itself damps the white-noise part of the N(truth, 1) initial ensemble within a few
/// observation intervals (grid-scale viscous decay ν(π/Δx)²·Δt_obs ≈ 1.6 per interval), so the
/// members become smooth flows that weak guidance (λ = 1e-3) can steer.
fn ns_256_grid_damps_white_noise_perturbations() {
    let n = 256;
    let nn = n * n;
    let ns = NavierStokes2d::paper(n, 1e-4, 0.05).unwrap();
    let white = normals(21, 2 * nn);
    let truth0 = ns
        .gaussian_process_initial_condition(&white, GP_LENGTH_SCALE, 1.0)
        .unwrap();
    let noise = normals(22, 3 * nn);
    let mut member: Vec<f32> = truth0.iter().zip(&noise).map(|(a, b)| a + b).collect();
    let mut truth = truth0.clone();
    let mut scratch = vec![0.0f32; ns.scratch_len()];
    // One step first, as the preset does (the first observation is at step 1).
    ns.advance(&mut truth, 1, &mut scratch);
    ns.advance(&mut member, 1, &mut scratch);
    let velocity_error = |a: &[f32], b: &[f32]| {
        let d: Vec<f32> = a[nn..].iter().zip(&b[nn..]).map(|(x, y)| x - y).collect();
        rms(&d)
    };
    let e0 = velocity_error(&member, &truth);
    ns.advance(&mut truth, 200, &mut scratch);
    ns.advance(&mut member, 200, &mut scratch);
    let e2 = velocity_error(&member, &truth);
    eprintln!("NS 256²: velocity error of a white-noise member {e0:.3} -> {e2:.3} in 2 intervals");
    assert!(e0 > 0.5, "{e0}");
    assert!(e2 < 0.5 * e0, "velocity error {e0} -> {e2}");
}

/// Why the KS presets' analysis RMSE sits slightly above their forecast RMSE (ks_1024: 0.050
/// vs 0.045): the analysis takes in observation noise at every wave number, and one observation
/// interval of KS (4 steps, 1 time unit) damps every mode with k > 1, i.e. 7/8 of the 1024-point
/// grid's modes, by e^{(k² − k⁴)·1} ≤ e^{−2.8} for k ≥ 1.5. White noise of the analysis size
/// loses about 80% of its energy over one forecast (measured 0.0505 → 0.0225 rms), so the part
/// of the analysis error that is observation noise at high wave numbers is removed by the next
/// forecast while the error in the few growing modes remains. This is the preset's tuning
/// (strong guidance, λ = 6.94e-3) rather than a filter defect: weaker guidance loses the track
/// (λ = 3.5e-3 gives RMSE ≈ 0.2 over 300 cycles).
fn ks_forecast_damps_white_analysis_noise_within_one_interval() {
    let d = 1024;
    let ks = KuramotoSivashinsky::paper(d, 0.25).unwrap();
    let truth0 = ks.reference_initial_condition().unwrap();
    let noise = normals(31, d);
    let mut member: Vec<f32> = truth0
        .iter()
        .zip(&noise)
        .map(|(a, b)| a + 0.05 * b)
        .collect();
    let mut truth = truth0.clone();
    let mut scratch = vec![Complex::new(0.0f32, 0.0); ks.scratch_len()];
    let diff = |a: &[f32], b: &[f32]| {
        let e: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        rms(&e)
    };
    let e0 = diff(&member, &truth);
    ks.advance(&mut truth, 4, &mut scratch);
    ks.advance(&mut member, 4, &mut scratch);
    let e1 = diff(&member, &truth);
    eprintln!("KS 1024: white perturbation {e0:.4} -> {e1:.4} after one observation interval");
    assert!((0.045..0.055).contains(&e0), "{e0}");
    // Energy ratio measured 0.20; 0.3 allows other seeds' variation.
    assert!((e1 / e0).powi(2) < 0.3, "perturbation {e0} -> {e1}");
}

// ---- On the GPU, against the CPU ----
// The grid models on the GPU: the batched Stockham FFT (`shaders/spectral_fft.wgsl`) and its CPU twin
// against rustfft for every size the models use, the Kuramoto–Sivashinsky forecast
// (`shaders/spectral_ks.wgsl`) and the Navier–Stokes stencils (`shaders/stencil_ns.wgsl`) against the CPU
// models over a few steps, with odd member counts and split member blocks. The twin tests run
// everywhere; the GPU tests skip loudly without an adapter (fail under `ENFF_REQUIRE_GPU=1`).
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
    cpu: [real_fft_round_trip_recovers_the_signal_and_parseval_holds, ks_etdrk4_matches_a_small_step_reference, ks_long_run_statistics_are_sane, ns_projection_reduces_the_divergence, ns_initial_condition_is_projected_and_the_flow_stays_bounded, ns_forcing_acts_on_u_along_the_vertical_index, grids_that_cannot_be_taken_are_refused_naming_the_sizes_that_work, unstable_time_steps_are_reported_as_divergence_with_the_cycle, the_gpu_backend_runs_the_grid_models_and_refuses_grids_it_cannot_take, ks_1024_full_preset_is_inside_its_expected_band, ks_512_full_preset_is_inside_its_expected_band, ns_64_short_twin_run_on_32_squared_is_inside_its_band, ns_256_short_twin_run_on_16_squared_stays_bounded, ns_256_grid_damps_white_noise_perturbations, ks_forecast_damps_white_analysis_noise_within_one_interval, twin_fft_matches_rustfft_and_round_trips, twin_real_fft_matches_the_models_real_fft, twin_ks_forecast_follows_the_cpu_model, memory_estimate_counts_the_grid_model_scratch],
    gpu: [gpu_fft_matches_its_twin_and_rustfft, gpu_ks_forecast_matches_the_cpu_model, gpu_ns_forecast_matches_the_cpu_model_and_projects, gpu_grid_forecasts_allocate_once, gpu_twin_runs_of_grid_presets_follow_the_cpu],
    ignored: [ns_64_full_preset_is_inside_its_expected_band, ns_256_full_preset_is_inside_its_expected_band],
);
