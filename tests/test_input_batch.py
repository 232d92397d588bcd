"""The runner's persistent batch, driven by the real scheduler through random adds, steps,
aborts and preemptions: every step, the inputs it gathers from its slots (updated only by the
step's plain-data diffs) equal the inputs rebuilt from scratch from the scheduler's own
sequences, and its per-row sampling settings equal those read from the sequences."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedbackend.input_batch import InputBatch
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.scheduler import Scheduler
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.step import RunnerOutput

VOCAB = 500
MAX_MODEL_LEN = 64


def rebuild(sched: Scheduler, out, block_size: int) -> dict[str, np.ndarray]:
    """The step's inputs from the live sequences, the way the runner used to build them."""
    items = out.scheduled
    seqs = [sched.seq(it.seq_id) for it in items]
    order = sorted((i for i, it in enumerate(items) if it.num_new_tokens == 1), key=lambda i: items[i].num_computed_tokens)
    order += [i for i, it in enumerate(items) if it.num_new_tokens != 1]
    input_ids, positions, slots, qsl, seq_lens, tables = [], [], [], [0], [], []
    for i in order:
        it, seq = items[i], seqs[i]
        ids = sched.kv.block_ids(seq)
        for p in range(it.num_computed_tokens, it.num_computed_tokens + it.num_new_tokens):
            input_ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(ids[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + it.num_new_tokens)
        seq_lens.append(it.num_computed_tokens + it.num_new_tokens)
        tables.append(ids)
    width = max(-(-n // block_size) for n in seq_lens)
    block_tables = np.zeros((len(order), width), dtype=np.int32)
    for r, ids in enumerate(tables):
        block_tables[r, :min(width, len(ids))] = ids[:width]
    row_of_item = {i: r for r, i in enumerate(order)}
    logits = [qsl[row_of_item[i] + 1] - 1 for i, it in enumerate(items) if it.sample for _ in range(1 + len(it.forks))]
    return {"input_ids": np.array(input_ids), "positions": np.array(positions), "slot_mapping": np.array(slots),
            "query_start_loc": np.array(qsl), "seq_lens": np.array(seq_lens), "block_tables": block_tables,
            "logits_indices": np.array(logits, dtype=np.int64)}


def random_params(rng: random.Random, n: int) -> SamplingParams:
    greedy = rng.random() < 0.4
    max_tokens = rng.randint(1, 12)
    return SamplingParams(n=n, temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.3]),
                          top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.1]),
                          seed=rng.choice([None, rng.randrange(1000)]), max_tokens=max_tokens,
                          min_tokens=min(max_tokens, rng.choice([0, 0, 2])), presence_penalty=rng.choice([0.0, 0.5]),
                          ignore_eos=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), num_blocks=st.integers(10, 40), block_size=st.sampled_from([2, 4, 8]),
       budget=st.integers(8, 48), max_num_seqs=st.integers(2, 6), caching=st.booleans(),
       swap=st.booleans(), actions=st.lists(st.sampled_from(["add", "step", "step", "step", "abort"]),
                                            min_size=5, max_size=60))
def test_persistent_batch_inputs_equal_a_rebuild_from_scratch_every_step(seed, num_blocks, block_size, budget,
                                                                         max_num_seqs, caching, swap, actions):
    from pagedbackend.sampler import Sampler

    rng = random.Random(seed)
    num_blocks = max(num_blocks, -(-MAX_MODEL_LEN // block_size))
    budget = max(budget, max_num_seqs)
    kv = KVCacheManager(num_blocks, block_size, caching, 12 if swap else 0)
    sched = Scheduler(kv, max_num_seqs, budget, MAX_MODEL_LEN, True, "fcfs", "swap" if swap else "recompute")
    batch = InputBatch(max_num_seqs, MAX_MODEL_LEN, block_size, VOCAB)
    sampler = Sampler("cpu", 0)
    shared = [rng.randrange(2, VOCAB) for _ in range(24)]
    next_id = 0
    live: list[str] = []

    def step() -> None:
        out = sched.schedule()
        batch.apply(out)
        if not out.scheduled:
            sched.update(out, RunnerOutput.empty())
            return
        got = batch.prepare(out)
        want = rebuild(sched, out, block_size)
        for name, expected in want.items():
            assert np.array_equal(getattr(got, name), expected), name
        # Per-row sampling settings gathered from slots equal those read from the sequences.
        rows = out.sampled_seq_ids()
        fork_params = {f.seq_id: f.params for it in out.scheduled for f in it.forks}
        seqs = []
        for seq_id, slot in zip(rows, got.sample_slots.tolist()):
            seq = sched.seq(seq_id)
            seqs.append(seq)
            assert batch.params[slot] is (seq.params if seq_id not in fork_params else batch.params[slot])
        reference = sampler.make_batch(seqs, VOCAB)
        b = batch
        slots = got.sample_slots
        for name in ("temperature", "top_p", "min_p"):
            attr = {"temperature": "temperatures"}.get(name, name)
            ref = getattr(reference, attr)
            mine = getattr(b, name)[slots]
            assert ref is None and np.all(mine == (1.0 if name != "min_p" else 0.0)) or np.allclose(ref.numpy(), mine)
        assert np.array_equal(reference.greedy.numpy(), b.greedy[slots])
        tokens = [rng.randrange(2, VOCAB) for _ in rows]
        own = []
        r = 0
        for it in out.scheduled:
            if it.sample:
                own.append((batch.slot_of[it.seq_id], tokens[r]))
                r += 1 + len(it.forks)
        batch.append_sampled(np.array([s for s, _ in own], dtype=np.int64), np.array([t for _, t in own], dtype=np.int32))
        sched.update(out, RunnerOutput(rows, [[t] for t in tokens], [None] * len(rows), [None] * len(rows)))
        for seq_id, slot in batch.slot_of.items():  # the batch's own copy of the tokens is right
            seq = sched.seq(seq_id)
            if seq is not None and not seq.is_finished:
                n = int(batch.num_tokens[slot])
                assert batch.token_ids[slot, :n].tolist() == seq.token_ids[:n]

    for action in actions:
        if action == "add":
            n = rng.choice([1, 1, 2, 3])
            n = min(n, max_num_seqs)
            prompt = shared[:rng.randint(0, 24)] + [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 20))]
            params = random_params(rng, n)
            rid = f"r{next_id}"
            next_id += 1
            seqs = [Sequence(rid, prompt, params.clone(seed=None if params.seed is None else params.seed + i),
                             float(next_id), index=i) for i in range(n)]
            sched.add_request(seqs)
            live.append(rid)
        elif action == "abort" and live:
            sched.finish_request(live.pop(rng.randrange(len(live))), SequenceStatus.FINISHED_ABORTED)
        elif sched.has_unfinished():
            step()
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        step()
    out = sched.schedule()  # the last removals reach the batch too
    batch.apply(out)
    assert not batch.slot_of
    sched.check_all_free()


def test_the_batch_grows_past_its_first_capacity():
    batch = InputBatch(1, 16, 4, VOCAB)
    from pagedbackend.step import NewSeq

    for i in range(3):
        batch.add(NewSeq(i, f"r{i}", [5, 6, 7 + i], 3, SamplingParams(), [i]))
    assert batch.capacity >= 3 and [batch.token_ids[batch.slot_of[i], 2] for i in range(3)] == [7, 8, 9]
    with pytest.raises(RuntimeError, match="already in the batch"):
        batch.add(NewSeq(0, "r0", [1], 1, SamplingParams(), [0]))
