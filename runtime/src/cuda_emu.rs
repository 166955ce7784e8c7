//! The CUDA emulator: a [`Program`]'s generated CUDA C (`codegen-cuda`, the exact text NVRTC
//! compiles for a GPU) compiled by the host's C++ compiler with a small CUDA shim
//! (`cuda_emu.h`) and run on the CPU. It exists to test the CUDA code generator where no GPU
//! is: indexing, grid-stride loops, the warp-shuffle reductions and the shared-memory matmul
//! tiles run as written, and the differential tests compare them with the interpreter.
//!
//! **Execution model.** Kernels launch in program order. Blocks run one after another; the
//! threads of a block are cooperative contexts switched only at barriers (`__syncthreads`
//! waits for the block's live threads, `__shfl_down_sync` for the warp's live lanes), so a
//! kernel's result does not depend on a thread schedule. Kernels without barriers run their
//! threads one after another. Grid-stride kernels (`loop`, `reduce`) are launched with at
//! most [`MAX_EMU_BLOCKS`] blocks (the loops cover the rest, as they do on a GPU with fewer
//! resident blocks); matmul grids run whole. Library kernels run on the host, as on the CPU
//! backends. What a GPU would hang on or leave undefined (threads of a block at different
//! barriers, a shuffle from an exited lane) is an error, not a hang.
//!
//! **Numerics.** The unit is compiled with `-ffp-contract=off` (NVRTC's `--fmad=false`): f32
//! and f64 operations round as on the GPU. Double-precision library functions (`log`,
//! `tanh`…) are glibc's, where the GPU uses CUDA's libdevice (within its documented ulps).
//!
//! **Cost.** Compiling a unit takes about a second (`-O1`); running is slow (a context switch
//! per barrier per thread). It is for tests at sample shapes, not for training.
//!
//! The compiler is `$RECIPEC_CXX`, else `c++`, `g++` or `clang++` from `PATH`.

use crate::device::{check_values, make_resident, DeviceMemory, HostMemory};
use crate::{
    buffer_pointers, check_args, device_outputs, host_library, host_outputs, pointers_at, Buffer, Out, RunError,
    SharedArena, Value, ValueOut,
};
use compiler::interp::Tensor;
use compiler::kernel::Program;
use std::path::PathBuf;
use std::sync::Arc;

/// The most blocks a grid-stride kernel is launched with under emulation.
pub const MAX_EMU_BLOCKS: u32 = 64;

const HEADER: &str = include_str!("cuda_emu.h");

type KernelFn = unsafe extern "C" fn(*const *mut u8);
type LaunchFn = unsafe extern "C" fn(
    KernelFn,
    *const u32,
    *const u32,
    *const *mut u8,
    i32,
    i32,
    *mut std::ffi::c_char,
    usize,
) -> i32;

/// The C++ compiler the emulator uses, or why there is none.
pub fn compiler_path() -> Result<PathBuf, RunError> {
    if let Ok(c) = std::env::var("RECIPEC_CXX") {
        let p = PathBuf::from(&c);
        return if p.is_file() { Ok(p) } else { Err(RunError(format!("RECIPEC_CXX={c} is not a file"))) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["c++", "g++", "clang++"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(RunError("no C++ compiler for the CUDA emulator (c++, g++ or clang++ on PATH, or RECIPEC_CXX)".into()))
}

/// Whether programs can be emulated here, or why not.
pub fn available() -> Result<(), RunError> {
    compiler_path().map(|_| ())
}

static UNIQUE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A program's CUDA C compiled for the CPU.
pub struct EmuExecutable {
    pub program: Program,
    pub unit: codegen_cuda::Unit,
    // Declared before `lib`: the functions point into it.
    kernels: Vec<Option<(KernelFn, bool)>>,
    launch: LaunchFn,
    _lib: libloading::Library,
    arena: SharedArena,
    /// What a run launches, in order: the stretches the GPU captures as CUDA graphs, run one
    /// launch after another here (so every emulated run checks that they hold every launch).
    stretches: Vec<crate::cuda::Stretch>,
    /// The stand-in for the GPU's memory that [`EmuExecutable::run_values`] keeps values in.
    mem: Arc<dyn DeviceMemory>,
}

/// The text of kernel `name` in the unit (for deciding whether it has barriers).
fn kernel_text<'a>(source: &'a str, name: &str) -> &'a str {
    let Some(start) = source.find(&format!(" void {name}(")) else { return "" };
    let rest = &source[start..];
    &rest[..rest.find("\n}\n").unwrap_or(rest.len())]
}

impl EmuExecutable {
    pub fn new(program: Program) -> Result<EmuExecutable, RunError> {
        Self::with_options(program, &codegen_cuda::EmitOptions::from_env())
    }

    /// [`EmuExecutable::new`] with the CUDA C emitted with `opts`.
    pub fn with_options(program: Program, opts: &codegen_cuda::EmitOptions) -> Result<EmuExecutable, RunError> {
        let cxx = compiler_path()?;
        let unit = codegen_cuda::emit_with(&program, opts).map_err(RunError)?;
        let dir = std::env::temp_dir().join(format!(
            "recipec-cuda-emu-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| RunError(format!("{}: {e}", dir.display())))?;
        let result = Self::build(&cxx, &dir, program, unit);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn build(
        cxx: &std::path::Path,
        dir: &std::path::Path,
        program: Program,
        unit: codegen_cuda::Unit,
    ) -> Result<EmuExecutable, RunError> {
        let src = dir.join(format!("{}.cpp", program.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")));
        let lib = dir.join("unit.so");
        std::fs::write(&src, format!("{HEADER}\n{}", unit.source))
            .map_err(|e| RunError(format!("{}: {e}", src.display())))?;
        let out = std::process::Command::new(cxx)
            .args(["-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-w", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .map_err(|e| RunError(format!("cannot run {}: {e}", cxx.display())))?;
        if !out.status.success() {
            let log = String::from_utf8_lossy(&out.stderr);
            let head: String = log.lines().take(20).collect::<Vec<_>>().join("\n");
            return Err(RunError(format!(
                "the CUDA C of `{}` does not compile for the emulator:\n{head}",
                program.name
            )));
        }
        // SAFETY: a library just built from generated code and the emulator's header; its
        // initializers only zero statics.
        let so = unsafe { libloading::Library::new(&lib) }
            .map_err(|e| RunError(format!("cannot load the emulated unit: {e}")))?;
        // SAFETY: the symbol is `rc_emu_launch` of cuda_emu.h, with this signature.
        let launch: LaunchFn = unsafe { so.get::<LaunchFn>(b"rc_emu_launch\0").map(|s| *s) }
            .map_err(|e| RunError(format!("rc_emu_launch: {e}")))?;
        let mut kernels = vec![];
        for l in &unit.launches {
            if !l.runs_code() {
                kernels.push(None);
                continue;
            }
            let sym = format!("{}\0", l.name);
            // SAFETY: every device kernel is `extern "C" void kN(unsigned char* const*)`.
            let f: KernelFn = unsafe { so.get::<KernelFn>(sym.as_bytes()).map(|s| *s) }
                .map_err(|e| RunError(format!("kernel {}: {e}", l.name)))?;
            let text = kernel_text(&unit.source, &l.name);
            let barriers = text.contains("__syncthreads") || text.contains("__shfl");
            kernels.push(Some((f, barriers)));
        }
        let arena = SharedArena::default();
        let mem: Arc<dyn DeviceMemory> = Arc::new(HostMemory::default());
        let stretches = crate::cuda::stretches(&unit.launches);
        Ok(EmuExecutable { program, unit, kernels, launch, _lib: so, arena, stretches, mem })
    }

    /// Runs on host buffers, like [`crate::Executable::run`].
    pub fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        self.run_in_order(args, seed, false)
    }

    /// [`EmuExecutable::run`] with every launch's blocks in the reverse order (and, in kernels
    /// without barriers, each block's threads too). On a GPU blocks run in no fixed order, so
    /// a correct program gives the same bits both ways; a difference is a race between blocks
    /// (two writing one element, or one reading what another writes), which running blocks
    /// one at a time would otherwise hide.
    pub fn run_reversed(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        self.run_in_order(args, seed, true)
    }

    /// [`EmuExecutable::run_reversed`] on tensors.
    pub fn run_tensors_reversed(&self, inputs: &[Tensor], seed: u64) -> Result<Vec<(String, Tensor)>, RunError> {
        crate::run_tensors_on(&Reversed(self), inputs, seed)
    }

    fn run_in_order(&self, args: &mut [Buffer], seed: u64, reversed: bool) -> Result<Vec<(String, Out)>, RunError> {
        let p = &self.program;
        check_args(p, args)?;
        let mut arena = self.arena.hold(self.program.arena_bytes);
        let ptrs = buffer_pointers(p, args, arena.ptr());
        let ptrs = self.launch_all(ptrs, seed, reversed)?;
        Ok(host_outputs(p, &ptrs))
    }

    /// Runs on values kept in the emulated device memory, as [`crate::cuda::CudaExecutable`]
    /// keeps them on the GPU: host arguments are uploaded (and stay), outputs stay.
    pub fn run_values(&self, args: &mut [Value], seed: u64) -> Result<Vec<(String, ValueOut)>, RunError> {
        let p = &self.program;
        check_values(p, args)?;
        let at: Vec<*mut u8> = make_resident(&self.mem, args)?.into_iter().map(|a| a as *mut u8).collect();
        let mut arena = self.arena.hold(self.program.arena_bytes);
        let ptrs = pointers_at(p, &at, arena.ptr());
        let ptrs = self.launch_all(ptrs, seed, false)?;
        let addrs: Vec<u64> = ptrs.iter().map(|&a| a as u64).collect();
        device_outputs(p, &addrs, &self.mem)
    }

    /// Runs in `arena` from now on, with the other programs that share it (never at once).
    pub fn share_arena(&mut self, arena: &SharedArena) {
        self.arena = arena.clone();
    }

    /// The emulated device memory of [`EmuExecutable::run_values`].
    pub fn memory(&self) -> &Arc<dyn DeviceMemory> {
        &self.mem
    }

    /// Runs every kernel on the buffers at `ptrs`. The caller holds the arena's lock, which
    /// also makes it one run at a time: the emulator's scheduler state is the unit's statics.
    fn launch_all(&self, mut ptrs: Vec<*mut u8>, seed: u64, reversed: bool) -> Result<Vec<*mut u8>, RunError> {
        let p = &self.program;
        // The word after the last address is the run's seed (the RNG kernels read it).
        ptrs.push(seed as usize as *mut u8);
        // Then a zero word: kernels' constants are offsets from it (`Launch::slots`).
        ptrs.push(std::ptr::null_mut());
        for s in &self.stretches {
            let ks = match s {
                crate::cuda::Stretch::Host(ki) => {
                    host_library(&p.kernels[*ki], &ptrs, seed)?;
                    continue;
                }
                crate::cuda::Stretch::Device(ks) => ks,
            };
            for &ki in ks {
                let Some((f, barriers)) = self.kernels[ki] else { unreachable!("device kernels have functions") };
                let l = &self.unit.launches[ki];
                // The kernel's own table: program words (addresses, the seed) plus offsets.
                let table: Vec<*mut u8> = l.slots.iter().map(|(w, o)| ptrs[*w].wrapping_offset(*o as isize)).collect();
                let mut grid = l.grid;
                // Tile kernels need their whole grid; grid-stride loops take any.
                if !matches!(l.kind, "matmul" | "mma") {
                    grid[0] = grid[0].min(MAX_EMU_BLOCKS);
                }
                let mut msg = vec![0 as std::ffi::c_char; 512];
                // SAFETY: the kernel reads and writes the planned buffers in `ptrs` (the
                // same addresses the CPU backends use); the launcher returns when done.
                let rc = unsafe {
                    (self.launch)(
                        f,
                        grid.as_ptr(),
                        l.block.as_ptr(),
                        table.as_ptr(),
                        barriers as i32,
                        reversed as i32,
                        msg.as_mut_ptr(),
                        msg.len(),
                    )
                };
                if rc != 0 {
                    // SAFETY: the launcher wrote a NUL-terminated message into `msg`.
                    let text = unsafe { std::ffi::CStr::from_ptr(msg.as_ptr()) }.to_string_lossy().into_owned();
                    return Err(RunError(format!("emulated CUDA kernel {} of `{}`: {text}", l.name, p.name)));
                }
            }
        }
        Ok(ptrs)
    }

    /// Runs on tensors (converted to and from the storage format).
    pub fn run_tensors(&self, inputs: &[Tensor], seed: u64) -> Result<Vec<(String, Tensor)>, RunError> {
        crate::run_tensors_on(self, inputs, seed)
    }
}

/// An emulated program run with its blocks reversed ([`EmuExecutable::run_reversed`]).
struct Reversed<'a>(&'a EmuExecutable);

impl crate::Runner for Reversed<'_> {
    fn program(&self) -> &Program {
        &self.0.program
    }
    fn run(&self, args: &mut [Buffer], seed: u64) -> Result<Vec<(String, Out)>, RunError> {
        self.0.run_reversed(args, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use compiler::ir::{Graph, Op, Red, Un};
    use lang::types::Dtype;

    fn graph() -> Graph {
        let mut g = Graph::new("t");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![37, 70], &[], "x").unwrap();
        let w = g.add(Op::Input { index: 1, name: "w".into() }, Dtype::F32, vec![70, 19], &[], "w").unwrap();
        let e = g.add(Op::Unary(Un::Exp), Dtype::F32, vec![37, 70], &[x], "e").unwrap();
        let m = g.add(Op::MatMul, Dtype::F32, vec![37, 19], &[e, w], "m").unwrap();
        let s = g.add(Op::Reduce { op: Red::Sum, axes: vec![1] }, Dtype::F32, vec![37], &[e], "s").unwrap();
        let mx = g.add(Op::Reduce { op: Red::Max, axes: vec![0] }, Dtype::F32, vec![19], &[m], "mx").unwrap();
        g.outputs.push(("m".into(), m));
        g.outputs.push(("s".into(), s));
        g.outputs.push(("mx".into(), mx));
        // Register-tiled matmuls (both sides ≥ 64): partial 64×64 tiles, a batch, a
        // transposed operand (a strided view), and a k that is not a multiple of 16.
        let a = g.add(Op::Input { index: 2, name: "a".into() }, Dtype::F32, vec![3, 70, 33], &[], "a").unwrap();
        let b = g.add(Op::Input { index: 3, name: "b".into() }, Dtype::F32, vec![33, 130], &[], "b").unwrap();
        let b3 = g.add(Op::Broadcast, Dtype::F32, vec![3, 33, 130], &[b], "b3").unwrap();
        let ab = g.add(Op::MatMul, Dtype::F32, vec![3, 70, 130], &[a, b3], "ab").unwrap();
        let bt = g.add(Op::Transpose { perm: vec![1, 0] }, Dtype::F32, vec![130, 33], &[b], "bt").unwrap();
        let a0 = g.add(Op::Slice { axis: 0, start: 1 }, Dtype::F32, vec![1, 70, 33], &[a], "a0").unwrap();
        let a0 = g.add(Op::Reshape, Dtype::F32, vec![70, 33], &[a0], "a0").unwrap();
        let a0t = g.add(Op::Transpose { perm: vec![1, 0] }, Dtype::F32, vec![33, 70], &[a0], "a0t").unwrap();
        let btat = g.add(Op::MatMul, Dtype::F32, vec![130, 70], &[bt, a0t], "btat").unwrap();
        g.outputs.push(("ab".into(), ab));
        g.outputs.push(("btat".into(), btat));
        g
    }

    /// A loop, a warp-per-row reduction (70 ≥ 32), a short reduction, a 16×16-tiled matmul
    /// and register-tiled ones (awkward sizes: partial tiles, partial warps of work, a batch,
    /// transposed views) against the interpreter.
    #[test]
    fn emulated_kernels_match_the_interpreter() {
        if let Err(e) = available() {
            println!("skipped: {e}");
            return;
        }
        let g = graph();
        let p = compiler::kernel::schedule(&g).unwrap();
        let exe = EmuExecutable::new(p).unwrap();
        let kinds: Vec<&str> = exe.unit.launches.iter().map(|l| l.kind).collect();
        assert!(kinds.contains(&"matmul") && kinds.contains(&"reduce") && kinds.contains(&"loop"), "{kinds:?}");
        let big = format!("__shared__ float As[16][{} + 1];", codegen_cuda::BIG_TILE);
        assert!(exe.unit.source.matches(&big).count() >= 2, "{}", exe.unit.launch_table());
        let ins: Vec<Tensor> = g
            .inputs
            .iter()
            .map(|id| {
                let n = g.node(*id);
                let numel: usize = n.shape.iter().product();
                Tensor::new(
                    n.dtype,
                    n.shape.clone(),
                    (0..numel).map(|i| ((i * 37 % 101) as f64 - 50.0) / 40.0).collect(),
                )
            })
            .collect();
        let want = compiler::interp::run(&g, &ins, 1).unwrap();
        for (name, t) in exe.run_tensors(&ins, 1).unwrap() {
            let w = &want[&name];
            assert_eq!(t.shape, w.shape);
            for (i, (a, b)) in t.data.iter().zip(&w.data).enumerate() {
                assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{name}[{i}]: emulated {a}, interpreter {b}");
            }
        }
    }

    /// A kernel whose lanes leave before a shuffle is reported, not hung on or read garbage.
    #[test]
    fn emulated_misuse_is_an_error_and_a_race_shows_in_reverse_block_order() {
        let Ok(cxx) = compiler_path() else {
            println!("skipped: no C++ compiler");
            return;
        };
        let dir = std::env::temp_dir().join(format!("recipec-cuda-emu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("bad.cpp");
        std::fs::write(
            &src,
            format!(
                "{HEADER}\nextern \"C\" __global__ void bad(unsigned char* const* bufs) {{\n    if ((threadIdx.x & 31) >= 16) return;\n    float v = __shfl_down_sync(0xffffffffu, 1.0f, 8);\n    ((float*)bufs[0])[threadIdx.x] = v;\n}}\nextern \"C\" __global__ void split(unsigned char* const* bufs) {{\n    if (threadIdx.x < 16) __syncthreads(); else (void)__shfl_down_sync(0xffffffffu, 1.0f, 1);\n}}\nextern \"C\" __global__ void racy(unsigned char* const* bufs) {{\n    if (threadIdx.x == 0) ((float*)bufs[0])[0] = (float)blockIdx.x;\n    ((float*)bufs[0])[1] = (float)threadIdx.x;\n}}\n"
            ),
        )
        .unwrap();
        let lib = dir.join("bad.so");
        let st = std::process::Command::new(&cxx)
            .args(["-O1", "-shared", "-fPIC", "-w", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        let so = unsafe { libloading::Library::new(&lib) }.unwrap();
        let launch: LaunchFn = unsafe { *so.get::<LaunchFn>(b"rc_emu_launch\0").unwrap() };
        let mut out = vec![0f32; 64];
        let ptrs = [out.as_mut_ptr() as *mut u8];
        let run = |name: &[u8]| {
            let f: KernelFn = unsafe { *so.get::<KernelFn>(name).unwrap() };
            let mut msg = vec![0 as std::ffi::c_char; 512];
            let rc = unsafe {
                launch(f, [1u32, 1, 1].as_ptr(), [64u32, 1, 1].as_ptr(), ptrs.as_ptr(), 1, 0, msg.as_mut_ptr(), 512)
            };
            (rc, unsafe { std::ffi::CStr::from_ptr(msg.as_ptr()) }.to_string_lossy().into_owned())
        };
        let (rc, msg) = run(b"bad\0");
        assert_eq!(rc, -1);
        assert!(msg.contains("reads a lane that has exited"), "{msg}");
        let (rc, msg) = run(b"split\0");
        assert_eq!(rc, -1);
        assert!(msg.contains("wait at different barriers"), "{msg}");
        // A race: every block writes element 0, every thread element 1 (no barriers). The
        // last writer differs when blocks and threads run in reverse.
        let racy = |reverse: i32| {
            let f: KernelFn = unsafe { *so.get::<KernelFn>(b"racy\0").unwrap() };
            let mut msg = vec![0 as std::ffi::c_char; 512];
            let rc = unsafe {
                launch(
                    f,
                    [4u32, 1, 1].as_ptr(),
                    [8u32, 1, 1].as_ptr(),
                    ptrs.as_ptr(),
                    0,
                    reverse,
                    msg.as_mut_ptr(),
                    512,
                )
            };
            assert_eq!(rc, 0);
            // SAFETY: the kernel has returned; `out` is not borrowed elsewhere.
            unsafe { (*ptrs[0].cast::<f32>(), *ptrs[0].cast::<f32>().add(1)) }
        };
        assert_eq!(racy(0), (3.0, 7.0));
        assert_eq!(racy(1), (0.0, 0.0));
        drop(so);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
