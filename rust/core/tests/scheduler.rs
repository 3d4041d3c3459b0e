//! The engine loop with the simulated executor: every policy, bad input, preemption, chunked
//! prefill, prefix caching, checked against the block manager's invariants after every step.

use std::sync::Arc;

use horae_core::engine::{Engine, StepResult, VirtualClock};
use horae_core::plan::{ExecOutput, Executor, StepPlan};
use horae_core::request::{FinishReason, Prompt, Request, RequestSpec, RequestState, Slo};
use horae_core::sched::{PolicyKind, Preemption, QueueDiscipline, Scheduler, SchedulerConfig};
use horae_core::sim::{self, CostModel, LoadModel, SimConfig, SimExecutor, Trace, TraceRequest};
use horae_core::HoraeError;

fn trace(lens: &[(u32, u32)], gap: f64) -> Trace {
    Trace {
        name: "t".into(),
        requests: lens
            .iter()
            .enumerate()
            .map(|(i, &(p, o))| TraceRequest {
                arrival: i as f64 * gap,
                prompt_len: p,
                output_len: o,
                prefix_ids: vec![],
            })
            .collect(),
        timed: true,
        prefix_unit: 512,
    }
}

fn cfg(policy: PolicyKind, kv: usize) -> SimConfig {
    SimConfig {
        sched: SchedulerConfig {
            policy,
            kv_cache_tokens: kv,
            max_output_bound: 512,
            history_window: 50,
            ..Default::default()
        },
        cost: CostModel::roofline("llama-2-7b", "a100-80gb").unwrap(),
        max_tokens: 512,
        load: LoadModel::Open,
        rules: Default::default(),
        retry_failed: false,
        acceptance: None,
        slo_classes: Vec::new(),
    }
}

/// A pseudo-random mixed workload: prompts 20-400, outputs 1-300.
fn mixed(n: usize) -> Vec<(u32, u32)> {
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (20 + (x >> 33) as u32 % 380, 1 + (x >> 17) as u32 % 300)
        })
        .collect()
}

/// A request of `len` synthetic prompt tokens arriving at 0.
fn synthetic(len: usize, max_tokens: usize, slo: Slo, priority: i64) -> RequestSpec {
    RequestSpec {
        prompt: Prompt::Synthetic { len, prefix_ids: vec![], unit: 1 },
        max_tokens,
        ignore_eos: false,
        arrival: Some(0.0),
        sampling: Default::default(),
        stop: Default::default(),
        slo,
        priority,
        grammar: None,
        cache_salt: None,
    }
}

/// Drive an engine by hand so invariants can be checked after every step.
fn run_checked(t: &Trace, c: &SimConfig) -> Vec<Request> {
    let lengths: Arc<Vec<u32>> = Arc::new(t.requests.iter().map(|r| r.output_len).collect());
    let l2 = lengths.clone();
    let sched =
        Scheduler::new(c.sched.clone(), Some(Arc::new(move |id| l2.get(id as usize).map(|&x| x as usize)))).unwrap();
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    for (i, r) in t.requests.iter().enumerate() {
        let slo = c.slo_classes.get(i % c.slo_classes.len().max(1)).copied().unwrap_or_default();
        e.add_request_with_id(i as u64, synthetic(r.prompt_len as usize, c.max_tokens, slo, 0)).unwrap();
    }
    let mut done = Vec::new();
    let mut steps = 0;
    while e.has_work() {
        let out = e.step().unwrap();
        e.scheduler().check_invariants().unwrap();
        let kv = e.scheduler().kv();
        assert!(kv.pool().num_used() <= kv.pool().num_total());
        done.extend(out.finished);
        steps += 1;
        assert!(steps < 1_000_000, "no progress");
    }
    done
}

#[test]
fn every_policy_finishes_every_request_with_exact_lengths() {
    let t = trace(&mixed(150), 0.0);
    for policy in PolicyKind::ALL {
        let done = run_checked(&t, &cfg(policy, 6000));
        assert_eq!(done.len(), 150, "{policy}");
        for r in &done {
            let truth = t.requests[r.id as usize].output_len as usize;
            assert_eq!(r.output.len(), truth, "{policy}: request {} length", r.id);
            assert_eq!(r.finish_reason(), Some(FinishReason::Stop));
        }
    }
}

#[test]
fn conservative_never_preempts_and_aggressive_does_under_pressure() {
    let t = trace(&mixed(150), 0.0);
    let run = |p| sim::simulate(&t, &cfg(p, 6000)).unwrap();
    let cons = run(PolicyKind::Conservative);
    let aggr = run(PolicyKind::Aggressive);
    assert_eq!(cons.stats.preemptions, 0);
    assert!(aggr.stats.preemptions > 0, "a 6k-token pool under 150 queued requests must overflow");
    assert!(aggr.stats.recomputed_tokens > 0);
    let preempted: u64 = aggr.records.iter().map(|r| r.preemptions as u64).sum();
    assert_eq!(preempted, aggr.stats.preemptions, "every preemption is counted on its request");
}

#[test]
fn oracle_with_token_blocks_never_preempts() {
    // block_size 1: the oracle's token-exact peak is the real peak, so it never overcommits.
    let t = trace(&mixed(150), 0.0);
    let mut c = cfg(PolicyKind::Oracle, 6000);
    c.sched.block_size = 1;
    let r = sim::simulate(&t, &c).unwrap();
    assert_eq!(r.stats.preemptions, 0);
    let peak = r.steps.iter().map(|s| s.kv_usage).fold(0.0f32, f32::max);
    assert!(peak > 0.8, "the oracle packs the pool (peak usage {peak})");
}

#[test]
fn past_future_preempts_less_than_aggressive_and_queues_less_than_conservative() {
    let t = trace(&mixed(400), 0.0);
    let run = |p| sim::simulate(&t, &cfg(p, 8000)).unwrap();
    let (pf, ag, co) = (run(PolicyKind::PastFuture), run(PolicyKind::Aggressive), run(PolicyKind::Conservative));
    assert!(
        pf.stats.preemptions < ag.stats.preemptions,
        "pf {} vs aggressive {}",
        pf.stats.preemptions,
        ag.stats.preemptions
    );
    assert!(pf.stats.preemptions < 400 / 10, "past-future preempted {} of 400", pf.stats.preemptions);
    let makespan = |r: &sim::SimResult| r.records.iter().map(|x| x.finished).fold(0.0, f64::max);
    assert!(makespan(&pf) < makespan(&co), "pf {} vs conservative {}", makespan(&pf), makespan(&co));
}

#[test]
fn chunked_prefill_spreads_a_long_prompt_over_steps() {
    let t = trace(&[(1000, 3)], 0.0);
    let mut c = cfg(PolicyKind::PastFuture, 4096);
    c.sched.max_batched_tokens = 256;
    let r = sim::simulate(&t, &c).unwrap();
    // 1000 prompt tokens at 256 a step = 4 steps, the last one samples token 1; then 2 decodes.
    assert_eq!(r.steps.len(), 6);
    assert_eq!(r.steps.iter().map(|s| s.batched_tokens).collect::<Vec<_>>(), vec![256, 256, 256, 232, 1, 1]);
    assert_eq!(r.records[0].output_len, 3);
}

#[test]
fn a_long_prefill_threshold_lets_short_requests_start_beside_a_long_prompt() {
    // A 6,000-token prompt, then a short one a moment later, on a 2,048-token step budget.
    let t = trace(&[(6000, 4), (20, 4)], 0.001);
    let mut c = cfg(PolicyKind::PastFuture, 16_384);
    c.sched.max_batched_tokens = 2048;
    let plain = sim::simulate(&t, &c).unwrap();
    c.sched.long_prefill_token_threshold = Some(512);
    let capped = sim::simulate(&t, &c).unwrap();
    let ttft = |r: &sim::SimResult, i: usize| r.records[i].first_token - r.records[i].arrival;
    // Without the cap the long prompt takes the whole budget for three steps and the short one
    // waits behind it; with it the short one starts in the long prompt's second step.
    assert!(ttft(&capped, 1) < 0.5 * ttft(&plain, 1), "{} vs {}", ttft(&capped, 1), ttft(&plain, 1));
    assert!(capped.steps.iter().all(|s| s.batched_tokens <= 512 + 20));
    // The long prompt pays: 12 chunks of at most 512 tokens instead of 3 of 2,048.
    assert!(ttft(&capped, 0) > ttft(&plain, 0));
    assert!(capped.records.iter().all(|r| r.output_len == 4));
    c.sched.long_prefill_token_threshold = Some(0);
    assert!(
        matches!(sim::simulate(&t, &c), Err(HoraeError::InvalidConfig(m)) if m.contains("long_prefill_token_threshold"))
    );
}

#[test]
fn long_prefills_together_take_at_most_their_share_of_a_step() {
    // Three 6,000-token prompts at once, then a short one: with a 512-token threshold and one
    // long prefill a step (vLLM's default), long prompts take at most 512 tokens of any step.
    let t = trace(&[(6000, 4), (6000, 4), (6000, 4), (20, 4)], 0.001);
    let mut c = cfg(PolicyKind::PastFuture, 40_000);
    c.sched.max_batched_tokens = 2048;
    c.sched.long_prefill_token_threshold = Some(512);
    let one = sim::simulate(&t, &c).unwrap();
    assert!(one.steps.iter().all(|s| s.batched_tokens <= 512 + 20 + 4), "one long prefill a step");
    c.sched.max_long_partial_prefills = 3;
    let three = sim::simulate(&t, &c).unwrap();
    assert!(three.steps.iter().any(|s| s.batched_tokens > 1024), "three long prefills share a step");
    for r in [&one, &three] {
        assert!(r.records.iter().all(|x| x.output_len == 4));
    }
    // The short request never waits for a whole long prompt.
    let ttft = |r: &sim::SimResult| r.records[3].first_token - r.records[3].arrival;
    assert!(ttft(&one) <= ttft(&three) + 1e-9, "{} vs {}", ttft(&one), ttft(&three));
    c.sched.max_long_partial_prefills = 0;
    assert!(
        matches!(sim::simulate(&t, &c), Err(HoraeError::InvalidConfig(m)) if m.contains("max_long_partial_prefills"))
    );
}

#[test]
fn mooncake_style_prefixes_hit_the_cache() {
    let mut t = trace(&[(2048, 4), (2048, 4), (1536, 4)], 100.0);
    t.requests[0].prefix_ids = vec![1, 2, 3, 4];
    t.requests[1].prefix_ids = vec![1, 2, 3, 9];
    t.requests[2].prefix_ids = vec![7, 8, 9];
    let r = sim::simulate(&t, &cfg(PolicyKind::PastFuture, 20_000)).unwrap();
    assert_eq!(r.records[0].cached_tokens, 0);
    assert_eq!(r.records[1].cached_tokens, 3 * 512, "three shared 512-token units");
    assert_eq!(r.records[2].cached_tokens, 0);
    assert!(r.prefix_hit_rate > 0.0);
}

#[test]
fn closed_loop_keeps_n_clients_busy() {
    let mut t = trace(&mixed(60), 0.0);
    t.timed = false;
    let mut c = cfg(PolicyKind::PastFuture, 100_000);
    assert!(sim::simulate(&t, &c).is_err(), "open loop needs arrival times");
    c.load = LoadModel::Closed { clients: 4 };
    let r = sim::simulate(&t, &c).unwrap();
    assert!(r.steps.iter().all(|s| s.running + s.waiting <= 4));
    assert_eq!(r.records.iter().filter(|x| x.completed).count(), 60);
    c.load = LoadModel::Closed { clients: 0 };
    assert!(sim::simulate(&t, &c).is_err());
}

#[test]
fn requests_that_can_never_fit_are_rejected_and_the_rest_run() {
    let t = trace(&[(100, 10), (5000, 10), (100, 10)], 0.0);
    let r = sim::simulate(&t, &cfg(PolicyKind::Conservative, 2048)).unwrap();
    assert!(r.records[1].rejected && !r.records[1].completed);
    assert!(r.records[0].completed && r.records[2].completed);
}

#[test]
fn bad_input_gets_clear_errors() {
    let bad = |c: SchedulerConfig| Scheduler::new(c, None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(bad(SchedulerConfig { block_size: 0, ..Default::default() }).contains("block_size"));
    assert!(bad(SchedulerConfig { kv_cache_tokens: 8, ..Default::default() }).contains("smaller than one block"));
    assert!(bad(SchedulerConfig { max_num_seqs: 0, ..Default::default() }).contains("max_num_seqs"));
    assert!(bad(SchedulerConfig { reserve: 1.5, ..Default::default() }).contains("reserve"));
    assert!(bad(SchedulerConfig { policy: PolicyKind::Oracle, ..Default::default() }).contains("true output lengths"));
    assert!(
        matches!("fifo".parse::<PolicyKind>(), Err(HoraeError::InvalidConfig(m)) if m.contains("unknown scheduler"))
    );

    let c = cfg(PolicyKind::PastFuture, 1024);
    let lengths = Arc::new(vec![5u32; 8]);
    let sched = Scheduler::new(c.sched.clone(), None).unwrap();
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    let spec = |len: usize, max_tokens: usize| RequestSpec {
        slo: Default::default(),
        priority: 0,
        grammar: None,
        cache_salt: None,
        prompt: Prompt::Tokens((0..len as u32).collect()),
        max_tokens,
        ignore_eos: false,
        arrival: None,
        sampling: Default::default(),
        stop: Default::default(),
    };
    let msg = |r: Result<u64, HoraeError>| r.unwrap_err().to_string();
    assert!(msg(e.add_request(spec(0, 5))).contains("prompt is empty"));
    assert!(msg(e.add_request(spec(10, 0))).contains("max_tokens"));
    assert!(msg(e.add_request(spec(1000, 100))).contains("exceeds the whole KV pool"));
    let ok = e.add_request(spec(10, 5)).unwrap();
    assert!(matches!(e.add_request_with_id(ok, spec(10, 5)), Err(HoraeError::DuplicateRequest(_))));
    assert!(matches!(e.abort(99), Err(HoraeError::UnknownRequest(99))));
    // The valid request still runs to completion after all that.
    let mut finished = vec![];
    while e.has_work() {
        finished.extend(e.step().unwrap().finished);
    }
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].output.len(), 5);
}

#[test]
fn abort_frees_blocks_at_once() {
    let c = cfg(PolicyKind::Aggressive, 4096);
    let lengths = Arc::new(vec![1000u32; 4]);
    let sched = Scheduler::new(c.sched.clone(), None).unwrap();
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    for _ in 0..3 {
        let spec = RequestSpec {
            slo: Default::default(),
            priority: 0,
            grammar: None,
            cache_salt: None,
            prompt: Prompt::Tokens(vec![7; 300]),
            max_tokens: 500,
            ignore_eos: false,
            arrival: None,
            sampling: Default::default(),
            stop: Default::default(),
        };
        e.add_request(spec).unwrap();
    }
    for _ in 0..5 {
        e.step().unwrap();
    }
    let used = e.scheduler().kv().pool().num_used();
    assert!(used > 0);
    let r = e.abort(1).unwrap();
    assert_eq!(r.finish_reason(), Some(FinishReason::Aborted));
    assert!(e.scheduler().kv().pool().num_used() < used);
    // It had produced tokens: its length is what the client took, and goes into the history.
    assert!(!r.output.is_empty());
    assert_eq!(e.scheduler().stats().lengths_recorded, 1);
    // One aborted before its first token tells nothing about lengths.
    let spec = RequestSpec {
        slo: Default::default(),
        priority: 0,
        grammar: None,
        cache_salt: None,
        prompt: Prompt::Tokens(vec![9; 50]),
        max_tokens: 50,
        ignore_eos: false,
        arrival: None,
        sampling: Default::default(),
        stop: Default::default(),
    };
    let late = e.add_request(spec).unwrap();
    assert!(e.abort(late).unwrap().output.is_empty());
    assert_eq!(e.scheduler().stats().lengths_recorded, 1);
    e.scheduler().check_invariants().unwrap();
    while e.has_work() {
        e.step().unwrap();
    }
    assert_eq!(e.scheduler().kv().pool().num_used(), 0);
}

#[test]
fn preempted_requests_are_marked_and_huge_max_tokens_is_refused() {
    let t = trace(&mixed(150), 0.0);
    let c = cfg(PolicyKind::Aggressive, 6000);
    let lengths: Arc<Vec<u32>> = Arc::new(t.requests.iter().map(|r| r.output_len).collect());
    let sched = Scheduler::new(c.sched.clone(), None).unwrap();
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    let huge = RequestSpec {
        slo: Default::default(),
        priority: 0,
        grammar: None,
        cache_salt: None,
        prompt: Prompt::Tokens(vec![1; 10]),
        max_tokens: usize::MAX,
        ignore_eos: false,
        arrival: None,
        sampling: Default::default(),
        stop: Default::default(),
    };
    assert!(e.add_request_with_id(10_000, huge).unwrap_err().to_string().contains("exceeds the whole KV pool"));
    for (i, r) in t.requests.iter().enumerate() {
        let spec = RequestSpec {
            slo: Default::default(),
            priority: 0,
            grammar: None,
            cache_salt: None,
            prompt: Prompt::Synthetic { len: r.prompt_len as usize, prefix_ids: vec![], unit: 1 },
            max_tokens: c.max_tokens,
            ignore_eos: false,
            arrival: None,
            sampling: Default::default(),
            stop: Default::default(),
        };
        e.add_request_with_id(i as u64, spec).unwrap();
    }
    let mut seen_preempted = false;
    while e.has_work() {
        let out = e.step().unwrap();
        for id in out.preempted {
            let r = e.scheduler().request(id).unwrap();
            assert_eq!(r.state, RequestState::Preempted);
            assert_eq!(r.num_computed, 0);
            seen_preempted = true;
        }
    }
    assert!(seen_preempted);
}

/// Breaks the steps whose batch holds request `bad`: fails them (as a GPU fault in its step
/// would), or with `panics`, panics in them (a bug in a kernel, say).
struct BreaksOn {
    inner: SimExecutor,
    bad: u64,
    panics: bool,
}

/// The requests a step failed, with the error.
fn failed(out: &StepResult) -> Vec<(u64, String)> {
    out.outputs.iter().filter_map(|o| o.error.clone().map(|e| (o.id, e))).collect()
}

impl Executor for BreaksOn {
    fn execute(&mut self, plan: &StepPlan) -> horae_core::Result<ExecOutput> {
        if plan.seqs.iter().any(|s| s.id == self.bad) {
            if self.panics {
                panic!("index out of bounds: the len is 3 but the index is 7");
            }
            return Err(HoraeError::Cuda("an illegal memory access was encountered".into()));
        }
        self.inner.execute(plan)
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids()
    }
}

#[test]
fn a_failing_step_fails_its_requests_and_the_engine_goes_on() {
    let c = cfg(PolicyKind::PastFuture, 4096);
    let lengths = Arc::new(vec![40u32; 6]);
    let sched = Scheduler::new(c.sched.clone(), None).unwrap();
    let exec = BreaksOn { inner: SimExecutor::new(c.cost.clone(), lengths), bad: 3, panics: false };
    let mut e = Engine::new(sched, Box::new(exec), Box::new(VirtualClock::default()));
    let add = |e: &mut Engine| {
        let spec = RequestSpec {
            slo: Default::default(),
            priority: 0,
            grammar: None,
            cache_salt: None,
            prompt: Prompt::Tokens(vec![5; 100]),
            max_tokens: 40,
            ignore_eos: false,
            arrival: None,
            sampling: Default::default(),
            stop: Default::default(),
        };
        e.add_request(spec).unwrap()
    };
    // Three requests run together; request 3 joins later and its first step fails.
    for _ in 0..3 {
        add(&mut e);
    }
    for _ in 0..4 {
        assert!(failed(&e.step().unwrap()).is_empty());
    }
    assert_eq!(add(&mut e), 3);
    let out = e.step().unwrap();
    let errors = failed(&out);
    let ids: Vec<u64> = errors.iter().map(|f| f.0).collect();
    // Everyone in that batch fails with the error, blocks freed; nothing is recorded as a length.
    assert!(ids.contains(&3) && ids.len() == 4, "{ids:?}");
    assert!(errors.iter().all(|f| f.1.contains("illegal memory access")));
    assert_eq!(e.scheduler().kv().pool().num_used(), 0);
    assert_eq!(e.scheduler().stats().lengths_recorded, 0);
    e.scheduler().check_invariants().unwrap();
    // Later requests run to the end.
    let (a, b) = (add(&mut e), add(&mut e));
    let mut done = Vec::new();
    while e.has_work() {
        let out = e.step().unwrap();
        assert!(failed(&out).is_empty());
        done.extend(out.finished.iter().map(|r| (r.id, r.output.len())));
    }
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|&(id, n)| (id == a || id == b) && n == 40), "{done:?}");
}

#[test]
fn a_step_that_panics_ends_the_loop_and_says_the_engine_died() {
    use horae_core::engine::EngineHandle;
    use horae_core::request::{RequestLimits, RequestParams};
    use std::sync::mpsc;
    use std::time::Duration;

    let c = cfg(PolicyKind::PastFuture, 4096);
    let sched = Scheduler::new(c.sched.clone(), None).unwrap();
    let exec = BreaksOn { inner: SimExecutor::new(c.cost.clone(), Arc::new(vec![8u32; 4])), bad: 1, panics: true };
    let engine = Engine::new(sched, Box::new(exec), Box::new(VirtualClock::default()));
    let h = EngineHandle::new(engine, RequestLimits { vocab_size: 1000, max_model_len: 2048, pool_tokens: 4096 });
    let (tx, rx) = mpsc::channel();
    h.start_loop(move |events| {
        let _ = tx.send(events.map(|e| e.outputs.len()));
    })
    .unwrap();
    let params = |n| RequestParams { prompt_token_ids: vec![5; 20], max_tokens: Some(n), ..Default::default() };
    let first = h.add_request(params(8)).unwrap();
    assert_eq!(first, 0);
    // Request 0 runs; request 1's first step panics: the loop reports it once, as the engine's
    // death with the panic's message, and ends (no hang, no silent exit).
    let mut seen = Vec::new();
    let died = loop {
        match rx.recv_timeout(Duration::from_secs(30)).expect("the loop reports before it ends") {
            Ok(n) => {
                seen.push(n);
                if seen.len() == 2 {
                    h.add_request(params(8)).unwrap();
                }
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(&died, HoraeError::EngineDied(m) if m.contains("the index is 7")), "{died}");
    assert!(died.to_string().contains("restart it"), "{died}");
    // Nothing more is taken: a request added now would wait for a loop that is gone.
    assert!(matches!(h.add_request(params(4)), Err(HoraeError::EngineDied(_))));
    h.stop_loop().expect("the loop was started").join().expect("the loop thread ended cleanly");
    assert!(rx.try_recv().is_err(), "nothing after the death");

    // The same on the caller's thread (`LLM`'s steps): the panic is the engine's death, said
    // as an error instead of unwinding into the caller, and nothing runs after it.
    let sched = Scheduler::new(c.sched.clone(), None).unwrap();
    let exec = BreaksOn { inner: SimExecutor::new(c.cost.clone(), Arc::new(vec![8u32; 4])), bad: 0, panics: true };
    let engine = Engine::new(sched, Box::new(exec), Box::new(VirtualClock::default()));
    let h = EngineHandle::new(engine, RequestLimits { vocab_size: 1000, max_model_len: 2048, pool_tokens: 4096 });
    h.add_request(params(8)).unwrap();
    assert!(matches!(h.step(), Err(HoraeError::EngineDied(m)) if m.contains("the index is 7")));
    assert!(matches!(h.step(), Err(HoraeError::EngineDied(_))));
    assert!(matches!(h.add_request(params(4)), Err(HoraeError::EngineDied(_))));
}

/// The server's rules, the same for every policy: a request still queued at its deadline ends
/// with `timeout` having cost nothing; a started request without a token for longer than the gap
/// bound ends with `sla_abort`; neither length feeds the history; the block manager stays whole.
#[test]
fn queue_deadline_and_gap_abort_end_requests_for_every_policy() {
    use horae_core::engine::ServerRules;
    let t = trace(&mixed(150), 0.0);
    for policy in [PolicyKind::PastFuture, PolicyKind::Aggressive, PolicyKind::Conservative] {
        let base = cfg(policy, 6000);
        let plain = sim::simulate(&t, &base).unwrap();
        // All 150 arrive at once: the queue holds most of them for seconds.
        let deadline =
            SimConfig { rules: ServerRules { queue_timeout: Some(0.5), max_itl_abort: None }, ..base.clone() };
        let r = sim::simulate(&t, &deadline).unwrap();
        let timed_out: Vec<_> = r.records.iter().filter(|x| x.finish_reason == "timeout").collect();
        assert!(!timed_out.is_empty(), "{policy}: some requests must wait past 0.5 s");
        for x in &timed_out {
            // Never started: no compute, no token; dropped just past its deadline.
            assert!(x.first_scheduled.is_nan() && x.output_len == 0, "{policy}: {x:?}");
            assert!(x.finished - x.arrival > 0.5 && x.finished - x.arrival < 1.5, "{policy}: {x:?}");
        }
        let s = r.summary();
        assert_eq!(s.timeouts, timed_out.len());
        assert_eq!(s.completed + s.timeouts, 150, "{policy}: every other request completes");
        assert_eq!(r.stats.lengths_recorded as usize, s.completed, "{policy}: timeouts are not lengths");
        assert!(s.duration < plain.summary().duration, "{policy}: dropped work is saved time");

        // A tight gap bound: requests that stall (queued behind a preemption, or waiting for
        // their next chunk) are cut; what ran and finished is untouched.
        let gap = SimConfig { rules: ServerRules { queue_timeout: None, max_itl_abort: Some(0.05) }, ..base.clone() };
        let r = sim::simulate(&t, &gap).unwrap();
        let s = r.summary();
        for x in r.records.iter().filter(|x| x.finish_reason == "sla_abort") {
            assert!(x.output_len > 0, "{policy}: only started requests with a token are cut: {x:?}");
        }
        assert_eq!(s.completed + s.sla_aborts, 150, "{policy}");
        assert_eq!(r.stats.lengths_recorded as usize, s.completed, "{policy}: SLA aborts are not lengths");
        if policy == PolicyKind::Aggressive {
            assert!(s.sla_aborts > 0, "aggressive preempts under this load, and its preempted requests stall");
        }
    }
    let bad =
        |rules| sim::simulate(&t, &SimConfig { rules, ..cfg(PolicyKind::PastFuture, 6000) }).unwrap_err().to_string();
    assert!(bad(ServerRules { queue_timeout: Some(0.0), max_itl_abort: None }).contains("queue_timeout"));
    assert!(bad(ServerRules { queue_timeout: None, max_itl_abort: Some(-1.0) }).contains("max_itl_abort"));
    assert!(bad(ServerRules { queue_timeout: Some(f64::NAN), max_itl_abort: None }).contains("queue_timeout"));
}

#[test]
fn admission_pace_and_forecast_options_keep_every_request_exact() {
    use horae_core::sched::{Censoring, Tuning};
    let t = trace(&mixed(150), 0.0);
    // One admission per step (LightLLM's pace): the first steps grow the batch one by one.
    let mut one = cfg(PolicyKind::Aggressive, 6000);
    one.sched.max_admit_per_step = Some(1);
    let r = sim::simulate(&t, &one).unwrap();
    let running: Vec<u32> = r.steps.iter().take(5).map(|s| s.running).collect();
    assert_eq!(running, vec![1, 2, 3, 4, 5]);
    assert!(sim::simulate(&t, &cfg(PolicyKind::Aggressive, 6000)).unwrap().steps[0].running > 5);
    // Every forecast option still finishes every request at its exact length.
    for tuning in [
        Tuning { scenarios: Some(16), ..Default::default() },
        Tuning { redraw: true, ..Default::default() },
        Tuning { fitted_tail: true, ..Default::default() },
        Tuning { scenarios: Some(16), quantile: Some(0.75), ..Default::default() },
        Tuning { censoring: Censoring::Off, ..Default::default() },
        Tuning { censoring: Censoring::Always, ..Default::default() },
        Tuning { bootstrap: false, ..Default::default() },
        Tuning { linear_tail: false, ..Default::default() },
    ] {
        let mut c = cfg(PolicyKind::PastFuture, 6000);
        c.sched.tuning = tuning;
        let done = run_checked(&t, &c);
        assert_eq!(done.len(), 150, "{tuning:?}");
        assert!(done.iter().all(|r| r.output.len() == t.requests[r.id as usize].output_len as usize));
    }
    let mut bad = cfg(PolicyKind::PastFuture, 6000);
    bad.sched.tuning.scenarios = Some(17);
    assert!(matches!(sim::simulate(&t, &bad), Err(HoraeError::InvalidConfig(m)) if m.contains("scenarios")));
    bad.sched.tuning.scenarios = None;
    bad.sched.tuning.quantile = Some(1.5);
    assert!(matches!(sim::simulate(&t, &bad), Err(HoraeError::InvalidConfig(m)) if m.contains("quantile")));
    bad.sched.tuning.quantile = None;
    bad.sched.history_start.recorded = Arc::from([3u32, 0].as_slice());
    assert!(matches!(sim::simulate(&t, &bad), Err(HoraeError::InvalidConfig(m)) if m.contains("at least 1 token")));
    bad.sched.history_start.recorded = Arc::from([].as_slice());
    bad.sched.max_admit_per_step = Some(0);
    assert!(matches!(sim::simulate(&t, &bad), Err(HoraeError::InvalidConfig(m)) if m.contains("max_admit_per_step")));
}

/// Every other request interactive (first token within 1 s, no gap over 0.2 s), the rest batch.
fn mixed_slos() -> Vec<Slo> {
    vec![
        Slo { ttft: Some(1.0), max_itl: Some(0.2), ..Default::default() },
        Slo { e2e: Some(120.0), ..Default::default() },
    ]
}

#[test]
fn the_slo_queue_keeps_goodput_under_overload_and_sheds_only_what_never_started() {
    use horae_core::engine::ServerRules;
    // 100 arrivals a second, open loop: more than the engine serves (the SLO queue sheds ~550).
    let t = trace(&mixed(3000), 0.01);
    let base = SimConfig { slo_classes: mixed_slos(), max_tokens: 512, ..cfg(PolicyKind::PastFuture, 60_000) };
    let deadline = SimConfig { rules: ServerRules { queue_timeout: Some(8.0), max_itl_abort: None }, ..base.clone() };
    let slo =
        SimConfig { sched: SchedulerConfig { queue: QueueDiscipline::Slo, ..base.sched.clone() }, ..base.clone() };
    let (d, q) = (sim::simulate(&t, &deadline).unwrap(), sim::simulate(&t, &slo).unwrap());
    let (ds, qs) = (d.summary(), q.summary());
    assert!(
        qs.goodput_tps >= 1.5 * ds.goodput_tps,
        "slo {} against fcfs + deadline {}",
        qs.goodput_tps,
        ds.goodput_tps
    );
    assert!(qs.timeouts > 0);
    for x in q.records.iter().filter(|x| x.finish_reason == "timeout") {
        assert!(x.first_scheduled.is_nan() && x.output_len == 0, "shed before it cost anything: {x:?}");
    }
    assert_eq!(qs.completed + qs.timeouts, 3000);
    // Both classes are served, not one starved for the other.
    let met = |k: usize| q.records.iter().skip(k).step_by(2).filter(|r| r.meets()).count();
    assert!(met(0) > 100 && met(1) > 100, "interactive {} batch {}", met(0), met(1));
}

#[test]
fn the_slo_queue_serves_priority_then_least_slack_and_fcfs_serves_priority_then_arrival() {
    let order = |queue: QueueDiscipline| {
        let c = SimConfig {
            sched: SchedulerConfig { queue, max_num_seqs: 1, ..cfg(PolicyKind::Aggressive, 6000).sched },
            ..cfg(PolicyKind::Aggressive, 6000)
        };
        let lengths = Arc::new(vec![5u32; 4]);
        let sched = Scheduler::new(c.sched.clone(), None).unwrap();
        let mut e =
            Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
        // (TTFT bound, priority): a loose one first, a tight one, a low-priority-value one, none.
        for (i, (ttft, priority)) in [(Some(100.0), 0), (Some(5.0), 0), (None, -1), (None, 0)].into_iter().enumerate() {
            let slo = Slo { ttft, ..Default::default() };
            e.add_request_with_id(i as u64, synthetic(16, 8, slo, priority)).unwrap();
        }
        let mut done = Vec::new();
        while e.has_work() {
            done.extend(e.step().unwrap().finished.into_iter().map(|r| r.id));
        }
        done
    };
    assert_eq!(order(QueueDiscipline::Fcfs), vec![2, 0, 1, 3]);
    assert_eq!(order(QueueDiscipline::Slo), vec![2, 1, 0, 3]);
}

#[test]
fn least_loss_preemption_spares_the_requests_it_would_fail() {
    // A pool far too small for the batch (aggressive admits, then preempts), half the requests
    // bound by a gap: the least-loss victim takes the batch requests first.
    let t = trace(&mixed(300), 0.0);
    let classes = vec![Slo { max_itl: Some(0.5), ..Default::default() }, Slo::default()];
    let run = |preemption| {
        let base = cfg(PolicyKind::Aggressive, 6000);
        let c = SimConfig {
            sched: SchedulerConfig { queue: QueueDiscipline::Slo, preemption: Some(preemption), ..base.sched.clone() },
            slo_classes: classes.clone(),
            ..base
        };
        // Invariants after every step with either victim rule.
        assert_eq!(run_checked(&t, &c).len(), 300);
        let r = sim::simulate(&t, &c).unwrap();
        let pre = |k: usize| r.records.iter().skip(k).step_by(2).map(|x| x.preemptions as usize).sum::<usize>();
        let met = r.records.iter().step_by(2).filter(|x| x.meets()).count();
        (pre(0), pre(1), met)
    };
    let (newest, least) = (run(Preemption::Newest), run(Preemption::LeastLoss));
    assert!(least.0 < newest.0, "gap-bound requests preempted: least-loss {} newest {}", least.0, newest.0);
    assert!(least.2 >= newest.2, "gap-bound requests that met their bound: least-loss {} newest {}", least.2, newest.2);
}

#[test]
fn the_slo_queue_sheds_the_request_that_costs_most_per_token_of_goodput() {
    // Two prompts of 4,096 tokens wait with first-token bounds such that the machine can start
    // only one in time: the one with less slack (X, nothing cached) goes first in least-slack
    // order, the other (Y) finds its prompt cached. Shedding the late one would drop Y; shedding
    // by compute per token of goodput drops X, and Y starts in time.
    let c = cfg(PolicyKind::PastFuture, 60_000);
    let lengths = Arc::new(vec![1u32; 3]);
    let sched = Scheduler::new(SchedulerConfig { queue: QueueDiscipline::Slo, ..c.sched.clone() }, None).unwrap();
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    let prompt = |first: u64| Prompt::Synthetic { len: 4096, prefix_ids: (first..first + 8).collect(), unit: 512 };
    let spec = |first: u64, ttft: Option<f64>, arrival: f64| RequestSpec {
        prompt: prompt(first),
        slo: Slo { ttft, ..Default::default() },
        arrival: Some(arrival),
        ..synthetic(4096, 1, Slo::default(), 0)
    };
    // Warm the cache with Y's prompt (and the step times the queue plans with).
    e.add_request_with_id(0, spec(1, None, 0.0)).unwrap();
    while e.has_work() {
        e.step().unwrap();
    }
    let now = e.now();
    let prefill = 4096.0 / e.scheduler().prefill_rate();
    assert!(prefill > 0.0);
    // X in time alone (bound 1.3 prefills); Y in time alone but not behind X (1.6 prefills).
    e.add_request_with_id(1, spec(100, Some(1.3 * prefill), now)).unwrap();
    e.add_request_with_id(2, spec(1, Some(1.6 * prefill), now)).unwrap();
    let mut done = Vec::new();
    while e.has_work() {
        done.extend(e.step().unwrap().finished);
    }
    let shed: Vec<_> = done.iter().filter(|r| r.finish_reason() == Some(FinishReason::Timeout)).map(|r| r.id).collect();
    assert_eq!(shed, vec![1], "X goes, Y stays");
    let y = done.iter().find(|r| r.id == 2).expect("Y finished");
    assert_eq!(y.finish_reason(), Some(FinishReason::Stop));
    assert!(y.cached_tokens >= 4000, "Y's prompt came from the cache: {}", y.cached_tokens);
    assert!(y.times.first_token.unwrap() - now <= 1.6 * prefill, "Y met its bound");
}

#[test]
fn among_requests_that_cost_the_same_per_token_the_slo_queue_sheds_the_largest() {
    // Three wait in least-slack order: B (4,096 tokens, nothing cached), S (2,048, nothing
    // cached), Y (4,096, cached). Y is late behind both; shedding either one starts it in time.
    // B and S cost the same per token of goodput (all of it computed), so the tie rule decides:
    // the most work goes (Moore-Hodgson's rule: the fewest requests shed for the time freed). A
    // rule that shed the later one in the queue, or the smaller, would shed S.
    let c = cfg(PolicyKind::PastFuture, 60_000);
    let lengths = Arc::new(vec![1u32; 4]);
    let sched = Scheduler::new(SchedulerConfig { queue: QueueDiscipline::Slo, ..c.sched.clone() }, None).unwrap();
    let budget = sched.config().max_batched_tokens;
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    let spec = |len: usize, first: u64, ttft: Option<f64>, arrival: f64| RequestSpec {
        prompt: Prompt::Synthetic { len, prefix_ids: (first..first + (len / 512) as u64).collect(), unit: 512 },
        slo: Slo { ttft, ..Default::default() },
        arrival: Some(arrival),
        ..synthetic(len, 1, Slo::default(), 0)
    };
    // Warm the cache with Y's prompt and the step times (full steps of `budget` tokens).
    e.add_request_with_id(0, spec(4096, 1, None, 0.0)).unwrap();
    while e.has_work() {
        e.step().unwrap();
    }
    assert_eq!(budget, 2048, "the bounds below count steps of 2,048 tokens");
    let now = e.now();
    let step = budget as f64 / e.scheduler().prefill_rate();
    // Latest starts (bound less prefill): B 0.5 steps, S 2.5, Y 2.75; Y's start behind both is 3
    // steps, behind S alone 1, behind B alone 2.
    e.add_request_with_id(1, spec(4096, 100, Some(2.5 * step), now)).unwrap();
    e.add_request_with_id(2, spec(2048, 200, Some(3.5 * step), now)).unwrap();
    e.add_request_with_id(3, spec(4096, 1, Some(4.75 * step), now)).unwrap();
    let mut done = Vec::new();
    while e.has_work() {
        done.extend(e.step().unwrap().finished);
    }
    let shed: Vec<_> = done.iter().filter(|r| r.finish_reason() == Some(FinishReason::Timeout)).map(|r| r.id).collect();
    assert_eq!(shed, vec![1], "B goes; S and Y stay");
    for id in [2, 3] {
        let r = done.iter().find(|r| r.id == id).expect("finished");
        assert_eq!(r.finish_reason(), Some(FinishReason::Stop), "request {id}");
    }
}

/// The `slo` queue's charge for the request at the head of the queue (conservative admission): a short request Q (64
/// tokens, up to 200 out, 4 in fact) arrives while A (512 tokens, 400 to generate) runs, with a
/// first-token bound of 0.9 of a full step (2,048 tokens), several decode steps. Returns Q's
/// finish, the steps it took after arriving, its TTFT and that bound.
fn head_of_queue(max_num_seqs: usize, kv: usize) -> (FinishReason, usize, Option<f64>, f64) {
    let c = cfg(PolicyKind::Conservative, kv);
    let lengths = Arc::new(vec![1u32, 400, 4]);
    let sched = Scheduler::new(
        SchedulerConfig { queue: QueueDiscipline::Slo, max_num_seqs, max_output_bound: 400, ..c.sched.clone() },
        None,
    )
    .unwrap();
    let budget = sched.config().max_batched_tokens;
    let mut e =
        Engine::new(sched, Box::new(SimExecutor::new(c.cost.clone(), lengths)), Box::new(VirtualClock::default()));
    // Warm the step times with a long step (a full one would not fit the smallest pool below).
    e.add_request_with_id(0, synthetic(1008, 1, Slo::default(), 0)).unwrap();
    while e.has_work() {
        e.step().unwrap();
    }
    let full_step = budget as f64 / e.scheduler().prefill_rate();
    e.add_request_with_id(1, RequestSpec { arrival: Some(e.now()), ..synthetic(512, 400, Slo::default(), 0) }).unwrap();
    // 300 of A's decode steps: the recent mean step is a decode step's.
    for _ in 0..300 {
        e.step().unwrap();
    }
    let bound = 0.9 * full_step;
    let arrival = e.now();
    let slo = Slo { ttft: Some(bound), ..Default::default() };
    e.add_request_with_id(2, RequestSpec { arrival: Some(arrival), ..synthetic(64, 200, slo, 0) }).unwrap();
    for steps in 1..2_000 {
        if let Some(q) = e.step().unwrap().finished.into_iter().find(|r| r.id == 2) {
            return (q.finish_reason().unwrap(), steps, q.times.first_token.map(|t| t - arrival), bound);
        }
    }
    panic!("Q never finished");
}

#[test]
fn the_slo_queue_charges_the_head_its_own_step_only_when_it_can_start() {
    // A free slot and room: Q starts in the next step, well within its bound.
    let (end, _, ttft, bound) = head_of_queue(4, 8192);
    assert_eq!(end, FinishReason::Stop);
    assert!(ttft.unwrap() <= bound, "ttft {ttft:?} over the bound {bound}");
    // Every slot taken (A holds the only one for 100 more steps): Q waits for it, which its own
    // short step does not show, so it is charged full steps and shed at once, while a replica
    // elsewhere could still serve it (kept, it would be shed only just before its bound).
    let (end, steps, _, _) = head_of_queue(1, 8192);
    assert_eq!((end, steps), (FinishReason::Timeout, 1), "shed at once with every slot taken");
    // A free slot, but the policy holds it back for memory: A's 912 tokens and Q's 264 do not
    // fit a 1,024-token pool under conservative admission. The same, from the step whose
    // admission first held it back (the second; charged its own step, it was kept until the sixth).
    let (end, steps, _, _) = head_of_queue(4, 1024);
    assert_eq!((end, steps), (FinishReason::Timeout, 2), "shed once memory held it");
}

#[test]
fn a_queued_requests_cached_prefix_is_evicted_last() {
    // P's prefix (1,024 tokens) and then Q's are cached, P's the older. S arrives needing more
    // than the free blocks, then R, which reads P's prefix, queues behind it (one sequence at a
    // time). LRU by release alone would evict P's blocks for S; R's arrival makes them the
    // youngest, so S takes Q's and R finds all of P's prefix cached.
    let c = cfg(PolicyKind::Aggressive, 4096);
    let sched = Scheduler::new(SchedulerConfig { max_num_seqs: 1, ..c.sched.clone() }, None).unwrap();
    let mut e = Engine::new(
        sched,
        Box::new(SimExecutor::new(c.cost.clone(), Arc::new(vec![1u32; 4]))),
        Box::new(VirtualClock::default()),
    );
    let spec = |len: usize, ids: Vec<u64>| RequestSpec {
        prompt: Prompt::Synthetic { len, prefix_ids: ids, unit: 512 },
        ..synthetic(len, 1, Slo::default(), 0)
    };
    let run = |e: &mut Engine, reqs: Vec<(u64, RequestSpec)>| {
        for (id, s) in reqs {
            e.add_request_with_id(id, RequestSpec { arrival: Some(e.now()), ..s }).unwrap();
        }
        let mut done = Vec::new();
        while e.has_work() {
            done.extend(e.step().unwrap().finished);
            e.scheduler().check_invariants().unwrap();
        }
        done
    };
    run(&mut e, vec![(0, spec(1024, vec![1, 2]))]);
    run(&mut e, vec![(1, spec(1024, vec![3, 4]))]);
    let done = run(&mut e, vec![(2, spec(2560, vec![5, 6, 7, 8, 9])), (3, spec(1040, vec![1, 2, 10]))]);
    let r = done.iter().find(|r| r.id == 3).expect("R finished");
    assert_eq!(r.cached_tokens, 1024, "R read all of P's prefix from the cache");
    assert!(e.scheduler().kv().pool().evictions > 0, "S evicted cached blocks");
}
