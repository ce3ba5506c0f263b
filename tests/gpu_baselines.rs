//! The ensemble transform (the device operation of the ETKF, EnKF and particle resampling) on
//! the GPU against the CPU, and the ETKF golden vector on the GPU.

// Golden vectors are quoted with the digits the specification gives.
#![allow(clippy::excessive_precision)]

mod common;

use common::{assert_close, gpu, host_random};
use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::filter::{Etkf, Filter, Observation};
use enff::observe::Observe;

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

fn etkf_golden_vector_g4_holds_on_the_gpu() {
    let Some((_lock, g)) = gpu() else { return };
    let got = common::golden::etkf_g4(g);
    common::assert_close(
        &got,
        &common::golden::G4_ETKF_ANALYSIS,
        1e-5,
        0.0,
        "ETKF G4 on the GPU",
    );
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
    cpu: [],
    gpu: [ensemble_transform_matches_the_cpu_twin, etkf_golden_vector_g4_holds_on_the_gpu, ensf_golden_vector_g3_holds_on_the_gpu, baselines_agree_on_both_backends],
);
