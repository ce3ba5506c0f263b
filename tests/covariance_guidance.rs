//! Covariance (Kalman-gain) guidance for EnFF: the linear-Gaussian Kalman limit, bad input,
//! the cold start, and short twin runs.

use enff::backend::cpu::Cpu;
use enff::backend::{Backend, LocalGains};
use enff::experiment::{preset, Experiment};
use enff::filter::{Enff, EnffConfig, Etkf, Filter, Observation};
use enff::flow::GuidanceKind;
use enff::model::Geometry;
use enff::observe::{ObservationOperator, Observe};
use enff::rng::{NoiseKey, Stream};

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
        loc_radius: 1e4,
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
#[test]
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

/// The plain constant-gain form with innovation feedback under-corrects: it stays further from
/// the Kalman mean than the tempered stages (why they are the default).
#[test]
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
            loc_radius: 1e4,
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
    let tempered = rms(&run(enff::flow::GainSchedule::Homotopy), &etkf_sharp);
    let constant = rms(&run(enff::flow::GainSchedule::Constant), &etkf_sharp);
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

#[test]
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
        (vec![cov, "filter.integrator=heun"], "filter.integrator"),
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
    // A model without geometry (Lorenz-63) is refused, naming the option.
    let msg = config_error("lorenz63_spantini2022", &[cov]);
    assert!(msg.contains("filter.guidance"), "{msg}");
    // A filter built without a geometry says so instead of guessing.
    let cpu = Cpu::new();
    let cfg = EnffConfig {
        guidance: GuidanceKind::Covariance,
        ..EnffConfig::f2p(0.1, 1.0, 4)
    };
    let mut f = Enff::<Cpu>::new(cfg).unwrap();
    let x = cpu.upload(3, 8, &[0.5; 24]).unwrap();
    let mut ens = cpu.upload(3, 8, &[0.25; 24]).unwrap();
    let y = cpu.upload(1, 8, &[0.0; 8]).unwrap();
    let op = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &op,
        noise_std: 1.0,
    };
    let e = f.analyse(&cpu, &mut ens, Some(&x), &obs, 0).unwrap_err();
    assert!(e.to_string().contains("filter.guidance"), "{e}");
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
#[test]
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
#[test]
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
#[test]
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
/// compute `h'² v + σ²` itself is checked against the f64 reference in `tests/gpu_guidance.rs`
/// and below.)
#[test]
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
#[test]
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
#[test]
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
            &[tau as f64],
            Some(&lin),
        )
        .unwrap();
        let win = enff::filter::covariance::gain_windows(&op, d, geometry, radius).unwrap();
        assert_eq!((win.w, &win.index), (want.w, &want.index));
        let m = op.obs_dim(d).unwrap();
        let buf = |r, c, v: &[f32]| cpu.upload(r, c, v).unwrap();
        let (xb, xhb) = (buf(n, d, &x), buf(n, d, &xh));
        let (index, taper) = (buf(d, win.w, &win.index), buf(d, win.w, &win.taper));
        let mut gain = cpu.zeros(d, win.w).unwrap();
        let mut hbar = cpu.zeros(2, m).unwrap();
        let call = LocalGains {
            observe: op,
            forecast: &xb,
            endpoint: &xhb,
            index: &index,
            taper: &taper,
            noise_std: sigma,
            tau,
        };
        cpu.local_gains(&call, &mut gain, &mut hbar).unwrap();
        let got = cpu.read(&gain).unwrap();
        let peak = want.tables[0].iter().fold(0.0f32, |a, b| a.max(b.abs()));
        assert!(peak > 0.05, "{geometry:?}: trivial gains");
        for (e, (g, r)) in got.iter().zip(&want.tables[0]).enumerate() {
            assert!(
                (g - r).abs() <= 1e-4 * peak + 1e-3 * r.abs(),
                "{geometry:?} n={n} w={}: entry {e}: {g} vs {r}",
                win.w
            );
        }
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
        for (bad, key) in [(-1.0, "τ"), (f32::NAN, "τ")] {
            let e = cpu
                .local_gains(&LocalGains { tau: bad, ..call }, &mut gain, &mut hbar)
                .unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
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
