"""What the TorchServe handler answers, independent of how TorchServe drives it.

`open_reply` parses one request for its route (the native format at
`/predictions/<model>`, OpenAI's `v1/completions`, `v1/chat/completions`, `v1/models` under
`/predictions/<model>/<version>/`), starts it, and waits for the first piece, so that every
error that can be known before answering (bad JSON, bad field, a prompt over max_model_len)
becomes a 4xx with a JSON body naming the field. After the first piece the status is
committed; a later failure is reported inside the stream, in that stream's format.

`RequestPump` runs a reply on the handler's event loop for continuous-batching mode, where the
frontend asks for whatever is new once per step.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from pagedbackend.errors import InvalidRequest
from pagedbackend.openai_api import complete_openai, models_response, parse_chat, parse_completion, stream_openai
from pagedbackend.protocol import NativeStream, error_body, load_json, native_response, parse_generate

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON = "application/json"


@dataclass
class Reply:
    status: int
    content_type: str
    pieces: AsyncIterator[str]


class MeteredEngine:
    """The engine as the routes see it: calls `on_finished` with every finished output."""

    def __init__(self, engine: Any, on_finished: Callable[[Any], None]) -> None:
        self._engine = engine
        self._on_finished = on_finished

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    async def generate(self, prompt, params, request_id, priority: int = 0):
        async for out in self._engine.generate(prompt, params, request_id, priority=priority):
            if out.finished:
                self._on_finished(out)
            yield out


async def _native(engine: Any, body: Any, request_id: str) -> tuple[str, AsyncIterator[str]]:
    req = parse_generate(load_json(body))

    async def stream() -> AsyncIterator[str]:
        fmt = NativeStream()
        async for out in engine.generate(req.prompt, req.params, request_id, priority=req.priority):
            for line in fmt.lines(out):
                yield line

    async def whole() -> AsyncIterator[str]:
        final = None
        async for out in engine.generate(req.prompt, req.params, request_id, priority=req.priority):
            final = out
        yield json.dumps(native_response(final))

    return (NDJSON, stream()) if req.stream else (JSON, whole())


async def _openai(engine: Any, route: str, body: Any, request_id: str, model: str, tokenizer: Any,
                  chat_template: str | None) -> tuple[str, AsyncIterator[str]]:
    data = load_json(body)
    req = parse_chat(data, tokenizer, chat_template) if route == "v1/chat/completions" else parse_completion(data)
    if req.stream:
        return SSE, stream_openai(engine, req, request_id, model)

    async def whole() -> AsyncIterator[str]:
        yield json.dumps(await complete_openai(engine, req, request_id, model))

    return JSON, whole()


async def _single(text: str) -> AsyncIterator[str]:
    yield text


async def _rest(first: str, pieces: AsyncIterator[str], content_type: str) -> AsyncIterator[str]:
    """The pieces after the first, with a failure turned into an error in the stream's format."""
    yield first
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


async def open_reply(engine: Any, url_path: str, body: Any, request_id: str, model: str, tokenizer: Any,
                     chat_template: str | None) -> Reply:
    route = (url_path or "").strip("/")
    try:
        if route == "":
            content_type, pieces = await _native(engine, body, request_id)
        elif route in ("v1/completions", "v1/chat/completions"):
            content_type, pieces = await _openai(engine, route, body, request_id, model, tokenizer, chat_template)
        elif route == "v1/models":
            content_type, pieces = JSON, _single(json.dumps(models_response(model)))
        else:
            raise InvalidRequest(None, f"unknown route {route!r}; use /predictions/<model>, or v1/completions, "
                                       "v1/chat/completions, v1/models under /predictions/<model>/<version>/", 404)
        first = await pieces.__anext__()
    except StopAsyncIteration:
        return Reply(200, JSON, _single(""))
    except Exception as e:  # noqa: BLE001
        status, err = error_body(e)
        return Reply(status, JSON, _single(json.dumps(err)))
    return Reply(200, content_type, _rest(first, pieces, content_type))


class RequestPump:
    """One request's reply running on the handler's event loop (continuous-batching mode):
    pieces are buffered until the frontend's next step takes them; `cancel()` (the client is
    gone) stops the reply, which aborts the request in the engine."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cond: threading.Condition, opener) -> None:
        self._cond = cond
        self.status: int | None = None
        self.content_type: str | None = None
        self.pieces: list[str] = []
        self.done = False
        self.started = False  # a response for it has been returned to the frontend
        self._future = asyncio.run_coroutine_threadsafe(self._run(opener), loop)

    async def _run(self, opener) -> None:
        try:
            reply = await opener()
            with self._cond:
                self.status, self.content_type = reply.status, reply.content_type
                self._cond.notify_all()
            async for piece in reply.pieces:
                with self._cond:
                    self.pieces.append(piece)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()

    @property
    def opened(self) -> bool:
        return self.status is not None or self.done

    @property
    def has_news(self) -> bool:
        return bool(self.pieces) or self.done

    def take(self) -> tuple[str, bool]:
        """(everything buffered, whether the reply is complete); call with the condition held."""
        text, self.pieces = "".join(self.pieces), []
        return text, self.done

    def cancel(self) -> None:
        self._future.cancel()
