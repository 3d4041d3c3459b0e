//! Past-Future admission (LightLLM's `FuturePastReqQueue`, with its known flaws fixed): admit a
//! waiting request only if the batch's predicted peak KV use, with the request added, stays under
//! the pool minus a reserve. Lengths come from the history of finished requests (the *past*), or,
//! for the oracle, from the simulator's true lengths. The past is `history`, the future (the peak
//! of a batch, and its fast forecast) is `peak`.

pub mod history;
pub mod peak;

use std::sync::Arc;

use rand::{rngs::SmallRng, SeedableRng};

use self::history::{bootstrap_weights, HistoryStart, LengthHistory, Survival};
use self::peak::{Forecast, Load};
use super::scheduler::{AdmissionPolicy, PoolView, SeqLoad};
use crate::request::{ReqId, MAX_SCENARIOS};

/// True output lengths by request id; only the simulator can provide this.
pub type TrueLengths = Arc<dyn Fn(ReqId) -> Option<usize> + Send + Sync>;

enum Lengths {
    Sampled { history: LengthHistory, rng: SmallRng },
    Oracle(TrueLengths),
}

/// How Past-Future turns its history into a forecast. The defaults are what the study in
/// docs/benchmarks.md kept; the alternatives stay selectable so the study can be rerun.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Scenarios per step; `None`: `min(16, 1 + 800 / batch)`, fewer for big batches.
    pub scenarios: Option<usize>,
    /// Which scenario's peak decides: `None`, the worst; `Some(q)`, the q-quantile of the
    /// scenarios' peaks (nearest rank), a high quantile instead of the worst.
    pub quantile: Option<f64>,
    /// Redraw every running request's length every step, as LightLLM does, instead of keeping a
    /// draw while it is still possible.
    pub redraw: bool,
    /// A request that outlived every recorded length: `false` draws uniformly up to
    /// `max_tokens`; `true` draws from an exponential tail fitted to the history's longest tenth.
    /// Not used while censoring is on: the survival curve has its own tail.
    pub fitted_tail: bool,
    /// When running requests count as censored lengths (see [`Censoring`]).
    pub censoring: Censoring,
    /// While prior entries are left (before the history's first `prior_weight` finishes), each
    /// scenario draws from its own Bayesian-bootstrap survival curve (the history's lengths
    /// weighted Exp(1), the weights kept until the history changes) instead of one shared
    /// curve. The worst scenario is then also a pessimistic draw of the distribution, not only of
    /// the lengths: "most of these requests are long" is among the scenarios of a first wave.
    pub bootstrap: bool,
    /// While censoring, a request that outlived every finished length is drawn up to where the
    /// survival curve, continued at its average slope, reaches zero, instead of up to
    /// `max_tokens`; up to `max_tokens` again once a request outlives that end.
    pub linear_tail: bool,
}

impl Default for Tuning {
    /// What the study in docs/benchmarks.md kept.
    fn default() -> Self {
        Self {
            scenarios: None,
            quantile: None,
            redraw: false,
            fitted_tail: false,
            censoring: Censoring::default(),
            bootstrap: true,
            linear_tail: true,
        }
    }
}

/// When Past-Future's draws count running requests as censored lengths ("at least what they
/// generated", Kaplan-Meier) beside the finished ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Censoring {
    /// Never: the finished lengths alone (LightLLM).
    Off,
    /// Until the window holds `history_window` recorded lengths. Until then the finished and the
    /// running requests are one cohort (everything admitted since the start), and the finished
    /// alone are its shortest. Once the window is full it is a steady sample of finished lengths,
    /// and the running requests, longer by selection, would bias it long.
    #[default]
    WhileFilling,
    /// Always (studied, not the default: it biases a full window long and loses at light load).
    Always,
}

impl std::str::FromStr for Censoring {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "while-filling" => Ok(Self::WhileFilling),
            "always" => Ok(Self::Always),
            other => Err(format!("unknown censoring {other:?}: expected off, while-filling or always")),
        }
    }
}

/// One scenario's survival curve while censoring, with its bootstrap weights (drawn again only
/// when the history changed, so a scenario keeps its draw of the distribution between finishes).
#[derive(Default)]
struct Curve {
    survival: Survival,
    weights: Vec<f64>,
    /// `history.records()` when the weights were drawn.
    weights_at: Option<u64>,
}

impl Curve {
    /// Rebuild from the history and the censored counts; with `bootstrap`, weighted by the
    /// curve's own draw, redrawn if the history changed since.
    fn build(
        &mut self,
        history: &LengthHistory,
        bootstrap: Option<&mut SmallRng>,
        censored: &[u32],
        linear_tail: bool,
    ) {
        let weights = match bootstrap {
            Some(rng) => {
                if self.weights_at != Some(history.records()) {
                    bootstrap_weights(history.len(), rng, &mut self.weights);
                    self.weights_at = Some(history.records());
                }
                Some(self.weights.as_slice())
            }
            None => None,
        };
        self.survival.build(history.sorted(), weights, censored, linear_tail);
    }
}

pub struct PastFuture {
    lengths: Lengths,
    tuning: Tuning,
    /// The censored survival curves while `censored` is on: one shared, or one per scenario
    /// with `tuning.bootstrap`.
    curves: Vec<Curve>,
    /// Steps since censoring began: whose turn it is to be rebuilt.
    turn: usize,
    /// The running requests' generated counts, sorted: the censored lengths of this step.
    censored_counts: Vec<u32>,
    censored: bool,
    reserve: f64,
    /// One forecast per Monte-Carlo scenario; the worst (or `tuning.quantile`'s) decides.
    scenarios: Vec<Forecast>,
}

/// Scenarios per step: fewer for big batches, where one draw already averages out (LightLLM's
/// rule, `min(5, 1 + 200 / batch)`, with four times the draws: the study in docs/benchmarks.md
/// found five too few on heavy-tailed outputs; at 1,024 running requests it is still one).
fn scenario_count(batch: usize) -> usize {
    800usize.checked_div(batch).map_or(MAX_SCENARIOS, |q| (q + 1).min(MAX_SCENARIOS))
}

impl PastFuture {
    pub fn new(history_window: usize, max_output_bound: usize, reserve: f64, seed: u64) -> Self {
        Self::with_history(history_window, max_output_bound, &HistoryStart::default(), reserve, seed)
    }

    /// Past-Future whose history starts from `start` (a prior, a saved history) instead of
    /// LightLLM's `max_output_bound` priming.
    pub fn with_history(
        history_window: usize,
        max_output_bound: usize,
        start: &HistoryStart,
        reserve: f64,
        seed: u64,
    ) -> Self {
        let prime = max_output_bound.min(u32::MAX as usize) as u32;
        let history = LengthHistory::start(history_window, prime, start);
        Self::with_lengths(Lengths::Sampled { history, rng: SmallRng::seed_from_u64(seed) }, reserve)
    }

    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    pub fn oracle(true_lengths: TrueLengths, reserve: f64) -> Self {
        Self::with_lengths(Lengths::Oracle(true_lengths), reserve)
    }

    fn with_lengths(lengths: Lengths, reserve: f64) -> Self {
        Self {
            lengths,
            tuning: Tuning::default(),
            curves: Vec::new(),
            turn: 0,
            censored_counts: Vec::new(),
            censored: false,
            reserve,
            scenarios: Vec::new(),
        }
    }

    /// Draw a final output length for `s`: the true one for the oracle; else from the history,
    /// unconditionally for a fresh candidate, conditioned on what it generated otherwise (a
    /// preempted request keeps that evidence; LightLLM forgets it). While censoring is on, from
    /// the survival curve `begin_step` built.
    fn draw(&mut self, s: &SeqLoad, k: usize, fresh: bool) -> u32 {
        let (generated, max) = (s.generated as u32, s.max_tokens.min(u32::MAX as usize) as u32);
        match &mut self.lengths {
            Lengths::Oracle(f) => f(s.id).unwrap_or(s.max_tokens).clamp(s.generated + 1, s.max_tokens.max(1)) as u32,
            Lengths::Sampled { rng, .. } if self.censored => {
                self.curves[k.min(self.curves.len() - 1)].survival.sample(generated, max, rng)
            }
            Lengths::Sampled { history, rng } if fresh && generated == 0 => history.sample_unconditional(max, rng),
            Lengths::Sampled { history, rng } if self.tuning.fitted_tail => history.sample_fitted(generated, max, rng),
            Lengths::Sampled { history, rng } => history.sample_conditional(generated, max, rng),
        }
    }

    /// Scenario `k`'s load for `s`. A kept prediction stays while it is still possible: a draw
    /// from "length > d0" that turned out > d is a draw from "length > d" (same distribution),
    /// so only predictions overtaken by the generated count are re-drawn.
    fn load(&mut self, s: &mut SeqLoad, k: usize, fresh: bool) -> Load {
        if s.forecast[k] as usize <= s.generated {
            s.forecast[k] = self.draw(s, k, fresh);
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
            Lengths::Sampled { .. } => self.tuning.scenarios.unwrap_or_else(|| scenario_count(running.len())),
        };
        if self.tuning.redraw {
            for s in running.iter_mut() {
                s.forecast = [0; MAX_SCENARIOS];
            }
        }
        self.censored = false;
        if let Lengths::Sampled { history, rng } = &mut self.lengths {
            self.censored = match self.tuning.censoring {
                Censoring::Off => false,
                Censoring::WhileFilling => !history.is_full(),
                Censoring::Always => true,
            };
            if self.censored {
                self.censored_counts.clear();
                self.censored_counts.extend(running.iter().map(|s| s.generated as u32).filter(|&g| g > 0));
                self.censored_counts.sort_unstable();
                // Only while prior entries are left: once real lengths have replaced them, the
                // draws' spread comes from the evidence.
                let bootstrap = self.tuning.bootstrap && history.prior_left() > 0;
                let linear_tail = self.tuning.linear_tail;
                let count = if bootstrap { n } else { 1 };
                let built = self.curves.len().min(count);
                self.curves.resize_with(count, Curve::default);
                // A curve costs the whole history to build. The shared one is rebuilt every
                // step; bootstrap curves one a step in turn (their censored counts at most
                // `count` steps old), and new ones at once.
                let turn = self.turn % count;
                self.turn += 1;
                for (k, c) in self.curves.iter_mut().enumerate() {
                    if !bootstrap || k >= built || k == turn {
                        c.build(history, bootstrap.then_some(&mut *rng), &self.censored_counts, linear_tail);
                    }
                }
            } else {
                self.curves.clear();
            }
        }
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
        let peaks = self.scenarios.iter_mut().zip(&draws).map(|(f, &l)| f.peak_with(l));
        let decisive = match self.tuning.quantile {
            None => peaks.max().unwrap_or(0),
            Some(q) => {
                // Nearest rank: the smallest peak at or above a fraction q of the scenarios.
                let mut peaks: Vec<u64> = peaks.collect();
                peaks.sort_unstable();
                let rank = ((q * peaks.len() as f64).ceil() as usize).clamp(1, peaks.len().max(1));
                peaks.get(rank - 1).copied().unwrap_or(0)
            }
        };
        if decisive > budget {
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

    fn recorded_lengths(&self) -> Option<Vec<u32>> {
        match &self.lengths {
            Lengths::Sampled { history, .. } => Some(history.recorded()),
            Lengths::Oracle(_) => None,
        }
    }
}
