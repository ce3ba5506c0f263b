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
/// measures 0.051-0.054 over seeds at d = 100 and d = 1000 (plain EnFF-F2P: 0.16-0.17).
#[test]
fn cold_start_arctan_lorenz96_runs_80_cycles_and_converges() {
    let s = run("lorenz96_bao2024_covariance", &["model.d=100"], 5);
    assert_eq!(s.cycles, 80);
    assert!(s.rmse_mean < 0.08, "time-mean RMSE {}", s.rmse_mean);
    assert!(s.rmse_last < 0.1, "last-cycle RMSE {}", s.rmse_last);
    assert!(s.spread_mean > 0.02, "spread {} collapsed", s.spread_mean);
}

/// Canonical Lorenz-96 (d = 40, identity observations, n = 40): covariance guidance at λ = 1
/// reaches the ETKF's level, where the paper's local guidance stalls near 0.42. Over 300 cycles
/// enff measures 0.174-0.188 (ETKF 0.155-0.157) over three seeds.
#[test]
fn sakov2008_covariance_guidance_is_near_the_etkf() {
    let s = run(
        "lorenz96_sakov2008",
        &[
            "filter.guidance=covariance",
            "filter.guidance_scale=1",
            "filter.sigma_min=0.01",
            "experiment.cycles=300",
        ],
        3,
    );
    assert!(
        (0.15..0.23).contains(&s.rmse_mean),
        "time-mean RMSE {}",
        s.rmse_mean
    );
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
        let mut hbar = cpu.zeros(1, m).unwrap();
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
        for (q, v) in hb.iter().enumerate() {
            let c = op.component(q);
            let mean = (0..n)
                .map(|k| op.pointwise.value(xh[k * d + c]) as f64)
                .sum::<f64>()
                / n as f64;
            assert!((*v as f64 - mean).abs() < 1e-5, "h̄[{q}] {v} vs {mean}");
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
