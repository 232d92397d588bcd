"""Requests that own several sequences, behind one narrow interface.

A plain request is one sequence and the scheduler needs nothing more: its tokens catch up under
the budget and its sampled rows are appended. `n > 1` / `best_of` samples and beam search own
several sequences whose lives are tied (samples fork from the first one's prefill; beams report
candidates, wait for their siblings, then continue, branch or end together). Such a request's
sequences carry a `RequestGroup`. The scheduler asks the group a few questions (how many
sequences does admitting this one make, is it parked, what forks with it, what ends with it)
and, when one of its sequences sampled, applies the decisions the group returns — `Fork`,
`Sample`, `Append`, `Drop`, `Done` — which are all a group can make happen. No blocks, no
tensors: the scheduler turns decisions into KV-cache and runner-batch changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from pagedbackend.step import ForkSeq, RequestDone, RunnerOutput

if TYPE_CHECKING:
    from pagedbackend.sequence import Sequence


@dataclass(slots=True)
class Fork:
    """`child` starts where `parent` is now, sharing every block it has (copy-on-write)."""

    parent: Sequence
    child: Sequence


@dataclass(slots=True)
class Sample:
    """Append what the runner sampled in `row` for `seq` (the scheduler's stop checks apply)."""

    seq: Sequence
    row: int


@dataclass(slots=True)
class Append:
    """Append a token the group chose (the runner did not sample it, and is told)."""

    seq: Sequence
    token: int
    cumulative_logprob: float


@dataclass(slots=True)
class Drop:
    """End `seq` and forget it: its tokens live on in its branches or in a finished result."""

    seq: Sequence


@dataclass(slots=True)
class Done:
    """The request is over; `result` goes to the frontend."""

    result: RequestDone


Decision = Union[Fork, Sample, Append, Drop, Done]


class RequestGroup:
    """The questions the scheduler asks of a multi-sequence request; the defaults are a plain
    sequence's answers."""

    beam_k = 0  # candidates a sampled row reports instead of a token (beams)
    swappable = True  # may be preempted by swapping its KV to host memory

    def seqs_at_admission(self, seq: Sequence) -> int:
        """Running sequences that admitting `seq` makes (room for them is checked up front)."""
        return 1

    def is_parked(self, seq: Sequence) -> bool:
        """Nothing to compute for `seq` until its group moves on."""
        return False

    def forks(self, seq: Sequence) -> tuple[ForkSeq, ...]:
        """Sequences the runner samples from `seq`'s row in the step where `seq` samples."""
        return ()

    def ends_with(self, seq: Sequence) -> tuple[Sequence, ...]:
        """Sequences that end when `seq` ends before the group made them run."""
        return ()

    def on_sampled(self, seq: Sequence, row: int, result: RunnerOutput) -> list[Decision]:
        """`seq` sampled in `row` of `result`: what happens to the group's sequences now."""
        raise NotImplementedError


class ParallelSamples(RequestGroup):
    """`n > 1` / `best_of`: the first sample's prefill is computed once; in the step that
    samples it, the other samples fork from its last prompt logits (each with its own params
    and seed), share its blocks, and from then on are plain sequences."""

    def __init__(self, first: Sequence, others: list[Sequence]) -> None:
        self.pending = tuple(others)
        first.group = self

    def seqs_at_admission(self, seq: Sequence) -> int:
        return 1 + len(self.pending)

    def forks(self, seq: Sequence) -> tuple[ForkSeq, ...]:
        return tuple(ForkSeq(s.seq_id, s.params) for s in self.pending)

    def ends_with(self, seq: Sequence) -> tuple[Sequence, ...]:
        pending, self.pending = self.pending, ()
        return pending

    def on_sampled(self, seq: Sequence, row: int, result: RunnerOutput) -> list[Decision]:
        pending, self.pending = self.pending, ()
        seq.group = None  # forked: every sample is a plain sequence from now on
        decisions: list[Decision] = []
        for child_row, child in enumerate(pending, row + 1):
            if not child.is_finished:
                decisions += (Fork(seq, child), Sample(child, child_row))
        decisions.append(Sample(seq, row))
        return decisions
