//! Sharded runs over MPI ranks (`--features mpi`): the built binary under `mpirun -n N`,
//! compared with the single-process run, and bad input as a clear error on every rank without
//! a hang. Every launch runs under `timeout 120`, so a hang fails the test instead of the CI.

#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output};

/// The small Lorenz-96 experiment of these tests: d = 41 (not divisible by 2, 3 or 4), n = 8,
/// arctan of every component, a short spin-up.
const SMALL: [&str; 12] = [
    "--set",
    "model.d=41",
    "--set",
    "ensemble.n=8",
    "--set",
    "experiment.spinup=200",
    "--set",
    "experiment.burn_in=0",
    "--set",
    "filter.flow_steps=9",
    "--backend",
    "cpu",
];

/// `timeout 120 mpirun -n N enff ARGS…` (oversubscribed: this machine may have fewer cores).
fn mpirun(n: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("timeout")
        .args([
            "120",
            "mpirun",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-n",
        ])
        .arg(n.to_string())
        .arg(env!("CARGO_BIN_EXE_enff"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_LOG", "warn")
        .env_remove("ENFF_REQUIRE_GPU")
        .envs(env.iter().copied())
        .output()
        .expect("mpirun runs (install openmpi-bin)")
}

/// The same binary in one process, without MPI.
fn single(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_enff"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ENFF_REQUIRE_GPU")
        .output()
        .expect("the enff binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_args<'a>(out: &'a str, cycles: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        "lorenz96_bao2024",
        "--out",
        out,
        "--no-plots",
        "--set",
        cycles,
    ];
    v.extend_from_slice(&SMALL);
    v.extend_from_slice(extra);
    v
}

/// The rows of metrics.csv as maps column → value.
fn metrics(dir: &Path) -> Vec<std::collections::HashMap<String, f64>> {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv written");
    let mut lines = csv.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(|v| v.parse::<f64>().unwrap_or(f64::NAN)))
                .collect()
        })
        .collect()
}

fn npy(path: &Path) -> Vec<f32> {
    enff::io::npy::read_npy(path)
        .expect("snapshot readable")
        .data
}

#[test]
fn one_analysis_over_3_ranks_matches_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("one"), dir.path().join("three"));
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    // Two cycles: the second analysis follows a forecast with halo exchanges.
    let extra = ["--save-ensembles", "1"];
    let o = single(&run_args(a_s, "experiment.cycles=2", &extra));
    assert!(o.status.success(), "{}", text(&o));
    let o = mpirun(3, &run_args(b_s, "experiment.cycles=2", &extra), &[]);
    assert!(o.status.success(), "{}", text(&o));
    for cycle in ["cycle_0001.npy", "cycle_0002.npy"] {
        let x = snapshots_agree(&a, &b, cycle, 1e-5, "3 ranks");
        assert_eq!(x.len(), 8 * 41);
    }
}

/// The `--save-ensembles` snapshot `cycle` of runs `a` and `b` agree to `rtol` times the
/// largest value; returns `a`'s.
fn snapshots_agree(a: &Path, b: &Path, cycle: &str, rtol: f32, what: &str) -> Vec<f32> {
    let x = npy(&a.join("ensembles").join(cycle));
    let y = npy(&b.join("ensembles").join(cycle));
    assert_eq!(x.len(), y.len(), "{what}, {cycle}");
    let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= rtol * scale,
        "{what}, {cycle}: max |Δ| {worst} vs {rtol} × {scale}"
    );
    x
}

#[test]
fn monte_carlo_guidance_with_heun_over_2_ranks_matches_the_single_process_run() {
    // The Monte-Carlo bias is a sum over observations: each rank's partial logits carry the
    // part of its own observations. Heun sums the logits twice per step.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    let extra = [
        "--save-ensembles",
        "1",
        "--set",
        "filter.guidance=monte_carlo",
        "--set",
        "filter.integrator=heun",
        "--set",
        "observe.every=2",
    ];
    let o = single(&run_args(
        a.to_str().unwrap(),
        "experiment.cycles=1",
        &extra,
    ));
    assert!(o.status.success(), "{}", text(&o));
    let o = mpirun(
        2,
        &run_args(b.to_str().unwrap(), "experiment.cycles=1", &extra),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    snapshots_agree(&a, &b, "cycle_0001.npy", 1e-5, "2 ranks, Heun");
}

#[test]
fn adaptive_inflation_is_one_factor_for_all_ranks() {
    // A cap far above the estimates, so that the factor is the estimate itself: summed over
    // the ranks' observations it equals the single-process one; per slab it would not.
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--set", "filter.adaptive_inflation=50"];
    let base = dir.path().join("one");
    let o = single(&run_args(
        base.to_str().unwrap(),
        "experiment.cycles=6",
        &extra,
    ));
    assert!(o.status.success(), "{}", text(&o));
    let want = metrics(&base);
    let out = dir.path().join("r3");
    let o = mpirun(
        3,
        &run_args(out.to_str().unwrap(), "experiment.cycles=6", &extra),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    metrics_agree(
        &want,
        &metrics(&out),
        &["spread_forecast", "rmse", "spread"],
        "3 ranks",
    );
}

/// Each rank on its own GPU backend (here every rank opens the same adapter): the sharded
/// GPU run gives the single-process GPU run's metrics. Skips loudly without an adapter, fails
/// instead under `ENFF_REQUIRE_GPU=1`.
#[test]
fn gpu_backend_per_rank_matches_the_single_process_gpu_run() {
    let dir = tempfile::tempdir().unwrap();
    // The common arguments with `--backend gpu` instead of `cpu`.
    let on_gpu = |out: &Path| -> Vec<String> {
        let args = run_args(out.to_str().unwrap(), "experiment.cycles=4", &[]);
        let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let at = v
            .iter()
            .position(|a| a == "--backend")
            .expect("SMALL names a backend");
        v[at + 1] = "gpu".into();
        v
    };
    let base = dir.path().join("one");
    let args = on_gpu(&base);
    let o = single(&args.iter().map(String::as_str).collect::<Vec<_>>());
    if !o.status.success() {
        let msg = text(&o);
        if std::env::var("ENFF_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("ENFF_REQUIRE_GPU=1 but the GPU run failed: {msg}");
        }
        eprintln!("SKIPPED gpu_backend_per_rank…: no usable GPU adapter ({msg})");
        return;
    }
    let want = metrics(&base);
    let out = dir.path().join("r2");
    let args = on_gpu(&out);
    let o = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    metrics_agree(&want, &metrics(&out), &ALL_METRICS, "2 GPU ranks");
}

/// Every cycle's RMSE and spread, forecast and analysis.
const ALL_METRICS: [&str; 4] = ["rmse_forecast", "spread_forecast", "rmse", "spread"];

/// The documented tolerance of a sharded run: 1e-4 relative on every cycle's `keys`.
fn metrics_agree(
    want: &[std::collections::HashMap<String, f64>],
    got: &[std::collections::HashMap<String, f64>],
    keys: &[&str],
    what: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: cycles");
    for (w, g) in want.iter().zip(got) {
        for &key in keys {
            let (x, y) = (w[key], g[key]);
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                "{what}, cycle {}: {key} {y} vs single process {x}",
                w["cycle"]
            );
        }
    }
}

#[test]
fn ten_cycles_over_2_and_4_ranks_give_the_single_process_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("one");
    let o = single(&run_args(
        base.to_str().unwrap(),
        "experiment.cycles=10",
        &[],
    ));
    assert!(o.status.success(), "{}", text(&o));
    let want = metrics(&base);
    assert_eq!(want.len(), 10);
    for ranks in [2usize, 4] {
        let out = dir.path().join(format!("r{ranks}"));
        let o = mpirun(
            ranks,
            &run_args(out.to_str().unwrap(), "experiment.cycles=10", &[]),
            &[],
        );
        assert!(o.status.success(), "{ranks} ranks: {}", text(&o));
        metrics_agree(
            &want,
            &metrics(&out),
            &ALL_METRICS,
            &format!("{ranks} ranks"),
        );
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("summary.json")).expect("summary.json"),
        )
        .unwrap();
        assert_eq!(summary["d"], 41);
        assert!(summary["device"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{ranks} ranks")));
    }
}

/// Covariance guidance over ranks: each slab extended by halo components. The preset's
/// stages, innovation bound and adaptive inflation, radius 2 (8 halo components), on uneven
/// slabs (d = 41 over 3 ranks) with every component observed and on d = 40 over 2 ranks with
/// every 2nd component observed: the analysis ensembles equal the single-process run's up to
/// rounding. A radius whose halo does not fit the slabs is refused on every rank.
#[test]
fn covariance_guidance_over_ranks_matches_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    for (ranks, extra) in [
        (3, ["--set", "model.d=41", "--set", "observe.every=1"]),
        (2, ["--set", "model.d=40", "--set", "observe.every=2"]),
    ] {
        let (a, b) = (
            dir.path().join(format!("one-{ranks}")),
            dir.path().join(format!("many-{ranks}")),
        );
        let args = |out: &Path| {
            let mut v: Vec<String> = [
                "run",
                "lorenz96_bao2024_covariance",
                "--out",
                out.to_str().unwrap(),
                "--no-plots",
                "--save-ensembles",
                "1",
                "--set",
                "experiment.cycles=3",
                "--set",
                "filter.loc_radius=2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(SMALL.iter().map(|s| s.to_string()));
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let a_args = args(&a);
        let o = single(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", text(&o));
        let b_args = args(&b);
        let o = mpirun(
            ranks,
            &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
        for cycle in ["cycle_0001.npy", "cycle_0002.npy", "cycle_0003.npy"] {
            snapshots_agree(&a, &b, cycle, 1e-4, &format!("{ranks} ranks"));
        }
        // The guidance moved the ensemble: the runs are not both the unguided flow.
        let m = metrics(&b);
        assert!(m.iter().all(|r| r["rmse"] < r["rmse_forecast"]), "{m:?}");
    }
    let out = dir.path().join("refused");
    let mut args = run_args(out.to_str().unwrap(), "experiment.cycles=2", &[]);
    args.extend([
        "--set",
        "filter.guidance=covariance",
        "--set",
        "filter.loc_radius=4",
    ]);
    let o = mpirun(3, &args, &[]);
    assert_fails_on_every_rank(&o, 3, "halo components");
}

/// Every rank of a job that must fail says so and the job exits non-zero, well before the
/// timeout.
fn assert_fails_on_every_rank(o: &Output, ranks: usize, needle: &str) {
    let all = text(o);
    assert!(!o.status.success(), "{all}");
    assert_ne!(o.status.code(), Some(124), "the job hung: {all}");
    let err = String::from_utf8_lossy(&o.stderr);
    for r in 0..ranks {
        assert!(
            err.contains(&format!("error (MPI rank {r} of {ranks})")),
            "rank {r} printed no error: {all}"
        );
    }
    assert!(err.contains(needle), "no `{needle}` in: {all}");
}

#[test]
fn bad_input_is_a_clear_error_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    // More ranks than Lorenz-96 can split (2 components each at least).
    let mut args = run_args(out, "experiment.cycles=2", &[]);
    args.extend(["--set", "model.d=5"]);
    let o = mpirun(3, &args, &[]);
    assert_fails_on_every_rank(&o, 3, "at least 2 components per rank");
    // A model that cannot be sharded.
    let o = mpirun(
        2,
        &[
            "run",
            "lorenz63_spantini2022",
            "--backend",
            "cpu",
            "--out",
            out,
            "--set",
            "experiment.cycles=2",
            "--set",
            "experiment.burn_in=0",
        ],
        &[],
    );
    assert_fails_on_every_rank(&o, 2, "cannot be sharded");
    // A filter without a sharded analysis.
    let o = mpirun(
        2,
        &run_args(out, "experiment.cycles=2", &["--filter", "etkf"]),
        &[],
    );
    assert_fails_on_every_rank(&o, 2, "has no sharded analysis");
    // Ranks started with different configurations (MPMD launch: two programs).
    let bin = env!("CARGO_BIN_EXE_enff");
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "mpirun", "--oversubscribe", "--bind-to", "none"]);
    for d in ["model.d=41", "model.d=40"] {
        cmd.args(["-n", "1", bin]);
        cmd.args(run_args(
            out,
            "experiment.cycles=2",
            &["--force", "--set", d],
        ));
        cmd.arg(":");
    }
    let o = cmd
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_fails_on_every_rank(&o, 2, "different configurations");
}

#[test]
fn a_panic_on_one_rank_ends_the_whole_job() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let started = std::time::Instant::now();
    let o = mpirun(
        3,
        &run_args(out.to_str().unwrap(), "experiment.cycles=3", &[]),
        &[("ENFF_TEST_PANIC_RANK", "1")],
    );
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert_ne!(o.status.code(), Some(124), "the job hung: {all}");
    assert!(all.contains("injected panic on rank 1"), "{all}");
    assert!(all.contains("aborting the whole job"), "{all}");
    assert!(started.elapsed().as_secs() < 100);
}

#[test]
fn a_launcher_of_another_mpi_library_is_detected() {
    // A foreign launcher (MPICH's Hydra) announces its job through PMI_SIZE / PMI_RANK; the
    // Open MPI library then starts every process alone, in a world of 1.
    let o = Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_enff"))
        .arg("info")
        .env("PMI_SIZE", "2")
        .env("PMI_RANK", "0")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(all.contains("sees a world of 1"), "{all}");
}

#[test]
fn info_lists_every_rank() {
    let o = mpirun(2, &["info"], &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("MPI world of 2 ranks"), "{all}");
    assert!(out.contains("rank 0:") && out.contains("rank 1:"), "{all}");
}

/// The skill columns of a run's metrics (the wall times differ).
const SKILL: [&str; 5] = ["time", "rmse_forecast", "spread_forecast", "rmse", "spread"];

#[test]
fn a_killed_sharded_run_resumes_over_ranks_or_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let o = mpirun(
        2,
        &run_args(whole.to_str().unwrap(), "experiment.cycles=8", &[]),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let want = metrics(&whole);
    // Killed after cycle 6 with checkpoints every 4 cycles: the metrics of the 6 finished
    // cycles were streamed, and the checkpoint holds the whole ensemble after cycle 4.
    for (name, resume_ranks) in [("cut2", 2), ("cut1", 1)] {
        let cut = dir.path().join(name);
        let cut_s = cut.to_str().unwrap();
        let o = mpirun(
            2,
            &run_args(cut_s, "experiment.cycles=8", &["--checkpoint-every", "4"]),
            &[("ENFF_TEST_ABORT_AFTER", "6")],
        );
        assert!(!o.status.success(), "{}", text(&o));
        assert_eq!(metrics(&cut).len(), 6, "streamed rows: {}", text(&o));
        let resume = ["run", "--resume", cut_s, "--backend", "cpu", "--no-plots"];
        let o = if resume_ranks == 1 {
            single(&resume)
        } else {
            mpirun(resume_ranks, &resume, &[])
        };
        assert!(o.status.success(), "{}", text(&o));
        let got = metrics(&cut);
        let cycles: Vec<f64> = got.iter().map(|r| r["cycle"]).collect();
        assert_eq!(cycles, (1..=8).map(f64::from).collect::<Vec<_>>());
        metrics_agree(
            &want,
            &got,
            &SKILL,
            &format!("resumed on {resume_ranks} rank(s)"),
        );
    }
}

#[test]
fn sharded_runs_take_the_run_options_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    // --seeds: one folder per seed and the aggregate, equal to the single-process seeds.
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    let extra = ["--seeds", "2", "--check-every-step"];
    let o = single(&run_args(
        a.to_str().unwrap(),
        "experiment.cycles=3",
        &extra,
    ));
    assert!(o.status.success(), "{}", text(&o));
    let o = mpirun(
        2,
        &run_args(b.to_str().unwrap(), "experiment.cycles=3", &extra),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(b.join("seeds.csv").exists() && b.join("summary.json").exists());
    let mut seeds: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seed-"))
        .collect();
    seeds.sort();
    assert_eq!(seeds.len(), 2, "{seeds:?}");
    for seed in &seeds {
        metrics_agree(
            &metrics(&a.join(seed)),
            &metrics(&b.join(seed)),
            &SKILL,
            seed,
        );
    }
    // The plots of a single-process run: the RMSE chart and the Hovmöller diagram.
    let p = dir.path().join("plots");
    let mut args = run_args(p.to_str().unwrap(), "experiment.cycles=3", &[]);
    args.retain(|a| *a != "--no-plots");
    let o = mpirun(2, &args, &[]);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "rmse_spread.png",
        "hovmoller.png",
        "config.toml",
        "summary.json",
    ] {
        assert!(p.join(f).exists(), "{f} missing: {}", text(&o));
    }
    // --on-divergence: a NaN in the forecast of cycle 3 (the test hook): `stop` fails on every
    // rank with the cycle and stage, `record` logs it, redraws the ensemble and keeps cycling.
    let nan = [("ENFF_TEST_NAN_FORECAST", "3")];
    let s = dir.path().join("stop");
    let o = mpirun(
        2,
        &run_args(s.to_str().unwrap(), "experiment.cycles=6", &[]),
        &nan,
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("divergence at cycle 3 during forecast"),
        "{}",
        text(&o)
    );
    let r = dir.path().join("record");
    let rec = ["--on-divergence", "record"];
    let o = mpirun(
        2,
        &run_args(r.to_str().unwrap(), "experiment.cycles=6", &rec),
        &nan,
    );
    assert!(o.status.success(), "{}", text(&o));
    let summary = std::fs::read_to_string(r.join("summary.json")).unwrap();
    assert!(summary.contains("\"stage\": \"forecast\""), "{summary}");
    let rows = metrics(&r);
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|m| m["rmse"].is_finite()), "{summary}");
}
