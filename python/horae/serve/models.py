"""`GET /v1/models`, `GET /v1/models/{id}` (what the openai client's `models.retrieve` calls),
`GET /health`, `GET /version` (vLLM's) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from horae import __version__
from horae.async_llm import EngineDeadError
from horae.serve.errors import APIError
from horae.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    def card() -> dict:
        return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "horae",
                "root": str(state.llm.model_dir), "max_model_len": state.max_model_len}

    @r.get("/health")
    async def health():
        # vLLM's: 503 once the engine has died, so an orchestrator restarts the server.
        try:
            await state.llm.check_health()
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", None, e.code) from None
        return Response(status_code=200)

    @r.get("/version")
    async def version():
        return {"version": __version__}

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
        return Response(await state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return r
