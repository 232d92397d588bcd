"""The interface every attention backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from pagedbackend.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> None:
        """Precompute per-step helpers (called once per step, before the layers run);
        `key_cache` is any layer's key cache, for its shape and dtype."""

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        key_cache: torch.Tensor,  # layout in pagedbackend.kernels.layout
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Write k/v into the cache at meta.slot_mapping, then attend: each sequence's new
        tokens see its cached context and, causally, each other."""
        ...

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer's K and V (copy-on-write); `kv_cache` is
        the runner's stacked [layers, 2, num_blocks, ...] tensor."""
        ...
