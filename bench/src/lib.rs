//! Shared pieces of the benchmarks: building stdlib entry points, the JAX peer process, and
//! statistics. Every benchmark interleaves ours and the peers round by round (this machine's
//! bandwidth drifts up to 2x minute to minute, so only same-round ratios mean anything) and
//! prints medians, per-round ratios and their spread.

use compiler::ir::Graph;
use compiler::lower::Arg;
use lang::source::{MemoryLoader, SourceDb};
use lang::types::{Dtype, ItemRef};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Whether this is the small smoke run (`BENCH_SMOKE=1`, what CI runs).
pub fn smoke() -> bool {
    std::env::var("BENCH_SMOKE").map(|v| v == "1").unwrap_or(false)
}

/// The optimized graph of a stdlib optimizer for one f32 parameter of `shape`.
pub fn optimizer_graph(name: &str, shape: Vec<usize>, hps: &[(&str, f64)]) -> Graph {
    with_item(name, |mods, db, r| {
        let args: Vec<(String, Arg)> = hps.iter().map(|(n, v)| (n.to_string(), Arg::Scalar(*v))).collect();
        compiler::entry::optimizer(mods, db, r, (Dtype::F32, shape), &args).expect("optimizer lowers")
    })
}

/// The optimized graph of a stdlib function or loss (with gradients when `grad`).
pub fn function_graph(name: &str, args: Vec<(&str, Arg)>, grad: bool) -> Graph {
    with_item(name, |mods, db, r| {
        let args: Vec<(String, Arg)> = args.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
        compiler::entry::function(mods, db, r, &args, grad).expect("function lowers")
    })
}

/// The optimized graph of item `name` of recipe source `src` (which may `use` the stdlib),
/// with gradients when `grad`.
pub fn source_graph(src: &str, name: &str, args: Vec<(&str, Arg)>, grad: bool) -> Graph {
    source_graph_for(src, name, args, grad, compiler::passes::Target::Cpu)
}

/// [`source_graph`], optimized for `target` (the GPU benchmarks compile for CUDA).
pub fn source_graph_for(
    src: &str,
    name: &str,
    args: Vec<(&str, Arg)>,
    grad: bool,
    target: compiler::passes::Target,
) -> Graph {
    let args: Vec<(String, Arg)> = args.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
    checked(src, false, name, target, |mods, db, r| {
        compiler::entry::function(mods, db, r, &args, grad).expect("function lowers")
    })
}

/// The training plan of `recipes/tiny_gpt.recipe`, the example GPT.
pub fn tiny_gpt_plan() -> compiler::train::TrainPlan {
    let text = std::fs::read_to_string(root().join("recipes/tiny_gpt.recipe")).expect("the example recipe");
    let mut loader = MemoryLoader::default();
    for (m, f, t) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), t);
    }
    let mut db = SourceDb::new();
    let file = db.add("recipes/tiny_gpt.recipe", text);
    let analysis = lang::analyze(&mut db, &[file], &loader);
    assert!(!analysis.has_errors());
    let item = analysis.modules.list[0].items["tiny_gpt"];
    compiler::train::plan(&analysis.modules, &db, ItemRef { module: 0, item }).expect("plans")
}

/// One training step as `recipec train` runs it (the gradient program on `batch` as inputs
/// and targets, then the update at step `*k + 1`), on `state` from
/// [`runtime::train::initial_state`].
pub fn train_step(
    progs: &runtime::train::Programs,
    state: &mut std::collections::BTreeMap<String, runtime::Value>,
    batch: &runtime::Buffer,
    k: &mut usize,
) -> Result<(), runtime::RunError> {
    use runtime::Buffer;
    *k += 1;
    let copy = |x: &Buffer| Buffer::from_bytes(x.dtype, x.shape.clone(), x.as_bytes());
    let extra = [("batch.inputs", copy(batch)), ("batch.targets", copy(batch))];
    runtime::train::run_named(&progs.grad, state, extra.map(|(n, b)| (n.to_string(), b)).into(), 0)?;
    let step = Buffer::from_tensor(&compiler::interp::Tensor::scalar(Dtype::I32, *k as f64));
    runtime::train::run_named(progs.update_at(*k), state, [("step".to_string(), step)].into(), 0)?;
    Ok(())
}

/// A batch of `b` sequences of `t` byte tokens (a fixed pattern, the same in every benchmark).
pub fn byte_batch(b: usize, t: usize) -> runtime::Buffer {
    let tokens: Vec<f64> = (0..b * t).map(|i| ((i * 7919) % 256) as f64).collect();
    runtime::Buffer::from_tensor(&compiler::interp::Tensor::new(Dtype::I32, vec![b, t], tokens))
}

fn with_item(dotted: &str, f: impl FnOnce(&lang::resolve::Modules, &SourceDb, ItemRef) -> Graph) -> Graph {
    let name = dotted.rsplit('.').next().unwrap();
    checked(&format!("use {dotted}\n"), true, name, compiler::passes::Target::Cpu, f)
}

/// Item `name` of `src` (`imported`: of the stdlib module `src` imports it from), lowered by
/// `f` and optimized.
fn checked(
    src: &str,
    imported: bool,
    name: &str,
    target: compiler::passes::Target,
    f: impl FnOnce(&lang::resolve::Modules, &SourceDb, ItemRef) -> Graph,
) -> Graph {
    let mut loader = MemoryLoader::default();
    for (m, file, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{file}"), text);
    }
    let mut db = SourceDb::new();
    let root = db.add("<bench>", src.to_string());
    let analysis = lang::analyze(&mut db, &[root], &loader);
    assert!(!analysis.has_errors(), "{name} does not check");
    let mods = &analysis.modules;
    let m =
        mods.list.iter().position(|m| (m.file != root) == imported && m.items.contains_key(name)).expect("item exists");
    let r = ItemRef { module: m, item: mods.list[m].items[name] };
    let mut g = f(mods, &db, r);
    compiler::passes::run_pipeline_for(&mut g, None, &mut vec![], target).expect("pipeline");
    g
}

/// The JAX peer (bench/peer/jax_peer.py) in a child process, driven line by line.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts the peer, or says why it cannot (no Python with JAX and optax).
    pub fn start() -> Result<Peer, String> {
        let python = match std::env::var("RECIPEC_PYTHON") {
            // `cargo bench` runs in the package directory: a relative path means the
            // workspace root's.
            Ok(p) if PathBuf::from(&p).is_relative() && p.contains('/') => root().join(p),
            Ok(p) => PathBuf::from(p),
            Err(_) => {
                let venv = root().join(".ci/venv/bin/python");
                if venv.exists() {
                    venv
                } else {
                    PathBuf::from("python3")
                }
            }
        };
        let ok = Command::new(&python)
            .args(["-c", "import jax, optax"])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!(
                "{} cannot import jax and optax (set RECIPEC_PYTHON to a Python that has tests/oracle/requirements.txt)",
                python.display()
            ));
        }
        let mut child = Command::new(&python)
            .arg(root().join("bench/peer/jax_peer.py"))
            .env("XLA_FLAGS", std::env::var("XLA_FLAGS").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Peer { child, stdin, stdout })
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("peer alive");
        self.stdin.flush().expect("peer alive");
    }

    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("peer answers");
        assert!(!s.is_empty(), "the JAX peer exited");
        s.trim().to_string()
    }

    /// Runs `k` timed steps; their times in seconds.
    pub fn run(&mut self, k: usize) -> Vec<f64> {
        self.send(&format!("run {k}"));
        (0..k).map(|_| self.line().parse().expect("a time")).collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

/// Times `f` `k` times; seconds each.
pub fn time(k: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..k)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Prints the summary of one comparison: medians of every implementation, and the
/// per-round ratio `ours / other` as median [min, max].
pub fn report(title: &str, unit: &dyn Fn(f64) -> String, names: &[&str], rounds: &[Vec<f64>]) {
    println!("\n{title}");
    for (i, n) in names.iter().enumerate() {
        let all: Vec<f64> = rounds.iter().map(|r| r[i]).filter(|x| x.is_finite()).collect();
        if all.is_empty() {
            continue;
        }
        println!("  {n:<28} median {:>9.2} ms  {}", median(&all) * 1e3, unit(median(&all)));
    }
    for (i, n) in names.iter().enumerate().skip(1) {
        let ratios: Vec<f64> = rounds.iter().filter(|r| r[i].is_finite()).map(|r| r[i] / r[0]).collect();
        if ratios.is_empty() {
            continue;
        }
        let lo = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().cloned().fold(0.0, f64::max);
        println!(
            "  speed of {} relative to {n:<22} {:.2}x  (per-round spread {lo:.2}x to {hi:.2}x over {} rounds)",
            names[0],
            median(&ratios),
            ratios.len()
        );
    }
}
