"""`POST /v1/chat/completions`'s body: messages, tools, and how the messages become the prompt."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field, model_validator

from horae.serve.protocol.common import Body, FieldError, Int, SamplingFields, Strict, joined


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    #: The arguments as JSON text, as the model wrote them.
    arguments: str


class ToolCall(Strict):
    """A call an assistant message made (OpenAI's shape), sent back in a conversation's history."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: None only for an assistant message that made tool calls.
    content: Optional[Union[str, List[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    #: A tool message's answer to this call.
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise FieldError("content", "content is required (only an assistant message with tool_calls may leave it out)")
        return self

    def text(self) -> str:
        return joined(self.content)

    def for_template(self) -> dict:
        """The message as a chat template reads it (HF's keys); a developer message is a system one."""
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class FunctionDefinition(Strict):
    name: str = Field(..., min_length=1)
    description: Optional[str] = None
    #: A JSON schema of the arguments (none: any JSON object).
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatPrompt(Strict):
    """How the messages become the prompt (vLLM's fields, HF's `apply_chat_template` arguments)."""

    add_generation_prompt: bool = True
    #: End the prompt inside the last message, for the model to go on with it (with
    #: add_generation_prompt false), e.g. an assistant reply begun by the client.
    continue_final_message: bool = False
    #: A template instead of the server's (refused unless it runs with --trust-request-chat-template).
    chat_template: Optional[str] = None
    #: More of the template's variables, e.g. a template's `enable_thinking`.
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class ChatCompletionRequest(Body, SamplingFields, ChatPrompt):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[Int] = None
    max_completion_tokens: Optional[Int] = None
    logprobs: bool = False
    top_logprobs: Optional[Int] = None
    tools: Optional[List[Tool]] = None
    #: "auto" (the default when tools are given, as OpenAI's and vLLM's: the model calls them in
    #: its own format or answers, read by the server's --tool-call-parser), "none" (tools reach
    #: the template only), "required" (one call or more, to any of the tools) or one named
    #: function; the last two are structured output under the functions' schemas (tools.py).
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    #: vLLM's: false leaves a reasoning model's thinking out of the answer (--reasoning-parser).
    include_reasoning: bool = True

    @model_validator(mode="after")
    def _tools(self):
        if self.tool_choice is None and self.tools:
            self.tool_choice = "auto"
        c = self.tool_choice
        if c not in (None, "none") and not self.tools:
            raise FieldError("tool_choice", f"tool_choice {repr(c) if isinstance(c, str) else 'naming a function'} needs tools")
        if c not in (None, "none", "auto"):
            if isinstance(c, NamedToolChoice) and c.function.name not in {t.function.name for t in self.tools}:
                raise FieldError("tool_choice", f"tool_choice names {c.function.name!r}, which is not among the tools")
            if self.structured_outputs is not None or (self.response_format and self.response_format.type != "text"):
                raise FieldError("tool_choice",
                                 "give tool_choice or structured output (response_format, structured_outputs), not both")
            if self.use_beam_search:
                raise FieldError("tool_choice",
                                 "a forced tool call (tool_choice) is structured output, which beam search does not use")
        return self

    def forced_tool(self) -> Optional[str]:
        """The function every answer calls (a named tool_choice), "*" for 'required', or None."""
        c = self.tool_choice
        return c.function.name if isinstance(c, NamedToolChoice) else "*" if c == "required" else None

    def structured(self) -> Optional[dict]:
        """A forced tool call's arguments are structured output: a named function's schema, or
        for 'required' a list of {"name", "parameters"} objects, one of the tools each (vLLM's)."""
        forced = self.forced_tool()
        if forced is None:
            return super().structured()
        params = {t.function.name: t.function.parameters or {"type": "object"} for t in self.tools}
        if forced != "*":
            return {"json": params[forced]}
        call = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                 "properties": {"name": {"const": n}, "parameters": p}} for n, p in params.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return {"json": schema}

    def grammar_field(self) -> str:
        return "tools" if self.forced_tool() is not None else super().grammar_field()

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs set to true")
        return self
