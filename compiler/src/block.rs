//! `block-matmul-reductions`: a matmul whose `[N, V]` product only feeds elementwise work,
//! reductions and further matmuls is computed in column blocks of V, so the product never
//! exists in memory (the Cut Cross-Entropy result, found on the naive formula).
//!
//! **Region.** From a large rank-2 matmul `Z = A @ B` (`[N, V]`), the region is every node
//! of shape `[N, V]` reached from `Z` through elementwise ops. Every use of a region node
//! outside the region must be a *consumer* the pass can split over column blocks: a
//! reduction over axis 1 (per-row statistics, combined block by block), over axis 0 or both;
//! a `gather` along axis 1 with one index per row (the target logit); a matmul that contracts
//! V (`region @ W`, the block products summed); or a matmul `L @ region` (its column blocks
//! concatenated). Otherwise the matmul is left alone.
//!
//! **Phases.** A region node that needs a consumer's result (the softmax needs the row
//! maximum and the row sum) can only run after a full pass over the blocks. Each node
//! gets the first pass in which all it reads exists; each pass recomputes the blocks of `Z`
//! it needs (one extra matmul per pass, as the paper's backward recomputes the logits)
//! instead of keeping them.
//!
//! **Online log-sum-exp.** A row sum of `exp(x − m)` whose shift `m` is a function of the row
//! maximum of the same `x` alone (as in `logsumexp`: the maximum, or 0 where it is not
//! finite) is computed in the maximum's pass: with the running maximum's shift `m_b` after
//! block `b`, `s_b = s_{b−1} · exp(m_{b−1} − m_b) + Σ exp(x_b − m_b)` (Milakov & Gimelshein,
//! "Online normalizer calculation for softmax", 2018). Cross-entropy then takes two passes
//! over the blocks (statistics; gradients): four matmuls where the naive formula needs three.
//!
//! **Rewrite.** For every pass and block, the needed region nodes are cloned at the block's
//! width; values from outside the region are sliced (elementwise expressions over
//! broadcasts are cloned with their leaves sliced, so nothing `[N, V]` is materialized); a
//! one-hot `scatter_add` (the gradient of the gather) becomes a `select` on the column
//! index, and a gather along axis 1 becomes a masked row sum (exact: one non-zero term).
//! Block results combine with `add`/`max`/`min`/`mul` chains or a `concat`. The result is an
//! ordinary graph: the interpreter runs it, and the differential tests compare it with the
//! unblocked one.
//!
//! **Transposed recomputation** (`BlockOptions::recompute_columns`, the CUDA target). In the
//! gradient pass two consumers read each block `G_b` (`[N, w]`) of the logits' gradient:
//! `G_b @ C_b` (the hidden state's gradient, row by row) and `G_bᵀ @ H` (the classifier's
//! gradient, column by column). Row fusion (`kernel::find_row_groups`) can keep a block on
//! chip only if every reader goes row by row, so with both the block is stored (8 MiB at the
//! Gemma 2 2B setting in bf16). With this option the classifier's gradient, a
//! `transpose(L @ region)` consumer, is instead summed over chunks of R rows of N (576 in
//! 16 bits, 288 in f32: `chunk_rows`) from its own recomputation of the region, transposed:
//! `Σ_r (region_r)ᵀ @ L[:, r]ᵀ`, the product as `Bᵀ @ A_rᵀ` (`[V, R]`), so each chunk is
//! itself row-local along V. Both gradients are then trailing matmuls of row-fused groups and
//! nothing `[N, w]` or `[V, R]` is stored: the loss keeps 0.32 MiB beyond its inputs and
//! gradients at that setting, in 1,093 launches (2,078 before). The price is one more product
//! (five where the naive formula needs three, the Cut Cross-Entropy kernel four with atomic
//! adds, which would make the gradients nondeterministic), and in 16-bit dtypes the
//! classifier's gradient is rounded once per chunk of rows (as the hidden state's is once
//! per block). Blocks are then also at most `chunk_rows` columns wide, so that row fusion
//! takes every block whatever N is (at N = 1024 the 8 MiB default would be 4,096 columns).
//! The CPU keeps the stored block: there memory is plentiful and the product costs time.

use crate::ir::{Bin, Graph, IrError, NodeId, Op, Red};
use crate::passes::PassReport;
use lang::types::Dtype;
use std::collections::{BTreeSet, HashMap};

#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// Only products of at least this many bytes are blocked.
    pub min_bytes: usize,
    /// The bytes of one `[N, w]` block (sets the block width w).
    pub block_bytes: usize,
    /// A fixed block width (tests use awkward ones), instead of `block_bytes`.
    pub cols: Option<usize>,
    /// Compute a `transpose(L @ region)` consumer (the classifier's gradient) from its own
    /// recomputation of the region in row chunks, transposed (`[V, R]`), instead of from the
    /// column blocks: no block of the region is then read by two consumers, so row fusion
    /// keeps every block on chip (no gradient block is stored), at the cost of one more
    /// product (see the module notes). The CUDA target's default. Blocks are then at most
    /// `chunk_rows` columns wide (unless `cols` fixes the width), so that row fusion keeps
    /// each block and its gradient on chip whatever N is.
    pub recompute_columns: bool,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions { min_bytes: 32 << 20, block_bytes: 8 << 20, cols: None, recompute_columns: false }
    }
}

impl BlockOptions {
    /// The defaults, overridden by `RECIPEC_BLOCK_MIN_BYTES`, `RECIPEC_BLOCK_COLS` and
    /// `RECIPEC_BLOCK_RECOMPUTE` (`1` or `0`).
    pub fn from_env() -> BlockOptions {
        BlockOptions::default().env()
    }

    /// The defaults for `target`: on CUDA the classifier's gradient is recomputed
    /// (`recompute_columns`), so the loss keeps no gradient block in device memory.
    pub fn for_target(target: crate::passes::Target) -> BlockOptions {
        let o = BlockOptions { recompute_columns: target == crate::passes::Target::Cuda, ..BlockOptions::default() };
        o.env()
    }

    fn env(self) -> BlockOptions {
        let mut o = self;
        if let Ok(v) = std::env::var("RECIPEC_BLOCK_RECOMPUTE") {
            o.recompute_columns = v == "1";
        }
        if let Some(v) = std::env::var("RECIPEC_BLOCK_MIN_BYTES").ok().and_then(|v| v.parse().ok()) {
            o.min_bytes = v;
        }
        if let Some(v) = std::env::var("RECIPEC_BLOCK_COLS").ok().and_then(|v| v.parse().ok()) {
            o.cols = Some(v);
        }
        o
    }
}

/// The pass (the CPU target's options).
pub fn block_matmul_reductions(g: &mut Graph) -> Result<PassReport, IrError> {
    run(g, &BlockOptions::from_env())
}

/// Rows of a chunk of the transposed recomputation (`recompute_columns`) for a product of
/// `elem`-byte values: the `[V, R]` product and one `[V, R]` value of the region fit, 16
/// rows at a time, the on-chip bytes of a row-fused group (`kernel::TILE_GROUP_BYTES`).
pub fn chunk_rows(elem: usize) -> usize {
    let r = crate::kernel::TILE_GROUP_BYTES / (crate::kernel::TILE_MIN_ROWS * 2 * elem.max(1));
    (r.min(crate::kernel::TILE_MAX_COLS) / 16 * 16).max(16)
}

fn bytes(g: &Graph, n: NodeId) -> usize {
    let node = g.node(n);
    node.shape.iter().product::<usize>() * crate::plan::dtype_bytes(node.dtype)
}

pub fn run(g: &mut Graph, opts: &BlockOptions) -> Result<PassReport, IrError> {
    let find = |g: &Graph| -> Vec<NodeId> {
        g.topo()
            .into_iter()
            .filter(|n| {
                let node = g.node(*n);
                node.op == Op::MatMul
                    && node.shape.len() == 2
                    && node.dtype.is_float()
                    && bytes(g, *n) >= opts.min_bytes
            })
            .collect()
    };
    let mut cands = find(g);
    if !cands.is_empty() {
        // Blocks are scheduled in the order their nodes are numbered: number them in the
        // order they are made (block 0 first), not into the holes earlier passes left, which
        // put a later block's products first and kept two gradient blocks alive.
        g.compact();
        cands = find(g);
    }
    let mut changed = 0;
    for z in cands {
        if g.contains(z) && block(g, z, opts)? {
            changed += 1;
        }
    }
    Ok(PassReport { changed })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Consumer {
    /// A reduction over the given axes (1: rows, 0: columns, both).
    Reduce(Red, bool, bool),
    /// `gather(x, idx[N, 1], axis = 1)`.
    Pick,
    /// `x @ W`, contracting V.
    Contract,
    /// `L @ x`, column blocks.
    Columns,
    /// `transpose(L @ x)`: row blocks `xᵀ Lᵀ` (the transpose node is what gets replaced).
    ColumnsT(NodeId),
}

fn elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast)
}

fn block(g: &mut Graph, z: NodeId, opts: &BlockOptions) -> Result<bool, IrError> {
    let (n, v) = (g.node(z).shape[0], g.node(z).shape[1]);
    let nv = vec![n, v];
    let elem = crate::plan::dtype_bytes(g.node(z).dtype);
    // Recomputing the classifier's gradient (the CUDA target), blocks are also narrow
    // enough for row fusion to keep a block and its gradient on chip (`chunk_rows`).
    let fit = if opts.recompute_columns { chunk_rows(elem) } else { 4096 };
    let cols = opts.cols.unwrap_or_else(|| (opts.block_bytes / (n * elem).max(1)).clamp(16, 4096).min(fit));
    if cols >= v {
        return Ok(false);
    }
    // The region.
    let mut region: BTreeSet<NodeId> = BTreeSet::from([z]);
    let mut work = vec![z];
    while let Some(x) = work.pop() {
        for u in g.users(x) {
            let un = g.node(u);
            if !region.contains(&u) && un.shape == nv && elementwise(&un.op) {
                region.insert(u);
                work.push(u);
            }
        }
    }
    // Its consumers.
    let outputs: BTreeSet<NodeId> = g.outputs.iter().map(|o| o.1).collect();
    let mut consumers: Vec<(NodeId, Consumer)> = vec![];
    for &x in &region {
        if outputs.contains(&x) {
            return Ok(false);
        }
        for u in g.users(x) {
            if region.contains(&u) || consumers.iter().any(|c| c.0 == u) {
                continue;
            }
            let un = g.node(u);
            let ops = g.operands(u);
            let kind = match &un.op {
                Op::Reduce { op, axes } if !matches!(op, Red::ArgMax | Red::ArgMin) => {
                    Consumer::Reduce(*op, axes.contains(&0), axes.contains(&1))
                }
                Op::Gather { axis: 1 }
                    if ops[0] == x && !region.contains(&ops[1]) && g.node(ops[1]).shape == [n, 1] =>
                {
                    Consumer::Pick
                }
                Op::MatMul if ops[0] == x && !region.contains(&ops[1]) => Consumer::Contract,
                Op::MatMul if ops[1] == x && !region.contains(&ops[0]) => {
                    let users = g.users(u);
                    match users.as_slice() {
                        [t] if g.node(*t).op == (Op::Transpose { perm: vec![1, 0] }) && !outputs.contains(&u) => {
                            Consumer::ColumnsT(*t)
                        }
                        _ => Consumer::Columns,
                    }
                }
                _ => return Ok(false),
            };
            consumers.push((u, kind));
        }
    }
    if consumers.is_empty() {
        return Ok(false);
    }
    // Online log-sum-exp: a row sum of `exp(x − m)` where `m` comes from the row maximum of
    // the same `x` is computed in the maximum's pass, rescaling the running sum whenever
    // the running maximum grows (so the softmax statistics take one pass, not two).
    let cons: HashMap<NodeId, Consumer> = consumers.iter().copied().collect();
    let online: HashMap<NodeId, Online> =
        consumers.iter().filter_map(|(c, _)| online_sum(g, *c, &region, &cons).map(|o| (*c, o))).collect();
    // Phases: the first pass in which everything a node reads exists.
    let mut phase: HashMap<NodeId, usize> = HashMap::new();
    let mut avail: HashMap<NodeId, usize> = HashMap::new();
    for id in g.topo() {
        let ops = g.operands(id);
        let p = ops
            .iter()
            .map(|o| if region.contains(o) { phase[o] } else { avail.get(o).copied().unwrap_or(0) })
            .max()
            .unwrap_or(0);
        if region.contains(&id) {
            phase.insert(id, p);
        } else if cons.contains_key(&id) {
            let p = match online.get(&id) {
                Some(o) => phase[&o.max],
                None => p,
            };
            phase.insert(id, p);
            avail.insert(id, p + 1);
        } else {
            avail.insert(id, p);
        }
    }
    let passes = consumers.iter().map(|c| phase[&c.0]).max().unwrap_or(0) + 1;
    let origin_of = |g: &Graph, x: NodeId| g.node(x).origin.clone();
    let starts: Vec<usize> = (0..v).step_by(cols).collect();
    let topo: Vec<NodeId> = g.topo().into_iter().filter(|x| region.contains(x)).collect();
    // The nodes that replace each consumer: a running combination or the parts to concatenate.
    let mut acc: HashMap<NodeId, NodeId> = HashMap::new();
    let mut parts: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    // The shift each online sum used in the previous block.
    let mut shift_prev: HashMap<NodeId, NodeId> = HashMap::new();
    // The clamped target index of each one-hot (shared by every block and pass).
    let mut clamped: HashMap<NodeId, NodeId> = HashMap::new();
    // Consumers computed from the transposed recomputation (`recompute_columns`).
    let recomputed: BTreeSet<NodeId> = consumers
        .iter()
        .filter(|(_, k)| opts.recompute_columns && matches!(k, Consumer::ColumnsT(_)))
        .map(|c| c.0)
        .collect();
    for p in 0..passes {
        let all_here: Vec<(NodeId, Consumer)> = consumers.iter().copied().filter(|c| phase[&c.0] == p).collect();
        let here: Vec<(NodeId, Consumer)> = all_here.iter().copied().filter(|c| !recomputed.contains(&c.0)).collect();
        let chunked: Vec<(NodeId, Consumer)> = all_here.iter().copied().filter(|c| recomputed.contains(&c.0)).collect();
        if !chunked.is_empty() {
            recompute_transposed(g, z, &region, &topo, &chunked, &mut acc, &mut clamped)?;
        }
        if here.is_empty() {
            continue;
        }
        // Region nodes this pass needs.
        let mut need: BTreeSet<NodeId> = BTreeSet::new();
        let mut stack: Vec<NodeId> = here
            .iter()
            .filter(|(c, _)| !online.contains_key(c))
            .flat_map(|(c, _)| g.operands(*c))
            .chain(here.iter().filter_map(|(c, _)| online.get(c).map(|o| o.x)))
            .filter(|o| region.contains(o))
            .collect();
        while let Some(x) = stack.pop() {
            if need.insert(x) {
                stack.extend(g.operands(x).into_iter().filter(|o| region.contains(o)));
            }
        }
        for &start in &starts {
            let w = cols.min(v - start);
            let mut clone: HashMap<NodeId, NodeId> = HashMap::new();
            let mut sliced: HashMap<NodeId, NodeId> = HashMap::new();
            for &x in topo.iter().filter(|x| need.contains(x)) {
                let node = g.node(x).clone();
                let ops = g.operands(x);
                let new = if x == z {
                    let b = ops[1];
                    let bn = g.node(b).clone();
                    let bs = g.add(Op::Slice { axis: 1, start }, bn.dtype, vec![bn.shape[0], w], &[b], &bn.origin)?;
                    g.add(Op::MatMul, node.dtype, vec![n, w], &[ops[0], bs], &node.origin)?
                } else {
                    let mut o2 = vec![];
                    for o in ops {
                        o2.push(match clone.get(&o) {
                            Some(c) => *c,
                            None => slice_of(g, o, (1, start, w), &mut sliced, &mut clamped)?,
                        });
                    }
                    g.add(node.op.clone(), node.dtype, vec![n, w], &o2, &node.origin)?
                };
                clone.insert(x, new);
            }
            for &(c, kind) in &here {
                if online.contains_key(&c) {
                    continue;
                }
                let cn = g.node(c).clone();
                let ops = g.operands(c);
                let o = &cn.origin;
                match kind {
                    Consumer::Reduce(op, cols_axis, rows_axis) => {
                        let x = clone[&ops[0]];
                        let axes: Vec<usize> =
                            [(cols_axis, 0usize), (rows_axis, 1)].iter().filter(|a| a.0).map(|a| a.1).collect();
                        let shape = match (cols_axis, rows_axis) {
                            (true, true) => vec![],
                            (true, false) => vec![w],
                            _ => vec![n],
                        };
                        let part = g.add(Op::Reduce { op, axes }, cn.dtype, shape.clone(), &[x], o)?;
                        if cols_axis && !rows_axis {
                            parts.entry(c).or_default().push(part);
                        } else {
                            let bin = match op {
                                Red::Sum => Bin::Add,
                                Red::Max => Bin::Max,
                                Red::Min => Bin::Min,
                                _ => Bin::Mul,
                            };
                            combine(g, &mut acc, c, part, bin, cn.dtype, shape, o)?;
                        }
                    }
                    Consumer::Pick => {
                        let x = clone[&ops[0]];
                        let hit = one_hot(g, ops[1], (1, start, w), n, v, o, &mut clamped)?;
                        let zero = g.add(Op::Const { value: 0.0 }, cn.dtype, vec![], &[], o)?;
                        let zero = g.add(Op::Broadcast, cn.dtype, vec![n, w], &[zero], o)?;
                        let sel = g.add(Op::Select, cn.dtype, vec![n, w], &[hit, x, zero], o)?;
                        let part = g.add(Op::Reduce { op: Red::Sum, axes: vec![1] }, cn.dtype, vec![n], &[sel], o)?;
                        combine(g, &mut acc, c, part, Bin::Add, cn.dtype, vec![n], o)?;
                    }
                    Consumer::Contract => {
                        let x = clone[&ops[0]];
                        let wn = g.node(ops[1]).clone();
                        let ws =
                            g.add(Op::Slice { axis: 0, start }, wn.dtype, vec![w, wn.shape[1]], &[ops[1]], &wn.origin)?;
                        let part = g.add(Op::MatMul, cn.dtype, cn.shape.clone(), &[x, ws], o)?;
                        combine(g, &mut acc, c, part, Bin::Add, cn.dtype, cn.shape.clone(), o)?;
                    }
                    Consumer::Columns => {
                        let x = clone[&ops[1]];
                        let part = g.add(Op::MatMul, cn.dtype, vec![cn.shape[0], w], &[ops[0], x], o)?;
                        parts.entry(c).or_default().push(part);
                    }
                    Consumer::ColumnsT(_) => {
                        let x = clone[&ops[1]];
                        let k = cn.shape[0];
                        let xt = g.add(Op::Transpose { perm: vec![1, 0] }, cn.dtype, vec![w, n], &[x], o)?;
                        let ln = g.node(ops[0]).clone();
                        let lt =
                            g.add(Op::Transpose { perm: vec![1, 0] }, ln.dtype, vec![n, k], &[ops[0]], &ln.origin)?;
                        let part = g.add(Op::MatMul, cn.dtype, vec![w, k], &[xt, lt], o)?;
                        parts.entry(c).or_default().push(part);
                    }
                }
            }
            // Online sums, after the running maximum of this block exists.
            for &(c, _) in &here {
                let Some(on) = online.get(&c) else { continue };
                let cn = g.node(c).clone();
                let o = &cn.origin;
                let running_max = acc[&on.max];
                // The shift `m` of this block: the maximum-to-shift chain on the running maximum.
                let mut memo: HashMap<NodeId, NodeId> = HashMap::from([(on.max, running_max)]);
                let m_b = reclone(g, on.shift, &on.chain, &mut memo)?;
                let ms = g.node(m_b).shape.clone();
                let mb = g.add(Op::Broadcast, cn.dtype, vec![n, w], &[m_b], o)?;
                let d = g.add(Op::Binary(Bin::Sub), cn.dtype, vec![n, w], &[clone[&on.x], mb], o)?;
                let e = g.add(Op::Unary(crate::ir::Un::Exp), cn.dtype, vec![n, w], &[d], o)?;
                let part = g.add(Op::Reduce { op: Red::Sum, axes: vec![1] }, cn.dtype, vec![n], &[e], o)?;
                let m_row = if ms == [n] { m_b } else { g.add(Op::Reshape, cn.dtype, vec![n], &[m_b], o)? };
                let new = match (acc.get(&c), shift_prev.get(&c)) {
                    (Some(&sum), Some(&prev)) => {
                        // sum · exp(m_prev − m) + part
                        let dm = g.add(Op::Binary(Bin::Sub), cn.dtype, vec![n], &[prev, m_row], o)?;
                        let f = g.add(Op::Unary(crate::ir::Un::Exp), cn.dtype, vec![n], &[dm], o)?;
                        let scaled = g.add(Op::Binary(Bin::Mul), cn.dtype, vec![n], &[sum, f], o)?;
                        g.add(Op::Binary(Bin::Add), cn.dtype, vec![n], &[scaled, part], o)?
                    }
                    _ => part,
                };
                acc.insert(c, new);
                shift_prev.insert(c, m_row);
            }
        }
    }
    for (c, kind) in &consumers {
        let cn = g.node(*c).clone();
        let new = match kind {
            Consumer::Reduce(_, true, false) => {
                g.add(Op::Concat { axis: 0 }, cn.dtype, cn.shape.clone(), &parts[c], &cn.origin)?
            }
            Consumer::Columns => g.add(Op::Concat { axis: 1 }, cn.dtype, cn.shape.clone(), &parts[c], &cn.origin)?,
            Consumer::ColumnsT(t) if recomputed.contains(c) => {
                g.replace_uses(*t, acc[c]);
                continue;
            }
            Consumer::ColumnsT(t) => {
                let tn = g.node(*t).clone();
                let cat = g.add(Op::Concat { axis: 0 }, cn.dtype, tn.shape.clone(), &parts[c], &tn.origin)?;
                g.replace_uses(*t, cat);
                continue;
            }
            Consumer::Pick => g.add(Op::Reshape, cn.dtype, cn.shape.clone(), &[acc[c]], &cn.origin)?,
            _ => acc[c],
        };
        g.replace_uses(*c, new);
    }
    let _ = origin_of;
    Ok(true)
}

/// The `transpose(L @ region)` consumers `chunked` (`[V, K]`, `L: [K, N]`) as sums over row
/// chunks `r` of N: `Σ_r region_rᵀ @ L[:, r]ᵀ`, with `region_rᵀ` (`[V, R]`) recomputed
/// transposed: the product as `Bᵀ @ A_rᵀ`, every region node at `[V, R]`, and each outside
/// value as the transpose of its row chunk (`slice_of` along rows, views the kernels read in
/// place). Row fusion then computes each chunk strip by strip of V with the consumer's
/// matmul as its trailing matmul: nothing `[V, R]` is stored. The sums go in `acc`.
fn recompute_transposed(
    g: &mut Graph,
    z: NodeId,
    region: &BTreeSet<NodeId>,
    topo: &[NodeId],
    chunked: &[(NodeId, Consumer)],
    acc: &mut HashMap<NodeId, NodeId>,
    clamped: &mut HashMap<NodeId, NodeId>,
) -> Result<(), IrError> {
    let (n, v) = (g.node(z).shape[0], g.node(z).shape[1]);
    let zn = g.node(z).clone();
    let rows = chunk_rows(crate::plan::dtype_bytes(zn.dtype));
    let mut need: BTreeSet<NodeId> = BTreeSet::new();
    let mut stack: Vec<NodeId> = chunked.iter().map(|(c, _)| g.operands(*c)[1]).collect();
    while let Some(x) = stack.pop() {
        if need.insert(x) {
            stack.extend(g.operands(x).into_iter().filter(|o| region.contains(o)));
        }
    }
    let (a, b) = (g.operands(z)[0], g.operands(z)[1]);
    let t01 = Op::Transpose { perm: vec![1, 0] };
    // `Bᵀ` (`[V, D]`): the classifier itself where `B` is its transpose.
    let bn = g.node(b).clone();
    let bt = if bn.op == t01 {
        g.operands(b)[0]
    } else {
        g.add(t01.clone(), bn.dtype, vec![bn.shape[1], bn.shape[0]], &[b], &bn.origin)?
    };
    let an = g.node(a).clone();
    let d = an.shape[1];
    for r0 in (0..n).step_by(rows) {
        let r = rows.min(n - r0);
        let mut clone: HashMap<NodeId, NodeId> = HashMap::new();
        let mut sliced: HashMap<NodeId, NodeId> = HashMap::new();
        for &x in topo.iter().filter(|x| need.contains(x)) {
            let node = g.node(x).clone();
            let o = &node.origin;
            let new = if x == z {
                let ar = g.add(Op::Slice { axis: 0, start: r0 }, an.dtype, vec![r, d], &[a], &an.origin)?;
                let art = g.add(t01.clone(), an.dtype, vec![d, r], &[ar], &an.origin)?;
                g.add(Op::MatMul, node.dtype, vec![v, r], &[bt, art], o)?
            } else {
                let mut ops = vec![];
                for op in g.operands(x) {
                    ops.push(match clone.get(&op) {
                        Some(c) => *c,
                        None => {
                            let rs = slice_of(g, op, (0, r0, r), &mut sliced, clamped)?;
                            let dt = g.node(rs).dtype;
                            g.add(t01.clone(), dt, vec![v, r], &[rs], o)?
                        }
                    });
                }
                g.add(node.op.clone(), node.dtype, vec![v, r], &ops, o)?
            };
            clone.insert(x, new);
        }
        for &(c, _) in chunked {
            let cn = g.node(c).clone();
            let (l, x) = (g.operands(c)[0], g.operands(c)[1]);
            let ln = g.node(l).clone();
            let k = ln.shape[0];
            let lr = g.add(Op::Slice { axis: 1, start: r0 }, ln.dtype, vec![k, r], &[l], &ln.origin)?;
            let lrt = g.add(t01.clone(), ln.dtype, vec![r, k], &[lr], &ln.origin)?;
            let part = g.add(Op::MatMul, cn.dtype, vec![v, k], &[clone[&x], lrt], &cn.origin)?;
            combine(g, acc, c, part, Bin::Add, cn.dtype, vec![v, k], &cn.origin)?;
        }
    }
    Ok(())
}

/// A row sum computed online with its row maximum (see `block`).
struct Online {
    /// The row-maximum consumer of the same `x`.
    max: NodeId,
    /// The region node whose row maximum and `exp(x − shift)` row sum are taken.
    x: NodeId,
    /// The shift `m` (`[N, 1]` or `[N]`), computed outside the region from `max`.
    shift: NodeId,
    /// The nodes between `max` and `shift` (they are recomputed from the running maximum).
    chain: BTreeSet<NodeId>,
}

/// Matches `sum(exp(x − broadcast(m)), axis = 1)` with `m` a function of `max(x, axis = 1)`
/// alone (through elementwise ops, reshapes and broadcasts of constants), such as the
/// shift of `logsumexp` (the maximum, or 0 where it is not finite).
fn online_sum(g: &Graph, c: NodeId, region: &BTreeSet<NodeId>, cons: &HashMap<NodeId, Consumer>) -> Option<Online> {
    if cons.get(&c) != Some(&Consumer::Reduce(Red::Sum, false, true)) || !g.node(c).dtype.is_float() {
        return None;
    }
    let e = g.operands(c)[0];
    // (`exp` and the difference may have other users, in later passes: there they are
    // recomputed with the final shift.)
    if g.node(e).op != Op::Unary(crate::ir::Un::Exp) {
        return None;
    }
    let d = g.operands(e)[0];
    if g.node(d).op != Op::Binary(Bin::Sub) || !region.contains(&d) {
        return None;
    }
    let (x, bm) = (g.operands(d)[0], g.operands(d)[1]);
    if !region.contains(&x) || region.contains(&bm) || g.node(bm).op != Op::Broadcast {
        return None;
    }
    let shift = g.operands(bm)[0];
    let n = g.node(x).shape[0];
    if g.node(shift).shape != [n, 1] && g.node(shift).shape != [n] {
        return None;
    }
    // The chain from the maximum to the shift: every node on it is row-shaped and elementwise
    // (or a reshape), and its other inputs do not depend on the region.
    let max = g.users(x).into_iter().find(|u| cons.get(u) == Some(&Consumer::Reduce(Red::Max, false, true)))?;
    let mut chain = BTreeSet::new();
    let mut stack = vec![shift];
    let mut seen_max = false;
    while let Some(y) = stack.pop() {
        if y == max {
            seen_max = true;
            continue;
        }
        if region.contains(&y) || cons.contains_key(&y) {
            return None;
        }
        let node = g.node(y);
        let row = node.shape == [n, 1] || node.shape == [n] || node.shape.is_empty();
        if !row {
            return None;
        }
        let depends = depends_on(g, y, max);
        if !depends {
            continue; // a constant or another row value, used as it is
        }
        if !(elementwise(&node.op) || matches!(node.op, Op::Reshape | Op::Broadcast)) {
            return None;
        }
        if chain.insert(y) {
            stack.extend(g.operands(y));
        }
    }
    seen_max.then_some(Online { max, x, shift, chain })
}

fn depends_on(g: &Graph, y: NodeId, target: NodeId) -> bool {
    let mut stack = vec![y];
    let mut seen = BTreeSet::new();
    while let Some(a) = stack.pop() {
        if a == target {
            return true;
        }
        if seen.insert(a) {
            stack.extend(g.operands(a));
        }
    }
    false
}

/// A copy of `y` with the nodes of `chain` recomputed (`memo` maps replaced nodes).
fn reclone(
    g: &mut Graph,
    y: NodeId,
    chain: &BTreeSet<NodeId>,
    memo: &mut HashMap<NodeId, NodeId>,
) -> Result<NodeId, IrError> {
    if let Some(r) = memo.get(&y) {
        return Ok(*r);
    }
    if !chain.contains(&y) {
        return Ok(y);
    }
    let node = g.node(y).clone();
    let mut ops = vec![];
    for o in g.operands(y) {
        ops.push(reclone(g, o, chain, memo)?);
    }
    let new = g.add(node.op.clone(), node.dtype, node.shape.clone(), &ops, &node.origin)?;
    memo.insert(y, new);
    Ok(new)
}

#[allow(clippy::too_many_arguments)]
fn combine(
    g: &mut Graph,
    acc: &mut HashMap<NodeId, NodeId>,
    c: NodeId,
    part: NodeId,
    bin: Bin,
    dtype: Dtype,
    shape: Vec<usize>,
    o: &str,
) -> Result<(), IrError> {
    let new = match acc.get(&c) {
        Some(a) => g.add(Op::Binary(bin), dtype, shape, &[*a, part], o)?,
        None => part,
    };
    acc.insert(c, new);
    Ok(())
}

/// A part of `one_hot(idx)` (`bool[N, V]`: whether column j is row i's clamped index in
/// `idx: [N, 1]`): along `axis`, `len` columns (axis 1) or rows (axis 0) from `start`. The
/// clamped index is computed once per `idx` (`clamped`), not once per block: each copy
/// would be a buffer of its own, all alive from the first block to the last.
#[allow(clippy::too_many_arguments)]
fn one_hot(
    g: &mut Graph,
    idx: NodeId,
    (axis, start, len): (usize, usize, usize),
    n: usize,
    v: usize,
    o: &str,
    clamped: &mut HashMap<NodeId, NodeId>,
) -> Result<NodeId, IrError> {
    let it = g.node(idx).dtype;
    let mut shape = vec![n, v];
    shape[axis] = len;
    let c = clamp_index(g, idx, n, v, o, clamped)?;
    let c = if axis == 0 { g.add(Op::Slice { axis: 0, start }, it, vec![len, 1], &[c], o)? } else { c };
    let c = g.add(Op::Broadcast, it, shape.clone(), &[c], o)?;
    let col = g.add(Op::Iota { axis: 1 }, it, vec![n, v], &[], o)?;
    let col = g.add(Op::Slice { axis, start }, it, shape.clone(), &[col], o)?;
    g.add(Op::Binary(Bin::Eq), Dtype::Bool, shape, &[col, c], o)
}

/// `idx: [N, 1]` clamped to `0..V`, made once per `idx` (`clamped`).
fn clamp_index(
    g: &mut Graph,
    idx: NodeId,
    n: usize,
    v: usize,
    o: &str,
    clamped: &mut HashMap<NodeId, NodeId>,
) -> Result<NodeId, IrError> {
    if let Some(c) = clamped.get(&idx) {
        return Ok(*c);
    }
    let it = g.node(idx).dtype;
    let lo = g.add(Op::Const { value: 0.0 }, it, vec![], &[], o)?;
    let lo = g.add(Op::Broadcast, it, vec![n, 1], &[lo], o)?;
    let hi = g.add(Op::Const { value: (v - 1) as f64 }, it, vec![], &[], o)?;
    let hi = g.add(Op::Broadcast, it, vec![n, 1], &[hi], o)?;
    let c = g.add(Op::Binary(Bin::Max), it, vec![n, 1], &[idx, lo], o)?;
    let c = g.add(Op::Binary(Bin::Min), it, vec![n, 1], &[c, hi], o)?;
    clamped.insert(idx, c);
    Ok(c)
}

/// Columns (`axis` 1) or rows (`axis` 0) `start..start + len` of an outside `[N, V]` value.
/// Elementwise expressions over broadcasts are cloned with their leaves sliced (so they stay
/// fusible: nothing `[N, V]` is materialized); a one-hot `scatter_add` becomes a select;
/// anything else is a slice of its buffer.
fn slice_of(
    g: &mut Graph,
    x: NodeId,
    (axis, start, len): (usize, usize, usize),
    memo: &mut HashMap<NodeId, NodeId>,
    clamped: &mut HashMap<NodeId, NodeId>,
) -> Result<NodeId, IrError> {
    if let Some(s) = memo.get(&x) {
        return Ok(*s);
    }
    let node = g.node(x).clone();
    let ops = g.operands(x);
    let (n, v) = (node.shape[0], node.shape[1]);
    let mut shape = node.shape.clone();
    shape[axis] = len;
    let o = &node.origin;
    // An `[N, 1]` value's part along `axis` (its rows, or all of it).
    let part = |g: &mut Graph, y: NodeId| -> Result<NodeId, IrError> {
        let yn = g.node(y).clone();
        if axis == 1 {
            return Ok(y);
        }
        g.add(Op::Slice { axis: 0, start }, yn.dtype, vec![len, 1], &[y], &yn.origin)
    };
    let new = match &node.op {
        Op::Broadcast => {
            let src = g.node(ops[0]).clone();
            // NumPy alignment at the right: the operand's axis `i` is the result's
            // `i + 2 − rank`; it is sliced where it has the sliced axis's full length.
            let off = 2 - src.shape.len().min(2);
            let src2 = match axis.checked_sub(off) {
                Some(i) if src.shape[i] == node.shape[axis] && node.shape[axis] != 1 => {
                    let mut s = src.shape.clone();
                    s[i] = len;
                    g.add(Op::Slice { axis: i, start }, src.dtype, s, &[ops[0]], &src.origin)?
                }
                _ => ops[0],
            };
            g.add(Op::Broadcast, node.dtype, shape, &[src2], o)?
        }
        op if elementwise(op) => {
            let mut o2 = vec![];
            for a in ops {
                o2.push(slice_of(g, a, (axis, start, len), memo, clamped)?);
            }
            g.add(node.op.clone(), node.dtype, shape, &o2, o)?
        }
        Op::ScatterAdd { axis: 1 } if g.node(ops[1]).shape == [n, 1] && g.node(ops[2]).shape == [n, 1] => {
            let base = slice_of(g, ops[0], (axis, start, len), memo, clamped)?;
            let hit = one_hot(g, ops[1], (axis, start, len), n, v, o, clamped)?;
            let vals = part(g, ops[2])?;
            let vals = g.add(Op::Broadcast, node.dtype, shape.clone(), &[vals], o)?;
            let zero = g.add(Op::Const { value: 0.0 }, node.dtype, vec![], &[], o)?;
            let zero = g.add(Op::Broadcast, node.dtype, shape.clone(), &[zero], o)?;
            let add = g.add(Op::Select, node.dtype, shape.clone(), &[hit, vals, zero], o)?;
            g.add(Op::Binary(Bin::Add), node.dtype, shape, &[base, add], o)?
        }
        _ => g.add(Op::Slice { axis, start }, node.dtype, shape, &[x], o)?,
    };
    memo.insert(x, new);
    Ok(new)
}
