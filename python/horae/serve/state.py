"""What every endpoint shares: the engine, the server's configuration and metrics, and the steps
from a parsed request to engine outputs (model check, capacity, sampling, start, read)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
import typing
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Union

from fastapi import Request

from horae.async_llm import AsyncLLM, EngineDeadError, RequestDroppedError, RequestFailedError
from horae.chat_template import ChatTemplateError, compiled
from horae.outputs import RequestOutput
from horae.sampling_params import BeamSearchParams, SamplingParams
from horae.serve.errors import APIError, bad_request, first_line
from horae.serve.metrics import EngineMetrics, MetricsSource
from horae.serve.reasoning import reasoning_parser
from horae.serve.tool_parsers import tool_parser


@dataclass
class ServerConfig:
    #: The model id clients send; empty: the model folder's name (`build_app` fills it in).
    model_name: str = ""
    api_key: Optional[str] = None
    #: Requests accepted but not yet producing output; beyond it new ones get 503.
    max_queue: int = 256
    #: Largest request body, in bytes (413 beyond).
    max_body_bytes: int = 4 << 20
    #: The model's tool-call format (`tool_parsers.PARSERS`), read for tool_choice "auto"; None:
    #: "auto" is refused (vLLM's --enable-auto-tool-choice with --tool-call-parser).
    tool_call_parser: Optional[str] = None
    #: The model's way of writing its reasoning apart (`reasoning.REASONING_PARSERS`), answered as
    #: `reasoning`; None: all of the text is content (vLLM's --reasoning-parser).
    reasoning_parser: Optional[str] = None
    #: A chat template instead of the model's (vLLM's --chat-template), and whether a request may
    #: bring its own (--trust-request-chat-template: a template is code, run in a sandbox).
    chat_template: Optional[str] = None
    trust_request_chat_template: bool = False
    #: Logprobs name tokens "token_id:N" unless a request says otherwise (vLLM's
    #: --return-tokens-as-token-ids).
    return_tokens_as_token_ids: bool = False
    #: CORS (vLLM's --allowed-origins and the rest, Starlette's CORSMiddleware): what a page in a
    #: browser may call from, with and send. Any origin by default, as vLLM and llama.cpp's server
    #: allow: a server that needs more than its reach guards itself with `api_key`.
    allowed_origins: List[str] = field(default_factory=lambda: ["*"])
    allowed_methods: List[str] = field(default_factory=lambda: ["*"])
    allowed_headers: List[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    def __post_init__(self):  # ValueErrors naming the choices or the fault, at start
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r}")
        if self.tool_call_parser is not None:
            tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            reasoning_parser(self.reasoning_parser)
        if self.chat_template is not None:
            try:
                compiled(self.chat_template)
            except Exception as e:  # jinja2's syntax errors
                raise ValueError(f"--chat-template does not compile: {first_line(e)}") from None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` (the prompt tokens the prefix cache
    served) once the engine has said how many."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def token_name(token: int, text: str, as_id: bool) -> str:
    """How logprobs name a token: its text, or (vLLM's return_tokens_as_token_ids, for tokens
    whose text is part of a character) "token_id:N"."""
    return f"token_id:{token}" if as_id else text


def vllm_logprobs(lps) -> Optional[list]:
    """`RequestOutput.prompt_logprobs` as vLLM's server answers them: per prompt token null (the
    first) or `{token_id: {"logprob", "rank", "decoded_token"}}`."""
    if lps is None:
        return None
    return [None if d is None else {str(t): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                                    for t, v in d.items()} for d in lps]


def new_parts(out: RequestOutput, sent: dict):
    """Per sample of `out`, what is new since the last call: (sample, chars already sent, tokens
    already sent, whether it finishes now). `sent` keeps the state between calls."""
    for c in out.outputs:
        chars, toks, done = sent.get(c.index, (0, 0, False))
        finishing = c.finish_reason is not None and not done
        if len(c.text) > chars or len(c.token_ids) > toks or finishing:
            sent[c.index] = (len(c.text), len(c.token_ids), done or finishing)
            yield c, chars, toks, finishing


def token_keys(bias: Optional[Dict[str, float]]) -> Optional[Dict[int, float]]:
    """OpenAI's `logit_bias` (JSON keys are strings) keyed by token id; a key that is not an
    integer is a 400 naming the field (the engine checks the ids and biases)."""
    if bias is None:
        return None
    out = {}
    for k, v in bias.items():
        try:
            out[int(k)] = v
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids (integers), got {k!r}", param="logit_bias") from None
    return out


class ServerState:
    """`llm` is the engine client: an `AsyncLLM`, or the Ray ingress's `RemoteLLM` over replicas.
    The server uses only `generate`, `num_waiting`, `model_dir`, `max_request_tokens`, `encode`,
    `decode` and `apply_chat_template` of it (vLLM's `EngineClient` idea), so both serve the same
    routes, errors and streams. `metrics` renders `/metrics` (default: this engine's)."""

    def __init__(self, llm: AsyncLLM, config: ServerConfig, metrics: Optional[MetricsSource] = None):
        self.llm, self.config = llm, config
        self.metrics = metrics if metrics is not None else EngineMetrics(llm, config.model_name)
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        """What one request may hold, prompt + max_tokens: the context, or the KV pool."""
        return self.llm.max_request_tokens

    def tokens_as_ids(self, req) -> bool:
        """Whether `req`'s logprobs name tokens by id: its own `return_tokens_as_token_ids`, else
        the server's."""
        own = req.return_tokens_as_token_ids
        return self.config.return_tokens_as_token_ids if own is None else own

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found")

    def check_capacity(self, extra: int) -> None:
        if self.llm.num_waiting + extra > self.config.max_queue:
            raise APIError(503, f"the server is at capacity ({self.config.max_queue} requests queued); retry later",
                           "server_overloaded", None, "overloaded", headers={"Retry-After": "1"})

    def encode(self, text: str, param: str, add_special_tokens: bool = False) -> List[int]:
        try:
            return self.llm.encode(text, add_special_tokens)
        except (TypeError, ValueError) as e:
            raise bad_request(e, param) from None

    def sampling(self, req, max_tokens: Optional[int], logprobs: Optional[int],
                 prompt_logprobs: Optional[int] = None) -> Union[SamplingParams, BeamSearchParams]:
        """The request's sampling as the engine takes it. Values are checked by the engine when
        the request is added: here only absent fields get OpenAI's defaults (vLLM's for beam
        search: temperature 1, up to the context)."""
        if getattr(req, "use_beam_search", False):
            try:
                return BeamSearchParams(
                    beam_width=req.n, max_tokens=self.max_model_len if max_tokens is None else max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature, length_penalty=req.length_penalty,
                    ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
                    skip_special_tokens=req.skip_special_tokens, logprobs=logprobs)
            except (TypeError, ValueError) as e:  # each names its field (`param`); the beam width is the body's n
                e.param = {"beam_width": "n"}.get(e.param, e.param)
                raise bad_request(e) from None
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=0 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0, repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, min_tokens=req.min_tokens, slo=req.slo,
            priority=req.priority, logit_bias=token_keys(req.logit_bias), allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words, truncate_prompt_tokens=req.truncate_prompt_tokens,
            structured_outputs=req.structured())

    def start(self, prefix: str, prompt_ids: List[int], params: SamplingParams,
              cache_salt: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        prompt = {"prompt_token_ids": prompt_ids, **({"cache_salt": cache_salt} if cache_salt is not None else {})}
        run = self.llm.beam_search if isinstance(params, BeamSearchParams) else self.llm.generate
        try:
            return run(prompt, params, request_id=f"{prefix}-{uuid.uuid4().hex}")
        except (TypeError, ValueError) as e:
            raise bad_request(e) from None

    @staticmethod
    def dropped(e: RequestDroppedError) -> APIError:
        """The server's rules ended the request: 503 with Retry-After, so a client or a router
        sends it again (the paper's clients do); the code says which rule."""
        return APIError(503, str(e), "server_overloaded", None, "queue_timeout" if e.reason == "timeout" else "sla_abort",
                        headers={"Retry-After": "1"})

    @staticmethod
    def engine_error(e: EngineDeadError) -> APIError:
        # A request the model failed on is the server's fault (500); a dead step loop or a lost
        # replica is "try again" (503).
        if isinstance(e, RequestFailedError):
            return APIError(500, str(e), "server_error", None, "engine_error")
        return APIError(503, str(e), "server_error", None, getattr(e, "code", "engine_error"), headers={"Retry-After": "1"})

    async def first_output(self, stream: AsyncIterator[RequestOutput]) -> Optional[RequestOutput]:
        """Pull one output, turning queue-time errors into API errors (before any byte is sent)."""
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except (TypeError, ValueError) as e:  # the engine refused the request when it was added
            raise bad_request(e) from None
        except EngineDeadError as e:
            raise self.engine_error(e) from None
        except RequestDroppedError as e:
            raise self.dropped(e) from None

    async def start_all(self, prefix: str, prompts: List[List[int]], params: List[SamplingParams],
                        cache_salt: Optional[str] = None):
        """Start one stream per prompt and pull each one's first output; on any error, every
        stream is closed (its request aborted) before the error is answered."""
        streams, firsts = [], []
        try:
            for ids, p in zip(prompts, params):
                streams.append(self.start(prefix, ids, p, cache_salt))
            for s in streams:
                firsts.append(await self.first_output(s))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return streams, firsts

    async def final_outputs(self, streams: List[AsyncIterator[RequestOutput]],
                            firsts: List[Optional[RequestOutput]]) -> List[Optional[RequestOutput]]:
        """Read each stream to its finished output (non-streaming responses). However it ends (an
        error, or the client gone: `cancel_on_disconnect` cancels the handler), every stream is
        closed, which aborts the requests still running."""
        outs = list(firsts)
        try:
            for i, stream in enumerate(streams):
                while outs[i] is not None and not outs[i].finished:
                    outs[i] = await stream.__anext__()
        except EngineDeadError as e:
            raise self.engine_error(e) from None
        except RequestDroppedError as e:
            raise self.dropped(e) from None
        finally:
            for stream in streams:
                await stream.aclose()
        return outs

    def chat_prompt(self, req) -> str:
        """The prompt of a request's messages (its `ChatPrompt` fields, and its tools if any)."""
        if req.chat_template is not None and not self.config.trust_request_chat_template:
            raise APIError(400, "this server takes no chat_template from a request (start it with "
                                "--trust-request-chat-template to allow them)", param="chat_template")
        msgs = [m.for_template() for m in req.messages]
        tools = getattr(req, "tools", None)
        tools = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        try:
            return self.llm.apply_chat_template(
                msgs, add_generation_prompt=req.add_generation_prompt, tools=tools,
                chat_template=req.chat_template or self.config.chat_template,
                chat_template_kwargs=req.chat_template_kwargs, continue_final_message=req.continue_final_message)
        except ChatTemplateError as e:
            raise APIError(400, first_line(e), param=e.field) from None
        except Exception as e:  # the template itself: its syntax, or its raise_exception
            raise APIError(400, f"the chat template rejected the messages: {first_line(e)}",
                           param="chat_template" if req.chat_template else "messages") from None


def cancel_on_disconnect(handler):
    """A route's handler, cancelled when its client hangs up before it answers (vLLM's
    `with_cancellation`): a request waiting in the queue, or a non-streamed answer (a beam search
    says nothing until it ends), is aborted then, not run for no one. A streamed answer, once
    started, is Starlette's to watch (`streaming.sse_response` closes its requests). The handler
    takes the raw request as `raw`."""

    @functools.wraps(handler)
    async def watched(*args, **kwargs):
        work = asyncio.ensure_future(handler(*args, **kwargs))
        gone = asyncio.ensure_future(_hung_up(kwargs["raw"]))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and gone.exception() is not None:
                await work  # the connection could not be watched: answer as if unwatched
        finally:
            gone.cancel()
            if not work.done():  # the client left (or this server is stopping): closing its streams aborts them
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise APIError(499, "client disconnected")
        return work.result()

    # FastAPI reads the handler's parameters from the wrapper: give it them with their types
    # resolved (the route modules' annotations are strings, names in their modules, not here).
    hints = typing.get_type_hints(handler)
    sig = inspect.signature(handler)
    watched.__signature__ = sig.replace(parameters=[q.replace(annotation=hints.get(q.name, q.annotation))
                                                    for q in sig.parameters.values()])
    return watched


async def _hung_up(request: Request) -> None:
    """Returns once the client has gone: the body was read before the handler ran, so what the
    connection says next is its end."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
