"""`bind_llm`: a pagedbackend engine as a decoupled PyTriton model with the tensor interface of
Triton's vLLM backend, so clients written for that backend work unchanged.

Inputs: `text_input` (bytes); optional `stream` (bool), `sampling_parameters` (a JSON string of
SamplingParams fields), `exclude_input_in_output` (bool), `return_finish_reason`,
`return_cumulative_logprob`, `return_logprobs`, `return_num_input_tokens`, `return_num_output_tokens` (bool), and
typed sampling inputs
(`max_tokens`, `min_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `n`,
`ignore_eos`) for clients that cannot send JSON or parameters. Structured output as Triton's
vLLM backend takes it: `structured_outputs` (vLLM's fields: `json`, `regex`, `choice`,
`grammar`, `json_object`) inside `sampling_parameters`, as an object or its JSON text; or as a
`structured_outputs` input of its own (the JSON text). Sampling fields may also come
as Triton request parameters (what the HTTP generate endpoints do with extra JSON fields).

Outputs: `text_output` (bytes, one per sample: the new text when streaming, else the whole
text, with the prompt in front unless `exclude_input_in_output`), `token_ids` (int64, the
samples' new ids concatenated), `num_output_tokens` (uint32 per sample, to split them),
`finish_reason` and `num_input_tokens` (on the last response, or on every one when asked),
`cumulative_logprob` (float32 per sample, when asked), `logprobs` (when asked, as Triton's vLLM
backend has it: per sample the JSON text of a list of positions, each `{token_id: {logprob, rank,
decoded_token}}`, the chosen token first and the top `logprobs` alternatives; the new positions
only when streaming).

The infer function is an async generator: every concurrent request is a coroutine submitting
to one shared `AsyncLLMEngine`, which batches them.

Errors a client causes come back as one clean line naming the field (never a traceback or a
file path). Request parameters named `pagedbackend_*` are reserved: the cancel-aware proxy
(`_proxy_model.py`) sets them, marked with a per-model secret that only the proxy knows (it is
written into the model repository when the model is bound); a client sending any of them
gets an error, and nothing it sends is ever executed as a control command.

For a graceful stop (`PyTritonServer.stop`) the model can stop admitting requests
(`stop_accepting`), wait for the running ones (`wait_idle`), and abort them (`abort_all`: each
stream ends with a final response whose finish_reason is "abort").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from pagedbackend import AsyncLLMEngine, EngineArgs, RequestOutput, SamplingParams
from pagedbackend.adapters.pytriton.proxy import use_cancel_aware_proxy
from pagedbackend.errors import InvalidRequest
from pagedbackend.protocol import delta_logprobs, logprobs_json, parse_json

logger = logging.getLogger(__name__)

# Must match the names in _proxy_model.py (which cannot import this package).
RESERVED_PREFIX = "pagedbackend_"
KEY_PARAMETER = "pagedbackend_request_key"  # the proxy's key of a client request (the engine's request id)
CANCEL_PARAMETER = "pagedbackend_cancel"  # a control message: that key's client cancelled
CONTROL_PARAMETER = "pagedbackend_control"  # the model's secret: the reserved parameters are the proxy's
REJECTED_PARAMETER = "pagedbackend_rejected"  # reserved names a client sent (the proxy drops them)
MAX_MESSAGE_CHARS = 300

TYPED_SAMPLING_INPUTS = {
    "max_tokens": np.int32, "min_tokens": np.int32, "temperature": np.float32, "top_p": np.float32,
    "top_k": np.int32, "min_p": np.float32, "seed": np.int64, "n": np.int32, "ignore_eos": np.bool_,
}
FLAG_INPUTS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_cumulative_logprob",
               "return_logprobs", "return_num_input_tokens", "return_num_output_tokens")
_INT_FIELDS = {"n", "top_k", "max_tokens", "min_tokens", "seed"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p"}
_BOOL_FIELDS = {"ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"}


class RequestError(Exception):
    """An error whose message is all the client should see: PyTriton sends an exception's
    formatted traceback to the client, and this one has none (and, reported as a builtin,
    no module path either: the client reads "RequestError: <message>")."""

    __module__ = "builtins"

    def __init__(self, message: str) -> None:
        super().__init__(client_message(message))

    @property
    def __traceback__(self):  # type: ignore[override]
        return None

    @__traceback__.setter
    def __traceback__(self, value):
        pass


def client_message(message: Any) -> str:
    """One short line: what a client is shown of an error."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 15] + " ... (truncated)"


# The engine's names for fields this interface calls otherwise.
_FIELD_NAMES = {"prompt": "text_input", "prompt_token_ids": "text_input"}


def _naming_the_field(error: ValueError) -> str:
    """The message of a bad-input error, with the field's name (as a client of this interface
    knows it) in front when the message does not say it."""
    message = str(error)
    param = getattr(error, "param", None)
    param = _FIELD_NAMES.get(param, param)
    return f"{param}: {message}" if param and param not in message else message


def _shown(value: Any) -> str:
    """A value as an error message quotes it: short, and never a huge conversion."""
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def model_inputs() -> list[Tensor]:
    inputs = [Tensor(name="text_input", dtype=np.bytes_, shape=(1,)),
              Tensor(name="sampling_parameters", dtype=np.bytes_, shape=(1,), optional=True),
              Tensor(name="structured_outputs", dtype=np.bytes_, shape=(1,), optional=True)]
    inputs += [Tensor(name=name, dtype=np.bool_, shape=(1,), optional=True) for name in FLAG_INPUTS]
    inputs += [Tensor(name=name, dtype=dtype, shape=(1,), optional=True) for name, dtype in TYPED_SAMPLING_INPUTS.items()]
    return inputs


def model_outputs() -> list[Tensor]:
    return [Tensor(name="text_output", dtype=np.bytes_, shape=(-1,)),
            Tensor(name="token_ids", dtype=np.int64, shape=(-1,)),
            Tensor(name="num_output_tokens", dtype=np.uint32, shape=(-1,)),
            Tensor(name="finish_reason", dtype=np.bytes_, shape=(-1,)),
            Tensor(name="cumulative_logprob", dtype=np.float32, shape=(-1,)),
            Tensor(name="logprobs", dtype=np.bytes_, shape=(-1,)),
            Tensor(name="num_input_tokens", dtype=np.uint32, shape=(1,))]


@dataclass
class TritonRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    prepend_input: bool
    returns: set[str]


def _coerce(name: str, value: Any) -> Any:
    """Triton request parameters and hand-written JSON often carry numbers as strings."""
    if not isinstance(value, str):
        return value
    try:
        if name in _INT_FIELDS:
            return int(value)
        if name in _FLOAT_FIELDS:
            return float(value)
    except ValueError:  # not a number, or too many digits to convert
        raise InvalidRequest(name, f"{name} must be a number, got {_shown(value)}") from None
    if name in _BOOL_FIELDS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if name == "stop_token_ids":
        try:
            return parse_json(value, name, name)
        except InvalidRequest as e:
            if "nested too deeply" in str(e):
                raise
            raise InvalidRequest(name, f"{name} must be a list of integers, got {_shown(value)}") from None
    return value


def parse_request(data: dict[str, np.ndarray], parameters: dict[str, Any] | None) -> TritonRequest:
    if "text_input" not in data or data["text_input"].size == 0:
        raise InvalidRequest("text_input", "text_input is required")
    raw = data["text_input"].reshape(-1)[0]
    try:
        prompt = raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
    except UnicodeDecodeError as e:
        raise InvalidRequest("text_input", f"text_input is not UTF-8 ({e})") from e
    flags = {name: bool(data[name].reshape(-1)[0]) for name in FLAG_INPUTS if name in data and data[name].size}
    stream = flags.get("stream", False)
    prepend = not flags["exclude_input_in_output"] if "exclude_input_in_output" in flags else not stream
    if prepend and stream:
        raise InvalidRequest("exclude_input_in_output", "when streaming, exclude_input_in_output must be true")

    fields: dict[str, Any] = {}
    if "sampling_parameters" in data and data["sampling_parameters"].size:
        text = data["sampling_parameters"].reshape(-1)[0]
        decoded = parse_json(bytes(text) if isinstance(text, (bytes, np.bytes_)) else str(text),
                             "sampling_parameters", "sampling_parameters")
        if not isinstance(decoded, dict):
            raise InvalidRequest("sampling_parameters", "sampling_parameters must be a JSON object")
        fields.update(decoded)
    else:
        fields.update({k: v for k, v in (parameters or {}).items()
                       if not k.startswith("triton_") and not k.lower().startswith(RESERVED_PREFIX)})
    for name in TYPED_SAMPLING_INPUTS:
        if name in data and data[name].size:
            fields[name] = data[name].reshape(-1)[0].item()
    if "structured_outputs" in data and data["structured_outputs"].size:
        raw = data["structured_outputs"].reshape(-1)[0]
        fields["structured_outputs"] = parse_json(bytes(raw) if isinstance(raw, (bytes, np.bytes_)) else str(raw),
                                                  "structured_outputs", "structured_outputs")
    params = SamplingParams.from_dict({k: _coerce(k, v) for k, v in fields.items()})
    returns = {name[len("return_"):] for name in FLAG_INPUTS if name.startswith("return_") and flags.get(name)}
    if ("cumulative_logprob" in returns or "logprobs" in returns) and params.logprobs is None:
        params = params.clone(logprobs=0)  # the sampler then reports each chosen token's logprob
    return TritonRequest(prompt, params, stream, prepend, returns)


def _bytes(values: list[str]) -> np.ndarray:
    # Object arrays keep trailing NUL bytes that a fixed-width bytes array would drop.
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def make_response(out: RequestOutput, req: TritonRequest, first: bool) -> dict[str, np.ndarray]:
    if req.stream:
        texts = [c.delta_text for c in out.outputs]
        ids = [c.delta_token_ids for c in out.outputs]
    else:
        texts = [c.text for c in out.outputs]
        ids = [c.token_ids for c in out.outputs]
    if first and req.prepend_input:
        texts = [req.prompt + t for t in texts]
    response = {
        "text_output": _bytes(texts),
        "token_ids": np.array([t for sample in ids for t in sample], dtype=np.int64),
        "num_output_tokens": np.array([len(sample) for sample in ids], dtype=np.uint32),
    }
    if out.finished or "finish_reason" in req.returns:
        response["finish_reason"] = _bytes([str(c.finish_reason) for c in out.outputs])
    if "cumulative_logprob" in req.returns:
        response["cumulative_logprob"] = np.array([c.cumulative_logprob or 0.0 for c in out.outputs], dtype=np.float32)
    if "logprobs" in req.returns:  # Triton's vLLM backend's: per sample, JSON of the positions (new ones when streaming)
        response["logprobs"] = _bytes([json.dumps(logprobs_json(delta_logprobs(c) if req.stream else (c.logprobs or [])))
                                       for c in out.outputs])
    if out.finished or "num_input_tokens" in req.returns:
        response["num_input_tokens"] = np.array([len(out.prompt_token_ids)], dtype=np.uint32)
    return response


class LLMModel:
    """The infer function of one bound model, and the controls of a graceful stop."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        # Marks the reserved parameters the proxy sets; the proxy reads it from the model
        # repository (see proxy.py). Clients never see it.
        self.control_secret = secrets.token_hex(32)
        self._cv = threading.Condition()
        self._running: dict[str, tuple[asyncio.AbstractEventLoop, Any]] = {}  # request id -> (loop, task)
        self._accepting = True
        self._aborting = False

    # ------------------------------------------------------------ graceful stop
    def stop_accepting(self) -> None:
        """From now on new requests are answered "the server is shutting down"."""
        with self._cv:
            self._accepting = False

    def running(self) -> list[str]:
        with self._cv:
            return list(self._running)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running (their last responses handed to PyTriton)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._running, max(0.0, timeout))

    def abort_all(self) -> int:
        """Abort every running request in the engine: each stream ends with a final response
        (finish_reason "abort"), and requests still being set up abort at their first output."""
        with self._cv:
            self._aborting = True
            ids = list(self._running)
        for request_id in ids:
            self.engine.abort_request(request_id)
        return len(ids)

    def cancel_all(self) -> None:
        """Last resort (the engine does not answer): cancel the requests' coroutines; each
        client gets the error "the server is shutting down"."""
        with self._cv:
            running = list(self._running.values())
        for loop, task in running:
            if task is not None:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(task.cancel)

    # ---------------------------------------------------------------- requests
    def _reserved_parameters(self, parameters: dict[str, Any]) -> tuple[bool, list[str]]:
        """(whether the reserved parameters were set by the proxy, reserved names a client sent).
        Only a request carrying this model's secret is the proxy's; in any other request every
        `pagedbackend_*` parameter is a client's."""
        marker = parameters.pop(CONTROL_PARAMETER, None)
        trusted = isinstance(marker, str) and hmac.compare_digest(marker.encode(), self.control_secret.encode())
        if not trusted:
            names = sorted(k for k in parameters if k.lower().startswith(RESERVED_PREFIX))
            return False, names + ([CONTROL_PARAMETER] if marker is not None else [])
        rejected = str(parameters.pop(REJECTED_PARAMETER, "") or "")
        names = [n for n in rejected.split(",") if n]
        names += sorted(k for k in parameters if k.lower().startswith(RESERVED_PREFIX)
                        and k not in (KEY_PARAMETER, CANCEL_PARAMETER))
        return True, names

    async def infer(self, requests: list[Any]) -> AsyncIterator[list[dict[str, np.ndarray]]]:
        request = requests[0]  # batching=False: one request per call
        parameters = dict(request.parameters or {})
        trusted, reserved = self._reserved_parameters(parameters)
        if reserved:
            names = ", ".join(dict.fromkeys(reserved))
            raise RequestError(f"request parameter(s) {names} are reserved for the server's internal use")
        if trusted and CANCEL_PARAMETER in parameters:  # from the proxy: the client cancelled that request
            key = str(parameters[CANCEL_PARAMETER])
            logger.info("request %s cancelled by its client; aborting it", key)
            self.engine.abort_request(key)
            return
        request_id = str((parameters.pop(KEY_PARAMETER, None) if trusted else None) or uuid.uuid4().hex)
        with self._cv:
            if not self._accepting:
                raise RequestError("the server is shutting down; send the request again later")
            self._running[request_id] = (asyncio.get_running_loop(), asyncio.current_task())
        try:
            async for response in self._generate(request, parameters, request_id):
                yield response
        except RequestError:
            raise
        except asyncio.CancelledError:
            raise RequestError("the request was cancelled: the server is shutting down") from None
        except Exception as e:  # noqa: BLE001 - never a traceback to the client
            logger.exception("request %s failed", request_id)
            raise RequestError(f"internal error ({type(e).__name__})") from None
        finally:
            with self._cv:
                self._running.pop(request_id, None)
                self._cv.notify_all()

    async def _generate(self, request: Any, parameters: dict[str, Any],
                        request_id: str) -> AsyncIterator[list[dict[str, np.ndarray]]]:
        try:
            req = parse_request(request.data, parameters)
        except InvalidRequest as e:
            raise RequestError(_naming_the_field(e)) from None
        final = None
        first = True
        try:
            async for out in self.engine.generate(req.prompt, req.params, request_id):
                if self._aborting and not out.finished:
                    self.engine.abort_request(request_id)  # submitted after abort_all looked
                if req.stream:
                    yield [make_response(out, req, first)]
                    first = False
                final = out
        except ValueError as e:  # the engine's own checks (prompt length, token ids)
            raise RequestError(_naming_the_field(e)) from None
        except (RuntimeError, OSError) as e:  # the engine shut down, or failed this request
            raise RequestError(f"{type(e).__name__}: {e}") from None
        if not req.stream and final is not None:
            yield [make_response(final, req, True)]


class _OneLineClientErrors(logging.Filter):
    """PyTriton logs every exception of an infer function with its traceback; for the errors a
    client caused (a RequestError) one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 2 and isinstance(args[1], str) and "RequestError: " in args[1]:
            message = args[1].rsplit("RequestError: ", 1)[1].strip()
            record.msg, record.args, record.levelno, record.levelname = (
                "request %s answered with an error: %s", (args[0], message), logging.INFO, "INFO")
        return True


_CLIENT_ERRORS_FILTER = _OneLineClientErrors()


def bind_llm(triton: Any, engine_or_args: AsyncLLMEngine | EngineArgs, model_name: str = "pagedbackend",
             model_version: int = 1, strict: bool = True) -> AsyncLLMEngine:
    """Bind an engine (or the arguments to build one) to `triton` as a decoupled model.
    Returns the engine; shut it down after the Triton server stops. `strict` has PyTriton check
    every response's output names, dtypes and shapes against the model config."""
    engine = (AsyncLLMEngine.from_engine_args(engine_or_args, progress=False)
              if isinstance(engine_or_args, EngineArgs) else engine_or_args)
    bind_model(triton, LLMModel(engine), model_name, model_version, strict)
    return engine


def bind_model(triton: Any, model: LLMModel, model_name: str = "pagedbackend", model_version: int = 1,
               strict: bool = True) -> LLMModel:
    """`bind_llm` for an `LLMModel` you keep (for its graceful-stop controls)."""
    use_cancel_aware_proxy(model_name)
    inference_logger = logging.getLogger("pytriton.proxy.inference")
    if _CLIENT_ERRORS_FILTER not in inference_logger.filters:
        inference_logger.addFilter(_CLIENT_ERRORS_FILTER)
    triton.bind(model_name=model_name, infer_func=model.infer, inputs=model_inputs(),
                outputs=model_outputs(), model_version=model_version,
                config=ModelConfig(batching=False, decoupled=True), strict=strict)
    return model
