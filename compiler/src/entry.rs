//! Entry points: the graphs `recipec eval` (and later the runtime) runs for each item kind.
//!
//! | item | inputs | outputs |
//! |---|---|---|
//! | `fn`, `loss`, `decode` | the tensor arguments | `out`, and with gradients `grad_<arg>` per float argument |
//! | `schedule` | `step: i32` | `out` |
//! | `optimizer` | `param`, `grad`, `step`, `state_<name>`... | `param`, `state_<name>`... |
//! | `sparsity` | `param`, `grad`, `step`, `mask` | `mask`, `grad` |
//!
//! Hyperparameters are folded in as constants. An optimizer state `state m = init [every K]`
//! takes its initial value at step 1 (and every K steps) inside the step graph, so one graph
//! serves every step; the caller feeds zeros for the states at step 1.

use crate::ir::{Bin, Graph, NodeId, Op};
use crate::lower::{Arg, LowerError, Lowerer, Val};
use lang::ast::*;
use lang::resolve::Modules;
use lang::source::SourceDb;
use lang::types::{Dtype, ItemRef};
use std::collections::HashMap;

type R<T> = Result<T, LowerError>;

fn fail<T>(msg: impl Into<String>) -> R<T> {
    Err(LowerError { message: msg.into(), at: None, input: false })
}

/// A problem with the supplied arguments.
fn bad_input<T>(msg: impl Into<String>) -> R<T> {
    Err(LowerError { message: msg.into(), at: None, input: true })
}

/// How an argument of the entry point is supplied: tensors become inputs, scalars constants.
fn bind_args(lw: &mut Lowerer, params: &[Param], args: &[(String, Arg)], reserved: &[&str]) -> R<HashMap<String, Val>> {
    for (name, _) in args {
        if !params.iter().any(|p| p.name.name == *name) && !reserved.contains(&name.as_str()) {
            let known: Vec<&str> = params.iter().map(|p| p.name.name.as_str()).collect();
            return bad_input(format!("no parameter `{name}` (parameters: {})", known.join(", ")));
        }
    }
    let mut vals = HashMap::new();
    for p in params {
        let Some((_, a)) = args.iter().find(|(n, _)| *n == p.name.name) else { continue };
        let declared = Dtype::parse(&p.ty.dtype.name);
        let v = match a {
            Arg::Tensor(dtype, shape) => {
                if let Some(d) = declared {
                    if d != *dtype {
                        return bad_input(format!("argument `{}` must be {d}, got {dtype}", p.name.name));
                    }
                }
                let rank = p.ty.dims.as_ref().map(|d| d.len()).unwrap_or(0);
                if rank != shape.len() {
                    return bad_input(format!(
                        "argument `{}` must have rank {rank} ({}), got shape {shape:?}",
                        p.name.name,
                        lang::fmt::flat(&Expr::new(
                            ExprKind::Name(format!(
                                "{}{}",
                                p.ty.dtype.name,
                                p.ty.dims
                                    .as_ref()
                                    .map(|d| format!(
                                        "[{}]",
                                        d.iter().map(lang::fmt::flat).collect::<Vec<_>>().join(", ")
                                    ))
                                    .unwrap_or_default()
                            )),
                            p.span
                        ))
                    ));
                }
                let index = lw.graph.inputs.len();
                let n = lw.node(
                    Op::Input { index, name: p.name.name.clone() },
                    *dtype,
                    shape.clone(),
                    &[],
                    &format!("param {}", p.name.name),
                )?;
                Val::T(n)
            }
            Arg::Scalar(x) => match declared {
                Some(d) if d.is_int() => Val::Int(*x as i64),
                Some(Dtype::Bool) => Val::Bool(*x != 0.0),
                _ => Val::Float(*x),
            },
            Arg::Str(s) => Val::Str(s.clone()),
        };
        vals.insert(p.name.name.clone(), v);
    }
    Ok(vals)
}

fn item_params(modules: &Modules, r: ItemRef) -> Vec<Param> {
    match &modules.item(r).kind {
        ItemKind::Fn(f) => f.params.clone(),
        ItemKind::Rule(rd) => rd.params.clone(),
        _ => vec![],
    }
}

/// A `fn`, `loss` or `decode`: output `out`; with `grads`, `grad_<name>` for every
/// floating-point tensor argument.
pub fn function(modules: &Modules, db: &SourceDb, r: ItemRef, args: &[(String, Arg)], grads: bool) -> R<Graph> {
    let name = modules.item(r).name().map(|n| n.name.clone()).unwrap_or_default();
    let mut lw = Lowerer::new(modules, db, &name);
    lw.set_module(r.module);
    let params = item_params(modules, r);
    let vals = bind_args(&mut lw, &params, args, &[])?;
    let out = lw.lower_call(r, &vals, modules.item(r).span)?;
    let origin = "result".to_string();
    let out = match &out {
        Val::T(n) => *n,
        Val::Int(i) => lw.constant(Dtype::I32, *i as f64, &origin)?,
        Val::Float(f) => lw.constant(Dtype::F32, *f, &origin)?,
        Val::Bool(b) => lw.constant(Dtype::Bool, *b as i32 as f64, &origin)?,
        _ => return fail("the item does not produce a tensor"),
    };
    lw.graph.outputs.push(("out".into(), out));
    if grads {
        let node = lw.graph.node(out);
        if !node.shape.is_empty() || !node.dtype.is_float() {
            return fail(format!(
                "`--grad` needs a floating-point scalar result; `{name}` gives {}{:?}",
                node.dtype, node.shape
            ));
        }
        let wrt: Vec<(String, NodeId)> = lw
            .graph
            .inputs
            .iter()
            .filter(|i| lw.graph.node(**i).dtype.is_float())
            .map(|i| match &lw.graph.node(*i).op {
                Op::Input { name, .. } => (name.clone(), *i),
                _ => unreachable!(),
            })
            .collect();
        let ids: Vec<NodeId> = wrt.iter().map(|w| w.1).collect();
        let gs = crate::autodiff::grad(&mut lw.graph, out, &ids)?;
        for ((n, _), g) in wrt.iter().zip(gs) {
            lw.graph.outputs.push((format!("grad_{n}"), g));
        }
    }
    Ok(lw.graph)
}

/// A schedule: input `step` (i32 scalar), output `out`.
pub fn schedule(modules: &Modules, db: &SourceDb, r: ItemRef, args: &[(String, Arg)]) -> R<Graph> {
    let name = modules.item(r).name().map(|n| n.name.clone()).unwrap_or_default();
    let mut lw = Lowerer::new(modules, db, &name);
    lw.set_module(r.module);
    let step = lw.node(Op::Input { index: 0, name: "step".into() }, Dtype::I32, vec![], &[], "step")?;
    lw.bind("step", Val::T(step));
    let params = item_params(modules, r);
    let vals = bind_args(&mut lw, &params, args, &[])?;
    let out = lw.lower_call(r, &vals, modules.item(r).span)?;
    let out = match out {
        Val::T(n) => lw.cast(n, Dtype::F32, "result")?,
        Val::Float(f) => lw.constant(Dtype::F32, f, "result")?,
        Val::Int(i) => lw.constant(Dtype::F32, i as f64, "result")?,
        _ => return fail("a schedule gives a number"),
    };
    lw.graph.outputs.push(("out".into(), out));
    Ok(lw.graph)
}

/// `(step - 1) % K == 0` as a bool scalar node (true at step 1, K + 1, ...).
fn every_k(lw: &mut Lowerer, step: NodeId, k: i64, origin: &str) -> R<NodeId> {
    let one = lw.constant(Dtype::I32, 1.0, origin)?;
    let s1 = lw.node(Op::Binary(Bin::Sub), Dtype::I32, vec![], &[step, one], origin)?;
    let kk = lw.constant(Dtype::I32, k.clamp(1, i32::MAX as i64) as f64, origin)?;
    let r = lw.node(Op::Binary(Bin::Rem), Dtype::I32, vec![], &[s1, kk], origin)?;
    let z = lw.constant(Dtype::I32, 0.0, origin)?;
    lw.node(Op::Binary(Bin::Eq), Dtype::Bool, vec![], &[r, z], origin)
}

fn select_init(lw: &mut Lowerer, cond: NodeId, init: NodeId, old: NodeId, origin: &str) -> R<NodeId> {
    let s = lw.graph.node(old).shape.clone();
    let d = lw.graph.node(old).dtype;
    let init = lw.cast(init, d, origin)?;
    let init = lw.broadcast(init, &s, origin)?;
    let c = lw.broadcast(cond, &s, origin)?;
    lw.node(Op::Select, d, s, &[c, init, old], origin)
}

/// The common start of a rule's step graph: inputs `param`, `grad`, `step` (and, for a
/// sparsity rule, the previous `mask`) bound by name, an explicit `param: f32[M, N]`'s
/// dimension names, and the hyperparameters.
fn rule_start<'a>(
    modules: &'a Modules,
    db: &'a SourceDb,
    r: ItemRef,
    param: &(Dtype, Vec<usize>),
    args: &[(String, Arg)],
    with_mask: bool,
) -> R<(Lowerer<'a>, &'a lang::ast::RuleDef, NodeId, NodeId, NodeId)> {
    let ItemKind::Rule(rule) = &modules.item(r).kind else { return fail("not an optimizer or sparsity rule") };
    let mut lw = Lowerer::new(modules, db, &rule.name.name);
    lw.set_module(r.module);
    let p = lw.node(Op::Input { index: 0, name: "param".into() }, param.0, param.1.clone(), &[], "param")?;
    let g = lw.node(Op::Input { index: 1, name: "grad".into() }, param.0, param.1.clone(), &[], "grad")?;
    let step = lw.node(Op::Input { index: 2, name: "step".into() }, Dtype::I32, vec![], &[], "step")?;
    lw.bind("param", Val::T(p));
    lw.bind("grad", Val::T(g));
    lw.bind("step", Val::T(step));
    if with_mask {
        let prev = lw.node(Op::Input { index: 3, name: "mask".into() }, param.0, param.1.clone(), &[], "mask")?;
        lw.bind("mask", Val::T(prev));
    }
    if let Some(pp) = rule.params.iter().find(|x| x.name.name == "param") {
        let mut m = HashMap::new();
        m.insert("param".to_string(), Val::T(p));
        lw.bind_params(std::slice::from_ref(pp), &m)?;
    }
    let params: Vec<Param> = rule.params.iter().filter(|x| x.name.name != "param").cloned().collect();
    let vals = bind_args(&mut lw, &params, args, &[])?;
    lw.bind_params(&params, &vals)?;
    Ok((lw, rule, p, g, step))
}

/// An optimizer step. `param` gives the parameter's dtype and shape; the states' shapes come
/// from their initializers, and the caller reads them off the graph's `state_*` inputs.
pub fn optimizer(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    param: (Dtype, Vec<usize>),
    args: &[(String, Arg)],
) -> R<Graph> {
    optimizer_step(modules, db, r, param, args, false).map(|(g, _)| g)
}

/// [`optimizer`], and the periods `K` of its `state ... every K` initializers. With `steady`,
/// the graph of a step at which no state takes its initial value (a step after the first at
/// which `(step - 1) % K != 0` for every period): the initializers' conditions are `false`,
/// so the initializers (a projection's SVD, say) fold away, and for such steps the graph
/// computes what [`optimizer`]'s does, bit for bit.
pub fn optimizer_step(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    param: (Dtype, Vec<usize>),
    args: &[(String, Arg)],
    steady: bool,
) -> R<(Graph, Vec<u64>)> {
    let (mut lw, rule, _, _, step) = rule_start(modules, db, r, &param, args, false)?;
    let mut periods = vec![];
    // Each state's input takes the shape of its initializer, lowered in order with the
    // statements before it (an initializer may use earlier `let`s).
    let never = if steady { Some(lw.constant(Dtype::Bool, 0.0, "steady step")?) } else { None };
    let first = match never {
        Some(f) => f,
        None => {
            let one = lw.constant(Dtype::I32, 1.0, "step 1")?;
            lw.node(Op::Binary(Bin::Eq), Dtype::Bool, vec![], &[step, one], "step 1")?
        }
    };
    let mut state_inputs: Vec<(String, NodeId)> = vec![];
    for s in &rule.body {
        match &s.kind {
            StmtKind::State { name, init, every } => {
                let iv = lw.expr(init)?;
                let origin = format!("state {}", name.name);
                let iv = lw_tensor(&mut lw, iv, &origin)?;
                let (d, sh) = (lw.graph.node(iv).dtype, lw.graph.node(iv).shape.clone());
                let index = lw.graph.inputs.len();
                let input = lw.node(Op::Input { index, name: format!("state_{}", name.name) }, d, sh, &[], &origin)?;
                let mut cond = first;
                if let Some(k) = every {
                    let Val::Int(k) = lw.expr(k)? else { return fail("`every` needs a constant") };
                    periods.push(k.clamp(1, i32::MAX as i64) as u64);
                    if never.is_none() {
                        let ek = every_k(&mut lw, step, k, &origin)?;
                        cond = lw.node(Op::Binary(Bin::Or), Dtype::Bool, vec![], &[first, ek], &origin)?;
                    }
                }
                let v = select_init(&mut lw, cond, iv, input, &origin)?;
                lw.bind(&name.name, Val::T(v));
                state_inputs.push((name.name.clone(), input));
            }
            _ => lw.stmt(s)?,
        }
    }
    let new_param = match lw_lookup(&lw, "param") {
        Some(Val::T(n)) => n,
        _ => return fail("`param` is not a tensor"),
    };
    let new_param = lw.cast(new_param, param.0, "param")?;
    let new_param = lw.broadcast(new_param, &param.1, "param")?;
    lw.graph.outputs.push(("param".into(), new_param));
    for (name, input) in state_inputs {
        let v = match lw_lookup(&lw, &name) {
            Some(Val::T(n)) => n,
            _ => input,
        };
        let (d, s) = (lw.graph.node(input).dtype, lw.graph.node(input).shape.clone());
        let v = lw.cast(v, d, "state")?;
        let v = lw.broadcast(v, &s, "state")?;
        lw.graph.outputs.push((format!("state_{name}"), v));
    }
    Ok((lw.graph, periods))
}

/// A sparsity rule: inputs `param`, `grad`, `step`, `mask` (the previous mask, used
/// between refreshes); outputs `mask` (f32 multiplier) and `grad`.
pub fn sparsity(
    modules: &Modules,
    db: &SourceDb,
    r: ItemRef,
    param: (Dtype, Vec<usize>),
    args: &[(String, Arg)],
) -> R<Graph> {
    let (mut lw, rule, _, g, step) = rule_start(modules, db, r, &param, args, true)?;
    let Some(Val::T(prev)) = lw.lookup_public("mask") else { return fail("the previous mask is not bound") };
    for s in &rule.body {
        match &s.kind {
            StmtKind::Assign { target, value, every: Some(k) } if target.name == "mask" => {
                let v = lw.expr(value)?;
                let v = lw_tensor(&mut lw, v, "mask")?;
                let v = lw.cast(v, param.0, "mask")?;
                let Val::Int(k) = lw.expr(k)? else { return fail("`every` needs a constant") };
                let cond = every_k(&mut lw, step, k, "mask every")?;
                let v = select_init(&mut lw, cond, v, prev, "mask every")?;
                lw.bind("mask", Val::T(v));
            }
            _ => lw.stmt(s)?,
        }
    }
    let mask = match lw_lookup(&lw, "mask") {
        Some(v) => lw_tensor(&mut lw, v, "mask")?,
        None => prev,
    };
    let mask = lw.cast(mask, param.0, "mask")?;
    let mask = lw.broadcast(mask, &param.1, "mask")?;
    let grad = match lw_lookup(&lw, "grad") {
        Some(v) => lw_tensor(&mut lw, v, "grad")?,
        None => g,
    };
    let grad = lw.cast(grad, param.0, "grad")?;
    let grad = lw.broadcast(grad, &param.1, "grad")?;
    lw.graph.outputs.push(("mask".into(), mask));
    lw.graph.outputs.push(("grad".into(), grad));
    Ok(lw.graph)
}

fn lw_lookup(lw: &Lowerer, name: &str) -> Option<Val> {
    lw.lookup_public(name)
}

fn lw_tensor(lw: &mut Lowerer, v: Val, origin: &str) -> R<NodeId> {
    match v {
        Val::T(n) => Ok(n),
        Val::Float(f) => lw.constant(Dtype::F32, f, origin),
        Val::Int(i) => lw.constant(Dtype::I32, i as f64, origin),
        Val::Bool(b) => lw.constant(Dtype::Bool, b as i32 as f64, origin),
        _ => fail("expected a tensor"),
    }
}

/// A recipe's training step as a graph: inputs `batch.inputs` and `batch.targets`
/// (`i32[batch, context]`) and every model parameter the loss uses (named by path,
/// `model.blocks.0.attn.wq`); outputs `loss` and `grad.<path>` for each parameter.
pub fn recipe_step(modules: &Modules, db: &SourceDb, r: ItemRef) -> R<Graph> {
    let ItemKind::Recipe(rec) = &modules.item(r).kind else { return fail("not a recipe") };
    let mut lw = Lowerer::new(modules, db, &rec.name.name);
    lw.set_module(r.module);
    let field = |name: &str| rec.field(name).cloned();
    let (Some(model), Some(data), Some(loss)) = (field("model"), field("data"), field("loss")) else {
        return fail("a recipe needs `model`, `data` and `loss`");
    };
    let m = lw.expr(&model)?;
    if !matches!(m, Val::Model(_)) {
        return fail("`model` is not a model instance");
    }
    lw.bind_model("model", m);
    // `text(path, context = T, batch = B)`: only the sizes matter to the graph.
    let ExprKind::Call { args, .. } = &data.kind else { return fail("`data` must be `text(...)` or `tokens(...)`") };
    let mut sizes = HashMap::new();
    for (i, a) in args.iter().enumerate() {
        let key = match &a.name {
            Some(n) => n.name.clone(),
            None => ["path", "context", "batch", "split"].get(i).map(|s| s.to_string()).unwrap_or_default(),
        };
        if key == "context" || key == "batch" {
            if let Val::Int(v) = lw.expr(&a.value)? {
                sizes.insert(key, v.max(1) as usize);
            }
        }
    }
    let (Some(&t), Some(&b)) = (sizes.get("context"), sizes.get("batch")) else {
        return fail("`data` needs `context` and `batch`");
    };
    let inputs = lw.node(Op::Input { index: 0, name: "batch.inputs".into() }, Dtype::I32, vec![b, t], &[], "batch")?;
    let targets =
        lw.node(Op::Input { index: 1, name: "batch.targets".into() }, Dtype::I32, vec![b, t], &[], "batch")?;
    lw.bind_model("batch", Val::Batch(inputs, targets));
    lw.bind_recipe_lets(rec)?;
    let value = lw.expr(&loss)?;
    let out = lw_tensor(&mut lw, value, "loss")?;
    if !lw.graph.node(out).shape.is_empty() || !lw.graph.node(out).dtype.is_float() {
        return fail("the recipe's loss is not a floating-point scalar");
    }
    lw.graph.outputs.push(("loss".into(), out));
    let params: Vec<(String, NodeId)> = lw.params.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let ids: Vec<NodeId> = params.iter().map(|p| p.1).collect();
    let grads = crate::autodiff::grad(&mut lw.graph, out, &ids)?;
    for ((name, _), g) in params.iter().zip(grads) {
        lw.graph.outputs.push((format!("grad.{name}"), g));
    }
    Ok(lw.graph)
}
