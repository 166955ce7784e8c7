//! The case corpus: every file under `tests/compile/` is checked; `//~ CODE` markers say
//! which diagnostics each line must produce (`//~^ CODE` for the line above), and nothing
//! else may be reported. Each case has an insta snapshot with the source, the diagnostics
//! and, for valid cases, the typed form.

use lang::source::SourceDb;
use std::collections::BTreeSet;
use tests::{recipe_files, render, root, RepoLoader};

fn markers(text: &str) -> BTreeSet<(usize, String)> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(pos) = line.find("//~") {
            let rest = &line[pos + 3..];
            // `//~^` points one line up, `//~^^` two lines.
            let ups = rest.chars().take_while(|c| *c == '^').count();
            let (line_no, codes) = (i + 1 - ups, &rest[ups..]);
            for code in codes.split_whitespace() {
                out.insert((line_no, code.to_string()));
            }
        }
    }
    out
}

#[test]
fn case_corpus() {
    let dir = root().join("tests/compile");
    let files = recipe_files(&dir);
    let mut failures = vec![];
    let (mut valid, mut invalid) = (0, 0);
    let mut codes_seen: BTreeSet<String> = BTreeSet::new();
    for path in &files {
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        let mut db = SourceDb::new();
        let file = db.add(rel.clone(), text.clone());
        let analysis = lang::analyze(&mut db, &[file], &RepoLoader);
        let mine: Vec<&lang::diag::Diagnostic> =
            analysis.diagnostics.iter().filter(|d| d.primary().map(|l| l.file) == Some(file)).collect();
        let actual: BTreeSet<(usize, String)> = mine
            .iter()
            .map(|d| {
                let l = d.primary().unwrap();
                (db.file(file).line_col(l.span.start).0, d.code.to_string())
            })
            .collect();
        let expected = markers(&text);
        codes_seen.extend(expected.iter().map(|(_, c)| c.clone()));
        if expected.iter().any(|(_, c)| c.starts_with('E')) {
            invalid += 1;
        } else {
            valid += 1;
        }
        if rel.contains("/valid/") && !expected.is_empty() {
            failures.push(format!("{rel}: a valid case must not expect diagnostics"));
        }
        if actual != expected {
            let rendered: String = mine.iter().map(|d| render(&db, d)).collect();
            failures.push(format!("{rel}:\n  expected {expected:?}\n  actual   {actual:?}\n{rendered}"));
        }
        let mut snap = format!("SOURCE\n{text}\nDIAGNOSTICS\n");
        for d in &mine {
            snap.push_str(&render(&db, d));
        }
        if rel.contains("/valid/") {
            snap.push_str("\nTYPED\n");
            snap.push_str(&lang::check::typed_text(&db, &analysis, file));
        }
        let name = rel.trim_start_matches("tests/compile/").trim_end_matches(".recipe").replace('/', "__");
        insta::with_settings!({snapshot_path => "../compile/snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
            insta::assert_snapshot!(name, snap);
        });
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
    assert!(valid >= 60, "the corpus needs at least 60 valid programs, has {valid}");
    assert!(invalid >= 60, "the corpus needs at least 60 invalid programs, has {invalid}");
    // E05xx are reported by `recipec eval`, E06xx by `recipec train`/`sample`: covered by
    // their command-line tests (`recipec/tests/cli.rs`, `recipec/tests/train.rs`).
    let missing: Vec<&str> = lang::diag::CODES
        .iter()
        .map(|c| c.code)
        .filter(|c| !c.starts_with("E05") && !c.starts_with("E06") && !codes_seen.contains(*c))
        .collect();
    assert!(missing.is_empty(), "no case exercises: {missing:?}");
}

#[test]
fn every_item_kind_is_covered() {
    let dir = root().join("tests/compile");
    let mut kinds = BTreeSet::new();
    for path in recipe_files(&dir) {
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = lang::parse::parse(lang::source::FileId(0), &text);
        for item in &parsed.module.items {
            kinds.insert(item.kind_name());
        }
    }
    for k in ["use", "fn", "loss", "optimizer", "schedule", "sparsity", "decode", "model", "recipe"] {
        assert!(kinds.contains(k), "no case declares a `{k}` item");
    }
}
