//! The queue discipline, beside the admission policy: in what order waiting requests are offered
//! to the policy, which waiting requests are shed as hopeless, and which running request a
//! preemption takes. `Fcfs` is arrival order (vLLM's and LightLLM's); `Slo` orders by slack
//! against each request's own bounds, sheds what can no longer meet them (where shedding others
//! would start one in time, the ones that cost most compute per token of goodput go, the largest
//! of equals first: Moore-Hodgson by value density, `Scheduler::expired`), and preempts where it
//! loses the least goodput. Both honour vLLM's `priority` first (lower is served first).
//!
//! The times come from [`StepTimes`], learned online from the steps the engine ran, so the same
//! code runs against a model and against the simulator's cost model.

use std::collections::VecDeque;

use crate::names::named_enum;
use crate::request::Request;

named_enum! {
    /// In what order the waiting requests are offered, and what is shed (the module's docs).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub enum QueueDiscipline("queue") {
        /// Arrival order (preempted requests first, then by priority).
        #[default]
        Fcfs = "fcfs",
        /// Least slack first; hopeless requests shed; preemption by least goodput lost.
        Slo = "slo",
    }
}

named_enum! {
    /// Which running request a preemption takes when blocks run out.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Preemption("preemption") {
        /// The most recently admitted (vLLM's and LightLLM's rule).
        Newest = "newest",
        /// The one whose preemption loses the least goodput (`Outlook::preemption_loss`).
        LeastLoss = "least-loss",
    }
}

/// A step's seconds as `a + b * tokens`, fitted online by exponentially weighted least squares
/// over the steps that ran (about the last 200 count). Cheap: five running sums per step.
#[derive(Debug, Clone, Default)]
pub struct StepTimes {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

/// Weight kept per step: a half-life of about 140 steps, so the fit follows a changing batch.
const DECAY: f64 = 0.995;

impl StepTimes {
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if tokens == 0 || !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        let x = tokens as f64;
        self.w = self.w * DECAY + 1.0;
        self.x = self.x * DECAY + x;
        self.y = self.y * DECAY + seconds;
        self.xx = self.xx * DECAY + x * x;
        self.xy = self.xy * DECAY + x * seconds;
    }

    /// `(a, b)`; before any step, zero (nothing predicted: only hard deadlines count).
    fn coef(&self) -> (f64, f64) {
        if self.w == 0.0 {
            return (0.0, 0.0);
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        if var > 1e-9 * mx * mx.max(1.0) {
            let b = ((self.xy / self.w - mx * my) / var).max(0.0);
            ((my - b * mx).max(0.0), b)
        } else {
            // Every step the same size so far: a step costs what they did, whatever its size,
            // until steps of another size show how it grows. All of it per token instead took a
            // server whose first request had a one-token prompt (1-token steps only) to predict
            // a 2,048-token step at 2,048 times a decode step, and shed every later short
            // request at once as hopeless.
            (my, 0.0)
        }
    }

    /// Mean seconds of a step lately: the time between two tokens of a running request, with the
    /// prefills that share its steps.
    pub fn mean_step(&self) -> f64 {
        if self.w == 0.0 {
            0.0
        } else {
            self.y / self.w
        }
    }

    /// Seconds of a step that computes `tokens` tokens.
    pub fn step(&self, tokens: usize) -> f64 {
        let (a, b) = self.coef();
        a + b * tokens as f64
    }

    /// Seconds until `tokens` prompt tokens are computed behind other work, with at most `budget`
    /// tokens per step: each chunk's step taken as a full one (a prefill shares its steps with
    /// others', and its first token comes only at the end of the step that finishes it).
    pub fn prefill(&self, tokens: usize, budget: usize) -> f64 {
        let budget = budget.max(1);
        tokens.div_ceil(budget).max(1) as f64 * self.step(budget)
    }

    /// The same at the head of the queue: its last chunk runs in the next step, which computes
    /// `step_tokens` (that chunk and the prefills queued behind it, up to `budget`) besides the
    /// running requests' decode tokens, so it is charged that step's size or what a step has
    /// cost lately, whichever is more. Charged a full step instead, every short request was
    /// shed at once on a CPU, where a 2,048-token step takes seconds, against a 1 s first-token
    /// bound that an idle server met in 10-80 ms; with a backlog the step is a full one anyway.
    pub fn prefill_at_head(&self, tokens: usize, budget: usize, step_tokens: usize) -> f64 {
        let budget = budget.max(1);
        let full = tokens.div_ceil(budget).max(1) - 1;
        let last = tokens.saturating_sub(full * budget);
        full as f64 * self.step(budget) + self.step(step_tokens.clamp(last, budget)).max(self.mean_step())
    }

    /// Seconds the prefills of `tokens` prompt tokens ahead in the queue hold a request back:
    /// the full steps they fill.
    pub fn queueing(&self, tokens: usize, budget: usize) -> f64 {
        let budget = budget.max(1);
        (tokens / budget) as f64 * self.step(budget)
    }
}

/// The output lengths of the last requests to finish, and their 90th percentile: the length the
/// `slo` queue plans a request's decode time with. A request started at its latest start then
/// still meets its bounds about nine times in ten (at the median it would miss half the time, and
/// a backlogged queue starts each request at its latest start). Kept by the queue itself, so that
/// it plans the same way whatever the admission policy (only Past-Future keeps a history).
#[derive(Debug, Clone, Default)]
pub struct OutputLengths {
    window: VecDeque<u32>,
    planned: f64,
    /// Finishes since the percentile was computed.
    stale: usize,
}

const LENGTH_WINDOW: usize = 1000;
/// The percentile is recomputed every this many finishes (a sort of the window).
const REPLAN_EVERY: usize = 32;

impl OutputLengths {
    pub fn record(&mut self, len: usize) {
        if self.window.len() == LENGTH_WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(len.min(u32::MAX as usize) as u32);
        self.stale += 1;
        // Every finish while few are known, then every REPLAN_EVERY.
        if self.window.len() <= REPLAN_EVERY || self.stale >= REPLAN_EVERY {
            self.stale = 0;
            let mut v: Vec<u32> = self.window.iter().copied().collect();
            let k = (v.len() * 9 / 10).min(v.len() - 1);
            self.planned = f64::from(*v.select_nth_unstable(k).1);
        }
    }

    /// Output tokens to plan a request with (0 before any request finished: only its prefill).
    pub fn planned(&self) -> f64 {
        self.planned
    }
}

/// Predicted seconds to run a request: its prefill and, where an output length is expected, its
/// decode steps at the current batch's step time.
pub struct Outlook<'a> {
    pub times: &'a StepTimes,
    /// Tokens one step computes at most (`max_batched_tokens`).
    pub budget: usize,
    /// Seconds between two tokens of a running request (`StepTimes::mean_step`).
    pub decode_step: f64,
}

impl Outlook<'_> {
    /// The latest time `r` can start and still meet its bounds, given `out` output tokens to come
    /// (`f64::INFINITY` without bounds). TTFT needs its prefill done; e2e also its decode steps.
    /// `head`: at the head of the queue, the prompt tokens its last step will compute
    /// (`StepTimes::prefill_at_head`); None: behind other prefills, every step a full one.
    pub fn latest_start(&self, r: &Request, out: f64, head: Option<usize>) -> f64 {
        let prefill = match head {
            Some(step_tokens) => self.times.prefill_at_head(r.total_len(), self.budget, step_tokens),
            None => self.times.prefill(r.total_len(), self.budget),
        };
        let arrival = r.times.arrival;
        let by_ttft = r.slo.ttft.map_or(f64::INFINITY, |t| arrival + t - prefill);
        let left = (out - r.output.len() as f64).max(1.0);
        let by_e2e = r.slo.e2e.map_or(f64::INFINITY, |t| arrival + t - prefill - left * self.decode_step);
        by_ttft.min(by_e2e)
    }

    /// Whether `r` has missed a bound already: it can add nothing to goodput.
    pub fn lost(&self, r: &Request, now: f64) -> bool {
        let s = &r.slo;
        let t = &r.times;
        s.ttft.is_some_and(|b| t.first_token.is_none() && now - t.arrival > b)
            || s.max_itl.is_some_and(|b| t.max_itl > b)
            || s.e2e.is_some_and(|b| now - t.arrival > b)
    }

    /// Goodput lost (in tokens) if `r` is preempted now: what it has computed, to compute again,
    /// plus the whole request (prompt and its expected `out` tokens) where the pause breaks a
    /// bound it still meets; nothing for a request that missed one already. A preempted request
    /// waits for memory to free, a wait nobody can bound, so a gap bound (or a first-token bound
    /// not yet met) counts as broken; an e2e bound only if its slack is shorter than recomputing.
    pub fn preemption_loss(&self, r: &Request, now: f64, out: f64) -> f64 {
        if self.lost(r, now) {
            return 0.0;
        }
        let t = &r.times;
        let pause = self.times.prefill(r.num_computed, self.budget) + self.decode_step;
        let left = (out - r.output.len() as f64).max(1.0);
        let breaks = (r.slo.max_itl.is_some() && t.first_token.is_some())
            || (r.slo.ttft.is_some() && t.first_token.is_none())
            || r.slo.e2e.is_some_and(|b| now + pause + left * self.decode_step - t.arrival > b);
        let value = if breaks { r.prompt_len() as f64 + out.max(r.output.len() as f64) } else { 0.0 };
        r.num_computed as f64 + value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_times_fit_a_line() {
        let mut t = StepTimes::default();
        assert_eq!(t.step(100), 0.0, "nothing predicted before a step ran");
        for i in 0..300 {
            let n = 1 + (i * 37) % 2000;
            t.observe(n, 0.02 + 1e-4 * n as f64);
        }
        assert!((t.step(1000) - 0.12).abs() < 1e-6, "{}", t.step(1000));
        // 2,500 tokens at 1,000 a step: three full steps to the first token; two queue ahead.
        // At the head of the queue with nothing behind, the last is charged as the steps lately
        // (0.12 s on average, more than its own 500 tokens').
        assert!((t.prefill(2500, 1000) - 0.36).abs() < 1e-6);
        assert!((t.queueing(2500, 1000) - 0.24).abs() < 1e-6);
        assert!((t.prefill_at_head(2500, 1000, 500) - (0.24 + t.mean_step())).abs() < 1e-6);
        assert!((t.prefill_at_head(2500, 1000, 5000) - 0.36).abs() < 1e-6, "a backlog behind it: a full step");
        // An idle server, decoding one token a step (10 ms) after one 101-token prefill: a short
        // prompt is charged its own step, not a full one.
        let mut idle = StepTimes::default();
        idle.observe(101, 0.02);
        for _ in 0..50 {
            idle.observe(1, 0.01);
        }
        assert!(
            (idle.prefill_at_head(7, 2048, 7) - idle.step(7)).abs() < 1e-12,
            "{}",
            idle.prefill_at_head(7, 2048, 7)
        );
        assert!(
            idle.prefill_at_head(7, 2048, 7) < 0.011 && idle.step(2048) > 0.2,
            "{} {}",
            idle.prefill_at_head(7, 2048, 7),
            idle.step(2048)
        );
        // All steps one size: what they cost, at any size, until another size is seen.
        let mut u = StepTimes::default();
        u.observe(1, 0.01);
        u.observe(1, 0.01);
        assert!((u.step(2048) - 0.01).abs() < 1e-12, "{}", u.step(2048));
        u.observe(101, 0.02);
        assert!(u.step(2048) > 0.1, "then the line: {}", u.step(2048));
    }

    #[test]
    fn planned_length_is_the_recent_90th_percentile() {
        let mut l = OutputLengths::default();
        assert_eq!(l.planned(), 0.0);
        for i in 1..=100 {
            l.record(i);
        }
        // Recomputed every 32 finishes: the last time at 96 lengths (1..=96), whose 90th
        // percentile (nearest rank, index 86) is 87.
        assert_eq!(l.planned(), 87.0);
        // The window keeps the newest 1,000: old lengths fade out.
        for _ in 0..2000 {
            l.record(5000);
        }
        assert_eq!(l.planned(), 5000.0);
    }

    #[test]
    fn queue_names_parse() {
        assert_eq!("SLO".parse::<QueueDiscipline>().unwrap(), QueueDiscipline::Slo);
        assert!("edf".parse::<QueueDiscipline>().unwrap_err().to_string().contains("expected one of fcfs, slo"));
    }
}
