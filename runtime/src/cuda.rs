//! The CUDA path: a [`Program`]'s CUDA C (`codegen-cuda`) compiled by NVRTC for the device,
//! one arena allocation, kernels launched in order on one stream; library kernels (gather,
//! sort, RNG, linear algebra) run on the host between launches (their operands are copied
//! down and the result copied back), as on the CPU backends.
//!
//! Every run launches the same kernels with the same parameters (each kernel's only parameter
//! is the address of its argument table, which the executable allocates once), so the first
//! run captures each stretch of device launches between host library kernels as a CUDA graph
//! and later runs replay the graphs: one driver call per stretch instead of one per kernel
//! ([`stretches`]; `RECIPEC_CUDA_GRAPHS=0` launches kernel by kernel).
//!
//! cudarc panics when the driver or NVRTC libraries are missing, so [`available`] checks
//! for them with `dlopen` first and every entry point here calls it: without a GPU the
//! answer is a clear "no CUDA device" error, never a panic.

use crate::device::{check_values, make_resident, DeviceMemory, Pool, Traffic, TrafficCounter};
use crate::{device_outputs, output_arg, Buffer, Out, RunError, Value, ValueOut};
use compiler::interp::Tensor;
use compiler::kernel::{BufKind, Kernel, Program};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaFunction, CudaGraph, CudaStream, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

fn loadable(names: &[&str]) -> bool {
    names.iter().any(|name| {
        let c = std::ffi::CString::new(*name).expect("no NUL");
        // SAFETY: dlopen/dlclose of a library by name; nothing from it is called here.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            false
        } else {
            unsafe { libc::dlclose(h) };
            true
        }
    })
}

/// Whether a CUDA device can run programs here, or why not.
pub fn available() -> Result<(), RunError> {
    if !loadable(&["libcuda.so.1", "libcuda.so"]) {
        return Err(RunError("no CUDA device: the NVIDIA driver library (libcuda.so.1) is not installed".into()));
    }
    if !loadable(&["libnvrtc.so.12", "libnvrtc.so"]) {
        return Err(RunError(
            "no CUDA compiler: NVRTC (libnvrtc.so.12) is not on the library path (pip install nvidia-cuda-nvrtc-cu12 and add its lib directory to LD_LIBRARY_PATH)".into(),
        ));
    }
    cu::init().map_err(|e| RunError(format!("no CUDA device: the driver failed to start ({e:?})")))?;
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(RunError("no CUDA device: the driver sees no GPU".into())),
        Err(e) => Err(RunError(format!("no CUDA device: {e:?}"))),
    }
}

/// The device's copy bandwidth in bytes per second: `bytes` copied device to device (read
/// plus write counted, as a kernel's traffic is), the best of `reps` synchronized copies.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> Result<f64, RunError> {
    available()?;
    let ctx = CudaContext::new(0).map_err(|e| err("cannot open device 0", e))?;
    ctx.bind_to_thread().map_err(|e| err("bind", e))?;
    // SAFETY: two plain allocations, copied between and freed here.
    unsafe {
        let a = cu::malloc_sync(bytes).map_err(|e| err("alloc", e))?;
        let b = match cu::malloc_sync(bytes) {
            Ok(b) => b,
            Err(e) => {
                let _ = cu::free_sync(a);
                return Err(err("alloc", e));
            }
        };
        let mut best = f64::MAX;
        let mut result = cu::memset_d8_sync(a, 1, bytes).map_err(|e| err("memset", e));
        for _ in 0..reps {
            if result.is_err() {
                break;
            }
            let t = std::time::Instant::now();
            result = cu::memcpy_dtod_sync(b, a, bytes).map_err(|e| err("copy", e));
            if result.is_ok() {
                result = ctx.synchronize().map_err(|e| err("synchronize", e));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let _ = cu::free_sync(a);
        let _ = cu::free_sync(b);
        result.map(|_| 2.0 * bytes as f64 / best)
    }
}

/// What `ptxas -v` reports for one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUsage {
    pub name: String,
    pub registers: u32,
    pub spill_bytes: u64,
    pub shared_bytes: u64,
    /// Local memory per thread (`bytes stack frame`): arrays indexed at run time and
    /// libm's slow paths; spills are counted in `spill_bytes`.
    pub stack_bytes: u64,
}

/// The limits every `sm_80`/`sm_90` kernel of a unit must fit: 1024 threads per block, 48 KiB
/// of static shared memory per block (163 KiB with the dynamic memory a launch opts in to), a
/// grid of at most
/// 2³¹ − 1 blocks across and 65,535 down and deep (a matmul's row tiles and batch).
pub fn check_launches(unit: &codegen_cuda::Unit) -> Result<(), String> {
    for l in unit.launches.iter().filter(|l| l.runs_code()) {
        let limits = [(1u64 << 31) - 1, 65535, 65535];
        if let Some(d) = (0..3).find(|&d| l.grid[d] as u64 > limits[d] || l.grid[d] == 0) {
            return Err(format!(
                "kernel {} of `{}` needs a grid of {:?} blocks (at most {:?}; dimension {d} is over)",
                l.name, unit.name, l.grid, limits
            ));
        }
        let threads: u64 = l.block.iter().map(|&b| b as u64).product();
        if threads > 1024 {
            return Err(format!(
                "kernel {} of `{}` needs {threads} threads per block (at most 1024)",
                l.name, unit.name
            ));
        }
        if l.shared_bytes > 48 * 1024 {
            return Err(format!(
                "kernel {} of `{}` needs {} bytes of shared memory per block (at most 49152 without opting in)",
                l.name, unit.name, l.shared_bytes
            ));
        }
        if l.shared_bytes + l.dynamic_shared > codegen_cuda::OPT_IN_SHARED {
            return Err(format!(
                "kernel {} of `{}` needs {} bytes of shared memory per block with its dynamic strips (at most {} on sm_80)",
                l.name,
                unit.name,
                l.shared_bytes + l.dynamic_shared,
                codegen_cuda::OPT_IN_SHARED
            ));
        }
    }
    Ok(())
}

/// How many blocks of one kernel a multiprocessor holds at once, and what stops one more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Resident blocks per multiprocessor; 0: the kernel cannot be launched at all.
    pub blocks: u32,
    /// Resident warps per multiprocessor, of [`MAX_WARPS_PER_SM`].
    pub warps: u32,
    /// What limits `blocks`: `registers`, `shared` (memory), `threads` (the warps a
    /// multiprocessor schedules) or `blocks` (its block slots).
    pub limit: &'static str,
}

/// Warps one sm_80 or sm_90 multiprocessor holds (2,048 threads).
pub const MAX_WARPS_PER_SM: u32 = 64;

/// The [`Occupancy`] of a kernel on an `sm_80` (A100) or `sm_90` (H100, H200) multiprocessor,
/// by the rules of NVIDIA's occupancy calculator: 65,536 registers in 4 sub-partitions,
/// allocated per warp in units of 256 (a block's warps rounded up to a multiple of 4 must fit
/// one block's 65,536); shared memory per block (`shared_bytes`, static plus dynamic) plus the
/// 1 KiB the system reserves per block, in units of 128 bytes, out of the largest carveout
/// (164 KiB on sm_80, 228 KiB on sm_90: what the driver configures when a kernel needs it);
/// 64 warps and 32 blocks. Where a GPU is present the GPU test compares this with the driver's
/// `cuOccupancyMaxActiveBlocksPerMultiprocessor` for every kernel.
pub fn occupancy(arch: &str, threads: u32, registers: u32, shared_bytes: u64) -> Occupancy {
    const REGS: u32 = 65536;
    const SUB_PARTITIONS: u32 = 4;
    const MAX_BLOCKS: u32 = 32;
    let smem_per_sm: u64 = if arch == "sm_80" { 164 * 1024 } else { 228 * 1024 };
    let warps = threads.div_ceil(32).max(1);
    let round = |x: u64, unit: u64| x.div_ceil(unit) * unit;
    let by_regs = if registers == 0 {
        u32::MAX
    } else {
        let per_warp = round(registers as u64 * 32, 256) as u32;
        if per_warp as u64 * round(warps as u64, SUB_PARTITIONS as u64) > REGS as u64 {
            0
        } else {
            (REGS / SUB_PARTITIONS / per_warp) * SUB_PARTITIONS / warps
        }
    };
    let per_block = round(shared_bytes + 1024, 128);
    let by_smem = if shared_bytes == 0 { u32::MAX } else { (smem_per_sm / per_block) as u32 };
    // A tie names the hardware's caps first: a full multiprocessor is not register-bound.
    let limits =
        [(MAX_WARPS_PER_SM / warps, "threads"), (MAX_BLOCKS, "blocks"), (by_regs, "registers"), (by_smem, "shared")];
    let (blocks, limit) = limits.iter().copied().min_by_key(|&(b, _)| b).expect("four limits");
    Occupancy { blocks, warps: blocks * warps, limit }
}

/// Each device function's [`Occupancy`] on `arch` from what `ptxas` reported (`usage`), in the
/// order of the unit's launches (one entry per function, at its first launch; a function
/// `ptxas` did not report is left out), or, for a kernel no multiprocessor can hold (its
/// registers for a whole block are more than the 65,536 there are), why not: a launch would
/// fail with "too many resources requested".
pub fn check_resources(
    unit: &codegen_cuda::Unit,
    usage: &[KernelUsage],
    arch: &str,
) -> Result<Vec<(String, Occupancy)>, String> {
    let mut out: Vec<(String, Occupancy)> = vec![];
    for l in unit.launches.iter().filter(|l| l.runs_code()) {
        if out.iter().any(|(n, _)| *n == l.name) {
            continue;
        }
        let Some(k) = usage.iter().find(|k| k.name == l.name) else { continue };
        let threads: u32 = l.block.iter().product();
        // The static shared memory ptxas allocated (the table's, up to alignment padding).
        let occ = occupancy(arch, threads, k.registers, k.shared_bytes + l.dynamic_shared as u64);
        if occ.blocks == 0 {
            return Err(format!(
                "kernel {} of `{}` needs {} registers for each of its {threads} threads on {arch}: more than the 65,536 of a multiprocessor",
                l.name, unit.name, k.registers
            ));
        }
        out.push((l.name.clone(), occ));
    }
    Ok(out)
}

/// Whether NVRTC can be loaded (it compiles CUDA C without a GPU), or why not.
pub fn nvrtc_available() -> Result<(), RunError> {
    if loadable(&["libnvrtc.so.12", "libnvrtc.so"]) {
        Ok(())
    } else {
        Err(RunError(
            "NVRTC (libnvrtc.so.12) is not on the library path: install `nvidia-cuda-nvrtc-cu12` and add its lib directory to LD_LIBRARY_PATH".into(),
        ))
    }
}

/// CUDA C to PTX for a virtual architecture (`compute_80`) with recipec's NVRTC options.
/// The error carries NVRTC's log and a command that reproduces it.
pub fn compile_ptx(source: &str, name: &str, virt: &'static str) -> Result<String, RunError> {
    nvrtc_available()?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(virt),
        options: codegen_cuda::NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map(|p| p.to_src()).map_err(|e| {
        RunError(format!(
            "NVRTC failed on `{name}` for {virt}: {e:?}; reproduce with `recipec build ... --emit cuda > {name}.cu && nvcc {} -arch={virt} -ptx {name}.cu`",
            codegen_cuda::NVRTC_OPTIONS.join(" ")
        ))
    })
}

/// `ptxas`: `$RECIPEC_PTXAS`, else the first on `PATH`.
pub fn find_ptxas() -> Result<std::path::PathBuf, RunError> {
    if let Ok(p) = std::env::var("RECIPEC_PTXAS") {
        return Ok(std::path::PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.exists()).ok_or_else(|| {
        RunError("ptxas is not on PATH: install `nvidia-cuda-nvcc-cu12` and add its bin directory to PATH".into())
    })
}

/// Assembles `ptx` for `real` (`sm_90`) with `ptxas -v` in `dir` (which keeps the `.ptx` and
/// `.cubin`), and returns each kernel's registers, spills and static shared memory.
pub fn assemble(
    ptx: &str,
    real: &str,
    ptxas: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
) -> Result<Vec<KernelUsage>, RunError> {
    let f = dir.join(format!("{name}.{real}.ptx"));
    std::fs::write(&f, ptx).map_err(|e| RunError(format!("cannot write {}: {e}", f.display())))?;
    let out = std::process::Command::new(ptxas)
        .args([&format!("-arch={real}"), "-v", "-o"])
        .arg(dir.join(format!("{name}.{real}.cubin")))
        .arg(&f)
        .output()
        .map_err(|e| RunError(format!("cannot run {}: {e}", ptxas.display())))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(RunError(format!(
            "ptxas failed; reproduce with `{} -arch={real} -v {}`:\n{log}",
            ptxas.display(),
            f.display()
        )));
    }
    Ok(parse_ptxas(&log))
}

/// The free and total memory of device 0, in bytes.
pub fn memory_info() -> Result<(usize, usize), RunError> {
    available()?;
    let ctx = CudaContext::new(0).map_err(|e| err("cannot open device 0", e))?;
    ctx.bind_to_thread().map_err(|e| err("bind", e))?;
    cu::mem_get_info().map_err(|e| err("memory info", e))
}

/// The per-kernel lines of a `ptxas -v` log.
fn parse_ptxas(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = vec![];
    // Whose properties the next lines give (an entry's or a device function's it calls).
    let mut props = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            props = rest.trim().to_string();
        }
        let num = |key: &str| -> Option<u64> {
            let i = line.find(key)?;
            line[..i].split_whitespace().last()?.parse().ok()
        };
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelUsage { name, registers: 0, spill_bytes: 0, shared_bytes: 0, stack_bytes: 0 });
        } else if let Some(k) = out.last_mut() {
            if let Some(s) = num(" bytes spill stores") {
                k.spill_bytes += s;
            }
            if let Some(s) = num(" bytes stack frame").filter(|_| props == k.name) {
                k.stack_bytes = s;
            }
            if line.contains("Used") && line.contains("registers") {
                k.registers = num(" registers").unwrap_or(0) as u32;
                k.shared_bytes = num(" bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Device copies of a run's arguments, freed on drop (every launch has synchronized by then).
struct DeviceArgs(Vec<u64>);

impl Drop for DeviceArgs {
    fn drop(&mut self) {
        for &ptr in &self.0 {
            // SAFETY: allocated by `upload`; `launch_all` synchronizes before returning.
            unsafe {
                let _ = cu::free_sync(ptr);
            }
        }
    }
}

fn err(what: &str, e: impl std::fmt::Debug) -> RunError {
    RunError(format!("CUDA: {what}: {e:?}"))
}

/// The GPU's memory for values that stay on the device between runs ([`crate::device`]).
struct CudaMemory {
    ctx: Arc<CudaContext>,
    pool: std::sync::Mutex<Pool>,
    traffic: TrafficCounter,
}

impl CudaMemory {
    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for (ptr, _) in self.pool().drain() {
            // SAFETY: allocated by `alloc`; no buffer holds it any more (each holds this memory).
            unsafe {
                let _ = cu::free_sync(ptr);
            }
        }
    }
}

impl DeviceMemory for CudaMemory {
    fn alloc(&self, bytes: usize) -> Result<u64, RunError> {
        let mut pool = self.pool();
        if let Some(p) = pool.take(bytes) {
            return Ok(p);
        }
        self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        // SAFETY: a plain device allocation, released when the memory is dropped.
        let p = match unsafe { cu::malloc_sync(bytes) } {
            Ok(p) => p,
            Err(_) => {
                // Out of memory, perhaps because of what the pool keeps: give that back, retry.
                for kept in pool.release_kept() {
                    // SAFETY: kept allocations are not in use (given back by their buffers).
                    unsafe {
                        let _ = cu::free_sync(kept);
                    }
                }
                // SAFETY: as above.
                unsafe { cu::malloc_sync(bytes) }
                    .map_err(|e| err(&format!("cannot allocate {}", compiler::plan::human(bytes)), e))?
            }
        };
        self.traffic.alloc();
        pool.handed_out(p, bytes);
        Ok(p)
    }
    fn free(&self, ptr: u64) {
        // Kept for reuse: the launches that used it are done (every run synchronizes) and the
        // next user's copies and launches are ordered after them on the same stream.
        self.pool().give_back(ptr);
    }
    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), RunError> {
        self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        self.traffic.up(src.len());
        // SAFETY: `dst` holds at least `src.len()` bytes (the trait's contract).
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(|e| err("copy in", e))
    }
    fn download(&self, dst: &mut [u8], src: u64) -> Result<(), RunError> {
        self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        self.traffic.down(dst.len());
        // SAFETY: `src` holds at least `dst.len()` bytes (the trait's contract).
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(|e| err("copy out", e))
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RunError> {
        self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        // SAFETY: both hold `bytes` bytes (the trait's contract).
        unsafe { cu::memcpy_dtod_sync(dst, src, bytes) }.map_err(|e| err("device copy", e))
    }
    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }
}

/// The GPU arena of programs that never run at once ([`crate::Arenas`]): one allocation,
/// grown to the largest arena a run needs; a run holds its lock until its outputs are copied.
pub struct DeviceArena {
    ctx: Arc<CudaContext>,
    cell: std::sync::Mutex<(u64, usize)>,
}

impl DeviceArena {
    fn new(ctx: Arc<CudaContext>) -> DeviceArena {
        DeviceArena { ctx, cell: std::sync::Mutex::new((0, 0)) }
    }

    /// The arena, at least `bytes` large, held until the guard drops.
    fn hold(&self, bytes: usize) -> Result<(std::sync::MutexGuard<'_, (u64, usize)>, u64), RunError> {
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if cell.1 < bytes.max(256) {
            self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
            if cell.1 > 0 {
                // SAFETY: allocated below; every run that used it has synchronized.
                unsafe {
                    let _ = cu::free_sync(cell.0);
                }
                *cell = (0, 0);
            }
            let want = bytes.max(256);
            // SAFETY: a plain device allocation, freed when grown again or dropped.
            let ptr = unsafe { cu::malloc_sync(want) }
                .map_err(|e| err(&format!("cannot allocate the arena ({})", compiler::plan::human(want)), e))?;
            *cell = (ptr, want);
        }
        let base = cell.0;
        Ok((cell, base))
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        let (ptr, bytes) = *self.cell.get_mut().unwrap_or_else(|e| e.into_inner());
        if bytes > 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by `hold`; no executable holds this arena any more.
            unsafe {
                let _ = cu::free_sync(ptr);
            }
        }
    }
}

/// A program compiled for the GPU; its arena is allocated by the first run (or shared).
pub struct CudaExecutable {
    pub program: Program,
    pub unit: codegen_cuda::Unit,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Vec<Option<CudaFunction>>,
    arena: Arc<DeviceArena>,
    /// The kernels' argument tables and the captured graphs. The lock also keeps two runs
    /// from sharing the arena at once, and serializes the graphs' use (the driver requires it).
    table: std::sync::Mutex<Launched>,
    /// What a run launches, in order ([`stretches`]).
    stretches: Vec<Stretch>,
    /// Whether runs replay CUDA graphs (`RECIPEC_CUDA_GRAPHS=0`: no).
    graphs: bool,
    /// Where [`CudaExecutable::run_values`] keeps values between runs.
    mem: Arc<dyn DeviceMemory>,
}

/// What one run launches, in order: a stretch of device kernels (indices into
/// `Program::kernels`, captured as one CUDA graph when it has two or more) or a library
/// kernel that runs on the host, after the device has finished what came before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stretch {
    Device(Vec<usize>),
    Host(usize),
}

/// A unit's launches as [`Stretch`]es: each maximal run of device launches between host
/// library kernels, in program order (the loops of a row-fused group, `part`, run inside
/// their group's launch and are not launched).
pub fn stretches(launches: &[codegen_cuda::Launch]) -> Vec<Stretch> {
    let mut out = vec![];
    for (k, l) in launches.iter().enumerate() {
        match l.kind {
            "part" => {}
            "host" => out.push(Stretch::Host(k)),
            _ => match out.last_mut() {
                Some(Stretch::Device(ks)) => ks.push(k),
                _ => out.push(Stretch::Device(vec![k])),
            },
        }
    }
    out
}

/// A captured stretch.
struct Graph(CudaGraph);

// SAFETY: a graph is used only under its executable's table lock, so by one thread at a time,
// as the driver requires of graph objects.
unsafe impl Send for Graph {}

/// The state of an executable's launches, behind its lock.
struct Launched {
    /// The kernels' argument tables: one device allocation, made once, and the words it
    /// holds. A run copies the tables only when they changed (arguments at other addresses,
    /// another seed).
    table: u64,
    words: Vec<u64>,
    /// One entry per stretch (`None` for a host kernel or a single launch), captured by the
    /// first run that uses graphs.
    graphs: Option<Vec<Option<Graph>>>,
    /// Why capturing failed, if it did: runs then launch kernel by kernel.
    fallback: Option<String>,
}

impl Drop for CudaExecutable {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let launched = self.table.get_mut().unwrap_or_else(|e| e.into_inner());
        // The graphs go first: their launches are done (every run synchronizes).
        launched.graphs = None;
        let table = launched.table;
        // SAFETY: the table was allocated by `malloc_sync` and nothing uses it any more (the
        // arena frees itself with its last executable).
        unsafe {
            let _ = cu::free_sync(table);
        }
    }
}

fn arch(cc: (i32, i32)) -> &'static str {
    match cc {
        (9, 0) => "compute_90",
        (8, 9) => "compute_89",
        (8, 6) => "compute_86",
        (8, 0) => "compute_80",
        (7, 5) => "compute_75",
        (7, 0) => "compute_70",
        (a, b) => Box::leak(format!("compute_{a}{b}").into_boxed_str()),
    }
}

impl CudaExecutable {
    pub fn new(program: Program) -> Result<CudaExecutable, RunError> {
        Self::new_in(program, &crate::Arenas::default())
    }

    /// [`CudaExecutable::new`], running in the GPU arena of `arenas` with the programs
    /// compiled there.
    pub fn new_in(program: Program, arenas: &crate::Arenas) -> Result<CudaExecutable, RunError> {
        Self::with_options(program, arenas, &codegen_cuda::EmitOptions::from_env())
    }

    /// [`CudaExecutable::new_in`] with the CUDA C emitted with `opts`.
    pub fn with_options(
        program: Program,
        arenas: &crate::Arenas,
        opts: &codegen_cuda::EmitOptions,
    ) -> Result<CudaExecutable, RunError> {
        available()?;
        let unit = codegen_cuda::emit_with(&program, opts).map_err(RunError)?;
        // A launch over the device's limits fails here, before anything is compiled or copied.
        check_launches(&unit).map_err(RunError)?;
        let ctx = CudaContext::new(0).map_err(|e| err("cannot open device 0", e))?;
        let cc = ctx.compute_capability().map_err(|e| err("compute capability", e))?;
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch(cc)),
            options: codegen_cuda::NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
            name: Some(format!("{}.cu", program.name)),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(&unit.source, opts)
            .map_err(|e| err(&format!("NVRTC failed on `{}` (see `recipec build --emit cuda`)", program.name), e))?;
        let module = ctx.load_module(ptx).map_err(|e| err("cannot load the module", e))?;
        let mut functions = vec![];
        for l in &unit.launches {
            functions.push(if !l.runs_code() {
                None
            } else {
                let f = module.load_function(&l.name).map_err(|e| err(&format!("kernel {}", l.name), e))?;
                // The driver's word on the registers: a block it cannot hold fails here, by name,
                // rather than at its launch ("too many resources requested").
                let threads: u32 = l.block.iter().product();
                let most = f.max_threads_per_block().map_err(|e| err(&format!("kernel {}", l.name), e))?;
                if (most as u32) < threads {
                    let regs = f.num_regs().unwrap_or(0);
                    return Err(RunError(format!(
                        "kernel {} of `{}` needs {regs} registers for each of its {threads} threads: this GPU runs at most {most} threads of it per block",
                        l.name, program.name
                    )));
                }
                if l.dynamic_shared > 0 {
                    // Dynamic shared memory past 48 KiB is opted in to per function.
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        l.dynamic_shared as i32,
                    )
                    .map_err(|e| {
                        err(&format!("kernel {}: {} B of dynamic shared memory", l.name, l.dynamic_shared), e)
                    })?;
                }
                Some(f)
            });
        }
        ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        let arena = arenas
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| Arc::new(DeviceArena::new(ctx.clone())))
            .clone();
        let words: usize = unit.launches.iter().map(|l| l.slots.len()).sum();
        // SAFETY: a plain device allocation, freed in `drop`.
        let table =
            unsafe { cu::malloc_sync(words.max(1) * 8) }.map_err(|e| err("cannot allocate the kernel tables", e))?;
        let table = std::sync::Mutex::new(Launched { table, words: vec![], graphs: None, fallback: None });
        let stream = ctx.default_stream();
        let mem: Arc<dyn DeviceMemory> =
            Arc::new(CudaMemory { ctx: ctx.clone(), pool: Default::default(), traffic: TrafficCounter::default() });
        let stretches = stretches(&unit.launches);
        let graphs = !matches!(std::env::var("RECIPEC_CUDA_GRAPHS").as_deref(), Ok("0" | "off" | "no"));
        Ok(CudaExecutable { program, unit, ctx, stream, functions, arena, table, stretches, graphs, mem })
    }

    /// Turns the replay of CUDA graphs on or off (on unless `RECIPEC_CUDA_GRAPHS=0`); either
    /// way a run launches the same kernels in the same order.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    /// How many CUDA graphs the runs replay (0 before the first run, or without graphs), and
    /// why capturing them failed if it did (the runs then launched kernel by kernel).
    pub fn graphs(&self) -> (usize, Option<String>) {
        let l = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let n = l.graphs.as_ref().map_or(0, |g| g.iter().flatten().count());
        (n, l.fallback.clone())
    }

    /// Where [`occupancy`] (from the registers the driver reports) and the driver's own
    /// `cuOccupancyMaxActiveBlocksPerMultiprocessor` disagree on a device function's resident
    /// blocks, one line each; `Err` on a device the model does not describe (only sm_80 and
    /// sm_90 are).
    pub fn occupancy_mismatches(&self) -> Result<Vec<String>, RunError> {
        let cc = self.ctx.compute_capability().map_err(|e| err("compute capability", e))?;
        let arch = match cc {
            (8, 0) => "sm_80",
            (9, 0) => "sm_90",
            (a, b) => return Err(RunError(format!("the occupancy model covers sm_80 and sm_90, not sm_{a}{b}"))),
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut out = vec![];
        for (l, f) in self.unit.launches.iter().zip(&self.functions) {
            let Some(f) = f else { continue };
            if !seen.insert(l.name.as_str()) {
                continue;
            }
            let threads: u32 = l.block.iter().product();
            let what = |e| err(&format!("kernel {}", l.name), e);
            let regs = f.num_regs().map_err(what)? as u32;
            let shared = f.shared_size_bytes().map_err(what)? as u64;
            let model = occupancy(arch, threads, regs, shared + l.dynamic_shared as u64);
            let driver = f
                .occupancy_max_active_blocks_per_multiprocessor(threads, l.dynamic_shared as usize, None)
                .map_err(what)?;
            if model.blocks != driver {
                out.push(format!(
                    "{}: {threads} threads, {regs} registers, {shared}+{} B shared: the model holds {} blocks ({}), the driver {driver}",
                    l.name, l.dynamic_shared, model.blocks, model.limit
                ));
            }
        }
        Ok(out)
    }

    /// Runs on host buffers (copied to the device and back), like [`crate::Executable::run`].
    pub fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        let dev = self.upload(args)?;
        let (_held, base) = self.arena.hold(self.program.arena_bytes)?;
        self.launch_all(base, &dev.0, seed)?;
        self.collect(base, args, &dev.0)
    }

    /// Runs on values that stay on the GPU ([`crate::device`]): host arguments are uploaded
    /// once (their slots become device values), outputs are left on the device. The training
    /// loop runs its programs this way, so a step copies only the batch in and the values the
    /// host reads (the loss) out.
    pub fn run_values(&self, args: &mut [Value], seed: u64) -> Result<Vec<(String, ValueOut)>, RunError> {
        check_values(&self.program, args)?;
        let dev = make_resident(&self.mem, args)?;
        let (_held, base) = self.arena.hold(self.program.arena_bytes)?;
        self.launch_all(base, &dev, seed)?;
        device_outputs(&self.program, &self.addresses(base, &dev), &self.mem)
    }

    /// The GPU memory of [`CudaExecutable::run_values`].
    pub fn memory(&self) -> &Arc<dyn DeviceMemory> {
        &self.mem
    }

    /// Seconds per run of the kernels alone (arguments copied to the device once, before;
    /// `reps` runs, each launched and synchronized), for benchmarks against the device's copy
    /// bandwidth. Arguments updated in place change from run to run.
    pub fn time_kernels(&self, args: &[Buffer], seed: u64, reps: usize) -> Result<Vec<f64>, RunError> {
        let dev = self.upload(args)?;
        let (_held, base) = self.arena.hold(self.program.arena_bytes)?;
        let mut times = vec![];
        for _ in 0..reps {
            let t = std::time::Instant::now();
            self.launch_all(base, &dev.0, seed)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    }

    /// The arguments copied to fresh device allocations (freed when the result is dropped).
    fn upload(&self, args: &[Buffer]) -> Result<DeviceArgs, RunError> {
        crate::check_args(&self.program, args)?;
        self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        let mut dev = DeviceArgs(vec![]);
        for a in args {
            // SAFETY: a fresh allocation of the argument's size, filled from its bytes.
            let ptr = unsafe { cu::malloc_sync(a.bytes().max(1)) }.map_err(|e| err("alloc", e))?;
            dev.0.push(ptr);
            unsafe { cu::memcpy_htod_sync(ptr, a.as_bytes()) }.map_err(|e| err("copy in", e))?;
        }
        Ok(dev)
    }

    /// Every buffer's device address, the arena at `base`.
    fn addresses(&self, base: u64, dev_args: &[u64]) -> Vec<u64> {
        let p = &self.program;
        p.buffers
            .iter()
            .enumerate()
            .map(|(b, d)| match (&d.kind, output_arg(p, b)) {
                (_, Some(i)) => dev_args[i],
                (BufKind::Temp, None) => base + d.offset as u64,
                // Never in memory: the row-fused kernel keeps it in shared memory.
                (BufKind::Tile, _) => 0,
                (BufKind::Input(_), None) => unreachable!("an input is its argument"),
            })
            .collect()
    }

    /// Launches every kernel, the arena at `base` (held by the caller).
    fn launch_all(&self, base: u64, dev_args: &[u64], seed: u64) -> Result<(), RunError> {
        let p = &self.program;
        // With every argument already on the device nothing else has made the context current
        // on this thread (the table copy and the host library kernels' copies need it).
        self.ctx.bind_to_thread().map_err(|e| err("bind", e))?;
        let addrs = self.addresses(base, dev_args);
        // The word after the last address is the run's seed (the RNG kernels read it).
        let mut words = addrs.clone();
        words.extend([seed, 0]);
        // Each kernel reads its own table (`Launch::slots`): all of them in one allocation,
        // kernel `k`'s starting at word `starts[k]`.
        let mut tables: Vec<u64> = vec![];
        let mut starts: Vec<u64> = vec![];
        for l in &self.unit.launches {
            starts.push(tables.len() as u64 * 8);
            tables.extend(l.slots.iter().map(|(w, o)| words[*w].wrapping_add(*o as u64)));
        }
        let mut held = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = held.table;
        if held.words != tables {
            held.words.clear();
            if !tables.is_empty() {
                // SAFETY: the allocation holds every launch's slots (counted in `new`); the
                // previous run has synchronized, so no kernel reads the table now.
                unsafe { cu::memcpy_htod_sync(table, &tables) }.map_err(|e| err("copy", e))?;
            }
            held.words = tables;
        }
        // Each kernel's one parameter: the address of its table, the same in every run.
        let starts: Vec<u64> = starts.into_iter().map(|s| table + s).collect();
        if self.graphs && held.graphs.is_none() && held.fallback.is_none() {
            match self.capture(&starts) {
                Ok(g) => held.graphs = Some(g),
                Err(e) => held.fallback = Some(e.0),
            }
        }
        let graphs = if self.graphs { held.graphs.as_deref() } else { None };
        let mut result = Ok(());
        for (i, s) in self.stretches.iter().enumerate() {
            let done = match (s, graphs.and_then(|g| g[i].as_ref())) {
                // SAFETY: the graph's kernels read and write only the planned buffers through
                // the tables, which are in place; the default stream orders the replay after
                // the copies before it.
                (Stretch::Device(_), Some(g)) => {
                    unsafe { cu::graph::launch(g.0.cu_graph_exec(), self.stream.cu_stream()) }
                        .map_err(|e| err(&format!("replay of {}'s kernels", p.name), e))
                }
                (Stretch::Device(ks), None) => ks.iter().try_for_each(|&ki| self.launch(&self.stream, ki, &starts)),
                (Stretch::Host(ki), _) => {
                    self.stream.synchronize().map_err(|e| err("synchronize", e)).and_then(|()| match &p.kernels[*ki] {
                        k @ Kernel::Library { operands, args: a, out, .. } => {
                            self.host_library(k, operands, a, *out, &addrs, seed)
                        }
                        _ => unreachable!("host launches are library kernels"),
                    })
                }
            };
            if let Err(e) = done {
                result = Err(e);
                break;
            }
        }
        let synced = self.stream.synchronize().map_err(|e| err("synchronize", e));
        drop(held);
        result.and(synced)
    }

    /// Launches device kernel `ki` on `stream`, its table at `starts[ki]`.
    fn launch(&self, stream: &Arc<CudaStream>, ki: usize, starts: &[u64]) -> Result<(), RunError> {
        let l = &self.unit.launches[ki];
        let f = self.functions[ki].as_ref().expect("device kernels have functions");
        let cfg = LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block[0], l.block[1], l.block[2]),
            shared_mem_bytes: l.dynamic_shared,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&starts[ki]);
        // SAFETY: the kernel reads and writes only the planned buffers in the table.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| err(&format!("launch of {}", l.name), e))
    }

    /// Each stretch of two or more device launches captured as a CUDA graph, on a stream of its
    /// own (the default stream cannot be captured; nothing runs while capturing). The graphs
    /// replay on the default stream, so they stay ordered with the copies around them.
    fn capture(&self, starts: &[u64]) -> Result<Vec<Option<Graph>>, RunError> {
        let mut stream = None;
        let mut graphs = vec![];
        for s in &self.stretches {
            let Stretch::Device(ks) = s else {
                graphs.push(None);
                continue;
            };
            if ks.len() < 2 {
                graphs.push(None);
                continue;
            }
            let stream = match &stream {
                Some(s) => s,
                None => {
                    stream.insert(self.ctx.new_stream().map_err(|e| err("cannot create a stream to capture on", e))?)
                }
            };
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| err("cannot begin a capture", e))?;
            let launched = ks.iter().try_for_each(|&ki| self.launch(stream, ki, starts));
            // Ended whatever happened, so the stream leaves capture mode.
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            launched?;
            let graph = ended.map_err(|e| err("cannot instantiate a graph", e))?;
            graphs.push(Some(Graph(graph.ok_or_else(|| RunError("CUDA: a capture gave no graph".into()))?)));
        }
        Ok(graphs)
    }

    /// A library kernel (no device code) on the host, as the CPU backends run it
    /// ([`crate::host_library`]): its operands and output copied down, the output copied back.
    fn host_library(
        &self,
        k: &Kernel,
        operands: &[compiler::ir::Node],
        args: &[usize],
        out: usize,
        addrs: &[u64],
        seed: u64,
    ) -> Result<(), RunError> {
        let p = &self.program;
        let mut host: std::collections::BTreeMap<usize, Buffer> = std::collections::BTreeMap::new();
        let shapes = operands.iter().zip(args).map(|(o, b)| (*b, o.dtype, o.shape.clone()));
        let d = &p.buffers[out];
        for (b, dtype, shape) in shapes.chain([(out, d.dtype, d.shape.clone())]) {
            if let std::collections::btree_map::Entry::Vacant(v) = host.entry(b) {
                let mut buf = Buffer::zeros(dtype, shape);
                self.mem.download(buf.as_bytes_mut(), addrs[b])?;
                v.insert(buf);
            }
        }
        let mut ptrs = vec![std::ptr::null_mut(); p.buffers.len()];
        for (b, buf) in host.iter_mut() {
            ptrs[*b] = buf.as_mut_ptr();
        }
        crate::host_library(k, &ptrs, seed)?;
        self.mem.upload(addrs[out], host[&out].as_bytes())
    }

    fn collect(&self, base: u64, args: &mut [Buffer], dev_args: &[u64]) -> Result<Vec<(String, Out)>, RunError> {
        let p = &self.program;
        let addrs = self.addresses(base, dev_args);
        // Arguments updated in place come back whole.
        for (i, a) in args.iter_mut().enumerate() {
            if p.buffers.iter().any(|d| d.into == Some(p.inputs[i])) {
                // SAFETY: the argument's device copy has its size.
                unsafe { cu::memcpy_dtoh_sync(a.as_bytes_mut(), dev_args[i]) }.map_err(|e| err("copy out", e))?;
            }
        }
        let mut outs = vec![];
        for (name, b, shape) in &p.outputs {
            match output_arg(p, *b) {
                Some(i) => outs.push((name.clone(), Out::Arg(i, shape.clone()))),
                None => {
                    let mut host = Buffer::zeros(p.buffers[*b].dtype, shape.clone());
                    // SAFETY: the output buffer holds its elements at this address.
                    unsafe { cu::memcpy_dtoh_sync(host.as_bytes_mut(), addrs[*b]) }.map_err(|e| err("copy out", e))?;
                    outs.push((name.clone(), Out::Buf(host)));
                }
            }
        }
        Ok(outs)
    }

    /// Runs on tensors (converted to and from the storage format).
    pub fn run_tensors(&self, inputs: &[Tensor], seed: u64) -> Result<Vec<(String, Tensor)>, RunError> {
        crate::run_tensors_on(self, inputs, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ptxas_logs_are_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k0' for 'sm_90'\nptxas info    : Function properties for k0\n    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\nptxas info    : Used 40 registers, 2048 bytes smem, 380 bytes cmem[0]\nptxas info    : Function properties for __internal_trig_reduction_slowpathd\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Compiling entry function 'k3' for 'sm_90'\nptxas info    : Function properties for k3\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Used 12 registers, 380 bytes cmem[0]\n";
        let k = parse_ptxas(log);
        assert_eq!(
            k,
            vec![
                KernelUsage { name: "k0".into(), registers: 40, spill_bytes: 4, shared_bytes: 2048, stack_bytes: 8 },
                KernelUsage { name: "k3".into(), registers: 12, spill_bytes: 0, shared_bytes: 0, stack_bytes: 0 },
            ]
        );
    }

    #[test]
    fn occupancy_follows_the_calculator() {
        let occ = |arch, t, r, s| {
            let o = occupancy(arch, t, r, s);
            (o.blocks, o.warps, o.limit)
        };
        // Hand-computed with the occupancy calculator's rules (see `occupancy`).
        assert_eq!(occ("sm_90", 256, 32, 0), (8, 64, "threads"));
        assert_eq!(occ("sm_90", 32, 16, 0), (32, 32, "blocks"));
        // 96 registers: 3,072 per warp, 5 warps per 16,384-register sub-partition, 20 warps.
        assert_eq!(occ("sm_90", 128, 96, 0), (5, 20, "registers"));
        // 48 KiB + 1 KiB reserved per block: 4 blocks in 228 KiB, 3 in 164 KiB.
        assert_eq!(occ("sm_90", 128, 96, 48 * 1024), (4, 16, "shared"));
        assert_eq!(occ("sm_80", 128, 96, 48 * 1024), (3, 12, "shared"));
        // The opt-in strips fill a multiprocessor with one block on either.
        assert_eq!(occ("sm_80", 256, 64, codegen_cuda::OPT_IN_SHARED as u64), (1, 8, "shared"));
        assert_eq!(occ("sm_90", 256, 64, codegen_cuda::OPT_IN_SHARED as u64), (1, 8, "shared"));
        // 255 registers round to 8,192 a warp: one block of 8 warps; 32 warps cannot start.
        assert_eq!(occ("sm_90", 256, 255, 0), (1, 8, "registers"));
        assert_eq!(occ("sm_90", 1024, 255, 0).0, 0);
        // 64 registers for 1,024 threads take the whole register file.
        assert_eq!(occ("sm_90", 1024, 64, 0), (1, 32, "registers"));
        assert_eq!(occ("sm_90", 1024, 32, 0), (2, 64, "threads"));
    }

    #[test]
    fn a_kernel_no_multiprocessor_holds_is_refused() {
        let launch = |name: &str, threads: u32| codegen_cuda::Launch {
            kernel: 0,
            name: name.into(),
            kind: "loop",
            grid: [1, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
            dynamic_shared: 0,
            slots: vec![],
        };
        let unit = codegen_cuda::Unit {
            name: "f".into(),
            source: String::new(),
            launches: vec![launch("k0", 256), launch("k1", 1024), launch("k0", 256)],
        };
        let usage = |regs| {
            vec![
                KernelUsage { name: "k0".into(), registers: 40, spill_bytes: 0, shared_bytes: 0, stack_bytes: 0 },
                KernelUsage { name: "k1".into(), registers: regs, spill_bytes: 0, shared_bytes: 0, stack_bytes: 0 },
            ]
        };
        let ok = check_resources(&unit, &usage(64), "sm_90").expect("fits");
        assert_eq!(ok.iter().map(|(n, o)| (n.as_str(), o.blocks)).collect::<Vec<_>>(), vec![("k0", 6), ("k1", 1)]);
        let e = check_resources(&unit, &usage(72), "sm_90").unwrap_err();
        assert!(e.contains("kernel k1 of `f` needs 72 registers for each of its 1024 threads"), "{e}");
    }

    #[test]
    fn graphs_capture_the_device_launches_between_host_kernels() {
        let launch = |kind: &'static str| codegen_cuda::Launch {
            kernel: 0,
            name: String::new(),
            kind,
            grid: [1, 1, 1],
            block: [32, 1, 1],
            shared_bytes: 0,
            dynamic_shared: 0,
            slots: vec![],
        };
        let kinds = ["loop", "fused", "part", "part", "reduce", "host", "index", "host", "host", "mma", "matmul"];
        let launches: Vec<_> = kinds.iter().map(|k| launch(k)).collect();
        use Stretch::{Device, Host};
        assert_eq!(
            stretches(&launches),
            vec![Device(vec![0, 1, 4]), Host(5), Device(vec![6]), Host(7), Host(8), Device(vec![9, 10])]
        );
        assert_eq!(stretches(&[]), vec![]);
        assert_eq!(stretches(&[launch("host")]), vec![Host(0)]);
    }

    #[test]
    fn availability_is_reported_without_panicking() {
        match super::available() {
            Ok(()) => println!("a CUDA device is available"),
            Err(e) => {
                println!("skipped: {e}");
                assert!(e.0.starts_with("no CUDA"), "{e}");
            }
        }
    }
}
