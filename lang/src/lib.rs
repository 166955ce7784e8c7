//! The recipe language front end.
//!
//! Input: `.recipe` source text, through a [`source::SourceDb`] and a [`source::ModuleLoader`]
//! (the core never touches the file system, the clock or the environment, and never prints).
//! Output: a syntax tree per file ([`ast`]), the dtype and shape of every binding
//! ([`check::TypedBinding`]), the parameters and groups of each recipe, and
//! [`diag::Diagnostic`]s as data. Must not depend on the compiler, the runtime or any IO.
//! Start reading at [`analyze`], which runs the whole front end in order: lex, parse,
//! resolve modules, check.

pub mod ast;
pub mod builtins;
pub mod check;
pub mod diag;
pub mod fmt;
pub mod lexer;
pub mod parse;
pub mod recipe;
pub mod resolve;
pub mod source;
pub mod suggest;
pub mod types;

use diag::Diagnostic;
use source::{FileId, ModuleLoader, SourceDb};

/// The result of analysing some root files and everything they import.
pub struct Analysis {
    pub modules: resolve::Modules,
    /// Every diagnostic, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    pub typed: Vec<check::TypedBinding>,
    pub recipes: Vec<(types::ItemRef, recipe::CheckedRecipe)>,
}

impl Analysis {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(|d| d.is_error())
    }
}

/// Runs the front end on `roots`: parse, resolve imports through `loader`, check every
/// module. Imported standard-library modules are checked too, but only diagnostics in
/// files the caller added to `db` before the call (the roots and their siblings) and in
/// user modules are returned; the standard library is verified by its own tests.
pub fn analyze(db: &mut SourceDb, roots: &[FileId], loader: &dyn ModuleLoader) -> Analysis {
    let (modules, mut diagnostics) = resolve::resolve(db, roots, loader);
    let mut checker = check::Checker::new(&modules);
    for m in 0..modules.list.len() {
        if !modules.list[m].is_std {
            checker.check_module(m);
        }
    }
    diagnostics.extend(std::mem::take(&mut checker.diagnostics));
    // Imported standard modules are verified by their own tests; their signatures are still
    // computed (and any problem would surface as a diagnostic in the caller's code).
    let std_files: Vec<FileId> = modules.list.iter().filter(|m| m.is_std).map(|m| m.file).collect();
    diagnostics.retain(|d| d.primary().map(|l| !std_files.contains(&l.file)).unwrap_or(true));
    let typed = std::mem::take(&mut checker.typed);
    let recipes = std::mem::take(&mut checker.recipes);
    drop(checker);
    // Deterministic order: by file, then position, then code.
    diagnostics.sort_by(|a, b| {
        let ka = a.primary().map(|l| (l.file, l.span.start)).unwrap_or((FileId(0), 0));
        let kb = b.primary().map(|l| (l.file, l.span.start)).unwrap_or((FileId(0), 0));
        ka.cmp(&kb).then(a.code.cmp(b.code))
    });
    diagnostics.dedup();
    Analysis { modules, diagnostics, typed, recipes }
}
