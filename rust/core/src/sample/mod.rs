//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded draws.

use rand::{rngs::SmallRng, Rng};

mod adjust;
mod params;

pub use adjust::{adjust_logits, mask_logits};
pub use params::SamplingParams;

/// Log-probabilities at one output position: the chosen token's, and the `k` most likely.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// `token`'s rank in the whole distribution: 1 + the tokens more likely than it (vLLM's;
    /// the top tokens' ranks are their places).
    pub rank: u32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of the model's raw logits (before penalties and temperature, as vLLM reports
/// them) for `token`, and the `k` most likely tokens.
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    }
    idx.truncate(k);
    idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let chosen = logits[token as usize];
    TokenLogprobs {
        token,
        logprob: chosen - lse,
        rank: 1 + logits.iter().filter(|&&l| l > chosen).count() as u32,
        top: idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect(),
    }
}

/// Index of the largest logit (the lowest index on ties; NaN never wins, and a row of NaN
/// gives 0).
///
/// Two passes the compiler vectorises: the largest value, sixteen lanes at a time, then the
/// first index that holds it. The loop carrying the best index from one logit to the next did
/// not vectorise, and over SmolLM2's 49,152 logits a row it took about 5% of a 32-sequence
/// decode step on the Xeon, on the engine's thread while the workers waited.
pub fn argmax(logits: &[f32]) -> u32 {
    let bigger = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = bigger(*m, v);
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &b| bigger(a, b));
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// A request's random stream: its own seed; else one derived from the engine's seed and its id;
/// else fresh entropy (so unseeded requests differ between processes, as in vLLM).
pub fn request_rng(id: u64, seed: Option<u64>, engine_seed: Option<u64>) -> SmallRng {
    use rand::SeedableRng;
    let seed = seed.unwrap_or_else(|| match engine_seed {
        // A seeded engine makes the whole run reproducible: each request draws from its own
        // stream, derived from the engine's seed and its id.
        Some(s) => s ^ id.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        // Otherwise fresh entropy: std's per-process random hash keys.
        None => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(id);
            h.finish()
        }
    });
    SmallRng::seed_from_u64(seed)
}

/// Draw the next token from (already penalised) logits: `draw(&candidates(logits, p), rng)`,
/// without sorting the whole vocabulary where its most likely tokens decide the draw.
///
/// The draw walks the candidates most likely first, and top-p, min-p and the draw itself stop
/// early: usually a few dozen tokens carry the mass. So only the `HEAD` most likely are selected
/// (linear time) and sorted, eight times more until they decide the filters' cut; with no filter,
/// the rest is sorted only if the draw walks past them. Sorting 49,152 candidates a row took
/// about a millisecond, 25-38 ms of a 32-sequence step on the engine's thread. The sums run in
/// `candidates`' and `draw`'s order, but for top-p's denominator and the unfiltered draw's mass,
/// summed before sorting: a draw differs from the full sort's only within rounding of a cut.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut SmallRng) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let mut cand = weighted(logits, p);
    let total = mass(&cand);
    // In the full sort's order, sorting only as far as needed: the most likely HEAD, then runs
    // eight times longer each, every candidate sorted once. At temperature 1 a small model's rows
    // are flat enough that the walk often passes the head, and sorting all the rest then (49,088
    // candidates) took 12% of a 32-sequence decode step on the Zen 5; the filtered draw sorted
    // its head again from the start at each step.
    let plain = p.min_p <= 0.0 && p.top_p >= 1.0;
    // The plain walk draws first (the same stream use as ever); a filtered draw once its kept
    // candidates are known.
    let mut u = if plain { rng.random::<f32>() * total } else { 0.0 };
    let (mut from, mut run) = (0, HEAD);
    loop {
        let end = (from + run).min(cand.len());
        sort_head(&mut cand[from..], end - from);
        if plain {
            if let Some(t) = walk_part(&cand[from..end], &mut u) {
                return t;
            }
            if end == cand.len() {
                return last_likely(&cand);
            }
        } else if let Some(n) = filtered(&cand[..end], end == cand.len(), p, total) {
            return draw(&cand[..n], rng);
        }
        (from, run) = (end, run * 8);
    }
}

/// Every token's weight at the temperature, relative to the largest (unnormalised), the top-k
/// most likely only where top-k is set, in no particular order.
fn weighted(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut cand: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp())).collect();
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, most_likely_first);
        cand.truncate(p.top_k);
    }
    cand
}

/// Candidates `sample` sorts first.
const HEAD: usize = 64;

/// The `head` most likely candidates first, in order (the rest after them, in any order).
fn sort_head(cand: &mut [(u32, f32)], head: usize) {
    if head < cand.len() {
        cand.select_nth_unstable_by(head - 1, most_likely_first);
    }
    cand[..head].sort_unstable_by(most_likely_first);
}

/// How many of the sorted `head` the min-p and top-p filters keep (as `candidates` applies
/// them), or None if candidates past the head could be kept; `whole` if it is every candidate.
fn filtered(head: &[(u32, f32)], whole: bool, p: &SamplingParams, total: f32) -> Option<usize> {
    let (mut kept, mut decided) = (head.len(), whole);
    if p.min_p > 0.0 {
        let floor = p.min_p * head[0].1;
        if let Some(i) = head.iter().position(|c| c.1 < floor) {
            (kept, decided) = (i, true);
        }
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        if let Some(i) = head[..kept].iter().position(|c| {
            acc += c.1 / total;
            acc >= p.top_p
        }) {
            return Some(i + 1);
        }
    }
    decided.then_some(kept)
}

/// `draw`'s walk over `cand` with `u` of its mass (most likely first).
fn walk(cand: &[(u32, f32)], mut u: f32) -> u32 {
    walk_part(cand, &mut u).unwrap_or_else(|| last_likely(cand))
}

/// The walk over a run of candidates: the token where `u` falls, or None with `u` less the
/// run's weights.
fn walk_part(cand: &[(u32, f32)], u: &mut f32) -> Option<u32> {
    for &(t, w) in cand {
        if *u < w {
            return Some(t);
        }
        *u -= w;
    }
    None
}

/// Where rounding leaves a draw past the end: the last candidate with weight.
fn last_likely(cand: &[(u32, f32)]) -> u32 {
    cand.iter().rev().find(|c| c.1 > 0.0).or(cand.last()).map_or(0, |c| c.0)
}

/// The candidates' order: most likely first, then the lower token id.
fn most_likely_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The tokens `sample` may draw (temperature, top-k, min-p, top-p applied) with unnormalised
/// weights, most likely first. Not for greedy parameters (temperature 0 is a point mass).
pub fn candidates(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let mut cand = weighted(logits, p);
    cand.sort_unstable_by(most_likely_first);
    let total = mass(&cand);
    if p.min_p > 0.0 {
        let floor = p.min_p * cand[0].1;
        cand.retain(|c| c.1 >= floor);
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = cand
            .iter()
            .position(|c| {
                acc += c.1 / total;
                acc >= p.top_p
            })
            .map_or(cand.len(), |i| i + 1);
        cand.truncate(keep);
    }
    cand
}

/// The sampling distribution over the whole vocabulary (probabilities summing to 1): a point
/// mass on the argmax for greedy parameters.
pub fn distribution(logits: &[f32], p: &SamplingParams) -> Vec<f32> {
    let mut probs = vec![0.0f32; logits.len()];
    if p.is_greedy() {
        probs[argmax(logits) as usize] = 1.0;
        return probs;
    }
    let cand = candidates(logits, p);
    let mass = mass(&cand);
    for (t, w) in cand {
        probs[t as usize] = w / mass;
    }
    probs
}

/// One draw from unnormalised weights.
pub fn draw(cand: &[(u32, f32)], rng: &mut SmallRng) -> u32 {
    walk(cand, rng.random::<f32>() * mass(cand))
}

/// The candidates' total weight, summed in f64: in f32 the order of 49,152 terms moved the sum
/// by up to a few parts in a thousand, and `sample` sums before sorting where `candidates` sums
/// after.
fn mass(cand: &[(u32, f32)]) -> f32 {
    cand.iter().map(|c| c.1 as f64).sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The vectorised argmax against the plain scan, with ties, NaN, infinities and every tail
    /// length.
    #[test]
    fn argmax_is_the_first_largest() {
        let plain = |l: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &v) in l.iter().enumerate() {
                if !v.is_nan() && best.is_none_or(|b| v > l[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut seed = 5u64;
        for len in [1, 2, 15, 16, 17, 33, 100, 49_152] {
            for case in 0..6 {
                let mut l: Vec<f32> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 40) % 64) as f32 - 32.0
                    })
                    .collect();
                match case {
                    1 => l[len / 2] = f32::NAN,
                    2 => l[0] = f32::NAN,
                    3 => l[len - 1] = f32::INFINITY,
                    4 => l.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    5 => l.iter_mut().for_each(|v| *v = f32::NAN),
                    _ => {}
                }
                assert_eq!(argmax(&l), plain(&l), "len {len}, case {case}");
            }
        }
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
    }

    /// `sample` against `draw(&candidates(..))`, the full sort it stands for, with the same
    /// random stream: peaked and flat rows of a 49,152-token vocabulary (so the head grows where
    /// the mass is spread), each filter alone and together, ties included.
    #[test]
    fn sample_draws_what_the_full_sort_draws() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32
        };
        let params = [
            SamplingParams { temperature: 1.0, ..Default::default() },
            SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() },
            SamplingParams { temperature: 1.3, top_p: 0.999, ..Default::default() },
            SamplingParams { temperature: 0.8, min_p: 0.05, ..Default::default() },
            SamplingParams { temperature: 1.0, min_p: 0.001, top_p: 0.95, ..Default::default() },
            SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.8, ..Default::default() },
            SamplingParams { temperature: 0.6, top_k: 500, ..Default::default() },
        ];
        let (mut same, mut all) = (0, 0);
        for spread in [2.0f32, 8.0, 30.0] {
            let logits: Vec<f32> = (0..49_152).map(|_| (next() * spread).floor() * 0.5).collect();
            for p in &params {
                for s in 0..20u64 {
                    let want = draw(&candidates(&logits, p), &mut SmallRng::seed_from_u64(s));
                    same += usize::from(sample(&logits, p, &mut SmallRng::seed_from_u64(s)) == want);
                    all += 1;
                }
            }
        }
        assert!(same == all, "{same} of {all} draws agree");
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [1.0, 3.0, 2.0, 3.0];
        assert_eq!(argmax(&logits), 1);
        let mut rng = SmallRng::seed_from_u64(0);
        let top1 = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        assert!((0..50).all(|_| sample(&logits, &top1, &mut rng) == 1 || sample(&logits, &top1, &mut rng) == 3));
        // top_p small keeps only the most likely token(s).
        let tp = SamplingParams { temperature: 1.0, top_p: 0.01, ..Default::default() };
        assert!((0..50).all(|_| sample(&logits, &tp, &mut rng) == 1));
        // min_p 0.5 drops tokens under half the top probability (ids 0 and 2).
        let mp = SamplingParams { temperature: 1.0, min_p: 0.5, ..Default::default() };
        assert!((0..200).all(|_| [1, 3].contains(&sample(&logits, &mp, &mut rng))));
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()]; // probabilities 1/8, 2/8, 5/8
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let mut rng = SmallRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        let n = 40_000;
        for _ in 0..n {
            counts[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        for (c, e) in counts.iter().zip([0.125, 0.25, 0.625]) {
            assert!((*c as f64 / n as f64 - e).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let l = [1.0f32, 3.0, 2.0];
        let lp = logprobs(&l, 2, 2);
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((lp.rank, logprobs(&l, 1, 0).rank, logprobs(&l, 0, 0).rank), (2, 1, 3));
        assert!((lp.top.iter().map(|t| t.1.exp()).sum::<f32>() - (3f32.exp() + 2f32.exp()) / z).abs() < 1e-6);
    }

    #[test]
    fn penalties() {
        let mut l = vec![2.0, -2.0, 1.0];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        adjust_logits(&mut l, &p, &[0], &[1, 1]);
        assert_eq!(l, vec![1.0, -4.0 - 0.5 - 0.5, 1.0]);
        assert!(SamplingParams { top_p: 1.5, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn a_logit_bias_comes_before_the_penalties() {
        // Token 0's bias takes it from 2 to -1 before the repetition penalty sees it, so the
        // penalty multiplies (a negative logit) instead of dividing.
        let mut l = vec![2.0, -2.0, 1.0];
        let p =
            SamplingParams { repetition_penalty: 2.0, logit_bias: vec![(0, -3.0), (2, 100.0)], ..Default::default() };
        adjust_logits(&mut l, &p, &[0], &[]);
        assert_eq!(l, vec![-2.0, -2.0, 101.0]);
    }

    #[test]
    fn a_bad_words_next_token_is_banned_where_the_output_ends_with_its_start() {
        // Words [2] (one token: always banned), [0, 3] and [1, 0, 4] (banned after 0, and after
        // 1 0). The prompt does not count: vLLM's words are about the generated text.
        let p = SamplingParams { bad_words: vec![vec![2], vec![0, 3], vec![1, 0, 4]], ..Default::default() };
        let banned = |output: &[u32]| {
            let mut l = vec![1.0; 6];
            adjust_logits(&mut l, &p, &[0], output);
            (0..6).filter(|&t| l[t] == f32::NEG_INFINITY).collect::<Vec<_>>()
        };
        assert_eq!(banned(&[]), [2]);
        assert_eq!(banned(&[5, 0]), [2, 3]);
        assert_eq!(banned(&[1, 0]), [2, 3, 4]);
        assert_eq!(banned(&[0, 5]), [2]);
        assert!(p.adjusts_logits() && p.reads_output() && !p.has_penalties());
    }

    #[test]
    fn a_token_mask_keeps_only_its_bits() {
        // 70 logits; the mask's second word allows all 32, the third is missing (nothing).
        let mut l: Vec<f32> = (0..70).map(|i| i as f32).collect();
        mask_logits(&mut l, &[0b101, u32::MAX]);
        let kept: Vec<usize> = (0..70).filter(|&t| l[t].is_finite()).collect();
        assert_eq!(kept, [0, 2].into_iter().chain(32..64).collect::<Vec<_>>());
        assert_eq!(l[2], 2.0);
    }

    #[test]
    fn only_allowed_tokens_keep_their_logits() {
        let mut l = vec![2.0, -2.0, 1.0, 0.5, 3.0];
        let p =
            SamplingParams { allowed_token_ids: Some(vec![1, 3]), logit_bias: vec![(3, 1.0)], ..Default::default() };
        adjust_logits(&mut l, &p, &[], &[]);
        let inf = f32::NEG_INFINITY;
        assert_eq!(l, vec![inf, -2.0, inf, 1.5, inf]);
        assert_eq!(sample(&l, &SamplingParams::greedy(), &mut request_rng(1, None, None)), 3);
    }
}
