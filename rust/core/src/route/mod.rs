//! Which replica a request goes to: one implementation for the cluster simulator (`sim::cluster`)
//! and for the Ray Serve deployment, which calls it through the Python binding. A router sees
//! what replicas publish ([`ReplicaStats`], possibly stale, as Ray polls them) plus what it sent
//! since, and a request's prompt block hashes.
//!
//! - `round-robin`: in turn.
//! - `power-of-two`: the shorter queue of two replicas drawn at random (Ray Serve's default).
//! - `prefix`: the replica holding the longest cached prefix, unless the queues are out of balance
//!   (then power-of-two), in the spirit of Ray's `PrefixCacheAffinityRouter`.
//! - `forecast` (horae's): among the replicas whose Past-Future forecast leaves room for the
//!   request (it will not wait for memory nor cause preemption), those whose prefill work ahead
//!   of its first token (the queue's uncomputed prompts plus its own prompt less what that
//!   replica has cached) is at most twice the least plus one prompt, or still ends within the
//!   request's TTFT bound at that replica's measured prefill rate; of them, the longest cached
//!   prefix, then the least work, then the shortest queue, then one of the tied at random.
//!   So the cache counts as saved work, and a shared prefix stays on one replica while that
//!   replica still meets its requests' first-token bound, instead of being spread (and evicted)
//!   over all.
//!
//! A request a replica shed goes on by one [`RetryShed`] rule for every router alike
//! (`Router::retry_target`): by default to any replica that has not turned it away, while its
//! first-token bound has not passed.

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::kv::BlockHash;
use crate::names::named_enum;

mod stats;

pub use stats::{BlockBloom, CachedBlocks, ReplicaStats};

named_enum! {
    /// How requests are spread over the replicas (the module's docs say how each decides).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RouterKind("router") {
        RoundRobin = "round-robin",
        PowerOfTwo = "power-of-two",
        Prefix = "prefix",
        Forecast = "forecast",
    }
}

named_enum! {
    /// Where a request a replica shed (its queue deadline, or the SLO queue finding it hopeless
    /// there) goes next: the Ray ingress and the cluster simulator both ask
    /// `Router::retry_target`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub enum RetryShed("retry rule") {
        /// To any replica that has not turned it away yet, while its first-token bound (and the
        /// queue deadline, `first_token_bound`) has not passed (after that no replica can meet
        /// it, and the client gets the 503 at once).
        #[default]
        Always = "always",
        /// Only to a replica with spare capacity (nothing waiting) that can still prefill it
        /// within its first-token bound.
        InTime = "in-time",
        /// Nowhere: the client gets the 503.
        Never = "never",
    }
}

/// What the router knows of a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub block_hashes: &'a [BlockHash],
    pub block_size: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
    /// Seconds it may still wait for its first token (its TTFT bound or the queue deadline,
    /// whichever ends first, less what it has waited); None without either.
    pub ttft: Option<f64>,
}

/// How long after its first arrival a request may wait for its first token: its TTFT bound or
/// the queue deadline, whichever ends first (both count from the first arrival, at any replica:
/// past the deadline every replica drops it unstarted, so resending it would be futile).
pub fn first_token_bound(ttft: Option<f64>, queue_timeout: Option<f64>) -> Option<f64> {
    match (ttft, queue_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl RouteRequest<'_> {
    /// KV tokens it will hold on replica `s`: its prompt and the output that replica plans with.
    fn need(&self, s: &ReplicaStats) -> u64 {
        (self.prompt_len as u64) + (s.planned_output.min(self.max_tokens as u64))
    }

    /// Whether `tokens` of prefill work, at replica `s`'s measured rate, end within its TTFT
    /// bound (without a bound or a measured rate: yes).
    fn in_time(&self, s: &ReplicaStats, tokens: u64) -> bool {
        match (self.ttft, s.prefill_rate > 0.0) {
            (Some(left), true) => tokens as f64 / s.prefill_rate <= left,
            _ => true,
        }
    }
}

/// Queues more than this far apart (max over min + 1) and `prefix` stops following the cache.
const IMBALANCE: f64 = 2.0;

#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    requests: usize,
    tokens: u64,
    prefill: u64,
}

pub struct Router {
    kind: RouterKind,
    next: usize,
    rng: SmallRng,
    /// Sent to each replica since its stats were last published: requests, KV tokens they will
    /// hold, prompt tokens they must compute. The router's own view of what the stale stats
    /// miss (Ray's router counts its in-flight requests the same way).
    sent: Vec<Sent>,
}

impl Router {
    pub fn new(kind: RouterKind, seed: u64) -> Self {
        Router { kind, next: 0, rng: SmallRng::seed_from_u64(seed), sent: Vec::new() }
    }

    pub fn kind(&self) -> RouterKind {
        self.kind
    }

    /// Replica `i` published fresh stats: what was sent to it before is in them now.
    pub fn refreshed(&mut self, i: usize) {
        if let Some(s) = self.sent.get_mut(i) {
            *s = Sent::default();
        }
    }

    fn queue(&self, stats: &[ReplicaStats], i: usize) -> usize {
        stats[i].waiting + stats[i].running + self.sent[i].requests
    }

    fn room(&self, stats: &[ReplicaStats], i: usize) -> i64 {
        let s = &stats[i];
        s.capacity_tokens as i64 - s.predicted_peak_tokens as i64 - self.sent[i].tokens as i64
    }

    /// The shorter queue of two of `cands` drawn at random.
    fn power_of_two(&mut self, stats: &[ReplicaStats], cands: &[usize]) -> usize {
        let n = cands.len();
        let a = self.rng.random_range(0..n);
        let b = if n > 1 { (a + self.rng.random_range(1..n)) % n } else { a };
        let (a, b) = (cands[a], cands[b]);
        if self.queue(stats, b) < self.queue(stats, a) {
            b
        } else {
            a
        }
    }

    /// Where to send a request that replicas `tried` shed, by `rule`, or None.
    ///
    /// Why "always" is the default: since the SLO queue sheds by value density, what a replica
    /// sheds is a request it holds little of (little cached, much to compute), and tried replica
    /// after replica it ends where its prefix is or the queue is short. In the cluster simulator
    /// (Mooncake, 8 replicas, eight seeds, 4x-8x the trace's rate; 2026-12-06, queued prefixes
    /// kept) it serves the SLA for 0-11 more requests in a hundred than "in-time" with the
    /// forecast router, 2-13 with prefix affinity and 13-27 with power-of-two and round-robin,
    /// for 1.0-5.3 sends a request; a send through the Ray ingress costs 11-15 ms
    /// (docs/benchmarks.md). Before value-density shedding it lost 27-38% of goodput, which
    /// is why "in-time" exists: only a replica with nothing waiting (in its stats or sent since)
    /// that can prefill the request's uncached prompt, at its measured rate, within `req.ttft`.
    pub fn retry_target(
        &mut self,
        req: &RouteRequest,
        stats: &[ReplicaStats],
        tried: &[usize],
        rule: RetryShed,
    ) -> Option<usize> {
        let n = stats.len();
        self.sent.resize(n, Sent::default());
        let avoid: Vec<usize> = match rule {
            RetryShed::Never => return None,
            RetryShed::Always if req.ttft.is_some_and(|left| left <= 0.0) => return None,
            RetryShed::Always => (0..n).filter(|i| tried.contains(i)).collect(),
            RetryShed::InTime => {
                let spare = |i: usize| {
                    let s = &stats[i];
                    let fresh =
                        req.prompt_len.saturating_sub(s.cached_prefix_blocks(req.block_hashes) * req.block_size);
                    s.waiting + self.sent[i].requests == 0 && req.in_time(s, fresh as u64)
                };
                (0..n).filter(|&i| tried.contains(&i) || !spare(i)).collect()
            }
        };
        (avoid.len() < n).then(|| self.choose_except(req, stats, &avoid))
    }

    /// The replica for `req` among `stats` (at least one).
    pub fn choose(&mut self, req: &RouteRequest, stats: &[ReplicaStats]) -> usize {
        self.choose_except(req, stats, &[])
    }

    /// The same, never one of `tried` (replicas that already turned the request away) unless
    /// every replica has.
    pub fn choose_except(&mut self, req: &RouteRequest, stats: &[ReplicaStats], tried: &[usize]) -> usize {
        let n = stats.len();
        assert!(n > 0, "routing needs at least one replica");
        self.sent.resize(n, Sent::default());
        let mut cands: Vec<usize> = (0..n).filter(|i| !tried.contains(i)).collect();
        if cands.is_empty() {
            cands = (0..n).collect();
        }
        // Cached prefix lengths, looked up once per candidate (the costly part of a decision).
        let cached: Vec<usize> = match self.kind {
            RouterKind::Prefix | RouterKind::Forecast => (0..n)
                .map(|i| if cands.contains(&i) { stats[i].cached_prefix_blocks(req.block_hashes) } else { 0 })
                .collect(),
            _ => Vec::new(),
        };
        let hits = |i: usize| cached.get(i).copied().unwrap_or(0);
        let pick = match self.kind {
            RouterKind::RoundRobin => {
                self.next = self.next.wrapping_add(1);
                cands[self.next % cands.len()]
            }
            RouterKind::PowerOfTwo => self.power_of_two(stats, &cands),
            RouterKind::Prefix => {
                let queues: Vec<usize> = cands.iter().map(|&i| self.queue(stats, i)).collect();
                let (lo, hi) = (*queues.iter().min().unwrap(), *queues.iter().max().unwrap());
                let best = *cands.iter().max_by_key(|&&i| (hits(i), std::cmp::Reverse(self.queue(stats, i)))).unwrap();
                if hi as f64 > IMBALANCE * (lo + 1) as f64 || hits(best) == 0 {
                    self.power_of_two(stats, &cands)
                } else {
                    best
                }
            }
            RouterKind::Forecast => {
                let fresh = |i: usize| req.prompt_len.saturating_sub(hits(i) * req.block_size) as u64;
                // Does the forecast leave room (counting the prompt tokens its cache saves)?
                let fits = |i: usize| {
                    self.room(stats, i) - req.need(&stats[i]) as i64 + (hits(i) * req.block_size) as i64 >= 0
                };
                // Prefill work ahead of its first token there: the queue's, then its own
                // uncached prompt.
                let work = |i: usize| stats[i].waiting_tokens + self.sent[i].prefill + fresh(i);
                // Replicas with room first; among them the least work.
                let (any_fit, least) = cands.iter().map(|&i| (fits(i), std::cmp::Reverse(work(i)))).max().unwrap();
                // Locality: the longest cached prefix among the replicas whose work ahead is at
                // most twice the least plus one prompt (the prefix router's balance rule, in
                // work), or still within the request's TTFT: a prefix kept on one replica stays
                // cached; spread over all, each cache holds less of it.
                // A replica whose work ahead still gives the request its first token within its
                // TTFT bound is near too: it meets its SLO there, and its cached prefix saves work.
                let near = |i: usize| {
                    let balanced = work(i) as f64 <= IMBALANCE * least.0 as f64 + req.prompt_len as f64;
                    let slo_met = req.ttft.is_some() && req.in_time(&stats[i], work(i));
                    fits(i) == any_fit && (balanced || slo_met)
                };
                // Ties (no prefix anywhere, idle replicas): the least work, then the shortest queue;
                // a tie that remains (several idle replicas) goes to one of them at random, so new
                // prefixes spread over the caches instead of piling on one replica.
                let key = |i: usize| (hits(i), std::cmp::Reverse(work(i)), std::cmp::Reverse(self.queue(stats, i)));
                let best = cands.iter().filter(|&&i| near(i)).map(|&i| key(i)).max().unwrap();
                let tied: Vec<usize> = cands.iter().copied().filter(|&i| near(i) && key(i) == best).collect();
                tied[self.rng.random_range(0..tied.len())]
            }
        };
        let hit = stats[pick].cached_prefix_blocks(req.block_hashes) * req.block_size;
        let sent = &mut self.sent[pick];
        sent.requests += 1;
        sent.tokens += req.need(&stats[pick]);
        sent.prefill += req.prompt_len.saturating_sub(hit) as u64;
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(waiting: usize, room: u64, cached: &[BlockHash]) -> ReplicaStats {
        ReplicaStats {
            waiting,
            running: 4,
            waiting_tokens: 1000 * waiting as u64,
            capacity_tokens: 10_000,
            predicted_peak_tokens: 10_000 - room,
            planned_output: 100,
            prefill_rate: 10_000.0,
            cached: CachedBlocks::Index(cached.iter().map(|&h| (h, 0)).collect()),
        }
    }

    fn req(hashes: &[BlockHash]) -> RouteRequest<'_> {
        RouteRequest {
            block_hashes: hashes,
            block_size: 16,
            prompt_len: 16 * hashes.len(),
            max_tokens: 4096,
            ttft: None,
        }
    }

    fn within(hashes: &[BlockHash], ttft: f64) -> RouteRequest<'_> {
        RouteRequest { ttft: Some(ttft), ..req(hashes) }
    }

    #[test]
    fn names_parse_and_unknown_ones_list_the_choices() {
        for k in RouterKind::ALL {
            assert_eq!(k.as_str().parse::<RouterKind>().unwrap(), k);
        }
        let e = "random".parse::<RouterKind>().unwrap_err().to_string();
        assert!(e.contains("round-robin, power-of-two, prefix, forecast"), "{e}");
    }

    #[test]
    fn cached_prefix_is_the_leading_run() {
        let s = stats(0, 5000, &[1, 2, 3, 9]);
        assert_eq!(s.cached_prefix_blocks(&[1, 2, 3, 4, 5]), 3);
        assert_eq!(s.cached_prefix_blocks(&[7, 8]), 0);
        assert_eq!(s.cached_prefix_blocks(&[]), 0);
    }

    #[test]
    fn forecast_follows_the_cache_where_there_is_room_and_room_where_there_is_none() {
        let hashes = [11, 12, 13, 14];
        let mut r = Router::new(RouterKind::Forecast, 0);
        // Replica 1 holds the prefix and has room: it gets the request.
        let s = vec![stats(0, 5000, &[]), stats(0, 5000, &[11, 12, 13]), stats(0, 9000, &[])];
        assert_eq!(r.choose(&req(&hashes), &s), 1);
        // The same, but replica 1's forecast is full: elsewhere, despite its cache.
        let mut r = Router::new(RouterKind::Forecast, 0);
        let s = vec![stats(0, 5000, &[]), stats(0, 10, &[11, 12, 13]), stats(0, 9000, &[])];
        assert_ne!(r.choose(&req(&hashes), &s), 1);
        // A long queue of prefill work outweighs a short cached prefix.
        let mut r = Router::new(RouterKind::Forecast, 0);
        let s = vec![stats(0, 5000, &[]), stats(9, 5000, &[11])];
        assert_eq!(r.choose(&req(&hashes), &s), 0);
        // ... unless that queue still meets the request's TTFT: then the cache wins (10,000 prompt
        // tokens a second: 9,000 tokens of work ahead is 0.9 s).
        let mut r = Router::new(RouterKind::Forecast, 0);
        assert_eq!(r.choose(&within(&hashes, 5.0), &s), 1);
        let mut r = Router::new(RouterKind::Forecast, 0);
        assert_eq!(r.choose(&within(&hashes, 0.5), &s), 0);
        // What it sent since the stats were published counts against the room.
        let mut r = Router::new(RouterKind::Forecast, 0);
        let s = vec![stats(0, 300, &[]), stats(0, 300, &[])];
        let first = r.choose(&req(&hashes), &s);
        assert_ne!(r.choose(&req(&hashes), &s), first);
    }

    #[test]
    fn prefix_falls_back_to_power_of_two_when_queues_are_out_of_balance() {
        let hashes = [5, 6];
        let mut r = Router::new(RouterKind::Prefix, 0);
        let s = vec![stats(0, 5000, &[5, 6]), stats(0, 5000, &[])];
        assert_eq!(r.choose(&req(&hashes), &s), 0);
        let s = vec![stats(40, 5000, &[5, 6]), stats(0, 5000, &[])];
        assert_eq!(r.choose(&req(&hashes), &s), 1, "44 queued against 4: balance first");
    }

    #[test]
    fn a_retry_goes_to_a_replica_that_did_not_turn_it_away() {
        let s = vec![stats(0, 5000, &[1, 2]), stats(0, 5000, &[]), stats(0, 5000, &[])];
        for kind in RouterKind::ALL {
            let mut r = Router::new(kind, 0);
            for _ in 0..10 {
                let k = r.choose_except(&req(&[1, 2]), &s, &[0, 2]);
                assert_eq!(k, 1, "{kind}");
            }
            // Every replica tried: any of them.
            assert!(r.choose_except(&req(&[1, 2]), &s, &[0, 1, 2]) < 3);
        }
    }

    #[test]
    fn a_bloom_summary_finds_every_cached_block_and_few_others() {
        let cached: Vec<BlockHash> = (0..1000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let bloom = BlockBloom::from_hashes(cached.iter().copied());
        assert_eq!(bloom.to_bytes().len(), 1000 * 10 / 8 + 6, "10 bits a block, whole words");
        let back = BlockBloom::from_bytes(&bloom.to_bytes()).unwrap();
        assert_eq!(back, bloom);
        assert!(cached.iter().all(|&h| back.contains(h)), "no false negatives");
        let false_pos = (1000..101_000u64).filter(|i| back.contains(i.wrapping_mul(0x2545_f491_4f6c_dd1d))).count();
        assert!(false_pos < 2_000, "{false_pos} false positives in 100,000: over 2%");
        assert!(BlockBloom::from_bytes(&[1, 2, 3]).is_err());
        // The router reads it as it reads the index.
        let s = ReplicaStats { cached: CachedBlocks::Bloom(back), ..stats(0, 5000, &[]) };
        assert_eq!(s.cached_prefix_blocks(&[cached[0], cached[1], 77]), 2);
    }

    #[test]
    fn in_time_sends_a_shed_request_on_only_to_a_replica_with_spare_capacity_in_time() {
        // 10,000 prompt tokens a second; replica 0 shed it, replica 1 has requests waiting,
        // replicas 2 and 3 none.
        let hashes: Vec<BlockHash> = (1..=50).collect(); // an 800-token prompt: 0.08 s to prefill
        let s = vec![stats(0, 5000, &[]), stats(3, 5000, &[]), stats(0, 5000, &[]), stats(0, 5000, &[])];
        let mut r = Router::new(RouterKind::Forecast, 0);
        assert!(matches!(r.retry_target(&within(&hashes, 5.0), &s, &[0], RetryShed::InTime), Some(2 | 3)));
        assert_eq!(
            r.retry_target(&within(&hashes, 5.0), &s, &[0, 2, 3], RetryShed::InTime),
            None,
            "only a busy replica is left"
        );
        assert_eq!(
            r.retry_target(&within(&hashes, 0.05), &s, &[0], RetryShed::InTime),
            None,
            "its prefill alone takes 0.08 s"
        );
        // What the router sent since the stats were published counts as waiting: one retry per
        // idle replica.
        let mut r = Router::new(RouterKind::Forecast, 0);
        let first = r.retry_target(&within(&hashes, 5.0), &s, &[0], RetryShed::InTime).unwrap();
        let second = r.retry_target(&within(&hashes, 5.0), &s, &[0], RetryShed::InTime).unwrap();
        assert_ne!(first, second);
        assert_eq!(r.retry_target(&within(&hashes, 5.0), &s, &[0], RetryShed::InTime), None);
        // No first-token bound, or no measured rate: the time check passes.
        let mut r = Router::new(RouterKind::Forecast, 0);
        assert!(matches!(r.retry_target(&req(&hashes), &s, &[0], RetryShed::InTime), Some(2 | 3)));
        let unmeasured: Vec<ReplicaStats> = s.iter().map(|x| ReplicaStats { prefill_rate: 0.0, ..x.clone() }).collect();
        assert!(matches!(r.retry_target(&within(&hashes, 0.01), &unmeasured, &[0], RetryShed::InTime), Some(2 | 3)));
    }

    #[test]
    fn always_sends_a_shed_request_to_any_replica_not_tried_while_its_first_token_bound_holds() {
        let hashes: Vec<BlockHash> = (1..=50).collect();
        // Replica 1 is busy and too slow for the bound: "always" sends there all the same.
        let s = vec![stats(0, 5000, &[]), stats(30, 5000, &[])];
        for kind in RouterKind::ALL {
            let mut r = Router::new(kind, 0);
            assert_eq!(r.retry_target(&within(&hashes, 0.05), &s, &[0], RetryShed::Always), Some(1), "{kind}");
            assert_eq!(r.retry_target(&within(&hashes, 0.05), &s, &[0], RetryShed::InTime), None, "{kind}");
            assert_eq!(r.retry_target(&within(&hashes, 5.0), &s, &[0, 1], RetryShed::Always), None, "every one tried");
            assert_eq!(r.retry_target(&within(&hashes, 0.0), &s, &[0], RetryShed::Always), None, "its bound passed");
            assert_eq!(r.retry_target(&req(&hashes), &s, &[0], RetryShed::Always), Some(1), "no bound");
            assert_eq!(r.retry_target(&within(&hashes, 5.0), &s, &[0], RetryShed::Never), None);
        }
        assert_eq!(RetryShed::default(), RetryShed::Always);
        assert_eq!("in-time".parse::<RetryShed>().unwrap(), RetryShed::InTime);
        let e = "sometimes".parse::<RetryShed>().unwrap_err().to_string();
        assert!(e.contains("always, in-time, never"), "{e}");
    }

    #[test]
    fn round_robin_and_power_of_two_spread_the_load() {
        let s = vec![stats(0, 5000, &[]); 4];
        let mut rr = Router::new(RouterKind::RoundRobin, 0);
        let picks: Vec<usize> = (0..8).map(|_| rr.choose(&req(&[]), &s)).collect();
        assert_eq!(picks, vec![1, 2, 3, 0, 1, 2, 3, 0]);
        let mut p2 = Router::new(RouterKind::PowerOfTwo, 0);
        let mut count = [0usize; 4];
        for _ in 0..400 {
            count[p2.choose(&req(&[]), &s)] += 1;
        }
        // With the router's own counts as the queue, no replica runs away.
        assert!(count.iter().all(|&c| (90..=110).contains(&c)), "{count:?}");
    }
}
