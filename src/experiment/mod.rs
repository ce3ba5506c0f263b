//! Twin experiments: configuration, presets, the one cycle loop, metrics and result files.
//!
//! ```text
//! truth x_true(t) ──► observations y_k = h(x_true) + σ_y η
//! cycle k = 1..K:  forecast (model) → analysis (filter) → metrics (on the backend)
//! ```

pub mod assimilate;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod file;
pub mod output;
pub mod plots;
pub mod presets;
mod report;
mod run;
pub mod seeds;
pub mod sharded;
pub mod source;
pub mod sweep;
pub mod trace;

pub use crate::cycle::{CycleMetrics, DivergenceEvent, Fault, FaultStage, OnDivergence};
pub use checkpoint::Checkpoint;
pub use config::Config;
pub use presets::{preset, Preset, DEFAULT_PRESET, PRESETS};
pub use report::{Report, Summary};
pub use run::{build_filter, build_filter_on, CycleState, Experiment, MemoryEstimate, RunOptions};
pub use sharded::{check_shardable, run_sharded, ShardedReport};
pub use source::Source;
