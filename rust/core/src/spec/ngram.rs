//! Prompt-lookup proposals (model-free): match the sequence's last tokens against everything
//! before them and propose what followed the match. Good on edits, code and quoting, where the
//! output repeats the prompt; it proposes nothing when the suffix never occurred before.

/// Up to `k` tokens that followed an earlier occurrence of the last `n` tokens of `tokens`, for
/// the longest `n` in `min_n..=max_n` that occurs. The latest occurrence whose continuation
/// holds `k` tokens wins (the most recent context is the likeliest to repeat; in periodic text
/// the very latest one runs into the end after less than a period); failing that, the one with
/// the longest continuation. Empty when no n-gram occurs.
pub fn propose(tokens: &[u32], k: usize, min_n: usize, max_n: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 || min_n == 0 {
        return Vec::new();
    }
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        let mut best: Option<usize> = None;
        // A match must end before the suffix itself starts to mean anything.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                best = Some(start + n);
                if len - (start + n) >= k {
                    break;
                }
            }
        }
        if let Some(from) = best {
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_longest_latest_match() {
        // "1 2" occurred twice before the end; the latest occurrence is followed by 7 8.
        let t = [1, 2, 3, 4, 1, 2, 7, 8, 9, 1, 2];
        assert_eq!(propose(&t, 3, 1, 3), vec![7, 8, 9]);
        assert_eq!(propose(&t, 1, 1, 3), vec![7]);
        // The longer n-gram "9 1 2" has no earlier match, "1 2" does; for 6 tokens the latest
        // match runs out, the earlier one has them.
        assert_eq!(propose(&t, 6, 2, 3), vec![3, 4, 1, 2, 7, 8]);
        assert_eq!(propose(&t, 10, 2, 3), vec![3, 4, 1, 2, 7, 8, 9, 1, 2]);
        // Periodic text: the continuation covers k tokens, not just the rest of one period.
        let p = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5];
        assert_eq!(propose(&p, 5, 1, 2), vec![6, 7, 5, 6, 7]);
        // Nothing matches: no proposal.
        assert!(propose(&[1, 2, 3, 4], 3, 1, 3).is_empty());
        assert!(propose(&t, 0, 1, 3).is_empty());
        assert!(propose(&[5], 3, 1, 3).is_empty());
        // A repeated token proposes itself (the match may run into the suffix).
        assert_eq!(propose(&[4, 4, 4], 5, 1, 2), vec![4]);
    }
}
