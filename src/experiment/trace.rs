//! What a run keeps besides its metrics: the fields the plots draw and ensemble snapshots.
//!
//! A [`Recorder`] watches the cycle loop through [`super::Experiment::run_observed`]. Memory
//! stays bounded whatever the state dimension:
//! - 1-D systems (Lorenz-96, Kuramoto–Sivashinsky, user models): the truth and the analysis
//!   mean at most [`TraceOptions::max_components`] evenly strided components, at most
//!   [`TraceOptions::max_cycles`] evenly strided cycles. The strided components are picked on
//!   the backend (the built-in subsampling observation operator), so only `n × 512` values
//!   cross to the host per cycle even at `d = 10⁶`;
//! - 2-D systems (Navier–Stokes): the truth and analysis mean of the last cycle;
//! - on request, the whole analysis ensemble every `save_every` cycles as
//!   `DIR/cycle_XXXX.npy` (`n × d`, float32).

use std::path::PathBuf;

use super::config::{Config, SystemKind};
use super::run::CycleState;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::npy::{self, NpyDtype};
use crate::observe::Observe;

/// What to record.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceOptions {
    /// Record the fields the plots need.
    pub fields: bool,
    /// Most state components kept per cycle for a 1-D system.
    pub max_components: usize,
    /// Most cycles kept for a 1-D system.
    pub max_cycles: usize,
    /// Write the analysis ensemble every this many cycles (`None` = never).
    pub save_every: Option<usize>,
    /// Folder of the snapshots.
    pub save_dir: PathBuf,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            fields: true,
            max_components: 512,
            max_cycles: 2048,
            save_every: None,
            save_dir: PathBuf::from("ensembles"),
        }
    }
}

/// How a state vector is laid out in space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Values along one periodic line (Lorenz-96, KS, user models).
    Line,
    /// Channels `(p, u, v)` on an `n × n` grid (Navier–Stokes).
    Grid {
        /// Grid side.
        n: usize,
    },
    /// A few variables with no spatial meaning (Lorenz-63, Rotation2D): no field plots.
    Point,
}

impl Layout {
    /// The layout of a configuration's state.
    pub fn of(config: &Config) -> Self {
        match config.model.system {
            SystemKind::Lorenz96 | SystemKind::Ks => Layout::Line,
            SystemKind::Ns => Layout::Grid { n: config.model.d },
            SystemKind::Lorenz63 | SystemKind::Rotation2d => Layout::Point,
        }
    }
}

/// Time × component history of a 1-D system (row-major, one row per kept cycle).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hovmoller {
    /// The kept components (`0, stride, 2·stride, …`).
    pub components: Vec<usize>,
    /// The kept cycles.
    pub cycles: Vec<usize>,
    /// Model times of the kept cycles.
    pub times: Vec<f64>,
    /// Truth, `cycles.len() × components.len()`.
    pub truth: Vec<f32>,
    /// Analysis mean, same shape.
    pub mean: Vec<f32>,
}

/// The truth and analysis mean of one cycle of a 2-D system.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldSnapshot {
    /// Grid side `n` (the state is `(p, u, v)`, each `n × n`).
    pub n: usize,
    /// Cycle of the snapshot.
    pub cycle: usize,
    /// Truth, `3 n²` values.
    pub truth: Vec<f32>,
    /// Analysis mean, `3 n²` values.
    pub mean: Vec<f32>,
}

/// Everything recorded during a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// History of a 1-D system.
    pub hovmoller: Option<Hovmoller>,
    /// Last field of a 2-D system.
    pub field: Option<FieldSnapshot>,
    /// Ensemble snapshots written.
    pub snapshots: Vec<PathBuf>,
}

/// Records a run's fields; hand [`Recorder::observe`] to [`super::Experiment::run_observed`].
pub struct Recorder<B: Backend> {
    options: TraceOptions,
    layout: Layout,
    cycles: usize,
    cycle_stride: usize,
    sub: Option<Observe>,
    sub_ensemble: Option<B::Buffer>,
    sub_truth: Option<B::Buffer>,
    trace: Trace,
}

impl<B: Backend> Recorder<B> {
    /// A recorder for a run of `config`.
    pub fn new(config: &Config, options: TraceOptions) -> Result<Self> {
        if options.save_every == Some(0) {
            return Err(Error::invalid(
                "--save-ensembles",
                0,
                "save the ensemble every EVERY >= 1 cycles",
            ));
        }
        if options.max_components == 0 || options.max_cycles == 0 {
            return Err(Error::invalid(
                "trace size",
                0,
                "keep at least one component and one cycle",
            ));
        }
        let d = config.state_dim();
        let layout = Layout::of(config);
        let cycles = config.experiment.cycles;
        let sub = match (options.fields, layout) {
            (true, Layout::Line) => {
                Some(Observe::identity().subsample(d.div_ceil(options.max_components).max(1), 0)?)
            }
            _ => None,
        };
        Ok(Recorder {
            cycle_stride: cycles.div_ceil(options.max_cycles).max(1),
            options,
            layout,
            cycles,
            sub,
            sub_ensemble: None,
            sub_truth: None,
            trace: Trace::default(),
        })
    }

    /// Records what the options ask for from one cycle's state.
    pub fn observe(&mut self, s: &CycleState<'_, B>) -> Result<()> {
        let backend = s.backend;
        use crate::backend::DeviceBuffer;
        use crate::observe::ObservationOperator;
        let slab = s.placement.slab();
        let (n, d) = (s.ensemble.rows(), slab.d);
        if let Some(op) = self.sub {
            if (s.cycle - 1).is_multiple_of(self.cycle_stride) || s.cycle == self.cycles {
                let m = op.obs_dim(d)?;
                // The kept components of this process's slab (all of them in one process).
                let (local, range) = if slab.len == d {
                    (Some(op), 0..m)
                } else {
                    match crate::partition::local_observe(&op, &slab, s.placement.ranks()) {
                        Ok((l, r)) => (Some(l), r),
                        Err(_) => (None, 0..0),
                    }
                };
                if self.sub_ensemble.is_none() {
                    self.sub_ensemble = Some(backend.zeros(n, range.len().max(1))?);
                    self.sub_truth = Some(backend.zeros(1, m)?);
                }
                let (Some(se), Some(st)) = (self.sub_ensemble.as_mut(), self.sub_truth.as_mut())
                else {
                    return Ok(());
                };
                let mut mean = vec![0.0f32; m];
                if let Some(local) = local {
                    backend.observe(&local, s.ensemble, se)?;
                    let ens = backend.read(se)?;
                    mean[range.clone()].copy_from_slice(&mean_rows(&ens, n, range.len()));
                }
                if slab.len != d {
                    // Every process contributes its kept components; the others add zeros.
                    let mut sums: Vec<f64> = mean.iter().map(|&v| v as f64).collect();
                    s.placement.sum(&mut sums)?;
                    mean = sums.iter().map(|&v| v as f32).collect();
                }
                backend.observe(&op, s.truth, st)?;
                let truth = backend.read(st)?;
                let h = self.trace.hovmoller.get_or_insert_with(|| Hovmoller {
                    components: (0..m).map(|k| op.component(k)).collect(),
                    ..Default::default()
                });
                h.cycles.push(s.cycle);
                h.times.push(s.time);
                h.truth.extend_from_slice(&truth);
                h.mean.extend(mean);
            }
        }
        if let (true, Layout::Grid { n: side }, true) =
            (self.options.fields, self.layout, s.cycle == self.cycles)
        {
            let ens = s.gather_ensemble()?;
            self.trace.field = Some(FieldSnapshot {
                n: side,
                cycle: s.cycle,
                truth: backend.read(s.truth)?,
                mean: mean_rows(&ens, n, d),
            });
        }
        if let Some(every) = self.options.save_every {
            if s.cycle.is_multiple_of(every) {
                // Every process takes part in the gather; the root process writes.
                let ens = s.gather_ensemble()?;
                if s.placement.is_root() {
                    std::fs::create_dir_all(&self.options.save_dir).map_err(|e| Error::Io {
                        path: self.options.save_dir.display().to_string(),
                        source: e,
                    })?;
                    let path = self
                        .options
                        .save_dir
                        .join(format!("cycle_{:04}.npy", s.cycle));
                    npy::write_npy(&path, &[n, d], &ens, NpyDtype::F4)?;
                    self.trace.snapshots.push(path);
                }
            }
        }
        Ok(())
    }

    /// What was recorded.
    pub fn finish(self) -> Trace {
        self.trace
    }
}

/// Mean over the rows of a row-major `n × m` matrix, accumulated in f64.
fn mean_rows(data: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut acc = vec![0.0f64; m];
    for row in data.chunks_exact(m.max(1)).take(n) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    acc.iter().map(|&a| (a / n.max(1) as f64) as f32).collect()
}
