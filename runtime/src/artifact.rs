//! Artifacts of `recipec build FILE -o DIR`: what the runtime needs to run an entry point
//! without the front end.
//!
//! Layout: `DIR/manifest.json` (format name and version, the recipec version, the source,
//! and per entry point its arguments, outputs, arena and peak bytes, kernel and buffer
//! counts and its program file) and `DIR/<entry>.program.json` (the scheduled
//! [`Program`]: buffers with arena offsets, kernels, loop bodies). The bytes are a function
//! of the input only (no timestamps, paths or hash-map order), so building the same recipe
//! twice gives identical directories. A directory is written next to `DIR` and renamed
//! into place, so a failed build never leaves a partial artifact. Code is generated when
//! the artifact is loaded (Cranelift JIT), so artifacts do not depend on the CPU they were
//! built on.

use crate::RunError;
use compiler::kernel::{BufKind, Program};
use std::path::Path;

pub const FORMAT: &str = "recipec-artifact";
pub const VERSION: u64 = 1;

fn io(what: &str, path: &Path, e: std::io::Error) -> RunError {
    RunError(format!("cannot {what} {}: {e}", path.display()))
}

fn entry_file(p: &Program) -> String {
    let safe: String =
        p.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    format!("{safe}.program.json")
}

/// The manifest of `programs` built from `source`.
pub fn manifest(source: &str, programs: &[Program]) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = programs
        .iter()
        .map(|p| {
            let args: Vec<serde_json::Value> = p
                .inputs
                .iter()
                .zip(&p.input_names)
                .map(|(b, name)| {
                    let d = &p.buffers[*b];
                    serde_json::json!({ "name": name, "dtype": d.dtype.to_string(), "shape": d.shape })
                })
                .collect();
            let outs: Vec<serde_json::Value> = p
                .outputs
                .iter()
                .map(|(name, b, shape)| serde_json::json!({ "name": name, "dtype": p.buffers[*b].dtype.to_string(), "shape": shape }))
                .collect();
            serde_json::json!({
                "name": p.name,
                "program": entry_file(p),
                "arguments": args,
                "outputs": outs,
                "arena_bytes": p.arena_bytes,
                "peak_bytes": p.peak_bytes,
                "argument_bytes": p.argument_bytes,
                "kernels": p.kernels.len(),
                "buffers": p.buffers.iter().filter(|b| b.kind == BufKind::Temp && b.born.is_some()).count(),
            })
        })
        .collect();
    serde_json::json!({
        "format": FORMAT,
        "version": VERSION,
        "recipec": env!("CARGO_PKG_VERSION"),
        "source": source,
        "entries": entries,
    })
}

/// Writes the artifact directory `dir` (replacing an older one only once the new one is
/// complete).
pub fn write(dir: &Path, source: &str, programs: &[Program]) -> Result<(), RunError> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "artifact".into());
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io("create", &tmp, e))?;
    let mut text = serde_json::to_string_pretty(&manifest(source, programs)).expect("a manifest serializes");
    text.push('\n');
    std::fs::write(tmp.join("manifest.json"), text).map_err(|e| io("write", &tmp, e))?;
    for p in programs {
        let mut text = serde_json::to_string(p).map_err(|e| RunError(format!("cannot serialize `{}`: {e}", p.name)))?;
        text.push('\n');
        let f = tmp.join(entry_file(p));
        std::fs::write(&f, text).map_err(|e| io("write", &f, e))?;
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| io("replace", dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| io("replace", dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| io("create", dir, e))?;
    }
    Ok(())
}

/// Reads an artifact directory: its entry points' programs, each plan verified.
pub fn load(dir: &Path) -> Result<Vec<Program>, RunError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|e| io("read", &mpath, e))?;
    let m: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| RunError(format!("{} is not a recipec manifest: {e}", mpath.display())))?;
    if m["format"] != FORMAT {
        return Err(RunError(format!("{} is not a recipec artifact manifest", mpath.display())));
    }
    if m["version"] != VERSION {
        return Err(RunError(format!(
            "{} has artifact format version {}; this recipec reads version {VERSION} (rebuild it with `recipec build -o`)",
            mpath.display(),
            m["version"]
        )));
    }
    let mut out = vec![];
    for e in m["entries"].as_array().into_iter().flatten() {
        let file = e["program"]
            .as_str()
            .ok_or_else(|| RunError(format!("{}: an entry has no program file", mpath.display())))?;
        if file.contains('/') || file.contains("..") {
            return Err(RunError(format!("{}: bad program file name `{file}`", mpath.display())));
        }
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| io("read", &path, e))?;
        let p: Program =
            serde_json::from_str(&text).map_err(|e| RunError(format!("{} is damaged: {e}", path.display())))?;
        p.verify().map_err(|e| RunError(format!("{}: invalid memory plan: {e}", path.display())))?;
        out.push(p);
    }
    Ok(out)
}
