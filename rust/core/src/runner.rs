//! The real-model executor: builds the flattened batch from the plan, runs the forward pass,
//! samples the next tokens. It plugs into the same `Engine` the simulator drives, and reads
//! nothing but the plan.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rayon::prelude::*;

use crate::backend::attention::AttnSeq;
use crate::backend::cuda::ops::{Dt, Ptr};
use crate::backend::cuda::sampler;
use crate::backend::gemm::WeightDtype;
use crate::backend::kv_cache::KvDtype;
use crate::error::{HoraeError, Result};
use crate::model::cuda_llama::CudaLlama;
use crate::model::llama::{BatchInput, KvCache, LlamaModel};
use crate::model::ModelConfig;
use crate::plan::{DraftCandidate, ExecOutput, Executor, ScheduledSeq, StepPlan};
use crate::request::ReqId;
use crate::sample;
use crate::spec::{self, ngram, DraftModel, Verdict};

pub struct ModelExecutor {
    pub cfg: ModelConfig,
    runtime: Runtime,
    eos: Vec<u32>,
    rngs: HashMap<ReqId, SmallRng>,
    logits: Vec<f32>,
    proposer: Option<Proposer>,
    /// The draft model's distribution for each of a request's pending drafts.
    draft_probs: HashMap<ReqId, Vec<Vec<f32>>>,
    /// Unseeded requests draw from streams derived from this (None: fresh entropy).
    seed: Option<u64>,
}

/// Where the forward pass runs. Both read the same block tables; only the KV memory differs.
enum Runtime {
    /// Shared so that callers can also run the model outside the engine (teacher-forced logits).
    Cpu {
        model: Arc<LlamaModel>,
        cache: KvCache,
    },
    Cuda(Box<CudaLlama>),
}

/// Where speculative drafts come from.
pub enum Proposer {
    Ngram { min_n: usize, max_n: usize },
    Draft(Box<DraftModel>),
}

impl ModelExecutor {
    /// Load the model folder (weights kept as `dtype`, `None` = the checkpoint's) and allocate a
    /// KV cache of `num_blocks` blocks holding `kv_dtype` (`None` = the model's default).
    pub fn load(
        dir: &Path,
        dtype: Option<WeightDtype>,
        kv_dtype: Option<KvDtype>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let mut model = LlamaModel::load(dir, dtype)?;
        if let Some(kv) = kv_dtype {
            model = model.with_kv_dtype(kv);
        }
        let model = Arc::new(model);
        let cache = KvCache::new(&model.cfg, num_blocks, block_size, model.kv_dtype())?;
        let cfg = model.cfg.clone();
        Ok(Self::with_runtime(dir, cfg, Runtime::Cpu { model, cache }))
    }

    /// The same executor over a model already loaded on a GPU.
    pub fn on_gpu(dir: &Path, model: CudaLlama) -> Self {
        let cfg = model.cfg.clone();
        Self::with_runtime(dir, cfg, Runtime::Cuda(Box::new(model)))
    }

    fn with_runtime(dir: &Path, cfg: ModelConfig, runtime: Runtime) -> Self {
        // generation_config.json's eos ids win over config.json's (as in transformers).
        let mut eos = cfg.eos_token_ids.clone();
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => eos = n.as_u64().map(|x| vec![x as u32]).unwrap_or(eos),
                    Some(serde_json::Value::Array(a)) => {
                        eos = a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()
                    }
                    _ => {}
                }
            }
        }
        Self {
            cfg,
            runtime,
            eos,
            rngs: HashMap::new(),
            logits: Vec::new(),
            proposer: None,
            draft_probs: HashMap::new(),
            seed: None,
        }
    }

    /// The CPU model, when the forward pass runs on the CPU.
    pub fn cpu_model(&self) -> Option<Arc<LlamaModel>> {
        match &self.runtime {
            Runtime::Cpu { model, .. } => Some(model.clone()),
            Runtime::Cuda(_) => None,
        }
    }

    /// KV blocks in the cache (the scheduler's pool must not exceed it).
    pub fn num_blocks(&self) -> usize {
        match &self.runtime {
            Runtime::Cpu { cache, .. } => cache.num_blocks(),
            Runtime::Cuda(m) => m.num_blocks,
        }
    }

    /// "cpu" or "cuda:N (GPU name)".
    pub fn device(&self) -> String {
        match &self.runtime {
            Runtime::Cpu { .. } => "cpu".into(),
            Runtime::Cuda(m) => format!("cuda:{} ({})", m.gpu.ctx.ordinal(), m.gpu.name),
        }
    }

    /// How weights are stored: "float32", "bfloat16", "float16".
    pub fn dtype_name(&self) -> &'static str {
        match &self.runtime {
            Runtime::Cpu { model, .. } => model.dtype.name(),
            Runtime::Cuda(m) => match m.dt {
                Dt::Bf16 => "bfloat16",
                Dt::F16 => "float16",
            },
        }
    }

    /// What the KV cache holds: on a GPU, the weights' 16-bit type.
    pub fn kv_dtype_name(&self) -> &'static str {
        match &self.runtime {
            Runtime::Cpu { model, .. } => model.kv_dtype().name(),
            Runtime::Cuda(_) => self.dtype_name(),
        }
    }
}

/// One sequence whose logits are sampled this step: `rows` logit rows from `first`; more than one
/// when it carries drafts to verify.
struct SampleJob {
    /// Index of the sequence in the plan.
    seq: usize,
    id: ReqId,
    first: usize,
    rows: usize,
}

impl ModelExecutor {
    /// Speculative decoding: where drafts come from.
    pub fn set_proposer(&mut self, proposer: Proposer) {
        self.proposer = Some(proposer);
    }

    /// Make unseeded sampling reproducible: each request's stream derives from `seed` and its id.
    pub fn set_seed(&mut self, seed: Option<u64>) {
        self.seed = seed;
    }
}

/// Sample one sequence's next token(s) from its logit rows: the plain case is one row; with
/// drafts, each row verifies the draft before it (rejection sampling, the target's logit
/// adjustments and masks applied position by position) and the first rejection ends it. It
/// reads only its own rows, its request's random stream and draft probabilities, so sequences
/// can be sampled on different threads with the same results.
fn sample_seq(
    job: &SampleJob,
    rows: &mut [f32],
    s: &ScheduledSeq,
    rng: &mut SmallRng,
    draft_probs: Option<Vec<Vec<f32>>>,
    eos: &[u32],
) -> ExecOutput {
    let vocab = rows.len() / job.rows;
    let p = &s.sampling;
    let prompt = s.prompt().unwrap_or(&[]);
    let drafts = s.drafts();
    let mut out = ExecOutput::default();
    // Penalties read the output so far (carried in the plan when they are on); the accepted
    // drafts join it position by position.
    let mut output = std::borrow::Cow::Borrowed(s.output().unwrap_or(&[]));
    let mut accepted = 0;
    for i in 0..job.rows {
        let row = &mut rows[i * vocab..(i + 1) * vocab];
        let raw = p.logprobs.map(|_| row.to_vec());
        sample::adjust_logits(row, p, prompt, &output);
        if let Some(mask) = s.token_masks.get(i) {
            // Structured output: only what keeps the text in its grammar (row i's mask is the
            // grammar's after the i drafts before it); the grammar, not `min_tokens`, says where
            // it may end.
            sample::mask_logits(row, mask);
        } else if s.num_output + i < p.min_tokens {
            // Too early to stop: end-of-sequence cannot be drawn (row i follows the i drafts
            // accepted before it).
            for &e in eos {
                if let Some(l) = row.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let (token, done) = if i < drafts.len() {
            let target = sample::distribution(row, p);
            let q = draft_probs.as_ref().and_then(|d| d.get(i)).map(|v| &v[..]);
            match spec::check_draft(&target, drafts[i], q, rng) {
                Verdict::Accept => {
                    accepted += 1;
                    (drafts[i], false)
                }
                Verdict::Reject(t) => (t, true),
            }
        } else {
            (sample::sample(row, p, rng), true)
        };
        if let (Some(k), Some(raw)) = (p.logprobs, raw) {
            out.logprobs.push((job.id, sample::logprobs(&raw, token, k)));
        }
        out.sampled.push((job.id, token));
        if done {
            break;
        }
        output.to_mut().push(token);
    }
    if job.rows > 1 {
        out.accepted.push((job.id, accepted));
    }
    out
}

impl Executor for ModelExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<ExecOutput> {
        for c in &plan.copies {
            match &mut self.runtime {
                Runtime::Cpu { cache, .. } => cache.copy_block(c.src as usize, c.dst as usize),
                Runtime::Cuda(m) => m.copy_block(c.src as usize, c.dst as usize)?,
            }
            if let Some(Proposer::Draft(d)) = &mut self.proposer {
                d.copy_block(c.src as usize, c.dst as usize);
            }
        }
        let bs = match &self.runtime {
            Runtime::Cpu { cache, .. } => cache.block_size,
            Runtime::Cuda(m) => m.block_size,
        };
        let mut input =
            BatchInput { tokens: vec![], positions: vec![], slots: vec![], seqs: vec![], logit_rows: vec![] };
        let mut jobs = Vec::new();
        // (sequence index, prompt position p, prompt token p, top k, logit row)
        let mut prompt_rows: Vec<(usize, usize, u32, usize, usize)> = Vec::new();
        for (si, s) in plan.seqs.iter().enumerate() {
            if s.token_ids.len() != s.num_tokens {
                return Err(HoraeError::Executor(format!("request {} has no token ids", s.id)));
            }
            let row = input.tokens.len();
            input.tokens.extend_from_slice(&s.token_ids);
            input.positions.extend(s.start..s.start + s.num_tokens);
            input.slots.extend(s.slots(bs));
            input.seqs.push(AttnSeq { row, num_tokens: s.num_tokens, start: s.start, block_table: &s.block_table });
            if s.samples {
                // The last real token's row, then one per draft.
                let rows = 1 + s.num_draft;
                jobs.push(SampleJob { seq: si, id: s.id, first: input.logit_rows.len(), rows });
                input.logit_rows.extend(row + s.num_tokens - rows..row + s.num_tokens);
            }
            if let (Some(k), Some(prompt)) = (s.sampling.prompt_logprobs, s.prompt()) {
                // Row of position p predicts prompt token p + 1.
                for p in s.start..(s.start + s.num_tokens).min(prompt.len() - 1) {
                    prompt_rows.push((si, p + 1, prompt[p + 1], k, row + p - s.start));
                }
            }
        }
        let num_sample_rows = input.logit_rows.len();
        input.logit_rows.extend(prompt_rows.iter().map(|r| r.4));
        let vocab = self.cfg.vocab_size;
        let mut out = ExecOutput::default();
        // The logits buffer is kept between steps (an error just drops it).
        let mut logits = std::mem::take(&mut self.logits);
        // Jobs whose logits must come to the host (all of them on the CPU).
        let mut host_jobs: Vec<&SampleJob> = jobs.iter().collect();
        match &mut self.runtime {
            Runtime::Cpu { model, cache } => model.forward(&input, cache, &mut logits)?,
            Runtime::Cuda(m) => {
                m.forward(&input)?;
                let (gpu_jobs, rest): (Vec<&SampleJob>, Vec<&SampleJob>) = jobs.iter().partition(|j| {
                    let s = &plan.seqs[j.seq];
                    s.token_masks.is_empty() && sampler::can_sample_on_gpu(&s.sampling, j.rows, s.num_output)
                });
                host_jobs = rest;
                if !host_jobs.is_empty() || !prompt_rows.is_empty() {
                    logits = m.logits_to_host(input.logit_rows.len())?;
                }
                // Each request's generator, taken out of the map for the draw.
                let engine_seed = self.seed;
                let mut gens: Vec<(ReqId, SmallRng)> = gpu_jobs
                    .iter()
                    .map(|j| {
                        let seed = plan.seqs[j.seq].sampling.seed;
                        (j.id, self.rngs.remove(&j.id).unwrap_or_else(|| sample::request_rng(j.id, seed, engine_seed)))
                    })
                    .collect();
                let mut draws: Vec<sampler::Draw<'_>> = gpu_jobs
                    .iter()
                    .zip(gens.iter_mut())
                    .map(|(j, (_, rng))| sampler::Draw { row: j.first, params: &plan.seqs[j.seq].sampling, rng })
                    .collect();
                let tokens = sampler::sample(&m.gpu, Ptr::of(&m.gpu, &m.logits), vocab, &mut draws);
                drop(draws);
                for (id, rng) in gens {
                    self.rngs.insert(id, rng);
                }
                for (j, t) in gpu_jobs.iter().zip(tokens?) {
                    out.sampled.push((j.id, t));
                }
            }
        }
        out.prompt_logprobs = prompt_rows
            .iter()
            .enumerate()
            .map(|(i, &(si, pos, token, k, _))| {
                let row = &logits[(num_sample_rows + i) * vocab..(num_sample_rows + i + 1) * vocab];
                (plan.seqs[si].id, pos, sample::logprobs(row, token, k))
            })
            .collect();
        // Each host job's rows (jobs come in the order of their rows), its request's generator
        // and its drafts' probabilities, taken out for the draw.
        let engine_seed = self.seed;
        let mut work = Vec::with_capacity(host_jobs.len());
        let (mut rest, mut at) = (&mut logits[..], 0);
        for job in host_jobs {
            let (mine, tail) = std::mem::take(&mut rest)[(job.first - at) * vocab..].split_at_mut(job.rows * vocab);
            (rest, at) = (tail, job.first + job.rows);
            let s = &plan.seqs[job.seq];
            let rng =
                self.rngs.remove(&job.id).unwrap_or_else(|| sample::request_rng(job.id, s.sampling.seed, engine_seed));
            work.push((job, mine, s, rng, self.draft_probs.remove(&job.id)));
        }
        let eos = &self.eos;
        let run = |(job, rows, s, mut rng, probs): (&SampleJob, &mut [f32], &ScheduledSeq, SmallRng, _)| {
            (sample_seq(job, rows, s, &mut rng, probs, eos), job.id, rng)
        };
        // A sampled row costs about 0.3 ms (an exp per token of the vocabulary and a selection),
        // on the engine's thread while the workers wait: 32 sampled rows ran at 0.72x greedy
        // decode. Requests are independent (each its own stream), so they run on the workers;
        // greedy rows (an argmax) stay here.
        let parallel = work.len() > 1 && work.iter().any(|w| !w.2.sampling.is_greedy());
        let parts: Vec<_> =
            if parallel { work.into_par_iter().map(run).collect() } else { work.into_iter().map(run).collect() };
        for (part, id, rng) in parts {
            self.rngs.insert(id, rng);
            out.sampled.extend(part.sampled);
            out.accepted.extend(part.accepted);
            out.logprobs.extend(part.logprobs);
        }
        self.logits = logits;
        Ok(out)
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }

    fn release(&mut self, id: ReqId) {
        self.rngs.remove(&id);
        self.draft_probs.remove(&id);
        if let Some(Proposer::Draft(d)) = &mut self.proposer {
            d.forget(id);
        }
    }

    fn preempted(&mut self, id: ReqId) {
        self.draft_probs.remove(&id);
        if let Some(Proposer::Draft(d)) = &mut self.proposer {
            d.forget(id);
        }
    }

    fn lookup_proposals(&self) -> bool {
        matches!(self.proposer, Some(Proposer::Ngram { .. }))
    }

    fn propose(&mut self, candidates: &[DraftCandidate], k: usize) -> Result<Vec<(ReqId, Vec<u32>)>> {
        let vocab = self.cfg.vocab_size as u32;
        let mut proposals = self.propose_unchecked(candidates, k)?;
        // A draft token the target cannot embed would fail the whole batch's forward pass: cut
        // that request's drafts there instead, so a bad proposal costs only its own speedup.
        for (id, draft) in &mut proposals {
            if let Some(bad) = draft.iter().position(|&t| t >= vocab) {
                draft.truncate(bad);
                if let Some(q) = self.draft_probs.get_mut(id) {
                    q.truncate(bad);
                }
            }
        }
        Ok(proposals)
    }
}

impl ModelExecutor {
    fn propose_unchecked(&mut self, candidates: &[DraftCandidate], k: usize) -> Result<Vec<(ReqId, Vec<u32>)>> {
        match &mut self.proposer {
            None => Ok(Vec::new()),
            Some(Proposer::Ngram { min_n, max_n }) => Ok(candidates
                .iter()
                .filter(|c| !c.token_ids.is_empty())
                .map(|c| (c.id, ngram::propose(&c.token_ids, k, *min_n, *max_n)))
                .collect()),
            Some(Proposer::Draft(d)) => {
                let proposals = d.propose(candidates, k, &mut self.rngs, self.seed)?;
                let mut out = Vec::with_capacity(proposals.len());
                for (id, tokens, probs) in proposals {
                    self.draft_probs.insert(id, probs);
                    out.push((id, tokens));
                }
                Ok(out)
            }
        }
    }
}
