//! Training plans: a `recipe` item → the graphs the training loop runs, and its settings.
//!
//! | graph | inputs | outputs |
//! |---|---|---|
//! | `init` | none (random streams under the recipe's seed) | `<path>` for every model parameter |
//! | `masks` | `step`, and per sparsified parameter `<path>`, `grad.<path>` (the previous step's gradient), `mask.<path>` | `mask.<path>` |
//! | `grad` | `batch.inputs`, `batch.targets` (`i32[batch, context]`), `<path>`, `mask.<path>` | `loss`, `grad.<path>` for every parameter |
//! | `eval` | as `grad` | `loss` |
//! | `update` | `step`, `<path>`, `grad.<path>`, `state.<path>.<name>`, `mask.<path>` | `<path>`, `state.<path>.<name>`, `grad_norm` |
//! | `decode` | `tokens: i32[1, context]`, `pos: i32` | `token` (the policy's choice after position `pos`), `logits` (the model's row at `pos`) |
//!
//! `recipec sample` runs `decode` through [`crate::incremental`], which derives the KV-cached
//! step (the token at `pos` only, caches in and out) from this naive whole-window graph.
//!
//! One step of training runs `masks` (when the recipe sparsifies), then `grad` once per
//! micro-batch (gradients averaged over `accumulate` micro-batches), then `update`: global-norm
//! clipping (`grad_clip`), each sparsity rule's `grad` rule, each parameter's optimizer with
//! its hyperparameters (schedules evaluated at `step`). The forward pass of a sparsified
//! parameter uses `param * mask`; its gradient is taken with respect to that product, and the
//! rule's `grad = ...` maps it to the gradient the optimizer sees. Everything is a graph: the
//! runtime has no per-method code.

use crate::entry;
use crate::ir::{Bin, Graph, NodeId, Op, Red, Un};
use crate::lower::{Arg, LowerError, Lowerer, Val};
use lang::ast::*;
use lang::resolve::Modules;
use lang::source::{SourceDb, Span};
use lang::types::{Dtype, ItemRef};
use std::collections::{BTreeMap, HashMap};

type R<T> = Result<T, LowerError>;

/// A model parameter and the rules that update it.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Dotted path, `model.blocks.0.attn.wq`.
    pub path: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The optimizer's name (`adamw`), or `None` for a frozen parameter.
    pub optimizer: Option<String>,
    /// The sparsity rule's name, when one applies.
    pub sparsity: Option<String>,
    /// A `buffer` member: set by its initializer (or `init_from`), never trained; no selector
    /// takes it.
    pub buffer: bool,
}

/// Where batches come from: `text(path, context = T, batch = B)` or `tokens(path.npy, ...)`.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// `text` or `tokens`.
    pub kind: String,
    /// As written; `embedded:kjv` names the embedded corpus. Relative to the recipe's file.
    pub path: String,
    pub context: usize,
    pub batch: usize,
    /// `split`: the fraction of the data held out for validation (default 0.05).
    pub val_fraction: f64,
    pub span: Span,
}

/// The recipe's scalar fields (see `lang::recipe::RECIPE_FIELDS` for defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub steps: usize,
    pub seed: u64,
    pub grad_clip: Option<f64>,
    pub accumulate: usize,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
}

/// Everything `recipec train` and `recipec sample` run for one recipe.
pub struct TrainPlan {
    pub name: String,
    pub params: Vec<ParamSpec>,
    /// Optimizer states: `(state.<path>.<name>, dtype, shape)`.
    pub states: Vec<(String, Dtype, Vec<usize>)>,
    pub data: DataSpec,
    pub settings: Settings,
    pub init: Graph,
    pub masks: Option<Graph>,
    pub grad: Graph,
    pub eval: Graph,
    pub update: Graph,
    /// `update` for a step at which no optimizer state takes its initial value (the
    /// initializers, a projection's SVD for one, fold away): any step after the first whose
    /// `(step - 1) % K` is not 0 for each of `refresh_periods`. Bit for bit `update` there.
    pub update_steady: Graph,
    /// The periods `K` of the optimizers' `state ... every K`, sorted.
    pub refresh_periods: Vec<u64>,
    /// `None` when the recipe has no `decode` and the model no `logits` method.
    pub decode: Option<Graph>,
    /// `teacher = ...` with `teacher_from = "..."`: a frozen model whose parameters
    /// (`teacher.<path>`, inputs of `grad` and `eval`, never updated or checkpointed) are read
    /// from another run's checkpoint.
    pub teacher: Option<Teacher>,
    /// `init_from = "..."`: the checkpoint whose `model.*` parameters replace the
    /// initializers' values on a fresh start.
    pub init_from: Option<Source>,
}

/// A checkpoint a recipe reads: a run directory or a `.safetensors` file, as written
/// (relative to the recipe's file), and the span of the string.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub path: String,
    pub span: Span,
}

/// A recipe's frozen teacher.
#[derive(Clone, Debug)]
pub struct Teacher {
    /// Its parameters, `teacher.<path>`; `model.<path>` in the checkpoint it comes from.
    pub params: Vec<ParamSpec>,
    pub from: Source,
}

fn fail<T>(msg: impl Into<String>, at: Option<(lang::source::FileId, Span)>) -> R<T> {
    Err(LowerError { message: msg.into(), at, input: false })
}

fn recipe_def(modules: &Modules, r: ItemRef) -> R<&RecipeDef> {
    match &modules.item(r).kind {
        ItemKind::Recipe(rec) => Ok(rec),
        _ => fail("not a recipe", None),
    }
}

fn field<'r>(rec: &'r RecipeDef, name: &str) -> Option<&'r Expr> {
    rec.field(name)
}

/// A lowerer in the recipe's module with `model` bound to a fresh instance.
fn recipe_lowerer<'a>(modules: &'a Modules, db: &'a SourceDb, r: ItemRef, name: &str) -> R<(Lowerer<'a>, Val)> {
    let rec = recipe_def(modules, r)?;
    let mut lw = Lowerer::new(modules, db, name);
    lw.set_module(r.module);
    let Some(model) = field(rec, "model") else { return fail("a recipe needs `model`", None) };
    let m = lw.expr(model)?;
    if !matches!(m, Val::Model(_)) {
        return fail("`model` is not a model instance", Some((file_of(modules, r), model.span)));
    }
    lw.bind_model("model", m.clone());
    if let Some(t) = field(rec, "teacher") {
        match lw.expr(t)? {
            Val::Model(tv) => lw.bind_model("teacher", Val::Model(std::rc::Rc::new(tv.rooted("teacher")))),
            _ => return fail("`teacher` is not a model instance", Some((file_of(modules, r), t.span))),
        }
    }
    Ok((lw, m))
}

/// The string of a `teacher_from`/`init_from` field.
fn source(modules: &Modules, r: ItemRef, rec: &RecipeDef, name: &str) -> R<Option<Source>> {
    match field(rec, name) {
        None => Ok(None),
        Some(Expr { kind: ExprKind::Str(s), span, .. }) => Ok(Some(Source { path: s.clone(), span: *span })),
        Some(e) => fail(format!("`{name}` must be a string"), Some((file_of(modules, r), e.span))),
    }
}

/// The teacher's parameters, named `teacher.<path>`, with their shapes.
fn teacher(modules: &Modules, db: &SourceDb, r: ItemRef, rec: &RecipeDef) -> R<Option<Teacher>> {
    let Some(from) = source(modules, r, rec, "teacher_from")? else { return Ok(None) };
    let (mut lw, _) = recipe_lowerer(modules, db, r, "teacher")?;
    let Some(Val::Model(tv)) = lw.lookup_public("teacher") else {
        return fail("`teacher_from` needs `teacher`", Some((file_of(modules, r), from.span)));
    };
    let values = lw.initial_values(&tv)?;
    let params = values
        .iter()
        .map(|(path, n)| {
            let node = lw.graph.node(*n);
            ParamSpec {
                path: path.clone(),
                dtype: node.dtype,
                shape: node.shape.clone(),
                optimizer: None,
                sparsity: None,
                buffer: lw.buffers.contains(path),
            }
        })
        .collect();
    Ok(Some(Teacher { params, from }))
}

fn file_of(modules: &Modules, r: ItemRef) -> lang::source::FileId {
    modules.list[r.module].file
}

fn int_field(lw: &mut Lowerer, rec: &RecipeDef, name: &str, default: i64, min: i64, f: lang::source::FileId) -> R<i64> {
    let Some(e) = field(rec, name) else { return Ok(default) };
    match lw.expr(e)? {
        Val::Int(v) if v >= min => Ok(v),
        _ => fail(format!("`{name}` must be an integer of at least {min}"), Some((f, e.span))),
    }
}

fn settings(lw: &mut Lowerer, rec: &RecipeDef, f: lang::source::FileId) -> R<Settings> {
    let grad_clip = match field(rec, "grad_clip") {
        None => None,
        Some(e) => match lw.expr(e)? {
            Val::Float(x) if x > 0.0 => Some(x),
            Val::Int(x) if x > 0 => Some(x as f64),
            _ => return fail("`grad_clip` must be a positive number", Some((f, e.span))),
        },
    };
    Ok(Settings {
        steps: int_field(lw, rec, "steps", 1000, 1, f)? as usize,
        seed: int_field(lw, rec, "seed", 0, 0, f)? as u64,
        grad_clip,
        accumulate: int_field(lw, rec, "accumulate", 1, 1, f)? as usize,
        eval_every: int_field(lw, rec, "eval_every", 100, 1, f)? as usize,
        eval_batches: int_field(lw, rec, "eval_batches", 8, 1, f)? as usize,
        checkpoint_every: int_field(lw, rec, "checkpoint_every", 500, 1, f)? as usize,
        log_every: int_field(lw, rec, "log_every", 10, 1, f)? as usize,
    })
}

fn data_spec(lw: &mut Lowerer, rec: &RecipeDef, f: lang::source::FileId) -> R<DataSpec> {
    let Some(data) = field(rec, "data") else { return fail("a recipe needs `data`", None) };
    let bad =
        || fail("`data` must be `text(path, context = T, batch = B)` or `tokens(path, ...)`", Some((f, data.span)));
    let ExprKind::Call { callee, args } = &data.kind else { return bad() };
    let ExprKind::Name(kind) = &callee.kind else { return bad() };
    if kind != "text" && kind != "tokens" {
        return bad();
    }
    let mut spec =
        DataSpec { kind: kind.clone(), path: String::new(), context: 0, batch: 0, val_fraction: 0.05, span: data.span };
    for (i, a) in args.iter().enumerate() {
        let key = match &a.name {
            Some(n) => n.name.clone(),
            None => ["path", "context", "batch", "split"].get(i).map(|s| s.to_string()).unwrap_or_default(),
        };
        let v = lw.expr(&a.value)?;
        match (key.as_str(), v) {
            ("path", Val::Str(s)) => spec.path = s,
            ("context", Val::Int(v)) if v >= 1 => spec.context = v as usize,
            ("batch", Val::Int(v)) if v >= 1 => spec.batch = v as usize,
            ("split", Val::Float(v)) if v > 0.0 && v < 0.5 => spec.val_fraction = v,
            (k, _) => {
                return fail(
                    format!(
                        "`{kind}`: `{k}` must be {}",
                        match k {
                            "path" => "a string",
                            "context" | "batch" => "a positive integer",
                            "split" => "the fraction held out for validation, in (0, 0.5)",
                            _ => "one of path, context, batch, split",
                        }
                    ),
                    Some((f, a.value.span)),
                )
            }
        }
    }
    if spec.path.is_empty() || spec.context == 0 || spec.batch == 0 {
        return fail(format!("`{kind}` needs a path, `context` and `batch`"), Some((f, data.span)));
    }
    Ok(spec)
}

/// A new named input of the graph being lowered.
fn input(lw: &mut Lowerer, name: String, dtype: Dtype, shape: &[usize], origin: &str) -> R<NodeId> {
    let index = lw.graph.inputs.len();
    lw.node(Op::Input { index, name }, dtype, shape.to_vec(), &[], origin)
}

/// The loss (and with `grads`, the gradients of every parameter in `all`) of a recipe.
fn loss_graph(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    name: &str,
    masked: &[String],
    all: &[ParamSpec],
    grads: bool,
) -> R<Graph> {
    let rec = recipe_def(modules, r)?;
    let f = file_of(modules, r);
    let (mut lw, _) = recipe_lowerer(modules, db, r, name)?;
    lw.masked = masked.iter().cloned().collect();
    let data = data_spec(&mut lw, rec, f)?;
    let (b, t) = (data.batch, data.context);
    let inputs = lw.node(Op::Input { index: 0, name: "batch.inputs".into() }, Dtype::I32, vec![b, t], &[], "batch")?;
    let targets =
        lw.node(Op::Input { index: 1, name: "batch.targets".into() }, Dtype::I32, vec![b, t], &[], "batch")?;
    lw.bind_model("batch", Val::Batch(inputs, targets));
    let Some(loss) = field(rec, "loss") else { return fail("a recipe needs `loss`", None) };
    lw.bind_recipe_lets(rec)?;
    let value = lw.expr(loss)?;
    let out = match value {
        Val::T(n) => n,
        Val::Float(x) => lw.constant(Dtype::F32, x, "loss")?,
        _ => return fail("the recipe's loss is not a tensor", Some((f, loss.span))),
    };
    if !lw.graph.node(out).shape.is_empty() || !lw.graph.node(out).dtype.is_float() {
        return fail(
            format!("the recipe's loss must be a floating-point scalar, found shape {:?}", lw.graph.node(out).shape),
            Some((f, loss.span)),
        );
    }
    let out = lw.cast(out, Dtype::F32, "loss")?;
    lw.graph.outputs.push(("loss".into(), out));
    if grads {
        crate::passes::merge_duplicates(&mut lw.graph);
        // The model's parameters only: the teacher's are constants of the step.
        let used: Vec<(String, NodeId)> =
            lw.params.iter().filter(|(k, _)| k.starts_with("model.")).map(|(k, v)| (k.clone(), *v)).collect();
        let ids: Vec<NodeId> = used.iter().map(|p| p.1).collect();
        let gs = crate::autodiff::grad(&mut lw.graph, out, &ids)?;
        let by_path: HashMap<String, NodeId> = used.iter().map(|p| p.0.clone()).zip(gs).collect();
        for p in all {
            let g = match by_path.get(&p.path) {
                Some(g) => *g,
                None => {
                    let z = lw.constant(p.dtype, 0.0, "unused parameter")?;
                    lw.broadcast(z, &p.shape, "unused parameter")?
                }
            };
            lw.graph.outputs.push((format!("grad.{}", p.path), g));
        }
    }
    // Every parameter (and mask) is an input, used or not, so the runtime binds all of them.
    let present: Vec<String> = lw
        .graph
        .inputs
        .iter()
        .filter_map(|i| match &lw.graph.node(*i).op {
            Op::Input { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for p in all {
        if !present.contains(&p.path) {
            input(&mut lw, p.path.clone(), p.dtype, &p.shape, "unused parameter")?;
        }
        let m = format!("mask.{}", p.path);
        if p.sparsity.is_some() && !present.contains(&m) {
            input(&mut lw, m, p.dtype, &p.shape, "unused parameter")?;
        }
    }
    Ok(lw.graph)
}

/// The hyperparameters of `rule(...)` in a recipe: constants become [`Arg::Scalar`], anything
/// computed (a schedule of `step`) becomes a scalar input bound to that node.
fn rule_args(
    lw: &mut Lowerer,
    modules: &Modules,
    rule: &Expr,
    f: lang::source::FileId,
) -> R<(ItemRef, Vec<(String, Arg)>, HashMap<String, NodeId>)> {
    let bad = || fail("expected a rule applied to its hyperparameters, e.g. `adamw(lr = 1e-3)`", Some((f, rule.span)));
    let (callee, args) = match &rule.kind {
        ExprKind::Call { callee, args } => (callee.as_ref(), args.as_slice()),
        ExprKind::Name(_) => (rule, &[][..]),
        _ => return bad(),
    };
    let ExprKind::Name(name) = &callee.kind else { return bad() };
    let Some(item) = modules.find_item(lw_module(modules, f), name.as_str()) else { return bad() };
    let ItemKind::Rule(def) = &modules.item(item).kind else { return bad() };
    let hyper: Vec<&str> = def.params.iter().map(|p| p.name.name.as_str()).filter(|n| *n != "param").collect();
    let mut out = vec![];
    let mut nodes = HashMap::new();
    for (i, a) in args.iter().enumerate() {
        let key = match &a.name {
            Some(n) => n.name.clone(),
            None => match hyper.get(i) {
                Some(k) => k.to_string(),
                None => {
                    return fail(format!("`{name}` takes {} hyperparameters", hyper.len()), Some((f, a.value.span)))
                }
            },
        };
        let arg = match lw.expr(&a.value)? {
            Val::Float(x) => Arg::Scalar(x),
            Val::Int(x) => Arg::Scalar(x as f64),
            Val::Bool(b) => Arg::Scalar(b as i32 as f64),
            Val::Str(s) => Arg::Str(s),
            Val::T(n) if lw.graph.node(n).shape.is_empty() => {
                nodes.insert(key.clone(), n);
                Arg::Tensor(lw.graph.node(n).dtype, vec![])
            }
            _ => {
                return fail(
                    format!("hyperparameter `{key}` must be a number or a schedule of `step`"),
                    Some((f, a.value.span)),
                )
            }
        };
        out.push((key, arg));
    }
    Ok((item, out, nodes))
}

fn lw_module(modules: &Modules, f: lang::source::FileId) -> usize {
    modules.list.iter().position(|m| m.file == f).unwrap_or(0)
}

/// The parameters' specs and the recipe's groups: every parameter with its optimizer and
/// sparsity rule expressions.
struct Groups<'r> {
    params: Vec<ParamSpec>,
    optimize: Vec<Option<&'r Expr>>,
    sparsify: Vec<Option<&'r Expr>>,
}

fn groups<'r>(modules: &Modules, db: &SourceDb, r: ItemRef, rec: &'r RecipeDef) -> R<(Groups<'r>, Graph)> {
    let f = file_of(modules, r);
    let (mut lw, m) = recipe_lowerer(modules, db, r, "init")?;
    let Val::Model(mv) = m else { unreachable!("checked by recipe_lowerer") };
    let values = lw.initial_values(&mv)?;
    let mut params = vec![];
    for (path, n) in &values {
        let node = lw.graph.node(*n);
        params.push(ParamSpec {
            path: path.clone(),
            dtype: node.dtype,
            shape: node.shape.clone(),
            optimizer: None,
            sparsity: None,
            buffer: lw.buffers.contains(path),
        });
        lw.graph.outputs.push((path.clone(), *n));
    }
    let mut optimize = vec![None; params.len()];
    let mut sparsify = vec![None; params.len()];
    for mem in &rec.members {
        let (sel, rule, opt) = match &mem.kind {
            RecipeMemberKind::Optimize { selector, rule } => (selector, rule, true),
            RecipeMemberKind::Sparsify { selector, rule } => (selector, rule, false),
            _ => continue,
        };
        let name = match &rule.kind {
            ExprKind::Call { callee, .. } => match &callee.kind {
                ExprKind::Name(n) => n.clone(),
                _ => String::new(),
            },
            ExprKind::Name(n) => n.clone(),
            _ => String::new(),
        };
        let mut any = false;
        for (i, p) in params.iter_mut().enumerate() {
            let path: Vec<String> = p.path.split('.').map(|s| s.to_string()).collect();
            // Buffers are never trained (the checker's selectors skip them too).
            if !p.buffer
                && sel.segments.first() == Some(&SelectorSegment::Name("model".into()))
                && lang::recipe::selector_matches(&sel.segments[1..], &path[1..])
            {
                any = true;
                if opt {
                    if optimize[i].is_some() {
                        return fail(format!("parameter `{}` is optimized by two groups", p.path), Some((f, sel.span)));
                    }
                    optimize[i] = Some(rule);
                    p.optimizer = Some(name.clone());
                } else {
                    if sparsify[i].is_some() {
                        return fail(format!("parameter `{}` has two sparsity rules", p.path), Some((f, sel.span)));
                    }
                    sparsify[i] = Some(rule);
                    p.sparsity = Some(name.clone());
                }
            }
        }
        if !any {
            return fail(format!("selector `{sel}` matches no parameter"), Some((f, sel.span)));
        }
    }
    Ok((Groups { params, optimize, sparsify }, lw.graph))
}

/// The update graph and what building it found.
struct Update {
    graph: Graph,
    /// Optimizer states: `(state.<path>.<name>, dtype, shape)`.
    states: Vec<(String, Dtype, Vec<usize>)>,
    /// The sparsity rules' graphs, for the mask refresh.
    mask_graph_parts: Vec<(usize, Graph, HashMap<String, NodeId>)>,
    /// The periods of the optimizers' `state ... every K` initializers.
    periods: Vec<u64>,
}

/// The update: clipping, sparsity gradient rules, optimizers (with `steady`, for a step at
/// which no optimizer state takes its initial value: [`entry::optimizer_step`]).
fn update_graph(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    f: lang::source::FileId,
    (params, optimize, sparsify): (&[ParamSpec], &[Option<&Expr>], &[Option<&Expr>]),
    settings: &Settings,
    steady: bool,
) -> R<Update> {
    let mut lw = Lowerer::new(modules, db, "update");
    lw.set_module(r.module);
    let step = lw.node(Op::Input { index: 0, name: "step".into() }, Dtype::I32, vec![], &[], "step")?;
    lw.bind("step", Val::T(step));
    let mut p_in = vec![];
    let mut g_in = vec![];
    for p in params {
        p_in.push(input(&mut lw, p.path.clone(), p.dtype, &p.shape, "param")?);
        g_in.push(input(&mut lw, format!("grad.{}", p.path), p.dtype, &p.shape, "grad")?);
    }
    // Global gradient norm (f32, summed per parameter then over parameters).
    let mut total: Option<NodeId> = None;
    for (p, &g) in params.iter().zip(&g_in) {
        let g32 = lw.cast(g, Dtype::F32, "grad_norm")?;
        let sq = lw.node(Op::Binary(Bin::Mul), Dtype::F32, p.shape.clone(), &[g32, g32], "grad_norm")?;
        let axes: Vec<usize> = (0..p.shape.len()).collect();
        let s = if axes.is_empty() {
            sq
        } else {
            lw.node(Op::Reduce { op: Red::Sum, axes }, Dtype::F32, vec![], &[sq], "grad_norm")?
        };
        total = Some(match total {
            None => s,
            Some(t) => lw.node(Op::Binary(Bin::Add), Dtype::F32, vec![], &[t, s], "grad_norm")?,
        });
    }
    let total = match total {
        Some(t) => t,
        None => lw.constant(Dtype::F32, 0.0, "grad_norm")?,
    };
    let norm = lw.node(Op::Unary(Un::Sqrt), Dtype::F32, vec![], &[total], "grad_norm")?;
    lw.graph.outputs.push(("grad_norm".into(), norm));
    let scale = match settings.grad_clip {
        None => None,
        Some(c) => {
            // min(1, c / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_.
            let eps = lw.constant(Dtype::F32, 1e-6, "grad_clip")?;
            let d = lw.node(Op::Binary(Bin::Add), Dtype::F32, vec![], &[norm, eps], "grad_clip")?;
            let cc = lw.constant(Dtype::F32, c, "grad_clip")?;
            let q = lw.node(Op::Binary(Bin::Div), Dtype::F32, vec![], &[cc, d], "grad_clip")?;
            let one = lw.constant(Dtype::F32, 1.0, "grad_clip")?;
            Some(lw.node(Op::Binary(Bin::Min), Dtype::F32, vec![], &[q, one], "grad_clip")?)
        }
    };
    let mut states = vec![];
    let mut periods = vec![];
    let mut mask_graph_parts: Vec<(usize, Graph, HashMap<String, NodeId>)> = vec![];
    for (i, p) in params.iter().enumerate() {
        let mut g = g_in[i];
        if let Some(s) = scale {
            let d = p.dtype;
            let s = lw.cast(s, d, "grad_clip")?;
            let s = lw.broadcast(s, &p.shape, "grad_clip")?;
            g = lw.node(Op::Binary(Bin::Mul), d, p.shape.clone(), &[g, s], "grad_clip")?;
        }
        let offset = ((i as u64) + 1) << 32;
        if let Some(rule) = sparsify[i] {
            let (item, args, nodes) = rule_args(&mut lw, modules, rule, f)?;
            let sg = entry::sparsity(modules, db, item, (p.dtype, p.shape.clone()), &args)
                .map_err(|e| at_rule(db, e, f, rule.span, p))?;
            let m_in = input(&mut lw, format!("mask.{}", p.path), p.dtype, &p.shape, "mask")?;
            let outs = lw
                .graph
                .inline(
                    &sg,
                    &mut |n| match n {
                        "param" => Some(p_in[i]),
                        "grad" => Some(g),
                        "step" => Some(step),
                        "mask" => Some(m_in),
                        h => nodes.get(h).copied(),
                    },
                    offset,
                )
                .map_err(|e| at_rule(db, e.into(), f, rule.span, p))?;
            g = outs.iter().find(|o| o.0 == "grad").map(|o| o.1).unwrap_or(g);
            mask_graph_parts.push((i, sg, nodes));
        }
        let Some(rule) = optimize[i] else {
            continue;
        };
        let (item, args, nodes) = rule_args(&mut lw, modules, rule, f)?;
        let (og, every) = entry::optimizer_step(modules, db, item, (p.dtype, p.shape.clone()), &args, steady)
            .map_err(|e| at_rule(db, e, f, rule.span, p))?;
        periods.extend(every);
        let mut bound: BTreeMap<String, NodeId> = BTreeMap::new();
        for id in &og.inputs {
            if let Op::Input { name, .. } = &og.node(*id).op {
                if let Some(s) = name.strip_prefix("state_") {
                    let full = format!("state.{}.{s}", p.path);
                    let n = og.node(*id);
                    let (dtype, shape) = (n.dtype, n.shape.clone());
                    let state = input(&mut lw, full.clone(), dtype, &shape, "state")?;
                    states.push((full, dtype, shape));
                    bound.insert(name.clone(), state);
                }
            }
        }
        let outs = lw
            .graph
            .inline(
                &og,
                &mut |n| match n {
                    "param" => Some(p_in[i]),
                    "grad" => Some(g),
                    "step" => Some(step),
                    h => bound.get(h).copied().or_else(|| nodes.get(h).copied()),
                },
                offset + (1 << 31),
            )
            .map_err(|e| at_rule(db, e.into(), f, rule.span, p))?;
        for (name, n) in outs {
            let out = if name == "param" {
                p.path.clone()
            } else {
                format!("state.{}.{}", p.path, name.trim_start_matches("state_"))
            };
            lw.graph.outputs.push((out, n));
        }
    }
    Ok(Update { graph: lw.graph, states, mask_graph_parts, periods })
}

/// Builds the training plan of recipe `r`. Errors carry the recipe span at fault (a selector,
/// a hyperparameter, a shape that does not fit the model) and happen before any training.
pub fn plan(modules: &Modules, db: &SourceDb, r: ItemRef) -> R<TrainPlan> {
    let rec = recipe_def(modules, r)?;
    let f = file_of(modules, r);
    let (Groups { mut params, optimize, sparsify }, init) = groups(modules, db, r, rec)?;
    let (data, settings) = {
        let (mut lw, _) = recipe_lowerer(modules, db, r, "settings")?;
        (data_spec(&mut lw, rec, f)?, settings(&mut lw, rec, f)?)
    };
    for p in params.iter_mut() {
        if p.sparsity.is_some() && !p.dtype.is_float() {
            return fail(format!("`{}` is not a floating-point parameter and cannot be sparsified", p.path), None);
        }
    }
    let masked: Vec<String> = params.iter().filter(|p| p.sparsity.is_some()).map(|p| p.path.clone()).collect();
    let grad = loss_graph(modules, db, r, "grad", &masked, &params, true)?;
    let eval = loss_graph(modules, db, r, "eval", &masked, &params, false)?;

    // The update: clipping, sparsity gradient rules, optimizers; and its form for the steps at
    // which no optimizer state takes its initial value.
    let groups = (&params[..], &optimize[..], &sparsify[..]);
    let Update { graph: update, states, mask_graph_parts, mut periods } =
        update_graph(modules, db, r, f, groups, &settings, false)?;
    periods.sort_unstable();
    periods.dedup();
    let mut update_steady = update_graph(modules, db, r, f, groups, &settings, true)?.graph;
    update_steady.name = "update_steady".into();

    // Mask refresh at the start of a step, from the parameters and the previous gradient.
    let masks = if mask_graph_parts.is_empty() {
        None
    } else {
        let mut lw = Lowerer::new(modules, db, "masks");
        lw.set_module(r.module);
        let step = lw.node(Op::Input { index: 0, name: "step".into() }, Dtype::I32, vec![], &[], "step")?;
        lw.bind("step", Val::T(step));
        for (i, sg, _) in &mask_graph_parts {
            let p = &params[*i];
            let rule = sparsify[*i].expect("sparsified");
            let (_, _, nodes) = rule_args(&mut lw, modules, rule, f)?;
            let pi = input(&mut lw, p.path.clone(), p.dtype, &p.shape, "mask")?;
            let gi = input(&mut lw, format!("grad.{}", p.path), p.dtype, &p.shape, "mask")?;
            let mi = input(&mut lw, format!("mask.{}", p.path), p.dtype, &p.shape, "mask")?;
            let outs = lw
                .graph
                .inline(
                    sg,
                    &mut |n| match n {
                        "param" => Some(pi),
                        "grad" => Some(gi),
                        "step" => Some(step),
                        "mask" => Some(mi),
                        h => nodes.get(h).copied(),
                    },
                    ((*i as u64) + 1) << 32,
                )
                .map_err(|e| at_rule(db, e.into(), f, rule.span, p))?;
            let m = outs.iter().find(|o| o.0 == "mask").map(|o| o.1).unwrap_or(mi);
            lw.graph.outputs.push((format!("mask.{}", p.path), m));
        }
        Some(lw.graph)
    };
    let decode = match field(rec, "decode") {
        Some(policy) => Some(decode_graph(modules, db, r, policy, &masked, data.context, None)?),
        None => None,
    };
    Ok(TrainPlan {
        name: rec.name.name.clone(),
        params,
        states,
        data,
        settings,
        init,
        masks,
        grad,
        eval,
        update,
        update_steady,
        refresh_periods: periods,
        decode,
        teacher: teacher(modules, db, r, rec)?,
        init_from: source(modules, r, rec, "init_from")?,
    })
}

/// Points an error inside a rule's body (often in the stdlib) at the recipe line that applies
/// the rule to `path`, naming the parameter and where inside the rule it failed.
fn at_rule(db: &SourceDb, mut e: LowerError, f: lang::source::FileId, span: Span, p: &ParamSpec) -> LowerError {
    let inside = match e.at {
        Some((file, s)) if file != f => {
            let src = db.file(file);
            let (l, c) = src.line_col(s.start);
            format!(" at {}:{l}:{c}", src.name)
        }
        Some(_) => return e,
        None => String::new(),
    };
    e.message = format!("{} (applying the rule to `{}`: {}{:?}{inside})", e.message, p.path, p.dtype, p.shape);
    e.at = Some((f, span));
    e
}

/// `model.<method>(args…)` as an expression at `sp`.
fn model_call(method: &str, args: Vec<lang::ast::Arg>, sp: Span) -> Expr {
    let callee = ExprKind::Field {
        base: Box::new(Expr::new(ExprKind::Name("model".into()), sp)),
        name: Ident { name: method.to_string(), span: sp },
    };
    Expr::new(ExprKind::Call { callee: Box::new(Expr::new(callee, sp)), args }, sp)
}

/// The decoding step: the model's `logits` on `tokens: i32[1, context]` (or the method
/// `logits` calls, `name(args…)`, given the tokens before its arguments), the row at `pos`,
/// and the policy `policy` (a decode item applied to its settings; its first parameter
/// receives the logits).
pub fn decode_graph(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    policy: &Expr,
    masked: &[String],
    context: usize,
    logits: Option<(&Expr, lang::source::FileId)>,
) -> R<Graph> {
    let f = file_of(modules, r);
    let (mut lw, _) = recipe_lowerer(modules, db, r, "decode")?;
    lw.masked = masked.iter().cloned().collect();
    let tokens = lw.node(Op::Input { index: 0, name: "tokens".into() }, Dtype::I32, vec![1, context], &[], "tokens")?;
    let pos = lw.node(Op::Input { index: 1, name: "pos".into() }, Dtype::I32, vec![], &[], "pos")?;
    lw.bind("__tokens", Val::T(tokens));
    let sp = logits.map(|(e, _)| e.span).unwrap_or(policy.span);
    let at = logits.map(|(_, lf)| lf).unwrap_or(f);
    let not_a_call =
        || fail("`--logits` calls a method of the model: `name(args…)`, the tokens going first", Some((at, sp)));
    let (method, mut args) = match logits.map(|(e, _)| &e.kind) {
        None => ("logits".to_string(), vec![]),
        Some(ExprKind::Call { callee, args }) => match &callee.kind {
            ExprKind::Name(m) => (m.clone(), args.clone()),
            _ => return not_a_call(),
        },
        Some(_) => return not_a_call(),
    };
    args.insert(0, lang::ast::Arg { name: None, value: Expr::new(ExprKind::Name("__tokens".into()), sp) });
    let call = model_call(&method, args, sp);
    let logits = match lw.expr(&call) {
        Ok(Val::T(n)) => n,
        Ok(_) => return fail(format!("`model.{method}` gives no tensor"), Some((at, sp))),
        Err(_) if logits.is_none() => {
            return fail(
                "`recipec sample` needs the model to have `fn logits(tokens: i32[B, S]) -> f32[B * S, V]`",
                Some((f, sp)),
            )
        }
        Err(mut e) => {
            e.at = Some((at, sp));
            return Err(e);
        }
    };
    let ls = lw.graph.node(logits).shape.clone();
    if ls.len() != 2 || ls[0] != context {
        return fail(format!("`model.{method}` must give [S, V] rows for S = {context}, found {ls:?}"), Some((at, sp)));
    }
    let row = lw.node(Op::Take { axis: 0 }, lw.graph.node(logits).dtype, vec![ls[1]], &[logits, pos], "decode")?;
    let tok = lower_policy(&mut lw, modules, r, policy, row)?;
    lw.graph.outputs.push(("token".into(), tok));
    lw.graph.outputs.push(("logits".into(), row));
    Ok(lw.graph)
}

/// The model's next-token logits over a batch: input `tokens: i32[batch, context]`, output
/// `logits`, the `[batch · context, V]` rows of `model.logits(tokens)` (what `recipec
/// compress` compares between a dense and a compressed model). `masked` parameters enter
/// multiplied by their masks, as in training's forward pass.
pub fn logits_graph(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    masked: &[String],
    batch: usize,
    context: usize,
) -> R<Graph> {
    let f = file_of(modules, r);
    let (mut lw, _) = recipe_lowerer(modules, db, r, "logits")?;
    lw.masked = masked.iter().cloned().collect();
    let tokens =
        lw.node(Op::Input { index: 0, name: "tokens".into() }, Dtype::I32, vec![batch, context], &[], "tokens")?;
    lw.bind("__tokens", Val::T(tokens));
    let sp = modules.item(r).span;
    let tokens_arg = lang::ast::Arg { name: None, value: Expr::new(ExprKind::Name("__tokens".into()), sp) };
    let call = model_call("logits", vec![tokens_arg], sp);
    let need = || fail("the model needs `fn logits(tokens: i32[B, S]) -> f32[B * S, V]`", Some((f, sp)));
    let logits = match lw.expr(&call) {
        Ok(Val::T(n)) => n,
        _ => return need(),
    };
    let ls = lw.graph.node(logits).shape.clone();
    if ls.len() != 2 || ls[0] != batch * context {
        return fail(
            format!("`model.logits` must give [B * S, V] rows for B * S = {}, found {ls:?}", batch * context),
            Some((f, sp)),
        );
    }
    lw.graph.outputs.push(("logits".into(), logits));
    Ok(lw.graph)
}

/// The policy alone, for constrained sampling (`recipec sample --constraint`): inputs
/// `logits: f32[V]` (the model's row, as `decode` outputs it) and `banned: bool[V]`; output
/// `token`, the policy's choice on the logits with the banned tokens' set to −∞.
pub fn policy_graph(modules: &Modules, db: &SourceDb, r: ItemRef, policy: &Expr, vocab: usize) -> R<Graph> {
    let (mut lw, _) = recipe_lowerer(modules, db, r, "policy")?;
    let logits = lw.node(Op::Input { index: 0, name: "logits".into() }, Dtype::F32, vec![vocab], &[], "logits")?;
    let banned = lw.node(Op::Input { index: 1, name: "banned".into() }, Dtype::Bool, vec![vocab], &[], "banned")?;
    let minus_inf = lw.constant(Dtype::F32, f64::NEG_INFINITY, "policy")?;
    let minus_inf = lw.broadcast(minus_inf, &[vocab], "policy")?;
    let row = lw.node(Op::Select, Dtype::F32, vec![vocab], &[banned, minus_inf, logits], "policy")?;
    let tok = lower_policy(&mut lw, modules, r, policy, row)?;
    lw.graph.outputs.push(("token".into(), tok));
    Ok(lw.graph)
}

/// Applies the decode item `policy` (with its settings) to the logits row `row`: the token.
fn lower_policy(lw: &mut Lowerer, modules: &Modules, r: ItemRef, policy: &Expr, row: NodeId) -> R<NodeId> {
    let f = file_of(modules, r);
    let sp = policy.span;
    let (callee, args) = match &policy.kind {
        ExprKind::Call { callee, args } => (callee.as_ref(), args.as_slice()),
        ExprKind::Name(_) => (policy, &[][..]),
        _ => return fail("`decode` must be a decoding policy such as `top_k(k = 40)`", Some((f, sp))),
    };
    let ExprKind::Name(name) = &callee.kind else {
        return fail("`decode` must be a decoding policy such as `top_k(k = 40)`", Some((f, sp)));
    };
    let Some(item) = modules.find_item(r.module, name).or_else(|| {
        modules.list.iter().enumerate().find_map(|(m, _)| {
            modules
                .find_item(m, name)
                .filter(|it| matches!(&modules.item(*it).kind, ItemKind::Fn(fd) if fd.kind == FnKind::Decode))
        })
    }) else {
        return fail(
            format!("no decoding policy `{name}` (the stdlib has greedy, temperature, top_k, top_p)"),
            Some((f, sp)),
        );
    };
    let ItemKind::Fn(fd) = &modules.item(item).kind else {
        return fail(format!("`{name}` is not a decoding policy"), Some((f, sp)));
    };
    if fd.kind != FnKind::Decode {
        return fail(format!("`{name}` is not a decoding policy"), Some((f, sp)));
    }
    let mut vals: HashMap<String, Val> = HashMap::new();
    let first = fd.params.first().map(|p| p.name.name.clone()).unwrap_or_default();
    vals.insert(first.clone(), Val::T(row));
    let rest: Vec<&str> = fd.params.iter().skip(1).map(|p| p.name.name.as_str()).collect();
    for (i, a) in args.iter().enumerate() {
        let key = match &a.name {
            Some(n) => n.name.clone(),
            None => match rest.get(i) {
                Some(k) => k.to_string(),
                None => return fail(format!("`{name}` takes {} settings", rest.len()), Some((f, a.value.span))),
            },
        };
        if !rest.contains(&key.as_str()) {
            return fail(
                format!("`{name}` has no setting `{key}` (settings: {})", rest.join(", ")),
                Some((f, a.value.span)),
            );
        }
        let v = lw.expr(&a.value)?;
        vals.insert(key, v);
    }
    let out = lw.lower_call(item, &vals, sp)?;
    let tok = match out {
        Val::T(n) => n,
        Val::Int(i) => lw.constant(Dtype::I32, i as f64, "decode")?,
        _ => return fail("the decoding policy does not give a token", Some((f, sp))),
    };
    let tok = lw.cast(tok, Dtype::I32, "decode")?;
    if !lw.graph.node(tok).shape.is_empty() {
        return fail("the decoding policy must give one token (an i32 scalar)", Some((f, sp)));
    }
    Ok(tok)
}

/// Parameters named in the recipe's data flow that a user may list (`recipec train --emit`).
pub fn summary(plan: &TrainPlan) -> String {
    let n: usize = plan.params.iter().map(|p| p.shape.iter().product::<usize>()).sum();
    format!(
        "recipe `{}`: {} parameters in {} tensors, {} optimizer states, {} sparsified; data {}(\"{}\", context = {}, batch = {}); {} steps",
        plan.name,
        n,
        plan.params.len(),
        plan.states.len(),
        plan.params.iter().filter(|p| p.sparsity.is_some()).count(),
        plan.data.kind,
        plan.data.path,
        plan.data.context,
        plan.data.batch,
        plan.settings.steps
    )
}

/// The graphs that average a step's micro-batch gradients where they were computed, for
/// `accumulate = k > 1`, over the gradient graph's `grad.<p>` outputs:
/// - `start`, after the first micro-batch: `acc.<p> = f32(grad.<p>)`;
/// - `add`, after each middle one: `acc.<p> = acc.<p> + f32(grad.<p>)` (in place);
/// - `finish`, after the last: `grad.<p> = dtype((acc.<p> + f32(grad.<p>)) / k)` (in place).
///
/// The sum is kept in f32 whatever the parameters' dtype (one rounding per addition, one for
/// the division and one to the gradient's dtype); with `k = 2` that is the exactly rounded mean.
pub fn accumulation(grad: &Graph, k: usize) -> Result<[Graph; 3], crate::ir::IrError> {
    let grads: Vec<(String, Dtype, Vec<usize>)> = grad
        .outputs
        .iter()
        .filter(|(name, _)| name.starts_with("grad."))
        .map(|(name, n)| (name.clone(), grad.node(*n).dtype, grad.node(*n).shape.clone()))
        .collect();
    let build = |which: &str| -> Result<Graph, crate::ir::IrError> {
        let mut g = Graph::new(format!("{}_accumulate_{which}", grad.name));
        let mut index = 0;
        let mut input = |g: &mut Graph, name: &str, dtype: Dtype, shape: &[usize]| {
            index += 1;
            g.add(Op::Input { index: index - 1, name: name.to_string() }, dtype, shape.to_vec(), &[], name)
        };
        for (name, dtype, shape) in &grads {
            let acc_name = format!("acc.{}", &name["grad.".len()..]);
            let origin = "accumulate";
            let gr = input(&mut g, name, *dtype, shape)?;
            let gr = if *dtype == Dtype::F32 { gr } else { g.add(Op::Cast, Dtype::F32, shape.clone(), &[gr], origin)? };
            if which == "start" {
                g.outputs.push((acc_name, gr));
                continue;
            }
            let acc = input(&mut g, &acc_name, Dtype::F32, shape)?;
            let sum = g.add(Op::Binary(Bin::Add), Dtype::F32, shape.clone(), &[acc, gr], origin)?;
            if which == "add" {
                g.outputs.push((acc_name, sum));
                continue;
            }
            let kc = g.add(Op::Const { value: k as f64 }, Dtype::F32, vec![], &[], origin)?;
            let kb = g.add(Op::Broadcast, Dtype::F32, shape.clone(), &[kc], origin)?;
            let mean = g.add(Op::Binary(Bin::Div), Dtype::F32, shape.clone(), &[sum, kb], origin)?;
            let mean =
                if *dtype == Dtype::F32 { mean } else { g.add(Op::Cast, *dtype, shape.clone(), &[mean], origin)? };
            g.outputs.push((name.clone(), mean));
        }
        Ok(g)
    };
    Ok([build("start")?, build("add")?, build("finish")?])
}
