"""What every generating route's body shares: the strict base, vLLM's engine fields, the
sampling fields of completions and chat, and the ways to ask for structured output."""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from horae.sampling_params import MAX_BEAM_WIDTH, StructuredOutputsParams

MAX_N = 16

#: An integer the engine can take: beyond 64 bits it is refused here, naming the field.
Int = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class FieldError(ValueError):
    """A check across a body's fields, naming the one it blames: the 400's `param` (pydantic
    locates a model's own checks at the model, not at a field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Body(Strict):
    """A whole request body: every string in it (keys too) is text UTF-8 can hold. JSON can carry
    a lone surrogate ("\\ud800"), which Python keeps in a str but nothing downstream can encode: a
    stop string or a regex got a codec error naming no field, and metadata, echoed back, a 500 (a
    broken stream when streamed). One check here, naming the field, before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        found = _not_utf8(data, ())
        if found is not None:
            path, at = found
            # Named with the character escaped: pydantic cannot carry it in a message either.
            field = (".".join(map(str, path)) or "body").encode("utf-8", "backslashreplace").decode("utf-8")
            raise FieldError(field, f"{field} is not valid UTF-8 text (a lone surrogate at position {at})")
        return data


def _not_utf8(value: Any, path: tuple):
    """(path, position) of the first string under `value` that UTF-8 cannot hold, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, e.start
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _not_utf8(k, path + (k,)) or _not_utf8(v, path + (k,))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _not_utf8(v, path + (i,))
            if found is not None:
                return found
    return None


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class StructuredOutputs(Strict):
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


class JsonSchema(Strict):
    """OpenAI's `response_format.json_schema`: the schema, under a name."""

    name: str
    # "schema" itself would shadow pydantic's deprecated `BaseModel.schema`.
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class ResponseFormat(Strict):
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
            raise FieldError("json_schema", "json_schema is given with, and only with, type 'json_schema'")
        if self.schema_ is not None and self.type != "json_object":
            raise FieldError("schema", "schema (llama.cpp's) is given with type 'json_object' only")
        return self


class EngineFields(Strict):
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


class SamplingFields(EngineFields):
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

    def grammar_field(self) -> str:
        """The body field `structured` read, for a refusal of what it gave."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    @model_validator(mode="after")
    def _check(self):
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise FieldError("response_format", "give structured_outputs or response_format, not both")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise FieldError("prompt_logprobs", "prompt_logprobs are not available when stream is true")
        if self.use_beam_search:
            if self.n > MAX_BEAM_WIDTH:
                raise FieldError("n", f"with use_beam_search, n is the beam width: at most {MAX_BEAM_WIDTH}, got {self.n}")
            unused = [f for f in _NOT_IN_BEAM_SEARCH if f in self.model_fields_set
                      and getattr(self, f) != type(self).model_fields[f].default]
            if self.response_format is not None and self.response_format.type == "text":
                unused = [f for f in unused if f != "response_format"]
            if unused:
                raise FieldError(unused[0], f"{unused[0]} is not used by beam search (use_beam_search takes n, max_tokens, "
                                 "temperature, length_penalty, ignore_eos, include_stop_str_in_output and logprobs)")
        return self


def joined(content) -> str:
    """A message's content as one text: a string as it is, text parts joined, none as ""."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)
