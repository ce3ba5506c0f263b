//! numpy arrays in and out: float32 or float64, C- or Fortran-ordered, never silently NaN.

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{
    IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::EngineResultExt;

/// The floating-point type of an array handed in, which results keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

/// An array copied out of numpy, as the engine's row-major float32.
pub struct HostArray {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

impl HostArray {
    /// Rows and columns of a 2-D array; a 1-D array is one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [k] => (1, *k),
            [r, c] => (*r, *c),
            _ => (0, 0),
        }
    }
}

fn shape_text(shape: &[usize]) -> String {
    enff::error::shape_text(shape)
}

/// Reads `obj` (named `name` in errors) as a finite float array of one of the ranks in
/// `ndims` ("(n, d)" etc. in `expected`).
pub fn read(
    name: &str,
    obj: &Bound<'_, PyAny>,
    ndims: &[usize],
    expected: &str,
) -> PyResult<HostArray> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "`{name}` must be a numpy array of float32 or float64 with shape {expected}, got a \
             {ty} (convert it with np.asarray({name}, dtype=np.float64))"
        ))
    })?;
    let shape = arr.shape().to_vec();
    if !ndims.contains(&shape.len()) {
        return Err(PyValueError::new_err(format!(
            "`{name}` must have shape {expected}, got an array of shape {}",
            shape_text(&shape)
        )));
    }
    if shape.contains(&0) {
        return Err(PyValueError::new_err(format!(
            "`{name}` is empty (shape {}): it needs shape {expected} with no zero length",
            shape_text(&shape)
        )));
    }
    let descr = arr.dtype();
    let dtype = if descr.kind() == b'f' && descr.itemsize() == 4 {
        Dtype::F32
    } else if descr.kind() == b'f' && descr.itemsize() == 8 {
        Dtype::F64
    } else {
        let text = descr.str().map(|s| s.to_string()).unwrap_or_default();
        return Err(PyValueError::new_err(format!(
            "`{name}` has dtype {text}: enff takes float32 or float64 arrays (convert with \
             {name}.astype(np.float64))"
        )));
    };
    if descr.is_native_byteorder() == Some(false) {
        return Err(PyValueError::new_err(format!(
            "`{name}` is not in the machine's byte order: convert it with \
             {name}.astype({name}.dtype.newbyteorder('='))"
        )));
    }
    if !(arr.is_c_contiguous() || arr.is_fortran_contiguous()) {
        return Err(PyValueError::new_err(format!(
            "`{name}` is a non-contiguous view (a slice with steps or a transposed slice): \
             pass np.ascontiguousarray({name})"
        )));
    }
    // `as_slice` gives memory order, which is the row-major order only for C order.
    let c_order = arr.is_c_contiguous();
    let data: Vec<f32> = match dtype {
        Dtype::F32 => {
            let a = arr.cast::<PyArrayDyn<f32>>()?.readonly();
            match a.as_slice() {
                Ok(s) if c_order => s.to_vec(),
                _ => a.as_array().iter().copied().collect(),
            }
        }
        Dtype::F64 => {
            let a = arr.cast::<PyArrayDyn<f64>>()?.readonly();
            match a.as_slice() {
                Ok(s) if c_order => s.iter().map(|v| *v as f32).collect(),
                _ => a.as_array().iter().map(|v| *v as f32).collect(),
            }
        }
    };
    let cols = if shape.len() == 2 { shape[1] } else { 0 };
    enff::error::check_finite(
        name,
        &data,
        cols,
        "NaN or Inf (or a float64 beyond float32's range) is not accepted: enff computes in \
         float32",
    )
    .py()?;
    Ok(HostArray { data, shape, dtype })
}

/// A row-major float32 buffer as a numpy array of `shape` in `dtype`.
pub fn write<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    shape: &[usize],
    dtype: Dtype,
) -> PyResult<Bound<'py, PyAny>> {
    let bad = |e: numpy::ndarray::ShapeError| PyValueError::new_err(e.to_string());
    Ok(match dtype {
        Dtype::F32 => ArrayD::from_shape_vec(IxDyn(shape), data)
            .map_err(bad)?
            .into_pyarray(py)
            .into_any(),
        Dtype::F64 => {
            let wide: Vec<f64> = data.into_iter().map(f64::from).collect();
            ArrayD::from_shape_vec(IxDyn(shape), wide)
                .map_err(bad)?
                .into_pyarray(py)
                .into_any()
        }
    })
}

/// A float64 vector as a 1-D numpy array.
pub fn vector<'py>(py: Python<'py>, data: Vec<f64>) -> Bound<'py, PyAny> {
    numpy::PyArray1::from_vec(py, data).into_any()
}
