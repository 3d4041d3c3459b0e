//! The one place a request is checked: sampling values, stop rules, token ids, the context and
//! the KV pool. Front ends check only the shape of what they parse (pydantic, argument types).

use crate::error::{HoraeError, Result};
use crate::request::{Prompt, RequestSpec, StopCriteria};
use crate::sample::SamplingParams;

/// What the engine can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub vocab_size: usize,
    /// The model's context (prompt + output).
    pub max_model_len: usize,
    /// Tokens the KV pool holds: prompt + max_tokens beyond it could never run.
    pub pool_tokens: usize,
}

/// A request as a caller writes it, before any check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestParams {
    pub prompt_token_ids: Vec<i64>,
    /// `None`: up to the end of the context (vLLM's default for chat).
    pub max_tokens: Option<i64>,
    /// Sampling; its integer fields are taken from the checked ones below.
    pub sampling: SamplingParams,
    /// 0 or -1 (vLLM's spelling): off.
    pub top_k: i64,
    pub seed: Option<i64>,
    pub min_tokens: i64,
    pub logprobs: Option<i64>,
    pub prompt_logprobs: Option<i64>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<i64>,
}

/// A refusal of `param`'s value.
fn invalid_at(param: &'static str, message: String) -> HoraeError {
    HoraeError::BadRequest { param: Some(param), message }
}

impl RequestParams {
    /// Check everything and build the engine's request. The message of every refusal names
    /// the field and the bound.
    pub fn into_spec(self, limits: &RequestLimits) -> Result<RequestSpec> {
        let vocab = limits.vocab_size as i64;
        let ctx = limits.max_model_len;
        if self.prompt_token_ids.is_empty() {
            return Err(invalid_at("prompt", "the prompt is empty".into()));
        }
        if let Some(bad) = self.prompt_token_ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(invalid_at("prompt", format!("prompt token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        if let Some(bad) = self.stop_token_ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(invalid_at(
                "stop_token_ids",
                format!("stop_token_ids: {bad} is outside the vocabulary (0..{vocab})"),
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(invalid_at("stop", "stop strings must not be empty".into()));
        }
        let n = self.prompt_token_ids.len();
        // What one request may hold: the context, or the KV pool where that is smaller (a request
        // larger than the whole pool could never run). Refused, never silently capped.
        let limit = ctx.min(limits.pool_tokens);
        let pool_note = if limits.pool_tokens < ctx {
            format!(" (the KV pool holds {} tokens)", limits.pool_tokens)
        } else {
            String::new()
        };
        if n >= limit {
            return Err(invalid_at(
                "prompt",
                format!(
                    "this model's maximum context length is {limit} tokens{pool_note}, but the prompt has {n} tokens"
                ),
            ));
        }
        let max_tokens = match self.max_tokens {
            // Up to the end of the context.
            None => limit - n,
            Some(m) if m < 1 => {
                return Err(invalid_at("max_tokens", format!("max_tokens must be at least 1, got {m}")))
            }
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        };
        if n.saturating_add(max_tokens) > limit {
            return Err(invalid_at("max_tokens", format!(
                "this model's maximum context length is {limit} tokens{pool_note}, but {} were requested ({n} in the prompt, {max_tokens} for the completion)",
                n.saturating_add(max_tokens)
            )));
        }
        let mut sampling = self.sampling;
        sampling.top_k = match self.top_k {
            -1 | 0 => 0,
            k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            k => return Err(invalid_at("top_k", format!("top_k must be >= 0 (0 or -1 = off), got {k}"))),
        };
        let non_negative = |name: &'static str, v: i64| {
            usize::try_from(v).map_err(|_| invalid_at(name, format!("{name} must be a non-negative integer, got {v}")))
        };
        sampling.seed = self.seed.map(|s| non_negative("seed", s).map(|s| s as u64)).transpose()?;
        sampling.min_tokens = non_negative("min_tokens", self.min_tokens)?;
        sampling.logprobs = self.logprobs.map(|k| non_negative("logprobs", k)).transpose()?;
        sampling.prompt_logprobs = self.prompt_logprobs.map(|k| non_negative("prompt_logprobs", k)).transpose()?;
        sampling.validate().map_err(|e| match e {
            HoraeError::InvalidConfig(m) => invalid_at(SamplingParams::field_of(&m), m),
            e => e,
        })?;
        if sampling.min_tokens > max_tokens {
            return Err(invalid_at(
                "min_tokens",
                format!("min_tokens ({}) must not exceed max_tokens ({max_tokens})", sampling.min_tokens),
            ));
        }
        Ok(RequestSpec {
            prompt: Prompt::Tokens(self.prompt_token_ids.iter().map(|&t| t as u32).collect()),
            max_tokens,
            ignore_eos: self.ignore_eos,
            arrival: None,
            sampling,
            stop: StopCriteria {
                token_ids: self.stop_token_ids.iter().map(|&t| t as u32).collect(),
                strings: self.stop,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits { vocab_size: 100, max_model_len: 64, pool_tokens: 48 };

    fn params(prompt: usize, max_tokens: Option<i64>) -> RequestParams {
        RequestParams { prompt_token_ids: vec![5; prompt], max_tokens, ..Default::default() }
    }

    fn refused(p: RequestParams) -> String {
        p.into_spec(&LIMITS).unwrap_err().to_string()
    }

    #[test]
    fn every_bound_is_refused_with_its_name() {
        assert!(refused(params(0, Some(4))).contains("empty"));
        assert!(refused(RequestParams { prompt_token_ids: vec![100], ..params(1, Some(4)) }).contains("vocabulary"));
        assert!(refused(RequestParams { stop_token_ids: vec![-1], ..params(1, Some(4)) }).contains("stop_token_ids"));
        assert!(refused(params(64, Some(1))).contains("maximum context length"));
        // Over the context: refused, not capped.
        assert!(refused(params(10, Some(60))).contains("maximum context length"));
        assert!(refused(params(10, Some(0))).contains("max_tokens"));
        // Inside the context but over the pool.
        assert!(refused(params(10, Some(50))).contains("the KV pool holds 48 tokens"));
        let hot = SamplingParams { temperature: -1.0, ..Default::default() };
        assert!(refused(RequestParams { sampling: hot, ..params(4, Some(4)) }).contains("temperature"));
        assert!(refused(RequestParams { min_tokens: 9, ..params(4, Some(4)) }).contains("min_tokens"));
        assert!(refused(RequestParams { seed: Some(-1), ..params(4, Some(4)) }).contains("seed"));
        assert!(refused(RequestParams { top_k: -3, ..params(4, Some(4)) }).contains("top_k"));
        assert!(refused(RequestParams { logprobs: Some(21), ..params(4, Some(4)) }).contains("logprobs"));
    }

    #[test]
    fn no_max_tokens_means_the_rest_of_the_context() {
        let spec = params(10, None).into_spec(&RequestLimits { pool_tokens: 1000, ..LIMITS }).unwrap();
        assert_eq!(spec.max_tokens, 54);
        // ... or of the pool, where that is smaller.
        assert_eq!(params(10, None).into_spec(&LIMITS).unwrap().max_tokens, 38);
    }
}
