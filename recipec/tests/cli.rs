//! The command line as users and scripts drive it: exit codes, JSON diagnostics, `fmt`,
//! `explain` and `build --emit`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn recipec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_recipec"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recipec-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn check_accepts_the_stdlib_and_examples() {
    let mut cmd = recipec();
    cmd.arg("check").current_dir(repo());
    for dir in ["stdlib", "recipes"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().map(|x| x == "recipe").unwrap_or(false) {
                cmd.arg(p);
            }
        }
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_reports_errors_with_exit_1_and_json() {
    let dir = temp_dir("json");
    let file = dir.join("bad.recipe");
    std::fs::write(&file, "fn f(h: f32[N, D], c: f32[V, D]) -> f32[N, V] {\n    h @ c\n}\n").unwrap();
    let out = recipec().args(["check", "--message-format", "json"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let d = &lines[0];
    assert_eq!(d["code"], "E0303");
    assert_eq!(d["severity"], "error");
    assert_eq!(d["line"], 2);
    assert_eq!(d["column"], 5);
    assert!(d["file"].as_str().unwrap().ends_with("bad.recipe"));
    assert!(d["message"].as_str().unwrap().contains("f32[N, D] @ f32[V, D]"));

    // The human format goes to stderr, with the code, the source line and the help.
    let out = recipec().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("E0303") && stderr.contains("h @ c") && stderr.contains("help:"), "{stderr}");
}

#[test]
fn check_of_a_missing_file_fails_cleanly() {
    let out = recipec().args(["check", "/nonexistent/x.recipe"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn sibling_imports_resolve_from_the_file_directory() {
    let dir = temp_dir("siblings");
    std::fs::write(dir.join("lib.recipe"), "pub fn twice(x: f32[N]) -> f32[N] {\n    2.0 * x\n}\n").unwrap();
    std::fs::write(dir.join("main.recipe"), "use lib.twice\n\nfn f(x: f32[N]) -> f32[N] {\n    twice(x)\n}\n").unwrap();
    let out = recipec().arg("check").arg(dir.join("main.recipe")).current_dir("/").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn fmt_rewrites_and_check_mode_reports() {
    let dir = temp_dir("fmt");
    let file = dir.join("messy.recipe");
    std::fs::write(&file, "fn f(x:f32)->f32{x*2.0 // keep me\n}\n").unwrap();
    let out = recipec().args(["fmt", "--check"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = recipec().arg("fmt").arg(&file).output().unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text, "fn f(x: f32) -> f32 {\n    x * 2.0  // keep me\n}\n");
    let out = recipec().args(["fmt", "--check"]).arg(&file).output().unwrap();
    assert!(out.status.success());
    // A file with syntax errors is left untouched.
    std::fs::write(&file, "fn f( {\n").unwrap();
    let out = recipec().arg("fmt").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "fn f( {\n");
}

#[test]
fn explain_prints_every_code() {
    for c in lang::diag::CODES {
        let out = recipec().args(["explain", c.code]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(c.title), "{}", c.code);
    }
    let out = recipec().args(["explain", "e0302"]).output().unwrap();
    assert!(out.status.success(), "codes are case-insensitive");
    let out = recipec().args(["explain", "E9999"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn build_emits_the_typed_form() {
    let out =
        recipec().args(["build", "--emit", "typed", "recipes/tiny_gpt.recipe"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("model.blocks.4.mlp.w2"), "{text}");
    assert!(text.contains("model.wte") && text.contains("f32[256, 128]"), "{text}");
    let out = recipec().args(["build", "--emit", "typed", "stdlib/loss.recipe"]).current_dir(repo()).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("let             nll              : f32[N]"), "{text}");
    let out = recipec().args(["build", "--emit", "ast", "stdlib/optim.recipe"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("Optimizer"));
}

fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) {
    let t = compiler::interp::Tensor::new(
        lang::types::Dtype::F32,
        shape.to_vec(),
        data.iter().map(|x| *x as f64).collect(),
    );
    std::fs::write(path, runtime::npy::write(&t)).unwrap();
}

fn read_npy_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + hlen..].chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn eval_runs_a_schedule_and_an_optimizer() {
    let dir = temp_dir("eval");
    let out = recipec()
        .args([
            "eval",
            "stdlib/schedule.recipe",
            "linear_warmup",
            "--hp",
            "peak=2",
            "--hp",
            "warmup=4",
            "--steps",
            "6",
            "--out",
        ])
        .arg(dir.join("s"))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_npy_f32(&dir.join("s/out.npy")), vec![0.5, 1.0, 1.5, 2.0, 2.0, 2.0]);

    write_npy_f32(&dir.join("p.npy"), &[2], &[1.0, 2.0]);
    write_npy_f32(&dir.join("g.npy"), &[2, 2], &[0.5, -1.0, 1.0, 1.0]);
    // The default backend, and the CUDA code run on the CPU by the emulator.
    let mut backends = vec!["cranelift"];
    match runtime::cuda_emu::available() {
        Ok(()) => backends.push("cuda-emu"),
        Err(e) => println!("cuda-emu skipped: {e}"),
    }
    for backend in backends {
        let o = dir.join(format!("o-{backend}"));
        let out = recipec()
            .arg("eval")
            .arg(repo().join("recipes/tiny_gpt.recipe"))
            .arg("std.optim.sgd")
            .arg(format!("--arg=param={}", dir.join("p.npy").display()))
            .arg(format!("--arg=grad={}", dir.join("g.npy").display()))
            .args(["--hp", "lr=1", "--hp", "momentum=0.5", "--steps", "2", "--backend", backend, "--out"])
            .arg(&o)
            .output()
            .unwrap();
        assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
        // buf1 = g1; p1 = p0 - g1; buf2 = 0.5 buf1 + g2; p2 = p1 - buf2.
        assert_eq!(read_npy_f32(&o.join("param.npy")), vec![1.0 - 0.5 - 1.25, 2.0 + 1.0 - 0.5], "{backend}");
        assert_eq!(read_npy_f32(&o.join("state_buf.npy")), vec![1.25, 0.5], "{backend}");
    }
}

#[test]
fn eval_rejects_bad_arguments_and_writes_nothing() {
    let dir = temp_dir("eval-bad");
    write_npy_f32(&dir.join("z.npy"), &[2, 3], &[0.0; 6]);
    write_npy_f32(&dir.join("y.npy"), &[2], &[0.0; 2]);
    let out_dir = dir.join("out");
    // `targets` must be i32.
    let out = recipec()
        .args(["eval", "stdlib/loss.recipe", "cross_entropy"])
        .arg(format!("--arg=logits={}", dir.join("z.npy").display()))
        .arg(format!("--arg=targets={}", dir.join("y.npy").display()))
        .arg("--out")
        .arg(&out_dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("E0501") && stderr.contains("targets") && stderr.contains("i32"), "{stderr}");
    assert!(!out_dir.exists(), "nothing is written on error");
    // A missing argument.
    let out = recipec()
        .args(["eval", "stdlib/loss.recipe", "cross_entropy"])
        .arg(format!("--arg=logits={}", dir.join("z.npy").display()))
        .arg("--out")
        .arg(&out_dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing argument `targets`"));
    assert!(!out_dir.exists());
    // Shapes that contradict each other name both.
    write_npy_f32(&dir.join("c.npy"), &[5, 4], &[0.0; 20]);
    let out = recipec()
        .args(["eval", "stdlib/models.recipe", "layer_norm"])
        .arg(format!("--arg=x={}", dir.join("z.npy").display()))
        .arg(format!("--arg=gain={}", dir.join("c.npy").display()))
        .arg(format!("--arg=bias={}", dir.join("c.npy").display()))
        .arg("--out")
        .arg(&out_dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gain"), "{stderr}");
    assert!(!out_dir.exists());
}

#[test]
fn passes_are_listed_and_graphs_emitted() {
    let out = recipec().arg("passes").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for p in ["canonicalize", "fold-constants", "eliminate-common-subexpressions", "eliminate-dead-code"] {
        assert!(text.contains(p), "{text}");
    }
    let dir = temp_dir("emit");
    let out = recipec()
        .args([
            "eval",
            "stdlib/schedule.recipe",
            "constant",
            "--hp",
            "value=3",
            "--emit",
            "graph,graph-after=fold-constants",
            "--time-passes",
            "--out",
        ])
        .arg(dir.join("o"))
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("graph constant {").count(), 2, "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fold-constants"));
}

#[test]
fn build_emits_graphs_and_opt_runs_one_pass() {
    let out = recipec()
        .args([
            "build",
            "stdlib/loss.recipe",
            "--item",
            "logz_penalty",
            "--shape",
            "logits=f32[2, 3]",
            "--shape",
            "targets=i32[2]",
            "--emit",
            "graph",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let graph = String::from_utf8(out.stdout).unwrap();
    assert!(graph.starts_with("graph logz_penalty {") && graph.contains("input[0, \"logits\"] : f32[2, 3]"), "{graph}");
    let dir = temp_dir("opt");
    let file = dir.join("g.ir");
    std::fs::write(&file, &graph).unwrap();
    let out = recipec().args(["opt", "eliminate-common-subexpressions"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let optimized = String::from_utf8(out.stdout).unwrap();
    assert!(optimized.lines().count() < graph.lines().count(), "CSE merges the repeated constants:\n{optimized}");
    // `--emit graph` without `--item` explains what is missing.
    let out = recipec().args(["build", "stdlib/loss.recipe", "--emit", "graph"]).current_dir(repo()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--item"));
    // A malformed graph is an error, not a panic.
    std::fs::write(&file, "graph g {\n  %0 = frobnicate : f32[]\n}\n").unwrap();
    let out = recipec().args(["opt", "canonicalize"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown op"));
}

#[test]
fn build_plans_the_recipe_training_step() {
    let out =
        recipec().args(["build", "recipes/tiny_gpt.recipe", "--emit", "plan"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("plan tiny_gpt"), "{text}");
    // ~1.04M f32 parameters plus the token batch are the arguments.
    assert!(text.contains("arguments          3.98 MiB"), "{text}");
    assert!(text.contains("models.recipe:"), "buffers are attributed to recipe lines:\n{text}");
    // Then every entry point of the job: training and sampling, with the KV caches' bytes
    // (5 layers x keys and values x [4 heads, 32, 128] f32 = 640 KiB).
    let table = text.split("entry points of recipe `tiny_gpt`").nth(1).unwrap_or_else(|| panic!("{text}"));
    for name in ["init", "grad", "eval", "update", "decode (window)", "decode (KV-cached)"] {
        assert!(table.lines().any(|l| l.trim_start().starts_with(name)), "no `{name}` line:\n{table}");
    }
    assert!(table.contains("10 KV caches, 640.0 KiB of the arguments"), "{table}");
    // Each entry point names what dominates its peak and the recipe line that made it.
    let grad = table.lines().find(|l| l.trim_start().starts_with("grad")).unwrap();
    assert!(grad.contains(" × f32[") && grad.contains("models.recipe:"), "{grad}");
}

/// `recipec build FILE` on a file with a recipe says, before anything runs, how much memory each
/// entry point of the job needs (the table of `--emit plan`), with gradient accumulation's
/// averaging among them.
#[test]
fn build_says_what_every_entry_point_needs() {
    let out = recipec().args(["build", "recipes/tiny_gpt.recipe"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("entry points of recipe `tiny_gpt`"), "{text}");
    assert!(text.contains("largest at the peak (recipe line)"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("checked recipes/tiny_gpt.recipe"));
    // Training runs its programs in one arena: the largest, here the gradient step's.
    let grad = text.lines().find(|l| l.trim_start().starts_with("grad ")).unwrap();
    let cols: Vec<&str> = grad.split_whitespace().collect();
    let arena = format!("{} {}", cols[3], cols[4]);
    assert!(text.contains(&format!("in one arena, the largest: {arena}")), "{arena}\n{text}");
    // And the whole job: that arena plus the training state (parameters, AdamW's m and v,
    // gradients: 4 x 3.96 MiB, and the batch).
    assert!(text.contains("`recipec train` needs ") && text.contains(" of training state"), "{text}");
    let dir = temp_dir("build-accumulate");
    let src = std::fs::read_to_string(repo().join("recipes/tiny_gpt.recipe")).unwrap();
    let src = src.replacen("    seed = ", "    accumulate = 3\n    seed = ", 1);
    assert!(src.contains("accumulate = 3"), "the example recipe sets a seed");
    std::fs::write(dir.join("acc.recipe"), src).unwrap();
    let out = recipec().arg("build").arg(dir.join("acc.recipe")).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for line in ["grad ", "accumulate (start)", "accumulate (add)", "accumulate (finish)"] {
        assert!(text.lines().any(|l| l.trim_start().starts_with(line)), "no `{line}`:\n{text}");
    }
    assert!(text.contains("3 times per step (micro-batches)") && text.contains("once per step"), "{text}");
    // The same job on the GPU, where it is planned differently: the output layer's logits
    // blocked (forced at this size), the classifier's gradient recomputed there, so no
    // gradient block is kept and the GPU's total is its own (and smaller).
    let out = recipec()
        .args(["build", "recipes/tiny_gpt.recipe"])
        .env("RECIPEC_BLOCK_MIN_BYTES", "0")
        .env("RECIPEC_BLOCK_COLS", "16")
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.contains("`recipec train` needs ")).unwrap();
    let mib = |s: &str| s.split_whitespace().next().unwrap().parse::<f64>().unwrap();
    let cpu = mib(line.split("needs ").nth(1).unwrap());
    let gpu = mib(line.split("`--backend cuda` ").nth(1).unwrap_or_else(|| panic!("no GPU total: {line}")));
    assert!(gpu < cpu, "{line}");
}

#[test]
fn results_are_deterministic() {
    // The same seed samples the same token; the memory plan prints the same bytes.
    let dir = temp_dir("determinism");
    write_npy_f32(&dir.join("z.npy"), &[5], &[2.0, 1.0, 0.5, -1.0, 0.0]);
    let sample = |seed: u64, out: &str| {
        let o = recipec()
            .args(["eval", "stdlib/decode.recipe", "top_p", "--hp", "p=0.95", "--seed", &seed.to_string()])
            .arg(format!("--arg=logits={}", dir.join("z.npy").display()))
            .arg("--out")
            .arg(dir.join(out))
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(dir.join(out).join("out.npy")).unwrap()
    };
    assert_eq!(sample(7, "a"), sample(7, "b"));
    let distinct: std::collections::BTreeSet<Vec<u8>> = (0..12).map(|s| sample(s, &format!("s{s}"))).collect();
    assert!(distinct.len() >= 2, "different seeds should sample different tokens");
    let plan = || {
        recipec()
            .args(["build", "recipes/sparse_gpt.recipe", "--emit", "plan"])
            .current_dir(repo())
            .output()
            .unwrap()
            .stdout
    };
    assert_eq!(plan(), plan());
}

/// `recipec build -o DIR` writes the same bytes every time; a second build replaces the
/// first only once complete; an unwritable destination fails with exit 1 and leaves nothing.
#[test]
fn build_writes_deterministic_artifacts() {
    let dir = temp_dir("artifact");
    let build = |out: &Path| {
        recipec().args(["build", "recipes/tiny_gpt.recipe", "-o"]).arg(out).current_dir(repo()).output().unwrap()
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    for d in [&a, &b, &a] {
        let out = build(d);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("tiny_gpt"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut files: Vec<String> =
        std::fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    files.sort();
    assert_eq!(files, ["manifest.json", "tiny_gpt.program.json"]);
    for f in &files {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f} differs between builds");
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "recipec-artifact");
    assert_eq!(m["entries"][0]["arguments"][0]["name"], "batch.inputs");
    // A destination inside a regular file cannot be created.
    std::fs::write(dir.join("file"), "x").unwrap();
    let out = build(&dir.join("file").join("art"));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `recipec build --target cuda`: the CUDA C of the recipe's training step with its launch
/// table and the device memory it needs; where NVRTC and `ptxas` are installed (CI), compiled and assembled with every
/// kernel's registers and spills, the files written to `-o DIR`; where not, a note says which
/// step was skipped. An unknown architecture and a foreign `-o` directory are refused.
#[test]
fn build_target_cuda_compiles_and_reports_each_kernel() {
    let dir = temp_dir("cuda-target");
    let out_dir = dir.join("cuda");
    let out = recipec()
        .args(["build", "recipes/sparse_gpt.recipe", "--target", "cuda", "--arch", "sm_80", "-o"])
        .arg(&out_dir)
        .current_dir(repo())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("cuda sparse_gpt for sm_80:"), "{stdout}");
    // The device memory the run will allocate, in the units of `--emit plan`.
    let mem = stdout.lines().find(|l| l.trim_start().starts_with("device memory: arena ")).expect("a memory line");
    assert!(mem.contains("MiB") && mem.contains("peak at k") && mem.contains("arguments"), "{mem}");
    let kernels: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            let w = l.split_whitespace().next().unwrap_or("");
            w.len() > 1 && w.starts_with('k') && w[1..].chars().all(|c| c.is_ascii_digit())
        })
        .collect();
    assert!(kernels.len() > 50, "{stdout}");
    assert!(out_dir.join("sparse_gpt.cu").exists() && out_dir.join("sparse_gpt.launches.txt").exists());
    let tools = runtime::cuda::nvrtc_available().and_then(|_| runtime::cuda::find_ptxas());
    match tools {
        Ok(_) => {
            assert!(out_dir.join("sparse_gpt.sm_80.cubin").exists(), "{stderr}");
            // Each row ends `regs spilled B stack B warps (limit) line`: the resident warps of 64
            // per multiprocessor, what limits them, and the recipe line of the kernel's value.
            for k in &kernels {
                let (head, tail) = k.split_at(k.find(" (").unwrap_or_else(|| panic!("no limit: {k}")));
                let col = |i: usize| -> u32 {
                    head.split_whitespace().rev().nth(i).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("{k}"))
                };
                assert!((1..=255).contains(&col(5)), "{k}");
                assert!(col(4) == 0 && col(2) <= 48, "spills or local memory: {k}");
                assert!((1..=64).contains(&col(0)), "{k}");
                let (limit, line) = tail.trim().split_once(' ').unwrap_or_else(|| panic!("no recipe line: {k}"));
                assert!(["(registers)", "(shared)", "(threads)", "(blocks)"].contains(&limit), "{k}");
                assert!(line.trim().contains(".recipe:") || line.trim() == "batch", "{k}");
            }
        }
        Err(why) => {
            assert!(std::env::var("RECIPEC_REQUIRE_CUDA_TOOLS").is_err(), "{why}");
            assert!(
                stderr.contains("note: CUDA C generated, not compiled") || stderr.contains("not assembled"),
                "{stderr}"
            );
        }
    }
    let bad = recipec()
        .args(["build", "recipes/sparse_gpt.recipe", "--target", "cuda", "--arch", "sm_75"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error[E0503]"));
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let foreign = recipec()
        .args(["build", "recipes/sparse_gpt.recipe", "--target", "cuda", "-o"])
        .arg(&dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(foreign.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine", "a foreign directory is left alone");
    let _ = std::fs::remove_dir_all(&dir);
}
