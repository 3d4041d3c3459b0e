//! Speculative decoding's part of the schedule: SmartSpec's k for the step, the drafts each
//! sequence carries, and what became of them.

use super::Scheduler;
use crate::plan::{DraftCandidate, StepPlan};
use crate::request::{ReqId, Request};
use crate::sched::smartspec::{Judged, SpecStats};
use crate::stepcost::StepFeatures;

impl Scheduler {
    /// Speculative decoding is on: the largest number of drafts a sequence may carry.
    pub fn spec_k_max(&self) -> Option<usize> {
        self.spec.as_ref().map(|s| s.config().k_max)
    }

    pub fn spec_stats(&self) -> Option<SpecStats> {
        self.spec.as_ref().map(|s| s.stats())
    }

    /// Running requests whose next step is a decode step with room for at least one draft
    /// (they may still generate two tokens or more): the ones a proposer should draft for.
    /// Drafts left from a step that did not schedule their request are dropped here.
    pub fn spec_candidates(&mut self) -> Vec<DraftCandidate> {
        for id in &self.running {
            self.requests.get_mut(id).expect("running request exists").draft.clear();
        }
        self.running
            .iter()
            .map(|id| &self.requests[id])
            .filter(|r| r.total_len() == r.num_computed + 1 && r.output.len() + 1 < r.max_tokens)
            .map(|r| DraftCandidate {
                id: r.id,
                token_ids: r.all_token_ids(),
                prompt_len: r.prompt_len(),
                block_table: self.kv.shared_block_table(r.id).expect("a running request holds blocks"),
                sampling: r.sampling.clone(),
            })
            .collect()
    }

    /// A proposer's drafts for `id`, capped so that the request cannot overshoot `max_tokens`,
    /// and under structured output cut where they leave its language (no step is spent
    /// verifying what the mask would refuse).
    pub fn set_draft(&mut self, id: ReqId, mut draft: Vec<u32>) {
        if let Some(r) = self.requests.get_mut(&id) {
            draft.truncate(r.max_tokens.saturating_sub(r.output.len() + 1));
            if let Some(g) = &mut r.grammar {
                draft.truncate(g.valid_drafts(&draft));
            }
            r.draft = draft;
        }
    }

    /// Choose SmartSpec's k for the next `schedule`: the batch as it stands (running sequences,
    /// their drafts, their KV), predicted with and without speculation. With `assume_drafts`,
    /// every candidate is taken to have that many drafts (a proposer too costly to run before
    /// k is known proposes afterwards, only when k > 0).
    pub fn plan_spec(&mut self, assume_drafts: Option<usize>) -> usize {
        self.step_k = self.choose_spec_k(assume_drafts);
        self.step_k
    }

    fn draft_len(r: &Request, assume: Option<usize>) -> usize {
        match assume {
            Some(k) => k.min(r.max_tokens.saturating_sub(r.output.len() + 1)),
            None => r.draft.len(),
        }
    }

    fn choose_spec_k(&mut self, assume: Option<usize>) -> usize {
        let budget = self.cfg.max_batched_tokens;
        let Some(spec) = self.spec.as_mut() else { return 0 };
        let mut draft_lens = Vec::new();
        let mut ids = Vec::new();
        let mut base = StepFeatures::default();
        let mut others = 0usize;
        for &id in &self.running {
            let r = &self.requests[&id];
            let left = r.total_len() - r.num_computed;
            base.context_tokens += r.total_len() as f64;
            base.num_seqs += 1.0;
            base.num_tokens += left.min(budget) as f64;
            let len = Self::draft_len(r, assume);
            if left == 1 && len > 0 {
                draft_lens.push(len);
                ids.push(id);
            } else if left <= budget {
                others += 1;
            }
        }
        let kv = &self.kv;
        let requests = &self.requests;
        let free = kv.pool().num_allocatable();
        let fits = |k: usize| {
            let need: usize = ids
                .iter()
                .map(|id| {
                    let r = &requests[id];
                    let n = r.total_len() + k.min(Self::draft_len(r, assume));
                    kv.blocks_needed_to_append(*id, n.saturating_sub(kv.num_tokens(*id)))
                })
                .sum();
            need <= free
        };
        spec.choose(&draft_lens, base, others, fits)
    }

    /// After a step that verified `drafted` draft tokens of `id`: `accepted` were kept. The
    /// rejected drafts' KV slots are given back, so the pool holds only computed tokens.
    pub fn drafts_verified(&mut self, id: ReqId, drafted: usize, accepted: usize) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.spec_drafted += drafted as u64;
            r.spec_accepted += accepted as u64;
            r.draft.clear();
            self.kv.truncate(id, r.num_computed);
        }
    }

    /// The proposal `id` had this step if it ran without drafts (k = 0), cleared: its first
    /// token, to compare with the token actually drawn (see `SpecController::observe_acceptance`).
    pub fn take_unused_draft(&mut self, id: ReqId) -> Option<u32> {
        let r = self.requests.get_mut(&id)?;
        let first = r.draft.first().copied();
        r.draft.clear();
        first
    }

    /// Feed SmartSpec the step that just ran: what it computed, its measured seconds, and what
    /// became of the drafts (see `Judged`).
    pub fn spec_observe(&mut self, plan: &StepPlan, seconds: f64, judged: Judged) {
        let Some(spec) = self.spec.as_mut() else { return };
        spec.observe_step(plan.features(), seconds);
        spec.observe_acceptance(judged);
    }
}
