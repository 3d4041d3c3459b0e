"""`POST /v1/completions`: one or several prompts (text or token ids), n samples each, streamed
or not, with the legacy logprobs format."""

from __future__ import annotations

import time
import uuid
from typing import List, Optional

from fastapi import APIRouter, Request

from horae.serve.errors import APIError
from horae.serve.protocol.completions import CompletionRequest
from horae.serve.state import ServerState, cancel_on_disconnect, new_parts, token_name, usage, vllm_logprobs
from horae.serve.streaming import sse_response

MAX_PROMPTS = 16


def legacy_logprobs(state: ServerState, token_ids, dicts, offset0: int, as_ids: bool = False) -> dict:
    """The completions API's logprobs of `token_ids` (their `Logprob`s by id, or None where there
    are none, as for an echoed prompt's first token), their text offsets counted from `offset0`.
    `as_ids` (vLLM's return_tokens_as_token_ids): each token named "token_id:N", not by its text."""
    toks, lps, tops, offsets = [], [], [], []
    pos = offset0
    for t, d in zip(token_ids, dicts):
        # Only an echoed prompt's first token has no `Logprob` (and so no text of its own).
        s = state.llm.decode([t], skip_special_tokens=False) if d is None else d[t].decoded_token
        toks.append(token_name(t, s, as_ids))
        lps.append(None if d is None else d[t].logprob)
        tops.append(None if d is None else {token_name(a, v.decoded_token, as_ids): v.logprob for a, v in d.items()})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_logprobs(state: ServerState, c, start: int, offset0: int, as_ids: bool) -> Optional[dict]:
    if c.logprobs is None:
        return None
    return legacy_logprobs(state, c.token_ids[start:], c.logprobs[start:], offset0, as_ids)


def joined(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """Two runs of logprobs one after the other (an echoed prompt's, then the completion's)."""
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


class Echo:
    """What `echo` puts before a choice's first text: the prompt, and its logprobs where asked
    (vLLM's behaviour). `prompt_logprobs` arrive with the first output, once the prompt is
    computed; an output that lacks them (none asked) leaves them out."""

    def __init__(self, state: ServerState, req: CompletionRequest, prompts: list, ids_list: List[List[int]]):
        self.state, self.on, self.logprobs = state, req.echo, req.logprobs is not None
        self.as_ids = state.tokens_as_ids(req)
        self.prompts, self.ids = prompts, ids_list

    def text(self, i: int) -> str:
        """Prompt `i` as sent, or its token ids decoded: only once the engine has taken them, so
        an id outside the vocabulary is the engine's 400, not a failure here."""
        p = self.prompts[i]
        if not isinstance(p, str):
            p = self.prompts[i] = self.state.llm.decode(self.ids[i], skip_special_tokens=False)
        return p

    def offset(self, i: int) -> int:
        """Where prompt `i`'s completion starts in the choice's text."""
        return len(self.text(i)) if self.on else 0

    def prefix(self, i: int, out) -> tuple:
        """(text, logprobs) of prompt `i` to put first, or ("", None)."""
        if not self.on:
            return "", None
        lps = None
        if self.logprobs and out.prompt_logprobs is not None:
            lps = legacy_logprobs(self.state, self.ids[i], out.prompt_logprobs, 0, self.as_ids)
        return self.text(i), lps


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions")
    @cancel_on_disconnect
    async def completions(req: CompletionRequest, raw: Request):
        state.check_model(req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or all(isinstance(x, int) for x in p) else list(p)
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        ids_list = [state.encode(x, "prompt") if isinstance(x, str) else list(x) for x in prompts]
        # `echo` with `max_tokens` 0 returns the prompt alone: one token is sampled (the prompt's
        # logprobs need its forward pass) and dropped, as vLLM does.
        prompt_only = req.echo and req.max_tokens == 0
        max_tokens = 1 if prompt_only else req.max_tokens
        # An echoed prompt's logprobs are the completion's kind (vLLM's).
        prompt_logprobs = req.prompt_logprobs if req.prompt_logprobs is not None else req.logprobs if req.echo else None
        params = [state.sampling(req, max_tokens, req.logprobs, prompt_logprobs) for _ in ids_list]
        echo = Echo(state, req, list(prompts), ids_list)
        state.check_capacity(len(prompts))
        try:
            streams, firsts = await state.start_all("cmpl", ids_list, params, req.cache_salt)
        except APIError as e:  # a grammar that does not compile: the body's field it came from
            raise e.renamed({"structured_outputs": req.grammar_field()}) from None
        for i, out in enumerate(firsts):  # what the model reads: truncate_prompt_tokens may cut a prompt
            if out is not None and len(out.prompt_token_ids) != len(ids_list[i]):
                ids_list[i] = out.prompt_token_ids  # (the list `echo` reads)
                echo.prompts[i] = None  # echoed as the kept tokens' text
        n = req.n
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": state.config.model_name}
        prompt_tokens = sum(map(len, ids_list))
        if not req.stream:
            choices, completion_tokens, cached = [], 0, 0
            for i, out in enumerate(await state.final_outputs(streams, firsts)):
                cached += out.num_cached_tokens or 0
                plp = {} if req.prompt_logprobs is None else {"prompt_logprobs": vllm_logprobs(out.prompt_logprobs)}
                for c in out.outputs:
                    token_ids = {"prompt_token_ids": ids_list[i], "token_ids": [] if prompt_only else c.token_ids} \
                        if req.return_token_ids else {}
                    text, lps = echo.prefix(i, out)
                    if not prompt_only:
                        completion_tokens += len(c.token_ids)
                        text += c.text
                        lps = joined(lps, completion_logprobs(state, c, 0, echo.offset(i), echo.as_ids))
                    choices.append({"index": i * n + c.index, "text": text, "logprobs": lps,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                    **plp, **token_ids})
            return {**base, "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # vLLM's continuous_usage_stats: every chunk carries the token counts so far (what a
        # benchmark client needs to stop at an exact length).
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        async def chunks():
            totals, cached = [0] * len(streams), [0] * len(streams)
            for i, (s, out) in enumerate(zip(streams, firsts)):
                sent: dict = {}
                while out is not None:
                    for c, chars, toks, fin in new_parts(out, sent):
                        # The prompt goes first in a choice's first chunk (`echo`).
                        text, lps = echo.prefix(i, out) if chars == toks == 0 else ("", None)
                        if not prompt_only:
                            text += c.text[chars:]
                            lps = joined(lps, completion_logprobs(state, c, toks, echo.offset(i) + chars, echo.as_ids))
                        elif not (text or fin):
                            continue
                        choice = {"index": i * n + c.index, "text": text, "logprobs": lps,
                                  "finish_reason": c.finish_reason if fin else None,
                                  "stop_reason": c.stop_reason if fin else None}
                        if req.return_token_ids:
                            if chars == toks == 0:
                                choice["prompt_token_ids"] = ids_list[i]
                            choice["token_ids"] = [] if prompt_only else c.token_ids[toks:]
                        so_far = 0 if prompt_only else sum(len(x.token_ids) for x in out.outputs)
                        tail = ({"usage": usage(len(ids_list[i]), so_far, out.num_cached_tokens)} if continuous
                                else {"usage": None} if include_usage else {})
                        yield {**base, "choices": [choice], **tail}
                    totals[i] = 0 if prompt_only else sum(len(c.token_ids) for c in out.outputs)
                    cached[i] = out.num_cached_tokens or 0
                    if out.finished:
                        break
                    out = await s.__anext__()
            if include_usage:
                yield {**base, "choices": [], "usage": usage(prompt_tokens, sum(totals), sum(cached))}

        return sse_response(chunks(), streams)

    return r
