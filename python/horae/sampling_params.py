"""How to sample a request, as vLLM's `SamplingParams`."""

from __future__ import annotations

import enum
import json as _json
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from horae.checks import field_error, is_int


@dataclass
class StructuredOutputsParams:
    """What the output must match, as vLLM's `StructuredOutputsParams`: exactly one of a JSON
    schema (`json`, a dict or its JSON text), any JSON object (`json_object=True`), a regular
    expression (`regex`, matched whole), one of some strings (`choice`) or a grammar (`grammar`,
    llguidance's Lark dialect or llama.cpp's GBNF). Each step draws only tokens that keep the text in that
    language, and the output ends where the language does. JSON is written on one line with
    `", "` and `": "` unless the schema's `"x-guidance"` key says otherwise. The core compiles
    it when the request is added (a `ValueError` naming `structured_outputs` if it cannot).

    `start_after` (horae's; what vLLM does with a reasoning parser): the text is free until the
    output writes this tag, e.g. a reasoning model's `"</think>"`, and in the language after it."""

    json: Optional[Union[str, Dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    start_after: Optional[str] = None

    def __post_init__(self):
        if self.start_after is not None and not (isinstance(self.start_after, str) and self.start_after):
            raise TypeError(f"structured_outputs: start_after must be a non-empty string, got {self.start_after!r}")
        given = [f.name for f in fields(self) if f.name != "start_after" and getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: give exactly one of json, regex, choice, grammar, json_object"
                             f" (got {', '.join(given) or 'none'})")
        kind = given[0]
        v = getattr(self, kind)
        ok = {"json": isinstance(v, (str, dict)), "regex": isinstance(v, str), "grammar": isinstance(v, str),
              "choice": isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v),
              "json_object": v is True}[kind]
        if not ok:
            want = {"json": "a JSON schema (dict or str)", "choice": "a list of strings",
                    "json_object": "True"}.get(kind, "a string")
            raise TypeError(f"structured_outputs: {kind} must be {want}, got {v!r}")

    def core_arg(self) -> Tuple[str, str]:
        """(kind, text) as the core parses it."""
        if self.json is not None:
            return "json", self.json if isinstance(self.json, str) else _json.dumps(self.json)
        if self.choice is not None:
            return "choice", _json.dumps(list(self.choice))
        if self.json_object:
            return "json_object", ""
        return ("regex", self.regex) if self.regex is not None else ("grammar", lark(self.grammar))


def lark(grammar: str) -> str:
    """A grammar in llguidance's Lark dialect: as given, or converted from llama.cpp's GBNF
    (`root ::= ...`, what vLLM's structured-output examples and llama.cpp users write), as
    vLLM's llguidance backend reads its `grammar` (llguidance's own converter)."""
    try:
        from llguidance.gbnf_to_lark import any_to_lark
    except ImportError:  # Python 3.9, which llguidance's wheels leave out (a dependency from 3.10)
        if "::=" in grammar:
            raise field_error("structured_outputs: a GBNF grammar needs the llguidance package (Python >= 3.10); "
                              "write it in Lark here", "structured_outputs") from None
        return grammar
    try:
        return any_to_lark(grammar)
    except Exception as e:  # the converter raises plain Exceptions for a missing root or rule
        raise field_error(f"structured_outputs: cannot read the grammar as Lark or GBNF: {e}",
                          "structured_outputs") from None


class RequestOutputKind(enum.IntEnum):
    """What each of `AsyncLLM.generate`'s outputs holds, as vLLM's: everything so far
    (`CUMULATIVE`, the default), only what is new since the last one (`DELTA`: text, token ids and
    logprobs; the prompt's logprobs with the first), or only the finished output (`FINAL_ONLY`)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


#: The most samples one request may ask for (`n`). Each is a request of the engine's, with outputs
#: of its own, made when the call is: n = 10**7 would take gigabytes before a token is computed,
#: and a larger one ends the process. OpenAI's API takes up to 128 and vLLM sets no bound; best-of-N
#: evaluations (pass@k) ask for a few hundred.
MAX_SAMPLES = 4096


def check_samples(n: Any) -> None:
    """`n` as a request may ask for: at `SamplingParams`' making, and again when a request is
    queued (the fields can be set after)."""
    if not is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be an integer 1-{MAX_SAMPLES}, got {n!r}")


@dataclass
class SamplingParams:
    """How to sample, as in vLLM. `temperature=0` is greedy; `seed` makes sampling reproducible.

    Values are checked once, by the core, when a request is added (a `ValueError` that names the
    field); here only `n` (the samples this front end fans out) and the spelling of `stop`."""

    n: int = 1
    #: None: up to the end of the model's context.
    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    #: 0 or -1: off.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    #: Keep the stop string (or the stop token's text) that ended the output in its text.
    include_stop_str_in_output: bool = False
    #: Leave special tokens' text out of the output's text (`ignore_eos=True` with False shows
    #: the end-of-turn tokens the model wrote).
    skip_special_tokens: bool = True
    #: vLLM's detokenize: False leaves the output's text empty (token ids only, as an RL rollout
    #: or a scorer reads them); stop strings then cannot be used.
    detokenize: bool = True
    #: Report log-probabilities of each output token and of this many most likely alternatives.
    logprobs: Optional[int] = None
    #: End-of-sequence and stop strings/ids are ignored until this many tokens are generated.
    min_tokens: int = 0
    #: Report each prompt token's log-probability and this many alternatives (no prefix caching).
    prompt_logprobs: Optional[int] = None
    #: This request's latency bounds in seconds, any of "ttft", "max_itl", "tpot", "e2e" (the
    #: engine's `slo` fills the rest). It is judged on them, and `queue="slo"` schedules by them.
    slo: Optional[Dict[str, float]] = None
    #: vLLM's priority: lower values are served first (ties in arrival or SLO order).
    priority: int = 0
    #: OpenAI's and vLLM's logit bias: {token_id: bias}, each bias in [-100, 100] added to that
    #: token's logit before sampling (-100 all but bans a token, 100 all but forces it). Logprobs
    #: are reported from the logits before it, as vLLM's are.
    logit_bias: Optional[Dict[int, float]] = None
    #: vLLM's allowed_token_ids: only these tokens can be drawn (None: any).
    allowed_token_ids: Optional[List[int]] = None
    #: vLLM's bad_words: words the output must not contain, each as written at the start of the
    #: text and after a space (the last token of a word cannot be drawn after the ones before it).
    bad_words: Optional[List[str]] = None
    #: vLLM's truncate_prompt_tokens: a longer prompt keeps only its last k tokens (left
    #: truncation, as vLLM's); -1: as many as the context leaves after `max_tokens` (vLLM's -1
    #: keeps the whole context, which leaves nothing to generate). None: never truncated.
    truncate_prompt_tokens: Optional[int] = None
    #: vLLM's structured output: what the text must match (a `StructuredOutputsParams`, or a
    #: dict of its fields).
    structured_outputs: Optional[StructuredOutputsParams] = None
    #: vLLM's: what each streamed output holds (`RequestOutputKind`; `AsyncLLM.generate`).
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self):
        check_samples(self.n)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):  # the binding's refusal would name no field
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))) or not all(isinstance(s, str) for s in self.stop or []):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple, type(None))) or not all(is_int(t) for t in ids or []):
            raise TypeError(f"stop_token_ids must be a list of integers, got {ids!r}")
        self.stop_token_ids = list(ids or [])
        words = self.bad_words
        if not isinstance(words, (list, tuple, type(None))) or not all(isinstance(w, str) for w in words or []):
            raise TypeError(f"bad_words must be a list of strings, got {words!r}")
        self.bad_words = list(words or [])
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                if "unexpected keyword" not in str(e):
                    raise
                raise TypeError(f"structured_outputs: {e}; its fields are json, regex, choice, grammar, json_object") from None
        if not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(f"output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY), "
                             f"got {self.output_kind!r}") from None

    def kept_prompt(self, prompt_token_ids: List[int], limit: int) -> List[int]:
        """The prompt tokens a request reads: the last `truncate_prompt_tokens` of them, where one
        request holds at most `limit` tokens (the engine's `max_request_tokens`). A ValueError
        naming the field for a count that is not one, or that no request could hold (vLLM's)."""
        k, name = self.truncate_prompt_tokens, "truncate_prompt_tokens"
        if k is None:
            return prompt_token_ids
        if not is_int(k) or not (k == -1 or k >= 1):
            raise field_error(f"truncate_prompt_tokens must be -1 (what the context leaves after max_tokens) or an "
                              f"integer >= 1, got {k!r}", name)
        if k == -1:
            # max_tokens None runs to the end of the context: leave it one token.
            room = self.max_tokens if is_int(self.max_tokens) and self.max_tokens > 0 else 1
            if room >= limit:
                raise field_error(f"truncate_prompt_tokens -1 leaves no room for a prompt: max_tokens ({room}) "
                                  f"takes the whole context ({limit} tokens)", name)
            k = limit - room
        elif k > limit:
            raise field_error(f"truncate_prompt_tokens ({k}) is greater than the most tokens one request can hold "
                              f"({limit}); choose a smaller one", name)
        return prompt_token_ids[-int(k):] if len(prompt_token_ids) > k else prompt_token_ids


#: The engine reports at most 20 alternatives a token (vLLM's default `max_logprobs`), and each
#: step asks for 2 x beam_width of them.
MAX_BEAM_WIDTH = 10


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams` (`LLM.beam_search`, `beam_search.py`): `beam_width` beams
    (1-10) of up to `max_tokens` new tokens."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    #: horae's, for the server's `use_beam_search`: the text of samples without special tokens,
    #: and whether they report their tokens' logprobs (None: not).
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None

    def __post_init__(self):
        for name, low, high in (("beam_width", 1, MAX_BEAM_WIDTH), ("max_tokens", 1, None)):
            v = getattr(self, name)
            if not is_int(v):
                raise field_error(f"{name} must be an integer, got {v!r}", name, TypeError)
            if v < low or (high is not None and v > high):
                raise field_error(f"{name} must be {f'{low}-{high}' if high else f'at least {low}'}, got {v}", name)
        for name in ("temperature", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise field_error(f"{name} must be a number, got {v!r}", name, TypeError)
            if not math.isfinite(v):
                raise field_error(f"{name} must be a finite number, got {v!r}", name)
        if self.temperature < 0:
            raise field_error(f"temperature must be at least 0, got {self.temperature}", "temperature")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise field_error(f"{name} must be a bool, got {getattr(self, name)!r}", name, TypeError)
        if self.logprobs is not None and not (is_int(self.logprobs) and 0 <= self.logprobs <= 20):
            raise field_error(f"logprobs must be 0-20 (or None), got {self.logprobs!r}", "logprobs")
