//! `enff.analyse` and `enff.Filter`: one analysis of a forecast made elsewhere, the same
//! numbers as `enff assimilate` on the same inputs.

use std::sync::Mutex;

use enff::backend::Backend;
use enff::experiment::assimilate::AnalysisSpec;
use enff::observe::{ObservationOperator, Observe};
use enff::{Assimilator, AssimilatorBuilder, Ensemble};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{self, HostArray};
use crate::backends::{self, Chosen};
use crate::errors::{invalid, EngineResultExt};

/// Settings of an analysis, checked.
fn spec_of(
    filter: &str,
    obs_noise_std: f64,
    obs_op: &str,
    every: usize,
    offset: usize,
    seed: u64,
    sets: Vec<String>,
) -> PyResult<AnalysisSpec> {
    if !(obs_noise_std.is_finite() && obs_noise_std > 0.0) {
        return Err(invalid(
            "obs_noise_std",
            obs_noise_std,
            "the observation noise std must be a finite positive number",
        ));
    }
    let operator = Observe::parse_pointwise(obs_op).py()?;
    let mut spec = AnalysisSpec::new(filter, obs_noise_std as f32, seed);
    spec.operator = operator;
    spec.obs_every = every;
    spec.obs_offset = offset;
    spec.sets = sets;
    // Refuse an unknown filter, setting or bad value now, not at the first analysis.
    spec_builder(&spec).and_then(|b| b.validated()).py()?;
    spec.observation_operator().py()?;
    Ok(spec)
}

/// The builder of an assimilator for `spec`, without its ensemble.
fn spec_builder(spec: &AnalysisSpec) -> enff::Result<AssimilatorBuilder> {
    let mut b = AssimilatorBuilder::new()
        .filter(&spec.filter)
        .seed(spec.seed)
        .operator(spec.observation_operator()?)
        .obs_noise_std(spec.obs_noise_std);
    for s in &spec.sets {
        b = b.set(s);
    }
    Ok(b)
}

/// The inputs of one analysis, read from numpy.
struct Inputs {
    forecast: Ensemble,
    previous: Option<Ensemble>,
    y: Vec<f32>,
    dtype: arrays::Dtype,
    shape: Vec<usize>,
}

fn read_inputs(
    spec: &AnalysisSpec,
    forecast: &Bound<'_, PyAny>,
    obs: &Bound<'_, PyAny>,
    previous: Option<&Bound<'_, PyAny>>,
) -> PyResult<Inputs> {
    let f = arrays::read("forecast", forecast, &[2], "(n, d): one row per member")?;
    let (n, d) = f.rows_cols();
    let m = spec.observation_operator().py()?.obs_dim(d).py()?;
    let y = arrays::read("obs", obs, &[1, 2], &format!("({m},)"))?;
    if y.rows_cols() != (1, m) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "`obs` must have shape ({m},): {} of a state of d = {d} components, got shape {}",
            spec.observation_operator().py()?.name(),
            enff::error::shape_text(&y.shape)
        )));
    }
    let previous = match previous {
        Some(p) if !p.is_none() => {
            let p: HostArray = arrays::read("previous", p, &[2], &format!("({n}, {d})"))?;
            if p.rows_cols() != (n, d) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "`previous` must have the forecast's shape ({n}, {d}), got {}",
                    enff::error::shape_text(&p.shape)
                )));
            }
            Some(Ensemble::from_vec(n, d, p.data).py()?)
        }
        _ => None,
    };
    Ok(Inputs {
        forecast: Ensemble::from_vec(n, d, f.data).py()?,
        previous,
        y: y.data,
        dtype: f.dtype,
        shape: f.shape,
    })
}

/// One analysis on a cached assimilator (rebuilt when the shape changes); returns the
/// analysis ensemble, row-major.
fn analyse_on<B: Backend + 'static>(
    backend: &'static B,
    cached: &mut Option<Assimilator<'static, B>>,
    spec: &AnalysisSpec,
    inputs: &Inputs,
    cycle: u32,
) -> enff::Result<Vec<f32>> {
    let (n, d) = (inputs.forecast.n(), inputs.forecast.d());
    let reuse = matches!(cached, Some(a) if a.n() == n && a.d() == d);
    if !reuse {
        let da = spec_builder(spec)?
            .initial_ensemble(inputs.forecast.clone())
            .build(backend)?;
        *cached = Some(da);
    }
    let da = cached.as_mut().expect("built above");
    da.restart(&inputs.forecast, inputs.previous.as_ref(), cycle)?;
    da.analyse(&inputs.y)?;
    Ok(da.ensemble()?.into_vec())
}

/// A configured filter on a backend, for repeated analyses of forecasts made elsewhere.
///
/// Filter(filter="enff-f2p", *, obs_noise_std, obs_op="identity", every=1, offset=0, seed=0,
///        backend="auto", **settings)
///
/// `settings` are the filter's settings (`sigma_min=0.05`, `flow_steps=9`, `guidance="covariance"`
/// …, as `filter.*` keys of `enff preset show`). The device and the ensemble buffers are made
/// once and reused while the shape stays the same. Each `analyse` call is independent: its
/// random numbers come from `(seed, cycle)`, and `cycle` counts up by one per call unless given.
#[pyclass(module = "enff")]
pub struct Filter {
    spec: AnalysisSpec,
    /// `cpu` or `gpu` (read without the engine's lock).
    backend: &'static str,
    next_cycle: Mutex<u32>,
    /// Nanoseconds spent in the engine (upload, analysis, read-back) over all calls.
    engine_nanos: std::sync::atomic::AtomicU64,
    engine: Mutex<Engine>,
}

/// The backend and the assimilator built on it for the last ensemble shape.
enum Engine {
    Cpu(
        &'static enff::backend::cpu::Cpu,
        Option<Assimilator<'static, enff::backend::cpu::Cpu>>,
    ),
    Gpu(
        &'static enff::backend::gpu::Gpu,
        Option<Assimilator<'static, enff::backend::gpu::Gpu>>,
    ),
}

impl Filter {
    fn run(
        &self,
        py: Python<'_>,
        forecast: &Bound<'_, PyAny>,
        obs: &Bound<'_, PyAny>,
        previous: Option<&Bound<'_, PyAny>>,
        cycle: Option<u32>,
    ) -> PyResult<Py<PyAny>> {
        let inputs = read_inputs(&self.spec, forecast, obs, previous)?;
        let cycle = {
            let mut next = self.next_cycle.lock().unwrap_or_else(|p| p.into_inner());
            let c = cycle.unwrap_or(*next);
            *next = c.saturating_add(1);
            c
        };
        let spec = &self.spec;
        let data = py
            .detach(|| {
                let start = std::time::Instant::now();
                let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
                let r = match &mut *engine {
                    Engine::Cpu(b, cached) => analyse_on(*b, cached, spec, &inputs, cycle),
                    Engine::Gpu(b, cached) => analyse_on(*b, cached, spec, &inputs, cycle),
                };
                self.engine_nanos.fetch_add(
                    start.elapsed().as_nanos() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                r
            })
            .py()?;
        Ok(arrays::write(py, data, &inputs.shape, inputs.dtype)?.unbind())
    }
}

#[pymethods]
impl Filter {
    #[new]
    #[pyo3(signature = (filter="enff-f2p", *, obs_noise_std, obs_op="identity", every=1, offset=0, seed=0, cycle=1, backend="auto", **settings))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        filter: &str,
        obs_noise_std: f64,
        obs_op: &str,
        every: usize,
        offset: usize,
        seed: u64,
        cycle: u32,
        backend: &str,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let sets = backends::settings("filter.", settings)?;
        let spec = spec_of(filter, obs_noise_std, obs_op, every, offset, seed, sets)?;
        let (engine, backend) = match backends::choose(py, backend)? {
            Chosen::Cpu(b) => (Engine::Cpu(b, None), "cpu"),
            Chosen::Gpu(b) => (Engine::Gpu(b, None), "gpu"),
        };
        Ok(Filter {
            spec,
            backend,
            next_cycle: Mutex::new(cycle),
            engine_nanos: std::sync::atomic::AtomicU64::new(0),
            engine: Mutex::new(engine),
        })
    }

    /// The analysis of `forecast` (n, d) for the observation `obs` (m,), in the forecast's
    /// dtype. `previous` is EnFF-F2P's previous analysis (default: the forecast itself);
    /// `cycle` picks the random numbers with the seed (default: one more than the last call).
    #[pyo3(signature = (forecast, obs, *, previous=None, cycle=None))]
    fn analyse(
        &self,
        py: Python<'_>,
        forecast: &Bound<'_, PyAny>,
        obs: &Bound<'_, PyAny>,
        previous: Option<&Bound<'_, PyAny>>,
        cycle: Option<u32>,
    ) -> PyResult<Py<PyAny>> {
        self.run(py, forecast, obs, previous, cycle)
    }

    /// The filter's name (`enff-f2p`, `etkf` …).
    #[getter]
    fn name(&self) -> String {
        self.spec.filter.clone()
    }

    /// The backend the analyses run on: `cpu` or `gpu`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// The cycle number the next call gets unless it names one.
    #[getter]
    fn cycle(&self) -> u32 {
        *self.next_cycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds spent inside the engine (ensemble upload, analysis, read-back) over all calls:
    /// a call's wall time less this is the cost of the Python layer.
    #[getter]
    fn engine_seconds(&self) -> f64 {
        self.engine_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    /// The filter settings given, as `filter.key=value` lines.
    #[getter]
    fn settings(&self) -> Vec<String> {
        self.spec.sets.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "enff.Filter({:?}, obs_noise_std={}, obs_op={:?}, every={}, offset={}, seed={}, \
             backend={:?}{})",
            self.spec.filter,
            self.spec.obs_noise_std,
            self.spec.operator.as_str(),
            self.spec.obs_every,
            self.spec.obs_offset,
            self.spec.seed,
            self.backend(),
            self.spec
                .sets
                .iter()
                .map(|s| format!(", {s}"))
                .collect::<String>()
        )
    }
}

/// analyse(forecast, obs, obs_noise_std, *, filter="enff-f2p", obs_op="identity", every=1,
///         offset=0, previous=None, seed=0, cycle=1, backend="auto", **settings)
///
/// One analysis: the same numbers as `enff assimilate` on the same inputs.
#[pyfunction]
#[pyo3(signature = (forecast, obs, obs_noise_std, *, filter="enff-f2p", obs_op="identity", every=1, offset=0, previous=None, seed=0, cycle=1, backend="auto", **settings))]
#[allow(clippy::too_many_arguments)]
pub fn analyse(
    py: Python<'_>,
    forecast: &Bound<'_, PyAny>,
    obs: &Bound<'_, PyAny>,
    obs_noise_std: f64,
    filter: &str,
    obs_op: &str,
    every: usize,
    offset: usize,
    previous: Option<&Bound<'_, PyAny>>,
    seed: u64,
    cycle: u32,
    backend: &str,
    settings: Option<&Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let f = Filter::new(
        py,
        filter,
        obs_noise_std,
        obs_op,
        every,
        offset,
        seed,
        cycle,
        backend,
        settings,
    )?;
    f.run(py, forecast, obs, previous, Some(cycle))
}
