"""Iteration-level continuous batching. The scheduler decides which sequences compute how many
tokens in the next step; it never touches tensors, the model, or a framework.

Every step: running sequences first (a decode is one token; an unfinished prompt continues as
a chunk), preempting the lowest-priority running sequence when blocks run out (the newest one
under the `fcfs` policy); then, if nothing had to be preempted, swapped-out sequences are
brought back, and then waiting sequences are admitted, each starting after its longest
prefix-cache hit, while the token budget and `max_num_seqs` allow.

Policies (vLLM's): `fcfs` serves in arrival order; `priority` serves the lowest `priority`
value first (arrival breaks ties), and a waiting request that does not fit preempts running
ones of lower priority. Preemption modes: `recompute` frees the victim's KV and recomputes it
on readmission (prefix-cache hits make that cheap); `swap` copies its blocks to the host pool
and back, falling back to recompute when the host pool is full and for beams.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedbackend.beam_search import BeamSearchGroup
from pagedbackend.config import PREEMPTION_MODES, SCHEDULING_POLICIES
from pagedbackend.errors import InvalidRequest
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampler import SamplerOutput, TokenLogprobs
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
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute and no block to move: the model runner can be skipped."""
        return not (self.scheduled or self.blocks_to_copy or self.blocks_to_swap_out or self.blocks_to_swap_in)

    def sampling_sequences(self) -> list[Sequence]:
        """One entry per sampled token, in the order the model runner returns them; forked
        children reuse their parent's logits row."""
        rows: list[Sequence] = []
        for item in self.scheduled:
            if item.sample:
                rows.append(item.seq)
                rows.extend(item.fork_children)
        return rows


def _parked(seq: Sequence) -> bool:
    """A beam that has reported its candidates: nothing to compute until its group advances."""
    return seq.beam_group is not None and seq.seq_id in seq.beam_group.reports


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0  # total so far
    num_swapped_out: int = 0  # of those, preemptions by swapping
    num_swapped_in: int = 0
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
        policy: str = "fcfs",
        preemption_mode: str = "recompute",
    ) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {policy!r}")
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}; got {preemption_mode!r}")
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.policy = policy
        self.preemption_mode = preemption_mode
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()
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
        if first.beam_group is not None and first.beam_group.width > self.max_num_seqs:
            raise InvalidRequest("beam_width", f"beam_width={first.beam_group.width} exceeds max_num_seqs={self.max_num_seqs}")
        first.fork_children = children
        self.requests[first.request_id] = list(seqs)
        self._enqueue(self.waiting, first)

    def _key(self, seq: Sequence) -> tuple:
        """Serving order: lower first. Under fcfs only arrival counts."""
        if self.policy == "priority":
            return (seq.priority, seq.arrival_time, seq.seq_id)
        return (seq.arrival_time, seq.seq_id)

    def _enqueue(self, queue: deque[Sequence], seq: Sequence, front: bool = False) -> None:
        """Add to a queue: fcfs appends (or puts a preempted sequence back at the front);
        the priority policy keeps the queue sorted by (priority, arrival)."""
        if self.policy == "priority":
            key = self._key(seq)
            index = next((i for i, other in enumerate(queue) if self._key(other) > key), len(queue))
            queue.insert(index, seq)
        elif front:
            queue.appendleft(seq)
        else:
            queue.append(seq)

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
        self._unqueue(seq)
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

    def _unqueue(self, seq: Sequence) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        made_room: list[Sequence] = []
        if self.policy == "priority":
            self.running.sort(key=self._key)  # the victim is always the last one
            made_room = self._preempt_for_waiting()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if _parked(seq):  # a beam that reported, waiting for the rest of its group
                i += 1
                continue
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
        # Running sequences ran out of blocks: admitting more now would only thrash.
        grew_out_of_blocks = bool(preempted)
        preempted += made_room

        if not preempted:
            # Swapped sequences come back before anything new is admitted (swap-ins never
            # share a step with swap-outs, so a host block is never reused before it is read).
            while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.swapped[0]
                if self.waiting and self._key(self.waiting[0]) < self._key(seq) and self.policy == "priority":
                    break
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not self.kv.swap_in(seq, num_new):
                    break
                self.swapped.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                self.stats.num_swapped_in += 1
                if num_new:
                    scheduled.append(self._scheduled(seq, num_new))
                    budget -= num_new

        if not grew_out_of_blocks:
            for seq in [s for s in self.waiting if not _parked(s)]:
                if budget <= 0:
                    break
                if self.swapped and (self.policy == "fcfs" or self._key(self.swapped[0]) < self._key(seq)):
                    break  # a swapped-out sequence ranks first and is still waiting for blocks
                if len(self.running) + self._seqs_at_admission(seq) > self.max_num_seqs:
                    break
                hits, num_hit_tokens = self.kv.get_computed_blocks(seq)
                num_new = seq.num_tokens - num_hit_tokens
                if num_new > budget:
                    if not self.enable_chunked_prefill:
                        break
                    num_new = budget
                if not self.kv.allocate_slots(seq, num_new, hits):
                    break
                self.waiting.remove(seq)
                if seq.num_cached_tokens < 0:
                    seq.num_cached_tokens = num_hit_tokens
                seq.num_computed_tokens = num_hit_tokens
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                scheduled.append(self._scheduled(seq, num_new))
                budget -= num_new

        if not scheduled and not preempted and self.waiting and self.running and all(_parked(s) for s in self.running):
            # Only beams that reported are running, waiting for a sibling that cannot get
            # blocks: free one of them (its report stays valid, so it need not recompute
            # before its group advances).
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)

        finished, self._finished_seq_ids = self._finished_seq_ids, []
        swap_out, swap_in = self.kv.take_pending_swaps()
        out = SchedulerOutput(scheduled, self.kv.take_pending_copies(), finished, preempted, swap_out, swap_in)
        self._record(out)
        return out

    def _seqs_at_admission(self, seq: Sequence) -> int:
        """Sequences a waiting one becomes: its unforked samples, or its beams."""
        group = seq.beam_group
        if group is not None and group.num_steps == 0:
            return group.width
        return 1 + len(seq.fork_children)

    def _preempt_for_waiting(self) -> list[Sequence]:
        """Priority policy: make room for the most urgent waiting sequence by preempting
        running ones of lower priority (a larger value) while it does not fit."""
        head = next((s for s in self.waiting if not _parked(s)), None)
        if head is None:
            return []
        if self.swapped and self._key(self.swapped[0]) < self._key(head):
            return []
        need_seqs = self._seqs_at_admission(head)
        need_blocks = self.kv.num_blocks_needed(min(head.num_tokens, self.max_num_batched_tokens))
        preempted = []
        while self.running and self._key(self.running[-1]) > self._key(head) and (
                len(self.running) + need_seqs > self.max_num_seqs or need_blocks > self.kv.num_free_blocks):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
        return preempted

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        sample = seq.num_computed_tokens + num_new == seq.num_tokens
        children = seq.fork_children if sample else []
        return ScheduledSequence(seq, num_new, self.kv.block_ids(seq), sample, children)

    def _pick_victim(self) -> Sequence:
        """The last running sequence: the newest under fcfs; under the priority policy the
        running list is sorted, so the lowest priority (then the newest)."""
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Swap the sequence's KV out to host memory if that mode is on and there is room,
        else preempt by recompute: drop its KV; it re-enters the queue at the front and
        recomputes prompt + generated tokens (likely prefix-cache hits) when readmitted."""
        self.running.remove(seq)
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        if self.preemption_mode == "swap" and seq.beam_group is None and self.kv.can_swap_out(seq):
            self.kv.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self._enqueue(self.swapped, seq)
            self.stats.num_swapped_out += 1
            return
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self._enqueue(self.waiting, seq, front=True)

    def _record(self, out: SchedulerOutput) -> None:
        st = self.stats
        st.num_running, st.num_waiting = len(self.running), len(self.waiting)
        st.last_batch_seqs = len(out.scheduled)
        st.last_batch_tokens = out.num_batched_tokens
        st.max_batch_seqs = max(st.max_batch_seqs, len(out.scheduled))
        if any(not s.sample for s in out.scheduled):  # a prompt computed only in part
            st.num_chunked_prefill_steps += 1

    # ------------------------------------------------------------------ update
    def update_from_output(self, out: SchedulerOutput, sampled: SamplerOutput) -> list[Sequence]:
        """Advance the scheduled sequences by what the step computed and sampled. Returns every
        sequence that received a token (including newly forked samples); token-level stops
        (max_tokens, max_model_len, EOS, stop_token_ids) are applied here, and beam groups
        whose beams have all reported take their next step."""
        row = 0
        updated: list[Sequence] = []
        groups: list[BeamSearchGroup] = []
        for item in out.scheduled:
            seq = item.seq
            rows = range(row, row + (1 + len(item.fork_children) if item.sample else 0))
            row = rows.stop
            if seq.is_finished or seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran; its sampled tokens are dropped
            seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(seq)
            if seq.seq_id in sampled.prompt_logprobs:
                seq.prompt_logprobs.extend(sampled.prompt_logprobs[seq.seq_id])
            if not item.sample:
                continue
            if seq.beam_group is not None:
                seq.beam_group.report(seq, *sampled.beam_candidates[rows[0]])
                if seq.beam_group not in groups:
                    groups.append(seq.beam_group)
                continue
            children = item.fork_children
            seq.fork_children = []
            for child, r in zip(children, rows[1:]):
                if child.is_finished:
                    continue
                self.kv.fork(seq, child)
                child.num_computed_tokens = seq.num_computed_tokens
                child.status = SequenceStatus.RUNNING
                self.running.append(child)
                self._append_token(child, sampled.tokens[r], sampled.logprobs[r])
                updated.append(child)
            self._append_token(seq, sampled.tokens[rows[0]], sampled.logprobs[rows[0]])
            updated.append(seq)
        for group in groups:
            if group.ready:
                updated.extend(self._advance_beams(group))
        return updated

    def _advance_beams(self, group: BeamSearchGroup) -> list[Sequence]:
        """Apply one beam-search decision: a parent kept once continues itself; kept again, it
        branches (sharing every block; the shared partial block is copied on first write);
        beams not kept are dropped. When the search is over every beam is dropped."""
        decisions = group.advance()
        old = group.running
        taken: set[int] = set()
        beams: list[tuple[Sequence, int, float]] = []
        for parent, token, score in decisions:
            if parent.seq_id in taken:
                beams.append((self._branch(parent), token, score))
            else:
                taken.add(parent.seq_id)
                beams.append((parent, token, score))
        dropped = [s for s in old if s.seq_id not in taken]
        for seq in dropped:
            self._drop_beam(seq)
        for seq, token, score in beams:
            seq.token_ids.append(token)
            seq.cumulative_logprob = score
        if group.done:
            group.running = dropped  # the last beams, now finished: the request is over
            return dropped
        group.set_running([(seq, score) for seq, _, score in beams])
        return []

    def _branch(self, parent: Sequence) -> Sequence:
        child = parent.branch()
        self.requests[parent.request_id].append(child)
        if parent.status == SequenceStatus.RUNNING:
            self.kv.fork(parent, child)
            self.running.append(child)
        else:  # preempted after reporting: the branch recomputes too
            child.num_computed_tokens = 0
            self._enqueue(self.waiting, child, front=True)
        return child

    def _drop_beam(self, seq: Sequence) -> None:
        """A beam that is not continued: free it and forget it (its tokens live on in its
        branches or in a finished hypothesis)."""
        self._finish(seq, SequenceStatus.FINISHED_STOPPED)
        seqs = self.requests.get(seq.request_id)
        if seqs is not None:
            seqs.remove(seq)

    def _append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.cumulative_logprob += logprobs.logprob
            if seq.params.logprobs is not None:
                seq.logprobs.append(logprobs)
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
        assert not self.running and not self.waiting and not self.swapped, (self.running, self.waiting, self.swapped)
        self.kv.check_all_free()
