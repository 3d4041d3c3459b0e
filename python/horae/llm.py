"""Offline generation on the real engine, as vLLM's `LLM`: `LLM.generate` and `LLM.chat`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from horae.beam_search import BeamSearch, BeamSearchOutput
from horae.engine import Engine, PromptType, cache_salt
from horae.outputs import RequestOutput
from horae.sampling_params import BeamSearchParams, SamplingParams
from horae.tokenizer import Tokenizer

__all__ = ["LLM"]


class LLM:
    """Offline batch generation, as vLLM's `LLM`.

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct, converted once
    >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    """

    def __init__(self, model: Optional[Union[str, Path]] = None, **engine_args):
        self.engine = Engine(model, **engine_args)
        # Callers on several threads (a threaded web server's handlers) share the engine: one
        # steps it at a time, every step advances all their requests, and each caller takes its
        # own finished outputs from `_finished`.
        self._stepping = threading.Lock()
        self._finished: Dict[str, RequestOutput] = {}

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, called as HF transformers' are (vLLM's): `encode`, `decode`,
        `apply_chat_template`, `eos_token_id`, ..."""
        return self.engine.get_tokenizer()

    def reset_prefix_cache(self) -> bool:
        """vLLM's `LLM.reset_prefix_cache`: forget every cached prompt block (`Engine.reset_prefix_cache`)."""
        return self.engine.reset_prefix_cache()

    def logits(self, prompt: PromptType):
        """Teacher-forced logits of a prompt on the model, as a numpy array `[tokens, vocab]`."""
        _, ids = self.engine.prompt_token_ids(prompt)
        return self.engine.logits(ids)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Run `prompts` (one prompt, a string or `{"prompt_token_ids": [...]}`, or a list of them)
        to the end. `sampling_params` is one `SamplingParams` for all, or a list of one per prompt
        (as vLLM's)."""
        prompts = _prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts: "
                                 "give one SamplingParams, or one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        if not prompts:
            return []
        ids = []
        with self._stepping:
            try:
                for p, sp in zip(prompts, params):
                    ids.append(self.engine.add_request(None, p, sp))
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
            pending = set(ids)
            while pending:
                with self._stepping:
                    # Another caller's steps may have finished some of these meanwhile. Only the
                    # step's outputs and the finished ones are read: not every prompt each step.
                    done = self._finished.keys() & pending
                    if not done:
                        outs = self.engine.step()
                        for out in outs:
                            if out.finished:
                                self._finished[out.request_id] = out
                        done = self._finished.keys() & pending
                        if not outs and not done:  # an idle step: were any aborted by another hand?
                            lost = [rid for rid in pending if not self.engine.is_unfinished(rid)]
                            if lost:  # (`llm.engine.abort`): stepping would never end
                                raise RuntimeError(f"request {lost[0]} was aborted before it finished")
                    for rid in done:
                        results[rid] = self._finished.pop(rid)
                pending -= done
                if bar is not None and done:
                    bar.update(len(done))
        except BaseException:
            with self._stepping:
                for rid in ids:
                    self._finished.pop(rid, None)
                    if rid not in results and self.engine.is_unfinished(rid):
                        self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> List[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: each prompt's `params.beam_width` most likely continuations
        (`beam_search.py`), run on this engine one token a step, all prompts' beams a batch."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = _prompt_list(prompts)
        search = BeamSearch([self.engine.prompt_token_ids(p)[1] for p in prompts], params,
                            set(self.engine.eos_token_ids), self.engine.max_request_tokens,
                            [cache_salt(p) for p in prompts])
        step = search.step()
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=params.max_tokens, desc="beam search", unit="token")
        try:
            while True:
                batch = search.pending()
                if not batch:
                    break
                outs = self.generate(batch, step, use_tqdm=False)
                search.advance([o.outputs[0].logprobs[0] for o in outs])
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return search.outputs(self.engine.decode)

    def chat(self, messages, sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True, tools: Optional[List[dict]] = None, *, chat_template: Optional[str] = None,
             chat_template_kwargs: Optional[dict] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False):
        """One conversation (a list of messages) or several (a list of lists); `sampling_params`
        as `generate`'s. As vLLM's `LLM.chat`: `tools` (OpenAI's function definitions) passed to the
        chat template, `chat_template` instead of the model's, `chat_template_kwargs` for more of
        its variables, and `continue_final_message` (with `add_generation_prompt=False`) to have
        the model go on with the last message, such as an assistant reply begun for it. A list of
        outputs, one per conversation, as vLLM's `LLM.chat` and this class's `generate` return
        them."""
        batch = messages and isinstance(messages[0], list)
        convs = messages if batch else [messages]
        prompts = [self.engine.apply_chat_template(c, add_generation_prompt, tools, chat_template=chat_template,
                                                   chat_template_kwargs=chat_template_kwargs,
                                                   continue_final_message=continue_final_message) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _prompt_list(prompts) -> list:
    """One prompt, or a list of them, as a list; anything else a TypeError saying what a prompt is."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError("prompts must be a prompt (a string or {'prompt_token_ids': [...]}) or a list of them, "
                        f"got {type(prompts).__name__}")
    return list(prompts)
