"""Attention backends: the same interface over the paged KV cache, chosen by name.

`torch` works everywhere and is the reference; `cpu` is the torch backend with a native
decode kernel (chosen automatically on CPU when a C compiler is available); `triton` runs the
kernels in `pagedbackend.kernels` (CUDA, or the Triton interpreter on CPU for tests).
"""

from __future__ import annotations

from pagedbackend.attention.base import AttentionBackend
from pagedbackend.attention.metadata import AttentionMetadata


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from pagedbackend.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        from pagedbackend.attention.cpu_backend import CpuAttentionBackend
        from pagedbackend.kernels import cpu_native

        kernels = cpu_native.load()
        if kernels is None:
            raise ValueError("attention_backend='cpu' needs the native CPU kernel, which could not be built "
                             "(no C compiler?); use 'torch'")
        return CpuAttentionBackend(kernels)
    if name == "triton":
        from pagedbackend.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be auto, torch, cpu or triton; got {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
