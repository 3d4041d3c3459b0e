"""Prometheus metrics of a served engine, named as vLLM's (`horae:` instead of `vllm:`), plus the
Past-Future scheduler's predicted peak against the pool's capacity. One registry per server, so
several servers (or tests) in one process do not collide."""

from __future__ import annotations

import asyncio
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self._m = model_name

        def g(name, doc):
            return Gauge(name, doc, lbl, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(name, doc, lbl, registry=r).labels(model_name)

        def h(name, doc):
            return Histogram(name, doc, lbl, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

        self.running = g("horae:num_requests_running", "Requests in the running batch.")
        self.waiting = g("horae:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = g("horae:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).")
        self.capacity = g("horae:kv_cache_capacity_tokens", "Tokens the KV pool holds.")
        self.peak = g("horae:predicted_peak_tokens",
                      "Past-Future's predicted peak KV use of the running batch, in tokens (0 for other schedulers).")
        self.peak_ratio = g("horae:predicted_peak_over_capacity", "Predicted peak / KV capacity.")
        self.preemptions = c("horae:num_preemptions", "Requests preempted (their KV freed, to be recomputed).")
        self.prefix_queries = c("horae:prefix_cache_queries", "Prompt blocks looked up in the prefix cache.")
        self.prefix_hits = c("horae:prefix_cache_hits", "Prompt blocks found in the prefix cache.")
        self.prefix_hit_rate = g("horae:prefix_cache_hit_rate", "Prefix-cache hits / queries since start.")
        self.ttft = h("horae:time_to_first_token_seconds", "Time to first token.")
        self.tpot = h("horae:time_per_output_token_seconds", "Mean time per output token after the first, per request.")
        self.e2e = h("horae:e2e_request_latency_seconds", "End-to-end request latency.")
        self.step_time = h("horae:engine_step_seconds", "Engine step duration.")
        self.prompt_tokens = c("horae:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = c("horae:generation_tokens", "Generated tokens.")
        self._success = Counter("horae:request_success", "Finished requests by finish reason.",
                                lbl + ["finished_reason"], registry=r)
        # Speculative decoding (vLLM's spec_decode names), present when the engine speculates.
        self.spec_drafts = c("horae:spec_decode_num_drafts", "Sequence-steps that carried draft tokens.")
        self.spec_draft_tokens = c("horae:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted = c("horae:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_alpha = g("horae:spec_decode_acceptance_rate",
                            "SmartSpec's acceptance estimate (moving average of accepted / drafted).")
        self.spec_mean_len = g("horae:spec_decode_mean_accepted_length",
                               "Tokens emitted per sequence-step with drafts: 1 + accepted / drafts, since start.")
        self.spec_k = g("horae:spec_decode_k", "Draft tokens per sequence chosen for the last step (0 = off).")
        self.spec_request_rate = Histogram("horae:request_spec_acceptance_rate",
                                           "Per finished request: accepted / drafted tokens.", lbl,
                                           buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                                           registry=r).labels(model_name)
        self._last = {"preemptions": 0, "prefix_hit_blocks": 0, "prefix_queried_blocks": 0,
                      "spec_num_drafts": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0}

    def observe_step(self, outs, stats, times) -> None:
        """An `AsyncLLM` listener: engine figures after a step, and the requests it touched."""
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        total = stats["kv_total_blocks"] or 1
        self.kv_usage.set(stats["kv_used_blocks"] / total)
        cap = total * stats["block_size"]
        self.capacity.set(cap)
        peak = stats.get("predicted_peak_tokens") or 0
        self.peak.set(peak)
        self.peak_ratio.set(peak / cap)
        self._count_since_last(stats, (("preemptions", self.preemptions), ("prefix_hit_blocks", self.prefix_hits),
                                       ("prefix_queried_blocks", self.prefix_queries)))
        if "spec_k" in stats:
            self._count_since_last(stats, (("spec_num_drafts", self.spec_drafts),
                                           ("spec_draft_tokens", self.spec_draft_tokens),
                                           ("spec_accepted_tokens", self.spec_accepted)))
            self.spec_alpha.set(stats["spec_alpha"])
            self.spec_k.set(stats["spec_k"])
            if stats["spec_num_drafts"]:
                self.spec_mean_len.set(1 + stats["spec_accepted_tokens"] / stats["spec_num_drafts"])
        if stats["prefix_queried_blocks"]:
            self.prefix_hit_rate.set(stats["prefix_hit_blocks"] / stats["prefix_queried_blocks"])
        if stats.get("step_seconds") is not None:
            self.step_time.observe(stats["step_seconds"])
        for out in outs:
            t = times.get(out.request_id)
            if t is None or not out.finished:
                continue
            if t.ttft is not None:
                self.ttft.observe(t.ttft)
                if t.num_tokens > 1:
                    self.tpot.observe((t.last_token - t.first_token) / (t.num_tokens - 1))
                self.e2e.observe(t.last_token - t.arrival)
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                self._success.labels(self._m, c.finish_reason or "abort").inc()
                if c.num_draft_tokens:
                    self.spec_request_rate.observe(c.num_accepted_tokens / c.num_draft_tokens)

    def observe_abort(self, request_id: str) -> None:
        """An `AsyncLLM` abort listener: a client cancelled a request (it hung up, or closed its
        stream) before it finished."""
        self._success.labels(self._m, "abort").inc()

    def _count_since_last(self, stats, pairs) -> None:
        """The engine reports totals since it started; the counters advance by the difference."""
        for key, counter in pairs:
            delta = stats[key] - self._last[key]
            if delta > 0:
                counter.inc(delta)
            self._last[key] = stats[key]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsSource(Protocol):
    async def render(self) -> bytes:
        """The Prometheus text `/metrics` answers."""


class EngineMetrics:
    """One engine's metrics, fed by its `AsyncLLM`'s step and abort listeners."""

    def __init__(self, llm, model_name: str):
        self.llm, self.metrics = llm, ServerMetrics(model_name)
        llm.listeners.append(self.metrics.observe_step)
        llm.abort_listeners.append(self.metrics.observe_abort)

    async def render(self) -> bytes:
        # Gauges as of now, not of the last step that produced output (an abort changes them too).
        # The engine's figures wait for a running step without the GIL, so off the event loop.
        self.metrics.observe_step([], await asyncio.to_thread(self.llm.engine.stats), {})
        return self.metrics.render()
