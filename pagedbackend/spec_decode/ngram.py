"""N-gram (prompt lookup) proposals: if the sequence's last n tokens occurred before, propose
the tokens that followed that occurrence. Costs no model and no KV: a step verifies them.

vLLM's rule (`prompt_lookup_min` / `prompt_lookup_max`, its v1 `NgramProposer`): the longest n
in [min, max] whose suffix has an earlier match wins; among its matches the earliest, which has
the most tokens after it (in a repeating output the most recent match is followed only by the
suffix itself: one token to propose where the earliest offers k). Plain host code over a numpy
array: one pass per n, vectorised."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def propose_ngram(token_ids: Sequence[int] | np.ndarray, num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` proposed continuations of `token_ids` (prompt + output so far), or []
    when no suffix of length min_n..max_n occurred earlier. Fewer than `num_tokens` when the
    match's continuation reaches the end of the sequence."""
    if num_tokens < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"propose_ngram: need num_tokens >= 1 and 1 <= min_n <= max_n, got {num_tokens}, "
                         f"{min_n}, {max_n}")
    ids = np.asarray(token_ids, dtype=np.int64)
    length = len(ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = ids[length - n:]
        # Windows starting at 0 .. length-n-1: every earlier n-gram (the suffix itself excluded).
        windows = np.lib.stride_tricks.sliding_window_view(ids[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[0]) + n  # what followed the earliest occurrence
            return ids[start:start + num_tokens].tolist()
    return []
