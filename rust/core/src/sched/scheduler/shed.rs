//! The server's rules, as the scheduler applies them each step: the queue deadline, the gap
//! abort, and the `slo` queue's shedding of what can no longer meet its bounds (by value density,
//! Moore-Hodgson's rule).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Scheduler;
use crate::request::{FinishReason, ReqId, Request};
use crate::sched::slo::QueueDiscipline;

impl Scheduler {
    /// Compute per token of goodput if `r` is served, planned with `out` output tokens: its
    /// uncached prompt and its output over its prompt and its output (goodput counts both).
    fn density(&self, r: &Request, out: f64) -> f64 {
        let total = r.total_len() as f64;
        let cached = (self.cached_prompt_blocks(r).1 * self.kv.block_size()) as f64;
        (total - cached + out) / (total + out)
    }

    /// Requests the server's rules end at `now`: waiting ones never started whose queue deadline
    /// passed (`queue_timeout` seconds after arrival), and started ones (running, or preempted and
    /// waiting) whose last token is older than `max_itl_abort` seconds. The `slo` queue also sheds
    /// waiting requests that can no longer meet their bounds: even started now, behind the
    /// prefills of the feasible requests ahead of them, they would start after their latest
    /// start (`planned_output`). They end with `FinishReason::Timeout`, having cost nothing.
    ///
    /// Which ones the `slo` queue sheds is Moore-Hodgson's rule: walking the least-slack order,
    /// a request that would start too late may take the place of kept requests ahead of it that
    /// give less goodput per unit of compute (`density`; among equals the largest, `Kept`'s
    /// order), if shedding them starts it in time; otherwise it goes itself. Shedding simply
    /// whatever comes last would drop the requests whose prompts are mostly cached as readily as
    /// any (Mooncake at 8x its rate, 8 replicas, the forecast router: 1.33x the SLA-meeting
    /// tokens with this rule, docs/benchmarks.md). Where nothing is cached every request weighs
    /// the same and the rule sheds exactly the late ones.
    pub fn expired(
        &mut self,
        now: f64,
        queue_timeout: Option<f64>,
        max_itl_abort: Option<f64>,
    ) -> Vec<(ReqId, FinishReason)> {
        let mut out = Vec::new();
        let stale = |r: &Request| max_itl_abort.is_some_and(|g| r.times.last_token.is_some_and(|t| now - t > g));
        for &id in &self.running {
            if stale(&self.requests[&id]) {
                out.push((id, FinishReason::SlaAbort));
            }
        }
        let slo = self.cfg.queue == QueueDiscipline::Slo;
        if slo {
            self.order_waiting(now);
        }
        let outlook = self.outlook();
        let out_len = self.planned_output();
        let budget = self.cfg.max_batched_tokens;
        let mut ahead = 0usize;
        // Prompt tokens waiting to start, up to a step's budget (what the next step's prefills
        // can draw on), summed once, and only if a request at the head of the queue needs it.
        let mut queued: Option<usize> = None;
        // The head starts in the next step only if a slot is free now and the last admission
        // did not stop at it for memory (`head_held`).
        let head_free = self.running.len() < self.cfg.max_num_seqs && !self.head_held;
        // The kept requests: weighed (in the heap) and not yet. A density costs a prefix-cache
        // lookup per cached block, so requests are weighed only once a late one needs them; the
        // heap's order is total, so what goes is the same as if each were weighed on arrival.
        let mut kept: BinaryHeap<Kept> = BinaryHeap::new();
        let mut unweighed: Vec<(ReqId, usize, usize)> = Vec::new();
        for (rank, &id) in self.waiting.iter().enumerate() {
            let r = &self.requests[&id];
            if r.times.first_scheduled.is_some() {
                if stale(r) {
                    out.push((id, FinishReason::SlaAbort));
                }
                continue;
            }
            if queue_timeout.is_some_and(|d| now - r.times.arrival > d) {
                out.push((id, FinishReason::Timeout));
            } else if slo {
                // Behind queued prefills, its own steps are full ones; at the head of the queue,
                // with a free slot in the batch, its last step carries the prefills queued behind
                // it, up to a full one. With every slot taken, or the KV pool or the policy
                // holding it back, it waits for a slot or memory to free, which the step model
                // cannot see: full steps then too (a prediction of its own short step kept it
                // past its bound on a one-slot replica instead of shedding it in time to be
                // served elsewhere).
                let latest = outlook.latest_start(r, out_len, None);
                let latest_at_head = if ahead == 0 && head_free {
                    let q = *queued.get_or_insert_with(|| self.queued_prompt_tokens(budget));
                    outlook.latest_start(r, out_len, Some(q))
                } else {
                    latest
                };
                let late = |ahead: usize| {
                    if ahead == 0 {
                        now > latest_at_head
                    } else {
                        now + self.times.queueing(ahead, budget) > latest
                    }
                };
                let work = r.total_len();
                if !late(ahead) {
                    ahead += work;
                    unweighed.push((id, rank, work));
                    continue;
                }
                let weigh = |id: ReqId, rank: usize, work: usize| Kept {
                    id,
                    rank,
                    work,
                    density: self.density(&self.requests[&id], out_len),
                };
                kept.extend(unweighed.drain(..).map(|(id, rank, work)| weigh(id, rank, work)));
                let this = weigh(id, rank, work);
                // Free the way for it by shedding the kept requests worth less per unit of
                // compute, densest first, while it is still late.
                let mut freed = Vec::new();
                while late(ahead) && kept.peek().is_some_and(|k| k.density > this.density) {
                    let k = kept.pop().expect("peeked");
                    ahead -= k.work;
                    freed.push(k);
                }
                if late(ahead) {
                    // Nothing worth less in the way would start it in time: it goes, they stay.
                    ahead += freed.iter().map(|k| k.work).sum::<usize>();
                    kept.extend(freed);
                    out.push((id, FinishReason::Timeout));
                } else {
                    out.extend(freed.iter().map(|k| (k.id, FinishReason::Timeout)));
                    ahead += this.work;
                    kept.push(this);
                }
            } else if !self.prioritized {
                // FCFS: the queue is in arrival order behind the preempted requests, so the
                // deadline scan stops at the first request still inside it.
                break;
            }
        }
        out
    }
}

/// A waiting request the `slo` queue keeps, in the shedding heap (its order: `Ord` below).
struct Kept {
    id: ReqId,
    /// Its place in the least-slack order.
    rank: usize,
    /// Tokens it puts ahead of the requests behind it.
    work: usize,
    /// Compute per token of goodput (`Scheduler::density`): the first to go is the highest.
    density: f64,
}

impl PartialEq for Kept {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Kept {}

impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The first to go is the densest. Among equal densities (common: a prompt nothing caches weighs
/// 1), the most work, Moore-Hodgson's own rule: it frees the most time for the same goodput per
/// token, so the fewest requests go (Mooncake, 8 replicas, eight seeds: SLA attainment +4 to +7
/// points for every router and 2% more SLA-meeting tokens than the heap's arbitrary order,
/// docs/benchmarks.md); then the latest in the least-slack order. A total order, so which
/// requests go does not depend on the order they entered the heap.
impl Ord for Kept {
    fn cmp(&self, other: &Self) -> Ordering {
        self.density.total_cmp(&other.density).then(self.work.cmp(&other.work)).then(self.rank.cmp(&other.rank))
    }
}
