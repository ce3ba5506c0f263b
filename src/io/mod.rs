//! Array files exchanged with other tools: NumPy `.npy` ([`npy`]).

pub mod npy;

pub use npy::{read_npy, write_npy, NpyArray, NpyDtype, NpyProblem};
