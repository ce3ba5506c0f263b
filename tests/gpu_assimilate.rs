//! The Assimilator, `assimilate` and the run recorder on the GPU agree with the CPU.

mod common;

use enff::backend::cpu::Cpu;
use enff::experiment::assimilate::{assimilate, AnalysisSpec};
use enff::experiment::trace::{Recorder, TraceOptions};
use enff::experiment::{preset, Experiment};
use enff::model::Dynamics;
use enff::observe::{ObservationOperator, Observe, Pointwise};
use enff::rng::{fill_normal_row, NoiseKey, Stream};
use enff::{Assimilator, Ensemble, Error};

fn normal(n: usize, d: usize, seed: u64, mean: f32, scale: f32) -> Vec<f32> {
    let key = NoiseKey::new(seed, Stream::User, 0);
    let mut out = vec![0.0f32; n * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        fill_normal_row(&key, i as u32, row);
    }
    out.iter_mut().for_each(|v| *v = mean + scale * *v);
    out
}

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
    cpu: [],
    gpu: [one_analysis_on_the_gpu_matches_the_cpu, user_models_run_on_the_host_and_user_operators_are_refused, the_recorder_keeps_the_same_fields_on_the_gpu],
);
