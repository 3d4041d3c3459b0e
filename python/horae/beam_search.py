"""Beam search, as vLLM's `LLM.beam_search` runs it: above the engine, one token a step. Each
live beam is a prompt of its tokens so far, asked for one token with its 2 x beam_width most likely
alternatives; of each prompt's extensions the beam_width best go on, and one that ends (an
end-of-sequence token) waits among the finished. The prefix cache keeps a step's cost to each
beam's last block. A beam's score is vLLM's: its cumulative log-probability over its length
(prompt included, a final end-of-sequence not) to the power `length_penalty`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

from horae.outputs import Logprob
from horae.sampling_params import BeamSearchParams


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

    def __init__(self, prompts: List[List[int]], params: BeamSearchParams, eos: Set[int], limit: int):
        self.params, self.eos, self.limit = params, set() if params.ignore_eos else set(eos), limit
        self.prompt_lens = [len(p) for p in prompts]
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.finished: List[List[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0

    def score(self, seq: BeamSearchSequence) -> float:
        length = len(seq.tokens) - (1 if seq.tokens[-1] in self.eos else 0)
        return seq.cum_logprob / (length ** self.params.length_penalty)

    def pending(self) -> List[List[int]]:
        if self.steps >= self.params.max_tokens:
            return []
        return [b.tokens for beams in self.live for b in beams]

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

    def outputs(self, decode: Callable[[List[int], bool], str]) -> List[BeamSearchOutput]:
        """Each prompt's best beams; `decode(tokens, skip_special_tokens)` gives their text."""
        out = []
        for live, finished in zip(self.live, self.finished):
            best = sorted(finished + live, key=self.score, reverse=True)[:self.params.beam_width]
            for seq in best:
                seq.finish_reason = seq.finish_reason or "length"
                shown = seq.tokens if seq.finish_reason != "stop" or self.params.include_stop_str_in_output \
                    else seq.tokens[:-1]
                seq.text = decode(shown, False)  # as vLLM's: special tokens shown
            out.append(BeamSearchOutput(best))
        return out
