//! What a request asks of sampling (vLLM's `SamplingParams`), and the checks its values pass.

use crate::error::{HoraeError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// HF/vLLM style, over prompt and output tokens; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI style, over output tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Per-request seed: the same seed gives the same tokens.
    pub seed: Option<u64>,
    /// Report log-probabilities with this many top alternatives (None = no logprobs).
    pub logprobs: Option<usize>,
    /// End-of-sequence is masked out until this many tokens are generated.
    pub min_tokens: usize,
    /// Report each prompt token's log-probability (and this many alternatives). Such a request
    /// does not read the prefix cache, since cached positions have no logits.
    pub prompt_logprobs: Option<usize>,
    /// OpenAI's `logit_bias`: added to these tokens' logits before anything else reads them
    /// (sorted by token, each once; the request's checks put them in the vocabulary).
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `allowed_token_ids`: only these tokens can be drawn (sorted, each once; `None`:
    /// any).
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's `bad_words`, as token sequences (each word's tokenizations; none empty): the last
    /// token of each cannot be drawn where the output so far ends with the ones before it.
    pub bad_words: Vec<Vec<u32>>,
    /// vLLM's `skip_special_tokens`: the output's text leaves out special tokens' text (true by
    /// default). Here, beside sampling, because vLLM's `SamplingParams` carries it.
    pub skip_special_tokens: bool,
    /// vLLM's `detokenize`: false leaves the output's text empty (token ids only, as an RL
    /// rollout or a scorer wants them); stop strings then cannot be read.
    pub detokenize: bool,
}

impl Default for SamplingParams {
    /// Temperature 1, as OpenAI and vLLM default to.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            min_tokens: 0,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            skip_special_tokens: true,
            detokenize: true,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HoraeError::InvalidConfig(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        for (name, v) in [("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)] {
            if v.is_some_and(|k| k > 20) {
                return bad(format!("{name} must be at most 20, got {}", v.unwrap_or(0)));
            }
        }
        Ok(())
    }

    /// The field a `validate` message is about (its first word), for errors that name it.
    pub fn field_of(message: &str) -> &'static str {
        const FIELDS: [&str; 9] = [
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "prompt_logprobs",
            "logprobs",
            "top_k",
        ];
        FIELDS.iter().find(|f| message.starts_with(*f)).copied().unwrap_or("sampling")
    }

    /// Greedy decoding, everything else default.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Default::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether sampling reads the prompt and output so far (repetition, presence or frequency
    /// penalties).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Whether `adjust_logits` changes anything: the raw logits are not what is sampled.
    pub fn adjusts_logits(&self) -> bool {
        self.reads_output() || !self.logit_bias.is_empty() || self.allowed_token_ids.is_some()
    }

    /// Whether `adjust_logits` reads the tokens so far (the plan then carries them).
    pub fn reads_output(&self) -> bool {
        self.has_penalties() || !self.bad_words.is_empty()
    }
}
