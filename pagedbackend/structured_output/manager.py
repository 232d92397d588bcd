"""The engine core's side of structured output: one grammar matcher per constrained sequence,
and each step's token bitmask for the rows that sample under a grammar.

The matchers live beside the scheduler (in the engine core), not in the model runners: the
mask is computed once per step and travels to every tensor-parallel rank inside the plain
`SchedulerOutput` (`GrammarStep`), so all ranks sample alike; a preempted sequence keeps its
matcher, already advanced through every token it has, so resuming needs no replay; the
scheduler's proposals (speculative decoding) are checked here, where the tokens are known.

Per step: `fill(out)` writes row j of a sequence verifying m proposals as the mask after its
tokens and the first j proposals (advancing the matcher through them, then rolling it back),
so each verified position samples under its own mask; after the step `accept` advances each
matcher by the tokens its sequence kept, and `validate_drafts` trims new proposals to the
longest prefix the grammar allows (a proposal the grammar forbids could never be accepted).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pagedbackend.step import GrammarStep, SchedulerOutput


class StructuredOutputManager:
    def __init__(self, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.num_words = -(-vocab_size // 32)
        self._matchers: dict[int, Any] = {}  # seq_id -> xgrammar GrammarMatcher
        # The row of a sequence whose grammar is over (it accepted EOS, with ignore_eos):
        # only the stop tokens remain, as they would with no grammar left to satisfy.
        self._stop_only = np.zeros(self.num_words, dtype=np.int32)
        bits = self._stop_only.view(np.uint32)
        for t in stop_token_ids:
            if 0 <= t < vocab_size:
                bits[t // 32] |= np.uint32(1 << (t % 32))
        self.stop_token_ids = frozenset(t for t in stop_token_ids if 0 <= t < vocab_size)
        self.num_constrained_requests = 0

    # ------------------------------------------------------------- sequences
    def add(self, seq_ids: list[int], grammar: Any) -> None:
        """Matchers for a request's sequences (each of `n` samples follows its own path);
        `grammar`: what `GrammarCompiler.compile` returned."""
        import xgrammar as xgr  # imported by the compiler already, for this grammar

        for seq_id in seq_ids:
            self._matchers[seq_id] = xgr.GrammarMatcher(grammar)
        self.num_constrained_requests += 1

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def sweep(self, alive: Callable[[int], bool]) -> None:
        """Drop the matchers of sequences that are gone (finished, aborted, failed)."""
        for seq_id in [s for s in self._matchers if not alive(s)]:
            del self._matchers[seq_id]

    # ------------------------------------------------------------------ step
    def fill(self, out: SchedulerOutput) -> GrammarStep | None:
        """The step's bitmask: one row per constrained sampled row (and per verified position
        of a sequence with proposals); None when no row this step is constrained."""
        matchers = self._matchers
        if not matchers:
            return None
        rows: dict[int, int] = {}
        work: list[tuple[Any, tuple[int, ...]]] = []
        num_rows = 0
        for item in out.scheduled:
            if not item.sample:
                continue
            m = matchers.get(item.seq_id)
            if m is not None:
                rows[item.seq_id] = num_rows
                work.append((m, item.spec_token_ids))
                num_rows += 1 + len(item.spec_token_ids)
            for fork in item.forks:
                fm = matchers.get(fork.seq_id)
                if fm is not None:
                    rows[fork.seq_id] = num_rows
                    work.append((fm, ()))
                    num_rows += 1
        if not rows:
            return None
        import torch  # xgrammar fills tensors; the engine core imports torch only once a grammar runs

        bitmask = np.empty((num_rows, self.num_words), dtype=np.int32)
        view = torch.from_numpy(bitmask)  # xgrammar writes through it into the numpy array
        row = 0
        for m, drafts in work:
            for j in range(len(drafts) + 1):
                if m.is_terminated():
                    bitmask[row] = self._stop_only
                else:
                    m.fill_next_token_bitmask(view, row)
                row += 1
                if j < len(drafts) and not m.accept_token(drafts[j]):
                    raise AssertionError(f"proposal {drafts[j]} was validated but the grammar refuses it")
            if drafts:
                m.rollback(len(drafts))
        return GrammarStep(bitmask, rows)

    def accept(self, seq_id: int, tokens: list[int]) -> bool:
        """Advance a sequence's matcher by the tokens it kept; False if the grammar refuses one
        (only possible when another mask removed every token the grammar allowed)."""
        m = self._matchers.get(seq_id)
        if m is None:
            return True
        for t in tokens:
            if m.is_terminated():
                if t not in self.stop_token_ids:
                    return False
            elif not m.accept_token(t):
                return False
        return True

    def validate_drafts(self, seq_id: int, drafts: list[int]) -> list[int]:
        """The longest prefix of `drafts` the sequence's grammar allows next."""
        m = self._matchers.get(seq_id)
        if m is None or not drafts:
            return drafts
        n = 0
        for t in drafts:
            if m.is_terminated() or not m.accept_token(t):
                break
            n += 1
        if n:
            m.rollback(n)
        return drafts[:n]
