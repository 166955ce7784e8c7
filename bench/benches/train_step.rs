//! One training step of `recipes/tiny_gpt.recipe` (the ~1M-parameter GPT on 16 x 128 tokens:
//! forward, linear cross-entropy, every gradient, AdamW on the WSD schedule) as
//! `recipec train` runs it, against the same model and optimizer in JAX on CPU
//! (`jax.jit` of `value_and_grad` + `optax.adamw`, parameters donated), interleaved round by
//! round in one run. `cargo bench -p bench [--features llvm] --bench train_step`; goal: at
//! least as fast as JAX.

use bench::{median, report, smoke, time, Peer};
use runtime::train::{initial_state, Programs};
use runtime::Backend;

fn main() {
    let plan = bench::tiny_gpt_plan();
    let (b, t) = (plan.data.batch, plan.data.context);
    #[allow(unused_mut)]
    let mut backends = vec![("recipec (cranelift)", Backend::Cranelift)];
    #[cfg(feature = "llvm")]
    backends.push(("recipec (llvm)", Backend::Llvm));
    let mut runners = vec![];
    for (name, be) in &backends {
        let progs = Programs::new(&plan, *be).expect("compiles");
        let state = initial_state(&plan, &progs).expect("initializes");
        runners.push((*name, progs, state, 0usize));
    }
    let batch = bench::byte_batch(b, t);
    let mut peer = match Peer::start() {
        Ok(mut p) => {
            p.send(&format!("gpt {b} {t} 256 128 5 4"));
            assert_eq!(p.line(), "ready");
            Some(p)
        }
        Err(e) => {
            println!("JAX peer skipped: {e}");
            None
        }
    };
    let (rounds, steps) = if smoke() { (2, 2) } else { (5, 5) };
    let mut results = vec![];
    for _ in 0..rounds {
        let mut row = vec![];
        for (_, progs, state, k) in runners.iter_mut() {
            row.push(median(&time(steps, || bench::train_step(progs, state, &batch, k).expect("step"))));
        }
        row.push(peer.as_mut().map(|p| median(&p.run(steps))).unwrap_or(f64::NAN));
        results.push(row);
    }
    let tok = (b * t) as f64;
    // Each recipec backend against JAX, from the same interleaved rounds.
    let jax = runners.len();
    for (i, r) in runners.iter().enumerate() {
        let rows: Vec<Vec<f64>> = results.iter().map(|row| vec![row[i], row[jax]]).collect();
        report(
            &format!("one training step of recipes/tiny_gpt.recipe (16 x 128 tokens): {}", r.0),
            &|s| format!("{:>7.0} tokens/s", tok / s),
            &[r.0, "jax.jit + optax.adamw"],
            &rows,
        );
    }
    println!("  (ratios above 1.00x mean recipec is faster; goal: at least as fast as JAX)");
}
