//! The simulator's executor: step time from a cost model, and a "model" that emits end-of-sequence
//! exactly when a request reaches its true output length from the trace.

use std::sync::Arc;

use super::cost_model::{CostModel, StepFeatures};
use crate::engine::{ExecOutput, Executor};
use crate::error::{HoraeError, Result};
use crate::sched::{SchedulePlan, Scheduler};

pub const SIM_TOKEN: u32 = 0;
pub const SIM_EOS: u32 = 1;

pub struct SimExecutor {
    cost: CostModel,
    /// True output length by request id (ids are trace indices).
    true_lengths: Arc<Vec<u32>>,
}

impl SimExecutor {
    pub fn new(cost: CostModel, true_lengths: Arc<Vec<u32>>) -> Self {
        Self { cost, true_lengths }
    }
}

impl Executor for SimExecutor {
    fn execute(&mut self, plan: &SchedulePlan, state: &Scheduler) -> Result<ExecOutput> {
        let features = StepFeatures::of_plan(plan);
        let dt = self.cost.step_time(&features);
        let mut sampled = Vec::new();
        for s in plan.seqs.iter().filter(|s| s.samples) {
            let r = state.request(s.id).ok_or(HoraeError::UnknownRequest(s.id))?;
            let truth = *self
                .true_lengths
                .get(s.id as usize)
                .ok_or_else(|| HoraeError::Executor(format!("no true length for request {}", s.id)))?;
            let token = if r.output.len() + 1 >= truth as usize { SIM_EOS } else { SIM_TOKEN };
            sampled.push((s.id, token));
        }
        Ok(ExecOutput { sampled, elapsed: Some(dt), ..Default::default() })
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        vec![SIM_EOS]
    }
}
