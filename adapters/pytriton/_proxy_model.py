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

The parameters named `pagedbackend_*` are the proxy's alone: it drops any a client sends (and
names them in `pagedbackend_rejected`, so the binding answers that client with an error), and
marks the requests it forwards with the model's secret (`pagedbackend_control`), which the
binding generated and wrote beside this file as `pagedbackend_control_key`. Without that
secret a request's reserved parameters are never obeyed, so a client cannot send the cancel
command, or pick the key (engine request id) of its request.

`is_cancelled()` is only ever called from that handler, before the request's final response
is sent: asking about a request Triton has already released crashes the server
(TRITONBACKEND_ResponseFactoryIsCancelled on a freed factory, seen with a polling thread). Once
the handler has taken a request's last response (or was cancelled) the request is not asked
about again.
"""

import asyncio
import logging
import pathlib
import uuid
from concurrent.futures import Future

from . import pytriton_model as _pytriton
from .communication import PyTritonResponseFlags
from .types import Request

RESERVED_PREFIX = "pagedbackend_"
KEY_PARAMETER = "pagedbackend_request_key"
CANCEL_PARAMETER = "pagedbackend_cancel"
CONTROL_PARAMETER = "pagedbackend_control"
REJECTED_PARAMETER = "pagedbackend_rejected"
CONTROL_KEY_FILE = "pagedbackend_control_key"
POLL_INTERVAL_S = 0.05

LOGGER = logging.getLogger(__name__)


def _read_control_secret():
    path = pathlib.Path(__file__).with_name(CONTROL_KEY_FILE)
    secret = path.read_text().strip() if path.is_file() else ""
    if not secret:
        raise RuntimeError(f"pagedbackend proxy: no control key at {path}")
    return secret


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
                self._watched = []  # the handler now sends the final (error) responses
                raise
            if done:
                task, self._pending = self._pending, None
                item = task.result()
                if item[0] & PyTritonResponseFlags.EOS:
                    self._watched = []  # the handler sends the final responses next: requests released
                return item

    def task_done(self):
        self._queue.task_done()

    def _check(self):
        for request, key in list(self._watched):
            if request.is_cancelled():
                self._watched.remove((request, key))
                self._report(key)


class TritonPythonModel(_pytriton.TritonPythonModel):
    def initialize(self, args):
        self._control_secret = _read_control_secret()
        super().initialize(args)
        self._key_of = {}  # id(triton request) -> key, while the request is in flight
        requests_server = self._requests_server
        wrap = requests_server._wrap_request

        def wrap_with_key(triton_request, inputs, span=None):
            request = wrap(triton_request, inputs, span)
            parameters = dict(request.parameters or {})
            forged = sorted(k for k in parameters if k.lower().startswith(RESERVED_PREFIX))
            for name in forged:  # a client's: never forwarded as if they were ours
                del parameters[name]
            if forged:
                parameters[REJECTED_PARAMETER] = ",".join(forged)
            key = self._key_of.get(id(triton_request))
            if key is not None:
                parameters[KEY_PARAMETER] = key
            parameters[CONTROL_PARAMETER] = self._control_secret
            request.parameters = parameters
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
        server = self._requests_server._server
        loop = server.server_loop
        if loop is None or server._shutdown_event.is_set():
            return  # stopping: the serving process ends every request itself
        requests_id = uuid.uuid4().bytes[:4]
        while requests_id in self._requests:
            requests_id = uuid.uuid4().bytes[:4]
        self._requests[requests_id] = []  # no Triton request waits for an answer to this one
        payload = self._serializer_deserializer.serialize_requests(
            [Request(data={}, parameters={CANCEL_PARAMETER: key, CONTROL_PARAMETER: self._control_secret})]
        )

        def sent(future):
            error = "cancelled" if future.cancelled() else future.exception()
            if error is not None:
                self._requests.pop(requests_id, None)
                LOGGER.warning(f"could not report the cancellation of {key}: {error!r}")  # noqa: G004

        future = asyncio.run_coroutine_threadsafe(server.send_requests(requests_id, payload, Future()), loop)
        future.add_done_callback(sent)
