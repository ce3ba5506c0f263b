//! Forecast models: the dynamics that carry the ensemble from one observation time to the next.
//!
//! A [`Model`] is a description (system, time step, integrator); backends run it on whole
//! ensembles (`Backend::advance`). Built-in systems: Lorenz-63 (ENFF_SPEC §8.2), Lorenz-96 (§8.3),
//! Kuramoto–Sivashinsky (§8.4, [`ks`]), 2-D incompressible Navier–Stokes (§8.5, [`ns`]) and the
//! linear Rotation2D (§8.6). Users add their own vector field through [`Dynamics`]; the CPU
//! backend integrates it with the same Runge–Kutta schemes. The two grid models carry their own
//! integrators (ETDRK4, Chorin projection); the Runge–Kutta `scheme` does not apply to them.

use std::fmt;
use std::sync::Arc;

use crate::error::{check_positive, Error, Result};

pub mod fft;
pub mod geometry;
pub mod ks;
pub mod ns;
pub mod rk;

pub use geometry::{DistanceKind, Geometry};
pub use ks::KuramotoSivashinsky;
pub use ns::NavierStokes2d;

/// Time integrator for ODE models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// Kutta's 3/8 rule, the reference code's `rk4` (ENFF_SPEC §8.8).
    Rk4ThreeEighths,
    /// The classic fourth-order Runge–Kutta method.
    Rk4Classic,
}

impl Scheme {
    /// Parses `rk4_38` / `rk4_three_eighths` / `rk4` (classic).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "rk4_38" | "rk4_three_eighths" | "rk38" => Ok(Scheme::Rk4ThreeEighths),
            "rk4" | "rk4_classic" => Ok(Scheme::Rk4Classic),
            other => Err(Error::invalid(
                "model.scheme",
                other,
                "use rk4_three_eighths (the paper's) or rk4_classic",
            )),
        }
    }
}

/// A user-defined vector field `dx/dt = f(x)` (autonomous), integrated by the CPU backend.
pub trait Dynamics: Send + Sync + fmt::Debug {
    /// State dimension.
    fn dim(&self) -> usize;
    /// Writes `f(x)` into `dx`.
    fn rhs(&self, x: &[f32], dx: &mut [f32]);
    /// Where the components sit in space, for localization (default: no structure).
    fn geometry(&self) -> Geometry {
        Geometry::None
    }
}

/// The Lorenz-63 system `ẋ = σ(y−x), ẏ = x(ρ−z)−y, ż = xy−βz`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lorenz63 {
    /// σ (10 in the classic setting).
    pub sigma: f32,
    /// ρ (28).
    pub rho: f32,
    /// β (8/3).
    pub beta: f32,
}

impl Default for Lorenz63 {
    fn default() -> Self {
        Lorenz63 {
            sigma: 10.0,
            rho: 28.0,
            beta: 8.0 / 3.0,
        }
    }
}

impl Lorenz63 {
    /// The vector field at one state of length 3.
    #[inline]
    pub fn rhs(&self, x: &[f32], dx: &mut [f32]) {
        dx[0] = self.sigma * (x[1] - x[0]);
        dx[1] = x[0] * (self.rho - x[2]) - x[1];
        dx[2] = x[0] * x[1] - self.beta * x[2];
    }
}

/// The Lorenz-96 system `ẋ_k = (x_{k+1} − x_{k−2}) x_{k−1} − x_k + F`, periodic in `k`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lorenz96 {
    /// State dimension (at least 4).
    pub d: usize,
    /// Forcing `F` (8 is chaotic).
    pub forcing: f32,
}

impl Lorenz96 {
    /// A validated Lorenz-96 system.
    pub fn new(d: usize, forcing: f32) -> Result<Self> {
        if d < 4 {
            return Err(Error::invalid(
                "model.d",
                d,
                "Lorenz-96's stencil needs at least 4 variables (40 is the classic setting)",
            ));
        }
        if !forcing.is_finite() {
            return Err(Error::invalid(
                "model.forcing",
                forcing,
                "use a finite forcing such as 8",
            ));
        }
        Ok(Lorenz96 { d, forcing })
    }

    /// The vector field at one state of length `d`.
    #[inline]
    pub fn rhs(&self, x: &[f32], dx: &mut [f32]) {
        let d = x.len();
        let f = self.forcing;
        // Boundary terms (k = 0, 1, d-1) by index arithmetic; the interior vectorizes.
        let at = |k: isize| x[k.rem_euclid(d as isize) as usize];
        for k in [0usize, 1, d - 1] {
            let ki = k as isize;
            dx[k] = (at(ki + 1) - at(ki - 2)) * at(ki - 1) - x[k] + f;
        }
        for k in 2..d - 1 {
            dx[k] = (x[k + 1] - x[k - 2]) * x[k - 1] - x[k] + f;
        }
    }
}

/// An exact rotation of the plane by `theta` per step (a linear model with a closed-form KF).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rotation2d {
    /// Angle per step, radians.
    pub theta: f64,
}

/// Which system a [`Model`] integrates.
#[derive(Clone, Debug)]
pub enum System {
    /// Lorenz-63 (d = 3).
    Lorenz63(Lorenz63),
    /// Lorenz-96 (any d ≥ 4).
    Lorenz96(Lorenz96),
    /// Exact plane rotation (d = 2); `dt` and the scheme are ignored.
    Rotation2d(Rotation2d),
    /// Kuramoto–Sivashinsky on `d` grid points, ETDRK4 (ENFF_SPEC §8.4); the scheme is ignored.
    KuramotoSivashinsky(KuramotoSivashinsky),
    /// 2-D Navier–Stokes, state `(p, u, v)` on an `n × n` grid, d = 3n² (ENFF_SPEC §8.5); the
    /// scheme is ignored.
    NavierStokes2d(NavierStokes2d),
    /// A user-defined vector field (CPU backend only).
    Custom(Arc<dyn Dynamics>),
}

/// A forecast model: a system, its time step and its integrator.
#[derive(Clone, Debug)]
pub struct Model {
    /// The dynamical system.
    pub system: System,
    /// Model time step `dt`.
    pub dt: f32,
    /// Integrator used for ODE systems.
    pub scheme: Scheme,
}

impl Model {
    /// A validated model.
    pub fn new(system: System, dt: f32, scheme: Scheme) -> Result<Self> {
        check_positive(
            "model.dt",
            dt as f64,
            "the model time step must be a finite positive number (e.g. 0.01 for Lorenz-96)",
        )?;
        match &system {
            System::Custom(dynamics) if dynamics.dim() == 0 => {
                return Err(Error::invalid(
                    "model.d",
                    0,
                    "a custom model needs a positive dimension",
                ));
            }
            // The grid models precompute their step: the model's dt must be theirs.
            System::KuramotoSivashinsky(ks) if ks.dt() != dt => {
                return Err(Error::invalid(
                    "model.dt",
                    dt,
                    format!(
                        "the Kuramoto–Sivashinsky coefficients were computed for dt = {}: \
                         build the system with the model's time step",
                        ks.dt()
                    ),
                ));
            }
            System::NavierStokes2d(ns) if ns.dt() != dt => {
                return Err(Error::invalid(
                    "model.dt",
                    dt,
                    format!(
                        "the Navier–Stokes system was built for dt = {}: build it with the \
                         model's time step",
                        ns.dt()
                    ),
                ));
            }
            _ => {}
        }
        Ok(Model { system, dt, scheme })
    }

    /// State dimension `d`.
    pub fn dim(&self) -> usize {
        match &self.system {
            System::Lorenz63(_) => 3,
            System::Lorenz96(l) => l.d,
            System::Rotation2d(_) => 2,
            System::KuramotoSivashinsky(k) => k.d(),
            System::NavierStokes2d(n) => n.dim(),
            System::Custom(c) => c.dim(),
        }
    }

    /// Where the state components sit in space (ENFF_SPEC §6.3 localization).
    pub fn geometry(&self) -> Geometry {
        match &self.system {
            System::Lorenz63(_) | System::Rotation2d(_) => Geometry::None,
            System::Lorenz96(l) => Geometry::Ring { len: l.d },
            System::KuramotoSivashinsky(k) => Geometry::Ring { len: k.d() },
            System::NavierStokes2d(n) => Geometry::Torus {
                nx: n.n(),
                ny: n.n(),
                fields: 3,
            },
            System::Custom(c) => c.geometry(),
        }
    }

    /// Short name for logs and summaries.
    pub fn name(&self) -> String {
        match &self.system {
            System::Lorenz63(_) => "lorenz63".into(),
            System::Lorenz96(l) => format!("lorenz96(d={}, F={})", l.d, l.forcing),
            System::Rotation2d(r) => format!("rotation2d(theta={:.4})", r.theta),
            System::KuramotoSivashinsky(k) => format!(
                "kuramoto_sivashinsky(d={}, L={}π, dt={}, ETDRK4)",
                k.d(),
                k.domain_pi_multiple(),
                k.dt()
            ),
            System::NavierStokes2d(n) => format!(
                "navier_stokes_2d({0}x{0}, d={1}, dt={2}, ν={3}, {4} Jacobi sweeps)",
                n.n(),
                n.dim(),
                n.dt(),
                n.viscosity(),
                n.jacobi_sweeps()
            ),
            System::Custom(c) => format!("custom(d={})", c.dim()),
        }
    }

    /// Evaluates the vector field of an ODE system at one state; false (and `dx` untouched)
    /// for systems that are not integrated by Runge–Kutta (Rotation2D, the grid models).
    pub fn rhs(&self, x: &[f32], dx: &mut [f32]) -> bool {
        match &self.system {
            System::Lorenz63(l) => l.rhs(x, dx),
            System::Lorenz96(l) => l.rhs(x, dx),
            System::Custom(c) => c.rhs(x, dx),
            System::Rotation2d(_) | System::KuramotoSivashinsky(_) | System::NavierStokes2d(_) => {
                return false
            }
        }
        true
    }
}
