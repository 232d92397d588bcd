"""Triton kernels in the interpreter (TRITON_INTERPRET=1, set in conftest) against float64
references — fresh random inputs, NaN-poisoned outputs, scattered blocks, lengths around
block edges, mixed prefill/decode batches, every GQA ratio, each dtype, sliding windows and
attention-logit soft-capping — and every production variant compiled for real GPUs (sm_90,
sm_80) on this CPU."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import build_batch, reference, rel_err  # noqa: E402
from pagedbackend.kernels.cache_ops import copy_blocks, reshape_and_cache  # noqa: E402
from pagedbackend.kernels.paged_attention import (choose_num_splits, split_kv_decode_attention,  # noqa: E402
                                                  unified_attention)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Decodes around block edges, a fresh prompt, prompt chunks with cached context.
MIXED = ([1, 1, 1, 1, 1, 5, 16, 17], [1, 15, 16, 17, 33, 5, 16, 40])
# Scores are ~N(0, 1) (unit q, k and scale 1/sqrt(head_dim)); a cap of 2 bends the larger ones a lot.
SOFT_CAP = 2.0


def run_unified(num_heads, num_kv_heads, block_size, head_dim, dtype, window, lens=MIXED, seed=0, soft_cap=None):
    query_lens, seq_lens = lens
    q, k, v, kc, vc, meta, tables = build_batch(query_lens, seq_lens, num_kv_heads, block_size, head_dim, num_heads,
                                                dtype=dtype, seed=seed)
    scale = 1 / math.sqrt(head_dim)
    expected = reference(q, k, v, kc, vc, meta, tables, scale, window, soft_cap)
    if soft_cap is not None:  # the cap changes the answer far beyond the tolerance
        assert rel_err(reference(q, k, v, kc, vc, meta, tables, scale, window), expected) > 1e-2
    reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    unified_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                      meta.query_start_loc_host, meta.max_query_len, scale, window, logits_soft_cap=soft_cap)
    assert torch.isfinite(out).all(), "some output element was never written"
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("soft_cap", [None, SOFT_CAP])
def test_unified_attention_every_gqa_ratio(num_heads, num_kv_heads, window, soft_cap):
    run_unified(num_heads, num_kv_heads, 16, 64, torch.float32, window, soft_cap=soft_cap,
                seed=num_heads + num_kv_heads + (0 if soft_cap is None else 100))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_unified_attention_every_head_size(head_dim):
    run_unified(4, 2, 32, head_dim, torch.float32, None, seed=head_dim)


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_unified_attention_every_block_size(block_size):
    lens = ([1, 1, 1, 3, 20], [block_size - 1, block_size, block_size + 1, 2 * block_size + 3, 20 + block_size])
    run_unified(4, 1, block_size, 64, torch.float32, None, lens=lens, seed=block_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size,head_dim", [(4, 2, 16, 64), (8, 2, 32, 128), (4, 4, 16, 80)])
def test_unified_attention_half_precision(dtype, num_heads, num_kv_heads, block_size, head_dim):
    run_unified(num_heads, num_kv_heads, block_size, head_dim, dtype, None, seed=head_dim + num_heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unified_attention_soft_cap_half_precision_gemma2_shape(dtype):
    # Gemma 2's layout at small scale: head_dim 256, two query heads per KV head, a window.
    run_unified(4, 2, 16, 256, dtype, 12, soft_cap=SOFT_CAP, seed=256)


def test_soft_cap_must_be_positive():
    q, k, v, kc, vc, meta, _ = build_batch([1, 4], [20, 4], 2, 16, 64, 4)
    for cap in (0.0, -5.0):
        with pytest.raises(ValueError, match="logits_soft_cap must be positive"):
            unified_attention(torch.empty(q.shape), q, kc, vc, meta.block_tables, meta.seq_lens,
                              meta.query_start_loc, meta.query_start_loc_host, meta.max_query_len, 0.125,
                              logits_soft_cap=cap)
        with pytest.raises(ValueError, match="logits_soft_cap must be positive"):
            split_kv_decode_attention(torch.empty(q.shape), q, kc, vc, meta.block_tables, meta.seq_lens, 20, 0.125,
                                      2, logits_soft_cap=cap)


def test_unified_attention_fresh_inputs_each_time_give_fresh_outputs():
    """Guards against a kernel that returns stale data: two seeds, two different answers."""
    outs = []
    for seed in (1, 2):
        q, k, v, kc, vc, meta, tables = build_batch([1, 4], [20, 4], 2, 16, 64, 4, seed=seed)
        reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
        out = torch.full(q.shape, float("nan"))
        unified_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          meta.query_start_loc_host, meta.max_query_len, 0.125)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,soft_cap",
                         [(4, 4, 64, None, None), (8, 2, 80, None, None), (8, 1, 64, 40, None),
                          (4, 2, 64, None, SOFT_CAP), (8, 2, 80, 40, SOFT_CAP)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode_matches_float64(num_splits, num_heads, num_kv_heads, head_dim, window, soft_cap, dtype):
    seq_lens = [1, 15, 16, 17, 100, 257]
    seed = num_splits * head_dim + (0 if soft_cap is None else 1)
    q, k, v, kc, vc, meta, tables = build_batch([1] * len(seq_lens), seq_lens, num_kv_heads, 16, head_dim, num_heads,
                                                dtype=dtype, seed=seed)
    scale = 1 / math.sqrt(head_dim)
    expected = reference(q, k, v, kc, vc, meta, tables, scale, window, soft_cap)
    reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    split_kv_decode_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, max(seq_lens), scale, num_splits,
                              window, logits_soft_cap=soft_cap)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]


def test_split_heuristic_only_for_few_long_sequences():
    assert choose_num_splits(4, 8, 4096, 16, num_sms=132) > 1
    assert choose_num_splits(4, 8, 256, 16, num_sms=132) == 1  # short contexts
    assert choose_num_splits(64, 8, 4096, 16, num_sms=132) == 1  # enough work already
    n = choose_num_splits(1, 1, 32768, 16, num_sms=132)
    assert n & (n - 1) == 0 and n <= 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_exactly_the_given_slots(dtype):
    num_blocks, heads, block_size, head_dim = 6, 3, 16, 80
    cache_k = torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dtype)
    cache_v = cache_k.clone()
    g = torch.Generator().manual_seed(7)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:21]
    slots[[3, 11]] = -1  # padding: not written
    k = torch.randn(21, heads, head_dim, generator=g).to(dtype)
    v = torch.randn(21, heads, head_dim, generator=g).to(dtype)
    reshape_and_cache(k, v, cache_k, cache_v, slots)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written[slot // block_size, slot % block_size] = True
        assert torch.equal(cache_k[slot // block_size, :, slot % block_size], k[t])
        assert torch.equal(cache_v[slot // block_size, :, slot % block_size], v[t])
    untouched = ~written[:, None, :, None].expand_as(cache_k)
    assert torch.isnan(cache_k[untouched].float()).all() and torch.isnan(cache_v[untouched].float()).all()


def test_copy_blocks_copies_every_layer_in_one_launch():
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(3, 2, 8, 2, 16, 64, generator=g)
    before = cache.clone()
    pairs = [(1, 5), (2, 6), (7, 0)]
    copy_blocks(cache, torch.tensor(pairs))
    for src, dst in pairs:
        assert torch.equal(cache[:, :, dst], before[:, :, src])
    untouched = [b for b in range(8) if b not in {d for _, d in pairs}]
    assert torch.equal(cache[:, :, untouched], before[:, :, untouched])


def test_every_production_kernel_variant_compiles_for_sm90_and_sm80():
    """Runs in a subprocess: this test session runs Triton in interpreter mode, and compiling
    needs the real JIT. No GPU is involved: compilation goes down to a cubin on the CPU."""
    import os
    import subprocess
    import sys

    from pagedbackend.kernels.compile_check import TARGETS, production_variants

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "pagedbackend.kernels.compile_check"], capture_output=True,
                          text=True, env=env, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("sm_")]
    problems = [line for line in lines if " ok " not in line]
    assert done.returncode == 0 and not problems, "\n".join(problems) or done.stderr[-3000:]
    assert len(lines) == len(TARGETS) * len(production_variants())


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_triton_backend_gives_the_torch_backends_greedy_tokens(name, model_dir, make_engine):
    """The whole engine on the Triton kernels (interpreted): chunked prefill, decodes, prefix
    hits, copy-on-write forks; mistral adds MQA and a sliding window."""
    from helpers import random_prompts
    from pagedbackend import SamplingParams

    path = model_dir(name)
    shared = random_prompts([40], 1024, seed=31)[0]
    prompts = [shared + [11, 12, 13], shared + [21], random_prompts([70], 1024, seed=32)[0], [5, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=8, n=2)
    outs = {}
    for backend in ("torch", "triton"):
        llm = make_engine(path, "llm", attention_backend=backend, max_num_batched_tokens=32, max_num_seqs=8,
                          max_model_len=256)
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        result = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
        outs[backend] = [[c.token_ids for c in o.outputs] for o in result]
        stats = llm.llm_engine.get_stats()
        assert stats["prefix_cache_hits"] > 0 and stats["num_chunked_prefill_steps"] > 0
    assert outs["triton"] == outs["torch"]
