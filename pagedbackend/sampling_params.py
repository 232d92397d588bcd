"""Per-request generation controls, with vLLM's names, defaults and meanings.

Everything is validated in the constructor so that a bad value is reported to the one request
that sent it, with the field's name, before it can reach the engine loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from pagedbackend.errors import InvalidRequest

# Below this temperature sampling is greedy (argmax); vLLM uses the same threshold.
GREEDY_TEMPERATURE = 1e-5


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
        if self.is_greedy:
            # Filters are meaningless for argmax; normalising keeps the sampler's fast path simple.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _check_types(self) -> None:
        ints = ("n", "top_k", "min_tokens")
        optional_ints = ("max_tokens", "seed")
        floats = ("temperature", "top_p", "min_p")
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
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise InvalidRequest(unknown[0], f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**dict(values))

    def clone(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
