//! SmartSpec's control loop (Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large
//! Language Models Using Goodput"): per step, choose the number of speculated tokens k in
//! `0..=k_max` that maximises expected generated tokens per second of step time.
//!
//! - Acceptance: one global rate `alpha`, an exponential moving average as the authors' code
//!   keeps it (`alpha <- 0.85 alpha + 0.15 accepted/judged`, starting at 0.7), clamped below 1.
//!   "Judged" counts the draft tokens the verifier actually ruled on: the accepted ones plus the
//!   first rejected one of each sequence. Drafts after a rejection were never judged; counting
//!   them (plain accepted/drafted) estimates `(a - a^(k+1)) / ((1 - a) k)` instead of the
//!   per-token rate `a` the expected-tokens formula needs (0.51 for a = 0.7 at k = 3), and the
//!   bias grows with k, which pushed the choice towards small k in the simulator study.
//! - Expected tokens of a sequence with `k` drafts: `(1 - alpha^(k+1)) / (1 - alpha)`; 1 for a
//!   sequence without a proposal.
//! - Step time: linear in KV tokens, batched tokens and batch size plus a fixed cost, fitted
//!   online (non-negative least squares) to the step times the engine measures. The fit used for
//!   a choice weights the measured steps by how close their batched tokens are to the range the
//!   candidates span, and their batch size to this step's: step time is a roofline (flat while weights and KV reads dominate, then
//!   rising with tokens), and a single global line fitted through prefill-heavy steps charges
//!   decode drafts the compute-bound price they do not pay.
//! - Speculation must beat k = 0 by `margin` (10% in their code); a k whose extra KV does not
//!   fit scores zero; the choice is remade every `rechoose_every` steps, and every
//!   `probe_every` steps (backing off while the choice holds) another k is run so that alpha and
//!   the time model stay observed (a free proposer's unused drafts are also checked against the
//!   drawn tokens, see `Judged`).

use std::collections::VecDeque;

use crate::error::{HoraeError, Result};
use crate::stepcost::{solve, StepFeatures};

/// Most tokens one sequence may speculate in a step.
pub const MAX_SPEC_TOKENS: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct SpecConfig {
    /// Largest number of draft tokens per sequence and step.
    pub k_max: usize,
    /// SmartSpec control; off means every step speculates `k_max` where drafts exist.
    pub adaptive: bool,
    /// Speculation must beat k = 0's predicted goodput by this fraction.
    pub margin: f64,
    pub rechoose_every: usize,
    /// Every this many steps, run a k other than the chosen one (0 = never).
    pub probe_every: usize,
    pub alpha_init: f64,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self { k_max: 4, adaptive: true, margin: 0.1, rechoose_every: 1, probe_every: 16, alpha_init: 0.7 }
    }
}

impl SpecConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HoraeError::InvalidConfig(m));
        if !(1..=MAX_SPEC_TOKENS).contains(&self.k_max) {
            return bad(format!("k_max must be between 1 and {MAX_SPEC_TOKENS}, got {}", self.k_max));
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return bad(format!("margin must be >= 0, got {}", self.margin));
        }
        if self.rechoose_every == 0 {
            return bad("rechoose_every must be at least 1".into());
        }
        if !(self.alpha_init > 0.0 && self.alpha_init < 1.0) {
            return bad(format!("alpha_init must be in (0, 1), got {}", self.alpha_init));
        }
        Ok(())
    }
}

/// Totals since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecStats {
    /// Sequence-steps that carried at least one draft token.
    pub num_drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// The acceptance estimate now.
    pub alpha: f64,
    /// The k of the last step.
    pub k: usize,
}

/// What became of one step's drafts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Judged {
    /// Sequences that carried drafts, their draft tokens, and how many were accepted.
    pub sequences: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// Sequences whose drafts met a rejection (the others accepted all of theirs).
    pub rejections: usize,
    /// Sequences that had a free proposal (prompt lookup) but ran without drafts (k = 0), and
    /// how many of those proposals' first token was the token then drawn. For a deterministic
    /// proposal that is exactly an acceptance test (kept with probability p(d)), so alpha stays
    /// observed at no cost while speculation is off.
    pub unused_judged: usize,
    pub unused_matched: usize,
}

/// The time model's regressors for a step: `[1, KV tokens read, tokens computed, sequences]`.
fn time_row(f: &StepFeatures) -> [f64; 4] {
    [1.0, f.context_tokens, f.num_tokens, f.num_seqs]
}

/// Measured steps kept for the time model.
const WINDOW: usize = 512;
/// Steps measured before the time model is trusted; until then k alternates 0 and 1.
const WARMUP: usize = 12;

#[derive(Debug, Clone)]
pub struct SpecController {
    cfg: SpecConfig,
    alpha: f64,
    samples: VecDeque<([f64; 4], f64)>,
    coef: Option<[f64; 4]>,
    since_fit: usize,
    step: u64,
    chosen: usize,
    last_probe: u64,
    probe_gap: u64,
    stats: SpecStats,
}

impl SpecController {
    pub fn new(cfg: SpecConfig) -> Result<Self> {
        cfg.validate()?;
        let alpha = cfg.alpha_init;
        let stats = SpecStats { alpha, ..Default::default() };
        let probe_gap = cfg.probe_every as u64;
        Ok(Self {
            cfg,
            alpha,
            samples: VecDeque::new(),
            coef: None,
            since_fit: 0,
            step: 0,
            chosen: 0,
            last_probe: 0,
            probe_gap,
            stats,
        })
    }

    pub fn config(&self) -> &SpecConfig {
        &self.cfg
    }
    pub fn stats(&self) -> SpecStats {
        self.stats
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The fitted step-time coefficients `[fixed, per KV token, per batched token, per sequence]`.
    pub fn time_model(&self) -> Option<[f64; 4]> {
        self.coef
    }

    /// Expected tokens a sequence emits from `k` drafts at acceptance rate `alpha`.
    pub fn expected_tokens(alpha: f64, k: usize) -> f64 {
        (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha)
    }

    /// Predicted seconds of a step (None before the model is fitted).
    pub fn predict(&self, shape: &StepFeatures) -> Option<f64> {
        let c = self.coef?;
        Some(time_row(shape).iter().zip(c).map(|(x, c)| x * c).sum::<f64>().max(1e-9))
    }

    /// Choose this step's k. `draft_lens[i]` is how many drafts decoding sequence i has (its
    /// proposal, capped by what it may still generate); `base` is the step without drafts;
    /// `fits(k)` says whether the drafts' extra KV fits the pool; `others_sampling` counts the
    /// sequences that emit one token without drafting (prefill ends).
    pub fn choose(
        &mut self,
        draft_lens: &[usize],
        base: StepFeatures,
        others_sampling: usize,
        fits: impl Fn(usize) -> bool,
    ) -> usize {
        self.step += 1;
        let k_max = self.cfg.k_max;
        let largest_fitting = || (0..=k_max).rev().find(|&k| fits(k)).unwrap_or(0);
        if draft_lens.iter().all(|&l| l == 0) {
            return self.record_k(0);
        }
        if !self.cfg.adaptive {
            return self.record_k(largest_fitting());
        }
        if self.coef.is_none() {
            // Warm-up: k = 0 and 1 in turn, so the time model sees what a draft token costs
            // (cheaply: a big batch at k_max can take several times a normal step).
            let k = if self.step.is_multiple_of(2) { 0 } else { largest_fitting().min(1) };
            return self.record_k(k);
        }
        if (self.step - 1).is_multiple_of(self.cfg.rechoose_every as u64) {
            let lo = base.num_tokens.max(1.0);
            let hi = lo + draft_lens.iter().map(|&l| l.min(k_max) as f64).sum::<f64>();
            // Steps of a different batch size count less too: a small batch's drafts are nearly
            // free on a machine where a big batch's cost a whole token each.
            let seqs = base.num_seqs.max(1.0);
            let near = |x: &[f64; 4], lo: f64, hi: f64, sigma: f64| {
                locality(x[2], lo, hi, sigma) * locality(x[3], seqs, seqs, 1.0)
            };
            let span = fit_nonnegative(&self.samples, |x| near(x, lo, hi, 1.0)).or(self.coef).expect("fitted");
            // Each candidate is predicted by the steps measured near its own size where there
            // are enough of them, else by the fit over the whole span.
            let predict = |s: &StepFeatures| {
                let t = s.num_tokens.max(1.0);
                let c = fit_nonnegative(&self.samples, |x| near(x, t, t, 0.5)).unwrap_or(span);
                time_row(s).iter().zip(c).map(|(x, c)| x * c).sum::<f64>().max(1e-9)
            };
            let score = |k: usize| -> f64 {
                if !fits(k) {
                    return 0.0;
                }
                let mut tokens = others_sampling as f64;
                let mut shape = base;
                for &l in draft_lens {
                    let kk = k.min(l);
                    tokens += Self::expected_tokens(self.alpha, kk);
                    shape.num_tokens += kk as f64;
                }
                tokens / predict(&shape)
            };
            let none = score(0);
            let (best_k, best) =
                (1..=k_max).map(|k| (k, score(k))).fold((0, none), |a, b| if b.1 > a.1 { b } else { a });
            let chosen = if best_k > 0 && best >= none * (1.0 + self.cfg.margin) { best_k } else { 0 };
            if chosen != self.chosen {
                self.probe_gap = self.cfg.probe_every as u64;
            }
            self.chosen = chosen;
        }
        let mut k = self.chosen;
        if self.cfg.probe_every > 0 && self.step >= self.last_probe + self.probe_gap {
            // Run a neighbouring k now and then: k = 0 alone would never observe alpha again,
            // and a single k would leave the time model unable to tell fixed from per-token cost.
            // While the choice holds, probes back off (up to 16x): at high load each k = 1 probe
            // is a step several times longer than a plain one.
            k = if k == 0 { 1 } else { k - 1 };
            self.last_probe = self.step;
            self.probe_gap = (self.probe_gap * 2).min(16 * self.cfg.probe_every as u64);
        }
        while k > 0 && !fits(k) {
            k -= 1;
        }
        self.record_k(k)
    }

    fn record_k(&mut self, k: usize) -> usize {
        self.stats.k = k;
        k
    }

    /// A step ran: its shape and measured seconds.
    pub fn observe_step(&mut self, shape: StepFeatures, seconds: f64) {
        if !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((time_row(&shape), seconds));
        self.since_fit += 1;
        if self.samples.len() >= WARMUP && (self.coef.is_none() || self.since_fit >= 8) {
            if let Some(c) = fit_nonnegative(&self.samples, |_| 1.0) {
                self.coef = Some(c);
            }
            self.since_fit = 0;
        }
    }

    /// What became of one step's drafts.
    pub fn observe_acceptance(&mut self, j: Judged) {
        self.stats.num_drafts += j.sequences as u64;
        self.stats.draft_tokens += j.drafted as u64;
        self.stats.accepted_tokens += j.accepted as u64;
        let judged = j.accepted + j.rejections + j.unused_judged;
        if judged == 0 {
            return;
        }
        let rate = (j.accepted + j.unused_matched) as f64 / judged as f64;
        self.alpha = (0.85 * self.alpha + 0.15 * rate).clamp(0.0, 0.99);
        self.stats.alpha = self.alpha;
    }
}

/// Weight of a measured step with `tokens` batched tokens when predicting steps of `lo..=hi`
/// tokens: 1 inside, falling off as a Gaussian in log2 distance outside, of width `sigma`.
fn locality(tokens: f64, lo: f64, hi: f64, sigma: f64) -> f64 {
    let t = tokens.max(1.0);
    let d = if t < lo {
        (lo / t).log2()
    } else if t > hi {
        (t / hi).log2()
    } else {
        0.0
    } / sigma;
    (-0.5 * d * d).exp()
}

/// Weighted non-negative least squares over the 4 features: every subset of non-zero
/// coefficients is solved (15 small systems) and the best feasible one wins. Columns are scaled
/// to unit weighted RMS. `None` when too little weight is near (fewer than ~6 steps' worth).
fn fit_nonnegative(samples: &VecDeque<([f64; 4], f64)>, weight: impl Fn(&[f64; 4]) -> f64) -> Option<[f64; 4]> {
    let w: Vec<f64> = samples.iter().map(|(x, _)| weight(x)).collect();
    let n: f64 = w.iter().sum();
    if n < 6.0 {
        return None;
    }
    let mut scale = [0.0f64; 4];
    for ((x, _), w) in samples.iter().zip(&w) {
        for i in 0..4 {
            scale[i] += w * x[i] * x[i];
        }
    }
    let scale = scale.map(|s| if s > 0.0 { (s / n).sqrt() } else { 1.0 });
    let mut ata = [[0.0f64; 4]; 4];
    let mut atb = [0.0f64; 4];
    let mut btb = 0.0;
    for ((x, t), w) in samples.iter().zip(&w) {
        let x: [f64; 4] = std::array::from_fn(|i| x[i] / scale[i]);
        for i in 0..4 {
            atb[i] += w * x[i] * t;
            for j in 0..4 {
                ata[i][j] += w * x[i] * x[j];
            }
        }
        btb += w * t * t;
    }
    let mut best: Option<([f64; 4], f64)> = None;
    for mask in 1u32..16 {
        let idx: Vec<usize> = (0..4).filter(|i| mask & (1 << i) != 0).collect();
        let m = idx.len();
        let mut a = vec![vec![0.0; m]; m];
        let mut b = vec![0.0; m];
        for (r, &i) in idx.iter().enumerate() {
            b[r] = atb[i];
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] = ata[i][j] + if r == c { 1e-9 * n } else { 0.0 };
            }
        }
        let Some(sol) = solve(a, b) else { continue };
        if sol.iter().any(|&v| v < 0.0) {
            continue;
        }
        let mut coef = [0.0; 4];
        for (&i, &v) in idx.iter().zip(&sol) {
            coef[i] = v;
        }
        // Residual sum of squares from the normal equations: |t|^2 - 2 c.A'b + c.A'A.c
        let mut rss = btb;
        for i in 0..4 {
            rss -= 2.0 * coef[i] * atb[i];
            for j in 0..4 {
                rss += coef[i] * ata[i][j] * coef[j];
            }
        }
        if best.is_none_or(|(_, r)| rss < r) {
            best = Some((coef, rss));
        }
    }
    best.map(|(c, _)| std::array::from_fn(|i| c[i] / scale[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine where a step costs 10 ms plus 1 ms per batched token: at batch 1, 4 drafts at
    /// alpha 0.8 give 3.36 tokens in 15 ms against 1 in 11 ms, so speculate; at batch 64 each
    /// draft token costs as much as a whole token, so don't.
    #[test]
    fn speculates_at_low_load_and_stops_at_high_load() {
        let time = |s: &StepFeatures| 0.010 + 0.001 * s.num_tokens;
        let mut c = SpecController::new(SpecConfig { k_max: 4, probe_every: 0, ..Default::default() }).unwrap();
        let mut x = 1u64;
        let mut uniform = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut run = |c: &mut SpecController, batch: usize, accept: f64| -> Vec<usize> {
            let mut ks = Vec::new();
            for _ in 0..60 {
                let base = StepFeatures {
                    context_tokens: 500.0 * batch as f64,
                    num_tokens: batch as f64,
                    num_seqs: batch as f64,
                    ..Default::default()
                };
                let k = c.choose(&vec![4; batch], base, 0, |_| true);
                let shape = StepFeatures { num_tokens: (batch * (k + 1)) as f64, ..base };
                c.observe_step(shape, time(&shape));
                // Each sequence's drafts are accepted one by one until the first rejection.
                let (mut accepted, mut rejections) = (0, 0);
                for _ in 0..batch {
                    let mut a = 0;
                    while a < k && uniform() < accept {
                        a += 1;
                    }
                    accepted += a;
                    rejections += usize::from(a < k);
                }
                let j = Judged {
                    sequences: if k > 0 { batch } else { 0 },
                    drafted: batch * k,
                    accepted,
                    rejections,
                    ..Default::default()
                };
                c.observe_acceptance(j);
                ks.push(k);
            }
            ks
        };
        let low = run(&mut c, 1, 0.8);
        assert!(c.time_model().is_some());
        assert!(low[20..].iter().all(|&k| k >= 3), "low load: {low:?}");
        let high = run(&mut c, 64, 0.8);
        assert!(high[20..].iter().all(|&k| k == 0), "high load: {high:?}");
        let coef = c.time_model().unwrap();
        assert!((coef[0] - 0.010).abs() < 1e-4 && (coef[2] - 0.001).abs() < 1e-5, "{coef:?}");
        // Poor acceptance at low load: not worth it either.
        let poor = run(&mut c, 1, 0.0);
        assert!(poor[30..].iter().all(|&k| k == 0), "{poor:?}, alpha {}", c.alpha());
        assert!(c.alpha() < 0.5, "alpha {}", c.alpha());
    }

    #[test]
    fn drafts_that_do_not_fit_score_zero_and_fixed_k_is_fixed() {
        let mut c = SpecController::new(SpecConfig { k_max: 5, adaptive: false, ..Default::default() }).unwrap();
        assert_eq!(c.choose(&[5, 5], StepFeatures::default(), 0, |_| true), 5);
        assert_eq!(c.choose(&[5, 5], StepFeatures::default(), 0, |k| k <= 2), 2);
        assert_eq!(c.choose(&[0, 0], StepFeatures::default(), 0, |_| true), 0);
        assert!(SpecController::new(SpecConfig { k_max: 0, ..Default::default() }).is_err());
        assert!(SpecController::new(SpecConfig { k_max: 17, ..Default::default() }).is_err());
    }

    #[test]
    fn alpha_is_the_authors_moving_average() {
        let mut c = SpecController::new(SpecConfig::default()).unwrap();
        // 2 accepted, then a rejection: 3 tokens judged, the fourth never was.
        c.observe_acceptance(Judged { sequences: 1, drafted: 4, accepted: 2, rejections: 1, ..Default::default() });
        assert!((c.alpha() - (0.85 * 0.7 + 0.15 * 2.0 / 3.0)).abs() < 1e-12);
        // Unused proposals count as one judged token each.
        let before = c.alpha();
        c.observe_acceptance(Judged { unused_judged: 4, unused_matched: 1, ..Default::default() });
        assert!((c.alpha() - (0.85 * before + 0.15 * 0.25)).abs() < 1e-12);
        assert_eq!(c.stats().draft_tokens, 4);
        for _ in 0..200 {
            c.observe_acceptance(Judged { sequences: 1, drafted: 4, accepted: 4, ..Default::default() });
        }
        assert_eq!(c.alpha(), 0.99);
        assert!((SpecController::expected_tokens(0.5, 3) - 1.875).abs() < 1e-12);
        assert_eq!(SpecController::expected_tokens(0.5, 0), 1.0);
    }
}
