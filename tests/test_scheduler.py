"""The scheduler with a fake model that really uses the paged KV cache: it writes each token
id into its (block, offset) slot and derives the next token from what it reads back through
the block table. Any mistake in allocation, sharing, copy-on-write, eviction or preemption
changes what is read back, and therefore the output."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.scheduler import Scheduler
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.step import RunnerOutput, SchedulerOutput

VOCAB = 1000


def next_token(context: list[int], sample_index: int) -> int:
    digest = hashlib.blake2b(repr((context, sample_index)).encode(), digest_size=4).digest()
    return 2 + int.from_bytes(digest, "little") % (VOCAB - 2)  # never 0/1 (EOS is 1 in these tests)


def reference(prompt: list[int], max_tokens: int, sample_index: int = 0) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, sample_index))
    return tokens[len(prompt):]


def sampled(out: SchedulerOutput, *tokens: int) -> RunnerOutput:
    rows = out.sampled_seq_ids()
    assert len(rows) == len(tokens)
    return RunnerOutput(rows, [[t] for t in tokens], [None] * len(tokens), [None] * len(tokens))


class FakeKVRunner:
    """A model runner that knows only what the steps tell it (plain data): it keeps its own
    copy of each sequence's tokens and block table from the diffs, writes every computed
    token into its (block, offset) slot and reads the context back through its table."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[tuple[int, int], int] = {}
        self.host_slots: dict[tuple[int, int], int | None] = {}
        self.copied_blocks = 0
        self.tokens_of: dict[int, list[int]] = {}
        self.table_of: dict[int, list[int]] = {}
        self.request_of: dict[int, str] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return sampled(out, *self.tokens(out))

    def apply(self, out: SchedulerOutput) -> None:
        for seq_id in out.removed_seq_ids:
            del self.tokens_of[seq_id], self.table_of[seq_id]
        for new in out.new_seqs:
            assert new.seq_id not in self.tokens_of
            self.tokens_of[new.seq_id] = list(new.token_ids)
            self.table_of[new.seq_id] = list(new.block_ids)
            self.request_of[new.seq_id] = new.request_id
        for seq_id, (start, ids) in out.block_updates.items():
            table = self.table_of[seq_id]
            assert start <= len(table)
            table[start:] = ids
        for seq_id, tokens in out.new_token_ids.items():
            self.tokens_of[seq_id] += tokens

    def tokens(self, out: SchedulerOutput) -> list[int]:
        self.apply(out)
        bs = self.block_size
        for dev, host in out.blocks_to_swap_out:
            for off in range(bs):
                self.host_slots[(host, off)] = self.slots.get((dev, off))
        for host, dev in out.blocks_to_swap_in:
            for off in range(bs):
                self.slots[(dev, off)] = self.host_slots.pop((host, off))
        for src, dst in out.blocks_to_copy:
            for off in range(bs):
                if (src, off) in self.slots:
                    self.slots[(dst, off)] = self.slots[(src, off)]
            self.copied_blocks += 1
        context_of: dict[int, list[int]] = {}
        for item in out.scheduled:
            tokens, table, start = self.tokens_of[item.seq_id], self.table_of[item.seq_id], item.num_computed_tokens
            assert len(table) * bs >= start + item.num_new_tokens and start + item.num_new_tokens <= len(tokens)
            for p in range(start, start + item.num_new_tokens):
                self.slots[(table[p // bs], p % bs)] = tokens[p]
        for item in out.scheduled:  # read back after the whole step wrote, as attention does
            if item.sample:
                tokens, table = self.tokens_of[item.seq_id], self.table_of[item.seq_id]
                end = item.num_computed_tokens + item.num_new_tokens
                assert end == len(tokens)
                ctx = [self.slots.get((table[p // bs], p % bs)) for p in range(end)]
                assert ctx == tokens[:end], f"KV cache corrupted for sequence {item.seq_id}"
                context_of[item.seq_id] = ctx
        result = []
        for item in out.scheduled:
            if item.sample:
                ctx = context_of[item.seq_id]
                own = next_token(ctx, self.sample_index(item.seq_id))
                result.append(own)
                result += [next_token(ctx, self.sample_index(f.seq_id)) for f in item.forks]
                self.tokens_of[item.seq_id].append(own)  # the runner appends what it samples
        return result

    def sample_index(self, seq_id: int) -> int:
        return self.index_of[seq_id]

    index_of: dict[int, int] = {}


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128,
         chunked=True, caching=True, policy="fcfs", mode="recompute", host_blocks=0):
    kv = KVCacheManager(num_blocks, block_size, caching, host_blocks)
    sched = Scheduler(kv, max_num_seqs, max_num_batched_tokens, max_model_len, chunked, policy, mode)
    return sched, FakeKVRunner(block_size)


def add(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int, n: int = 1, arrival: float = 0.0,
        priority: int = 0):
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0, _eos_token_ids=(1,))
    seqs = [Sequence(rid, prompt, params, arrival, index=i, priority=priority) for i in range(n)]
    sched.add_request(seqs)
    FakeKVRunner.index_of.update({s.seq_id: s.index for s in seqs})
    return seqs


def run(sched: Scheduler, runner: FakeKVRunner, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        out = sched.schedule()
        sched.update(out, runner.execute(out))
        outs.append(out)
    raise AssertionError("scheduler did not finish: livelock")


def test_running_requests_are_scheduled_before_waiting_ones():
    sched, runner = make(max_num_batched_tokens=16)
    add(sched, "a", list(range(10, 22)), 4)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    add(sched, "b", list(range(30, 60)), 4)
    out = sched.schedule()
    assert [i.request_id for i in out.scheduled] == ["a", "b"]
    assert [i.num_new_tokens for i in out.scheduled] == [1, 15]  # b gets what is left: a chunk
    assert not out.scheduled[1].sample
    sched.update(out, runner.execute(out))
    run(sched, runner)
    sched.check_all_free()


def test_long_prompt_is_split_into_chunks_within_the_token_budget():
    sched, runner = make(max_num_batched_tokens=8)
    (seq,) = add(sched, "a", list(range(100, 130)), 3)
    outs = run(sched, runner)
    assert all(o.num_batched_tokens <= 8 for o in outs)
    assert [o.scheduled[0].num_new_tokens for o in outs[:4]] == [8, 8, 8, 6]
    assert seq.output_token_ids == reference(list(range(100, 130)), 3)
    sched.check_all_free()


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room_for_all_of_it():
    sched, runner = make(max_num_batched_tokens=128, chunked=False)
    add(sched, "a", list(range(10, 20)), 5)
    add(sched, "b", list(range(30, 150)), 2)
    out = sched.schedule()
    assert [i.request_id for i in out.scheduled] == ["a"]  # b (120 tokens) does not fit beside a
    sched.update(out, runner.execute(out))
    run(sched, runner)
    sched.check_all_free()


def test_preemption_takes_the_newest_request_and_it_resumes_with_the_same_tokens():
    sched, runner = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, max_model_len=48)
    prompts = [list(range(k * 50, k * 50 + 9)) for k in range(4)]
    seqs = [add(sched, f"r{k}", p, 20, arrival=k)[0] for k, p in enumerate(prompts)]
    preempted = []
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        preempted += [runner.request_of[i] for i in out.preempted_seq_ids]
        sched.update(out, runner.execute(out))
    assert preempted, "the pool should have been too small for all four"
    assert "r0" not in preempted  # the oldest is never the victim while younger ones run
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference(prompt, 20)
        assert seq.status == SequenceStatus.FINISHED_LENGTH
    sched.check_all_free()


def test_prefix_cache_hit_skips_the_shared_blocks():
    sched, runner = make(block_size=4)
    shared = list(range(500, 520))
    add(sched, "a", shared + [1000 - 3], 2)
    run(sched, runner)
    (b,) = add(sched, "b", shared + [7, 8], 2)
    out = sched.schedule()
    assert b.num_cached_tokens == 20 and out.scheduled[0].num_new_tokens == 2
    sched.update(out, runner.execute(out))
    run(sched, runner)
    assert b.output_token_ids == reference(shared + [7, 8], 2)
    sched.check_all_free()


def test_reset_prefix_cache_forgets_blocks_only_when_idle():
    sched, runner = make(block_size=4)
    shared = list(range(500, 520))
    add(sched, "a", shared + [1], 2)
    out = sched.schedule()
    assert not sched.kv.reset_prefix_cache()  # "a" still holds its blocks
    sched.update(out, runner.execute(out))
    run(sched, runner)
    assert sched.kv.reset_prefix_cache()
    (b,) = add(sched, "b", shared + [7, 8], 2)
    out = sched.schedule()  # every step the scheduler plans reaches the runner
    assert b.num_cached_tokens == 0
    sched.update(out, runner.execute(out))
    run(sched, runner)
    sched.check_all_free()


def test_n_samples_fork_from_one_prefill_and_differ():
    sched, runner = make(block_size=4)
    prompt = list(range(40, 50))  # 2 full blocks + a partial one: forks must copy it on write
    seqs = add(sched, "a", prompt, 6, n=3)
    out = sched.schedule()
    assert len(out.scheduled) == 1 and len(out.scheduled[0].forks) == 2
    sched.update(out, runner.execute(out))
    shared = sched.kv.blocks(seqs[0])[:2]
    assert all(b.ref_cnt == 3 for b in shared)
    run(sched, runner)
    assert runner.copied_blocks == 2
    for i, seq in enumerate(seqs):
        assert seq.output_token_ids == reference(prompt, 6, sample_index=i)
    assert len({tuple(s.output_token_ids) for s in seqs}) == 3
    sched.check_all_free()


def test_eos_stops_only_after_min_tokens():
    sched, runner = make()
    params = SamplingParams(max_tokens=10, min_tokens=3, _eos_token_ids=(1,))
    seq = Sequence("a", [5, 6, 7], params, 0.0)
    sched.add_request([seq])
    out = sched.schedule()
    sched.update(out, sampled(out, 1))  # EOS as the first token (only a buggy sampler does this)
    assert not seq.is_finished
    for _ in range(2):
        out = sched.schedule()
        sched.update(out, sampled(out, 9))
    out = sched.schedule()
    sched.update(out, sampled(out, 1))
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.num_output_tokens == 4
    sched.check_all_free()


def test_abort_of_a_waiting_running_or_unforked_request_frees_everything():
    sched, runner = make(num_blocks=16, max_num_batched_tokens=16)
    add(sched, "a", list(range(10, 30)), 50, n=2)
    add(sched, "b", list(range(40, 45)), 50)
    add(sched, "c", list(range(60, 70)), 50)
    out = sched.schedule()  # a's first chunk only: its second sample is not forked yet
    sched.update(out, runner.execute(out))
    assert sched.finish_request("a", SequenceStatus.FINISHED_ABORTED)
    assert sched.finish_request("c", SequenceStatus.FINISHED_ABORTED)  # still waiting
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    assert sched.finish_request("b", SequenceStatus.FINISHED_ABORTED)  # running
    assert not sched.has_unfinished()
    sched.check_all_free()


requests_st = st.lists(
    st.tuples(
        st.integers(1, 40),  # prompt length
        st.integers(1, 12),  # max_tokens
        st.integers(1, 3),  # n
        st.integers(0, 2),  # which shared prefix
        st.integers(0, 3),  # priority
    ),
    min_size=1, max_size=10,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=requests_st,
    actions=st.lists(st.tuples(st.sampled_from(["step", "step", "step", "abort"]), st.integers(0, 9)), max_size=40),
    num_blocks=st.integers(16, 48),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(8, 64),
    max_num_seqs=st.integers(3, 8),
    chunked=st.booleans(),
    caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    host_blocks=st.sampled_from([0, 6, 64]),  # 0: preempt by recompute; else swap (6: often full)
)
def test_random_add_step_abort_keeps_outputs_exact_and_frees_every_block(
        requests, actions, num_blocks, block_size, budget, max_num_seqs, chunked, caching, policy, host_blocks):
    max_model_len = 56
    num_blocks = max(num_blocks, -(-max_model_len // block_size))
    if not chunked:
        budget = max(budget, max_model_len)
    budget = max(budget, max_num_seqs)
    mode = "swap" if host_blocks else "recompute"
    sched, runner = make(num_blocks, block_size, max_num_seqs, budget, max_model_len, chunked, caching,
                         policy, mode, host_blocks)
    prefixes = [list(range(2 + 100 * k, 2 + 100 * k + 40)) for k in range(3)]
    live: dict[str, tuple[list[Sequence], list[int], int]] = {}
    aborted: set[str] = set()
    pending = list(enumerate(requests))
    for action, which in actions:
        if pending:  # requests keep arriving while the engine runs
            i, (plen, max_tokens, n, prefix, prio) = pending.pop(0)
            prompt = prefixes[prefix][:plen]
            n = min(n, max_num_seqs)
            live[f"r{i}"] = (add(sched, f"r{i}", prompt, max_tokens, n, arrival=i, priority=prio), prompt, max_tokens)
        if action == "abort" and live:
            rid = sorted(live)[which % len(live)]
            sched.finish_request(rid, SequenceStatus.FINISHED_ABORTED)
            aborted.add(rid)
        elif sched.has_unfinished():
            out = sched.schedule()
            sched.update(out, runner.execute(out))
    for i, (plen, max_tokens, n, prefix, prio) in pending:
        prompt = prefixes[prefix][:plen]
        live[f"r{i}"] = (add(sched, f"r{i}", prompt, max_tokens, min(n, max_num_seqs), arrival=i, priority=prio),
                         prompt, max_tokens)
    run(sched, runner)
    event(f"preempted={sched.stats.num_preemptions > 0} swapped={sched.stats.num_swapped_out > 0}")
    for rid, (seqs, prompt, max_tokens) in live.items():
        if rid in aborted:
            continue
        for seq in seqs:
            assert seq.status == SequenceStatus.FINISHED_LENGTH
            expect = reference(prompt, max_tokens, seq.index)[: max_model_len - len(prompt)]
            assert seq.output_token_ids == expect
    sched.check_all_free()


def test_request_id_reuse_is_rejected_while_in_flight():
    sched, _ = make()
    add(sched, "a", [3, 4], 2)
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "a", [3, 4], 2)
    sched.finish_request("a", SequenceStatus.FINISHED_ABORTED)
    sched.check_all_free()


def test_swap_preemption_copies_blocks_out_and_back_and_resumes_with_the_same_tokens():
    sched, runner = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, max_model_len=48,
                         mode="swap", host_blocks=40)
    prompts = [list(range(k * 50, k * 50 + 9)) for k in range(4)]
    seqs = [add(sched, f"r{k}", p, 20, arrival=k)[0] for k, p in enumerate(prompts)]
    swapped_out = swapped_in = 0
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert not (out.blocks_to_swap_out and out.blocks_to_swap_in)  # never in one step
        swapped_out += len(out.blocks_to_swap_out)
        swapped_in += len(out.blocks_to_swap_in)
        sched.update(out, runner.execute(out))
    assert swapped_out and swapped_in == swapped_out
    assert sched.stats.num_swapped_out > 0 and sched.stats.num_swapped_out == sched.stats.num_swapped_in
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference(prompt, 20)
    sched.check_all_free()


def test_swapped_and_preempted_sequences_wait_in_one_queue_oldest_first_ahead_of_new_ones():
    sched, runner = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, max_model_len=48,
                         mode="swap", host_blocks=40)
    prompts = [list(range(k * 50, k * 50 + 9)) for k in range(5)]
    seqs = [add(sched, f"r{k}", p, 20, arrival=k)[0] for k, p in enumerate(prompts)]
    saw_swapped = 0
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        waiting = list(sched.waiting)
        resumed = [s for s in waiting if s.status != SequenceStatus.WAITING]
        assert waiting[:len(resumed)] == resumed  # nothing new overtakes a preempted sequence
        assert resumed == sorted(resumed, key=lambda s: s.arrival_time)  # fcfs: the oldest comes back first
        swapped = [s for s in waiting if s.status == SequenceStatus.SWAPPED]
        assert sched.num_swapped == len(swapped) == sched.kv.num_swapped_seqs
        saw_swapped = max(saw_swapped, len(swapped))
        sched.update(out, runner.execute(out))
    assert saw_swapped >= 2
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference(prompt, 20)
    sched.check_all_free()


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full():
    sched, runner = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, max_model_len=48,
                         mode="swap", host_blocks=2)  # smaller than any victim
    prompts = [list(range(k * 50, k * 50 + 9)) for k in range(4)]
    seqs = [add(sched, f"r{k}", p, 20, arrival=k)[0] for k, p in enumerate(prompts)]
    run(sched, runner)
    assert sched.stats.num_preemptions > 0 and sched.stats.num_swapped_out == 0
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference(prompt, 20)
    sched.check_all_free()


def test_priority_policy_preempts_the_lowest_priority_not_the_newest():
    sched, runner = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, max_model_len=48, policy="priority")
    prompts = [list(range(k * 50, k * 50 + 9)) for k in range(4)]
    priorities = [0, 5, 1, 0]  # r1 (arrived second) is the least important
    seqs = [add(sched, f"r{k}", p, 20, arrival=k, priority=pr)[0] for k, (p, pr) in enumerate(zip(prompts, priorities))]
    first_victims = []
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        first_victims += [runner.request_of[i] for i in out.preempted_seq_ids]
        sched.update(out, runner.execute(out))
    assert first_victims and first_victims[0] == "r1"
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference(prompt, 20)
    sched.check_all_free()


def test_urgent_request_preempts_a_less_urgent_running_one_to_start_now():
    sched, runner = make(num_blocks=10, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=40,
                         policy="priority")
    (low,) = add(sched, "low", list(range(100, 120)), 15, arrival=0, priority=3)
    (mid,) = add(sched, "mid", list(range(200, 210)), 15, arrival=1, priority=2)
    for _ in range(3):
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    assert {s.request_id for s in sched.running} == {"low", "mid"}  # max_num_seqs reached
    (urgent,) = add(sched, "urgent", list(range(300, 305)), 5, arrival=2, priority=0)
    out = sched.schedule()
    assert [runner.request_of[i] for i in out.preempted_seq_ids] == ["low"]
    assert "urgent" in [i.request_id for i in out.scheduled]
    sched.update(out, runner.execute(out))
    run(sched, runner)
    for seq, prompt, n in ((low, list(range(100, 120)), 15), (mid, list(range(200, 210)), 15),
                           (urgent, list(range(300, 305)), 5)):
        assert seq.output_token_ids == reference(prompt, n)
    sched.check_all_free()


def test_priority_orders_admission_and_fcfs_ignores_it():
    for policy, expected in (("priority", ["b", "c", "a"]), ("fcfs", ["a", "b", "c"])):
        sched, runner = make(max_num_seqs=1, policy=policy)
        for k, (rid, prio) in enumerate((("a", 2), ("b", 0), ("c", 1))):
            add(sched, rid, [10 + k, 11, 12], 2, arrival=k, priority=prio)
        order = []
        for out in run(sched, runner):
            for item in out.scheduled:
                if item.request_id not in order:
                    order.append(item.request_id)
        assert order == expected
        sched.check_all_free()
