//! Any text given to the experiment-file parser: a validated configuration or a typed error
//! naming the place, never a panic; a parsed file survives the TOML round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = enff::experiment::file::parse_toml(text, "fuzz.toml") {
        let again = enff::experiment::file::to_toml("fuzz", "round trip", &file.config).unwrap();
        let back = enff::experiment::file::parse_toml(&again, "again.toml").unwrap();
        assert_eq!(back.config, file.config);
    }
});
