//! The seam between scheduling and execution (vLLM v1's `SchedulerOutput`). The scheduler writes a
//! [`StepPlan`] that carries everything a step needs (token ids, positions, KV slots, block
//! tables, sampling parameters, drafts), and an [`Executor`] (a real model on the CPU or a GPU, or
//! the simulator's cost model) runs it without ever reading the scheduler. Proposers of
//! speculative drafts get [`DraftCandidate`]s the same way.

use std::sync::Arc;

use crate::error::Result;
use crate::kv::BlockCopy;
use crate::request::ReqId;
use crate::sample::{SamplingParams, TokenLogprobs};
use crate::stepcost::StepFeatures;

/// One sequence's part of a step: compute positions `start .. start + num_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSeq {
    pub id: ReqId,
    /// Tokens whose KV is already computed.
    pub start: usize,
    pub num_tokens: usize,
    /// Whether this step reaches the end of the known tokens, so the executor samples one.
    pub samples: bool,
    /// The last `num_draft` of the `num_tokens` are draft tokens (speculative decoding) to be
    /// verified; they have KV slots but are not yet part of the output.
    pub num_draft: usize,
    /// Token ids at positions `start .. start + num_tokens`, drafts last. Empty for a simulated
    /// request, whose prompt is only a length.
    pub token_ids: Vec<u32>,
    /// The sequence's KV blocks in order: position `p` lives in block `block_table[p / block_size]`
    /// (shared with the block manager, not copied).
    pub block_table: Arc<Vec<u32>>,
    pub sampling: Arc<SamplingParams>,
    pub prompt_len: usize,
    /// Output tokens generated before this step (`min_tokens`, the simulator's true lengths).
    pub num_output: usize,
    /// The whole prompt and output so far, only when sampling reads them: penalties and prompt
    /// logprobs. Others do not pay for the copy.
    pub context: Option<Vec<u32>>,
    /// Structured output: for each row this step samples (the next token, then one after each
    /// draft), the tokens it may draw (bit `t % 32` of word `t / 32`, as `sample::mask_logits`
    /// reads it); empty when the sequence has no grammar.
    pub token_masks: Vec<Vec<u32>>,
}

impl ScheduledSeq {
    /// KV slot of every computed position, in order.
    pub fn slots(&self, block_size: usize) -> impl Iterator<Item = usize> + '_ {
        (self.start..self.start + self.num_tokens)
            .map(move |p| self.block_table[p / block_size] as usize * block_size + p % block_size)
    }

    /// The draft tokens this step verifies.
    pub fn drafts(&self) -> &[u32] {
        &self.token_ids[self.token_ids.len().saturating_sub(self.num_draft)..]
    }

    /// The prompt (from `context`), when it was carried.
    pub fn prompt(&self) -> Option<&[u32]> {
        self.context.as_deref().map(|c| &c[..self.prompt_len])
    }

    /// The output before this step (from `context`), when it was carried.
    pub fn output(&self) -> Option<&[u32]> {
        self.context.as_deref().map(|c| &c[self.prompt_len..])
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Copy-on-write block copies the executor performs before running the step.
    pub copies: Vec<BlockCopy>,
    /// Requests whose KV was freed this step, to be recomputed later.
    pub preempted: Vec<ReqId>,
    pub num_batched_tokens: usize,
}

impl StepPlan {
    /// What this step computes, in the cost model's terms.
    pub fn features(&self) -> StepFeatures {
        let mut f = StepFeatures::default();
        for s in &self.seqs {
            let (start, n) = (s.start as f64, s.num_tokens as f64);
            f.num_tokens += n;
            f.num_seqs += 1.0;
            f.context_tokens += start + n;
            f.attention_pairs += n * start + n * (n + 1.0) / 2.0;
        }
        f
    }
}

/// A running request about to decode, for a proposer to draft for.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftCandidate {
    pub id: ReqId,
    /// Prompt and output so far (empty for a simulated request).
    pub token_ids: Vec<u32>,
    pub prompt_len: usize,
    pub block_table: Arc<Vec<u32>>,
    pub sampling: Arc<SamplingParams>,
}

#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// One token for every scheduled sequence whose `samples` flag is set; a sequence that
    /// carried drafts gets its accepted drafts and then one more token, in order. A request's
    /// tokens stand together.
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
    /// Run one step: everything it needs is in the plan.
    fn execute(&mut self, plan: &StepPlan) -> Result<ExecOutput>;

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

    /// Speculative decoding: propose up to `k` draft tokens for each candidate. Requests left
    /// out, or given an empty draft, decode normally.
    fn propose(&mut self, _candidates: &[DraftCandidate], _k: usize) -> Result<Vec<(ReqId, Vec<u32>)>> {
        Ok(Vec::new())
    }
}
