//! The graph IR: a small closed set of ops over tensors with concrete shapes, stored in a
//! petgraph `StableGraph`, with typed ids, a verifier and a stable text form that parses back.
//!
//! Every op's operands have the shapes the op needs exactly: lowering inserts explicit
//! `broadcast` and `cast` nodes, so the interpreter, autodiff and code generators never
//! re-derive NumPy rules.

use lang::types::Dtype;
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::fmt;

/// A node of a [`Graph`]. Raw petgraph indices never leave this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) NodeIndex);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0.index() as u32)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(NodeId(NodeIndex::new(u32::deserialize(d)? as usize)))
    }
}

/// f64 values (constants may be ±inf or NaN, which JSON numbers cannot hold) as the text
/// the graph's text form uses.
pub mod f64_serde {
    pub fn serialize<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_f64(*v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let t = <String as serde::Deserialize>::deserialize(d)?;
        match t.as_str() {
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            "nan" => Ok(f64::NAN),
            _ => t.parse().map_err(|_| serde::de::Error::custom(format!("bad number `{t}`"))),
        }
    }
}

/// `Dtype` (from `lang`) as its name in serialized forms.
pub mod dtype_serde {
    use lang::types::Dtype;
    pub fn serialize<S: serde::Serializer>(d: &Dtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(d)?;
        Dtype::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown dtype `{name}`")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Un {
    Neg,
    Not,
    Exp,
    Log,
    Log1p,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Softplus,
    Gelu,
    GeluTanh,
    Silu,
    Erf,
    Cos,
    Sin,
    Abs,
    Sign,
    Relu,
    Floor,
    Ceil,
    Round,
    StopGradient,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Bin {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Pow,
    Min,
    Max,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Red {
    Sum,
    Prod,
    Max,
    Min,
    ArgMax,
    ArgMin,
}

/// The op set. Each per-op rule (shape check, gradient, interpreter) is an exhaustive match.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// An argument of the entry point.
    Input {
        index: usize,
        name: String,
    },
    /// A scalar constant of the node's dtype.
    Const {
        #[serde(with = "f64_serde")]
        value: f64,
    },
    Unary(Un),
    /// Elementwise; both operands have the node's shape.
    Binary(Bin),
    /// `where(cond, a, b)`; all three have the node's shape.
    Select,
    /// Conversion to the node's dtype.
    Cast,
    /// NumPy broadcast of the operand to the node's shape (aligned at the right).
    Broadcast,
    /// Reduction over `axes` (removed from the shape).
    Reduce {
        op: Red,
        axes: Vec<usize>,
    },
    /// `[..., n, k] @ [..., k, m]` with identical batch axes.
    MatMul,
    Transpose {
        perm: Vec<usize>,
    },
    /// Same elements, the node's shape.
    Reshape,
    /// take_along_axis: `x`, integer `idx` of the node's shape; indices are clamped.
    Gather {
        axis: usize,
    },
    /// `x` plus `values` added at `idx` along `axis` (the transpose of `Gather`).
    ScatterAdd {
        axis: usize,
    },
    /// NumPy `take`: rows of `x` along `axis` picked by an index tensor of any shape.
    Take {
        axis: usize,
    },
    /// The transpose of `Take`: `x` plus `values` added at the picked rows.
    TakeAdd {
        axis: usize,
    },
    /// The index along `axis` at every position of the node's shape.
    Iota {
        axis: usize,
    },
    /// Elements `start..start + extent` along `axis` (extent from the node's shape).
    Slice {
        axis: usize,
        start: usize,
    },
    /// The operand placed at `start` along `axis` in zeros of the node's shape.
    Pad {
        axis: usize,
        start: usize,
    },
    Concat {
        axis: usize,
    },
    ArgSort {
        axis: usize,
        descending: bool,
    },
    CumSum {
        axis: usize,
    },
    /// Keep the `n` largest of each group of `m` along `axis` (a bool mask).
    KeepTop {
        n: usize,
        m: usize,
        axis: usize,
    },
    /// The `q`-quantile (second operand, a scalar) of all elements, linear interpolation.
    Quantile,
    /// Uniform samples in [0, 1) of the node's shape, from the seeded counter-based RNG.
    Uniform {
        stream: u64,
    },
    /// Standard normal samples of the node's shape.
    Normal {
        stream: u64,
    },
    /// A categorical sample ∝ the (non-negative) operand along `axis` (removed).
    Sample {
        stream: u64,
        axis: usize,
    },
    /// Q of the reduced QR decomposition of a matrix `[m, n]` (m ≥ n): `[m, n]`, columns
    /// orthonormal, R's diagonal non-negative.
    Qr,
    /// X with A X = B for a square `[n, n]` A and `[n, k]` B: `[n, k]` (LU with partial
    /// pivoting in f64; a singular A gives NaN).
    Solve,
    /// The top-`k` singular vectors of a matrix `[m, n]`: `right` gives Vᵀ[:k] `[k, n]`,
    /// otherwise U[:, :k] `[m, k]`; each right vector's largest-magnitude entry is positive.
    SvdTopK {
        k: usize,
        right: bool,
    },
}

impl Op {
    pub fn name(&self) -> String {
        match self {
            Op::Input { .. } => "input".into(),
            Op::Const { .. } => "const".into(),
            Op::Unary(u) => format!("{u:?}").to_lowercase(),
            Op::Binary(b) => format!("{b:?}").to_lowercase(),
            Op::Select => "select".into(),
            Op::Cast => "cast".into(),
            Op::Broadcast => "broadcast".into(),
            Op::Reduce { op, .. } => format!("reduce_{}", format!("{op:?}").to_lowercase()),
            Op::MatMul => "matmul".into(),
            Op::Transpose { .. } => "transpose".into(),
            Op::Reshape => "reshape".into(),
            Op::Gather { .. } => "gather".into(),
            Op::ScatterAdd { .. } => "scatter_add".into(),
            Op::Take { .. } => "take".into(),
            Op::TakeAdd { .. } => "take_add".into(),
            Op::Iota { .. } => "iota".into(),
            Op::Slice { .. } => "slice".into(),
            Op::Pad { .. } => "pad".into(),
            Op::Concat { .. } => "concat".into(),
            Op::ArgSort { .. } => "argsort".into(),
            Op::CumSum { .. } => "cumsum".into(),
            Op::KeepTop { .. } => "keep_top".into(),
            Op::Quantile => "quantile".into(),
            Op::Uniform { .. } => "uniform".into(),
            Op::Normal { .. } => "normal".into(),
            Op::Sample { .. } => "sample".into(),
            Op::Qr => "qr".into(),
            Op::Solve => "solve".into(),
            Op::SvdTopK { .. } => "svd_topk".into(),
        }
    }

    fn attrs(&self) -> String {
        let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        match self {
            Op::Input { index, name } => format!("[{index}, {name:?}]"),
            Op::Const { value } => format!("[{}]", fmt_f64(*value)),
            Op::Reduce { axes, .. } => format!("[axes={}]", list(axes)),
            Op::Transpose { perm } => format!("[perm={}]", list(perm)),
            Op::Gather { axis }
            | Op::ScatterAdd { axis }
            | Op::Take { axis }
            | Op::TakeAdd { axis }
            | Op::Iota { axis }
            | Op::Concat { axis }
            | Op::CumSum { axis } => {
                format!("[axis={axis}]")
            }
            Op::Slice { axis, start } | Op::Pad { axis, start } => format!("[axis={axis},start={start}]"),
            Op::ArgSort { axis, descending } => format!("[axis={axis},descending={descending}]"),
            Op::KeepTop { n, m, axis } => format!("[n={n},m={m},axis={axis}]"),
            Op::Uniform { stream } | Op::Normal { stream } => format!("[stream={stream}]"),
            Op::Sample { stream, axis } => format!("[stream={stream},axis={axis}]"),
            Op::SvdTopK { k, right } => format!("[k={k},right={right}]"),
            _ => String::new(),
        }
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else if v.is_nan() {
        "nan".into()
    } else {
        // Shortest text that parses back to the same value.
        format!("{v:?}")
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    pub op: Op,
    #[serde(with = "dtype_serde")]
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Where the node came from: `line:col` of the recipe source, or a pass name.
    pub origin: String,
}

/// One entry point: inputs, nodes, named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub(crate) g: StableGraph<Node, usize>,
    pub inputs: Vec<NodeId>,
    pub outputs: Vec<(String, NodeId)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IrError(pub String);

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Operands in order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut v: Vec<(usize, NodeId)> =
            self.g.edges_directed(id.0, Direction::Incoming).map(|e| (*e.weight(), NodeId(e.source()))).collect();
        v.sort_by_key(|(i, _)| *i);
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Nodes that use `id`.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.g.neighbors_directed(id.0, Direction::Outgoing).map(NodeId).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Adds a node after checking its operands (the verifier's per-node rule).
    pub fn add(
        &mut self,
        op: Op,
        dtype: Dtype,
        shape: Vec<usize>,
        operands: &[NodeId],
        origin: &str,
    ) -> Result<NodeId, IrError> {
        let node = Node { op, dtype, shape, origin: origin.to_string() };
        check_node(self, &node, operands)?;
        let id = NodeId(self.g.add_node(node));
        for (i, o) in operands.iter().enumerate() {
            self.g.add_edge(o.0, id.0, i);
        }
        if let Op::Input { .. } = self.g[id.0].op {
            self.inputs.push(id);
        }
        Ok(id)
    }

    /// Node ids in a topological order (operands before users), deterministic.
    pub fn topo(&self) -> Vec<NodeId> {
        let mut indeg: std::collections::BTreeMap<NodeIndex, usize> = std::collections::BTreeMap::new();
        for n in self.g.node_indices() {
            indeg.insert(n, self.g.edges_directed(n, Direction::Incoming).count());
        }
        let mut ready: std::collections::BTreeSet<NodeIndex> =
            indeg.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut out = vec![];
        while let Some(n) = ready.iter().next().copied() {
            ready.remove(&n);
            out.push(NodeId(n));
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("node present");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        out
    }

    /// Copies `src` into this graph: each of `src`'s inputs is replaced by the node `bind`
    /// gives for its name (an input without a binding is an error), random streams are
    /// shifted by `stream_offset` (so two copies draw independent numbers), and `src`'s
    /// outputs are returned by name.
    pub fn inline(
        &mut self,
        src: &Graph,
        bind: &mut dyn FnMut(&str) -> Option<NodeId>,
        stream_offset: u64,
    ) -> Result<Vec<(String, NodeId)>, IrError> {
        let mut map: std::collections::HashMap<NodeId, NodeId> = std::collections::HashMap::new();
        for id in src.topo() {
            let n = src.node(id);
            let new = match &n.op {
                Op::Input { name, .. } => {
                    let b = bind(name).ok_or_else(|| IrError(format!("`{name}` of `{}` is not bound", src.name)))?;
                    let bn = self.node(b);
                    if bn.shape != n.shape || bn.dtype != n.dtype {
                        return Err(IrError(format!(
                            "`{name}` of `{}` must be {}{:?}, got {}{:?}",
                            src.name, n.dtype, n.shape, bn.dtype, bn.shape
                        )));
                    }
                    b
                }
                op => {
                    let op = match op.clone() {
                        Op::Uniform { stream } => Op::Uniform { stream: stream + stream_offset },
                        Op::Normal { stream } => Op::Normal { stream: stream + stream_offset },
                        Op::Sample { stream, axis } => Op::Sample { stream: stream + stream_offset, axis },
                        o => o,
                    };
                    let ops: Vec<NodeId> = src.operands(id).iter().map(|o| map[o]).collect();
                    self.add(op, n.dtype, n.shape.clone(), &ops, &n.origin)?
                }
            };
            map.insert(id, new);
        }
        Ok(src.outputs.iter().map(|(name, id)| (name.clone(), map[id])).collect())
    }

    /// Replaces every use of `old` by `new` (outputs too).
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let edges: Vec<(NodeIndex, usize, petgraph::stable_graph::EdgeIndex)> =
            self.g.edges_directed(old.0, Direction::Outgoing).map(|e| (e.target(), *e.weight(), e.id())).collect();
        for (target, slot, eid) in edges {
            self.g.remove_edge(eid);
            self.g.add_edge(new.0, target, slot);
        }
        for o in &mut self.outputs {
            if o.1 == old {
                o.1 = new;
            }
        }
    }

    /// Renumbers the nodes densely, keeping their order, so that nodes added afterwards are
    /// numbered (and, other things equal, scheduled) in the order they are created: a removed
    /// node's number is otherwise reused by the next node added.
    pub fn compact(&mut self) {
        if self.g.node_count() == petgraph::visit::NodeIndexable::node_bound(&self.g) {
            return;
        }
        let mut g = StableGraph::with_capacity(self.g.node_count(), self.g.edge_count());
        let mut map = std::collections::HashMap::new();
        for n in self.g.node_indices() {
            map.insert(n, g.add_node(self.g[n].clone()));
        }
        for e in self.g.edge_indices() {
            let (a, b) = self.g.edge_endpoints(e).expect("an edge");
            g.add_edge(map[&a], map[&b], self.g[e]);
        }
        self.g = g;
        for i in &mut self.inputs {
            i.0 = map[&i.0];
        }
        for o in &mut self.outputs {
            o.1 .0 = map[&o.1 .0];
        }
    }

    pub fn remove(&mut self, id: NodeId) {
        self.g.remove_node(id.0);
        self.inputs.retain(|i| *i != id);
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    /// Checks every node, the graph's acyclicity, and the outputs.
    pub fn verify(&self) -> Result<(), IrError> {
        if self.topo().len() != self.g.node_count() {
            return Err(IrError(format!("graph `{}` has a cycle", self.name)));
        }
        for n in self.g.node_indices() {
            let ops = self.operands(NodeId(n));
            check_node(self, &self.g[n], &ops).map_err(|e| IrError(format!("%{}: {}", n.index(), e.0)))?;
        }
        for (name, o) in &self.outputs {
            if !self.g.contains_node(o.0) {
                return Err(IrError(format!("output `{name}` refers to a removed node")));
            }
        }
        Ok(())
    }
}

fn err<T>(msg: String) -> Result<T, IrError> {
    Err(IrError(msg))
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// The verifier's rule for one node: operand count, dtypes and shapes.
pub(crate) fn check_node(g: &Graph, n: &Node, operands: &[NodeId]) -> Result<(), IrError> {
    let o: Vec<&Node> = operands.iter().map(|id| g.node(*id)).collect();
    let arity = |k: usize| -> Result<(), IrError> {
        if o.len() != k {
            return err(format!("`{}` takes {k} operands, has {}", n.op.name(), o.len()));
        }
        Ok(())
    };
    let same_shape = |a: &Node| -> Result<(), IrError> {
        if a.shape != n.shape {
            return err(format!("`{}`: operand shape {:?} differs from result {:?}", n.op.name(), a.shape, n.shape));
        }
        Ok(())
    };
    match &n.op {
        Op::Input { .. } => arity(0),
        Op::Const { .. } => {
            arity(0)?;
            if !n.shape.is_empty() {
                return err("a constant is a scalar".into());
            }
            Ok(())
        }
        Op::Iota { axis } => {
            arity(0)?;
            if *axis >= n.shape.len() {
                return err("iota axis out of range".into());
            }
            Ok(())
        }
        Op::Uniform { .. } | Op::Normal { .. } => arity(0),
        Op::Unary(u) => {
            arity(1)?;
            same_shape(o[0])?;
            match u {
                Un::Not if n.dtype != Dtype::Bool => err("`not` gives bool".into()),
                _ => Ok(()),
            }
        }
        Op::Binary(b) => {
            arity(2)?;
            same_shape(o[0])?;
            same_shape(o[1])?;
            if o[0].dtype != o[1].dtype {
                return err(format!("`{}` operands have dtypes {} and {}", n.op.name(), o[0].dtype, o[1].dtype));
            }
            let cmp = matches!(b, Bin::Eq | Bin::Ne | Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::And | Bin::Or);
            if cmp && n.dtype != Dtype::Bool {
                return err("comparisons give bool".into());
            }
            if !cmp && n.dtype != o[0].dtype {
                return err("arithmetic keeps the operands' dtype".into());
            }
            Ok(())
        }
        Op::Select => {
            arity(3)?;
            for x in &o {
                same_shape(x)?;
            }
            if o[0].dtype != Dtype::Bool || o[1].dtype != n.dtype || o[2].dtype != n.dtype {
                return err("select needs a bool condition and branches of the result dtype".into());
            }
            Ok(())
        }
        Op::Cast => {
            arity(1)?;
            same_shape(o[0])
        }
        Op::Broadcast => {
            arity(1)?;
            let (s, t) = (&o[0].shape, &n.shape);
            if s.len() > t.len() {
                return err(format!("cannot broadcast {s:?} to {t:?}"));
            }
            for (i, d) in s.iter().enumerate() {
                let td = t[t.len() - s.len() + i];
                if *d != td && *d != 1 {
                    return err(format!("cannot broadcast {s:?} to {t:?}"));
                }
            }
            if o[0].dtype != n.dtype {
                return err("broadcast keeps the dtype".into());
            }
            Ok(())
        }
        Op::Reduce { op, axes } => {
            arity(1)?;
            let s = &o[0].shape;
            if axes.iter().any(|a| *a >= s.len()) || axes.windows(2).any(|w| w[0] >= w[1]) {
                return err(format!("reduce axes {axes:?} invalid for rank {}", s.len()));
            }
            let expect: Vec<usize> = s.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect();
            if expect != n.shape {
                return err(format!("reduce result shape {:?}, expected {expect:?}", n.shape));
            }
            if matches!(op, Red::ArgMax | Red::ArgMin) && n.dtype != Dtype::I32 {
                return err("argmax/argmin give i32".into());
            }
            Ok(())
        }
        Op::MatMul => {
            arity(2)?;
            let (a, b) = (&o[0].shape, &o[1].shape);
            if a.len() < 2
                || a.len() != b.len()
                || a[..a.len() - 2] != b[..b.len() - 2]
                || a[a.len() - 1] != b[b.len() - 2]
            {
                return err(format!("matmul of {a:?} and {b:?}"));
            }
            let mut expect = a[..a.len() - 1].to_vec();
            expect.push(b[b.len() - 1]);
            if expect != n.shape {
                return err(format!("matmul result {:?}, expected {expect:?}", n.shape));
            }
            Ok(())
        }
        Op::Transpose { perm } => {
            arity(1)?;
            let s = &o[0].shape;
            let mut sorted = perm.clone();
            sorted.sort();
            if sorted != (0..s.len()).collect::<Vec<_>>() {
                return err(format!("transpose perm {perm:?} for rank {}", s.len()));
            }
            let expect: Vec<usize> = perm.iter().map(|p| s[*p]).collect();
            if expect != n.shape {
                return err("transpose result shape".into());
            }
            Ok(())
        }
        Op::Reshape => {
            arity(1)?;
            if numel(&o[0].shape) != numel(&n.shape) {
                return err(format!("reshape {:?} to {:?}", o[0].shape, n.shape));
            }
            Ok(())
        }
        Op::Gather { axis } => {
            arity(2)?;
            if !o[1].dtype.is_int()
                || o[1].shape != n.shape
                || o[0].shape.len() != n.shape.len()
                || *axis >= n.shape.len()
            {
                return err("gather needs integer indices of the result shape".into());
            }
            for i in 0..n.shape.len() {
                if i != *axis && o[0].shape[i] != n.shape[i] {
                    return err("gather: non-axis extents differ".into());
                }
            }
            Ok(())
        }
        Op::ScatterAdd { axis } => {
            arity(3)?;
            same_shape(o[0])?;
            if !o[1].dtype.is_int()
                || o[1].shape != o[2].shape
                || o[1].shape.len() != n.shape.len()
                || *axis >= n.shape.len()
            {
                return err("scatter_add needs integer indices shaped like the values".into());
            }
            Ok(())
        }
        Op::Take { axis } => {
            arity(2)?;
            let x = &o[0].shape;
            if *axis >= x.len() || !o[1].dtype.is_int() {
                return err("take: bad axis or non-integer indices".into());
            }
            let expect: Vec<usize> =
                x[..*axis].iter().chain(o[1].shape.iter()).chain(x[axis + 1..].iter()).copied().collect();
            if expect != n.shape {
                return err(format!("take result {:?}, expected {expect:?}", n.shape));
            }
            Ok(())
        }
        Op::TakeAdd { axis } => {
            arity(3)?;
            same_shape(o[0])?;
            let x = &o[0].shape;
            let expect: Vec<usize> =
                x[..*axis].iter().chain(o[1].shape.iter()).chain(x[axis + 1..].iter()).copied().collect();
            if expect != o[2].shape || !o[1].dtype.is_int() {
                return err("take_add: values must have the shape `take` would give".into());
            }
            Ok(())
        }
        Op::Slice { axis, start } => {
            arity(1)?;
            let s = &o[0].shape;
            if *axis >= s.len() || s.len() != n.shape.len() || start + n.shape[*axis] > s[*axis] {
                return err("slice out of range".into());
            }
            Ok(())
        }
        Op::Pad { axis, start } => {
            arity(1)?;
            let s = &o[0].shape;
            if *axis >= s.len() || s.len() != n.shape.len() || start + s[*axis] > n.shape[*axis] {
                return err("pad out of range".into());
            }
            Ok(())
        }
        Op::Concat { axis } => {
            if o.is_empty() {
                return err("concat of nothing".into());
            }
            let total: usize = o.iter().map(|x| x.shape.get(*axis).copied().unwrap_or(0)).sum();
            if n.shape.get(*axis) != Some(&total) {
                return err("concat extent".into());
            }
            Ok(())
        }
        Op::ArgSort { .. } => {
            arity(1)?;
            same_shape(o[0])?;
            if n.dtype != Dtype::I32 {
                return err("argsort gives i32".into());
            }
            Ok(())
        }
        Op::CumSum { .. } => {
            arity(1)?;
            same_shape(o[0])
        }
        Op::KeepTop { m, axis, .. } => {
            arity(1)?;
            same_shape(o[0])?;
            if *axis >= n.shape.len() || *m == 0 || n.shape[*axis] % m != 0 {
                return err("keep_top groups must divide the axis".into());
            }
            Ok(())
        }
        Op::Quantile => {
            arity(2)?;
            if !n.shape.is_empty() || !o[1].shape.is_empty() {
                return err("quantile gives a scalar of a scalar q".into());
            }
            Ok(())
        }
        Op::Qr => {
            arity(1)?;
            let s = &o[0].shape;
            if s.len() != 2 || s[0] < s[1] || n.shape != *s {
                return err(format!("qr needs a tall matrix [m, n] with m ≥ n and gives its shape, got {s:?}"));
            }
            Ok(())
        }
        Op::Solve => {
            arity(2)?;
            let (a, b) = (&o[0].shape, &o[1].shape);
            if a.len() != 2 || a[0] != a[1] || b.len() != 2 || b[0] != a[0] || n.shape != *b {
                return err(format!("solve needs [n, n] and [n, k] and gives [n, k], got {a:?} and {b:?}"));
            }
            Ok(())
        }
        Op::SvdTopK { k, right } => {
            arity(1)?;
            let s = &o[0].shape;
            if s.len() != 2 || *k > s[0].min(s[1]) {
                return err(format!("svd_topk needs a matrix and k ≤ min(m, n), got {s:?} and k = {k}"));
            }
            let expect = if *right { vec![*k, s[1]] } else { vec![s[0], *k] };
            if n.shape != expect {
                return err("svd_topk result shape".into());
            }
            Ok(())
        }
        Op::Sample { axis, .. } => {
            arity(1)?;
            let s = &o[0].shape;
            let expect: Vec<usize> = s.iter().enumerate().filter(|(i, _)| i != axis).map(|(_, d)| *d).collect();
            if expect != n.shape || n.dtype != Dtype::I32 {
                return err("sample removes the axis and gives i32".into());
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------- text form

fn fmt_ty(dtype: Dtype, shape: &[usize]) -> String {
    format!("{}[{}]", dtype, shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

impl fmt::Display for Graph {
    /// ```text
    /// graph cross_entropy {
    ///   %0 = input[0, "logits"] : f32[4, 7]            # 12:22
    ///   %3 = reduce_max[axes=1] %0 : f32[4]             # 14:15
    ///   return loss %9
    /// }
    /// ```
    /// Nodes are numbered densely in topological order, so the text is stable across
    /// passes that delete nodes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = self.topo();
        let num: std::collections::HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        writeln!(f, "graph {} {{", self.name)?;
        for id in &order {
            let n = self.node(*id);
            let ops: Vec<String> = self.operands(*id).iter().map(|o| format!("%{}", num[o])).collect();
            let mut line = format!("  %{} = {}{}", num[id], n.op.name(), n.op.attrs());
            if !ops.is_empty() {
                line.push(' ');
                line.push_str(&ops.join(", "));
            }
            line.push_str(&format!(" : {}", fmt_ty(n.dtype, &n.shape)));
            if !n.origin.is_empty() {
                let pad = 52usize.saturating_sub(line.chars().count());
                line.push_str(&" ".repeat(pad.max(1)));
                line.push_str(&format!("# {}", n.origin));
            }
            writeln!(f, "{line}")?;
        }
        for (name, o) in &self.outputs {
            writeln!(f, "  return {name} %{}", num.get(o).copied().unwrap_or(usize::MAX))?;
        }
        writeln!(f, "}}")
    }
}

/// Parses the text form back into a graph (so a pass test can start mid-pipeline).
pub fn parse_graph(text: &str) -> Result<Graph, IrError> {
    let mut lines = text.lines().map(|l| l.trim()).filter(|l| !l.is_empty());
    let head = lines.next().ok_or_else(|| IrError("empty graph text".into()))?;
    let name = head
        .strip_prefix("graph ")
        .and_then(|r| r.strip_suffix(" {"))
        .ok_or_else(|| IrError(format!("expected `graph NAME {{`, found `{head}`")))?;
    let mut g = Graph::new(name);
    let mut ids: Vec<NodeId> = vec![];
    for line in lines {
        if line == "}" {
            break;
        }
        if let Some(rest) = line.strip_prefix("return ") {
            let (oname, num) = rest.split_once(" %").ok_or_else(|| IrError(format!("bad return `{line}`")))?;
            let i: usize = num.trim().parse().map_err(|_| IrError(format!("bad node number in `{line}`")))?;
            let id = *ids.get(i).ok_or_else(|| IrError(format!("unknown node %{i}")))?;
            g.outputs.push((oname.to_string(), id));
            continue;
        }
        let (body, origin) = match line.split_once("# ") {
            Some((b, o)) => (b.trim(), o.trim().to_string()),
            None => (line, String::new()),
        };
        let (lhs, rhs) = body.split_once(" = ").ok_or_else(|| IrError(format!("bad node line `{line}`")))?;
        let k: usize = lhs.trim_start_matches('%').parse().map_err(|_| IrError(format!("bad node name `{lhs}`")))?;
        if k != ids.len() {
            return err(format!("nodes must be numbered densely; expected %{}, found %{k}", ids.len()));
        }
        let (expr, ty) = rhs.rsplit_once(" : ").ok_or_else(|| IrError(format!("missing type in `{line}`")))?;
        let (dtype, shape) = parse_ty(ty)?;
        let (head, operands) = match expr.find(' ') {
            Some(i) => (&expr[..i], expr[i + 1..].trim()),
            None => (expr, ""),
        };
        let (opname, attrs) = match head.find('[') {
            Some(i) => (&head[..i], &head[i + 1..head.len() - 1]),
            None => (head, ""),
        };
        // Input attributes contain a quoted name that may hold spaces: re-split.
        let (attrs, operands) = if opname == "input" {
            let close = expr.rfind(']').ok_or_else(|| IrError("bad input".into()))?;
            (&expr[6..close], "")
        } else {
            (attrs, operands)
        };
        let ops: Vec<NodeId> = if operands.is_empty() {
            vec![]
        } else {
            operands
                .split(", ")
                .map(|o| {
                    let i: usize =
                        o.trim_start_matches('%').parse().map_err(|_| IrError(format!("bad operand `{o}`")))?;
                    ids.get(i).copied().ok_or_else(|| IrError(format!("operand %{i} used before definition")))
                })
                .collect::<Result<_, _>>()?
        };
        let op = parse_op(opname, attrs)?;
        let id = g.add(op, dtype, shape, &ops, &origin)?;
        ids.push(id);
    }
    g.verify()?;
    Ok(g)
}

fn parse_ty(t: &str) -> Result<(Dtype, Vec<usize>), IrError> {
    let (d, rest) = t.split_once('[').ok_or_else(|| IrError(format!("bad type `{t}`")))?;
    let dtype = Dtype::parse(d.trim()).ok_or_else(|| IrError(format!("bad dtype `{d}`")))?;
    let dims = rest.trim_end_matches(']');
    let shape = if dims.trim().is_empty() {
        vec![]
    } else {
        dims.split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|_| IrError(format!("bad dim `{x}`"))))
            .collect::<Result<_, _>>()?
    };
    Ok((dtype, shape))
}

fn attr_map(attrs: &str) -> std::collections::HashMap<String, String> {
    attrs
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn parse_op(name: &str, attrs: &str) -> Result<Op, IrError> {
    let a = attr_map(attrs);
    let us = |k: &str| -> Result<usize, IrError> {
        a.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| IrError(format!("`{name}` needs `{k}`")))
    };
    let u64_ = |k: &str| -> Result<u64, IrError> {
        a.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| IrError(format!("`{name}` needs `{k}`")))
    };
    let list = |k: &str| -> Result<Vec<usize>, IrError> {
        // Lists are written `axes=0,1`: the map split them, so read the raw attribute text.
        let raw = attrs.strip_prefix(&format!("{k}=")).ok_or_else(|| IrError(format!("`{name}` needs `{k}`")))?;
        if raw.is_empty() {
            return Ok(vec![]);
        }
        raw.split(',').map(|x| x.parse().map_err(|_| IrError(format!("bad list `{raw}`")))).collect()
    };
    let un = |u| Ok(Op::Unary(u));
    let bin = |b| Ok(Op::Binary(b));
    match name {
        "input" => {
            let (i, n) = attrs.split_once(", ").ok_or_else(|| IrError("input needs index and name".into()))?;
            Ok(Op::Input {
                index: i.parse().map_err(|_| IrError("bad input index".into()))?,
                name: n.trim_matches('"').to_string(),
            })
        }
        "const" => {
            let v = match attrs {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                "nan" => f64::NAN,
                s => s.parse().map_err(|_| IrError(format!("bad constant `{s}`")))?,
            };
            Ok(Op::Const { value: v })
        }
        "neg" => un(Un::Neg),
        "not" => un(Un::Not),
        "exp" => un(Un::Exp),
        "log" => un(Un::Log),
        "log1p" => un(Un::Log1p),
        "sqrt" => un(Un::Sqrt),
        "rsqrt" => un(Un::Rsqrt),
        "tanh" => un(Un::Tanh),
        "sigmoid" => un(Un::Sigmoid),
        "softplus" => un(Un::Softplus),
        "gelu" => un(Un::Gelu),
        "gelutanh" => un(Un::GeluTanh),
        "silu" => un(Un::Silu),
        "erf" => un(Un::Erf),
        "cos" => un(Un::Cos),
        "sin" => un(Un::Sin),
        "abs" => un(Un::Abs),
        "sign" => un(Un::Sign),
        "relu" => un(Un::Relu),
        "floor" => un(Un::Floor),
        "ceil" => un(Un::Ceil),
        "round" => un(Un::Round),
        "stopgradient" => un(Un::StopGradient),
        "add" => bin(Bin::Add),
        "sub" => bin(Bin::Sub),
        "mul" => bin(Bin::Mul),
        "div" => bin(Bin::Div),
        "rem" => bin(Bin::Rem),
        "pow" => bin(Bin::Pow),
        "min" => bin(Bin::Min),
        "max" => bin(Bin::Max),
        "eq" => bin(Bin::Eq),
        "ne" => bin(Bin::Ne),
        "lt" => bin(Bin::Lt),
        "le" => bin(Bin::Le),
        "gt" => bin(Bin::Gt),
        "ge" => bin(Bin::Ge),
        "and" => bin(Bin::And),
        "or" => bin(Bin::Or),
        "select" => Ok(Op::Select),
        "cast" => Ok(Op::Cast),
        "broadcast" => Ok(Op::Broadcast),
        "matmul" => Ok(Op::MatMul),
        "reshape" => Ok(Op::Reshape),
        "quantile" => Ok(Op::Quantile),
        n if n.starts_with("reduce_") => {
            let op = match &n[7..] {
                "sum" => Red::Sum,
                "prod" => Red::Prod,
                "max" => Red::Max,
                "min" => Red::Min,
                "argmax" => Red::ArgMax,
                "argmin" => Red::ArgMin,
                other => return err(format!("unknown reduction `{other}`")),
            };
            Ok(Op::Reduce { op, axes: list("axes")? })
        }
        "transpose" => Ok(Op::Transpose { perm: list("perm")? }),
        "gather" => Ok(Op::Gather { axis: us("axis")? }),
        "scatter_add" => Ok(Op::ScatterAdd { axis: us("axis")? }),
        "take" => Ok(Op::Take { axis: us("axis")? }),
        "take_add" => Ok(Op::TakeAdd { axis: us("axis")? }),
        "iota" => Ok(Op::Iota { axis: us("axis")? }),
        "slice" => Ok(Op::Slice { axis: us("axis")?, start: us("start")? }),
        "pad" => Ok(Op::Pad { axis: us("axis")?, start: us("start")? }),
        "concat" => Ok(Op::Concat { axis: us("axis")? }),
        "cumsum" => Ok(Op::CumSum { axis: us("axis")? }),
        "argsort" => {
            Ok(Op::ArgSort { axis: us("axis")?, descending: a.get("descending").map(|v| v == "true").unwrap_or(false) })
        }
        "keep_top" => Ok(Op::KeepTop { n: us("n")?, m: us("m")?, axis: us("axis")? }),
        "uniform" => Ok(Op::Uniform { stream: u64_("stream")? }),
        "normal" => Ok(Op::Normal { stream: u64_("stream")? }),
        "sample" => Ok(Op::Sample { stream: u64_("stream")?, axis: us("axis")? }),
        "qr" => Ok(Op::Qr),
        "solve" => Ok(Op::Solve),
        "svd_topk" => Ok(Op::SvdTopK { k: us("k")?, right: a.get("right").map(|v| v == "true").unwrap_or(true) }),
        other => err(format!("unknown op `{other}`")),
    }
}
