//! Built-in functions and operators: their signatures and shape rules.
//!
//! Each built-in is a name, its parameter names (positional order; `?` marks optional) and a
//! rule computing the result type from the argument types. The language reference lists
//! them (docs/language.md, "Built-ins"); a test keeps that list and [`BUILTINS`] in sync.

use crate::ast::{Arg, BinOp, Expr, ExprKind, IndexArg, UnOp};
use crate::check::{ArgVal, Checker};
use crate::source::Span;
use crate::types::*;

/// `(name, parameters, one-line doc)`; a parameter ending in `?` is optional.
pub static BUILTINS: &[(&str, &[&str], &str)] = &[
    // Elementwise, floating point.
    ("exp", &["x"], "eˣ"),
    ("log", &["x"], "natural logarithm"),
    ("log1p", &["x"], "log(1 + x)"),
    ("sqrt", &["x"], "square root"),
    ("rsqrt", &["x"], "1/√x"),
    ("tanh", &["x"], "hyperbolic tangent"),
    ("sigmoid", &["x"], "1/(1 + e⁻ˣ)"),
    ("softplus", &["x"], "log(1 + eˣ)"),
    ("gelu", &["x"], "x·Φ(x), the exact erf form"),
    ("gelu_tanh", &["x"], "the tanh approximation of GELU"),
    ("silu", &["x"], "x·sigmoid(x)"),
    ("erf", &["x"], "the error function"),
    ("cos", &["x"], "cosine"),
    ("sin", &["x"], "sine"),
    // Elementwise, any number.
    ("abs", &["x"], "|x|"),
    ("sign", &["x"], "-1, 0 or 1"),
    ("relu", &["x"], "max(x, 0)"),
    ("floor", &["x"], "round down"),
    ("ceil", &["x"], "round up"),
    ("round", &["x"], "round half to even"),
    ("stop_gradient", &["x"], "x, with a zero gradient"),
    ("pow", &["x", "y"], "xʸ, like `x ^ y`"),
    ("where", &["cond", "x", "y"], "x where cond, else y (broadcasting)"),
    ("min", &["x", "y?", "axis?", "keepdims?"], "elementwise min of two values, or a reduction of one"),
    ("max", &["x", "y?", "axis?", "keepdims?"], "elementwise max of two values, or a reduction of one"),
    // Casts.
    ("f32", &["x"], "cast to f32"),
    ("f16", &["x"], "cast to f16"),
    ("bf16", &["x"], "cast to bf16"),
    ("f64", &["x"], "cast to f64"),
    ("i32", &["x"], "cast to i32 (truncating)"),
    ("i64", &["x"], "cast to i64 (truncating)"),
    ("bool", &["x"], "cast to bool (x != 0)"),
    ("cast", &["x", "dtype"], "cast to the dtype named by a string"),
    // Reductions.
    ("sum", &["x", "axis?", "keepdims?"], "sum over all axes or `axis`"),
    ("mean", &["x", "axis?", "keepdims?"], "mean over all axes or `axis`"),
    ("prod", &["x", "axis?", "keepdims?"], "product over all axes or `axis`"),
    ("logsumexp", &["x", "axis?", "keepdims?"], "log Σ eˣ, computed stably"),
    ("norm", &["x", "axis?", "keepdims?"], "Euclidean norm √Σx²"),
    ("argmax", &["x", "axis?", "keepdims?"], "index of the largest value (i32)"),
    ("argmin", &["x", "axis?", "keepdims?"], "index of the smallest value (i32)"),
    ("quantile", &["x", "q"], "the q-quantile over all elements (linear interpolation)"),
    ("softmax", &["x", "axis?"], "exp(x − lse(x)) along `axis` (default -1)"),
    ("log_softmax", &["x", "axis?"], "x − lse(x) along `axis` (default -1)"),
    // Indexing.
    ("gather", &["x", "indices", "axis?"], "pick along `axis`: one element per row, or take_along_axis"),
    ("scatter_add", &["x", "indices", "values", "axis?"], "add `values` into `x` at `indices` along `axis`"),
    ("one_hot", &["indices", "n", "dtype?"], "one-hot vectors of length n (f32 by default)"),
    ("sort", &["x", "axis?", "descending?"], "sorted values along `axis`"),
    ("argsort", &["x", "axis?", "descending?"], "indices that sort `x` along `axis` (i32)"),
    ("cumsum", &["x", "axis?"], "running sum along `axis`"),
    ("topk", &["x", "k", "axis?"], "the k largest values along `axis`, descending"),
    ("keep_top", &["x", "n", "m", "axis?"], "bool mask keeping the n largest in each group of m along `axis`"),
    // Shapes.
    ("reshape", &["x", "shape"], "same elements, new shape (one entry may be -1)"),
    ("flatten", &["x"], "reshape to one axis"),
    ("transpose", &["x", "axes?"], "permute axes (default: reverse them)"),
    ("broadcast", &["x", "shape"], "broadcast to a shape"),
    ("expand_dims", &["x", "axis"], "insert an axis of size 1"),
    ("concat", &["xs", "axis?"], "join a list of tensors along `axis`"),
    ("slice", &["x", "start", "end", "axis?"], "x[start:end] along `axis`"),
    // Creation.
    ("zeros", &["shape?", "dtype?"], "a tensor of zeros (shape optional in `param` initializers)"),
    ("ones", &["shape?", "dtype?"], "a tensor of ones (shape optional in `param` initializers)"),
    ("full", &["shape?", "value?", "dtype?"], "a tensor filled with `value`"),
    ("zeros_like", &["x"], "zeros of x's shape and dtype"),
    ("ones_like", &["x"], "ones of x's shape and dtype"),
    ("iota", &["n", "dtype?"], "0, 1, …, n − 1 (i32 by default)"),
    // Randomness (counter-based, seeded: reproducible).
    ("uniform", &["shape?", "low?", "high?"], "uniform samples in [low, high)"),
    ("normal", &["shape?", "mean?", "std?"], "normal samples"),
    ("sample", &["weights", "axis?"], "a categorical sample ∝ weights along `axis` (i32)"),
    // Linear algebra (runtime-provided).
    ("qr", &["x"], "Q of the reduced QR decomposition of a tall matrix [m, n]: [m, n]"),
    ("solve", &["a", "b"], "X with a @ X = b for a square matrix a [n, n] and b [n, k]: [n, k] (differentiable)"),
    (
        "svd_topk",
        &["x", "k", "side?"],
        "top-k singular vectors: side \"right\" gives Vᵀ[:k] [k, n], \"left\" U[:, :k] [m, k]",
    ),
    // Data sources (recipes).
    (
        "text",
        &["path", "context", "batch", "split?"],
        "byte-level tokens of a text file; \"embedded:kjv\" is the built-in corpus",
    ),
    ("tokens", &["path", "context", "batch", "split?"], "tokens from a .npy array of integers"),
];

/// Built-in constants.
pub fn constant(name: &str) -> Option<Ty> {
    match name {
        "inf" | "pi" => Some(Ty::weak_float()),
        _ => None,
    }
}

pub fn is_builtin(name: &str) -> bool {
    BUILTINS.iter().any(|b| b.0 == name)
}

pub fn canonical(name: &str) -> &'static str {
    BUILTINS.iter().find(|b| b.0 == name).map(|b| b.0).unwrap_or("?")
}

pub fn names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = BUILTINS.iter().map(|b| b.0).collect();
    v.extend(["inf", "pi"]);
    v
}

pub fn signature_text(name: &str) -> Option<String> {
    BUILTINS.iter().find(|b| b.0 == name).map(|(n, ps, doc)| {
        let params: Vec<String> = ps
            .iter()
            .map(|p| if let Some(q) = p.strip_suffix('?') { format!("{q} = …") } else { p.to_string() })
            .collect();
        format!("{n}({}) — {doc}", params.join(", "))
    })
}

// ---------------------------------------------------------------------- helpers

fn shape_str(s: &Shape) -> String {
    s.to_string()
}

/// NumPy broadcasting of two shapes, unifying variables where needed.
pub(crate) fn broadcast(c: &mut Checker, a: &Shape, b: &Shape) -> Result<Shape, String> {
    let a = c.resolve_shape(a);
    let b = c.resolve_shape(b);
    match (&a, &b) {
        (Shape::Param, Shape::Param) => return Ok(Shape::Param),
        (Shape::Param, Shape::Dims(d)) | (Shape::Dims(d), Shape::Param) => {
            if d.is_empty() {
                return Ok(Shape::Param);
            }
            return Err(format!("cannot broadcast the parameter's shape with {}", Shape::Dims(d.clone())));
        }
        _ => {}
    }
    let (Shape::Dims(x), Shape::Dims(y)) = (&a, &b) else { unreachable!() };
    let n = x.len().max(y.len());
    let mut out = vec![Dim::constant(0); n];
    for i in 0..n {
        let dx = if i + x.len() >= n { Some(&x[i + x.len() - n]) } else { None };
        let dy = if i + y.len() >= n { Some(&y[i + y.len() - n]) } else { None };
        out[i] = match (dx, dy) {
            (Some(p), None) => p.clone(),
            (None, Some(q)) => q.clone(),
            (Some(p), Some(q)) => {
                let one = Dim::constant(1);
                if *p == *q {
                    p.clone()
                } else if *p == one {
                    q.clone()
                } else if *q == one {
                    p.clone()
                } else if c.unify(p, q) && (p.has_vars() || q.has_vars()) {
                    c.resolve_dim(p)
                } else {
                    return Err(format!(
                        "shapes {} and {} cannot be broadcast together: `{p}` against `{q}`",
                        shape_str(&a),
                        shape_str(&b)
                    ));
                }
            }
            (None, None) => unreachable!(),
        };
    }
    Ok(Shape::Dims(out))
}

/// The dtype of a binary arithmetic result under JAX's weak-type promotion.
fn promote(a: &TensorTy, b: &TensorTy) -> (Dtype, bool) {
    match (a.weak, b.weak) {
        (true, true) => (Dtype::promote(a.dtype, b.dtype), true),
        (true, false) => {
            if a.dtype.is_float() && !b.dtype.is_float() {
                (Dtype::F32, false)
            } else {
                (b.dtype, false)
            }
        }
        (false, true) => {
            if b.dtype.is_float() && !a.dtype.is_float() {
                (Dtype::F32, false)
            } else {
                (a.dtype, false)
            }
        }
        (false, false) => (Dtype::promote(a.dtype, b.dtype), false),
    }
}

fn tensor_or_error(c: &mut Checker, t: &Ty, span: Span, what: &str) -> Option<TensorTy> {
    match t {
        Ty::Unknown => None,
        _ => match t.as_tensor() {
            Some(tt) => Some(tt),
            None => {
                c.error(
                    "E0318",
                    span,
                    format!("{what} needs a tensor, found {}", t.describe()),
                    format!("this is {}", t.describe()),
                );
                None
            }
        },
    }
}

pub(crate) fn unary(c: &mut Checker, op: UnOp, t: Ty, span: Span) -> Ty {
    if let (UnOp::Neg, Ty::Dim(d)) = (op, &t) {
        return Ty::Dim(d.neg());
    }
    let Some(tt) = tensor_or_error(c, &t, span, if op == UnOp::Neg { "`-`" } else { "`!`" }) else {
        return Ty::Unknown;
    };
    match op {
        UnOp::Neg if tt.dtype == Dtype::Bool => {
            c.error("E0318", span, "cannot negate a `bool`".into(), "use `!` for logical not");
            Ty::Unknown
        }
        UnOp::Not if tt.dtype != Dtype::Bool => {
            c.error("E0311", span, format!("`!` needs a `bool`, found `{tt}`"), "not a boolean").help =
                Some("compare first, e.g. `!(x > 0.0)`".into());
            Ty::Unknown
        }
        _ => Ty::Tensor(tt),
    }
}

pub(crate) fn binary(c: &mut Checker, op: BinOp, a: Ty, b: Ty, sa: Span, sb: Span, span: Span) -> Ty {
    if a.is_unknown() || b.is_unknown() {
        return Ty::Unknown;
    }
    // Compile-time integer arithmetic stays compile-time.
    if let (Ty::Dim(x), Ty::Dim(y)) = (&a, &b) {
        match op {
            BinOp::Add => return Ty::Dim(x.add(y)),
            BinOp::Sub => return Ty::Dim(x.sub(y)),
            BinOp::Mul => return Ty::Dim(x.mul(y)),
            BinOp::Div => return Ty::Dim(x.div(y)),
            BinOp::Rem => return Ty::Dim(x.rem(y)),
            _ => {}
        }
    }
    if let (Ty::Str(_), Ty::Str(_)) = (&a, &b) {
        if matches!(op, BinOp::Eq | BinOp::Ne) {
            return Ty::scalar(Dtype::Bool);
        }
    }
    let Some(ta) = tensor_or_error(c, &a, sa, &format!("`{}`", op.symbol())) else { return Ty::Unknown };
    let Some(tb) = tensor_or_error(c, &b, sb, &format!("`{}`", op.symbol())) else { return Ty::Unknown };
    if op == BinOp::MatMul {
        return matmul(c, &ta, &tb, sa, sb, span);
    }
    let shape = match broadcast(c, &ta.shape, &tb.shape) {
        Ok(s) => s,
        Err(msg) => {
            c.error("E0302", span, format!("`{}`: {msg}", op.symbol()), format!("{ta} {} {tb}", op.symbol())).help =
                Some("make the shapes agree: transpose, reshape, index, or add an axis with `expand_dims`".into());
            c.add_origins(&[&ta.shape, &tb.shape]);
            return Ty::Unknown;
        }
    };
    let (dtype, weak) = promote(&ta, &tb);
    match op {
        BinOp::And | BinOp::Or => {
            if ta.dtype != Dtype::Bool || tb.dtype != Dtype::Bool {
                let (bad, s) = if ta.dtype != Dtype::Bool { (&ta, sa) } else { (&tb, sb) };
                c.error("E0311", s, format!("`{}` needs `bool` operands, found `{bad}`", op.symbol()), "not a boolean");
                return Ty::Unknown;
            }
            Ty::Tensor(TensorTy { dtype: Dtype::Bool, shape, weak: false })
        }
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            Ty::Tensor(TensorTy { dtype: Dtype::Bool, shape, weak: false })
        }
        _ => {
            if ta.dtype == Dtype::Bool || tb.dtype == Dtype::Bool {
                let s = if ta.dtype == Dtype::Bool { sa } else { sb };
                c.error("E0318", s, format!("`{}` does not apply to `bool` values", op.symbol()), "a boolean").help =
                    Some("convert first, for example `f32(mask)`".into());
                return Ty::Unknown;
            }
            let dtype = if op == BinOp::Div && !dtype.is_float() {
                // True division, as in Python and JAX.
                Dtype::F32
            } else if op == BinOp::Pow && !ta.weak && tb.dtype.is_int() {
                ta.dtype
            } else {
                dtype
            };
            Ty::Tensor(TensorTy { dtype, shape, weak: weak && op != BinOp::Div })
        }
    }
}

fn matmul(c: &mut Checker, a: &TensorTy, b: &TensorTy, sa: Span, sb: Span, span: Span) -> Ty {
    let (Shape::Dims(x), Shape::Dims(y)) = (c.resolve_shape(&a.shape), c.resolve_shape(&b.shape)) else {
        c.error("E0303", span, "`@` needs operands of known rank".into(), "a parameter of unknown shape").help =
            Some("declare `param: f32[M, N]` in the optimizer's parameters".into());
        return Ty::Unknown;
    };
    if x.is_empty() || y.is_empty() {
        let s = if x.is_empty() { sa } else { sb };
        c.error("E0304", s, "`@` needs operands with at least one axis".into(), "a scalar").help =
            Some("use `*` to scale".into());
        return Ty::Unknown;
    }
    let (xv, x1) = if x.len() == 1 { (vec![Dim::constant(1), x[0].clone()], true) } else { (x.clone(), false) };
    let (yv, y1) = if y.len() == 1 { (vec![y[0].clone(), Dim::constant(1)], true) } else { (y.clone(), false) };
    let k1 = &xv[xv.len() - 1];
    let k2 = &yv[yv.len() - 2];
    if !c.unify(k1, k2) {
        let (k1, k2) = (c.resolve_dim(k1), c.resolve_dim(k2));
        c.error(
            "E0303",
            span,
            format!(
                "`@` contracts `{k1}` with `{k2}`: {} @ {}",
                TensorTy::new(a.dtype, Shape::Dims(x.clone())),
                TensorTy::new(b.dtype, Shape::Dims(y.clone()))
            ),
            format!("`{k1}` ≠ `{k2}`"),
        )
        .help = Some(
            "the last axis of the left operand must equal the second-to-last of the right; transpose one with `^T`"
                .into(),
        );
        c.add_origins(&[&a.shape, &b.shape]);
        return Ty::Unknown;
    }
    let bx = Shape::Dims(xv[..xv.len() - 2].to_vec());
    let by = Shape::Dims(yv[..yv.len() - 2].to_vec());
    let batch = match broadcast(c, &bx, &by) {
        Ok(Shape::Dims(d)) => d,
        Ok(Shape::Param) => vec![],
        Err(msg) => {
            c.error("E0303", span, format!("`@` batch axes: {msg}"), "batch axes do not broadcast");
            return Ty::Unknown;
        }
    };
    let mut out = batch;
    if !x1 {
        out.push(xv[xv.len() - 2].clone());
    }
    if !y1 {
        out.push(yv[yv.len() - 1].clone());
    }
    let (dtype, _) = promote(a, b);
    Ty::tensor(dtype, out)
}

pub(crate) fn transpose_last_two(c: &mut Checker, t: Ty, span: Span) -> Ty {
    let Some(tt) = tensor_or_error(c, &t, span, "`^T`") else { return Ty::Unknown };
    match &tt.shape {
        Shape::Dims(d) if d.len() >= 2 => {
            let mut d = d.clone();
            let n = d.len();
            d.swap(n - 1, n - 2);
            Ty::Tensor(TensorTy { shape: Shape::Dims(d), ..tt })
        }
        _ => {
            c.error(
                "E0304",
                span,
                format!("`^T` transposes the last two axes; `{tt}` has fewer than two"),
                "needs rank ≥ 2",
            );
            Ty::Unknown
        }
    }
}

/// The type of `if`/`? :`/`where` branches: promoted dtype, broadcast shape.
pub(crate) fn join(c: &mut Checker, a: Ty, b: Ty, sa: Span, sb: Span) -> Ty {
    if a.is_unknown() || b.is_unknown() {
        return Ty::Unknown;
    }
    if let (Ty::Dim(x), Ty::Dim(y)) = (&a, &b) {
        if x == y {
            return a;
        }
    }
    if let (Ty::Str(_), Ty::Str(_)) = (&a, &b) {
        return Ty::Str(None);
    }
    let Some(ta) = tensor_or_error(c, &a, sa, "a branch") else { return Ty::Unknown };
    let Some(tb) = tensor_or_error(c, &b, sb, "a branch") else { return Ty::Unknown };
    if ta.dtype != tb.dtype && !ta.weak && !tb.weak && !(ta.dtype.is_float() && tb.dtype.is_float()) {
        c.error(
            "E0301",
            sb,
            format!("the branches have different dtypes: `{}` and `{}`", ta.dtype, tb.dtype),
            format!("this is `{tb}`"),
        )
        .help = Some("cast one branch".into());
        return Ty::Unknown;
    }
    match broadcast(c, &ta.shape, &tb.shape) {
        Ok(shape) => {
            let (dtype, weak) = promote(&ta, &tb);
            Ty::Tensor(TensorTy { dtype, shape, weak })
        }
        Err(msg) => {
            c.error("E0302", sb, format!("the branches' shapes differ: {msg}"), "shape mismatch");
            Ty::Unknown
        }
    }
}

/// Normalizes an axis against a rank; reports E0309.
fn axis(c: &mut Checker, v: Option<&ArgVal>, default: Option<i64>, rank: usize) -> Option<Option<usize>> {
    let raw = match v {
        None => match default {
            None => return Some(None),
            Some(d) => d,
        },
        Some(a) => match &a.ty {
            Ty::Dim(d) => match d.as_const() {
                Some(x) => x,
                None => {
                    c.error("E0310", a.span, "`axis` must be an integer literal".into(), "not a literal axis");
                    return None;
                }
            },
            Ty::Unknown => return None,
            other => {
                c.error(
                    "E0310",
                    a.span,
                    format!("`axis` must be an integer, found {}", other.describe()),
                    "not an integer",
                );
                return None;
            }
        },
    };
    let r = rank as i64;
    if raw < -r || raw >= r {
        let span = v.map(|a| a.span).unwrap_or_default();
        c.error(
            "E0309",
            span,
            format!("axis {raw} is out of range for rank {rank}"),
            format!("valid axes are {}..{}", -r, r),
        )
        .help = Some("negative axes count from the end, as in NumPy".into());
        return None;
    }
    Some(Some(((raw + r) % r.max(1)) as usize))
}

fn const_bool(e: &Expr) -> Option<bool> {
    match &e.unparen().kind {
        ExprKind::Bool(b) => Some(*b),
        _ => None,
    }
}

fn dims_of(c: &mut Checker, t: &TensorTy, span: Span, what: &str) -> Option<Vec<Dim>> {
    match c.resolve_shape(&t.shape) {
        Shape::Dims(d) => Some(d),
        Shape::Param => {
            c.error(
                "E0304",
                span,
                format!("{what} needs a tensor of known rank, but the parameter's shape is not fixed"),
                "rank unknown",
            )
            .help = Some("declare `param: f32[M, N]` among the rule's parameters to fix the rank".into());
            None
        }
    }
}

/// A list of compile-time integers (a shape or a permutation).
fn int_list(c: &mut Checker, a: &ArgVal, what: &str) -> Option<Vec<Dim>> {
    match &a.ty {
        Ty::List(items) => {
            let mut out = vec![];
            for it in items {
                match it {
                    Ty::Dim(d) => out.push(d.clone()),
                    Ty::Unknown => return None,
                    other => {
                        c.error(
                            "E0310",
                            a.span,
                            format!("{what} must list compile-time integers, found {}", other.describe()),
                            "not a constant",
                        );
                        return None;
                    }
                }
            }
            Some(out)
        }
        Ty::Unknown => None,
        other => {
            c.error(
                "E0318",
                a.span,
                format!("{what} must be a list such as `[B, T, D]`, found {}", other.describe()),
                "not a list",
            );
            None
        }
    }
}

fn dtype_arg(c: &mut Checker, a: Option<&ArgVal>, default: Dtype) -> Dtype {
    match a {
        None => default,
        Some(v) => match &v.ty {
            Ty::Str(Some(s)) => match Dtype::parse(s) {
                Some(d) => d,
                None => {
                    c.error("E0312", v.span, format!("unknown dtype \"{s}\""), "not a dtype");
                    default
                }
            },
            _ => {
                c.error("E0312", v.span, "`dtype` must be a string such as \"f32\"".into(), "not a dtype name");
                default
            }
        },
    }
}

fn product(d: &[Dim]) -> Dim {
    d.iter().fold(Dim::constant(1), |acc, x| acc.mul(x))
}

fn float_of(t: &TensorTy) -> TensorTy {
    TensorTy { dtype: if t.dtype.is_float() { t.dtype } else { Dtype::F32 }, ..t.clone() }
}

// ---------------------------------------------------------------------- calls

pub(crate) fn call(c: &mut Checker, name: &'static str, args: &[Arg], span: Span) -> Ty {
    let spec = BUILTINS.iter().find(|b| b.0 == name).map(|b| b.1).unwrap_or(&[]);
    // `min`/`max` with two positional arguments are elementwise; with one, reductions.
    let positional = args.iter().filter(|a| a.name.is_none()).count();
    let params: Vec<(&str, bool)> = if (name == "min" || name == "max") && positional < 2 {
        vec![("x", false), ("axis", true), ("keepdims", true)]
    } else if name == "min" || name == "max" {
        vec![("x", false), ("y", false)]
    } else {
        spec.iter()
            .map(|p| match p.strip_suffix('?') {
                Some(q) => (q, true),
                None => (*p, false),
            })
            .collect()
    };
    let bound = c.bind_args(&params, args, span, name);
    let mut vals: Vec<Option<ArgVal>> = Vec::with_capacity(params.len());
    // `param` initializers without a shape take the declared one; only the creation calls
    // see that shape, not nested arguments.
    let init_target = c.init_target.take();
    for b in &bound {
        vals.push(b.map(|j| ArgVal { ty: c.expr(&args[j].value), span: args[j].value.span, expr: &args[j].value }));
    }
    for (j, a) in args.iter().enumerate() {
        if !bound.contains(&Some(j)) {
            c.expr(&a.value);
        }
    }
    c.init_target = init_target;
    if bound.iter().zip(params.iter()).any(|(b, p)| b.is_none() && !p.1) {
        return Ty::Unknown;
    }
    if vals.iter().flatten().any(|v| v.ty.is_unknown()) {
        return Ty::Unknown;
    }
    let r = rule(c, name, &vals, span);
    c.init_target = None;
    r
}

fn arg<'a, 'e>(vals: &'a [Option<ArgVal<'e>>], i: usize) -> Option<&'a ArgVal<'e>> {
    vals.get(i).and_then(|v| v.as_ref())
}

fn rule(c: &mut Checker, name: &'static str, v: &[Option<ArgVal>], span: Span) -> Ty {
    let x = arg(v, 0);
    match name {
        "exp" | "log" | "log1p" | "sqrt" | "rsqrt" | "tanh" | "sigmoid" | "softplus" | "gelu" | "gelu_tanh"
        | "silu" | "erf" | "cos" | "sin" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            if t.dtype == Dtype::Bool {
                c.error("E0318", a.span, format!("`{name}` needs a number, found `{t}`"), "a boolean").help =
                    Some("convert with `f32(...)`".into());
                return Ty::Unknown;
            }
            Ty::Tensor(TensorTy { weak: t.weak, ..float_of(&t) })
        }
        "abs" | "sign" | "relu" | "floor" | "ceil" | "round" | "stop_gradient" => {
            let a = x.unwrap();
            if let Ty::Dim(d) = &a.ty {
                if name == "stop_gradient" || name == "floor" || name == "ceil" || name == "round" {
                    return Ty::Dim(d.clone());
                }
            }
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            if t.dtype == Dtype::Bool && name != "stop_gradient" {
                c.error("E0318", a.span, format!("`{name}` needs a number, found `{t}`"), "a boolean");
                return Ty::Unknown;
            }
            Ty::Tensor(t)
        }
        "pow" => binary(
            c,
            BinOp::Pow,
            x.unwrap().ty.clone(),
            arg(v, 1).unwrap().ty.clone(),
            x.unwrap().span,
            arg(v, 1).unwrap().span,
            span,
        ),
        "min" | "max" if v.len() == 2 => {
            let (a, b) = (x.unwrap(), arg(v, 1).unwrap());
            if let (Ty::Dim(p), Ty::Dim(q)) = (&a.ty, &b.ty) {
                if let (Some(p), Some(q)) = (p.as_const(), q.as_const()) {
                    return Ty::Dim(Dim::constant(if name == "min" { p.min(q) } else { p.max(q) }));
                }
            }
            let t = join(c, a.ty.clone(), b.ty.clone(), a.span, b.span);
            if let Ty::Tensor(tt) = &t {
                if tt.dtype == Dtype::Bool {
                    c.error("E0318", span, format!("`{name}` does not apply to `bool` values"), "booleans");
                    return Ty::Unknown;
                }
            }
            t
        }
        "where" => {
            let (cond, a, b) = (x.unwrap(), arg(v, 1).unwrap(), arg(v, 2).unwrap());
            let Some(ct) = tensor_or_error(c, &cond.ty, cond.span, "`where`") else { return Ty::Unknown };
            if ct.dtype != Dtype::Bool {
                c.error(
                    "E0311",
                    cond.span,
                    format!("the condition of `where` must be `bool`, found `{ct}`"),
                    "not a boolean",
                )
                .help = Some("compare explicitly, e.g. `x > 0.0`".into());
                return Ty::Unknown;
            }
            let t = join(c, a.ty.clone(), b.ty.clone(), a.span, b.span);
            let Ty::Tensor(tt) = t else { return t };
            match broadcast(c, &ct.shape, &tt.shape) {
                Ok(shape) => Ty::Tensor(TensorTy { shape, weak: false, ..tt }),
                Err(msg) => {
                    c.error("E0302", cond.span, format!("`where`: {msg}"), "condition shape");
                    Ty::Unknown
                }
            }
        }
        "f32" | "f16" | "bf16" | "f64" | "i32" | "i64" | "bool" | "cast" => {
            let a = x.unwrap();
            let dtype = if name == "cast" {
                dtype_arg(c, arg(v, 1), Dtype::F32)
            } else {
                Dtype::parse(name).unwrap_or(Dtype::F32)
            };
            if let (Ty::Dim(_), true) = (&a.ty, dtype.is_int()) {
                return a.ty.clone();
            }
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            Ty::Tensor(TensorTy { dtype, shape: t.shape, weak: false })
        }
        "sum" | "mean" | "prod" | "logsumexp" | "norm" | "argmax" | "argmin" | "min" | "max" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            if t.dtype == Dtype::Bool && name != "sum" {
                c.error("E0318", a.span, format!("`{name}` needs numbers, found `{t}`"), "booleans").help =
                    Some("convert with `f32(...)`".into());
                return Ty::Unknown;
            }
            let keep = arg(v, 2).and_then(|k| const_bool(k.expr)).unwrap_or(false);
            let dtype = match name {
                "mean" | "logsumexp" | "norm" => float_of(&t).dtype,
                "argmax" | "argmin" => Dtype::I32,
                "sum" if t.dtype == Dtype::Bool => Dtype::I32,
                _ => t.dtype,
            };
            let Some(ax) = arg(v, 1) else {
                if keep {
                    if let Shape::Dims(d) = &t.shape {
                        return Ty::tensor(dtype, vec![Dim::constant(1); d.len()]);
                    }
                }
                return Ty::scalar(dtype);
            };
            let Some(dims) = dims_of(c, &t, a.span, &format!("`{name}` over an axis")) else { return Ty::Unknown };
            let axes: Vec<usize> = match &ax.ty {
                Ty::List(items) => {
                    let mut out = vec![];
                    for it in items {
                        let fake = ArgVal { ty: it.clone(), span: ax.span, expr: ax.expr };
                        match axis(c, Some(&fake), None, dims.len()) {
                            Some(Some(i)) => out.push(i),
                            _ => return Ty::Unknown,
                        }
                    }
                    out
                }
                _ => match axis(c, Some(ax), None, dims.len()) {
                    Some(Some(i)) => vec![i],
                    _ => return Ty::Unknown,
                },
            };
            let out: Vec<Dim> = dims
                .iter()
                .enumerate()
                .filter_map(|(i, d)| {
                    if axes.contains(&i) {
                        if keep {
                            Some(Dim::constant(1))
                        } else {
                            None
                        }
                    } else {
                        Some(d.clone())
                    }
                })
                .collect();
            Ty::tensor(dtype, out)
        }
        "quantile" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`quantile`") else { return Ty::Unknown };
            let q = arg(v, 1).unwrap();
            match q.ty.as_tensor() {
                Some(qt) if qt.shape.is_scalar() => {}
                _ => {
                    c.error("E0318", q.span, "`q` must be a scalar in [0, 1]".into(), "not a scalar");
                }
            }
            Ty::scalar(float_of(&t).dtype)
        }
        "softmax" | "log_softmax" | "cumsum" | "sort" | "argsort" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            if let Shape::Dims(d) = c.resolve_shape(&t.shape) {
                if d.is_empty() {
                    c.error("E0304", a.span, format!("`{name}` needs at least one axis, found a scalar"), "a scalar");
                    return Ty::Unknown;
                }
                if axis(c, arg(v, 1), Some(-1), d.len()).is_none() {
                    return Ty::Unknown;
                }
            }
            match name {
                "softmax" | "log_softmax" => Ty::Tensor(TensorTy { weak: false, ..float_of(&t) }),
                "argsort" => Ty::Tensor(TensorTy { dtype: Dtype::I32, shape: t.shape, weak: false }),
                _ => Ty::Tensor(t),
            }
        }
        "gather" | "scatter_add" => {
            let (a, idx) = (x.unwrap(), arg(v, 1).unwrap());
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            let Some(it) = tensor_or_error(c, &idx.ty, idx.span, &format!("`{name}`")) else { return Ty::Unknown };
            if !it.dtype.is_int() {
                c.error(
                    "E0301",
                    idx.span,
                    format!("`{name}` indices must be integers, found `{it}`"),
                    "not integer indices",
                )
                .help = Some("convert with `i32(...)`".into());
                return Ty::Unknown;
            }
            let Some(xd) = dims_of(c, &t, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            let Some(id) = dims_of(c, &it, idx.span, &format!("`{name}`")) else { return Ty::Unknown };
            let axis_arg = if name == "gather" { arg(v, 2) } else { arg(v, 3) };
            let Some(Some(ax)) = axis(c, axis_arg, Some(-1), xd.len().max(1)) else { return Ty::Unknown };
            let result_shape: Vec<Dim> = if id.len() + 1 == xd.len() {
                let expected: Vec<Dim> =
                    xd.iter().enumerate().filter(|(i, _)| *i != ax).map(|(_, d)| d.clone()).collect();
                if !c.unify_shapes(
                    &Shape::Dims(expected.clone()),
                    &Shape::Dims(id.clone()),
                    idx.span,
                    &format!("the indices of `{name}`"),
                ) {
                    return Ty::Unknown;
                }
                expected
            } else if id.len() == xd.len() {
                for (i, (p, q)) in xd.iter().zip(id.iter()).enumerate() {
                    if i != ax && !c.unify(p, q) {
                        c.error(
                            "E0302",
                            idx.span,
                            format!(
                                "the indices of `{name}` have shape {}, which does not fit {} outside axis {ax}",
                                Shape::Dims(id.clone()),
                                Shape::Dims(xd.clone())
                            ),
                            "index shape",
                        );
                        return Ty::Unknown;
                    }
                }
                id.clone()
            } else {
                c.error(
                    "E0315",
                    idx.span,
                    format!(
                        "`{name}` indices must have rank {} (one per row) or {} (take along the axis), found {}",
                        xd.len().saturating_sub(1),
                        xd.len(),
                        id.len()
                    ),
                    "wrong index rank",
                );
                return Ty::Unknown;
            };
            if name == "scatter_add" {
                let vals = arg(v, 2).unwrap();
                let Some(vt) = tensor_or_error(c, &vals.ty, vals.span, "`scatter_add`") else { return Ty::Unknown };
                if !c.unify_shapes(&Shape::Dims(result_shape), &vt.shape, vals.span, "the values of `scatter_add`") {
                    return Ty::Unknown;
                }
                return Ty::Tensor(TensorTy { weak: false, ..t });
            }
            Ty::tensor(t.dtype, result_shape)
        }
        "one_hot" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`one_hot`") else { return Ty::Unknown };
            if !t.dtype.is_int() {
                c.error("E0301", a.span, format!("`one_hot` needs integer indices, found `{t}`"), "not integers");
                return Ty::Unknown;
            }
            let n = arg(v, 1).unwrap();
            let Ty::Dim(nd) = &n.ty else {
                c.error("E0310", n.span, "`n` must be a compile-time integer".into(), "must be known at build time");
                return Ty::Unknown;
            };
            let Some(mut d) = dims_of(c, &t, a.span, "`one_hot`") else { return Ty::Unknown };
            d.push(nd.clone());
            Ty::tensor(dtype_arg(c, arg(v, 2), Dtype::F32), d)
        }
        "topk" | "keep_top" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            let mut consts = vec![];
            for i in 1..if name == "topk" { 2 } else { 3 } {
                let k = arg(v, i).unwrap();
                match &k.ty {
                    Ty::Dim(d) => consts.push(d.clone()),
                    other => {
                        c.error(
                            "E0310",
                            k.span,
                            format!(
                                "`{}` of `{name}` must be a compile-time integer, found {}",
                                params_name(name, i),
                                other.describe()
                            ),
                            "must be known at build time",
                        )
                        .help = Some("pass an integer literal or an integer hyperparameter".into());
                        return Ty::Unknown;
                    }
                }
            }
            let ax_arg = arg(v, if name == "topk" { 2 } else { 3 });
            match c.resolve_shape(&t.shape) {
                Shape::Param => {
                    if name == "topk" {
                        c.error("E0304", a.span, "`topk` needs a tensor of known rank".into(), "rank unknown");
                        return Ty::Unknown;
                    }
                    Ty::Tensor(TensorTy { dtype: Dtype::Bool, shape: Shape::Param, weak: false })
                }
                Shape::Dims(d) => {
                    if d.is_empty() {
                        c.error("E0304", a.span, format!("`{name}` needs at least one axis"), "a scalar");
                        return Ty::Unknown;
                    }
                    let Some(Some(ax)) = axis(c, ax_arg, Some(-1), d.len()) else { return Ty::Unknown };
                    if name == "keep_top" {
                        if let (Some(ext), Some(m)) = (d[ax].as_const(), consts[1].as_const()) {
                            if m <= 0 || ext % m != 0 {
                                c.error(
                                    "E0302",
                                    a.span,
                                    format!("`keep_top` groups of {m} do not divide the axis of extent {ext}"),
                                    "axis not divisible by m",
                                );
                                return Ty::Unknown;
                            }
                        }
                        return Ty::tensor(Dtype::Bool, d);
                    }
                    let mut d = d;
                    d[ax] = consts[0].clone();
                    Ty::tensor(t.dtype, d)
                }
            }
        }
        "reshape" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`reshape`") else { return Ty::Unknown };
            let Some(target) = int_list(c, arg(v, 1).unwrap(), "the shape of `reshape`") else { return Ty::Unknown };
            let Some(d) = dims_of(c, &t, a.span, "`reshape`") else { return Ty::Unknown };
            let total = product(&d);
            let minus_one = Dim::constant(-1);
            let holes = target.iter().filter(|x| **x == minus_one).count();
            let target = if holes == 1 {
                let known = product(&target.iter().filter(|x| **x != minus_one).cloned().collect::<Vec<_>>());
                let fill = total.div(&known);
                target.iter().map(|x| if *x == minus_one { fill.clone() } else { x.clone() }).collect()
            } else {
                target
            };
            let new_total = product(&target);
            if !c.unify(&total, &new_total) {
                let s = arg(v, 1).unwrap().span;
                c.error(
                    "E0316",
                    s,
                    format!(
                        "`reshape` from {} ({total} elements) to {} ({new_total} elements)",
                        Shape::Dims(d.clone()),
                        Shape::Dims(target.clone())
                    ),
                    "element count differs",
                );
                c.add_origins(&[&t.shape]);
                return Ty::Unknown;
            }
            Ty::tensor(t.dtype, target)
        }
        "flatten" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`flatten`") else { return Ty::Unknown };
            let Some(d) = dims_of(c, &t, a.span, "`flatten`") else { return Ty::Unknown };
            Ty::tensor(t.dtype, vec![product(&d)])
        }
        "transpose" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`transpose`") else { return Ty::Unknown };
            let Some(d) = dims_of(c, &t, a.span, "`transpose`") else { return Ty::Unknown };
            let perm: Vec<usize> = match arg(v, 1) {
                None => (0..d.len()).rev().collect(),
                Some(p) => {
                    let Some(list) = int_list(c, p, "the axes of `transpose`") else { return Ty::Unknown };
                    let mut out = vec![];
                    for x in &list {
                        match x.as_const() {
                            Some(i) if i >= -(d.len() as i64) && i < d.len() as i64 => {
                                out.push(((i + d.len() as i64) % d.len() as i64) as usize)
                            }
                            _ => {
                                c.error(
                                    "E0309",
                                    p.span,
                                    format!("`transpose` axes must be integers in 0..{}", d.len()),
                                    "invalid axis",
                                );
                                return Ty::Unknown;
                            }
                        }
                    }
                    let mut sorted = out.clone();
                    sorted.sort();
                    if sorted != (0..d.len()).collect::<Vec<_>>() {
                        c.error(
                            "E0309",
                            p.span,
                            format!("`transpose` axes must be a permutation of 0..{}", d.len()),
                            "not a permutation",
                        );
                        return Ty::Unknown;
                    }
                    out
                }
            };
            Ty::tensor(t.dtype, perm.iter().map(|i| d[*i].clone()).collect())
        }
        "broadcast" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`broadcast`") else { return Ty::Unknown };
            let Some(target) = int_list(c, arg(v, 1).unwrap(), "the shape of `broadcast`") else { return Ty::Unknown };
            match broadcast(c, &t.shape, &Shape::Dims(target.clone())) {
                Ok(s) if s == Shape::Dims(target.clone()) => Ty::tensor(t.dtype, target),
                Ok(s) => {
                    c.error(
                        "E0302",
                        span,
                        format!("`broadcast` of {} to {} would give {s}", t.shape, Shape::Dims(target)),
                        "cannot broadcast to this shape",
                    );
                    Ty::Unknown
                }
                Err(msg) => {
                    c.error("E0302", span, format!("`broadcast`: {msg}"), "cannot broadcast");
                    Ty::Unknown
                }
            }
        }
        "expand_dims" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`expand_dims`") else { return Ty::Unknown };
            let Some(mut d) = dims_of(c, &t, a.span, "`expand_dims`") else { return Ty::Unknown };
            let Some(Some(ax)) = axis(c, arg(v, 1), None, d.len() + 1) else { return Ty::Unknown };
            d.insert(ax, Dim::constant(1));
            Ty::tensor(t.dtype, d)
        }
        "concat" => {
            let a = x.unwrap();
            let Ty::List(items) = &a.ty else {
                c.error("E0318", a.span, "`concat` takes a list of tensors, such as `[a, b]`".into(), "not a list");
                return Ty::Unknown;
            };
            if items.is_empty() {
                c.error("E0318", a.span, "`concat` needs at least one tensor".into(), "empty list");
                return Ty::Unknown;
            }
            let mut ts = vec![];
            for it in items {
                let Some(t) = tensor_or_error(c, it, a.span, "`concat`") else { return Ty::Unknown };
                let Some(d) = dims_of(c, &t, a.span, "`concat`") else { return Ty::Unknown };
                ts.push((t.dtype, d));
            }
            let rank = ts[0].1.len();
            let Some(Some(ax)) = axis(c, arg(v, 1), Some(0), rank.max(1)) else { return Ty::Unknown };
            let mut out = ts[0].1.clone();
            for (dt, d) in &ts[1..] {
                if *dt != ts[0].0 || d.len() != rank {
                    c.error("E0302", a.span, "`concat` needs tensors of one dtype and rank".into(), "mixed tensors");
                    return Ty::Unknown;
                }
                for i in 0..rank {
                    if i == ax {
                        out[i] = out[i].add(&d[i]);
                    } else if !c.unify(&out[i], &d[i]) {
                        c.error(
                            "E0302",
                            a.span,
                            format!("`concat` along axis {ax}: the other axes differ (`{}` and `{}`)", out[i], d[i]),
                            "shapes differ",
                        );
                        return Ty::Unknown;
                    }
                }
            }
            Ty::tensor(ts[0].0, out)
        }
        "slice" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`slice`") else { return Ty::Unknown };
            let Some(mut d) = dims_of(c, &t, a.span, "`slice`") else { return Ty::Unknown };
            let (s, e) = (arg(v, 1).unwrap(), arg(v, 2).unwrap());
            let (Ty::Dim(sd), Ty::Dim(ed)) = (&s.ty, &e.ty) else {
                c.error(
                    "E0310",
                    s.span.to(e.span),
                    "`slice` bounds must be compile-time integers".into(),
                    "must be known at build time",
                );
                return Ty::Unknown;
            };
            let Some(Some(ax)) = axis(c, arg(v, 3), Some(0), d.len().max(1)) else { return Ty::Unknown };
            if d.is_empty() {
                c.error("E0304", a.span, "`slice` needs at least one axis".into(), "a scalar");
                return Ty::Unknown;
            }
            d[ax] = ed.sub(sd);
            Ty::tensor(t.dtype, d)
        }
        "zeros" | "ones" | "full" | "uniform" | "normal" => {
            let dtype = match name {
                "zeros" | "ones" => dtype_arg(c, arg(v, 1), Dtype::F32),
                "full" => dtype_arg(c, arg(v, 2), Dtype::F32),
                _ => Dtype::F32,
            };
            match arg(v, 0) {
                Some(s) => {
                    let Some(dims) = int_list(c, s, &format!("the shape of `{name}`")) else { return Ty::Unknown };
                    Ty::tensor(dtype, dims)
                }
                None => match &c.init_target {
                    Some(t) => Ty::Tensor(TensorTy { dtype: t.dtype, ..t.clone() }),
                    None => {
                        c.error(
                            "E0305",
                            span,
                            format!("`{name}` needs a shape here, such as `{name}([N, D])`"),
                            "missing shape",
                        )
                        .help = Some("the shape may be left out only in a `param` initializer".into());
                        Ty::Unknown
                    }
                },
            }
        }
        "zeros_like" | "ones_like" => {
            let a = x.unwrap();
            match tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) {
                Some(t) => Ty::Tensor(TensorTy { weak: false, ..t }),
                None => Ty::Unknown,
            }
        }
        "iota" => {
            let n = x.unwrap();
            let Ty::Dim(d) = &n.ty else {
                c.error("E0310", n.span, "`iota` needs a compile-time length".into(), "must be known at build time");
                return Ty::Unknown;
            };
            Ty::tensor(dtype_arg(c, arg(v, 1), Dtype::I32), vec![d.clone()])
        }
        "sample" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, "`sample`") else { return Ty::Unknown };
            let Some(d) = dims_of(c, &t, a.span, "`sample`") else { return Ty::Unknown };
            if d.is_empty() {
                c.error("E0304", a.span, "`sample` needs weights with at least one axis".into(), "a scalar");
                return Ty::Unknown;
            }
            let Some(Some(ax)) = axis(c, arg(v, 1), Some(-1), d.len()) else { return Ty::Unknown };
            Ty::tensor(Dtype::I32, d.iter().enumerate().filter(|(i, _)| *i != ax).map(|(_, x)| x.clone()).collect())
        }
        "solve" => {
            let (a, b) = (x.unwrap(), arg(v, 1).unwrap());
            let Some(ta) = tensor_or_error(c, &a.ty, a.span, "`solve`'s matrix") else { return Ty::Unknown };
            let Some(tb) = tensor_or_error(c, &b.ty, b.span, "`solve`'s right-hand side") else { return Ty::Unknown };
            let Some(da) = dims_of(c, &ta, a.span, "`solve`") else { return Ty::Unknown };
            let Some(db) = dims_of(c, &tb, b.span, "`solve`") else { return Ty::Unknown };
            for (d, e) in [(&da, a), (&db, b)] {
                if d.len() != 2 {
                    c.error(
                        "E0304",
                        e.span,
                        format!("`solve` needs matrices, found rank {}", d.len()),
                        "not a matrix",
                    )
                    .help = Some(
                        "`solve(a, b)` solves a @ x = b for a [n, n] and b [n, k]; reshape a vector b to [n, 1]".into(),
                    );
                    return Ty::Unknown;
                }
            }
            if !c.unify(&da[0], &da[1]) {
                let d = Shape::Dims(da.clone());
                c.error("E0302", a.span, format!("`solve` needs a square matrix [n, n], found {d}"), "not square")
                    .help = Some("`solve(a, b)` solves a @ x = b, which needs as many equations as unknowns".into());
                return Ty::Unknown;
            }
            if !c.unify(&da[0], &db[0]) {
                let d = Shape::Dims(db.clone());
                c.error(
                    "E0302",
                    b.span,
                    format!("`solve`'s right-hand side must be [{}, k] for a [{0}, {0}] matrix, found {d}", da[0]),
                    "shape mismatch",
                )
                .help = Some("`b` has one row per row of `a`; reshape a vector to [n, 1]".into());
                return Ty::Unknown;
            }
            Ty::tensor(float_of(&ta).dtype, vec![da[1].clone(), db[1].clone()])
        }
        "qr" | "svd_topk" => {
            let a = x.unwrap();
            let Some(t) = tensor_or_error(c, &a.ty, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            let Some(d) = dims_of(c, &t, a.span, &format!("`{name}`")) else { return Ty::Unknown };
            if d.len() != 2 {
                c.error("E0304", a.span, format!("`{name}` needs a matrix, found rank {}", d.len()), "not a matrix");
                return Ty::Unknown;
            }
            if name == "qr" {
                return Ty::tensor(float_of(&t).dtype, d);
            }
            let k = arg(v, 1).unwrap();
            let Ty::Dim(kd) = &k.ty else {
                c.error("E0310", k.span, "`k` must be a compile-time integer".into(), "must be known at build time");
                return Ty::Unknown;
            };
            let side = match arg(v, 2) {
                None => "right".to_string(),
                Some(s) => match &s.ty {
                    Ty::Str(Some(x)) if x == "left" || x == "right" => x.clone(),
                    _ => {
                        c.error("E0318", s.span, "`side` must be \"left\" or \"right\"".into(), "invalid side");
                        return Ty::Unknown;
                    }
                },
            };
            if side == "right" {
                Ty::tensor(float_of(&t).dtype, vec![kd.clone(), d[1].clone()])
            } else {
                Ty::tensor(float_of(&t).dtype, vec![d[0].clone(), kd.clone()])
            }
        }
        "text" | "tokens" => {
            let p = x.unwrap();
            if !matches!(p.ty, Ty::Str(_)) {
                c.error("E0318", p.span, format!("the path of `{name}` must be a string"), "not a string");
            }
            let (ctx, batch) = (arg(v, 1).unwrap(), arg(v, 2).unwrap());
            let mut dims = vec![];
            for a in [ctx, batch] {
                match &a.ty {
                    Ty::Dim(d) if d.as_const().map(|x| x > 0).unwrap_or(false) => dims.push(d.clone()),
                    _ => {
                        c.error(
                            "E0310",
                            a.span,
                            format!("`{name}` needs positive integer `context` and `batch`"),
                            "not a positive constant",
                        );
                        return Ty::Unknown;
                    }
                }
            }
            Ty::Data { context: dims[0].clone(), batch: dims[1].clone() }
        }
        _ => Ty::Unknown,
    }
}

fn params_name(name: &str, i: usize) -> &'static str {
    match (name, i) {
        ("topk", 1) => "k",
        ("keep_top", 1) => "n",
        ("keep_top", 2) => "m",
        _ => "argument",
    }
}

// ---------------------------------------------------------------------- indexing

pub(crate) fn index(c: &mut Checker, base: Ty, indices: &[IndexArg], span: Span) -> Ty {
    let mut idx_tys = vec![];
    for ia in indices {
        match ia {
            IndexArg::Expr(e) => idx_tys.push(Some((c.expr(e), e.span))),
            // Slice bounds are evaluated once, below, where their extent is computed.
            IndexArg::Slice { .. } => idx_tys.push(None),
        }
    }
    match &base {
        Ty::Unknown => return Ty::Unknown,
        Ty::ModelArray(..) | Ty::TensorArray(..) => {
            let ok = indices.len() == 1 && matches!(idx_tys[0], Some((Ty::Dim(_), _)));
            if !ok {
                c.error(
                    "E0315",
                    span,
                    "an array of members takes one compile-time integer index".into(),
                    "expected `name[l]`",
                );
                return Ty::Unknown;
            }
            return match &base {
                Ty::ModelArray(m, _) => Ty::Model(m.clone()),
                Ty::TensorArray(t, _) => Ty::Tensor(t.clone()),
                _ => Ty::Unknown,
            };
        }
        _ => {}
    }
    let Some(t) = tensor_or_error(c, &base, span, "indexing") else { return Ty::Unknown };
    let Some(dims) = dims_of(c, &t, span, "indexing") else { return Ty::Unknown };
    if indices.len() > dims.len() {
        c.error(
            "E0315",
            span,
            format!("{} indices for a tensor of rank {}", indices.len(), dims.len()),
            "too many indices",
        )
        .help = Some("use at most one index per axis".into());
        return Ty::Unknown;
    }
    // A single integer tensor of rank ≥ 1 gathers rows: `wte[tokens]`.
    if indices.len() == 1 {
        if let Some((ty, s)) = &idx_tys[0] {
            if let Some(it) = ty.as_tensor() {
                if let Shape::Dims(id) = c.resolve_shape(&it.shape) {
                    if !id.is_empty() {
                        if !it.dtype.is_int() {
                            c.error(
                                "E0315",
                                *s,
                                format!("an index tensor must hold integers, found `{it}`"),
                                "not integer indices",
                            )
                            .help = Some("use `where(mask, x, 0.0)` to select with a boolean mask".into());
                            return Ty::Unknown;
                        }
                        let mut out = id.clone();
                        out.extend(dims[1..].iter().cloned());
                        return Ty::tensor(t.dtype, out);
                    }
                }
            }
        }
    }
    let mut out = vec![];
    for (i, ia) in indices.iter().enumerate() {
        let d = &dims[i];
        match ia {
            IndexArg::Slice { start, end, .. } => {
                let bound = |c: &mut Checker, e: &Option<Expr>, default: Dim| -> Option<Dim> {
                    match e {
                        None => Some(default),
                        Some(x) => match c.expr(x) {
                            Ty::Dim(v) => Some(match v.as_const() {
                                Some(k) if k < 0 => d.add(&v),
                                _ => v,
                            }),
                            Ty::Unknown => None,
                            other => {
                                c.error(
                                    "E0310",
                                    x.span,
                                    format!("slice bounds must be compile-time integers, found {}", other.describe()),
                                    "must be known at build time",
                                );
                                None
                            }
                        },
                    }
                };
                let (Some(s), Some(e)) = (bound(c, start, Dim::constant(0)), bound(c, end, d.clone())) else {
                    return Ty::Unknown;
                };
                let extent = e.sub(&s);
                if let (Some(x), Some(full)) = (extent.as_const(), d.as_const()) {
                    if x < 0 || x > full {
                        c.error(
                            "E0315",
                            span,
                            format!("slice of extent {x} on an axis of extent {full}"),
                            "slice out of range",
                        );
                        return Ty::Unknown;
                    }
                }
                out.push(extent);
            }
            IndexArg::Expr(_) => {
                let (ty, s) = idx_tys[i].clone().unwrap();
                match ty {
                    Ty::Dim(_) => {}
                    other => match other.as_tensor() {
                        Some(it) if it.dtype.is_int() && it.shape.is_scalar() => {}
                        _ => {
                            c.error(
                                "E0315",
                                s,
                                format!("an index must be an integer scalar, found {}", other.describe()),
                                "not an integer index",
                            );
                            return Ty::Unknown;
                        }
                    },
                }
            }
        }
    }
    out.extend(dims[indices.len()..].iter().cloned());
    Ty::tensor(t.dtype, out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_render() {
        assert_eq!(
            super::signature_text("sum").unwrap(),
            "sum(x, axis = …, keepdims = …) — sum over all axes or `axis`"
        );
    }
}
