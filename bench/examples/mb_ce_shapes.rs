//! Microbenchmark: GFLOP/s of the `gemm` crate on linear cross-entropy's block shapes, with
//! their strides (`cargo run --release -p bench --example mb_ce_shapes`).
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn run(m: usize, k: usize, n: usize, a_s: (isize, isize), b_s: (isize, isize), acc: bool, reps: usize) -> f64 {
    run_d(m, k, n, a_s, b_s, (n as isize, 1), acc, reps)
}

#[allow(clippy::too_many_arguments)]
fn run_d(
    m: usize,
    k: usize,
    n: usize,
    a_s: (isize, isize),
    b_s: (isize, isize),
    d_s: (isize, isize),
    acc: bool,
    reps: usize,
) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let mut times = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        // SAFETY: the slices hold the shapes' elements at these strides.
        unsafe {
            gemm::gemm::<f32>(
                m,
                n,
                k,
                c.as_mut_ptr(),
                d_s.1,
                d_s.0,
                acc,
                a.as_ptr(),
                a_s.1,
                a_s.0,
                b.as_ptr(),
                b_s.1,
                b_s.0,
                if acc { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9
}

fn main() {
    let (n, d) = (4096usize, 1024usize);
    for w in [256usize, 512] {
        let fwd = run(n, d, w, (d as isize, 1), (1, d as isize), false, 20);
        let gh = run(n, w, d, (w as isize, 1), (d as isize, 1), true, 20);
        let gc = run(w, n, d, (1, w as isize), (d as isize, 1), false, 20);
        let gct = run_d(d, n, w, (1, d as isize), (w as isize, 1), (1, d as isize), false, 20);
        println!("w={w}: logits {fwd:.1}, grad_h {gh:.1}, grad_c {gc:.1}, grad_c as (H^T G)^T {gct:.1} GFLOP/s");
    }
    println!("4096^3: {:.1} GFLOP/s", run(4096, 4096, 4096, (4096, 1), (4096, 1), false, 5));
    println!(
        "full logits 4096x1024x65536 (B^T): {:.1} GFLOP/s",
        run(n, d, 65536, (d as isize, 1), (1, d as isize), false, 2)
    );
}
