//! GPU benchmarks (the CUDA issue's goals), on a machine with an NVIDIA GPU; elsewhere they
//! print why they skip. `cargo bench -p bench --bench gpu` (`tests/gpu/run.sh` runs it).
//!
//! - AdamW over 256M f32 parameters (`BENCH_SMOKE=1`: 1M): the step's kernels alone (the
//!   arguments are copied to the device once, before) against the device's copy bandwidth,
//!   counting the bytes the step must move: read param, grad, m, v; write param, m, v
//!   (7 × 4 bytes per parameter). Goal: at least 85% of the copy bandwidth.
//! - Linear cross-entropy: not benchmarked yet (the tiled matmul-with-online-reduction kernel
//!   the goal needs is not written; see the README's status).

use bench::{median, smoke};
use lang::types::Dtype;
use runtime::Buffer;

fn main() {
    if let Err(e) = runtime::cuda::available() {
        println!("GPU benchmarks skipped: {}", e.0);
        return;
    }
    let n: usize = if smoke() { 1 << 20 } else { 256 << 20 };
    let g = bench::optimizer_graph("std.optim.adamw", vec![n], &[("lr", 1e-3), ("weight_decay", 0.1)]);
    let p = compiler::kernel::schedule(&g).expect("schedules");
    let exe = runtime::cuda::CudaExecutable::new(p).expect("compiles for the GPU");
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
    let times = exe.time_kernels(&args, 0, if smoke() { 3 } else { 20 }).expect("runs on the GPU");
    let t = median(&times);
    let moved = 7.0 * 4.0 * n as f64;
    let copy = runtime::cuda::copy_bandwidth(4 * n, 10).expect("copies on the GPU");
    println!(
        "AdamW over {n} f32 parameters on the GPU: {:.3} ms per step ({} kernels), {:.0} GB/s moved; device-to-device copy {:.0} GB/s; {:.0}% of the copy bandwidth (goal >= 85%)",
        t * 1e3,
        exe.program.kernels.len(),
        moved / t / 1e9,
        copy / 1e9,
        100.0 * moved / t / copy
    );
}
