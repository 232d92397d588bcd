"""`AsyncLLMEngine`: the engine core on one background thread, shared by every client, and
the frontend around it.

Three kinds of thread, one way: submitting threads validate and tokenize (the frontend), the
engine thread only schedules, executes and updates (`EngineCore`), and an output thread turns
the core's plain outputs into text (detokenization, stop strings) and hands them to each
request's consumer. A stop string found there comes back to the engine thread as an abort.

Requests are validated and tokenized on the submitting thread (`LLMEngine.process_request`):
a bad or huge request fails there, synchronously, for its sender only, and the engine thread
never spends time on it. As the engine behind servers it refuses a `max_tokens` the context
cannot hold (vLLM's server message), where the offline `LLM` stops at max_model_len. Requests are submitted from any thread or event loop; each gets a `RequestStream` of
`RequestOutput`s that can be consumed with `async for` (outputs are handed to the consumer's
own loop with `call_soon_threadsafe`) or with a plain `for` from a thread. A consumer that
stops iterating early aborts its request, freeing its KV blocks. A step that raises fails the
requests it was computing (their streams raise `RequestFailedError`); the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from pagedbackend.config import EngineArgs
from pagedbackend.llm_engine import LLMEngine, PreparedRequest, PromptType
from pagedbackend.metrics import StatsSnapshot
from pagedbackend.outputs import RequestOutput
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.step import RequestDone

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine was shut down (or its loop died); the request cannot complete."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (an error inside the step that computed it)."""


class RequestStream:
    """Outputs of one request, in order; the last one has `finished=True`."""

    def __init__(self, request_id: str, engine: "AsyncLLMEngine", loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.finished = False

    # engine thread side
    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    def _unwrap(self, item: Any) -> RequestOutput:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            if item.error is not None:
                raise RequestFailedError(f"request {self.request_id} failed: {item.error}")
        return item

    # thread consumer side
    def __iter__(self) -> Iterator[RequestOutput]:
        return self

    def __next__(self) -> RequestOutput:
        if self._loop is not None:
            raise TypeError("this stream belongs to an event loop; use `async for`")
        if self.finished and self._queue.empty():
            raise StopIteration
        return self._unwrap(self._queue.get())

    # asyncio consumer side
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._loop is None:
            raise TypeError("this stream was created for threads; iterate it with `for`")
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        return self._unwrap(await self._queue.get())

    def abort(self) -> None:
        """Stop the request now (frees its blocks); a no-op once it has finished."""
        if not self.finished:
            self._engine.abort_request(self.request_id)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()


@dataclass
class _Add:
    stream: RequestStream
    request: PreparedRequest


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortSeqs:
    seq_ids: list[int]


# Prompts longer than this are tokenized on a worker thread by `generate` (the tokenizer
# releases the GIL), so the event loop keeps serving other requests meanwhile.
LARGE_PROMPT_CHARS = 16384


def is_large_prompt(prompt: Any) -> bool:
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    return isinstance(text, str) and len(text) > LARGE_PROMPT_CHARS


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.core = engine.core
        self.output_processor = engine.output_processor
        self._cv = threading.Condition()
        self._commands: list[_Add | _Abort | _AbortSeqs] = []
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._core_stats: dict[str, Any] = self.core.stats()
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # engine thread -> output thread
        self._thread = threading.Thread(target=self._loop, name="pagedbackend-engine", daemon=True)
        self._output_thread = threading.Thread(target=self._output_loop, name="pagedbackend-output", daemon=True)
        self._thread.start()
        self._output_thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, progress: bool = True) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_engine_args(args, progress))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------- submission
    def submit(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
               request_id: str | None = None, priority: int = 0) -> RequestStream:
        """Thread-friendly: queue a request and return its stream, to iterate with `for`.
        Raises `InvalidRequest` (a ValueError naming the field) right here for a bad request."""
        return self._submit(prompt, sampling_params, request_id, priority, loop=None)

    def add_request(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Validate and queue a request now (raising `InvalidRequest` at once if it is bad)
        and return its stream, to consume with `async for` on `loop` (default: the running
        loop; give it to submit from another thread for a loop that will consume)."""
        return self._submit(prompt, sampling_params, request_id, priority, loop=loop or asyncio.get_running_loop())

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield `RequestOutput`s as tokens arrive (cumulative, with deltas). Leaving the loop
        early (break, cancellation, client gone) aborts the request."""
        loop = asyncio.get_running_loop()
        constrained = sampling_params is not None and sampling_params.structured_outputs is not None
        if is_large_prompt(prompt) or constrained:  # tokenizing / a grammar compile: not on the loop serving others
            stream = await loop.run_in_executor(None, self._submit, prompt, sampling_params, request_id, priority, loop)
        else:
            stream = self.add_request(prompt, sampling_params, request_id, priority)
        async for out in self.stream(stream):
            yield out

    @staticmethod
    async def stream(stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """Iterate a stream from `add_request`; leaving early aborts the request."""
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _submit(self, prompt, params, request_id, priority, loop) -> RequestStream:
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        if self._stopping or self._dead is not None:
            raise EngineDeadError("the engine is not running") from self._dead
        with self._cv:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
        prepared = self.engine.process_request(request_id, prompt, params, priority=priority, max_tokens_fit=True)
        stream = RequestStream(request_id, self, loop)
        with self._cv:
            if self._stopping or self._dead is not None:
                raise EngineDeadError("the engine is not running") from self._dead
            if stream.request_id in self._streams:
                raise ValueError(f"request_id {stream.request_id!r} is already in use")
            self.output_processor.add_request(request_id, prepared.prompt, prepared.prompt_token_ids,
                                              prepared.params, prepared.arrival_time)
            self._streams[stream.request_id] = stream
            self._commands.append(_Add(stream, prepared))
            self._cv.notify()
        return stream

    def abort_request(self, request_id: str) -> None:
        """Thread-safe abort; the request's stream ends with finish_reason "abort"."""
        with self._cv:
            if request_id in self._streams and not self._stopping:
                self._commands.append(_Abort(request_id))
                self._cv.notify()

    async def abort(self, request_id: str) -> None:
        self.abort_request(request_id)

    def get_stats(self) -> dict[str, Any]:
        """The core's snapshot after its latest step, and the frontend's finished-request
        statistics (safe from any thread)."""
        return self.stats_snapshot().as_dict()

    def stats_snapshot(self) -> StatsSnapshot:
        with self._cv:
            core = dict(self._core_stats)
        return StatsSnapshot.from_dict({**core, **self.engine.frontend_stats()})

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        """The engine thread: commands, then one step of the core; its outputs go to the
        output thread with the stats snapshot taken right after."""
        core = self.core
        try:
            self.engine.pin_thread_device()  # this thread launches the kernels from here on
            while True:
                with self._cv:
                    while not self._commands and not self._stopping and not core.has_unfinished():
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                failed = [done for cmd in commands if (done := self._apply(cmd)) is not None]
                outputs = core.step() if core.has_unfinished() else core.take_outputs()
                stats = core.stats()
                self._outputs.put((failed + outputs, stats))
        except BaseException as e:  # a bug in the loop itself: do not leave clients hanging
            logger.exception("engine loop died")
            self._dead = e
        finally:
            self._fail_all(EngineDeadError("the engine shut down" if self._dead is None else f"the engine loop died: {self._dead}"))

    def _apply(self, cmd: _Add | _Abort | _AbortSeqs) -> RequestDone | None:
        if isinstance(cmd, _Add):
            try:
                self.core.add(cmd.request)
            except Exception as e:  # validated already: this is the engine's fault, not the client's
                logger.exception("adding request %s failed", cmd.request.request_id)
                return RequestDone(cmd.request.request_id, "error", error=f"{type(e).__name__}: {e}")
        elif isinstance(cmd, _Abort):
            self.core.abort(cmd.request_id)
        else:
            self.core.abort_seqs(cmd.seq_ids)
        return None

    def _output_loop(self) -> None:
        """The output thread: detokenize, apply stop strings, hand outputs to their streams."""
        while True:
            item = self._outputs.get()
            if item is None:
                return
            core_outputs, stats = item
            try:
                results, aborts = self.output_processor.process(core_outputs)
            except Exception:  # noqa: BLE001 - a bug here must not stall every stream
                logger.exception("processing the engine's outputs failed")
                continue
            with self._cv:
                # Before the outputs: a client that sees its request finish sees stats with it.
                self._core_stats = stats
                if aborts and not self._stopping:
                    self._commands.append(_AbortSeqs(aborts))
                    self._cv.notify()
            self._dispatch(results)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._cv:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
            if stream is not None:
                stream._put(out)

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            streams, self._streams = self._streams, {}
            self._stopping = True
            self._commands.clear()
        for request_id, stream in streams.items():
            try:
                self.core.abort(request_id)
            except Exception:  # the engine may be in a bad state; the client still gets an answer
                logger.exception("abort of %s during shutdown failed", request_id)
            self.output_processor.remove(request_id)
            stream._put(error)
        self.core.take_outputs()
        self._outputs.put(None)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still in flight end with `EngineDeadError`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if threading.current_thread() is not self._output_thread:
            self._output_thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.shutdown()  # tensor-parallel workers (the loop no longer steps)

    def __enter__(self) -> "AsyncLLMEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
