"""`POST /tokenize` and `/detokenize` bodies."""

from __future__ import annotations

from typing import List, Optional

from pydantic import model_validator

from horae.serve.protocol.chat import ChatMessage, ChatPrompt
from horae.serve.protocol.common import Body, FieldError, Int


class TokenizeRequest(Body, ChatPrompt):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        template = sorted(set(ChatPrompt.model_fields) & self.model_fields_set)
        if self.prompt is not None and template:
            raise FieldError(template[0], f"{', '.join(template)}: only with messages, not with a prompt")
        return self


class DetokenizeRequest(Body):
    model: Optional[str] = None
    tokens: List[Int]
