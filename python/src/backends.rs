//! The backends a Python process uses: created once, on first use, and shared by every call
//! (a device is expensive to open; the ensemble buffers of each call stay its own).

use std::sync::OnceLock;

use enff::backend::cpu::Cpu;
use enff::backend::gpu::{Gpu, GpuOptions};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::invalid;

/// A backend chosen by name.
#[derive(Clone, Copy)]
pub enum Chosen {
    Cpu(&'static Cpu),
    Gpu(&'static Gpu),
}

static CPU: OnceLock<Cpu> = OnceLock::new();
/// A hardware GPU (what `backend="auto"` uses), or why there is none.
static HARDWARE_GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
/// Any GPU adapter, software ones included (`backend="gpu"`).
static ANY_GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
static FALLBACK_LOGGED: OnceLock<()> = OnceLock::new();

fn cpu() -> &'static Cpu {
    CPU.get_or_init(Cpu::new)
}

fn gpu(
    cell: &'static OnceLock<Result<Gpu, String>>,
    allow_software: bool,
) -> Result<&'static Gpu, String> {
    cell.get_or_init(|| {
        Gpu::new(GpuOptions {
            allow_software,
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// The backend for `name` (`auto`, `cpu` or `gpu`). Opening a device happens with the GIL
/// released. `auto` takes a hardware GPU when there is one, else the CPU (logged once; an
/// error instead when `ENFF_REQUIRE_GPU=1`).
pub fn choose(py: Python<'_>, name: &str) -> PyResult<Chosen> {
    match name {
        "cpu" => Ok(Chosen::Cpu(cpu())),
        "gpu" => py
            .detach(|| gpu(&ANY_GPU, true))
            .map(Chosen::Gpu)
            .map_err(|e| PyRuntimeError::new_err(format!("backend=\"gpu\": {e}"))),
        "auto" => match py.detach(|| gpu(&HARDWARE_GPU, false)) {
            Ok(g) => Ok(Chosen::Gpu(g)),
            Err(e) => {
                if std::env::var("ENFF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    return Err(PyRuntimeError::new_err(format!(
                        "ENFF_REQUIRE_GPU=1 and no hardware GPU: {e}"
                    )));
                }
                FALLBACK_LOGGED.get_or_init(|| {
                    log::info!("no hardware GPU adapter ({e}); running on the CPU");
                });
                Ok(Chosen::Cpu(cpu()))
            }
        },
        other => Err(invalid(
            "backend",
            format!("\"{other}\""),
            "choose \"auto\" (a hardware GPU when found, else the CPU), \"cpu\" or \"gpu\"",
        )),
    }
}

/// Runs `$body` with `$b` bound to the chosen concrete backend.
#[macro_export]
macro_rules! on_backend {
    ($chosen:expr, $b:ident => $body:expr) => {
        match $chosen {
            $crate::backends::Chosen::Cpu($b) => $body,
            $crate::backends::Chosen::Gpu($b) => $body,
        }
    };
}

/// `key=value` engine settings from Python keyword arguments: `sigma_min=0.05` or
/// `filter.sigma_min=0.05` (a bare key gets `prefix`), `True`/`False` as `true`/`false`,
/// `None` as `none`.
pub fn settings(
    prefix: &str,
    kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
) -> PyResult<Vec<String>> {
    let mut out = Vec::new();
    if let Some(kw) = kwargs {
        for (k, v) in kw.iter() {
            let key: String = k.extract()?;
            let key = if key.contains('.') {
                key
            } else {
                format!("{prefix}{key}")
            };
            out.push(format!("{key}={}", value_text(&v)?));
        }
    }
    Ok(out)
}

/// A Python value as the text of a `--set` value.
pub fn value_text(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if v.is_none() {
        return Ok("none".into());
    }
    if let Ok(b) = v.cast::<pyo3::types::PyBool>() {
        return Ok(if b.is_true() { "true" } else { "false" }.into());
    }
    if let Ok(s) = v.cast::<pyo3::types::PyString>() {
        return Ok(s.to_string());
    }
    Ok(v.str()?.to_string())
}
