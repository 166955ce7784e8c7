//! Documentation stays true: `docs/diagnostics.md` is generated from the code docs, every
//! code is explained, and every built-in appears in the language reference.

use tests::root;

#[test]
fn diagnostics_index_matches_the_code_docs() {
    let path = root().join("docs/diagnostics.md");
    let generated = lang::diag::diagnostics_markdown();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/diagnostics.md is stale: run `UPDATE_DOCS=1 cargo test -p tests --test docs` and commit the result"
    );
}

#[test]
fn every_code_has_a_complete_doc() {
    let mut seen = std::collections::BTreeSet::new();
    for c in lang::diag::CODES {
        assert!(seen.insert(c.code), "duplicate code {}", c.code);
        assert!(c.code.len() == 5 && (c.code.starts_with('E') || c.code.starts_with('W')), "bad code {}", c.code);
        assert!(
            !c.title.is_empty() && !c.explanation.is_empty() && !c.example.is_empty() && !c.fix.is_empty(),
            "{}",
            c.code
        );
    }
}

#[test]
fn every_builtin_is_in_the_language_reference() {
    let reference = std::fs::read_to_string(root().join("docs/language.md")).unwrap();
    let missing: Vec<&str> =
        lang::builtins::BUILTINS.iter().map(|b| b.0).filter(|name| !reference.contains(&format!("`{name}`"))).collect();
    assert!(missing.is_empty(), "docs/language.md does not list these built-ins: {missing:?}");
    for (field, _, _) in lang::recipe::RECIPE_FIELDS {
        assert!(reference.contains(&format!("`{field}`")), "docs/language.md does not document recipe field `{field}`");
    }
}
