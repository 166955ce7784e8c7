//! Shared helpers of the workspace-level tests: a module loader over the repository and the
//! embedded standard library, and a plain, deterministic rendering of diagnostics for
//! snapshots.

use lang::diag::Diagnostic;
use lang::source::{ModuleLoader, SourceDb};
use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Loads `std.*` from the embedded stdlib and other modules from files beside the importer
/// (names are relative to the repository root, so snapshots do not depend on the machine).
pub struct RepoLoader;

impl ModuleLoader for RepoLoader {
    fn load(&self, path: &[String], from: &str) -> Option<(String, String)> {
        if path.first().map(|s| s == "std").unwrap_or(false) {
            let (file, text) = stdlib::module(path)?;
            return Some((format!("<std>/{file}"), text.to_string()));
        }
        let dir = Path::new(from).parent().unwrap_or(Path::new(""));
        let mut rel = dir.to_path_buf();
        for s in path {
            rel.push(s);
        }
        rel.set_extension("recipe");
        let text = std::fs::read_to_string(root().join(&rel)).ok()?;
        Some((rel.display().to_string(), text))
    }
    fn known_modules(&self) -> Vec<String> {
        stdlib::MODULES.iter().map(|m| m.0.to_string()).collect()
    }
}

/// `error[E0302] 5:5: message`, its labels with positions, help and notes.
pub fn render(db: &SourceDb, d: &Diagnostic) -> String {
    let mut out = String::new();
    let pos = |l: &lang::diag::Label| {
        let f = db.file(l.file);
        let (a, b) = f.line_col(l.span.start);
        let (c, e) = f.line_col(l.span.end);
        (f.name.clone(), a, b, c, e)
    };
    match d.primary() {
        Some(l) => {
            let (_, a, b, _, _) = pos(l);
            out.push_str(&format!("{}[{}] {a}:{b}: {}\n", d.severity.as_str(), d.code, d.message));
        }
        None => out.push_str(&format!("{}[{}]: {}\n", d.severity.as_str(), d.code, d.message)),
    }
    for (i, l) in d.labels.iter().enumerate() {
        let (name, a, b, c, e) = pos(l);
        let place =
            if i == 0 || Some(l.file) == d.primary().map(|p| p.file) { String::new() } else { format!("{name}:") };
        out.push_str(&format!("  {} {place}{a}:{b}-{c}:{e} {}\n", if i == 0 { "-->" } else { "   " }, l.message));
    }
    if let Some(h) = &d.help {
        out.push_str(&format!("  help: {h}\n"));
    }
    for n in &d.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}

/// Every `.recipe` file under `dir`, sorted.
pub fn recipe_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(recipe_files(&p));
            } else if p.extension().map(|x| x == "recipe").unwrap_or(false) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

// ---- Sample arguments for the graphs of stdlib items and case files (used by the IR
// snapshots and the backend differential tests).

use compiler::lower::Arg;
use lang::types::Dtype;

fn t(d: Dtype, s: &[usize]) -> Arg {
    Arg::Tensor(d, s.to_vec())
}

/// Sample arguments per item: tensors by shape, hyperparameters by value.
pub fn samples(module: &str, item: &str) -> Option<Vec<(&'static str, Arg)>> {
    use Dtype::*;
    let ce = || vec![("logits", t(F32, &[3, 5])), ("targets", t(I32, &[3]))];
    Some(match (module, item) {
        ("std.loss", "cross_entropy") | ("std.loss", "logz_penalty") => ce(),
        ("std.loss", "label_smoothed_cross_entropy") => ce(),
        ("std.loss", "zloss_spherical") => {
            let mut v = ce();
            v.push(("a", Arg::Scalar(1.0)));
            v.push(("b", Arg::Scalar(2.0)));
            v
        }
        ("std.loss", "linear_cross_entropy") => {
            vec![("hidden", t(F32, &[3, 4])), ("classifier", t(F32, &[5, 4])), ("targets", t(I32, &[3]))]
        }
        ("std.loss", "eisl") => vec![("logp", t(F32, &[2, 5, 7])), ("targets", t(I32, &[2, 5]))],
        ("std.loss", "squarehead") => {
            vec![("student", t(F32, &[2, 3, 4])), ("teacher", t(F32, &[2, 3, 4])), ("mask", t(F32, &[3]))]
        }
        ("std.loss", "distill_kl") => {
            vec![("student", t(F32, &[3, 5])), ("teacher", t(F32, &[3, 5])), ("targets", t(I32, &[3]))]
        }
        ("std.loss", "gram_volume") => vec![("anchor", t(F32, &[3, 4])), ("others", t(F32, &[2, 5, 4]))],
        ("std.loss", "gram_loss") => vec![("anchor", t(F32, &[3, 4])), ("others", t(F32, &[2, 3, 4]))],
        ("std.loss", "local_gram_flow") => vec![("f", t(F32, &[3, 3, 4, 5]))],
        ("std.loss", "lgf_loss") => vec![("student", t(F32, &[3, 3, 4, 5])), ("teacher", t(F32, &[3, 3, 4, 2]))],
        ("std.loss", "wcfm") => vec![("velocity", t(F32, &[3, 4])), ("x0", t(F32, &[3, 4])), ("x1", t(F32, &[3, 4]))],
        ("std.optim", "frugal" | "frugal_columns" | "galore_adamw" | "fira_adamw") => {
            vec![("lr", Arg::Scalar(0.1)), ("rank", Arg::Scalar(2.0))]
        }
        ("std.optim", _) => vec![("lr", Arg::Scalar(0.1))],
        ("std.schedule", "constant") => vec![("value", Arg::Scalar(1.0))],
        ("std.schedule", "linear_warmup") => vec![("peak", Arg::Scalar(1.0)), ("warmup", Arg::Scalar(10.0))],
        ("std.schedule", "wsd_s") => vec![("peak", Arg::Scalar(1.0)), ("period", Arg::Scalar(50.0))],
        ("std.schedule", "decay_shape") => vec![
            ("x", Arg::Tensor(F32, vec![])),
            ("shape", Arg::Str("cosine".into())),
            ("f", Arg::Scalar(0.1)),
            ("sqrt_power", Arg::Scalar(0.5)),
        ],
        ("std.schedule", _) => vec![("peak", Arg::Scalar(1.0)), ("total", Arg::Scalar(100.0))],
        ("std.sparsity", "quantize_groups") => vec![("w", t(F32, &[3, 8])), ("group", Arg::Scalar(4.0))],
        ("std.sparsity", _) => vec![],
        ("std.decode", "localleap_commit") => vec![("confidence", t(F32, &[10])), ("radius", Arg::Scalar(2.0))],
        ("std.decode", _) => vec![("logits", t(F32, &[6]))],
        ("std.models", "rope") => vec![("x", t(F32, &[2, 2, 3, 4])), ("offset", Arg::Scalar(1.0))],
        ("std.models", "ntk_rope_base") => vec![
            ("base", Arg::Scalar(10000.0)),
            ("dim", Arg::Scalar(64.0)),
            ("train_len", Arg::Scalar(128.0)),
            ("target_len", Arg::Scalar(512.0)),
        ],
        ("std.models", "lambda_mask") => {
            vec![("n", Arg::Scalar(6.0)), ("local", Arg::Scalar(2.0)), ("n_global", Arg::Scalar(1.0))]
        }
        ("std.models", "lambda_scores") => vec![
            ("q", t(F32, &[1, 2, 5, 4])),
            ("k", t(F32, &[1, 2, 5, 4])),
            ("local", Arg::Scalar(2.0)),
            ("n_global", Arg::Scalar(1.0)),
        ],
        ("std.models", "cayley") => vec![("w", t(F32, &[4, 4]))],
        ("std.models", "pca_basis") => vec![("x", t(F32, &[6, 4]))],
        ("std.models", "matryoshka_attention" | "matryoshka_cached_attention") => vec![
            ("q", t(F32, &[1, 2, 5, 4])),
            ("k", t(F32, &[1, 2, 5, 4])),
            ("v", t(F32, &[1, 2, 5, 4])),
            ("u_k", t(F32, &[2, 4, 4])),
            ("u_v", t(F32, &[2, 4, 4])),
            ("rank_k", Arg::Scalar(3.0)),
            ("rank_v", Arg::Scalar(2.0)),
        ],
        ("std.models", "matryoshka_rank") => vec![("E", Arg::Scalar(8.0)), ("step", Arg::Scalar(2.0))],
        ("std.models", "lost_left" | "lost_right" | "lost_residual") => {
            vec![("w0", t(F32, &[6, 4])), ("R", Arg::Scalar(2.0))]
        }
        ("std.models", "lost_channels" | "lost_sparse" | "lost_channel_index" | "lost_sparse_columns") => {
            vec![("w0", t(F32, &[6, 4])), ("R", Arg::Scalar(2.0)), ("C", Arg::Scalar(2.0))]
        }
        ("std.models", "layer_norm") => vec![("x", t(F32, &[3, 4])), ("gain", t(F32, &[4])), ("bias", t(F32, &[4]))],
        _ => return None,
    })
}

/// Small distinct even extents for symbolic dimensions, so shapes in the snapshots are
/// readable, transposition mistakes show, and divisions such as `D / H` (with H = 2) divide.
const EXTENTS: &[i64] = &[4, 6, 8, 2, 10, 12];

fn eval_dim(e: &lang::ast::Expr, env: &mut std::collections::HashMap<String, i64>, next: &mut usize) -> Option<i64> {
    use lang::ast::{BinOp, ExprKind, UnOp};
    Some(match &e.kind {
        ExprKind::Int(i) => *i,
        ExprKind::Underscore => 3,
        ExprKind::Paren(x) => eval_dim(x, env, next)?,
        ExprKind::Unary(UnOp::Neg, x) => -eval_dim(x, env, next)?,
        ExprKind::Name(n) => *env.entry(n.clone()).or_insert_with(|| {
            let v = EXTENTS[*next % EXTENTS.len()];
            *next += 1;
            v
        }),
        ExprKind::Binary(op, a, b) => {
            let (a, b) = (eval_dim(a, env, next)?, eval_dim(b, env, next)?);
            match op {
                BinOp::Add => a + b,
                BinOp::Sub => a - b,
                BinOp::Mul => a * b,
                BinOp::Div if b != 0 => a / b,
                BinOp::Rem if b != 0 => a % b,
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// Arguments for an item chosen from its signature: each symbolic dimension gets a small
/// extent, integer parameters without defaults 2, float ones 0.5. Dimensions used in
/// divisions (`D / H`) are made divisible by binding divisors first.
pub fn auto_args(params: &[lang::ast::Param]) -> Vec<(String, Arg)> {
    let mut env = std::collections::HashMap::new();
    let mut next = 0;
    // Integer parameters first: they may size the tensors.
    for p in params {
        if p.ty.dims.is_none() && Dtype::parse(&p.ty.dtype.name).map(|d| d.is_int()).unwrap_or(false) {
            let v = match p.default.as_ref().map(|d| &d.kind) {
                Some(lang::ast::ExprKind::Int(i)) => *i,
                _ => 2,
            };
            env.insert(p.name.name.clone(), v);
        }
    }
    let mut out = vec![];
    for p in params {
        let Some(dtype) = Dtype::parse(&p.ty.dtype.name) else { continue };
        match &p.ty.dims {
            Some(dims) => {
                // Divisors get bound before the dividend so `D / H` divides.
                let mut shape = vec![];
                for d in dims {
                    if let lang::ast::ExprKind::Binary(lang::ast::BinOp::Div, a, b) = &d.kind {
                        let bv = eval_dim(b, &mut env, &mut next).unwrap_or(1).max(1);
                        if let lang::ast::ExprKind::Name(n) = &a.kind {
                            env.entry(n.clone()).or_insert(bv * 4);
                        }
                    }
                    shape.push(eval_dim(d, &mut env, &mut next).unwrap_or(3).max(1) as usize);
                }
                out.push((p.name.name.clone(), Arg::Tensor(dtype, shape)));
            }
            None if p.default.is_some() => {}
            None if dtype.is_int() => {
                out.push((p.name.name.clone(), Arg::Scalar(env.get(&p.name.name).copied().unwrap_or(2) as f64)))
            }
            None => out.push((p.name.name.clone(), Arg::Scalar(0.5))),
        }
    }
    out
}

/// The graph of a function, loss, schedule, optimizer or sparsity rule at `args` (`None`
/// for other items): `grads` adds a function's gradients; an optimizer's parameter has shape
/// `shapes.0` (a rule for matrices, `param: f32[M, N]`, given a vector shape steps a 6 x 4
/// matrix), a sparsity rule's `shapes.1`.
pub fn item_graph(
    mods: &lang::resolve::Modules,
    db: &SourceDb,
    r: lang::types::ItemRef,
    args: &[(String, Arg)],
    grads: bool,
    shapes: (Vec<usize>, Vec<usize>),
) -> Option<Result<compiler::ir::Graph, compiler::lower::LowerError>> {
    use lang::ast::{FnKind, ItemKind, RuleKind};
    Some(match &mods.item(r).kind {
        ItemKind::Fn(f) if f.kind == FnKind::Schedule => compiler::entry::schedule(mods, db, r, args),
        ItemKind::Fn(_) => compiler::entry::function(mods, db, r, args, grads),
        ItemKind::Rule(rd) if rd.kind == RuleKind::Optimizer => {
            // A rule for matrices (`param: f32[M, N]`: GaLore, FRUGAL) steps a 6 x 4 matrix.
            let matrix =
                rd.params.iter().any(|p| p.name.name == "param" && p.ty.dims.as_ref().is_some_and(|d| d.len() == 2));
            let shape = if matrix && shapes.0.len() != 2 { vec![6, 4] } else { shapes.0 };
            compiler::entry::optimizer(mods, db, r, (Dtype::F32, shape), args)
        }
        ItemKind::Rule(_) => compiler::entry::sparsity(mods, db, r, (Dtype::F32, shapes.1), args),
        _ => return None,
    })
}

/// True for the items whose graphs are tested with their gradients: losses, and the
/// `std.loss` functions with a scalar value (`gram_volume` gives a matrix).
pub fn takes_gradients(module: &str, kind: &lang::ast::ItemKind) -> bool {
    use lang::ast::{FnKind, ItemKind};
    let scalar = |f: &lang::ast::FnDef| f.ret.as_ref().is_some_and(|t| t.dims.as_ref().is_none_or(|d| d.is_empty()));
    matches!(kind, ItemKind::Fn(f) if f.kind == FnKind::Loss || (module == "std.loss" && scalar(f)))
}

/// The graph of every stdlib item that has sample arguments (losses and `std.loss` items
/// with their gradients), after the pass pipeline: `(module.item, graph)`, sorted.
pub fn stdlib_graphs() -> Vec<(String, compiler::ir::Graph)> {
    use lang::types::ItemRef;
    let mut loader = lang::source::MemoryLoader::default();
    for (m, f, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), text);
    }
    let mut out = vec![];
    for (module, file, text) in stdlib::MODULES {
        let mut db = SourceDb::new();
        let root = db.add(format!("<std>/{file}"), *text);
        let analysis = lang::analyze(&mut db, &[root], &loader);
        let mods = &analysis.modules;
        let mut names: Vec<(&String, &usize)> = mods.list[0].items.iter().collect();
        names.sort();
        for (name, &i) in names {
            let r = ItemRef { module: 0, item: i };
            let Some(args) = samples(module, name) else { continue };
            let args: Vec<(String, Arg)> = args.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
            let loss = takes_gradients(module, &mods.item(r).kind);
            let Some(g) = item_graph(mods, &db, r, &args, loss, (vec![37], vec![4, 16])) else { continue };
            let mut g = g.unwrap_or_else(|e| panic!("{module}.{name}: {e}"));
            compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
            out.push((format!("{module}.{name}"), g));
        }
    }
    out
}

/// Adds `y = -h + softmax_unnormalized(x @ w) @ u` to `g` (inputs `x{i}: [m, k]`,
/// `w{i}: [k, n]`, `u{i}: [n, d]`, `h{i}: [m, d]` at argument indices `first..first + 4`;
/// the exponentials in f32, cast back to `dt`): the shape of the hidden state's gradient in
/// the linear cross-entropy, a row-fused group whose softmax block feeds a trailing matmul
/// and nothing else. Returns `y` and the row maximum.
pub fn softmax_matmul(
    g: &mut compiler::ir::Graph,
    first: usize,
    i: usize,
    dt: Dtype,
    (m, k, n, d): (usize, usize, usize, usize),
) -> (compiler::ir::NodeId, compiler::ir::NodeId) {
    use compiler::ir::{Bin, Op, Red, Un};
    let mut input = |j: usize, name: &str, shape: Vec<usize>| {
        g.add(Op::Input { index: first + j, name: format!("{name}{i}") }, dt, shape, &[], name).unwrap()
    };
    let (x, w, u, h) =
        (input(0, "x", vec![m, k]), input(1, "w", vec![k, n]), input(2, "u", vec![n, d]), input(3, "h", vec![m, d]));
    let h = g.add(Op::Unary(Un::Neg), dt, vec![m, d], &[h], "h").unwrap();
    let z = g.add(Op::MatMul, dt, vec![m, n], &[x, w], "z").unwrap();
    let zf = g.add(Op::Cast, Dtype::F32, vec![m, n], &[z], "z").unwrap();
    let mx = g.add(Op::Reduce { op: Red::Max, axes: vec![1] }, Dtype::F32, vec![m], &[zf], "max").unwrap();
    let r = g.add(Op::Reshape, Dtype::F32, vec![m, 1], &[mx], "max").unwrap();
    let b = g.add(Op::Broadcast, Dtype::F32, vec![m, n], &[r], "max").unwrap();
    let e = g.add(Op::Binary(Bin::Sub), Dtype::F32, vec![m, n], &[zf, b], "sub").unwrap();
    let e = g.add(Op::Unary(Un::Exp), Dtype::F32, vec![m, n], &[e], "exp").unwrap();
    let e = g.add(Op::Cast, dt, vec![m, n], &[e], "exp").unwrap();
    let y = g.add(Op::MatMul, dt, vec![m, d], &[e, u], "y").unwrap();
    let y = g.add(Op::Binary(Bin::Add), dt, vec![m, d], &[h, y], "y").unwrap();
    (y, mx)
}
