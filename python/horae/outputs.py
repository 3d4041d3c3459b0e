"""What callers get back (`RequestOutput`, `CompletionOutput`, named as vLLM's), and the one
output processor that builds them, which `Engine`, `AsyncLLM` and the server all go through. The
core decides everything about a request (stop tokens and strings, `min_tokens`, why it ended, what
text is safe to stream); the processor only fans a request out into its `n` samples and appends
each step's new tokens, text and logprobs to the outputs a caller reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union


@dataclass
class Logprob:
    """One token's log-probability at a position, as vLLM's `Logprob`: the log-softmax of the
    model's raw logits, the token's rank in the whole distribution (1: the most likely) and its
    text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


#: Per position, the chosen token's and the top alternatives' `Logprob`s by token id (vLLM's).
Logprobs = Dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str] = None
    #: The stop string or stop token id that ended the sample (None for end-of-sequence), or,
    #: with finish_reason "error", why it failed.
    stop_reason: Optional[Union[str, int]] = None
    #: Per output token, the chosen token's and the top alternatives' `Logprob`s by token id.
    logprobs: Optional[List[Logprobs]] = None
    cumulative_logprob: Optional[float] = None
    #: Speculative decoding, once finished: draft tokens verified for this sample, and accepted.
    num_draft_tokens: Optional[int] = None
    num_accepted_tokens: Optional[int] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = False
    #: As vLLM: None for the first prompt token, then the `Logprob`s by token id per prompt token.
    prompt_logprobs: Optional[List[Optional[Logprobs]]] = None
    #: As vLLM: prompt tokens read from the prefix cache when the request was first scheduled
    #: (None before then).
    num_cached_tokens: Optional[int] = None


class Deltas:
    """One stream's outputs as vLLM's `RequestOutputKind.DELTA` gives them: each sample's text,
    token ids and logprobs new since the last output taken (the prompt's logprobs with the first)."""

    def __init__(self):
        self._seen: Dict[int, tuple] = {}  # sample index -> (chars, tokens) already given
        self._first = True

    def take(self, out: RequestOutput) -> RequestOutput:
        outs = []
        for c in out.outputs:
            chars, toks = self._seen.get(c.index, (0, 0))
            self._seen[c.index] = (len(c.text), len(c.token_ids))
            outs.append(CompletionOutput(c.index, c.text[chars:], c.token_ids[toks:], c.finish_reason, c.stop_reason,
                                         None if c.logprobs is None else c.logprobs[toks:], c.cumulative_logprob,
                                         c.num_draft_tokens, c.num_accepted_tokens))
        first, self._first = self._first, False
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, outs, out.finished,
                             out.prompt_logprobs if first else None, out.num_cached_tokens)


@dataclass
class _Sample:
    """One of a request's n samples: a core request once submitted."""

    out: CompletionOutput
    core_id: Optional[int] = None  # None while held back until the first sample's prompt is computed


@dataclass
class _Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    samples: List[_Sample]
    prompt_logprobs: Optional[List[Optional[Logprobs]]] = None
    num_cached_tokens: Optional[int] = None

    def output(self) -> RequestOutput:
        # Held-back samples show as empty until they start; copies, so a caller's output does not
        # change under it.
        outs = [CompletionOutput(s.out.index, s.out.text, list(s.out.token_ids), s.out.finish_reason,
                                 s.out.stop_reason, None if s.out.logprobs is None else list(s.out.logprobs),
                                 s.out.cumulative_logprob, s.out.num_draft_tokens, s.out.num_accepted_tokens)
                for s in self.samples]
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outs,
                             all(s.out.finish_reason is not None for s in self.samples), self.prompt_logprobs,
                             self.num_cached_tokens)


class OutputProcessor:
    """Requests in flight by their caller's id, their samples by core id.

    `submit(index)` queues sample `index` of a request in the core and returns its core id. Only
    the first of n samples is submitted at once: the others wait until its first token, when the
    prompt's full KV blocks are computed and registered, so their admissions take them from the
    prefix cache instead of computing the prompt n times (vLLM v0's fork-after-prefill).
    """

    def __init__(self, piece: Callable[[int], str]):
        self._piece = piece  # a token's own text, for `Logprob.decoded_token`
        self._requests: Dict[str, _Request] = {}
        self._by_core: Dict[int, tuple] = {}
        self._submit: Dict[str, Callable[[int], int]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request_id: str, prompt: Optional[str], prompt_token_ids: List[int], n: int, logprobs: bool,
            submit: Callable[[int], int]) -> None:
        samples = [_Sample(CompletionOutput(i, "", [], logprobs=[] if logprobs else None,
                                            cumulative_logprob=0.0 if logprobs else None)) for i in range(n)]
        req = _Request(request_id, prompt, list(prompt_token_ids), samples)
        first = samples[0]
        first.core_id = submit(0)
        self._requests[request_id] = req
        self._by_core[first.core_id] = (req, first)
        self._submit[request_id] = submit

    def remove(self, request_id: str) -> List[int]:
        """Forget a request; returns the core ids still running, for the caller to abort."""
        req = self._requests.pop(request_id, None)
        self._submit.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request id {request_id!r}")
        live = []
        for s in req.samples:
            self._by_core.pop(s.core_id, None)
            if s.core_id is not None and s.out.finish_reason is None:
                live.append(s.core_id)
        return live

    def _release_held(self, req: _Request) -> None:
        submit = self._submit[req.request_id]
        for s in req.samples:
            if s.core_id is None and s.out.finish_reason is None:
                s.core_id = submit(s.out.index)
                self._by_core[s.core_id] = (req, s)

    def _logprobs(self, token: int, logprob: float, rank: int, top) -> Logprobs:
        """The core's `(token, logprob, rank, top)` as `Logprob`s by id, the chosen token first
        (a top token's rank is its place)."""
        d = {token: Logprob(logprob, rank, self._piece(token))}
        for place, (t, v) in enumerate(top, 1):
            if t != token:
                d[t] = Logprob(v, place, self._piece(t))
        return d

    def process(self, step_outputs) -> List[RequestOutput]:
        """Apply one step's `StepOutput`s; returns the outputs of the requests they touched (a
        finished request is forgotten)."""
        touched: Dict[str, _Request] = {}
        for o in step_outputs:
            entry = self._by_core.get(o.request_id)
            if entry is None:
                continue
            req, sample = entry
            touched[req.request_id] = req
            out = sample.out
            if out.index == 0 and (o.new_token_ids or o.finish_reason) and len(req.samples) > 1:
                # The prompt's KV now exists and the other samples share it (or the first sample
                # ended without a token, and the others must not wait for it).
                self._release_held(req)
            out.token_ids.extend(o.new_token_ids)
            out.text += o.new_text
            if out.logprobs is not None:
                for lps in o.new_logprobs:
                    out.logprobs.append(self._logprobs(*lps))
                    out.cumulative_logprob += lps[1]
            if out.index == 0:  # the request's prompt is the first sample's
                if o.prompt_logprobs:
                    req.prompt_logprobs = [None] + [self._logprobs(*lps) for lps in o.prompt_logprobs]
                if o.num_cached_tokens is not None:
                    req.num_cached_tokens = o.num_cached_tokens
            if o.finish_reason is not None:
                out.finish_reason = o.finish_reason
                out.stop_reason = o.error if o.finish_reason == "error" else o.stop_reason
                out.num_draft_tokens, out.num_accepted_tokens = o.num_draft_tokens, o.num_accepted_tokens
                self._by_core.pop(o.request_id, None)
        outs = []
        for rid, req in touched.items():
            out = req.output()
            if out.finished:
                self._requests.pop(rid, None)
                self._submit.pop(rid, None)
            outs.append(out)
        return outs
