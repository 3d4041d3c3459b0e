"""One chat answer as OpenAI's chat route sends it: the model's reasoning (reasoning.py), its
content and its tool calls (tools.py), whole (`Answer.message`) or as stream deltas
(`Answer.stream`). The text is read in that order: the reasoning comes off first, and the rest is
content for the tool-call reader. Each reader gives, while the text is still written, only what
is decided, so the deltas add up to the whole message."""

from __future__ import annotations

from typing import List, Optional, Tuple

from horae.serve.reasoning import reasoning_parser
from horae.serve.tool_parsers import Call
from horae.serve.tools import call_id, reader_for


class Answer:
    """How one request's answers are read: `reader` (tools.py; None: no tool calls) and
    `reasoning` (a reasoning parser; None: no reasoning apart), `include_reasoning` false to
    leave the reasoning out of what is sent (vLLM's request field)."""

    def __init__(self, reader=None, reasoning=None, include_reasoning: bool = True):
        self.reader, self.reasoning, self.include_reasoning = reader, reasoning, include_reasoning

    @property
    def keep_special_tokens(self) -> bool:
        """Whether the readers need the text with the special tokens the model wrote (its tags)."""
        return any(p is not None and p.keep_special_tokens for p in (self.reader, self.reasoning))

    def split(self, text: str, final: bool) -> Tuple[str, str, List[Call]]:
        """(reasoning, content, calls) of `text`; while not `final`, what is decided."""
        thought, text = self.reasoning.split(text, final) if self.reasoning else ("", text)
        content, calls = self.reader.split(text, final) if self.reader else (text, [])
        return thought, content, calls

    def finish_reason(self, text: str, reason: Optional[str]) -> Optional[str]:
        """"tool_calls" where the answer ended by itself with calls in it (not where max_tokens cut it)."""
        if self.reader is None or not self.reader.ends_in_tool_calls or reason != "stop":
            return reason
        return "tool_calls" if self.split(text, True)[2] else reason

    def message(self, text: str) -> dict:
        """The assistant's whole message: content (None where it is only calls, or only
        reasoning), tool calls, reasoning."""
        thought, content, calls = self.split(text, True)
        m = {"role": "assistant", "content": (content or None) if (calls or self.reasoning) else content}
        if calls:
            m["tool_calls"] = [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                               for n, a in calls]
        if self.reasoning and self.include_reasoning:
            m["reasoning"] = m["reasoning_content"] = thought or None
        return m

    def stream(self) -> "Stream":
        return Stream(self)


def answer_for(req, config) -> Answer:
    """How the server (`config`: its tool-call and reasoning parsers) reads the answers to `req`."""
    reasoning = reasoning_parser(config.reasoning_parser) if config.reasoning_parser is not None else None
    return Answer(reader_for(req, config.tool_call_parser), reasoning, req.include_reasoning)


class Stream:
    """One choice's deltas: reasoning and content as they are decided, each call once with its id,
    type and name (and the arguments written so far), then any more of its arguments as they are
    written."""

    def __init__(self, answer: Answer):
        self.answer, self.thought, self.content, self.sent = answer, 0, 0, []  # per call: its arguments' length

    def delta(self, text: str, finished: bool) -> dict:
        """What is new in `text` (the whole answer so far); empty where nothing is sent yet."""
        thought, content, calls = self.answer.split(text, finished)
        delta: dict = {}
        if len(thought) > self.thought and self.answer.include_reasoning:
            delta["reasoning"] = delta["reasoning_content"] = thought[self.thought:]
        self.thought = len(thought)
        if len(content) > self.content:
            delta["content"], self.content = content[self.content:], len(content)
        pieces = []
        for k, (name, args) in enumerate(calls):
            if k == len(self.sent):
                pieces.append({"index": k, "id": call_id(), "type": "function",
                               "function": {"name": name, "arguments": args}})
                self.sent.append(len(args))
            elif len(args) > self.sent[k]:
                pieces.append({"index": k, "function": {"arguments": args[self.sent[k]:]}})
                self.sent[k] = len(args)
        if pieces:
            delta["tool_calls"] = pieces
        return delta
