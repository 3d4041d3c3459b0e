"""A model's chat template, rendered in a sandbox: the engine's and the replicas' ingress's one way
of turning messages into a prompt."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional


class ChatTemplateError(ValueError):
    """Messages or options the template cannot render, naming the argument (`field`) at fault."""

    def __init__(self, message: str, field: str = "messages"):
        super().__init__(message)
        self.field = field


#: Names the renderer gives the template; `chat_template_kwargs` may not set them.
RESERVED = ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "raise_exception")


def render_chat_template(model_dir: Path, tokenizer_config: Dict[str, Any], messages: List[Dict[str, Any]],
                         add_generation_prompt: bool = True, tools: Optional[List[Dict[str, Any]]] = None, *,
                         chat_template: Optional[str] = None, continue_final_message: bool = False,
                         chat_template_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """A chat template rendered in jinja2's sandbox: the engine's and the replicas' ingress's one
    way of doing it. The template is `chat_template` if given (a request's, or the server's
    --chat-template), else the model folder's (its `tokenizer_config.json`). As HF's
    `apply_chat_template`: `tools` (OpenAI's function definitions) reach the template, which may
    leave them out; `chat_template_kwargs` are more of its variables (e.g. a template's
    `enable_thinking`); `continue_final_message` ends the prompt inside the last message, so the
    model continues it (an assistant reply begun by the caller) instead of starting a new one."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"each message needs a string 'content': {m!r}")
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ChatTemplateError(f"bad role {m.get('role')!r}: use system, user, assistant or tool")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message continues the last message; it cannot also add a generation "
                                "prompt (set add_generation_prompt to false)", "continue_final_message")
    extra = dict(chat_template_kwargs or {})
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(clash)}: the renderer sets them",
                                "chat_template_kwargs")
    template = chat_template or tokenizer_config.get("chat_template")
    if not template:
        raise ChatTemplateError(f"{model_dir} has no chat template (give one: chat_template)", "chat_template")

    text = compiled(template).render(
        **extra, messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
        bos_token=tokenizer_config.get("bos_token") or "", eos_token=tokenizer_config.get("eos_token") or "")
    return _cut_after_final_message(text, messages[-1]["content"]) if continue_final_message else text


@functools.lru_cache(maxsize=16)
def compiled(template: str):
    """A template compiled once in the sandbox (a model's own and a few others at a time):
    compiling took SmolLM2's 1.2 ms of every request's rendering. A syntax error raises
    jinja2's `TemplateSyntaxError`."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _cut_after_final_message(text: str, final: str) -> str:
    """The rendered chat up to the end of the last message's content (HF's rule): a template
    that trims the content's spaces is cut after the trimmed content."""
    core = final.strip()
    at = text.rfind(core)
    if not core or at < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not show the last message's content "
                                "as given, so the prompt cannot end inside it", "continue_final_message")
    kept = final.lstrip()
    return text[:at + len(kept)] if text[at:at + len(kept)] == kept else text[:at + len(core)]


def read_tokenizer_config(model_dir: Path) -> Dict[str, Any]:
    path = Path(model_dir) / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
