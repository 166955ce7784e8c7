//! `recipec train` and `recipec sample` end to end on a small recipe: determinism, resuming
//! after SIGKILL bit for bit, damaged checkpoints, bad recipes rejected before training.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recipec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_recipec"))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recipec-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A ~30k-parameter GPT with AdamW on a schedule, 2:4 sparsity on the MLP input weights,
/// checkpoints every 4 steps and a log line every step.
const SMALL: &str = r#"use std.models.gpt
use std.loss.cross_entropy
use std.optim.adamw
use std.schedule.wsd
use std.sparsity.nm
use std.decode.greedy

recipe small {
    model = gpt(V = 256, D = 32, L = 2, H = 2, T = 32)
    data = text("embedded:kjv", context = 32, batch = 4)
    loss = cross_entropy(model.logits(batch.inputs), flatten(batch.targets))
    steps = 24
    optimize model.** with adamw(lr = wsd(peak = 3e-3, total = 24, warmup = 4, decay_frac = 0.25), weight_decay = 0.1)
    sparsify model.blocks.*.mlp.w1 with nm(n = 2, m = 4)
    checkpoint_every = 4
    eval_every = 8
    eval_batches = 2
    log_every = 1
    decode = greedy()
    seed = 3
}
"#;

fn write_recipe(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("small.recipe");
    std::fs::write(&p, text).unwrap();
    p
}

fn train(recipe: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    recipec().arg("train").arg(recipe).arg("--out").arg(out).args(extra).output().unwrap()
}

/// `(step, key, value)` of every number logged except timings.
fn losses(dir: &Path) -> Vec<(u64, String, String)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut v = vec![];
    for line in text.lines() {
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = j["step"].as_u64().unwrap();
        for key in ["loss", "val_loss", "grad_norm"] {
            if let Some(x) = j.get(key) {
                v.push((step, key.to_string(), x.to_string()));
            }
        }
    }
    v
}

/// `recipec sample DIR EXTRA...`.
fn sample(dir: &Path, extra: &[&str]) -> std::process::Output {
    recipec().arg("sample").arg(dir).args(extra).output().unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn training_is_deterministic_and_resumes_bit_for_bit_after_sigkill() {
    let dir = temp_dir("resume");
    let recipe = write_recipe(&dir, SMALL);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let out = train(&recipe, &a, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("step     24/24") && err.contains("validation loss"), "{err}");
    for f in ["checkpoint.safetensors", "metrics.jsonl", "loss.svg", "recipe.recipe", "run.json"] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let want = losses(&a);
    assert_eq!(want.iter().filter(|x| x.1 == "loss").count(), 24);
    assert_eq!(want.iter().filter(|x| x.1 == "val_loss").count(), 3);

    // Kill at a step that varies from run to run (after the first checkpoint exists).
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let kill_after = 5 + (nanos as usize % 17);
    let mut child = recipec()
        .arg("train")
        .arg(&recipe)
        .arg("--out")
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let lines = std::fs::read_to_string(b.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= kill_after || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before it could be killed: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = train(&recipe, &b, &["--resume", b.to_str().unwrap()]);
    assert!(out.status.success(), "killed after {kill_after} lines: {}", stderr(&out));
    assert!(stderr(&out).contains("(resumed)"));
    assert_eq!(losses(&b), want, "killed after {kill_after} metric lines");
    assert_eq!(
        std::fs::read(a.join("checkpoint.safetensors")).unwrap(),
        std::fs::read(b.join("checkpoint.safetensors")).unwrap(),
        "the resumed run's final checkpoint differs"
    );

    // Sampling: the recipe's greedy policy is deterministic; another policy can be named.
    let s1 = sample(&a, &["--tokens", "24", "--prompt", "And "]);
    assert!(s1.status.success(), "{}", stderr(&s1));
    let s2 = sample(&b, &["--tokens", "24", "--prompt", "And "]);
    assert_eq!(s1.stdout, s2.stdout);
    assert!(
        s1.stdout.starts_with(b"And ") && s1.stdout.len() == 4 + 24 + 1,
        "{:?}",
        String::from_utf8_lossy(&s1.stdout)
    );
    // The KV-cached step (the default) and the whole-window recomputation choose the same
    // tokens until the context (32) fills; past it the cached sampler shifts its context.
    let window = sample(&a, &["--tokens", "24", "--prompt", "And ", "--no-cache", "--stats"]);
    assert!(window.status.success(), "{}", stderr(&window));
    assert_eq!(window.stdout, s1.stdout);
    assert!(stderr(&window).contains("whole window per token"), "{}", stderr(&window));
    let long = sample(&a, &["--tokens", "90", "--stats"]);
    assert!(long.status.success(), "{}", stderr(&long));
    assert_eq!(long.stdout.len(), 90 + 1, "{:?}", String::from_utf8_lossy(&long.stdout));
    assert!(stderr(&long).contains("90 tokens, KV-cached"), "{}", stderr(&long));
    let s3 = sample(&a, &["--tokens", "16", "--policy", "top_k(k = 5, t = 0.9)", "--seed", "7"]);
    assert!(s3.status.success(), "{}", stderr(&s3));
    let bad = sample(&a, &["--policy", "nucleus(p = 0.9)"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("no decoding policy `nucleus`"), "{}", stderr(&bad));

    // Constrained sampling: the generated text stays a prefix of a match of the expression
    // and stops at a complete match; the KV-cached and window samplers agree on it.
    let pattern = "(Yea|Nay), [a-z ]+\\.";
    let args = |policy: &'static str| {
        vec!["--tokens", "60", "--prompt", "And ", "--constraint", pattern, "--stats", "--policy", policy]
    };
    for policy in ["top_k(k = 5, t = 0.9)", "greedy()"] {
        let c = sample(&a, &args(policy));
        assert!(c.status.success(), "{}", stderr(&c));
        let text = &c.stdout[4..c.stdout.len() - 1];
        assert!(yea_nay_prefix(text), "{policy}: {:?}", String::from_utf8_lossy(text));
        if stderr(&c).contains("stopped after") {
            assert!(text.ends_with(b"."), "{:?}", String::from_utf8_lossy(text));
        } else {
            assert_eq!(text.len(), 60);
        }
        assert!(stderr(&c).contains("drawn tokens rejected"), "{}", stderr(&c));
    }
    let cached = sample(&a, &args("greedy()"));
    let mut window_args = args("greedy()");
    window_args.push("--no-cache");
    let window = sample(&a, &window_args);
    assert_eq!(cached.stdout, window.stdout);
    // Sequential Monte Carlo over 8 particles (AWRS weights): the same guarantee, reproducible.
    let smc_args = ["--tokens", "60", "--prompt", "And ", "--constraint", pattern, "--particles", "8", "--stats"];
    let smc = sample(&a, &smc_args);
    assert!(smc.status.success(), "{}", stderr(&smc));
    let text = &smc.stdout[4..smc.stdout.len() - 1];
    assert!(yea_nay_prefix(text), "{:?}", String::from_utf8_lossy(text));
    assert!(stderr(&smc).contains("SMC over 8 particles"), "{}", stderr(&smc));
    assert_eq!(sample(&a, &smc_args).stdout, smc.stdout);
    let alone = sample(&a, &["--particles", "8"]);
    assert_eq!(alone.status.code(), Some(1));
    assert!(stderr(&alone).contains("E0604"), "{}", stderr(&alone));
    let bad = sample(&a, &["--constraint", "(Yea|Nay"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("E0604") && bad.stdout.is_empty(), "{}", stderr(&bad));

    // Mixed with the ∞-gram model of the training text (Infini-gram). At λ = 1 a greedy draw
    // takes the most frequent continuation of the longest suffix found in the training part,
    // so that suffix only grows: prompt and continuation are one passage of the training text
    // (the first 95% of the corpus; the validation part is not indexed).
    let ngram = ["--tokens", "80", "--prompt", "And God said", "--policy", "greedy()", "--infini-gram", "1", "--stats"];
    let ng = sample(&a, &ngram);
    assert!(ng.status.success(), "{}", stderr(&ng));
    let text = &ng.stdout[..ng.stdout.len() - 1];
    assert_eq!(text.len(), 12 + 80);
    let kjv = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/data/kjv.txt")).unwrap();
    let training = &kjv[..(kjv.len() as f64 * 0.95).round() as usize];
    assert!(training.windows(text.len()).any(|w| w == text), "{:?}", String::from_utf8_lossy(text));
    assert!(stderr(&ng).contains("∞-gram (λ = 1)"), "{}", stderr(&ng));
    // A mixture draws differently from the model alone, reproducibly, and under a constraint
    // keeps it.
    let mixed = ["--tokens", "40", "--prompt", "And ", "--seed", "3", "--infini-gram", "0.5"];
    let m = sample(&a, &mixed);
    assert!(m.status.success(), "{}", stderr(&m));
    assert_eq!(sample(&a, &mixed).stdout, m.stdout);
    assert_ne!(sample(&a, &mixed[..6]).stdout, m.stdout, "λ = 0.5 changes the text");
    let both = sample(&a, &["--tokens", "60", "--prompt", "And ", "--constraint", pattern, "--infini-gram", "0.5"]);
    assert!(both.status.success(), "{}", stderr(&both));
    let text = &both.stdout[4..both.stdout.len() - 1];
    assert!(yea_nay_prefix(text), "{:?}", String::from_utf8_lossy(text));
    // Classifier-free guidance (with Adaptive Guidance). At w = 1 the guided distribution is
    // the conditional one, so greedy text is the unguided text; so it is when the second
    // stream reads the prompt itself (identical streams: its caches and context shifts,
    // 64 tokens past a context of 32, mirror the first's); and when Adaptive Guidance turns
    // guidance off at the first token (any cosine exceeds −1), the second stream runs once.
    let greedy = ["--tokens", "60", "--prompt", "And ", "--policy", "greedy()", "--stats"];
    let plain = sample(&a, &greedy);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let with = |extra: &[&str]| {
        let mut v = greedy.to_vec();
        v.extend_from_slice(extra);
        sample(&a, &v)
    };
    let w1 = with(&["--cfg", "1"]);
    assert!(w1.status.success(), "{}", stderr(&w1));
    assert_eq!(w1.stdout, plain.stdout);
    assert!(stderr(&w1).contains("60 of 60 tokens guided, on to the end"), "{}", stderr(&w1));
    let same = with(&["--cfg", "3", "--negative", "And "]);
    assert_eq!(same.stdout, plain.stdout, "{}", stderr(&same));
    assert!(
        stderr(&same).contains("1.0000 at the first token, 1.0000 at the last measured (60 measured)"),
        "{}",
        stderr(&same)
    );
    let off = with(&["--cfg", "3", "--negative", "xyz", "--adaptive-guidance", "-1"]);
    assert_eq!(off.stdout, plain.stdout, "{}", stderr(&off));
    assert!(
        stderr(&off).contains("0 of 60 tokens guided, adaptive guidance turned it off at token 1")
            && stderr(&off).contains("3 unconditional steps"),
        "{}",
        stderr(&off)
    );
    // Guided draws still keep a constraint.
    let both =
        sample(&a, &["--tokens", "60", "--prompt", "And ", "--constraint", pattern, "--cfg", "2", "--negative", "x"]);
    assert!(both.status.success(), "{}", stderr(&both));
    assert!(yea_nay_prefix(&both.stdout[4..both.stdout.len() - 1]), "{:?}", String::from_utf8_lossy(&both.stdout));
    for bad in [
        &["--adaptive-guidance", "0.9"][..],
        &["--negative", "x"],
        &["--cfg", "-1"],
        &["--cfg", "2", "--adaptive-guidance", "1.5"],
        &["--cfg", "2", "--no-cache"],
        &["--cfg", "2", "--constraint", "a", "--particles", "2"],
    ] {
        let out = sample(&a, bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(stderr(&out).contains("E0604"), "{bad:?}: {}", stderr(&out));
    }
    // Scoring the validation windows: the model alone gives the run's last validation loss
    // (the same windows; the decoding step's logits against the fused loss: rounding only);
    // a mixture with the ∞-gram model gives its own number, and a bad λ is refused.
    let val: f64 = losses(&a).iter().rev().find(|(_, k, _)| k == "val_loss").unwrap().2.parse().unwrap();
    let sc = recipec().arg("score").arg(&a).args(["--infini-gram", "0.3,1"]).output().unwrap();
    assert!(sc.status.success(), "{}", stderr(&sc));
    let out = String::from_utf8_lossy(&sc.stdout).into_owned();
    let nats = |prefix: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{out}"));
        line[prefix.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!((nats("model:") - val).abs() < 1e-4, "{out} vs the run's {val}");
    assert!(nats("with the ∞-gram, λ = 0.3").is_finite(), "{out}");
    // At λ = 1 a token the ∞-gram model never saw after the suffix costs infinitely much.
    assert!(out.contains("λ = 1 ") && out.contains("probability 0 for"), "{out}");
    // `--logits` names the method: `logits()` is the default; a method the model lacks is an
    // error at the option's text.
    let same = recipec().arg("score").arg(&a).args(["--logits", "logits()"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&same.stdout).contains(&format!("{:.4} nats", nats("model:"))),
        "{}",
        stderr(&same)
    );
    let none = recipec().arg("score").arg(&a).args(["--logits", "logits_at(4)"]).output().unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("<--logits>"), "{}", stderr(&none));
    let bad = recipec().arg("score").arg(&a).args(["--infini-gram", "2"]).output().unwrap();
    assert!(bad.status.code() == Some(1) && stderr(&bad).contains("E0604"), "{}", stderr(&bad));
    for bad in [
        &["--infini-gram", "0"][..],
        &["--infini-gram", "1.5"],
        &["--infini-gram", "0.5", "--constraint", "a", "--particles", "2"],
    ] {
        let out = sample(&a, bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(stderr(&out).contains("E0604"), "{}", stderr(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `text` is a prefix of a match of `(Yea|Nay), [a-z ]+\.`.
fn yea_nay_prefix(text: &[u8]) -> bool {
    let n = text.len().min(5);
    if ![&b"Yea, "[..], &b"Nay, "[..]].iter().any(|h| h.starts_with(&text[..n])) {
        return false;
    }
    let rest = &text[n..];
    let word = |b: &u8| b.is_ascii_lowercase() || *b == b' ';
    match rest.iter().position(|&b| b == b'.') {
        Some(i) => i > 0 && i + 1 == rest.len() && rest[..i].iter().all(word),
        None => rest.iter().all(word),
    }
}

#[test]
fn damaged_checkpoints_are_rejected_and_never_overwritten() {
    let dir = temp_dir("damage");
    let recipe = write_recipe(&dir, &SMALL.replace("steps = 24", "steps = 4"));
    let a = dir.join("a");
    let out = train(&recipe, &a, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ck = a.join("checkpoint.safetensors");
    let good = std::fs::read(&ck).unwrap();
    // Truncated, bit-flipped, and garbage files.
    let mut flipped = good.clone();
    let at = good.len() - 100;
    flipped[at] ^= 0x40;
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped", flipped),
        ("garbage", b"not a checkpoint".to_vec()),
    ] {
        std::fs::write(&ck, &bytes).unwrap();
        let out = train(&recipe, &a, &["--resume", a.to_str().unwrap(), "--steps", "8"]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("error[E0602]") && err.contains("not a valid checkpoint"), "{what}: {err}");
        assert_eq!(std::fs::read(&ck).unwrap(), bytes, "{what}: the damaged file was modified");
        let out = sample(&a, &[]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(stderr(&out).contains("E0602"));
    }
    // A fresh run never writes over an existing checkpoint.
    std::fs::write(&ck, &good).unwrap();
    let out = train(&recipe, &a, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("error[E0603]") && stderr(&out).contains("already holds a checkpoint"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&ck).unwrap(), good);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_recipes_fail_before_training_with_a_diagnostic() {
    let dir = temp_dir("bad");
    let cases = [
        // A selector that matches no parameter (the checker, E0403).
        (SMALL.replace("model.blocks.*.mlp.w1", "model.blocks.*.mlp.w9"), "E0403"),
        // 2:4 groups do not divide the 30-wide rows of `w2` (the plan, E0601).
        (SMALL.replace("D = 32, L = 2, H = 2", "D = 30, L = 2, H = 2").replace("mlp.w1 with", "mlp.w2 with"), "E0601"),
        // A hyperparameter that is neither a number nor a schedule.
        (SMALL.replace("weight_decay = 0.1", "weight_decay = \"x\""), "E0318"),
    ];
    // Data too short for the recipe's windows: reported before any training.
    std::fs::write(dir.join("tiny.txt"), "In the beginning").unwrap();
    let cases = [
        cases[0].clone(),
        cases[1].clone(),
        cases[2].clone(),
        (SMALL.replace("\"embedded:kjv\"", "\"tiny.txt\""), "E0603"),
    ];
    for (i, (text, code)) in cases.iter().enumerate() {
        let recipe = write_recipe(&dir, text);
        let out_dir = dir.join(format!("out{i}"));
        let out = train(&recipe, &out_dir, &[]);
        assert_eq!(out.status.code(), Some(1), "case {i}: {}", stderr(&out));
        assert!(stderr(&out).contains(code), "case {i}: {}", stderr(&out));
        assert!(!out_dir.exists(), "case {i}: wrote {}", out_dir.display());
        // `recipec build` reports the same, before any training.
        if *code != "E0603" {
            let b = recipec().arg("build").arg(&recipe).output().unwrap();
            assert_eq!(b.status.code(), Some(1), "build, case {i}: {}", stderr(&b));
            assert!(stderr(&b).contains(code), "build, case {i}: {}", stderr(&b));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes_exactly() {
    let dir = temp_dir("sigint");
    let recipe = write_recipe(&dir, &SMALL.replace("steps = 24", "steps = 400"));
    let a = dir.join("a");
    let mut child = recipec().arg("train").arg(&recipe).arg("--out").arg(&a).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(a.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0) < 6 {
        assert!(started.elapsed() < Duration::from_secs(120) && child.try_wait().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step") && err.contains("--resume"), "{err}");
    let stopped: Vec<_> = losses(&a).into_iter().filter(|x| x.1 == "loss").collect();
    let last = stopped.last().unwrap().0 as usize;
    assert!(last < 400);
    // Resuming to a later step gives the losses of a run that was never interrupted.
    let target = (last + 5).to_string();
    let out = train(&recipe, &a, &["--resume", a.to_str().unwrap(), "--steps", &target]);
    assert!(out.status.success(), "{}", stderr(&out));
    let b = dir.join("b");
    let out = train(&recipe, &b, &["--steps", &target]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(losses(&a), losses(&b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_arrays_train_from_npy() {
    let dir = temp_dir("npy");
    // 4,000 int32 tokens of a repeating pattern, as NumPy writes them.
    let toks: Vec<f64> = (0..4000).map(|i| [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0][i % 8]).collect();
    let bytes = runtime::npy::write(&compiler::interp::Tensor::new(lang::types::Dtype::I32, vec![4000], toks));
    std::fs::write(dir.join("toks.npy"), bytes).unwrap();
    let text = SMALL
        .replace("text(\"embedded:kjv\", context = 32, batch = 4)", "tokens(\"toks.npy\", context = 16, batch = 4)")
        .replace("steps = 24", "steps = 30")
        .replace("V = 256, D = 32, L = 2, H = 2, T = 32", "V = 16, D = 32, L = 2, H = 2, T = 16");
    let recipe = write_recipe(&dir, &text);
    let out = train(&recipe, &dir.join("o"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = losses(&dir.join("o"));
    let first = l.iter().find(|x| x.1 == "loss").unwrap().2.parse::<f64>().unwrap();
    let last_val = l.iter().rev().find(|x| x.1 == "val_loss").unwrap().2.parse::<f64>().unwrap();
    // A period-8 sequence is learnable: the loss falls well below ln(16).
    assert!(first > 2.0 && last_val < 0.8 * first, "{l:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The generated CUDA code, run on the CPU by the CUDA emulator (`--backend cuda-emu`), trains
/// the small recipe (sparsity masks, schedule, AdamW, validation) to the CPU backend's losses
/// and gradient norms within 1e-4 relative (matmul tiles sum in another order), and samples
/// through the KV-cached decode step.
#[test]
fn the_cuda_code_trains_like_the_cpu_code_under_the_emulator() {
    if let Err(e) = runtime::cuda_emu::available() {
        println!("skipped: {e}");
        return;
    }
    let dir = temp_dir("emu");
    let recipe = write_recipe(&dir, SMALL);
    let cpu = train(&recipe, &dir.join("cpu"), &["--steps", "4"]);
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    let emu = train(&recipe, &dir.join("emu"), &["--steps", "4", "--backend", "cuda-emu"]);
    assert!(emu.status.success(), "{}", stderr(&emu));
    // The state stayed on the (emulated) device; the run says what crossed.
    assert!(stderr(&emu).contains("device memory: ") && stderr(&emu).contains(" copied out"), "{}", stderr(&emu));
    assert!(!stderr(&cpu).contains("device memory"), "{}", stderr(&cpu));
    // Both say up front what the job needs: the shared arena and the training state.
    assert!(stderr(&cpu).contains("of training state)\n"), "{}", stderr(&cpu));
    assert!(stderr(&emu).contains("of training state), on the device"), "{}", stderr(&emu));
    let (a, b) = (losses(&dir.join("cpu")), losses(&dir.join("emu")));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|x| x.1 == "val_loss"), "{a:?}");
    for ((sa, ka, va), (sb, kb, vb)) in a.iter().zip(&b) {
        assert_eq!((sa, ka), (sb, kb));
        let (x, y): (f64, f64) = (va.parse().unwrap(), vb.parse().unwrap());
        assert!((x - y).abs() <= 1e-4 * x.abs(), "step {sa} {ka}: CPU {x}, emulated CUDA {y}");
    }
    let s = sample(&dir.join("emu"), &["--tokens", "12", "--backend", "cuda-emu", "--stats"]);
    assert!(s.status.success(), "{}", stderr(&s));
    assert!(stderr(&s).contains("KV-cached"), "{}", stderr(&s));
    assert!(!s.stdout.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `recipec compress`: the run's matrices at 3 bits on average, EvoPress's search moving bits
/// between matrices of the same size. The budget holds exactly, the search never does worse
/// than the uniform assignment on its calibration batches, the written run scores (through
/// the decoding step) what the command measured (through the loss), and the same command
/// writes the same bytes. Bad options and an occupied `--out` are refused before anything
/// is written.
#[test]
fn compress_searches_bits_per_matrix_at_a_fixed_budget() {
    let dir = temp_dir("compress");
    let recipe = write_recipe(&dir, SMALL);
    let run = dir.join("run");
    let t = train(&recipe, &run, &[]);
    assert!(t.status.success(), "{}", stderr(&t));
    let compress_grouped = |out: &Path, group: &str, extra: &[&str]| {
        recipec()
            .arg("compress")
            .arg(&run)
            .args(["--bits", "3", "--group", group])
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let compress = |out: &Path, extra: &[&str]| compress_grouped(out, "16", extra);
    let search = ["--generations", "6", "--offspring", "6", "--selection", "3:1,1:2"];
    let a = dir.join("w3");
    let c = compress(&a, &search);
    assert!(c.status.success(), "{}", stderr(&c));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("compress.json")).unwrap()).unwrap();
    // Every f32 matrix (the group divides each last axis), at exactly 3 bits on average.
    let ck = runtime::checkpoint::Checkpoint::load(&a.join("checkpoint.safetensors")).unwrap();
    let bits = report["bits_per_matrix"].as_object().unwrap();
    assert_eq!(bits.len(), 2 + 2 * 6, "{bits:?}"); // wte, wpe; per block wq, wk, wv, wo, w1, w2
    let (mut weighted, mut total) = (0.0, 0.0);
    for (path, b) in bits {
        let n = ck.tensors[path].numel() as f64;
        weighted += n * b.as_f64().unwrap();
        total += n;
        // Each matrix takes at most 2^bits distinct values per group of 16.
        let w = ck.tensors[path].f32s();
        for g in w.chunks(16) {
            let mut v: Vec<u32> = g.iter().map(|x| x.to_bits()).collect();
            v.sort();
            v.dedup();
            assert!(v.len() <= 1 << b.as_u64().unwrap(), "{path}: {} values", v.len());
        }
    }
    assert_eq!(weighted / total, 3.0);
    assert!(bits.values().any(|b| b.as_u64() != Some(3)), "the search moved no bits: {bits:?}");
    let s = &report["search"];
    assert_eq!(s["fitness"], "kl");
    let (uniform, searched) = (s["calibration_uniform"].as_f64().unwrap(), s["calibration_searched"].as_f64().unwrap());
    assert!(searched < uniform, "{s}");
    let history: Vec<f64> = s["history"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(history.len(), 6);
    assert!(history.windows(2).all(|w| w[1] <= w[0]), "{history:?}");
    // Unselected tensors are the run's own.
    let dense = runtime::checkpoint::Checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ck.tensors["model.ln_gain"].as_bytes(), dense.tensors["model.ln_gain"].as_bytes());
    assert_ne!(ck.tensors["model.wte"].as_bytes(), dense.tensors["model.wte"].as_bytes());
    // The new run scores what the search reported, through the decoding step.
    let sc = recipec().arg("score").arg(&a).output().unwrap();
    assert!(sc.status.success(), "{}", stderr(&sc));
    let out = String::from_utf8_lossy(&sc.stdout).into_owned();
    let line = out.lines().find(|l| l.starts_with("model:")).unwrap_or_else(|| panic!("{out}"));
    let nats: f64 = line["model:".len()..].split_whitespace().next().unwrap().parse().unwrap();
    let val = &report["validation"];
    assert!((nats - val["searched"].as_f64().unwrap()).abs() < 1e-4, "{out} vs {val}");
    assert!(val["uniform"].as_f64().unwrap() > val["dense"].as_f64().unwrap(), "{val}");
    // Deterministic: the same command writes the same checkpoint.
    let b = dir.join("w3-again");
    let c2 = compress(&b, &search);
    assert!(c2.status.success(), "{}", stderr(&c2));
    assert_eq!(
        std::fs::read(a.join("checkpoint.safetensors")).unwrap(),
        std::fs::read(b.join("checkpoint.safetensors")).unwrap()
    );
    // No search: the uniform assignment, whose validation loss the search run reported.
    let u = dir.join("uniform");
    let c3 = compress(&u, &["--generations", "0"]);
    assert!(c3.status.success(), "{}", stderr(&c3));
    let ru: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(u.join("compress.json")).unwrap()).unwrap();
    assert!(ru["bits_per_matrix"].as_object().unwrap().values().all(|b| b.as_u64() == Some(3)));
    assert_eq!(ru["validation"]["searched"], val["uniform"]);
    // FineQuant's adaptive granularity: each matrix's group, per bit width, is the coarsest
    // halving of its row within the tolerance; the weights are `quantize_groups` at that group.
    let adaptive = dir.join("w3-adaptive");
    let c6 = compress_grouped(&adaptive, "adaptive:4:0.2", &["--generations", "2"]);
    assert!(c6.status.success(), "{}", stderr(&c6));
    let ra: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adaptive.join("compress.json")).unwrap()).unwrap();
    assert_eq!(ra["group"]["adaptive"]["min"], 4);
    let cka = runtime::checkpoint::Checkpoint::load(&adaptive.join("checkpoint.safetensors")).unwrap();
    let chosen = ra["group_per_matrix"].as_object().unwrap();
    let (mut with_scales, mut total) = (0.0, 0.0);
    for (path, b) in ra["bits_per_matrix"].as_object().unwrap() {
        let (bits, g) = (b.as_u64().unwrap() as u32, chosen[path].as_u64().unwrap() as usize);
        let w = &dense.tensors[path];
        let last = w.shape[1];
        assert!(g >= 4 && last % g == 0 && (last / g).is_power_of_two(), "{path}: group {g} of {last}");
        assert_eq!(cka.tensors[path].f32s(), runtime::compress::quantize_groups(w.f32s(), last, bits, g).unwrap());
        let (want_g, _) = runtime::compress::adaptive_group(w.f32s(), last, bits, 4, 0.2).unwrap();
        assert_eq!(g, want_g, "{path}");
        let n = w.numel() as f64;
        with_scales += n * (bits as f64 + 16.0 / g as f64);
        total += n;
    }
    assert!((ra["mean_bits_with_scales"].as_f64().unwrap() - with_scales / total).abs() < 1e-9);
    assert!(chosen.values().any(|g| g.as_u64() != Some(4)), "no matrix kept a coarser group: {chosen:?}");
    // Pruning: magnitude pruning at sparsity levels, 50% of the weights on average.
    let pruned = dir.join("s50");
    let c4 = recipec()
        .arg("compress")
        .arg(&run)
        .args(["--sparsity", "0.5", "--levels", "0,0.25,0.5,0.75", "--fitness", "loss"])
        .args(search)
        .arg("--out")
        .arg(&pruned)
        .output()
        .unwrap();
    assert!(c4.status.success(), "{}", stderr(&c4));
    let rp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pruned.join("compress.json")).unwrap()).unwrap();
    assert_eq!(rp["mode"], "prune");
    let ckp = runtime::checkpoint::Checkpoint::load(&pruned.join("checkpoint.safetensors")).unwrap();
    let (mut zeros, mut total) = (0usize, 0usize);
    for (path, s) in rp["sparsity_per_matrix"].as_object().unwrap() {
        let w = ckp.tensors[path].f32s();
        let z = w.iter().filter(|x| **x == 0.0).count();
        assert_eq!(z, (s.as_f64().unwrap() * w.len() as f64).round() as usize, "{path}");
        // The survivors are the dense weights, unchanged.
        let d = dense.tensors[path].f32s();
        assert!(w.iter().zip(d).all(|(a, b)| *a == 0.0 || a == b), "{path}");
        zeros += z;
        total += w.len();
    }
    assert_eq!(zeros * 2, total);
    let s = &rp["search"];
    assert_eq!(s["fitness"], "loss");
    assert!(s["calibration_searched"].as_f64().unwrap() < s["calibration_uniform"].as_f64().unwrap(), "{s}");
    // Sparsity 0 everywhere is the dense model: KL exactly 0, the dense validation loss.
    let zero = dir.join("s0");
    let c5 = recipec()
        .arg("compress")
        .arg(&run)
        .args(["--sparsity", "0", "--levels", "0,0.1", "--generations", "0", "--out"])
        .arg(&zero)
        .output()
        .unwrap();
    assert!(c5.status.success(), "{}", stderr(&c5));
    let r0: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(zero.join("compress.json")).unwrap()).unwrap();
    assert_eq!(r0["search"]["calibration_uniform"], 0.0);
    assert_eq!(r0["validation"]["uniform"], r0["validation"]["dense"]);
    // Refused with a code, writing nothing: an occupied --out, and bad options.
    let before = std::fs::read(a.join("checkpoint.safetensors")).unwrap();
    let busy = compress(&a, &[]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(stderr(&busy).contains("E0605") && stderr(&busy).contains("not empty"), "{}", stderr(&busy));
    assert_eq!(std::fs::read(a.join("checkpoint.safetensors")).unwrap(), before);
    for bad in [
        &["--levels", "2,3,5"][..],
        &["--levels", "4,5,6"],
        &["--selection", "2:1"],
        &["--units", "model..wte"],
        &["--units", "model.nothing"],
        &["--sparsity", "0.5"],
        &["--fitness", "ppl"],
    ] {
        let out = compress(&dir.join("never"), bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(stderr(&out).contains("E0605"), "{bad:?}: {}", stderr(&out));
        assert!(!dir.join("never").exists());
    }
    for bad in ["adaptive:0", "adaptive:8:-1", "adaptive:8:0.1:2", "sixty", "0"] {
        let out = compress_grouped(&dir.join("never"), bad, &[]);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(stderr(&out).contains("E0605") && stderr(&out).contains("--group"), "{bad:?}: {}", stderr(&out));
        assert!(!dir.join("never").exists());
    }
    for bad in [&["--sparsity", "0.55"][..], &["--sparsity", "0.5", "--levels", "0.5,1,1.5"], &["--sparsity", "-0.1"]] {
        let out = recipec().arg("compress").arg(&run).args(bad).arg("--out").arg(dir.join("never")).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(stderr(&out).contains("E0605"), "{bad:?}: {}", stderr(&out));
        assert!(!dir.join("never").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
