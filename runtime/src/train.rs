//! The training loop and the decoding loop over a [`TrainPlan`]'s graphs.
//!
//! A step `s` (from 1): refresh the sparsity masks (`masks` graph), run `grad` on each of
//! `accumulate` micro-batches and average, run `update` (clipping, sparsity gradient rules,
//! optimizers; schedules read `step`). All tensors live in one map by name (`model.…`,
//! `state.model.….m`, `mask.model.…`, `grad.model.…`); each graph takes its arguments from it
//! by name and writes its outputs back (optimizer outputs update their argument in place).
//! On a device backend the map's values stay in device memory ([`crate::device`]): a step
//! uploads its batch and step number and reads back the loss and the gradient norm (one
//! element each); the state crosses to the host only for a checkpoint. With `accumulate > 1`
//! the micro-batches' gradients are averaged by compiled graphs on the same device
//! ([`compiler::train::accumulation`]).
//!
//! Determinism: the batch of step `s` depends only on (seed, s) (see [`crate::data`]),
//! random nodes draw from the counter-based RNG under `seed ^ hash(s)`, and the kernels'
//! work split does not depend on timing, so the same seed gives the same losses bit for bit,
//! and a run resumed from a checkpoint continues exactly as the uninterrupted run would.
//!
//! Output directory: `checkpoint.safetensors` (atomic, every `checkpoint_every` steps, at
//! the end and on Ctrl-C), `metrics.jsonl` (one JSON object per logged step and per
//! validation), `loss.svg`, and `recipe.recipe` + `run.json` (what `recipec sample` needs).

use crate::checkpoint::Checkpoint;
use crate::data::Corpus;
use crate::{Backend, Buffer, RunError, Runner, Value, ValueOut};
use compiler::interp::Tensor;
use compiler::ir::Graph;
use compiler::train::TrainPlan;
use lang::types::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by the SIGINT handler; the loop checks it between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C finishes the current step, saves a checkpoint and stops.
pub fn install_interrupt_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}

/// Schedules and compiles a graph (the standard pass pipeline, fusion, memory plan).
pub fn compile(g: &Graph, backend: Backend) -> Result<Box<dyn Runner + Send + Sync>, RunError> {
    compile_in(g, backend, &crate::Arenas::default())
}

/// [`compile`], running in `arenas` with the other programs compiled there.
pub fn compile_in(
    g: &Graph,
    backend: Backend,
    arenas: &crate::Arenas,
) -> Result<Box<dyn Runner + Send + Sync>, RunError> {
    let mut g = g.clone();
    compiler::passes::run_pipeline_for(&mut g, None, &mut vec![], backend.target())
        .map_err(|e| RunError(format!("`{}`: {}", g.name, e.0)))?;
    let p = compiler::kernel::schedule(&g).map_err(|e| RunError(format!("`{}`: {}", g.name, e.0)))?;
    crate::compile_program_in(p, backend, arenas)
}

/// Runs `exe` with arguments taken by name from `extra` first, then `state`; the arguments
/// go back into `state` (updated in place where the program wrote into them) and every
/// output is stored in `state` under its name. On a device backend the arguments stay on the
/// device afterwards and the outputs are left there ([`Runner::run_values`]).
pub fn run_named(
    exe: &dyn Runner,
    state: &mut BTreeMap<String, Value>,
    mut extra: BTreeMap<String, Buffer>,
    seed: u64,
) -> Result<(), RunError> {
    let names = exe.program().input_names.clone();
    let mut args: Vec<Value> = Vec::with_capacity(names.len());
    for n in &names {
        match extra.remove(n).map(Value::Host).or_else(|| state.remove(n)) {
            Some(b) => args.push(b),
            None => {
                // Put back what was taken before failing.
                for (m, b) in names.iter().zip(args) {
                    state.insert(m.clone(), b);
                }
                return Err(RunError(format!("`{}` needs `{n}`, which the training state lacks", exe.program().name)));
            }
        }
    }
    let result = exe.run_values(&mut args, seed);
    // Outputs in an argument under another name or shape get their own copy.
    let mut fresh = vec![];
    let mut copied = Ok(());
    if let Ok(outs) = &result {
        for (name, o) in outs {
            match o {
                ValueOut::Arg(i, shape) if names[*i] == *name && shape[..] == *args[*i].shape() => {}
                ValueOut::Arg(i, shape) => match args[*i].reshaped(shape.clone()) {
                    Ok(v) => fresh.push((name.clone(), v)),
                    Err(e) => copied = Err(e),
                },
                ValueOut::Value(_) => {}
            }
        }
    }
    for (n, b) in names.iter().zip(args) {
        state.insert(n.clone(), b);
    }
    for (name, o) in result? {
        if let ValueOut::Value(v) = o {
            state.insert(name, v);
        }
    }
    copied?;
    for (name, b) in fresh {
        state.insert(name, b);
    }
    Ok(())
}

/// Element 0 of `name` (a device value copies just that element to the host).
pub fn scalar(state: &BTreeMap<String, Value>, name: &str) -> Result<f64, RunError> {
    match state.get(name) {
        Some(v) => v.get(0),
        None => Ok(f64::NAN),
    }
}

pub fn i32_buffer(shape: Vec<usize>, data: &[i32]) -> Buffer {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    Buffer::from_bytes(Dtype::I32, shape, &bytes)
}

fn step_buffer(step: usize) -> Buffer {
    i32_buffer(vec![], &[step as i32])
}

/// The seed of step `s`'s random nodes.
/// The random seed of step `s` (from 1) of a run seeded `seed`: training's update and
/// sparsity graphs, and `recipec eval --steps` of an optimizer or sparsity rule, draw under it.
pub fn step_seed(seed: u64, s: usize) -> u64 {
    seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What the user asked for on the command line.
pub struct TrainOptions {
    /// Override of the recipe's `steps`.
    pub steps: Option<usize>,
    pub checkpoint_every: Option<usize>,
    pub out: PathBuf,
    /// A directory holding a checkpoint to continue from.
    pub resume: Option<PathBuf>,
    pub backend: Backend,
    /// Draw a progress bar (on a terminal) rather than plain lines.
    pub progress_bar: bool,
    /// The recipe's source text and path (written beside the checkpoint).
    pub source: String,
    pub source_path: PathBuf,
    /// The teacher's and `init_from`'s tensors, when the caller has read them already
    /// ([`load_sources`]); otherwise `train` reads them.
    pub sources: Option<Sources>,
}

/// Tensors a recipe reads from other runs' checkpoints.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `teacher.<path>`: the teacher's parameters (every run, resumed or not).
    pub teacher: BTreeMap<String, Buffer>,
    /// `model.<path>`: `init_from`'s parameters (a fresh start only).
    pub init: BTreeMap<String, Buffer>,
    /// The model's parameters `init_from`'s checkpoint does not hold: they start from their
    /// initializers (parameters a recipe adds to a trained model, such as adapters).
    pub fresh: Vec<String>,
    /// A digest of the teacher's values as read (FNV-1a over names, dtypes, shapes and
    /// bytes), recorded in every checkpoint as `teacher_digest`: a resumed run refuses a
    /// teacher that is not the one it started with.
    pub teacher_digest: Option<String>,
}

/// Why a checkpoint named by `teacher_from` or `init_from` cannot be used.
#[derive(Clone, Debug)]
pub struct SourceError {
    pub span: lang::source::Span,
    pub message: String,
    /// What the user can do about it.
    pub help: String,
}

/// The digest [`Sources::teacher_digest`] records.
fn digest_of(params: &BTreeMap<String, Buffer>) -> String {
    let mut bytes = vec![];
    for (name, b) in params {
        bytes.extend_from_slice(format!("{name}:{}{:?};", b.dtype, b.shape).as_bytes());
        bytes.extend_from_slice(b.as_bytes());
    }
    format!("{:016x}", crate::checkpoint::fnv1a(&bytes))
}

/// Reads the recipe's `teacher_from` and `init_from` checkpoints (paths relative to `base`,
/// the recipe's directory; a directory means its `checkpoint.safetensors`). Each parameter
/// the recipe needs must be there as `model.<path>` with the recipe's dtype and shape; where
/// the checkpoint holds a sparsity mask (`mask.model.<path>`), the value is the masked one,
/// the weights that run's forward pass used.
/// `init_from` may lack parameters the recipe's model adds (they start from their
/// initializers, listed in [`Sources::fresh`]), but every parameter it holds must be one of the
/// model's, with its dtype and shape, and at least one must be: a renamed parameter or another
/// model is refused rather than silently started afresh.
/// `init_from` is read only for a fresh start (`resume` is `None`): a resumed run continues
/// from its own checkpoint (`resume`, a run directory), whose recorded teacher digest must
/// match the teacher read now.
pub fn load_sources(plan: &TrainPlan, base: &Path, resume: Option<&Path>) -> Result<Sources, SourceError> {
    let mut out = Sources::default();
    if let Some(t) = &plan.teacher {
        out.teacher = read_params(&t.from, base, &t.params, "teacher", false)?.0;
        let digest = digest_of(&out.teacher);
        if let Some(dir) = resume {
            let ck = dir.join("checkpoint.safetensors");
            let meta = Checkpoint::read_metadata(&ck).map_err(|e| SourceError {
                span: t.from.span,
                message: e.0,
                help: "nothing ran; resume from an intact run directory".into(),
            })?;
            match meta.get("teacher_digest") {
                Some(d) if *d != digest => {
                    return Err(SourceError {
                        span: t.from.span,
                        message: format!(
                            "the teacher in {} is not the one the run in {} started with (its parameters' digest is {digest}, the run recorded {d})",
                            base.join(&t.from.path).display(),
                            dir.display()
                        ),
                        help: "nothing ran; resuming with another teacher would change the loss mid-run: restore \
                               the teacher's checkpoint, or start a fresh run with another `--out`"
                            .into(),
                    })
                }
                _ => {}
            }
        }
        out.teacher_digest = Some(digest);
    }
    if let (Some(src), None) = (&plan.init_from, resume) {
        (out.init, out.fresh) = read_params(src, base, &plan.params, "model", true)?;
    }
    Ok(out)
}

/// The parameters `wanted` (paths under `root`) from the checkpoint `src` names, and, when
/// `partial`, the paths it lacks (see [`load_sources`]); otherwise a missing one is an error.
fn read_params(
    src: &compiler::train::Source,
    base: &Path,
    wanted: &[compiler::train::ParamSpec],
    root: &str,
    partial: bool,
) -> Result<(BTreeMap<String, Buffer>, Vec<String>), SourceError> {
    let fail = |message: String| SourceError {
        span: src.span,
        message,
        help: "nothing ran; name the run directory (or `.safetensors` file) of a run of the same model".into(),
    };
    let mut path = base.join(&src.path);
    if path.is_dir() {
        path = path.join("checkpoint.safetensors");
    }
    let ck = Checkpoint::load(&path).map_err(|e| fail(e.0))?;
    let mut out = BTreeMap::new();
    let mut fresh = vec![];
    for p in wanted {
        let name = format!("model{}", &p.path[root.len()..]);
        if partial && !ck.tensors.contains_key(&name) {
            fresh.push(p.path.clone());
            continue;
        }
        let Some(b) = ck.tensors.get(&name) else {
            let what = if root == "model" { "the model's".to_string() } else { format!("the {root}'s") };
            return Err(fail(format!(
                "{}: the checkpoint has no `{name}` ({what} `{}`): is it a run of this model?",
                path.display(),
                p.path
            )));
        };
        if b.dtype != p.dtype || b.shape != p.shape {
            return Err(fail(format!(
                "{}: `{name}` is {}{:?} in the checkpoint but {}{:?} in the recipe (`{}`)",
                path.display(),
                b.dtype,
                b.shape,
                p.dtype,
                p.shape,
                p.path
            )));
        }
        let value = match ck.tensors.get(&format!("mask.{name}")) {
            Some(m) if m.shape == b.shape => {
                let (mut t, m) = (b.to_tensor(), m.to_tensor());
                for (x, k) in t.data.iter_mut().zip(&m.data) {
                    *x *= k;
                }
                Buffer::from_tensor(&t)
            }
            _ => Buffer::from_bytes(b.dtype, b.shape.clone(), b.as_bytes()),
        };
        out.insert(p.path.clone(), value);
    }
    if partial {
        let names: std::collections::HashSet<String> =
            wanted.iter().map(|p| format!("model{}", &p.path[root.len()..])).collect();
        if let Some(extra) = ck.tensors.keys().find(|k| k.starts_with("model.") && !names.contains(*k)) {
            return Err(fail(format!(
                "{}: the checkpoint's `{extra}` is no parameter of the recipe's model (a renamed parameter, or \
                 a run of another model?)",
                path.display()
            )));
        }
        if out.is_empty() && !wanted.is_empty() {
            return Err(fail(format!(
                "{}: the checkpoint holds none of the model's parameters (`{}`…): is it a run of this model?",
                path.display(),
                wanted[0].path
            )));
        }
    }
    Ok((out, fresh))
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps_done: usize,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub unigram: f64,
    pub seconds: f64,
    pub interrupted: bool,
    /// On a device backend: the bytes the run moved between host and device memory.
    pub traffic: Option<crate::device::Traffic>,
}

/// The compiled graphs of a plan.
pub struct Programs {
    pub grad: Box<dyn Runner + Send + Sync>,
    pub eval: Box<dyn Runner + Send + Sync>,
    pub update: Box<dyn Runner + Send + Sync>,
    /// `update` for the steps at which no optimizer state takes its initial value
    /// ([`TrainPlan::update_steady`]; [`Programs::update_at`] picks).
    pub update_steady: Box<dyn Runner + Send + Sync>,
    refresh_periods: Vec<u64>,
    pub masks: Option<Box<dyn Runner + Send + Sync>>,
    pub init: Box<dyn Runner + Send + Sync>,
    /// With `accumulate > 1`: the gradient averaging of [`compiler::train::accumulation`]
    /// (`start`, `add`, `finish`), run where the gradients are.
    pub accumulate: Option<[Box<dyn Runner + Send + Sync>; 3]>,
    /// The one arena they all run in (they never run at once): the job needs the largest
    /// program's arena, not the sum.
    pub arenas: crate::Arenas,
}

impl Programs {
    /// What the job needs in memory: `(arena, state)` — the shared arena (the largest
    /// program's) and every named tensor the loop keeps ([`compiler::kernel::job_bytes`]).
    pub fn job_bytes(&self) -> (usize, usize) {
        compiler::kernel::job_bytes(&self.all().map(|r| r.program()).collect::<Vec<_>>())
    }

    /// The bytes moved between host and device by all the programs (device backends).
    pub fn traffic(&self) -> Option<crate::device::Traffic> {
        self.all().filter_map(|r| r.traffic()).reduce(|a, b| a + b)
    }

    /// The update program for step `step` (from 1): the steady form unless some optimizer
    /// state takes its initial value at this step (step 1, and `(step - 1) % K == 0` for a
    /// `state ... every K`), where the two give the same bits.
    pub fn update_at(&self, step: usize) -> &(dyn Runner + Send + Sync) {
        let refresh = step <= 1 || self.refresh_periods.iter().any(|&k| (step as u64 - 1) % k == 0);
        if refresh {
            self.update.as_ref()
        } else {
            self.update_steady.as_ref()
        }
    }

    /// Every program of the job.
    fn all(&self) -> impl Iterator<Item = &(dyn Runner + Send + Sync)> {
        [&self.grad, &self.eval, &self.update, &self.update_steady, &self.init]
            .into_iter()
            .chain(&self.masks)
            .chain(self.accumulate.iter().flatten())
            .map(|r| r.as_ref())
    }

    pub fn new(plan: &TrainPlan, backend: Backend) -> Result<Programs, RunError> {
        let arenas = crate::Arenas::default();
        let c = |g: &Graph| compile_in(g, backend, &arenas);
        Ok(Programs {
            grad: c(&plan.grad)?,
            eval: c(&plan.eval)?,
            update: c(&plan.update)?,
            update_steady: c(&plan.update_steady)?,
            refresh_periods: plan.refresh_periods.clone(),
            masks: plan.masks.as_ref().map(c).transpose()?,
            init: c(&plan.init)?,
            accumulate: match plan.settings.accumulate {
                k if k > 1 => {
                    let [a, b, d] = compiler::train::accumulation(&plan.grad, k)
                        .map_err(|e| RunError(format!("gradient accumulation: {}", e.0)))?;
                    Some([c(&a)?, c(&b)?, c(&d)?])
                }
                _ => None,
            },
            arenas,
        })
    }
}

/// The names of the tensors a checkpoint holds.
fn persistent(plan: &TrainPlan) -> Vec<(String, Dtype, Vec<usize>)> {
    let mut v = vec![];
    for p in &plan.params {
        v.push((p.path.clone(), p.dtype, p.shape.clone()));
        if p.sparsity.is_some() {
            v.push((format!("mask.{}", p.path), p.dtype, p.shape.clone()));
            v.push((format!("grad.{}", p.path), p.dtype, p.shape.clone()));
        }
    }
    v.extend(plan.states.iter().cloned());
    v
}

/// The initial training state: parameters from their initializers under the seed, optimizer
/// states zero (the optimizer graph initializes them at step 1), masks one, gradients zero.
pub fn initial_state(plan: &TrainPlan, progs: &Programs) -> Result<BTreeMap<String, Value>, RunError> {
    let mut state = BTreeMap::new();
    run_named(&progs.init, &mut state, BTreeMap::new(), plan.settings.seed)?;
    for (name, dtype, shape) in persistent(plan) {
        if state.contains_key(&name) {
            continue;
        }
        let mut b = Buffer::zeros(dtype, shape.clone());
        if name.starts_with("mask.") {
            let n: usize = shape.iter().product();
            b = Buffer::from_tensor(&Tensor::new(dtype, shape, vec![1.0; n]));
        }
        state.insert(name, Value::Host(b));
    }
    Ok(state)
}

/// Loads a checkpoint and checks it fits the plan (names, dtypes, shapes).
pub fn load_state(plan: &TrainPlan, path: &Path) -> Result<(BTreeMap<String, Buffer>, usize), RunError> {
    let ck = Checkpoint::load(path)?;
    if ck.metadata.get("format").map(|s| s.as_str()) != Some("recipec-checkpoint-1") {
        return Err(RunError(format!("{}: not a recipec checkpoint (no `format` metadata)", path.display())));
    }
    let step: usize = ck
        .metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RunError(format!("{}: the checkpoint has no step", path.display())))?;
    if ck.metadata.get("recipe") != Some(&plan.name) {
        return Err(RunError(format!(
            "{}: the checkpoint is of recipe `{}`, not `{}`",
            path.display(),
            ck.metadata.get("recipe").cloned().unwrap_or_default(),
            plan.name
        )));
    }
    let state = ck.tensors;
    for (name, dtype, shape) in persistent(plan) {
        match state.get(&name) {
            None => return Err(RunError(format!("{}: the checkpoint lacks `{name}`", path.display()))),
            Some(b) if b.dtype != dtype || b.shape != shape => {
                return Err(RunError(format!(
                    "{}: `{name}` is {}{:?} in the checkpoint but {dtype}{shape:?} in the recipe",
                    path.display(),
                    b.dtype,
                    b.shape
                )))
            }
            _ => {}
        }
    }
    Ok((state, step))
}

fn save_state(
    plan: &TrainPlan,
    state: &BTreeMap<String, Value>,
    step: usize,
    dir: &Path,
    teacher_digest: Option<&str>,
) -> Result<(), RunError> {
    let mut ck = Checkpoint::default();
    for (name, ..) in persistent(plan) {
        let v = state.get(&name).ok_or_else(|| RunError(format!("the training state lacks `{name}`")))?;
        // Values on a device are copied to the host here (and only here, for the parameters).
        let b = v.host()?;
        ck.tensors.insert(name, Buffer::from_bytes(b.dtype, b.shape.clone(), b.as_bytes()));
    }
    let s = &plan.settings;
    for (k, v) in [
        ("format", "recipec-checkpoint-1".to_string()),
        ("recipe", plan.name.clone()),
        ("step", step.to_string()),
        ("seed", s.seed.to_string()),
        ("rng", format!("philox4x32-10; graph seed of step s = seed ^ (s * 0x9E3779B97F4A7C15); data order keyed by (seed, epoch)")),
        ("data_position", (step * s.accumulate * plan.data.batch).to_string()),
    ] {
        ck.metadata.insert(k.to_string(), v);
    }
    if let Some(d) = teacher_digest {
        ck.metadata.insert("teacher_digest".into(), d.to_string());
    }
    ck.save(&dir.join("checkpoint.safetensors"))
}

/// Mean validation loss over the recipe's `eval_batches` fixed batches.
pub fn validation_loss(
    plan: &TrainPlan,
    progs: &Programs,
    corpus: &Corpus,
    state: &mut BTreeMap<String, Value>,
) -> Result<f64, RunError> {
    let (b, t) = (plan.data.batch, plan.data.context);
    let n = plan.settings.eval_batches;
    let mut total = 0.0;
    for k in 0..n {
        let (x, y) = corpus.val_batch(k, n);
        let mut extra = BTreeMap::new();
        extra.insert("batch.inputs".to_string(), i32_buffer(vec![b, t], &x));
        extra.insert("batch.targets".to_string(), i32_buffer(vec![b, t], &y));
        run_named(&progs.eval, state, extra, plan.settings.seed)?;
        total += scalar(state, "loss")?;
    }
    Ok(total / n as f64)
}

fn json_num(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Keeps the lines of `metrics.jsonl` up to `step` (a resumed run rewrites what follows).
fn truncate_metrics(path: &Path, step: usize) -> Result<Vec<serde_json::Value>, RunError> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(vec![]) };
    let kept: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("step").and_then(|s| s.as_u64()).map(|s| s as usize <= step).unwrap_or(false))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let body: String = kept.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(&tmp, body).map_err(|e| RunError(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| RunError(format!("cannot write {}: {e}", path.display())))?;
    Ok(kept)
}

fn write_plot(dir: &Path, name: &str, metrics: &[serde_json::Value], unigram: f64) -> Result<(), RunError> {
    let get = |key: &str| -> Vec<(f64, f64)> {
        metrics.iter().filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?))).collect()
    };
    let (train, val) = (get("loss"), get("val_loss"));
    let svg = crate::plot::svg(
        &format!("recipe `{name}`: loss"),
        &[
            crate::plot::Series { name: "training loss", color: "#1f77b4", points: &train },
            crate::plot::Series { name: "validation loss", color: "#d62728", points: &val },
        ],
        Some(("unigram baseline", unigram)),
    );
    let path = dir.join("loss.svg");
    let tmp = dir.join("loss.svg.tmp");
    std::fs::write(&tmp, svg)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| RunError(format!("cannot write {}: {e}", path.display())))
}

/// Trains `plan`, printing progress to `log` (stderr in the CLI).
pub fn train(plan: &TrainPlan, opts: &TrainOptions, log: &mut dyn Write) -> Result<TrainSummary, RunError> {
    let started = Instant::now();
    let s = &plan.settings;
    let steps = opts.steps.unwrap_or(s.steps);
    let ck_every = opts.checkpoint_every.unwrap_or(s.checkpoint_every).max(1);
    let base = opts.source_path.parent().unwrap_or(Path::new("."));
    let tokens = crate::data::load_tokens(&plan.data.kind, &plan.data.path, base)?;
    let corpus = Corpus::new(tokens, plan.data.val_fraction, plan.data.context, plan.data.batch, s.seed)?;
    let unigram = corpus.unigram_entropy();
    let progs = Programs::new(plan, opts.backend)?;
    if opts.backend == Backend::Cuda {
        // Before anything is allocated on the device: does the job fit?
        let (arena, state) = progs.job_bytes();
        let (free, total) = crate::cuda::memory_info()?;
        if arena + state > free {
            let h = |b: usize| compiler::plan::human(b);
            return Err(RunError(format!(
                "training `{}` needs {} of GPU memory (an arena of {} and {} of training state; `recipec build` shows which entry point and recipe line need the most), but the GPU has {} free of {}",
                plan.name,
                h(arena + state),
                h(arena),
                h(state),
                h(free),
                h(total)
            )));
        }
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| RunError(format!("cannot create {}: {e}", opts.out.display())))?;
    let ck_path = opts.out.join("checkpoint.safetensors");
    let (mut state, start) = match &opts.resume {
        Some(dir) => {
            let (st, step) = load_state(plan, &dir.join("checkpoint.safetensors"))?;
            (st.into_iter().map(|(k, b)| (k, Value::Host(b))).collect(), step)
        }
        None => (initial_state(plan, &progs)?, 0),
    };
    let sources = match &opts.sources {
        Some(s) => s.clone(),
        None => load_sources(plan, base, opts.resume.as_deref()).map_err(|e| RunError(e.message))?,
    };
    let teacher_digest = sources.teacher_digest.clone();
    let fresh = sources.fresh.clone();
    state.extend(sources.teacher.into_iter().map(|(k, b)| (k, Value::Host(b))));
    if opts.resume.is_none() {
        state.extend(sources.init.into_iter().map(|(k, b)| (k, Value::Host(b))));
    }
    if opts.resume.is_none() && ck_path.exists() {
        // A fresh run into a directory with a checkpoint would overwrite it.
        return Err(RunError(format!(
            "{} already holds a checkpoint: continue it with `--resume {}`, or choose another `--out`",
            opts.out.display(),
            opts.out.display()
        )));
    }
    if let Some(dir) = &opts.resume {
        if dir != &opts.out && ck_path.exists() {
            return Err(RunError(format!(
                "{} already holds a checkpoint; resume into the same directory or an empty one",
                opts.out.display()
            )));
        }
    }
    // What `recipec sample` needs beside the checkpoint.
    let run = serde_json::json!({
        "recipe": plan.name,
        "source_path": opts.source_path.display().to_string(),
        "seed": s.seed,
    });
    std::fs::write(opts.out.join("recipe.recipe"), &opts.source)
        .and_then(|_| std::fs::write(opts.out.join("run.json"), format!("{run:#}\n")))
        .map_err(|e| RunError(format!("cannot write into {}: {e}", opts.out.display())))?;
    let metrics_path = opts.out.join("metrics.jsonl");
    let mut metrics = if let Some(dir) = &opts.resume {
        if dir != &opts.out {
            let _ = std::fs::copy(dir.join("metrics.jsonl"), &metrics_path);
        }
        truncate_metrics(&metrics_path, start)?
    } else {
        let _ = std::fs::remove_file(&metrics_path);
        vec![]
    };
    let mut mfile = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| RunError(format!("cannot write {}: {e}", metrics_path.display())))?;
    let n_params: usize = plan.params.iter().map(|p| p.shape.iter().product::<usize>()).sum();
    let _ = writeln!(
        log,
        "training `{}`: {} parameters, {} tokens ({} for validation), unigram baseline {:.3} nats/token, steps {}..={steps}{}",
        plan.name,
        n_params,
        corpus.tokens.len(),
        corpus.tokens.len() - corpus.split,
        unigram,
        start + 1,
        if opts.resume.is_some() { " (resumed)" } else { "" }
    );
    if let (Some(src), None) = (&plan.init_from, &opts.resume) {
        let _ = writeln!(log, "starting from the parameters in {} (init_from)", base.join(&src.path).display());
        if !fresh.is_empty() {
            let n: usize =
                plan.params.iter().filter(|p| fresh.contains(&p.path)).map(|p| p.shape.iter().product::<usize>()).sum();
            let _ = writeln!(
                log,
                "{} parameters ({n} values) are not in it and start from their initializers: {}",
                fresh.len(),
                fresh.join(", ")
            );
        }
    }
    if let Some(t) = &plan.teacher {
        let n: usize = t.params.iter().map(|p| p.shape.iter().product::<usize>()).sum();
        let _ = writeln!(log, "teacher: {n} parameters from {}, frozen", base.join(&t.from.path).display());
    }
    let (arena, kept) = progs.job_bytes();
    let h = compiler::plan::human;
    let _ = writeln!(
        log,
        "memory: {} (one arena of {} for all {} programs, {} of training state){}",
        h(arena + kept),
        h(arena),
        progs.all().count(),
        h(kept),
        if matches!(opts.backend, Backend::Cuda | Backend::CudaEmu) { ", on the device" } else { "" }
    );
    if corpus.max_token() < 0 {
        return Err(RunError("negative token".into()));
    }
    let tokens_per_step = (plan.data.batch * plan.data.context * s.accumulate) as f64;
    let mut emit = |v: serde_json::Value, metrics: &mut Vec<serde_json::Value>| -> Result<(), RunError> {
        writeln!(mfile, "{v}").and_then(|_| mfile.flush()).map_err(|e| RunError(format!("metrics: {e}")))?;
        metrics.push(v);
        Ok(())
    };
    let loop_start = Instant::now();
    let mut last_draw = Instant::now() - std::time::Duration::from_secs(1);
    let (mut last_loss, mut val_loss) = (f64::NAN, None);
    let mut interrupted = false;
    let mut done = start;
    for step in start + 1..=steps {
        if let Some(m) = &progs.masks {
            let mut extra = BTreeMap::new();
            extra.insert("step".to_string(), step_buffer(step));
            run_named(m, &mut state, extra, step_seed(s.seed, step))?;
        }
        // Gradients, averaged over micro-batches where they are (`Programs::accumulate`).
        let mut loss = 0.0;
        for micro in 0..s.accumulate {
            let (x, y) = corpus.train_batch(((step - 1) * s.accumulate + micro) as u64);
            let mut extra = BTreeMap::new();
            extra.insert("batch.inputs".to_string(), i32_buffer(vec![plan.data.batch, plan.data.context], &x));
            extra.insert("batch.targets".to_string(), i32_buffer(vec![plan.data.batch, plan.data.context], &y));
            run_named(&progs.grad, &mut state, extra, step_seed(s.seed, step) ^ micro as u64)?;
            loss += scalar(&state, "loss")?;
            if let Some([start, add, finish]) = &progs.accumulate {
                let g = match micro {
                    0 => start,
                    m if m + 1 == s.accumulate => finish,
                    _ => add,
                };
                run_named(g, &mut state, BTreeMap::new(), 0)?;
            }
        }
        let loss = loss / s.accumulate as f64;
        let mut extra = BTreeMap::new();
        extra.insert("step".to_string(), step_buffer(step));
        run_named(progs.update_at(step), &mut state, extra, step_seed(s.seed, step))?;
        done = step;
        last_loss = loss;
        if !loss.is_finite() {
            save_state(plan, &state, step - 1, &opts.out, teacher_digest.as_deref()).ok();
            return Err(RunError(format!("the loss is {loss} at step {step}: training diverged")));
        }
        let elapsed = loop_start.elapsed().as_secs_f64();
        let rate = (step - start) as f64 * tokens_per_step / elapsed.max(1e-9);
        let eta = (steps - step) as f64 * tokens_per_step / rate.max(1e-9);
        let gn = scalar(&state, "grad_norm")?;
        if step % s.log_every == 0 || step == steps || step == start + 1 {
            emit(
                serde_json::json!({"step": step, "loss": json_num(loss), "grad_norm": json_num(gn),
                    "tokens_per_s": json_num(rate.round()), "elapsed_s": json_num((elapsed * 1000.0).round() / 1000.0)}),
                &mut metrics,
            )?;
            if !opts.progress_bar {
                let _ = writeln!(
                    log,
                    "step {step:>6}/{steps}  loss {loss:.4}  grad norm {gn:.3}  {:.0} tokens/s  ETA {}",
                    rate,
                    fmt_duration(eta)
                );
            }
        }
        if opts.progress_bar && (last_draw.elapsed().as_secs_f64() > 0.1 || step == steps) {
            last_draw = Instant::now();
            let width = 30;
            let filled = (width * step) / steps.max(1);
            let _ = write!(
                log,
                "\r[{}{}] step {step}/{steps}  loss {loss:.4}  {:.0} tok/s  ETA {}   ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                rate,
                fmt_duration(eta)
            );
            let _ = log.flush();
        }
        if step % s.eval_every == 0 || step == steps {
            let v = validation_loss(plan, &progs, &corpus, &mut state)?;
            val_loss = Some(v);
            emit(serde_json::json!({"step": step, "val_loss": json_num(v)}), &mut metrics)?;
            if opts.progress_bar {
                let _ = write!(log, "\r{}\r", " ".repeat(90));
            }
            let _ = writeln!(log, "step {step:>6}/{steps}  validation loss {v:.4}  (unigram baseline {unigram:.3})");
        }
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        if step % ck_every == 0 || step == steps || stop {
            save_state(plan, &state, step, &opts.out, teacher_digest.as_deref())?;
            write_plot(&opts.out, &plan.name, &metrics, unigram)?;
        }
        if stop {
            interrupted = true;
            break;
        }
    }
    if opts.progress_bar {
        let _ = writeln!(log);
    }
    if start >= steps {
        let _ = writeln!(log, "the checkpoint is already at step {start} of {steps}: nothing to do");
    }
    write_plot(&opts.out, &plan.name, &metrics, unigram)?;
    for e in [&progs.grad, &progs.update, &progs.update_steady] {
        if let Some(r) = e.profile_report(500) {
            let _ = write!(log, "{r}");
        }
    }
    Ok(TrainSummary {
        steps_done: done,
        final_loss: last_loss,
        val_loss,
        unigram,
        seconds: started.elapsed().as_secs_f64(),
        interrupted,
        traffic: progs.traffic(),
    })
}

/// How `sample` runs the model for each new token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    /// The step derived by [`compiler::incremental`]: the new token's row only, keys and
    /// values kept in caches (falls back to `Window` when the model cannot be cached).
    Cached,
    /// The whole window recomputed for every token (the naive graph).
    Window,
}

/// What `sample` did.
#[derive(Clone, Debug)]
pub struct Sampled {
    pub tokens: Vec<i32>,
    /// `Cached` when the KV-cached step ran.
    pub decoding: Decoding,
    /// Why the cached step could not be derived, when it was asked for.
    pub fallback: Option<String>,
    /// How many caches the cached step carries, and their bytes.
    pub caches: (usize, usize),
    /// Seconds spent per generated token (compilation excluded).
    pub seconds_per_token: f64,
    /// The slowest kernels, with `RECIPEC_PROFILE=1`.
    pub profile: Option<String>,
    /// Under a constraint: the tokens the policy drew and the constraint rejected.
    pub rejections: usize,
    /// Why sampling stopped before `n` tokens (the constraint admits no further byte).
    pub stopped: Option<String>,
    /// With an ∞-gram mixture: the mean s*, the length of the longest suffix of the text so
    /// far found in the corpus, over the generated tokens.
    pub mean_suffix: Option<f64>,
    /// With classifier-free guidance: what it did.
    pub guidance: Option<Guided>,
}

/// What steers sampling beyond the decoding step's own draw: the policy alone
/// ([`compiler::train::policy_graph`], inputs `logits` and `banned`) draws from the model's
/// logits mixed with an ∞-gram model, or again after a constraint rejected a token, or both.
pub struct Guide<'a> {
    pub policy: &'a Graph,
    /// A constraint on the generated bytes ([`crate::constraint`]).
    pub regex: Option<&'a crate::constraint::ByteConstraint>,
    /// The ∞-gram model to mix in, and its weight.
    pub ngram: Option<NgramMix<'a>>,
    /// Classifier-free guidance against a second, unconditional stream.
    pub guidance: Option<Guidance<'a>>,
}

/// Classifier-free guidance for a language model (Sanchez et al., "Stay on topic with
/// Classifier-Free Guidance", arXiv:2306.17806): a second stream reads the generated text
/// after `negative` instead of the prompt, and the policy draws from
/// log P̃ = log P(·|prompt) + (w − 1)·(log P(·|prompt) − log P(·|negative)), w = `scale`.
/// With `threshold` γ̄, Adaptive Guidance (Castillo et al., AAAI 2025): at each step the
/// cosine γ between the two streams' centered log-probabilities is measured, and from the
/// first step where γ > γ̄ guidance is off for good — the conditional stream alone, and the
/// unconditional stream no longer runs.
#[derive(Clone, Copy, Debug)]
pub struct Guidance<'a> {
    pub scale: f64,
    /// The unconditional stream's text before the generated tokens (a newline when empty).
    pub negative: &'a [u8],
    pub threshold: Option<f64>,
}

/// Log-softmax in f64.
pub fn log_probs(x: &[f64]) -> Vec<f64> {
    let top = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = top + x.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// The guided log-probabilities log P_c + (w − 1)(log P_c − log P_u) from the conditional
/// and unconditional logits, and γ, the cosine of the two log-probability vectors centered
/// (their mean subtracted: logits are defined up to a constant, and so γ is) — Pearson's
/// correlation; 1 where either is constant. Tokens either stream gives probability 0 are
/// left out of γ.
pub fn guided_log_probs(cond: &[f64], uncond: &[f64], scale: f64) -> (Vec<f64>, f64) {
    let (c, u) = (log_probs(cond), log_probs(uncond));
    let guided = c.iter().zip(&u).map(|(c, u)| if scale == 1.0 { *c } else { c + (scale - 1.0) * (c - u) }).collect();
    let finite: Vec<(f64, f64)> =
        c.iter().zip(&u).filter(|(a, b)| a.is_finite() && b.is_finite()).map(|(a, b)| (*a, *b)).collect();
    let n = finite.len().max(1) as f64;
    let (mc, mu) = (finite.iter().map(|p| p.0).sum::<f64>() / n, finite.iter().map(|p| p.1).sum::<f64>() / n);
    let (mut dot, mut nc, mut nu) = (0.0, 0.0, 0.0);
    for (a, b) in &finite {
        dot += (a - mc) * (b - mu);
        nc += (a - mc) * (a - mc);
        nu += (b - mu) * (b - mu);
    }
    let cos = if nc > 0.0 && nu > 0.0 { dot / (nc.sqrt() * nu.sqrt()) } else { 1.0 };
    (guided, cos)
}

/// Adaptive Guidance's switch: guidance stays on while γ ≤ γ̄ and turns off, for good, at
/// the first step with γ > γ̄ (that step already unguided). Without a threshold it never
/// turns off.
#[derive(Clone, Debug, Default)]
pub struct GuidanceSwitch {
    pub threshold: Option<f64>,
    /// The step at which guidance turned off, and its γ.
    pub off_at: Option<(usize, f64)>,
}

impl GuidanceSwitch {
    /// Whether guidance is still on before step `step` measures γ.
    pub fn on(&self) -> bool {
        self.off_at.is_none()
    }
    /// Records step `step`'s γ; true when this step is guided.
    pub fn guide(&mut self, step: usize, gamma: f64) -> bool {
        if self.off_at.is_some() {
            return false;
        }
        match self.threshold {
            Some(t) if gamma > t => {
                self.off_at = Some((step, gamma));
                false
            }
            _ => true,
        }
    }
}

/// What guidance did in [`sample`].
#[derive(Clone, Debug, Default)]
pub struct Guided {
    /// Tokens drawn from the guided distribution.
    pub guided_tokens: usize,
    /// Where Adaptive Guidance turned it off (token index, γ).
    pub off_at: Option<(usize, f64)>,
    /// Steps the unconditional stream ran (prompt positions included).
    pub unconditional_steps: usize,
    /// Steps the conditional stream ran.
    pub conditional_steps: usize,
    /// γ at each token while guidance was on (the last one the one that turned it off).
    pub gammas: Vec<f64>,
}

/// P = λ·P_∞ + (1 − λ)·P_model: the ∞-gram model of a corpus ([`crate::infinigram`]) over the
/// whole text so far (prompt included, not limited to the model's context), interpolated with
/// the model's next-token distribution, as Infini-gram (Liu et al., COLM 2024) combines them;
/// the policy then draws from log P.
pub struct NgramMix<'a> {
    pub index: &'a crate::infinigram::InfiniGram,
    pub lambda: f64,
}

/// Replaces the step's `logits` by log(λ·P_∞ + (1 − λ)·softmax(logits)) given the text
/// `seq`, and draws the policy's token from them; returns it and s*.
fn ngram_token(
    m: &NgramMix,
    policy: &dyn Runner,
    st: &mut BTreeMap<String, Value>,
    seq: &[i32],
    seed: u64,
) -> Result<(i32, usize), RunError> {
    let logits = st.get("logits").ok_or_else(|| RunError("the decode step gives no `logits`".into()))?.host()?;
    let x = logits.to_tensor().data;
    let top = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| (v - top).exp()).sum();
    let d = m.index.next_tokens(seq);
    let mixed: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(v, l)| (m.lambda * d.prob(v as i32) + (1.0 - m.lambda) * (l - top).exp() / z).ln())
        .collect();
    Ok((policy_draw(policy, st, mixed, seed)?, d.suffix_len))
}

/// Replaces the step's `logits` by `row` and draws the policy's token from it.
fn policy_draw(
    policy: &dyn Runner,
    st: &mut BTreeMap<String, Value>,
    row: Vec<f64>,
    seed: u64,
) -> Result<i32, RunError> {
    let n = row.len();
    let mut pst: BTreeMap<String, Value> = BTreeMap::new();
    pst.insert("logits".into(), Value::Host(Buffer::from_tensor(&Tensor::new(Dtype::F32, vec![n], row))));
    let none = Tensor::new(Dtype::Bool, vec![n], vec![0.0; n]);
    pst.insert("banned".into(), Value::Host(Buffer::from_tensor(&none)));
    run_named(policy, &mut pst, BTreeMap::new(), seed)?;
    let tok = scalar(&pst, "token")? as i32;
    st.insert("logits".into(), pst.remove("logits").expect("the policy's input"));
    Ok(tok)
}

/// The step's `logits` as f64.
fn logits_row(st: &BTreeMap<String, Value>) -> Result<Vec<f64>, RunError> {
    let logits = st.get("logits").ok_or_else(|| RunError("the decode step gives no `logits`".into()))?;
    Ok(logits.host()?.to_tensor().data)
}

/// The token to emit after the policy chose `t`: `t` if the constraint allows it, else a
/// draw of the policy without the rejected tokens; `None` when no token is allowed.
#[allow(clippy::too_many_arguments)]
fn constrained_token(
    regex: &crate::constraint::ByteConstraint,
    policy: &dyn Runner,
    at: &mut crate::constraint::ConstraintState,
    st: &BTreeMap<String, Value>,
    t: i32,
    seed: u64,
    rejections: &mut usize,
) -> Result<Option<i32>, RunError> {
    let now = *at;
    let allowed = |tok: usize| tok < 256 && regex.step(now, tok as u8).is_some();
    let logits = st.get("logits").ok_or_else(|| RunError("the decode step gives no `logits`".into()))?.host()?;
    let vocab = logits.shape.iter().product::<usize>();
    let draw = |banned: &[bool], attempt: usize| -> Result<usize, RunError> {
        if attempt == 0 {
            return Ok(t.max(0) as usize);
        }
        let mut pst: BTreeMap<String, Value> = BTreeMap::new();
        pst.insert(
            "logits".into(),
            Value::Host(Buffer::from_bytes(logits.dtype, logits.shape.clone(), logits.as_bytes())),
        );
        let b = Tensor::new(Dtype::Bool, vec![vocab], banned.iter().map(|&x| x as u8 as f64).collect());
        pst.insert("banned".into(), Value::Host(Buffer::from_tensor(&b)));
        run_named(policy, &mut pst, BTreeMap::new(), seed ^ (attempt as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))?;
        Ok(scalar(&pst, "token")?.max(0.0) as usize)
    };
    match crate::constraint::draw_constrained(vocab, draw, allowed)? {
        Some((tok, rejected)) => {
            *rejections += rejected;
            *at = regex.step(now, tok as u8).expect("an allowed token steps");
            Ok(Some(tok as i32))
        }
        None => Ok(None),
    }
}

/// A decoding step (`g`, run once per token) compiled for `backend`, with its arguments from
/// the checkpoint `state` and the prompt's tokens ([`decode_inputs`]). What the step computes
/// from the checkpoint alone ([`compiler::hoist::split_invariant`]: a basis from an SVD, a
/// Cayley map's solve, a product of weights) is computed here once, and the step reads it.
#[allow(clippy::type_complexity)]
fn step_program(
    g: &Graph,
    backend: Backend,
    state: &BTreeMap<String, Buffer>,
    prompt: &[u8],
) -> Result<(Box<dyn Runner + Send + Sync>, BTreeMap<String, Value>, Vec<i32>), RunError> {
    let varies = |n: &str| n == "tokens" || n == "pos" || n.starts_with("cache.");
    let split = compiler::hoist::split_invariant(g, &varies).map_err(|e| RunError(format!("`{}`: {}", g.name, e.0)))?;
    let Some((prelude, step)) = split else {
        let exe = compile(g, backend)?;
        let (st, seq) = decode_inputs(exe.as_ref(), state, prompt)?;
        return Ok((exe, st, seq));
    };
    let pre = compile(&prelude, backend)?;
    let (mut values, _) = decode_inputs(pre.as_ref(), state, b"")?;
    run_named(pre.as_ref(), &mut values, BTreeMap::new(), 0)?;
    let exe = compile(&step, backend)?;
    let (mut st, seq) = decode_inputs(exe.as_ref(), state, prompt)?;
    for (name, _) in &prelude.outputs {
        let v = values.remove(name).ok_or_else(|| RunError(format!("the prelude gave no `{name}`")))?;
        st.insert(name.clone(), v);
    }
    Ok((exe, st, seq))
}

/// The decoding step's arguments from a checkpoint (every input but the tokens, the position,
/// the caches and the values [`step_program`] hoisted), and the prompt's tokens (a newline
/// when it is empty).
fn decode_inputs(
    exe: &dyn Runner,
    state: &BTreeMap<String, Buffer>,
    prompt: &[u8],
) -> Result<(BTreeMap<String, Value>, Vec<i32>), RunError> {
    let mut st: BTreeMap<String, Value> = BTreeMap::new();
    for name in &exe.program().input_names {
        if name == "tokens" || name == "pos" || name.starts_with("cache.") || name.starts_with("hoisted.") {
            continue;
        }
        let b = state.get(name).ok_or_else(|| RunError(format!("the checkpoint lacks `{name}`")))?;
        st.insert(name.clone(), Value::Host(b.clone()));
    }
    let mut seq: Vec<i32> = prompt.iter().map(|&b| b as i32).collect();
    if seq.is_empty() {
        seq.push(b'\n' as i32);
    }
    Ok((st, seq))
}

/// What both samplers ([`sample`], [`sample_smc`]) generate from: a decoding step over
/// `context` positions, a checkpoint's values, the prompt's bytes, how many tokens, the seed
/// of their random draws and the backend.
#[derive(Clone, Copy)]
pub struct Generation<'a> {
    pub decode: &'a Graph,
    pub state: &'a BTreeMap<String, Buffer>,
    pub context: usize,
    pub prompt: &'a [u8],
    pub tokens: usize,
    pub seed: u64,
    pub backend: Backend,
}

/// What [`sample_smc`] did.
#[derive(Clone, Debug)]
pub struct SmcSampled {
    /// The generated tokens of the particle drawn at the end (by weight).
    pub tokens: Vec<i32>,
    pub particles: usize,
    /// How many times the particles were resampled (when the effective sample size fell
    /// below half of them).
    pub resamplings: usize,
    /// The effective sample size at the end.
    pub ess: f64,
    /// The log of the SMC estimate of the probability that the model's text of this length
    /// satisfies the constraint.
    pub log_z: f64,
    /// Constraint checks, over every particle and step.
    pub checks: usize,
    /// Particles that reached a complete match that no byte can extend.
    pub complete: usize,
    pub seconds: f64,
}

/// One sequence of [`sample_smc`]: its tokens, KV caches (on the host) and log weight.
#[derive(Clone)]
struct Particle {
    seq: Vec<i32>,
    generated: Vec<i32>,
    caches: Vec<Buffer>,
    filled: usize,
    pending: Vec<i32>,
    /// The model's next-token logits after `seq` (once `pending` has run).
    logits: Vec<f32>,
    logw: f64,
    at: crate::constraint::ConstraintState,
    done: bool,
}

impl Particle {
    /// Feeds the pending tokens through the cached step (its caches swapped into `st`) and
    /// keeps the logits of the last.
    fn advance(
        &mut self,
        exe: &dyn Runner,
        caches: &[(String, Dtype, Vec<usize>)],
        st: &mut BTreeMap<String, Value>,
        seed: u64,
    ) -> Result<(), RunError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for ((name, ..), b) in caches.iter().zip(self.caches.drain(..)) {
            st.insert(name.clone(), Value::Host(b));
        }
        for &t in &self.pending {
            let mut extra = BTreeMap::new();
            extra.insert("tokens".to_string(), i32_buffer(vec![1, 1], &[t]));
            extra.insert("pos".to_string(), i32_buffer(vec![], &[self.filled as i32]));
            run_named(exe, st, extra, seed)?;
            self.filled += 1;
        }
        self.pending.clear();
        for (name, ..) in caches {
            let v = st.remove(name).ok_or_else(|| RunError(format!("the decoding step lost `{name}`")))?;
            self.caches.push(v.into_host()?);
        }
        let logits = st.get("logits").ok_or_else(|| RunError("the decode step gives no `logits`".into()))?;
        self.logits = logits.host()?.to_tensor().data.iter().map(|&x| x as f32).collect();
        Ok(())
    }
}

/// What [`score`] measured on a run's validation text.
#[derive(Clone, Debug)]
pub struct Scored {
    /// Predicted tokens.
    pub tokens: usize,
    /// The model's mean negative log-likelihood, nats per token.
    pub model_nats: f64,
    /// For each λ: the mean negative log-likelihood of λ·P_∞ + (1 − λ)·P_model.
    pub mixtures: Vec<(f64, f64)>,
    /// The mean s* (the longest suffix of each window's text so far found in the index).
    pub mean_suffix: f64,
    /// The share of tokens the ∞-gram model gives probability 0 (the mixture's λ < 1 keeps
    /// them possible).
    pub ngram_zero: f64,
    /// True when the KV-cached step ran (else the whole window per position).
    pub cached: bool,
    pub seconds: f64,
}

/// Scores the validation windows training evaluates (`batches` batches of
/// [`Corpus::val_batch`]): at every position of every window, the model's next-token
/// distribution from the decoding step, and, with an index, its mixture with the ∞-gram
/// model for each λ in `lambdas` (the ∞-gram context being the window's tokens so far, as the
/// model's). The model's mean is training's validation loss for a cross-entropy recipe, up
/// to rounding (the decoding step's logits, in f32, against the loss's fused computation).
pub fn score(
    decode: &Graph,
    state: &BTreeMap<String, Buffer>,
    corpus: &Corpus,
    batches: usize,
    backend: Backend,
    index: Option<&crate::infinigram::InfiniGram>,
    lambdas: &[f64],
) -> Result<Scored, RunError> {
    let started = std::time::Instant::now();
    let context = corpus.context;
    let inc = compiler::incremental::incrementalize(decode, "tokens", "pos").ok();
    let (exe, mut st, _) = step_program(inc.as_ref().map(|c| &c.graph).unwrap_or(decode), backend, state, b"")?;
    let (mut count, mut model, mut suffix, mut zero) = (0usize, 0.0f64, 0usize, 0usize);
    let mut mixed = vec![0.0f64; lambdas.len()];
    for k in 0..batches {
        let (x, y) = corpus.val_batch(k, batches);
        for (xs, ys) in x.chunks(context).zip(y.chunks(context)) {
            if let Some(inc) = &inc {
                for (name, dtype, shape) in &inc.caches {
                    st.insert(name.clone(), Value::Host(Buffer::zeros(*dtype, shape.clone())));
                }
            }
            for pos in 0..context {
                let mut extra = BTreeMap::new();
                let tokens =
                    if inc.is_some() { i32_buffer(vec![1, 1], &[xs[pos]]) } else { i32_buffer(vec![1, context], xs) };
                extra.insert("tokens".to_string(), tokens);
                extra.insert("pos".to_string(), i32_buffer(vec![], &[pos as i32]));
                run_named(exe.as_ref(), &mut st, extra, 0)?;
                let logits = st.get("logits").ok_or_else(|| RunError("the decode step gives no `logits`".into()))?;
                let l = logits.host()?.to_tensor().data;
                let top = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = l.iter().map(|v| (v - top).exp()).sum();
                let target = ys[pos].clamp(0, l.len() as i32 - 1) as usize;
                let p = (l[target] - top).exp() / z;
                model -= p.ln();
                if let Some(index) = index {
                    let (q, s) = index.prob(&xs[..=pos], ys[pos]);
                    suffix += s;
                    zero += (q == 0.0) as usize;
                    for (m, lambda) in mixed.iter_mut().zip(lambdas) {
                        *m -= (lambda * q + (1.0 - lambda) * p).ln();
                    }
                }
                count += 1;
            }
        }
    }
    let n = count.max(1) as f64;
    Ok(Scored {
        tokens: count,
        model_nats: model / n,
        mixtures: lambdas.iter().zip(&mixed).map(|(l, m)| (*l, m / n)).collect(),
        mean_suffix: suffix as f64 / n,
        ngram_zero: zero as f64 / n,
        cached: inc.is_some(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Constrained generation by sequential Monte Carlo with AWRS (Lipkin et al., COLM 2025):
/// `particles` sequences extend in parallel, each token drawn by [`crate::constraint::awrs`]
/// from the model's softmax restricted to the constraint and weighted by AWRS's estimate of
/// the allowed mass; when the effective sample size falls below half the particles they are
/// resampled (systematic resampling). This corrects the bias of choosing each token by the
/// constraint alone (locally constrained decoding favours prefixes that are likely now but
/// lead to text the constraint later forbids). The model's own distribution is the target:
/// the recipe's `decode` policy is not used. Needs the KV-cached step.
pub fn sample_smc(
    job: &Generation,
    regex: &crate::constraint::ByteConstraint,
    particles: usize,
) -> Result<SmcSampled, RunError> {
    let Generation { decode, state, context, prompt, tokens: n, seed, backend } = *job;
    let inc = compiler::incremental::incrementalize(decode, "tokens", "pos")
        .map_err(|e| RunError(format!("--particles needs the KV-cached decoding step: {}", e.0)))?;
    let (exe, mut st, seq) = step_program(&inc.graph, backend, state, prompt)?;
    let fresh: Vec<Buffer> = inc.caches.iter().map(|(_, d, s)| Buffer::zeros(*d, s.clone())).collect();
    let mut first = Particle {
        pending: seq[seq.len().saturating_sub(context)..].to_vec(),
        seq,
        generated: vec![],
        caches: fresh.clone(),
        filled: 0,
        logits: vec![],
        logw: 0.0,
        at: regex.start(),
        done: false,
    };
    // The prompt runs once; the particles start as copies.
    first.advance(exe.as_ref(), &inc.caches, &mut st, step_seed(seed, 1))?;
    let count = particles.max(1);
    let mut ps = vec![first; count];
    let mut u = crate::constraint::Uniform::new(seed ^ 0x5A17_u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (mut resamplings, mut checks, mut log_z) = (0usize, 0usize, 0.0f64);
    let started = std::time::Instant::now();
    let weights = |ps: &[Particle]| -> (f64, Vec<f64>) {
        let max = ps.iter().map(|p| p.logw).fold(f64::NEG_INFINITY, f64::max);
        (max, ps.iter().map(|p| if max.is_finite() { (p.logw - max).exp() } else { 0.0 }).collect())
    };
    for i in 0..n {
        for p in ps.iter_mut() {
            if p.done || p.logw == f64::NEG_INFINITY {
                continue;
            }
            if !regex.can_continue(p.at) {
                p.done = true;
                continue;
            }
            p.advance(exe.as_ref(), &inc.caches, &mut st, step_seed(seed, i + 1))?;
            let at = p.at;
            match crate::constraint::awrs(&p.logits, |t| t < 256 && regex.step(at, t as u8).is_some(), &mut u) {
                None => p.logw = f64::NEG_INFINITY,
                Some((t, logw, c)) => {
                    checks += c;
                    p.logw += logw;
                    p.at = regex.step(at, t as u8).expect("an allowed token steps");
                    p.seq.push(t as i32);
                    p.generated.push(t as i32);
                    if p.filled == context {
                        p.caches = fresh.clone();
                        p.filled = 0;
                        p.pending = p.seq[p.seq.len() - (context / 2).max(1)..].to_vec();
                    } else {
                        p.pending = vec![t as i32];
                    }
                }
            }
        }
        let (max, w) = weights(&ps);
        if !max.is_finite() {
            break; // every particle died: no text of this length satisfies the constraint
        }
        let sum: f64 = w.iter().sum();
        let ess = sum * sum / w.iter().map(|x| x * x).sum::<f64>();
        if ess < count as f64 / 2.0 {
            log_z += max + (sum / count as f64).ln();
            let step = sum / count as f64;
            let mut target = u.next() * step;
            let (mut acc, mut j) = (w[0], 0usize);
            let mut next = Vec::with_capacity(count);
            for _ in 0..count {
                while acc < target && j + 1 < count {
                    j += 1;
                    acc += w[j];
                }
                let mut q = ps[j].clone();
                q.logw = 0.0;
                next.push(q);
                target += step;
            }
            ps = next;
            resamplings += 1;
        }
        if ps.iter().all(|p| p.done || p.logw == f64::NEG_INFINITY) {
            break;
        }
    }
    let (max, w) = weights(&ps);
    let sum: f64 = w.iter().sum();
    if !max.is_finite() {
        return Err(RunError(
            "every particle was rejected: the model gives no allowed token after some prefix (no text satisfies the constraint)".into(),
        ));
    }
    log_z += max + (sum / count as f64).ln();
    let ess = sum * sum / w.iter().map(|x| x * x).sum::<f64>();
    let mut pick = u.next() * sum;
    let mut chosen = count - 1;
    for (j, x) in w.iter().enumerate() {
        if pick < *x {
            chosen = j;
            break;
        }
        pick -= x;
    }
    let tokens = ps[chosen].generated.clone();
    Ok(SmcSampled {
        complete: ps.iter().filter(|p| p.done || !regex.can_continue(p.at)).count(),
        seconds: started.elapsed().as_secs_f64(),
        tokens,
        particles: count,
        resamplings,
        ess,
        log_z,
        checks,
    })
}

/// Autoregressive decoding from a checkpoint's parameters, streamed to `out` token by token.
///
/// `Cached` runs the step derived from the naive decode graph: the prompt is fed one token at
/// a time (each step writes that position's keys and values), then every generated token
/// costs one step. When the caches are full (`context` positions), the last `context / 2`
/// tokens are fed again from position 0 (a context shift). `Window` recomputes the forward
/// pass over the last `context` tokens for each new token. Both draw the policy's randomness
/// under `seed ^ hash(token index)`; until the first context shift they choose the same tokens.
pub fn sample(
    job: &Generation,
    decoding: Decoding,
    guide: Option<Guide>,
    out: &mut dyn Write,
) -> Result<Sampled, RunError> {
    let Generation { decode, state, context, prompt, tokens: n, seed, backend } = *job;
    let mut fallback = None;
    let policy = guide.as_ref().map(|g| compile(g.policy, backend)).transpose()?;
    let mut at = guide.as_ref().and_then(|g| g.regex).map(|r| r.start());
    let (mut rejections, mut stopped, mut suffixes) = (0usize, None, 0usize);
    let no_more = "the constraint admits no further byte".to_string();
    // The token to emit after the step's policy chose `t` at step `i`, the text so far being
    // `seq`: `t` itself without a guide; the policy's draw from the ∞-gram mixture; then,
    // under a constraint, that token if allowed, else a draw without the rejected tokens
    // (`None` when the constraint admits no token).
    let mut choose =
        |t: i32, st: &mut BTreeMap<String, Value>, seq: &[i32], i: usize| -> Result<Option<i32>, RunError> {
            let (Some(g), Some(p)) = (&guide, &policy) else { return Ok(Some(t)) };
            let mut t = t;
            if let Some(m) = &g.ngram {
                let (tok, s) = ngram_token(m, p.as_ref(), st, seq, step_seed(seed, i + 1))?;
                t = tok;
                suffixes += s;
            }
            match (g.regex, &mut at) {
                (Some(regex), Some(a)) => {
                    constrained_token(regex, p.as_ref(), a, st, t, step_seed(seed, i + 1), &mut rejections)
                }
                _ => Ok(Some(t)),
            }
        };
    let cached = match decoding {
        Decoding::Cached => match compiler::incremental::incrementalize(decode, "tokens", "pos") {
            Ok(inc) => Some(inc),
            Err(e) => {
                fallback = Some(e.0);
                None
            }
        },
        Decoding::Window => None,
    };
    let graph = cached.as_ref().map(|c| &c.graph).unwrap_or(decode);
    let (exe, mut st, mut seq) = step_program(graph, backend, state, prompt)?;
    let emit = |out: &mut dyn Write, t: i32| -> Result<(), RunError> {
        if (0..256).contains(&t) {
            out.write_all(&[t as u8]).map_err(|e| RunError(format!("output: {e}")))?;
        } else {
            write!(out, "<{t}>").map_err(|e| RunError(format!("output: {e}")))?;
        }
        let _ = out.flush();
        Ok(())
    };
    let mut generated = vec![];
    let started = std::time::Instant::now();
    let guidance = guide.as_ref().and_then(|g| g.guidance);
    let mut guided = guidance.map(|_| Guided::default());
    match &cached {
        Some(inc) => {
            let reset = |st: &mut BTreeMap<String, Value>| {
                for (name, dtype, shape) in &inc.caches {
                    st.insert(name.clone(), Value::Host(Buffer::zeros(*dtype, shape.clone())));
                }
            };
            // Classifier-free guidance's unconditional stream: the same step on its own
            // caches, reading the negative text and then the generated tokens.
            let mut uncond = match guidance {
                Some(g) => {
                    let mut ust = BTreeMap::new();
                    for (k, v) in &st {
                        ust.insert(k.clone(), Value::Host(v.host()?.into_owned()));
                    }
                    reset(&mut ust);
                    let useq: Vec<i32> = if g.negative.is_empty() {
                        vec![b'\n' as i32]
                    } else {
                        g.negative.iter().map(|&b| b as i32).collect()
                    };
                    let pending = useq[useq.len().saturating_sub(context)..].to_vec();
                    let switch = GuidanceSwitch { threshold: g.threshold, off_at: None };
                    Some((ust, useq, pending, 0usize, switch))
                }
                None => None,
            };
            reset(&mut st);
            let mut filled = 0usize;
            let mut pending: Vec<i32> = seq[seq.len().saturating_sub(context)..].to_vec();
            for i in 0..n {
                for &t in &pending {
                    let mut extra = BTreeMap::new();
                    extra.insert("tokens".to_string(), i32_buffer(vec![1, 1], &[t]));
                    extra.insert("pos".to_string(), i32_buffer(vec![], &[filled as i32]));
                    run_named(&exe, &mut st, extra, step_seed(seed, i + 1))?;
                    filled += 1;
                }
                let mut t = scalar(&st, "token")? as i32;
                if let (Some((ust, _, upending, ufilled, switch)), Some(g), Some(report), Some(p)) =
                    (&mut uncond, guidance, &mut guided, &policy)
                {
                    report.conditional_steps += pending.len();
                    if switch.on() {
                        for &u in upending.iter() {
                            let mut extra = BTreeMap::new();
                            extra.insert("tokens".to_string(), i32_buffer(vec![1, 1], &[u]));
                            extra.insert("pos".to_string(), i32_buffer(vec![], &[*ufilled as i32]));
                            run_named(&exe, ust, extra, step_seed(seed, i + 1))?;
                            *ufilled += 1;
                            report.unconditional_steps += 1;
                        }
                        let (row, gamma) = guided_log_probs(&logits_row(&st)?, &logits_row(ust)?, g.scale);
                        report.gammas.push(gamma);
                        if switch.guide(i, gamma) {
                            t = policy_draw(p.as_ref(), &mut st, row, step_seed(seed, i + 1))?;
                            report.guided_tokens += 1;
                        } else {
                            report.off_at = switch.off_at;
                        }
                    }
                }
                let Some(t) = choose(t, &mut st, &seq, i)? else {
                    stopped = Some(no_more);
                    break;
                };
                seq.push(t);
                generated.push(t);
                emit(out, t)?;
                if filled == context {
                    reset(&mut st);
                    filled = 0;
                    pending = seq[seq.len() - (context / 2).max(1)..].to_vec();
                } else {
                    pending = vec![t];
                }
                if let Some((ust, useq, upending, ufilled, switch)) = &mut uncond {
                    if switch.on() {
                        useq.push(t);
                        if *ufilled == context {
                            reset(ust);
                            *ufilled = 0;
                            *upending = useq[useq.len() - (context / 2).max(1)..].to_vec();
                        } else {
                            *upending = vec![t];
                        }
                    }
                }
            }
        }
        None if guidance.is_some() => {
            return Err(RunError("classifier-free guidance runs the KV-cached step".into()));
        }
        None => {
            for i in 0..n {
                let window = &seq[seq.len().saturating_sub(context)..];
                let mut toks = window.to_vec();
                let pos = toks.len() - 1;
                toks.resize(context, 0);
                let mut extra = BTreeMap::new();
                extra.insert("tokens".to_string(), i32_buffer(vec![1, context], &toks));
                extra.insert("pos".to_string(), i32_buffer(vec![], &[pos as i32]));
                run_named(&exe, &mut st, extra, step_seed(seed, i + 1))?;
                let Some(t) = choose(scalar(&st, "token")? as i32, &mut st, &seq, i)? else {
                    stopped = Some(no_more);
                    break;
                };
                seq.push(t);
                generated.push(t);
                emit(out, t)?;
            }
        }
    }
    let caches = cached.as_ref().map(|c| (c.caches.len(), c.cache_bytes())).unwrap_or((0, 0));
    Ok(Sampled {
        caches,
        profile: exe.profile_report(25),
        seconds_per_token: started.elapsed().as_secs_f64() / generated.len().max(1) as f64,
        rejections,
        stopped,
        mean_suffix: guide
            .as_ref()
            .and_then(|g| g.ngram.as_ref())
            .map(|_| suffixes as f64 / generated.len().max(1) as f64),
        guidance: guided,
        tokens: generated,
        decoding: if cached.is_some() { Decoding::Cached } else { Decoding::Window },
        fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adaptive Guidance's rule on a synthetic γ sequence: on while γ ≤ γ̄, off from the
    /// first crossing (that step unguided), and never on again, even when γ falls back.
    #[test]
    fn adaptive_guidance_switches_off_once_at_the_first_crossing() {
        let gammas = [0.80, 0.90, 0.95, 0.99, 0.991, 0.5, 0.3, 0.999];
        let mut sw = GuidanceSwitch { threshold: Some(0.99), off_at: None };
        let guided: Vec<bool> = gammas.iter().enumerate().map(|(i, &g)| sw.guide(i, g)).collect();
        assert_eq!(guided, [true, true, true, true, false, false, false, false]);
        assert_eq!(sw.off_at, Some((4, 0.991)));
        assert!(!sw.on());
        // Without a threshold: plain classifier-free guidance at every step.
        let mut plain = GuidanceSwitch::default();
        assert!(gammas.iter().enumerate().all(|(i, &g)| plain.guide(i, g)));
        assert!(plain.on());
    }

    #[test]
    fn guided_log_probs_follow_the_formula() {
        let cond = [2.0, 0.5, -1.0, 0.0];
        let uncond = [0.0, 1.0, -3.0, 0.5];
        let lp = |x: &[f64]| {
            let z: f64 = x.iter().map(|v| v.exp()).sum::<f64>().ln();
            x.iter().map(|v| v - z).collect::<Vec<f64>>()
        };
        let (c, u) = (lp(&cond), lp(&uncond));
        let (g, gamma) = guided_log_probs(&cond, &uncond, 1.5);
        for k in 0..4 {
            assert!((g[k] - (c[k] + 0.5 * (c[k] - u[k]))).abs() < 1e-12);
        }
        // γ is Pearson's correlation of the two rows (shift-invariant).
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        let (mc, mu) = (mean(&cond), mean(&uncond));
        let dot: f64 = cond.iter().zip(&uncond).map(|(a, b)| (a - mc) * (b - mu)).sum();
        let norm = |x: &[f64], m: f64| x.iter().map(|a| (a - m) * (a - m)).sum::<f64>().sqrt();
        assert!((gamma - dot / (norm(&cond, mc) * norm(&uncond, mu))).abs() < 1e-12);
        let shifted: Vec<f64> = uncond.iter().map(|v| v + 7.0).collect();
        assert!((guided_log_probs(&cond, &shifted, 1.5).1 - gamma).abs() < 1e-12);
        // w = 1: the conditional log-probabilities exactly; identical rows: γ = 1.
        assert_eq!(guided_log_probs(&cond, &uncond, 1.0).0, c);
        assert!((guided_log_probs(&cond, &cond, 3.0).1 - 1.0).abs() < 1e-12);
    }
}
