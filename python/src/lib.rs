//! The engine side of the `enff` Python package (the module `enff._enff`): numpy arrays in and
//! out, the GIL released while the engine works, engine errors as Python exceptions. The
//! Python layer (`python/enff/`) adds the result types, the DAPPER adapter and the docs.

mod arrays;
mod assimilator;
mod backends;
mod errors;
mod filter;
mod run;

use pyo3::prelude::*;

/// Which backends this process can use, as a dict: `cpu` (threads), `gpu` (the adapter
/// `backend="auto"` would take, or why there is none).
#[pyfunction]
fn info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    use enff::backend::Backend;
    let out = pyo3::types::PyDict::new(py);
    let cpu = enff::backend::cpu::Cpu::new();
    out.set_item("cpu", cpu.describe())?;
    let gpu = py.detach(|| {
        enff::backend::gpu::Gpu::new(enff::backend::gpu::GpuOptions::default())
            .map(|g| g.describe())
            .map_err(|e| e.to_string())
    });
    match gpu {
        Ok(d) => out.set_item("gpu", d)?,
        Err(e) => out.set_item("gpu", format!("none ({e})"))?,
    }
    Ok(out)
}

#[pymodule]
fn _enff(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Engine log lines go to Python's `logging` (logger names start with "enff").
    let _ = pyo3_log::try_init();
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DivergenceError", py.get_type::<errors::DivergenceError>())?;
    m.add(
        "UnsupportedError",
        py.get_type::<errors::UnsupportedError>(),
    )?;
    m.add_class::<filter::Filter>()?;
    m.add_class::<assimilator::Assimilator>()?;
    m.add_function(wrap_pyfunction!(filter::analyse, m)?)?;
    m.add_function(wrap_pyfunction!(run::run, m)?)?;
    m.add_function(wrap_pyfunction!(run::presets, m)?)?;
    m.add_function(wrap_pyfunction!(run::preset_json, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    Ok(())
}
