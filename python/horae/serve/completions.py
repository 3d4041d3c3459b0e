"""`POST /v1/completions`: one or several prompts (text or token ids), n samples each, streamed
or not, with the legacy logprobs format."""

from __future__ import annotations

import time
import uuid
from typing import Optional

from fastapi import APIRouter, Request

from horae.serve.errors import APIError
from horae.serve.protocol import CompletionRequest
from horae.serve.state import ServerState, new_parts, usage
from horae.serve.streaming import sse_response

MAX_PROMPTS = 16


def completion_logprobs(state: ServerState, c, start: int, offset0: int) -> Optional[dict]:
    if c.logprobs is None:
        return None
    toks, lps, tops, offsets = [], [], [], []
    pos = offset0
    for t, d in zip(c.token_ids[start:], c.logprobs[start:]):
        s = state.piece(t)
        toks.append(s)
        lps.append(d[t])
        tops.append({state.piece(a): v for a, v in d.items()})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        state.check_model(req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or all(isinstance(x, int) for x in p) else list(p)
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        ids_list = [state.encode(x, "prompt") if isinstance(x, str) else list(x) for x in prompts]
        params = [state.sampling(req, req.max_tokens, req.logprobs) for _ in ids_list]
        state.check_capacity(len(prompts))
        streams, firsts = await state.start_all("cmpl", ids_list, params)
        n = req.n
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": state.config.model_name}
        prompt_tokens = sum(map(len, ids_list))
        if not req.stream:
            choices, completion_tokens = [], 0
            for i, (s, out) in enumerate(zip(streams, firsts)):
                out = await state.final_output(s, out, raw)
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    choices.append({"index": i * n + c.index, "text": c.text,
                                    "logprobs": completion_logprobs(state, c, 0, 0),
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            return {**base, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # vLLM's continuous_usage_stats: every chunk carries the token counts so far (what a
        # benchmark client needs to stop at an exact length).
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        async def chunks():
            totals = [0] * len(streams)
            for i, (s, out) in enumerate(zip(streams, firsts)):
                sent: dict = {}
                while out is not None:
                    for c, chars, toks, fin in new_parts(out, sent):
                        choice = {"index": i * n + c.index, "text": c.text[chars:],
                                  "logprobs": completion_logprobs(state, c, toks, chars),
                                  "finish_reason": c.finish_reason if fin else None,
                                  "stop_reason": c.stop_reason if fin else None}
                        so_far = sum(len(x.token_ids) for x in out.outputs)
                        tail = ({"usage": usage(len(ids_list[i]), so_far)} if continuous
                                else {"usage": None} if include_usage else {})
                        yield {**base, "choices": [choice], **tail}
                    totals[i] = sum(len(c.token_ids) for c in out.outputs)
                    if out.finished:
                        break
                    out = await s.__anext__()
            if include_usage:
                yield {**base, "choices": [], "usage": usage(prompt_tokens, sum(totals))}

        return sse_response(chunks(), streams)

    return r
