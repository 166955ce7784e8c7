//! The file-system module loader: `std.*` from the embedded standard library, other modules
//! from `.recipe` files beside the importing file.

use lang::source::ModuleLoader;
use std::path::Path;

pub struct FsLoader;

impl ModuleLoader for FsLoader {
    fn load(&self, path: &[String], from: &str) -> Option<(String, String)> {
        if path.first().map(|s| s == "std").unwrap_or(false) {
            let (file, text) = stdlib::module(path)?;
            return Some((format!("<std>/{file}"), text.to_string()));
        }
        if path.iter().any(|s| s.is_empty() || s == ".." || s.contains('/')) {
            return None;
        }
        let dir = Path::new(from).parent().unwrap_or(Path::new(""));
        let mut p = dir.to_path_buf();
        for s in path {
            p.push(s);
        }
        p.set_extension("recipe");
        let text = std::fs::read_to_string(&p).ok()?;
        Some((p.display().to_string(), text))
    }

    fn known_modules(&self) -> Vec<String> {
        stdlib::MODULES.iter().map(|m| m.0.to_string()).collect()
    }
}
