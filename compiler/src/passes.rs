//! The pass pipeline: each pass has a name, a one-line summary, and rewrites a graph in
//! place; the verifier runs after every pass in debug builds and tests.

use crate::interp::{self, Tensor};
use crate::ir::{Graph, IrError, NodeId, Op};
use std::collections::HashMap;

pub struct PassReport {
    pub changed: usize,
}

pub struct Pass {
    pub name: &'static str,
    pub summary: &'static str,
    /// The stage of graph the pass accepts and the one it leaves: `lowered` (straight from
    /// lowering or autodiff), `canonical` (no-op casts/reshapes/broadcasts removed).
    pub needs: &'static str,
    pub produces: &'static str,
    pub run: fn(&mut Graph) -> Result<PassReport, IrError>,
}

/// Every pass, in order. `recipec passes` lists them; `--emit graph-after=NAME` prints the
/// graph after one of them.
pub static PIPELINE: &[Pass] = &[
    Pass {
        name: "canonicalize",
        summary: "drop no-op casts, reshapes and broadcasts; fold reshape chains",
        needs: "lowered",
        produces: "canonical",
        run: canonicalize,
    },
    Pass {
        name: "fold-constants",
        summary:
            "evaluate nodes whose operands are all scalar constants; pick a `where` branch by a constant condition",
        needs: "canonical",
        produces: "canonical",
        run: fold_constants,
    },
    Pass {
        name: "eliminate-common-subexpressions",
        summary: "merge nodes with the same op, type and operands",
        needs: "canonical",
        produces: "canonical",
        run: cse,
    },
    Pass {
        name: "block-matmul-reductions",
        summary: "compute large matmuls feeding reductions in column blocks, never holding the product",
        needs: "canonical",
        produces: "canonical",
        run: crate::block::block_matmul_reductions,
    },
    Pass {
        name: "eliminate-dead-code",
        summary: "remove nodes no output depends on (inputs stay)",
        needs: "canonical",
        produces: "canonical",
        run: dce,
    },
];

/// What the graph is compiled for: passes whose best form differs between a CPU and a GPU
/// read it (`block-matmul-reductions`: `block::BlockOptions::for_target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Cpu,
    Cuda,
}

/// Runs the pipeline for the CPU, verifying after each pass; `stop_after` ends it early.
pub fn run_pipeline(
    g: &mut Graph,
    stop_after: Option<&str>,
    timings: &mut Vec<(&'static str, std::time::Duration)>,
) -> Result<(), IrError> {
    run_pipeline_for(g, stop_after, timings, Target::Cpu)
}

/// [`run_pipeline`] for `target`.
pub fn run_pipeline_for(
    g: &mut Graph,
    stop_after: Option<&str>,
    timings: &mut Vec<(&'static str, std::time::Duration)>,
    target: Target,
) -> Result<(), IrError> {
    g.verify()?;
    for p in PIPELINE {
        let start = std::time::Instant::now();
        let done = if p.name == "block-matmul-reductions" {
            crate::block::run(g, &crate::block::BlockOptions::for_target(target))
        } else {
            (p.run)(g)
        };
        done.map_err(|e| IrError(format!("pass `{}`: {}", p.name, e.0)))?;
        timings.push((p.name, start.elapsed()));
        g.verify().map_err(|e| {
            IrError(format!("this is a bug in recipec: the graph is invalid after pass `{}`: {}", p.name, e.0))
        })?;
        if stop_after == Some(p.name) {
            break;
        }
    }
    Ok(())
}

fn canonicalize(g: &mut Graph) -> Result<PassReport, IrError> {
    let mut changed = 0;
    for id in g.topo() {
        if !g.contains(id) {
            continue;
        }
        let n = g.node(id).clone();
        let ops = g.operands(id);
        let same = ops.first().map(|o| g.node(*o).shape == n.shape && g.node(*o).dtype == n.dtype).unwrap_or(false);
        match n.op {
            Op::Cast | Op::Reshape | Op::Broadcast if same => {
                g.replace_uses(id, ops[0]);
                changed += 1;
            }
            Op::Unary(crate::ir::Un::StopGradient) => {}
            Op::Reshape => {
                // reshape(reshape(x)) = reshape(x)
                let inner = g.node(ops[0]).clone();
                if inner.op == Op::Reshape {
                    let src = g.operands(ops[0])[0];
                    let new = g.add(Op::Reshape, n.dtype, n.shape.clone(), &[src], &n.origin)?;
                    g.replace_uses(id, new);
                    changed += 1;
                }
            }
            _ => {}
        }
    }
    dce(g)?;
    Ok(PassReport { changed })
}

fn fold_constants(g: &mut Graph) -> Result<PassReport, IrError> {
    let mut changed = 0;
    for id in g.topo() {
        let n = g.node(id).clone();
        let ops = g.operands(id);
        // where(c, a, b) with a constant condition (or a broadcast constant) is a branch.
        if n.op == Op::Select {
            let c = g.node(ops[0]);
            let c = match c.op {
                Op::Broadcast => g.node(g.operands(ops[0])[0]),
                _ => c,
            };
            if let Op::Const { value } = c.op {
                g.replace_uses(id, if value != 0.0 { ops[1] } else { ops[2] });
                changed += 1;
                continue;
            }
        }
        let foldable = !ops.is_empty()
            && n.shape.is_empty()
            && matches!(n.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast)
            && ops.iter().all(|o| matches!(g.node(*o).op, Op::Const { .. }));
        if !foldable {
            continue;
        }
        let mut sub = Graph::new("fold");
        let mut args = vec![];
        for o in &ops {
            let on = g.node(*o);
            let Op::Const { value } = on.op else { unreachable!() };
            args.push(sub.add(Op::Const { value }, on.dtype, vec![], &[], "")?);
        }
        let r = sub.add(n.op.clone(), n.dtype, vec![], &args, "")?;
        sub.outputs.push(("v".into(), r));
        let out = interp::run(&sub, &[], 0)?;
        let v: &Tensor = &out["v"];
        let c = g.add(Op::Const { value: v.data[0] }, n.dtype, vec![], &[], &n.origin)?;
        g.replace_uses(id, c);
        changed += 1;
    }
    dce(g)?;
    Ok(PassReport { changed })
}

fn cse(g: &mut Graph) -> Result<PassReport, IrError> {
    let changed = merge_duplicates(g);
    dce(g)?;
    Ok(PassReport { changed })
}

/// Points every use of a node at the first node with the same op, type and operands (inputs
/// and random draws are never merged) and returns how many were merged; the merged nodes stay,
/// unused. The training step runs it before taking gradients, so that a forward pass written
/// twice (`model.features(x)` and `model.hidden_states(x)` in one loss) is one pass with one
/// backward pass, not two.
pub fn merge_duplicates(g: &mut Graph) -> usize {
    let mut seen: HashMap<String, NodeId> = HashMap::new();
    let mut changed = 0;
    for id in g.topo() {
        let n = g.node(id);
        // Inputs and random draws are never merged.
        if matches!(n.op, Op::Input { .. } | Op::Uniform { .. } | Op::Normal { .. } | Op::Sample { .. }) {
            continue;
        }
        let key = format!("{:?}|{}|{:?}|{:?}", n.op, n.dtype, n.shape, g.operands(id));
        match seen.get(&key) {
            Some(prev) => {
                g.replace_uses(id, *prev);
                changed += 1;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    changed
}

fn dce(g: &mut Graph) -> Result<PassReport, IrError> {
    let mut live: std::collections::HashSet<NodeId> = g.outputs.iter().map(|o| o.1).collect();
    let order = g.topo();
    for id in order.iter().rev() {
        if live.contains(id) {
            for o in g.operands(*id) {
                live.insert(o);
            }
        }
    }
    let mut changed = 0;
    for id in order {
        if !live.contains(&id) && !matches!(g.node(id).op, Op::Input { .. }) {
            g.remove(id);
            changed += 1;
        }
    }
    Ok(PassReport { changed })
}
