"""horae's request router for Ray Serve: a `RequestRouter` whose decision is the core's
`route::Router` (the same code the cluster simulator routes with) over the stats each replica
publishes (`HoraeReplica.record_routing_stats`).

Ray calls `choose_replicas` with the replicas it may use now (dead ones are gone from the list until
Ray has a healthy replacement). The core router indexes replicas by position, so this class keeps
one stable order, every replica Ray knows, and marks those Ray left out of the candidates as
already tried."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from horae import _core
from horae.cluster import published


class HoraeRequestRouter(RequestRouter):
    def initialize_state(self, router: str = "forecast", seed: int = 0, retry_shed: str = "always"):
        self._kind, self._seed, self._retry_shed = router, seed, retry_shed
        self._core = _core.Router(router, seed)
        self._order: List[str] = []
        self._seq: Dict[str, Any] = {}
        published.ROUTERS[self._deployment_id.name] = self

    def replica_stats(self) -> Dict[str, Dict[str, Any]]:
        """Each live replica's last published stats (empty until its first)."""
        return {rid.to_full_id_str(): dict(r.routing_stats or {}) for rid, r in self.curr_replicas.items()}

    def _sync(self, extra: List[RunningReplica] = ()) -> Dict[str, RunningReplica]:
        """Every replica Ray knows (plus `extra`), by id, with the core router holding each one's
        latest published stats in one stable order (`self._order`)."""
        everyone = {rid.to_full_id_str(): r for rid, r in self.curr_replicas.items()}
        for r in extra:
            everyone.setdefault(r.replica_id.to_full_id_str(), r)
        order = sorted(everyone)
        if order != self._order:  # replicas came or went: positions changed, start afresh
            self._core, self._order, self._seq = _core.Router(self._kind, self._seed), order, {}
        stats = [everyone[rid].routing_stats or {} for rid in order]
        # A replica that has not published yet is new and idle: as empty as the roomiest known one.
        fresh = _fresh_stats([s for s in stats if "cached_bloom" in s])
        for i, (rid, s) in enumerate(zip(order, stats)):
            seq = s.get("seq", "fresh")
            if self._seq.get(rid) != seq:  # a new publication: parsed once, here
                self._core.publish(i, s if "cached_bloom" in s else fresh)
                self._seq[rid] = seq
        return everyone

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is None or len(pending_request.args) < 2 or not candidate_replicas:
            return [candidate_replicas]  # not a generation (`info`): any replica
        everyone = self._sync(candidate_replicas)
        order = self._order
        candidates = {r.replica_id.to_full_id_str() for r in candidate_replicas}
        hints = pending_request.kwargs.get("route") or {}  # set by the ingress (`RemoteLLM`)
        pinned = hints.get("replica")
        if pinned in candidates:  # a retry `retry_target` already chose (and counted)
            return [[everyone[pinned]]]
        tried = set(hints.get("tried") or ()) | (set(order) - candidates) | _dead(everyone)
        prompt, params = pending_request.args[0], pending_request.args[1]
        max_tokens = params.max_tokens if params.max_tokens is not None else 1 << 30
        i = self._core.choose(list(prompt["prompt_token_ids"]), max_tokens,
                              [k for k, rid in enumerate(order) if rid in tried], hints.get("ttft"),
                              prompt.get("cache_salt"))
        if order[i] not in candidates:  # every candidate had turned it away: any candidate
            return [candidate_replicas]
        return [[everyone[order[i]]]]

    def retry_target(self, prompt: Dict[str, Any], max_tokens: Optional[int], tried: List[str],
                     ttft: Optional[float]) -> Optional[str]:
        """The replica a request (its engine prompt) that `tried` shed should go to, or None, by
        this router's retry rule (`_core.Router.retry_target`)."""
        everyone = self._sync()
        if not everyone:
            return None
        tried = set(tried) | _dead(everyone)
        i = self._core.retry_target(list(prompt["prompt_token_ids"]), max_tokens if max_tokens is not None else 1 << 30,
                                    [k for k, rid in enumerate(self._order) if rid in tried], ttft,
                                    self._retry_shed, prompt.get("cache_salt"))
        return None if i is None else self._order[i]


def _dead(replicas: Dict[str, RunningReplica]) -> Set[str]:
    """Replicas whose engine died (their last stats say so): Ray keeps them among the candidates
    until their health checks have failed enough times, and their idle figures would draw every
    request, so they count as already tried."""
    return {rid for rid, r in replicas.items() if (r.routing_stats or {}).get("dead")}


def _fresh_stats(known: List[Dict[str, Any]]) -> Dict[str, Any]:
    capacity = max((s["capacity_tokens"] for s in known), default=1 << 40)
    block_size = known[0]["block_size"] if known else 16
    return {"waiting": 0, "running": 0, "waiting_tokens": 0, "capacity_tokens": capacity, "predicted_peak_tokens": 0,
            "planned_output": 0, "prefill_rate": 0.0, "block_size": block_size, "cached_bloom": bytes(8)}
