//! The *future*: peak KV memory of a batch whose requests each hold some tokens now and will grow
//! by one token per step until they finish.
//!
//! Sort the requests by remaining tokens, descending: `r_1 >= r_2 >= ... >= r_n`. Memory only drops
//! when a request finishes, so the peaks are just before each finish; just before request `k`
//! finishes, requests `1..=k` are alive and hold `held_i + r_k` each. Hence
//! `peak = max_k (P_k + k * r_k)` with `P_k = sum_{i<=k} held_i`.
//!
//! [`Forecast`] keeps one batch sorted with prefix and suffix maxima so that the peak *with one more
//! request added* costs a binary search and O(1), instead of re-sorting the batch per candidate.

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
