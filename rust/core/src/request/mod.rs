//! One request's whole state, kept here and nowhere else: its prompt, sampling and stop rules,
//! generated tokens, streamed text, logprobs, timestamps and scheduling counters. It moves
//! waiting -> running -> (preempted -> waiting -> running ...) -> finished. A leaf of the core:
//! schedulers, executors and the engine read it; it imports none of them.

use std::sync::Arc;

use crate::error::{HoraeError, Result};
use crate::grammar::Grammar;
use crate::kv::hash::{synthetic_block_hashes, token_block_hashes};
use crate::kv::BlockHash;
use crate::sample::{SamplingParams, TokenLogprobs};
use crate::tokenizer::IncrementalDetokenizer;

mod params;
pub use params::{RequestLimits, RequestParams};

pub type ReqId = u64;

/// Most Monte-Carlo scenarios an admission policy keeps per request (see `forecast`).
pub const MAX_SCENARIOS: usize = 16;

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

    /// Chained hashes of the prompt's full blocks; `salt` keeps unnamed synthetic content unique,
    /// `cache_salt` (vLLM's) keeps a tenant's blocks to prompts of the same salt.
    pub fn block_hashes(&self, block_size: usize, salt: u64, cache_salt: Option<&str>) -> Vec<BlockHash> {
        match self {
            Prompt::Tokens(t) => token_block_hashes(t, block_size, cache_salt),
            Prompt::Synthetic { len, prefix_ids, unit } => {
                synthetic_block_hashes(*len, prefix_ids, (*unit).max(1), salt, block_size)
            }
        }
    }
}

/// Why a request ended. The core decides every one of them, so the length history can tell the
/// ends that measure the workload from the ends the server caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The client cancelled it.
    Aborted,
    /// The executor failed on a step this request was in (a GPU fault, say), or the engine refused
    /// it after it was queued.
    Error,
    /// Still waiting, never started, when the queue deadline passed (`ServerRules::queue_timeout`):
    /// dropped before it cost any compute.
    Timeout,
    /// Running, but no token for longer than `ServerRules::max_itl_abort`: cut, blocks freed.
    SlaAbort,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "abort",
            FinishReason::Error => "error",
            FinishReason::Timeout => "timeout",
            FinishReason::SlaAbort => "sla_abort",
        }
    }

    /// Whether the end says how long the client wanted the output: a natural stop, the length
    /// bound, or a client that hung up after reading some tokens (`generated > 0`). Ends the
    /// server caused (an error, a queue time-out, an SLA abort) say nothing about the workload.
    pub fn measures_length(&self, generated: usize) -> bool {
        match self {
            FinishReason::Stop | FinishReason::Length => true,
            FinishReason::Aborted => generated > 0,
            FinishReason::Error | FinishReason::Timeout | FinishReason::SlaAbort => false,
        }
    }
}

/// What stopped a request with `FinishReason::Stop`, when it was not end-of-sequence (OpenAI's and
/// vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// The caller's stop rules, besides end-of-sequence and `max_tokens`. They wait for `min_tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopCriteria {
    /// Token ids that end the output; the token stays in the output, its text does not (vLLM).
    pub token_ids: Vec<u32>,
    /// Strings that end the output; the text is cut before the first one found.
    pub strings: Vec<String>,
    /// vLLM's `include_stop_str_in_output`: the text keeps the stop string, or the stop token's
    /// text, that ended it (cut after it instead of before).
    pub include_in_output: bool,
}

impl StopCriteria {
    /// Characters of text held back from streaming, so that a stop string that arrives across
    /// several steps is never half sent (vLLM's stop buffer).
    pub fn holdback(&self) -> usize {
        self.strings.iter().map(|s| s.len()).max().map_or(0, |n| n - 1)
    }

    /// The first stop string in `text` that ends after byte `before` (text already searched cannot
    /// hold one that ends there, but one may start in it): its byte offset and the string.
    pub fn find_string(&self, text: &str, before: usize) -> Option<(usize, String)> {
        let longest = self.strings.iter().map(|s| s.len()).max()?;
        let mut from = before.saturating_sub(longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.strings
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s.clone())))
            .min_by_key(|(i, _)| *i)
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

/// A request's latency bounds, in seconds (`None`: unbounded). It counts towards goodput only
/// if it meets all of them; `queue = "slo"` schedules by them. The server's defaults fill what a
/// request leaves out (`Slo::or`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Slo {
    /// To the first token, from arrival.
    pub ttft: Option<f64>,
    /// Mean time per output token after the first.
    pub tpot: Option<f64>,
    /// Largest gap between two consecutive tokens (the Past-Future paper's bound).
    pub max_itl: Option<f64>,
    /// From arrival to the last token.
    pub e2e: Option<f64>,
}

impl Slo {
    pub const KEYS: [&'static str; 4] = ["ttft", "tpot", "max_itl", "e2e"];

    /// The Past-Future paper's SLA for a 7B-class model: TTFT <= 10 s, no gap over 1.5 s.
    pub fn paper() -> Self {
        Slo { ttft: Some(10.0), max_itl: Some(1.5), ..Default::default() }
    }

    /// Each bound set here, else `default`'s.
    pub fn or(self, default: &Slo) -> Slo {
        Slo {
            ttft: self.ttft.or(default.ttft),
            tpot: self.tpot.or(default.tpot),
            max_itl: self.max_itl.or(default.max_itl),
            e2e: self.e2e.or(default.e2e),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Slo::default()
    }

    /// Every bound must be a positive, finite number of seconds.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in Self::KEYS.iter().zip([self.ttft, self.tpot, self.max_itl, self.e2e]) {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(invalid_at("slo", format!("slo.{key} must be a positive number of seconds, got {v}")));
                }
            }
        }
        Ok(())
    }

    /// From `(key, seconds)` pairs (a JSON object, a Python dict), each checked.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, f64)>) -> Result<Slo> {
        let mut slo = Slo::default();
        for (k, v) in pairs {
            slo.set(k, v)?;
        }
        slo.validate()?;
        Ok(slo)
    }

    /// Set bound `key` (one of [`Slo::KEYS`]); an unknown key is refused with the known ones.
    pub fn set(&mut self, key: &str, v: f64) -> Result<()> {
        let slot = match key {
            "ttft" => &mut self.ttft,
            "tpot" => &mut self.tpot,
            "max_itl" => &mut self.max_itl,
            "e2e" => &mut self.e2e,
            other => {
                return Err(invalid_at("slo", format!("unknown slo key {other:?}: expected {}", Self::KEYS.join(", "))))
            }
        };
        *slot = Some(v);
        Ok(())
    }
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
    pub stop: StopCriteria,
    /// The request's own latency bounds (the server's defaults fill the rest).
    pub slo: Slo,
    /// vLLM's `priority`: lower is served first (0 by default).
    pub priority: i64,
    /// Structured output: where the output is in the language it must stay in.
    pub grammar: Option<Grammar>,
    /// vLLM's `cache_salt`: the prompt's cached blocks are shared only with the same salt's.
    pub cache_salt: Option<String>,
}

/// A refusal of `param`'s value.
pub(crate) fn invalid_at(param: &'static str, message: String) -> HoraeError {
    HoraeError::BadRequest { param: Some(param), message }
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
    /// Shared with every step plan that schedules the request.
    pub sampling: Arc<SamplingParams>,
    pub stop: StopCriteria,
    /// Its latency bounds, the server's defaults filled in (`Scheduler::add`).
    pub slo: Slo,
    /// Lower is served first.
    pub priority: i64,
    pub output: Vec<u32>,
    /// Streams `output` as text; `None` where the engine has no tokenizer (the simulator).
    pub detok: Option<IncrementalDetokenizer>,
    /// Bytes of the detokenizer's text already handed out in step outputs.
    pub text_sent: usize,
    /// Why it finished with `FinishReason::Stop`, when not end-of-sequence.
    pub stop_reason: Option<StopReason>,
    /// Output tokens the caller sees: all of `output` but an end-of-sequence token that ended it
    /// (OpenAI returns neither its text nor its logprob, nor counts it).
    pub num_visible: usize,
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
    /// Those of its first admission (vLLM's `num_cached_tokens`, which callers are told).
    pub first_cached_tokens: u64,
    /// Per output token, when the request asked for logprobs.
    pub logprobs: Vec<TokenLogprobs>,
    /// Per prompt token after the first, when the request asked for prompt logprobs.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    /// The admission policy's length predictions, kept between steps (see `sched::SeqLoad`).
    pub forecast: [u32; MAX_SCENARIOS],
    /// Speculative decoding: the tokens proposed for the next step (not yet part of `output`).
    pub draft: Vec<u32>,
    /// Draft tokens verified for this request, and how many were accepted.
    pub spec_drafted: u64,
    pub spec_accepted: u64,
    /// Structured output: the language the output must stay in, moved on by each token
    /// (`push_token`); the scheduler puts its mask in the plan of each step that samples.
    pub grammar: Option<Grammar>,
}

impl Request {
    pub fn new(id: ReqId, spec: RequestSpec, arrival: f64, block_size: usize) -> Self {
        let prompt_block_hashes = spec.prompt.block_hashes(block_size, id, spec.cache_salt.as_deref());
        Self {
            id,
            prompt: spec.prompt,
            max_tokens: spec.max_tokens,
            ignore_eos: spec.ignore_eos,
            sampling: Arc::new(spec.sampling),
            stop: spec.stop,
            slo: spec.slo,
            priority: spec.priority,
            grammar: spec.grammar,
            output: Vec::new(),
            detok: None,
            text_sent: 0,
            stop_reason: None,
            num_visible: 0,
            num_computed: 0,
            state: RequestState::Waiting,
            prompt_block_hashes,
            times: RequestTimes { arrival, ..Default::default() },
            preemptions: 0,
            recomputed_tokens: 0,
            cached_tokens: 0,
            first_cached_tokens: 0,
            forecast: [0; MAX_SCENARIOS],
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

    /// Prompt and output so far (empty for a synthetic prompt).
    pub fn all_token_ids(&self) -> Vec<u32> {
        match &self.prompt {
            Prompt::Tokens(t) => t.iter().chain(&self.output).copied().collect(),
            Prompt::Synthetic { .. } => Vec::new(),
        }
    }

    /// The streamed text so far (empty without a detokenizer).
    pub fn text(&self) -> &str {
        self.detok.as_ref().map_or("", |d| d.text.as_str())
    }

    /// After `token` was appended to `output`: does the request end there, and why? (vLLM keeps
    /// `check_stop` in its core too.) End-of-sequence and stop token ids wait for `min_tokens`
    /// (the executor also masks end-of-sequence until then); the length bound does not. Stop
    /// strings are found in the streamed text (`StopCriteria::find_string`).
    pub fn check_stop(&self, token: u32, eos: &[u32]) -> Option<(FinishReason, Option<StopReason>)> {
        let early = self.output.len() <= self.sampling.min_tokens;
        if !early && !self.ignore_eos && eos.contains(&token) {
            return Some((FinishReason::Stop, None));
        }
        if !early && self.stop.token_ids.contains(&token) {
            return Some((FinishReason::Stop, Some(StopReason::Token(token))));
        }
        if eos.contains(&token) && self.grammar.as_ref().is_some_and(|g| g.is_done()) {
            // The structured output is complete: its grammar took end-of-sequence where its
            // language may end, and nothing can follow it, even with `ignore_eos`.
            return Some((FinishReason::Stop, None));
        }
        if self.output.len() >= self.max_tokens {
            return Some((FinishReason::Length, None));
        }
        None
    }

    /// Record one sampled token at time `now`.
    pub fn push_token(&mut self, token: u32, now: f64) {
        if let Some(last) = self.times.last_token {
            self.times.max_itl = self.times.max_itl.max(now - last);
        }
        self.times.first_token.get_or_insert(now);
        self.times.last_token = Some(now);
        self.output.push(token);
        if let Some(g) = &mut self.grammar {
            g.accept(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ends_that_measure_the_workload_feed_the_length_history() {
        assert!(FinishReason::Stop.measures_length(0) && FinishReason::Length.measures_length(7));
        // A client that hung up after reading some tokens wanted that many; before any, nothing.
        assert!(FinishReason::Aborted.measures_length(3) && !FinishReason::Aborted.measures_length(0));
        assert!(!FinishReason::Error.measures_length(12));
        assert!(!FinishReason::Timeout.measures_length(0) && !FinishReason::SlaAbort.measures_length(40));
    }

    #[test]
    fn finds_the_earliest_stop_string_across_the_boundary() {
        let stops = StopCriteria { strings: vec!["Paris".to_string(), "is".to_string()], ..Default::default() };
        // "Paris" starts in text searched before and ends in the new part.
        assert_eq!(stops.find_string("The capital: Paris.", 15), Some((13, "Paris".into())));
        assert_eq!(stops.find_string("This is", 0), Some((2, "is".into())));
        assert_eq!(stops.find_string("nothing", 0), None);
        // Multi-byte text: the search never starts inside a character.
        assert_eq!(stops.find_string("é é Paris", 4), Some((6, "Paris".into())));
    }
}
