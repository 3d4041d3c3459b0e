//! Drive the real engine loop (scheduler, block manager, step loop) with the simulated executor
//! on a virtual clock, under open-loop (trace arrivals) or closed-loop (N clients) load.

use std::sync::Arc;

use super::cost_model::CostModel;
use super::executor::{Acceptance, SimExecutor};
use super::report::{RequestRecord, Summary};
use super::trace::Trace;
use crate::engine::{Engine, ServerRules, StepSample, VirtualClock};
use crate::error::{HoraeError, Result};
use crate::request::{FinishReason, Prompt, RequestSpec, Slo};
use crate::sched::{Scheduler, SchedulerConfig, SchedulerStats, TrueLengths};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadModel {
    /// Requests arrive at the trace's timestamps (scale them beforehand to change the rate).
    Open,
    /// `clients` users, each sending its next request the moment the previous one finishes.
    Closed { clients: usize },
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub sched: SchedulerConfig,
    pub cost: CostModel,
    /// The client's bound on every request's output; never the true length.
    pub max_tokens: usize,
    pub load: LoadModel,
    /// Speculative decoding (with `sched.spec` set): how well the modelled proposer guesses.
    pub acceptance: Option<Acceptance>,
    /// The server's rules (queue deadline, gap abort), the same for every policy.
    pub rules: ServerRules,
    /// Closed loop: a client sends a request the server's rules failed again, at once, as the
    /// paper's clients do: after a time-out always (it cost nothing, and a resent request is
    /// admitted before its new deadline whenever the batch has room), after an SLA abort at most
    /// `MAX_SLA_ATTEMPTS` times.
    pub retry_failed: bool,
    /// Per-request SLOs: request `i` carries class `i % len` (none when empty); what a class
    /// leaves out, `sched.default_slo` fills. Every request is judged on its own.
    pub slo_classes: Vec<Slo>,
}

/// Sends of one request the gap bound keeps cutting before its client gives up: a bound no
/// request can meet (shorter than a step) would otherwise retry forever, wasting compute.
pub const MAX_SLA_ATTEMPTS: u32 = 100;

#[derive(Debug, Clone)]
pub struct SimResult {
    pub policy: String,
    /// One per trace request, in trace order.
    pub records: Vec<RequestRecord>,
    pub steps: Vec<StepSample>,
    pub stats: SchedulerStats,
    pub prefix_hit_rate: f64,
    pub spec: Option<crate::sched::SpecStats>,
    /// Past-Future's recorded lengths at the end, oldest first: what a server shutting down here
    /// would save, and what a warm restart starts from.
    pub history: Option<Vec<u32>>,
}

impl SimResult {
    pub fn summary(&self) -> Summary {
        let usage: Vec<(f64, f64)> = self.steps.iter().map(|s| (s.time, s.kv_usage as f64)).collect();
        Summary::new(&self.records, &usage)
    }
}

/// Trace request `i` as the engine takes it, sent at `arrival`: a synthetic prompt (with the
/// trace's shared prefix units), the client's `max_tokens`, and its SLO class.
pub(super) fn trace_request(trace: &Trace, i: usize, cfg: &SimConfig, arrival: f64) -> RequestSpec {
    let r = &trace.requests[i];
    let slo = if cfg.slo_classes.is_empty() { Slo::default() } else { cfg.slo_classes[i % cfg.slo_classes.len()] };
    RequestSpec {
        prompt: Prompt::Synthetic {
            len: r.prompt_len as usize,
            prefix_ids: r.prefix_ids.clone(),
            unit: trace.prefix_unit.max(1),
        },
        max_tokens: cfg.max_tokens,
        ignore_eos: false,
        arrival: Some(arrival),
        sampling: Default::default(),
        stop: Default::default(),
        slo,
        priority: 0,
        grammar: None,
        cache_salt: None,
    }
}

pub fn simulate(trace: &Trace, cfg: &SimConfig) -> Result<SimResult> {
    if cfg.max_tokens == 0 {
        return Err(HoraeError::InvalidConfig("max_tokens must be at least 1".into()));
    }
    if let LoadModel::Closed { clients: 0 } = cfg.load {
        return Err(HoraeError::InvalidConfig("closed-loop load needs at least one client".into()));
    }
    if cfg.load == LoadModel::Open && !trace.timed {
        return Err(HoraeError::InvalidConfig(format!(
            "trace '{}' has no arrival times: assign a request rate, or use closed-loop clients",
            trace.name
        )));
    }
    let reqs = &trace.requests;
    let true_lengths: Arc<Vec<u32>> = Arc::new(reqs.iter().map(|r| r.output_len).collect());
    let oracle: TrueLengths = {
        let t = Arc::clone(&true_lengths);
        Arc::new(move |id| t.get(id as usize).map(|&x| x as usize))
    };
    // The oracle's lengths are handed to the scheduler only when the oracle policy is chosen.
    let sched = Scheduler::new(cfg.sched.clone(), Some(oracle))?;
    let policy = sched.policy_name().to_string();
    let mut exec = SimExecutor::new(cfg.cost.clone(), true_lengths);
    match (&cfg.sched.spec, cfg.acceptance) {
        (Some(_), Some(a)) => {
            a.validate()?;
            exec = exec.with_acceptance(a);
        }
        (Some(_), None) => {
            return Err(HoraeError::InvalidConfig("simulated speculative decoding needs an acceptance model".into()))
        }
        (None, _) => {}
    }
    let mut engine = Engine::new(sched, Box::new(exec), Box::new(VirtualClock::default()))
        .finished_outputs_only()
        .with_rules(cfg.rules)?;

    let mut records: Vec<Option<RequestRecord>> = vec![None; reqs.len()];
    let (mut attempts, mut wasted) = (vec![1u32; reqs.len()], vec![0u64; reqs.len()]);
    // Sends of each request the queue deadline turned away and the client sent again.
    let mut timed_out = vec![0u32; reqs.len()];
    let mut steps = Vec::new();
    let mut next = 0usize;
    // Submit request `i` at time `t`; a request that can never fit is recorded as rejected.
    let submit = |engine: &mut Engine, records: &mut Vec<Option<RequestRecord>>, i: usize, t: f64| -> Result<bool> {
        let spec = trace_request(trace, i, cfg, t);
        let slo = spec.slo;
        match engine.add_request_with_id(i as u64, spec) {
            Ok(()) => Ok(true),
            Err(HoraeError::InvalidRequest { .. }) => {
                let len = reqs[i].prompt_len;
                records[i] = Some(RequestRecord::rejected(i as u64, t, len, slo.or(&cfg.sched.default_slo)));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    };

    if let LoadModel::Closed { clients } = cfg.load {
        let mut active = 0;
        while active < clients && next < reqs.len() {
            active += usize::from(submit(&mut engine, &mut records, next, 0.0)?);
            next += 1;
        }
    }
    loop {
        if cfg.load == LoadModel::Open {
            while next < reqs.len() && reqs[next].arrival <= engine.now() {
                submit(&mut engine, &mut records, next, reqs[next].arrival)?;
                next += 1;
            }
        }
        if !engine.has_work() {
            if cfg.load == LoadModel::Open && next < reqs.len() {
                engine.advance_clock_to(reqs[next].arrival);
                continue;
            }
            break;
        }
        let out = engine.step()?;
        steps.extend(out.sample);
        for r in out.finished {
            let i = r.id as usize;
            let failed = matches!(r.finish_reason(), Some(FinishReason::Timeout | FinishReason::SlaAbort));
            let retry = match r.finish_reason() {
                Some(FinishReason::Timeout) => true,
                Some(FinishReason::SlaAbort) => attempts[i] < MAX_SLA_ATTEMPTS,
                _ => false,
            };
            if retry && cfg.retry_failed && matches!(cfg.load, LoadModel::Closed { .. }) {
                // The same client sends it again now; what the failed attempt computed is lost.
                attempts[i] += 1;
                timed_out[i] += u32::from(r.finish_reason() == Some(FinishReason::Timeout));
                wasted[i] += r.recomputed_tokens + r.num_computed as u64;
                let now = engine.now();
                submit(&mut engine, &mut records, i, now)?;
                continue;
            }
            let mut record = RequestRecord::from_request(&r);
            record.attempts = attempts[i];
            record.timed_out += timed_out[i];
            record.wasted_tokens = wasted[i] + if failed { r.recomputed_tokens + r.num_computed as u64 } else { 0 };
            records[i] = Some(record);
            if let LoadModel::Closed { .. } = cfg.load {
                // The client that got this answer sends its next request (skipping rejected ones).
                let now = engine.now();
                while next < reqs.len() {
                    let accepted = submit(&mut engine, &mut records, next, now)?;
                    next += 1;
                    if accepted {
                        break;
                    }
                }
            }
        }
    }
    let stats = engine.scheduler().stats();
    let prefix_hit_rate = engine.scheduler().kv().pool().hit_rate();
    let spec = engine.scheduler().spec_stats();
    let history = engine.scheduler().recorded_lengths();
    let records = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| HoraeError::Stalled(format!("request {i} never finished"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(SimResult { policy, records, steps, stats, prefix_hit_rate, spec, history })
}
