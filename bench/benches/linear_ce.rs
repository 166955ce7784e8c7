//! Linear cross-entropy, loss and both gradients, N=4096, D=1024, V=65536
//! (`cargo bench -p bench --bench linear_ce`): recipec compiles the stdlib's naive
//! `std.loss.linear_cross_entropy` (cross_entropy(hidden @ classifier^T)); the compiler
//! blocks the matmul over V so the [N, V] logits never exist. The peer is the same naive
//! formula under `jax.jit(jax.value_and_grad)`, which materializes them. Prints times,
//! ratios, recipec's planned and measured memory, and JAX's peak RSS.
//! `BENCH_SMOKE=1`: N=256, D=64, V=8192, blocking forced.

use bench::{median, report, smoke, time, Peer};
use compiler::lower::Arg;
use lang::types::Dtype;
use runtime::{Backend, Buffer, Executable};

fn vm_hwm() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn main() {
    let (n, d, v) = if smoke() { (256, 64, 8192) } else { (4096, 1024, 65536) };
    if smoke() {
        // Small enough that the default threshold would not block it.
        std::env::set_var("RECIPEC_BLOCK_MIN_BYTES", "0");
    }
    let rounds = if smoke() { 2 } else { 5 };
    let steps = if smoke() { 2 } else { 1 };
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let t = std::time::Instant::now();
    let g = bench::function_graph(
        "std.loss.linear_cross_entropy",
        vec![
            ("hidden", Arg::Tensor(Dtype::F32, vec![n, d])),
            ("classifier", Arg::Tensor(Dtype::F32, vec![v, d])),
            ("targets", Arg::Tensor(Dtype::I32, vec![n])),
        ],
        true,
    );
    let p = compiler::kernel::schedule(&g).expect("schedules");
    let naive_logits = n * v * 4;
    let big = p.buffers.iter().filter(|b| b.born.is_some() && b.shape == [n, v]).count();
    println!(
        "linear cross-entropy N={n} D={d} V={v}: {} kernels; plan: arena {:.1} MiB, peak {:.1} MiB, arguments {:.1} MiB; [N, V] buffers: {big}",
        p.kernels.len(),
        mib(p.arena_bytes),
        mib(p.peak_bytes),
        mib(p.argument_bytes)
    );
    let grads: usize = (n * d + v * d) * 4;
    println!(
        "  peak beyond inputs and gradients: {:.1} MiB = {:.2}% of the naive logits ({:.0} MiB); goal <= 2%",
        mib(p.peak_bytes.saturating_sub(grads)),
        100.0 * p.peak_bytes.saturating_sub(grads) as f64 / naive_logits as f64,
        mib(naive_logits)
    );
    // The same program without row fusion (every logits block stored, then read by its
    // loops), to show what computing the blocks strip by strip inside their loops gives.
    let unfused = compiler::kernel::schedule_with(&g, &compiler::kernel::ScheduleOptions { fuse_rows: false })
        .expect("schedules");
    let start_hwm = vm_hwm();
    #[cfg(feature = "llvm")]
    let llvm_program = p.clone();
    let exe = Executable::new(p, Backend::Cranelift).expect("compiles");
    let arena_hwm = vm_hwm().saturating_sub(start_hwm);
    println!("  built in {:.2} s", t.elapsed().as_secs_f64());

    let mut s = 12345u32;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let mut h = Buffer::zeros(Dtype::F32, vec![n, d]);
    h.f32s_mut().iter_mut().for_each(|x| *x = rnd() * 0.2);
    let mut c = Buffer::zeros(Dtype::F32, vec![v, d]);
    c.f32s_mut().iter_mut().for_each(|x| *x = rnd() * 0.2);
    let mut y = Buffer::zeros(Dtype::I32, vec![n]);
    for (i, b) in y.as_bytes_mut().chunks_mut(4).enumerate() {
        b.copy_from_slice(&(((i * 7919) % v) as i32).to_le_bytes());
    }
    let mut args = vec![h, c, y];
    let before = vm_hwm();
    exe.run(&mut args, 0).expect("runs");
    let grew = vm_hwm().saturating_sub(before);
    // Built after the measurement (its own arena of the same size).
    #[cfg(feature = "llvm")]
    let llvm = Executable::new(llvm_program, Backend::Llvm).expect("LLVM compiles");
    let plain = Executable::new(unfused, Backend::Cranelift).expect("compiles");
    println!(
        "  measured: peak resident memory grew {:.1} MiB when the executable was built (its arena: {:.1} MiB planned) and {:.1} MiB more in the first run (the outputs copied out of the arena: {:.1} MiB); beyond them a run allocates only each thread's row-strip scratch ({:.0} MiB at most) and the matmul library's packing buffers",
        mib(arena_hwm),
        mib(exe.program.arena_bytes),
        mib(grew),
        mib(grads + 4),
        mib(runtime::DEFAULT_STRIP_ELEMS * 4)
    );

    let mut peer = match Peer::start() {
        Ok(mut p) => {
            p.send(&format!("lce {n} {d} {v}"));
            assert_eq!(p.line(), "ready");
            Some(p)
        }
        Err(e) => {
            println!("JAX peer skipped: {e}");
            None
        }
    };
    // Per round: Cranelift, then LLVM (with `--features llvm`), then Cranelift without row
    // fusion, then JAX.
    let mut results: Vec<Vec<f64>> = vec![];
    for _ in 0..rounds {
        let mut row = vec![median(&time(steps, || {
            exe.run(&mut args, 0).expect("runs");
        }))];
        #[cfg(feature = "llvm")]
        row.push(median(&time(steps, || {
            llvm.run(&mut args, 0).expect("runs");
        })));
        row.push(median(&time(steps, || {
            plain.run(&mut args, 0).expect("runs");
        })));
        row.push(peer.as_mut().map(|p| median(&p.run(steps))).unwrap_or(f64::NAN));
        results.push(row);
    }
    let gflops = |t: f64| format!("{:>7.1} GFLOP/s counting 3 matmuls", 3.0 * 2.0 * (n * d * v) as f64 / t / 1e9);
    let jax = results[0].len() - 1;
    #[cfg(feature = "llvm")]
    let names = ["recipec (blocked, cranelift)", "recipec (blocked, llvm)", "recipec (blocked, no row fusion)"];
    #[cfg(not(feature = "llvm"))]
    let names = ["recipec (blocked, cranelift)", "recipec (blocked, no row fusion)"];
    for (k, name) in names.iter().enumerate().take(jax) {
        let pair: Vec<Vec<f64>> = results.iter().map(|r| vec![r[k], r[jax]]).collect();
        report("linear cross-entropy, loss and both gradients", &gflops, &[name, "jax.jit naive"], &pair);
    }
    if let Some(p) = peer.as_mut() {
        p.send("rss");
        let rss: usize = p.line().parse().unwrap_or(0);
        println!("  JAX peer process peak RSS: {:.1} MiB", mib(rss));
    }
    println!("  (recipec makes two passes over the blocks (online log-sum-exp; gradients) and recomputes the logits in the second: 4 matmuls where the naive formula needs 3)");
}
