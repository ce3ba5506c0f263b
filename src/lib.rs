//! # enff — Ensemble Flow Filter data assimilation
//!
//! enff estimates the state of a chaotic dynamical system from noisy observations, cycle after
//! cycle, with an ensemble of model states. Its centre is the **Ensemble Flow Filter (EnFF)**
//! (Transue, Chen, Takao, Wang, arXiv 2508.13313): a training-free flow-matching filter whose
//! analysis moves every member along a Monte-Carlo estimate of the marginal flow field, steered
//! by observation guidance.
//!
//! ## Vocabulary
//! | concept | name |
//! |---|---|
//! | ensemble size, state dim, obs dim | `n`, `d`, `m` (the ensemble is an `n × d` matrix) |
//! | forecast / analysis ensemble | `forecast`, `analysis` |
//! | model step, steps between observations | `dt`, `obs_every` |
//! | EnFF pseudo-time steps | `flow_steps` (velocity evaluations; the paper's `K` grid points = `flow_steps + 1`) |
//! | noise floor, guidance scale | `sigma_min` (σ_min), `guidance_scale` (λ) |
//! | multiplicative inflation | `inflation` (1.0 = none) |
//! | observation noise std | `obs_noise_std` (σ_y, diagonal `R = σ_y² I`) |
//! | error, spread | `rmse` of the ensemble mean vs truth; `spread` = sqrt(mean unbiased variance) |
//!
//! ## Layout
//! Layers, each importing only those below it (checked by `tests/layers.rs`): [`experiment`]
//! (drivers: twin experiments in one process or sharded, compare, seeds, sweeps, presets,
//! checkpoints, plots), [`Assimilator`] and [`mod@bench`] → [`cycle`] (the one cycle stepper and
//! the placement of the state; [`distributed`] adds slabs over MPI ranks) → [`filter`] (one
//! analysis per file) → [`flow`] (paths, guidance, integrators) and [`partition`] (slabs and
//! the collectives filters sum over) → [`backend`] (where numbers live: [`backend::cpu::Cpu`]
//! is the reference) → [`model`], [`observe`], [`localization`] → [`rng`] (Philox, identical
//! on every backend), [`io`] (`.npy` files, atomic writes), [`ensemble`], [`error`].
//!
//! ## CPU/GPU contract
//! Every kernel operation of [`backend::Backend`] has one meaning on every backend; the CPU
//! backend is the reference the others are tested against. Random numbers are a pure function
//! of `(seed, stream, cycle, step, member, component)` ([`rng`]), so backends draw the same noise.
//!
//! ## Example
//! ```
//! use enff::backend::{cpu::Cpu, Backend};
//! use enff::filter::{Enff, EnffConfig, Filter, Observation};
//! use enff::observe::Observe;
//!
//! # fn main() -> enff::Result<()> {
//! let cpu = Cpu::new();
//! // A forecast of 3 members in 2 dimensions and one observation of the full state.
//! let mut ensemble = cpu.upload(3, 2, &[1.0, 0.0, 0.0, 1.0, -1.0, -1.0])?;
//! let y = cpu.upload(1, 2, &[0.5, 0.2])?;
//! let h = Observe::identity();
//! let obs = Observation { y: &y, operator: &h, noise_std: 0.5 };
//! let mut enff = Enff::<Cpu>::new(EnffConfig::ot(0.1, 0.3, 2))?;
//! enff.analyse(&cpu, &mut ensemble, None, &obs, 1)?;
//! let analysis = cpu.read(&ensemble)?;
//! assert_eq!(analysis.len(), 6);
//! # Ok(())
//! # }
//! ```

pub mod assimilator;
pub mod backend;
pub mod bench;
pub mod cycle;
pub mod distributed;
pub mod ensemble;
pub mod error;
pub mod experiment;
pub mod filter;
pub mod flow;
pub mod io;
pub mod localization;
pub mod model;
pub mod observe;
pub mod partition;
pub mod rng;

pub use assimilator::{Assimilator, AssimilatorBuilder};
pub use ensemble::Ensemble;
pub use error::{Error, Result};

/// The README's code blocks, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
