"""Verifying a step's proposals on the runner: the target's logits at each sequence's last
known token and at each of its proposals become what the request would sample from there
(`Sampler.target_distributions`: its penalties, bias, masks, temperature, filters), and the
rejection sampler keeps or replaces the proposals.

Position j of a sequence with proposals d_1..d_m is sampled as if d_1..d_j were already its
tokens: its penalties count them, min_tokens and bad words see them. Such a row is a view of
the batch slot with those tokens appended; its penalty counts are built for this step only
(keyed apart from the sequence's own, which position 0 keeps extending as usual).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedbackend.input_batch import InputBatch, RowView
from pagedbackend.sampler import Sampler, gather_logprobs
from pagedbackend.spec_decode.rejection import rejection_sample
from pagedbackend.step import GrammarStep, TokenLogprobs
from pagedbackend.structured_output.bitmask import grammar_rows


@dataclass
class Verified:
    """Per verifying sequence (in `StepInputs.spec_seqs` order): the tokens it emits (accepted
    proposals, then the target's), their logprobs when it asked, how many were accepted."""

    tokens: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]
    num_accepted: list[int]


def verify(sampler: Sampler, batch: InputBatch, logits: torch.Tensor, spec_seqs: list[tuple[int, int, tuple[int, ...]]],
           draft_probs: dict[int, torch.Tensor] | None = None, grammar: GrammarStep | None = None) -> Verified:
    """`logits`: [sum(m + 1), V], each sequence's m + 1 verified positions in order.
    `draft_probs`: seq_id -> [>= m, V], the distribution each proposal was drawn from (a draft
    model's); a sequence without one proposed point masses (n-gram, or greedy drafts).
    `grammar`: the step's structured-output bitmask, one row per verified position of each
    constrained sequence (the proposals were checked against the grammar before the step)."""
    vocab = logits.shape[1]
    counts = [len(drafts) + 1 for _, _, drafts in spec_seqs]
    slots = np.repeat(np.array([slot for _, slot, _ in spec_seqs], dtype=np.int64), counts)
    special, temp_keys = [], []
    row = 0
    for seq_id, slot, drafts in spec_seqs:
        if slot in batch.special:
            params = batch.params[slot]
            base = batch.row_view(slot, seq_id, params)
            for j in range(len(drafts) + 1):
                key = seq_id if j == 0 else ("spec", seq_id, j)
                if j:
                    temp_keys.append(key)
                special.append((row + j, RowView(key, params, base.prompt_len, base.token_ids + list(drafts[:j]),
                                                 base.bad_words_ids, 0)))
        row += len(drafts) + 1
    sbatch = sampler.build_batch(batch.temperature[slots], batch.top_k[slots], batch.top_p[slots],
                                 batch.min_p[slots], batch.greedy[slots], special, vocab,
                                 grammar_rows(grammar, [seq_id for seq_id, _, _ in spec_seqs], counts))
    if temp_keys and sampler.penalty_state is not None:
        sampler.penalty_state.forget(temp_keys)  # counted into this step's rows already

    logprob_seqs = [i for i, (_, slot, _) in enumerate(spec_seqs) if batch.params[slot].logprobs is not None]
    starts = np.concatenate([[0], np.cumsum(counts)])
    raw = None
    if logprob_seqs:  # before any processing (in place): what `logprobs` reports
        index = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in logprob_seqs]))
        raw = torch.log_softmax(logits[index.to(logits.device)].float(), dim=-1)

    dist = sampler.target_distributions(logits, sbatch)
    k = max(counts) - 1
    num = len(spec_seqs)
    # [S, k + 1, V]: each sequence's positions, padded by repeating its last (ignored) row.
    pad = np.minimum(starts[:-1, None] + np.arange(k + 1)[None, :], starts[1:, None] - 1).reshape(-1)
    target = dist[torch.from_numpy(pad).to(dist.device)].view(num, k + 1, vocab)
    drafts = np.zeros((num, k), dtype=np.int64)
    for i, (_, _, d) in enumerate(spec_seqs):
        drafts[i, :len(d)] = d
    drafts = torch.from_numpy(drafts).to(dist.device)
    q = None
    if draft_probs and any(seq_id in draft_probs for seq_id, _, _ in spec_seqs):
        q = torch.nn.functional.one_hot(drafts, vocab).to(dist.dtype)
        for i, (seq_id, _, d) in enumerate(spec_seqs):
            probs = draft_probs.get(seq_id)
            if probs is not None:
                q[i, :len(d)] = probs[:len(d)].to(dist.device, dist.dtype)
    greedy = [bool(batch.greedy[slot]) for _, slot, _ in spec_seqs]
    generators = []
    for seq_id, slot, _ in spec_seqs:
        p = batch.params[slot]
        generators.append(sampler.seq_generator(seq_id, p.seed) if p.seed is not None and not p.is_greedy else None)
    result = rejection_sample(target, drafts, [c - 1 for c in counts], greedy, q, generators, sampler.generator)

    logprobs: list[list[TokenLogprobs] | None] = [None] * num
    if logprob_seqs:
        # Emitted token j of a sequence sits at its position j: rows of `raw` in order.
        offsets = np.concatenate([[0], np.cumsum([counts[i] for i in logprob_seqs])])
        index, chosen, top_k = [], [], []
        for n, i in enumerate(logprob_seqs):
            tokens = result.tokens[i]
            index += range(offsets[n], offsets[n] + len(tokens))
            chosen += tokens
            top_k += [batch.params[spec_seqs[i][1]].logprobs] * len(tokens)
        entries = gather_logprobs(raw[torch.tensor(index, device=raw.device)],
                                  torch.tensor(chosen, device=raw.device), top_k)
        start = 0
        for i in logprob_seqs:
            n = len(result.tokens[i])
            logprobs[i] = entries[start:start + n]
            start += n
    return Verified(result.tokens, logprobs, result.num_accepted)
