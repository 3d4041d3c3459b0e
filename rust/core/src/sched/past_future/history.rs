//! The *past*: output lengths of recently finished requests, and the conditional length
//! distribution the Past-Future scheduler samples from.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::Rng;

/// Prior entries in a cold history. LightLLM primes half its window (100 of 200) with the
/// largest output and keeps them until the window fills; the study in docs/benchmarks.md
/// found a few entries, replaced first, best across workloads.
pub const DEFAULT_PRIOR_WEIGHT: usize = 8;

/// What a cold history samples from until real lengths replace it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Prior {
    /// Uniform over `1..=` the largest allowed output: nothing known but the bound. Censoring
    /// (running requests count as "at least this long") keeps it from admitting too much while
    /// the first requests run.
    #[default]
    Uniform,
    /// Every entry the largest allowed output (LightLLM's priming): admits as conservative does
    /// until requests finish.
    MaxTokens,
    /// Given lengths: a bundled distribution or a user's file.
    Lengths(Arc<[u32]>),
}

impl std::str::FromStr for Prior {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "max-tokens" | "max_tokens" => Ok(Self::MaxTokens),
            other => Err(format!("unknown history prior {other:?}: expected uniform, max-tokens or a list of lengths")),
        }
    }
}

impl Prior {
    /// The prior's `(i + 0.5) / weight` quantiles, `i` in `0..weight`, for outputs of at most
    /// `bound` tokens.
    fn quantiles(&self, weight: usize, bound: u32) -> Vec<u32> {
        let mid = |i: usize, n: usize| (2 * i + 1) * n / (2 * weight);
        match self {
            Self::Lengths(p) if !p.is_empty() => {
                let mut sorted = p.to_vec();
                sorted.sort_unstable();
                (0..weight).map(|i| sorted[mid(i, sorted.len())]).collect()
            }
            Self::Uniform => (0..weight).map(|i| (mid(i, bound as usize) as u32).max(1)).collect(),
            Self::MaxTokens | Self::Lengths(_) => vec![bound.max(1); weight],
        }
    }
}

/// What a history starts from, before this run has finished anything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryStart {
    pub prior: Prior,
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
    /// Lengths recorded since the start: tells a cached view of `sorted` that it is stale.
    records: u64,
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
    /// A history per `start`: its prior spread over `prior_weight` entries (capped at the
    /// window), then its recorded lengths, each replacing one prior entry.
    pub fn start(window: usize, bound: u32, start: &HistoryStart) -> Self {
        let window = window.max(1);
        let weight = start.prior_weight.unwrap_or(DEFAULT_PRIOR_WEIGHT).clamp(1, window);
        let quantiles = start.prior.quantiles(weight, bound);
        let prior: Vec<u32> = spread_order(weight).into_iter().rev().map(|i| quantiles[i]).collect();
        let mut sorted = prior.clone();
        sorted.sort_unstable();
        let mut h =
            Self { window, ring: VecDeque::with_capacity(window.min(start.recorded.len())), prior, sorted, records: 0 };
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
    /// Whether the window holds `window` recorded lengths.
    pub fn is_full(&self) -> bool {
        self.ring.len() == self.window
    }
    /// Lengths recorded since the start (saved ones included).
    pub fn records(&self) -> u64 {
        self.records
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
        self.records += 1;
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

/// A Bayesian bootstrap's weights for `n` observations: independent Exp(1) draws, so that the
/// weights normalised are Dirichlet(1, ..., 1). A survival curve built with them is one draw of
/// the length distribution the observations leave possible, not just the most likely one.
pub fn bootstrap_weights<R: Rng>(n: usize, rng: &mut R, out: &mut Vec<f64>) {
    out.clear();
    out.extend((0..n).map(|_| -(1.0 - rng.random::<f64>()).ln()));
}

/// Kaplan-Meier survival of output lengths: finished lengths are events, and a running request's
/// generated count is censored ("at least this long"). Early in a run the finished requests are the
/// short ones (a request that finished early is short); counting the running ones as censored keeps
/// the estimate from believing every request is that short.
#[derive(Debug, Default)]
pub struct Survival {
    /// Distinct event lengths, ascending.
    times: Vec<u32>,
    /// `surv[i]`: P(length > times[i]).
    surv: Vec<f64>,
    /// Censored counts at or past the last event: the mass left past it is theirs.
    tail: Vec<u32>,
    /// `event_after[i]`: the weight of events `i..` (kept to reuse its allocation).
    event_after: Vec<f64>,
    /// With the linear tail: where the survival curve, continued from its last event at its
    /// average slope so far, reaches zero (`last / (1 - S(last))`); None while nothing has
    /// finished for certain (the curve never fell) or without it.
    linear_end: Option<f64>,
}

impl Survival {
    /// Rebuild from `events` (sorted ascending) and the censored counts (sorted ascending).
    /// `weights`, one per event, weigh the events (a Bayesian bootstrap's draw, see
    /// [`bootstrap_weights`]); `None` counts each once. `linear_tail`: the mass past the last
    /// event ends where the curve's average slope takes it to zero, not at `max_tokens`.
    pub fn build(&mut self, events: &[u32], weights: Option<&[f64]>, censored: &[u32], linear_tail: bool) {
        self.event_after.clear();
        self.event_after.resize(events.len() + 1, 0.0);
        for i in (0..events.len()).rev() {
            self.event_after[i] = self.event_after[i + 1] + weights.map_or(1.0, |w| w[i]);
        }
        self.times.clear();
        self.surv.clear();
        // `below`: censored counts under the current event time (both walk upwards).
        let (mut i, mut s, mut below) = (0usize, 1.0f64, 0usize);
        while i < events.len() {
            let t = events[i];
            let n = events[i..].partition_point(|&v| v == t);
            while below < censored.len() && censored[below] < t {
                below += 1;
            }
            let d = self.event_after[i] - self.event_after[i + n];
            // At risk at t: events at or after t, and requests censored at or after t.
            let at_risk = self.event_after[i] + (censored.len() - below) as f64;
            s *= (1.0 - d / at_risk).max(0.0);
            self.times.push(t);
            self.surv.push(s);
            i += n;
        }
        let last = self.times.last().copied().unwrap_or(0);
        self.tail.clear();
        self.tail.extend(censored.iter().copied().filter(|&c| c >= last));
        let s_last = self.surv.last().copied().unwrap_or(1.0);
        self.linear_end = (linear_tail && last > 0 && s_last < 1.0).then(|| last as f64 / (1.0 - s_last));
    }

    /// A final length for a request that has generated `generated` tokens, at most `max_tokens`:
    /// the inverse of the survival curve conditioned on "longer than `generated`". The mass left
    /// past the longest event belongs to requests censored there: one of them, then uniform from
    /// its count up to `max_tokens`.
    pub fn sample<R: Rng>(&self, generated: u32, max_tokens: u32, rng: &mut R) -> u32 {
        if generated + 1 >= max_tokens {
            return max_tokens.max(generated + 1);
        }
        let at = self.times.partition_point(|&t| t <= generated);
        let s_now = if at == 0 { 1.0 } else { self.surv[at - 1] };
        let target = s_now * rng.random::<f64>();
        // The first event past `generated` where the survival falls to the target or below.
        let k = self.surv[at..].partition_point(|&v| v > target);
        if let Some(&t) = self.times.get(at + k) {
            return t.clamp(generated + 1, max_tokens);
        }
        let last = self.times.last().copied().unwrap_or(0);
        let from = if self.tail.is_empty() { last } else { self.tail[rng.random_range(0..self.tail.len())] };
        let lo = from.max(generated) as f64;
        // With the linear tail, up to where the curve, continued at its average slope, reaches
        // zero; but a request that outlived that end has shown the line wrong for it, and the
        // honest bound is all that is left.
        let hi = match self.linear_end {
            Some(end) if end > lo + 1.0 => end.min(max_tokens as f64),
            _ => max_tokens as f64,
        };
        let v = lo + rng.random::<f64>() * (hi - lo);
        (v.ceil() as u32).clamp(generated + 1, max_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};

    fn start(prior: &[u32], weight: usize, recorded: &[u32]) -> HistoryStart {
        HistoryStart {
            prior: Prior::Lengths(Arc::from(prior)),
            prior_weight: Some(weight),
            recorded: Arc::from(recorded),
        }
    }

    fn cold(window: usize, bound: u32, prior: Prior) -> LengthHistory {
        LengthHistory::start(window, bound, &HistoryStart { prior, ..Default::default() })
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
        // LightLLM's priming: the largest output, DEFAULT_PRIOR_WEIGHT times.
        assert_eq!(cold(1000, 4096, Prior::MaxTokens).sorted(), &[4096; DEFAULT_PRIOR_WEIGHT]);
        // The default: uniform up to the largest output, at the (i + 0.5) / 8 quantiles.
        assert_eq!(cold(1000, 8000, Prior::default()).sorted(), &[500, 1500, 2500, 3500, 4500, 5500, 6500, 7500]);
        assert_eq!(cold(1000, 1, Prior::Uniform).sorted(), &[1; DEFAULT_PRIOR_WEIGHT], "never a zero length");
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
        let mut h = cold(1000, 4096, Prior::MaxTokens);
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
        let mut h = cold(2, 0, Prior::MaxTokens);
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
    #[test]
    fn survival_without_censoring_is_the_empirical_distribution() {
        let mut s = Survival::default();
        s.build(&[100, 100, 200, 400], None, &[], false);
        let mut rng = SmallRng::seed_from_u64(5);
        let n = 40_000;
        let xs: Vec<u32> = (0..n).map(|_| s.sample(0, 1000, &mut rng)).collect();
        let share = |v: u32| xs.iter().filter(|&&x| x == v).count() as f64 / n as f64;
        assert!(
            (share(100) - 0.5).abs() < 0.02 && (share(200) - 0.25).abs() < 0.02 && (share(400) - 0.25).abs() < 0.02
        );
        // Conditioned on what was generated; and never past max_tokens.
        assert!((0..1000).all(|_| s.sample(150, 1000, &mut rng) >= 200));
        assert!((0..1000).all(|_| s.sample(0, 150, &mut rng) <= 150));
        assert_eq!(s.sample(999, 1000, &mut rng), 1000);
    }

    #[test]
    fn censored_running_requests_keep_early_finishes_from_looking_typical() {
        // Two requests finished at 100 tokens while eight are still running past 300: the finished
        // alone say every length is 100; counted as censored, eight in ten are longer than 300.
        let mut s = Survival::default();
        s.build(&[100, 100], None, &[300; 8], false);
        let mut rng = SmallRng::seed_from_u64(9);
        let n = 40_000;
        let xs: Vec<u32> = (0..n).map(|_| s.sample(0, 1000, &mut rng)).collect();
        let long = xs.iter().filter(|&&x| x > 300).count() as f64 / n as f64;
        assert!((long - 0.8).abs() < 0.02, "share longer than 300: {long}");
        assert!(xs.iter().all(|&x| x == 100 || (300..=1000).contains(&x)));
    }

    #[test]
    fn weighted_events_count_as_often_as_their_weight() {
        // Weight 3 on 100 and 1 on 200: as if 100 had finished three times.
        let mut s = Survival::default();
        s.build(&[100, 200], Some(&[3.0, 1.0]), &[], false);
        let mut rng = SmallRng::seed_from_u64(11);
        let n = 40_000;
        let short = (0..n).filter(|_| s.sample(0, 1000, &mut rng) == 100).count() as f64 / n as f64;
        assert!((short - 0.75).abs() < 0.02, "share at 100: {short}");
        // Censored counts are at risk with weight 1: two running past 300 leave two thirds of
        // what is past 120 beyond 200.
        s.build(&[100, 200], Some(&[1.0, 1.0]), &[300, 300], false);
        let long = (0..n).filter(|_| s.sample(120, 1000, &mut rng) > 200).count() as f64 / n as f64;
        assert!((long - 2.0 / 3.0).abs() < 0.02, "share past 200 given past 120: {long}");
        // Bootstrap weights: positive, mean 1, a fresh draw each call.
        let (mut w1, mut w2) = (Vec::new(), Vec::new());
        bootstrap_weights(10_000, &mut rng, &mut w1);
        bootstrap_weights(10_000, &mut rng, &mut w2);
        assert!(w1.iter().all(|&w| w > 0.0) && w1 != w2);
        let mean = w1.iter().sum::<f64>() / w1.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "Exp(1) mean {mean}");
    }

    #[test]
    fn the_linear_tail_ends_where_the_curve_would_reach_zero() {
        // One of four finished at 100 and three run past 200: S(100) = 3/4, so the line from
        // (0, 1) through (100, 3/4) reaches zero at 400.
        let mut s = Survival::default();
        s.build(&[100], None, &[200, 200, 200], true);
        let mut rng = SmallRng::seed_from_u64(13);
        let xs: Vec<u32> = (0..20_000).map(|_| s.sample(250, 8000, &mut rng)).collect();
        assert!(xs.iter().all(|&x| (251..=400).contains(&x)), "{:?}", xs.iter().max());
        // A request past that end proved the line wrong: uniform up to max_tokens again.
        let far: Vec<u32> = (0..20_000).map(|_| s.sample(500, 8000, &mut rng)).collect();
        let mean = far.iter().map(|&x| x as f64).sum::<f64>() / far.len() as f64;
        assert!(far.iter().all(|&x| x > 500) && (mean - 4250.0).abs() < 60.0, "mean {mean}");
        // Nothing finished: no line to continue, the bound as before.
        s.build(&[], None, &[200, 200], true);
        assert!((0..2000).map(|_| s.sample(250, 8000, &mut rng)).any(|x| x > 4000));
        // Without the option the tail runs to max_tokens.
        s.build(&[100], None, &[200, 200, 200], false);
        assert!((0..2000).map(|_| s.sample(250, 8000, &mut rng)).any(|x| x > 4000));
    }
}
