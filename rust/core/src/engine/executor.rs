//! The seam between scheduling and execution: the engine hands a planned batch to an
//! [`Executor`], which is either a real model (CPU or CUDA) or the simulator's cost model.

use super::ReqId;
use crate::sample::TokenLogprobs;
use crate::error::Result;
use crate::sched::{SchedulePlan, Scheduler};

#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// One token for every scheduled sequence whose `samples` flag is set.
    pub sampled: Vec<(ReqId, u32)>,
    /// Log-probabilities for the sampled tokens of requests that asked for them.
    pub logprobs: Vec<(ReqId, TokenLogprobs)>,
    /// `(request, prompt position p, logprobs of prompt token p)` for requests that asked.
    pub prompt_logprobs: Vec<(ReqId, usize, TokenLogprobs)>,
    /// Seconds the step takes on a virtual clock; `None` when it ran in real time.
    pub elapsed: Option<f64>,
}

pub trait Executor: Send {
    /// Run one step. `state` gives read access to requests (tokens) and block tables.
    fn execute(&mut self, plan: &SchedulePlan, state: &Scheduler) -> Result<ExecOutput>;

    /// Token ids that end a sequence.
    fn eos_token_ids(&self) -> Vec<u32>;

    /// A request left the engine; drop any per-request state.
    fn release(&mut self, _id: ReqId) {}
}
