"""Turns the logits of the rows that sample into tokens, for the whole batch at once.

Greedy rows take the argmax. Random rows are temperature-scaled, filtered (top-k, top-p,
min-p) and sampled with the exponential-race trick: argmax(p / E) with E ~ Exp(1) picks token
i with probability p_i. The noise for a seeded sequence comes from that sequence's own
generator, one draw of the vocabulary's size per token, so its samples do not depend on what
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedbackend.sequence import Sequence


@dataclass
class SamplingBatch:
    """Per-row settings gathered from the sequences (host lists -> tensors once per step)."""

    temperatures: torch.Tensor  # [S], 1.0 for greedy rows (never divides by zero)
    top_k: torch.Tensor | None  # [S] int64, vocab size where disabled
    top_p: torch.Tensor | None  # [S]
    min_p: torch.Tensor | None  # [S]
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    banned_rows: list[int]  # (row, token) pairs masked to -inf: stop tokens before min_tokens
    banned_tokens: list[int]
    seeded_rows: list[tuple[int, Sequence]]


class Sampler:
    def __init__(self, device: torch.device | str, seed: int) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._seq_generators.pop(seq_id, None)

    def make_batch(self, seqs: list[Sequence], vocab_size: int) -> SamplingBatch:
        temps, top_k, top_p, min_p, greedy = [], [], [], [], []
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        seeded: list[tuple[int, Sequence]] = []
        for row, seq in enumerate(seqs):
            p = seq.params
            g = p.is_greedy
            greedy.append(g)
            temps.append(1.0 if g else p.temperature)
            top_k.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            if seq.num_output_tokens < p.min_tokens:
                for t in p.all_stop_token_ids:
                    if t < vocab_size:
                        banned_rows.append(row)
                        banned_tokens.append(t)
            if not g and p.seed is not None:
                seeded.append((row, seq))
        dev = self.device
        return SamplingBatch(
            temperatures=torch.tensor(temps, device=dev, dtype=torch.float32),
            top_k=torch.tensor(top_k, device=dev) if any(k < vocab_size for k in top_k) else None,
            top_p=torch.tensor(top_p, device=dev, dtype=torch.float32) if any(x < 1.0 for x in top_p) else None,
            min_p=torch.tensor(min_p, device=dev, dtype=torch.float32) if any(x > 0.0 for x in min_p) else None,
            greedy=torch.tensor(greedy, device=dev),
            all_greedy=all(greedy),
            banned_rows=banned_rows,
            banned_tokens=banned_tokens,
            seeded_rows=seeded,
        )

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits.float()
        if batch.banned_rows:
            logits[batch.banned_rows, batch.banned_tokens] = float("-inf")
        greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_tokens

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
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.greedy, greedy_tokens, sampled)


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
