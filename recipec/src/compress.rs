//! `recipec compress`: a trained run's weight matrices quantized to a bit budget (or pruned to
//! a sparsity), with the bit width (the sparsity) of each matrix chosen by EvoPress's
//! evolutionary search ([`runtime::compress`]).

use crate::train::{backend, error, open_run, Run};
use runtime::compress::{adaptive_group, prune_magnitude, quantize_groups, search, Granularity, SearchOptions, Unit};
use runtime::train::{compile, run_named};
use runtime::{Buffer, Value};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `recipec compress`'s options.
#[derive(clap::Args)]
pub struct CompressRequest {
    /// The `--out` directory of `recipec train`.
    pub dir: PathBuf,
    /// The average bit width of the quantized matrices (one of `--levels`; default 4): every
    /// matrix starts there, and the search moves bits between matrices of the same size.
    #[arg(long)]
    pub bits: Option<u32>,
    /// Prune instead of quantizing: the average sparsity of the matrices (one of `--levels`),
    /// each pruned by magnitude, the search moving sparsity between matrices of the same size.
    #[arg(long, allow_negative_numbers = true)]
    pub sparsity: Option<f64>,
    /// The bit widths (sparsities) a matrix may take, equally spaced (default: `2,3,4,5,6,7,8`
    /// bits; sparsities `0,0.1,…,0.9`).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub levels: Option<Vec<f64>>,
    /// Quantization group: `64`, this many consecutive weights along a matrix's last axis
    /// share a scale (as the stdlib's `quantize_groups`); or `adaptive[:MIN[:TOL]]`,
    /// FineQuant's adaptive granularity per matrix and bit width: one group per row, halved
    /// while its error is more than 1 + TOL times that of the finest group not below MIN
    /// (defaults 32 and 0.2).
    #[arg(long, default_value = "64")]
    pub group: String,
    /// Which parameters to compress: a selector as in a recipe's `optimize`, e.g.
    /// `model.blocks.**` (only matrices whose last axis the group divides are taken).
    #[arg(long, default_value = "model.**")]
    pub units: String,
    /// Generations of the (1 + λ) search (0: the uniform assignment only).
    #[arg(long, default_value_t = 20)]
    pub generations: usize,
    /// λ: offspring per generation.
    #[arg(long, default_value_t = 8)]
    pub offspring: usize,
    /// Selection stages, SURVIVORS:BATCHES each: the candidates are ranked by their loss
    /// on that many calibration batches (training batches) and the best survive.
    #[arg(long, default_value = "2:1,1:4")]
    pub selection: String,
    /// Level switches per offspring: 1 to this many.
    #[arg(long, default_value_t = 2)]
    pub mutations: usize,
    /// What the search minimizes on the calibration batches: `kl`, the mean KL divergence
    /// from the dense model's next-token distribution to the compressed one's (EvoPress's
    /// default; needs the model's `logits` method), or `loss`, the recipe's loss.
    #[arg(long, default_value = "kl")]
    pub fitness: String,
    /// Seed of the search (default: the recipe's seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The new run directory (default: `DIR-wBITS`, or `DIR-sPERCENT` when pruning, beside
    /// the run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `cranelift`, `llvm` (the default in builds with the `llvm` feature) or `cuda`.
    #[arg(long, default_value = crate::DEFAULT_BACKEND)]
    pub backend: String,
}

/// `model.blocks.**` → selector segments.
fn parse_selector(text: &str) -> Result<Vec<lang::ast::SelectorSegment>, String> {
    use lang::ast::SelectorSegment as S;
    text.split('.')
        .map(|seg| {
            Ok(match seg {
                "" => return Err(format!("`{text}`: an empty segment")),
                "**" => S::StarStar,
                "*" => S::Star,
                s if s.starts_with('{') && s.ends_with('}') => {
                    S::Alt(s[1..s.len() - 1].split(',').map(|n| n.trim().to_string()).collect())
                }
                s if s.chars().all(|c| c.is_ascii_digit()) => S::Index(s.parse().map_err(|_| format!("`{s}`"))?),
                s if s.chars().all(|c| c.is_alphanumeric() || c == '_') => S::Name(s.to_string()),
                s => return Err(format!("`{s}` is not a name, an index, `*`, `**` or `{{a, b}}`")),
            })
        })
        .collect()
}

fn equally_spaced(levels: &[f64]) -> bool {
    levels.len() >= 2
        && levels.windows(2).all(|w| w[1] > w[0] && ((w[1] - w[0]) - (levels[1] - levels[0])).abs() < 1e-9)
}

/// `64` or `adaptive[:MIN[:TOL]]`.
fn parse_granularity(text: &str) -> Result<Granularity, String> {
    let mut parts = text.split(':');
    let head = parts.next().unwrap_or("");
    if head == "adaptive" {
        let min = match parts.next() {
            None => 32,
            Some(m) => m.parse::<usize>().ok().filter(|m| *m >= 1).ok_or(format!("`{m}` is not a group size"))?,
        };
        let tolerance = match parts.next() {
            None => 0.2,
            Some(t) => t.parse::<f64>().ok().filter(|t| *t >= 0.0).ok_or(format!("`{t}` is not a tolerance >= 0"))?,
        };
        if parts.next().is_some() {
            return Err("`adaptive` takes at most a minimum group and a tolerance".into());
        }
        return Ok(Granularity::Adaptive { min, tolerance });
    }
    match text.parse::<usize>() {
        Ok(g) if g >= 1 => Ok(Granularity::Fixed(g)),
        _ => Err(format!("`{text}` is neither a group size nor `adaptive[:MIN[:TOL]]`")),
    }
}

/// What a level does to a matrix.
#[derive(Clone, Copy)]
enum Mode {
    /// Round-to-nearest group quantization to `level` bits.
    Quantize { group: Granularity },
    /// Magnitude pruning to sparsity `level`.
    Prune,
}

impl Mode {
    /// The quantity a level is: `bits` or `sparsity`.
    fn name(self) -> &'static str {
        match self {
            Mode::Quantize { .. } => "bits",
            Mode::Prune => "sparsity",
        }
    }
    /// The compressed weights, and the quantization group they took.
    fn apply(self, w: &Buffer, level: f64) -> Result<(Vec<f32>, Option<usize>), runtime::RunError> {
        let last = w.shape[1];
        match self {
            Mode::Quantize { group: Granularity::Fixed(g) } => {
                Ok((quantize_groups(w.f32s(), last, level as u32, g)?, Some(g)))
            }
            Mode::Quantize { group: Granularity::Adaptive { min, tolerance } } => {
                let (g, q) = adaptive_group(w.f32s(), last, level as u32, min, tolerance)?;
                Ok((q, Some(g)))
            }
            Mode::Prune => Ok((prune_magnitude(w.f32s(), level)?, None)),
        }
    }
    fn show(self, level: f64) -> String {
        match self {
            Mode::Quantize { .. } => format!("{level}"),
            Mode::Prune => format!("{:.0}%", level * 100.0),
        }
    }
}

pub fn compress(req: CompressRequest) -> ExitCode {
    let be = match backend(&req.backend) {
        Ok(b) => b,
        Err(c) => return c,
    };
    let (mode, target, levels) = match (req.bits, req.sparsity) {
        (Some(_), Some(_)) => {
            return error("E0605", "`--bits` and `--sparsity` do not combine", "quantize or prune, one at a time")
        }
        (None, Some(s)) => {
            let levels = req.levels.clone().unwrap_or_else(|| (0..10).map(|k| k as f64 / 10.0).collect());
            (Mode::Prune, s, levels)
        }
        (bits, None) => {
            let levels = req.levels.clone().unwrap_or_else(|| (2..=8).map(|b| b as f64).collect());
            let group = match parse_granularity(&req.group) {
                Ok(g) => g,
                Err(e) => {
                    return error(
                        "E0605",
                        format!("`--group {}`: {e}", req.group),
                        "e.g. `--group 64` or `--group adaptive:32:0.2`",
                    )
                }
            };
            (Mode::Quantize { group }, bits.unwrap_or(4) as f64, levels)
        }
    };
    let in_range = |l: &f64| match mode {
        Mode::Quantize { .. } => l.fract() == 0.0 && (2.0..=16.0).contains(l),
        Mode::Prune => (0.0..1.0).contains(l),
    };
    if !equally_spaced(&levels) || !levels.iter().all(in_range) {
        let range = match mode {
            Mode::Quantize { .. } => "whole bit widths within 2..16",
            Mode::Prune => "sparsities in [0, 1)",
        };
        return error(
            "E0605",
            format!("`--levels {levels:?}`: the levels must be increasing, equally spaced, {range}"),
            "a level switch moves one step up in one matrix and one down in another: equal steps keep the total",
        );
    }
    let Some(start_level) = levels.iter().position(|&l| (l - target).abs() < 1e-9) else {
        return error(
            "E0605",
            format!("`--{} {target}` is not one of `--levels` {levels:?}", mode.name()),
            "e.g. `--bits 4 --levels 2,3,4,5,6` or `--sparsity 0.5 --levels 0,0.25,0.5,0.75`",
        );
    };
    let stages = match runtime::compress::parse_stages(&req.selection) {
        Ok(s) => s,
        Err(e) => {
            return error("E0605", format!("`--selection {}`: {e}", req.selection), "e.g. `--selection 4:1,2:2,1:8`")
        }
    };
    let selector = match parse_selector(&req.units) {
        Ok(s) => s,
        Err(e) => return error("E0605", format!("`--units`: {e}"), "e.g. `--units 'model.blocks.**'`"),
    };
    let kl = match req.fitness.as_str() {
        "kl" => true,
        "loss" => false,
        other => return error("E0605", format!("`--fitness {other}`"), "the fitness is `kl` or `loss`"),
    };
    let Run { plan, source_path, db, analysis, r } = match open_run(&req.dir, false) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let (mut dense, step) = match runtime::train::load_state(&plan, &req.dir.join("checkpoint.safetensors")) {
        Ok(s) => s,
        Err(e) => return error("E0602", e, "compress the directory of a finished or interrupted `recipec train`"),
    };
    let base = Path::new(&source_path).parent().unwrap_or(Path::new("")).to_path_buf();
    if plan.teacher.is_some() {
        match runtime::train::load_sources(&plan, &base, Some(&req.dir)) {
            Ok(s) => dense.extend(s.teacher),
            Err(e) => return error("E0602", e.message, &e.help),
        }
    }
    let units: Vec<Unit> = plan
        .params
        .iter()
        .filter(|p| p.shape.len() == 2 && p.dtype == lang::types::Dtype::F32 && !p.buffer)
        .filter(|p| match mode {
            Mode::Quantize { group: Granularity::Fixed(g) } => p.shape[1] % g == 0,
            Mode::Quantize { group: Granularity::Adaptive { .. } } | Mode::Prune => true,
        })
        .filter(|p| {
            let path: Vec<String> = p.path.split('.').map(|s| s.to_string()).collect();
            lang::recipe::selector_matches(&selector, &path)
        })
        .map(|p| Unit { path: p.path.clone(), numel: p.shape.iter().product() })
        .collect();
    if units.is_empty() {
        return error(
            "E0605",
            match mode {
                Mode::Quantize { group: Granularity::Fixed(g) } => {
                    format!("`--units {}` selects no f32 matrix whose last axis a group of {g} divides", req.units)
                }
                _ => format!("`--units {}` selects no f32 matrix", req.units),
            },
            "list the parameters with `recipec build RECIPE`; try a smaller `--group`",
        );
    }
    let out = req.out.clone().unwrap_or_else(|| {
        let name = req.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
        let suffix = match mode {
            Mode::Quantize { .. } => format!("w{target}"),
            Mode::Prune => format!("s{:02.0}", target * 100.0),
        };
        req.dir.with_file_name(format!("{name}-{suffix}"))
    });
    if out.exists() && std::fs::read_dir(&out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return error(
            "E0605",
            format!("{} exists and is not empty", out.display()),
            "choose another `--out`, or delete that directory",
        );
    }
    let d = &plan.data;
    let corpus = match runtime::data::load_tokens(&d.kind, &d.path, &base)
        .and_then(|t| runtime::data::Corpus::new(t, d.val_fraction, d.context, d.batch, plan.settings.seed))
    {
        Ok(c) => c,
        Err(e) => {
            return error("E0603", e, "compression calibrates on the run's training data, read as training read it")
        }
    };
    let eval = match compile(&plan.eval, be) {
        Ok(e) => e,
        Err(e) => return error("E0603", e, ""),
    };
    // The KL fitness reads the model's logits over a batch.
    let logits_exe = if kl {
        let masked: Vec<String> = plan.params.iter().filter(|p| p.sparsity.is_some()).map(|p| p.path.clone()).collect();
        let g =
            match compiler::train::logits_graph(&analysis.modules, &db, r, &masked, plan.data.batch, plan.data.context)
            {
                Ok(g) => g,
                Err(e) => {
                    return error(
                        "E0605",
                        format!("`--fitness kl`: {}", e.message),
                        "use `--fitness loss` (the recipe's loss)",
                    )
                }
            };
        match compile(&g, be) {
            Ok(e) => Some(e),
            Err(e) => return error("E0603", e, ""),
        }
    } else {
        None
    };
    // Only what the programs read is copied into each candidate's state (not the optimizer
    // states a checkpoint also holds).
    let needed: std::collections::BTreeSet<&String> =
        std::iter::once(&eval).chain(logits_exe.as_ref()).flat_map(|e| e.program().input_names.iter()).collect();
    dense.retain(|name, _| needed.contains(name) || units.iter().any(|u| &u.path == name));
    // The database: every unit at every level, compressed once (with the group it took).
    let mut database: Vec<Vec<Buffer>> = vec![];
    let mut groups: Vec<Vec<Option<usize>>> = vec![];
    for u in &units {
        let w = &dense[&u.path];
        let (mut row, mut row_groups) = (vec![], vec![]);
        for &level in &levels {
            match mode.apply(w, level) {
                Ok((q, g)) => {
                    let mut b = Buffer::zeros(w.dtype, w.shape.clone());
                    b.f32s_mut().copy_from_slice(&q);
                    row.push(b);
                    row_groups.push(g);
                }
                Err(e) => return error("E0605", format!("`{}`: {e}", u.path), ""),
            }
        }
        database.push(row);
        groups.push(row_groups);
    }
    let seed = plan.settings.seed;
    let state_for = |levels: Option<&[usize]>| -> BTreeMap<String, Value> {
        let mut s: BTreeMap<String, Value> = dense.iter().map(|(k, v)| (k.clone(), Value::Host(v.clone()))).collect();
        if let Some(levels) = levels {
            for (i, u) in units.iter().enumerate() {
                s.insert(u.path.clone(), Value::Host(database[i][levels[i]].clone()));
            }
        }
        s
    };
    let batch_loss =
        |state: &mut BTreeMap<String, Value>, x: Vec<i32>, y: Vec<i32>| -> Result<f64, runtime::RunError> {
            let mut extra = BTreeMap::new();
            extra.insert("batch.inputs".to_string(), runtime::train::i32_buffer(vec![d.batch, d.context], &x));
            extra.insert("batch.targets".to_string(), runtime::train::i32_buffer(vec![d.batch, d.context], &y));
            run_named(eval.as_ref(), state, extra, seed)?;
            runtime::train::scalar(state, "loss")
        };
    let validation = |levels: Option<&[usize]>| -> Result<f64, runtime::RunError> {
        let mut state = state_for(levels);
        let n = plan.settings.eval_batches;
        let mut total = 0.0;
        for k in 0..n {
            let (x, y) = corpus.val_batch(k, n);
            total += batch_loss(&mut state, x, y)?;
        }
        Ok(total / n as f64)
    };
    let started = std::time::Instant::now();
    let opts = SearchOptions {
        generations: req.generations,
        offspring: req.offspring,
        stages,
        max_mutations: req.mutations.max(1),
        seed: req.seed.unwrap_or(seed),
    };
    let total: usize = units.iter().map(|u| u.numel).sum();
    let what = match mode {
        Mode::Quantize { group: Granularity::Fixed(g) } => format!("at {target} bits on average, groups of {g}"),
        Mode::Quantize { group: Granularity::Adaptive { min, tolerance } } => format!(
            "at {target} bits on average, groups chosen per matrix (adaptive: halved from a row down to {min} at most, tolerance {tolerance})"
        ),
        Mode::Prune => format!("at {:.0}% sparsity on average, by magnitude", target * 100.0),
    };
    let shown: Vec<String> = levels.iter().map(|&l| mode.show(l)).collect();
    eprintln!(
        "{} matrices ({} weights) {what}, levels {}; calibration: training batches of {}×{}",
        units.len(),
        total,
        shown.join(", "),
        d.batch,
        d.context
    );
    // Log-probabilities of every position of a calibration batch under an assignment (None:
    // the dense model).
    let log_probs = |levels: Option<&[usize]>, x: Vec<i32>| -> Result<Vec<f64>, runtime::RunError> {
        let exe = logits_exe.as_ref().expect("the KL fitness");
        let mut state = state_for(levels);
        let mut extra = BTreeMap::new();
        extra.insert("tokens".to_string(), runtime::train::i32_buffer(vec![d.batch, d.context], &x));
        run_named(exe.as_ref(), &mut state, extra, seed)?;
        let l = state.get("logits").ok_or_else(|| runtime::RunError("no `logits`".into()))?.host()?.to_tensor();
        let v = *l.shape.last().unwrap_or(&1);
        Ok(l.data.chunks(v).flat_map(runtime::train::log_probs).collect())
    };
    let mut dense_rows: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut loss = |levels: &[usize], b: usize| {
        let (x, y) = corpus.train_batch(b as u64);
        if !kl {
            return batch_loss(&mut state_for(Some(levels)), x, y);
        }
        if !dense_rows.contains_key(&b) {
            dense_rows.insert(b, log_probs(None, x.clone())?);
        }
        let p = &dense_rows[&b];
        let q = log_probs(Some(levels), x)?;
        let positions = d.batch * d.context;
        let v = p.len() / positions;
        let mut total = 0.0;
        for (pr, qr) in p.chunks(v).zip(q.chunks(v)) {
            total += pr.iter().zip(qr).filter(|(a, _)| a.is_finite()).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        }
        Ok(total / positions as f64)
    };
    let tty = std::io::stderr().is_terminal();
    let fitness = if kl { "KL" } else { "loss" };
    let mut progress = |g: usize, f: f64| {
        if tty {
            eprint!("\rgeneration {g}/{}: calibration {fitness} {f:.4}   ", req.generations);
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("generation {g}/{}: calibration {fitness} {f:.4}", req.generations);
        }
    };
    let found = match search(&units, vec![start_level; units.len()], levels.len(), &opts, &mut loss, &mut progress) {
        Ok(f) => f,
        Err(e) => return error("E0603", e, ""),
    };
    if tty && req.generations > 0 {
        eprintln!();
    }
    let uniform = vec![start_level; units.len()];
    let (val_dense, val_uniform, val_found) =
        match (validation(None), validation(Some(&uniform)), validation(Some(&found.levels))) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return error("E0603", e, ""),
        };
    let name = mode.name();
    let mean = found.levels.iter().zip(&units).map(|(&l, u)| levels[l] * u.numel as f64).sum::<f64>() / total as f64;
    let chosen: Vec<Option<usize>> = found.levels.iter().enumerate().map(|(i, &l)| groups[i][l]).collect();
    // Storage with one 16-bit scale per group (the checkpoint holds the dequantized f32).
    let with_scales = found
        .levels
        .iter()
        .zip(&units)
        .zip(&chosen)
        .map(|((&l, u), g)| (levels[l] + g.map(|g| 16.0 / g as f64).unwrap_or(0.0)) * u.numel as f64)
        .sum::<f64>()
        / total as f64;
    match mode {
        Mode::Quantize { .. } => println!("{:<40} {:>9} {:>8} {:>6}", "matrix", "weights", name, "group"),
        Mode::Prune => println!("{:<40} {:>9} {:>8}", "matrix", "weights", name),
    }
    for ((u, &l), g) in units.iter().zip(&found.levels).zip(&chosen) {
        match g {
            Some(g) => println!("{:<40} {:>9} {:>8} {:>6}", u.path, u.numel, mode.show(levels[l]), g),
            None => println!("{:<40} {:>9} {:>8}", u.path, u.numel, mode.show(levels[l])),
        }
    }
    match mode {
        Mode::Quantize { .. } => println!(
            "average: {mean:.3} bits per weight (target {target}); {with_scales:.3} with one 16-bit scale per group"
        ),
        Mode::Prune => println!("average: {:.2}% of the weights pruned (target {})", mean * 100.0, mode.show(target)),
    }
    println!(
        "calibration {} ({} batches): uniform {:.4}, searched {:.4}",
        if kl { "KL to the dense model" } else { "loss" },
        opts.stages.last().map(|s| s.batches).unwrap_or(1),
        found.initial,
        found.fitness
    );
    println!(
        "validation loss: dense {val_dense:.4}, uniform {} {name} {val_uniform:.4} ({:+.4}), searched {val_found:.4} ({:+.4})",
        mode.show(target),
        val_uniform - val_dense,
        val_found - val_dense
    );
    eprintln!("{} evaluations of a calibration batch in {:.1} s", found.evaluations, started.elapsed().as_secs_f64());
    let level_json = |l: f64| match mode {
        Mode::Quantize { .. } => serde_json::json!(l as u64),
        Mode::Prune => serde_json::json!(l),
    };
    // The new run directory: the run's recipe and metadata, the compressed checkpoint, and
    // what the search chose. Written into a temporary directory renamed at the end, so an
    // interrupted write leaves nothing that looks like a run.
    let tmp = out.with_file_name(format!(
        ".{}.tmp",
        out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    ));
    let written = (|| -> Result<(), String> {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        for f in ["run.json", "recipe.recipe"] {
            std::fs::copy(req.dir.join(f), tmp.join(f)).map_err(|e| format!("cannot copy {f}: {e}"))?;
        }
        let mut ck = runtime::checkpoint::Checkpoint::load(&req.dir.join("checkpoint.safetensors")).map_err(|e| e.0)?;
        for (i, u) in units.iter().enumerate() {
            ck.tensors.insert(u.path.clone(), database[i][found.levels[i]].clone());
        }
        let how = match mode {
            Mode::Quantize { group: Granularity::Fixed(g) } => {
                format!("{mean:.3} bits on average, round-to-nearest groups of {g}")
            }
            Mode::Quantize { group: Granularity::Adaptive { .. } } => {
                format!("{mean:.3} bits on average, round-to-nearest groups chosen per matrix (adaptive)")
            }
            Mode::Prune => format!("{:.2}% sparsity on average, by magnitude", mean * 100.0),
        };
        ck.metadata.insert("compressed".into(), format!("evopress: {how}; see compress.json"));
        ck.save(&tmp.join("checkpoint.safetensors")).map_err(|e| e.0)?;
        let mut report = serde_json::json!({
            "source": req.dir.display().to_string(),
            "step": step,
            "mode": match mode { Mode::Quantize { .. } => "quantize", Mode::Prune => "prune" },
            "levels": levels.iter().map(|&l| level_json(l)).collect::<Vec<_>>(),
            "search": {
                "fitness": req.fitness,
                "generations": opts.generations, "offspring": opts.offspring, "selection": req.selection,
                "mutations": opts.max_mutations, "seed": opts.seed, "evaluations": found.evaluations,
                "calibration_uniform": found.initial, "calibration_searched": found.fitness, "history": found.history,
            },
            "validation": { "dense": val_dense, "uniform": val_uniform, "searched": val_found },
        });
        report[name] = level_json(target);
        report[format!("mean_{name}")] = serde_json::json!(mean);
        report[format!("{name}_per_matrix")] = serde_json::json!(units
            .iter()
            .zip(&found.levels)
            .map(|(u, &l)| (u.path.clone(), level_json(levels[l])))
            .collect::<BTreeMap<_, _>>());
        if let Mode::Quantize { group } = mode {
            report["group"] = match group {
                Granularity::Fixed(g) => serde_json::json!(g),
                Granularity::Adaptive { min, tolerance } => {
                    serde_json::json!({ "adaptive": { "min": min, "tolerance": tolerance } })
                }
            };
            report["group_per_matrix"] = serde_json::json!(units
                .iter()
                .zip(&chosen)
                .map(|(u, g)| (u.path.clone(), g.unwrap_or(0)))
                .collect::<BTreeMap<_, _>>());
            report["mean_bits_with_scales"] = serde_json::json!(with_scales);
        }
        std::fs::write(tmp.join("compress.json"), format!("{:#}\n", report))
            .map_err(|e| format!("cannot write compress.json: {e}"))?;
        if out.exists() {
            std::fs::remove_dir(&out).map_err(|e| format!("cannot replace {}: {e}", out.display()))?;
        }
        std::fs::rename(&tmp, &out).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), out.display()))
    })();
    match written {
        Ok(()) => {
            eprintln!("wrote {} (score it with `recipec score {}`)", out.display(), out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            error("E0603", e, "nothing was written")
        }
    }
}
