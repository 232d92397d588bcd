"""Per-request generation controls, with vLLM's names, defaults and meanings.

Everything is validated in the constructor so that a bad value is reported to the one request
that sent it, with the field's name, before it can reach the engine loop.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from pagedbackend.errors import InvalidRequest
from pagedbackend.structured_output.params import REMOVED_FIELDS, StructuredOutputsParams, removed_field_error

# Below this temperature sampling is greedy (argmax); vLLM uses the same threshold.
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.IntEnum):
    """What each streamed RequestOutput holds (vLLM's names)."""

    CUMULATIVE = 0  # everything so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes, then everything


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request (vLLM-compatible)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    # Filled by the engine, not by users: the model's EOS ids (generation_config + tokenizer).
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.n < 1:
            raise InvalidRequest("n", f"n must be at least 1, got {self.n}")
        if self.temperature < 0.0:
            raise InvalidRequest("temperature", f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:  # vLLM's older spelling of "disabled"
            self.top_k = 0
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"top_k must be 0 (disabled) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidRequest("min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                "min_tokens", f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}"
            )
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop", "stop must not contain empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"stop_token_ids must be non-negative, got {self.stop_token_ids}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidRequest("seed", f"seed must fit in a signed 64-bit integer, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0.0:
            raise InvalidRequest("repetition_penalty", f"repetition_penalty must be positive, got {self.repetition_penalty}")
        self._check_token_lists()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequest(name, f"{name} must be non-negative, got {value}")
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequest("best_of", f"best_of must be at least n={self.n}, got {self.best_of}")
        if self.best_of is not None and self.best_of > 1 and self.is_greedy:
            raise InvalidRequest("best_of", "best_of > 1 needs sampling (temperature > 0): greedy samples are identical")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise InvalidRequest("truncate_prompt_tokens",
                                 f"truncate_prompt_tokens must be at least 1, got {self.truncate_prompt_tokens}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
            if self.min_tokens:
                # The grammar decides where the output ends; a ban on ending could leave a row
                # with no token both allow.
                raise InvalidRequest("min_tokens", "min_tokens cannot be combined with structured_outputs: "
                                                   "the grammar decides where the output ends")
        if self.is_greedy:
            # Filters are meaningless for argmax; normalising keeps the sampler's fast path simple.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _check_token_lists(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise InvalidRequest("logit_bias", "logit_bias must map token ids to numbers")
            bias = {}
            for key, value in self.logit_bias.items():
                try:  # JSON object keys arrive as strings, as in OpenAI's API
                    token = int(key)
                except (TypeError, ValueError):
                    raise InvalidRequest("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
                if token < 0 or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                    raise InvalidRequest("logit_bias", f"logit_bias[{key!r}] must be a number for a token id >= 0")
                bias[token] = max(-100.0, min(100.0, float(value)))  # OpenAI clamps to [-100, 100]
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise InvalidRequest("allowed_token_ids", "allowed_token_ids must be a non-empty list of token ids")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) and w for w in self.bad_words):
                raise InvalidRequest("bad_words", "bad_words must be a list of non-empty strings")
            self.bad_words = list(self.bad_words)

    def _check_types(self) -> None:
        ints = ("n", "top_k", "min_tokens")
        optional_ints = ("max_tokens", "seed", "logprobs", "prompt_logprobs", "best_of", "truncate_prompt_tokens")
        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        bools = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                 "spaces_between_special_tokens")
        for name in ints + optional_ints:
            value = getattr(self, name)
            if value is None and name in optional_ints:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(name, f"{name} must be an integer, got {value!r}")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(name, f"{name} must be a number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise InvalidRequest(name, f"{name} must be finite, got {value!r}")
            setattr(self, name, float(value))
        for name in bools:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise InvalidRequest("output_kind", f"output_kind must be 0 (cumulative), 1 (delta) or 2 (final only), "
                                                f"got {self.output_kind!r}") from None
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise InvalidRequest("stop", f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
            ):
                raise InvalidRequest("stop_token_ids", f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def num_samples(self) -> int:
        """Sequences generated: best_of of them, of which the n most likely are returned."""
        return max(self.n, self.best_of or 1)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        """Token ids that end a sample: stop_token_ids, plus EOS unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self._eos_token_ids)
        return frozenset(ids)

    @property
    def output_text_buffer_length(self) -> int:
        """Characters held back while streaming so a stop string is never sent half-way."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Build from a JSON-like mapping, rejecting unknown fields by name (protocol layers use it)."""
        known = set(cls.field_names())
        for key in values:
            if key in REMOVED_FIELDS:
                raise removed_field_error(key)
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise InvalidRequest(unknown[0], f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**dict(values))

    def clone(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
