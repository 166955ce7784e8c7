//! Differential tests: every stdlib item and every valid case file, scheduled into kernels
//! and run by the Cranelift backend (and LLVM with `--features llvm`), gives the
//! interpreter's results; so does the CUDA code generator's output, run on the CPU by the
//! CUDA emulator (`runtime::cuda_emu`, where a C++ compiler exists; `RECIPEC_CUDA_EMU=0`
//! leaves it out).
//!
//! Tolerances: loops compute exactly as the interpreter does (see `compiler::kernel`), so
//! graphs without matmuls must agree to the last bit, except for integers and bools which
//! always must. Matmuls accumulate in f32 in a blocked order; values downstream of one are
//! compared with |a - b| ≤ 1e-5 + 1e-4·|b| (f32 has 24 bits; a k ≤ 4096 dot product
//! of unit-scale values loses at most a few of them). The emulated CUDA code is held to the
//! same 1e-5 + 1e-4·|b| everywhere (its long reductions sum in a warp's order, and its
//! matmuls in 16-wide tiles), integers and bools exactly.

use compiler::interp::{self, Tensor};
use compiler::ir::{Graph, Op};
use compiler::kernel::{Kernel, Program};
use compiler::lower::Arg;
use lang::ast::{FnKind, ItemKind};
use lang::source::{MemoryLoader, SourceDb};
use lang::types::{Dtype, ItemRef};
use runtime::{Backend, Executable, Runner};
use tests::auto_args;

/// Deterministic pseudo-random inputs for a graph (xorshift; floats roughly N(0, 1),
/// integers in 0..7, steps in 1..5).
fn inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    g.inputs
        .iter()
        .map(|id| {
            let n = g.node(*id);
            let name = match &n.op {
                Op::Input { name, .. } => name.clone(),
                _ => String::new(),
            };
            let numel: usize = n.shape.iter().product();
            let data = (0..numel)
                .map(|_| match n.dtype {
                    Dtype::Bool => (next() < 0.5) as i32 as f64,
                    Dtype::I32 | Dtype::I64 if name == "step" => 1.0 + (next() * 4.0).floor(),
                    Dtype::I32 | Dtype::I64 => (next() * 7.0).floor(),
                    _ => {
                        // Sum of uniforms: roughly normal, bounded.
                        let u: f64 = (0..4).map(|_| next()).sum::<f64>() - 2.0;
                        u * 1.7
                    }
                })
                .collect();
            Tensor::new(n.dtype, n.shape.clone(), data)
        })
        .collect()
}

fn has_matmul(g: &Graph) -> bool {
    g.topo().iter().any(|n| matches!(g.node(*n).op, Op::MatMul | Op::Qr | Op::SvdTopK { .. }))
}

/// The code generators under test: Cranelift, and LLVM when built with `--features llvm`,
/// the CUDA emulator where a C++ compiler exists, a GPU where one does.
/// `RECIPEC_TEST_BACKENDS=llvm` (a comma-separated list of `cranelift`, `llvm`, `cuda-emu`,
/// `cuda`) keeps only those: CI's second run, built with LLVM, tests only what the first
/// run could not.
fn backends() -> Vec<Backend> {
    let only = std::env::var("RECIPEC_TEST_BACKENDS").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|l| l.split(',').any(|b| b.trim() == name));
    let mut v = vec![];
    if wanted("cranelift") {
        v.push(Backend::Cranelift);
    }
    #[cfg(feature = "llvm")]
    if wanted("llvm") {
        v.push(Backend::Llvm);
    }
    if wanted("cuda-emu") && std::env::var("RECIPEC_CUDA_EMU").as_deref() != Ok("0") {
        match runtime::cuda_emu::available() {
            Ok(()) => v.push(Backend::CudaEmu),
            // CI sets RECIPEC_REQUIRE_CUDA_EMU=1: there the emulator must run.
            Err(e) if std::env::var("RECIPEC_REQUIRE_CUDA_EMU").as_deref() == Ok("1") => panic!("{e}"),
            Err(e) => eprintln!("the CUDA emulator is skipped: {e}"),
        }
    }
    // On a machine with a GPU (tests/gpu/run.sh), the real thing too.
    if wanted("cuda") && runtime::cuda::available().is_ok() {
        v.push(Backend::Cuda);
    }
    assert!(!v.is_empty(), "RECIPEC_TEST_BACKENDS={only:?} names no code generator this build has");
    v
}

fn is_cuda(b: Backend) -> bool {
    matches!(b, Backend::Cuda | Backend::CudaEmu)
}

/// Runs `g` on every code generator and compares every output with the interpreter.
fn differential(g: &Graph, what: &str) {
    for b in backends() {
        differential_on(g, &format!("{what} [{b:?}]"), b);
    }
}

fn differential_on(g: &Graph, what: &str, backend: Backend) {
    let p = compiler::kernel::schedule(g).unwrap_or_else(|e| panic!("{what}: schedule: {e}"));
    p.verify().unwrap_or_else(|e| panic!("{what}: plan: {e}\n{}", p.text()));
    let exe = runtime::compile_program(p, backend).unwrap_or_else(|e| panic!("{what}: codegen: {e}"));
    let exact = !has_matmul(g) && !is_cuda(backend);
    for seed in [1u64, 2] {
        let ins = inputs(g, seed);
        let want = interp::run(g, &ins, seed).unwrap_or_else(|e| panic!("{what}: interp: {e}"));
        let got = runtime::run_tensors_on(&exe, &ins, seed).unwrap_or_else(|e| panic!("{what}: run: {e}"));
        if let Some(emu) = exe.emulator() {
            same_bits_with_blocks_reversed(emu, &ins, seed, &got, what);
        }
        for (name, t) in got {
            let w = &want[&name];
            assert_eq!((t.dtype, &t.shape), (w.dtype, &w.shape), "{what}: output `{name}`");
            for (i, (a, b)) in t.data.iter().zip(&w.data).enumerate() {
                let ok = if a.is_nan() || b.is_nan() {
                    a.is_nan() && b.is_nan()
                } else if a == b {
                    true // infinities included, where the difference is NaN
                } else if exact || !t.dtype.is_float() {
                    a == b
                } else {
                    (a - b).abs() <= 1e-5 + 1e-4 * b.abs()
                };
                assert!(
                    ok,
                    "{what}: output `{name}` element {i}: generated code {a}, interpreter {b} (seed {seed})\n{}",
                    exe.program().text()
                );
            }
        }
    }
}

/// On the CUDA emulator, the run with every launch's blocks (and barrier-free threads) in
/// reverse order gives the same bits: no block depends on another's writes in one launch, as
/// on a GPU, where blocks run in no fixed order.
fn same_bits_with_blocks_reversed(
    emu: &runtime::cuda_emu::EmuExecutable,
    ins: &[Tensor],
    seed: u64,
    forward: &[(String, Tensor)],
    what: &str,
) {
    let rev = emu.run_tensors_reversed(ins, seed).unwrap_or_else(|e| panic!("{what}: reversed run: {e}"));
    for ((name, a), (_, b)) in forward.iter().zip(&rev) {
        for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{what}: output `{name}` element {i} is {x} with blocks in order, {y} in reverse: a race between blocks"
            );
        }
    }
}

fn stdlib_loader() -> MemoryLoader {
    let mut loader = MemoryLoader::default();
    for (m, f, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), text);
    }
    loader
}

/// Every stdlib item at its sample shapes, and the losses with their gradients.
#[test]
fn stdlib_items_match_the_interpreter() {
    let mut covered = 0;
    for (name, g) in tests::stdlib_graphs() {
        differential(&g, &name);
        covered += 1;
    }
    assert!(covered >= 18, "only {covered} stdlib items ran");
}

/// Awkward sizes (1, 3, 17, 1000, 4099): vector loops with scalar tails, single elements,
/// odd row lengths, thread splits.
#[test]
fn awkward_sizes_match_the_interpreter() {
    let loader = stdlib_loader();
    let mut db = SourceDb::new();
    let src = "use std.optim.adamw\nuse std.optim.sgd\nuse std.optim.sign_sgd\nuse std.loss.cross_entropy\nuse std.loss.linear_cross_entropy\nuse std.models.layer_norm\n";
    let root = db.add("<awkward>", src);
    let analysis = lang::analyze(&mut db, &[root], &loader);
    assert!(!analysis.has_errors());
    let mods = &analysis.modules;
    let find = |name: &str| {
        let m = mods.list.iter().position(|m| m.items.contains_key(name) && m.file != root).unwrap();
        ItemRef { module: m, item: mods.list[m].items[name] }
    };
    let t = |d: Dtype, s: &[usize]| Arg::Tensor(d, s.to_vec());
    let lr = vec![("lr".to_string(), Arg::Scalar(0.01))];
    for n in [1usize, 3, 17, 1000, 4099] {
        for opt in ["adamw", "sgd", "sign_sgd"] {
            let mut g = compiler::entry::optimizer(mods, &db, find(opt), (Dtype::F32, vec![n]), &lr).unwrap();
            compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
            differential(&g, &format!("{opt} [{n}]"));
            if opt == "adamw" && n >= 17 {
                // The step is one vectorized loop over the parameter.
                let p = compiler::kernel::schedule(&g).unwrap();
                let exe = Executable::new(p, Backend::Cranelift).unwrap();
                let big: Vec<usize> = (0..exe.program.kernels.len())
                    .filter(|k| matches!(&exe.program.kernels[*k], compiler::kernel::Kernel::Loop(l) if l.dims == [n]))
                    .collect();
                assert_eq!(big.len(), 1, "adamw [{n}]: {}", exe.program.text());
                assert!(exe.vectorized(big[0]), "adamw [{n}] is not vectorized:\n{}", exe.program.text());
            }
        }
    }
    for (rows, v) in [(1usize, 3usize), (3, 17), (17, 1000), (5, 4099)] {
        let args =
            vec![("logits".to_string(), t(Dtype::F32, &[rows, v])), ("targets".to_string(), t(Dtype::I32, &[rows]))];
        let mut g = compiler::entry::function(mods, &db, find("cross_entropy"), &args, true).unwrap();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        differential(&g, &format!("cross_entropy [{rows}, {v}]"));
        let args = vec![
            ("hidden".to_string(), t(Dtype::F32, &[rows, 17])),
            ("classifier".to_string(), t(Dtype::F32, &[v, 17])),
            ("targets".to_string(), t(Dtype::I32, &[rows])),
        ];
        let mut g = compiler::entry::function(mods, &db, find("linear_cross_entropy"), &args, true).unwrap();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        differential(&g, &format!("linear_cross_entropy [{rows}, 17] x [{v}, 17]"));
        let args = vec![
            ("x".to_string(), t(Dtype::F32, &[rows, v])),
            ("gain".to_string(), t(Dtype::F32, &[v])),
            ("bias".to_string(), t(Dtype::F32, &[v])),
        ];
        let mut g = compiler::entry::function(mods, &db, find("layer_norm"), &args, false).unwrap();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        differential(&g, &format!("layer_norm [{rows}, {v}]"));
    }
}

/// Every function, loss and rule of the valid case files.
#[test]
fn case_files_match_the_interpreter() {
    let dir = tests::root().join("tests/compile/valid");
    let mut ran = 0;
    for path in tests::recipe_files(&dir) {
        let rel = path.strip_prefix(tests::root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut db = SourceDb::new();
        let root = db.add(rel.clone(), text);
        let analysis = lang::analyze(&mut db, &[root], &tests::RepoLoader);
        let mods = &analysis.modules;
        for (i, item) in mods.list[0].ast.items.iter().enumerate() {
            let r = ItemRef { module: 0, item: i };
            let (params, rule_param) = match &item.kind {
                ItemKind::Fn(f) => (f.params.clone(), None),
                ItemKind::Rule(rd) => (
                    rd.params.iter().filter(|p| p.name.name != "param").cloned().collect(),
                    rd.params.iter().find(|p| p.name.name == "param").cloned(),
                ),
                _ => continue,
            };
            let args = auto_args(&params);
            let param_shape = match rule_param.and_then(|p| auto_args(&[p]).pop()) {
                Some((_, Arg::Tensor(_, s))) => s,
                _ => vec![4, 8],
            };
            let grads = matches!(&item.kind, ItemKind::Fn(f) if f.kind == FnKind::Loss);
            let Some(g) = tests::item_graph(mods, &db, r, &args, grads, (param_shape.clone(), param_shape)) else {
                continue;
            };
            let Ok(mut g) = g else { continue };
            compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
            let name = item.name().map(|n| n.name.clone()).unwrap_or_default();
            differential(&g, &format!("{rel}: {name}"));
            ran += 1;
        }
    }
    assert!(ran >= 60, "only {ran} case items ran");
}

/// Runs `blocked` (interpreter and Cranelift) against `reference` on the interpreter. Block
/// results combine in a different order than one long sum, so values are compared at
/// |a - b| ≤ 1e-5 + 1e-4·|b|.
fn compare_blocked(reference: &Graph, blocked: &Graph, what: &str) {
    for b in backends() {
        compare_blocked_on(reference, blocked, &format!("{what} [{b:?}]"), b);
    }
}

fn compare_blocked_on(reference: &Graph, blocked: &Graph, what: &str, backend: Backend) {
    let p = compiler::kernel::schedule(blocked).unwrap_or_else(|e| panic!("{what}: schedule: {e}"));
    p.verify().unwrap_or_else(|e| panic!("{what}: plan: {e}"));
    let exe = runtime::compile_program(p, backend).unwrap_or_else(|e| panic!("{what}: codegen: {e}"));
    for seed in [3u64, 4] {
        let ins = inputs(reference, seed);
        let want = interp::run(reference, &ins, seed).unwrap();
        let by_interp: Vec<(String, Tensor)> = interp::run(blocked, &ins, seed).unwrap().into_iter().collect();
        let by_code = runtime::run_tensors_on(&exe, &ins, seed).unwrap_or_else(|e| panic!("{what}: {e}"));
        if let Some(emu) = exe.emulator() {
            same_bits_with_blocks_reversed(emu, &ins, seed, &by_code, what);
        }
        for (how, got) in [("interpreter", by_interp), ("generated code", by_code)] {
            for (name, t) in got {
                let w = &want[&name];
                assert_eq!((t.dtype, &t.shape), (w.dtype, &w.shape), "{what}: `{name}`");
                for (i, (a, b)) in t.data.iter().zip(&w.data).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 + 1e-4 * b.abs() || (a.is_nan() && b.is_nan()),
                        "{what}: blocked on the {how}, `{name}`[{i}] = {a}, unblocked {b}"
                    );
                }
            }
        }
    }
}

fn dce(g: &mut Graph) {
    let pass = compiler::passes::PIPELINE.iter().find(|p| p.name == "eliminate-dead-code").unwrap();
    (pass.run)(g).unwrap();
}

/// The blocked linear cross-entropy (forward and backward) equals the unblocked one, at
/// awkward block widths (the last block narrower), and no `[N, V]` value remains.
#[test]
fn blocked_linear_cross_entropy_matches() {
    for ((n, d, v, cols), recompute) in [
        (3usize, 5usize, 17usize, 4usize),
        (8, 4, 32, 10),
        (17, 3, 1000, 7),
        (5, 17, 4099, 1000),
        (1, 2, 3, 1),
        (600, 3, 50, 16),
    ]
    .into_iter()
    .flat_map(|c| [(c, false), (c, true)])
    {
        let g = linear_cross_entropy_graph(n, d, v);
        let mut blocked = g.clone();
        let opts = compiler::block::BlockOptions {
            min_bytes: 0,
            block_bytes: 0,
            cols: Some(cols),
            recompute_columns: recompute,
        };
        let r = compiler::block::run(&mut blocked, &opts).unwrap();
        dce(&mut blocked);
        blocked.verify().unwrap();
        let how = if recompute { ", the classifier's gradient recomputed" } else { "" };
        let what = format!("linear_cross_entropy N={n} D={d} V={v} in blocks of {cols}{how}");
        assert_eq!(r.changed, 1, "{what}: expected one blocked matmul\n{g}");
        // Two passes over the blocks (online log-sum-exp; then the gradients): one matmul for
        // the statistics, and one recomputation plus two gradient products per block; or,
        // recomputing the classifier's gradient, one gradient product per block and a
        // transposed recomputation plus a product per chunk of rows.
        let blocks = v.div_ceil(cols);
        let chunks = n.div_ceil(compiler::block::chunk_rows(4));
        let matmuls = blocked.topo().iter().filter(|x| blocked.node(**x).op == Op::MatMul).count();
        assert_eq!(matmuls, if recompute { 3 * blocks + 2 * chunks } else { 4 * blocks }, "{what}");
        // Views such as the column index may keep the shape; no buffer may.
        let p = compiler::kernel::schedule(&blocked).unwrap();
        for b in &p.buffers {
            assert!(b.shape != [n, v] || b.born.is_none(), "{what}: an [N, V] buffer remains:\n{}", p.text());
        }
        compare_blocked(&g, &blocked, &what);
    }
}

/// The stdlib's `linear_cross_entropy` with its gradients at `[n, d]` hidden states and `v`
/// classes, after the pass pipeline (blocked only where the default options block it).
fn linear_cross_entropy_graph(n: usize, d: usize, v: usize) -> Graph {
    linear_cross_entropy_graph_of(Dtype::F32, n, d, v)
}

/// The same at `dtype` (f16/bf16: the classifier product in 16 bits, the loss in f32, as a
/// user writes it: `cross_entropy(f32(hidden @ classifier^T), targets)`).
fn linear_cross_entropy_graph_of(dtype: Dtype, n: usize, d: usize, v: usize) -> Graph {
    linear_cross_entropy_graph_for(dtype, n, d, v, compiler::passes::Target::Cpu)
}

/// [`linear_cross_entropy_graph_of`] after the pipeline for `target`.
fn linear_cross_entropy_graph_for(
    dtype: Dtype,
    n: usize,
    d: usize,
    v: usize,
    target: compiler::passes::Target,
) -> Graph {
    let loader = stdlib_loader();
    let mut db = SourceDb::new();
    let (root, m, name) = if dtype == Dtype::F32 {
        (db.add("<lce>", "use std.loss.linear_cross_entropy\n"), None, "linear_cross_entropy")
    } else {
        let dt = Dtype::name(dtype);
        let src = format!(
            "use std.loss.cross_entropy\n\npub loss lce(hidden: {dt}[N, D], classifier: {dt}[V, D], targets: i32[N]) -> f32 {{\n    cross_entropy(f32(hidden @ classifier^T), targets)\n}}\n"
        );
        (db.add("<lce>", src), Some(0), "lce")
    };
    let analysis = lang::analyze(&mut db, &[root], &loader);
    assert!(analysis.diagnostics.iter().all(|d| !d.is_error()), "{:?}", analysis.diagnostics);
    let mods = &analysis.modules;
    let m = m.unwrap_or_else(|| mods.list.iter().position(|m| m.items.contains_key(name) && m.file != root).unwrap());
    let item = ItemRef { module: m, item: mods.list[m].items[name] };
    let t = |dt: Dtype, s: &[usize]| Arg::Tensor(dt, s.to_vec());
    let args = vec![
        ("hidden".to_string(), t(dtype, &[n, d])),
        ("classifier".to_string(), t(dtype, &[v, d])),
        ("targets".to_string(), t(Dtype::I32, &[n])),
    ];
    let mut g = compiler::entry::function(mods, &db, item, &args, true).unwrap();
    compiler::passes::run_pipeline_for(&mut g, None, &mut vec![], target).unwrap();
    g
}

/// On the CUDA target the default pipeline keeps nothing of a blocked linear cross-entropy
/// in memory but its gradients and row statistics, whatever N is: blocks are at most
/// `chunk_rows` columns wide there, so row fusion takes each of them (at N = 1024 the 8 MiB
/// default width would be 4,096 columns, too wide to keep on chip). Plans only.
#[test]
fn the_cuda_target_keeps_no_block_of_a_linear_cross_entropy() {
    for (dtype, n, d, v) in
        [(Dtype::BF16, 1024usize, 16usize, 16384usize), (Dtype::F32, 1024, 16, 8192), (Dtype::BF16, 8192, 16, 2400)]
    {
        let what = format!("{dtype} linear_cross_entropy N={n} D={d} V={v} for CUDA");
        let g = linear_cross_entropy_graph_for(dtype, n, d, v, compiler::passes::Target::Cuda);
        let p = compiler::kernel::schedule(&g).unwrap();
        p.verify().unwrap();
        assert!(!p.row_groups.is_empty(), "{what}: not blocked");
        for b in p.buffers.iter().filter(|b| b.kind == compiler::kernel::BufKind::Temp && b.born.is_some()) {
            assert!(b.shape.len() < 2 || b.shape[1] == d || b.shape[1] == 1, "{what}: {b:?} stored:\n{}", p.report());
        }
        // The CPU's plan of the same loss keeps a block of the logits' gradient.
        let cpu = compiler::kernel::schedule(&linear_cross_entropy_graph_of(dtype, n, d, v)).unwrap();
        assert!(cpu.arena_bytes > p.arena_bytes, "{what}: {} on the CPU, {} for CUDA", cpu.arena_bytes, p.arena_bytes);
    }
}

/// In bf16 and f16 the blocked linear cross-entropy runs its products as matmul kernels
/// (strided operands, gradient blocks written into their place in the classifier's gradient,
/// the hidden gradient accumulated in place), not as library calls on copied operands: at
/// the Gemma 2 2B setting the library form kept 2.7 GiB (every block's transposed classifier
/// slice and gradient part) where this keeps 16 MiB. Its values match the unblocked loss on
/// every backend within 16-bit rounding: each block's gradient product is rounded to the
/// dtype before the next is added (as the Cut Cross-Entropy kernels do without Kahan
/// summation; recomputing the classifier's gradient, each chunk of rows' product too), so
/// gradients are compared at 2⁻⁵ of the tensor's largest magnitude, the loss (f32) at 1e-3
/// relative.
#[test]
fn half_precision_linear_cross_entropy_blocks_through_matmul_kernels() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        for (n, d, v, cols, recompute) in
            [(17usize, 8usize, 1000usize, 64usize, false), (5, 17, 300, 32, false), (1200, 8, 100, 32, true)]
        {
            let how = if recompute { ", the classifier's gradient recomputed in 3 chunks of rows" } else { "" };
            let what = format!("{dtype} linear_cross_entropy N={n} D={d} V={v} in blocks of {cols}{how}");
            let g = linear_cross_entropy_graph_of(dtype, n, d, v);
            let (_, p) = blocked_linear_cross_entropy_with(dtype, n, d, v, cols, recompute);
            let library_matmuls =
                p.kernels.iter().filter(|k| matches!(k, Kernel::Library { node, .. } if node.op == Op::MatMul)).count();
            assert_eq!(library_matmuls, 0, "{what}:\n{}", p.text());
            let live = p.live_at(p.peak_at);
            let parts = live.iter().filter(|b| b.shape == [cols, d] || b.shape == [d, cols]).count();
            assert!(parts <= 1, "{what}: {parts} classifier blocks live at the peak:\n{}", p.report());
            // Every block runs the same few CUDA functions, each launch with its own table
            // (the block's buffers, operand offsets and first column).
            let unit = codegen_cuda::emit(&p).unwrap();
            let functions: std::collections::BTreeSet<&str> =
                unit.launches.iter().filter(|l| l.runs_code()).map(|l| l.name.as_str()).collect();
            assert!(unit.launches.len() >= 8 * v.div_ceil(cols), "{what}: {} launches", unit.launches.len());
            assert!(functions.len() <= 30, "{what}: {} functions:\n{}", functions.len(), unit.launch_table());
            for b in &p.buffers {
                assert!(b.shape != [n, v] || b.born.is_none(), "{what}: an [N, V] buffer remains");
                // The widening `f32(...)` of a block is recomputed by its readers, not copied.
                assert!(b.dtype != Dtype::F32 || b.shape != [n, cols], "{what}: an f32 copy of a block:\n{}", p.text());
            }
            for backend in backends() {
                let exe = runtime::compile_program(p.clone(), backend).unwrap();
                for seed in [3u64, 4] {
                    let ins = inputs(&g, seed);
                    let want = interp::run(&g, &ins, seed).unwrap();
                    for (name, t) in runtime::run_tensors_on(&exe, &ins, seed).unwrap() {
                        let w = &want[&name];
                        let scale = w.data.iter().fold(0f64, |a, x| a.max(x.abs()));
                        let tol = if t.dtype == Dtype::F32 { 1e-3 * scale } else { scale / 32.0 };
                        for (i, (a, b)) in t.data.iter().zip(&w.data).enumerate() {
                            assert!((a - b).abs() <= tol, "{what} [{backend:?}]: `{name}`[{i}] = {a}, unblocked {b}");
                        }
                    }
                }
            }
        }
    }
}

/// The linear cross-entropy at `dtype` blocked in `cols` columns, and its program.
fn blocked_linear_cross_entropy(dtype: Dtype, n: usize, d: usize, v: usize, cols: usize) -> (Graph, Program) {
    blocked_linear_cross_entropy_with(dtype, n, d, v, cols, false)
}

/// [`blocked_linear_cross_entropy`], the classifier's gradient recomputed in transposed row
/// chunks where `recompute` (`BlockOptions::recompute_columns`, the CUDA target's form).
fn blocked_linear_cross_entropy_with(
    dtype: Dtype,
    n: usize,
    d: usize,
    v: usize,
    cols: usize,
    recompute: bool,
) -> (Graph, Program) {
    let mut g = linear_cross_entropy_graph_of(dtype, n, d, v);
    let opts =
        compiler::block::BlockOptions { min_bytes: 0, block_bytes: 0, cols: Some(cols), recompute_columns: recompute };
    assert_eq!(compiler::block::run(&mut g, &opts).unwrap().changed, 1, "{dtype} N={n} D={d} V={v} cols={cols}");
    dce(&mut g);
    let p = compiler::kernel::schedule(&g).unwrap();
    p.verify().unwrap();
    (g, p)
}

/// Row fusion (`compiler::kernel::find_row_groups`): in the blocked linear cross-entropy
/// every product block `hidden @ classifier_b^T` is computed strip by strip of rows inside the
/// kernel that consumes it (statistics pass and gradient pass), so no block of logits is
/// stored, and the fused program gives the unfused program's bits on every backend: the CPU
/// runs the same loops per strip of rows over a strip of the product in a scratch buffer,
/// the CUDA kernel sums each product element in the unfused matmul's order (FMA tiles, or
/// the tensor cores where the unfused kernel uses them) and reduces each row in the unfused
/// reduction's order. The shapes cover several strips with a partial last one (on the CPU
/// with 16 K-element strips: 16 rows at 640 columns; on CUDA: 16 to 64 rows), a last block
/// under a warp's width, bf16 on the tensor cores, 8-column blocks whose smallest CPU strips
/// `gemm` would sum in another order (`runtime::strip_least_rows` keeps them large enough),
/// and the CUDA target's form (the classifier's gradient recomputed; every gradient block a
/// strip on chip, several chunks of rows in f32 and bf16).
#[test]
fn row_fused_products_are_never_stored_and_give_the_unfused_bits() {
    for (dtype, n, d, v, cols, recompute) in [
        (Dtype::F32, 200usize, 24usize, 1300usize, 640usize, false),
        (Dtype::F32, 17, 8, 1000, 64, false),
        (Dtype::F32, 100, 12, 64, 8, false),
        (Dtype::F32, 60, 12, 64, 8, false),
        (Dtype::BF16, 100, 24, 300, 64, false),
        (Dtype::BF16, 70, 16, 700, 640, false),
        (Dtype::F32, 300, 8, 210, 64, true),
        (Dtype::BF16, 600, 16, 130, 64, true),
        (Dtype::BF16, 100, 72, 300, 128, true),
    ] {
        let how = if recompute { ", the classifier's gradient recomputed" } else { "" };
        let what = format!("{dtype} linear_cross_entropy N={n} D={d} V={v} in blocks of {cols}{how}");
        let (g, fused) = blocked_linear_cross_entropy_with(dtype, n, d, v, cols, recompute);
        let plain =
            compiler::kernel::schedule_with(&g, &compiler::kernel::ScheduleOptions { fuse_rows: false }).unwrap();
        plain.verify().unwrap();
        assert!(plain.row_groups.is_empty());
        // Every logits block (`[N, w]` = hidden `[N, D]` times a classifier block) is a
        // row-fused group's tile: two per block (statistics, then gradients).
        let blocks = v.div_ceil(cols);
        let logits: Vec<usize> = fused
            .kernels
            .iter()
            .enumerate()
            .filter(|(_, k)| matches!(k, Kernel::MatMul { m, k, .. } if *m == n && *k == d))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(logits.len(), 2 * blocks, "{what}:\n{}", fused.text());
        // Recomputing the classifier's gradient, each chunk of rows has its transposed
        // product `[V, R]`, and no gradient block is stored: the only two-dimensional
        // buffers in memory are the gradients (`[N, D]`, `[V, D]`) and row statistics.
        let transposed: Vec<usize> = (0..fused.kernels.len())
            .filter(|i| matches!(&fused.kernels[*i], Kernel::MatMul { m, k, .. } if *m == v && *k == d))
            .collect();
        let chunks = n.div_ceil(compiler::block::chunk_rows(compiler::plan::dtype_bytes(dtype)));
        assert_eq!(transposed.len(), if recompute { chunks } else { 0 }, "{what}:\n{}", fused.text());
        if recompute {
            for b in fused.buffers.iter().filter(|b| b.kind == compiler::kernel::BufKind::Temp && b.born.is_some()) {
                assert!(
                    b.shape.len() < 2 || b.shape[1] == d || b.shape[1] == 1,
                    "{what}: {b:?} stored:\n{}",
                    fused.text()
                );
            }
            assert!(fused.row_groups.iter().all(|gr| gr.strips.len() == 1 || gr.end - gr.start == 5), "{what}");
        }
        for i in logits.iter().chain(&transposed) {
            let grp = fused.row_groups.iter().find(|gr| gr.start == *i);
            let grp = grp.unwrap_or_else(|| panic!("{what}: the product of k{i} is stored:\n{}", fused.text()));
            assert_eq!(fused.buffers[grp.tile].kind, compiler::kernel::BufKind::Tile);
            assert!(fused.live_at(grp.start).iter().all(|b| b.node != fused.buffers[grp.tile].node));
        }
        assert!(fused.peak_bytes <= plain.peak_bytes, "{what}: {} vs {}", fused.peak_bytes, plain.peak_bytes);
        let unit = codegen_cuda::emit(&fused).unwrap();
        assert_eq!(unit.launches.iter().filter(|l| l.kind == "fused").count(), fused.row_groups.len());
        same_bits_fused_and_unfused(&g, &fused, &plain, &what);
    }
}

/// The fused program `fused` gives the unfused `plain`'s bits on every backend, the CUDA
/// emulator included (in both block orders), and on the CPU also in strips of 16 K and of
/// 256 elements (many strips, run in parallel; the default runs one strip at these shapes,
/// its matmul and loops split over the threads; the smallest strips are as small as
/// `runtime::strip_least_rows` lets them be).
fn same_bits_fused_and_unfused(g: &Graph, fused: &Program, plain: &Program, what: &str) {
    let mut runners: Vec<(String, Box<dyn Runner + Send + Sync>, Backend)> = vec![];
    for backend in backends() {
        runners.push((format!("{backend:?}"), runtime::compile_program(fused.clone(), backend).unwrap(), backend));
    }
    for elems in [1 << 14, 256] {
        let mut small = Executable::new(fused.clone(), Backend::Cranelift).unwrap();
        small.strip_elems = elems;
        runners.push((format!("Cranelift, {elems}-element strips"), Box::new(small), Backend::Cranelift));
    }
    for (backend, a, on) in &runners {
        let b = runtime::compile_program(plain.clone(), *on).unwrap();
        same_bits_as_unfused(g, &**a, &*b, &format!("{what} [{backend}]"));
    }
}

/// `fused` gives `unfused`'s bits on `g`'s inputs for two seeds (an emulator also with each
/// launch's blocks in reverse order).
fn same_bits_as_unfused(g: &Graph, fused: &dyn Runner, unfused: &dyn Runner, what: &str) {
    for seed in [5u64, 6] {
        let ins = inputs(g, seed);
        let want: std::collections::BTreeMap<String, Tensor> =
            runtime::run_tensors_on(unfused, &ins, seed).unwrap().into_iter().collect();
        let got = runtime::run_tensors_on(fused, &ins, seed).unwrap();
        if let Some(emu) = fused.emulator() {
            same_bits_with_blocks_reversed(emu, &ins, seed, &got, what);
        }
        for (name, t) in got {
            let w = &want[&name];
            for (i, (x, y)) in t.data.iter().zip(&w.data).enumerate() {
                assert!(x.to_bits() == y.to_bits(), "{what}: `{name}`[{i}] = {x} fused, {y} unfused (seed {seed})");
            }
        }
    }
}

/// A row-fused group ends with the matmuls that multiply one of its `[m, n]` values by an
/// outside matrix (`find_row_groups`'s trailing matmuls): `y = h + softmax(x @ w) @ u`
/// (the shape of the hidden state's gradient in the linear cross-entropy, `h` a temporary)
/// is one group, the
/// softmax block is a strip computed on chip beside the product (never stored: nothing else
/// reads it), `y` takes `h`'s memory, and every backend gives the unfused bits — FMA tiles
/// and, in bf16 with both sides of `y` at least 64, the tensor cores; on the CPU a strip has
/// enough rows that `gemm` sums it as it sums the whole product (`runtime::strip_least_rows`:
/// here a `[16, 20]` or `[48, 3]` strip of `y` would sum k in another order).
#[test]
fn a_row_fused_group_multiplies_its_strip_without_storing_it() {
    use compiler::ir::Un;
    for (dtype, m, k, n, d, seen) in [
        (Dtype::F32, 70usize, 12usize, 280usize, 20usize, "FMA"),
        (Dtype::BF16, 70, 12, 540, 20, "FMA"),
        (Dtype::BF16, 100, 24, 64, 72, "tensor cores"),
        (Dtype::BF16, 33, 8, 40, 9, "FMA"),
        (Dtype::F32, 300, 8, 280, 3, "FMA"),
    ] {
        let what = format!("{dtype} h + softmax(x @ w) @ u, m={m} k={k} n={n} d={d} ({seen})");
        let mut g = Graph::new("strip");
        let (y, mx) = tests::softmax_matmul(&mut g, 0, 0, dtype, (m, k, n, d));
        let t = g.add(Op::Unary(Un::Tanh), dtype, vec![m, d], &[y], "t").unwrap();
        g.outputs.push(("t".into(), t));
        g.outputs.push(("max".into(), mx));
        let fused = compiler::kernel::schedule(&g).unwrap();
        fused.verify().unwrap();
        let plain =
            compiler::kernel::schedule_with(&g, &compiler::kernel::ScheduleOptions { fuse_rows: false }).unwrap();
        plain.verify().unwrap();
        let [grp] = fused.row_groups.as_slice() else { panic!("{what}: one group:\n{}", fused.text()) };
        let Kernel::MatMul { out, acc: Some(addend), .. } = &fused.kernels[grp.end - 1] else {
            panic!("{what}: the group ends with y's matmul:\n{}", fused.text())
        };
        assert_eq!(grp.strips.len(), 1, "{what}: the softmax block is a strip:\n{}", fused.text());
        let strip = &fused.buffers[grp.strips[0]];
        assert_eq!((strip.kind.clone(), strip.shape.clone()), (compiler::kernel::BufKind::Tile, vec![m, n]), "{what}");
        assert!(fused.live_at(grp.start).iter().all(|b| b.node != strip.node), "{what}");
        assert_eq!(fused.buffers[*out].reuses, Some(*addend), "{what}: y in h's memory:\n{}", fused.text());
        assert!(fused.peak_bytes < plain.peak_bytes, "{what}: {} vs {}", fused.peak_bytes, plain.peak_bytes);
        let unit = codegen_cuda::emit(&fused).unwrap();
        let runs: Vec<&str> = unit.launches.iter().filter(|l| l.runs_code()).map(|l| l.kind).collect();
        assert!(runs.iter().filter(|k| **k == "fused").count() == 1 && !runs.contains(&"matmul"), "{what}: {runs:?}");
        // (The bf16 product at m = 70, n = 540 is on the tensor cores, its trailing matmul
        // with d = 20 is not.)
        if seen == "tensor cores" {
            assert!(unit.source.contains("rc_mma16816<1>(acc"), "{what}");
        } else if dtype == Dtype::F32 || m < 64 {
            assert!(!unit.source.contains("rc_mma16816<1>(acc"), "{what}");
        }
        same_bits_fused_and_unfused(&g, &fused, &plain, &what);
    }
}

/// Strips in the opt-in shared memory (`codegen_cuda::EmitOptions::row_shared`, the bench's
/// `RECIPEC_CUDA_ROW_SHARED`): a bf16 group 576 columns wide (the widest the CUDA target
/// blocks a cross-entropy) fits 16-row strips in 48 KiB and 64-row strips in dynamic shared
/// memory (147,456 bytes); both give the unfused kernels' bits on the emulator, in both
/// block orders, and on a GPU where there is one.
#[test]
fn row_fused_strips_in_opt_in_shared_memory_give_the_same_bits() {
    let (dtype, m, k, n, d) = (Dtype::BF16, 100usize, 24usize, 576usize, 72usize);
    let mut g = Graph::new("strip");
    let (y, mx) = tests::softmax_matmul(&mut g, 0, 0, dtype, (m, k, n, d));
    g.outputs.push(("y".into(), y));
    g.outputs.push(("max".into(), mx));
    let fused = compiler::kernel::schedule(&g).unwrap();
    let plain = compiler::kernel::schedule_with(&g, &compiler::kernel::ScheduleOptions { fuse_rows: false }).unwrap();
    assert_eq!(fused.row_groups.len(), 1, "{}", fused.text());
    for (row_shared, dynamic) in [(codegen_cuda::ROW_SHARED, 0), (codegen_cuda::OPT_IN_SHARED, 64 * 576 * 2 * 2)] {
        let opts = codegen_cuda::EmitOptions { row_shared };
        let unit = codegen_cuda::emit_with(&fused, &opts).unwrap();
        let launch = unit.launches.iter().find(|l| l.kind == "fused").unwrap();
        assert_eq!(launch.dynamic_shared, dynamic, "{}", unit.launch_table());
        runtime::cuda::check_launches(&unit).unwrap();
        // Each against the same device's unfused kernels (the tensor cores' order within a
        // step of 16 is the hardware's, so a device's bits are its own).
        let mut runners: Vec<(&str, Box<dyn Runner>, Box<dyn Runner>)> = vec![];
        match runtime::cuda_emu::EmuExecutable::with_options(fused.clone(), &opts) {
            Ok(e) => {
                let unfused = runtime::cuda_emu::EmuExecutable::new(plain.clone()).unwrap();
                runners.push(("emulator", Box::new(e), Box::new(unfused)))
            }
            Err(e) if std::env::var("RECIPEC_REQUIRE_CUDA_EMU").as_deref() == Ok("1") => panic!("{e}"),
            Err(e) => eprintln!("the CUDA emulator is skipped: {e}"),
        }
        if runtime::cuda::available().is_ok() {
            let arenas = runtime::Arenas::default();
            let gpu = runtime::cuda::CudaExecutable::with_options(fused.clone(), &arenas, &opts).unwrap();
            let unfused = runtime::cuda::CudaExecutable::new(plain.clone()).unwrap();
            runners.push(("GPU", Box::new(gpu), Box::new(unfused)));
        }
        for (what, r, unfused) in &runners {
            same_bits_as_unfused(&g, &**r, &**unfused, &format!("{row_shared} B of shared memory [{what}]"));
        }
    }
}

/// The memory plan of the blocked linear cross-entropy wastes nothing: the arena is the
/// peak of live bytes (the greedy-by-size placement; first-fit in kernel order left the
/// classifier's gradient above the first pass's blocks, 14 MiB over the peak at the
/// benchmark's size), and no two values live together overlap.
#[test]
fn the_blocked_linear_cross_entropy_arena_is_its_peak() {
    for (n, d, v, cols) in [(64usize, 32usize, 4096usize, 512usize), (256, 64, 8192, 1024), (17, 3, 1000, 7)] {
        let (_, p) = blocked_linear_cross_entropy(Dtype::F32, n, d, v, cols);
        assert_eq!(p.arena_bytes, p.peak_bytes, "N={n} D={d} V={v} cols={cols}:\n{}", p.text());
        // The planner's peak (a sweep over births and deaths) is the most bytes `live_at`
        // any kernel, less the slices handed over in place there.
        let align = |b: usize| b.next_multiple_of(compiler::plan::ALIGN);
        let brute = (0..p.kernels.len())
            .map(|i| {
                // (A trailing matmul of a row-fused group takes its addend's slice at the
                // group's start, and the addend lives to the group's end.)
                p.live_at(i).iter().map(|b| align(b.bytes)).sum::<usize>()
                    - p.buffers
                        .iter()
                        .filter(|b| b.born.is_some_and(|born| born <= i))
                        .filter_map(|b| b.reuses)
                        .filter(|r| i <= p.buffers[*r].dies)
                        .map(|r| align(p.buffers[r].bytes))
                        .sum::<usize>()
            })
            .max()
            .unwrap_or(0);
        assert_eq!(p.peak_bytes, brute, "N={n} D={d} V={v} cols={cols}");
    }
}

/// What the blocked linear cross-entropy keeps besides its blocks does not grow with the
/// number of blocks: 8x the vocabulary (8x the blocks) leaves the same buffers live at the
/// peak (up to a bounded number of row partials), apart from the gradient of the classifier. (Each block once had its own copy of the
/// clamped target index, all alive from the first pass to the second: 31 MiB at the Gemma
/// 2 2B setting.)
#[test]
fn the_blocked_linear_cross_entropy_keeps_nothing_per_block() {
    let live = |v: usize| {
        let (n, d, cols) = (64usize, 8usize, 16usize);
        let (_, p) = blocked_linear_cross_entropy(Dtype::F32, n, d, v, cols);
        let grads = (v * d * 4).next_multiple_of(64);
        let mut live: Vec<(String, usize)> = p
            .live_at(p.peak_at)
            .iter()
            .filter(|b| b.bytes != v * d * 4)
            .map(|b| (format!("{}{:?}", b.dtype, b.shape), b.bytes))
            .collect();
        live.sort();
        (live, p.peak_bytes - grads)
    };
    // Running combinations (`acc + part` chains) are fused up to `MAX_LOADS` reads, so up to
    // that many per-block row partials may be alive: bounded, not proportional to the blocks.
    let slack = compiler::kernel::MAX_LOADS;
    let (small, small_bytes) = live(1024);
    let (big, big_bytes) = live(8192);
    assert!(big.len() <= small.len() + slack, "buffers live at the peak:\n{small:?}\n{big:?}");
    assert!(big_bytes <= small_bytes + slack * 64 * 4, "{big_bytes} vs {small_bytes}");
}

/// An artifact written and loaded back runs exactly as the program it was written from;
/// a damaged one is rejected with a message naming the file.
#[test]
fn artifacts_round_trip_and_reject_damage() {
    let loader = stdlib_loader();
    let mut db = SourceDb::new();
    let root = db.add("<artifact>", "use std.loss.cross_entropy\n");
    let analysis = lang::analyze(&mut db, &[root], &loader);
    let mods = &analysis.modules;
    let m = mods.list.iter().position(|m| m.items.contains_key("cross_entropy") && m.file != root).unwrap();
    let r = ItemRef { module: m, item: mods.list[m].items["cross_entropy"] };
    let args = vec![
        ("logits".to_string(), Arg::Tensor(Dtype::F32, vec![7, 13])),
        ("targets".to_string(), Arg::Tensor(Dtype::I32, vec![7])),
    ];
    let mut g = compiler::entry::function(mods, &db, r, &args, true).unwrap();
    compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
    let p = compiler::kernel::schedule(&g).unwrap();
    let dir = std::env::temp_dir().join(format!("recipec-artifact-{}", std::process::id()));
    runtime::artifact::write(&dir, "<artifact>", std::slice::from_ref(&p)).unwrap();
    let back = runtime::artifact::load(&dir).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].text(), p.text());
    let (a, b) = (
        Executable::new(p, Backend::Cranelift).unwrap(),
        Executable::new(back[0].clone(), Backend::Cranelift).unwrap(),
    );
    let ins = inputs(&g, 9);
    let (x, y) = (a.run_tensors(&ins, 0).unwrap(), b.run_tensors(&ins, 0).unwrap());
    assert_eq!(x, y);
    // Damage: a truncated program file.
    let f = dir.join("cross_entropy.program.json");
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, &text[..text.len() / 2]).unwrap();
    let e = runtime::artifact::load(&dir).unwrap_err();
    assert!(e.0.contains("cross_entropy.program.json") && e.0.contains("damaged"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `exp`, `erf` and `gelu` on f32 have recipec's own definitions (`compiler::math`): the
/// vectorized and scalar generated code give the interpreter's bits, special values included.
#[test]
fn transcendentals_match_the_interpreter_bit_for_bit() {
    use compiler::ir::Un;
    let specials = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -0.0,
        88.7,
        88.73,
        89.0,
        -87.29,
        -87.31,
        -87.34,
        -103.0,
        0.4999999,
        0.5,
        -0.5,
        3.9,
        1e-30,
        -1e30,
    ];
    for n in [1usize, 3, 17, 1000, 4099] {
        let mut g = Graph::new("transcendentals");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![n], &[], "x").unwrap();
        for (name, u) in [("exp", Un::Exp), ("erf", Un::Erf), ("gelu", Un::Gelu)] {
            let y = g.add(Op::Unary(u), Dtype::F32, vec![n], &[x], name).unwrap();
            g.outputs.push((name.to_string(), y));
        }
        let data: Vec<f64> = (0..n)
            .map(|i| if i < specials.len() { specials[i] } else { ((i as f64) * 0.7331).sin() * 12.0 - 1.0 })
            .collect();
        let ins = vec![Tensor::new(Dtype::F32, vec![n], data)];
        let want = interp::run(&g, &ins, 0).unwrap();
        for b in backends() {
            let p = compiler::kernel::schedule(&g).unwrap();
            if n >= 17 && b == Backend::Cranelift {
                let exe = Executable::new(p.clone(), b).unwrap();
                assert!(
                    (0..exe.program.kernels.len()).any(|k| exe.vectorized(k)),
                    "not vectorized:\n{}",
                    exe.program.text()
                );
            }
            // The CUDA code computes f32 exp, erf and gelu by the same operation sequence.
            let exe = runtime::compile_program(p, b).unwrap();
            for (name, t) in runtime::run_tensors_on(&exe, &ins, 0).unwrap() {
                for (i, (a, w)) in t.data.iter().zip(&want[&name].data).enumerate() {
                    let same = (a.is_nan() && w.is_nan()) || a.to_bits() == w.to_bits();
                    assert!(same, "{name}({}) [{b:?}, n = {n}]: {a:e}, interpreter {w:e}", ins[0].data[i]);
                }
            }
        }
    }
}

/// A condition loaded along the vectorized axis (the causal mask of attention): four bytes
/// widened to lane masks give the interpreter's selection at every size, tail included.
#[test]
fn conditions_along_the_vector_axis_match_the_interpreter() {
    for n in [1usize, 3, 8, 17, 1000, 4099] {
        let (f, sh) = (Dtype::F32, vec![3, n]);
        let mut g = Graph::new("masked");
        let m = g.add(Op::Input { index: 0, name: "mask".into() }, Dtype::Bool, sh.clone(), &[], "m").unwrap();
        let x = g.add(Op::Input { index: 1, name: "x".into() }, f, sh.clone(), &[], "x").unwrap();
        let y = g.add(Op::Input { index: 2, name: "y".into() }, f, sh.clone(), &[], "y").unwrap();
        let two = g.add(Op::Const { value: 2.0 }, f, vec![], &[], "c").unwrap();
        let two = g.add(Op::Broadcast, f, sh.clone(), &[two], "c").unwrap();
        let x2 = g.add(Op::Binary(compiler::ir::Bin::Mul), f, sh.clone(), &[x, two], "x2").unwrap();
        let s = g.add(Op::Select, f, sh.clone(), &[m, x2, y], "s").unwrap();
        g.outputs.push(("out".into(), s));
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        differential(&g, &format!("select with a mask [3, {n}]"));
        if n >= 8 {
            assert_select_loop_vectorized(&g, n);
        }
    }
}

/// A one-hot selection by column index (`iota == target`, the gradient of the picked logit in
/// cross-entropy) runs in integer lanes compared four at a time: the interpreter's values at
/// every size, targets outside the row included, and the loop vectorized.
#[test]
fn column_index_compares_match_the_interpreter() {
    use compiler::ir::Bin;
    for n in [1usize, 3, 8, 17, 1000, 4099] {
        let (f, sh) = (Dtype::F32, vec![3, n]);
        let mut g = Graph::new("one_hot");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, f, sh.clone(), &[], "x").unwrap();
        let t = g.add(Op::Input { index: 1, name: "t".into() }, Dtype::I32, vec![3, 1], &[], "t").unwrap();
        let tb = g.add(Op::Broadcast, Dtype::I32, sh.clone(), &[t], "tb").unwrap();
        let col = g.add(Op::Iota { axis: 1 }, Dtype::I32, sh.clone(), &[], "col").unwrap();
        let hit = g.add(Op::Binary(Bin::Eq), Dtype::Bool, sh.clone(), &[col, tb], "hit").unwrap();
        let before = g.add(Op::Binary(Bin::Lt), Dtype::Bool, sh.clone(), &[col, tb], "before").unwrap();
        let zero = g.add(Op::Const { value: 0.0 }, f, vec![], &[], "z").unwrap();
        let zero = g.add(Op::Broadcast, f, sh.clone(), &[zero], "z").unwrap();
        let e = g.add(Op::Unary(compiler::ir::Un::Exp), f, sh.clone(), &[x], "e").unwrap();
        let picked = g.add(Op::Select, f, sh.clone(), &[hit, x, zero], "picked").unwrap();
        let masked = g.add(Op::Select, f, sh.clone(), &[before, e, picked], "masked").unwrap();
        g.outputs.push(("out".into(), masked));
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        // Targets in the row, at its ends, and outside it.
        let targets = [0.0, (n / 2) as f64, (n + 5) as f64];
        for seed in [1u64, 2] {
            let mut ins = inputs(&g, seed);
            ins[1] = Tensor::new(Dtype::I32, vec![3, 1], targets.to_vec());
            let want = interp::run(&g, &ins, 0).unwrap();
            for b in backends() {
                let p = compiler::kernel::schedule(&g).unwrap();
                let exe = runtime::compile_program(p, b).unwrap();
                for (name, got) in runtime::run_tensors_on(&exe, &ins, 0).unwrap() {
                    for (i, (a, w)) in got.data.iter().zip(&want[&name].data).enumerate() {
                        assert!(a.to_bits() == w.to_bits(), "[3, {n}] [{b:?}] `{name}`[{i}]: {a}, interpreter {w}");
                    }
                }
            }
        }
        if n >= 8 {
            assert_select_loop_vectorized(&g, n);
        }
    }
}

/// The `[3, n]` loop of `g` is vectorized by Cranelift.
fn assert_select_loop_vectorized(g: &Graph, n: usize) {
    let p = compiler::kernel::schedule(g).unwrap();
    let exe = Executable::new(p, Backend::Cranelift).unwrap();
    let k = (0..exe.program.kernels.len())
        .find(|k| matches!(&exe.program.kernels[*k], compiler::kernel::Kernel::Loop(l) if l.dims.iter().product::<usize>() == 3 * n))
        .expect("the select loop");
    assert!(exe.vectorized(k), "[3, {n}] is not vectorized:\n{}", exe.program.text());
}

/// The index kernels (`gather`, `scatter_add`, `take`, `take_add`, `pad`, `concat`,
/// `argmax`/`argmin`) have device code (no host round trip in the CUDA unit) and give the
/// interpreter's bits on every backend: clamped indices (negative, past the end), repeated
/// rows added in the interpreter's order (more than one block's list of 256 in `take_add`),
/// ties and NaN in the arg-reductions, awkward sizes.
#[test]
fn index_kernels_run_on_the_device_and_match_the_interpreter_bit_for_bit() {
    use compiler::ir::Red;
    let input = |g: &mut Graph, i: usize, name: &str, d: Dtype, shape: Vec<usize>| {
        g.add(Op::Input { index: i, name: name.into() }, d, shape, &[], name).unwrap()
    };
    let mut cases: Vec<(Graph, Vec<Tensor>)> = vec![];
    // Values: distinct, not exactly summable in f32 (so the order of the adds shows).
    let vals = |n: usize, salt: f64| -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + salt) * 0.618_033_988_7).sin() * 3.0 + 1e-3 * i as f64).collect()
    };
    // Indices with clamping: -2, past the end, and a skew towards row 1.
    let idx = |n: usize, extent: usize| -> Vec<f64> {
        (0..n)
            .map(|i| match i % 7 {
                0 => -2.0,
                1 => (extent + 3) as f64,
                2 | 3 => 1.0,
                _ => ((i * 31) % extent.max(1)) as f64,
            })
            .collect()
    };
    for (rows, cols, p) in [(1usize, 1usize, 1usize), (3, 17, 5), (17, 3, 1000), (5, 300, 4099)] {
        // Embedding lookup and its gradient: x [rows, cols], idx [p] (and [1, p]).
        let mut g = Graph::new("take");
        let x = input(&mut g, 0, "x", Dtype::F32, vec![rows, cols]);
        let i = input(&mut g, 1, "i", Dtype::I32, vec![1, p]);
        let v = input(&mut g, 2, "v", Dtype::F32, vec![1, p, cols]);
        let t = g.add(Op::Take { axis: 0 }, Dtype::F32, vec![1, p, cols], &[x, i], "t").unwrap();
        let ta = g.add(Op::TakeAdd { axis: 0 }, Dtype::F32, vec![rows, cols], &[x, i, v], "ta").unwrap();
        let i2 = input(&mut g, 3, "i2", Dtype::I64, vec![3]);
        let t1 = g.add(Op::Take { axis: 1 }, Dtype::F32, vec![rows, 3], &[x, i2], "t1").unwrap();
        g.outputs.extend([("t".into(), t), ("ta".into(), ta), ("t1".into(), t1)]);
        let ins = vec![
            Tensor::new(Dtype::F32, vec![rows, cols], vals(rows * cols, 0.5)),
            Tensor::new(Dtype::I32, vec![1, p], idx(p, rows)),
            // Row 1 gets +1e20, -1e20 and small values in turn: even a double sum of them
            // depends on the order of the adds.
            Tensor::new(
                Dtype::F32,
                vec![1, p, cols],
                vals(p * cols, 2.0)
                    .iter()
                    .enumerate()
                    .map(|(k, x)| match (k / cols) % 7 {
                        2 => 1e20,
                        3 => -1e20,
                        _ => *x,
                    })
                    .collect(),
            ),
            Tensor::new(Dtype::I64, vec![3], idx(3, cols)),
        ];
        cases.push((g, ins));
        // take_along_axis and its transpose (the target logit of cross-entropy), pad, concat.
        let mut g = Graph::new("gather");
        let x = input(&mut g, 0, "x", Dtype::F32, vec![rows, cols]);
        let i = input(&mut g, 1, "i", Dtype::I32, vec![rows, 2]);
        let v = input(&mut g, 2, "v", Dtype::F32, vec![rows, 2]);
        let ga = g.add(Op::Gather { axis: 1 }, Dtype::F32, vec![rows, 2], &[x, i], "ga").unwrap();
        let sa = g.add(Op::ScatterAdd { axis: 1 }, Dtype::F32, vec![rows, cols], &[x, i, v], "sa").unwrap();
        let pa = g.add(Op::Pad { axis: 1, start: 2 }, Dtype::F32, vec![rows, cols + 5], &[x], "pa").unwrap();
        let y = input(&mut g, 3, "y", Dtype::F32, vec![rows, 1]);
        let ca = g.add(Op::Concat { axis: 1 }, Dtype::F32, vec![rows, 2 * cols + 1], &[x, y, x], "ca").unwrap();
        g.outputs.extend([("ga".into(), ga), ("sa".into(), sa), ("pa".into(), pa), ("ca".into(), ca)]);
        let ins = vec![
            Tensor::new(Dtype::F32, vec![rows, cols], vals(rows * cols, 0.25)),
            Tensor::new(Dtype::I32, vec![rows, 2], idx(rows * 2, cols)),
            Tensor::new(Dtype::F32, vec![rows, 2], vals(rows * 2, 7.0)),
            Tensor::new(Dtype::F32, vec![rows, 1], vals(rows, 9.0)),
        ];
        cases.push((g, ins));
        // Greedy decoding's argmax (ties, NaN) and an argmin over two axes.
        let mut g = Graph::new("argmax");
        let x = input(&mut g, 0, "x", Dtype::F32, vec![rows, 2, cols]);
        let am = g.add(Op::Reduce { op: Red::ArgMax, axes: vec![2] }, Dtype::I32, vec![rows, 2], &[x], "am").unwrap();
        let an = g.add(Op::Reduce { op: Red::ArgMin, axes: vec![0, 2] }, Dtype::I32, vec![2], &[x], "an").unwrap();
        g.outputs.extend([("am".into(), am), ("an".into(), an)]);
        let mut data: Vec<f64> = (0..rows * 2 * cols).map(|i| ((i * 7) % 5) as f64).collect();
        if data.len() > 4 {
            data[3] = f64::NAN;
        }
        cases.push((g, vec![Tensor::new(Dtype::F32, vec![rows, 2, cols], data)]));
    }
    for (g, ins) in &cases {
        let p = compiler::kernel::schedule(g).unwrap();
        let unit = codegen_cuda::emit(&p).unwrap();
        assert!(
            unit.launches.iter().all(|l| l.kind != "host") && unit.launches.iter().any(|l| l.kind == "index"),
            "{}: a kernel left on the host:\n{}",
            g.name,
            unit.launch_table()
        );
        let want = interp::run(g, ins, 0).unwrap();
        for b in backends() {
            let exe = runtime::compile_program(p.clone(), b).unwrap();
            for (name, t) in runtime::run_tensors_on(&exe, ins, 0).unwrap() {
                let w = &want[&name];
                assert_eq!(t.shape, w.shape, "{name} [{b:?}]");
                for (k, (a, e)) in t.data.iter().zip(&w.data).enumerate() {
                    assert!(
                        a.to_bits() == e.to_bits(),
                        "{} `{name}` element {k} [{b:?}, shape {:?}]: {a}, interpreter {e}",
                        g.name,
                        w.shape
                    );
                }
            }
        }
    }
}

/// f16 and bf16 matmuls are matmul kernels on every backend (operands widened to f32, f32
/// accumulation, one rounding at the store: the CPU through the f32 `gemm`, CUDA through the
/// f32 tiles with 16-bit loads) where the interpreter sums in f64: the results agree to one
/// unit in the last place of the 16-bit format plus the f32 sum's error bound
/// k·2⁻²⁴·Σ|x||w|, and nearly all of them exactly. Both CUDA tile kernels, with a batch.
#[test]
fn half_precision_matmuls_match_the_interpreter() {
    for b in backends() {
        for dtype in [Dtype::BF16, Dtype::F16] {
            for (batch, m, k, n) in [(1usize, 3usize, 17usize, 5usize), (2, 70, 33, 65)] {
                let mut g = Graph::new("half_matmul");
                let x = g.add(Op::Input { index: 0, name: "x".into() }, dtype, vec![batch, m, k], &[], "x").unwrap();
                let w = g.add(Op::Input { index: 1, name: "w".into() }, dtype, vec![batch, k, n], &[], "w").unwrap();
                let y = g.add(Op::MatMul, dtype, vec![batch, m, n], &[x, w], "y").unwrap();
                g.outputs.push(("y".into(), y));
                let p = compiler::kernel::schedule(&g).unwrap();
                let unit = codegen_cuda::emit(&p).unwrap();
                // Both output sides ≥ 64: the tensor-core tiles; else the f32 FMA tiles.
                let want = if m >= 64 && n >= 64 { "mma" } else { "matmul" };
                assert!(unit.launches.iter().all(|l| l.kind == want), "{}", unit.launch_table());
                let ins = inputs(&g, 3);
                let want = interp::run(&g, &ins, 3).unwrap();
                let exe = runtime::compile_program(p, b).unwrap();
                let got = runtime::run_tensors_on(&exe, &ins, 3).unwrap();
                let (w, t) = (&want["y"], &got[0].1);
                let ulp = if dtype == Dtype::BF16 { 2f64.powi(-7) } else { 2f64.powi(-10) };
                let mut exact = 0;
                for (i, (a, e)) in t.data.iter().zip(&w.data).enumerate() {
                    // The f32 sum's error bound: k·2⁻²⁴·Σ|x||w| (large where terms cancel).
                    let (bi, r, c) = (i / (m * n), (i / n) % m, i % n);
                    let abs: f64 = (0..k)
                        .map(|l| (ins[0].data[(bi * m + r) * k + l] * ins[1].data[(bi * k + l) * n + c]).abs())
                        .sum();
                    let tol = ulp * e.abs() + k as f64 * 2f64.powi(-24) * abs;
                    assert!((a - e).abs() <= tol, "{dtype} y[{i}] ({batch}x{m}x{k}x{n}): {a}, interpreter {e}");
                    exact += (a == e) as usize;
                }
                assert!(exact * 100 >= t.data.len() * 95, "{dtype}: only {exact} of {} exact", t.data.len());
            }
        }
    }
}

/// Elementwise loops over f32 buffers at the flat index read and write them 128 bits at a
/// time on the device (four points per thread, `float4`), with scalar, bool and strided
/// reads beside them and the points past the last multiple of four one per thread: bit for
/// bit the interpreter's values, at lengths with and without that tail.
#[test]
fn elementwise_loops_use_128_bit_accesses_and_match_the_interpreter() {
    use compiler::ir::Bin;
    for n in [1024usize, 4099, 5002] {
        let mut g = Graph::new("vector");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![n], &[], "x").unwrap();
        let y = g.add(Op::Input { index: 1, name: "y".into() }, Dtype::F32, vec![n], &[], "y").unwrap();
        let s = g.add(Op::Input { index: 2, name: "s".into() }, Dtype::F32, vec![], &[], "s").unwrap();
        let h = g.add(Op::Input { index: 3, name: "h".into() }, Dtype::BF16, vec![n], &[], "h").unwrap();
        let sb = g.add(Op::Broadcast, Dtype::F32, vec![n], &[s], "sb").unwrap();
        let xy = g.add(Op::Binary(Bin::Mul), Dtype::F32, vec![n], &[x, y], "xy").unwrap();
        let hf = g.add(Op::Cast, Dtype::F32, vec![n], &[h], "hf").unwrap();
        let a = g.add(Op::Binary(Bin::Add), Dtype::F32, vec![n], &[xy, sb], "a").unwrap();
        let b = g.add(Op::Binary(Bin::Sub), Dtype::F32, vec![n], &[a, hf], "b").unwrap();
        let c = g.add(Op::Binary(Bin::Div), Dtype::F32, vec![n], &[x, sb], "c").unwrap();
        let ch = g.add(Op::Cast, Dtype::BF16, vec![n], &[c], "ch").unwrap();
        g.outputs.extend([("b".into(), b), ("c".into(), ch)]);
        let p = compiler::kernel::schedule(&g).unwrap();
        let unit = codegen_cuda::emit(&p).unwrap();
        assert!(
            unit.source.contains("((const float4*)bufs[") && unit.source.contains("make_float4("),
            "{}",
            unit.source
        );
        assert_eq!(unit.source.contains("i0 = 4096LL"), n == 4099, "the tail loop");
        for backend in backends().into_iter().filter(|b| is_cuda(*b)) {
            differential_on(&g, &format!("vector loop n={n} [{backend:?}]"), backend);
        }
    }
}

/// `uniform` and `normal` samples have device code: the CUDA kernels draw the interpreter's
/// numbers (Philox on the same counters, the run's seed from the kernel table): uniform bit
/// for bit, normal within the f64 `log`/`cos` ulp bounds of CUDA's libm (exact on the
/// emulator, which uses the host's), then rounded to the dtype (so f32 within one ulp).
#[test]
fn random_samples_on_the_device_match_the_interpreter() {
    for b in backends() {
        let mut g = Graph::new("rng");
        let u = g.add(Op::Uniform { stream: 7 }, Dtype::F32, vec![4099], &[], "u").unwrap();
        let n = g.add(Op::Normal { stream: 1 << 40 }, Dtype::F32, vec![17, 59], &[], "n").unwrap();
        let d = g.add(Op::Normal { stream: 3 }, Dtype::F64, vec![1000], &[], "d").unwrap();
        g.outputs.extend([("u".into(), u), ("n".into(), n), ("d".into(), d)]);
        let p = compiler::kernel::schedule(&g).unwrap();
        if is_cuda(b) {
            let unit = codegen_cuda::emit(&p).unwrap();
            assert!(unit.launches.iter().all(|l| l.kind == "index"), "{}", unit.launch_table());
        }
        let exe = runtime::compile_program(p, b).unwrap();
        for seed in [0u64, 5, u64::MAX - 2] {
            let want = interp::run(&g, &[], seed).unwrap();
            for (name, t) in runtime::run_tensors_on(&exe, &[], seed).unwrap() {
                let w = &want[&name];
                for (i, (a, e)) in t.data.iter().zip(&w.data).enumerate() {
                    let ok = match name.as_str() {
                        "u" => a.to_bits() == e.to_bits(),
                        "n" => (a - e).abs() <= f64::from(f32::EPSILON) * e.abs(),
                        _ => (a - e).abs() <= 4.0 * f64::EPSILON * e.abs(),
                    };
                    assert!(ok, "`{name}`[{i}] [{b:?}, seed {seed}]: {a:e}, interpreter {e:e}");
                }
            }
        }
    }
}

/// Row reductions over per-element work (the log-sum-exp's `sum(exp(x - shift))`, the
/// one-hot pick `sum(where(col == t, x, 0))`, max, min, a product) and a column sum run their
/// jammed outputs as vector lanes on Cranelift, each lane with its own f64 accumulator in the
/// interpreter's order: bit for bit the interpreter's, with NaN, infinities and signed zeros
/// in the data, at awkward sizes (the jam's tail included).
#[test]
fn jammed_reductions_run_as_lanes_and_match_the_interpreter() {
    use compiler::ir::{Bin, Red, Un};
    for (rows, cols) in [(4usize, 1usize), (5, 3), (17, 17), (1000, 3), (7, 4099), (4099, 17)] {
        let (f, sh) = (Dtype::F32, vec![rows, cols]);
        let mut g = Graph::new("jammed");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, f, sh.clone(), &[], "x").unwrap();
        let m = g.add(Op::Input { index: 1, name: "m".into() }, f, vec![rows, 1], &[], "m").unwrap();
        let t = g.add(Op::Input { index: 2, name: "t".into() }, Dtype::I32, vec![rows, 1], &[], "t").unwrap();
        let mb = g.add(Op::Broadcast, f, sh.clone(), &[m], "mb").unwrap();
        let d = g.add(Op::Binary(Bin::Sub), f, sh.clone(), &[x, mb], "d").unwrap();
        let e = g.add(Op::Unary(Un::Exp), f, sh.clone(), &[d], "e").unwrap();
        let red = |g: &mut Graph, op: Red, v, axis: usize, name: &str| {
            let shape = if axis == 1 { vec![rows] } else { vec![cols] };
            g.add(Op::Reduce { op, axes: vec![axis] }, f, shape, &[v], name).unwrap()
        };
        let sumexp = red(&mut g, Red::Sum, e, 1, "sumexp");
        let tb = g.add(Op::Broadcast, Dtype::I32, sh.clone(), &[t], "tb").unwrap();
        let col = g.add(Op::Iota { axis: 1 }, Dtype::I32, sh.clone(), &[], "col").unwrap();
        let hit = g.add(Op::Binary(Bin::Eq), Dtype::Bool, sh.clone(), &[col, tb], "hit").unwrap();
        let zero = g.add(Op::Const { value: 0.0 }, f, vec![], &[], "z").unwrap();
        let zero = g.add(Op::Broadcast, f, sh.clone(), &[zero], "z").unwrap();
        let picked = g.add(Op::Select, f, sh.clone(), &[hit, x, zero], "picked").unwrap();
        let pick = red(&mut g, Red::Sum, picked, 1, "pick");
        let max = red(&mut g, Red::Max, x, 1, "max");
        let min = red(&mut g, Red::Min, d, 1, "min");
        let half = g.add(Op::Const { value: 0.5 }, f, vec![], &[], "h").unwrap();
        let half = g.add(Op::Broadcast, f, sh.clone(), &[half], "h").unwrap();
        let scaled = g.add(Op::Binary(Bin::Mul), f, sh.clone(), &[e, half], "scaled").unwrap();
        let prod = red(&mut g, Red::Prod, scaled, 1, "prod");
        let colsum = red(&mut g, Red::Sum, e, 0, "colsum");
        for (n, v) in
            [("sumexp", sumexp), ("pick", pick), ("max", max), ("min", min), ("prod", prod), ("colsum", colsum)]
        {
            g.outputs.push((n.into(), v));
        }
        let mut ins = inputs(&g, 7);
        // Specials in the data: NaN, ±inf, ±0 (max/min of signed zeros, NaN propagation).
        let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, 88.0, -100.0];
        for (k, s) in specials.iter().enumerate() {
            let at = (k * 7919) % (rows * cols);
            if rows * cols > 60 {
                ins[0].data[at] = *s;
            }
        }
        ins[2] = Tensor::new(Dtype::I32, vec![rows, 1], (0..rows).map(|r| ((r * 5) % (cols + 2)) as f64).collect());
        let want = interp::run(&g, &ins, 0).unwrap();
        for b in backends() {
            let p = compiler::kernel::schedule(&g).unwrap();
            let exe = runtime::compile_program(p, b).unwrap();
            for (name, got) in runtime::run_tensors_on(&exe, &ins, 0).unwrap() {
                for (i, (a, w)) in got.data.iter().zip(&want[&name].data).enumerate() {
                    let same = a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan());
                    let ok = same || (is_cuda(b) && (a - w).abs() <= 1e-5 + 1e-4 * w.abs());
                    assert!(ok, "[{rows}, {cols}] [{b:?}] `{name}`[{i}]: {a}, interpreter {w}");
                }
            }
        }
        // Every reduction with per-element work (2 ops or more) runs its jammed outputs as
        // lanes (a plain maximum stays scalar: gathering lanes costs more than it saves).
        let p = compiler::kernel::schedule(&g).unwrap();
        let exe = Executable::new(p, Backend::Cranelift).unwrap();
        let mut lanes = 0;
        for (k, kern) in exe.program.kernels.iter().enumerate() {
            if let compiler::kernel::Kernel::Loop(l) = kern {
                let jammed = l.outer_dims() > 0 && l.outer_dims() < l.dims.len() && l.dims[l.outer_dims() - 1] >= 4;
                if l.reduce.is_some() && jammed && codegen_cpu::jam_work(l) >= 2 {
                    lanes += 1;
                    assert!(exe.vectorized(k), "k{k} of [{rows}, {cols}] runs scalar:\n{}", exe.program.text());
                }
            }
        }
        assert!(rows < 4 || cols == 1 || lanes >= 1, "[{rows}, {cols}]: {lanes} lane reductions");
    }
}
