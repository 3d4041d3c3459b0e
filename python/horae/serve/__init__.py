"""`horae serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) on the real engine."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Optional, Sequence

from horae import _core
from horae.checks import is_number
from horae.serve.reasoning import REASONING_PARSERS
from horae.serve.tool_parsers import PARSERS

__all__ = ["ServerConfig", "ServerThread", "build_app", "add_arguments", "run"]


def __getattr__(name):
    # The app (FastAPI, pydantic) is imported on first use, so the CLI's other commands and
    # `add_arguments` do not pay for it.
    if name in ("ServerConfig", "build_app"):
        from horae.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'horae.serve' has no attribute {name!r}")


#: Seconds a stopping server (a signal to `horae serve`, `ServerThread.stop`) lets open requests
#: finish before it cuts them.
GRACEFUL_SHUTDOWN_S = 5.0


class _CutAtShutdown(logging.Filter):
    """uvicorn logs each request it cuts at the end of the graceful shutdown as "Exception in ASGI
    application" with the cancellation's traceback, right after its own line saying how many it
    cut. The traceback adds nothing (the cut request is aborted, as planned) and reads as a crash
    in a notebook's output; this drops just those records: a cancellation that is, or was raised
    while handling, uvicorn's (anyio's task group may re-raise it bare, with uvicorn's as its
    context, depending on where the cut lands)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while isinstance(exc, asyncio.CancelledError):
            if "graceful shutdown" in str(exc):
                return False
            exc = exc.__context__
        return True


def _quiet_cuts_at_shutdown() -> None:
    """On uvicorn's error logger, once (uvicorn's logging set-up, as each Config makes it, drops
    the logger's handlers but keeps its filters)."""
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CutAtShutdown) for f in log.filters):
        log.addFilter(_CutAtShutdown())


class ServerThread:
    """Serve an app with uvicorn on a background thread, on a free loopback port (tests, notebooks,
    the serving study). `stop()` ends it, as `horae serve` ends on a signal: requests still open
    `timeout_graceful_shutdown` seconds later are cut (and aborted); the app's engine keeps
    running until its `shutdown()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 timeout_graceful_shutdown: float = GRACEFUL_SHUTDOWN_S):
        import socket
        import threading
        import time

        import uvicorn

        if not is_number(timeout_graceful_shutdown) or not 0 <= timeout_graceful_shutdown < float("inf"):
            raise ValueError(f"timeout_graceful_shutdown must be a number of seconds >= 0, got {timeout_graceful_shutdown!r}")
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.app, self.port, self.url = app, port, f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=timeout_graceful_shutdown))
        _quiet_cuts_at_shutdown()
        self.thread = threading.Thread(target=self.server.run, name="horae-http", daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving and wait until the server has (its open requests cut after the grace)."""
        self.server.should_exit = True
        self.thread.join(timeout=self.server.config.timeout_graceful_shutdown + 10)


def _port(text: str) -> int:
    """A TCP port: uvicorn takes 70000 and listens on 70000 - 65536 (4464) without a word."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0: any free one), got {port}")
    return port


def _json(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def _json_dict(text: str) -> dict:
    value = _json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _json_strings(text: str) -> list:
    value = _json(text)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise argparse.ArgumentTypeError('expected a JSON list of strings, e.g. \'["http://localhost:3000"]\'')
    return value


def add_prior_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history-prior", metavar="PRIOR",
                   help="past-future: what a cold history samples from until real lengths replace it: uniform "
                        "(default; up to the largest output), max-tokens (LightLLM's), sharegpt (bundled), "
                        "or a CSV file of output lengths")
    p.add_argument("--history-prior-weight", type=int, metavar="N",
                   help="past-future: entries of the prior in a cold history (default: 8)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model folder's name)")
    p.add_argument("--scheduler", default="past-future", choices=["past-future", "aggressive", "conservative"])
    p.add_argument("--device", default="auto", help="auto (a GPU if one works, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="tokens the KV pool holds (default: 16384 on the CPU; on a GPU, what fits in --gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and the KV pool")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one step")
    p.add_argument("--long-prefill-token-threshold", type=int, metavar="N",
                   help="most tokens of one prompt prefilled in a step, so short requests start beside a long "
                        "prompt (vLLM's option; default: no limit)")
    p.add_argument("--max-long-partial-prefills", type=int, default=1, metavar="N",
                   help="with --long-prefill-token-threshold: long prompts that prefill in one step (vLLM's option)")
    p.add_argument("--history-window", type=int, default=1000, help="past-future: finished lengths remembered")
    p.add_argument("--max-output-bound", type=int,
                   help="past-future: the length its history is primed with (default: the model's context)")
    p.add_argument("--history-file", metavar="PATH",
                   help="past-future: load its length history from here at start, save it as requests finish and "
                        "at shutdown, so a restart starts warm (missing or unusable: start cold, logged)")
    add_prior_arguments(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "q8_0", "q4_1"],
                   help="auto: the checkpoint's on the CPU (a GGUF's Q4_1/Q8_0 blocks included), bfloat16 on a GPU; "
                        "float16 is GPU-only; q8_0 quantizes at load")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="what the KV cache holds: auto is the model's (bfloat16 for a bfloat16 model, else float32 "
                        "on the CPU; a GPU's holds its weights' type); bfloat16 halves it for the others")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the full prompt blocks earlier requests computed (vLLM's option; on by default)")
    p.add_argument("--speculative", type=_json_dict, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "k_max": 4}\' (adaptive k by default)')
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests accepted but not yet generating; beyond it the server answers 503 + Retry-After")
    p.add_argument("--max-model-len", type=int, help="context limit of a request (default: the model's)")
    p.add_argument("--queue-timeout", type=float, metavar="SECONDS",
                   help="a request not started this long after it arrived is dropped: 503 + Retry-After, "
                        "code queue_timeout (off by default; the Past-Future paper used 8)")
    p.add_argument("--max-itl-abort", type=float, metavar="SECONDS",
                   help="a running request without a token this long is cut: code sla_abort (off by default)")
    p.add_argument("--queue", default="fcfs", choices=_core.QUEUES,
                   help="fcfs: arrival order; slo: least slack against each request's SLO first, hopeless ones "
                        "answered 503 + Retry-After at once, preemption where it loses the least goodput")
    p.add_argument("--slo-ttft", type=float, metavar="SECONDS",
                   help="default first-token bound of a request whose body has no slo.ttft")
    p.add_argument("--slo-max-itl", type=float, metavar="SECONDS",
                   help="default bound on the gap between two tokens of a request whose body has no slo.max_itl")
    p.add_argument("--seed", type=int, help="make the run reproducible: unseeded requests draw from streams derived "
                                            "from it (default: fresh entropy)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    # CORS, as vLLM's flags (Starlette's CORSMiddleware): a page in a browser may call the server.
    p.add_argument("--allowed-origins", type=_json_strings, default=["*"], metavar="JSON",
                   help='origins a browser page may call from (default: \'["*"]\', any; \'[]\': none)')
    p.add_argument("--allowed-methods", type=_json_strings, default=["*"], metavar="JSON",
                   help='HTTP methods such a page may use (default: \'["*"]\')')
    p.add_argument("--allowed-headers", type=_json_strings, default=["*"], metavar="JSON",
                   help='request headers such a page may send (default: \'["*"]\')')
    p.add_argument("--allow-credentials", action="store_true", help="let such a page send its cookies")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto" (the default when a request gives tools): the model calls tools in '
                        "its own format, read by --tool-call-parser (vLLM's option)")
    p.add_argument("--tool-call-parser", choices=sorted(PARSERS),
                   help="with --enable-auto-tool-choice: the model's tool-call format: hermes (Hermes 2 Pro / 3, "
                        "Qwen2.5), llama3_json (Llama 3.1-3.3) or mistral (Mistral 7B Instruct v0.3)")
    p.add_argument("--chat-template", metavar="FILE_OR_TEXT",
                   help="a Jinja chat template (a file, or the template itself) instead of the model's (vLLM's option)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request bring its own chat_template (a template is code; it runs in a sandbox)")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS),
                   help="answer a reasoning model's thinking apart, as `reasoning` beside `content`: deepseek_r1 "
                        "(<think>...</think>: DeepSeek-R1's distilled Qwen2 and Llama models, QwQ) (vLLM's option)")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprobs name tokens "token_id:N" instead of by their text, unless a request says otherwise '
                        "(vLLM's option)")
    p.add_argument("--log-level", default="info")
    r = p.add_argument_group("replicas (Ray Serve; pip install \"horae[ray]\")")
    r.add_argument("--replicas", type=int, metavar="N",
                   help="serve N engines on Ray Serve behind one ingress on --host/--port (default: one engine in "
                        "this process, no Ray)")
    r.add_argument("--router", default="forecast", metavar="NAME",
                   help="with --replicas: forecast (horae's: Past-Future headroom, cached prefix, prefill work ahead), "
                        "prefix, power-of-two (Ray's default) or round-robin")
    r.add_argument("--retry-shed", default="always", metavar="RULE",
                   help="with --replicas: where a request a replica sheds (503) goes next: always (any replica not "
                        "tried, while its first-token bound holds), in-time (only an idle replica that can still "
                        "prefill it within the bound) or never (the client gets the 503)")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="with --replicas: join this Ray cluster (host:port, ray://host:port or auto) instead of "
                        "starting a local one")


def tool_call_parser(args: argparse.Namespace) -> Optional[str]:
    """The parser for tool_choice "auto", or None; the two options go together (vLLM's rule)."""
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: give both or neither")
    return args.tool_call_parser


def chat_template(args: argparse.Namespace) -> Optional[str]:
    """--chat-template's template: a file's text, or the option's own text when it looks like a
    template (as vLLM reads it); None for the model's."""
    from pathlib import Path

    given = args.chat_template
    if given is None:
        return None
    if Path(given).is_file():
        return Path(given).read_text()
    if any(c in given for c in "{}\n"):
        return given
    raise ValueError(f"--chat-template: no file {given!r} (give a file, or the template itself)")


def server_config(args: argparse.Namespace):
    """The HTTP server's settings from `horae serve`'s options (one engine, or the replicas' ingress)."""
    from horae.serve.state import ServerConfig

    return ServerConfig(model_name=args.served_model_name or "", api_key=args.api_key, max_queue=args.max_queue,
                        max_body_bytes=args.max_body_bytes, tool_call_parser=tool_call_parser(args),
                        reasoning_parser=args.reasoning_parser, chat_template=chat_template(args),
                        trust_request_chat_template=args.trust_request_chat_template,
                        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                        allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                        allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials)


def engine_args(args: argparse.Namespace) -> dict:
    """The engine's keyword arguments from `horae serve`'s options (one engine, or each replica)."""
    if args.max_queue < 1 or args.max_body_bytes < 1:
        raise ValueError("--max-queue and --max-body-bytes must be at least 1")
    return dict(scheduler=args.scheduler, kv_cache_tokens=args.kv_cache_tokens,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
                kv_cache_dtype=args.kv_cache_dtype,
                history_window=args.history_window, max_output_bound=args.max_output_bound,
                speculative=args.speculative, device=args.device, seed=args.seed,
                gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                queue_timeout=args.queue_timeout, max_itl_abort=args.max_itl_abort,
                history_file=args.history_file, history_prior=args.history_prior,
                history_prior_weight=args.history_prior_weight,
                long_prefill_token_threshold=args.long_prefill_token_threshold, queue=args.queue,
                max_long_partial_prefills=args.max_long_partial_prefills,
                enable_prefix_caching=args.enable_prefix_caching,
                slo={k: v for k, v in (("ttft", args.slo_ttft), ("max_itl", args.slo_max_itl)) if v is not None})


def prepare_structured_output(llm) -> None:
    """Build structured output's vocabulary trie before serving (a tenth of a second for
    SmolLM2), so the first request with a grammar does not hold up the others; a model that
    cannot have it is said once and served without it."""
    try:
        llm.engine._core.prepare_structured_output()
    except Exception as e:  # the model's tokenizer or end-of-sequence: every other route still serves
        print(f"structured output: not available ({e})", flush=True)


def make_app(args: argparse.Namespace):
    from horae.async_llm import AsyncLLM
    from horae.serve.app import build_app

    config = server_config(args)  # its errors before the model loads
    llm = AsyncLLM(args.model, **engine_args(args))
    if llm.engine.history_status is not None:
        print(f"history: {llm.engine.history_status[1]}", flush=True)
    print(f"model on {llm.engine.device}" + (f" ({llm.engine.cpu_fallback_reason})" if llm.engine.cpu_fallback_reason else ""),
          flush=True)
    prepare_structured_output(llm)
    return build_app(llm, config)


def listen(host: str, port: int):
    """The server's socket, bound before the model loads (as vLLM's server does), so that a host
    that does not resolve or a port in use is an error at once rather than after the load."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot serve on --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    sock = listen(args.host, args.port)
    try:
        app = make_app(args)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    print(f"serving {app.state.config.model_name} on http://{args.host}:{port}/v1", flush=True)
    try:
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        _quiet_cuts_at_shutdown()
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        app.state.llm.shutdown()
        sock.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="horae serve")
    add_arguments(p)
    return run(p.parse_args(argv))
