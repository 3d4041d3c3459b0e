//! Past-Future admission (LightLLM's `FuturePastReqQueue`, with its known flaws fixed): admit a
//! waiting request only if the batch's predicted peak KV use, with the request added, stays under
//! the pool minus a reserve. Lengths come from the history of finished requests (the *past*), or,
//! for the oracle, from the simulator's true lengths. The past is `history`, the future (the peak
//! of a batch, and its fast forecast) is `peak`; both are below, in this one file.

use std::sync::Arc;

use rand::{rngs::SmallRng, SeedableRng};

use self::history::{HistoryStart, LengthHistory};
use self::peak::{Forecast, Load};
use super::scheduler::{AdmissionPolicy, PoolView, SeqLoad};
use crate::request::{ReqId, MAX_SCENARIOS};

/// True output lengths by request id; only the simulator can provide this.
pub type TrueLengths = Arc<dyn Fn(ReqId) -> Option<usize> + Send + Sync>;

enum Lengths {
    Sampled { history: LengthHistory, rng: SmallRng },
    Oracle(TrueLengths),
}

/// How Past-Future turns its history into a forecast. The defaults are what the study in
/// docs/benchmarks.md kept; the alternatives stay selectable so the study can be rerun.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tuning {
    /// Scenarios per step; `None`: `min(16, 1 + 800 / batch)`, fewer for big batches.
    pub scenarios: Option<usize>,
    /// Which scenario's peak decides: `None`, the worst; `Some(q)`, the q-quantile of the
    /// scenarios' peaks (nearest rank), a high quantile instead of the worst.
    pub quantile: Option<f64>,
    /// Redraw every running request's length every step, as LightLLM does, instead of keeping a
    /// draw while it is still possible.
    pub redraw: bool,
    /// A request that outlived every recorded length: `false` draws uniformly up to
    /// `max_tokens`; `true` draws from an exponential tail fitted to the history's longest tenth.
    pub fitted_tail: bool,
}

pub struct PastFuture {
    lengths: Lengths,
    tuning: Tuning,
    reserve: f64,
    /// One forecast per Monte-Carlo scenario; the worst (or `tuning.quantile`'s) decides.
    scenarios: Vec<Forecast>,
}

/// Scenarios per step: fewer for big batches, where one draw already averages out (LightLLM's
/// rule, `min(5, 1 + 200 / batch)`, with four times the draws: the study in docs/benchmarks.md
/// found five too few on heavy-tailed outputs; at 1,024 running requests it is still one).
fn scenario_count(batch: usize) -> usize {
    800usize.checked_div(batch).map_or(MAX_SCENARIOS, |q| (q + 1).min(MAX_SCENARIOS))
}

impl PastFuture {
    pub fn new(history_window: usize, max_output_bound: usize, reserve: f64, seed: u64) -> Self {
        Self::with_history(history_window, max_output_bound, &HistoryStart::default(), reserve, seed)
    }

    /// Past-Future whose history starts from `start` (a prior, a saved history) instead of
    /// LightLLM's `max_output_bound` priming.
    pub fn with_history(
        history_window: usize,
        max_output_bound: usize,
        start: &HistoryStart,
        reserve: f64,
        seed: u64,
    ) -> Self {
        let prime = max_output_bound.min(u32::MAX as usize) as u32;
        let history = LengthHistory::start(history_window, prime, start);
        Self {
            lengths: Lengths::Sampled { history, rng: SmallRng::seed_from_u64(seed) },
            tuning: Tuning::default(),
            reserve,
            scenarios: Vec::new(),
        }
    }

    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    pub fn oracle(true_lengths: TrueLengths, reserve: f64) -> Self {
        Self { lengths: Lengths::Oracle(true_lengths), tuning: Tuning::default(), reserve, scenarios: Vec::new() }
    }

    /// Draw a final output length for `s`: the true one for the oracle; else from the history,
    /// unconditionally for a fresh candidate, conditioned on what it generated otherwise (a
    /// preempted request keeps that evidence; LightLLM forgets it).
    fn draw(&mut self, s: &SeqLoad, fresh: bool) -> u32 {
        let (generated, max) = (s.generated as u32, s.max_tokens.min(u32::MAX as usize) as u32);
        match &mut self.lengths {
            Lengths::Oracle(f) => f(s.id).unwrap_or(s.max_tokens).clamp(s.generated + 1, s.max_tokens.max(1)) as u32,
            Lengths::Sampled { history, rng } if fresh && generated == 0 => history.sample_unconditional(max, rng),
            Lengths::Sampled { history, rng } if self.tuning.fitted_tail => history.sample_fitted(generated, max, rng),
            Lengths::Sampled { history, rng } => history.sample_conditional(generated, max, rng),
        }
    }

    /// Scenario `k`'s load for `s`. A kept prediction stays while it is still possible: a draw
    /// from "length > d0" that turned out > d is a draw from "length > d" (same distribution),
    /// so only predictions overtaken by the generated count are re-drawn.
    fn load(&mut self, s: &mut SeqLoad, k: usize, fresh: bool) -> Load {
        if s.forecast[k] as usize <= s.generated {
            s.forecast[k] = self.draw(s, fresh);
        }
        Load { held: s.held() as u64, remaining: u64::from(s.forecast[k]) - s.generated as u64 }
    }

    fn budget(&self, pool: &PoolView) -> u64 {
        (pool.capacity_tokens() as f64 * (1.0 - self.reserve)) as u64
    }
}

impl AdmissionPolicy for PastFuture {
    fn name(&self) -> &'static str {
        match self.lengths {
            Lengths::Sampled { .. } => "past-future",
            Lengths::Oracle(_) => "oracle",
        }
    }

    fn begin_step(&mut self, running: &mut [SeqLoad], _pool: &PoolView) {
        let n = match self.lengths {
            Lengths::Oracle(_) => 1,
            Lengths::Sampled { .. } => self.tuning.scenarios.unwrap_or_else(|| scenario_count(running.len())),
        };
        if self.tuning.redraw {
            for s in running.iter_mut() {
                s.forecast = [0; MAX_SCENARIOS];
            }
        }
        let mut scenarios = std::mem::take(&mut self.scenarios);
        scenarios.resize_with(n, Forecast::default);
        let mut loads = Vec::with_capacity(running.len());
        for (k, f) in scenarios.iter_mut().enumerate() {
            loads.clear();
            for s in running.iter_mut() {
                loads.push(self.load(s, k, false));
            }
            f.reset(loads.iter().copied());
        }
        self.scenarios = scenarios;
    }

    fn admit(&mut self, c: &mut SeqLoad, _new_blocks: usize, pool: &PoolView) -> bool {
        let budget = self.budget(pool);
        let draws: Vec<Load> = (0..self.scenarios.len()).map(|k| self.load(c, k, true)).collect();
        let peaks = self.scenarios.iter_mut().zip(&draws).map(|(f, &l)| f.peak_with(l));
        let decisive = match self.tuning.quantile {
            None => peaks.max().unwrap_or(0),
            Some(q) => {
                // Nearest rank: the smallest peak at or above a fraction q of the scenarios.
                let mut peaks: Vec<u64> = peaks.collect();
                peaks.sort_unstable();
                let rank = ((q * peaks.len() as f64).ceil() as usize).clamp(1, peaks.len().max(1));
                peaks.get(rank - 1).copied().unwrap_or(0)
            }
        };
        if decisive > budget {
            return false;
        }
        for (f, l) in self.scenarios.iter_mut().zip(draws) {
            f.insert(l);
        }
        true
    }

    fn record_finished(&mut self, output_len: usize) {
        if let Lengths::Sampled { history, .. } = &mut self.lengths {
            history.record(output_len.min(u32::MAX as usize) as u32);
        }
    }

    fn predicted_peak(&self) -> Option<u64> {
        self.scenarios.iter().map(Forecast::peak).max()
    }

    fn recorded_lengths(&self) -> Option<Vec<u32>> {
        match &self.lengths {
            Lengths::Sampled { history, .. } => Some(history.recorded()),
            Lengths::Oracle(_) => None,
        }
    }
}

/// The *past*: output lengths of recently finished requests, and the conditional length
/// distribution the Past-Future scheduler samples from.
pub mod history {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use rand::Rng;

    /// Prior entries in a cold history. LightLLM primes half its window (100 of 200) with the
    /// largest output and keeps them until the window fills; the study in docs/benchmarks.md
    /// found 8, replaced first, best across workloads (cold starts within 0.86-0.92x the oracle
    /// instead of 0.75x).
    pub const DEFAULT_PRIOR_WEIGHT: usize = 8;

    /// What a history starts from, before this run has finished anything.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct HistoryStart {
        /// Lengths the history is primed with until real ones replace them; `None` primes with
        /// the largest allowed output, so a cold scheduler starts conservative.
        pub prior: Option<Arc<[u32]>>,
        /// How many prior entries the history holds at the start (spread over the prior's
        /// quantiles); every recorded length replaces one, so after `prior_weight` finishes the
        /// prior is gone. `None`: [`DEFAULT_PRIOR_WEIGHT`].
        pub prior_weight: Option<usize>,
        /// Lengths an earlier run recorded (a saved history, oldest first): they count as real
        /// and replace prior entries like new ones do.
        pub recorded: Arc<[u32]>,
    }

    /// A sliding window of output lengths, kept both in arrival order (to drop the oldest) and
    /// sorted (to sample), plus what is left of the prior. Updates cost one binary search and a
    /// memmove of at most `window` entries.
    #[derive(Debug, Clone)]
    pub struct LengthHistory {
        window: usize,
        ring: VecDeque<u32>,
        /// Prior entries not yet replaced, in the order they leave (last first).
        prior: Vec<u32>,
        /// `ring` and `prior` together, sorted.
        sorted: Vec<u32>,
    }

    /// Bit-reversed order of `0..n`: removing entries in this order keeps the rest spread over
    /// the whole range (a van der Corput sequence), so a half-replaced prior is still its shape.
    fn spread_order(n: usize) -> Vec<usize> {
        let bits = usize::BITS - n.next_power_of_two().trailing_zeros();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| i.reverse_bits() >> bits.min(usize::BITS - 1));
        order
    }

    impl LengthHistory {
        /// Primed with `DEFAULT_PRIOR_WEIGHT` copies of `prime_len`.
        pub fn new(window: usize, prime_len: u32) -> Self {
            Self::start(window, prime_len, &HistoryStart::default())
        }

        /// A history per `start`: its prior spread over `prior_weight` entries (capped at the
        /// window), then its recorded lengths, each replacing one prior entry.
        pub fn start(window: usize, prime_len: u32, start: &HistoryStart) -> Self {
            let window = window.max(1);
            let weight = start.prior_weight.unwrap_or(DEFAULT_PRIOR_WEIGHT).clamp(1, window);
            let mut prior_sorted: Vec<u32> = match &start.prior {
                Some(p) if !p.is_empty() => p.to_vec(),
                _ => vec![prime_len],
            };
            prior_sorted.sort_unstable();
            // Entry i is the prior's (i + 0.5) / weight quantile.
            let quantile = |i: usize| prior_sorted[((2 * i + 1) * prior_sorted.len()) / (2 * weight)];
            let prior: Vec<u32> = spread_order(weight).into_iter().rev().map(quantile).collect();
            let mut sorted = prior.clone();
            sorted.sort_unstable();
            let mut h = Self { window, ring: VecDeque::with_capacity(window), prior, sorted };
            let skip = start.recorded.len().saturating_sub(window);
            for &v in &start.recorded[skip..] {
                h.record(v);
            }
            h
        }

        /// Lengths in the sample set (recorded plus what is left of the prior).
        pub fn len(&self) -> usize {
            self.sorted.len()
        }
        pub fn is_empty(&self) -> bool {
            self.sorted.is_empty()
        }
        pub fn sorted(&self) -> &[u32] {
            &self.sorted
        }
        /// Recorded lengths, oldest first: what a saved history holds.
        pub fn recorded(&self) -> Vec<u32> {
            self.ring.iter().copied().collect()
        }
        /// Prior entries not yet replaced.
        pub fn prior_left(&self) -> usize {
            self.prior.len()
        }

        fn remove_sorted(&mut self, v: u32) {
            let at = self.sorted.partition_point(|&x| x < v);
            self.sorted.remove(at);
        }

        /// A finished request's output length: it replaces a prior entry while any is left,
        /// else the oldest recorded length once the window is full.
        pub fn record(&mut self, output_len: u32) {
            if let Some(p) = self.prior.pop() {
                self.remove_sorted(p);
            } else if self.ring.len() == self.window {
                let old = self.ring.pop_front().expect("window is full");
                self.remove_sorted(old);
            }
            self.ring.push_back(output_len);
            let at = self.sorted.partition_point(|&v| v < output_len);
            self.sorted.insert(at, output_len);
        }

        /// An unconditional draw: one of the recorded lengths, capped at `max_tokens`, at least 1.
        pub fn sample_unconditional<R: Rng>(&self, max_tokens: u32, rng: &mut R) -> u32 {
            let v = self.sorted[rng.random_range(0..self.sorted.len())];
            v.clamp(1, max_tokens.max(1))
        }

        /// A draw of the final output length of a request that has generated `generated` tokens and
        /// may generate at most `max_tokens`. Inverse CDF, piecewise linear over the points
        /// `[generated, recorded lengths above generated (sorted, capped)..., max_tokens]`, each gap
        /// equally likely; uniform on `[generated, max_tokens]` when nothing recorded is longer.
        /// The result is always in `generated + 1 ..= max_tokens` (at least one more token).
        pub fn sample_conditional<R: Rng>(&self, generated: u32, max_tokens: u32, rng: &mut R) -> u32 {
            if generated + 1 >= max_tokens {
                return max_tokens.max(generated + 1);
            }
            let first = self.sorted.partition_point(|&v| v <= generated);
            let above = &self.sorted[first..];
            let point = |i: usize| -> f64 {
                // Point 0 is `generated`, points 1..=above.len() the longer lengths, the last max_tokens.
                if i == 0 {
                    generated as f64
                } else if i <= above.len() {
                    above[i - 1].min(max_tokens) as f64
                } else {
                    max_tokens as f64
                }
            };
            let gaps = above.len() + 1;
            let u = rng.random::<f64>() * gaps as f64;
            let g = (u as usize).min(gaps - 1);
            let (lo, hi) = (point(g), point(g + 1));
            let v = lo + (u - g as f64) * (hi - lo);
            (v.ceil() as u32).clamp(generated + 1, max_tokens)
        }

        /// As `sample_conditional`, except past every recorded length: there, instead of uniform
        /// up to `max_tokens`, `generated` plus an exponential excess whose mean is that of the
        /// longest tenth of the history over its smallest value (the mean excess of the tail).
        pub fn sample_fitted<R: Rng>(&self, generated: u32, max_tokens: u32, rng: &mut R) -> u32 {
            let longest = self.sorted.last().copied().unwrap_or(0);
            if generated < longest || generated + 1 >= max_tokens {
                return self.sample_conditional(generated, max_tokens, rng);
            }
            let top = &self.sorted[self.sorted.len() - self.sorted.len().div_ceil(10)..];
            let floor = top[0] as f64;
            let mean_excess = (top.iter().map(|&v| v as f64 - floor).sum::<f64>() / top.len() as f64).max(1.0);
            let u: f64 = rng.random::<f64>();
            let v = generated as f64 - mean_excess * (1.0 - u).ln();
            (v.ceil().min(max_tokens as f64) as u32).clamp(generated + 1, max_tokens)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use rand::{rngs::SmallRng, SeedableRng};

        fn start(prior: &[u32], weight: usize, recorded: &[u32]) -> HistoryStart {
            HistoryStart { prior: Some(Arc::from(prior)), prior_weight: Some(weight), recorded: Arc::from(recorded) }
        }

        #[test]
        fn window_drops_oldest_and_stays_sorted() {
            let mut h = LengthHistory::start(4, 0, &start(&[100], 2, &[]));
            assert_eq!(h.sorted(), &[100, 100]);
            for v in [5, 3, 9, 7] {
                h.record(v);
            }
            assert_eq!(h.len(), 4);
            assert_eq!(h.sorted(), &[3, 5, 7, 9], "the primes were replaced first");
            h.record(1);
            assert_eq!(h.sorted(), &[1, 3, 7, 9], "then the oldest recorded length (5) leaves");
            assert_eq!(h.recorded(), vec![3, 9, 7, 1]);
        }

        #[test]
        fn a_prior_is_spread_over_its_quantiles_and_fades_evenly() {
            let prior: Vec<u32> = (1..=1000).collect();
            let mut h = LengthHistory::start(100, 0, &start(&prior, 8, &[]));
            // The (i + 0.5) / 8 quantiles of 1..=1000.
            assert_eq!(h.sorted(), &[63, 188, 313, 438, 563, 688, 813, 938]);
            assert_eq!(h.prior_left(), 8);
            for _ in 0..4 {
                h.record(500);
            }
            // Half replaced: the prior left still spans low to high.
            let left: Vec<u32> = h.sorted().iter().copied().filter(|&v| v != 500).collect();
            assert_eq!(left.len(), 4);
            assert!(left[0] < 200 && left[3] > 800, "{left:?}");
            for _ in 0..4 {
                h.record(500);
            }
            assert_eq!(h.prior_left(), 0);
            assert!(h.sorted().iter().all(|&v| v == 500));
            // The default is the largest output, DEFAULT_PRIOR_WEIGHT times.
            let cold = LengthHistory::new(1000, 4096);
            assert_eq!(cold.sorted(), &[4096; DEFAULT_PRIOR_WEIGHT]);
        }

        #[test]
        fn a_saved_history_starts_warm_and_keeps_only_the_newest_window() {
            let saved: Vec<u32> = (1..=12).collect();
            let h = LengthHistory::start(10, 4096, &start(&[4096], 8, &saved));
            assert_eq!(h.prior_left(), 0, "ten recorded lengths replaced all eight primes");
            assert_eq!(h.recorded(), (3..=12).collect::<Vec<_>>());
            let few = LengthHistory::start(10, 4096, &start(&[4096], 8, &[7, 9]));
            assert_eq!(few.sorted(), &[7, 9, 4096, 4096, 4096, 4096, 4096, 4096]);
        }

        #[test]
        fn the_fitted_tail_is_exponential_past_the_longest_length() {
            let mut h = LengthHistory::start(100, 0, &start(&[1], 1, &[]));
            for v in 1..=100 {
                h.record(v * 10); // 10 ..= 1000; the longest tenth is 910..=1000, mean excess 45
            }
            let mut rng = SmallRng::seed_from_u64(3);
            let n = 20_000;
            let xs: Vec<u32> = (0..n).map(|_| h.sample_fitted(1200, 100_000, &mut rng)).collect();
            assert!(xs.iter().all(|&x| x > 1200));
            let mean = xs.iter().map(|&x| x as f64 - 1200.0).sum::<f64>() / n as f64;
            assert!((mean - 45.5).abs() < 2.0, "mean excess {mean}");
            // Below the longest recorded length it is the conditional draw.
            assert!((0..100).all(|_| h.sample_fitted(500, 100_000, &mut rng) <= 100_000));
            assert_eq!(h.sample_fitted(1200, 1201, &mut rng), 1201);
        }

        #[test]
        fn conditional_samples_respect_bounds_and_shape() {
            let mut h = LengthHistory::new(1000, 4096);
            for _ in 0..1000 {
                h.record(100);
            }
            let mut rng = SmallRng::seed_from_u64(1);
            // Every recorded length is 100: generated 10 -> points [10, 100 x1000, 500]; 1000 of the
            // 1001 gaps are empty (100 -> 100), so almost all mass sits at exactly 100.
            let n = 20_000;
            let at_100 = (0..n).filter(|_| h.sample_conditional(10, 500, &mut rng) == 100).count();
            assert!(at_100 as f64 / n as f64 > 0.99);
            // Past every recorded length: uniform on [generated+1, max].
            let xs: Vec<u32> = (0..n).map(|_| h.sample_conditional(200, 400, &mut rng)).collect();
            assert!(xs.iter().all(|&x| (201..=400).contains(&x)));
            let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            assert!((mean - 300.0).abs() < 5.0, "uniform mean, got {mean}");
            // At the cap there is nothing left to sample.
            assert_eq!(h.sample_conditional(499, 500, &mut rng), 500);
        }

        #[test]
        fn conditional_interpolates_between_recorded_points() {
            let mut h = LengthHistory::new(2, 0);
            h.record(100);
            h.record(300);
            let mut rng = SmallRng::seed_from_u64(7);
            // Points [0, 100, 300, 1000]: three equally likely gaps.
            let n = 30_000;
            let xs: Vec<u32> = (0..n).map(|_| h.sample_conditional(0, 1000, &mut rng)).collect();
            let frac = |lo: u32, hi: u32| xs.iter().filter(|&&x| x > lo && x <= hi).count() as f64 / n as f64;
            for (lo, hi) in [(0, 100), (100, 300), (300, 1000)] {
                assert!((frac(lo, hi) - 1.0 / 3.0).abs() < 0.02, "gap {lo}-{hi}: {}", frac(lo, hi));
            }
        }
    }
}

/// The *future*: peak KV memory of a batch whose requests each hold some tokens now and will grow
/// by one token per step until they finish.
///
/// Sort the requests by remaining tokens, descending: `r_1 >= r_2 >= ... >= r_n`. Memory only drops
/// when a request finishes, so the peaks are just before each finish; just before request `k`
/// finishes, requests `1..=k` are alive and hold `held_i + r_k` each. Hence
/// `peak = max_k (P_k + k * r_k)` with `P_k = sum_{i<=k} held_i`.
///
/// [`Forecast`] keeps one batch sorted with prefix and suffix maxima so that the peak *with one more
/// request added* costs a binary search and O(1), instead of re-sorting the batch per candidate.
pub mod peak {
    /// One request's load: KV tokens it holds now, tokens it will still generate.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Load {
        pub held: u64,
        pub remaining: u64,
    }

    /// Reference implementation, O(n log n): used by tests and the admission benchmark's baseline.
    pub fn peak_of(loads: &[Load]) -> u64 {
        let mut sorted = loads.to_vec();
        sorted.sort_unstable_by_key(|l| std::cmp::Reverse(l.remaining));
        let mut prefix = 0u64;
        let mut peak = 0u64;
        for (k, l) in sorted.iter().enumerate() {
            prefix += l.held;
            peak = peak.max(prefix + (k as u64 + 1) * l.remaining);
        }
        peak
    }

    #[derive(Debug, Clone, Default)]
    pub struct Forecast {
        /// Sorted by `remaining`, descending.
        loads: Vec<Load>,
        /// `prefix_held[k] = sum of held over loads[..k]` (length n + 1).
        prefix_held: Vec<u64>,
        /// `prefix_max[k] = max over j < k of A_j`, where `A_j = P_j + j * r_j` (1-based j).
        prefix_max: Vec<u64>,
        /// `suffix_max[k] = max over j >= k of (A_j + r_j)`: what entry `j` becomes when a request is
        /// inserted ahead of it, less the inserted request's `held` (length n + 1, last is 0).
        suffix_max: Vec<u64>,
        /// Scratch for sorting.
        keys: Vec<u64>,
        scratch: Vec<u64>,
        /// `loads` changed since the maxima were built.
        dirty: bool,
    }

    /// Sort packed keys ascending. Remaining lengths below 2^16 (every realistic `max_tokens`) take
    /// two 8-bit radix passes over the high half, O(n); anything else falls back to a comparison sort.
    fn sort_keys(keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
        if keys.len() < 64 || keys.iter().any(|&k| k >> 48 != 0) {
            keys.sort_unstable();
            return;
        }
        scratch.clear();
        scratch.resize(keys.len(), 0);
        for shift in [32u32, 40] {
            let mut count = [0usize; 257];
            for &k in keys.iter() {
                count[((k >> shift) & 0xFF) as usize + 1] += 1;
            }
            for i in 0..256 {
                count[i + 1] += count[i];
            }
            for &k in keys.iter() {
                let b = ((k >> shift) & 0xFF) as usize;
                scratch[count[b]] = k;
                count[b] += 1;
            }
            std::mem::swap(keys, scratch);
        }
    }

    impl Forecast {
        /// Build from loads in any order.
        pub fn new(loads: Vec<Load>) -> Self {
            let mut f = Self::default();
            f.reset(loads);
            f
        }

        /// Replace the batch, reusing this forecast's buffers (one call per scheduler step).
        pub fn reset(&mut self, loads: impl IntoIterator<Item = Load>) {
            // Sorting packed u64 keys (remaining high, held low) is several times faster than sorting
            // structs with a comparator; this sort is most of a step's admission cost at 1k requests.
            self.keys.clear();
            let mut wide = Vec::new();
            for l in loads {
                if l.held > u32::MAX as u64 || l.remaining > u32::MAX as u64 {
                    wide.push(l);
                } else {
                    self.keys.push(l.remaining << 32 | l.held);
                }
            }
            sort_keys(&mut self.keys, &mut self.scratch);
            self.loads.clear();
            self.loads.extend(self.keys.iter().rev().map(|&k| Load { held: k & 0xFFFF_FFFF, remaining: k >> 32 }));
            if !wide.is_empty() {
                self.loads.extend(wide);
                self.loads.sort_by_key(|l| std::cmp::Reverse(l.remaining));
            }
            self.rebuild();
        }

        fn rebuild(&mut self) {
            self.dirty = false;
            let n = self.loads.len();
            self.prefix_held.resize(n + 1, 0);
            self.prefix_max.resize(n + 1, 0);
            self.suffix_max.resize(n + 1, 0);
            let (mut p, mut m) = (0u64, 0u64);
            for (j, l) in self.loads.iter().enumerate() {
                p += l.held;
                m = m.max(p + (j as u64 + 1) * l.remaining);
                self.prefix_held[j + 1] = p;
                self.prefix_max[j + 1] = m;
            }
            let mut s = 0u64;
            self.suffix_max[n] = 0;
            for j in (0..n).rev() {
                let r = self.loads[j].remaining;
                s = s.max(self.prefix_held[j + 1] + (j as u64 + 2) * r);
                self.suffix_max[j] = s;
            }
        }

        pub fn len(&self) -> usize {
            self.loads.len()
        }
        pub fn is_empty(&self) -> bool {
            self.loads.is_empty()
        }

        pub fn peak(&self) -> u64 {
            if self.dirty {
                let mut p = 0u64;
                return self.loads.iter().enumerate().fold(0, |m, (j, l)| {
                    p += l.held;
                    m.max(p + (j as u64 + 1) * l.remaining)
                });
            }
            *self.prefix_max.last().unwrap_or(&0)
        }

        /// Peak of this batch with `c` added, in O(log n) (plus an O(n) rebuild after an insert).
        pub fn peak_with(&mut self, c: Load) -> u64 {
            if self.dirty {
                self.rebuild();
            }
            // Index where c goes: after every entry with remaining >= c.remaining.
            let p = self.loads.partition_point(|l| l.remaining >= c.remaining);
            let before = self.prefix_max[p];
            let own = self.prefix_held[p] + c.held + (p as u64 + 1) * c.remaining;
            let after = if p < self.loads.len() { self.suffix_max[p] + c.held } else { 0 };
            before.max(own).max(after)
        }

        /// Add `c` to the batch, for the next candidate of the same step. The O(n) rebuild waits
        /// until a next candidate asks: most steps admit at most one request.
        pub fn insert(&mut self, c: Load) {
            let p = self.loads.partition_point(|l| l.remaining >= c.remaining);
            self.loads.insert(p, c);
            self.dirty = true;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        /// Brute force: run the batch forward step by step and record the memory after each step.
        fn simulate_peak(loads: &[Load]) -> u64 {
            let mut peak = loads.iter().map(|l| l.held).sum::<u64>();
            let horizon = loads.iter().map(|l| l.remaining).max().unwrap_or(0);
            for t in 1..=horizon {
                // After t steps a request with remaining r holds held + min(t, r) until it finishes at
                // step r, at which point its memory is released.
                let used: u64 = loads.iter().filter(|l| l.remaining >= t).map(|l| l.held + t).sum();
                peak = peak.max(used);
            }
            peak
        }

        fn load() -> impl Strategy<Value = Load> {
            (0u64..500, 1u64..300).prop_map(|(held, remaining)| Load { held, remaining })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]
            #[test]
            fn closed_form_matches_step_by_step(loads in prop::collection::vec(load(), 1..40)) {
                prop_assert_eq!(peak_of(&loads), simulate_peak(&loads));
            }

            #[test]
            fn incremental_matches_rebuild(loads in prop::collection::vec(load(), 0..200), extra in prop::collection::vec(load(), 1..8)) {
                let mut f = Forecast::new(loads.clone());
                prop_assert_eq!(f.peak(), peak_of(&loads));
                let mut all = loads;
                for c in extra {
                    let mut with = all.clone();
                    with.push(c);
                    prop_assert_eq!(f.peak_with(c), peak_of(&with));
                    prop_assert_eq!(f.peak_with(c), simulate_peak(&with));
                    f.insert(c);
                    all = with;
                    prop_assert_eq!(f.peak(), peak_of(&all));
                }
            }
        }

        #[test]
        fn worked_example() {
            // Two requests: (held 10, 5 left) and (held 20, 1 left). Just before the short one ends,
            // both are alive: 10 + 1 + 20 + 1 = 32; just before the long one ends: 10 + 5 = 15.
            let loads = [Load { held: 10, remaining: 5 }, Load { held: 20, remaining: 1 }];
            assert_eq!(peak_of(&loads), 32);
        }
    }
}
