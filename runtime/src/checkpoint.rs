//! Checkpoints in the safetensors format (<https://github.com/huggingface/safetensors>):
//! an 8-byte little-endian header length, a JSON header mapping each tensor's name to its
//! `dtype`, `shape` and `data_offsets`, then the tensors' bytes (little-endian, C order).
//! The header's `__metadata__` (string to string) carries the step, the seed, the recipe's
//! name and a 64-bit FNV-1a checksum of the data section, so a flipped bit is detected.
//!
//! Writing is atomic: the bytes go to `NAME.tmp` beside the file, are flushed to disk
//! (`fsync`), and the file is renamed over the old one (then the directory is synced), so a
//! crash at any point leaves either the previous checkpoint or the new one, never a mix.

use crate::{Buffer, RunError};
use lang::types::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Tensors by name (sorted: the file's bytes depend only on the contents) and metadata.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub tensors: BTreeMap<String, Buffer>,
    pub metadata: BTreeMap<String, String>,
}

fn st_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::I32 => "I32",
        Dtype::I64 => "I64",
        Dtype::Bool => "BOOL",
    }
}

fn from_st_dtype(s: &str) -> Option<Dtype> {
    Some(match s {
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I32" => Dtype::I32,
        "I64" => Dtype::I64,
        "BOOL" => Dtype::Bool,
        _ => return None,
    })
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Checkpoint {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut data: Vec<u8> = vec![];
        let mut header = serde_json::Map::new();
        for (name, b) in &self.tensors {
            let start = data.len();
            data.extend_from_slice(b.as_bytes());
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": st_dtype(b.dtype), "shape": b.shape, "data_offsets": [start, data.len()] }),
            );
        }
        let mut meta: serde_json::Map<String, serde_json::Value> =
            self.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        meta.insert("checksum".into(), serde_json::Value::String(format!("{:016x}", fnv1a(&data))));
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        // Pad the header with spaces so the data starts 8-byte aligned (as the format allows).
        while (8 + h.len()) % 8 != 0 {
            h.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + h.len() + data.len());
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        out
    }

    /// Parses and validates a file's bytes: every failure is a message, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < 8 {
            return Err(format!("the file is {} bytes long, shorter than a safetensors header", bytes.len()));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        if n > bytes.len() - 8 || n > 100 << 20 {
            return Err(format!("the header claims {n} bytes but the file has {} (truncated?)", bytes.len() - 8));
        }
        let header: serde_json::Value =
            serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| format!("the header is not valid JSON: {e}"))?;
        let obj = header.as_object().ok_or("the header is not a JSON object")?;
        let data = &bytes[8 + n..];
        let mut ck = Checkpoint::default();
        if let Some(m) = obj.get("__metadata__") {
            let m = m.as_object().ok_or("`__metadata__` is not an object")?;
            for (k, v) in m {
                ck.metadata.insert(k.clone(), v.as_str().ok_or(format!("metadata `{k}` is not a string"))?.to_string());
            }
        }
        let mut end_max = 0usize;
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| format!("tensor `{name}`: {what}");
            let dtype = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .and_then(from_st_dtype)
                .ok_or_else(|| bad("unknown or missing dtype"))?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("missing shape"))?
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("bad shape"))?;
            let offs: Vec<usize> = v
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("missing data_offsets"))?
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("bad data_offsets"))?;
            let [a, b] = offs[..] else { return Err(bad("data_offsets must have two entries")) };
            let numel =
                shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).ok_or_else(|| bad("shape overflows"))?;
            let want = numel * compiler::plan::dtype_bytes(dtype);
            if a > b || b > data.len() {
                return Err(bad(&format!(
                    "data {a}..{b} lies outside the file's {} data bytes (truncated?)",
                    data.len()
                )));
            }
            if b - a != want {
                return Err(bad(&format!("{} bytes for {} {shape:?} ({want} expected)", b - a, st_dtype(dtype))));
            }
            end_max = end_max.max(b);
            ck.tensors.insert(name.clone(), Buffer::from_bytes(dtype, shape, &data[a..b]));
        }
        if end_max != data.len() {
            return Err(format!("{} bytes after the last tensor (damaged?)", data.len() - end_max));
        }
        if let Some(c) = ck.metadata.get("checksum") {
            let actual = format!("{:016x}", fnv1a(data));
            if *c != actual {
                return Err(format!("checksum mismatch (stored {c}, computed {actual}): the file is corrupted"));
            }
        }
        Ok(ck)
    }

    /// Writes atomically (temporary file, fsync, rename, directory fsync).
    pub fn save(&self, path: &Path) -> Result<(), RunError> {
        let io = |what: &str, e: std::io::Error| RunError(format!("cannot {what} {}: {e}", path.display()));
        let tmp = path.with_extension("safetensors.tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("write", e))?;
            f.write_all(&self.to_bytes()).map_err(|e| io("write", e))?;
            f.sync_all().map_err(|e| io("sync", e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| io("rename into", e))?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Only the header's `__metadata__`, without reading the tensors' bytes.
    pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, RunError> {
        use std::io::Read;
        let fail = |e: String| RunError(format!("{}: not a valid checkpoint: {e}", path.display()));
        let mut f = std::fs::File::open(path).map_err(|e| RunError(format!("cannot read {}: {e}", path.display())))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| fail(format!("no header ({e})")))?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return Err(fail(format!("the header claims {n} bytes")));
        }
        let mut h = vec![0u8; n as usize];
        f.read_exact(&mut h).map_err(|e| fail(format!("the header is truncated ({e})")))?;
        let header: serde_json::Value =
            serde_json::from_slice(&h).map_err(|e| fail(format!("the header is not valid JSON: {e}")))?;
        let mut out = BTreeMap::new();
        if let Some(m) = header.get("__metadata__").and_then(|m| m.as_object()) {
            for (k, v) in m {
                out.insert(
                    k.clone(),
                    v.as_str().ok_or_else(|| fail(format!("metadata `{k}` is not a string")))?.to_string(),
                );
            }
        }
        Ok(out)
    }

    pub fn load(path: &Path) -> Result<Checkpoint, RunError> {
        let bytes = std::fs::read(path).map_err(|e| RunError(format!("cannot read {}: {e}", path.display())))?;
        Checkpoint::from_bytes(&bytes).map_err(|e| RunError(format!("{}: not a valid checkpoint: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut c = Checkpoint::default();
        let t = compiler::interp::Tensor::new(Dtype::F32, vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]);
        c.tensors.insert("w".into(), Buffer::from_tensor(&t));
        let i = compiler::interp::Tensor::new(Dtype::I32, vec![2], vec![5.0, -1.0]);
        c.tensors.insert("i".into(), Buffer::from_tensor(&i));
        c.metadata.insert("step".into(), "12".into());
        c
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let c = sample();
        let bytes = c.to_bytes();
        assert_eq!(bytes, sample().to_bytes());
        let back = Checkpoint::from_bytes(&bytes).unwrap();
        assert_eq!(back.metadata["step"], "12");
        assert_eq!(back.tensors["w"].as_bytes(), c.tensors["w"].as_bytes());
        assert_eq!(back.tensors["i"].shape, vec![2]);
        // The data section starts 8-byte aligned.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0);
    }

    #[test]
    fn damage_is_reported() {
        let bytes = sample().to_bytes();
        for cut in [0, 5, 8, 20, bytes.len() - 1] {
            let e = Checkpoint::from_bytes(&bytes[..cut]).unwrap_err();
            assert!(!e.is_empty());
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x10;
        assert!(Checkpoint::from_bytes(&flipped).unwrap_err().contains("checksum"));
        let mut header = bytes.clone();
        header[10] = b'#';
        assert!(Checkpoint::from_bytes(&header).is_err());
    }
}
