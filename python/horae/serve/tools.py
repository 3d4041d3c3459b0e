"""Tool calls as OpenAI answers them, from a forced call's text: a `tool_choice` naming a function
makes the text that function's arguments; `"required"` makes it a JSON list of
`{"name", "parameters"}` objects (the structured output `ChatCompletionRequest.structured` asks
for). Whole answers and stream deltas."""

from __future__ import annotations

import json
import uuid
from typing import List, Optional

#: `forced` for tool_choice "required" (any of the tools, one call or more).
ANY = "*"


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_calls(forced: str, text: str) -> Optional[List[dict]]:
    """A forced answer as OpenAI's `tool_calls`: the named function with the text as its
    arguments, or for "required" each call of the list; None where the text is not a complete
    list (cut by max_tokens)."""
    if forced != ANY:
        return [{"id": call_id(), "type": "function", "function": {"name": forced, "arguments": text}}]
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    return [{"id": call_id(), "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["parameters"])}}
            for c in calls]


def finish_reason(forced: Optional[str], reason: Optional[str]) -> Optional[str]:
    """As vLLM: "required" ends in "tool_calls"; a named function's call ends as its text did."""
    return "tool_calls" if forced == ANY and reason == "stop" else reason


def message(forced: Optional[str], text: str) -> dict:
    """The assistant's whole message: the calls, or the text where there are none."""
    calls = tool_calls(forced, text) if forced else None
    if calls is None:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": None, "tool_calls": calls}


class DeltaStream:
    """Stream deltas of one choice's forced answer: a named call's arguments as they are written,
    with its id, type and name in the first piece (as OpenAI's deltas); a "required" list whole,
    once it is complete."""

    def __init__(self, forced: str):
        self.forced, self.started = forced, False

    def delta(self, text: str, new: str, finished: bool) -> dict:
        """The delta for `new` text (the whole so far: `text`); empty where nothing is sent yet."""
        if self.forced == ANY:
            calls = tool_calls(ANY, text) if finished else None
            if calls:
                return {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
            return {"content": text} if finished else {}
        if not new:
            return {}
        call = {"index": 0, "function": {"arguments": new}}
        if not self.started:
            self.started = True
            call.update(id=call_id(), type="function", function={"name": self.forced, "arguments": new})
        return {"tool_calls": [call]}
