"""Attention backends: the same interface over the paged KV cache, chosen by name or by what fits.

`torch` works everywhere and is the reference; `cpu` is the torch backend with a native
decode kernel; `triton` runs the kernels in `pagedbackend.kernels` (CUDA, or the Triton
interpreter on CPU for tests). Each backend class declares what it supports (see
`AttentionBackend`); `select_attention_backend` resolves "auto" to the first backend of
`AUTO_PRIORITY[device type]` that fits, and checks a named one, with the reasons when none does.
"""

from __future__ import annotations

import torch

from pagedbackend.attention.base import AttentionBackend
from pagedbackend.attention.cpu_backend import CpuAttentionBackend
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.attention.torch_backend import TorchAttentionBackend, TorchAttentionState
from pagedbackend.attention.triton_backend import TritonAttentionBackend, TritonAttentionState

# Every backend, by its `attention_backend` name.
BACKENDS: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (TorchAttentionBackend, CpuAttentionBackend, TritonAttentionBackend)
}
# The order "auto" tries backends in, per device type. Triton on the CPU is its interpreter
# (tests only), so auto never picks it there; name it to use it.
AUTO_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpu", "torch"),
}
ATTENTION_BACKEND_CHOICES = ("auto", *BACKENDS)


def _describe(device: str, dtype: torch.dtype, head_size: int, block_size: int, sliding_window: int | None,
              logits_soft_cap: float | None, num_queries_per_kv: int) -> str:
    parts = [f"device={device!r}", f"dtype={str(dtype).replace('torch.', '')}", f"head_size={head_size}",
             f"block_size={block_size}"]
    if sliding_window is not None:
        parts.append(f"sliding_window={sliding_window}")
    if logits_soft_cap is not None:
        parts.append(f"logits_soft_cap={logits_soft_cap}")
    if num_queries_per_kv != 1:
        parts.append(f"query heads per KV head={num_queries_per_kv}")
    return ", ".join(parts)


def select_attention_backend(name: str, device: str, dtype: torch.dtype, head_size: int, block_size: int,
                             sliding_window: int | None = None, logits_soft_cap: float | None = None,
                             num_queries_per_kv: int = 1) -> str:
    """The backend name to run: `name` itself when it fits, for "auto" the first backend of
    AUTO_PRIORITY that fits. A ValueError says why otherwise (for "auto": every backend's reason)."""
    check = dict(device=device, dtype=dtype, head_size=head_size, block_size=block_size,
                 sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                 num_queries_per_kv=num_queries_per_kv)
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKEND_CHOICES)}; got {name!r}")
        reason = BACKENDS[name].supports(**check)
        if reason is not None:
            raise ValueError(f"attention_backend={name!r} {reason}")
        return name
    device_type = str(device).split(":")[0]
    order = AUTO_PRIORITY.get(device_type, ())
    reasons: list[str] = []
    for candidate in order:
        reason = BACKENDS[candidate].supports(**check)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    for other in BACKENDS:
        if other not in order:
            reason = BACKENDS[other].supports(**check)
            why = reason if reason is not None else "fits, but is only used when named"
            reasons.append(f"{other}: not tried automatically on {device_type} ({why})")
    raise ValueError(f"attention_backend='auto': no attention backend fits {_describe(**check)}; "
                     + "; ".join(reasons))


def get_attention_backend(name: str) -> AttentionBackend:
    """An instance of the backend `name` (already resolved, not "auto")."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return BACKENDS[name].create()


__all__ = ["ATTENTION_BACKEND_CHOICES", "AUTO_PRIORITY", "AttentionBackend", "AttentionMetadata", "BACKENDS",
           "CpuAttentionBackend", "TorchAttentionBackend", "TorchAttentionState", "TritonAttentionBackend",
           "TritonAttentionState", "get_attention_backend", "select_attention_backend"]
