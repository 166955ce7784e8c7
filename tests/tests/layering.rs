//! The crates depend on each other in one direction only:
//! `stdlib`, `lang` ← `compiler` ← `codegen-cuda` ← `runtime` ← `recipec` / `lsp`.
//! This test reads `cargo metadata` and fails on an edge that breaks the layering.

use std::collections::BTreeMap;

/// For each workspace crate, the workspace crates it may depend on.
const ALLOWED: &[(&str, &[&str])] = &[
    ("stdlib", &[]),
    ("lang", &[]),
    ("compiler", &["lang", "stdlib"]),
    ("codegen-cuda", &["compiler", "lang"]),
    ("codegen-cpu", &["compiler", "lang"]),
    ("runtime", &["compiler", "codegen-cpu", "codegen-cuda", "lang"]),
    ("recipec", &["lang", "stdlib", "compiler", "codegen-cpu", "codegen-cuda", "runtime", "lsp"]),
    ("lsp", &["lang", "stdlib", "compiler"]),
    ("tests", &["lang", "stdlib", "compiler", "codegen-cpu", "codegen-cuda", "runtime"]),
    ("bench", &["lang", "stdlib", "compiler", "codegen-cpu", "codegen-cuda", "runtime"]),
];

#[test]
fn dependencies_point_one_way() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(tests::root())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: Vec<String> = packages.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut violations = vec![];
    for p in packages {
        let name = p["name"].as_str().unwrap();
        let Some(ok) = allowed.get(name) else {
            violations.push(format!("crate `{name}` is not in the layering table of tests/tests/layering.rs"));
            continue;
        };
        for d in p["dependencies"].as_array().unwrap() {
            let dep = d["name"].as_str().unwrap();
            let kind = d["kind"].as_str().unwrap_or("normal");
            // Dev-dependencies of library crates may use the stdlib for their tests.
            if names.iter().any(|n| n == dep) && !ok.contains(&dep) && !(kind == "dev" && dep == "stdlib") {
                violations.push(format!("`{name}` depends on `{dep}`"));
            }
        }
    }
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
}
