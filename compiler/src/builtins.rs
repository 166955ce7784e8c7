//! Lowering of built-in calls into the op set (composites become decompositions).

use crate::ir::{Bin, NodeId, Op, Red, Un};
use crate::lower::{LowerError, Lowerer, Val};
use lang::ast::Arg;
use lang::source::Span;
use lang::types::Dtype;

type R<T> = Result<T, LowerError>;

fn axis_of(lw: &Lowerer, v: Option<&Val>, default: Option<i64>, rank: usize, span: Span) -> R<Option<usize>> {
    let raw = match v {
        None => match default {
            None => return Ok(None),
            Some(d) => d,
        },
        Some(Val::Int(i)) => *i,
        Some(_) => return lw.fail(span, "`axis` must be an integer constant"),
    };
    let r = rank as i64;
    if raw < -r || raw >= r.max(1) {
        return lw.fail(span, format!("axis {raw} out of range for rank {rank}"));
    }
    Ok(Some(((raw + r) % r.max(1)) as usize))
}

fn axes_of(lw: &Lowerer, v: Option<&Val>, rank: usize, span: Span) -> R<Vec<usize>> {
    match v {
        None => Ok((0..rank).collect()),
        Some(Val::List(items)) => {
            let mut out = vec![];
            for it in items {
                out.push(axis_of(lw, Some(it), None, rank, span)?.unwrap_or(0));
            }
            Ok(out)
        }
        Some(v) => Ok(vec![axis_of(lw, Some(v), None, rank, span)?.unwrap_or(0)]),
    }
}

fn ints(lw: &Lowerer, v: &Val, span: Span) -> R<Vec<i64>> {
    match v {
        Val::List(items) => items
            .iter()
            .map(|x| match x {
                Val::Int(i) => Ok(*i),
                Val::Float(f) => {
                    lw.fail(span, format!("a shape entry evaluated to {f}: a division such as `D / H` must be exact"))
                }
                _ => lw.fail(span, "expected a list of integer constants"),
            })
            .collect(),
        _ => lw.fail(span, "expected a list such as `[B, T]`"),
    }
}

fn usizes(lw: &Lowerer, v: &Val, span: Span) -> R<Vec<usize>> {
    ints(lw, v, span)?
        .into_iter()
        .map(|i| if i < 0 { lw.fail(span, "negative extent") } else { Ok(i as usize) })
        .collect()
}

fn dtype_arg(lw: &Lowerer, v: Option<&Val>, default: Dtype, span: Span) -> R<Dtype> {
    match v {
        None => Ok(default),
        Some(Val::Str(s)) => {
            Dtype::parse(s).ok_or_else(|| LowerError { message: format!("unknown dtype {s}"), at: None, input: false })
        }
        Some(_) => lw.fail(span, "`dtype` must be a string"),
    }
}

fn bool_arg(v: Option<&Val>) -> bool {
    matches!(v, Some(Val::Bool(true)))
}

/// Lowers `name(args)`.
pub fn call(lw: &mut Lowerer, name: &str, args: &[Arg], span: Span) -> R<Val> {
    let origin = lw.origin_of(span);
    let Some(spec) = lang::builtins::BUILTINS.iter().find(|b| b.0 == name).map(|b| b.1) else {
        return lw.fail(span, format!("unknown function `{name}`"));
    };
    let positional = args.iter().filter(|a| a.name.is_none()).count();
    let names: Vec<&str> = if (name == "min" || name == "max") && positional >= 2 {
        vec!["x", "y"]
    } else if name == "min" || name == "max" {
        vec!["x", "axis", "keepdims"]
    } else {
        spec.iter().map(|p| p.trim_end_matches('?')).collect()
    };
    let mut vals: Vec<Option<Val>> = vec![None; names.len()];
    let mut pos = 0;
    for a in args {
        let i = match &a.name {
            Some(n) => names.iter().position(|x| *x == n.name).ok_or_else(|| LowerError {
                message: format!("unknown argument `{}`", n.name),
                at: None,
                input: false,
            })?,
            None => {
                pos += 1;
                pos - 1
            }
        };
        if i < vals.len() {
            vals[i] = Some(lw.expr(&a.value)?);
        }
    }
    let get = |i: usize| vals.get(i).and_then(|v| v.as_ref());
    let x = || {
        get(0).cloned().ok_or_else(|| LowerError {
            message: format!("`{name}` needs an argument"),
            at: None,
            input: false,
        })
    };
    let float_unary = |lw: &mut Lowerer, u: Un| -> R<Val> { lw.unary_val(u, x()?, true, span) };
    match name {
        "exp" => float_unary(lw, Un::Exp),
        "log" => float_unary(lw, Un::Log),
        "log1p" => float_unary(lw, Un::Log1p),
        "sqrt" => float_unary(lw, Un::Sqrt),
        "rsqrt" => float_unary(lw, Un::Rsqrt),
        "tanh" => float_unary(lw, Un::Tanh),
        "sigmoid" => float_unary(lw, Un::Sigmoid),
        "softplus" => float_unary(lw, Un::Softplus),
        "gelu" => float_unary(lw, Un::Gelu),
        "gelu_tanh" => float_unary(lw, Un::GeluTanh),
        "silu" => float_unary(lw, Un::Silu),
        "erf" => float_unary(lw, Un::Erf),
        "cos" => float_unary(lw, Un::Cos),
        "sin" => float_unary(lw, Un::Sin),
        "abs" | "sign" | "relu" | "floor" | "ceil" | "round" | "stop_gradient" => {
            let v = x()?;
            if let Val::Int(i) = v {
                return Ok(Val::Int(match name {
                    "abs" => i.wrapping_abs(),
                    "sign" => i.signum(),
                    "relu" => i.max(0),
                    _ => i,
                }));
            }
            let u = match name {
                "abs" => Un::Abs,
                "sign" => Un::Sign,
                "relu" => Un::Relu,
                "floor" => Un::Floor,
                "ceil" => Un::Ceil,
                "round" => Un::Round,
                _ => Un::StopGradient,
            };
            lw.unary_val(u, v, false, span)
        }
        "pow" => lw.binary(lang::ast::BinOp::Pow, x()?, get(1).cloned().unwrap_or(Val::Float(1.0)), span),
        "min" | "max" if names.len() == 2 => {
            let (a, b) = (x()?, get(1).cloned().unwrap_or(Val::Float(0.0)));
            if let (Val::Int(p), Val::Int(q)) = (&a, &b) {
                return Ok(Val::Int(if name == "min" { *p.min(q) } else { *p.max(q) }));
            }
            lw.elementwise(if name == "min" { Bin::Min } else { Bin::Max }, a, b, span)
        }
        "where" => {
            let (c, a, b) = (x()?, get(1).cloned(), get(2).cloned());
            lw.select_val(c, a.unwrap_or(Val::Float(0.0)), b.unwrap_or(Val::Float(0.0)), span)
        }
        "f32" | "f16" | "bf16" | "f64" | "i32" | "i64" | "bool" | "cast" => {
            let v = x()?;
            let dtype = if name == "cast" {
                dtype_arg(lw, get(1), Dtype::F32, span)?
            } else {
                Dtype::parse(name).unwrap_or(Dtype::F32)
            };
            if let (Val::Int(_), true) = (&v, dtype.is_int()) {
                return Ok(v);
            }
            let n = match &v {
                Val::T(n) => *n,
                other => lw.node_of(other, dtype, &origin, span)?,
            };
            let s = lw.shape_of(n);
            if lw.dtype_of(n) == dtype {
                return Ok(Val::T(n));
            }
            Ok(Val::T(lw.node(Op::Cast, dtype, s, &[n], &origin)?))
        }
        "sum" | "mean" | "prod" | "logsumexp" | "norm" | "argmax" | "argmin" | "min" | "max" => {
            let v = x()?;
            let mut n = lw.as_tensor(&v, span)?;
            let keep = bool_arg(get(2));
            let rank = lw.shape_of(n).len();
            if (name == "argmax" || name == "argmin") && get(1).is_none() {
                // Over all axes: the index into the flattened tensor.
                let total: usize = lw.shape_of(n).iter().product();
                n = lw.reshape(n, vec![total], &origin)?;
                let op = if name == "argmax" { Red::ArgMax } else { Red::ArgMin };
                return Ok(Val::T(lw.reduce_node(n, op, &[0], false, &origin)?));
            }
            let axes = axes_of(lw, get(1), rank, span)?;
            let d = lw.dtype_of(n);
            match name {
                "sum" | "prod" | "argmax" | "argmin" | "min" | "max" => {
                    if name == "sum" && d == Dtype::Bool {
                        let s = lw.shape_of(n);
                        n = lw.node(Op::Cast, Dtype::I32, s, &[n], &origin)?;
                    }
                    let op = match name {
                        "sum" => Red::Sum,
                        "prod" => Red::Prod,
                        "argmax" => Red::ArgMax,
                        "argmin" => Red::ArgMin,
                        "min" => Red::Min,
                        _ => Red::Max,
                    };
                    Ok(Val::T(lw.reduce_node(n, op, &axes, keep, &origin)?))
                }
                "mean" => {
                    let fd = if d.is_float() { d } else { Dtype::F32 };
                    n = lw.cast(n, fd, &origin)?;
                    let s = lw.shape_of(n);
                    let count: usize = axes.iter().map(|a| s[*a]).product();
                    let total = lw.reduce_node(n, Red::Sum, &axes, keep, &origin)?;
                    let inv = lw.constant(fd, 1.0 / count.max(1) as f64, &origin)?;
                    let ts = lw.shape_of(total);
                    let inv = lw.broadcast(inv, &ts, &origin)?;
                    Ok(Val::T(lw.node(Op::Binary(Bin::Mul), fd, ts, &[total, inv], &origin)?))
                }
                "norm" => {
                    let fd = if d.is_float() { d } else { Dtype::F32 };
                    n = lw.cast(n, fd, &origin)?;
                    let s = lw.shape_of(n);
                    let sq = lw.node(Op::Binary(Bin::Mul), fd, s, &[n, n], &origin)?;
                    let total = lw.reduce_node(sq, Red::Sum, &axes, keep, &origin)?;
                    lw.unary_val(Un::Sqrt, Val::T(total), true, span)
                }
                _ => {
                    let fd = if d.is_float() { d } else { Dtype::F32 };
                    n = lw.cast(n, fd, &origin)?;
                    Ok(Val::T(logsumexp(lw, n, &axes, keep, &origin)?))
                }
            }
        }
        "softmax" | "log_softmax" => {
            let v = x()?;
            let mut n = lw.as_tensor(&v, span)?;
            let d = lw.dtype_of(n);
            let fd = if d.is_float() { d } else { Dtype::F32 };
            n = lw.cast(n, fd, &origin)?;
            let s = lw.shape_of(n);
            let ax = axis_of(lw, get(1), Some(-1), s.len(), span)?.unwrap_or(0);
            let lse = logsumexp(lw, n, &[ax], true, &origin)?;
            let lse = lw.broadcast(lse, &s, &origin)?;
            let logp = lw.node(Op::Binary(Bin::Sub), fd, s.clone(), &[n, lse], &origin)?;
            if name == "log_softmax" {
                return Ok(Val::T(logp));
            }
            Ok(Val::T(lw.node(Op::Unary(Un::Exp), fd, s, &[logp], &origin)?))
        }
        "quantile" => {
            let n = lw.as_tensor(&x()?, span)?;
            let d = lw.dtype_of(n);
            let fd = if d.is_float() { d } else { Dtype::F32 };
            let n = lw.cast(n, fd, &origin)?;
            let q = lw.node_of(get(1).unwrap_or(&Val::Float(0.5)), fd, &origin, span)?;
            Ok(Val::T(lw.node(Op::Quantile, fd, vec![], &[n, q], &origin)?))
        }
        "gather" | "scatter_add" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let iv = lw.as_tensor(get(1).unwrap_or(&Val::Int(0)), span)?;
            let xs = lw.shape_of(xv);
            let axis_slot = if name == "gather" { 2 } else { 3 };
            let ax = axis_of(lw, get(axis_slot), Some(-1), xs.len(), span)?.unwrap_or(0);
            let is = lw.shape_of(iv);
            // One index per row: expand to take_along_axis form with extent 1.
            let (iv, squeeze) = if is.len() + 1 == xs.len() {
                let mut e = is.clone();
                e.insert(ax, 1);
                (lw.reshape(iv, e, &origin)?, true)
            } else {
                (iv, false)
            };
            let ish = lw.shape_of(iv);
            let d = lw.dtype_of(xv);
            if name == "gather" {
                let g = lw.node(Op::Gather { axis: ax }, d, ish, &[xv, iv], &origin)?;
                return Ok(Val::T(if squeeze { lw.reshape(g, is, &origin)? } else { g }));
            }
            let vals = lw.node_of(get(2).unwrap_or(&Val::Float(0.0)), d, &origin, span)?;
            let vals = lw.reshape(vals, lw.shape_of(iv), &origin)?;
            Ok(Val::T(lw.node(Op::ScatterAdd { axis: ax }, d, xs, &[xv, iv, vals], &origin)?))
        }
        "one_hot" => {
            let iv = lw.as_tensor(&x()?, span)?;
            let Some(Val::Int(classes)) = get(1) else { return lw.fail(span, "`n` must be a constant") };
            let dtype = dtype_arg(lw, get(2), Dtype::F32, span)?;
            let mut s = lw.shape_of(iv);
            s.push(*classes as usize);
            let mut e = lw.shape_of(iv);
            e.push(1);
            let idx = lw.reshape(iv, e, &origin)?;
            let idx = lw.cast(idx, Dtype::I32, &origin)?;
            let idx = lw.broadcast(idx, &s, &origin)?;
            let io = lw.node(Op::Iota { axis: s.len() - 1 }, Dtype::I32, s.clone(), &[], &origin)?;
            let eq = lw.node(Op::Binary(Bin::Eq), Dtype::Bool, s.clone(), &[idx, io], &origin)?;
            Ok(Val::T(lw.node(Op::Cast, dtype, s, &[eq], &origin)?))
        }
        "sort" | "argsort" | "topk" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let s = lw.shape_of(xv);
            let (axis_slot, desc) = match name {
                "topk" => (2, true),
                _ => (1, bool_arg(get(2))),
            };
            let ax = axis_of(lw, get(axis_slot), Some(-1), s.len(), span)?.unwrap_or(0);
            let order = lw.node(Op::ArgSort { axis: ax, descending: desc }, Dtype::I32, s.clone(), &[xv], &origin)?;
            if name == "argsort" {
                return Ok(Val::T(order));
            }
            let order = if name == "topk" {
                let Some(Val::Int(k)) = get(1) else { return lw.fail(span, "`k` must be a constant") };
                let mut ks = s.clone();
                ks[ax] = (*k as usize).min(s[ax]);
                lw.node(Op::Slice { axis: ax, start: 0 }, Dtype::I32, ks, &[order], &origin)?
            } else {
                order
            };
            let os = lw.shape_of(order);
            let d = lw.dtype_of(xv);
            Ok(Val::T(lw.node(Op::Gather { axis: ax }, d, os, &[xv, order], &origin)?))
        }
        "cumsum" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let s = lw.shape_of(xv);
            let ax = axis_of(lw, get(1), Some(-1), s.len(), span)?.unwrap_or(0);
            let d = lw.dtype_of(xv);
            Ok(Val::T(lw.node(Op::CumSum { axis: ax }, d, s, &[xv], &origin)?))
        }
        "keep_top" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let s = lw.shape_of(xv);
            let (Some(Val::Int(n)), Some(Val::Int(m))) = (get(1), get(2)) else {
                return lw.fail(span, "`n` and `m` must be constants");
            };
            let ax = axis_of(lw, get(3), Some(-1), s.len(), span)?.unwrap_or(0);
            if *m <= 0 || s[ax] % (*m as usize) != 0 {
                return lw.fail(span, format!("groups of {m} do not divide the axis of extent {}", s[ax]));
            }
            Ok(Val::T(lw.node(
                Op::KeepTop { n: (*n).max(0) as usize, m: *m as usize, axis: ax },
                Dtype::Bool,
                s,
                &[xv],
                &origin,
            )?))
        }
        "reshape" | "broadcast" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let target = ints(lw, get(1).unwrap_or(&Val::List(vec![])), span)?;
            let total: usize = lw.shape_of(xv).iter().product();
            let known: i64 = target.iter().filter(|d| **d != -1).product();
            let shape: Vec<usize> =
                target.iter().map(|d| if *d == -1 { total / known.max(1) as usize } else { *d as usize }).collect();
            if name == "reshape" {
                if shape.iter().product::<usize>() != total {
                    return lw.fail(span, format!("cannot reshape {:?} to {shape:?}", lw.shape_of(xv)));
                }
                return Ok(Val::T(lw.reshape(xv, shape, &origin)?));
            }
            Ok(Val::T(lw.broadcast(xv, &shape, &origin)?))
        }
        "flatten" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let total: usize = lw.shape_of(xv).iter().product();
            Ok(Val::T(lw.reshape(xv, vec![total], &origin)?))
        }
        "transpose" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let r = lw.shape_of(xv).len();
            let perm: Vec<usize> = match get(1) {
                None => (0..r).rev().collect(),
                Some(p) => ints(lw, p, span)?.into_iter().map(|i| ((i + r as i64) % r as i64) as usize).collect(),
            };
            lw.transpose_val(xv, perm, &origin)
        }
        "expand_dims" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let mut s = lw.shape_of(xv);
            let ax = axis_of(lw, get(1), None, s.len() + 1, span)?.unwrap_or(0);
            s.insert(ax, 1);
            Ok(Val::T(lw.reshape(xv, s, &origin)?))
        }
        "concat" => {
            let Some(Val::List(items)) = get(0).cloned() else { return lw.fail(span, "`concat` takes a list") };
            let mut nodes = vec![];
            for it in &items {
                nodes.push(lw.as_tensor(it, span)?);
            }
            let Some(first) = nodes.first().copied() else { return lw.fail(span, "`concat` of nothing") };
            let mut s = lw.shape_of(first);
            let ax = axis_of(lw, get(1), Some(0), s.len(), span)?.unwrap_or(0);
            s[ax] = nodes.iter().map(|n| lw.shape_of(*n)[ax]).sum();
            let d = lw.dtype_of(first);
            Ok(Val::T(lw.node(Op::Concat { axis: ax }, d, s, &nodes, &origin)?))
        }
        "slice" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let (Some(Val::Int(a)), Some(Val::Int(b))) = (get(1), get(2)) else {
                return lw.fail(span, "slice bounds must be constants");
            };
            let mut s = lw.shape_of(xv);
            let ax = axis_of(lw, get(3), Some(0), s.len(), span)?.unwrap_or(0);
            if *a < 0 || b < a || *b as usize > s[ax] {
                return lw.fail(span, format!("slice {a}..{b} out of range for extent {}", s[ax]));
            }
            s[ax] = (*b - *a) as usize;
            let d = lw.dtype_of(xv);
            Ok(Val::T(lw.node(Op::Slice { axis: ax, start: *a as usize }, d, s, &[xv], &origin)?))
        }
        "zeros" | "ones" | "full" => {
            let shape = match (get(0), lw.init_shape.clone()) {
                (Some(v), _) => usizes(lw, v, span)?,
                (None, Some(s)) => s,
                (None, None) => return lw.fail(span, "a shape is needed"),
            };
            let (dtype, value) = match name {
                "zeros" => (dtype_arg(lw, get(1), Dtype::F32, span)?, 0.0),
                "ones" => (dtype_arg(lw, get(1), Dtype::F32, span)?, 1.0),
                _ => {
                    let v = match get(1) {
                        Some(Val::Float(f)) => *f,
                        Some(Val::Int(i)) => *i as f64,
                        None => 0.0,
                        Some(_) => return lw.fail(span, "`value` must be a number"),
                    };
                    (dtype_arg(lw, get(2), Dtype::F32, span)?, v)
                }
            };
            let c = lw.constant(dtype, value, &origin)?;
            Ok(Val::T(lw.broadcast(c, &shape, &origin)?))
        }
        "zeros_like" | "ones_like" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let (s, d) = (lw.shape_of(xv), lw.dtype_of(xv));
            let c = lw.constant(d, if name == "zeros_like" { 0.0 } else { 1.0 }, &origin)?;
            Ok(Val::T(lw.broadcast(c, &s, &origin)?))
        }
        "iota" => {
            let Some(Val::Int(n)) = get(0) else { return lw.fail(span, "`iota` needs a constant length") };
            let dtype = dtype_arg(lw, get(1), Dtype::I32, span)?;
            Ok(Val::T(lw.node(Op::Iota { axis: 0 }, dtype, vec![(*n).max(0) as usize], &[], &origin)?))
        }
        "uniform" | "normal" => {
            let shape = match (get(0), lw.init_shape.clone()) {
                (Some(v), _) => usizes(lw, v, span)?,
                (None, Some(s)) => s,
                (None, None) => return lw.fail(span, "a shape is needed"),
            };
            let stream = lw.stream();
            let op = if name == "uniform" { Op::Uniform { stream } } else { Op::Normal { stream } };
            let base = lw.node(op, Dtype::F32, shape.clone(), &[], &origin)?;
            // uniform: low + (high - low) u; normal: mean + std z.
            let (a, b) = if name == "uniform" {
                (get(1).cloned().unwrap_or(Val::Float(0.0)), get(2).cloned().unwrap_or(Val::Float(1.0)))
            } else {
                (get(1).cloned().unwrap_or(Val::Float(0.0)), get(2).cloned().unwrap_or(Val::Float(1.0)))
            };
            let scale = if name == "uniform" { lw.binary(lang::ast::BinOp::Sub, b, a.clone(), span)? } else { b };
            let scaled = lw.binary(lang::ast::BinOp::Mul, Val::T(base), scale, span)?;
            lw.binary(lang::ast::BinOp::Add, scaled, a, span)
        }
        "sample" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let s = lw.shape_of(xv);
            let ax = axis_of(lw, get(1), Some(-1), s.len(), span)?.unwrap_or(0);
            let out: Vec<usize> = s.iter().enumerate().filter(|(i, _)| *i != ax).map(|(_, d)| *d).collect();
            let stream = lw.stream();
            Ok(Val::T(lw.node(Op::Sample { stream, axis: ax }, Dtype::I32, out, &[xv], &origin)?))
        }
        "qr" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let s = lw.shape_of(xv);
            if s.len() != 2 || s[0] < s[1] {
                return lw.fail(span, format!("`qr` needs a tall matrix [m, n] with m ≥ n, got {s:?}"));
            }
            let d = lw.dtype_of(xv);
            let fd = if d.is_float() { d } else { Dtype::F32 };
            let xv = lw.cast(xv, fd, &origin)?;
            Ok(Val::T(lw.node(Op::Qr, fd, s, &[xv], &origin)?))
        }
        "solve" => {
            let av = lw.as_tensor(&x()?, span)?;
            let Some(b) = get(1) else { return lw.fail(span, "`solve` needs a right-hand side") };
            let bv = lw.as_tensor(b, span)?;
            let (sa, sb) = (lw.shape_of(av), lw.shape_of(bv));
            if sa.len() != 2 || sa[0] != sa[1] || sb.len() != 2 || sb[0] != sa[0] {
                return lw
                    .fail(span, format!("`solve` needs a square matrix [n, n] and [n, k], got {sa:?} and {sb:?}"));
            }
            let d = lw.dtype_of(av);
            let fd = if d.is_float() { d } else { Dtype::F32 };
            let av = lw.cast(av, fd, &origin)?;
            let bv = lw.cast(bv, fd, &origin)?;
            Ok(Val::T(lw.node(Op::Solve, fd, sb, &[av, bv], &origin)?))
        }
        "svd_topk" => {
            let xv = lw.as_tensor(&x()?, span)?;
            let s = lw.shape_of(xv);
            let Some(Val::Int(k)) = get(1) else { return lw.fail(span, "`k` must be a constant") };
            let right = !matches!(get(2), Some(Val::Str(side)) if side == "left");
            let k = (*k).max(0) as usize;
            if s.len() != 2 || k > s[0].min(s[1]) {
                return lw.fail(span, format!("`svd_topk` needs a matrix and k ≤ min(m, n), got {s:?} and k = {k}"));
            }
            let d = lw.dtype_of(xv);
            let fd = if d.is_float() { d } else { Dtype::F32 };
            let xv = lw.cast(xv, fd, &origin)?;
            let out = if right { vec![k, s[1]] } else { vec![s[0], k] };
            Ok(Val::T(lw.node(Op::SvdTopK { k, right }, fd, out, &[xv], &origin)?))
        }
        "text" | "tokens" => lw.fail(span, format!("`{name}` is a data source for `recipec train`")),
        other => lw.fail(span, format!("`{other}` is not lowered yet")),
    }
}

/// `m + log(sum(exp(x - m)))` with `m = stop_gradient(max(x))` (0 where the max is not
/// finite, so rows of `-inf` give `-inf` instead of NaN).
pub(crate) fn logsumexp(lw: &mut Lowerer, x: NodeId, axes: &[usize], keep: bool, origin: &str) -> R<NodeId> {
    let s = lw.shape_of(x);
    let d = lw.dtype_of(x);
    let m = lw.reduce_node(x, Red::Max, axes, true, origin)?;
    let ms = lw.shape_of(m);
    let m = lw.node(Op::Unary(Un::StopGradient), d, ms.clone(), &[m], origin)?;
    let ninf = lw.constant(d, f64::NEG_INFINITY, origin)?;
    let ninf = lw.broadcast(ninf, &ms, origin)?;
    let pinf = lw.constant(d, f64::INFINITY, origin)?;
    let pinf = lw.broadcast(pinf, &ms, origin)?;
    let gt = lw.node(Op::Binary(Bin::Gt), Dtype::Bool, ms.clone(), &[m, ninf], origin)?;
    let lt = lw.node(Op::Binary(Bin::Lt), Dtype::Bool, ms.clone(), &[m, pinf], origin)?;
    let finite = lw.node(Op::Binary(Bin::And), Dtype::Bool, ms.clone(), &[gt, lt], origin)?;
    let zero = lw.constant(d, 0.0, origin)?;
    let zero = lw.broadcast(zero, &ms, origin)?;
    let m = lw.node(Op::Select, d, ms.clone(), &[finite, m, zero], origin)?;
    let mb = lw.broadcast(m, &s, origin)?;
    let shifted = lw.node(Op::Binary(Bin::Sub), d, s.clone(), &[x, mb], origin)?;
    let e = lw.node(Op::Unary(Un::Exp), d, s.clone(), &[shifted], origin)?;
    let total = lw.reduce_node(e, Red::Sum, axes, true, origin)?;
    let l = lw.node(Op::Unary(Un::Log), d, ms.clone(), &[total], origin)?;
    let r = lw.node(Op::Binary(Bin::Add), d, ms.clone(), &[l, m], origin)?;
    if keep {
        return Ok(r);
    }
    let out: Vec<usize> = s.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect();
    lw.reshape(r, out, origin)
}
