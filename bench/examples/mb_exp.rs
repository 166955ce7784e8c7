//! Microbenchmark: ns per element of f32 unary ops in generated code
//! (`cargo run --release -p bench --example mb_exp`).
use compiler::interp::Tensor;
use compiler::ir::{Bin, Graph, Op, Un};
use lang::types::Dtype;
use runtime::{Backend, Executable};
use std::time::Instant;

fn time(exe: &Executable, args: &mut [runtime::Buffer]) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t0 = Instant::now();
        exe.run(args, 0).unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let n = 1 << 20;
    for (name, u) in [("neg", Un::Neg), ("exp", Un::Exp), ("erf", Un::Erf), ("gelu", Un::Gelu), ("tanh", Un::Tanh)] {
        let mut g = Graph::new(name);
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![n], &[], "x").unwrap();
        let y = g.add(Op::Unary(u), Dtype::F32, vec![n], &[x], "y").unwrap();
        g.outputs.push(("y".into(), y));
        let exe = Executable::new(compiler::kernel::schedule(&g).unwrap(), Backend::Cranelift).unwrap();
        let t = Tensor::new(Dtype::F32, vec![n], (0..n).map(|i| (i as f64 * 1e-5).sin() * 5.0).collect());
        let mut args = vec![runtime::Buffer::from_tensor(&t)];
        let best = time(&exe, &mut args);
        println!(
            "{name:>6}: {:.2} ns/element ({:.2} ms per {n}) vectorized {}",
            best * 1e9 / n as f64,
            best * 1e3,
            exe.vectorized(0)
        );
    }
    // The softmax numerator: exp(x - rowmax) over [8192, 128], with -inf entries.
    let (r, c) = (8192, 128);
    let mut g = Graph::new("softmax_num");
    let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![r, c], &[], "x").unwrap();
    let m = g.add(Op::Input { index: 1, name: "m".into() }, Dtype::F32, vec![r, 1], &[], "m").unwrap();
    let mb = g.add(Op::Broadcast, Dtype::F32, vec![r, c], &[m], "m").unwrap();
    let d = g.add(Op::Binary(Bin::Sub), Dtype::F32, vec![r, c], &[x, mb], "d").unwrap();
    let e = g.add(Op::Unary(Un::Exp), Dtype::F32, vec![r, c], &[d], "e").unwrap();
    let s = g.add(Op::Reduce { op: compiler::ir::Red::Sum, axes: vec![1] }, Dtype::F32, vec![r], &[e], "s").unwrap();
    g.outputs.push(("e".into(), e));
    g.outputs.push(("s".into(), s));
    let exe = Executable::new(compiler::kernel::schedule(&g).unwrap(), Backend::Cranelift).unwrap();
    let xt = Tensor::new(
        Dtype::F32,
        vec![r, c],
        (0..r * c).map(|i| if i % c > i / c % c { f64::NEG_INFINITY } else { (i as f64 * 1e-3).sin() }).collect(),
    );
    let mt = Tensor::new(Dtype::F32, vec![r, 1], vec![1.0; r]);
    let mut args = vec![runtime::Buffer::from_tensor(&xt), runtime::Buffer::from_tensor(&mt)];
    let best = time(&exe, &mut args);
    println!("softmax numerator and row sums [{r}, {c}]: {:.2} ms", best * 1e3);
    if let Some(p) = exe.profile_report(5) {
        print!("{p}");
    }
}
