//! `enff.Assimilator`: the engine's assimilator around a model written in Python (or none),
//! with a built-in or a Python observation operator.

use std::fmt;
use std::sync::{Arc, Mutex};

use enff::backend::Backend;
use enff::observe::{ObservationOperator, Observe};
use enff::{Assimilator as Engine, AssimilatorBuilder, Ensemble};
use numpy::PyArrayMethods;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{self, Dtype};
use crate::backends::{self, Chosen};
use crate::errors::{invalid, EngineResultExt};

/// An observation operator written in Python: `h(x) -> y` of one state (float64 arrays) and,
/// for the filters that follow its gradient, `adjoint(x, r) -> J_h(x)^T r`.
///
/// The engine calls it once per member from its worker threads, taking the GIL for each
/// call. The first Python error is kept (the values of that call become NaN, which stops the
/// analysis) and raised in place of the engine's error.
pub struct PyOperator {
    h: Py<PyAny>,
    adjoint: Option<Py<PyAny>>,
    d: usize,
    m: usize,
    linear: bool,
    name: String,
    error: Mutex<Option<PyErr>>,
}

impl fmt::Debug for PyOperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PyOperator({})", self.name)
    }
}

impl PyOperator {
    fn keep(&self, e: PyErr) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// The first Python error met since the last call.
    pub fn take_error(&self) -> Option<PyErr> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Calls `f(*args)` with float64 vectors and reads a float64 vector of length `len` back.
    fn call(
        &self,
        py: Python<'_>,
        f: &Py<PyAny>,
        args: &[&[f32]],
        len: usize,
        what: &str,
    ) -> PyResult<Vec<f32>> {
        let arrays: Vec<Bound<'_, PyAny>> = args
            .iter()
            .map(|a| arrays::vector(py, a.iter().map(|v| *v as f64).collect()))
            .collect();
        let tuple = pyo3::types::PyTuple::new(py, arrays)?;
        let out = f.bind(py).call1(tuple)?;
        let out = numpy_vector(py, &out, what)?;
        if out.len() != len {
            return Err(PyValueError::new_err(format!(
                "{what} returned {} values; it must return {len}",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// Any 1-D array-like of numbers as float32 (the result of a user function).
fn numpy_vector(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<f32>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj, "float64")).map_err(|e| {
        PyTypeError::new_err(format!(
            "{what} returned something that is not an array of numbers: {e}"
        ))
    })?;
    let arr = np.call_method1("ravel", (arr,))?;
    let a = arr.cast::<numpy::PyArray1<f64>>()?.readonly();
    Ok(a.as_array().iter().map(|v| *v as f32).collect())
}

impl ObservationOperator for PyOperator {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn obs_dim(&self, d: usize) -> enff::Result<usize> {
        if d != self.d {
            return Err(enff::Error::shape(
                "observation operator",
                format!("a state of d = {} components (its probe)", self.d),
                format!("d = {d}"),
            ));
        }
        Ok(self.m)
    }

    fn apply(&self, x: &[f32], y: &mut [f32]) {
        let r = Python::attach(|py| self.call(py, &self.h, &[x], self.m, "obs_op(x)"));
        match r {
            Ok(v) => y.copy_from_slice(&v),
            Err(e) => {
                self.keep(e);
                y.fill(f32::NAN);
            }
        }
    }

    fn adjoint(&self, x: &[f32], r: &[f32], out: &mut [f32]) {
        let res = match &self.adjoint {
            Some(f) => Python::attach(|py| self.call(py, f, &[x, r], self.d, "obs_adjoint(x, r)")),
            None => Err(PyValueError::new_err(
                "this filter follows the gradient of the observation operator: give \
                 obs_adjoint=f(x, r) returning J_h(x)^T r, or choose a filter that needs only \
                 h (etkf, enkf, letkf, or EnFF with guidance=\"covariance\")",
            )),
        };
        match res {
            Ok(v) => out.copy_from_slice(&v),
            Err(e) => {
                self.keep(e);
                out.fill(f32::NAN);
            }
        }
    }

    fn is_linear(&self) -> bool {
        self.linear
    }
}

enum Inner {
    Cpu(Engine<'static, enff::backend::cpu::Cpu>),
    Gpu(Engine<'static, enff::backend::gpu::Gpu>),
}

macro_rules! with_engine {
    ($inner:expr, $a:ident => $body:expr) => {
        match $inner {
            Inner::Cpu($a) => $body,
            Inner::Gpu($a) => $body,
        }
    };
}

/// Data assimilation around a model of yours, one cycle at a time.
///
/// Assimilator(initial, obs_noise_std, *, model=None, dt=1.0, t0=0.0, obs_op="identity",
///             obs_adjoint=None, obs_linear=False, every=1, offset=0, filter="enff-f2p",
///             previous=None, seed=0, backend="auto", **settings)
///
/// `initial` is the (n, d) ensemble. `model(ensemble, t, dt) -> ensemble` advances all members
/// (an (n, d) array) from time `t` to `t + dt`; `forecast()` calls it once per cycle. Without a
/// model, forecasts made elsewhere enter with `set_ensemble`. `obs_op` is `"identity"`,
/// `"arctan"` or `"tanh"` of every `every`-th component from `offset` (these run on the backend),
/// or a Python function `h(x) -> y` of one state, with `obs_adjoint(x, r) -> J_h(x)^T r` for
/// the filters that follow its gradient (EnFF with local guidance, EnSF). Each cycle is
/// `forecast()` then `analyse(y)`.
#[pyclass(module = "enff")]
pub struct Assimilator {
    inner: Mutex<Inner>,
    model: Option<Py<PyAny>>,
    operator: Option<Arc<PyOperator>>,
    dt: f64,
    t: Mutex<f64>,
    dtype: Dtype,
    n: usize,
    d: usize,
    m: usize,
    filter: String,
    backend: &'static str,
    /// The number the next analysis gets (read without the engine's lock).
    cycle: std::sync::atomic::AtomicU32,
}

fn build<B: Backend + 'static>(
    builder: AssimilatorBuilder,
    backend: &'static B,
) -> enff::Result<Engine<'static, B>> {
    builder.build(backend)
}

impl Assimilator {
    /// The engine's error, or the Python operator's error that caused it.
    fn fail(&self, e: enff::Error) -> PyErr {
        match self.operator.as_ref().and_then(|op| op.take_error()) {
            Some(py_err) => py_err,
            None => crate::errors::to_py(e),
        }
    }

    fn host_ensemble(&self, py: Python<'_>) -> PyResult<Vec<f32>> {
        let inner = &self.inner;
        py.detach(|| {
            let g = inner.lock().unwrap_or_else(|p| p.into_inner());
            with_engine!(&*g, a => a.ensemble().map(|e| e.into_vec()))
        })
        .py()
    }

    fn replace(&self, py: Python<'_>, e: Ensemble) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| {
            let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
            with_engine!(&mut *g, a => a.set_ensemble(&e))
        })
        .py()
    }
}

#[pymethods]
impl Assimilator {
    #[new]
    #[pyo3(signature = (initial, obs_noise_std, *, model=None, dt=1.0, t0=0.0, obs_op=None, obs_adjoint=None, obs_linear=false, every=1, offset=0, filter="enff-f2p", previous=None, seed=0, cycle=1, backend="auto", **settings))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        initial: &Bound<'_, PyAny>,
        obs_noise_std: f64,
        model: Option<Py<PyAny>>,
        dt: f64,
        t0: f64,
        obs_op: Option<&Bound<'_, PyAny>>,
        obs_adjoint: Option<Py<PyAny>>,
        obs_linear: bool,
        every: usize,
        offset: usize,
        filter: &str,
        previous: Option<&Bound<'_, PyAny>>,
        seed: u64,
        cycle: u32,
        backend: &str,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let init = arrays::read("initial", initial, &[2], "(n, d): one row per member")?;
        let (n, d) = init.rows_cols();
        if let Some(m) = &model {
            if !m.bind(py).is_callable() {
                return Err(PyTypeError::new_err(
                    "`model` must be a function model(ensemble, t, dt) -> ensemble",
                ));
            }
        }
        if !(dt.is_finite() && dt > 0.0) {
            return Err(invalid(
                "dt",
                dt,
                "the forecast length must be a finite positive number",
            ));
        }
        if !t0.is_finite() {
            return Err(invalid("t0", t0, "the initial time must be finite"));
        }
        let mut builder = AssimilatorBuilder::new()
            .filter(filter)
            .seed(seed)
            .first_cycle(cycle)
            .obs_noise_std(obs_noise_std as f32);
        if !(obs_noise_std.is_finite() && obs_noise_std > 0.0) {
            return Err(invalid(
                "obs_noise_std",
                obs_noise_std,
                "the observation noise std must be a finite positive number",
            ));
        }
        for s in backends::settings("filter.", settings)? {
            builder = builder.set(&s);
        }
        let mut py_operator = None;
        match obs_op {
            Some(f) if f.is_callable() => {
                let probe: Vec<f64> = init.data[..d].iter().map(|v| *v as f64).collect();
                let y = f.call1((arrays::vector(py, probe),)).map_err(|e| {
                    PyValueError::new_err(format!(
                        "obs_op(x) failed on the first member of `initial`: {e}"
                    ))
                })?;
                let m = numpy_vector(py, &y, "obs_op(x)")?.len();
                if m == 0 {
                    return Err(PyValueError::new_err("obs_op(x) returned no values"));
                }
                let name = f
                    .getattr("__name__")
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "python".into());
                if let Some(a) = &obs_adjoint {
                    if !a.bind(py).is_callable() {
                        return Err(PyTypeError::new_err(
                            "`obs_adjoint` must be a function obs_adjoint(x, r) -> J_h(x)^T r",
                        ));
                    }
                }
                let op = Arc::new(PyOperator {
                    h: f.clone().unbind(),
                    adjoint: obs_adjoint,
                    d,
                    m,
                    linear: obs_linear,
                    name: format!("{name} (Python)"),
                    error: Mutex::new(None),
                });
                builder = builder.operator_arc(op.clone());
                py_operator = Some(op);
            }
            Some(f) if !f.is_none() => {
                let name: String = f.extract().map_err(|_| {
                    PyTypeError::new_err(
                        "`obs_op` must be \"identity\", \"arctan\", \"tanh\" or a function h(x) -> y",
                    )
                })?;
                let p = Observe::parse_pointwise(&name).py()?;
                let op = Observe::full(p).subsample(every, offset).map_err(|e| {
                    PyValueError::new_err(
                        e.to_string()
                            .replace("observe.every", "every")
                            .replace("observe.offset", "offset"),
                    )
                })?;
                builder = builder.operator(op);
            }
            _ => {
                let op = Observe::identity().subsample(every, offset).map_err(|e| {
                    PyValueError::new_err(
                        e.to_string()
                            .replace("observe.every", "every")
                            .replace("observe.offset", "offset"),
                    )
                })?;
                builder = builder.operator(op);
            }
        }
        if let Some(p) = previous.filter(|p| !p.is_none()) {
            let p = arrays::read("previous", p, &[2], &format!("({n}, {d})"))?;
            if p.rows_cols() != (n, d) {
                return Err(PyValueError::new_err(format!(
                    "`previous` must have the initial ensemble's shape ({n}, {d}), got {}",
                    enff::error::shape_text(&p.shape)
                )));
            }
            builder = builder.previous_analysis(Ensemble::from_vec(n, d, p.data).py()?);
        }
        let builder = builder.initial_ensemble(Ensemble::from_vec(n, d, init.data).py()?);
        let chosen = backends::choose(py, backend)?;
        let inner = py
            .detach(|| match chosen {
                Chosen::Cpu(b) => build(builder, b).map(Inner::Cpu),
                Chosen::Gpu(b) => build(builder, b).map(Inner::Gpu),
            })
            .py()?;
        let (m, filter, backend, cycle) = match &inner {
            Inner::Cpu(a) => (a.m(), a.filter_name(), "cpu", a.cycle()),
            Inner::Gpu(a) => (a.m(), a.filter_name(), "gpu", a.cycle()),
        };
        Ok(Assimilator {
            m,
            filter,
            backend,
            cycle: std::sync::atomic::AtomicU32::new(cycle),
            inner: Mutex::new(inner),
            model,
            operator: py_operator,
            dt,
            t: Mutex::new(t0),
            dtype: init.dtype,
            n,
            d,
        })
    }

    /// Advances every member by `dt` with the model; the current ensemble becomes the
    /// previous analysis.
    fn forecast(&self, py: Python<'_>) -> PyResult<()> {
        let Some(model) = &self.model else {
            return Err(PyValueError::new_err(
                "this Assimilator has no model: give model=f(ensemble, t, dt) when you make \
                 it, or pass forecasts made elsewhere to set_ensemble",
            ));
        };
        let t = *self.t.lock().unwrap_or_else(|p| p.into_inner());
        let host = self.host_ensemble(py)?;
        let e = arrays::write(py, host, &[self.n, self.d], self.dtype)?;
        let out = model.bind(py).call1((e, t, self.dt))?;
        // A model may return a view or a list: take it as a contiguous array first.
        let out = py
            .import("numpy")?
            .call_method1("ascontiguousarray", (out,))
            .map_err(|e| {
                PyTypeError::new_err(format!(
                    "the model returned something that is not an array: {e}"
                ))
            })?;
        let expected = format!("({}, {}), the ensemble's shape", self.n, self.d);
        let next = arrays::read("model(ensemble, t, dt)", &out, &[2], &expected)
            .map_err(|e| PyValueError::new_err(format!("the model's result: {e}")))?;
        if next.rows_cols() != (self.n, self.d) {
            return Err(PyValueError::new_err(format!(
                "the model returned shape {}; it must return {expected}",
                enff::error::shape_text(&next.shape)
            )));
        }
        self.replace(py, Ensemble::from_vec(self.n, self.d, next.data).py()?)?;
        *self.t.lock().unwrap_or_else(|p| p.into_inner()) = t + self.dt;
        Ok(())
    }

    /// Replaces the ensemble by a forecast made elsewhere, shape (n, d); the current ensemble
    /// becomes the previous analysis.
    fn set_ensemble(&self, py: Python<'_>, forecast: &Bound<'_, PyAny>) -> PyResult<()> {
        let expected = format!("({}, {})", self.n, self.d);
        let f = arrays::read("forecast", forecast, &[2], &expected)?;
        if f.rows_cols() != (self.n, self.d) {
            return Err(PyValueError::new_err(format!(
                "`forecast` must have shape {expected}, got {}",
                enff::error::shape_text(&f.shape)
            )));
        }
        self.replace(py, Ensemble::from_vec(self.n, self.d, f.data).py()?)
    }

    /// The analysis for the observation `y` (m,): replaces the forecast and moves on to the
    /// next cycle.
    fn analyse(&self, py: Python<'_>, y: &Bound<'_, PyAny>) -> PyResult<()> {
        let m = self.m();
        let y = arrays::read("y", y, &[1, 2], &format!("({m},)"))?;
        if y.rows_cols() != (1, m) {
            return Err(PyValueError::new_err(format!(
                "`y` must have shape ({m},), got {}",
                enff::error::shape_text(&y.shape)
            )));
        }
        let inner = &self.inner;
        let r = py.detach(|| {
            let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
            with_engine!(&mut *g, a => a.analyse(&y.data).map(|_| a.cycle()))
        });
        if let Some(e) = self.operator.as_ref().and_then(|op| op.take_error()) {
            return Err(e);
        }
        let next = r.map_err(|e| self.fail(e))?;
        self.cycle.store(next, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// h(x) of one state (d,), e.g. to observe a truth.
    fn observe(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let x = arrays::read("x", x, &[1], &format!("({},)", self.d))?;
        let inner = &self.inner;
        let r = py.detach(|| {
            let g = inner.lock().unwrap_or_else(|p| p.into_inner());
            with_engine!(&*g, a => a.observe(&x.data))
        });
        if let Some(e) = self.operator.as_ref().and_then(|op| op.take_error()) {
            return Err(e);
        }
        let y = r.map_err(|e| self.fail(e))?;
        let m = y.len();
        Ok(arrays::write(py, y, &[m], self.dtype)?.unbind())
    }

    /// RMSE of the ensemble mean against `truth` (d,) and the spread, as a dict.
    fn stats<'py>(
        &self,
        py: Python<'py>,
        truth: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = arrays::read("truth", truth, &[1], &format!("({},)", self.d))?;
        let inner = &self.inner;
        let s = py
            .detach(|| {
                let g = inner.lock().unwrap_or_else(|p| p.into_inner());
                with_engine!(&*g, a => a.stats(&t.data))
            })
            .py()?;
        let out = PyDict::new(py);
        out.set_item("rmse", s.rmse)?;
        out.set_item("spread", s.spread)?;
        Ok(out)
    }

    /// The ensemble, (n, d), in the initial ensemble's dtype.
    #[getter]
    fn ensemble(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let host = self.host_ensemble(py)?;
        Ok(arrays::write(py, host, &[self.n, self.d], self.dtype)?.unbind())
    }

    /// The ensemble mean, (d,), float64.
    #[getter]
    fn mean(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let e = Ensemble::from_vec(self.n, self.d, self.host_ensemble(py)?).py()?;
        Ok(arrays::vector(py, e.mean()).unbind())
    }

    /// The spread: sqrt of the mean over components of the unbiased member variance.
    #[getter]
    fn spread(&self, py: Python<'_>) -> PyResult<f64> {
        let e = Ensemble::from_vec(self.n, self.d, self.host_ensemble(py)?).py()?;
        let mean = e.mean();
        let n = self.n as f64;
        if self.n < 2 {
            return Ok(0.0);
        }
        let mut sum = 0.0;
        for i in 0..self.n {
            for (x, mu) in e.member(i).iter().zip(&mean) {
                sum += (*x as f64 - mu).powi(2);
            }
        }
        Ok((sum / ((n - 1.0) * self.d as f64)).sqrt())
    }

    /// Members n.
    #[getter]
    fn n(&self) -> usize {
        self.n
    }

    /// State dimension d.
    #[getter]
    fn d(&self) -> usize {
        self.d
    }

    /// Observation dimension m.
    #[getter]
    fn m(&self) -> usize {
        self.m
    }

    /// The number the next analysis gets.
    #[getter]
    fn cycle(&self) -> u32 {
        self.cycle.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Model time of the ensemble (t0 plus dt per forecast).
    #[getter]
    fn time(&self) -> f64 {
        *self.t.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The filter's name.
    #[getter]
    fn filter(&self) -> String {
        self.filter.clone()
    }

    /// The backend: `cpu` or `gpu`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    fn __repr__(&self) -> String {
        format!(
            "enff.Assimilator(filter={:?}, n={}, d={}, m={}, cycle={}, time={}, backend={:?})",
            self.filter(),
            self.n,
            self.d,
            self.m(),
            self.cycle(),
            self.time(),
            self.backend()
        )
    }
}
