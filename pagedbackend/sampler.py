"""Turns the logits of the rows that sample into tokens, for the whole batch at once.

Order of operations (vLLM's): raw logprobs are taken first (what `logprobs` reports); then
the allowed-token mask, bad words and the min_tokens ban; logit bias; presence / frequency
penalties (on generated tokens, OpenAI's definition) and the repetition penalty (on prompt and
generated tokens, transformers' definition); then greedy rows take the argmax and the others
are temperature-scaled, filtered (top-k, top-p, min-p) and sampled with the exponential race:
argmax(p / E) with E ~ Exp(1) picks token i with probability p_i. A seeded sequence draws its
noise from its own generator, so its samples do not depend on the rest of the batch.

Every step is one tensor operation over the rows that need it; the common case (no penalties,
no bias, no logprobs) skips them entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from pagedbackend.step import TokenLogprobs

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "TokenLogprobs", "apply_penalties", "gather_logprobs"]


@dataclass
class SamplingBatch:
    """Per-row settings gathered from the sequences (host lists -> tensors once per step)."""

    temperatures: torch.Tensor  # [S], 1.0 for greedy rows (never divides by zero)
    top_k: torch.Tensor | None  # [S] int64, vocab size where disabled
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    banned: tuple[list[int], list[int]]  # (rows, tokens) set to -inf
    allowed: tuple[list[int], list[int]]  # (rows, tokens) the only tokens a row may pick
    allowed_rows: list[int]
    bias: tuple[list[int], list[int], list[float]]
    penalty_rows: list[int]
    seeded_rows: list[tuple[int, Any]]
    logprob_rows: list[tuple[int, int]]  # (row, top-k) rows reporting the chosen token's logprob
    beam_rows: list[tuple[int, int]]  # (row, K) rows returning their K best next tokens instead
    views: dict[int, Any] = field(default_factory=dict)  # row -> sequence-like view (special rows)


@dataclass
class SamplerOutput:
    """What one step produced, as plain Python values (the scheduler consumes it)."""

    tokens: list[int]  # one per sampling row (-1 for beam rows)
    logprobs: list[TokenLogprobs | None]
    beam_candidates: list[tuple[list[float], list[int]] | None]  # log_softmax values and token ids
    # seq_id -> logprobs of the prompt tokens this step's chunk predicted, in position order
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)


class Sampler:
    def __init__(self, device: torch.device | str, seed: int) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._seq_generators.pop(seq_id, None)

    def make_batch(self, seqs: list[Any], vocab_size: int) -> SamplingBatch:
        """From sequence-like rows (`Sequence`, `RowView`): every row read one by one."""
        temps, top_k, top_p, min_p, greedy = [], [], [], [], []
        for seq in seqs:
            p = seq.params
            greedy.append(p.is_greedy)
            temps.append(1.0 if p.is_greedy else p.temperature)
            top_k.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
        return self.build_batch(np.asarray(temps, dtype=np.float32), np.asarray(top_k, dtype=np.int64),
                                np.asarray(top_p, dtype=np.float32), np.asarray(min_p, dtype=np.float32),
                                np.asarray(greedy, dtype=np.bool_), list(enumerate(seqs)), vocab_size)

    def build_batch(self, temps: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
                    greedy: np.ndarray, special: list[tuple[int, Any]], vocab_size: int) -> SamplingBatch:
        """Per-row arrays for every row, plus the rows that need more than temperature and
        filters (masks, bias, penalties, seeds, logprobs, beams), as sequence-like views."""
        banned: tuple[list[int], list[int]] = ([], [])
        allowed: tuple[list[int], list[int]] = ([], [])
        allowed_rows: list[int] = []
        bias: tuple[list[int], list[int], list[float]] = ([], [], [])
        penalty_rows, seeded, logprob_rows, beam_rows = [], [], [], []
        for row, seq in special:
            p = seq.params
            if seq.beam_k:
                beam_rows.append((row, seq.beam_k))
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                for t in p.all_stop_token_ids:
                    if t < vocab_size:
                        banned[0].append(row)
                        banned[1].append(t)
            if seq.bad_words_ids:
                for t in seq.banned_by_bad_words():
                    if t < vocab_size:
                        banned[0].append(row)
                        banned[1].append(t)
            if p.allowed_token_ids:
                allowed_rows.append(row)
                for t in p.allowed_token_ids:
                    if t < vocab_size:
                        allowed[0].append(row)
                        allowed[1].append(t)
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    if t < vocab_size:
                        bias[0].append(row)
                        bias[1].append(t)
                        bias[2].append(b)
            if p.has_penalties:
                penalty_rows.append(row)
            if not p.is_greedy and p.seed is not None:
                seeded.append((row, seq))
            if seq.wants_logprobs:
                logprob_rows.append((row, p.logprobs or 0))
        dev = self.device
        return SamplingBatch(
            temperatures=torch.from_numpy(temps).to(dev),
            top_k=torch.from_numpy(top_k).to(dev) if (top_k < vocab_size).any() else None,
            top_p=torch.from_numpy(top_p).to(dev) if (top_p < 1.0).any() else None,
            min_p=torch.from_numpy(min_p).to(dev) if (min_p > 0.0).any() else None,
            greedy=torch.from_numpy(greedy).to(dev),
            all_greedy=bool(greedy.all()),
            banned=banned, allowed=allowed, allowed_rows=allowed_rows, bias=bias, penalty_rows=penalty_rows,
            seeded_rows=seeded, logprob_rows=logprob_rows, beam_rows=beam_rows,
            views={row: seq for row, seq in special if seq.params.has_penalties},
        )

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        num_rows = logits.shape[0]
        raw_logprobs = None
        if batch.logprob_rows or batch.beam_rows:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._process(logits.clone() if raw_logprobs is not None else logits, batch)

        greedy_tokens = _row_argmax(logits)
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = torch.where(batch.greedy, greedy_tokens, self._sample(logits, batch))

        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        beams: list[tuple[list[float], list[int]] | None] = [None] * num_rows
        if batch.logprob_rows:
            rows = torch.tensor([r for r, _ in batch.logprob_rows], device=logits.device)
            entries = gather_logprobs(raw_logprobs[rows], tokens[rows], [k for _, k in batch.logprob_rows])
            for (row, _), entry in zip(batch.logprob_rows, entries):
                logprobs[row] = entry
        if batch.beam_rows:
            rows = torch.tensor([r for r, _ in batch.beam_rows], device=logits.device)
            max_k = max(k for _, k in batch.beam_rows)
            values, ids = (x.tolist() for x in raw_logprobs[rows].topk(max_k, dim=-1))
            for j, (row, k) in enumerate(batch.beam_rows):
                beams[row] = (values[j][:k], ids[j][:k])
                token_list[row] = -1
        return SamplerOutput(token_list, logprobs, beams)

    def _process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Masks, bias and penalties, in vLLM's order."""
        if batch.allowed_rows:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep[batch.allowed[0], batch.allowed[1]] = True
            rows = torch.tensor(batch.allowed_rows, device=logits.device)
            logits[rows] = logits[rows].masked_fill(~keep[rows], float("-inf"))
        if batch.banned[0]:
            logits[batch.banned[0], batch.banned[1]] = float("-inf")
        if batch.bias[0]:
            values = torch.tensor(batch.bias[2], device=logits.device, dtype=logits.dtype)
            logits.index_put_((torch.tensor(batch.bias[0], device=logits.device),
                               torch.tensor(batch.bias[1], device=logits.device)), values, accumulate=True)
        if batch.penalty_rows:
            rows = torch.tensor(batch.penalty_rows, device=logits.device)
            seqs = [batch.views[r] for r in batch.penalty_rows]
            logits[rows] = apply_penalties(logits[rows], seqs)
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperatures[:, None]
        if batch.top_k is not None:
            logits = _apply_top_k(logits, batch.top_k)
        probs = torch.softmax(logits, dim=-1)
        if batch.top_p is not None:
            probs = _apply_top_p(probs, batch.top_p)
        if batch.min_p is not None:
            probs = _apply_min_p(probs, batch.min_p)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, seq in batch.seeded_rows:
            gen = self._seq_generators.get(seq.seq_id)
            if gen is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(seq.params.seed)
                self._seq_generators[seq.seq_id] = gen
            noise[row].exponential_(generator=gen)
        return _row_argmax(probs / noise)


def _row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, as `x.argmax(dim=-1)` gives it (the first index on ties; a NaN counts
    as the largest value). On the CPU this is numpy's argmax over the same memory: torch's
    single-threaded one took 1.3 ms at [256, 2048] float32 logits, numpy's 0.06 ms, and it was
    most of a decode step's sampling (measured on the 2-core dev box)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.detach().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
    """Presence and frequency penalties count generated tokens (OpenAI); the repetition
    penalty applies to every token seen in prompt or output, dividing positive logits and
    multiplying negative ones (transformers' RepetitionPenaltyLogitsProcessor)."""
    dev, dtype = logits.device, logits.dtype
    counts = token_counts([s.output_token_ids for s in seqs], logits.shape[1], dev, dtype)
    presence = torch.tensor([s.params.presence_penalty for s in seqs], device=dev, dtype=dtype)
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev, dtype=dtype)
    repetition = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev, dtype=dtype)
    if (repetition != 1.0).any():
        seen = (token_counts([s.token_ids[:s.prompt_len] for s in seqs], logits.shape[1], dev, dtype) > 0) | (counts > 0)
        rep = repetition[:, None].expand_as(logits)
        logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(dtype)


def token_counts(lists: list[list[int]], vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[rows, vocab] occurrences of each row's token ids, built with one scatter for the batch."""
    lengths = torch.tensor([len(x) for x in lists])
    flat = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(lists)), lengths).to(device)
    counts = torch.zeros(len(lists), vocab, device=device, dtype=dtype)
    counts.index_put_((rows, flat), torch.ones(flat.shape, device=device, dtype=dtype), accumulate=True)
    return counts


def gather_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, top_k: list[int]) -> list[TokenLogprobs]:
    """Per row of `logprobs` ([R, V], normalised): the chosen token's logprob and rank (1 =
    most likely) and the row's `top_k[r]` best tokens. One topk for all rows."""
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
    max_k = max(top_k, default=0)
    top_v = top_i = None
    if max_k:
        top_v, top_i = (x.tolist() for x in logprobs.topk(max_k, dim=-1))
    out = []
    for j, (token, lp, rank, k) in enumerate(zip(chosen.tolist(), chosen_lp.tolist(), ranks.tolist(), top_k)):
        top = {}
        if k:
            top = {t: (v, r) for r, (v, t) in enumerate(zip(top_v[j][:k], top_i[j][:k]), start=1)}
        out.append(TokenLogprobs(token, lp, rank, top))
    return out


def _apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """k == vocab size means disabled for that row; only the largest enabled k is computed."""
    enabled = k < logits.shape[-1]
    max_k = int(k[enabled].max())
    top = logits.topk(max_k, dim=-1).values  # sorted descending
    kth = top.gather(1, (k.clamp(max=max_k) - 1)[:, None])
    kth = kth.masked_fill(~enabled[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    drop_sorted = (cumulative - sorted_probs) >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
