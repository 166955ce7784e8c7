//! Module resolution: loads every module a file imports (transitively), detects cycles, and
//! builds each module's table of item names and imports.
//!
//! `use std.a.b` names module `std.a` and item `b`; `use std.a.{b, c}` and `use std.a.*`
//! name module `std.a`. Paths starting with `std` come from the embedded standard library;
//! any other path names a sibling file: `use models.gpt` in `dir/x.recipe` reads
//! `dir/models.recipe`, and `use sub.models.gpt` reads `dir/sub/models.recipe`.

use crate::ast::{Ident, ItemKind, Module, UseTree};
use crate::diag::Diagnostic;
use crate::lexer::Comment;
use crate::parse::parse;
use crate::source::{FileId, ModuleLoader, SourceDb, Span};
use crate::types::ItemRef;
use std::collections::HashMap;

/// One loaded module.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    /// `std.loss` for the standard library, the file name otherwise.
    pub path: String,
    pub file: FileId,
    pub ast: Module,
    pub comments: Vec<Comment>,
    /// Items defined here, by name.
    pub items: HashMap<String, usize>,
    /// Names imported by `use`, by local name.
    pub imports: HashMap<String, Import>,
    /// Loaded as `std.*` through an import (not given as a root file).
    pub is_std: bool,
    /// The name spans of recipe `let`s whose constant value was inlined into another field
    /// ([`crate::recipe::inline_constant_lets`]): they count as used.
    pub inlined_lets: Vec<Span>,
}

#[derive(Debug, Clone)]
pub struct Import {
    pub target: ItemRef,
    pub span: Span,
    /// Imported by `use m.*`: reported as unused only when no name of the glob is used.
    pub glob: bool,
}

/// Every module of one analysis, the roots first.
#[derive(Debug, Clone, Default)]
pub struct Modules {
    pub list: Vec<ModuleInfo>,
    /// `(module path, text)` of every known standard module, for hints such as
    /// "`cross_entropy` is in `std.loss`" (parsed only when such a hint is needed).
    pub std_sources: Vec<(String, String)>,
    /// Every known standard module path.
    pub std_modules: Vec<String>,
}

impl Modules {
    /// The standard module that defines a public item named `name`, if any.
    pub fn std_module_of(&self, name: &str) -> Option<String> {
        for (m, text) in &self.std_sources {
            let parsed = parse(FileId(u32::MAX), text);
            if parsed.module.items.iter().any(|it| it.public && it.name().map(|n| n.name == name).unwrap_or(false)) {
                return Some(m.clone());
            }
        }
        None
    }

    pub fn item(&self, r: ItemRef) -> &crate::ast::Item {
        &self.list[r.module].ast.items[r.item]
    }
    pub fn find_item(&self, module: usize, name: &str) -> Option<ItemRef> {
        let m = &self.list[module];
        if let Some(i) = m.items.get(name) {
            return Some(ItemRef { module, item: *i });
        }
        m.imports.get(name).map(|i| i.target)
    }
    pub fn by_path(&self, path: &str) -> Option<usize> {
        self.list.iter().position(|m| m.path == path)
    }
}

struct Resolver<'a> {
    db: &'a mut SourceDb,
    loader: &'a dyn ModuleLoader,
    modules: Modules,
    by_key: HashMap<String, usize>,
    /// Modules whose imports are being resolved (for cycle detection), with the import
    /// each is resolving at the moment.
    in_progress: Vec<(String, Option<(FileId, Span)>)>,
    diagnostics: Vec<Diagnostic>,
}

/// Parses `roots` and every module they import; returns the modules and all diagnostics of
/// parsing and resolution.
pub fn resolve(db: &mut SourceDb, roots: &[FileId], loader: &dyn ModuleLoader) -> (Modules, Vec<Diagnostic>) {
    let mut r = Resolver {
        db,
        loader,
        modules: Modules::default(),
        by_key: HashMap::new(),
        in_progress: vec![],
        diagnostics: vec![],
    };
    for &file in roots {
        let name = r.db.file(file).name.clone();
        if r.by_key.contains_key(&name) {
            continue;
        }
        r.load_file(name, file);
    }
    let known = loader.known_modules();
    for m in &known {
        let segs: Vec<String> = m.split('.').map(|s| s.to_string()).collect();
        if let Some((_, text)) = loader.load(&segs, "") {
            r.modules.std_sources.push((m.clone(), text));
        }
    }
    r.modules.std_modules = known;
    (r.modules, r.diagnostics)
}

fn module_key(path: &[String], from: &str) -> String {
    if path.first().map(|s| s == "std").unwrap_or(false) {
        path.join(".")
    } else {
        let dir = match from.rfind('/') {
            Some(i) => &from[..=i],
            None => "",
        };
        format!("{dir}{}.recipe", path.join("/"))
    }
}

impl Resolver<'_> {
    fn load_file(&mut self, key: String, file: FileId) -> usize {
        let text = self.db.file(file).text.clone();
        let mut parsed = parse(file, &text);
        self.diagnostics.extend(parsed.diagnostics);
        let is_std = key.starts_with("std.");
        let inlined_lets = if is_std { vec![] } else { crate::recipe::inline_constant_lets(&mut parsed.module) };
        let idx = self.modules.list.len();
        let mut items = HashMap::new();
        for (i, item) in parsed.module.items.iter().enumerate() {
            if let Some(name) = item.name() {
                if let Some(prev) = items.insert(name.name.clone(), i) {
                    let prev_span = parsed.module.items[prev].name().map(|n| n.span).unwrap_or_default();
                    self.diagnostics.push(
                        Diagnostic::error("E0205", format!("`{}` is defined twice", name.name))
                            .label(file, name.span, "defined again here")
                            .label(file, prev_span, "first defined here")
                            .help("rename one of the items"),
                    );
                    items.insert(name.name.clone(), prev);
                }
            }
        }
        let path = if key.ends_with(".recipe") { self.db.file(file).name.clone() } else { key.clone() };
        self.modules.list.push(ModuleInfo {
            path,
            file,
            ast: parsed.module,
            comments: parsed.comments,
            items,
            imports: HashMap::new(),
            is_std,
            inlined_lets,
        });
        self.by_key.insert(key.clone(), idx);
        self.in_progress.push((key, None));
        self.resolve_imports(idx);
        self.in_progress.pop();
        idx
    }

    fn resolve_imports(&mut self, idx: usize) {
        let file = self.modules.list[idx].file;
        let from = self.db.file(file).name.clone();
        let uses: Vec<(crate::ast::UseItem, Span)> = self.modules.list[idx]
            .ast
            .items
            .iter()
            .filter_map(|it| match &it.kind {
                ItemKind::Use(u) => Some((u.clone(), it.span)),
                _ => None,
            })
            .collect();
        for (u, span) in uses {
            let (module_path, names): (Vec<Ident>, Vec<Ident>) = match &u.tree {
                UseTree::Single => {
                    if u.path.len() < 2 {
                        self.diagnostics.push(
                            Diagnostic::error("E0201", format!("`use {}` names a module, not an item", u.path[0].name))
                                .label(file, span, "import an item from the module")
                                .help(format!(
                                    "write `use {}.NAME`, `use {}.{{A, B}}` or `use {}.*`",
                                    u.path[0].name, u.path[0].name, u.path[0].name
                                )),
                        );
                        continue;
                    }
                    (u.path[..u.path.len() - 1].to_vec(), vec![u.path[u.path.len() - 1].clone()])
                }
                UseTree::Group(names) => (u.path.clone(), names.clone()),
                UseTree::Glob(_) => (u.path.clone(), vec![]),
            };
            let segs: Vec<String> = module_path.iter().map(|i| i.name.clone()).collect();
            let mspan = module_path.first().unwrap().span.to(module_path.last().unwrap().span);
            if let Some(top) = self.in_progress.last_mut() {
                top.1 = Some((file, mspan));
            }
            let Some(target) = self.load_module(&segs, &from, file, mspan) else { continue };
            if target == idx {
                self.diagnostics.push(Diagnostic::error("E0202", "a module cannot import itself").label(
                    file,
                    mspan,
                    "this is the module being defined",
                ));
                continue;
            }
            let names = if let UseTree::Glob(_) = u.tree {
                let m = &self.modules.list[target];
                let mut all: Vec<(String, usize)> = m.items.iter().map(|(n, i)| (n.clone(), *i)).collect();
                all.sort_by_key(|(_, i)| *i);
                all.into_iter().filter(|(_, i)| m.ast.items[*i].public).map(|(n, _)| Ident { name: n, span }).collect()
            } else {
                names
            };
            for name in names {
                let m = &self.modules.list[target];
                match m.items.get(&name.name) {
                    Some(&i) => {
                        if !m.ast.items[i].public {
                            self.diagnostics.push(
                                Diagnostic::error("E0206", format!("`{}` is private to `{}`", name.name, m.path))
                                    .label(file, name.span, "this item is not `pub`")
                                    .help(format!("mark `{}` as `pub` in `{}`", name.name, m.path)),
                            );
                        }
                        let target = ItemRef { module: target, item: i };
                        let glob = matches!(u.tree, UseTree::Glob(_));
                        let prev = self.modules.list[idx]
                            .imports
                            .insert(name.name.clone(), Import { target, span: name.span, glob });
                        let defined_here = self.modules.list[idx].items.contains_key(&name.name);
                        if prev.is_some() || defined_here {
                            self.diagnostics.push(
                                Diagnostic::error(
                                    "E0205",
                                    format!("`{}` is imported twice or also defined here", name.name),
                                )
                                .label(file, name.span, "second binding of this name")
                                .help("remove one of the imports or rename the item"),
                            );
                        }
                    }
                    None => {
                        let candidates: Vec<&str> = m.items.keys().map(|s| s.as_str()).collect();
                        self.diagnostics.push(
                            Diagnostic::error("E0203", format!("module `{}` has no item `{}`", m.path, name.name))
                                .label(file, name.span, "not defined in that module")
                                .maybe_help(crate::suggest::did_you_mean(&name.name, &candidates)),
                        );
                    }
                }
            }
        }
    }

    fn load_module(&mut self, segs: &[String], from: &str, file: FileId, span: Span) -> Option<usize> {
        let key = module_key(segs, from);
        if let Some(pos) = self.in_progress.iter().position(|k| k.0 == key) {
            let cycle: Vec<String> = self.in_progress[pos..].iter().map(|k| k.0.clone()).chain([key.clone()]).collect();
            // Report at the import that entered the cycle (in the outermost module on it),
            // with the import that closes it as a second label.
            let (pfile, pspan) = self.in_progress[pos].1.unwrap_or((file, span));
            let mut d = Diagnostic::error("E0202", "import cycle")
                .label(pfile, pspan, "this import starts a cycle")
                .note(format!("cycle: {}", cycle.join(" → ")))
                .help("move the shared items into a module that both import");
            if (pfile, pspan) != (file, span) {
                d = d.label(file, span, "and this import closes it");
            }
            self.diagnostics.push(d);
            return None;
        }
        if let Some(&i) = self.by_key.get(&key) {
            return Some(i);
        }
        match self.loader.load(segs, from) {
            Some((name, text)) => {
                let fid = match self.db.find(&name) {
                    Some(f) => f,
                    None => self.db.add(name, text),
                };
                Some(self.load_file(key, fid))
            }
            None => {
                let shown = segs.join(".");
                let help = if segs.first().map(|s| s == "std").unwrap_or(false) {
                    let known: Vec<String> = self.loader.known_modules();
                    let known: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
                    crate::suggest::did_you_mean(&shown, &known)
                        .or_else(|| Some(format!("standard modules: {}", known.join(", "))))
                } else {
                    Some(format!("expected a file `{}` next to this one", key))
                };
                self.diagnostics.push(
                    Diagnostic::error("E0201", format!("unknown module `{shown}`"))
                        .label(file, span, "no such module")
                        .maybe_help(help),
                );
                None
            }
        }
    }
}
