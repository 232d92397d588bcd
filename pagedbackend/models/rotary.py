"""Rotary position embedding: the rotate-half (NeoX) form Llama, Mistral and Qwen2 use, and the
interleaved (GPT-J) form, optionally on only the first `rotary_dim` dims of each head.

cos/sin are computed once for every position up to `max_position`, in fp32 with the same
operations as the reference implementation, then indexed by each token's position, so a token
gets the same rotation whether it is in a prefill chunk, a decode step or a recompute.

On the GPU path (pagedbackend.models.layers.gpu_path) one Triton kernel rotates the q and k
heads in place in the qkv projection and reads the tables by position itself; on the CPU the
step's cos/sin rows are gathered once and every layer rotates with six small PyTorch ops.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from pagedbackend.models.hf_config import HFConfig
from pagedbackend.models.layers import fused_ops, gpu_path

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


class RopeInputs(NamedTuple):
    """One step's rotary inputs, made once and shared by every layer: the positions (all the
    GPU kernel needs) and, on the CPU path, their cos/sin rows, `[T, 1, rotary_dim / 2]`."""

    positions: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any], partial_rotary_factor: float = 1.0,
                 is_neox_style: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        self.is_neox_style = is_neox_style
        inv_freq = inverse_frequencies(params, self.rotary_dim, max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim / 2]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a step's tokens, [T, 1, rotary_dim / 2], cast to the model dtype as the
        reference does."""
        return (self.cos_cache[positions].to(dtype).unsqueeze(1),
                self.sin_cache[positions].to(dtype).unsqueeze(1))

    def step_inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeInputs:
        """What `rotate` needs for this step's tokens; build once per forward, not per layer."""
        if gpu_path(positions):
            return RopeInputs(positions)
        return RopeInputs(positions, *self.cos_sin(positions, dtype))

    def rotate(self, x: torch.Tensor, rope: RopeInputs) -> torch.Tensor:
        """Rotate x: [T, heads, head_dim] (q and k heads together, one pass).

        GPU path: in place (x is a view into the qkv projection, whose rows are already laid
        out as the attention kernels read them); returns x. CPU path: into a new row-major
        tensor, because there x is a transposed view of the projection (see layers.linear) and
        the attention code wants each head's vector contiguous: the copy is fused with the
        rotation."""
        if gpu_path(x):
            return fused_ops().rotary_embedding_(x, rope.positions, self.cos_cache, self.sin_cache, self.rotary_dim,
                                                 self.is_neox_style)
        assert rope.cos is not None and rope.sin is not None, "RopeInputs built for the GPU path"
        return self._rotate_torch(x, rope.cos, rope.sin)

    def _rotate_torch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[x1 cos - x2 sin, x2 cos + x1 sin] for each pair (x1, x2) of dims, in the reference's
        float order (rotate_half: x * cos + cat(-x2, x1) * sin)."""
        rot = self.rotary_dim
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if rot != self.head_dim:
            out[..., rot:] = x[..., rot:]
        if self.is_neox_style:  # pairs (i, i + rot / 2)
            first, second = slice(0, rot // 2), slice(rot // 2, rot)
        else:  # GPT-J: pairs (2i, 2i + 1)
            first, second = slice(0, rot, 2), slice(1, rot, 2)
        x1, x2 = x[..., first], x[..., second]
        o1, o2 = out[..., first], out[..., second]
        torch.mul(x1, cos, out=o1)
        o1.sub_(x2 * sin)
        torch.mul(x2, cos, out=o2)
        o2.add_(x1 * sin)
        return out
