"""The typed model config: what the engine needs to know about a model directory before loading
weights, read from its `config.json` (and `generation_config.json`).

It lives with the model registry, which it asks for the architecture; `pagedbackend.config`
(the engine config) builds on it and re-exports it. Imports run config -> models only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedbackend.distributed import divide, kv_head_split
from pagedbackend.models.hf_config import HFConfig
from pagedbackend.models.registry import resolve_architecture

# Names a config.json (`torch_dtype` / `dtype`) or a user (`EngineArgs.dtype`) may give a dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class ModelConfig:
    """What the engine needs to know about a model directory before loading weights."""

    path: Path
    hf: HFConfig
    architecture: str
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model: str | os.PathLike) -> "ModelConfig":
        path = Path(model)
        if not path.is_dir():
            raise ValueError(
                f"model: {str(model)!r} is not a directory; pass a local Hugging Face model "
                "directory (config.json + *.safetensors)"
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model: {str(path)!r} has no config.json, so it is not a Hugging Face model directory")
        try:
            data = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model: {config_file} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"model: {config_file} must hold a JSON object")
        hf = HFConfig(data)
        architecture = resolve_architecture(hf)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(hf.get(key), int) or hf.get(key) < 1:
                raise ValueError(f"model: config.json field {key!r} must be a positive integer, got {hf.get(key)!r}")
        head_dim = hf.get("head_dim")
        if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
            raise ValueError(f"model: config.json field 'head_dim' must be a positive integer, got {head_dim!r}")
        return cls(path=path, hf=hf, architecture=architecture, eos_token_ids=_read_eos_ids(path, hf))

    @property
    def vocab_size(self) -> int:
        return self.hf.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.hf.get("num_key_value_heads", self.num_heads)

    def heads_per_rank(self, tp: int) -> tuple[int, int]:
        """(attention heads, KV heads) each of `tp` ranks computes; a ValueError naming the
        numbers when the model cannot be split that way."""
        if tp == 1:
            return self.num_heads, self.num_kv_heads
        heads = divide(self.num_heads, tp, "num_attention_heads")
        kv_heads, _ = kv_head_split(self.num_kv_heads, tp)
        hf = self.hf
        inter = hf.get("intermediate_size") or hf.get("n_inner") or 4 * hf.hidden_size
        divide(inter, tp, "intermediate_size")
        return heads, kv_heads

    @property
    def head_dim(self) -> int:
        """`head_dim` when config.json gives it, else hidden_size // num_attention_heads."""
        return self.hf.get("head_dim") or self.hf.hidden_size // self.num_heads

    @property
    def sliding_window(self) -> int | None:
        """The attention window when any layer uses one (transformers' rules: Qwen2 only with
        `use_sliding_window`; `layer_types` naming no sliding layer means none), else None."""
        window = self.hf.get("sliding_window")
        if window is None:
            return None
        if self.hf.get("model_type") == "qwen2" and not self.hf.get("use_sliding_window", False):
            return None
        types = self.hf.get("layer_types")
        if isinstance(types, list) and "sliding_attention" not in types:
            return None
        return window

    @property
    def logits_soft_cap(self) -> float | None:
        """Attention-logit soft-capping (Gemma 2's `attn_logit_softcapping`), None when absent."""
        return self.hf.get("attn_logit_softcapping")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.hf.get("max_position_embeddings")

    @property
    def declared_dtype(self) -> torch.dtype | None:
        name = self.hf.get("dtype") or self.hf.get("torch_dtype")
        return DTYPE_NAMES.get(str(name).replace("torch.", "")) if name else None


def _read_eos_ids(path: Path, hf: HFConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what `generate()` stops on), else config.json."""
    value: Any = None
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            value = None
    if value is None:
        value = hf.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    return tuple(int(i) for i in ids)


__all__ = ["DTYPE_NAMES", "HFConfig", "ModelConfig"]
