//! Paged KV-cache bookkeeping: which blocks each sequence holds. No KV data lives here; the
//! executor owns the tensors and this module tells it which block ids to read and write. Three
//! parts, lowest first: the pool of blocks (`BlockPool`), the block tables on top of it
//! (`KvManager`), and the content hashes that name full blocks for the prefix cache (`hash`).
//!
//! **The pool**: reference counts, a free list, and the prefix cache.
//!
//! Every block is in exactly one of three states, which is what the invariant
//! `free + used + cached == total` checks:
//! - *free*: empty, no hash, on `free_list`;
//! - *used*: `ref_count > 0`, held by one or more block tables;
//! - *cached*: `ref_count == 0` but still holding the KV of a full block whose hash is known. It can
//!   be revived by a prefix hit, or evicted (oldest first) when a fresh block is needed.
//!
//! This is vLLM v1's `BlockPool`, with a `BTreeMap` keyed by a release stamp as the LRU queue.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use crate::error::{HoraeError, Result};

pub type BlockId = u32;
pub type BlockHash = u64;

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    hash: Option<BlockHash>,
    /// Key in `cached_lru` while the block is cached.
    lru_stamp: u64,
}

#[derive(Debug, Clone)]
pub struct BlockPool {
    blocks: Vec<Block>,
    free_list: Vec<BlockId>,
    cached_lru: BTreeMap<u64, BlockId>,
    by_hash: HashMap<BlockHash, BlockId>,
    next_stamp: u64,
    num_used: usize,
    /// Prefix-cache statistics, in blocks.
    pub hit_blocks: u64,
    pub queried_blocks: u64,
    pub evictions: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 {
            return Err(HoraeError::InvalidConfig("the KV pool must hold at least one block".into()));
        }
        if num_blocks > u32::MAX as usize {
            return Err(HoraeError::InvalidConfig(format!("{num_blocks} KV blocks is more than 2^32")));
        }
        Ok(Self {
            blocks: vec![Block::default(); num_blocks],
            // Reversed so that block 0 is handed out first: easier to read in tests and dumps.
            free_list: (0..num_blocks as BlockId).rev().collect(),
            cached_lru: BTreeMap::new(),
            by_hash: HashMap::default(),
            next_stamp: 0,
            num_used: 0,
            hit_blocks: 0,
            queried_blocks: 0,
            evictions: 0,
        })
    }

    pub fn num_total(&self) -> usize {
        self.blocks.len()
    }
    pub fn num_free(&self) -> usize {
        self.free_list.len()
    }
    pub fn num_cached(&self) -> usize {
        self.cached_lru.len()
    }
    pub fn num_used(&self) -> usize {
        self.num_used
    }
    /// Blocks a new allocation can get: the free ones plus the cached ones it may evict.
    pub fn num_allocatable(&self) -> usize {
        self.free_list.len() + self.cached_lru.len()
    }
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_count
    }

    /// Whether a full block with this hash is resident (used or cached), without touching it.
    /// The hash index of every block holding a full, hashed block (in use or cached): a copy,
    /// for a replica's routing stats.
    pub fn hash_index(&self) -> HashMap<BlockHash, BlockId> {
        self.by_hash.clone()
    }

    pub fn contains(&self, hash: BlockHash) -> bool {
        self.by_hash.contains_key(&hash)
    }

    /// A prefix-cache hit: take a reference on the block holding `hash`, reviving it if cached.
    pub fn acquire_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        self.queried_blocks += 1;
        let id = *self.by_hash.get(&hash)?;
        self.hit_blocks += 1;
        let block = &mut self.blocks[id as usize];
        if block.ref_count == 0 {
            self.cached_lru.remove(&block.lru_stamp);
            self.num_used += 1;
        }
        block.ref_count += 1;
        Some(id)
    }

    /// The block holding `hash` will be read soon: if it is cached (unused), make it the
    /// youngest in LRU order.
    pub fn touch_cached(&mut self, hash: BlockHash) {
        let Some(&id) = self.by_hash.get(&hash) else { return };
        let block = &mut self.blocks[id as usize];
        if block.ref_count == 0 {
            self.cached_lru.remove(&block.lru_stamp);
            block.lru_stamp = self.next_stamp;
            self.next_stamp += 1;
            self.cached_lru.insert(block.lru_stamp, id);
        }
    }

    /// A fresh block with one reference: from the free list, else by evicting the oldest cached one.
    pub fn allocate(&mut self) -> Result<BlockId> {
        let id = match self.free_list.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.cached_lru.pop_first().ok_or(HoraeError::OutOfBlocks)?;
                let hash = self.blocks[id as usize].hash.take().expect("cached blocks have a hash");
                self.by_hash.remove(&hash);
                self.evictions += 1;
                id
            }
        };
        let block = &mut self.blocks[id as usize];
        debug_assert_eq!(block.ref_count, 0);
        block.ref_count = 1;
        self.num_used += 1;
        Ok(id)
    }

    /// Another holder of a used block (a fork shares its parent's blocks).
    pub fn add_ref(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        assert!(block.ref_count > 0, "add_ref on unused block {id}");
        block.ref_count += 1;
    }

    /// Drop one reference. At zero a hashed block becomes cached (youngest in LRU order); an
    /// unhashed one goes back to the free list.
    pub fn release(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        assert!(block.ref_count > 0, "double free of block {id}");
        block.ref_count -= 1;
        if block.ref_count > 0 {
            return;
        }
        self.num_used -= 1;
        if block.hash.is_some() {
            block.lru_stamp = self.next_stamp;
            self.next_stamp += 1;
            self.cached_lru.insert(block.lru_stamp, id);
        } else {
            self.free_list.push(id);
        }
    }

    /// Name a full, computed block by its content hash so that later prompts can reuse it. If
    /// another block already holds that content, the first one stays the cached copy.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) {
        let block = &mut self.blocks[id as usize];
        if block.hash.is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        block.hash = Some(hash);
        self.by_hash.insert(hash, id);
    }

    /// Evict up to `n` cached blocks, oldest first; returns how many were evicted.
    pub fn evict_cached(&mut self, n: usize) -> usize {
        let mut evicted = 0;
        while evicted < n {
            let Some((_, id)) = self.cached_lru.pop_first() else { break };
            let hash = self.blocks[id as usize].hash.take().expect("cached blocks have a hash");
            self.by_hash.remove(&hash);
            self.free_list.push(id);
            self.evictions += 1;
            evicted += 1;
        }
        evicted
    }

    pub fn hit_rate(&self) -> f64 {
        if self.queried_blocks == 0 {
            0.0
        } else {
            self.hit_blocks as f64 / self.queried_blocks as f64
        }
    }

    /// Full consistency check, for tests: every block in exactly one state, counts and maps agree.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let total = self.blocks.len();
        if self.num_free() + self.num_used + self.num_cached() != total {
            return Err(format!(
                "free {} + used {} + cached {} != total {total}",
                self.num_free(),
                self.num_used,
                self.num_cached()
            ));
        }
        let used = self.blocks.iter().filter(|b| b.ref_count > 0).count();
        if used != self.num_used {
            return Err(format!("num_used {} but {used} blocks have references", self.num_used));
        }
        let mut seen = vec![false; total];
        for &id in &self.free_list {
            let b = &self.blocks[id as usize];
            if seen[id as usize] || b.ref_count != 0 || b.hash.is_some() {
                return Err(format!("free block {id} is duplicated, referenced or hashed"));
            }
            seen[id as usize] = true;
        }
        for (&stamp, &id) in &self.cached_lru {
            let b = &self.blocks[id as usize];
            if seen[id as usize] || b.ref_count != 0 || b.hash.is_none() || b.lru_stamp != stamp {
                return Err(format!("cached block {id} is inconsistent"));
            }
            seen[id as usize] = true;
        }
        for (&hash, &id) in &self.by_hash {
            if self.blocks[id as usize].hash != Some(hash) {
                return Err(format!("hash map points at block {id} which holds another hash"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Block tables on top of the pool: which blocks each sequence holds, growing them as tokens are
// appended, sharing them on prefix hits and forks, and copying on write when a sequence appends
// to a partial block it shares.

pub type SeqId = u64;

/// A block the executor must copy before the step runs (copy-on-write of a shared partial block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
}

#[derive(Debug, Clone, Default)]
struct BlockTable {
    /// Shared with the step plans that carry it (`shared_block_table`): a plan holds it only while
    /// its step runs, so growing it afterwards copies nothing.
    blocks: Arc<Vec<BlockId>>,
    /// Tokens that have a slot.
    num_tokens: usize,
    /// Leading full blocks already named in the prefix cache.
    num_registered: usize,
}

#[derive(Debug, Clone)]
pub struct KvManager {
    pool: BlockPool,
    block_size: usize,
    prefix_caching: bool,
    tables: HashMap<SeqId, BlockTable>,
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Result<Self> {
        if !(1..=256).contains(&block_size) {
            return Err(HoraeError::InvalidConfig(format!("block_size must be between 1 and 256, got {block_size}")));
        }
        Ok(Self { pool: BlockPool::new(num_blocks)?, block_size, prefix_caching, tables: HashMap::default() })
    }

    /// A pool sized from a KV budget in tokens.
    pub fn with_token_budget(kv_tokens: usize, block_size: usize, prefix_caching: bool) -> Result<Self> {
        if block_size == 0 {
            return Err(HoraeError::InvalidConfig("block_size must be at least 1".into()));
        }
        if kv_tokens < block_size {
            return Err(HoraeError::InvalidConfig(format!(
                "a KV budget of {kv_tokens} tokens is smaller than one block of {block_size}"
            )));
        }
        Self::new(kv_tokens / block_size, block_size, prefix_caching)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// A request that will read the cached leading run of `hashes` has arrived: make those
    /// blocks the youngest in LRU order, tail first so that its head goes last (as `free`
    /// releases a table). LRU by release alone evicts a queued request's prefix while the
    /// request waits, however soon it will be read; past the knee of the Mooncake trace (8
    /// replicas, 15,000-token prompts waiting seconds) that cost 5-7 points of hit rate and
    /// 4-10% of goodput with every router (docs/benchmarks.md, issue 16).
    pub fn touch_prefix(&mut self, hashes: &[BlockHash]) {
        let n = self.count_cached_prefix(hashes);
        for &h in hashes[..n].iter().rev() {
            self.pool.touch_cached(h);
        }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
    pub fn capacity_tokens(&self) -> usize {
        self.pool.num_total() * self.block_size
    }
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }
    pub fn num_sequences(&self) -> usize {
        self.tables.len()
    }
    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.tables.get(&seq).map(|t| t.blocks.as_slice())
    }

    /// The block table of `seq`, shared rather than copied (for step plans).
    pub fn shared_block_table(&self, seq: SeqId) -> Option<Arc<Vec<BlockId>>> {
        self.tables.get(&seq).map(|t| t.blocks.clone())
    }
    pub fn num_tokens(&self, seq: SeqId) -> usize {
        self.tables.get(&seq).map_or(0, |t| t.num_tokens)
    }
    /// Fraction of blocks held by running sequences.
    pub fn usage(&self) -> f64 {
        self.pool.num_used() as f64 / self.pool.num_total() as f64
    }

    /// How many leading blocks of `hashes` are resident, without taking them.
    pub fn count_cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        hashes.iter().take_while(|h| self.pool.contains(**h)).count()
    }

    /// Open a block table for a new sequence and take the cached blocks of its prompt prefix.
    /// Returns the number of tokens whose KV is already there.
    pub fn open(&mut self, seq: SeqId, prefix_hashes: &[BlockHash]) -> Result<usize> {
        if self.tables.contains_key(&seq) {
            return Err(HoraeError::DuplicateRequest(seq));
        }
        let mut table = BlockTable::default();
        if self.prefix_caching {
            for &h in prefix_hashes {
                match self.pool.acquire_cached(h) {
                    Some(id) => Arc::make_mut(&mut table.blocks).push(id),
                    None => break, // counted as a query by acquire_cached
                }
            }
            // Every full prompt block counts as queried, as vLLM counts every prompt token: the
            // ones after the first miss were not looked up, and missed all the same.
            self.pool.queried_blocks += (prefix_hashes.len() - table.blocks.len()).saturating_sub(1) as u64;
        }
        table.num_tokens = table.blocks.len() * self.block_size;
        table.num_registered = table.blocks.len();
        let cached = table.num_tokens;
        self.tables.insert(seq, table);
        Ok(cached)
    }

    /// Fresh blocks that appending `n` tokens to `seq` needs (including a copy-on-write block).
    pub fn blocks_needed_to_append(&self, seq: SeqId, n: usize) -> usize {
        let Some(t) = self.tables.get(&seq) else { return self.blocks_for(n) };
        let grow = self.blocks_for(t.num_tokens + n).saturating_sub(t.blocks.len());
        let cow = usize::from(n > 0 && self.last_block_is_shared_partial(t));
        grow + cow
    }

    pub fn can_append(&self, seq: SeqId, n: usize) -> bool {
        self.blocks_needed_to_append(seq, n) <= self.pool.num_allocatable()
    }

    fn last_block_is_shared_partial(&self, t: &BlockTable) -> bool {
        !t.num_tokens.is_multiple_of(self.block_size) && t.blocks.last().is_some_and(|&b| self.pool.ref_count(b) > 1)
    }

    /// Give `seq` slots for `n` more tokens. All or nothing: on `OutOfBlocks` nothing changed.
    pub fn append(&mut self, seq: SeqId, n: usize) -> Result<Vec<BlockCopy>> {
        if !self.can_append(seq, n) {
            return Err(HoraeError::OutOfBlocks);
        }
        let t = self.tables.get(&seq).ok_or(HoraeError::UnknownRequest(seq))?;
        let mut copies = Vec::new();
        let cow = n > 0 && self.last_block_is_shared_partial(t);
        let t = self.tables.get_mut(&seq).expect("checked above");
        if cow {
            let src = *t.blocks.last().expect("partial block exists");
            let dst = self.pool.allocate()?;
            self.pool.release(src);
            *Arc::make_mut(&mut t.blocks).last_mut().expect("partial block exists") = dst;
            copies.push(BlockCopy { src, dst });
        }
        t.num_tokens += n;
        let want = t.num_tokens.div_ceil(self.block_size);
        if t.blocks.len() < want {
            let blocks = Arc::make_mut(&mut t.blocks);
            while blocks.len() < want {
                blocks.push(self.pool.allocate()?);
            }
        }
        Ok(copies)
    }

    /// Shrink `seq` to its first `num_tokens` slots, releasing the blocks past them (rejected
    /// speculative tokens). Blocks already named in the prefix cache are never dropped here: they
    /// hold computed tokens only.
    pub fn truncate(&mut self, seq: SeqId, num_tokens: usize) {
        let Some(t) = self.tables.get_mut(&seq) else { return };
        if num_tokens >= t.num_tokens {
            return;
        }
        t.num_tokens = num_tokens;
        let keep = num_tokens.div_ceil(self.block_size).max(t.num_registered);
        if t.blocks.len() > keep {
            for b in Arc::make_mut(&mut t.blocks).drain(keep..).rev() {
                self.pool.release(b);
            }
        }
        t.num_tokens = t.num_tokens.max(t.num_registered * self.block_size);
    }

    /// Name the full blocks of `seq` whose KV is now computed, so later requests can reuse them.
    /// `hashes` are the chained hashes of the sequence's full blocks (possibly more than computed).
    pub fn register_computed(&mut self, seq: SeqId, computed_tokens: usize, hashes: &[BlockHash]) {
        if !self.prefix_caching {
            return;
        }
        let Some(t) = self.tables.get_mut(&seq) else { return };
        let full = (computed_tokens / self.block_size).min(hashes.len()).min(t.blocks.len());
        let from = t.num_registered.min(full);
        for (&block, &hash) in t.blocks[from..full].iter().zip(&hashes[from..full]) {
            self.pool.register(block, hash);
        }
        t.num_registered = t.num_registered.max(full);
    }

    /// A child sequence that shares every block of `parent` (for n > 1 and beam-like forks).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.tables.contains_key(&child) {
            return Err(HoraeError::DuplicateRequest(child));
        }
        let t = self.tables.get(&parent).ok_or(HoraeError::UnknownRequest(parent))?.clone();
        for &b in t.blocks.iter() {
            self.pool.add_ref(b);
        }
        self.tables.insert(child, t);
        Ok(())
    }

    /// Release every block of `seq`, last block first so that a prompt's tail is evicted before its
    /// head (the head is the part other prompts are likeliest to share). Unknown ids are a no-op.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            for &b in t.blocks.iter().rev() {
                self.pool.release(b);
            }
        }
    }

    /// Drop up to `n` cached blocks, oldest first.
    pub fn evict_cached(&mut self, n: usize) -> usize {
        self.pool.evict_cached(n)
    }

    /// Pool invariants plus: every block table's references add up to the pool's counts.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.pool.check_invariants()?;
        let mut refs: HashMap<BlockId, u32> = HashMap::default();
        for (seq, t) in &self.tables {
            if t.blocks.len() != t.num_tokens.div_ceil(self.block_size) {
                return Err(format!("seq {seq}: {} blocks for {} tokens", t.blocks.len(), t.num_tokens));
            }
            for &b in t.blocks.iter() {
                *refs.entry(b).or_default() += 1;
            }
        }
        for (b, n) in &refs {
            if self.pool.ref_count(*b) != *n {
                return Err(format!("block {b}: {n} holders but ref_count {}", self.pool.ref_count(*b)));
            }
        }
        if refs.len() != self.pool.num_used() {
            return Err(format!("{} blocks held but pool says {} used", refs.len(), self.pool.num_used()));
        }
        Ok(())
    }
}

/// Content hashes of full KV blocks, chained so that a block's hash names its whole prefix: two
/// prompts share block `i` only if they agree on every token up to the end of block `i`.
pub mod hash {
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

    /// Chained hashes of the full blocks of a token sequence.
    pub fn token_block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut parent = None;
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
            let (ha, hb) = (token_block_hashes(&a, 16), token_block_hashes(&b, 16));
            assert_eq!(ha.len(), 4);
            assert_eq!(ha[..2], hb[..2]);
            assert_ne!(ha[2], hb[2]);
            assert_ne!(ha[3], hb[3], "chaining: a later block differs once an earlier one does");
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
}
