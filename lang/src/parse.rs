//! Parsing a file: lex, split into top-level items, parse each item with the lalrpop grammar.
//!
//! Items are parsed separately so that a mistake in one item never hides the others: the
//! token stream is cut at every newline at brace depth 0, and also where an item keyword
//! starts a line in column 1 while a brace is still open (a forgotten `}` then costs one
//! diagnostic, not the rest of the file).

use crate::ast::{Item, ItemKind, Module};
use crate::diag::Diagnostic;
use crate::lexer::{lex, Comment, Tok};
use crate::source::{FileId, Span};
use lalrpop_util::{lalrpop_mod, ErrorRecovery, ParseError};

lalrpop_mod!(
    #[allow(clippy::all, unused_parens, dead_code)]
    grammar
);

/// A parsed file: its syntax tree, comments (for the formatter) and diagnostics.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub module: Module,
    pub comments: Vec<Comment>,
    pub diagnostics: Vec<Diagnostic>,
}

fn is_item_start(t: &Tok) -> bool {
    matches!(
        t,
        Tok::Use
            | Tok::Pub
            | Tok::Fn
            | Tok::Loss
            | Tok::Optimizer
            | Tok::Schedule
            | Tok::Sparsity
            | Tok::Decode
            | Tok::Model
            | Tok::Recipe
            | Tok::Doc(_)
    )
}

/// Parses one file. Never fails: errors become diagnostics and `ItemKind::Error` items.
pub fn parse(file: FileId, src: &str) -> Parsed {
    let lexed = lex(file, src);
    let lexer_errors: Vec<Span> = lexed.diagnostics.iter().filter_map(|d| d.primary().map(|l| l.span)).collect();
    let mut diagnostics = lexed.diagnostics;
    let mut items = Vec::new();
    let toks = lexed.tokens;
    let mut chunk_start = 0;
    let mut depth: i32 = 0;
    let mut i = 0;
    let in_column_one = |pos: usize| pos == 0 || src.as_bytes().get(pos - 1) == Some(&b'\n');
    while i <= toks.len() {
        let at_end = i == toks.len();
        let split_here = at_end
            || (depth <= 0 && toks[i].1 == Tok::Newline)
            || (depth > 0 && i > chunk_start && is_item_start(&toks[i].1) && in_column_one(toks[i].0));
        if split_here {
            if i > chunk_start {
                let chunk = &toks[chunk_start..i];
                let is_last = toks[i..].iter().all(|t| t.1 == Tok::Newline);
                items.push(parse_item(file, chunk, is_last, &lexer_errors, &mut diagnostics));
            }
            depth = 0;
            chunk_start = if !at_end && toks[i].1 == Tok::Newline { i + 1 } else { i };
            if at_end {
                break;
            }
            if toks[i].1 == Tok::Newline {
                i += 1;
                continue;
            }
        }
        match toks[i].1 {
            Tok::LBrace => depth += 1,
            Tok::RBrace => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    Parsed { module: Module { docs: lexed.module_doc, items }, comments: lexed.comments, diagnostics }
}

fn parse_item(
    file: FileId,
    chunk: &[(usize, Tok<'_>, usize)],
    is_last: bool,
    lexer_errors: &[Span],
    diagnostics: &mut Vec<Diagnostic>,
) -> Item {
    let span = Span::new(chunk[0].0, chunk[chunk.len() - 1].2);
    if chunk.iter().all(|t| matches!(t.1, Tok::Doc(_))) {
        diagnostics.push(
            Diagnostic::error("E0103", "doc comment documents nothing")
                .label(file, span, "no item follows this doc comment")
                .help("use a plain `//` comment, or put the doc comment before an item"),
        );
        return Item { docs: vec![], public: false, kind: ItemKind::Error, span };
    }
    if let Some(at) = too_deep(chunk) {
        diagnostics.push(
            Diagnostic::error("E0101", format!("expression nested more than {MAX_DEPTH} levels deep"))
                .label(file, at, "nesting limit reached here")
                .help("split the expression with `let` bindings"),
        );
        return Item { docs: vec![], public: false, kind: ItemKind::Error, span };
    }
    let mut recovered: Vec<ErrorRecovery<usize, Tok, &'static str>> = Vec::new();
    let result = grammar::ItemParser::new().parse(&mut recovered, chunk.iter().map(|t| Ok::<_, &'static str>(*t)));
    // An item with a lexical error (already reported) gets no parse errors: they would be
    // consequences of the bad character or the unterminated string.
    let has_lexer_error = lexer_errors.iter().any(|e| e.start as usize >= span.start as usize && e.start <= span.end);
    let mut errors: Vec<ParseError<usize, Tok, &'static str>> = recovered.into_iter().map(|r| r.error).collect();
    let item = match result {
        Ok(item) => item,
        Err(e) => {
            errors.push(e);
            Item { docs: vec![], public: false, kind: ItemKind::Error, span }
        }
    };
    // One mistake, one diagnostic: keep the first error of each line.
    let mut reported_lines: Vec<usize> = Vec::new();
    let chunk_end = chunk[chunk.len() - 1].2;
    for e in errors {
        let pos = error_position(&e).unwrap_or(chunk_end);
        if has_lexer_error {
            continue;
        }
        let line_key = pos; // refined below by the caller's line table is unnecessary: positions on one line share the first error
        if reported_lines.iter().any(|p| same_line_after(*p, line_key, chunk)) {
            continue;
        }
        reported_lines.push(line_key);
        diagnostics.push(to_diagnostic(file, e, chunk, is_last));
    }
    item
}

/// True when `b` comes after `a` with no statement break between them in the chunk: then
/// the later error is a consequence of the earlier one.
fn same_line_after(a: usize, b: usize, chunk: &[(usize, Tok<'_>, usize)]) -> bool {
    if b < a {
        return false;
    }
    !chunk.iter().any(|t| t.1 == Tok::Newline && t.0 >= a && t.0 < b)
}

fn error_position(e: &ParseError<usize, Tok, &'static str>) -> Option<usize> {
    match e {
        ParseError::UnrecognizedToken { token, .. } | ParseError::ExtraToken { token } => Some(token.0),
        ParseError::InvalidToken { location } => Some(*location),
        ParseError::UnrecognizedEof { .. } | ParseError::User { .. } => None,
    }
}

fn describe_expected(expected: &[String]) -> Option<String> {
    if expected.is_empty() {
        return None;
    }
    let names: Vec<String> = expected
        .iter()
        .map(|e| match e.as_str() {
            "Ident" => "a name".to_string(),
            "IntLit" => "an integer".to_string(),
            "FloatLit" => "a number".to_string(),
            "StrLit" => "a string".to_string(),
            "Doc" => "a doc comment".to_string(),
            "\"\\\\n\"" | "\"\\n\"" => "end of line".to_string(),
            other => format!("`{}`", other.trim_matches('"')),
        })
        .collect();
    let mut uniq: Vec<String> = Vec::new();
    for n in names {
        if !uniq.contains(&n) {
            uniq.push(n);
        }
    }
    if uniq.len() > 8 {
        uniq.truncate(8);
        uniq.push("…".into());
    }
    Some(format!("expected {}", uniq.join(", ")))
}

/// The deepest nesting (brackets, and runs of prefix operators) the later passes accept;
/// they recurse over the tree, and a bound keeps any input from exhausting the stack.
const MAX_DEPTH: usize = 200;

fn too_deep(chunk: &[(usize, Tok<'_>, usize)]) -> Option<Span> {
    let (mut depth, mut run) = (0usize, 0usize);
    let mut binary_ops = 0usize;
    for &(s, t, e) in chunk {
        match t {
            Tok::LParen | Tok::LBracket | Tok::LBrace => depth += 1,
            Tok::RParen | Tok::RBracket | Tok::RBrace => depth = depth.saturating_sub(1),
            _ => {}
        }
        if matches!(t, Tok::Minus | Tok::Bang) {
            run += 1;
        } else {
            run = 0;
        }
        if matches!(
            t,
            Tok::Plus
                | Tok::Minus
                | Tok::Star
                | Tok::Slash
                | Tok::At
                | Tok::Caret
                | Tok::AndAnd
                | Tok::OrOr
                | Tok::Percent
        ) {
            binary_ops += 1;
        } else if t == Tok::Newline {
            binary_ops = 0;
        }
        if depth > MAX_DEPTH || run > MAX_DEPTH || binary_ops > 20 * MAX_DEPTH {
            return Some(Span::new(s, e));
        }
    }
    None
}

/// The innermost delimiter opened in the chunk and never closed.
fn unclosed(chunk: &[(usize, Tok<'_>, usize)]) -> Option<(usize, Tok<'static>, usize)> {
    let mut stack: Vec<(usize, Tok<'static>, usize)> = vec![];
    for &(s, t, e) in chunk {
        match t {
            Tok::LParen => stack.push((s, Tok::LParen, e)),
            Tok::LBracket => stack.push((s, Tok::LBracket, e)),
            Tok::LBrace => stack.push((s, Tok::LBrace, e)),
            Tok::RParen | Tok::RBracket | Tok::RBrace => {
                stack.pop();
            }
            _ => {}
        }
    }
    stack.pop()
}

fn to_diagnostic(
    file: FileId,
    e: ParseError<usize, Tok, &'static str>,
    chunk: &[(usize, Tok<'_>, usize)],
    is_last: bool,
) -> Diagnostic {
    let chunk_end = chunk.last().map(|t| t.2).unwrap_or(0);
    match e {
        ParseError::UnrecognizedToken { token: (s, Tok::Doc(_), end), .. } => {
            Diagnostic::error("E0103", "doc comment documents nothing")
                .label(file, Span::new(s, end), "a doc comment cannot stand here")
                .help("use a plain `//` comment, or move it before an item, member or field")
        }
        ParseError::UnrecognizedToken { token: (s, t, end), expected } => {
            Diagnostic::error("E0101", format!("unexpected {t}"))
                .label(file, Span::new(s, end), format!("unexpected {t} here"))
                .maybe_help(describe_expected(&expected))
        }
        ParseError::ExtraToken { token: (s, t, end) } => Diagnostic::error("E0101", format!("unexpected {t}"))
            .label(file, Span::new(s, end), "nothing more was expected in this item")
            .help("start the next item on a new line"),
        ParseError::UnrecognizedEof { expected, .. } => {
            let msg = if is_last { "unexpected end of file" } else { "unexpected end of item" };
            match unclosed(chunk) {
                Some((s, t, e)) => Diagnostic::error("E0102", msg)
                    .label(file, Span::new(s, e), format!("this `{}` is never closed", crate::lexer::tok_text(&t)))
                    .label(file, Span::new(chunk_end, chunk_end), "the item ends here")
                    .help(format!(
                        "add the closing `{}`",
                        match t {
                            Tok::LParen => ")",
                            Tok::LBracket => "]",
                            _ => "}",
                        }
                    )),
                None => Diagnostic::error("E0102", msg)
                    .label(file, Span::new(chunk_end, chunk_end), "the item ends here, unfinished")
                    .maybe_help(describe_expected(&expected)),
            }
        }
        ParseError::InvalidToken { location } => Diagnostic::error("E0001", "invalid token").label(
            file,
            Span::new(location, location + 1),
            "no token starts here",
        ),
        ParseError::User { error } => {
            Diagnostic::error("E0101", error.to_string()).label(file, Span::new(chunk_end, chunk_end), "here")
        }
    }
}

/// Parses a single expression (used by tests and the LSP).
pub fn parse_expr(file: FileId, src: &str) -> Result<crate::ast::Expr, Vec<Diagnostic>> {
    let lexed = lex(file, src);
    if !lexed.diagnostics.is_empty() {
        return Err(lexed.diagnostics);
    }
    let mut recovered = Vec::new();
    let r = grammar::ExprParser::new().parse(&mut recovered, lexed.tokens.into_iter().map(Ok::<_, &'static str>));
    match r {
        Ok(e) if recovered.is_empty() => Ok(e),
        Ok(_) => Err(recovered.into_iter().map(|r| to_diagnostic(file, r.error, &[], true)).collect()),
        Err(e) => Err(vec![to_diagnostic(file, e, &[], true)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdlib_and_examples_parse_cleanly() {
        let mut files: Vec<(String, String)> =
            stdlib::MODULES.iter().map(|(_, n, t)| (n.to_string(), t.to_string())).collect();
        let recipes = concat!(env!("CARGO_MANIFEST_DIR"), "/../recipes");
        for e in std::fs::read_dir(recipes).unwrap() {
            let p = e.unwrap().path();
            files.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
        }
        for (name, text) in files {
            let p = parse(FileId(0), &text);
            let errs: Vec<String> = p
                .diagnostics
                .iter()
                .map(|d| {
                    let (l, c) = crate::source::SourceFile::new("", text.clone())
                        .line_col(d.primary().map(|l| l.span.start).unwrap_or(0));
                    format!("{name}:{l}:{c}: {} {}: {:?}", d.code, d.message, d.help)
                })
                .collect();
            assert!(errs.is_empty(), "{}", errs.join("\n"));
            assert!(p.module.items.iter().all(|i| i.kind != ItemKind::Error), "{name}");
        }
    }

    #[test]
    fn one_mistake_one_diagnostic() {
        let src = "fn f(x: f32) -> f32 {\n    let y = x + * 2\n    y\n}\nfn g(x: f32) -> f32 { x }\n";
        let p = parse(FileId(0), src);
        assert_eq!(p.diagnostics.len(), 1, "{:?}", p.diagnostics);
        assert_eq!(p.module.items.len(), 2);
    }

    #[test]
    fn missing_brace_does_not_swallow_the_file() {
        let src = "fn f(x: f32) -> f32 {\n    x\nfn g(x: f32) -> f32 { x }\n";
        let p = parse(FileId(0), src);
        assert_eq!(p.diagnostics.len(), 1, "{:?}", p.diagnostics);
        assert!(matches!(p.module.items[1].kind, ItemKind::Fn(_)));
    }
}
