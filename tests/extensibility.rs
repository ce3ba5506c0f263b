//! User-defined observation operators and models run through the same filter and backend, and
//! a diverging run is reported with its cycle and stage.

use std::sync::Arc;

use enff::backend::{cpu::Cpu, Backend};
use enff::experiment::{preset, Experiment};
use enff::filter::{Enff, EnffConfig, Filter, Observation};
use enff::model::{Dynamics, Lorenz96, Model, Scheme, System};
use enff::observe::{ObservationOperator, Observe};
use enff::rng::{NoiseKey, Stream};
use enff::Error;

/// Arctan of every 3rd component, written as a user operator (no fused-kernel description).
#[derive(Debug)]
struct UserArctanEvery3;

impl ObservationOperator for UserArctanEvery3 {
    fn name(&self) -> String {
        "user arctan every 3".into()
    }
    fn obs_dim(&self, d: usize) -> enff::Result<usize> {
        Ok(d.div_ceil(3))
    }
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        for (k, yk) in y.iter_mut().enumerate() {
            *yk = x[3 * k].atan();
        }
    }
    fn adjoint(&self, x: &[f32], r: &[f32], out: &mut [f32]) {
        out.iter_mut().for_each(|v| *v = 0.0);
        for (k, &rk) in r.iter().enumerate() {
            let xv = x[3 * k];
            out[3 * k] = rk / (1.0 + xv * xv);
        }
    }
}

fn random(
    cpu: &Cpu,
    n: usize,
    d: usize,
    stream: Stream,
    scale: f32,
) -> enff::backend::cpu::CpuBuffer {
    let mut b = cpu.zeros(n, d).unwrap();
    cpu.fill_normal(&mut b, NoiseKey::new(11, stream, 0), None, scale)
        .unwrap();
    b
}

#[test]
fn user_operator_gives_the_same_analysis_as_the_fused_builtin() {
    let cpu = Cpu::new();
    let (n, d) = (7, 301);
    let forecast = random(&cpu, n, d, Stream::User, 1.0);
    let previous = random(&cpu, n, d, Stream::Filter, 1.0);
    let builtin = Observe::arctan().subsample(3, 0).unwrap();
    let user = UserArctanEvery3;
    assert_eq!(builtin.obs_dim(d).unwrap(), user.obs_dim(d).unwrap());
    let m = user.obs_dim(d).unwrap();
    let y = random(&cpu, 1, m, Stream::Observation, 0.5);
    for integrator in [enff::flow::Integrator::Euler, enff::flow::Integrator::Heun] {
        let mut outs = Vec::new();
        for op in [&builtin as &dyn ObservationOperator, &user] {
            let mut ens = forecast.clone();
            let obs = Observation {
                y: &y,
                operator: op,
                noise_std: 0.2,
            };
            let mut cfg = EnffConfig::f2p(0.3, 0.05, 5);
            cfg.integrator = integrator;
            let mut f = Enff::<Cpu>::new(cfg).unwrap();
            f.analyse(&cpu, &mut ens, Some(&previous), &obs, 2).unwrap();
            outs.push(cpu.read(&ens).unwrap());
        }
        let max = outs[0]
            .iter()
            .zip(&outs[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max < 1e-5,
            "{integrator:?}: user vs builtin differ by {max}"
        );
        // Guidance really acted: the analysis differs from the unguided one.
        let mut ens = forecast.clone();
        let obs = Observation {
            y: &y,
            operator: &user,
            noise_std: 0.2,
        };
        let mut f = Enff::<Cpu>::new(EnffConfig::f2p(0.3, 0.0, 5)).unwrap();
        f.analyse(&cpu, &mut ens, Some(&previous), &obs, 2).unwrap();
        let unguided = cpu.read(&ens).unwrap();
        let moved = outs[1]
            .iter()
            .zip(&unguided)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 1e-3, "guidance had no effect ({moved})");
    }
}

/// Lorenz-96 written as a user vector field.
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

#[test]
fn user_model_matches_the_builtin_lorenz96() {
    let cpu = Cpu::new();
    let d = 37;
    let builtin = Model::new(
        System::Lorenz96(Lorenz96::new(d, 8.0).unwrap()),
        0.01,
        Scheme::Rk4ThreeEighths,
    )
    .unwrap();
    let user = Model::new(
        System::Custom(Arc::new(UserL96(d))),
        0.01,
        Scheme::Rk4ThreeEighths,
    )
    .unwrap();
    let mut a = random(&cpu, 3, d, Stream::Truth, 3.0);
    let mut b = a.clone();
    cpu.advance(&builtin, &mut a, 50).unwrap();
    cpu.advance(&user, &mut b, 50).unwrap();
    let (a, b) = (cpu.read(&a).unwrap(), cpu.read(&b).unwrap());
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max < 1e-4,
        "user and builtin Lorenz-96 differ by {max} after 50 steps"
    );
}

#[test]
fn a_diverging_run_reports_the_cycle_and_stage() {
    // dt = 0.5 makes RK4 on Lorenz-96 blow up within a few steps.
    let p = preset("lorenz96_sakov2008").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("model.dt=0.5").unwrap();
    cfg.set("experiment.spinup=0").unwrap();
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    match exp.run(&Cpu::new(), |_| {}) {
        Err(Error::Diverged { cycle, stage, .. }) => {
            assert!(cycle >= 1, "cycle {cycle}");
            assert!(
                ["forecast", "analysis", "truth spin-up"].contains(&stage.as_str()),
                "{stage}"
            );
        }
        Err(other) => panic!("expected a divergence error, got {other}"),
        Ok(r) => panic!("expected divergence, got rmse {}", r.summary.rmse_mean),
    }
}
