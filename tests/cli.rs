//! The `enff` command: output files, summary keys, and bad input as clear errors.

use std::path::Path;
use std::process::Command;

fn enff(args: &[&str]) -> std::process::Output {
    enff_with(args, &[])
}

/// `enff` with extra environment variables (test hooks).
fn enff_with(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_enff"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ENFF_REQUIRE_GPU")
        .envs(env.iter().copied())
        .output()
        .expect("the enff binary runs")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_writes_summary_and_metrics_with_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("res");
    let o = enff(&[
        "run",
        "lorenz96_bao2024",
        "--backend",
        "cpu",
        "--set",
        "model.d=64",
        "--set",
        "experiment.cycles=12",
        "--set",
        "experiment.burn_in=2",
        "--set",
        "filter.flow_steps=4",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("rmse"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "preset",
        "filter",
        "backend",
        "n",
        "d",
        "m",
        "cycles",
        "flow_steps",
        "rmse_mean",
        "spread_mean",
        "rmse_last",
        "seconds_total",
        "seconds_per_cycle",
        "seconds_forecast",
        "seconds_analysis",
    ] {
        assert!(
            summary.get(key).is_some(),
            "summary.json lacks {key}: {summary}"
        );
    }
    assert_eq!(summary["d"], 64);
    assert_eq!(summary["flow_steps"], 4);
    assert_eq!(summary["seed"], 3);
    assert_eq!(summary["backend"], "cpu");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 13, "header + 12 cycles");
    assert!(lines[0].starts_with("cycle,time,rmse_forecast"));
    // rmse_mean is the mean of the rmse column after burn-in.
    let rmse: Vec<f64> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(4).unwrap().parse().unwrap())
        .collect();
    let mean = rmse[2..].iter().sum::<f64>() / 10.0;
    let got = summary["rmse_mean"].as_f64().unwrap();
    assert!((mean - got).abs() < 1e-5 * got.max(1.0), "{mean} vs {got}");
}

fn assert_fails_cleanly(args: &[&str], needle: &str, out: &Path) {
    let o = enff(args);
    assert!(!o.status.success(), "expected failure for {args:?}");
    let err = stderr(&o);
    assert!(
        err.contains(needle),
        "stderr for {args:?} lacks `{needle}`:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.join("summary.json").exists(),
        "no result file after an error"
    );
    assert!(
        !out.join("metrics.csv").exists(),
        "no result file after an error"
    );
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("res");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "lorenz97", "--out", o],
            "unknown preset `lorenz97`",
        ),
        (
            &["run", "rotation2d", "--filter", "enkf9", "--out", o],
            "unknown filter `enkf9`",
        ),
        (
            &["run", "rotation2d", "--set", "model.dd=3", "--out", o],
            "unknown setting `model.dd`",
        ),
        (
            &["run", "rotation2d", "--set", "nokey", "--out", o],
            "section.key=value",
        ),
        (
            &["run", "rotation2d", "--set", "ensemble.n=abc", "--out", o],
            "ensemble.n",
        ),
        (
            &["run", "rotation2d", "--set", "ensemble.n=1", "--out", o],
            "ensemble.n",
        ),
        (
            &[
                "run",
                "rotation2d",
                "--set",
                "filter.flow_steps=0",
                "--out",
                o,
            ],
            "filter.flow_steps",
        ),
        (
            &[
                "run",
                "rotation2d",
                "--set",
                "filter.sigma_min=0",
                "--out",
                o,
            ],
            "filter.sigma_min",
        ),
        (
            &[
                "run",
                "rotation2d",
                "--set",
                "filter.sigma_min=-1",
                "--out",
                o,
            ],
            "filter.sigma_min",
        ),
        (
            &[
                "run",
                "rotation2d",
                "--set",
                "observe.noise_std=0",
                "--out",
                o,
            ],
            "observe.noise_std",
        ),
        (
            &[
                "run",
                "rotation2d",
                "--set",
                "filter.integrator=rk9",
                "--out",
                o,
            ],
            "filter.integrator",
        ),
        (
            &["run", "lorenz96_bao2024", "--set", "model.d=3", "--out", o],
            "model.d",
        ),
        (
            &["run", "lorenz96_bao2024", "--set", "model.dt=0", "--out", o],
            "model.dt",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--set",
                "observe.obs_every=0",
                "--out",
                o,
            ],
            "observe.obs_every",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--set",
                "experiment.cycles=0",
                "--out",
                o,
            ],
            "experiment.cycles",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--set",
                "observe.noise_std=nan",
                "--out",
                o,
            ],
            "observe.noise_std",
        ),
    ];
    let baseline_cases: &[(&[&str], &str)] = &[
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--filter",
                "ensf",
                "--set",
                "filter.eps_alpha=0",
                "--out",
                o,
            ],
            "filter.eps_alpha",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--filter",
                "ensf",
                "--set",
                "filter.eps_beta=1.5",
                "--out",
                o,
            ],
            "filter.eps_beta",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--filter",
                "bpf",
                "--set",
                "filter.jitter=-1",
                "--out",
                o,
            ],
            "filter.jitter",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--filter",
                "etkf",
                "--set",
                "filter.inflation=0",
                "--out",
                o,
            ],
            "filter.inflation",
        ),
        (
            &[
                "run",
                "lorenz96_bao2024",
                "--filter",
                "kf",
                "--set",
                "ensemble.n=1",
                "--out",
                o,
            ],
            "linear model",
        ),
        (
            &["run", "rotation2d", "--filter", "kf", "--out", o],
            "ensemble.n=1",
        ),
    ];
    for (args, needle) in cases.iter().chain(baseline_cases) {
        assert_fails_cleanly(args, needle, &out);
    }
}

#[test]
fn heun_integrator_is_reachable_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("heun");
    let o = enff(&[
        "run",
        "rotation2d",
        "--backend",
        "cpu",
        "--set",
        "filter.integrator=heun",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("summary.json").exists());
}

#[test]
fn presets_lists_every_preset_with_its_expected_rmse() {
    let o = enff(&["presets"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for p in enff::experiment::PRESETS {
        assert!(s.contains(p), "{p} missing from:\n{s}");
    }
    assert!(s.contains("expected rmse"));
}

#[test]
fn a_divergence_names_the_cycle_and_keeps_the_metrics_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("div");
    // A model step of 0.2 makes RK4 on Lorenz-96 blow up after a few cycles, not at once.
    let o = enff(&[
        "run",
        "lorenz96_sakov2008",
        "--backend",
        "cpu",
        "--set",
        "model.dt=0.2",
        "--set",
        "experiment.spinup=0",
        "--set",
        "experiment.cycles=200",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("divergence at cycle"), "{err}");
    assert!(!out.join("summary.json").exists());
    assert!(
        out.join("config.toml").exists(),
        "the configuration that diverged is kept"
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("partial metrics kept");
    let rows = csv.lines().count() - 1;
    assert!(err.contains(&format!("{rows} completed cycles")), "{err}");
}

#[test]
fn compare_runs_filters_on_identical_inputs_and_writes_tables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let o = enff(&[
        "compare",
        "lorenz96_sakov2008",
        "--filters",
        "enff-f2p,etkf,enkf,bpf",
        "--set",
        "experiment.cycles=40",
        "--set",
        "experiment.burn_in=10",
        "--set",
        "enkf:filter.inflation=1.06",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(out.join("compare.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.contains("| etkf | - |"), "{md}");
    // EnFF rows name their guidance variant.
    assert!(md.contains("| enff-f2p | local |"), "{md}");
    assert!(csv.starts_with("filter,guidance,"), "{csv}");
    // Identical inputs: every filter saw the same forecast on cycle 1 (no forecast step yet),
    // so the first rows' forecast RMSE agree exactly.
    let first = |f: &str| {
        let m = std::fs::read_to_string(out.join(f).join("metrics.csv")).unwrap();
        m.lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(2)
            .unwrap()
            .to_string()
    };
    let f0 = first("enff-f2p");
    for f in ["etkf", "enkf", "bpf"] {
        assert_eq!(first(f), f0, "{f}");
    }
    // A per-filter override reached only that filter.
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("enkf/summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["filter"], "enkf");
}

#[test]
fn quiet_hides_logs_and_json_keeps_stdout_pure() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_enff"))
            .args(["run", "rotation2d", "--backend", "cpu", "--out", out])
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("ENFF_REQUIRE_GPU")
            .output()
            .unwrap()
    };
    let loud = run(dir.path().join("a").to_str().unwrap(), &[]);
    assert!(loud.status.success());
    assert!(stderr(&loud).contains("INFO"), "{}", stderr(&loud));
    let quiet = run(
        dir.path().join("b").to_str().unwrap(),
        &["--quiet", "--json"],
    );
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    assert_eq!(stderr(&quiet), "", "--quiet leaves stderr empty");
    let v: serde_json::Value = serde_json::from_slice(&quiet.stdout).expect("stdout is JSON");
    assert_eq!(v["preset"], "rotation2d");
    assert!(v["rmse_mean"].as_f64().unwrap() > 0.0);
}

#[test]
fn compare_with_seeds_and_json_reports_mean_and_std() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let o = enff(&[
        "compare",
        "lorenz96_sakov2008",
        "--filters",
        "enff-f2p,etkf",
        "--seeds",
        "2",
        "--seed",
        "7",
        "--set",
        "experiment.cycles=10",
        "--set",
        "experiment.burn_in=2",
        "--backend",
        "cpu",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let f = r["filter"].as_str().unwrap();
        assert_eq!(r["seeds"], 2, "{r}");
        assert!(r["rmse_std"].as_f64().unwrap() > 0.0, "{r}");
        // The mean is that of the two seeds' own summaries.
        let seed = |k: u64| -> f64 {
            let d = std::fs::read_dir(out.join(f))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(&format!("seed-{}", 7 + k)))
                .unwrap();
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                    .unwrap();
            s["rmse_mean"].as_f64().unwrap()
        };
        let mean = (seed(0) + seed(1)) / 2.0;
        assert!(
            (r["rmse_mean"].as_f64().unwrap() - mean).abs() < 1e-12,
            "{r}"
        );
    }
    // The folder is taken now.
    let again = enff(&[
        "compare",
        "lorenz96_sakov2008",
        "--filters",
        "etkf",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
}

/// A run killed after cycle 9 (the test hook) with checkpoints every 4 cycles continues with
/// `enff run --resume DIR` and ends with the metrics of an uninterrupted run.
#[test]
fn killed_run_resumes_from_its_checkpoint_to_the_same_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, cut) = (dir.path().join("whole"), dir.path().join("cut"));
    let common = [
        "run",
        "lorenz96_sakov2008",
        "--backend",
        "cpu",
        "--set",
        "experiment.cycles=15",
        "--set",
        "experiment.burn_in=2",
        "--checkpoint-every",
        "4",
        "--out",
    ];
    let mut a: Vec<&str> = common.to_vec();
    a.push(whole.to_str().unwrap());
    assert!(enff(&a).status.success());
    let mut b: Vec<&str> = common.to_vec();
    b.push(cut.to_str().unwrap());
    let killed = enff_with(&b, &[("ENFF_TEST_ABORT_AFTER", "9")]);
    assert!(!killed.status.success());
    assert!(stderr(&killed).contains("--resume"), "{}", stderr(&killed));
    assert!(
        !cut.join("summary.json").exists(),
        "no summary for an unfinished run"
    );
    let resumed = enff(&["run", "--resume", cut.to_str().unwrap(), "--backend", "cpu"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let skill = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(skill(&whole), skill(&cut));
    // A changed setting is refused with the key.
    let refused = enff(&[
        "run",
        "--resume",
        cut.to_str().unwrap(),
        "--set",
        "filter.sigma_min=0.3",
    ]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("filter.sigma_min"),
        "{}",
        stderr(&refused)
    );
}
