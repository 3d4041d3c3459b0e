"""The OpenAI-compatible HTTP server (FastAPI): `/v1/completions`, `/v1/chat/completions`,
`/v1/responses` (each with server-sent-event streaming), `/v1/models`, `/health`, `/version`,
`/tokenize`, `/detokenize`, `/metrics`, one module per endpoint family over one shared
`ServerState`.

Every error is OpenAI's shape with a 4xx status (errors.py); a client that disconnects has its
request aborted; a full queue answers 503 with Retry-After."""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Optional

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from horae.async_llm import AsyncLLM
from horae.serve import chat, completions, models, responses, tokens
from horae.serve.errors import Guard, install_error_handlers
from horae.serve.metrics import MetricsSource
from horae.serve.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "build_app"]


def build_app(llm: AsyncLLM, config: ServerConfig, metrics: Optional[MetricsSource] = None) -> FastAPI:
    """A FastAPI app serving `llm` (an `AsyncLLM`, or the Ray ingress's client of replicas, with
    its own `metrics`). The engine thread starts with the first request."""
    if not config.model_name:
        config = replace(config, model_name=llm.model_dir.name)
    app = FastAPI(title="horae", description="OpenAI-compatible server on the horae engine", version="0.1.0")
    state = ServerState(llm, config, metrics)
    app.state.llm, app.state.metrics, app.state.config, app.state.server = llm, state.metrics, config, state
    install_error_handlers(app)
    # FastAPI keeps every endpoint it has called in a process-wide cache (4,096 of them), so the
    # routes reach the state through a proxy: the app holds it, and an app that is gone (a
    # notebook's server stopped and built again) frees its engine with it.
    routes_state = weakref.proxy(state)
    for family in (models, completions, chat, responses, tokens):
        app.include_router(family.router(routes_state))
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    # Outermost (added last): a browser's preflight carries no key, and errors need CORS headers too.
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)
    _add_schema_examples(app, config.model_name)
    return app


def _add_schema_examples(app: FastAPI, model_name: str) -> None:
    """Request examples in the OpenAPI schema that name the served model, so that clients
    generated from it (and schemathesis) reach past the model check."""
    examples = {
        "CompletionRequest": {"model": model_name, "prompt": "The capital of France is", "max_tokens": 8},
        "ChatCompletionRequest": {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        "ResponsesRequest": {"model": model_name, "input": "Hi", "max_output_tokens": 8},
        "TokenizeRequest": {"model": model_name, "prompt": "Hello"},
        "DetokenizeRequest": {"model": model_name, "tokens": [19556]},
    }
    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            for name, example in examples.items():
                comp = schema.get("components", {}).get("schemas", {}).get(name)
                if comp is not None:
                    comp["examples"] = [example]
                    comp["properties"]["model"]["examples"] = [model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
