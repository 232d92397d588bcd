"""What crosses the engine's boundaries in one step, as plain, picklable data (no torch, no live
objects): the scheduler's decision (`SchedulerOutput`) goes to the executor and its model
runner(s), their result (`RunnerOutput`) comes back to the scheduler, and the scheduler's
`update` turns it into `SeqOutput`s for the frontend (detokenization, stop strings, outputs).

The unit is the sequence (`seq_id`): a request with `n > 1`, `best_of` or beam search owns
several. The runner keeps a persistent batch of the sequences it has been sent: a sequence
enters it once (`NewSeq`, with everything the runner must know about it), then only changes
travel (new blocks, tokens the runner did not sample itself), and it leaves when it is
preempted or finished (`removed_seq_ids`). The runner appends the tokens it samples to its own
copy; the scheduler keeps its own. A sampled row may carry several tokens (speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from pagedbackend.sampling_params import SamplingParams

if TYPE_CHECKING:  # numpy arrays travel in a step; the scheduler never builds one
    import numpy as np


@dataclass
class TokenLogprobs:
    """The chosen token's raw logprob and rank, and the top-k alternatives."""

    token: int
    logprob: float
    rank: int
    top: dict[int, tuple[float, int]]  # token -> (logprob, rank)


@dataclass
class NewSeq:
    """A sequence entering the runner's batch: admitted, resumed after preemption, or a new
    beam branch. `token_ids` are all its tokens so far (prompt first)."""

    seq_id: int
    request_id: str
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    block_ids: list[int]
    bad_words_ids: list[list[int]] = field(default_factory=list)
    beam_k: int = 0  # a beam: report the best `beam_k` next tokens instead of sampling one
    prompt_logprobs_done: int = 0  # prompt positions whose logprobs were already reported


@dataclass(slots=True)
class ForkSeq:
    """A sample of `n > 1` / `best_of` forked from its first sample's last prompt logits this
    step: the runner samples it from the parent's row with its own params (seed)."""

    seq_id: int
    params: SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's work in the step: compute `num_new_tokens` tokens after its first
    `num_computed_tokens`; `sample` when they end at its last known token. (Slots: one is built
    per running sequence every step, so building and reading them is on the hot path.)

    Speculative decoding: `spec_token_ids` are proposals that follow its last known token, the
    last of the `num_new_tokens` (the runner verifies them all in this step's forward pass);
    `num_lookahead` is how many KV slots past those tokens the sequence owns, where a draft
    model may write the KV of its next proposals after the step."""

    seq_id: int
    request_id: str
    num_computed_tokens: int
    num_new_tokens: int
    sample: bool
    forks: tuple[ForkSeq, ...] = ()  # a tuple: the usual step has none, and () is not an allocation
    spec_token_ids: tuple[int, ...] = ()
    num_lookahead: int = 0


@dataclass
class GrammarStep:
    """Structured output's part of a step: the packed token bitmask of the rows that sample
    under a grammar (bit t of row r set: token t allowed; int32 words, `ceil(vocab / 32)` per
    row, xgrammar's layout), and the first row of each such sequence. A sequence verifying m
    proposals owns m + 1 consecutive rows, one per verified position."""

    bitmask: "np.ndarray"  # [R, ceil(V / 32)] int32
    rows: dict[int, int]  # seq_id -> its (first) row


# C-level field readers for whole-batch passes over `SchedulerOutput.scheduled`.
_num_new_tokens = attrgetter("num_new_tokens")
_forks = attrgetter("forks")
_spec_token_ids = attrgetter("spec_token_ids")


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    new_seqs: list[NewSeq] = field(default_factory=list)
    # seq_id -> (start, block ids): the sequence's block table from index `start` on.
    block_updates: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    # seq_id -> tokens appended by the scheduler, not sampled by the runner (beam decisions).
    new_token_ids: dict[int, list[int]] = field(default_factory=dict)
    removed_seq_ids: list[int] = field(default_factory=list)  # leave the batch (preempted or finished)
    finished_seq_ids: list[int] = field(default_factory=list)  # finished: per-sequence state can go
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device)
    preempted_seq_ids: list[int] = field(default_factory=list)
    # Speculative decoding: the runner proposes tokens for the sequences it samples, for the
    # next step (off while more sequences run than `disable_by_batch_size`).
    propose: bool = False
    grammar: GrammarStep | None = None  # structured output: None when no sampled row is constrained

    @property
    def num_batched_tokens(self) -> int:
        return sum(map(_num_new_tokens, self.scheduled))

    @property
    def is_empty(self) -> bool:
        """Nothing to compute and no block to move: the model runner can be skipped."""
        return not (self.scheduled or self.blocks_to_copy or self.blocks_to_swap_out or self.blocks_to_swap_in)

    def sampled_seq_ids(self) -> list[int]:
        """One row per sampled sequence, in the order the runner answers: each scheduled
        sequence that samples, followed by the samples forked from it."""
        if not any(map(_forks, self.scheduled)):  # the usual step: no fork, one row per sampling sequence
            return [item.seq_id for item in self.scheduled if item.sample]
        rows: list[int] = []
        for item in self.scheduled:
            if item.sample:
                rows.append(item.seq_id)
                rows.extend(f.seq_id for f in item.forks)
        return rows


@dataclass
class RunnerOutput:
    """Per sampled row (in `SchedulerOutput.sampled_seq_ids()` order): the tokens sampled (a
    list, possibly several; empty for a beam, which reports candidates instead), their
    logprobs when the sequence asked, and a beam's (log_softmax values, token ids)."""

    seq_ids: list[int]
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]
    beam_candidates: list[tuple[list[float], list[int]] | None]
    # seq_id -> logprobs of the prompt tokens this step's chunk predicted, in position order
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
    # seq_id -> tokens proposed for its next step (speculative decoding, when asked to propose)
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "RunnerOutput":
        return cls([], [], [], [])


@dataclass(slots=True)
class SeqOutput:
    """What one sequence produced in a step, for the frontend. `finish_reason` is set when the
    engine ended it (a stop token, a length limit, an error); stop strings are the frontend's.
    (Slots: one per sampled sequence per step.)"""

    request_id: str
    seq_id: int
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class BeamHypothesis:
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str


@dataclass
class RequestDone:
    """A request ended by the engine without a sequence output of its own: aborted, failed, or
    a beam search that is over (its best hypotheses, best first)."""

    request_id: str
    finish_reason: str  # "abort" | "error" | "stop" (beam search over)
    error: str | None = None
    beams: list[BeamHypothesis] | None = None
