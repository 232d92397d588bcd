"""OpenAI's structured-output and tool-calling fields on the chat and completion routes, as vLLM
serves them: `response_format` / `structured_outputs` become a request's grammar; `tools` +
`tool_choice` become the chat template's `tools`, a grammar (`"required"`, a named function)
or a parser over the output text (`"auto"`), and the answer's `tool_calls` — whole, or streamed
as OpenAI streams them (a call's id and name first, then its arguments in pieces).

Forced calls are constrained to JSON (xgrammar) and so always parse; `"auto"` parses what the
model chose to write with the parser of its family (`tool_parsers`), and text that is not a
well-formed call stays text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pagedbackend.errors import InvalidRequest
from pagedbackend.structured_output.params import StructuredOutputsParams
from pagedbackend.structured_output.tool_parsers import (TOOL_PARSERS, NamedToolCallStream, RequiredToolCallStream,
                                                         StreamDelta, ToolCall, ToolCallStream, parse_named,
                                                         parse_required)

TOOL_CHOICES = ("none", "auto", "required")
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


def response_format_constraint(value: Any) -> StructuredOutputsParams | None:
    """OpenAI's `response_format`: `text` (nothing), `json_object`, or `json_schema` with
    `{name, schema, strict, description}`; anything else is a 400 naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidRequest("response_format", "response_format must be an object with a type")
    kind = value["type"]
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise InvalidRequest("response_format", f"response_format: unknown field(s) {', '.join(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise InvalidRequest("response_format.type", f"response_format.type must be text, json_object or json_schema, "
                                                     f"got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema", "response_format.json_schema must be an object with "
                                                            "name and schema")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise InvalidRequest("response_format.json_schema", f"response_format.json_schema: unknown field(s) "
                                                            f"{', '.join(unknown)}")
    if not isinstance(spec.get("name"), str) or not _FUNCTION_NAME.match(spec["name"]):
        raise InvalidRequest("response_format.json_schema.name", "response_format.json_schema.name must be 1-64 "
                                                                 "letters, digits, _ or -")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise InvalidRequest("response_format.json_schema.strict", "response_format.json_schema.strict must be "
                                                                   "true or false")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema", "response_format.json_schema.schema must be a "
                                                                   "JSON schema object")
    try:
        return StructuredOutputsParams(json=schema)
    except InvalidRequest as e:
        raise InvalidRequest("response_format.json_schema.schema", str(e)) from None


@dataclass
class ToolChoice:
    """A chat request's tools and what it asks of them. `mode`: auto | required | named
    (`name` set); `tool_choice: "none"` makes none (the tools then change nothing)."""

    tools: list[dict[str, Any]]
    mode: str
    name: str | None = None
    parallel: bool = True
    parser: str = "hermes"

    @property
    def functions(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar a forced call is generated under: the named function's parameters, or
        (`required`) a JSON array of calls of the given functions, one call unless parallel."""
        if self.mode == "named":
            return StructuredOutputsParams(json=_parameters(self.functions[self.name]))
        if self.mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                   "parameters": _parameters(fn)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, fn in self.functions.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The answer's content and tool calls, from the whole output (one call unless parallel)."""
        if self.mode == "named":
            calls = parse_named(text, self.name)
        elif self.mode == "required":
            calls = parse_required(text)
        else:
            content, calls = TOOL_PARSERS[self.parser]().parse(text)
            return content, calls if self.parallel else calls[:1]
        return (None, calls) if calls else (text, [])

    def streamer(self) -> ToolCallStream:
        if self.mode == "named":
            return NamedToolCallStream(self.name)
        if self.mode == "required":
            return RequiredToolCallStream()
        return TOOL_PARSERS[self.parser]().streamer()

    def stream_piece(self, streamer: ToolCallStream, text: str, final: bool) -> StreamDelta:
        """What a streamed chunk carries: the text fed to the call stream (flushed at the end),
        as `parse` would read the whole output (one call unless parallel)."""
        piece = streamer.feed(text)
        if final:
            tail = streamer.finish()
            piece.content += tail.content
            piece.tool_calls += tail.tool_calls
        if not self.parallel:
            piece.tool_calls = [d for d in piece.tool_calls if d.index == 0]
        return piece

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """OpenAI's: "tool_calls" when the model stopped after calling; a forced named function
        keeps "stop"."""
        return "tool_calls" if called and reason == "stop" and self.mode != "named" else reason


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def parse_tools(body: dict[str, Any], parser: str) -> ToolChoice | None:
    """Pop `tools`, `tool_choice` and `parallel_tool_calls` from a chat body and check them
    (OpenAI's rules: a choice other than none needs tools; a named function must be one of
    them). None when the request has no tools, or `tool_choice` is "none"."""
    tools = body.pop("tools", None)
    choice = body.pop("tool_choice", None)
    parallel = body.pop("parallel_tool_calls", None)
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls", "parallel_tool_calls must be true or false")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice", "tool_choice needs tools: give the functions in tools")
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools", "tools must be a list of {type: function, function: {...}}")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequest(where, f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        unknown = sorted(set(tool) - {"type", "function"})
        if unknown:
            raise InvalidRequest(where, f"{where}: unknown field(s) {', '.join(unknown)}")
        fn = tool["function"]
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise InvalidRequest(f"{where}.function", f"{where}.function: unknown field(s) {', '.join(unknown)}")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidRequest(f"{where}.function.name", f"{where}.function.name must be 1-64 letters, digits, _ or -")
        if name in names:
            raise InvalidRequest(f"{where}.function.name", f"{where}.function.name: {name!r} is given twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON schema "
                                                                 "object")
    result = ToolChoice(tools, "auto", parallel=True if parallel is None else parallel, parser=parser)
    if choice == "none":
        return None  # checked, and nothing to do: no calls, and the template is not shown them
    if choice is None or choice in TOOL_CHOICES:
        result.mode = choice or "auto"
        return result
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in names:
            raise InvalidRequest("tool_choice", f"tool_choice names function {name!r}, which is not in tools "
                                                f"({', '.join(sorted(names))})")
        result.mode, result.name = "named", name
        return result
    raise InvalidRequest("tool_choice", "tool_choice must be none, auto, required or "
                                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def delta_json(delta: StreamDelta) -> list[dict[str, Any]]:
    """A stream delta's tool calls as OpenAI's `delta.tool_calls` entries."""
    entries = []
    for d in delta.tool_calls:
        entry: dict[str, Any] = {"index": d.index}
        function: dict[str, Any] = {"arguments": d.arguments}
        if d.id is not None:
            entry.update(id=d.id, type="function")
            function = {"name": d.name, "arguments": d.arguments}
        entry["function"] = function
        entries.append(entry)
    return entries


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls in the history, with their arguments as objects (what the chat
    templates of tool-calling models iterate over), the rest as given."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = dict(m, tool_calls=[_template_call(c) for c in calls])
        out.append(m)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # a template prints it as it is
    return dict(call, function=fn)
