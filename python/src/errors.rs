//! The engine's typed errors as Python exceptions.
//!
//! Bad input (a parameter, a shape, a setting, a non-finite value) is a `ValueError` naming
//! the parameter and the fix; a divergence is `enff.DivergenceError` (a `RuntimeError` with
//! `cycle`, `stage` and `detail`); an operation a backend cannot run is
//! `enff.UnsupportedError` (a `ValueError`); a device failure a `RuntimeError`; file trouble an
//! `OSError`; an interrupted run `KeyboardInterrupt`.

use enff::Error;
use pyo3::exceptions::{
    PyFileExistsError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

pyo3::create_exception!(
    enff,
    DivergenceError,
    PyRuntimeError,
    "The ensemble became non-finite during a run or an analysis; `cycle`, `stage` and \
     `detail` say where and what was seen."
);
pyo3::create_exception!(
    enff,
    UnsupportedError,
    PyValueError,
    "The chosen backend cannot run what was asked; the message says what to do instead."
);

/// The Python exception for an engine error.
pub fn to_py(e: Error) -> PyErr {
    let message = e.to_string();
    match e.root() {
        Error::Diverged {
            cycle,
            stage,
            detail,
        } => Python::attach(|py| {
            let err = DivergenceError::new_err(message);
            let value = err.value(py);
            // Setting attributes on a fresh exception object cannot fail.
            let _ = value.setattr("cycle", *cycle);
            let _ = value.setattr("stage", stage.as_str());
            let _ = value.setattr("detail", detail.as_str());
            err
        }),
        Error::Unsupported { .. } => UnsupportedError::new_err(message),
        Error::Interrupted { .. } => PyKeyboardInterrupt::new_err(message),
        Error::Gpu(_) | Error::Distributed { .. } => PyRuntimeError::new_err(message),
        Error::OutputExists { .. } => PyFileExistsError::new_err(message),
        Error::Io { .. } => PyOSError::new_err(message),
        Error::Resumable { .. } => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

/// `ValueError` naming a parameter, what was wrong and the fix.
pub fn invalid(name: &str, problem: impl std::fmt::Display, fix: &str) -> PyErr {
    PyValueError::new_err(format!("invalid value for `{name}`: {problem} ({fix})"))
}

/// Engine results as Python results.
pub trait EngineResultExt<T> {
    /// The result with an engine error turned into its Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> EngineResultExt<T> for enff::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
