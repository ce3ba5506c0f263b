//! Preset configurations, including the paper's full-size Lorenz-96, validated without running
//! them (parameters, sizes, memory estimate), so CI stays fast.

mod common;

use enff::experiment::{preset, Experiment, PRESETS};
use enff::flow::PathKind;

#[test]
fn every_preset_validates_and_states_its_expected_rmse() {
    for name in PRESETS {
        let p = preset(name).unwrap();
        p.config.validate().unwrap();
        assert!(p.expected_rmse.0 < p.expected_rmse.1, "{name}");
        assert!(
            p.config.experiment.burn_in < p.config.experiment.cycles,
            "{name}"
        );
        assert!(!p.expected_source.is_empty());
    }
}

#[test]
fn full_size_lorenz96_bao2024_matches_the_paper_setting() {
    let p = preset("lorenz96_bao2024").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("model.d=1e6").unwrap();
    cfg.validate().unwrap();
    // ENFF_SPEC §8.3 / §9.4: d = 10⁶, F = 8, dt = 0.01, obs every 10 steps, arctan, σ_y = 0.05,
    // n = 20, cold N(0, 1) start, 1000 spin-up steps, 80 cycles; EnFF-F2P K = 20 grid points
    // (19 flow steps), σ_min = 1e-2, λ = 0.05.
    assert_eq!(cfg.state_dim(), 1_000_000);
    assert_eq!(cfg.model.forcing, 8.0);
    assert_eq!(cfg.model.dt, 0.01);
    assert_eq!(cfg.observe.obs_every, 10);
    assert_eq!(cfg.observe.noise_std, 0.05);
    assert_eq!(cfg.ensemble.n, 20);
    assert_eq!(cfg.experiment.spinup, 1000);
    assert_eq!(cfg.experiment.cycles, 80);
    let enff = cfg.enff_config().unwrap();
    assert_eq!(enff.path, PathKind::F2p);
    assert_eq!(
        (enff.flow_steps, enff.sigma_min, enff.guidance_scale),
        (19, 1e-2, 0.05)
    );
    let exp = Experiment::new(p.name, cfg.clone(), None).unwrap();
    let est = exp.memory_estimate();
    let gib = est.total as f64 / (1u64 << 30) as f64;
    // Seven n·d buffers of 80 MB (ensemble, previous, flow state, four RK stages) + obs.
    assert!((0.5..0.6).contains(&gib), "estimate {gib} GiB");
    // n = 1000 members at d = 10⁶ fit an 80 GB card: about 26 GiB.
    cfg.set("ensemble.n=1000").unwrap();
    let big = Experiment::new(p.name, cfg, None)
        .unwrap()
        .memory_estimate();
    let gib = big.total as f64 / (1u64 << 30) as f64;
    assert!((20.0..40.0).contains(&gib), "n = 1000 estimate {gib} GiB");
}

/// A member larger than the device's largest storage binding is refused before anything is
/// allocated, with the sizes and the run's estimate in the message.
#[test]
fn a_problem_too_large_for_the_device_is_refused_with_the_numbers() {
    // A backend whose largest binding is forced down to 256 KiB, so that the member
    // check (not the device-memory check, which comes first) is what refuses the run.
    let Some(g) = common::gpu_split(256 << 10) else {
        return;
    };
    let g = &g;
    let too_big = g.max_chunk_bytes() / 4 + 1;
    let p = preset("lorenz96_bao2024").unwrap();
    let mut cfg = p.config.clone();
    cfg.set(&format!("model.d={too_big}")).unwrap();
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    let before = g.buffers_allocated();
    match exp.run(g, |_| {}) {
        Err(enff::Error::TooLarge { detail }) => {
            assert!(detail.contains("MiB"), "{detail}");
            assert!(detail.contains("GiB"), "{detail}");
            assert!(detail.contains(&format!("d = {too_big}")), "{detail}");
        }
        other => panic!(
            "expected TooLarge, got {:?}",
            other.map(|r| r.summary.rmse_mean)
        ),
    }
    assert_eq!(g.buffers_allocated(), before, "nothing allocated");
}

/// The run is checked against the device's memory before allocating: n = 1000 at d = 10⁶ is
/// accepted on an 80 GB card and refused on a 16 GB one with the largest n and d that fit.
#[test]
fn memory_check_states_what_would_fit() {
    let p = preset("lorenz96_bao2024").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("model.d=1e6").unwrap();
    cfg.set("ensemble.n=1000").unwrap();
    let exp = Experiment::new(p.name, cfg.clone(), None).unwrap();
    exp.check_memory(80_000_000_000, "gpu").unwrap();
    let capacity = 16u64 << 30;
    let detail = match exp.check_memory(capacity, "gpu") {
        Err(enff::Error::TooLarge { detail }) => detail,
        other => panic!("expected TooLarge, got {other:?}"),
    };
    let number_after = |key: &str| -> usize {
        let at = detail
            .find(key)
            .unwrap_or_else(|| panic!("{key} in {detail}"))
            + key.len();
        detail[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let n_fit = number_after("ensemble.n ≤");
    let d_fit = number_after("model.d ≤");
    assert!(detail.contains("GiB") && detail.contains("gpu"), "{detail}");
    // The stated limits are tight: they fit, one more does not.
    let usable = capacity / 10 * 9;
    let total = |n: usize, d: usize| {
        let mut c = cfg.clone();
        c.ensemble.n = n;
        c.model.d = d;
        Experiment::new(p.name, c, None)
            .unwrap()
            .memory_estimate()
            .total
    };
    assert!(total(n_fit, 1_000_000) <= usable && total(n_fit + 1, 1_000_000) > usable);
    assert!(total(1000, d_fit) <= usable && total(1000, d_fit + 1) > usable);
    assert!((400..700).contains(&n_fit), "n that fits 16 GiB: {n_fit}");
}

/// A CPU run over the backend's memory cap is refused before the first allocation.
#[test]
fn cpu_run_over_its_memory_cap_is_refused_up_front() {
    let p = preset("lorenz96_bao2024").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("model.d=100000").unwrap();
    let exp = Experiment::new(p.name, cfg, None).unwrap();
    let cpu = enff::backend::cpu::Cpu::new().with_memory_limit(32 << 20);
    match exp.run(&cpu, |_| panic!("no cycle may run")) {
        Err(enff::Error::TooLarge { detail }) => {
            assert!(detail.contains("ensemble.n ≤"), "{detail}");
            assert!(detail.contains("cpu"), "{detail}");
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|r| r.summary)),
    }
}

/// Covariance guidance keeps its windows and banded gains on the device: the estimate counts
/// them, (2 + tables) · d · (observations within the taper support) floats (one table per
/// stage when the stages share one linearization, one when re-linearizing), and the scratch of
/// the local gains (the column means and h̄ on the GPU, anomalies and innovations on the CPU).
#[test]
fn memory_estimate_counts_the_covariance_gains() {
    let p = preset("lorenz96_bao2024_covariance").unwrap();
    let mut cfg = p.config.clone();
    cfg.set("model.d=1e6").unwrap();
    let est = Experiment::new(p.name, cfg.clone(), None)
        .unwrap()
        .memory_estimate();
    let gains = est
        .parts
        .iter()
        .find(|(name, _)| name.starts_with("covariance-guidance gains"))
        .map(|(_, b)| *b)
        .expect("gain buffers in the estimate");
    let radius = cfg.filter.loc_radius.unwrap_or(4.0);
    let w = (2.0 * (2.0 * 1.82 * radius).floor() + 1.0) as u64;
    let stages = cfg.filter.gain_stages as u64;
    assert_eq!(gains, (2 + stages) * 4 * 1_000_000 * w);
    let mut relin = cfg.clone();
    relin.set("filter.relinearize=true").unwrap();
    let one = Experiment::new(p.name, relin, None)
        .unwrap()
        .memory_estimate()
        .parts
        .into_iter()
        .find(|(name, _)| name.starts_with("covariance-guidance gains"))
        .map(|(_, b)| b)
        .expect("gain buffers in the estimate");
    assert_eq!(one, 3 * 4 * 1_000_000 * w);
    let scratch = est
        .parts
        .iter()
        .find(|(name, _)| name.starts_with("covariance-guidance scratch"))
        .map(|(_, b)| *b)
        .expect("local-gain scratch in the estimate");
    let (n, d, m) = (cfg.ensemble.n as u64, 1_000_000u64, 1_000_000u64);
    assert_eq!(scratch, 4 * (2 * d + m + n * (d + m)));
    // Plain guidance has none.
    cfg.set("filter.guidance=local").unwrap();
    let plain = Experiment::new(p.name, cfg, None)
        .unwrap()
        .memory_estimate();
    assert!(plain
        .parts
        .iter()
        .all(|(name, _)| !name.starts_with("covariance")));
}

/// Switching the guidance of any EnFF preset brings the new guidance's own defaults for the
/// settings not named, keeps the ones named, and warns about settings the guidance ignores.
#[test]
fn switching_guidance_takes_the_guidance_defaults() {
    use enff::experiment::config::GuidanceDefaults;
    use enff::experiment::Source;
    use enff::flow::GuidanceKind;
    for name in PRESETS {
        let mut src = Source::load(name).unwrap();
        if !src.config.filter_kind().unwrap().is_enff() {
            continue;
        }
        let spatial = src.config.model().unwrap().geometry().is_spatial();
        let before = src.config.filter.guidance;
        let to = if before == GuidanceKind::Covariance {
            "local"
        } else {
            "covariance"
        };
        let warnings = src
            .apply(None, &[format!("filter.guidance={to}")], None)
            .unwrap();
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        let f = &src.config.filter;
        let d = GuidanceDefaults::of(f.guidance);
        assert_eq!(f.guidance_scale, d.guidance_scale, "{name}");
        let adaptive = if spatial { d.adaptive_inflation } else { 1.0 };
        assert_eq!(f.adaptive_inflation, adaptive, "{name}");
        assert_eq!(f.innovation_clip, d.innovation_clip, "{name}");
        assert_eq!(f.gain_stages, d.gain_stages, "{name}");
        assert_eq!(f.loc_radius, d.loc_radius.filter(|_| spatial), "{name}");
        assert_eq!(f.unguided_weights, d.unguided_weights && !spatial, "{name}");
        src.config.validate().unwrap();
    }
    // Named settings are kept; the same guidance as the preset's changes nothing.
    let mut src = Source::load("lorenz96_bao2024").unwrap();
    src.apply(
        None,
        &[
            "filter.guidance_scale=0.7".into(),
            "filter.guidance=covariance".into(),
            "filter.loc_radius=6".into(),
        ],
        None,
    )
    .unwrap();
    assert_eq!(src.config.filter.guidance_scale, 0.7);
    assert_eq!(src.config.filter.loc_radius, Some(6.0));
    assert_eq!(src.config.filter.adaptive_inflation, 1.3);
    // lorenz96_bao2024 switched to covariance guidance is lorenz96_bao2024_covariance.
    let mut a = Source::load("lorenz96_bao2024").unwrap();
    a.apply(None, &["filter.guidance=covariance".into()], None)
        .unwrap();
    let b = Source::load("lorenz96_bao2024_covariance").unwrap();
    assert_eq!(a.config.filter, b.config.filter);
    let mut same = Source::load("lorenz96_sakov2008").unwrap();
    let before = same.config.clone();
    same.apply(None, &["filter.guidance=local".into()], None)
        .unwrap();
    assert_eq!(same.config.filter, before.filter);
    // A covariance-only setting under local guidance draws a warning naming it.
    let mut w = Source::load("lorenz96_sakov2008").unwrap();
    let warnings = w
        .apply(None, &["filter.innovation_clip=3".into()], None)
        .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("filter.innovation_clip"),
        "{warnings:?}"
    );
}
