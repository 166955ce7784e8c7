//! GPU benchmarks (the CUDA issue's goals), on a machine with an NVIDIA GPU; elsewhere they
//! print why they skip. `cargo bench -p bench --bench gpu` (`tests/gpu/run.sh` runs it).
//!
//! - AdamW over 256M f32 parameters (`BENCH_SMOKE=1`: 1M): the step's kernels alone (the
//!   arguments are copied to the device once, before) against the device's copy bandwidth,
//!   counting the bytes the step must move: read param, grad, m, v; write param, m, v
//!   (7 × 4 bytes per parameter). Goal: at least 85% of the copy bandwidth.
//! - One training step of `recipes/tiny_gpt.recipe` as `recipec train --backend cuda` runs it
//!   (the batch copied in, the loss and gradient norm out), its kernels replayed as CUDA graphs
//!   against the same kernels launched one by one (`RECIPEC_CUDA_GRAPHS=0`), interleaved round
//!   by round: what the graphs save in launch overhead on a small model.
//! - Linear cross-entropy forward and backward in bf16 at the Cut Cross-Entropy paper's
//!   Gemma 2 2B setting (N=8192, D=2304, V=256000; `BENCH_SMOKE=1`: N=1024, D=256, V=16384),
//!   the naive formula through the compiler (blocked over V, bf16 products on the tensor
//!   cores): the kernels' time against the paper's published kernel time (A100, 134.8 ms
//!   forward+backward; goal within 1.3x) and against PyTorch eager in the same run where a
//!   Python with a CUDA PyTorch is installed (`RECIPEC_PYTHON`; skipped with the reason
//!   otherwise), and the memory the plan needs beyond inputs and gradients (goal <= 2 MB).

use bench::{median, smoke};
use lang::types::Dtype;
use runtime::Buffer;

/// The loss as a user writes it in bf16 (the loss itself computed in f32).
const LCE_BF16: &str = "use std.loss.cross_entropy

pub loss lce(hidden: bf16[N, D], classifier: bf16[V, D], targets: i32[N]) -> f32 {
    cross_entropy(f32(hidden @ classifier^T), targets)
}
";

/// Published forward+backward time of the Cut Cross-Entropy kernel (A100, Gemma 2 2B
/// setting; Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", ICLR
/// 2025), in seconds.
const CCE_PUBLISHED_S: f64 = 0.1348;

fn main() {
    let gpu = runtime::cuda::available();
    match &gpu {
        Err(e) => println!("GPU timings skipped: {}", e.0),
        Ok(()) => {
            if let Err(e) = adamw() {
                println!("AdamW on the GPU failed: {}", e.0);
            }
            if let Err(e) = train_step() {
                println!("The training step on the GPU failed: {}", e.0);
            }
        }
    }
    // The default blocks (on the CUDA target at most 576 columns in bf16, every logits and
    // gradient block row-fused, never stored); `BENCH_GPU_COLS=64` adds a run with 64-column
    // blocks (4,000 blocks at the paper's setting: planning them takes minutes). Each plan's
    // memory is printed with or without a GPU.
    linear_cross_entropy(None, gpu.is_ok());
    if let Some(c) = std::env::var("BENCH_GPU_COLS").ok().and_then(|c| c.parse().ok()) {
        linear_cross_entropy(Some(c), gpu.is_ok());
    }
}

fn linear_cross_entropy(cols: Option<usize>, gpu: bool) {
    let (n, d, v) = if smoke() { (1024usize, 256usize, 16384usize) } else { (8192, 2304, 256000) };
    let t = |dt: Dtype, s: &[usize]| compiler::lower::Arg::Tensor(dt, s.to_vec());
    match cols {
        Some(c) => std::env::set_var("RECIPEC_BLOCK_COLS", c.to_string()),
        None => std::env::remove_var("RECIPEC_BLOCK_COLS"),
    }
    let args = vec![
        ("hidden", t(Dtype::BF16, &[n, d])),
        ("classifier", t(Dtype::BF16, &[v, d])),
        ("targets", t(Dtype::I32, &[n])),
    ];
    let planning = std::time::Instant::now();
    let g = bench::source_graph_for(LCE_BF16, "lce", args, true, compiler::passes::Target::Cuda);
    let p = compiler::kernel::schedule(&g).expect("schedules");
    let planned = planning.elapsed().as_secs_f64();
    // Outputs that live in the arena (the loss and the two gradients) are not overhead.
    let outputs: usize = p.outputs.iter().map(|(_, b, _)| p.buffers[*b].bytes.next_multiple_of(64)).sum();
    let extra = p.arena_bytes.saturating_sub(outputs);
    // The loops of a row-fused group run inside its kernel.
    let launches = p.kernels.len() - p.row_groups.iter().map(|g| g.end - g.start - 1).sum::<usize>();
    let blocks = cols.map(|c| format!("blocks of {c} columns")).unwrap_or_else(|| "default blocks".into());
    println!(
        "Linear cross-entropy fwd+bwd plan, bf16, N={n} D={d} V={v}, {blocks}: {launches} launches ({} row-fused), {:.2} MiB beyond inputs and gradients (goal <= 2 MB); compiled in {planned:.1} s",
        p.row_groups.len(),
        extra as f64 / (1 << 20) as f64
    );
    if !gpu {
        return;
    }
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut args = vec![];
    for (rows, cols) in [(n, d), (v, d)] {
        let vals: Vec<f64> = (0..rows * cols).map(|_| (next() - 0.5) * 0.2).collect();
        args.push(Buffer::from_tensor(&compiler::interp::Tensor::new(Dtype::BF16, vec![rows, cols], vals)));
    }
    let targets: Vec<f64> = (0..n).map(|_| (next() * v as f64).floor()).collect();
    args.push(Buffer::from_tensor(&compiler::interp::Tensor::new(Dtype::I32, vec![n], targets)));
    // The row-fused kernels' strips in the 48 KiB every block has (16 rows of a 576-column
    // bf16 block) and in the opt-in shared memory (64 rows): which is faster is what this
    // measures (`codegen_cuda::EmitOptions`; `RECIPEC_CUDA_ROW_SHARED` picks for recipec).
    // A failure is printed and the next measurement still runs (on a GPU the first runs of
    // these paths are the ones that find what the emulator could not).
    let mut best = f64::MAX;
    for (strips, row_shared) in
        [("48 KiB strips", codegen_cuda::ROW_SHARED), ("opt-in strips", codegen_cuda::OPT_IN_SHARED)]
    {
        let opts = codegen_cuda::EmitOptions { row_shared };
        let exe = match runtime::cuda::CudaExecutable::with_options(p.clone(), &Default::default(), &opts) {
            Ok(e) => e,
            Err(e) => {
                println!("  on the GPU, {strips}: cannot compile: {}", e.0);
                continue;
            }
        };
        let times = match exe.time_kernels(&args, 0, if smoke() { 2 } else { 5 }) {
            Ok(t) => t,
            Err(e) => {
                println!("  on the GPU, {strips}: failed: {}", e.0);
                continue;
            }
        };
        let ours = median(&times);
        best = best.min(ours);
        println!(
            "  on the GPU, {strips}: {:.1} ms, {:.2}x the published Cut Cross-Entropy kernel time (134.8 ms on an A100; goal <= 1.3x)",
            ours * 1e3,
            ours / CCE_PUBLISHED_S
        );
    }
    if cols.is_none() && best < f64::MAX {
        match torch_eager(n, d, v) {
            Ok(t) => {
                println!(
                    "  PyTorch eager (same shapes, same GPU): {:.1} ms; ours (faster strips) / eager = {:.2}x",
                    t * 1e3,
                    best / t
                )
            }
            Err(why) => println!("  PyTorch eager peer skipped: {why}"),
        }
    }
}

/// PyTorch eager's `F.cross_entropy(h @ c.T, t)` forward and backward in bf16 on the GPU
/// (median of 5, after a warm-up), or why it cannot run.
fn torch_eager(n: usize, d: usize, v: usize) -> Result<f64, String> {
    let python = std::env::var("RECIPEC_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        "import torch, time
assert torch.cuda.is_available(), 'PyTorch has no CUDA device'
h = (torch.rand({n}, {d}, device='cuda') - 0.5).mul(0.2).bfloat16().requires_grad_()
c = (torch.rand({v}, {d}, device='cuda') - 0.5).mul(0.2).bfloat16().requires_grad_()
t = torch.randint(0, {v}, ({n},), device='cuda')
ts = []
for i in range(6):
    torch.cuda.synchronize(); s = time.perf_counter()
    torch.nn.functional.cross_entropy((h @ c.T).float(), t).backward()
    torch.cuda.synchronize(); ts.append(time.perf_counter() - s)
    h.grad = None; c.grad = None
print(sorted(ts[1:])[2])
"
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .map_err(|e| format!("cannot run `{python}`: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("unexpected output: {e}"))
}

fn adamw() -> Result<(), runtime::RunError> {
    let n: usize = if smoke() { 1 << 20 } else { 256 << 20 };
    let g = bench::optimizer_graph("std.optim.adamw", vec![n], &[("lr", 1e-3), ("weight_decay", 0.1)]);
    let p = compiler::kernel::schedule(&g).expect("schedules");
    let exe = runtime::cuda::CudaExecutable::new(p)?;
    let args: Vec<Buffer> = g
        .inputs
        .iter()
        .map(|i| match &g.node(*i).op {
            compiler::ir::Op::Input { name, .. } if name == "step" => {
                let mut b = Buffer::zeros(Dtype::I32, vec![]);
                b.as_bytes_mut().copy_from_slice(&1i32.to_le_bytes());
                b
            }
            _ => {
                let mut b = Buffer::zeros(Dtype::F32, vec![n]);
                b.f32s_mut().iter_mut().enumerate().for_each(|(k, x)| *x = ((k % 1000) as f32 - 500.0) * 1e-3);
                b
            }
        })
        .collect();
    let times = exe.time_kernels(&args, 0, if smoke() { 3 } else { 20 })?;
    let t = median(&times);
    let moved = 7.0 * 4.0 * n as f64;
    let copy = runtime::cuda::copy_bandwidth(4 * n, 10)?;
    println!(
        "AdamW over {n} f32 parameters on the GPU: {:.3} ms per step ({} kernels), {:.0} GB/s moved; device-to-device copy {:.0} GB/s; {:.0}% of the copy bandwidth (goal >= 85%)",
        t * 1e3,
        exe.program.kernels.len(),
        moved / t / 1e9,
        copy / 1e9,
        100.0 * moved / t / copy
    );
    Ok(())
}

fn train_step() -> Result<(), runtime::RunError> {
    use runtime::train::{initial_state, Programs};
    let plan = bench::tiny_gpt_plan();
    let (b, t) = (plan.data.batch, plan.data.context);
    let mut runners = vec![];
    for graphs in ["1", "0"] {
        std::env::set_var("RECIPEC_CUDA_GRAPHS", graphs);
        let progs = Programs::new(&plan, runtime::Backend::Cuda);
        std::env::remove_var("RECIPEC_CUDA_GRAPHS");
        let progs = progs?;
        let state = initial_state(&plan, &progs)?;
        runners.push((progs, state, 0usize));
    }
    // Launches per step: the loops of a row-fused group run inside its kernel.
    let launches: usize = [&runners[0].0.grad, &runners[0].0.update]
        .iter()
        .map(|r| {
            let p = r.program();
            p.kernels.len() - p.row_groups.iter().map(|g| g.end - g.start - 1).sum::<usize>()
        })
        .sum();
    let batch = bench::byte_batch(b, t);
    // A first step each (it captures the graphs), failing cleanly.
    for (progs, state, k) in runners.iter_mut() {
        bench::train_step(progs, state, &batch, k)?;
    }
    let (rounds, steps) = if smoke() { (2, 3) } else { (5, 20) };
    let mut rows = vec![];
    for _ in 0..rounds {
        let mut row = vec![];
        for (progs, state, k) in runners.iter_mut() {
            row.push(median(&bench::time(steps, || bench::train_step(progs, state, &batch, k).expect("step"))));
        }
        rows.push(row);
    }
    let tok = (b * t) as f64;
    bench::report(
        &format!("one training step of recipes/tiny_gpt.recipe on the GPU ({b} x {t} tokens, {launches} launches)"),
        &|s| format!("{:>8.0} tokens/s", tok / s),
        &["CUDA graphs", "kernel by kernel"],
        &rows,
    );
    println!("  (a ratio above 1.00x means the graphs are faster)");
    Ok(())
}
