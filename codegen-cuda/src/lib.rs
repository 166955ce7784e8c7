//! `codegen-cuda`: kernel IR ([`compiler::kernel::Program`]) → one CUDA C translation unit
//! per entry point, plus launch metadata. Text emission only: compiling (NVRTC, `ptxas`) and
//! running (the driver) happen elsewhere, so this crate builds and is tested without CUDA.
//!
//! **Calling convention.** The program's words are the address of every buffer in
//! `Program::buffers` order (arguments where the caller put them, temporaries at `arena +
//! offset`, outputs planned into an argument at that argument's address), as the CPU code
//! generators receive them, then the run's RNG seed (read by the `uniform`/`normal`
//! kernels), then 0. Every kernel takes one argument, `unsigned char* const* bufs`: its own
//! table, entry `j` being program word `w` plus an offset (`Launch::slots`). A kernel's text
//! numbers the entries in order of first use, and the element offsets of matmul operand and
//! output views and the constant start of a loop's index (a block's first column) are table
//! entries too, so the kernels of every column block of a blocked product are one function
//! launched with different tables: the bf16 linear cross-entropy at the Gemma 2 2B setting
//! is 4,610 launches of 23 functions (NVRTC and `ptxas` take seconds, not the 11 minutes
//! one function per launch took).
//!
//! **Numerics** (the CPU backends' rules, see `docs/semantics.md`): f32, f16 and bf16 values
//! are computed in `float` and rounded to their dtype after every op; f64, integers and bools in
//! `double`, rounded (integers truncated and wrapped) after every op; f32 `exp`, `erf` and
//! `gelu` follow `compiler::math` operation by operation; other transcendentals use CUDA's
//! double-precision functions (within their documented ulp bounds of the interpreter's);
//! reductions accumulate in `double`: over fewer than [`WARP_REDUCE_MIN`] elements in the
//! interpreter's order, one thread per output element; over more, one warp per output element
//! (each lane a strided subsequence in order, then a fixed shuffle tree; see
//! `warp_reduce_kernel`). Both are deterministic: no atomics, an order fixed by the shape. The unit must be compiled with
//! `--fmad=false` (no contraction of `a * b + c` into an FMA), as [`NVRTC_OPTIONS`] says.
//!
//! **Kernels.** A `Loop` becomes a grid-stride loop over its outer points (the reduced
//! dimensions, if any, loop inside each thread); an elementwise loop over one dimension of
//! at least [`VECTOR_MIN`] points that reads or writes f32 buffers at the flat index takes
//! four points per thread with 128-bit (`float4`) loads and stores of those buffers
//! (`vector_loop_kernel`). A `MatMul` becomes a shared-memory tiled
//! kernel (f32, f64, or f16/bf16 with 16-bit loads, f32 accumulation and one rounding at the
//! store; strided views, batch over `blockIdx.z`, optional accumulation): 16×16
//! output tiles with one output per thread, or, when both output sides are at least 64,
//! 64×64 tiles with a 4×4 register block per thread (`big_matmul_kernel`); both sum each
//! output sequentially over k, so they give the same bits. f16/bf16 matmuls with both output
//! sides at least 64 run on the tensor cores instead (`mma` launches, `mma_matmul_kernel`:
//! PTX `mma.sync.m16n8k16` with f32 accumulation, 64×64 tiles per 4-warp block); the CUDA
//! emulator runs the same kernel with a portable `rc_mma16816` that gathers the fragments by
//! warp shuffles in the PTX ISA's layout.
//! A row-fused group (`compiler::kernel::RowGroup`: a matmul and the loops that consume its
//! product row by row, e.g. a block of logits with its row maximum, rescaled sum and target
//! logit) is one `fused` launch (`row_group_kernel`): strips of 16 to 64 rows, the strip's
//! product in shared memory (computed as the unfused matmul would: tensor cores or FMA
//! tiles), then each loop on the strip's rows with the unfused reductions' order, so it gives
//! the unfused kernels' bits; the group's loops have `part` launches (nothing to launch).
//! A `Library` kernel has device code (`index` launches, see [`index`]) for gather,
//! scatter_add, take, take_add, pad, concat, argmax/argmin, uniform and normal samples; the rest (sort,
//! top-k masks, quantile, categorical samples, cumsum, QR/SVD, integer matmuls) runs on the
//! host between launches: its launch entry says `host`.

use compiler::ir::{Bin, Red, Un};
use compiler::kernel::{Affine, Inst, Kernel, Loop, Program, Store, StoreVal, View};
use lang::types::Dtype;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

mod index;

/// Options every unit must be compiled with.
pub const NVRTC_OPTIONS: &[&str] = &["--fmad=false", "--std=c++14"];

/// Threads per block of loop kernels.
pub const LOOP_BLOCK: u32 = 256;
/// Most blocks of a grid-stride loop.
pub const MAX_GRID: u64 = 4096;
/// The side of a matmul tile.
pub const TILE: u32 = 16;

/// How to launch one kernel of the program.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The kernel's index in `Program::kernels`.
    pub kernel: usize,
    /// The `extern "C"` name in the unit (`k12`), or empty for `host`.
    pub name: String,
    /// `loop`, `reduce`, `matmul` (FMA tiles), `mma` (tensor-core tiles), `index` (a library
    /// kernel with device code), `fused` (a row-fused group: its matmul and loops), `part` (a
    /// loop of such a group: nothing to launch) or `host` (a library kernel the runtime runs
    /// itself).
    pub kind: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Static shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// Dynamic shared memory per block (`extern __shared__`), in bytes: a row-fused kernel's
    /// strips where [`EmitOptions::row_shared`] lets them pass the 48 KiB of static memory.
    pub dynamic_shared: u32,
    /// The kernel's own table: entry `j` (`bufs[j]` in its text) is word `w` of the program's
    /// table plus `offset` (bytes, or the value itself for the zero word). The program's
    /// words: each buffer's address in `Program::buffers` order, the run's seed, then 0.
    /// Launches whose kernels differ only in these share one function (`name`).
    pub slots: Vec<(usize, i64)>,
}

/// One entry point in CUDA C.
#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub name: String,
    pub source: String,
    pub launches: Vec<Launch>,
}

impl Launch {
    /// An entry of kernel `ki` with no device function (`host` or `part`).
    fn nothing(ki: usize, kind: &'static str) -> Launch {
        Launch {
            kernel: ki,
            name: String::new(),
            kind,
            grid: [0; 3],
            block: [0; 3],
            shared_bytes: 0,
            dynamic_shared: 0,
            slots: vec![],
        }
    }

    /// Whether the launch runs a function of the unit: not `host` (the runtime runs it) nor
    /// `part` (a loop of a row-fused group: it runs inside its group's `fused` launch).
    pub fn runs_code(&self) -> bool {
        !matches!(self.kind, "host" | "part")
    }
}

impl Unit {
    /// The launch table as text (one line per kernel), for reports and snapshots.
    pub fn launch_table(&self) -> String {
        let mut s = String::new();
        for l in &self.launches {
            let table: Vec<String> =
                l.slots.iter().map(|(w, o)| if *o == 0 { format!("{w}") } else { format!("{w}+{o}") }).collect();
            let _ = writeln!(
                s,
                "k{:<4} {:<7} {:<6} grid {:?} block {:?} shared {} B table [{}]",
                l.kernel,
                l.kind,
                l.name,
                l.grid,
                l.block,
                l.shared_bytes,
                table.join(", ")
            );
            if l.dynamic_shared > 0 {
                s.pop();
                let _ = writeln!(s, " dynamic shared {} B", l.dynamic_shared);
            }
        }
        s
    }
}

fn compute(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => "float",
        _ => "double",
    }
}

fn is_f32ish(d: Dtype) -> bool {
    compute(d) == "float"
}

/// An exact literal of `v` in the compute type of `d`.
fn lit(v: f64, d: Dtype) -> String {
    if is_f32ish(d) {
        format!("__int_as_float(0x{:08x})", (v as f32).to_bits())
    } else {
        format!("__longlong_as_double(0x{:016x}LL)", v.to_bits())
    }
}

fn affine(a: &Affine) -> String {
    let mut s = format!("{}LL", a.c);
    for (d, c) in a.coef.iter().enumerate() {
        if *c != 0 {
            let _ = write!(s, " + {c}LL * i{d}");
        }
    }
    s
}

/// Device helpers: loads, stores and rounding per dtype, recipec's f32 exp/erf/gelu.
fn prelude() -> String {
    use compiler::math::*;
    let f = |v: f32| format!("__int_as_float(0x{:08x})", v.to_bits());
    let exp_p: Vec<String> = EXP_P.iter().map(|c| f(*c)).collect();
    let erf_s: Vec<String> = ERF_SMALL.iter().map(|c| f(*c)).collect();
    let erf_a: Vec<String> = ERF_A.iter().map(|c| f(*c)).collect();
    let mut s = String::from(
        r#"// Generated by recipec (codegen-cuda). Compile with --fmad=false.
typedef unsigned char u8;
typedef unsigned short u16;
// A row-fused kernel's strips in dynamic shared memory (opted in to past 48 KiB). The
// emulator, which runs one block at a time, gives every kernel the same static buffer.
#ifdef RC_EMU
__device__ inline u8* rc_emu_dynamic_shared() { alignas(16) static u8 buf[OPT_IN_SHARED_BYTES]; return buf; }
#define RC_DYNAMIC_SHARED(name) u8* const name = rc_emu_dynamic_shared()
#else
#define RC_DYNAMIC_SHARED(name) extern __shared__ __align__(16) u8 name[]
#endif

// Round a double to a float format with p significant bits, minimum exponent emin and
// largest finite value mx (round to nearest, ties to even; overflow to infinity).
__device__ __forceinline__ double rc_round_float(double x, int p, int emin, double mx, int mxexp) {
    if (x == 0.0 || isinf(x) || isnan(x)) return x;
    int e = ilogb(x);
    if (e < emin) e = emin;
    double ulp = ldexp(1.0, e - (p - 1));
    double r = rint(x / ulp) * ulp;
    if (fabs(r) > mx) {
        double halfway = mx + ldexp(1.0, mxexp - p);
        if (fabs(x) >= halfway) return copysign(__longlong_as_double(0x7ff0000000000000LL), x);
        return copysign(mx, x);
    }
    return r;
}
__device__ __forceinline__ double rc_round_f16(double x) { return rc_round_float(x, 11, -14, 65504.0, 15); }
__device__ __forceinline__ double rc_round_bf16(double x) { return rc_round_float(x, 8, -126, 3.3895313892515355e38, 127); }
__device__ __forceinline__ double rc_round_i32(double x) { return isnan(x) ? 0.0 : (double)(int)(long long)trunc(x); }
__device__ __forceinline__ double rc_round_i64(double x) { return isnan(x) ? 0.0 : trunc(x); }
__device__ __forceinline__ double rc_round_bool(double x) { return x != 0.0 ? 1.0 : 0.0; }

__device__ __forceinline__ float rc_f16_to_f32(u16 h) {
    float sign = (h & 0x8000) ? -1.0f : 1.0f;
    int e = (h >> 10) & 0x1f;
    float m = (float)(h & 0x3ff);
    if (e == 0) return sign * m * 5.9604644775390625e-08f;
    if (e == 31) return m == 0.0f ? sign * __int_as_float(0x7f800000) : __int_as_float(0x7fc00000);
    return sign * ldexpf(1.0f + m / 1024.0f, e - 15);
}
// f32 values that are already f16 values (every stored value is rounded first).
__device__ __forceinline__ u16 rc_f32_to_f16(float x) {
    unsigned int b = __float_as_uint(x);
    u16 sign = (u16)((b >> 16) & 0x8000);
    float a = fabsf(x);
    if (a != a) return 0x7e00;
    if (a > 65504.0f) return sign | 0x7c00;
    if (a < 6.103515625e-05f) return sign | (u16)rintf(a * 16777216.0f);
    int e = (int)((b >> 23) & 0xff) - 127;
    return sign | (u16)((e + 15) << 10) | (u16)((b & 0x7fffff) >> 13);
}

__device__ __forceinline__ float ld_f32(const u8* p, long long i) { return ((const float*)p)[i]; }
__device__ __forceinline__ double ld_f64(const u8* p, long long i) { return ((const double*)p)[i]; }
__device__ __forceinline__ double ld_i32(const u8* p, long long i) { return (double)((const int*)p)[i]; }
__device__ __forceinline__ double ld_i64(const u8* p, long long i) { return (double)((const long long*)p)[i]; }
__device__ __forceinline__ double ld_bool(const u8* p, long long i) { return p[i] ? 1.0 : 0.0; }
__device__ __forceinline__ float ld_bf16(const u8* p, long long i) { return __uint_as_float(((unsigned int)((const u16*)p)[i]) << 16); }
__device__ __forceinline__ float ld_f16(const u8* p, long long i) { return rc_f16_to_f32(((const u16*)p)[i]); }
__device__ __forceinline__ void st_f32(u8* p, long long i, float v) { ((float*)p)[i] = v; }
__device__ __forceinline__ void st_f64(u8* p, long long i, double v) { ((double*)p)[i] = v; }
__device__ __forceinline__ void st_i32(u8* p, long long i, double v) { ((int*)p)[i] = (int)(long long)v; }
__device__ __forceinline__ void st_i64(u8* p, long long i, double v) { ((long long*)p)[i] = (long long)v; }
__device__ __forceinline__ void st_bool(u8* p, long long i, double v) { p[i] = v != 0.0 ? 1 : 0; }
__device__ __forceinline__ void st_bf16(u8* p, long long i, float v) { ((u16*)p)[i] = (u16)(__float_as_uint(v) >> 16); }
__device__ __forceinline__ void st_f16(u8* p, long long i, float v) { ((u16*)p)[i] = rc_f32_to_f16(v); }

// The tensor cores: d = a·b + c for a 16×16 (row-major) by 16×8 (column-major) tile of
// 16-bit values, f32 accumulation: PTX `mma.sync.aligned.m16n8k16`, each lane holding the
// fragments the PTX ISA lays out (g = lane / 4, t = lane % 4: a = rows g and g+8, columns
// 2t, 2t+1 and 2t+8, 2t+9; b = rows 2t, 2t+1, 2t+8, 2t+9 of column g; c and d = rows g and
// g+8, columns 2t and 2t+1), two 16-bit values per register, the lower index in the low half.
__device__ __forceinline__ unsigned rc_pack2(u16 lo, u16 hi) { return (unsigned)lo | ((unsigned)hi << 16); }
#ifdef RC_EMU
// The emulator: the same fragments gathered across the warp with shuffles, each output a
// sequential f32 sum over k starting from c (the products of 16-bit values are exact).
template <int BF>
__device__ __forceinline__ float rc_half_bits(unsigned x) { return BF ? __uint_as_float(x << 16) : rc_f16_to_f32((u16)x); }
template <int BF>
__device__ void rc_mma16816(float* d, const unsigned* a, const unsigned* b, const float* c) {
    const int lane = (int)(threadIdx.x & 31), g = lane >> 2, t = lane & 3;
    float arow[2][16], bcol[2][16];
    for (int q = 0; q < 4; q++) {
        const unsigned r0 = __shfl_sync(0xffffffffu, a[0], 4 * g + q), r1 = __shfl_sync(0xffffffffu, a[1], 4 * g + q);
        const unsigned r2 = __shfl_sync(0xffffffffu, a[2], 4 * g + q), r3 = __shfl_sync(0xffffffffu, a[3], 4 * g + q);
        arow[0][2 * q] = rc_half_bits<BF>(r0 & 0xffff); arow[0][2 * q + 1] = rc_half_bits<BF>(r0 >> 16);
        arow[1][2 * q] = rc_half_bits<BF>(r1 & 0xffff); arow[1][2 * q + 1] = rc_half_bits<BF>(r1 >> 16);
        arow[0][2 * q + 8] = rc_half_bits<BF>(r2 & 0xffff); arow[0][2 * q + 9] = rc_half_bits<BF>(r2 >> 16);
        arow[1][2 * q + 8] = rc_half_bits<BF>(r3 & 0xffff); arow[1][2 * q + 9] = rc_half_bits<BF>(r3 >> 16);
        for (int j = 0; j < 2; j++) {
            const int src = 4 * (2 * t + j) + q;
            const unsigned s0 = __shfl_sync(0xffffffffu, b[0], src), s1 = __shfl_sync(0xffffffffu, b[1], src);
            bcol[j][2 * q] = rc_half_bits<BF>(s0 & 0xffff); bcol[j][2 * q + 1] = rc_half_bits<BF>(s0 >> 16);
            bcol[j][2 * q + 8] = rc_half_bits<BF>(s1 & 0xffff); bcol[j][2 * q + 9] = rc_half_bits<BF>(s1 >> 16);
        }
    }
    for (int i = 0; i < 4; i++) {
        float acc = c[i];
        for (int k = 0; k < 16; k++) acc = __fadd_rn(acc, __fmul_rn(arow[i >> 1][k], bcol[i & 1][k]));
        d[i] = acc;
    }
}
#else
template <int BF>
__device__ __forceinline__ void rc_mma16816(float* d, const unsigned* a, const unsigned* b, const float* c);
template <>
__device__ __forceinline__ void rc_mma16816<1>(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
template <>
__device__ __forceinline__ void rc_mma16816<0>(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif

// NaN-propagating minimum and maximum (the interpreter's `min`/`max`).
__device__ __forceinline__ double rc_max(double a, double b) { return (isnan(a) || isnan(b)) ? __longlong_as_double(0x7ff8000000000000LL) : fmax(a, b); }
__device__ __forceinline__ double rc_min(double a, double b) { return (isnan(a) || isnan(b)) ? __longlong_as_double(0x7ff8000000000000LL) : fmin(a, b); }
__device__ __forceinline__ float rc_maxf(float a, float b) { return (isnan(a) || isnan(b)) ? __int_as_float(0x7fc00000) : fmaxf(a, b); }
__device__ __forceinline__ float rc_minf(float a, float b) { return (isnan(a) || isnan(b)) ? __int_as_float(0x7fc00000) : fminf(a, b); }
__device__ __forceinline__ double rc_rem(double x, double y, bool fl) {
    if (!fl && y == 0.0) return 0.0;
    double r = fmod(x, y);
    return (r != 0.0 && ((r < 0.0) != (y < 0.0))) ? r + y : r;
}
__device__ __forceinline__ double rc_idiv(double x, double y) { return y == 0.0 ? 0.0 : trunc(x / y); }
__device__ __forceinline__ double rc_sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}
__device__ __forceinline__ double rc_sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : x); }

"#,
    );
    // The emulator's stand-in for dynamic shared memory holds the most a block may opt in to.
    s = s.replacen("OPT_IN_SHARED_BYTES", &OPT_IN_SHARED.to_string(), 1);
    // recipec's f32 exp/erf/gelu (compiler::math), the same operation sequence.
    let _ = write!(
        s,
        r#"__device__ __forceinline__ float rc_exp_f32(float x) {{
    float xc = x > {hi} ? {hi} : (x < {lo} ? {lo} : x);
    float n = __fsub_rn(__fadd_rn(__fmul_rn(xc, {l2e}), {magic}), {magic});
    float r = __fsub_rn(xc, __fmul_rn(n, {c1}));
    r = __fsub_rn(r, __fmul_rn(n, {c2}));
    float z = __fmul_rn(r, r);
    float p = {p0};
"#,
        hi = f(EXP_HI),
        lo = f(EXP_LO),
        l2e = f(LOG2E),
        magic = f(ROUND_MAGIC),
        c1 = f(LN2_HI),
        c2 = f(LN2_LO),
        p0 = exp_p[0]
    );
    for c in &exp_p[1..] {
        let _ = writeln!(s, "    p = __fadd_rn(__fmul_rn(p, r), {c});");
    }
    let _ = write!(
        s,
        r#"    p = __fadd_rn(__fadd_rn(__fmul_rn(p, z), r), 1.0f);
    int ni = isnan(n) ? 0 : (int)n;
    int h = ni >> 1;
    float s1 = __int_as_float((h + 127) << 23);
    float s2 = __int_as_float((ni - h + 127) << 23);
    float y = __fmul_rn(__fmul_rn(p, s1), s2);
    if (isnan(x)) return x;
    if (x > {hi}) return __int_as_float(0x7f800000);
    if (x < {lo}) return 0.0f;
    return y;
}}
__device__ __forceinline__ float rc_erf_f32(float x) {{
    float ax = fabsf(x);
    float z = __fmul_rn(x, x);
    float s = {s5};
"#,
        hi = f(EXP_HI),
        lo = f(EXP_LO),
        s5 = erf_s[5]
    );
    for c in erf_s[..5].iter().rev() {
        let _ = writeln!(s, "    s = __fadd_rn(__fmul_rn(s, z), {c});");
    }
    let _ = write!(
        s,
        r#"    float small = __fmul_rn(x, s);
    float t = __fdiv_rn(1.0f, __fadd_rn(1.0f, __fmul_rn({p}, ax)));
    float q = {a4};
"#,
        p = f(ERF_P),
        a4 = erf_a[4]
    );
    for c in erf_a[..4].iter().rev() {
        let _ = writeln!(s, "    q = __fadd_rn(__fmul_rn(q, t), {c});");
    }
    let _ = write!(
        s,
        r#"    float e = rc_exp_f32(-__fmul_rn(ax, ax));
    float large = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(t, q), e));
    if (x < 0.0f) large = -large;
    return ax < 0.5f ? small : large;
}}
__device__ __forceinline__ float rc_gelu_f32(float x) {{
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, rc_erf_f32(__fmul_rn(x, {s}))));
}}

"#,
        s = f(FRAC_1_SQRT_2)
    );
    s.push_str(index::PRELUDE);
    s
}

/// `x` (a C expression of compute type `from`) rounded to `to`, in `to`'s compute type.
fn round(to: Dtype, x: &str, from_float: bool) -> String {
    match to {
        Dtype::F32 if from_float => x.to_string(),
        Dtype::F32 => format!("(float)({x})"),
        Dtype::F64 if from_float => format!("(double)({x})"),
        Dtype::F64 => x.to_string(),
        Dtype::F16 => format!("(float)rc_round_f16((double)({x}))"),
        Dtype::BF16 => format!("(float)rc_round_bf16((double)({x}))"),
        Dtype::I32 => format!("rc_round_i32((double)({x}))"),
        Dtype::I64 => format!("rc_round_i64((double)({x}))"),
        Dtype::Bool => format!("rc_round_bool((double)({x}))"),
    }
}

fn unary(u: Un, x: &str, xd: Dtype, dt: Dtype) -> String {
    let xf = is_f32ish(xd);
    if dt == Dtype::F32 && xf {
        match u {
            Un::Exp => return format!("rc_exp_f32({x})"),
            Un::Erf => return format!("rc_erf_f32({x})"),
            Un::Gelu => return format!("rc_gelu_f32({x})"),
            _ => {}
        }
    }
    let native = match u {
        Un::Neg => Some(format!("(-({x}))")),
        Un::Abs => Some(if xf { format!("fabsf({x})") } else { format!("fabs({x})") }),
        Un::Sqrt => Some(if xf { format!("__fsqrt_rn({x})") } else { format!("__dsqrt_rn({x})") }),
        Un::Floor => Some(if xf { format!("floorf({x})") } else { format!("floor({x})") }),
        Un::Ceil => Some(if xf { format!("ceilf({x})") } else { format!("ceil({x})") }),
        Un::Round => Some(if xf { format!("rintf({x})") } else { format!("rint({x})") }),
        Un::StopGradient => Some(x.to_string()),
        Un::Relu => {
            Some(if xf { format!("(({x}) > 0.0f ? ({x}) : 0.0f)") } else { format!("(({x}) > 0.0 ? ({x}) : 0.0)") })
        }
        _ => None,
    };
    if let Some(v) = native {
        return match dt {
            Dtype::F32 | Dtype::F64 => v,
            _ => round(dt, &v, xf),
        };
    }
    let d = format!("(double)({x})");
    let f64expr = match u {
        Un::Not => format!("({d} == 0.0 ? 1.0 : 0.0)"),
        Un::Exp => format!("exp({d})"),
        Un::Log => format!("log({d})"),
        Un::Log1p => format!("log1p({d})"),
        Un::Rsqrt => format!("(1.0 / sqrt({d}))"),
        Un::Tanh => format!("tanh({d})"),
        Un::Sigmoid => format!("rc_sigmoid({d})"),
        Un::Softplus => format!("(fmax({d}, 0.0) + log1p(exp(-fabs({d}))))"),
        Un::Gelu => format!("(0.5 * {d} * (1.0 + erf({d} / 1.4142135623730951)))"),
        Un::GeluTanh => format!("(0.5 * {d} * (1.0 + tanh(0.7978845608028654 * ({d} + 0.044715 * {d} * {d} * {d}))))"),
        Un::Silu => format!("({d} * rc_sigmoid({d}))"),
        Un::Erf => format!("erf({d})"),
        Un::Cos => format!("cos({d})"),
        Un::Sin => format!("sin({d})"),
        Un::Sign => format!("rc_sign({d})"),
        _ => unreachable!("native above"),
    };
    round(dt, &f64expr, false)
}

fn binary(op: Bin, x: &str, y: &str, xd: Dtype, float: bool, dt: Dtype) -> String {
    let xf = is_f32ish(xd);
    let cmp = match op {
        Bin::Eq => Some("=="),
        Bin::Ne => Some("!="),
        Bin::Lt => Some("<"),
        Bin::Le => Some("<="),
        Bin::Gt => Some(">"),
        Bin::Ge => Some(">="),
        _ => None,
    };
    if let Some(c) = cmp {
        return format!("(({x}) {c} ({y}) ? 1.0 : 0.0)");
    }
    let v = match op {
        Bin::Add if xf => format!("__fadd_rn({x}, {y})"),
        Bin::Sub if xf => format!("__fsub_rn({x}, {y})"),
        Bin::Mul if xf => format!("__fmul_rn({x}, {y})"),
        Bin::Div if xf => format!("__fdiv_rn({x}, {y})"),
        Bin::Add => format!("__dadd_rn({x}, {y})"),
        Bin::Sub => format!("__dsub_rn({x}, {y})"),
        Bin::Mul => format!("__dmul_rn({x}, {y})"),
        Bin::Div if float => format!("__ddiv_rn({x}, {y})"),
        Bin::Div => format!("rc_idiv({x}, {y})"),
        Bin::Max if xf => format!("rc_maxf({x}, {y})"),
        Bin::Min if xf => format!("rc_minf({x}, {y})"),
        Bin::Max => format!("rc_max({x}, {y})"),
        Bin::Min => format!("rc_min({x}, {y})"),
        Bin::Rem => format!("rc_rem((double)({x}), (double)({y}), {float})"),
        Bin::Pow => format!("pow((double)({x}), (double)({y}))"),
        Bin::And => format!("((({x}) != 0 && ({y}) != 0) ? 1.0 : 0.0)"),
        Bin::Or => format!("((({x}) != 0 || ({y}) != 0) ? 1.0 : 0.0)"),
        _ => unreachable!("comparisons above"),
    };
    let from_float = xf && matches!(op, Bin::Add | Bin::Sub | Bin::Mul | Bin::Div | Bin::Max | Bin::Min);
    match dt {
        Dtype::F32 if from_float => v,
        Dtype::F64 if !from_float => v,
        _ => round(dt, &v, from_float),
    }
}

/// The body's values at one point, as C statements; returns the variable names.
fn body(p: &Program, l: &Loop, out: &mut String, indent: &str) -> Vec<String> {
    body_with(p, l, out, indent, &BTreeMap::new(), &BTreeMap::new(), None)
}

/// [`body`], with the loads of the buffers in `vector` (contiguous f32 at the flat index)
/// read from the registers the vector loop loaded (`{name}[e]`), and the loads of `tiles` (a
/// row-fused group's product and strips, read at `n·i0 + i1`) from their strips in shared
/// memory (the array named, whose row 0 is row `row0`); only the instructions `keep` marks
/// (all without it) are emitted, the others keep their names, unused.
fn body_with(
    p: &Program,
    l: &Loop,
    out: &mut String,
    indent: &str,
    vector: &BTreeMap<usize, String>,
    tiles: &BTreeMap<usize, String>,
    keep: Option<&[bool]>,
) -> Vec<String> {
    let mut names: Vec<String> = vec![];
    for (v, ins) in l.body.iter().enumerate() {
        if keep.is_some_and(|k| !k[v]) {
            names.push(format!("v{v}"));
            continue;
        }
        let dt = ins.dtype;
        let ty = compute(dt);
        let name = format!("v{v}");
        let e = match &ins.inst {
            Inst::Load { buf, at } => {
                let bd = p.buffers[*buf].dtype;
                let x = match vector.get(buf) {
                    Some(v) if is_flat(at) => format!("{v}[e]"),
                    _ if tiles.contains_key(buf) => format!("ld_{}({}, {})", Dtype::name(bd), tiles[buf], strip_at(at)),
                    _ => format!("ld_{}(bufs[{buf}], {})", Dtype::name(bd), affine(at)),
                };
                if bd == dt {
                    x
                } else {
                    round(dt, &x, is_f32ish(bd))
                }
            }
            Inst::Const(c) => lit(*c, dt),
            Inst::Index(at) => {
                // A constant start (the column of a block) comes from the kernel's table, so
                // the blocks' kernels share code: `bufs[#c]` is an entry holding `c`.
                let x = if at.c == 0 {
                    format!("(double)({})", affine(at))
                } else {
                    let rest = Affine { coef: at.coef.clone(), c: 0 };
                    format!("(double)((long long)bufs[#{}] + {})", at.c, affine(&rest))
                };
                if matches!(dt, Dtype::I32 | Dtype::I64) {
                    x
                } else {
                    round(dt, &x, false)
                }
            }
            Inst::Un(u, a) => unary(*u, &names[*a], l.body[*a].dtype, dt),
            Inst::Bin(b, x, y, float) => binary(*b, &names[*x], &names[*y], l.body[*x].dtype, *float, dt),
            Inst::Select(c, a, b) => format!("(({}) != 0 ? ({ty})({}) : ({ty})({}))", names[*c], names[*a], names[*b]),
            Inst::Cast(a) => {
                let from = l.body[*a].dtype;
                let x = &names[*a];
                match dt {
                    Dtype::Bool => format!("(((double)({x})) != 0.0 ? 1.0 : 0.0)"),
                    _ => round(dt, x, is_f32ish(from)),
                }
            }
        };
        let _ = writeln!(out, "{indent}const {ty} {name} = {e};");
        names.push(name);
    }
    names
}

/// The index in a row-fused group's shared-memory strip of the element `at` (row `i0`
/// counted from the strip's first row, `row0`).
fn strip_at(at: &Affine) -> String {
    let mut idx = format!("{}LL", at.c);
    for (d, c) in at.coef.iter().enumerate().filter(|(_, c)| **c != 0) {
        let i = if d == 0 { "(i0 - row0)".to_string() } else { format!("i{d}") };
        let _ = write!(idx, " + {i} * {c}LL");
    }
    idx
}

fn red_init(op: Red) -> &'static str {
    match op {
        Red::Sum => "0.0",
        Red::Prod => "1.0",
        Red::Max => "__longlong_as_double(0xfff0000000000000LL)",
        _ => "__longlong_as_double(0x7ff0000000000000LL)",
    }
}

/// `i{d}` for the dims `dims` of `l` from the flattened (row-major) index `flat`.
fn indices(out: &mut String, l: &Loop, dims: std::ops::Range<usize>, flat: &str, indent: &str) {
    let _ = writeln!(out, "{indent}long long rem_{flat} = {flat};");
    for d in dims.rev() {
        let _ = writeln!(
            out,
            "{indent}const long long i{d} = rem_{flat} % {}LL; rem_{flat} /= {}LL;",
            l.dims[d], l.dims[d]
        );
    }
    let _ = writeln!(out, "{indent}(void)rem_{flat};");
}

/// `acc` combined with `x` by the reduction's op, in `double` with round-to-nearest.
fn combine(op: Red, acc: &str, x: &str) -> String {
    match op {
        Red::Sum => format!("__dadd_rn({acc}, {x})"),
        Red::Prod => format!("__dmul_rn({acc}, {x})"),
        Red::Max => format!("rc_max({acc}, {x})"),
        _ => format!("rc_min({acc}, {x})"),
    }
}

/// The stores of a reduction's result `acc` (rounded to each buffer's dtype).
fn acc_stores(
    p: &Program,
    ki: usize,
    l: &Loop,
    r: &compiler::kernel::Reduction,
    out: &mut String,
    indent: &str,
) -> Result<(), String> {
    let v = round(r.dtype, "acc", false);
    for s in &l.stores {
        if s.val != StoreVal::Acc {
            return Err(format!("k{ki}: an elementwise store in a reduction loop"));
        }
        let bd = p.buffers[s.buf].dtype;
        let val = if bd == r.dtype { v.clone() } else { round(bd, &v, is_f32ish(r.dtype)) };
        let _ = writeln!(out, "{indent}st_{}(bufs[{}], {}, {val});", Dtype::name(bd), s.buf, affine(&s.at));
    }
    Ok(())
}

/// Reduced extents at least this long get one warp per output (`warp_reduce_kernel`).
pub const WARP_REDUCE_MIN: u64 = 32;

/// A reduction with one warp (32 lanes) per output element: lane `l` accumulates the reduced
/// elements `l, l + 32, l + 64, …` (flattened reduced index, row-major) in `double`, in that
/// order; the 32 partials are then combined by a shuffle tree (`__shfl_down_sync` with offsets
/// 16, 8, 4, 2, 1) and lane 0 stores. The order depends on nothing but the shape, so results
/// are deterministic; sums differ from the interpreter's sequential order by rounding only.
fn warp_reduce_kernel(
    p: &Program,
    ki: usize,
    l: &Loop,
    r: &compiler::kernel::Reduction,
    out: &mut String,
) -> Result<Launch, String> {
    let outer = l.outer_dims();
    let total: u64 = l.dims[..outer].iter().map(|d| *d as u64).product();
    let reduced: u64 = l.dims[outer..].iter().map(|d| *d as u64).product();
    let warps = (LOOP_BLOCK / 32) as u64;
    let name = format!("k{ki}");
    let _ = writeln!(out, "extern \"C\" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{");
    let _ = writeln!(out, "    const int lane = threadIdx.x & 31;");
    let _ = writeln!(
        out,
        "    for (long long pt = (long long)blockIdx.x * {warps} + (threadIdx.x >> 5); pt < {total}LL; pt += (long long)gridDim.x * {warps}) {{"
    );
    indices(out, l, 0..outer, "pt", "        ");
    let _ = writeln!(out, "        double acc = {};", red_init(r.op));
    let _ = writeln!(out, "        for (long long q = lane; q < {reduced}LL; q += 32) {{");
    indices(out, l, outer..l.dims.len(), "q", "            ");
    let names = body(p, l, out, "            ");
    let _ = writeln!(out, "            acc = {};", combine(r.op, "acc", &format!("(double)({})", names[r.value])));
    let _ = writeln!(out, "        }}");
    let _ = writeln!(out, "        for (int off = 16; off > 0; off >>= 1) {{");
    let _ = writeln!(out, "            const double other = __shfl_down_sync(0xffffffffu, acc, off);");
    let _ = writeln!(out, "            acc = {};", combine(r.op, "acc", "other"));
    let _ = writeln!(out, "        }}");
    let _ = writeln!(out, "        if (lane == 0) {{");
    acc_stores(p, ki, l, r, out, "            ")?;
    let _ = writeln!(out, "        }}");
    let _ = writeln!(out, "    }}\n}}\n");
    Ok(line_launch(ki, name, "reduce", total.div_ceil(warps)))
}

/// Tiles of `tile` covering `len`, as a grid dimension (saturated: `check_launches` in the
/// runtime refuses a grid over the device's limits rather than launching a truncated one).
fn grid_dim(len: usize, tile: u32) -> u32 {
    (len as u64).div_ceil(tile as u64).min(u32::MAX as u64) as u32
}

/// A launch of `blocks` blocks of [`LOOP_BLOCK`] threads in one grid dimension (at most
/// [`MAX_GRID`]: the kernels' grid-stride loops cover the rest).
pub(crate) fn line_launch(ki: usize, name: String, kind: &'static str, blocks: u64) -> Launch {
    Launch {
        kernel: ki,
        name,
        kind,
        grid: [blocks.clamp(1, MAX_GRID) as u32, 1, 1],
        block: [LOOP_BLOCK, 1, 1],
        shared_bytes: 0,
        dynamic_shared: 0,
        slots: vec![],
    }
}

fn loop_kernel(p: &Program, ki: usize, l: &Loop, out: &mut String) -> Result<Launch, String> {
    let outer = l.outer_dims();
    if let Some(r) = &l.reduce {
        let reduced: u64 = l.dims[outer..].iter().map(|d| *d as u64).product();
        if reduced >= WARP_REDUCE_MIN && matches!(r.op, Red::Sum | Red::Prod | Red::Max | Red::Min) {
            return warp_reduce_kernel(p, ki, l, r, out);
        }
    }
    if l.reduce.is_none() {
        if let Some(launch) = vector_loop_kernel(p, ki, l, out)? {
            return Ok(launch);
        }
    }
    let total: u64 = l.dims[..outer].iter().map(|d| *d as u64).product();
    let name = format!("k{ki}");
    let _ = writeln!(out, "extern \"C\" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{");
    let _ = writeln!(
        out,
        "    for (long long pt = (long long)blockIdx.x * blockDim.x + threadIdx.x; pt < {total}LL; pt += (long long)gridDim.x * blockDim.x) {{"
    );
    indices(out, l, 0..outer, "pt", "        ");
    match &l.reduce {
        None => {
            let names = body(p, l, out, "        ");
            elementwise_stores(p, ki, l, &names, out)?;
        }
        Some(r) => {
            if !matches!(r.op, Red::Sum | Red::Prod | Red::Max | Red::Min) {
                return Err(format!("k{ki}: reduction {:?} in a loop", r.op));
            }
            let _ = writeln!(out, "        double acc = {};", red_init(r.op));
            let mut indent = String::from("        ");
            for d in outer..l.dims.len() {
                let _ = writeln!(out, "{indent}for (long long i{d} = 0; i{d} < {}LL; i{d}++) {{", l.dims[d]);
                indent.push_str("    ");
            }
            let names = body(p, l, out, &indent);
            let x = format!("(double)({})", names[r.value]);
            let _ = writeln!(out, "{indent}acc = {};", combine(r.op, "acc", &x));
            for _ in outer..l.dims.len() {
                indent.truncate(indent.len() - 4);
                let _ = writeln!(out, "{indent}}}");
            }
            acc_stores(p, ki, l, r, out, "        ")?;
        }
    }
    let _ = writeln!(out, "    }}\n}}\n");
    let kind = if l.reduce.is_some() { "reduce" } else { "loop" };
    Ok(line_launch(ki, name, kind, total.div_ceil(LOOP_BLOCK as u64)))
}

/// The value an elementwise store writes (the body's value rounded to the buffer's dtype).
fn stored_value(p: &Program, ki: usize, l: &Loop, names: &[String], s: &Store) -> Result<String, String> {
    let StoreVal::Val(v) = s.val else {
        return Err(format!("k{ki}: a store of the accumulator outside a reduction"));
    };
    let bd = p.buffers[s.buf].dtype;
    Ok(if l.body[v].dtype == bd { names[v].clone() } else { round(bd, &names[v], is_f32ish(l.body[v].dtype)) })
}

/// The C statement storing `val` where `s` says.
fn store_line(p: &Program, s: &Store, val: &str) -> String {
    format!("st_{}(bufs[{}], {}, {val});", Dtype::name(p.buffers[s.buf].dtype), s.buf, affine(&s.at))
}

/// Every store of an elementwise loop, one element per thread.
fn elementwise_stores(p: &Program, ki: usize, l: &Loop, names: &[String], out: &mut String) -> Result<(), String> {
    for s in &l.stores {
        let _ = writeln!(out, "        {}", store_line(p, s, &stored_value(p, ki, l, names, s)?));
    }
    Ok(())
}

/// `at` is the flat index of a one-dimensional loop (`i0`, no offset).
fn is_flat(at: &Affine) -> bool {
    at.c == 0 && at.coef == [1]
}

/// Loops of fewer points keep one element per thread.
pub const VECTOR_MIN: usize = 1024;

/// An elementwise loop over one (coalesced) dimension that reads or writes f32 buffers at
/// the flat index: each thread takes four consecutive points per step of the grid-stride
/// loop, with one 128-bit load (`float4`) per such buffer read and one 128-bit store per
/// such buffer written (arena buffers are 64-byte aligned, device allocations 256-byte);
/// other loads (scalars, other dtypes, other index maps) stay per element. The points past
/// the last multiple of four run one per thread after. Values and stores are the scalar
/// loop's, element for element. `None` when the loop does not qualify.
fn vector_loop_kernel(p: &Program, ki: usize, l: &Loop, out: &mut String) -> Result<Option<Launch>, String> {
    if l.dims.len() != 1 || l.dims[0] < VECTOR_MIN {
        return Ok(None);
    }
    let f32_flat = |buf: usize, at: &Affine| p.buffers[buf].dtype == Dtype::F32 && is_flat(at);
    // The buffers read as contiguous f32 at the flat index by the instructions `keep` marks.
    let vector_loads = |keep: &[bool]| {
        let mut loads: Vec<usize> = (l.body.iter().zip(keep))
            .filter_map(|(i, k)| match &i.inst {
                Inst::Load { buf, at } if *k && f32_flat(*buf, at) => Some(*buf),
                _ => None,
            })
            .collect();
        loads.sort();
        loads.dedup();
        loads
    };
    let loads = vector_loads(&vec![true; l.body.len()]);
    let vstores: Vec<bool> = l.stores.iter().map(|s| f32_flat(s.buf, &s.at)).collect();
    if loads.is_empty() && !vstores.iter().any(|v| *v) {
        return Ok(None);
    }
    let total = l.dims[0] as u64;
    let quads = total / 4;
    let name = format!("k{ki}");
    let _ = writeln!(out, "extern \"C\" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{");
    let _ = writeln!(
        out,
        "    for (long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x; q < {quads}LL; q += (long long)gridDim.x * blockDim.x) {{"
    );
    let groups = store_groups(l);
    let (indent, inner) =
        if groups.len() > 1 { ("            ", "                ") } else { ("        ", "            ") };
    for (group, keep) in &groups {
        if groups.len() > 1 {
            let _ = writeln!(out, "        {{");
        }
        let mut vector: BTreeMap<usize, String> = BTreeMap::new();
        // Registers are named by position, not by buffer, so blocks of the same shape share code.
        for (j, b) in vector_loads(keep).iter().enumerate() {
            let _ = writeln!(out, "{indent}const float4 w{j} = ((const float4*)bufs[{b}])[q];");
            let _ = writeln!(out, "{indent}const float r{j}[4] = {{w{j}.x, w{j}.y, w{j}.z, w{j}.w}};");
            vector.insert(*b, format!("r{j}"));
        }
        for &si in group {
            if vstores[si] {
                let _ = writeln!(out, "{indent}float s{si}[4];");
            }
        }
        // Unrolled, so the four-point arrays are registers (a loop indexes them in local memory).
        let _ = writeln!(out, "#pragma unroll");
        let _ = writeln!(out, "{indent}for (int e = 0; e < 4; e++) {{");
        let _ = writeln!(out, "{inner}const long long i0 = 4 * q + e;");
        let names = body_with(p, l, out, inner, &vector, &BTreeMap::new(), Some(keep));
        for &si in group {
            let s = &l.stores[si];
            let val = stored_value(p, ki, l, &names, s)?;
            if vstores[si] {
                let _ = writeln!(out, "{inner}s{si}[e] = {val};");
            } else {
                let _ = writeln!(out, "{inner}{}", store_line(p, s, &val));
            }
        }
        let _ = writeln!(out, "{indent}}}");
        for &si in group {
            let s = &l.stores[si];
            if vstores[si] {
                let _ = writeln!(
                    out,
                    "{indent}((float4*)bufs[{}])[q] = make_float4(s{si}[0], s{si}[1], s{si}[2], s{si}[3]);",
                    s.buf
                );
            }
        }
        if groups.len() > 1 {
            let _ = writeln!(out, "        }}");
        }
    }
    let _ = writeln!(out, "    }}");
    if quads * 4 == total {
        let _ = writeln!(out, "}}\n");
        return Ok(Some(line_launch(ki, name, "loop", quads.div_ceil(LOOP_BLOCK as u64))));
    }
    // The tail, one point per thread.
    let _ = writeln!(
        out,
        "    for (long long i0 = {}LL + (long long)blockIdx.x * blockDim.x + threadIdx.x; i0 < {total}LL; i0 += (long long)gridDim.x * blockDim.x) {{",
        quads * 4
    );
    let names = body(p, l, out, "        ");
    elementwise_stores(p, ki, l, &names, out)?;
    let _ = writeln!(out, "    }}\n}}\n");
    Ok(Some(line_launch(ki, name, "loop", quads.div_ceil(LOOP_BLOCK as u64))))
}

/// The instructions the values stored by `stores` are computed from.
fn cone<'a>(l: &Loop, stores: impl Iterator<Item = &'a Store>) -> Vec<bool> {
    let mut keep = vec![false; l.body.len()];
    let mut stack: Vec<usize> =
        stores.filter_map(|s| if let StoreVal::Val(v) = s.val { Some(v) } else { None }).collect();
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut keep[v], true) {
            continue;
        }
        match &l.body[v].inst {
            Inst::Load { .. } | Inst::Const(_) | Inst::Index(_) => {}
            Inst::Un(_, a) | Inst::Cast(a) => stack.push(*a),
            Inst::Bin(_, a, b, _) => stack.extend([*a, *b]),
            Inst::Select(c, a, b) => stack.extend([*c, *a, *b]),
        }
    }
    keep
}

/// The stores of an elementwise loop in groups that can be computed one after another in a
/// thread's step: two stores share a group when both are computed from one per-element value
/// (a load or index that varies along the loop, or anything computed from one), or when one
/// group would read a buffer that another writes. Values that do not vary (constants, scalar
/// loads) are recomputed in each group. A horizontally fused update (one AdamW step for every
/// parameter of a shape) so becomes one group per parameter, and a thread holds one
/// parameter's registers at a time instead of every parameter's (which spilled to local
/// memory). Groups are in the order of their first store; so are the stores in each. Each
/// comes with the instructions it computes (the union of its stores' [`cone`]s).
fn store_groups(l: &Loop) -> Vec<(Vec<usize>, Vec<bool>)> {
    let n = l.stores.len();
    let mut varies = vec![false; l.body.len()];
    for (v, ins) in l.body.iter().enumerate() {
        varies[v] = match &ins.inst {
            Inst::Load { at, .. } | Inst::Index(at) => at.coef.iter().any(|c| *c != 0),
            Inst::Const(_) => false,
            Inst::Un(_, a) | Inst::Cast(a) => varies[*a],
            Inst::Bin(_, a, b, _) => varies[*a] || varies[*b],
            Inst::Select(c, a, b) => varies[*c] || varies[*a] || varies[*b],
        };
    }
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    fn join(parent: &mut [usize], a: usize, b: usize) {
        let (ra, rb) = (root(parent, a), root(parent, b));
        parent[ra.max(rb)] = ra.min(rb);
    }
    let cones: Vec<Vec<bool>> = l.stores.iter().map(|s| cone(l, std::iter::once(s))).collect();
    let mut owner: Vec<Option<usize>> = vec![None; l.body.len()];
    for (si, c) in cones.iter().enumerate() {
        for v in (0..l.body.len()).filter(|&v| c[v] && varies[v]) {
            match owner[v] {
                Some(o) => join(&mut parent, o, si),
                None => owner[v] = Some(si),
            }
        }
    }
    // The buffers each store's value reads.
    let reads: Vec<BTreeSet<usize>> = cones
        .iter()
        .map(|c| {
            (l.body.iter().zip(c))
                .filter_map(|(i, k)| match i.inst {
                    Inst::Load { buf, .. } if *k => Some(buf),
                    _ => None,
                })
                .collect()
        })
        .collect();
    for (si, s) in l.stores.iter().enumerate() {
        for ti in 0..n {
            if reads[ti].contains(&s.buf) || l.stores[ti].buf == s.buf {
                join(&mut parent, si, ti);
            }
        }
    }
    let mut groups: Vec<(Vec<usize>, Vec<bool>)> = vec![];
    let mut index: BTreeMap<usize, usize> = BTreeMap::new();
    for si in 0..n {
        let r = root(&mut parent, si);
        let g = *index.entry(r).or_insert_with(|| {
            groups.push((vec![], vec![false; l.body.len()]));
            groups.len() - 1
        });
        groups[g].0.push(si);
        for (k, c) in groups[g].1.iter_mut().zip(&cones[si]) {
            *k |= c;
        }
    }
    groups
}

/// The element offset of batch `bz` of a view (batch axes row-major).
fn batch_offset(v: &View, batch: &[usize]) -> String {
    let mut s = format!("{}LL", v.offset);
    let mut div = 1u64;
    for d in (0..batch.len()).rev() {
        if v.batch_strides[d] != 0 {
            let _ = write!(s, " + ((bz / {div}LL) % {}LL) * {}LL", batch[d], v.batch_strides[d]);
        }
        div *= batch[d] as u64;
    }
    s
}

/// The accumulator type and its add and multiply for a matmul of `d`: f32 for f32, f16 and
/// bf16 (16-bit storage, f32 accumulation, one rounding at the store), f64 for f64.
fn matmul_arith(d: Dtype) -> Option<(&'static str, &'static str, &'static str)> {
    match d {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => Some(("float", "__fadd_rn", "__fmul_rn")),
        Dtype::F64 => Some(("double", "__dadd_rn", "__dmul_rn")),
        _ => None,
    }
}

fn matmul_kernel(ki: usize, k: &Kernel, out: &mut String) -> Result<Launch, String> {
    let Kernel::MatMul { a, b, out_offset, out_row_stride, batch, m, k: kk, n, dtype, .. } = k else {
        unreachable!("a matmul")
    };
    let Some((t, add, mul)) = matmul_arith(*dtype) else {
        return Err(format!("k{ki}: {dtype} matmuls are not generated for CUDA yet"));
    };
    let ld = format!("ld_{}", Dtype::name(*dtype));
    let name = format!("k{ki}");
    let nb: u64 = batch.iter().map(|x| *x as u64).product();
    if *m >= BIG_TILE as usize && *n >= BIG_TILE as usize {
        if matches!(dtype, Dtype::F16 | Dtype::BF16) {
            return mma_matmul_kernel(ki, k, out);
        }
        return big_matmul_kernel(ki, k, out);
    }
    let tile = TILE;
    // Consecutive threads (`threadIdx.x`) load along each operand's nearer axis in memory.
    let (ai, aj) = if k_fast(a) { ("threadIdx.y", "threadIdx.x") } else { ("threadIdx.x", "threadIdx.y") };
    let (bi, bj) = if c_fast(b) { ("threadIdx.y", "threadIdx.x") } else { ("threadIdx.x", "threadIdx.y") };
    let _ = writeln!(
        out,
        r#"extern "C" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{
    __shared__ {t} As[{tile}][{tile} + 1];
    __shared__ {t} Bs[{tile}][{tile} + 1];
    const long long bz = blockIdx.z;
    const long long row = (long long)blockIdx.y * {tile} + threadIdx.y;
    const long long col = (long long)blockIdx.x * {tile} + threadIdx.x;
{offsets}
    {t} sum = 0;
    for (long long t0 = 0; t0 < {kk}LL; t0 += {tile}) {{
        {{
            const long long ar = (long long)blockIdx.y * {tile} + {ai}, ak = t0 + {aj};
            As[{ai}][{aj}] = {aload};
        }}
        {{
            const long long bk = t0 + {bi}, bc = (long long)blockIdx.x * {tile} + {bj};
            Bs[{bi}][{bj}] = {bload};
        }}
        __syncthreads();
        for (int q = 0; q < {tile}; q++) sum = {add}(sum, {mul}(As[threadIdx.y][q], Bs[q][threadIdx.x]));
        __syncthreads();
    }}
    if (row < {m}LL && col < {n}LL) {{
        const long long at = {oo}LL + bz * {mn}LL + row * {ors}LL + col;"#,
        offsets = operand_offsets(a, b, batch),
        aload = operand_load(a, "oa", ("ar", *m), ("ak", *kk), t, &ld),
        bload = operand_load(b, "ob", ("bk", *kk), ("bc", *n), t, &ld),
        oo = out_offset,
        mn = m * n,
        ors = out_row_stride,
    );
    let _ = writeln!(out, "        {}", matmul_store(k, "sum"));
    let _ = writeln!(out, "    }}\n}}\n");
    let bytes = 2 * tile * (tile + 1) * if t == "float" { 4 } else { 8 };
    Ok(Launch {
        kernel: ki,
        name,
        kind: "matmul",
        grid: [grid_dim(*n, tile), grid_dim(*m, tile), grid_dim(nb.max(1) as usize, 1)],
        block: [tile, tile, 1],
        shared_bytes: bytes,
        dynamic_shared: 0,
        slots: vec![],
    })
}

/// The `oa`/`ob` lines of a matmul kernel: where batch `bz` of each operand starts.
fn operand_offsets(a: &View, b: &View, batch: &[usize]) -> String {
    format!(
        "    const long long oa = {};\n    const long long ob = {};",
        batch_offset(a, batch),
        batch_offset(b, batch)
    )
}

/// Element `(r, c)` of operand `v` (batch start `base`), or 0 outside its `rows × cols`.
fn operand_load(v: &View, base: &str, (r, rows): (&str, usize), (c, cols): (&str, usize), t: &str, ld: &str) -> String {
    format!(
        "({r} < {rows}LL && {c} < {cols}LL) ? {ld}(bufs[{}], {base} + {r} * {}LL + {c} * {}LL) : ({t})0",
        v.buf, v.row_stride, v.col_stride
    )
}

/// The store of a matmul output element `val` at `at` (row `row`, column `col`, batch
/// `bz`), added to the accumulated operand (contiguous `[batch, m, n]`) when there is one.
fn matmul_store(k: &Kernel, val: &str) -> String {
    let Kernel::MatMul { out: o, acc, m, n, dtype, .. } = k else { unreachable!("a matmul") };
    let (ld, st) = (format!("ld_{}", Dtype::name(*dtype)), format!("st_{}", Dtype::name(*dtype)));
    let (_, add, _) = matmul_arith(*dtype).expect("a generated matmul");
    let v = match acc {
        Some(c) => format!("{add}({ld}(bufs[{c}], bz * {mn}LL + row * {n}LL + col), {val})", mn = m * n),
        None => val.to_string(),
    };
    let v = if matches!(dtype, Dtype::F16 | Dtype::BF16) { round(*dtype, &v, true) } else { v };
    format!("{st}(bufs[{o}], at, {v});")
}

/// The output tile of a block of the register-tiled matmul (`big_matmul_kernel`).
pub const BIG_TILE: u32 = 64;

/// A matmul with both output sides at least [`BIG_TILE`]: each 256-thread block computes a
/// 64×64 output tile, each thread a 4×4 grid of it (rows `ty + 16i`, columns `tx + 16j`) in
/// registers, from 64×16 and 16×64 operand tiles staged in shared memory (the A tile stored
/// k-major with one word of padding, so its transposing store has no bank conflicts). Every
/// output is still one sequential f32 (f64) sum over k, zero-padded to a multiple of 16, as
/// in the 16×16 kernel: the two kernels give the same bits.
fn big_matmul_kernel(ki: usize, k: &Kernel, out: &mut String) -> Result<Launch, String> {
    let Kernel::MatMul { a, b, out_offset, out_row_stride, batch, m, k: kk, n, dtype, .. } = k else {
        unreachable!("a matmul")
    };
    let (t, add, mul) = matmul_arith(*dtype).expect("checked by matmul_kernel");
    let ld = format!("ld_{}", Dtype::name(*dtype));
    let name = format!("k{ki}");
    let nb: u64 = batch.iter().map(|x| *x as u64).product();
    let big = BIG_TILE;
    let _ = writeln!(
        out,
        r#"extern "C" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{
    __shared__ {t} As[16][{big} + 1];
    __shared__ {t} Bs[16][{big}];
    const long long bz = blockIdx.z;
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const long long row0 = (long long)blockIdx.y * {big}, col0 = (long long)blockIdx.x * {big};
{offsets}
    {t} sum[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) sum[i][j] = 0;
    for (long long t0 = 0; t0 < {kk}LL; t0 += 16) {{
{stage}
        __syncthreads();
        for (int q = 0; q < 16; q++) {{
            {t} av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = As[q][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = Bs[q][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) sum[i][j] = {add}(sum[i][j], {mul}(av[i], bv[j]));
        }}
        __syncthreads();
    }}
#pragma unroll
    for (int i = 0; i < 4; i++) {{
        const long long row = row0 + ty + 16 * i;
        if (row >= {m}LL) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {{
            const long long col = col0 + tx + 16 * j;
            if (col >= {n}LL) continue;
            const long long at = {oo}LL + bz * {mn}LL + row * {ors}LL + col;"#,
        offsets = operand_offsets(a, b, batch),
        stage = stage_tiles(
            256,
            big,
            "        ",
            ("As[ka][r]", "Bs"),
            (
                &operand_load(a, "oa", ("gr", *m), ("gk", *kk), t, &ld),
                &operand_load(b, "ob", ("gk2", *kk), ("gc", *n), t, &ld)
            ),
            (k_fast(a), c_fast(b)),
        ),
        oo = out_offset,
        mn = m * n,
        ors = out_row_stride,
    );
    let _ = writeln!(out, "            {}", matmul_store(k, "sum[i][j]"));
    let _ = writeln!(
        out,
        "        }}
    }}
}}
"
    );
    let word = if t == "float" { 4 } else { 8 };
    Ok(Launch {
        kernel: ki,
        name,
        kind: "matmul",
        grid: [grid_dim(*n, big), grid_dim(*m, big), grid_dim(nb.max(1) as usize, 1)],
        block: [16, 16, 1],
        shared_bytes: (16 * (big + 1) + 16 * big) * word,
        dynamic_shared: 0,
        slots: vec![],
    })
}

/// The staging of one k-step of the tile kernels: the block's `threads` threads copy the
/// `rows`×16 A tile (element `(r, ka)` stored at `a_at`) and the 16×64 B tile (`Bs[kb][c]`)
/// from the operands, zero outside them; each line starts with `indent`. Consecutive threads
/// take consecutive elements along the operand's nearer axis in memory (`a_k`: A's k, else its
/// rows; `b_c`: B's columns, else its k), so a warp's loads are coalesced: `hidden @ C^T` reads
/// the classifier along k, where a loop along the columns touched one 32-byte sector per thread.
fn stage_tiles(
    threads: u32,
    rows: u32,
    indent: &str,
    (a_at, b): (&str, &str),
    (aload, bload): (&str, &str),
    (a_k, b_c): (bool, bool),
) -> String {
    let big = BIG_TILE;
    let a_index = if a_k { "r = e >> 4, ka = e & 15".to_string() } else { format!("r = e % {rows}, ka = e / {rows}") };
    let b_index = if b_c { format!("kb = e / {big}, c = e % {big}") } else { "kb = e & 15, c = e >> 4".to_string() };
    let text = format!(
        "for (int e = tid; e < 16 * {rows}; e += {threads}) {{
    const int {a_index};
    const long long gr = row0 + r, gk = t0 + ka;
    {a_at} = {aload};
}}
for (int e = tid; e < 16 * {big}; e += {threads}) {{
    const int {b_index};
    const long long gk2 = t0 + kb, gc = col0 + c;
    {b}[kb][c] = {bload};
}}"
    );
    text.lines().map(|l| format!("{indent}{l}")).collect::<Vec<_>>().join("\n")
}

/// Whether a left operand's consecutive k are nearer in memory than its consecutive rows.
fn k_fast(a: &View) -> bool {
    a.col_stride.abs() <= a.row_stride.abs()
}

/// Whether a right operand's consecutive columns are nearer in memory than its consecutive k.
fn c_fast(b: &View) -> bool {
    b.col_stride.abs() <= b.row_stride.abs()
}

/// Element `(r, c)` of a 16-bit operand `v` as its raw bits (batch start `base`), or 0
/// outside its `rows × cols`.
fn operand_bits(v: &View, base: &str, (r, rows): (&str, usize), (c, cols): (&str, usize)) -> String {
    format!(
        "({r} < {rows}LL && {c} < {cols}LL) ? ((const u16*)bufs[{}])[{base} + {r} * {}LL + {c} * {}LL] : (u16)0",
        v.buf, v.row_stride, v.col_stride
    )
}

/// An f16/bf16 matmul with both output sides at least [`BIG_TILE`] on the tensor cores:
/// each 128-thread block computes a 64×64 output tile, each of its four warps a 32×32
/// quarter as 2×4 `mma.sync.m16n8k16` tiles (`rc_mma16816`) accumulating in f32 registers,
/// from 64×16 and 16×64 operand tiles staged in shared memory as raw 16-bit values
/// (zero-padded). Each output is an f32 sum over k in steps of 16, rounded once to the dtype
/// at the store (added to the accumulated operand first where there is one). Within a step
/// of 16 the tensor cores' summation order is the hardware's; the emulator sums in k order.
fn mma_matmul_kernel(ki: usize, k: &Kernel, out: &mut String) -> Result<Launch, String> {
    let Kernel::MatMul { a, b, out_offset, out_row_stride, batch, m, k: kk, n, dtype, .. } = k else {
        unreachable!("a matmul")
    };
    let bf = (*dtype == Dtype::BF16) as u8;
    let name = format!("k{ki}");
    let nb: u64 = batch.iter().map(|x| *x as u64).product();
    let big = BIG_TILE;
    let _ = writeln!(
        out,
        r#"extern "C" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{
    __shared__ u16 As[{big}][16 + 8];
    __shared__ u16 Bs[16][{big} + 8];
    const long long bz = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;
    const long long row0 = (long long)blockIdx.y * {big}, col0 = (long long)blockIdx.x * {big};
{offsets}
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    for (long long t0 = 0; t0 < {kk}LL; t0 += 16) {{
{stage}
        __syncthreads();
        unsigned af[2][4], bfr[4][2];
#pragma unroll
        for (int i = 0; i < 2; i++) {{
            const int r = wr + 16 * i + g;
            af[i][0] = rc_pack2(As[r][2 * t], As[r][2 * t + 1]);
            af[i][1] = rc_pack2(As[r + 8][2 * t], As[r + 8][2 * t + 1]);
            af[i][2] = rc_pack2(As[r][2 * t + 8], As[r][2 * t + 9]);
            af[i][3] = rc_pack2(As[r + 8][2 * t + 8], As[r + 8][2 * t + 9]);
        }}
#pragma unroll
        for (int j = 0; j < 4; j++) {{
            const int c = wc + 8 * j + g;
            bfr[j][0] = rc_pack2(Bs[2 * t][c], Bs[2 * t + 1][c]);
            bfr[j][1] = rc_pack2(Bs[2 * t + 8][c], Bs[2 * t + 9][c]);
        }}
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) rc_mma16816<{bf}>(acc[i][j], af[i], bfr[j], acc[i][j]);
        __syncthreads();
    }}
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {{
                const long long row = row0 + wr + 16 * i + g + 8 * (e >> 1);
                const long long col = col0 + wc + 8 * j + 2 * t + (e & 1);
                if (row >= {m}LL || col >= {n}LL) continue;
                const long long at = {oo}LL + bz * {mn}LL + row * {ors}LL + col;"#,
        offsets = operand_offsets(a, b, batch),
        stage = stage_tiles(
            128,
            big,
            "        ",
            ("As[r][ka]", "Bs"),
            (&operand_bits(a, "oa", ("gr", *m), ("gk", *kk)), &operand_bits(b, "ob", ("gk2", *kk), ("gc", *n))),
            (k_fast(a), c_fast(b)),
        ),
        oo = out_offset,
        mn = m * n,
        ors = out_row_stride,
    );
    let _ = writeln!(out, "                {}", matmul_store(k, "acc[i][j][e]"));
    let _ = writeln!(out, "            }}\n}}\n");
    Ok(Launch {
        kernel: ki,
        name,
        kind: "mma",
        grid: [grid_dim(*n, big), grid_dim(*m, big), grid_dim(nb.max(1) as usize, 1)],
        block: [128, 1, 1],
        shared_bytes: (big * (16 + 8) + 16 * (big + 8)) * 2,
        dynamic_shared: 0,
        slots: vec![],
    })
}

/// Threads of a row-fused kernel.
pub const ROW_BLOCK: u32 = 256;
/// Shared memory a row-fused kernel uses by default: the 48 KiB every CUDA block may have
/// without opting in.
pub const ROW_SHARED: u32 = 48 * 1024;
/// The most shared memory a block may opt in to on every supported GPU (sm_80: 163 KiB;
/// sm_90 allows 227 KiB).
pub const OPT_IN_SHARED: u32 = 163 * 1024;

/// Choices of the CUDA C a program becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmitOptions {
    /// Shared memory a row-fused kernel may use (bytes, [`ROW_SHARED`] to
    /// [`OPT_IN_SHARED`]). It picks the strip height (64, 32 or 16 rows); above 48 KiB the
    /// strips are dynamic shared memory, which the launch opts in to. Taller strips read the
    /// product's right operand once per more rows and give each warp more tensor-core tiles
    /// per step, with fewer blocks per multiprocessor: which is faster is for a GPU to say.
    pub row_shared: u32,
}

impl Default for EmitOptions {
    fn default() -> Self {
        EmitOptions { row_shared: ROW_SHARED }
    }
}

impl EmitOptions {
    /// The defaults, with `RECIPEC_CUDA_ROW_SHARED=BYTES` (clamped to the range) where set.
    pub fn from_env() -> EmitOptions {
        let row_shared = std::env::var("RECIPEC_CUDA_ROW_SHARED")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map(|b| b.clamp(ROW_SHARED, OPT_IN_SHARED))
            .unwrap_or(ROW_SHARED);
        EmitOptions { row_shared }
    }
}

/// Bytes of the staging tiles of a row-fused kernel's matmul section for `rows`-row strips:
/// tensor-core (16-bit raw values, padded) or FMA (f32, the A tile k-major).
fn row_staging(mma: bool, rows: u32) -> u32 {
    if mma {
        (rows * (16 + 8) + 16 * (64 + 8)) * 2
    } else {
        (16 * (rows + 1) + 16 * 64) * 4
    }
}

/// One matmul section of a row-fused kernel: for the strip's `rows` rows (from `row0`),
/// `ncols` output columns 64 at a time, summed over `kk` in steps of 16 from staged tiles
/// — on the tensor cores (`mma`; `a_bits`, `b_bits` the operands' raw 16-bit elements) or
/// as FMA tiles summing each output sequentially over k (`a_val`, `b_val`) — each output
/// then given to `store(val)` (a statement using `r`, the strip row, and `col`). The
/// staging tiles are the kernel's (`staging_tiles`): `Ah`/`Bh` for the tensor cores, `As`/`Bs`
/// for FMA, shared by the sections of a kind (they run one after another, between barriers).
fn strip_matmul(
    out: &mut String,
    (mma, dtype): (bool, Dtype),
    (rows, kk, ncols): (u32, usize, usize),
    (a_bits, b_bits): (&str, &str),
    (a_val, b_val): (&str, &str),
    fast: (bool, bool),
    store: &dyn Fn(&str) -> String,
) {
    let (t, add, mul) = matmul_arith(dtype).expect("a float matmul");
    let _ = writeln!(out, "        for (long long col0 = 0; col0 < {ncols}LL; col0 += 64) {{");
    if mma {
        let bf = (dtype == Dtype::BF16) as u8;
        let _ = writeln!(
            out,
            r#"            const int g = lane >> 2, t = lane & 3;
            float acc[{sub}][4];
#pragma unroll
            for (int i = 0; i < {sub}; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[i][e] = 0.0f;
            for (long long t0 = 0; t0 < {kk}LL; t0 += 16) {{
{stage}
                __syncthreads();
                const int c = 8 * warp + g;
                unsigned bfr[2];
                bfr[0] = rc_pack2(Bh[2 * t][c], Bh[2 * t + 1][c]);
                bfr[1] = rc_pack2(Bh[2 * t + 8][c], Bh[2 * t + 9][c]);
#pragma unroll
                for (int i = 0; i < {sub}; i++) {{
                    const int r = 16 * i + g;
                    unsigned af[4];
                    af[0] = rc_pack2(Ah[r][2 * t], Ah[r][2 * t + 1]);
                    af[1] = rc_pack2(Ah[r + 8][2 * t], Ah[r + 8][2 * t + 1]);
                    af[2] = rc_pack2(Ah[r][2 * t + 8], Ah[r][2 * t + 9]);
                    af[3] = rc_pack2(Ah[r + 8][2 * t + 8], Ah[r + 8][2 * t + 9]);
                    rc_mma16816<{bf}>(acc[i], af, bfr, acc[i]);
                }}
                __syncthreads();
            }}
#pragma unroll
            for (int i = 0; i < {sub}; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) {{
                    const int r = 16 * i + g + 8 * (e >> 1);
                    const long long col = col0 + 8 * warp + 2 * t + (e & 1);
                    {st}
                }}"#,
            sub = rows / 16,
            stage = stage_tiles(ROW_BLOCK, rows, "                ", ("Ah[r][ka]", "Bh"), (a_bits, b_bits), fast),
            st = store("acc[i][e]"),
        );
    } else {
        let _ = writeln!(
            out,
            r#"            const int tx = tid & 63, ty = tid >> 6;
            {t} sum[{per}];
#pragma unroll
            for (int i = 0; i < {per}; i++) sum[i] = 0;
            for (long long t0 = 0; t0 < {kk}LL; t0 += 16) {{
{stage}
                __syncthreads();
                for (int q = 0; q < 16; q++) {{
                    const {t} bv = Bs[q][tx];
#pragma unroll
                    for (int i = 0; i < {per}; i++) sum[i] = {add}(sum[i], {mul}(As[q][ty + 4 * i], bv));
                }}
                __syncthreads();
            }}
#pragma unroll
            for (int i = 0; i < {per}; i++) {{
                const int r = ty + 4 * i;
                const long long col = col0 + tx;
                {st}
            }}"#,
            per = rows / 4,
            stage = stage_tiles(ROW_BLOCK, rows, "                ", ("As[ka][r]", "Bs"), (a_val, b_val), fast),
            st = store("sum[i]"),
        );
    }
    let _ = writeln!(out, "        }}\n        __syncthreads();");
}

/// The staging tiles of a row-fused kernel's matmul sections of the kinds in `kinds`
/// (tensor cores: 16-bit raw values, padded; FMA: `t` values, the A tile k-major).
fn staging_tiles(out: &mut String, kinds: &BTreeSet<bool>, rows: u32, t: &str) {
    for mma in kinds {
        if *mma {
            let _ = writeln!(out, "    __shared__ u16 Ah[{rows}][16 + 8];\n    __shared__ u16 Bh[16][64 + 8];");
        } else {
            let _ = writeln!(out, "    __shared__ {t} As[16][{rows} + 1];\n    __shared__ {t} Bs[16][64];");
        }
    }
}

/// A row-fused group (`compiler::kernel::RowGroup`) as one kernel: each 256-thread block
/// takes strips of `R` rows (64, 32 or 16: the most whose strips of the group's tiles fit
/// shared memory with the staging tiles) in a grid-stride loop. For a strip it computes the
/// product 64 columns at a time — on the tensor cores (`mma.sync.m16n8k16`, one 8-column
/// slice per warp) where the unfused matmul would (f16/bf16, both sides at least 64), else as
/// FMA tiles summing each output sequentially over k — and stores it, rounded to the
/// product's dtype, in shared memory (`zs`); then runs every loop of the group on the strip's
/// rows in order, separated by barriers: elementwise loops one point per thread, reductions
/// over the row one warp per row (the order of `warp_reduce_kernel`) or, under
/// [`WARP_REDUCE_MIN`] columns, one thread per row in order; the group's other strips
/// (`zs1`, …) are written and read in shared memory too. Then each trailing matmul computes
/// the strip's rows of its output the same way (its left operand from shared memory or, not
/// a strip, from its buffer), added to its addend and rounded once, as the unfused kernel
/// does. Every value is therefore the bits the unfused kernels give; no tile is stored.
fn row_group_kernel(
    p: &Program,
    ki: usize,
    grp: &compiler::kernel::RowGroup,
    mm: &Kernel,
    out: &mut String,
    opts: &EmitOptions,
) -> Result<Launch, String> {
    let Kernel::MatMul { a, b, m, k: kk, n, dtype, .. } = mm else { unreachable!("a matmul") };
    let (m, kk, n, dtype) = (*m, *kk, *n, *dtype);
    let Some((t, _, _)) = matmul_arith(dtype) else {
        return Err(format!("k{ki}: {dtype} matmuls are not generated for CUDA yet"));
    };
    let zdt = Dtype::name(dtype);
    let big = |x: usize| x >= BIG_TILE as usize;
    let mma = matches!(dtype, Dtype::F16 | Dtype::BF16) && big(m) && big(n);
    // The tiles' shared arrays: the product `zs`, the strips `zs1`, `zs2`, …
    let tiles: BTreeMap<usize, String> =
        grp.tiles().enumerate().map(|(i, b)| (b, if i == 0 { "zs".to_string() } else { format!("zs{i}") })).collect();
    let row_bytes: u32 = grp.tiles().map(|b| n as u32 * compiler::plan::dtype_bytes(p.buffers[b].dtype) as u32).sum();
    // The kinds of matmul sections (their staging tiles): the product's, the trailing ones'.
    let mut kinds: BTreeSet<bool> = BTreeSet::from([mma]);
    for j in grp.start + 1..grp.end {
        if let Kernel::MatMul { m, n: d, dtype, .. } = &p.kernels[j] {
            kinds.insert(matches!(dtype, Dtype::F16 | Dtype::BF16) && big(*m) && big(*d));
        }
    }
    let staging = |r: u32| kinds.iter().map(|k| row_staging(*k, r)).sum::<u32>();
    let budget = opts.row_shared.max(ROW_SHARED);
    let Some(rows) = [64u32, 32, 16].into_iter().find(|r| r * row_bytes + staging(*r) <= budget) else {
        return Err(format!("k{ki}: a strip of 16 rows of the {n}-column product does not fit {budget} bytes"));
    };
    // Past the static limit the strips are dynamic shared memory (the staging tiles stay
    // static), laid out one after another from `rc_dynamic`.
    let dynamic = staging(rows) + rows * row_bytes > ROW_SHARED;
    let strips = (m as u64).div_ceil(rows as u64);
    let name = format!("k{ki}");
    let ld = format!("ld_{zdt}");
    let _ = writeln!(out, "extern \"C\" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{");
    staging_tiles(out, &kinds, rows, t);
    if dynamic {
        let _ = writeln!(out, "    RC_DYNAMIC_SHARED(rc_dynamic);");
    }
    let mut at = 0;
    for (b, arr) in &tiles {
        let bytes = rows * n as u32 * compiler::plan::dtype_bytes(p.buffers[*b].dtype) as u32;
        if dynamic {
            let _ = writeln!(out, "    u8* const {arr} = rc_dynamic + {at};");
            at += bytes.next_multiple_of(16);
        } else {
            let _ = writeln!(out, "    __shared__ __align__(16) u8 {arr}[{bytes}];");
        }
    }
    let _ = writeln!(
        out,
        r#"    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
{offsets}
    for (long long strip = blockIdx.x; strip < {strips}LL; strip += gridDim.x) {{
        const long long row0 = strip * {rows}LL;"#,
        offsets = operand_offsets(a, b, &[]),
    );
    let val = |v: &str| if matches!(dtype, Dtype::F16 | Dtype::BF16) { round(dtype, v, true) } else { v.to_string() };
    strip_matmul(
        out,
        (mma, dtype),
        (rows, kk, n),
        (&operand_bits(a, "oa", ("gr", m), ("gk", kk)), &operand_bits(b, "ob", ("gk2", kk), ("gc", n))),
        (&operand_load(a, "oa", ("gr", m), ("gk", kk), t, &ld), &operand_load(b, "ob", ("gk2", kk), ("gc", n), t, &ld)),
        (k_fast(a), c_fast(b)),
        &|v| format!("if (row0 + r < {m}LL && col < {n}LL) st_{zdt}(zs, r * {n}LL + col, {});", val(v)),
    );
    for j in grp.start + 1..grp.end {
        let l = match &p.kernels[j] {
            Kernel::Loop(l) => l,
            k @ Kernel::MatMul { .. } => {
                trailing_section(j, k, rows, &tiles, out)?;
                continue;
            }
            Kernel::Library { .. } => return Err(format!("k{j}: a row-fused group holds matmuls and loops")),
        };
        // (No kernel numbers in the text: the groups of every block share one function.)
        let _ = writeln!(out, "        {{");
        let ind = "                ";
        // Row `r` of the strip (threads or warps `first`, `first + step`, …), stopping at the
        // product's last row.
        let rows_from = |out: &mut String, first: &str, step: u32| {
            let _ = writeln!(out, "            for (int r = {first}; r < {rows}; r += {step}) {{");
            let _ = writeln!(
                out,
                "                const long long i0 = row0 + r;\n                if (i0 >= {m}LL) break;"
            );
        };
        match (&l.reduce, l.dims.len()) {
            (None, d) => {
                if d == 1 {
                    rows_from(out, "tid", ROW_BLOCK);
                } else {
                    let _ = writeln!(out, "            for (int e = tid; e < {rows} * {n}; e += {ROW_BLOCK}) {{");
                    let _ = writeln!(
                        out,
                        "                const long long i0 = row0 + e / {n}, i1 = e % {n};\n                if (i0 >= {m}LL) break;"
                    );
                }
                let names = body_with(p, l, out, ind, &BTreeMap::new(), &tiles, None);
                for s in &l.stores {
                    let v = stored_value(p, j, l, &names, s)?;
                    let line = match tiles.get(&s.buf) {
                        Some(arr) => {
                            format!("st_{}({arr}, {}, {v});", Dtype::name(p.buffers[s.buf].dtype), strip_at(&s.at))
                        }
                        None => store_line(p, s, &v),
                    };
                    let _ = writeln!(out, "{ind}{line}");
                }
            }
            (Some(r), 2) if n as u64 >= WARP_REDUCE_MIN => {
                rows_from(out, "warp", ROW_BLOCK / 32);
                let _ = writeln!(out, "                double acc = {};", red_init(r.op));
                let _ = writeln!(out, "                for (long long i1 = lane; i1 < {n}LL; i1 += 32) {{");
                let names = body_with(p, l, out, "                    ", &BTreeMap::new(), &tiles, None);
                let x = format!("(double)({})", names[r.value]);
                let _ = writeln!(out, "                    acc = {};\n                }}", combine(r.op, "acc", &x));
                let _ = writeln!(out, "                for (int off = 16; off > 0; off >>= 1) {{");
                let _ =
                    writeln!(out, "                    const double other = __shfl_down_sync(0xffffffffu, acc, off);");
                let _ =
                    writeln!(out, "                    acc = {};\n                }}", combine(r.op, "acc", "other"));
                let _ = writeln!(out, "                if (lane == 0) {{");
                acc_stores(p, j, l, r, out, "                    ")?;
                let _ = writeln!(out, "                }}");
            }
            (Some(r), 2) => {
                rows_from(out, "tid", ROW_BLOCK);
                let _ = writeln!(out, "                double acc = {};", red_init(r.op));
                let _ = writeln!(out, "                for (long long i1 = 0; i1 < {n}LL; i1++) {{");
                let names = body_with(p, l, out, "                    ", &BTreeMap::new(), &tiles, None);
                let x = format!("(double)({})", names[r.value]);
                let _ = writeln!(out, "                    acc = {};\n                }}", combine(r.op, "acc", &x));
                acc_stores(p, j, l, r, out, "                ")?;
            }
            _ => return Err(format!("k{j}: not a row loop of a row-fused group")),
        }
        let _ = writeln!(out, "            }}\n        }}\n        __syncthreads();");
    }
    let _ = writeln!(out, "    }}\n}}\n");
    Ok(Launch {
        kernel: ki,
        name,
        kind: "fused",
        grid: [strips.clamp(1, MAX_GRID) as u32, 1, 1],
        block: [ROW_BLOCK, 1, 1],
        shared_bytes: if dynamic { staging(rows) } else { staging(rows) + rows * row_bytes },
        dynamic_shared: if dynamic { at } else { 0 },
        slots: vec![],
    })
}

/// A trailing matmul of a row-fused group (`out = acc + x @ w`, `x` an `[m, k]` value of
/// the group): the strip's rows of `out`, in the order and rounding of the unfused kernel
/// (tensor cores where it would use them: 16-bit, both output sides at least 64).
fn trailing_section(
    j: usize,
    k: &Kernel,
    rows: u32,
    tiles: &BTreeMap<usize, String>,
    out: &mut String,
) -> Result<(), String> {
    let Kernel::MatMul { a, b, m, k: kk, n: d, dtype, .. } = k else { unreachable!("a matmul") };
    let (m, kk, d, dtype) = (*m, *kk, *d, *dtype);
    let Some((t, _, _)) = matmul_arith(dtype) else {
        return Err(format!("k{j}: {dtype} matmuls are not generated for CUDA yet"));
    };
    let big = |x: usize| x >= BIG_TILE as usize;
    let mma = matches!(dtype, Dtype::F16 | Dtype::BF16) && big(m) && big(d);
    let dt = Dtype::name(dtype);
    let ld = format!("ld_{dt}");
    // The left operand: its strip in shared memory, or its buffer.
    let (a_bits, a_val) = match tiles.get(&a.buf) {
        Some(arr) => (
            format!("(gr < {m}LL && gk < {kk}LL) ? ((const u16*){arr})[r * {kk}LL + gk] : (u16)0"),
            format!("(gr < {m}LL && gk < {kk}LL) ? {ld}({arr}, r * {kk}LL + gk) : ({t})0"),
        ),
        None => (operand_bits(a, "oa", ("gr", m), ("gk", kk)), operand_load(a, "oa", ("gr", m), ("gk", kk), t, &ld)),
    };
    let _ = writeln!(
        out,
        "        {{\n        const long long bz = 0;\n{}",
        operand_offsets(a, b, &[]).replace("    ", "        ")
    );
    strip_matmul(
        out,
        (mma, dtype),
        (rows, kk, d),
        (&a_bits, &operand_bits(b, "ob", ("gk2", kk), ("gc", d))),
        (&a_val, &operand_load(b, "ob", ("gk2", kk), ("gc", d), t, &ld)),
        // A strip in shared memory is row-major.
        (tiles.contains_key(&a.buf) || k_fast(a), c_fast(b)),
        &|v| {
            format!(
                "if (row0 + r < {m}LL && col < {d}LL) {{ const long long row = row0 + r, at = row * {d}LL + col; {} }}",
                matmul_store(k, v)
            )
        },
    );
    let _ = writeln!(out, "        }}");
    Ok(())
}

/// The CUDA C of a program and how to launch each kernel. Errors name the kernel that has no
/// CUDA form yet.
pub fn emit(p: &Program) -> Result<Unit, String> {
    emit_with(p, &EmitOptions::from_env())
}

/// [`emit`] with explicit options.
pub fn emit_with(p: &Program, opts: &EmitOptions) -> Result<Unit, String> {
    let mut src = prelude();
    let _ = writeln!(src, "// entry point `{}`: {} kernels, arena {} bytes\n", p.name, p.kernels.len(), p.arena_bytes);
    let mut launches = vec![];
    // Kernel text (with its own table and a placeholder name) → the function that has it.
    let mut functions: BTreeMap<String, String> = BTreeMap::new();
    // The end of the row-fused group being emitted.
    let mut group_end = 0;
    let group_at = p.group_starts();
    for (ki, k) in p.kernels.iter().enumerate() {
        let mut text = String::new();
        let mut offsets: Vec<(usize, i64)> = vec![];
        let group = group_at[ki].map(|g| &p.row_groups[g]);
        if group.is_none() && ki < group_end {
            // Runs inside the row-fused kernel of its group.
            launches.push(Launch::nothing(ki, "part"));
            continue;
        }
        let mut l = match k {
            _ if group.is_some() => {
                let grp = group.expect("a group");
                group_end = grp.end;
                let (mm, o) = fold_offsets(p, k);
                offsets = o;
                row_group_kernel(p, ki, grp, &mm, &mut text, opts)?
            }
            Kernel::Loop(l) => loop_kernel(p, ki, l, &mut text)?,
            Kernel::MatMul { .. } => {
                let (k, o) = fold_offsets(p, k);
                offsets = o;
                matmul_kernel(ki, &k, &mut text)?
            }
            Kernel::Library { .. } => match index::library_kernel(p, ki, k, &mut text)? {
                Some(l) => l,
                None => Launch::nothing(ki, "host"),
            },
        };
        if l.runs_code() {
            let (canonical, slots) = own_table(&text, &l.name, p.buffers.len() + 1, &offsets);
            match functions.get(&canonical) {
                Some(name) => l.name = name.clone(),
                None => {
                    src.push_str(&canonical.replacen(NAME, &l.name, 1));
                    functions.insert(canonical, l.name.clone());
                }
            }
            l.slots = slots;
        }
        launches.push(l);
    }
    Ok(Unit { name: p.name.clone(), source: src, launches })
}

/// The placeholder of a kernel's name while kernels are compared.
const NAME: &str = "@kernel@";

/// A matmul whose operand and output views start at element offsets reads them through
/// table entries that point there instead (`fold_offsets`), so the matmuls of every column
/// block (the same shapes at different offsets) have one text. Returns the kernel with
/// entries `words + 0, 1, 2` for A, B and the output, and those entries' (word, byte offset).
fn fold_offsets(p: &Program, k: &Kernel) -> (Kernel, Vec<(usize, i64)>) {
    let Kernel::MatMul { a, b, out, out_offset, dtype, .. } = k else { unreachable!("a matmul") };
    let words = p.buffers.len() + 1;
    let bytes = compiler::plan::dtype_bytes(*dtype) as i64;
    let pseudo = vec![(a.buf, a.offset * bytes), (b.buf, b.offset * bytes), (*out, out_offset * bytes)];
    let mut k = k.clone();
    if let Kernel::MatMul { a, b, out, out_offset, .. } = &mut k {
        (a.buf, a.offset, b.buf, b.offset, *out, *out_offset) = (words, 0, words + 1, 0, words + 2, 0);
    }
    (k, pseudo)
}

/// `text` (kernel `name`) with its name replaced by [`NAME`] and every `bufs[i]` renumbered
/// in order of first use, and the table that numbering needs: entry `j` is word `i` of the
/// program's table (`i < words`), `offsets[i - words]` (a folded view), or for `bufs[#c]`
/// the constant `c` (word `words`, which is zero, plus `c`).
fn own_table(text: &str, name: &str, words: usize, offsets: &[(usize, i64)]) -> (String, Vec<(usize, i64)>) {
    let text = text.replacen(&format!(" void {name}("), &format!(" void {NAME}("), 1);
    let mut out = String::with_capacity(text.len());
    let mut slots: Vec<(usize, i64)> = vec![];
    let mut rest = text.as_str();
    while let Some(at) = rest.find("bufs[") {
        out.push_str(&rest[..at + 5]);
        rest = &rest[at + 5..];
        // `bufs[#c]`: the constant `c` (the zero word after the seed, plus `c`).
        let imm = rest.starts_with('#');
        let from = imm as usize + (imm && rest[1..].starts_with('-')) as usize;
        let digits = rest[from..].bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || !rest[from + digits..].starts_with(']') {
            continue;
        }
        let slot = if imm {
            (words, rest[1..from + digits].parse().expect("a constant"))
        } else {
            let i: usize = rest[..digits].parse().expect("digits");
            if i < words {
                (i, 0)
            } else {
                offsets[i - words]
            }
        };
        let digits = from + digits;
        let j = slots.iter().position(|s| *s == slot).unwrap_or_else(|| {
            slots.push(slot);
            slots.len() - 1
        });
        let _ = write!(out, "{j}");
        rest = &rest[digits..];
    }
    out.push_str(rest);
    (out, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use compiler::ir::{Graph, Op};

    #[test]
    fn emits_loops_reductions_and_matmuls() {
        let mut g = Graph::new("t");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![4, 8], &[], "x").unwrap();
        let w = g.add(Op::Input { index: 1, name: "w".into() }, Dtype::F32, vec![8, 3], &[], "w").unwrap();
        let e = g.add(Op::Unary(Un::Exp), Dtype::F32, vec![4, 8], &[x], "e").unwrap();
        let m = g.add(Op::MatMul, Dtype::F32, vec![4, 3], &[e, w], "m").unwrap();
        let s = g.add(Op::Reduce { op: Red::Sum, axes: vec![1] }, Dtype::F32, vec![4], &[m], "s").unwrap();
        g.outputs.push(("s".into(), s));
        // The matmul and the row sum of its product are one row-fused kernel by default.
        let fused = emit(&compiler::kernel::schedule(&g).unwrap()).unwrap();
        let kinds: Vec<&str> = fused.launches.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, ["loop", "fused", "part"], "{}", fused.launch_table());
        assert!(fused.source.contains("ld_f32(zs, 0LL + (i0 - row0) * 3LL + i1 * 1LL)"), "{}", fused.source);
        let plain = compiler::kernel::ScheduleOptions { fuse_rows: false };
        let p = compiler::kernel::schedule_with(&g, &plain).unwrap();
        let u = emit(&p).unwrap();
        assert!(u.source.contains("rc_exp_f32(v"), "{}", u.source);
        assert!(u.source.contains("__shared__ float As[16][16 + 1]"));
        assert!(u.source.contains("double acc = 0.0;"));
        let kinds: Vec<&str> = u.launches.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, ["loop", "matmul", "reduce"]);
        assert_eq!(u.launches[1].grid, [1, 1, 1]);
        assert_eq!(u.launches[1].shared_bytes, 2 * 16 * 17 * 4);
        // Deterministic text.
        assert_eq!(emit(&p).unwrap(), u);
    }

    /// A horizontally fused elementwise loop (one update per parameter) is computed one
    /// group of stores at a time: stores share a group when they share a per-element value or
    /// one reads a buffer another writes; scalars are recomputed per group.
    #[test]
    fn a_fused_update_is_computed_one_parameter_at_a_time() {
        use compiler::kernel::Instr;
        let flat = || Affine { coef: vec![1], c: 0 };
        let f = |inst| Instr { inst, dtype: Dtype::F32 };
        let body = vec![
            f(Inst::Load { buf: 0, at: flat() }),
            f(Inst::Load { buf: 1, at: flat() }),
            // A scalar (the learning rate): read by both chains, recomputed in each.
            f(Inst::Load { buf: 5, at: Affine { coef: vec![0], c: 0 } }),
            f(Inst::Bin(Bin::Mul, 0, 2, true)),
            f(Inst::Bin(Bin::Mul, 1, 2, true)),
            f(Inst::Bin(Bin::Add, 3, 4, true)),
        ];
        let st = |buf, v| Store { buf, at: flat(), val: StoreVal::Val(v) };
        let l = |stores| Loop { dims: vec![4096], body: body.clone(), reduce: None, stores, nodes: vec![] };
        let store_groups = |l: &Loop| store_groups(l).into_iter().map(|(g, _)| g).collect::<Vec<_>>();
        // Independent chains: one group each, in store order.
        assert_eq!(store_groups(&l(vec![st(3, 4), st(2, 3)])), vec![vec![0], vec![1]]);
        // A shared per-element value joins them.
        assert_eq!(store_groups(&l(vec![st(3, 3), st(2, 5), st(4, 4)])), vec![vec![0, 1, 2]]);
        // The first store writes buffer 1, which the second reads: computing the first group
        // before the second would make the second read the new value.
        assert_eq!(store_groups(&l(vec![st(1, 3), st(2, 4)])), vec![vec![0, 1]]);

        // Through the scheduler: two parameters updated by one learning rate, one loop of
        // two groups, each loading only its own parameter and gradient.
        let mut g = Graph::new("t");
        let lr = g.add(Op::Input { index: 0, name: "lr".into() }, Dtype::F32, vec![], &[], "lr").unwrap();
        let mut outs = vec![];
        for k in 0..2 {
            let p =
                g.add(Op::Input { index: 1 + 2 * k, name: format!("p{k}") }, Dtype::F32, vec![4096], &[], "p").unwrap();
            let d =
                g.add(Op::Input { index: 2 + 2 * k, name: format!("g{k}") }, Dtype::F32, vec![4096], &[], "g").unwrap();
            let lr = g.add(Op::Broadcast, Dtype::F32, vec![4096], &[lr], "lr").unwrap();
            let s = g.add(Op::Binary(Bin::Mul), Dtype::F32, vec![4096], &[lr, d], "s").unwrap();
            outs.push(g.add(Op::Binary(Bin::Sub), Dtype::F32, vec![4096], &[p, s], "p").unwrap());
        }
        for (k, o) in outs.into_iter().enumerate() {
            g.outputs.push((format!("p{k}"), o));
        }
        let p = compiler::kernel::schedule(&g).unwrap();
        let u = emit(&p).unwrap();
        assert_eq!(u.launches.len(), 1, "{}", u.launch_table());
        assert_eq!(u.source.matches("for (int e = 0; e < 4; e++)").count(), 2, "{}", u.source);
        assert_eq!(u.source.matches("const float4 w0 = ").count(), 2, "{}", u.source);
        assert_eq!(u.source.matches("const float4 w2 = ").count(), 0, "{}", u.source);
    }

    /// The tile kernels' staging loads run along each operand's nearer axis in memory, so a
    /// warp reads consecutive addresses: `x @ w^T` (w stored `[n, k]`) reads w along k, in the
    /// small tiles (`bk = t0 + threadIdx.x`), the f32 64×64 tiles and the tensor-core tiles
    /// (`kb = e & 15`); `x @ w` reads w along its columns.
    #[test]
    fn staging_reads_operands_along_their_contiguous_axis() {
        for (d, size, transposed) in [
            (Dtype::F32, 8, true),
            (Dtype::F32, 8, false),
            (Dtype::F32, 64, true),
            (Dtype::BF16, 64, true),
            (Dtype::BF16, 64, false),
        ] {
            let mut g = Graph::new("t");
            let x = g.add(Op::Input { index: 0, name: "x".into() }, d, vec![size, 32], &[], "x").unwrap();
            let w = if transposed {
                let w = g.add(Op::Input { index: 1, name: "w".into() }, d, vec![size, 32], &[], "w").unwrap();
                g.add(Op::Transpose { perm: vec![1, 0] }, d, vec![32, size], &[w], "wt").unwrap()
            } else {
                g.add(Op::Input { index: 1, name: "w".into() }, d, vec![32, size], &[], "w").unwrap()
            };
            let z = g.add(Op::MatMul, d, vec![size, size], &[x, w], "z").unwrap();
            g.outputs.push(("z".into(), z));
            let u = emit(&compiler::kernel::schedule(&g).unwrap()).unwrap();
            let along_k =
                if size < 64 { "const long long bk = t0 + threadIdx.x" } else { "const int kb = e & 15, c = e >> 4;" };
            let along_c =
                if size < 64 { "const long long bk = t0 + threadIdx.y" } else { "const int kb = e / 64, c = e % 64;" };
            let (want, not) = if transposed { (along_k, along_c) } else { (along_c, along_k) };
            assert!(u.source.contains(want) && !u.source.contains(not), "{d} {size} {transposed}:\n{}", u.source);
            // The left operand is read along k (row-major).
            let a_k = if size < 64 { "ak = t0 + threadIdx.x" } else { "const int r = e >> 4, ka = e & 15;" };
            assert!(u.source.contains(a_k), "{d} {size}:\n{}", u.source);
        }
    }

    /// The emulator's stand-in for dynamic shared memory holds the most a block may opt in to.
    #[test]
    fn the_emulated_dynamic_shared_memory_is_the_opt_in_limit() {
        assert!(prelude().contains(&format!("static u8 buf[{OPT_IN_SHARED}];")), "{}", prelude());
    }

    /// The widest product the scheduler row-fuses fits a CUDA block's shared memory in every
    /// dtype (a wider one would be a code generation error, not a launch failure).
    #[test]
    fn the_widest_row_fused_product_fits_shared_memory() {
        use compiler::kernel::{BufKind, TILE_MAX_COLS};
        for d in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            for cols in [TILE_MAX_COLS, TILE_MAX_COLS + 1] {
                let mut g = Graph::new("t");
                let x = g.add(Op::Input { index: 0, name: "x".into() }, d, vec![100, 8], &[], "x").unwrap();
                let w = g.add(Op::Input { index: 1, name: "w".into() }, d, vec![8, cols], &[], "w").unwrap();
                let z = g.add(Op::MatMul, d, vec![100, cols], &[x, w], "z").unwrap();
                let s = g.add(Op::Reduce { op: Red::Max, axes: vec![1] }, d, vec![100], &[z], "s").unwrap();
                g.outputs.push(("s".into(), s));
                let p = compiler::kernel::schedule(&g).unwrap();
                let fused = p.buffers.iter().any(|b| b.kind == BufKind::Tile);
                assert_eq!(fused, cols == TILE_MAX_COLS, "{d} {cols} columns");
                let u = emit(&p).unwrap_or_else(|e| panic!("{d} {cols} columns: {e}"));
                assert!(u.launches.iter().all(|l| l.shared_bytes <= ROW_SHARED), "{}", u.launch_table());
            }
        }
    }

    /// Rows of at least 32 elements reduce with one warp each: lanes stride the row, a
    /// shuffle tree combines them, lane 0 stores; 8 rows per 256-thread block.
    #[test]
    fn long_reductions_use_one_warp_per_output() {
        let mut g = Graph::new("t");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![100, 4, 40], &[], "x").unwrap();
        let s = g.add(Op::Reduce { op: Red::Max, axes: vec![1, 2] }, Dtype::F32, vec![100], &[x], "s").unwrap();
        let short = g.add(Op::Reduce { op: Red::Sum, axes: vec![1] }, Dtype::F32, vec![100, 40], &[x], "t").unwrap();
        g.outputs.push(("s".into(), s));
        g.outputs.push(("t".into(), short));
        let p = compiler::kernel::schedule(&g).unwrap();
        let u = emit(&p).unwrap();
        let warp = u.launches.iter().find(|l| l.grid == [13, 1, 1]).unwrap_or_else(|| panic!("{}", u.launch_table()));
        assert_eq!(warp.kind, "reduce");
        let start = u.source.find(&format!("void {}(", warp.name)).unwrap();
        let k = &u.source[start..start + u.source[start..].find("\n}\n").unwrap()];
        assert!(k.contains("for (long long q = lane; q < 160LL; q += 32)"), "{k}");
        assert!(
            k.contains("__shfl_down_sync(0xffffffffu, acc, off)") && k.contains("acc = rc_max(acc, other);"),
            "{k}"
        );
        assert!(k.contains("if (lane == 0)"), "{k}");
        // Four elements per output: one thread each, in order.
        let thread =
            u.launches.iter().find(|l| l.kind == "reduce" && l.name != warp.name).expect("the short reduction");
        let start = u.source.find(&format!("void {}(", thread.name)).unwrap();
        let k = &u.source[start..start + u.source[start..].find("\n}\n").unwrap()];
        assert!(!k.contains("__shfl_down_sync") && k.contains("for (long long i"), "{k}");
    }
}
