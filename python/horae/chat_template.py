"""A model's chat template, rendered in a sandbox: the engine's and the replicas' ingress's one way
of turning messages into a prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional


def render_chat_template(model_dir: Path, tokenizer_config: Dict[str, Any], messages: List[Dict[str, Any]],
                         add_generation_prompt: bool = True, tools: Optional[List[Dict[str, Any]]] = None) -> str:
    """A model folder's chat template (from its `tokenizer_config.json`) rendered in jinja2's
    sandbox: the engine's and the replicas' ingress's one way of doing it. `tools` (OpenAI's
    function definitions) reach the template as HF's `apply_chat_template` passes them; a
    template that does not read them leaves them out of the prompt."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a string 'content': {m!r}")
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"bad role {m.get('role')!r}: use system, user, assistant or tool")
    template = tokenizer_config.get("chat_template")
    if not template:
        raise ValueError(f"{model_dir} has no chat template")

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
        bos_token=tokenizer_config.get("bos_token") or "", eos_token=tokenizer_config.get("eos_token") or "")


def read_tokenizer_config(model_dir: Path) -> Dict[str, Any]:
    path = Path(model_dir) / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
