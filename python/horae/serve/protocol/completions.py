"""`POST /v1/completions`'s body."""

from __future__ import annotations

from typing import List, Optional, Union

from pydantic import Field, model_validator

from horae.serve.protocol.common import MAX_N, Body, FieldError, Int, SamplingFields


class CompletionRequest(Body, SamplingFields):
    prompt: Union[str, List[str], List[Int], List[List[Int]]]
    max_tokens: Optional[Int] = 16
    logprobs: Optional[Int] = None
    #: The prompt before the completion, with its logprobs when `logprobs` is set (the first
    #: token's is null); with `max_tokens` 0, the prompt alone: how lm-evaluation-harness scores
    #: a continuation's likelihood through an OpenAI-compatible server.
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _prompt(self):
        p = self.prompt
        if p == "" or p == [] or (isinstance(p, list) and any(x in ("", []) for x in p)):
            raise FieldError("prompt", "prompt must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of other than n is not supported")
        return self
