"""`speculative_config`: vLLM's dict (same keys, same defaults), checked once at start-up.

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": m, "prompt_lookup_max": M}
    {"method": "draft_model", "model": DIR, "num_speculative_tokens": k}

plus `disable_by_batch_size` (vLLM's key; the older engine argument was
`speculative_disable_by_batch_size`): when more sequences than that are enqueued (running or
waiting, as vLLM counts), a step does not speculate. As in vLLM, a config naming a `model` and no `method` is a draft model, and n-gram
lookup sizes default to each other, or to 5 when neither is given. Anything else is an error
naming the key, raised before a weight is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

SPEC_METHODS = ("ngram", "draft_model")
SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
             "disable_by_batch_size")
DEFAULT_PROMPT_LOOKUP = 5


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    model: str | None = None  # the draft model's directory
    disable_by_batch_size: int | None = None

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots past the step's tokens a sequence must own: a draft model writes its k
        proposals' KV right after the step; n-gram lookup writes none."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0

    @classmethod
    def parse(cls, value: Mapping[str, Any] | str) -> "SpeculativeConfig":
        """From vLLM's dict, or its JSON text (the command line's `--speculative-config`)."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from e
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in SPEC_KEYS)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}")
        method = value.get("method")
        if method is None and value.get("model") is not None:
            method = "draft_model"
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(SPEC_METHODS)}; got {method!r}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        k = _positive_int("num_speculative_tokens", value["num_speculative_tokens"])
        disable = value.get("disable_by_batch_size")
        if disable is not None:
            disable = _positive_int("disable_by_batch_size", disable)
        if method == "ngram":
            if value.get("model") is not None:
                raise ValueError("speculative_config: method 'ngram' takes no model (it looks up the prompt)")
            lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
            lo = _positive_int("prompt_lookup_min", lo) if lo is not None else None
            hi = _positive_int("prompt_lookup_max", hi) if hi is not None else None
            if lo is None and hi is None:
                lo = hi = DEFAULT_PROMPT_LOOKUP
            lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
            if lo > hi:
                raise ValueError(f"speculative_config: prompt_lookup_min={lo} exceeds prompt_lookup_max={hi}")
            return cls(method, k, lo, hi, None, disable)
        for key in ("prompt_lookup_min", "prompt_lookup_max"):
            if value.get(key) is not None:
                raise ValueError(f"speculative_config: {key} is an n-gram setting; method {method!r} takes 'model'")
        model = value.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("speculative_config: method 'draft_model' needs 'model', the draft model's directory")
        return cls(method, k, model=model, disable_by_batch_size=disable)


@dataclass
class DraftModelSpec:
    """A draft model resolved at start-up: what `models.loader.load_model` needs (the same
    fields an `EngineConfig` offers) and the attention backend chosen for its head size."""

    model_config: Any  # models.ModelConfig
    attention_backend: str
    model_impl: str
    dtype: Any  # torch.dtype
    device: str
    load_format: str
