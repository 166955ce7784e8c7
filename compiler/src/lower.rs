//! Lowering: a checked item plus concrete argument shapes become a graph.
//!
//! Symbolic dimensions are bound from the arguments' shapes (the front end has proved the
//! shapes consistent, so binding is a lookup plus a re-check). Composite built-ins become
//! decompositions over the op set: `logsumexp(x) = m + log(sum(exp(x - m)))` with
//! `m = stop_gradient(max(x))`, `softmax`, `mean`, `sort = gather(x, argsort(x))`, `topk`,
//! `one_hot`. User functions are inlined; `for` loops are unrolled; `if` on a compile-time
//! condition picks a branch, otherwise both branches are computed and selected.

use crate::ir::{Bin, Graph, IrError, NodeId, Op, Red, Un};
use lang::ast::*;
use lang::resolve::Modules;
use lang::source::{FileId, SourceDb};
use lang::types::{Dtype, ItemRef};
use std::collections::HashMap;

/// A failure to lower, with the source position when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct LowerError {
    pub message: String,
    pub at: Option<(FileId, lang::source::Span)>,
    /// True when the supplied arguments are at fault (a missing argument, a wrong dtype or
    /// shape), false when the item uses something that cannot be lowered.
    pub input: bool,
}

impl std::fmt::Display for LowerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<IrError> for LowerError {
    fn from(e: IrError) -> Self {
        LowerError {
            message: format!("this is a bug in recipec (lowering built an invalid node): {}", e.0),
            at: None,
            input: false,
        }
    }
}

type R<T> = Result<T, LowerError>;

/// A value during lowering: a graph node, or a compile-time constant.
#[derive(Clone, Debug)]
pub enum Val {
    T(NodeId),
    /// A compile-time integer (literal, dimension, integer hyperparameter).
    Int(i64),
    /// A weak float literal (takes the other operand's dtype).
    Float(f64),
    Bool(bool),
    Str(String),
    List(Vec<Val>),
    /// A model instance (its parameters become graph inputs named by path on first use).
    Model(std::rc::Rc<ModelVal>),
    /// `sub blocks[l] = ...` or `param w[l]: ...` declared in a `for`: indexed later.
    Array(std::rc::Rc<ModelVal>, String),
    /// A method of a model instance.
    Method(std::rc::Rc<ModelVal>, String),
    /// A recipe's batch: `inputs` and `targets`.
    Batch(NodeId, NodeId),
}

/// A model instance during lowering.
#[derive(Debug)]
pub struct ModelVal {
    pub item: ItemRef,
    /// The value of each model parameter (`D`, `L`, ...).
    pub config: HashMap<String, Val>,
    /// The parameter path of this instance (`blocks.3.mlp`).
    pub prefix: Vec<String>,
    /// The first segment of its parameters' paths: `model`, or `teacher` for a recipe's
    /// frozen teacher.
    pub root: String,
}

impl ModelVal {
    /// The same instance with its parameters named under `root` (`teacher.wte`).
    pub fn rooted(&self, root: &str) -> ModelVal {
        ModelVal { item: self.item, config: self.config.clone(), prefix: self.prefix.clone(), root: root.into() }
    }
}

/// A value supplied for a parameter of the entry point.
#[derive(Clone, Debug)]
pub enum Arg {
    /// A tensor input of this dtype and shape (becomes an `input` node).
    Tensor(Dtype, Vec<usize>),
    /// A scalar hyperparameter given by value (folded into the graph).
    Scalar(f64),
    Str(String),
}

pub struct Lowerer<'a> {
    pub modules: &'a Modules,
    pub db: &'a SourceDb,
    pub graph: Graph,
    scopes: Vec<HashMap<String, Val>>,
    module: usize,
    next_stream: u64,
    depth: usize,
    /// Model parameters used so far, by dotted path (`model.blocks.0.attn.wq`).
    pub params: std::collections::BTreeMap<String, NodeId>,
    /// The models whose methods are being lowered (innermost last).
    models: Vec<std::rc::Rc<ModelVal>>,
    /// The shape a shape-less `zeros()`/`normal(...)` takes (while lowering a `param`
    /// initializer).
    pub(crate) init_shape: Option<Vec<usize>>,
    /// Parameters under a sparsity rule: the forward pass uses `param * mask.<path>`, and
    /// `params` maps the path to that product (gradients are taken with respect to it).
    pub masked: std::collections::BTreeSet<String>,
    /// The paths of the `buffer` members [`Lowerer::initial_values`] met: never trained.
    pub buffers: std::collections::BTreeSet<String>,
}

impl<'a> Lowerer<'a> {
    pub fn new(modules: &'a Modules, db: &'a SourceDb, name: &str) -> Lowerer<'a> {
        Lowerer {
            modules,
            db,
            graph: Graph::new(name),
            scopes: vec![HashMap::new()],
            module: 0,
            next_stream: 0,
            depth: 0,
            params: Default::default(),
            models: vec![],
            init_shape: None,
            masked: Default::default(),
            buffers: Default::default(),
        }
    }

    fn file(&self) -> FileId {
        self.modules.list[self.module].file
    }

    fn origin(&self, span: lang::source::Span) -> String {
        let f = self.db.file(self.file());
        let (l, c) = f.line_col(span.start);
        let name = f.name.rsplit('/').next().unwrap_or(&f.name).to_string();
        format!("{name}:{l}:{c}")
    }

    fn at<T>(&self, span: lang::source::Span, msg: impl Into<String>) -> R<T> {
        Err(LowerError { message: msg.into(), at: Some((self.file(), span)), input: false })
    }

    fn at_input<T>(&self, span: lang::source::Span, msg: impl Into<String>) -> R<T> {
        Err(LowerError { message: msg.into(), at: Some((self.file(), span)), input: true })
    }

    pub fn bind(&mut self, name: &str, v: Val) {
        self.scopes.last_mut().expect("a scope").insert(name.to_string(), v);
    }

    fn lookup(&self, name: &str) -> Option<Val> {
        self.scopes.iter().rev().find_map(|s| s.get(name).cloned())
    }

    fn assign(&mut self, name: &str, v: Val) {
        for s in self.scopes.iter_mut().rev() {
            if s.contains_key(name) {
                s.insert(name.to_string(), v);
                return;
            }
        }
        self.bind(name, v);
    }

    // ------------------------------------------------------------------ node helpers

    pub fn node(&mut self, op: Op, dtype: Dtype, shape: Vec<usize>, operands: &[NodeId], origin: &str) -> R<NodeId> {
        Ok(self.graph.add(op, dtype, shape, operands, origin)?)
    }

    fn dtype(&self, n: NodeId) -> Dtype {
        self.graph.node(n).dtype
    }

    fn shape(&self, n: NodeId) -> Vec<usize> {
        self.graph.node(n).shape.clone()
    }

    pub fn constant(&mut self, dtype: Dtype, v: f64, origin: &str) -> R<NodeId> {
        self.node(Op::Const { value: v }, dtype, vec![], &[], origin)
    }

    pub fn cast(&mut self, n: NodeId, dtype: Dtype, origin: &str) -> R<NodeId> {
        if self.dtype(n) == dtype {
            return Ok(n);
        }
        let s = self.shape(n);
        self.node(Op::Cast, dtype, s, &[n], origin)
    }

    pub fn broadcast(&mut self, n: NodeId, shape: &[usize], origin: &str) -> R<NodeId> {
        if self.shape(n) == shape {
            return Ok(n);
        }
        let d = self.dtype(n);
        self.node(Op::Broadcast, d, shape.to_vec(), &[n], origin)
    }

    pub fn reshape(&mut self, n: NodeId, shape: Vec<usize>, origin: &str) -> R<NodeId> {
        if self.shape(n) == shape {
            return Ok(n);
        }
        let d = self.dtype(n);
        self.node(Op::Reshape, d, shape, &[n], origin)
    }

    fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
        let n = a.len().max(b.len());
        let mut out = vec![0; n];
        for i in 0..n {
            let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            out[i] = if x == y || y == 1 {
                x
            } else if x == 1 {
                y
            } else {
                return None;
            };
        }
        Some(out)
    }

    /// Materializes a value as a node of `dtype` (constants adopt it).
    fn to_node(&mut self, v: &Val, dtype: Dtype, origin: &str, span: lang::source::Span) -> R<NodeId> {
        match v {
            Val::T(n) => self.cast(*n, dtype, origin),
            Val::Int(i) => self.constant(dtype, *i as f64, origin),
            Val::Float(f) => self.constant(dtype, *f, origin),
            Val::Bool(b) => self.constant(dtype, *b as i32 as f64, origin),
            _ => self.at(span, "expected a tensor here"),
        }
    }

    /// The (dtype, weak) of a value, for promotion.
    fn kind(&self, v: &Val) -> Option<(Dtype, bool)> {
        match v {
            Val::T(n) => Some((self.dtype(*n), false)),
            Val::Int(_) => Some((Dtype::I64, true)),
            Val::Float(_) => Some((Dtype::F32, true)),
            Val::Bool(_) => Some((Dtype::Bool, false)),
            _ => None,
        }
    }

    fn promote(a: (Dtype, bool), b: (Dtype, bool)) -> Dtype {
        match (a.1, b.1) {
            (true, true) => Dtype::promote(a.0, b.0),
            (true, false) => {
                if a.0.is_float() && !b.0.is_float() {
                    Dtype::F32
                } else {
                    b.0
                }
            }
            (false, true) => {
                if b.0.is_float() && !a.0.is_float() {
                    Dtype::F32
                } else {
                    a.0
                }
            }
            (false, false) => Dtype::promote(a.0, b.0),
        }
    }

    /// Brings values to one dtype and one broadcast shape.
    fn unify(&mut self, vals: &[Val], dtype: Dtype, origin: &str, span: lang::source::Span) -> R<Vec<NodeId>> {
        let mut nodes = vec![];
        for v in vals {
            nodes.push(self.to_node(v, dtype, origin, span)?);
        }
        let mut shape: Vec<usize> = vec![];
        for n in &nodes {
            let s = self.shape(*n);
            shape = match Self::broadcast_shapes(&shape, &s) {
                Some(x) => x,
                None => return self.at(span, format!("shapes {:?} and {s:?} do not broadcast", shape)),
            };
        }
        let mut out = vec![];
        for n in nodes {
            out.push(self.broadcast(n, &shape, origin)?);
        }
        Ok(out)
    }

    pub fn binary(&mut self, op: BinOp, a: Val, b: Val, span: lang::source::Span) -> R<Val> {
        let origin = self.origin(span);
        // Compile-time arithmetic.
        if let (Val::Int(x), Val::Int(y)) = (&a, &b) {
            let (x, y) = (*x, *y);
            let r = match op {
                BinOp::Add => Some(Val::Int(x.wrapping_add(y))),
                BinOp::Sub => Some(Val::Int(x.wrapping_sub(y))),
                BinOp::Mul => Some(Val::Int(x.wrapping_mul(y))),
                BinOp::Div if y != 0 && x % y == 0 => Some(Val::Int(x / y)),
                BinOp::Div if y != 0 => Some(Val::Float(x as f64 / y as f64)),
                BinOp::Rem if y != 0 => {
                    Some(Val::Int(x.rem_euclid(y) * if y < 0 && x.rem_euclid(y) != 0 { -1 } else { 1 }))
                }
                BinOp::Eq => Some(Val::Bool(x == y)),
                BinOp::Ne => Some(Val::Bool(x != y)),
                BinOp::Lt => Some(Val::Bool(x < y)),
                BinOp::Le => Some(Val::Bool(x <= y)),
                BinOp::Gt => Some(Val::Bool(x > y)),
                BinOp::Ge => Some(Val::Bool(x >= y)),
                _ => None,
            };
            if let Some(r) = r {
                return Ok(r);
            }
        }
        if let (Val::Str(x), Val::Str(y)) = (&a, &b) {
            return match op {
                BinOp::Eq => Ok(Val::Bool(x == y)),
                BinOp::Ne => Ok(Val::Bool(x != y)),
                _ => self.at(span, "strings only compare with `==` and `!=`"),
            };
        }
        if let (Val::Bool(x), Val::Bool(y)) = (&a, &b) {
            match op {
                BinOp::And => return Ok(Val::Bool(*x && *y)),
                BinOp::Or => return Ok(Val::Bool(*x || *y)),
                _ => {}
            }
        }
        if op == BinOp::MatMul {
            return self.matmul(a, b, span);
        }
        let (Some(ka), Some(kb)) = (self.kind(&a), self.kind(&b)) else {
            return self.at(span, "operands must be tensors");
        };
        let mut dtype = Self::promote(ka, kb);
        let bin = match op {
            BinOp::Add => Bin::Add,
            BinOp::Sub => Bin::Sub,
            BinOp::Mul => Bin::Mul,
            BinOp::Div => Bin::Div,
            BinOp::Rem => Bin::Rem,
            BinOp::Pow => Bin::Pow,
            BinOp::Eq => Bin::Eq,
            BinOp::Ne => Bin::Ne,
            BinOp::Lt => Bin::Lt,
            BinOp::Le => Bin::Le,
            BinOp::Gt => Bin::Gt,
            BinOp::Ge => Bin::Ge,
            BinOp::And => Bin::And,
            BinOp::Or => Bin::Or,
            BinOp::MatMul => unreachable!(),
        };
        if bin == Bin::Div && !dtype.is_float() {
            dtype = Dtype::F32;
        }
        if bin == Bin::Pow && !ka.1 && ka.0.is_float() {
            dtype = ka.0;
        }
        let nodes = self.unify(&[a, b], dtype, &origin, span)?;
        let shape = self.shape(nodes[0]);
        let out_dtype = match bin {
            Bin::Eq | Bin::Ne | Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::And | Bin::Or => Dtype::Bool,
            _ => dtype,
        };
        Ok(Val::T(self.node(Op::Binary(bin), out_dtype, shape, &nodes, &origin)?))
    }

    fn elementwise2(&mut self, bin: Bin, a: Val, b: Val, span: lang::source::Span) -> R<Val> {
        let origin = self.origin(span);
        let (Some(ka), Some(kb)) = (self.kind(&a), self.kind(&b)) else {
            return self.at(span, "operands must be tensors");
        };
        let dtype = Self::promote(ka, kb);
        let nodes = self.unify(&[a, b], dtype, &origin, span)?;
        let shape = self.shape(nodes[0]);
        Ok(Val::T(self.node(Op::Binary(bin), dtype, shape, &nodes, &origin)?))
    }

    fn matmul(&mut self, a: Val, b: Val, span: lang::source::Span) -> R<Val> {
        let origin = self.origin(span);
        let (Some(ka), Some(kb)) = (self.kind(&a), self.kind(&b)) else {
            return self.at(span, "`@` needs tensors");
        };
        let dtype = Self::promote(ka, kb);
        let (mut x, mut y) = (self.to_node(&a, dtype, &origin, span)?, self.to_node(&b, dtype, &origin, span)?);
        let (xs, ys) = (self.shape(x), self.shape(y));
        let (x1, y1) = (xs.len() == 1, ys.len() == 1);
        if x1 {
            x = self.reshape(x, vec![1, xs[0]], &origin)?;
        }
        if y1 {
            y = self.reshape(y, vec![ys[0], 1], &origin)?;
        }
        let (xs, ys) = (self.shape(x), self.shape(y));
        let batch = Self::broadcast_shapes(&xs[..xs.len() - 2], &ys[..ys.len() - 2]).ok_or_else(|| LowerError {
            message: "matmul batch axes do not broadcast".into(),
            at: Some((self.file(), span)),
            input: false,
        })?;
        let mut xt = batch.clone();
        xt.extend_from_slice(&xs[xs.len() - 2..]);
        let mut yt = batch.clone();
        yt.extend_from_slice(&ys[ys.len() - 2..]);
        let x = self.broadcast(x, &xt, &origin)?;
        let y = self.broadcast(y, &yt, &origin)?;
        let mut out = batch.clone();
        out.push(xt[xt.len() - 2]);
        out.push(yt[yt.len() - 1]);
        let mut r = self.node(Op::MatMul, dtype, out.clone(), &[x, y], &origin)?;
        let mut fin = batch;
        if !x1 {
            fin.push(out[out.len() - 2]);
        }
        if !y1 {
            fin.push(out[out.len() - 1]);
        }
        r = self.reshape(r, fin, &origin)?;
        Ok(Val::T(r))
    }

    fn unary_op(&mut self, u: Un, v: Val, float: bool, span: lang::source::Span) -> R<Val> {
        let origin = self.origin(span);
        let dtype = match self.kind(&v) {
            Some((d, _)) if float && !d.is_float() => Dtype::F32,
            Some((_, weak)) if weak && float => Dtype::F32,
            Some((d, _)) => d,
            None => return self.at(span, "expected a tensor"),
        };
        let n = self.to_node(&v, dtype, &origin, span)?;
        let s = self.shape(n);
        Ok(Val::T(self.node(Op::Unary(u), dtype, s, &[n], &origin)?))
    }

    fn reduce(&mut self, x: NodeId, op: Red, axes: &[usize], keepdims: bool, origin: &str) -> R<NodeId> {
        let s = self.shape(x);
        let mut axes = axes.to_vec();
        axes.sort();
        axes.dedup();
        let out: Vec<usize> = s.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect();
        let dtype = match op {
            Red::ArgMax | Red::ArgMin => Dtype::I32,
            _ => self.dtype(x),
        };
        let r = self.node(Op::Reduce { op, axes: axes.clone() }, dtype, out, &[x], origin)?;
        if keepdims {
            let kept: Vec<usize> = s.iter().enumerate().map(|(i, d)| if axes.contains(&i) { 1 } else { *d }).collect();
            return self.reshape(r, kept, origin);
        }
        Ok(r)
    }

    // ------------------------------------------------------------------ entry points

    /// Lowers a `fn`, `loss`, `schedule` or `decode` item with the given arguments (by
    /// parameter name; missing ones take their defaults). Returns the value of the body.
    pub fn lower_call(&mut self, r: ItemRef, args: &HashMap<String, Val>, span: lang::source::Span) -> R<Val> {
        self.depth += 1;
        if self.depth > 64 {
            return self.at(span, "functions call each other more than 64 deep (recursion is not supported)");
        }
        let modules = self.modules;
        let item = modules.item(r);
        let ItemKind::Fn(f) = &item.kind else {
            return self
                .at(span, format!("`{}` is not a function", item.name().map(|n| n.name.as_str()).unwrap_or("?")));
        };
        let saved_module = self.module;
        let saved_scopes = std::mem::replace(&mut self.scopes, vec![HashMap::new()]);
        self.module = r.module;
        // `step` of a schedule is inherited from the caller.
        if let Some(step) = saved_scopes.iter().rev().find_map(|s| s.get("step").cloned()) {
            self.bind("step", step);
        }
        let result = (|| {
            self.bind_params(&f.params, args)?;
            self.block(&f.body)
        })();
        self.module = saved_module;
        self.scopes = saved_scopes;
        self.depth -= 1;
        result
    }

    /// Binds parameters from `args` (or defaults) and their dimension symbols.
    pub fn bind_params(&mut self, params: &[Param], args: &HashMap<String, Val>) -> R<()> {
        for p in params {
            let v = match args.get(&p.name.name) {
                Some(v) => v.clone(),
                None => match &p.default {
                    Some(d) => self.expr(d)?,
                    None => return self.at_input(p.span, format!("missing argument `{}`", p.name.name)),
                },
            };
            // Bind dimension names of the declared type from the value's shape.
            if let (Some(dims), Val::T(n)) = (&p.ty.dims, &v) {
                let shape = self.shape(*n);
                if dims.len() != shape.len() {
                    return self
                        .at(p.span, format!("`{}` must have rank {}, got shape {shape:?}", p.name.name, dims.len()));
                }
                for (d, actual) in dims.iter().zip(&shape) {
                    self.bind_dim(d, *actual as i64, &p.name.name)?;
                }
            }
            // Integer scalars are compile-time constants.
            let v = match (&p.ty.dims, Dtype::parse(&p.ty.dtype.name), v) {
                (None, Some(d), Val::Float(x)) if d.is_int() => Val::Int(x as i64),
                (None, Some(d), Val::Float(x)) if d.is_float() => {
                    let o = self.origin(p.span);
                    Val::T(self.constant(d, x, &o)?)
                }
                (None, Some(d), Val::Int(x)) if d.is_float() => {
                    let o = self.origin(p.span);
                    Val::T(self.constant(d, x as f64, &o)?)
                }
                (_, _, v) => v,
            };
            self.bind(&p.name.name, v);
        }
        Ok(())
    }

    fn bind_dim(&mut self, d: &Expr, actual: i64, param: &str) -> R<()> {
        match &d.unparen().kind {
            ExprKind::Name(n) => match self.lookup(n) {
                Some(Val::Int(v)) if v != actual => {
                    self.at_input(d.span, format!("dimension `{n}` is {v}, but `{param}` has {actual} there"))
                }
                Some(_) => Ok(()),
                None => {
                    self.bind(n, Val::Int(actual));
                    Ok(())
                }
            },
            ExprKind::Underscore => Ok(()),
            _ => {
                // An arithmetic dimension: check it once the names it uses are bound.
                if let Ok(Val::Int(v)) = self.expr(d) {
                    if v != actual {
                        return self.at_input(d.span, format!("`{param}` needs {v} here, has {actual}"));
                    }
                }
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------------ statements

    pub fn block(&mut self, b: &Block) -> R<Val> {
        self.scopes.push(HashMap::new());
        let r = (|| {
            self.stmts(&b.stmts)?;
            match &b.value {
                Some(v) => self.expr(v),
                None => self.at(b.span, "the block has no value"),
            }
        })();
        self.scopes.pop();
        r
    }

    pub fn stmts(&mut self, stmts: &[Stmt]) -> R<()> {
        for s in stmts {
            self.stmt(s)?;
        }
        Ok(())
    }

    /// Hook for rule items: `state` and `every` are handled by the entry-point builder.
    pub fn stmt(&mut self, s: &Stmt) -> R<()> {
        match &s.kind {
            StmtKind::Let { name, indices: None, value, .. } => {
                let v = self.expr(value)?;
                self.bind(&name.name, v);
            }
            StmtKind::Let { name, indices: Some(idx), value, .. } => {
                let mut extents = vec![];
                for iv in idx {
                    match self.expr(&iv.extent)? {
                        Val::Int(e) if e >= 0 => extents.push(e as usize),
                        _ => return self.at(iv.extent.span, "an index extent must be a non-negative constant"),
                    }
                }
                let origin = self.origin(s.span);
                self.scopes.push(HashMap::new());
                for (axis, iv) in idx.iter().enumerate() {
                    let n = self.node(Op::Iota { axis }, Dtype::I32, extents.clone(), &[], &origin)?;
                    self.bind(&iv.name.name, Val::T(n));
                }
                let body = self.expr(value);
                self.scopes.pop();
                let body = body?;
                let dtype = self
                    .kind(&body)
                    .map(|k| if k.1 && k.0 == Dtype::I64 { Dtype::I32 } else { k.0 })
                    .unwrap_or(Dtype::F32);
                let n = self.to_node(&body, dtype, &origin, s.span)?;
                let n = self.broadcast(n, &extents, &origin)?;
                self.bind(&name.name, Val::T(n));
            }
            StmtKind::Assign { target, value, every } => {
                if every.is_some() {
                    return self.at(s.span, "`every` is handled by the rule's entry point");
                }
                let v = self.expr(value)?;
                self.assign(&target.name, v);
            }
            StmtKind::State { .. } => return self.at(s.span, "`state` outside an optimizer"),
            StmtKind::For { var, start, end, body } => {
                let (Val::Int(a), Val::Int(b)) = (self.expr(start)?, self.expr(end)?) else {
                    return self.at(s.span, "loop bounds must be constants");
                };
                for i in a..b {
                    self.scopes.push(HashMap::new());
                    self.bind(&var.name, Val::Int(i));
                    let r = self.stmts(body);
                    self.scopes.pop();
                    r?;
                }
            }
            StmtKind::Expr(e) => {
                self.expr(e)?;
            }
            StmtKind::Error => return self.at(s.span, "syntax error"),
        }
        Ok(())
    }

    // ------------------------------------------------------------------ expressions

    pub fn expr(&mut self, e: &Expr) -> R<Val> {
        let origin = self.origin(e.span);
        match &e.kind {
            ExprKind::Int(i) => Ok(Val::Int(*i)),
            ExprKind::Float { value, .. } => Ok(Val::Float(*value)),
            ExprKind::Bool(b) => Ok(Val::Bool(*b)),
            ExprKind::Str(s) => Ok(Val::Str(s.clone())),
            ExprKind::Paren(x) => self.expr(x),
            ExprKind::List(items) => Ok(Val::List(items.iter().map(|x| self.expr(x)).collect::<R<_>>()?)),
            ExprKind::Name(n) => match self.lookup(n) {
                Some(v) => Ok(v),
                None if self.models.last().is_some() && self.member_exists(n) => {
                    let mv = self.models.last().cloned().expect("a model");
                    self.member(&mv, n, e.span)
                }
                None => match n.as_str() {
                    "inf" => Ok(Val::Float(f64::INFINITY)),
                    "pi" => Ok(Val::Float(std::f64::consts::PI)),
                    _ => self.at(e.span, format!("`{n}` has no value here")),
                },
            },
            ExprKind::Unary(UnOp::Neg, x) => match self.expr(x)? {
                Val::Int(i) => Ok(Val::Int(i.wrapping_neg())),
                Val::Float(f) => Ok(Val::Float(-f)),
                v => self.unary_op(Un::Neg, v, false, e.span),
            },
            ExprKind::Unary(UnOp::Not, x) => match self.expr(x)? {
                Val::Bool(b) => Ok(Val::Bool(!b)),
                v => self.unary_op(Un::Not, v, false, e.span),
            },
            ExprKind::Binary(op, a, b) => {
                let (a, b) = (self.expr(a)?, self.expr(b)?);
                self.binary(*op, a, b, e.span)
            }
            ExprKind::Transpose(x) => {
                let v = self.expr(x)?;
                let n = self.tensor(&v, e.span)?;
                let r = self.shape(n).len();
                let mut perm: Vec<usize> = (0..r).collect();
                perm.swap(r - 1, r - 2);
                self.transpose(n, perm, &origin)
            }
            ExprKind::Ternary { cond, then, otherwise } => {
                let c = self.expr(cond)?;
                if let Val::Bool(b) = c {
                    return if b { self.expr(then) } else { self.expr(otherwise) };
                }
                let (a, b) = (self.expr(then)?, self.expr(otherwise)?);
                self.select(c, a, b, e.span)
            }
            ExprKind::If { cond, then, otherwise } => {
                let c = self.expr(cond)?;
                if let Val::Bool(b) = c {
                    return if b { self.block(then) } else { self.block(otherwise) };
                }
                let (a, b) = (self.block(then)?, self.block(otherwise)?);
                self.select(c, a, b, e.span)
            }
            ExprKind::Index { base, indices } => self.index(base, indices, e.span),
            ExprKind::Call { callee, args } => self.call(callee, args, e.span),
            ExprKind::Field { base, name } => match self.expr(base)? {
                Val::Model(mv) => self.member(&mv, &name.name, e.span),
                Val::Batch(inputs, targets) => match name.name.as_str() {
                    "inputs" => Ok(Val::T(inputs)),
                    "targets" => Ok(Val::T(targets)),
                    other => self.at(name.span, format!("a batch has no field `{other}`")),
                },
                _ => self.at(e.span, "only models and batches have fields"),
            },
            ExprKind::Underscore | ExprKind::Error => self.at(e.span, "not a value"),
        }
    }

    fn tensor(&mut self, v: &Val, span: lang::source::Span) -> R<NodeId> {
        let origin = self.origin(span);
        match v {
            Val::T(n) => Ok(*n),
            Val::Int(_) => self.to_node(v, Dtype::I32, &origin, span),
            Val::Float(_) => self.to_node(v, Dtype::F32, &origin, span),
            Val::Bool(_) => self.to_node(v, Dtype::Bool, &origin, span),
            _ => self.at(span, "expected a tensor"),
        }
    }

    fn transpose(&mut self, n: NodeId, perm: Vec<usize>, origin: &str) -> R<Val> {
        let s = self.shape(n);
        let out: Vec<usize> = perm.iter().map(|p| s[*p]).collect();
        let d = self.dtype(n);
        Ok(Val::T(self.node(Op::Transpose { perm }, d, out, &[n], origin)?))
    }

    fn select(&mut self, c: Val, a: Val, b: Val, span: lang::source::Span) -> R<Val> {
        let origin = self.origin(span);
        let (Some(ka), Some(kb)) = (self.kind(&a), self.kind(&b)) else {
            return self.at(span, "branches must be tensors");
        };
        let dtype = Self::promote(ka, kb);
        let cn = self.to_node(&c, Dtype::Bool, &origin, span)?;
        let ab = self.unify(&[a, b], dtype, &origin, span)?;
        let cs = self.shape(cn);
        let s = Self::broadcast_shapes(&cs, &self.shape(ab[0])).ok_or_else(|| LowerError {
            message: "condition shape does not broadcast".into(),
            at: Some((self.file(), span)),
            input: false,
        })?;
        let cn = self.broadcast(cn, &s, &origin)?;
        let x = self.broadcast(ab[0], &s, &origin)?;
        let y = self.broadcast(ab[1], &s, &origin)?;
        Ok(Val::T(self.node(Op::Select, dtype, s, &[cn, x, y], &origin)?))
    }

    fn index(&mut self, base: &Expr, indices: &[IndexArg], span: lang::source::Span) -> R<Val> {
        let origin = self.origin(span);
        let bv = self.expr(base)?;
        if let Val::Array(mv, member) = &bv {
            let [IndexArg::Expr(ie)] = indices else { return self.at(span, "an array member takes one index") };
            let Val::Int(i) = self.expr(ie)? else { return self.at(ie.span, "an array index must be a constant") };
            return self.array_element(mv, member, i, span);
        }
        let mut x = self.tensor(&bv, base.span)?;
        if indices.len() == 1 {
            if let IndexArg::Expr(e) = &indices[0] {
                let iv = self.expr(e)?;
                if let Val::T(ix) = &iv {
                    if !self.shape(*ix).is_empty() {
                        // Gather rows: x[tokens].
                        let xs = self.shape(x);
                        let mut out = self.shape(*ix);
                        out.extend_from_slice(&xs[1..]);
                        let d = self.dtype(x);
                        return Ok(Val::T(self.node(Op::Take { axis: 0 }, d, out, &[x, *ix], &origin)?));
                    }
                }
            }
        }
        // Slices and scalar indices, axis by axis; scalar indices drop their axis afterwards.
        let mut drop = vec![];
        for (axis, ia) in indices.iter().enumerate() {
            let s = self.shape(x);
            let extent = s[axis];
            match ia {
                IndexArg::Slice { start, end, .. } => {
                    let bound = |me: &mut Self, b: &Option<Expr>, default: usize| -> R<usize> {
                        match b {
                            None => Ok(default),
                            Some(e) => match me.expr(e)? {
                                Val::Int(v) if v < 0 => Ok((extent as i64 + v).max(0) as usize),
                                Val::Int(v) => Ok((v as usize).min(extent)),
                                _ => me.at(e.span, "slice bounds must be constants"),
                            },
                        }
                    };
                    let a = bound(self, start, 0)?;
                    let b = bound(self, end, extent)?.max(a);
                    let mut out = s.clone();
                    out[axis] = b - a;
                    let d = self.dtype(x);
                    x = self.node(Op::Slice { axis, start: a }, d, out, &[x], &origin)?;
                }
                IndexArg::Expr(e) => match self.expr(e)? {
                    Val::Int(v) => {
                        let i = if v < 0 { extent as i64 + v } else { v };
                        if i < 0 || i as usize >= extent {
                            return self.at(e.span, format!("index {v} out of range for extent {extent}"));
                        }
                        let mut out = s.clone();
                        out[axis] = 1;
                        let d = self.dtype(x);
                        x = self.node(Op::Slice { axis, start: i as usize }, d, out, &[x], &origin)?;
                        drop.push(axis);
                    }
                    Val::T(ix) => {
                        // A runtime scalar index: take along the axis (drops it).
                        let mut out = s.clone();
                        out.remove(axis);
                        out.insert(axis, 1);
                        let one = self.reshape(ix, vec![1], &origin)?;
                        let d = self.dtype(x);
                        x = self.node(Op::Take { axis }, d, out, &[x, one], &origin)?;
                        drop.push(axis);
                    }
                    _ => return self.at(e.span, "an index must be an integer"),
                },
            }
        }
        if !drop.is_empty() {
            let s = self.shape(x);
            let out: Vec<usize> = s.iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, d)| *d).collect();
            x = self.reshape(x, out, &origin)?;
        }
        Ok(Val::T(x))
    }

    fn call(&mut self, callee: &Expr, args: &[lang::ast::Arg], span: lang::source::Span) -> R<Val> {
        let ExprKind::Name(name) = &callee.kind else {
            // `model.features(x)`, `blocks[l].forward(x)`.
            return match self.expr(callee)? {
                Val::Method(mv, m) => self.call_method(&mv, &m, args, span),
                _ => self.at(callee.span, "not callable"),
            };
        };
        if self.lookup(name).is_none() {
            if let Some(mv) = self.models.last().cloned() {
                if self.member_exists(name) {
                    if let Val::Method(mv, m) = self.member(&mv, name, callee.span)? {
                        return self.call_method(&mv, &m, args, span);
                    }
                }
            }
            if let Some(r) = self.modules.find_item(self.module, name) {
                let modules = self.modules;
                let params: Vec<Param> = match &modules.item(r).kind {
                    ItemKind::Fn(f) => f.params.clone(),
                    ItemKind::Model(m) => m.params.clone(),
                    _ => return self.at(span, format!("`{name}` cannot be called here")),
                };
                let bound = self.bind_call_args(&params, args)?;
                if let ItemKind::Model(_) = &modules.item(r).kind {
                    return self.construct(r, &params, bound, vec![], "model".into());
                }
                return self.lower_call(r, &bound, span);
            }
        }
        crate::builtins::call(self, name, args, span)
    }

    fn bind_call_args(&mut self, params: &[Param], args: &[lang::ast::Arg]) -> R<HashMap<String, Val>> {
        let mut bound = HashMap::new();
        for (i, a) in args.iter().enumerate() {
            let key = match &a.name {
                Some(n) => n.name.clone(),
                None => match params.get(i) {
                    Some(p) => p.name.name.clone(),
                    None => return self.at(a.value.span, "too many arguments"),
                },
            };
            let v = self.expr(&a.value)?;
            bound.insert(key, v);
        }
        Ok(bound)
    }

    /// A model instance: its parameters' values (defaults evaluated in its module).
    fn construct(
        &mut self,
        r: ItemRef,
        params: &[Param],
        mut bound: HashMap<String, Val>,
        prefix: Vec<String>,
        root: String,
    ) -> R<Val> {
        let saved = (self.module, std::mem::replace(&mut self.scopes, vec![HashMap::new()]));
        self.module = r.module;
        let mut config = HashMap::new();
        let result = (|| {
            for p in params {
                let v = match bound.remove(&p.name.name) {
                    Some(v) => v,
                    None => match &p.default {
                        Some(d) => self.expr(d)?,
                        None => return self.at(p.span, format!("missing model argument `{}`", p.name.name)),
                    },
                };
                self.bind(&p.name.name, v.clone());
                config.insert(p.name.name.clone(), v);
            }
            Ok(())
        })();
        self.module = saved.0;
        self.scopes = saved.1;
        result?;
        Ok(Val::Model(std::rc::Rc::new(ModelVal { item: r, config, prefix, root })))
    }

    fn model_def(&self, mv: &ModelVal) -> &'a lang::ast::ModelDef {
        let modules = self.modules;
        match &modules.item(mv.item).kind {
            ItemKind::Model(m) => m,
            _ => unreachable!("a model value refers to a model item"),
        }
    }

    fn member_exists(&self, name: &str) -> bool {
        let Some(mv) = self.models.last() else { return false };
        find_member(&self.model_def(mv).members, name).is_some()
    }

    /// Runs `f` in the model's module with its configuration (and `extra`) in scope.
    fn in_model<T>(&mut self, mv: &ModelVal, extra: &[(String, Val)], f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        let saved = (self.module, std::mem::replace(&mut self.scopes, vec![HashMap::new()]));
        self.module = mv.item.module;
        for (k, v) in &mv.config {
            self.bind(k, v.clone());
        }
        for (k, v) in extra {
            self.bind(k, v.clone());
        }
        let r = f(self);
        self.module = saved.0;
        self.scopes = saved.1;
        r
    }

    fn param_input(
        &mut self,
        mv: &ModelVal,
        name: &str,
        index: Option<i64>,
        ty: &TypeExpr,
        extra: &[(String, Val)],
        span: lang::source::Span,
    ) -> R<Val> {
        let mut path: Vec<String> = vec![mv.root.clone()];
        path.extend(mv.prefix.iter().cloned());
        path.push(name.to_string());
        if let Some(i) = index {
            path.push(i.to_string());
        }
        let key = path.join(".");
        if let Some(n) = self.params.get(&key) {
            return Ok(Val::T(*n));
        }
        let dtype = Dtype::parse(&ty.dtype.name).unwrap_or(Dtype::F32);
        let dims = ty.dims.clone().unwrap_or_default();
        let shape = self.in_model(mv, extra, |me| me.param_dims(&dims))?;
        let index = self.graph.inputs.len();
        let origin = self.origin(span);
        let n = self.node(Op::Input { index, name: key.clone() }, dtype, shape.clone(), &[], &origin)?;
        let n = if self.masked.contains(&key) {
            let index = self.graph.inputs.len();
            let m = self.node(Op::Input { index, name: format!("mask.{key}") }, dtype, shape.clone(), &[], &origin)?;
            self.node(Op::Binary(Bin::Mul), dtype, shape, &[n, m], &origin)?
        } else {
            n
        };
        self.params.insert(key, n);
        Ok(Val::T(n))
    }

    /// A parameter's declared dimensions, evaluated in the model's scope.
    fn param_dims(&mut self, dims: &[Expr]) -> R<Vec<usize>> {
        let mut shape = vec![];
        for d in dims {
            match self.expr(d)? {
                Val::Int(v) if v >= 0 => shape.push(v as usize),
                _ => return self.at(d.span, "a parameter's dimensions must be non-negative constants"),
            }
        }
        Ok(shape)
    }

    /// The value of member `name` of a model instance.
    fn member(&mut self, mv: &std::rc::Rc<ModelVal>, name: &str, span: lang::source::Span) -> R<Val> {
        let def = self.model_def(mv);
        let Some((m, in_loop)) = find_member(&def.members, name) else {
            return self.at(span, format!("the model has no member `{name}`"));
        };
        match &m.kind {
            MemberKind::Param { .. } | MemberKind::Sub { .. } if in_loop.is_some() => {
                Ok(Val::Array(mv.clone(), name.to_string()))
            }
            MemberKind::Param { name: n, ty, .. } => self.param_input(mv, &n.name, None, ty, &[], m.span),
            MemberKind::Sub { name: n, value, .. } => self.sub_instance(mv, &n.name, value, None, &[]),
            MemberKind::Fn(_) => Ok(Val::Method(mv.clone(), name.to_string())),
            _ => self.at(span, format!("`{name}` is not a value")),
        }
    }

    fn sub_instance(
        &mut self,
        mv: &ModelVal,
        name: &str,
        value: &Expr,
        index: Option<i64>,
        extra: &[(String, Val)],
    ) -> R<Val> {
        let ExprKind::Call { callee, args } = &value.kind else {
            return self.at(value.span, "a `sub` is a model call");
        };
        let ExprKind::Name(model_name) = &callee.kind else { return self.at(value.span, "a `sub` is a model call") };
        let modules = self.modules;
        let Some(r) = modules.find_item(mv.item.module, model_name) else {
            return self.at(value.span, "unknown model");
        };
        let ItemKind::Model(sub) = &modules.item(r).kind else { return self.at(value.span, "not a model") };
        let bound = self.in_model(mv, extra, |me| me.bind_call_args(&sub.params, args))?;
        let mut prefix = mv.prefix.clone();
        prefix.push(name.to_string());
        if let Some(i) = index {
            prefix.push(i.to_string());
        }
        self.construct(r, &sub.params, bound, prefix, mv.root.clone())
    }

    fn array_element(&mut self, mv: &std::rc::Rc<ModelVal>, member: &str, i: i64, span: lang::source::Span) -> R<Val> {
        let def = self.model_def(mv);
        let Some((m, Some(var))) = find_member(&def.members, member) else {
            return self.at(span, format!("`{member}` is not an array"));
        };
        let extra = vec![(var.clone(), Val::Int(i))];
        match &m.kind {
            MemberKind::Param { name, ty, .. } => self.param_input(mv, &name.name, Some(i), ty, &extra, m.span),
            MemberKind::Sub { name, value, .. } => self.sub_instance(mv, &name.name, value, Some(i), &extra),
            _ => self.at(span, "not an array member"),
        }
    }

    fn call_method(
        &mut self,
        mv: &std::rc::Rc<ModelVal>,
        name: &str,
        args: &[lang::ast::Arg],
        span: lang::source::Span,
    ) -> R<Val> {
        let def = self.model_def(mv);
        let Some((m, _)) = find_member(&def.members, name) else { return self.at(span, format!("no method `{name}`")) };
        let MemberKind::Fn(f) = &m.kind else { return self.at(span, format!("`{name}` is not a method")) };
        let bound = self.bind_call_args(&f.params, args)?;
        self.depth += 1;
        if self.depth > 64 {
            return self.at(span, "methods call each other more than 64 deep");
        }
        self.models.push(mv.clone());
        let r = self.in_model(mv, &[], |me| {
            me.bind_params(&f.params, &bound)?;
            me.block(&f.body)
        });
        self.models.pop();
        self.depth -= 1;
        r
    }

    // Accessors for the built-in lowering module.
    pub(crate) fn origin_of(&self, span: lang::source::Span) -> String {
        self.origin(span)
    }
    pub(crate) fn fail<T>(&self, span: lang::source::Span, msg: impl Into<String>) -> R<T> {
        self.at(span, msg)
    }
    pub(crate) fn as_tensor(&mut self, v: &Val, span: lang::source::Span) -> R<NodeId> {
        self.tensor(v, span)
    }
    pub(crate) fn shape_of(&self, n: NodeId) -> Vec<usize> {
        self.shape(n)
    }
    pub(crate) fn dtype_of(&self, n: NodeId) -> Dtype {
        self.dtype(n)
    }
    pub(crate) fn reduce_node(
        &mut self,
        x: NodeId,
        op: Red,
        axes: &[usize],
        keepdims: bool,
        origin: &str,
    ) -> R<NodeId> {
        self.reduce(x, op, axes, keepdims, origin)
    }
    pub(crate) fn unary_val(&mut self, u: Un, v: Val, float: bool, span: lang::source::Span) -> R<Val> {
        self.unary_op(u, v, float, span)
    }
    pub(crate) fn elementwise(&mut self, b: Bin, x: Val, y: Val, span: lang::source::Span) -> R<Val> {
        self.elementwise2(b, x, y, span)
    }
    pub(crate) fn select_val(&mut self, c: Val, a: Val, b: Val, span: lang::source::Span) -> R<Val> {
        self.select(c, a, b, span)
    }
    pub(crate) fn transpose_val(&mut self, n: NodeId, perm: Vec<usize>, origin: &str) -> R<Val> {
        self.transpose(n, perm, origin)
    }
    pub(crate) fn node_of(&mut self, v: &Val, dtype: Dtype, origin: &str, span: lang::source::Span) -> R<NodeId> {
        self.to_node(v, dtype, origin, span)
    }
    /// Every parameter of a model instance and its sub-models, in declaration order, with the
    /// value of its initializer (`normal(std = 0.02)` takes the parameter's shape):
    /// `(path, node)`, paths as in [`Lowerer::params`].
    pub fn initial_values(&mut self, mv: &std::rc::Rc<ModelVal>) -> R<Vec<(String, NodeId)>> {
        let mut out = vec![];
        let def = self.model_def(mv);
        self.init_members(mv, &def.members, &[], &mut out)?;
        Ok(out)
    }

    fn init_members(
        &mut self,
        mv: &std::rc::Rc<ModelVal>,
        members: &'a [Member],
        extra: &[(String, Val)],
        out: &mut Vec<(String, NodeId)>,
    ) -> R<()> {
        // The model's `let`s join the bindings of the initializers after them.
        let mut bindings = extra.to_vec();
        let extra = &mut bindings;
        for m in members {
            match &m.kind {
                MemberKind::Let { name, value } => {
                    let v = self.in_model(mv, extra, |me| me.expr(value))?;
                    extra.push((name.name.clone(), v));
                }
                MemberKind::Param { name, index, ty, init, buffer } => {
                    let i = match index {
                        Some(e) => match self.in_model(mv, extra, |me| me.expr(e))? {
                            Val::Int(i) => Some(i),
                            _ => return self.at(e.span, "a parameter index must be a constant integer"),
                        },
                        None => None,
                    };
                    let mut path: Vec<String> = vec![mv.root.clone()];
                    path.extend(mv.prefix.iter().cloned());
                    path.push(name.name.clone());
                    if let Some(i) = i {
                        path.push(i.to_string());
                    }
                    let dtype = Dtype::parse(&ty.dtype.name).unwrap_or(Dtype::F32);
                    let dims = ty.dims.clone().unwrap_or_default();
                    let origin = self.origin(m.span);
                    let value = self.in_model(mv, extra, |me| {
                        let shape = me.param_dims(&dims)?;
                        let saved = me.init_shape.replace(shape.clone());
                        let v = me.expr(init);
                        me.init_shape = saved;
                        let n = me.to_node(&v?, dtype, &origin, init.span)?;
                        let n = me.cast(n, dtype, &origin)?;
                        if me.shape(n).len() > shape.len() {
                            return me.at(init.span, "the initializer's shape does not fit the parameter");
                        }
                        me.broadcast(n, &shape, &origin)
                    })?;
                    if *buffer {
                        self.buffers.insert(path.join("."));
                    }
                    out.push((path.join("."), value));
                }
                MemberKind::Sub { name, index, value } => {
                    let i = match index {
                        Some(e) => match self.in_model(mv, extra, |me| me.expr(e))? {
                            Val::Int(i) => Some(i),
                            _ => return self.at(e.span, "a sub-model index must be a constant integer"),
                        },
                        None => None,
                    };
                    let Val::Model(sub) = self.sub_instance(mv, &name.name, value, i, extra)? else {
                        return self.at(value.span, "a `sub` is a model call");
                    };
                    self.initial_values_into(&sub, out)?;
                }
                MemberKind::For { var, start, end, members } => {
                    let (a, b) = self.in_model(mv, extra, |me| Ok((me.expr(start)?, me.expr(end)?)))?;
                    let (Val::Int(a), Val::Int(b)) = (a, b) else {
                        return self.at(m.span, "a `for` range must be constant integers");
                    };
                    for i in a..b {
                        let mut inner = extra.to_vec();
                        inner.push((var.name.clone(), Val::Int(i)));
                        self.init_members(mv, members, &inner, out)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn initial_values_into(&mut self, mv: &std::rc::Rc<ModelVal>, out: &mut Vec<(String, NodeId)>) -> R<()> {
        let def = self.model_def(mv);
        self.init_members(mv, &def.members, &[], out)
    }

    pub(crate) fn stream(&mut self) -> u64 {
        self.next_stream += 1;
        self.next_stream
    }
    /// Lowers an expression in the scope of a model instance (for recipes: `model`).
    pub fn bind_model(&mut self, name: &str, v: Val) {
        self.bind(name, v);
    }

    /// Lowers a recipe's `let` members in order and binds them (the scope of its `loss`).
    pub fn bind_recipe_lets(&mut self, rec: &RecipeDef) -> R<()> {
        for m in &rec.members {
            if let RecipeMemberKind::Let { name, value } = &m.kind {
                let v = self.expr(value)?;
                self.bind(&name.name, v);
            }
        }
        Ok(())
    }

    pub fn lookup_public(&self, name: &str) -> Option<Val> {
        self.lookup(name)
    }
    pub(crate) fn set_module(&mut self, m: usize) {
        self.module = m;
    }
}

/// A member of a model by name, and the loop variable when it is declared inside a `for`.
fn find_member<'m>(members: &'m [Member], name: &str) -> Option<(&'m Member, Option<String>)> {
    for m in members {
        match &m.kind {
            MemberKind::Param { name: n, .. } | MemberKind::Sub { name: n, .. } if n.name == name => {
                return Some((m, None))
            }
            MemberKind::Fn(f) if f.name.name == name => return Some((m, None)),
            MemberKind::For { var, members, .. } => {
                if let Some((found, _)) = find_member(members, name) {
                    return Some((found, Some(var.name.clone())));
                }
            }
            _ => {}
        }
    }
    None
}
