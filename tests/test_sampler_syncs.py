"""The sampler waits for the device once per step, and its shortcuts give the same results.

On an accelerator the host queues a step's kernels and runs ahead; every read of a tensor's
value (`.item()`, `int(t)`, `if t.any()`, `.tolist()`, `.cpu()`) and every blocking copy to
the device (`torch.tensor(list, device=...)`, indexing with a Python list) makes it wait for
everything queued so far. These tests run the sampler's accelerator code path on the CPU
(`host_fast_paths=False`) and count those events: `aten::_local_scalar_dense` is what every
scalar read calls; `aten::lift_fresh` is how a tensor built from Python data enters (the
source of a blocking copy); ops whose output size depends on the data (`nonzero`, a boolean
mask index) read it back too. Where CUDA is present the same batch runs under
`torch.cuda.set_sync_debug_mode`, which reports every synchronising call the device sees.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagedbackend import SamplingParams
from pagedbackend.input_batch import RowView
from pagedbackend.host_upload import HostUpload
from pagedbackend.sampler import PenaltyState, PromptLogprobRequest, Sampler, gather_logprobs
from pagedbackend.sequence import Sequence

VOCAB = 500

# Ops whose output shape depends on tensor values: on CUDA each reads a count back to the host.
_DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default",
                   "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor", "aten.unique_dim.default"}


class _Syncs(TorchDispatchMode):
    """Counts, while active, what would make the host wait for a device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._from_cpu: list[torch.Tensor] = []  # results of .cpu(): reading them is not another wait
        self._patches: list[tuple[str, Any]] = []
        self._in_from_numpy = False  # wrapping a host array is no copy (what it is sent with is counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            self.counts["scalar read"] += 1
        elif name == "aten.lift_fresh.default" and not self._in_from_numpy:
            self.counts["tensor from python data"] += 1
        elif name in _DATA_DEPENDENT:
            self.counts["data-dependent shape"] += 1
        elif name.startswith(("aten.index.", "aten.index_put")):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.counts["data-dependent shape"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counts, from_cpu = self.counts, self._from_cpu

        def wrap(name: str, kind: str, returns_host: bool = False):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, **k):
                if not (name == "numpy" and any(t is h for h in from_cpu)):
                    counts[kind] += 1
                out = original(t, *a, **k)
                if returns_host:
                    from_cpu.append(out)
                return out

            self._patches.append((name, original))
            setattr(torch.Tensor, name, counted)

        wrap("cpu", "device to host", returns_host=True)
        wrap("tolist", "device to host")
        wrap("numpy", "device to host")
        original_to = torch.Tensor.to

        def to(t, *a, **k):
            target = [x for x in (*a, k.get("device")) if isinstance(x, (torch.device, str))]
            if target:
                counts["host to device" if k.get("non_blocking") else "blocking copy"] += 1
            return original_to(t, *a, **k)

        self._patches.append(("to", original_to))
        torch.Tensor.to = to
        self._from_numpy = torch.from_numpy

        def from_numpy(a):
            self._in_from_numpy = True
            try:
                return self._from_numpy(a)
            finally:
                self._in_from_numpy = False

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in reversed(self._patches):
            setattr(torch.Tensor, name, original)
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)


def _seq(params: SamplingParams, prompt: list[int], output: list[int], bad_words=(), beam_k: int = 0) -> Any:
    seq = Sequence("r", prompt, params, 0.0)
    seq.token_ids.extend(output)
    if beam_k:
        return RowView(seq.seq_id, params, len(prompt), list(seq.token_ids), list(bad_words), beam_k)
    seq.bad_words_ids = list(bad_words)
    return seq


def _mixed_batch() -> list[Any]:
    """Every kind of row the sampler treats differently, in one batch."""
    eos = SamplingParams(temperature=0, max_tokens=50, min_tokens=5, stop_token_ids=[7])
    return [
        _seq(SamplingParams(temperature=0, max_tokens=50), [1, 2, 3], [4]),  # greedy
        _seq(SamplingParams(temperature=0.8, seed=11, max_tokens=50), [5, 6], []),  # seeded
        _seq(SamplingParams(temperature=1.0, top_k=20, max_tokens=50), [1], [9, 9]),  # top-k
        _seq(SamplingParams(temperature=1.0, top_p=0.8, max_tokens=50), [2], [3]),  # top-p, no top-k: a sort
        _seq(SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, max_tokens=50), [3], []),
        _seq(SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                            max_tokens=50), [1, 2, 2], [2, 8, 8]),  # penalties
        _seq(SamplingParams(temperature=0.7, logprobs=3, seed=5, max_tokens=50), [4], [1]),  # logprobs
        _seq(SamplingParams(temperature=0, logprobs=0, logit_bias={3: 4.0}, max_tokens=50), [4], []),
        _seq(SamplingParams(temperature=1.0, allowed_token_ids=[10, 11, 12], max_tokens=50), [4], []),
        _seq(eos, [4], [], bad_words=[[12], [4, 13]]),  # min_tokens ban and bad words
        _seq(SamplingParams(temperature=0, max_tokens=50), [8, 9], [], beam_k=4),  # a beam
    ]


def _device_path_sampler(seed: int = 0) -> Sampler:
    return Sampler("cpu", seed, host_fast_paths=False)


def test_a_mixed_batch_reads_the_device_back_once_and_never_blocks_on_a_copy():
    sampler = _device_path_sampler()
    seqs = _mixed_batch()
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # the penalty counts: built the first step, updated after
        logits = torch.randn(len(seqs), VOCAB, generator=g)
        with _Syncs() as syncs:
            out = sampler(logits, sampler.make_batch(seqs, VOCAB))
        assert dict(syncs.counts) == {"device to host": 1, "host to device": 1}, f"step {step}"
        for seq, token in zip(seqs, out.tokens):
            seq.token_ids.append(token if token >= 0 else 1)
    assert out.tokens[-1] == -1 and out.beam_candidates[-1] is not None
    assert out.logprobs[6] is not None and len(out.logprobs[6].top) == 3


@pytest.mark.parametrize("kind", ["greedy", "sampled", "top-k", "top-p"])
def test_a_plain_batch_reads_the_device_back_once(kind):
    params = {"greedy": SamplingParams(temperature=0), "sampled": SamplingParams(temperature=1.0),
              "top-k": SamplingParams(temperature=1.0, top_k=5), "top-p": SamplingParams(top_p=0.5)}[kind]
    sampler = _device_path_sampler()
    seqs = [_seq(params, [1, 2], []) for _ in range(8)]
    with _Syncs() as syncs:
        sampler(torch.randn(8, VOCAB), sampler.make_batch(seqs, VOCAB))
    assert dict(syncs.counts) == {"device to host": 1, "host to device": 1}


def test_prompt_logprobs_are_read_back_in_one_copy():
    logprobs = torch.log_softmax(torch.randn(6, VOCAB), dim=-1)
    chosen = torch.tensor([1, 2, 3, 4, 5, 6])
    with _Syncs() as syncs:
        gather_logprobs(logprobs, chosen, [0, 2, 5, 0, 1, 3])
    assert dict(syncs.counts) == {"device to host": 1}


def test_prompt_logprobs_passed_to_the_sampler_share_its_one_copy_and_equal_gather_logprobs():
    sampler = _device_path_sampler()
    seqs = _mixed_batch()
    prompt_lp = torch.log_softmax(torch.randn(5, VOCAB), dim=-1)
    targets = torch.tensor([3, 1, 4, 1, 5])
    request = PromptLogprobRequest(prompt_lp, targets, [2, 0, 1, 3, 2], [(101, 2), (102, 3)])
    logits = torch.randn(len(seqs), VOCAB)
    with _Syncs() as syncs:
        out = sampler(logits, sampler.make_batch(seqs, VOCAB), request)
    assert dict(syncs.counts) == {"device to host": 1, "host to device": 1}
    expected = gather_logprobs(prompt_lp, targets, [2, 0, 1, 3, 2])
    assert out.prompt_logprobs == {101: expected[:2], 102: expected[2:]}
    assert [e.token for e in expected] == [3, 1, 4, 1, 5]
    row, token = prompt_lp[3], 1
    assert expected[3].logprob == row[token].item() and expected[3].rank == int((row > row[token]).sum()) + 1
    assert list(expected[3].top) == row.topk(3).indices.tolist()
    assert out.beam_candidates[10] is not None and out.logprobs[6] is not None


def test_the_sync_counter_sees_the_syncs_it_is_meant_to_catch():
    x = torch.randn(4)
    with _Syncs() as syncs:
        int(x.argmax())
        bool((x > 0).any())
        x[[0, 1]]
        x[x > 0]
        x.tolist()
        x.to("cpu")
    assert syncs.counts == Counter({"scalar read": 2, "tensor from python data": 1, "data-dependent shape": 1,
                                    "device to host": 1, "blocking copy": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_mixed_batch_synchronises_once():
    sampler = Sampler("cuda", 0)
    seqs = _mixed_batch()
    logits = torch.randn(len(seqs), VOCAB, device="cuda")
    sampler(logits.clone(), sampler.make_batch(seqs, VOCAB))  # warm-up: pinned buffers, penalty rows
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler(logits.clone(), sampler.make_batch(seqs, VOCAB))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


# ------------------------------------------------------------------ same results
def _reference_probs(logits: torch.Tensor, temps, top_k, top_p, min_p) -> torch.Tensor:
    """The filters as a full-vocabulary sort computes them, one row at a time (each row as it
    would be alone in its batch: a filter it does not use leaves it untouched)."""
    out = []
    for row in range(logits.shape[0]):
        x = logits[row:row + 1] / temps[row]
        if top_k[row] < x.shape[1]:
            kth = x.topk(int(top_k[row])).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        p = torch.softmax(x, dim=-1)
        if top_p[row] < 1.0:
            s, order = p.sort(dim=-1, descending=True)
            drop_sorted = (s.cumsum(dim=-1) - s) >= float(top_p[row])
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            p = p.masked_fill(drop, 0.0)
            p = p / p.sum(dim=-1, keepdim=True)
        if min_p[row] > 0.0:
            p = p.masked_fill(p < p.max(dim=-1, keepdim=True).values * float(min_p[row]), 0.0)
            p = p / p.sum(dim=-1, keepdim=True)
        out.append(p)
    return torch.cat(out)


@pytest.mark.parametrize("host_fast_paths", [True, False])
@pytest.mark.parametrize("case", range(12))
def test_filtered_probabilities_equal_a_full_sort_row_by_row(case, host_fast_paths):
    """Top-p inside the top-k candidates, the sort over only the rows that need one, and the
    filters' per-row enabling give, bit for bit, what a full sort gives each row alone."""
    rng = random.Random(case)
    vocab = rng.choice([50, 1000, 32000])
    rows = rng.choice([1, 5, 16])
    mixed_k = case % 3 == 0  # some top-p rows without a top-k: the full sort, for those rows only
    temps = np.asarray([rng.choice([0.5, 1.0, 1.7]) for _ in range(rows)], dtype=np.float32)
    top_k = np.asarray([rng.choice([1, 3, 40, 200]) if (not mixed_k or rng.random() < 0.5) else vocab
                        for _ in range(rows)], dtype=np.int64).clip(max=vocab)
    top_p = np.asarray([rng.choice([1.0, 0.95, 0.6, 0.1]) for _ in range(rows)], dtype=np.float32)
    min_p = np.asarray([rng.choice([0.0, 0.0, 0.1]) for _ in range(rows)], dtype=np.float32)
    greedy = np.zeros(rows, dtype=np.bool_)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(case)) * 4
    sampler = Sampler("cpu", 0, host_fast_paths=host_fast_paths)
    batch = sampler.build_batch(temps, top_k, top_p, min_p, greedy, [], vocab)
    assert batch.top_p_in_candidates == (bool((top_k < vocab).any()) and
                                         bool((top_k[top_p < 1.0] < vocab).all()))
    got = sampler._filtered_probs(logits, batch)
    want = _reference_probs(logits, temps, top_k, top_p, min_p)
    assert torch.equal(got, want)


def test_top_p_inside_top_k_keeps_the_tokens_tied_with_the_kth():
    """top_k=1 keeps every token tied for the best; top-p over those candidates must too."""
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0, 5.0]])
    sampler = Sampler("cpu", 0)
    batch = sampler.build_batch(np.ones(1, np.float32), np.array([1]), np.array([0.9], np.float32),
                                np.zeros(1, np.float32), np.zeros(1, np.bool_), [], 5)
    probs = sampler._filtered_probs(logits, batch)
    assert torch.equal(probs, _reference_probs(logits, [1.0], [1], [0.9], [0.0]))
    assert probs[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 0, 1 / 3])


def test_a_seeded_rows_sample_does_not_depend_on_the_other_rows_filters():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, 32000, generator=g) * 3
    others = torch.randn(3, 32000, generator=g) * 3
    seeded = SamplingParams(temperature=0.8, seed=42)
    filters = [SamplingParams(top_p=0.7), SamplingParams(min_p=0.2), SamplingParams(top_k=3, top_p=0.5)]
    alone = Sampler("cpu", 0)
    tokens_alone, probs_alone = [], []
    seq = _seq(seeded, [1], [])
    for _ in range(20):
        batch = alone.make_batch([seq], 32000)
        probs_alone.append(alone._filtered_probs(row, batch))
        tokens_alone.append(alone(row.clone(), batch).tokens[0])
    mixed = Sampler("cpu", 0)
    seq2 = _seq(seeded, [1], [])
    for step in range(20):
        seqs = [_seq(p, [1], []) for p in filters] + [seq2]
        batch = mixed.make_batch(seqs, 32000)
        logits = torch.cat([others, row])
        assert torch.equal(mixed._filtered_probs(logits, batch)[3:], probs_alone[step])
        assert mixed(logits.clone(), batch).tokens[3] == tokens_alone[step]
    assert len(set(tokens_alone)) > 1


def test_the_device_path_and_the_cpu_shortcuts_sample_the_same_tokens():
    seqs_a, seqs_b = _mixed_batch(), _mixed_batch()
    fast, device = Sampler("cpu", 7), Sampler("cpu", 7, host_fast_paths=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.randn(len(seqs_a), VOCAB, generator=g) * 2
        a = fast(logits.clone(), fast.make_batch(seqs_a, VOCAB))
        b = device(logits.clone(), device.make_batch(seqs_b, VOCAB))
        assert a == b
        for sa, sb, t in zip(seqs_a, seqs_b, a.tokens):
            sa.token_ids.append(max(t, 0))
            sb.token_ids.append(max(t, 0))


def test_logprobs_ranks_and_beam_candidates_come_back_exact():
    seqs = _mixed_batch()
    sampler = _device_path_sampler()
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(2))
    out = sampler(logits.clone(), sampler.make_batch(seqs, VOCAB))
    raw = torch.log_softmax(logits, dim=-1)
    for row in (6, 7):
        entry, token = out.logprobs[row], out.tokens[row]
        assert entry.token == token and entry.logprob == raw[row, token].item()
        assert entry.rank == int((raw[row] > raw[row, token]).sum()) + 1
        top = raw[row].topk(3)
        k = seqs[row].params.logprobs
        assert list(entry.top) == top.indices[:k].tolist()
        assert [v for v, _ in entry.top.values()] == top.values[:k].tolist()
    values, ids = out.beam_candidates[10]
    top = raw[10].topk(4)
    assert values == top.values.tolist() and ids == top.indices.tolist()


def test_an_empty_batch_samples_nothing():
    for fast in (True, False):
        sampler = Sampler("cpu", 0, host_fast_paths=fast)
        out = sampler(torch.empty(0, VOCAB), sampler.make_batch([], VOCAB))
        assert out.tokens == [] and out.logprobs == [] and out.beam_candidates == []


# ------------------------------------------------------------------ persistent penalty counts
def test_penalty_counts_kept_across_steps_equal_a_recount_from_the_histories():
    """Growing histories, sequences that finish (their rows reused), forks (a new sequence
    with its parent's history) and a history that does not extend the recorded one."""
    rng = random.Random(0)
    state = PenaltyState(torch.device("cpu"), 60)
    seqs = []
    for step in range(40):
        if rng.random() < 0.3 or not seqs:
            prompt = [rng.randrange(60) for _ in range(rng.randint(1, 9))]
            seqs.append(_seq(SamplingParams(presence_penalty=0.5), prompt, []))
        if rng.random() < 0.2 and len(seqs) > 1:
            parent = rng.choice(seqs)
            seqs.append(_seq(parent.params, parent.token_ids[:parent.prompt_len],
                             parent.token_ids[parent.prompt_len:]))
        if rng.random() < 0.15 and len(seqs) > 1:
            gone = seqs.pop(rng.randrange(len(seqs)))
            state.forget([gone.seq_id])
        if rng.random() < 0.1:
            victim = rng.choice(seqs)
            if victim.num_output_tokens:
                victim.token_ids[-1] = (victim.token_ids[-1] + 1) % 60  # not an extension: recount
        rows, arrays = state.plan(seqs)
        state.update({k: torch.from_numpy(v) for k, v in arrays.items()})
        assert len(set(rows.tolist())) == len(seqs)
        for seq, row in zip(seqs, rows.tolist()):
            expected = torch.bincount(torch.tensor(seq.output_token_ids, dtype=torch.long), minlength=60).float()
            assert torch.equal(state.counts[row], expected)
            seen = torch.zeros(60, dtype=torch.bool)
            seen[seq.token_ids[:seq.prompt_len]] = True
            assert torch.equal(state.prompt_seen[row], seen)
        for seq in seqs:
            seq.token_ids.extend(rng.randrange(60) for _ in range(rng.choice([1, 1, 2])))
    assert state.counts.shape[0] < 40  # finished sequences' rows were reused


def test_a_step_scatters_only_the_tokens_a_sequence_gained():
    state = PenaltyState(torch.device("cpu"), 100)
    seq = _seq(SamplingParams(frequency_penalty=1.0), list(range(50)), list(range(30)))
    _, first = state.plan([seq])
    assert len(first["prompt_tokens"]) == 50 and len(first["out_tokens"]) == 30
    state.update({k: torch.from_numpy(v) for k, v in first.items()})
    seq.token_ids.append(7)
    _, second = state.plan([seq])
    assert second["out_tokens"].tolist() == [7] and len(second["prompt_tokens"]) == 0 and len(second["reset"]) == 0


def test_the_one_upload_buffer_gives_back_every_array():
    arrays = {"a": np.arange(5, dtype=np.int64), "b": np.array([0.5, -1.25, 3.0], dtype=np.float32),
              "c": np.array([True, False, True]), "empty": np.zeros(0, dtype=np.int64),
              "d": np.arange(6, dtype=np.float32).reshape(2, 3)}
    up = HostUpload()
    for name, a in arrays.items():
        up.add(name, a)
    got = up.send(torch.device("cpu"), one_copy=True)
    for name, a in arrays.items():
        assert got[name].dtype == {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32,
                                   np.dtype(np.bool_): torch.bool}[a.dtype]
        assert got[name].shape == a.shape and np.array_equal(got[name].numpy(), a)


def _penalised_reference(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
    """The penalties recounted from each row's history (OpenAI's presence / frequency on the
    generated tokens, transformers' repetition on prompt and generated ones)."""
    out = logits.clone()
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        x = out[row]
        counts = torch.bincount(torch.tensor(seq.output_token_ids, dtype=torch.long), minlength=x.shape[0]).float()
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[seq.token_ids[:seq.prompt_len]] = True
            rep = torch.tensor(p.repetition_penalty)
            x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)
        out[row] = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return out


@pytest.mark.parametrize("host_fast_paths", [True, False])
def test_penalties_from_kept_counts_equal_a_recount_whatever_rows_the_sequences_hold(host_fast_paths):
    """Batch rows in any order, some without penalties; state rows not consecutive (rows of
    finished sequences reused); all rows penalised, or one."""
    rng = random.Random(5)
    sampler = Sampler("cpu", 0, host_fast_paths=host_fast_paths)
    settings = [dict(repetition_penalty=1.3), dict(presence_penalty=0.4, frequency_penalty=0.2), dict(),
                dict(frequency_penalty=-0.5, repetition_penalty=0.8)]

    def new_seq(i: int) -> Any:
        return _seq(SamplingParams(temperature=0, **settings[i % len(settings)]),
                    [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))],
                    [rng.randrange(VOCAB) for _ in range(rng.randint(0, 20))])

    seqs = [new_seq(i) for i in range(6)]
    g = torch.Generator().manual_seed(5)
    shapes: set[tuple[bool, bool]] = set()
    for step in range(8):
        if step in (2, 5):
            gone = seqs.pop(1)
            sampler.forget([gone.seq_id])
            seqs.insert(rng.randrange(len(seqs) + 1), new_seq(step))
        order = seqs if step != 6 else [seqs[0]]
        rng.shuffle(order)
        logits = torch.randn(len(order), VOCAB, generator=g) * 3
        batch = sampler.make_batch(order, VOCAB)
        shapes.add((isinstance(batch.penalties.state_rows, slice), batch.penalties.rows is None))
        got = sampler._process(logits.clone(), batch)
        torch.testing.assert_close(got, _penalised_reference(logits, order), rtol=0, atol=1e-6)
        for seq in seqs:
            seq.token_ids.append(rng.randrange(VOCAB))
    assert {(True, True), (False, False)} <= shapes  # both shortcuts taken, and neither
