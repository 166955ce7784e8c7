//! AdamW step over 50M f32 parameters (`cargo bench -p bench --bench adamw`): recipec's
//! generated loop (the stdlib's naive `std.optim.adamw`, fused by the compiler), a
//! hand-written fused C loop (the roofline, bench/c/adamw.c) and `jax.jit(optax.adamw)` with
//! donated buffers, interleaved round by round. Throughput counts 28 bytes per parameter
//! (read param, grad, m, v; write param, m, v). `BENCH_SMOKE=1` runs 1M parameters, 2 rounds.

use bench::{median, report, smoke, time, Peer};
use lang::types::Dtype;
use runtime::{Backend, Buffer, Executable};

extern "C" {
    fn adamw_c(
        p: *mut f32,
        g: *const f32,
        m: *mut f32,
        v: *mut f32,
        n: usize,
        lr: f32,
        b1: f32,
        b2: f32,
        eps: f32,
        wd: f32,
        step: i32,
    );
}

fn main() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(if smoke() {
        1 << 20
    } else {
        50_000_000
    });
    let rounds = if smoke() { 2 } else { 7 };
    let steps = if smoke() { 3 } else { 5 };
    let (lr, wd) = (1e-3, 0.1);
    let g = bench::optimizer_graph("std.optim.adamw", vec![n], &[("lr", lr), ("weight_decay", wd)]);
    let t = std::time::Instant::now();
    let p = compiler::kernel::schedule(&g).expect("schedules");
    let exe = Executable::new(p, Backend::Cranelift).expect("compiles");
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let loops = exe.program.kernels.len();
    println!(
        "AdamW over {n} f32 parameters ({} threads); recipec: {loops} kernels, built in {build_ms:.1} ms",
        rayon::current_num_threads()
    );

    // Arguments in the graph's order: param, grad, step, state_m, state_v.
    let names: Vec<String> = g
        .inputs
        .iter()
        .map(|i| match &g.node(*i).op {
            compiler::ir::Op::Input { name, .. } => name.clone(),
            _ => unreachable!(),
        })
        .collect();
    let fill = |b: &mut Buffer, seed: u32, scale: f32| {
        let mut s = seed.wrapping_mul(2654435761) | 1;
        for x in b.f32s_mut() {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *x = ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale;
        }
    };
    let mut args: Vec<Buffer> = names
        .iter()
        .map(|name| match name.as_str() {
            "step" => Buffer::zeros(Dtype::I32, vec![]),
            _ => Buffer::zeros(Dtype::F32, vec![n]),
        })
        .collect();
    let idx = |s: &str| names.iter().position(|x| x == s).unwrap();
    let (ip, ig, is, im, iv) = (idx("param"), idx("grad"), idx("step"), idx("state_m"), idx("state_v"));
    fill(&mut args[ip], 1, 2.0);
    fill(&mut args[ig], 2, 0.02);
    let mut c =
        (args[ip].clone(), args[ig].clone(), Buffer::zeros(Dtype::F32, vec![n]), Buffer::zeros(Dtype::F32, vec![n]));

    // Same start, same 3 steps: recipec and C agree (a sanity check of the comparison).
    let mut step = 0;
    let ours = |args: &mut Vec<Buffer>, step: &mut i32| {
        *step += 1;
        args[is].as_bytes_mut().copy_from_slice(&step.to_le_bytes());
        exe.run(args, 0).expect("runs");
    };
    let mut c_step = 0;
    let theirs = |c: &mut (Buffer, Buffer, Buffer, Buffer), step: &mut i32| {
        *step += 1;
        // SAFETY: four distinct buffers of n f32 each.
        unsafe {
            adamw_c(
                c.0.f32s_mut().as_mut_ptr(),
                c.1.f32s().as_ptr(),
                c.2.f32s_mut().as_mut_ptr(),
                c.3.f32s_mut().as_mut_ptr(),
                n,
                lr as f32,
                0.9,
                0.999,
                1e-8,
                wd as f32,
                *step,
            )
        }
    };
    for _ in 0..3 {
        ours(&mut args, &mut step);
        theirs(&mut c, &mut c_step);
    }
    let max_diff = args[ip].f32s().iter().zip(c.0.f32s()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("after 3 steps, recipec and C differ by at most {max_diff:e} in any parameter");
    assert!(max_diff < 1e-6, "recipec's AdamW and the C loop disagree");
    let _ = (im, iv);

    let mut peer = match Peer::start() {
        Ok(mut p) => {
            p.send(&format!("adamw {n}"));
            assert_eq!(p.line(), "ready");
            Some(p)
        }
        Err(e) => {
            println!("JAX peer skipped: {e}");
            None
        }
    };
    // The LLVM backend on its own copy of the arguments (built with `--features llvm`).
    #[cfg(feature = "llvm")]
    let llvm = {
        let p = compiler::kernel::schedule(&g).expect("schedules");
        Executable::new(p, Backend::Llvm).expect("LLVM compiles")
    };
    #[cfg(feature = "llvm")]
    let mut largs = args.clone();
    #[cfg(feature = "llvm")]
    let mut lstep = step;
    let mut results = vec![];
    for _ in 0..rounds {
        let a = median(&time(steps, || ours(&mut args, &mut step)));
        let b = median(&time(steps, || theirs(&mut c, &mut c_step)));
        let j = peer.as_mut().map(|p| median(&p.run(steps))).unwrap_or(f64::NAN);
        #[cfg(feature = "llvm")]
        let l = median(&time(steps, || {
            lstep += 1;
            largs[is].as_bytes_mut().copy_from_slice(&lstep.to_le_bytes());
            llvm.run(&mut largs, 0).expect("runs");
        }));
        #[cfg(not(feature = "llvm"))]
        let l = f64::NAN;
        results.push(if cfg!(feature = "llvm") { vec![l, a, b, j] } else { vec![a, b, j, l] });
    }
    let bytes = 28.0 * n as f64;
    report(
        "AdamW step (median of per-round medians; GB/s = 28 bytes per parameter)",
        &|t| format!("{:>6.1} GB/s", bytes / t / 1e9),
        &if cfg!(feature = "llvm") {
            ["recipec (llvm)", "recipec (cranelift)", "hand-written C (-O3, OpenMP)", "jax.jit(optax.adamw)"]
        } else {
            ["recipec (cranelift)", "hand-written C (-O3, OpenMP)", "jax.jit(optax.adamw)", "recipec (llvm)"]
        },
        &results,
    );
    println!("  (a ratio above 1 means recipec is faster; goals: >= 1.5x JAX, >= 0.85x of C, i.e. C ratio <= 1.18)");
}
