//! The ensemble-space kernels on the GPU against their CPU twins: the observed-anomaly products
//! (ETKF, EnKF) and the batched LETKF (ring and torus, odd sizes), and the filters built on them.

mod common;

use common::{assert_close, gpu, gpu_split, host_random};
use enff::backend::cpu::Cpu;
use enff::backend::{Backend, LocalAnalysis};
use enff::filter::{EnkfPo, Etkf, Filter, Letkf, Observation};
use enff::localization::Localization;
use enff::model::{DistanceKind, Geometry};
use enff::observe::{ObservationOperator, Observe, Pointwise};

fn observed_products_match_the_cpu_twin() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for &(n, m) in &[(2usize, 1usize), (7, 53), (13, 1031), (32, 4099)] {
        let hx: Vec<f32> = host_random(n, m, 1, 1.0).iter().map(|v| 3.0 + v).collect();
        let y = host_random(1, m, 2, 1.0);
        let eta = host_random(n, m, 3, 1.0);
        for with_eta in [false, true] {
            let e = if with_eta { n } else { 0 };
            let rows = n + 1 + e;
            let (hc, yc, ec) = (
                cpu.upload(n, m, &hx).unwrap(),
                cpu.upload(1, m, &y).unwrap(),
                cpu.upload(n, m, &eta).unwrap(),
            );
            let (hg, yg, eg) = (
                g.upload(n, m, &hx).unwrap(),
                g.upload(1, m, &y).unwrap(),
                g.upload(n, m, &eta).unwrap(),
            );
            let mut oc = cpu.zeros(rows, n).unwrap();
            let mut og = g.upload(rows, n, &vec![f32::NAN; rows * n]).unwrap();
            cpu.observed_products(&hc, &yc, with_eta.then_some(&ec), &mut oc)
                .unwrap();
            g.observed_products(&hg, &yg, with_eta.then_some(&eg), &mut og)
                .unwrap();
            // m-term f32 sums of O(1) products: ≲ 1e-6·√m relative to √m·m.
            assert_close(
                &g.read(&og).unwrap(),
                &cpu.read(&oc).unwrap(),
                2e-5 * m as f64,
                1e-4,
                &format!("observed_products n={n} m={m} eta={with_eta}"),
            );
        }
    }
}

fn letkf_cases() -> Vec<(Geometry, DistanceKind, Observe, usize, f64)> {
    vec![
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
                nx: 5,
                ny: 9,
                fields: 3,
            },
            DistanceKind::Flattened,
            Observe::identity(),
            5,
            2.5,
        ),
        (
            Geometry::Ring { len: 23 },
            DistanceKind::Geometry,
            Observe::identity(),
            32,
            5.0,
        ),
    ]
}

fn batched_letkf_matches_the_cpu_twin() {
    let Some((_lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    // Spread 1 (σ_y = 0.6: the Jacobi path) and 0.05 (the Chebyshev path).
    for ((geometry, kind, op, n, radius), spread) in letkf_cases()
        .into_iter()
        .flat_map(|c| [(c, 1.0f32), (c, 0.05)])
    {
        let d = geometry.dim().unwrap();
        let m = op.obs_dim(d).unwrap();
        let x: Vec<f32> = host_random(n, d, 5, spread)
            .iter()
            .enumerate()
            .map(|(e, v)| ((e % d) as f32 * 0.3).sin() + v)
            .collect();
        let mut hx = vec![0.0f32; n * m];
        for i in 0..n {
            op.apply(&x[i * d..(i + 1) * d], &mut hx[i * m..(i + 1) * m]);
        }
        let y = host_random(1, m, 6, 1.0);
        let loc = Localization::new(radius, geometry, kind, d).unwrap();
        let local = LocalAnalysis::new(&loc, &op, 0.6);
        let mut xc = cpu.upload(n, d, &x).unwrap();
        let mut xg = g.upload(n, d, &x).unwrap();
        cpu.letkf_analysis(
            &mut xc,
            &cpu.upload(n, m, &hx).unwrap(),
            &cpu.upload(1, m, &y).unwrap(),
            &local,
        )
        .unwrap();
        g.letkf_analysis(
            &mut xg,
            &g.upload(n, m, &hx).unwrap(),
            &g.upload(1, m, &y).unwrap(),
            &local,
        )
        .unwrap();
        let (a, b) = (g.read(&xg).unwrap(), cpu.read(&xc).unwrap());
        assert_close(
            &a,
            &b,
            1e-4 * spread as f64,
            1e-4,
            &format!("letkf {geometry:?} {kind:?} n={n} spread {spread}"),
        );
        let moved = b
            .iter()
            .zip(&x)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 0.05 * spread, "the analysis barely moved");
    }
}

/// The filters on the GPU (device products, device LETKF) against the same filters on the CPU,
/// including an ensemble split into member blocks (the host fallback).
fn ensemble_kalman_filters_agree_on_gpu_and_cpu() {
    let Some((lock, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let (n, d) = (11usize, 43usize);
    let op = Observe::identity().subsample(2, 1).unwrap();
    let x: Vec<f32> = host_random(n, d, 8, 1.0)
        .iter()
        .enumerate()
        .map(|(e, v)| ((e % d) as f32 * 0.4).cos() * 2.0 + v)
        .collect();
    let y_all = host_random(1, d, 9, 1.0);
    let ring = Geometry::Ring { len: d };
    type Make<B> = fn(Geometry) -> Box<dyn Filter<B>>;
    let filters: [(&str, Make<Cpu>, Make<enff::backend::gpu::Gpu>); 4] = [
        (
            "etkf",
            |_| Box::new(Etkf::new(1.03).unwrap()),
            |_| Box::new(Etkf::new(1.03).unwrap()),
        ),
        (
            "enkf",
            |_| Box::new(EnkfPo::new(1.0, 4).unwrap()),
            |_| Box::new(EnkfPo::new(1.0, 4).unwrap()),
        ),
        (
            "enkf-localized",
            |geo| {
                let loc = Localization::new(2.0, geo, DistanceKind::Geometry, 43).unwrap();
                Box::new(EnkfPo::new(1.0, 4).unwrap().with_localization(Some(loc)))
            },
            |geo| {
                let loc = Localization::new(2.0, geo, DistanceKind::Geometry, 43).unwrap();
                Box::new(EnkfPo::new(1.0, 4).unwrap().with_localization(Some(loc)))
            },
        ),
        (
            "letkf",
            |geo| {
                Box::new(
                    Letkf::new(3.0, 1.02)
                        .unwrap()
                        .with_geometry(geo, DistanceKind::Geometry),
                )
            },
            |geo| {
                Box::new(
                    Letkf::new(3.0, 1.02)
                        .unwrap()
                        .with_geometry(geo, DistanceKind::Geometry),
                )
            },
        ),
    ];
    // A second GPU whose ensembles are split into blocks of 4 members.
    drop(lock);
    let split = gpu_split((4 * d * 4) as u64);
    let _lock = common::gpu_lock();
    // Split ensembles observe only when h(X) splits alike: observe every component there.
    let full = Observe::identity();
    let cases = [(g, &op), (g, &full)]
        .into_iter()
        .chain(split.as_ref().map(|s| (s, &full)));
    for (gg, op) in cases {
        let m = op.obs_dim(d).unwrap();
        let y = &y_all[..m];
        for (name, make_cpu, make_gpu) in filters {
            let mut ec = cpu.upload(n, d, &x).unwrap();
            let yc = cpu.upload(1, m, y).unwrap();
            let obs_c = Observation {
                y: &yc,
                operator: op,
                noise_std: 0.7,
            };
            make_cpu(ring)
                .analyse(&cpu, &mut ec, None, &obs_c, 3)
                .unwrap();
            let want = cpu.read(&ec).unwrap();
            let mut eg = gg.upload(n, d, &x).unwrap();
            let yg = gg.upload(1, m, y).unwrap();
            let obs_g = Observation {
                y: &yg,
                operator: op,
                noise_std: 0.7,
            };
            make_gpu(ring)
                .analyse(gg, &mut eg, None, &obs_g, 3)
                .unwrap();
            assert_close(
                &gg.read(&eg).unwrap(),
                &want,
                2e-4,
                2e-4,
                &format!("{name} ({}) on {} block(s)", op.name(), eg.chunk_count()),
            );
        }
    }
}

test_main!(
    cpu: [],
    gpu: [observed_products_match_the_cpu_twin, batched_letkf_matches_the_cpu_twin, ensemble_kalman_filters_agree_on_gpu_and_cpu],
);
