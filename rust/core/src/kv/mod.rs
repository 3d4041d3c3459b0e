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

use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use crate::error::{HoraeError, Result};

pub type BlockId = u32;
pub type BlockHash = u64;

pub mod hash;
mod pool;

pub use pool::BlockPool;

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

    /// Forget every cached block (vLLM's `reset_prefix_cache`), e.g. between benchmark runs, so
    /// that the next prompts are computed in full. Refused (false) while a sequence holds
    /// blocks: once released, its blocks would be found by their hashes again.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if !self.tables.is_empty() {
            return false;
        }
        self.pool.evict_cached(usize::MAX);
        true
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
