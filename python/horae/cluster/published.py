"""The request routers alive in this process, by deployment name, so that the ingress can read the
stats (and metrics) its replicas published from its handle's router.

A module of its own because Ray ships the router's module to each process by value (a copy of its
globals), while this one is imported by reference: the router and the ingress share this dict."""

from __future__ import annotations

from typing import Any, Dict

ROUTERS: Dict[str, Any] = {}


def replica_stats(deployment: str) -> Dict[str, Dict[str, Any]]:
    """Each live replica's last published stats (empty before its first), by replica id."""
    router = ROUTERS.get(deployment)
    return router.replica_stats() if router is not None else {}


def retry_target(deployment: str, prompt, max_tokens, tried, ttft):
    """Where the deployment's router, by its retry rule, sends a request (its engine prompt) that
    `tried` shed and that may wait `ttft` more seconds for its first token (None: nowhere)."""
    router = ROUTERS.get(deployment)
    return router.retry_target(prompt, max_tokens, tried, ttft) if router is not None else None
