//! Sizes shared by the memory plan (which lives with the kernels it plans, in
//! [`crate::kernel`]): bytes per dtype, arena alignment, and human-readable byte counts.

use lang::types::Dtype;

pub const ALIGN: usize = 64;

pub fn dtype_bytes(d: Dtype) -> usize {
    match d {
        Dtype::Bool => 1,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::I32 | Dtype::F32 => 4,
        Dtype::I64 | Dtype::F64 => 8,
    }
}

pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}
