//! The standard library of recipes, embedded in the binary.
//!
//! Input: the `.recipe` files beside this crate. Output: [`MODULES`], the module path
//! (`std.loss`) and text of each, so an installed `recipec` needs no source tree. Depends on
//! nothing; the front end reads these through its module loader.

/// `(module path, file name relative to stdlib/, source text)` for every stdlib module.
pub const MODULES: &[(&str, &str, &str)] = &[
    ("std.loss", "loss.recipe", include_str!("../loss.recipe")),
    ("std.optim", "optim.recipe", include_str!("../optim.recipe")),
    ("std.schedule", "schedule.recipe", include_str!("../schedule.recipe")),
    ("std.sparsity", "sparsity.recipe", include_str!("../sparsity.recipe")),
    ("std.decode", "decode.recipe", include_str!("../decode.recipe")),
    ("std.models", "models.recipe", include_str!("../models.recipe")),
];

/// The source of a stdlib module by its path (`["std", "loss"]`), if it exists.
pub fn module(path: &[String]) -> Option<(&'static str, &'static str)> {
    let joined = path.join(".");
    MODULES.iter().find(|(m, _, _)| *m == joined).map(|(_, f, t)| (*f, *t))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_recipe_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".recipe"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = super::MODULES.iter().map(|m| m.1.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "add new stdlib files to MODULES");
    }
}
