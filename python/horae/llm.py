"""Offline generation on the real engine: `LLM.generate` / `LLM.chat`, and the low-level `Engine`
(add_request / abort / step) for writing your own serving loop. Names follow vLLM's."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from horae import _core
from horae.models import resolve_model

PromptType = Union[str, Dict[str, object]]


@dataclass
class SamplingParams:
    """How to sample, as in vLLM. `temperature=0` is greedy; `seed` makes sampling reproducible."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    #: Report log-probabilities of each output token and of this many most likely alternatives.
    logprobs: Optional[int] = None
    #: End-of-sequence and stop strings/ids are ignored until this many tokens are generated.
    min_tokens: int = 0
    #: Report each prompt token's log-probability and this many alternatives (no prefix caching).
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        num = (int, float)
        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        need(isinstance(self.temperature, num) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        need(isinstance(self.top_p, num) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k == -1:  # vLLM's spelling of "off"
            self.top_k = 0
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        need(isinstance(self.min_p, num) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(isinstance(self.repetition_penalty, num) and self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(isinstance(v, num) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
        need(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        self.stop_token_ids = list(self.stop_token_ids or [])
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative integers")
        need(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        need(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[str, int]] = None
    #: Per output token, {token_id: logprob} for the chosen token and the top alternatives.
    logprobs: Optional[List[Dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None
    #: Speculative decoding, once finished: draft tokens verified for this sample, and accepted.
    num_draft_tokens: Optional[int] = None
    num_accepted_tokens: Optional[int] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = False
    #: As vLLM: None for the first prompt token, then {token_id: logprob} per prompt token.
    prompt_logprobs: Optional[List[Optional[Dict[int, float]]]] = None


@dataclass
class _Seq:
    """One of a request's n samples, as a core request."""

    index: int
    core_id: Optional[int]  # None while held back until the first sample's prompt is computed
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[str, int]] = None
    logprobs: Optional[List[Dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None
    spec: Optional[tuple] = None  # (draft tokens, accepted) once finished


@dataclass
class _Req:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    seqs: List[_Seq]
    prompt_logprobs: Optional[List[Optional[Dict[int, float]]]] = None

    def output(self) -> RequestOutput:
        # Held-back samples show as empty until they start.
        outs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason, s.stop_reason,
                                 None if s.logprobs is None else list(s.logprobs), s.cumulative_logprob,
                                 *(s.spec or (None, None)))
                for s in self.seqs]
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outs,
                             all(s.finish_reason is not None for s in self.seqs), self.prompt_logprobs)


def _speculative_config(spec: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Check the `speculative=` dict's shape and resolve a draft model name to its folder; the
    core checks every value."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise TypeError(f"speculative must be a dict such as {{'method': 'ngram', 'k_max': 4}}, got {type(spec).__name__}")
    spec = dict(spec)
    if spec.get("method") == "draft" and spec.get("model") is not None:
        spec["model"] = str(resolve_model(spec["model"]))
    return spec


class Engine:
    """The low-level engine: `add_request`, `abort`, `step() -> list[RequestOutput]`.

    >>> engine = Engine()                       # the default model
    >>> engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    >>> while engine.has_unfinished_requests():
    ...     for out in engine.step():
    ...         print(out.request_id, out.outputs[0].text, out.finished)
    """

    def __init__(self, model: Optional[Union[str, Path]] = None, *, scheduler: str = "past-future",
                 kv_cache_tokens: Optional[int] = None, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, seed: int = 0, dtype: str = "auto",
                 history_window: int = 1000, max_output_bound: Optional[int] = None,
                 speculative: Optional[Dict[str, Any]] = None, device: str = "auto",
                 gpu_memory_utilization: float = 0.9):
        # device: "auto" (the first GPU if one works, else the CPU; `cpu_fallback_reason` says
        # why), "cpu", "cuda" or "cuda:N". A GPU needs an NVIDIA driver for CUDA 12+, Ampere or
        # newer, and NVRTC + cuBLAS (`pip install horae[cuda]` brings them).
        # kv_cache_tokens: the KV pool. Default: 16384 tokens on the CPU; on a GPU, whatever fits
        # in gpu_memory_utilization of its memory after the weights and activations (as vLLM).
        # dtype: how the weights are held. On the CPU "auto" keeps the checkpoint's (bf16/f16
        # checkpoints as bfloat16, others float32); "bfloat16" halves weight memory and bandwidth,
        # computing in f32. On a GPU: "auto" = "bfloat16", or "float16".
        # history_window / max_output_bound: Past-Future's length history (finished lengths kept)
        # and what it is primed with before any request finished (default: the model's context).
        # speculative: speculative decoding, e.g. {"method": "ngram", "k_max": 4, "adaptive": True}
        # (prompt lookup; also "prompt_lookup_min"/"prompt_lookup_max") or {"method": "draft",
        # "model": folder or .gguf (default: this model), "num_layers": N (keep the first N)}.
        # "adaptive" (default on) is SmartSpec: k chosen per step for goodput, 0 when it does not pay.
        self.model_dir = resolve_model(model)
        speculative = _speculative_config(speculative)
        if device != "cpu":
            from horae.cuda import preload_libraries
            preload_libraries()
        self._core = _core.Engine(str(self.model_dir), scheduler=scheduler, kv_cache_tokens=kv_cache_tokens,
                                  block_size=block_size, max_num_seqs=max_num_seqs,
                                  max_batched_tokens=max_num_batched_tokens, seed=seed, dtype=dtype,
                                  history_window=history_window, max_output_bound=max_output_bound,
                                  speculative=speculative, device=device,
                                  gpu_memory_utilization=gpu_memory_utilization)
        self._requests: Dict[str, _Req] = {}
        self._by_core: Dict[int, tuple] = {}
        self._ids = itertools.count()
        cfg_path = self.model_dir / "tokenizer_config.json"
        self.tokenizer_config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    @property
    def dtype(self) -> str:
        """How the weights are held: "float32", "bfloat16" or (GPU) "float16"."""
        return self._core.dtype

    @property
    def device(self) -> str:
        """Where the model runs: "cpu" or "cuda:N (GPU name)"."""
        return self._core.device

    @property
    def cpu_fallback_reason(self) -> Optional[str]:
        """With device="auto" on the CPU: why no GPU was used."""
        return self._core.cpu_fallback_reason

    # -- tokenizer ----------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        return self._core.encode(text, False)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._core.decode(list(token_ids), True)

    def _prompt_ids(self, prompt: PromptType):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
        raise TypeError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a horae.SamplingParams")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        # Only the first of n samples is submitted now. The others are held back until its prompt is
        # computed, so they take the prompt's full KV blocks from the prefix cache instead of
        # computing them n times (the fork-after-prefill of vLLM v0).
        first = _Seq(0, self._submit(ids, params, 0))
        seqs = [first] + [_Seq(i, None) for i in range(1, params.n)]
        for s in seqs:
            if params.logprobs is not None:
                s.logprobs, s.cumulative_logprob = [], 0.0
        req = _Req(request_id, text, ids, params, seqs)
        self._requests[request_id] = req
        self._by_core[first.core_id] = (req, first)
        return request_id

    def _submit(self, ids: List[int], params: SamplingParams, index: int) -> int:
        seed = None if params.seed is None else params.seed + index
        return self._core.add_request(
            ids, max_tokens=params.max_tokens, temperature=float(params.temperature), top_k=params.top_k,
            top_p=float(params.top_p), min_p=float(params.min_p), repetition_penalty=float(params.repetition_penalty),
            presence_penalty=float(params.presence_penalty), frequency_penalty=float(params.frequency_penalty),
            seed=seed, ignore_eos=params.ignore_eos, logprobs=params.logprobs, min_tokens=params.min_tokens,
            prompt_logprobs=params.prompt_logprobs if index == 0 else None)

    def _release_held(self, req: _Req) -> None:
        for s in req.seqs:
            if s.core_id is None and s.finish_reason is None:
                s.core_id = self._submit(req.prompt_token_ids, req.params, s.index)
                self._by_core[s.core_id] = (req, s)

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(str(request_id), None)
        if req is None:
            raise KeyError(f"unknown request id {request_id!r}")
        for s in req.seqs:
            self._by_core.pop(s.core_id, None)
            if s.finish_reason is None and s.core_id is not None:
                self._core.abort(s.core_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def _finish(self, req: _Req, seq: _Seq, reason: str, stop_reason=None, abort_core: bool = False):
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._by_core.pop(seq.core_id, None)
        if abort_core:
            self._core.abort(seq.core_id)

    def step(self) -> List[RequestOutput]:
        """Run one engine step; returns the requests that made progress (finished ones last time)."""
        return self._process(self._core.step())

    def _process(self, events) -> List[RequestOutput]:
        """Apply one step's events from the core (tokens, text, finish reasons) to the requests:
        stop strings and ids, n > 1 samples, logprobs. Returns their outputs."""
        touched: Dict[str, _Req] = {}
        for core_id, new_ids, new_text, reason, new_lps, prompt_lps, spec in events:
            entry = self._by_core.get(core_id)
            if entry is None:
                continue
            req, seq = entry
            touched[req.request_id] = req
            if reason == "error":  # refused by the engine after queueing: new_text is why
                self._finish(req, seq, "error", new_text)
                continue
            if seq.index == 0 and new_ids:
                self._release_held(req)  # the prompt's KV now exists: the other samples share it
            p = req.params
            if prompt_lps and seq.index == 0:
                req.prompt_logprobs = [None] + [{t: lp, **{a: v for a, v in top if a != t}} for t, lp, top in prompt_lps]
            if spec is not None:
                seq.spec = spec
            before = len(seq.text)
            # A stop token id ends the output there, even when speculation delivered more tokens
            # in the same step (stop conditions wait for min_tokens).
            n_before = len(seq.token_ids)
            cut = next((i for i, t in enumerate(new_ids) if t in p.stop_token_ids and n_before + i + 1 > p.min_tokens),
                       None)
            if cut is not None and cut + 1 < len(new_ids):
                # The request ends here: its whole text, decoded once, replaces the streamed pieces.
                new_ids, new_lps = new_ids[:cut + 1], new_lps[:cut + 1]
                seq.text = self.decode(seq.token_ids + new_ids)
            else:
                seq.text += new_text
            seq.token_ids.extend(new_ids)
            if seq.logprobs is not None:
                for token, lp, top in new_lps:
                    seq.logprobs.append({token: lp, **{t: v for t, v in top if t != token}})
                    seq.cumulative_logprob += lp
            early = len(seq.token_ids) <= p.min_tokens  # stop conditions wait for min_tokens
            if cut is not None:
                self._finish(req, seq, "stop", new_ids[-1], abort_core=reason is None)
                continue
            if p.stop and not early:
                # Search from where a stop string could start across the token boundary.
                start = max(0, before - max(len(s) for s in p.stop) + 1)
                found = [(seq.text.find(s, start), s) for s in p.stop]
                found = [(i, s) for i, s in found if i >= 0]
                if found:
                    i, s = min(found)
                    seq.text = seq.text[:i]
                    self._finish(req, seq, "stop", s, abort_core=reason is None)
                    continue
            if reason is not None:
                self._finish(req, seq, {"abort": "abort"}.get(reason, reason))
        outs = []
        for rid, req in touched.items():
            out = req.output()
            if out.finished:
                self._requests.pop(rid, None)
            outs.append(out)
        return outs

    # -- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the model's chat template in a sandbox: a template cannot reach the file system,
        import modules or mutate its inputs."""
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"each message needs a string 'content': {m!r}")
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"bad role {m.get('role')!r}: use system, user, assistant or tool")
        template = self.tokenizer_config.get("chat_template")
        if not template:
            raise ValueError(f"{self.model_dir} has no chat template")

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer_config.get("bos_token") or "", eos_token=self.tokenizer_config.get("eos_token") or "")


class LLM:
    """Offline batch generation, as vLLM's `LLM`.

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct, converted once
    >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    """

    def __init__(self, model: Optional[Union[str, Path]] = None, **engine_args):
        self.engine = Engine(model, **engine_args)

    def logits(self, prompt: PromptType):
        """Teacher-forced logits of a prompt on the model, as a numpy array `[tokens, vocab]`."""
        _, ids = self.engine._prompt_ids(prompt)
        return self.engine._core.logits(ids)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]], sampling_params: Optional[SamplingParams] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        ids = []
        try:
            for p in prompts:
                ids.append(self.engine.add_request(None, p, sampling_params))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results: Dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(prompts) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="generating", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update()
        except BaseException:
            for rid in ids:
                if rid not in results and rid in self.engine._requests:
                    self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True):
        """One conversation (a list of messages) or several (a list of lists)."""
        batch = messages and isinstance(messages[0], list)
        convs = messages if batch else [messages]
        prompts = [self.engine.apply_chat_template(c) for c in convs]
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        return outs if batch else outs[0]
