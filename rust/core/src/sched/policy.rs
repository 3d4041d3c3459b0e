//! The admission seam: the one decision on which the four schedulers differ. Everything else
//! (continuous batching, chunked prefill, preemption) is shared in [`super::Scheduler`].

use crate::request::ReqId;
pub use crate::request::MAX_SCENARIOS;

/// What a policy may know about a request: never its true output length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLoad {
    pub id: ReqId,
    pub prompt_len: usize,
    /// Output tokens generated so far (non-zero for a preempted request coming back).
    pub generated: usize,
    pub max_tokens: usize,
    /// The policy's predicted final output lengths, one per scenario (0 = none yet). The
    /// scheduler stores them with the request between steps, so a prediction is drawn once and
    /// kept while it is still possible (longer than what was generated), instead of re-drawing the
    /// whole batch every step.
    pub forecast: [u32; MAX_SCENARIOS],
}

impl SeqLoad {
    /// KV tokens the request holds once its prompt and outputs so far are computed.
    pub fn held(&self) -> usize {
        self.prompt_len + self.generated
    }
}

/// The KV pool as the policy sees it, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolView {
    pub block_size: usize,
    pub total_blocks: usize,
    pub used_blocks: usize,
}

impl PoolView {
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks * self.block_size
    }
}

pub trait AdmissionPolicy: Send {
    fn name(&self) -> &'static str;

    /// Called once per step before the first candidate, with the running batch.
    fn begin_step(&mut self, running: &mut [SeqLoad], pool: &PoolView);

    /// Admit `candidate`, whose prompt needs `new_blocks` fresh blocks (after prefix-cache hits)?
    /// `true` is final: the candidate joins the batch that later candidates are judged against.
    fn admit(&mut self, candidate: &mut SeqLoad, new_blocks: usize, pool: &PoolView) -> bool;

    /// A request finished normally (stop or length) with this many output tokens.
    fn record_finished(&mut self, _output_len: usize) {}

    /// The policy's predicted peak KV use of the running batch, in tokens, where it has one.
    fn predicted_peak(&self) -> Option<u64> {
        None
    }
}
