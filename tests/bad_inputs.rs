//! Every kind of bad input the suite tries, each with the typed error it must produce, and the
//! README's table of them kept in step: `ENFF_BLESS=1 cargo test --release --test bad_inputs`
//! rewrites the table after a case is added.

use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::experiment::{file, output, preset, Checkpoint, Config, Experiment};
use enff::filter::{Enff, EnffConfig, Filter, Observation};
use enff::observe::Observe;
use enff::Error;

type Case = (
    &'static str,
    &'static str,
    Box<dyn Fn() -> Result<(), Error>>,
);

/// The variant name of an error (the "typed error" column).
fn variant(e: &Error) -> &'static str {
    match e.root() {
        Error::InvalidParameter { .. } => "InvalidParameter",
        Error::ShapeMismatch { .. } => "ShapeMismatch",
        Error::NonFinite { .. } => "NonFinite",
        Error::Diverged { .. } => "Diverged",
        Error::UnknownPreset { .. } => "UnknownPreset",
        Error::UnknownFilter { .. } => "UnknownFilter",
        Error::UnknownSetting { .. } => "UnknownSetting",
        Error::BadSettingValue { .. } => "BadSettingValue",
        Error::Unsupported { .. } => "Unsupported",
        Error::TooLarge { .. } => "TooLarge",
        Error::Gpu(_) => "Gpu",
        Error::Io { .. } => "Io",
        Error::ConfigFile { .. } => "ConfigFile",
        Error::OutputExists { .. } => "OutputExists",
        Error::SweepMismatch { .. } => "SweepMismatch",
        Error::Interrupted { .. } => "Interrupted",
        _ => "other",
    }
}

fn l96() -> Config {
    preset("lorenz96_sakov2008").unwrap().config
}

/// `l96()` with `sets` applied, validated.
fn config_with(sets: &[&str]) -> Result<(), Error> {
    let mut c = l96();
    for s in sets {
        c.set(s)?;
    }
    c.validate()
}

/// One EnFF analysis of a 10 × 8 ensemble with observation `y` (identity, σ_y = `sigma`).
fn analysis(y: Vec<f32>, sigma: f32, n: usize, steps: usize) -> Result<(), Error> {
    let cpu = Cpu::new();
    let d = 8;
    let x: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut ens = cpu.upload(n, d, &x)?;
    let prev = cpu.upload(n, d, &x)?;
    let yb = cpu.upload(1, y.len(), &y)?;
    let op = Observe::identity();
    let mut f = Enff::<Cpu>::new(EnffConfig::f2p(0.05, 0.1, steps))?;
    f.analyse(
        &cpu,
        &mut ens,
        Some(&prev),
        &Observation {
            y: &yb,
            operator: &op,
            noise_std: sigma,
        },
        1,
    )
}

fn cases() -> Vec<Case> {
    let finite = vec![0.5f32; 8];
    vec![
        (
            "NaN in the observations",
            "NonFinite",
            Box::new(|| {
                let mut y = vec![0.5f32; 8];
                y[3] = f32::NAN;
                analysis(y, 0.1, 10, 4)
            }),
        ),
        (
            "Inf in the observations",
            "NonFinite",
            Box::new(|| {
                let mut y = vec![0.5f32; 8];
                y[0] = f32::INFINITY;
                analysis(y, 0.1, 10, 4)
            }),
        ),
        (
            "observation vector of the wrong length",
            "ShapeMismatch",
            Box::new(|| analysis(vec![0.5; 7], 0.1, 10, 4)),
        ),
        (
            "observation noise σ_y ≤ 0 (analysis call)",
            "InvalidParameter",
            {
                let y = finite.clone();
                Box::new(move || analysis(y.clone(), 0.0, 10, 4))
            },
        ),
        ("too few members (n = 1) for EnFF", "InvalidParameter", {
            let y = finite.clone();
            Box::new(move || analysis(y.clone(), 0.1, 1, 4))
        }),
        ("zero flow steps", "InvalidParameter", {
            let y = finite.clone();
            Box::new(move || analysis(y.clone(), 0.1, 10, 0))
        }),
        (
            "observation noise ≤ 0 (setting)",
            "InvalidParameter",
            Box::new(|| config_with(&["observe.noise_std=0"])),
        ),
        (
            "model time step ≤ 0",
            "InvalidParameter",
            Box::new(|| config_with(&["model.dt=-0.01"])),
        ),
        (
            "model time step not finite",
            "BadSettingValue",
            Box::new(|| config_with(&["model.dt=nan"])),
        ),
        (
            "Lorenz-96 dimension below the stencil (d < 4)",
            "InvalidParameter",
            Box::new(|| config_with(&["model.d=3"])),
        ),
        (
            "observation interval obs_every = 0",
            "InvalidParameter",
            Box::new(|| config_with(&["observe.obs_every=0"])),
        ),
        (
            "zero cycles",
            "InvalidParameter",
            Box::new(|| config_with(&["experiment.cycles=0"])),
        ),
        (
            "ensemble inflation ≤ 0",
            "InvalidParameter",
            Box::new(|| config_with(&["filter.kind=etkf", "filter.inflation=0"])),
        ),
        (
            "localization radius ≤ 0",
            "InvalidParameter",
            Box::new(|| config_with(&["filter.kind=letkf", "filter.loc_radius=0"])),
        ),
        (
            "adaptive inflation below 1",
            "InvalidParameter",
            Box::new(|| config_with(&["filter.adaptive_inflation=0.8"])),
        ),
        (
            "negative innovation bound (covariance guidance)",
            "InvalidParameter",
            Box::new(|| {
                config_with(&[
                    "filter.guidance=covariance",
                    "filter.guidance_scale=1",
                    "filter.innovation_clip=-2",
                ])
            }),
        ),
        (
            "Kalman filter on a nonlinear model",
            "InvalidParameter",
            Box::new(|| {
                let mut c = l96();
                c.set("filter.kind=kf")?;
                c.set("ensemble.n=1")?;
                let e = Experiment::new("bad", c, None)?;
                e.run(&Cpu::new(), |_| {}).map(|_| ())
            }),
        ),
        (
            "unknown preset",
            "UnknownPreset",
            Box::new(|| preset("lorenz97").map(|_| ())),
        ),
        (
            "unknown filter",
            "UnknownFilter",
            Box::new(|| config_with(&["filter.kind=enff-xyz"])),
        ),
        (
            "unknown setting",
            "UnknownSetting",
            Box::new(|| config_with(&["filter.sigma_max=1"])),
        ),
        (
            "setting of the wrong type",
            "BadSettingValue",
            Box::new(|| config_with(&["ensemble.n=many"])),
        ),
        (
            "experiment file with an unknown key",
            "ConfigFile",
            Box::new(|| {
                file::parse_toml("[model]\nsystem = \"lorenz96\"\nsize = 40\n", "x.toml")
                    .map(|_| ())
            }),
        ),
        (
            "experiment file that is not TOML",
            "ConfigFile",
            Box::new(|| file::parse_toml("[model\nd = ", "x.toml").map(|_| ())),
        ),
        (
            "output folder that already holds results",
            "OutputExists",
            Box::new(|| {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("summary.json"), "{}").unwrap();
                output::prepare_dir(dir.path(), false)
            }),
        ),
        (
            "run larger than the backend's memory",
            "TooLarge",
            Box::new(|| {
                let mut c = l96();
                c.set("model.d=200000")?;
                let e = Experiment::new("big", c, None)?;
                e.run(&Cpu::new().with_memory_limit(1 << 20), |_| {})
                    .map(|_| ())
            }),
        ),
        (
            "corrupt checkpoint",
            "InvalidParameter",
            Box::new(|| {
                Checkpoint::from_bytes(
                    b"ENFFCKPT\x01\x00\x00\x00\x00\x00\x00\x00{}junkjunk",
                    "ck".as_ref(),
                )
                .map(|_| ())
            }),
        ),
    ]
}

fn table(rows: &[(&str, &str)]) -> String {
    let mut t = format!(
        "{} kinds of bad input are tried by the test suite (`tests/bad_inputs.rs`):\n\n\
         | Bad input | Error |\n|---|---|\n",
        rows.len()
    );
    for (kind, err) in rows {
        t.push_str(&format!("| {kind} | `Error::{err}` |\n"));
    }
    t
}

#[test]
fn every_bad_input_gets_its_typed_error_and_the_readme_lists_them() {
    let mut rows = Vec::new();
    for (kind, want, case) in cases() {
        match case() {
            Ok(()) => panic!("{kind}: accepted"),
            Err(e) => {
                assert_eq!(variant(&e), want, "{kind}: {e}");
                // The message names something to act on, never an empty string.
                assert!(e.to_string().len() > 20, "{kind}: {e}");
            }
        }
        rows.push((kind, want));
    }
    let want = table(&rows);
    let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let readme = std::fs::read_to_string(readme_path).unwrap();
    let (start, end) = ("<!-- bad-inputs:start -->\n", "<!-- bad-inputs:end -->");
    let a = readme
        .find(start)
        .expect("README has the bad-inputs markers")
        + start.len();
    let b = readme
        .find(end)
        .expect("README has the bad-inputs end marker");
    if readme[a..b] != want {
        if std::env::var("ENFF_BLESS").is_ok_and(|v| v == "1") {
            let updated = format!("{}{}{}", &readme[..a], want, &readme[b..]);
            std::fs::write(readme_path, updated).unwrap();
        } else {
            panic!(
                "README's bad-input table is out of date; run \
                 `ENFF_BLESS=1 cargo test --release --test bad_inputs`. Expected:\n{want}"
            );
        }
    }
}
