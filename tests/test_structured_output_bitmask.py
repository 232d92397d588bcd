"""The runner's side of structured output: the packed bitmask (xgrammar's layout: bit t of a
row is bit t % 32 of int32 word t // 32) unpacked and applied to logits exactly, on fresh
random inputs, for all rows or a subset, with a vocabulary that does not fill the last word."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedbackend.step import GrammarStep
from pagedbackend.structured_output.bitmask import allowed_tokens, apply_token_bitmask, grammar_rows


def _packed(allowed: np.ndarray) -> np.ndarray:
    rows, vocab = allowed.shape
    words = np.zeros((rows, -(-vocab // 32)), dtype=np.uint32)
    for r, t in zip(*np.nonzero(allowed)):
        words[r, t // 32] |= np.uint32(1 << (t % 32))
    return words.view(np.int32)


@pytest.mark.parametrize("byteorder", ["little", "big"])  # big: the shifting path (a big-endian host's)
@pytest.mark.parametrize("vocab", [31, 32, 33, 1000])
def test_unpacking_gives_exactly_the_allowed_tokens(vocab, byteorder, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "byteorder", byteorder)
    rng = np.random.default_rng(vocab)
    allowed = rng.random((5, vocab)) < 0.3
    allowed[:, -1] = True  # the last token, in the last (partial) word
    got = allowed_tokens(torch.from_numpy(_packed(allowed)), vocab)
    assert torch.equal(got, torch.from_numpy(allowed))


@pytest.mark.parametrize("subset", [False, True])
def test_forbidden_logits_become_minus_infinity_and_the_rest_is_untouched(subset):
    rng = np.random.default_rng(7)
    vocab, num_rows = 100, 6
    logits = torch.from_numpy(rng.standard_normal((num_rows, vocab)).astype(np.float32))
    original = logits.clone()
    rows = np.array([1, 4], dtype=np.int64) if subset else None
    allowed = rng.random((2 if subset else num_rows, vocab)) < 0.4
    apply_token_bitmask(logits, None if rows is None else torch.from_numpy(rows), torch.from_numpy(_packed(allowed)))
    expected = original.clone()
    targets = rows if subset else np.arange(num_rows)
    for i, r in enumerate(targets):
        expected[r][~torch.from_numpy(allowed[i])] = float("-inf")
    assert torch.equal(logits, expected)


def test_grammar_rows_map_sampled_rows_and_verified_positions_to_bitmask_rows():
    bitmask = np.arange(5 * 2, dtype=np.int32).reshape(5, 2)
    step = GrammarStep(bitmask, {11: 0, 13: 2})  # 13 verifies 2 proposals: rows 2, 3, 4
    rows, words = grammar_rows(step, [10, 11, 12])
    assert rows.tolist() == [1] and words.tolist() == bitmask[[0]].tolist()
    rows, words = grammar_rows(step, [12, 13, 11], counts=[2, 3, 1])
    assert rows.tolist() == [2, 3, 4, 5] and words.tolist() == bitmask[[2, 3, 4, 0]].tolist()
    assert grammar_rows(step, [10, 12]) is None and grammar_rows(None, [11]) is None
