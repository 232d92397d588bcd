"""The host-side shortcuts of a decode step decide exactly what the general code decides: the
same random workload (forks, shared prefixes, preemption by recompute and by swap, chunked
prefill, stop tokens, min_tokens, aborts) is run twice, once with the shortcuts switched off
(the scheduler's decode fast path, the one-token append, the stop check's early answer, the
prefix cache's early return), and every step's SchedulerOutput and every output must be
equal. The runner's side (the persistent batch's decode-only inputs, the sampler's argmax, the
torch backend's cache rows computed on the host) is checked against the general code too."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagedbackend.sequence as sequence_module
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.scheduler import Scheduler
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.step import SeqOutput
from test_scheduler import VOCAB, FakeKVRunner


def general_check_stop(self, seq, token):
    """Scheduler._check_stop without its early answer (the stop rules, read from params)."""
    params = seq.params
    if seq.num_tokens >= self.max_model_len or (
            params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens):
        return SequenceStatus.FINISHED_LENGTH, None
    if seq.num_output_tokens < params.min_tokens:
        return None, None
    if token in params.stop_token_ids:
        return SequenceStatus.FINISHED_STOPPED, token
    if not params.ignore_eos and token in params._eos_token_ids:
        return SequenceStatus.FINISHED_STOPPED, None
    return None, None


def general_append_tokens(self, seq, tokens, logprobs, prompt_logprobs=None):
    """Scheduler._append_tokens as the loop alone, for every row."""
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
    out = SeqOutput(seq.request_id, seq.seq_id, seq.index, kept,
                    kept_logprobs if seq.params.logprobs is not None else None, seq.cumulative_logprob,
                    new_prompt_logprobs=prompt_logprobs, num_cached_tokens=seq.num_cached_tokens)
    if status is not None:
        seq.stop_reason = reason
        self._finish(seq, status)
        out.finish_reason, out.stop_reason = status.finish_reason, reason
    return out


def general_cache_computed_blocks(self, seq):
    """KVCacheManager.cache_computed_blocks without its early return."""
    if not self.enable_caching:
        return
    blocks = self._blocks.get(seq.seq_id)
    if not blocks:
        return
    num_full = min(seq.num_computed_tokens // self.block_size, len(blocks))
    start = self._num_cached.get(seq.seq_id, 0)
    if num_full <= start:
        return
    self._extend_hashes(seq, num_full * self.block_size)
    for i in range(start, num_full):
        self.pool.cache_block(blocks[i], seq.block_hashes[i])
    self._num_cached[seq.seq_id] = num_full


def run_workload(seed: int, block_size: int, num_blocks: int, budget: int, caching: bool, swap: bool) -> list:
    """Every step's (SchedulerOutput, outputs) for a random workload; sequence ids start at the
    same number each run, so two runs are comparable field by field."""
    sequence_module._seq_ids = itertools.count(10**6)
    rng = random.Random(seed)
    max_model_len = 64
    kv = KVCacheManager(max(num_blocks, -(-max_model_len // block_size)), block_size, caching, 16 if swap else 0)
    sched = Scheduler(kv, 6, max(budget, 6), max_model_len, True, "fcfs", "swap" if swap else "recompute")
    runner = FakeKVRunner(block_size)
    shared = [rng.randrange(2, VOCAB) for _ in range(20)]
    steps, live, next_id = [], [], 0
    for _ in range(400):
        action = rng.random()
        if action < 0.15 and next_id < 14:
            n = rng.choice([1, 1, 1, 2, 3])
            prompt = shared[:rng.randint(0, 20)] + [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 12))]
            max_tokens = rng.randint(1, 30)
            params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens,
                                    min_tokens=rng.choice([0, 0, min(3, max_tokens)]),
                                    stop_token_ids=rng.sample(range(2, VOCAB), rng.choice([0, 20, 60])),
                                    ignore_eos=rng.random() < 0.5, _eos_token_ids=(1,))
            rid = f"r{next_id}"
            next_id += 1
            seqs = [Sequence(rid, prompt, params, float(next_id), index=i) for i in range(n)]
            sched.add_request(seqs)
            FakeKVRunner.index_of.update({s.seq_id: s.index for s in seqs})
            live.append(rid)
        elif action < 0.18 and live:
            sched.finish_request(live.pop(rng.randrange(len(live))), SequenceStatus.FINISHED_ABORTED)
        elif action < 0.20 and sched.running:
            sched.abort_seqs([rng.choice(sched.running).seq_id])  # as a stop string would
        elif sched.has_unfinished():
            steps.append(step(sched, runner))
    for _ in range(2000):  # then to the end
        if not sched.has_unfinished():
            break
        steps.append(step(sched, runner))
    steps.append(step(sched, runner))  # the last removals and finished ids
    sched.check_all_free()
    return steps


def step(sched: Scheduler, runner: FakeKVRunner) -> tuple:
    out = sched.schedule()
    return out, sched.update(out, runner.execute(out))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(8, 40),
       budget=st.integers(6, 40), caching=st.booleans(), swap=st.booleans())
def test_the_scheduler_decides_the_same_with_and_without_its_fast_paths(seed, block_size, num_blocks, budget,
                                                                        caching, swap):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sequence_module, "_seq_ids", sequence_module._seq_ids)  # restored afterwards
        fast = run_workload(seed, block_size, num_blocks, budget, caching, swap)
        mp.setattr(KVCacheManager, "fits_next_token", lambda self, seq: False)
        mp.setattr(KVCacheManager, "cache_computed_blocks", general_cache_computed_blocks)
        mp.setattr(Scheduler, "_check_stop", general_check_stop)
        mp.setattr(Scheduler, "_append_tokens", general_append_tokens)
        general = run_workload(seed, block_size, num_blocks, budget, caching, swap)
    assert len(fast) == len(general)
    for i, (a, b) in enumerate(zip(fast, general)):
        assert a == b, f"step {i} differs"


def test_the_fast_path_really_runs():
    """Most decode steps of a plain sequence take the shortcut (else the test above proves little)."""
    kv = KVCacheManager(64, 4, True)
    sched = Scheduler(kv, 4, 64, 64)
    runner = FakeKVRunner(4)
    seqs = [Sequence("r", list(range(2, 9)), SamplingParams(max_tokens=20, ignore_eos=True), 0.0)]
    sched.add_request(seqs)
    FakeKVRunner.index_of[seqs[0].seq_id] = 0
    calls = []
    original = KVCacheManager.allocate_slots

    def counted(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCacheManager, "allocate_slots", counted)
        steps = 0
        while sched.has_unfinished():
            out = sched.schedule()
            sched.update(out, runner.execute(out))
            steps += 1
    assert steps == 20 and len(calls) <= 1 + -(-(7 + 20) // 4)  # the prompt, then one call per new block


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 33), (256, 2048)])
def test_the_samplers_argmax_is_torchs(rows, cols):
    from pagedbackend.sampler import _row_argmax

    g = torch.Generator().manual_seed(rows * cols)
    for case in range(6):
        x = torch.randint(-3, 3, (rows, cols), generator=g).float()  # many ties
        if case == 1:
            x[torch.rand(rows, cols, generator=g) < 0.1] = float("nan")
        if case == 2:
            x[torch.rand(rows, cols, generator=g) < 0.5] = float("-inf")
        if case == 3:
            x[:] = float("-inf")
        if case == 4:
            x = torch.randn(cols, rows, generator=g).t()  # a strided view
        got, want = _row_argmax(x), x.argmax(dim=-1)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_decode_only_inputs_equal_the_general_paths():
    """The persistent batch's decode-only inputs equal what its general path computes for the
    same step (the general path forced by one extra prompt chunk, then dropped)."""
    from pagedbackend.input_batch import InputBatch
    from pagedbackend.step import NewSeq, ScheduledSeq, SchedulerOutput

    rng = np.random.default_rng(0)
    batch = InputBatch(8, 64, 4, VOCAB)
    lens = [5, 17, 3, 40, 17, 9]
    for i, n in enumerate(lens):
        batch.add(NewSeq(i, f"r{i}", rng.integers(2, VOCAB, n).tolist(), n, SamplingParams(),
                         rng.permutation(40)[:-(-(n + 1) // 4)].tolist()))
    decodes = [ScheduledSeq(i, f"r{i}", n - 1, 1, True) for i, n in enumerate(lens)]
    fast = batch.prepare(SchedulerOutput(decodes))
    batch.add(NewSeq(99, "chunk", rng.integers(2, VOCAB, 8).tolist(), 8, SamplingParams(), [41, 42]))
    general = batch.prepare(SchedulerOutput(decodes + [ScheduledSeq(99, "chunk", 0, 8, False)]))
    n = len(lens)
    assert fast.num_decodes == general.num_decodes == n
    for name in ("input_ids", "positions", "slot_mapping"):
        assert np.array_equal(getattr(fast, name), getattr(general, name)[:n]), name
    assert np.array_equal(fast.query_start_loc, general.query_start_loc[:n + 1])
    assert np.array_equal(fast.seq_lens, general.seq_lens[:n])
    width = fast.block_tables.shape[1]
    assert np.array_equal(fast.block_tables, general.block_tables[:n, :width])
    for name in ("logits_indices", "sample_slots", "own_rows"):
        assert np.array_equal(getattr(fast, name), getattr(general, name)), name
        assert getattr(fast, name).dtype == getattr(general, name).dtype == np.int64


@pytest.mark.parametrize("num_kv_heads,block_size", [(1, 16), (2, 16), (8, 32), (3, 1)])
def test_the_torch_backends_host_write_rows_equal_the_layouts(num_kv_heads, block_size):
    """The torch backend computes the cache rows of a CPU step in numpy: the same values, dtype
    and order as kernels/layout.py's slot_to_rows (negative padding slots included)."""
    from pagedbackend.attention.torch_backend import _write_rows
    from pagedbackend.kernels.layout import slot_to_rows

    g = torch.Generator().manual_seed(num_kv_heads * block_size)
    slots = torch.cat([torch.randint(0, 5000, (300,), generator=g), torch.tensor([0, block_size - 1, block_size, -1])])
    got, want = _write_rows(slots, num_kv_heads, block_size), slot_to_rows(slots, num_kv_heads, block_size)
    assert got.dtype == want.dtype and torch.equal(got, want)
