//! Any bytes given to the checkpoint reader: a checkpoint or a refusal, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = enff::experiment::Checkpoint::from_bytes(data, std::path::Path::new("fuzz.enff"));
});
