//! The step loop: propose drafts -> schedule -> execute -> record tokens -> check stop conditions
//! -> free, and one [`RequestOutput`] for every request that moved (`Engine`, on any executor and
//! clock). Below it, the handle a front end holds to serve one (`EngineHandle`, vLLM's
//! `EngineCoreProc` to `Engine`'s `EngineCore`): an inbox so that adding or aborting a request
//! never waits for a running step (tens of milliseconds on a CPU), the step loop on its own
//! thread, the engine's figures for metrics and the per-step log for fitting cost models.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::history_file::{self, HistoryFile};
use crate::error::{HoraeError, Result};
use crate::plan::{Executor, StepPlan};
use crate::request::{FinishReason, Prompt, ReqId, Request, RequestLimits, RequestParams, RequestSpec, StopReason};
use crate::route::{CachedBlocks, ReplicaStats};
use crate::sample::TokenLogprobs;
use crate::sched::{Judged, QueueDiscipline, Scheduler, SpecStats};
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
    /// Prompt logprobs (position 1 onwards), once, with the output that finishes the request.
    pub prompt_logprobs: Vec<TokenLogprobs>,
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
        if let (Some(_), Prompt::Tokens(ids)) = (&self.tokenizer, &req.prompt) {
            req.detok = Some(IncrementalDetokenizer::new(ids));
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
        // The caller never sees the end-of-sequence token; a stop token is seen but not its text.
        r.num_visible = r.output.len() - usize::from(eos_end);
        let text_tokens = r.num_visible - usize::from(token_end);
        if let (Some(tok), Some(d)) = (&self.tokenizer, r.detok.as_mut()) {
            let before = d.text.len();
            d.step(tok, &r.output[..text_tokens])?;
            let early = r.output.len() <= r.sampling.min_tokens;
            if !early && !r.stop.strings.is_empty() {
                if let Some((at, s)) = r.stop.find_string(&d.text, before) {
                    d.text.truncate(at);
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
        if let Some((reason, stop_reason)) = end {
            r.stop_reason = stop_reason.clone();
            let req = self.sched.finish(id, reason, now)?;
            self.executor.release(id);
            out.finish_reason = Some(reason);
            out.stop_reason = stop_reason;
            out.prompt_logprobs = req.prompt_logprobs.clone();
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

// ---------------------------------------------------------------------------------------------
// Serving: the handle.

/// Steps kept for `take_step_log` before the oldest are dropped.
const STEP_LOG_CAP: usize = 1 << 20;

/// The engine's figures after a step, for metrics. Counters are totals since the engine started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_used_blocks: usize,
    pub kv_total_blocks: usize,
    pub block_size: usize,
    pub predicted_peak_tokens: Option<u64>,
    pub preemptions: u64,
    pub prefix_hit_blocks: u64,
    pub prefix_queried_blocks: u64,
    /// The step just run (None outside a step).
    pub step_seconds: Option<f64>,
    pub spec: Option<SpecStats>,
}

/// What one step produced.
#[derive(Debug, Default)]
pub struct StepEvents {
    pub outputs: Vec<RequestOutput>,
    pub stats: EngineStats,
}

struct EngineState {
    engine: Engine,
    /// Requests the engine refused when the inbox was applied: reported with the next events.
    refused: Vec<RequestOutput>,
    preemptions: u64,
    step_log: Vec<StepSample>,
    /// Where Past-Future's history is saved, and the recorded count at the last save.
    history: Option<(HistoryFile, u64)>,
}

/// Lengths to write to the history file, taken under the engine lock and written after it is
/// released, so that a step never waits on the disk.
struct HistoryWrite {
    file: HistoryFile,
    lengths: Vec<u32>,
    /// Lengths recorded when the snapshot was taken: orders concurrent writes.
    recorded: u64,
}

impl EngineState {
    /// The history to write, if a file is set and `force` or `SAVE_EVERY` lengths came since the
    /// last snapshot. A failed write is reported and retried at the next snapshot, never fatal.
    fn history_due(&mut self, force: bool) -> Option<HistoryWrite> {
        let recorded = self.engine.scheduler().stats().lengths_recorded;
        let (file, saved_at) = self.history.as_mut()?;
        if !force && recorded < *saved_at + history_file::SAVE_EVERY {
            return None;
        }
        let lengths = self.engine.scheduler().recorded_lengths()?;
        *saved_at = recorded;
        Some(HistoryWrite { file: file.clone(), lengths, recorded })
    }
}

#[derive(Default)]
struct Inbox {
    /// Each with the seconds it had waited before it came (`RequestParams::waited`).
    adds: Vec<(ReqId, RequestSpec, f64)>,
    aborts: Vec<ReqId>,
}

struct Shared {
    state: Mutex<EngineState>,
    inbox: Mutex<Inbox>,
    /// Signalled when the inbox gets work or the loop is told to stop.
    wake: Condvar,
    stop: AtomicBool,
    /// Held while the history file is written; the recorded count of the last write, so that an
    /// older snapshot never overwrites a newer one.
    history_written: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock poisons it; the state is still consistent because every
    // mutation goes through the core's own checks, so keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The engine, with everything queued in the inbox applied first.
    fn engine(&self) -> MutexGuard<'_, EngineState> {
        let mut st = lock(&self.state);
        let inbox = std::mem::take(&mut *lock(&self.inbox));
        for (id, mut spec, waited) in inbox.adds {
            if waited > 0.0 {
                spec.arrival = Some(st.engine.now() - waited);
            }
            if let Err(e) = st.engine.add_request_with_id(id, spec) {
                let error = Some(e.to_string());
                st.refused.push(RequestOutput {
                    id,
                    finish_reason: Some(FinishReason::Error),
                    error,
                    ..Default::default()
                });
            }
        }
        for id in inbox.aborts {
            // An id that already finished (or was refused) has nothing left to free.
            let _ = st.engine.abort(id);
        }
        st
    }

    fn step(&self) -> Result<StepEvents> {
        let mut st = self.engine();
        let mut outputs = std::mem::take(&mut st.refused);
        if !st.engine.has_work() {
            return Ok(StepEvents { outputs, stats: stats_of(&st, None) });
        }
        let out = st.engine.step()?;
        let due = st.history_due(false);
        st.preemptions += out.preempted.len() as u64;
        outputs.extend(out.outputs);
        let duration = out.sample.map(|s| s.duration);
        if let Some(sample) = out.sample {
            if st.step_log.len() == STEP_LOG_CAP {
                st.step_log.drain(..STEP_LOG_CAP / 2);
            }
            st.step_log.push(sample);
        }
        let stats = stats_of(&st, duration);
        drop(st);
        self.report_history_write(due);
        Ok(StepEvents { outputs, stats })
    }

    /// Write a history snapshot (outside the engine lock).
    fn write_history(&self, due: Option<HistoryWrite>) -> Result<bool> {
        let Some(w) = due else { return Ok(false) };
        let mut written = lock(&self.history_written);
        if w.recorded < *written {
            return Ok(false);
        }
        w.file.save(&w.lengths)?;
        *written = w.recorded;
        Ok(true)
    }

    /// As `write_history`, for the engine thread: a failed write is logged, never fatal.
    fn report_history_write(&self, due: Option<HistoryWrite>) {
        if let Err(e) = self.write_history(due) {
            eprintln!("horae: {e}");
        }
    }

    /// Blocks until there is something to do (a queued request or abort, or running requests),
    /// or the loop is told to stop.
    fn wait_for_work(&self) {
        if self.engine().engine.has_work() {
            return;
        }
        let inbox = lock(&self.inbox);
        if inbox.adds.is_empty() && inbox.aborts.is_empty() && !self.stop.load(Ordering::Acquire) {
            // The timeout only bounds a missed wake-up; every push notifies.
            let _ = self.wake.wait_timeout(inbox, Duration::from_millis(200));
        }
    }
}

fn stats_of(st: &EngineState, step_seconds: Option<f64>) -> EngineStats {
    let s = st.engine.scheduler();
    let pool = s.kv().pool();
    EngineStats {
        running: s.num_running(),
        waiting: s.num_waiting(),
        kv_used_blocks: pool.num_used(),
        kv_total_blocks: pool.num_total(),
        block_size: s.kv().block_size(),
        predicted_peak_tokens: s.predicted_peak(),
        preemptions: st.preemptions,
        prefix_hit_blocks: pool.hit_blocks,
        prefix_queried_blocks: pool.queried_blocks,
        step_seconds,
        spec: s.spec_stats(),
    }
}

/// A served engine. Every method takes `&self` and is safe to call from any thread.
pub struct EngineHandle {
    shared: Arc<Shared>,
    limits: RequestLimits,
    next_id: AtomicU64,
    looper: Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    pub fn new(engine: Engine, limits: RequestLimits) -> Self {
        let state = EngineState { engine, refused: Vec::new(), preemptions: 0, step_log: Vec::new(), history: None };
        let shared = Shared {
            state: Mutex::new(state),
            inbox: Mutex::default(),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            history_written: Mutex::new(0),
        };
        Self { shared: Arc::new(shared), limits, next_id: AtomicU64::new(0), looper: Mutex::new(None) }
    }

    /// Save Past-Future's history to `file` as requests finish and when the engine stops.
    pub fn with_history_file(self, file: Option<HistoryFile>) -> Self {
        lock(&self.shared.state).history = file.map(|f| (f, 0));
        self
    }

    /// Past-Future's recorded lengths, oldest first (waits for a running step).
    pub fn recorded_lengths(&self) -> Option<Vec<u32>> {
        self.shared.engine().engine.scheduler().recorded_lengths()
    }

    /// Write the history file now (the front ends call this on shutdown); `false` when there is
    /// no file or no history to write.
    pub fn save_history(&self) -> Result<bool> {
        let due = lock(&self.shared.state).history_due(true);
        self.shared.write_history(due)
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    fn push(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut lock(&self.shared.inbox));
        self.shared.wake.notify_all();
    }

    pub fn looping(&self) -> bool {
        lock(&self.looper).is_some()
    }

    /// Check a request and queue it; returns its id. Never waits for a running step.
    pub fn add_request(&self, params: RequestParams) -> Result<ReqId> {
        let waited = params.waited;
        let spec = params.into_spec(&self.limits)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.push(|inbox| inbox.adds.push((id, spec, waited)));
        Ok(id)
    }

    /// Stop a request; its KV blocks are freed before the next step (at once when no loop runs).
    /// Ids that already finished are ignored.
    pub fn abort(&self, id: ReqId) {
        self.push(|inbox| inbox.aborts.push(id));
        if !self.looping() {
            drop(self.shared.engine()); // no step can be running: apply it now
        }
    }

    pub fn has_unfinished(&self) -> bool {
        self.shared.engine().engine.has_work()
    }

    /// The figures metrics report, now (waits for a running step).
    pub fn stats(&self) -> EngineStats {
        stats_of(&self.shared.engine(), None)
    }

    /// What this engine publishes for a router, now (waits for a running step).
    pub fn replica_stats(&self) -> ReplicaStats {
        self.shared.engine().engine.replica_stats()
    }

    /// The steps run since the last call (cost-model features, measured seconds, batch figures).
    pub fn take_step_log(&self) -> Vec<StepSample> {
        std::mem::take(&mut self.shared.engine().step_log)
    }

    /// One step on the caller's thread (not while the loop runs).
    pub fn step(&self) -> Result<StepEvents> {
        if self.looping() {
            return Err(HoraeError::InvalidConfig(
                "the background loop is running this engine; step() is not available".into(),
            ));
        }
        self.shared.step()
    }

    /// Run the step loop on a thread of its own: after every step with something to say,
    /// `on_step` gets its events, or the error that failed the step.
    pub fn start_loop(&self, mut on_step: impl FnMut(Result<StepEvents>) + Send + 'static) -> Result<()> {
        let mut looper = lock(&self.looper);
        if looper.is_some() {
            return Err(HoraeError::InvalidConfig("the background loop is already running".into()));
        }
        self.shared.stop.store(false, Ordering::Release);
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("horae-engine".into())
            .spawn(move || {
                while !shared.stop.load(Ordering::Acquire) {
                    shared.wait_for_work();
                    if shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let result = shared.step();
                    if matches!(&result, Ok(events) if events.outputs.is_empty()) {
                        continue;
                    }
                    on_step(result);
                }
                let due = lock(&shared.state).history_due(true);
                shared.report_history_write(due);
            })
            .map_err(|e| HoraeError::InvalidConfig(format!("cannot start the engine thread: {e}")))?;
        *looper = Some(handle);
        Ok(())
    }

    /// Tell the loop to stop after its current step; the caller joins the returned thread (a
    /// binding releases its interpreter lock first, since the loop's last callback may need it).
    pub fn stop_loop(&self) -> Option<JoinHandle<()>> {
        let handle = lock(&self.looper).take()?;
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        Some(handle)
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // Stop, but do not join: the loop may be waiting for the lock of whoever drops us. The
        // loop saves the history as it ends; without a loop, save here if no one holds the lock.
        if self.stop_loop().is_none() {
            let due = self.shared.state.try_lock().ok().and_then(|mut st| st.history_due(true));
            self.shared.report_history_write(due);
        }
    }
}
