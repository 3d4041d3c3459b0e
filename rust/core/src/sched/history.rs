//! The *past*: output lengths of recently finished requests, and the conditional length
//! distribution the Past-Future scheduler samples from.

use std::collections::VecDeque;

use rand::Rng;

/// A sliding window of output lengths, kept both in arrival order (to drop the oldest) and sorted
/// (to sample). Updates cost one binary search and a memmove of at most `window` entries.
#[derive(Debug, Clone)]
pub struct LengthHistory {
    window: usize,
    ring: VecDeque<u32>,
    sorted: Vec<u32>,
}

impl LengthHistory {
    /// Primed with `window / 2` copies of `prime_len` (the largest allowed output) so that a fresh
    /// scheduler starts conservative and loosens as real lengths come in.
    pub fn new(window: usize, prime_len: u32) -> Self {
        let window = window.max(1);
        let mut h = Self { window, ring: VecDeque::with_capacity(window), sorted: Vec::with_capacity(window) };
        for _ in 0..(window / 2).max(1) {
            h.record(prime_len);
        }
        h
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
    pub fn sorted(&self) -> &[u32] {
        &self.sorted
    }

    pub fn record(&mut self, output_len: u32) {
        if self.ring.len() == self.window {
            let old = self.ring.pop_front().expect("window is full");
            let at = self.sorted.partition_point(|&v| v < old);
            self.sorted.remove(at);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};

    #[test]
    fn window_drops_oldest_and_stays_sorted() {
        let mut h = LengthHistory::new(4, 100);
        assert_eq!(h.sorted(), &[100, 100]);
        for v in [5, 3, 9, 7] {
            h.record(v);
        }
        assert_eq!(h.len(), 4);
        assert_eq!(h.sorted(), &[3, 5, 7, 9], "the two primes were the oldest and left first");
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
