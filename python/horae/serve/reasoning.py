"""A reasoning model's thinking, apart from its answer (vLLM's `--reasoning-parser`): the chat
route returns it as `reasoning` (and `reasoning_content`, its older name in vLLM and DeepSeek's
API) beside `content`.

Like the tool-call parsers (tool_parsers.py), a parser reads an answer as (reasoning, content),
while it is written giving only what is decided, so a stream's deltas add up to the whole."""

from __future__ import annotations

from typing import Tuple

from horae.serve.tool_parsers import held


class DeepSeekR1:
    """`<think>` ... `</think>` then the answer: DeepSeek-R1's distilled Qwen2 and Llama models and
    QwQ. Their chat templates open `<think>` in the prompt, so the text starts inside the thinking
    (a leading `<think>` the model writes itself is dropped); an answer that never closes it is all
    thinking (a thinking model cut by max_tokens), as vLLM reads it."""

    name = "deepseek_r1"
    START, END = "<think>", "</think>"
    #: The tags are added tokens of these vocabularies: the text must keep them to be read.
    keep_special_tokens = True

    def split(self, text: str, final: bool) -> Tuple[str, str]:
        if text.startswith(self.START):
            text = text[len(self.START):]
        elif not final and self.START.startswith(text):
            return "", ""
        end = text.find(self.END)
        if end < 0:
            return (text if final else text[:len(text) - held(text, self.END)]), ""
        return text[:end], text[end + len(self.END):]


REASONING_PARSERS = {p.name: p for p in (DeepSeekR1,)}


def reasoning_parser(name: str):
    """The parser called `name`; a ValueError naming the choices for any other."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]()
