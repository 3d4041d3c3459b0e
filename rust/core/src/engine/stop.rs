//! When a request ends (vLLM keeps `check_stop` in its core too): end-of-sequence, a stop token id,
//! `max_tokens`, and stop strings in the streamed text. Stop rules other than the length bound
//! wait for `min_tokens` (the executor also masks end-of-sequence until then).

use crate::request::{FinishReason, Request, StopReason};

/// After `token` was appended to `r.output`: does the request end there, and why?
pub fn check_stop(r: &Request, token: u32, eos: &[u32]) -> Option<(FinishReason, Option<StopReason>)> {
    let early = r.output.len() <= r.sampling.min_tokens;
    if !early && !r.ignore_eos && eos.contains(&token) {
        return Some((FinishReason::Stop, None));
    }
    if !early && r.stop.token_ids.contains(&token) {
        return Some((FinishReason::Stop, Some(StopReason::Token(token))));
    }
    if r.output.len() >= r.max_tokens {
        return Some((FinishReason::Length, None));
    }
    None
}

/// The first stop string in `text` that ends after byte `before` (text already searched cannot
/// hold one that ends there, but one may start in it): its byte offset and the string.
pub fn find_stop_string(text: &str, before: usize, stops: &[String]) -> Option<(usize, String)> {
    let longest = stops.iter().map(|s| s.len()).max()?;
    let mut from = before.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s.clone()))).min_by_key(|(i, _)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_earliest_stop_string_across_the_boundary() {
        let stops = vec!["Paris".to_string(), "is".to_string()];
        // "Paris" starts in text searched before and ends in the new part.
        assert_eq!(find_stop_string("The capital: Paris.", 15, &stops), Some((13, "Paris".into())));
        assert_eq!(find_stop_string("This is", 0, &stops), Some((2, "is".into())));
        assert_eq!(find_stop_string("nothing", 0, &stops), None);
        // Multi-byte text: the search never starts inside a character.
        assert_eq!(find_stop_string("é é Paris", 4, &stops), Some((6, "Paris".into())));
    }
}
