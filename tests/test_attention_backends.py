"""Attention backends against a float64 reference: fresh random inputs every case, physically
scattered blocks, lengths on and around block edges, mixed prefill chunks and decodes, every
GQA ratio, sliding windows, outputs poisoned with NaN first so unwritten elements show."""

from __future__ import annotations

import math

import pytest
import torch

from pagedbackend.attention import get_attention_backend
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.kernels import cpu_native
from pagedbackend.kernels.layout import kv_cache_shape

native = cpu_native.load()
BACKENDS = ["torch"] + (["cpu"] if native is not None else [])


def build_batch(query_lens, seq_lens, num_kv_heads, block_size, head_dim, num_heads, dtype=torch.float32, seed=0):
    """Random q/k/v and a cache whose blocks are scattered; the context part of every sequence
    is already in the cache, the new tokens' K/V are passed in (the backend writes them)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 7
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shape = kv_cache_shape(num_blocks, num_kv_heads, block_size, head_dim)
    key_cache = torch.randn(shape, generator=g, dtype=dtype)
    value_cache = torch.randn(shape, generator=g, dtype=dtype)
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(perm[used:used + n])
        used += n
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = torch.tensor(t)
    total = sum(query_lens)
    q = torch.randn(total, num_heads, head_dim, generator=g, dtype=dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g, dtype=dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g, dtype=dtype)
    slots = []
    for t, ql, s in zip(tables, query_lens, seq_lens):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(s - ql, s)]
    qsl = [0]
    for ql in query_lens:
        qsl.append(qsl[-1] + ql)
    num_decodes = 0  # backends expect the single-token rows first
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        num_seqs=len(seq_lens), num_tokens=total, slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=list(seq_lens))
    return q, k, v, key_cache, value_cache, meta, tables


def reference(q, k, v, key_cache, value_cache, meta, tables, scale, window):
    """Plain float64 attention from a cache that has the new tokens written in."""
    kc, vc = key_cache.double().clone(), value_cache.double().clone()
    block_size = kc.shape[2]
    num_heads, num_kv_heads = q.shape[1], kc.shape[1]
    for t, slot in enumerate(meta.slot_mapping.tolist()):
        kc[slot // block_size, :, slot % block_size] = k[t].double()
        vc[slot // block_size, :, slot % block_size] = v[t].double()
    out = torch.empty(q.shape, dtype=torch.float64)
    qsl = meta.query_start_loc_host
    for i, table in enumerate(tables):
        seq_len = meta.seq_lens_host[i]
        keys = kc[table].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, kc.shape[-1])[:, :seq_len]
        values = vc[table].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, kc.shape[-1])[:, :seq_len]
        q_len = qsl[i + 1] - qsl[i]
        for j in range(q_len):
            pos = seq_len - q_len + j
            lo = max(0, pos - window + 1) if window else 0
            for h in range(num_heads):
                kvh = h // (num_heads // num_kv_heads)
                s = (keys[kvh, lo:pos + 1] @ q[qsl[i] + j, h].double()) * scale
                out[qsl[i] + j, h] = torch.softmax(s, 0) @ values[kvh, lo:pos + 1]
    return out


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


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
def test_backend_matches_float64_reference(backend_name, num_heads, num_kv_heads, case, window):
    query_lens, seq_lens = CASES[case]
    for block_size, head_dim in [(16, 64), (32, 80)]:
        q, k, v, kc, vc, meta, tables = build_batch(query_lens, seq_lens, num_kv_heads, block_size, head_dim,
                                                    num_heads, seed=hash((case, num_heads, block_size)) % 1000)
        expected = reference(q, k, v, kc, vc, meta, tables, 1 / math.sqrt(head_dim), window)
        backend = get_attention_backend(backend_name)
        backend.prepare(meta, kc)
        out = backend.forward(q, k, v, kc, vc, meta, 1 / math.sqrt(head_dim), window)
        assert torch.isfinite(out).all()
        assert rel_err(out, expected) < 1e-5
        # The new tokens' K/V were written where slot_mapping says.
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
        for window in (None, 16, 40):
            expected = reference(q, k, v, kc, vc, meta, tables, 0.1, window)
            out = torch.full(q.shape, float("nan"))
            q_strided = torch.cat([q, torch.randn_like(q)], dim=1)[:, :num_heads]  # rows not contiguous
            native.paged_decode_attention(out, q_strided, kc, vc, meta.block_tables, meta.seq_lens, 0.1, window,
                                          max(seq_lens))
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
