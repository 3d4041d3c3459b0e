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

import uuid
from typing import Optional

from horae.serve.errors import APIError
from horae.serve.tool_parsers import Reading, json_calls, tool_parser


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class Named:
    #: As vLLM: a named function's call ends as its text did ("stop"), the others in "tool_calls".
    ends_in_tool_calls = False
    keep_special_tokens = False

    def __init__(self, name: str):
        self.name = name

    def split(self, text: str, final: bool) -> Reading:
        # The arguments are sent as they are written (none yet: a reasoning model still thinking).
        return "", [(self.name, text)] if text else []


class Required:
    """The list is written under its schema, each call `{"name": ..., "parameters": {...}}` with the
    name first, so a call's arguments can be sent as they are written, as a named call's are: the
    last call's arguments are open (still written) until they parse as a whole JSON value."""

    ends_in_tool_calls = True
    keep_special_tokens = False

    def split(self, text: str, final: bool) -> Reading:
        # The list's calls as `tool_parsers.json_calls` reads any JSON calls, named first.
        calls, _ = json_calls(text, ",[]", ("parameters",))
        # Cut before any call's arguments began (max_tokens): the text as it is.
        return ("", calls) if calls or not final else (text, [])


class Auto:
    """`parallel` false (OpenAI's `parallel_tool_calls`): the model's first call only, as the
    required list's grammar then allows one."""

    ends_in_tool_calls = True

    def __init__(self, parser, parallel: bool = True):
        self.parser, self.keep_special_tokens, self.parallel = parser, parser.keep_special_tokens, parallel

    def split(self, text: str, final: bool) -> Reading:
        content, calls = self.parser.split(text, final)
        return content, calls if self.parallel else calls[:1]


def reader_for(req, parser_name: Optional[str]):
    """How the request's answers become tool calls (None: they do not). "auto" (also the default
    when tools are given, as in OpenAI's API and vLLM's) needs the server's parser."""
    forced = req.forced_tool()  # the same reading of tool_choice as the grammar's (`structured`)
    if forced is not None:
        return Required() if forced == "*" else Named(forced)
    if req.tool_choice != "auto":
        return None
    if parser_name is None:
        raise APIError(400, '"auto" tool choice (the default when tools are given) requires the server to be '
                            'started with --enable-auto-tool-choice and --tool-call-parser; or send tool_choice '
                            '"none", "required" or a named function', param="tool_choice")
    return Auto(tool_parser(parser_name), parallel=req.parallel_tool_calls is not False)
