//! The lexer: logos tokens, comments kept as trivia, and the newline/keyword filter the parser reads.
//!
//! Lexing never fails: a character that starts no token becomes an error token with a span
//! (diagnostic `E0001`) and lexing goes on. Newlines end statements, except inside `(...)` and
//! `[...]`, after a token that cannot end an expression (a binary operator, `,`, `=`, `{`) and
//! before `else`, `with` or `every` — so long expressions can be broken after an operator.
//!
//! Item keywords other than `fn` and `use` are *contextual*: `loss`, `model`, `param`, `state`
//! and friends are keywords only where they start a declaration (at the start of a line and
//! followed by a name), so `model = gpt(...)` in a recipe and `param = param - lr * grad` in an
//! optimizer read as ordinary names.

use crate::diag::Diagnostic;
use crate::source::{FileId, Span};
use logos::Logos;

#[derive(Logos, Debug, Clone, Copy, PartialEq, Eq)]
#[logos(skip r"[ \t\r\f]+")]
pub enum Raw {
    #[regex(r"///[^\n]*", allow_greedy = true)]
    DocComment,
    #[regex(r"//![^\n]*", allow_greedy = true)]
    ModuleDoc,
    #[regex(r"//[^\n]*", allow_greedy = true)]
    Comment,
    #[token("\n")]
    Newline,
    #[token(";")]
    Semi,
    #[regex(r"[A-Za-z_][A-Za-z0-9_]*")]
    Ident,
    #[regex(r"[0-9][0-9_]*")]
    Int,
    #[regex(r"[0-9][0-9_]*\.[0-9][0-9_]*([eE][+-]?[0-9]+)?")]
    #[regex(r"[0-9][0-9_]*[eE][+-]?[0-9]+")]
    Float,
    #[regex(r#""([^"\\\n]|\\[^\n])*""#)]
    Str,
    #[regex(r#""([^"\\\n]|\\[^\n])*"#)]
    UnterminatedStr,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token(",")]
    Comma,
    #[token(".")]
    Dot,
    #[token("..")]
    DotDot,
    #[token(":")]
    Colon,
    #[token("->")]
    Arrow,
    #[token("=")]
    Eq,
    #[token("==")]
    EqEq,
    #[token("!=")]
    NotEq,
    #[token("<")]
    Lt,
    #[token("<=")]
    Le,
    #[token(">")]
    Gt,
    #[token(">=")]
    Ge,
    #[token("&&")]
    AndAnd,
    #[token("||")]
    OrOr,
    #[token("!")]
    Bang,
    #[token("?")]
    Question,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("%")]
    Percent,
    #[token("^")]
    Caret,
    #[token("^T")]
    CaretT,
    #[token("@")]
    At,
}

/// A token as the parser sees it. Literals keep their source text; the parser's actions
/// convert them (the lexer has already validated them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tok<'a> {
    Ident(&'a str),
    Int(&'a str),
    Float(&'a str),
    Str(&'a str),
    Doc(&'a str),
    Newline,
    // Hard keywords.
    Use,
    Pub,
    Fn,
    Let,
    If,
    Else,
    For,
    In,
    True,
    False,
    With,
    Every,
    // Contextual keywords (see the module doc).
    Loss,
    Optimizer,
    Schedule,
    Sparsity,
    Decode,
    Model,
    Recipe,
    Param,
    Buffer,
    State,
    Sub,
    Optimize,
    Sparsify,
    Freeze,
    // Punctuation and operators.
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Comma,
    Dot,
    DotDot,
    Colon,
    Arrow,
    Eq,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    AndAnd,
    OrOr,
    Bang,
    Question,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Caret,
    CaretT,
    At,
    /// A character that starts no token; reported as E0001 by the lexer and never accepted
    /// by the grammar, so the parser recovers around it.
    Error,
}

impl std::fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Tok::Ident(s) => return write!(f, "identifier `{s}`"),
            Tok::Int(s) | Tok::Float(s) => return write!(f, "number `{s}`"),
            Tok::Str(s) => return write!(f, "string {s}"),
            Tok::Doc(_) => "doc comment",
            Tok::Newline => "end of line",
            Tok::Error => "invalid character",
            other => return write!(f, "`{}`", tok_text(other)),
        };
        f.write_str(s)
    }
}

/// The source spelling of a fixed token.
pub fn tok_text(t: &Tok) -> &'static str {
    match t {
        Tok::Use => "use",
        Tok::Pub => "pub",
        Tok::Fn => "fn",
        Tok::Let => "let",
        Tok::If => "if",
        Tok::Else => "else",
        Tok::For => "for",
        Tok::In => "in",
        Tok::True => "true",
        Tok::False => "false",
        Tok::With => "with",
        Tok::Every => "every",
        Tok::Loss => "loss",
        Tok::Optimizer => "optimizer",
        Tok::Schedule => "schedule",
        Tok::Sparsity => "sparsity",
        Tok::Decode => "decode",
        Tok::Model => "model",
        Tok::Recipe => "recipe",
        Tok::Param => "param",
        Tok::Buffer => "buffer",
        Tok::State => "state",
        Tok::Sub => "sub",
        Tok::Optimize => "optimize",
        Tok::Sparsify => "sparsify",
        Tok::Freeze => "freeze",
        Tok::LParen => "(",
        Tok::RParen => ")",
        Tok::LBracket => "[",
        Tok::RBracket => "]",
        Tok::LBrace => "{",
        Tok::RBrace => "}",
        Tok::Comma => ",",
        Tok::Dot => ".",
        Tok::DotDot => "..",
        Tok::Colon => ":",
        Tok::Arrow => "->",
        Tok::Eq => "=",
        Tok::EqEq => "==",
        Tok::NotEq => "!=",
        Tok::Lt => "<",
        Tok::Le => "<=",
        Tok::Gt => ">",
        Tok::Ge => ">=",
        Tok::AndAnd => "&&",
        Tok::OrOr => "||",
        Tok::Bang => "!",
        Tok::Question => "?",
        Tok::Plus => "+",
        Tok::Minus => "-",
        Tok::Star => "*",
        Tok::Slash => "/",
        Tok::Percent => "%",
        Tok::Caret => "^",
        Tok::CaretT => "^T",
        Tok::At => "@",
        Tok::Newline => "\\n",
        _ => "?",
    }
}

/// The contextual keywords and the token each becomes in declaration position.
pub const CONTEXTUAL_KEYWORDS: &[(&str, Tok<'static>)] = &[
    ("loss", Tok::Loss),
    ("optimizer", Tok::Optimizer),
    ("schedule", Tok::Schedule),
    ("sparsity", Tok::Sparsity),
    ("decode", Tok::Decode),
    ("model", Tok::Model),
    ("recipe", Tok::Recipe),
    ("param", Tok::Param),
    ("buffer", Tok::Buffer),
    ("state", Tok::State),
    ("sub", Tok::Sub),
    ("optimize", Tok::Optimize),
    ("sparsify", Tok::Sparsify),
    ("freeze", Tok::Freeze),
];

pub const HARD_KEYWORDS: &[&str] =
    &["use", "pub", "fn", "let", "if", "else", "for", "in", "true", "false", "with", "every"];

/// A comment kept for the formatter and the LSP.
#[derive(Clone, Debug, PartialEq)]
pub struct Comment {
    pub span: Span,
    pub text: String,
    /// True when only whitespace precedes the comment on its line.
    pub own_line: bool,
}

/// The output of lexing one file.
#[derive(Debug, Clone, Default)]
pub struct Lexed<'a> {
    /// Tokens for the parser, after the newline and keyword filter.
    pub tokens: Vec<(usize, Tok<'a>, usize)>,
    pub comments: Vec<Comment>,
    pub module_doc: Vec<String>,
    pub diagnostics: Vec<Diagnostic>,
}

fn hard_keyword(s: &str) -> Option<Tok<'static>> {
    Some(match s {
        "use" => Tok::Use,
        "pub" => Tok::Pub,
        "fn" => Tok::Fn,
        "let" => Tok::Let,
        "if" => Tok::If,
        "else" => Tok::Else,
        "for" => Tok::For,
        "in" => Tok::In,
        "true" => Tok::True,
        "false" => Tok::False,
        "with" => Tok::With,
        "every" => Tok::Every,
        _ => return None,
    })
}

fn valid_number(text: &str, float: bool) -> bool {
    let clean: String = text.chars().filter(|c| *c != '_').collect();
    if float {
        clean.parse::<f64>().map(|v| v.is_finite()).unwrap_or(false)
    } else {
        clean.parse::<i64>().is_ok()
    }
}

/// Parses an integer literal as written (underscores allowed); the lexer has validated it.
pub fn int_value(text: &str) -> i64 {
    text.chars().filter(|c| *c != '_').collect::<String>().parse().unwrap_or(0)
}

/// Parses a float literal as written; the lexer has validated it.
pub fn float_value(text: &str) -> f64 {
    text.chars().filter(|c| *c != '_').collect::<String>().parse().unwrap_or(0.0)
}

/// Unescapes a string literal including its quotes.
pub fn string_value(text: &str) -> String {
    let inner = text.strip_prefix('"').unwrap_or(text);
    let inner = inner.strip_suffix('"').unwrap_or(inner);
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lexes `src` (file `file`) into parser tokens, comments and diagnostics. Never fails.
pub fn lex(file: FileId, src: &str) -> Lexed<'_> {
    let mut raw: Vec<(usize, Tok, usize)> = Vec::new();
    let mut out = Lexed::default();
    let mut lexer = Raw::lexer(src);
    let mut line_has_code = false;
    while let Some(item) = lexer.next() {
        let span = lexer.span();
        let text = lexer.slice();
        let tok = match item {
            Err(()) => {
                let ch = src[span.clone()].chars().next().unwrap_or('?');
                out.diagnostics.push(
                    Diagnostic::error("E0001", format!("unexpected character `{}`", ch.escape_debug())).label(
                        file,
                        Span::new(span.start, span.end),
                        "no token starts with this character",
                    ),
                );
                Tok::Error
            }
            Ok(Raw::Comment) => {
                out.comments.push(Comment {
                    span: Span::new(span.start, span.end),
                    text: text.to_string(),
                    own_line: !line_has_code,
                });
                continue;
            }
            Ok(Raw::ModuleDoc) => {
                out.module_doc.push(text[3..].strip_prefix(' ').unwrap_or(&text[3..]).to_string());
                out.comments.push(Comment {
                    span: Span::new(span.start, span.end),
                    text: text.to_string(),
                    own_line: !line_has_code,
                });
                continue;
            }
            Ok(Raw::DocComment) => Tok::Doc(text),
            Ok(Raw::Newline) => {
                line_has_code = false;
                Tok::Newline
            }
            Ok(Raw::Semi) => Tok::Newline,
            Ok(Raw::Ident) => hard_keyword(text).unwrap_or(Tok::Ident(text)),
            Ok(Raw::Int) => {
                if !valid_number(text, false) {
                    out.diagnostics.push(
                        Diagnostic::error("E0003", format!("integer literal `{text}` does not fit in 64 bits"))
                            .label(file, Span::new(span.start, span.end), "too large for `i64`")
                            .help("write it as a float, such as `1e20`"),
                    );
                }
                Tok::Int(text)
            }
            Ok(Raw::Float) => {
                if !valid_number(text, true) {
                    out.diagnostics.push(
                        Diagnostic::error("E0003", format!("float literal `{text}` is out of range")).label(
                            file,
                            Span::new(span.start, span.end),
                            "not a finite `f64`",
                        ),
                    );
                }
                Tok::Float(text)
            }
            Ok(Raw::Str) => Tok::Str(text),
            Ok(Raw::UnterminatedStr) => {
                out.diagnostics.push(
                    Diagnostic::error("E0002", "unterminated string")
                        .label(file, Span::new(span.start, span.end), "this string has no closing `\"`")
                        .help("close the string with `\"` before the end of the line"),
                );
                Tok::Str(text)
            }
            Ok(r) => punct(r),
        };
        if !matches!(tok, Tok::Newline) {
            line_has_code = true;
        }
        raw.push((span.start, tok, span.end));
    }
    split_caret_t(&mut raw, src);
    out.tokens = filter(raw);
    out
}

fn punct(r: Raw) -> Tok<'static> {
    match r {
        Raw::LParen => Tok::LParen,
        Raw::RParen => Tok::RParen,
        Raw::LBracket => Tok::LBracket,
        Raw::RBracket => Tok::RBracket,
        Raw::LBrace => Tok::LBrace,
        Raw::RBrace => Tok::RBrace,
        Raw::Comma => Tok::Comma,
        Raw::Dot => Tok::Dot,
        Raw::DotDot => Tok::DotDot,
        Raw::Colon => Tok::Colon,
        Raw::Arrow => Tok::Arrow,
        Raw::Eq => Tok::Eq,
        Raw::EqEq => Tok::EqEq,
        Raw::NotEq => Tok::NotEq,
        Raw::Lt => Tok::Lt,
        Raw::Le => Tok::Le,
        Raw::Gt => Tok::Gt,
        Raw::Ge => Tok::Ge,
        Raw::AndAnd => Tok::AndAnd,
        Raw::OrOr => Tok::OrOr,
        Raw::Bang => Tok::Bang,
        Raw::Question => Tok::Question,
        Raw::Plus => Tok::Plus,
        Raw::Minus => Tok::Minus,
        Raw::Star => Tok::Star,
        Raw::Slash => Tok::Slash,
        Raw::Percent => Tok::Percent,
        Raw::Caret => Tok::Caret,
        Raw::CaretT => Tok::CaretT,
        Raw::At => Tok::At,
        _ => Tok::Error,
    }
}

/// `x^Tail` is `x ^ Tail`, not `x^T ail`: a `^T` glued to a following identifier character
/// is split back into `^` and an identifier starting with `T`.
fn split_caret_t<'a>(toks: &mut Vec<(usize, Tok<'a>, usize)>, src: &'a str) {
    let mut i = 0;
    while i < toks.len() {
        if let (s, Tok::CaretT, e) = toks[i] {
            if let Some((ns, Tok::Ident(_) | Tok::Int(_), ne)) = toks.get(i + 1).copied() {
                if ns == e {
                    toks[i] = (s, Tok::Caret, s + 1);
                    let merged = &src[s + 1..ne];
                    toks[i + 1] = (s + 1, hard_keyword(merged).unwrap_or(Tok::Ident(merged)), ne);
                }
            }
        }
        i += 1;
    }
}

/// True for tokens after which a newline does not end the statement.
fn continues(t: &Tok) -> bool {
    matches!(
        t,
        Tok::Plus
            | Tok::Minus
            | Tok::Star
            | Tok::Slash
            | Tok::Percent
            | Tok::Caret
            | Tok::At
            | Tok::EqEq
            | Tok::NotEq
            | Tok::Lt
            | Tok::Le
            | Tok::Gt
            | Tok::Ge
            | Tok::AndAnd
            | Tok::OrOr
            | Tok::Bang
            | Tok::Question
            | Tok::Colon
            | Tok::Comma
            | Tok::Eq
            | Tok::Arrow
            | Tok::LBrace
            | Tok::Dot
            | Tok::DotDot
            | Tok::With
            | Tok::Every
            | Tok::Doc(_)
            | Tok::Newline
    )
}

fn contextual(text: &str) -> Option<Tok<'static>> {
    CONTEXTUAL_KEYWORDS.iter().find(|(k, _)| *k == text).map(|(_, t)| *t)
}

/// Applies the newline rules and turns contextual keywords in declaration position into
/// keyword tokens. Leading and trailing newlines are dropped.
fn filter(raw: Vec<(usize, Tok<'_>, usize)>) -> Vec<(usize, Tok<'_>, usize)> {
    let mut out: Vec<(usize, Tok, usize)> = Vec::with_capacity(raw.len());
    // A stack of open delimiters: newlines are insignificant inside `(` and `[`.
    let mut stack: Vec<Tok> = Vec::new();
    for i in 0..raw.len() {
        let (s, tok, e) = raw[i];
        match tok {
            Tok::Newline => {
                let in_parens = matches!(stack.last(), Some(Tok::LParen | Tok::LBracket));
                let prev = out.last().map(|t| t.1);
                let next = raw[i + 1..].iter().map(|t| t.1).find(|t| !matches!(t, Tok::Newline));
                // `use m.*` and selectors end in `*`: a glob, not a multiplication.
                let glob = prev == Some(Tok::Star)
                    && matches!(out.iter().rev().nth(1).map(|t| t.1), Some(Tok::Dot | Tok::Star));
                let drop = in_parens
                    || prev.is_none()
                    || (prev.as_ref().map(continues).unwrap_or(true) && !glob)
                    || matches!(next, Some(Tok::Else | Tok::With | Tok::Every) | None);
                if !drop {
                    out.push((s, Tok::Newline, e));
                }
            }
            Tok::Ident(text) => {
                let mut t = tok;
                if let Some(kw) = contextual(text) {
                    let at_line_start = matches!(
                        out.last().map(|t| t.1),
                        None | Some(Tok::Newline | Tok::LBrace | Tok::Doc(_) | Tok::Pub)
                    );
                    let next_is_name = matches!(raw.get(i + 1).map(|t| t.1), Some(Tok::Ident(_)));
                    if at_line_start && next_is_name {
                        t = kw;
                    }
                }
                out.push((s, t, e));
            }
            Tok::LParen | Tok::LBracket | Tok::LBrace => {
                stack.push(tok);
                out.push((s, tok, e));
            }
            Tok::RParen | Tok::RBracket | Tok::RBrace => {
                // Pop to the matching opener, tolerating mismatches (the parser reports them).
                let want = match tok {
                    Tok::RParen => Tok::LParen,
                    Tok::RBracket => Tok::LBracket,
                    _ => Tok::LBrace,
                };
                if let Some(pos) = stack.iter().rposition(|t| *t == want) {
                    stack.truncate(pos);
                }
                // A newline directly before a closing brace is redundant.
                if tok == Tok::RBrace && matches!(out.last().map(|t| t.1), Some(Tok::Newline)) {
                    out.pop();
                }
                out.push((s, tok, e));
            }
            _ => out.push((s, tok, e)),
        }
    }
    while matches!(out.last().map(|t| t.1), Some(Tok::Newline)) {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<String> {
        lex(FileId(0), src).tokens.iter().map(|t| format!("{}", t.1)).collect()
    }

    #[test]
    fn transpose_versus_power() {
        assert_eq!(kinds("c^T"), ["identifier `c`", "`^T`"]);
        assert_eq!(kinds("x ^ T"), ["identifier `x`", "`^`", "identifier `T`"]);
        assert_eq!(kinds("x^Tail"), ["identifier `x`", "`^`", "identifier `Tail`"]);
    }

    #[test]
    fn contextual_keywords() {
        assert_eq!(kinds("model = gpt()")[0], "identifier `model`");
        assert_eq!(kinds("model gpt()")[0], "`model`");
        assert_eq!(kinds("param = param - 1")[0], "identifier `param`");
    }

    #[test]
    fn newlines_inside_parens_and_after_operators() {
        assert_eq!(kinds("f(a,\n b)\nx +\n y").iter().filter(|k| *k == "end of line").count(), 1);
    }

    #[test]
    fn bad_characters_do_not_stop_lexing() {
        let l = lex(FileId(0), "let x = 3 $ 4");
        assert_eq!(l.diagnostics.len(), 1);
        assert_eq!(l.diagnostics[0].code, "E0001");
        assert_eq!(l.tokens.len(), 6);
    }
}
