"""Attention with the Triton kernels in pagedbackend.kernels: the GPU path (chosen by
attention_backend="auto" on CUDA), also runnable on CPU under TRITON_INTERPRET=1 for tests."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

from pagedbackend.attention.base import AttentionBackend
from pagedbackend.attention.metadata import AttentionMetadata


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass
class TritonAttentionState:
    """The triton backend's per-step state, built once by prepare() for every layer."""

    num_splits: int  # > 1: the split-KV decode kernel (decode-only steps), else the unified kernel
    # (GQA group, head_dim) -> the unified kernel's program map, built by the first layer that needs it
    programs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    decode_programs: tuple[torch.Tensor, torch.Tensor] | None = None  # a decode-only step's, from prepare()


class TritonAttentionBackend(AttentionBackend):
    """Declared: CUDA (and the CPU under TRITON_INTERPRET=1, for tests), fp32/fp16/bf16, head
    sizes 16 to 256 (tiles are padded to a power of two, at least the 16 a tensor-core dot needs;
    kernels/compile_check.py fits every size up to 256 in shared memory), block sizes from 16,
    sliding windows, attention-logit soft-capping. Needs the triton package."""

    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    min_head_size, max_head_size = 16, 256
    block_sizes = (16, 32, 64, 128)
    block_size_note = "at least 16: tensor-core dots need 16 rows"
    supports_sliding_window = True
    supports_logits_soft_cap = True
    # A captured decode step's launches follow its shapes only: the split count comes from
    # num_seqs and meta.max_seq_len (max_model_len in a capture, so a replay covers every
    # length), the kernels read lengths and block tables from the device, and the unified
    # kernel's program map is built on the device.
    supports_cuda_graphs = True

    def __init__(self, force_num_splits: int | None = None) -> None:
        # The kernels import triton, an optional dependency: loaded when a backend is made,
        # so the declarations above can be read (and reject) without it.
        from pagedbackend.kernels import cache_ops, paged_attention

        self._cache_ops = cache_ops
        self._kernels = paged_attention
        # Tests pin the split-KV path on and off; production leaves the choice to the heuristic.
        self.force_num_splits = force_num_splits

    @classmethod
    def unavailable_reason(cls, device_type: str) -> str | None:
        if not _triton_installed():
            return "needs the triton package (pip install triton)"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("on the CPU runs in Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                    "pagedbackend (slow; for tests)")
        return None

    def prepare(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> None:
        _, num_kv_heads, block_size, _ = key_cache.shape
        decode_only = meta.num_decodes == meta.num_seqs
        splits = 1
        if decode_only:
            splits = self.force_num_splits or self._kernels.choose_num_splits(
                meta.num_seqs, num_kv_heads, meta.max_seq_len, block_size, device=key_cache.device)
        # A decode-only step's unified-kernel programs (one per sequence, whatever the GQA group
        # and head size) are made on the device: nothing copied from the host.
        programs = self._kernels.decode_program_map(meta.num_seqs, key_cache.device) if (
            decode_only and splits == 1) else None
        meta.backend_state = TritonAttentionState(splits, decode_programs=programs)

    def forward(self, q, k, v, key_cache, value_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, logits_soft_cap: float | None = None) -> torch.Tensor:
        # The kernels read each head's vector with unit stride.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        kernels = self._kernels
        state = self.state_of(meta, TritonAttentionState)
        self._cache_ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if state.num_splits > 1:
            kernels.split_kv_decode_attention(out, q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                              meta.max_seq_len, scale, state.num_splits, sliding_window,
                                              logits_soft_cap)
            return out
        group = q.shape[1] // key_cache.shape[1]
        key = (group, q.shape[2])
        programs = state.programs
        if key not in programs:
            if state.decode_programs is not None:
                programs[key] = state.decode_programs
            else:
                _, block_q = kernels.query_block_shape(group, meta.max_query_len, q.shape[2])
                programs[key] = kernels.program_map(meta.query_start_loc_host, block_q, q.device)
        kernels.unified_attention(out, q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, meta.query_start_loc_host, meta.max_query_len, scale,
                                  sliding_window, programs[key], logits_soft_cap)
        return out

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            self._cache_ops.copy_blocks(kv_cache, torch.tensor(pairs, dtype=torch.int64, device=kv_cache.device))
