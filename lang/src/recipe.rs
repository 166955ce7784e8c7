//! Checking `recipe` items: fields against what they plug into, parameter selectors against
//! the instantiated model, and optimizer/sparsity groups.

use crate::ast::*;
use crate::check::{Checker, ParamPath};
use crate::diag::Diagnostic;
use crate::source::Span;
use crate::suggest::did_you_mean;
use crate::types::*;

/// The fields a recipe may set: `(name, what it expects, required)`.
pub static RECIPE_FIELDS: &[(&str, &str, bool)] = &[
    ("model", "a model instance, e.g. `gpt(V = 256, D = 128)`", true),
    ("data", "a data source: `text(path, context = T, batch = B)` or `tokens(path.npy, ...)`", true),
    ("loss", "a scalar expression of `model` and `batch` (its `inputs` and `targets`)", true),
    ("steps", "the number of optimizer steps (default 1000)", false),
    ("decode", "a decoding policy for `recipec sample`, e.g. `top_k(k = 40)`", false),
    ("seed", "the seed of initialization, data order and sampling (default 0)", false),
    ("grad_clip", "clip the global gradient norm to this value (default: no clipping)", false),
    ("accumulate", "micro-batches accumulated per step (default 1)", false),
    ("eval_every", "steps between validation losses (default 100)", false),
    ("eval_batches", "batches per validation loss (default 8)", false),
    ("checkpoint_every", "steps between checkpoints (default 500)", false),
    ("log_every", "steps between log lines (default 10)", false),
    ("init_from", "a run directory or `.safetensors` checkpoint whose `model` parameters start training", false),
    ("teacher", "a frozen model instance for distillation, in scope in `loss` as `teacher`", false),
    ("teacher_from", "the run directory or `.safetensors` checkpoint the teacher's parameters come from", false),
];

/// What the checker learned about a recipe: its parameters and groups.
#[derive(Clone, Debug, Default)]
pub struct CheckedRecipe {
    pub name: String,
    pub params: Vec<ParamPath>,
    /// For each `optimize` line: the selector, the optimizer item and the matched params.
    pub optimize: Vec<(String, Option<ItemRef>, Vec<usize>)>,
    pub sparsify: Vec<(String, Option<ItemRef>, Vec<usize>)>,
    /// For each `freeze` line: the selector and the matched params.
    pub freeze: Vec<(String, Vec<usize>)>,
}

/// True when `path` matches `selector` (`*` one segment, `**` any number, `{a, b}` either).
/// The indices of the parameters `selector` selects; `E0403` when it does not start with
/// `model` or (the parameters known) selects nothing.
fn select(c: &mut Checker, selector: &Selector, params: &[ParamPath], have_params: bool) -> Vec<usize> {
    let text = selector.to_string();
    let mut matched = vec![];
    if selector.segments.first() != Some(&SelectorSegment::Name("model".into())) {
        c.error(
            "E0403",
            selector.span,
            format!("selector `{text}` must start with `model`"),
            "selectors are paths from `model`",
        )
        .help = Some(format!("write `model.{text}`"));
    } else if have_params {
        let sel = &selector.segments[1..];
        let mut buffers = vec![];
        for (i, p) in params.iter().enumerate() {
            if selector_matches(sel, &p.path) {
                // Buffers are model state, never trained: no selector takes them.
                if p.buffer {
                    buffers.push(format!("model.{}", p.dotted()));
                } else {
                    matched.push(i);
                }
            }
        }
        if matched.is_empty() && !buffers.is_empty() {
            c.error("E0403", selector.span, format!("selector `{text}` matches only buffers"), "matches nothing trainable")
                .help = Some(format!(
                "`{}` is a `buffer`: model state its initializer sets, never trained or frozen by a recipe; remove this line",
                buffers[0]
            ));
        } else if matched.is_empty() {
            let names: Vec<String> =
                params.iter().filter(|p| !p.buffer).map(|p| format!("model.{}", p.dotted())).collect();
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let shown: Vec<String> = names.iter().take(6).cloned().collect();
            let help = did_you_mean(&text, &refs).unwrap_or_else(|| {
                format!(
                    "the model's parameters include {}{}; `*` matches one segment, `**` any number",
                    shown.join(", "),
                    if names.len() > 6 { ", …" } else { "" }
                )
            });
            c.error("E0403", selector.span, format!("selector `{text}` matches no parameter"), "matches nothing")
                .help = Some(help);
        }
    }
    matched
}

/// `E0405`: a selector takes a parameter another line already has.
fn overlap(
    c: &mut Checker,
    file: crate::source::FileId,
    (here, label): (Span, &str),
    (prev, prev_label): (Span, &str),
    what: String,
) {
    let d = c.error("E0405", here, what, label);
    d.labels.push(crate::diag::Label { file, span: prev, message: prev_label.into() });
    d.help = Some("a parameter is trained by exactly one `optimize` group, or frozen: narrow one selector".into());
}

pub fn selector_matches(sel: &[SelectorSegment], path: &[String]) -> bool {
    match sel.first() {
        None => path.is_empty(),
        Some(SelectorSegment::StarStar) => (0..=path.len()).any(|k| selector_matches(&sel[1..], &path[k..])),
        Some(seg) => {
            let Some(first) = path.first() else { return false };
            let ok = match seg {
                SelectorSegment::Name(n) => n == first,
                SelectorSegment::Index(i) => i.to_string() == *first,
                SelectorSegment::Star => true,
                SelectorSegment::Alt(names) => names.iter().any(|n| n == first),
                SelectorSegment::StarStar => unreachable!(),
            };
            ok && selector_matches(&sel[1..], &path[1..])
        }
    }
}

fn article(word: &str) -> String {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {word}")
    } else {
        format!("a {word}")
    }
}

/// Checks a field that instantiates a model (`model`, `teacher`): a model call whose integer
/// arguments are constants. Returns the type to bind and the concrete model, if it is one.
fn model_field(c: &mut Checker, field: &str, value: &Expr) -> (Ty, Option<ModelTy>) {
    let errors_before = c.diagnostics.iter().filter(|d| d.is_error()).count();
    let t = c.expr(value);
    match &t {
        Ty::Model(mt) => {
            let concrete = mt.config.iter().all(|x| match x {
                Ty::Dim(d) => d.as_const().is_some(),
                _ => true,
            });
            if concrete {
                return (t.clone(), Some(mt.clone()));
            }
            // An argument already reported (an unknown name) is not reported again.
            if c.diagnostics.iter().filter(|d| d.is_error()).count() > errors_before {
                return (t.clone(), None);
            }
            c.error(
                "E0310",
                value.span,
                format!("every integer argument of the recipe's {field} must be a constant"),
                "not all constants",
            );
            (t.clone(), None)
        }
        Ty::Unknown => (Ty::Unknown, None),
        other => {
            c.error(
                "E0406",
                value.span,
                format!("`{field}` must be a model instance, found {}", other.describe()),
                "not a model",
            )
            .help = Some("call a model item, such as `gpt(V = 256, D = 128, L = 4, H = 4, T = 128)`".into());
            (Ty::Unknown, None)
        }
    }
}

pub(crate) fn check_recipe(c: &mut Checker, r: ItemRef, rec: &RecipeDef) -> CheckedRecipe {
    c.enter_recipe(r);
    let file = c.file();
    let mut out = CheckedRecipe { name: rec.name.name.clone(), ..Default::default() };
    let mut seen: Vec<(String, Span)> = vec![];
    let fields: Vec<(&Ident, &Expr)> = rec
        .members
        .iter()
        .filter_map(|m| match &m.kind {
            RecipeMemberKind::Field { name, value } => Some((name, value)),
            _ => None,
        })
        .collect();
    for (name, _) in &fields {
        if let Some((_, prev)) = seen.iter().find(|(n, _)| *n == name.name) {
            let prev = *prev;
            c.error("E0205", name.span, format!("field `{}` is set twice", name.name), "set again here")
                .labels
                .push(crate::diag::Label { file, span: prev, message: "first set here".into() });
        }
        seen.push((name.name.clone(), name.span));
        if !RECIPE_FIELDS.iter().any(|f| f.0 == name.name) {
            let names: Vec<&str> = RECIPE_FIELDS.iter().map(|f| f.0).collect();
            let help =
                did_you_mean(&name.name, &names).unwrap_or_else(|| format!("recipe fields: {}", names.join(", ")));
            c.error("E0401", name.span, format!("recipes have no field `{}`", name.name), "unknown field").help =
                Some(help);
        }
    }
    let field = |n: &str| fields.iter().find(|(f, _)| f.name == n).map(|(f, v)| (*f, *v));
    let poisoned_fields = rec.members.iter().any(|m| matches!(m.kind, RecipeMemberKind::Error));
    for (f, _, required) in RECIPE_FIELDS {
        if *required && field(f).is_none() && !poisoned_fields {
            c.error(
                "E0402",
                rec.name.span,
                format!("recipe `{}` does not set `{f}`", rec.name.name),
                format!("`{f}` is missing"),
            )
            .help = Some(format!(
                "add `{f} = ...`: {}",
                RECIPE_FIELDS.iter().find(|x| x.0 == *f).map(|x| x.1).unwrap_or("")
            ));
        }
    }
    // The model first: `model` is in scope for everything else.
    let model_ty = match field("model") {
        Some((name, value)) => {
            let (t, concrete) = model_field(c, "model", value);
            c.bind_recipe("model", t, name.span);
            concrete
        }
        None => {
            c.bind_recipe("model", Ty::Unknown, rec.name.span);
            None
        }
    };
    if let Some((name, value)) = field("data") {
        let t = c.expr(value);
        match &t {
            Ty::Data { batch, context } => {
                c.bind_recipe("batch", Ty::Batch { batch: batch.clone(), context: context.clone() }, name.span)
            }
            Ty::Unknown => c.bind_recipe("batch", Ty::Unknown, name.span),
            other => {
                c.error(
                    "E0406",
                    value.span,
                    format!("`data` must be a data source, found {}", other.describe()),
                    "not a data source",
                )
                .help = Some("use `text(\"embedded:kjv\", context = 128, batch = 16)`".into());
                c.bind_recipe("batch", Ty::Unknown, name.span);
            }
        }
    } else {
        c.bind_recipe("batch", Ty::Unknown, rec.name.span);
    }
    // The teacher: a second model instance, frozen, its parameters read from `teacher_from`.
    match (field("teacher"), field("teacher_from")) {
        (Some((name, value)), from) => {
            let (t, _) = model_field(c, "teacher", value);
            c.bind_recipe("teacher", t, name.span);
            if from.is_none() && !poisoned_fields {
                c.error(
                    "E0402",
                    name.span,
                    format!("recipe `{}` sets `teacher` but not `teacher_from`", rec.name.name),
                    "the teacher's parameters come from nowhere",
                )
                .help = Some("add `teacher_from = \"runs/NAME\"`: the run directory of the trained teacher".into());
            }
        }
        (None, Some((name, _))) => {
            c.error(
                "E0402",
                name.span,
                format!("recipe `{}` sets `teacher_from` but not `teacher`", rec.name.name),
                "no teacher to load",
            )
            .help = Some(
                "add `teacher = ...`: the teacher's model instance, e.g. the model of the run it comes from".into(),
            );
        }
        (None, None) => {}
    }
    for (name, value) in &fields {
        match name.name.as_str() {
            "model" | "data" | "teacher" => {}
            "init_from" | "teacher_from" => {
                if !matches!(value.kind, ExprKind::Str(_)) {
                    c.expr(value);
                    c.error(
                        "E0404",
                        value.span,
                        format!("`{}` must be a string: a run directory or a `.safetensors` file", name.name),
                        "not a string",
                    )
                    .help = Some(format!("write `{} = \"runs/tiny_gpt\"` (relative to the recipe's file)", name.name));
                }
            }
            "loss" => {
                c.enter_recipe_lets(rec);
                let t = c.expr(value);
                c.leave_recipe_lets();
                if let Some(tt) = t.as_tensor() {
                    if !tt.shape.is_scalar() || !tt.dtype.is_float() {
                        c.error(
                            "E0317",
                            value.span,
                            format!("the recipe's `loss` must be a floating-point scalar, found `{tt}`"),
                            "not a scalar loss",
                        )
                        .help = Some("reduce it with `mean(...)`, or call a `loss` item".into());
                    }
                } else if !t.is_unknown() {
                    c.error(
                        "E0317",
                        value.span,
                        format!("the recipe's `loss` must be a floating-point scalar, found {}", t.describe()),
                        "not a scalar loss",
                    );
                }
            }
            "decode" => {
                let was = c.set_recipe_rule(true);
                let t = c.expr(value);
                c.set_recipe_rule(was);
                match &t {
                    Ty::Applied(r) if matches!(&c.modules.item(*r).kind, ItemKind::Fn(f) if f.kind == FnKind::Decode) =>
                        {}
                    Ty::Unknown => {}
                    other => {
                        c.error(
                            "E0406",
                            value.span,
                            format!("`decode` must be a decoding policy, found {}", other.describe()),
                            "not a decode policy",
                        )
                        .help = Some("use a `decode` item, e.g. `top_k(k = 40)` from `std.decode`".into());
                    }
                }
            }
            "steps" | "seed" | "accumulate" | "eval_every" | "eval_batches" | "checkpoint_every" | "log_every" => {
                let t = c.expr(value);
                let ok = match &t {
                    Ty::Dim(d) => d.as_const().map(|v| v >= if name.name == "seed" { 0 } else { 1 }).unwrap_or(false),
                    Ty::Unknown => true,
                    _ => false,
                };
                if !ok {
                    c.error(
                        "E0310",
                        value.span,
                        format!("`{}` must be a positive integer constant", name.name),
                        "not a positive integer",
                    );
                }
            }
            "grad_clip" => {
                let t = c.expr(value);
                match t.as_tensor() {
                    Some(tt) if tt.shape.is_scalar() && (tt.weak || tt.dtype.is_float()) => {}
                    _ if t.is_unknown() => {}
                    _ => {
                        c.error("E0404", value.span, "`grad_clip` must be a number".into(), "not a number");
                    }
                }
            }
            _ => {
                c.expr(value);
            }
        }
    }
    if field("loss").is_none() {
        // The `let`s are still checked (and reported unused).
        c.enter_recipe_lets(rec);
        c.leave_recipe_lets();
    }
    // Parameters of the concrete model.
    if let Some(mt) = &model_ty {
        match c.enumerate_params(mt) {
            Ok(p) => out.params = p,
            Err(msg) => {
                let span = field("model").map(|(_, v)| v.span).unwrap_or(rec.name.span);
                c.error("E0310", span, format!("cannot instantiate the model: {msg}"), "model instantiation failed");
            }
        }
    }
    let have_params = model_ty.is_some() && !out.params.is_empty();
    let errors_before_groups = c.diagnostics.iter().filter(|d| d.is_error()).count();
    let mut owner: Vec<Option<Span>> = vec![None; out.params.len()];
    let mut any_optimize = false;
    for m in &rec.members {
        let (selector, rule, kind) = match &m.kind {
            RecipeMemberKind::Optimize { selector, rule } => (selector, rule, RuleKind::Optimizer),
            RecipeMemberKind::Sparsify { selector, rule } => (selector, rule, RuleKind::Sparsity),
            _ => continue,
        };
        if kind == RuleKind::Optimizer {
            any_optimize = true;
        }
        let was = c.set_recipe_rule(true);
        let t = c.expr(rule);
        c.set_recipe_rule(was);
        let item = match &t {
            Ty::Applied(r) => match &c.modules.item(*r).kind {
                ItemKind::Rule(rd) if rd.kind == kind => Some(*r),
                other => {
                    let found = match other {
                        ItemKind::Rule(rd) => rd.kind.keyword(),
                        ItemKind::Fn(f) => f.kind.keyword(),
                        _ => "item",
                    };
                    let want = article(kind.keyword());
                    let verb = if kind == RuleKind::Optimizer { "optimize" } else { "sparsify" };
                    c.error(
                        "E0406",
                        rule.span,
                        format!("`{verb} … with` needs {want}, found {}", article(found)),
                        format!("not {want}"),
                    );
                    None
                }
            },
            Ty::Unknown => None,
            other => {
                let want = article(kind.keyword());
                c.error(
                    "E0406",
                    rule.span,
                    format!("expected {want} applied to its hyperparameters, found {}", other.describe()),
                    format!("not {want}"),
                )
                .help = Some(if kind == RuleKind::Optimizer {
                    "e.g. `adamw(lr = 1e-3)` from `std.optim`".into()
                } else {
                    "e.g. `nm(n = 2, m = 4)` from `std.sparsity`".into()
                });
                None
            }
        };
        let text = selector.to_string();
        let matched = select(c, selector, &out.params, have_params);
        if kind == RuleKind::Optimizer {
            for &i in &matched {
                if let Some(prev) = owner[i] {
                    let what = format!("parameter `model.{}` is optimized by two groups", out.params[i].dotted());
                    overlap(c, file, (selector.span, "selects it again"), (prev, "first selected here"), what);
                    break;
                }
                owner[i] = Some(selector.span);
            }
        }
        let entry = (text, item, matched);
        match kind {
            RuleKind::Optimizer => out.optimize.push(entry),
            RuleKind::Sparsity => out.sparsify.push(entry),
        }
    }
    // `freeze` lines: parameters deliberately left untrained; none may also be optimized.
    let mut frozen_on_purpose = vec![false; out.params.len()];
    for m in &rec.members {
        let RecipeMemberKind::Freeze { selector } = &m.kind else { continue };
        let matched = select(c, selector, &out.params, have_params);
        out.freeze.push((selector.to_string(), matched.clone()));
        for i in matched {
            if let Some(opt) = owner[i] {
                let what = format!("parameter `model.{}` is both optimized and frozen", out.params[i].dotted());
                overlap(c, file, (selector.span, "freezes it"), (opt, "optimized here"), what);
                break;
            }
            frozen_on_purpose[i] = true;
        }
    }
    if !any_optimize && !poisoned_fields {
        c.error(
            "E0402",
            rec.name.span,
            format!("recipe `{}` optimizes no parameters", rec.name.name),
            "no `optimize` line",
        )
        .help = Some("add `optimize model.** with adamw(lr = 1e-3)`".into());
    } else if have_params
        && any_optimize
        && c.diagnostics.iter().filter(|d| d.is_error()).count() == errors_before_groups
    {
        // (Frozen parameters are only reported when every selector was valid.)
        let frozen: Vec<String> = out
            .params
            .iter()
            .zip(owner.iter().zip(&frozen_on_purpose))
            .filter(|(p, (o, f))| o.is_none() && !**f && !p.buffer)
            .map(|(p, _)| format!("`model.{}`", p.dotted()))
            .collect();
        if !frozen.is_empty() {
            let shown: Vec<String> = frozen.iter().take(4).cloned().collect();
            c.diagnostics.push(
                Diagnostic::warning(
                    "W0003",
                    format!(
                        "{} parameter{} not optimized: {}{}",
                        frozen.len(),
                        if frozen.len() == 1 { " is" } else { "s are" },
                        shown.join(", "),
                        if frozen.len() > 4 { ", …" } else { "" }
                    ),
                )
                .label(file, rec.name.span, "these stay at their initial values")
                .help("add an `optimize` line that selects them, if they should train, or a `freeze` line, if not"),
            );
        }
    }
    c.leave_recipe();
    out
}

/// The recipe `let`s whose value is a constant — literals, arithmetic and conditionals over
/// them, and earlier constant `let`s — in the order written: `(name, name span, value with
/// the earlier constants substituted)`. A later `let` of the same name that is not constant
/// ends the earlier one's scope.
pub(crate) fn constant_lets(rec: &RecipeDef) -> Vec<(String, Span, Expr)> {
    let mut out: Vec<(String, Span, Expr)> = vec![];
    for m in &rec.members {
        let RecipeMemberKind::Let { name, value } = &m.kind else { continue };
        let mut v = value.clone();
        let constant = is_constant(&v, &out)
            && inlined_size(&v, &out) <= MAX_INLINED_NODES
            && inlined_depth(&v, &out) <= MAX_INLINED_DEPTH;
        out.retain(|(n, _, _)| *n != name.name);
        if constant && !RESERVED.contains(&name.name.as_str()) {
            substitute(&mut v, &out, &mut vec![]);
            out.push((name.name.clone(), name.span, v));
        }
    }
    out
}

/// The most expression nodes a constant's value may have once the constants it names are
/// substituted: `let b = a + a`, `let c = b + b`, ... doubles at each line, and such a chain
/// must not exhaust memory (past this size the `let` counts as not constant).
const MAX_INLINED_NODES: usize = 4096;

/// The deepest nesting a constant's substituted value may have: inlined at a use, it adds
/// to the nesting there, which the parser bounds (200 levels) so that recursion over the
/// tree stays bounded.
const MAX_INLINED_DEPTH: usize = 32;

/// The nesting depth of a constant expression with the constants it names substituted.
fn inlined_depth(e: &Expr, consts: &[(String, Span, Expr)]) -> usize {
    let depth = |x: &Expr| inlined_depth(x, consts);
    match &e.kind {
        ExprKind::Name(n) => consts.iter().rev().find(|(c, _, _)| c == n).map(|(_, _, v)| depth(v)).unwrap_or(1),
        ExprKind::Unary(_, x) | ExprKind::Paren(x) => depth(x) + 1,
        ExprKind::Binary(_, a, b) => depth(a).max(depth(b)) + 1,
        ExprKind::Ternary { cond, then, otherwise } => depth(cond).max(depth(then)).max(depth(otherwise)) + 1,
        _ => 1,
    }
}

/// The node count of a constant expression with the constants it names substituted
/// (saturating).
fn inlined_size(e: &Expr, consts: &[(String, Span, Expr)]) -> usize {
    let size = |x: &Expr| inlined_size(x, consts);
    match &e.kind {
        ExprKind::Name(n) => consts.iter().rev().find(|(c, _, _)| c == n).map(|(_, _, v)| size(v)).unwrap_or(1),
        ExprKind::Unary(_, x) | ExprKind::Paren(x) => size(x).saturating_add(1),
        ExprKind::Binary(_, a, b) => size(a).saturating_add(size(b)).saturating_add(1),
        ExprKind::Ternary { cond, then, otherwise } => {
            size(cond).saturating_add(size(then)).saturating_add(size(otherwise)).saturating_add(1)
        }
        _ => 1,
    }
}

/// Names a recipe binds itself; a `let` of one of them is never inlined.
const RESERVED: &[&str] = &["model", "batch", "teacher"];

fn is_constant(e: &Expr, consts: &[(String, Span, Expr)]) -> bool {
    match &e.kind {
        ExprKind::Int(_) | ExprKind::Float { .. } | ExprKind::Bool(_) | ExprKind::Str(_) => true,
        ExprKind::Name(n) => consts.iter().any(|(c, _, _)| c == n),
        ExprKind::Unary(_, x) | ExprKind::Paren(x) => is_constant(x, consts),
        ExprKind::Binary(_, a, b) => is_constant(a, consts) && is_constant(b, consts),
        ExprKind::Ternary { cond, then, otherwise } => {
            is_constant(cond, consts) && is_constant(then, consts) && is_constant(otherwise, consts)
        }
        _ => false,
    }
}

/// Every node of `e` at `span`: an inlined value is reported where it is used.
fn respan(e: &mut Expr, span: Span) {
    e.span = span;
    match &mut e.kind {
        ExprKind::Unary(_, x) | ExprKind::Paren(x) => respan(x, span),
        ExprKind::Binary(_, a, b) => {
            respan(a, span);
            respan(b, span);
        }
        ExprKind::Ternary { cond, then, otherwise } => {
            respan(cond, span);
            respan(then, span);
            respan(otherwise, span);
        }
        _ => {}
    }
}

/// Replaces the names of `consts` in `e` by their values (not a callee's name, and not
/// inside a block that binds names of its own); pushes the name span of each one used.
fn substitute(e: &mut Expr, consts: &[(String, Span, Expr)], used: &mut Vec<Span>) {
    let sub = |x: &mut Expr, used: &mut Vec<Span>| substitute(x, consts, used);
    match &mut e.kind {
        ExprKind::Name(n) => {
            if let Some((_, at, v)) = consts.iter().rev().find(|(c, _, _)| c == n) {
                used.push(*at);
                let mut v = v.clone();
                respan(&mut v, e.span);
                *e = v;
            }
        }
        ExprKind::Unary(_, x) | ExprKind::Paren(x) | ExprKind::Transpose(x) => sub(x, used),
        ExprKind::Binary(_, a, b) => {
            sub(a, used);
            sub(b, used);
        }
        ExprKind::Ternary { cond, then, otherwise } => {
            sub(cond, used);
            sub(then, used);
            sub(otherwise, used);
        }
        ExprKind::Call { callee, args } => {
            if !matches!(callee.kind, ExprKind::Name(_)) {
                sub(callee, used);
            }
            for a in args {
                sub(&mut a.value, used);
            }
        }
        ExprKind::Index { base, indices } => {
            sub(base, used);
            for i in indices {
                match i {
                    IndexArg::Expr(x) => sub(x, used),
                    IndexArg::Slice { start, end, .. } => {
                        for x in [start, end].into_iter().flatten() {
                            sub(x, used);
                        }
                    }
                }
            }
        }
        ExprKind::Field { base, .. } => sub(base, used),
        ExprKind::If { cond, then, otherwise } => {
            sub(cond, used);
            for b in [then, otherwise] {
                if let (true, Some(v)) = (b.stmts.is_empty(), b.value.as_mut()) {
                    sub(v, used);
                }
            }
        }
        ExprKind::List(items) => {
            for x in items {
                sub(x, used);
            }
        }
        ExprKind::Int(_)
        | ExprKind::Float { .. }
        | ExprKind::Bool(_)
        | ExprKind::Str(_)
        | ExprKind::Underscore
        | ExprKind::Error => {}
    }
}

/// Makes a recipe's constant `let`s usable in all its fields and rules, not only in `loss`:
/// each use in a field other than `loss` (and in an `optimize`/`sparsify` rule) after the
/// `let` is replaced by the value, spanned at the use, so everything downstream — the
/// checker, the compiler, the trainer — reads the literal. (`loss` and the other `let`s see
/// every `let` already.) Returns the name spans of the `let`s inlined somewhere, which count
/// as used.
pub fn inline_constant_lets(module: &mut Module) -> Vec<Span> {
    let mut used = vec![];
    for item in &mut module.items {
        let ItemKind::Recipe(rec) = &mut item.kind else { continue };
        let consts = constant_lets(rec);
        let mut seen: Vec<(String, Span, Expr)> = vec![];
        for m in &mut rec.members {
            match &mut m.kind {
                RecipeMemberKind::Let { name, .. } => {
                    seen.retain(|(n, _, _)| *n != name.name);
                    if let Some(c) = consts.iter().find(|(_, at, _)| *at == name.span) {
                        seen.push(c.clone());
                    }
                }
                RecipeMemberKind::Field { name, value } if name.name != "loss" => substitute(value, &seen, &mut used),
                RecipeMemberKind::Optimize { rule, .. } | RecipeMemberKind::Sparsify { rule, .. } => {
                    substitute(rule, &seen, &mut used)
                }
                _ => {}
            }
        }
    }
    used.sort();
    used.dedup();
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileId;

    fn recipe(src: &str) -> Module {
        let parsed = crate::parse::parse(FileId(0), src);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        parsed.module
    }

    fn field<'a>(m: &'a Module, name: &str) -> &'a Expr {
        let ItemKind::Recipe(r) = &m.items[0].kind else { panic!("not a recipe") };
        r.field(name).unwrap()
    }

    #[test]
    fn constants_are_inlined_after_their_let_and_spanned_at_the_use() {
        let src = "recipe r {\n    steps = n\n    let n = 4\n    let m = n * 2 + 1\n    let z = model.x\n    \
                   seed = m\n    eval_every = z\n    loss = n\n}\n";
        let mut m = recipe(src);
        let used = inline_constant_lets(&mut m);
        // Above its `let`, `n` stays a name (the checker reports it); after it, inlined.
        assert_eq!(field(&m, "steps").kind, ExprKind::Name("n".into()));
        let seed = field(&m, "seed");
        assert!(matches!(&seed.kind, ExprKind::Binary(BinOp::Add, ..)), "{seed:?}");
        assert_eq!(&src[seed.span.start as usize..seed.span.end as usize], "m");
        // Not constant: reads `model`.
        assert_eq!(field(&m, "eval_every").kind, ExprKind::Name("z".into()));
        // `loss` keeps its names (the `let`s are in its scope).
        assert_eq!(field(&m, "loss").kind, ExprKind::Name("n".into()));
        let names: Vec<&str> = used.iter().map(|s| &src[s.start as usize..s.end as usize]).collect();
        assert_eq!(names, ["m"]);
    }

    #[test]
    fn a_doubling_chain_of_constants_stays_small() {
        let mut src = String::from("recipe r {\n    let a0 = 1\n");
        for i in 1..64 {
            src.push_str(&format!("    let a{i} = a{} + a{}\n", i - 1, i - 1));
        }
        src.push_str("    steps = a63\n    seed = a5\n}\n");
        let mut m = recipe(&src);
        let consts = {
            let ItemKind::Recipe(r) = &m.items[0].kind else { panic!() };
            constant_lets(r)
        };
        // a_k has 2^(k+1) - 1 nodes: a_0 .. a_11 fit in 4096.
        assert_eq!(consts.len(), 12);
        // A chain one level deeper per line stops at 32 levels.
        let mut src = String::from("recipe r {\n    let a0 = 1\n");
        for i in 1..300 {
            src.push_str(&format!("    let a{i} = a{} + 1\n", i - 1));
        }
        src.push_str("}\n");
        let deep = recipe(&src);
        let ItemKind::Recipe(r) = &deep.items[0].kind else { panic!() };
        assert_eq!(constant_lets(r).len(), 32);
        inline_constant_lets(&mut m);
        assert_eq!(field(&m, "steps").kind, ExprKind::Name("a63".into()));
        assert!(matches!(field(&m, "seed").kind, ExprKind::Binary(..)));
    }
}
