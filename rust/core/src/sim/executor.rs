//! The simulator's executor: step time from a cost model, and a "model" that emits end-of-sequence
//! exactly when a request reaches its true output length from the trace. With speculative
//! decoding, a proposer is modelled by its acceptance rate: each request draws its own rate from a
//! Beta distribution, and each draft token is accepted with that probability until the first
//! rejection.

use std::sync::Arc;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use rand_distr::{Beta, Distribution};

use super::cost_model::CostModel;
use crate::error::{HoraeError, Result};
use crate::plan::{DraftCandidate, ExecOutput, Executor, StepPlan};
use crate::request::ReqId;

pub const SIM_TOKEN: u32 = 0;
pub const SIM_EOS: u32 = 1;

/// How well a simulated proposer guesses: per-request acceptance rates ~ Beta with this mean and
/// concentration (`alpha + beta`; large = every request near the mean).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acceptance {
    pub mean: f64,
    pub concentration: f64,
    pub seed: u64,
}

impl Acceptance {
    pub fn validate(&self) -> Result<()> {
        if !(self.mean > 0.0 && self.mean < 1.0 && self.concentration > 0.0 && self.concentration.is_finite()) {
            return Err(HoraeError::InvalidConfig(format!(
                "acceptance needs a mean in (0, 1) and a concentration > 0, got {} and {}",
                self.mean, self.concentration
            )));
        }
        Ok(())
    }

    /// Request `id`'s acceptance rate (the same every time it is asked).
    pub fn rate(&self, id: ReqId) -> f64 {
        let mut rng = SmallRng::seed_from_u64(self.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let beta =
            Beta::new(self.mean * self.concentration, (1.0 - self.mean) * self.concentration).expect("validated");
        beta.sample(&mut rng)
    }
}

pub struct SimExecutor {
    cost: CostModel,
    /// True output length by request id (ids are trace indices).
    true_lengths: Arc<Vec<u32>>,
    acceptance: Option<Acceptance>,
    rng: SmallRng,
}

impl SimExecutor {
    pub fn new(cost: CostModel, true_lengths: Arc<Vec<u32>>) -> Self {
        Self { cost, true_lengths, acceptance: None, rng: SmallRng::seed_from_u64(0) }
    }

    /// Model speculative proposals with this acceptance distribution.
    pub fn with_acceptance(mut self, a: Acceptance) -> Self {
        self.rng = SmallRng::seed_from_u64(a.seed);
        self.acceptance = Some(a);
        self
    }
}

impl Executor for SimExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<ExecOutput> {
        let dt = self.cost.step_time(&plan.features());
        let mut out = ExecOutput { elapsed: Some(dt), ..Default::default() };
        out.sampled.reserve(plan.seqs.len());
        for s in plan.seqs.iter().filter(|s| s.samples) {
            let truth = *self
                .true_lengths
                .get(s.id as usize)
                .ok_or_else(|| HoraeError::Executor(format!("no true length for request {}", s.id)))?
                as usize;
            let mut accepted = 0;
            if s.num_draft > 0 {
                let rate = self.acceptance.map_or(0.0, |a| a.rate(s.id));
                while accepted < s.num_draft && self.rng.random::<f64>() < rate {
                    accepted += 1;
                }
                out.accepted.push((s.id, accepted));
            }
            for j in 0..=accepted {
                let done = s.num_output + j + 1 >= truth;
                out.sampled.push((s.id, if done { SIM_EOS } else { SIM_TOKEN }));
                if done {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        vec![SIM_EOS]
    }

    fn propose(&mut self, candidates: &[DraftCandidate], k: usize) -> Result<Vec<(ReqId, Vec<u32>)>> {
        if self.acceptance.is_none() {
            return Ok(Vec::new());
        }
        Ok(candidates.iter().map(|c| (c.id, vec![SIM_TOKEN; k])).collect())
    }
}
