//! The pool of blocks: reference counts, a free list, and the prefix cache (the module's docs,
//! `kv`, say what each state means).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;

use super::{BlockHash, BlockId};
use crate::error::{HoraeError, Result};

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
        // Reserved first: a pool whose records the machine cannot hold is an error, not the abort
        // a failed allocation is (the simulator takes any `kv_cache_tokens`).
        let (mut blocks, mut free_list) = (Vec::new(), Vec::new());
        if blocks.try_reserve_exact(num_blocks).is_err() || free_list.try_reserve_exact(num_blocks).is_err() {
            return Err(HoraeError::InvalidConfig(format!(
                "a KV pool of {num_blocks} blocks needs more memory for its records than this machine can allocate; \
                 give a smaller kv_cache_tokens"
            )));
        }
        blocks.resize(num_blocks, Block::default());
        // Reversed so that block 0 is handed out first: easier to read in tests and dumps.
        free_list.extend((0..num_blocks as BlockId).rev());
        Ok(Self {
            blocks,
            free_list,
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
