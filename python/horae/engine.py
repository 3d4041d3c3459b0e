"""The low-level engine, `Engine` (add_request / abort / step), for writing your own serving loop;
`LLM` and `AsyncLLM` drive it. Names follow vLLM's."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from horae import _core
from horae.chat_template import read_tokenizer_config, render_chat_template
from horae.checks import (
    field_error,
    is_int,
    is_number,
    logit_bias_dict,
    names,
    optional_positive_int,
    slo_dict,
    token_ids,
    unsigned_ints,
    waited_since,
)
from horae.models import resolve_model
from horae.outputs import OutputProcessor, RequestOutput
from horae.priors import Prior, resolve_prior
from horae.sampling_params import SamplingParams, check_samples
from horae.tokenizer import Tokenizer

logger = logging.getLogger("horae")

__all__ = ["Engine", "PromptType"]

PromptType = Union[str, Dict[str, object]]


def _text(value: Any, name: str, field: bool = False) -> str:
    """A str that can be encoded as UTF-8: a lone surrogate (which a JSON body can carry as
    "\\ud800") is refused, not passed on to fail inside the tokenizer or the binding (a codec
    error naming no field, or the wrong one). `field`: the error names `name` as the request field
    at fault (a prompt's is named by the caller, which knows which field holds it)."""
    def refused(message: str, kind: type) -> Exception:
        return field_error(message, name, kind) if field else kind(message)

    if not isinstance(value, str):
        raise refused(f"{name} must be a string, got {type(value).__name__}", TypeError)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise refused(f"{name} is not valid UTF-8 text: {e.reason} at position {e.start}", ValueError) from None
    return value


def cache_salt(prompt: PromptType) -> Optional[str]:
    """A prompt dict's `cache_salt` (vLLM's): its cached blocks are shared only with prompts of
    the same salt, so one tenant cannot read another's prompts from the cache's timing. The core
    refuses an empty one."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and not isinstance(salt, str):
        raise TypeError(f"cache_salt must be a string, got {type(salt).__name__}")
    return salt


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
                 max_num_batched_tokens: int = 2048, seed: Optional[int] = None, dtype: str = "auto",
                 kv_cache_dtype: str = "auto", history_window: int = 1000, max_output_bound: Optional[int] = None,
                 speculative: Optional[Dict[str, Any]] = None, device: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: Optional[int] = None,
                 queue_timeout: Optional[float] = None, max_itl_abort: Optional[float] = None,
                 history_file: Optional[Union[str, Path]] = None, history_prior: Prior = None,
                 history_prior_weight: Optional[int] = None,
                 long_prefill_token_threshold: Optional[int] = None, queue: str = "fcfs",
                 slo: Optional[Dict[str, float]] = None, max_long_partial_prefills: int = 1,
                 enable_prefix_caching: bool = True):
        # device: "auto" (the first GPU if one works, else the CPU; `cpu_fallback_reason` says
        # why), "cpu", "cuda" or "cuda:N". A GPU needs an NVIDIA driver for CUDA 12+, Ampere or
        # newer, and NVRTC + cuBLAS (`pip install horae[cuda]` brings them).
        # kv_cache_tokens: the KV pool. Default: 16384 tokens on the CPU; on a GPU, whatever fits
        # in gpu_memory_utilization of its memory after the weights and activations (as vLLM).
        # seed: None draws every unseeded request from fresh entropy; an int makes the whole run
        # reproducible (each request's stream derives from it and the request's order).
        # dtype: how the weights are held. On the CPU "auto" keeps the checkpoint's (a GGUF's own
        # Q4_1/Q8_0 blocks, as the default model's; bf16/f16 checkpoints as bfloat16, others
        # float32); "bfloat16" halves weight memory and bandwidth; "q8_0" quantizes at load (or
        # keeps a GGUF's Q8_0 blocks); "q4_1" runs a GGUF's own 4-bit blocks. Sums are f32 in
        # every case, and so are products, except a "bfloat16" model's where the CPU runs bf16 ones
        # (prefill attention with AVX-512 BF16; linear layers from 16 rows on AMX tiles), as HF
        # transformers' bf16 does, and a "q8_0"/"q4_1" model's linear layers from 16 rows where
        # the CPU runs AMX int8 tiles (activations quantized to 22 bits per block of 32: within
        # the f32 path's goldens); there the prefill attention of a "float32", "q8_0" or "q4_1"
        # model runs on AMX bf16 tiles, each f32 product as three bf16 ones (hi hi + lo hi +
        # hi lo, about 2^-17 of each term; also within the goldens). HORAE_CPU_KERNEL=avx512
        # turns every AMX kernel off. On a GPU: "auto" = "bfloat16", or "float16".
        # kv_cache_dtype: what the KV cache holds (vLLM's option). "auto" is the model's: bf16 for a
        # "bfloat16" model (as HF transformers' bf16 keeps it), f32 for the others on the CPU
        # (their goldens' precision), the weights' 16-bit type on a GPU. "bfloat16" halves an f32
        # or quantized model's KV memory and what a decode step reads of a long history, at
        # bf16's rounding of K and V, and its prefill attention's products are then bf16 where the
        # CPU runs them (a long prompt prefills faster; Q and the softmax weights rounded too, as
        # llama.cpp's f16 cache does); "float32" keeps a bf16 model's K and V exact. A GPU's cache
        # holds its weights' type ("auto", or that type named).
        # history_window / max_output_bound: Past-Future's length history (finished lengths kept)
        # and what it is primed with before any request finished (default: the model's context).
        # speculative: speculative decoding, e.g. {"method": "ngram", "k_max": 4, "adaptive": True}
        # (prompt lookup; also "prompt_lookup_min"/"prompt_lookup_max") or {"method": "draft",
        # "model": folder or .gguf (default: this model), "num_layers": N (keep the first N)}.
        # "adaptive" (default on) is SmartSpec: k chosen per step for goodput, 0 when it does not pay.
        # max_model_len: a context limit below the model's (prompt + max_tokens), as vLLM's.
        # queue_timeout / max_itl_abort: the server's rules (off by default). A request still
        # waiting `queue_timeout` seconds after it was added ends with finish_reason "timeout",
        # having cost no compute; a started one without a token for `max_itl_abort` seconds ends
        # with "sla_abort" and its KV blocks are freed. Neither length feeds Past-Future's history.
        # history_file: Past-Future's history is loaded from this file at start and written to it
        # every 64 finished requests and when the engine stops, so a restarted server starts warm.
        # A missing, corrupt or other model's file means a cold start, logged, never an error.
        # history_prior / history_prior_weight: what a cold history samples from (see
        # horae.priors: "uniform" (default), "max-tokens", "sharegpt", a CSV path or a list of
        # lengths) and how many entries of it (default 8); each finished request replaces one.
        # long_prefill_token_threshold: the most tokens of one prompt prefilled in a step (vLLM's
        # option; default: a chunk may take the whole max_num_batched_tokens). A long prompt then
        # takes more steps, and short requests start beside it instead of after its prefill.
        # max_long_partial_prefills: with a threshold, how many long prompts (longer than it)
        # prefill in one step (vLLM's option, default 1); shorter requests may pass the others.
        # queue: "fcfs" (arrival order) or "slo": waiting requests by least slack against their
        # SLO, the hopeless ones ended at once with finish_reason "timeout" (no compute spent),
        # and preemption takes the request whose loss costs the least goodput. Both serve lower
        # `priority` first. slo: the bounds a request's own `SamplingParams.slo` leaves out,
        # e.g. {"ttft": 2.0, "max_itl": 0.5}.
        # enable_prefix_caching: vLLM's option, on by default: a prompt's full blocks that an
        # earlier request computed are reused. Off, every prompt is computed whole (a baseline
        # for what the cache saves; n > 1 samples then compute the prompt each).

        unsigned_ints({"kv_cache_tokens": kv_cache_tokens, "block_size": block_size, "max_num_seqs": max_num_seqs,
                       "max_num_batched_tokens": max_num_batched_tokens, "seed": seed,
                       "history_window": history_window, "max_output_bound": max_output_bound,
                       "max_model_len": max_model_len},
                      optional={"kv_cache_tokens", "seed", "max_output_bound", "max_model_len"})
        names({"dtype": dtype, "kv_cache_dtype": kv_cache_dtype, "device": device})
        if not isinstance(enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        self.model_dir = resolve_model(model)
        prior = resolve_prior(history_prior)
        history_prior_weight = optional_positive_int(history_prior_weight, "history_prior_weight")
        long_prefill_token_threshold = optional_positive_int(long_prefill_token_threshold, "long_prefill_token_threshold")
        max_long_partial_prefills = optional_positive_int(max_long_partial_prefills, "max_long_partial_prefills") or 1
        speculative = _speculative_config(speculative)
        if device != "cpu":
            from horae.cuda import preload_libraries
            preload_libraries()
        self._core = _core.Engine(str(self.model_dir), scheduler=scheduler, kv_cache_tokens=kv_cache_tokens,
                                  block_size=block_size, max_num_seqs=max_num_seqs,
                                  max_batched_tokens=max_num_batched_tokens, seed=seed, dtype=dtype,
                                  kv_cache_dtype=kv_cache_dtype,
                                  history_window=history_window, max_output_bound=max_output_bound,
                                  speculative=speculative, device=device,
                                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                  queue_timeout=queue_timeout, max_itl_abort=max_itl_abort,
                                  history_file=None if history_file is None else str(history_file),
                                  history_prior=prior, history_prior_weight=history_prior_weight,
                                  long_prefill_token_threshold=long_prefill_token_threshold,
                                  queue=str(queue), slo=slo_dict(slo),
                                  max_long_partial_prefills=max_long_partial_prefills,
                                  enable_prefix_caching=enable_prefix_caching)
        status = self._core.history_status
        if status is not None:
            warm, message = status
            # A first start has no file yet: that is normal. Anything else that starts cold is not.
            level = logging.INFO if warm or not Path(history_file).exists() else logging.WARNING
            logger.log(level, "horae: %s", message)
        self._token_text: Dict[int, str] = {}
        self._outputs = OutputProcessor(self.token_text)
        self._ids = itertools.count()
        self.tokenizer_config = read_tokenizer_config(self.model_dir)

    # -- what the engine is ------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """How the weights are held: "float32", "bfloat16", "q8_0", "q4_1" or (GPU) "float16"."""
        return self._core.dtype

    @property
    def kv_cache_dtype(self) -> str:
        """What the KV cache holds: "float32", "bfloat16" or (GPU) "float16"."""
        return self._core.kv_cache_dtype

    @property
    def decode_weight_bytes(self) -> Optional[int]:
        """On the CPU: bytes of weights one decode step reads (None on a GPU)."""
        return self._core.decode_weight_bytes

    @property
    def device(self) -> str:
        """Where the model runs: "cpu" or "cuda:N (GPU name)"."""
        return self._core.device

    @property
    def cpu_fallback_reason(self) -> Optional[str]:
        """With device="auto" on the CPU: why no GPU was used."""
        return self._core.cpu_fallback_reason

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    @property
    def max_model_len(self) -> int:
        """The context limit of a request (prompt + max_tokens)."""
        return self._core.max_model_len

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + max_tokens) one request can have: the context, or the KV
        pool where that is smaller."""
        return min(self._core.max_model_len, self._core.kv_cache_tokens)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV pool holds."""
        return self._core.kv_cache_tokens

    def stats(self) -> Dict[str, Any]:
        """The engine's figures now: running, waiting, kv_used_blocks, kv_total_blocks,
        block_size, predicted_peak_tokens, preemptions, prefix-cache counters (and speculation's)."""
        return self._core.step_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (vLLM's `reset_prefix_cache`), e.g. between benchmark
        runs, so that the next prompts are computed in full. False, and nothing forgotten, while
        a request holds KV blocks (it waits for a running step)."""
        return self._core.reset_prefix_cache()

    def routing_stats(self) -> Dict[str, Any]:
        """What a router needs of this engine, now: waiting, running, waiting_tokens,
        capacity_tokens, predicted_peak_tokens, planned_output, block_size, cached_blocks and
        cached_bloom (its prefix cache as a Bloom filter of block hashes). See `horae.cluster`."""
        return self._core.routing_stats()

    def take_step_log(self) -> Dict[str, Any]:
        """Per step since the last call: the cost model's features and the measured seconds."""
        return self._core.take_step_log()

    # -- tokenizer ----------------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, called as HF transformers' are (vLLM's `get_tokenizer()`)."""
        return Tokenizer(self)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return self._core.encode(_text(text, "prompt"), add_special_tokens)

    @property
    def eos_token_ids(self) -> List[int]:
        """The tokens that end a sequence (the model's end-of-sequence ids)."""
        return list(self._core.eos_token_ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._core.decode(list(token_ids), skip_special_tokens)

    def token_text(self, token: int) -> str:
        """A token's own text, special tokens' too (what logprobs name a token by); cached."""
        s = self._token_text.get(token)
        if s is None:
            s = self._token_text[token] = self._core.decode([token], False)
        return s

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes: OpenAI's logprob `bytes`, which over a text's tokens join to its
        UTF-8 where a token holding part of a character has a replacement character for text."""
        return self._core.token_bytes(token)  # the core holds the vocabulary's bytes

    def logits(self, token_ids: Sequence[int]):
        """Teacher-forced logits of a token sequence on the model, as a numpy array `[tokens, vocab]`."""
        return self._core.logits(list(token_ids))

    def prompt_token_ids(self, prompt: PromptType):
        """`(text or None, token ids)` of a prompt: a string, or `{"prompt_token_ids": [...]}`
        (or `{"prompt": text}`; either dict may add vLLM's `"cache_salt"`, read by `add_request`)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), token_ids(prompt["prompt_token_ids"], "prompt_token_ids")
            if "prompt" in prompt:
                return self.prompt_token_ids(prompt["prompt"])
        raise TypeError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> str:
        """Queue a request; returns its id. Bad input raises `ValueError` (or `TypeError`) before
        anything is queued. `arrival_time` (vLLM's: `time.time()` when the request first arrived,
        default now) is for a request that waited elsewhere first, as a router's resend: its
        latency bounds and the queue deadline count from then."""
        params = params or SamplingParams()
        waited = waited_since(arrival_time)
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a horae.SamplingParams")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._outputs:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.prompt_token_ids(prompt)
        salt = cache_salt(prompt)
        kept = params.kept_prompt(ids, self.max_request_tokens)
        if len(kept) < len(ids):
            text, ids = None, kept  # the text no longer says what the model reads
        slo = slo_dict(params.slo, "slo")
        check_samples(params.n)
        for name in ("max_tokens", "top_k", "seed", "min_tokens", "logprobs", "prompt_logprobs", "priority"):
            v = getattr(params, name)
            if v is not None and not (is_int(v) and -2**63 <= v < 2**63):
                raise ValueError(f"{name} must be a 64-bit integer, got {v!r}")
        # The core checks the values; a value that is not a number would reach it as a bare
        # conversion error that names no field.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(params, name)
            if not is_number(v):
                raise TypeError(f"{name} must be a number, got {v!r}")
        if params.priority is None:
            raise ValueError("priority must be an integer, got None")
        bias = logit_bias_dict(params.logit_bias)
        allowed = None if params.allowed_token_ids is None else token_ids(params.allowed_token_ids, "allowed_token_ids")
        structured = params.structured_outputs and params.structured_outputs.core_arg()
        after = (params.structured_outputs and params.structured_outputs.start_after) or ""
        for s in params.stop:
            _text(s, "stop", field=True)
        bad_words = self.bad_word_ids(params.bad_words)

        def submit(index: int) -> int:
            # Sample i draws from seed + i (as vLLM's n), wrapped into the core's seeds (0..2**63):
            # the samples after the first are submitted later, inside a step's output handling,
            # where a refusal would kill the engine (a fuzzer's seed 2**63 - 1 with n = 2 did). The
            # first is the seed as sent, which the core checks here, while the caller waits.
            seed = params.seed if params.seed is None or index == 0 else (params.seed + index) % 2**63
            try:
                return self._core.add_request(
                    ids, max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                    top_p=params.top_p, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                    presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                    seed=seed, ignore_eos=params.ignore_eos, logprobs=params.logprobs, min_tokens=params.min_tokens,
                    prompt_logprobs=params.prompt_logprobs if index == 0 else None, stop=params.stop,
                    stop_token_ids=params.stop_token_ids, include_stop_str_in_output=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens, detokenize=params.detokenize, logit_bias=bias,
                    allowed_token_ids=allowed, bad_words=bad_words, structured_outputs=structured,
                    structured_outputs_after=after, slo=slo, priority=params.priority, waited=waited, cache_salt=salt)
            except OverflowError as e:  # a token id past 64 bits: a bad value, not a server fault
                raise ValueError(f"a token id is out of range: {e}") from None

        self._outputs.add(request_id, text, ids, params.n, params.logprobs is not None, submit)
        return request_id

    def bad_word_ids(self, words: List[str]) -> List[List[int]]:
        """Each bad word as the tokens it is written with at the start of the text and after a
        space (vLLM's two readings; the core drops repeats and refuses an empty word)."""
        ids = []
        for w in words:
            w = _text(w, "bad_words", field=True).lstrip()
            ids += [self.encode(text, add_special_tokens=False) for text in (w, " " + w)] if w.strip() else [[]]
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; `KeyError` for an id not in flight."""
        for core_id in self._outputs.remove(str(request_id)):
            self._core.abort(core_id)

    def has_unfinished_requests(self) -> bool:
        return len(self._outputs) > 0

    def is_unfinished(self, request_id: str) -> bool:
        return str(request_id) in self._outputs

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._outputs)

    def step(self) -> List[RequestOutput]:
        """Run one engine step; returns the requests that made progress or finished."""
        return self.process_outputs(self._core.step())

    def process_outputs(self, step_outputs) -> List[RequestOutput]:
        """Turn one step's core outputs into `RequestOutput`s (what `step` returns; `AsyncLLM`
        calls it with the outputs of steps run on the engine thread)."""
        return self._outputs.process(step_outputs)

    def start_loop(self, callback: Callable) -> None:
        """Run steps on a background thread; `callback(step_outputs, stats, False)` after each step
        that has something to say, or `callback(None, message, died)` when a step fails: `died`
        when it panicked, which ends the loop for good (the engine's state is not to be trusted).
        `step()` is not available meanwhile."""
        self._core.start_loop(callback)

    def stop_loop(self) -> None:
        """Stop the background loop after its current step, and wait for it (the loop writes the
        history file, if there is one, as it ends)."""
        self._core.stop_loop()

    # -- Past-Future's history -------------------------------------------------------------
    @property
    def history_status(self) -> Optional[Tuple[bool, str]]:
        """With a history file: (whether it was loaded, what was found)."""
        return self._core.history_status

    def history_lengths(self) -> Optional[List[int]]:
        """Past-Future's recorded output lengths, oldest first (None for other schedulers)."""
        return self._core.history_lengths()

    def save_history(self) -> bool:
        """Write the history file now; False when there is no file (or no history)."""
        return self._core.save_history()

    # -- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Optional[List[Dict[str, Any]]] = None, **options: Any) -> str:
        """Render the model's chat template in a sandbox: a template cannot reach the file system,
        import modules or mutate its inputs. `tools`: OpenAI's function definitions, for
        templates that show them to the model. `options`: `chat_template` (another template),
        `chat_template_kwargs`, `continue_final_message`, as `render_chat_template` takes them."""
        return render_chat_template(self.model_dir, self.tokenizer_config, messages, add_generation_prompt, tools,
                                    **options)
