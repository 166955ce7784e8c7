//! CUDA C generation (`codegen-cuda`) for every stdlib item and for the example recipe's
//! training graphs: snapshots of the generated kernels, and, where NVRTC and `ptxas` are
//! installed (CI installs the PyPI wheels `nvidia-cuda-nvrtc-cu12` and
//! `nvidia-cuda-nvcc-cu12`), compilation to PTX for `compute_80` and `compute_90` and
//! assembly for `sm_80` and `sm_90` with each kernel's registers, spills and shared memory.
//! Without them the compile test prints why it skipped; with `RECIPEC_REQUIRE_CUDA_TOOLS=1`
//! (CI) it fails instead.

use lang::source::{MemoryLoader, SourceDb};
use lang::types::ItemRef;
use std::path::PathBuf;

fn loader() -> MemoryLoader {
    let mut loader = MemoryLoader::default();
    for (m, f, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), text);
    }
    loader
}

/// Every stdlib item with sample shapes, and the example recipe's training graphs, as CUDA.
fn units() -> Vec<(String, codegen_cuda::Unit)> {
    let loader = loader();
    let mut out = vec![];
    for (name, g) in tests::stdlib_graphs() {
        let p = compiler::kernel::schedule(&g).unwrap();
        let u = codegen_cuda::emit(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name, u));
    }
    let text = std::fs::read_to_string(tests::root().join("recipes/tiny_gpt.recipe")).unwrap();
    let mut db = SourceDb::new();
    let root = db.add("recipes/tiny_gpt.recipe", text);
    let analysis = lang::analyze(&mut db, &[root], &loader);
    let item = analysis.modules.list[0].items["tiny_gpt"];
    let plan = compiler::train::plan(&analysis.modules, &db, ItemRef { module: 0, item }).unwrap();
    for g in [&plan.grad, &plan.update, &plan.init] {
        let mut g = g.clone();
        compiler::passes::run_pipeline(&mut g, None, &mut vec![]).unwrap();
        let p = compiler::kernel::schedule(&g).unwrap();
        out.push((format!("tiny_gpt.{}", g.name), codegen_cuda::emit(&p).unwrap()));
    }
    out
}

/// The kernels of a unit without the shared prelude, and its launch table.
fn kernels_text(u: &codegen_cuda::Unit) -> String {
    let start = u.source.find("// entry point").unwrap_or(0);
    format!("{}\nLAUNCHES\n{}", &u.source[start..], u.launch_table())
}

#[test]
fn generated_cuda_is_snapshotted() {
    let all = units();
    assert!(all.len() >= 20, "{}", all.len());
    for (name, u) in &all {
        if name.starts_with("tiny_gpt") {
            continue; // thousands of lines; compiled below
        }
        insta::with_settings!({snapshot_path => "../cuda/snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
            insta::assert_snapshot!(name.replace('.', "_"), kernels_text(u));
        });
    }
}

/// `ptxas -v` totals: (kernels, max registers, spill bytes, max static shared bytes).
fn ptxas(
    ptx: &str,
    arch: &str,
    ptxas: &PathBuf,
    dir: &std::path::Path,
    name: &str,
) -> Result<(usize, u32, u64, u64), String> {
    let f = dir.join(format!("{name}.{arch}.ptx"));
    std::fs::write(&f, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .args([&format!("-arch={arch}"), "-v", "-o"])
        .arg(dir.join(format!("{name}.{arch}.cubin")))
        .arg(&f)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "ptxas failed; reproduce with `{} -arch={arch} -v {}`:\n{log}",
            ptxas.display(),
            f.display()
        ));
    }
    let (mut kernels, mut regs, mut spills, mut smem) = (0, 0u32, 0u64, 0u64);
    for line in log.lines() {
        let nums = |key: &str| -> Option<u64> {
            let i = line.find(key)?;
            line[..i].split_whitespace().last()?.parse().ok()
        };
        if line.contains("Used") && line.contains("registers") {
            kernels += 1;
            regs = regs.max(nums(" registers").unwrap_or(0) as u32);
            smem = smem.max(nums(" bytes smem").unwrap_or(0));
        }
        spills += nums(" bytes spill stores").unwrap_or(0);
    }
    Ok((kernels, regs, spills, smem))
}

fn nvrtc_available() -> Result<(), String> {
    for name in ["libnvrtc.so", "libnvrtc.so.12"] {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: dlopen/dlclose of a library name; nothing from it is called here.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            unsafe { libc::dlclose(h) };
            return Ok(());
        }
    }
    Err("NVRTC (libnvrtc.so.12) is not on the library path: install `nvidia-cuda-nvrtc-cu12` and add its lib directory to LD_LIBRARY_PATH".into())
}

fn find_ptxas() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("RECIPEC_PTXAS") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.exists())
        .ok_or_else(|| "ptxas is not on PATH: install `nvidia-cuda-nvcc-cu12` and add its bin directory to PATH".into())
}

#[test]
fn nvrtc_and_ptxas_compile_every_unit() {
    let tools = nvrtc_available().and_then(|_| find_ptxas());
    let ptxas_path = match tools {
        Ok(p) => p,
        Err(why) => {
            if std::env::var("RECIPEC_REQUIRE_CUDA_TOOLS").is_ok() {
                panic!("{why}");
            }
            println!("skipped: {why}");
            return;
        }
    };
    let dir = tests::root().join("target/cuda-check");
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = String::new();
    for (name, u) in units() {
        let safe = name.replace(['.', '/'], "_");
        std::fs::write(dir.join(format!("{safe}.cu")), &u.source).unwrap();
        for (virt, real) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some(virt),
                options: codegen_cuda::NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
                name: Some(format!("{safe}.cu")),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(&u.source, opts).unwrap_or_else(|e| {
                panic!(
                    "{name}: NVRTC failed for {virt}: {e:?}\nthe source is {}; reproduce with `nvcc --fmad=false -arch={virt} -ptx {}`",
                    dir.join(format!("{safe}.cu")).display(),
                    dir.join(format!("{safe}.cu")).display()
                )
            });
            let (kernels, regs, spills, smem) =
                ptxas(&ptx.to_src(), real, &ptxas_path, &dir, &safe).unwrap_or_else(|e| panic!("{name}: {e}"));
            let device_kernels = u.launches.iter().filter(|l| l.kind != "host").count();
            assert_eq!(kernels, device_kernels, "{name} {real}: ptxas reported {kernels} kernels");
            assert!(regs <= 255 && smem <= 48 * 1024, "{name} {real}: {regs} registers, {smem} B shared");
            report.push_str(&format!(
                "{name:<40} {real}: {kernels:>4} kernels, max {regs:>3} registers, {spills} B spilled, max {smem} B shared\n"
            ));
        }
    }
    std::fs::write(dir.join("summary.txt"), &report).unwrap();
    print!("{report}");
}
