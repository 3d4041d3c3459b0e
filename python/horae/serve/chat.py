"""`POST /v1/chat/completions`: the model's chat template, n samples, streamed or not, with the
chat logprobs format."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, List, Optional, Tuple

from fastapi import APIRouter, Request

from horae.outputs import RequestOutput
from horae.sampling_params import SamplingParams
from horae.serve.answer import Answer, answer_for
from horae.serve.errors import APIError
from horae.serve.protocol.chat import ChatCompletionRequest
from horae.serve.state import ServerState, cancel_on_disconnect, new_parts, token_name, usage, vllm_logprobs
from horae.serve.streaming import sse_response


def chat_logprobs(c, start: int, top: int, as_ids: bool, token_bytes: Callable[[int], bytes]) -> Optional[dict]:
    """OpenAI's chat logprobs of sample `c`'s tokens from `start`, `top` alternatives each;
    `as_ids` (vLLM's return_tokens_as_token_ids) names each token "token_id:N". A token's
    `bytes` are its own (`token_bytes`), as OpenAI's: a token holding part of a character is
    named by a replacement character, and only its bytes say which part."""
    if c.logprobs is None:
        return None

    def token(t: int, lp) -> dict:
        name = token_name(t, lp.decoded_token, as_ids)
        return {"token": name, "logprob": lp.logprob, "bytes": list(name.encode() if as_ids else token_bytes(t))}

    content = []
    for t, d in zip(c.token_ids[start:], c.logprobs[start:]):
        alts = sorted(d.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({**token(t, d[t]), "top_logprobs": [token(a, v) for a, v in alts]})
    return {"content": content}


async def start_chat(state: ServerState, req, prefix: str) -> Tuple[Answer, List[int], Any, Optional[RequestOutput]]:
    """Start one chat request (`ChatCompletionRequest`, or a Responses request's chat form): how
    its answers are read, the prompt's token ids as the engine keeps them, the output stream and
    its first output. Every refusal is an `APIError`, raised before anything is sent."""
    state.check_model(req.model)
    answer = answer_for(req, state.config)
    ids = state.encode(state.chat_prompt(req), "messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = req.top_logprobs or 0
    try:
        params = state.sampling(req, max_tokens, top if req.logprobs else None, req.prompt_logprobs)
        if answer.keep_special_tokens:
            params.skip_special_tokens = False  # the parsers read the model's tags as it wrote them
        if isinstance(params, SamplingParams) and answer.reasoning is not None and params.structured_outputs is not None:
            # A grammar (response_format, a forced tool call) holds the answer, not the thinking
            # before it: it starts where the reasoning ends, as vLLM's does.
            params.structured_outputs.start_after = answer.reasoning.END
        state.check_capacity(1)
        streams, (out,) = await state.start_all(prefix, [ids], [params], req.cache_salt)
    except APIError as e:
        # The engine's logprobs is this route's top_logprobs, and its grammar came from one of the
        # body's fields: name the field the client sent.
        raise e.renamed({"logprobs": "top_logprobs", "structured_outputs": req.grammar_field()}) from None
    if out is not None:
        ids = out.prompt_token_ids  # what the model reads: truncate_prompt_tokens may cut it
    return answer, ids, streams[0], out


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    @cancel_on_disconnect
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        answer, ids, stream, out = await start_chat(state, req, "chatcmpl")
        streams, top, as_ids = [stream], req.top_logprobs or 0, state.tokens_as_ids(req)

        def logprobs(c, start: int) -> Optional[dict]:
            return chat_logprobs(c, start, top, as_ids, state.llm.token_bytes)

        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": state.config.model_name}
        if not req.stream:
            (out,) = await state.final_outputs([stream], [out])
            choices = [{"index": c.index, "message": answer.message(c.text), "logprobs": logprobs(c, 0),
                        "finish_reason": answer.finish_reason(c.text, c.finish_reason), "stop_reason": c.stop_reason}
                       for c in out.outputs]
            vllm_fields = {} if req.prompt_logprobs is None else {"prompt_logprobs": vllm_logprobs(out.prompt_logprobs)}
            if req.return_token_ids:
                vllm_fields["prompt_token_ids"] = ids
                for choice, c in zip(choices, out.outputs):
                    choice["token_ids"] = c.token_ids
            return {**base, "choices": choices, "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs),
                                                                 out.num_cached_tokens), **vllm_fields}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        chunk = {**base, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        async def chunks():
            sent: dict = {}
            cur = out
            for i in range(req.n):  # the role comes first, as OpenAI sends it
                ids_first = {"prompt_token_ids": ids} if req.return_token_ids and i == 0 else {}
                yield {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra, **ids_first}
            deltas = [answer.stream() for _ in range(req.n)]
            while cur is not None:
                for c, _, toks, fin in new_parts(cur, sent):
                    delta = deltas[c.index].delta(c.text, fin)
                    if not delta and not fin and c.logprobs is None and not req.return_token_ids:
                        continue  # nothing decided yet (a tag that may be starting)
                    tail = ({"usage": usage(len(ids), sum(len(x.token_ids) for x in cur.outputs), cur.num_cached_tokens)}
                            if continuous else extra)
                    end = answer.finish_reason(c.text, c.finish_reason) if fin else None
                    choice = {"index": c.index, "delta": delta, "logprobs": logprobs(c, toks), "finish_reason": end}
                    if req.return_token_ids:
                        choice["token_ids"] = c.token_ids[toks:]
                    yield {**chunk, "choices": [choice], **tail}
                if cur.finished:
                    break
                cur = await stream.__anext__()
            if include_usage and cur is not None:
                yield {**chunk, "choices": [], "usage": usage(len(ids), sum(len(c.token_ids) for c in cur.outputs),
                                                                      cur.num_cached_tokens)}

        return sse_response(chunks(), streams)

    return r
