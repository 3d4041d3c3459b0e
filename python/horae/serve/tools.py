"""Tool calls, for the three ways a request can ask for them (`reader_for` gives the reader of
its answers; answer.py makes OpenAI's message and deltas from what it reads):
- `Named` (a `tool_choice` naming a function): the text is that function's arguments, written
  under its schema (structured output);
- `Required` ("required"): the text is a JSON list of `{"name", "parameters"}` objects, under the
  schema `ChatCompletionRequest.structured` gives;
- `Auto` ("auto", with the server's `--tool-call-parser`): the model writes calls in its own
  format, or not, and a parser (tool_parsers.py) reads them.

Each reader reads an answer as (content, calls) with `split(text, final)`, giving while the answer
is still written only what is decided, so that a stream's deltas add up to the whole message."""

from __future__ import annotations

import json
import uuid
from typing import Optional

from horae.serve.errors import APIError
from horae.serve.tool_parsers import Reading, tool_parser


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
