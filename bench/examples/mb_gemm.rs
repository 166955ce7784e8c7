//! Microbenchmark: GFLOP/s of the `gemm` crate on the tiny GPT's matmul shapes
//! (`cargo run --release -p bench --example mb_gemm`).
use std::time::Instant;

fn run(m: usize, k: usize, n: usize, ta: bool, par: gemm::Parallelism) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..30 {
        let t = Instant::now();
        // SAFETY: the slices hold the shapes' elements.
        unsafe {
            let (acs, ars) = if ta { (m as isize, 1) } else { (1, k as isize) };
            gemm::gemm::<f32>(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                acs,
                ars,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

fn main() {
    for (m, k, n, ta) in [
        (2048, 128, 512, false),
        (2048, 512, 128, false),
        (512, 2048, 128, true),
        (128, 2048, 512, true),
        (2048, 128, 128, false),
        (128, 2048, 128, true),
        (128, 32, 128, false),
    ] {
        let none = run(m, k, n, ta, gemm::Parallelism::None);
        let r2 = run(m, k, n, ta, gemm::Parallelism::Rayon(2));
        println!(
            "{m:>5} x {k:>5} x {n:>4} {}: 1 thread {none:6.1} GFLOP/s, 2 threads {r2:6.1} GFLOP/s",
            if ta { "(A^T)" } else { "     " }
        );
    }
}
