//! `recipec eval`: run one item on the reference interpreter with arguments from `.npy`
//! files. The contract (documented in the README) is relied on by users' scripts.

use crate::{load, loader, render};
use compiler::interp::{self, Tensor};
use compiler::ir::{Graph, Op};
use compiler::lower::Arg;
use lang::ast::{FnKind, ItemKind, RuleKind};
use lang::types::Dtype;
use runtime::npy;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

pub struct Request {
    pub file: PathBuf,
    pub item: String,
    pub args: Vec<String>,
    pub hps: Vec<String>,
    pub grad: bool,
    pub steps: Option<usize>,
    pub seed: u64,
    pub backend: String,
    pub emit: Vec<String>,
    pub time_passes: bool,
    pub out: PathBuf,
    /// `NAME=DTYPE[d1, d2]`: an argument given by shape only (zeros), for `build --emit`.
    pub shapes: Vec<String>,
    /// Lower and print, do not run or write (`recipec build --emit graph`).
    pub dry: bool,
    /// `recipec build -o DIR`: write the entry point's artifact there.
    pub artifact: Option<PathBuf>,
}

/// Parses `f32[4, 7]` (or `i32[]`, `f32`).
fn parse_shape(spec: &str) -> Option<(Dtype, Vec<usize>)> {
    let (d, rest) = match spec.split_once('[') {
        Some((d, r)) => (d, r.strip_suffix(']')?),
        None => (spec, ""),
    };
    let dtype = Dtype::parse(d.trim())?;
    let dims = rest
        .split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some((dtype, dims))
}

/// An evaluation error: a code (documented by `recipec explain`) and a message.
struct Fail(&'static str, String);

fn fail<T>(code: &'static str, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(code, msg.into()))
}

pub fn eval(req: Request) -> ExitCode {
    match run(&req) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            if code == "E0000" {
                // Diagnostics were already rendered.
                return ExitCode::from(1);
            }
            eprintln!("error[{code}]: {msg}");
            if let Some(doc) = lang::diag::code_doc(code) {
                eprintln!("  = help: {} (see `recipec explain {code}`)", doc.fix.trim());
            }
            ExitCode::from(1)
        }
    }
}

fn describe(t: &Tensor) -> String {
    format!("{}{:?}", t.dtype, t.shape)
}

fn run(req: &Request) -> Result<(), Fail> {
    if !BACKENDS.contains(&req.backend.as_str()) {
        return fail("E0501", format!("unknown backend `{}`; the backends are {}", req.backend, BACKENDS.join(", ")));
    }
    let (mut db, mut roots, ok) = load(std::slice::from_ref(&req.file));
    if !ok {
        return fail("E0000", "");
    }
    // A dotted item (`std.loss.cross_entropy`) is imported by a synthetic root module.
    let dotted = req.item.contains('.');
    if dotted {
        let from = req.file.display().to_string();
        let dir = std::path::Path::new(&from).parent().map(|p| p.display().to_string()).unwrap_or_default();
        let name = if dir.is_empty() { "<eval>".to_string() } else { format!("{dir}/<eval>") };
        roots.push(db.add(name, format!("use {}\n", req.item)));
    }
    let analysis = lang::analyze(&mut db, &roots, &loader::FsLoader);
    let color = crate::color();
    let mut errors = false;
    for d in &analysis.diagnostics {
        // The synthetic import is never "unused".
        if d.code == "W0002" && dotted {
            continue;
        }
        errors |= d.is_error();
        eprint!("{}", render::render(&db, d, color));
    }
    if errors {
        return fail("E0000", "");
    }
    let (module, name) = if dotted {
        (
            analysis.modules.list.iter().position(|m| Some(m.file) == roots.last().copied()).unwrap_or(0),
            req.item.rsplit('.').next().unwrap_or(""),
        )
    } else {
        (0, req.item.as_str())
    };
    let Some(r) = analysis.modules.find_item(module, name) else {
        let names: Vec<String> = analysis.modules.list[0].items.keys().cloned().collect();
        return fail("E0501", format!("`{}` has no item `{name}` (items: {})", req.file.display(), names.join(", ")));
    };
    // Arguments.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for a in &req.args {
        let Some((n, path)) = a.split_once('=') else {
            return fail("E0501", format!("`--arg {a}`: expected NAME=PATH.npy"));
        };
        let bytes =
            std::fs::read(path).map_err(|e| Fail("E0501", format!("argument `{n}`: cannot read {path}: {e}")))?;
        let t = npy::parse(&bytes).map_err(|e| Fail("E0501", format!("argument `{n}`: {path}: {e}")))?;
        tensors.insert(n.to_string(), t);
    }
    for a in &req.shapes {
        let Some((n, spec)) = a.split_once('=') else {
            return fail("E0501", format!("`--shape {a}`: expected NAME=DTYPE[dims], e.g. logits=f32[4, 7]"));
        };
        let Some((dtype, shape)) = parse_shape(spec) else {
            return fail("E0501", format!("`--shape {a}`: `{spec}` is not a type such as f32[4, 7]"));
        };
        // `build` only needs the type: no data (a Gemma-sized classifier would be gigabytes).
        let data = if req.dry { vec![] } else { vec![0.0; shape.iter().product()] };
        tensors.insert(n.to_string(), Tensor { dtype, shape, data });
    }
    let mut scalars: Vec<(String, Arg)> = vec![];
    for h in &req.hps {
        let Some((n, v)) = h.split_once('=') else { return fail("E0501", format!("`--hp {h}`: expected NAME=VALUE")) };
        let arg = match v.parse::<f64>() {
            Ok(x) => Arg::Scalar(x),
            Err(_) => match v {
                "true" => Arg::Scalar(1.0),
                "false" => Arg::Scalar(0.0),
                s => Arg::Str(s.to_string()),
            },
        };
        scalars.push((n.to_string(), arg));
    }
    let modules = &analysis.modules;
    let item = modules.item(r);
    let lower_err = |e: compiler::lower::LowerError| {
        let at = e.at.map(|(f, s)| {
            let file = db.file(f);
            let (l, c) = file.line_col(s.start);
            format!(" ({}:{l}:{c})", file.name)
        });
        Fail(if e.input { "E0501" } else { "E0502" }, format!("{}{}", e.message, at.unwrap_or_default()))
    };
    let mut outputs: Vec<(String, Tensor)> = vec![];
    match &item.kind {
        ItemKind::Fn(f) if f.kind == FnKind::Schedule => {
            let g = compiler::entry::schedule(modules, &db, r, &scalars).map_err(lower_err)?;
            let g = prepare(g, req)?;
            if req.dry {
                return Ok(());
            }
            let n = req.steps.unwrap_or(1);
            let mut values = vec![];
            for step in 1..=n {
                let out = run_graph(&g, &[Tensor::scalar(Dtype::I32, step as f64)], req.seed, &req.backend)?;
                values.push(out["out"].data[0]);
            }
            outputs.push(("out".into(), Tensor::new(Dtype::F32, vec![n], values)));
        }
        ItemKind::Fn(f) => {
            let mut args: Vec<(String, Arg)> = vec![];
            let mut inputs = vec![];
            for p in &f.params {
                if let Some(t) = tensors.remove(&p.name.name) {
                    args.push((p.name.name.clone(), Arg::Tensor(t.dtype, t.shape.clone())));
                    inputs.push(t);
                }
            }
            if let Some(extra) = tensors.keys().next() {
                return fail("E0501", format!("`{name}` has no parameter `{extra}`"));
            }
            args.extend(scalars.iter().cloned());
            let g = compiler::entry::function(modules, &db, r, &args, req.grad).map_err(lower_err)?;
            let g = prepare(g, req)?;
            if req.dry {
                return Ok(());
            }
            let out = run_graph(&g, &inputs, req.seed, &req.backend)?;
            let mut names: Vec<&String> = out.keys().collect();
            names.sort();
            for n in names {
                outputs.push((n.clone(), out[n].clone()));
            }
        }
        ItemKind::Rule(rule) => {
            let Some(param) = tensors.remove("param") else {
                return fail("E0501", format!("{} `{name}` needs `--arg param=PATH.npy`", rule.kind.keyword()));
            };
            let grad = tensors.remove("grad");
            if let Some(extra) = tensors.keys().next() {
                return fail(
                    "E0501",
                    format!(
                        "`{name}` takes tensors `param` and `grad` only, not `{extra}` (hyperparameters go in `--hp`)"
                    ),
                );
            }
            if !param.dtype.is_float() {
                return fail("E0501", format!("argument `param` must be floating point, got {}", describe(&param)));
            }
            let k = req.steps.unwrap_or(1).max(1);
            // grad: the parameter's shape, or a leading axis of length K (one per step).
            let grad_at = |step: usize| -> Result<Tensor, Fail> {
                match &grad {
                    None => Ok(Tensor::new(param.dtype, param.shape.clone(), vec![0.0; param.numel()])),
                    Some(g) if g.shape == param.shape => Ok(g.clone()),
                    Some(g)
                        if g.shape.len() == param.shape.len() + 1
                            && g.shape[0] == k
                            && g.shape[1..] == param.shape[..] =>
                    {
                        let n = param.numel();
                        Ok(Tensor::new(g.dtype, param.shape.clone(), g.data[(step - 1) * n..step * n].to_vec()))
                    }
                    Some(g) => fail(
                        "E0501",
                        format!(
                            "argument `grad` must have shape {:?} (or [{k}, ...] with --steps {k}), got {:?}",
                            param.shape, g.shape
                        ),
                    ),
                }
            };
            match rule.kind {
                RuleKind::Optimizer => {
                    let g = compiler::entry::optimizer(modules, &db, r, (param.dtype, param.shape.clone()), &scalars)
                        .map_err(lower_err)?;
                    let g = prepare(g, req)?;
                    if req.dry {
                        return Ok(());
                    }
                    let state_inputs: Vec<(String, Dtype, Vec<usize>)> = g
                        .inputs
                        .iter()
                        .filter_map(|i| match &g.node(*i).op {
                            Op::Input { name, .. } if name.starts_with("state_") => {
                                Some((name.clone(), g.node(*i).dtype, g.node(*i).shape.clone()))
                            }
                            _ => None,
                        })
                        .collect();
                    let mut p = param.clone();
                    let mut states: Vec<Tensor> = state_inputs
                        .iter()
                        .map(|(_, d, s)| Tensor::new(*d, s.clone(), vec![0.0; s.iter().product()]))
                        .collect();
                    for step in 1..=k {
                        let mut inputs = vec![
                            p.clone(),
                            Tensor { dtype: param.dtype, ..grad_at(step)? },
                            Tensor::scalar(Dtype::I32, step as f64),
                        ];
                        inputs.extend(states.iter().cloned());
                        let seed = runtime::train::step_seed(req.seed, step);
                        let out = run_graph(&g, &inputs, seed, &req.backend)?;
                        p = out["param"].clone();
                        states = state_inputs.iter().map(|(n, _, _)| out[n].clone()).collect();
                    }
                    outputs.push(("param".into(), p));
                    for ((n, _, _), t) in state_inputs.iter().zip(states) {
                        outputs.push((n.clone(), t));
                    }
                }
                RuleKind::Sparsity => {
                    let g = compiler::entry::sparsity(modules, &db, r, (param.dtype, param.shape.clone()), &scalars)
                        .map_err(lower_err)?;
                    let g = prepare(g, req)?;
                    if req.dry {
                        return Ok(());
                    }
                    let mut mask = Tensor::new(param.dtype, param.shape.clone(), vec![1.0; param.numel()]);
                    let mut last = HashMap::new();
                    for step in 1..=k {
                        let inputs = vec![
                            param.clone(),
                            Tensor { dtype: param.dtype, ..grad_at(step)? },
                            Tensor::scalar(Dtype::I32, step as f64),
                            mask.clone(),
                        ];
                        last = run_graph(&g, &inputs, runtime::train::step_seed(req.seed, step), &req.backend)?;
                        mask = last["mask"].clone();
                    }
                    outputs.push(("mask".into(), mask));
                    if grad.is_some() {
                        outputs.push(("grad".into(), last["grad"].clone()));
                    }
                }
            }
        }
        ItemKind::Recipe(_) if req.dry => {
            let g = compiler::entry::recipe_step(modules, &db, r).map_err(lower_err)?;
            prepare(g, req)?;
            return Ok(());
        }
        _ => {
            return fail(
                "E0501",
                format!(
                    "`{name}` is a {}; `recipec eval` runs fn, loss, schedule, optimizer, sparsity and decode items",
                    item.kind_name()
                ),
            );
        }
    }
    // Everything is computed: only now write, so an error leaves nothing behind.
    std::fs::create_dir_all(&req.out)
        .map_err(|e| Fail("E0501", format!("cannot create {}: {e}", req.out.display())))?;
    for (n, t) in &outputs {
        let path = req.out.join(format!("{n}.npy"));
        let tmp = req.out.join(format!(".{n}.npy.tmp"));
        std::fs::write(&tmp, npy::write(t))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Fail("E0501", format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Runs the pass pipeline (printing graphs and timings when asked).
fn prepare(mut g: Graph, req: &Request) -> Result<Graph, Fail> {
    if req.emit.iter().any(|e| e == "graph") {
        print!("{g}");
    }
    let after = req.emit.iter().find_map(|e| e.strip_prefix("graph-after="));
    if let Some(a) = after {
        if !compiler::passes::PIPELINE.iter().any(|p| p.name == a) {
            return fail("E0501", format!("no pass `{a}`; `recipec passes` lists them"));
        }
    }
    let mut timings = vec![];
    if req.dry
        && after.is_none()
        && !req.time_passes
        && req.artifact.is_none()
        && !req.emit.iter().any(|e| e == "plan" || e == "kernels" || e == "cuda" || e.starts_with("cuda-target="))
    {
        return Ok(g);
    }
    // The CUDA backends and `--target cuda` compile for the GPU.
    let cuda = matches!(req.backend.as_str(), "cuda" | "cuda-emu")
        || req.emit.iter().any(|e| e == "cuda" || e.starts_with("cuda-target="));
    let target = if cuda { compiler::passes::Target::Cuda } else { compiler::passes::Target::Cpu };
    compiler::passes::run_pipeline_for(&mut g, after, &mut timings, target).map_err(|e| Fail("E0502", e.0))?;
    if after.is_some() {
        print!("{g}");
    }
    if req.emit.iter().any(|e| e == "plan") {
        let p = compiler::kernel::schedule(&g).map_err(|e| Fail("E0502", format!("this is a bug in recipec: {e}")))?;
        p.verify().map_err(|e| Fail("E0502", format!("this is a bug in recipec: invalid memory plan: {e}")))?;
        print!("{}", p.report());
    }
    if req.emit.iter().any(|e| e == "kernels") {
        let p = compiler::kernel::schedule(&g).map_err(|e| Fail("E0502", format!("this is a bug in recipec: {e}")))?;
        p.verify().map_err(|e| Fail("E0502", format!("this is a bug in recipec: invalid memory plan: {e}")))?;
        print!("{}", p.text());
    }
    if req.emit.iter().any(|e| e == "cuda") {
        let p = compiler::kernel::schedule(&g).map_err(|e| Fail("E0502", format!("this is a bug in recipec: {e}")))?;
        let u = codegen_cuda::emit(&p).map_err(|e| Fail("E0502", format!("no CUDA form yet: {e}")))?;
        print!("{}", u.source);
        println!("// launches (kernel, kind, name, grid, block, shared memory):");
        for line in u.launch_table().lines() {
            println!("//   {line}");
        }
    }
    let cuda_target = req.emit.iter().find_map(|e| e.strip_prefix("cuda-target="));
    if let Some(arch) = cuda_target {
        build_cuda(&g, arch, req.artifact.as_deref())?;
    }
    if let (Some(dir), None) = (&req.artifact, cuda_target) {
        let started = std::time::Instant::now();
        let p = compiler::kernel::schedule(&g).map_err(|e| Fail("E0502", format!("this is a bug in recipec: {e}")))?;
        p.verify().map_err(|e| Fail("E0502", format!("this is a bug in recipec: invalid memory plan: {e}")))?;
        // Generate the code once now, so a build fails here rather than when it is loaded.
        runtime::Executable::new(p.clone(), runtime::Backend::Cranelift)
            .map_err(|e| Fail("E0502", format!("this is a bug in recipec: code generation failed: {e}")))?;
        let source = req.file.display().to_string();
        runtime::artifact::write(dir, &source, std::slice::from_ref(&p)).map_err(|e| Fail("E0501", e.0))?;
        timings.push(("schedule + code generation + write", started.elapsed()));
        eprintln!(
            "wrote {} (`{}`: {} kernels, arena {})",
            dir.display(),
            p.name,
            p.kernels.len(),
            compiler::plan::human(p.arena_bytes)
        );
    }
    if req.time_passes {
        for (n, t) in &timings {
            eprintln!("{n:<34} {:>8.3} ms", t.as_secs_f64() * 1e3);
        }
    }
    Ok(g)
}

/// `recipec build --target cuda`: the CUDA C of the entry point, checked against the launch
/// limits, compiled by NVRTC and assembled by `ptxas` for `arch` where those are installed (a
/// note says which step was skipped and why), with each kernel's launch shape and resources;
/// with `-o DIR`, the `.cu`, launch table, `.ptx` and `.cubin` are written there (into a
/// temporary directory first, renamed into place once complete).
fn build_cuda(g: &Graph, arch: &str, out: Option<&std::path::Path>) -> Result<(), Fail> {
    let virt = match arch {
        "sm_80" => "compute_80",
        "sm_90" => "compute_90",
        other => return fail("E0503", format!("unknown CUDA architecture `{other}`: recipec targets sm_80 and sm_90")),
    };
    let p = compiler::kernel::schedule(g).map_err(|e| Fail("E0502", format!("this is a bug in recipec: {e}")))?;
    let u = codegen_cuda::emit(&p).map_err(|e| Fail("E0502", format!("no CUDA form yet: {e}")))?;
    runtime::cuda::check_launches(&u).map_err(|e| Fail("E0503", e))?;
    let work = match out {
        Some(dir) => {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
        }
        None => std::env::temp_dir().join(format!("recipec-cuda-{}", std::process::id())),
    };
    if let Some(dir) = out {
        let ours = dir.join("cuda-build.txt").exists();
        let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true);
        if dir.exists() && !ours && !empty {
            return fail(
                "E0501",
                format!(
                    "{} exists and is not a `recipec build --target cuda` output; choose another -o",
                    dir.display()
                ),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let io = |e: std::io::Error| Fail("E0501", format!("cannot write {}: {e}", work.display()));
    std::fs::create_dir_all(&work).map_err(io)?;
    let result = (|| -> Result<(), Fail> {
        std::fs::write(work.join("cuda-build.txt"), format!("recipec build --target cuda --arch {arch}: {}\n", u.name))
            .map_err(io)?;
        std::fs::write(work.join(format!("{}.cu", u.name)), &u.source).map_err(io)?;
        std::fs::write(work.join(format!("{}.launches.txt", u.name)), u.launch_table()).map_err(io)?;
        let usage = match runtime::cuda::compile_ptx(&u.source, &u.name, virt) {
            Ok(ptx) => match runtime::cuda::find_ptxas() {
                // `assemble` keeps the PTX beside the cubin.
                Ok(ptxas) => {
                    Some(runtime::cuda::assemble(&ptx, arch, &ptxas, &work, &u.name).map_err(|e| Fail("E0503", e.0))?)
                }
                Err(why) => {
                    std::fs::write(work.join(format!("{}.{virt}.ptx", u.name)), &ptx).map_err(io)?;
                    eprintln!("note: PTX generated, not assembled: {why}");
                    None
                }
            },
            Err(e) if runtime::cuda::nvrtc_available().is_err() => {
                eprintln!("note: CUDA C generated, not compiled: {e}");
                None
            }
            Err(e) => return Err(Fail("E0503", e.0)),
        };
        // Resident warps per multiprocessor, and a kernel no multiprocessor could hold refused.
        let occupancy = match &usage {
            Some(usage) => runtime::cuda::check_resources(&u, usage, arch).map_err(|e| Fail("E0503", e))?,
            None => vec![],
        };
        let parts = u.launches.iter().filter(|l| l.kind == "part").count();
        println!(
            "cuda {} for {arch}: {} launches{}",
            u.name,
            u.launches.len() - parts,
            if parts > 0 {
                format!(
                    " ({} row-fused kernels run {parts} loops with their matmuls; their products are never stored)",
                    u.launches.iter().filter(|l| l.kind == "fused").count()
                )
            } else {
                String::new()
            }
        );
        // What the GPU path allocates: one arena for the plan, plus the arguments.
        println!(
            "  device memory: arena {} (one allocation; peak at k{}), arguments {}; `--emit plan` lists the buffers live at the peak by recipe line",
            compiler::plan::human(p.arena_bytes),
            p.peak_at,
            compiler::plan::human(p.argument_bytes)
        );
        let functions: std::collections::BTreeSet<&str> =
            u.launches.iter().filter(|l| l.runs_code()).map(|l| l.name.as_str()).collect();
        println!("  {} device functions (launches of the same code with other buffers share one)", functions.len());
        println!(
            "  {:<6} {:<7} {:>8} {:>16} {:>12} {:>12} {:>6} {:>8} {:>6}  {}",
            "kernel",
            "kind",
            "launches",
            "grid",
            "block",
            "smem",
            "regs",
            "spilled",
            "stack",
            format_args!("warps/SM of {} (limit)   recipe line", runtime::cuda::MAX_WARPS_PER_SM)
        );
        // One row per device function (at its first launch), and one per host kernel.
        let mut shown: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        for l in u.launches.iter().filter(|l| l.kind != "part") {
            if l.kind != "host" && !shown.insert(l.name.as_str()) {
                continue;
            }
            let count = if l.kind == "host" { 1 } else { u.launches.iter().filter(|m| m.name == l.name).count() };
            let k = usage.as_ref().and_then(|v| v.iter().find(|k| k.name == l.name));
            let (regs, spill, stack) = match k {
                Some(k) => (k.registers.to_string(), format!("{} B", k.spill_bytes), format!("{} B", k.stack_bytes)),
                None if l.kind == "host" => ("-".into(), "-".into(), "-".into()),
                None => ("?".into(), "?".into(), "?".into()),
            };
            let name = if l.kind == "host" { format!("({})", l.kernel) } else { l.name.clone() };
            // Static shared memory, plus the dynamic strips a launch opts in to.
            let smem = match l.dynamic_shared {
                0 => l.shared_bytes.to_string(),
                d => format!("{}+{d}", l.shared_bytes),
            };
            let occ = match occupancy.iter().find(|(n, _)| *n == l.name) {
                Some((_, o)) => format!("{:>2} ({})", o.warps, o.limit),
                None if l.kind == "host" => "-".into(),
                None => "?".into(),
            };
            // The line whose value the kernel computes (a fused kernel: its matmul's product).
            let occ = format!("{occ:<25} {}", p.kernel_origin(l.kernel));
            println!(
                "  {:<6} {:<7} {:>8} {:>16} {:>12} {:>12} {:>6} {:>8} {:>6}  {}",
                name,
                l.kind,
                count,
                format!("{:?}", l.grid),
                format!("{:?}", l.block),
                smem,
                regs,
                spill,
                stack,
                occ
            );
        }
        Ok(())
    })();
    match (result, out) {
        (Err(e), _) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
        (Ok(()), Some(dir)) => {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::rename(&work, dir).map_err(|e| Fail("E0501", format!("cannot write {}: {e}", dir.display())))?;
            eprintln!("wrote {}", dir.display());
            Ok(())
        }
        (Ok(()), None) => {
            let _ = std::fs::remove_dir_all(&work);
            Ok(())
        }
    }
}

/// The backends `--backend` accepts; the first is the default.
pub const BACKENDS: &[&str] = &["cranelift", "llvm", "interp", "cuda", "cuda-emu"];

fn run_graph(g: &Graph, inputs: &[Tensor], seed: u64, backend: &str) -> Result<HashMap<String, Tensor>, Fail> {
    // Check each input against its declaration first: a clear message names the argument.
    for (i, id) in g.inputs.iter().enumerate() {
        let n = g.node(*id);
        if let (Op::Input { name, .. }, Some(t)) = (&n.op, inputs.get(i)) {
            if t.shape != n.shape {
                return fail("E0501", format!("argument `{name}`: expected shape {:?}, got {:?}", n.shape, t.shape));
            }
        }
    }
    match backend {
        "interp" => interp::run(g, inputs, seed).map_err(|e| Fail("E0501", e.0)),
        #[cfg(not(feature = "llvm"))]
        "llvm" => fail("E0501", "this recipec was built without the LLVM backend; build it with `cargo build --release -p recipec --features llvm` (needs LLVM 14: `apt install llvm-14-dev`)"),
        "cuda" | "cuda-emu" => {
            let (available, which) = if backend == "cuda" {
                (runtime::cuda::available(), runtime::Backend::Cuda)
            } else {
                (runtime::cuda_emu::available(), runtime::Backend::CudaEmu)
            };
            available.map_err(|e| Fail("E0501", e.0))?;
            let p = compiler::kernel::schedule(g).map_err(|e| Fail("E0502", format!("this is a bug in recipec: {e}")))?;
            let exe = runtime::compile_program(p, which).map_err(|e| Fail("E0502", e.0))?;
            let outs = runtime::run_tensors_on(&exe, inputs, seed).map_err(|e| Fail("E0501", e.0))?;
            Ok(outs.into_iter().collect())
        }
        _ => {
            let bug = |e: String| Fail("E0502", format!("this is a bug in recipec: {e}"));
            let p = compiler::kernel::schedule(g).map_err(|e| bug(e.0))?;
            p.verify().map_err(|e| bug(format!("invalid memory plan: {e}")))?;
            let which = match backend {
                #[cfg(feature = "llvm")]
                "llvm" => runtime::Backend::Llvm,
                _ => runtime::Backend::Cranelift,
            };
            let exe = runtime::Executable::new(p, which).map_err(|e| bug(e.0))?;
            let outs = exe.run_tensors(inputs, seed).map_err(|e| Fail("E0501", e.0))?;
            // `RECIPEC_PROFILE=1`: where the time went, as `recipec train` prints it.
            if let Some(report) = exe.profile_report(std::env::var("RECIPEC_PROFILE_TOP").ok().and_then(|v| v.parse().ok()).unwrap_or(15)) {
                eprint!("{report}");
            }
            Ok(outs.into_iter().collect())
        }
    }
}
