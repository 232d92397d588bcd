"""Iteration-level continuous batching. The scheduler decides which sequences compute how many
tokens in the next step; it never touches tensors, the model, or a framework.

Every step: running sequences first (a decode is one token; an unfinished prompt continues as
a chunk), preempting the newest running sequence by recompute when blocks run out; then, if
nothing had to be preempted, waiting sequences in arrival order, each starting after its
longest prefix-cache hit, while the token budget and `max_num_seqs` allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedbackend.errors import InvalidRequest
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    block_ids: list[int]
    # True when this step computes the sequence's last known token, so its logits are sampled.
    sample: bool
    # Samples 2..n of the request, forked from this sequence's logits after its prefill.
    fork_children: list[Sequence] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    blocks_to_copy: list[tuple[int, int]]
    finished_seq_ids: list[int]  # finished since the previous output: drop their per-seq state
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def sampling_sequences(self) -> list[Sequence]:
        """One entry per sampled token, in the order the model runner returns them; forked
        children reuse their parent's logits row."""
        rows: list[Sequence] = []
        for item in self.scheduled:
            if item.sample:
                rows.append(item.seq)
                rows.extend(item.fork_children)
        return rows


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0  # total so far
    last_batch_seqs: int = 0
    last_batch_tokens: int = 0
    max_batch_seqs: int = 0  # largest number of sequences computed in one step so far
    num_chunked_prefill_steps: int = 0  # steps that computed part, but not all, of a prompt


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, list[Sequence]] = {}
        self._finished_seq_ids: list[int] = []
        self.stats = SchedulerStats()

    # ---------------------------------------------------------------- requests
    def add_request(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences. The first one is prefilled; the others fork from it."""
        first, children = seqs[0], seqs[1:]
        if first.request_id in self.requests:
            raise InvalidRequest("request_id", f"request_id {first.request_id!r} is already in use")
        if len(seqs) > self.max_num_seqs:
            raise InvalidRequest("n", f"n={len(seqs)} exceeds max_num_seqs={self.max_num_seqs}")
        first.fork_children = children
        self.requests[first.request_id] = list(seqs)
        self.waiting.append(first)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish_request(self, request_id: str, status: SequenceStatus) -> list[Sequence]:
        """End every unfinished sequence of a request (abort, error); returns those ended."""
        ended = [s for s in self.requests.get(request_id, ()) if not s.is_finished]
        for seq in ended:
            if not seq.is_finished:  # a parent's finish also ends its unforked children
                self._finish(seq, status)
        return ended

    def finish_sequence(self, seq: Sequence, status: SequenceStatus,
                        stop_reason: int | str | None = None) -> None:
        """End one sequence (used by the engine for stop strings)."""
        if not seq.is_finished:
            seq.stop_reason = stop_reason
            self._finish(seq, status)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        self.kv.free(seq)
        self._finished_seq_ids.append(seq.seq_id)
        for child in seq.fork_children:  # never forked: they end with their parent
            if not child.is_finished:
                child.status = status
                self._finished_seq_ids.append(child.seq_id)
        seq.fork_children = []
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[seq.request_id]

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self._pick_victim()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: nothing younger is left to schedule
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if len(self.running) + 1 + len(seq.fork_children) > self.max_num_seqs:
                    break
                hits, num_hit_tokens = self.kv.get_computed_blocks(seq)
                num_new = seq.num_tokens - num_hit_tokens
                if num_new > budget:
                    if not self.enable_chunked_prefill:
                        break
                    num_new = budget
                if not self.kv.allocate_slots(seq, num_new, hits):
                    break
                self.waiting.popleft()
                if seq.num_cached_tokens < 0:
                    seq.num_cached_tokens = num_hit_tokens
                seq.num_computed_tokens = num_hit_tokens
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                scheduled.append(self._scheduled(seq, num_new))
                budget -= num_new

        finished, self._finished_seq_ids = self._finished_seq_ids, []
        out = SchedulerOutput(scheduled, self.kv.take_pending_copies(), finished, preempted)
        self._record(out)
        return out

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        sample = seq.num_computed_tokens + num_new == seq.num_tokens
        children = seq.fork_children if sample else []
        return ScheduledSequence(seq, num_new, self.kv.block_ids(seq), sample, children)

    def _pick_victim(self) -> Sequence:
        """Newest running sequence (the one admitted last)."""
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop its KV; it re-enters the queue at the front and
        recomputes prompt + generated tokens (likely prefix-cache hits) when readmitted."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    def _record(self, out: SchedulerOutput) -> None:
        st = self.stats
        st.num_running, st.num_waiting = len(self.running), len(self.waiting)
        st.last_batch_seqs = len(out.scheduled)
        st.last_batch_tokens = out.num_batched_tokens
        st.max_batch_seqs = max(st.max_batch_seqs, len(out.scheduled))
        if any(not s.sample for s in out.scheduled):  # a prompt computed only in part
            st.num_chunked_prefill_steps += 1

    # ------------------------------------------------------------------ update
    def update_from_output(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance the scheduled sequences by what the step computed and sampled. Returns every
        sequence that received a token (including newly forked samples); token-level stops
        (max_tokens, max_model_len, EOS, stop_token_ids) are applied here."""
        rows = iter(sampled_token_ids)
        updated: list[Sequence] = []
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished or seq.status != SequenceStatus.RUNNING:
                # Aborted while the step ran; its sampled tokens are dropped.
                if item.sample:
                    for _ in range(1 + len(item.fork_children)):
                        next(rows)
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(seq)
            if not item.sample:
                continue
            token = next(rows)
            children = item.fork_children
            seq.fork_children = []
            for child in children:
                child_token = next(rows)
                if child.is_finished:
                    continue
                self.kv.fork(seq, child)
                child.num_computed_tokens = seq.num_computed_tokens
                child.status = SequenceStatus.RUNNING
                self.running.append(child)
                self._append_token(child, child_token)
                updated.append(child)
            self._append_token(seq, token)
            updated.append(seq)
        return updated

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        status, reason = self._check_stop(seq, token)
        if status is not None:
            seq.stop_reason = reason
            self._finish(seq, status)

    def _check_stop(self, seq: Sequence, token: int) -> tuple[SequenceStatus | None, int | None]:
        params = seq.params
        if seq.num_tokens >= self.max_model_len or (
            params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens
        ):
            return SequenceStatus.FINISHED_LENGTH, None
        if seq.num_output_tokens < params.min_tokens:
            return None, None
        if token in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED, token
        if not params.ignore_eos and token in params._eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED, None
        return None, None

    def fail_step(self, out: SchedulerOutput) -> set[str]:
        """A step raised: fail the requests it computed (their KV is suspect); keep the rest."""
        failed = {item.seq.request_id for item in out.scheduled}
        for request_id in failed:
            self.finish_request(request_id, SequenceStatus.FINISHED_ERROR)
        return failed

    def check_all_free(self) -> None:
        assert not self.running and not self.waiting, (self.running, self.waiting)
        self.kv.check_all_free()
