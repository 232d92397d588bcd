"""Applying a step's packed token bitmask to logits (the runner's side; torch only, no grammar).

One vectorised unpack for every constrained row at once — bit t % 32 of a row's int32 word
t // 32 is whether token t is allowed — then one masked fill: the same ops on any device, no
per-row launch, and no read back to the host.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pagedbackend.step import GrammarStep

_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] uint8: row b holds the bits of byte b, lowest first."""
    table = _BITS.get(device)
    if table is None:
        table = ((torch.arange(256, dtype=torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1)
        table = _BITS[device] = table.to(torch.uint8).to(device)
    return table


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V / 32)] int32 -> [R, V] bool. The words' bytes (little-endian: byte k of word
    w holds tokens 32w + 8k .. 32w + 8k + 7) index a table of each byte's bits: one gather, about
    4x faster on the CPU than shifting every word 32 ways."""
    rows = words.shape[0]
    if sys.byteorder == "little":
        bits = torch.nn.functional.embedding(words.view(torch.uint8).long(), _byte_bits(words.device))
    else:  # a word's bytes in the other order: shift instead
        bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=words.device)) & 1
    return bits.view(rows, -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, words: torch.Tensor) -> torch.Tensor:
    """Set the logits of tokens the grammar forbids to -inf, in place, for the given rows
    (`rows` None: every row, in order). Returns `logits`."""
    banned = allowed_tokens(words, logits.shape[1]).logical_not_()
    if rows is None:
        return logits.masked_fill_(banned, float("-inf"))
    logits[rows] = logits[rows].masked_fill_(banned, float("-inf"))  # the gathered rows are a copy
    return logits


def grammar_rows(grammar: "GrammarStep | None", seq_ids: list[int],
                 counts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The constrained rows among a batch of sampled rows, and their bitmask rows: the batch
    holds `counts[i]` consecutive rows of `seq_ids[i]` (1 each by default; a verifying
    sequence has one per position). None when no row is constrained (the usual step)."""
    if grammar is None:
        return None
    index = grammar.rows
    rows: list[int] = []
    source: list[int] = []
    row = 0
    for i, seq_id in enumerate(seq_ids):
        n = 1 if counts is None else counts[i]
        first = index.get(seq_id)
        if first is not None:
            rows.extend(range(row, row + n))
            source.extend(range(first, first + n))
        row += n
    if not rows:
        return None
    return np.asarray(rows, dtype=np.int64), grammar.bitmask[source]
