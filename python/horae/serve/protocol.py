"""Request bodies of the OpenAI-compatible API (pydantic): the JSON's shape only. Types are strict
(no "10" for 10, "yes" for true, or true for a token id) and integers fit 64 bits, as OpenAI and
vLLM refuse the rest; every value rule is the engine's (horae_core::request::RequestParams). Unknown
fields are rejected, as OpenAI does; vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, allowed_token_ids,
include_stop_str_in_output, skip_special_tokens, priority, bad_words, truncate_prompt_tokens,
return_token_ids, return_tokens_as_token_ids, cache_salt, prompt_logprobs, structured_outputs) are accepted,
as vLLM's clients send them through `extra_body`, and so is horae's `slo`. A Responses API request
(`ResponsesRequest`) is checked here and answered as the chat request it spells (`chat_fields`)."""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from horae.sampling_params import MAX_BEAM_WIDTH, StructuredOutputsParams

MAX_N = 16

#: An integer the engine can take: beyond 64 bits it is refused here, naming the field.
Int = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (its `StructuredOutputsParams`): exactly one of these."""

    # "json" itself would shadow pydantic's deprecated `BaseModel.json`.
    json_: Optional[Union[Dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    @model_validator(mode="after")
    def _one(self):
        # The one check (`StructuredOutputsParams`'s), here so that it answers a 400 naming the field.
        try:
            StructuredOutputsParams(**self.model_dump(by_alias=True, exclude_none=True))
        except (TypeError, ValueError) as e:
            # A ValueError (the only kind pydantic makes the field's error), without the field's
            # name, which the 400's message puts first.
            raise ValueError(str(e).removeprefix("structured_outputs: ")) from None
        return self


class JsonSchema(_Strict):
    """OpenAI's `response_format.json_schema`: the schema, under a name."""

    name: str
    # "schema" itself would shadow pydantic's deprecated `BaseModel.schema`.
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: plain text (what a completion is anyway; some clients always
    send it), any JSON object (`json_object`, or under llama.cpp's `schema`) or JSON under a schema
    (`json_schema`); the last two are structured output, as vLLM serves them."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None
    #: llama.cpp's server's spelling: a JSON object under this schema (with type 'json_object').
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type 'json_schema'")
        if self.schema_ is not None and self.type != "json_object":
            raise ValueError("schema (llama.cpp's) is given with type 'json_object' only")
        return self


class _EngineFields(_Strict):
    """vLLM's sampling fields beyond OpenAI's, and horae's `slo`, on every route that generates
    (completions, chat, responses): they go to the engine as they are."""

    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[Int] = None
    top_k: Optional[Int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: Int = 0
    stop_token_ids: Optional[List[Int]] = None
    allowed_token_ids: Optional[List[Int]] = None
    bad_words: Optional[List[str]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: Int = 0
    #: A longer prompt keeps its last k tokens (-1: what the context leaves after max_tokens).
    truncate_prompt_tokens: Optional[Int] = None
    #: vLLM's: the prompt's cached blocks are shared only with requests of the same salt (a
    #: tenant's secret), so no one learns another's prompts from the prefix cache's timing.
    cache_salt: Optional[str] = None
    # horae's extension: this request's latency bounds in seconds ("ttft", "max_itl", "tpot",
    # "e2e"); the engine checks the names and values.
    slo: Optional[Dict[str, float]] = None


#: What a request with use_beam_search may not set: beam search would not honour it.
_NOT_IN_BEAM_SEARCH = ("stop", "stop_token_ids", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words", "top_p",
                       "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
                       "structured_outputs", "response_format", "prompt_logprobs", "truncate_prompt_tokens", "slo",
                       "priority", "echo")


class _Sampling(_EngineFields):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    #: Token ids (as strings, JSON's keys) to a bias in [-100, 100] added to that token's logit.
    logit_bias: Optional[Dict[str, float]] = None
    #: vLLM's: the prompt's and each choice's token ids beside the text (streamed: the prompt's
    #: in a choice's first chunk, each chunk's new ids), for callers that must not re-tokenize.
    return_token_ids: bool = False
    #: vLLM's: logprobs name each token "token_id:N" instead of by its text (which for a token
    #: holding part of a character is not the token); None: as the server says
    #: (--return-tokens-as-token-ids).
    return_tokens_as_token_ids: Optional[bool] = None
    #: Each prompt token's log-probability and this many alternatives, answered as vLLM does
    #: (`prompt_logprobs`: a choice's on completions, the response's on chat); not streamed.
    prompt_logprobs: Optional[Int] = None
    structured_outputs: Optional[StructuredOutputs] = None
    #: OpenAI's; vLLM takes it on completions too.
    response_format: Optional[ResponseFormat] = None
    #: vLLM's: the n most likely continuations by beam search (`LLM.beam_search`; n is the beam
    #: width, at most 10) instead of n samples, scored with `length_penalty`.
    use_beam_search: bool = False
    length_penalty: float = 1.0

    def structured(self) -> Optional[dict]:
        """What the output must match, from either spelling (as `StructuredOutputsParams`'s
        fields), or None."""
        if self.structured_outputs is not None:
            return self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        f = self.response_format
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return {"json_object": True} if f.schema_ is None else {"json": f.schema_}
        # A schema left out: any JSON value.
        return {"json": f.json_schema.schema_ if f.json_schema.schema_ is not None else {}}

    @model_validator(mode="after")
    def _check(self):
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give structured_outputs or response_format, not both")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available when stream is true")
        if self.use_beam_search:
            if self.n > MAX_BEAM_WIDTH:
                raise ValueError(f"with use_beam_search, n is the beam width: at most {MAX_BEAM_WIDTH}, got {self.n}")
            unused = [f for f in _NOT_IN_BEAM_SEARCH if f in self.model_fields_set
                      and getattr(self, f) != type(self).model_fields[f].default]
            if self.response_format is not None and self.response_format.type == "text":
                unused = [f for f in unused if f != "response_format"]
            if unused:
                raise ValueError(f"{unused[0]} is not used by beam search (use_beam_search takes n, max_tokens, "
                                 "temperature, length_penalty, ignore_eos, include_stop_str_in_output and logprobs)")
        return self


class CompletionRequest(_Sampling):
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
            raise ValueError("prompt must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self


def _joined(content) -> str:
    """A message's content as one text: a string as it is, text parts joined, none as ""."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    #: The arguments as JSON text, as the model wrote them.
    arguments: str


class ToolCall(_Strict):
    """A call an assistant message made (OpenAI's shape), sent back in a conversation's history."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
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
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        return self

    def text(self) -> str:
        return _joined(self.content)

    def for_template(self) -> dict:
        """The message as a chat template reads it (HF's keys); a developer message is a system one."""
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class FunctionDefinition(_Strict):
    name: str = Field(..., min_length=1)
    description: Optional[str] = None
    #: A JSON schema of the arguments (none: any JSON object).
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class _ChatPrompt(_Strict):
    """How the messages become the prompt (vLLM's fields, HF's `apply_chat_template` arguments)."""

    add_generation_prompt: bool = True
    #: End the prompt inside the last message, for the model to go on with it (with
    #: add_generation_prompt false), e.g. an assistant reply begun by the client.
    continue_final_message: bool = False
    #: A template instead of the server's (refused unless it runs with --trust-request-chat-template).
    chat_template: Optional[str] = None
    #: More of the template's variables, e.g. a template's `enable_thinking`.
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class ChatCompletionRequest(_Sampling, _ChatPrompt):
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
            raise ValueError(f"tool_choice {repr(c) if isinstance(c, str) else 'naming a function'} needs tools")
        if c not in (None, "none", "auto"):
            if isinstance(c, NamedToolChoice) and c.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {c.function.name!r}, which is not among the tools")
            if self.structured_outputs is not None or (self.response_format and self.response_format.type != "text"):
                raise ValueError("give tool_choice or structured output (response_format, structured_outputs), not both")
            if self.use_beam_search:
                raise ValueError("a forced tool call (tool_choice) is structured output, which beam search does not use")
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

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


class _Text(_Strict):
    """A text part of a Responses input message: the user's (`input_text`) or an earlier
    answer's (`output_text`, its annotations and logprobs ignored)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[List[Any]] = None
    logprobs: Optional[List[Any]] = None


class InputMessage(_Strict):
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
        return _joined(self.content)


class FunctionCallItem(_Strict):
    """A call an earlier answer made, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(_Strict):
    """The caller's answer to a call."""

    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, List[_Text]]
    id: Optional[str] = None
    status: Optional[str] = None

    def text(self) -> str:
        return _joined(self.output)


class ReasoningItem(_Strict):
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


class ResponsesToolChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """The Responses API's `text.format`: chat's `response_format`, flat."""

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _named(self):
        if self.type == "json_schema" and not self.name:
            raise ValueError("a json_schema format needs a name")
        return self


class ResponseText(_Strict):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


class ReasoningConfig(_Strict):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None
    generate_summary: Optional[Literal["auto", "concise", "detailed"]] = None


#: What `include` may ask for: the output text's logprobs (with top_logprobs).
RESPONSES_INCLUDE = ("message.output_text.logprobs",)


class ResponsesRequest(_EngineFields):
    """OpenAI's Responses API (`POST /v1/responses`), served without state: the conversation
    comes whole in `input` (no `previous_response_id`, nothing stored). It is a chat request
    in another spelling (`chat_request`), answered as output items."""

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
            **self.model_dump(include=set(_EngineFields.model_fields), exclude_unset=True)}
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


class TokenizeRequest(_ChatPrompt):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        template = sorted(set(_ChatPrompt.model_fields) & self.model_fields_set)
        if self.prompt is not None and template:
            raise ValueError(f"{', '.join(template)}: only with messages, not with a prompt")
        return self


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: List[Int]
