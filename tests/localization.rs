//! Localization on the model's geometry (EnKF-PO and LETKF), the batched LETKF against the f64
//! reference, and the stochastic filters approaching the Kalman filter as the ensemble grows.

mod common;

use common::host_random;

use enff::backend::cpu::Cpu;
use enff::backend::{Backend, LocalAnalysis};
use enff::experiment::{preset, Experiment};
use enff::filter::{EnkfPo, Filter, Letkf, Observation, ParticleFilter, Resampling};
use enff::localization::Localization;
use enff::model::{DistanceKind, Geometry};
use enff::observe::{ObservationOperator, Observe, Pointwise};

/// A smooth-ish random ensemble (`n × d`) and an observation of it.
fn problem(n: usize, d: usize, op: &Observe, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let z = host_random(n + 1, d, seed, 1.0);
    let x: Vec<f32> = (0..n * d)
        .map(|e| {
            let k = e % d;
            (k as f32 * 0.37).sin() * 2.0 + z[e]
        })
        .collect();
    let m = op.obs_dim(d).unwrap();
    let truth: Vec<f32> = (0..d)
        .map(|k| (k as f32 * 0.37).sin() * 2.0 + 0.8 * z[n * d + k])
        .collect();
    let mut y = vec![0.0f32; m];
    op.apply(&truth, &mut y);
    (x, y)
}

fn spread(x: &[f32], n: usize) -> f64 {
    let d = x.len() / n;
    let mut acc = 0.0;
    for k in 0..d {
        let mean = (0..n).map(|i| x[i * d + k] as f64).sum::<f64>() / n as f64;
        acc += (0..n)
            .map(|i| (x[i * d + k] as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
    }
    (acc / d as f64).sqrt()
}

#[test]
fn localized_enkf_with_a_huge_radius_equals_the_global_enkf() {
    let cpu = Cpu::new();
    for (geometry, op, n) in [
        (
            Geometry::Ring { len: 41 },
            Observe::identity().subsample(2, 1).unwrap(),
            9,
        ),
        (
            Geometry::Torus {
                nx: 5,
                ny: 3,
                fields: 3,
            },
            Observe::arctan(),
            7,
        ),
    ] {
        let d = geometry.dim().unwrap();
        let m = op.obs_dim(d).unwrap();
        let (x, y) = problem(n, d, &op, 3);
        let eta = host_random(n, m, 4, 1.0);
        let yb = cpu.upload(1, m, &y).unwrap();
        let obs = Observation {
            y: &yb,
            operator: &op,
            noise_std: 0.7,
        };
        let mut global = cpu.upload(n, d, &x).unwrap();
        EnkfPo::<Cpu>::new(1.0, 0)
            .unwrap()
            .analyse_with_perturbations(&cpu, &mut global, &obs, &eta)
            .unwrap();
        let loc = Localization::new(1e7, geometry, DistanceKind::Geometry, d).unwrap();
        let mut local = cpu.upload(n, d, &x).unwrap();
        EnkfPo::<Cpu>::new(1.0, 0)
            .unwrap()
            .with_localization(Some(loc))
            .analyse_with_perturbations(&cpu, &mut local, &obs, &eta)
            .unwrap();
        let (g, l) = (cpu.read(&global).unwrap(), cpu.read(&local).unwrap());
        let worst = g
            .iter()
            .zip(&l)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 2e-4,
            "{geometry:?}: max |global - localized| = {worst}"
        );
        // And the analysis moved: this is not a trivial equality.
        let moved = g
            .iter()
            .zip(&x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved > 0.1,
            "{geometry:?}: the analysis barely moved ({moved})"
        );
    }
}

fn twin(sets: &[&str], seed: u64) -> f64 {
    let p = preset("lorenz96_sakov2008").unwrap();
    let mut cfg = p.config.clone();
    for s in sets {
        cfg.set(s).unwrap();
    }
    cfg.experiment.seed = seed;
    Experiment::new(p.name, cfg, None)
        .unwrap()
        .run(&Cpu::new(), |_| {})
        .unwrap()
        .summary
        .rmse_mean
}

/// With 15 members on the 40-variable Lorenz-96 the global EnKF's sampling errors swamp the
/// gain; Gaspari–Cohn localization on the ring restores a skilful filter.
#[test]
fn localization_rescues_a_small_enkf_on_lorenz96() {
    let base = [
        "filter.kind=enkf",
        "ensemble.n=15",
        "filter.inflation=1.08",
        "experiment.cycles=400",
    ];
    let global = twin(&base, 1);
    let mut sets = base.to_vec();
    sets.push("filter.loc_radius=3");
    let local = twin(&sets, 1);
    assert!(
        local < 0.45 && local < 0.5 * global,
        "localized EnKF RMSE {local}, global {global}"
    );
}

#[test]
fn batched_letkf_agrees_with_the_f64_reference() {
    let cpu = Cpu::new();
    for (geometry, kind, op, n, radius) in [
        (
            Geometry::Ring { len: 41 },
            DistanceKind::Geometry,
            Observe::identity(),
            7,
            3.0,
        ),
        (
            Geometry::Ring { len: 37 },
            DistanceKind::Geometry,
            Observe::full(Pointwise::Arctan).subsample(3, 1).unwrap(),
            13,
            2.0,
        ),
        (
            Geometry::Torus {
                nx: 7,
                ny: 5,
                fields: 3,
            },
            DistanceKind::Geometry,
            Observe::identity().subsample(2, 1).unwrap(),
            9,
            1.0,
        ),
        (
            Geometry::Torus {
                nx: 7,
                ny: 5,
                fields: 3,
            },
            DistanceKind::Flattened,
            Observe::identity(),
            5,
            2.5,
        ),
    ] {
        let d = geometry.dim().unwrap();
        let m = op.obs_dim(d).unwrap();
        let (x, y) = problem(n, d, &op, 11);
        let yb = cpu.upload(1, m, &y).unwrap();
        let obs = Observation {
            y: &yb,
            operator: &op,
            noise_std: 0.5,
        };
        let run = |host: bool| {
            let mut ens = cpu.upload(n, d, &x).unwrap();
            Letkf::<Cpu>::new(radius, 1.0)
                .unwrap()
                .with_geometry(geometry, kind)
                .with_host_reference(host)
                .with_batched(!host)
                .analyse(&cpu, &mut ens, None, &obs, 1)
                .unwrap();
            cpu.read(&ens).unwrap()
        };
        let (batched, reference) = (run(false), run(true));
        let s = spread(&x, n);
        let worst = batched
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        assert!(
            worst < 2e-5 * s.max(1.0) * (n as f64),
            "{geometry:?} {kind:?} n={n}: max difference {worst} (spread {s})"
        );
        let moved = reference
            .iter()
            .zip(&x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 0.05, "the analysis barely moved ({moved})");
    }
}

/// The host LETKF's Chebyshev local transforms give the eigendecomposition's analysis (to f32
/// rounding) from a spread far below the observation noise to one far above it (where most
/// cells fall back to the eigendecomposition), on rings and tori, odd sizes included; so does
/// the batched analysis's f32 twin (Chebyshev or Jacobi per block of cells).
#[test]
fn chebyshev_local_transforms_equal_the_eigendecomposition() {
    use enff::filter::local_transform::Solver;
    let cpu = Cpu::new();
    for (geometry, op, n, radius) in [
        (Geometry::Ring { len: 41 }, Observe::identity(), 7, 3.0),
        (
            Geometry::Ring { len: 37 },
            Observe::full(Pointwise::Arctan).subsample(3, 1).unwrap(),
            13,
            2.0,
        ),
        (
            Geometry::Torus {
                nx: 7,
                ny: 5,
                fields: 3,
            },
            Observe::identity().subsample(2, 1).unwrap(),
            20,
            1.0,
        ),
        (Geometry::Ring { len: 53 }, Observe::identity(), 33, 4.0),
    ] {
        let d = geometry.dim().unwrap();
        let m = op.obs_dim(d).unwrap();
        let (x0, y) = problem(n, d, &op, 23);
        let yb = cpu.upload(1, m, &y).unwrap();
        let obs = Observation {
            y: &yb,
            operator: &op,
            noise_std: 0.5,
        };
        for scale in [0.01f32, 0.1, 0.4, 1.0, 4.0] {
            // The same members, their spread around the member mean scaled by `scale`.
            let mut x = x0.clone();
            for k in 0..d {
                let mean = (0..n).map(|i| x0[i * d + k]).sum::<f32>() / n as f32;
                (0..n).for_each(|i| x[i * d + k] = mean + scale * (x0[i * d + k] - mean));
            }
            let run = |solver: Solver, batched: bool| {
                let mut ens = cpu.upload(n, d, &x).unwrap();
                Letkf::<Cpu>::new(radius, 1.0)
                    .unwrap()
                    .with_geometry(geometry, DistanceKind::Geometry)
                    .with_local_solver(solver)
                    .with_batched(batched)
                    .analyse(&cpu, &mut ens, None, &obs, 1)
                    .unwrap();
                cpu.read(&ens).unwrap()
            };
            let (cheb, eig) = (run(Solver::Chebyshev, false), run(Solver::Eigen, false));
            // The batched analysis's twin (f32, Chebyshev where the spread allows, Jacobi
            // otherwise) agrees with the f64 reference to f32 accuracy.
            let twin = run(Solver::Chebyshev, true);
            // f32 rounding of the values, and of the anomalies relative to the spread.
            let sp = spread(&x, n) as f32;
            let worst_twin = twin
                .iter()
                .zip(&eig)
                .map(|(a, b)| (a - b).abs() / (1e-4 * sp + 4e-6 * (1.0 + b.abs())))
                .fold(0.0f32, f32::max);
            assert!(
                worst_twin < 1.0,
                "{geometry:?} n={n} spread x{scale}: batched twin differs by {worst_twin}"
            );
            let worst = cheb
                .iter()
                .zip(&eig)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0.0f32, f32::max);
            assert!(
                worst < 2e-6,
                "{geometry:?} n={n} spread x{scale}: relative difference {worst}"
            );
            let moved = eig
                .iter()
                .zip(&x)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(moved > 1e-3 * scale, "the analysis barely moved ({moved})");
        }
    }
}

#[test]
fn geometry_and_flattened_distances_localize_differently_on_a_torus() {
    let cpu = Cpu::new();
    let geometry = Geometry::Torus {
        nx: 6,
        ny: 6,
        fields: 3,
    };
    let d = geometry.dim().unwrap();
    let op = Observe::identity();
    let (x, y) = problem(6, d, &op, 5);
    let yb = cpu.upload(1, d, &y).unwrap();
    let obs = Observation {
        y: &yb,
        operator: &op,
        noise_std: 0.5,
    };
    let run = |kind| {
        let mut ens = cpu.upload(6, d, &x).unwrap();
        Letkf::<Cpu>::new(1.0, 1.0)
            .unwrap()
            .with_geometry(geometry, kind)
            .analyse(&cpu, &mut ens, None, &obs, 1)
            .unwrap();
        cpu.read(&ens).unwrap()
    };
    let (g, f) = (run(DistanceKind::Geometry), run(DistanceKind::Flattened));
    let diff = g
        .iter()
        .zip(&f)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff > 1e-3, "the two distances gave the same analysis");
    // On a ring the two conventions coincide.
    let ring = Geometry::Ring { len: 36 };
    let loc_g = Localization::new(2.0, ring, DistanceKind::Geometry, 36).unwrap();
    let loc_f = Localization::new(2.0, ring, DistanceKind::Flattened, 36).unwrap();
    assert_eq!(
        LocalAnalysis::new(&loc_g, &op, 1.0),
        LocalAnalysis::new(&loc_f, &op, 1.0)
    );
}

#[test]
fn localized_filters_reject_bad_settings() {
    let p = preset("lorenz96_sakov2008").unwrap();
    for (sets, key) in [
        (
            &["filter.kind=enkf", "filter.loc_radius=0"][..],
            "filter.loc_radius",
        ),
        (
            &["filter.kind=letkf", "filter.loc_radius=-2"][..],
            "filter.loc_radius",
        ),
        (
            &["filter.kind=etkf", "filter.inflation=0"][..],
            "filter.inflation",
        ),
    ] {
        let mut cfg = p.config.clone();
        for s in sets {
            cfg.set(s).unwrap();
        }
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{sets:?}: {e}");
    }
    let mut cfg = p.config.clone();
    let e = cfg
        .set("filter.loc_distance=manhattan")
        .unwrap_err()
        .to_string();
    assert!(e.contains("filter.loc_distance"), "{e}");
    // A localized EnKF on a model without spatial structure (Lorenz-63).
    let p = preset("lorenz63_spantini2022").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("filter.kind=enkf").unwrap();
    cfg.set("filter.loc_radius=2").unwrap();
    let e = Experiment::new(p.name, cfg, None)
        .and_then(|exp| exp.run(&Cpu::new(), |_| {}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("filter.loc_radius") && e.contains("geometry"),
        "{e}"
    );
    assert!(EnkfPo::<Cpu>::new(-1.0, 0).is_err());
    assert!(Letkf::<Cpu>::new(f64::NAN, 1.0).is_err());
}

/// KF posterior of a 2-D Gaussian prior `N(mu, P)` observed through the identity with std σ.
fn kalman(mu: [f64; 2], p: [[f64; 2]; 2], y: [f64; 2], sigma: f64) -> ([f64; 2], [[f64; 2]; 2]) {
    let s = [
        [p[0][0] + sigma * sigma, p[0][1]],
        [p[1][0], p[1][1] + sigma * sigma],
    ];
    let det = s[0][0] * s[1][1] - s[0][1] * s[1][0];
    let si = [
        [s[1][1] / det, -s[0][1] / det],
        [-s[1][0] / det, s[0][0] / det],
    ];
    let mut k = [[0.0; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            k[i][j] = p[i][0] * si[0][j] + p[i][1] * si[1][j];
        }
    }
    let innov = [y[0] - mu[0], y[1] - mu[1]];
    let mean = [
        mu[0] + k[0][0] * innov[0] + k[0][1] * innov[1],
        mu[1] + k[1][0] * innov[0] + k[1][1] * innov[1],
    ];
    let mut pa = [[0.0; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            pa[i][j] = p[i][j] - (k[i][0] * p[0][j] + k[i][1] * p[1][j]);
        }
    }
    (mean, pa)
}

/// Mean and covariance errors of one analysis against the KF, relative to the KF's spread.
fn analysis_errors(filter: &str, n: usize, seed: u64) -> (f64, f64) {
    let cpu = Cpu::new();
    let mu = [1.0, -0.5];
    // P = L Lᵀ with L = [[1, 0], [0.6, 0.8]]: unit variances, correlation 0.6.
    let p = [[1.0, 0.6], [0.6, 1.0]];
    let sigma = 0.8;
    let y = [1.9, 0.4];
    let z = host_random(n, 2, 1000 + seed, 1.0);
    let x: Vec<f32> = (0..n)
        .flat_map(|i| {
            let (a, b) = (z[2 * i] as f64, z[2 * i + 1] as f64);
            [(mu[0] + a) as f32, (mu[1] + 0.6 * a + 0.8 * b) as f32]
        })
        .collect();
    let mut ens = cpu.upload(n, 2, &x).unwrap();
    let yb = cpu.upload(1, 2, &[y[0] as f32, y[1] as f32]).unwrap();
    let op = Observe::identity();
    let obs = Observation {
        y: &yb,
        operator: &op,
        noise_std: sigma as f32,
    };
    let mut f: Box<dyn Filter<Cpu>> = match filter {
        "enkf" => Box::new(EnkfPo::<Cpu>::new(1.0, seed).unwrap()),
        _ => Box::new(ParticleFilter::<Cpu>::new(Resampling::Systematic, 0.0, 1.0, seed).unwrap()),
    };
    f.analyse(&cpu, &mut ens, None, &obs, 1).unwrap();
    let xa = cpu.read(&ens).unwrap();
    let mean = [0, 1].map(|k| (0..n).map(|i| xa[2 * i + k] as f64).sum::<f64>() / n as f64);
    let mut cov = [[0.0; 2]; 2];
    for i in 0..n {
        for a in 0..2 {
            for b in 0..2 {
                cov[a][b] += (xa[2 * i + a] as f64 - mean[a]) * (xa[2 * i + b] as f64 - mean[b])
                    / (n - 1) as f64;
            }
        }
    }
    let (km, kp) = kalman(mu, p, y, sigma);
    let scale = (kp[0][0] + kp[1][1]).sqrt();
    let mean_err = ((mean[0] - km[0]).powi(2) + (mean[1] - km[1]).powi(2)).sqrt() / scale;
    let cov_err = (0..4)
        .map(|e| (cov[e / 2][e % 2] - kp[e / 2][e % 2]).powi(2))
        .sum::<f64>()
        .sqrt()
        / (0..4).map(|e| kp[e / 2][e % 2].powi(2)).sum::<f64>().sqrt();
    (mean_err, cov_err)
}

/// On a linear-Gaussian problem the EnKF-PO and the bootstrap particle filter converge to the
/// Kalman filter: their Monte-Carlo errors in the analysis mean and covariance shrink like
/// `1/√n` (averaged over 8 seeds).
#[test]
fn enkf_and_particle_filter_approach_the_kalman_filter_as_n_grows() {
    for filter in ["enkf", "bpf"] {
        let errs: Vec<(f64, f64)> = [50usize, 500, 2000]
            .iter()
            .map(|&n| {
                let seeds = 8;
                let sum = (0..seeds)
                    .map(|s| analysis_errors(filter, n, s))
                    .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
                (sum.0 / seeds as f64, sum.1 / seeds as f64)
            })
            .collect();
        let what = format!("{filter}: (mean, covariance) errors at n = 50, 500, 2000: {errs:?}");
        eprintln!("{what}");
        assert!(errs[1].0 < errs[0].0 && errs[2].0 < errs[1].0, "{what}");
        assert!(errs[1].1 < errs[0].1 && errs[2].1 < errs[1].1, "{what}");
        assert!(errs[2].0 < 0.05 && errs[2].1 < 0.08, "{what}");
        assert!(errs[2].0 < 0.4 * errs[0].0, "{what}");
    }
}
