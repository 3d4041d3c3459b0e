"""`POST /v1/chat/completions`: the model's chat template, n samples, streamed or not, with the
chat logprobs format."""

from __future__ import annotations

import json
import time
import uuid
from typing import List, Optional

from fastapi import APIRouter, Request

from horae.serve.errors import APIError
from horae.serve.protocol import ChatCompletionRequest
from horae.serve.state import ServerState, new_parts, usage
from horae.serve.streaming import sse_response


def chat_logprobs(state: ServerState, c, start: int, top: int) -> Optional[dict]:
    if c.logprobs is None:
        return None
    content = []
    for t, d in zip(c.token_ids[start:], c.logprobs[start:]):
        s = state.piece(t)
        alts = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": s, "logprob": d[t], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": state.piece(a), "logprob": v, "bytes": list(state.piece(a).encode())}
                                         for a, v in alts]})
    return {"content": content}


def tool_calls(forced: str, text: str) -> Optional[List[dict]]:
    """A forced tool call's answer as OpenAI's `tool_calls`: the named function with the text as
    its arguments, or for 'required' ("*") each {"name", "parameters"} of the list; None where
    the text is not a complete list (cut by max_tokens)."""
    new_id = lambda: f"chatcmpl-tool-{uuid.uuid4().hex}"  # noqa: E731
    if forced != "*":
        return [{"id": new_id(), "type": "function", "function": {"name": forced, "arguments": text}}]
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    return [{"id": new_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["parameters"])}} for c in calls]


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        state.check_model(req.model)
        ids = state.encode(state.chat_prompt(req.messages, req.add_generation_prompt, req.tools), "messages")
        forced = req.forced_tool()
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        params = state.sampling(req, max_tokens, top if req.logprobs else None)
        state.check_capacity(1)
        try:
            streams, (out,) = await state.start_all("chatcmpl", [ids], [params])
        except APIError as e:
            if e.param != "logprobs":
                raise
            # The engine's logprobs is this route's top_logprobs: name the field the client sent.
            raise APIError(e.status, e.message.replace("logprobs", "top_logprobs", 1), e.type, "top_logprobs",
                           e.code) from None
        stream = streams[0]

        def message(c) -> dict:
            calls = tool_calls(forced, c.text) if forced else None
            if calls is None:
                return {"role": "assistant", "content": c.text}
            return {"role": "assistant", "content": None, "tool_calls": calls}

        def finish(c) -> Optional[str]:
            # As vLLM: 'required' ends in "tool_calls"; a named function's call ends as its text did.
            return "tool_calls" if forced == "*" and c.finish_reason == "stop" else c.finish_reason

        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": state.config.model_name}
        if not req.stream:
            out = await state.final_output(stream, out, raw)
            choices = [{"index": c.index, "message": message(c), "logprobs": chat_logprobs(state, c, 0, top),
                        "finish_reason": finish(c), "stop_reason": c.stop_reason} for c in out.outputs]
            return {**base, "choices": choices, "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs),
                                                                 out.num_cached_tokens)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        chunk = {**base, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        async def chunks():
            sent: dict = {}
            cur = out
            for i in range(req.n):  # the role comes first, as OpenAI sends it
                yield {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra}
            called: set = set()
            while cur is not None:
                for c, chars, toks, fin in new_parts(cur, sent):
                    delta = {"content": c.text[chars:]} if len(c.text) > chars or not fin else {}
                    if forced and forced != "*" and delta:
                        # A named function's arguments stream as they are written: the call's id,
                        # type and name come with the first piece, as in OpenAI's deltas.
                        call = {"index": 0, "function": {"arguments": delta["content"]}}
                        if c.index not in called:
                            called.add(c.index)
                            call.update(id=f"chatcmpl-tool-{uuid.uuid4().hex}", type="function")
                            call["function"] = {"name": forced, **call["function"]}
                        delta = {"tool_calls": [call]}
                    elif forced == "*":
                        # 'required': the calls are a JSON list, sent whole once it is complete.
                        calls = tool_calls(forced, c.text) if fin else None
                        delta = ({"tool_calls": [{"index": k, **tc} for k, tc in enumerate(calls)]} if calls
                                 else {"content": c.text} if fin else {})
                        if not delta and c.logprobs is None:
                            continue
                    tail = ({"usage": usage(len(ids), sum(len(x.token_ids) for x in cur.outputs), cur.num_cached_tokens)}
                            if continuous else extra)
                    yield {**chunk, "choices": [{"index": c.index, "delta": delta, "logprobs": chat_logprobs(state, c, toks, top),
                                                 "finish_reason": finish(c) if fin else None}], **tail}
                if cur.finished:
                    break
                cur = await stream.__anext__()
            if include_usage and cur is not None:
                yield {**chunk, "choices": [], "usage": usage(len(ids), sum(len(c.token_ids) for c in cur.outputs),
                                                                      cur.num_cached_tokens)}

        return sse_response(chunks(), streams)

    return r
