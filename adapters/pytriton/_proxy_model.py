"""Triton Python-backend model for pagedbackend's PyTriton bindings: PyTriton's proxy plus
request cancellation.

This file runs inside Triton's Python backend stub, not in the serving process: it is written
into the Triton model repository as `model.py`, with PyTriton's own proxy beside it as
`pytriton_model.py` (see `pagedbackend.adapters.pytriton.proxy`). Only the standard library and
those sibling files may be imported here.

Triton marks a request cancelled when its gRPC stream is cancelled or its SSE connection
closes, but PyTriton 0.7 never asks. This proxy tags every request with a key (a request
parameter) and, in each request's own response handler, asks `is_cancelled()` before taking
the next response and every 50 ms while waiting for one. A cancelled key is reported to the
serving process through PyTriton's own request channel, as a request carrying only a cancel
parameter; the binding then aborts the engine request, which frees its KV blocks.

`is_cancelled()` is only ever called from that handler, before the request's final response
is sent: asking about a request Triton has already released crashes the server
(TRITONBACKEND_ResponseFactoryIsCancelled on a freed factory, seen with a polling thread).
"""

import asyncio
import uuid
from concurrent.futures import Future

from . import pytriton_model as _pytriton
from .types import Request

KEY_PARAMETER = "pagedbackend_request_key"
CANCEL_PARAMETER = "pagedbackend_cancel"
POLL_INTERVAL_S = 0.05


class _CancelWatchingQueue:
    """The responses queue as the handler sees it; checks for cancellation while it waits."""

    def __init__(self, queue, triton_requests, keys, report):
        self._queue = queue
        self._watched = [(r, k) for r, k in zip(triton_requests, keys) if k is not None]
        self._report = report
        self._pending = None

    async def get(self):
        while True:
            self._check()
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._queue.get())
            try:
                done, _ = await asyncio.wait({self._pending}, timeout=POLL_INTERVAL_S)
            except asyncio.CancelledError:
                self._pending.cancel()
                raise
            if done:
                task, self._pending = self._pending, None
                return task.result()

    def task_done(self):
        self._queue.task_done()

    def _check(self):
        for request, key in list(self._watched):
            if request.is_cancelled():
                self._watched.remove((request, key))
                self._report(key)


class TritonPythonModel(_pytriton.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        self._key_of = {}  # id(triton request) -> key, while the request is in flight
        requests_server = self._requests_server
        wrap = requests_server._wrap_request

        def wrap_with_key(triton_request, inputs, span=None):
            request = wrap(triton_request, inputs, span)
            key = self._key_of.get(id(triton_request))
            if key is not None:
                request.parameters = dict(request.parameters or {}, **{KEY_PARAMETER: key})
            return request

        requests_server._wrap_request = wrap_with_key
        server = requests_server._server
        handle = server._handle_responses_fn

        async def handle_watching_cancellation(scope, responses_queue, responses_future):
            triton_requests = self._requests.get(scope["requests_id"], [])
            keys = [self._key_of.get(id(r)) for r in triton_requests]
            queue = _CancelWatchingQueue(responses_queue, triton_requests, keys, self._report_cancel)
            try:
                return await handle(scope, queue, responses_future)
            finally:
                for r in triton_requests:
                    self._key_of.pop(id(r), None)

        server._handle_responses_fn = handle_watching_cancellation

    def execute(self, triton_requests):
        for request in triton_requests:
            self._key_of[id(request)] = uuid.uuid4().hex
        return super().execute(triton_requests)

    def _report_cancel(self, key):
        requests_id = uuid.uuid4().bytes[:4]
        while requests_id in self._requests:
            requests_id = uuid.uuid4().bytes[:4]
        self._requests[requests_id] = []  # no Triton request waits for an answer to this one
        payload = self._serializer_deserializer.serialize_requests(
            [Request(data={}, parameters={CANCEL_PARAMETER: key})]
        )
        server = self._requests_server._server
        asyncio.run_coroutine_threadsafe(server.send_requests(requests_id, payload, Future()), server.server_loop)
