//! `recipec compress`: a trained run's weight matrices quantized to a bit budget, with the bit
//! width of each matrix chosen by EvoPress's evolutionary search ([`runtime::compress`]).

use crate::train::{backend, error, open_run, Run};
use runtime::compress::{quantize_groups, search, SearchOptions, Unit};
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
    /// The average bit width of the compressed matrices (one of `--levels`): every matrix
    /// starts there, and the search moves bits between matrices of the same size.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// The bit widths a matrix may take, equally spaced, e.g. `2,3,4,5,6,7,8`.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8")]
    pub levels: Vec<u32>,
    /// Quantization group: this many consecutive weights along a matrix's last axis share
    /// a scale (as the stdlib's `quantize_groups`).
    #[arg(long, default_value_t = 64)]
    pub group: usize,
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
    /// Seed of the search (default: the recipe's seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The new run directory (default: `DIR-wBITS`, beside the run).
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

fn equally_spaced(levels: &[u32]) -> bool {
    levels.len() >= 2 && levels.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] == levels[1] - levels[0])
}

pub fn compress(req: CompressRequest) -> ExitCode {
    let be = match backend(&req.backend) {
        Ok(b) => b,
        Err(c) => return c,
    };
    if !equally_spaced(&req.levels) || req.levels[0] < 2 || *req.levels.last().unwrap() > 16 {
        return error(
            "E0605",
            format!("`--levels {:?}`: the levels must be increasing, equally spaced, within 2..16 bits", req.levels),
            "a level switch moves one step up in one matrix and one down in another: equal steps keep the total",
        );
    }
    let Some(start_level) = req.levels.iter().position(|&l| l == req.bits) else {
        return error(
            "E0605",
            format!("`--bits {}` is not one of `--levels`", req.bits),
            "e.g. `--bits 4 --levels 2,3,4,5,6`",
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
    let Run { plan, source_path, .. } = match open_run(&req.dir, false) {
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
        .filter(|p| p.shape.len() == 2 && p.dtype == lang::types::Dtype::F32 && p.shape[1] % req.group == 0)
        .filter(|p| {
            let path: Vec<String> = p.path.split('.').map(|s| s.to_string()).collect();
            lang::recipe::selector_matches(&selector, &path)
        })
        .map(|p| Unit { path: p.path.clone(), numel: p.shape.iter().product() })
        .collect();
    if units.is_empty() {
        return error(
            "E0605",
            format!("`--units {}` selects no f32 matrix whose last axis a group of {} divides", req.units, req.group),
            "list the parameters with `recipec build RECIPE`; try a smaller `--group`",
        );
    }
    let out = req.out.clone().unwrap_or_else(|| {
        let name = req.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
        req.dir.with_file_name(format!("{name}-w{}", req.bits))
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
    // The database: every unit at every level, quantized once.
    let mut database: Vec<Vec<Buffer>> = vec![];
    for u in &units {
        let w = &dense[&u.path];
        let mut row = vec![];
        for &bits in &req.levels {
            match quantize_groups(w.f32s(), w.shape[1], bits, req.group) {
                Ok(q) => {
                    let mut b = Buffer::zeros(w.dtype, w.shape.clone());
                    b.f32s_mut().copy_from_slice(&q);
                    row.push(b);
                }
                Err(e) => return error("E0605", format!("`{}`: {e}", u.path), ""),
            }
        }
        database.push(row);
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
    eprintln!(
        "{} matrices ({} weights) at {} bits on average, levels {:?}, groups of {}; calibration: training batches of {}×{}",
        units.len(),
        total,
        req.bits,
        req.levels,
        req.group,
        d.batch,
        d.context
    );
    let mut loss = |levels: &[usize], b: usize| {
        let (x, y) = corpus.train_batch(b as u64);
        batch_loss(&mut state_for(Some(levels)), x, y)
    };
    let tty = std::io::stderr().is_terminal();
    let mut progress = |g: usize, f: f64| {
        if tty {
            eprint!("\rgeneration {g}/{}: calibration loss {f:.4}   ", req.generations);
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("generation {g}/{}: calibration loss {f:.4}", req.generations);
        }
    };
    let found = match search(&units, vec![start_level; units.len()], req.levels.len(), &opts, &mut loss, &mut progress)
    {
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
    let bits_of = |l: usize| req.levels[l];
    let mean_bits =
        found.levels.iter().zip(&units).map(|(&l, u)| bits_of(l) as f64 * u.numel as f64).sum::<f64>() / total as f64;
    println!("{:<40} {:>9} {:>5}", "matrix", "weights", "bits");
    for (u, &l) in units.iter().zip(&found.levels) {
        println!("{:<40} {:>9} {:>5}", u.path, u.numel, bits_of(l));
    }
    println!("average: {mean_bits:.3} bits per weight (target {})", req.bits);
    println!(
        "calibration loss ({} batches): uniform {:.4}, searched {:.4}",
        opts.stages.last().map(|s| s.batches).unwrap_or(1),
        found.initial,
        found.fitness
    );
    println!(
        "validation loss: dense {val_dense:.4}, uniform {} bits {val_uniform:.4} ({:+.4}), searched {val_found:.4} ({:+.4})",
        req.bits,
        val_uniform - val_dense,
        val_found - val_dense
    );
    eprintln!("{} evaluations of a calibration batch in {:.1} s", found.evaluations, started.elapsed().as_secs_f64());
    // The new run directory: the run's recipe and metadata, the quantized checkpoint, and
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
        ck.metadata.insert(
            "compressed".into(),
            format!(
                "evopress: {mean_bits:.3} bits on average, round-to-nearest groups of {}; see compress.json",
                req.group
            ),
        );
        ck.save(&tmp.join("checkpoint.safetensors")).map_err(|e| e.0)?;
        let report = serde_json::json!({
            "source": req.dir.display().to_string(),
            "step": step,
            "bits": req.bits,
            "levels": req.levels,
            "group": req.group,
            "mean_bits": mean_bits,
            "search": {
                "generations": opts.generations, "offspring": opts.offspring, "selection": req.selection,
                "mutations": opts.max_mutations, "seed": opts.seed, "evaluations": found.evaluations,
                "calibration_uniform": found.initial, "calibration_searched": found.fitness, "history": found.history,
            },
            "validation": { "dense": val_dense, "uniform": val_uniform, "searched": val_found },
            "bits_per_matrix": units.iter().zip(&found.levels).map(|(u, &l)| (u.path.clone(), bits_of(l))).collect::<BTreeMap<_, _>>(),
        });
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
