//! Hoisting the work a repeated program does on unchanging inputs.
//!
//! A decoding step runs once per token with the same parameters; whatever it computes from
//! the parameters alone (a basis from an SVD, a Cayley map's solve, a product of two weight
//! matrices) comes out the same every time. [`split_invariant`] cuts such a graph in two: a
//! *prelude* that computes those values once, and the step, which reads them as inputs
//! (`hoisted.<k>`). Only values whose computation includes a matrix product or a
//! linear-algebra or sorting library op are hoisted: the elementwise rest is cheaper to
//! recompute (and fuses into its users) than to keep.

use crate::ir::{Graph, IrError, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// Ops worth computing once rather than every run.
fn heavy(op: &Op) -> bool {
    matches!(op, Op::MatMul | Op::Qr | Op::SvdTopK { .. } | Op::Solve | Op::ArgSort { .. })
}

/// Splits `g` into (prelude, step) when some costly value depends only on inputs that
/// `varies` says stay the same between runs (random draws always vary). The prelude's
/// outputs are `hoisted.<k>`, which the step takes as inputs of the same names; the step's
/// outputs are `g`'s. `None` when there is nothing worth hoisting.
pub fn split_invariant(g: &Graph, varies: &dyn Fn(&str) -> bool) -> Result<Option<(Graph, Graph)>, IrError> {
    let order = g.topo();
    let mut varying: HashMap<NodeId, bool> = HashMap::new();
    let mut costly: HashMap<NodeId, bool> = HashMap::new();
    for &id in &order {
        let ops = g.operands(id);
        let op = &g.node(id).op;
        let v = match op {
            Op::Input { name, .. } => varies(name),
            Op::Uniform { .. } | Op::Normal { .. } | Op::Sample { .. } => true,
            _ => ops.iter().any(|o| varying[o]),
        };
        varying.insert(id, v);
        costly.insert(id, !v && (heavy(op) || ops.iter().any(|o| costly[o])));
    }
    let outputs: HashSet<NodeId> = g.outputs.iter().map(|(_, o)| *o).collect();
    let frontier: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|id| costly[id] && (outputs.contains(id) || g.users(*id).iter().any(|u| varying[u])))
        .collect();
    if frontier.is_empty() {
        return Ok(None);
    }
    // The prelude: the frontier and everything it reads.
    let mut needed: HashSet<NodeId> = frontier.iter().copied().collect();
    for &id in order.iter().rev() {
        if needed.contains(&id) {
            needed.extend(g.operands(id));
        }
    }
    let mut prelude = Graph::new(format!("{}.prelude", g.name));
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for &id in &order {
        if needed.contains(&id) {
            let n = g.node(id);
            let ops: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
            // The prelude's inputs are numbered afresh (an input's index is its position).
            let op = match &n.op {
                Op::Input { name, .. } => Op::Input { index: prelude.inputs.len(), name: name.clone() },
                op => op.clone(),
            };
            map.insert(id, prelude.add(op, n.dtype, n.shape.clone(), &ops, &n.origin)?);
        }
    }
    let names: HashMap<NodeId, String> =
        frontier.iter().enumerate().map(|(k, id)| (*id, format!("hoisted.{k}"))).collect();
    prelude.outputs = frontier.iter().map(|id| (names[id].clone(), map[id])).collect();
    // The step: the frontier read as inputs; what only the prelude needed is left for the
    // pipeline's dead-code elimination.
    let mut next_index = g
        .inputs
        .iter()
        .filter_map(|i| match &g.node(*i).op {
            Op::Input { index, .. } => Some(*index + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut step = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for &id in &order {
        let n = g.node(id);
        let new = match names.get(&id) {
            Some(name) => {
                next_index += 1;
                let op = Op::Input { index: next_index - 1, name: name.clone() };
                step.add(op, n.dtype, n.shape.clone(), &[], "hoisted")?
            }
            None => {
                if g.operands(id).iter().any(|o| !map.contains_key(o)) {
                    continue; // inside the prelude only
                }
                let ops: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
                step.add(n.op.clone(), n.dtype, n.shape.clone(), &ops, &n.origin)?
            }
        };
        map.insert(id, new);
    }
    step.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id])).collect();
    // Inputs are listed in index order (a program's arguments follow the list).
    let index_of = |g: &Graph, i: &NodeId| match &g.node(*i).op {
        Op::Input { index, .. } => *index,
        _ => usize::MAX,
    };
    let mut inputs = std::mem::take(&mut step.inputs);
    inputs.sort_by_key(|i| index_of(&step, i));
    step.inputs = inputs;
    Ok(Some((prelude, step)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{run, Tensor};
    use lang::types::Dtype;

    /// y = x @ (w @ w) + b: `w @ w` moves to the prelude, the step reads it, and running the
    /// two gives the original's values; a graph with nothing costly stays whole.
    #[test]
    fn the_parameters_product_is_computed_once() {
        let mut g = Graph::new("step");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F64, vec![2, 3], &[], "").unwrap();
        let w = g.add(Op::Input { index: 1, name: "w".into() }, Dtype::F64, vec![3, 3], &[], "").unwrap();
        let ww = g.add(Op::MatMul, Dtype::F64, vec![3, 3], &[w, w], "").unwrap();
        let y = g.add(Op::MatMul, Dtype::F64, vec![2, 3], &[x, ww], "").unwrap();
        let e = g.add(Op::Unary(crate::ir::Un::Exp), Dtype::F64, vec![2, 3], &[y], "").unwrap();
        g.outputs.push(("y".into(), e));
        let (pre, step) = split_invariant(&g, &|n| n == "x").unwrap().expect("w @ w is hoisted");
        assert_eq!(pre.outputs.len(), 1);
        assert!(step.topo().iter().filter(|i| step.node(**i).op == Op::MatMul).count() == 1);
        let xt = Tensor::new(Dtype::F64, vec![2, 3], vec![0.5, -1.0, 2.0, 0.25, 0.0, -0.5]);
        let wt = Tensor::new(Dtype::F64, vec![3, 3], vec![1.0, 2.0, 0.0, -1.0, 0.5, 0.25, 0.0, 1.0, -2.0]);
        let want = run(&g, &[xt.clone(), wt.clone()], 0).unwrap();
        let hoisted = run(&pre, &[wt.clone()], 0).unwrap();
        let got = run(&step, &[xt, wt, hoisted["hoisted.0"].clone()], 0).unwrap();
        assert_eq!(got["y"].data, want["y"].data);
        // Only elementwise work on the parameters: nothing to hoist.
        assert!(split_invariant(&g, &|_| true).unwrap().is_none());
    }
}
