//! Property test of the KV block manager: random interleavings of open (with prefix hits),
//! append, fork (copy-on-write), register, free and evict, about a million operations in all.
//! After every operation: no leak, no double free, `free + used + cached == total`, and every
//! block's reference count equals the number of tables holding it.

use std::collections::HashMap;

use horae_core::kv::hash::token_block_hashes;
use horae_core::kv::KvManager;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Open sequence `slot` with a prompt of `len` tokens following pattern `pattern`
    /// (prompts with the same pattern share a prefix, so the cache gets hits).
    Open {
        slot: u8,
        pattern: u8,
        len: u8,
    },
    Append {
        slot: u8,
        n: u8,
    },
    Fork {
        parent: u8,
        child: u8,
    },
    Free {
        slot: u8,
    },
    Evict {
        n: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..12, 0u8..3, 1u8..80).prop_map(|(slot, pattern, len)| Op::Open { slot, pattern, len }),
        5 => (0u8..12, 1u8..24).prop_map(|(slot, n)| Op::Append { slot, n }),
        1 => (0u8..12, 0u8..12).prop_map(|(parent, child)| Op::Fork { parent, child }),
        3 => (0u8..12).prop_map(|slot| Op::Free { slot }),
        1 => (0u8..8).prop_map(|n| Op::Evict { n }),
    ]
}

fn prompt(pattern: u8, len: u8) -> Vec<u32> {
    (0..len as u32).map(|i| pattern as u32 * 1000 + i).collect()
}

const CASES: u32 = 250;
const OPS: usize = 4000;

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]
    #[test]
    fn block_manager_never_leaks(ops in prop::collection::vec(op(), OPS), block_size in prop::sample::select(vec![1usize, 4, 16]), blocks in 8usize..96) {
        let mut kv = KvManager::new(blocks, block_size, true).unwrap();
        // Tokens each live sequence holds, to hash its full blocks.
        let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut next_token = 100_000u32;
        for op in ops {
            match op {
                Op::Open { slot, pattern, len } => {
                    let seq = slot as u64;
                    if tokens.contains_key(&seq) { continue; }
                    let t = prompt(pattern, len);
                    let hashes = token_block_hashes(&t, block_size, None);
                    let lookup = ((t.len() - 1) / block_size).min(hashes.len());
                    let cached = kv.open(seq, &hashes[..lookup]).unwrap();
                    prop_assert!(cached < t.len() && cached.is_multiple_of(block_size));
                    if kv.append(seq, t.len() - cached).is_ok() {
                        kv.register_computed(seq, t.len(), &hashes);
                        tokens.insert(seq, t);
                    } else {
                        kv.free(seq);
                    }
                }
                Op::Append { slot, n } => {
                    let seq = slot as u64;
                    let Some(t) = tokens.get_mut(&seq) else { continue };
                    let before = kv.pool().num_allocatable();
                    let need = kv.blocks_needed_to_append(seq, n as usize);
                    match kv.append(seq, n as usize) {
                        Ok(copies) => {
                            prop_assert!(copies.len() <= 1);
                            for _ in 0..n { t.push(next_token); next_token += 1; }
                            prop_assert_eq!(kv.num_tokens(seq), t.len());
                            let hashes = token_block_hashes(t, block_size, None);
                            kv.register_computed(seq, t.len(), &hashes);
                        }
                        Err(_) => {
                            prop_assert!(need > before, "append refused with {} needed and {} allocatable", need, before);
                            prop_assert_eq!(kv.num_tokens(seq), t.len(), "a refused append changes nothing");
                        }
                    }
                }
                Op::Fork { parent, child } => {
                    let (p, c) = (parent as u64, child as u64);
                    if p == c || !tokens.contains_key(&p) || tokens.contains_key(&c) { continue; }
                    kv.fork(p, c).unwrap();
                    prop_assert_eq!(kv.block_table(p), kv.block_table(c));
                    let t = tokens[&p].clone();
                    tokens.insert(c, t);
                }
                Op::Free { slot } => {
                    let seq = slot as u64;
                    kv.free(seq);
                    tokens.remove(&seq);
                    prop_assert!(kv.block_table(seq).is_none());
                }
                Op::Evict { n } => {
                    let cached = kv.pool().num_cached();
                    let evicted = kv.evict_cached(n as usize);
                    prop_assert_eq!(evicted, (n as usize).min(cached));
                }
            }
            if let Err(e) = kv.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
        }
        // Freeing everything returns every block to free or cached.
        for seq in tokens.keys().copied().collect::<Vec<_>>() {
            kv.free(seq);
        }
        prop_assert_eq!(kv.pool().num_used(), 0);
        prop_assert_eq!(kv.pool().num_free() + kv.pool().num_cached(), blocks);
        kv.evict_cached(usize::MAX);
        prop_assert_eq!(kv.pool().num_free(), blocks);
    }
}

const _: () = assert!(CASES as usize * OPS >= 1_000_000, "the issue asks for a million operations");

#[test]
fn copy_on_write_when_a_fork_appends_to_a_shared_partial_block() {
    let mut kv = KvManager::new(8, 4, true).unwrap();
    kv.open(1, &[]).unwrap();
    kv.append(1, 6).unwrap(); // blocks [a, b], b half full
    kv.fork(1, 2).unwrap();
    let shared = kv.block_table(1).unwrap().to_vec();
    let copies = kv.append(2, 1).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].src, shared[1]);
    let child = kv.block_table(2).unwrap();
    assert_eq!(child[0], shared[0], "the full block stays shared");
    assert_ne!(child[1], shared[1], "the partial block was copied");
    // The parent now owns its partial block alone: appending needs no copy.
    assert!(kv.append(1, 1).unwrap().is_empty());
    kv.check_invariants().unwrap();
}

#[test]
fn prefix_hits_reuse_blocks_and_lru_evicts_oldest() {
    let mut kv = KvManager::new(4, 2, true).unwrap();
    let a: Vec<u32> = vec![1, 2, 3, 4, 5];
    let ha = token_block_hashes(&a, 2, None);
    assert_eq!(kv.open(1, &ha).unwrap(), 0);
    kv.append(1, 5).unwrap();
    kv.register_computed(1, 5, &ha);
    kv.free(1);
    assert_eq!((kv.pool().num_cached(), kv.pool().num_free()), (2, 2));
    // Same prompt again: both full blocks come from the cache.
    assert_eq!(kv.open(2, &ha).unwrap(), 4);
    assert!(kv.pool().hit_rate() > 0.0);
    kv.free(2);
    // A 4-block request evicts the cached blocks (tail first) to make room.
    kv.open(3, &[]).unwrap();
    kv.append(3, 8).unwrap();
    assert_eq!(kv.pool().num_cached(), 0);
    assert_eq!(kv.pool().evictions, 2);
    assert!(kv.append(3, 1).is_err(), "pool is full");
    kv.check_invariants().unwrap();
}

#[test]
fn reset_prefix_cache_forgets_cached_blocks_only_when_none_are_held() {
    let mut kv = KvManager::new(8, 2, true).unwrap();
    let a: Vec<u32> = vec![1, 2, 3, 4, 5];
    let ha = token_block_hashes(&a, 2, None);
    kv.open(1, &ha).unwrap();
    kv.append(1, 5).unwrap();
    kv.register_computed(1, 5, &ha);
    // Held: refused, and nothing forgotten.
    assert!(!kv.reset_prefix_cache());
    kv.free(1);
    assert_eq!(kv.count_cached_prefix(&ha), 2);
    assert!(kv.reset_prefix_cache());
    assert_eq!((kv.count_cached_prefix(&ha), kv.pool().num_cached(), kv.pool().num_free()), (0, 0, 8));
    // The same prompt is computed in full again, and cached again.
    assert_eq!(kv.open(2, &ha).unwrap(), 0);
    kv.check_invariants().unwrap();
}

#[test]
fn bad_configs_are_errors() {
    assert!(KvManager::new(0, 16, true).is_err());
    assert!(KvManager::new(10, 0, true).is_err());
    assert!(KvManager::new(10, 257, true).is_err());
    assert!(KvManager::with_token_budget(8, 16, true).is_err());
    assert!(KvManager::with_token_budget(160, 0, true).is_err());
    assert_eq!(KvManager::with_token_budget(160, 16, true).unwrap().capacity_tokens(), 160);
}
