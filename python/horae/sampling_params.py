"""How to sample a request, as vLLM's `SamplingParams`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from horae.checks import is_int


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

    def __post_init__(self):
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))) or not all(isinstance(s, str) for s in self.stop or []):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple, type(None))) or not all(is_int(t) for t in ids or []):
            raise TypeError(f"stop_token_ids must be a list of integers, got {ids!r}")
        self.stop_token_ids = list(ids or [])
