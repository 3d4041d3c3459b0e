//! Admission-cost benchmark (run by `horae bench admission`): what one Past-Future admission
//! decision costs at a given batch size, against the naive way (LightLLM's reference re-samples
//! and re-sorts the whole batch for every candidate), in the same process.

use std::time::Instant;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::sched::history::LengthHistory;
use crate::sched::peak::{peak_of, Load};
use crate::sched::PastFuture;
use crate::sched::{AdmissionPolicy, PoolView, SeqLoad, MAX_SCENARIOS};

#[derive(Debug, Clone, Copy)]
pub struct AdmissionTiming {
    pub running: usize,
    /// A step's first decision: forecasting the running batch plus judging one candidate.
    pub first_decision_us: f64,
    /// Each further candidate in the same step.
    pub next_decision_us: f64,
    /// The naive decision: re-sample and re-sort the batch for the candidate.
    pub naive_decision_us: f64,
}

pub fn admission_benchmark(running: usize, iters: usize, seed: u64) -> AdmissionTiming {
    let iters = iters.max(1);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut batch: Vec<SeqLoad> = (0..running)
        .map(|i| SeqLoad {
            id: i as u64,
            prompt_len: rng.random_range(50..2000),
            generated: rng.random_range(0..400),
            max_tokens: 4096,
            forecast: [0; MAX_SCENARIOS],
        })
        .collect();
    let mut policy = PastFuture::new(1000, 4096, 0.05, seed);
    for _ in 0..1000 {
        policy.record_finished(rng.random_range(1..800));
    }
    // A pool big enough that candidates are admitted (the expensive path: insert into the batch).
    let pool = PoolView { block_size: 16, total_blocks: 1 << 26, used_blocks: 0 };
    let cand = |i: usize| SeqLoad {
        id: 1_000_000 + i as u64,
        prompt_len: 500,
        generated: 0,
        max_tokens: 4096,
        forecast: [0; MAX_SCENARIOS],
    };
    policy.begin_step(&mut batch, &pool); // first predictions for the whole batch

    // Each iteration is one engine step: every running request has decoded one more token (some
    // predictions are overtaken and re-drawn), then one candidate is judged.
    let t = Instant::now();
    for i in 0..iters {
        for s in batch.iter_mut() {
            s.generated = (s.generated + 1).min(4095);
        }
        policy.begin_step(&mut batch, &pool);
        std::hint::black_box(policy.admit(&mut cand(i), 32, &pool));
    }
    let first = t.elapsed().as_secs_f64() / iters as f64;
    for s in batch.iter_mut() {
        s.generated -= iters.min(s.generated);
    }

    policy.begin_step(&mut batch, &pool);
    let t = Instant::now();
    let extra = iters.min(256);
    for i in 0..extra {
        std::hint::black_box(policy.admit(&mut cand(i), 32, &pool));
    }
    let next = t.elapsed().as_secs_f64() / extra as f64;

    let mut history = LengthHistory::start(1000, 4096, &Default::default());
    for _ in 0..1000 {
        history.record(rng.random_range(1..800));
    }
    let t = Instant::now();
    for _ in 0..iters {
        let scenarios = (200 / running.max(1) + 1).min(5);
        let mut worst = 0;
        for _ in 0..scenarios {
            let mut loads: Vec<Load> = batch
                .iter()
                .map(|s| Load {
                    held: s.held() as u64,
                    remaining: u64::from(
                        history.sample_conditional(s.generated as u32, 4096, &mut rng) - s.generated as u32,
                    ),
                })
                .collect();
            loads.push(Load { held: 500, remaining: u64::from(history.sample_unconditional(4096, &mut rng)) });
            worst = worst.max(peak_of(&loads));
        }
        std::hint::black_box(worst);
    }
    let naive = t.elapsed().as_secs_f64() / iters as f64;
    AdmissionTiming {
        running,
        first_decision_us: first * 1e6,
        next_decision_us: next * 1e6,
        naive_decision_us: naive * 1e6,
    }
}
