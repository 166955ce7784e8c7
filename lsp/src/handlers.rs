//! Request and notification handlers over open documents.

use crate::text::{offset, position, word_at};
use lang::ast::ItemKind;
use lang::source::{FileId, ModuleLoader, SourceDb};
use lsp_server::Notification;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub fn capabilities() -> Value {
    json!({
        "positionEncoding": "utf-16",
        "textDocumentSync": 1,
        "hoverProvider": true,
        "definitionProvider": true,
        "referencesProvider": true,
        "renameProvider": { "prepareProvider": false },
        "signatureHelpProvider": { "triggerCharacters": ["(", ","] },
        "semanticTokensProvider": {
            "legend": { "tokenTypes": TOKEN_TYPES, "tokenModifiers": [] },
            "full": true
        },
        "completionProvider": { "triggerCharacters": [".", "(", ","] },
        "documentFormattingProvider": true,
        "documentSymbolProvider": true,
    })
}

/// The semantic token types, in legend order.
pub const TOKEN_TYPES: &[&str] =
    &["keyword", "type", "function", "variable", "parameter", "number", "string", "comment", "operator", "property"];

/// Memory of the recipe's training step by 1-based line of the document: bytes the line's
/// buffers take (forward and gradient), and how many of them are live at the peak.
#[derive(Clone)]
struct LinePlan {
    peak: usize,
    lines: HashMap<usize, (usize, usize)>,
}

/// Open documents by URI.
pub struct Server {
    docs: HashMap<String, String>,
    /// Per document: the text a memory plan was computed for, and the bytes each of its
    /// lines holds at the peak of the recipe's training step (forward, backward), with the
    /// peak itself.
    plans: std::cell::RefCell<HashMap<String, (String, Option<LinePlan>)>>,
    /// Documents changed since their diagnostics were last published.
    dirty: std::collections::BTreeSet<String>,
    /// Each document's last analysis, shared by the diagnostics and every request until the
    /// next notification (an open document that another imports may have changed, so any
    /// notification clears them all).
    analyses: std::cell::RefCell<HashMap<String, Rc<Analyzed>>>,
}

fn uri_to_path(uri: &str) -> PathBuf {
    let p = uri.strip_prefix("file://").unwrap_or(uri);
    // Percent-decoding of the common cases (spaces and non-ASCII paths).
    let mut out = Vec::new();
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&p[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).to_string())
}

fn path_to_uri(p: &Path) -> String {
    let s = p.display().to_string();
    let mut out = String::from("file://");
    for ch in s.chars() {
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '/' | '-' | '_' | '.' | '~' => out.push(ch),
            c => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}

/// Where the embedded standard library is written so editors can open it (read-only).
fn std_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("recipec").join(format!("std-{}", env!("CARGO_PKG_VERSION")))
}

fn std_file(name: &str) -> Option<PathBuf> {
    let file = name.strip_prefix("<std>/")?;
    let (_, _, text) = stdlib::MODULES.iter().find(|m| m.1 == file)?;
    let path = std_dir().join(file);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
        std::fs::create_dir_all(std_dir()).ok()?;
        std::fs::write(&path, text).ok()?;
    }
    Some(path)
}

/// Open documents first, then the file system; `std.*` from the embedded library.
struct Loader<'a> {
    docs: &'a HashMap<String, String>,
}

impl ModuleLoader for Loader<'_> {
    fn load(&self, path: &[String], from: &str) -> Option<(String, String)> {
        if path.first().map(|s| s == "std").unwrap_or(false) {
            let (file, text) = stdlib::module(path)?;
            return Some((format!("<std>/{file}"), text.to_string()));
        }
        if path.iter().any(|s| s.is_empty() || s == "..") {
            return None;
        }
        let mut p = Path::new(from).parent()?.to_path_buf();
        for s in path {
            p.push(s);
        }
        p.set_extension("recipe");
        let uri = path_to_uri(&p);
        if let Some(t) = self.docs.get(&uri) {
            return Some((p.display().to_string(), t.clone()));
        }
        Some((p.display().to_string(), std::fs::read_to_string(&p).ok()?))
    }
    fn known_modules(&self) -> Vec<String> {
        stdlib::MODULES.iter().map(|m| m.0.to_string()).collect()
    }
}

struct Analyzed {
    db: SourceDb,
    file: FileId,
    analysis: lang::Analysis,
}

fn range(text: &str, start: usize, end: usize) -> Value {
    let (l1, c1) = position(text, start);
    let (l2, c2) = position(text, end);
    json!({ "start": { "line": l1, "character": c1 }, "end": { "line": l2, "character": c2 } })
}

fn get_str<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| format!("missing `{}`", path.join(".")))?;
    }
    cur.as_str().ok_or_else(|| format!("`{}` is not a string", path.join(".")))
}

fn get_pos(v: &Value) -> Result<(u32, u32), String> {
    let p = v.get("position").ok_or("missing `position`")?;
    let line = p.get("line").and_then(|x| x.as_u64()).ok_or("missing `position.line`")?;
    let ch = p.get("character").and_then(|x| x.as_u64()).ok_or("missing `position.character`")?;
    Ok((line as u32, ch as u32))
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    pub fn new() -> Server {
        Server {
            docs: HashMap::new(),
            dirty: Default::default(),
            plans: Default::default(),
            analyses: Default::default(),
        }
    }

    fn analyze(&self, uri: &str) -> Result<Rc<Analyzed>, String> {
        if let Some(a) = self.analyses.borrow().get(uri) {
            return Ok(a.clone());
        }
        let text = self.docs.get(uri).ok_or_else(|| format!("document {uri} is not open"))?;
        let mut db = SourceDb::new();
        let file = db.add(uri_to_path(uri).display().to_string(), text.clone());
        let analysis = lang::analyze(&mut db, &[file], &Loader { docs: &self.docs });
        let a = Rc::new(Analyzed { db, file, analysis });
        self.analyses.borrow_mut().insert(uri.to_string(), a.clone());
        Ok(a)
    }

    pub fn notification(&mut self, method: &str, params: Value) -> Vec<Notification> {
        self.analyses.get_mut().clear();
        let uri = match method {
            "textDocument/didOpen" => {
                let (Ok(uri), Ok(text)) =
                    (get_str(&params, &["textDocument", "uri"]), get_str(&params, &["textDocument", "text"]))
                else {
                    return vec![];
                };
                self.docs.insert(uri.to_string(), text.to_string());
                uri.to_string()
            }
            "textDocument/didChange" => {
                let Ok(uri) = get_str(&params, &["textDocument", "uri"]) else { return vec![] };
                // Full synchronization: the last change holds the whole text.
                let Some(text) = params
                    .get("contentChanges")
                    .and_then(|c| c.as_array())
                    .and_then(|a| a.last())
                    .and_then(|c| c.get("text"))
                    .and_then(|t| t.as_str())
                else {
                    return vec![];
                };
                self.docs.insert(uri.to_string(), text.to_string());
                uri.to_string()
            }
            "textDocument/didSave" => match get_str(&params, &["textDocument", "uri"]) {
                Ok(u) => u.to_string(),
                Err(_) => return vec![],
            },
            "textDocument/didClose" => {
                if let Ok(uri) = get_str(&params, &["textDocument", "uri"]) {
                    self.docs.remove(uri);
                    self.dirty.remove(uri);
                    return vec![Notification::new(
                        "textDocument/publishDiagnostics".into(),
                        json!({ "uri": uri, "diagnostics": [] }),
                    )];
                }
                return vec![];
            }
            _ => return vec![],
        };
        self.dirty.insert(uri);
        vec![]
    }

    /// Diagnostics for every document changed since the last call.
    pub fn flush(&mut self) -> Vec<Notification> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|uri| self.diagnostics(&uri).ok())
            .map(|v| Notification::new("textDocument/publishDiagnostics".into(), v))
            .collect()
    }

    fn diagnostics(&self, uri: &str) -> Result<Value, String> {
        let a = self.analyze(uri)?;
        let text = &a.db.file(a.file).text;
        let mut out = vec![];
        for d in &a.analysis.diagnostics {
            let Some(l) = d.primary() else { continue };
            if l.file != a.file {
                continue;
            }
            let mut message = d.message.clone();
            if let Some(h) = &d.help {
                message.push_str(&format!("\nhelp: {h}"));
            }
            let related: Vec<Value> = d
                .labels
                .iter()
                .skip(1)
                .filter(|x| x.file == a.file)
                .map(|x| json!({ "location": { "uri": uri, "range": range(text, x.span.start as usize, x.span.end as usize) }, "message": x.message }))
                .collect();
            out.push(json!({
                "range": range(text, l.span.start as usize, l.span.end as usize),
                "severity": if d.is_error() { 1 } else { 2 },
                "code": d.code,
                "codeDescription": { "href": format!("https://recipec.invalid/diagnostics#{}", d.code.to_lowercase()) },
                "source": "recipec",
                "message": message,
                "relatedInformation": related,
            }));
        }
        Ok(json!({ "uri": uri, "diagnostics": out }))
    }

    pub fn request(&mut self, method: &str, params: Value) -> Result<Value, String> {
        match method {
            "textDocument/hover" => self.hover(&params),
            "textDocument/definition" => self.definition(&params),
            "textDocument/completion" => self.completion(&params),
            "textDocument/formatting" => self.formatting(&params),
            "textDocument/documentSymbol" => self.symbols(&params),
            "textDocument/references" => self.references(&params),
            "textDocument/rename" => self.rename(&params),
            "textDocument/signatureHelp" => self.signature_help(&params),
            "textDocument/semanticTokens/full" => self.semantic_tokens(&params),
            other => Err(format!("unsupported request `{other}`")),
        }
    }

    fn locate(&self, params: &Value) -> Result<(String, usize), String> {
        let uri = get_str(params, &["textDocument", "uri"])?.to_string();
        let text = self.docs.get(&uri).ok_or_else(|| format!("document {uri} is not open"))?;
        let (line, ch) = get_pos(params)?;
        Ok((uri.clone(), offset(text, line, ch)))
    }

    /// The source header of an item (up to its `{`), for hovers and completion details.
    fn header(text: &str, item: &lang::ast::Item) -> String {
        let s = &text[item.span.range()];
        let end = s.find('{').unwrap_or(s.len());
        s[..end].split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The memory plan of the document's recipe, per line (cached per text).
    fn line_plan(&self, uri: &str, a: &Analyzed) -> Option<LinePlan> {
        let text = &a.db.file(a.file).text;
        if let Some((t, p)) = self.plans.borrow().get(uri) {
            if t == text {
                return p.clone();
            }
        }
        let plan = (|| {
            if a.analysis.has_errors() {
                return None;
            }
            let modules = &a.analysis.modules;
            let i = modules.list[0].ast.items.iter().position(|it| matches!(it.kind, ItemKind::Recipe(_)))?;
            let r = lang::types::ItemRef { module: 0, item: i };
            let mut g = compiler::entry::recipe_step(modules, &a.db, r).ok()?;
            compiler::passes::run_pipeline(&mut g, None, &mut vec![]).ok()?;
            let plan = compiler::kernel::schedule(&g).ok()?;
            let name = a.db.file(a.file).name.rsplit('/').next().unwrap_or("").to_string();
            let mut lines: HashMap<usize, (usize, usize)> = HashMap::new();
            let at_peak: Vec<*const compiler::kernel::BufDecl> =
                plan.live_at(plan.peak_at).into_iter().map(|b| b as *const _).collect();
            for b in plan.buffers.iter().filter(|b| b.kind == compiler::kernel::BufKind::Temp && b.into.is_none()) {
                let origin = &b.origin;
                let rest = origin.strip_prefix("d/").unwrap_or(origin);
                let mut parts = rest.rsplitn(3, ':');
                let (_col, line, file) = (parts.next(), parts.next(), parts.next());
                if file != Some(name.as_str()) {
                    continue;
                }
                let Some(line) = line.and_then(|l| l.parse::<usize>().ok()) else { continue };
                let e = lines.entry(line).or_insert((0, 0));
                e.0 += b.bytes;
                if at_peak.contains(&(b as *const _)) {
                    e.1 += b.bytes;
                }
            }
            Some(LinePlan { peak: plan.peak_bytes, lines })
        })();
        self.plans.borrow_mut().insert(uri.to_string(), (text.clone(), plan.clone()));
        plan
    }

    fn hover(&self, params: &Value) -> Result<Value, String> {
        let (uri, at) = self.locate(params)?;
        let a = self.analyze(&uri)?;
        let text = a.db.file(a.file).text.clone();
        let Some((ws, we)) = word_at(&text, at) else { return Ok(Value::Null) };
        let word = &text[ws..we];
        // A binding: its dtype and shape (the definition itself, or the nearest one before).
        let typed = a
            .analysis
            .typed
            .iter()
            .filter(|t| t.file == a.file && t.name == word && (t.span.start as usize) <= at)
            .max_by_key(|t| t.span.start);
        let m = 0;
        let modules = &a.analysis.modules;
        let value = if let Some(t) =
            typed.filter(|t| modules.list[m].items.get(word).is_none() || t.span.start as usize == ws)
        {
            format!("```recipe\n{} {}: {}\n```", t.kind, t.name, t.ty)
        } else if let Some(r) = modules.find_item(m, word) {
            let item = modules.item(r);
            let src = &a.db.file(modules.list[r.module].file).text;
            let mut s = format!("```recipe\n{}\n```", Self::header(src, item));
            if !item.docs.is_empty() {
                s.push_str("\n\n");
                s.push_str(&item.docs.join("\n"));
            }
            s
        } else if let Some(sig) = lang::builtins::signature_text(word) {
            format!("```recipe\n{sig}\n```\n\nbuilt-in")
        } else {
            return Ok(Value::Null);
        };
        let mut value = value;
        // Memory: what this line holds at the peak of the recipe's training step.
        if let Some(plan) = self.line_plan(&uri, &a) {
            let line = position(&text, at).0 as usize + 1;
            if let Some((allocated, at_peak)) = plan.lines.get(&line) {
                value.push_str(&format!(
                    "\n\nmemory: this line's buffers take {} in the training step (forward and gradients); {} of them are live at the step's peak of {}",
                    compiler::plan::human(*allocated),
                    compiler::plan::human(*at_peak),
                    compiler::plan::human(plan.peak)
                ));
            }
        }
        Ok(json!({ "contents": { "kind": "markdown", "value": value }, "range": range(&text, ws, we) }))
    }

    fn definition(&self, params: &Value) -> Result<Value, String> {
        let (uri, at) = self.locate(params)?;
        let a = self.analyze(&uri)?;
        let text = a.db.file(a.file).text.clone();
        let Some((ws, we)) = word_at(&text, at) else { return Ok(Value::Null) };
        let word = &text[ws..we];
        let modules = &a.analysis.modules;
        // Local bindings first (the nearest definition before the use).
        if let Some(t) = a
            .analysis
            .typed
            .iter()
            .filter(|t| t.file == a.file && t.name == word && (t.span.start as usize) <= at)
            .max_by_key(|t| t.span.start)
        {
            return Ok(json!({ "uri": uri, "range": range(&text, t.span.start as usize, t.span.end as usize) }));
        }
        let Some(r) = modules.find_item(0, word) else { return Ok(Value::Null) };
        let item = modules.item(r);
        let Some(name) = item.name() else { return Ok(Value::Null) };
        let target = &modules.list[r.module];
        let target_text = &a.db.file(target.file).text;
        let target_name = &a.db.file(target.file).name;
        let target_uri = if target.file == a.file {
            uri.clone()
        } else if let Some(p) = std_file(target_name) {
            path_to_uri(&p)
        } else {
            path_to_uri(Path::new(target_name))
        };
        Ok(json!({ "uri": target_uri, "range": range(target_text, name.span.start as usize, name.span.end as usize) }))
    }

    fn completion(&self, params: &Value) -> Result<Value, String> {
        let (uri, at) = self.locate(params)?;
        let text = self.docs.get(&uri).cloned().unwrap_or_default();
        let line_start = text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let before = text[line_start..at].trim_start();
        let mut items: Vec<Value> = vec![];
        let item = |label: &str, kind: u32, detail: &str| json!({ "label": label, "kind": kind, "detail": detail });
        // `use std.` and `use std.module.`
        if let Some(path) = before.strip_prefix("use ") {
            let path = path.trim_end_matches(|c: char| c.is_alphanumeric() || c == '_');
            let path = path.trim_end_matches('.');
            if path == "std" {
                for (m, _, text) in stdlib::MODULES {
                    let doc = text.lines().next().unwrap_or("").trim_start_matches("//!").trim();
                    items.push(item(m.trim_start_matches("std."), 9, doc));
                }
            } else if let Some((_, _, mtext)) = stdlib::MODULES.iter().find(|m| m.0 == path) {
                let parsed = lang::parse::parse(FileId(0), mtext);
                for it in parsed.module.items.iter().filter(|i| i.public) {
                    if let Some(n) = it.name() {
                        items.push(item(&n.name, 3, &Self::header(mtext, it)));
                    }
                }
            }
            return Ok(json!({ "isIncomplete": false, "items": items }));
        }
        let a = self.analyze(&uri)?;
        let modules = &a.analysis.modules;
        // Named arguments inside an open call: `f(x, |`.
        if let Some(callee) = open_call(&text[..at]) {
            if let Some(r) = modules.find_item(0, &callee) {
                let params = match &modules.item(r).kind {
                    ItemKind::Fn(f) => f.params.clone(),
                    ItemKind::Rule(rd) => rd.params.clone(),
                    ItemKind::Model(md) => md.params.clone(),
                    _ => vec![],
                };
                for p in params {
                    items.push(json!({ "label": format!("{} =", p.name.name), "kind": 5, "insertText": format!("{} = ", p.name.name), "detail": lang::fmt::flat(&lang::ast::Expr::new(lang::ast::ExprKind::Name(p.ty.dtype.name.clone()), p.span)) }));
                }
            } else if let Some((_, ps, doc)) = lang::builtins::BUILTINS.iter().find(|b| b.0 == callee) {
                for p in ps.iter() {
                    let n = p.trim_end_matches('?');
                    items.push(
                        json!({ "label": format!("{n} ="), "kind": 5, "insertText": format!("{n} = "), "detail": doc }),
                    );
                }
            }
        }
        // Recipe fields inside a recipe.
        let in_recipe = modules.list[0].ast.items.iter().any(|i| {
            matches!(i.kind, ItemKind::Recipe(_)) && (i.span.start as usize) <= at && at <= i.span.end as usize
        });
        if in_recipe {
            for (f, what, _) in lang::recipe::RECIPE_FIELDS {
                items.push(item(f, 5, what));
            }
            for kw in ["optimize", "sparsify", "freeze"] {
                items.push(item(kw, 14, "keyword"));
            }
        }
        for (name, &i) in &modules.list[0].items {
            let it = &modules.list[0].ast.items[i];
            items.push(item(name, 3, &Self::header(&text, it)));
        }
        for (name, imp) in &modules.list[0].imports {
            let it = modules.item(imp.target);
            let src = &a.db.file(modules.list[imp.target.module].file).text;
            items.push(item(name, 3, &Self::header(src, it)));
        }
        let mut seen = std::collections::HashSet::new();
        for t in a.analysis.typed.iter().filter(|t| t.file == a.file && (t.span.start as usize) < at) {
            if seen.insert(t.name.clone()) {
                items.push(item(&t.name, 6, &t.ty));
            }
        }
        for (name, _, doc) in lang::builtins::BUILTINS {
            items.push(item(name, 3, doc));
        }
        for kw in lang::lexer::HARD_KEYWORDS {
            items.push(item(kw, 14, "keyword"));
        }
        Ok(json!({ "isIncomplete": false, "items": items }))
    }

    fn formatting(&self, params: &Value) -> Result<Value, String> {
        let uri = get_str(params, &["textDocument", "uri"])?;
        let text = self.docs.get(uri).ok_or_else(|| format!("document {uri} is not open"))?;
        match lang::fmt::format_source(text) {
            Ok(f) if f != *text => Ok(json!([{ "range": range(text, 0, text.len()), "newText": f }])),
            Ok(_) => Ok(json!([])),
            // A file with syntax errors is left as it is; the diagnostics say why.
            Err(_) => Ok(Value::Null),
        }
    }

    /// Byte ranges of every use of the name at `at` that refers to the same binding: for a
    /// local (parameter, `let`, state), the uses inside its item from its definition on;
    /// for an item, every use in the document. Field names (`x.name`) and named arguments
    /// (`f(name = ...)`) are other things and are skipped.
    fn occurrences(&self, uri: &str, at: usize) -> Result<(Vec<(usize, usize)>, bool), String> {
        let a = self.analyze(uri)?;
        let text = a.db.file(a.file).text.clone();
        let Some((ws, we)) = word_at(&text, at) else { return Ok((vec![], false)) };
        let word = text[ws..we].to_string();
        let modules = &a.analysis.modules;
        let local = a
            .analysis
            .typed
            .iter()
            .filter(|t| {
                t.file == a.file && t.name == word && (t.span.start as usize) <= at && t.kind != "model parameter"
            })
            .max_by_key(|t| t.span.start)
            .cloned();
        let scope = match &local {
            Some(t) => {
                let item =
                    modules.list[0].ast.items.iter().find(|i| i.span.start <= t.span.start && t.span.end <= i.span.end);
                match item {
                    Some(i) => (t.span.start as usize, i.span.end as usize),
                    None => (0, text.len()),
                }
            }
            None if modules.find_item(0, &word).is_some() => (0, text.len()),
            None => return Ok((vec![], false)),
        };
        let toks = lang::lexer::lex(FileId(0), &text).tokens;
        let mut out = vec![];
        let mut depth = 0i32;
        // In `use a.b.name`, the dotted name is a reference to the imported item.
        let mut in_use = false;
        for (i, &(s0, tok, e0)) in toks.iter().enumerate() {
            match tok {
                lang::lexer::Tok::LParen => depth += 1,
                lang::lexer::Tok::RParen => depth -= 1,
                lang::lexer::Tok::Use => in_use = true,
                lang::lexer::Tok::Newline => in_use = false,
                _ => {}
            }
            if let lang::lexer::Tok::Ident(name) = tok {
                if name != word || s0 < scope.0 || e0 > scope.1 {
                    continue;
                }
                let after_dot = i > 0 && toks[i - 1].1 == lang::lexer::Tok::Dot && !in_use;
                let named_arg = depth > 0 && toks.get(i + 1).map(|t| t.1) == Some(lang::lexer::Tok::Eq);
                if !after_dot && !named_arg {
                    out.push((s0, e0));
                }
            }
        }
        Ok((out, local.is_some()))
    }

    fn references(&self, params: &Value) -> Result<Value, String> {
        let (uri, at) = self.locate(params)?;
        let text = self.docs.get(&uri).cloned().unwrap_or_default();
        let (occ, local) = self.occurrences(&uri, at)?;
        let mut out: Vec<Value> =
            occ.into_iter().map(|(a, b)| json!({ "uri": uri, "range": range(&text, a, b) })).collect();
        // An imported item: its declaration in the other module (the stdlib or a sibling).
        if !local && !out.is_empty() {
            if let Some(def) = self.definition(params)?.as_object() {
                if def.get("uri").and_then(|u| u.as_str()) != Some(uri.as_str()) {
                    out.push(Value::Object(def.clone()));
                }
            }
        }
        Ok(Value::Array(out))
    }

    fn rename(&self, params: &Value) -> Result<Value, String> {
        let (uri, at) = self.locate(params)?;
        let new = get_str(params, &["newName"])?;
        let valid = new.chars().next().map(|c| c.is_ascii_alphabetic() || c == '_').unwrap_or(false)
            && new.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !lang::lexer::HARD_KEYWORDS.contains(&new);
        if !valid {
            return Err(format!("`{new}` is not a valid name"));
        }
        let text = self.docs.get(&uri).cloned().unwrap_or_default();
        let (occ, local) = self.occurrences(&uri, at)?;
        if !local {
            return Err("only local bindings (parameters, `let`s and states) can be renamed".into());
        }
        let edits: Vec<Value> =
            occ.into_iter().map(|(a, b)| json!({ "range": range(&text, a, b), "newText": new })).collect();
        Ok(json!({ "changes": { uri: edits } }))
    }

    fn signature_help(&self, params: &Value) -> Result<Value, String> {
        let (uri, at) = self.locate(params)?;
        let text = self.docs.get(&uri).cloned().unwrap_or_default();
        let Some(callee) = open_call(&text[..at]) else { return Ok(Value::Null) };
        // The active parameter: commas at depth 0 since the open parenthesis.
        let open = {
            let mut depth = 0i32;
            let mut pos = None;
            for (i, ch) in text[..at].char_indices().rev() {
                match ch {
                    ')' | ']' => depth += 1,
                    '[' => depth -= 1,
                    '(' if depth == 0 => {
                        pos = Some(i);
                        break;
                    }
                    '(' => depth -= 1,
                    _ => {}
                }
            }
            pos.unwrap_or(at)
        };
        let mut depth = 0i32;
        let mut active = 0;
        for ch in text[open + 1..at].chars() {
            match ch {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                ',' if depth == 0 => active += 1,
                _ => {}
            }
        }
        let a = self.analyze(&uri)?;
        let modules = &a.analysis.modules;
        let (label, params_list, doc) = if let Some(r) = modules.find_item(0, &callee) {
            let item = modules.item(r);
            let src = &a.db.file(modules.list[r.module].file).text;
            let ps: Vec<String> = match &item.kind {
                ItemKind::Fn(f) => f.params.iter().map(|p| src[p.span.range()].to_string()).collect(),
                ItemKind::Rule(rd) => rd.params.iter().map(|p| src[p.span.range()].to_string()).collect(),
                ItemKind::Model(md) => md.params.iter().map(|p| src[p.span.range()].to_string()).collect(),
                _ => vec![],
            };
            (format!("{callee}({})", ps.join(", ")), ps, item.docs.first().cloned().unwrap_or_default())
        } else if let Some((_, ps, doc)) = lang::builtins::BUILTINS.iter().find(|b| b.0 == callee) {
            let ps: Vec<String> = ps
                .iter()
                .map(|p| match p.strip_suffix('?') {
                    Some(q) => format!("{q} = …"),
                    None => p.to_string(),
                })
                .collect();
            (format!("{callee}({})", ps.join(", ")), ps, doc.to_string())
        } else {
            return Ok(Value::Null);
        };
        let parameters: Vec<Value> = params_list.iter().map(|p| json!({ "label": p })).collect();
        Ok(json!({
            "signatures": [{ "label": label, "documentation": doc, "parameters": parameters }],
            "activeSignature": 0,
            "activeParameter": active.min(params_list.len().saturating_sub(1)),
        }))
    }

    fn semantic_tokens(&self, params: &Value) -> Result<Value, String> {
        let uri = get_str(params, &["textDocument", "uri"])?;
        let text = self.docs.get(uri).ok_or_else(|| format!("document {uri} is not open"))?;
        let a = self.analyze(uri).ok();
        let lexed = lang::lexer::lex(FileId(0), text);
        use lang::lexer::Tok;
        let ty = |t: &str| TOKEN_TYPES.iter().position(|x| *x == t).unwrap_or(0) as u32;
        let mut spans: Vec<(usize, usize, u32)> = vec![];
        for c in &lexed.comments {
            spans.push((c.span.start as usize, c.span.end as usize, ty("comment")));
        }
        let toks = &lexed.tokens;
        for (i, &(s0, tok, e0)) in toks.iter().enumerate() {
            let kind = match tok {
                Tok::Doc(_) => "comment",
                Tok::Int(_) | Tok::Float(_) => "number",
                Tok::Str(_) => "string",
                Tok::Ident(name) => {
                    let next = toks.get(i + 1).map(|t| t.1);
                    let after_dot = i > 0 && toks[i - 1].1 == Tok::Dot;
                    if lang::types::Dtype::parse(name).is_some() && next != Some(Tok::LParen) || name == "str" {
                        "type"
                    } else if after_dot {
                        "property"
                    } else if next == Some(Tok::LParen) {
                        "function"
                    } else if a
                        .as_ref()
                        .map(|a| a.analysis.typed.iter().any(|t| t.name == name && t.kind == "param"))
                        .unwrap_or(false)
                    {
                        "parameter"
                    } else {
                        "variable"
                    }
                }
                Tok::Newline | Tok::Error => continue,
                t if !lang::lexer::tok_text(&t).chars().next().map(|c| c.is_ascii_alphabetic()).unwrap_or(false) => {
                    "operator"
                }
                _ => "keyword",
            };
            spans.push((s0, e0, ty(kind)));
        }
        spans.sort();
        // Relative encoding: (Δline, Δstart, length, type, modifiers), in UTF-16 units;
        // tokens spanning lines (none here but comments, which are single-line) are skipped.
        let mut data = vec![];
        let (mut pl, mut pc) = (0u32, 0u32);
        for (s0, e0, t) in spans {
            let (l, c) = position(text, s0);
            let (l2, c2) = position(text, e0);
            if l2 != l || c2 <= c {
                continue;
            }
            let dl = l - pl;
            let dc = if dl == 0 { c - pc } else { c };
            data.extend_from_slice(&[dl, dc, c2 - c, t, 0]);
            pl = l;
            pc = c;
        }
        Ok(json!({ "data": data }))
    }

    fn symbols(&self, params: &Value) -> Result<Value, String> {
        let uri = get_str(params, &["textDocument", "uri"])?;
        let text = self.docs.get(uri).ok_or_else(|| format!("document {uri} is not open"))?;
        let parsed = lang::parse::parse(FileId(0), text);
        let mut out = vec![];
        for it in &parsed.module.items {
            let Some(n) = it.name() else { continue };
            let kind = match &it.kind {
                ItemKind::Model(_) => 5,
                ItemKind::Recipe(_) => 23,
                _ => 12,
            };
            out.push(json!({
                "name": n.name,
                "detail": it.kind_name(),
                "kind": kind,
                "range": range(text, it.span.start as usize, it.span.end as usize),
                "selectionRange": range(text, n.span.start as usize, n.span.end as usize),
            }));
        }
        Ok(Value::Array(out))
    }
}

/// The name of the innermost call whose parenthesis is still open before the cursor.
fn open_call(before: &str) -> Option<String> {
    let mut depth = 0i32;
    for (i, ch) in before.char_indices().rev() {
        match ch {
            ')' | ']' => depth += 1,
            '[' => depth -= 1,
            '(' => {
                if depth == 0 {
                    let head = &before[..i];
                    let start = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map(|j| j + 1).unwrap_or(0);
                    let name = &head[start..];
                    return if name.is_empty() { None } else { Some(name.to_string()) };
                }
                depth -= 1;
            }
            '\n' if depth == 0 && before[..i].trim_end().ends_with(['{', '}']) => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hover_text(s: &mut Server, uri: &str, line: u32, character: u32) -> String {
        let r = s
            .request(
                "textDocument/hover",
                json!({ "textDocument": { "uri": uri }, "position": { "line": line, "character": character } }),
            )
            .unwrap();
        r["contents"]["value"].as_str().unwrap_or_default().to_string()
    }

    /// Requests share one analysis until a notification; an edit of an open document that
    /// another imports shows in the importer's next hover (the cached analysis is dropped).
    #[test]
    fn cached_analysis_follows_edits_of_imported_documents() {
        let mut s = Server::new();
        let lib = "file:///tmp/recipec-lsp-unit/lib.recipe";
        let main = "file:///tmp/recipec-lsp-unit/main.recipe";
        let open = |s: &mut Server, uri: &str, text: &str| {
            s.notification(
                "textDocument/didOpen",
                json!({ "textDocument": { "uri": uri, "languageId": "recipe", "version": 1, "text": text } }),
            );
        };
        open(&mut s, lib, "pub fn scale(x: f32) -> f32 {\n    x * 2.0\n}\n");
        open(&mut s, main, "use lib.scale\n\nfn g(y: f32) -> f32 {\n    scale(y)\n}\n");
        assert!(s.flush().len() == 2);
        let before = hover_text(&mut s, main, 3, 5);
        assert!(before.contains("pub fn scale(x: f32) -> f32"), "{before}");
        // The same analysis serves the next request.
        let a = s.analyze(main).unwrap();
        assert!(Rc::ptr_eq(&a, &s.analyze(main).unwrap()));
        s.notification(
            "textDocument/didChange",
            json!({ "textDocument": { "uri": lib, "version": 2 }, "contentChanges": [{ "text": "pub fn scale(x: f32, k: f32) -> f32 {\n    x * k\n}\n" }] }),
        );
        assert!(!Rc::ptr_eq(&a, &s.analyze(main).unwrap()));
        let after = hover_text(&mut s, main, 3, 5);
        assert!(after.contains("pub fn scale(x: f32, k: f32) -> f32"), "{after}");
    }
}
