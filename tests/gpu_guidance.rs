//! GPU/CPU parity of the covariance-guidance kernels (the banded-gain step of
//! `shaders/gain_guidance.wgsl`, the local gains of `shaders/gain_local.wgsl` against their
//! CPU twin and the f64 host reference) and of whole covariance-guided EnFF analyses, on random
//! inputs with odd sizes.

mod common;

use common::{assert_close, gpu, gpu_split};
use enff::backend::cpu::Cpu;
use enff::backend::gpu::{gain_space, GainSpace, GPU_MAX_ENS_MEMBERS, GPU_MAX_WINDOW};
use enff::backend::{Backend, GainStep, InnovationClip, LocalGains};
use enff::filter::covariance::{gain_windows, local_gains};
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
    clip: Option<(&[f32], f32)>,
) -> Vec<f32> {
    let [state, vel, endpoint, y, gain_index, hbar] = data;
    let m = y.len();
    let clip_bufs = clip.map(|(stats, scale)| (b.upload(2, m, stats).unwrap(), scale));
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
            clip: clip_bufs.as_ref().map(|(stats, scale)| InnovationClip {
                innovation_var: stats,
                scale: *scale,
            }),
        },
    )
    .unwrap();
    b.sync().unwrap();
    b.read(&st).unwrap()
}

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
        // With the innovation bound: small innovation variances (row 1 of the statistics), so
        // that many innovations are clamped.
        let mut stats = normals(1, m, s + 7, 1.0);
        stats.extend(normals(1, m, s + 8, 0.2).iter().map(|v| v * v + 0.01));
        for scale in [0.5f32, 2.0] {
            let h = (0.3, 0.9, Some(0.5f32));
            let clip = Some((&stats[..], scale));
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
    // An ensemble split into member blocks (25 members in blocks of 20; the 41 x 19 banded
    // gain fits one block): the gain kernel refuses it and the filter takes the host path for
    // the gains (the rest stays on the device), with the same analysis.
    let (n, d, op) = (25usize, 41usize, Observe::identity());
    let split = gpu_split((20 * d * 4) as u64).expect("the adapter opened above");
    let a = analysis(&split, n, d, &op);
    let b = analysis(&cpu, n, d, &op);
    assert_close(
        &a,
        &b,
        2e-4,
        2e-4,
        "analysis of an ensemble in member blocks",
    );
}

/// The banded gains themselves are host code shared by both backends; check that they are
/// finite and localized (zero beyond the Gaspari–Cohn support) on an odd ring.
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

/// One local-gain problem: forecast, endpoints, operator and geometry.
struct GainCase {
    n: usize,
    d: usize,
    op: Observe,
    geometry: Geometry,
    radius: f64,
    sigma: f32,
    tau: f32,
    x: Vec<f32>,
    xh: Vec<f32>,
}

impl GainCase {
    fn new(n: usize, op: Observe, geometry: Geometry, radius: f64, seed: u64) -> Self {
        let d = geometry.dim().unwrap();
        let x = normals(n, d, seed, 1.0);
        let xh: Vec<f32> = normals(n, d, seed + 1, 0.3)
            .iter()
            .zip(&x)
            .map(|(e, v)| v + e + 0.2)
            .collect();
        GainCase {
            n,
            d,
            op,
            geometry,
            radius,
            sigma: 0.4,
            tau: 0.75,
            x,
            xh,
        }
    }

    /// `(gain table, h̄)` from `Backend::local_gains` on `b`.
    fn on<B: Backend>(&self, b: &B) -> (Vec<f32>, Vec<f32>, usize) {
        self.run(b, false).unwrap()
    }

    /// The gains on `b` by its kernel, or (`host`) by the host path filters take when the
    /// kernel answers `Unsupported`.
    fn run<B: Backend>(&self, b: &B, host: bool) -> enff::Result<(Vec<f32>, Vec<f32>, usize)> {
        let win = gain_windows(&self.op, self.d, self.geometry, self.radius).unwrap();
        let m = enff::observe::ObservationOperator::obs_dim(&self.op, self.d).unwrap();
        let x = b.upload(self.n, self.d, &self.x).unwrap();
        let xh = b.upload(self.n, self.d, &self.xh).unwrap();
        let index = b.upload(self.d, win.w, &win.index).unwrap();
        let taper = b.upload(self.d, win.w, &win.taper).unwrap();
        let mut gain = b.zeros(self.d, win.w).unwrap();
        // Both rows of the stage's observation statistics: h̄ and the innovation variances.
        let mut hbar = b.zeros(2, m).unwrap();
        let inputs = LocalGains {
            observe: self.op,
            forecast: &x,
            endpoint: &xh,
            index: &index,
            taper: &taper,
            noise_std: self.sigma,
            tau: self.tau,
        };
        if host {
            enff::backend::local_gains_on_host(b, &inputs, &mut gain, &mut hbar)?;
        } else {
            b.local_gains(&inputs, &mut gain, &mut hbar)?;
        }
        b.sync()?;
        Ok((b.read(&gain)?, b.read(&hbar)?, win.w))
    }

    /// The f64 host reference, linearized at the endpoint mean, and h̄ in f64.
    fn reference(&self) -> (Vec<f32>, Vec<f32>) {
        let (n, d) = (self.n, self.d);
        let lin: Vec<f64> = (0..d)
            .map(|c| (0..n).map(|k| self.xh[k * d + c] as f64).sum::<f64>() / n as f64)
            .collect();
        let g = local_gains(
            &self.x,
            n,
            d,
            &self.op,
            self.sigma as f64,
            self.geometry,
            self.radius,
            &[self.tau as f64],
            Some(&lin),
        )
        .unwrap();
        let m = enff::observe::ObservationOperator::obs_dim(&self.op, d).unwrap();
        let mut hbar: Vec<f32> = (0..m)
            .map(|q| {
                let c = self.op.component(q);
                ((0..n)
                    .map(|k| self.op.pointwise.value(self.xh[k * d + c]) as f64)
                    .sum::<f64>()
                    / n as f64) as f32
            })
            .collect();
        // Row 1: h'(x̄̂₁)²·var(x_f) + σ² per observation.
        for q in 0..m {
            let c = self.op.component(q);
            let mf = (0..n).map(|k| self.x[k * d + c] as f64).sum::<f64>() / n as f64;
            let var = (0..n)
                .map(|k| (self.x[k * d + c] as f64 - mf).powi(2))
                .sum::<f64>()
                / (n - 1) as f64;
            let dh = self.op.pointwise.derivative(lin[c] as f32) as f64;
            let s = self.sigma as f64;
            hbar.push((dh * dh * var + s * s) as f32);
        }
        (g.tables[0].clone(), hbar)
    }
}

fn gain_cases() -> Vec<(&'static str, GainCase)> {
    vec![
        // Ring, every 2nd component observed through arctan: w ≤ n (observation space).
        (
            "ring arctan every 2",
            GainCase::new(
                9,
                Observe::arctan().subsample(2, 1).unwrap(),
                Geometry::Ring { len: 37 },
                2.5,
                31,
            ),
        ),
        // Ring, identity, w > n (ensemble space on the CPU).
        (
            "ring identity",
            GainCase::new(5, Observe::identity(), Geometry::Ring { len: 53 }, 3.0, 41),
        ),
        // Torus of 5 × 7 cells with 2 fields, tanh of every 3rd component.
        (
            "torus tanh every 3",
            GainCase::new(
                7,
                Observe::full(Pointwise::Tanh).subsample(3, 2).unwrap(),
                Geometry::Torus {
                    nx: 5,
                    ny: 7,
                    fields: 2,
                },
                1.1,
                51,
            ),
        ),
        // Windows wider than the observation-space kernel takes (ensemble space on the GPU):
        // a ring with a long radius, and a torus (an odd 9 × 11 grid, one field) whose
        // windows hold a disc of observations, with more members than one tile of entries.
        (
            "ring identity wide",
            GainCase::new(6, Observe::identity(), Geometry::Ring { len: 71 }, 8.0, 61),
        ),
        (
            "torus arctan wide",
            GainCase::new(
                21,
                Observe::arctan(),
                Geometry::Torus {
                    nx: 9,
                    ny: 11,
                    fields: 1,
                },
                1.3,
                71,
            ),
        ),
    ]
}

/// Scale of a gain table, for tolerances relative to it.
fn peak(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |a, &b| a.max(b.abs() as f64))
}

fn local_gains_agree_with_the_cpu_twin_and_the_f64_reference() {
    let Some((_guard, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let mut spaces = Vec::new();
    for (name, case) in gain_cases() {
        let (want, want_hbar) = case.reference();
        let (twin, twin_hbar, w) = case.on(&cpu);
        let (got, got_hbar, _) = case.on(g);
        // Every case runs on the device (no host fallback), in the twin's space.
        let space = gain_space(case.n, w);
        assert!(space.is_some(), "{name}: n = {}, window {w}", case.n);
        spaces.push(space);
        let atol = 1e-4 * peak(&want);
        assert!(peak(&want) > 0.1, "{name}: the gains must be non-trivial");
        assert_close(&got, &twin, atol, 1e-3, &format!("{name}: gpu vs twin"));
        assert_close(&got, &want, atol, 1e-3, &format!("{name}: gpu vs f64"));
        assert_close(&got_hbar, &twin_hbar, 1e-6, 1e-5, &format!("{name}: h̄"));
        assert_close(&got_hbar, &want_hbar, 1e-6, 1e-5, &format!("{name}: h̄ f64"));
        // Padding entries stay exactly zero.
        let win = gain_windows(&case.op, case.d, case.geometry, case.radius).unwrap();
        for (e, t) in win.taper.iter().enumerate() {
            if *t == 0.0 {
                assert_eq!(got[e], 0.0, "{name}: padding entry {e}");
            }
        }
    }
    // Both kernels are exercised, the ensemble-space one past the observation-space limit.
    assert!(spaces.contains(&Some(GainSpace::Observation)));
    assert!(spaces.contains(&Some(GainSpace::Ensemble)));
    let widest = gain_cases()
        .iter()
        .map(|(_, c)| gain_windows(&c.op, c.d, c.geometry, c.radius).unwrap().w)
        .max()
        .unwrap();
    assert!(widest > GPU_MAX_WINDOW, "widest window {widest}");
}

/// Problems neither kernel takes (windows and ensemble both above the kernels' limits) and
/// ensembles split into member blocks take the host path (the CPU twin), with the same
/// results.
fn wide_windows_and_split_ensembles_are_unsupported_kernels_with_a_host_path() {
    let Some((_guard, g)) = gpu() else { return };
    let cpu = Cpu::new();
    let wide = GainCase::new(
        GPU_MAX_ENS_MEMBERS + 3,
        Observe::identity(),
        Geometry::Ring { len: 71 },
        9.0,
        61,
    );
    let (twin, twin_hbar, w) = wide.on(&cpu);
    assert!(w > GPU_MAX_WINDOW, "window {w}");
    assert_eq!(gain_space(wide.n, w), None);
    // The kernel refuses; the host path (what the filter then takes) gives the twin's gains.
    let refused = wide.run(g, false).unwrap_err();
    assert!(
        matches!(refused, enff::Error::Unsupported { .. }),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("above both kernels' limits"),
        "{refused}"
    );
    let (got, got_hbar, _) = wide.run(g, true).unwrap();
    assert_close(&got, &twin, 1e-6, 1e-5, "wide window");
    assert_close(&got_hbar, &twin_hbar, 1e-6, 1e-5, "wide window h̄");
    let (_, case) = gain_cases().remove(0);
    let gs = gpu_split((4 * case.d * 4) as u64).expect("the adapter opened above");
    let (twin, _, _) = case.on(&cpu);
    let refused = case.run(&gs, false).unwrap_err();
    assert!(refused.to_string().contains("member blocks"), "{refused}");
    let (got, _, _) = case.run(&gs, true).unwrap();
    assert_close(&got, &twin, 1e-6, 1e-5, "split ensemble");
}

test_main!(
    cpu: [banded_gains_are_localized],
    gpu: [banded_gain_step_agrees_with_the_cpu, observed_moments_agree_with_the_cpu, covariance_guided_analysis_agrees_with_the_cpu, local_gains_agree_with_the_cpu_twin_and_the_f64_reference, wide_windows_and_split_ensembles_are_unsupported_kernels_with_a_host_path],
);
