"""The model's tokenizer as HF transformers' tokenizers are called, which is what vLLM's
`LLM.get_tokenizer()` hands out: notebooks written for vLLM render a chat with
`tokenizer.apply_chat_template(...)` and count tokens with `tokenizer.encode(...)`. It is a view
over an engine's own tokenizer and chat template (the same ones requests go through), not a
second copy; HF's defaults are kept where they differ from the engine's (`encode` adds special
tokens, `decode` keeps them, `apply_chat_template` tokenizes and adds no generation prompt)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from horae.checks import token_ids as checked_ids

__all__ = ["Tokenizer"]


class Tokenizer:
    """A view of `engine`'s (a `horae.Engine`) tokenizer; `LLM.get_tokenizer()`,
    `AsyncLLM.get_tokenizer()` and `Engine.get_tokenizer()` give one."""

    def __init__(self, engine):
        self._source = engine
        config = engine.tokenizer_config
        self.eos_token, self.bos_token = _token(config.get("eos_token")), _token(config.get("bos_token"))
        self.model_max_length = config.get("model_max_length")

    @property
    def vocab_size(self) -> int:
        return self._source.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id(self.bos_token)

    def _id(self, token: Optional[str]) -> Optional[int]:
        """A special token's id (None where the model names none, or it is not one token)."""
        ids = self._source.encode(token, False) if token else []
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self._source.encode(text, add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._source.decode(checked_ids(token_ids, "token_ids"), skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> List[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True) -> Dict[str, Any]:
        """`{"input_ids": ...}` for one text or a list of them (no tensors, no padding)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def apply_chat_template(self, conversation: List[Dict[str, Any]], tools: Optional[List[Dict[str, Any]]] = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            continue_final_message: bool = False, chat_template: Optional[str] = None,
                            **kwargs: Any) -> Union[str, List[int]]:
        """HF's: the conversation through the model's chat template (or `chat_template`), as
        text or (`tokenize`, the default) token ids; more keyword arguments are the template's
        variables (e.g. `enable_thinking`)."""
        text = self._source.apply_chat_template(conversation, add_generation_prompt, tools, chat_template=chat_template,
                                                chat_template_kwargs=kwargs or None,
                                                continue_final_message=continue_final_message)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json names it: its text, or `{"content": text}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
