//! Reverse-mode automatic differentiation over the graph: gradients are ordinary nodes.
//!
//! Conventions at non-differentiable points (as in JAX): `relu'(0) = 0`; `abs'(0) = 0`
//! (via `sign`); `max`/`min` of two values split the gradient equally on ties; a `max`/`min`
//! reduction splits it equally among all tied maxima; `floor`, `ceil`, `round`, `sign`,
//! comparisons, `argmax`, `argsort`, `keep_top`, `quantile`, `qr`, `svd_topk` and random draws have zero
//! gradient (they are locally constant); integer and boolean values carry no gradient;
//! `stop_gradient(x)` has zero gradient; `x ^ y` differentiates in `y` only where `x > 0`.

use crate::ir::{Bin, Graph, IrError, NodeId, Op, Red, Un};
use lang::types::Dtype;
use std::collections::HashMap;

type R<T> = Result<T, IrError>;

struct Ad<'g> {
    g: &'g mut Graph,
    origin: String,
}

impl Ad<'_> {
    fn add(&mut self, op: Op, dtype: Dtype, shape: Vec<usize>, ops: &[NodeId]) -> R<NodeId> {
        let o = self.origin.clone();
        self.g.add(op, dtype, shape, ops, &o)
    }
    fn shape(&self, n: NodeId) -> Vec<usize> {
        self.g.node(n).shape.clone()
    }
    fn dtype(&self, n: NodeId) -> Dtype {
        self.g.node(n).dtype
    }
    fn c(&mut self, v: f64, like: NodeId) -> R<NodeId> {
        let (d, s) = (self.dtype(like), self.shape(like));
        let k = self.add(Op::Const { value: v }, d, vec![], &[])?;
        if s.is_empty() {
            return Ok(k);
        }
        self.add(Op::Broadcast, d, s, &[k])
    }
    fn bin(&mut self, b: Bin, x: NodeId, y: NodeId) -> R<NodeId> {
        let (d, s) = (self.dtype(x), self.shape(x));
        let out = if matches!(b, Bin::Eq | Bin::Ne | Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::And | Bin::Or) {
            Dtype::Bool
        } else {
            d
        };
        self.add(Op::Binary(b), out, s, &[x, y])
    }
    fn un(&mut self, u: Un, x: NodeId) -> R<NodeId> {
        let (d, s) = (self.dtype(x), self.shape(x));
        self.add(Op::Unary(u), d, s, &[x])
    }
    fn mul(&mut self, x: NodeId, y: NodeId) -> R<NodeId> {
        self.bin(Bin::Mul, x, y)
    }
    fn cast(&mut self, x: NodeId, d: Dtype) -> R<NodeId> {
        if self.dtype(x) == d {
            return Ok(x);
        }
        let s = self.shape(x);
        self.add(Op::Cast, d, s, &[x])
    }
    fn select(&mut self, c: NodeId, a: NodeId, b: NodeId) -> R<NodeId> {
        let (d, s) = (self.dtype(a), self.shape(a));
        self.add(Op::Select, d, s, &[c, a, b])
    }
    fn reshape(&mut self, x: NodeId, s: Vec<usize>) -> R<NodeId> {
        if self.shape(x) == s {
            return Ok(x);
        }
        let d = self.dtype(x);
        self.add(Op::Reshape, d, s, &[x])
    }
    fn broadcast(&mut self, x: NodeId, s: Vec<usize>) -> R<NodeId> {
        if self.shape(x) == s {
            return Ok(x);
        }
        let d = self.dtype(x);
        self.add(Op::Broadcast, d, s, &[x])
    }
    /// Sums `d` (of shape `from`) down to the operand shape `to` of a broadcast.
    fn unbroadcast(&mut self, d: NodeId, to: &[usize]) -> R<NodeId> {
        let from = self.shape(d);
        let off = from.len() - to.len();
        let axes: Vec<usize> = (0..from.len()).filter(|i| *i < off || (to[*i - off] == 1 && from[*i] != 1)).collect();
        if axes.is_empty() {
            return self.reshape(d, to.to_vec());
        }
        let kept: Vec<usize> = from.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, x)| *x).collect();
        let dt = self.dtype(d);
        let s = self.add(Op::Reduce { op: Red::Sum, axes }, dt, kept, &[d])?;
        self.reshape(s, to.to_vec())
    }
    /// Expands a reduction's adjoint back to the input shape.
    fn expand(&mut self, d: NodeId, axes: &[usize], input: &[usize]) -> R<NodeId> {
        let kept: Vec<usize> = input.iter().enumerate().map(|(i, x)| if axes.contains(&i) { 1 } else { *x }).collect();
        let r = self.reshape(d, kept)?;
        self.broadcast(r, input.to_vec())
    }
}

/// Appends to `g` the gradient of the scalar `output` with respect to each node of `wrt`
/// (floating-point nodes). Returns one gradient node per entry of `wrt` (zeros where the
/// output does not depend on it).
pub fn grad(g: &mut Graph, output: NodeId, wrt: &[NodeId]) -> R<Vec<NodeId>> {
    if !g.node(output).shape.is_empty() || !g.node(output).dtype.is_float() {
        return Err(IrError("gradients are taken of a floating-point scalar".into()));
    }
    let order = g.topo();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // Only nodes on a path from a `wrt` node to the output need adjoints.
    let mut reaches_output: std::collections::HashSet<NodeId> = [output].into_iter().collect();
    for n in order.iter().rev() {
        if g.users(*n).iter().any(|u| reaches_output.contains(u)) {
            reaches_output.insert(*n);
        }
    }
    let mut adj: HashMap<NodeId, NodeId> = HashMap::new();
    let mut ad = Ad { g, origin: "autodiff".into() };
    let one = ad.c(1.0, output)?;
    adj.insert(output, one);
    let mut todo: Vec<NodeId> = order.iter().copied().filter(|n| pos[n] <= pos[&output]).collect();
    todo.reverse();
    for n in todo {
        let Some(&d) = adj.get(&n) else { continue };
        if !reaches_output.contains(&n) {
            continue;
        }
        let node = ad.g.node(n).clone();
        ad.origin = format!("d/{}", if node.origin.is_empty() { node.op.name() } else { node.origin.clone() });
        let ops = ad.g.operands(n);
        let contributions = rule(&mut ad, n, &node, &ops, d)?;
        for (operand, c) in contributions {
            let on = ad.g.node(operand);
            if !on.dtype.is_float() {
                continue;
            }
            let c = ad.cast(c, on.dtype)?;
            let total = match adj.get(&operand) {
                Some(prev) => ad.bin(Bin::Add, *prev, c)?,
                None => c,
            };
            adj.insert(operand, total);
        }
    }
    let mut out = vec![];
    for w in wrt {
        out.push(match adj.get(w) {
            Some(a) => *a,
            None => ad.c(0.0, *w)?,
        });
    }
    Ok(out)
}

/// The gradient rule of each op: contributions `(operand, adjoint)` given the node's
/// adjoint `d`. The derivative is written on each arm.
fn rule(ad: &mut Ad, n: NodeId, node: &crate::ir::Node, o: &[NodeId], d: NodeId) -> R<Vec<(NodeId, NodeId)>> {
    let x = o.first().copied();
    Ok(match &node.op {
        Op::Input { .. } | Op::Const { .. } | Op::Iota { .. } | Op::Uniform { .. } | Op::Normal { .. } => vec![],
        Op::Unary(u) => {
            let x = x.expect("one operand");
            let dx = match u {
                // d(-x) = -dx
                Un::Neg => ad.un(Un::Neg, d)?,
                // d exp(x) = exp(x) dx
                Un::Exp => ad.mul(d, n)?,
                // d log(x) = dx / x
                Un::Log => ad.bin(Bin::Div, d, x)?,
                // d log(1 + x) = dx / (1 + x)
                Un::Log1p => {
                    let one = ad.c(1.0, x)?;
                    let den = ad.bin(Bin::Add, one, x)?;
                    ad.bin(Bin::Div, d, den)?
                }
                // d √x = dx / (2 √x)
                Un::Sqrt => {
                    let two = ad.c(2.0, x)?;
                    let den = ad.mul(two, n)?;
                    ad.bin(Bin::Div, d, den)?
                }
                // d x^(-1/2) = -(1/2) x^(-3/2) dx = -(1/2) rsqrt(x) / x dx
                Un::Rsqrt => {
                    let h = ad.c(-0.5, x)?;
                    let t = ad.bin(Bin::Div, n, x)?;
                    let t = ad.mul(h, t)?;
                    ad.mul(d, t)?
                }
                // d tanh(x) = (1 - tanh²(x)) dx
                Un::Tanh => {
                    let one = ad.c(1.0, x)?;
                    let sq = ad.mul(n, n)?;
                    let t = ad.bin(Bin::Sub, one, sq)?;
                    ad.mul(d, t)?
                }
                // d σ(x) = σ(x)(1 - σ(x)) dx
                Un::Sigmoid => {
                    let one = ad.c(1.0, x)?;
                    let t = ad.bin(Bin::Sub, one, n)?;
                    let t = ad.mul(n, t)?;
                    ad.mul(d, t)?
                }
                // d softplus(x) = σ(x) dx
                Un::Softplus => {
                    let s = ad.un(Un::Sigmoid, x)?;
                    ad.mul(d, s)?
                }
                // d [x Φ(x)] = (Φ(x) + x φ(x)) dx, Φ(x) = (1 + erf(x/√2))/2, φ(x) = e^{-x²/2}/√(2π)
                Un::Gelu => {
                    let r2 = ad.c(std::f64::consts::FRAC_1_SQRT_2, x)?;
                    let xs = ad.mul(x, r2)?;
                    let e = ad.un(Un::Erf, xs)?;
                    let one = ad.c(1.0, x)?;
                    let half = ad.c(0.5, x)?;
                    let cdf = ad.bin(Bin::Add, one, e)?;
                    let cdf = ad.mul(half, cdf)?;
                    let x2 = ad.mul(x, x)?;
                    let mh = ad.c(-0.5, x)?;
                    let ex = ad.mul(mh, x2)?;
                    let ex = ad.un(Un::Exp, ex)?;
                    let k = ad.c(1.0 / (2.0 * std::f64::consts::PI).sqrt(), x)?;
                    let pdf = ad.mul(k, ex)?;
                    let xp = ad.mul(x, pdf)?;
                    let t = ad.bin(Bin::Add, cdf, xp)?;
                    ad.mul(d, t)?
                }
                // y = ½x(1 + tanh u), u = c(x + 0.044715x³):
                // y' = ½(1 + tanh u) + ½x(1 - tanh²u) c(1 + 3·0.044715x²)
                Un::GeluTanh => {
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    let x2 = ad.mul(x, x)?;
                    let x3 = ad.mul(x2, x)?;
                    let k = ad.c(0.044715, x)?;
                    let kx3 = ad.mul(k, x3)?;
                    let inner = ad.bin(Bin::Add, x, kx3)?;
                    let cc = ad.c(c, x)?;
                    let u = ad.mul(cc, inner)?;
                    let t = ad.un(Un::Tanh, u)?;
                    let one = ad.c(1.0, x)?;
                    let half = ad.c(0.5, x)?;
                    let a = ad.bin(Bin::Add, one, t)?;
                    let a = ad.mul(half, a)?;
                    let t2 = ad.mul(t, t)?;
                    let sech = ad.bin(Bin::Sub, one, t2)?;
                    let k3 = ad.c(3.0 * 0.044715, x)?;
                    let k3x2 = ad.mul(k3, x2)?;
                    let du = ad.bin(Bin::Add, one, k3x2)?;
                    let du = ad.mul(cc, du)?;
                    let b = ad.mul(half, x)?;
                    let b = ad.mul(b, sech)?;
                    let b = ad.mul(b, du)?;
                    let t = ad.bin(Bin::Add, a, b)?;
                    ad.mul(d, t)?
                }
                // d [x σ(x)] = (σ + x σ (1 - σ)) dx
                Un::Silu => {
                    let s = ad.un(Un::Sigmoid, x)?;
                    let one = ad.c(1.0, x)?;
                    let oms = ad.bin(Bin::Sub, one, s)?;
                    let t = ad.mul(x, oms)?;
                    let t = ad.bin(Bin::Add, one, t)?;
                    let t = ad.mul(s, t)?;
                    ad.mul(d, t)?
                }
                // d erf(x) = 2/√π e^{-x²} dx
                Un::Erf => {
                    let x2 = ad.mul(x, x)?;
                    let nx2 = ad.un(Un::Neg, x2)?;
                    let e = ad.un(Un::Exp, nx2)?;
                    let k = ad.c(std::f64::consts::FRAC_2_SQRT_PI, x)?;
                    let t = ad.mul(k, e)?;
                    ad.mul(d, t)?
                }
                // d cos(x) = -sin(x) dx
                Un::Cos => {
                    let s = ad.un(Un::Sin, x)?;
                    let s = ad.un(Un::Neg, s)?;
                    ad.mul(d, s)?
                }
                // d sin(x) = cos(x) dx
                Un::Sin => {
                    let c = ad.un(Un::Cos, x)?;
                    ad.mul(d, c)?
                }
                // d |x| = sign(x) dx (0 at 0)
                Un::Abs => {
                    let s = ad.un(Un::Sign, x)?;
                    ad.mul(d, s)?
                }
                // d relu(x) = [x > 0] dx (0 at 0)
                Un::Relu => {
                    let z = ad.c(0.0, x)?;
                    let pos = ad.bin(Bin::Gt, x, z)?;
                    ad.select(pos, d, z)?
                }
                // Locally constant: zero gradient.
                Un::Sign | Un::Floor | Un::Ceil | Un::Round | Un::StopGradient | Un::Not => return Ok(vec![]),
            };
            vec![(x, dx)]
        }
        Op::Binary(b) => {
            let (a, y) = (o[0], o[1]);
            match b {
                // d(a + b) = da + db
                Bin::Add => vec![(a, d), (y, d)],
                // d(a - b) = da - db
                Bin::Sub => {
                    let nd = ad.un(Un::Neg, d)?;
                    vec![(a, d), (y, nd)]
                }
                // d(a b) = b da + a db
                Bin::Mul => {
                    let da = ad.mul(d, y)?;
                    let db = ad.mul(d, a)?;
                    vec![(a, da), (y, db)]
                }
                // d(a / b) = da / b - a/b² db
                Bin::Div => {
                    let da = ad.bin(Bin::Div, d, y)?;
                    let q = ad.bin(Bin::Div, n, y)?;
                    let db = ad.mul(d, q)?;
                    let db = ad.un(Un::Neg, db)?;
                    vec![(a, da), (y, db)]
                }
                // d(a mod b) = da - floor(a/b) db
                Bin::Rem => {
                    let q = ad.bin(Bin::Div, a, y)?;
                    let q = ad.un(Un::Floor, q)?;
                    let db = ad.mul(d, q)?;
                    let db = ad.un(Un::Neg, db)?;
                    vec![(a, d), (y, db)]
                }
                // d(a^b) = b a^(b-1) da + a^b log(a) db   (the db term only where a > 0)
                Bin::Pow => {
                    let one = ad.c(1.0, a)?;
                    let bm1 = ad.bin(Bin::Sub, y, one)?;
                    let p = ad.bin(Bin::Pow, a, bm1)?;
                    let t = ad.mul(y, p)?;
                    let da = ad.mul(d, t)?;
                    let z = ad.c(0.0, a)?;
                    let pos = ad.bin(Bin::Gt, a, z)?;
                    let safe = ad.select(pos, a, one)?;
                    let l = ad.un(Un::Log, safe)?;
                    let t = ad.mul(n, l)?;
                    let t = ad.select(pos, t, z)?;
                    let db = ad.mul(d, t)?;
                    vec![(a, da), (y, db)]
                }
                // d max(a, b) = [a > b] da + [b > a] db, ties split ½/½ (min likewise)
                Bin::Max | Bin::Min => {
                    let cmp = if *b == Bin::Max { Bin::Gt } else { Bin::Lt };
                    let wa = ad.bin(cmp, a, y)?;
                    let eq = ad.bin(Bin::Eq, a, y)?;
                    let one = ad.c(1.0, a)?;
                    let half = ad.c(0.5, a)?;
                    let z = ad.c(0.0, a)?;
                    let fa = ad.select(wa, one, z)?;
                    let fa = ad.select(eq, half, fa)?;
                    let fb = ad.bin(Bin::Sub, one, fa)?;
                    let da = ad.mul(d, fa)?;
                    let db = ad.mul(d, fb)?;
                    vec![(a, da), (y, db)]
                }
                Bin::Eq | Bin::Ne | Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::And | Bin::Or => vec![],
            }
        }
        // d where(c, a, b) = where(c, d, 0) for a, where(c, 0, d) for b
        Op::Select => {
            let z = ad.c(0.0, d)?;
            let da = ad.select(o[0], d, z)?;
            let db = ad.select(o[0], z, d)?;
            vec![(o[1], da), (o[2], db)]
        }
        // A cast between floats passes the gradient through (in the operand's dtype).
        Op::Cast => vec![(o[0], d)],
        // Broadcasting sums the adjoint over the broadcast axes.
        Op::Broadcast => {
            let to = ad.shape(o[0]);
            let r = ad.unbroadcast(d, &to)?;
            vec![(o[0], r)]
        }
        Op::Reduce { op, axes } => {
            let x = o[0];
            let xs = ad.shape(x);
            match op {
                // d Σx = broadcast(d)
                Red::Sum => {
                    let e = ad.expand(d, axes, &xs)?;
                    vec![(x, e)]
                }
                // d Πx = (Πx / x) d   (assumes no zero entries)
                Red::Prod => {
                    let e = ad.expand(d, axes, &xs)?;
                    let p = ad.expand(n, axes, &xs)?;
                    let q = ad.bin(Bin::Div, p, x)?;
                    let r = ad.mul(e, q)?;
                    vec![(x, r)]
                }
                // d max x = [x = max] / #ties · d
                Red::Max | Red::Min => {
                    let m = ad.expand(n, axes, &xs)?;
                    let hit = ad.bin(Bin::Eq, x, m)?;
                    let one = ad.c(1.0, x)?;
                    let z = ad.c(0.0, x)?;
                    let ind = ad.select(hit, one, z)?;
                    let kept: Vec<usize> =
                        xs.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, v)| *v).collect();
                    let dt = ad.dtype(x);
                    let count = ad.add(Op::Reduce { op: Red::Sum, axes: axes.clone() }, dt, kept, &[ind])?;
                    let count = ad.expand(count, axes, &xs)?;
                    let e = ad.expand(d, axes, &xs)?;
                    let r = ad.mul(e, ind)?;
                    let r = ad.bin(Bin::Div, r, count)?;
                    vec![(x, r)]
                }
                Red::ArgMax | Red::ArgMin => vec![],
            }
        }
        // d(A B) = dC Bᵀ for A, Aᵀ dC for B
        Op::MatMul => {
            let (a, b) = (o[0], o[1]);
            let r = ad.shape(a).len();
            let mut perm: Vec<usize> = (0..r).collect();
            perm.swap(r - 1, r - 2);
            let tr = |ad: &mut Ad, x: NodeId| -> R<NodeId> {
                let s = ad.shape(x);
                let t: Vec<usize> = perm.iter().map(|p| s[*p]).collect();
                let dt = ad.dtype(x);
                ad.add(Op::Transpose { perm: perm.clone() }, dt, t, &[x])
            };
            let bt = tr(ad, b)?;
            let at = tr(ad, a)?;
            let (sa, sb) = (ad.shape(a), ad.shape(b));
            let dt = ad.dtype(a);
            let da = ad.add(Op::MatMul, dt, sa, &[d, bt])?;
            let db = ad.add(Op::MatMul, dt, sb, &[at, d])?;
            vec![(a, da), (b, db)]
        }
        // X = A⁻¹B: dB = A⁻ᵀ dX = solve(Aᵀ, dX), dA = −dB Xᵀ
        Op::Solve => {
            let (a, b) = (o[0], o[1]);
            let dt = ad.dtype(a);
            let (sa, sb) = (ad.shape(a), ad.shape(b));
            let at = ad.add(Op::Transpose { perm: vec![1, 0] }, dt, sa.clone(), &[a])?;
            let db = ad.add(Op::Solve, dt, sb.clone(), &[at, d])?;
            let xt = ad.add(Op::Transpose { perm: vec![1, 0] }, dt, vec![sb[1], sb[0]], &[n])?;
            let p = ad.add(Op::MatMul, dt, sa, &[db, xt])?;
            let da = ad.un(Un::Neg, p)?;
            vec![(a, da), (b, db)]
        }
        // The inverse permutation.
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, p) in perm.iter().enumerate() {
                inv[*p] = i;
            }
            let s = ad.shape(o[0]);
            let dt = ad.dtype(d);
            let r = ad.add(Op::Transpose { perm: inv }, dt, s, &[d])?;
            vec![(o[0], r)]
        }
        Op::Reshape => {
            let s = ad.shape(o[0]);
            let r = ad.reshape(d, s)?;
            vec![(o[0], r)]
        }
        // d gather(x, i) = scatter_add(0, i, d)
        Op::Gather { axis } => {
            let z = ad.c(0.0, o[0])?;
            let s = ad.shape(o[0]);
            let dt = ad.dtype(o[0]);
            let r = ad.add(Op::ScatterAdd { axis: *axis }, dt, s, &[z, o[1], d])?;
            vec![(o[0], r)]
        }
        // d scatter_add(x, i, v) = d for x, gather(d, i) for v
        Op::ScatterAdd { axis } => {
            let s = ad.shape(o[2]);
            let dt = ad.dtype(d);
            let g = ad.add(Op::Gather { axis: *axis }, dt, s, &[d, o[1]])?;
            vec![(o[0], d), (o[2], g)]
        }
        // d take(x, i) = take_add(0, i, d)
        Op::Take { axis } => {
            let z = ad.c(0.0, o[0])?;
            let s = ad.shape(o[0]);
            let dt = ad.dtype(o[0]);
            let r = ad.add(Op::TakeAdd { axis: *axis }, dt, s, &[z, o[1], d])?;
            vec![(o[0], r)]
        }
        Op::TakeAdd { axis } => {
            let s = ad.shape(o[2]);
            let dt = ad.dtype(d);
            let g = ad.add(Op::Take { axis: *axis }, dt, s, &[d, o[1]])?;
            vec![(o[0], d), (o[2], g)]
        }
        // d slice(x) = pad(d)
        Op::Slice { axis, start } => {
            let s = ad.shape(o[0]);
            let dt = ad.dtype(d);
            let r = ad.add(Op::Pad { axis: *axis, start: *start }, dt, s, &[d])?;
            vec![(o[0], r)]
        }
        // d pad(x) = slice(d)
        Op::Pad { axis, start } => {
            let s = ad.shape(o[0]);
            let dt = ad.dtype(d);
            let r = ad.add(Op::Slice { axis: *axis, start: *start }, dt, s, &[d])?;
            vec![(o[0], r)]
        }
        // Each input gets its slice of d.
        Op::Concat { axis } => {
            let mut out = vec![];
            let mut at = 0;
            for x in o {
                let s = ad.shape(*x);
                let dt = ad.dtype(d);
                let ext = s[*axis];
                let r = ad.add(Op::Slice { axis: *axis, start: at }, dt, s, &[d])?;
                out.push((*x, r));
                at += ext;
            }
            out
        }
        // d cumsum(x)_i = Σ_{j ≥ i} d_j = Σ d - cumsum(d)_i + d_i
        Op::CumSum { axis } => {
            let s = ad.shape(d);
            let dt = ad.dtype(d);
            let c = ad.add(Op::CumSum { axis: *axis }, dt, s.clone(), &[d])?;
            let kept: Vec<usize> = s.iter().enumerate().filter(|(i, _)| i != axis).map(|(_, v)| *v).collect();
            let tot = ad.add(Op::Reduce { op: Red::Sum, axes: vec![*axis] }, dt, kept, &[d])?;
            let tot = ad.expand(tot, &[*axis], &s)?;
            let r = ad.bin(Bin::Sub, tot, c)?;
            let r = ad.bin(Bin::Add, r, d)?;
            vec![(o[0], r)]
        }
        // Projections are treated as constants (they are refreshed, not trained through).
        Op::ArgSort { .. } | Op::KeepTop { .. } | Op::Quantile | Op::Sample { .. } | Op::Qr | Op::SvdTopK { .. } => {
            vec![]
        }
    })
}
