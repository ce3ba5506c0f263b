//! Covariance (Kalman-gain) guidance for EnFF: the linear-Gaussian Kalman limit, bad input,
//! the cold start, and short twin runs.

use common::{assert_close, gpu, gpu_split};
use enff::backend::cpu::Cpu;
use enff::backend::gpu::{gain_space, GainSpace, GPU_MAX_ENS_MEMBERS, GPU_MAX_WINDOW};
use enff::backend::{Backend, GainStep, InnovationClip, LocalGains};
use enff::experiment::{preset, Experiment};
use enff::filter::covariance::{gain_windows, local_gains};
use enff::filter::{Enff, EnffConfig, Etkf, Filter, Observation};
use enff::flow::{GainSchedule, GuidanceKind};
use enff::model::Geometry;
use enff::observe::{ObservationOperator, Observe, Pointwise};
use enff::rng::{NoiseKey, Stream};
use enff::Error;
mod common;

/// The population of the linear-Gaussian test: mean, covariance square root (lower
/// triangular), observation and its noise.
struct Gaussian {
    d: usize,
    mean: Vec<f64>,
    chol: Vec<f64>,
    op: Observe,
    y: Vec<f32>,
    sigma: f64,
}

impl Gaussian {
    fn new() -> Self {
        let d = 9;
        // Ring covariance 1.5·0.6^dist (SPD), mean 0.3·k.
        let cov = |i: usize, j: usize| {
            let a = i.abs_diff(j);
            1.5 * 0.6f64.powi(a.min(d - a) as i32)
        };
        let mut chol = vec![0.0f64; d * d];
        for j in 0..d {
            let mut s = cov(j, j);
            for k in 0..j {
                s -= chol[j * d + k].powi(2);
            }
            chol[j * d + j] = s.sqrt();
            for r in j + 1..d {
                let mut s = cov(r, j);
                for k in 0..j {
                    s -= chol[r * d + k] * chol[j * d + k];
                }
                chol[r * d + j] = s / chol[j * d + j];
            }
        }
        let op = Observe::identity().subsample(2, 0).unwrap();
        let y = vec![1.0f32, -0.5, 2.0, 0.4, -1.2];
        Gaussian {
            d,
            mean: (0..d).map(|k| 0.3 * k as f64).collect(),
            chol,
            op,
            y,
            sigma: 0.7,
        }
    }

    fn cov(&self, i: usize, j: usize) -> f64 {
        (0..self.d)
            .map(|k| self.chol[i * self.d + k] * self.chol[j * self.d + k])
            .sum()
    }

    /// The Kalman analysis mean with the population covariance.
    fn kalman_mean(&self) -> Vec<f64> {
        let m = self.y.len();
        let c: Vec<usize> = (0..m).map(|q| self.op.component(q)).collect();
        // S = H P Hᵀ + R, solve S z = y − H μ by Gauss–Jordan.
        let mut s: Vec<Vec<f64>> = (0..m)
            .map(|a| {
                let mut row: Vec<f64> = (0..m).map(|b| self.cov(c[a], c[b])).collect();
                row[a] += self.sigma * self.sigma;
                row.push(self.y[a] as f64 - self.mean[c[a]]);
                row
            })
            .collect();
        for p in 0..m {
            let piv = s[p][p];
            for v in s[p].iter_mut() {
                *v /= piv;
            }
            for r in 0..m {
                if r != p {
                    let f = s[r][p];
                    let pr = s[p].clone();
                    for (v, pv) in s[r].iter_mut().zip(pr) {
                        *v -= f * pv;
                    }
                }
            }
        }
        (0..self.d)
            .map(|i| self.mean[i] + (0..m).map(|q| self.cov(i, c[q]) * s[q][m]).sum::<f64>())
            .collect()
    }

    /// `n` draws (row-major `n × d`).
    fn sample(&self, n: usize, seed: u64) -> Vec<f32> {
        let cpu = Cpu::new();
        let mut z = cpu.zeros(n, self.d).unwrap();
        cpu.fill_normal(&mut z, NoiseKey::new(seed, Stream::User, 0), None, 1.0)
            .unwrap();
        let z = cpu.read(&z).unwrap();
        let d = self.d;
        (0..n * d)
            .map(|e| {
                let (k, i) = (e / d, e % d);
                let v: f64 = (0..=i)
                    .map(|j| self.chol[i * d + j] * z[k * d + j] as f64)
                    .sum();
                (self.mean[i] + v) as f32
            })
            .collect()
    }
}

fn mean_of(x: &[f32], n: usize, d: usize) -> Vec<f64> {
    (0..d)
        .map(|i| (0..n).map(|k| x[k * d + i] as f64).sum::<f64>() / n as f64)
        .collect()
}

fn rms(a: &[f64], b: &[f64]) -> f64 {
    (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
}

/// One covariance-guided EnFF-F2P analysis of the forecast `fc` (the previous analysis is the
/// forecast itself, so the transport velocity vanishes and only the guidance moves members),
/// and one ETKF analysis of the same forecast.
fn analyses(g: &Gaussian, fc: &[f32], n: usize, stages: usize) -> (Vec<f64>, Vec<f64>) {
    let cpu = Cpu::new();
    let d = g.d;
    let y = cpu.upload(1, g.y.len(), &g.y).unwrap();
    let obs = Observation {
        y: &y,
        operator: &g.op,
        noise_std: g.sigma as f32,
    };
    let cfg = EnffConfig {
        guidance: GuidanceKind::Covariance,
        // A radius far beyond the ring: no localization, the global Kalman gain.
        loc_radius: Some(1e4),
        gain_stages: stages,
        // The Kalman limit is exact for unclipped innovations; the bound (2 standard
        // deviations by default) would clamp a few of a Gaussian ensemble's.
        innovation_clip: 0.0,
        ..EnffConfig::f2p(1e-4, 1.0, 8)
    };
    let mut enff = Enff::<Cpu>::new(cfg)
        .unwrap()
        .with_geometry(Geometry::Ring { len: d });
    let prev = cpu.upload(n, d, fc).unwrap();
    let mut ens = cpu.upload(n, d, fc).unwrap();
    enff.analyse(&cpu, &mut ens, Some(&prev), &obs, 1).unwrap();
    let a = mean_of(&cpu.read(&ens).unwrap(), n, d);
    let mut etkf = Etkf::<Cpu>::new(1.0).unwrap();
    let mut ens = cpu.upload(n, d, fc).unwrap();
    etkf.analyse(&cpu, &mut ens, None, &obs, 1).unwrap();
    (a, mean_of(&cpu.read(&ens).unwrap(), n, d))
}

/// With linear h, a Gaussian forecast ensemble and λ = 1, the tempered stages make one analysis
/// move the ensemble mean exactly by the Kalman gain of the ensemble covariance: the EnFF mean
/// equals the ETKF mean of the same ensemble (up to the σ_min source noise and f32), for any
/// number of stages, and both converge to the population Kalman mean as n grows.
fn one_analysis_reproduces_the_kalman_mean_as_n_grows() {
    let g = Gaussian::new();
    let kalman = g.kalman_mean();
    let prior_err = rms(&g.mean, &kalman);
    let mut errs = Vec::new();
    for &n in &[20usize, 80, 320] {
        let mut e = 0.0;
        let seeds = 2;
        for seed in 0..seeds {
            let fc = g.sample(n, 100 * n as u64 + seed);
            for stages in [1usize, 4] {
                let (enff, etkf) = analyses(&g, &fc, n, stages);
                let gap = rms(&enff, &etkf);
                assert!(
                    gap < 2e-3,
                    "n={n} stages={stages}: EnFF vs ETKF mean gap {gap}"
                );
                if stages == 4 {
                    e += rms(&enff, &kalman) / seeds as f64;
                }
            }
        }
        errs.push(e);
    }
    // Monte-Carlo error ∝ 1/√n: 16× more members, about 4× smaller error.
    assert!(errs[2] < 0.15, "errors {errs:?} (prior off by {prior_err})");
    assert!(errs[2] < errs[0] / 2.0, "errors {errs:?}");
    assert!(prior_err > 0.3, "the test must move the mean: {prior_err}");
}

backend_test!(
    /// The global gain (`filter.loc_radius = none`, or a model without a spatial geometry):
    /// with linear h and λ = 1 one analysis moves the mean to the ETKF mean of the same
    /// ensemble, on every backend, with one or four stages.
    global_gain_gives_the_etkf_mean<B>(b) {
        let g = Gaussian::new();
        let (n, d) = (40, g.d);
        let fc = g.sample(n, 11);
        let y = b.upload(1, g.y.len(), &g.y).unwrap();
        let obs = Observation {
            y: &y,
            operator: &g.op,
            noise_std: g.sigma as f32,
        };
        let mut etkf = Etkf::<B>::new(1.0).unwrap();
        let mut ens = b.upload(n, d, &fc).unwrap();
        etkf.analyse(b, &mut ens, None, &obs, 1).unwrap();
        let want = mean_of(&b.read(&ens).unwrap(), n, d);
        for geometry in [Geometry::None, Geometry::Ring { len: d }] {
            for stages in [1usize, 4] {
                let cfg = EnffConfig {
                    guidance: GuidanceKind::Covariance,
                    loc_radius: None,
                    gain_stages: stages,
                    innovation_clip: 0.0,
                    ..EnffConfig::f2p(1e-4, 1.0, 8)
                };
                let mut enff = Enff::<B>::new(cfg).unwrap().with_geometry(geometry);
                let prev = b.upload(n, d, &fc).unwrap();
                let mut ens = b.upload(n, d, &fc).unwrap();
                enff.analyse(b, &mut ens, Some(&prev), &obs, 1).unwrap();
                let got = mean_of(&b.read(&ens).unwrap(), n, d);
                let gap = rms(&got, &want);
                assert!(gap < 2e-3, "{geometry:?}, {stages} stages: EnFF vs ETKF mean gap {gap}");
                assert!(rms(&got, &mean_of(&fc, n, d)) > 0.1, "the analysis must move the mean");
            }
        }
    }
);

backend_test!(
    /// Transport weights at the unguided position (`unguided_weights`): in two dimensions a
    /// strong observation displaces every member by more than the members' spacing, so with
    /// the weights at the guided state members are handed over to other members' paths (the
    /// rotation carries each path differently). With the weights at the unguided position
    /// every member stays on its own path and the analysis mean is the ETKF mean of the
    /// forecast, on every backend; without guidance the two choices are the same flow.
    unguided_weights_keep_members_on_their_own_paths<B>(b) {
        let (n, d) = (16usize, 2usize);
        let prev: Vec<f32> = (0..n)
            .flat_map(|k| {
                let a = k as f32 * 2.399;
                let r = 0.05 + 0.3 * ((k * 37 % 17) as f32 / 17.0);
                [2.0 + r * a.cos(), r * a.sin()]
            })
            .collect();
        let (c, s) = (0.4f32.cos(), 0.4f32.sin());
        let fc: Vec<f32> = prev
            .chunks(2)
            .flat_map(|p| [c * p[0] - s * p[1], s * p[0] + c * p[1]])
            .collect();
        let fmean = mean_of(&fc, n, d);
        let yv = [fmean[0] as f32 + 0.9, fmean[1] as f32 - 0.7];
        let y = b.upload(1, 2, &yv).unwrap();
        let op = Observe::identity();
        let obs = Observation {
            y: &y,
            operator: &op,
            noise_std: 0.2,
        };
        let mut etkf = Etkf::<B>::new(1.0).unwrap();
        let mut ens = b.upload(n, d, &fc).unwrap();
        etkf.analyse(b, &mut ens, None, &obs, 1).unwrap();
        let want = mean_of(&b.read(&ens).unwrap(), n, d);
        let run = |guidance: GuidanceKind, unguided: bool| {
            let cfg = EnffConfig {
                guidance,
                loc_radius: None,
                gain_stages: 4,
                innovation_clip: 0.0,
                unguided_weights: unguided,
                ..EnffConfig::f2p(1e-4, 1.0, 9)
            };
            let mut enff = Enff::<B>::new(cfg).unwrap().with_geometry(Geometry::None);
            let p = b.upload(n, d, &prev).unwrap();
            let mut ens = b.upload(n, d, &fc).unwrap();
            enff.analyse(b, &mut ens, Some(&p), &obs, 1).unwrap();
            b.read(&ens).unwrap()
        };
        let on_path = mean_of(&run(GuidanceKind::Covariance, true), n, d);
        let handed = mean_of(&run(GuidanceKind::Covariance, false), n, d);
        let (gap, gap_guided) = (rms(&on_path, &want), rms(&handed, &want));
        assert!(gap < 2e-3, "unguided weights: EnFF vs ETKF mean gap {gap}");
        let moved = rms(&on_path, &fmean);
        assert!(moved > 0.2, "the analysis must move the mean ({moved})");
        assert!(
            gap_guided > 10.0 * gap.max(1e-4),
            "the weights at the guided state should hand members over here ({gap_guided})"
        );
        let (a, b_) = (run(GuidanceKind::None, true), run(GuidanceKind::None, false));
        let worst = a.iter().zip(&b_).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "without guidance the flows differ by {worst}");
        let back = a.iter().zip(&fc).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(back < 1e-2, "without guidance the flow returns the forecast ({back})");
    }
);

backend_test!(
    /// Stages at the price of one: for linear h the gains of every stage built together from
    /// one linearization (`relinearize = false`) move the ensemble as the per-stage gains do
    /// (`relinearize = true`), localized and global, with the innovation bound on, for the
    /// homotopy and the constant schedule (whose equal exponents share one table).
    shared_stage_gains_equal_the_per_stage_gains_for_linear_h<B>(b) {
        let g = Gaussian::new();
        let (n, d) = (24, g.d);
        let fc = g.sample(n, 5);
        let y = b.upload(1, g.y.len(), &g.y).unwrap();
        let obs = Observation {
            y: &y,
            operator: &g.op,
            noise_std: g.sigma as f32,
        };
        for (radius, schedule, stages) in [
            (Some(3.0), GainSchedule::Homotopy, 4usize),
            (None, GainSchedule::Homotopy, 3),
            (Some(2.5), GainSchedule::Constant, 4),
        ] {
            let run = |relinearize: bool| {
                let cfg = EnffConfig {
                    guidance: GuidanceKind::Covariance,
                    loc_radius: radius,
                    gain_stages: stages,
                    gain_schedule: schedule,
                    relinearize,
                    ..EnffConfig::f2p(1e-3, 1.0, 8)
                };
                let mut enff = Enff::<B>::new(cfg)
                    .unwrap()
                    .with_geometry(Geometry::Ring { len: d });
                let prev = b.upload(n, d, &fc).unwrap();
                let mut ens = b.upload(n, d, &fc).unwrap();
                // Two analyses: the second reuses the first one's buffers.
                for cycle in 1..=2 {
                    enff.analyse(b, &mut ens, Some(&prev), &obs, cycle).unwrap();
                }
                b.read(&ens).unwrap()
            };
            let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let (per_stage, shared, fc) = (wide(&run(true)), wide(&run(false)), wide(&fc));
            let gap = rms(&shared, &per_stage);
            let moved = rms(&shared, &fc);
            assert!(moved > 0.1, "{radius:?} {schedule:?}: the analysis must move the members");
            assert!(
                gap < 1e-4 * (1.0 + moved),
                "{radius:?} {schedule:?}: shared vs per-stage gains differ by {gap}"
            );
        }
    }
);

/// Shared stage gains on a device whose kernel arguments hold one gain table at a time: the
/// tables come in groups, each linearized at the first stage's endpoints, and the analysis
/// equals the CPU's (all tables in one call), for linear and for arctan observations.
fn shared_gains_in_groups_equal_one_group() {
    let Some((_guard, _g)) = gpu() else { return };
    let cpu = Cpu::new();
    let (n, d) = (12, 31);
    let fc: Vec<f32> = (0..n * d)
        .map(|e| ((e * 7919 % 97) as f32 / 97.0 - 0.5) * 2.0 + (e % d) as f32 * 0.05)
        .collect();
    for op in [
        Observe::identity().subsample(2, 0).unwrap(),
        Observe::arctan(),
    ] {
        let m = op.obs_dim(d).unwrap();
        let yv: Vec<f32> = (0..m).map(|q| (q as f32 * 0.37).sin()).collect();
        let cfg = EnffConfig {
            guidance: GuidanceKind::Covariance,
            loc_radius: Some(1.5),
            gain_stages: 4,
            relinearize: false,
            ..EnffConfig::f2p(1e-2, 1.0, 8)
        };
        let w = gain_windows(&op, d, Geometry::Ring { len: d }, 1.5)
            .unwrap()
            .w;
        // Room for one table (d × w), not two; the ensemble is split into member blocks.
        let g = gpu_split((d * w * 4 + 8) as u64).expect("the adapter opened above");
        assert_eq!(g.max_binding_bytes() / (d * w * 4) as u64, 1);
        let run = |b: &dyn Fn(&mut Vec<f32>)| {
            let mut out = fc.clone();
            b(&mut out);
            out
        };
        let on_cpu = run(&|out| {
            let y = cpu.upload(1, m, &yv).unwrap();
            let obs = Observation {
                y: &y,
                operator: &op,
                noise_std: 0.2,
            };
            let mut f = Enff::<Cpu>::new(cfg.clone())
                .unwrap()
                .with_geometry(Geometry::Ring { len: d });
            let prev = cpu.upload(n, d, &fc).unwrap();
            let mut ens = cpu.upload(n, d, &fc).unwrap();
            f.analyse(&cpu, &mut ens, Some(&prev), &obs, 1).unwrap();
            *out = cpu.read(&ens).unwrap();
        });
        let on_gpu = run(&|out| {
            let y = g.upload(1, m, &yv).unwrap();
            let obs = Observation {
                y: &y,
                operator: &op,
                noise_std: 0.2,
            };
            let mut f = Enff::<enff::backend::gpu::Gpu>::new(cfg.clone())
                .unwrap()
                .with_geometry(Geometry::Ring { len: d });
            let prev = g.upload(n, d, &fc).unwrap();
            let mut ens = g.upload(n, d, &fc).unwrap();
            f.analyse(&g, &mut ens, Some(&prev), &obs, 1).unwrap();
            *out = g.read(&ens).unwrap();
        });
        let moved = on_cpu
            .iter()
            .zip(&fc)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 0.05, "{op:?}: the analysis must move the members");
        assert_close(
            &on_gpu,
            &on_cpu,
            2e-4,
            1e-3,
            &format!("{op:?}: groups of one table vs one group"),
        );
    }
}

backend_test!(
    /// A component whose localization window holds no observation (every 10th component
    /// observed, a short radius) gets an all-zero gain row, shared stages or not, and the
    /// analysis stays finite: only the observed neighbourhoods are pulled towards the data.
    a_window_without_observations_gets_a_zero_gain<B>(b) {
        let (n, d) = (10, 40);
        let op = Observe::identity().subsample(10, 0).unwrap();
        let geometry = Geometry::Ring { len: d };
        let radius = 0.6;
        let win = gain_windows(&op, d, geometry, radius).unwrap();
        let empty: Vec<usize> = (0..d)
            .filter(|&i| win.taper[i * win.w..(i + 1) * win.w].iter().all(|&r| r == 0.0))
            .collect();
        assert!(empty.len() >= d / 4, "the case must have empty windows: {empty:?}");
        let x = normals(n, d, 7, 1.0);
        let m = op.obs_dim(d).unwrap();
        let xb = b.upload(n, d, &x).unwrap();
        let index = b.upload(d, win.w, &win.index).unwrap();
        let taper = b.upload(d, win.w, &win.taper).unwrap();
        let taus = [0.5f32, 1.0];
        let mut gain = b.zeros(2 * d, win.w).unwrap();
        let mut hbar = b.zeros(2, m).unwrap();
        let call = LocalGains {
            observe: op,
            forecast: &xb,
            endpoint: &xb,
            index: &index,
            taper: &taper,
            noise_std: 0.3,
            taus: &taus,
        };
        b.local_gains(&call, &mut gain, &mut hbar).unwrap();
        let k = b.read(&gain).unwrap();
        assert!(k.iter().all(|v| v.is_finite()));
        for table in k.chunks(d * win.w) {
            for &i in &empty {
                assert!(table[i * win.w..(i + 1) * win.w].iter().all(|&g| g == 0.0), "row {i}");
            }
            assert!(table.iter().any(|&g| g != 0.0), "the observed rows must have gains");
        }
        // A whole analysis with such windows: finite, observed components pulled to y = 3.
        let y = b.upload(1, m, &vec![3.0f32; m]).unwrap();
        let obs = Observation {
            y: &y,
            operator: &op,
            noise_std: 0.3,
        };
        let cfg = EnffConfig {
            guidance: GuidanceKind::Covariance,
            loc_radius: Some(radius),
            ..EnffConfig::f2p(1e-2, 1.0, 8)
        };
        let mut f = Enff::<B>::new(cfg).unwrap().with_geometry(geometry);
        let mut ens = b.upload(n, d, &x).unwrap();
        f.analyse(b, &mut ens, Some(&xb), &obs, 1).unwrap();
        let a = b.read(&ens).unwrap();
        assert!(a.iter().all(|v| v.is_finite()));
        let mean = |v: &[f32], c: usize| (0..n).map(|k| v[k * d + c]).sum::<f32>() / n as f32;
        for q in 0..m {
            let c = op.component(q);
            assert!(
                (mean(&a, c) - 3.0).abs() < (mean(&x, c) - 3.0).abs(),
                "observed component {c} must move towards the observation"
            );
        }
    }
);

/// An ensemble-space matrix that overflows (observations of noise std 1e-25, so the scaled
/// anomalies are ~1e25 and their products beyond f32) is a typed divergence naming the flow
/// step, the guidance stage and the component, not NaN members.
fn an_overflowing_gain_names_its_stage_and_component() {
    let cpu = Cpu::new();
    let (n, d) = (6, 8);
    let x: Vec<f32> = (0..n * d).map(|k| (k * 7 % 11) as f32 - 5.0).collect();
    let prev = cpu.upload(n, d, &x).unwrap();
    let mut ens = cpu.upload(n, d, &x).unwrap();
    let y = cpu.upload(1, d, &vec![0.0; d]).unwrap();
    let op = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &op,
        noise_std: 1e-25,
    };
    let cfg = EnffConfig {
        guidance: GuidanceKind::Covariance,
        loc_radius: None,
        innovation_clip: 0.0,
        ..EnffConfig::f2p(0.1, 1.0, 4)
    };
    let mut f = Enff::<Cpu>::new(cfg).unwrap();
    match f.analyse(&cpu, &mut ens, Some(&prev), &obs, 1) {
        Err(Error::Diverged { stage, detail, .. }) => {
            assert!(stage.contains("covariance guidance stage 1"), "{stage}");
            assert!(detail.contains("component"), "{detail}");
        }
        other => panic!("expected a divergence naming the stage, got {other:?}"),
    }
}

/// The plain constant-gain form with innovation feedback under-corrects: it stays further from
/// the Kalman mean than the tempered stages (why they are the default).
fn the_constant_schedule_under_corrects_strong_observations() {
    let g = Gaussian::new();
    let n = 100;
    let fc = g.sample(n, 5);
    let (_, etkf) = analyses(&g, &fc, n, 4);
    let cpu = Cpu::new();
    let y = cpu.upload(1, g.y.len(), &g.y).unwrap();
    let obs = Observation {
        y: &y,
        operator: &g.op,
        noise_std: 0.1,
    };
    let run = |schedule| {
        let cfg = EnffConfig {
            guidance: GuidanceKind::Covariance,
            loc_radius: Some(1e4),
            gain_schedule: schedule,
            // The exact Kalman limit (no innovation bound).
            innovation_clip: 0.0,
            ..EnffConfig::f2p(1e-4, 1.0, 8)
        };
        let mut f = Enff::<Cpu>::new(cfg)
            .unwrap()
            .with_geometry(Geometry::Ring { len: g.d });
        let prev = cpu.upload(n, g.d, &fc).unwrap();
        let mut ens = cpu.upload(n, g.d, &fc).unwrap();
        f.analyse(&cpu, &mut ens, Some(&prev), &obs, 1).unwrap();
        mean_of(&cpu.read(&ens).unwrap(), n, g.d)
    };
    let mut etkf_f = Etkf::<Cpu>::new(1.0).unwrap();
    let mut ens = cpu.upload(n, g.d, &fc).unwrap();
    etkf_f.analyse(&cpu, &mut ens, None, &obs, 1).unwrap();
    let etkf_sharp = mean_of(&cpu.read(&ens).unwrap(), n, g.d);
    let tempered = rms(&run(GainSchedule::Homotopy), &etkf_sharp);
    let constant = rms(&run(GainSchedule::Constant), &etkf_sharp);
    assert!(tempered < 2e-3, "tempered {tempered}");
    assert!(
        constant > 10.0 * tempered,
        "constant {constant} vs tempered {tempered}"
    );
    assert!(rms(&etkf, &etkf_sharp) > 0.0);
}

fn config_error(name: &str, sets: &[&str]) -> String {
    let mut cfg = preset(name).unwrap().config;
    let mut err = None;
    for s in sets {
        if let Err(e) = cfg.set(s) {
            err = Some(e);
        }
    }
    match err {
        Some(e) => e.to_string(),
        None => cfg
            .validate()
            .expect_err("the configuration must be refused")
            .to_string(),
    }
}

fn bad_input_is_a_typed_error_naming_the_parameter() {
    let cov = "filter.guidance=covariance";
    for (sets, key) in [
        (vec![cov, "filter.loc_radius=0"], "filter.loc_radius"),
        (vec![cov, "filter.loc_radius=-2"], "filter.loc_radius"),
        (
            vec![cov, "filter.guidance_scale=0"],
            "filter.guidance_scale",
        ),
        (
            vec![cov, "filter.guidance_scale=-1"],
            "filter.guidance_scale",
        ),
        (vec![cov, "filter.gain_stages=50"], "filter.gain_stages"),
        (vec![cov, "filter.gain_stages=0"], "filter.gain_stages"),
        (vec![cov, "filter.relinearize=maybe"], "relinearize"),
        (vec![cov, "filter.integrator=heun"], "filter.integrator"),
        (
            vec!["filter.unguided_weights=true", "filter.integrator=heun"],
            "filter.unguided_weights",
        ),
        (vec!["filter.unguided_weights=maybe"], "unguided_weights"),
        (
            vec![cov, "filter.innovation_clip=-1"],
            "filter.innovation_clip",
        ),
        (
            vec![cov, "filter.innovation_clip=nan"],
            "filter.innovation_clip",
        ),
        (
            vec!["filter.adaptive_inflation=0.9"],
            "filter.adaptive_inflation",
        ),
        (
            vec!["filter.adaptive_inflation=inf"],
            "filter.adaptive_inflation",
        ),
    ] {
        let msg = config_error("lorenz96_sakov2008", &sets);
        assert!(msg.contains(key), "{sets:?}: {msg}");
    }
    // A model without a geometry (Lorenz-63) takes the global gain.
    let mut l63 = preset("lorenz63_spantini2022").unwrap().config;
    l63.set(cov).unwrap();
    l63.validate().unwrap();
    // A global gain table beyond its limit is refused, naming the radius that localizes it.
    let e = enff::filter::covariance::global_windows(&Observe::identity(), 5000).unwrap_err();
    assert!(e.to_string().contains("filter.loc_radius"), "{e}");
    let w =
        enff::filter::covariance::global_windows(&Observe::identity().subsample(2, 1).unwrap(), 5)
            .unwrap();
    assert_eq!((w.w, w.index.len()), (2, 10));
    assert_eq!(&w.index[..4], &[0.0, 1.0, 0.0, 1.0]);
    assert!(w.taper.iter().all(|&t| t == 1.0));
    // A filter built without a geometry uses the global gain too.
    let cpu = Cpu::new();
    let cfg = EnffConfig {
        guidance: GuidanceKind::Covariance,
        ..EnffConfig::f2p(0.1, 1.0, 4)
    };
    let mut f = Enff::<Cpu>::new(cfg).unwrap();
    let x: Vec<f32> = (0..24).map(|k| (k % 5) as f32 * 0.1).collect();
    let prev = cpu.upload(3, 8, &x).unwrap();
    let mut ens = cpu.upload(3, 8, &x).unwrap();
    let y = cpu.upload(1, 8, &[1.0; 8]).unwrap();
    let op = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &op,
        noise_std: 1.0,
    };
    f.analyse(&cpu, &mut ens, Some(&prev), &obs, 0).unwrap();
    assert_ne!(cpu.read(&ens).unwrap(), x);
    assert_eq!(op.obs_dim(8).unwrap(), 8);
}

fn run(name: &str, sets: &[&str], seed: u64) -> enff::experiment::Summary {
    let p = preset(name).unwrap();
    let mut cfg = p.config.clone();
    for s in sets {
        cfg.set(s).unwrap();
    }
    cfg.experiment.seed = seed;
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    exp.run(&Cpu::new(), |m| {
        assert!(
            m.rmse.is_finite() && m.spread.is_finite(),
            "cycle {}",
            m.cycle
        )
    })
    .unwrap()
    .summary
}

/// The cold-start arctan Lorenz-96 (ensemble N(0, 1), truth std 3.6, σ_y = 0.05) with
/// covariance guidance runs its 80 cycles without a non-finite value and converges: enff
/// measures 0.048-0.049 over seeds at d = 400 and d = 1000 (plain EnFF-F2P: 0.16-0.17).
fn cold_start_arctan_lorenz96_runs_80_cycles_and_converges() {
    let s = run("lorenz96_bao2024_covariance", &["model.d=100"], 5);
    assert_eq!(s.cycles, 80);
    assert!(s.rmse_mean < 0.08, "time-mean RMSE {}", s.rmse_mean);
    assert!(s.rmse_last < 0.1, "last-cycle RMSE {}", s.rmse_last);
    assert!(s.spread_mean > 0.02, "spread {} collapsed", s.spread_mean);
}

/// Canonical Lorenz-96 (d = 40, identity observations, n = 40): covariance guidance at λ = 1
/// with a wide taper (n = 40 members resolve the 40-dimensional covariance, so the radius only
/// trims sampling noise) reaches the ETKF, where the paper's local guidance stalls near 0.42.
/// Over 1000 cycles and 3 seeds enff measures 0.185 ± 0.004 against the ETKF's 0.194 ± 0.017
/// (0.188 with inflation 1.02; BENCHMARKS.md); this short run (200 cycles averaged) allows 10 %.
fn sakov2008_covariance_guidance_matches_the_etkf() {
    let cov = run(
        "lorenz96_sakov2008",
        &[
            "filter.guidance=covariance",
            "filter.guidance_scale=1",
            "filter.sigma_min=0.01",
            "filter.loc_radius=16",
            "experiment.cycles=300",
        ],
        3,
    );
    let etkf = run(
        "lorenz96_sakov2008",
        &["filter.kind=etkf", "experiment.cycles=300"],
        3,
    );
    assert!(
        cov.rmse_mean < 1.1 * etkf.rmse_mean && cov.rmse_mean < 0.2,
        "covariance EnFF {} vs ETKF {}",
        cov.rmse_mean,
        etkf.rmse_mean
    );
}

/// Every 2nd component observed through arctan, from the cold start: the unobserved half is
/// reached only through the covariance. The preset's safeguards (innovation bound, adaptive
/// inflation) make it converge; the paper's local guidance stalls near 1.4 and the ETKF and
/// LETKF lose track (BENCHMARKS.md). Issue target: ≤ 0.5.
fn half_observed_cold_start_converges_with_the_safeguards() {
    let s = run(
        "lorenz96_bao2024_covariance",
        &["model.d=200", "observe.every=2"],
        7,
    );
    assert_eq!(s.cycles, 80);
    assert!(s.rmse_mean < 0.5, "time-mean RMSE {}", s.rmse_mean);
    assert!(s.rmse_last < 0.3, "last-cycle RMSE {}", s.rmse_last);
}

/// The innovation bound limits how far one stage moves a member: with a huge gain and an
/// innovation far beyond the forecast spread, the step is at most
/// `h_gain · Σ|K| · c·√(h'² v + σ²)`, and without the bound it is not. (That the backends
/// compute `h'² v + σ²` itself is checked against the f64 reference in `tests/covariance_guidance.rs`
/// and below.)
fn the_innovation_bound_limits_a_stage_step() {
    use enff::backend::{GainStep, InnovationClip};
    let cpu = Cpu::new();
    let (n, d, w) = (3usize, 6usize, 2usize);
    let op = Observe::arctan();
    let state = vec![0.0f32; n * d];
    let zeros = cpu.upload(n, d, &state).unwrap();
    // Endpoints deep in arctan's saturation, the observation at the other end.
    let endpoint = cpu.upload(n, d, &vec![8.0f32; n * d]).unwrap();
    let y = cpu.upload(1, d, &vec![-1.2f32; d]).unwrap();
    let gain = cpu.upload(d, w, &vec![50.0f32; d * w]).unwrap();
    let index: Vec<f32> = (0..d * w).map(|e| ((e / w + e % w) % d) as f32).collect();
    let index = cpu.upload(d, w, &index).unwrap();
    let (scale, sigma) = (2.0f32, 0.05f32);
    // The stage's observation statistics: h̄ (unused here) and the linearized innovation
    // variance h'(8)²·0.25 + σ² of a forecast with std 0.5 linearized at 8.
    let dh = 1.0 / (1.0 + 64.0f32);
    let s2 = dh * dh * 0.25 + sigma * sigma;
    let mut stats = vec![0.0f32; d];
    stats.extend(std::iter::repeat_n(s2, d));
    let stats = cpu.upload(2, d, &stats).unwrap();
    let step = |clip: bool| {
        let mut st = cpu.upload(n, d, &state).unwrap();
        cpu.gain_step(
            &mut st,
            &GainStep {
                observe: op,
                y: &y,
                gain: &gain,
                table: 0,
                index: &index,
                endpoint: &endpoint,
                velocity: &zeros,
                h_velocity: 0.0,
                h_gain: 0.5,
                mean_obs: None,
                clip: clip.then_some(InnovationClip {
                    innovation_var: &stats,
                    scale,
                }),
            },
        )
        .unwrap();
        cpu.read(&st).unwrap()
    };
    let bound = scale * s2.sqrt();
    let limit = 0.5 * (w as f32 * 50.0) * bound;
    let clipped = step(true);
    let free = step(false);
    for (a, b) in clipped.iter().zip(&free) {
        assert!(a.abs() <= limit * (1.0 + 1e-5), "{a} > {limit}");
        assert!(
            b.abs() > 5.0 * limit,
            "unclipped step {b} should exceed the bound"
        );
    }
}

/// Adaptive inflation: a forecast whose spread is far below its innovations is inflated by the
/// configured maximum; a balanced one is left alone.
fn adaptive_inflation_inflates_an_under_dispersed_forecast_only() {
    let cpu = Cpu::new();
    let (n, d) = (10usize, 24usize);
    let op = Observe::identity();
    let spread_of = |x: &[f32]| {
        let mu = mean_of(x, n, d);
        (0..d)
            .map(|c| {
                (0..n)
                    .map(|k| (x[k * d + c] as f64 - mu[c]).powi(2))
                    .sum::<f64>()
                    / (n - 1) as f64
            })
            .sum::<f64>()
            / d as f64
    };
    let fc: Vec<f32> = (0..n * d)
        .map(|e| 0.05 * (((e * 7919) % 23) as f32 / 11.0 - 1.0))
        .collect();
    let run = |y_value: f32| {
        let cfg = EnffConfig {
            adaptive_inflation: 1.5,
            ..EnffConfig::f2p(1e-4, 0.0, 4)
        };
        let mut f = Enff::<Cpu>::new(cfg).unwrap();
        let y = cpu.upload(1, d, &vec![y_value; d]).unwrap();
        let obs = Observation {
            y: &y,
            operator: &op,
            noise_std: 0.5,
        };
        let prev = cpu.upload(n, d, &fc).unwrap();
        let mut ens = cpu.upload(n, d, &fc).unwrap();
        f.analyse(&cpu, &mut ens, Some(&prev), &obs, 1).unwrap();
        (f.last_inflation(), spread_of(&cpu.read(&ens).unwrap()))
    };
    // Innovation 3 against a spread of ~0.03 and σ_y = 0.5: inflated by the cap.
    let (g, _) = run(3.0);
    assert_eq!(g, 1.5);
    // Innovations within the noise: left alone.
    let (g, _) = run(0.0);
    assert_eq!(g, 1.0);
    assert!(spread_of(&fc) > 0.0);
}

/// `rows × cols` standard normals scaled by `scale` (drawn on the CPU backend).
fn normals(rows: usize, cols: usize, seed: u64, scale: f32) -> Vec<f32> {
    let cpu = Cpu::new();
    let mut b = cpu.zeros(rows, cols).unwrap();
    cpu.fill_normal(&mut b, NoiseKey::new(seed, Stream::User, 0), None, scale)
        .unwrap();
    cpu.read(&b).unwrap()
}

/// The backend's local gains (the CPU twin: f32 algebra, eight-lane blocks, observation or
/// ensemble space) agree with the f64 host reference on odd sizes, for windows narrower
/// (observation space) and wider (ensemble space) than the ensemble, on a ring and a torus,
/// for a subsampled arctan and the identity; h̄ is the mean of h at the endpoints.
fn backend_local_gains_match_the_f64_reference() {
    let cpu = Cpu::new();
    let torus = Geometry::Torus {
        nx: 7,
        ny: 5,
        fields: 3,
    };
    for (n, geometry, op, radius, tau) in [
        (21, Geometry::Ring { len: 59 }, Observe::arctan(), 2.0, 2.0),
        (
            7,
            Geometry::Ring { len: 43 },
            Observe::arctan().subsample(2, 1).unwrap(),
            3.5,
            0.5,
        ),
        (5, Geometry::Ring { len: 31 }, Observe::identity(), 1.5, 1.0),
        (
            11,
            torus,
            Observe::arctan().subsample(3, 1).unwrap(),
            1.3,
            1.5,
        ),
    ] {
        let d = geometry.dim().unwrap();
        let taus = [tau, 0.3 * tau, 0.05 + tau * 1.7];
        let seed = (n * d) as u64;
        let x = normals(n, d, seed, 1.3);
        let xh: Vec<f32> = normals(n, d, seed + 1, 0.4)
            .iter()
            .zip(&x)
            .map(|(e, v)| v + e - 0.3)
            .collect();
        let sigma = 0.3;
        let lin: Vec<f64> = (0..d)
            .map(|c| (0..n).map(|k| xh[k * d + c] as f64).sum::<f64>() / n as f64)
            .collect();
        let want = enff::filter::covariance::local_gains(
            &x,
            n,
            d,
            &op,
            sigma as f64,
            geometry,
            radius,
            &taus.iter().map(|&t| t as f64).collect::<Vec<_>>(),
            Some(&lin),
        )
        .unwrap();
        let win = enff::filter::covariance::gain_windows(&op, d, geometry, radius).unwrap();
        assert_eq!((win.w, &win.index), (want.w, &want.index));
        let m = op.obs_dim(d).unwrap();
        let buf = |r, c, v: &[f32]| cpu.upload(r, c, v).unwrap();
        let (xb, xhb) = (buf(n, d, &x), buf(n, d, &xh));
        let (index, taper) = (buf(d, win.w, &win.index), buf(d, win.w, &win.taper));
        let mut gain = cpu.zeros(taus.len() * d, win.w).unwrap();
        let mut hbar = cpu.zeros(2, m).unwrap();
        let call = LocalGains {
            observe: op,
            forecast: &xb,
            endpoint: &xhb,
            index: &index,
            taper: &taper,
            noise_std: sigma,
            taus: &taus,
        };
        cpu.local_gains(&call, &mut gain, &mut hbar).unwrap();
        let got = cpu.read(&gain).unwrap();
        // Every stage's table of the one call equals that exponent's reference gains.
        for (s, (table, want)) in got.chunks(d * win.w).zip(&want.tables).enumerate() {
            let peak = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
            assert!(peak > 0.05, "{geometry:?}: trivial gains");
            for (e, (g, r)) in table.iter().zip(want).enumerate() {
                assert!(
                    (g - r).abs() <= 1e-4 * peak + 1e-3 * r.abs(),
                    "{geometry:?} n={n} w={} stage {s}: entry {e}: {g} vs {r}",
                    win.w
                );
            }
        }
        // The one-stage call gives the same table as the shared one for its exponent.
        let mut one = cpu.zeros(d, win.w).unwrap();
        cpu.local_gains(
            &LocalGains {
                taus: &taus[1..2],
                ..call
            },
            &mut one,
            &mut hbar,
        )
        .unwrap();
        assert_eq!(cpu.read(&one).unwrap(), got[d * win.w..2 * d * win.w]);
        let hb = cpu.read(&hbar).unwrap();
        for (q, v) in hb[..m].iter().enumerate() {
            let c = op.component(q);
            let mean = (0..n)
                .map(|k| op.pointwise.value(xh[k * d + c]) as f64)
                .sum::<f64>()
                / n as f64;
            assert!((*v as f64 - mean).abs() < 1e-5, "h̄[{q}] {v} vs {mean}");
            // Row 1: the linearized innovation variance h'(x̄̂₁)²·var(x_f) + σ².
            let mf = (0..n).map(|k| x[k * d + c] as f64).sum::<f64>() / n as f64;
            let var = (0..n)
                .map(|k| (x[k * d + c] as f64 - mf).powi(2))
                .sum::<f64>()
                / (n - 1) as f64;
            let dh = op.pointwise.derivative(lin[c] as f32) as f64;
            let want_var = dh * dh * var + (sigma as f64).powi(2);
            let got_var = hb[m + q] as f64;
            assert!(
                (got_var - want_var).abs() < 1e-5 * (1.0 + want_var),
                "innovation variance [{q}] {got_var} vs {want_var}"
            );
        }
        // Bad scalars and shapes are typed errors naming what is wrong.
        for (bad, key) in [(vec![-1.0, 1.0, 1.0], "τ"), (vec![1.0, f32::NAN, 1.0], "τ")] {
            let e = cpu
                .local_gains(&LocalGains { taus: &bad, ..call }, &mut gain, &mut hbar)
                .unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = cpu
            .local_gains(
                &LocalGains {
                    taus: &taus[..1],
                    ..call
                },
                &mut gain,
                &mut hbar,
            )
            .unwrap_err();
        assert!(e.to_string().contains("banded gain"), "{e}");
        let e = cpu
            .local_gains(
                &LocalGains {
                    noise_std: 0.0,
                    ..call
                },
                &mut gain,
                &mut hbar,
            )
            .unwrap_err();
        assert!(e.to_string().contains("observe.noise_std"), "{e}");
        let mut short = cpu.zeros(1, m + 1).unwrap();
        let e = cpu.local_gains(&call, &mut gain, &mut short).unwrap_err();
        assert!(e.to_string().contains("mean observed endpoint"), "{e}");
    }
}

// ---- On the GPU, against the CPU ----
// GPU/CPU parity of the covariance-guidance kernels (the banded-gain step of
// `shaders/gain_guidance.wgsl`, the local gains of `shaders/gain_local.wgsl` against their
// CPU twin and the f64 host reference) and of whole covariance-guided EnFF analyses, on random
// inputs with odd sizes.
/// Random `rows × cols` values, `scale`·N(0, 1) (drawn on the CPU backend).
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
    let v = b.upload(n, d, vel).unwrap();
    let e = b.upload(n, d, endpoint).unwrap();
    let yb = b.upload(1, m, y).unwrap();
    let gain = b.upload(d, w, &gain_index[..d * w]).unwrap();
    // The same gains as table 1 of two (table 0 holds other values): the step applies the
    // table it is given.
    let two: Vec<f32> = gain_index[..d * w]
        .iter()
        .map(|g| -3.0 * g + 0.5)
        .chain(gain_index[..d * w].iter().copied())
        .collect();
    let two = b.upload(2 * d, w, &two).unwrap();
    let index = b.upload(d, w, &gain_index[d * w..]).unwrap();
    let hb = b.upload(1, m, hbar).unwrap();
    let mut out = Vec::new();
    // (A backend whose kernel arguments hold one table only takes the first.)
    let fits_two = b.max_binding_bytes() >= (2 * d * w * 4) as u64;
    let cases = [(&gain, 0), (&two, 1)];
    for (gain, table) in &cases[..if fits_two { 2 } else { 1 }] {
        let (gain, table) = (*gain, *table);
        let mut st = b.upload(n, d, state).unwrap();
        b.gain_step(
            &mut st,
            &GainStep {
                observe: op,
                y: &yb,
                gain,
                table,
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
        out.push(b.read(&st).unwrap());
    }
    if fits_two {
        assert_eq!(out[0], out[1], "table 1 of two tables = the one table");
    }
    out.pop().unwrap()
}

/// Random inputs of one banded gain step (seeded by `s`): `[state, velocity, endpoint, y,
/// gains then indices, h̄]`, the `d × w` gains with some zero (padding) entries and valid random
/// observation indices below `m`.
fn gain_step_data(n: usize, d: usize, m: usize, w: usize, s: u64) -> [Vec<f32>; 6] {
    let mut gi = normals(d, w, s + 5, 0.3);
    for (e, v) in gi.iter_mut().enumerate() {
        if e % 7 == 3 {
            *v = 0.0;
        }
    }
    gi.extend((0..d * w).map(|e| ((e * 7919 + 13) % m) as f32));
    [
        normals(n, d, s + 1, 1.0),
        normals(n, d, s + 2, 1.0),
        normals(n, d, s + 3, 2.0),
        normals(1, m, s + 4, 1.0),
        gi,
        normals(1, m, s + 6, 0.5),
    ]
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
        let data = gain_step_data(n, d, m, w, s);
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

/// The CPU's banded gain step against the sum written out directly (f64), for member counts
/// that fill one, several and more than four vectors of the step's member blocks (9, 20, 37),
/// with the innovation split, the bound and zero (padding) gains.
fn cpu_gain_step_equals_the_direct_sum() {
    let cpu = Cpu::new();
    let (d, every, offset, w) = (61usize, 2usize, 1usize, 11usize);
    let op = Observe::full(Pointwise::Arctan)
        .subsample(every, offset)
        .unwrap();
    let m = (d - offset).div_ceil(every);
    for (case, n) in [9usize, 20, 37].into_iter().enumerate() {
        let s = 1000 + 10 * case as u64;
        let data = gain_step_data(n, d, m, w, s);
        let mut stats = normals(1, m, s + 7, 1.0);
        stats.extend(normals(1, m, s + 8, 0.3).iter().map(|v| v * v + 0.05));
        let (hv, hg, a, scale) = (0.3f32, 0.9f32, 0.5f32, 1.5f32);
        let got = gain_step(
            &cpu,
            n,
            d,
            op,
            &data,
            w,
            (hv, hg, Some(a)),
            Some((&stats[..], scale)),
        );
        let [state, vel, endpoint, y, gi, hbar] = &data;
        let (gain, index) = gi.split_at(d * w);
        let innovation = |k: usize, q: usize| -> f64 {
            let h = (endpoint[k * d + op.component(q)] as f64).atan();
            let r = (y[q] as f64 - hbar[q] as f64) - a as f64 * (h - hbar[q] as f64);
            let bound = scale as f64 * (stats[m + q] as f64).sqrt();
            r.clamp(-bound, bound)
        };
        let mut want = vec![0.0f32; n * d];
        for k in 0..n {
            for i in 0..d {
                let kr: f64 = (0..w)
                    .map(|e| gain[i * w + e] as f64 * innovation(k, index[i * w + e] as usize))
                    .sum();
                let e = k * d + i;
                want[e] = (state[e] as f64 + hv as f64 * vel[e] as f64 + hg as f64 * kr) as f32;
            }
        }
        assert_close(&got, &want, 1e-5, 1e-5, &format!("CPU gain step, n = {n}"));
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
        loc_radius: Some(2.5),
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
    /// The exponents of the stages computed in one call.
    taus: Vec<f32>,
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
            taus: vec![0.75, 0.25, 2.0],
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
        let mut gain = b.zeros(self.taus.len() * self.d, win.w).unwrap();
        // Both rows of the stage's observation statistics: h̄ and the innovation variances.
        let mut hbar = b.zeros(2, m).unwrap();
        let inputs = LocalGains {
            observe: self.op,
            forecast: &x,
            endpoint: &xh,
            index: &index,
            taper: &taper,
            noise_std: self.sigma,
            taus: &self.taus,
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
            &self.taus.iter().map(|&t| t as f64).collect::<Vec<_>>(),
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
        (g.tables.concat(), hbar)
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
        // More stages than one GPU dispatch takes (32): the tables come from two dispatches.
        (
            "ring arctan, 35 stages",
            GainCase {
                taus: (1..=35).map(|s| s as f32 / 35.0).collect(),
                ..GainCase::new(8, Observe::arctan(), Geometry::Ring { len: 23 }, 1.5, 81)
            },
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
    cpu: [an_overflowing_gain_names_its_stage_and_component, global_gain_gives_the_etkf_mean::cpu, unguided_weights_keep_members_on_their_own_paths::cpu, shared_stage_gains_equal_the_per_stage_gains_for_linear_h::cpu, a_window_without_observations_gets_a_zero_gain::cpu, one_analysis_reproduces_the_kalman_mean_as_n_grows, the_constant_schedule_under_corrects_strong_observations, bad_input_is_a_typed_error_naming_the_parameter, cold_start_arctan_lorenz96_runs_80_cycles_and_converges, sakov2008_covariance_guidance_matches_the_etkf, half_observed_cold_start_converges_with_the_safeguards, the_innovation_bound_limits_a_stage_step, adaptive_inflation_inflates_an_under_dispersed_forecast_only, backend_local_gains_match_the_f64_reference, banded_gains_are_localized, cpu_gain_step_equals_the_direct_sum],
    gpu: [shared_gains_in_groups_equal_one_group, global_gain_gives_the_etkf_mean::gpu, unguided_weights_keep_members_on_their_own_paths::gpu, shared_stage_gains_equal_the_per_stage_gains_for_linear_h::gpu, a_window_without_observations_gets_a_zero_gain::gpu, banded_gain_step_agrees_with_the_cpu, observed_moments_agree_with_the_cpu, covariance_guided_analysis_agrees_with_the_cpu, local_gains_agree_with_the_cpu_twin_and_the_f64_reference, wide_windows_and_split_ensembles_are_unsupported_kernels_with_a_host_path],
);
