//! Queue-discipline overhead (run by `horae bench queue`): the engine's own time per step (the
//! scheduler, the rules, the bookkeeping; the simulated executor's arithmetic is a few
//! microseconds of it) with `queue = "fcfs"` and `"slo"`, at a given number of running and waiting
//! requests, in the same process, against what the step itself costs on the GPU it models.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Engine, VirtualClock};
use crate::request::{Prompt, RequestSpec, Slo};
use crate::sched::{QueueDiscipline, Scheduler, SchedulerConfig};
use crate::sim::{CostModel, SimExecutor};

#[derive(Debug, Clone, Copy)]
pub struct QueueTiming {
    pub running: usize,
    pub waiting: usize,
    /// Engine time per step, microseconds.
    pub fcfs_us: f64,
    pub slo_us: f64,
    /// The modelled step (Llama-2-7B on an A100), microseconds.
    pub step_us: f64,
}

/// Steady state: `running` requests decoding (prompts of 100, outputs that do not end during the
/// measurement), `waiting` more queued behind `max_num_seqs`, every request with an SLO that is
/// neither shed nor missed, so that each step pays for ordering and scanning the whole queue.
fn engine_step_us(queue: QueueDiscipline, running: usize, waiting: usize, steps: usize) -> (f64, f64) {
    let n = running + waiting;
    let cost = CostModel::roofline("llama-2-7b", "a100-80gb").expect("a known preset");
    let cfg = SchedulerConfig {
        kv_cache_tokens: running * 4096,
        max_num_seqs: running,
        max_output_bound: 4096,
        queue,
        ..Default::default()
    };
    let sched = Scheduler::new(cfg, None).expect("a valid config");
    let exec = SimExecutor::new(cost, Arc::new(vec![4000; n]));
    let mut engine = Engine::new(sched, Box::new(exec), Box::new(VirtualClock::default())).finished_outputs_only();
    for i in 0..n {
        let spec = RequestSpec {
            prompt: Prompt::Synthetic { len: 100, prefix_ids: Vec::new(), unit: 1 },
            max_tokens: 4096,
            ignore_eos: false,
            arrival: Some(0.0),
            sampling: Default::default(),
            stop: Default::default(),
            // Far bounds: nothing is shed, yet every waiting request has a slack to order by.
            slo: Slo { ttft: Some(1e6 + i as f64), e2e: Some(1e7), ..Default::default() },
            priority: 0,
            grammar: None,
            cache_salt: None,
        };
        engine.add_request_with_id(i as u64, spec).expect("fits the pool");
    }
    while engine.scheduler().num_running() < running {
        engine.step().expect("a simulated step");
    }
    let (t0, v0) = (Instant::now(), engine.now());
    for _ in 0..steps {
        engine.step().expect("a simulated step");
    }
    let wall = t0.elapsed().as_secs_f64() / steps as f64;
    let simulated = (engine.now() - v0) / steps as f64;
    (wall * 1e6, simulated * 1e6)
}

pub fn queue_benchmark(running: usize, waiting: usize, steps: usize) -> QueueTiming {
    let steps = steps.max(1);
    let (fcfs_us, step_us) = engine_step_us(QueueDiscipline::Fcfs, running, waiting, steps);
    let (slo_us, _) = engine_step_us(QueueDiscipline::Slo, running, waiting, steps);
    QueueTiming { running, waiting, fcfs_us, slo_us, step_us }
}
