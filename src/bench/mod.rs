//! Timing of one EnFF analysis on a backend, for the `enff bench` command, the criterion
//! benches and `BENCHMARKS.md`.
//!
//! [`bench_analysis`] builds a random problem (forecast, previous analysis, an arctan
//! observation of a perturbed member) from [`crate::rng`], runs warm-up analyses, then times
//! `reps` EnFF analyses with [`std::time::Instant`]. Every analysis includes everything the
//! filter does in a cycle: drawing the source noise, the `flow_steps` flow steps (pairwise
//! distances, softmax, fused velocity + guidance + Euler update) and the final copy.
//!
//! The counted work per flow step (ENFF_SPEC §2.2, §12) is `3·n²·d` flops for the pairwise
//! distances from differences (subtract, multiply, add) plus `2·n²·d` for the weighted
//! combination of the velocity targets; the minimum memory traffic per step is one read of the
//! state, the forecast and the previous analysis and one write of the state (`16·n·d` bytes).

use std::time::Instant;

use crate::backend::{Backend, DeviceBuffer};
use crate::error::{Error, Result};
use crate::filter::{Enff, EnffConfig, Filter, Observation};
use crate::flow::PathKind;
use crate::observe::Observe;
use crate::rng::{self, NoiseKey, Stream};

pub mod cycles;
pub mod models;

/// The benchmark grid of `BENCHMARKS.md`: `(n, d)` pairs timed by default.
pub const DEFAULT_GRID: [(usize, usize); 3] = [(20, 10_000), (20, 100_000), (100, 10_000)];

/// A small grid that runs in well under a second, for smoke tests and CI.
pub const QUICK_GRID: [(usize, usize); 2] = [(20, 1_000), (20, 10_000)];

/// Flow steps of the benchmarked analysis (the paper's `K = 10` grid points).
pub const DEFAULT_FLOW_STEPS: usize = 9;

/// `σ_min` of the benchmarked EnFF-F2P analysis.
pub const BENCH_SIGMA_MIN: f32 = 0.01;

/// Guidance scale `λ` of the benchmarked analysis.
pub const BENCH_GUIDANCE_SCALE: f32 = 0.05;

/// Observation noise std `σ_y` of the benchmarked analysis.
pub const BENCH_OBS_NOISE_STD: f32 = 0.1;

/// Timing of one EnFF analysis configuration on one backend.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnalysisBench {
    /// Backend name (`cpu`, `gpu`).
    pub backend: String,
    /// Ensemble size.
    pub n: usize,
    /// State dimension.
    pub d: usize,
    /// Flow steps (velocity evaluations) per analysis.
    pub flow_steps: usize,
    /// Probability path of the analysis.
    pub path: PathKind,
    /// Number of timed analyses.
    pub reps: usize,
    /// Median wall-clock seconds of one analysis over the timed reps.
    pub seconds_per_analysis: f64,
    /// Fastest timed analysis, in seconds.
    pub seconds_best: f64,
    /// `seconds_per_analysis / flow_steps` (includes the per-analysis overheads).
    pub seconds_per_flow_step: f64,
    /// Counted flops of one analysis: `flow_steps · 5·n²·d`.
    pub flops_per_analysis: f64,
    /// Counted flops divided by the median time, in GFLOP/s.
    pub gflops: f64,
    /// Minimum bytes one analysis must move: `flow_steps · 16·n·d` plus the source draw and
    /// the final copy (`16·n·d`).
    pub bytes_min: f64,
}

impl AnalysisBench {
    /// Minimum bytes divided by the median time, in GB/s.
    pub fn effective_gbps(&self) -> f64 {
        self.bytes_min / self.seconds_per_analysis / 1e9
    }
}

/// Counted flops of one analysis (see the module docs).
pub fn flops_per_analysis(n: usize, d: usize, flow_steps: usize) -> f64 {
    let (n, d) = (n as f64, d as f64);
    flow_steps as f64 * 5.0 * n * n * d
}

/// Minimum bytes moved by one analysis (see the module docs).
pub fn bytes_min_per_analysis(n: usize, d: usize, flow_steps: usize) -> f64 {
    let nd4 = 4.0 * n as f64 * d as f64;
    (4.0 * flow_steps as f64 + 4.0) * nd4
}

/// A random EnFF-F2P problem on a backend: previous analysis, forecast and observation.
pub struct BenchProblem<B: Backend> {
    /// Previous analysis ensemble (`n × d`).
    pub previous: B::Buffer,
    /// Forecast ensemble (`n × d`), kept unchanged.
    pub forecast: B::Buffer,
    /// The ensemble the analysis overwrites (a copy of the forecast before every analysis).
    pub ensemble: B::Buffer,
    /// Observation `y = arctan(x_true) + σ_y η` of every component (`1 × d`).
    pub y: B::Buffer,
    /// The observation operator (arctan of every component).
    pub operator: Observe,
}

impl<B: Backend> BenchProblem<B> {
    /// Builds the problem from the counter-based generator (seed 2024, [`Stream::User`]).
    ///
    /// Previous analysis `~ N(0, 1)`, forecast = previous + `0.3·N(0, 1)`, truth = forecast
    /// member 0 + `0.2·N(0, 1)`, `y = arctan(truth) + 0.1·N(0, 1)`.
    pub fn new(backend: &B, n: usize, d: usize) -> Result<Self> {
        if n < 2 || d == 0 {
            return Err(Error::invalid(
                "bench size",
                format!("n = {n}, d = {d}"),
                "a benchmark needs at least 2 members and 1 component",
            ));
        }
        let key = |cycle| NoiseKey::new(2024, Stream::User, cycle);
        let mut prev = vec![0.0f32; n * d];
        let mut fc = vec![0.0f32; n * d];
        for (i, (p, f)) in prev.chunks_mut(d).zip(fc.chunks_mut(d)).enumerate() {
            rng::fill_normal_row(&key(0), i as u32, p);
            rng::fill_normal_row(&key(1), i as u32, f);
            for (fv, pv) in f.iter_mut().zip(p.iter()) {
                *fv = pv + 0.3 * *fv;
            }
        }
        let mut truth = vec![0.0f32; d];
        rng::fill_normal_row(&key(2), 0, &mut truth);
        let mut eta = vec![0.0f32; d];
        rng::fill_normal_row(&key(3), 0, &mut eta);
        let y: Vec<f32> = truth
            .iter()
            .zip(&fc[..d])
            .zip(&eta)
            .map(|((t, f), e)| (f + 0.2 * t).atan() + BENCH_OBS_NOISE_STD * e)
            .collect();
        Ok(BenchProblem {
            previous: backend.upload(n, d, &prev)?,
            forecast: backend.upload(n, d, &fc)?,
            ensemble: backend.upload(n, d, &fc)?,
            y: backend.upload(1, d, &y)?,
            operator: Observe::arctan(),
        })
    }
}

/// The EnFF configuration the benchmark times (σ_min = 0.01, λ = 0.05, Euler, local guidance).
pub fn bench_config(path: PathKind, flow_steps: usize) -> EnffConfig {
    match path {
        PathKind::F2p => EnffConfig::f2p(BENCH_SIGMA_MIN, BENCH_GUIDANCE_SCALE, flow_steps),
        PathKind::Ot => EnffConfig::ot(BENCH_SIGMA_MIN, BENCH_GUIDANCE_SCALE, flow_steps),
    }
}

/// One analysis of `problem`: resets the ensemble to the forecast (untimed), then runs
/// `filter` and returns the seconds the analysis took.
fn one_analysis<B: Backend>(
    backend: &B,
    filter: &mut Enff<B>,
    problem: &mut BenchProblem<B>,
    cycle: u32,
) -> Result<f64> {
    backend.copy(&problem.forecast, &mut problem.ensemble)?;
    let previous = filter
        .needs_previous_analysis()
        .then_some(&problem.previous);
    let obs = Observation {
        y: &problem.y,
        operator: &problem.operator,
        noise_std: BENCH_OBS_NOISE_STD,
    };
    let start = Instant::now();
    filter.analyse(backend, &mut problem.ensemble, previous, &obs, cycle)?;
    // Wait for queued work (a no-op on the synchronous CPU backend).
    backend.sync()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Times `reps` EnFF analyses (σ_min = 0.01, λ = 0.05, arctan observation) of a random
/// `n × d` problem after `warmup` untimed ones.
pub fn bench_analysis<B: Backend>(
    backend: &B,
    n: usize,
    d: usize,
    flow_steps: usize,
    path: PathKind,
    reps: usize,
    warmup: usize,
) -> Result<AnalysisBench> {
    if reps == 0 {
        return Err(Error::invalid(
            "bench reps",
            reps,
            "time at least one analysis (reps >= 1)",
        ));
    }
    let mut problem = BenchProblem::new(backend, n, d)?;
    let mut filter = Enff::<B>::new(bench_config(path, flow_steps))?;
    for w in 0..warmup {
        one_analysis(backend, &mut filter, &mut problem, w as u32 + 1)?;
    }
    let mut times = Vec::with_capacity(reps);
    for r in 0..reps {
        times.push(one_analysis(
            backend,
            &mut filter,
            &mut problem,
            (warmup + r) as u32 + 1,
        )?);
    }
    backend.check_finite(&problem.ensemble, "benchmark analysis")?;
    times.sort_by(f64::total_cmp);
    let median = if reps % 2 == 1 {
        times[reps / 2]
    } else {
        0.5 * (times[reps / 2 - 1] + times[reps / 2])
    };
    let flops = flops_per_analysis(n, d, flow_steps);
    Ok(AnalysisBench {
        backend: backend.name().to_string(),
        n: problem.ensemble.rows(),
        d: problem.ensemble.cols(),
        flow_steps,
        path,
        reps,
        seconds_per_analysis: median,
        seconds_best: times[0],
        seconds_per_flow_step: median / flow_steps.max(1) as f64,
        flops_per_analysis: flops,
        gflops: flops / median / 1e9,
        bytes_min: bytes_min_per_analysis(n, d, flow_steps),
    })
}

/// A one-screen table of benchmark rows (times in ms, counted GFLOP/s and minimum-traffic GB/s).
pub fn format_table(rows: &[AnalysisBench]) -> String {
    let mut s = format!(
        "{:<7} {:<5} {:>5} {:>9} {:>5} {:>5} {:>12} {:>10} {:>10} {:>9} {:>9} {:>8}\n",
        "backend",
        "path",
        "n",
        "d",
        "steps",
        "reps",
        "ms/analysis",
        "best ms",
        "ms/step",
        "GFLOP/s",
        "min MB",
        "GB/s"
    );
    for r in rows {
        let path = match r.path {
            PathKind::F2p => "f2p",
            PathKind::Ot => "ot",
        };
        s.push_str(&format!(
            "{:<7} {:<5} {:>5} {:>9} {:>5} {:>5} {:>12.3} {:>10.3} {:>10.4} {:>9.1} {:>9.1} {:>8.1}\n",
            r.backend,
            path,
            r.n,
            r.d,
            r.flow_steps,
            r.reps,
            r.seconds_per_analysis * 1e3,
            r.seconds_best * 1e3,
            r.seconds_per_flow_step * 1e3,
            r.gflops,
            r.bytes_min / 1e6,
            r.effective_gbps(),
        ));
    }
    s
}

/// The baseline-filter grid of `BENCHMARKS.md`: Lorenz-96 sizes `d ∈ {1e3, 1e4, 1e5}`, n = 20.
pub const FILTER_GRID: [(usize, usize); 3] = [(20, 1_000), (20, 10_000), (20, 100_000)];

/// Filters [`bench_filter`] can time: the baselines, plain EnFF-F2P (`enff`, the
/// `lorenz96_bao2024` settings: σ_min = 0.01, λ = 0.05, 19 flow steps) and EnFF-F2P with
/// covariance guidance in 1, 2 or 4 stages (`enff-cov1`, `-cov2`, `-cov4`: radius 4, λ = 2 and
/// fixed inflation 1.05, the settings `lorenz96_bao2024_covariance` had when these rows were
/// first measured, kept so that the figures stay comparable; today's preset uses λ = 1 with the
/// innovation bound and adaptive inflation, a little dearer: BENCHMARKS.md times it in the twin
/// run), the stages'
/// gains built together from one linearization, or recomputed at every stage
/// (`enff-cov2-relin`, `enff-cov4-relin`, `filter.relinearize = true`).
pub const BENCH_FILTERS: [&str; 10] = [
    "letkf",
    "letkf-batched",
    "enkf",
    "etkf",
    "enff",
    "enff-cov1",
    "enff-cov2",
    "enff-cov4",
    "enff-cov2-relin",
    "enff-cov4-relin",
];

/// The EnFF configurations of [`bench_filter`] (`enff`, `enff-covS`), if `filter` is one.
fn bench_enff_config(filter: &str) -> Option<EnffConfig> {
    let plain = EnffConfig::f2p(1e-2, 0.05, 19);
    let (stages, relinearize) = match filter {
        "enff" => return Some(plain),
        "enff-cov1" => (1, false),
        "enff-cov2" => (2, false),
        "enff-cov4" => (4, false),
        "enff-cov2-relin" => (2, true),
        "enff-cov4-relin" => (4, true),
        _ => return None,
    };
    Some(EnffConfig {
        guidance: crate::flow::GuidanceKind::Covariance,
        guidance_scale: 2.0,
        loc_radius: Some(BENCH_LOC_RADIUS),
        gain_stages: stages,
        relinearize,
        inflation: 1.05,
        ..plain
    })
}

/// LETKF radius of the benchmarked analysis (the sakov2008 setting).
pub const BENCH_LOC_RADIUS: f64 = 4.0;

/// Timing of one baseline-filter analysis on one backend.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FilterBench {
    /// Filter (`letkf`: as the backend prefers it, the f64 host reference on the CPU and the
    /// batched kernel on the GPU; `letkf-batched`: the batched analysis, on the CPU its twin;
    /// `enkf`: the global EnKF-PO; `etkf`).
    pub filter: String,
    /// Backend name.
    pub backend: String,
    /// Ensemble size.
    pub n: usize,
    /// State dimension (a Lorenz-96 ring).
    pub d: usize,
    /// Number of timed analyses.
    pub reps: usize,
    /// Median seconds of one analysis.
    pub seconds_per_analysis: f64,
    /// Fastest analysis, in seconds.
    pub seconds_best: f64,
}

/// Times `reps` analyses of a filter of [`BENCH_FILTERS`] (after `warmup` untimed ones) on the
/// random `n × d` problem of [`BenchProblem`] (arctan observation of every component,
/// σ_y = 0.1), localizing on the Lorenz-96 ring of `d` components with radius
/// [`BENCH_LOC_RADIUS`]; EnFF-F2P flows from the problem's previous analysis.
pub fn bench_filter<B: Backend + 'static>(
    backend: &B,
    filter: &str,
    n: usize,
    d: usize,
    reps: usize,
    warmup: usize,
) -> Result<FilterBench> {
    use crate::filter::{EnkfPo, Etkf, Letkf};
    use crate::model::{DistanceKind, Geometry};
    if reps == 0 {
        return Err(Error::invalid(
            "bench reps",
            reps,
            "time at least one analysis (reps >= 1)",
        ));
    }
    let ring = Geometry::Ring { len: d };
    let mut f: Box<dyn Filter<B>> = match filter {
        "letkf" | "letkf-batched" => Box::new(
            Letkf::<B>::new(BENCH_LOC_RADIUS, 1.0)?
                .with_geometry(ring, DistanceKind::Geometry)
                .with_batched(filter == "letkf-batched"),
        ),
        "enkf" => Box::new(EnkfPo::<B>::new(1.0, 7)?),
        "etkf" => Box::new(Etkf::<B>::new(1.0)?),
        other if bench_enff_config(other).is_some() => Box::new(
            Enff::<B>::new(bench_enff_config(other).expect("checked"))?.with_geometry(ring),
        ),
        other => {
            return Err(Error::UnknownFilter {
                name: other.to_string(),
                known: BENCH_FILTERS.join(", "),
            })
        }
    };
    let mut problem = BenchProblem::new(backend, n, d)?;
    let mut times = Vec::with_capacity(reps);
    for r in 0..warmup + reps {
        backend.copy(&problem.forecast, &mut problem.ensemble)?;
        backend.sync()?;
        let obs = Observation {
            y: &problem.y,
            operator: &problem.operator,
            noise_std: BENCH_OBS_NOISE_STD,
        };
        let start = Instant::now();
        let previous = f.needs_previous_analysis().then_some(&problem.previous);
        f.analyse(backend, &mut problem.ensemble, previous, &obs, r as u32 + 1)?;
        backend.sync()?;
        if r >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = if reps % 2 == 1 {
        times[reps / 2]
    } else {
        0.5 * (times[reps / 2 - 1] + times[reps / 2])
    };
    Ok(FilterBench {
        filter: filter.to_string(),
        backend: backend.name().to_string(),
        n,
        d,
        reps,
        seconds_per_analysis: median,
        seconds_best: times[0],
    })
}

/// A table of filter timings (milliseconds per analysis), with the ratio to plain EnFF (`enff`)
/// on the same backend and size where the table has that row.
pub fn format_filter_table(rows: &[FilterBench]) -> String {
    let mut s = format!(
        "{:<13} {:<7} {:>5} {:>9} {:>5} {:>12} {:>10} {:>8}\n",
        "filter", "backend", "n", "d", "reps", "ms/analysis", "best ms", "x enff"
    );
    for r in rows {
        let plain = rows
            .iter()
            .find(|p| p.filter == "enff" && p.backend == r.backend && p.n == r.n && p.d == r.d)
            .map_or(String::from("-"), |p| {
                format!("{:.2}", r.seconds_per_analysis / p.seconds_per_analysis)
            });
        s.push_str(&format!(
            "{:<13} {:<7} {:>5} {:>9} {:>5} {:>12.3} {:>10.3} {:>8}\n",
            r.filter,
            r.backend,
            r.n,
            r.d,
            r.reps,
            r.seconds_per_analysis * 1e3,
            r.seconds_best * 1e3,
            plain
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn counted_work_matches_the_formulas() {
        // 9 steps x 5 x 20² x 10⁴ = 1.8e8 flops; (4·9 + 4) x 4 x 20 x 10⁴ = 3.2e7 bytes.
        assert_eq!(flops_per_analysis(20, 10_000, 9), 1.8e8);
        assert_eq!(bytes_min_per_analysis(20, 10_000, 9), 3.2e7);
    }

    #[test]
    fn bench_analysis_reports_consistent_rates() {
        let cpu = Cpu::new();
        let r = bench_analysis(&cpu, 4, 37, 3, PathKind::F2p, 3, 1).unwrap();
        assert_eq!((r.n, r.d, r.flow_steps, r.reps), (4, 37, 3, 3));
        assert!(r.seconds_best > 0.0 && r.seconds_best <= r.seconds_per_analysis);
        let rate = r.flops_per_analysis / r.seconds_per_analysis / 1e9;
        assert!((r.gflops - rate).abs() <= 1e-9 * rate);
        let table = format_table(&[r]);
        assert_eq!(table.lines().count(), 2);
        assert!(table.contains("cpu") && table.contains("f2p"));
    }

    #[test]
    fn filter_bench_times_every_baseline() {
        let cpu = Cpu::new();
        let rows: Vec<FilterBench> = BENCH_FILTERS
            .iter()
            .map(|f| bench_filter(&cpu, f, 5, 41, 1, 0).unwrap())
            .collect();
        for r in &rows {
            assert!(r.seconds_per_analysis > 0.0 && r.d == 41 && r.n == 5);
        }
        assert_eq!(
            format_filter_table(&rows).lines().count(),
            1 + BENCH_FILTERS.len()
        );
        assert!(bench_filter(&cpu, "kf", 5, 41, 1, 0).is_err());
    }

    #[test]
    fn bench_rejects_zero_reps_and_tiny_ensembles() {
        let cpu = Cpu::new();
        assert!(bench_analysis(&cpu, 4, 8, 3, PathKind::F2p, 0, 0).is_err());
        assert!(bench_analysis(&cpu, 1, 8, 3, PathKind::F2p, 1, 0).is_err());
    }
}
