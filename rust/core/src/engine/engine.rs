//! The step loop: propose drafts -> schedule -> execute -> record tokens -> check stop conditions
//! -> free, and one [`RequestOutput`] for every request that moved (`Engine`, on any executor and
//! clock). A front end serves it through `handle.rs`'s `EngineHandle`.

use std::sync::Arc;
use std::time::Instant;

use crate::error::{HoraeError, Result};
use crate::plan::{Executor, StepPlan};
use crate::request::{FinishReason, Prompt, ReqId, Request, RequestSpec, StopReason};
use crate::route::{CachedBlocks, ReplicaStats};
use crate::sample::TokenLogprobs;
use crate::sched::{Judged, QueueDiscipline, Scheduler};
use crate::stepcost::StepFeatures;
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

// The engine's notion of time, injected so that the simulator runs on virtual time and the real
// engine on the wall clock, through the same step loop.
pub trait Clock: Send {
    /// Seconds since the clock started.
    fn now(&self) -> f64;
    /// A step took `dt` seconds of executor time. Virtual clocks move; the wall clock already did.
    fn advance(&mut self, dt: f64);
    /// Nothing to do until `t` (simulation only: the wall clock does not jump).
    fn advance_to(&mut self, t: f64);
}

#[derive(Debug, Clone, Default)]
pub struct VirtualClock {
    now: f64,
}

impl Clock for VirtualClock {
    fn now(&self) -> f64 {
        self.now
    }
    fn advance(&mut self, dt: f64) {
        self.now += dt.max(0.0);
    }
    fn advance_to(&mut self, t: f64) {
        self.now = self.now.max(t);
    }
}

#[derive(Debug, Clone)]
pub struct WallClock {
    start: Instant,
}

impl Default for WallClock {
    fn default() -> Self {
        Self { start: Instant::now() }
    }
}

impl Clock for WallClock {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
    fn advance(&mut self, _dt: f64) {}
    fn advance_to(&mut self, _t: f64) {}
}

/// Why a request ends, and what stopped it.
type End = (FinishReason, Option<StopReason>);

/// Rules a server applies to every request, whatever the policy (the Past-Future paper's
/// LightLLM router applies both). Off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerRules {
    /// Seconds a request may wait before it starts; then it ends with `FinishReason::Timeout`,
    /// having cost no compute (the paper's 8 s).
    pub queue_timeout: Option<f64>,
    /// Seconds a started request may go without a token; then it ends with
    /// `FinishReason::SlaAbort` and its blocks are freed.
    pub max_itl_abort: Option<f64>,
}

impl ServerRules {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("queue_timeout", self.queue_timeout), ("max_itl_abort", self.max_itl_abort)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(HoraeError::InvalidConfig(format!(
                        "{name} must be a positive number of seconds, got {v}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One step as seen from outside, for KV-usage-over-time plots and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSample {
    /// Clock time at the end of the step.
    pub time: f64,
    pub duration: f64,
    pub running: u32,
    pub waiting: u32,
    pub batched_tokens: u32,
    /// Fraction of KV blocks in use after scheduling.
    pub kv_usage: f32,
    /// The policy's predicted peak, in tokens (past-future and oracle only).
    pub predicted_peak: Option<u64>,
    /// What the step computed, in the cost model's terms (to fit it to measured step times).
    pub features: StepFeatures,
    /// Speculative decoding: the step's k (0 when off).
    pub spec_k: u32,
}

/// What one request did in one step: the new part of its output, and why it ended if it did.
/// Tokens, text and logprobs live in the core's `Request`; callers get only what is new.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutput {
    pub id: ReqId,
    /// New output tokens the caller sees (an end-of-sequence token that ends the request is not
    /// one of them).
    pub new_token_ids: Vec<u32>,
    /// New text, held back while it could still turn out to be the start of a stop string.
    pub new_text: String,
    /// Logprobs of `new_token_ids`, when the request asked for them.
    pub new_logprobs: Vec<TokenLogprobs>,
    /// Prompt logprobs (position 1 onwards), once: with the request's first tokens where every
    /// step's output is emitted, else with the output that finishes it.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    /// Prompt tokens its first admission read from the prefix cache (vLLM's
    /// `num_cached_tokens`), sent once, with the prompt logprobs.
    pub num_cached_tokens: Option<u64>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    /// Why the request failed (`FinishReason::Error`).
    pub error: Option<String>,
    /// With speculation on, once finished: draft tokens verified and accepted.
    pub spec: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct StepResult {
    /// One per request that produced output or finished this step.
    pub outputs: Vec<RequestOutput>,
    /// The requests that finished this step, whole (the simulator's records read them).
    pub finished: Vec<Request>,
    pub preempted: Vec<ReqId>,
    pub sample: Option<StepSample>,
}

pub struct Engine {
    sched: Scheduler,
    executor: Box<dyn Executor>,
    clock: Box<dyn Clock>,
    eos: Vec<u32>,
    /// Streams text and finds stop strings; the simulator has none.
    tokenizer: Option<Arc<Tokenizer>>,
    /// Whether `step` reports every request that moved, or only the ones that finished.
    every_output: bool,
    rules: ServerRules,
    next_id: ReqId,
}

impl Engine {
    pub fn new(sched: Scheduler, executor: Box<dyn Executor>, clock: Box<dyn Clock>) -> Self {
        let eos = executor.eos_token_ids();
        Self {
            sched,
            executor,
            clock,
            eos,
            tokenizer: None,
            every_output: true,
            rules: ServerRules::default(),
            next_id: 0,
        }
    }

    /// Detokenize outputs as they are generated (text in `RequestOutput`, stop strings).
    pub fn with_tokenizer(mut self, tokenizer: Arc<Tokenizer>) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// Apply `rules` (a queue deadline, a gap abort) from the next step on.
    pub fn with_rules(mut self, rules: ServerRules) -> Result<Self> {
        rules.validate()?;
        self.rules = rules;
        Ok(self)
    }

    /// Report only finished requests from `step` (a simulation reads its records from them, and
    /// building a new-token list per request per step is a third of a simulated step's cost).
    pub fn finished_outputs_only(mut self) -> Self {
        self.every_output = false;
        self
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Forget the prefix cache (`KvManager::reset_prefix_cache`); false, and nothing forgotten,
    /// while a request holds KV blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.sched.reset_prefix_cache()
    }

    /// What this engine publishes for a router (`route::ReplicaStats`): its queue, the prefill
    /// work waiting, the forecast's peak against the pool, the output length it plans with, and
    /// its prefix cache's index. The cluster simulator and a Ray replica publish the same.
    pub fn replica_stats(&self) -> ReplicaStats {
        let s = &self.sched;
        let kv = s.kv();
        let used = (kv.pool().num_used() * kv.block_size()) as u64;
        ReplicaStats {
            waiting: s.num_waiting(),
            running: s.num_running(),
            waiting_tokens: s.waiting_tokens(),
            capacity_tokens: kv.capacity_tokens() as u64,
            predicted_peak_tokens: s.predicted_peak().unwrap_or(used).max(used),
            planned_output: s.planned_output() as u64,
            prefill_rate: s.prefill_rate(),
            cached: CachedBlocks::Index(kv.pool().hash_index()),
        }
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }
    pub fn now(&self) -> f64 {
        self.clock.now()
    }
    pub fn advance_clock_to(&mut self, t: f64) {
        self.clock.advance_to(t);
    }
    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    /// Queue a request under a fresh id.
    pub fn add_request(&mut self, spec: RequestSpec) -> Result<ReqId> {
        let id = self.next_id;
        self.add_request_with_id(id, spec)?;
        Ok(id)
    }

    /// Queue a request under a caller-chosen id (the simulator uses trace indices).
    pub fn add_request_with_id(&mut self, id: ReqId, spec: RequestSpec) -> Result<()> {
        let arrival = spec.arrival.unwrap_or_else(|| self.clock.now());
        let mut req = Request::new(id, spec, arrival, self.sched.config().block_size);
        if let (Some(_), Prompt::Tokens(ids), true) = (&self.tokenizer, &req.prompt, req.sampling.detokenize) {
            req.detok = Some(IncrementalDetokenizer::new(ids, req.sampling.skip_special_tokens));
        }
        self.sched.add(req)?;
        self.next_id = self.next_id.max(id + 1);
        Ok(())
    }

    /// Stop a request wherever it is; its blocks are freed at once.
    pub fn abort(&mut self, id: ReqId) -> Result<Request> {
        let r = self.sched.finish(id, FinishReason::Aborted, self.clock.now())?;
        self.executor.release(id);
        Ok(r)
    }

    pub fn step(&mut self) -> Result<StepResult> {
        let started = self.clock.now();
        let mut result = StepResult::default();
        self.enforce_rules(started, &mut result)?;
        self.propose_drafts()?;
        let plan = self.sched.schedule(started);
        for &id in &plan.preempted {
            self.executor.preempted(id);
        }
        result.preempted = plan.preempted.clone();
        if plan.seqs.is_empty() {
            if self.sched.has_work() && plan.preempted.is_empty() {
                return Err(HoraeError::Stalled(format!(
                    "{} waiting and {} running, nothing could be scheduled",
                    self.sched.num_waiting(),
                    self.sched.num_running()
                )));
            }
            return Ok(result);
        }
        let out = match self.executor.execute(&plan) {
            Ok(out) => out,
            Err(e) => {
                // Fail this step's requests, not the engine: a GPU fault or a batch the model
                // refuses must not take a server down with every other request in it.
                let msg = e.to_string();
                for s in &plan.seqs {
                    if let Ok(r) = self.sched.finish(s.id, FinishReason::Error, self.clock.now()) {
                        self.executor.release(s.id);
                        let error = Some(msg.clone());
                        result.outputs.push(RequestOutput {
                            id: s.id,
                            finish_reason: Some(FinishReason::Error),
                            error,
                            ..Default::default()
                        });
                        result.finished.push(r);
                    }
                }
                return Ok(result);
            }
        };
        if let Some(dt) = out.elapsed {
            self.clock.advance(dt);
        }
        let now = self.clock.now();
        self.sched.observe_step(plan.num_batched_tokens, now - started);
        self.record_drafts(&plan, &out.sampled, &out.accepted, now - started);
        for (id, pos, lp) in out.prompt_logprobs {
            self.sched.push_prompt_logprobs(id, pos, lp);
        }
        // Tokens in order; a request's logprobs come in the order of its sampled tokens and each
        // goes with its token, so those of tokens dropped after a stop go too. An executor emits a
        // request's tokens together, so `moved` (request, first new output index, end) is built
        // by looking at its last entry only.
        let mut logprobs = out.logprobs.into_iter().peekable();
        let mut moved: Vec<(ReqId, usize, Option<End>)> = Vec::new();
        for &(id, token) in &out.sampled {
            let lp = if logprobs.peek().is_some_and(|l| l.0 == id) { logprobs.next() } else { None };
            let Some(r) = self.sched.request_mut(id) else { continue };
            if moved.last().is_none_or(|m| m.0 != id) {
                debug_assert!(moved.iter().all(|m| m.0 != id), "an executor emits a request's tokens together");
                moved.push((id, r.output.len(), None));
            }
            let at = moved.len() - 1;
            if moved[at].2.is_some() {
                continue; // a stop among accepted drafts: what follows it is dropped
            }
            if let Some((_, lp)) = lp {
                r.logprobs.push(lp);
            }
            r.push_token(token, now);
            moved[at].2 = r.check_stop(token, &self.eos);
        }
        for (id, from, end) in moved {
            // Text needs every step (stop strings, what is safe to stream), so a tokenizer
            // always gets it.
            if self.every_output || end.is_some() || self.tokenizer.is_some() {
                result.outputs.push(self.emit(id, from, end, now, &mut result.finished)?);
            }
        }
        result.sample = Some(self.sample(&plan, started, now));
        Ok(result)
    }

    /// End the requests the server's rules end now (before anything is scheduled, so a request
    /// past its queue deadline costs nothing).
    fn enforce_rules(&mut self, now: f64, result: &mut StepResult) -> Result<()> {
        let ServerRules { queue_timeout, max_itl_abort } = self.rules;
        let sheds = self.sched.config().queue == QueueDiscipline::Slo;
        if queue_timeout.is_none() && max_itl_abort.is_none() && !sheds {
            return Ok(());
        }
        for (id, reason) in self.sched.expired(now, queue_timeout, max_itl_abort) {
            let r = self.sched.finish(id, reason, now)?;
            self.executor.release(id);
            result.outputs.push(RequestOutput { id, finish_reason: Some(reason), ..Default::default() });
            result.finished.push(r);
        }
        Ok(())
    }

    /// Speculative decoding: drafts for the running requests about to decode, before scheduling
    /// (which reserves their KV slots).
    fn propose_drafts(&mut self) -> Result<()> {
        let Some(k_max) = self.sched.spec_k_max() else { return Ok(()) };
        let candidates = self.sched.spec_candidates();
        if candidates.is_empty() {
            return Ok(());
        }
        let lookup = self.executor.lookup_proposals();
        let k = if lookup { k_max } else { self.sched.plan_spec(Some(k_max)) };
        if k > 0 {
            for (id, draft) in self.executor.propose(&candidates, k)? {
                self.sched.set_draft(id, draft);
            }
        }
        if lookup {
            self.sched.plan_spec(None);
        }
        Ok(())
    }

    /// After a step: which tokens now have KV, what became of the drafts (SmartSpec learns from
    /// both), and the rejected drafts' slots given back.
    fn record_drafts(&mut self, plan: &StepPlan, sampled: &[(ReqId, u32)], accepted: &[(ReqId, usize)], seconds: f64) {
        let mut judged = Judged::default();
        for s in &plan.seqs {
            if s.num_draft == 0 {
                self.sched.computed(s.id, s.num_tokens);
                if let Some(first) = self.sched.take_unused_draft(s.id) {
                    let drawn = sampled.iter().find(|t| t.0 == s.id).map(|t| t.1);
                    judged.unused_judged += usize::from(drawn.is_some());
                    judged.unused_matched += usize::from(drawn == Some(first));
                }
                continue;
            }
            let accepted = accepted.iter().find(|a| a.0 == s.id).map_or(0, |a| a.1).min(s.num_draft);
            // The last real token and the accepted drafts now have KV; the rejected ones don't.
            self.sched.computed(s.id, s.num_tokens - s.num_draft + accepted);
            self.sched.drafts_verified(s.id, s.num_draft, accepted);
            judged.sequences += 1;
            judged.drafted += s.num_draft;
            judged.accepted += accepted;
            judged.rejections += usize::from(accepted < s.num_draft);
        }
        self.sched.spec_observe(plan, seconds, judged);
    }

    /// The output of a request that got tokens this step (from output index `from`): its new
    /// text, stop strings checked, and its end if it ended.
    fn emit(
        &mut self,
        id: ReqId,
        from: usize,
        mut end: Option<End>,
        now: f64,
        finished: &mut Vec<Request>,
    ) -> Result<RequestOutput> {
        let eos_end = end.as_ref().is_some_and(|e| e.0 == FinishReason::Stop && e.1.is_none());
        let token_end = matches!(end, Some((_, Some(StopReason::Token(_)))));
        let r = self.sched.request_mut(id).ok_or(HoraeError::UnknownRequest(id))?;
        // The caller never sees the end-of-sequence token; a stop token is seen but not its text
        // (unless the request keeps the stop in its text).
        r.num_visible = r.output.len() - usize::from(eos_end);
        let text_tokens = r.num_visible - usize::from(token_end && !r.stop.include_in_output);
        if let (Some(tok), Some(d)) = (&self.tokenizer, r.detok.as_mut()) {
            let before = d.text.len();
            d.step(tok, &r.output[..text_tokens])?;
            let early = r.output.len() <= r.sampling.min_tokens;
            if !early && !r.stop.strings.is_empty() {
                if let Some((at, s)) = r.stop.find_string(&d.text, before) {
                    d.text.truncate(if r.stop.include_in_output { at + s.len() } else { at });
                    end = Some((FinishReason::Stop, Some(StopReason::Text(s))));
                }
            }
        }
        let mut out = RequestOutput { id, ..Default::default() };
        let visible_from = from.min(r.num_visible);
        out.new_token_ids = r.output[visible_from..r.num_visible].to_vec();
        if r.sampling.logprobs.is_some() {
            let n = r.logprobs.len().min(r.num_visible);
            out.new_logprobs = r.logprobs[visible_from.min(n)..n].to_vec();
        }
        // Text that could still be the start of a stop string waits, unless the request ends.
        let text = r.text();
        let mut upto = if end.is_some() { text.len() } else { text.len().saturating_sub(r.stop.holdback()) };
        while !text.is_char_boundary(upto) {
            upto -= 1;
        }
        if upto > r.text_sent {
            out.new_text = text[r.text_sent..upto].to_string();
            r.text_sent = upto;
        }
        // Prompt logprobs and the cached count go out once: with the first tokens where every
        // step is emitted, so a stream has them before the completion (as vLLM's first output),
        // else with the end.
        let streamed = self.every_output || self.tokenizer.is_some();
        let first_or_end = if streamed { from == 0 } else { end.is_some() };
        if first_or_end {
            out.prompt_logprobs = r.prompt_logprobs.clone();
            out.num_cached_tokens = Some(r.first_cached_tokens);
        }
        if let Some((reason, stop_reason)) = end {
            r.stop_reason = stop_reason.clone();
            let req = self.sched.finish(id, reason, now)?;
            self.executor.release(id);
            out.finish_reason = Some(reason);
            out.stop_reason = stop_reason;
            out.spec = self.sched.spec_k_max().map(|_| (req.spec_drafted, req.spec_accepted));
            finished.push(req);
        }
        Ok(out)
    }

    fn sample(&self, plan: &StepPlan, started: f64, now: f64) -> StepSample {
        StepSample {
            time: now,
            duration: now - started,
            running: self.sched.num_running() as u32,
            waiting: self.sched.num_waiting() as u32,
            batched_tokens: plan.num_batched_tokens as u32,
            kv_usage: self.sched.kv().usage() as f32,
            predicted_peak: self.sched.predicted_peak(),
            features: plan.features(),
            spec_k: self.sched.spec_stats().map_or(0, |s| s.k as u32),
        }
    }
}
