//! What one cycle reports: its metrics row, the divergence events a run records, the divergence
//! policy, and the faults tests inject.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Metrics of one assimilation cycle (after the analysis unless marked forecast).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CycleMetrics {
    /// Cycle number, 1-based.
    pub cycle: usize,
    /// Model time of the observation.
    pub time: f64,
    /// RMSE of the forecast mean against the truth.
    pub rmse_forecast: f64,
    /// Spread of the forecast.
    pub spread_forecast: f64,
    /// RMSE of the analysis mean against the truth.
    pub rmse: f64,
    /// Spread of the analysis.
    pub spread: f64,
    /// Wall time of the ensemble forecast, seconds.
    pub seconds_forecast: f64,
    /// Wall time of the analysis, seconds.
    pub seconds_analysis: f64,
    /// Effective sample size of a weighting filter (particle filter), else `None`.
    pub ess: Option<f64>,
}

/// A non-finite value met during a run kept going with `--on-divergence record`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DivergenceEvent {
    /// Cycle (1-based).
    pub cycle: usize,
    /// Stage (`forecast`, `analysis, flow step k of K`, `metrics` …).
    pub stage: String,
    /// What was seen, and what the run did about it.
    pub detail: String,
}

impl DivergenceEvent {
    /// The event as the error that stops a run.
    pub fn into_error(self) -> Error {
        Error::Diverged {
            cycle: self.cycle,
            stage: self.stage,
            detail: self.detail,
        }
    }

    /// One line for the log.
    pub fn message(&self) -> String {
        format!(
            "divergence at cycle {} during {}: {}",
            self.cycle, self.stage, self.detail
        )
    }
}

/// What a run does when the ensemble, the weights or the metrics become non-finite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDivergence {
    /// Stop with [`Error::Diverged`] naming the cycle and stage (the default).
    #[default]
    Stop,
    /// Log the event and keep cycling: a failed analysis is replaced by the forecast, a failed
    /// forecast by a fresh draw of the initial ensemble; the cycle's metrics are kept (NaN
    /// where they were non-finite) and left out of the summary's means.
    Record,
}

impl OnDivergence {
    /// Parses `stop` or `record`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "stop" => Ok(OnDivergence::Stop),
            "record" => Ok(OnDivergence::Record),
            other => Err(Error::invalid(
                "--on-divergence",
                other,
                "use `stop` (end the run with an error) or `record` (log and keep cycling)",
            )),
        }
    }
}

/// Where a test-injected fault strikes ([`Fault`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultStage {
    /// A NaN in the forecast ensemble.
    Forecast,
    /// A NaN in the flow state at flow step `k` (1-based) of the analysis.
    FlowStep(usize),
    /// A NaN in the observation operator's output during guidance.
    Guidance,
    /// A NaN in the truth, so that only the metrics are non-finite.
    Metrics,
}

/// Faults a test injects into a run.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Stop with [`Error::Interrupted`] once this cycle is complete (and checkpointed if due),
    /// as a killed process would.
    AbortAfter(usize),
    /// A NaN at this cycle and stage.
    NonFinite {
        /// Cycle (1-based).
        cycle: usize,
        /// Stage.
        stage: FaultStage,
    },
    /// The device reports itself lost at the start of this cycle.
    DeviceLost(usize),
    /// An allocation fails for lack of device memory at the start of this cycle.
    OutOfMemory(usize),
}
