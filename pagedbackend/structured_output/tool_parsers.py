"""OpenAI tool calls from model output text: whole (`parse`) and streamed (`streamer().feed`).

The formats are those of vLLM's `--tool-call-parser` names (`TOOL_PARSERS`):

- ``hermes`` (Hermes, Qwen2.5, Qwen3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks amid ordinary text; the last block may lack its closing tag.
- ``llama3_json`` (Llama 3.1/3.2): the whole output, after an optional ``<|python_tag|>``, is one
  ``{"name": ..., "parameters": {...}}`` object or several joined by ``;``.
- forced calls (``tool_choice="required"`` or a named function, where a grammar already forces
  the shape): `parse_required` / `RequiredToolCallStream` for a JSON array of calls, and
  `parse_named` / `NamedToolCallStream` for output that is the arguments object itself.

A call's ``arguments`` is the raw JSON text the model wrote for the arguments value (not a
re-serialisation), so a streamed call's argument pieces join to exactly what `parse` returns for
the same text. Both paths share one incremental JSON scanner (`_CallScanner`), which reads each
character once, so streaming a long output stays linear.

Malformed call text (not JSON, no string ``"name"``, arguments that are not an object) stays
content. A stream cannot take back what it has sent, though: if a call proves malformed only
after its header delta (id and name) went out, the call stays in the stream, with the argument
text sent so far, and the text from the point of failure on is released as content. For text
that is complete, `parse` would instead have returned the whole block as content.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "NamedToolCallStream",
    "RequiredToolCallStream",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolParser",
    "new_tool_call_id",
    "parse_named",
    "parse_required",
    "parser_for_model_type",
]


def new_tool_call_id() -> str:
    """An id in OpenAI's shape: ``call_`` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw JSON text of the arguments object, as the model wrote it


@dataclass
class ToolCallDelta:
    """One OpenAI streaming delta for a tool call: a call's first delta carries its id and
    name, every later one only the next piece of its arguments text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """What one `ToolCallStream.feed` (or `finish`) releases: content text and tool-call deltas."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Incremental JSON scanning of one tool-call object
# ---------------------------------------------------------------------------------------------

_JSON_SPACE = " \t\n\r"
_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]+')  # string characters needing no attention
_NUMBER_RUN = re.compile(r"[0-9eE+\-.]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SPACE = re.compile(r"\s*")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrtu')
_LITERALS = {"t": "true", "f": "false", "n": "null"}

# Scanner states: what the next character may be.
_VALUE = "value"            # a value (the object itself at the start)
_FIRST_KEY = "first key"    # a key or "}" (just after "{")
_KEY = "key"                # a key (after "," in an object)
_COLON = "colon"
_FIRST_ITEM = "first item"  # a value or "]" (just after "[")
_AFTER = "after"            # "," or the closing bracket, after a value
_STRING = "string"
_ESCAPE = "escape"          # after a backslash in a string
_UNICODE = "unicode"        # in the four hex digits of a \u escape
_NUMBER_STATE = "number"
_LITERAL = "literal"        # in true / false / null

# What the scanner is copying out of the text: a top-level key, the name value, the arguments.
_CAPTURE_KEY = "key"
_CAPTURE_NAME = "name"
_CAPTURE_ARGUMENTS = "arguments"


class _CallScanner:
    """Validates one JSON object, fed in pieces, and picks out of it the string value of its
    top-level ``"name"`` and the raw text of its arguments object (the value of one of
    `argument_keys`), which it hands out piece by piece (`take_arguments`) as it is read.

    It stops at the object's closing brace (`done`) or at the first character that cannot
    continue a valid tool call (`error`), leaving that character unread. The validation is
    JSON's own (strings without raw control characters, numbers, literals), so the arguments
    text of a call it accepts is valid JSON. A repeated ``"name"`` or arguments key is an
    error: JSON decoders disagree on which one wins.
    """

    def __init__(self, argument_keys: tuple[str, ...]) -> None:
        self._argument_keys = argument_keys
        self._state = _VALUE
        self._stack: list[str] = []  # the open brackets
        self._string_is_key = False
        self._hex_left = 0
        self._token = ""  # the number or literal read so far
        self._literal = ""  # the literal being read
        self._role: str | None = None  # of the top-level value being read: name, arguments, other
        self._roles_seen: set[str] = set()
        self._capture: str | None = None
        self._capture_from = 0
        self._captured: list[str] = []  # the key or name text read so far
        self._arguments: list[str] = []  # arguments text read and not yet taken
        self.name: str | None = None
        self.arguments_started = False
        self.arguments_done = False
        self.done = False
        self.error = False

    def feed(self, text: str, pos: int = 0) -> int:
        """Read `text` from `pos`; return where reading stopped (the end, or just past the
        object, or at an offending character)."""
        self._capture_from = pos
        end = len(text)
        while pos < end and not (self.done or self.error):
            pos = self._step(text, pos)
        if self._capture is not None and pos > self._capture_from:
            self._sink().append(text[self._capture_from:pos])
        return pos

    def take_arguments(self) -> str:
        """The arguments text read since the last call."""
        text = "".join(self._arguments)
        self._arguments.clear()
        return text

    def _sink(self) -> list[str]:
        return self._arguments if self._capture == _CAPTURE_ARGUMENTS else self._captured

    def _begin_capture(self, kind: str, pos: int) -> None:
        self._capture = kind
        self._capture_from = pos

    def _end_capture(self, text: str, end: int) -> None:
        self._sink().append(text[self._capture_from:end])
        self._capture = None

    def _decode_captured(self) -> object:
        """The captured key or name, decoded (it was validated while read)."""
        value = json.loads("".join(self._captured))
        self._captured.clear()
        return value

    def _fail(self, pos: int) -> int:
        self.error = True
        return pos

    def _step(self, text: str, pos: int) -> int:
        """Read from `pos` (at least one character, unless switching state); return the
        position after what was read."""
        state = self._state
        char = text[pos]
        if state == _STRING:
            run = _STRING_RUN.match(text, pos)
            if run:
                return run.end()
            if char == '"':
                return self._end_string(text, pos)
            if char == "\\":
                self._state = _ESCAPE
                return pos + 1
            return self._fail(pos)  # a raw control character
        if state == _ESCAPE:
            if char not in _ESCAPES:
                return self._fail(pos)
            self._state, self._hex_left = (_UNICODE, 4) if char == "u" else (_STRING, 0)
            return pos + 1
        if state == _UNICODE:
            if char not in _HEX_DIGITS:
                return self._fail(pos)
            self._hex_left -= 1
            if not self._hex_left:
                self._state = _STRING
            return pos + 1
        if state == _NUMBER_STATE:
            run = _NUMBER_RUN.match(text, pos)
            if run:
                self._token += run.group()
                return run.end()
            if not _NUMBER.fullmatch(self._token):
                return self._fail(pos)
            self._state = _AFTER
            return pos  # the character after the number is read in the new state
        if state == _LITERAL:
            word = self._token + char
            if not self._literal.startswith(word):
                return self._fail(pos)
            self._token = word
            if word == self._literal:
                self._state = _AFTER
            return pos + 1
        if char in _JSON_SPACE:
            return pos + 1
        if state == _VALUE:
            return self._start_value(char, pos)
        if state == _FIRST_ITEM:
            return self._close(text, pos) if char == "]" else self._start_value(char, pos)
        if state in (_FIRST_KEY, _KEY):
            if char == "}" and state == _FIRST_KEY:
                return self._close(text, pos)
            if char != '"':
                return self._fail(pos)
            self._state, self._string_is_key = _STRING, True
            if len(self._stack) == 1:
                self._begin_capture(_CAPTURE_KEY, pos)
            return pos + 1
        if state == _COLON:
            if char != ":":
                return self._fail(pos)
            self._state = _VALUE
            return pos + 1
        # _AFTER
        if char == ",":
            self._state = _KEY if self._stack[-1] == "{" else _VALUE
            return pos + 1
        if char == {"{": "}", "[": "]"}[self._stack[-1]]:
            return self._close(text, pos)
        return self._fail(pos)

    def _start_value(self, char: str, pos: int) -> int:
        depth = len(self._stack)
        role = self._role if depth == 1 else None
        if (depth == 0 and char != "{") or (role == _CAPTURE_NAME and char != '"') or (
                role == _CAPTURE_ARGUMENTS and char != "{"):
            return self._fail(pos)
        if char in "{[":
            self._stack.append(char)
            self._state = _FIRST_KEY if char == "{" else _FIRST_ITEM
            if role == _CAPTURE_ARGUMENTS:
                self._begin_capture(_CAPTURE_ARGUMENTS, pos)
                self.arguments_started = True
            return pos + 1
        if char == '"':
            self._state, self._string_is_key = _STRING, False
            if role == _CAPTURE_NAME:
                self._begin_capture(_CAPTURE_NAME, pos)
            return pos + 1
        if char in "-0123456789":
            self._state, self._token = _NUMBER_STATE, ""
            return pos
        if char in _LITERALS:
            self._state, self._token, self._literal = _LITERAL, "", _LITERALS[char]
            return pos
        return self._fail(pos)

    def _end_string(self, text: str, pos: int) -> int:
        """At the closing quote of a string."""
        if not self._string_is_key:
            if self._capture == _CAPTURE_NAME:
                self._end_capture(text, pos + 1)
                self.name = str(self._decode_captured())
            self._state = _AFTER
            return pos + 1
        self._state = _COLON
        if self._capture == _CAPTURE_KEY:
            self._end_capture(text, pos + 1)
            key = self._decode_captured()
            self._role = (_CAPTURE_NAME if key == "name"
                          else _CAPTURE_ARGUMENTS if key in self._argument_keys else None)
            if self._role is not None:
                if self._role in self._roles_seen:
                    return self._fail(pos)
                self._roles_seen.add(self._role)
        return pos + 1

    def _close(self, text: str, pos: int) -> int:
        """At a closing bracket that matches the innermost open one."""
        self._stack.pop()
        if not self._stack:
            if self.name is None or not self.arguments_done:
                return self._fail(pos)
            self.done = True
        elif len(self._stack) == 1 and self._capture == _CAPTURE_ARGUMENTS:
            self._end_capture(text, pos + 1)
            self.arguments_done = True
        self._state = _AFTER
        return pos + 1


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------

# A mode handles the text that reaches it and returns what is left for the next mode (after
# switching to it), or None once everything is consumed or withheld.
_Mode = Callable[[str, StreamDelta], "str | None"]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that `tag` starts with (short of all of `tag`):
    text that may yet become the tag, so it cannot be released."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ToolCallStream(ABC):
    """Turns generated text, delta by delta, into content and OpenAI tool-call deltas."""

    def __init__(self) -> None:
        self._calls: list[tuple[str, str, list[str]]] = []  # id, name, argument pieces

    def feed(self, delta: str) -> StreamDelta:
        """Take the next piece of generated text; return what can be sent now."""
        out = StreamDelta()
        self._consume(delta, out)
        return out

    def finish(self) -> StreamDelta:
        """At the end of generation: release whatever was withheld."""
        out = StreamDelta()
        self._flush(out)
        return out

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls streamed so far, with the ids their deltas carried."""
        return [ToolCall(call_id, name, "".join(pieces)) for call_id, name, pieces in self._calls]

    @abstractmethod
    def _consume(self, text: str, out: StreamDelta) -> None: ...

    @abstractmethod
    def _flush(self, out: StreamDelta) -> None: ...

    def _open_call(self, name: str, arguments: str, out: StreamDelta) -> None:
        call_id = new_tool_call_id()
        self._calls.append((call_id, name, [arguments]))
        out.tool_calls.append(ToolCallDelta(len(self._calls) - 1, call_id, name, arguments))

    def _extend_call(self, piece: str, out: StreamDelta) -> None:
        """Send the next piece of the latest call's arguments, merged into a delta for the same
        call already in `out` (one delta per call per chunk, as OpenAI sends them)."""
        if not piece:
            return
        index = len(self._calls) - 1
        self._calls[index][2].append(piece)
        if out.tool_calls and out.tool_calls[-1].index == index:
            out.tool_calls[-1].arguments += piece
        else:
            out.tool_calls.append(ToolCallDelta(index, arguments=piece))


class _ScannedCallStream(ToolCallStream):
    """A stream of JSON call objects read by `_CallScanner`, run as a chain of modes.

    A call's header delta goes out once both its name and the start of its arguments object
    have been read (the name may come after the arguments); holding it until the arguments
    start means a string or missing arguments value is caught while the text can still become
    content. Until then the call's text is kept in `_raw`, to be released if it proves malformed.
    """

    _argument_keys: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        super().__init__()
        self._mode: _Mode
        self._scanner = _CallScanner(self._argument_keys)  # replaced at each call's start
        self._header_sent = False
        self._raw: list[str] = []

    def _consume(self, text: str, out: StreamDelta) -> None:
        rest: str | None = text
        while rest is not None:
            rest = self._mode(rest, out)

    def _start_call(self) -> None:
        self._scanner = _CallScanner(self._argument_keys)
        self._header_sent = False

    def _scan(self, text: str, out: StreamDelta) -> int:
        """Feed `text` to the current call and send what became ready; return where the
        scanner stopped."""
        scanner = self._scanner
        end = scanner.feed(text)
        if self._header_sent:  # even on an error: the call keeps what was read before it
            self._extend_call(scanner.take_arguments(), out)
        elif not scanner.error and scanner.name is not None and scanner.arguments_started:
            self._open_call(scanner.name, scanner.take_arguments(), out)
            self._header_sent = True
            self._raw = []
        else:
            self._raw.append(text[:end])
        return end

    def _take_raw(self) -> str:
        raw = "".join(self._raw)
        self._raw = []
        return raw


_OPEN = "<tool_call>"
_CLOSE = "</tool_call>"


class _HermesStream(_ScannedCallStream):
    """Content, with ``<tool_call>`` blocks turned into calls.

    Content is released as soon as it cannot be the start of ``<tool_call>``. A block that is
    malformed stays content up to and including the next ``</tool_call>``, as in `parse`.
    """

    _argument_keys = ("arguments",)

    def __init__(self) -> None:
        super().__init__()
        self._mode = self._text_mode
        self._pending = ""  # text withheld by the current mode
        self._search_from = 0  # where in `_pending` a malformed block's closing tag may start

    def _text_mode(self, text: str, out: StreamDelta) -> str | None:
        text = self._pending + text
        start = text.find(_OPEN)
        if start < 0:
            release = len(text) - _partial_suffix(text, _OPEN)
            out.content += text[:release]
            self._pending = text[release:]
            return None
        out.content += text[:start]
        self._pending = ""
        self._start_call()
        self._raw = [_OPEN]
        self._mode = self._call_mode
        return text[start + len(_OPEN):]

    def _call_mode(self, text: str, out: StreamDelta) -> str | None:
        end = self._scan(text, out)
        if self._scanner.error:
            # Unsent, the whole block is content; sent, the call stands and the rest is content.
            self._search_from = 0 if self._header_sent else len(_OPEN)
            self._pending = self._take_raw() + text[end:]
            self._mode = self._malformed_mode
            return ""
        if not self._scanner.done:
            return None
        self._mode = self._after_call_mode
        return text[end:]

    def _after_call_mode(self, text: str, out: StreamDelta) -> str | None:
        """After a call's object: whitespace, then ``</tool_call>`` (or the end of the text)."""
        self._pending += text
        head = self._pending.lstrip()
        if head.startswith(_CLOSE):
            self._pending = ""
            self._mode = self._text_mode
            return head[len(_CLOSE):]
        if _CLOSE.startswith(head):
            return None
        self._search_from = 0
        self._mode = self._malformed_mode
        return ""

    def _malformed_mode(self, text: str, out: StreamDelta) -> str | None:
        """In text that stays content up to and including the next ``</tool_call>``."""
        text = self._pending + text
        close = text.find(_CLOSE, self._search_from)
        if close < 0:
            release = len(text) - _partial_suffix(text[self._search_from:], _CLOSE)
            out.content += text[:release]
            self._pending, self._search_from = text[release:], 0
            return None
        end = close + len(_CLOSE)
        out.content += text[:end]
        self._pending = ""
        self._mode = self._text_mode
        return text[end:]

    def _flush(self, out: StreamDelta) -> None:
        if self._mode == self._call_mode:
            out.content += self._take_raw()  # an unterminated block, unless its call went out
        elif self._mode != self._after_call_mode or self._pending.strip():
            out.content += self._pending
        self._pending = ""


def _parse_hermes_block(text: str, body: int) -> tuple[ToolCall | None, int]:
    """The call in the block whose object starts at `body`, and where the block ends (past
    ``</tool_call>``, or at the end of the text); None if it is no valid call."""
    scanner = _CallScanner(_HermesStream._argument_keys)
    end = _SPACE.match(text, scanner.feed(text, body)).end()
    if not scanner.done:
        return None, body
    if text.startswith(_CLOSE, end):
        end += len(_CLOSE)
    elif end < len(text):
        return None, body
    assert scanner.name is not None
    return ToolCall(new_tool_call_id(), scanner.name, scanner.take_arguments()), end


_OBJECT = "object"  # the place in a call list where a call object starts


class _CallListStream(_ScannedCallStream):
    """Call objects in a frame of separators: a small automaton over the characters between
    calls (`_transitions` from (place, character) to the next place or to `_OBJECT`), with
    JSON whitespace allowed anywhere between. All of the output belongs to the calls, so a
    list that breaks off is malformed (`malformed`): what of it was not sent becomes content.
    """

    _argument_keys = ("parameters", "arguments")
    _transitions: ClassVar[dict[tuple[str, str], str]]
    _accepting: ClassVar[frozenset[str]]  # places where the text may end

    def __init__(self) -> None:
        super().__init__()
        self._mode = self._between_mode
        self._place = "start"
        self.malformed = False

    def _between_mode(self, text: str, out: StreamDelta) -> str | None:
        for pos, char in enumerate(text):
            if char in _JSON_SPACE:
                continue
            place = self._transitions.get((self._place, char))
            if place is None:
                self._raw.append(text[:pos])
                return self._fail(text[pos:], out)
            if place == _OBJECT:
                self._raw.append(text[:pos])
                self._start_call()
                self._mode = self._call_mode
                return text[pos:]
            self._place = place
        self._raw.append(text)
        return None

    def _call_mode(self, text: str, out: StreamDelta) -> str | None:
        end = self._scan(text, out)
        if self._scanner.error:
            return self._fail(text[end:], out)
        if not self._scanner.done:
            return None
        self._place = "call"
        self._mode = self._between_mode
        return text[end:]

    def _content_mode(self, text: str, out: StreamDelta) -> str | None:
        out.content += text
        return None

    def _fail(self, rest: str, out: StreamDelta) -> None:
        self.malformed = True
        out.content += self._take_raw() + rest
        self._mode = self._content_mode

    def _flush(self, out: StreamDelta) -> None:
        if self._mode == self._call_mode or (
                self._mode == self._between_mode and self._place not in self._accepting):
            self._fail("", out)


_PYTHON_TAG = "<|python_tag|>"


class _Llama3JsonStream(_CallListStream):
    """Calls joined by ``;`` (a trailing one allowed, as vLLM does), if the output starts with
    ``{`` or ``<|python_tag|>`` after whitespace; otherwise all of it is content."""

    _transitions = {("start", "{"): _OBJECT, ("call", ";"): "separator", ("separator", "{"): _OBJECT}
    _accepting = frozenset({"call", "separator"})

    def __init__(self) -> None:
        super().__init__()
        self._mode = self._undecided_mode
        self._pending = ""  # leading text, until it tells calls from content

    def _undecided_mode(self, text: str, out: StreamDelta) -> str | None:
        self._pending += text
        head = self._pending.lstrip()
        if not (head.startswith(_PYTHON_TAG) or head.startswith("{")):
            if not head or _PYTHON_TAG.startswith(head):
                return None
            self._mode = self._content_mode
        else:
            self._mode = self._between_mode
            if head.startswith(_PYTHON_TAG):
                cut = len(self._pending) - len(head) + len(_PYTHON_TAG)
                self._raw.append(self._pending[:cut])
                self._pending = self._pending[cut:]
        rest, self._pending = self._pending, ""
        return rest

    def _flush(self, out: StreamDelta) -> None:
        if self._mode == self._undecided_mode:
            out.content += self._pending
        else:
            super()._flush(out)


class RequiredToolCallStream(_CallListStream):
    """Streams forced calls (``tool_choice="required"``): a JSON array of
    ``{"name": ..., "parameters": {...}}`` objects (``"arguments"`` accepted too)."""

    _transitions = {
        ("start", "["): "open", ("open", "{"): _OBJECT, ("open", "]"): "end",
        ("call", ","): "separator", ("call", "]"): "end", ("separator", "{"): _OBJECT,
    }
    _accepting = frozenset({"end"})


class NamedToolCallStream(ToolCallStream):
    """Streams a forced call of the function `name`, whose arguments object is the whole
    output: the first text sends the header, the rest goes out as argument pieces. Surrounding
    whitespace is held back, so the pieces join to the stripped output, as `parse_named` has it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._started = False  # whether non-space text was seen
        self._space = ""  # whitespace withheld, that may end the output

    def _consume(self, text: str, out: StreamDelta) -> None:
        if not text:
            return
        if not self._calls:
            self._open_call(self._name, "", out)
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        body = text.rstrip()
        if body:
            self._extend_call(self._space + body, out)
            self._space = text[len(body):]
        else:
            self._space += text

    def _flush(self, out: StreamDelta) -> None:
        self._space = ""


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a forced ``tool_choice="required"`` output (see `RequiredToolCallStream`),
    or none if it is not such an array."""
    stream = RequiredToolCallStream()
    stream.feed(text)
    stream.finish()
    return [] if stream.malformed else stream.tool_calls


def parse_named(text: str, name: str) -> list[ToolCall]:
    """The call of a forced named function, whose arguments object is the whole output; none
    if the output is not a JSON object."""
    arguments = text.strip()
    try:
        value = json.loads(arguments)
    except ValueError:
        return []
    return [ToolCall(new_tool_call_id(), name, arguments)] if isinstance(value, dict) else []


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


class ToolParser(ABC):
    """One model family's tool-call format."""

    name: ClassVar[str]

    @abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole output as (its content outside the calls, stripped, or None if empty;
        the calls). Malformed call text stays content."""

    @abstractmethod
    def streamer(self) -> ToolCallStream:
        """A stream for one output (one choice of one request)."""


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks amid content
    (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while (start := text.find(_OPEN, pos)) >= 0:
            content.append(text[pos:start])
            body = start + len(_OPEN)
            call, end = _parse_hermes_block(text, body)
            if call is None:
                close = text.find(_CLOSE, body)
                end = len(text) if close < 0 else close + len(_CLOSE)
                content.append(text[start:end])
            else:
                calls.append(call)
            pos = end
        content.append(text[pos:])
        return "".join(content).strip() or None, calls

    def streamer(self) -> ToolCallStream:
        return _HermesStream()


class Llama3JsonToolParser(ToolParser):
    """The whole output is calls: ``{"name": ..., "parameters": {...}}`` objects joined by
    ``;``, after an optional ``<|python_tag|>`` (Llama 3.1/3.2 JSON tool calling)."""

    name = "llama3_json"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        stream = _Llama3JsonStream()
        stream.feed(text)
        stream.finish()
        if stream.malformed or not stream.tool_calls:
            return text.strip() or None, []
        return None, stream.tool_calls

    def streamer(self) -> ToolCallStream:
        return _Llama3JsonStream()


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)
}


def parser_for_model_type(model_type: str) -> str:
    """The `TOOL_PARSERS` name for a Hugging Face ``model_type``: Llama's JSON format for
    ``llama``, and Hermes' tags (Qwen's, and most chat templates') for everything else."""
    return "llama3_json" if model_type == "llama" else "hermes"
