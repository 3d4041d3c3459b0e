"""Tool calls in a model's own format, for `tool_choice` "auto" (vLLM's `--tool-call-parser`):
the model decides whether to call, so its text is read after it is written, not constrained.

A parser reads an answer as (content, calls), each call a (name, arguments as JSON text) pair.
While the answer is still being written (`final` false) it gives only what is decided: text that
may still turn out to open a call is held back, and a call is given once it is decided. A call
that starts `{"name": ..., "arguments": {` (the name first, as these models write it) is decided
there: it is given with its arguments as written so far, which grow as the model writes them
(vLLM streams them too), and stays a call whatever follows. Any other call is given once it is
complete. So the reading of a prefix is a prefix of the reading of the whole (each call's
arguments a prefix of its final ones), and a stream of deltas adds up to the whole answer
(`answer.Stream`). Text that looks like a call but does not parse as one stays in the content:
nothing the model wrote is dropped but the JSON around a streamed call's arguments."""

from __future__ import annotations

import json
import re
from typing import List, Optional, Tuple

Call = Tuple[str, str]
Reading = Tuple[str, List[Call]]


def _call(obj, args_keys: Tuple[str, ...]) -> Optional[Call]:
    """A {"name": ..., <args key>: {...}} object as a call; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments already as JSON text
        return obj["name"], args
    return (obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


#: The start of a call whose name comes first, up to its arguments' opening brace.
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def _head(text: str, pos: int) -> Optional[Tuple[str, int]]:
    """(name, where its arguments start) of a call whose head (`HEAD`) is at `pos`, or None."""
    m = HEAD.match(text, pos)
    if m is None:
        return None
    try:
        return json.loads(m.group(1)), m.end()
    except ValueError:  # an escape JSON does not have
        return None


def _value_end(text: str, pos: int) -> Optional[int]:
    """Where the JSON value at `pos` ends; None while it is not whole (or is not JSON)."""
    try:
        return _DECODER.raw_decode(text, pos)[1]
    except ValueError:
        return None


_DECODER = json.JSONDecoder()


def held(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class Hermes:
    """Hermes 2 Pro / 3 and Qwen2.5 (of the models horae runs) and others trained on their format:
    each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, free text before it."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    #: `<tool_call>` is a special token in some of these vocabularies (vLLM keeps them too).
    keep_special_tokens = True

    def split(self, text: str, final: bool) -> Reading:
        content, calls, pos = "", [], 0
        while True:
            start = text.find(self.START, pos)
            piece = text[pos:] if start < 0 else text[pos:start]
            if calls:  # the line breaks between calls and after the last are not content
                piece = piece.lstrip()
            if start < 0:
                return content + (piece if final else piece[:len(piece) - held(piece, self.START)]), calls
            content += piece
            call, pos = self._call(text, start, final)
            if isinstance(call, str):
                content += call
            elif call is not None:
                calls.append(call)
            if pos is None:  # the rest is still being written
                return content, calls

    def _call(self, text: str, start: int, final: bool):
        """The tagged call at `start`: (a call, or the text where it is none, or None while
        undecided; where reading goes on, None while the call is still written)."""
        at = start + len(self.START)
        head = _head(text, at)
        if head is not None:
            name, args = head
            stop = _value_end(text, args)
            if stop is None:
                # Still written; or, once the answer is done, broken, the arguments ending at the
                # end tag. Until then nothing past a possible end tag is sent (it may be inside a
                # string of the arguments).
                end = text.find(self.END, args)
                if not final:
                    return (name, text[args:end if end >= 0 else len(text) - held(text, self.END)]), None
                return (name, text[args:len(text) if end < 0 else end]), len(text) if end < 0 else end + len(self.END)
            end, after = text.find(self.END, stop), text.find(self.START, stop)
            if after >= 0 and (end < 0 or after < end):  # the end tag left out: the next call starts
                return (name, text[args:stop]), after
            if end < 0:
                return (name, text[args:stop]), (len(text) if final else None)
            return (name, text[args:stop]), end + len(self.END)
        end = text.find(self.END, at)
        if end < 0 and not final:  # a call not named first: given once it is whole
            return None, None
        stop = len(text) if end < 0 else end + len(self.END)  # cut by max_tokens: read what is there
        try:
            call = _call(json.loads(text[at:end if end >= 0 else len(text)]), ("arguments", "parameters"))
        except ValueError:
            call = None
        return (text[start:stop] if call is None else call), (None if end < 0 else stop)


class Llama3Json:
    """Llama 3.1-3.3's JSON tool calls: the whole answer is `{"name": ..., "parameters": {...}}`
    (several joined by ";"), after an optional `<|python_tag|>`; any other answer is content."""

    name = "llama3_json"
    TAG = "<|python_tag|>"
    keep_special_tokens = False

    def split(self, text: str, final: bool) -> Reading:
        s = text.lstrip()
        if s.startswith(self.TAG):
            s = s[len(self.TAG):]
        elif not s.startswith("{"):
            undecided = not final and self.TAG.startswith(s)  # nothing yet, or the tag's start
            return ("", []) if undecided else (text, [])
        calls, rest = json_calls(s, ";", ("parameters", "arguments"))
        # What is not a call is known only at the end: until then only whole calls are given.
        if not final:
            return "", calls
        return (rest, calls) if calls else (text, [])


class Mistral:
    """Mistral 7B Instruct v0.3's tool calls: `[TOOL_CALLS]` then a JSON list of
    `{"name": ..., "arguments": {...}}`, text before it content."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    #: `[TOOL_CALLS]` is a special token of its vocabulary.
    keep_special_tokens = True

    def split(self, text: str, final: bool) -> Reading:
        at = text.find(self.TAG)
        if at < 0:
            return (text if final else text[:len(text) - held(text, self.TAG)]), []
        calls, rest = json_calls(text[at + len(self.TAG):], ",[]", ("arguments", "parameters"))
        if not final:
            return text[:at], calls
        return (text[:at] + rest, calls) if calls else (text, [])


def json_calls(s: str, separators: str, args_keys: Tuple[str, ...]) -> Tuple[List[Call], str]:
    """The calls among the JSON values of `s` (between whitespace and `separators`), and the
    text that is not one (a value that is no call, or what does not parse: still being written,
    or not JSON), in order. A call named first is read from its head (`HEAD`): its arguments
    as written so far while they are, and nothing after them while they are."""
    calls, rest, pos = [], "", 0
    while True:
        while pos < len(s) and (s[pos].isspace() or s[pos] in separators):
            pos += 1
        if pos == len(s):
            return calls, rest
        head = _head(s, pos)
        if head is not None:
            name, args = head
            stop = _value_end(s, args)
            calls.append((name, s[args:] if stop is None else s[args:stop]))
            if stop is None:
                return calls, rest
            # On past the call's own end; past its arguments where the object around them is broken.
            end = _value_end(s, pos)
            pos = end if end is not None else stop
            continue
        try:
            obj, end = _DECODER.raw_decode(s, pos)
        except ValueError:
            return calls, rest + s[pos:]
        call = _call(obj, args_keys)
        if call is None:
            rest += s[pos:end]
        else:
            calls.append(call)
        pos = end


PARSERS = {p.name: p for p in (Hermes, Llama3Json, Mistral)}


def tool_parser(name: str):
    """The parser called `name`; a ValueError naming the choices for any other."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]()
