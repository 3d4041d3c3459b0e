"""The OpenAI-compatible HTTP server (FastAPI): `/v1/completions`, `/v1/chat/completions` (with
server-sent-event streaming), `/v1/models`, `/health`, `/tokenize`, `/detokenize`, `/metrics`.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
status; a client that disconnects has its request aborted; a full queue answers 503 with
Retry-After."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from horae.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from horae.llm import RequestOutput, SamplingParams
from horae.serve.metrics import ServerMetrics
from horae.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    #: Requests accepted but not yet producing output; beyond it new ones get 503.
    max_queue: int = 256
    #: Largest request body, in bytes (413 beyond).
    max_body_bytes: int = 4 << 20
    #: Context limit of a request (prompt + max_tokens), at most the model's; None = the model's.
    max_model_len: Optional[int] = None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def build_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    """A FastAPI app serving `llm`. The engine thread starts with the first request."""
    app = FastAPI(title="horae", description="OpenAI-compatible server on the horae engine", version="0.1.0")
    metrics = ServerMetrics(config.model_name)
    llm.listeners.append(metrics.observe_step)
    app.state.llm, app.state.metrics, app.state.config = llm, metrics, config
    engine = llm.engine
    model_ctx = engine._core.max_model_len
    pool = engine._core.step_stats()
    pool_tokens = pool["kv_total_blocks"] * pool["block_size"]

    def context() -> int:
        # As vLLM: a request's prompt + max_tokens must fit the model, the configured limit and the
        # KV pool (a request larger than the whole pool could never run).
        return min(model_ctx, config.max_model_len or model_ctx, pool_tokens)

    created = int(time.time())
    token_text: Dict[int, str] = {}

    def piece(t: int) -> str:
        s = token_text.get(t)
        if s is None:
            s = token_text[t] = engine._core.decode([t], False)
        return s

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        else:
            msg = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, "invalid_request_error", param, first.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    # -- helpers --------------------------------------------------------------------------
    def check_model(name: Optional[str]) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found")

    def check_capacity(extra: int) -> None:
        waiting = sum(1 for t in llm.times.values() if t.first_token is None)
        if waiting + extra > config.max_queue:
            raise APIError(503, f"the server is at capacity ({config.max_queue} requests queued); retry later",
                           "server_overloaded", None, "overloaded", headers={"Retry-After": "1"})

    def sampling(req, max_tokens: Optional[int], prompt_len: int, logprobs: Optional[int]) -> SamplingParams:
        ctx = context()
        if prompt_len >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len} tokens in the prompt.", "invalid_request_error", "messages", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = ctx - prompt_len  # as vLLM: up to the end of the context
        if prompt_len + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
                           "invalid_request_error", "max_tokens", "context_length_exceeded")
        if req.stop_token_ids and any(t >= engine._core.vocab_size for t in req.stop_token_ids):
            raise APIError(400, "stop_token_ids must be inside the vocabulary", param="stop_token_ids")
        if req.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs, min_tokens=req.min_tokens)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e)) from None

    def start(prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        try:
            return llm.generate(prompt, params, request_id=f"req-{uuid.uuid4().hex}")
        except (TypeError, ValueError) as e:
            raise APIError(400, _first_line(e)) from None

    async def first_output(stream: AsyncIterator[RequestOutput]) -> Optional[RequestOutput]:
        """Pull one output, turning queue-time errors into API errors (before any byte is sent)."""
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except (TypeError, ValueError) as e:
            raise APIError(400, _first_line(e)) from None
        except EngineDeadError as e:
            raise engine_error(e) from None

    def engine_error(e: EngineDeadError) -> APIError:
        # A request the model failed on is the server's fault (500); a dead step loop is
        # "try again" (503).
        status = 500 if isinstance(e, RequestFailedError) else 503
        return APIError(status, str(e), "server_error", None, "engine_error")

    async def final_output(stream: AsyncIterator[RequestOutput], out: Optional[RequestOutput], raw: Request):
        """Read a stream to its finished output (non-streaming responses). A client that has gone
        ends it early: closing the stream aborts the request."""
        try:
            while out is not None and not out.finished:
                if await disconnected(raw):
                    raise APIError(499, "client disconnected")
                out = await stream.__anext__()
        except EngineDeadError as e:
            raise engine_error(e) from None
        finally:
            await stream.aclose()
        return out

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def completion_logprobs(c, start: int, offset0: int) -> Optional[dict]:
        if c.logprobs is None:
            return None
        toks, lps, tops, offsets = [], [], [], []
        pos = offset0
        for t, d in zip(c.token_ids[start:], c.logprobs[start:]):
            s = piece(t)
            toks.append(s)
            lps.append(d[t])
            tops.append({piece(a): v for a, v in d.items()})
            offsets.append(pos)
            pos += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(c, start: int, top: int) -> Optional[dict]:
        if c.logprobs is None:
            return None
        content = []
        for t, d in zip(c.token_ids[start:], c.logprobs[start:]):
            s = piece(t)
            alts = sorted(d.items(), key=lambda kv: -kv[1])[:top]
            content.append({"token": s, "logprob": d[t], "bytes": list(s.encode()),
                            "top_logprobs": [{"token": piece(a), "logprob": v, "bytes": list(piece(a).encode())} for a, v in alts]})
        return {"content": content}

    def new_parts(out: RequestOutput, sent: dict):
        """Per sample of `out`, what is new since the last call: (sample, chars already sent,
        tokens already sent, whether it finishes now). `sent` keeps the state between calls."""
        for c in out.outputs:
            chars, toks, done = sent.get(c.index, (0, 0, False))
            finishing = c.finish_reason is not None and not done
            if len(c.text) > chars or len(c.token_ids) > toks or finishing:
                sent[c.index] = (len(c.text), len(c.token_ids), done or finishing)
                yield c, chars, toks, finishing

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def disconnected(request: Request) -> bool:
        try:
            return await request.is_disconnected()
        except Exception:
            return True

    # -- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "horae", "root": str(llm.model_dir), "max_model_len": context()}]}

    @app.get("/metrics")
    async def prom():
        # Gauges as of now, not of the last step that produced output (an abort changes them too).
        # step_stats waits for a running step without the GIL, so it runs off the event loop.
        metrics.observe_step([], await asyncio.to_thread(engine._core.step_stats), {})
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        text = req.prompt if req.prompt is not None else chat_prompt(req.messages, True)
        tokens = engine._core.encode(text, req.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": context()}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        if any(t < 0 or t >= engine._core.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {engine._core.vocab_size})", param="tokens")
        return {"prompt": engine.decode(req.tokens)}

    def chat_prompt(messages, add_generation_prompt: bool) -> str:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return engine.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, _first_line(e), param="messages") from None
        except Exception as e:  # the template itself refused (jinja raise_exception)
            raise APIError(400, f"the chat template rejected the messages: {_first_line(e)}", param="messages") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if len(prompts) > 16:
            raise APIError(400, "at most 16 prompts per request", param="prompt")
        ids_list = []
        for x in prompts:
            ids = engine.encode(x) if isinstance(x, str) else list(x)
            if any(t < 0 or t >= engine._core.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {engine._core.vocab_size})", param="prompt")
            ids_list.append(ids)
        params = [sampling(req, req.max_tokens, len(ids), req.logprobs) for ids in ids_list]
        check_capacity(len(prompts))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [start({"prompt_token_ids": ids}, sp) for ids, sp in zip(ids_list, params)]
        firsts = []
        try:
            for s in streams:
                firsts.append(await first_output(s))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        n = req.n
        base = {"id": rid, "object": "text_completion", "created": now, "model": config.model_name}
        if not req.stream:
            choices, completion_tokens = [], 0
            for i, (s, out) in enumerate(zip(streams, firsts)):
                out = await final_output(s, out, raw)
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    choices.append({"index": i * n + c.index, "text": c.text, "logprobs": completion_logprobs(c, 0, 0),
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            return {**base, "choices": choices, "usage": usage(sum(map(len, ids_list)), completion_tokens)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # vLLM's continuous_usage_stats: every chunk carries the token counts so far (what a
        # benchmark client needs to stop at an exact length).
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        async def events():
            sent: List[dict] = [{} for _ in streams]
            totals = [0] * len(streams)
            try:
                for i, (s, out) in enumerate(zip(streams, firsts)):
                    while out is not None:
                        for c, chars, toks, fin in new_parts(out, sent[i]):
                            choice = {"index": i * n + c.index, "text": c.text[chars:],
                                      "logprobs": completion_logprobs(c, toks, chars),
                                      "finish_reason": c.finish_reason if fin else None,
                                      "stop_reason": c.stop_reason if fin else None}
                            so_far = sum(len(x.token_ids) for x in out.outputs)
                            tail = ({"usage": usage(len(ids_list[i]), so_far)} if continuous
                                    else {"usage": None} if include_usage else {})
                            yield sse({**base, "choices": [choice], **tail})
                        totals[i] = sum(len(c.token_ids) for c in out.outputs)
                        if out.finished:
                            break
                        out = await s.__anext__()
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(sum(map(len, ids_list)), sum(totals))})
                yield "data: [DONE]\n\n"
            except EngineDeadError as e:
                yield sse(error_body(str(e), "server_error"))
            finally:
                for s in streams:
                    await s.aclose()  # a disconnect lands here: the requests are aborted

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        text = chat_prompt(req.messages, req.add_generation_prompt)
        ids = engine.encode(text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        sp = sampling(req, max_tokens, len(ids), top if req.logprobs else None)
        check_capacity(1)
        stream = start({"prompt_token_ids": ids}, sp)
        out = await first_output(stream)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": now, "model": config.model_name}
        if not req.stream:
            out = await final_output(stream, out, raw)
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(c, 0, top), "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason} for c in out.outputs]
            return {**base, "choices": choices, "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        chunk = {**base, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        async def events():
            sent: dict = {}
            cur = out
            try:
                for i in range(req.n):  # the role comes first, as OpenAI sends it
                    yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}], **extra})
                while cur is not None:
                    for c, chars, toks, fin in new_parts(cur, sent):
                        delta = {"content": c.text[chars:]} if len(c.text) > chars or not fin else {}
                        tail = {"usage": usage(len(ids), sum(len(x.token_ids) for x in cur.outputs))} if continuous else extra
                        yield sse({**chunk, "choices": [{"index": c.index, "delta": delta, "logprobs": chat_logprobs(c, toks, top),
                                                         "finish_reason": c.finish_reason if fin else None}], **tail})
                    if cur.finished:
                        break
                    cur = await stream.__anext__()
                if include_usage and cur is not None:
                    yield sse({**chunk, "choices": [], "usage": usage(len(ids), sum(len(c.token_ids) for c in cur.outputs))})
                yield "data: [DONE]\n\n"
            except EngineDeadError as e:
                yield sse(error_body(str(e), "server_error"))
            finally:
                await stream.aclose()  # a disconnect lands here: the request is aborted

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_middleware(_Guard, config=config)
    _add_schema_examples(app, config.model_name)
    return app


def _add_schema_examples(app: FastAPI, model_name: str) -> None:
    """Request examples in the OpenAPI schema that name the served model, so that clients
    generated from it (and schemathesis) reach past the model check."""
    examples = {
        "CompletionRequest": {"model": model_name, "prompt": "The capital of France is", "max_tokens": 8},
        "ChatCompletionRequest": {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
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


class _Guard:
    """Bearer key on every route but /health, and the body-size limit, as plain ASGI middleware:
    Starlette's BaseHTTPMiddleware makes a streaming response see a disconnect that did not
    happen, which would abort every streamed request."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg = self.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if cfg.api_key and scope["path"] != "/health" and headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            return await _reply(send, 401, error_body("Incorrect API key provided.", "authentication_error", None, "invalid_api_key"))
        size = headers.get("content-length")
        too_big = error_body(f"the request body is over the limit of {cfg.max_body_bytes} bytes",
                             "invalid_request_error", None, "request_too_large")
        if size is not None and (not size.isdigit() or int(size) > cfg.max_body_bytes):
            return await _reply(send, 413, too_big)
        seen = 0

        async def limited_receive():
            # A chunked body has no length up front: count it as it comes.
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cfg.max_body_bytes:
                    raise _BodyTooLarge()
            return msg

        started = False

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, 413, too_big)
        except Exception as e:  # the last line of defence: never a traceback page
            if not started:
                await _reply(send, 500, error_body(f"internal error: {_first_line(e)}", "server_error"))


class _BodyTooLarge(Exception):
    pass


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
