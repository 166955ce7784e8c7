//! The formatter: a canonical, idempotent layout that keeps every comment.
//!
//! Layout: 4-space indentation; one blank line between items (none between consecutive
//! `use` lines); blank lines inside blocks kept (at most one); binary operators spaced,
//! `x^T` glued; calls, parameter lists and lists broken one element per line, with a
//! trailing comma, when a line would exceed 100 columns. Comments stay on their line, or
//! move to the line before the statement they were inside when that statement is
//! reflowed.

use crate::ast::*;
use crate::diag::Diagnostic;
use crate::lexer::Comment;
use crate::parse::parse;
use crate::source::FileId;

const WIDTH: usize = 100;
const INDENT: &str = "    ";

/// Formats a file. Files with syntax errors are not formatted (their diagnostics are
/// returned), so formatting never loses text.
pub fn format_source(src: &str) -> Result<String, Vec<Diagnostic>> {
    let parsed = parse(FileId(0), src);
    if parsed.diagnostics.iter().any(|d| d.is_error()) {
        return Err(parsed.diagnostics);
    }
    let mut f = Formatter { src, comments: parsed.comments, next: 0, out: String::new(), indent: 0, last_end: 0 };
    f.module(&parsed.module);
    Ok(f.out)
}

struct Formatter<'a> {
    src: &'a str,
    comments: Vec<Comment>,
    next: usize,
    out: String,
    indent: usize,
    /// Source offset just after the last thing emitted (for blank-line detection).
    last_end: u32,
}

impl Formatter<'_> {
    fn pad(&self) -> String {
        INDENT.repeat(self.indent)
    }

    /// True when the source has a blank line between offsets `a` and `b`.
    fn blank_between(&self, a: u32, b: u32) -> bool {
        if a >= b {
            return false;
        }
        let seg = &self.src[a as usize..(b as usize).min(self.src.len())];
        let mut newlines = 0;
        for line in seg.split('\n').skip(1) {
            newlines += 1;
            if newlines >= 1 && line.trim().is_empty() && seg.matches('\n').count() >= 2 {
                return true;
            }
        }
        false
    }

    /// Emits the comments that start before `pos` on their own lines.
    fn leading(&mut self, pos: u32) {
        while self.next < self.comments.len() && self.comments[self.next].span.start < pos {
            let c = self.comments[self.next].clone();
            self.next += 1;
            if !self.out.is_empty() && !self.out.ends_with("\n\n") && self.blank_between(self.last_end, c.span.start) {
                self.out.push('\n');
            }
            let pad = self.pad();
            self.out.push_str(&pad);
            self.out.push_str(c.text.trim_end());
            self.out.push('\n');
            self.last_end = c.span.end;
        }
    }

    /// Ends the current line, attaching a comment that follows `end` on the same source line.
    fn end_line(&mut self, end: u32) {
        if self.next < self.comments.len() {
            let c = &self.comments[self.next];
            let between = &self.src[(end as usize).min(c.span.start as usize)..c.span.start as usize];
            // Only a comment right after this line's last token belongs to it; one after
            // further code on the same source line belongs to that code.
            let adjacent = between.chars().all(|ch| matches!(ch, ' ' | '\t' | ',' | ';' | '\r'));
            if !c.own_line && adjacent && c.span.start >= end {
                self.out.push_str("  ");
                self.out.push_str(c.text.trim_end());
                self.last_end = c.span.end;
                self.next += 1;
                self.out.push('\n');
                return;
            }
        }
        self.last_end = self.last_end.max(end);
        self.out.push('\n');
    }

    /// Starts a line for a node at `start`: comments before it, then a blank line if the
    /// source had one and `keep_blank` is set.
    fn start_line(&mut self, start: u32, keep_blank: bool) {
        let had_blank = self.blank_between(self.last_end, start);
        let before = self.next;
        self.leading(start);
        let emitted_comments = self.next > before;
        if keep_blank && had_blank && !emitted_comments && !self.out.is_empty() && !self.out.ends_with("\n\n") {
            self.out.push('\n');
        } else if emitted_comments && self.blank_between(self.last_end, start) && !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
    }

    fn write(&mut self, s: &str) {
        self.out.push_str(s);
    }

    // ---------------------------------------------------------------- items

    fn module(&mut self, m: &Module) {
        let mut prev_use = false;
        for (i, item) in m.items.iter().enumerate() {
            let is_use = matches!(item.kind, ItemKind::Use(_));
            if i > 0 && !(is_use && prev_use) {
                // One blank line between items; comments before the item come after it.
                if !self.out.ends_with("\n\n") {
                    self.out.push('\n');
                }
            }
            self.start_line(item.span.start, is_use && prev_use);
            self.item(item);
            prev_use = is_use;
        }
        self.leading(u32::MAX);
        while self.out.ends_with("\n\n") {
            self.out.pop();
        }
    }

    fn docs(&mut self, docs: &[String]) {
        for d in docs {
            let pad = self.pad();
            if d.is_empty() {
                self.write(&format!("{pad}///\n"));
            } else {
                self.write(&format!("{pad}/// {d}\n"));
            }
        }
    }

    fn item(&mut self, item: &Item) {
        self.docs(&item.docs);
        let vis = if item.public { "pub " } else { "" };
        match &item.kind {
            ItemKind::Use(u) => {
                let path: Vec<&str> = u.path.iter().map(|i| i.name.as_str()).collect();
                let text = match &u.tree {
                    UseTree::Single => path.join("."),
                    UseTree::Group(names) => {
                        let n: Vec<&str> = names.iter().map(|i| i.name.as_str()).collect();
                        format!("{}.{{{}}}", path.join("."), n.join(", "))
                    }
                    UseTree::Glob(_) => format!("{}.*", path.join(".")),
                };
                self.write(&format!("{vis}use {text}"));
                self.end_line(item.span.end);
            }
            ItemKind::Fn(f) => self.fn_def(vis, f, item.span.end),
            ItemKind::Rule(r) => {
                let head = format!("{vis}{} {}", r.kind.keyword(), r.name.name);
                self.header(&head, &r.params, "", r.name.span.end);
                self.stmts(&r.body);
                self.close(item.span.end);
            }
            ItemKind::Model(m) => {
                let head = format!("{vis}model {}", m.name.name);
                if m.params.is_empty() {
                    self.write(&format!("{head} {{"));
                    let end = self.brace_after(m.name.span.end);
                    self.end_line(end);
                } else {
                    self.header(&head, &m.params, "", m.name.span.end);
                }
                self.indent += 1;
                self.members(&m.members);
                self.indent -= 1;
                self.close(item.span.end);
            }
            ItemKind::Recipe(r) => {
                self.write(&format!("{vis}recipe {} {{", r.name.name));
                let end = self.brace_after(r.name.span.end);
                self.end_line(end);
                self.indent += 1;
                for (i, m) in r.members.iter().enumerate() {
                    self.start_line(m.span.start, i > 0);
                    self.docs(&m.docs);
                    let pad = self.pad();
                    let col = pad.len();
                    let text = match &m.kind {
                        RecipeMemberKind::Field { name, value } => {
                            let p = format!("{} = ", name.name);
                            format!("{p}{}", self.expr(value, col + p.len()))
                        }
                        RecipeMemberKind::Let { name, value } => {
                            let p = format!("let {} = ", name.name);
                            format!("{p}{}", self.expr(value, col + p.len()))
                        }
                        RecipeMemberKind::Optimize { selector, rule } => {
                            let p = format!("optimize {selector} with ");
                            format!("{p}{}", self.expr(rule, col + p.len()))
                        }
                        RecipeMemberKind::Sparsify { selector, rule } => {
                            let p = format!("sparsify {selector} with ");
                            format!("{p}{}", self.expr(rule, col + p.len()))
                        }
                        RecipeMemberKind::Freeze { selector } => format!("freeze {selector}"),
                        RecipeMemberKind::Error => String::new(),
                    };
                    self.write(&format!("{pad}{text}"));
                    self.end_line(m.span.end);
                }
                self.indent -= 1;
                self.close(item.span.end);
            }
            ItemKind::Error => {}
        }
    }

    /// `head(params) suffix {` with the parameter list broken when too long.
    fn header(&mut self, head: &str, params: &[Param], suffix: &str, name_end: u32) {
        let pad = self.pad();
        let flat: Vec<String> = params.iter().map(|p| self.param(p)).collect();
        let one = format!("{pad}{head}({}){suffix} {{", flat.join(", "));
        let has_docs = params.iter().any(|p| !p.docs.is_empty());
        let has_comments = params.iter().any(|p| self.comment_within(name_end, p.span.end));
        // The header line ends at its `{` (types contain no braces).
        let after = params.last().map(|p| p.span.end).unwrap_or(name_end) as usize;
        let brace_end =
            self.src[after.min(self.src.len())..].find('{').map(|i| (after + i + 1) as u32).unwrap_or(after as u32);
        if one.chars().count() <= WIDTH && !has_docs && !has_comments {
            self.write(&one);
            self.end_line(brace_end);
            return;
        }
        self.write(&format!("{pad}{head}("));
        self.out.push('\n');
        self.indent += 1;
        for p in params {
            self.start_line(p.span.start, false);
            self.docs(&p.docs);
            let pad = self.pad();
            let text = self.param(p);
            self.write(&format!("{pad}{text},"));
            self.end_line(p.span.end);
        }
        self.indent -= 1;
        let pad = self.pad();
        self.write(&format!("{pad}){suffix} {{"));
        self.end_line(brace_end);
    }

    /// The offset just after the first `{` at or after `pos`.
    fn brace_after(&self, pos: u32) -> u32 {
        let p = (pos as usize).min(self.src.len());
        self.src[p..].find('{').map(|i| (p + i + 1) as u32).unwrap_or(pos)
    }

    fn comment_within(&self, a: u32, b: u32) -> bool {
        self.comments[self.next..].iter().any(|c| c.span.start >= a && c.span.start < b)
    }

    fn param(&self, p: &Param) -> String {
        let mut s = format!("{}: {}", p.name.name, type_str(&p.ty));
        if let Some(d) = &p.default {
            s.push_str(" = ");
            s.push_str(&flat(d));
        }
        s
    }

    fn fn_def(&mut self, vis: &str, f: &FnDef, end: u32) {
        let head = format!("{vis}{} {}", f.kind.keyword(), f.name.name);
        let suffix = f.ret.as_ref().map(|t| format!(" -> {}", type_str(t))).unwrap_or_default();
        self.header(&head, &f.params, &suffix, f.name.span.end);
        self.block_body(&f.body);
        self.close(end);
    }

    fn close(&mut self, end: u32) {
        self.leading(end.saturating_sub(1));
        let pad = self.pad();
        self.write(&format!("{pad}}}"));
        self.end_line(end);
    }

    fn members(&mut self, members: &[Member]) {
        for (i, m) in members.iter().enumerate() {
            self.start_line(m.span.start, i > 0);
            self.docs(&m.docs);
            let pad = self.pad();
            let col = pad.len();
            match &m.kind {
                MemberKind::Param { name, index, ty, init, buffer } => {
                    let idx = index.as_ref().map(|i| format!("[{}]", flat(i))).unwrap_or_default();
                    let kw = if *buffer { "buffer" } else { "param" };
                    let p = format!("{kw} {}{idx}: {} = ", name.name, type_str(ty));
                    let text = format!("{p}{}", self.expr(init, col + p.len()));
                    self.write(&format!("{pad}{text}"));
                    self.end_line(m.span.end);
                }
                MemberKind::Sub { name, index, value } => {
                    let idx = index.as_ref().map(|i| format!("[{}]", flat(i))).unwrap_or_default();
                    let p = format!("sub {}{idx} = ", name.name);
                    let text = format!("{p}{}", self.expr(value, col + p.len()));
                    self.write(&format!("{pad}{text}"));
                    self.end_line(m.span.end);
                }
                MemberKind::Let { name, value } => {
                    let p = format!("let {} = ", name.name);
                    let text = format!("{p}{}", self.expr(value, col + p.len()));
                    self.write(&format!("{pad}{text}"));
                    self.end_line(m.span.end);
                }
                MemberKind::Fn(f) => self.fn_def("", f, m.span.end),
                MemberKind::For { var, start, end, members } => {
                    self.write(&format!("{pad}for {} in {}..{} {{", var.name, flat(start), flat(end)));
                    let e = self.brace_after(end.span.end);
                    self.end_line(e);
                    self.indent += 1;
                    self.members(members);
                    self.indent -= 1;
                    self.close(m.span.end);
                }
                MemberKind::Error => {}
            }
        }
    }

    // ---------------------------------------------------------------- statements

    /// The inside of a `{ ... }` block: statements and the value, indented.
    fn block_body(&mut self, b: &Block) {
        self.indent += 1;
        for (i, s) in b.stmts.iter().enumerate() {
            self.stmt(s, i > 0);
        }
        if let Some(v) = &b.value {
            self.start_line(v.span.start, !b.stmts.is_empty());
            let pad = self.pad();
            let text = self.expr(v, pad.len());
            self.write(&format!("{pad}{text}"));
            self.end_line(v.span.end);
        }
        self.indent -= 1;
    }

    fn stmts(&mut self, stmts: &[Stmt]) {
        self.indent += 1;
        for (i, s) in stmts.iter().enumerate() {
            self.stmt(s, i > 0);
        }
        self.indent -= 1;
    }

    fn stmt(&mut self, s: &Stmt, keep_blank: bool) {
        self.start_line(s.span.start, keep_blank);
        let pad = self.pad();
        let col = pad.len();
        let every = |e: &Option<Expr>| e.as_ref().map(|k| format!(" every {}", flat(k))).unwrap_or_default();
        match &s.kind {
            StmtKind::Let { name, indices, ty, value } => {
                let mut p = format!("let {}", name.name);
                if let Some(idx) = indices {
                    let v: Vec<String> = idx.iter().map(|i| format!("{}: {}", i.name.name, flat(&i.extent))).collect();
                    p.push_str(&format!("[{}]", v.join(", ")));
                }
                if let Some(t) = ty {
                    p.push_str(&format!(": {}", type_str(t)));
                }
                p.push_str(" = ");
                let text = format!("{p}{}", self.expr(value, col + p.len()));
                self.write(&format!("{pad}{text}"));
            }
            StmtKind::Assign { target, value, every: e } => {
                let p = format!("{} = ", target.name);
                let text = format!("{p}{}{}", self.expr(value, col + p.len()), every(e));
                self.write(&format!("{pad}{text}"));
            }
            StmtKind::State { name, init, every: e } => {
                let p = format!("state {} = ", name.name);
                let text = format!("{p}{}{}", self.expr(init, col + p.len()), every(e));
                self.write(&format!("{pad}{text}"));
            }
            StmtKind::For { var, start, end, body } => {
                self.write(&format!("{pad}for {} in {}..{} {{", var.name, flat(start), flat(end)));
                let e = self.brace_after(end.span.end);
                self.end_line(e);
                self.stmts(body);
                self.close(s.span.end);
                return;
            }
            StmtKind::Expr(e) => {
                let text = self.expr(e, col);
                self.write(&format!("{pad}{text}"));
            }
            StmtKind::Error => {}
        }
        self.end_line(s.span.end);
    }

    // ---------------------------------------------------------------- expressions

    /// An expression starting at column `col`; broken over lines when it does not fit.
    fn expr(&self, e: &Expr, col: usize) -> String {
        let one = flat(e);
        let fits = col + one.chars().count() <= WIDTH && !one.contains('\n');
        match &e.kind {
            ExprKind::If { .. } if !fits || !if_is_simple(e) => self.if_expr(e, col),
            _ if fits => one,
            ExprKind::Call { callee, args } if !args.is_empty() => {
                let head = flat(callee);
                let inner = INDENT.repeat(self.indent + 1);
                let mut s = format!("{head}(\n");
                for a in args {
                    let name = a.name.as_ref().map(|n| format!("{} = ", n.name)).unwrap_or_default();
                    let sub = Formatter { indent: self.indent + 1, ..self.shallow() };
                    let v = sub.expr(&a.value, inner.len() + name.len());
                    s.push_str(&format!("{inner}{name}{v},\n"));
                }
                s.push_str(&format!("{})", INDENT.repeat(self.indent)));
                s
            }
            // A sum (or `&&`, `||` chain) too long for its line breaks after the operator, the
            // right operand on the next line, one indent deeper (a newline after an operator
            // continues the statement).
            ExprKind::Binary(op @ (BinOp::Add | BinOp::Sub | BinOp::And | BinOp::Or), a, b) => {
                let inner = INDENT.repeat(self.indent + 1);
                let sub = Formatter { indent: self.indent + 1, ..self.shallow() };
                format!("{} {}\n{inner}{}", self.expr(a, col), op.symbol(), sub.expr(b, inner.len()))
            }
            ExprKind::List(items) if !items.is_empty() => {
                let inner = INDENT.repeat(self.indent + 1);
                let mut s = String::from("[\n");
                for it in items {
                    let sub = Formatter { indent: self.indent + 1, ..self.shallow() };
                    s.push_str(&format!("{inner}{},\n", sub.expr(it, inner.len())));
                }
                s.push_str(&format!("{}]", INDENT.repeat(self.indent)));
                s
            }
            _ => one,
        }
    }

    /// A formatter that only shares the source (for nested expression layout).
    fn shallow(&self) -> Formatter<'_> {
        Formatter { src: self.src, comments: vec![], next: 0, out: String::new(), indent: self.indent, last_end: 0 }
    }

    fn if_expr(&self, e: &Expr, _col: usize) -> String {
        let ExprKind::If { cond, then, otherwise } = &e.kind else { return flat(e) };
        let mut s = format!("if {} {{\n", flat(cond));
        s.push_str(&self.block_text(then));
        s.push_str(&format!("{}}} else ", INDENT.repeat(self.indent)));
        // `else if` is sugar for an else block holding only an `if` (same span).
        match (&otherwise.value, otherwise.stmts.is_empty()) {
            (Some(v), true) if matches!(v.kind, ExprKind::If { .. }) && v.span == otherwise.span => {
                s.push_str(&self.if_expr(v, 0));
            }
            _ => {
                s.push_str("{\n");
                s.push_str(&self.block_text(otherwise));
                s.push_str(&format!("{}}}", INDENT.repeat(self.indent)));
            }
        }
        s
    }

    /// The statements and value of a nested block, one indentation deeper, as text.
    fn block_text(&self, b: &Block) -> String {
        let mut sub = Formatter { indent: self.indent, ..self.shallow() };
        sub.last_end = b.span.start;
        sub.block_body(b);
        sub.out
    }
}

fn if_is_simple(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::If { then, otherwise, .. } => {
            then.stmts.is_empty()
                && otherwise.stmts.is_empty()
                && then.value.as_ref().map(|v| !matches!(v.kind, ExprKind::If { .. })).unwrap_or(false)
                && otherwise.value.as_ref().map(|v| !matches!(v.kind, ExprKind::If { .. })).unwrap_or(false)
        }
        _ => true,
    }
}

fn type_str(t: &TypeExpr) -> String {
    match &t.dims {
        None => t.dtype.name.clone(),
        Some(d) => format!("{}[{}]", t.dtype.name, d.iter().map(flat).collect::<Vec<_>>().join(", ")),
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The single-line form of an expression.
pub fn flat(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Int(i) => i.to_string(),
        ExprKind::Float { text, .. } => text.clone(),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Str(s) => quote(s),
        ExprKind::Name(n) => n.clone(),
        ExprKind::Underscore => "_".into(),
        ExprKind::Unary(UnOp::Neg, x) => format!("-{}", flat(x)),
        ExprKind::Unary(UnOp::Not, x) => format!("!{}", flat(x)),
        ExprKind::Binary(op, a, b) => format!("{} {} {}", flat(a), op.symbol(), flat(b)),
        ExprKind::Transpose(x) => format!("{}^T", flat(x)),
        ExprKind::Call { callee, args } => {
            let a: Vec<String> = args
                .iter()
                .map(|a| match &a.name {
                    Some(n) => format!("{} = {}", n.name, flat(&a.value)),
                    None => flat(&a.value),
                })
                .collect();
            format!("{}({})", flat(callee), a.join(", "))
        }
        ExprKind::Index { base, indices } => {
            let i: Vec<String> = indices
                .iter()
                .map(|i| match i {
                    IndexArg::Expr(e) => flat(e),
                    IndexArg::Slice { start, end, .. } => format!(
                        "{}:{}",
                        start.as_ref().map(flat).unwrap_or_default(),
                        end.as_ref().map(flat).unwrap_or_default()
                    ),
                })
                .collect();
            format!("{}[{}]", flat(base), i.join(", "))
        }
        ExprKind::Field { base, name } => format!("{}.{}", flat(base), name.name),
        ExprKind::If { cond, then, otherwise } => {
            let v = |b: &Block| b.value.as_ref().map(|v| flat(v)).unwrap_or_default();
            format!("if {} {{ {} }} else {{ {} }}", flat(cond), v(then), v(otherwise))
        }
        ExprKind::Ternary { cond, then, otherwise } => format!("{} ? {} : {}", flat(cond), flat(then), flat(otherwise)),
        ExprKind::List(items) => format!("[{}]", items.iter().map(flat).collect::<Vec<_>>().join(", ")),
        ExprKind::Paren(x) => format!("({})", flat(x)),
        ExprKind::Error => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::format_source;

    fn check_idempotent(src: &str) -> String {
        let once = format_source(src).unwrap();
        let twice = format_source(&once).unwrap();
        assert_eq!(once, twice, "not idempotent:\n{once}");
        once
    }

    #[test]
    fn keeps_comments_and_normalizes_spacing() {
        let src = "// lead\nfn f(x:f32)->f32{\n  // inside\n  let y=x*2.0 // trailing\n\n\n  y^2\n}\n";
        let out = check_idempotent(src);
        assert_eq!(
            out,
            "// lead\nfn f(x: f32) -> f32 {\n    // inside\n    let y = x * 2.0  // trailing\n\n    y ^ 2\n}\n"
        );
    }

    #[test]
    fn breaks_long_calls() {
        let src = "recipe r {\n    optimize model.** with adamw(lr = wsd(peak = 3e-3, total = 1500, warmup = 100, decay_frac = 0.2), weight_decay = 0.1)\n}\n";
        let out = check_idempotent(src);
        assert!(out.contains("adamw(\n        lr = wsd("), "{out}");
    }

    #[test]
    fn breaks_long_sums_after_the_operator() {
        let src = "recipe r {\n    loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets)) + 0.5 * squarehead(model.hidden_states(batch.inputs), teacher.hidden_states(batch.inputs))\n}\n";
        let out = check_idempotent(src);
        assert_eq!(
            out,
            "recipe r {\n    loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets)) +\n        0.5 * squarehead(model.hidden_states(batch.inputs), teacher.hidden_states(batch.inputs))\n}\n"
        );
    }

    #[test]
    fn stdlib_is_formatted() {
        for (_, name, text) in stdlib::MODULES {
            let out = check_idempotent(text);
            assert_eq!(&out, text, "stdlib/{name} is not formatted; run `recipec fmt stdlib/{name}`");
        }
    }
}
