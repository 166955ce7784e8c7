//! Diagnostics as data: stable codes, severities, labelled spans, help and notes.
//!
//! The core never renders diagnostics; the CLI renders them with miette and the LSP converts
//! them to protocol messages. Every code has a doc in [`CODES`] (what it means, an example
//! and the fix) shown by `recipec explain` and collected in `docs/diagnostics.md`.

use crate::source::{FileId, Span};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// A labelled span. The primary label (the first) must make sense alone: editors show only it.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub file: FileId,
    pub span: Span,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Diagnostic {
        debug_assert!(code_doc(code).is_some(), "diagnostic code {code} has no doc");
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            labels: vec![],
            help: None,
            notes: vec![],
        }
    }
    pub fn warning(code: &'static str, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, message) }
    }
    pub fn label(mut self, file: FileId, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label { file, span, message: message.into() });
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn maybe_help(mut self, help: Option<String>) -> Self {
        if help.is_some() {
            self.help = help;
        }
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    /// The primary location, if any.
    pub fn primary(&self) -> Option<&Label> {
        self.labels.first()
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The documentation of one diagnostic code.
pub struct CodeDoc {
    pub code: &'static str,
    pub title: &'static str,
    pub explanation: &'static str,
    pub example: &'static str,
    pub fix: &'static str,
}

pub fn code_doc(code: &str) -> Option<&'static CodeDoc> {
    CODES.iter().find(|c| c.code.eq_ignore_ascii_case(code))
}

/// Renders every code doc as the Markdown of `docs/diagnostics.md`.
pub fn diagnostics_markdown() -> String {
    let mut out = String::from(
        "# Diagnostics index\n\nEvery diagnostic `recipec` reports has a stable code. \
`recipec explain CODE` prints the same text as this page, which is generated from \
`lang/src/diag.rs` (a test keeps the two in sync: run `UPDATE_DOCS=1 cargo test -p tests \
--test docs` after changing a code).\n\nCodes `E00xx` are lexical, `E01xx` syntax, `E02xx` names \
and modules, `E03xx` types and shapes, `E04xx` recipes, `E05xx` evaluation (`recipec eval`); `W0xxx` are warnings.\n\n",
    );
    for c in CODES {
        out.push_str(&explain_text(c));
        out.push('\n');
    }
    out
}

/// The text of one code's doc, as printed by `recipec explain`.
pub fn explain_text(c: &CodeDoc) -> String {
    format!(
        "## {}: {}\n\n{}\n\nExample:\n\n```recipe\n{}\n```\n\nFix: {}\n",
        c.code,
        c.title,
        c.explanation.trim(),
        c.example.trim_matches('\n'),
        c.fix.trim()
    )
}

macro_rules! codes {
    ($( $code:literal, $title:literal, $expl:literal, $ex:literal, $fix:literal; )*) => {
        pub static CODES: &[CodeDoc] = &[ $( CodeDoc { code: $code, title: $title, explanation: $expl, example: $ex, fix: $fix }, )* ];
    };
}

codes! {
"E0001", "unexpected character",
"The lexer met a character that starts no token of the language. Lexing goes on after it, so \
the rest of the file is still checked.",
"let x = 3 $ 4",
"Remove the character, or replace it with the operator you meant.";

"E0002", "unterminated string",
"A string literal opened with `\"` has no closing quote on the same line.",
"data = text(\"corpus.txt, context = 64, batch = 8)",
"Close the string with `\"` before the end of the line.";

"E0003", "invalid number literal",
"A number could not be read: an integer too large for 64 bits, or a malformed exponent.",
"let big = 99999999999999999999",
"Write the number within the range of `i64`, or as a float such as `1e20`.";

"E0101", "syntax error",
"The parser expected something else at this token. Parsing resumes at the next statement or \
item, so one mistake yields one diagnostic.",
"fn f(x: f32) -> f32 {\n    x + * 2\n}",
"Look at the token under the label and the list of what was expected.";

"E0102", "unexpected end of file",
"The file ended while an item, a block or a bracket was still open.",
"fn f(x: f32) -> f32 {\n    x + 1",
"Close the open brace or bracket.";

"E0103", "doc comment documents nothing",
"A `///` doc comment must stand directly before an item, a model member or a recipe field. \
Elsewhere it would be silently lost, so it is an error.",
"fn f(x: f32) -> f32 {\n    /// the answer\n    x\n}",
"Use a plain `//` comment, or move the doc comment before the item it documents.";

"E0201", "unknown module",
"A `use` names a module that does not exist: `std.a.b` must be a file `stdlib/a/b.recipe` of \
the standard library, and any other path a `.recipe` file next to the importing file.",
"use std.losses.cross_entropy",
"Check the module path; `recipec` lists the standard library modules in `docs/language.md`.";

"E0202", "import cycle",
"Modules import each other in a cycle. Items are resolved per module, so a cycle has no \
order in which the modules can be checked.",
"// a.recipe\nuse b.f\n// b.recipe\nuse a.g",
"Move the shared items into a third module that both import.";

"E0203", "unknown item in module",
"A `use` names an item the module does not define.",
"use std.loss.crossentropy",
"Use the item's exact name; the help line suggests the closest one.";

"E0204", "unknown name",
"An identifier is not bound in this scope: not a parameter, a `let`, an item of this module, \
an import, a built-in, or a dimension of the signature.",
"fn f(x: f32[N]) -> f32 {\n    sum(exp(y))\n}",
"Define the name, import it with `use`, or fix the spelling (see the help line).";

"E0205", "duplicate definition",
"Two items, parameters, members or fields have the same name in one scope.",
"fn f(x: f32) -> f32 { x }\nfn f(y: f32) -> f32 { y }",
"Rename one of them.";

"E0206", "private item",
"An item is imported from another module but not marked `pub` there.",
"// in a.recipe: fn helper(x: f32) -> f32 { x }\nuse a.helper",
"Mark the item `pub` in its module, or do not import it.";

"E0301", "dtype mismatch",
"A value has a different element type than the place it goes to: a parameter, a declared \
return type, a state, or an operator that needs a particular dtype (`gather` indices must be \
integers, `where` conditions must be `bool`); a `param` is trained, so it is floating point \
(integer model state is a `buffer`). Arithmetic promotes like JAX (integers with floats give \
floats), but arguments and return values are never converted silently.",
"fn f(x: f32[N]) -> f32 { sum(x) }\nfn g(t: i32[N]) -> f32 { f(t) }",
"Convert explicitly with a cast such as `f32(t)`, or fix the declaration.";

"E0302", "shape mismatch",
"Two shapes do not agree: they cannot be broadcast together (NumPy rules), or an argument's \
shape does not unify with the parameter's declared shape. The message names both shapes and \
where each symbolic dimension was bound.",
"fn f(a: f32[N, D], b: f32[N, E]) -> f32[N, D] { a + b }",
"Make the dimensions agree (transpose, reshape or slice), or fix the declared shapes.";

"E0303", "matmul shape mismatch",
"In `a @ b` the last axis of `a` must equal the second-to-last axis of `b` (the contraction \
axis), and leading axes broadcast.",
"fn f(h: f32[N, D], c: f32[V, D]) -> f32[N, V] { h @ c }",
"Transpose one operand (`c^T`) so that the contracted dimensions meet.";

"E0304", "rank mismatch",
"A value has a different number of axes than expected.",
"fn f(x: f32[N, D]) -> f32[N] { x }",
"Reduce, reshape or index the value to the expected rank.";

"E0305", "wrong number of arguments",
"A call passes too many positional arguments, or leaves out an argument that has no default.",
"fn f(x: f32, y: f32) -> f32 { x + y }\nfn g() -> f32 { f(1.0) }",
"Pass every parameter without a default, positionally or by `name = value`.";

"E0306", "unknown named argument",
"A call passes `name = value` but the callee has no parameter of that name.",
"fn g(x: f32[N]) -> f32 { logsumexp(x, axs = 0) }",
"Use one of the callee's parameter names (the help line suggests the closest).";

"E0307", "argument given twice",
"A parameter receives a value both positionally and by name, or by name twice.",
"fn g(x: f32[N]) -> f32 { sum(x, axis = 0, axis = 0) }",
"Pass each argument once.";

"E0308", "not callable",
"The callee of a call is not a function, a built-in, a model method or an item.",
"fn g(x: f32) -> f32 { x(2.0) }",
"Call a function; to multiply, write `x * 2.0`.";

"E0309", "axis out of range",
"An `axis` argument is outside the rank of the tensor it applies to. Negative axes count from \
the end, as in NumPy.",
"fn g(x: f32[N, D]) -> f32[N] { sum(x, axis = 2) }",
"Use an axis in `-rank..rank`.";

"E0310", "expected a compile-time constant",
"A position that fixes a shape or an unrolled loop (a dimension, `axis`, `k` of `topk`, a \
model argument, a `for` bound) needs a value known at build time: an integer literal, a \
symbolic dimension, or arithmetic of those.",
"fn g(x: f32[N], k: f32) -> f32[_] { topk(x, k) }",
"Pass an integer literal or a dimension such as `N` or `D / H`.";

"E0311", "condition is not a boolean",
"The condition of `if`, `where` or `? :`, and the operands of `&&`, `||` and `!`, must be \
`bool` (a comparison gives one).",
"fn g(x: f32) -> f32 { if x { 1.0 } else { 0.0 } }",
"Compare explicitly, for example `x > 0.0`.";

"E0312", "invalid type",
"A type names no dtype (`f32`, `f16`, `bf16`, `f64`, `i32`, `i64`, `bool`), or a dimension is \
not an integer, a symbolic name, `_` or arithmetic of those.",
"fn g(x: float[N]) -> f32 { sum(x) }",
"Use one of the dtypes listed above.";

"E0313", "unknown field",
"A `.name` access names no parameter, submodule or method of a model, or no field of the value \
(a batch has `inputs` and `targets`).",
"// with model = gpt(...)\nloss = cross_entropy(model.fwd(batch.inputs), batch.targets)",
"Use one of the members listed in the help line.";

"E0314", "invalid assignment",
"Only `let` bindings, optimizer `param` and states, and sparsity `mask`/`grad` can be assigned. \
Parameters of functions are immutable, and a name must be bound before it is assigned.",
"fn g(x: f32) -> f32 {\n    x = x + 1.0\n    x\n}",
"Introduce a new binding with `let`.";

"E0315", "invalid indexing",
"An index or slice does not fit the tensor: more indices than axes, an integer index that is \
not a scalar, a gather index that is not an integer tensor, or a slice beyond the extent.",
"fn g(x: f32[N]) -> f32 { x[0, 1] }",
"Use at most one index per axis; integer tensors gather along the first axis.";

"E0316", "element count mismatch",
"`reshape` must keep the number of elements.",
"fn g(x: f32[4, 6]) -> f32[5, 5] { reshape(x, [5, 5]) }",
"Choose a target shape whose product equals the input's.";

"E0317", "loss must return a scalar",
"A `loss` (and a recipe's `loss` field) must produce a scalar floating-point value: gradients \
are taken of it.",
"loss l(x: f32[N]) -> f32[N] { x * x }",
"Reduce the value, for example with `mean(...)` or `sum(...)`.";

"E0318", "invalid operand",
"An operator or built-in is applied to a value it does not accept: a model, a string, a \
schedule, or a tensor of the wrong kind (a float where an integer is needed).",
"fn g(x: f32) -> f32 { x + \"one\" }",
"Apply the operator to tensors or scalars of a suitable dtype.";

"E0319", "statement not allowed here",
"`state` belongs in optimizers, `mask`/`grad` rules in sparsity items, `param` and `sub` in \
models, and `optimize`/`sparsify`/`freeze` in recipes.",
"fn g(x: f32) -> f32 {\n    state m = 0.0\n    x\n}",
"Move the statement into an item of the right kind.";

"E0320", "missing value",
"A block that must produce a value ends with a statement, or a sparsity rule never assigns \
`mask`, or an optimizer never assigns `param`.",
"fn g(x: f32) -> f32 {\n    let y = x * 2.0\n}",
"End the block with an expression (here `y`).";

"E0401", "unknown recipe field",
"A recipe sets a field that recipes do not have.",
"recipe r {\n    stpes = 100\n}",
"Use a known field (see the help line and `docs/language.md`).";

"E0402", "missing recipe field",
"A recipe must set `model`, `data` and `loss`, and optimize at least one parameter group. \
`teacher` and `teacher_from` come together: the teacher's model and the checkpoint its \
parameters are read from.",
"recipe r {\n    model = mlp(D = 4, H = 8, C = 2)\n}",
"Add the missing field.";

"E0403", "selector matches no parameter",
"An `optimize`, `sparsify` or `freeze` selector matches none of the model's parameters. Selectors are \
dotted paths from `model`; `*` matches one segment and `**` any number of segments. Buffers \
(`buffer` members: model state that is never trained) are never matched.",
"optimize model.block.* with adamw(lr = 1e-3)   // the member is `blocks`",
"Fix the path; the help line lists parameters of the model.";

"E0404", "invalid hyperparameter",
"An optimizer or sparsity hyperparameter must be a scalar (a literal or constant expression) \
or a schedule applied to its arguments, such as `cosine(peak = 1e-3, total = 1000)`.",
"optimize model.** with adamw(lr = model.wte)",
"Pass a scalar or a schedule.";

"E0405", "parameter optimized twice",
"Two `optimize` lines select the same parameter, or a `freeze` line selects an optimized one; \
each parameter belongs to exactly one group, or is frozen.",
"optimize model.** with adamw(lr = 1e-3)\noptimize model.wte with sgd(lr = 0.1)",
"Narrow one selector so the groups do not overlap.";

"E0406", "wrong kind of item",
"A place expects a particular kind of item (`optimize … with` an optimizer, `sparsify … with` a \
sparsity rule, `model =` a model, `decode =` a decoding policy) but the name is another kind.",
"optimize model.** with cross_entropy(lr = 1e-3)",
"Use an item of the expected kind.";

"E0501", "invalid evaluation argument",
"`recipec eval` received an argument it cannot use: a missing or unreadable `.npy` file, an \
array whose dtype or shape does not fit the parameter, an unknown parameter name, or an \
unknown item or backend. Nothing is written to `--out` on error.",
"recipec eval loss.recipe cross_entropy --arg logits=z.npy --arg targets=y_float.npy --out out/",
"Pass every tensor parameter as `--arg NAME=PATH.npy` with the declared dtype and a shape that \
fits the declared dimensions, and scalars as `--hp NAME=VALUE`.";

"E0502", "cannot evaluate",
"The item is valid but uses something the reference interpreter does not evaluate yet (model \
methods, `qr`, `svd_topk`, data sources), or a value that only exists at run time was needed \
at build time.",
"recipec eval models.recipe gpt --out out/",
"Evaluate a function, loss, schedule, optimizer, sparsity rule or decoding policy.";

"E0503", "the CUDA build does not fit the target",
"`recipec build --target cuda` generates the CUDA C of the entry point and, where the tools \
are installed, compiles it with NVRTC and assembles it with `ptxas` for the chosen \
architecture (`--arch sm_80` or `sm_90`). A kernel that needs more than 1024 threads or 48 KiB \
of static shared memory per block, more registers for one block than the 65,536 of a \
multiprocessor, or a grid of more than 65,535 blocks down or deep (a \
matmul's row tiles of 64 and its batch: more than 4,194,240 rows or 65,535 batched products), \
or a translation unit NVRTC or `ptxas` rejects, is reported here, before anything is launched, \
with a command that reproduces the failure. `--backend cuda` (`eval`, `train`) checks the same \
limits before it compiles or copies anything.",
"recipec build stdlib/loss.recipe --item linear_cross_entropy --grad --shape hidden=f32[8192, 2304] ... --target cuda --arch sm_75",
"Choose `--arch sm_80` or `sm_90`; for a grid over the limits, fewer rows or batched products \
per call; a kernel over the other limits or a compiler failure is a bug in recipec's CUDA \
generator: report it with the printed command.";

"E0601", "the recipe cannot be trained as written",
"`recipec train` (and `recipec sample`) build every graph of the recipe before anything runs: \
the parameters' initializers, the loss and its gradients, each `optimize` group's optimizer \
with its hyperparameters (a schedule is evaluated at each step), each `sparsify` rule, and \
the decoding policy. A shape that does not fit the model (an N:M rule whose group size does \
not divide the weight's last axis, a loss whose arguments disagree), a hyperparameter that is \
neither a number nor a schedule, or a data source without `context` and `batch` is reported \
here, with the recipe line at fault, and no training starts.",
"recipe r {\n    model = gpt(D = 30)\n    sparsify model.blocks.*.mlp.w1 with nm(n = 2, m = 4)\n    ...\n}",
"Fix the line the diagnostic points at; `recipec build FILE --emit plan` shows the shapes the \
recipe's graphs get.";

"E0602", "invalid checkpoint",
"`--resume DIR`, `recipec sample DIR`, `recipec score DIR` and `recipec compress DIR` read \
`DIR/checkpoint.safetensors`, and a recipe's \
`init_from` and `teacher_from` name a run directory (its `checkpoint.safetensors`) or a \
`.safetensors` file. The file is rejected when it is missing, truncated, damaged (its \
checksum does not match), of another recipe (for `--resume`), or lacks a tensor the recipe \
needs or has it with another shape (`init_from` and `teacher_from` need every parameter of \
the model as `model.<path>`), or, resuming a distillation run, when `teacher_from` now holds \
another teacher than the one the run started with (each checkpoint records its digest). A \
rejected checkpoint is never overwritten: training does not start.",
"recipec train recipes/tiny_gpt.recipe --resume runs/tiny_gpt   # after the file was cut short",
"Resume from an intact checkpoint (checkpoints are written atomically, so the last one written \
completely is the one in the directory), or start afresh with another `--out`.";

"E0603", "training stopped",
"Training or sampling failed while running: the data could not be read or is too short for \
the recipe's `context` and `batch`, the output directory is not writable or already holds a \
checkpoint of another run, or the loss became NaN or infinite (the last good state is saved).",
"recipec train recipes/tiny_gpt.recipe --out runs/a   # runs/a holds an earlier run",
"Check the data path and sizes, choose an empty `--out` (or `--resume` the run that is there), \
and for a diverging loss lower the learning rate or set `grad_clip`.";

"E0604", "invalid sampling option",
"`recipec sample --constraint REGEX` keeps the generated text (the prompt excluded) a prefix \
of some string the regular expression matches in full (the `regex` crate's syntax, over \
bytes). The expression must parse and compile to a DFA of at most 16 MiB; `--particles N` \
needs `--constraint`, N ≥ 1 and the KV-cached step (no `--no-cache`). The other sampling \
options are checked here too: `--infini-gram λ` needs 0 < λ ≤ 1 and no `--particles`; \
`--cfg W` needs W ≥ 0, the KV-cached step and no `--particles`; `--negative` and \
`--adaptive-guidance γ` (−1 ≤ γ ≤ 1) need `--cfg`. Nothing is sampled otherwise.",
"recipec sample runs/tiny_gpt --constraint \"(Yea|Nay\"",
"Fix the expression (here: close the group, `(Yea|Nay)`); for a DFA that is too large, a \
shorter expression or fewer bounded repetitions (`a{1000}`).";

"E0605", "invalid compression request",
"`recipec compress DIR` quantizes a trained run's weight matrices to an average bit width \
(`--bits`) or prunes them to an average sparsity (`--sparsity`, not both), one of the levels \
a matrix may take (`--levels`, increasing, equally spaced: whole bit widths within 2..16, or \
sparsities in [0, 1); a level switch moves one step up in one matrix and one down in another \
of the same size, which keeps the total only when the steps are equal). `--selection` lists \
SURVIVORS:BATCHES stages whose survivors never grow and whose batches never shrink, the last \
keeping one; `--fitness` is `kl` (which needs the model's `logits` method) or `loss`; \
`--units` is a selector (`model.blocks.**`) that must select at least one f32 \
matrix whose last axis `--group` divides. The new run is written to `--out` (default \
`DIR-wBITS`), which must not exist or be empty. Nothing is written otherwise.",
"recipec compress runs/tiny_gpt --bits 3 --levels 2,4,6",
"Pick `--bits` among the levels (here `--bits 4`), make the levels equally spaced, or choose \
another `--out`.";

"W0001", "unused binding",
"A `let` binding is never read. Prefix the name with `_` to keep it on purpose.",
"fn g(x: f32) -> f32 {\n    let y = x * 2.0\n    x\n}",
"Remove the binding, use it, or rename it to `_y`.";

"W0002", "unused import",
"A name imported with `use` is never referred to.",
"use std.loss.cross_entropy",
"Remove the import.";

"W0003", "parameter not optimized",
"A model parameter is selected by no `optimize` line, so it stays at its initial value.",
"optimize model.blocks.** with adamw(lr = 1e-3)   // model.wte is left out",
"Add an `optimize` line that selects it, or, if freezing is intended, a `freeze` line that \
selects it (`freeze model.wte`).";
}
