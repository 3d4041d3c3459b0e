"""`horae serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) on the real engine."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from horae.serve.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model folder's name)")
    p.add_argument("--scheduler", default="past-future", choices=["past-future", "aggressive", "conservative"])
    p.add_argument("--kv-cache-tokens", type=int, default=16384, help="tokens the KV pool holds")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one step")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests accepted but not yet generating; beyond it the server answers 503 + Retry-After")
    p.add_argument("--max-model-len", type=int, help="context limit of a request (default: the model's)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    p.add_argument("--log-level", default="info")


def make_app(args: argparse.Namespace):
    from horae.async_llm import AsyncLLM

    if args.max_queue < 1 or args.max_body_bytes < 1 or (args.max_model_len is not None and args.max_model_len < 2):
        raise ValueError("--max-queue and --max-body-bytes must be at least 1, --max-model-len at least 2")
    llm = AsyncLLM(args.model, scheduler=args.scheduler, kv_cache_tokens=args.kv_cache_tokens,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype)
    name = args.served_model_name or llm.model_dir.name
    return build_app(llm, ServerConfig(model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                                       max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app = make_app(args)
    print(f"serving {app.state.config.model_name} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        app.state.llm.shutdown()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="horae serve")
    add_arguments(p)
    return run(p.parse_args(argv))
