//! What a replica publishes for the router: its queue, its Past-Future headroom and prefill rate,
//! and which prompt blocks its prefix cache holds (exactly, or as a Bloom filter).

use rustc_hash::FxHashMap as HashMap;

use crate::error::HoraeError;
use crate::kv::{BlockHash, BlockId};

/// What a replica publishes for routing (Ray Serve's `record_routing_stats`).
#[derive(Debug, Clone, Default)]
pub struct ReplicaStats {
    pub waiting: usize,
    pub running: usize,
    /// Tokens the waiting requests still have to compute (their prefill work).
    pub waiting_tokens: u64,
    /// Tokens the KV pool holds.
    pub capacity_tokens: u64,
    /// The admission policy's predicted peak KV use of the running batch (Past-Future's
    /// forecast); where the policy has none, the tokens in use.
    pub predicted_peak_tokens: u64,
    /// Output tokens it plans a request with (the 90th percentile of its recent lengths).
    pub planned_output: u64,
    /// Prompt tokens a second its full prefill steps compute, as measured (0: not yet).
    pub prefill_rate: f64,
    /// The blocks its prefix cache holds.
    pub cached: CachedBlocks,
}

impl ReplicaStats {
    /// Leading blocks of `hashes` this replica has cached. Block hashes are chained (a block's
    /// hash covers every token before it), so a cached block implies its prefix was cached when
    /// it was registered: a binary search for the last cached one, O(log n) lookups.
    pub fn cached_prefix_blocks(&self, hashes: &[BlockHash]) -> usize {
        hashes.partition_point(|h| self.cached.contains(*h))
    }
}

/// A replica's prefix-cache contents as a router sees them: the pool's own index where the router
/// shares the process (the cluster simulator), a Bloom filter where it must travel (Ray Serve's
/// routing stats: about 10 bits a block instead of 64, at a 1% false-positive rate).
#[derive(Debug, Clone)]
pub enum CachedBlocks {
    Index(HashMap<BlockHash, BlockId>),
    Bloom(BlockBloom),
}

impl Default for CachedBlocks {
    fn default() -> Self {
        CachedBlocks::Index(HashMap::default())
    }
}

impl CachedBlocks {
    pub fn contains(&self, h: BlockHash) -> bool {
        match self {
            CachedBlocks::Index(m) => m.contains_key(&h),
            CachedBlocks::Bloom(b) => b.contains(h),
        }
    }
}

/// A Bloom filter of block hashes. Block hashes are already uniform 64-bit values, so the probe
/// positions come from the key itself (double hashing over its two halves, mixed once) instead of
/// hashing it again; that is all a filter library would add here.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockBloom {
    words: Vec<u64>,
}

impl BlockBloom {
    /// Probes per key: optimal for 10 bits a key (k = 10 ln 2, rounded down).
    const PROBES: u64 = 6;
    const BITS_PER_KEY: usize = 10;

    pub fn from_hashes(hashes: impl ExactSizeIterator<Item = BlockHash>) -> Self {
        let bits = (hashes.len() * Self::BITS_PER_KEY).max(64).next_multiple_of(64);
        let mut b = BlockBloom { words: vec![0; bits / 64] };
        for h in hashes {
            for bit in b.probes(h) {
                b.words[bit / 64] |= 1 << (bit % 64);
            }
        }
        b
    }

    fn probes(&self, h: BlockHash) -> impl Iterator<Item = usize> {
        let bits = (self.words.len() * 64) as u64;
        // splitmix64's finaliser: block hashes from DefaultHasher are good, but a cheap mix keeps
        // the filter sound for any key.
        let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let (a, b) = (z & 0xffff_ffff, (z >> 32) | 1);
        (0..Self::PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % bits) as usize)
    }

    pub fn contains(&self, h: BlockHash) -> bool {
        !self.words.is_empty() && self.probes(h).all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Little-endian bytes, what a replica publishes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HoraeError> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
            return Err(HoraeError::InvalidConfig(format!(
                "a block Bloom filter is a non-empty multiple of 8 bytes, got {}",
                bytes.len()
            )));
        }
        Ok(BlockBloom { words: bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect() })
    }
}
