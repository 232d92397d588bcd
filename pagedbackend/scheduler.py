"""Iteration-level continuous batching. The scheduler decides which sequences compute how many
tokens in the next step; it never touches tensors, the model, or a framework.

One rule: each sequence's `num_computed_tokens` catches up to its tokens, under the step's token
budget. Running sequences go first (a decode is one token; an unfinished prompt continues as a
chunk), preempting the lowest-priority running sequence when blocks run out (the newest one
under the `fcfs` policy); then, if no running sequence had to be preempted, waiting ones are
admitted in order while the budget and `max_num_seqs` allow: a new or recompute-preempted one
after its longest prefix-cache hit, a swapped-out one by copying its KV back from the host pool.

Requests of several sequences (`n > 1`, beam search) carry a `RequestGroup`; the scheduler asks
it a few questions and applies the decisions it returns (fork, sample, append, drop, done).

Policies (vLLM's): `fcfs` serves in arrival order; `priority` serves the lowest `priority`
value first (arrival breaks ties), and a waiting request that does not fit preempts running
ones of lower priority. Preemption modes: `recompute` frees the victim's KV and recomputes it
on readmission (prefix-cache hits make that cheap); `swap` copies its blocks to the host pool
and back, falling back to recompute when the host pool is full and for beams.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter

from pagedbackend.beam_search import BeamSearchGroup
from pagedbackend.errors import InvalidRequest
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.request_group import Append, Decision, Done, Drop, Fork, ParallelSamples, Sample
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.step import (NewSeq, RequestDone, RunnerOutput, ScheduledSeq, SchedulerOutput, SeqOutput,
                               TokenLogprobs)

SCHEDULING_POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")
# What `update` hands the frontend.
CoreOutput = SeqOutput | RequestDone


_sample = attrgetter("sample")


def _parked(seq: Sequence) -> bool:
    """Nothing to compute until its group moves on (a beam that has reported its candidates)."""
    return seq.group is not None and seq.group.is_parked(seq)


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


@dataclass
class SpecDecodeStats:
    """Speculative decoding so far (vLLM's counters): sequences-steps that verified proposals,
    the proposals, the accepted ones, and how often the proposal at each position was accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        per = self.accepted_per_position
        if len(per) < num_proposed:
            per.extend([0] * (num_proposed - len(per)))
        for i in range(num_accepted):
            per[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying step emits per sequence on average: the accepted ones and the
        target's own (1 + accepted / drafts; 1.0 before any)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


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
        num_spec_tokens: int = 0,
        num_lookahead_slots: int = 0,
        spec_disable_by_batch_size: int | None = None,
    ) -> None:
        """`num_spec_tokens` > 0 turns speculative decoding on: the runner proposes up to that
        many tokens per sampled sequence, and the next step verifies them (unless more than
        `spec_disable_by_batch_size` sequences are running or waiting). `num_lookahead_slots`: KV slots
        past its tokens each sampling sequence must own for the proposer (a draft model)."""
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
        # New, preempted and swapped-out sequences, in serving order (preempted ones first).
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, list[Sequence]] = {}
        self.stats = SchedulerStats()
        self.num_spec_tokens = num_spec_tokens
        self.num_lookahead_slots = num_lookahead_slots
        self.spec_disable_by_batch_size = spec_disable_by_batch_size
        self.spec_stats = SpecDecodeStats()
        # What the runner's persistent batch holds, and what it must be told next step.
        self._seqs: dict[int, Sequence] = {}  # every live sequence, by id
        self._in_runner: set[int] = set()
        self._removed: list[int] = []  # left the runner's batch since the last step
        self._finished_seq_ids: list[int] = []
        self._runner_tokens: dict[int, list[int]] = {}  # appended here, unknown to the runner (beams)

    # ---------------------------------------------------------------- requests
    def add_request(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences. The first one is prefilled; the others fork from it."""
        first, children = seqs[0], seqs[1:]
        if first.request_id in self.requests:
            raise InvalidRequest("request_id", f"request_id {first.request_id!r} is already in use")
        if len(seqs) > self.max_num_seqs:
            raise InvalidRequest("n", f"n={len(seqs)} exceeds max_num_seqs={self.max_num_seqs}")
        if isinstance(first.group, BeamSearchGroup) and first.group.width > self.max_num_seqs:
            raise InvalidRequest("beam_width", f"beam_width={first.group.width} exceeds max_num_seqs={self.max_num_seqs}")
        if children:
            ParallelSamples(first, children)
        self.requests[first.request_id] = list(seqs)
        for seq in seqs:
            self._seqs[seq.seq_id] = seq
        self._enqueue(self.waiting, first)

    def seq(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

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

    def abort_seqs(self, seq_ids: list[int]) -> list[str]:
        """End single sequences the frontend stopped (a stop string found in their text);
        returns the requests that are over as a result."""
        over = []
        for seq_id in seq_ids:
            seq = self._seqs.get(seq_id)
            if seq is not None and not seq.is_finished:
                self._finish(seq, SequenceStatus.FINISHED_ABORTED)
                if seq.request_id not in self.requests:
                    over.append(seq.request_id)
        return over

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self._unqueue(seq)
        seq.status = status
        self.kv.free(seq)
        self._leave_runner(seq)
        self._finished_seq_ids.append(seq.seq_id)
        self._seqs.pop(seq.seq_id, None)
        for child in seq.group.ends_with(seq) if seq.group is not None else ():  # never made to run
            if not child.is_finished:
                child.status = status
                self._finished_seq_ids.append(child.seq_id)
                self._seqs.pop(child.seq_id, None)
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[seq.request_id]

    def _leave_runner(self, seq: Sequence) -> None:
        if seq.seq_id in self._in_runner:
            self._in_runner.discard(seq.seq_id)
            self._removed.append(seq.seq_id)
        self._runner_tokens.pop(seq.seq_id, None)

    def _unqueue(self, seq: Sequence) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput([])
        scheduled = out.scheduled
        preempted: list[Sequence] = []
        made_room: list[Sequence] = []
        if self.policy == "priority":
            self.running.sort(key=self._key)  # the victim is always the last one
            made_room = self._preempt_for_waiting()

        kv, in_runner = self.kv, self._in_runner
        speculate = self._speculating()
        lookahead = self.num_lookahead_slots if speculate else 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_left = len(seq.token_ids) - seq.num_computed_tokens
            drafts: tuple[int, ...] = ()
            if seq.spec_token_ids:  # proposed last step: verified now, or dropped
                if speculate and num_left == 1:
                    drafts = self._capped_drafts(seq, budget)
                seq.spec_token_ids = []
            if (num_left == 1 and not drafts and not lookahead and seq.group is None and seq.seq_id in in_runner
                    and kv.fits_next_token(seq)):
                # The usual decode: one token into a block it has, which the runner knows. What
                # the general path below would decide, without its work: no allocation, no
                # preemption, nothing new for the runner's batch (no blocks, no tokens, no forks).
                scheduled.append(ScheduledSeq(seq.seq_id, seq.request_id, seq.num_computed_tokens, 1, True))
                budget -= 1
                i += 1
                continue
            num_new = min(num_left, budget) + len(drafts)
            if _parked(seq):  # a beam that reported, waiting for the rest of its group
                i += 1
                continue
            extra = self._lookahead(seq, seq.num_computed_tokens, num_new, len(drafts), lookahead)
            while not self.kv.allocate_slots(seq, num_new + extra):
                victim = self._pick_victim()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: nothing younger is left to schedule
            scheduled.append(self._scheduled(seq, num_new, out, drafts, extra))
            budget -= num_new
            i += 1
        # Running sequences ran out of blocks: admitting more now would only thrash.
        grew_out_of_blocks = bool(preempted)
        preempted += made_room

        if not grew_out_of_blocks:
            # Swap-ins never share a step with swap-outs, so a host block is never reused before
            # it is read.
            can_swap_in = not preempted
            for seq in [s for s in self.waiting if not _parked(s)]:
                if budget <= 0 or len(self.running) + self._seqs_at_admission(seq) > self.max_num_seqs:
                    break
                num_new = self._admit(seq, budget, can_swap_in, lookahead)
                if num_new is None:
                    break  # the first in line waits for blocks; nobody overtakes it
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                if num_new:
                    scheduled.append(self._scheduled(seq, num_new, out, (),
                                                     self._lookahead(seq, seq.num_computed_tokens, num_new, 0, lookahead)))
                    budget -= num_new

        if not scheduled and not preempted and self.waiting and self.running and all(_parked(s) for s in self.running):
            # Only beams that reported are running, waiting for a sibling that cannot get
            # blocks: free one of them (its report stays valid, so it need not recompute
            # before its group advances).
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)

        # Proposals are for the next step: asked for when it will speculate, counted after this
        # step's preemptions (a draft model proposes only into the lookahead slots a sequence
        # got, so a step that started busier proposes nothing it cannot hold).
        out.propose = self._speculating()
        out.finished_seq_ids, self._finished_seq_ids = self._finished_seq_ids, []
        out.removed_seq_ids, self._removed = self._removed, []
        out.blocks_to_swap_out, out.blocks_to_swap_in = self.kv.take_pending_swaps()
        out.blocks_to_copy = self.kv.take_pending_copies()
        out.preempted_seq_ids = [s.seq_id for s in preempted]
        self._record(out)
        return out

    def _admit(self, seq: Sequence, budget: int, can_swap_in: bool, lookahead: int = 0) -> int | None:
        """Room for a waiting sequence's next tokens: how many it computes this step, or None
        (nothing changed) if it cannot start now. A swapped-out sequence gets fresh blocks its
        KV is copied back into; any other starts after its longest prefix-cache hit, its prompt
        counted once, at its first admission. A sequence that samples this step also gets
        `lookahead` slots past its tokens (a draft model's proposals)."""
        if seq.status == SequenceStatus.SWAPPED:
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            extra = self._lookahead(seq, seq.num_computed_tokens, num_new, 0, lookahead)
            if not can_swap_in or not self.kv.swap_in(seq, num_new + extra):
                return None
            self.stats.num_swapped_in += 1
            return num_new
        hits, num_hit_tokens = self.kv.get_computed_blocks(seq)
        num_new = seq.num_tokens - num_hit_tokens
        if num_new > budget:
            if not self.enable_chunked_prefill:
                return None
            num_new = budget
        extra = self._lookahead(seq, num_hit_tokens, num_new, 0, lookahead)
        if not self.kv.allocate_slots(seq, num_new + extra, hits):
            return None
        if seq.status == SequenceStatus.WAITING:  # its first admission: count the prompt once
            seq.num_cached_tokens = num_hit_tokens
            self.kv.prefix_stats.record(seq.num_tokens, num_hit_tokens)
        seq.num_computed_tokens = num_hit_tokens
        return num_new

    def _speculating(self) -> bool:
        """Whether a step verifies proposals now: speculation is on, and no more sequences are
        enqueued (running or waiting, as vLLM counts for `disable_by_batch_size`) than that
        limit. Waiting ones count: a burst that will fill the batch turns speculation off from
        its first step, not after its prompts' proposals were paid for."""
        return self.num_spec_tokens > 0 and (self.spec_disable_by_batch_size is None
                                             or len(self.running) + len(self.waiting) <= self.spec_disable_by_batch_size)

    def _capped_drafts(self, seq: Sequence, budget: int) -> tuple[int, ...]:
        """The proposals a decode verifies this step: no more than the step's budget leaves
        room for, and never so many that the tokens it may emit (the accepted proposals and
        one of the target's) pass max_model_len or max_tokens."""
        room = min(budget, self.max_model_len - seq.num_tokens) - 1
        if seq.max_num_tokens is not None:
            room = min(room, seq.max_num_tokens - seq.num_tokens - 1)
        return tuple(seq.spec_token_ids[:max(room, 0)])

    def _lookahead(self, seq: Sequence, num_computed: int, num_new: int, num_drafts: int, lookahead: int) -> int:
        """KV slots past the step's tokens for a sequence that samples this step (where a draft
        model writes its proposals' KV), within max_model_len; none for beams."""
        if not lookahead or seq.beam_k or num_computed + num_new != seq.num_tokens + num_drafts:
            return 0
        return max(0, min(lookahead, self.max_model_len - num_computed - num_new))

    def _seqs_at_admission(self, seq: Sequence) -> int:
        """Sequences a waiting one becomes: itself, or its group's (unforked samples, beams)."""
        return 1 if seq.group is None else seq.group.seqs_at_admission(seq)

    def _preempt_for_waiting(self) -> list[Sequence]:
        """Priority policy: make room for the most urgent waiting sequence by preempting
        running ones of lower priority (a larger value) while it does not fit."""
        head = next((s for s in self.waiting if not _parked(s)), None)
        if head is None or head.status == SequenceStatus.SWAPPED:
            return []  # a swapped-out sequence comes back when blocks free up, preempting nobody
        need_seqs = self._seqs_at_admission(head)
        need_blocks = self.kv.num_blocks_needed(min(head.num_tokens, self.max_num_batched_tokens))
        preempted = []
        while self.running and self._key(self.running[-1]) > self._key(head) and (
                len(self.running) + need_seqs > self.max_num_seqs or need_blocks > self.kv.num_free_blocks):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
        return preempted

    def _scheduled(self, seq: Sequence, num_new: int, out: SchedulerOutput, drafts: tuple[int, ...] = (),
                   num_lookahead: int = 0) -> ScheduledSeq:
        """The step's entry for `seq`, and what the runner's batch must learn about it: all of
        it if the runner does not hold it, else only its new blocks and tokens."""
        sample = seq.num_computed_tokens + num_new == seq.num_tokens + len(drafts)
        forks = seq.group.forks(seq) if sample and seq.group is not None else ()
        if seq.seq_id not in self._in_runner:
            self._in_runner.add(seq.seq_id)
            self._runner_tokens.pop(seq.seq_id, None)
            out.new_seqs.append(NewSeq(seq.seq_id, seq.request_id, list(seq.token_ids), seq.prompt_len, seq.params,
                                       self.kv.runner_blocks(seq), seq.bad_words_ids, seq.beam_k,
                                       seq.num_prompt_logprobs))
        else:
            update = self.kv.block_update(seq)
            if update is not None:
                out.block_updates[seq.seq_id] = update
            tokens = self._runner_tokens.pop(seq.seq_id, None)
            if tokens:
                out.new_token_ids[seq.seq_id] = tokens
        return ScheduledSeq(seq.seq_id, seq.request_id, seq.num_computed_tokens, num_new, sample, forks, drafts,
                            num_lookahead)

    def _pick_victim(self) -> Sequence:
        """The last running sequence: the newest under fcfs; under the priority policy the
        running list is sorted, so the lowest priority (then the newest)."""
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Swap the sequence's KV out to host memory if that mode is on and there is room,
        else preempt by recompute: drop its KV; it re-enters the queue at the front and
        recomputes prompt + generated tokens (likely prefix-cache hits) when readmitted."""
        self.running.remove(seq)
        self._leave_runner(seq)
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        if (self.preemption_mode == "swap" and (seq.group is None or seq.group.swappable)
                and self.kv.can_swap_out(seq)):
            self.kv.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self._enqueue(self.waiting, seq, front=True)
            self.stats.num_swapped_out += 1
            return
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self._enqueue(self.waiting, seq, front=True)

    @property
    def num_swapped(self) -> int:
        """Waiting sequences whose KV is in the host pool."""
        return self.kv.num_swapped_seqs

    def _record(self, out: SchedulerOutput) -> None:
        st = self.stats
        st.num_running, st.num_waiting = len(self.running), len(self.waiting) - self.num_swapped
        st.last_batch_seqs = len(out.scheduled)
        st.last_batch_tokens = out.num_batched_tokens
        st.max_batch_seqs = max(st.max_batch_seqs, len(out.scheduled))
        if not all(map(_sample, out.scheduled)):  # a prompt computed only in part
            st.num_chunked_prefill_steps += 1

    # ------------------------------------------------------------------ update
    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[CoreOutput]:
        """Advance the scheduled sequences by what the step computed and sampled, and say what
        each produced. Token-level stops (max_tokens, max_model_len, EOS, stop_token_ids) are
        applied here; a sequence of a group hands its row to the group and applies what it
        decides."""
        outputs: list[CoreOutput] = []
        seqs, cache_computed_blocks = self._seqs, self.kv.cache_computed_blocks
        all_prompt_logprobs = result.prompt_logprobs
        token_ids, logprobs = result.token_ids, result.logprobs
        running = SequenceStatus.RUNNING
        row = 0  # the next item's first sampled row
        for item in out.scheduled:
            seq = seqs.get(item.seq_id)
            first = row  # its own row; its forks' rows follow
            if item.sample:
                row += 1 + len(item.forks)
            if seq is None or seq.status is not running:
                continue  # aborted while the step ran; its sampled tokens are dropped
            num_drafts = len(item.spec_token_ids)
            # The drafts' KV counts once verified, below (the hashes of blocks being cached
            # read the tokens, and the drafts are not tokens yet).
            seq.num_computed_tokens += item.num_new_tokens - num_drafts
            cache_computed_blocks(seq)
            if item.sample and (num_drafts or item.num_lookahead):
                self._settle_speculation(seq, num_drafts, token_ids[first])
            prompt_logprobs = all_prompt_logprobs.get(seq.seq_id) if all_prompt_logprobs else None
            if prompt_logprobs:
                seq.num_prompt_logprobs += len(prompt_logprobs)
            if not item.sample:
                if prompt_logprobs:
                    outputs.append(SeqOutput(seq.request_id, seq.seq_id, seq.index, [],
                                             new_prompt_logprobs=prompt_logprobs))
                continue
            if seq.group is None:
                outputs.append(self._append_tokens(seq, token_ids[first], logprobs[first], prompt_logprobs))
            else:
                self._apply(seq.group.on_sampled(seq, first, result), result, outputs, seq, prompt_logprobs)
            if num_drafts and seq.status is running:  # the accepted drafts' KV is the sequence's
                seq.num_computed_tokens = seq.num_tokens - 1
                cache_computed_blocks(seq)
        if result.spec_token_ids and out.propose:
            for seq_id, drafts in result.spec_token_ids.items():
                seq = seqs.get(seq_id)
                if seq is not None and seq.status is running:
                    seq.spec_token_ids = drafts
        return outputs

    def _settle_speculation(self, seq: Sequence, num_drafts: int, tokens: list[int]) -> None:
        """After a step that verified `num_drafts` proposals (or gave the sequence lookahead
        slots), before its tokens are appended: count what was accepted, and free the blocks
        past the slots whose KV is now the sequence's (its tokens but the newest, whose slot
        the next step allocates as any decode's). A block holding only rejected positions or
        unused lookahead must not stay: a fork (n > 1) would share it, and with no computed
        token in it, neither side would copy it before writing."""
        if num_drafts:
            self.spec_stats.record(num_drafts, len(tokens) - 1)
        self.kv.trim(seq, seq.num_tokens + len(tokens) - 1)

    def _apply(self, decisions: list[Decision], result: RunnerOutput, outputs: list[CoreOutput],
               seq: Sequence, prompt_logprobs: list[TokenLogprobs] | None) -> None:
        """Carry out a group's decisions, taken when `seq` sampled (its prompt logprobs go with
        its own sampled row, or alone when it has none)."""
        for d in decisions:
            if isinstance(d, Sample):
                own = d.seq is seq
                outputs.append(self._append_tokens(d.seq, result.token_ids[d.row], result.logprobs[d.row],
                                                   prompt_logprobs if own else None))
                if own:
                    prompt_logprobs = None
            elif isinstance(d, Fork):
                self._fork(d.parent, d.child)
            elif isinstance(d, Append):
                d.seq.token_ids.append(d.token)
                d.seq.cumulative_logprob = d.cumulative_logprob
                if d.seq.seq_id in self._in_runner:
                    self._runner_tokens.setdefault(d.seq.seq_id, []).append(d.token)
            elif isinstance(d, Drop):
                self._finish(d.seq, SequenceStatus.FINISHED_STOPPED)
                group_seqs = self.requests.get(d.seq.request_id)
                if group_seqs is not None:
                    group_seqs.remove(d.seq)
            elif isinstance(d, Done):
                outputs.append(d.result)
            else:
                raise TypeError(f"not a group decision: {d!r}")
        if prompt_logprobs:
            outputs.append(SeqOutput(seq.request_id, seq.seq_id, seq.index, [], new_prompt_logprobs=prompt_logprobs))

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` starts where `parent` is, sharing its blocks; if the parent is not running
        (a beam preempted after it reported), the child waits to recompute like its parent."""
        if child.seq_id not in self._seqs:  # a new sequence (a beam's branch), not a known sample
            self.requests[parent.request_id].append(child)
            self._seqs[child.seq_id] = child
        child.num_cached_tokens = parent.num_cached_tokens
        if parent.status == SequenceStatus.RUNNING:
            self.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            child.num_computed_tokens = 0
            child.status = parent.status
            self._enqueue(self.waiting, child, front=True)

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs] | None,
                       prompt_logprobs: list[TokenLogprobs] | None = None) -> SeqOutput:
        """Append a row's sampled tokens until one ends the sequence (the rest are dropped)."""
        reported = seq.reports_logprobs  # else the output's logprobs are None
        if len(tokens) == 1 and logprobs is None:  # the usual decode: the loop's outcome, without the loop
            token = tokens[0]
            seq.token_ids.append(token)
            kept, kept_logprobs = [token], ([] if reported else None)
            status, reason = self._check_stop(seq, token)
        else:
            kept, kept_logprobs = [], []
            status = reason = None
            for i, token in enumerate(tokens):
                seq.token_ids.append(token)
                kept.append(token)
                if logprobs is not None:
                    seq.cumulative_logprob += logprobs[i].logprob
                    kept_logprobs.append(logprobs[i])
                status, reason = self._check_stop(seq, token)
                if status is not None:
                    break
            if not reported:
                kept_logprobs = None
        # Positional, though long: keyword arguments cost ~1.5k instructions a call here, once
        # per sequence per step. (The two Nones are finish_reason and stop_reason.)
        out = SeqOutput(seq.request_id, seq.seq_id, seq.index, kept, kept_logprobs, seq.cumulative_logprob,
                        None, None, prompt_logprobs, seq.num_cached_tokens)
        if status is not None:
            seq.stop_reason = reason
            self._finish(seq, status)
            out.finish_reason, out.stop_reason = status.finish_reason, reason
        return out

    def _check_stop(self, seq: Sequence, token: int) -> tuple[SequenceStatus | None, int | None]:
        num_tokens = len(seq.token_ids)  # seq.num_tokens, and below seq.num_output_tokens, read once
        if (num_tokens < self.max_model_len and (seq.max_num_tokens is None or num_tokens < seq.max_num_tokens)
                and token not in seq.all_stop_token_ids):
            return None, None  # the usual answer, from the sequence alone: no length limit, no stop token
        params = seq.params
        num_output_tokens = num_tokens - seq.prompt_len
        if num_tokens >= self.max_model_len or (
            params.max_tokens is not None and num_output_tokens >= params.max_tokens
        ):
            return SequenceStatus.FINISHED_LENGTH, None
        if num_output_tokens < params.min_tokens:
            return None, None
        if token in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED, token
        if not params.ignore_eos and token in params._eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED, None
        return None, None

    def fail_step(self, out: SchedulerOutput) -> list[str]:
        """A step raised: fail the requests it computed (their KV is suspect); keep the rest."""
        failed = list(dict.fromkeys(item.request_id for item in out.scheduled))
        for request_id in failed:
            self.finish_request(request_id, SequenceStatus.FINISHED_ERROR)
        return failed

    def beam_group(self, request_id: str) -> BeamSearchGroup | None:
        seqs = self.requests.get(request_id)
        group = seqs[0].group if seqs else None
        return group if isinstance(group, BeamSearchGroup) else None

    def check_all_free(self) -> None:
        assert not self.running and not self.waiting, (self.running, self.waiting)
        assert not self._seqs, f"sequences still registered: {sorted(self._seqs)[:8]}"
        self.kv.check_all_free()

