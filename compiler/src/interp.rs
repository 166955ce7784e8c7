//! The reference interpreter: the oracle every backend is tested against.
//!
//! Semantics: every element is computed in f64 and rounded to the node's dtype after each
//! op (f32 by IEEE round-to-nearest-even; f16 and bf16 emulated with correct rounding;
//! integers truncated and wrapped; bool as 0/1). Reductions and cumulative sums accumulate
//! in f64 and round once. Indices of `gather`/`take` are clamped into range (as JAX does
//! by default). Randomness comes from the Philox counter-based generator (`rng.rs`), keyed
//! by the run's seed, the op's stream and the element's flat index.

use crate::ir::{Bin, Graph, IrError, NodeId, Op, Red, Un};
use crate::rng;
use lang::types::Dtype;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        let data = data.into_iter().map(|x| round(dtype, x)).collect();
        Tensor { dtype, shape, data }
    }
    pub fn scalar(dtype: Dtype, v: f64) -> Tensor {
        Tensor::new(dtype, vec![], vec![v])
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Row-major strides (in elements) of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn unravel(mut flat: usize, shape: &[usize], out: &mut [usize]) {
    for i in (0..shape.len()).rev() {
        let d = shape[i].max(1);
        out[i] = flat % d;
        flat /= d;
    }
}

/// Rounds an f64 to a binary floating-point format with `p` significand bits (including
/// the implicit one), minimum normal exponent `emin` and largest finite value `max`,
/// round-to-nearest-even, with subnormals.
fn round_float(x: f64, p: i32, emin: i32, max: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let bits = x.abs().to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let e = exp.max(emin);
    let ulp = 2f64.powi(e - (p - 1));
    let r = (x / ulp).round_ties_even() * ulp;
    if r.abs() > max {
        // Values beyond max round to infinity unless they round down to max.
        let halfway = max + 2f64.powi(((max.to_bits() >> 52) & 0x7ff) as i32 - 1023 - p);
        if x.abs() >= halfway {
            return f64::INFINITY.copysign(x);
        }
        return max.copysign(x);
    }
    r
}

/// The value `x` as stored in `dtype`.
pub fn round(dtype: Dtype, x: f64) -> f64 {
    match dtype {
        Dtype::F64 => x,
        Dtype::F32 => x as f32 as f64,
        Dtype::F16 => round_float(x, 11, -14, 65504.0),
        Dtype::BF16 => round_float(x, 8, -126, (2.0 - 2f64.powi(-7)) * 2f64.powi(127)),
        Dtype::I32 => {
            if x.is_nan() {
                0.0
            } else {
                (x.trunc() as i64) as i32 as f64
            }
        }
        Dtype::I64 => {
            if x.is_nan() {
                0.0
            } else {
                x.trunc()
            }
        }
        Dtype::Bool => {
            if x != 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

fn erf(x: f64) -> f64 {
    libm::erf(x)
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub fn unary(u: Un, x: f64) -> f64 {
    use std::f64::consts::SQRT_2;
    match u {
        Un::Neg => -x,
        Un::Not => (x == 0.0) as i32 as f64,
        Un::Exp => x.exp(),
        Un::Log => x.ln(),
        Un::Log1p => x.ln_1p(),
        Un::Sqrt => x.sqrt(),
        Un::Rsqrt => 1.0 / x.sqrt(),
        Un::Tanh => x.tanh(),
        Un::Sigmoid => sigmoid(x),
        Un::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
        Un::Gelu => 0.5 * x * (1.0 + erf(x / SQRT_2)),
        Un::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Un::Silu => x * sigmoid(x),
        Un::Erf => erf(x),
        Un::Cos => x.cos(),
        Un::Sin => x.sin(),
        Un::Abs => x.abs(),
        Un::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        }
        Un::Relu => x.max(0.0),
        Un::Floor => x.floor(),
        Un::Ceil => x.ceil(),
        Un::Round => x.round_ties_even(),
        Un::StopGradient => x,
    }
}

pub fn binary(b: Bin, x: f64, y: f64, float: bool) -> f64 {
    let t = |c: bool| c as i32 as f64;
    match b {
        Bin::Add => x + y,
        Bin::Sub => x - y,
        Bin::Mul => x * y,
        Bin::Div => {
            if float {
                x / y
            } else if y == 0.0 {
                0.0
            } else {
                (x / y).trunc()
            }
        }
        // The remainder takes the divisor's sign (Python, NumPy and JAX `%`).
        Bin::Rem => {
            if !float && y == 0.0 {
                return 0.0;
            }
            let r = x % y;
            if r != 0.0 && (r < 0.0) != (y < 0.0) {
                r + y
            } else {
                r
            }
        }
        Bin::Pow => x.powf(y),
        Bin::Min => {
            if x.is_nan() || y.is_nan() {
                f64::NAN
            } else {
                x.min(y)
            }
        }
        Bin::Max => {
            if x.is_nan() || y.is_nan() {
                f64::NAN
            } else {
                x.max(y)
            }
        }
        Bin::Eq => t(x == y),
        Bin::Ne => t(x != y),
        Bin::Lt => t(x < y),
        Bin::Le => t(x <= y),
        Bin::Gt => t(x > y),
        Bin::Ge => t(x >= y),
        Bin::And => t(x != 0.0 && y != 0.0),
        Bin::Or => t(x != 0.0 || y != 0.0),
    }
}

/// Runs a graph on inputs (in `graph.inputs` order); returns the named outputs.
pub fn run(g: &Graph, inputs: &[Tensor], seed: u64) -> Result<HashMap<String, Tensor>, IrError> {
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    for id in g.topo() {
        let n = g.node(id);
        let ops: Vec<&Tensor> = g.operands(id).iter().map(|o| &values[o]).collect();
        let out = eval(n, &ops, inputs, seed)?;
        values.insert(id, out);
    }
    let mut outs = HashMap::new();
    for (name, id) in &g.outputs {
        outs.insert(name.clone(), values[id].clone());
    }
    Ok(outs)
}

/// Evaluates one node on its operand values (the runtime's library kernels use this).
pub fn eval(n: &crate::ir::Node, o: &[&Tensor], inputs: &[Tensor], seed: u64) -> Result<Tensor, IrError> {
    let shape = n.shape.clone();
    let size: usize = shape.iter().product();
    let mk = |data: Vec<f64>| Tensor::new(n.dtype, shape.clone(), data);
    Ok(match &n.op {
        Op::Input { index, name } => {
            let t = inputs.get(*index).ok_or_else(|| IrError(format!("input {index} (`{name}`) was not supplied")))?;
            if t.shape != n.shape || t.dtype != n.dtype {
                return Err(IrError(format!(
                    "input `{name}` must be {}{:?}, got {}{:?}",
                    n.dtype, n.shape, t.dtype, t.shape
                )));
            }
            t.clone()
        }
        Op::Const { value } => mk(vec![*value]),
        Op::Unary(u) if n.dtype == Dtype::F32 && crate::math::has_f32(*u) => {
            mk(o[0].data.iter().map(|x| crate::math::unary_f32(*u, *x as f32) as f64).collect())
        }
        Op::Unary(u) => mk(o[0].data.iter().map(|x| unary(*u, *x)).collect()),
        Op::Binary(b) => {
            let float = o[0].dtype.is_float();
            mk(o[0].data.iter().zip(&o[1].data).map(|(x, y)| binary(*b, *x, *y, float)).collect())
        }
        Op::Select => mk((0..size).map(|i| if o[0].data[i] != 0.0 { o[1].data[i] } else { o[2].data[i] }).collect()),
        Op::Cast => mk(o[0].data.clone()),
        Op::Broadcast => {
            let (s, t) = (&o[0].shape, &shape);
            let off = t.len() - s.len();
            let ss = strides(s);
            let mut idx = vec![0; t.len()];
            let mut data = Vec::with_capacity(size);
            for flat in 0..size {
                unravel(flat, t, &mut idx);
                let mut src = 0;
                for i in 0..s.len() {
                    if s[i] != 1 {
                        src += idx[off + i] * ss[i];
                    }
                }
                data.push(o[0].data[src]);
            }
            mk(data)
        }
        Op::Reduce { op, axes } => reduce(n, o[0], *op, axes),
        Op::MatMul => {
            let (a, b) = (o[0], o[1]);
            let r = a.shape.len();
            let (m, k, p) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
            let batch: usize = a.shape[..r - 2].iter().product();
            let mut data = vec![0.0; batch * m * p];
            for bi in 0..batch {
                for i in 0..m {
                    for j in 0..p {
                        let mut acc = 0.0;
                        for l in 0..k {
                            acc += a.data[bi * m * k + i * k + l] * b.data[bi * k * p + l * p + j];
                        }
                        data[bi * m * p + i * p + j] = acc;
                    }
                }
            }
            mk(data)
        }
        Op::Transpose { perm } => {
            let s = &o[0].shape;
            let ss = strides(s);
            let mut idx = vec![0; shape.len()];
            let mut data = Vec::with_capacity(size);
            for flat in 0..size {
                unravel(flat, &shape, &mut idx);
                let src: usize = perm.iter().enumerate().map(|(i, p)| idx[i] * ss[*p]).sum();
                data.push(o[0].data[src]);
            }
            mk(data)
        }
        Op::Reshape => mk(o[0].data.clone()),
        Op::Gather { axis } => {
            let (x, ix) = (o[0], o[1]);
            let xs = strides(&x.shape);
            let mut idx = vec![0; shape.len()];
            let mut data = Vec::with_capacity(size);
            for flat in 0..size {
                unravel(flat, &shape, &mut idx);
                let k = clamp_index(ix.data[flat], x.shape[*axis]);
                let src: usize = (0..shape.len()).map(|i| if i == *axis { k } else { idx[i] } * xs[i]).sum();
                data.push(x.data[src]);
            }
            mk(data)
        }
        Op::ScatterAdd { axis } => {
            let (x, ix, v) = (o[0], o[1], o[2]);
            let xs = strides(&x.shape);
            let mut data = x.data.clone();
            let mut idx = vec![0; v.shape.len()];
            for flat in 0..v.numel() {
                unravel(flat, &v.shape, &mut idx);
                let k = clamp_index(ix.data[flat], x.shape[*axis]);
                let dst: usize = (0..idx.len()).map(|i| if i == *axis { k } else { idx[i] } * xs[i]).sum();
                data[dst] += v.data[flat];
            }
            mk(data)
        }
        Op::Take { axis } => {
            let (x, ix) = (o[0], o[1]);
            let xs = strides(&x.shape);
            let ir = ix.shape.len();
            let mut idx = vec![0; shape.len()];
            let mut data = Vec::with_capacity(size);
            for flat in 0..size {
                unravel(flat, &shape, &mut idx);
                let iflat: usize = {
                    let is = strides(&ix.shape);
                    (0..ir).map(|j| idx[axis + j] * is[j]).sum()
                };
                let k = clamp_index(ix.data[iflat], x.shape[*axis]);
                let mut src = 0;
                for i in 0..*axis {
                    src += idx[i] * xs[i];
                }
                src += k * xs[*axis];
                for i in axis + 1..x.shape.len() {
                    src += idx[i - 1 + ir] * xs[i];
                }
                data.push(x.data[src]);
            }
            mk(data)
        }
        Op::TakeAdd { axis } => {
            let (x, ix, v) = (o[0], o[1], o[2]);
            let xs = strides(&x.shape);
            let is = strides(&ix.shape);
            let ir = ix.shape.len();
            let mut data = x.data.clone();
            let mut idx = vec![0; v.shape.len()];
            for flat in 0..v.numel() {
                unravel(flat, &v.shape, &mut idx);
                let iflat: usize = (0..ir).map(|j| idx[axis + j] * is[j]).sum();
                let k = clamp_index(ix.data[iflat], x.shape[*axis]);
                let mut dst = 0;
                for i in 0..*axis {
                    dst += idx[i] * xs[i];
                }
                dst += k * xs[*axis];
                for i in axis + 1..x.shape.len() {
                    dst += idx[i - 1 + ir] * xs[i];
                }
                data[dst] += v.data[flat];
            }
            mk(data)
        }
        Op::Iota { axis } => {
            let mut idx = vec![0; shape.len()];
            mk((0..size)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    idx[*axis] as f64
                })
                .collect())
        }
        Op::Slice { axis, start } => {
            let xs = strides(&o[0].shape);
            let mut idx = vec![0; shape.len()];
            mk((0..size)
                .map(|f| {
                    unravel(f, &shape, &mut idx);
                    idx[*axis] += start;
                    o[0].data[idx.iter().zip(&xs).map(|(a, b)| a * b).sum::<usize>()]
                })
                .collect())
        }
        Op::Pad { axis, start } => {
            let s = &o[0].shape;
            let ts = strides(&shape);
            let mut data = vec![0.0; size];
            let mut idx = vec![0; s.len()];
            for f in 0..o[0].numel() {
                unravel(f, s, &mut idx);
                idx[*axis] += start;
                data[idx.iter().zip(&ts).map(|(a, b)| a * b).sum::<usize>()] = o[0].data[f];
            }
            mk(data)
        }
        Op::Concat { axis } => {
            let ts = strides(&shape);
            let mut data = vec![0.0; size];
            let mut offset = 0;
            for t in o {
                let mut idx = vec![0; t.shape.len()];
                for f in 0..t.numel() {
                    unravel(f, &t.shape, &mut idx);
                    idx[*axis] += offset;
                    data[idx.iter().zip(&ts).map(|(a, b)| a * b).sum::<usize>()] = t.data[f];
                }
                offset += t.shape[*axis];
            }
            mk(data)
        }
        Op::ArgSort { axis, descending } => {
            let mut data = vec![0.0; size];
            for_lines(&shape, *axis, |line| {
                let mut order: Vec<usize> = (0..line.len()).collect();
                let key = |i: usize| o[0].data[line[i]];
                // Stable: ties keep index order. NaN sorts last ascending, first descending.
                if *descending {
                    order.sort_by(|a, b| key(*b).total_cmp(&key(*a)).then(a.cmp(b)));
                } else {
                    order.sort_by(|a, b| key(*a).total_cmp(&key(*b)).then(a.cmp(b)));
                }
                for (pos, i) in order.iter().enumerate() {
                    data[line[pos]] = *i as f64;
                }
            });
            mk(data)
        }
        Op::CumSum { axis } => {
            let mut data = vec![0.0; size];
            for_lines(&shape, *axis, |line| {
                let mut acc = 0.0;
                for &p in line {
                    acc += o[0].data[p];
                    data[p] = acc;
                }
            });
            mk(data)
        }
        Op::KeepTop { n: keep, m, axis } => {
            let mut data = vec![0.0; size];
            for_lines(&shape, *axis, |line| {
                for group in line.chunks(*m) {
                    let mut order: Vec<usize> = (0..group.len()).collect();
                    order.sort_by(|a, b| o[0].data[group[*b]].total_cmp(&o[0].data[group[*a]]).then(a.cmp(b)));
                    for i in order.iter().take(*keep) {
                        data[group[*i]] = 1.0;
                    }
                }
            });
            mk(data)
        }
        Op::Quantile => {
            let mut v = o[0].data.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            let q = o[1].data[0].clamp(0.0, 1.0);
            if v.is_empty() {
                return Ok(mk(vec![f64::NAN]));
            }
            let pos = q * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            mk(vec![v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)])
        }
        Op::Uniform { stream } => mk((0..size).map(|i| rng::uniform(seed, *stream, i as u64)).collect()),
        Op::Normal { stream } => mk((0..size).map(|i| rng::normal(seed, *stream, i as u64)).collect()),
        Op::Qr => mk(qr(&o[0].data, o[0].shape[0], o[0].shape[1])),
        Op::Solve => mk(solve(&o[0].data, &o[1].data, o[0].shape[0], o[1].shape[1])),
        Op::SvdTopK { k, right } => {
            let (m, n) = (o[0].shape[0], o[0].shape[1]);
            let (u, vt) = svd(&o[0].data, m, n);
            let r = m.min(n);
            mk(if *right { vt[..k * n].to_vec() } else { (0..m).flat_map(|i| u[i * r..i * r + k].to_vec()).collect() })
        }
        Op::Sample { stream, axis } => {
            let s = &o[0].shape;
            let mut data = vec![0.0; size];
            let mut k = 0;
            for_lines(s, *axis, |line| {
                let total: f64 = line.iter().map(|p| o[0].data[*p].max(0.0)).sum();
                let u = rng::uniform(seed, *stream, k as u64) * total;
                let mut acc = 0.0;
                let mut pick = line.len() - 1;
                for (i, p) in line.iter().enumerate() {
                    let w = o[0].data[*p].max(0.0);
                    acc += w;
                    if w > 0.0 && u < acc {
                        pick = i;
                        break;
                    }
                }
                data[k] = pick as f64;
                k += 1;
            });
            mk(data)
        }
    })
}

/// Q of the reduced QR decomposition of a row-major `[m, n]` matrix (m ≥ n) by modified
/// Gram–Schmidt with one re-orthogonalization pass; R's diagonal is non-negative. A column
/// that is (numerically) dependent on the earlier ones becomes zero.
fn qr(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut q: Vec<Vec<f64>> = (0..n).map(|j| (0..m).map(|i| a[i * n + j]).collect()).collect();
    for j in 0..n {
        for _ in 0..2 {
            for p in 0..j {
                let d: f64 = (0..m).map(|i| q[p][i] * q[j][i]).sum();
                for i in 0..m {
                    q[j][i] -= d * q[p][i];
                }
            }
        }
        let norm = q[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..m {
            q[j][i] = if norm > 1e-300 { q[j][i] / norm } else { 0.0 };
        }
    }
    (0..m).flat_map(|i| (0..n).map(|j| q[j][i]).collect::<Vec<_>>()).collect()
}

/// X with A X = B for a row-major `[n, n]` A and `[n, k]` B, by Gaussian elimination with
/// partial pivoting (the first largest-magnitude pivot) in f64. A zero pivot (A singular) or a
/// non-finite entry gives NaN everywhere, so a bad system cannot pass for a solution.
fn solve(a: &[f64], b: &[f64], n: usize, k: usize) -> Vec<f64> {
    let nan = || vec![f64::NAN; n * k];
    if !a.iter().chain(b).all(|x| x.is_finite()) {
        return nan();
    }
    let (mut a, mut x) = (a.to_vec(), b.to_vec());
    for c in 0..n {
        let p = (c..n).fold(c, |p, r| if a[r * n + c].abs() > a[p * n + c].abs() { r } else { p });
        if a[p * n + c] == 0.0 {
            return nan();
        }
        if p != c {
            for j in 0..n {
                a.swap(c * n + j, p * n + j);
            }
            for j in 0..k {
                x.swap(c * k + j, p * k + j);
            }
        }
        for r in c + 1..n {
            let f = a[r * n + c] / a[c * n + c];
            if f == 0.0 {
                continue;
            }
            for j in c..n {
                a[r * n + j] -= f * a[c * n + j];
            }
            for j in 0..k {
                x[r * k + j] -= f * x[c * k + j];
            }
        }
    }
    for c in (0..n).rev() {
        for j in 0..k {
            let s: f64 = (c + 1..n).map(|q| a[c * n + q] * x[q * k + j]).sum();
            x[c * k + j] = (x[c * k + j] - s) / a[c * n + c];
        }
    }
    if x.iter().all(|v| v.is_finite()) {
        x
    } else {
        nan()
    }
}

/// The thin SVD of a row-major `[m, n]` matrix in f64 (faer's, single-threaded, so the same
/// bits every run on a machine): returns U `[m, r]` and Vᵀ `[r, n]` (r = min(m, n)), singular
/// values descending, each right singular vector's largest-magnitude entry (the first, on a
/// tie) positive and U's columns to match. A matrix the SVD does not converge on (NaN or
/// infinite entries) gives NaN.
fn svd(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let r = m.min(n);
    let nan = || (vec![f64::NAN; m * r], vec![f64::NAN; r * n]);
    if !a.iter().all(|x| x.is_finite()) {
        return nan();
    }
    let mat = faer::Mat::<f64>::from_fn(m, n, |i, j| a[i * n + j]);
    let Ok(d) = mat.thin_svd() else { return nan() };
    let (u, v) = (d.U(), d.V());
    let mut uo = vec![0.0; m * r];
    let mut vt = vec![0.0; r * n];
    for k in 0..r {
        let big = (0..n).map(|j| v[(j, k)]).fold(0.0f64, |acc, x| if x.abs() > acc.abs() { x } else { acc });
        let sign = if big < 0.0 { -1.0 } else { 1.0 };
        for j in 0..n {
            vt[k * n + j] = sign * v[(j, k)];
        }
        for i in 0..m {
            uo[i * r + k] = sign * u[(i, k)];
        }
    }
    (uo, vt)
}

fn clamp_index(v: f64, extent: usize) -> usize {
    if v <= 0.0 || v.is_nan() {
        0
    } else {
        (v as usize).min(extent.saturating_sub(1))
    }
}

/// Calls `f` with the flat positions of every 1-D line along `axis`, in row-major order of
/// the other axes.
fn for_lines(shape: &[usize], axis: usize, mut f: impl FnMut(&[usize])) {
    let st = strides(shape);
    let outer: Vec<usize> = shape.iter().enumerate().filter(|(i, _)| *i != axis).map(|(_, d)| *d).collect();
    let count: usize = outer.iter().product();
    let mut idx = vec![0; outer.len()];
    let mut line = vec![0; shape[axis]];
    for c in 0..count {
        unravel(c, &outer, &mut idx);
        let mut base = 0;
        let mut j = 0;
        for (i, s) in st.iter().enumerate() {
            if i != axis {
                base += idx[j] * s;
                j += 1;
            }
        }
        for (k, slot) in line.iter_mut().enumerate() {
            *slot = base + k * st[axis];
        }
        f(&line);
    }
}

fn reduce(n: &crate::ir::Node, x: &Tensor, op: Red, axes: &[usize]) -> Tensor {
    let out_size: usize = n.shape.iter().product();
    let init = match op {
        Red::Sum => 0.0,
        Red::Prod => 1.0,
        Red::Max | Red::ArgMax => f64::NEG_INFINITY,
        Red::Min | Red::ArgMin => f64::INFINITY,
    };
    let mut acc = vec![init; out_size];
    let mut arg = vec![0usize; out_size];
    let mut seen = vec![false; out_size];
    let mut idx = vec![0; x.shape.len()];
    let os = strides(&n.shape);
    let red_shape: Vec<usize> = axes.iter().map(|a| x.shape[*a]).collect();
    let rs = strides(&red_shape);
    for flat in 0..x.numel() {
        unravel(flat, &x.shape, &mut idx);
        let mut o = 0;
        let mut j = 0;
        let mut r = 0;
        let mut k = 0;
        for i in 0..idx.len() {
            if axes.contains(&i) {
                r += idx[i] * rs[k];
                k += 1;
            } else {
                o += idx[i] * os[j];
                j += 1;
            }
        }
        let v = x.data[flat];
        match op {
            Red::Sum => acc[o] += v,
            Red::Prod => acc[o] *= v,
            Red::Max | Red::Min => {
                if v.is_nan() || acc[o].is_nan() {
                    acc[o] = f64::NAN;
                } else if (op == Red::Max && v > acc[o]) || (op == Red::Min && v < acc[o]) {
                    acc[o] = v;
                }
            }
            Red::ArgMax | Red::ArgMin => {
                let better = !seen[o]
                    || (op == Red::ArgMax && (v > acc[o] || (v.is_nan() && !acc[o].is_nan())))
                    || (op == Red::ArgMin && (v < acc[o] || (v.is_nan() && !acc[o].is_nan())));
                if better {
                    acc[o] = v;
                    arg[o] = r;
                    seen[o] = true;
                }
            }
        }
    }
    let data = match op {
        Red::ArgMax | Red::ArgMin => arg.into_iter().map(|a| a as f64).collect(),
        _ => acc,
    };
    Tensor::new(n.dtype, n.shape.clone(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_and_svd_reconstruct() {
        // A 4x3 matrix: Q has orthonormal columns spanning A's columns.
        let a = [2.0, -1.0, 0.5, 1.0, 3.0, -2.0, 0.0, 1.0, 1.0, -1.0, 0.5, 2.0];
        let q = qr(&a, 4, 3);
        for i in 0..3 {
            for j in 0..3 {
                let d: f64 = (0..4).map(|r| q[r * 3 + i] * q[r * 3 + j]).sum();
                assert!((d - (i == j) as i32 as f64).abs() < 1e-12);
            }
        }
        for (m, n, t) in [(4, 3, false), (3, 4, true)] {
            let mat: Vec<f64> = if t { (0..12).map(|k| a[(k % 4) * 3 + k / 4]).collect() } else { a.to_vec() };
            let (u, vt) = svd(&mat, m, n);
            let r = m.min(n);
            // Reconstruct with σ = uᵀ A v.
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for k in 0..r {
                        let sigma: f64 = (0..m)
                            .map(|ii| u[ii * r + k] * (0..n).map(|jj| mat[ii * n + jj] * vt[k * n + jj]).sum::<f64>())
                            .sum();
                        acc += u[i * r + k] * sigma * vt[k * n + j];
                    }
                    assert!((acc - mat[i * n + j]).abs() < 1e-10, "{m}x{n} [{i},{j}]: {acc} vs {}", mat[i * n + j]);
                }
            }
            // The sign convention: each right singular vector's largest entry is positive.
            for k in 0..r {
                let big = vt[k * n..(k + 1) * n].iter().fold(0.0f64, |b, x| if x.abs() > b.abs() { *x } else { b });
                assert!(big > 0.0, "{m}x{n}: vector {k}");
            }
        }
        // No convergence to wait for: NaN in, NaN out.
        let (u, vt) = svd(&[f64::NAN, 1.0, 2.0, 3.0], 2, 2);
        assert!(u.iter().chain(&vt).all(|x| x.is_nan()));
    }

    #[test]
    fn solve_pivots_and_refuses_singular_systems() {
        // a[0][0] = 0: needs a row exchange. a = [[0, 2, 1], [1, 1, 0], [3, 0, 1]], x known.
        let a = [0.0, 2.0, 1.0, 1.0, 1.0, 0.0, 3.0, 0.0, 1.0];
        let x = [1.0, -2.0, 0.5, 3.0, 2.0, 1.0];
        let b: Vec<f64> = (0..3)
            .flat_map(|i| (0..2).map(move |j| (0..3).map(|q| a[i * 3 + q] * x[q * 2 + j]).sum::<f64>()))
            .collect();
        let got = solve(&a, &b, 3, 2);
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {x:?}");
        }
        // Rank 1, and a NaN entry: NaN everywhere, never a plausible-looking answer.
        assert!(solve(&[1.0, 2.0, 2.0, 4.0], &[1.0, 1.0], 2, 1).iter().all(|v| v.is_nan()));
        assert!(solve(&[1.0, 0.0, 0.0, f64::NAN], &[1.0, 1.0], 2, 1).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn half_precision_rounding() {
        assert_eq!(round(Dtype::F16, 1.0 + 1.0 / 2048.0), 1.0); // tie to even
        assert_eq!(round(Dtype::F16, 1.0 + 3.0 / 2048.0), 1.0 + 2.0 / 1024.0);
        assert_eq!(round(Dtype::F16, 70000.0), f64::INFINITY);
        assert_eq!(round(Dtype::F16, 65519.0), 65504.0);
        assert_eq!(round(Dtype::F16, 2f64.powi(-24)), 2f64.powi(-24)); // smallest subnormal
        assert_eq!(round(Dtype::BF16, 1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(Dtype::BF16, 1.0 + 3.0 / 256.0), 1.0 + 2.0 / 128.0);
        assert_eq!(round(Dtype::BF16, 3.0e38), 1.765625 * 2f64.powi(127));
        assert_eq!(round(Dtype::BF16, 3.4e38), f64::INFINITY);
        assert_eq!(round(Dtype::I32, 2147483648.0), -2147483648.0);
        assert_eq!(round(Dtype::I32, -2.7), -2.0);
    }
}
