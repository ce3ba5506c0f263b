//! Named twin experiments, DAPPER-style: each preset is named after its source, states its
//! burn-in, and writes down the time-mean RMSE we expect from it.

use crate::error::{Error, Result};
use crate::flow::{GuidanceKind, Integrator};
use crate::model::Scheme;
use crate::observe::Pointwise;

use super::config::{
    Config, EnsembleConfig, FilterConfig, InitialMean, ModelConfig, ObserveConfig, RunConfig,
    SystemKind,
};

/// A named experiment with its expected outcome.
#[derive(Clone, Debug)]
pub struct Preset {
    /// Name (`lorenz96_bao2024` …).
    pub name: &'static str,
    /// One line: system, observations, source.
    pub description: &'static str,
    /// The full configuration.
    pub config: Config,
    /// Band of the time-mean analysis RMSE (after burn-in) we expect with the preset's own
    /// filter settings, and where the band comes from.
    pub expected_rmse: (f64, f64),
    /// Where the expected band comes from.
    pub expected_source: &'static str,
}

/// Names of all presets.
pub const PRESETS: [&str; 11] = [
    "lorenz96_bao2024",
    "lorenz96_bao2024_covariance",
    "lorenz63_spantini2022",
    "lorenz63_spantini2022_covariance",
    "lorenz96_sakov2008",
    "rotation2d",
    "rotation2d_covariance",
    "ks_1024",
    "ks_512",
    "ns_64",
    "ns_256",
];

/// The preset `cargo run --release` runs with no arguments.
pub const DEFAULT_PRESET: &str = "lorenz96_bao2024";

fn enff_f2p(sigma_min: f32, guidance_scale: f32, flow_steps: usize) -> FilterConfig {
    FilterConfig {
        kind: "enff-f2p".into(),
        sigma_min,
        guidance_scale,
        flow_steps,
        integrator: Integrator::Euler,
        guidance: GuidanceKind::Local,
        inflation: 1.0,
        resampling: Default::default(),
        jitter: 0.0,
        eps_alpha: 0.5,
        eps_beta: 0.025,
        max_score: 1000.0,
        sampler: Default::default(),
        loc_radius: None,
        loc_distance: Default::default(),
        gain_stages: crate::filter::enff::DEFAULT_GAIN_STAGES,
        relinearize: crate::filter::enff::DEFAULT_RELINEARIZE,
        gain_schedule: Default::default(),
        innovation_clip: crate::filter::enff::DEFAULT_INNOVATION_CLIP,
        adaptive_inflation: 1.0,
        unguided_weights: false,
    }
}

/// ENFF_SPEC §8.1, §8.4: Kuramoto–Sivashinsky on `d` grid points (domain 128π), dt = 0.25,
/// arctan observations of every grid point every 4 steps with σ_y = 0.1, n = 20 members
/// N(truth, 1), 2000 spin-up steps, 1000 cycles of which the last 50 are averaged (§9.2);
/// EnFF-F2P as given.
fn ks_config(d: usize, filter: FilterConfig) -> Config {
    Config {
        model: ModelConfig {
            system: SystemKind::Ks,
            d,
            forcing: 0.0,
            dt: 0.25,
            scheme: Scheme::Rk4ThreeEighths,
            theta: -1.0,
        },
        observe: ObserveConfig {
            operator: Pointwise::Arctan,
            every: 1,
            offset: 0,
            noise_std: 0.1,
            obs_every: 4,
        },
        ensemble: EnsembleConfig {
            n: 20,
            init_std: 1.0,
            init_mean: InitialMean::Truth,
        },
        filter,
        experiment: RunConfig {
            spinup: 2000,
            cycles: 1000,
            burn_in: 950,
            seed: 2_376_999_025,
            truth_init_mean: 0.0,
            truth_init_std: 1.0,
        },
    }
}

/// ENFF_SPEC §8.1, §8.5: Navier–Stokes on an `n × n` grid (state (p, u, v), d = 3n²), forcing
/// 0.05·sin(8πy), ν = 1e-3, arctan observations of every component every `obs_every` steps
/// (Δt_obs = 0.01) with σ_y = 0.1, n = 20 members N(truth, 1) placed one step after the
/// Gaussian-process initial condition (no spin-up), the last 50 cycles averaged; EnFF-F2P as
/// given.
fn ns_config(n: usize, dt: f32, obs_every: usize, cycles: usize, filter: FilterConfig) -> Config {
    Config {
        model: ModelConfig {
            system: SystemKind::Ns,
            d: n,
            forcing: 0.05,
            dt,
            scheme: Scheme::Rk4ThreeEighths,
            theta: -1.0,
        },
        observe: ObserveConfig {
            operator: Pointwise::Arctan,
            every: 1,
            offset: 0,
            noise_std: 0.1,
            obs_every,
        },
        ensemble: EnsembleConfig {
            n: 20,
            init_std: 1.0,
            init_mean: InitialMean::Truth,
        },
        filter,
        experiment: RunConfig {
            spinup: 1,
            cycles,
            burn_in: cycles - 50,
            seed: 2_376_999_025,
            truth_init_mean: 0.0,
            truth_init_std: 1.0,
        },
    }
}

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<Preset> {
    let p = match name {
        // ENFF_SPEC §8.3 and §9.4: the EnSF paper's Lorenz-96 with arctan observations,
        // σ_y = 0.05, a cold N(0, 1) start; d = 10⁶ in the paper, 1000 here by default (the
        // RMSE is a per-component average, so it does not depend on d once d ≫ 40).
        "lorenz96_bao2024" => Preset {
            name: "lorenz96_bao2024",
            description: "Lorenz-96 (F=8, dt=0.01), arctan obs every 0.1 time units, σ_y=0.05, \
                          n=20, cold start (Bao et al. 2024; EnFF paper §L96)",
            config: Config {
                model: ModelConfig {
                    system: SystemKind::Lorenz96,
                    d: 1000,
                    forcing: 8.0,
                    dt: 0.01,
                    scheme: Scheme::Rk4ThreeEighths,
                    theta: -1.0,
                },
                observe: ObserveConfig {
                    operator: Pointwise::Arctan,
                    every: 1,
                    offset: 0,
                    noise_std: 0.05,
                    obs_every: 10,
                },
                ensemble: EnsembleConfig {
                    n: 20,
                    init_std: 1.0,
                    init_mean: InitialMean::Zero,
                },
                filter: enff_f2p(1e-2, 0.05, 19),
                experiment: RunConfig {
                    spinup: 1000,
                    cycles: 80,
                    burn_in: 30,
                    seed: 2_376_999_025,
                    truth_init_mean: 0.0,
                    truth_init_std: 3.0,
                },
            },
            expected_rmse: (0.15, 0.20),
            expected_source: "paper v2 tables: EnFF-F2P K=20 σ_min=1e-2 λ=0.05 → 0.1725 (d=1e6)",
        },
        // The same cold-start arctan Lorenz-96 with covariance guidance (tempered localized
        // Kalman gains, crate::filter::covariance) at the Kalman-consistent λ = 1, with the two
        // safeguards a cold start with saturating observations needs: the innovation bound
        // (2 standard deviations, the default) and adaptive prior inflation up to 1.3 per cycle.
        "lorenz96_bao2024_covariance" => {
            let mut p = preset("lorenz96_bao2024")?;
            p.name = "lorenz96_bao2024_covariance";
            p.description = "lorenz96_bao2024 (cold-start arctan Lorenz-96, d=1000) with EnFF-F2P \
                             covariance guidance: λ=1, Gaspari–Cohn radius 4, 4 stages, \
                             innovation bound 2σ, adaptive inflation ≤ 1.3";
            let f = &mut p.config.filter;
            f.guidance = GuidanceKind::Covariance;
            f.guidance_scale = 1.0;
            f.loc_radius = Some(4.0);
            f.gain_stages = 4;
            f.inflation = 1.0;
            f.innovation_clip = 2.0;
            f.adaptive_inflation = 1.3;
            p.expected_rmse = (0.04, 0.065);
            p.expected_source = "measured with enff (CPU): 0.048 ± 0.001 over 3 seeds at d=1000, \
                                 0.047 at d=1e6, 0.049 at d=400 (plain EnFF-F2P: 0.16-0.17); \
                                 every 2nd component observed: 0.17 ± 0.05 at d=2000";
            p
        }
        // Lorenz-63 with covariance guidance: no spatial geometry, so the global gain (every
        // component sees every observation, untapered) and the transport weights at the
        // unguided positions (in three dimensions the guidance's displacement would otherwise
        // hand members over to other members' paths); settings from a sweep of λ, σ_min,
        // stages and inflation (BENCHMARKS.md).
        "lorenz63_spantini2022_covariance" => {
            let mut p = preset("lorenz63_spantini2022")?;
            p.name = "lorenz63_spantini2022_covariance";
            p.description = "lorenz63_spantini2022 with EnFF-F2P covariance guidance: global \
                             gain, unguided transport weights, λ=2, 9 stages, σ_min=0.03";
            let f = &mut p.config.filter;
            f.guidance = GuidanceKind::Covariance;
            f.sigma_min = 0.03;
            f.guidance_scale = 2.0;
            f.gain_stages = 9;
            f.inflation = 1.0;
            f.loc_radius = None;
            f.innovation_clip = 2.0;
            f.adaptive_inflation = 1.0;
            f.unguided_weights = true;
            p.expected_rmse = (0.42, 0.56);
            p.expected_source = "measured with enff (CPU): 0.469 ± 0.009 over seeds 1-5, 0.486 \
                                 ± 0.030 over seeds 6-10 (EnKF 0.505 / 0.548 and ETKF 0.518 / \
                                 0.537 at their best inflation 1.02; plain EnFF-F2P 1.07)";
            p
        }
        // Rotation2D with covariance guidance (global gain: a linear model with linear
        // observations, where λ = 1 is the Kalman update of the ensemble); the transport weights
        // at the unguided positions keep the members on their own paths in two dimensions.
        "rotation2d_covariance" => {
            let mut p = preset("rotation2d")?;
            p.name = "rotation2d_covariance";
            p.description = "rotation2d with EnFF-F2P covariance guidance: global gain, \
                             unguided transport weights, λ=1, 4 stages, σ_min=0.001 (the \
                             ensemble Kalman update of the linear problem)";
            let f = &mut p.config.filter;
            f.guidance = GuidanceKind::Covariance;
            f.sigma_min = 0.001;
            f.guidance_scale = 1.0;
            f.gain_stages = 4;
            f.loc_radius = None;
            f.innovation_clip = 2.0;
            f.adaptive_inflation = 1.0;
            f.unguided_weights = true;
            p.expected_rmse = (0.03, 0.2);
            p.expected_source = "measured with enff (CPU), seeds 1-5: 0.099 ± 0.038 (the exact \
                                 Kalman filter 0.103 ± 0.045 on the same seeds; with the weights \
                                 at the guided state 0.168 ± 0.068)";
            p
        }
        // ENFF_SPEC §8.2: Lorenz-63, identity observations every 0.1 time units with σ_y = 2.
        "lorenz63_spantini2022" => Preset {
            name: "lorenz63_spantini2022",
            description: "Lorenz-63 (dt=0.05, RK4 3/8), identity obs every 0.1 time units, σ_y=2, \
                          n=20 (Spantini, Baptista & Marzouk 2022)",
            config: Config {
                model: ModelConfig {
                    system: SystemKind::Lorenz63,
                    d: 3,
                    forcing: 0.0,
                    dt: 0.05,
                    scheme: Scheme::Rk4ThreeEighths,
                    theta: -1.0,
                },
                observe: ObserveConfig {
                    operator: Pointwise::Identity,
                    every: 1,
                    offset: 0,
                    noise_std: 2.0,
                    obs_every: 2,
                },
                ensemble: EnsembleConfig {
                    n: 20,
                    init_std: 1.0,
                    init_mean: InitialMean::Truth,
                },
                filter: enff_f2p(0.3, 1.6, 9),
                experiment: RunConfig {
                    spinup: 2000,
                    cycles: 2000,
                    burn_in: 200,
                    seed: 2_376_999_025,
                    truth_init_mean: 0.0,
                    truth_init_std: 1.0,
                },
            },
            expected_rmse: (0.9, 1.3),
            expected_source: "measured with enff, seeds 1-5: 1.05-1.19 (σ_y = 2 per component)",
        },
        // Sakov & Oke (2008): 40-variable Lorenz-96, every variable observed every step.
        "lorenz96_sakov2008" => Preset {
            name: "lorenz96_sakov2008",
            description: "Lorenz-96 d=40 (F=8, dt=0.05), identity obs of every variable every \
                          step, σ_y=1, n=40 (Sakov & Oke 2008)",
            config: Config {
                model: ModelConfig {
                    system: SystemKind::Lorenz96,
                    d: 40,
                    forcing: 8.0,
                    dt: 0.05,
                    scheme: Scheme::Rk4Classic,
                    theta: -1.0,
                },
                observe: ObserveConfig {
                    operator: Pointwise::Identity,
                    every: 1,
                    offset: 0,
                    noise_std: 1.0,
                    obs_every: 1,
                },
                ensemble: EnsembleConfig {
                    n: 40,
                    init_std: 1.0,
                    init_mean: InitialMean::Truth,
                },
                filter: enff_f2p(0.1, 0.3, 9),
                experiment: RunConfig {
                    spinup: 1000,
                    cycles: 1000,
                    burn_in: 100,
                    seed: 2_376_999_025,
                    truth_init_mean: 0.0,
                    truth_init_std: 3.0,
                },
            },
            expected_rmse: (0.35, 0.5),
            expected_source:
                "measured with enff, seeds 1-5: 0.42-0.43; tuned EnKFs reach ≈0.18 here",
        },
        // ENFF_SPEC §8.6: the linear-Gaussian sanity case with a closed-form Kalman filter.
        "rotation2d" => Preset {
            name: "rotation2d",
            description: "exact plane rotation by a random angle, identity obs every step, \
                          σ_y=0.5, n=20",
            config: Config {
                model: ModelConfig {
                    system: SystemKind::Rotation2d,
                    d: 2,
                    forcing: 0.0,
                    dt: 1.0,
                    scheme: Scheme::Rk4Classic,
                    theta: -1.0,
                },
                observe: ObserveConfig {
                    operator: Pointwise::Identity,
                    every: 1,
                    offset: 0,
                    noise_std: 0.5,
                    obs_every: 1,
                },
                ensemble: EnsembleConfig {
                    n: 20,
                    init_std: 1.0,
                    init_mean: InitialMean::Truth,
                },
                filter: enff_f2p(0.01, 0.02, 9),
                experiment: RunConfig {
                    spinup: 0,
                    cycles: 50,
                    burn_in: 10,
                    seed: 2_376_999_025,
                    truth_init_mean: 2.0,
                    truth_init_std: 0.0,
                },
            },
            expected_rmse: (0.03, 0.25),
            expected_source: "measured with enff, seeds 1-5: 0.07-0.18 (50 cycles, few samples)",
        },
        // ENFF_SPEC §8.4, §9.6: the paper's Kuramoto–Sivashinsky benchmark, EnFF-F2P with the
        // Optuna-best K = 5 (4 flow steps) σ_min = 5.26e-3, λ = 6.94e-3 of §9.3 (a). Identity
        // variant: --set observe.operator=identity --set observe.noise_std=0.5.
        "ks_1024" => Preset {
            name: "ks_1024",
            description: "Kuramoto–Sivashinsky d=1024 (L=128π, dt=0.25, ETDRK4), arctan obs \
                          every 1 time unit, σ_y=0.1, n=20; EnFF-F2P K=5 (EnFF paper §KS)",
            config: ks_config(1024, enff_f2p(5.26e-3, 6.94e-3, 4)),
            expected_rmse: (0.045, 0.07),
            expected_source: "measured with enff (CPU, all 1000 cycles, mean of the last 50), \
                              seed 2376999025 and the five test seeds: 0.049-0.052; paper \
                              0.055-0.066 (v2 test seeds 0.0557, v2 training 0.0662)",
        },
        // The classical-comparison size of ENFF_SPEC §9.5 with the d = 1024 filter (§9.3 a).
        // §9.5's own EnFF-F2P row (K = 100, σ_min = 1e-2, λ = 0.005: 0.0684 on the training
        // seed) gives 0.0694 here on that seed but 0.064-0.142 on the five test seeds, at 20x
        // the cost; the K = 5 setting is steadier: --set filter.flow_steps=99 etc. to compare.
        "ks_512" => Preset {
            name: "ks_512",
            description: "Kuramoto–Sivashinsky d=512 (L=128π, dt=0.25, ETDRK4), arctan obs \
                          every 1 time unit, σ_y=0.1, n=20; EnFF-F2P K=5",
            config: ks_config(512, enff_f2p(5.26e-3, 6.94e-3, 4)),
            expected_rmse: (0.05, 0.09),
            expected_source: "measured with enff (CPU, all 1000 cycles, mean of the last 50), \
                              six seeds: 0.059-0.076; the paper's d=512 row (K=100) is 0.0684",
        },
        // ENFF_SPEC §8.1 `NavierStokesDim64` with the EnFF-F2P row of the classical comparison
        // (§9.5): K = 100 (99 flow steps), σ_min = 1e-3, λ = 0.005.
        "ns_64" => Preset {
            name: "ns_64",
            description: "Navier–Stokes 64×64 (d=12288, dt=1e-3, Chorin projection), arctan obs \
                          every 0.01 time units, σ_y=0.1, n=20; EnFF-F2P K=100 (EnFF paper v2 \
                          classical comparison)",
            config: ns_config(64, 1e-3, 10, 200, enff_f2p(1e-3, 5e-3, 99)),
            expected_rmse: (0.04, 0.055),
            expected_source: "measured with enff (CPU, all 200 cycles, mean of the last 50): \
                              0.0455-0.0465 on five of six seeds (seed 715319214 diverges at \
                              cycle 21: one member's velocity grows from cycle 16 until the \
                              explicit step blows up; with dt=5e-4, obs_every=20 it runs, \
                              RMSE 0.041 at cycle 40); paper v2 0.0465 (training seed)",
        },
        // ENFF_SPEC §8.5, §9.6: the paper's Navier–Stokes benchmark, EnFF-F2P with the
        // Optuna-best K = 10 (9 flow steps) σ_min = 2.74e-4, λ = 1.008e-3 of §9.3 (a).
        "ns_256" => Preset {
            name: "ns_256",
            description: "Navier–Stokes 256×256 (d=196608, dt=1e-4, Chorin projection), arctan \
                          obs every 0.01 time units, σ_y=0.1, n=20; EnFF-F2P K=10 (EnFF paper §NS)",
            config: ns_config(256, 1e-4, 100, 60, enff_f2p(2.74e-4, 1.008e-3, 9)),
            expected_rmse: (0.015, 0.025),
            expected_source: "measured with enff (CPU, all 60 cycles, mean of the last 50; \
                              186 s on 2 cores): 0.0210 (seed 2376999025), 0.0203 \
                              (seed 462133975); paper 0.017-0.019 (v2 test seeds 0.0179, \
                              v3 K=100 0.0191)",
        },
        other => {
            return Err(Error::UnknownPreset {
                name: other.to_string(),
                known: PRESETS.join(", "),
            })
        }
    };
    Ok(p)
}
