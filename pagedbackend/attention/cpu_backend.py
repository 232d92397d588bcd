"""The CPU attention backend: the torch backend with decode attention done by a native kernel
that reads K/V tiles in place from the paged cache (pagedbackend/kernels/paged_attention_cpu.c)
instead of gathering them first. Prefill chunks and the KV write are the torch backend's.
"""

from __future__ import annotations

import torch

from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.attention.torch_backend import TorchAttentionBackend
from pagedbackend.kernels import cpu_native
from pagedbackend.kernels.cpu_native import NativeKernels


class CpuAttentionBackend(TorchAttentionBackend):
    """Declared: the CPU only, float32 (what the native kernel takes), every head and block
    size, sliding windows, attention-logit soft-capping (in the kernel for decodes, the torch
    backend's for prefills), GQA groups up to 64 (MAX_GROUP in paged_attention_cpu.c); needs the
    native kernel built (a C compiler). Per-step state: the torch backend's."""

    name = "cpu"
    device_types = ("cpu",)
    dtypes = (torch.float32,)
    min_head_size, max_head_size = 1, None
    block_sizes = None
    supports_sliding_window = True
    supports_logits_soft_cap = True
    max_queries_per_kv = 64
    # CPU only: never captured. (Its decode kernel sizes its scratch from seq_lens_host.)
    supports_cuda_graphs = False

    def __init__(self, kernels: NativeKernels) -> None:
        super().__init__()
        self.kernels = kernels

    @classmethod
    def unavailable_reason(cls, device_type: str) -> str | None:
        if cpu_native.load() is None:
            return "needs the native CPU kernel, which could not be built (no C compiler?); use 'torch'"
        return None

    @classmethod
    def create(cls) -> "CpuAttentionBackend":
        kernels = cpu_native.load()
        if kernels is None:
            raise ValueError(f"attention_backend='cpu' {cls.unavailable_reason('cpu')}")
        return cls(kernels)

    def _decode_chunks(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> list:
        if key_cache.dtype != torch.float32:
            return super()._decode_chunks(meta, key_cache)
        return []  # the native kernel handles all decodes in one call

    def _decode_batch(self, out, q, key_cache, value_cache, meta: AttentionMetadata, scale, window,
                      soft_cap=None) -> None:
        if key_cache.dtype != torch.float32:
            return super()._decode_batch(out, q, key_cache, value_cache, meta, scale, window, soft_cap)
        nd = meta.num_decodes
        if q.stride(-1) != 1:  # e.g. GPT-2's q, a strided view of the fused projection
            q = q.contiguous()
        self.kernels.paged_decode_attention(out, q, key_cache, value_cache, meta.block_tables[:nd],
                                            meta.seq_lens[:nd], scale, window, max(meta.seq_lens_host[:nd]),
                                            logits_soft_cap=soft_cap)
