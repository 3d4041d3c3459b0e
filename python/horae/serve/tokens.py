"""`POST /tokenize` and `POST /detokenize` (vLLM's)."""

from __future__ import annotations

from fastapi import APIRouter

from horae.serve.errors import bad_request
from horae.serve.protocol.tokens import DetokenizeRequest, TokenizeRequest
from horae.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        text = req.prompt if req.prompt is not None else state.chat_prompt(req)
        tokens = state.encode(text, "prompt" if req.prompt is not None else "messages", req.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    @r.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        try:
            return {"prompt": state.llm.decode(req.tokens)}
        except (TypeError, ValueError, OverflowError) as e:
            raise bad_request(e, "tokens") from None

    return r
