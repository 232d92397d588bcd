"""Attention with the Triton kernels in pagedbackend.kernels: the GPU path (chosen by
attention_backend="auto" on CUDA), also runnable on CPU under TRITON_INTERPRET=1 for tests."""

from __future__ import annotations

import torch

from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.kernels.cache_ops import copy_blocks, reshape_and_cache
from pagedbackend.kernels.paged_attention import (choose_num_splits, program_map, query_block_shape,
                                                  split_kv_decode_attention, unified_attention)


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, force_num_splits: int | None = None) -> None:
        # Tests pin the split-KV path on and off; production leaves the choice to the heuristic.
        self.force_num_splits = force_num_splits

    def prepare(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> None:
        _, num_kv_heads, block_size, _ = key_cache.shape
        decode_only = meta.num_decodes == meta.num_seqs
        splits = 1
        if decode_only:
            splits = self.force_num_splits or choose_num_splits(meta.num_seqs, num_kv_heads, meta.max_seq_len,
                                                                block_size)
        meta.extra["num_splits"] = splits
        meta.extra["programs"] = {}  # (group, head_dim) -> program map, shared by all layers

    def forward(self, q, k, v, key_cache, value_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        # The kernels read each head's vector with unit stride.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        splits = meta.extra["num_splits"]
        if splits > 1:
            split_kv_decode_attention(out, q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                      meta.max_seq_len, scale, splits, sliding_window)
            return out
        group = q.shape[1] // key_cache.shape[1]
        key = (group, q.shape[2])
        programs = meta.extra["programs"]
        if key not in programs:
            _, block_q = query_block_shape(group, meta.max_query_len, q.shape[2])
            programs[key] = program_map(meta.query_start_loc_host, block_q, q.device)
        unified_attention(out, q, key_cache, value_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          meta.query_start_loc_host, meta.max_query_len, scale, sliding_window, programs[key])
        return out

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            copy_blocks(kv_cache, torch.tensor(pairs, dtype=torch.int64, device=kv_cache.device))
