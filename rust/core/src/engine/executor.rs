//! The seam between scheduling and execution: the engine hands a planned batch to an
//! [`Executor`], which is either a real model (CPU or CUDA) or the simulator's cost model.

use super::ReqId;
use crate::sample::TokenLogprobs;
use crate::error::Result;
use crate::sched::{SchedulePlan, Scheduler};

#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// One token for every scheduled sequence whose `samples` flag is set; a sequence that
    /// carried drafts gets its accepted drafts and then one more token, in order.
    pub sampled: Vec<(ReqId, u32)>,
    /// For every sequence scheduled with drafts: how many of them were accepted.
    pub accepted: Vec<(ReqId, usize)>,
    /// Log-probabilities for the sampled tokens of requests that asked for them, in the order of
    /// `sampled`.
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

    /// A request was preempted: its KV is gone (a draft model's too) and will be recomputed.
    fn preempted(&mut self, _id: ReqId) {}

    /// Whether proposals are lookups: free to make before k is chosen (so k is chosen knowing
    /// who has drafts) and deterministic (so a proposal left unused at k = 0 can still be checked
    /// against the drawn token). Prompt lookup is; a draft model is not, and proposes only after
    /// k is chosen, only when k > 0; nor is the simulator's modelled proposer.
    fn lookup_proposals(&self) -> bool {
        false
    }

    /// Speculative decoding: propose up to `k` draft tokens for each of `ids` (running requests
    /// about to decode). Requests left out, or given an empty draft, decode normally.
    fn propose(&mut self, _state: &Scheduler, _ids: &[ReqId], _k: usize) -> Result<Vec<(ReqId, Vec<u32>)>> {
        Ok(Vec::new())
    }
}
