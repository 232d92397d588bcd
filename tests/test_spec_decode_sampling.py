"""The parts of speculative decoding that decide tokens: the n-gram proposer and the rejection
sampler (greedy exactness, the draft-equals-target case, and unbiased sampling checked by a
chi-square test that a deliberately biased sampler fails)."""

from __future__ import annotations

import pytest
import torch

from pagedbackend.spec_decode.ngram import propose_ngram
from pagedbackend.spec_decode.rejection import rejection_sample

# chi-square critical values at significance 0.001 by degrees of freedom (scipy is not a dependency)
CHI2_CRITICAL_0_001 = {5: 20.515}
VOCAB = 6


def _chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------ n-gram proposals
def test_ngram_proposes_what_followed_the_earliest_match():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 0 and 5; the earliest (vLLM's choice) was followed by 9, 9, 1
    assert propose_ngram(ids, 3, min_n=1, max_n=3) == [9, 9, 1]
    assert propose_ngram(ids, 20, min_n=1, max_n=3) == ids[3:]  # up to the end
    # a repeating output: the earliest match has k tokens after it, the latest only one
    assert propose_ngram([4, 7, 7, 7, 7], 3, min_n=1, max_n=1) == [7, 7, 7]


def test_ngram_prefers_the_longest_suffix_that_matches():
    # [4, 5] occurred before 6; [5] alone first occurred before 6, then before 8
    ids = [4, 5, 0, 5, 8, 0, 4, 5, 6, 2, 4, 5]
    assert propose_ngram(ids, 1, min_n=1, max_n=2) == [0]  # [4, 5] at 0
    ids = [5, 3, 0, 4, 5, 8, 4, 5]
    assert propose_ngram(ids, 1, min_n=1, max_n=2) == [8]  # [4, 5] at 3 beats [5] at 0
    assert propose_ngram(ids, 1, min_n=1, max_n=1) == [3]


def test_ngram_proposes_nothing_without_a_match_of_at_least_min_n():
    assert propose_ngram([1, 2, 3, 4], 3, min_n=1, max_n=3) == []
    assert propose_ngram([7, 1, 2, 7], 2, min_n=2, max_n=3) == []  # only a 1-gram repeats
    assert propose_ngram([7, 1, 2, 7], 2, min_n=1, max_n=3) == [1, 2]
    assert propose_ngram([5], 2, min_n=1, max_n=3) == []
    assert propose_ngram([3, 3, 3], 2, min_n=2, max_n=2) == [3]  # overlapping match


@pytest.mark.parametrize("args", [(0, 1, 2), (2, 0, 2), (2, 3, 2)])
def test_ngram_rejects_bad_bounds(args):
    with pytest.raises(ValueError, match="propose_ngram"):
        propose_ngram([1, 2, 1, 2], *args)


# ------------------------------------------------------------------ greedy verification
def test_greedy_accepts_while_the_target_agrees_then_emits_the_targets_token():
    # target argmax per position: 2, 4, 1, 3 (k = 3, so 4 positions)
    target = torch.full((3, 4, VOCAB), -1.0)
    for pos, tok in enumerate([2, 4, 1, 3]):
        target[:, pos, tok] = 5.0
    drafts = torch.tensor([[2, 4, 1], [2, 0, 1], [5, 4, 1]])
    out = rejection_sample(target, drafts, [3, 3, 3], [True] * 3)
    assert out.tokens == [[2, 4, 1, 3], [2, 4], [2]]  # all + bonus; 1 accepted; none accepted
    assert out.num_accepted == [3, 1, 0]


def test_fewer_proposals_than_k_verify_only_their_positions():
    target = torch.full((1, 4, VOCAB), -1.0)
    for pos, tok in enumerate([2, 4, 1, 3]):
        target[:, pos, tok] = 5.0
    out = rejection_sample(target, torch.tensor([[2, 4, 0]]), [2], [True])
    assert out.tokens == [[2, 4, 1]] and out.num_accepted == [2]  # the bonus is position 2's argmax


def test_greedy_rows_draw_no_random_numbers():
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    target = torch.rand(2, 3, VOCAB)
    rejection_sample(target, torch.tensor([[1, 2], [0, 0]]), [2, 1], [True, True], default_generator=gen)
    assert torch.equal(gen.get_state(), before)


def test_bad_shapes_and_counts_are_errors():
    target = torch.rand(2, 3, VOCAB)
    with pytest.raises(ValueError, match="rows of 2 proposals"):
        rejection_sample(target, torch.zeros(2, 3, dtype=torch.long), [1, 1], [True, True])
    with pytest.raises(ValueError, match="1..2 proposals"):
        rejection_sample(target, torch.zeros(2, 2, dtype=torch.long), [0, 1], [True, True])


# ------------------------------------------------------------------ sampling
def _dist(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 1.5, dim=-1)


def test_a_draft_equal_to_the_target_is_always_accepted():
    """The exact case: q = p accepts every proposal (acceptance 1.0, k + 1 tokens per row)."""
    k, rows = 3, 500
    p = _dist(0, (k + 1, VOCAB)).expand(rows, k + 1, VOCAB).contiguous()
    gen = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(p[:, :k].reshape(-1, VOCAB), 1, generator=gen).view(rows, k)
    out = rejection_sample(p, drafts, [k] * rows, [False] * rows, draft_probs=p[:, :k], default_generator=gen)
    assert out.num_accepted == [k] * rows and all(len(t) == k + 1 for t in out.tokens)


def _emitted_counts(tokens: list[list[int]], position: int, given_first: torch.Tensor | None = None) -> torch.Tensor:
    counts = torch.zeros(VOCAB)
    for row, t in enumerate(tokens):
        if len(t) > position and (given_first is None or t[0] == int(given_first[row])):
            counts[t[position]] += 1
    return counts


def _naive_biased_sample(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor,
                         gen: torch.Generator) -> list[list[int]]:
    """The control: min(1, p/q) acceptance (q = 1 for a point mass), but a rejection resamples
    from p itself instead of the residual max(p - q, 0): over-weights the proposed tokens."""
    out = []
    for r in range(drafts.shape[0]):
        d = int(drafts[r, 0])
        ratio = float(p[r, 0, d]) if q is None else float(p[r, 0, d] / q[r, 0, d])
        if torch.rand(1, generator=gen).item() < min(1.0, ratio):
            out.append([d])
        else:
            out.append([int(torch.multinomial(p[r, 0], 1, generator=gen))])
    return out


@pytest.mark.parametrize("proposer", ["draft_model", "ngram"])
def test_emitted_tokens_follow_the_target_distribution(proposer):
    """Every emitted position is distributed as the target's own sample would be, by a
    chi-square test at significance 0.001: the first token, the second after an accepted first,
    and the bonus token after k accepted proposals. The naive sampler of the control fails the
    same test on the same setting."""
    rows, k = 20000, 2
    p = _dist(10, (k + 1, VOCAB)).expand(rows, k + 1, VOCAB).contiguous()
    gen = torch.Generator().manual_seed(12)
    if proposer == "draft_model":
        q = _dist(11, (k, VOCAB)).expand(rows, k, VOCAB).contiguous()
        drafts = torch.multinomial(q.reshape(-1, VOCAB), 1, generator=gen).view(rows, k)
    else:  # a lookup proposes the same continuation for every row: one fixed, likely token pair
        q = None
        drafts = torch.stack([p[0, :k].argmax(-1)] * rows)
    out = rejection_sample(p, drafts, [k] * rows, [False] * rows, draft_probs=q, default_generator=gen)
    critical = CHI2_CRITICAL_0_001[VOCAB - 1]
    assert _chi_square(_emitted_counts(out.tokens, 0), p[0, 0]) < critical
    second = _emitted_counts(out.tokens, 1, given_first=drafts[:, 0])
    assert second.sum() > 2000 and _chi_square(second, p[0, 1]) < critical
    bonus = torch.zeros(VOCAB)
    for t, n in zip(out.tokens, out.num_accepted):
        if n == k:
            bonus[t[k]] += 1
    assert bonus.sum() > 1000 and _chi_square(bonus, p[0, k]) < critical
    biased = _naive_biased_sample(p, q, drafts, gen)
    assert _chi_square(_emitted_counts(biased, 0), p[0, 0]) > critical


def test_slots_past_a_rows_count_may_hold_any_filler():
    """vLLM pads unused proposal slots with -1: they are never indexed."""
    g = torch.Generator().manual_seed(5)
    p = _dist(30, (2, 3, VOCAB))
    padded = torch.tensor([[2, -1], [1, VOCAB]])
    for greedy in (True, False):
        out = rejection_sample(p, padded, [1, 1], [greedy] * 2, default_generator=g)
        assert all(1 <= len(t) <= 2 and all(0 <= x < VOCAB for x in t) for t in out.tokens)


def test_a_seeded_row_samples_the_same_whatever_its_batch():
    k = 2
    p = _dist(20, (3, k + 1, VOCAB))
    q = _dist(21, (3, k, VOCAB))
    drafts = torch.tensor([[1, 2], [3, 4], [0, 5]])

    def run(rows: list[int], seeds: dict[int, int]) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seeds[r]) if r in seeds else None for r in rows]
        return rejection_sample(p[rows], drafts[rows], [k] * len(rows), [False] * len(rows), draft_probs=q[rows],
                                generators=gens, default_generator=torch.Generator().manual_seed(99)).tokens
    outputs = set()
    for seed in range(30):
        alone = run([1], {1: seed})[0]
        assert run([0, 1, 2], {1: seed})[1] == alone  # the engine's rows draw beside it
        assert run([2, 1, 0], {1: seed, 0: seed + 100})[1] == alone  # another seeded row too
        outputs.add(tuple(alone))
    assert len(outputs) > 3  # the seed does matter


def test_a_seeded_row_draws_the_same_numbers_whatever_the_longest_proposal_in_its_batch():
    """Its generator advances by its own proposals: alone with k = 1 or beside a row of k = 3."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, VOCAB), dim=-1)
    drafts = torch.tensor([[1, 0, 0], [2, 3, 4]])
    results, states = [], []
    for batch in (False, True):
        gen = torch.Generator().manual_seed(77)
        if batch:
            out = rejection_sample(probs, drafts, [1, 3], [False, False], generators=[gen, None],
                                   default_generator=torch.Generator().manual_seed(1))
        else:
            out = rejection_sample(probs[:1, :2], drafts[:1, :1], [1], [False], generators=[gen])
        results.append((out.tokens[0], out.num_accepted[0]))
        states.append(torch.rand(4, generator=gen))
    assert results[0] == results[1]
    assert torch.equal(states[0], states[1])  # its next step draws the same numbers too
