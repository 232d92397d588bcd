"""Request parsing and response shapes shared by the adapters (the native JSON format).

Native request: a JSON object with `prompt` (text) or `prompt_token_ids`, optional `stream`,
and any `SamplingParams` field. Streaming answers are newline-delimited JSON chunks with the
text delta and token ids; the last chunk of each sample carries `finish_reason`, and the very
last one the usage counts. Bad input raises `InvalidRequest` naming the field; `error_body`
turns any exception into a status code and a JSON error that never contains a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from pagedbackend.errors import InvalidRequest
from pagedbackend.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from pagedbackend.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    prompt: str | dict[str, Any]
    params: SamplingParams
    stream: bool
    priority: int = 0


class HugeInteger:
    """A JSON integer too long for Python to convert (over `sys.get_int_max_str_digits()`
    digits). Parsing keeps it as this placeholder instead of failing the whole body, so the
    field check that meets it names the field ("n must be an integer, got <a 5000-digit
    integer>") and no huge number is ever built."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit integer>"


def _parse_int(text: str) -> int | HugeInteger:
    return int(text) if len(text) <= 4000 else HugeInteger(text)


def parse_json(text: str | bytes | bytearray, what: str = "request body", param: str | None = None) -> Any:
    """Parse untrusted JSON: errors are `InvalidRequest`s naming `what` (never a traceback, a
    RecursionError or a 500); integers too long to convert become `HugeInteger`s."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(param, f"{what} is not UTF-8 ({e})") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise InvalidRequest(param, f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest(param, f"{what} is nested too deeply") from None
    except ValueError as e:  # anything else json refuses
        raise InvalidRequest(param, f"{what} is not valid JSON: {e}") from None


def load_json(payload: Any) -> dict[str, Any]:
    """The request body as a JSON object (TorchServe hands over bytes, or an already-parsed dict)."""
    if isinstance(payload, Mapping):
        return dict(payload)
    if isinstance(payload, (bytes, bytearray)) and not payload.strip():
        payload = ""
    if isinstance(payload, str) and not payload.strip():
        raise InvalidRequest(None, "request body is empty: send a JSON object "
                                   "(with the header Content-Type: application/json)")
    if not isinstance(payload, (str, bytes, bytearray)):
        raise InvalidRequest(None, "request body must be a JSON object")
    body = parse_json(payload)
    if not isinstance(body, dict):
        kind = {str: "a JSON string", list: "a JSON array"}.get(type(body), f"JSON {type(body).__name__}")
        raise InvalidRequest(None, f"request body must be a JSON object ({{\"prompt\": ...}}), got {kind}")
    return body


def pop_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.pop(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(key, f"{key} must be true or false, got {value!r}")
    return value


def pop_int(body: dict[str, Any], key: str, default: int = 0) -> int:
    value = body.pop(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(key, f"{key} must be an integer, got {value!r}")
    return value


def parse_generate(body: dict[str, Any]) -> GenerateRequest:
    body = dict(body)
    stream = pop_bool(body, "stream")
    has_text, has_ids = "prompt" in body, "prompt_token_ids" in body
    if has_text == has_ids:
        raise InvalidRequest("prompt", "give exactly one of prompt (text) or prompt_token_ids")
    prompt: str | dict[str, Any]
    if has_text:
        prompt = body.pop("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    else:
        prompt = {"prompt_token_ids": body.pop("prompt_token_ids")}
    priority = pop_int(body, "priority")
    return GenerateRequest(prompt, SamplingParams.from_dict(body), stream, priority)


def usage(out: RequestOutput) -> dict[str, int]:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_json(positions: list[PositionLogprobs | None]) -> list[dict[str, Any] | None]:
    """Per position {token id (as a JSON key): {logprob, rank, decoded_token}}, like vLLM's."""
    return [None if pos is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in pos.items()}
            for pos in positions]


def _completion_dict(c: CompletionOutput) -> dict[str, Any]:
    d = {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
         "stop_reason": c.stop_reason}
    if c.cumulative_logprob is not None:
        d["cumulative_logprob"] = c.cumulative_logprob
    if c.logprobs is not None:
        d["logprobs"] = logprobs_json(c.logprobs)
    return d


def native_response(out: RequestOutput) -> dict[str, Any]:
    """The whole answer as one JSON document; top-level text/token_ids are the first sample's."""
    first = out.outputs[0]
    body = {"id": out.request_id, "text": first.text, "token_ids": first.token_ids,
            "finish_reason": first.finish_reason, "stop_reason": first.stop_reason,
            "outputs": [_completion_dict(c) for c in out.outputs], "usage": usage(out)}
    if out.prompt_logprobs is not None:
        body["prompt_logprobs"] = logprobs_json(out.prompt_logprobs)
    return body


class NativeStream:
    """Turns successive RequestOutputs into NDJSON lines: one per sample with new text or
    tokens, one more when a sample finishes; the last line of all carries `usage`."""

    def __init__(self) -> None:
        self._finished: set[int] = set()
        self._sent_prompt_logprobs = False

    def lines(self, out: RequestOutput) -> list[str]:
        lines = []
        for c in out.outputs:
            if c.index in self._finished:
                continue
            if c.delta_text or c.delta_token_ids or c.finish_reason is not None:
                chunk: dict[str, Any] = {"index": c.index, "text": c.delta_text, "token_ids": c.delta_token_ids}
                if c.logprobs is not None:
                    chunk["logprobs"] = logprobs_json(delta_logprobs(c))
                if c.finish_reason is not None:
                    chunk["finish_reason"] = c.finish_reason
                    chunk["stop_reason"] = c.stop_reason
                    self._finished.add(c.index)
                lines.append(chunk)
        if out.prompt_logprobs is not None and not self._sent_prompt_logprobs and lines:
            lines[0]["prompt_logprobs"] = logprobs_json(out.prompt_logprobs)
            self._sent_prompt_logprobs = True
        if out.finished and lines:
            lines[-1]["usage"] = usage(out)
        return [json.dumps(line) + "\n" for line in lines]


def delta_logprobs(c: CompletionOutput) -> list[PositionLogprobs]:
    """The logprobs of the tokens new in this output (cumulative outputs carry them all)."""
    if not c.logprobs or not c.delta_token_ids:
        return []
    return c.logprobs[-len(c.delta_token_ids):]


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Status code and OpenAI-style error object; internal errors say what failed, not where."""
    if isinstance(exc, InvalidRequest):
        return exc.status, {"error": {"message": str(exc), "type": "invalid_request_error",
                                      "param": exc.param, "code": exc.status}}
    if isinstance(exc, ValueError):
        return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": 400}}
    return 500, {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "internal_error",
                           "param": None, "code": 500}}
