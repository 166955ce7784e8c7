// Tokenizes every stdlib file and example recipe with VS Code's own TextMate engine
// (vscode-textmate + vscode-oniguruma, from npm) and the grammar in editors/vscode, and
// checks that keywords, types, comments, numbers and strings get their scopes.
// Run: (cd tests/editor && npm install && node grammar_test.js)
const fs = require("fs");
const path = require("path");
const vsctm = require("vscode-textmate");
const oniguruma = require("vscode-oniguruma");

const root = path.join(__dirname, "..", "..");
const wasm = fs.readFileSync(path.join(__dirname, "node_modules", "vscode-oniguruma", "release", "onig.wasm")).buffer;

async function main() {
  await oniguruma.loadWASM(wasm);
  const registry = new vsctm.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (p) => new oniguruma.OnigScanner(p),
      createOnigString: (s) => new oniguruma.OnigString(s),
    }),
    loadGrammar: async (scope) => {
      if (scope !== "source.recipe") return null;
      const file = path.join(root, "editors", "vscode", "syntaxes", "recipe.tmLanguage.json");
      return vsctm.parseRawGrammar(fs.readFileSync(file, "utf8"), file);
    },
  });
  const grammar = await registry.loadGrammar("source.recipe");
  const files = [];
  for (const dir of ["stdlib", "recipes"]) {
    for (const f of fs.readdirSync(path.join(root, dir))) if (f.endsWith(".recipe")) files.push(path.join(root, dir, f));
  }
  const seen = {};
  let failures = 0;
  for (const file of files) {
    let state = vsctm.INITIAL;
    for (const line of fs.readFileSync(file, "utf8").split("\n")) {
      const r = grammar.tokenizeLine(line, state);
      for (const t of r.tokens) {
        const text = line.slice(t.startIndex, t.endIndex);
        const scope = t.scopes[t.scopes.length - 1];
        (seen[scope] = seen[scope] || new Set()).add(text.trim());
      }
      state = r.ruleStack;
    }
  }
  const expect = (scope, text) => {
    if (!(seen[scope] && seen[scope].has(text))) {
      console.log(`FAIL: \`${text}\` is never scoped ${scope}`);
      failures++;
    }
  };
  expect("keyword.declaration.recipe", "fn");
  expect("keyword.declaration.recipe", "optimizer");
  expect("keyword.declaration.recipe", "model");
  expect("keyword.declaration.recipe", "param");
  expect("keyword.other.recipe", "use");
  expect("keyword.control.recipe", "if");
  expect("storage.type.recipe", "f32");
  expect("constant.numeric.recipe", "0.9");
  expect("keyword.operator.transpose.recipe", "^T");
  expect("entity.name.function.recipe", "cross_entropy");
  expect("string.quoted.double.recipe", "embedded:kjv");
  const comments = Object.keys(seen).filter((s) => s.startsWith("comment."));
  if (comments.length < 2) {
    console.log("FAIL: comments and doc comments are not both scoped");
    failures++;
  }
  console.log(`${files.length} files tokenized; ${Object.keys(seen).length} scopes`);
  console.log(`${failures === 0 ? 1 : 0} passed, ${failures === 0 ? 0 : 1} failed`);
  process.exit(failures === 0 ? 0 : 1);
}

main().catch((e) => {
  console.log("FAIL:", e);
  process.exit(1);
});
