//! The library's layers import only downward (DESIGN.md, README "Layout"): this test reads every
//! file under `src/` and fails on a `crate::…` path that reaches a higher layer, on a module
//! missing from the table, and on the library naming the command line's crates.
//!
//! Unit-test modules (`#[cfg(test)] mod tests` at the end of a file) may build their inputs
//! with higher layers; comments are not code.

use std::path::{Path, PathBuf};

/// The library's top-level modules by layer, lowest first. A module may use its own layer
/// and the layers below it, except the pairs in [`FORBIDDEN`].
const LAYERS: &[(&str, &[&str])] = &[
    ("error, rng, io", &["error", "rng", "io", "ensemble"]),
    (
        "model and observation descriptions",
        &["model", "observe", "localization"],
    ),
    ("backend", &["backend"]),
    (
        "flow, guidance and state partitions",
        &["flow", "partition"],
    ),
    ("filter", &["filter"]),
    ("stepper and its placements", &["cycle", "distributed"]),
    (
        "experiment drivers",
        &["experiment", "bench", "assimilator"],
    ),
];

/// Same-layer imports that are still refused: `(from, to)`.
const FORBIDDEN: &[(&str, &str)] = &[
    // The stepper is written against the Placement trait; the MPI placement implements it.
    ("cycle", "distributed"),
    // Errors are the bottom: everything may return them, they name nothing.
    ("error", "rng"),
    ("error", "io"),
    ("error", "ensemble"),
    ("rng", "io"),
];

/// Crates only the binary may use (argument parsing, progress bars, logging set-up, anyhow).
const BINARY_ONLY: &[&str] = &["clap", "indicatif", "env_logger", "anyhow"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::<module>` paths of a line of code.
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        // `enff_crate::` or `$crate::` are other things.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(name);
        }
    }
    found
}

/// Every import that breaks the table, as `file:line: from -> to`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
        let top = parts.next().unwrap();
        if top == "bin" || top == "lib.rs" {
            continue; // the binary may use everything; lib.rs declares the modules
        }
        let module = top.trim_end_matches(".rs").to_string();
        let Some(from) = layer_of(&module) else {
            bad.push(format!(
                "{}: module `{module}` is in no layer",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let mut in_tests = false;
        let mut cfg_test = false;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.starts_with("//") {
                continue;
            }
            if line == "#[cfg(test)]" {
                cfg_test = true;
                continue;
            }
            if cfg_test && line.starts_with("mod tests") {
                in_tests = true;
            }
            cfg_test = false;
            if in_tests {
                continue;
            }
            let code = line.split("//").next().unwrap_or("");
            for krate in BINARY_ONLY {
                if code.contains(&format!("{krate}::")) || code.contains(&format!("use {krate}")) {
                    bad.push(format!(
                        "{}:{}: the library uses `{krate}`, which only the binary may",
                        rel.display(),
                        i + 1
                    ));
                }
            }
            for target in crate_paths(code) {
                let Some(to) = layer_of(&target) else {
                    continue; // re-exports of lib.rs (crate::Error, crate::Result …)
                };
                if to > from || FORBIDDEN.contains(&(module.as_str(), target.as_str())) {
                    bad.push(format!(
                        "{}:{}: `{module}` ({}) imports `{target}` ({}): {line}",
                        rel.display(),
                        i + 1,
                        LAYERS[from].0,
                        LAYERS[to].0
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn library_layers_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "{} import(s) break the layer table of tests/layers.rs:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn the_layer_check_catches_an_upward_import() {
    // A filter reaching into the drivers, a backend into a filter, a stepper into the MPI
    // placement, and the library into the command line: each is reported.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("filter")).unwrap();
    std::fs::create_dir_all(src.join("backend")).unwrap();
    std::fs::create_dir_all(src.join("cycle")).unwrap();
    std::fs::write(
        src.join("filter/enff.rs"),
        "use crate::experiment::Config;\n// crate::experiment in a comment is fine\n",
    )
    .unwrap();
    std::fs::write(
        src.join("backend/mod.rs"),
        "use crate::filter::localization;\nuse crate::model::Model;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("cycle/mod.rs"),
        "use crate::distributed::Slabs;\nfn f() -> anyhow::Result<()> { Ok(()) }\n\
         #[cfg(test)]\nmod tests {\n    use crate::experiment::preset;\n}\n",
    )
    .unwrap();
    std::fs::write(src.join("gadget.rs"), "use crate::error::Result;\n").unwrap();
    let bad = violations(src);
    assert_eq!(bad.len(), 5, "{bad:#?}");
    assert!(
        bad[0].contains("`backend` (backend) imports `filter`"),
        "{bad:#?}"
    );
    assert!(bad[1].contains("`cycle`") && bad[1].contains("`distributed`"));
    assert!(bad[2].contains("uses `anyhow`"), "{bad:#?}");
    assert!(bad[3].contains("`filter` (filter) imports `experiment`"));
    assert!(bad[4].contains("`gadget` is in no layer"), "{bad:#?}");
}
