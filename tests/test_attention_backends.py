"""Attention backends against a float64 reference: fresh random inputs every case, physically
scattered blocks, lengths on and around block edges, mixed prefill chunks and decodes, every
GQA ratio, sliding windows, attention-logit soft-capping, outputs poisoned with NaN first so
unwritten elements show. On the device axis: the CPU, and CUDA (`pytest -m gpu`) for the
backends that run there."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from helpers import build_batch, reference, rel_err
from pagedbackend.attention import get_attention_backend
from pagedbackend.kernels import cpu_native

native = cpu_native.load()
try:
    import triton  # noqa: F401  (the interpreter runs the kernels on CPU; conftest sets TRITON_INTERPRET)
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
BACKENDS = ["torch"] + (["cpu"] if native is not None else []) + (["triton"] if HAVE_TRITON else [])
# fp32 everywhere; on CUDA the kernels sum in another order (and SDPA picks its own kernel).
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}


# Scores are ~N(0, 1) (unit q, k and scale 1/sqrt(head_dim)); a cap of 2 bends the larger ones a lot.
SOFT_CAP = 2.0


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled floating tensors for the test, so an output
    element (or buffer element) a backend allocates but never writes shows as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


CASES = [
    # (query lens: decodes first, then prefill chunks), seq lens
    ([1, 1, 1, 1, 1], [1, 15, 16, 17, 33]),
    ([1, 1, 1, 5, 16, 17], [64, 31, 200, 5, 16, 40]),  # decodes + fresh prompts + a chunk with context
    ([3, 32], [35, 100]),  # prefill chunks only, with context
]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("soft_cap", [None, SOFT_CAP])
def test_backend_matches_float64_reference(device, to_device, backend_name, num_heads, num_kv_heads, case, window,
                                           soft_cap, poisoned_empty):
    if device == "cuda" and backend_name == "cpu":
        pytest.skip("the cpu backend runs on the CPU only")
    if device == "cpu" and backend_name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    query_lens, seq_lens = CASES[case]
    for block_size, head_dim in [(16, 64), (32, 80)]:
        seed = hash((case, num_heads, block_size)) % 1000 + (0 if soft_cap is None else 1000)
        batch = build_batch(query_lens, seq_lens, num_kv_heads, block_size, head_dim, num_heads, seed=seed)
        q, k, v, kc, vc, meta, tables = batch
        scale = 1 / math.sqrt(head_dim)
        expected = reference(q, k, v, kc, vc, meta, tables, scale, window, soft_cap)
        if soft_cap is not None:  # the cap changes the answer far beyond the tolerance
            assert rel_err(reference(q, k, v, kc, vc, meta, tables, scale, window), expected) > 1e-2
        q, k, v, kc, vc, meta, tables = to_device(batch, device)
        backend = get_attention_backend(backend_name)
        backend.prepare(meta, kc)
        cap = {} if soft_cap is None else {"logits_soft_cap": soft_cap}
        out = backend.forward(q, k, v, kc, vc, meta, scale, window, **cap).cpu()
        assert torch.isfinite(out).all()
        assert rel_err(out, expected) < TOLERANCE[device]
        # The new tokens' K/V were written where slot_mapping says (a copy: exact on any device).
        kc, vc, k, v = kc.cpu(), vc.cpu(), k.cpu(), v.cpu()
        for t, slot in enumerate(meta.slot_mapping.tolist()):
            assert torch.equal(kc[slot // block_size, :, slot % block_size], k[t])
            assert torch.equal(vc[slot // block_size, :, slot % block_size], v[t])


@pytest.mark.skipif(native is None, reason="no C compiler for the native CPU kernel")
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_native_decode_kernel_writes_every_output_and_matches_float64(group, head_dim):
    num_kv_heads = 2
    num_heads = group * num_kv_heads
    seq_lens = [1, 15, 16, 17, 63, 64, 65, 300]
    for block_size in (16, 32, 64):
        q, k, v, kc, vc, meta, tables = build_batch([1] * len(seq_lens), seq_lens, num_kv_heads, block_size,
                                                    head_dim, num_heads, seed=group * 7 + head_dim)
        # Write the new tokens first (the backend does this before attending).
        for t, slot in enumerate(meta.slot_mapping.tolist()):
            kc[slot // block_size, :, slot % block_size] = k[t]
            vc[slot // block_size, :, slot % block_size] = v[t]
        # scale 1 with the cap: scores / cap reach ~20, so the kernel's tanh saturates too
        for window, (scale, soft_cap) in itertools.product((None, 16, 40),
                                                           ((0.1, None), (0.1, SOFT_CAP), (1.0, SOFT_CAP))):
            expected = reference(q, k, v, kc, vc, meta, tables, scale, window, soft_cap)
            out = torch.full(q.shape, float("nan"))
            q_strided = torch.cat([q, torch.randn_like(q)], dim=1)[:, :num_heads]  # rows not contiguous
            native.paged_decode_attention(out, q_strided, kc, vc, meta.block_tables, meta.seq_lens, scale, window,
                                          max(seq_lens), logits_soft_cap=soft_cap)
            assert torch.isfinite(out).all()
            assert rel_err(out, expected) < 1e-5


@pytest.mark.skipif(native is None, reason="no C compiler for the native CPU kernel")
def test_native_kernel_rejects_what_it_cannot_handle():
    q, k, v, kc, vc, meta, _ = build_batch([1, 1], [5, 9], 1, 16, 64, 2)
    out = torch.empty(q.shape)
    with pytest.raises(TypeError):
        native.paged_decode_attention(out, q.double(), kc, vc, meta.block_tables, meta.seq_lens, 1.0, None, 5)
    with pytest.raises(TypeError):
        native.paged_decode_attention(out, q, kc, vc, meta.block_tables.long(), meta.seq_lens, 1.0, None, 5)
    with pytest.raises(ValueError):
        native.paged_decode_attention(torch.empty(2, 64, 2).transpose(1, 2), q, kc, vc, meta.block_tables,
                                      meta.seq_lens, 1.0, None, 9)
    for cap in (0.0, -1.0):  # the kernel reads <= 0 as "no cap": refused rather than silently ignored
        with pytest.raises(ValueError, match="logits_soft_cap must be positive"):
            native.paged_decode_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, 1.0, None, 9,
                                          logits_soft_cap=cap)
