"""Per-step description of the flattened batch that attention backends read.

The model runner fills it from a scheduler decision; a backend's `prepare()` attaches its typed
per-step state (gather indices, masks, split counts: one dataclass per backend) as
`backend_state`, once per step instead of once per layer.

Padded decode steps (the model runner's CUDA-graph path, `EngineConfig.padded_decode`): a
decode-only batch of n sequences is run as `num_seqs` = the next capture size >= n rows, the
real rows first. Each padding row is an ordinary one-token sequence that no request owns:
token 0 at position 0, `slot_mapping` = offset 0 of the runner's scratch block (one block past
the KV pool, never handed to a sequence), `block_tables` row [scratch block, 0, 0, ...] and
`seq_len` 1, so it attends to the key it has just written. Backends need no special case for
it (the slot is never negative; slots are finite) and its output is ignored. `block_tables` is
then full width (max_model_len's blocks), so every step of one size has the same shapes.
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
    # True while prepare() and forward() are being captured into a CUDA graph: every later
    # step of this size replays the captured work on new values in the same device tensors.
    # Then nothing may be derived from host values (the host fields above hold the capture's
    # padding: seq_lens_host all 1s, max_seq_len = max_model_len, the longest any replay can
    # see), nothing copied from the host, and launch structure must follow num_seqs and the
    # block_tables width only. Only backends declaring `supports_cuda_graphs` are captured.
    cuda_graph: bool = False

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
