//! A recipe's training step end to end on the interpreter: the tiny GPT of `std.models`
//! lowered with its loss and the gradients of every parameter, checked against finite
//! differences of the loss (in f32, so with a tolerance of a few percent), and its memory
//! plan verified.

mod common;
use common::*;
use compiler::interp::Tensor;
use compiler::ir::Op;
use lang::types::Dtype;

const RECIPE: &str = "use std.models.gpt
use std.loss.linear_cross_entropy
use std.optim.adamw

recipe tiny {
    model = gpt(V = 11, D = 8, L = 2, H = 2, T = 4)
    data = text(\"embedded:kjv\", context = 4, batch = 2)
    loss = linear_cross_entropy(model.features(batch.inputs), model.wte, flatten(batch.targets))
    optimize model.** with adamw(lr = 1e-3)
}
";

#[test]
fn tiny_gpt_gradients_match_finite_differences() {
    let p = program(RECIPE);
    let r = item(&p, 0, "tiny");
    let g = compiler::entry::recipe_step(&p.analysis.modules, &p.db, r).unwrap();
    g.verify().unwrap();
    let plan = compiler::kernel::schedule(&g).unwrap();
    plan.verify().unwrap();
    let mut rng = Rng(42);
    // Inputs in graph order: tokens, targets, then parameters as first used.
    let mut inputs = vec![];
    let mut names = vec![];
    for id in &g.inputs {
        let n = g.node(*id);
        let Op::Input { name, .. } = &n.op else { unreachable!() };
        names.push(name.clone());
        inputs.push(if n.dtype == Dtype::I32 {
            rng.ints(&n.shape, 11)
        } else if name.contains("gain") {
            Tensor::new(n.dtype, n.shape.clone(), vec![1.0; n.shape.iter().product()])
        } else {
            rng.tensor(n.dtype, &n.shape, -0.5, 0.5)
        });
    }
    // Every parameter of the model is used by the loss: 2 embeddings, 2 final norm, 12 per block.
    let params = names.iter().filter(|n| n.starts_with("model.")).count();
    assert_eq!(params, 4 + 2 * 12, "{names:?}");
    let out = run(&g, &inputs);
    let loss = out["loss"].data[0];
    assert!(loss.is_finite() && loss > 0.0);
    let mut checked = 0;
    let mut failures = vec![];
    for (k, name) in names.iter().enumerate() {
        if !name.starts_with("model.") {
            continue;
        }
        let grad = &out[&format!("grad.{name}")];
        assert_eq!(grad.shape, inputs[k].shape);
        // Two elements of each parameter.
        for _ in 0..2 {
            let i = rng.range(0, inputs[k].data.len() - 1);
            let h = 1e-2;
            let mut plus = inputs.clone();
            plus[k].data[i] += h;
            let mut minus = inputs.clone();
            minus[k].data[i] -= h;
            let fd = (run(&g, &plus)["loss"].data[0] - run(&g, &minus)["loss"].data[0]) / (2.0 * h);
            let an = grad.data[i];
            if (fd - an).abs() > 3e-2 * (fd.abs() + an.abs()) + 2e-3 {
                failures.push(format!("{name}[{i}]: analytic {an}, finite difference {fd}"));
            }
            checked += 1;
        }
    }
    assert!(checked >= 50);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
