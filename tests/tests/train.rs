//! Training plans (`compiler::train`) run by the runtime's loop: the recipe's optimizer
//! groups, schedules, gradient clipping, sparsity masks and gradient accumulation do what
//! the recipe says, checked against hand computations on small models.

use compiler::interp::{self, Tensor};
use compiler::train::TrainPlan;
use lang::source::{MemoryLoader, SourceDb};
use lang::types::{Dtype, ItemRef};
use runtime::train::{initial_state, run_named, Programs};
use runtime::{Backend, Buffer, Value};
use std::collections::BTreeMap;

fn loader() -> MemoryLoader {
    let mut loader = MemoryLoader::default();
    for (m, f, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), text);
    }
    loader
}

fn plan_of(src: &str) -> TrainPlan {
    let mut db = SourceDb::new();
    let root = db.add("t.recipe", src);
    let analysis = lang::analyze(&mut db, &[root], &loader());
    assert!(!analysis.has_errors(), "{:?}", analysis.diagnostics);
    let m = &analysis.modules.list[0];
    let item = m.ast.items.iter().position(|i| matches!(i.kind, lang::ast::ItemKind::Recipe(_))).expect("a recipe");
    compiler::train::plan(&analysis.modules, &db, ItemRef { module: 0, item }).unwrap_or_else(|e| panic!("{e}"))
}

fn values(v: &Value) -> Vec<f64> {
    tensor(v).data
}

fn tensor(v: &Value) -> Tensor {
    v.host().unwrap().to_tensor()
}

fn host(t: &Tensor) -> Value {
    Value::Host(Buffer::from_tensor(t))
}

const MLP: &str = r#"use std.models.mlp
use std.optim.sgd
use std.schedule.wsd
use std.sparsity.nm

recipe r {
    model = mlp(I = 4, H = 8, O = 4)
    data = text("embedded:kjv", context = 4, batch = 2)
    loss = mean(model.forward(f32(batch.inputs) / 100.0))
    optimize model.** with sgd(lr = wsd(peak = 0.5, total = 10, warmup = 4))
    grad_clip = 0.1
    seed = 5
}
"#;

#[test]
fn update_clips_the_global_norm_and_evaluates_the_schedule_at_the_step() {
    let plan = plan_of(MLP);
    let progs = Programs::new(&plan, Backend::Cranelift).unwrap();
    let mut state = initial_state(&plan, &progs).unwrap();
    let before = state.clone_values();
    let mut n = 0usize;
    for p in &plan.params {
        let numel: usize = p.shape.iter().product();
        n += numel;
        let t = Tensor::new(p.dtype, p.shape.clone(), vec![1.0; numel]);
        state.insert(format!("grad.{}", p.path), host(&t));
    }
    let step = 3;
    let mut extra = BTreeMap::new();
    extra.insert("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, step as f64)));
    run_named(&progs.update, &mut state, extra, 0).unwrap();
    let norm = (n as f64).sqrt();
    assert!((state["grad_norm"].get(0).unwrap() - norm).abs() < 1e-4 * norm);
    // The schedule at step 3, evaluated on its own.
    let lr = {
        let mut db = SourceDb::new();
        let root = db.add("s.recipe", "use std.schedule.wsd\n");
        let a = lang::analyze(&mut db, &[root], &loader());
        let m = a.modules.list.iter().position(|m| m.items.contains_key("wsd") && m.file != root).unwrap();
        let r = ItemRef { module: m, item: a.modules.list[m].items["wsd"] };
        let args = [
            ("peak".to_string(), compiler::lower::Arg::Scalar(0.5)),
            ("total".to_string(), compiler::lower::Arg::Scalar(10.0)),
            ("warmup".to_string(), compiler::lower::Arg::Scalar(4.0)),
        ];
        let g = compiler::entry::schedule(&a.modules, &db, r, &args).unwrap();
        interp::run(&g, &[Tensor::scalar(Dtype::I32, step as f64)], 0).unwrap()["out"].data[0]
    };
    assert!(lr > 0.0 && lr < 0.5, "warmup: {lr}");
    let scale = (0.1 / (norm + 1e-6)).min(1.0);
    for p in &plan.params {
        let (old, new) = (&before[&p.path], values(&state[&p.path]));
        for (a, b) in old.iter().zip(&new) {
            let want = a - lr * scale;
            assert!((b - want).abs() < 1e-6, "{}: {b} vs {want}", p.path);
        }
    }
}

/// The validation loss of the small MLP on a fixed batch.
fn eval_loss(progs: &Programs, state: &mut BTreeMap<String, Value>) -> f64 {
    let x = Tensor::new(Dtype::I32, vec![2, 4], vec![65.0, 110.0, 100.0, 32.0, 71.0, 111.0, 100.0, 10.0]);
    let batch = ["batch.inputs", "batch.targets"].map(|n| (n.to_string(), Buffer::from_tensor(&x)));
    run_named(&progs.eval, state, batch.into(), 0).unwrap();
    state["loss"].get(0).unwrap()
}

#[test]
fn masks_follow_the_rule_and_the_forward_pass_uses_them() {
    let src = MLP.replace("    grad_clip = 0.1\n", "    sparsify model.w1 with nm(n = 2, m = 4)\n");
    let plan = plan_of(&src);
    assert_eq!(plan.params.iter().filter(|p| p.sparsity.is_some()).count(), 1);
    let progs = Programs::new(&plan, Backend::Cranelift).unwrap();
    let mut state = initial_state(&plan, &progs).unwrap();
    let mut extra = BTreeMap::new();
    extra.insert("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, 1.0)));
    run_named(progs.masks.as_ref().unwrap(), &mut state, extra, 0).unwrap();
    let w = values(&state["model.w1"]);
    let mask = values(&state["mask.model.w1"]);
    // w1 is [4, 8]: in each group of 4 along the rows, the 2 largest magnitudes are kept.
    for g in 0..8 {
        let idx: Vec<usize> = (g * 4..g * 4 + 4).collect();
        let kept: Vec<usize> = idx.iter().copied().filter(|&i| mask[i] == 1.0).collect();
        assert_eq!(kept.len(), 2, "group {g}: {:?}", &mask[g * 4..g * 4 + 4]);
        let min_kept = kept.iter().map(|&i| w[i].abs()).fold(f64::MAX, f64::min);
        for &i in &idx {
            if mask[i] == 0.0 {
                assert!(w[i].abs() <= min_kept);
            }
        }
    }
    // The loss with the mask equals the loss of the dense weights zeroed where masked.
    let batch = |state: &mut BTreeMap<String, Value>| eval_loss(&progs, state);
    let masked = batch(&mut state);
    let zeroed: Vec<f64> = w.iter().zip(&mask).map(|(a, m)| a * m).collect();
    state.insert("model.w1".into(), host(&Tensor::new(Dtype::F32, vec![4, 8], zeroed)));
    state.insert("mask.model.w1".into(), host(&Tensor::new(Dtype::F32, vec![4, 8], vec![1.0; 32])));
    assert_eq!(batch(&mut state), masked);
    let dense = {
        state.insert("model.w1".into(), host(&Tensor::new(Dtype::F32, vec![4, 8], w.clone())));
        batch(&mut state)
    };
    assert_ne!(dense, masked);
}

#[test]
fn the_example_recipes_plan() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let tiny = plan_of(&std::fs::read_to_string(root.join("recipes/tiny_gpt.recipe")).unwrap());
    let n: usize = tiny.params.iter().map(|p| p.shape.iter().product::<usize>()).sum();
    assert!((900_000..1_200_000).contains(&n), "{n}");
    assert_eq!(tiny.states.len(), 2 * tiny.params.len(), "adamw keeps m and v per parameter");
    assert!(tiny.params.iter().all(|p| p.optimizer.as_deref() == Some("adamw")));
    assert!(tiny.decode.is_some() && tiny.masks.is_none());
    let sparse = plan_of(&std::fs::read_to_string(root.join("recipes/sparse_gpt.recipe")).unwrap());
    assert_eq!(sparse.params.iter().filter(|p| p.sparsity.as_deref() == Some("nm")).count(), 8);
    assert!(sparse.params.iter().any(|p| p.optimizer.as_deref() == Some("sgd")));
    assert!(sparse.params.iter().any(|p| p.optimizer.as_deref() == Some("adam")));
    assert!(sparse.masks.is_some());
    let frugal = plan_of(&std::fs::read_to_string(root.join("recipes/frugal_gpt.recipe")).unwrap());
    let matrices = frugal.params.iter().filter(|p| p.shape.len() == 2 && p.path.starts_with("model.blocks.")).count();
    assert_eq!(frugal.params.iter().filter(|p| p.optimizer.as_deref() == Some("frugal")).count(), matrices);
    assert_eq!(frugal.refresh_periods, vec![200]);
    // Adam's statistics of a [128, 128] matrix: a projection [32, 128] and m, v of [128, 32].
    let wq =
        |s: &str| frugal.states.iter().find(|x| x.0 == format!("state.model.blocks.0.attn.wq.{s}")).unwrap().2.clone();
    assert_eq!((wq("p"), wq("m"), wq("v")), (vec![32, 128], vec![128, 32], vec![128, 32]));
    // LOST: 669,968 parameters (the dense example's 1,038,208 less 44% of its MLPs' weights),
    // the channel indices buffers, every other parameter with AdamW, 600 steps from a `let`.
    let lost = plan_of(&std::fs::read_to_string(root.join("recipes/lost_gpt.recipe")).unwrap());
    let n: usize = lost.params.iter().map(|p| p.shape.iter().product::<usize>()).sum();
    assert_eq!(n, 669_968);
    assert_eq!(lost.settings.steps, 600);
    for p in &lost.params {
        let buffer = p.path.ends_with(".channels");
        assert_eq!(p.optimizer.is_none(), buffer, "{}", p.path);
        assert_eq!(p.dtype == Dtype::I32, buffer, "{}", p.path);
    }
    assert_eq!(lost.params.iter().filter(|p| p.path.ends_with(".channels")).count(), 10);
}

const PROJECTED: &str = r#"use std.models.mlp
use std.optim.{adamw, frugal, galore_adamw}

recipe r {
    model = mlp(I = 4, H = 8, O = 4)
    data = text("embedded:kjv", context = 4, batch = 2)
    loss = mean(model.forward(f32(batch.inputs) / 100.0) * model.forward(f32(batch.inputs) / 50.0))
    optimize model.w1 with frugal(lr = 0.01, rank = 2, gap = 3, weight_decay = 0.1)
    optimize model.w2 with galore_adamw(lr = 0.01, rank = 2, gap = 2)
    optimize model.{b1, b2} with adamw(lr = 0.01)
    seed = 5
}
"#;

/// Between refreshes of the optimizer states the loop runs the steady update, in which the
/// states' initializers (here FRUGAL's and GaLore's SVDs) fold away; it gives the bits of the
/// full update at those steps, and the full update runs at step 1 and at every refresh.
#[test]
fn the_steady_update_gives_the_full_updates_bits_between_refreshes() {
    let plan = plan_of(PROJECTED);
    assert_eq!(plan.refresh_periods, vec![2, 3]);
    // Counted after the passes the compiler runs (constant folding takes the branch).
    let svds = |g: &compiler::ir::Graph| {
        let mut g = g.clone();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        g.topo().into_iter().filter(|n| matches!(g.node(*n).op, compiler::ir::Op::SvdTopK { .. })).count()
    };
    assert_eq!((svds(&plan.update), svds(&plan.update_steady)), (2, 0));
    let progs = Programs::new(&plan, Backend::Cranelift).unwrap();
    let (mut picked, mut full) = (initial_state(&plan, &progs).unwrap(), initial_state(&plan, &progs).unwrap());
    let mut steady_steps = vec![];
    for step in 1..=7usize {
        let x = Tensor::new(Dtype::I32, vec![2, 4], (0..8).map(|i| ((i * 37 + step * 11) % 120) as f64).collect());
        let exe = progs.update_at(step);
        if std::ptr::eq(exe, progs.update_steady.as_ref()) {
            steady_steps.push(step);
        }
        for (state, update) in [(&mut picked, exe), (&mut full, progs.update.as_ref())] {
            let batch = ["batch.inputs", "batch.targets"].map(|n| (n.to_string(), Buffer::from_tensor(&x)));
            run_named(&progs.grad, state, batch.into(), 0).unwrap();
            let s = [("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, step as f64)))];
            run_named(update, state, s.into(), 0).unwrap();
        }
    }
    // (step - 1) % 2 and (step - 1) % 3 both nonzero.
    assert_eq!(steady_steps, vec![2, 6]);
    for (name, v) in &full {
        let (a, b) = (values(v), values(&picked[name]));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: {a:?} vs {b:?}");
    }
    assert!(plan.states.iter().any(|s| s.0 == "state.model.w1.p"), "{:?}", plan.states);
}

/// A soft mask (MDGF): the pruned weights of the N:M pattern enter the forward pass scaled by
/// β(t) = 1 − κt, here 0.5 at step 2, and the loss is the loss of the weights so scaled.
#[test]
fn soft_masks_scale_the_pruned_weights_in_the_forward_pass() {
    let src = MLP.replace(
        "    grad_clip = 0.1\n",
        "    sparsify model.w1 with mdgf(n = 2, m = 4, decay = 0.5, exponential = false)\n",
    );
    let plan = plan_of(&src.replace("use std.sparsity.nm", "use std.sparsity.mdgf"));
    let progs = Programs::new(&plan, Backend::Cranelift).unwrap();
    let mut state = initial_state(&plan, &progs).unwrap();
    let step = BTreeMap::from([("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, 2.0)))]);
    run_named(progs.masks.as_ref().unwrap(), &mut state, step, 0).unwrap();
    let (w, mask) = (values(&state["model.w1"]), values(&state["mask.model.w1"]));
    for g in 0..8 {
        let group = &mask[g * 4..g * 4 + 4];
        assert_eq!(group.iter().filter(|&&m| m == 1.0).count(), 2, "group {g}: {group:?}");
        assert_eq!(group.iter().filter(|&&m| m == 0.5).count(), 2, "group {g}: {group:?}");
    }
    let soft = eval_loss(&progs, &mut state);
    let scaled: Vec<f64> = w.iter().zip(&mask).map(|(a, m)| a * m).collect();
    state.insert("model.w1".into(), host(&Tensor::new(Dtype::F32, vec![4, 8], scaled)));
    state.insert("mask.model.w1".into(), host(&Tensor::new(Dtype::F32, vec![4, 8], vec![1.0; 32])));
    assert_eq!(eval_loss(&progs, &mut state), soft);
}

/// Gradient accumulation averages where the gradients are (`compiler::train::accumulation`):
/// on the CPU and on a device backend, two half batches give the full batch's losses, and on
/// the device no gradient crosses to the host (only the checkpoint and the scalars do).
#[test]
fn accumulating_two_half_batches_matches_one_full_batch() {
    let dir = std::env::temp_dir().join(format!("recipec-accumulate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |batch: usize, acc: usize, name: &str, backend: Backend| {
        // Without clipping, which would hide a wrongly scaled gradient.
        let src = MLP
            .replace("    grad_clip = 0.1\n", "")
            .replace("batch = 2", &format!("batch = {batch}"))
            .replace("    seed = 5\n", &format!("    seed = 5\n    accumulate = {acc}\n    log_every = 1\n"));
        let plan = plan_of(&src);
        let out = dir.join(format!("{name}-{backend:?}"));
        let opts = runtime::train::TrainOptions {
            steps: Some(4),
            checkpoint_every: None,
            out: out.clone(),
            resume: None,
            backend,
            progress_bar: false,
            source: src.clone(),
            source_path: dir.join("t.recipe"),
            sources: None,
        };
        let summary = runtime::train::train(&plan, &opts, &mut std::io::sink()).unwrap();
        let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
            .collect();
        let param_bytes: usize = plan.params.iter().map(|p| p.shape.iter().product::<usize>() * 4).sum();
        (losses, summary.traffic, param_bytes)
    };
    let mut backends = vec![Backend::Cranelift];
    match runtime::cuda_emu::available() {
        Ok(()) => backends.push(Backend::CudaEmu),
        Err(e) => println!("the CUDA emulator is skipped: {e}"),
    }
    for backend in backends {
        let (full, _, _) = run(4, 1, "full", backend);
        let (halves, traffic, param_bytes) = run(2, 2, "halves", backend);
        assert_eq!(full.len(), 4);
        for (a, b) in full.iter().zip(&halves) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{backend:?}: {full:?} vs {halves:?}");
        }
        if let Some(t) = traffic {
            // The final checkpoint (the parameters; sgd keeps no state) and a few scalars: eight
            // micro-batches' gradients copied out would be eight times the parameters.
            assert!(t.down >= param_bytes as u64 && t.down < param_bytes as u64 + 1024, "{backend:?}: {t:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot of every tensor's values (for before/after comparisons).
trait CloneValues {
    fn clone_values(&self) -> BTreeMap<String, Vec<f64>>;
}

impl CloneValues for BTreeMap<String, Value> {
    fn clone_values(&self) -> BTreeMap<String, Vec<f64>> {
        self.iter().map(|(k, v)| (k.clone(), values(v))).collect()
    }
}

/// The GPT training step (forward, loss, every gradient; the update) on generated code (the
/// CPU's, and the CUDA code under the emulator) gives the interpreter's values within the
/// matmul tolerance of the backend tests.
#[test]
fn the_gpt_training_step_matches_the_interpreter() {
    let src = r#"use std.models.gpt
use std.loss.linear_cross_entropy
use std.optim.adamw

recipe g {
    model = gpt(V = 64, D = 16, L = 2, H = 2, T = 8)
    data = text("embedded:kjv", context = 8, batch = 3)
    loss = linear_cross_entropy(model.features(batch.inputs), model.wte, flatten(batch.targets))
    optimize model.** with adamw(lr = 0.01)
}
"#;
    // `RECIPEC_BIG=1`: the example's sizes (slow on the interpreter).
    let big = std::env::var("RECIPEC_BIG").is_ok();
    let src = if big {
        src.replace("V = 64, D = 16, L = 2, H = 2, T = 8", "V = 256, D = 128, L = 1, H = 4, T = 128")
            .replace("context = 8, batch = 3", "context = 128, batch = 16")
    } else {
        src.to_string()
    };
    let (b, t) = if big { (16, 128) } else { (3, 8) };
    let plan = plan_of(&src);
    // The CPU code, and the CUDA code run by the emulator (where a C++ compiler exists).
    let mut backends = vec![Backend::Cranelift];
    match runtime::cuda_emu::available() {
        Ok(()) if !big => backends.push(Backend::CudaEmu),
        Ok(()) => {}
        Err(e) => println!("the CUDA emulator is skipped: {e}"),
    }
    for backend in backends {
        let progs = Programs::new(&plan, backend).unwrap();
        let mut state = initial_state(&plan, &progs).unwrap();
        let x = Tensor::new(Dtype::I32, vec![b, t], (0..b * t).map(|i| ((i * 37) % 64) as f64).collect());
        let y = Tensor::new(Dtype::I32, vec![b, t], (0..b * t).map(|i| ((i * 11 + 5) % 64) as f64).collect());
        let mut extra = BTreeMap::new();
        extra.insert("batch.inputs".to_string(), Buffer::from_tensor(&x));
        extra.insert("batch.targets".to_string(), Buffer::from_tensor(&y));
        // The interpreter on the same graph and inputs.
        let mut g = plan.grad.clone();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        let inputs: Vec<Tensor> = g
            .inputs
            .iter()
            .map(|i| match &g.node(*i).op {
                compiler::ir::Op::Input { name, .. } if name == "batch.inputs" => x.clone(),
                compiler::ir::Op::Input { name, .. } if name == "batch.targets" => y.clone(),
                compiler::ir::Op::Input { name, .. } => tensor(&state[name]),
                _ => unreachable!(),
            })
            .collect();
        let want = interp::run(&g, &inputs, 0).unwrap();
        if let Some(emu) = progs.grad.emulator() {
            // The whole step with every launch's blocks reversed gives the same bits (no
            // block depends on another's writes in one launch).
            let (fwd, rev) = (emu.run_tensors(&inputs, 0).unwrap(), emu.run_tensors_reversed(&inputs, 0).unwrap());
            for ((name, a), (_, b)) in fwd.iter().zip(&rev) {
                let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name}: the emulated GPT step differs with its blocks reversed");
            }
        }
        run_named(&progs.grad, &mut state, extra, 0).unwrap();
        let mut checked = 0;
        for (name, w) in &want {
            let got = values(&state[name]);
            for (a, b) in got.iter().zip(&w.data) {
                assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "{name} [{backend:?}]: {a} vs {b}");
            }
            checked += 1;
        }
        assert_eq!(checked, 1 + plan.params.len());
    }
}

/// The KV-cached decode step (`compiler::incremental`) gives the naive window graph's logits
/// at every position: bit for bit on the interpreter, and within 1e-5 (matmul summation
/// order) on each code generator, feeding the caches from step to step.
#[test]
fn cached_decoding_gives_the_window_logits_at_every_position() {
    let plan = plan_of(
        r#"use std.models.gpt
use std.loss.cross_entropy
use std.optim.sgd
use std.decode.greedy

recipe r {
    model = gpt(V = 256, D = 16, L = 2, H = 2, T = 12)
    data = text("embedded:kjv", context = 12, batch = 2)
    loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))
    optimize model.** with sgd(lr = 0.1)
    decode = greedy()
    seed = 11
}
"#,
    );
    let progs = Programs::new(&plan, Backend::Cranelift).unwrap();
    let state = initial_state(&plan, &progs).unwrap();
    let window = plan.decode.as_ref().expect("a decode graph");
    let inc = compiler::incremental::incrementalize(window, "tokens", "pos").unwrap();
    // Keys and values of each of the 2 layers.
    assert_eq!(inc.caches.len(), 4, "{:?}", inc.caches);
    let text: Vec<f64> = b"In the begin".iter().map(|&b| b as f64).collect();
    let t = plan.data.context;
    let args = |g: &compiler::ir::Graph, extra: &BTreeMap<String, Tensor>| -> Vec<Tensor> {
        g.inputs
            .iter()
            .map(|&i| {
                let compiler::ir::Op::Input { name, .. } = &g.node(i).op else { unreachable!() };
                extra.get(name).cloned().unwrap_or_else(|| tensor(&state[name]))
            })
            .collect()
    };
    let mut caches: BTreeMap<String, Tensor> = inc
        .caches
        .iter()
        .map(|(n, d, s)| (n.clone(), Tensor::new(*d, s.clone(), vec![0.0; s.iter().product()])))
        .collect();
    #[allow(unused_mut)]
    let mut backends = vec![Backend::Cranelift];
    #[cfg(feature = "llvm")]
    backends.push(Backend::Llvm);
    let compiled: Vec<_> = backends.into_iter().map(|b| (b, runtime::train::compile(&inc.graph, b).unwrap())).collect();
    let mut compiled_caches: Vec<BTreeMap<String, Value>> = compiled
        .iter()
        .map(|_| inc.caches.iter().map(|(n, d, s)| (n.clone(), Value::Host(Buffer::zeros(*d, s.clone())))).collect())
        .collect();
    for p in 0..t {
        let mut win = text.clone();
        for w in win.iter_mut().skip(p + 1) {
            *w = 0.0;
        }
        let mut extra = BTreeMap::new();
        extra.insert("tokens".to_string(), Tensor::new(Dtype::I32, vec![1, t], win));
        extra.insert("pos".to_string(), Tensor::new(Dtype::I32, vec![], vec![p as f64]));
        let want = interp::run(window, &args(window, &extra), 0).unwrap();
        extra.insert("tokens".to_string(), Tensor::new(Dtype::I32, vec![1, 1], vec![text[p]]));
        extra.extend(caches.clone());
        let got = interp::run(&inc.graph, &args(&inc.graph, &extra), 0).unwrap();
        assert_eq!(got["logits"].data, want["logits"].data, "interpreter, position {p}");
        assert_eq!(got["token"].data, want["token"].data, "interpreter, position {p}");
        for (name, _, _) in &inc.caches {
            caches.insert(name.clone(), got[name].clone());
        }
        for ((b, exe), st) in compiled.iter().zip(compiled_caches.iter_mut()) {
            let mut bx = BTreeMap::new();
            bx.insert("tokens".to_string(), Buffer::from_tensor(&extra["tokens"]));
            bx.insert("pos".to_string(), Buffer::from_tensor(&extra["pos"]));
            for p in &plan.params {
                st.entry(p.path.clone()).or_insert_with(|| host(&tensor(&state[&p.path])));
            }
            run_named(exe.as_ref(), st, bx, 0).unwrap();
            let got = values(&st["logits"]);
            for (i, (g, w)) in got.iter().zip(&want["logits"].data).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{b:?}, position {p}, logit {i}: {g} vs {w}");
            }
        }
    }
}

/// On a device backend the training state stays in device memory (`runtime::device`): from the
/// second step on, a step copies in only what its programs take from the host (the batch, the
/// step number) and copies out only the loss and the gradient norm it reads, one element each;
/// from the third on it allocates nothing (the pool); the values match the CPU's. Run on the CUDA emulator, whose device memory counts its copies
/// as the GPU's does, and on the GPU where there is one (`tests/gpu/run.sh`).
#[test]
fn a_device_training_step_copies_only_the_batch_in_and_the_scalars_out() {
    match runtime::cuda_emu::available() {
        Ok(()) => device_training_step_traffic(Backend::CudaEmu),
        Err(e) => println!("the CUDA emulator is skipped: {e}"),
    }
    match runtime::cuda::available() {
        Ok(()) => device_training_step_traffic(Backend::Cuda),
        Err(e) => println!("the GPU is skipped: {e}"),
    }
}

fn device_training_step_traffic(backend: Backend) {
    let plan = plan_of(MLP);
    let dev = Programs::new(&plan, backend).unwrap();
    let cpu = Programs::new(&plan, Backend::Cranelift).unwrap();
    let mut dev_state = initial_state(&plan, &dev).unwrap();
    let mut cpu_state = initial_state(&plan, &cpu).unwrap();
    assert_eq!(cpu.traffic(), None, "the CPU copies nothing");
    let total = |p: &Programs| p.traffic().expect("a device backend counts its copies");
    for step in 1..=3usize {
        let x = Tensor::new(Dtype::I32, vec![2, 4], (0..8).map(|i| ((i * 37 + step * 11) % 120) as f64).collect());
        let before = total(&dev);
        let mut expected_up = 0;
        let mut read = vec![];
        for (progs, state) in [(&dev, &mut dev_state), (&cpu, &mut cpu_state)] {
            let batch: BTreeMap<String, Buffer> =
                ["batch.inputs", "batch.targets"].iter().map(|n| (n.to_string(), Buffer::from_tensor(&x))).collect();
            let s: BTreeMap<String, Buffer> =
                [("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, step as f64)))].into();
            if std::ptr::eq(progs, &dev) {
                for (exe, extra) in [(&progs.grad, &batch), (&progs.update, &s)] {
                    let names = &exe.program().input_names;
                    expected_up +=
                        extra.iter().filter(|(n, _)| names.contains(n)).map(|(_, b)| b.bytes() as u64).sum::<u64>();
                }
            }
            run_named(&progs.grad, state, batch, 0).unwrap();
            let loss = state["loss"].get(0).unwrap();
            run_named(&progs.update, state, s, 0).unwrap();
            read.push((loss, state["grad_norm"].get(0).unwrap()));
        }
        let moved = total(&dev);
        let (up, down) = (moved.up - before.up, moved.down - before.down);
        if step > 1 {
            assert_eq!(up, expected_up, "{backend:?} step {step}: bytes copied in");
            assert!(expected_up > 0 && expected_up <= 2 * 32 + 4, "the batch and the step: {expected_up}");
            assert_eq!(down, 8, "{backend:?} step {step}: the loss and the gradient norm, 4 bytes each");
        }
        if step > 2 {
            // A step's batch and outputs replace the previous step's after it has run, so two
            // of each exist at a time; from the third step on the pool serves every allocation.
            assert_eq!(moved.allocs - before.allocs, 0, "{backend:?} step {step}: device allocations");
        }
        for p in &plan.params {
            assert!(matches!(dev_state[&p.path], Value::Device(_)), "{} left the device", p.path);
        }
        let ((a, ga), (b, gb)) = (read[0], read[1]);
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + b.abs()) && (ga - gb).abs() <= 1e-5 * (1.0 + gb.abs()),
            "step {step}: device ({a}, {ga}), CPU ({b}, {gb})"
        );
    }
    // The state copied out once at the end equals the CPU's.
    let copied = total(&dev).down;
    for p in &plan.params {
        let (d, c) = (values(&dev_state[&p.path]), values(&cpu_state[&p.path]));
        for (x, y) in d.iter().zip(&c) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{}: {x} vs {y}", p.path);
        }
    }
    let param_bytes: usize = plan.params.iter().map(|p| p.shape.iter().product::<usize>() * 4).sum();
    assert_eq!((total(&dev).down - copied) as usize, param_bytes);
}

/// A training job's programs run in one arena (they never run at once), as large as the
/// largest program's arena rather than their sum; on the CPU and the CUDA emulator, whose
/// results the other tests check. `Programs::job_bytes` (what `recipec build` prints and a
/// GPU run checks against the free memory) predicts that arena and the state the loop keeps.
#[test]
fn the_programs_of_a_job_share_one_arena() {
    let plan = plan_of(
        &MLP.replace("    grad_clip = 0.1\n", "    sparsify model.w1 with nm(n = 2, m = 4)\n    grad_clip = 0.1\n"),
    );
    let mut backends = vec![Backend::Cranelift];
    if runtime::cuda_emu::available().is_ok() {
        backends.push(Backend::CudaEmu);
    }
    for backend in backends {
        let progs = Programs::new(&plan, backend).unwrap();
        let mut state = initial_state(&plan, &progs).unwrap();
        let step = BTreeMap::from([("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, 1.0)))]);
        run_named(progs.masks.as_ref().unwrap(), &mut state, step, 0).unwrap();
        let x = Tensor::new(Dtype::I32, vec![2, 4], (0..8).map(|i| (i * 13 % 100) as f64).collect());
        let batch = || -> BTreeMap<String, Buffer> {
            ["batch.inputs", "batch.targets"].iter().map(|n| (n.to_string(), Buffer::from_tensor(&x))).collect()
        };
        run_named(&progs.grad, &mut state, batch(), 0).unwrap();
        let step = BTreeMap::from([("step".to_string(), Buffer::from_tensor(&Tensor::scalar(Dtype::I32, 1.0)))]);
        run_named(&progs.update, &mut state, step, 0).unwrap();
        run_named(&progs.eval, &mut state, batch(), 0).unwrap();
        let sizes: Vec<usize> = [&progs.init, &progs.grad, &progs.eval, &progs.update, &progs.update_steady]
            .iter()
            .map(|r| r.program().arena_bytes)
            .collect();
        let largest = *sizes.iter().max().unwrap();
        assert_eq!(progs.arenas.host.bytes(), largest.div_ceil(64) * 64, "{backend:?}: {sizes:?}");
        assert!(sizes.iter().sum::<usize>() > largest, "{sizes:?}");
        let (arena, kept) = progs.job_bytes();
        assert_eq!(arena, largest.max(progs.masks.as_ref().unwrap().program().arena_bytes));
        let held: usize = state.values().map(|v| v.bytes()).sum();
        assert_eq!(
            kept,
            held,
            "{backend:?}: predicted state vs what the loop holds: {:?}",
            state.keys().collect::<Vec<_>>()
        );
    }
}

const SMALL_GPT: &str = "gpt(V = 256, D = 16, L = 2, H = 2, T = 16)";

/// An empty directory `recipec-NAME-PID` under the system's temporary directory.
fn empty_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("recipec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Trains `src` (a recipe file in `dir`) for `steps` steps into `dir/out` and returns the
/// logged losses.
fn train_in(dir: &std::path::Path, src: &str, out: &str, steps: usize, resume: bool) -> Vec<f64> {
    let plan = plan_of(src);
    let opts = runtime::train::TrainOptions {
        steps: Some(steps),
        checkpoint_every: None,
        out: dir.join(out),
        resume: resume.then(|| dir.join(out)),
        backend: Backend::Cranelift,
        progress_bar: false,
        source: src.to_string(),
        source_path: dir.join("t.recipe"),
        sources: None,
    };
    runtime::train::train(&plan, &opts, &mut std::io::sink()).unwrap_or_else(|e| panic!("{}", e.0));
    std::fs::read_to_string(dir.join(out).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}

fn distill_recipe(loss: &str, extra: &str) -> String {
    format!(
        "use std.models.gpt\nuse std.loss.{{cross_entropy, squarehead}}\nuse std.optim.adamw\nuse std.sparsity.nm\n\n\
         recipe student {{\n    model = {SMALL_GPT}\n    init_from = \"teacher\"\n    teacher = {SMALL_GPT}\n    \
         teacher_from = \"teacher\"\n    data = text(\"embedded:kjv\", context = 16, batch = 2)\n    loss = {loss}\n    \
         optimize model.** with adamw(lr = 1e-2)\n    log_every = 1\n    seed = 3\n{extra}}}\n"
    )
}

/// `init_from` starts the model at another run's parameters and `teacher` reads them into a
/// frozen second model: a student started from its teacher has SquareHead loss 0 exactly (the
/// two hold the same values under their own names), a loss with cross-entropy moves the
/// student and never the teacher (its loss stays 0 only while the student has not moved),
/// the checkpoint holds no teacher, and resuming reloads it and gives the same losses.
#[test]
fn a_student_starts_from_its_teacher_which_stays_frozen() {
    let dir = empty_dir("distill");
    let teacher = format!(
        "use std.models.gpt\nuse std.loss.cross_entropy\nuse std.optim.adamw\n\nrecipe teacher {{\n    \
         model = {SMALL_GPT}\n    data = text(\"embedded:kjv\", context = 16, batch = 2)\n    \
         loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))\n    \
         optimize model.** with adamw(lr = 1e-2)\n}}\n"
    );
    train_in(&dir, &teacher, "teacher", 5, false);
    let sq = "squarehead(model.hidden_states(batch.inputs), teacher.hidden_states(batch.inputs), ones(shape = [32]))";
    let zero = train_in(&dir, &distill_recipe(sq, ""), "only_squarehead", 3, false);
    assert_eq!(zero, vec![0.0; 3], "a student equal to its teacher");

    // Cross-entropy plus SquareHead under 2:4 sparsity: the loss at step 1 exceeds the plain
    // cross-entropy (the pruned MLP differs from the teacher), and the teacher's value is the
    // checkpoint's, so the SquareHead term alone at a fresh student is 0 again afterwards.
    let ce = "cross_entropy(model.logits(batch.inputs), flatten(batch.targets))";
    let both = format!("{ce} +\n        {sq}");
    let sparse = "    sparsify model.blocks.*.mlp.w1 with nm(n = 2, m = 4)\n";
    let full = train_in(&dir, &distill_recipe(&both, sparse), "full", 6, false);
    let plain = train_in(&dir, &distill_recipe(ce, sparse), "plain", 1, false);
    assert!(full[0] > plain[0], "SquareHead adds to the loss of a pruned student: {full:?} vs {plain:?}");
    let ck = runtime::checkpoint::Checkpoint::load(&dir.join("full").join("checkpoint.safetensors")).unwrap();
    assert!(ck.tensors.keys().all(|k| !k.contains("teacher")), "the checkpoint holds no teacher");
    let again = train_in(&dir, &distill_recipe(sq, ""), "again", 1, false);
    assert_eq!(again, vec![0.0], "the teacher checkpoint is untouched");

    // Stopped after 3 steps and resumed to 6: the same losses bit for bit.
    let src = distill_recipe(&both, sparse);
    let first = train_in(&dir, &src, "resumed", 3, false);
    let rest = train_in(&dir, &src, "resumed", 6, true);
    assert_eq!(first[..], full[..3]);
    assert_eq!(rest[..], full[..], "resumed run");

    // The teacher trained on after the student started: resuming the student is refused at
    // `teacher_from` (the checkpoint records which teacher it started with), nothing written.
    let meta = runtime::checkpoint::Checkpoint::read_metadata(&dir.join("resumed").join("checkpoint.safetensors"));
    assert!(meta.unwrap().contains_key("teacher_digest"));
    train_in(&dir, &teacher, "teacher", 7, true);
    let before = std::fs::read(dir.join("resumed").join("checkpoint.safetensors")).unwrap();
    let e = runtime::train::load_sources(&plan_of(&src), &dir, Some(&dir.join("resumed"))).unwrap_err();
    assert!(e.message.contains("is not the one the run in"), "{}", e.message);
    assert_eq!(&src[e.span.range()], "\"teacher\"");
    assert!(src[..e.span.range().start].ends_with("teacher_from = "), "the span is teacher_from's string");
    let opts = runtime::train::TrainOptions {
        steps: Some(8),
        checkpoint_every: None,
        out: dir.join("resumed"),
        resume: Some(dir.join("resumed")),
        backend: Backend::Cranelift,
        progress_bar: false,
        source: src.clone(),
        source_path: dir.join("t.recipe"),
        sources: None,
    };
    let e = runtime::train::train(&plan_of(&src), &opts, &mut std::io::sink()).unwrap_err();
    assert!(e.0.contains("is not the one the run in"), "{}", e.0);
    assert_eq!(std::fs::read(dir.join("resumed").join("checkpoint.safetensors")).unwrap(), before);

    // A checkpoint of another model: refused before training, at the string that names it.
    let other = distill_recipe(ce, "")
        .replace(&format!("teacher = {SMALL_GPT}"), "teacher = gpt(V = 256, D = 32, L = 2, H = 2, T = 16)");
    let plan = plan_of(&other);
    let e = runtime::train::load_sources(&plan, &dir, None).unwrap_err();
    assert!(e.message.contains("`model.wte` is f32[256, 16] in the checkpoint but f32[256, 32]"), "{}", e.message);
    assert_eq!(&other[e.span.range()], "\"teacher\"");
    let missing = distill_recipe(ce, "").replace("init_from = \"teacher\"", "init_from = \"nowhere\"");
    let e = runtime::train::load_sources(&plan_of(&missing), &dir, None).unwrap_err();
    assert!(e.message.contains("nowhere"), "{}", e.message);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The validation losses a run logged (`val_loss` lines of its metrics).
fn val_losses(dir: &std::path::Path, out: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(out).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("val_loss")?.as_f64())
        .collect()
}

/// MatryoshkaKV on a trained GPT (`recipes/matryoshka_kv.recipe` in small): `init_from` a
/// `gpt` run starts `matryoshka_gpt` at that model, its new rotations from their
/// initializers; at the full rank the student is the teacher (KL ≈ 0, rounding only); at a
/// quarter of each head's coordinates, training the rotations alone lowers the KL far below
/// the PCA basis they start from (same validation windows), and every other parameter stays
/// the teacher's, bit for bit. The data makes attention matter: each token repeats the one six
/// back with probability 0.8. A `gpt` recipe cannot start from the MatryoshkaKV run (its
/// checkpoint holds parameters the model lacks): refused at `init_from`.
#[test]
fn matryoshka_rotations_keep_the_teacher_at_a_quarter_of_the_cache() {
    let dir = empty_dir("matryoshka");
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut tokens: Vec<f64> = vec![];
    for t in 0..64000 {
        let fresh = (next() % 16) as f64;
        tokens.push(if t >= 6 && next() % 10 < 8 { tokens[t - 6] } else { fresh });
    }
    let t = Tensor { dtype: Dtype::I32, shape: vec![tokens.len()], data: tokens };
    std::fs::write(dir.join("copy.npy"), runtime::npy::write(&t)).unwrap();
    let small = "gpt(V = 16, D = 32, L = 2, H = 2, T = 16)";
    let data = "tokens(\"copy.npy\", context = 16, batch = 16)";
    let teacher = format!(
        "use std.models.gpt\nuse std.loss.cross_entropy\nuse std.optim.adamw\n\nrecipe teacher {{\n    \
         model = {small}\n    data = {data}\n    \
         loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))\n    \
         optimize model.** with adamw(lr = 1e-2)\n}}\n"
    );
    let losses = train_in(&dir, &teacher, "teacher", 600, false);
    assert!(losses.last().unwrap() < &2.0, "the teacher learns to copy: {losses:?}");
    let student = |rank: &str, lr: &str| {
        format!(
            "use std.models.{{gpt, matryoshka_gpt}}\nuse std.loss.distill_kl\nuse std.optim.adamw\n\n\
             recipe mkv {{\n    model = matryoshka_{small}\n    init_from = \"teacher\"\n    teacher = {small}\n    \
             teacher_from = \"teacher\"\n    data = {data}\n    let x = batch.inputs\n    \
             loss = distill_kl(model.logits_at(x, {rank}, {rank}), teacher.logits(x), flatten(batch.targets))\n    \
             optimize model.blocks.*.attn.{{rot_k, rot_v}} with adamw(lr = {lr}, weight_decay = 0.0)\n    \
             eval_every = 100\n    log_every = 1\n}}\n"
        )
    };
    let full = train_in(&dir, &student("16", "1e-2"), "full", 3, false);
    assert!(full.iter().all(|l| l.abs() < 1e-6), "at the full rank the student is its teacher: {full:?}");
    train_in(&dir, &student("4", "0.0"), "pca", 100, false);
    train_in(&dir, &student("4", "3e-3"), "trained", 100, false);
    let (pca, trained) = (val_losses(&dir, "pca")[0], val_losses(&dir, "trained")[0]);
    assert!(pca > 0.05, "a quarter of the cache loses much at the PCA basis: {pca}");
    assert!(trained < 0.2 * pca, "trained rotations keep far more than the PCA basis: {trained} vs {pca}");

    let ck = |run: &str| {
        runtime::checkpoint::Checkpoint::load(&dir.join(run).join("checkpoint.safetensors")).unwrap().tensors
    };
    let (t, s) = (ck("teacher"), ck("trained"));
    let mut moved = 0;
    for (name, b) in s.iter().filter(|(k, _)| k.starts_with("model.")) {
        match t.get(name) {
            Some(tb) => assert_eq!(tb.as_bytes(), b.as_bytes(), "{name} is frozen"),
            None => {
                assert!(name.ends_with("rot_k") || name.ends_with("rot_v"), "{name}");
                moved += b.to_tensor().data.iter().any(|v| *v != 0.0) as usize;
            }
        }
    }
    assert_eq!(moved, 4, "every rotation trained");

    // Sampling the trained student with its caches cut to a quarter (`recipec sample
    // --logits "logits_cached(4, 4)"`): the KV-cached step (caches of 4 of 16 coordinates per
    // head) and the whole-window step choose the same tokens, and the caches take a quarter of
    // the full rank's bytes. The bases (an SVD and a solve per head) are computed once, before
    // the first token (`compiler::hoist`), not per step.
    let src = student("4", "3e-3")
        .replace("    eval_every", "    decode = greedy()\n    eval_every")
        .replace("use std.optim.adamw", "use std.optim.adamw\nuse std.decode.greedy");
    let mut db = SourceDb::new();
    let root = db.add("t.recipe", src.as_str());
    let calls: Vec<(lang::source::FileId, &str)> =
        ["logits_cached(4, 4)", "logits_cached(16, 16)"].iter().map(|c| (db.add(*c, *c), *c)).collect();
    let analysis = lang::analyze(&mut db, &[root], &loader());
    let m = &analysis.modules.list[0];
    let r = ItemRef {
        module: 0,
        item: m.ast.items.iter().position(|i| matches!(i.kind, lang::ast::ItemKind::Recipe(_))).unwrap(),
    };
    let plan = compiler::train::plan(&analysis.modules, &db, r).unwrap();
    let state = runtime::train::load_state(&plan, &dir.join("trained").join("checkpoint.safetensors")).unwrap().0;
    let lang::ast::ItemKind::Recipe(rec) = &analysis.modules.item(r).kind else { unreachable!() };
    let policy = rec.field("decode").unwrap();
    let mut runs = vec![];
    for (f, call) in &calls {
        let e = lang::parse::parse_expr(*f, call).unwrap();
        let g = compiler::train::decode_graph(&analysis.modules, &db, r, policy, &[], 16, Some((&e, *f))).unwrap();
        for mode in [runtime::train::Decoding::Cached, runtime::train::Decoding::Window] {
            let job = runtime::train::Generation {
                decode: &g,
                state: &state,
                context: 16,
                prompt: &[1, 2, 3],
                tokens: 24,
                seed: 0,
                backend: Backend::Cranelift,
            };
            let s = runtime::train::sample(&job, mode, None, &mut std::io::sink()).unwrap();
            runs.push((s.tokens, s.caches));
        }
    }
    assert_eq!(runs[0].0, runs[1].0, "cached and window steps at rank 4");
    assert_eq!(runs[2].0, runs[3].0, "cached and window steps at rank 16");
    assert_eq!(runs[0].1 .1 * 4, runs[2].1 .1, "caches at rank 4 vs 16: {:?} {:?}", runs[0].1, runs[2].1);

    let back = teacher.replace("optimize", "init_from = \"trained\"\n    optimize");
    let e = runtime::train::load_sources(&plan_of(&back), &dir, None).unwrap_err();
    assert!(e.message.contains("`model.blocks.0.attn.rot_k` is no parameter of the recipe's model"), "{}", e.message);
    assert_eq!(&back[e.span.range()], "\"trained\"");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Constrained sampling by sequential Monte Carlo with AWRS: for a one-byte constraint the
/// estimate of the constraint's probability (the mean of the particles' AWRS weights, each
/// unbiased) matches the exact allowed mass of the model's next-token distribution, computed
/// here from the whole-window decode graph, within 5 standard errors over 4,000 particles;
/// every particle's token is allowed, and the same seed gives the same text.
#[test]
fn smc_with_awrs_estimates_the_allowed_mass() {
    let dir = empty_dir("smc");
    let src = format!(
        "use std.models.gpt\nuse std.loss.cross_entropy\nuse std.optim.adamw\nuse std.decode.greedy\n\n\
         recipe r {{\n    model = {SMALL_GPT}\n    data = text(\"embedded:kjv\", context = 16, batch = 2)\n    \
         loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))\n    \
         optimize model.** with adamw(lr = 1e-2)\n    decode = greedy()\n}}\n"
    );
    train_in(&dir, &src, "run", 20, false);
    let plan = plan_of(&src);
    let (state, _) = runtime::train::load_state(&plan, &dir.join("run").join("checkpoint.safetensors")).unwrap();
    let decode = plan.decode.clone().expect("a decode graph");
    let prompt = b"And the ";
    // The exact next-token distribution after the prompt.
    let exe = runtime::train::compile(&decode, Backend::Cranelift).unwrap();
    let mut st: BTreeMap<String, Value> = state
        .iter()
        .filter(|(k, _)| exe.program().input_names.contains(k))
        .map(|(k, b)| (k.clone(), Value::Host(b.clone())))
        .collect();
    let mut toks: Vec<i32> = prompt.iter().map(|&b| b as i32).collect();
    let pos = toks.len() - 1;
    toks.resize(16, 0);
    let mut extra = BTreeMap::new();
    let i32s = |shape: Vec<usize>, v: &[i32]| {
        Buffer::from_bytes(Dtype::I32, shape, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    };
    extra.insert("tokens".to_string(), i32s(vec![1, 16], &toks));
    extra.insert("pos".to_string(), i32s(vec![], &[pos as i32]));
    run_named(exe.as_ref(), &mut st, extra, 0).unwrap();
    let logits = st["logits"].host().unwrap().to_tensor().data;
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = logits.iter().map(|x| (x - max).exp()).sum();
    let vowels = b"aeiou";
    let z: f64 = vowels.iter().map(|&v| (logits[v as usize] - max).exp() / total).sum();
    assert!(z > 0.01 && z < 0.99, "a constraint that tests something: Z = {z}");

    let regex = runtime::constraint::ByteConstraint::new("[aeiou]").unwrap();
    let n = 4000;
    let run = |seed: u64| {
        let job = runtime::train::Generation {
            decode: &decode,
            state: &state,
            context: 16,
            prompt,
            tokens: 5,
            seed,
            backend: Backend::Cranelift,
        };
        runtime::train::sample_smc(&job, &regex, n).unwrap()
    };
    let a = run(7);
    assert_eq!(a.tokens.len(), 1, "one byte, then no byte may follow");
    assert!(vowels.contains(&(a.tokens[0] as u8)));
    assert_eq!(a.complete, n);
    let se = (z / n as f64).sqrt(); // w ∈ [0, 1], so Var(w) ≤ E[w] = Z
    eprintln!("SMC estimate {} vs exact {z} (5 SE = {})", a.log_z.exp(), 5.0 * se);
    assert!((a.log_z.exp() - z).abs() <= 5.0 * se, "SMC estimate {} vs exact {z}", a.log_z.exp());
    assert_eq!(run(7).tokens, a.tokens);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `let` in a recipe names a subexpression of the loss: training with the names gives the
/// same losses, bit for bit, as the loss written out.
#[test]
fn recipe_lets_train_as_the_loss_written_out() {
    let dir = empty_dir("lets");
    let recipe = |lets: &str, loss: &str| {
        format!(
            "use std.models.gpt\nuse std.loss.cross_entropy\nuse std.optim.adamw\n\nrecipe r {{\n    \
             model = {SMALL_GPT}\n    data = text(\"embedded:kjv\", context = 16, batch = 2)\n{lets}    \
             loss = {loss}\n    optimize model.** with adamw(lr = 1e-2)\n    log_every = 1\n}}\n"
        )
    };
    let inline = recipe(
        "",
        "cross_entropy(model.logits(batch.inputs), flatten(batch.targets)) + 0.1 * mean(model.logits(batch.inputs) ^ 2)",
    );
    let named = recipe(
        "    let z = model.logits(batch.inputs)\n    let penalty = 0.1 * mean(z ^ 2)\n",
        "cross_entropy(z, flatten(batch.targets)) + penalty",
    );
    let a = train_in(&dir, &inline, "inline", 3, false);
    let b = train_in(&dir, &named, "named", 3, false);
    assert_eq!(a.len(), 3);
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A recipe's constant `let`s may size the model, set the steps and feed the schedule: the
/// plan and the losses are those of the recipe with the values written out.
#[test]
fn constant_recipe_lets_train_as_the_values_written_out() {
    let dir = empty_dir("constant-lets");
    let written = "use std.models.gpt\nuse std.loss.cross_entropy\nuse std.optim.adamw\nuse std.schedule.wsd\n\n\
        recipe r {\n    model = gpt(V = 256, D = 16, L = 2, H = 2, T = 8)\n    \
        data = text(\"embedded:kjv\", context = 8, batch = 2)\n    steps = 6\n    log_every = 1\n    \
        loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))\n    \
        optimize model.** with adamw(lr = wsd(peak = 2e-2, total = 6, warmup = 2))\n}\n";
    let named = "use std.models.gpt\nuse std.loss.cross_entropy\nuse std.optim.adamw\nuse std.schedule.wsd\n\n\
        recipe r {\n    let width = 16\n    let total = 6\n    let context = width / 2\n    let peak = 2e-2\n    \
        model = gpt(V = 256, D = width, L = 2, H = 2, T = context)\n    \
        data = text(\"embedded:kjv\", context = context, batch = 2)\n    steps = total\n    log_every = 1\n    \
        loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))\n    \
        optimize model.** with adamw(lr = wsd(peak = peak, total = total, warmup = total / 3))\n}\n";
    let (a, b) = (plan_of(written), plan_of(named));
    assert_eq!(a.settings, b.settings);
    assert_eq!(a.settings.steps, 6);
    assert_eq!((a.data.context, b.data.context), (8, 8));
    let shapes = |p: &TrainPlan| p.params.iter().map(|p| (p.path.clone(), p.shape.clone())).collect::<Vec<_>>();
    assert_eq!(shapes(&a), shapes(&b));
    let la = train_in(&dir, written, "written", 6, false);
    let lb = train_in(&dir, named, "named", 6, false);
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// LOST's layer (`std.models.lost_linear`): one random matrix, drawn by the model's `let`,
/// initializes all four parameters. The coupling shows in the initial values: `b`'s columns and
/// `a`'s rows have the same norms (√σ_i), and the sparse columns are orthogonal to `b`'s span
/// (they are the residual's). The layer holds R·(I + O) + C·O weights, and its forward pass is
/// the dense product with W = B·A + S scattered to the kept channels. Training `model.**`
/// moves `a`, `b`, `s` and leaves the channel indices, a `buffer` (i32), as they were.
#[test]
fn lost_layers_split_one_draw_and_train_with_the_channel_buffer_untouched() {
    let src = "use std.models.lost_linear\nuse std.loss.cross_entropy\nuse std.optim.adamw\n\n\
        model lm(D: i32 = 16) {\n    param emb: f32[256, D] = normal(std = 0.5)\n    \
        sub fc = lost_linear(I = D, O = 256, R = 4, C = 3, std = 0.5)\n\n    \
        fn logits(tokens: i32[B, S]) -> f32[B * S, 256] {\n        fc.forward(reshape(emb[tokens], [B * S, D]))\n    }\n}\n\n\
        recipe r {\n    model = lm()\n    data = text(\"embedded:kjv\", context = 4, batch = 2)\n    \
        loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))\n    \
        optimize model.** with adamw(lr = 1e-2)\n    log_every = 1\n}\n";
    let plan = plan_of(src);
    let spec = |path: &str| plan.params.iter().find(|p| p.path == path).unwrap();
    assert_eq!(spec("model.fc.channels").optimizer, None, "`model.**` took the buffer");
    assert_eq!(spec("model.fc.s").optimizer.as_deref(), Some("adamw"));
    let progs = Programs::new(&plan, Backend::Cranelift).unwrap();
    let mut state = initial_state(&plan, &progs).unwrap();
    let t = |name: &str| tensor(&state[name]);
    let (b, a, s, ch) = (t("model.fc.b"), t("model.fc.a"), t("model.fc.s"), t("model.fc.channels"));
    let emb = t("model.emb");
    let (o, i, r, c) = (256, 16, 4, 3);
    assert_eq!((b.shape.clone(), a.shape.clone(), s.shape.clone()), (vec![o, r], vec![r, i], vec![o, c]));
    let weights: usize = [&b, &a, &s].iter().map(|x| x.data.len()).sum();
    assert_eq!(weights, r * (i + o) + c * o);
    let kept: Vec<usize> = ch.data.iter().map(|x| *x as usize).collect();
    assert!(ch.data.iter().all(|x| x.fract() == 0.0 && *x >= 0.0 && (*x as usize) < i), "{:?}", ch.data);
    assert_eq!(kept.iter().collect::<std::collections::BTreeSet<_>>().len(), c);
    for k in 0..r {
        let col: f64 = (0..o).map(|x| b.data[x * r + k].powi(2)).sum::<f64>().sqrt();
        let row: f64 = (0..i).map(|y| a.data[k * i + y].powi(2)).sum::<f64>().sqrt();
        assert!((col - row).abs() < 1e-4 * col, "factor {k}: |b_k| {col} vs |a_k| {row}");
        for y in 0..c {
            let dot: f64 = (0..o).map(|x| b.data[x * r + k] * s.data[x * c + y]).sum();
            assert!(dot.abs() < 1e-4 * col, "s[:, {y}] not orthogonal to b[:, {k}]: {dot}");
        }
    }
    // The forward pass is the dense layer W = B·A plus S's columns at the kept channels: the
    // recipe's loss on a batch, against cross-entropy computed here with that W.
    let mut w = vec![0.0f64; o * i];
    for row in 0..o {
        for col in 0..i {
            w[row * i + col] = (0..r).map(|k| b.data[row * r + k] * a.data[k * i + col]).sum();
        }
        for (k, &col) in kept.iter().enumerate() {
            w[row * i + col] += s.data[row * c + k];
        }
    }
    let tokens = [65usize, 110, 100, 32, 71, 111, 100, 10];
    let mut want = 0.0;
    for &tok in &tokens {
        let h = &emb.data[tok * i..(tok + 1) * i];
        let z: Vec<f64> = (0..o).map(|row| (0..i).map(|col| w[row * i + col] * h[col]).sum()).collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        want += m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - z[tok];
    }
    want /= tokens.len() as f64;
    let got = eval_loss(&progs, &mut state);
    assert!((got - want).abs() < 1e-4 * want.abs(), "loss {got} vs the dense layer's {want}");
    let dir = empty_dir("lost");
    let losses = train_in(&dir, src, "run", 8, false);
    assert_eq!(losses.len(), 8);
    assert!(losses[7] < losses[0], "{losses:?}");
    let ck = runtime::checkpoint::Checkpoint::load(&dir.join("run").join("checkpoint.safetensors")).unwrap();
    let f = |n: &str| ck.tensors[n].f32s().iter().map(|x| *x as f64).collect::<Vec<_>>();
    assert_eq!(ck.tensors["model.fc.channels"].to_tensor().data, ch.data);
    assert_eq!(ck.tensors["model.fc.channels"].dtype, Dtype::I32);
    assert_ne!(f("model.fc.s"), s.data);
    assert_ne!(f("model.fc.b"), b.data);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loss that writes the same forward pass more than once, each copy with another use (as
/// a distillation loss calls `features` and `hidden_states`), gets one backward pass through
/// it: its gradient graph has as many matrix products as the loss that computes it once.
#[test]
fn a_forward_pass_written_twice_is_differentiated_once() {
    let src = |loss: &str| {
        format!(
            "use std.optim.sgd\n\nmodel two(I: i32) {{\n    param w: f32[I, I] = normal(std = 0.1)\n\n    \
             fn f(x: f32[N, I]) -> f32[N, I] {{\n        tanh(x @ w) @ w\n    }}\n\n    \
             fn once(x: f32[N, I]) -> f32 {{\n        let y = f(x)\n        mean(y) + mean(y * y)\n    }}\n\n    \
             fn twice(x: f32[N, I]) -> f32 {{\n        mean(f(x)) + mean(f(x) * f(x))\n    }}\n}}\n\n\
             recipe r {{\n    model = two(I = 4)\n    data = text(\"embedded:kjv\", context = 4, batch = 2)\n    \
             loss = model.{loss}(f32(batch.inputs) / 100.0)\n    optimize model.** with sgd(lr = 0.1)\n}}\n"
        )
    };
    let matmuls = |loss: &str| {
        let mut g = plan_of(&src(loss)).grad;
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        g.topo().into_iter().filter(|n| matches!(g.node(*n).op, compiler::ir::Op::MatMul)).count()
    };
    let (once, twice) = (matmuls("once"), matmuls("twice"));
    assert!(once >= 4, "{once}");
    assert_eq!(twice, once, "matrix products: {twice} with the forward pass written three times, {once} once");
}

/// `recipec compress`'s database is the stdlib's `quantize_groups` computed on the host
/// (runtime::compress::quantize_groups): the same bits as the interpreter's, for every level
/// and group the command offers.
#[test]
fn compress_quantizes_as_the_stdlib_function() {
    use compiler::lower::Arg;
    let mut db = SourceDb::new();
    let root = db.add("t.recipe", "use std.sparsity.quantize_groups\n");
    let analysis = lang::analyze(&mut db, &[root], &loader());
    assert!(!analysis.has_errors(), "{:?}", analysis.diagnostics);
    let module =
        analysis.modules.list.iter().position(|m| m.items.contains_key("quantize_groups") && m.items.len() > 1);
    let module = module.expect("std.sparsity");
    let r = ItemRef { module, item: analysis.modules.list[module].items["quantize_groups"] };
    let (m, n) = (6usize, 128usize);
    // Values on several scales, exact zeros and a group of zeros (scale 0).
    let mut w: Vec<f64> = (0..m * n).map(|i| ((i * 7919 % 1013) as f64 / 1013.0 - 0.5) * (1 + i % 5) as f64).collect();
    w[..16].iter_mut().for_each(|x| *x = 0.0);
    w[40] = 0.0;
    for bits in 2..=8u32 {
        // The last row: scale exactly 1 (its largest magnitude is the top level) and values
        // halfway between levels, which round to the even one.
        let top = ((1 << (bits - 1)) - 1) as f64;
        let mut w = w.clone();
        w[(m - 1) * n..].iter_mut().for_each(|x| *x = 0.0);
        w[(m - 1) * n..(m - 1) * n + 5].copy_from_slice(&[top, 0.5, -0.5, 1.5, -1.5]);
        let w = Tensor::new(Dtype::F32, vec![m, n], w.iter().map(|&x| x as f32 as f64).collect());
        for group in [16usize, 64, 128] {
            let args = vec![
                ("w".to_string(), Arg::Tensor(Dtype::F32, vec![m, n])),
                ("bits".to_string(), Arg::Scalar(bits as f64)),
                ("group".to_string(), Arg::Scalar(group as f64)),
            ];
            let g = compiler::entry::function(&analysis.modules, &db, r, &args, false).unwrap();
            let want = interp::run(&g, std::slice::from_ref(&w), 0).unwrap();
            let want = &want.values().next().unwrap().data;
            let host: Vec<f32> = w.data.iter().map(|&x| x as f32).collect();
            let got = runtime::compress::quantize_groups(&host, n, bits, group).unwrap();
            let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            assert_eq!(&got, want, "bits {bits}, group {group}");
        }
    }
}
