//! `enff.run`: a twin experiment from a preset or an experiment file, through the engine's one
//! driver loop, as `enff run` runs it.

use std::path::PathBuf;
use std::sync::Mutex;

use enff::backend::Backend;
use enff::experiment::trace::{Recorder, TraceOptions};
use enff::experiment::{output, plots, Experiment, Report, RunOptions, Source};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::backends::{self, Chosen};
use crate::errors::{to_py, EngineResultExt};

/// `overrides`: a dict `{"model.d": 80}` or a list of `"key=value"` texts.
fn override_lines(overrides: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(o) = overrides.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    if let Ok(d) = o.cast::<PyDict>() {
        return backends::settings("", Some(d));
    }
    if o.cast::<PyString>().is_err() {
        if let Ok(items) = o.try_iter() {
            let mut out = Vec::new();
            for item in items {
                let item = item?;
                let text: String = item.extract().map_err(|_| {
                    pyo3::exceptions::PyTypeError::new_err(
                        "`overrides` entries must be \"key=value\" texts (or pass a dict)",
                    )
                })?;
                out.push(text);
            }
            return Ok(out);
        }
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "`overrides` must be a dict {\"model.d\": 80} or a list of \"key=value\" texts",
    ))
}

/// Where a run writes, when it writes.
struct Files {
    dir: PathBuf,
    plots: bool,
}

/// Runs `experiment` on `backend`, writing into `files` when given; a pending Ctrl-C stops it
/// after the cycle in progress.
fn run_on<B: Backend + 'static>(
    backend: &B,
    experiment: &Experiment,
    files: Option<&Files>,
    interrupt: &Mutex<Option<PyErr>>,
) -> enff::Result<Report> {
    let options = RunOptions {
        stream_metrics: files.map(|f| f.dir.clone()),
        ..RunOptions::default()
    };
    if let Some(f) = files {
        output::write_config(&f.dir, experiment.name(), experiment.config())?;
    }
    let traced = TraceOptions {
        fields: files.is_some_and(|f| f.plots),
        ..TraceOptions::default()
    };
    let mut recorder = Recorder::<B>::new(experiment.config(), traced)?;
    let report = experiment.run_full(
        backend,
        &options,
        |_| {},
        |state| {
            if let Err(e) = Python::attach(|py| py.check_signals()) {
                *interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return Err(enff::Error::Interrupted {
                    cycle: state.cycle,
                    checkpoint: None,
                });
            }
            recorder.observe(state)
        },
    )?;
    if let Some(f) = files {
        output::write_report(&f.dir, &report)?;
        if f.plots {
            plots::write_run_plots(&f.dir, &report, Some(&recorder.finish()))?;
        }
    }
    Ok(report)
}

/// The metrics of every cycle as columns (the columns of `metrics.csv`).
fn metric_columns<'py>(py: Python<'py>, report: &Report) -> PyResult<Bound<'py, PyDict>> {
    let rows = &report.metrics;
    let col = |f: fn(&enff::experiment::CycleMetrics) -> f64| -> Bound<'py, PyAny> {
        crate::arrays::vector(py, rows.iter().map(f).collect())
    };
    let out = PyDict::new(py);
    let cycles: Vec<i64> = rows.iter().map(|r| r.cycle as i64).collect();
    out.set_item("cycle", numpy::PyArray1::from_vec(py, cycles))?;
    out.set_item("time", col(|r| r.time))?;
    out.set_item("rmse_forecast", col(|r| r.rmse_forecast))?;
    out.set_item("spread_forecast", col(|r| r.spread_forecast))?;
    out.set_item("rmse", col(|r| r.rmse))?;
    out.set_item("spread", col(|r| r.spread))?;
    out.set_item("seconds_forecast", col(|r| r.seconds_forecast))?;
    out.set_item("seconds_analysis", col(|r| r.seconds_analysis))?;
    out.set_item("ess", col(|r| r.ess.unwrap_or(f64::NAN)))?;
    Ok(out)
}

/// The engine side of `enff.run`: returns `(summary_json, metrics, config_json, name, out)`.
#[pyfunction]
#[pyo3(signature = (source, *, filter=None, backend="auto", seed=None, overrides=None, out=None, force=false, plots=true))]
#[allow(clippy::too_many_arguments)]
pub fn run<'py>(
    py: Python<'py>,
    source: &str,
    filter: Option<&str>,
    backend: &str,
    seed: Option<u64>,
    overrides: Option<&Bound<'_, PyAny>>,
    out: Option<PathBuf>,
    force: bool,
    plots: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let sets = override_lines(overrides)?;
    let mut src = Source::load(source).py()?;
    src.apply(filter, &sets, seed).py()?;
    let experiment = src.experiment().py()?;
    let chosen = backends::choose(py, backend)?;
    let files = match &out {
        Some(dir) => {
            output::prepare_dir(dir, force).py()?;
            Some(Files {
                dir: dir.clone(),
                plots,
            })
        }
        None => None,
    };
    let interrupt = Mutex::new(None);
    let result = py.detach(|| match chosen {
        Chosen::Cpu(b) => run_on(b, &experiment, files.as_ref(), &interrupt),
        Chosen::Gpu(b) => run_on(b, &experiment, files.as_ref(), &interrupt),
    });
    if let Some(e) = interrupt.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let report = result.map_err(to_py)?;
    let summary = serde_json::to_string(&report.summary)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    let config = serde_json::to_string(experiment.config())
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    let metrics = metric_columns(py, &report)?;
    let out_text = out.map(|p| p.display().to_string());
    PyTuple::new(
        py,
        [
            summary.into_pyobject(py)?.into_any(),
            metrics.into_any(),
            config.into_pyobject(py)?.into_any(),
            experiment.name().into_pyobject(py)?.into_any(),
            out_text.into_pyobject(py)?.into_any(),
        ],
    )
}

/// Names of the presets, in the order `enff preset list` shows them.
#[pyfunction]
pub fn presets<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, enff::experiment::PRESETS)
}

/// One preset as JSON text: name, description, expected band and its source, configuration.
#[pyfunction]
pub fn preset_json(name: &str) -> PyResult<String> {
    let p = enff::experiment::preset(name).py()?;
    let v = serde_json::json!({
        "name": p.name,
        "description": p.description,
        "expected_rmse": [p.expected_rmse.0, p.expected_rmse.1],
        "expected_source": p.expected_source,
        "config": p.config,
    });
    Ok(v.to_string())
}
