//! A request's changes to its logits before they are sampled: allowed tokens, logit bias, bad
//! words, penalties, and structured output's mask.

use super::SamplingParams;

/// What a request asks of its logits before they are sampled, in place: every token but the
/// allowed ones masked out, the logit bias, the bad words' next tokens banned, then repetition,
/// presence and frequency penalties (vLLM's order: its allowed-tokens mask, logit-bias and
/// bad-words processors run before the penalties).
/// Logprobs are reported from the logits before this, as vLLM's raw logprobs are.
pub fn adjust_logits(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    if let Some(allowed) = &p.allowed_token_ids {
        // Sorted: one walk through the row.
        let mut next = allowed.iter().peekable();
        for (t, l) in logits.iter_mut().enumerate() {
            if next.peek().is_some_and(|&&a| a as usize == t) {
                next.next();
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for &(t, b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    for word in &p.bad_words {
        let (last, before) = word.split_last().expect("bad words are not empty (checked when the request is added)");
        if output.ends_with(before) {
            if let Some(l) = logits.get_mut(*last as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(output) {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                let l = &mut logits[t];
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
}

/// Structured output's mask applied to a row: a token whose bit is not set in `mask` (bit
/// `t % 32` of word `t / 32`) cannot be drawn.
pub fn mask_logits(logits: &mut [f32], mask: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = mask.get(w).copied().unwrap_or(0);
        // Most words of a loose mask (free text) allow all 32: nothing to write.
        if bits != u32::MAX {
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits >> b & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}
