//! EnFF on the GPU end to end: golden vectors, a full analysis against the CPU with the same
//! seed, bad input, and short twin runs on both backends.

mod common;

use common::{assert_close, gpu, gpu_split};
use enff::backend::cpu::Cpu;
use enff::backend::gpu::Gpu;
use enff::backend::Backend;
use enff::experiment::{preset, Experiment};
use enff::filter::{Enff, EnffConfig, Filter, Observation};
use enff::flow::{GuidanceKind, Integrator};
use enff::observe::Observe;
use enff::rng::{NoiseKey, Stream};
use enff::Error;

const XF: [f32; 6] = [1.0, 0.0, 0.0, 1.0, -1.0, -1.0];

fn golden<B: Backend>(
    b: &B,
    cfg: EnffConfig,
    y: [f32; 2],
    sy: f32,
    op: Observe,
    prev: Option<[f32; 6]>,
    noise: [f32; 6],
) -> Vec<f32> {
    let mut ens = b.upload(3, 2, &XF).unwrap();
    let yb = b.upload(1, 2, &y).unwrap();
    let pb = prev.map(|p| b.upload(3, 2, &p).unwrap());
    let nb = b.upload(3, 2, &noise).unwrap();
    let obs = Observation {
        y: &yb,
        operator: &op,
        noise_std: sy,
    };
    let mut f = Enff::<B>::new(cfg).unwrap();
    f.analyse_with_noise(b, &mut ens, pb.as_ref(), &obs, &nb)
        .unwrap();
    b.read(&ens).unwrap()
}

backend_test!(
    /// EnFF golden vectors G1 (OT path) and G2 (F2P path), on every backend.
    golden_vectors_g1_g2_hold<B>(b) {
        let z = [0.3, -0.2, -0.5, 0.1, 0.05, 0.4];
        let g1 = golden(
            b,
            EnffConfig::ot(0.1, 0.3, 2),
            [0.5, 0.2],
            0.5,
            Observe::identity(),
            None,
            z,
        );
        let want1 = [
            0.521_863_1_f32,
            0.19912087,
            0.38476144,
            0.24178224,
            0.47208513,
            0.289_074_2,
        ];
        assert_close(&g1, &want1, 1e-5, 0.0, "G1 on the GPU");
        let prev = [0.8, 0.1, 0.1, 0.7, -0.7, -0.9];
        let eps = [0.1, -0.3, 0.2, 0.2, -0.1, 0.05];
        let g2 = golden(
            b,
            EnffConfig::f2p(0.05, 0.02, 3),
            [0.6, 0.3],
            0.1,
            Observe::arctan(),
            Some(prev),
            eps,
        );
        let want2 = [
            0.840_687_2_f32,
            0.290_094_6,
            0.587_280_7,
            0.554_145_2,
            0.45437655,
            0.10638593,
        ];
        // arctan on the GPU carries a few ulp more error than the CPU's.
        assert_close(&g2, &want2, 2e-5, 0.0, "G2 on the GPU");
        let g2u = golden(
            b,
            EnffConfig::f2p(0.05, 0.0, 3),
            [0.6, 0.3],
            0.1,
            Observe::arctan(),
            Some(prev),
            eps,
        );
        assert_close(
            &g2u,
            &[1.005, -0.015, 0.01, 1.01, -1.005, -0.9975],
            1e-5,
            0.0,
            "G2 without guidance",
        );
    }
);

/// One analysis with the filter's own Philox source noise on both backends.
fn analysis<B: Backend>(b: &B, cfg: EnffConfig, n: usize, d: usize, op: &Observe) -> Vec<f32> {
    let key = |s| NoiseKey::new(99, s, 0);
    let cpu = Cpu::new();
    let mut f = cpu.zeros(n, d).unwrap();
    cpu.fill_normal(&mut f, key(Stream::User), None, 1.0)
        .unwrap();
    let mut p = cpu.zeros(n, d).unwrap();
    let fc = cpu.read(&f).unwrap();
    cpu.fill_normal(&mut p, key(Stream::Truth), Some(&f), 0.3)
        .unwrap();
    let m = enff::observe::ObservationOperator::obs_dim(op, d).unwrap();
    let mut y = cpu.zeros(1, m).unwrap();
    cpu.fill_normal(&mut y, key(Stream::Observation), None, 0.5)
        .unwrap();
    let (pc, yc) = (cpu.read(&p).unwrap(), cpu.read(&y).unwrap());
    let mut ens = b.upload(n, d, &fc).unwrap();
    let prev = b.upload(n, d, &pc).unwrap();
    let yb = b.upload(1, m, &yc).unwrap();
    let obs = Observation {
        y: &yb,
        operator: op,
        noise_std: 0.3,
    };
    let mut filter = Enff::<B>::new(cfg).unwrap();
    filter.analyse(b, &mut ens, Some(&prev), &obs, 4).unwrap();
    b.read(&ens).unwrap()
}

fn full_analysis_agrees_with_the_cpu_to_1e4() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let op_sub = Observe::arctan().subsample(2, 1).unwrap();
    for (n, d) in [(2usize, 5usize), (17, 1000), (20, 4099)] {
        for (cfg, op) in [
            (EnffConfig::f2p(0.05, 0.05, 9), Observe::arctan()),
            (
                EnffConfig {
                    integrator: Integrator::Heun,
                    ..EnffConfig::f2p(0.3, 0.1, 4)
                },
                op_sub,
            ),
            (
                EnffConfig {
                    inflation: 1.1,
                    ..EnffConfig::ot(0.1, 0.2, 9)
                },
                Observe::identity(),
            ),
            (
                EnffConfig {
                    guidance: GuidanceKind::MonteCarlo,
                    ..EnffConfig::ot(0.2, 0.0, 6)
                },
                Observe::identity(),
            ),
        ] {
            let a = analysis(g, cfg.clone(), n, d, &op);
            let b = analysis(&cpu, cfg.clone(), n, d, &op);
            // Same Philox noise, same formulas; f32 summation order differs. Weights of
            // well-separated members are one-hot on both, so differences stay at rounding level.
            assert_close(&a, &b, 1e-4, 1e-4, &format!("analysis n={n} d={d} {cfg:?}"));
        }
    }
}

fn split_and_unsplit_gpu_analyses_agree() {
    let Some((_lock, g)) = gpu() else { return };
    let (n, d) = (17, 1000);
    let Some(split) = gpu_split((4 * d * 4) as u64) else {
        return;
    };
    let cfg = EnffConfig::f2p(0.1, 0.05, 5);
    let a = analysis(g, cfg.clone(), n, d, &Observe::arctan());
    let b = analysis(&split, cfg, n, d, &Observe::arctan());
    assert_close(&b, &a, 1e-5, 1e-5, "member-block split analysis");
}

backend_test!(
    /// Non-finite observations and mismatched shapes are typed errors naming the input, on every backend.
    bad_input_is_rejected<B>(b) {
        let (n, d) = (5, 40);
        let mut ens = b.upload(n, d, &vec![0.5; n * d]).unwrap();
        let prev = b.upload(n, d, &vec![0.4; n * d]).unwrap();
        let op = Observe::identity();
        let mut y = vec![0.1f32; d];
        y[7] = f32::NAN;
        let yb = b.upload(1, d, &y).unwrap();
        let obs = Observation {
            y: &yb,
            operator: &op,
            noise_std: 0.3,
        };
        let mut f = Enff::<B>::new(EnffConfig::f2p(0.1, 0.1, 3)).unwrap();
        match f.analyse(b, &mut ens, Some(&prev), &obs, 1) {
            Err(Error::NonFinite { name, location, .. }) => {
                assert_eq!(name, "observation");
                // The CPU names the index of the observation vector, the GPU its row and column.
                assert!(
                    location == "index 7" || location == "member 0, component 7",
                    "{location}"
                );
            }
            other => panic!("expected NonFinite for a NaN observation, got {other:?}"),
        }
        // A wrong observation length is a shape error before any work.
        let short = b.upload(1, d - 1, &vec![0.0; d - 1]).unwrap();
        let obs = Observation {
            y: &short,
            operator: &op,
            noise_std: 0.3,
        };
        assert!(matches!(
            f.analyse(b, &mut ens, Some(&prev), &obs, 2),
            Err(Error::ShapeMismatch { .. })
        ));
        // A user-defined operator: the CPU runs it; on the GPU it has no kernel, a typed
        // Unsupported error, no panic.
        #[derive(Debug)]
        struct Mine;
        impl enff::observe::ObservationOperator for Mine {
            fn name(&self) -> String {
                "mine".into()
            }
            fn obs_dim(&self, d: usize) -> enff::Result<usize> {
                Ok(d)
            }
            fn apply(&self, x: &[f32], y: &mut [f32]) {
                y.copy_from_slice(x)
            }
            fn adjoint(&self, _x: &[f32], r: &[f32], out: &mut [f32]) {
                out.copy_from_slice(r)
            }
        }
        let yb = b.upload(1, d, &vec![0.1; d]).unwrap();
        let obs = Observation {
            y: &yb,
            operator: &Mine,
            noise_std: 0.3,
        };
        let r = f.analyse(b, &mut ens, Some(&prev), &obs, 3);
        if b.name() == "gpu" {
            assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
        } else {
            r.unwrap();
        }
        // And the backend is still usable afterwards.
        let obs = Observation {
            y: &yb,
            operator: &op,
            noise_std: 0.3,
        };
        f.analyse(b, &mut ens, Some(&prev), &obs, 4).unwrap();
    }
);

/// Three cycles of the paper's Lorenz-96 setting on both backends. Everything is drawn from
/// the same Philox streams, so the runs differ only by f32 rounding (model RK stages, kernel
/// summation order), which three cycles of chaos amplify by far less than 1e-3.
fn three_cycle_twin_runs_agree_on_both_backends() {
    let Some((_lock, g)) = gpu() else { return };
    let p = preset("lorenz96_bao2024").unwrap();
    let mut cfg = p.config.clone();
    for s in [
        "model.d=200",
        "experiment.cycles=3",
        "experiment.burn_in=0",
        "experiment.spinup=100",
        "filter.flow_steps=9",
    ] {
        cfg.set(s).unwrap();
    }
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    let a = exp.run(g, |_| {}).unwrap();
    let b = exp.run(&Cpu::new(), |_| {}).unwrap();
    for (ra, rb) in a.metrics.iter().zip(&b.metrics) {
        assert!(
            (ra.rmse - rb.rmse).abs() < 1e-3 * rb.rmse.max(0.1),
            "cycle {}: {} vs {}",
            ra.cycle,
            ra.rmse,
            rb.rmse
        );
        assert!((ra.rmse_forecast - rb.rmse_forecast).abs() < 1e-3 * rb.rmse_forecast.max(0.1));
        assert!((ra.spread - rb.spread).abs() < 1e-3 * rb.spread.max(0.01));
    }
    assert_eq!(a.summary.backend, "gpu");
}

/// A lost device mid-run is a typed error, promptly, not a panic or a hang.
fn device_loss_mid_run_is_a_typed_error() {
    let Some((_lock, _)) = gpu() else { return };
    let Some(g) = gpu_split(u64::MAX) else { return };
    let (n, d) = (4, 64);
    let mut ens = g.upload(n, d, &vec![0.5; n * d]).unwrap();
    let yb = g.upload(1, d, &vec![0.1; d]).unwrap();
    let op = Observe::identity();
    let obs = Observation {
        y: &yb,
        operator: &op,
        noise_std: 0.3,
    };
    let mut f = Enff::<Gpu>::new(EnffConfig::ot(0.1, 0.1, 3)).unwrap();
    f.analyse(&g, &mut ens, None, &obs, 1).unwrap();
    g.simulate_device_loss();
    let started = std::time::Instant::now();
    match f.analyse(&g, &mut ens, None, &obs, 2) {
        Err(Error::Gpu(msg)) => assert!(msg.contains("lost"), "{msg}"),
        other => panic!("expected a GPU error after device loss, got {other:?}"),
    }
    assert!(matches!(g.read(&ens), Err(Error::Gpu(_))));
    assert!(matches!(g.zeros(2, 2), Err(Error::Gpu(_))));
    assert!(
        started.elapsed().as_secs() < 30,
        "error took {:?}",
        started.elapsed()
    );
}

test_main!(
    cpu: [bad_input_is_rejected::cpu, golden_vectors_g1_g2_hold::cpu],
    gpu: [golden_vectors_g1_g2_hold::gpu, full_analysis_agrees_with_the_cpu_to_1e4, split_and_unsplit_gpu_analyses_agree, bad_input_is_rejected::gpu, three_cycle_twin_runs_agree_on_both_backends, device_loss_mid_run_is_a_typed_error],
);
