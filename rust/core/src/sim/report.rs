//! Per-request records, SLA checks and the summary every study reports.

use serde::Serialize;

use crate::request::{FinishReason, Request, Slo};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RequestRecord {
    pub id: u64,
    pub arrival: f64,
    /// NaN for a request that was rejected (never fit) or never produced that event.
    pub first_scheduled: f64,
    pub first_token: f64,
    pub finished: f64,
    pub prompt_len: u32,
    pub output_len: u32,
    pub max_itl: f64,
    pub preemptions: u32,
    pub recomputed_tokens: u64,
    pub cached_tokens: u64,
    pub rejected: bool,
    /// Why it ended: a `FinishReason` name, or "rejected".
    pub finish_reason: &'static str,
    /// Finished by a stop token or `max_tokens` (not aborted, not rejected).
    pub completed: bool,
    /// Times the client sent it (more than one when the server's rules failed it and the client
    /// retried); its times count from the last send.
    pub attempts: u32,
    /// Tokens computed for its failed attempts (prefill, recomputation and outputs), thrown away.
    pub wasted_tokens: u64,
    /// Its sends the queue deadline turned away before they started, the last one included.
    pub timed_out: u32,
    /// The bounds it is judged on: its own, the server's defaults filled in.
    #[serde(skip)]
    pub slo: Slo,
}

impl RequestRecord {
    pub fn from_request(r: &Request) -> Self {
        let nan = f64::NAN;
        Self {
            id: r.id,
            arrival: r.times.arrival,
            first_scheduled: r.times.first_scheduled.unwrap_or(nan),
            first_token: r.times.first_token.unwrap_or(nan),
            finished: r.times.finished.unwrap_or(nan),
            prompt_len: r.prompt_len() as u32,
            output_len: r.output.len() as u32,
            max_itl: r.times.max_itl,
            preemptions: r.preemptions,
            recomputed_tokens: r.recomputed_tokens,
            cached_tokens: r.cached_tokens,
            rejected: false,
            finish_reason: r.finish_reason().map_or("running", |f| f.as_str()),
            completed: matches!(r.finish_reason(), Some(FinishReason::Stop | FinishReason::Length)),
            attempts: 1,
            wasted_tokens: 0,
            timed_out: u32::from(r.finish_reason() == Some(FinishReason::Timeout)),
            slo: r.slo,
        }
    }

    pub fn rejected(id: u64, arrival: f64, prompt_len: u32, slo: Slo) -> Self {
        let nan = f64::NAN;
        Self {
            id,
            arrival,
            first_scheduled: nan,
            first_token: nan,
            finished: nan,
            prompt_len,
            output_len: 0,
            max_itl: 0.0,
            preemptions: 0,
            recomputed_tokens: 0,
            cached_tokens: 0,
            rejected: true,
            finish_reason: "rejected",
            completed: false,
            attempts: 1,
            wasted_tokens: 0,
            timed_out: 0,
            slo,
        }
    }

    pub fn ttft(&self) -> f64 {
        self.first_token - self.arrival
    }
    /// Mean time per output token after the first.
    pub fn tpot(&self) -> f64 {
        if self.output_len > 1 {
            (self.finished - self.first_token) / (self.output_len - 1) as f64
        } else {
            0.0
        }
    }
    pub fn e2e(&self) -> f64 {
        self.finished - self.arrival
    }

    /// Completed within every bound of its SLO.
    pub fn meets(&self) -> bool {
        let ok = |bound: Option<f64>, v: f64| bound.is_none_or(|b| v <= b);
        let sla = &self.slo;
        self.completed
            && ok(sla.ttft, self.ttft())
            && ok(sla.tpot, self.tpot())
            && ok(sla.max_itl, self.max_itl)
            && ok(sla.e2e, self.e2e())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self { p50: f64::NAN, p90: f64::NAN, p99: f64::NAN, mean: f64::NAN };
        }
        v.sort_by(f64::total_cmp);
        // Linear interpolation between order statistics (numpy's default).
        let q = |p: f64| {
            let x = p * (v.len() - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
        };
        Self { p50: q(0.5), p90: q(0.9), p99: q(0.99), mean: v.iter().sum::<f64>() / v.len() as f64 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub num_requests: usize,
    pub completed: usize,
    pub rejected: usize,
    /// Requests whose last send the queue deadline dropped, never started (the server rules).
    pub timeouts: usize,
    /// Sends the queue deadline dropped, retried ones included: what a client counts as
    /// time-out answers (`horae bench serve`'s `timeouts`), and the server's `/metrics`.
    pub timed_out_sends: usize,
    /// Cut by the gap bound while running (the server rules).
    pub sla_aborts: usize,
    pub met_sla: usize,
    /// First arrival to last finish, seconds.
    pub duration: f64,
    pub throughput_rps: f64,
    /// (prompt + output tokens) of completed requests per second.
    pub throughput_tps: f64,
    pub goodput_rps: f64,
    /// (prompt + output tokens) of requests meeting the SLA per second: the paper's goodput.
    pub goodput_tps: f64,
    /// The same tokens per second of the arrivals' span (first to last arrival; the run's
    /// duration where they all come at once). Between runs of one trace its ratio is that of the
    /// SLA-meeting tokens served; `goodput_tps` also weighs how soon the queue left at the last
    /// arrival drains (a queue still within its bounds lowers it). Past the knee neither is a
    /// steady-state rate: this one counts the drain's work over the arrivals' span alone, so it
    /// keeps rising with the load; `goodput_tps` understates a server that ends with a queue.
    pub window_goodput_tps: f64,
    pub sla_attainment: f64,
    pub ttft: Percentiles,
    pub tpot: Percentiles,
    pub max_itl: Percentiles,
    pub e2e: Percentiles,
    pub queue_delay: Percentiles,
    pub preemptions: u64,
    pub preempted_requests: usize,
    pub recomputed_tokens: u64,
    pub cached_prompt_tokens: u64,
    /// Sends per request, on average (1 without retries).
    pub attempts_per_request: f64,
    /// Tokens computed for attempts that failed.
    pub wasted_tokens: u64,
    pub mean_kv_usage: f64,
    pub peak_kv_usage: f64,
}

impl Summary {
    pub fn new(records: &[RequestRecord], kv_usage: &[(f64, f64)]) -> Self {
        let done: Vec<&RequestRecord> = records.iter().filter(|r| r.completed).collect();
        let good: Vec<&RequestRecord> = done.iter().copied().filter(|r| r.meets()).collect();
        let start = records.iter().map(|r| r.arrival).fold(f64::INFINITY, f64::min);
        let end = done.iter().map(|r| r.finished).fold(f64::NEG_INFINITY, f64::max);
        let duration = if end > start { end - start } else { 0.0 };
        let last_arrival = records.iter().map(|r| r.arrival).fold(f64::NEG_INFINITY, f64::max);
        let window = if last_arrival > start { last_arrival - start } else { duration };
        let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
        let tokens = |rs: &[&RequestRecord]| rs.iter().map(|r| (r.prompt_len + r.output_len) as f64).sum::<f64>();
        let pct = |f: fn(&RequestRecord) -> f64| Percentiles::of(done.iter().map(|r| f(r)).collect());
        // Time-weighted KV usage: each sample holds from the previous sample's time to its own.
        let (mut area, mut span, mut prev, mut peak) = (0.0, 0.0, None::<f64>, 0.0f64);
        for &(t, u) in kv_usage {
            if let Some(p) = prev {
                area += u * (t - p);
                span += t - p;
            }
            prev = Some(t);
            peak = peak.max(u);
        }
        Self {
            num_requests: records.len(),
            completed: done.len(),
            rejected: records.iter().filter(|r| r.rejected).count(),
            timeouts: records.iter().filter(|r| r.finish_reason == "timeout").count(),
            timed_out_sends: records.iter().map(|r| r.timed_out as usize).sum(),
            sla_aborts: records.iter().filter(|r| r.finish_reason == "sla_abort").count(),
            met_sla: good.len(),
            duration,
            throughput_rps: per_s(done.len() as f64),
            throughput_tps: per_s(tokens(&done)),
            goodput_rps: per_s(good.len() as f64),
            goodput_tps: per_s(tokens(&good)),
            window_goodput_tps: if window > 0.0 { tokens(&good) / window } else { 0.0 },
            sla_attainment: if records.is_empty() { 0.0 } else { good.len() as f64 / records.len() as f64 },
            ttft: pct(RequestRecord::ttft),
            tpot: pct(RequestRecord::tpot),
            max_itl: pct(|r| r.max_itl),
            e2e: pct(RequestRecord::e2e),
            queue_delay: pct(|r| r.first_scheduled - r.arrival),
            preemptions: records.iter().map(|r| r.preemptions as u64).sum(),
            preempted_requests: records.iter().filter(|r| r.preemptions > 0).count(),
            recomputed_tokens: records.iter().map(|r| r.recomputed_tokens).sum(),
            cached_prompt_tokens: records.iter().map(|r| r.cached_tokens).sum(),
            attempts_per_request: if records.is_empty() {
                0.0
            } else {
                records.iter().map(|r| r.attempts as f64).sum::<f64>() / records.len() as f64
            },
            wasted_tokens: records.iter().map(|r| r.wasted_tokens).sum(),
            mean_kv_usage: if span > 0.0 { area / span } else { 0.0 },
            peak_kv_usage: peak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(arrival: f64, first: f64, finished: f64, out: u32, itl: f64) -> RequestRecord {
        RequestRecord {
            first_scheduled: arrival,
            first_token: first,
            finished,
            output_len: out,
            max_itl: itl,
            completed: true,
            rejected: false,
            ..RequestRecord::rejected(0, arrival, 100, Slo::paper())
        }
    }

    #[test]
    fn goodput_counts_only_requests_within_the_sla() {
        let records = vec![
            rec(0.0, 1.0, 11.0, 11, 1.0), // ok
            rec(0.0, 12.0, 20.0, 9, 1.0), // ttft 12 > 10
            rec(1.0, 2.0, 20.0, 10, 2.0), // max gap 2 > 1.5
            RequestRecord::rejected(3, 2.0, 50, Slo::paper()),
        ];
        let s = Summary::new(&records, &[]);
        assert_eq!((s.completed, s.met_sla, s.rejected), (3, 1, 1));
        assert_eq!(s.duration, 20.0);
        assert!((s.goodput_rps - 1.0 / 20.0).abs() < 1e-12);
        assert!((s.goodput_tps - 111.0 / 20.0).abs() < 1e-12);
        // Arrivals span 0-2 s: the same good tokens over that window.
        assert!((s.window_goodput_tps - 111.0 / 2.0).abs() < 1e-12);
        // All at once: over the run's duration.
        let at_once: Vec<RequestRecord> = records[..2].to_vec();
        assert!((Summary::new(&at_once, &[]).window_goodput_tps - 111.0 / 20.0).abs() < 1e-12);
        assert!((s.throughput_tps - (111.0 + 109.0 + 110.0) / 20.0).abs() < 1e-12);
        assert!((records[0].tpot() - 1.0).abs() < 1e-12);
        assert!((s.sla_attainment - 0.25).abs() < 1e-12);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert!((p.p50 - 50.5).abs() < 1e-12 && (p.p90 - 90.1).abs() < 1e-12 && (p.p99 - 99.01).abs() < 1e-9);
        assert!(Percentiles::of(vec![]).p50.is_nan());
    }
}
