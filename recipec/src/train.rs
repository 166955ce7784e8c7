//! `recipec train` and `recipec sample`: front end → training plan → runtime loops.

use crate::{load, loader, render};
use lang::diag::Diagnostic;
use lang::source::{FileId, SourceDb};
use lang::types::ItemRef;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub struct TrainRequest {
    pub file: PathBuf,
    pub recipe: Option<String>,
    pub steps: Option<usize>,
    pub checkpoint_every: Option<usize>,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub backend: String,
}

/// `recipec sample`'s options.
#[derive(clap::Args)]
pub struct SampleRequest {
    /// The `--out` directory of `recipec train`.
    pub dir: PathBuf,
    /// Text to continue (default: a newline).
    #[arg(long)]
    pub prompt: Option<String>,
    /// How many tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Seed of the policy's sampling (default: the recipe's seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Another decoding policy, e.g. `--policy "top_p(p = 0.95)"` or `greedy()`.
    #[arg(long)]
    pub policy: Option<String>,
    /// `cranelift`, `llvm` (the default in builds with the `llvm` feature) or `cuda`.
    #[arg(long, default_value = crate::DEFAULT_BACKEND)]
    pub backend: String,
    /// Recompute the whole window for every token instead of the KV-cached step.
    #[arg(long)]
    pub no_cache: bool,
    /// Print the decoding mode and the time per token to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Keep the generated text a prefix of a match of this regular expression (the policy
    /// draws again after a rejected token; stops when no byte can follow).
    #[arg(long)]
    pub constraint: Option<String>,
    /// With `--constraint`: sequential Monte Carlo over this many sequences, each token
    /// drawn and weighted by AWRS from the model's distribution (the policy is not used).
    #[arg(long)]
    pub particles: Option<usize>,
    /// Mix the model with the ∞-gram model of the run's training text (Infini-gram): the
    /// policy draws from λ·P_∞ + (1 − λ)·P_model, for this λ in (0, 1]
    #[arg(long, value_name = "LAMBDA")]
    pub infini_gram: Option<f64>,
    /// The model method that gives the logits, with its arguments after the tokens, e.g.
    /// `logits_cached(8, 8)` (default: `logits()`)
    #[arg(long, value_name = "CALL")]
    pub logits: Option<String>,
    /// Classifier-free guidance of scale W: the policy draws from
    /// log P(·|prompt) + (W − 1)·(log P(·|prompt) − log P(·|negative)), a second stream
    /// reading the generated text after `--negative` instead of the prompt
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// With `--cfg`: the unconditional stream's text (default: the prompt's last byte)
    #[arg(long, value_name = "TEXT")]
    pub negative: Option<String>,
    /// With `--cfg`: Adaptive Guidance turns guidance off for good at the first token where
    /// the two streams' log-probabilities have a cosine (centered) above this threshold, and
    /// the second stream stops running
    #[arg(long, value_name = "GAMMA", allow_negative_numbers = true)]
    pub adaptive_guidance: Option<f64>,
}

pub(crate) fn error(code: &'static str, msg: impl std::fmt::Display, help: &str) -> ExitCode {
    eprintln!("error[{code}]: {msg}");
    if !help.is_empty() {
        eprintln!("  = help: {help}");
    }
    ExitCode::from(1)
}

pub(crate) fn backend(name: &str) -> Result<runtime::Backend, ExitCode> {
    match name {
        "cranelift" => Ok(runtime::Backend::Cranelift),
        #[cfg(feature = "llvm")]
        "llvm" => Ok(runtime::Backend::Llvm),
        #[cfg(not(feature = "llvm"))]
        "llvm" => Err(error(
            "E0501",
            "this recipec was built without the LLVM backend",
            "build it with `cargo build --release -p recipec --features llvm` (needs LLVM 14: `apt install llvm-14-dev`)",
        )),
        "cuda" => match runtime::cuda::available() {
            Ok(()) => Ok(runtime::Backend::Cuda),
            Err(e) => Err(error("E0501", e, "train on the CPU with `--backend cranelift` (the default)")),
        },
        "cuda-emu" => match runtime::cuda_emu::available() {
            Ok(()) => Ok(runtime::Backend::CudaEmu),
            Err(e) => Err(error("E0501", e, "the CUDA emulator needs a C++ compiler (c++, g++ or clang++)")),
        },
        other => Err(error(
            "E0501",
            format!("unknown backend `{other}`"),
            "the training backends are cranelift, llvm, cuda and cuda-emu (the CUDA code on the CPU, for testing)",
        )),
    }
}

/// Analyzes the file(s), renders diagnostics, and finds the recipe.
fn front_end(
    db: &mut SourceDb,
    roots: &[lang::source::FileId],
    recipe: Option<&str>,
) -> Result<(lang::Analysis, ItemRef), ExitCode> {
    let analysis = lang::analyze(db, roots, &loader::FsLoader);
    let color = crate::color();
    for d in &analysis.diagnostics {
        // The synthetic import of `recipec sample --policy` is never "unused".
        if d.code == "W0002" && db.file(d.labels.first().map(|l| l.file).unwrap_or(roots[0])).name.ends_with("<sample>")
        {
            continue;
        }
        eprint!("{}", render::render(db, d, color));
    }
    if analysis.has_errors() {
        return Err(ExitCode::from(1));
    }
    let m = &analysis.modules.list[0];
    let mut found = None;
    for (i, item) in m.ast.items.iter().enumerate() {
        if let lang::ast::ItemKind::Recipe(r) = &item.kind {
            if recipe.map(|n| n == r.name.name).unwrap_or(found.is_none()) {
                found = Some(ItemRef { module: 0, item: i });
            }
        }
    }
    match found {
        Some(r) => Ok((analysis, r)),
        None => Err(error(
            "E0601",
            match recipe {
                Some(n) => format!("no recipe `{n}` in {}", db.file(roots[0]).name),
                None => format!("{} has no recipe", db.file(roots[0]).name),
            },
            "a trainable file declares `recipe NAME { model = ..., data = ..., loss = ..., optimize ... }`",
        )),
    }
}

pub(crate) fn plan_error(db: &SourceDb, e: compiler::lower::LowerError) -> ExitCode {
    let mut d = Diagnostic::error("E0601", e.message.clone());
    if let Some((f, span)) = e.at {
        d = d.label(f, span, "here");
    }
    d = d.help("nothing ran; fix this line (`recipec explain E0601`)");
    eprint!("{}", render::render(db, &d, crate::color()));
    ExitCode::from(1)
}

pub fn train(req: TrainRequest) -> ExitCode {
    let be = match backend(&req.backend) {
        Ok(b) => b,
        Err(c) => return c,
    };
    let (mut db, roots, ok) = load(std::slice::from_ref(&req.file));
    if !ok {
        return ExitCode::from(1);
    }
    let (analysis, r) = match front_end(&mut db, &roots, req.recipe.as_deref()) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let plan = match compiler::train::plan(&analysis.modules, &db, r) {
        Ok(p) => p,
        Err(e) => return plan_error(&db, e),
    };
    let out = req.out.clone().or_else(|| req.resume.clone()).unwrap_or_else(|| PathBuf::from("runs").join(&plan.name));
    if let Some(dir) = &req.resume {
        if let Err(e) = runtime::train::load_state(&plan, &dir.join("checkpoint.safetensors")) {
            return error(
                "E0602",
                e,
                "the checkpoint was left as it is; resume from an intact one or start afresh with another `--out`",
            );
        }
    }
    // The checkpoints the recipe reads (a teacher, `init_from`), checked before anything runs.
    let base = req.file.parent().unwrap_or(std::path::Path::new("."));
    let sources = match runtime::train::load_sources(&plan, base, req.resume.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            let d = Diagnostic::error("E0602", e.message).label(roots[0], e.span, "this checkpoint").help(e.help);
            eprint!("{}", render::render(&db, &d, crate::color()));
            return ExitCode::from(1);
        }
    };
    let opts = runtime::train::TrainOptions {
        steps: req.steps,
        checkpoint_every: req.checkpoint_every,
        out: out.clone(),
        resume: req.resume.clone(),
        backend: be,
        progress_bar: std::io::stderr().is_terminal(),
        source: db.file(roots[0]).text.clone(),
        source_path: req.file.clone(),
        sources: Some(sources),
    };
    runtime::train::install_interrupt_handler();
    let stderr = std::io::stderr();
    let mut log = stderr.lock();
    match runtime::train::train(&plan, &opts, &mut log) {
        Ok(s) => {
            let val = s.val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                log,
                "{} at step {} after {:.1} s: training loss {:.4}, validation loss {val} (unigram baseline {:.4})",
                if s.interrupted { "interrupted" } else { "done" },
                s.steps_done,
                s.seconds,
                s.final_loss,
                s.unigram
            );
            if let Some(t) = s.traffic {
                let h = |b: u64| compiler::plan::human(b as usize);
                let _ = writeln!(
                    log,
                    "device memory: {} copied in, {} copied out (the training state stays on the device; checkpoints copy it out)",
                    h(t.up),
                    h(t.down)
                );
            }
            let _ = writeln!(
                log,
                "wrote {d}/checkpoint.safetensors, {d}/metrics.jsonl, {d}/loss.svg\nsample with: recipec sample {d}{}",
                if s.interrupted {
                    format!("\ncontinue with: recipec train {} --resume {}", req.file.display(), out.display())
                } else {
                    String::new()
                },
                d = out.display()
            );
            if s.interrupted {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            let _ = writeln!(log);
            error("E0603", e, "see `recipec explain E0603`")
        }
    }
}

/// A finished or interrupted run, read back for sampling or scoring.
pub(crate) struct Run {
    pub(crate) db: SourceDb,
    pub(crate) analysis: lang::Analysis,
    pub(crate) r: ItemRef,
    pub(crate) plan: compiler::train::TrainPlan,
    /// The recipe's path when it trained (data paths are relative to it).
    pub(crate) source_path: String,
}

/// Reads the copy of the recipe in `dir` (a `recipec train` output) and plans it; `policies`
/// imports the stdlib's decoding policies beside it (for `--policy`).
pub(crate) fn open_run(dir: &Path, policies: bool) -> Result<Run, ExitCode> {
    let run_path = dir.join("run.json");
    let run: serde_json::Value = match std::fs::read_to_string(&run_path).map(|t| serde_json::from_str(&t)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return Err(error(
                "E0602",
                format!("{}: {e}", run_path.display()),
                "the directory is not a `recipec train` output",
            ))
        }
        Err(e) => {
            return Err(error(
                "E0602",
                format!("cannot read {}: {e}", run_path.display()),
                "pass the `--out` directory of `recipec train` (default `runs/RECIPE`)",
            ))
        }
    };
    let source = match std::fs::read_to_string(dir.join("recipe.recipe")) {
        Ok(t) => t,
        Err(e) => return Err(error("E0602", format!("cannot read {}: {e}", dir.join("recipe.recipe").display()), "")),
    };
    let source_path = run.get("source_path").and_then(|v| v.as_str()).unwrap_or("recipe.recipe").to_string();
    let recipe = run.get("recipe").and_then(|v| v.as_str()).map(|s| s.to_string());
    let mut db = SourceDb::new();
    let mut roots = vec![db.add(source_path.clone(), source)];
    if policies {
        let dir = Path::new(&source_path).parent().map(|p| p.display().to_string()).unwrap_or_default();
        let name = if dir.is_empty() { "<sample>".to_string() } else { format!("{dir}/<sample>") };
        roots.push(db.add(name, "use std.decode.{greedy, temperature, top_k, top_p}\n".to_string()));
    }
    let (analysis, r) = match front_end(&mut db, &roots, recipe.as_deref()) {
        Ok(x) => x,
        Err(c) => return Err(c),
    };
    let plan = match compiler::train::plan(&analysis.modules, &db, r) {
        Ok(p) => p,
        Err(e) => return Err(plan_error(&db, e)),
    };
    Ok(Run { db, analysis, r, plan, source_path })
}

/// The ∞-gram index of the run's training text (the data as training read it, without the
/// validation part).
fn ngram_index(
    plan: &compiler::train::TrainPlan,
    source_path: &str,
    stats: bool,
) -> Result<runtime::infinigram::InfiniGram, ExitCode> {
    let started = std::time::Instant::now();
    let base = Path::new(source_path).parent().unwrap_or(Path::new("")).to_path_buf();
    let tokens = runtime::data::load_tokens(&plan.data.kind, &plan.data.path, &base)
        .map_err(|e| error("E0602", e, "the ∞-gram model indexes the run's training data, read as training read it"))?;
    let split = ((tokens.len() as f64) * (1.0 - plan.data.val_fraction)).round() as usize;
    let index = runtime::infinigram::InfiniGram::build(&tokens[..split.min(tokens.len())]);
    if stats {
        eprintln!("∞-gram index: {} training tokens in {:.2} s", index.len(), started.elapsed().as_secs_f64());
    }
    Ok(index)
}

pub struct ScoreRequest {
    pub dir: PathBuf,
    /// λ of each ∞-gram mixture to score.
    pub lambdas: Vec<f64>,
    pub batches: Option<usize>,
    pub backend: String,
    /// The model method that gives the logits (`--logits`).
    pub logits: Option<String>,
}

/// `recipec score`: the run's validation windows, scored by the model alone and by its
/// mixtures with the ∞-gram model of the training text.
pub fn score(req: ScoreRequest) -> ExitCode {
    let be = match backend(&req.backend) {
        Ok(b) => b,
        Err(c) => return c,
    };
    if let Some(l) = req.lambdas.iter().find(|l| !(**l > 0.0 && **l <= 1.0)) {
        return error("E0604", format!("`--infini-gram` takes λ in (0, 1], got {l}"), "e.g. `--infini-gram 0.1,0.3`");
    }
    let Run { mut db, analysis, r, plan, source_path } = match open_run(&req.dir, true) {
        Ok(x) => x,
        Err(c) => return c,
    };
    // The policy does not matter: only the step's logits are read.
    let f = db.add("<score>", "greedy()".to_string());
    let greedy = lang::parse::parse_expr(f, "greedy()").expect("a valid expression");
    let masked: Vec<String> = plan.params.iter().filter(|p| p.sparsity.is_some()).map(|p| p.path.clone()).collect();
    let call = match logits_option(&mut db, req.logits.as_deref()) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let call = call.as_ref().map(|(e, f)| (e, *f));
    let decode =
        match compiler::train::decode_graph(&analysis.modules, &db, r, &greedy, &masked, plan.data.context, call) {
            Ok(g) => g,
            Err(e) => return plan_error(&db, e),
        };
    let state = match runtime::train::load_state(&plan, &req.dir.join("checkpoint.safetensors")) {
        Ok((s, _)) => s,
        Err(e) => return error("E0602", e, "score the directory of a finished or interrupted `recipec train`"),
    };
    let base = Path::new(&source_path).parent().unwrap_or(Path::new("")).to_path_buf();
    let d = &plan.data;
    let corpus = match runtime::data::load_tokens(&d.kind, &d.path, &base)
        .and_then(|t| runtime::data::Corpus::new(t, d.val_fraction, d.context, d.batch, plan.settings.seed))
    {
        Ok(c) => c,
        Err(e) => return error("E0602", e, "scoring reads the run's data as training read it"),
    };
    let index = if req.lambdas.is_empty() {
        None
    } else {
        match ngram_index(&plan, &source_path, false) {
            Ok(i) => Some(i),
            Err(c) => return c,
        }
    };
    let batches = req.batches.unwrap_or(plan.settings.eval_batches).max(1);
    match runtime::train::score(&decode, &state, &corpus, batches, be, index.as_ref(), &req.lambdas) {
        Ok(s) => {
            println!(
                "validation text: {} predicted tokens ({batches} batches of {} windows of {}, as training's validation)",
                s.tokens, d.batch, d.context
            );
            println!("model:                       {:.4} nats/token", s.model_nats);
            for (l, nats) in &s.mixtures {
                println!(
                    "with the ∞-gram, λ = {l:<6}  {nats:.4} nats/token ({:+.2}%)",
                    100.0 * (nats / s.model_nats - 1.0)
                );
            }
            if let Some(i) = &index {
                println!(
                    "∞-gram: {} training tokens indexed; longest suffix found {:.1} tokens on average; \
                     probability 0 for {:.1}% of the tokens",
                    i.len(),
                    s.mean_suffix,
                    100.0 * s.ngram_zero
                );
            }
            eprintln!("{:.1} s ({})", s.seconds, if s.cached { "KV-cached step" } else { "whole window per position" });
            ExitCode::SUCCESS
        }
        Err(e) => error("E0603", e, ""),
    }
}

/// `--logits name(args…)`: the model method that gives the logits, parsed (its diagnostics
/// rendered).
fn logits_option(db: &mut SourceDb, text: Option<&str>) -> Result<Option<(lang::ast::Expr, FileId)>, ExitCode> {
    let Some(text) = text else { return Ok(None) };
    let f = db.add("<--logits>", text.to_string());
    match lang::parse::parse_expr(f, text) {
        Ok(e) => Ok(Some((e, f))),
        Err(diags) => {
            for d in &diags {
                eprint!("{}", render::render(db, d, crate::color()));
            }
            Err(ExitCode::from(1))
        }
    }
}

pub fn sample(req: SampleRequest) -> ExitCode {
    let be = match backend(&req.backend) {
        Ok(b) => b,
        Err(c) => return c,
    };
    let Run { mut db, analysis, r, plan, source_path } = match open_run(&req.dir, req.policy.is_some()) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let regex = match req.constraint.as_deref().map(runtime::constraint::ByteConstraint::new).transpose() {
        Ok(c) => c,
        Err(e) => return error("E0604", e, "see `recipec explain E0604`"),
    };
    match (req.particles, &regex) {
        (Some(0), _) => return error("E0604", "`--particles` must be at least 1", ""),
        (Some(_), None) => {
            return error("E0604", "`--particles` weights sequences by a constraint", "add `--constraint REGEX`")
        }
        (Some(_), Some(_)) if req.no_cache => {
            return error("E0604", "`--particles` runs the KV-cached step", "leave out `--no-cache`")
        }
        _ => {}
    }
    match req.infini_gram {
        Some(l) if !(l > 0.0 && l <= 1.0) => {
            return error("E0604", format!("`--infini-gram` takes λ in (0, 1], got {l}"), "e.g. `--infini-gram 0.3`")
        }
        Some(_) if req.particles.is_some() => {
            return error(
                "E0604",
                "`--infini-gram` and `--particles` do not combine",
                "SMC targets the model's own distribution; leave out one of them",
            )
        }
        _ => {}
    }
    match (req.cfg, req.adaptive_guidance) {
        (Some(w), _) if !(w.is_finite() && w >= 0.0) => {
            return error("E0604", format!("`--cfg` takes a scale W ≥ 0, got {w}"), "e.g. `--cfg 1.5` (1: no guidance)")
        }
        (None, Some(_)) => {
            return error("E0604", "`--adaptive-guidance` turns off `--cfg`'s guidance", "add `--cfg W`")
        }
        (_, Some(g)) if !(-1.0..=1.0).contains(&g) => {
            return error("E0604", format!("`--adaptive-guidance` takes a cosine in [-1, 1], got {g}"), "e.g. 0.99")
        }
        (Some(_), _) if req.particles.is_some() || req.no_cache => {
            return error(
                "E0604",
                "`--cfg` does not combine with `--particles` or `--no-cache`",
                "guidance runs two KV-cached streams under the policy",
            )
        }
        _ => {}
    }
    if req.negative.is_some() && req.cfg.is_none() {
        return error("E0604", "`--negative` is the text of `--cfg`'s unconditional stream", "add `--cfg W`");
    }
    // The policy's expression: `--policy`, or the recipe's `decode`.
    let policy_expr = match &req.policy {
        Some(text) => {
            let f = db.add("<--policy>", text.clone());
            match lang::parse::parse_expr(f, text) {
                Ok(e) => Some(e),
                Err(diags) => {
                    for d in &diags {
                        eprint!("{}", render::render(&db, d, crate::color()));
                    }
                    return ExitCode::from(1);
                }
            }
        }
        None => match &analysis.modules.item(r).kind {
            lang::ast::ItemKind::Recipe(rec) => rec.field("decode").cloned(),
            _ => None,
        },
    };
    let logits_call = match logits_option(&mut db, req.logits.as_deref()) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let decode = match (req.policy.is_some() || logits_call.is_some(), &policy_expr) {
        (true, Some(expr)) => {
            let masked: Vec<String> =
                plan.params.iter().filter(|p| p.sparsity.is_some()).map(|p| p.path.clone()).collect();
            let call = logits_call.as_ref().map(|(e, f)| (e, *f));
            match compiler::train::decode_graph(&analysis.modules, &db, r, expr, &masked, plan.data.context, call) {
                Ok(g) => g,
                Err(e) => return plan_error(&db, e),
            }
        }
        _ => match &plan.decode {
            Some(g) => g.clone(),
            None => {
                return error(
                    "E0601",
                    format!("recipe `{}` sets no `decode` policy", plan.name),
                    "add `decode = top_k(k = 40)` to the recipe, or pass `--policy \"top_k(k = 40)\"`",
                )
            }
        },
    };
    let state = match runtime::train::load_state(&plan, &req.dir.join("checkpoint.safetensors")) {
        Ok((s, _)) => s,
        Err(e) => return error("E0602", e, "sample from the directory of a finished or interrupted `recipec train`"),
    };
    let prompt = req.prompt.clone().unwrap_or_default();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = out.write_all(prompt.as_bytes());
    let seed = req.seed.unwrap_or(plan.settings.seed);
    let mode = if req.no_cache { runtime::train::Decoding::Window } else { runtime::train::Decoding::Cached };
    let job = runtime::train::Generation {
        decode: &decode,
        state: &state,
        context: plan.data.context,
        prompt: prompt.as_bytes(),
        tokens: req.tokens,
        seed,
        backend: be,
    };
    if let (Some(k), Some(regex)) = (req.particles, &regex) {
        return match runtime::train::sample_smc(&job, regex, k) {
            Ok(s) => {
                let text: Vec<u8> = s.tokens.iter().map(|&t| t as u8).collect();
                let _ = out.write_all(&text);
                let _ = writeln!(out);
                if req.stats {
                    eprintln!(
                        "{} tokens; SMC over {} particles: {} resamplings, final effective sample size {:.2}, \
                         {} complete, log Z estimate {:.4}; {} constraint checks; {:.3} ms per token per particle",
                        s.tokens.len(),
                        s.particles,
                        s.resamplings,
                        s.ess,
                        s.complete,
                        s.log_z,
                        s.checks,
                        s.seconds * 1e3 / (s.tokens.len().max(1) * s.particles) as f64
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => error("E0603", e, ""),
        };
    }
    let policy = match (regex.is_some() || req.infini_gram.is_some() || req.cfg.is_some(), &policy_expr) {
        (true, Some(expr)) => {
            let vocab = decode
                .outputs
                .iter()
                .find(|(n, _)| n == "logits")
                .map(|(_, id)| decode.node(*id).shape.iter().product::<usize>())
                .unwrap_or(256);
            match compiler::train::policy_graph(&analysis.modules, &db, r, expr, vocab) {
                Ok(g) => Some(g),
                Err(e) => return plan_error(&db, e),
            }
        }
        _ => None,
    };
    // The ∞-gram index over the run's training text (the validation part is left out).
    let index = match req.infini_gram.map(|_| ngram_index(&plan, &source_path, req.stats)).transpose() {
        Ok(i) => i,
        Err(c) => return c,
    };
    // The unconditional stream reads the prompt's last byte by default (as Transformers'
    // classifier-free guidance reads the prompt's last token).
    let negative: Vec<u8> = match &req.negative {
        Some(n) => n.as_bytes().to_vec(),
        None => prompt.as_bytes().last().map(|b| vec![*b]).unwrap_or_default(),
    };
    let guide = policy.as_ref().map(|policy| runtime::train::Guide {
        policy,
        regex: regex.as_ref(),
        ngram: index.as_ref().map(|index| runtime::train::NgramMix { index, lambda: req.infini_gram.unwrap_or(0.0) }),
        guidance: req.cfg.map(|scale| runtime::train::Guidance {
            scale,
            negative: &negative,
            threshold: req.adaptive_guidance,
        }),
    });
    match runtime::train::sample(&job, mode, guide, &mut out) {
        Ok(s) => {
            let _ = writeln!(out);
            if let Some(why) = &s.fallback {
                eprintln!("note: sampling without a KV cache (each token recomputes the window): {why}");
            }
            if let Some(why) = &s.stopped {
                eprintln!("note: stopped after {} tokens: {why}", s.tokens.len());
            }
            if req.stats {
                let mode = match s.decoding {
                    runtime::train::Decoding::Cached => {
                        format!("KV-cached ({} caches, {} KiB)", s.caches.0, s.caches.1 / 1024)
                    }
                    runtime::train::Decoding::Window => "whole window per token".to_string(),
                };
                eprintln!("{} tokens, {mode}, {:.3} ms per token", s.tokens.len(), s.seconds_per_token * 1e3);
                if req.constraint.is_some() {
                    eprintln!(
                        "constraint: {} drawn tokens rejected ({} checks for {} tokens)",
                        s.rejections,
                        s.rejections + s.tokens.len(),
                        s.tokens.len()
                    );
                }
                if let Some(m) = s.mean_suffix {
                    eprintln!(
                        "∞-gram (λ = {}): the longest suffix of the text found in the training data had {m:.1} tokens on average",
                        req.infini_gram.unwrap_or(0.0)
                    );
                }
                if let Some(g) = &s.guidance {
                    let off = match g.off_at {
                        Some((i, gamma)) => format!(
                            "adaptive guidance turned it off at token {} (cosine {gamma:.4} > {})",
                            i + 1,
                            req.adaptive_guidance.unwrap_or(1.0)
                        ),
                        None => "on to the end".to_string(),
                    };
                    eprintln!(
                        "guidance (w = {}): {} of {} tokens guided, {off}; {} unconditional steps for {} conditional ({:.0}% more model steps)",
                        req.cfg.unwrap_or(1.0),
                        g.guided_tokens,
                        s.tokens.len(),
                        g.unconditional_steps,
                        g.conditional_steps,
                        100.0 * g.unconditional_steps as f64 / g.conditional_steps.max(1) as f64
                    );
                    if let (Some(first), Some(last)) = (g.gammas.first(), g.gammas.last()) {
                        eprintln!(
                            "cosine of the two streams: {first:.4} at the first token, {last:.4} at the last measured ({} measured)",
                            g.gammas.len()
                        );
                    }
                }
                if let Some(p) = &s.profile {
                    eprint!("{p}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => error("E0603", e, ""),
    }
}

/// `recipec build RECIPE --emit plan`, after the training step's detailed plan: every entry
/// point the training loop and the sampler run, with its arguments (caller-owned: parameters,
/// states, caches), its arena and its peak, so the memory of the whole job is known before
/// anything runs.
pub fn print_entry_points(file: &Path, recipe: &str) -> ExitCode {
    let source = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return error("E0601", format!("cannot read {}: {e}", file.display()), ""),
    };
    let mut db = SourceDb::new();
    let roots = vec![db.add(file.display().to_string(), source)];
    let (analysis, r) = match front_end(&mut db, &roots, Some(recipe)) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let plan = match compiler::train::plan(&analysis.modules, &db, r) {
        Ok(p) => p,
        Err(e) => return plan_error(&db, e),
    };
    let mut graphs: Vec<(String, compiler::ir::Graph, String)> = vec![
        ("init".into(), plan.init.clone(), "once".into()),
        (
            "grad".into(),
            plan.grad.clone(),
            match plan.settings.accumulate {
                1 => "per step".to_string(),
                k => format!("{k} times per step (micro-batches)"),
            },
        ),
        ("eval".into(), plan.eval.clone(), "per validation batch".into()),
        ("update".into(), plan.update.clone(), refresh_steps(&plan.refresh_periods)),
        ("update (steady)".into(), plan.update_steady.clone(), "every other step".into()),
    ];
    if let Some(m) = &plan.masks {
        graphs.push(("masks".into(), m.clone(), "per step".into()));
    }
    if plan.settings.accumulate > 1 {
        let k = plan.settings.accumulate;
        match compiler::train::accumulation(&plan.grad, k) {
            Ok([start, add, finish]) => {
                graphs.push(("accumulate (start)".into(), start, "per step, after the first micro-batch".into()));
                if k > 2 {
                    let times = if k == 3 { "once".to_string() } else { format!("{} times", k - 2) };
                    graphs.push(("accumulate (add)".into(), add, format!("{times} per step")));
                }
                graphs.push(("accumulate (finish)".into(), finish, "per step, after the last micro-batch".into()));
            }
            Err(e) => return error("E0502", format!("this is a bug in recipec: accumulate: {}", e.0), ""),
        }
    }
    if let Some(d) = &plan.decode {
        graphs.push(("decode (window)".into(), d.clone(), "per token with --no-cache".into()));
        match compiler::incremental::incrementalize(d, "tokens", "pos") {
            Ok(inc) => {
                let bytes = inc.cache_bytes();
                let note = format!(
                    "per token; {} KV caches, {} of the arguments",
                    inc.caches.len(),
                    compiler::plan::human(bytes)
                );
                graphs.push(("decode (KV-cached)".into(), inc.graph, note));
            }
            Err(e) => println!("  decode: no KV-cached step ({e})"),
        }
    }
    println!("entry points of recipe `{}`", plan.name);
    println!(
        "  {:<20} {:>12} {:>12} {:>12}  {:<44} runs",
        "entry point", "arguments", "arena", "peak live", "largest at the peak (recipe line)"
    );
    let mut training: Vec<compiler::kernel::Program> = vec![];
    // The GPU's programs, where its pipeline plans them differently (a blocked cross-entropy
    // recomputes the classifier's gradient there and keeps no gradient block).
    let mut gpu: Vec<compiler::kernel::Program> = vec![];
    for (name, mut g, note) in graphs {
        if !name.starts_with("decode") {
            let mut gg = g.clone();
            let target = compiler::passes::Target::Cuda;
            if let Err(e) = compiler::passes::run_pipeline_for(&mut gg, None, &mut vec![], target) {
                return error("E0502", format!("this is a bug in recipec: {name}: {}", e.0), "");
            }
            match compiler::kernel::schedule(&gg) {
                Ok(p) => gpu.push(p),
                Err(e) => return error("E0502", format!("this is a bug in recipec: {name}: {e}"), ""),
            }
        }
        if let Err(e) = compiler::passes::run_pipeline(&mut g, None, &mut vec![]) {
            return error("E0502", format!("this is a bug in recipec: {name}: {}", e.0), "");
        }
        let p = match compiler::kernel::schedule(&g) {
            Ok(p) => p,
            Err(e) => return error("E0502", format!("this is a bug in recipec: {name}: {e}"), ""),
        };
        let h = compiler::plan::human;
        let largest = match p.peak_groups().first() {
            Some(g) if g.count > 1 => format!("{} {} × {} {}", h(g.bytes), g.count, g.ty, g.origin),
            Some(g) => format!("{} {} {}", h(g.bytes), g.ty, g.origin),
            None => "-".into(),
        };
        println!(
            "  {:<20} {:>12} {:>12} {:>12}  {:<44} {note}",
            name,
            h(p.argument_bytes),
            h(p.arena_bytes),
            h(p.peak_bytes),
            largest
        );
        if !name.starts_with("decode") {
            training.push(p);
        }
    }
    let (arena, state) = compiler::kernel::job_bytes(&training.iter().collect::<Vec<_>>());
    let h = compiler::plan::human;
    println!(
        "  `recipec train` runs every entry point above but the decode steps in one arena, the largest: {}",
        h(arena)
    );
    let (gpu_arena, gpu_state) = compiler::kernel::job_bytes(&gpu.iter().collect::<Vec<_>>());
    let on = if (gpu_arena, gpu_state) == (arena, state) {
        "on the CPU, or on the GPU with `--backend cuda`".to_string()
    } else {
        format!(
            "on the CPU; on the GPU with `--backend cuda` {}, an arena of {}",
            h(gpu_arena + gpu_state),
            h(gpu_arena)
        )
    };
    let teacher = match &plan.teacher {
        Some(t) => {
            let bytes: usize =
                t.params.iter().map(|p| p.shape.iter().product::<usize>() * compiler::plan::dtype_bytes(p.dtype)).sum();
            format!(", the frozen teacher's {} from \"{}\"", h(bytes), t.from.path)
        }
        None => String::new(),
    };
    println!(
        "  `recipec train` needs {} in all ({on}): that arena and {} of training state (parameters, optimizer states, masks, gradients, the batch{teacher})",
        h(arena + state),
        h(state)
    );
    if let Some(src) = &plan.init_from {
        println!("  the model starts from the parameters in \"{}\" (init_from)", src.path);
    }
    ExitCode::SUCCESS
}

/// When the update with the optimizers' state initializers runs: step 1, and every `K` steps
/// for each `state ... every K` (`update (steady)`, without them, runs the other steps).
fn refresh_steps(periods: &[u64]) -> String {
    match periods {
        [] => "at step 1".into(),
        ks => {
            let ks: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
            format!("at step 1 and every {} steps", ks.join(" or "))
        }
    }
}
