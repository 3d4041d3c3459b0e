//! A request as a caller writes it (`RequestParams`) and the one place it is checked:
//! `into_spec` refuses every bad value with the field named, then builds what the engine
//! queues (`RequestSpec`).

use super::{invalid_at, Prompt, RequestSpec, Slo, StopCriteria};
use crate::error::{HoraeError, Result};
use crate::grammar::{Compiler, Constraint};
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
    pub include_stop_str_in_output: bool,
    /// OpenAI's `logit_bias`: (token id, bias in [-100, 100]) added to that token's logit.
    pub logit_bias: Vec<(i64, f64)>,
    /// vLLM's `allowed_token_ids`: only these can be drawn (`None`: any).
    pub allowed_token_ids: Option<Vec<i64>>,
    /// vLLM's `bad_words`, each as the token sequences it is written as (the Python front
    /// tokenizes them, as it does a prompt).
    pub bad_words: Vec<Vec<i64>>,
    /// vLLM's `structured_outputs` (OpenAI's `response_format`): what the output must match.
    pub structured_outputs: Option<Constraint>,
    /// Where `structured_outputs` starts: after the output writes this text (a reasoning
    /// model's end of thinking, `</think>`); empty: from the first token.
    pub structured_outputs_after: String,
    pub slo: Slo,
    pub priority: i64,
    /// Seconds the request had already waited when it reached this engine (vLLM's
    /// `arrival_time`, relative: a router's resend, or a front end's own queue): its latency
    /// bounds and the queue deadline count from its first arrival, not from this one. 0 by default.
    pub waited: f64,
    /// vLLM's `cache_salt`: the prompt's cached blocks are shared only with prompts of the same
    /// salt (a non-empty string); `None`: with every unsalted prompt.
    pub cache_salt: Option<String>,
}

/// `ids` as token ids, each in the vocabulary; else a refusal naming `field`, its message
/// `"{what} {id} is outside the vocabulary (0..{vocab})"`.
fn in_vocab(ids: &[i64], vocab: i64, field: &'static str, what: &str) -> Result<Vec<u32>> {
    match ids.iter().find(|&&t| !(0..vocab).contains(&t)) {
        Some(bad) => Err(invalid_at(field, format!("{what} {bad} is outside the vocabulary (0..{vocab})"))),
        None => Ok(ids.iter().map(|&t| t as u32).collect()),
    }
}

/// A logit bias as OpenAI takes it: token ids in the vocabulary, each once, biases in
/// [-100, 100] (refused outside, never clamped), sorted by token.
fn checked_logit_bias(bias: &[(i64, f64)], vocab: i64) -> Result<Vec<(u32, f32)>> {
    let mut out = Vec::with_capacity(bias.len());
    for &(t, b) in bias {
        in_vocab(&[t], vocab, "logit_bias", "logit_bias: token id")?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(invalid_at(
                "logit_bias",
                format!("logit_bias: the bias of token {t} must be in [-100, 100], got {b}"),
            ));
        }
        out.push((t as u32, b as f32));
    }
    out.sort_unstable_by_key(|&(t, _)| t);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(invalid_at("logit_bias", format!("logit_bias: token id {} is given twice", w[0].0)));
    }
    Ok(out)
}

/// vLLM's `allowed_token_ids`: not empty (nothing could be drawn), each in the vocabulary;
/// sorted, repeats dropped.
fn checked_allowed(ids: &[i64], vocab: i64) -> Result<Vec<u32>> {
    if ids.is_empty() {
        return Err(invalid_at("allowed_token_ids", "allowed_token_ids must not be empty".into()));
    }
    let mut out = in_vocab(ids, vocab, "allowed_token_ids", "allowed_token_ids:")?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Bad words' token sequences, each non-empty and in the vocabulary (repeats dropped).
fn checked_bad_words(words: &[Vec<i64>], vocab: i64) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = Vec::with_capacity(words.len());
    for w in words {
        if w.is_empty() {
            return Err(invalid_at("bad_words", "bad_words must not be empty strings".into()));
        }
        let w = in_vocab(w, vocab, "bad_words", "bad_words: token")?;
        if !out.contains(&w) {
            out.push(w);
        }
    }
    Ok(out)
}

impl RequestParams {
    /// Check everything and build the engine's request. The message of every refusal names
    /// the field and the bound. `grammars` compiles structured output for the model's
    /// vocabulary (`None` where there is none: such requests are refused).
    pub fn into_spec(self, limits: &RequestLimits, grammars: Option<&Compiler>) -> Result<RequestSpec> {
        let vocab = limits.vocab_size as i64;
        let ctx = limits.max_model_len;
        if self.prompt_token_ids.is_empty() {
            return Err(invalid_at("prompt", "the prompt is empty".into()));
        }
        let prompt = in_vocab(&self.prompt_token_ids, vocab, "prompt", "prompt token id")?;
        let stop_token_ids = in_vocab(&self.stop_token_ids, vocab, "stop_token_ids", "stop_token_ids:")?;
        let logit_bias = checked_logit_bias(&self.logit_bias, vocab)?;
        let allowed_token_ids = self.allowed_token_ids.as_deref().map(|a| checked_allowed(a, vocab)).transpose()?;
        let bad_words = checked_bad_words(&self.bad_words, vocab)?;
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
        sampling.logit_bias = logit_bias;
        sampling.allowed_token_ids = allowed_token_ids;
        sampling.bad_words = bad_words;
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
        self.slo.validate()?;
        if !(self.waited.is_finite() && self.waited >= 0.0) {
            return Err(invalid_at(
                "waited",
                format!("waited must be a finite number of seconds >= 0, got {}", self.waited),
            ));
        }
        let grammar = match (&self.structured_outputs, grammars) {
            (None, _) => None,
            (Some(c), Some(g)) => Some(g.compile(c)?.starting_after(&self.structured_outputs_after)),
            (Some(_), None) => {
                return Err(invalid_at(
                    "structured_outputs",
                    "structured output needs the model's tokenizer, and this engine has none".into(),
                ))
            }
        };
        if !sampling.detokenize && !self.stop.is_empty() {
            return Err(invalid_at(
                "stop",
                "stop strings are read in the text: they need detokenize (or use stop_token_ids)".into(),
            ));
        }
        if self.cache_salt.as_deref() == Some("") {
            return Err(invalid_at("cache_salt", "cache_salt must not be empty".into()));
        }
        if sampling.min_tokens > max_tokens {
            return Err(invalid_at(
                "min_tokens",
                format!("min_tokens ({}) must not exceed max_tokens ({max_tokens})", sampling.min_tokens),
            ));
        }
        Ok(RequestSpec {
            prompt: Prompt::Tokens(prompt),
            max_tokens,
            ignore_eos: self.ignore_eos,
            arrival: None,
            sampling,
            stop: StopCriteria {
                token_ids: stop_token_ids,
                strings: self.stop,
                include_in_output: self.include_stop_str_in_output,
            },
            slo: self.slo,
            priority: self.priority,
            grammar,
            cache_salt: self.cache_salt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HoraeError;
    use crate::request::Slo;
    const LIMITS: RequestLimits = RequestLimits { vocab_size: 100, max_model_len: 64, pool_tokens: 48 };

    fn params(prompt: usize, max_tokens: Option<i64>) -> RequestParams {
        RequestParams { prompt_token_ids: vec![5; prompt], max_tokens, ..Default::default() }
    }

    fn refused(p: RequestParams) -> String {
        p.into_spec(&LIMITS, None).unwrap_err().to_string()
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
        let zero = Slo { ttft: Some(0.0), ..Default::default() };
        assert!(refused(RequestParams { slo: zero, ..params(4, Some(4)) }).contains("slo.ttft must be a positive"));
        assert!(Slo::default().set("deadline", 1.0).unwrap_err().to_string().contains("unknown slo key"));
        for (bias, what) in [
            (vec![(100, 1.0)], "token id 100 is outside the vocabulary"),
            (vec![(-1, 1.0)], "token id -1 is outside"),
            (vec![(3, 100.5)], "must be in [-100, 100], got 100.5"),
            (vec![(3, f64::NAN)], "must be in [-100, 100]"),
            (vec![(3, 1.0), (2, 0.0), (3, -1.0)], "token id 3 is given twice"),
        ] {
            let e = p_err(RequestParams { logit_bias: bias, ..params(4, Some(4)) });
            assert!(matches!(e, HoraeError::BadRequest { param: Some("logit_bias"), .. }), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        for (ids, what) in [(vec![], "must not be empty"), (vec![3, 100], "100 is outside the vocabulary")] {
            let e = p_err(RequestParams { allowed_token_ids: Some(ids), ..params(4, Some(4)) });
            assert!(matches!(e, HoraeError::BadRequest { param: Some("allowed_token_ids"), .. }), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let spec =
            RequestParams { allowed_token_ids: Some(vec![9, 2, 9]), ..params(4, Some(4)) }.into_spec(&LIMITS, None);
        assert_eq!(spec.unwrap().sampling.allowed_token_ids, Some(vec![2, 9]));
        for (words, what) in
            [(vec![vec![]], "must not be empty"), (vec![vec![3], vec![1, 100]], "token 100 is outside")]
        {
            let e = p_err(RequestParams { bad_words: words, ..params(4, Some(4)) });
            assert!(matches!(e, HoraeError::BadRequest { param: Some("bad_words"), .. }), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let words = vec![vec![5, 6], vec![7], vec![5, 6]];
        let spec = RequestParams { bad_words: words, ..params(4, Some(4)) }.into_spec(&LIMITS, None).unwrap();
        assert_eq!(spec.sampling.bad_words, vec![vec![5, 6], vec![7]]);
        let quiet = SamplingParams { detokenize: false, ..Default::default() };
        let e = p_err(RequestParams { sampling: quiet, stop: vec!["x".into()], ..params(4, Some(4)) });
        assert!(matches!(e, HoraeError::BadRequest { param: Some("stop"), .. }), "{e}");
        let e = p_err(RequestParams { cache_salt: Some(String::new()), ..params(4, Some(4)) });
        assert!(matches!(e, HoraeError::BadRequest { param: Some("cache_salt"), .. }), "{e}");
    }

    fn p_err(p: RequestParams) -> HoraeError {
        p.into_spec(&LIMITS, None).unwrap_err()
    }

    #[test]
    fn a_logit_bias_reaches_sampling_sorted_by_token() {
        let bias = vec![(7, -100.0), (2, 5.5), (99, 100.0)];
        let spec = RequestParams { logit_bias: bias, ..params(4, Some(4)) }.into_spec(&LIMITS, None).unwrap();
        assert_eq!(spec.sampling.logit_bias, vec![(2, 5.5), (7, -100.0), (99, 100.0)]);
        assert!(spec.sampling.adjusts_logits() && !spec.sampling.has_penalties());
    }

    #[test]
    fn no_max_tokens_means_the_rest_of_the_context() {
        let spec = params(10, None).into_spec(&RequestLimits { pool_tokens: 1000, ..LIMITS }, None).unwrap();
        assert_eq!(spec.max_tokens, 54);
        // ... or of the pool, where that is smaller.
        assert_eq!(params(10, None).into_spec(&LIMITS, None).unwrap().max_tokens, 38);
    }
}
