//! Workloads that the traces do not give directly: arrival processes for length-only sets, rate
//! scaling, and the Past-Future paper's synthetic length distributions.

use rand::{rngs::SmallRng, Rng, SeedableRng};
use rand_distr::{Distribution, Gamma};

use super::trace::{Trace, TraceRequest};
use crate::error::{HoraeError, Result};
use crate::names::named_enum;

/// Give every request an arrival time from a Gamma renewal process with mean rate `rate` (req/s)
/// and shape `burstiness` (1 = Poisson; below 1 burstier), as vLLM's benchmark does.
pub fn assign_arrivals(trace: &mut Trace, rate: f64, burstiness: f64, seed: u64) -> Result<()> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(HoraeError::InvalidConfig(format!("request rate must be positive, got {rate}")));
    }
    if !(burstiness.is_finite() && burstiness > 0.0) {
        return Err(HoraeError::InvalidConfig(format!("burstiness must be positive, got {burstiness}")));
    }
    let gamma = Gamma::new(burstiness, 1.0 / (rate * burstiness))
        .map_err(|e| HoraeError::InvalidConfig(format!("arrival process: {e}")))?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = 0.0;
    for r in &mut trace.requests {
        r.arrival = t;
        t += gamma.sample(&mut rng);
    }
    trace.timed = true;
    Ok(())
}

/// The same requests arriving `scale` times as fast.
pub fn scale_rate(trace: &Trace, scale: f64) -> Result<Trace> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(HoraeError::InvalidConfig(format!("rate scale must be positive, got {scale}")));
    }
    let mut t = trace.clone();
    for r in &mut t.requests {
        r.arrival /= scale;
    }
    Ok(t)
}

named_enum! {
    /// The Past-Future paper's synthetic length sets (uniform within each range).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum LengthDist("length set") {
        /// Inputs 32-4k, outputs 2k-4k: long outputs, any input.
        Dist1 = "dist-1" | "dist1",
        /// Inputs 3k-5k, outputs 3k-5k.
        Dist2 = "dist-2" | "dist2",
        /// Inputs 2k-4k, outputs 32-4k: widely varying outputs.
        Dist3 = "dist-3" | "dist3",
    }
}

impl LengthDist {
    pub fn ranges(&self) -> ((u32, u32), (u32, u32)) {
        match self {
            LengthDist::Dist1 => ((32, 4096), (2048, 4096)),
            LengthDist::Dist2 => ((3072, 5120), (3072, 5120)),
            LengthDist::Dist3 => ((2048, 4096), (32, 4096)),
        }
    }
}

/// `n` requests with lengths drawn from `dist`, untimed (give them arrivals or use closed loop).
pub fn synthetic(dist: LengthDist, n: usize, seed: u64) -> Result<Trace> {
    if n == 0 {
        return Err(HoraeError::InvalidConfig("a synthetic trace needs at least one request".into()));
    }
    let ((i0, i1), (o0, o1)) = dist.ranges();
    let mut rng = SmallRng::seed_from_u64(seed);
    let requests = (0..n)
        .map(|_| TraceRequest {
            arrival: 0.0,
            prompt_len: rng.random_range(i0..=i1),
            output_len: rng.random_range(o0..=o1),
            prefix_ids: Vec::new(),
        })
        .collect();
    let name = format!("{dist:?}").to_lowercase().replace("dist", "dist-");
    Ok(Trace { name, requests, timed: false, prefix_unit: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_have_the_asked_rate_and_gamma_is_burstier() {
        let mut t = synthetic(LengthDist::Dist3, 20_000, 1).unwrap();
        assert!(!t.timed);
        let cv = |t: &Trace| {
            let gaps: Vec<f64> = t.requests.windows(2).map(|w| w[1].arrival - w[0].arrival).collect();
            let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let v = gaps.iter().map(|g| (g - m).powi(2)).sum::<f64>() / gaps.len() as f64;
            (m, v.sqrt() / m)
        };
        assign_arrivals(&mut t, 4.0, 1.0, 3).unwrap();
        let (mean, c) = cv(&t);
        assert!((mean - 0.25).abs() < 0.01 && (c - 1.0).abs() < 0.05, "mean {mean} cv {c}");
        assign_arrivals(&mut t, 4.0, 0.25, 3).unwrap();
        let (mean, c) = cv(&t);
        assert!((mean - 0.25).abs() < 0.02 && (c - 2.0).abs() < 0.15, "mean {mean} cv {c}");
        let fast = scale_rate(&t, 2.0).unwrap();
        assert!((cv(&fast).0 - 0.125).abs() < 0.01);
        assert!(assign_arrivals(&mut t, 0.0, 1.0, 0).is_err());
        assert!(scale_rate(&t, -1.0).is_err());
    }

    #[test]
    fn synthetic_lengths_stay_in_range() {
        for d in [LengthDist::Dist1, LengthDist::Dist2, LengthDist::Dist3] {
            let ((i0, i1), (o0, o1)) = d.ranges();
            let t = synthetic(d, 2000, 9).unwrap();
            assert!(t.requests.iter().all(|r| (i0..=i1).contains(&r.prompt_len) && (o0..=o1).contains(&r.output_len)));
        }
        assert!("dist-4".parse::<LengthDist>().is_err());
    }
}
