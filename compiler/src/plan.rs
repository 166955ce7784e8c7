//! Memory planning: liveness, buffer reuse and arena offsets for one graph, and the report
//! `recipec build --emit plan` prints (peak bytes, the buffers live at the peak with the
//! recipe line that created each, and what a naive execution would need).
//!
//! The plan describes the graph as it is executed today, op by op, one buffer per node:
//! a `reshape` is a view of its operand (no buffer); an elementwise op whose operand dies at
//! it writes in place; an output that updates the argument of the same name (an
//! optimizer's `param` and states) is written into that argument when it is read no more;
//! every other node gets an arena slice, 64-byte aligned, reused once its value is dead
//! (first fit over free intervals). Arguments belong to the caller and
//! are reported separately. Fusion (which removes most intermediate buffers) comes next and
//! shrinks these numbers; the plan stays the authority on what is allocated.

use crate::ir::{Graph, NodeId, Op};
use lang::types::Dtype;
use std::collections::HashMap;

pub const ALIGN: usize = 64;

pub fn dtype_bytes(d: Dtype) -> usize {
    match d {
        Dtype::Bool => 1,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::I32 | Dtype::F32 => 4,
        Dtype::I64 | Dtype::F64 => 8,
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub node: NodeId,
    pub bytes: usize,
    pub offset: usize,
    /// Position in the execution order where the value is produced and last read.
    pub born: usize,
    pub dies: usize,
    /// Written in place over this node's buffer.
    pub in_place_of: Option<NodeId>,
    /// Written into the memory of this argument (an optimizer's `param` and states): the
    /// buffer is not in the arena.
    pub into_argument: Option<NodeId>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub arena_bytes: usize,
    pub peak_live_bytes: usize,
    /// The step (index in `order`) where the live bytes peak.
    pub peak_at: usize,
    pub naive_bytes: usize,
    pub argument_bytes: usize,
    pub order: Vec<NodeId>,
    pub buffers: HashMap<NodeId, Buffer>,
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn bytes_of(g: &Graph, n: NodeId) -> usize {
    let node = g.node(n);
    node.shape.iter().product::<usize>().max(1) * dtype_bytes(node.dtype)
}

/// The node whose storage `n` uses (through `reshape` views).
fn storage(g: &Graph, mut n: NodeId) -> NodeId {
    while g.node(n).op == Op::Reshape {
        n = g.operands(n)[0];
    }
    n
}

pub fn plan(g: &Graph) -> Plan {
    let order = g.topo();
    let outputs: Vec<NodeId> = g.outputs.iter().map(|o| storage(g, o.1)).collect();
    // Last use of each storage node (views extend their source's life).
    let mut dies: HashMap<NodeId, usize> = HashMap::new();
    for (i, n) in order.iter().enumerate() {
        let s = storage(g, *n);
        let e = dies.entry(s).or_insert(i);
        *e = (*e).max(i);
        for o in g.operands(*n) {
            let so = storage(g, o);
            let e = dies.entry(so).or_insert(i);
            *e = (*e).max(i);
        }
    }
    for o in &outputs {
        dies.insert(*o, order.len());
    }
    // Outputs that update an argument of the same name (`param`, `state_m`) are written into
    // that argument's memory when it is no longer read afterwards (an elementwise producer
    // may read it at the same step: element i is read before element i is written).
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut into_argument: HashMap<NodeId, NodeId> = HashMap::new();
    for (name, out) in &g.outputs {
        let s = storage(g, *out);
        let Some(input) =
            g.inputs.iter().copied().find(|i| matches!(&g.node(*i).op, Op::Input { name: n, .. } if n == name))
        else {
            continue;
        };
        let (a, b) = (g.node(input), g.node(s));
        if matches!(b.op, Op::Input { .. })
            || a.shape != b.shape
            || a.dtype != b.dtype
            || into_argument.contains_key(&s)
        {
            continue;
        }
        let last_read = dies.get(&input).copied().unwrap_or(0);
        let elementwise = matches!(b.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast);
        let at = pos[&s];
        if last_read < at || (last_read == at && elementwise) {
            into_argument.insert(s, input);
        }
    }
    let mut buffers: HashMap<NodeId, Buffer> = HashMap::new();
    // Free intervals of the arena: (offset, size), kept sorted.
    let mut free: Vec<(usize, usize)> = vec![];
    let mut arena = 0usize;
    let mut naive = 0usize;
    let mut argument_bytes = 0usize;
    let mut releases: Vec<Vec<NodeId>> = vec![vec![]; order.len() + 1];
    for (i, &n) in order.iter().enumerate() {
        let node = g.node(n);
        match node.op {
            Op::Input { .. } => {
                argument_bytes += bytes_of(g, n);
                continue;
            }
            Op::Reshape => continue,
            _ => {}
        }
        let bytes = align(bytes_of(g, n));
        naive += bytes;
        if let Some(arg) = into_argument.get(&n) {
            buffers.insert(
                n,
                Buffer {
                    node: n,
                    bytes,
                    offset: 0,
                    born: i,
                    dies: order.len(),
                    in_place_of: None,
                    into_argument: Some(*arg),
                },
            );
            // Its operands may still die here.
            for o in g.operands(n) {
                let so = storage(g, o);
                if dies.get(&so) == Some(&i) && buffers.contains_key(&so) && !outputs.contains(&so) {
                    let b = &buffers[&so];
                    if b.into_argument.is_none() {
                        free.push((b.offset, b.bytes));
                    }
                }
            }
            free.sort();
            continue;
        }
        // In place: an elementwise op over an operand of the same size that dies here.
        let elementwise = matches!(node.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast);
        let donor = if elementwise {
            g.operands(n).into_iter().map(|o| storage(g, o)).find(|o| {
                dies.get(o) == Some(&i)
                    && buffers.get(o).map(|b| b.bytes == bytes && b.into_argument.is_none()).unwrap_or(false)
                    && !outputs.contains(o)
            })
        } else {
            None
        };
        let offset = match donor {
            Some(d) => {
                // The donor's slice passes to this node; it is not released.
                releases[i].retain(|x| *x != d);
                buffers[&d].offset
            }
            None => match free.iter().position(|(_, size)| *size >= bytes) {
                Some(k) => {
                    let (off, size) = free[k];
                    if size == bytes {
                        free.remove(k);
                    } else {
                        free[k] = (off + bytes, size - bytes);
                    }
                    off
                }
                None => {
                    let off = arena;
                    arena += bytes;
                    off
                }
            },
        };
        let d = dies.get(&n).copied().unwrap_or(i);
        buffers.insert(n, Buffer { node: n, bytes, offset, born: i, dies: d, in_place_of: donor, into_argument: None });
        if let Some(donor) = donor {
            if let Some(b) = buffers.get_mut(&donor) {
                b.dies = i;
            }
        }
        // Operands whose life ends here are freed after this node.
        for o in g.operands(n) {
            let so = storage(g, o);
            if dies.get(&so) == Some(&i) && Some(so) != donor && buffers.contains_key(&so) && !outputs.contains(&so) {
                releases[i].push(so);
            }
        }
        if d == i && !outputs.contains(&n) {
            releases[i].push(n);
        }
        for r in std::mem::take(&mut releases[i]) {
            let b = &buffers[&r];
            if b.into_argument.is_none() {
                free.push((b.offset, b.bytes));
            }
        }
        free.sort();
        // Merge adjacent free intervals.
        let mut merged: Vec<(usize, usize)> = vec![];
        for (o, s) in free.drain(..) {
            match merged.last_mut() {
                Some((mo, ms)) if *mo + *ms == o => *ms += s,
                _ => merged.push((o, s)),
            }
        }
        free = merged;
    }
    // Peak: the most bytes live at once. At an in-place step the donor and the receiver
    // share one slice, counted once.
    let live_at = |i: usize| -> usize {
        let live = |b: &Buffer| b.born <= i && i <= b.dies && b.into_argument.is_none();
        let total: usize = buffers.values().filter(|b| live(b)).map(|b| b.bytes).sum();
        let shared: usize = buffers
            .values()
            .filter(|b| live(b))
            .filter_map(|b| b.in_place_of.and_then(|d| buffers.get(&d)))
            .filter(|d| live(d))
            .map(|d| d.bytes)
            .sum();
        total - shared
    };
    let mut peak = (0usize, 0usize);
    for i in 0..order.len() {
        let live = live_at(i);
        if live > peak.1 {
            peak = (i, live);
        }
    }
    Plan {
        name: g.name.clone(),
        arena_bytes: arena,
        peak_live_bytes: peak.1,
        peak_at: peak.0,
        naive_bytes: naive,
        argument_bytes,
        order,
        buffers,
    }
}

pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

impl Plan {
    /// Checks the plan: aligned, inside the arena, and no two buffers that are live at the
    /// same time overlap in memory (a buffer written in place of another takes it over).
    pub fn verify(&self) -> Result<(), String> {
        let bufs: Vec<&Buffer> = self.buffers.values().filter(|b| b.into_argument.is_none()).collect();
        for b in &bufs {
            if b.offset % ALIGN != 0 || b.offset + b.bytes > self.arena_bytes {
                return Err(format!(
                    "buffer of %{} at {} ({} B) is misaligned or outside the arena",
                    b.node.index(),
                    b.offset,
                    b.bytes
                ));
            }
        }
        for (i, a) in bufs.iter().enumerate() {
            for b in &bufs[i + 1..] {
                let overlap_time = a.born <= b.dies && b.born <= a.dies;
                let overlap_mem = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
                let handoff = a.in_place_of == Some(b.node) || b.in_place_of == Some(a.node);
                // A slice freed at step i may be reused by the node produced at step i + 1;
                // a producer born at the step its predecessor dies only through an in-place handoff.
                let sequential = a.dies < b.born || b.dies < a.born;
                if overlap_time && overlap_mem && !handoff && !sequential {
                    return Err(format!(
                        "buffers of %{} and %{} are live together and overlap",
                        a.node.index(),
                        b.node.index()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The report of `recipec build --emit plan`.
    pub fn report(&self, g: &Graph) -> String {
        let mut out = format!("plan {}\n", self.name);
        out.push_str(&format!("  arguments      {:>12}  (owned by the caller)\n", human(self.argument_bytes)));
        out.push_str(&format!("  arena          {:>12}\n", human(self.arena_bytes)));
        let at = self.order.get(self.peak_at).copied();
        let peak_node = at.map(|n| format!("%{} {}", n.index(), g.node(n).op.name())).unwrap_or_default();
        out.push_str(&format!("  peak live      {:>12}  at {peak_node}\n", human(self.peak_live_bytes)));
        out.push_str(&format!("  naive          {:>12}  (one buffer per node, no reuse)\n", human(self.naive_bytes)));
        let mut updated: Vec<String> = self
            .buffers
            .values()
            .filter_map(|b| b.into_argument)
            .filter_map(|a| match &g.node(a).op {
                Op::Input { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect();
        updated.sort();
        if !updated.is_empty() {
            out.push_str(&format!("  updated in place: {}\n", updated.join(", ")));
        }
        out.push_str("  live at the peak, largest first:\n");
        let mut live: Vec<&Buffer> = self
            .buffers
            .values()
            .filter(|b| b.into_argument.is_none() && b.born <= self.peak_at && self.peak_at <= b.dies)
            .collect();
        live.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.born.cmp(&b.born)));
        for b in live.iter().take(12) {
            let n = g.node(b.node);
            let ty = format!("{}{:?}", n.dtype, n.shape);
            out.push_str(&format!("    {:>10}  {:<18} {:<14} {}\n", human(b.bytes), ty, n.op.name(), n.origin));
        }
        if live.len() > 12 {
            out.push_str(&format!("    … and {} smaller buffers\n", live.len() - 12));
        }
        out
    }
}
