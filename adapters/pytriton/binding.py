"""`bind_llm`: a pagedbackend engine as a decoupled PyTriton model with the tensor interface of
Triton's vLLM backend, so clients written for that backend work unchanged.

Inputs: `text_input` (bytes); optional `stream` (bool), `sampling_parameters` (a JSON string of
SamplingParams fields), `exclude_input_in_output` (bool), `return_finish_reason`,
`return_cumulative_logprob`, `return_num_input_tokens`, `return_num_output_tokens` (bool), and typed sampling inputs
(`max_tokens`, `min_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `n`,
`ignore_eos`) for clients that cannot send JSON or parameters. Sampling fields may also come
as Triton request parameters (what the HTTP generate endpoints do with extra JSON fields).

Outputs: `text_output` (bytes, one per sample: the new text when streaming, else the whole
text, with the prompt in front unless `exclude_input_in_output`), `token_ids` (int64, the
samples' new ids concatenated), `num_output_tokens` (uint32 per sample, to split them),
`finish_reason` and `num_input_tokens` (on the last response, or on every one when asked),
`cumulative_logprob` (float32 per sample, when asked).

The infer function is an async generator: every concurrent request is a coroutine submitting
to one shared `AsyncLLMEngine`, which batches them.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from pagedbackend import AsyncLLMEngine, EngineArgs, RequestOutput, SamplingParams
from pagedbackend.adapters.pytriton.proxy import use_cancel_aware_proxy
from pagedbackend.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Must match the names in _proxy_model.py (which cannot import this package).
KEY_PARAMETER = "pagedbackend_request_key"
CANCEL_PARAMETER = "pagedbackend_cancel"

TYPED_SAMPLING_INPUTS = {
    "max_tokens": np.int32, "min_tokens": np.int32, "temperature": np.float32, "top_p": np.float32,
    "top_k": np.int32, "min_p": np.float32, "seed": np.int64, "n": np.int32, "ignore_eos": np.bool_,
}
FLAG_INPUTS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_cumulative_logprob",
               "return_num_input_tokens", "return_num_output_tokens")
_INT_FIELDS = {"n", "top_k", "max_tokens", "min_tokens", "seed"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p"}
_BOOL_FIELDS = {"ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"}


class RequestError(Exception):
    """An error whose message is all the client should see: PyTriton sends an exception's
    formatted traceback to the client, and this one has none (and, reported as a builtin,
    no module path either: the client reads "RequestError: <message>")."""

    __module__ = "builtins"

    @property
    def __traceback__(self):  # type: ignore[override]
        return None

    @__traceback__.setter
    def __traceback__(self, value):
        pass


def model_inputs() -> list[Tensor]:
    inputs = [Tensor(name="text_input", dtype=np.bytes_, shape=(1,)),
              Tensor(name="sampling_parameters", dtype=np.bytes_, shape=(1,), optional=True)]
    inputs += [Tensor(name=name, dtype=np.bool_, shape=(1,), optional=True) for name in FLAG_INPUTS]
    inputs += [Tensor(name=name, dtype=dtype, shape=(1,), optional=True) for name, dtype in TYPED_SAMPLING_INPUTS.items()]
    return inputs


def model_outputs() -> list[Tensor]:
    return [Tensor(name="text_output", dtype=np.bytes_, shape=(-1,)),
            Tensor(name="token_ids", dtype=np.int64, shape=(-1,)),
            Tensor(name="num_output_tokens", dtype=np.uint32, shape=(-1,)),
            Tensor(name="finish_reason", dtype=np.bytes_, shape=(-1,)),
            Tensor(name="cumulative_logprob", dtype=np.float32, shape=(-1,)),
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
        if name in _BOOL_FIELDS and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if name == "stop_token_ids":
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        kind = "a list of integers" if name == "stop_token_ids" else "a number"
        raise InvalidRequest(name, f"{name} must be {kind}, got {value!r}") from None
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
        try:
            decoded = json.loads(text.decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequest("sampling_parameters", f"sampling_parameters is not valid JSON: {e}") from e
        if not isinstance(decoded, dict):
            raise InvalidRequest("sampling_parameters", "sampling_parameters must be a JSON object")
        fields.update(decoded)
    else:
        fields.update({k: v for k, v in (parameters or {}).items()
                       if not k.startswith("triton_") and k not in (KEY_PARAMETER, CANCEL_PARAMETER)})
    for name in TYPED_SAMPLING_INPUTS:
        if name in data and data[name].size:
            fields[name] = data[name].reshape(-1)[0].item()
    params = SamplingParams.from_dict({k: _coerce(k, v) for k, v in fields.items()})
    returns = {name[len("return_"):] for name in FLAG_INPUTS if name.startswith("return_") and flags.get(name)}
    if "cumulative_logprob" in returns and params.logprobs is None:
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
    if out.finished or "num_input_tokens" in req.returns:
        response["num_input_tokens"] = np.array([len(out.prompt_token_ids)], dtype=np.uint32)
    return response


class LLMModel:
    """The infer function of one bound model."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    async def infer(self, requests: list[Any]) -> AsyncIterator[list[dict[str, np.ndarray]]]:
        request = requests[0]  # batching=False: one request per call
        parameters = dict(request.parameters or {})
        if CANCEL_PARAMETER in parameters:  # from the proxy: the client cancelled that request
            logger.info("request %s cancelled by its client; aborting it", parameters[CANCEL_PARAMETER])
            await self.engine.abort(str(parameters[CANCEL_PARAMETER]))
            return
        request_id = str(parameters.pop(KEY_PARAMETER, None) or uuid.uuid4().hex)
        try:
            req = parse_request(request.data, parameters)
        except InvalidRequest as e:
            raise RequestError(str(e)) from None
        final = None
        first = True
        try:
            async for out in self.engine.generate(req.prompt, req.params, request_id):
                if req.stream:
                    yield [make_response(out, req, first)]
                    first = False
                final = out
        except ValueError as e:  # the engine's own checks (prompt length, token ids)
            raise RequestError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a failed request; the message, not the stack
            raise RequestError(f"{type(e).__name__}: {e}") from None
        if not req.stream and final is not None:
            yield [make_response(final, req, True)]


def bind_llm(triton: Any, engine_or_args: AsyncLLMEngine | EngineArgs, model_name: str = "pagedbackend",
             model_version: int = 1, strict: bool = True) -> AsyncLLMEngine:
    """Bind an engine (or the arguments to build one) to `triton` as a decoupled model.
    Returns the engine; shut it down after the Triton server stops. `strict` has PyTriton check
    every response's output names, dtypes and shapes against the model config."""
    engine = (AsyncLLMEngine.from_engine_args(engine_or_args, progress=False)
              if isinstance(engine_or_args, EngineArgs) else engine_or_args)
    use_cancel_aware_proxy(model_name)
    triton.bind(model_name=model_name, infer_func=LLMModel(engine).infer, inputs=model_inputs(),
                outputs=model_outputs(), model_version=model_version,
                config=ModelConfig(batching=False, decoupled=True), strict=strict)
    return engine
