"""`GET /v1/models`, `GET /v1/models/{id}` (what the openai client's `models.retrieve` calls),
`GET /health` and `GET /metrics` (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from horae.serve.errors import APIError
from horae.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    def card() -> dict:
        return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "horae",
                "root": str(state.llm.model_dir), "max_model_len": state.max_model_len}

    @r.get("/health")
    async def health():
        return Response(status_code=200)

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @r.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.config.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", "invalid_request_error", "model",
                           "model_not_found")
        return card()

    @r.get("/metrics")
    async def prom():
        # Gauges as of now, not of the last step that produced output (an abort changes them too).
        # The engine's figures wait for a running step without the GIL, so off the event loop.
        state.metrics.observe_step([], await asyncio.to_thread(state.engine.stats), {})
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return r
