"""A read-only view of a Hugging Face `config.json` (no imports from the rest of the package)."""

from __future__ import annotations

from typing import Any, Mapping


class HFConfig:
    """Read-only attribute view of a Hugging Face `config.json`, with GPT-2's aliases."""

    _ALIASES = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
    }

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._data and self._data[key] is not None:
            return self._data[key]
        alias = self._ALIASES.get(key)
        if alias is not None and self._data.get(alias) is not None:
            return self._data[alias]
        return default

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        value = self.get(key)
        if value is None:
            raise AttributeError(f"config.json has no {key!r}")
        return value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)


__all__ = ["HFConfig"]
