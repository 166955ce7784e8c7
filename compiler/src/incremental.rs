//! Incremental decoding: derives a KV-cached decode step from the naive decode graph.
//!
//! Input: a graph that reads a whole token window `tokens: i32[1, T]` and the position
//! `pos: i32` of the last real token, runs the model over every position and picks the row
//! at `pos` (`take(logits, pos)`), then applies the decoding policy. Output: a graph that
//! reads the token at `pos` only (`tokens: i32[1, 1]`), `pos`, the parameters and one cache
//! per tensor that needs the whole sequence (`cache.<i>`), and gives the same outputs plus
//! the updated caches. Nothing about attention is special-cased: the pass tracks which axis
//! of each tensor is indexed by token position and computes only the row at `pos` of every
//! tensor where that is enough; a tensor that some op reads across positions (the keys of
//! `q @ kᵀ`, the values of `weights @ v`) is kept in a cache of its full shape, into which
//! each step writes its row `pos`.
//!
//! Contract: the model must be causal — row `s` of the logits may depend on tokens `≤ s`
//! only (the stdlib GPT masks with `j <= i`). Rows of a cache past `pos` hold zeros; a
//! causal model masks them, exactly as the naive graph masks the padding of its window.
//! The pass rejects graphs it cannot incrementalize (a reduction over positions demanded
//! as a whole, random numbers drawn per position, a scan along positions) with a message.

use crate::ir::{Bin, Graph, IrError, NodeId, Op};
use lang::types::Dtype;
use std::collections::{BTreeSet, HashMap};

/// A derived decode step and the caches it carries from step to step.
#[derive(Clone, Debug)]
pub struct Incremental {
    pub graph: Graph,
    /// `(name, dtype, shape)` of each cache, in input order; zeros before the first step.
    pub caches: Vec<(String, Dtype, Vec<usize>)>,
    /// Positions a cache holds (the window `T`).
    pub context: usize,
}

impl Incremental {
    /// The bytes of all caches (arguments of every step).
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(|(_, d, s)| crate::plan::dtype_bytes(*d) * s.iter().product::<usize>()).sum()
    }
}

/// Derives the cached step of `g`, whose input `seq` (`[1, T]`) holds token positions along
/// axis 1 and whose scalar input `pos` is the position to decode.
pub fn incrementalize(g: &Graph, seq: &str, pos: &str) -> Result<Incremental, IrError> {
    let find = |name: &str| {
        g.inputs
            .iter()
            .copied()
            .find(|i| matches!(&g.node(*i).op, Op::Input { name: n, .. } if n == name))
            .ok_or_else(|| IrError(format!("the decode graph has no input `{name}`")))
    };
    let (seq_in, pos_in) = (find(seq)?, find(pos)?);
    let ss = &g.node(seq_in).shape;
    if ss.len() != 2 || ss[0] != 1 || !g.node(pos_in).shape.is_empty() {
        return Err(IrError(format!("`{seq}` must be [1, T] and `{pos}` a scalar")));
    }
    let context = ss[1];
    // Forward analysis: which nodes depend on the tokens, and which of their axes are
    // indexed by token position.
    let mut dep: HashMap<NodeId, bool> = HashMap::new();
    let mut axes: HashMap<NodeId, BTreeSet<usize>> = HashMap::new();
    for id in g.topo() {
        let ops = g.operands(id);
        let d = id == seq_in || ops.iter().any(|o| dep[o]);
        let mut set = BTreeSet::new();
        if id == seq_in {
            set.insert(1);
        } else if d {
            for a in 0..g.node(id).shape.len() {
                if ops.iter().enumerate().any(|(k, o)| corr(g, id, a, k).is_some_and(|b| axes[o].contains(&b))) {
                    set.insert(a);
                }
            }
        }
        dep.insert(id, d);
        axes.insert(id, set);
    }
    let mut b = Builder {
        g,
        out: Graph::new(format!("{}_cached", g.name)),
        dep,
        axes,
        full: HashMap::new(),
        rows: HashMap::new(),
        caches: vec![],
        seq_in,
        pos_in,
        new_seq: None,
        pos1: None,
    };
    // The step's inputs: the token at `pos`, then every other input of `g` in its order;
    // caches come after, as they are found.
    let tok = b.out.add(
        Op::Input { index: 0, name: seq.to_string() },
        Dtype::I32,
        vec![1, 1],
        &[],
        &g.node(seq_in).origin,
    )?;
    b.new_seq = Some(tok);
    for &i in &g.inputs {
        if i != seq_in {
            let n = g.node(i);
            let Op::Input { name, .. } = &n.op else { unreachable!("inputs are Input nodes") };
            let index = b.out.inputs.len();
            let id = b.out.add(Op::Input { index, name: name.clone() }, n.dtype, n.shape.clone(), &[], &n.origin)?;
            b.full.insert(i, id);
        }
    }
    let mut outs = vec![];
    for (name, id) in &g.outputs {
        outs.push((name.clone(), b.full(*id)?));
    }
    b.out.outputs = outs;
    let cache_outs: Vec<(String, NodeId)> = b.caches.iter().map(|c| (c.0.clone(), c.1)).collect();
    b.out.outputs.extend(cache_outs);
    let caches = b
        .caches
        .iter()
        .map(|(name, _, input)| (name.clone(), b.out.node(*input).dtype, b.out.node(*input).shape.clone()))
        .collect();
    b.out.verify()?;
    Ok(Incremental { graph: b.out, caches, context })
}

/// The axis of operand `k` that output axis `a` of `id` reads at the same index (so row `i`
/// of the output needs row `i` of that operand only), or `None` when the output element
/// reads the operand across that axis (or not along any axis).
fn corr(g: &Graph, id: NodeId, a: usize, k: usize) -> Option<usize> {
    let n = g.node(id);
    let ops = g.operands(id);
    let ins = g.node(*ops.get(k)?);
    let r = n.shape.len();
    match &n.op {
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast => Some(a),
        Op::Broadcast => {
            let shift = r - ins.shape.len();
            let b = a.checked_sub(shift)?;
            (ins.shape[b] == n.shape[a]).then_some(b)
        }
        Op::Reduce { axes, .. } => (0..ins.shape.len()).filter(|i| !axes.contains(i)).nth(a),
        Op::MatMul => match (k, a) {
            (_, a) if a + 2 < r => Some(a),
            (0, a) if a + 2 == r => Some(a),
            (1, a) if a + 1 == r => Some(a),
            _ => None,
        },
        Op::Transpose { perm } => Some(perm[a]),
        Op::Reshape => {
            let pre: usize = n.shape[..a].iter().product();
            (0..ins.shape.len())
                .find(|&b| ins.shape[b] == n.shape[a] && ins.shape[..b].iter().product::<usize>() == pre)
        }
        Op::Take { axis } => {
            let ir = g.node(ops[1]).shape.len();
            match k {
                0 if a < *axis => Some(a),
                0 if a >= axis + ir => Some(a + 1 - ir),
                1 if a >= *axis && a < axis + ir => Some(a - axis),
                _ => None,
            }
        }
        Op::Gather { axis } => (k == 1 || a != *axis).then_some(a),
        Op::Slice { axis, .. }
        | Op::Pad { axis, .. }
        | Op::Concat { axis }
        | Op::ArgSort { axis, .. }
        | Op::CumSum { axis }
        | Op::KeepTop { axis, .. } => (a != *axis).then_some(a),
        Op::Input { .. }
        | Op::Const { .. }
        | Op::Iota { .. }
        | Op::Uniform { .. }
        | Op::Normal { .. }
        | Op::Sample { .. }
        | Op::ScatterAdd { .. }
        | Op::TakeAdd { .. }
        | Op::Quantile
        | Op::Qr
        | Op::Solve
        | Op::SvdTopK { .. } => None,
    }
}

struct Builder<'a> {
    g: &'a Graph,
    out: Graph,
    /// Whether a node of `g` depends on the tokens.
    dep: HashMap<NodeId, bool>,
    /// The axes of each node of `g` indexed by token position.
    axes: HashMap<NodeId, BTreeSet<usize>>,
    /// A node of `g` over the whole window, in `out`.
    full: HashMap<NodeId, NodeId>,
    /// A node of `g` at position `pos` along an axis (extent 1 there), in `out`.
    rows: HashMap<(NodeId, usize), NodeId>,
    /// `(name, updated cache, cache input)`.
    caches: Vec<(String, NodeId, NodeId)>,
    seq_in: NodeId,
    pos_in: NodeId,
    new_seq: Option<NodeId>,
    /// `pos` as an index tensor `[1]`.
    pos1: Option<NodeId>,
}

impl Builder<'_> {
    fn fail<T>(&self, id: NodeId, why: &str) -> Result<T, IrError> {
        let n = self.g.node(id);
        Err(IrError(format!(
            "cannot derive a cached decode step: `{}` {}{:?} (from {}) {why}",
            n.op.name(),
            n.dtype,
            n.shape,
            n.origin
        )))
    }

    /// Node `id` of `g` over the whole window.
    fn full(&mut self, id: NodeId) -> Result<NodeId, IrError> {
        if let Some(&n) = self.full.get(&id) {
            return Ok(n);
        }
        let n = self.g.node(id).clone();
        let ops = self.g.operands(id);
        let axes = self.axes[&id].clone();
        let new = if !self.dep[&id] {
            let ops = ops.iter().map(|&o| self.full(o)).collect::<Result<Vec<_>, _>>()?;
            self.out.add(n.op.clone(), n.dtype, n.shape.clone(), &ops, &n.origin)?
        } else if let (Op::Take { axis }, true) = (&n.op, ops.len() == 2 && ops[1] == self.pos_in) {
            // The row at `pos`: the one place the whole window collapses to one position.
            if !self.axes[&ops[0]].contains(axis) {
                return self.fail(id, "takes row `pos` along an axis that is not the token position");
            }
            let row = self.row(ops[0], *axis)?;
            self.out.add(Op::Reshape, n.dtype, n.shape.clone(), &[row], &n.origin)?
        } else if axes.is_empty() {
            if ops.iter().any(|o| !self.axes[o].is_empty()) {
                return self.fail(
                    id,
                    "reads every token position (a reduction or scan over the sequence); a cached step \
                     computes only position `pos`",
                );
            }
            let ops = ops.iter().map(|&o| self.full(o)).collect::<Result<Vec<_>, _>>()?;
            self.out.add(n.op.clone(), n.dtype, n.shape.clone(), &ops, &n.origin)?
        } else if axes.len() == 1 {
            let a = *axes.iter().next().expect("one axis");
            self.cache(id, a)?
        } else {
            return self.fail(id, "is needed whole but is indexed by token position along several axes");
        };
        self.full.insert(id, new);
        Ok(new)
    }

    /// A cache of node `id` (positions along axis `a`), updated with its row at `pos`.
    fn cache(&mut self, id: NodeId, a: usize) -> Result<NodeId, IrError> {
        let n = self.g.node(id).clone();
        let name = format!("cache.{}", self.caches.len());
        let index = self.out.inputs.len();
        let input = self.out.add(Op::Input { index, name: name.clone() }, n.dtype, n.shape.clone(), &[], &n.origin)?;
        let row = self.row(id, a)?;
        let o = "kv-cache";
        let iota = self.out.add(Op::Iota { axis: a }, Dtype::I32, n.shape.clone(), &[], o)?;
        let p = self.out.add(Op::Broadcast, Dtype::I32, n.shape.clone(), &[self.pos_in_out()], o)?;
        let here = self.out.add(Op::Binary(Bin::Eq), Dtype::Bool, n.shape.clone(), &[iota, p], o)?;
        let wide = self.out.add(Op::Broadcast, n.dtype, n.shape.clone(), &[row], o)?;
        let updated = self.out.add(Op::Select, n.dtype, n.shape.clone(), &[here, wide, input], o)?;
        self.caches.push((name, updated, input));
        Ok(updated)
    }

    fn pos_in_out(&self) -> NodeId {
        self.full[&self.pos_in]
    }

    /// Node `id` of `g` at position `pos` along axis `a` (extent 1 there).
    fn row(&mut self, id: NodeId, a: usize) -> Result<NodeId, IrError> {
        if let Some(&n) = self.rows.get(&(id, a)) {
            return Ok(n);
        }
        let n = self.g.node(id).clone();
        let mut shape = n.shape.clone();
        shape[a] = 1;
        let new = if id == self.seq_in {
            self.new_seq.expect("token input made first")
        } else if !self.dep[&id] && n.shape[a] == 1 {
            self.full(id)?
        } else if let (Op::Iota { axis }, false) = (&n.op, self.dep[&id]) {
            // The index along `axis` at row `pos`: `pos` itself along that axis.
            if *axis == a {
                let p = self.pos_in_out();
                let p = if n.dtype == Dtype::I32 {
                    p
                } else {
                    self.out.add(Op::Cast, n.dtype, vec![], &[p], "kv-cache")?
                };
                self.out.add(Op::Broadcast, n.dtype, shape, &[p], &n.origin)?
            } else {
                self.out.add(n.op.clone(), n.dtype, shape, &[], &n.origin)?
            }
        } else if !self.dep[&id]
            && (matches!(
                n.op,
                Op::Input { .. } | Op::Const { .. } | Op::Uniform { .. } | Op::Normal { .. } | Op::Sample { .. }
            ) || (!matches!(n.op, Op::Broadcast)
                && (0..self.g.operands(id).len()).all(|k| corr(self.g, id, a, k).is_none())))
        {
            // A tensor that does not depend on the tokens (a weight, a random draw): its row
            // at `pos`, taken from the whole.
            let whole = self.full(id)?;
            let p = match self.pos1 {
                Some(p) => p,
                None => {
                    let p = self.out.add(Op::Reshape, Dtype::I32, vec![1], &[self.pos_in_out()], "kv-cache")?;
                    self.pos1 = Some(p);
                    p
                }
            };
            self.out.add(Op::Take { axis: a }, n.dtype, shape, &[whole, p], &n.origin)?
        } else {
            if self.dep[&id] && !self.axes[&id].contains(&a) {
                return self.fail(id, &format!("mixes token positions along axis {a}"));
            }
            if matches!(n.op, Op::Sample { .. }) {
                return self.fail(id, "draws random numbers per token position");
            }
            let ops = self.g.operands(id);
            let mut new_ops = vec![];
            for (k, &o) in ops.iter().enumerate() {
                new_ops.push(match corr(self.g, id, a, k) {
                    Some(b) => self.row(o, b)?,
                    None => self.full(o)?,
                });
            }
            self.out.add(n.op.clone(), n.dtype, shape, &new_ops, &n.origin)?
        };
        self.rows.insert((id, a), new);
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{run, Tensor};

    /// A one-head causal attention over embedded tokens, written as the naive full-window
    /// graph: the cached step must give the same logits row at every position.
    #[test]
    fn cached_attention_matches_the_window() {
        let (t, d, v) = (5usize, 3usize, 7usize);
        let mut g = Graph::new("decode");
        let f = Dtype::F32;
        let tokens = g.add(Op::Input { index: 0, name: "tokens".into() }, Dtype::I32, vec![1, t], &[], "t").unwrap();
        let pos = g.add(Op::Input { index: 1, name: "pos".into() }, Dtype::I32, vec![], &[], "p").unwrap();
        let emb = g.add(Op::Input { index: 2, name: "emb".into() }, f, vec![v, d], &[], "e").unwrap();
        let x = g.add(Op::Take { axis: 0 }, f, vec![1, t, d], &[emb, tokens], "x").unwrap();
        let x = g.add(Op::Reshape, f, vec![t, d], &[x], "x").unwrap();
        let xt = g.add(Op::Transpose { perm: vec![1, 0] }, f, vec![d, t], &[x], "xt").unwrap();
        let s = g.add(Op::MatMul, f, vec![t, t], &[x, xt], "s").unwrap();
        let i = g.add(Op::Iota { axis: 0 }, Dtype::I32, vec![t, t], &[], "i").unwrap();
        let j = g.add(Op::Iota { axis: 1 }, Dtype::I32, vec![t, t], &[], "j").unwrap();
        let causal = g.add(Op::Binary(Bin::Le), Dtype::Bool, vec![t, t], &[j, i], "c").unwrap();
        let ninf = g.add(Op::Const { value: f64::NEG_INFINITY }, f, vec![], &[], "n").unwrap();
        let ninf = g.add(Op::Broadcast, f, vec![t, t], &[ninf], "n").unwrap();
        let s = g.add(Op::Select, f, vec![t, t], &[causal, s, ninf], "m").unwrap();
        let m = g.add(Op::Reduce { op: crate::ir::Red::Max, axes: vec![1] }, f, vec![t], &[s], "m").unwrap();
        let m = g.add(Op::Reshape, f, vec![t, 1], &[m], "m").unwrap();
        let m = g.add(Op::Broadcast, f, vec![t, t], &[m], "m").unwrap();
        let e = g.add(Op::Binary(Bin::Sub), f, vec![t, t], &[s, m], "e").unwrap();
        let e = g.add(Op::Unary(crate::ir::Un::Exp), f, vec![t, t], &[e], "e").unwrap();
        let h = g.add(Op::MatMul, f, vec![t, d], &[e, x], "h").unwrap();
        let et = g.add(Op::Transpose { perm: vec![1, 0] }, f, vec![d, v], &[emb], "et").unwrap();
        let logits = g.add(Op::MatMul, f, vec![t, v], &[h, et], "l").unwrap();
        let row = g.add(Op::Take { axis: 0 }, f, vec![v], &[logits, pos], "row").unwrap();
        g.outputs.push(("logits".into(), row));
        g.verify().unwrap();

        let inc = incrementalize(&g, "tokens", "pos").unwrap();
        assert_eq!(inc.context, t);
        // Keys (xᵀ, read across positions by q kᵀ) and values (x, read by e @ x).
        assert_eq!(inc.caches.len(), 2, "{:?}", inc.caches);
        let toks = [3.0, 1.0, 6.0, 0.0, 2.0];
        let embv: Vec<f64> = (0..v * d).map(|k| ((k * 37 % 11) as f64 - 5.0) / 7.0).collect();
        let emb_t = Tensor::new(f, vec![v, d], embv);
        let mut caches: Vec<Tensor> =
            inc.caches.iter().map(|(_, dt, sh)| Tensor::new(*dt, sh.clone(), vec![0.0; sh.iter().product()])).collect();
        for p in 0..t {
            let mut window = toks.to_vec();
            for w in window.iter_mut().skip(p + 1) {
                *w = 0.0;
            }
            let full = run(
                &g,
                &[
                    Tensor::new(Dtype::I32, vec![1, t], window),
                    Tensor::new(Dtype::I32, vec![], vec![p as f64]),
                    emb_t.clone(),
                ],
                0,
            )
            .unwrap();
            let mut args = vec![
                Tensor::new(Dtype::I32, vec![1, 1], vec![toks[p]]),
                Tensor::new(Dtype::I32, vec![], vec![p as f64]),
                emb_t.clone(),
            ];
            args.extend(caches.iter().cloned());
            let step = run(&inc.graph, &args, 0).unwrap();
            assert_eq!(step["logits"].data, full["logits"].data, "position {p}");
            caches = inc.caches.iter().map(|(name, _, _)| step[name].clone()).collect();
        }
    }

    /// A reduction over all positions demanded whole cannot be cached: a clear error.
    #[test]
    fn whole_sequence_reductions_are_refused() {
        let mut g = Graph::new("decode");
        let f = Dtype::F32;
        let tokens = g.add(Op::Input { index: 0, name: "tokens".into() }, Dtype::I32, vec![1, 4], &[], "t").unwrap();
        let _pos = g.add(Op::Input { index: 1, name: "pos".into() }, Dtype::I32, vec![], &[], "p").unwrap();
        let x = g.add(Op::Cast, f, vec![1, 4], &[tokens], "x").unwrap();
        let u = g.add(Op::Uniform { stream: 1 }, f, vec![1, 4], &[], "u").unwrap();
        let y = g.add(Op::Binary(Bin::Add), f, vec![1, 4], &[x, u], "y").unwrap();
        let c = g.add(Op::CumSum { axis: 1 }, f, vec![1, 4], &[y], "c").unwrap();
        let s = g.add(Op::Reduce { op: crate::ir::Red::Sum, axes: vec![0, 1] }, f, vec![], &[c], "s").unwrap();
        g.outputs.push(("s".into(), s));
        let e = incrementalize(&g, "tokens", "pos").unwrap_err();
        assert!(e.0.contains("cannot derive a cached decode step: `cumsum`"), "{e}");
    }
}
