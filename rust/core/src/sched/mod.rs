//! Scheduling: which requests run in the next step, and with how many tokens each.
//!
//! [`Scheduler`] does what every policy shares (continuous batching, chunked prefill, preemption
//! by recompute when blocks run out); an [`AdmissionPolicy`] decides only whether the next waiting
//! request may join the batch. The scheduler never learns whether a model or the simulator runs
//! the batch: it writes a self-contained `plan::StepPlan`. SmartSpec's controller (`smartspec`),
//! which picks each step's speculation length, lives here because the scheduler owns it.

mod aggressive;
mod conservative;
mod past_future;
mod scheduler;
mod slo;
pub mod smartspec;

pub use aggressive::Aggressive;
pub use conservative::Conservative;
pub use past_future::history::{self, HistoryStart, Prior};
pub use past_future::{peak, Censoring, PastFuture, TrueLengths, Tuning};
pub use scheduler::{check_fits, AdmissionPolicy, PoolView, Scheduler, SchedulerStats, SeqLoad, MAX_SCENARIOS};
pub use slo::{Preemption, QueueDiscipline, StepTimes};
pub use smartspec::{Judged, SpecConfig, SpecController, SpecStats, MAX_SPEC_TOKENS};

use crate::error::{HoraeError, Result};
use crate::names::named_enum;
use crate::request::Slo;

named_enum! {
    /// The admission policy (a scheduler, as the CLI and the papers name it).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum PolicyKind("scheduler") {
        PastFuture = "past-future" | "pastfuture",
        Aggressive = "aggressive",
        Conservative = "conservative",
        Oracle = "oracle",
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub policy: PolicyKind,
    /// KV pool size in tokens; the pool holds `kv_cache_tokens / block_size` blocks.
    pub kv_cache_tokens: usize,
    pub block_size: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks plus one token per decoding sequence).
    pub max_batched_tokens: usize,
    /// The most tokens of one prompt computed in a step (vLLM's `long_prefill_token_threshold`;
    /// `None`: a chunk may take the whole budget). A long prompt then takes more steps, and the
    /// budget it leaves lets short requests start instead of waiting for its whole prefill.
    pub long_prefill_token_threshold: Option<usize>,
    /// With a threshold: how many long prefills (prompts longer than the threshold, still
    /// prefilling) may advance in one step (vLLM's `max_long_partial_prefills`, default 1). So long prompts
    /// together take at most this many thresholds of a step, and the rest of the budget is for
    /// decodes and short prompts.
    pub max_long_partial_prefills: usize,
    pub prefix_caching: bool,
    /// Past-Future: finished output lengths remembered.
    pub history_window: usize,
    /// Past-Future: the largest output a client may ask for: the bound the uniform and
    /// all-`max_tokens` priors are shaped by.
    pub max_output_bound: usize,
    /// Past-Future: what the history starts from (a prior, lengths a saved history recorded).
    pub history_start: HistoryStart,
    /// Past-Future: how the forecast is drawn (scenario count, redraws, the tail).
    pub tuning: Tuning,
    /// Most requests admitted in one step (`None`: as many as fit). LightLLM's Past-Future and
    /// conservative servers admit one per admission round.
    pub max_admit_per_step: Option<usize>,
    /// In what order waiting requests are offered to the policy, and what is shed (see `slo`).
    pub queue: QueueDiscipline,
    /// Who a preemption takes; `None`: the newest under FCFS, the least loss under `slo`.
    pub preemption: Option<Preemption>,
    /// Bounds for what a request leaves out of its own `slo` (the server's `--slo-ttft` ...).
    pub default_slo: Slo,
    /// Past-Future and oracle: fraction of the pool kept free of predicted use.
    pub reserve: f64,
    /// Aggressive: admit while block use stays under this fraction.
    pub watermark: f64,
    pub seed: u64,
    /// Speculative decoding: how many draft tokens, chosen how (None = off).
    pub spec: Option<SpecConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::PastFuture,
            kv_cache_tokens: 120_000,
            block_size: 16,
            max_num_seqs: 256,
            max_batched_tokens: 2048,
            long_prefill_token_threshold: None,
            max_long_partial_prefills: 1,
            prefix_caching: true,
            history_window: 1000,
            max_output_bound: 4096,
            history_start: HistoryStart::default(),
            tuning: Tuning::default(),
            max_admit_per_step: None,
            queue: QueueDiscipline::Fcfs,
            preemption: None,
            default_slo: Slo::default(),
            reserve: 0.05,
            watermark: 0.95,
            seed: 0,
            spec: None,
        }
    }
}

/// The most finished lengths Past-Future remembers: far past where their distribution settles
/// (the default is 1,000), and each one recorded moves a sorted copy of the window. A larger one
/// (or a prior of as many entries) took gigabytes at the start.
pub const MAX_HISTORY_WINDOW: usize = 1 << 20;

impl SchedulerConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HoraeError::InvalidConfig(m));
        if !(1..=256).contains(&self.block_size) {
            return bad(format!("block_size must be between 1 and 256, got {}", self.block_size));
        }
        if self.kv_cache_tokens < self.block_size {
            return bad(format!(
                "kv_cache_tokens ({}) is smaller than one block ({})",
                self.kv_cache_tokens, self.block_size
            ));
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs must be at least 1".into());
        }
        if self.max_batched_tokens == 0 {
            return bad("max_batched_tokens must be at least 1".into());
        }
        if !(1..=MAX_HISTORY_WINDOW).contains(&self.history_window) {
            return bad(format!(
                "history_window must be between 1 and {MAX_HISTORY_WINDOW}, got {}",
                self.history_window
            ));
        }
        if self.max_output_bound == 0 {
            return bad("max_output_bound must be at least 1".into());
        }
        if let Some(n) = self.tuning.scenarios.filter(|n| !(1..=MAX_SCENARIOS).contains(n)) {
            return bad(format!("scenarios must be between 1 and {MAX_SCENARIOS}, got {n}"));
        }
        if let Some(q) = self.tuning.quantile.filter(|q| !(*q > 0.0 && *q <= 1.0)) {
            return bad(format!("quantile must be in (0, 1], got {q}"));
        }
        if self.long_prefill_token_threshold == Some(0) {
            return bad("long_prefill_token_threshold must be at least 1 (leave it unset for no limit)".into());
        }
        if self.max_long_partial_prefills == 0 {
            return bad("max_long_partial_prefills must be at least 1".into());
        }
        if self.max_admit_per_step == Some(0) {
            return bad("max_admit_per_step must be at least 1 (leave it unset for no limit)".into());
        }
        self.default_slo.validate()?;
        let start = &self.history_start;
        let bad_prior = matches!(&start.prior, Prior::Lengths(p) if p.is_empty() || p.contains(&0));
        if bad_prior || start.recorded.contains(&0) {
            return bad("a history prior or saved history must be output lengths of at least 1 token".into());
        }
        if self.history_start.prior_weight == Some(0) {
            return bad("history_prior_weight must be at least 1 (leave it unset for the default, 8)".into());
        }
        if !(0.0..1.0).contains(&self.reserve) {
            return bad(format!("reserve must be in [0, 1), got {}", self.reserve));
        }
        if !(self.watermark > 0.0 && self.watermark <= 1.0) {
            return bad(format!("watermark must be in (0, 1], got {}", self.watermark));
        }
        if let Some(s) = &self.spec {
            s.validate()?;
        }
        Ok(())
    }

    /// The admission policy this config names. The oracle needs the true lengths.
    pub fn build_policy(&self, true_lengths: Option<TrueLengths>) -> Result<Box<dyn AdmissionPolicy>> {
        Ok(match self.policy {
            PolicyKind::PastFuture => Box::new(
                PastFuture::with_history(
                    self.history_window,
                    self.max_output_bound,
                    &self.history_start,
                    self.reserve,
                    self.seed,
                )
                .with_tuning(self.tuning),
            ),
            PolicyKind::Aggressive => Box::new(Aggressive::new(self.watermark)),
            PolicyKind::Conservative => Box::new(Conservative::default()),
            PolicyKind::Oracle => {
                let lengths = true_lengths.ok_or_else(|| {
                    HoraeError::InvalidConfig("the oracle scheduler needs true output lengths (simulator only)".into())
                })?;
                Box::new(PastFuture::oracle(lengths, self.reserve))
            }
        })
    }
}
