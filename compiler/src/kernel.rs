//! The kernel IR and the scheduler that produces it: fusion groups of a [`Graph`] lowered
//! to loop nests (the input of every code generator), tuned matmul calls and library
//! kernels, with buffers and an arena plan.
//!
//! **Fusion.** Every node is either *materialized* (it gets a buffer) or *fused* into each
//! loop that reads it (its value is recomputed in registers at the point of use). A node is
//! materialized when it is an input or output, a reduction, a matmul or a library op, when
//! a matmul or library op reads it, or when it does arithmetic (a cast does not count) and
//! more than one node reads it. Views (`broadcast`, `transpose`, `reshape`, `slice`), constants and `iota` are never
//! materialized on their own account: they become affine index maps of the loads that read
//! through them. A `broadcast` that repeats a computed value is materialized below the
//! broadcast, so that a scalar computed once is not recomputed per element. The result:
//! an elementwise chain is one loop, a reduction with its elementwise producers is one
//! loop, and a matmul reads transposed or broadcast operands through strides.
//!
//! **Merging.** Two elementwise loops over the same iteration space are merged into one loop
//! with several stores when the later one only needs buffers that exist before the earlier
//! one runs; a value the earlier loop stores and the later loop reads at the same element
//! is passed in a register. An optimizer step (new parameter and every new state) is
//! therefore one pass over memory.
//!
//! **Row fusion.** A matmul whose product is read only by the loops right after it, each of
//! them row by row (`find_row_groups`), forms a [`RowGroup`] with them, and with the matmuls
//! right after those that multiply one of the group's `[m, n]` values by an outside matrix
//! (row `i` of their output needs row `i` only): backends run the group strip by strip of
//! rows (the strip's product on chip, then every loop on those rows, then the trailing
//! matmuls' rows), so the product — and any `[m, n]` value only the group reads — is a
//! [`BufKind::Tile`] with no memory. In the blocked linear cross-entropy that is every logits
//! block of both passes (no block of logits is ever stored), and, on the CUDA target (the
//! classifier's gradient recomputed, `block::BlockOptions::recompute_columns`), every
//! gradient block too.
//!
//! **Numerics** (shared by every code generator): f32, f16 and bf16 values are computed in
//! f32 and rounded to their dtype after each op; integers, bools and f64 are computed in
//! f64 and rounded (truncated and wrapped) to their dtype, exactly as the interpreter does.
//! Reductions accumulate in f64 in the interpreter's order. Transcendentals are evaluated
//! by the interpreter's f64 functions and rounded. Elementwise loops therefore give the
//! interpreter's bits; matmul (f32 accumulation, blocked order) does not.

use crate::ir::{Bin, Graph, IrError, Node, NodeId, Op, Red, Un};
use crate::plan::{dtype_bytes, ALIGN};
use lang::types::Dtype;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

/// An affine function of the loop indices: `Σ coef[d] * i_d + c`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Affine {
    pub coef: Vec<i64>,
    pub c: i64,
}

impl Affine {
    fn zero(n: usize) -> Affine {
        Affine { coef: vec![0; n], c: 0 }
    }
    fn var(n: usize, d: usize) -> Affine {
        let mut a = Affine::zero(n);
        a.coef[d] = 1;
        a
    }
    fn scale_add(&mut self, other: &Affine, k: i64) {
        for (x, y) in self.coef.iter_mut().zip(&other.coef) {
            *x += y * k;
        }
        self.c += other.c * k;
    }
}

pub type Val = usize;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Inst {
    /// Element `at` (in elements) of buffer `buf`, converted to the compute type.
    Load {
        buf: usize,
        at: Affine,
    },
    Const(#[serde(with = "crate::ir::f64_serde")] f64),
    /// The value of an affine function of the loop indices (`iota`).
    Index(Affine),
    Un(Un, Val),
    /// `float` tells whether the operands are floating point (integer `/` and `%` differ).
    Bin(Bin, Val, Val, bool),
    Select(Val, Val, Val),
    Cast(Val),
}

/// One instruction; its result has `dtype` (computed as described in the module doc).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Instr {
    pub inst: Inst,
    #[serde(with = "crate::ir::dtype_serde")]
    pub dtype: Dtype,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum StoreVal {
    Val(Val),
    /// The reduction's result.
    Acc,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Store {
    pub buf: usize,
    pub at: Affine,
    pub val: StoreVal,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reduction {
    pub op: Red,
    /// The trailing `dims` loop dimensions are reduced.
    pub dims: usize,
    pub value: Val,
    /// The dtype of the result (the accumulator is f64).
    #[serde(with = "crate::ir::dtype_serde")]
    pub dtype: Dtype,
}

/// A loop nest: `dims` (outermost first; the first dimension is split across threads),
/// an SSA body evaluated at every point, an optional reduction over the trailing dims, and
/// stores.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Loop {
    pub dims: Vec<usize>,
    pub body: Vec<Instr>,
    pub reduce: Option<Reduction>,
    pub stores: Vec<Store>,
    /// The graph nodes this loop computes (for reports).
    pub nodes: Vec<NodeId>,
}

impl Loop {
    pub fn outer_dims(&self) -> usize {
        self.dims.len() - self.reduce.as_ref().map(|r| r.dims).unwrap_or(0)
    }
}

/// A strided view of a buffer used as a matmul operand `[batch..., rows, cols]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct View {
    pub buf: usize,
    pub offset: i64,
    pub batch_strides: Vec<i64>,
    pub row_stride: i64,
    pub col_stride: i64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Kernel {
    Loop(Loop),
    /// `out[b] = acc[b] + a[b] @ b[b]` (without `acc`: just the product) with `a: [m, k]`,
    /// `b: [k, n]`; `out` starts at element `out_offset` with rows `out_row_stride` apart
    /// (a column block of a concatenation) and `acc` is contiguous.
    MatMul {
        a: View,
        b: View,
        out: usize,
        acc: Option<usize>,
        out_offset: i64,
        out_row_stride: i64,
        batch: Vec<usize>,
        m: usize,
        k: usize,
        n: usize,
        #[serde(with = "crate::ir::dtype_serde")]
        dtype: Dtype,
        node: NodeId,
    },
    /// An op run by the runtime's library (gather, sort, RNG, linear algebra…): operands
    /// and result are contiguous buffers of the nodes' shapes.
    Library {
        node: Node,
        id: NodeId,
        operands: Vec<Node>,
        args: Vec<usize>,
        out: usize,
    },
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum BufKind {
    /// The entry point's argument `index` (owned by the caller).
    Input(usize),
    /// A slice of the arena.
    Temp,
    /// The product of the matmul of a row-fused group ([`RowGroup`]): computed and consumed
    /// strip by strip of rows, in on-chip memory, never stored.
    Tile,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BufDecl {
    pub node: NodeId,
    #[serde(with = "crate::ir::dtype_serde")]
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub kind: BufKind,
    /// Where the value came from (recipe line or pass).
    pub origin: String,
    /// Arena offset (temps only), from the plan.
    pub offset: usize,
    pub bytes: usize,
    /// Index of the kernel that writes it (inputs: none) and of the last kernel that reads it.
    pub born: Option<usize>,
    pub dies: usize,
    /// Written into the memory of this argument buffer (an optimizer's `param` and states).
    pub into: Option<usize>,
    /// Takes over the arena slice of this buffer, which dies in the kernel that writes this
    /// one (an elementwise update in place, a matmul accumulating into its addend).
    pub reuses: Option<usize>,
}

impl BufDecl {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One entry point as kernels over buffers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Program {
    pub name: String,
    pub buffers: Vec<BufDecl>,
    /// The buffer of each graph input, in argument order, and the arguments' names.
    pub inputs: Vec<usize>,
    pub input_names: Vec<String>,
    /// Named outputs: (name, buffer, the output node's shape).
    pub outputs: Vec<(String, usize, Vec<usize>)>,
    pub kernels: Vec<Kernel>,
    pub arena_bytes: usize,
    /// The most arena bytes live at once, and the kernel where that happens.
    pub peak_bytes: usize,
    pub peak_at: usize,
    pub argument_bytes: usize,
    /// What one buffer per graph node with no reuse would take.
    pub naive_bytes: usize,
    /// Row-fused groups (see [`RowGroup`]), in kernel order.
    #[serde(default)]
    pub row_groups: Vec<RowGroup>,
}

/// A matmul and the loops after it that consume its product row by row (`find_row_groups`):
/// kernels `start..end`, `start` the matmul, whose `[m, n]` product `tile` (a
/// [`BufKind::Tile`]) never exists in memory, possibly ending with *trailing matmuls* that
/// multiply an `[m, n]` value of the group by an outside `[n, d]` matrix (the gradient
/// block times the classifier block, accumulated into the hidden state's gradient): row `i`
/// of their `[m, d]` output needs row `i` of the group's value only. A backend runs the group
/// strip by strip of rows: the strip's product (on chip: shared memory, a thread's
/// cache-sized scratch), then every loop of the group on those rows, in order, then the
/// trailing matmuls' rows. Within a group every buffer that a loop
/// writes is read and written only at its own row, so strips are independent; buffers the
/// group reads or writes are live for the whole group (the arena plan treats the group as
/// one step).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RowGroup {
    pub start: usize,
    pub end: usize,
    pub tile: usize,
    /// Other `[m, n]` buffers the group's loops write and only the group reads (the
    /// gradient block of the linear cross-entropy, read by a trailing matmul): computed strip
    /// by strip beside the product, also [`BufKind::Tile`]s with no memory.
    #[serde(default)]
    pub strips: Vec<usize>,
}

impl RowGroup {
    /// The group's buffers that live on chip only: the product, then the strips.
    pub fn tiles(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.tile).chain(self.strips.iter().copied())
    }
}

/// Scheduler options.
#[derive(Clone, Debug)]
pub struct ScheduleOptions {
    /// Form row-fused groups (`find_row_groups`).
    pub fuse_rows: bool,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions { fuse_rows: true }
    }
}

/// The widest product a row-fused group keeps on chip: a strip of [`TILE_MIN_ROWS`] rows of
/// f32 (40 KiB at 640 columns) and the matmul's staging tiles (5 KiB) in the 48 KiB of shared
/// memory any CUDA block may use without opting in.
pub const TILE_MAX_COLS: usize = 640;
/// The most bytes of a [`TILE_MIN_ROWS`]-row strip of all the tiles of a group that has
/// strips besides its product or trailing matmuls: 36 KiB, leaving room for two kinds of
/// staging tiles (tensor-core and FMA, 5 KiB each) in the 48 KiB of shared memory.
pub const TILE_GROUP_BYTES: usize = 36 * 1024;
/// The fewest rows of a strip (the tensor cores' tile height).
pub const TILE_MIN_ROWS: usize = 16;

fn strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as i64;
    }
    s
}

fn is_view(op: &Op) -> bool {
    matches!(op, Op::Broadcast | Op::Transpose { .. } | Op::Reshape | Op::Slice { .. })
}

fn is_elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast)
}

/// Ops computed inside loops.
fn is_fusible(op: &Op) -> bool {
    is_elementwise(op) || is_view(op) || matches!(op, Op::Const { .. } | Op::Iota { .. })
}

fn is_library(n: &Node) -> bool {
    match &n.op {
        Op::Input { .. } => false,
        Op::Reduce { op, .. } => matches!(op, Red::ArgMax | Red::ArgMin),
        Op::MatMul => !n.dtype.is_float(),
        op => !is_fusible(op),
    }
}

/// The coordinates of a node as affine functions of the loop indices.
type Coords = Vec<Affine>;

/// Tries to express the coordinates of `shape` whose row-major flat index is `flat` as
/// affine functions of the loop indices (`extents` of each loop dimension). Fails when a
/// loop index would carry across an axis boundary.
fn unflatten(flat: &Affine, extents: &[usize], shape: &[usize]) -> Option<Coords> {
    let st = strides(shape);
    let nd = extents.len();
    let mut coords: Coords = vec![Affine::zero(nd); shape.len()];
    if flat.c < 0 {
        return None;
    }
    let mut c = flat.c;
    for j in 0..shape.len() {
        coords[j].c = c / st[j];
        c %= st[j];
    }
    for d in 0..nd {
        let a = flat.coef[d];
        if a == 0 || extents[d] <= 1 {
            continue;
        }
        if a < 0 {
            return None;
        }
        let j = (0..shape.len()).find(|&j| a >= st[j] && a < st[j] * shape[j] as i64 && a % st[j] == 0)?;
        coords[j].coef[d] += a / st[j];
    }
    // No carries: every coordinate stays inside its axis over the whole iteration space.
    for j in 0..shape.len() {
        let max: i64 = coords[j].c + coords[j].coef.iter().zip(extents).map(|(k, e)| k * (*e as i64 - 1)).sum::<i64>();
        if max >= shape[j] as i64 || coords[j].c < 0 {
            return None;
        }
    }
    Some(coords)
}

fn flatten(coords: &Coords, shape: &[usize], nd: usize) -> Affine {
    let st = strides(shape);
    let mut a = Affine::zero(nd);
    for (j, c) in coords.iter().enumerate() {
        a.scale_add(c, st[j]);
    }
    a
}

/// The most buffers one fused loop reads.
pub const MAX_LOADS: usize = 16;

/// Why scheduling must retry: a node has to get a buffer.
struct Materialize(NodeId);

struct Builder<'g> {
    g: &'g Graph,
    mat: &'g BTreeSet<NodeId>,
    /// The node the loop computes (materialized, but computed rather than loaded).
    root: Option<NodeId>,
    buf_of: &'g HashMap<NodeId, usize>,
    extents: Vec<usize>,
    body: Vec<Instr>,
    memo: HashMap<(NodeId, Vec<Affine>), Val>,
    nodes: Vec<NodeId>,
}

impl Builder<'_> {
    fn push(&mut self, inst: Inst, dtype: Dtype) -> Val {
        if let Some(i) = self.body.iter().position(|x| x.inst == inst && x.dtype == dtype) {
            return i;
        }
        self.body.push(Instr { inst, dtype });
        self.body.len() - 1
    }

    fn buffer(&self, n: NodeId) -> Option<&usize> {
        let node = self.g.node(n);
        if Some(n) == self.root {
            return None;
        }
        self.buf_of.get(&n).filter(|_| self.mat.contains(&n) || matches!(node.op, Op::Input { .. }))
    }

    /// The value of `n` at `coords`.
    fn value(&mut self, n: NodeId, coords: Coords) -> Result<Val, Materialize> {
        let key = (n, coords.clone());
        if let Some(v) = self.memo.get(&key) {
            return Ok(*v);
        }
        let node = self.g.node(n);
        let nd = self.extents.len();
        let v = if let Some(&buf) = self.buffer(n) {
            let at = flatten(&coords, &node.shape, nd);
            self.push(Inst::Load { buf, at }, node.dtype)
        } else {
            if !self.nodes.contains(&n) {
                self.nodes.push(n);
            }
            let ops = self.g.operands(n);
            match &node.op {
                Op::Const { value } => self.push(Inst::Const(*value), node.dtype),
                Op::Iota { axis } => self.push(Inst::Index(coords[*axis].clone()), node.dtype),
                Op::Unary(u) => {
                    let a = self.value(ops[0], coords)?;
                    self.push(Inst::Un(*u, a), node.dtype)
                }
                Op::Binary(b) => {
                    let float = self.g.node(ops[0]).dtype.is_float();
                    let a = self.value(ops[0], coords.clone())?;
                    let c = self.value(ops[1], coords)?;
                    self.push(Inst::Bin(*b, a, c, float), node.dtype)
                }
                Op::Select => {
                    let c = self.value(ops[0], coords.clone())?;
                    let a = self.value(ops[1], coords.clone())?;
                    let b = self.value(ops[2], coords)?;
                    self.push(Inst::Select(c, a, b), node.dtype)
                }
                Op::Cast => {
                    let a = self.value(ops[0], coords)?;
                    if self.g.node(ops[0]).dtype == node.dtype {
                        a
                    } else {
                        self.push(Inst::Cast(a), node.dtype)
                    }
                }
                Op::Broadcast => {
                    let s = &self.g.node(ops[0]).shape;
                    let off = node.shape.len() - s.len();
                    let c: Coords = (0..s.len())
                        .map(|i| if s[i] == 1 { Affine::zero(nd) } else { coords[off + i].clone() })
                        .collect();
                    self.value(ops[0], c)?
                }
                Op::Transpose { perm } => {
                    let mut c: Coords = vec![Affine::zero(nd); perm.len()];
                    for (i, p) in perm.iter().enumerate() {
                        c[*p] = coords[i].clone();
                    }
                    self.value(ops[0], c)?
                }
                Op::Slice { axis, start } => {
                    let mut c = coords;
                    c[*axis].c += *start as i64;
                    self.value(ops[0], c)?
                }
                Op::Reshape => {
                    let flat = flatten(&coords, &node.shape, nd);
                    let src = self.g.node(ops[0]);
                    if let Some(&buf) = self.buffer(ops[0]) {
                        // A buffer is read by its flat index directly.
                        self.push(Inst::Load { buf, at: flat }, src.dtype)
                    } else {
                        match unflatten(&flat, &self.extents, &src.shape) {
                            Some(c) => self.value(ops[0], c)?,
                            None => return Err(Materialize(ops[0])),
                        }
                    }
                }
                _ => return Err(Materialize(n)),
            }
        };
        self.memo.insert(key, v);
        Ok(v)
    }
}

/// Follows views from `n` down to a materialized node; the strides of `n`'s axes in that
/// buffer, or the node that must be materialized.
fn view_of(
    g: &Graph,
    mat: &BTreeSet<NodeId>,
    buf_of: &HashMap<NodeId, usize>,
    n: NodeId,
) -> Result<(usize, Affine), Materialize> {
    let shape = &g.node(n).shape;
    let nd = shape.len();
    let coords: Coords = (0..nd).map(|d| Affine::var(nd, d)).collect();
    let mut b = Builder {
        g,
        mat,
        root: None,
        buf_of,
        extents: shape.clone(),
        body: vec![],
        memo: HashMap::new(),
        nodes: vec![],
    };
    let v = b.value(n, coords)?;
    match (&b.body[v].inst, b.body.len()) {
        (Inst::Load { buf, at }, 1) => Ok((*buf, at.clone())),
        _ => Err(Materialize(n)),
    }
}

/// Drops unit loop dimensions and merges adjacent ones that every access walks
/// contiguously (`coef[d] == coef[d+1] * extent[d+1]`), within the outer and the reduced dims.
fn coalesce(l: &mut Loop) {
    let red = l.reduce.as_ref().map(|r| r.dims).unwrap_or(0);
    let mut groups: Vec<bool> = (0..l.dims.len()).map(|d| d >= l.dims.len() - red).collect();
    let mut affines: Vec<&mut Affine> = l
        .body
        .iter_mut()
        .filter_map(|i| match &mut i.inst {
            Inst::Load { at, .. } | Inst::Index(at) => Some(at),
            _ => None,
        })
        .chain(l.stores.iter_mut().map(|s| &mut s.at))
        .collect();
    // Unit dims.
    let mut d = 0;
    while d < l.dims.len() {
        if l.dims[d] == 1 && l.dims.len() > 1 {
            l.dims.remove(d);
            groups.remove(d);
            for a in affines.iter_mut() {
                a.coef.remove(d);
            }
        } else {
            d += 1;
        }
    }
    let mut d = 0;
    while d + 1 < l.dims.len() {
        let n = l.dims[d + 1] as i64;
        if groups[d] == groups[d + 1] && affines.iter().all(|a| a.coef[d] == a.coef[d + 1] * n) {
            l.dims[d] *= l.dims[d + 1];
            l.dims.remove(d + 1);
            groups.remove(d + 1);
            for a in affines.iter_mut() {
                a.coef.remove(d);
            }
        } else {
            d += 1;
        }
    }
    if let Some(r) = &mut l.reduce {
        r.dims = groups.iter().filter(|g| **g).count();
    }
}

/// A topological order that runs scalars as early as possible, so that the large
/// elementwise loops that use them end up next to each other and can be merged.
fn order(g: &Graph) -> Vec<NodeId> {
    let topo = g.topo();
    let rank: HashMap<NodeId, usize> = topo.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut indeg: HashMap<NodeId, usize> = HashMap::new();
    for &n in &topo {
        let mut ops = g.operands(n);
        ops.sort();
        ops.dedup();
        indeg.insert(n, ops.len());
    }
    // Scalars first; otherwise creation order (which keeps the blocks of a blocked matmul
    // together, so each block's temporaries die before the next block starts).
    let key = |n: NodeId| ((g.node(n).shape.iter().product::<usize>() > 1) as usize, rank[&n]);
    let mut ready: BTreeSet<((usize, usize), NodeId)> =
        topo.iter().filter(|n| indeg[n] == 0).map(|n| (key(*n), *n)).collect();
    let mut out = vec![];
    while let Some(first) = ready.iter().next().copied() {
        ready.remove(&first);
        let n = first.1;
        out.push(n);
        for u in g.users(n) {
            let d = indeg.get_mut(&u).expect("user in graph");
            *d -= 1;
            if *d == 0 {
                ready.insert((key(u), u));
            }
        }
    }
    out
}

/// Schedules a graph into a program: fusion, kernels, buffers and the arena plan.
pub fn schedule(g: &Graph) -> Result<Program, IrError> {
    schedule_with(g, &ScheduleOptions::default())
}

/// [`schedule`] with options (tests compare the row-fused and the unfused program).
pub fn schedule_with(g: &Graph, opts: &ScheduleOptions) -> Result<Program, IrError> {
    let order = order(g);
    let outputs: BTreeSet<NodeId> = g.outputs.iter().map(|o| o.1).collect();
    let mut mat: BTreeSet<NodeId> = BTreeSet::new();
    let compute = |n: NodeId, mat: &BTreeSet<NodeId>| -> bool {
        // Does inlining `n` do arithmetic (rather than reading through views and casts)?
        // A cast is recomputed by each reader: a widening of a 16-bit block read three
        // times costs three conversions, not an f32 copy of the block and a pass over it.
        let mut stack = vec![n];
        while let Some(x) = stack.pop() {
            let node = g.node(x);
            if x != n && mat.contains(&x) {
                continue;
            }
            match &node.op {
                Op::Const { .. } | Op::Input { .. } | Op::Iota { .. } => {}
                op if is_view(op) || *op == Op::Cast => stack.extend(g.operands(x)),
                _ => return true,
            }
        }
        false
    };
    let fusion = MatMulFusion::find(g, &outputs);
    for &n in &order {
        let node = g.node(n);
        if matches!(node.op, Op::Input { .. }) {
            continue;
        }
        if fusion.epilogue_of.contains_key(&n) {
            // Computed by the matmul kernel of the `add` it feeds.
            continue;
        }
        if let Some((_, acc)) = fusion.epilogue.get(&n) {
            mat.insert(n);
            if !matches!(g.node(*acc).op, Op::Input { .. }) {
                mat.insert(*acc);
            }
            continue;
        }
        if outputs.contains(&n) || !is_fusible(&node.op) {
            mat.insert(n);
        }
        if is_library(node) {
            // Library kernels read contiguous buffers (a reshape of one is the same memory).
            for o in g.operands(n) {
                let mut s = o;
                while g.node(s).op == Op::Reshape {
                    s = g.operands(s)[0];
                }
                if !matches!(g.node(s).op, Op::Input { .. }) {
                    mat.insert(s);
                }
            }
        }
        if node.op == Op::Broadcast {
            let o = g.operands(n)[0];
            let on = g.node(o);
            if on.shape.iter().product::<usize>() < node.shape.iter().product::<usize>() && compute(o, &mat) {
                mat.insert(o);
            }
        }
        if is_fusible(&node.op) && !matches!(node.op, Op::Const { .. } | Op::Iota { .. }) {
            let users = g.users(n);
            if users.len() > 1 && compute(n, &mat) {
                mat.insert(n);
            }
        }
    }
    // A fused loop reads at most MAX_LOADS buffers: a long chain such as the running
    // maximum over column blocks is materialized along the way, so its inputs die early.
    let mut leaves: HashMap<NodeId, BTreeSet<NodeId>> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        let mut set: BTreeSet<NodeId> = BTreeSet::new();
        let ops = g.operands(n);
        if matches!(node.op, Op::Input { .. }) {
            set.insert(n);
        } else if is_fusible(&node.op) {
            let mut parts: Vec<(usize, NodeId)> = vec![];
            for o in &ops {
                let l = if mat.contains(o) || matches!(g.node(*o).op, Op::Input { .. }) {
                    BTreeSet::from([*o])
                } else {
                    leaves[o].clone()
                };
                parts.push((l.len(), *o));
                set.extend(l);
            }
            if set.len() > MAX_LOADS {
                parts.sort();
                let (_, widest) = parts.last().copied().expect("operands");
                mat.insert(widest);
                set = ops
                    .iter()
                    .flat_map(|o| {
                        if mat.contains(o) || matches!(g.node(*o).op, Op::Input { .. }) {
                            BTreeSet::from([*o])
                        } else {
                            leaves[o].clone()
                        }
                    })
                    .collect();
            }
        }
        leaves.insert(n, set);
    }
    loop {
        match try_schedule(g, &order, &mat, &fusion, opts) {
            Ok(p) => return Ok(p),
            Err(Materialize(n)) => {
                if matches!(g.node(n).op, Op::Input { .. }) || !mat.insert(n) {
                    return Err(IrError(format!("scheduling %{} failed", n.index())));
                }
            }
        }
    }
}

/// Matmul epilogues: `acc + A @ B` (the product used only there) is one matmul kernel that
/// accumulates into `acc`; and matmuls used only by a `concat` write their block of it.
struct MatMulFusion {
    /// `add` node → (its matmul operand, its other operand).
    epilogue: HashMap<NodeId, (NodeId, NodeId)>,
    /// matmul → the `add` it is fused into.
    epilogue_of: HashMap<NodeId, NodeId>,
    /// matmul → (the `concat`, element offset, row stride of the concat's buffer).
    into_concat: HashMap<NodeId, (NodeId, i64, i64)>,
}

impl MatMulFusion {
    fn find(g: &Graph, outputs: &BTreeSet<NodeId>) -> MatMulFusion {
        let mut f = MatMulFusion { epilogue: HashMap::new(), epilogue_of: HashMap::new(), into_concat: HashMap::new() };
        let plain = |m: NodeId| {
            let node = g.node(m);
            node.op == Op::MatMul && !is_library(node) && !outputs.contains(&m)
        };
        for n in g.topo() {
            let node = g.node(n);
            let ops = g.operands(n);
            match &node.op {
                Op::Binary(Bin::Add) if node.dtype.is_float() => {
                    // The later operand first: in a running sum `acc + part` of a blocked
                    // product the new block's part accumulates into the sum so far, so each
                    // block's operands die with its block (the other way round, block 0's
                    // gradient waited for block 1's).
                    for (m, acc) in [(ops[1], ops[0]), (ops[0], ops[1])] {
                        if m != acc && plain(m) && g.users(m) == [n] && g.node(m).shape == node.shape {
                            f.epilogue.insert(n, (m, acc));
                            f.epilogue_of.insert(m, n);
                            break;
                        }
                    }
                }
                Op::Concat { axis } if node.shape.len() == 2 => {
                    let ok = ops.iter().all(|m| plain(*m) && g.users(*m) == [n] && g.node(*m).shape.len() == 2);
                    let mut distinct = ops.clone();
                    distinct.sort();
                    distinct.dedup();
                    if ok && distinct.len() == ops.len() {
                        let mut start = 0i64;
                        for m in &ops {
                            let s = &g.node(*m).shape;
                            let (off, stride) = if *axis == 0 {
                                (start * node.shape[1] as i64, node.shape[1] as i64)
                            } else {
                                (start, node.shape[1] as i64)
                            };
                            f.into_concat.insert(*m, (n, off, stride));
                            start += s[*axis] as i64;
                        }
                    }
                }
                _ => {}
            }
        }
        f
    }
}

fn try_schedule(
    g: &Graph,
    order: &[NodeId],
    mat: &BTreeSet<NodeId>,
    fusion: &MatMulFusion,
    opts: &ScheduleOptions,
) -> Result<Program, Materialize> {
    let mut buffers: Vec<BufDecl> = vec![];
    let mut buf_of: HashMap<NodeId, usize> = HashMap::new();
    let decl = |n: NodeId, kind: BufKind| {
        let node = g.node(n);
        BufDecl {
            node: n,
            dtype: node.dtype,
            shape: node.shape.clone(),
            kind,
            origin: node.origin.clone(),
            offset: 0,
            bytes: node.shape.iter().product::<usize>().max(1) * dtype_bytes(node.dtype),
            born: None,
            dies: 0,
            into: None,
            reuses: None,
        }
    };
    let mut inputs = vec![usize::MAX; g.inputs.len()];
    for &n in order {
        if let Op::Input { index, .. } = g.node(n).op {
            buf_of.insert(n, buffers.len());
            if index < inputs.len() {
                inputs[index] = buffers.len();
            }
            buffers.push(decl(n, BufKind::Input(index)));
        }
    }
    for &n in order {
        if let Some((c, _, _)) = fusion.into_concat.get(&n) {
            // A block of a concatenation is written in place.
            let b = *buf_of.entry(*c).or_insert_with(|| {
                buffers.push(decl(*c, BufKind::Temp));
                buffers.len() - 1
            });
            buf_of.insert(n, b);
            continue;
        }
        if mat.contains(&n) && !buf_of.contains_key(&n) {
            // A materialized reshape of a materialized node shares its memory.
            let node = g.node(n);
            if node.op == Op::Reshape {
                let src = g.operands(n)[0];
                if let Some(&b) = buf_of.get(&src) {
                    buf_of.insert(n, b);
                    continue;
                }
            }
            buf_of.insert(n, buffers.len());
            buffers.push(decl(n, BufKind::Temp));
        }
    }
    let mut kernels: Vec<Kernel> = vec![];
    for &n in order {
        if !mat.contains(&n) {
            continue;
        }
        let node = g.node(n);
        let out = buf_of[&n];
        let ops = g.operands(n);
        let epi = fusion.epilogue.get(&n).copied();
        let (mm, ops) = match epi {
            Some((m, _)) => (m, g.operands(m)),
            None => (n, ops),
        };
        let mnode = g.node(mm);
        match &node.op {
            Op::Reshape if buf_of.get(&ops[0]) == Some(&out) => {}
            Op::Concat { .. } if g.operands(n).iter().all(|o| fusion.into_concat.contains_key(o)) => {}
            _ if epi.is_some() || (node.op == Op::MatMul && !is_library(node)) => {
                let node = mnode;
                let r = node.shape.len();
                let view = |o: NodeId| -> Result<View, Materialize> {
                    let (buf, at) = view_of(g, mat, &buf_of, o)?;
                    Ok(View {
                        buf,
                        offset: at.c,
                        batch_strides: at.coef[..r - 2].to_vec(),
                        row_stride: at.coef[r - 2],
                        col_stride: at.coef[r - 1],
                    })
                };
                let a = match view(ops[0]) {
                    Ok(v) => v,
                    Err(_) => return Err(Materialize(ops[0])),
                };
                let b = match view(ops[1]) {
                    Ok(v) => v,
                    Err(_) => return Err(Materialize(ops[1])),
                };
                let sa = &g.node(ops[0]).shape;
                let acc = match epi {
                    Some((_, acc)) => match buf_of.get(&acc) {
                        Some(b) => Some(*b),
                        None => return Err(Materialize(acc)),
                    },
                    None => None,
                };
                let (out_offset, out_row_stride) = match fusion.into_concat.get(&n) {
                    Some((_, off, stride)) => (*off, *stride),
                    None => (0, node.shape[r - 1] as i64),
                };
                kernels.push(Kernel::MatMul {
                    a,
                    b,
                    out,
                    acc,
                    out_offset,
                    out_row_stride,
                    batch: node.shape[..r - 2].to_vec(),
                    m: node.shape[r - 2],
                    k: sa[r - 1],
                    n: node.shape[r - 1],
                    dtype: node.dtype,
                    node: mm,
                });
            }
            Op::Reduce { op, axes } if !is_library(node) => {
                let src = g.node(ops[0]);
                let kept: Vec<usize> = (0..src.shape.len()).filter(|a| !axes.contains(a)).collect();
                let mut extents: Vec<usize> = kept.iter().map(|a| src.shape[*a]).collect();
                extents.extend(axes.iter().map(|a| src.shape[*a]));
                let nd = extents.len();
                let mut coords: Coords = vec![Affine::zero(nd); src.shape.len()];
                for (d, a) in kept.iter().chain(axes.iter()).enumerate() {
                    coords[*a] = Affine::var(nd, d);
                }
                let mut b = Builder {
                    g,
                    mat,
                    root: None,
                    buf_of: &buf_of,
                    extents: extents.clone(),
                    body: vec![],
                    memo: HashMap::new(),
                    nodes: vec![n],
                };
                let value = b.value(ops[0], coords)?;
                let out_coords: Coords = (0..kept.len()).map(|d| Affine::var(nd, d)).collect();
                let at = flatten(&out_coords, &node.shape, nd);
                let mut l = Loop {
                    dims: extents,
                    body: b.body,
                    reduce: Some(Reduction { op: *op, dims: axes.len(), value, dtype: node.dtype }),
                    stores: vec![Store { buf: out, at, val: StoreVal::Acc }],
                    nodes: b.nodes,
                };
                if l.dims.is_empty() {
                    l.dims.push(1);
                }
                coalesce(&mut l);
                kernels.push(Kernel::Loop(l));
            }
            op if is_fusible(op) => {
                let nd = node.shape.len().max(1);
                let extents: Vec<usize> = if node.shape.is_empty() { vec![1] } else { node.shape.clone() };
                let coords: Coords = (0..node.shape.len()).map(|d| Affine::var(nd, d)).collect();
                let mut b = Builder {
                    g,
                    mat,
                    root: Some(n),
                    buf_of: &buf_of,
                    extents: extents.clone(),
                    body: vec![],
                    memo: HashMap::new(),
                    nodes: vec![],
                };
                let v = b.value(n, coords.clone())?;
                let at = flatten(&coords, &node.shape, nd);
                let mut l = Loop {
                    dims: extents,
                    body: b.body,
                    reduce: None,
                    stores: vec![Store { buf: out, at, val: StoreVal::Val(v) }],
                    nodes: b.nodes,
                };
                coalesce(&mut l);
                kernels.push(Kernel::Loop(l));
            }
            _ => {
                let mut args = vec![];
                for o in &ops {
                    let mut s = *o;
                    while !buf_of.contains_key(&s) && g.node(s).op == Op::Reshape {
                        s = g.operands(s)[0];
                    }
                    match buf_of.get(&s) {
                        Some(b) => args.push(*b),
                        None => return Err(Materialize(*o)),
                    }
                }
                kernels.push(Kernel::Library {
                    node: node.clone(),
                    id: n,
                    operands: ops.iter().map(|o| g.node(*o).clone()).collect(),
                    args,
                    out,
                });
            }
        }
    }
    let mut kernels = merge_loops(kernels, &buffers);
    let outputs: Vec<(String, usize, Vec<usize>)> =
        g.outputs.iter().map(|(name, n)| (name.clone(), buf_of[n], g.node(*n).shape.clone())).collect();
    // A value that merging passed in a register and nothing else reads needs no store.
    let mut read: BTreeSet<usize> = kernels.iter().flat_map(|k| k.reads()).collect();
    read.extend(outputs.iter().map(|o| o.1));
    for k in &mut kernels {
        if let Kernel::Loop(l) = k {
            l.stores.retain(|s| read.contains(&s.buf));
        }
    }
    kernels.retain(|k| !matches!(k, Kernel::Loop(l) if l.stores.is_empty()));
    read.clear();
    let input_names = g
        .inputs
        .iter()
        .map(|i| match &g.node(*i).op {
            Op::Input { name, .. } => name.clone(),
            _ => String::new(),
        })
        .collect();
    let mut p = Program {
        name: g.name.clone(),
        buffers,
        inputs,
        input_names,
        outputs,
        kernels,
        arena_bytes: 0,
        peak_bytes: 0,
        peak_at: 0,
        argument_bytes: 0,
        naive_bytes: 0,
        row_groups: vec![],
    };
    if opts.fuse_rows {
        p.row_groups = find_row_groups(&p);
        for grp in &p.row_groups {
            for t in grp.tiles() {
                p.buffers[t].kind = BufKind::Tile;
            }
        }
    }
    p.naive_bytes = order
        .iter()
        .filter(|n| !matches!(g.node(**n).op, Op::Input { .. } | Op::Reshape))
        .map(|n| align(g.node(*n).shape.iter().product::<usize>().max(1) * dtype_bytes(g.node(*n).dtype)))
        .sum();
    plan_arena(&mut p, g);
    Ok(p)
}

/// The row-fused groups of a scheduled program ([`RowGroup`]): a matmul with a contiguous
/// `[m, n]` f32/f16/bf16 product (`n` at most [`TILE_MAX_COLS`]) that no output is, followed
/// by the longest run of loops over `[m]` or `[m, n]` (elementwise, or reducing the `n` axis
/// by sum, product, max or min) in which every buffer the run writes, and the product, is
/// read and written only at the current row (a per-row value at `i0`, an `[m, n]` value at
/// `n·i0 + i1`) and the matmul's operands are not written, then by the matmuls right after
/// it that are row-local ([`trailing_matmul`]). The group must hold every reader of the
/// product. An `[m, n]` buffer the loops write that nothing outside the group reads becomes a
/// strip too (while a 16-row strip of every tile fits [`TILE_GROUP_BYTES`]). In the blocked
/// linear cross-entropy each block's statistics pass (row maximum, rescaled sum, target
/// logit) and gradient pass (softmax minus one-hot, times the classifier block into the
/// hidden state's gradient) become one group each: no block of logits is stored.
pub fn find_row_groups(p: &Program) -> Vec<RowGroup> {
    let mut readers: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, k) in p.kernels.iter().enumerate() {
        for b in k.reads() {
            readers.entry(b).or_default().push(i);
        }
    }
    let outputs: BTreeSet<usize> = p.outputs.iter().map(|o| o.1).collect();
    let mut groups = vec![];
    let mut i = 0;
    while i < p.kernels.len() {
        let Kernel::MatMul { a, b, out, acc: None, out_offset: 0, out_row_stride, batch, m, n, dtype, .. } =
            &p.kernels[i]
        else {
            i += 1;
            continue;
        };
        let (m, n, z) = (*m, *n, *out);
        let fits = batch.is_empty()
            && *out_row_stride == n as i64
            && n <= TILE_MAX_COLS
            && matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
            && p.buffers[z].kind == BufKind::Temp
            && !outputs.contains(&z)
            && a.buf != z
            && b.buf != z;
        if !fits {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < p.kernels.len() && row_local(p, i, end + 1, m, n) {
            end += 1;
        }
        let zr = readers.get(&z).cloned().unwrap_or_default();
        if !(end > i + 1 && !zr.is_empty() && zr.iter().all(|r| (i + 1..end).contains(r))) {
            i += 1;
            continue;
        }
        // The `[m, n]` values the loops write, and what the trailing matmuls write.
        let row_values: BTreeSet<usize> = std::iter::once(z)
            .chain(p.kernels[i + 1..end].iter().flat_map(|k| k.writes()))
            .filter(|b| p.buffers[*b].numel() == m * n)
            .collect();
        let mut tail = end;
        let mut tail_outs: BTreeSet<usize> = BTreeSet::new();
        let budget = |bufs: &mut dyn Iterator<Item = usize>| {
            TILE_MIN_ROWS * n * bufs.map(|b| dtype_bytes(p.buffers[b].dtype)).sum::<usize>() <= TILE_GROUP_BYTES
        };
        if budget(&mut std::iter::once(z)) {
            while tail < p.kernels.len() && trailing_matmul(p, i, tail, m, n, &row_values, &tail_outs) {
                tail_outs.extend(p.kernels[tail].writes());
                tail += 1;
            }
        }
        // Loops after the product's last reader gain nothing from the group, unless a
        // trailing matmul reads what they write.
        let stop = if tail > end { tail } else { zr.iter().max().expect("a reader") + 1 };
        let mut strips: Vec<usize> = vec![];
        for &s in row_values.iter().filter(|b| **b != z) {
            let d = &p.buffers[s];
            let inside = readers.get(&s).map(|r| r.iter().all(|k| (i + 1..stop).contains(k))).unwrap_or(true);
            let owned = d.kind == BufKind::Temp && d.into.is_none() && !outputs.contains(&s);
            // Written only by elementwise loops over `[m, n]` (at its element).
            let written_here = p.kernels[i + 1..stop].iter().any(|k| k.writes().contains(&s))
                && p.kernels[i + 1..stop].iter().all(|k| match k {
                    Kernel::Loop(l) => {
                        l.stores.iter().all(|st| st.buf != s || (l.reduce.is_none() && l.dims.len() == 2))
                    }
                    _ => !k.writes().contains(&s),
                });
            if inside
                && owned
                && written_here
                && budget(&mut std::iter::once(z).chain(strips.iter().copied()).chain([s]))
            {
                strips.push(s);
            }
        }
        groups.push(RowGroup { start: i, end: stop, tile: z, strips });
        i = stop;
    }
    groups
}

/// Kernel `j` can end the row-fused group of the matmul `start` (product `[m, n]`): a matmul
/// `out = acc + x @ w` with `x` one of the group's `[m, n]` values (`row_values`, contiguous,
/// row by row: `k = n`), `w` and `acc` from outside the group (not written by it), and `out`
/// a new contiguous `[m, d]` buffer that no kernel of the group reads. Its rows are then
/// computed strip by strip with the group's rows.
fn trailing_matmul(
    p: &Program,
    start: usize,
    j: usize,
    m: usize,
    n: usize,
    row_values: &BTreeSet<usize>,
    tail_outs: &BTreeSet<usize>,
) -> bool {
    let Kernel::MatMul { a, b, out, acc, out_offset: 0, out_row_stride, batch, m: mj, k, n: d, dtype, .. } =
        &p.kernels[j]
    else {
        return false;
    };
    let written: BTreeSet<usize> =
        p.kernels[start..j].iter().flat_map(|k| k.writes()).chain(tail_outs.iter().copied()).collect();
    let read_before = p.kernels[start..j].iter().any(|k| k.reads().contains(out));
    batch.is_empty()
        && *mj == m
        && *k == n
        && *out_row_stride == *d as i64
        && matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
        && row_values.contains(&a.buf)
        && !tail_outs.contains(&a.buf)
        && a.offset == 0
        && a.row_stride == n as i64
        && a.col_stride == 1
        && p.buffers[a.buf].dtype == *dtype
        && !written.contains(&b.buf)
        && acc.map(|c| !written.contains(&c) && c != b.buf && c != a.buf).unwrap_or(true)
        && !written.contains(out)
        && !read_before
        && *out != a.buf
        && *out != b.buf
        && p.buffers[*out].kind == BufKind::Temp
}

/// Kernels `start..end` (a matmul into a product `[m, n]`, then loops) meet the conditions of
/// [`find_row_groups`].
fn row_local(p: &Program, start: usize, end: usize, m: usize, n: usize) -> bool {
    let Kernel::MatMul { a, b, out, .. } = &p.kernels[start] else { return false };
    let mut written: BTreeSet<usize> = BTreeSet::from([*out]);
    let mut loops = vec![];
    for k in &p.kernels[start + 1..end] {
        let Kernel::Loop(l) = k else { return false };
        let shaped = match (&l.reduce, l.dims.as_slice()) {
            (None, [x]) => *x == m,
            (None, [x, y]) => *x == m && *y == n,
            (Some(r), [x, y]) => {
                *x == m && *y == n && r.dims == 1 && matches!(r.op, Red::Sum | Red::Prod | Red::Max | Red::Min)
            }
            _ => false,
        };
        if !shaped {
            return false;
        }
        written.extend(l.stores.iter().map(|s| s.buf));
        loops.push(l);
    }
    if written.contains(&a.buf) || written.contains(&b.buf) {
        return false;
    }
    // `at` is the current row's element of buffer `buf` (`[m]`-sized: `i0`; `[m, n]`:
    // `n·i0 + i1`); a reduction stores its row's result, an elementwise loop its element.
    let at_row = |l: &Loop, buf: usize, at: &Affine, store: bool| -> bool {
        let numel = p.buffers[buf].numel();
        let per_row = numel == m && at.coef.first() == Some(&1) && at.coef[1..].iter().all(|c| *c == 0);
        let element = numel == m * n && l.dims.len() == 2 && at.coef == [n as i64, 1];
        at.c == 0
            && match (store, l.reduce.is_some(), l.dims.len()) {
                (true, true, _) | (_, _, 1) => per_row,
                (true, false, _) => element,
                (false, _, _) => per_row || element,
            }
    };
    loops.iter().all(|l| {
        l.body.iter().all(|ins| match &ins.inst {
            Inst::Load { buf, at } => !written.contains(buf) || at_row(l, *buf, at, false),
            _ => true,
        }) && l.stores.iter().all(|s| at_row(l, s.buf, &s.at, true) && (s.val == StoreVal::Acc) == l.reduce.is_some())
    })
}

impl Kernel {
    /// Buffers the kernel reads.
    pub fn reads(&self) -> Vec<usize> {
        let mut v = match self {
            Kernel::Loop(l) => l
                .body
                .iter()
                .filter_map(|i| match &i.inst {
                    Inst::Load { buf, .. } => Some(*buf),
                    _ => None,
                })
                .collect(),
            Kernel::MatMul { a, b, acc, .. } => [a.buf, b.buf].into_iter().chain(*acc).collect(),
            Kernel::Library { args, .. } => args.clone(),
        };
        v.sort();
        v.dedup();
        v
    }
    /// Buffers the kernel writes.
    pub fn writes(&self) -> Vec<usize> {
        match self {
            Kernel::Loop(l) => l.stores.iter().map(|s| s.buf).collect(),
            Kernel::MatMul { out, .. } | Kernel::Library { out, .. } => vec![*out],
        }
    }
}

/// Merges elementwise loops over the same iteration space (see the module doc).
fn merge_loops(kernels: Vec<Kernel>, buffers: &[BufDecl]) -> Vec<Kernel> {
    let mut out: Vec<Kernel> = vec![];
    let mut written_at: HashMap<usize, usize> = HashMap::new();
    for k in kernels {
        let target = match &k {
            Kernel::Loop(l) if l.reduce.is_none() => {
                let reads = k.reads();
                // Latest kernel that produced something this one reads.
                let after = reads.iter().filter_map(|b| written_at.get(b)).max().copied();
                let mut found = None;
                for (i, cand) in out.iter().enumerate().rev() {
                    if after.map(|a| i < a).unwrap_or(false) {
                        break;
                    }
                    if let Kernel::Loop(c) = cand {
                        if c.reduce.is_none() && c.dims == l.dims && compatible(c, l, buffers) {
                            found = Some(i);
                            break;
                        }
                    }
                }
                found
            }
            _ => None,
        };
        match (target, k) {
            (Some(i), Kernel::Loop(l)) => {
                let Kernel::Loop(c) = &mut out[i] else { unreachable!() };
                append(c, l);
                for b in out[i].writes() {
                    written_at.insert(b, i);
                }
            }
            (_, k) => {
                out.push(k);
                let i = out.len() - 1;
                for b in out[i].writes() {
                    written_at.insert(b, i);
                }
            }
        }
    }
    out
}

/// `l` may join `c` when every buffer `c` stores that `l` loads is read at the element
/// being stored (passed in a register).
fn compatible(c: &Loop, l: &Loop, _buffers: &[BufDecl]) -> bool {
    l.body.iter().all(|i| match &i.inst {
        Inst::Load { buf, at } => c.stores.iter().filter(|s| s.buf == *buf).all(|s| s.at == *at),
        _ => true,
    })
}

fn append(c: &mut Loop, l: Loop) {
    let mut map: Vec<Val> = vec![];
    for i in l.body {
        let inst = match i.inst {
            Inst::Load { buf, at } => {
                if let Some(s) = c.stores.iter().find(|s| s.buf == buf && s.at == at) {
                    if let StoreVal::Val(v) = s.val {
                        map.push(v);
                        continue;
                    }
                }
                Inst::Load { buf, at }
            }
            Inst::Un(u, a) => Inst::Un(u, map[a]),
            Inst::Bin(b, x, y, f) => Inst::Bin(b, map[x], map[y], f),
            Inst::Select(a, b, d) => Inst::Select(map[a], map[b], map[d]),
            Inst::Cast(a) => Inst::Cast(map[a]),
            other => other,
        };
        let v = match c.body.iter().position(|x| x.inst == inst && x.dtype == i.dtype) {
            Some(p) => p,
            None => {
                c.body.push(Instr { inst, dtype: i.dtype });
                c.body.len() - 1
            }
        };
        map.push(v);
    }
    for s in l.stores {
        let val = match s.val {
            StoreVal::Val(v) => StoreVal::Val(map[v]),
            StoreVal::Acc => StoreVal::Acc,
        };
        c.stores.push(Store { buf: s.buf, at: s.at, val });
    }
    c.nodes.extend(l.nodes);
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Liveness over kernels, in-place reuse, writes into arguments, first-fit arena offsets.
fn plan_arena(p: &mut Program, g: &Graph) {
    let nk = p.kernels.len();
    let out_bufs: BTreeSet<usize> = p.outputs.iter().map(|o| o.1).collect();
    // The steps of the plan: a row-fused group is one step (its kernels run interleaved,
    // strip by strip), so what it writes is born at its start and what it reads dies at its end.
    let mut span: Vec<(usize, usize)> = (0..nk).map(|i| (i, i)).collect();
    for grp in &p.row_groups {
        for s in &mut span[grp.start..grp.end] {
            *s = (grp.start, grp.end - 1);
        }
    }
    for (i, k) in p.kernels.iter().enumerate() {
        for b in k.writes() {
            p.buffers[b].born.get_or_insert(span[i].0);
        }
        for b in k.reads() {
            p.buffers[b].dies = p.buffers[b].dies.max(span[i].1);
        }
    }
    for b in &mut p.buffers {
        if let Some(born) = b.born {
            b.dies = b.dies.max(born);
        }
    }
    for &b in &out_bufs {
        p.buffers[b].dies = nk;
    }
    p.argument_bytes = p.buffers.iter().filter(|b| matches!(b.kind, BufKind::Input(_))).map(|b| b.bytes).sum();
    // Outputs named like an argument update it in its memory when the argument is not read
    // after (an elementwise loop may read it at the element it writes).
    for (name, b, _) in p.outputs.clone() {
        let Some(arg) = g.inputs.iter().position(|i| matches!(&g.node(*i).op, Op::Input { name: n, .. } if *n == name))
        else {
            continue;
        };
        let ab = p.inputs[arg];
        let (a, o) = (&p.buffers[ab], &p.buffers[b]);
        if o.kind != BufKind::Temp || a.bytes != o.bytes || a.dtype != o.dtype || o.into.is_some() {
            continue;
        }
        if p.buffers.iter().any(|x| x.into == Some(ab)) {
            continue;
        }
        let Some(born) = o.born else { continue };
        let last_read = a.dies;
        let same_element = match &p.kernels[born] {
            Kernel::Loop(l) if l.reduce.is_none() => {
                let st = l.stores.iter().find(|s| s.buf == b).map(|s| s.at.clone());
                l.body.iter().all(|i| match &i.inst {
                    Inst::Load { buf, at } if *buf == ab => Some(at) == st.as_ref(),
                    _ => true,
                })
            }
            _ => false,
        };
        let read_in_born = p.kernels[born].reads().contains(&ab);
        if last_read < born || (last_read == born && (!read_in_born || same_element)) {
            p.buffers[b].into = Some(ab);
        }
    }
    // The arena buffers by the kernel after which they are dead (in index order).
    let mut dying: Vec<Vec<usize>> = vec![vec![]; nk + 1];
    for (bi, d) in p.buffers.iter().enumerate() {
        if d.kind == BufKind::Temp && d.into.is_none() && d.born.is_some() && d.dies <= nk {
            dying[d.dies].push(bi);
        }
    }
    let mut free: Vec<(usize, usize)> = vec![];
    let mut arena = 0usize;
    let mut donated: BTreeSet<usize> = BTreeSet::new();
    for i in 0..nk {
        let grouped = span[i] != (i, i);
        let writes: Vec<usize> = if span[i].0 != i {
            vec![]
        } else {
            let mut w: Vec<usize> = (i..=span[i].1).flat_map(|j| p.kernels[j].writes()).collect();
            w.sort();
            w.dedup();
            w
        };
        for b in writes {
            let d = &p.buffers[b];
            if d.kind != BufKind::Temp || d.born != Some(i) || d.into.is_some() {
                continue;
            }
            let bytes = align(d.bytes);
            // In place: a buffer that dies here, read only at the element being written
            // (an elementwise loop) or as the addend of an accumulating matmul. In a
            // row-fused group, whose steps interleave, only a trailing matmul's addend that
            // no other kernel of the group reads (each strip reads its rows of the addend,
            // then writes the same rows of the sum).
            let writer = if grouped {
                (i..=span[i].1).find(|&j| {
                    matches!(&p.kernels[j], Kernel::MatMul { out, acc: Some(c), .. }
                        if *out == b && (i..=span[i].1).all(|o| o == j || !p.kernels[o].reads().contains(c)))
                })
            } else {
                Some(i)
            };
            let candidates = writer.map(|j| p.kernels[j].reads()).unwrap_or_default();
            let wk = writer.unwrap_or(i);
            let donor = candidates.into_iter().find(|&r| {
                let x = &p.buffers[r];
                x.kind == BufKind::Temp
                    && x.into.is_none()
                    && x.born.map(|bb| bb < i).unwrap_or(false)
                    && x.dies == span[i].1
                    && dtype_bytes(x.dtype) == dtype_bytes(d.dtype)
                    && x.numel() == d.numel()
                    && !out_bufs.contains(&r)
                    && !donated.contains(&r)
                    && match &p.kernels[wk] {
                        Kernel::Loop(l) if l.reduce.is_none() => {
                            let st = l.stores.iter().find(|s| s.buf == b).map(|s| &s.at);
                            l.body.iter().all(|ins| match &ins.inst {
                                Inst::Load { buf, at } if *buf == r => Some(at) == st,
                                _ => true,
                            })
                        }
                        Kernel::MatMul { acc, out, out_offset, out_row_stride, n, a, b: bv, .. } => {
                            *acc == Some(r)
                                && *out == b
                                && *out_offset == 0
                                && *out_row_stride == *n as i64
                                && a.buf != r
                                && bv.buf != r
                        }
                        _ => false,
                    }
            });
            if let Some(r) = donor {
                donated.insert(r);
                p.buffers[b].offset = p.buffers[r].offset;
                p.buffers[b].reuses = Some(r);
                continue;
            }
            let off = match free.iter().position(|(_, s)| *s >= bytes) {
                Some(k) => {
                    let (o, s) = free[k];
                    if s == bytes {
                        free.remove(k);
                    } else {
                        free[k] = (o + bytes, s - bytes);
                    }
                    o
                }
                None => {
                    arena += bytes;
                    arena - bytes
                }
            };
            p.buffers[b].offset = off;
        }
        // Buffers whose last reader is this kernel are free for the next one (unless a
        // buffer written here took their slice over).
        for &bi in &dying[i] {
            let d = &p.buffers[bi];
            if !donated.contains(&bi) {
                free.push((d.offset, align(d.bytes)));
            }
        }
        free.sort();
        let mut merged: Vec<(usize, usize)> = vec![];
        for (o, s) in free.drain(..) {
            match merged.last_mut() {
                Some((mo, ms)) if *mo + *ms == o => *ms += s,
                _ => merged.push((o, s)),
            }
        }
        free = merged;
    }
    p.arena_bytes = arena;
    // A second placement, offline and greedy by size (largest first, each at the lowest
    // offset free for its whole lifetime); kept when it needs a smaller arena than first-fit
    // in kernel order, which fragments when a large buffer is born while small ones are live.
    if let Some((offsets, size)) = place_by_size(p) {
        if size < p.arena_bytes {
            for (b, off) in offsets {
                p.buffers[b].offset = off;
            }
            p.arena_bytes = size;
        }
    }
    // Bytes live in each kernel (`live_at`), less the slices handed over in place there: a
    // sweep over births and deaths.
    let mut delta = vec![0i64; nk + 2];
    for d in &p.buffers {
        if let (BufKind::Temp, None, Some(born)) = (&d.kind, d.into, d.born) {
            if born <= d.dies {
                delta[born] += align(d.bytes) as i64;
                delta[d.dies.min(nk) + 1] -= align(d.bytes) as i64;
            }
        }
        // (The donor dies where its taker is born, or, the addend of a row-fused group's
        // trailing matmul, at the group's end.)
        if let (Some(born), Some(r)) = (d.born, d.reuses) {
            delta[born] -= align(p.buffers[r].bytes) as i64;
            delta[p.buffers[r].dies.clamp(born, nk) + 1] += align(p.buffers[r].bytes) as i64;
        }
    }
    let mut running = 0i64;
    for (i, step) in delta.iter().enumerate().take(nk) {
        running += step;
        let live = running as usize;
        if live > p.peak_bytes {
            p.peak_bytes = live;
            p.peak_at = i;
        }
    }
}

/// Arena offsets by the greedy-by-size heuristic: every arena buffer with the buffers that
/// reuse its slice in place (one slice, live from the first's birth to the last's death),
/// largest first (ties: earlier birth, lower index), each at the lowest offset that no
/// placed slice live at an overlapping time occupies. Returns every buffer's offset and the
/// arena size, or `None` when there is nothing to place.
fn place_by_size(p: &Program) -> Option<(Vec<(usize, usize)>, usize)> {
    let in_arena = |d: &BufDecl| d.kind == BufKind::Temp && d.into.is_none() && d.born.is_some();
    let root = |mut b: usize| {
        while let Some(r) = p.buffers[b].reuses {
            b = r;
        }
        b
    };
    // Slices: root -> (members, first birth, last death, bytes).
    let mut slices: std::collections::BTreeMap<usize, (Vec<usize>, usize, usize, usize)> = Default::default();
    for (b, d) in p.buffers.iter().enumerate() {
        if !in_arena(d) {
            continue;
        }
        let r = root(b);
        let born = d.born.expect("in the arena");
        let e = slices.entry(r).or_insert((vec![], born, d.dies, align(p.buffers[r].bytes)));
        e.0.push(b);
        e.1 = e.1.min(born);
        e.2 = e.2.max(d.dies);
        e.3 = e.3.max(align(d.bytes));
    }
    if slices.is_empty() {
        return None;
    }
    let mut order: Vec<(usize, (Vec<usize>, usize, usize, usize))> = slices.into_iter().collect();
    order.sort_by(|a, b| b.1 .3.cmp(&a.1 .3).then(a.1 .1.cmp(&b.1 .1)).then(a.0.cmp(&b.0)));
    // Placed: (first birth, last death, offset, bytes).
    let mut placed: Vec<(usize, usize, usize, usize)> = vec![];
    let mut offsets = vec![];
    let mut arena = 0;
    for (_, (members, born, dies, bytes)) in order {
        let mut busy: Vec<(usize, usize)> =
            placed.iter().filter(|q| q.0 <= dies && born <= q.1).map(|q| (q.2, q.3)).collect();
        busy.sort();
        let mut off = 0;
        for (o, sz) in busy {
            if off + bytes <= o {
                break;
            }
            off = off.max(o + sz);
        }
        placed.push((born, dies, off, bytes));
        arena = arena.max(off + bytes);
        offsets.extend(members.into_iter().map(|m| (m, off)));
    }
    Some((offsets, arena))
}

/// The memory a job of several programs that never run at once needs (a training run's
/// `init`, `grad`, `eval`, `update`…), when they share one arena and keep their named tensors
/// between runs: `(arena, state)`, the largest arena and the bytes of every distinct argument
/// and output name (parameters, optimizer states, gradients, the batch, the loss).
pub fn job_bytes(programs: &[&Program]) -> (usize, usize) {
    let mut named: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for p in programs {
        for (name, b) in p.input_names.iter().zip(&p.inputs) {
            named.insert(name, p.buffers[*b].bytes);
        }
        for (name, b, shape) in &p.outputs {
            let bytes = shape.iter().product::<usize>() * crate::plan::dtype_bytes(p.buffers[*b].dtype);
            named.entry(name).or_insert(bytes);
        }
    }
    let arena = programs.iter().map(|p| p.arena_bytes).max().unwrap_or(0);
    (arena, named.values().sum())
}

/// Buffers of one type from one recipe line live at a program's peak ([`Program::peak_groups`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PeakGroup {
    /// Their bytes together (each aligned as the arena places it).
    pub bytes: usize,
    pub count: usize,
    /// `f32[2048, 512]`.
    pub ty: String,
    /// The recipe line that created them.
    pub origin: String,
}

impl Program {
    /// The recipe line (or pass) kernel `k` computes a value of: where its first output came
    /// from.
    pub fn kernel_origin(&self, k: usize) -> &str {
        let out = match &self.kernels[k] {
            Kernel::Loop(l) => l.stores[0].buf,
            Kernel::MatMul { out, .. } | Kernel::Library { out, .. } => *out,
        };
        &self.buffers[out].origin
    }

    /// Checks the arena plan: no two temps live in the same kernel overlap in memory.
    pub fn verify(&self) -> Result<(), String> {
        let temps: Vec<(usize, &BufDecl)> = self
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, d)| d.kind == BufKind::Temp && d.into.is_none() && d.born.is_some())
            .collect();
        for (x, (i, a)) in temps.iter().enumerate() {
            if a.offset % ALIGN != 0 || a.offset + a.bytes > self.arena_bytes {
                return Err(format!("buffer b{i} is misaligned or outside the arena"));
            }
            for (j, b) in &temps[x + 1..] {
                let (ab, bb) = (a.born.unwrap(), b.born.unwrap());
                let time = ab <= b.dies && bb <= a.dies;
                let mem = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
                let handoff = a.reuses == Some(*j) || b.reuses == Some(*i);
                if time && mem && !handoff {
                    return Err(format!("buffers b{i} and b{j} are live together and overlap"));
                }
            }
        }
        Ok(())
    }

    /// The report of `recipec build --emit plan`: what the runtime allocates for this entry
    /// point, the buffers live at the peak (largest first) with the recipe line that
    /// created each, and what a naive execution (one buffer per graph node) would need.
    pub fn report(&self) -> String {
        use crate::plan::human;
        let mut out = format!("plan {}\n", self.name);
        out.push_str(&format!("  arguments      {:>12}  (owned by the caller)\n", human(self.argument_bytes)));
        out.push_str(&format!("  arena          {:>12}  ({} kernels)\n", human(self.arena_bytes), self.kernels.len()));
        out.push_str(&format!("  peak live      {:>12}  at kernel k{}\n", human(self.peak_bytes), self.peak_at));
        out.push_str(&format!(
            "  naive          {:>12}  (one buffer per graph node, no reuse)\n",
            human(self.naive_bytes)
        ));
        if let Some(big) = self.row_groups.iter().map(|g| &self.buffers[g.tile]).max_by_key(|b| b.bytes) {
            let strips: usize = self.row_groups.iter().map(|g| g.strips.len()).sum();
            let also = if strips > 0 { format!(" and {strips} values they feed to a matmul") } else { String::new() };
            out.push_str(&format!(
                "  never stored   {:>12}  ({} row-fused matmul products such as {}{:?} at {}{also}, computed strip by strip of rows inside their consumers)\n",
                human(self.row_groups.iter().flat_map(|g| g.tiles()).map(|t| self.buffers[t].bytes).sum::<usize>()),
                self.row_groups.len(),
                big.dtype,
                big.shape,
                big.origin
            ));
        }
        let mut updated: Vec<String> =
            self.buffers.iter().filter_map(|b| b.into).map(|a| self.buffers[a].origin.clone()).collect();
        updated.sort();
        updated.dedup();
        if !updated.is_empty() {
            out.push_str(&format!("  updated in place: {}\n", updated.join(", ")));
        }
        out.push_str("  live at the peak, largest first:\n");
        let groups = self.peak_groups();
        for g in groups.iter().take(12) {
            let n = if g.count > 1 { format!("{} × ", g.count) } else { String::new() };
            out.push_str(&format!("    {:>10}  {:<24} {}\n", human(g.bytes), format!("{n}{}", g.ty), g.origin));
        }
        if groups.len() > 12 {
            let rest: usize = groups[12..].iter().map(|g| g.bytes).sum();
            let count: usize = groups[12..].iter().map(|g| g.count).sum();
            out.push_str(&format!("    … and {count} smaller buffers ({})\n", human(rest)));
        }
        out
    }

    /// The arena buffers live at the peak, largest first, buffers of one type from one recipe
    /// line as one group (so a value that piles up — one per block, one per step — shows with
    /// its total); ties in creation order.
    pub fn peak_groups(&self) -> Vec<PeakGroup> {
        let mut groups: Vec<(PeakGroup, Option<usize>)> = vec![];
        for b in self.live_at(self.peak_at) {
            let ty = format!("{}{:?}", b.dtype, b.shape);
            match groups.iter_mut().find(|(g, _)| g.ty == ty && g.origin == b.origin) {
                Some((g, _)) => {
                    g.count += 1;
                    g.bytes += align(b.bytes);
                }
                None => {
                    groups.push((PeakGroup { bytes: align(b.bytes), count: 1, ty, origin: b.origin.clone() }, b.born))
                }
            }
        }
        groups.sort_by(|a, b| b.0.bytes.cmp(&a.0.bytes).then(a.1.cmp(&b.1)));
        groups.into_iter().map(|(g, _)| g).collect()
    }

    /// For each kernel, the index in `row_groups` of the group it starts, if any.
    pub fn group_starts(&self) -> Vec<Option<usize>> {
        let mut v = vec![None; self.kernels.len()];
        for (gi, g) in self.row_groups.iter().enumerate() {
            v[g.start] = Some(gi);
        }
        v
    }

    /// The arena buffers live while kernel `k` runs.
    pub fn live_at(&self, k: usize) -> Vec<&BufDecl> {
        self.buffers
            .iter()
            .filter(|d| {
                d.kind == BufKind::Temp && d.into.is_none() && d.born.map(|b| b <= k).unwrap_or(false) && k <= d.dies
            })
            .collect()
    }

    /// The text form of `recipec build --emit kernels`.
    pub fn text(&self) -> String {
        let mut s = format!(
            "program {} (arena {} B, peak {} B at k{})\n",
            self.name, self.arena_bytes, self.peak_bytes, self.peak_at
        );
        for (i, b) in self.buffers.iter().enumerate() {
            if b.kind == BufKind::Temp && b.born.is_none() {
                // Fused away after merging: never written.
                continue;
            }
            let kind = match (&b.kind, b.into) {
                (BufKind::Input(a), _) => format!("arg {a}"),
                (BufKind::Temp, Some(a)) => format!("into b{a}"),
                (BufKind::Temp, None) => match b.reuses {
                    Some(r) => format!("arena +{} (in place of b{r})", b.offset),
                    None => format!("arena +{}", b.offset),
                },
                (BufKind::Tile, _) => "tile (row strips on chip, never stored)".into(),
            };
            let _ = writeln!(s, "  b{i}: {}{:?} {kind}  ; %{} {}", b.dtype, b.shape, b.node.index(), b.origin);
        }
        let group_at = self.group_starts();
        for (i, k) in self.kernels.iter().enumerate() {
            if let Some(grp) = group_at[i].map(|g| &self.row_groups[g]) {
                let tiles: Vec<String> = grp.tiles().map(|t| format!("b{t}")).collect();
                let _ = writeln!(
                    s,
                    "  row-fused k{}..k{}: strip by strip of rows, {} never stored",
                    grp.start,
                    grp.end - 1,
                    tiles.join(", ")
                );
            }
            match k {
                Kernel::Loop(l) => {
                    let red = l
                        .reduce
                        .as_ref()
                        .map(|r| format!(" reduce_{:?}({} dims) of v{}", r.op, r.dims, r.value).to_lowercase())
                        .unwrap_or_default();
                    let _ = writeln!(s, "  k{i}: loop {:?}{red}", l.dims);
                    for (v, ins) in l.body.iter().enumerate() {
                        let _ = writeln!(s, "    v{v}: {} = {}", ins.dtype, inst_text(&ins.inst));
                    }
                    for st in &l.stores {
                        let val = match st.val {
                            StoreVal::Val(v) => format!("v{v}"),
                            StoreVal::Acc => "acc".into(),
                        };
                        let _ = writeln!(s, "    store b{}[{}] = {val}", st.buf, aff(&st.at));
                    }
                }
                Kernel::MatMul { a, b, out, acc, out_offset, out_row_stride, batch, m, k, n, dtype, .. } => {
                    let acc = acc.map(|a| format!("b{a} + ")).unwrap_or_default();
                    let at = if *out_offset != 0 || *out_row_stride != *n as i64 {
                        format!("(+{out_offset}, rows {out_row_stride})")
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        s,
                        "  k{i}: matmul {dtype} batch {batch:?} m={m} k={k} n={n}: b{out}{at} = {acc}b{}(+{}, {:?}, {}, {}) @ b{}(+{}, {:?}, {}, {})",
                        a.buf, a.offset, a.batch_strides, a.row_stride, a.col_stride, b.buf, b.offset, b.batch_strides, b.row_stride, b.col_stride
                    );
                }
                Kernel::Library { node, args, out, .. } => {
                    let a: Vec<String> = args.iter().map(|a| format!("b{a}")).collect();
                    let _ = writeln!(s, "  k{i}: library {}: b{out} = ({})", node.op.name(), a.join(", "));
                }
            }
        }
        s
    }
}

fn aff(a: &Affine) -> String {
    let mut t: Vec<String> = a
        .coef
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 0)
        .map(|(d, c)| if *c == 1 { format!("i{d}") } else { format!("{c}*i{d}") })
        .collect();
    if a.c != 0 || t.is_empty() {
        t.push(a.c.to_string());
    }
    t.join(" + ")
}

fn inst_text(i: &Inst) -> String {
    match i {
        Inst::Load { buf, at } => format!("load b{buf}[{}]", aff(at)),
        Inst::Const(c) => format!("const {c:?}"),
        Inst::Index(a) => format!("index {}", aff(a)),
        Inst::Un(u, a) => format!("{u:?} v{a}").to_lowercase(),
        Inst::Bin(b, x, y, _) => format!("{b:?} v{x}, v{y}").to_lowercase(),
        Inst::Select(c, a, b) => format!("select v{c}, v{a}, v{b}"),
        Inst::Cast(a) => format!("cast v{a}"),
    }
}
