//! Several simulated replicas behind one router (`route::Router`, the same code the Ray Serve
//! deployment routes with): a discrete-event loop over N engines, each with the real scheduler and
//! block manager and its own virtual clock. The router sees each replica's stats as last
//! published (every `staleness` seconds, as Ray polls them) plus what it sent since. Open loop.
//! A request a replica sheds (its queue deadline, or the SLO queue finding it hopeless) is routed
//! again to a replica that has not turned it away, as the Ray deployment retries a 503; its
//! times still count from its first arrival.

use std::sync::Arc;

use super::executor::SimExecutor;
use super::report::{RequestRecord, Summary};
use super::runner::{trace_request, LoadModel, SimConfig};
use super::trace::Trace;
use crate::engine::{Engine, VirtualClock};
use crate::error::{HoraeError, Result};
use crate::request::{FinishReason, RequestSpec};
use crate::route::{first_token_bound, ReplicaStats, RetryShed, RouteRequest, Router, RouterKind};
use crate::sched::{Scheduler, SchedulerStats};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Every replica's engine, cost model, rules and SLOs.
    pub sim: SimConfig,
    pub replicas: usize,
    pub router: RouterKind,
    /// Seconds between two publications of a replica's routing stats.
    pub staleness: f64,
    /// Where a request a replica shed is sent next.
    pub retry: RetryShed,
}

/// One replica's share of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaReport {
    pub requests: usize,
    pub stats: SchedulerStats,
    pub prefix_hit_rate: f64,
    /// Running requests, averaged over the run's simulated time.
    pub mean_running: f64,
}

#[derive(Debug, Clone)]
pub struct ClusterResult {
    /// One per trace request, in trace order.
    pub records: Vec<RequestRecord>,
    pub replicas: Vec<ReplicaReport>,
    /// Full prompt blocks served from a prefix cache, of all looked up, over every replica.
    pub prefix_hit_rate: f64,
    /// Load imbalance: the busiest replica's mean running count over the mean of all.
    pub load_imbalance: f64,
}

impl ClusterResult {
    pub fn summary(&self) -> Summary {
        Summary::new(&self.records, &[])
    }
}

/// `f` on request `i` (as `spec`) as the router sees it, `waited` seconds after it arrived: its
/// prompt's block hashes and what is left of its first-token bound.
fn as_routed<T>(spec: &RequestSpec, i: usize, cfg: &SimConfig, waited: f64, f: impl FnOnce(&RouteRequest) -> T) -> T {
    let block_size = cfg.sched.block_size;
    let hashes = spec.prompt.block_hashes(block_size, i as u64, None);
    f(&RouteRequest {
        block_hashes: &hashes,
        block_size,
        prompt_len: spec.prompt.len(),
        max_tokens: spec.max_tokens,
        ttft: first_token_bound(spec.slo.or(&cfg.sched.default_slo).ttft, cfg.rules.queue_timeout).map(|t| t - waited),
    })
}

/// Hand request `i` to a replica at time `at`; an idle replica's clock first moves up to it.
fn hand_over(e: &mut Engine, i: usize, spec: RequestSpec, at: f64) -> Result<()> {
    if !e.has_work() && e.now() < at {
        e.advance_clock_to(at);
    }
    e.add_request_with_id(i as u64, spec)
}

/// Replicas a simulated cluster may have. Each is a whole engine (scheduler, block manager, pool
/// records) that every event scans, so a count far past any one model's deployment (a fuzzer's
/// 10**12) ran until the machine's memory gave out instead of failing.
pub const MAX_REPLICAS: usize = 4096;

pub fn simulate_cluster(trace: &Trace, cfg: &ClusterConfig) -> Result<ClusterResult> {
    let sim = &cfg.sim;
    if cfg.replicas == 0 || cfg.replicas > MAX_REPLICAS {
        return Err(HoraeError::InvalidConfig(format!(
            "replicas must be 1 to {MAX_REPLICAS} (each simulated replica is a whole engine), got {}",
            cfg.replicas
        )));
    }
    if !(cfg.staleness.is_finite() && cfg.staleness >= 0.0) {
        return Err(HoraeError::InvalidConfig(format!("staleness must be >= 0 seconds, got {}", cfg.staleness)));
    }
    if sim.load != LoadModel::Open || !trace.timed {
        return Err(HoraeError::InvalidConfig(
            "the cluster simulator replays a trace's arrivals (open loop): give a timed trace".into(),
        ));
    }
    if sim.sched.policy == crate::sched::PolicyKind::Oracle {
        return Err(HoraeError::InvalidConfig("the oracle is not a replica policy".into()));
    }
    let reqs = &trace.requests;
    let lengths: Arc<Vec<u32>> = Arc::new(reqs.iter().map(|r| r.output_len).collect());
    // Grown as made: MAX_REPLICAS large pools stop at the first the machine cannot hold (an
    // error), not on a reservation for all of them.
    let mut engines = Vec::new();
    for k in 0..cfg.replicas {
        let mut sched_cfg = sim.sched.clone();
        sched_cfg.seed = sched_cfg.seed.wrapping_add(k as u64);
        let exec = SimExecutor::new(sim.cost.clone(), lengths.clone());
        // A pool the machine cannot hold says which replica ran out: the count is what to lower.
        let sched = Scheduler::new(sched_cfg, None).map_err(|e| match e {
            HoraeError::InvalidConfig(m) if k > 0 => {
                HoraeError::InvalidConfig(format!("replica {} of {}: {m}, or fewer replicas", k + 1, cfg.replicas))
            }
            other => other,
        })?;
        let e = Engine::new(sched, Box::new(exec), Box::new(VirtualClock::default()))
            .finished_outputs_only()
            .with_rules(sim.rules)?;
        engines.push(e);
    }
    let mut router = Router::new(cfg.router, sim.sched.seed);
    let mut stats: Vec<ReplicaStats> = engines.iter().map(Engine::replica_stats).collect();
    let mut next_publish = cfg.staleness;
    let mut records: Vec<Option<RequestRecord>> = vec![None; reqs.len()];
    let mut routed = vec![0usize; cfg.replicas];
    // Time-weighted running counts per replica (their mean over the run).
    let mut running_area = vec![0.0f64; cfg.replicas];
    let mut tried: Vec<Vec<usize>> = vec![Vec::new(); reqs.len()];
    let mut next = 0usize;
    loop {
        // The replica furthest behind that has work steps next, unless an arrival comes first.
        let behind = (0..engines.len())
            .filter(|&k| engines[k].has_work())
            .min_by(|&a, &b| engines[a].now().total_cmp(&engines[b].now()));
        let arrival = reqs.get(next).map(|r| r.arrival);
        match (arrival, behind) {
            (Some(t), b) if b.is_none_or(|k| t <= engines[k].now()) => {
                if t >= next_publish {
                    stats = engines.iter().map(Engine::replica_stats).collect();
                    for k in 0..engines.len() {
                        router.refreshed(k);
                    }
                    next_publish = t + cfg.staleness;
                }
                let spec = trace_request(trace, next, sim, t);
                let k = as_routed(&spec, next, sim, 0.0, |req| router.choose(req, &stats));
                let slo = spec.slo;
                match hand_over(&mut engines[k], next, spec, t) {
                    Ok(()) => {
                        routed[k] += 1;
                        tried[next].push(k);
                    }
                    Err(HoraeError::InvalidRequest { .. }) => {
                        records[next] = Some(RequestRecord::rejected(
                            next as u64,
                            t,
                            reqs[next].prompt_len,
                            slo.or(&sim.sched.default_slo),
                        ))
                    }
                    Err(e) => return Err(e),
                }
                next += 1;
            }
            (_, Some(k)) => {
                let out = engines[k].step()?;
                if let Some(s) = out.sample {
                    running_area[k] += s.duration * s.running as f64;
                }
                let now = engines[k].now();
                for r in out.finished {
                    let i = r.id as usize;
                    if r.finish_reason() == Some(FinishReason::Timeout) {
                        // Shed before it cost anything: the router may send it elsewhere.
                        let spec = trace_request(trace, i, sim, reqs[i].arrival);
                        let target = as_routed(&spec, i, sim, now - reqs[i].arrival, |req| {
                            router.retry_target(req, &stats, &tried[i], cfg.retry)
                        });
                        if let Some(j) = target {
                            tried[i].push(j);
                            hand_over(&mut engines[j], i, spec, now)?;
                            routed[j] += 1;
                            continue;
                        }
                    }
                    let mut record = RequestRecord::from_request(&r);
                    record.attempts = tried[i].len() as u32;
                    // Every send before the last was shed (a time-out); the last counts its own.
                    record.timed_out += record.attempts.saturating_sub(1);
                    records[i] = Some(record);
                }
            }
            (None, None) => break,
            (Some(_), None) => unreachable!("an arrival with no busy replica is routed above"),
        }
    }
    let records = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| HoraeError::Stalled(format!("request {i} never finished"))))
        .collect::<Result<Vec<_>>>()?;
    let span = engines.iter().map(|e| e.now()).fold(0.0, f64::max).max(1e-9);
    let replicas: Vec<ReplicaReport> = engines
        .iter()
        .enumerate()
        .map(|(k, e)| ReplicaReport {
            requests: routed[k],
            stats: e.scheduler().stats(),
            prefix_hit_rate: e.scheduler().kv().pool().hit_rate(),
            mean_running: running_area[k] / span,
        })
        .collect();
    let (hit, asked) = engines.iter().fold((0u64, 0u64), |(h, q), e| {
        let p = e.scheduler().kv().pool();
        (h + p.hit_blocks, q + p.queried_blocks)
    });
    let mean = replicas.iter().map(|r| r.mean_running).sum::<f64>() / replicas.len() as f64;
    let max = replicas.iter().map(|r| r.mean_running).fold(0.0, f64::max);
    Ok(ClusterResult {
        records,
        replicas,
        prefix_hit_rate: if asked == 0 { 0.0 } else { hit as f64 / asked as f64 },
        load_imbalance: if mean > 0.0 { max / mean } else { 1.0 },
    })
}
