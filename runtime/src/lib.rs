//! The runtime: runs a scheduled [`Program`] on the CPU.
//!
//! Input: a program from `compiler::kernel::schedule` and the entry point's arguments as
//! [`Buffer`]s. Output: the named outputs. One arena allocation (64-byte aligned, transparent
//! huge pages requested for large arenas), made by the first run and reused by every run —
//! shared by the programs of a training job ([`Arenas`]), which never run at once; loops
//! run as Cranelift-generated code split across threads (rayon), matmuls through the `gemm`
//! crate, and the remaining ops (gather, sort, RNG, linear algebra…) through the library
//! below, which shares the interpreter's definitions (so RNG streams are identical).
//!
//! Invariants: arguments are validated (dtype, shape) before any generated code runs;
//! generated code only sees buffers whose sizes the plan was made for. Outputs that the
//! plan writes into an argument (an optimizer's `param` and states) update that argument
//! in place and are returned as well.

pub mod artifact;
pub mod checkpoint;
pub mod compress;
pub mod constraint;
pub mod cuda;
pub mod cuda_emu;
pub mod data;
pub mod device;
pub mod infinigram;
pub mod npy;
pub mod plot;
pub mod train;

use compiler::interp::{self, Tensor};
use compiler::ir::Op;
use compiler::kernel::{BufKind, Kernel, Program, View};
use compiler::plan::dtype_bytes;
pub use device::Value;
use lang::types::Dtype;
use rayon::prelude::*;
use std::sync::Mutex;

/// A tensor in its storage format (f32 as 4-byte floats, bool as bytes…), 8-byte aligned.
#[derive(Clone, Debug)]
pub struct Buffer {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    data: Vec<u64>,
}

/// 64-byte aligned storage.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Line(#[allow(dead_code)] [u64; 8]);

#[derive(Default)]
struct Arena {
    lines: Vec<Line>,
}

/// The arena of programs that never run at once — a training job's `init`, `grad`, `eval`,
/// `update`… ([`Arenas`]): one allocation, grown to the largest arena a run needs. A run
/// holds its lock from the first kernel until its outputs are copied out.
#[derive(Clone, Default)]
pub struct SharedArena(std::sync::Arc<Mutex<Arena>>);

impl SharedArena {
    /// The bytes allocated so far.
    pub fn bytes(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).lines.len() * 64
    }
    fn hold(&self, bytes: usize) -> std::sync::MutexGuard<'_, Arena> {
        let mut a = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if a.lines.len() * 64 < bytes {
            // The old one first: the two are never needed together.
            *a = Arena::default();
            *a = Arena::new(bytes);
        }
        a
    }
}

/// The arenas a group of programs share (see [`SharedArena`]; on the GPU,
/// [`cuda::DeviceArena`]): [`train::Programs::new`] compiles a training job's programs with
/// one, so the job needs the largest arena, not their sum.
#[derive(Default)]
pub struct Arenas {
    pub host: SharedArena,
    pub(crate) device: Mutex<Option<std::sync::Arc<cuda::DeviceArena>>>,
}

impl Arena {
    fn new(bytes: usize) -> Arena {
        let n = bytes.div_ceil(64);
        let mut lines: Vec<Line> = Vec::with_capacity(n);
        #[cfg(target_os = "linux")]
        if bytes >= 2 << 20 {
            // SAFETY: advising the kernel about memory this Vec owns; no data is touched.
            unsafe {
                libc::madvise(lines.as_mut_ptr() as *mut libc::c_void, n * 64, libc::MADV_HUGEPAGE);
            }
        }
        lines.resize(n, Line([0; 8]));
        Arena { lines }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.lines.as_mut_ptr() as *mut u8
    }
}

impl Buffer {
    pub fn zeros(dtype: Dtype, shape: Vec<usize>) -> Buffer {
        let bytes = shape.iter().product::<usize>() * dtype_bytes(dtype);
        Buffer { dtype, shape, data: vec![0; bytes.div_ceil(8).max(1)] }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// No elements and no storage (a placeholder).
    pub(crate) fn empty() -> Buffer {
        Buffer { dtype: Dtype::Bool, shape: vec![0], data: vec![] }
    }
    pub fn bytes(&self) -> usize {
        self.numel() * dtype_bytes(self.dtype)
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr() as *const u8
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.data.as_mut_ptr() as *mut u8
    }
    /// The raw bytes (little-endian storage format).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `data` holds at least `bytes()` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.bytes()) }
    }
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let n = self.bytes();
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), n) }
    }
    pub fn from_bytes(dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Buffer {
        let mut b = Buffer::zeros(dtype, shape);
        let n = b.bytes();
        b.as_bytes_mut().copy_from_slice(&bytes[..n]);
        b
    }
    pub fn f32s(&self) -> &[f32] {
        assert_eq!(self.dtype, Dtype::F32);
        // SAFETY: f32 storage, aligned to 8.
        unsafe { std::slice::from_raw_parts(self.as_ptr() as *const f32, self.numel()) }
    }
    pub fn f32s_mut(&mut self) -> &mut [f32] {
        assert_eq!(self.dtype, Dtype::F32);
        let n = self.numel();
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr() as *mut f32, n) }
    }

    /// Element `i` as f64.
    pub fn get(&self, i: usize) -> f64 {
        read(self.dtype, self.as_ptr(), i)
    }

    pub fn from_tensor(t: &Tensor) -> Buffer {
        let mut b = Buffer::zeros(t.dtype, t.shape.clone());
        let p = b.as_mut_ptr();
        for (i, x) in t.data.iter().enumerate() {
            write(t.dtype, p, i, *x);
        }
        b
    }

    pub fn to_tensor(&self) -> Tensor {
        let data = (0..self.numel()).map(|i| self.get(i)).collect();
        Tensor { dtype: self.dtype, shape: self.shape.clone(), data }
    }
}

fn read(d: Dtype, p: *const u8, i: usize) -> f64 {
    // SAFETY: callers pass an index inside a buffer of dtype `d`.
    unsafe {
        match d {
            Dtype::Bool => (*p.add(i) != 0) as i32 as f64,
            Dtype::I32 => *(p as *const i32).add(i) as f64,
            Dtype::I64 => *(p as *const i64).add(i) as f64,
            Dtype::F16 => codegen_cpu::f16_to_f32(*(p as *const u16).add(i)) as f64,
            Dtype::BF16 => codegen_cpu::bf16_to_f32(*(p as *const u16).add(i)) as f64,
            Dtype::F32 => *(p as *const f32).add(i) as f64,
            Dtype::F64 => *(p as *const f64).add(i),
        }
    }
}

fn write(d: Dtype, p: *mut u8, i: usize, x: f64) {
    let x = interp::round(d, x);
    // SAFETY: callers pass an index inside a buffer of dtype `d`.
    unsafe {
        match d {
            Dtype::Bool => *p.add(i) = (x != 0.0) as u8,
            Dtype::I32 => *(p as *mut i32).add(i) = x as i32,
            Dtype::I64 => *(p as *mut i64).add(i) = x as i64,
            Dtype::F16 => *(p as *mut u16).add(i) = codegen_cpu::f32_to_f16(x as f32),
            Dtype::BF16 => *(p as *mut u16).add(i) = codegen_cpu::f32_to_bf16(x as f32),
            Dtype::F32 => *(p as *mut f32).add(i) = x as f32,
            Dtype::F64 => *(p as *mut f64).add(i) = x,
        }
    }
}

/// An output: in an argument (updated in place; the output's shape) or its own buffer.
#[derive(Debug)]
pub enum Out {
    Arg(usize, Vec<usize>),
    Buf(Buffer),
}

/// Which code runs the loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cranelift,
    /// LLVM 14, O3 for the host CPU (cargo feature `llvm`).
    #[cfg(feature = "llvm")]
    Llvm,
    /// The GPU through [`cuda::CudaExecutable`] (use [`compile_program`]).
    Cuda,
    /// The generated CUDA C run on the CPU by [`cuda_emu::EmuExecutable`] (tests the CUDA
    /// code generator without a GPU; slow).
    CudaEmu,
}

impl Backend {
    /// What the pass pipeline optimizes for on this backend (the emulator runs the CUDA
    /// target's programs, as the GPU would).
    pub fn target(self) -> compiler::passes::Target {
        match self {
            Backend::Cuda | Backend::CudaEmu => compiler::passes::Target::Cuda,
            _ => compiler::passes::Target::Cpu,
        }
    }
}

/// An output of [`Runner::run_values`]: in an argument (updated in place; the output's shape)
/// or its own value, where the runner keeps its values (host or device).
#[derive(Debug)]
pub enum ValueOut {
    Arg(usize, Vec<usize>),
    Value(Value),
}

/// A compiled program on some device: what the training loop and `recipec eval` run.
pub trait Runner {
    fn program(&self) -> &Program;
    fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError>;
    /// Runs on values that may live on this runner's device. A device runner uploads host
    /// arguments once (their slots become device values) and leaves its outputs on the device;
    /// the default (CPU) brings device values to the host and runs [`Runner::run`].
    fn run_values(&self, args: &mut [Value], seed: u64) -> Result<Vec<(String, ValueOut)>, RunError> {
        // Device values come home first (a failed copy leaves every slot as it was).
        for a in args.iter_mut() {
            if let Value::Device(d) = a {
                *a = Value::Host(d.download()?);
            }
        }
        let mut bufs = Vec::with_capacity(args.len());
        for a in args.iter_mut() {
            match std::mem::replace(a, Value::taken()) {
                Value::Host(b) => bufs.push(b),
                Value::Device(_) => unreachable!("downloaded above"),
            }
        }
        let result = self.run(&mut bufs, seed);
        for (a, b) in args.iter_mut().zip(bufs) {
            *a = Value::Host(b);
        }
        Ok(result?
            .into_iter()
            .map(|(n, o)| match o {
                Out::Arg(i, s) => (n, ValueOut::Arg(i, s)),
                Out::Buf(b) => (n, ValueOut::Value(Value::Host(b))),
            })
            .collect())
    }
    /// The bytes this runner's device memory moved to and from the host (device runners).
    fn traffic(&self) -> Option<device::Traffic> {
        None
    }
    /// The CUDA emulator behind this runner, if it is one (for checks only it offers, such as
    /// [`cuda_emu::EmuExecutable::run_reversed`]).
    fn emulator(&self) -> Option<&cuda_emu::EmuExecutable> {
        None
    }
    /// Kernel timings, when profiling (`RECIPEC_PROFILE=1`; CPU only).
    fn profile_report(&self, _top: usize) -> Option<String> {
        None
    }
}

impl Runner for Executable {
    fn program(&self) -> &Program {
        &self.program
    }
    fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        Executable::run(self, args, seed)
    }
    fn profile_report(&self, top: usize) -> Option<String> {
        Executable::profile_report(self, top)
    }
}

impl<T: Runner + ?Sized> Runner for Box<T> {
    fn program(&self) -> &Program {
        (**self).program()
    }
    fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        (**self).run(args, seed)
    }
    fn profile_report(&self, top: usize) -> Option<String> {
        (**self).profile_report(top)
    }
    fn run_values(&self, args: &mut [Value], seed: u64) -> Result<Vec<(String, ValueOut)>, RunError> {
        (**self).run_values(args, seed)
    }
    fn traffic(&self) -> Option<device::Traffic> {
        (**self).traffic()
    }
    fn emulator(&self) -> Option<&cuda_emu::EmuExecutable> {
        (**self).emulator()
    }
}

impl Runner for cuda_emu::EmuExecutable {
    fn program(&self) -> &Program {
        &self.program
    }
    fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        cuda_emu::EmuExecutable::run(self, args, seed)
    }
    fn run_values(&self, args: &mut [Value], seed: u64) -> Result<Vec<(String, ValueOut)>, RunError> {
        cuda_emu::EmuExecutable::run_values(self, args, seed)
    }
    fn traffic(&self) -> Option<device::Traffic> {
        Some(self.memory().traffic())
    }
    fn emulator(&self) -> Option<&cuda_emu::EmuExecutable> {
        Some(self)
    }
}

impl Runner for cuda::CudaExecutable {
    fn program(&self) -> &Program {
        &self.program
    }
    fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        cuda::CudaExecutable::run(self, args, seed)
    }
    fn run_values(&self, args: &mut [Value], seed: u64) -> Result<Vec<(String, ValueOut)>, RunError> {
        cuda::CudaExecutable::run_values(self, args, seed)
    }
    fn traffic(&self) -> Option<device::Traffic> {
        Some(self.memory().traffic())
    }
}

/// Validates arguments at the boundary: their number, dtypes and shapes (generated code never
/// sees an unchecked buffer).
pub(crate) fn check_args(p: &Program, args: &[Buffer]) -> Result<(), RunError> {
    let types: Vec<(Dtype, &[usize])> = args.iter().map(|a| (a.dtype, &a.shape[..])).collect();
    check_types(p, &types)
}

/// [`check_args`] on the arguments' dtypes and shapes.
pub(crate) fn check_types(p: &Program, args: &[(Dtype, &[usize])]) -> Result<(), RunError> {
    if args.len() != p.inputs.len() {
        return Err(RunError(format!("`{}` takes {} arguments, got {}", p.name, p.inputs.len(), args.len())));
    }
    for (i, b) in p.inputs.iter().enumerate() {
        let d = &p.buffers[*b];
        let (dtype, shape) = args[i];
        if dtype != d.dtype || shape != &d.shape[..] {
            return Err(RunError(format!(
                "argument {i} of `{}` must be {}{:?}, got {}{:?}",
                p.name, d.dtype, d.shape, dtype, shape
            )));
        }
    }
    Ok(())
}

/// Runs any [`Runner`] on tensors (converted to and from the storage format).
pub fn run_tensors_on(
    r: &(impl Runner + ?Sized),
    inputs: &[Tensor],
    seed: u64,
) -> Result<Vec<(String, Tensor)>, RunError> {
    let mut args: Vec<Buffer> = inputs.iter().map(Buffer::from_tensor).collect();
    let outs = r.run(&mut args, seed)?;
    Ok(outs
        .into_iter()
        .map(|(n, o)| {
            let t = match o {
                Out::Arg(i, shape) => {
                    let mut t = args[i].to_tensor();
                    t.shape = shape;
                    t
                }
                Out::Buf(b) => b.to_tensor(),
            };
            (n, t)
        })
        .collect())
}

/// Compiles a scheduled program for `backend` (CPU code generators or the GPU).
pub fn compile_program(program: Program, backend: Backend) -> Result<Box<dyn Runner + Send + Sync>, RunError> {
    compile_program_in(program, backend, &Arenas::default())
}

/// [`compile_program`], the program running in `arenas` with the others compiled there.
pub fn compile_program_in(
    program: Program,
    backend: Backend,
    arenas: &Arenas,
) -> Result<Box<dyn Runner + Send + Sync>, RunError> {
    Ok(match backend {
        Backend::Cuda => Box::new(cuda::CudaExecutable::new_in(program, arenas)?),
        Backend::CudaEmu => {
            let mut e = cuda_emu::EmuExecutable::new(program)?;
            e.share_arena(&arenas.host);
            Box::new(e)
        }
        b => {
            let mut e = Executable::new(program, b)?;
            e.share_arena(&arenas.host);
            Box::new(e)
        }
    })
}

/// A program ready to run: generated code and its arena.
pub struct Executable {
    pub program: Program,
    code: codegen_cpu::Compiled,
    arena: SharedArena,
    /// Loops with fewer points than this run on one thread.
    pub parallel_threshold: usize,
    /// For each kernel, the row-fused group it starts (`Program::group_starts`).
    group_at: Vec<Option<usize>>,
    /// Product elements per strip of a row-fused group ([`cpu_strip_rows`]; any value gives
    /// the same results).
    pub strip_elems: usize,
    /// Seconds spent in each kernel, when profiling (`RECIPEC_PROFILE=1`).
    profile: Option<Mutex<Vec<f64>>>,
}

#[derive(Clone, Copy)]
struct SendPtr(*const *mut u8);
// SAFETY: the pointer table outlives every parallel call that uses it, and kernels write
// disjoint ranges of their outputs.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[derive(Debug, Clone, PartialEq)]
pub struct RunError(pub String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Executable {
    pub fn new(program: Program, backend: Backend) -> Result<Executable, RunError> {
        let code = match backend {
            Backend::Cranelift => codegen_cpu::compile(&program),
            #[cfg(feature = "llvm")]
            Backend::Llvm => codegen_cpu::compile_llvm(&program),
            Backend::Cuda | Backend::CudaEmu => {
                Err("CUDA programs run through `runtime::compile_program` (CudaExecutable, EmuExecutable)".to_string())
            }
        }
        .map_err(RunError)?;
        // Allocated by the first run (and shared when `share_arena` says so).
        let arena = SharedArena::default();
        let profile = std::env::var("RECIPEC_PROFILE")
            .ok()
            .filter(|v| v == "1")
            .map(|_| Mutex::new(vec![0.0; program.kernels.len()]));
        let strip_elems =
            std::env::var("RECIPEC_STRIP_ELEMS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_STRIP_ELEMS);
        let group_at = program.group_starts();
        Ok(Executable { program, code, arena, parallel_threshold: 1 << 15, group_at, strip_elems, profile })
    }

    /// Runs in `arena` from now on, with the other programs that share it (never at once).
    pub fn share_arena(&mut self, arena: &SharedArena) {
        self.arena = arena.clone();
    }

    /// With `RECIPEC_PROFILE=1`: the kernels that took the most time over all runs so far,
    /// one line each (seconds, kernel, what it is, where it came from).
    pub fn profile_report(&self, top: usize) -> Option<String> {
        let prof = self.profile.as_ref()?.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let total: f64 = prof.iter().sum();
        let mut idx: Vec<usize> = (0..prof.len()).collect();
        idx.sort_by(|a, b| prof[*b].partial_cmp(&prof[*a]).unwrap());
        let mut out = format!("profile of `{}`: {:.1} ms in {} kernels\n", self.program.name, total * 1e3, prof.len());
        for k in idx.into_iter().take(top) {
            let what = match &self.program.kernels[k] {
                Kernel::Loop(l) => format!(
                    "loop {:?}{}{}",
                    l.dims,
                    if l.reduce.is_some() { " reduce" } else { "" },
                    if self.code.vectorized[k] { " x4" } else { "" }
                ),
                Kernel::MatMul { batch, m, k: kk, n, .. } => format!("matmul {batch:?} {m}x{kk}x{n}"),
                Kernel::Library { node, .. } => format!("library {} {:?}", node.op.name(), node.shape),
            };
            let origin = self.program.kernel_origin(k);
            out.push_str(&format!(
                "  {:>8.2} ms {:>5.1}%  k{k:<4} {what:<40} {origin}\n",
                prof[k] * 1e3,
                100.0 * prof[k] / total.max(1e-12)
            ));
        }
        Some(out)
    }

    /// Whether kernel `k` was vectorized (for reports and tests).
    pub fn vectorized(&self, k: usize) -> bool {
        self.code.vectorized[k]
    }

    /// Runs on tensors (converted to and from the storage format).
    pub fn run_tensors(&self, inputs: &[Tensor], seed: u64) -> Result<Vec<(String, Tensor)>, RunError> {
        run_tensors_on(self, inputs, seed)
    }

    /// Runs on buffers. Outputs planned into an argument update it in place and are
    /// returned as [`Out::Arg`]; the others are copied out of the arena.
    pub fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        let p = &self.program;
        check_args(p, args)?;
        let mut arena = self.arena.hold(p.arena_bytes);
        let ptrs = buffer_pointers(p, args, arena.ptr());
        let profile = self.profile.as_ref();
        let mut skip_to = 0;
        for (ki, k) in p.kernels.iter().enumerate() {
            if ki < skip_to {
                continue;
            }
            let started = profile.map(|_| std::time::Instant::now());
            if let Some(grp) = self.group_at[ki].map(|g| &p.row_groups[g]) {
                self.row_group(grp, &ptrs);
                skip_to = grp.end;
                if let (Some(prof), Some(t)) = (profile, started) {
                    prof.lock().unwrap_or_else(|e| e.into_inner())[ki] += t.elapsed().as_secs_f64();
                }
                continue;
            }
            match k {
                Kernel::Loop(l) => {
                    let f = self.code.loops[ki].expect("loop compiled");
                    let extent = if l.outer_dims() == 0 { 1 } else { l.dims[0] };
                    let points: usize = l.dims.iter().product();
                    let table = SendPtr(ptrs.as_ptr());
                    let threads = rayon::current_num_threads();
                    if points >= self.parallel_threshold && extent >= 2 && threads > 1 {
                        let chunks = (threads * 4).min(extent);
                        (0..chunks).into_par_iter().for_each(|c| {
                            let t = table;
                            let lo = extent * c / chunks;
                            let hi = extent * (c + 1) / chunks;
                            // SAFETY: the generated loop reads and writes only planned
                            // buffers, and its range `lo..hi` of the outermost index.
                            unsafe { f(t.0, lo as i64, hi as i64) }
                        });
                    } else {
                        // SAFETY: as above, the whole range.
                        unsafe { f(table.0, 0, extent as i64) }
                    }
                }
                Kernel::MatMul { a, b, out, acc, out_offset, out_row_stride, batch, m, k, n, dtype, .. } => {
                    if let Some(acc) = acc {
                        if ptrs[*acc] != ptrs[*out] {
                            // The addend is not updated in place: start from a copy of it.
                            let bytes = batch.iter().product::<usize>() * m * n * dtype_bytes(*dtype);
                            // SAFETY: both buffers hold the (contiguous) product's elements.
                            unsafe { std::ptr::copy_nonoverlapping(ptrs[*acc] as *const u8, ptrs[*out], bytes) };
                        }
                    }
                    let o = OutView {
                        buf: *out,
                        offset: *out_offset,
                        row_stride: *out_row_stride,
                        accumulate: acc.is_some(),
                    };
                    matmul(&ptrs, a, b, &o, batch, *m, *k, *n, *dtype, true);
                }
                Kernel::Library { .. } => host_library(k, &ptrs, seed)?,
            }
            if let (Some(prof), Some(t)) = (profile, started) {
                prof.lock().unwrap_or_else(|e| e.into_inner())[ki] += t.elapsed().as_secs_f64();
            }
        }
        Ok(host_outputs(p, &ptrs))
    }
}

/// Rows per strip of a row-fused group on the CPU: about 1 M product elements (4 MiB of f32
/// per thread, half a default 8 MiB block on 2 threads), a multiple of 16, at least 16;
/// `RECIPEC_STRIP_ELEMS` (read when an executable is built) overrides the element count. On the CPU the strip is sized for the
/// matmul, whose every call repacks its operands: on the linear cross-entropy benchmark
/// (N=4096, D=1024, V=65536, 512-column blocks, 2 threads) strips of 64 K elements ran 1.45x
/// slower than the unfused program, 256 K 1.06x, 512 K 1.03–1.05x, 1 M at parity. (On CUDA a
/// strip is 16–64 rows in shared memory.)
pub fn cpu_strip_rows(n: usize, elems: usize) -> usize {
    (elems / n.max(1)).max(16) / 16 * 16
}

thread_local! {
    /// A thread's scratch for the strips of row-fused groups (grown to the largest strip).
    static STRIP_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The default of [`Executable::strip_elems`].
pub const DEFAULT_STRIP_ELEMS: usize = 1 << 20;

impl Executable {
    /// A row-fused group (`compiler::kernel::RowGroup`): per strip of [`cpu_strip_rows`]
    /// rows, the strip's product into a scratch buffer, then each loop of the group over the
    /// strip's rows, reading the product (and the group's other strip buffers) from the
    /// scratch (its table entry points `r0` rows before the scratch, so the loop's
    /// `n·i0 + i1` lands in it), then the strip's rows of each trailing matmul. With at
    /// least as many strips as threads the strips run in parallel (each thread its own
    /// scratch); with fewer, one after another, each matmul and loop split over the threads.
    fn row_group(&self, grp: &compiler::kernel::RowGroup, ptrs: &[*mut u8]) {
        let p = &self.program;
        let Kernel::MatMul { a, b, m, k, n, dtype, .. } = &p.kernels[grp.start] else {
            unreachable!("a row-fused group starts with its matmul")
        };
        let (m, k, n, z) = (*m, *k, *n, grp.tile);
        // Strips whose matmuls sum in the order of the whole matmuls (`strip_least_rows`);
        // the last strip takes what would be left under that.
        let widths: Vec<usize> = (grp.start..grp.end)
            .filter_map(|j| match &p.kernels[j] {
                Kernel::MatMul { n, .. } => Some(*n),
                _ => None,
            })
            .collect();
        let least = strip_least_rows(m, &widths);
        let rows = cpu_strip_rows(n, self.strip_elems).max(least.next_multiple_of(16));
        let strips = if m > rows && m % rows != 0 && m % rows < least { m / rows } else { m.div_ceil(rows) };
        // Each tile's place in the scratch (bytes per row of the strip, offset of its row 0).
        let mut tiles: Vec<(usize, usize, usize)> = vec![];
        let mut scratch_bytes = 0;
        for t in grp.tiles() {
            let row = n * dtype_bytes(p.buffers[t].dtype);
            tiles.push((t, row, scratch_bytes));
            scratch_bytes += (rows + least) * row;
        }
        let table: Vec<usize> = ptrs.iter().map(|x| *x as usize).collect();
        let threads = rayon::current_num_threads();
        let across = strips >= threads && threads > 1 && m * n * k >= 1 << 18;
        let threshold = self.parallel_threshold;
        let strip = |t: &mut Vec<usize>, s: usize| {
            let (r0, r1) = (s * rows, if s + 1 == strips { m } else { s * rows + rows });
            // The thread's scratch, kept from group to group and run to run (rayon's workers
            // live as long as the pool), so a strip does not fault in fresh pages. Taken out
            // while in use: work this thread picks up meanwhile gets its own.
            let mut scratch = STRIP_SCRATCH.with(|sc| sc.take());
            if scratch.len() < scratch_bytes {
                scratch.resize(scratch_bytes, 0);
            }
            let base = scratch.as_mut_ptr() as usize;
            t[z] = base;
            let tp: &[*mut u8] = {
                // SAFETY: `usize` and `*mut u8` have the same size and alignment.
                unsafe { std::slice::from_raw_parts(t.as_ptr() as *const *mut u8, t.len()) }
            };
            let a2 = View { offset: a.offset + r0 as i64 * a.row_stride, ..a.clone() };
            let o = OutView { buf: z, offset: 0, row_stride: n as i64, accumulate: false };
            matmul(tp, &a2, b, &o, &[], r1 - r0, k, n, *dtype, !across);
            // Row `r0` of each tile is its scratch's first row.
            for &(tb, row, off) in &tiles {
                t[tb] = (base + off).wrapping_sub(r0 * row);
            }
            let table = SendPtr(t.as_ptr() as *const *mut u8);
            for j in grp.start + 1..grp.end {
                match &p.kernels[j] {
                    Kernel::Loop(l) => {
                        let f = self.code.loops[j].expect("loop compiled");
                        let points = (r1 - r0) * l.dims[1..].iter().product::<usize>();
                        if !across && points >= threshold && r1 - r0 >= 2 {
                            let chunks = (threads * 4).min(r1 - r0);
                            (0..chunks).into_par_iter().for_each(|c| {
                                let t = table;
                                let (lo, hi) = (r0 + (r1 - r0) * c / chunks, r0 + (r1 - r0) * (c + 1) / chunks);
                                // SAFETY: as below, rows `lo..hi` of the strip.
                                unsafe { f(t.0, lo as i64, hi as i64) }
                            });
                        } else {
                            // SAFETY: the loop reads and writes its planned buffers at rows
                            // `r0..r1` only (`find_row_groups`), and the tiles' rows `r0..r1`
                            // in the scratch.
                            unsafe { f(table.0, r0 as i64, r1 as i64) };
                        }
                    }
                    Kernel::MatMul { a, b, out, acc, n: d, k, dtype, .. } => {
                        // A trailing matmul: rows `r0..r1` of `out = acc + a @ b`.
                        let tp: &[*mut u8] =
                            // SAFETY: as above.
                            unsafe { std::slice::from_raw_parts(t.as_ptr() as *const *mut u8, t.len()) };
                        let row = d * dtype_bytes(*dtype);
                        if let Some(c) = acc {
                            if tp[*c] != tp[*out] {
                                // SAFETY: both `[m, d]` contiguous; rows `r0..r1`.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        tp[*c].add(r0 * row) as *const u8,
                                        tp[*out].add(r0 * row),
                                        (r1 - r0) * row,
                                    )
                                };
                            }
                        }
                        let a2 = View { offset: a.offset + r0 as i64 * a.row_stride, ..a.clone() };
                        let o = OutView {
                            buf: *out,
                            offset: (r0 * d) as i64,
                            row_stride: *d as i64,
                            accumulate: acc.is_some(),
                        };
                        matmul(tp, &a2, b, &o, &[], r1 - r0, *k, *d, *dtype, !across);
                    }
                    Kernel::Library { .. } => unreachable!("a row-fused group holds matmuls and loops"),
                }
            }
            STRIP_SCRATCH.with(|sc| *sc.borrow_mut() = scratch);
        };
        if across {
            (0..strips).into_par_iter().for_each_init(|| table.clone(), |t, s| strip(t, s));
        } else {
            let mut t = table;
            for s in 0..strips {
                strip(&mut t, s);
            }
        }
    }
}

/// The address of every buffer of `p`: arguments where the caller put them, temporaries at
/// `base + offset`, outputs planned into an argument at that argument's address.
pub(crate) fn buffer_pointers(p: &Program, args: &mut [Buffer], base: *mut u8) -> Vec<*mut u8> {
    let at: Vec<*mut u8> = args.iter_mut().map(|b| b.as_mut_ptr()).collect();
    pointers_at(p, &at, base)
}

/// [`buffer_pointers`] with the arguments at the addresses `args`.
pub(crate) fn pointers_at(p: &Program, args: &[*mut u8], base: *mut u8) -> Vec<*mut u8> {
    p.buffers
        .iter()
        .enumerate()
        .map(|(b, d)| match (&d.kind, output_arg(p, b)) {
            (_, Some(i)) => args[i],
            // SAFETY: offsets are inside the arena (checked by `Program::verify`).
            (BufKind::Temp, None) => unsafe { base.add(d.offset) },
            // Never in memory: a row-fused group's runner gives it a strip's scratch.
            (BufKind::Tile, _) => std::ptr::null_mut(),
            (BufKind::Input(_), None) => unreachable!("an input is its argument"),
        })
        .collect()
}

/// The argument buffer `b` of `p` is (an input, or planned into one), if any.
pub(crate) fn output_arg(p: &Program, b: usize) -> Option<usize> {
    let d = &p.buffers[b];
    match (&d.kind, d.into) {
        (BufKind::Input(i), _) => Some(*i),
        (BufKind::Temp, Some(a)) => match p.buffers[a].kind {
            BufKind::Input(i) => Some(i),
            BufKind::Temp | BufKind::Tile => None,
        },
        _ => None,
    }
}

/// Runs a library kernel on host memory (`ptrs` from [`buffer_pointers`]).
pub(crate) fn host_library(k: &Kernel, ptrs: &[*mut u8], seed: u64) -> Result<(), RunError> {
    let Kernel::Library { node, operands, args: a, out, .. } = k else { unreachable!("a library kernel") };
    if indexing(node, operands, a, ptrs, *out) {
        return Ok(());
    }
    let ops: Vec<Tensor> = operands
        .iter()
        .zip(a)
        .map(|(o, b)| {
            let ptr = ptrs[*b] as *const u8;
            let numel: usize = o.shape.iter().product();
            Tensor { dtype: o.dtype, shape: o.shape.clone(), data: (0..numel).map(|i| read(o.dtype, ptr, i)).collect() }
        })
        .collect();
    library(node, &ops, ptrs[*out], seed)
}

/// The outputs of a run on host memory: arguments updated in place, the others copied out.
pub(crate) fn host_outputs(p: &Program, ptrs: &[*mut u8]) -> Vec<(String, Out)> {
    let mut outs = vec![];
    for (name, b, shape) in &p.outputs {
        if let Some(i) = output_arg(p, *b) {
            outs.push((name.clone(), Out::Arg(i, shape.clone())));
            continue;
        }
        let mut o = Buffer::zeros(p.buffers[*b].dtype, shape.clone());
        let n = o.bytes();
        // SAFETY: the buffer holds the output's bytes (same element count).
        unsafe { std::ptr::copy_nonoverlapping(ptrs[*b] as *const u8, o.as_mut_ptr(), n) };
        outs.push((name.clone(), Out::Buf(o)));
    }
    outs
}

/// The outputs of a run on device memory (`addrs`: every buffer's device address): arguments
/// updated in place, the others copied into fresh device buffers (they stay on the device).
pub(crate) fn device_outputs(
    p: &Program,
    addrs: &[u64],
    mem: &std::sync::Arc<dyn device::DeviceMemory>,
) -> Result<Vec<(String, ValueOut)>, RunError> {
    let mut outs = vec![];
    for (name, b, shape) in &p.outputs {
        let o = match output_arg(p, *b) {
            Some(i) => ValueOut::Arg(i, shape.clone()),
            None => ValueOut::Value(Value::Device(device::DeviceBuffer::copy_of(
                mem,
                addrs[*b],
                p.buffers[*b].dtype,
                shape.clone(),
            )?)),
        };
        outs.push((name.clone(), o));
    }
    Ok(outs)
}

fn clamp_index(v: f64, extent: usize) -> usize {
    if v <= 0.0 || v.is_nan() {
        0
    } else {
        (v as usize).min(extent.saturating_sub(1))
    }
}

/// `take`, `gather` and their transposes run natively (the interpreter's semantics: clamped
/// indices; sums accumulated in f64 and rounded once). Returns false for other ops.
fn indexing(
    node: &compiler::ir::Node,
    operands: &[compiler::ir::Node],
    args: &[usize],
    ptrs: &[*mut u8],
    out: usize,
) -> bool {
    let split = |shape: &[usize], axis: usize| -> (usize, usize, usize) {
        (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
    };
    if !matches!(node.op, Op::Take { .. } | Op::Gather { .. } | Op::TakeAdd { .. } | Op::ScatterAdd { .. }) {
        return false;
    }
    let (d, od) = (node.dtype, operands[0].dtype);
    let (x, ix, o) = (ptrs[args[0]] as *const u8, ptrs[args[1]] as *const u8, ptrs[out]);
    let idt = operands[1].dtype;
    // Shapes equal but along `axis` (else the general library path).
    let same_but =
        |a: &[usize], b: &[usize], axis: usize| a.len() == b.len() && (0..a.len()).all(|i| i == axis || a[i] == b[i]);
    match &node.op {
        Op::Gather { axis } if !same_but(&node.shape, &operands[0].shape, *axis) => false,
        Op::ScatterAdd { axis } if !same_but(&operands[2].shape, &operands[0].shape, *axis) => false,
        Op::Take { axis } => {
            let (outer, xa, inner) = split(&operands[0].shape, *axis);
            let nidx: usize = operands[1].shape.iter().product();
            for a in 0..outer {
                for j in 0..nidx {
                    let k = clamp_index(read(idt, ix, j), xa);
                    let (src, dst) = ((a * xa + k) * inner, (a * nidx + j) * inner);
                    if d == od && d == Dtype::F32 {
                        // SAFETY: rows of `inner` f32 inside both buffers (shapes from the plan).
                        unsafe {
                            std::ptr::copy_nonoverlapping((x as *const f32).add(src), (o as *mut f32).add(dst), inner)
                        };
                    } else {
                        for t in 0..inner {
                            write(d, o, dst + t, read(od, x, src + t));
                        }
                    }
                }
            }
            true
        }
        Op::Gather { axis } => {
            let (outer, xa, post) = split(&operands[0].shape, *axis);
            let ya = node.shape[*axis];
            for a in 0..outer {
                for y in 0..ya {
                    for t in 0..post {
                        let i = (a * ya + y) * post + t;
                        let k = clamp_index(read(idt, ix, i), xa);
                        write(d, o, i, read(od, x, (a * xa + k) * post + t));
                    }
                }
            }
            true
        }
        Op::ScatterAdd { axis }
            if operands[2].shape[*axis] == 1 && d == Dtype::F32 && od == d && operands[2].dtype == d =>
        {
            // One index per position along `axis`: no element receives two values, so adding
            // in place rounds once, as the general f64 accumulation below does.
            let v = ptrs[args[2]] as *const f32;
            let (outer, xa, inner) = split(&operands[0].shape, *axis);
            let numel: usize = node.shape.iter().product();
            if x != o as *const u8 {
                // SAFETY: both buffers hold the node's `numel` f32 elements.
                unsafe { std::ptr::copy_nonoverlapping(x as *const f32, o as *mut f32, numel) };
            }
            let of = o as *mut f32;
            for a in 0..outer {
                for t in 0..inner {
                    let i = a * inner + t;
                    let k = clamp_index(read(idt, ix, i), xa);
                    let at = (a * xa + k) * inner + t;
                    // SAFETY: `at` and `i` are inside the output and the values (shapes from the plan).
                    unsafe { *of.add(at) = (*of.add(at) as f64 + *v.add(i) as f64) as f32 };
                }
            }
            true
        }
        Op::TakeAdd { axis } | Op::ScatterAdd { axis } => {
            let v = ptrs[args[2]] as *const u8;
            let vd = operands[2].dtype;
            let (outer, xa, inner) = split(&operands[0].shape, *axis);
            let numel: usize = node.shape.iter().product();
            let mut acc: Vec<f64> = (0..numel).map(|i| read(od, x, i)).collect();
            if let Op::TakeAdd { .. } = node.op {
                let nidx: usize = operands[1].shape.iter().product();
                for a in 0..outer {
                    for j in 0..nidx {
                        let k = clamp_index(read(idt, ix, j), xa);
                        let (dst, src) = ((a * xa + k) * inner, (a * nidx + j) * inner);
                        for t in 0..inner {
                            acc[dst + t] += read(vd, v, src + t);
                        }
                    }
                }
            } else {
                let ya = operands[2].shape[*axis];
                for a in 0..outer {
                    for y in 0..ya {
                        for t in 0..inner {
                            let i = (a * ya + y) * inner + t;
                            let k = clamp_index(read(idt, ix, i), xa);
                            acc[(a * xa + k) * inner + t] += read(vd, v, i);
                        }
                    }
                }
            }
            for (i, x) in acc.into_iter().enumerate() {
                write(d, o, i, x);
            }
            true
        }
        _ => false,
    }
}

fn library(node: &compiler::ir::Node, ops: &[Tensor], out: *mut u8, seed: u64) -> Result<(), RunError> {
    let refs: Vec<&Tensor> = ops.iter().collect();
    let t = match &node.op {
        Op::Input { .. } => unreachable!("inputs are buffers"),
        _ => interp::eval(node, &refs, &[], seed).map_err(|e| RunError(e.0))?,
    };
    for (i, x) in t.data.iter().enumerate() {
        write(node.dtype, out, i, *x);
    }
    Ok(())
}

/// `out = (acc ? out : 0) + a @ b` through `gemm`; each operand is (base address, element
/// offset, (row stride, column stride)), the output (base, offset, row stride).
///
/// # Safety
/// The addresses, offsets and strides must describe memory inside live buffers of `T`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Copy + 'static>(
    m: usize,
    n: usize,
    k: usize,
    out: (usize, isize, isize),
    acc: bool,
    a: (usize, isize, (isize, isize)),
    b: (usize, isize, (isize, isize)),
    (zero, one): (T, T),
    par: gemm::Parallelism,
) {
    gemm::gemm::<T>(
        m,
        n,
        k,
        (out.0 as *mut T).offset(out.1),
        1,
        out.2,
        acc,
        (a.0 as *const T).offset(a.1),
        a.2 .1,
        a.2 .0,
        (b.0 as *const T).offset(b.1),
        b.2 .1,
        b.2 .0,
        if acc { one } else { zero },
        one,
        false,
        false,
        false,
        par,
    )
}

/// The fewest rows a strip of an `m`-row row-fused group may have so that each of its
/// matmuls (output widths `widths`) sums every output in the order of the whole matmul.
/// `gemm` (0.19) picks its summation by the call's shape: an output of at most 256 elements
/// is a dot product per element (k in blocks of 1024, where the operands are contiguous
/// along k), both sides at most 64 sum k in blocks of 512, larger ones in blocks sized from
/// k and the caches alone, and one row or column is a matrix-vector product. A strip must
/// fall in the whole call's case (a row's sum must not depend on the rows beside it).
pub fn strip_least_rows(m: usize, widths: &[usize]) -> usize {
    let mut least = 2;
    for &w in widths {
        if m * w > 256 {
            least = least.max(257usize.div_ceil(w.max(1)));
        }
        if m > 64 && w <= 64 {
            least = least.max(65);
        }
    }
    least.min(m.max(1))
}

struct OutView {
    buf: usize,
    offset: i64,
    row_stride: i64,
    accumulate: bool,
}

/// The element offset of batch `bi` of view `v` (batch axes row-major).
fn batch_offset(v: &View, batch: &[usize], bi: usize) -> i64 {
    let mut rem = bi;
    let mut off = v.offset;
    for d in (0..batch.len()).rev() {
        off += (rem % batch[d]) as i64 * v.batch_strides[d];
        rem /= batch[d];
    }
    off
}

/// True when the batches of `v` follow each other as rows: batch `i` starts `m` rows after
/// batch `i - 1`, in row-major order over the batch axes.
fn rows_stack(v: &View, batch: &[usize], m: usize) -> bool {
    let mut want = m as i64 * v.row_stride;
    for d in (0..batch.len()).rev() {
        if batch[d] > 1 && v.batch_strides[d] != want {
            return false;
        }
        want *= batch[d] as i64;
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn matmul(
    ptrs: &[*mut u8],
    a: &View,
    b: &View,
    out: &OutView,
    batch: &[usize],
    m: usize,
    k: usize,
    n: usize,
    dtype: Dtype,
    parallel: bool,
) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    // f16/bf16: the operands widened to f32 (exact), multiplied by the f32 kernel (f32
    // accumulation), each output added to the accumulated operand in f32 where there is one
    // and rounded once to the dtype: the CUDA kernels' rule (`docs/semantics.md`).
    if matches!(dtype, Dtype::F16 | Dtype::BF16) {
        let widen = |v: &View, bi: usize, rows: usize, cols: usize| -> Vec<f32> {
            let base = batch_offset(v, batch, bi);
            let p = ptrs[v.buf] as *const u8;
            let mut w = Vec::with_capacity(rows * cols);
            for r in 0..rows as i64 {
                for c in 0..cols as i64 {
                    w.push(read(dtype, p, (base + r * v.row_stride + c * v.col_stride) as usize) as f32);
                }
            }
            w
        };
        let par = if m * n * k >= 1 << 18 && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let po = ptrs[out.buf];
        for bi in 0..batch.iter().product::<usize>() {
            let (wa, wb) = (widen(a, bi, m, k), widen(b, bi, k, n));
            let mut prod = vec![0f32; m * n];
            // SAFETY: three contiguous f32 matrices of the sizes given.
            unsafe {
                gemm_into::<f32>(
                    m,
                    n,
                    k,
                    (prod.as_mut_ptr() as usize, 0, n as isize),
                    false,
                    (wa.as_ptr() as usize, 0, (k as isize, 1)),
                    (wb.as_ptr() as usize, 0, (n as isize, 1)),
                    (0.0, 1.0),
                    par,
                )
            };
            for r in 0..m {
                for c in 0..n {
                    let at = (out.offset + (bi * m * n) as i64 + r as i64 * out.row_stride + c as i64) as usize;
                    let mut v = prod[r * n + c];
                    if out.accumulate {
                        v += read(dtype, po, at) as f32;
                    }
                    write(dtype, po, at, v as f64);
                }
            }
        }
        return;
    }
    let nb: usize = batch.iter().product();
    // `A[b] @ W` with `W` shared by every batch element, `A`'s batches stacked row after row
    // and the output contiguous: one `[nb·m, k] @ [k, n]` product (the same sums, one call
    // with more rows for the tuned kernel to split).
    if nb > 1 && b.batch_strides.iter().all(|s| *s == 0) && out.row_stride == n as i64 && rows_stack(a, batch, m) {
        let folded = View { batch_strides: vec![], ..a.clone() };
        let b0 = View { batch_strides: vec![], ..b.clone() };
        return matmul(ptrs, &folded, &b0, out, &[], nb * m, k, n, dtype, parallel);
    }
    let offs = |v: &View, bi: usize| -> isize { batch_offset(v, batch, bi) as isize };
    let work = m * n * k;
    let (pa, pb, po) = (ptrs[a.buf] as usize, ptrs[b.buf] as usize, ptrs[out.buf] as usize);
    let (rs, acc) = (out.row_stride as isize, out.accumulate);
    let one = |bi: usize, par: gemm::Parallelism| {
        let (oa, ob, oo) = (offs(a, bi), offs(b, bi), out.offset as isize + (bi * m * n) as isize);
        let (ac, bc) = ((a.row_stride as isize, a.col_stride as isize), (b.row_stride as isize, b.col_stride as isize));
        // SAFETY: the views were derived from the buffers' shapes by the scheduler.
        unsafe {
            match dtype {
                Dtype::F64 => gemm_into::<f64>(m, n, k, (po, oo, rs), acc, (pa, oa, ac), (pb, ob, bc), (0.0, 1.0), par),
                _ => gemm_into::<f32>(m, n, k, (po, oo, rs), acc, (pa, oa, ac), (pb, ob, bc), (0.0, 1.0), par),
            }
        }
    };
    // Small products run on the calling thread: waking the pool costs more than the work.
    if nb >= threads && nb > 1 && nb * work >= 1 << 16 {
        (0..nb).into_par_iter().for_each(|bi| one(bi, gemm::Parallelism::None));
    } else {
        let par =
            if work >= 1 << 18 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for bi in 0..nb {
            one(bi, par);
        }
    }
}
