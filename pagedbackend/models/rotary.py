"""Rotary position embedding (the rotate-half form Llama, Mistral and Qwen2 use).

cos/sin are computed once for every position up to `max_position`, in fp32 with the same
operations as the reference implementation, then indexed by each token's position, so a token
gets the same rotation whether it is in a prefill chunk, a decode step or a recompute.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedbackend.models.hf_config import HFConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf: HFConfig) -> dict[str, Any]:
    """Normalise both spellings: transformers-5 `rope_parameters`, and the older top-level
    `rope_theta` + `rope_scaling` that most published checkpoints still carry."""
    params: dict[str, Any] = {}
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict):
        params.update(scaling)
    new = hf.get("rope_parameters")
    if isinstance(new, dict):
        params.update(new)
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"model: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return params


def inverse_frequencies(params: dict[str, Any], rotary_dim: int, max_position: int) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params.get("low_freq_factor", 1.0))
        high_freq_factor = float(params.get("high_freq_factor", 4.0))
        old_context_len = float(params.get("original_max_position_embeddings", max_position))
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any], partial_rotary_factor: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        inv_freq = inverse_frequencies(params, self.rotary_dim, max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim / 2]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a step's tokens, [T, 1, rotary_dim / 2]; looked up once per step and
        shared by every layer."""
        return (self.cos_cache[positions].to(dtype).unsqueeze(1),
                self.sin_cache[positions].to(dtype).unsqueeze(1))

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x: [T, heads, head_dim] (q and k heads together, one pass). Pairs (i, i + d/2)
        as the rotate-half reference does: [x1 cos - x2 sin, x2 cos + x1 sin]."""
        half = self.rotary_dim // 2
        # Row-major output (x may be a transposed view of the fused projection): attention
        # kernels want each head's vector contiguous.
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if self.rotary_dim != self.head_dim:
            out[..., self.rotary_dim:] = x[..., self.rotary_dim:]
        x1, x2 = x[..., :half], x[..., half:self.rotary_dim]
        o1, o2 = out[..., :half], out[..., half:self.rotary_dim]
        torch.mul(x1, cos, out=o1)
        o1.sub_(x2 * sin)
        torch.mul(x2, cos, out=o2)
        o2.add_(x1 * sin)
        return out
