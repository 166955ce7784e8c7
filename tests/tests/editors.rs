//! The editor files are consistent with the language: the VS Code grammar, manifest and
//! language configuration are valid JSON and agree with each other, every keyword of the
//! lexer and every dtype is highlighted, and the Neovim setup starts `recipec lsp`.

use tests::root;

fn json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid JSON: {e}"))
}

fn patterns(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if (k == "match" || k == "begin" || k == "end") && x.is_string() {
                    out.push(x.as_str().unwrap().to_string());
                } else {
                    patterns(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| patterns(x, out)),
        _ => {}
    }
}

#[test]
fn vscode_extension_is_consistent() {
    let manifest = json("editors/vscode/package.json");
    assert_eq!(manifest["contributes"]["languages"][0]["extensions"][0], ".recipe");
    assert_eq!(manifest["main"], "./extension.js");
    assert!(root().join("editors/vscode/extension.js").exists());
    json("editors/vscode/language-configuration.json");
    let grammar = json("editors/vscode/syntaxes/recipe.tmLanguage.json");
    assert_eq!(grammar["scopeName"], manifest["contributes"]["grammars"][0]["scopeName"]);
    let mut pats = vec![];
    patterns(&grammar, &mut pats);
    assert!(pats.len() > 10);
    let all = pats.join("\n");
    for kw in lang::lexer::HARD_KEYWORDS.iter().chain(lang::lexer::CONTEXTUAL_KEYWORDS.iter().map(|(k, _)| k)) {
        assert!(all.contains(kw), "the grammar does not highlight the keyword `{kw}`");
    }
    for dtype in ["f32", "f16", "bf16", "f64", "i32", "i64", "bool"] {
        assert!(all.contains(dtype), "the grammar does not highlight `{dtype}`");
    }
}

#[test]
fn neovim_setup_names_the_server_and_highlights_keywords() {
    let text = std::fs::read_to_string(root().join("editors/nvim/recipe.lua")).unwrap();
    assert!(text.contains("\"recipec\", \"lsp\"") && text.contains("*.recipe"));
    let syntax = std::fs::read_to_string(root().join("editors/nvim/syntax/recipe.vim")).unwrap();
    for kw in lang::lexer::HARD_KEYWORDS.iter().chain(lang::lexer::CONTEXTUAL_KEYWORDS.iter().map(|(k, _)| k)) {
        assert!(syntax.split_whitespace().any(|w| w == *kw), "syntax/recipe.vim does not highlight `{kw}`");
    }
}
