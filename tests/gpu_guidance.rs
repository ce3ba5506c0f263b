//! GPU/CPU parity of the covariance-guidance kernels (the banded-gain step of
//! `shaders/gain_guidance.wgsl`) and of whole covariance-guided EnFF analyses, on random inputs
//! with odd sizes.

mod common;

use common::{assert_close, gpu, gpu_split};
use enff::backend::cpu::Cpu;
use enff::backend::{Backend, GainStep, InnovationClip};
use enff::filter::covariance::local_gains;
use enff::filter::{Enff, EnffConfig, Filter, Observation};
use enff::flow::GuidanceKind;
use enff::model::Geometry;
use enff::observe::{Observe, Pointwise};
use enff::rng::{NoiseKey, Stream};

/// Random `rows × cols` values, `scale`·N(0, 1) (drawn on the CPU backend).
fn normals(rows: usize, cols: usize, seed: u64, scale: f32) -> Vec<f32> {
    let cpu = Cpu::new();
    let mut b = cpu.zeros(rows, cols).unwrap();
    cpu.fill_normal(&mut b, NoiseKey::new(seed, Stream::User, 0), None, scale)
        .unwrap();
    cpu.read(&b).unwrap()
}

/// Runs one gain step on `b` and returns the new state.
#[allow(clippy::too_many_arguments)]
fn gain_step<B: Backend>(
    b: &B,
    n: usize,
    d: usize,
    op: Observe,
    data: &[Vec<f32>; 6],
    w: usize,
    h: (f32, f32, Option<f32>),
    clip: Option<(&[f32], &[f32], f32)>,
) -> Vec<f32> {
    let [state, vel, endpoint, y, gain_index, hbar] = data;
    let clip_bufs = clip.map(|(lin, var, scale)| {
        (
            b.upload(1, d, lin).unwrap(),
            b.upload(1, d, var).unwrap(),
            scale,
        )
    });
    let m = y.len();
    let mut st = b.upload(n, d, state).unwrap();
    let v = b.upload(n, d, vel).unwrap();
    let e = b.upload(n, d, endpoint).unwrap();
    let yb = b.upload(1, m, y).unwrap();
    let gain = b.upload(d, w, &gain_index[..d * w]).unwrap();
    let index = b.upload(d, w, &gain_index[d * w..]).unwrap();
    let hb = b.upload(1, m, hbar).unwrap();
    b.gain_step(
        &mut st,
        &GainStep {
            observe: op,
            y: &yb,
            gain: &gain,
            index: &index,
            endpoint: &e,
            velocity: &v,
            h_velocity: h.0,
            h_gain: h.1,
            mean_obs: h.2.map(|a| (&hb, a)),
            clip: clip_bufs.as_ref().map(|(l, v, scale)| InnovationClip {
                linearization: l,
                forecast_var: v,
                scale: *scale,
                noise_var: 0.01,
            }),
        },
    )
    .unwrap();
    b.sync().unwrap();
    b.read(&st).unwrap()
}

#[test]
fn banded_gain_step_agrees_with_the_cpu() {
    let Some((_guard, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for (case, (n, d, every, offset, pw, w)) in [
        (5usize, 37usize, 2usize, 1usize, Pointwise::Arctan, 9usize),
        (3, 101, 1, 0, Pointwise::Identity, 13),
        (7, 53, 3, 2, Pointwise::Tanh, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let op = Observe::full(pw).subsample(every, offset).unwrap();
        let m = (d - offset).div_ceil(every);
        let s = 100 * case as u64;
        let state = normals(n, d, s + 1, 1.0);
        let vel = normals(n, d, s + 2, 1.0);
        let endpoint = normals(n, d, s + 3, 2.0);
        let y = normals(1, m, s + 4, 1.0);
        // Random banded gain with some zero (padding) entries and valid random indices.
        let mut gi = normals(d, w, s + 5, 0.3);
        for (e, v) in gi.iter_mut().enumerate() {
            if e % 7 == 3 {
                *v = 0.0;
            }
        }
        gi.extend((0..d * w).map(|e| ((e * 7919 + 13) % m) as f32));
        let hbar = normals(1, m, s + 6, 0.5);
        let data = [state, vel, endpoint, y, gi, hbar];
        for h in [
            (0.25f32, 0.7f32, None),
            (0.1, 0.0, None),
            (0.3, 0.9, Some(0.5f32)),
        ] {
            let want = gain_step(&cpu, n, d, op, &data, w, h, None);
            let got = gain_step(g, n, d, op, &data, w, h, None);
            assert_close(
                &got,
                &want,
                1e-5,
                1e-5,
                &format!("gain step case {case} h {h:?}"),
            );
        }
        // With the innovation bound: a linearization point spanning the saturated range and
        // small forecast variances, so that many innovations are clamped.
        let lin = normals(1, d, s + 7, 3.0);
        let var: Vec<f32> = normals(1, d, s + 8, 0.2).iter().map(|v| v * v).collect();
        for scale in [0.5f32, 2.0] {
            let h = (0.3, 0.9, Some(0.5f32));
            let clip = Some((&lin[..], &var[..], scale));
            let want = gain_step(&cpu, n, d, op, &data, w, h, clip);
            let got = gain_step(g, n, d, op, &data, w, h, clip);
            assert_close(
                &got,
                &want,
                1e-5,
                1e-5,
                &format!("clipped gain step case {case} scale {scale}"),
            );
            let free = gain_step(&cpu, n, d, op, &data, w, h, None);
            assert!(
                want.iter().zip(&free).any(|(a, b)| (a - b).abs() > 1e-3),
                "case {case}: the bound never binds, the test checks nothing"
            );
        }
        // The same on a GPU whose ensembles are split into member blocks of `w` rows (the
        // banded gain, `d × w`, still fits one binding).
        if n > w {
            let gs = gpu_split((w * d * 4) as u64).expect("the adapter opened above");
            let h = (0.25, 0.7, Some(0.5));
            let got = gain_step(&gs, n, d, op, &data, w, h, None);
            let want = gain_step(&cpu, n, d, op, &data, w, h, None);
            assert_close(
                &got,
                &want,
                1e-5,
                1e-5,
                &format!("split gain step case {case}"),
            );
        }
    }
}

/// Mean and variance over the members of `h(x)` (the adaptive-inflation statistics) on both
/// backends, including an ensemble split into member blocks.
#[test]
fn observed_moments_agree_with_the_cpu() {
    let Some((_guard, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for (case, (n, d, every, offset, pw)) in [
        (5usize, 37usize, 2usize, 1usize, Pointwise::Arctan),
        (2, 101, 1, 0, Pointwise::Identity),
        (9, 53, 3, 2, Pointwise::Tanh),
    ]
    .into_iter()
    .enumerate()
    {
        let op = Observe::full(pw).subsample(every, offset).unwrap();
        let m = (d - offset).div_ceil(every);
        // An offset mean, so that a one-pass variance would lose digits.
        let x: Vec<f32> = normals(n, d, 40 + case as u64, 0.3)
            .iter()
            .map(|v| v + 2.5)
            .collect();
        let want = {
            let xb = cpu.upload(n, d, &x).unwrap();
            let mut out = cpu.zeros(2, m).unwrap();
            cpu.observed_moments(&op, &xb, &mut out).unwrap();
            cpu.read(&out).unwrap()
        };
        // Direct f64 reference.
        for q in 0..m {
            let c = op.component(q);
            let h: Vec<f64> = (0..n).map(|k| pw.value(x[k * d + c]) as f64).collect();
            let mu = h.iter().sum::<f64>() / n as f64;
            let var = h.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (n - 1) as f64;
            assert!((want[q] as f64 - mu).abs() < 1e-5, "case {case} mean {q}");
            assert!(
                (want[m + q] as f64 - var).abs() < 1e-5 * (1.0 + var),
                "case {case} var {q}"
            );
        }
        let got = {
            let xb = g.upload(n, d, &x).unwrap();
            let mut out = g.zeros(2, m).unwrap();
            g.observed_moments(&op, &xb, &mut out).unwrap();
            g.read(&out).unwrap()
        };
        assert_close(&got, &want, 1e-5, 1e-5, &format!("moments case {case}"));
        if n > 2 {
            // Member blocks of 2 rows.
            let gs = gpu_split((2 * d * 4) as u64).expect("the adapter opened above");
            let xb = gs.upload(n, d, &x).unwrap();
            let mut out = gs.zeros(2, m).unwrap();
            gs.observed_moments(&op, &xb, &mut out).unwrap();
            let got = gs.read(&out).unwrap();
            assert_close(
                &got,
                &want,
                1e-5,
                1e-5,
                &format!("split moments case {case}"),
            );
        }
    }
}

/// One covariance-guided EnFF-F2P analysis on both backends from the same inputs.
fn analysis<B: Backend>(b: &B, n: usize, d: usize, op: &Observe) -> Vec<f32> {
    let cfg = EnffConfig {
        guidance: GuidanceKind::Covariance,
        loc_radius: 2.5,
        gain_stages: 3,
        inflation: 1.1,
        // Both safeguards on (the clip is on by default): the same on both backends.
        adaptive_inflation: 1.4,
        ..EnffConfig::f2p(0.05, 1.0, 5)
    };
    let mut f = Enff::<B>::new(cfg)
        .unwrap()
        .with_geometry(Geometry::Ring { len: d });
    let prev = b.upload(n, d, &normals(n, d, 11, 1.0)).unwrap();
    let fc: Vec<f32> = normals(n, d, 12, 0.4)
        .iter()
        .zip(b.read(&prev).unwrap())
        .map(|(a, p)| a + p)
        .collect();
    let mut ens = b.upload(n, d, &fc).unwrap();
    let m = enff::observe::ObservationOperator::obs_dim(op, d).unwrap();
    let y = b.upload(1, m, &normals(1, m, 13, 0.5)).unwrap();
    let obs = Observation {
        y: &y,
        operator: op,
        noise_std: 0.2,
    };
    f.analyse(b, &mut ens, Some(&prev), &obs, 3).unwrap();
    b.read(&ens).unwrap()
}

#[test]
fn covariance_guided_analysis_agrees_with_the_cpu() {
    let Some((_guard, g)) = gpu() else { return };
    let cpu = Cpu::new();
    for (n, d, op) in [
        (6usize, 43usize, Observe::arctan().subsample(2, 1).unwrap()),
        (5, 31, Observe::identity()),
    ] {
        let a = analysis(g, n, d, &op);
        let b = analysis(&cpu, n, d, &op);
        // Same noise and formulas; f32 summation order and atan differ slightly.
        assert_close(&a, &b, 2e-4, 2e-4, &format!("analysis n={n} d={d}"));
    }
}

/// The banded gains themselves are host code shared by both backends; check that they are
/// finite and localized (zero beyond the Gaspari–Cohn support) on an odd ring.
#[test]
fn banded_gains_are_localized() {
    let (n, d) = (7, 45);
    let x = normals(n, d, 21, 1.0);
    let op = Observe::identity();
    let g = local_gains(
        &x,
        n,
        d,
        &op,
        0.3,
        Geometry::Ring { len: d },
        2.0,
        &[1.0],
        None,
    )
    .unwrap();
    // Support half-width 2·1.82·2 = 7.28 → at most 15 observations per component.
    assert!(g.w <= 15, "window {}", g.w);
    for i in 0..d {
        for e in 0..g.w {
            let q = g.index[i * g.w + e] as usize;
            let k = g.tables[0][i * g.w + e];
            assert!(k.is_finite());
            if k != 0.0 {
                let dist = (i as i64 - q as i64).rem_euclid(d as i64);
                assert!(dist.min(d as i64 - dist) <= 7, "component {i} sees {q}");
            }
        }
    }
}
