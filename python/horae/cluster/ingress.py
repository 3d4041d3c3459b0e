"""The ingress in front of the replicas: `horae serve`'s own FastAPI app (`serve.app.build_app`)
over `RemoteLLM`, an engine client whose streams run on replicas through a Ray Serve deployment
handle. So the routes, checks, errors and streams are the server's, written once.

- A request a replica sheds (the queue deadline, or the SLO queue: 503 there) is sent again where
  the router's retry rule finds a replica (`Router::retry_target`; by default any replica that
  has not turned it away, while its first-token bound holds); else the client gets the 503.
- A replica that dies under a request fails that request with a clear 503 (`replica_lost`;
  an SSE error event once the stream is open); the client may retry, and Ray replaces the replica.
- `/metrics` gathers what every replica published with its routing stats: each replica's series
  at `/metrics/replicas` (label `replica`), their sum at `/metrics` (the names of one server)."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from horae import _core
from horae.async_llm import EngineDeadError
from horae.chat_template import read_tokenizer_config, render_chat_template
from horae.cluster import published
from horae.cluster.replica import Refusal
from horae.outputs import RequestOutput
from horae.sampling_params import BeamSearchParams, SamplingParams
from horae.serve.app import ServerConfig, build_app

REPLICAS = "horae-replica"


class ReplicaLostError(EngineDeadError):
    """The replica serving a request died (or became unreachable) under it."""

    code = "replica_lost"


class RemoteLLM:
    """What the server needs of an engine (see `serve.state.ServerState`), over replicas."""

    def __init__(self, handle, info: Dict[str, Any]):
        self.handle = handle
        #: The replicas' default SLO (what a request's own leaves out): a retry's time budget.
        self.default_slo: Dict[str, float] = info.get("slo") or {}
        #: The replicas' queue deadline: past it (from the first arrival) every replica drops the
        #: request unstarted, so a retry's time budget ends there too.
        self.queue_timeout: Optional[float] = info.get("queue_timeout")
        self.model_dir = Path(info["model_dir"])
        self.max_request_tokens = info["max_request_tokens"]
        self._tokenizer = _core.Tokenizer(str(self.model_dir), info["vocab_size"])
        self._tokenizer_config = read_tokenizer_config(self.model_dir)
        self._started: Dict[str, bool] = {}

    async def check_health(self) -> None:
        """The ingress serves while it runs: a replica whose engine died fails its own health
        check, and Ray Serve replaces it."""

    @property
    def num_waiting(self) -> int:
        return sum(1 for started in self._started.values() if not started)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        return self._tokenizer.token_bytes(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None, **options) -> str:
        return render_chat_template(self.model_dir, self._tokenizer_config, messages, add_generation_prompt, tools,
                                    **options)

    def beam_search(self, prompt: Dict[str, Any], params: BeamSearchParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """The whole search on one replica (`HoraeReplica.beam_search`), routed once by its prompt:
        every step's beams share that prefix, so that replica's cache serves them all, as vLLM runs
        a beam search in one engine. (Each step's beams as requests of their own would also be
        calls a Serve request makes at once, which Ray's router cannot tell apart.)"""
        return self._routed("beam_search", prompt, params, request_id, None)

    def generate(self, prompt: Dict[str, Any], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        # The tokens the replica's engine will read (truncate_prompt_tokens), with the prompt's
        # cache salt: the router hashes the prefix of those, as the replica's cache does.
        ids = params.kept_prompt(list(prompt["prompt_token_ids"]), self.max_request_tokens)
        return self._routed("generate", {**prompt, "prompt_token_ids": ids}, params, request_id, params.slo)

    async def _routed(self, method: str, prompt: Dict[str, Any], params, request_id: str,
                      slo: Optional[Dict[str, float]]) -> AsyncIterator[RequestOutput]:
        """A replica's stream of `method` for `prompt`, sent where the router says and, where a
        replica sheds it unstarted, on to where the retry rule says."""
        tried, target = [], None
        arrival, arrival_time = time.monotonic(), time.time()
        # The seconds it may wait for its first token: its TTFT bound or the queue deadline,
        # whichever ends first (as `route::first_token_bound` in the simulator).
        bounds = [b for b in ((slo or {}).get("ttft", self.default_slo.get("ttft")), self.queue_timeout) if b is not None]
        ttft = min(bounds) if bounds else None
        self._started[request_id] = False
        try:
            while True:
                # What the router reads (`router.py`): the replicas that shed it, a retry's chosen
                # replica, and the seconds it may still wait for its first token.
                left = None if ttft is None else arrival + ttft - time.monotonic()
                route = {"tried": list(tried), "replica": target, "ttft": left}
                # Every send carries the first arrival: a replica counts the request's bounds and
                # queue deadline from it, so a resend does not start them afresh.
                call = getattr(self.handle.options(stream=True), method)
                stream = call.remote(prompt, params, request_id, route=route, arrival_time=arrival_time)
                try:
                    async for out in _replica_errors(stream, request_id):
                        if not isinstance(out, Refusal):
                            self._started[request_id] = True
                            yield out
                            continue
                        if out.engine_dead and out.replica not in tried:
                            # Its engine died before the request started there: to another
                            # replica, the router's choice among those not tried (Serve's health
                            # check replaces this one within seconds).
                            tried.append(out.replica)
                            target = None
                            break
                        if out.dropped == "timeout":
                            # Shed before it started (it cost nothing there): on to the replica
                            # the router's retry rule picks, if any.
                            tried.append(out.replica)
                            left = None if ttft is None else arrival + ttft - time.monotonic()
                            target = published.retry_target(REPLICAS, prompt, params.max_tokens, tried, left)
                            if target is not None:
                                break
                        raise out.error()
                    else:
                        return
                finally:
                    stream.cancel()  # a client that left (or an error): the replica aborts the request
        finally:
            self._started.pop(request_id, None)

    def _live_replicas(self) -> Dict[str, Dict[str, Any]]:
        return published.replica_stats(REPLICAS)


async def _replica_errors(stream, request_id: str) -> AsyncIterator[Union[RequestOutput, Refusal]]:
    """A replica's stream with Ray's errors as the server's: an exception in the replica (Ray
    wraps it in a `RayTaskError`) as itself, `ReplicaLostError` where the replica died under it."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    try:
        async for out in stream:
            yield out
    except RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else RuntimeError(str(e))
        raise cause from None
    except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
        raise ReplicaLostError(f"the replica serving request {request_id} was lost ({type(e).__name__}); retry: "
                               "Ray is replacing it and the router sends elsewhere meanwhile") from None


class ClusterMetrics:
    """`/metrics` of the cluster from the replicas' published metrics (as fresh as the routing
    stats: `request_routing_stats_period_s`)."""

    def __init__(self, llm: RemoteLLM):
        self.llm = llm

    def _texts(self) -> Dict[str, str]:
        return {rid: zlib.decompress(s["metrics"]).decode() for rid, s in self.llm._live_replicas().items()
                if "metrics" in s}

    async def render(self) -> bytes:
        return aggregate(self._texts())

    async def render_replicas(self) -> bytes:
        return per_replica(self._texts())


def _samples(text: str):
    """(family, sample) pairs of a Prometheus text, without `_created` (a start time, not a count)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                yield fam, s


def _render(families) -> bytes:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import Collector, CollectorRegistry

    class Families(Collector):
        def collect(self):
            yield from families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    return generate_latest(registry)


def aggregate(texts: Dict[str, str]) -> bytes:
    """One server's metric names, summed over the replicas; ratio gauges (a usage, a rate) are
    averaged. `horae:replicas_publishing` says how many replicas the sums cover."""
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

    families: Dict[str, Any] = {}
    totals: Dict[tuple, List[float]] = {}
    for text in texts.values():
        for fam, s in _samples(text):
            families.setdefault(fam.name, fam)
            totals.setdefault((fam.name, s.name, tuple(sorted(s.labels.items()))), []).append(s.value)
    merged = {name: Metric(f.name, f.documentation, f.type, f.unit) for name, f in families.items()}
    for (name, sample, labels), values in totals.items():
        ratio = merged[name].type == "gauge" and name.endswith(("_perc", "_rate", "_over_capacity"))
        merged[name].add_sample(sample, dict(labels), sum(values) / len(values) if ratio else sum(values))
    up = GaugeMetricFamily("horae:replicas_publishing", "Replicas whose published metrics these sums cover.")
    up.add_metric([], len(texts))
    return _render([*merged.values(), up])


def per_replica(texts: Dict[str, str]) -> bytes:
    """Every replica's series, each with a `replica` label."""
    from prometheus_client.metrics_core import Metric

    families: Dict[str, Any] = {}
    for rid, text in texts.items():
        for fam, s in _samples(text):
            out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            out.add_sample(s.name, {**s.labels, "replica": rid}, s.value)
    return _render(list(families.values()))


class Ingress:
    """The ingress deployment (wrapped by `serve.ingress()` at deploy time): the app is built once
    the replicas answer `info`."""

    def __init__(self, replicas, config: ServerConfig):
        self.replicas, self.config = replicas, config

    async def __serve_build_asgi_app__(self):
        from fastapi import Response

        info = await self.replicas.info.remote()
        llm = RemoteLLM(self.replicas, info)
        metrics = ClusterMetrics(llm)
        app = build_app(llm, self.config, metrics)

        @app.get("/metrics/replicas")
        async def replica_metrics():
            return Response(await metrics.render_replicas(), media_type="text/plain; version=0.0.4; charset=utf-8")

        return app
