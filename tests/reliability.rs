//! Reliability: checkpoint and resume, divergence reporting and recording, injected device
//! faults, and two experiments sharing one GPU.

mod common;

use enff::backend::cpu::Cpu;
use enff::backend::Backend;
use enff::experiment::{
    preset, Checkpoint, CycleMetrics, Experiment, Fault, FaultStage, OnDivergence, RunOptions,
};
use enff::Error;

fn small(name: &str, sets: &[&str]) -> Experiment {
    let p = preset(name).unwrap();
    let mut cfg = p.config.clone();
    for s in sets {
        cfg.set(s).unwrap();
    }
    Experiment::new(p.name, cfg, None).unwrap()
}

/// Lorenz-96 with 40 variables, EnFF-F2P (needs the previous analysis), 24 cycles.
fn l96(sets: &[&str]) -> Experiment {
    let mut all = vec![
        "experiment.cycles=24",
        "experiment.burn_in=4",
        "ensemble.n=12",
        "filter.kind=enff-f2p",
    ];
    all.extend_from_slice(sets);
    small("lorenz96_sakov2008", &all)
}

/// The metric columns that must be identical between an interrupted-and-resumed run and an
/// uninterrupted one (the wall times differ).
fn skill(rows: &[CycleMetrics]) -> Vec<[f64; 5]> {
    rows.iter()
        .map(|r| [r.time, r.rmse_forecast, r.spread_forecast, r.rmse, r.spread])
        .collect()
}

fn abort_then_resume<B: Backend + 'static>(backend: &B, exp: &Experiment, abort_after: usize) {
    let whole = exp.run(backend, |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        checkpoint_every: 5,
        checkpoint_dir: Some(dir.path().to_path_buf()),
        stream_metrics: Some(dir.path().to_path_buf()),
        fault: Some(Fault::AbortAfter(abort_after)),
        ..Default::default()
    };
    match exp.run_with(backend, &opts, |_| {}) {
        Err(Error::Interrupted { cycle, checkpoint }) => {
            assert_eq!(cycle, abort_after);
            assert!(checkpoint.is_some());
        }
        other => panic!(
            "expected an interruption, got {:?}",
            other.map(|r| r.summary)
        ),
    }
    // The killed run kept the line of every cycle it finished, past its last checkpoint too.
    assert_eq!(
        streamed_cycles(dir.path()),
        (1..=abort_after).collect::<Vec<_>>()
    );
    let ck = Checkpoint::read(dir.path()).unwrap();
    assert_eq!(ck.header.cycle, abort_after / 5 * 5, "last due checkpoint");
    assert_eq!(ck.header.metrics.len(), ck.header.cycle);
    let resumed = exp
        .run_with(
            backend,
            &RunOptions {
                checkpoint_every: 5,
                checkpoint_dir: Some(dir.path().to_path_buf()),
                resume: Some(ck),
                stream_metrics: Some(dir.path().to_path_buf()),
                ..Default::default()
            },
            |_| {},
        )
        .unwrap();
    // The resumed run continues the file from the checkpoint: every cycle once, in order.
    let cycles = exp.config().experiment.cycles;
    assert_eq!(
        streamed_cycles(dir.path()),
        (1..=cycles).collect::<Vec<_>>()
    );
    assert_eq!(skill(&resumed.metrics), skill(&whole.metrics));
    assert_eq!(resumed.summary.rmse_mean, whole.summary.rmse_mean);
    assert_eq!(resumed.summary.resumed_from, Some(abort_after / 5 * 5));
}

/// The cycle column of `DIR/metrics.csv`.
fn streamed_cycles(dir: &std::path::Path) -> Vec<usize> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("cycle,time,"), "{text}");
    lines
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn metrics_are_streamed_one_line_per_finished_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let exp = l96(&["experiment.cycles=6"]);
    let opts = RunOptions {
        stream_metrics: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let report = exp
        .run_with(&Cpu::new(), &opts, |m| {
            // When a cycle's metrics are handed out, the lines before it are on disk already.
            seen.push(streamed_cycles(dir.path()).len() + 1 == m.cycle);
        })
        .unwrap();
    assert_eq!(seen, vec![true; 6]);
    assert_eq!(streamed_cycles(dir.path()), (1..=6).collect::<Vec<_>>());
    // The streamed file is the one a finished run writes.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap(),
        enff::experiment::output::metrics_csv(&report)
    );
}

#[test]
fn interrupted_run_resumes_to_identical_metrics_on_the_cpu() {
    abort_then_resume(&Cpu::new(), &l96(&[]), 13);
    // Heun integration and the OT path as well.
    abort_then_resume(
        &Cpu::new(),
        &l96(&["filter.kind=enff-ot", "filter.integrator=heun"]),
        7,
    );
    // The Kalman filter carries its covariance in the checkpoint.
    abort_then_resume(
        &Cpu::new(),
        &small(
            "rotation2d",
            &[
                "experiment.cycles=12",
                "experiment.burn_in=1",
                "filter.kind=kf",
                "ensemble.n=1",
            ],
        ),
        6,
    );
    // A stateless baseline with random perturbations keyed by the cycle.
    abort_then_resume(&Cpu::new(), &l96(&["filter.kind=enkf"]), 11);
}

#[test]
fn interrupted_run_resumes_to_identical_metrics_on_the_gpu() {
    let Some((_lock, g)) = common::gpu() else {
        return;
    };
    abort_then_resume(g, &l96(&["experiment.cycles=12", "ensemble.n=7"]), 6);
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_refused_with_the_reason() {
    let exp = l96(&["experiment.cycles=6"]);
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        checkpoint_every: 3,
        checkpoint_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    exp.run_with(&Cpu::new(), &opts, |_| {}).unwrap();
    let file = Checkpoint::path_in(dir.path());
    let good = std::fs::read(&file).unwrap();
    let ck = Checkpoint::from_bytes(&good, &file).unwrap();
    assert_eq!(ck.header.cycle, 6);

    let message = |r: enff::Result<Checkpoint>| match r {
        Err(e @ Error::InvalidParameter { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // One flipped bit, a truncation, another file type.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    assert!(message(Checkpoint::from_bytes(&flipped, &file)).contains("checksum"));
    assert!(message(Checkpoint::from_bytes(&good[..good.len() - 100], &file)).contains("checksum"));
    assert!(message(Checkpoint::from_bytes(
        b"not a checkpoint at all, no",
        &file
    ))
    .contains("not an enff checkpoint"));

    // Another configuration: the differing key is named.
    let other = l96(&["experiment.cycles=6", "experiment.seed=99"]);
    let e = ck.check_compatible(other.config()).unwrap_err().to_string();
    assert!(e.contains("experiment.seed"), "{e}");
    let refused = other.run_with(
        &Cpu::new(),
        &RunOptions {
            resume: Some(ck.clone()),
            ..Default::default()
        },
        |_| {},
    );
    assert!(matches!(refused, Err(Error::InvalidParameter { .. })));

    // Another version of enff.
    let mut old = ck.clone();
    old.header.enff_version = "0.0.1".into();
    let bytes = old.to_bytes().unwrap();
    let reread = Checkpoint::from_bytes(&bytes, &file).unwrap();
    let e = reread
        .check_compatible(exp.config())
        .unwrap_err()
        .to_string();
    assert!(e.contains("0.0.1"), "{e}");
}

fn diverged(r: enff::Result<enff::experiment::Report>) -> (usize, String) {
    match r.as_ref().map_err(|e| e.root()) {
        Err(Error::Diverged { cycle, stage, .. }) => (*cycle, stage.clone()),
        Err(other) => panic!("expected a divergence, got {other}"),
        Ok(rep) => panic!("expected a divergence, got {:?}", rep.summary.rmse_mean),
    }
}

fn inject(stage: FaultStage, cycle: usize) -> RunOptions {
    RunOptions {
        fault: Some(Fault::NonFinite { cycle, stage }),
        ..Default::default()
    }
}

fn check_stages<B: Backend + 'static>(backend: &B) {
    let exp = l96(&["experiment.cycles=8", "filter.flow_steps=5"]);
    let run = |o: RunOptions| exp.run_with(backend, &o, |_| {});
    assert_eq!(
        diverged(run(inject(FaultStage::Forecast, 4))),
        (4, "forecast".to_string())
    );
    assert_eq!(
        diverged(run(inject(FaultStage::FlowStep(3), 2))),
        (2, "analysis, flow step 3 of 5: weights".to_string())
    );
    assert_eq!(
        diverged(run(inject(FaultStage::Guidance, 5))),
        (5, "analysis, flow step 1 of 5: guidance".to_string())
    );
    assert_eq!(
        diverged(run(inject(FaultStage::Metrics, 3))),
        (3, "metrics".to_string())
    );
}

#[test]
fn injected_non_finite_values_are_reported_with_their_stage() {
    check_stages(&Cpu::new());
}

#[test]
fn injected_non_finite_values_are_reported_with_their_stage_on_the_gpu() {
    let Some((_lock, g)) = common::gpu() else {
        return;
    };
    check_stages(g);
}

#[test]
fn record_mode_logs_the_divergence_and_keeps_cycling() {
    let exp = l96(&["experiment.cycles=12"]);
    for (stage, want) in [
        (FaultStage::Forecast, "forecast"),
        (FaultStage::FlowStep(2), "analysis, flow step 2 of"),
    ] {
        let opts = RunOptions {
            on_divergence: OnDivergence::Record,
            ..inject(stage, 6)
        };
        let rep = exp.run_with(&Cpu::new(), &opts, |_| {}).unwrap();
        assert_eq!(rep.metrics.len(), 12);
        let events = &rep.summary.divergences;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].cycle, 6);
        assert!(events[0].stage.starts_with(want), "{events:?}");
        // The recovered run goes on with finite metrics, and the means skip cycle 6.
        assert!(rep.metrics[6..].iter().all(|r| r.rmse.is_finite()));
        assert!(rep.summary.rmse_mean.is_finite());
    }
}

#[test]
fn device_faults_keep_the_checkpoint_and_say_how_to_resume() {
    let exp = l96(&["experiment.cycles=10"]);
    for fault in [Fault::DeviceLost(8), Fault::OutOfMemory(8)] {
        let dir = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            checkpoint_every: 3,
            checkpoint_dir: Some(dir.path().to_path_buf()),
            fault: Some(fault),
            ..Default::default()
        };
        let e = exp.run_with(&Cpu::new(), &opts, |_| {}).unwrap_err();
        match &e {
            Error::Resumable { cycle, .. } => assert_eq!(*cycle, 6),
            other => panic!("expected a resumable error, got {other}"),
        }
        assert!(e.to_string().contains("--resume"), "{e}");
        let ck = Checkpoint::read(dir.path()).unwrap();
        assert_eq!(ck.header.cycle, 6);
    }
}

#[test]
fn a_lost_gpu_leaves_the_checkpoint_and_suggests_the_cpu() {
    // A device of its own: losing it must not disturb the other tests' shared one.
    let Some(g) = common::gpu_split(u64::MAX / 2) else {
        return;
    };
    let exp = l96(&["experiment.cycles=8", "ensemble.n=5"]);
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        checkpoint_every: 2,
        checkpoint_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let e = exp
        .run_with(&g, &opts, |m| {
            if m.cycle == 5 {
                g.simulate_device_loss();
            }
        })
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Resumable { cycle: 4, .. }), "{text}");
    assert!(text.contains("--backend cpu"), "{text}");
    // The checkpoint continues on the CPU.
    let ck = Checkpoint::read(dir.path()).unwrap();
    let rest = exp
        .run_with(
            &Cpu::new(),
            &RunOptions {
                resume: Some(ck),
                ..Default::default()
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(rest.metrics.len(), 8);
    assert!(rest.summary.rmse_mean.is_finite());
}

/// Two experiments driven from two threads through one GPU context give the numbers they
/// give one after the other.
#[test]
fn two_experiments_share_one_gpu_from_two_threads() {
    let Some((_lock, g)) = common::gpu() else {
        return;
    };
    concurrent_equals_sequential(g);
}

#[test]
fn two_experiments_share_one_cpu_backend_from_two_threads() {
    concurrent_equals_sequential(&Cpu::new());
}

fn concurrent_equals_sequential<B: Backend + 'static>(g: &B) {
    let a = l96(&["experiment.cycles=6", "ensemble.n=9"]);
    let b = l96(&["experiment.cycles=6", "ensemble.n=6", "experiment.seed=7"]);
    let alone = (
        a.run(g, |_| {}).unwrap().metrics,
        b.run(g, |_| {}).unwrap().metrics,
    );
    let together = std::thread::scope(|s| {
        let ta = s.spawn(|| a.run(g, |_| {}).unwrap().metrics);
        let tb = s.spawn(|| b.run(g, |_| {}).unwrap().metrics);
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(skill(&together.0), skill(&alone.0));
    assert_eq!(skill(&together.1), skill(&alone.1));
}
