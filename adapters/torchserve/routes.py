"""What the TorchServe handler answers, independent of how TorchServe drives it.

`open_reply` parses one request for its route (the native format at `/predictions/<model>`,
OpenAI's `v1/completions`, `v1/chat/completions`, `v1/models` under
`/predictions/<model>/<version>/`), validates it and queues it in the engine, all at once and
synchronously: every error a request can carry (bad JSON, a bad field, a prompt over
max_model_len) is known before anything is answered and becomes a 4xx with a JSON body naming
the field, and a stream's status and Content-Type are known from its first byte, however long
its first token takes. Failures while generating are reported inside a stream, in that
stream's format; a non-streaming reply fails with its status (`Reply.stream` False).

`RequestPump` runs a reply on the handler's event loop for continuous-batching mode, where the
frontend asks for whatever is new once per step.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from pagedbackend.errors import InvalidRequest
from pagedbackend.openai_api import (complete_openai, models_response, parse_chat, parse_completion, stream_openai,
                                     submit_openai)
from pagedbackend.protocol import NativeStream, error_body, load_json, native_response, parse_generate

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON = "application/json"


@dataclass
class Reply:
    status: int
    content_type: str
    pieces: AsyncIterator[str]
    stream: bool = False  # pieces go out as they come; else one body, sent when complete
    abort: Callable[[], None] = field(default=lambda: None)  # thread-safe: stop the engine requests


class MeteredEngine:
    """The engine as the routes see it: calls `on_finished` with every finished output."""

    def __init__(self, engine: Any, on_finished: Callable[[Any], None]) -> None:
        self._engine = engine
        self._on_finished = on_finished

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    @property
    def max_prompt_chars(self) -> int:
        return self._engine.engine.max_prompt_chars

    def add_request(self, prompt, params, request_id, priority: int = 0, loop=None):
        return self._engine.add_request(prompt, params, request_id, priority, loop=loop)

    async def stream(self, stream):
        async for out in self._engine.stream(stream):
            if out.finished:
                self._on_finished(out)
            yield out


def _aborter(streams: list[Any]) -> Callable[[], None]:
    def abort() -> None:
        for stream in streams:
            stream.abort()
    return abort


def _native(engine: Any, body: Any, request_id: str, loop) -> Reply:
    req = parse_generate(load_json(body))
    stream = engine.add_request(req.prompt, req.params, request_id, req.priority, loop=loop)

    async def lines() -> AsyncIterator[str]:
        fmt = NativeStream()
        async for out in engine.stream(stream):
            for line in fmt.lines(out):
                yield line

    async def whole() -> AsyncIterator[str]:
        final = None
        async for out in engine.stream(stream):
            final = out
        yield json.dumps(native_response(final))

    abort = _aborter([stream])
    return Reply(200, NDJSON, _guarded(lines(), NDJSON), True, abort) if req.stream else Reply(200, JSON, whole(), False, abort)


def _openai(engine: Any, route: str, body: Any, request_id: str, model: str, tokenizer: Any,
            chat_template: str | None, loop, tool_call_parser: str) -> Reply:
    data = load_json(body)
    req = (parse_chat(data, tokenizer, chat_template, engine.max_prompt_chars, tool_call_parser)
           if route == "v1/chat/completions" else parse_completion(data))
    streams = submit_openai(engine, req, request_id, loop)
    if req.stream:
        return Reply(200, SSE, _guarded(stream_openai(engine, req, request_id, model, streams), SSE), True,
                     _aborter(streams))

    async def whole() -> AsyncIterator[str]:
        yield json.dumps(await complete_openai(engine, req, request_id, model, streams))

    return Reply(200, JSON, whole(), False, _aborter(streams))


async def _single(text: str) -> AsyncIterator[str]:
    yield text


async def _guarded(pieces: AsyncIterator[str], content_type: str) -> AsyncIterator[str]:
    """A stream's pieces, with a failure turned into an error in the stream's format."""
    try:
        async for piece in pieces:
            yield piece
    except Exception as e:  # noqa: BLE001 - the client gets the error, the worker keeps serving
        _, body = error_body(e)
        if content_type == SSE:
            yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        else:
            yield json.dumps(body) + "\n"


async def complete_body(reply: Reply) -> tuple[int, str]:
    """A non-streaming reply's status and whole body; a failure while generating is that
    failure's status and error body, never a 200."""
    try:
        return reply.status, "".join([piece async for piece in reply.pieces])
    except Exception as e:  # noqa: BLE001
        status, body = error_body(e)
        return status, json.dumps(body)


def open_reply(engine: Any, url_path: str, body: Any, request_id: str, model: str, tokenizer: Any,
               chat_template: str | None, loop: asyncio.AbstractEventLoop | None = None, *,
               tool_call_parser: str = "hermes") -> Reply:
    """Parse, validate and queue one request now; `loop` is where its pieces will be consumed
    (default: the running loop); `tool_call_parser` reads `tool_choice: "auto"` calls."""
    route = (url_path or "").strip("/")
    try:
        if route == "":
            return _native(engine, body, request_id, loop)
        if route in ("v1/completions", "v1/chat/completions"):
            return _openai(engine, route, body, request_id, model, tokenizer, chat_template, loop, tool_call_parser)
        if route == "v1/models":
            return Reply(200, JSON, _single(json.dumps(models_response(model))))
        raise InvalidRequest(None, f"unknown route {route!r}; use /predictions/<model>, or v1/completions, "
                                   "v1/chat/completions, v1/models under /predictions/<model>/<version>/", 404)
    except Exception as e:  # noqa: BLE001
        return error_reply(e)


def error_reply(exc: BaseException) -> Reply:
    status, err = error_body(exc)
    return Reply(status, JSON, _single(json.dumps(err)))


class RequestPump:
    """One request's reply running on the handler's event loop (continuous-batching mode).
    A stream's pieces are buffered until the frontend's next step takes them; a non-streaming
    reply becomes one body (and its final status) when complete. `cancel()` (the client is
    gone) stops the reply and aborts its engine requests, freeing their blocks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cond: threading.Condition, reply: Reply | None = None,
                 opener: Callable[[], Reply] | None = None) -> None:
        """Give the `reply`, or an `opener` that makes it (parsing and tokenizing a large body):
        it then runs on a worker thread, and the pump is not `opened` until it is done."""
        self._cond = cond
        self._reply = reply
        self.status: int | None = None
        self.content_type: str | None = None
        self.stream = False
        if reply is not None:
            self._opened(reply)
        self.pieces: list[str] = []
        self.done = False
        self.started = False  # a response for it has been returned to the frontend
        self._future = asyncio.run_coroutine_threadsafe(self._run(opener), loop)

    def _opened(self, reply: Reply) -> None:
        self._reply = reply
        self.status, self.content_type = reply.status, reply.content_type
        self.stream = reply.stream and reply.status < 400

    @property
    def opened(self) -> bool:
        return self.status is not None

    async def _run(self, opener: Callable[[], Reply] | None) -> None:
        try:
            if opener is not None:
                try:
                    reply = await asyncio.get_running_loop().run_in_executor(None, opener)
                except Exception as e:  # noqa: BLE001 - an unopened pump would be deferred forever
                    reply = error_reply(e)
                with self._cond:
                    self._opened(reply)
                    self._cond.notify_all()
            if not self.stream:
                status, body = await complete_body(self._reply)
                with self._cond:
                    self.status = status
                    self.pieces.append(body)
                return
            async for piece in self._reply.pieces:
                with self._cond:
                    self.pieces.append(piece)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()

    @property
    def has_news(self) -> bool:
        """Something to send: a stream's new pieces, or a whole reply that is complete."""
        return self.opened and (self.done or (self.stream and bool(self.pieces)))

    def take(self) -> tuple[str, bool]:
        """(everything buffered, whether the reply is complete); call with the condition held."""
        text, self.pieces = "".join(self.pieces), []
        return text, self.done

    def cancel(self) -> None:
        self._future.cancel()
        if self._reply is not None:
            self._reply.abort()
