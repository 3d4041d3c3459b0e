//! A draft model proposes tokens by running autoregressively ahead of the target.
//!
//! Its KV cache is indexed by the target's block ids: block `b` of the shared pool holds the
//! target's KV in the target's cache and the draft's KV in this one, so the scheduler's block
//! accounting covers both (vLLM v1 keeps EAGLE's draft layers in the target's KV groups the same
//! way). Positions past the target's allocated blocks (the newest token and the drafts
//! themselves, whose blocks the scheduler only allocates when it schedules them) go to a few
//! scratch blocks per sequence, reused every step. The draft's KV counts as computed only up to
//! the target's blocks; it catches up each step by feeding the tokens accepted since.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::SmallRng;

use crate::backend::attention::AttnSeq;
use crate::backend::gemm::WeightDtype;
use crate::backend::kv_cache::KvDtype;
use crate::error::{HoraeError, Result};
use crate::model::llama::{BatchInput, KvCache, LlamaModel};
use crate::plan::DraftCandidate;
use crate::request::ReqId;
use crate::sample;

pub struct DraftModel {
    pub model: Arc<LlamaModel>,
    cache: KvCache,
    pool_blocks: usize,
    scratch_per_seq: usize,
    max_seqs: usize,
    /// Draft KV is valid for positions below this.
    computed: HashMap<ReqId, usize>,
    logits: Vec<f32>,
}

/// One draft proposal: the request, its draft tokens, and the draft's distribution for each
/// (empty for greedy requests, whose drafts are the draft's argmax: a point mass).
pub type Proposal = (ReqId, Vec<u32>, Vec<Vec<f32>>);

impl DraftModel {
    /// Load the draft (optionally only its first `layers`) for a target with `target_vocab`
    /// tokens and a pool of `pool_blocks` blocks of `block_size`, serving up to `max_seqs`
    /// sequences with up to `k_max` drafts each.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        dir: &Path,
        dtype: Option<WeightDtype>,
        kv_dtype: Option<KvDtype>,
        layers: Option<usize>,
        target_vocab: usize,
        pool_blocks: usize,
        block_size: usize,
        max_seqs: usize,
        k_max: usize,
    ) -> Result<Self> {
        let mut model = LlamaModel::load_first_layers(dir, dtype, layers)?;
        if let Some(kv) = kv_dtype {
            model = model.with_kv_dtype(kv);
        }
        if model.cfg.vocab_size != target_vocab {
            return Err(HoraeError::InvalidConfig(format!(
                "the draft model's vocabulary ({} tokens) differs from the target's ({target_vocab}); drafts must be target token ids",
                model.cfg.vocab_size
            )));
        }
        let scratch_per_seq = (k_max + block_size).div_ceil(block_size) + 1;
        let blocks = max_seqs.saturating_mul(scratch_per_seq).saturating_add(pool_blocks);
        let cache = KvCache::new(&model.cfg, blocks, block_size, model.kv_dtype())?;
        Ok(Self {
            model: Arc::new(model),
            cache,
            pool_blocks,
            scratch_per_seq,
            max_seqs,
            computed: HashMap::new(),
            logits: Vec::new(),
        })
    }

    /// The request's KV is gone (finished or preempted): start over next time.
    pub fn forget(&mut self, id: ReqId) {
        self.computed.remove(&id);
    }

    /// Copy-on-write of a shared partial block, mirrored in the draft's cache.
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        self.cache.copy_block(src, dst);
    }

    /// Up to `k` drafts for each candidate (at most `max_seqs` of them get drafts); unseeded
    /// requests' generators derive from `engine_seed` as the target's do.
    pub fn propose(
        &mut self,
        candidates: &[DraftCandidate],
        k: usize,
        rngs: &mut HashMap<ReqId, SmallRng>,
        engine_seed: Option<u64>,
    ) -> Result<Vec<Proposal>> {
        let bs = self.cache.block_size;
        let candidates = &candidates[..candidates.len().min(self.max_seqs)];
        if k == 0 || candidates.is_empty() {
            return Ok(Vec::new());
        }
        // Per sequence: its tokens, the draft's table (the target's blocks, then scratch), and
        // where the draft's KV stops being valid.
        let mut seqs = Vec::with_capacity(candidates.len());
        for (i, c) in candidates.iter().enumerate() {
            let id = c.id;
            let tokens = &c.token_ids;
            let total = tokens.len();
            if total == 0 {
                return Err(HoraeError::Executor(format!("request {id} has no token ids for the draft model")));
            }
            let mut table: Vec<u32> = c.block_table.to_vec();
            let owned = table.len() * bs;
            let scratch = self.pool_blocks + i * self.scratch_per_seq;
            while table.len() * bs < total + k {
                let j = table.len() - owned / bs;
                table.push((scratch + j) as u32);
            }
            let from = self.computed.get(&id).copied().unwrap_or(0).min(total - 1);
            seqs.push((id, tokens, table, from, owned));
        }
        let vocab = self.model.cfg.vocab_size;
        let mut drafts: Vec<Vec<u32>> = vec![Vec::with_capacity(k); seqs.len()];
        let mut probs: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
        for step in 0..k {
            // Step 0 catches up on the real tokens; each later step feeds the last draft.
            let mut input =
                BatchInput { tokens: vec![], positions: vec![], slots: vec![], seqs: vec![], logit_rows: vec![] };
            for (i, (_, tokens, table, from, _)) in seqs.iter().enumerate() {
                let (start, feed): (usize, Vec<u32>) = if step == 0 {
                    (*from, tokens[*from..].to_vec())
                } else {
                    (tokens.len() + step - 1, vec![drafts[i][step - 1]])
                };
                let row = input.tokens.len();
                for (j, &t) in feed.iter().enumerate() {
                    let p = start + j;
                    input.tokens.push(t);
                    input.positions.push(p);
                    input.slots.push(table[p / bs] as usize * bs + p % bs);
                }
                input.seqs.push(AttnSeq { row, num_tokens: feed.len(), start, block_table: table });
                input.logit_rows.push(row + feed.len() - 1);
            }
            let mut logits = std::mem::take(&mut self.logits);
            self.model.forward(&input, &mut self.cache, &mut logits)?;
            for (i, (id, tokens, ..)) in seqs.iter().enumerate() {
                let c = &candidates[i];
                let p = &c.sampling;
                let row = &mut logits[i * vocab..(i + 1) * vocab];
                let mut so_far = tokens[c.prompt_len..].to_vec();
                so_far.extend_from_slice(&drafts[i]);
                let prompt = &tokens[..c.prompt_len];
                sample::adjust_logits(row, p, prompt, &so_far);
                let token = if p.is_greedy() {
                    sample::argmax(row)
                } else {
                    let q = sample::distribution(row, p);
                    let rng = rngs.entry(*id).or_insert_with(|| sample::request_rng(*id, p.seed, engine_seed));
                    let cand: Vec<(u32, f32)> =
                        q.iter().enumerate().filter(|c| *c.1 > 0.0).map(|(t, &w)| (t as u32, w)).collect();
                    let t = sample::draw(&cand, rng);
                    probs[i].push(q);
                    t
                };
                drafts[i].push(token);
            }
            self.logits = logits;
        }
        let mut out = Vec::with_capacity(seqs.len());
        for ((id, tokens, _, _, owned), (d, q)) in seqs.into_iter().zip(drafts.into_iter().zip(probs)) {
            // Real tokens' KV stays valid where it sits in the target's blocks.
            self.computed.insert(id, tokens.len().min(owned));
            out.push((id, d, q));
        }
        Ok(out)
    }
}
