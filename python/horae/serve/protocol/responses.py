"""`POST /v1/responses`'s body: input items, tools and text format as the Responses API spells
them, and the chat request they make."""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from horae.serve.protocol.chat import FunctionDefinition
from horae.serve.protocol.common import Body, EngineFields, FieldError, Int, Strict, joined


class _Text(Strict):
    """A text part of a Responses input message: the user's (`input_text`) or an earlier
    answer's (`output_text`, its annotations and logprobs ignored)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[List[Any]] = None
    logprobs: Optional[List[Any]] = None


class InputMessage(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, List[_Text]]
    id: Optional[str] = None
    status: Optional[str] = None
    phase: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind.startswith("input_") and kind != "input_text":
                raise ValueError(f"{kind} parts are not supported: the model reads text (input_text) only")
        return content

    def text(self) -> str:
        return joined(self.content)


class FunctionCallItem(Strict):
    """A call an earlier answer made, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(Strict):
    """The caller's answer to a call."""

    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, List[_Text]]
    id: Optional[str] = None
    status: Optional[str] = None

    def text(self) -> str:
        return joined(self.output)


class ReasoningItem(Strict):
    """An earlier answer's reasoning, sent back: not part of the next prompt (chat templates
    drop earlier turns' thinking)."""

    type: Literal["reasoning"]
    id: Optional[str] = None
    summary: List[Any] = []
    content: Optional[List[Any]] = None
    encrypted_content: Optional[str] = None
    status: Optional[str] = None


def _item_type(item: Any) -> str:
    # A message may leave out its type (OpenAI's "easy" input message).
    kind = (item.get("type") if isinstance(item, dict) else getattr(item, "type", None)) or "message"
    return f"type={kind}"  # the tags' names: errors.py leaves them out of an error's field path


InputItem = Annotated[Union[Annotated[InputMessage, Tag("type=message")], Annotated[FunctionCallItem, Tag("type=function_call")],
                            Annotated[FunctionCallOutputItem, Tag("type=function_call_output")],
                            Annotated[ReasoningItem, Tag("type=reasoning")]],
                      Discriminator(_item_type, custom_error_type="input_item_type",
                                    custom_error_message="an input item's type is message, function_call, "
                                                         "function_call_output or reasoning")]


class ResponsesTool(FunctionDefinition):
    """A function tool as the Responses API spells it: chat's function, flat, with its type."""

    type: Literal["function"]


class ResponsesToolChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    """The Responses API's `text.format`: chat's `response_format`, flat."""

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _named(self):
        if self.type == "json_schema" and not self.name:
            raise FieldError("name", "a json_schema format needs a name")
        return self


class ResponseText(Strict):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


class ReasoningConfig(Strict):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None
    generate_summary: Optional[Literal["auto", "concise", "detailed"]] = None


#: What `include` may ask for: the output text's logprobs (with top_logprobs).
RESPONSES_INCLUDE = ("message.output_text.logprobs",)


class ResponsesRequest(Body, EngineFields):
    """OpenAI's Responses API (`POST /v1/responses`), served without state: the conversation
    comes whole in `input` (no `previous_response_id`, nothing stored). It is a chat request
    in another spelling (`chat_fields`), answered as output items."""

    model: str
    # The list first, so that a bad item's error is the one reported (not "a valid string").
    input: Union[List[InputItem], str]
    instructions: Optional[str] = None
    max_output_tokens: Optional[Int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_logprobs: Optional[Int] = None
    include: Optional[List[str]] = None
    tools: Optional[List[ResponsesTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ResponsesToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[ResponseText] = None
    reasoning: Optional[ReasoningConfig] = None
    stream: bool = False
    #: Accepted as OpenAI's clients send them; this server keeps nothing (store: the response is
    #: not kept, whatever is asked).
    store: Optional[bool] = None
    metadata: Optional[Dict[str, str]] = None
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    service_tier: Optional[str] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    max_tool_calls: Optional[Int] = None
    stream_options: Optional[Dict[str, bool]] = None
    previous_response_id: Optional[str] = None
    conversation: Optional[Union[str, Dict[str, Any]]] = None
    background: Optional[bool] = None

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _stateless(cls, value):
        if value is not None:
            raise ValueError("this server keeps no responses or conversations; send the whole conversation as input")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value):
        if value:
            raise ValueError("this server keeps no responses to poll; ask without background")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value):
        if value == "auto":
            raise ValueError("'auto' is not supported: an input over the context is refused ('disabled')")
        return value

    @field_validator("include")
    @classmethod
    def _included(cls, value):
        unknown = [x for x in value or () if x not in RESPONSES_INCLUDE]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not available here; the choices: {', '.join(RESPONSES_INCLUDE)}")
        return value

    @field_validator("input")
    @classmethod
    def _some_input(cls, value):
        if value == "" or value == []:
            raise ValueError("must not be empty")
        return value

    def messages(self) -> List[dict]:
        """The conversation as chat messages: instructions first, as a system message; a run of
        function calls is one assistant message's tool_calls, each output a tool message."""
        out: List[dict] = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, InputMessage):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                    out[-1]["tool_calls"].append(call)
                elif out and out[-1]["role"] == "assistant":
                    out[-1]["tool_calls"] = [call]
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        return out

    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ()) or bool(self.top_logprobs)

    def chat_fields(self) -> Dict[str, Any]:
        """The chat request this one is (`ChatCompletionRequest`'s fields)."""
        body: Dict[str, Any] = {
            "model": self.model, "messages": self.messages(), "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
            **self.model_dump(include=set(EngineFields.model_fields), exclude_unset=True)}
        if self.logprobs():
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        c = self.tool_choice
        if c is not None:
            body["tool_choice"] = c if isinstance(c, str) else {"type": "function", "function": {"name": c.name}}
        f = self.text.format if self.text is not None else None
        if f is not None:
            body["response_format"] = {"type": f.type} if f.type != "json_schema" else {
                "type": "json_schema", "json_schema": f.model_dump(include={"name", "schema_", "description", "strict"},
                                                                   by_alias=True, exclude_none=True)}
        return body
