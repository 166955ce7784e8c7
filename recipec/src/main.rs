//! `recipec`: the command line over the recipe front end (and, later, the compiler and
//! runtime). Renders diagnostics; the crates below only return them.

mod eval;
mod loader;
mod npy;
mod render;

use clap::{Parser, Subcommand, ValueEnum};
use lang::source::{FileId, SourceDb};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "recipec", version, about = "A compiler and runtime for training recipes.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum MessageFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check recipe files: syntax, names, dtypes and shapes. Exit 1 on errors.
    Check {
        files: Vec<PathBuf>,
        /// `json`: one JSON object per diagnostic on stdout.
        #[arg(long, value_enum, default_value = "human")]
        message_format: MessageFormat,
        /// Also fail (exit 1) on warnings.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Format recipe files in place (or check that they are formatted).
    Fmt {
        files: Vec<PathBuf>,
        /// Do not write; exit 1 if a file is not formatted.
        #[arg(long)]
        check: bool,
    },
    /// Explain a diagnostic code, e.g. `recipec explain E0302`.
    Explain {
        code: Option<String>,
        /// Print every code as Markdown (the text of docs/diagnostics.md).
        #[arg(long)]
        all: bool,
    },
    /// Evaluate an item on the reference interpreter: a fn, loss, decode policy, optimizer
    /// (`--steps K`), schedule (`--steps N`) or sparsity rule. Writes `.npy` files to `--out`.
    Eval {
        file: PathBuf,
        /// An item of FILE, or a dotted stdlib path such as `std.loss.cross_entropy`.
        item: String,
        /// A tensor argument: `--arg NAME=PATH.npy`.
        #[arg(long = "arg", value_name = "NAME=PATH")]
        args: Vec<String>,
        /// A scalar or string hyperparameter: `--hp NAME=VALUE`.
        #[arg(long = "hp", value_name = "NAME=VALUE")]
        hps: Vec<String>,
        /// Also write the gradient of the (scalar) result for every float argument.
        #[arg(long)]
        grad: bool,
        /// Optimizer steps, or schedule steps to tabulate.
        #[arg(long)]
        steps: Option<usize>,
        /// Seed of the counter-based random generator.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `cranelift` (generated code, the default) or `interp` (the reference interpreter).
        #[arg(long, default_value = "cranelift")]
        backend: String,
        /// Print intermediate graphs: `graph` (as lowered), `graph-after=PASS`.
        #[arg(long, value_delimiter = ',')]
        emit: Vec<String>,
        /// Print the time each pass took.
        #[arg(long)]
        time_passes: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// List the compiler's passes in pipeline order.
    Passes,
    /// Run the language server on stdin/stdout (for editors).
    Lsp,
    /// Check a file and print intermediate forms: `--emit ast,typed` for the file;
    /// `--emit graph,graph-after=PASS,plan` for the file's recipe (its training step) or for
    /// one item with `--item NAME --shape ARG=f32[4, 7]...`.
    Build {
        file: PathBuf,
        /// Comma-separated: `ast`, `typed`, `graph`, `graph-after=PASS`, `plan`, `kernels`.
        #[arg(long, value_delimiter = ',')]
        emit: Vec<String>,
        /// The item whose graph `--emit graph` prints.
        #[arg(long)]
        item: Option<String>,
        /// The type of a tensor argument: `--shape logits=f32[4, 7]`.
        #[arg(long = "shape", value_name = "NAME=TYPE")]
        shapes: Vec<String>,
        /// A scalar hyperparameter: `--hp NAME=VALUE`.
        #[arg(long = "hp", value_name = "NAME=VALUE")]
        hps: Vec<String>,
        /// Include the gradients of a loss.
        #[arg(long)]
        grad: bool,
        /// Print the time each pass took.
        #[arg(long)]
        time_passes: bool,
        /// Write the entry point's artifact (manifest and scheduled program) to this directory.
        #[arg(short = 'o', long = "out", value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Run one pass on a graph in text form (a file, or `-` for standard input).
    Opt { pass: String, file: PathBuf },
}

fn main() -> ExitCode {
    // Printing into a closed pipe (`recipec ... | head`) ends the program quietly, as other
    // command-line tools do, instead of panicking.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, message_format, deny_warnings } => check(&files, message_format, deny_warnings),
        Command::Fmt { files, check } => fmt(&files, check),
        Command::Explain { code, all } => explain(code, all),
        Command::Build { file, emit, item, shapes, hps, grad, time_passes, out } => {
            let (graph_emit, front_emit): (Vec<String>, Vec<String>) =
                emit.into_iter().partition(|e| e.starts_with("graph") || e == "plan" || e == "kernels");
            if !graph_emit.is_empty() || out.is_some() {
                // Without `--item`, a file's recipe: its training step (loss and gradients).
                let item = match item {
                    Some(i) => i,
                    None => match recipe_name(&file) {
                        Some(r) => r,
                        None => {
                            eprintln!(
                                "error: `--emit graph`, `--emit plan` and `-o DIR` need a recipe in the file, or `--item NAME` (and `--shape ARG=TYPE` for its tensor arguments)"
                            );
                            return ExitCode::from(2);
                        }
                    },
                };
                let code = build(&file, &front_emit, false);
                if code != ExitCode::SUCCESS {
                    return code;
                }
                let steps = None;
                return eval::eval(eval::Request {
                    file,
                    item,
                    args: vec![],
                    hps,
                    grad,
                    steps,
                    seed: 0,
                    backend: "interp".into(),
                    emit: graph_emit,
                    time_passes,
                    out: PathBuf::new(),
                    shapes,
                    dry: true,
                    artifact: out,
                });
            }
            build(&file, &front_emit, true)
        }
        Command::Opt { pass, file } => opt(&pass, &file),
        Command::Lsp => match lsp::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: the language server stopped: {e}");
                ExitCode::from(1)
            }
        },
        Command::Eval { file, item, args, hps, grad, steps, seed, backend, emit, time_passes, out } => {
            eval::eval(eval::Request {
                file,
                item,
                args,
                hps,
                grad,
                steps,
                seed,
                backend,
                emit,
                time_passes,
                out,
                shapes: vec![],
                dry: false,
                artifact: None,
            })
        }
        Command::Passes => {
            for p in compiler::passes::PIPELINE {
                println!("{:<34} {:<10} -> {:<10} {}", p.name, p.needs, p.produces, p.summary);
            }
            ExitCode::SUCCESS
        }
    }
}

pub(crate) fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Reads files into a source database; unreadable files are reported and skipped.
pub(crate) fn load(files: &[PathBuf]) -> (SourceDb, Vec<FileId>, bool) {
    let mut db = SourceDb::new();
    let mut roots = vec![];
    let mut ok = true;
    for f in files {
        match std::fs::read(f) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => roots.push(db.add(f.display().to_string(), text)),
                Err(e) => {
                    eprintln!(
                        "error: {} is not UTF-8 text (invalid byte at offset {})",
                        f.display(),
                        e.utf8_error().valid_up_to()
                    );
                    ok = false;
                }
            },
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", f.display());
                ok = false;
            }
        }
    }
    (db, roots, ok)
}

fn check(files: &[PathBuf], format: MessageFormat, deny_warnings: bool) -> ExitCode {
    if files.is_empty() {
        eprintln!("error: no files given; usage: recipec check FILE...");
        return ExitCode::from(2);
    }
    let (mut db, roots, read_ok) = load(files);
    let analysis = lang::analyze(&mut db, &roots, &loader::FsLoader);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let color = color();
    let (mut errors, mut warnings) = (0, 0);
    for d in &analysis.diagnostics {
        if d.is_error() {
            errors += 1;
        } else {
            warnings += 1;
        }
        match format {
            MessageFormat::Json => {
                let _ = writeln!(out, "{}", render::json(&db, d));
            }
            MessageFormat::Human => eprint!("{}", render::render(&db, d, color)),
        }
    }
    if format == MessageFormat::Human && (errors > 0 || warnings > 0) {
        eprintln!(
            "{errors} error{}, {warnings} warning{}",
            if errors == 1 { "" } else { "s" },
            if warnings == 1 { "" } else { "s" }
        );
    }
    if errors > 0 || !read_ok || (deny_warnings && warnings > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn fmt(files: &[PathBuf], check_only: bool) -> ExitCode {
    let mut failed = false;
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", f.display());
                failed = true;
                continue;
            }
        };
        match lang::fmt::format_source(&text) {
            Ok(formatted) => {
                if formatted != text {
                    if check_only {
                        eprintln!("{} is not formatted", f.display());
                        failed = true;
                    } else if let Err(e) = write_atomically(f, &formatted) {
                        eprintln!("error: cannot write {}: {e}", f.display());
                        failed = true;
                    }
                }
            }
            Err(_) => {
                eprintln!(
                    "error: {} has syntax errors; run `recipec check {}` (the file was left unchanged)",
                    f.display(),
                    f.display()
                );
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("recipe.fmt-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn explain(code: Option<String>, all: bool) -> ExitCode {
    if all {
        print!("{}", lang::diag::diagnostics_markdown());
        return ExitCode::SUCCESS;
    }
    let Some(code) = code else {
        eprintln!("usage: recipec explain CODE (for example E0302), or --all");
        return ExitCode::from(2);
    };
    match lang::diag::code_doc(&code) {
        Some(doc) => {
            print!("{}", lang::diag::explain_text(doc));
            ExitCode::SUCCESS
        }
        None => {
            let codes: Vec<&str> = lang::diag::CODES.iter().map(|c| c.code).collect();
            let hint = lang::suggest::did_you_mean(&code.to_uppercase(), &codes).unwrap_or_default();
            eprintln!("error: unknown diagnostic code `{code}` {hint}");
            ExitCode::from(2)
        }
    }
}

/// The name of the first recipe in a file, if any.
fn recipe_name(file: &PathBuf) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let parsed = lang::parse::parse(FileId(0), &text);
    parsed.module.items.iter().find_map(|i| match &i.kind {
        lang::ast::ItemKind::Recipe(r) => Some(r.name.name.clone()),
        _ => None,
    })
}

fn opt(pass: &str, file: &PathBuf) -> ExitCode {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        if std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).is_err() {
            eprintln!("error: cannot read standard input");
            return ExitCode::from(1);
        }
        s
    } else {
        match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", file.display());
                return ExitCode::from(1);
            }
        }
    };
    let Some(p) = compiler::passes::PIPELINE.iter().find(|p| p.name == pass) else {
        eprintln!("error: no pass `{pass}`; `recipec passes` lists them");
        return ExitCode::from(2);
    };
    let mut g = match compiler::ir::parse_graph(&text) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match (p.run)(&mut g).and_then(|_| g.verify()) {
        Ok(()) => {
            print!("{g}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: pass `{pass}`: {e}");
            ExitCode::from(1)
        }
    }
}

fn build(file: &PathBuf, emit: &[String], note: bool) -> ExitCode {
    let (mut db, roots, read_ok) = load(std::slice::from_ref(file));
    if !read_ok {
        return ExitCode::from(1);
    }
    let analysis = lang::analyze(&mut db, &roots, &loader::FsLoader);
    let color = color();
    for d in &analysis.diagnostics {
        eprint!("{}", render::render(&db, d, color));
    }
    if analysis.has_errors() {
        return ExitCode::from(1);
    }
    for what in emit {
        match what.as_str() {
            "ast" => {
                let m = &analysis.modules.list[0];
                println!("{:#?}", m.ast);
            }
            "typed" => print!("{}", lang::check::typed_text(&db, &analysis, roots[0])),
            other => {
                eprintln!("error: unknown --emit kind `{other}` (available: ast, typed, graph, graph-after=PASS)");
                return ExitCode::from(2);
            }
        }
    }
    if emit.is_empty() && note {
        eprintln!(
            "checked {}; code generation arrives with the compiler (see the README's status section)",
            file.display()
        );
    }
    ExitCode::SUCCESS
}
