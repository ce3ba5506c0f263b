//! The parts of EnFF: probability paths, guidance kinds and integrators (ENFF_SPEC §2–4).

use crate::backend::PathCoefficients;
use crate::error::{Error, Result};

/// Which conditional probability path the flow follows (ENFF_SPEC §2.3–2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Optimal-transport path from standard noise to the forecast ("EnFF-OT").
    Ot,
    /// Filtering-to-predictive path from the previous analysis to the forecast ("EnFF-F2P").
    F2p,
}

/// A probability path with its noise floor `σ_min`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Path {
    /// OT or F2P.
    pub kind: PathKind,
    /// `σ_min > 0`: final std of the OT path, constant std of the F2P path.
    pub sigma_min: f32,
}

impl Path {
    /// A validated path.
    pub fn new(kind: PathKind, sigma_min: f32) -> Result<Self> {
        if !(sigma_min.is_finite() && sigma_min > 0.0) {
            return Err(Error::invalid(
                "filter.sigma_min",
                sigma_min,
                "σ_min must be a finite positive number (typical 1e-3 … 1e-1)",
            ));
        }
        if kind == PathKind::Ot && sigma_min > 1.0 {
            return Err(Error::invalid(
                "filter.sigma_min",
                sigma_min,
                "the OT path shrinks from std 1 to σ_min, so σ_min must be at most 1",
            ));
        }
        Ok(Path { kind, sigma_min })
    }

    /// True when the path starts from the previous analysis (F2P).
    pub fn needs_source(&self) -> bool {
        self.kind == PathKind::F2p
    }

    /// Mean, std and their time derivatives at pseudo-time `t`.
    ///
    /// OT: `μ_j = t·x_f`, `s = 1 − (1 − σ_min)t` (§2.3).
    /// F2P: `μ_j = t·x_f + (1 − t)·x_prev`, `s ≡ σ_min` (§2.4).
    pub fn at(&self, t: f32) -> PathCoefficients {
        let sm = self.sigma_min;
        match self.kind {
            PathKind::Ot => PathCoefficients {
                t,
                a: t,
                b: 0.0,
                da: 1.0,
                db: 0.0,
                s: 1.0 - (1.0 - sm) * t,
                ds: -(1.0 - sm),
            },
            PathKind::F2p => PathCoefficients {
                t,
                a: t,
                b: 1.0 - t,
                da: 1.0,
                db: -1.0,
                s: sm,
                ds: 0.0,
            },
        }
    }
}

/// How observations steer the flow (ENFF_SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuidanceKind {
    /// Local (first-order) guidance at the predicted endpoint with constant scale λ (§3.1).
    Local,
    /// Exact Monte-Carlo guidance: likelihood-reweighted marginal velocity (§3.2).
    MonteCarlo,
    /// No guidance: pure transport to the forecast (§3.3).
    None,
    /// Covariance (Kalman-gain) guidance: the innovation at the predicted endpoint carried
    /// through a localized ensemble Kalman gain computed once per guidance stage
    /// ([`crate::filter::covariance`]).
    Covariance,
}

impl GuidanceKind {
    /// The name settings and files use (`local`, `monte_carlo`, `none`, `covariance`).
    pub fn name(self) -> &'static str {
        match self {
            GuidanceKind::Local => "local",
            GuidanceKind::MonteCarlo => "monte_carlo",
            GuidanceKind::None => "none",
            GuidanceKind::Covariance => "covariance",
        }
    }
}

/// How covariance guidance spreads the assimilation over the flow
/// ([`crate::filter::covariance`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GainSchedule {
    /// Tempered stages: stage `s` assimilates the likelihood from `τ_s` to `τ_{s+1}` with the
    /// gain `K(τ_{s+1})`; exact for a linear `h` (the Kalman analysis mean at `λ = 1`).
    #[default]
    Homotopy,
    /// One gain `K(1)` applied at every flow step with weight `λ·Δt`, i.e. the velocity
    /// `g = λ·K·(y − h(x̂₁))` (feedback through the innovation at the endpoint; at `λ = 1` it
    /// under-corrects strongly observed directions).
    Constant,
}

/// ODE integrator for the flow in pseudo-time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Integrator {
    /// Explicit Euler, the reference algorithm (§4.1): one velocity evaluation per step.
    Euler,
    /// Heun's method (explicit trapezoid): two velocity evaluations per step, second order.
    Heun,
}

/// The uniform pseudo-time grid `t_k = k / flow_steps`, `k = 0..=flow_steps`.
pub fn time_grid(flow_steps: usize) -> Vec<f32> {
    (0..=flow_steps)
        .map(|k| (k as f64 / flow_steps as f64) as f32)
        .collect()
}
