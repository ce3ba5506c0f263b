//! Files: NumPy `.npy` arrays exchanged with other tools ([`npy`]) and atomic writes
//! ([`write_atomic`]), so no result file is ever left half-written.

mod atomic;
pub mod npy;

pub use atomic::{io_err, write_atomic};

pub use npy::{read_npy, write_npy, NpyArray, NpyDtype, NpyProblem};
