"""Streaming generation for asyncio, as vLLM's `AsyncLLM`.

The engine steps on a Rust thread with the GIL released (`Engine.start_loop`). After each step
that thread hands the step's outputs with `call_soon_threadsafe` to the `AsyncLLM`'s own event loop
on a thread of its own (its *home*), which turns them into `RequestOutput`s (the engine's one output
processor) and feeds each request's queue; every request's state is kept there. A caller's stream
runs as a task of the home loop and hands its outputs across to the caller's loop
(`_across_loops`). Adding and aborting requests only queue work for the engine's thread, so
nothing here blocks a caller's event loop.

In a script:

>>> async def main():
...     llm = AsyncLLM()
...     async for out in llm.generate("Hello", SamplingParams(max_tokens=8), request_id="r1"):
...         print(out.outputs[0].text)
>>> asyncio.run(main())

In Jupyter, whose event loop is already running, `await` it in a cell instead of `asyncio.run`.

So one `AsyncLLM` serves every event loop that calls it, a notebook's cells and a server on a
thread say, and no caller's loop can stall another's streams: a notebook cell that calls its own
server synchronously blocks the notebook's loop, not the home.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Dict, Iterable, List, Optional, Union

from horae.beam_search import beam_search_stream
from horae.checks import waited_since
from horae.engine import Engine, PromptType, cache_salt, logger
from horae.outputs import Deltas, RequestOutput
from horae.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from horae.tokenizer import Tokenizer


class EngineDeadError(RuntimeError):
    """The engine failed a step; the requests in flight were aborted. `code` names the case for
    a server's error body."""

    code = "engine_error"


class EngineDiedError(EngineDeadError):
    """The engine died (a step panicked, or reading a step's outputs failed: a bug): every request
    fails, and no new one is taken. vLLM's `EngineDeadError`: the server answers /health with
    503, to be restarted."""

    code = "engine_dead"


class RequestDroppedError(RuntimeError):
    """The server's rules ended the request: `reason` is "timeout" (still queued at the deadline;
    it cost nothing, so retrying is cheap) or "sla_abort" (no token for too long while running)."""

    def __init__(self, reason: str, request_id: str):
        why = ("not started in time (the queue deadline passed, or its SLO could no longer be met); it cost "
               "nothing, retry" if reason == "timeout" else "no token for longer than the gap bound")
        super().__init__(f"request {request_id} was dropped by the server's rules ({reason}): {why}")
        self.reason = reason


class RequestFailedError(EngineDeadError):
    """The model failed on a step this request was in (a GPU fault, say). The request was
    dropped with its KV blocks; the engine and requests in other steps go on."""


@dataclass
class RequestTimes:
    """When a request arrived, produced its first token and finished (time.monotonic seconds)."""

    arrival: float
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    num_tokens: int = 0

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival


class AsyncLLM:
    """Any number of concurrent `generate` streams over one engine.

    `listeners` are called on the home loop after every step as `f(outputs, stats, times)`:
    the step's `RequestOutput`s, the engine's figures (running, waiting, KV blocks, predicted
    peak, preemptions, prefix-cache counters, step time) and each touched request's timings.
    """

    def __init__(self, model: Optional[Union[str, Path]] = None, **engine_args):
        self.engine = Engine(model, **engine_args)
        self._streams: Dict[str, asyncio.Queue] = {}
        self.times: Dict[str, RequestTimes] = {}
        self.stats: Dict[str, object] = {}
        self.listeners: List[Callable] = []
        #: Called with the request id of every request a client cancelled.
        self.abort_listeners: List[Callable[[str], None]] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # home (`_home`)
        self._thread: Optional[threading.Thread] = None
        self._starting = threading.Lock()
        self._stopper: Optional[weakref.finalize] = None
        self._unanswered = _Counter()
        #: Set when the step loop died (`EngineDiedError`), for good.
        self.dead_error: Optional[EngineDiedError] = None

    @property
    def model_dir(self) -> Path:
        return self.engine.model_dir

    def _home(self) -> asyncio.AbstractEventLoop:
        """The home loop, started with the engine's step loop at the first use (and again after
        `shutdown`)."""
        with self._starting:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_home, args=(loop,), name="horae-outputs", daemon=True)
                thread.start()
                self.stats = self.engine.stats()
                # The engine's thread holds the callback for as long as it runs: through a weak
                # reference, so that an AsyncLLM nobody holds (a notebook cell run again) is
                # collected, its threads stopped and its model freed, instead of living on.
                me = weakref.ref(self)

                def on_step(events, stats, died):  # on the engine thread, GIL held: hand off at once
                    try:
                        loop.call_soon_threadsafe(_on_step, me, events, stats, died)
                    except RuntimeError:
                        pass  # the home loop has closed (shutdown): nobody is listening

                self.engine.start_loop(on_step)
                self._loop, self._thread = loop, thread
                # Stop both threads when this object goes away or the interpreter exits, whichever
                # comes first (neither may call into a finalizing interpreter).
                self._stopper = weakref.finalize(self, _stop, self.engine, loop, thread)
        return self._loop

    def _on_step(self, events, stats, died: bool = False) -> None:
        if events is None:  # the step failed: `stats` is the message
            if died:
                self.dead_error = EngineDiedError(stats)
            self._fail_all(self.dead_error or EngineDeadError(f"engine step failed: {stats}"))
            return
        self.stats = stats
        now = time.monotonic()
        try:
            outs = self.engine.process_outputs(events)
        except Exception as e:  # a bug: no request's output can be trusted now (as vLLM's output handler)
            self.dead_error = EngineDiedError(f"the engine died (reading a step's outputs failed: {e!r}); restart it")
            self._fail_all(self.dead_error)
            return
        touched = {}
        for out in outs:
            t = self.times.get(out.request_id)
            if t is not None:
                n = sum(len(c.token_ids) for c in out.outputs)
                if n > t.num_tokens:
                    if t.first_token is None:
                        t.first_token = now
                    t.last_token, t.num_tokens = now, n
                touched[out.request_id] = t
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        for f in self.listeners:
            try:
                f(outs, stats, touched)
            except Exception:  # a listener's bug (metrics, say) is its own: the requests go on
                logger.exception("an AsyncLLM listener failed")
        for out in outs:
            if out.finished:
                self.times.pop(out.request_id, None)

    def _fail_all(self, err: BaseException) -> None:
        for rid, q in list(self._streams.items()):
            q.put_nowait(err)
            if self.engine.is_unfinished(rid):
                self.engine.abort(rid)

    def beam_search(self, prompt: PromptType, params: BeamSearchParams,
                    request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """vLLM's engine client's `beam_search`: one output when the search ends, its samples the
        best beams (`beam_search.beam_search_stream`, each step's beams as requests of this engine)."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        _, ids = self.engine.prompt_token_ids(prompt)
        return beam_search_stream(self.generate, ids, params, set(self.engine.eos_token_ids),
                                  self.engine.max_request_tokens, self.engine.decode,
                                  request_id or f"beam-{uuid.uuid4().hex}",
                                  cache_salt(prompt))

    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None,
                       arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (cumulative, as vLLM's default; or as its `output_kind` says:
        only what is new, or only the last); the last has `finished`.
        Bad input raises before anything is queued. Closing or cancelling the stream aborts the
        request, and its KV blocks are freed before the next step. `arrival_time`: as
        `Engine.add_request`'s (a request that waited elsewhere first; its times count from then)."""
        self.check_alive()
        home = self._home()
        # The request arrived now, not when it reaches the home loop: its times (TTFT, the SLO
        # bounds, the queue deadline) count from here.
        stream = self._stream(prompt, sampling_params, request_id, time.time() if arrival_time is None else arrival_time)
        if home is not asyncio.get_running_loop():
            stream = _across_loops(stream, home)
        # Counted here, on the caller's side, from the first read: a server checks its queue
        # bound (`num_waiting`) before the next request, while this one may not have reached the
        # home loop yet.
        self._unanswered.add(1)
        unanswered = True
        try:
            async for out in stream:
                if unanswered:
                    self._unanswered.add(-1)
                    unanswered = False
                yield out
        finally:
            if unanswered:
                self._unanswered.add(-1)
            await stream.aclose()

    async def _stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams], request_id: Optional[str],
                      arrival_time: Optional[float]) -> AsyncIterator[RequestOutput]:
        """`generate`'s stream, on the home loop."""
        waited = waited_since(arrival_time)
        rid = self.engine.add_request(request_id, prompt, sampling_params, arrival_time=arrival_time)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        self.times[rid] = RequestTimes(time.monotonic() - waited)
        kind = sampling_params.output_kind if sampling_params is not None else RequestOutputKind.CUMULATIVE
        deltas = Deltas() if kind == RequestOutputKind.DELTA else None
        finished = False
        try:
            while not finished:
                out = await q.get()
                while not q.empty() and not isinstance(out, BaseException):
                    out = q.get_nowait()  # outputs are cumulative: a late reader needs only the newest
                if isinstance(out, BaseException):
                    raise out
                failed = next((c for c in out.outputs if c.finish_reason == "error"), None)
                if failed is not None:
                    raise RequestFailedError(f"request failed: {failed.stop_reason}")
                dropped = next((c for c in out.outputs if c.finish_reason in ("timeout", "sla_abort")), None)
                if dropped is not None:
                    raise RequestDroppedError(dropped.finish_reason, rid)
                finished = out.finished
                if finished:  # release before handing over the last output: the consumer may stop here
                    self._streams.pop(rid, None)
                elif kind == RequestOutputKind.FINAL_ONLY:
                    continue
                yield out if deltas is None else deltas.take(out)
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.times.pop(rid, None)
                if self.engine.is_unfinished(rid):
                    self.engine.abort(rid)
                    self._aborted(rid)

    def _aborted(self, request_id: str) -> None:
        for f in self.abort_listeners:
            f(request_id)

    def abort(self, request_id: Union[str, Iterable[str]]) -> None:
        """Stop one request or several; each one's stream ends with an error. An id no longer in
        flight is passed over, as vLLM's `AsyncLLM.abort` does: a request may finish between a
        client's decision to cancel it and this call."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        home = self._loop
        if home is not None and threading.current_thread() is not self._thread:
            # The streams' state is the home loop's: done there, waited for here (the home loop
            # never waits on a caller, so this is as long as its current task).
            done = asyncio.run_coroutine_threadsafe(_call(self.abort, ids), home)
            try:
                return done.result(timeout=60)
            except (RuntimeError, concurrent.futures.CancelledError):
                pass  # the home loop stopped meanwhile (shutdown): nothing is streaming
        for rid in ids:
            rid = str(rid)
            if not self.engine.is_unfinished(rid):
                continue
            self.engine.abort(rid)
            self._aborted(rid)
            self.times.pop(rid, None)
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(asyncio.CancelledError(f"request {rid} was aborted"))

    # -- what a server needs besides `generate` (`horae.serve`'s engine client; the Ray ingress's
    # `RemoteLLM` offers the same over replicas) ---------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        return self.engine.max_request_tokens

    @property
    def num_waiting(self) -> int:
        """Streams whose request has not answered yet (for a server's queue bound)."""
        return self._unanswered.value

    async def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, called as HF transformers' are (vLLM's `AsyncLLM.get_tokenizer`,
        a coroutine there too)."""
        return self.engine.get_tokenizer()

    @property
    def errored(self) -> bool:
        """Whether the engine died (vLLM's `EngineClient.errored`)."""
        return self.dead_error is not None

    def check_alive(self) -> None:
        """Raise the engine's `EngineDiedError` if it died."""
        if self.dead_error is not None:
            raise self.dead_error

    async def check_health(self) -> None:
        """vLLM's engine client's: raises `EngineDiedError` once the engine has died."""
        self.check_alive()

    async def reset_prefix_cache(self) -> bool:
        """vLLM's `AsyncLLM.reset_prefix_cache`: forget every cached prompt block; False while a
        request holds KV blocks (`Engine.reset_prefix_cache`; off the event loop, as it waits for
        a running step)."""
        return await asyncio.to_thread(self.engine.reset_prefix_cache)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return self.engine.encode(text, add_special_tokens)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.engine.decode(token_ids, skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        return self.engine.token_bytes(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None, **options) -> str:
        return self.engine.apply_chat_template(messages, add_generation_prompt, tools, **options)

    @property
    def num_in_flight(self) -> int:
        return self.engine.num_unfinished_requests

    @property
    def num_streams(self) -> int:
        """Streams open now (a stream closes when its request finishes or is aborted)."""
        return len(self._streams)

    def shutdown(self) -> None:
        """Stop the engine thread (after its current step) and the home loop; the streams still
        open end. A later `generate` starts both again."""
        with self._starting:
            stopper, self._stopper, self._loop, self._thread = self._stopper, None, None, None
        if stopper is not None:
            stopper()
        else:
            self.engine.stop_loop()


class _Counter:
    """A count that callers on several threads change."""

    def __init__(self):
        self.value, self._lock = 0, threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


async def _call(f, *args):
    return f(*args)


def _on_step(me: "weakref.ref[AsyncLLM]", events, stats, died: bool) -> None:
    """On the home loop: the step's outputs to the `AsyncLLM`, if it still exists (the strong
    reference taken here is dropped here, so it is never the engine's thread that frees it)."""
    llm = me()
    if llm is not None:
        llm._on_step(events, stats, died)


def _run_home(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _stop(engine: Engine, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop the engine's step loop, then the home loop: its tasks (streams still open) are
    cancelled and run to their ends first, which aborts their requests."""
    engine.stop_loop()

    async def wind_down():
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop.stop()

    try:
        asyncio.run_coroutine_threadsafe(wind_down(), loop)
    except RuntimeError:
        return  # already closed
    if threading.current_thread() is not thread:  # (on it, when the last reference went there)
        thread.join(timeout=10)


async def _across_loops(stream: AsyncIterator[RequestOutput], home: asyncio.AbstractEventLoop) -> AsyncIterator[RequestOutput]:
    """Run `stream` as a task of the `home` loop (on its own thread) and yield its items here.
    Closing or cancelling this side cancels that task, which closes the stream there (aborting its
    request, as on the home loop itself)."""
    here = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def send(item) -> bool:
        try:
            here.call_soon_threadsafe(inbox.put_nowait, item)
            return True
        except RuntimeError:
            return False  # that loop has closed without closing this stream: nobody is reading

    async def pump() -> None:
        try:
            async for out in stream:
                if not send((True, out)):
                    await stream.aclose()  # aborts the request rather than run it for no one
                    return
        except BaseException as e:
            send((False, e))
            raise
        send((False, None))

    task = asyncio.run_coroutine_threadsafe(pump(), home)
    try:
        while True:
            ok, item = await inbox.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        task.cancel()
