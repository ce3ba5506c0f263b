//! Any `--set` text on a preset's configuration: a new value or a typed error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut config = enff::experiment::preset("lorenz96_sakov2008").unwrap().config;
    let _ = config.set(text);
});
