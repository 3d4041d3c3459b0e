"""`POST /v1/responses`: OpenAI's Responses API, without state. The whole conversation comes in
`input`; nothing is stored, so there is no `previous_response_id`, retrieval or cancel (vLLM's
default too). A request is a chat request in another spelling (`ResponsesRequest.chat_fields`),
started by the chat route's `start_chat` and read by the same `Answer` (reasoning, text, tool
calls); only the answer's shape is this module's: output items, and streamed, the Responses API's
named events, each item added, written and done in turn."""

from __future__ import annotations

import time
import uuid
from typing import Callable, Dict, List, Optional

from fastapi import APIRouter, Request
from pydantic import ValidationError

from horae.serve.chat import chat_logprobs, start_chat
from horae.serve.errors import APIError, invalid_body
from horae.serve.protocol.chat import ChatCompletionRequest
from horae.serve.protocol.responses import ResponsesRequest
from horae.serve.state import ServerState, cancel_on_disconnect
from horae.serve.streaming import sse_response

#: A chat request's fields (and the engine's) by the Responses API's names, for refusals: the
#: whole field (a chat field's parts are not its: the messages' indices are not the input
#: items', with instructions first and calls merged).
_FIELD = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
          "response_format": "text.format", "logprobs": "top_logprobs"}


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request `req` is; what only the chat form refuses is a 400 naming `req`'s field."""
    try:
        return ChatCompletionRequest.model_validate(req.chat_fields())
    except ValidationError as e:
        raise invalid_body(e.errors()).renamed(_FIELD) from None


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Output:
    """One answer's output items, built from the chat stream's deltas (`answer.Stream`) in the
    order they are decided: reasoning, message text, function calls. An item is done when one of
    another kind begins, or at the end. Each change is also an event of the Responses stream,
    left in `events` for the route to number and send (a whole response drops them)."""

    def __init__(self):
        self.items: List[dict] = []
        self.events: List[dict] = []
        self.open: Optional[dict] = None
        self.calls: Dict[int, dict] = {}  # the chat stream's call index -> its item
        self.logprobs: List[dict] = []  # tokens' logprobs not yet on a message's text

    def _emit(self, kind: str, of: dict, **fields) -> None:
        where = {"output_index": self.items.index(of)}
        if kind not in ("output_item.added", "output_item.done"):
            where["item_id"] = of["id"]
        self.events.append({"type": f"response.{kind}", **where, **fields})

    def _begin(self, item: dict) -> dict:
        self.finish()
        self.items.append(item)
        self.open = item
        self._emit("output_item.added", item, item=_copy(item))
        if item["type"] != "function_call":
            self._emit("content_part.added", item, content_index=0, part=dict(item["content"][0]))
        return item

    def _current(self, kind: str) -> dict:
        if self.open is not None and self.open["type"] == kind:
            return self.open
        if kind == "reasoning":
            return self._begin({"id": _id("rs"), "type": "reasoning", "summary": [],
                                "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
        return self._begin({"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                            "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})

    def add(self, delta: dict, logprobs: List[dict]) -> None:
        """One chat delta (`reasoning`, `content`, `tool_calls` pieces) and its tokens' logprobs
        (they go with the message's text: the next text written, or the last message)."""
        self.logprobs += logprobs
        if delta.get("reasoning"):
            item = self._current("reasoning")
            item["content"][0]["text"] += delta["reasoning"]
            self._emit("reasoning_text.delta", item, content_index=0, delta=delta["reasoning"])
        if delta.get("content"):
            item = self._current("message")
            part, new = item["content"][0], self.logprobs
            part["text"] += delta["content"]
            part["logprobs"] += new
            self.logprobs = []
            self._emit("output_text.delta", item, content_index=0, delta=delta["content"], logprobs=new)
        for piece in delta.get("tool_calls", ()):
            fn = piece["function"]
            if "id" in piece:
                self.calls[piece["index"]] = self._begin({"id": _id("fc"), "type": "function_call", "call_id": piece["id"],
                                                          "name": fn["name"], "arguments": "", "status": "in_progress"})
            item, args = self.calls[piece["index"]], fn.get("arguments") or ""
            item["arguments"] += args
            if args and item is self.open:
                self._emit("function_call_arguments.delta", item, delta=args)

    def finish(self, status: str = "completed") -> None:
        """Close the item being written."""
        item, self.open = self.open, None
        if item is None:
            return
        if item["type"] == "function_call":
            self._emit("function_call_arguments.done", item, name=item["name"], arguments=item["arguments"])
        else:
            part = item["content"][0]
            if item["type"] == "message":
                self._emit("output_text.done", item, content_index=0, text=part["text"], logprobs=part["logprobs"])
            else:
                self._emit("reasoning_text.done", item, content_index=0, text=part["text"])
            self._emit("content_part.done", item, content_index=0, part=dict(part))
        item["status"] = status
        self._emit("output_item.done", item, item=_copy(item))

    def end(self, status: str) -> None:
        """The answer is whole: an answer with neither text nor calls is an empty message; logprobs
        not yet placed go on the last message's text."""
        if not any(i["type"] in ("message", "function_call") for i in self.items):
            self._current("message")
        if self.logprobs:
            last = [i for i in self.items if i["type"] == "message"]
            if last:
                last[-1]["content"][0]["logprobs"] += self.logprobs
            self.logprobs = []
        self.finish(status)


def _copy(item: dict) -> dict:
    """An item as sent now (the one kept goes on changing)."""
    return {**item, **({"content": [dict(p) for p in item["content"]]} if "content" in item else {})}


def reasoning_tokens(decode: Callable[[List[int]], str], token_ids: List[int], end_tag: str) -> int:
    """How many of the output tokens are reasoning: up to the one that completes `end_tag`, or
    all of them where it never comes (found by bisection: a prefix's text holds the tag or not)."""
    lo, hi = 0, len(token_ids)  # the first prefix whose text holds the tag lies in (lo, hi]
    if end_tag not in decode(token_ids):
        return len(token_ids)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if end_tag in decode(token_ids[:mid]) else (mid, hi)
    return hi


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/responses")
    @cancel_on_disconnect
    async def create_response(req: ResponsesRequest, raw: Request):
        chat = chat_request(req)
        try:
            answer, ids, stream, out = await start_chat(state, chat, "resp")
        except APIError as e:
            raise e.renamed(_FIELD) from None
        top, as_ids = chat.top_logprobs or 0, state.tokens_as_ids(chat)
        created = time.time()
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        response = {
            "id": _id("resp"), "object": "response", "created_at": created, "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
            "metadata": req.metadata or {}, "model": state.config.model_name, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": req.reasoning.model_dump() if req.reasoning else {"effort": None, "summary": None},
            "service_tier": req.service_tier or "auto", "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": (req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None
                            else req.tool_choice.model_dump()) or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "top_logprobs": req.top_logprobs or 0, "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled", "usage": None, "user": req.user}

        def logprobs(c, start: int) -> List[dict]:
            lp = chat_logprobs(c, start, top, as_ids, state.llm.token_bytes)
            return lp["content"] if lp else []

        def done(items: Output, final) -> dict:
            """The response once `final` (the last output) is whole."""
            c = final.outputs[0]
            cut = c.finish_reason == "length"
            items.end("incomplete" if cut else "completed")
            thought = 0
            if answer.reasoning is not None:
                thought = reasoning_tokens(lambda t: state.llm.decode(t, skip_special_tokens=False), c.token_ids,
                                           answer.reasoning.END)
            return {**response, "status": "incomplete" if cut else "completed", "completed_at": time.time(),
                    "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "output": items.items,
                    "usage": {"input_tokens": len(ids), "input_tokens_details": {"cached_tokens": final.num_cached_tokens or 0},
                              "output_tokens": len(c.token_ids), "output_tokens_details": {"reasoning_tokens": thought},
                              "total_tokens": len(ids) + len(c.token_ids)}}

        if not req.stream:
            (out,) = await state.final_outputs([stream], [out])
            items = Output()
            c = out.outputs[0]
            items.add(answer.stream().delta(c.text, True), logprobs(c, 0))
            return done(items, out)

        seq = 0

        def numbered(event: dict) -> dict:
            nonlocal seq
            seq += 1
            return {**event, "sequence_number": seq - 1}

        async def events():
            items, reader, sent, cur = Output(), answer.stream(), (0, 0), out
            yield numbered({"type": "response.created", "response": response})
            yield numbered({"type": "response.in_progress", "response": response})
            while cur is not None:
                c = cur.outputs[0]
                if (len(c.text), len(c.token_ids)) != sent or cur.finished:
                    items.add(reader.delta(c.text, cur.finished), logprobs(c, sent[1]))
                    sent = (len(c.text), len(c.token_ids))
                if cur.finished:
                    whole = done(items, cur)
                    for e in items.events:
                        yield numbered(e)
                    kind = "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
                    yield numbered({"type": kind, "response": whole})
                    return
                for e in items.events:
                    yield numbered(e)
                items.events = []
                cur = await stream.__anext__()

        def error_event(body: dict) -> dict:
            err = body["error"]
            return numbered({"type": "error", "code": err["code"], "message": err["message"], "param": err["param"]})

        return sse_response(events(), [stream], on_error=error_event, named=True)

    return r
