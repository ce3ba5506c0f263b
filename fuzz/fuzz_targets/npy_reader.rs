//! Any bytes given to the `.npy` decoder: an array or a typed problem, never a panic, and a
//! decoded array always holds as many values as its shape says.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = enff::io::npy::decode(data) {
        let (rows, cols) = array.rows_cols();
        assert_eq!(rows * cols, array.data.len());
    }
});
