//! One analysis step through `.npy` files (`enff assimilate` and its library call) and the
//! `Assimilator` builder driven by a user model.

use enff::backend::cpu::Cpu;
use enff::experiment::assimilate::{assimilate, assimilate_files, AnalysisSpec, AssimilateFiles};
use enff::experiment::trace::{Recorder, TraceOptions};
use enff::experiment::{preset, Experiment};
use enff::io::npy::{read_npy, write_npy, NpyDtype};
use enff::model::{Dynamics, Lorenz96, Model, Scheme, System};
use enff::observe::{ObservationOperator, Observe, Pointwise};
use enff::rng::{fill_normal_row, NoiseKey, Stream};
use enff::{Assimilator, Ensemble, Error};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

mod common;

/// `n × d` normal values of std `scale` around `mean`, from the Philox streams.
fn normal(n: usize, d: usize, seed: u64, mean: f32, scale: f32) -> Vec<f32> {
    let key = NoiseKey::new(seed, Stream::User, 0);
    let mut out = vec![0.0f32; n * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        fill_normal_row(&key, i as u32, row);
    }
    out.iter_mut().for_each(|v| *v = mean + scale * *v);
    out
}

fn bits(a: &[f32]) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn enff_bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_enff"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ENFF_REQUIRE_GPU")
        .output()
        .expect("the enff binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn the_command_equals_the_library_call_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (9, 23);
    let forecast = normal(n, d, 1, 1.0, 2.0);
    let previous = normal(n, d, 2, 0.5, 2.0);
    let op = Observe::full(Pointwise::Arctan).subsample(2, 0).unwrap();
    let m = op.obs_dim(d).unwrap();
    let y = normal(1, m, 3, 0.3, 0.5);
    let (fp, pp, yp, out) = (
        dir.path().join("F.npy"),
        dir.path().join("A.npy"),
        dir.path().join("Y.npy"),
        dir.path().join("OUT.npy"),
    );
    write_npy(&fp, &[n, d], &forecast, NpyDtype::F4).unwrap();
    write_npy(&pp, &[n, d], &previous, NpyDtype::F4).unwrap();
    write_npy(&yp, &[m], &y, NpyDtype::F4).unwrap();
    let o = enff_bin(&[
        "assimilate",
        "--forecast",
        s(&fp),
        "--obs",
        s(&yp),
        "--previous",
        s(&pp),
        "--obs-noise-std",
        "0.2",
        "--obs-op",
        "arctan",
        "--obs-every",
        "2",
        "--filter",
        "enff-f2p",
        "--set",
        "filter.flow_steps=7",
        "--set",
        "filter.guidance_scale=0.05",
        "--seed",
        "42",
        "--cycle",
        "3",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = read_npy(&out).unwrap();
    assert_eq!(written.shape, vec![n, d]);
    assert_eq!(written.dtype, NpyDtype::F4);

    let mut spec = AnalysisSpec::new("enff-f2p", 0.2, 42);
    spec.operator = Pointwise::Arctan;
    spec.obs_every = 2;
    spec.cycle = 3;
    spec.sets = vec![
        "filter.flow_steps=7".into(),
        "filter.guidance_scale=0.05".into(),
    ];
    let f = Ensemble::from_vec(n, d, forecast.clone()).unwrap();
    let p = Ensemble::from_vec(n, d, previous.clone()).unwrap();
    let lib = assimilate(&Cpu::new(), &f, Some(&p), &y, &spec).unwrap();
    assert_eq!(bits(&written.data), bits(lib.as_slice()));
    // The analysis really moved the ensemble, and depends on the seed, the cycle and the
    // previous analysis.
    assert_ne!(bits(lib.as_slice()), bits(&forecast));
    for change in 0..3 {
        let mut other = spec.clone();
        let prev = match change {
            0 => {
                other.seed = 43;
                Some(&p)
            }
            1 => {
                other.cycle = 4;
                Some(&p)
            }
            _ => None,
        };
        let r = assimilate(&Cpu::new(), &f, prev, &y, &other).unwrap();
        assert_ne!(bits(r.as_slice()), bits(lib.as_slice()), "change {change}");
    }
}

fn float64_files_give_the_same_analysis_and_a_float64_output() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (6, 10);
    let forecast = normal(n, d, 5, 0.0, 1.0);
    let y = normal(1, d, 6, 0.2, 0.3);
    let mut outs = Vec::new();
    for dtype in [NpyDtype::F4, NpyDtype::F8] {
        let tag = dtype.descr().replace('<', "");
        let files = AssimilateFiles {
            forecast: dir.path().join(format!("F{tag}.npy")),
            obs: dir.path().join(format!("Y{tag}.npy")),
            previous: None,
            out: dir.path().join(format!("OUT{tag}.npy")),
        };
        write_npy(&files.forecast, &[n, d], &forecast, dtype).unwrap();
        // The observation as a (1, m) row this time.
        write_npy(&files.obs, &[1, d], &y, dtype).unwrap();
        let spec = AnalysisSpec::new("etkf", 0.3, 1);
        let outcome = assimilate_files(&Cpu::new(), &files, &spec).unwrap();
        assert_eq!((outcome.n, outcome.d, outcome.m), (n, d, d));
        let written = read_npy(&files.out).unwrap();
        assert_eq!(written.dtype, dtype);
        outs.push(written.data);
    }
    assert_eq!(bits(&outs[0]), bits(&outs[1]));
    // The ETKF with identity observations pulls the mean towards the observation.
    let dist = |data: &[f32]| {
        let e = Ensemble::from_vec(n, d, data.to_vec()).unwrap();
        e.mean()
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - *b as f64).powi(2))
            .sum::<f64>()
    };
    assert!(dist(&outs[0]) < dist(&forecast));
}

fn localizing_filters_localize_on_a_ring_of_the_forecasts_components() {
    // A 40-component forecast: the LETKF (and a localized EnKF) localize on a ring of 40, not
    // on the default preset's 1000 components.
    let (n, d) = (10, 40);
    let forecast = Ensemble::from_vec(n, d, normal(n, d, 7, 0.0, 1.0)).unwrap();
    let y = normal(1, d, 8, 0.5, 0.2);
    let before = forecast.mean();
    let dist = |mean: &[f64]| {
        mean.iter()
            .zip(&y)
            .map(|(a, b)| (a - *b as f64).powi(2))
            .sum::<f64>()
    };
    for (filter, sets) in [("letkf", vec![]), ("enkf", vec!["filter.loc_radius=4"])] {
        let mut spec = AnalysisSpec::new(filter, 0.2, 3);
        spec.sets = sets.into_iter().map(String::from).collect();
        let analysis = assimilate(&Cpu::new(), &forecast, None, &y, &spec)
            .unwrap_or_else(|e| panic!("{filter}: {e}"));
        assert!(
            dist(&analysis.mean()) < 0.5 * dist(&before),
            "{filter} moves the mean to the observations"
        );
    }
}

fn a_state_without_spatial_structure_gets_global_gains_and_refuses_localization() {
    // Three components (a Lorenz-63-like state): covariance guidance takes the global gain
    // and its own defaults for a state without geometry, and moves the mean to the ETKF's; the
    // LETKF, which needs distances, is a typed error instead of a mismatch with the default
    // preset's ring.
    let (n, d) = (20, 3);
    let forecast = Ensemble::from_vec(n, d, normal(n, d, 9, 1.0, 1.0)).unwrap();
    let y = normal(1, d, 10, 2.0, 0.1);
    let mut cov = AnalysisSpec::new("enff-f2p", 0.5, 3);
    cov.sets = vec![
        "filter.guidance=covariance".into(),
        "filter.innovation_clip=0".into(),
    ];
    let enff = assimilate(&Cpu::new(), &forecast, Some(&forecast), &y, &cov).unwrap();
    let etkf = assimilate(
        &Cpu::new(),
        &forecast,
        None,
        &y,
        &AnalysisSpec::new("etkf", 0.5, 3),
    )
    .unwrap();
    let worst = |a: &Ensemble, b: &Ensemble| {
        a.mean()
            .iter()
            .zip(b.mean())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    let (gap, moved) = (worst(&enff, &etkf), worst(&enff, &forecast));
    assert!(moved > 0.3, "the analysis must move the mean ({moved})");
    assert!(gap < 5e-3, "covariance EnFF vs ETKF mean: {gap}");
    let err = assimilate(
        &Cpu::new(),
        &forecast,
        None,
        &y,
        &AnalysisSpec::new("letkf", 0.5, 3),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("loc"), "{err}");
}

fn shapes_that_disagree_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (5, 12);
    let forecast = normal(n, d, 7, 0.0, 1.0);
    let fp = dir.path().join("F.npy");
    write_npy(&fp, &[n, d], &forecast, NpyDtype::F4).unwrap();
    let files = |obs: &str, previous: Option<&str>| AssimilateFiles {
        forecast: fp.clone(),
        obs: dir.path().join(obs),
        previous: previous.map(|p| dir.path().join(p)),
        out: dir.path().join("OUT.npy"),
    };
    // Every 3rd component observed: m = 4, but Y has 12 values.
    write_npy(&dir.path().join("Y12.npy"), &[12], &[0.0; 12], NpyDtype::F4).unwrap();
    let mut spec = AnalysisSpec::new("enff-ot", 0.5, 1);
    spec.obs_every = 3;
    match assimilate_files(&Cpu::new(), &files("Y12.npy", None), &spec) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            got,
        }) => {
            assert!(name.contains("--obs"), "{name}");
            assert!(expected.contains("(4,)"), "{expected}");
            assert_eq!(got, "(12,)");
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    // A (2, 4) observation is not one row.
    write_npy(
        &dir.path().join("Y2x4.npy"),
        &[2, 4],
        &[0.0; 8],
        NpyDtype::F4,
    )
    .unwrap();
    assert!(matches!(
        assimilate_files(&Cpu::new(), &files("Y2x4.npy", None), &spec),
        Err(Error::ShapeMismatch { .. })
    ));
    // A previous analysis of another shape.
    write_npy(&dir.path().join("Y4.npy"), &[4], &[0.0; 4], NpyDtype::F4).unwrap();
    write_npy(
        &dir.path().join("A.npy"),
        &[n + 1, d],
        &vec![0.0; (n + 1) * d],
        NpyDtype::F4,
    )
    .unwrap();
    match assimilate_files(&Cpu::new(), &files("Y4.npy", Some("A.npy")), &spec) {
        Err(Error::ShapeMismatch { name, .. }) => assert!(name.contains("--previous"), "{name}"),
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    // A 1-D forecast is not an ensemble.
    write_npy(&fp, &[d], &forecast[..d], NpyDtype::F4).unwrap();
    match assimilate_files(&Cpu::new(), &files("Y4.npy", None), &spec) {
        Err(Error::ShapeMismatch { name, .. }) => assert!(name.contains("--forecast"), "{name}"),
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    // A non-filter setting is refused naming the key; the output file is never created.
    let f = Ensemble::from_vec(n, d, forecast.clone()).unwrap();
    let mut bad = AnalysisSpec::new("enff-ot", 0.5, 1);
    bad.sets = vec!["model.d=3".into()];
    match assimilate(&Cpu::new(), &f, None, &[0.0; 12], &bad) {
        Err(Error::UnknownSetting { key, known }) => {
            assert_eq!(key, "model.d");
            assert!(known.contains("filter.sigma_min"), "{known}");
        }
        other => panic!("expected an unknown setting, got {other:?}"),
    }
    assert!(!dir.path().join("OUT.npy").exists());
}

fn the_command_reports_bad_files_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let fp = dir.path().join("F.npy");
    let yp = dir.path().join("Y.npy");
    let out = dir.path().join("OUT.npy");
    write_npy(&fp, &[4, 6], &normal(4, 6, 1, 0.0, 1.0), NpyDtype::F4).unwrap();
    // Truncated observation file.
    write_npy(&yp, &[6], &[0.5; 6], NpyDtype::F4).unwrap();
    let bytes = std::fs::read(&yp).unwrap();
    std::fs::write(&yp, &bytes[..bytes.len() - 5]).unwrap();
    let o = enff_bin(&[
        "assimilate",
        "--forecast",
        s(&fp),
        "--obs",
        s(&yp),
        "--obs-noise-std",
        "0.5",
        "--filter",
        "etkf",
        "--seed",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Y.npy") && err.contains("truncated"), "{err}");
    assert!(!out.exists());
}

/// Lorenz-96 (F = 8) as a user vector field.
#[derive(Debug)]
struct UserL96(usize);

impl Dynamics for UserL96 {
    fn dim(&self) -> usize {
        self.0
    }
    fn rhs(&self, x: &[f32], dx: &mut [f32]) {
        let d = self.0;
        for k in 0..d {
            dx[k] = (x[(k + 1) % d] - x[(k + d - 2) % d]) * x[(k + d - 1) % d] - x[k] + 8.0;
        }
    }
}

/// A twin experiment driven through the builder: truth advanced by the built-in model,
/// observations of every other component, analyses by the given builder.
fn twin(builder: enff::AssimilatorBuilder, d: usize, cycles: usize) -> (f64, f64) {
    let cpu = Cpu::new();
    let model = Model::new(
        System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
        0.01,
        Scheme::Rk4ThreeEighths,
    )
    .unwrap();
    let mut truth = cpu_vec(&cpu, &model, normal(1, d, 9, 3.0, 1.0), 500);
    let n = 25;
    // A cold start: members drawn around the climatology, not around the truth.
    let init = normal(n, d, 10, 2.0, 3.0);
    let mut da = builder
        .initial_ensemble(Ensemble::from_vec(n, d, init).unwrap())
        .build(&cpu)
        .unwrap();
    let first = da.stats(&truth).unwrap().rmse;
    let mut last = 0.0;
    for k in 0..cycles {
        truth = cpu_vec(&cpu, &model, truth, 5);
        da.forecast().unwrap();
        let noise = normal(1, da.m(), 100 + k as u64, 0.0, 0.5);
        let y: Vec<f32> = da
            .observe(&truth)
            .unwrap()
            .iter()
            .zip(&noise)
            .map(|(a, b)| a + b)
            .collect();
        da.analyse(&y).unwrap();
        last = da.stats(&truth).unwrap().rmse;
    }
    (first, last)
}

fn cpu_vec(cpu: &Cpu, model: &Model, x: Vec<f32>, steps: usize) -> Vec<f32> {
    use enff::backend::Backend;
    let mut b = cpu.upload(1, x.len(), &x).unwrap();
    cpu.advance(model, &mut b, steps).unwrap();
    cpu.read(&b).unwrap()
}

fn the_builder_tracks_a_truth_with_a_user_model() {
    let d = 20;
    let base = || {
        Assimilator::builder()
            .filter("etkf")
            .set("filter.inflation=1.05")
            .operator(Observe::identity().subsample(2, 0).unwrap())
            .obs_noise_std(0.5)
            .seed(3)
    };
    // The same dynamics three ways: a user vector field, a closure, the built-in model.
    let (first, by_dynamics) = twin(base().dynamics(UserL96(d), 0.01, 5), d, 30);
    let builtin = Model::new(
        System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
        0.01,
        Scheme::Rk4ThreeEighths,
    )
    .unwrap();
    let stepper = Arc::new(builtin.clone());
    let (_, by_closure) = twin(
        base().forecast_fn(move |x: &mut [f32]| {
            let v = cpu_vec(&Cpu::new(), &stepper, x.to_vec(), 5);
            x.copy_from_slice(&v);
        }),
        d,
        30,
    );
    let (_, by_model) = twin(base().model(builtin, 5), d, 30);
    assert!(first > 1.5, "initial rmse {first}");
    for (what, r) in [
        ("dynamics", by_dynamics),
        ("closure", by_closure),
        ("model", by_model),
    ] {
        assert!(r < 0.5 * first && r < 0.6, "{what}: rmse {first} -> {r}");
    }
    // Closure and built-in model run the same arithmetic: identical analyses.
    assert_eq!(by_closure.to_bits(), by_model.to_bits());
}

fn the_builder_refuses_bad_input_with_typed_errors() {
    let cpu = Cpu::new();
    let ens = Ensemble::from_vec(4, 3, normal(4, 3, 1, 0.0, 1.0)).unwrap();
    let b = || {
        Assimilator::builder()
            .obs_noise_std(0.1)
            .initial_ensemble(ens.clone())
    };
    assert!(matches!(
        b().filter("nope").build(&cpu),
        Err(Error::UnknownFilter { .. })
    ));
    assert!(matches!(
        b().filter("kf").build(&cpu),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        b().set("experiment.cycles=3").build(&cpu),
        Err(Error::UnknownSetting { .. })
    ));
    assert!(matches!(
        b().set("filter.sigma_min=-1").build(&cpu),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        b().obs_noise_std(0.0).build(&cpu),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        Assimilator::builder().obs_noise_std(0.1).build(&cpu),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        b().dynamics(UserL96(5), 0.01, 1).build(&cpu),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut da = b().build(&cpu).unwrap();
    assert!(matches!(
        da.analyse(&[0.0; 2]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        da.analyse(&[0.0, f32::NAN, 0.0]),
        Err(Error::NonFinite { .. })
    ));
    // No model: forecasts come from outside.
    assert!(matches!(da.forecast(), Err(Error::InvalidParameter { .. })));
    let wrong = Ensemble::zeros(5, 3).unwrap();
    assert!(matches!(
        da.set_ensemble(&wrong),
        Err(Error::ShapeMismatch { .. })
    ));
    da.set_ensemble(&ens).unwrap();
    da.analyse(&[0.1, 0.2, 0.3]).unwrap();
    assert_eq!(da.cycle(), 2);
}

// ---- On the GPU, against the CPU ----
// The Assimilator, `assimilate` and the run recorder on the GPU agree with the CPU.
#[derive(Debug)]
struct Decay;

impl Dynamics for Decay {
    fn dim(&self) -> usize {
        13
    }
    fn rhs(&self, x: &[f32], dx: &mut [f32]) {
        for (k, (a, b)) in x.iter().zip(dx.iter_mut()).enumerate() {
            *b = -0.5 * a + 0.1 * (k as f32).sin();
        }
    }
}

fn one_analysis_on_the_gpu_matches_the_cpu() {
    let Some((_guard, gpu)) = common::gpu() else {
        return;
    };
    let (n, d) = (7, 45);
    let f = Ensemble::from_vec(n, d, normal(n, d, 1, 0.5, 1.5)).unwrap();
    let p = Ensemble::from_vec(n, d, normal(n, d, 2, 0.0, 1.5)).unwrap();
    for (filter, op, every) in [
        ("enff-f2p", Pointwise::Arctan, 3),
        ("etkf", Pointwise::Identity, 1),
    ] {
        let mut spec = AnalysisSpec::new(filter, 0.3, 9);
        spec.operator = op;
        spec.obs_every = every;
        spec.sets = vec!["filter.flow_steps=4".into()];
        let m = spec.observation_operator().unwrap().obs_dim(d).unwrap();
        let y = normal(1, m, 3, 0.2, 0.4);
        let cpu = assimilate(&Cpu::new(), &f, Some(&p), &y, &spec).unwrap();
        let g = assimilate(gpu, &f, Some(&p), &y, &spec).unwrap();
        common::assert_close(g.as_slice(), cpu.as_slice(), 1e-4, 1e-3, filter);
    }
}

fn user_models_run_on_the_host_and_user_operators_are_refused() {
    let Some((_guard, gpu)) = common::gpu() else {
        return;
    };
    let d = 13;
    let init = Ensemble::from_vec(5, d, normal(5, d, 4, 1.0, 1.0)).unwrap();
    let build = |b: enff::AssimilatorBuilder| {
        b.filter("etkf")
            .obs_noise_std(0.2)
            .initial_ensemble(init.clone())
            .dynamics(Decay, 0.05, 4)
    };
    let cpu = Cpu::new();
    let mut on_cpu = build(Assimilator::builder()).build(&cpu).unwrap();
    let mut on_gpu = build(Assimilator::builder()).build(gpu).unwrap();
    let y = normal(1, d, 5, 0.0, 0.2);
    on_cpu.forecast().unwrap();
    on_gpu.forecast().unwrap();
    // The forecast is the same host integration on both.
    assert_eq!(
        on_cpu.ensemble().unwrap().as_slice(),
        on_gpu.ensemble().unwrap().as_slice()
    );
    on_cpu.analyse(&y).unwrap();
    on_gpu.analyse(&y).unwrap();
    common::assert_close(
        on_gpu.ensemble().unwrap().as_slice(),
        on_cpu.ensemble().unwrap().as_slice(),
        1e-4,
        1e-3,
        "etkf after a host forecast",
    );

    #[derive(Debug)]
    struct Mine;
    impl ObservationOperator for Mine {
        fn name(&self) -> String {
            "mine".into()
        }
        fn obs_dim(&self, d: usize) -> enff::Result<usize> {
            Ok(d)
        }
        fn apply(&self, x: &[f32], y: &mut [f32]) {
            y.copy_from_slice(x);
        }
        fn adjoint(&self, _x: &[f32], r: &[f32], out: &mut [f32]) {
            out.copy_from_slice(r);
        }
    }
    let r = Assimilator::builder()
        .operator(Mine)
        .obs_noise_std(0.2)
        .initial_ensemble(init.clone())
        .build(gpu);
    assert!(matches!(r, Err(Error::Unsupported { .. })));
    let _ = Observe::identity();
}

fn the_recorder_keeps_the_same_fields_on_the_gpu() {
    let Some((_guard, gpu)) = common::gpu() else {
        return;
    };
    let p = preset("lorenz96_sakov2008").unwrap();
    let mut cfg = p.config.clone();
    for s in [
        "model.d=61",
        "experiment.cycles=3",
        "experiment.burn_in=0",
        "experiment.spinup=20",
        "filter.flow_steps=3",
    ] {
        cfg.set(s).unwrap();
    }
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    let options = TraceOptions {
        max_components: 20,
        ..TraceOptions::default()
    };
    let mut rc = Recorder::<Cpu>::new(exp.config(), options.clone()).unwrap();
    exp.run_observed(&Cpu::new(), |_| {}, |s| rc.observe(s))
        .unwrap();
    let mut rg = Recorder::new(exp.config(), options).unwrap();
    exp.run_observed(gpu, |_| {}, |s| rg.observe(s)).unwrap();
    let (hc, hg) = (
        rc.finish().hovmoller.unwrap(),
        rg.finish().hovmoller.unwrap(),
    );
    assert_eq!(hc.components, hg.components);
    assert_eq!(hc.components.len(), 16); // every 4th of 61
    common::assert_close(&hg.truth, &hc.truth, 1e-3, 1e-3, "truth");
    common::assert_close(&hg.mean, &hc.mean, 1e-2, 1e-2, "analysis mean");
}

test_main!(
    cpu: [the_command_equals_the_library_call_bit_for_bit, float64_files_give_the_same_analysis_and_a_float64_output, localizing_filters_localize_on_a_ring_of_the_forecasts_components, a_state_without_spatial_structure_gets_global_gains_and_refuses_localization, shapes_that_disagree_are_typed_errors, the_command_reports_bad_files_and_leaves_no_output, the_builder_tracks_a_truth_with_a_user_model, the_builder_refuses_bad_input_with_typed_errors],
    gpu: [one_analysis_on_the_gpu_matches_the_cpu, user_models_run_on_the_host_and_user_operators_are_refused, the_recorder_keeps_the_same_fields_on_the_gpu],
);
