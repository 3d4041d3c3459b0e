//! Past-Future admission (LightLLM's `FuturePastReqQueue`, with its known flaws fixed): admit a
//! waiting request only if the batch's predicted peak KV use, with the request added, stays under
//! the pool minus a reserve. Lengths come from the history of finished requests (the *past*), or,
//! for the oracle, from the simulator's true lengths.

use std::sync::Arc;

use rand::{rngs::SmallRng, SeedableRng};

use super::history::LengthHistory;
use super::peak::{Forecast, Load};
use super::policy::{AdmissionPolicy, PoolView, SeqLoad};
use crate::request::ReqId;

/// True output lengths by request id; only the simulator can provide this.
pub type TrueLengths = Arc<dyn Fn(ReqId) -> Option<usize> + Send + Sync>;

enum Lengths {
    Sampled { history: LengthHistory, rng: SmallRng },
    Oracle(TrueLengths),
}

pub struct PastFuture {
    lengths: Lengths,
    reserve: f64,
    /// One forecast per Monte-Carlo scenario; the worst one decides.
    scenarios: Vec<Forecast>,
}

/// LightLLM's scenario count: fewer draws for big batches, where one draw already averages out.
fn scenario_count(batch: usize) -> usize {
    200usize.checked_div(batch).map_or(5, |q| (q + 1).min(5))
}

impl PastFuture {
    pub fn new(history_window: usize, max_output_bound: usize, reserve: f64, seed: u64) -> Self {
        let history = LengthHistory::new(history_window, max_output_bound.min(u32::MAX as usize) as u32);
        Self {
            lengths: Lengths::Sampled { history, rng: SmallRng::seed_from_u64(seed) },
            reserve,
            scenarios: Vec::new(),
        }
    }

    pub fn oracle(true_lengths: TrueLengths, reserve: f64) -> Self {
        Self { lengths: Lengths::Oracle(true_lengths), reserve, scenarios: Vec::new() }
    }

    /// Draw a final output length for `s`: the true one for the oracle; else from the history,
    /// unconditionally for a fresh candidate, conditioned on what it generated otherwise (a
    /// preempted request keeps that evidence; LightLLM forgets it).
    fn draw(&mut self, s: &SeqLoad, fresh: bool) -> u32 {
        let (generated, max) = (s.generated as u32, s.max_tokens.min(u32::MAX as usize) as u32);
        match &mut self.lengths {
            Lengths::Oracle(f) => f(s.id).unwrap_or(s.max_tokens).clamp(s.generated + 1, s.max_tokens.max(1)) as u32,
            Lengths::Sampled { history, rng } if fresh && generated == 0 => history.sample_unconditional(max, rng),
            Lengths::Sampled { history, rng } => history.sample_conditional(generated, max, rng),
        }
    }

    /// Scenario `k`'s load for `s`. A kept prediction stays while it is still possible: a draw
    /// from "length > d0" that turned out > d is a draw from "length > d" (same distribution),
    /// so only predictions overtaken by the generated count are re-drawn.
    fn load(&mut self, s: &mut SeqLoad, k: usize, fresh: bool) -> Load {
        if s.forecast[k] as usize <= s.generated {
            s.forecast[k] = self.draw(s, fresh);
        }
        Load { held: s.held() as u64, remaining: u64::from(s.forecast[k]) - s.generated as u64 }
    }

    fn budget(&self, pool: &PoolView) -> u64 {
        (pool.capacity_tokens() as f64 * (1.0 - self.reserve)) as u64
    }
}

impl AdmissionPolicy for PastFuture {
    fn name(&self) -> &'static str {
        match self.lengths {
            Lengths::Sampled { .. } => "past-future",
            Lengths::Oracle(_) => "oracle",
        }
    }

    fn begin_step(&mut self, running: &mut [SeqLoad], _pool: &PoolView) {
        let n = match self.lengths {
            Lengths::Oracle(_) => 1,
            Lengths::Sampled { .. } => scenario_count(running.len()),
        };
        let mut scenarios = std::mem::take(&mut self.scenarios);
        scenarios.resize_with(n, Forecast::default);
        let mut loads = Vec::with_capacity(running.len());
        for (k, f) in scenarios.iter_mut().enumerate() {
            loads.clear();
            for s in running.iter_mut() {
                loads.push(self.load(s, k, false));
            }
            f.reset(loads.iter().copied());
        }
        self.scenarios = scenarios;
    }

    fn admit(&mut self, c: &mut SeqLoad, _new_blocks: usize, pool: &PoolView) -> bool {
        let budget = self.budget(pool);
        let draws: Vec<Load> = (0..self.scenarios.len()).map(|k| self.load(c, k, true)).collect();
        let worst = self.scenarios.iter_mut().zip(&draws).map(|(f, &l)| f.peak_with(l)).max().unwrap_or(0);
        if worst > budget {
            return false;
        }
        for (f, l) in self.scenarios.iter_mut().zip(draws) {
            f.insert(l);
        }
        true
    }

    fn record_finished(&mut self, output_len: usize) {
        if let Lengths::Sampled { history, .. } = &mut self.lengths {
            history.record(output_len.min(u32::MAX as usize) as u32);
        }
    }

    fn predicted_peak(&self) -> Option<u64> {
        self.scenarios.iter().map(Forecast::peak).max()
    }
}
