//! Every differentiable op's gradient rule against central finite differences in f64, on
//! random shapes. Each case is a small recipe function `f(x, ...) -> f64` that routes the
//! op through a random weighting so no gradient is trivially constant.

mod common;
use common::*;
use compiler::interp::Tensor;
use lang::types::Dtype;

struct Case {
    /// The op under test, an expression of `x` (and `y`) of shape [A, B] (or as declared).
    body: &'static str,
    /// Extra tensors: name and whether its values must stay positive.
    second: bool,
    positive: bool,
}

const CASES: &[Case] = &[
    Case { body: "x + y", second: true, positive: false },
    Case { body: "x - y", second: true, positive: false },
    Case { body: "x * y", second: true, positive: false },
    Case { body: "x / y", second: true, positive: true },
    Case { body: "x ^ y", second: true, positive: true },
    Case { body: "x ^ 3", second: false, positive: false },
    Case { body: "max(x, y)", second: true, positive: false },
    Case { body: "min(x, y)", second: true, positive: false },
    Case { body: "x % y", second: true, positive: true },
    Case { body: "-x", second: false, positive: false },
    Case { body: "exp(x)", second: false, positive: false },
    Case { body: "log(x)", second: false, positive: true },
    Case { body: "log1p(x)", second: false, positive: true },
    Case { body: "sqrt(x)", second: false, positive: true },
    Case { body: "rsqrt(x)", second: false, positive: true },
    Case { body: "tanh(x)", second: false, positive: false },
    Case { body: "sigmoid(x)", second: false, positive: false },
    Case { body: "softplus(x)", second: false, positive: false },
    Case { body: "gelu(x)", second: false, positive: false },
    Case { body: "gelu_tanh(x)", second: false, positive: false },
    Case { body: "silu(x)", second: false, positive: false },
    Case { body: "erf(x)", second: false, positive: false },
    Case { body: "cos(x)", second: false, positive: false },
    Case { body: "sin(x)", second: false, positive: false },
    Case { body: "abs(x)", second: false, positive: false },
    Case { body: "relu(x)", second: false, positive: false },
    Case { body: "where(x > y, x * x, y)", second: true, positive: false },
    // `y` reaches the value only through ops with zero gradient: checked to be exactly 0 below.
    Case { body: "x * stop_gradient(y) + floor(y) + sign(y) + round(x) * 0.0", second: true, positive: false },
    Case { body: "broadcast(sum(x, axis = 0), [A, B])", second: false, positive: false },
    Case { body: "x + mean(x, axis = 1, keepdims = true)", second: false, positive: false },
    Case { body: "broadcast(prod(x, axis = 1, keepdims = true), [A, B])", second: false, positive: true },
    Case { body: "x * max(x, axis = 1, keepdims = true)", second: false, positive: false },
    Case { body: "x * min(x, axis = 0, keepdims = true)", second: false, positive: false },
    Case { body: "x @ y^T @ x", second: true, positive: false },
    Case { body: "transpose(x) @ y", second: true, positive: false },
    // A well-conditioned square system (x xᵀ + 3I): both the matrix's and the right side's rule.
    Case { body: "solve(x @ x^T + one_hot(iota(A), A, \"f64\") * 3.0, y)", second: true, positive: false },
    Case { body: "solve(x @ x^T + one_hot(iota(A), A, \"f64\") * 3.0, x) * y", second: true, positive: false },
    Case { body: "reshape(x, [B, A]) ^ 2 @ x", second: false, positive: false },
    Case { body: "softmax(x, axis = -1)", second: false, positive: false },
    Case { body: "log_softmax(x, axis = 0)", second: false, positive: false },
    Case { body: "x - logsumexp(x, axis = 1, keepdims = true)", second: false, positive: false },
    Case { body: "broadcast(expand_dims(norm(x, axis = 1), 1), [A, B])", second: false, positive: false },
    Case { body: "sort(x, axis = -1) * y", second: true, positive: false },
    Case { body: "cumsum(x, axis = 1) * y", second: true, positive: false },
    Case { body: "concat([x, y], axis = 0)[1:, :]", second: true, positive: false },
    Case { body: "x[:, 1:] * x[:, :B - 1]", second: false, positive: false },
    Case { body: "gather(x, argmax(y, axis = 1), axis = 1)", second: true, positive: false },
    Case { body: "scatter_add(x, argmin(y, axis = 0), x[0], axis = 0)", second: true, positive: false },
    Case { body: "x[argsort(y, axis = 0)[:, 0]]", second: true, positive: false },
    Case { body: "topk(x * y, 2)", second: true, positive: false },
    Case { body: "f64(i32(y * 10.0)) * 0.0 + x * y", second: true, positive: false },
    Case { body: "if sum(y) > 0.0 { x * 2.0 } else { x * 3.0 }", second: true, positive: false },
];

fn value(g: &compiler::ir::Graph, inputs: &[Tensor]) -> f64 {
    run(g, inputs)["out"].data[0]
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut failures = vec![];
    for case in CASES {
        let y_param = if case.second { ", y: f64[A, B]" } else { "" };
        let src = format!(
            "fn f(x: f64[A, B]{y_param}, w: f64[_, _]) -> f64 {{\n    let v = {}\n    sum(w * v)\n}}\n",
            case.body
        );
        let p = program(&src);
        let r = item(&p, 0, "f");
        for trial in 0..3 {
            let (a, b) = (rng.range(2, 4), rng.range(3, 5));
            let (a, b) = if case.body.contains("reshape(x, [B, A]) ^ 2 @ x") { (a, a) } else { (a, b) };
            let (lo, hi) = if case.positive { (0.5, 2.0) } else { (-2.0, 2.0) };
            let x = rng.tensor(Dtype::F64, &[a, b], lo, hi);
            let y = rng.tensor(Dtype::F64, &[a, b], lo, hi);
            // The shape of `v` decides the weights' shape: lower once without weights to see it.
            let probe_src = format!("fn v(x: f64[A, B]{y_param}) {{\n    {}\n}}\n", case.body);
            let probe = program(&probe_src);
            let vr = item(&probe, 0, "v");
            let mut inputs = vec![x.clone()];
            let mut names = vec!["x"];
            if case.second {
                inputs.push(y.clone());
                names.push("y");
            }
            let vg =
                compiler::entry::function(&probe.analysis.modules, &probe.db, vr, &tensor_args(&names, &inputs), false)
                    .unwrap();
            let vshape = run(&vg, &inputs)["out"].shape.clone();
            let vshape = if vshape.len() == 2 { vshape } else { vec![1, vshape.iter().product::<usize>().max(1)] };
            inputs.push(rng.tensor(Dtype::F64, &vshape, -1.0, 1.0));
            names.push("w");
            let g = match compiler::entry::function(&p.analysis.modules, &p.db, r, &tensor_args(&names, &inputs), true)
            {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{}: lowering failed: {e}", case.body));
                    break;
                }
            };
            g.verify().unwrap();
            let out = run(&g, &inputs);
            for (k, name) in names.iter().enumerate().take(if case.second { 2 } else { 1 }) {
                let analytic = &out[&format!("grad_{name}")];
                if case.body.contains("stop_gradient(y)") && *name == "y" {
                    if analytic.data.iter().any(|v| *v != 0.0) {
                        failures.push(format!("{}: gradient through stop_gradient/floor/sign must be 0", case.body));
                    }
                    continue;
                }
                for i in 0..inputs[k].data.len() {
                    let h = 1e-6;
                    let mut plus = inputs.clone();
                    plus[k].data[i] += h;
                    let mut minus = inputs.clone();
                    minus[k].data[i] -= h;
                    let fd = (value(&g, &plus) - value(&g, &minus)) / (2.0 * h);
                    let an = analytic.data[i];
                    // Central differences in f64: error O(h²) plus rounding O(ε/h) ≈ 1e-9.
                    let tol = 1e-6 * (1.0 + fd.abs());
                    if (fd - an).abs() > tol {
                        failures.push(format!(
                            "{} (trial {trial}, d/d{name}[{i}]): analytic {an}, finite difference {fd}",
                            case.body
                        ));
                        break;
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} gradient mismatches:\n{}", failures.len(), failures.join("\n"));
}
