"""Attention backends: the same interface over the paged KV cache, chosen by name.

`torch` works everywhere (the CPU path and the reference); `triton` runs the kernels in
`pagedbackend.kernels` (CUDA, or the Triton interpreter on CPU for tests).
"""

from __future__ import annotations

from pagedbackend.attention.base import AttentionBackend
from pagedbackend.attention.metadata import AttentionMetadata


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from pagedbackend.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        raise ValueError("attention_backend='triton' is not available yet; use 'torch' (the triton kernels are tracked separately)")
    raise ValueError(f"attention_backend must be auto, torch or triton; got {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
