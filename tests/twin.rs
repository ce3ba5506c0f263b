//! Twin experiments: time-mean RMSE inside a stated band (chaotic runs are compared only by
//! time-averaged RMSE, never trajectory by trajectory).

use enff::backend::cpu::Cpu;
use enff::experiment::{preset, Experiment};

fn run(name: &str, sets: &[&str], seed: u64) -> enff::experiment::Summary {
    let p = preset(name).unwrap();
    let mut cfg = p.config.clone();
    for s in sets {
        cfg.set(s).unwrap();
    }
    cfg.experiment.seed = seed;
    let exp = Experiment::new(p.name, cfg, Some(p.expected_rmse)).unwrap();
    exp.run(&Cpu::new(), |_| {}).unwrap().summary
}

/// The paper's headline setting at reduced dimension. The paper (v2 tables, d = 1e6) reports a
/// time-mean RMSE of 0.1725 for EnFF-F2P with K = 20 grid points, σ_min = 1e-2, λ = 0.05. The
/// RMSE is a per-component average, so d = 1000 (25× the 40-variable correlation scale) gives
/// the same statistics with more sampling noise: over seeds 1-5 enff measures 0.165-0.181. The
/// band 0.15-0.19 is the paper's value ± 12%.
#[test]
fn lorenz96_bao2024_f2p_rmse_matches_the_paper_at_d1000() {
    let s = run("lorenz96_bao2024", &["model.d=1000"], 2_376_999_025);
    assert_eq!((s.n, s.d, s.flow_steps), (20, 1000, 19));
    assert!(
        (0.15..0.19).contains(&s.rmse_mean),
        "time-mean RMSE {} outside 0.15-0.19 (paper 0.1725)",
        s.rmse_mean
    );
    // The cold start N(0, 1) is far from the truth (std 3.6): the filter must have converged.
    assert!(s.rmse_last < 0.25, "last-cycle RMSE {}", s.rmse_last);
}

/// Lorenz-63 with σ_y = 2 every 0.1 time units. An RMSE well below the observation error (2)
/// shows the filter combines forecast and observations; climatological RMSE is about 8. enff
/// measures 1.05-1.19 over seeds 1-5 with 2000 cycles; with 1000 cycles the band is 0.9-1.35.
#[test]
fn lorenz63_spantini2022_f2p_rmse_is_half_the_observation_error() {
    let s = run(
        "lorenz63_spantini2022",
        &["experiment.cycles=1000", "experiment.burn_in=100"],
        3,
    );
    assert!(
        (0.9..1.35).contains(&s.rmse_mean),
        "time-mean RMSE {} outside 0.9-1.35",
        s.rmse_mean
    );
    // The analysis improves on the forecast it started from.
    assert!(
        s.rmse_mean < s.rmse_forecast_mean,
        "analysis {} vs forecast {}",
        s.rmse_mean,
        s.rmse_forecast_mean
    );
}

/// Rotation2D is linear-Gaussian: the RMSE must drop from the initial 1.0 well below the
/// observation error 0.5 within 50 cycles.
#[test]
fn rotation2d_f2p_tracks_the_truth_below_observation_error() {
    let s = run("rotation2d", &[], 4);
    assert!(s.rmse_mean < 0.25, "time-mean RMSE {}", s.rmse_mean);
}

/// EnFF-OT also assimilates (v2 tables: 0.17-0.23 for K = 20-100 on d = 1e6); we only require
/// it to beat the unassimilated cold start by far.
#[test]
fn lorenz96_bao2024_ot_converges() {
    let s = run(
        "lorenz96_bao2024",
        &[
            "model.d=400",
            "filter.kind=enff-ot",
            "filter.sigma_min=0.1",
            "filter.guidance_scale=0.1",
        ],
        5,
    );
    assert!(s.rmse_mean < 0.5, "EnFF-OT time-mean RMSE {}", s.rmse_mean);
}

/// Same seed, same backend: bit-for-bit the same run.
#[test]
fn runs_are_reproducible_for_a_fixed_seed() {
    let a = run(
        "lorenz96_sakov2008",
        &["experiment.cycles=30", "experiment.burn_in=5"],
        9,
    );
    let b = run(
        "lorenz96_sakov2008",
        &["experiment.cycles=30", "experiment.burn_in=5"],
        9,
    );
    assert_eq!(a.rmse_mean, b.rmse_mean);
    let c = run(
        "lorenz96_sakov2008",
        &["experiment.cycles=30", "experiment.burn_in=5"],
        10,
    );
    assert_ne!(a.rmse_mean, c.rmse_mean);
}

/// `lorenz63_spantini2022_covariance` (global covariance guidance, transport weights at the
/// unguided position) is more accurate than enff's EnKF and ETKF at their best inflation on
/// the same seeds (1000 cycles: EnFF 0.456, EnKF 0.489, ETKF 0.536 over seeds 1-3).
#[test]
fn lorenz63_covariance_enff_beats_the_ensemble_kalman_filters() {
    let short = ["experiment.cycles=1000", "experiment.burn_in=100"];
    let mean = |sets: &[&str]| {
        let all: Vec<&str> = short.iter().chain(sets).copied().collect();
        (1..=3)
            .map(|seed| run("lorenz63_spantini2022_covariance", &all, seed).rmse_mean)
            .sum::<f64>()
            / 3.0
    };
    let enff = mean(&[]);
    let enkf = mean(&["filter.kind=enkf", "filter.inflation=1.02"]);
    let etkf = mean(&["filter.kind=etkf", "filter.inflation=1.02"]);
    assert!((0.40..0.52).contains(&enff), "EnFF time-mean RMSE {enff}");
    assert!(
        enff < enkf && enff < etkf,
        "EnFF {enff} vs EnKF {enkf}, ETKF {etkf}"
    );
}

/// `rotation2d_covariance` is within 5 % of the exact Kalman filter over ten seeds (0.087
/// against 0.089).
#[test]
fn rotation2d_covariance_enff_is_within_5_percent_of_the_kalman_filter() {
    let mean = |sets: &[&str]| {
        (1..=10)
            .map(|seed| run("rotation2d_covariance", sets, seed).rmse_mean)
            .sum::<f64>()
            / 10.0
    };
    let (enff, kf) = (mean(&[]), mean(&["filter.kind=kf", "ensemble.n=1"]));
    assert!(enff <= 1.05 * kf, "EnFF {enff} vs Kalman filter {kf}");
    assert!(enff < 0.2, "EnFF time-mean RMSE {enff}");
}
