//! The one place a request is checked: sampling values, stop rules, token ids, the context and
//! the KV pool. Front ends check only the shape of what they parse (pydantic, argument types).

use crate::error::{HoraeError, Result};
use crate::request::{Prompt, RequestSpec, StopCriteria};
use crate::sample::SamplingParams;
use crate::sched::check_fits;

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
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<i64>,
}

fn invalid(reason: String) -> HoraeError {
    HoraeError::InvalidRequest { id: 0, reason }
}

impl RequestParams {
    /// Check everything and build the engine's request. The message of every refusal names
    /// the field and the bound.
    pub fn into_spec(self, limits: &RequestLimits) -> Result<RequestSpec> {
        let vocab = limits.vocab_size as i64;
        let ctx = limits.max_model_len;
        if self.prompt_token_ids.is_empty() {
            return Err(invalid("the prompt is empty".into()));
        }
        if let Some(bad) = self.prompt_token_ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(invalid(format!("prompt token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        if let Some(bad) = self.stop_token_ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(invalid(format!("stop_token_ids: {bad} is outside the vocabulary (0..{vocab})")));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(invalid("stop strings must not be empty".into()));
        }
        let n = self.prompt_token_ids.len();
        if n >= ctx {
            return Err(invalid(format!(
                "this model's maximum context length is {ctx} tokens, but the prompt has {n} tokens"
            )));
        }
        let max_tokens = match self.max_tokens {
            None => ctx - n,
            Some(m) if m < 1 => return Err(invalid(format!("max_tokens must be at least 1, got {m}"))),
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        };
        // The context limit is refused, never silently capped (vLLM's rule for completions).
        if n.saturating_add(max_tokens) > ctx {
            return Err(invalid(format!(
                "this model's maximum context length is {ctx} tokens, but {} were requested ({n} in the prompt, {max_tokens} for the completion)",
                n.saturating_add(max_tokens)
            )));
        }
        if self.sampling.min_tokens > max_tokens {
            return Err(invalid(format!("min_tokens ({}) must not exceed max_tokens ({max_tokens})", self.sampling.min_tokens)));
        }
        self.sampling.validate().map_err(|e| invalid(e.to_string().trim_start_matches("invalid config: ").to_string()))?;
        check_fits(n, max_tokens, limits.pool_tokens).map_err(invalid)?;
        Ok(RequestSpec {
            prompt: Prompt::Tokens(self.prompt_token_ids.iter().map(|&t| t as u32).collect()),
            max_tokens,
            ignore_eos: self.ignore_eos,
            arrival: None,
            sampling: self.sampling,
            stop: StopCriteria { token_ids: self.stop_token_ids.iter().map(|&t| t as u32).collect(), strings: self.stop },
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
        assert!(refused(params(10, Some(50))).contains("KV pool"));
        let hot = SamplingParams { temperature: -1.0, ..Default::default() };
        assert!(refused(RequestParams { sampling: hot, ..params(4, Some(4)) }).contains("temperature"));
        let early = SamplingParams { min_tokens: 9, ..Default::default() };
        assert!(refused(RequestParams { sampling: early, ..params(4, Some(4)) }).contains("min_tokens"));
    }

    #[test]
    fn no_max_tokens_means_the_rest_of_the_context() {
        let spec = params(10, None).into_spec(&RequestLimits { pool_tokens: 1000, ..LIMITS }).unwrap();
        assert_eq!(spec.max_tokens, 54);
    }
}
