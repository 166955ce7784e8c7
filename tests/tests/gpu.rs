//! The CUDA backend against the interpreter on a GPU: every stdlib item at its sample shapes
//! (and each kernel's occupancy model against the driver's; and its runs replayed as CUDA
//! graphs, which must give the bits of the kernels launched one by one) and the GPT training
//! step.
//! Skips, saying why, where no GPU (driver) or NVRTC is present; `tests/gpu/run.sh` runs it
//! on a machine with one.
//!
//! Tolerance: integers and bools exact; floats |a − b| ≤ 1e-5 + 1e-4·|b| (matmul tiles sum in
//! f32, and transcendentals other than f32 exp/erf/gelu come from CUDA's libm).

use compiler::interp::{self, Tensor};
use runtime::cuda::CudaExecutable;

fn close(got: &[(String, Tensor)], want: &std::collections::HashMap<String, Tensor>) -> Result<(), String> {
    for (out, t) in got {
        let w = &want[out];
        if (t.dtype, &t.shape) != (w.dtype, &w.shape) {
            return Err(format!("`{out}`: GPU {} {:?}, interpreter {} {:?}", t.dtype, t.shape, w.dtype, w.shape));
        }
        for (i, (a, b)) in t.data.iter().zip(&w.data).enumerate() {
            let ok = if a.is_nan() || b.is_nan() {
                a.is_nan() && b.is_nan()
            } else if a == b || !t.dtype.is_float() {
                a == b // infinities too: their difference is NaN
            } else {
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs()
            };
            if !ok {
                return Err(format!("`{out}`[{i}]: GPU {a}, interpreter {b}"));
            }
        }
    }
    Ok(())
}

fn same_bits(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((na, ta), (nb, tb))| {
            na == nb
                && ta.shape == tb.shape
                && ta.data.len() == tb.data.len()
                && ta.data.iter().zip(&tb.data).all(|(x, y)| x.to_bits() == y.to_bits())
        })
}

#[test]
fn stdlib_items_on_the_gpu_match_the_interpreter() {
    if let Err(e) = runtime::cuda::available() {
        println!("skipped: {e}");
        return;
    }
    let (mut ran, mut failed, mut told, mut graphs) = (0, vec![], false, 0);
    for (name, g) in tests::stdlib_graphs() {
        let p = compiler::kernel::schedule(&g).unwrap();
        let mut exe = match CudaExecutable::new(p) {
            Ok(e) => e,
            Err(e) => {
                failed.push(format!("{name}: {e}"));
                continue;
            }
        };
        let ins: Vec<Tensor> = g
            .inputs
            .iter()
            .enumerate()
            .map(|(k, id)| {
                let n = g.node(*id);
                let numel: usize = n.shape.iter().product();
                let data = (0..numel)
                    .map(|i| {
                        if n.dtype.is_float() {
                            (((i * 2654435761 + k * 97) % 1000) as f64 / 500.0 - 1.0) * 1.5
                        } else {
                            (((i * 7 + k) % 5) + 1) as f64
                        }
                    })
                    .collect();
                Tensor::new(n.dtype, n.shape.clone(), data)
            })
            .collect();
        // The occupancy `recipec build --target cuda` prints, against the driver's.
        match exe.occupancy_mismatches() {
            Ok(m) => failed.extend(m.into_iter().map(|m| format!("{name}: occupancy: {m}"))),
            Err(e) if !told => {
                told = true;
                println!("occupancy not compared: {e}");
            }
            Err(_) => {}
        }
        let want = interp::run(&g, &ins, 3).unwrap();
        // Every item runs, and every failure is listed (a GPU's time is scarce: one run
        // should say all that is wrong).
        exe.set_graphs(false);
        let one_by_one = exe.run_tensors(&ins, 3).map_err(|e| e.0);
        match one_by_one.clone().and_then(|got| close(&got, &want)) {
            Ok(()) => ran += 1,
            Err(e) => failed.push(format!("{name}: {e}")),
        }
        // The first run with graphs captures them, the second replays them.
        exe.set_graphs(true);
        for run in ["capturing", "replaying"] {
            match (exe.run_tensors(&ins, 3), &one_by_one) {
                (Ok(got), Ok(want)) if !same_bits(&got, want) => {
                    failed.push(format!("{name}: {run} CUDA graphs gave other bits than launching kernel by kernel"))
                }
                (Err(e), _) => failed.push(format!("{name}: {run} CUDA graphs: {e}")),
                _ => {}
            }
        }
        match exe.graphs() {
            (n, None) => graphs += n,
            (_, Some(why)) => failed.push(format!("{name}: CUDA graphs not captured: {why}")),
        }
    }
    println!("{ran} stdlib items ran on the GPU and matched the interpreter");
    println!("{graphs} CUDA graphs replayed, each giving the bits of its kernels launched one by one");
    assert!(failed.is_empty(), "{} items failed on the GPU:\n{}", failed.len(), failed.join("\n"));
}
