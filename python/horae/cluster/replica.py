"""One horae engine as a Ray Serve replica: an `AsyncLLM` whose streams the ingress pulls through a
deployment handle, and the routing stats it publishes (`record_routing_stats`, polled by Ray's
controller every `request_routing_stats_period_s`)."""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Optional, Union

from horae.async_llm import AsyncLLM, EngineDiedError, RequestDroppedError
from horae.outputs import RequestOutput
from horae.sampling_params import BeamSearchParams, SamplingParams
from horae.serve import prepare_structured_output
from horae.serve.metrics import EngineMetrics


@dataclass
class Refusal:
    """How a replica ends a stream it refuses (bad input) or drops (its rules): the last item of
    the stream rather than an exception, which Ray would log with a traceback as a failure. The
    ingress raises it as the server's exception (`error()`)."""

    message: str
    #: The field at fault of a bad request.
    param: Optional[str] = None
    #: Why the server's rules dropped it ("timeout": never started, so cheap to send elsewhere;
    #: "sla_abort"); None for a bad request.
    dropped: Optional[str] = None
    request_id: str = ""
    replica: str = ""
    #: This replica's engine has died (`EngineDiedError`) and the request never started here:
    #: another replica can take it while Serve's health check replaces this one.
    engine_dead: bool = False

    def error(self) -> Exception:
        if self.engine_dead:
            return EngineDiedError(self.message)
        if self.dropped is not None:
            return RequestDroppedError(self.dropped, self.request_id)
        e = ValueError(self.message)
        e.param = self.param
        return e


class HoraeReplica:
    """`generate` streams one request's cumulative outputs. `route` is for the router
    (`horae.cluster.router`, which reads the call's arguments) and is not used here;
    `arrival_time` is when the request reached the ingress (`time.time()`), so that a resent
    request's bounds and queue deadline count from its first arrival, as the simulator's do."""

    def __init__(self, model: Optional[str], engine_args: Dict[str, Any], model_name: str):
        from ray import serve

        ctx = serve.get_replica_context()
        if engine_args.get("history_file"):
            # One history per replica rank: a replica Ray restarts in its place starts warm from it.
            path = Path(engine_args["history_file"])
            engine_args = {**engine_args, "history_file": path.with_name(f"{path.stem}.replica{ctx.rank.rank}{path.suffix}")}
        self.llm = AsyncLLM(model, **engine_args)
        prepare_structured_output(self.llm)
        self.default_slo = dict(engine_args.get("slo") or {})
        self.queue_timeout: Optional[float] = engine_args.get("queue_timeout")
        self.metrics = EngineMetrics(self.llm, model_name)
        self.replica_id = ctx.replica_id.to_full_id_str()
        self._published = itertools.count()

    # Streaming methods are generator functions: Ray Serve streams what they yield.
    async def generate(self, prompt: Dict[str, Any], params: SamplingParams, request_id: str,
                       route: Optional[Dict[str, Any]] = None,
                       arrival_time: Optional[float] = None) -> AsyncIterator[Union[RequestOutput, Refusal]]:
        """`prompt`: the engine's (`{"prompt_token_ids": [...]}`, maybe with a `cache_salt`), as
        the ingress tokenized it; `route`: what the router read."""
        async for out in self._refusals(self.llm.generate(prompt, params, request_id, arrival_time=arrival_time),
                                        request_id):
            yield out

    async def beam_search(self, prompt: Dict[str, Any], params: BeamSearchParams, request_id: str,
                          route: Optional[Dict[str, Any]] = None,
                          arrival_time: Optional[float] = None) -> AsyncIterator[Union[RequestOutput, Refusal]]:
        """A whole beam search on this replica's engine (`AsyncLLM.beam_search`): one output at its end."""
        async for out in self._refusals(self.llm.beam_search(prompt, params, request_id), request_id):
            yield out

    async def _refusals(self, stream: AsyncIterator[RequestOutput], request_id: str):
        """`stream`, ended by a `Refusal` where the request is bad, the engine's rules drop it, or
        the engine has died before the request started."""
        started = False
        try:
            async for out in stream:
                started = True
                yield out
        except EngineDiedError as e:
            if started:
                raise
            yield Refusal(str(e), request_id=request_id, replica=self.replica_id, engine_dead=True)
        except RequestDroppedError as e:
            yield Refusal(str(e), dropped=e.reason, request_id=request_id, replica=self.replica_id)
        except (TypeError, ValueError) as e:
            yield Refusal(str(e), param=getattr(e, "param", None), request_id=request_id, replica=self.replica_id)
        finally:
            await stream.aclose()

    async def check_health(self) -> None:
        """Ray Serve's health check, every few seconds: a replica whose engine died (a step
        panicked) fails it, and Serve replaces the replica."""
        await self.llm.check_health()

    def info(self) -> Dict[str, Any]:
        eng = self.llm.engine
        return {"model_dir": str(eng.model_dir), "vocab_size": eng.vocab_size,
                "max_request_tokens": eng.max_request_tokens, "replica": self.replica_id, "slo": self.default_slo,
                "queue_timeout": self.queue_timeout}

    async def record_routing_stats(self) -> Dict[str, Any]:
        """What the router decides with (see `_core.Engine.routing_stats`: the queue, the forecast
        against the pool, a Bloom filter of the prefix cache), plus `seq` (new stats, so the router
        forgets what it sent since the last ones) and this replica's metrics, compressed, which the
        ingress's `/metrics` gathers."""
        import asyncio

        stats = await asyncio.to_thread(self.llm.engine.routing_stats)
        stats["seq"] = next(self._published)
        stats["replica"] = self.replica_id
        # A dead engine refuses every request (an `engine_dead` refusal the ingress resends):
        # the router passes this replica over until Serve's health check has replaced it.
        stats["dead"] = self.llm.errored
        stats["metrics"] = zlib.compress(await self.metrics.render())
        return stats

    def __del__(self):
        # Serve calls this when it stops the replica (scale down, redeploy, shutdown): the engine
        # loop ends after its step and writes Past-Future's history file, if there is one.
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
