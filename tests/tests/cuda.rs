//! CUDA C generation (`codegen-cuda`) for every stdlib item, for the example recipe's
//! training graphs and for a graph of the library kernels with device code that neither
//! uses: snapshots of the generated kernels, and, where NVRTC and `ptxas` are installed (CI
//! installs the PyPI wheels `nvidia-cuda-nvrtc-cu12` and `nvidia-cuda-nvcc-cu12`),
//! compilation to PTX for `compute_80` and `compute_90` and assembly for `sm_80` and `sm_90`
//! with each kernel's registers, spills and shared memory.
//! Without them the compile test prints why it skipped; with `RECIPEC_REQUIRE_CUDA_TOOLS=1`
//! (CI) it fails instead.

use lang::source::{MemoryLoader, SourceDb};
use lang::types::ItemRef;

fn loader() -> MemoryLoader {
    let mut loader = MemoryLoader::default();
    for (m, f, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), text);
    }
    loader
}

/// Every stdlib item with sample shapes, and the example recipe's training graphs, as CUDA.
fn units() -> Vec<(String, codegen_cuda::Unit)> {
    let loader = loader();
    let mut out = vec![];
    for (name, g) in tests::stdlib_graphs() {
        let p = compiler::kernel::schedule(&g).unwrap();
        let u = codegen_cuda::emit(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name, u));
    }
    let text = std::fs::read_to_string(tests::root().join("recipes/tiny_gpt.recipe")).unwrap();
    let mut db = SourceDb::new();
    let root = db.add("recipes/tiny_gpt.recipe", text);
    let analysis = lang::analyze(&mut db, &[root], &loader);
    let item = analysis.modules.list[0].items["tiny_gpt"];
    let plan = compiler::train::plan(&analysis.modules, &db, ItemRef { module: 0, item }).unwrap();
    for g in [&plan.grad, &plan.update, &plan.update_steady, &plan.init] {
        let mut g = g.clone();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        let p = compiler::kernel::schedule(&g).unwrap();
        out.push((format!("tiny_gpt.{}", g.name), codegen_cuda::emit(&p).unwrap()));
    }
    // Library kernels with device code that no stdlib item uses at its sample shapes: f16 and
    // bf16 matmuls (both tile kernels), random samples, a concatenation.
    {
        use compiler::ir::{Graph, Op};
        use lang::types::Dtype;
        let mut g = Graph::new("device_library");
        let mut outs = vec![];
        for (i, d) in [Dtype::BF16, Dtype::F16].into_iter().enumerate() {
            let x = g.add(Op::Input { index: 2 * i, name: format!("x{i}") }, d, vec![2, 70, 33], &[], "x").unwrap();
            let w = g.add(Op::Input { index: 2 * i + 1, name: format!("w{i}") }, d, vec![2, 33, 65], &[], "w").unwrap();
            outs.push(g.add(Op::MatMul, d, vec![2, 70, 65], &[x, w], "big").unwrap());
            let xs = g.add(Op::Slice { axis: 1, start: 0 }, d, vec![2, 3, 33], &[x], "xs").unwrap();
            let xs = g.add(Op::Cast, Dtype::F32, vec![2, 3, 33], &[xs], "xs").unwrap();
            let xs = g.add(Op::Cast, d, vec![2, 3, 33], &[xs], "xs").unwrap();
            outs.push(g.add(Op::MatMul, d, vec![2, 3, 65], &[xs, w], "small").unwrap());
        }
        let u = g.add(Op::Uniform { stream: 1 }, Dtype::F32, vec![5, 7], &[], "u").unwrap();
        let n = g.add(Op::Normal { stream: 2 }, Dtype::F32, vec![5, 7], &[], "n").unwrap();
        outs.push(g.add(Op::Concat { axis: 1 }, Dtype::F32, vec![5, 14], &[u, n], "c").unwrap());
        for (i, o) in outs.into_iter().enumerate() {
            g.outputs.push((format!("y{i}"), o));
        }
        let p = compiler::kernel::schedule(&g).unwrap();
        let u = codegen_cuda::emit(&p).unwrap();
        assert!(u.launches.iter().all(|l| l.kind != "host"), "{}", u.launch_table());
        out.push(("synthetic.device_library".into(), u));
    }
    // Row-fused kernels (a matmul computed strip by strip inside the loops that read its
    // product): FMA tiles in f32, tensor cores in bf16 (both sides at least 64).
    {
        use compiler::ir::{Bin, Graph, Op, Red, Un};
        use lang::types::Dtype;
        let mut g = Graph::new("row_fused");
        for (i, (d, m, n)) in [(Dtype::F32, 40usize, 50usize), (Dtype::BF16, 70, 65)].into_iter().enumerate() {
            let x = g.add(Op::Input { index: 2 * i, name: format!("x{i}") }, d, vec![m, 33], &[], "x").unwrap();
            let w = g.add(Op::Input { index: 2 * i + 1, name: format!("w{i}") }, d, vec![33, n], &[], "w").unwrap();
            let z = g.add(Op::MatMul, d, vec![m, n], &[x, w], "z").unwrap();
            let z = g.add(Op::Cast, Dtype::F32, vec![m, n], &[z], "z").unwrap();
            let mx = g.add(Op::Reduce { op: Red::Max, axes: vec![1] }, Dtype::F32, vec![m], &[z], "max").unwrap();
            let r = g.add(Op::Reshape, Dtype::F32, vec![m, 1], &[mx], "max").unwrap();
            let b = g.add(Op::Broadcast, Dtype::F32, vec![m, n], &[r], "max").unwrap();
            let e = g.add(Op::Binary(Bin::Sub), Dtype::F32, vec![m, n], &[z, b], "sub").unwrap();
            let e = g.add(Op::Unary(Un::Exp), Dtype::F32, vec![m, n], &[e], "exp").unwrap();
            let s = g.add(Op::Reduce { op: Red::Sum, axes: vec![1] }, Dtype::F32, vec![m], &[e], "sum").unwrap();
            g.outputs.push((format!("max{i}"), mx));
            g.outputs.push((format!("sum{i}"), s));
        }
        let p = compiler::kernel::schedule(&g).unwrap();
        assert_eq!(p.row_groups.len(), 2, "{}", p.text());
        let u = codegen_cuda::emit(&p).unwrap();
        let kinds: Vec<&str> = u.launches.iter().filter(|l| l.runs_code()).map(|l| l.kind).collect();
        assert_eq!(kinds, ["fused", "fused"], "{}", u.launch_table());
        assert!(u.source.contains("rc_mma16816<1>"), "the bf16 group on the tensor cores");
        out.push(("synthetic.row_fused".into(), u));
    }
    // Row-fused groups ending with a trailing matmul `h + softmax(x @ w) @ u` whose left
    // operand is a strip in shared memory: FMA tiles in f32, tensor cores in bf16.
    {
        use compiler::ir::Graph;
        use lang::types::Dtype;
        let mut g = Graph::new("row_fused_trailing");
        for (i, (dt, m, n, d)) in
            [(Dtype::F32, 40usize, 50usize, 20usize), (Dtype::BF16, 70, 64, 72)].into_iter().enumerate()
        {
            let (y, _) = tests::softmax_matmul(&mut g, 4 * i, i, dt, (m, 33, n, d));
            g.outputs.push((format!("y{i}"), y));
        }
        let p = compiler::kernel::schedule(&g).unwrap();
        assert!(p.row_groups.len() == 2 && p.row_groups.iter().all(|gr| gr.strips.len() == 1), "{}", p.text());
        let u = codegen_cuda::emit(&p).unwrap();
        let kinds: Vec<&str> = u.launches.iter().filter(|l| l.runs_code()).map(|l| l.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == "fused").count(), 2, "{}", u.launch_table());
        assert!(!kinds.contains(&"matmul"), "{}", u.launch_table());
        out.push(("synthetic.row_fused_trailing".into(), u));
    }
    // The bf16 linear cross-entropy as the CUDA target blocks it (the classifier's gradient
    // recomputed in transposed chunks of rows): every product and gradient block on chip. Also
    // with 576-column blocks (the widest the CUDA target makes) and strips in the opt-in
    // shared memory: 64 rows, in dynamic shared memory.
    for (name, v, cols, row_shared) in [
        ("lce_bf16_cuda_target", 300usize, 128usize, codegen_cuda::ROW_SHARED),
        ("lce_bf16_cuda_opt_in_shared", 1152, 576, codegen_cuda::OPT_IN_SHARED),
    ] {
        use lang::types::Dtype;
        let src = "use std.loss.cross_entropy\n\npub loss lce(hidden: bf16[N, D], classifier: bf16[V, D], targets: i32[N]) -> f32 {\n    cross_entropy(f32(hidden @ classifier^T), targets)\n}\n";
        let mut db = SourceDb::new();
        let root = db.add("lce.recipe", src.to_string());
        let analysis = lang::analyze(&mut db, &[root], &loader);
        let m = analysis.modules.list.iter().position(|m| m.file == root).unwrap();
        let item = ItemRef { module: m, item: analysis.modules.list[m].items["lce"] };
        let t = |dt: Dtype, s: &[usize]| compiler::lower::Arg::Tensor(dt, s.to_vec());
        let args = vec![
            ("hidden".to_string(), t(Dtype::BF16, &[600, 64])),
            ("classifier".to_string(), t(Dtype::BF16, &[v, 64])),
            ("targets".to_string(), t(Dtype::I32, &[600])),
        ];
        let mut g = compiler::entry::function(&analysis.modules, &db, item, &args, true).unwrap();
        // The pipeline, blocking at this small size (chunks of 576 rows).
        let opts =
            compiler::block::BlockOptions { min_bytes: 0, block_bytes: 0, cols: Some(cols), recompute_columns: true };
        for pass in compiler::passes::PIPELINE {
            let r = if pass.name == "block-matmul-reductions" {
                compiler::block::run(&mut g, &opts)
            } else {
                (pass.run)(&mut g)
            };
            r.unwrap();
        }
        let p = compiler::kernel::schedule(&g).unwrap();
        let u = codegen_cuda::emit_with(&p, &codegen_cuda::EmitOptions { row_shared }).unwrap();
        assert!(u.launches.iter().all(|l| l.kind != "matmul"), "{}\n{}", u.launch_table(), p.text());
        let dynamic = u.launches.iter().any(|l| l.dynamic_shared > 0);
        assert_eq!(dynamic, row_shared > codegen_cuda::ROW_SHARED, "{name}:\n{}", u.launch_table());
        // The strips in dynamic memory are laid out one after another inside it.
        for l in u.launches.iter().filter(|l| l.dynamic_shared > 0) {
            let start = u.source.find(&format!(" void {}(", l.name)).unwrap();
            let text = &u.source[start..start + u.source[start..].find("\n}\n").unwrap()];
            let at: Vec<u32> = text
                .lines()
                .filter_map(|line| line.split("= rc_dynamic + ").nth(1))
                .map(|n| n.trim_end_matches(';').parse().unwrap())
                .collect();
            assert!(!at.is_empty() && at[0] == 0, "{name} {}: {at:?}", l.name);
            assert!(at.windows(2).all(|w| w[0] < w[1]) && at.iter().all(|a| a % 16 == 0), "{name} {}: {at:?}", l.name);
            assert!(*at.last().unwrap() < l.dynamic_shared, "{name} {}: {at:?} in {}", l.name, l.dynamic_shared);
        }
        out.push((name.to_string(), u));
    }
    out
}

/// The kernels of a unit without the shared prelude, and its launch table.
fn kernels_text(u: &codegen_cuda::Unit) -> String {
    let start = u.source.find("// entry point").unwrap_or(0);
    format!("{}\nLAUNCHES\n{}", &u.source[start..], u.launch_table())
}

#[test]
fn generated_cuda_is_snapshotted() {
    let all = units();
    assert!(all.len() >= 20, "{}", all.len());
    for (name, u) in &all {
        if name.starts_with("tiny_gpt") {
            continue; // thousands of lines; compiled below
        }
        insta::with_settings!({snapshot_path => "../cuda/snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
            insta::assert_snapshot!(name.replace('.', "_"), kernels_text(u));
        });
    }
}

/// The largest stack frame (local memory per thread) a generated kernel may have.
const MAX_STACK: u64 = 48;

#[test]
fn nvrtc_and_ptxas_compile_every_unit() {
    let tools = runtime::cuda::nvrtc_available().and_then(|_| runtime::cuda::find_ptxas());
    let ptxas_path = match tools {
        Ok(p) => p,
        Err(why) => {
            if std::env::var("RECIPEC_REQUIRE_CUDA_TOOLS").is_ok() {
                panic!("{why}");
            }
            println!("skipped: {why}");
            return;
        }
    };
    let dir = tests::root().join("target/cuda-check");
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = String::new();
    for (name, u) in units() {
        let safe = name.replace(['.', '/'], "_");
        std::fs::write(dir.join(format!("{safe}.cu")), &u.source).unwrap();
        runtime::cuda::check_launches(&u).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (virt, real) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
            let ptx = runtime::cuda::compile_ptx(&u.source, &safe, virt)
                .unwrap_or_else(|e| panic!("{name}: {e}\nthe source is {}", dir.join(format!("{safe}.cu")).display()));
            let usage =
                runtime::cuda::assemble(&ptx, real, &ptxas_path, &dir, &safe).unwrap_or_else(|e| panic!("{name}: {e}"));
            // Launches of the same code share a function: ptxas reports each function once.
            let functions: std::collections::BTreeSet<&str> =
                u.launches.iter().filter(|l| l.runs_code()).map(|l| l.name.as_str()).collect();
            assert_eq!(usage.len(), functions.len(), "{name} {real}: ptxas reported {} functions", usage.len());
            // The launch table's shared memory (what the launch limits are checked against)
            // is what ptxas allocated, up to the alignment padding between arrays.
            for k in &usage {
                let l = u.launches.iter().find(|l| l.runs_code() && l.name == k.name);
                let l = l.unwrap_or_else(|| panic!("{name}: ptxas reported `{}`, not in the launch table", k.name));
                let (got, said) = (k.shared_bytes, l.shared_bytes as u64);
                assert!(
                    got.abs_diff(said) <= 32,
                    "{name} {real}: `{}` has {got} B of shared memory, the table {said}",
                    k.name
                );
            }
            let regs = usage.iter().map(|k| k.registers).max().unwrap_or(0);
            let smem = usage.iter().map(|k| k.shared_bytes).max().unwrap_or(0);
            let spills: u64 = usage.iter().map(|k| k.spill_bytes).sum();
            let stack = usage.iter().map(|k| k.stack_bytes).max().unwrap_or(0);
            assert!(regs <= 255 && smem <= 48 * 1024, "{name} {real}: {regs} registers, {smem} B shared");
            // Local memory per thread: only libm's trigonometric slow path (40 B) has some. An
            // array indexed in a loop that was not unrolled lives there instead of in registers
            // (the matmul accumulators took 64-128 B before their loops were unrolled, a
            // horizontally fused update computed all at once 2,352 B): it fails.
            for k in &usage {
                assert!(
                    k.stack_bytes <= MAX_STACK,
                    "{name} {real}: `{}` has a {} B stack frame",
                    k.name,
                    k.stack_bytes
                );
            }
            // Every function fits a multiprocessor (registers for a whole block included); the
            // report gives the fewest resident warps of any and what limits them.
            let occupancy = runtime::cuda::check_resources(&u, &usage, real).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(occupancy.len(), functions.len(), "{name} {real}: a function without an occupancy");
            let fewest = occupancy
                .iter()
                .min_by_key(|(_, o)| o.warps)
                .map(|(k, o)| format!("{:>2} ({k}: {})", o.warps, o.limit))
                .unwrap_or_else(|| "-".into());
            report.push_str(&format!(
                "{name:<40} {real}: {:>4} functions, max {regs:>3} registers, {spills} B spilled, max {stack} B stack, max {smem} B shared, fewest warps/SM {fewest}\n",
                usage.len()
            ));
        }
    }
    std::fs::write(dir.join("summary.txt"), &report).unwrap();
    print!("{report}");
}

/// The example recipe's training step (embedding lookup and gradient, target logits, their
/// gradients) runs entirely on the device: no kernel of its graphs goes back to the host.
#[test]
fn the_training_step_has_no_host_kernels() {
    for (name, u) in units().iter().filter(|(n, _)| n.starts_with("tiny_gpt")) {
        let host: Vec<_> = u.launches.iter().filter(|l| l.kind == "host").collect();
        assert!(host.is_empty(), "{name}: kernels left on the host: {host:?}");
        if name.ends_with(".grad") || name.contains("grad") {
            assert!(u.launches.iter().any(|l| l.kind == "index"), "{name}: {}", u.launch_table());
        }
    }
}

/// A launch over the device's grid limits (65,535 blocks down and deep) is refused before
/// anything runs, with the kernel and its grid named: a batched matmul of 70,000 products
/// needs 70,000 blocks deep. At 65,535 it fits.
#[test]
fn a_grid_over_the_device_limits_is_refused_before_launch() {
    use compiler::ir::{Graph, Op};
    use lang::types::Dtype;
    for (batch, fits) in [(65535usize, true), (70000, false)] {
        let mut g = Graph::new("t");
        let a = g.add(Op::Input { index: 0, name: "a".into() }, Dtype::F32, vec![batch, 2, 3], &[], "a").unwrap();
        let b = g.add(Op::Input { index: 1, name: "b".into() }, Dtype::F32, vec![batch, 3, 2], &[], "b").unwrap();
        let m = g.add(Op::MatMul, Dtype::F32, vec![batch, 2, 2], &[a, b], "m").unwrap();
        g.outputs.push(("m".into(), m));
        let u = codegen_cuda::emit(&compiler::kernel::schedule(&g).unwrap()).unwrap();
        match runtime::cuda::check_launches(&u) {
            Ok(()) => assert!(fits, "{}", u.launch_table()),
            Err(e) => {
                assert!(!fits, "{e}");
                assert!(e.contains("needs a grid of [1, 1, 70000] blocks") && e.contains("dimension 2"), "{e}");
            }
        }
    }
}
