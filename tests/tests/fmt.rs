//! `recipec fmt` is idempotent on every recipe file in the repository, the committed files
//! are already formatted, and formatting leaves `check` results unchanged.

use lang::source::SourceDb;
use tests::{recipe_files, root, RepoLoader};

fn check_summary(name: &str, text: &str) -> Vec<(String, String)> {
    let mut db = SourceDb::new();
    let f = db.add(name, text);
    let a = lang::analyze(&mut db, &[f], &RepoLoader);
    let mut v: Vec<(String, String)> = a
        .diagnostics
        .iter()
        .filter(|d| d.primary().map(|l| l.file) == Some(f))
        .map(|d| (d.code.to_string(), d.message.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn formatting_is_idempotent_and_preserves_meaning() {
    let mut files = recipe_files(&root().join("stdlib"));
    files.extend(recipe_files(&root().join("recipes")));
    files.extend(recipe_files(&root().join("tests/compile")));
    let mut formatted_count = 0;
    for path in files {
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let Ok(once) = lang::fmt::format_source(&text) else {
            continue; // Files with syntax errors are not formatted.
        };
        formatted_count += 1;
        let twice = lang::fmt::format_source(&once).unwrap();
        assert_eq!(once, twice, "{rel}: formatting is not idempotent");
        if !rel.starts_with("tests/") {
            assert_eq!(once, text, "{rel} is not formatted: run `recipec fmt {rel}`");
        }
        // Comments survive: every comment text is still there.
        for c in lang::lexer::lex(lang::source::FileId(0), &text).comments {
            assert!(once.contains(c.text.trim_end()), "{rel}: formatting lost the comment {:?}", c.text);
        }
        assert_eq!(check_summary(&rel, &text), check_summary(&rel, &once), "{rel}: formatting changed the diagnostics");
    }
    assert!(formatted_count > 100);
}
