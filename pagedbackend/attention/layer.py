"""The attention op as the model code sees it: q/k/v in, attention output out.

The model runner binds each layer to its slice of the KV cache and to the backend once at
start-up, so model code stays free of cache plumbing.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedbackend.attention.base import AttentionBackend
from pagedbackend.attention.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend: AttentionBackend | None = None
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, backend: AttentionBackend, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.backend = backend
        self.kv_cache = (key_cache, value_cache)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(q, k, v, meta, self.scale, self.sliding_window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float,
               sliding_window: int | None, logits_soft_cap: float | None = None) -> torch.Tensor:
        """Attention with the scale, window and soft-cap given per call (the transformers path
        passes the model's own values for each layer)."""
        if self.backend is None or self.kv_cache is None:
            raise RuntimeError("PagedAttention used before the model runner bound its KV cache")
        if logits_soft_cap is None:
            return self.backend.forward(q, k, v, self.kv_cache[0], self.kv_cache[1], meta, scale, sliding_window)
        if not self.backend.supports_logits_soft_cap:
            raise RuntimeError(f"attention backend {self.backend.name!r} cannot soft-cap attention logits "
                               f"(the model caps at {logits_soft_cap})")
        return self.backend.forward(q, k, v, self.kv_cache[0], self.kv_cache[1], meta, scale, sliding_window,
                                    logits_soft_cap=logits_soft_cap)
