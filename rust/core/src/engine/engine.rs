//! The step loop: schedule -> execute -> record tokens -> check stop conditions -> free.

use super::{Clock, Executor, FinishReason, ReqId, Request, RequestSpec};
use crate::error::{HoraeError, Result};
use crate::sched::{SchedulePlan, Scheduler, StepFeatures};

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

#[derive(Debug, Default)]
pub struct StepResult {
    pub tokens: Vec<(ReqId, u32)>,
    pub finished: Vec<Request>,
    pub preempted: Vec<ReqId>,
    pub sample: Option<StepSample>,
    /// Requests the executor failed on this step, with its error: they are finished with
    /// `FinishReason::Error` and their blocks freed; the engine and every other request go on.
    pub failed: Vec<(ReqId, String)>,
}

pub struct Engine {
    sched: Scheduler,
    executor: Box<dyn Executor>,
    clock: Box<dyn Clock>,
    eos: Vec<u32>,
    next_id: ReqId,
}

impl Engine {
    pub fn new(sched: Scheduler, executor: Box<dyn Executor>, clock: Box<dyn Clock>) -> Self {
        let eos = executor.eos_token_ids();
        Self { sched, executor, clock, eos, next_id: 0 }
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
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
        let req = Request::new(id, spec, arrival, self.sched.config().block_size);
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
        if let Some(k_max) = self.sched.spec_k_max() {
            let ids = self.sched.spec_candidates();
            if !ids.is_empty() {
                let lookup = self.executor.lookup_proposals();
                let k = if lookup { k_max } else { self.sched.plan_spec(Some(k_max)) };
                if k > 0 {
                    for (id, draft) in self.executor.propose(&self.sched, &ids, k)? {
                        self.sched.set_draft(id, draft);
                    }
                }
                if lookup {
                    self.sched.plan_spec(None);
                }
            }
        }
        let plan = self.sched.schedule(started);
        for &id in &plan.preempted {
            self.executor.preempted(id);
        }
        let mut result = StepResult { preempted: plan.preempted.clone(), ..Default::default() };
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
        let out = match self.executor.execute(&plan, &self.sched) {
            Ok(out) => out,
            Err(e) => {
                // Fail this step's requests, not the engine: a GPU fault or a batch the model
                // refuses must not take a server down with every other request in it.
                let msg = e.to_string();
                for s in &plan.seqs {
                    if self.sched.finish(s.id, FinishReason::Error, self.clock.now()).is_ok() {
                        self.executor.release(s.id);
                        result.failed.push((s.id, msg.clone()));
                    }
                }
                return Ok(result);
            }
        };
        if let Some(dt) = out.elapsed {
            self.clock.advance(dt);
        }
        let now = self.clock.now();
        let mut judged = crate::spec::Judged::default();
        for s in &plan.seqs {
            if s.num_draft == 0 {
                self.sched.computed(s.id, s.num_tokens);
                if let Some(first) = self.sched.take_unused_draft(s.id) {
                    let drawn = out.sampled.iter().find(|t| t.0 == s.id).map(|t| t.1);
                    judged.unused_judged += usize::from(drawn.is_some());
                    judged.unused_matched += usize::from(drawn == Some(first));
                }
                continue;
            }
            let accepted = out.accepted.iter().find(|a| a.0 == s.id).map_or(0, |a| a.1).min(s.num_draft);
            // The last real token and the accepted drafts now have KV; the rejected ones don't.
            self.sched.computed(s.id, s.num_tokens - s.num_draft + accepted);
            self.sched.drafts_verified(s.id, s.num_draft, accepted);
            judged.sequences += 1;
            judged.drafted += s.num_draft;
            judged.accepted += accepted;
            judged.rejections += usize::from(accepted < s.num_draft);
        }
        self.sched.spec_observe(&plan, now - started, judged);
        for (id, pos, lp) in out.prompt_logprobs {
            self.sched.push_prompt_logprobs(id, pos, lp);
        }
        // A request's logprobs come in the order of its sampled tokens; each goes with its token,
        // so those of tokens dropped after a stop go too.
        let mut logprobs = out.logprobs.into_iter().peekable();
        for &(id, token) in &out.sampled {
            let lp = if logprobs.peek().is_some_and(|l| l.0 == id) { logprobs.next() } else { None };
            if self.sched.request(id).is_none() {
                continue; // finished earlier in this step (e.g. EOS among accepted drafts)
            }
            if let Some((_, lp)) = lp {
                self.sched.push_logprobs(id, lp);
            }
            self.sched.push_token(id, token, now);
            result.tokens.push((id, token));
            if let Some(reason) = self.stop_reason(id, token) {
                result.finished.push(self.sched.finish(id, reason, now)?);
                self.executor.release(id);
            }
        }
        result.sample = Some(self.sample(&plan, started, now));
        Ok(result)
    }

    fn stop_reason(&self, id: ReqId, token: u32) -> Option<FinishReason> {
        let r = self.sched.request(id)?;
        if !r.ignore_eos && self.eos.contains(&token) {
            Some(FinishReason::Stop)
        } else if r.output.len() >= r.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    fn sample(&self, plan: &SchedulePlan, started: f64, now: f64) -> StepSample {
        StepSample {
            time: now,
            duration: now - started,
            running: self.sched.num_running() as u32,
            waiting: self.sched.num_waiting() as u32,
            batched_tokens: plan.num_batched_tokens as u32,
            kv_usage: self.sched.kv().usage() as f32,
            predicted_peak: self.sched.predicted_peak(),
            features: StepFeatures::of_plan(plan),
            spec_k: self.sched.spec_stats().map_or(0, |s| s.k as u32),
        }
    }
}
