//! No input makes the front end panic. Random bytes and random token-level mutations
//! (deleted, duplicated, swapped, replaced tokens) of every stdlib file, example recipe and
//! corpus case go through `lang::analyze` and the formatter; only diagnostics may come out,
//! and whatever formats must format to itself again.
//!
//! `FUZZ_CASES` sets the number of cases (default 100000, as CI runs); `FUZZ_SEED` the seed.

use lang::source::{FileId, MemoryLoader, SourceDb};
use tests::{recipe_files, root};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn corpus() -> Vec<String> {
    let mut out: Vec<String> = stdlib::MODULES.iter().map(|m| m.2.to_string()).collect();
    for p in recipe_files(&root().join("recipes")).into_iter().chain(recipe_files(&root().join("tests/compile"))) {
        out.push(std::fs::read_to_string(p).unwrap());
    }
    out
}

/// Token boundaries of a source (by the real lexer), as byte ranges.
fn token_ranges(src: &str) -> Vec<(usize, usize)> {
    lang::lexer::lex(FileId(0), src).tokens.iter().map(|t| (t.0, t.2)).collect()
}

fn mutate(rng: &mut Rng, src: &str) -> String {
    let toks = token_ranges(src);
    if toks.is_empty() {
        return src.to_string();
    }
    let mut s = src.to_string();
    let n = 1 + rng.below(3);
    for _ in 0..n {
        let toks = token_ranges(&s);
        if toks.is_empty() {
            break;
        }
        let i = rng.below(toks.len());
        let (a, b) = toks[i];
        match rng.below(5) {
            0 => s.replace_range(a..b, ""),
            1 => {
                let t = s[a..b].to_string();
                s.insert_str(b, &format!(" {t}"));
            }
            2 if i + 1 < toks.len() => {
                let (c, d) = toks[i + 1];
                let (x, y) = (s[a..b].to_string(), s[c..d].to_string());
                s.replace_range(c..d, &x);
                s.replace_range(a..b, &y);
            }
            3 => {
                let j = rng.below(toks.len());
                let t = s[toks[j].0..toks[j].1].to_string();
                s.replace_range(a..b, &t);
            }
            _ => {
                const SNIPPETS: &[&str] = &[
                    "(",
                    ")",
                    "{",
                    "}",
                    "[",
                    "]",
                    "\n",
                    "^T",
                    "@",
                    "every",
                    "..",
                    "0",
                    "-1",
                    "\"",
                    "$",
                    "_",
                    "*",
                    "**",
                    "::",
                    "9999999999999999999",
                    "é",
                    "//",
                    "///",
                ];
                let t = SNIPPETS[rng.below(SNIPPETS.len())];
                s.insert_str(a, t);
            }
        }
    }
    s
}

fn random_text(rng: &mut Rng) -> String {
    let len = rng.below(400);
    let mut bytes = Vec::with_capacity(len);
    for _ in 0..len {
        let b = match rng.below(4) {
            0 => rng.below(256) as u8,
            _ => {
                const ALPHABET: &[u8] = b"abcfnlet(){}[]:=+-*/^T@.,\n 0123456789_\"<>!&|?%#";
                ALPHABET[rng.below(ALPHABET.len())]
            }
        };
        bytes.push(b);
    }
    String::from_utf8_lossy(&bytes).to_string()
}

#[test]
fn front_end_never_panics() {
    let cases: usize = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_1234_ABCD);
    let mut rng = Rng(seed | 1);
    let corpus = corpus();
    let mut loader = MemoryLoader::default();
    for (m, f, t) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), t);
    }
    let mut with_errors = 0usize;
    for case in 0..cases {
        let text = if case % 5 == 0 {
            random_text(&mut rng)
        } else {
            let pick = rng.below(corpus.len());
            mutate(&mut rng, &corpus[pick])
        };
        let result = std::panic::catch_unwind(|| {
            let mut db = SourceDb::new();
            let f = db.add("fuzz.recipe", text.clone());
            let analysis = lang::analyze(&mut db, &[f], &loader);
            for d in &analysis.diagnostics {
                assert!(lang::diag::code_doc(d.code).is_some(), "undocumented code {}", d.code);
                assert!(!d.labels.is_empty(), "diagnostic without a span: {}", d.message);
            }
            let errors = analysis.has_errors();
            if let Ok(once) = lang::fmt::format_source(&text) {
                let twice = lang::fmt::format_source(&once).expect("formatted output parses");
                assert_eq!(once, twice, "formatting is not idempotent");
            }
            errors
        });
        match result {
            Ok(e) => with_errors += e as usize,
            Err(_) => {
                let path = std::env::temp_dir().join(format!("recipec-fuzz-{case}.recipe"));
                let _ = std::fs::write(&path, &text);
                panic!("case {case} (seed {seed}) panicked; input saved to {}:\n{text}", path.display());
            }
        }
    }
    println!("{cases} cases, {with_errors} with errors, none panicked");
    assert!(with_errors > cases / 4, "the mutations should mostly produce errors");
}

#[test]
fn pathological_nesting_is_a_diagnostic() {
    let loader = MemoryLoader::default();
    for text in [
        format!("fn f(x: f32) -> f32 {{ {}x{} }}", "(".repeat(100_000), ")".repeat(100_000)),
        format!("fn f(x: f32) -> f32 {{ {}x }}", "-".repeat(100_000)),
        format!("fn f(x: f32) -> f32 {{ x{} }}", " + x".repeat(100_000)),
        "[".repeat(50_000),
    ] {
        let mut db = SourceDb::new();
        let f = db.add("deep.recipe", text.clone());
        let analysis = lang::analyze(&mut db, &[f], &loader);
        assert!(analysis.has_errors());
        assert!(lang::fmt::format_source(&text).is_err());
    }
}
