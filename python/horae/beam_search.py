"""Beam search, as vLLM's `LLM.beam_search` runs it: above the engine, one token a step. Each
live beam is a prompt of its tokens so far, asked for one token with its 2 x beam_width most likely
alternatives; of each prompt's extensions the beam_width best go on, and one that ends (an
end-of-sequence token) waits among the finished. The prefix cache keeps a step's cost to each
beam's last block. A beam's score is vLLM's: its cumulative log-probability over its length
(prompt included, a final end-of-sequence not) to the power `length_penalty`."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional, Set

from horae.outputs import CompletionOutput, Logprob, RequestOutput
from horae.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One beam, as vLLM's: `tokens` are the prompt's then the output's, `text` their text, the
    prompt's and special tokens included as vLLM decodes it (a final end-of-sequence token only with
    `include_stop_str_in_output`); `logprobs` one dict per output token (the token drawn and the
    alternatives asked for)."""

    tokens: List[int]
    logprobs: List[Dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None
    #: "stop" (it wrote an end-of-sequence token) or "length".
    finish_reason: Optional[str] = None


@dataclass
class BeamSearchOutput:
    """A prompt's best `beam_width` beams, best first."""

    sequences: List[BeamSearchSequence]


class BeamSearch:
    """The search's state over several prompts: `pending` is each step's batch (every live beam's
    tokens), `advance` takes their answers, `outputs` the best beams once nothing is pending."""

    def __init__(self, prompts: List[List[int]], params: BeamSearchParams, eos: Set[int], limit: int,
                 cache_salts: Optional[List[Optional[str]]] = None):
        self.params, self.eos, self.limit = params, set() if params.ignore_eos else set(eos), limit
        # A prompt's cache_salt goes with each of its beams' steps: its prefix cache stays its own.
        self.salts = [{} if s is None else {"cache_salt": s} for s in (cache_salts or [None] * len(prompts))]
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.finished: List[List[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0

    def score(self, seq: BeamSearchSequence) -> float:
        length = len(seq.tokens) - (1 if seq.tokens[-1] in self.eos else 0)
        # length ** length_penalty, its exponent held where a float neither overflows nor reaches
        # zero (past there the order of scores is settled anyway).
        return seq.cum_logprob / math.exp(max(-700.0, min(700.0, self.params.length_penalty * math.log(length))))

    def pending(self) -> List[dict]:
        """The step's prompts, one per live beam: its tokens so far (and its prompt's cache_salt)."""
        if self.steps >= self.params.max_tokens:
            return []
        return [{"prompt_token_ids": b.tokens, **salt} for beams, salt in zip(self.live, self.salts) for b in beams]

    def advance(self, answers: List[Dict[int, Logprob]]) -> None:
        """One step: `answers` holds, for each beam of `pending` in order, its next token's most
        likely choices."""
        given = iter(answers)
        for i, beams in enumerate(self.live):
            grown = []
            for beam in beams:
                choices = next(given)
                for token, lp in choices.items():
                    seq = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [choices], beam.cum_logprob + lp.logprob)
                    if token in self.eos:
                        seq.finish_reason = "stop"
                        self.finished[i].append(seq)
                    else:
                        grown.append(seq)
            grown.sort(key=self.score, reverse=True)
            kept = grown[:self.params.beam_width]
            # A beam at the context's end cannot grow: it ends here.
            self.finished[i] += [b for b in kept if len(b.tokens) >= self.limit]
            self.live[i] = [b for b in kept if len(b.tokens) < self.limit]
        self.steps += 1

    def step(self) -> SamplingParams:
        """The request each live beam makes at a step: one token and 2 x beam_width alternatives."""
        p = self.params
        return SamplingParams(max_tokens=1, logprobs=2 * p.beam_width, temperature=p.temperature, ignore_eos=True,
                              detokenize=False)

    def best(self, i: int) -> List[BeamSearchSequence]:
        """Prompt `i`'s best beams, best first, their finish reasons set."""
        best = sorted(self.finished[i] + self.live[i], key=self.score, reverse=True)[:self.params.beam_width]
        for seq in best:
            seq.finish_reason = seq.finish_reason or "length"
        return best

    def shown(self, seq: BeamSearchSequence) -> List[int]:
        """The tokens a beam's text shows: a final end-of-sequence only with include_stop_str_in_output."""
        return seq.tokens[:-1] if seq.finish_reason == "stop" and not self.params.include_stop_str_in_output else seq.tokens

    def outputs(self, decode: Callable[[List[int], bool], str]) -> List[BeamSearchOutput]:
        """Each prompt's best beams (`LLM.beam_search`); `decode(tokens, skip_special_tokens)` gives
        their text, the prompt's included with special tokens shown, as vLLM's."""
        out = []
        for i in range(len(self.live)):
            best = self.best(i)
            for seq in best:
                seq.text = decode(self.shown(seq), False)
            out.append(BeamSearchOutput(best))
        return out


async def beam_search_stream(generate, prompt_ids: List[int], params: BeamSearchParams, eos: Set[int], limit: int,
                             decode: Callable[[List[int], bool], str], request_id: str,
                             cache_salt: Optional[str] = None) -> AsyncIterator[RequestOutput]:
    """One prompt's beam search over an engine client's `generate(prompt, params, request_id)`
    (`AsyncLLM`'s, or the Ray ingress's): each step's beams run at once, and the stream's one
    output, when the search ends, holds the best beams as samples (their output tokens and text,
    as vLLM's server answers `use_beam_search`), so the server's routes read it as any request's.
    Every step's prompt carries `cache_salt`. Closing the stream closes the step's requests
    (which aborts them)."""
    search = BeamSearch([prompt_ids], params, eos, limit, [cache_salt])
    step, sent = search.step(), 0

    async def one(prompt: dict, rid: str) -> RequestOutput:
        stream, outs = generate(prompt, step, rid), []
        try:
            async for out in stream:
                outs.append(out)
        finally:
            await stream.aclose()
        return outs[-1]

    while True:
        batch = search.pending()
        if not batch:
            break
        outs = await asyncio.gather(*(one(t, f"{request_id}-beam{sent + k}") for k, t in enumerate(batch)))
        sent += len(batch)
        search.advance([o.outputs[0].logprobs[0] for o in outs])
    n = len(prompt_ids)
    samples = [CompletionOutput(i, decode(search.shown(seq)[n:], params.skip_special_tokens), seq.tokens[n:], seq.finish_reason,
                                None, None if params.logprobs is None else seq.logprobs, seq.cum_logprob)
               for i, seq in enumerate(search.best(0))]
    yield RequestOutput(request_id, None, list(prompt_ids), samples, finished=True)
