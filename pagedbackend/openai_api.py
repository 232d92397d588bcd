"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions` on top of `AsyncLLMEngine`:
parse the request (OpenAI fields plus vLLM's sampling extras), run it, and render responses or
SSE chunks exactly as the OpenAI API does (`data: {...}` lines, then `data: [DONE]`).

Framework-agnostic: an adapter passes the body and writes out what `stream_openai` yields or
`complete_openai` returns.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from pagedbackend.errors import InvalidRequest
from pagedbackend.openai_tools import (ToolChoice, delta_json, parse_tools, response_format_constraint,
                                       template_messages, tool_call_json)
from pagedbackend.outputs import Logprob, PositionLogprobs, RequestOutput
from pagedbackend.protocol import delta_logprobs, pop_bool, pop_int
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.structured_output.params import REMOVED_FIELDS, StructuredOutputsParams, removed_field_error

# The markup a tool parser looks for, which some tokenizers hold as special tokens (dropped from
# text by skip_special_tokens, so "auto" could never see a call).
TOOL_CALL_TAGS = {"hermes": ("<tool_call>", "</tool_call>"), "llama3_json": ("<|python_tag|>",)}

# OpenAI request fields mapped onto SamplingParams, plus vLLM's extra sampling fields.
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "seed", "stop", "max_tokens", "top_k", "min_p", "min_tokens",
                    "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
                    "spaces_between_special_tokens", "frequency_penalty", "presence_penalty", "repetition_penalty",
                    "logit_bias", "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "prompt_logprobs")
_IGNORED = ("model", "user", "service_tier", "store", "metadata")
# Accepted only at their "off" value: features of the API this server does not offer.
_NOT_YET = {"suffix": ("",)}
# OpenAI's limits on how many alternatives per token may be asked for.
_MAX_COMPLETION_LOGPROBS = 5
_MAX_CHAT_TOP_LOGPROBS = 20


@dataclass
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    prompts: list[Any]  # engine prompts: text or {"prompt_token_ids": [...]}
    params: SamplingParams
    stream: bool
    include_usage: bool = False
    echo: bool = False
    prompt_texts: list[str | None] = field(default_factory=list)
    priority: int = 0
    tools: ToolChoice | None = None  # chat: the request's tools and tool_choice

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs is not None


def _int_field(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.pop(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(key, f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _sampling(body: dict[str, Any], fields: dict[str, Any] | None = None) -> SamplingParams:
    fields = dict(fields or {})
    for key in list(body):
        value = body.pop(key)
        if key in _SAMPLING_FIELDS:
            if value is not None:
                fields[key] = value
        elif key in _IGNORED:
            continue
        elif key in REMOVED_FIELDS:
            raise removed_field_error(key)
        elif key in _NOT_YET:
            if value is not None and value not in _NOT_YET[key]:
                raise InvalidRequest(key, f"{key} is not supported")
        else:
            raise InvalidRequest(key, f"unknown field {key!r}")
    fields.setdefault("max_tokens", 16)
    return SamplingParams.from_dict(fields)


def _constraint(body: dict[str, Any], tools: ToolChoice | None = None) -> StructuredOutputsParams | None:
    """The request's one output constraint: `response_format`, vLLM's `structured_outputs`
    (extra_body), or a forced tool call; two of them at once is a 400 naming both."""
    given = {}
    fmt = response_format_constraint(body.pop("response_format", None))
    if fmt is not None:
        given["response_format"] = fmt
    extra = body.pop("structured_outputs", None)
    if extra is not None:
        given["structured_outputs"] = StructuredOutputsParams.from_dict(extra)
    forced = tools.constraint() if tools is not None else None
    if forced is not None:
        given["tool_choice"] = forced
    if len(given) > 1:
        names = sorted(given)
        raise InvalidRequest(names[-1], f"{' and '.join(names)} cannot be used together: each constrains the output")
    return next(iter(given.values()), None)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.pop("stream_options", None)
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options", "stream_options must be an object")
    if not stream:
        raise InvalidRequest("stream_options", "stream_options is only allowed when stream is true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequest("stream_options.include_usage", "stream_options.include_usage must be true or false")
    return include


def _completion_prompts(prompt: Any) -> list[Any]:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of those lists."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]
    raise InvalidRequest("prompt", "prompt must be a string, a list of strings, or (lists of) token ids")


def parse_completion(body: dict[str, Any]) -> OpenAIRequest:
    body = dict(body)
    if "prompt" not in body:
        raise InvalidRequest("prompt", "prompt is required")
    prompts = _completion_prompts(body.pop("prompt"))
    stream = pop_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    echo = pop_bool(body, "echo")
    priority = pop_int(body, "priority")  # vLLM's extra field
    extra: dict[str, Any] = {}
    logprobs = _int_field(body, "logprobs", 0, _MAX_COMPLETION_LOGPROBS)
    if logprobs is not None:
        extra["logprobs"] = logprobs
        if echo:  # echoed prompt tokens come with their logprobs too, as in OpenAI's API
            extra["prompt_logprobs"] = logprobs
    best_of = body.pop("best_of", None)
    if best_of is not None:
        if stream and best_of != body.get("n", 1):
            raise InvalidRequest("best_of", "best_of cannot be used with stream (the best are known only at the end)")
        extra["best_of"] = best_of
    constraint = _constraint(body)
    if constraint is not None:
        extra["structured_outputs"] = constraint
    params = _sampling(body, extra)
    return OpenAIRequest("completion", prompts, params, stream, include_usage, echo,
                         [p if isinstance(p, str) else None for p in prompts], priority)


def _message(i: int, message: Any) -> dict[str, Any]:
    """One chat message for the template: role and text content, and the tool-calling fields
    (an assistant's `tool_calls`, a tool result's `tool_call_id`, a `name`)."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"messages[{i}].role", f"messages[{i}].role must be a non-empty string")
    if isinstance(content, list):  # content parts: only text parts are supported
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{i}].content[{j}]", "only text content parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    calls = message.get("tool_calls")
    if content is None and calls:
        content = ""  # an assistant turn that only called tools
    if not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}].content", f"messages[{i}].content must be a string")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  for c in calls):
            raise InvalidRequest(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be a list of "
                                                              "{id, type, function: {name, arguments}}")
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise InvalidRequest(f"messages[{i}].{key}", f"messages[{i}].{key} must be a string")
            out[key] = message[key]
    return out


def _tags_are_special(tokenizer: Any, parser: str) -> bool:
    tags = TOOL_CALL_TAGS.get(parser, ())
    return bool(tags) and any(t in set(getattr(tokenizer, "all_special_tokens", ()) or ()) for t in tags)


def parse_chat(body: dict[str, Any], tokenizer: Any, chat_template: str | None = None,
               max_prompt_chars: int | None = None, tool_call_parser: str = "hermes") -> OpenAIRequest:
    """`max_prompt_chars` bounds the messages' text before the template and the tokenizer
    run on it (the engine's limit for text prompts). `tool_call_parser`: how `tool_choice:
    "auto"` reads calls from the output (a `tool_parsers.TOOL_PARSERS` name)."""
    body = dict(body)
    messages = body.pop("messages", None)
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "messages must be a non-empty list")
    messages = [_message(i, m) for i, m in enumerate(messages)]
    chars = sum(len(m["content"]) for m in messages)
    if max_prompt_chars is not None and chars > max_prompt_chars:
        raise InvalidRequest("messages", f"messages hold {chars} characters, more than max_prompt_chars={max_prompt_chars}")
    if "max_completion_tokens" in body:
        value = body.pop("max_completion_tokens")
        if value is not None:
            body["max_tokens"] = value
    tools = parse_tools(body, tool_call_parser)
    constraint = _constraint(body, tools)
    stream = pop_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    add_generation_prompt = pop_bool(body, "add_generation_prompt", True)
    priority = pop_int(body, "priority")  # vLLM's extra field
    logprobs = pop_bool(body, "logprobs")
    top_logprobs = _int_field(body, "top_logprobs", 0, _MAX_CHAT_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequest("top_logprobs", "top_logprobs needs logprobs to be true")
    extra: dict[str, Any] = {"logprobs": top_logprobs or 0} if logprobs else {}
    if constraint is not None:
        extra["structured_outputs"] = constraint
    if tools is not None and tools.mode == "auto" and _tags_are_special(tokenizer, tools.parser):
        extra["skip_special_tokens"] = False  # the parser must see the tags (Hermes 2 Pro makes them special)
    params = _sampling(body, extra)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequest("messages", "this model's tokenizer has no chat template; set handler.chat_template")
    kwargs: dict[str, Any] = {}
    if tools is not None:  # the template shows the model its functions
        kwargs["tools"] = tools.tools
    try:
        text = tokenizer.apply_chat_template(template_messages(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja errors name the template problem
        raise InvalidRequest("messages", f"the chat template failed on these messages: {e}") from e
    # The template already holds any special tokens it wants: encode without adding more.
    ids = tokenizer.encode(text, add_special_tokens=False)
    return OpenAIRequest("chat", [{"prompt": text, "prompt_token_ids": ids}], params, stream, include_usage,
                         prompt_texts=[text], priority=priority, tools=tools)


def models_response(model_name: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "pagedbackend"}]}


def _chat_token(lp: Logprob) -> dict[str, Any]:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}


def _append_completion_position(pos: PositionLogprobs, token: int, tokens: list[str],
                                token_logprobs: list[float | None], top_logprobs: list[dict[str, float] | None]) -> None:
    tokens.append(pos[token].decoded_token or "")
    token_logprobs.append(pos[token].logprob)
    top_logprobs.append({(lp.decoded_token or ""): lp.logprob for lp in pos.values()})


class _Formatter:
    """Renders engine outputs as OpenAI objects; a choice's index is prompt * n + sample."""

    def __init__(self, req: OpenAIRequest, request_id: str, model: str, tokenizer: Any = None) -> None:
        self.req = req
        self.tokenizer = tokenizer
        self.model = model
        self.created = int(time.time())
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + request_id
        self.object = "chat.completion" if req.kind == "chat" else "text_completion"
        self._started: set[int] = set()
        self._finished: set[int] = set()  # choices whose finish chunk went out: nothing follows it
        self._tool_streams: dict[int, Any] = {}  # choice -> its tool-call stream (chat with tools)
        self._held_logprobs: dict[int, list] = {}  # choice -> logprobs of text its tool stream withholds

    def _index(self, prompt_idx: int, sample: int) -> int:
        return prompt_idx * self.req.params.n + sample

    def usage(self, outs: list[RequestOutput]) -> dict[str, int]:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, out in enumerate(outs):
            for c in out.outputs:
                text = (self.req.prompt_texts[p] or "") + c.text if self.req.echo else c.text
                logprobs = None
                if self.req.wants_logprobs:
                    echoed = out.prompt_logprobs if self.req.echo else None
                    logprobs = self._logprobs(c.logprobs or [], echoed, out.prompt_token_ids)
                choice: dict[str, Any] = {"index": self._index(p, c.index), "logprobs": logprobs,
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if self.req.kind == "chat":
                    message: dict[str, Any] = {"role": "assistant", "content": text}
                    tools = self.req.tools
                    if tools is not None:
                        content, calls = tools.parse(text)
                        message = {"role": "assistant", "content": content,
                                   "tool_calls": [tool_call_json(call) for call in calls]}
                        choice["finish_reason"] = tools.finish_reason(c.finish_reason, bool(calls))
                    choice["message"] = message
                else:
                    choice["text"] = text
                choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(outs)}

    def chunks(self, prompt_idx: int, out: RequestOutput) -> list[str]:
        events = []
        for c in out.outputs:
            index = self._index(prompt_idx, c.index)
            first = index not in self._started
            if index in self._finished or not (c.delta_text or c.finish_reason or first):
                continue
            self._started.add(index)
            if c.finish_reason is not None:
                self._finished.add(index)
            text = c.delta_text
            if first and self.req.echo:
                text = (self.req.prompt_texts[prompt_idx] or "") + text
            logprobs = None
            if self.req.wants_logprobs:
                echoed = out.prompt_logprobs if first and self.req.echo else None
                logprobs = self._logprobs(delta_logprobs(c), echoed, out.prompt_token_ids)
            choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": c.finish_reason}
            if self.req.kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                    {"content": text} if text else {})
                tools = self.req.tools
                if tools is not None:
                    if first:
                        self._tool_streams[index] = tools.streamer()
                    streamer = self._tool_streams[index]
                    piece = tools.stream_piece(streamer, text, c.finish_reason is not None)
                    delta = {"role": "assistant"} if first else {}
                    if piece.content:
                        delta["content"] = piece.content
                    if piece.tool_calls:
                        delta["tool_calls"] = delta_json(piece)
                    choice["finish_reason"] = tools.finish_reason(c.finish_reason, bool(streamer.tool_calls))
                    if not delta and c.finish_reason is None:
                        # All withheld (it may be the start of a tool call): its tokens' logprobs
                        # go out with the next chunk.
                        if logprobs is not None:
                            self._held_logprobs.setdefault(index, []).extend(logprobs["content"])
                        continue
                    if logprobs is not None and index in self._held_logprobs:
                        logprobs["content"] = self._held_logprobs.pop(index) + logprobs["content"]
                choice["delta"] = delta
            else:
                choice["text"] = text
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            events.append(self._event({"choices": [choice]}))
        return events

    def _logprobs(self, positions: list[PositionLogprobs], echoed: list[PositionLogprobs | None] | None,
                  prompt_ids: list[int]) -> dict[str, Any]:
        """OpenAI's logprobs object: `content` entries for chat; parallel `tokens` /
        `token_logprobs` / `top_logprobs` / `text_offset` lists for completions (the echoed
        prompt first, its first token without a logprob)."""
        if self.req.kind == "chat":
            content = []
            for pos in positions:
                (token, chosen), *_ = pos.items()
                top = sorted(((lp.rank, t, lp) for t, lp in pos.items() if lp.rank <= self.req.params.logprobs),
                             key=lambda x: x[0]) if self.req.params.logprobs else []
                content.append({**_chat_token(chosen), "top_logprobs": [_chat_token(lp) for _, _, lp in top]})
            return {"content": content}
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        if echoed is not None:
            for pos, token in zip(echoed, prompt_ids):
                if pos is None:
                    tokens.append(self.tokenizer.decode([token]))
                    token_logprobs.append(None)
                    top_logprobs.append(None)
                else:
                    _append_completion_position(pos, token, tokens, token_logprobs, top_logprobs)
        for pos in positions:
            _append_completion_position(pos, next(iter(pos)), tokens, token_logprobs, top_logprobs)
        offsets, offset = [], 0
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def usage_chunk(self, outs: list[RequestOutput]) -> str:
        return self._event({"choices": [], "usage": self.usage(outs)})

    def _event(self, body: dict[str, Any]) -> str:
        obj = {"id": self.id, "object": self.object + (".chunk" if self.req.kind == "chat" else ""),
               "created": self.created, "model": self.model, **body}
        return f"data: {json.dumps(obj)}\n\n"


def submit_openai(engine: Any, req: OpenAIRequest, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> list[Any]:
    """Validate and queue every prompt of the request now (a bad one raises here, before any
    answer is committed, and the ones already queued are aborted); one stream per prompt."""
    ids = [request_id] if len(req.prompts) == 1 else [f"{request_id}-{i}" for i in range(len(req.prompts))]
    streams: list[Any] = []
    try:
        for prompt, rid in zip(req.prompts, ids):
            streams.append(engine.add_request(prompt, req.params, rid, req.priority, loop=loop))
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


async def _run_all(engine: Any, streams: list[Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of every prompt's stream as they arrive; leaving early aborts them all."""
    if len(streams) == 1:
        async for out in engine.stream(streams[0]):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            async for out in engine.stream(streams[i]):
                await queue.put((i, out))
        except BaseException as e:  # handed to the consumer, which re-raises it
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:  # the client left or one prompt failed: stop (and abort) the rest
            t.cancel()
        for stream in streams:  # also those whose pump never started
            stream.abort()


async def complete_openai(engine: Any, req: OpenAIRequest, request_id: str, model: str,
                          streams: list[Any] | None = None) -> dict[str, Any]:
    streams = streams if streams is not None else submit_openai(engine, req, request_id)
    finals: dict[int, RequestOutput] = {}
    async for i, out in _run_all(engine, streams):
        if out.finished:
            finals[i] = out
    return _Formatter(req, request_id, model, engine.tokenizer).response([finals[i] for i in range(len(req.prompts))])


async def stream_openai(engine: Any, req: OpenAIRequest, request_id: str, model: str,
                        streams: list[Any] | None = None) -> AsyncIterator[str]:
    streams = streams if streams is not None else submit_openai(engine, req, request_id)
    fmt = _Formatter(req, request_id, model, engine.tokenizer)
    finals: dict[int, RequestOutput] = {}
    async for i, out in _run_all(engine, streams):
        for event in fmt.chunks(i, out):
            yield event
        if out.finished:
            finals[i] = out
    if req.include_usage:
        yield fmt.usage_chunk([finals[i] for i in range(len(req.prompts))])
    yield "data: [DONE]\n\n"
