//! Shared helpers of the workspace-level tests: a module loader over the repository and the
//! embedded standard library, and a plain, deterministic rendering of diagnostics for
//! snapshots.

use lang::diag::Diagnostic;
use lang::source::{ModuleLoader, SourceDb};
use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Loads `std.*` from the embedded stdlib and other modules from files beside the importer
/// (names are relative to the repository root, so snapshots do not depend on the machine).
pub struct RepoLoader;

impl ModuleLoader for RepoLoader {
    fn load(&self, path: &[String], from: &str) -> Option<(String, String)> {
        if path.first().map(|s| s == "std").unwrap_or(false) {
            let (file, text) = stdlib::module(path)?;
            return Some((format!("<std>/{file}"), text.to_string()));
        }
        let dir = Path::new(from).parent().unwrap_or(Path::new(""));
        let mut rel = dir.to_path_buf();
        for s in path {
            rel.push(s);
        }
        rel.set_extension("recipe");
        let text = std::fs::read_to_string(root().join(&rel)).ok()?;
        Some((rel.display().to_string(), text))
    }
    fn known_modules(&self) -> Vec<String> {
        stdlib::MODULES.iter().map(|m| m.0.to_string()).collect()
    }
}

/// `error[E0302] 5:5: message`, its labels with positions, help and notes.
pub fn render(db: &SourceDb, d: &Diagnostic) -> String {
    let mut out = String::new();
    let pos = |l: &lang::diag::Label| {
        let f = db.file(l.file);
        let (a, b) = f.line_col(l.span.start);
        let (c, e) = f.line_col(l.span.end);
        (f.name.clone(), a, b, c, e)
    };
    match d.primary() {
        Some(l) => {
            let (_, a, b, _, _) = pos(l);
            out.push_str(&format!("{}[{}] {a}:{b}: {}\n", d.severity.as_str(), d.code, d.message));
        }
        None => out.push_str(&format!("{}[{}]: {}\n", d.severity.as_str(), d.code, d.message)),
    }
    for (i, l) in d.labels.iter().enumerate() {
        let (name, a, b, c, e) = pos(l);
        let place =
            if i == 0 || Some(l.file) == d.primary().map(|p| p.file) { String::new() } else { format!("{name}:") };
        out.push_str(&format!("  {} {place}{a}:{b}-{c}:{e} {}\n", if i == 0 { "-->" } else { "   " }, l.message));
    }
    if let Some(h) = &d.help {
        out.push_str(&format!("  help: {h}\n"));
    }
    for n in &d.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}

/// Every `.recipe` file under `dir`, sorted.
pub fn recipe_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(recipe_files(&p));
            } else if p.extension().map(|x| x == "recipe").unwrap_or(false) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
