//! Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): a draft token `d` drawn from
//! the proposer's distribution `q` is kept with probability `min(1, p(d) / q(d))` under the
//! target's distribution `p`; on rejection the replacement is drawn from `max(0, p - q)`
//! normalised. Every emitted token is then distributed exactly as the target's. A deterministic
//! proposer (n-gram lookup) is a point mass `q = 1{d}`: keep `d` with probability `p(d)`, else draw
//! from `p` without `d`. Greedy targets are point masses too, so greedy verification keeps a
//! draft exactly when it is the argmax and otherwise emits the argmax.

use rand::{rngs::SmallRng, Rng};

use crate::sample::draw;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Rejected; emit this token instead and stop verifying this sequence.
    Reject(u32),
}

/// Verify one draft token. `p` is the target's distribution at this position (summing to 1);
/// `q` the proposer's, or `None` for a deterministic proposal.
pub fn check_draft(p: &[f32], draft: u32, q: Option<&[f32]>, rng: &mut SmallRng) -> Verdict {
    let d = draft as usize;
    let pd = p.get(d).copied().unwrap_or(0.0);
    let qd = q.map_or(1.0, |q| q.get(d).copied().unwrap_or(0.0));
    // u < p/q  <=>  u * q < p, without dividing by a q that might be 0.
    if qd > 0.0 && rng.random::<f32>() * qd < pd {
        return Verdict::Accept;
    }
    let residual: Vec<(u32, f32)> = match q {
        Some(q) => p.iter().zip(q).enumerate().map(|(i, (&a, &b))| (i as u32, (a - b).max(0.0))).collect(),
        None => p.iter().enumerate().map(|(i, &a)| (i as u32, if i == d { 0.0 } else { a })).collect(),
    };
    let residual: Vec<(u32, f32)> = residual.into_iter().filter(|c| c.1 > 0.0).collect();
    if residual.is_empty() {
        // p <= q everywhere means p == q (both sum to 1), so rejection had probability 0;
        // only rounding gets here, and p itself is then the right distribution.
        let all: Vec<(u32, f32)> = p.iter().enumerate().map(|(i, &a)| (i as u32, a)).collect();
        return Verdict::Reject(draw(&all, rng));
    }
    Verdict::Reject(draw(&residual, rng))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty; within 1%
    /// of the exact quantile for df >= 3).
    pub(crate) fn chi2_crit_001(df: usize) -> f64 {
        let k = df as f64;
        let z = 3.090_232; // standard normal 0.999 quantile
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    fn chi2(counts: &[u64], probs: &[f32], n: u64) -> (f64, usize) {
        let mut stat = 0.0;
        let mut cells = 0;
        for (&c, &p) in counts.iter().zip(probs) {
            let e = p as f64 * n as f64;
            if e > 0.0 {
                stat += (c as f64 - e).powi(2) / e;
                cells += 1;
            } else {
                assert_eq!(c, 0, "a token with probability 0 was emitted");
            }
        }
        (stat, cells - 1)
    }

    /// The emitted token (draft if accepted, else the replacement) is distributed as `p`, for a
    /// sampled proposer and for a point-mass one.
    #[test]
    fn emitted_tokens_follow_the_target_distribution() {
        let p = [0.05f32, 0.4, 0.1, 0.3, 0.15, 0.0];
        let q = [0.3f32, 0.1, 0.2, 0.1, 0.1, 0.2];
        let n = 200_000u64;
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0u64; 6];
        let mut accepted = 0;
        for _ in 0..n {
            let d = draw(&q.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect::<Vec<_>>(), &mut rng);
            let t = match check_draft(&p, d, Some(&q), &mut rng) {
                Verdict::Accept => {
                    accepted += 1;
                    d
                }
                Verdict::Reject(t) => t,
            };
            counts[t as usize] += 1;
        }
        let (stat, df) = chi2(&counts, &p, n);
        assert!(stat < chi2_crit_001(df), "chi2 {stat} with {df} df: {counts:?}");
        // Acceptance rate is sum(min(p, q)) = 0.05+0.1+0.1+0.1+0.1+0 = 0.45.
        let rate = accepted as f64 / n as f64;
        assert!((rate - 0.45).abs() < 0.01, "{rate}");

        for draft in [1u32, 5] {
            let mut counts = [0u64; 6];
            for _ in 0..n {
                let t = match check_draft(&p, draft, None, &mut rng) {
                    Verdict::Accept => draft,
                    Verdict::Reject(t) => t,
                };
                counts[t as usize] += 1;
            }
            let (stat, df) = chi2(&counts, &p, n);
            assert!(stat < chi2_crit_001(df), "point mass at {draft}: chi2 {stat}: {counts:?}");
        }
    }

    #[test]
    fn greedy_targets_keep_exactly_the_argmax() {
        let mut rng = SmallRng::seed_from_u64(0);
        let p = [0.0f32, 0.0, 1.0, 0.0];
        for _ in 0..100 {
            assert_eq!(check_draft(&p, 2, None, &mut rng), Verdict::Accept);
            assert_eq!(check_draft(&p, 1, None, &mut rng), Verdict::Reject(2));
            assert_eq!(check_draft(&p, 3, Some(&[0.0, 0.0, 0.0, 1.0]), &mut rng), Verdict::Reject(2));
        }
    }
}
