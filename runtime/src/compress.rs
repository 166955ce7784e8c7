//! Search-based non-uniform quantization (EvoPress: Sieberling, Kuznedelev, Kurtic, Alistarh,
//! "EvoPress: Accurate Dynamic Model Compression via Evolutionary Search", ICML 2025,
//! arXiv:2410.14649; search as in `IST-DASLab/EvoPress`).
//!
//! Each *unit* (a weight matrix) gets one *level* (a bit width) from a database of
//! compressed versions of it; the search looks for the assignment with the best fitness at a
//! fixed total size. It is a (1 + λ) evolutionary algorithm:
//! - **Level-switch mutation**: one unit goes up a level and another unit of the same size
//!   goes down one, so the total bits never change (the levels must be equally spaced).
//! - **Multi-step selection**: the parent and its λ offspring are scored on a few
//!   calibration batches, the best few survive to be scored on more, and so on; the last
//!   stage keeps one, the next parent. The parent competes, so the fitness never gets worse.
//!
//! The database here is round-to-nearest group quantization ([`quantize_groups`], the
//! stdlib's `quantize_groups`), not GPTQ, or magnitude pruning to a sparsity
//! ([`prune_magnitude`]), not SparseGPT; the fitness is the caller's (in `recipec compress`,
//! the recipe's loss on training batches).

use crate::RunError;
use std::collections::HashMap;

/// Symmetric abs-max quantization to `bits` bits in groups of `group` consecutive elements
/// along the last axis (of length `last`), dequantized: the stdlib's `quantize_groups`,
/// computed the same way in f32 (`round` is round-half-to-even).
pub fn quantize_groups(w: &[f32], last: usize, bits: u32, group: usize) -> Result<Vec<f32>, RunError> {
    if group == 0 || last % group != 0 || w.len() % last.max(1) != 0 {
        return Err(RunError(format!("a group of {group} does not divide the last axis ({last})")));
    }
    if !(2..=16).contains(&bits) {
        return Err(RunError(format!("{bits} bits: quantization takes 2 to 16 bits")));
    }
    let top = ((1i64 << (bits - 1)) - 1) as f32;
    let mut out = Vec::with_capacity(w.len());
    for g in w.chunks(group) {
        let scale = g.iter().fold(0.0f32, |m, x| m.max(x.abs())) / top;
        let safe = if scale > 0.0 { scale } else { 1.0 };
        out.extend(g.iter().map(|x| (x / safe).round_ties_even().min(top).max(-top - 1.0) * scale));
    }
    Ok(out)
}

/// How the consecutive weights of a row are grouped under one scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Granularity {
    /// Groups of this many weights.
    Fixed(usize),
    /// FineQuant's adaptive granularity, per matrix and bit width ([`adaptive_group`]).
    Adaptive { min: usize, tolerance: f64 },
}

/// FineQuant's adaptive choice of granularity (Kim, Henry, Fahim, Awadalla,
/// arXiv:2308.09723, Sec. 3), as reconstructed here — the paper publishes the idea, not the
/// criterion (UNVERIFIED): start with one group per row (`last` weights) and halve the group
/// while its quantization error is more than `1 + tolerance` times the error of the finest
/// group allowed, the smallest halving of `last` not below `min`. The error is
/// ‖w − q_G(w)‖₂ over the whole matrix, with q_G = [`quantize_groups`]; a row whose scale an
/// outlier inflates keeps halving until the outlier has a group of its own. Returns the
/// group and the quantized weights.
pub fn adaptive_group(
    w: &[f32],
    last: usize,
    bits: u32,
    min: usize,
    tolerance: f64,
) -> Result<(usize, Vec<f32>), RunError> {
    if !(tolerance >= 0.0) {
        return Err(RunError(format!("tolerance {tolerance}: it must be at least 0")));
    }
    let mut candidates = vec![last];
    while let Some(&g) = candidates.last() {
        if g % 2 != 0 || g / 2 < min.max(1) {
            break;
        }
        candidates.push(g / 2);
    }
    let error = |q: &[f32]| w.iter().zip(q).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
    let finest = *candidates.last().unwrap_or(&last);
    let fine = quantize_groups(w, last, bits, finest)?;
    let bound = (1.0 + tolerance) * error(&fine);
    for &g in &candidates[..candidates.len() - 1] {
        let q = quantize_groups(w, last, bits, g)?;
        if error(&q) <= bound {
            return Ok((g, q));
        }
    }
    Ok((finest, fine))
}

/// Unstructured magnitude pruning to an exact sparsity: the round(s·n) weights of smallest
/// magnitude (ties: the lower index first) set to zero, the rest kept as they are.
pub fn prune_magnitude(w: &[f32], sparsity: f64) -> Result<Vec<f32>, RunError> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(RunError(format!("sparsity {sparsity}: pruning takes a sparsity in [0, 1)")));
    }
    let k = ((sparsity * w.len() as f64).round() as usize).min(w.len());
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
    let mut out = w.to_vec();
    for &i in &order[..k] {
        out[i] = 0.0;
    }
    Ok(out)
}

/// One compressible tensor: its name and number of elements (mutations pair equal sizes).
#[derive(Clone, Debug)]
pub struct Unit {
    pub path: String,
    pub numel: usize,
}

/// One selection stage: keep the best `survivors` by their loss on the first `batches`
/// calibration batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stage {
    pub survivors: usize,
    pub batches: usize,
}

/// Parses `"4:1,1:4"` (survivors:batches per stage). The last stage keeps one candidate;
/// survivors shrink and batches grow from stage to stage.
pub fn parse_stages(text: &str) -> Result<Vec<Stage>, String> {
    let mut stages = vec![];
    for part in text.split(',') {
        let (s, b) = part.trim().split_once(':').ok_or_else(|| format!("`{part}` is not SURVIVORS:BATCHES"))?;
        let survivors: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a count"))?;
        let batches: usize = b.trim().parse().map_err(|_| format!("`{b}` is not a count"))?;
        if survivors == 0 || batches == 0 {
            return Err(format!("`{part}`: survivors and batches are at least 1"));
        }
        stages.push(Stage { survivors, batches });
    }
    if stages.last().map(|s| s.survivors) != Some(1) {
        return Err("the last stage keeps one candidate (`…,1:B`)".into());
    }
    if stages.windows(2).any(|w| w[1].survivors > w[0].survivors || w[1].batches < w[0].batches) {
        return Err("survivors never grow and batches never shrink from one stage to the next".into());
    }
    Ok(stages)
}

/// How the search runs.
#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub generations: usize,
    /// λ: offspring per generation.
    pub offspring: usize,
    pub stages: Vec<Stage>,
    /// Each offspring applies 1 to `max_mutations` level switches (uniformly drawn).
    pub max_mutations: usize,
    pub seed: u64,
}

/// What [`search`] found.
#[derive(Clone, Debug)]
pub struct Searched {
    /// The level (an index into the levels) of each unit.
    pub levels: Vec<usize>,
    /// The start's and the result's loss on the last stage's batches.
    pub initial: f64,
    pub fitness: f64,
    /// The parent's loss on the last stage's batches after each generation.
    pub history: Vec<f64>,
    /// Distinct (assignment, batch) losses computed.
    pub evaluations: usize,
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One level switch: a unit below the top level goes up one and another unit of the same
/// size above the bottom level goes down one. False (nothing changed) when no such pair
/// exists.
fn level_switch(levels: &mut [usize], units: &[Unit], count: usize, rng: &mut Rng) -> bool {
    let up: Vec<usize> = (0..units.len())
        .filter(|&i| levels[i] + 1 < count)
        .filter(|&i| (0..units.len()).any(|j| j != i && units[j].numel == units[i].numel && levels[j] > 0))
        .collect();
    if up.is_empty() {
        return false;
    }
    let i = up[rng.below(up.len())];
    let down: Vec<usize> =
        (0..units.len()).filter(|&j| j != i && units[j].numel == units[i].numel && levels[j] > 0).collect();
    let j = down[rng.below(down.len())];
    levels[i] += 1;
    levels[j] -= 1;
    true
}

/// Total size in level steps: Σ numel · level. Level switches keep it.
pub fn budget(levels: &[usize], units: &[Unit]) -> usize {
    levels.iter().zip(units).map(|(l, u)| l * u.numel).sum()
}

/// The (1 + λ) search from `start` over `count` levels. `loss(levels, batch)` is one
/// calibration batch's loss for an assignment; it is called at most once per (assignment,
/// batch), and a candidate's fitness on a stage is its mean over the stage's first batches.
pub fn search(
    units: &[Unit],
    start: Vec<usize>,
    count: usize,
    opts: &SearchOptions,
    loss: &mut dyn FnMut(&[usize], usize) -> Result<f64, RunError>,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Searched, RunError> {
    assert_eq!(units.len(), start.len());
    let last = opts.stages.last().map(|s| s.batches).unwrap_or(1);
    let mut cache: HashMap<(Vec<usize>, usize), f64> = HashMap::new();
    let mut fitness = |levels: &[usize], batches: usize| -> Result<f64, RunError> {
        let mut total = 0.0;
        for b in 0..batches {
            let key = (levels.to_vec(), b);
            let l = match cache.get(&key) {
                Some(l) => *l,
                None => {
                    let l = loss(levels, b)?;
                    cache.insert(key, l);
                    l
                }
            };
            total += l;
        }
        Ok(total / batches as f64)
    };
    let initial = fitness(&start, last)?;
    let mut parent = start;
    let mut history = vec![];
    let mut rng = Rng(opts.seed ^ 0x45_766f_5072_6573); // "EvoPres"
    for generation in 0..opts.generations {
        let mut candidates = vec![parent.clone()];
        for _ in 0..opts.offspring {
            let mut child = parent.clone();
            let k = 1 + rng.below(opts.max_mutations.max(1));
            let mut changed = false;
            for _ in 0..k {
                changed |= level_switch(&mut child, units, count, &mut rng);
            }
            if changed && !candidates.contains(&child) {
                candidates.push(child);
            }
        }
        for stage in &opts.stages {
            let mut scored = candidates
                .into_iter()
                .map(|c| fitness(&c, stage.batches).map(|f| (f, c)))
                .collect::<Result<Vec<_>, _>>()?;
            // Stable: on a tie the earlier candidate (the parent first) wins.
            scored.sort_by(|a, b| a.0.total_cmp(&b.0));
            candidates = scored.into_iter().take(stage.survivors).map(|(_, c)| c).collect();
        }
        parent = candidates.swap_remove(0);
        let f = fitness(&parent, last)?;
        history.push(f);
        progress(generation + 1, f);
    }
    let fitness_now = fitness(&parent, last)?;
    Ok(Searched { levels: parent, initial, fitness: fitness_now, history, evaluations: cache.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(sizes: &[usize]) -> Vec<Unit> {
        sizes.iter().enumerate().map(|(i, &n)| Unit { path: format!("u{i}"), numel: n }).collect()
    }

    #[test]
    fn level_switches_keep_the_budget_and_the_bounds() {
        let us = units(&[16, 16, 64, 16, 64, 8]);
        let mut levels = vec![2; us.len()];
        let total = budget(&levels, &us);
        let mut rng = Rng(7);
        let mut moved = 0;
        for _ in 0..10_000 {
            moved += level_switch(&mut levels, &us, 5, &mut rng) as usize;
            assert_eq!(budget(&levels, &us), total);
            assert!(levels.iter().all(|&l| l < 5));
            // The unit without a partner of its size never moves.
            assert_eq!(levels[5], 2);
        }
        assert!(moved > 9_000, "{moved}");
    }

    #[test]
    fn no_partner_no_switch() {
        let us = units(&[16, 32]);
        let mut levels = vec![1, 1];
        assert!(!level_switch(&mut levels, &us, 3, &mut Rng(1)));
        assert_eq!(levels, vec![1, 1]);
    }

    /// A separable loss with a known optimum at the budget: unit i's loss falls as
    /// weight_i · 2^(−level); the best assignment gives the heavy units the high levels.
    #[test]
    fn search_finds_the_optimum_of_a_separable_loss() {
        let us = units(&[10; 6]);
        let weights = [1.0, 50.0, 2.0, 30.0, 1.5, 4.0];
        let f = |levels: &[usize]| -> f64 { levels.iter().zip(weights).map(|(&l, w)| w * 0.5f64.powi(l as i32)).sum() };
        let mut loss = |levels: &[usize], _b: usize| Ok(f(levels));
        let opts = SearchOptions {
            generations: 200,
            offspring: 8,
            stages: vec![Stage { survivors: 2, batches: 1 }, Stage { survivors: 1, batches: 2 }],
            max_mutations: 2,
            seed: 3,
        };
        let mut seen = vec![];
        let r = search(&us, vec![2; 6], 5, &opts, &mut loss, &mut |_, f| seen.push(f)).unwrap();
        assert_eq!(budget(&r.levels, &us), budget(&[2; 6], &us));
        // Brute force over every assignment with the same budget.
        let mut best = f64::INFINITY;
        for code in 0..5usize.pow(6) {
            let l: Vec<usize> = (0..6).map(|i| code / 5usize.pow(i) % 5).collect();
            if l.iter().sum::<usize>() == 12 {
                best = best.min(f(&l));
            }
        }
        assert!((r.fitness - best).abs() < 1e-12, "found {} ({:?}), best {best}", r.fitness, r.levels);
        assert!(r.fitness < r.initial);
        // Elitist: the parent's fitness never rises.
        assert!(seen.windows(2).all(|w| w[1] <= w[0]), "{seen:?}");
    }

    #[test]
    fn stages_parse_and_reject() {
        assert_eq!(
            parse_stages("4:1, 1:4").unwrap(),
            vec![Stage { survivors: 4, batches: 1 }, Stage { survivors: 1, batches: 4 }]
        );
        assert!(parse_stages("4:1").is_err());
        assert!(parse_stages("2:4,1:1").is_err());
        assert!(parse_stages("0:1,1:2").is_err());
        assert!(parse_stages("x").is_err());
    }

    #[test]
    fn pruning_zeroes_exactly_the_smallest_magnitudes() {
        let w: Vec<f32> = (0..100).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for s in [0.0, 0.1, 0.25, 0.5, 0.9] {
            let p = prune_magnitude(&w, s).unwrap();
            let zeros = p.iter().filter(|x| **x == 0.0).count();
            // w holds one exact zero (at 50/7·7 = 50 → i·37 % 101 = 50), already pruned first.
            assert_eq!(zeros, ((s * 100.0) as usize).max(1), "{s}");
            let cut = w.iter().zip(&p).filter(|(_, q)| **q == 0.0).map(|(a, _)| a.abs()).fold(0.0f32, f32::max);
            let kept = w.iter().zip(&p).filter(|(_, q)| **q != 0.0).map(|(a, _)| a.abs()).fold(f32::INFINITY, f32::min);
            assert!(cut <= kept, "{s}: pruned {cut} > kept {kept}");
            assert!(w.iter().zip(&p).all(|(a, q)| *q == 0.0 || q == a));
        }
        // Ties go to the lower index.
        assert_eq!(prune_magnitude(&[1.0, -1.0, 1.0, 2.0], 0.5).unwrap(), vec![0.0, 0.0, 1.0, 2.0]);
        assert!(prune_magnitude(&[1.0], 1.0).is_err());
    }

    #[test]
    fn quantization_matches_the_rule() {
        // 4 bits: top 7; group [0.5, -1.4, 0.1, 0.7]: scale 0.2.
        let q = quantize_groups(&[0.5, -1.4, 0.1, 0.7], 4, 4, 4).unwrap();
        let s = 1.4f32 / 7.0;
        let want: Vec<f32> = [0.5f32, -1.4, 0.1, 0.7].iter().map(|x| (x / s).round_ties_even() * s).collect();
        assert_eq!(q, want);
        assert_eq!(quantize_groups(&[0.0; 4], 4, 3, 2).unwrap(), vec![0.0; 4]);
        assert!(quantize_groups(&[0.0; 6], 6, 4, 4).is_err());
        assert!(quantize_groups(&[0.0; 4], 4, 1, 4).is_err());
    }

    #[test]
    fn adaptive_groups_halve_until_an_outlier_has_its_own() {
        // Two rows of 32 weights of ±1, but one weight of the second row is 100: per row, its
        // scale rounds every other weight of the row to 0 at 4 bits.
        let mut w: Vec<f32> = (0..64).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        w[40] = 100.0;
        let (g, q) = adaptive_group(&w, 32, 4, 4, 0.1).unwrap();
        assert_eq!(g, 4);
        assert_eq!(q, quantize_groups(&w, 32, 4, 4).unwrap());
        // Without the outlier every group size is exact: one group per row.
        w[40] = 1.0;
        let (g, q) = adaptive_group(&w, 32, 4, 4, 0.1).unwrap();
        assert_eq!((g, q), (32, w.clone()));
        // A tolerance of 100x the finest error lets the outlier's row stay whole.
        w[40] = 100.0;
        assert_eq!(adaptive_group(&w, 32, 4, 4, 1e9).unwrap().0, 32);
        // Gaussian-like weights: coarser groups cost a little, within a loose tolerance.
        let mut x = 0x9E3779B97F4A7C15u64;
        let smooth: Vec<f32> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
            })
            .collect();
        let (g_loose, _) = adaptive_group(&smooth, 256, 4, 16, 0.5).unwrap();
        let (g_tight, _) = adaptive_group(&smooth, 256, 4, 16, 0.0).unwrap();
        assert!(g_loose > g_tight, "{g_loose} vs {g_tight}");
        // The group never goes below `min`, nor stops at an odd size.
        assert_eq!(adaptive_group(&w, 32, 4, 64, 0.0).unwrap().0, 32);
        assert_eq!(adaptive_group(&w[..48], 24, 4, 1, 0.0).unwrap().0, 3);
        assert!(adaptive_group(&w, 32, 4, 4, f64::NAN).is_err());
    }
}
