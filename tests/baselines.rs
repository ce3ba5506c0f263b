//! Classical baselines: golden vectors G4 (ETKF, EnKF-PO) of ENFF_SPEC §10.3, the Kalman filter
//! on Rotation2D, ETKF = Kalman formulas with the ensemble covariance, particle-filter
//! resampling, and twin runs against published skill.
#![allow(clippy::excessive_precision)]

mod common;

use common::{assert_close, gpu, host_random};
use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::experiment::{preset, Experiment};
use enff::filter::particle::{resample, weights_from_log_likelihoods};
use enff::filter::{EnkfPo, Etkf, Filter, KalmanFilter, Observation, Resampling};
use enff::model::{Model, Rotation2d, Scheme, System};
use enff::observe::Observe;
use enff::Error;

const XF: [f32; 12] = [
    1.0, 0.5, -0.2, 0.2, -0.3, 0.4, -0.6, 0.1, 0.3, 0.4, 0.9, -0.5,
];
const Y: [f32; 3] = [0.3, 0.1, -0.1];

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() < tol,
            "{what}: entry {k}: {g} vs {w}\n{got:?}"
        );
    }
}

backend_test!(
    /// The ETKF's golden vector G4 (ENFF_SPEC), on every backend.
    etkf_matches_golden_vector_g4<B>(b) {
        let got = common::golden::etkf_g4(b);
        common::assert_close(
            &got,
            &common::golden::G4_ETKF_ANALYSIS,
            1e-5,
            0.0,
            "ETKF G4",
        );
    }
);

fn etkf_mean_and_covariance_equal_the_kalman_formulas_with_the_ensemble_covariance() {
    let cpu = Cpu::new();
    let mut ens = cpu.upload(4, 3, &XF).unwrap();
    let y = cpu.upload(1, 3, &Y).unwrap();
    let h = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &h,
        noise_std: 0.5,
    };
    Etkf::<Cpu>::new(1.0)
        .unwrap()
        .analyse(&cpu, &mut ens, None, &obs, 1)
        .unwrap();
    let xa = cpu.read(&ens).unwrap();
    let mean = |x: &[f32], k: usize| (0..4).map(|i| x[i * 3 + k] as f64).sum::<f64>() / 4.0;
    let var = |x: &[f32], k: usize| {
        let m = mean(x, k);
        (0..4)
            .map(|i| (x[i * 3 + k] as f64 - m).powi(2))
            .sum::<f64>()
            / 3.0
    };
    // spec G4: mean [0.27953238, 0.25508383, 0.02714716], cov diagonal
    // [0.14789308, 0.09539141, 0.05737186] = KF with the sample covariance.
    for (k, (m, v)) in [0.27953238, 0.25508383, 0.02714716]
        .iter()
        .zip([0.14789308, 0.09539141, 0.05737186])
        .enumerate()
    {
        assert!((mean(&xa, k) - m).abs() < 1e-5, "mean {k}");
        assert!((var(&xa, k) - v).abs() < 1e-5, "variance {k}");
    }
}

fn enkf_po_matches_golden_vector_g4() {
    let cpu = Cpu::new();
    let mut ens = cpu.upload(4, 3, &XF).unwrap();
    let y = cpu.upload(1, 3, &Y).unwrap();
    let h = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &h,
        noise_std: 0.5,
    };
    let eta = [
        0.1, -0.2, 0.05, -0.3, 0.0, 0.2, 0.2, 0.1, -0.1, 0.0, 0.15, -0.25,
    ];
    EnkfPo::<Cpu>::new(1.0, 0)
        .unwrap()
        .analyse_with_perturbations(&cpu, &mut ens, &obs, &eta)
        .unwrap();
    close(
        &cpu.read(&ens).unwrap(),
        &[
            0.56783152,
            0.23260263,
            0.05215615,
            0.24656325,
            -0.03768731,
            0.20167577,
            0.05178966,
            0.30965902,
            0.05587334,
            0.25987267,
            0.53940847,
            -0.21964515,
        ],
        1e-5,
        "EnKF-PO G4",
    );
}

fn kalman_filter_on_rotation2d_gives_p_k_equal_to_one_over_one_plus_4k() {
    let cpu = Cpu::new();
    let model = Model::new(
        System::Rotation2d(Rotation2d { theta: 0.386 }),
        1.0,
        Scheme::Rk4Classic,
    )
    .unwrap();
    let mut kf = KalmanFilter::new(&model, 1, 1.0).unwrap();
    let mut x = cpu.upload(1, 2, &[1.2, -0.3]).unwrap();
    let h = Observe::identity();
    for k in 1..=50 {
        cpu.advance(&model, &mut x, if k > 1 { 1 } else { 0 })
            .unwrap();
        let y = cpu.upload(1, 2, &[0.9, 0.1]).unwrap();
        let obs = Observation {
            y: &y,
            operator: &h,
            noise_std: 0.5,
        };
        Filter::<Cpu>::analyse(&mut kf, &cpu, &mut x, None, &obs, k).unwrap();
        let p = kf.covariance();
        let want = 1.0 / (1.0 + 4.0 * k as f64);
        assert!(
            (p[(0, 0)] - want).abs() < 1e-12 && (p[(1, 1)] - want).abs() < 1e-12,
            "k={k}: {p}"
        );
        assert!(p[(0, 1)].abs() < 1e-12);
    }
    // spec §8.6: 0.2 after the first observation, 1/201 after the 50th.
    assert!((kf.covariance()[(0, 0)] - 1.0 / 201.0).abs() < 1e-12);
}

fn particle_weights_and_resampling_are_exact_and_reject_non_finite_likelihoods() {
    let w = weights_from_log_likelihoods(&[-1.0, -2.0, -0.5, -10.0], 3).unwrap();
    let s: f64 = w.iter().sum();
    assert!((s - 1.0).abs() < 1e-12);
    assert!((w[2] / w[0] - (0.5f64).exp()).abs() < 1e-9);
    match weights_from_log_likelihoods(&[-1.0, f32::NAN], 7) {
        Err(Error::NonFinite { location, .. }) => assert!(location.contains("cycle 7")),
        other => panic!("{other:?}"),
    }
    // Systematic resampling with weights (0.5, 0.25, 0.25) and offset 0.3: points 0.075,
    // 0.325, 0.575, 0.825 → indices 0, 0, 1, 2.
    let idx = resample(&[0.5, 0.25, 0.25, 0.0], Resampling::Systematic, |_| 0.3);
    assert_eq!(idx, vec![0, 0, 1, 2]);
    // Multinomial frequencies match the weights: 30 000 particles whose weights cycle through
    // (0.2, 0.5, 0.3) are resampled; picks grouped by index mod 3 follow those proportions
    // (χ², 2 degrees of freedom, p = 0.001: 13.8).
    let wts = [0.2, 0.5, 0.3];
    let n = 30_000;
    let weights: Vec<f64> = (0..n).map(|i| wts[i % 3]).collect();
    let key = enff::rng::NoiseKey::new(5, enff::rng::Stream::Filter, 1);
    let idx = resample(&weights, Resampling::Multinomial, |k| {
        enff::rng::uniform(&key, 0, k)
    });
    let mut counts = [0usize; 3];
    for i in idx {
        counts[i % 3] += 1;
    }
    let chi2: f64 = counts
        .iter()
        .zip(wts)
        .map(|(&c, w)| (c as f64 - w * n as f64).powi(2) / (w * n as f64))
        .sum();
    assert!(chi2 < 13.8, "χ² {chi2}, counts {counts:?}");
}

fn twin(name: &str, sets: &[&str], seed: u64) -> f64 {
    let p = preset(name).unwrap();
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

/// DAPPER's published ETKF skill on this setting is 0.18–0.20 (n ≈ 25–40, inflation ≈ 1.02).
fn etkf_on_lorenz96_sakov2008_reaches_published_skill() {
    let r = twin(
        "lorenz96_sakov2008",
        &[
            "filter.kind=etkf",
            "ensemble.n=28",
            "filter.inflation=1.02",
            "experiment.cycles=600",
        ],
        1,
    );
    assert!(r <= 0.20, "ETKF time-mean RMSE {r}");
}

fn kalman_filter_preset_run_tracks_rotation2d() {
    let r = twin("rotation2d", &["filter.kind=kf", "ensemble.n=1"], 2);
    assert!(r < 0.2, "KF time-mean RMSE {r}");
}

/// The stochastic EnKF needs inflation on this setting (without it the 40-member ensemble
/// collapses); with 1.06 it reaches ≈ 0.22, in line with DAPPER's perturbed-observation EnKF.
fn enkf_po_with_inflation_tracks_lorenz96_sakov2008() {
    let r = twin(
        "lorenz96_sakov2008",
        &[
            "filter.kind=enkf",
            "filter.inflation=1.06",
            "experiment.cycles=600",
        ],
        1,
    );
    assert!(r <= 0.26, "EnKF-PO time-mean RMSE {r}");
}

fn ensf_g3(steps_out: usize) -> Vec<f32> {
    use enff::filter::{Ensf, EnsfConfig};
    let cpu = Cpu::new();
    let mut ens = cpu.upload(3, 2, &[1.0, 0.0, 0.0, 1.0, -1.0, -1.0]).unwrap();
    let y = cpu.upload(1, 2, &[0.5, 0.2]).unwrap();
    let h = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &h,
        noise_std: 0.5,
    };
    let z = cpu
        .upload(3, 2, &[0.3, -0.2, -0.5, 0.1, 0.05, 0.4])
        .unwrap();
    let xi = [
        cpu.upload(3, 2, &[0.2, -0.1, 0.0, 0.3, -0.4, 0.1]).unwrap(),
        cpu.upload(3, 2, &[-0.3, 0.2, 0.1, -0.2, 0.25, 0.0])
            .unwrap(),
    ];
    // K = 3 grid points = 2 steps; one step of the same grid is the first half.
    let mut cfg = EnsfConfig::new(2);
    cfg.eps_alpha = 0.5;
    cfg.eps_beta = 0.025;
    let mut f = Ensf::<Cpu>::new(cfg).unwrap();
    f.analyse_with_noise_steps(&cpu, &mut ens, &obs, &z, &xi, steps_out)
        .unwrap();
    cpu.read(&ens).unwrap()
}

fn ensf_matches_golden_vector_g3() {
    close(
        &ensf_g3(1),
        &[
            0.3301805,
            -0.10773065,
            -0.08274471,
            0.36033267,
            -0.40642989,
            0.25717445,
        ],
        1e-5,
        "EnSF G3 after τ = 1",
    );
    close(
        &ensf_g3(2),
        &[
            0.41960371,
            0.90641251,
            1.28607051,
            -0.01462561,
            1.77216874,
            0.1604821,
        ],
        1e-5,
        "EnSF G3 after τ = 0.5",
    );
}

/// EnSF on the paper's Lorenz-96 setting with K = 100 grid points: the v2 tables give 0.403
/// (ε_α = 0.6, ε_β = 0.075, d = 10⁶); enff measures 0.415–0.428 at d = 200–1000.
fn ensf_with_many_steps_tracks_lorenz96_bao2024() {
    let r = twin(
        "lorenz96_bao2024",
        &[
            "model.d=200",
            "filter.kind=ensf",
            "filter.flow_steps=99",
            "filter.eps_alpha=0.6",
            "filter.eps_beta=0.075",
        ],
        2,
    );
    assert!((0.3..0.5).contains(&r), "EnSF time-mean RMSE {r}");
}

/// DAPPER's LETKF on this setting reaches 0.18–0.20; the issue asks for ≤ 0.21 with n = 20 and
/// radius 4.
fn letkf_on_lorenz96_sakov2008_reaches_published_skill() {
    let r = twin(
        "lorenz96_sakov2008",
        &[
            "filter.kind=letkf",
            "ensemble.n=20",
            "filter.loc_radius=4",
            "filter.inflation=1.02",
            "experiment.cycles=500",
        ],
        1,
    );
    assert!(r <= 0.21, "LETKF time-mean RMSE {r}");
}

fn letkf_rejects_a_non_positive_radius() {
    let p = preset("rotation2d").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("filter.kind=letkf").unwrap();
    cfg.set("filter.loc_radius=0").unwrap();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("filter.loc_radius"), "{e}");
}

fn particle_filter_reports_its_effective_sample_size_per_cycle() {
    let p = preset("rotation2d").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("filter.kind=bpf").unwrap();
    cfg.set("ensemble.n=200").unwrap();
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    let r = exp.run(&Cpu::new(), |_| {}).unwrap();
    for m in &r.metrics {
        let ess = m.ess.expect("the particle filter reports an ESS");
        assert!(
            (1.0..=200.0 + 1e-9).contains(&ess),
            "cycle {}: ESS {ess}",
            m.cycle
        );
    }
    // A linear-Gaussian problem with 200 particles: the filter tracks the truth.
    assert!(
        r.summary.rmse_mean < 0.25,
        "BPF RMSE {}",
        r.summary.rmse_mean
    );
    // Flow filters report none.
    let exp = Experiment::from_preset("rotation2d").unwrap();
    assert!(exp
        .run(&Cpu::new(), |_| {})
        .unwrap()
        .metrics
        .iter()
        .all(|m| m.ess.is_none()));
}

// ---- On the GPU, against the CPU ----
// The ensemble transform (the device operation of the ETKF, EnKF and particle resampling) on
// the GPU against the CPU, and the ETKF golden vector on the GPU.
// Golden vectors are quoted with the digits the specification gives.

fn ensemble_transform_matches_the_cpu_twin() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for &n in &[1usize, 2, 3, 17, 64] {
        for &d in &[1usize, 5, 1000, 4099] {
            let w = host_random(n, n, 1, 1.0);
            let x = host_random(n, d, 2, 1.0);
            let (wc, xc) = (cpu.upload(n, n, &w).unwrap(), cpu.upload(n, d, &x).unwrap());
            let (wg, xg) = (g.upload(n, n, &w).unwrap(), g.upload(n, d, &x).unwrap());
            let mut oc = cpu.zeros(n, d).unwrap();
            let mut og = g.upload(n, d, &vec![f32::NAN; n * d]).unwrap();
            cpu.ensemble_transform(&wc, &xc, &mut oc).unwrap();
            g.ensemble_transform(&wg, &xg, &mut og).unwrap();
            // n-term f32 sums, FMA on one side: ≲ 1e-6 relative to the terms' magnitude.
            assert_close(
                &g.read(&og).unwrap(),
                &cpu.read(&oc).unwrap(),
                1e-5 * n as f64,
                1e-5,
                &format!("ensemble_transform n={n} d={d}"),
            );
        }
    }
}

fn ensf_golden_vector_g3_holds_on_the_gpu() {
    use enff::filter::{Ensf, EnsfConfig};
    let Some((_lock, g)) = gpu() else { return };
    let mut ens = g.upload(3, 2, &[1.0, 0.0, 0.0, 1.0, -1.0, -1.0]).unwrap();
    let y = g.upload(1, 2, &[0.5, 0.2]).unwrap();
    let h = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &h,
        noise_std: 0.5,
    };
    let z = g.upload(3, 2, &[0.3, -0.2, -0.5, 0.1, 0.05, 0.4]).unwrap();
    let xi = [
        g.upload(3, 2, &[0.2, -0.1, 0.0, 0.3, -0.4, 0.1]).unwrap(),
        g.upload(3, 2, &[-0.3, 0.2, 0.1, -0.2, 0.25, 0.0]).unwrap(),
    ];
    let mut f = Ensf::new(EnsfConfig::new(2)).unwrap();
    f.analyse_with_noise(g, &mut ens, &obs, &z, &xi).unwrap();
    let want = [
        0.41960371f32,
        0.90641251,
        1.28607051,
        -0.01462561,
        1.77216874,
        0.1604821,
    ];
    assert_close(
        &g.read(&ens).unwrap(),
        &want,
        1e-5,
        0.0,
        "EnSF G3 on the GPU",
    );
}

/// Every baseline runs on the GPU backend and agrees with the CPU (same inputs, same noise).
fn baselines_agree_on_both_backends() {
    use enff::filter::{EnkfPo, Letkf, ParticleFilter, Resampling};
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let (n, d) = (8, 40);
    let x = host_random(n, d, 7, 1.0);
    let y: Vec<f32> = host_random(1, d, 8, 1.0).iter().map(|v| 0.5 * v).collect();
    let h = Observe::identity();
    type Make = fn() -> (
        Box<dyn Filter<Cpu>>,
        Box<dyn Filter<enff::backend::gpu::Gpu>>,
    );
    let makers: [(&str, Make); 4] = [
        ("etkf", || {
            (
                Box::new(Etkf::new(1.02).unwrap()),
                Box::new(Etkf::new(1.02).unwrap()),
            )
        }),
        ("enkf", || {
            (
                Box::new(EnkfPo::new(1.0, 3).unwrap()),
                Box::new(EnkfPo::new(1.0, 3).unwrap()),
            )
        }),
        ("letkf", || {
            (
                Box::new(Letkf::new(3.0, 1.0).unwrap()),
                Box::new(Letkf::new(3.0, 1.0).unwrap()),
            )
        }),
        ("bpf", || {
            (
                Box::new(ParticleFilter::new(Resampling::Systematic, 0.0, 1.0, 3).unwrap()),
                Box::new(ParticleFilter::new(Resampling::Systematic, 0.0, 1.0, 3).unwrap()),
            )
        }),
    ];
    for (name, make) in makers {
        let (mut fc, mut fg) = make();
        let (mut ec, yc) = (cpu.upload(n, d, &x).unwrap(), cpu.upload(1, d, &y).unwrap());
        let (mut eg, yg) = (g.upload(n, d, &x).unwrap(), g.upload(1, d, &y).unwrap());
        fc.analyse(
            &cpu,
            &mut ec,
            None,
            &Observation {
                y: &yc,
                operator: &h,
                noise_std: 0.5,
            },
            1,
        )
        .unwrap();
        fg.analyse(
            g,
            &mut eg,
            None,
            &Observation {
                y: &yg,
                operator: &h,
                noise_std: 0.5,
            },
            1,
        )
        .unwrap();
        assert_close(
            &g.read(&eg).unwrap(),
            &cpu.read(&ec).unwrap(),
            1e-4,
            1e-4,
            name,
        );
    }
}

test_main!(
    cpu: [etkf_matches_golden_vector_g4::cpu, etkf_mean_and_covariance_equal_the_kalman_formulas_with_the_ensemble_covariance, enkf_po_matches_golden_vector_g4, kalman_filter_on_rotation2d_gives_p_k_equal_to_one_over_one_plus_4k, particle_weights_and_resampling_are_exact_and_reject_non_finite_likelihoods, etkf_on_lorenz96_sakov2008_reaches_published_skill, kalman_filter_preset_run_tracks_rotation2d, enkf_po_with_inflation_tracks_lorenz96_sakov2008, ensf_matches_golden_vector_g3, ensf_with_many_steps_tracks_lorenz96_bao2024, letkf_on_lorenz96_sakov2008_reaches_published_skill, letkf_rejects_a_non_positive_radius, particle_filter_reports_its_effective_sample_size_per_cycle],
    gpu: [ensemble_transform_matches_the_cpu_twin, etkf_matches_golden_vector_g4::gpu, ensf_golden_vector_g3_holds_on_the_gpu, baselines_agree_on_both_backends],
);
