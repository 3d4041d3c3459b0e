"""Tool calls as OpenAI answers them, whole or as stream deltas, for the three ways a request can
ask for them (`reader_for` gives the reader of its answers):
- `Named` (a `tool_choice` naming a function): the text is that function's arguments, written
  under its schema (structured output);
- `Required` ("required"): the text is a JSON list of `{"name", "parameters"}` objects, under the
  schema `ChatCompletionRequest.structured` gives;
- `Auto` ("auto", with the server's `--tool-call-parser`): the model writes calls in its own
  format, or not, and a parser (tool_parsers.py) reads them.

Each reader reads an answer as (content, calls) with `split(text, final)`, giving while the answer is
still written only what is decided, so that `Stream`'s deltas add up to `message`'s answer."""

from __future__ import annotations

import json
import uuid
from typing import List, Optional

from horae.serve.errors import APIError
from horae.serve.tool_parsers import Call, Reading, tool_parser


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class Named:
    #: As vLLM: a named function's call ends as its text did ("stop"), the others in "tool_calls".
    ends_in_tool_calls = False
    keep_special_tokens = False

    def __init__(self, name: str):
        self.name = name

    def split(self, text: str, final: bool) -> Reading:
        return "", [(self.name, text)]  # the arguments are sent as they are written


class Required:
    ends_in_tool_calls = True
    keep_special_tokens = False

    def split(self, text: str, final: bool) -> Reading:
        if not final:
            return "", []
        try:
            return "", [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]
        except ValueError:  # cut by max_tokens: not a complete list, so the text as it is
            return text, []


class Auto:
    ends_in_tool_calls = True

    def __init__(self, parser):
        self.parser, self.keep_special_tokens = parser, parser.keep_special_tokens

    def split(self, text: str, final: bool) -> Reading:
        return self.parser.split(text, final)


def reader_for(req, parser_name: Optional[str]):
    """How the request's answers become tool calls (None: they do not). "auto" (also the default
    when tools are given, as in OpenAI's API and vLLM's) needs the server's parser."""
    c = req.tool_choice
    if c is None or c == "none":
        return None
    if c == "required":
        return Required()
    if c == "auto":
        if parser_name is None:
            raise APIError(400, '"auto" tool choice (the default when tools are given) requires the server to be '
                                'started with --enable-auto-tool-choice and --tool-call-parser; or send tool_choice '
                                '"none", "required" or a named function', param="tool_choice")
        return Auto(tool_parser(parser_name))
    return Named(c.function.name)


def _calls(calls: List[Call]) -> List[dict]:
    return [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]


def finish_reason(reader, text: str, reason: Optional[str]) -> Optional[str]:
    """"tool_calls" where the answer ended by itself with calls in it (not where max_tokens cut it)."""
    if reader is None or not reader.ends_in_tool_calls or reason != "stop":
        return reason
    return "tool_calls" if reader.split(text, True)[1] else reason


def message(reader, text: str) -> dict:
    """The assistant's whole message: its content (None where it is only calls) and calls."""
    if reader is None:
        return {"role": "assistant", "content": text}
    content, calls = reader.split(text, True)
    if not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content or None, "tool_calls": _calls(calls)}


class Stream:
    """One choice's deltas: content as it is decided, each call once with its id, type and name
    (and the arguments written so far), then any more of its arguments (a named call's)."""

    def __init__(self, reader):
        self.reader, self.content, self.sent = reader, 0, []  # per call sent: its arguments' length

    def delta(self, text: str, finished: bool) -> dict:
        """What is new in `text` (the whole answer so far); empty where nothing is sent yet."""
        content, calls = self.reader.split(text, finished)
        delta: dict = {}
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
