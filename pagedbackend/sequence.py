"""One token sequence being generated: the unit the scheduler schedules and the KV cache
manager allocates for. A request with ``n > 1`` owns several sequences that share the prompt.

No tensors here: a sequence is token ids and counters.
"""

from __future__ import annotations

import enum
import itertools

from pagedbackend.block_pool import BlockHash
from pagedbackend.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV freed, to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


_FINISHED = {
    SequenceStatus.FINISHED_STOPPED,
    SequenceStatus.FINISHED_LENGTH,
    SequenceStatus.FINISHED_ABORTED,
    SequenceStatus.FINISHED_ERROR,
}


class Sequence:
    """Prompt + generated tokens, how many of them have KV computed, and scheduling state."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        index: int = 0,
        priority: int = 0,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.arrival_time = arrival_time
        self.priority = priority
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first admission; -1 until then
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Chained hashes of this sequence's full blocks, extended as tokens arrive.
        self.block_hashes: list[BlockHash] = []
        # Samples 1..n-1 of a request, waiting for this (first) sample's prefill to fork from it.
        self.fork_children: list[Sequence] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def fork(self, index: int, params: SamplingParams) -> "Sequence":
        """A new sample of the same prompt; blocks are shared by the KV cache manager."""
        child = Sequence(self.request_id, self.token_ids[: self.prompt_len], params,
                         self.arrival_time, index=index, priority=self.priority)
        child.block_hashes = self.block_hashes[:]
        child.num_cached_tokens = self.num_cached_tokens
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.name})")
