//! Property tests (proptest): every kernel on random shapes and values, CPU against GPU; the
//! `--set` parser and the TOML experiment files on arbitrary text (never a panic, always
//! either a value or a typed error) and on random valid values (exact round trips).

mod common;

use common::{gpu, host_random};
use enff::backend::cpu::Cpu;
use enff::backend::{Backend, FlowUpdate, Guidance};
use enff::experiment::{file, preset, Config, PRESETS};
use enff::flow::{Path, PathKind};
use enff::observe::{Observe, Pointwise};
use proptest::prelude::*;

fn close(a: &[f32], b: &[f32], atol: f32, rtol: f32) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "element {}: gpu {} cpu {}",
            i,
            x,
            y
        );
    }
    Ok(())
}

fn pointwise() -> impl Strategy<Value = Pointwise> {
    prop_oneof![
        Just(Pointwise::Identity),
        Just(Pointwise::Arctan),
        Just(Pointwise::Tanh)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, ..ProptestConfig::default() })]

    /// One guided flow step (distances → softmax → velocity + guidance update) and the
    /// ensemble statistics, CPU against GPU, on random sizes, paths and operators.
    #[test]
    fn a_guided_flow_step_agrees_on_both_backends(
        n in 1usize..40,
        d in 1usize..700,
        seed in 0u64..1_000_000,
        t in 0.0f32..0.95,
        f2p in any::<bool>(),
        op in pointwise(),
        every in 1usize..4,
        scale in 0.0f32..2.0,
    ) {
        let Some((_lock, g)) = gpu() else { return Ok(()) };
        let cpu = Cpu::new();
        let path = if f2p {
            Path::new(PathKind::F2p, 0.2).unwrap().at(t)
        } else {
            Path::new(PathKind::Ot, 0.1).unwrap().at(t)
        };
        let every = every.min(d);
        let operator = Observe { pointwise: op, every, offset: 0 };
        let m = d.div_ceil(every);
        let (x, tg, src) = (
            host_random(n, d, seed, 1.0),
            host_random(n, d, seed + 1, 1.0),
            host_random(n, d, seed + 2, 1.0),
        );
        let y = host_random(1, m, seed + 3, 0.5);
        let up_c = |r, c, v: &Vec<f32>| cpu.upload(r, c, v).unwrap();
        let up_g = |r, c, v: &Vec<f32>| g.upload(r, c, v).unwrap();
        let (xc, tc, sc, yc) = (up_c(n, d, &x), up_c(n, d, &tg), up_c(n, d, &src), up_c(1, m, &y));
        let (xg, tgg, sg, yg) = (up_g(n, d, &x), up_g(n, d, &tg), up_g(n, d, &src), up_g(1, m, &y));
        let source_c = f2p.then_some(&sc);
        let source_g = f2p.then_some(&sg);
        let (mut wc, mut wg) = (cpu.zeros(n, n).unwrap(), g.zeros(n, n).unwrap());
        cpu.flow_logits(&xc, &tc, source_c, path, None, &mut wc).unwrap();
        g.flow_logits(&xg, &tgg, source_g, path, None, &mut wg).unwrap();
        // Logits: f32 sums of d squares, compared relative to their scale.
        let (lcv, lgv) = (cpu.read(&wc).unwrap(), g.read(&wg).unwrap());
        let big = lcv.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        close(&lgv, &lcv, 2e-6 * big, 1e-5)?;
        // Softmax of the *same* logits on both backends.
        let mut wg = g.upload(n, n, &lcv).unwrap();
        cpu.softmax_rows(&mut wc).unwrap();
        g.softmax_rows(&mut wg).unwrap();
        let (wcv, wgv) = (cpu.read(&wc).unwrap(), g.read(&wg).unwrap());
        close(&wgv, &wcv, 1e-5, 1e-4)?;
        // The update from the *same* weights, so that only the update kernel is compared.
        let wshared_g = g.upload(n, n, &wcv).unwrap();
        let (mut xc2, mut xg2) = (up_c(n, d, &x), up_g(n, d, &x));
        let upd_c = FlowUpdate {
            eval: None,
            weights: &wc,
            target: &tc,
            source: source_c,
            path,
            guidance: Some(Guidance { operator: &operator, y: &yc, scale, horizon: 1.0 - t }),
            h_new: 0.05,
            previous: None,
            clamp: None,
        };
        let upd_g = FlowUpdate {
            eval: None,
            weights: &wshared_g,
            target: &tgg,
            source: source_g,
            path,
            guidance: Some(Guidance { operator: &operator, y: &yg, scale, horizon: 1.0 - t }),
            h_new: 0.05,
            previous: None,
            clamp: None,
        };
        cpu.flow_update(&mut xc2, &upd_c, None).unwrap();
        g.flow_update(&mut xg2, &upd_g, None).unwrap();
        close(&g.read(&xg2).unwrap(), &cpu.read(&xc2).unwrap(), 2e-4, 2e-4)?;
        // Observation operator and statistics.
        let (mut hc, mut hg) = (cpu.zeros(n, m).unwrap(), g.zeros(n, m).unwrap());
        cpu.observe(&operator, &xc, &mut hc).unwrap();
        g.observe(&operator, &xg, &mut hg).unwrap();
        close(&g.read(&hg).unwrap(), &cpu.read(&hc).unwrap(), 1e-5, 1e-5)?;
        let truth = host_random(1, d, seed + 4, 1.0);
        let sc_ = cpu.ensemble_stats(&xc, &up_c(1, d, &truth)).unwrap();
        let sg_ = g.ensemble_stats(&xg, &up_g(1, d, &truth)).unwrap();
        prop_assert!((sc_.rmse - sg_.rmse).abs() <= 1e-4 * (1.0 + sc_.rmse));
        if n > 1 {
            prop_assert!((sc_.spread - sg_.spread).abs() <= 1e-4 * (1.0 + sc_.spread));
        }
    }

    /// Inflation about the mean, CPU against GPU.
    #[test]
    fn inflation_agrees_on_both_backends(
        n in 1usize..50, d in 1usize..900, seed in 0u64..1_000_000, r in 0.5f32..2.0
    ) {
        let Some((_lock, g)) = gpu() else { return Ok(()) };
        let cpu = Cpu::new();
        let x = host_random(n, d, seed, 3.0);
        let mut xc = cpu.upload(n, d, &x).unwrap();
        let mut xg = g.upload(n, d, &x).unwrap();
        cpu.inflate(&mut xc, r).unwrap();
        g.inflate(&mut xg, r).unwrap();
        close(&g.read(&xg).unwrap(), &cpu.read(&xc).unwrap(), 1e-4, 1e-4)?;
    }
}

fn base() -> Config {
    preset("lorenz96_sakov2008").unwrap().config
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary `--set` text never panics: it sets a value or returns a typed error.
    #[test]
    fn set_parser_never_panics(text in "\\PC{0,60}") {
        let mut c = base();
        let _ = c.set(&text);
    }

    /// `section.key=garbage` for every real key: an error naming the key, or a valid value.
    #[test]
    fn set_errors_name_the_key(key in prop::sample::select(vec![
        "ensemble.n", "model.d", "model.dt", "filter.sigma_min", "filter.flow_steps",
        "observe.noise_std", "experiment.cycles", "filter.kind", "filter.integrator",
    ]), value in "[a-z#%@!]{1,8}") {
        let mut c = base();
        if let Err(e) = c.set(&format!("{key}={value}")) {
            prop_assert!(e.to_string().contains(key), "{}", e);
        }
    }

    /// Numbers round-trip exactly through `--set`.
    #[test]
    fn set_numbers_round_trip(n in 2usize..5000, s in 1e-4f32..10.0, steps in 1usize..200) {
        let mut c = base();
        c.set(&format!("ensemble.n={n}")).unwrap();
        c.set(&format!("filter.sigma_min={s}")).unwrap();
        c.set(&format!("filter.flow_steps={steps}")).unwrap();
        prop_assert_eq!(c.ensemble.n, n);
        prop_assert_eq!(c.filter.sigma_min, s);
        prop_assert_eq!(c.filter.flow_steps, steps);
    }

    /// Arbitrary text as an experiment file never panics.
    #[test]
    fn toml_parser_never_panics(text in "\\PC{0,200}") {
        let _ = file::parse_toml(&text, "fuzz.toml");
    }

    /// Any preset with random settings survives the TOML round trip exactly.
    #[test]
    fn toml_round_trips_random_configs(
        which in 0usize..PRESETS.len(),
        n in 2usize..300,
        s in 1e-4f32..1.0,
        lambda in 0.0f32..3.0,
        seed in any::<u64>(),
    ) {
        let mut c = preset(PRESETS[which]).unwrap().config;
        c.ensemble.n = n;
        c.filter.sigma_min = s;
        c.filter.guidance_scale = lambda;
        c.experiment.seed = seed;
        let text = file::to_toml("p", "property test", &c).unwrap();
        let back = file::parse_toml(&text, "p.toml").unwrap();
        prop_assert_eq!(back.config, c);
    }
}
