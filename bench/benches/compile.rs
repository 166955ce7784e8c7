//! Compile time of `recipes/tiny_gpt.recipe`'s training step with Cranelift, stage by stage
//! (`cargo bench -p bench --bench compile`; goal: under 1 s), and the time of one training
//! step (forward and backward of the ~1M-parameter GPT on 16 x 128 tokens) on the generated
//! code, as a first number for the training loop.

use bench::median;
use compiler::interp::Tensor;
use lang::source::{MemoryLoader, SourceDb};
use lang::types::{Dtype, ItemRef};
use runtime::{Backend, Buffer, Executable};
use std::time::Instant;

fn main() {
    let path = bench::root().join("recipes/tiny_gpt.recipe");
    let text = std::fs::read_to_string(&path).expect("the example recipe");
    let rounds = if bench::smoke() { 2 } else { 5 };
    let mut stages: Vec<Vec<f64>> = vec![vec![]; 5];
    let mut exe = None;
    for _ in 0..rounds {
        let t0 = Instant::now();
        let mut loader = MemoryLoader::default();
        for (m, f, t) in stdlib::MODULES {
            loader = loader.with(m, &format!("<std>/{f}"), t);
        }
        let mut db = SourceDb::new();
        let root = db.add("recipes/tiny_gpt.recipe", text.clone());
        let analysis = lang::analyze(&mut db, &[root], &loader);
        assert!(!analysis.has_errors());
        let t1 = Instant::now();
        let mods = &analysis.modules;
        let i = mods.list[0].items["tiny_gpt"];
        let mut g = compiler::entry::recipe_step(mods, &db, ItemRef { module: 0, item: i }).expect("lowers");
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).expect("pipeline");
        let t2 = Instant::now();
        let p = compiler::kernel::schedule(&g).expect("schedules");
        let t3 = Instant::now();
        let e = Executable::new(p, Backend::Cranelift).expect("compiles");
        let t4 = Instant::now();
        for (k, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4)].iter().enumerate() {
            stages[k].push((*b - *a).as_secs_f64());
        }
        exe = Some((e, g));
    }
    let (exe, g) = exe.unwrap();
    println!(
        "recipes/tiny_gpt.recipe training step: {} graph nodes, {} kernels",
        g.node_count(),
        exe.program.kernels.len()
    );
    for (name, v) in [
        "check (front end)",
        "lower + autodiff + passes",
        "schedule (fusion, plan)",
        "Cranelift code generation",
        "total",
    ]
    .iter()
    .zip(&stages)
    {
        println!("  {name:<28} median {:>8.1} ms", median(v) * 1e3);
    }
    println!("  (goal: total under 1000 ms)");

    // One training step on deterministic inputs.
    let mut args: Vec<Buffer> = g
        .inputs
        .iter()
        .enumerate()
        .map(|(k, id)| {
            let n = g.node(*id);
            let numel: usize = n.shape.iter().product();
            let data = (0..numel)
                .map(|i| {
                    if n.dtype == Dtype::I32 {
                        ((i * 7 + k) % 256) as f64
                    } else {
                        (((i * 2654435761 + k) % 1000) as f64 / 1000.0 - 0.5) * 0.1
                    }
                })
                .collect();
            Buffer::from_tensor(&Tensor::new(n.dtype, n.shape.clone(), data))
        })
        .collect();
    let steps = if bench::smoke() { 2 } else { 10 };
    let times = bench::time(steps, || {
        exe.run(&mut args, 0).expect("runs");
    });
    let tokens = 16.0 * 128.0;
    println!(
        "  one training step (loss and all gradients): median {:.1} ms, {:.0} tokens/s ({} threads)",
        median(&times) * 1e3,
        tokens / median(&times),
        rayon::current_num_threads()
    );
    if let Some(r) = exe.profile_report(15) {
        print!("{r}");
    }
}
