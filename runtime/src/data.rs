//! Training data: a token sequence, split into training and validation parts, cut into
//! windows of `context + 1` tokens (inputs and next-token targets).
//!
//! - `text(path, ...)`: the file's bytes are the tokens (0..=255). `embedded:kjv` is the
//!   embedded default corpus (`runtime/data/kjv.txt`: six books of the King James Version,
//!   public domain, from Debian's `bible-kjv-text`; see `runtime/data/README.md`).
//! - `tokens(path.npy, ...)`: a one-dimensional integer `.npy` array.
//!
//! The last `val` fraction of the sequence (default 5%) is the validation part. Training
//! windows start at multiples of `context` in the training part; each epoch visits them in a
//! fresh order, a Fisher-Yates shuffle driven by the counter-based RNG under (seed, epoch),
//! so the batch of any step is a pure function of (seed, step): resuming needs no data state
//! beyond the step. Validation uses fixed, evenly spaced windows of the validation part.

use crate::RunError;
use std::path::Path;

/// The embedded default corpus.
pub const KJV: &[u8] = include_bytes!("../data/kjv.txt");

/// A random stream of the RNG reserved for data order (distinct from the graphs' streams).
const DATA_STREAM: u64 = 0xDA7A_0000_0000_0000;

pub struct Corpus {
    pub tokens: Vec<i32>,
    /// Tokens before this index are training data; the rest validation.
    pub split: usize,
    pub context: usize,
    pub batch: usize,
    /// Training window starts, in file order.
    starts: Vec<usize>,
    /// The permutation of the epoch last asked for.
    perm: std::cell::RefCell<(u64, Vec<usize>)>,
    seed: u64,
}

/// Reads the tokens of a data source (`path` relative to `base`).
pub fn load_tokens(kind: &str, path: &str, base: &Path) -> Result<Vec<i32>, RunError> {
    if kind == "text" && path == "embedded:kjv" {
        return Ok(KJV.iter().map(|&b| b as i32).collect());
    }
    if let Some(name) = path.strip_prefix("embedded:") {
        return Err(RunError(format!("no embedded corpus `{name}` (there is `embedded:kjv`)")));
    }
    let p = base.join(path);
    let bytes = std::fs::read(&p).map_err(|e| RunError(format!("cannot read data {}: {e}", p.display())))?;
    match kind {
        "text" => Ok(bytes.iter().map(|&b| b as i32).collect()),
        _ => {
            let t = crate::npy::parse(&bytes).map_err(|e| RunError(format!("{}: {e}", p.display())))?;
            if t.shape.len() != 1 || t.dtype.is_float() {
                return Err(RunError(format!(
                    "{}: token arrays must be one-dimensional integers, found {}{:?}",
                    p.display(),
                    t.dtype,
                    t.shape
                )));
            }
            t.data
                .iter()
                .map(|&x| {
                    if (0.0..2147483647.0).contains(&x) {
                        Ok(x as i32)
                    } else {
                        Err(RunError(format!("{}: token {x} is negative or too large", p.display())))
                    }
                })
                .collect()
        }
    }
}

impl Corpus {
    pub fn new(
        tokens: Vec<i32>,
        val_fraction: f64,
        context: usize,
        batch: usize,
        seed: u64,
    ) -> Result<Corpus, RunError> {
        let n = tokens.len();
        let split = ((n as f64) * (1.0 - val_fraction)).round() as usize;
        let need = context + 1;
        if split < need || n - split < need {
            return Err(RunError(format!(
                "the data has {n} tokens: too few for windows of {need} in both the training ({split}) and validation ({}) parts",
                n - split
            )));
        }
        let starts: Vec<usize> = (0..=(split - need) / context).map(|k| k * context).collect();
        Ok(Corpus { tokens, split, context, batch, starts, perm: std::cell::RefCell::new((u64::MAX, vec![])), seed })
    }

    /// Windows per epoch.
    pub fn windows(&self) -> usize {
        self.starts.len()
    }

    fn epoch_perm(&self, epoch: u64) -> std::cell::Ref<'_, (u64, Vec<usize>)> {
        if self.perm.borrow().0 != epoch {
            let mut p: Vec<usize> = (0..self.starts.len()).collect();
            for i in (1..p.len()).rev() {
                let w = compiler::rng::words(self.seed, DATA_STREAM + epoch, i as u64);
                let r = ((w[0] as u64) << 32 | w[1] as u64) % (i as u64 + 1);
                p.swap(i, r as usize);
            }
            *self.perm.borrow_mut() = (epoch, p);
        }
        self.perm.borrow()
    }

    /// The `index`-th training batch (0-based, counted over micro-batches): inputs and
    /// targets, each `batch × context` tokens, row-major.
    pub fn train_batch(&self, index: u64) -> (Vec<i32>, Vec<i32>) {
        let w = self.starts.len() as u64;
        let (mut x, mut y) =
            (Vec::with_capacity(self.batch * self.context), Vec::with_capacity(self.batch * self.context));
        for b in 0..self.batch as u64 {
            let j = index * self.batch as u64 + b;
            let start = {
                let perm = self.epoch_perm(j / w);
                self.starts[perm.1[(j % w) as usize]]
            };
            x.extend_from_slice(&self.tokens[start..start + self.context]);
            y.extend_from_slice(&self.tokens[start + 1..start + 1 + self.context]);
        }
        (x, y)
    }

    /// The `k`-th of `count` validation batches: evenly spaced windows.
    pub fn val_batch(&self, k: usize, count: usize) -> (Vec<i32>, Vec<i32>) {
        let span = self.tokens.len() - self.split - (self.context + 1);
        let total = (count * self.batch).max(1);
        let (mut x, mut y) = (vec![], vec![]);
        for b in 0..self.batch {
            let i = k * self.batch + b;
            let start = if total > 1 { self.split + span * i / (total - 1) } else { self.split };
            x.extend_from_slice(&self.tokens[start..start + self.context]);
            y.extend_from_slice(&self.tokens[start + 1..start + 1 + self.context]);
        }
        (x, y)
    }

    /// The entropy (nats per token) of the training part's unigram distribution: the loss
    /// of the best model that ignores context, the baseline a trained model must beat.
    pub fn unigram_entropy(&self) -> f64 {
        let mut counts: std::collections::BTreeMap<i32, u64> = Default::default();
        for &t in &self.tokens[..self.split] {
            *counts.entry(t).or_default() += 1;
        }
        let n = self.split as f64;
        counts.values().map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum()
    }

    /// The largest token (for checking against the model's vocabulary).
    pub fn max_token(&self) -> i32 {
        self.tokens.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_corpus_is_ascii_text_of_about_800kb() {
        assert!(KJV.len() > 700_000 && KJV.len() < 1_000_000, "{}", KJV.len());
        assert!(KJV.iter().all(|b| b.is_ascii()));
        assert!(KJV.starts_with(b"\nGenesis 1\n\nIn the beginning God created the heaven and the earth."));
    }

    #[test]
    fn batches_are_deterministic_shifted_and_cover_each_epoch_once() {
        let toks: Vec<i32> = (0..10_000).map(|i| (i % 251) as i32).collect();
        let c = Corpus::new(toks.clone(), 0.1, 16, 4, 7).unwrap();
        let (x, y) = c.train_batch(3);
        assert_eq!(x.len(), 64);
        for r in 0..4 {
            for t in 0..15 {
                assert_eq!(x[r * 16 + t + 1], y[r * 16 + t]);
            }
        }
        assert_eq!(c.train_batch(3), Corpus::new(toks.clone(), 0.1, 16, 4, 7).unwrap().train_batch(3));
        assert_ne!(c.train_batch(3), Corpus::new(toks.clone(), 0.1, 16, 4, 8).unwrap().train_batch(3));
        // One epoch visits every window once, inside the training part.
        let w = c.windows();
        let mut seen = std::collections::BTreeSet::new();
        for j in 0..w as u64 {
            let perm = c.epoch_perm(j / w as u64);
            let s = c.starts[perm.1[j as usize % w]];
            assert!(s + 17 <= c.split);
            seen.insert(s);
        }
        assert_eq!(seen.len(), w);
        for k in 0..2 {
            let (vx, vy) = c.val_batch(k, 2);
            assert_eq!(vx.len(), 64);
            assert_eq!(&vx[1..16], &vy[0..15]);
        }
        assert_ne!(c.val_batch(0, 2), c.val_batch(1, 2));
        assert!(c.unigram_entropy() > 5.0 && c.unigram_entropy() <= (251f64).ln() + 1e-9);
    }

    #[test]
    fn too_little_data_is_an_error() {
        assert!(Corpus::new(vec![1; 20], 0.1, 16, 4, 0).is_err());
    }
}
