//! Per-kernel parity: every WGSL kernel against its CPU twin on fresh random inputs, with odd
//! sizes (n ∈ {1, 2, 3, 17, 64}, d ∈ {1, 5, 1000, 4099}). Outputs are poisoned with NaN before
//! each GPU run, so an element the kernel forgot to write fails the comparison.

mod common;

use common::{assert_close, gpu, gpu_split, host_random};
use enff::backend::cpu::Cpu;
use enff::backend::gpu::Gpu;
use enff::backend::{Backend, FlowUpdate, Guidance, PathCoefficients};
use enff::flow::{Path, PathKind};
use enff::model::{Lorenz63, Lorenz96, Model, Scheme, System};
use enff::observe::{ObservationOperator, Observe, Pointwise};
use enff::rng::{NoiseKey, Stream};
use enff::Error;

const NS: [usize; 5] = [1, 2, 3, 17, 64];
const DS: [usize; 4] = [1, 5, 1000, 4099];

fn poisoned(g: &Gpu, rows: usize, cols: usize) -> enff::backend::gpu::GpuBuffer {
    g.upload(rows, cols, &vec![f32::NAN; rows * cols]).unwrap()
}

/// Row-stochastic random weights.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut w = host_random(n, n, seed, 2.0);
    for row in w.chunks_mut(n) {
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
        row.iter_mut().for_each(|v| *v = (*v - m).exp() / s);
    }
    w
}

fn fill_normal_matches_the_cpu_philox_stream() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for &n in &NS {
        for &d in &DS {
            let key = NoiseKey::new(977, Stream::FlowSource, 12).with_step(3);
            let mean = host_random(n, d, 5, 1.0);
            for with_mean in [false, true] {
                let mut out_c = cpu.zeros(n, d).unwrap();
                let mut out_g = poisoned(g, n, d);
                let mc = cpu.upload(n, d, &mean).unwrap();
                let mg = g.upload(n, d, &mean).unwrap();
                cpu.fill_normal(&mut out_c, key, with_mean.then_some(&mc), 0.7)
                    .unwrap();
                g.fill_normal(&mut out_g, key, with_mean.then_some(&mg), 0.7)
                    .unwrap();
                // Box–Muller in f32 (GPU) vs f64 (CPU): |Δz| ≲ 1e-6·(1 + |z|).
                assert_close(
                    &g.read(&out_g).unwrap(),
                    &cpu.read(&out_c).unwrap(),
                    2e-5,
                    2e-5,
                    &format!("fill_normal n={n} d={d} mean={with_mean}"),
                );
            }
        }
    }
}

fn path_cases() -> Vec<(PathCoefficients, bool)> {
    vec![
        (Path::new(PathKind::F2p, 0.3).unwrap().at(0.35), true),
        (Path::new(PathKind::Ot, 0.05).unwrap().at(0.7), false),
        (Path::new(PathKind::Ot, 0.05).unwrap().at(0.0), false),
    ]
}

fn flow_logits_match_the_cpu_twin() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for &n in &NS {
        for &d in &DS {
            let x = host_random(n, d, 1, 1.0);
            let t = host_random(n, d, 2, 1.0);
            let s = host_random(n, d, 3, 1.0);
            let bias = host_random(1, n, 4, 3.0);
            for (path, with_source) in path_cases() {
                for with_bias in [false, true] {
                    let (xc, tc, sc, bc) = (
                        cpu.upload(n, d, &x).unwrap(),
                        cpu.upload(n, d, &t).unwrap(),
                        cpu.upload(n, d, &s).unwrap(),
                        cpu.upload(1, n, &bias).unwrap(),
                    );
                    let (xg, tg, sg, bg) = (
                        g.upload(n, d, &x).unwrap(),
                        g.upload(n, d, &t).unwrap(),
                        g.upload(n, d, &s).unwrap(),
                        g.upload(1, n, &bias).unwrap(),
                    );
                    let mut lc = cpu.zeros(n, n).unwrap();
                    let mut lg = poisoned(g, n, n);
                    cpu.flow_logits(
                        &xc,
                        &tc,
                        with_source.then_some(&sc),
                        path,
                        with_bias.then_some(&bc),
                        &mut lc,
                    )
                    .unwrap();
                    g.flow_logits(
                        &xg,
                        &tg,
                        with_source.then_some(&sg),
                        path,
                        with_bias.then_some(&bg),
                        &mut lg,
                    )
                    .unwrap();
                    // f32 sums of d squared differences (GPU: per-thread then per-slab) vs f64
                    // on the CPU: relative error ≲ 1e-6·sqrt(d); 1e-4 relative leaves margin.
                    assert_close(
                        &g.read(&lg).unwrap(),
                        &cpu.read(&lc).unwrap(),
                        1e-4,
                        1e-4,
                        &format!("flow_logits n={n} d={d} t={} bias={with_bias}", path.t),
                    );
                }
            }
        }
    }
}

fn softmax_rows_match_and_flag_non_finite_logits() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for &n in &NS {
        let l = host_random(n, n, 8, 30.0);
        let mut lc = cpu.upload(n, n, &l).unwrap();
        let mut lg = g.upload(n, n, &l).unwrap();
        cpu.softmax_rows(&mut lc).unwrap();
        g.softmax_rows(&mut lg).unwrap();
        g.sync().unwrap();
        assert_close(
            &g.read(&lg).unwrap(),
            &cpu.read(&lc).unwrap(),
            1e-6,
            1e-5,
            &format!("softmax n={n}"),
        );
    }
    let n = 17;
    let mut l = host_random(n, n, 9, 1.0);
    l[5 * n + 3] = f32::NAN;
    let mut lg = g.upload(n, n, &l).unwrap();
    g.softmax_rows(&mut lg).unwrap();
    match g.sync() {
        Err(Error::NonFinite { name, location, .. }) => {
            assert_eq!(name, "flow log-weights");
            assert_eq!(location, "member 5, component 3");
        }
        other => panic!("expected a NonFinite error, got {other:?}"),
    }
    // The flag is cleared after it was reported.
    g.sync().unwrap();
}

fn flow_update_matches_the_cpu_twin_for_every_variant() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let ops = [
        Observe::identity(),
        Observe::arctan(),
        Observe::full(Pointwise::Tanh).subsample(3, 1).unwrap(),
    ];
    for &n in &NS {
        for &d in &DS {
            let w = weights(n, 11);
            let t = host_random(n, d, 12, 1.0);
            let s = host_random(n, d, 13, 1.0);
            let x = host_random(n, d, 14, 1.0);
            let e = host_random(n, d, 15, 1.0);
            let vp = host_random(n, d, 16, 1.0);
            for (case, (path, with_source)) in path_cases().into_iter().enumerate() {
                let op = &ops[case % ops.len()];
                if op.obs_dim(d).is_err() {
                    continue;
                }
                let m = op.obs_dim(d).unwrap();
                let y = host_random(1, m, 17, 0.5);
                for variant in 0..4 {
                    let with_eval = variant & 1 == 1;
                    let with_prev = variant & 2 == 2;
                    let guided = variant != 2;
                    let with_vout = variant >= 2;
                    // CPU
                    let (wc, tc, sc, ec, vc, yc) = (
                        cpu.upload(n, n, &w).unwrap(),
                        cpu.upload(n, d, &t).unwrap(),
                        cpu.upload(n, d, &s).unwrap(),
                        cpu.upload(n, d, &e).unwrap(),
                        cpu.upload(n, d, &vp).unwrap(),
                        cpu.upload(1, m, &y).unwrap(),
                    );
                    let mut stc = cpu.upload(n, d, &x).unwrap();
                    let mut voc = cpu.zeros(n, d).unwrap();
                    let upc = FlowUpdate::<Cpu> {
                        eval: with_eval.then_some(&ec),
                        weights: &wc,
                        target: &tc,
                        source: with_source.then_some(&sc),
                        path,
                        guidance: guided.then_some(Guidance {
                            operator: op,
                            y: &yc,
                            scale: 0.8,
                            horizon: 1.0 - path.t,
                        }),
                        h_new: 0.13,
                        previous: with_prev.then_some((&vc, 0.07)),
                        clamp: (variant == 3).then_some(0.05),
                    };
                    cpu.flow_update(&mut stc, &upc, with_vout.then_some(&mut voc))
                        .unwrap();
                    // GPU
                    let (wg, tg, sg, eg, vg, yg) = (
                        g.upload(n, n, &w).unwrap(),
                        g.upload(n, d, &t).unwrap(),
                        g.upload(n, d, &s).unwrap(),
                        g.upload(n, d, &e).unwrap(),
                        g.upload(n, d, &vp).unwrap(),
                        g.upload(1, m, &y).unwrap(),
                    );
                    let mut stg = g.upload(n, d, &x).unwrap();
                    let mut vog = poisoned(g, n, d);
                    let upg = FlowUpdate::<Gpu> {
                        eval: with_eval.then_some(&eg),
                        weights: &wg,
                        target: &tg,
                        source: with_source.then_some(&sg),
                        path,
                        guidance: guided.then_some(Guidance {
                            operator: op,
                            y: &yg,
                            scale: 0.8,
                            horizon: 1.0 - path.t,
                        }),
                        h_new: 0.13,
                        previous: with_prev.then_some((&vg, 0.07)),
                        clamp: (variant == 3).then_some(0.05),
                    };
                    g.flow_update(&mut stg, &upg, with_vout.then_some(&mut vog))
                        .unwrap();
                    let what = format!("flow_update n={n} d={d} case={case} variant={variant}");
                    // n-term f32 weighted sums, FMA vs separate rounding: ~1e-6 relative.
                    assert_close(
                        &g.read(&stg).unwrap(),
                        &cpu.read(&stc).unwrap(),
                        1e-5,
                        1e-5,
                        &what,
                    );
                    if with_vout {
                        assert_close(
                            &g.read(&vog).unwrap(),
                            &cpu.read(&voc).unwrap(),
                            1e-5,
                            1e-5,
                            &what,
                        );
                    }
                }
            }
        }
    }
}

fn inflation_statistics_observation_and_likelihood_match() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let op = Observe::arctan().subsample(2, 1).unwrap();
    for &n in &NS {
        for &d in &DS {
            let x = host_random(n, d, 21, 2.0);
            let truth = host_random(1, d, 22, 2.0);
            let (mut xc, tc) = (
                cpu.upload(n, d, &x).unwrap(),
                cpu.upload(1, d, &truth).unwrap(),
            );
            let (mut xg, tg) = (g.upload(n, d, &x).unwrap(), g.upload(1, d, &truth).unwrap());
            let sc = cpu.ensemble_stats(&xc, &tc).unwrap();
            let sg = g.ensemble_stats(&xg, &tg).unwrap();
            assert!(
                (sc.rmse - sg.rmse).abs() <= 1e-5 * sc.rmse.max(1e-3),
                "rmse n={n} d={d}: {sc:?} vs {sg:?}"
            );
            assert!(
                (sc.spread - sg.spread).abs() <= 1e-5 * sc.spread.max(1e-3),
                "spread n={n} d={d}: {sc:?} vs {sg:?}"
            );
            cpu.inflate(&mut xc, 1.3).unwrap();
            g.inflate(&mut xg, 1.3).unwrap();
            assert_close(
                &g.read(&xg).unwrap(),
                &cpu.read(&xc).unwrap(),
                1e-5,
                1e-5,
                &format!("inflate n={n} d={d}"),
            );
            if let Ok(m) = op.obs_dim(d) {
                let mut oc = cpu.zeros(n, m).unwrap();
                let mut og = poisoned(g, n, m);
                cpu.observe(&op, &xc, &mut oc).unwrap();
                g.observe(&op, &xg, &mut og).unwrap();
                // Vulkan allows atan a few thousand ulp of error; lavapipe is off by up to 3e-6.
                assert_close(
                    &g.read(&og).unwrap(),
                    &cpu.read(&oc).unwrap(),
                    1e-5,
                    1e-6,
                    &format!("observe n={n} d={d}"),
                );
                let y = host_random(1, m, 23, 1.0);
                let (yc, yg) = (cpu.upload(1, m, &y).unwrap(), g.upload(1, m, &y).unwrap());
                let mut lc = cpu.zeros(1, n).unwrap();
                let mut lg = poisoned(g, 1, n);
                cpu.log_likelihoods(&op, &xc, &yc, 0.4, &mut lc).unwrap();
                g.log_likelihoods(&op, &xg, &yg, 0.4, &mut lg).unwrap();
                assert_close(
                    &g.read(&lg).unwrap(),
                    &cpu.read(&lc).unwrap(),
                    1e-4,
                    1e-5,
                    &format!("log_likelihoods n={n} d={d}"),
                );
            }
        }
    }
}

fn check_finite_reports_the_first_bad_element_at_sync() {
    let Some((_lock, g)) = gpu() else { return };
    let (n, d) = (3, 1000);
    let mut x = host_random(n, d, 31, 1.0);
    x[2 * d + 417] = f32::INFINITY;
    x[2 * d + 900] = f32::NAN;
    let xg = g.upload(n, d, &x).unwrap();
    g.check_finite(&xg, "forecast ensemble").unwrap();
    match g.sync() {
        Err(Error::NonFinite { name, location, .. }) => {
            assert_eq!(name, "forecast ensemble");
            assert_eq!(location, "member 2, component 417");
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    let ok = g.upload(n, d, &host_random(n, d, 32, 1.0)).unwrap();
    g.check_finite(&ok, "forecast ensemble").unwrap();
    g.sync().unwrap();
}

fn model_kernels_match_the_cpu_runge_kutta() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for scheme in [Scheme::Rk4ThreeEighths, Scheme::Rk4Classic] {
        let l63 = Model::new(System::Lorenz63(Lorenz63::default()), 0.01, scheme).unwrap();
        for &n in &[1usize, 3, 17] {
            let x = host_random(n, 3, 41, 5.0);
            let mut xc = cpu.upload(n, 3, &x).unwrap();
            let mut xg = g.upload(n, 3, &x).unwrap();
            cpu.advance(&l63, &mut xc, 10).unwrap();
            g.advance(&l63, &mut xg, 10).unwrap();
            assert_close(
                &g.read(&xg).unwrap(),
                &cpu.read(&xc).unwrap(),
                1e-4,
                1e-4,
                &format!("lorenz63 n={n} {scheme:?}"),
            );
        }
        for &(n, d) in &[(1usize, 4usize), (2, 5), (3, 1000), (17, 4099)] {
            let l96 = Model::new(
                System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
                0.01,
                scheme,
            )
            .unwrap();
            let x = host_random(n, d, 42, 3.0);
            let mut xc = cpu.upload(n, d, &x).unwrap();
            let mut xg = g.upload(n, d, &x).unwrap();
            cpu.advance(&l96, &mut xc, 10).unwrap();
            g.advance(&l96, &mut xg, 10).unwrap();
            // Ten steps of a chaotic map amplify f32 rounding differences a little.
            assert_close(
                &g.read(&xg).unwrap(),
                &cpu.read(&xc).unwrap(),
                1e-4,
                1e-4,
                &format!("lorenz96 n={n} d={d} {scheme:?}"),
            );
        }
    }
}

fn member_block_splitting_gives_the_same_kernels() {
    let Some((_lock, g)) = gpu() else { return };
    let (n, d) = (17, 1000);
    // Blocks of 3 members (12 kB): 6 blocks per ensemble.
    let Some(split) = gpu_split((3 * d * 4) as u64) else {
        return;
    };
    let x = host_random(n, d, 51, 1.0);
    let t = host_random(n, d, 52, 1.0);
    let s = host_random(n, d, 53, 1.0);
    let truth = host_random(1, d, 54, 1.0);
    let y = host_random(1, d, 55, 0.5);
    let w = weights(n, 56);
    let op = Observe::arctan();
    let path = Path::new(PathKind::F2p, 0.2).unwrap().at(0.4);
    let mut results = Vec::new();
    for b in [g, &split] {
        let (xb, tb, sb, tr, yb, wb) = (
            b.upload(n, d, &x).unwrap(),
            b.upload(n, d, &t).unwrap(),
            b.upload(n, d, &s).unwrap(),
            b.upload(1, d, &truth).unwrap(),
            b.upload(1, d, &y).unwrap(),
            b.upload(n, n, &w).unwrap(),
        );
        let mut logits = b.zeros(n, n).unwrap();
        b.flow_logits(&xb, &tb, Some(&sb), path, None, &mut logits)
            .unwrap();
        let mut st = b.upload(n, d, &x).unwrap();
        let mut vo = b.zeros(n, d).unwrap();
        let up = FlowUpdate::<Gpu> {
            eval: None,
            weights: &wb,
            target: &tb,
            source: Some(&sb),
            path,
            guidance: Some(Guidance {
                operator: &op,
                y: &yb,
                scale: 0.5,
                horizon: 0.6,
            }),
            h_new: 0.2,
            previous: None,
            clamp: None,
        };
        b.flow_update(&mut st, &up, Some(&mut vo)).unwrap();
        let mut noise = b.zeros(n, d).unwrap();
        b.fill_normal(
            &mut noise,
            NoiseKey::new(3, Stream::User, 1),
            Some(&xb),
            0.5,
        )
        .unwrap();
        let mut infl = b.upload(n, d, &x).unwrap();
        b.inflate(&mut infl, 1.2).unwrap();
        let stats = b.ensemble_stats(&xb, &tr).unwrap();
        let l96 = Model::new(
            System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
            0.01,
            Scheme::Rk4ThreeEighths,
        )
        .unwrap();
        let mut adv = b.upload(n, d, &x).unwrap();
        b.advance(&l96, &mut adv, 3).unwrap();
        let mut ll = b.zeros(1, n).unwrap();
        b.log_likelihoods(&op, &xb, &yb, 0.3, &mut ll).unwrap();
        results.push((
            b.read(&logits).unwrap(),
            b.read(&st).unwrap(),
            b.read(&vo).unwrap(),
            b.read(&noise).unwrap(),
            b.read(&infl).unwrap(),
            stats,
            b.read(&adv).unwrap(),
            b.read(&ll).unwrap(),
        ));
    }
    let (a, b) = (&results[0], &results[1]);
    assert!(split.max_chunk_bytes() < (n * d * 4) as u64);
    assert_close(&b.0, &a.0, 1e-5, 1e-5, "split logits");
    assert_close(&b.1, &a.1, 1e-6, 1e-6, "split update");
    assert_close(&b.2, &a.2, 1e-6, 1e-6, "split velocity");
    assert_close(&b.3, &a.3, 0.0, 0.0, "split noise");
    assert_close(&b.4, &a.4, 1e-6, 1e-6, "split inflation");
    assert!((a.5.rmse - b.5.rmse).abs() < 1e-6 && (a.5.spread - b.5.spread).abs() < 1e-6);
    assert_close(&b.6, &a.6, 0.0, 0.0, "split model");
    assert_close(&b.7, &a.7, 1e-6, 1e-6, "split log-likelihoods");
}

/// Ensembles above 32 members take the tiled kernels (64 x 64 tiles); 100 and 130 members
/// leave partial tiles, and a split target exercises the accumulate-then-finish path.
fn large_ensemble_tiled_kernels_match_the_cpu_twin() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let op = Observe::arctan();
    for &(n, d) in &[(100usize, 1000usize), (130, 500)] {
        let x = host_random(n, d, 61, 1.0);
        let t = host_random(n, d, 62, 1.0);
        let s = host_random(n, d, 63, 1.0);
        let y = host_random(1, d, 64, 0.5);
        let w = weights(n, 65);
        let path = Path::new(PathKind::F2p, 0.2).unwrap().at(0.4);
        let mut outs = Vec::new();
        let split = gpu_split((40 * d * 4) as u64).unwrap();
        for b in [g, &split] {
            let (xb, tb, sb, yb, wb) = (
                b.upload(n, d, &x).unwrap(),
                b.upload(n, d, &t).unwrap(),
                b.upload(n, d, &s).unwrap(),
                b.upload(1, d, &y).unwrap(),
                b.upload(n, n, &w).unwrap(),
            );
            let mut lg = poisoned(b, n, n);
            b.flow_logits(&xb, &tb, Some(&sb), path, None, &mut lg)
                .unwrap();
            let mut st = b.upload(n, d, &x).unwrap();
            let up = FlowUpdate::<Gpu> {
                eval: None,
                weights: &wb,
                target: &tb,
                source: Some(&sb),
                path,
                guidance: Some(Guidance {
                    operator: &op,
                    y: &yb,
                    scale: 0.5,
                    horizon: 0.6,
                }),
                h_new: 0.2,
                previous: None,
                clamp: None,
            };
            b.flow_update(&mut st, &up, None).unwrap();
            outs.push((b.read(&lg).unwrap(), b.read(&st).unwrap()));
        }
        let (xc, tc, sc, yc, wc) = (
            cpu.upload(n, d, &x).unwrap(),
            cpu.upload(n, d, &t).unwrap(),
            cpu.upload(n, d, &s).unwrap(),
            cpu.upload(1, d, &y).unwrap(),
            cpu.upload(n, n, &w).unwrap(),
        );
        let mut lc = cpu.zeros(n, n).unwrap();
        cpu.flow_logits(&xc, &tc, Some(&sc), path, None, &mut lc)
            .unwrap();
        let mut stc = cpu.upload(n, d, &x).unwrap();
        let upc = FlowUpdate::<Cpu> {
            eval: None,
            weights: &wc,
            target: &tc,
            source: Some(&sc),
            path,
            guidance: Some(Guidance {
                operator: &op,
                y: &yc,
                scale: 0.5,
                horizon: 0.6,
            }),
            h_new: 0.2,
            previous: None,
            clamp: None,
        };
        cpu.flow_update(&mut stc, &upc, None).unwrap();
        let (lcv, stv) = (cpu.read(&lc).unwrap(), cpu.read(&stc).unwrap());
        for (k, (l, st)) in outs.iter().enumerate() {
            assert_close(
                l,
                &lcv,
                1e-4,
                1e-4,
                &format!("tiled logits n={n} d={d} split={k}"),
            );
            assert_close(
                st,
                &stv,
                2e-5,
                2e-5,
                &format!("tiled update n={n} d={d} split={k}"),
            );
        }
    }
}

test_main!(
    cpu: [],
    gpu: [fill_normal_matches_the_cpu_philox_stream, flow_logits_match_the_cpu_twin, softmax_rows_match_and_flag_non_finite_logits, flow_update_matches_the_cpu_twin_for_every_variant, inflation_statistics_observation_and_likelihood_match, check_finite_reports_the_first_bad_element_at_sync, model_kernels_match_the_cpu_runge_kutta, member_block_splitting_gives_the_same_kernels, large_ensemble_tiled_kernels_match_the_cpu_twin],
);
