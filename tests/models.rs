//! Oracle tests of the forecast models (ENFF_SPEC §8.2, §8.3, §8.6, §8.8, §10.2 item 8) and of
//! the backend's model, metric and noise kernels.
//!
//! Every test is named for the property it checks and asserts numbers. The integrators run in
//! f32 (the crate's storage precision); the convergence references are computed here in f64 with
//! the same vector field, so the measured errors are time-discretization errors and not f32
//! rounding (each case keeps its smallest error well above the f32 noise floor, ~1e-5 here).

use enff::backend::{cpu::Cpu, Backend};
use enff::model::{Lorenz63, Lorenz96, Model, Rotation2d, Scheme, System};
use enff::rng::{self, NoiseKey, Stream};
use enff::Error;

/// Standard normals from the crate's Philox generator (`User` stream), `n × d` row-major.
fn normals(seed: u64, cycle: u32, n: usize, d: usize) -> Vec<f32> {
    let key = NoiseKey::new(seed, Stream::User, cycle);
    let mut out = vec![0.0f32; n * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        rng::fill_normal_row(&key, i as u32, row);
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Formats numbers as `[1.234e-5, …]`.
fn sci(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x:.3e}")).collect();
    format!("[{}]", parts.join(", "))
}

/// Least-squares slope of `log(err)` against `log(dt)`: the observed convergence order.
fn observed_order(dts: &[f64], errs: &[f64]) -> f64 {
    let xs: Vec<f64> = dts.iter().map(|v| v.ln()).collect();
    let ys: Vec<f64> = errs.iter().map(|v| v.ln()).collect();
    let n = xs.len() as f64;
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    sxy / sxx
}

// ---- f64 reference vector fields (the same formulas as the crate's, written independently) ----

fn l63_rhs_f64(p: &Lorenz63, x: &[f64], dx: &mut [f64]) {
    let (s, r, b) = (p.sigma as f64, p.rho as f64, p.beta as f64);
    dx[0] = s * (x[1] - x[0]);
    dx[1] = x[0] * (r - x[2]) - x[1];
    dx[2] = x[0] * x[1] - b * x[2];
}

fn l96_rhs_f64(forcing: f64, x: &[f64], dx: &mut [f64]) {
    let d = x.len();
    for k in 0..d {
        let xp1 = x[(k + 1) % d];
        let xm1 = x[(k + d - 1) % d];
        let xm2 = x[(k + d - 2) % d];
        dx[k] = (xp1 - xm2) * xm1 - x[k] + forcing;
    }
}

/// Classic RK4 in f64 with `steps` steps of size `dt`: the tiny-step reference.
fn rk4_f64(f: &dyn Fn(&[f64], &mut [f64]), x0: &[f64], dt: f64, steps: usize) -> Vec<f64> {
    let d = x0.len();
    let mut x = x0.to_vec();
    let (mut k1, mut k2, mut k3, mut k4, mut tmp) = (
        vec![0.0; d],
        vec![0.0; d],
        vec![0.0; d],
        vec![0.0; d],
        vec![0.0; d],
    );
    for _ in 0..steps {
        f(&x, &mut k1);
        for c in 0..d {
            tmp[c] = x[c] + 0.5 * dt * k1[c];
        }
        f(&tmp, &mut k2);
        for c in 0..d {
            tmp[c] = x[c] + 0.5 * dt * k2[c];
        }
        f(&tmp, &mut k3);
        for c in 0..d {
            tmp[c] = x[c] + dt * k3[c];
        }
        f(&tmp, &mut k4);
        for c in 0..d {
            x[c] += dt / 6.0 * (k1[c] + 2.0 * k2[c] + 2.0 * k3[c] + k4[c]);
        }
    }
    x
}

/// Advances one f32 state by `steps` steps of `model` on the CPU backend.
fn advance_one(cpu: &Cpu, model: &Model, x0: &[f32], steps: usize) -> Vec<f32> {
    let mut buf = cpu.upload(1, x0.len(), x0).unwrap();
    cpu.advance(model, &mut buf, steps).unwrap();
    cpu.read(&buf).unwrap()
}

/// A Lorenz-63 state on the attractor (a short f64 spin-up from (1, 1, 1)).
fn l63_on_attractor() -> Vec<f32> {
    let p = Lorenz63::default();
    let x = rk4_f64(
        &|x, dx| l63_rhs_f64(&p, x, dx),
        &[1.0, 1.0, 1.0],
        1e-3,
        5000,
    );
    x.iter().map(|&v| v as f32).collect()
}

/// A Lorenz-96 (d = 40, F = 8) state on the attractor.
fn l96_on_attractor(d: usize) -> Vec<f32> {
    let mut x0 = vec![8.0f64; d];
    x0[0] += 0.01;
    let x = rk4_f64(&|x, dx| l96_rhs_f64(8.0, x, dx), &x0, 1e-2, 1000);
    x.iter().map(|&v| v as f32).collect()
}

fn l63_model(dt: f64, scheme: Scheme) -> Model {
    Model::new(System::Lorenz63(Lorenz63::default()), dt as f32, scheme).unwrap()
}

fn l96_model(d: usize, dt: f64, scheme: Scheme) -> Model {
    Model::new(
        System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
        dt as f32,
        scheme,
    )
    .unwrap()
}

/// Errors after integrating to `t_end` with each `dt`, against an f64 reference.
fn global_errors(
    cpu: &Cpu,
    model_of: &dyn Fn(f64) -> Model,
    x0: &[f32],
    reference: &[f64],
    t_end: f64,
    dts: &[f64],
) -> Vec<f64> {
    dts.iter()
        .map(|&dt| {
            let steps = (t_end / dt).round() as usize;
            assert!((steps as f64 * dt - t_end).abs() < 1e-12);
            max_abs_diff(&advance_one(cpu, &model_of(dt), x0, steps), reference)
        })
        .collect()
}

#[test]
fn rk4_three_eighths_and_classic_converge_at_order_four_on_lorenz63_and_lorenz96() {
    let cpu = Cpu::new();
    // Lorenz-63 to t = 1 from a point on the attractor. The f32 noise floor is ~5e-6 (|x| ~ 20),
    // so dt stops at 0.0125 where the error is still ~1e-4.
    let x0 = l63_on_attractor();
    let x0d: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
    let p = Lorenz63::default();
    let t_end = 1.0;
    let reference = rk4_f64(
        &|x, dx| l63_rhs_f64(&p, x, dx),
        &x0d,
        t_end / 40_000.0,
        40_000,
    );
    let dts = [0.05, 0.025, 0.0125];
    for scheme in [Scheme::Rk4ThreeEighths, Scheme::Rk4Classic] {
        let errs = global_errors(
            &cpu,
            &|dt| l63_model(dt, scheme),
            &x0,
            &reference,
            t_end,
            &dts,
        );
        let order = observed_order(&dts, &errs);
        println!(
            "Lorenz-63 {scheme:?}: errors {}, observed order {order:.3}",
            sci(&errs)
        );
        assert!(
            errs[2] > 2e-5,
            "smallest error {} is at the f32 noise floor",
            errs[2]
        );
        assert!(
            (3.5..=4.5).contains(&order),
            "L63 {scheme:?}: order {order}, errors {errs:?}"
        );
    }

    // Lorenz-96 (d = 40, F = 8) to t = 0.5.
    let d = 40;
    let x0 = l96_on_attractor(d);
    let x0d: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
    let t_end = 0.5;
    let reference = rk4_f64(
        &|x, dx| l96_rhs_f64(8.0, x, dx),
        &x0d,
        t_end / 20_000.0,
        20_000,
    );
    let dts = [0.1, 0.05, 0.025, 0.0125];
    for scheme in [Scheme::Rk4ThreeEighths, Scheme::Rk4Classic] {
        let errs = global_errors(
            &cpu,
            &|dt| l96_model(d, dt, scheme),
            &x0,
            &reference,
            t_end,
            &dts,
        );
        let order = observed_order(&dts, &errs);
        println!(
            "Lorenz-96 {scheme:?}: errors {}, observed order {order:.3}",
            sci(&errs)
        );
        assert!(
            errs[3] > 2e-5,
            "smallest error {} is at the f32 noise floor",
            errs[3]
        );
        assert!(
            (3.5..=4.5).contains(&order),
            "L96 {scheme:?}: order {order}, errors {errs:?}"
        );
    }
}

/// A model family indexed by time step and scheme.
type ModelOf = Box<dyn Fn(f64, Scheme) -> Model>;

#[test]
fn rk4_three_eighths_and_classic_agree_to_fifth_order_per_step() {
    // One step of each scheme from the same state: both have local error C dt^5 with different
    // constants, so their difference scales as dt^5 (ENFF_SPEC §10.2 item 8). The dt ranges stop
    // where the difference reaches the f32 resolution of the state (~1e-6 at |x| ~ 10).
    let cpu = Cpu::new();
    let cases: [(&str, ModelOf, Vec<f32>, Vec<f64>); 2] = [
        (
            "Lorenz-63",
            Box::new(l63_model),
            l63_on_attractor(),
            vec![0.08, 0.06, 0.04, 0.03],
        ),
        (
            "Lorenz-96",
            Box::new(|dt, s| l96_model(40, dt, s)),
            l96_on_attractor(40),
            vec![0.06, 0.04, 0.03, 0.02],
        ),
    ];
    for (name, model_of, x0, dts) in cases.iter() {
        let mut diffs = Vec::new();
        for &dt in dts {
            let a = advance_one(&cpu, &model_of(dt, Scheme::Rk4ThreeEighths), x0, 1);
            let b = advance_one(&cpu, &model_of(dt, Scheme::Rk4Classic), x0, 1);
            let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            let step = max_abs_diff(x0, &b);
            let diff = max_abs_diff(&a, &b);
            // The schemes agree far better than one step moves the state.
            assert!(
                diff < 1e-2 * step,
                "{name} dt={dt}: diff {diff} vs step {step}"
            );
            diffs.push(diff);
        }
        let order = observed_order(dts, &diffs);
        let consts: Vec<f64> = diffs
            .iter()
            .zip(dts)
            .map(|(e, dt)| e / dt.powi(5))
            .collect();
        println!(
            "{name}: one-step differences {}, order {order:.3}, diff/dt^5 {consts:.1?}",
            sci(&diffs)
        );
        assert!(
            *diffs.last().unwrap() > 4e-6,
            "{name}: difference at the f32 floor"
        );
        assert!(
            (4.5..=5.5).contains(&order),
            "{name}: order {order}, diffs {diffs:?}"
        );
    }
}

#[test]
fn lorenz96_tendency_vanishes_at_the_fixed_point_and_matches_hand_values() {
    for d in [4usize, 5, 40] {
        let l = Lorenz96::new(d, 8.0).unwrap();
        let x = vec![8.0f32; d];
        let mut dx = vec![1.0f32; d];
        l.rhs(&x, &mut dx);
        assert!(dx.iter().all(|&v| v == 0.0), "d={d}: {dx:?}");
    }
    // d = 5, x = (1, 2, 3, 4, 5), F = 8: dx_k = (x_{k+1} - x_{k-2}) x_{k-1} - x_k + F
    //   k=0: (2-4)*5 - 1 + 8 = -3     k=1: (3-5)*1 - 2 + 8 = 4     k=2: (4-1)*2 - 3 + 8 = 11
    //   k=3: (5-2)*3 - 4 + 8 = 13     k=4: (1-3)*4 - 5 + 8 = -5
    let l = Lorenz96::new(5, 8.0).unwrap();
    let mut dx = vec![0.0f32; 5];
    l.rhs(&[1.0, 2.0, 3.0, 4.0, 5.0], &mut dx);
    assert_eq!(dx, vec![-3.0, 4.0, 11.0, 13.0, -5.0]);
    // d = 4 (the smallest allowed), x = (1, 2, 3, 4):
    //   k=0: (2-3)*4 - 1 + 8 = 3   k=1: (3-4)*1 - 2 + 8 = 5   k=2: (4-1)*2 - 3 + 8 = 11
    //   k=3: (1-2)*3 - 4 + 8 = 1
    let model = Model::new(
        System::Lorenz96(Lorenz96::new(4, 8.0).unwrap()),
        0.01,
        Scheme::Rk4Classic,
    )
    .unwrap();
    let mut dx = vec![0.0f32; 4];
    assert!(model.rhs(&[1.0, 2.0, 3.0, 4.0], &mut dx));
    assert_eq!(dx, vec![3.0, 5.0, 11.0, 1.0]);
    // A random state at d = 7 against the f64 formula written out here.
    let x = normals(11, 0, 1, 7);
    let mut dx = vec![0.0f32; 7];
    Lorenz96::new(7, 8.0).unwrap().rhs(&x, &mut dx);
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut want = vec![0.0; 7];
    l96_rhs_f64(8.0, &xd, &mut want);
    assert!(max_abs_diff(&dx, &want) < 1e-5, "{dx:?} vs {want:?}");
    // Lorenz-63 at (1, 2, 3): (10 (2-1), 1 (28-3) - 2, 1*2 - 8/3*3) = (10, 23, -6).
    let mut dx = vec![0.0f32; 3];
    Lorenz63::default().rhs(&[1.0, 2.0, 3.0], &mut dx);
    assert!(max_abs_diff(&dx, &[10.0, 23.0, -6.0]) < 1e-6, "{dx:?}");
}

#[test]
fn rotation2d_k_steps_rotate_by_k_theta_and_preserve_the_norm() {
    let cpu = Cpu::new();
    let theta = 0.386_f64;
    let model = Model::new(
        System::Rotation2d(Rotation2d { theta }),
        1.0,
        Scheme::Rk4ThreeEighths,
    )
    .unwrap();
    let n = 5;
    let x0 = normals(3, 0, n, 2);
    for k in [1usize, 2, 7, 50] {
        let (s, c) = (theta * k as f64).sin_cos();
        let mut buf = cpu.upload(n, 2, &x0).unwrap();
        cpu.advance(&model, &mut buf, k).unwrap();
        let got = cpu.read(&buf).unwrap();
        // k single steps, as the cycle loop does with obs_every = 1.
        let mut stepwise = cpu.upload(n, 2, &x0).unwrap();
        for _ in 0..k {
            cpu.advance(&model, &mut stepwise, 1).unwrap();
        }
        let stepwise = cpu.read(&stepwise).unwrap();
        for i in 0..n {
            let (a, b) = (x0[2 * i] as f64, x0[2 * i + 1] as f64);
            let want = [c * a - s * b, s * a + c * b];
            let r0 = a.hypot(b);
            let err = max_abs_diff(&got[2 * i..2 * i + 2], &want);
            assert!(err <= 1e-6 * r0.max(1.0), "k={k} member {i}: error {err}");
            let err_steps = max_abs_diff(&stepwise[2 * i..2 * i + 2], &want);
            assert!(
                err_steps <= 1e-6 * r0.max(1.0) * k as f64,
                "k={k} member {i}: stepwise error {err_steps}"
            );
            let r = (got[2 * i] as f64).hypot(got[2 * i + 1] as f64);
            assert!(
                (r - r0).abs() <= 1e-6 * r0.max(1.0),
                "k={k}: norm {r} vs {r0}"
            );
            let r_steps = (stepwise[2 * i] as f64).hypot(stepwise[2 * i + 1] as f64);
            assert!(
                (r_steps - r0).abs() <= 1e-6 * r0.max(1.0) * k as f64,
                "k={k}: norm {r_steps} vs {r0}"
            );
        }
    }
}

#[test]
fn advancing_an_ensemble_equals_advancing_each_member_alone() {
    let cpu = Cpu::new();
    // Sizes large enough that the backend splits the members over threads.
    let cases = [
        (
            l96_model(40, 0.01, Scheme::Rk4ThreeEighths),
            7usize,
            40usize,
            30usize,
        ),
        (l63_model(0.05, Scheme::Rk4Classic), 33, 3, 200),
        (
            Model::new(
                System::Rotation2d(Rotation2d { theta: 0.3 }),
                1.0,
                Scheme::Rk4Classic,
            )
            .unwrap(),
            9,
            2,
            3,
        ),
    ];
    for (model, n, d, steps) in cases.iter() {
        let (n, d, steps) = (*n, *d, *steps);
        let x0: Vec<f32> = normals(5, 1, n, d).iter().map(|v| 3.0 * v).collect();
        let mut all = cpu.upload(n, d, &x0).unwrap();
        cpu.advance(model, &mut all, steps).unwrap();
        let all = cpu.read(&all).unwrap();
        for i in 0..n {
            let alone = advance_one(&cpu, model, &x0[i * d..(i + 1) * d], steps);
            assert_eq!(
                &all[i * d..(i + 1) * d],
                alone.as_slice(),
                "{} member {i}",
                model.name()
            );
        }
        // And the states really moved.
        assert!(max_abs_diff(&all, &x0.iter().map(|&v| v as f64).collect::<Vec<_>>()) > 0.1);
    }
    // A buffer of the wrong width is a shape error.
    let mut wrong = cpu.upload(2, 3, &[0.0; 6]).unwrap();
    assert!(matches!(
        cpu.advance(&cases[0].0, &mut wrong, 1),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn invalid_models_are_rejected_with_the_parameter_named() {
    for d in [0usize, 1, 2, 3] {
        match Lorenz96::new(d, 8.0) {
            Err(e @ Error::InvalidParameter { .. }) => {
                assert!(e.to_string().contains("model.d"), "{e}");
            }
            other => panic!("Lorenz96::new({d}) gave {other:?}"),
        }
    }
    assert!(Lorenz96::new(4, 8.0).is_ok());
    assert!(matches!(
        Lorenz96::new(10, f32::NAN),
        Err(Error::InvalidParameter { .. })
    ));
    for dt in [0.0f32, -0.01, f32::NAN, f32::INFINITY] {
        match Model::new(
            System::Lorenz63(Lorenz63::default()),
            dt,
            Scheme::Rk4Classic,
        ) {
            Err(e @ Error::InvalidParameter { .. }) => {
                assert!(e.to_string().contains("model.dt"), "{e}");
            }
            other => panic!("Model::new(dt = {dt}) gave {other:?}"),
        }
    }
}

#[test]
fn ensemble_stats_match_hand_computed_rmse_and_spread() {
    let cpu = Cpu::new();
    // Members (1, 2), (3, 4), (5, 9); truth (2, 5). Mean (3, 5): rmse = sqrt((1 + 0) / 2).
    // Unbiased variances: (1, 3, 5) → 4, (2, 4, 9) → 13; spread = sqrt((4 + 13) / 2).
    let ens = cpu.upload(3, 2, &[1.0, 2.0, 3.0, 4.0, 5.0, 9.0]).unwrap();
    let truth = cpu.upload(1, 2, &[2.0, 5.0]).unwrap();
    let s = cpu.ensemble_stats(&ens, &truth).unwrap();
    assert!((s.rmse - 0.5f64.sqrt()).abs() < 1e-12, "rmse {}", s.rmse);
    assert!(
        (s.spread - 8.5f64.sqrt()).abs() < 1e-12,
        "spread {}",
        s.spread
    );
    // One member (3, 7): the spread is 0 and rmse = sqrt(((3-2)² + (7-5)²) / 2) = sqrt(2.5).
    let one = cpu.upload(1, 2, &[3.0, 7.0]).unwrap();
    let s = cpu.ensemble_stats(&one, &truth).unwrap();
    assert_eq!(s.spread, 0.0);
    assert!((s.rmse - 2.5f64.sqrt()).abs() < 1e-12, "rmse {}", s.rmse);
    // A larger random case (split over threads) against a direct f64 computation.
    let (n, d) = (20, 5000);
    let x = normals(21, 0, n, d);
    let t = normals(22, 0, 1, d);
    let (mut se, mut var) = (0.0f64, 0.0f64);
    for k in 0..d {
        let mean = (0..n).map(|i| x[i * d + k] as f64).sum::<f64>() / n as f64;
        se += (mean - t[k] as f64).powi(2);
        var += (0..n)
            .map(|i| (x[i * d + k] as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
    }
    let s = cpu
        .ensemble_stats(
            &cpu.upload(n, d, &x).unwrap(),
            &cpu.upload(1, d, &t).unwrap(),
        )
        .unwrap();
    assert!(
        (s.rmse - (se / d as f64).sqrt()).abs() < 1e-9,
        "rmse {}",
        s.rmse
    );
    assert!(
        (s.spread - (var / d as f64).sqrt()).abs() < 1e-9,
        "spread {}",
        s.spread
    );
    // Standard normals: spread ≈ 1, rmse ≈ sqrt(1 + 1/n) (truth and mean both random).
    assert!((s.spread - 1.0).abs() < 0.02, "spread {}", s.spread);
    assert!(
        (s.rmse - (1.0f64 + 1.0 / n as f64).sqrt()).abs() < 0.03,
        "rmse {}",
        s.rmse
    );
    // The truth must be 1 x d.
    assert!(matches!(
        cpu.ensemble_stats(&ens, &cpu.upload(1, 3, &[0.0; 3]).unwrap()),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn fill_normal_with_mean_and_scale_is_mean_plus_scale_times_philox_normals() {
    let cpu = Cpu::new();
    let (n, d) = (6, 11);
    let key = NoiseKey::new(987_654_321, Stream::InitialEnsemble, 4).with_step(2);
    let z: Vec<f32> = (0..n)
        .flat_map(|i| (0..d).map(move |k| rng::normal(&key, i as u32, k)))
        .collect();
    // No mean, unit scale: exactly the pointwise normals.
    let mut out = cpu.zeros(n, d).unwrap();
    cpu.fill_normal(&mut out, key, None, 1.0).unwrap();
    assert_eq!(cpu.read(&out).unwrap(), z);
    // A full n x d mean and a 1 x d mean broadcast over members.
    let mean_full: Vec<f32> = (0..n * d).map(|k| 0.25 * k as f32 - 3.0).collect();
    let mean_row: Vec<f32> = (0..d).map(|k| 1.5 - 0.5 * k as f32).collect();
    let scale = 0.37f32;
    for (mean, rows) in [(&mean_full, n), (&mean_row, 1)] {
        let mb = cpu.upload(rows, d, mean).unwrap();
        cpu.fill_normal(&mut out, key, Some(&mb), scale).unwrap();
        let got = cpu.read(&out).unwrap();
        for i in 0..n {
            for k in 0..d {
                let mu = if rows == 1 { mean[k] } else { mean[i * d + k] };
                let want = mu as f64 + scale as f64 * z[i * d + k] as f64;
                let g = got[i * d + k] as f64;
                assert!(
                    (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "({i}, {k}): {g} vs {want}"
                );
            }
        }
    }
    // A mismatched mean is a shape error.
    let bad = cpu.upload(2, d, &vec![0.0; 2 * d]).unwrap();
    assert!(matches!(
        cpu.fill_normal(&mut out, key, Some(&bad), 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
}
