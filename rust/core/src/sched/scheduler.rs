//! The shared scheduling loop (vLLM v1 style: one flattened batch where a prefill chunk and a
//! decode token are the same thing, "compute the next `n` tokens of this sequence").
//!
//! Each step: first the running sequences, oldest first, each gets its next tokens; when blocks run
//! out, the most recently admitted sequence is preempted by recompute (its blocks are freed and it
//! goes back to the head of the queue). Then, if nobody was preempted, waiting requests are
//! admitted in arrival order while the policy agrees, the token budget lasts and their first chunk
//! fits; the first refusal stops admission (no overtaking).

use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;

use super::policy::{AdmissionPolicy, PoolView, SeqLoad};
use super::{SchedulerConfig, TrueLengths};
use crate::engine::{FinishReason, ReqId, Request, RequestState};
use crate::error::{HoraeError, Result};
use crate::kv::{BlockCopy, KvManager};
use crate::spec::{SpecController, SpecStats};
use crate::spec::control::StepShape;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: ReqId,
    /// Tokens already computed; this step computes positions `start .. start + num_tokens`.
    pub start: usize,
    pub num_tokens: usize,
    /// Whether this step reaches the end of the known tokens, so the executor samples one.
    pub samples: bool,
    /// The last `num_draft` of the `num_tokens` are the request's draft tokens (speculative
    /// decoding), to be verified; they have KV slots but are not yet part of its output.
    pub num_draft: usize,
}

/// What a step computes, in the terms of the simulator's cost model (fitted to measured step
/// times of the real engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepFeatures {
    /// Tokens computed this step (prefill chunks + one per decoding sequence).
    pub num_tokens: f64,
    pub num_seqs: f64,
    /// Sum over sequences of the context length read by attention (KV traffic).
    pub context_tokens: f64,
    /// Sum over new tokens of the positions each attends to (attention arithmetic).
    pub attention_pairs: f64,
}

impl StepFeatures {
    /// What `plan` computes.
    pub fn of_plan(plan: &SchedulePlan) -> Self {
        let mut f = StepFeatures::default();
        for s in &plan.seqs {
            let (start, n) = (s.start as f64, s.num_tokens as f64);
            f.num_tokens += n;
            f.num_seqs += 1.0;
            f.context_tokens += start + n;
            f.attention_pairs += n * start + n * (n + 1.0) / 2.0;
        }
        f
    }
}

#[derive(Debug, Clone, Default)]
pub struct SchedulePlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Copy-on-write block copies the executor performs before running the step.
    pub copies: Vec<BlockCopy>,
    pub preempted: Vec<ReqId>,
    pub num_batched_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    pub preemptions: u64,
    pub recomputed_tokens: u64,
    pub admitted: u64,
    /// Output lengths handed to the policy's length history.
    pub lengths_recorded: u64,
}

/// Whether a request of `prompt_len` tokens and up to `max_tokens` outputs can ever run in a pool
/// of `capacity_tokens`: the message says why not. Callers that queue requests before they reach
/// the scheduler (the Python binding's inbox) check with this, so they refuse at once.
pub fn check_fits(prompt_len: usize, max_tokens: usize, capacity_tokens: usize) -> std::result::Result<(), String> {
    if prompt_len == 0 {
        return Err("the prompt is empty".into());
    }
    if max_tokens == 0 {
        return Err("max_tokens must be at least 1".into());
    }
    if prompt_len.saturating_add(max_tokens) > capacity_tokens {
        return Err(format!("prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the whole KV pool ({capacity_tokens} tokens)"));
    }
    Ok(())
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvManager,
    policy: Box<dyn AdmissionPolicy>,
    requests: HashMap<ReqId, Request>,
    waiting: VecDeque<ReqId>,
    /// In admission order: the last one is the first to be preempted.
    running: Vec<ReqId>,
    stats: SchedulerStats,
    spec: Option<SpecController>,
    /// This step's speculation length (SmartSpec's k).
    step_k: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, true_lengths: Option<TrueLengths>) -> Result<Self> {
        cfg.validate()?;
        let kv = KvManager::with_token_budget(cfg.kv_cache_tokens, cfg.block_size, cfg.prefix_caching)?;
        let policy = cfg.build_policy(true_lengths)?;
        let spec = cfg.spec.clone().map(SpecController::new).transpose()?;
        Ok(Self {
            spec,
            step_k: 0,
            cfg,
            kv,
            policy,
            requests: HashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }
    pub fn predicted_peak(&self) -> Option<u64> {
        self.policy.predicted_peak()
    }
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }
    pub fn request(&self, id: ReqId) -> Option<&Request> {
        self.requests.get(&id)
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn has_work(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Queue a request (checked by `check_fits`). One that could never fit the pool, even alone, is refused here rather
    /// than left to block the queue forever.
    pub fn add(&mut self, req: Request) -> Result<()> {
        let invalid = |reason: String| Err(HoraeError::InvalidRequest { id: req.id, reason });
        if self.requests.contains_key(&req.id) {
            return Err(HoraeError::DuplicateRequest(req.id));
        }
        if let Err(reason) = check_fits(req.prompt_len(), req.max_tokens, self.kv.capacity_tokens()) {
            return invalid(reason);
        }
        self.waiting.push_back(req.id);
        self.requests.insert(req.id, req);
        Ok(())
    }

    fn pool_view(&self) -> PoolView {
        let pool = self.kv.pool();
        PoolView { block_size: self.kv.block_size(), total_blocks: pool.num_total(), used_blocks: pool.num_used() }
    }

    fn load_of(&self, id: ReqId) -> SeqLoad {
        let r = &self.requests[&id];
        SeqLoad { id, prompt_len: r.prompt_len(), generated: r.output.len(), max_tokens: r.max_tokens, forecast: r.forecast }
    }

    pub fn schedule(&mut self, now: f64) -> SchedulePlan {
        let mut plan = SchedulePlan::default();
        let mut budget = self.cfg.max_batched_tokens;
        self.schedule_running(&mut plan, &mut budget);
        self.step_k = 0; // chosen by `plan_spec` for one step only
        if plan.preempted.is_empty() {
            self.admit_waiting(&mut plan, &mut budget, now);
        }
        plan.num_batched_tokens = self.cfg.max_batched_tokens - budget;
        plan
    }

    fn schedule_running(&mut self, plan: &mut SchedulePlan, budget: &mut usize) {
        // Tokens the running sequences need without drafts: drafts only get what is left over,
        // so they never push another sequence's decode token or prefill chunk out of the step.
        let mut base_left: usize = if self.step_k > 0 {
            self.running.iter().map(|id| self.requests[id].total_len() - self.requests[id].num_computed).sum()
        } else {
            0
        };
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let r = &self.requests[&id];
            let (start, total) = (r.num_computed, r.total_len());
            let mut n = (total - start).min(*budget);
            base_left = base_left.saturating_sub(total - start);
            // Draft tokens ride along a decode step if the budget and the pool have room for
            // them; they never cause a preemption.
            let spare = budget.saturating_sub(n + base_left);
            let mut drafts = if n == total - start { self.step_k.min(r.draft.len()).min(spare) } else { 0 };
            // Saturating: after a failed step the slots may already be there.
            let slots_for = |kv: &KvManager, n: usize| (start + n).saturating_sub(kv.num_tokens(id));
            if drafts > 0 && !self.kv.can_append(id, slots_for(&self.kv, n + drafts)) {
                drafts = 0;
            }
            n += drafts;
            let slots = slots_for(&self.kv, n);
            let mut preempted_self = false;
            while !self.kv.can_append(id, slots) {
                let victim = *self.running.last().expect("the current sequence is running");
                self.preempt(victim);
                plan.preempted.push(victim);
                if victim == id {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                break;
            }
            plan.copies.extend(self.kv.append(id, slots).expect("can_append checked"));
            plan.seqs.push(ScheduledSeq { id, start, num_tokens: n, samples: start + n >= total, num_draft: drafts });
            *budget -= n;
            i += 1;
        }
    }

    fn admit_waiting(&mut self, plan: &mut SchedulePlan, budget: &mut usize, now: f64) {
        let pool = self.pool_view();
        let mut running: Vec<SeqLoad> = self.running.iter().map(|&id| self.load_of(id)).collect();
        self.policy.begin_step(&mut running, &pool);
        for s in &running {
            self.requests.get_mut(&s.id).expect("running request exists").forecast = s.forecast;
        }
        let bs = self.kv.block_size();
        while let Some(&id) = self.waiting.front() {
            if self.running.len() >= self.cfg.max_num_seqs || *budget == 0 {
                break;
            }
            let r = &self.requests[&id];
            let total = r.total_len();
            // Leave at least the last token to compute: its logits give the next token. A request
            // that wants prompt logprobs needs every position's logits: no cache for it.
            let lookup = if r.sampling.prompt_logprobs.is_some() {
                0
            } else {
                ((total - 1) / bs).min(r.prompt_block_hashes.len())
            };
            let cached_blocks = self.kv.count_cached_prefix(&r.prompt_block_hashes[..lookup]);
            let cached = cached_blocks * bs;
            let n = (total - cached).min(*budget);
            let chunk_blocks = self.kv.blocks_for(cached + n) - cached_blocks;
            // Reviving cached blocks takes them out of the allocatable pool too.
            if chunk_blocks + cached_blocks > self.kv.pool().num_allocatable() {
                break;
            }
            let mut load = self.load_of(id);
            let new_blocks = self.kv.blocks_for(total) - cached_blocks;
            let lone = self.running.is_empty();
            // With nothing running a request always goes in (add() checked it fits alone);
            // otherwise a request predicted too big would wait forever.
            let accepted = self.policy.admit(&mut load, new_blocks, &pool);
            self.requests.get_mut(&id).expect("waiting request exists").forecast = load.forecast;
            if !accepted && !lone {
                break;
            }
            self.waiting.pop_front();
            let hashes = &self.requests[&id].prompt_block_hashes[..lookup];
            let got = self.kv.open(id, hashes).expect("a waiting request has no block table");
            debug_assert_eq!(got, cached);
            plan.copies.extend(self.kv.append(id, n).expect("fit checked above"));
            let r = self.requests.get_mut(&id).expect("waiting request exists");
            r.num_computed = got;
            r.cached_tokens += got as u64;
            r.state = RequestState::Running;
            r.times.first_scheduled.get_or_insert(now);
            plan.seqs.push(ScheduledSeq { id, start: got, num_tokens: n, samples: got + n == total, num_draft: 0 });
            self.running.push(id);
            self.stats.admitted += 1;
            *budget -= n;
            if !accepted {
                // Forced in past a refusal: the policy's view of the batch lacks it, so stop here.
                break;
            }
        }
    }

    /// Preempt by recompute: free the blocks, keep the generated tokens, requeue at the head.
    fn preempt(&mut self, id: ReqId) {
        self.running.retain(|&r| r != id);
        self.kv.free(id);
        let r = self.requests.get_mut(&id).expect("running request exists");
        r.recomputed_tokens += r.num_computed as u64;
        self.stats.recomputed_tokens += r.num_computed as u64;
        r.num_computed = 0;
        r.preemptions += 1;
        r.draft.clear();
        r.state = RequestState::Preempted;
        self.stats.preemptions += 1;
        self.waiting.push_front(id);
    }

    /// The executor computed `n` more tokens of `id`; their full blocks join the prefix cache.
    pub fn computed(&mut self, id: ReqId, n: usize) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.num_computed += n;
            self.kv.register_computed(id, r.num_computed, &r.prompt_block_hashes);
        }
    }

    /// Speculative decoding is on: the largest number of drafts a sequence may carry.
    pub fn spec_k_max(&self) -> Option<usize> {
        self.spec.as_ref().map(|s| s.config().k_max)
    }

    pub fn spec_stats(&self) -> Option<SpecStats> {
        self.spec.as_ref().map(|s| s.stats())
    }

    /// Running requests whose next step is a decode step with room for at least one draft
    /// (they may still generate two tokens or more): the ones a proposer should draft for.
    /// Drafts left from a step that did not schedule their request are dropped here.
    pub fn spec_candidates(&mut self) -> Vec<ReqId> {
        for id in &self.running {
            self.requests.get_mut(id).expect("running request exists").draft.clear();
        }
        self.running
            .iter()
            .copied()
            .filter(|id| {
                let r = &self.requests[id];
                r.total_len() == r.num_computed + 1 && r.output.len() + 1 < r.max_tokens
            })
            .collect()
    }

    /// A proposer's drafts for `id`, capped so that the request cannot overshoot `max_tokens`.
    pub fn set_draft(&mut self, id: ReqId, mut draft: Vec<u32>) {
        if let Some(r) = self.requests.get_mut(&id) {
            draft.truncate(r.max_tokens.saturating_sub(r.output.len() + 1));
            r.draft = draft;
        }
    }

    /// Choose SmartSpec's k for the next `schedule`: the batch as it stands (running sequences,
    /// their drafts, their KV), predicted with and without speculation. With `assume_drafts`,
    /// every candidate is taken to have that many drafts (a proposer too costly to run before
    /// k is known proposes afterwards, only when k > 0).
    pub fn plan_spec(&mut self, assume_drafts: Option<usize>) -> usize {
        self.step_k = self.choose_spec_k(assume_drafts);
        self.step_k
    }

    fn draft_len(r: &Request, assume: Option<usize>) -> usize {
        match assume {
            Some(k) => k.min(r.max_tokens.saturating_sub(r.output.len() + 1)),
            None => r.draft.len(),
        }
    }

    fn choose_spec_k(&mut self, assume: Option<usize>) -> usize {
        let budget = self.cfg.max_batched_tokens;
        let Some(spec) = self.spec.as_mut() else { return 0 };
        let mut draft_lens = Vec::new();
        let mut ids = Vec::new();
        let mut base = StepShape::default();
        let mut others = 0usize;
        for &id in &self.running {
            let r = &self.requests[&id];
            let left = r.total_len() - r.num_computed;
            base.kv_tokens += r.total_len() as f64;
            base.num_seqs += 1.0;
            base.batched_tokens += left.min(budget) as f64;
            let len = Self::draft_len(r, assume);
            if left == 1 && len > 0 {
                draft_lens.push(len);
                ids.push(id);
            } else if left <= budget {
                others += 1;
            }
        }
        let kv = &self.kv;
        let requests = &self.requests;
        let free = kv.pool().num_allocatable();
        let fits = |k: usize| {
            let need: usize = ids
                .iter()
                .map(|id| {
                    let r = &requests[id];
                    let n = r.total_len() + k.min(Self::draft_len(r, assume));
                    kv.blocks_needed_to_append(*id, n.saturating_sub(kv.num_tokens(*id)))
                })
                .sum();
            need <= free
        };
        spec.choose(&draft_lens, base, others, fits)
    }

    /// After a step that verified `drafted` draft tokens of `id`: `accepted` were kept. The
    /// rejected drafts' KV slots are given back, so the pool holds only computed tokens.
    pub fn drafts_verified(&mut self, id: ReqId, drafted: usize, accepted: usize) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.spec_drafted += drafted as u64;
            r.spec_accepted += accepted as u64;
            r.draft.clear();
            self.kv.truncate(id, r.num_computed);
        }
    }

    /// The proposal `id` had this step if it ran without drafts (k = 0), cleared: its first
    /// token, to compare with the token actually drawn (see `SpecController::observe_acceptance`).
    pub fn take_unused_draft(&mut self, id: ReqId) -> Option<u32> {
        let r = self.requests.get_mut(&id)?;
        let first = r.draft.first().copied();
        r.draft.clear();
        first
    }

    /// Feed SmartSpec the step that just ran: what it computed, its measured seconds, and what
    /// became of the drafts (see `Judged`).
    pub fn spec_observe(&mut self, plan: &SchedulePlan, seconds: f64, judged: crate::spec::Judged) {
        let Some(spec) = self.spec.as_mut() else { return };
        let f = StepFeatures::of_plan(plan);
        let shape = StepShape { kv_tokens: f.context_tokens, batched_tokens: f.num_tokens, num_seqs: f.num_seqs };
        spec.observe_step(shape, seconds);
        spec.observe_acceptance(judged);
    }

    /// Record a sampled token for a running request.
    pub fn push_token(&mut self, id: ReqId, token: u32, now: f64) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.push_token(token, now);
        }
    }

    /// Prompt token `pos`'s logprobs; recomputation after a preemption reports them again and
    /// those repeats are dropped.
    pub fn push_prompt_logprobs(&mut self, id: ReqId, pos: usize, lp: crate::sample::TokenLogprobs) {
        if let Some(r) = self.requests.get_mut(&id) {
            if r.prompt_logprobs.len() + 1 == pos {
                r.prompt_logprobs.push(lp);
            }
        }
    }

    pub fn push_logprobs(&mut self, id: ReqId, lp: crate::sample::TokenLogprobs) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.logprobs.push(lp);
        }
    }

    /// End a request, free its blocks and hand it back. Its output length feeds the length history
    /// unless it was aborted before its first token: a request stopped from outside the core after
    /// N tokens (a stop string, or a client that read what it wanted and hung up, which is how a
    /// serving benchmark ends requests at their true length) is as long as the client wanted it.
    pub fn finish(&mut self, id: ReqId, reason: FinishReason, now: f64) -> Result<Request> {
        let mut r = self.requests.remove(&id).ok_or(HoraeError::UnknownRequest(id))?;
        if let Some(pos) = self.running.iter().position(|&x| x == id) {
            self.running.remove(pos);
        } else if let Some(pos) = self.waiting.iter().position(|&x| x == id) {
            self.waiting.remove(pos);
        }
        self.kv.free(id);
        r.state = RequestState::Finished(reason);
        r.times.finished = Some(now);
        // A failed request's length says nothing about the workload.
        if reason != FinishReason::Error && (reason != FinishReason::Aborted || !r.output.is_empty()) {
            self.policy.record_finished(r.output.len());
            self.stats.lengths_recorded += 1;
        }
        Ok(r)
    }

    /// Test helper: block manager invariants plus "every running request holds blocks, no waiting
    /// one does".
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.kv.check_invariants()?;
        for id in &self.waiting {
            if self.kv.contains(*id) {
                return Err(format!("waiting request {id} holds blocks"));
            }
        }
        if self.kv.num_sequences() != self.running.len() {
            return Err(format!("{} block tables for {} running", self.kv.num_sequences(), self.running.len()));
        }
        if self.waiting.len() + self.running.len() != self.requests.len() {
            return Err("a live request is neither waiting nor running".into());
        }
        Ok(())
    }
}
