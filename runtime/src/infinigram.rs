//! The ∞-gram language model over a token corpus (Liu, Min, Zettlemoyer, Choi, Hajishirzi,
//! "Infini-gram: Scaling Unbounded n-gram Language Models to a Trillion Tokens", COLM 2024,
//! arXiv:2401.17377), as `liujch1998/infini-gram`'s engine defines it (`find`, `infgram_ntd`):
//! for a context w₁…w_L, s* is the length of its longest suffix that occurs in the corpus, and
//! P_∞(v | w) = cnt(w_{L−s*+1..L} v) / cnt(w_{L−s*+1..L}). It backs off only when the
//! denominator would be 0, so an unseen continuation of a seen suffix has probability 0; with
//! s* = 0 it is the unigram distribution.
//!
//! Counts come from a suffix array over the token positions (prefix doubling, O(N log² N)):
//! the occurrences of a pattern are one interval of it, found by two binary searches. s* is
//! found by binary lifting and then binary search over the suffix length (counts do not grow
//! as the suffix lengthens), as the engine does.
//!
//! One deviation, so that P_∞ is a distribution: an occurrence is counted only when a token
//! follows it (the corpus's last tokens, with nothing after them, are not). The engine counts
//! that occurrence in the denominator, so its P_∞ sums to slightly less than 1 for a suffix
//! that ends the corpus. The engine samples the support above `max_support` distinct
//! continuations; here every continuation is counted exactly.

use std::collections::BTreeMap;

/// A suffix array over a token sequence.
pub struct InfiniGram {
    tokens: Vec<i32>,
    /// The suffixes' start positions in lexicographic order.
    sa: Vec<u32>,
    /// `rank[i]`: the place of the suffix starting at `i` in `sa`.
    rank: Vec<u32>,
    /// Each token's count: the distribution at s* = 0 (kept, as it spans the whole array).
    unigram: BTreeMap<i32, u64>,
}

/// The ∞-gram next-token distribution of a context.
#[derive(Clone, Debug, PartialEq)]
pub struct NextTokens {
    /// s*: the length of the longest suffix of the context that occurs (followed by a token).
    pub suffix_len: usize,
    /// How many times that suffix occurs followed by a token: the denominator.
    pub total: u64,
    /// The count of each continuation token (the numerators), by token.
    pub counts: BTreeMap<i32, u64>,
}

impl NextTokens {
    /// P_∞(v | context).
    pub fn prob(&self, v: i32) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.counts.get(&v).copied().unwrap_or(0) as f64 / self.total as f64
    }
}

impl InfiniGram {
    /// Indexes `tokens` (at most 2³² − 1 of them).
    pub fn build(tokens: &[i32]) -> InfiniGram {
        let n = tokens.len();
        assert!(n < u32::MAX as usize, "the ∞-gram index holds fewer than 2^32 tokens");
        // Prefix doubling: after the round with width k, `rank` orders the suffixes by their
        // first 2k tokens; the first round orders them by their first token.
        let mut sorted: Vec<i32> = tokens.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut rank: Vec<u32> = tokens.iter().map(|t| sorted.binary_search(t).unwrap() as u32).collect();
        let mut sa: Vec<u32> = (0..n as u32).collect();
        let mut next = vec![0u32; n];
        let mut k = 1;
        loop {
            // The key of suffix i: (rank[i], rank[i + k] + 1, or 0 past the end).
            let key = |i: u32| -> (u32, u32) {
                let j = i as usize + k;
                (rank[i as usize], if j < n { rank[j] + 1 } else { 0 })
            };
            sa.sort_unstable_by_key(|&i| key(i));
            let mut distinct = 0u32;
            for w in 0..n {
                if w > 0 && key(sa[w]) != key(sa[w - 1]) {
                    distinct += 1;
                }
                next[sa[w] as usize] = distinct;
            }
            std::mem::swap(&mut rank, &mut next);
            if n == 0 || distinct as usize == n - 1 || k >= n {
                break;
            }
            k *= 2;
        }
        let mut unigram = BTreeMap::new();
        for &t in tokens {
            *unigram.entry(t).or_insert(0) += 1;
        }
        InfiniGram { tokens: tokens.to_vec(), sa, rank, unigram }
    }

    /// The number of indexed tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The suffix starting at `i`, compared with `pattern` on its first |pattern| tokens.
    fn cmp_prefix(&self, i: u32, pattern: &[i32]) -> std::cmp::Ordering {
        let s = &self.tokens[i as usize..];
        let m = pattern.len().min(s.len());
        s[..m].cmp(&pattern[..m]).then(if s.len() < pattern.len() {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Equal
        })
    }

    /// The interval of `sa` whose suffixes start with `pattern`.
    fn interval(&self, pattern: &[i32]) -> (usize, usize) {
        let lo = self.sa.partition_point(|&i| self.cmp_prefix(i, pattern) == std::cmp::Ordering::Less);
        let hi = lo + self.sa[lo..].partition_point(|&i| self.cmp_prefix(i, pattern) == std::cmp::Ordering::Equal);
        (lo, hi)
    }

    /// The occurrences of `pattern` that a token follows.
    pub fn count(&self, pattern: &[i32]) -> u64 {
        let (lo, hi) = self.interval(pattern);
        let n = self.tokens.len();
        // At most one occurrence ends the corpus: the one starting at n − |pattern|.
        let last = n.checked_sub(pattern.len()).filter(|&i| i < n).map(|i| self.rank[i] as usize);
        (hi - lo) as u64 - last.is_some_and(|r| (lo..hi).contains(&r)) as u64
    }

    /// s* for `context`: binary lifting on the suffix length (1, 2, 4, … while the suffix
    /// occurs), then binary search between the last length that occurs and the first that
    /// does not.
    pub fn longest_suffix(&self, context: &[i32]) -> usize {
        let l = context.len();
        let occurs = |s: usize| s == 0 || self.count(&context[l - s..]) > 0;
        let (mut lo, mut hi) = (0usize, 1usize);
        while hi <= l && occurs(hi) {
            lo = hi;
            hi *= 2;
        }
        let mut hi = hi.min(l + 1);
        // occurs(lo) and, unless hi = l + 1, not occurs(hi).
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if occurs(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// P_∞(v | context) and s*, from two interval searches (no pass over the suffix's
    /// occurrences, as [`InfiniGram::next_tokens`] makes): what scoring one token needs.
    pub fn prob(&self, context: &[i32], v: i32) -> (f64, usize) {
        let s = self.longest_suffix(context);
        let mut pattern = context[context.len() - s..].to_vec();
        let total = self.count(&pattern);
        pattern.push(v);
        let (lo, hi) = self.interval(&pattern);
        (if total == 0 { 0.0 } else { (hi - lo) as f64 / total as f64 }, s)
    }

    /// P_∞(· | context): s*, the denominator and each continuation's count.
    pub fn next_tokens(&self, context: &[i32]) -> NextTokens {
        let s = self.longest_suffix(context);
        if s == 0 {
            return NextTokens { suffix_len: 0, total: self.tokens.len() as u64, counts: self.unigram.clone() };
        }
        let pattern = &context[context.len() - s..];
        let (lo, hi) = self.interval(pattern);
        let mut counts = BTreeMap::new();
        let mut total = 0;
        for &i in &self.sa[lo..hi] {
            if let Some(&v) = self.tokens.get(i as usize + s) {
                *counts.entry(v).or_insert(0) += 1;
                total += 1;
            }
        }
        NextTokens { suffix_len: s, total, counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> (Vec<i32>, BTreeMap<&str, i32>) {
        let mut ids = BTreeMap::new();
        let toks = text
            .split(' ')
            .map(|w| {
                let n = ids.len() as i32;
                *ids.entry(w).or_insert(n)
            })
            .collect();
        (toks, ids)
    }

    /// The methods note's toy corpus, word-level.
    #[test]
    fn toy_corpus() {
        let (toks, id) = words("the cat sat on the mat the cat ran");
        let g = InfiniGram::build(&toks);
        let w = |s: &str| -> Vec<i32> { s.split(' ').map(|x| id[x]).collect() };
        assert_eq!(g.count(&w("the cat")), 2);
        assert_eq!(g.count(&w("the")), 3);
        // "ran" ends the corpus: no token follows it.
        assert_eq!(g.count(&w("ran")), 0);
        assert_eq!(g.count(&w("cat ran")), 0);
        // "sat on the" occurs once, followed by "mat": s* = 3.
        let d = g.next_tokens(&w("sat on the"));
        assert_eq!((d.suffix_len, d.total), (3, 1));
        assert_eq!(d.prob(id["mat"]), 1.0);
        // "dog the cat": s* = 2 ("the cat" occurs twice: sat, ran).
        let mut ctx = w("the cat");
        ctx.insert(0, 99);
        let d = g.next_tokens(&ctx);
        assert_eq!((d.suffix_len, d.total), (2, 2));
        assert_eq!((d.prob(id["sat"]), d.prob(id["ran"]), d.prob(id["mat"])), (0.5, 0.5, 0.0));
        // An unseen last token backs off to the unigram, cnt(v)/N over all N tokens.
        let d = g.next_tokens(&[id["cat"], 99]);
        assert_eq!((d.suffix_len, d.total), (0, 9));
        assert_eq!(d.prob(id["the"]), 3.0 / 9.0);
        assert_eq!(d.prob(id["ran"]), 1.0 / 9.0);
    }

    /// Suffix-array counts and s* against brute force on random sequences over small
    /// alphabets (many repeats, long common prefixes).
    #[test]
    fn counts_match_brute_force() {
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = |m: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % m) as i32
        };
        for (n, alphabet) in [(1, 2), (2, 1), (50, 2), (200, 3), (300, 1), (500, 7)] {
            let toks: Vec<i32> = (0..n).map(|_| next(alphabet as u64)).collect();
            let g = InfiniGram::build(&toks);
            let brute = |p: &[i32]| (0..n).filter(|&i| i + p.len() < n && toks[i..i + p.len()] == *p).count() as u64;
            for _ in 0..60 {
                let len = next(6) as usize;
                let ctx: Vec<i32> = (0..len).map(|_| next(alphabet as u64 + 1)).collect();
                assert_eq!(g.count(&ctx), brute(&ctx), "{toks:?} {ctx:?}");
                let s = (0..=len).rev().find(|&s| s == 0 || brute(&ctx[len - s..]) > 0).unwrap();
                let d = g.next_tokens(&ctx);
                assert_eq!(d.suffix_len, s, "{toks:?} {ctx:?}");
                for v in 0..=alphabet as i32 {
                    assert_eq!(g.prob(&ctx, v), (d.prob(v), s), "{toks:?} {ctx:?} {v}");
                }
                assert_eq!(d.total, brute(&ctx[len - s..]));
                for v in 0..alphabet as i32 {
                    let mut p = ctx[len - s..].to_vec();
                    p.push(v);
                    let with_end = (0..n).filter(|&i| i + p.len() <= n && toks[i..i + p.len()] == *p).count() as u64;
                    assert_eq!(d.counts.get(&v).copied().unwrap_or(0), with_end, "{toks:?} {ctx:?} {v}");
                }
            }
            // The array is the sorted order of the suffixes.
            for w in g.sa.windows(2) {
                assert!(toks[w[0] as usize..] < toks[w[1] as usize..]);
            }
        }
    }
}
