"""What a request asks its output to match (vLLM's `StructuredOutputsParams`, same names).

Exactly one constraint: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice`
(the output is one of the strings), `grammar` (EBNF, in the GBNF dialect xgrammar and
llama.cpp read) or `json_object=True` (any JSON object). Plain data, checked in the
constructor so a malformed one is refused with the field's name before anything compiles;
whether the schema, regex or grammar itself is valid is the compiler's verdict
(`structured_output.compiler`), also an `InvalidRequest` naming the field.

Imports nothing heavy: `SamplingParams` (and so the scheduler) holds these.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from pagedbackend.errors import InvalidRequest

# The constraint kinds, in vLLM's order of precedence (one per request here).
KINDS = ("json", "regex", "choice", "grammar", "json_object")
_FIELD = "structured_outputs"
# vLLM fields this engine does not offer: refused by name instead of silently ignored.
_UNSUPPORTED = {
    "structural_tag": "structural tags are not supported; use json, regex, choice or grammar",
    "whitespace_pattern": "whitespace_pattern is not supported; use disable_any_whitespace",
    "disable_additional_properties": "disable_additional_properties is not supported; "
                                     "set \"additionalProperties\": false in the schema",
}

# `structured_outputs_config` (vLLM's engine-level dict): xgrammar is the one backend ("auto"
# picks it); `disable_any_whitespace` makes compact JSON every request's default.
BACKENDS = ("auto", "xgrammar")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    backend: str = "xgrammar"
    disable_any_whitespace: bool = False

    @classmethod
    def parse(cls, value: Any) -> "StructuredOutputsConfig":
        """From a dict or its JSON text; ValueError naming the key otherwise."""
        if value is None:
            return cls()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"structured_outputs_config is not valid JSON: {e}") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"structured_outputs_config must be a dict, got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in ("backend", "disable_any_whitespace"))
        if unknown:
            raise ValueError(f"structured_outputs_config: unknown key(s) {', '.join(unknown)}; expected backend, "
                             "disable_any_whitespace")
        backend = value.get("backend", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"structured_outputs_config: backend must be one of {', '.join(BACKENDS)}, "
                             f"got {backend!r}")
        compact = value.get("disable_any_whitespace", False)
        if not isinstance(compact, bool):
            raise ValueError(f"structured_outputs_config: disable_any_whitespace must be true or false, got {compact!r}")
        return cls("xgrammar", compact)


# Fields vLLM removed in 0.12 (and now ignores silently, answering unconstrained): refused
# here with what to send instead.
REMOVED_FIELDS = {
    "guided_json": "structured_outputs: {\"json\": <schema>} (or response_format json_schema)",
    "guided_regex": "structured_outputs: {\"regex\": <pattern>}",
    "guided_choice": "structured_outputs: {\"choice\": [<strings>]}",
    "guided_grammar": "structured_outputs: {\"grammar\": <EBNF>}",
    "guided_decoding_backend": "structured_outputs_config: {\"backend\": ...} at engine level",
    "guided_whitespace_pattern": "structured_outputs: {\"disable_any_whitespace\": true}",
    "guided_decoding": "structured_outputs=StructuredOutputsParams(...)",
}


def removed_field_error(name: str) -> InvalidRequest:
    return InvalidRequest(name, f"{name} was removed (as in vLLM 0.12); use {REMOVED_FIELDS[name]}")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's switch: JSON without optional whitespace between tokens (compact output; a random
    # or weak model otherwise spends tokens on whitespace the grammar allows).
    disable_any_whitespace: bool = False
    # vLLM's: no fallback to another backend exists here, so it changes nothing; accepted.
    disable_fallback: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(given) != 1:
            which = ", ".join(given) if given else "none"
            raise InvalidRequest(_FIELD, f"{_FIELD} must set exactly one of {', '.join(KINDS)} (got {which})")
        kind = given[0]
        value = getattr(self, kind)
        name = f"{_FIELD}.{kind}"
        if kind == "json":
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as e:
                    raise InvalidRequest(name, f"{name} is not valid JSON: {e}") from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)):
                raise InvalidRequest(name, f"{name} must be a JSON schema (an object), got {type(parsed).__name__}")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise InvalidRequest(name, f"{name} must be a non-empty string")
        elif kind == "choice":
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(isinstance(c, str) and c for c in value)):
                raise InvalidRequest(name, f"{name} must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(value))
        elif value is not True:
            raise InvalidRequest(name, f"{name} must be true or absent")
        for flag in ("disable_any_whitespace", "disable_fallback"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequest(f"{_FIELD}.{flag}", f"{_FIELD}.{flag} must be true or false")
        self.key  # noqa: B018 - a schema that cannot be written as JSON is refused here, by name

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None and getattr(self, k) is not False)

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on, hashable: the compile cache's key. A schema
        given as a dict and as its JSON text share an entry; keys keep their order (the grammar
        writes properties in the schema's order: another order is another grammar)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            try:
                spec = json.dumps(json.loads(value) if isinstance(value, str) else value)
            except (TypeError, ValueError) as e:  # a number too large for JSON, a non-JSON value
                raise InvalidRequest("structured_outputs.json", f"structured_outputs.json: not a JSON schema: {e}") from None
        elif kind == "choice":
            spec = json.dumps(value)
        elif kind == "json_object":
            spec = ""
        else:
            spec = value
        return kind, spec, self.disable_any_whitespace and kind in ("json", "json_object")

    @classmethod
    def from_dict(cls, values: Any) -> "StructuredOutputsParams":
        """From a JSON-like mapping (a request's `structured_outputs`, or the JSON text Triton's
        vLLM backend sends inside `sampling_parameters`); unknown keys are refused by name."""
        if isinstance(values, StructuredOutputsParams):
            return values
        if isinstance(values, str):
            try:
                values = json.loads(values)
            except ValueError as e:
                raise InvalidRequest(_FIELD, f"{_FIELD} is not valid JSON: {e}") from None
        if not isinstance(values, Mapping):
            raise InvalidRequest(_FIELD, f"{_FIELD} must be an object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key in _UNSUPPORTED:
                raise InvalidRequest(f"{_FIELD}.{key}", f"{_FIELD}.{key}: {_UNSUPPORTED[key]}")
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise InvalidRequest(f"{_FIELD}.{unknown[0]}", f"unknown {_FIELD} field(s): {', '.join(unknown)}; "
                                                           f"expected one of {', '.join(KINDS)}")
        return cls(**{k: v for k, v in values.items() if v is not None})
