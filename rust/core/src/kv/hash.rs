//! Content hashes of full KV blocks, chained so that a block's hash names its whole prefix: two
//! prompts share block `i` only if they agree on every token up to the end of block `i`.

use std::hash::{DefaultHasher, Hash, Hasher};

use super::BlockHash;

/// Hash of one block given its parent's hash and something that identifies the block's tokens.
pub fn chain_hash<T: Hash + ?Sized>(parent: Option<BlockHash>, content: &T) -> BlockHash {
    // DefaultHasher::new() uses fixed keys, so hashes are stable within and across runs.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    content.hash(&mut h);
    h.finish()
}

/// Chained hashes of the full blocks of a token sequence. A `cache_salt` (vLLM's) starts the
/// chain from itself, so the blocks are shared only with prompts of the same salt: a tenant
/// cannot learn from the cache's timing what another tenant's prompts held.
pub fn token_block_hashes(tokens: &[u32], block_size: usize, cache_salt: Option<&str>) -> Vec<BlockHash> {
    let mut parent = cache_salt.map(|s| chain_hash(None, &("cache_salt", s)));
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = chain_hash(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

/// Chained hashes for a prompt known only by the trace's prefix ids, as in Mooncake's traces: the
/// token at position `p` is identified by `(prefix_ids[p / unit], p % unit)`. Positions past the
/// named units are unique to the request (`salt`), so they never match another request.
pub fn synthetic_block_hashes(
    prompt_len: usize,
    prefix_ids: &[u64],
    unit: usize,
    salt: u64,
    block_size: usize,
) -> Vec<BlockHash> {
    let covered = (prefix_ids.len() * unit).min(prompt_len);
    let mut parent = None;
    (0..prompt_len / block_size)
        .map(|b| {
            let (start, end) = (b * block_size, (b + 1) * block_size);
            let h = if end <= covered {
                let units = &prefix_ids[start / unit..=(end - 1) / unit];
                chain_hash(parent, &(units, start % unit))
            } else {
                chain_hash(parent, &(salt, b))
            };
            parent = Some(h);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shares_hashes_until_divergence() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[40] = 999;
        let (ha, hb) = (token_block_hashes(&a, 16, None), token_block_hashes(&b, 16, None));
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        assert_ne!(ha[3], hb[3], "chaining: a later block differs once an earlier one does");
        // A salt keeps a prompt's blocks apart from the unsalted and the other salts' ones.
        let (s1, s1b, s2) = (
            token_block_hashes(&a, 16, Some("t1")),
            token_block_hashes(&a, 16, Some("t1")),
            token_block_hashes(&a, 16, Some("t2")),
        );
        assert_eq!(s1, s1b);
        assert!(s1.iter().zip(&ha).chain(s1.iter().zip(&s2)).all(|(x, y)| x != y));
    }

    #[test]
    fn synthetic_hashes_follow_prefix_ids() {
        let a = synthetic_block_hashes(1200, &[7, 8, 9], 512, 1, 16);
        let b = synthetic_block_hashes(1100, &[7, 8, 10], 512, 2, 16);
        assert_eq!(a.len(), 75);
        assert_eq!(a[..64], b[..64], "two shared 512-token units = 64 blocks");
        assert_ne!(a[64], b[64]);
        // Without prefix ids, nothing is shared.
        let c = synthetic_block_hashes(512, &[], 512, 3, 16);
        let d = synthetic_block_hashes(512, &[], 512, 4, 16);
        assert_ne!(c[0], d[0]);
    }
}
