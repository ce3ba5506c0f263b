//! Experiment tooling: TOML experiment files, `--set` on every key, `--seeds`, sweeps (resume,
//! refusal of another sweep's folder), output folders and `--json`.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Command, Output};

use enff::backend::cpu::Cpu;
use enff::experiment::config::setting_keys;
use enff::experiment::sweep::{self, Axis, Event, Sweep};
use enff::experiment::{file, preset, PRESETS};
use serde_json::Value;

fn enff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enff"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ENFF_REQUIRE_GPU")
        .output()
        .expect("the enff binary runs")
}

fn ok(args: &[&str]) -> String {
    let o = enff(args);
    assert!(
        o.status.success(),
        "enff {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = enff(args);
    assert!(!o.status.success(), "enff {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The summary without what varies between identical runs (wall times).
fn scores(mut v: Value) -> Value {
    let m = v.as_object_mut().unwrap();
    m.retain(|k, _| !k.starts_with("seconds"));
    v
}

/// Lorenz-96 d = 40 for 12 cycles: a few milliseconds per run.
const TINY: [&str; 6] = [
    "--set",
    "experiment.cycles=12",
    "--set",
    "experiment.burn_in=2",
    "--set",
    "experiment.spinup=20",
];

fn args<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter()
        .chain(TINY.iter())
        .chain(tail)
        .copied()
        .collect()
}

#[test]
fn preset_exported_as_toml_runs_to_the_same_summary() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let toml = ok(&args(&["preset", "show", "lorenz96_sakov2008"], &[]));
    std::fs::write(p("l96.toml"), &toml).unwrap();
    // Every setting is written out.
    let cfg = preset("lorenz96_sakov2008").unwrap().config;
    for key in setting_keys(&serde_json::to_value(&cfg).unwrap()) {
        let field = key.split('.').nth(1).unwrap();
        assert!(
            toml.lines().any(|l| l.starts_with(&format!("{field} = "))),
            "{key} missing from the exported file:\n{toml}"
        );
    }
    let cpu = ["--backend", "cpu"];
    ok(&args(
        &["run", "lorenz96_sakov2008", "--out", &p("a")],
        &cpu,
    ));
    ok(&["run", &p("l96.toml"), "--out", &p("b"), "--backend", "cpu"]);
    // The run's own config.toml reproduces it too.
    let json = ok(&[
        "run",
        &p("a/config.toml"),
        "--out",
        &p("c"),
        "--backend",
        "cpu",
        "--json",
    ]);
    let a = read_json(&dir.path().join("a/summary.json"));
    let b = read_json(&dir.path().join("b/summary.json"));
    let c = read_json(&dir.path().join("c/summary.json"));
    assert_eq!(a["cycles"], 12);
    assert!(
        a["expected_rmse"].is_array(),
        "preset settings keep the band"
    );
    assert_eq!(scores(a.clone()), scores(b));
    assert_eq!(scores(a), scores(c.clone()));
    // --json: stdout is exactly the summary, nothing else.
    let printed: Value = serde_json::from_str(&json).expect("--json prints JSON only");
    assert_eq!(printed, c);
    // preset list keeps one line per preset, and `presets` is the same list.
    let list = ok(&["preset", "list"]);
    assert_eq!(list.lines().count(), PRESETS.len(), "{list}");
    assert_eq!(list, ok(&["presets"]));
}

#[test]
fn every_setting_is_reachable_by_set() {
    for name in PRESETS {
        let base = preset(name).unwrap().config;
        let tree = serde_json::to_value(&base).unwrap();
        let keys = setting_keys(&tree);
        assert!(keys.len() >= 25, "{keys:?}");
        for key in keys {
            let (s, f) = key.split_once('.').unwrap();
            let current = &tree[s][f];
            let text = match current {
                Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            // Its own value: accepted and nothing changes.
            let mut c = base.clone();
            c.set(&format!("{key}={text}"))
                .unwrap_or_else(|e| panic!("{name}: {key}={text}: {e}"));
            assert_eq!(c, base, "{name}: {key}");
            // A new number lands in exactly that field.
            if let Value::Number(n) = current {
                let new = if n.is_u64() {
                    Value::from(n.as_u64().unwrap() + 1)
                } else {
                    // Exact in f32 as in f64: the field holds exactly this number.
                    Value::from(n.as_f64().unwrap().round() + 1.5)
                };
                let mut c = base.clone();
                c.set(&format!("{key}={new}")).unwrap();
                let mut want = tree.clone();
                want[s][f] = new;
                assert_eq!(serde_json::to_value(&c).unwrap(), want, "{name}: {key}");
            }
        }
    }
}

#[test]
fn bad_files_and_bad_sets_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = file::to_toml("x", "", &preset("lorenz63_spantini2022").unwrap().config).unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let cases = [
        ("\nn = 20", "\nn = \"twenty\"", "ensemble.n", "string"),
        ("\nn = 20", "\nn = 20\nm = 3", "ensemble.m", "unknown field"),
        ("cycles = ", "cycle = ", "experiment.cycle", "unknown field"),
        ("[filter]", "[filters]", "filters", "unknown field"),
        (
            "integrator = \"euler\"",
            "integrator = \"rk9\"",
            "filter.integrator",
            "rk9",
        ),
        (
            "sigma_min = ",
            "sigma_min = -",
            "filter.sigma_min",
            "sigma_min",
        ),
        ("[model]", "[model", "", "line"),
    ];
    for (i, (from, to, key, needle)) in cases.iter().enumerate() {
        assert!(good.contains(from), "{from}");
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let err = fails(&["run", path.to_str().unwrap(), "--out", o]);
        assert!(err.contains(&format!("bad{i}.toml, line ")), "{err}");
        assert!(
            err.contains(key) && err.contains(needle),
            "{key}/{needle}: {err}"
        );
        assert!(!out.exists(), "nothing written for a bad file");
    }
    assert!(fails(&["run", "missing.toml", "--out", o]).contains("missing.toml"));
    let file = dir.path().join("ok.toml");
    std::fs::write(&file, &good).unwrap();
    let f = file.to_str().unwrap();
    for (set, needle) in [
        (
            "filter.sigma_min=abc",
            "`filter.sigma_min`: expected a number",
        ),
        (
            "ensemble.n=2.5",
            "`ensemble.n`: expected a non-negative integer",
        ),
        ("model.scheme=rk5", "model.scheme"),
        ("filter.sigmamin=1", "unknown setting `filter.sigmamin`"),
        ("experiment.burn_in=100000000", "experiment.burn_in"),
    ] {
        let err = fails(&["run", f, "--set", set, "--out", o]);
        assert!(err.contains(needle), "{set}: {err}");
        let err = fails(&["preset", "show", "rotation2d", "--set", set]);
        assert!(err.contains(needle), "{set}: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn occupied_output_folder_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let o = out.to_str().unwrap();
    let run = args(&["run", "rotation2d", "--backend", "cpu", "--out", o], &[]);
    let err = fails(&run);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert!(!out.join("summary.json").exists());
    let mut forced = run.clone();
    forced.push("--force");
    ok(&forced);
    for f in ["config.toml", "metrics.csv", "summary.json", "notes.txt"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // A folder that cannot be made (its parent is a file): an I/O error, no files.
    let blocked = out.join("notes.txt").join("sub");
    let err = fails(&args(
        &["run", "rotation2d", "--backend", "cpu"],
        &["--out", blocked.to_str().unwrap()],
    ));
    assert!(err.contains("I/O error"), "{err}");
}

#[test]
fn seeds_report_mean_and_std_of_independent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let base = ["--backend", "cpu", "--seed", "40"];
    let json = ok(&args(
        &[
            "run",
            "lorenz96_sakov2008",
            "--seeds",
            "3",
            "--out",
            &p("k"),
        ],
        &[&base[..], &["--json"]].concat(),
    ));
    let agg: Value = serde_json::from_str(&json).expect("--json prints JSON only");
    assert_eq!(agg, read_json(&dir.path().join("k/summary.json")));
    let runs = agg["runs"].as_array().unwrap();
    let rmse: Vec<f64> = runs
        .iter()
        .map(|r| r["rmse_mean"].as_f64().unwrap())
        .collect();
    assert_eq!(agg["seeds"], serde_json::json!([40, 41, 42]));
    let (m, s) = sweep::mean_std(&rmse);
    assert!((agg["rmse_mean"]["mean"].as_f64().unwrap() - m).abs() < 1e-12);
    assert!((agg["rmse_mean"]["std"].as_f64().unwrap() - s).abs() < 1e-12);
    assert!(s > 0.0, "different seeds give different runs: {rmse:?}");
    // Seed 41 of the batch is the plain run with --seed 41.
    ok(&args(
        &[
            "run",
            "lorenz96_sakov2008",
            "--seed",
            "41",
            "--out",
            &p("one"),
        ],
        &["--backend", "cpu"],
    ));
    assert_eq!(
        scores(read_json(&dir.path().join("k/seed-41/summary.json"))),
        scores(read_json(&dir.path().join("one/summary.json")))
    );
    let csv = std::fs::read_to_string(dir.path().join("k/seeds.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "header, 3 seeds, mean, std:\n{csv}");
    assert!(lines[4].starts_with("mean,") && lines[5].starts_with("std,"));
    let csv_mean: f64 = lines[4].split(',').nth(1).unwrap().parse().unwrap();
    assert!((csv_mean - m).abs() < 1e-12);
}

/// A 2 × 2 grid × 2 seeds on Lorenz-63, 6 cycles each.
fn small_sweep(sigma: &str) -> Sweep {
    let mut base = preset("lorenz63_spantini2022").unwrap().config;
    for s in [
        "experiment.cycles=6",
        "experiment.burn_in=1",
        "experiment.spinup=10",
    ] {
        base.set(s).unwrap();
    }
    Sweep::new(
        "l63",
        base,
        vec![
            Axis::parse(&format!("filter.sigma_min={sigma}")).unwrap(),
            Axis::parse("filter.guidance_scale=0.1,1").unwrap(),
        ],
        0,
        vec![],
        2,
    )
    .unwrap()
}

/// results.csv without the wall-time column (the only one that differs between equal runs).
fn results_without_times(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let t = header
        .iter()
        .position(|c| *c == "seconds_per_cycle")
        .unwrap();
    text.lines()
        .map(|l| {
            l.split(',')
                .enumerate()
                .filter(|(i, _)| *i != t)
                .map(|(_, f)| f)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[test]
fn interrupted_sweep_resumes_to_the_uninterrupted_results() {
    let dir = tempfile::tempdir().unwrap();
    let (full, part) = (dir.path().join("full"), dir.path().join("part"));
    let cpu = Cpu::new();
    let plan = small_sweep("0.05,0.5");
    let whole = sweep::run_sweep(&plan, &full, false, &cpu, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!((whole.ran, whole.skipped, whole.stopped), (8, 0, false));
    assert_eq!(whole.rows.len(), 8);
    // Stop after three runs (as an interruption would), then resume.
    let mut finished = 0;
    let first = sweep::run_sweep(&plan, &part, false, &cpu, |e| {
        if let Event::RunEnd(_) = e {
            finished += 1;
            if finished == 3 {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!((first.ran, first.stopped), (3, true));
    let mut started = Vec::new();
    let rest = sweep::run_sweep(&plan, &part, false, &cpu, |e| {
        if let Event::RunStart { point, seed } = e {
            started.push((point.index, seed));
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!((rest.ran, rest.skipped), (5, 3));
    assert_eq!(started.len(), 5);
    assert!(
        !started.contains(&(0, plan.seed(0))),
        "finished runs are not run again"
    );
    assert_eq!(results_without_times(&part), results_without_times(&full));
    // The ranking is sorted by mean rmse over both seeds.
    let ranking = sweep::rank(&plan, &rest.rows);
    assert_eq!(ranking.len(), 4);
    assert!(ranking.windows(2).all(|w| w[0].rmse.0 <= w[1].rmse.0));
    assert!(ranking.iter().all(|p| p.runs == 2 && p.failed == 0));
    // Running it once more does nothing.
    let again = sweep::run_sweep(&plan, &part, false, &cpu, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!((again.ran, again.skipped), (0, 8));
}

#[test]
fn sweep_command_resumes_after_a_cut_off_results_file() {
    let dir = tempfile::tempdir().unwrap();
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    let cmd = |out: &Path| -> Vec<String> {
        [
            "sweep",
            "lorenz63_spantini2022",
            "--grid",
            "filter.sigma_min=0.05,0.5",
            "--grid",
            "filter.flow_steps=3,5",
            "--seeds",
            "2",
            "--set",
            "experiment.cycles=6",
            "--set",
            "experiment.burn_in=1",
            "--backend",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |out: &Path, extra: &[&str]| {
        let mut a = cmd(out);
        a.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        ok(&refs)
    };
    let table = run(&full, &[]);
    assert!(table.contains("8 runs now, 0 already done"), "{table}");
    assert!(full.join("best.csv").exists());
    // An interruption: three finished rows and half of the fourth.
    std::fs::create_dir(&cut).unwrap();
    for f in ["sweep.json", "base.toml"] {
        std::fs::copy(full.join(f), cut.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(full.join("results.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut partial = lines[..4].join("\n");
    partial.push('\n');
    partial.push_str(&lines[4][..lines[4].len() / 2]);
    std::fs::write(cut.join("results.csv"), partial).unwrap();
    let json = run(&cut, &["--json"]);
    let ranking: Value = serde_json::from_str(&json).expect("--json prints JSON only");
    assert_eq!(ranking.as_array().unwrap().len(), 4);
    assert_eq!(results_without_times(&cut), results_without_times(&full));
    let r = ranking.as_array().unwrap();
    assert!(r
        .windows(2)
        .all(|w| w[0]["rmse_mean"].as_f64() <= w[1]["rmse_mean"].as_f64()));

    // The same folder with another experiment: refused, saying what differs.
    let mut other = cmd(&full);
    other[3] = "filter.sigma_min=0.05,0.2".into();
    let refs: Vec<&str> = other.iter().map(|s| s.as_str()).collect();
    let err = fails(&refs);
    assert!(
        err.contains("different experiment") && err.contains("grid was"),
        "{err}"
    );
    let mut other = cmd(&full);
    other.extend(["--set".to_string(), "ensemble.n=10".to_string()]);
    let refs: Vec<&str> = other.iter().map(|s| s.as_str()).collect();
    let err = fails(&refs);
    assert!(err.contains("ensemble.n"), "{err}");
    // A folder holding other files is not a sweep folder.
    let err = fails(&[
        "sweep",
        "rotation2d",
        "--grid",
        "filter.sigma_min=0.1",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(err.contains("not empty"), "{err}");
    // Empty grids are refused before anything is made.
    let empty = dir.path().join("empty");
    for bad in [
        &["--grid", "filter.sigma_min="][..],
        &["--grid", "filter.sigma_min=,"][..],
        &[][..],
        &["--random", "3"][..],
    ] {
        let mut a = vec!["sweep", "rotation2d", "--out", empty.to_str().unwrap()];
        a.extend_from_slice(bad);
        let err = fails(&a);
        assert!(err.contains("--grid") || err.contains("--range"), "{err}");
        assert!(!empty.exists());
    }
}
