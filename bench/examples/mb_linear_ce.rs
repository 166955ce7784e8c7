//! Microbenchmark: the matmuls of linear cross-entropy's forward+backward (N=4096, D=1024,
//! V=65536) under two block schedules, through the `gemm` crate on all threads
//! (`cargo run --release -p bench --example mb_linear_ce`):
//! - columns: blocks of `c` classifier rows, two passes (statistics, then gradients), so
//!   four products: Z_b = H W_bᵀ (twice), dH += dZ_b W_b, dW_b = dZ_bᵀ H;
//! - rows: blocks of `r` hidden rows with every class (the block's logits fit in a few MiB),
//!   one pass, three products: Z_b = H_b Wᵀ, dH_b = dZ_b W, dW += dZ_bᵀ H_b.
//!
//! Only the products are timed (the elementwise work between them is the same in both).
//! `MB_BLOCKS` blocks are run and the total extrapolated.
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    rs_c: isize,
    acc: bool,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
) {
    // SAFETY: the callers pass slices holding the strided shapes.
    unsafe {
        gemm::gemm::<f32>(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            rs_c,
            acc,
            a.0.as_ptr(),
            a.2,
            a.1,
            b.0.as_ptr(),
            b.2,
            b.1,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

fn main() {
    let (n, d, v) = (4096usize, 1024usize, 65536usize);
    let blocks: usize = std::env::var("MB_BLOCKS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let h: Vec<f32> = (0..n * d).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let w: Vec<f32> = (0..v * d).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
    let mut dh = vec![0f32; n * d];
    let mut dw = vec![0f32; v * d];
    let flops = 2.0 * (n * d * v) as f64;
    for round in 0..3 {
        for c in [256usize, 512] {
            let mut z = vec![0f32; n * c];
            let t = Instant::now();
            for b in 0..blocks {
                let wb = &w[b * c * d..];
                // Z_b[n, c] = H[n, d] @ W_bᵀ[d, c]  (twice: statistics pass, gradient pass)
                for _ in 0..2 {
                    mm(n, c, d, &mut z, c as isize, false, (&h, d as isize, 1), (wb, 1, d as isize));
                }
                // dH[n, d] += dZ_b[n, c] @ W_b[c, d]
                mm(n, d, c, &mut dh, d as isize, true, (&z, c as isize, 1), (wb, d as isize, 1));
                // dW_b[c, d] = dZ_bᵀ[c, n] @ H[n, d]
                mm(c, d, n, &mut dw[b * c * d..], d as isize, false, (&z, 1, c as isize), (&h, d as isize, 1));
            }
            let s = t.elapsed().as_secs_f64() * (v / c) as f64 / blocks as f64;
            println!("round {round} columns c={c:>4}: {s:6.2} s extrapolated, {:6.1} GFLOP/s", 4.0 * flops / s / 1e9);
        }
        for r in [32usize, 64, 128] {
            let mut z = vec![0f32; r * v];
            let t = Instant::now();
            for b in 0..blocks {
                let hb = &h[b * r * d..];
                // Z_b[r, v] = H_b[r, d] @ Wᵀ[d, v]
                mm(r, v, d, &mut z, v as isize, false, (hb, d as isize, 1), (&w, 1, d as isize));
                // dH_b[r, d] = dZ_b[r, v] @ W[v, d]
                mm(r, d, v, &mut dh[b * r * d..], d as isize, false, (&z, v as isize, 1), (&w, d as isize, 1));
                // dW[v, d] += dZ_bᵀ[v, r] @ H_b[r, d]
                mm(v, d, r, &mut dw, d as isize, true, (&z, 1, v as isize), (hb, d as isize, 1));
            }
            let s = t.elapsed().as_secs_f64() * (n / r) as f64 / blocks as f64;
            println!("round {round} rows    r={r:>4}: {s:6.2} s extrapolated, {:6.1} GFLOP/s", 3.0 * flops / s / 1e9);
        }
    }
}
