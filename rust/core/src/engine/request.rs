//! A request's state as it moves through the engine: waiting -> running -> (preempted -> waiting
//! -> running ...) -> finished.

use crate::kv::hash::{synthetic_block_hashes, token_block_hashes};
use crate::kv::BlockHash;
use crate::sample::SamplingParams;

pub type ReqId = u64;

/// What the prompt is. Real requests carry token ids; simulated ones only a length and, where the
/// trace names them, the ids of shared prefix units (Mooncake's `hash_ids`).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Tokens(Vec<u32>),
    Synthetic { len: usize, prefix_ids: Vec<u64>, unit: usize },
}

impl Prompt {
    pub fn len(&self) -> usize {
        match self {
            Prompt::Tokens(t) => t.len(),
            Prompt::Synthetic { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chained hashes of the prompt's full blocks; `salt` keeps unnamed synthetic content unique.
    pub fn block_hashes(&self, block_size: usize, salt: u64) -> Vec<BlockHash> {
        match self {
            Prompt::Tokens(t) => token_block_hashes(t, block_size),
            Prompt::Synthetic { len, prefix_ids, unit } => {
                synthetic_block_hashes(*len, prefix_ids, (*unit).max(1), salt, block_size)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token.
    Stop,
    /// `max_tokens` reached.
    Length,
    Aborted,
    /// The executor failed on a step this request was in (a GPU fault, say).
    Error,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "abort",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    Waiting,
    Running,
    /// Back in the queue after its blocks were taken; it keeps its generated tokens and is
    /// recomputed when readmitted.
    Preempted,
    Finished(FinishReason),
}

/// What a caller hands to `Engine::add_request`.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    /// Arrival time on the engine's clock; `None` means now.
    pub arrival: Option<f64>,
    pub sampling: SamplingParams,
}

/// Timestamps on the engine's clock, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestTimes {
    pub arrival: f64,
    pub first_scheduled: Option<f64>,
    pub first_token: Option<f64>,
    pub last_token: Option<f64>,
    pub finished: Option<f64>,
    /// Largest gap between two consecutive output tokens (the paper's SLA bound).
    pub max_itl: f64,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: ReqId,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub sampling: SamplingParams,
    pub output: Vec<u32>,
    /// Tokens (prompt, then outputs) whose KV is computed.
    pub num_computed: usize,
    pub state: RequestState,
    pub prompt_block_hashes: Vec<BlockHash>,
    pub times: RequestTimes,
    pub preemptions: u32,
    /// Computed tokens thrown away by preemptions (to be computed again).
    pub recomputed_tokens: u64,
    /// Prompt tokens served from the prefix cache, summed over admissions.
    pub cached_tokens: u64,
    /// Per output token, when the request asked for logprobs.
    pub logprobs: Vec<crate::sample::TokenLogprobs>,
    /// Per prompt token after the first, when the request asked for prompt logprobs.
    pub prompt_logprobs: Vec<crate::sample::TokenLogprobs>,
    /// The admission policy's length predictions, kept between steps (see `SeqLoad::forecast`).
    pub forecast: [u32; crate::sched::MAX_SCENARIOS],
    /// Speculative decoding: the tokens proposed for the next step (not yet part of `output`).
    pub draft: Vec<u32>,
    /// Draft tokens verified for this request, and how many were accepted.
    pub spec_drafted: u64,
    pub spec_accepted: u64,
}

impl Request {
    pub fn new(id: ReqId, spec: RequestSpec, arrival: f64, block_size: usize) -> Self {
        let prompt_block_hashes = spec.prompt.block_hashes(block_size, id);
        Self {
            id,
            prompt: spec.prompt,
            max_tokens: spec.max_tokens,
            ignore_eos: spec.ignore_eos,
            sampling: spec.sampling,
            output: Vec::new(),
            num_computed: 0,
            state: RequestState::Waiting,
            prompt_block_hashes,
            times: RequestTimes { arrival, ..Default::default() },
            preemptions: 0,
            recomputed_tokens: 0,
            cached_tokens: 0,
            forecast: [0; crate::sched::MAX_SCENARIOS],
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            draft: Vec::new(),
            spec_drafted: 0,
            spec_accepted: 0,
        }
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }
    /// Prompt plus outputs so far: the tokens whose KV the request needs.
    pub fn total_len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }
    pub fn is_finished(&self) -> bool {
        matches!(self.state, RequestState::Finished(_))
    }
    pub fn finish_reason(&self) -> Option<FinishReason> {
        match self.state {
            RequestState::Finished(r) => Some(r),
            _ => None,
        }
    }

    /// Token at position `p` of the sequence (prompt, then outputs); `None` past the end or for a
    /// synthetic prompt.
    pub fn token_at(&self, p: usize) -> Option<u32> {
        match &self.prompt {
            Prompt::Tokens(t) if p < t.len() => Some(t[p]),
            Prompt::Tokens(t) => self.output.get(p - t.len()).copied(),
            Prompt::Synthetic { .. } => None,
        }
    }

    /// Record one sampled token at time `now`.
    pub fn push_token(&mut self, token: u32, now: f64) {
        if let Some(last) = self.times.last_token {
            self.times.max_itl = self.times.max_itl.max(now - last);
        }
        self.times.first_token.get_or_insert(now);
        self.times.last_token = Some(now);
        self.output.push(token);
    }
}
