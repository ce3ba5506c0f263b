//! Analysis methods. Each filter is a small struct with a validated configuration that turns a
//! forecast ensemble into an analysis ensemble, in place, on any backend. Filters never loop
//! over time: the experiment owns the cycle loop.

use crate::backend::Backend;
use crate::observe::ObservationOperator;
use crate::partition::{refuse, Shard};

pub mod covariance;
pub mod enff;
pub mod ensemble_kalman;
pub mod ensf;
pub mod inflation;
pub mod kalman;
pub mod kind;
pub mod letkf;
pub mod local_transform;
pub mod particle;

pub use enff::{Enff, EnffConfig};
pub use ensemble_kalman::{EnkfPo, Etkf};
pub use ensf::{Ensf, EnsfConfig, ScoreSampler};
pub use kalman::KalmanFilter;
pub use kind::FilterKind;
pub use letkf::Letkf;
pub use particle::{ParticleFilter, Resampling};

/// One observation as a filter sees it: `y = h(x) + σ_y η`.
pub struct Observation<'a, B: Backend + ?Sized> {
    /// The observed values (`1 × m`), on the backend.
    pub y: &'a B::Buffer,
    /// The observation operator `h`.
    pub operator: &'a dyn ObservationOperator,
    /// Observation noise std `σ_y` (diagonal `R = σ_y² I`).
    pub noise_std: f32,
}

/// A data-assimilation analysis step.
/// Test-only faults a filter can inject into its own analysis.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// A NaN in the flow state at the start of flow step `k` (1-based).
    FlowStep(usize),
    /// A NaN in the observations the guidance sees (after the input checks).
    Guidance,
}

pub trait Filter<B: Backend>: Send {
    /// Name as used in summaries (`enff-f2p`, `enff-ot` …).
    fn name(&self) -> String;

    /// True when the filter needs the previous analysis ensemble (EnFF-F2P).
    fn needs_previous_analysis(&self) -> bool {
        false
    }

    /// The effective sample size of the last analysis, for filters that weight members (the
    /// particle filter); `None` otherwise.
    fn effective_sample_size(&self) -> Option<f64> {
        None
    }

    /// The filter's own state carried between cycles, for checkpoints (the Kalman filter's
    /// covariance; ensemble filters keep none: empty).
    fn save_state(&self) -> Vec<f64> {
        Vec::new()
    }

    /// Restores a state saved by [`Filter::save_state`].
    fn restore_state(&mut self, state: &[f64]) -> crate::Result<()> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(crate::Error::shape("filter state", 0, state.len()))
        }
    }

    /// Places the filter on one slab of a state split over processes: the ensembles and the
    /// observations it is given hold the slab's components, and it sums what it needs over
    /// the processes through `shard`. Filters without a sharded analysis refuse.
    fn place(&mut self, shard: Shard) -> crate::Result<()> {
        if shard.comm.size() == 1 {
            return Ok(());
        }
        Err(refuse(
            shard.comm.size(),
            format!("the filter `{}` has no sharded analysis", self.name()),
            "use filter.kind=enff-f2p or enff-ot, or run in one process",
        ))
    }

    /// Checks the state after every internal step (flow step) so that a non-finite value is
    /// reported with the step and what produced it; costs a device round trip per step.
    fn set_step_checks(&mut self, _on: bool) {}

    /// Test-only: a fault to inject into the next analysis.
    #[doc(hidden)]
    fn inject_fault(&mut self, _fault: Option<InjectedFault>) {}

    /// Replaces the forecast in `ensemble` by the analysis for observation `obs` at `cycle`.
    /// `previous` is the previous analysis when [`Filter::needs_previous_analysis`] is true.
    fn analyse(
        &mut self,
        backend: &B,
        ensemble: &mut B::Buffer,
        previous: Option<&B::Buffer>,
        obs: &Observation<'_, B>,
        cycle: u32,
    ) -> crate::Result<()>;
}
