//! Every WGSL kernel has a CPU twin and a parity test: each shader's header names its twin
//! (`CPU twin: src/…rs::name`, `::{a, b}` or `(a, b)`) and its parity test
//! (`Parity test: tests/…rs::name`), and this test fails when a named file or function is
//! missing, or when a shader names none. Kernels come in families that share one stem in three
//! places: `shaders/<family>[_<kernel>].wgsl`, its GPU host code `src/backend/gpu/<family>.rs`
//! and its CPU twins `src/backend/cpu/<family>.rs` — or, for the kernels that run a model or
//! an observation map, the model's or operator's own definition (`src/model/`, `src/observe.rs`,
//! `src/rng.rs`), which the CPU backend calls.

use std::path::Path;

/// The leading comment block of a shader, joined into one line without the `//` markers.
fn header(text: &str) -> String {
    text.lines()
        .take_while(|l| l.starts_with("//"))
        .map(|l| l.trim_start_matches('/').trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// True when `name` is an identifier (a function, type or module item name).
fn is_ident(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `(file, [items])` references of `text` after `label`, up to the next sentence that
/// starts a new label: `src/a.rs::f`, `src/a.rs::{f, g}` and `src/a.rs (f, g)` forms.
fn references(text: &str, label: &str) -> Vec<(String, Vec<String>)> {
    let Some(at) = text.find(label) else {
        return Vec::new();
    };
    let mut rest = &text[at + label.len()..];
    if let Some(end) = rest
        .find("Parity test:")
        .filter(|_| label != "Parity test:")
    {
        rest = &rest[..end];
    }
    let mut refs = Vec::new();
    let mut scan = rest;
    while let Some(start) = scan.find(['s', 't']) {
        let tail = &scan[start..];
        if !(tail.starts_with("src/") || tail.starts_with("tests/")) {
            scan = &tail[1..];
            continue;
        }
        let end = tail.find(".rs").map(|e| e + 3);
        let Some(end) = end else { break };
        let file = tail[..end].to_string();
        let after = &tail[end..];
        let mut items = Vec::new();
        if let Some(list) = after.strip_prefix("::{") {
            let close = list.find('}').unwrap_or(list.len());
            items.extend(list[..close].split(',').map(|s| s.trim().to_string()));
        } else if let Some(name) = after.strip_prefix("::") {
            items.push(
                name.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect(),
            );
        } else if let Some(list) = after.trim_start().strip_prefix('(') {
            let close = list.find(')').unwrap_or(list.len());
            let names: Vec<String> = list[..close]
                .split(',')
                .map(|s| s.trim().to_string())
                .collect();
            if names.iter().all(|n| is_ident(n)) {
                items.extend(names);
            }
        }
        items.retain(|i| is_ident(i));
        refs.push((file, items));
        scan = after;
    }
    refs
}

/// True when `source` defines `item` (a function, type, trait or constant).
fn defines(source: &str, item: &str) -> bool {
    ["fn", "struct", "enum", "trait", "const", "type"]
        .iter()
        .any(|kw| {
            source.contains(&format!("{kw} {item}("))
                || source.contains(&format!("{kw} {item}<"))
                || source.contains(&format!("{kw} {item} "))
                || source.contains(&format!("{kw} {item};"))
        })
}

/// The `.wgsl` files of `root/shaders`, sorted.
fn shaders(root: &Path) -> Vec<std::path::PathBuf> {
    let mut shaders: Vec<_> = std::fs::read_dir(root.join("shaders"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    shaders.sort();
    shaders
}

/// What is wrong with the twin and parity references of every shader in `root/shaders`.
fn problems(root: &Path) -> Vec<String> {
    let shaders = shaders(root);
    let mut bad = Vec::new();
    for shader in &shaders {
        let name = shader.file_name().unwrap().to_string_lossy().into_owned();
        let head = header(&std::fs::read_to_string(shader).unwrap());
        for (label, what) in [("CPU twin", "CPU twin"), ("Parity test:", "parity test")] {
            let refs = references(&head, label);
            if refs.is_empty() {
                bad.push(format!("{name}: its header names no {what} (`{label} …`)"));
            }
            for (file, items) in refs {
                let Ok(source) = std::fs::read_to_string(root.join(&file)) else {
                    bad.push(format!("{name}: {what} file {file} does not exist"));
                    continue;
                };
                if what == "parity test" && items.is_empty() {
                    bad.push(format!("{name}: the parity test in {file} is not named"));
                }
                for item in items {
                    let found = if what == "parity test" {
                        source.contains(&format!("fn {item}()"))
                    } else {
                        defines(&source, &item)
                    };
                    if !found {
                        bad.push(format!("{name}: {what} {file}::{item} does not exist"));
                    }
                }
            }
        }
    }
    bad
}

#[test]
fn every_shader_names_an_existing_cpu_twin_and_parity_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shaders = std::fs::read_dir(root.join("shaders")).unwrap().count();
    assert!(shaders >= 14, "{shaders} shaders");
    let bad = problems(root);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_shader_without_twin_or_parity_test_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in ["shaders", "src", "tests"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("src/twin.rs"), "pub fn kernel_a() {}\n").unwrap();
    std::fs::write(root.join("tests/parity.rs"), "#[test]\nfn a_matches() {}\n").unwrap();
    std::fs::write(
        root.join("shaders/good.wgsl"),
        "// CPU twin: src/twin.rs::kernel_a.\n// Parity test: tests/parity.rs::a_matches.\n",
    )
    .unwrap();
    std::fs::write(root.join("shaders/none.wgsl"), "// A kernel.\n").unwrap();
    std::fs::write(
        root.join("shaders/stale.wgsl"),
        "// CPU twins: src/twin.rs::{kernel_a, kernel_b}.\n// Parity test: tests/parity.rs::gone.\n",
    )
    .unwrap();
    let bad = problems(root);
    assert_eq!(bad.len(), 4, "{bad:#?}");
    assert!(bad[0].starts_with("none.wgsl: its header names no CPU twin"));
    assert!(bad[1].starts_with("none.wgsl: its header names no parity test"));
    assert!(
        bad[2].contains("src/twin.rs::kernel_b does not exist"),
        "{bad:#?}"
    );
    assert!(
        bad[3].contains("tests/parity.rs::gone does not exist"),
        "{bad:#?}"
    );
}

/// The family of shader `stem`: its longest `_`-separated prefix with GPU host code in
/// `root/src/backend/gpu/<family>.rs`.
fn family(root: &Path, stem: &str) -> Option<String> {
    let parts: Vec<&str> = stem.split('_').collect();
    (1..=parts.len())
        .rev()
        .map(|k| parts[..k].join("_"))
        .find(|f| root.join(format!("src/backend/gpu/{f}.rs")).exists())
}

/// What breaks the one-stem rule in `root`: a shader whose name starts with no GPU family
/// file, or whose CPU twins are neither in the family's CPU file nor in a model or
/// observation description.
fn family_problems(root: &Path) -> Vec<String> {
    let shaders = shaders(root);
    let mut bad = Vec::new();
    for shader in &shaders {
        let stem = shader.file_stem().unwrap().to_string_lossy().into_owned();
        let Some(f) = family(root, &stem) else {
            bad.push(format!(
                "{stem}.wgsl: no src/backend/gpu/<family>.rs for any prefix of its name"
            ));
            continue;
        };
        let head = header(&std::fs::read_to_string(shader).unwrap());
        let cpu_file = format!("src/backend/cpu/{f}.rs");
        let described = |file: &str| {
            file == cpu_file
                || file.starts_with("src/model/")
                || file == "src/observe.rs"
                || file == "src/rng.rs"
        };
        if !references(&head, "CPU twin")
            .iter()
            .any(|(file, _)| described(file))
        {
            bad.push(format!(
                "{stem}.wgsl: its CPU twins are not in {cpu_file} (nor in the model or \
                 observation descriptions)"
            ));
        }
    }
    bad
}

#[test]
fn every_kernel_family_shares_one_stem_in_three_places() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bad = family_problems(root);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(
        family(root, "ensemble_space_letkf").as_deref(),
        Some("ensemble_space")
    );
    assert_eq!(family(root, "flow_softmax").as_deref(), Some("flow"));
}

#[test]
fn a_kernel_outside_its_family_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in ["shaders", "src/backend/gpu", "src/backend/cpu", "src/model"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for file in [
        "src/backend/gpu/flow.rs",
        "src/backend/cpu/flow.rs",
        "src/model/m.rs",
    ] {
        std::fs::write(root.join(file), "pub fn k() {}\n").unwrap();
    }
    let twin = |file: &str| format!("// CPU twin: {file}::k.\n// Parity test: tests/p.rs::t.\n");
    std::fs::write(
        root.join("shaders/flow_a.wgsl"),
        twin("src/backend/cpu/flow.rs"),
    )
    .unwrap();
    std::fs::write(root.join("shaders/flow_b.wgsl"), twin("src/model/m.rs")).unwrap();
    std::fs::write(
        root.join("shaders/flow_c.wgsl"),
        twin("src/backend/cpu/mod.rs"),
    )
    .unwrap();
    std::fs::write(
        root.join("shaders/orphan.wgsl"),
        twin("src/backend/cpu/flow.rs"),
    )
    .unwrap();
    let bad = family_problems(root);
    assert_eq!(bad.len(), 2, "{bad:#?}");
    assert!(bad[0].starts_with("flow_c.wgsl: its CPU twins are not in src/backend/cpu/flow.rs"));
    assert!(bad[1].starts_with("orphan.wgsl: no src/backend/gpu/<family>.rs"));
}
