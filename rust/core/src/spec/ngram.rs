//! Prompt-lookup proposals (model-free): match the sequence's last tokens against everything
//! before them and propose what followed the match. Good on edits, code and quoting, where the
//! output repeats the prompt; it proposes nothing when the suffix never occurred before.

/// Up to `k` tokens that followed the latest earlier occurrence of the last `n` tokens of
/// `tokens`, for the longest `n` in `min_n..=max_n` that occurs. Empty when none does.
pub fn propose(tokens: &[u32], k: usize, min_n: usize, max_n: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 || min_n == 0 {
        return Vec::new();
    }
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Latest match first: the most recent context is the likeliest to be repeated next.
        // A match must end before the suffix itself starts to mean anything.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                return tokens[from..(from + k).min(len)].to_vec();
            }
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
        // The longer n-gram "9 1 2" has no earlier match, "1 2" does.
        assert_eq!(propose(&t, 10, 2, 3), vec![7, 8, 9, 1, 2]);
        // Nothing matches: no proposal.
        assert!(propose(&[1, 2, 3, 4], 3, 1, 3).is_empty());
        assert!(propose(&t, 0, 1, 3).is_empty());
        assert!(propose(&[5], 3, 1, 3).is_empty());
        // A repeated token proposes itself (the match may run into the suffix).
        assert_eq!(propose(&[4, 4, 4], 5, 1, 2), vec![4]);
    }
}
