//! The shared scheduling loop (vLLM v1 style: one flattened batch where a prefill chunk and a
//! decode token are the same thing, "compute the next `n` tokens of this sequence").
//!
//! Each step: first the running sequences, oldest first, each gets its next tokens; when blocks run
//! out, the most recently admitted sequence is preempted by recompute (its blocks are freed and it
//! goes back to the head of the queue). Then, if nobody was preempted, waiting requests are
//! admitted in arrival order while the policy agrees, the token budget lasts and their first chunk
//! fits; the first refusal stops admission (no overtaking).

use std::collections::VecDeque;

use rayon::prelude::*;
use rustc_hash::FxHashMap as HashMap;

use super::slo::{Outlook, OutputLengths, Preemption, QueueDiscipline, StepTimes};
use super::smartspec::SpecController;
use super::{SchedulerConfig, TrueLengths};
use crate::error::{HoraeError, Result};
use crate::grammar::Grammar;
use crate::kv::KvManager;
use crate::plan::{ScheduledSeq, StepPlan};
pub use crate::request::MAX_SCENARIOS;
use crate::request::{FinishReason, Prompt, ReqId, Request, RequestState};

mod shed;
mod spec;

// ---------------------------------------------------------------------------------------------
// The admission seam: the one decision on which the four schedulers differ. Everything else
// (continuous batching, chunked prefill, preemption) is shared in [`super::Scheduler`].

/// What a policy may know about a request: never its true output length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLoad {
    pub id: ReqId,
    pub prompt_len: usize,
    /// Output tokens generated so far (non-zero for a preempted request coming back).
    pub generated: usize,
    pub max_tokens: usize,
    /// The policy's predicted final output lengths, one per scenario (0 = none yet). The
    /// scheduler stores them with the request between steps, so a prediction is drawn once and
    /// kept while it is still possible (longer than what was generated), instead of re-drawing the
    /// whole batch every step.
    pub forecast: [u32; MAX_SCENARIOS],
}

impl SeqLoad {
    /// KV tokens the request holds once its prompt and outputs so far are computed.
    pub fn held(&self) -> usize {
        self.prompt_len + self.generated
    }
}

/// The KV pool as the policy sees it, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolView {
    pub block_size: usize,
    pub total_blocks: usize,
    pub used_blocks: usize,
}

impl PoolView {
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks * self.block_size
    }
}

pub trait AdmissionPolicy: Send {
    fn name(&self) -> &'static str;

    /// Called once per step before the first candidate, with the running batch.
    fn begin_step(&mut self, running: &mut [SeqLoad], pool: &PoolView);

    /// Admit `candidate`, whose prompt needs `new_blocks` fresh blocks (after prefix-cache hits)?
    /// `true` is final: the candidate joins the batch that later candidates are judged against.
    fn admit(&mut self, candidate: &mut SeqLoad, new_blocks: usize, pool: &PoolView) -> bool;

    /// A request finished normally (stop or length) with this many output tokens.
    fn record_finished(&mut self, _output_len: usize) {}

    /// The policy's predicted peak KV use of the running batch, in tokens, where it has one.
    fn predicted_peak(&self) -> Option<u64> {
        None
    }

    /// The output lengths the policy has recorded, oldest first, where it keeps a history (what
    /// a saved history file holds).
    fn recorded_lengths(&self) -> Option<Vec<u32>> {
        None
    }
}

// ---------------------------------------------------------------------------------------------

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
        return Err(format!(
            "prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the whole KV pool ({capacity_tokens} tokens)"
        ));
    }
    Ok(())
}

/// A sequence placed in this step: what `ScheduledSeq` is made of once the step's blocks are all
/// allocated.
struct Placed {
    id: ReqId,
    start: usize,
    num_tokens: usize,
    samples: bool,
    num_draft: usize,
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
    /// Step seconds learned from the steps that ran, and recent output lengths: what the `slo`
    /// queue predicts with.
    times: StepTimes,
    lengths: OutputLengths,
    /// Whether any request so far had a non-zero priority (else ordering is a no-op in FCFS).
    prioritized: bool,
    /// When the waiting queue was last put in order, if no request was added since: a step
    /// orders it once (the rules' scan, then admission).
    ordered_at: Option<f64>,
    /// Long prefills given tokens in the step being scheduled (`max_long_partial_prefills`).
    long_in_step: usize,
    /// The last step's admission stopped at a request still waiting for a free slot, for KV
    /// memory or for the policy's consent (or the step preempted): the head of the queue waits
    /// for something the `slo` queue's step model cannot see, so it is charged full steps.
    head_held: bool,
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
            times: StepTimes::default(),
            lengths: OutputLengths::default(),
            prioritized: false,
            ordered_at: None,
            long_in_step: 0,
            head_held: false,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }
    /// `KvManager::reset_prefix_cache`: false while a request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.kv.reset_prefix_cache()
    }
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }
    pub fn predicted_peak(&self) -> Option<u64> {
        self.policy.predicted_peak()
    }
    pub fn recorded_lengths(&self) -> Option<Vec<u32>> {
        self.policy.recorded_lengths()
    }
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }
    pub fn request(&self, id: ReqId) -> Option<&Request> {
        self.requests.get(&id)
    }
    /// For the engine's per-token bookkeeping (tokens, logprobs, text); scheduling state changes
    /// only through the methods below.
    pub fn request_mut(&mut self, id: ReqId) -> Option<&mut Request> {
        self.requests.get_mut(&id)
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Tokens the waiting requests still have to compute: the prefill work queued here.
    pub fn waiting_tokens(&self) -> u64 {
        self.waiting.iter().map(|id| (self.requests[id].total_len() - self.requests[id].num_computed) as u64).sum()
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
        let mut req = req;
        req.slo = req.slo.or(&self.cfg.default_slo);
        self.prioritized |= req.priority != 0;
        self.ordered_at = None;
        // Its cached prefix will be read when it starts: keep it from being evicted first.
        self.kv.touch_prefix(&req.prompt_block_hashes[..self.cache_lookup(&req)]);
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
        SeqLoad {
            id,
            prompt_len: r.prompt_len(),
            generated: r.output.len(),
            max_tokens: r.max_tokens,
            forecast: r.forecast,
        }
    }

    pub fn schedule(&mut self, now: f64) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut placed = Vec::with_capacity(self.running.len() + 8);
        let mut budget = self.cfg.max_batched_tokens;
        self.long_in_step = 0;
        self.schedule_running(&mut placed, &mut plan, &mut budget, now);
        self.step_k = 0; // chosen by `plan_spec` for one step only
        self.head_held = !plan.preempted.is_empty();
        if plan.preempted.is_empty() {
            self.order_waiting(now);
            self.admit_waiting(&mut placed, &mut plan, &mut budget, now);
        }
        plan.num_batched_tokens = self.cfg.max_batched_tokens - budget;
        plan.seqs = placed.into_iter().map(|p| self.scheduled(p)).collect();
        self.fill_token_masks(&mut plan);
        plan
    }

    /// Structured output: each grammar's masks for this step's draws, in the plan (as vLLM's
    /// scheduler output carries its grammar bitmask), so the executor reads only the plan: one
    /// per sampled row, through the drafts it verifies. A mask walks the vocabulary's trie
    /// (0.3-0.4 ms for SmolLM2's 49,152 tokens on a Zen 5), so several sequences' are computed
    /// on rayon's threads, which wait for the step meanwhile.
    fn fill_token_masks(&mut self, plan: &mut StepPlan) {
        // Taken out of their requests for the parallel walk, and put back.
        let mut taken: Vec<(usize, Grammar)> = (plan.seqs.iter().enumerate().filter(|(_, s)| s.samples))
            .filter_map(|(i, s)| self.requests.get_mut(&s.id).and_then(|r| r.grammar.take()).map(|g| (i, g)))
            .collect();
        let seqs = &plan.seqs;
        let masks = |(i, g): &mut (usize, Grammar)| g.masks_through(seqs[*i].drafts());
        let masks: Vec<Vec<Vec<u32>>> = if taken.len() > 1 {
            taken.par_iter_mut().map(masks).collect()
        } else {
            taken.iter_mut().map(masks).collect()
        };
        for ((i, g), masks) in taken.into_iter().zip(masks) {
            let s = &mut plan.seqs[i];
            s.token_masks = masks;
            self.requests.get_mut(&s.id).expect("a scheduled request exists").grammar = Some(g);
        }
    }

    /// Everything the executor needs about a placed sequence, once every block is allocated: its
    /// tokens at the computed positions (drafts last), block table and sampling; the whole
    /// context only when sampling reads it.
    fn scheduled(&self, p: Placed) -> ScheduledSeq {
        let r = &self.requests[&p.id];
        let total = r.total_len();
        let (mut token_ids, mut context) = (Vec::new(), None);
        if let Prompt::Tokens(_) = r.prompt {
            token_ids = (p.start..p.start + p.num_tokens)
                .map(|i| if i < total { r.token_at(i) } else { r.draft.get(i - total).copied() })
                .collect::<Option<_>>()
                .expect("scheduled positions hold tokens or drafts");
            if r.sampling.reads_output() || r.sampling.prompt_logprobs.is_some() {
                context = Some(r.all_token_ids());
            }
        }
        ScheduledSeq {
            id: p.id,
            start: p.start,
            num_tokens: p.num_tokens,
            samples: p.samples,
            num_draft: p.num_draft,
            token_ids,
            block_table: self.kv.shared_block_table(p.id).expect("a scheduled request holds blocks"),
            sampling: r.sampling.clone(),
            prompt_len: r.prompt_len(),
            num_output: r.output.len(),
            context,
            token_masks: Vec::new(),
        }
    }

    /// Whether a sequence of `total` tokens with `left` to compute is a long prefill: still
    /// prefilling a prompt (or recomputing a sequence) longer than the threshold, as vLLM counts.
    fn is_long_prefill(&self, left: usize, total: usize) -> bool {
        left > 1 && self.cfg.long_prefill_token_threshold.is_some_and(|t| total > t)
    }

    /// Whether this long prefill must wait: the step has as many as `max_long_partial_prefills`.
    fn long_prefill_waits(&self, left: usize, total: usize) -> bool {
        self.is_long_prefill(left, total) && self.long_in_step >= self.cfg.max_long_partial_prefills
    }

    fn count_long_prefill(&mut self, left: usize, total: usize) {
        self.long_in_step += usize::from(self.is_long_prefill(left, total));
    }

    /// Tokens of a sequence with `left` to compute that go into this step: what the budget
    /// allows, and for a prefill (more than one token left) at most the long-prefill threshold.
    fn chunk(&self, left: usize, budget: usize) -> usize {
        match self.cfg.long_prefill_token_threshold {
            Some(cap) if left > 1 => left.min(budget).min(cap),
            _ => left.min(budget),
        }
    }

    fn schedule_running(&mut self, placed: &mut Vec<Placed>, plan: &mut StepPlan, budget: &mut usize, now: f64) {
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
            if self.long_prefill_waits(total - start, total) {
                // Enough long prefills advance this step: this one waits for the next.
                base_left = base_left.saturating_sub(total - start);
                i += 1;
                continue;
            }
            let mut n = self.chunk(total - start, *budget);
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
                let victim = self.victim(i, now);
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
            placed.push(Placed { id, start, num_tokens: n, samples: start + n >= total, num_draft: drafts });
            self.count_long_prefill(total - start, total);
            *budget -= n;
            i += 1;
        }
    }

    /// Who a preemption takes while placing `running[at]` (`SchedulerConfig::preemption`): the
    /// newest, or the one whose preemption loses the least goodput (`Outlook::preemption_loss`;
    /// ties: the newest). Only requests not yet placed this step are candidates, the current one
    /// included.
    fn victim(&self, at: usize, now: f64) -> ReqId {
        let newest = *self.running.last().expect("the current sequence is running");
        let rule = self.cfg.preemption.unwrap_or(match self.cfg.queue {
            QueueDiscipline::Fcfs => Preemption::Newest,
            QueueDiscipline::Slo => Preemption::LeastLoss,
        });
        if rule == Preemption::Newest {
            return newest;
        }
        let outlook = self.outlook();
        let out = self.planned_output();
        let loss = |id: &ReqId| outlook.preemption_loss(&self.requests[id], now, out);
        let mut best = (newest, loss(&newest));
        for id in self.running[at..].iter().rev() {
            let l = loss(id);
            if l < best.1 {
                best = (*id, l);
            }
        }
        best.0
    }

    /// Prompt tokens of the waiting requests not yet started, in queue order, counted up to
    /// `cap` (the sum stops there: a long queue costs no more than a short one).
    fn queued_prompt_tokens(&self, cap: usize) -> usize {
        let mut sum = 0;
        for r in self.waiting.iter().map(|id| &self.requests[id]).filter(|r| r.times.first_scheduled.is_none()) {
            sum += r.total_len();
            if sum >= cap {
                break;
            }
        }
        sum
    }

    fn outlook(&self) -> Outlook<'_> {
        Outlook { times: &self.times, budget: self.cfg.max_batched_tokens, decode_step: self.times.mean_step() }
    }

    /// The output length the `slo` queue plans a request's decode time with (`OutputLengths`).
    pub fn planned_output(&self) -> f64 {
        self.lengths.planned()
    }

    /// Prompt tokens a second that full prefill steps compute, from the step times measured so
    /// far (0 before any step): what a router estimates a replica's queue wait with.
    pub fn prefill_rate(&self) -> f64 {
        let budget = self.cfg.max_batched_tokens;
        let seconds = self.times.step(budget);
        if seconds > 0.0 {
            budget as f64 / seconds
        } else {
            0.0
        }
    }

    /// Put the waiting queue in serving order. Started (preempted) requests stay first, in their
    /// order; then by priority; then FCFS keeps arrival order, the `slo` queue puts the least
    /// slack first (the latest start that still meets the bounds, `planned_output`).
    /// Stable sorts of a queue already nearly in order cost about one pass.
    fn order_waiting(&mut self, now: f64) {
        let slo = self.cfg.queue == QueueDiscipline::Slo;
        if (!slo && !self.prioritized) || self.ordered_at == Some(now) {
            return;
        }
        self.ordered_at = Some(now);
        let outlook = self.outlook();
        let out = self.planned_output();
        let requests = &self.requests;
        let key = |id: &ReqId| {
            let r = &requests[id];
            let started = r.times.first_scheduled.is_some();
            let slack = if slo && !started { outlook.latest_start(r, out, None) } else { f64::NEG_INFINITY };
            (!started, r.priority, slack)
        };
        let mut keyed: Vec<_> = self.waiting.iter().map(|id| (key(id), *id)).collect();
        keyed.sort_by(|a, b| a.0 .0.cmp(&b.0 .0).then(a.0 .1.cmp(&b.0 .1)).then(a.0 .2.total_cmp(&b.0 .2)));
        self.waiting = keyed.into_iter().map(|(_, id)| id).collect();
    }

    /// The engine ran a step of `tokens` tokens in `seconds`: the `slo` queue's step times learn
    /// from it.
    pub fn observe_step(&mut self, tokens: usize, seconds: f64) {
        self.times.observe(tokens, seconds);
    }

    fn admit_waiting(&mut self, placed: &mut Vec<Placed>, plan: &mut StepPlan, budget: &mut usize, now: f64) {
        let pool = self.pool_view();
        let mut running: Vec<SeqLoad> = self.running.iter().map(|&id| self.load_of(id)).collect();
        self.policy.begin_step(&mut running, &pool);
        for s in &running {
            self.requests.get_mut(&s.id).expect("running request exists").forecast = s.forecast;
        }
        let bs = self.kv.block_size();
        let most = self.cfg.max_admit_per_step.unwrap_or(usize::MAX);
        let mut admitted = 0;
        // The next waiting request to consider: the head, but for long prompts held back by
        // `max_long_partial_prefills`, which shorter requests may pass (as in vLLM).
        let mut at = 0;
        while let Some(&id) = self.waiting.get(at) {
            if self.running.len() >= self.cfg.max_num_seqs {
                self.head_held = true;
                break;
            }
            if *budget == 0 || admitted == most {
                break;
            }
            let r = &self.requests[&id];
            let total = r.total_len();
            let (lookup, cached_blocks) = self.cached_prompt_blocks(r);
            let cached = cached_blocks * bs;
            if self.long_prefill_waits(total - cached, total) {
                at += 1;
                continue;
            }
            let n = self.chunk(total - cached, *budget);
            let chunk_blocks = self.kv.blocks_for(cached + n) - cached_blocks;
            // Reviving cached blocks takes them out of the allocatable pool too.
            if chunk_blocks + cached_blocks > self.kv.pool().num_allocatable() {
                self.head_held = true;
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
                self.head_held = true;
                break;
            }
            self.waiting.remove(at);
            let hashes = &self.requests[&id].prompt_block_hashes[..lookup];
            let got = self.kv.open(id, hashes).expect("a waiting request has no block table");
            debug_assert_eq!(got, cached);
            plan.copies.extend(self.kv.append(id, n).expect("fit checked above"));
            let r = self.requests.get_mut(&id).expect("waiting request exists");
            r.num_computed = got;
            r.cached_tokens += got as u64;
            r.state = RequestState::Running;
            if r.times.first_scheduled.is_none() {
                r.first_cached_tokens = got as u64;
                r.times.first_scheduled = Some(now);
            }
            placed.push(Placed { id, start: got, num_tokens: n, samples: got + n == total, num_draft: 0 });
            self.count_long_prefill(total - got, total);
            self.running.push(id);
            self.stats.admitted += 1;
            admitted += 1;
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

    /// How many of `r`'s prompt blocks it may take from the prefix cache, and how many of those
    /// the cache holds now (the leading run). At least the last token is left to compute (its
    /// logits give the next token), and a request that wants prompt logprobs needs every
    /// position's logits: no cache for it.
    fn cached_prompt_blocks(&self, r: &Request) -> (usize, usize) {
        let lookup = self.cache_lookup(r);
        (lookup, self.kv.count_cached_prefix(&r.prompt_block_hashes[..lookup]))
    }

    /// Leading prompt blocks of `r` it may take from the prefix cache (`cached_prompt_blocks`).
    fn cache_lookup(&self, r: &Request) -> usize {
        if r.sampling.prompt_logprobs.is_some() {
            0
        } else {
            ((r.total_len() - 1) / self.kv.block_size()).min(r.prompt_block_hashes.len())
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

    /// End a request, free its blocks and hand it back. Its output length feeds the length history
    /// when the reason measures it (`FinishReason::measures_length`): a natural stop, the length
    /// bound, or a client that hung up after some tokens (how a serving benchmark ends requests at
    /// their true length); never an error or an abort before the first token.
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
        if reason.measures_length(r.output.len()) {
            self.policy.record_finished(r.output.len());
            self.lengths.record(r.output.len());
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
