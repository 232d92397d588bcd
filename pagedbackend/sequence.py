"""One token sequence being generated: the unit the scheduler schedules and the KV cache
manager allocates for. A request with ``n > 1`` owns several sequences that share the prompt.

No tensors here: a sequence is token ids and counters.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

from pagedbackend.block_pool import BlockHash
from pagedbackend.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV freed, to be recomputed
    SWAPPED = "swapped"  # preempted with its KV copied to host memory, to be copied back
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


class SampledTokens:
    """What the sampler reads of a row's history, shared by `Sequence` (the scheduler's) and
    the runner's batch view of a slot: needs `token_ids`, `prompt_len`, `params` and
    `bad_words_ids`."""

    __slots__ = ()

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def wants_logprobs(self) -> bool:
        """The sampler must report the chosen token's logprob: asked for, or needed to rank
        best_of samples."""
        p = self.params
        return p.logprobs is not None or p.num_samples > p.n

    def banned_by_bad_words(self) -> list[int]:
        """Tokens that would complete a bad word given the tokens so far (transformers'
        NoBadWordsLogitsProcessor: the word's prefix must end the prompt + output)."""
        banned = []
        tokens = self.token_ids
        for word in self.bad_words_ids:
            prefix = word[:-1]
            if not prefix or (len(prefix) <= len(tokens) and tokens[len(tokens) - len(prefix):] == prefix):
                banned.append(word[-1])
        return banned


class Sequence(SampledTokens):
    """Prompt + generated tokens, how many of them have KV computed, and scheduling state."""

    # Slots, the ones every decode step reads first: the scheduler touches each running
    # sequence twice a step, after a forward pass has flushed the CPU caches, and attributes
    # stored in the object itself (not in a separate dict) cost fewer cache misses.
    __slots__ = ("seq_id", "token_ids", "num_computed_tokens", "status", "params", "group",
                 "request_id", "index", "prompt_len", "cumulative_logprob", "num_cached_tokens", "max_num_tokens",
                 "all_stop_token_ids", "reports_logprobs", "arrival_time", "priority", "stop_reason",
                 "num_preemptions", "block_hashes", "num_prompt_logprobs", "bad_words_ids", "spec_token_ids")

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
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its first admission
        self.status = SequenceStatus.WAITING
        # What the scheduler's stop check reads of `params` (the request's, never changed), kept
        # here for the check that runs on every sequence every step: the sequence itself is in
        # the CPU cache by then, its params are not (a few misses each). The token count at
        # which max_tokens ends it (None: no limit), every token id that can end it, and
        # whether its outputs carry logprobs.
        self.max_num_tokens = None if params.max_tokens is None else self.prompt_len + params.max_tokens
        self.all_stop_token_ids = params.all_stop_token_ids
        self.reports_logprobs = params.logprobs is not None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Chained hashes of this sequence's full blocks, extended as tokens arrive.
        self.block_hashes: list[BlockHash] = []
        # Sum of the chosen tokens' logprobs (reported when asked for, and ranks best_of samples).
        self.cumulative_logprob = 0.0
        # Prompt positions whose logprobs were reported (when `params.prompt_logprobs` is set;
        # the first prompt token has none).
        self.num_prompt_logprobs = 0
        # Token-id sequences that must not be generated (bad_words, tokenized by the engine).
        self.bad_words_ids: list[list[int]] = []
        # Tokens proposed for its next step (speculative decoding), until that step is scheduled.
        self.spec_token_ids: list[int] = []
        # The multi-sequence request this sequence belongs to while their lives are tied (samples
        # not forked yet, a beam search): a pagedbackend.request_group.RequestGroup; None for a
        # plain sequence, which is nearly every one.
        self.group: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def beam_k(self) -> int:
        """Candidates a beam reports per step (0 when this is not a beam)."""
        return self.group.beam_k if self.group is not None else 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and 1 + self.num_prompt_logprobs < self.prompt_len

    def fork(self, index: int, params: SamplingParams) -> "Sequence":
        """A new sample of the same prompt; blocks are shared by the KV cache manager."""
        child = Sequence(self.request_id, self.token_ids[: self.prompt_len], params,
                         self.arrival_time, index=index, priority=self.priority)
        child.block_hashes = self.block_hashes[:]
        child.num_cached_tokens = self.num_cached_tokens
        child.bad_words_ids = self.bad_words_ids
        child.num_prompt_logprobs = self.num_prompt_logprobs
        return child

    def branch(self) -> "Sequence":
        """A copy of this sequence's tokens and progress (a beam continuing from the same
        parent); its blocks are shared by the KV cache manager."""
        child = Sequence(self.request_id, self.token_ids[: self.prompt_len], self.params,
                         self.arrival_time, index=self.index, priority=self.priority)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = self.block_hashes[:]
        child.status = self.status
        child.cumulative_logprob = self.cumulative_logprob
        child.bad_words_ids = self.bad_words_ids
        child.group = self.group
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.name})")
