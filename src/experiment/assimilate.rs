//! One analysis step for a model that lives elsewhere (`enff assimilate`): a forecast ensemble
//! and an observation in, the analysis ensemble out, through `.npy` files.
//!
//! The step is the same as one cycle of a twin experiment: the filter is built from the same
//! settings ([`super::build_filter`]), its random numbers come from `(seed, cycle)`, and with
//! EnFF-F2P the previous analysis defaults to the forecast itself (a twin experiment's first
//! cycle). The same inputs, seed and cycle give the same analysis, bit for bit on the CPU.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::npy::{self, NpyArray, NpyDtype};
use crate::observe::{ObservationOperator, Observe, Pointwise};
use crate::{AssimilatorBuilder, Ensemble};

/// What one analysis step needs besides the arrays.
#[derive(Clone, Debug)]
pub struct AnalysisSpec {
    /// Filter name (`enff-f2p`, `enff-ot`, `ensf`, `etkf`, `letkf`, `enkf`, `bpf`).
    pub filter: String,
    /// `filter.key=value` settings.
    pub sets: Vec<String>,
    /// Observation noise std `σ_y`.
    pub obs_noise_std: f32,
    /// Pointwise part of the observation operator.
    pub operator: Pointwise,
    /// Observe every `obs_every`-th component (1 = all).
    pub obs_every: usize,
    /// First observed component.
    pub obs_offset: usize,
    /// Seed of the filter's random numbers.
    pub seed: u64,
    /// Cycle number of this analysis (with the seed it picks the random numbers).
    pub cycle: u32,
}

impl AnalysisSpec {
    /// EnFF-F2P with identity observations of every component, cycle 1.
    pub fn new(filter: &str, obs_noise_std: f32, seed: u64) -> Self {
        AnalysisSpec {
            filter: filter.to_string(),
            sets: Vec::new(),
            obs_noise_std,
            operator: Pointwise::Identity,
            obs_every: 1,
            obs_offset: 0,
            seed,
            cycle: 1,
        }
    }

    /// The observation operator.
    pub fn observation_operator(&self) -> Result<Observe> {
        Observe::full(self.operator)
            .subsample(self.obs_every, self.obs_offset)
            .map_err(|e| match e {
                Error::InvalidParameter { name, value, fix } => Error::InvalidParameter {
                    name: name
                        .replace("observe.every", "--obs-every")
                        .replace("observe.offset", "--obs-offset"),
                    value,
                    fix,
                },
                other => other,
            })
    }
}

/// The analysis of `forecast` (`n × d`) for the observation `y` on `backend`.
pub fn assimilate<B: Backend + 'static>(
    backend: &B,
    forecast: &Ensemble,
    previous: Option<&Ensemble>,
    y: &[f32],
    spec: &AnalysisSpec,
) -> Result<Ensemble> {
    let op = spec.observation_operator()?;
    let m = op.obs_dim(forecast.d())?;
    if y.len() != m {
        return Err(Error::shape(
            "observation (--obs)",
            format!(
                "{m} values: {} of a state of d = {} components",
                op.name(),
                forecast.d()
            ),
            format!("{} values", y.len()),
        ));
    }
    let mut builder = AssimilatorBuilder::new()
        .filter(&spec.filter)
        .seed(spec.seed)
        .first_cycle(spec.cycle)
        .operator(op)
        .obs_noise_std(spec.obs_noise_std)
        .initial_ensemble(forecast.clone());
    for s in &spec.sets {
        builder = builder.set(s);
    }
    if let Some(p) = previous {
        builder = builder.previous_analysis(p.clone());
    }
    let mut da = builder.build(backend)?;
    da.analyse(y)?;
    da.ensemble()
}

/// The files of one `enff assimilate` call.
#[derive(Clone, Debug)]
pub struct AssimilateFiles {
    /// Forecast ensemble, `(n, d)`.
    pub forecast: PathBuf,
    /// Observation, `(m,)` or `(1, m)`.
    pub obs: PathBuf,
    /// Previous analysis, `(n, d)` (EnFF-F2P's source; default: the forecast).
    pub previous: Option<PathBuf>,
    /// Where the analysis goes, `(n, d)`, in the forecast's dtype.
    pub out: PathBuf,
}

/// What [`assimilate_files`] did.
#[derive(Clone, Debug)]
pub struct AssimilateOutcome {
    /// Members.
    pub n: usize,
    /// State dimension.
    pub d: usize,
    /// Observation dimension.
    pub m: usize,
    /// The filter's name.
    pub filter: String,
    /// The dtype written.
    pub dtype: NpyDtype,
    /// The analysis.
    pub analysis: Ensemble,
}

/// Reads a forecast-shaped `(n, d)` ensemble.
fn read_ensemble(path: &Path, what: &str, flag: &str) -> Result<(Ensemble, NpyArray)> {
    let a = npy::read_npy(path)?;
    if a.shape.len() != 2 {
        return Err(Error::shape(
            format!("{what} ({flag} {})", path.display()),
            "2-D (n, d): one row per member",
            a.shape_text(),
        ));
    }
    let (n, d) = a.rows_cols();
    let e = Ensemble::from_vec(n, d, a.data.clone())?;
    Ok((e, a))
}

/// Reads the files, runs [`assimilate`] and writes the analysis (atomically).
pub fn assimilate_files<B: Backend + 'static>(
    backend: &B,
    files: &AssimilateFiles,
    spec: &AnalysisSpec,
) -> Result<AssimilateOutcome> {
    let (forecast, raw) = read_ensemble(&files.forecast, "forecast", "--forecast")?;
    let (n, d) = (forecast.n(), forecast.d());
    let previous = match &files.previous {
        Some(p) => {
            let (e, a) = read_ensemble(p, "previous analysis", "--previous")?;
            if (e.n(), e.d()) != (n, d) {
                return Err(Error::shape(
                    format!("previous analysis (--previous {})", p.display()),
                    format!("({n}, {d}), the forecast's shape"),
                    a.shape_text(),
                ));
            }
            Some(e)
        }
        None => None,
    };
    let y = npy::read_npy(&files.obs)?;
    let op = spec.observation_operator()?;
    let m = op.obs_dim(d)?;
    let (rows, cols) = y.rows_cols();
    if rows != 1 || cols != m {
        return Err(Error::shape(
            format!("observation (--obs {})", files.obs.display()),
            format!(
                "({m},) or (1, {m}): {} of a state of d = {d} components",
                op.name()
            ),
            y.shape_text(),
        ));
    }
    let analysis = assimilate(backend, &forecast, previous.as_ref(), &y.data, spec)?;
    npy::write_npy(&files.out, &[n, d], analysis.as_slice(), raw.dtype)?;
    Ok(AssimilateOutcome {
        n,
        d,
        m,
        filter: spec.filter.clone(),
        dtype: raw.dtype,
        analysis,
    })
}
