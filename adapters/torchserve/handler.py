"""TorchServe custom handler: one `AsyncLLMEngine` per worker, batching every client's requests.

Archive it with `pagedbackend archive` (which passes this file to torch-model-archiver). It
works in both of TorchServe's LLM streaming modes, chosen in model-config.yaml:

* `continuousBatching: true` (the template's default): the frontend calls `handle()` once per
  step with every active request and sends back what is new for each. When a client
  disconnects, TorchServe drops its request from the next step: that is the only disconnect
  signal TorchServe 0.12 gives, and the handler answers it by aborting the request, which
  frees its KV blocks.
* `asyncCommunication: true` (with `batchSize: 1`): every request is a coroutine that streams
  its own pieces (lowest per-chunk latency). TorchServe never tells an async handler that a
  client left, so in this mode an abandoned request runs until it stops by itself.

The `handler:` section of model-config.yaml holds every `EngineArgs` field plus `model_path`
(the model directory, absolute or inside the archive; default: the archive itself),
`served_model_name`, `chat_template` (a file in the archive or a template string),
`metrics_interval_s` and `tool_call_parser` (how `tool_choice: "auto"` reads tool calls from
the output: `hermes`, `llama3_json`, or `auto` by the model's family). Unknown keys or invalid values fail the load with a message naming them.
Bad requests get a 4xx JSON error naming the field; no exception ever escapes `handle()`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pagedbackend import AsyncLLMEngine, EngineArgs
from pagedbackend.adapters.torchserve.config import flatten_handler, tensor_parallel_size, validate_model_config
from pagedbackend.distributed import launched_by_torchrun
from pagedbackend.adapters.torchserve.metrics import EngineMetrics
from pagedbackend.adapters.torchserve.routes import MeteredEngine, RequestPump, complete_body, error_reply, open_reply
from pagedbackend.errors import InvalidRequest
from pagedbackend.structured_output.tool_parsers import parser_for_model_type

logger = logging.getLogger(__name__)

# Async mode: pieces larger than this are sent in several writes. TorchServe writes the
# worker socket from two threads without a lock; small writes cannot interleave.
MAX_WRITE = 16 * 1024
# Continuous-batching mode: how long one step waits for something new to send.
STEP_WAIT_S = 0.05


# Request bodies larger than this are parsed and tokenized on a worker thread (the tokenizer
# releases the GIL), so the step that serves every other stream never waits for them.
LARGE_BODY_BYTES = 64 * 1024
# Fields that may compile a grammar (structured output, forced tool calls): opened on a worker
# thread too, as a compile (or the first request's vocabulary read) can take long.
GRAMMAR_FIELDS = ("response_format", "structured_outputs", "tool_choice", "tools")
_GRAMMAR_KEYS = tuple(f'"{name}"'.encode() for name in GRAMMAR_FIELDS)


def _opens_slowly(item: dict[str, Any]) -> bool:
    """Whether parsing and queueing this request may take long: a large body, or one that may
    compile a grammar."""
    body = item.get("data") or item.get("body")
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, (bytes, bytearray)):
        return len(body) > LARGE_BODY_BYTES or any(key in body for key in _GRAMMAR_KEYS)
    if isinstance(body, dict):  # TorchServe decoded the JSON already: look at the text fields
        if any(name in body for name in GRAMMAR_FIELDS):
            return True
        texts = [v for v in body.values() if isinstance(v, str)]
        messages = body.get("messages")
        if isinstance(messages, list):
            texts += [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return any(len(t) > LARGE_BODY_BYTES for t in texts)
    return False


class PagedLLMHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.engine: AsyncLLMEngine | None = None
        self.continuous = False

    # ---------------------------------------------------------------- loading
    def initialize(self, context: Any) -> None:
        from ts.handler_utils.utils import send_intermediate_predict_response

        self._send_intermediate = send_intermediate_predict_response
        yaml = context.model_yaml_config or {}
        validate_model_config(yaml)
        self.continuous = bool(yaml.get("continuousBatching"))
        cfg = flatten_handler(yaml.get("handler"))
        model_dir = Path(context.system_properties.get("model_dir") or ".")
        model = Path(cfg.pop("model_path", "") or model_dir)
        if not model.is_absolute():
            model = model_dir / model
        self.model_name = cfg.pop("served_model_name", None) or context.model_name
        self.chat_template = self._chat_template(cfg.pop("chat_template", None), model_dir)
        interval = float(cfg.pop("metrics_interval_s", 1.0))
        parser = cfg.pop("tool_call_parser", "auto")
        tp = tensor_parallel_size(yaml)
        cfg["tensor_parallel_size"] = tp
        gpu = context.system_properties.get("gpu_id")
        if str(yaml.get("deviceType", "")).lower() == "cpu":  # TorchServe's own switch, as upstream configs set it
            if cfg.setdefault("device", "cpu") != "cpu":
                raise ValueError(f"model-config.yaml: deviceType: cpu, but handler device: {cfg['device']}")
        elif gpu is not None and "device" not in cfg:
            import torch

            if torch.cuda.is_available():  # each rank takes its own GPU when tensor-parallel
                cfg["device"] = "cuda" if tp > 1 else f"cuda:{gpu}"
        if tp > 1 and launched_by_torchrun():
            # parallelType: tp: TorchServe's torchrun started every rank, each loads this handler
            # and receives every request. Rank 0 runs the engine and drives the others; only
            # its responses reach clients.
            cfg["distributed_executor_backend"] = "mp"
            if int(os.environ["RANK"]) != 0:
                self._follow(EngineArgs.from_dict({"model": str(model), **cfg}))
                return
        args = EngineArgs.from_dict({"model": str(model), **cfg})
        self.engine = AsyncLLMEngine.from_engine_args(args, progress=False)
        self.metrics = EngineMetrics(context.metrics, self.engine, interval)
        self.metrics.start()
        self.metered = MeteredEngine(self.engine, self.metrics.request_finished)
        model_type = self.engine.engine.config.model_config.hf.get("model_type", "")
        self.tool_call_parser = parser_for_model_type(model_type) if parser == "auto" else parser
        if self.continuous:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="pagedbackend-handler-loop", daemon=True).start()
            self._cond = threading.Condition()
            self._pumps: dict[str, RequestPump] = {}
        logger.info("pagedbackend engine ready: model %s, %s mode, %d KV blocks", model,
                    "continuous-batching" if self.continuous else "async", self.engine.engine.config.num_kv_blocks)
        self.initialized = True

    def _follow(self, args: EngineArgs) -> None:
        """A rank > 0: run the steps rank 0 sends, on a thread (TorchServe keeps calling
        `handle` here with every request; those answers are never sent)."""
        from pagedbackend.executor.multiproc import run_follower

        config = args.create_engine_config()
        self.follower = threading.Thread(target=run_follower, args=(config,), name="pagedbackend-tp-follower",
                                         daemon=True)
        self.follower.start()
        logger.info("pagedbackend rank %s follows rank 0", os.environ.get("RANK"))
        self.initialized = True

    @staticmethod
    def _chat_template(value: str | None, model_dir: Path) -> str | None:
        if not value:
            return None
        path = Path(value) if os.path.isabs(value) else model_dir / value
        try:
            is_file = len(value) < 4096 and path.is_file()
        except OSError:  # e.g. a template longer than a file name may be is not a name
            is_file = False
        return path.read_text() if is_file else value  # else the template itself

    def _open(self, url_path: str, request_id: str, item: dict[str, Any], loop: asyncio.AbstractEventLoop):
        """Parse, validate and queue one request. Takes the url path, not the context: TorchServe
        reuses one context for every step, so a worker thread reading it later would see
        another step's requests."""
        body = item.get("data") or item.get("body")
        if body is None:
            # Nothing, or a form TorchServe decoded (`curl -d` without the JSON Content-Type).
            return error_reply(InvalidRequest(None, "the request body is empty or was not sent as JSON: send a JSON "
                                                    "object with the header Content-Type: application/json"))
        if not isinstance(body, (bytes, bytearray, dict)):
            # TorchServe already decoded a JSON body that is not an object (a string, an
            # array, a number): encode it back so the parser says what it got.
            body = json.dumps(body)
        return open_reply(self.metered, url_path, body, request_id, self.model_name, self.engine.tokenizer,
                          self.chat_template, loop, tool_call_parser=self.tool_call_parser)

    # --------------------------------------------------------------- serving
    def handle(self, data: list[dict[str, Any]], context: Any):
        """Async mode: returns the coroutine TorchServe's async service awaits. Continuous
        batching: returns this step's pieces, one per request."""
        if self.engine is None:  # a follower rank: rank 0 answers every request
            return [""] * len(data)
        if self.continuous:
            return self._step(data, context)
        return self._handle_async(data, context)

    def _send(self, context: Any, text: str) -> None:
        # Every piece goes out as an intermediate response (a final response with no chunk
        # before it leaks a job object in TorchServe's frontend).
        for start in range(0, max(len(text), 1), MAX_WRITE):
            self._send_intermediate([text[start:start + MAX_WRITE]], context.request_ids,
                                    "Intermediate Prediction success", 200, context)

    async def _handle_async(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        request_id = context.request_ids[0]
        try:
            loop = asyncio.get_running_loop()
            url_path = context.get_request_header(0, "url_path") or ""
            if _opens_slowly(data[0]):  # parse, tokenize, compile off the loop every request shares
                reply = await loop.run_in_executor(None, self._open, url_path, request_id, data[0], loop)
            else:
                reply = self._open(url_path, request_id, data[0], loop)
            if not reply.stream:  # one body, with the status it ends with
                status, text = await complete_body(reply)
                context.set_response_status(status, "", 0)
                context.set_response_content_type(0, reply.content_type)
                if status >= 400:
                    # TorchServe closes the connection right after the head of an error response,
                    # so an error must be one complete response. (0.12's async mode then keeps a
                    # small job record for it, as it does for its own handlers' errors.)
                    return [text]
                self._send(context, text)
                return [""]
            context.set_response_status(reply.status, "", 0)
            context.set_response_content_type(0, reply.content_type)
            async for piece in reply.pieces:
                self._send(context, piece)
        except Exception:  # noqa: BLE001 - the stream was already answered; keep the worker alive
            logger.exception("request %s failed while streaming", request_id)
        return [""]

    def _step(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """One frontend step. New requests are parsed, validated and queued right here, so each
        one's status and Content-Type are known before its first byte. A stream gets whatever
        is new (possibly nothing) every step; a non-streaming request gets no response until
        its whole body is ready: it is left out of this step's answer, and TorchServe keeps
        it for the next step, so its status is its real outcome and no step waits for it."""
        ids = [context.request_ids[i] for i in range(len(data))]
        with self._cond:
            for rid in list(self._pumps):
                if rid not in ids:  # TorchServe dropped it: the client disconnected
                    logger.info("client of request %s disconnected; aborting it", rid)
                    self._pumps.pop(rid).cancel()
        for i, rid in enumerate(ids):
            if rid not in self._pumps:
                url_path = context.get_request_header(i, "url_path") or ""
                if _opens_slowly(data[i]):  # parsed (and compiled) on a worker thread; answered once open
                    pump = RequestPump(self._loop, self._cond, opener=functools.partial(
                        self._open, url_path, rid, data[i], self._loop))
                else:
                    pump = RequestPump(self._loop, self._cond, self._open(url_path, rid, data[i], self._loop))
                with self._cond:
                    self._pumps[rid] = pump
        with self._cond:
            pumps = [self._pumps[rid] for rid in ids]
            start = time.monotonic()
            while not any(p.has_news for p in pumps):
                waited = time.monotonic() - start
                if waited >= STEP_WAIT_S:
                    break
                self._cond.wait(STEP_WAIT_S - waited)
            responses: list[Any] = []
            stops: list[bool | None] = []
            deferred = []
            for i, (rid, pump) in enumerate(zip(ids, pumps)):
                if not pump.opened or (not pump.stream and not pump.done):
                    deferred.append(i)
                    responses.append(None)
                    stops.append(None)
                    continue
                text, done = pump.take()
                if not pump.started:
                    context.set_response_status(pump.status, "", i)
                    context.set_response_content_type(i, pump.content_type)
                # A reply complete at its first step is sent as a plain response (None): a
                # stream that ends at its first chunk can hang the client in TorchServe 0.12.
                stops.append(None if done and not pump.started else done)
                pump.started = True
                if done:
                    del self._pumps[rid]
                responses.append(text)
        for i in deferred:  # TorchServe answers only the ids left in this map
            del context.request_ids[i]
        context.stopping_criteria = [lambda _ret, stop=stop: stop for stop in stops]
        return responses
