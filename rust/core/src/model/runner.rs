//! The real-model executor: builds the flattened batch from the plan, runs the forward pass,
//! samples the next tokens. It plugs into the same `Engine` the simulator drives.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::{rngs::SmallRng, SeedableRng};

use super::llama::{BatchInput, KvCache, LlamaModel};
use crate::backend::attention::AttnSeq;
use crate::backend::gemm::WeightDtype;
use crate::engine::{ExecOutput, Executor, Prompt, ReqId};
use crate::error::{HoraeError, Result};
use crate::sample;
use crate::sched::{SchedulePlan, Scheduler};

pub struct ModelExecutor {
    /// Shared so that callers can also run the model outside the engine (teacher-forced logits).
    pub model: Arc<LlamaModel>,
    cache: KvCache,
    eos: Vec<u32>,
    rngs: HashMap<ReqId, SmallRng>,
    logits: Vec<f32>,
}

impl ModelExecutor {
    /// Load the model folder (weights kept as `dtype`, `None` = the checkpoint's) and allocate a
    /// KV cache of `num_blocks` blocks.
    pub fn load(dir: &Path, dtype: Option<WeightDtype>, num_blocks: usize, block_size: usize) -> Result<Self> {
        let model = Arc::new(LlamaModel::load(dir, dtype)?);
        let cache = KvCache::new(&model.cfg, num_blocks, block_size);
        // generation_config.json's eos ids win over config.json's (as in transformers).
        let mut eos = model.cfg.eos_token_ids.clone();
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => eos = n.as_u64().map(|x| vec![x as u32]).unwrap_or(eos),
                    Some(serde_json::Value::Array(a)) => eos = a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                    _ => {}
                }
            }
        }
        Ok(Self { model, cache, eos, rngs: HashMap::new(), logits: Vec::new() })
    }
}

impl Executor for ModelExecutor {
    fn execute(&mut self, plan: &SchedulePlan, state: &Scheduler) -> Result<ExecOutput> {
        for c in &plan.copies {
            self.cache.copy_block(c.src as usize, c.dst as usize);
        }
        let bs = self.cache.block_size;
        let mut input = BatchInput { tokens: vec![], positions: vec![], slots: vec![], seqs: vec![], logit_rows: vec![] };
        let mut samplers = Vec::new();
        let mut prompt_rows: Vec<(ReqId, usize, u32, usize, usize)> = Vec::new();
        for s in &plan.seqs {
            let r = state.request(s.id).ok_or(HoraeError::UnknownRequest(s.id))?;
            let Prompt::Tokens(prompt) = &r.prompt else {
                return Err(HoraeError::Executor(format!("request {} has no token ids", s.id)));
            };
            let table = state.kv().block_table(s.id).ok_or(HoraeError::UnknownRequest(s.id))?;
            let row = input.tokens.len();
            for p in s.start..s.start + s.num_tokens {
                input.tokens.push(if p < prompt.len() { prompt[p] } else { r.output[p - prompt.len()] });
                input.positions.push(p);
                input.slots.push(table[p / bs] as usize * bs + p % bs);
            }
            input.seqs.push(AttnSeq { row, num_tokens: s.num_tokens, start: s.start, block_table: table });
            if s.samples {
                input.logit_rows.push(row + s.num_tokens - 1);
                samplers.push(s.id);
            }
            if let Some(k) = r.sampling.prompt_logprobs {
                // Row of position p predicts prompt token p + 1.
                for p in s.start..(s.start + s.num_tokens).min(prompt.len() - 1) {
                    prompt_rows.push((s.id, p + 1, prompt[p + 1], k, row + p - s.start));
                }
            }
        }
        let num_sample_rows = input.logit_rows.len();
        input.logit_rows.extend(prompt_rows.iter().map(|r| r.4));
        // The logits buffer is kept between steps (an error just drops it).
        let mut logits = std::mem::take(&mut self.logits);
        self.model.forward(&input, &mut self.cache, &mut logits)?;
        let vocab = self.model.cfg.vocab_size;
        let mut sampled = Vec::with_capacity(samplers.len());
        let mut logprobs = Vec::new();
        let prompt_logprobs: Vec<(ReqId, usize, sample::TokenLogprobs)> = prompt_rows
            .iter()
            .enumerate()
            .map(|(i, &(id, pos, token, k, _))| {
                let row = &logits[(num_sample_rows + i) * vocab..(num_sample_rows + i + 1) * vocab];
                (id, pos, sample::logprobs(row, token, k))
            })
            .collect();
        for (i, id) in samplers.into_iter().enumerate() {
            let r = state.request(id).expect("checked above");
            let Prompt::Tokens(prompt) = &r.prompt else { unreachable!("checked above") };
            let row = &mut logits[i * vocab..(i + 1) * vocab];
            let p = &r.sampling;
            let raw = p.logprobs.map(|_| row.to_vec());
            sample::apply_penalties(row, p, prompt, &r.output);
            if r.output.len() < p.min_tokens {
                // Too early to stop: end-of-sequence cannot be drawn.
                for &e in &self.eos {
                    if let Some(l) = row.get_mut(e as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let rng = self.rngs.entry(id).or_insert_with(|| SmallRng::seed_from_u64(p.seed.unwrap_or(id ^ 0x9e37_79b9_7f4a_7c15)));
            let token = sample::sample(row, p, rng);
            if let (Some(k), Some(raw)) = (p.logprobs, raw) {
                logprobs.push((id, sample::logprobs(&raw, token, k)));
            }
            sampled.push((id, token));
        }
        self.logits = logits;
        Ok(ExecOutput { sampled, logprobs, prompt_logprobs, elapsed: None })
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }

    fn release(&mut self, id: ReqId) {
        self.rngs.remove(&id);
    }
}
