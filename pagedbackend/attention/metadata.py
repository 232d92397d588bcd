"""Per-step description of the flattened batch that attention backends read.

The model runner fills it from a scheduler decision; a backend's `prepare()` attaches its typed
per-step state (gather indices, masks, split counts: one dataclass per backend) as
`backend_state`, once per step instead of once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # Sequences whose step computes exactly one token come first in the batch ("decodes"):
    # they take the batched decode path; the rest ("prefills": prompt chunks, recomputes).
    num_decodes: int
    num_seqs: int
    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cu_seqlens_q
    seq_lens: torch.Tensor  # [num_seqs] int32: context + new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so CPU-side loops never synchronise with the device.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    # The backend's per-step state, set by its prepare() (e.g. TorchAttentionState).
    backend_state: object | None = None

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
