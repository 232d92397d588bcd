"""Triton kernels against float64 references — fresh random inputs, NaN-poisoned outputs,
scattered blocks, lengths around block edges, mixed prefill/decode batches, every GQA ratio,
each dtype, sliding windows and attention-logit soft-capping — on the device axis: in the
interpreter on the CPU (TRITON_INTERPRET=1, set by conftest when there is no GPU) and compiled
on CUDA (`pytest -m gpu`). Also: the specialisations a growing decode needs (one per kernel),
and every production variant compiled for real GPUs (sm_90, sm_80) on this CPU."""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

# conftest sets TRITON_INTERPRET=1 where there is no GPU: then the CPU cases run in the interpreter.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

from helpers import build_batch, reference, rel_err  # noqa: E402
from pagedbackend.kernels.cache_ops import copy_blocks, reshape_and_cache  # noqa: E402
from pagedbackend.kernels.layout import kv_cache_shape, slot_to_rows  # noqa: E402
from pagedbackend.kernels.paged_attention import (choose_num_splits, split_kv_decode_attention,  # noqa: E402
                                                  unified_attention)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Decodes around block edges, a fresh prompt, prompt chunks with cached context.
MIXED = ([1, 1, 1, 1, 1, 5, 16, 17], [1, 15, 16, 17, 33, 5, 16, 40])
# Scores are ~N(0, 1) (unit q, k and scale 1/sqrt(head_dim)); a cap of 2 bends the larger ones a lot.
SOFT_CAP = 2.0


def run_unified(device, to_device, num_heads, num_kv_heads, block_size, head_dim, dtype, window, lens=MIXED,
                seed=0, soft_cap=None):
    query_lens, seq_lens = lens
    batch = build_batch(query_lens, seq_lens, num_kv_heads, block_size, head_dim, num_heads, dtype=dtype, seed=seed)
    q, k, v, kc, vc, meta, tables = batch
    scale = 1 / math.sqrt(head_dim)
    expected = reference(q, k, v, kc, vc, meta, tables, scale, window, soft_cap)
    if soft_cap is not None:  # the cap changes the answer far beyond the tolerance
        assert rel_err(reference(q, k, v, kc, vc, meta, tables, scale, window), expected) > 1e-2
    q, k, v, kc, vc, meta, tables = to_device(batch, device)
    reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    unified_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                      meta.query_start_loc_host, meta.max_query_len, scale, window, logits_soft_cap=soft_cap)
    out = out.cpu()
    assert torch.isfinite(out).all(), "some output element was never written"
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("soft_cap", [None, SOFT_CAP])
def test_unified_attention_every_gqa_ratio(triton_device, to_device, num_heads, num_kv_heads, window, soft_cap):
    run_unified(triton_device, to_device, num_heads, num_kv_heads, 16, 64, torch.float32, window, soft_cap=soft_cap,
                seed=num_heads + num_kv_heads + (0 if soft_cap is None else 100))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_unified_attention_every_head_size(triton_device, to_device, head_dim):
    run_unified(triton_device, to_device, 4, 2, 32, head_dim, torch.float32, None, seed=head_dim)


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_unified_attention_every_block_size(triton_device, to_device, block_size):
    lens = ([1, 1, 1, 3, 20], [block_size - 1, block_size, block_size + 1, 2 * block_size + 3, 20 + block_size])
    run_unified(triton_device, to_device, 4, 1, block_size, 64, torch.float32, None, lens=lens, seed=block_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size,head_dim", [(4, 2, 16, 64), (8, 2, 32, 128), (4, 4, 16, 80)])
def test_unified_attention_half_precision(triton_device, to_device, dtype, num_heads, num_kv_heads, block_size,
                                          head_dim):
    run_unified(triton_device, to_device, num_heads, num_kv_heads, block_size, head_dim, dtype, None,
                seed=head_dim + num_heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unified_attention_soft_cap_half_precision_gemma2_shape(triton_device, to_device, dtype):
    # Gemma 2's layout at small scale: head_dim 256, two query heads per KV head, a window.
    run_unified(triton_device, to_device, 4, 2, 16, 256, dtype, 12, soft_cap=SOFT_CAP, seed=256)


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


def test_unified_attention_fresh_inputs_each_time_give_fresh_outputs(triton_device, to_device):
    """Guards against a kernel that returns stale data: two seeds, two different answers."""
    outs = []
    for seed in (1, 2):
        q, k, v, kc, vc, meta, tables = to_device(build_batch([1, 4], [20, 4], 2, 16, 64, 4, seed=seed), triton_device)
        reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
        out = torch.full(q.shape, float("nan"), device=triton_device)
        unified_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          meta.query_start_loc_host, meta.max_query_len, 0.125)
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and not torch.allclose(outs[0], outs[1])


# 3 splits: not a power of two, so with 257 tokens (17 blocks, 6 per split) the last split is short;
# 8 splits of 3 blocks leave split 6 and 7 with no block of the shorter sequences at all.
@pytest.mark.parametrize("num_splits", [3, 8])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,soft_cap",
                         [(4, 4, 64, None, None), (8, 2, 80, None, None), (8, 1, 64, 40, None),
                          (4, 2, 64, None, SOFT_CAP), (8, 2, 80, 40, SOFT_CAP)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode_matches_float64(triton_device, to_device, num_splits, num_heads, num_kv_heads, head_dim,
                                         window, soft_cap, dtype):
    seq_lens = [1, 15, 16, 17, 100, 257]
    seed = num_splits * head_dim + (0 if soft_cap is None else 1)
    batch = build_batch([1] * len(seq_lens), seq_lens, num_kv_heads, 16, head_dim, num_heads, dtype=dtype, seed=seed)
    q, k, v, kc, vc, meta, tables = batch
    scale = 1 / math.sqrt(head_dim)
    expected = reference(q, k, v, kc, vc, meta, tables, scale, window, soft_cap)
    q, k, v, kc, vc, meta, tables = to_device(batch, triton_device)
    reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=triton_device)
    split_kv_decode_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, max(seq_lens), scale, num_splits,
                              window, logits_soft_cap=soft_cap)
    out = out.cpu()
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]


def test_split_heuristic_only_for_few_long_sequences():
    assert choose_num_splits(4, 8, 4096, 16, num_sms=132) > 1
    assert choose_num_splits(4, 8, 256, 16, num_sms=132) == 1  # short contexts
    assert choose_num_splits(64, 8, 4096, 16, num_sms=132) == 1  # enough work already
    n = choose_num_splits(1, 1, 32768, 16, num_sms=132)
    assert n & (n - 1) == 0 and n <= 64


def test_split_heuristic_never_splits_for_a_cpu_cache():
    # The SM count comes from the cache's device: a CPU cache has none, whatever CUDA exists.
    assert choose_num_splits(1, 1, 32768, 16, device=torch.device("cpu")) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_split_heuristic_reads_the_given_cuda_device():
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    sms = torch.cuda.get_device_properties(last).multi_processor_count
    assert choose_num_splits(1, 1, 32768, 16, device=last) == choose_num_splits(1, 1, 32768, 16, num_sms=sms) > 1


def test_decode_over_a_growing_context_compiles_each_kernel_once():
    """From 16 to 8,192 tokens of context at batch 1, 3 and 16 — the split count, the split size
    and the block-table width changing all along — every launch of each kernel gets the same
    JIT specialisation (compile-cache key), so a long decode compiles each kernel once. The
    launches are recorded, not run; the keys are what the JIT's own binder makes of them."""
    from pagedbackend.kernels.compile_check import jit_specialization, recorded_launches

    num_kv_heads, group, block_size, head_dim = 2, 4, 16, 64
    splits_seen = set()
    with recorded_launches() as launches:
        for batch in (1, 3, 16):
            for max_seq_len in range(16, 8193, 112):
                max_blocks = -(-max_seq_len // block_size)  # the runner's block-table width follows the batch
                q = torch.randn(batch, num_kv_heads * group, head_dim)
                k = torch.randn(batch, num_kv_heads, head_dim)
                kc = torch.randn(kv_cache_shape(4, num_kv_heads, block_size, head_dim))
                tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
                seq_lens = torch.full((batch,), max_seq_len, dtype=torch.int32)
                reshape_and_cache(k, k, kc, kc, torch.arange(batch))
                splits = choose_num_splits(batch, num_kv_heads, max_seq_len, block_size, num_sms=132)
                splits_seen.add(splits)
                if splits > 1:
                    split_kv_decode_attention(q, q, kc, kc, tables, seq_lens, max_seq_len, 0.125, splits)
                else:
                    qsl = list(range(batch + 1))
                    unified_attention(q, q, kc, kc, tables, seq_lens, torch.tensor(qsl, dtype=torch.int32), qsl, 1,
                                      0.125)
    keys: dict[str, set] = {}
    for launch in launches:
        keys.setdefault(launch.name, set()).add(jit_specialization(launch).key)
    assert len(splits_seen) >= 4 and set(keys) == {"_reshape_and_cache_kernel", "_unified_attention_kernel",
                                                   "_split_decode_kernel", "_split_reduce_kernel"}
    compiles = {name: len(k) for name, k in keys.items()}
    assert all(n == 1 for n in compiles.values()), f"JIT specialisations per kernel: {compiles}"


def _one_launch_of_each_wrapper() -> None:
    q, k, v, kc, vc, meta, _ = build_batch([1, 1], [40, 9], 2, 16, 64, 4)
    reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
    copy_blocks(torch.stack([kc, vc])[None], torch.tensor([[0, 1]]))
    unified_attention(torch.empty_like(q), q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                      meta.query_start_loc_host, 1, 0.125)
    split_kv_decode_attention(torch.empty_like(q), q, kc, vc, meta.block_tables, meta.seq_lens, 40, 0.125, 2)


def test_every_kernel_launch_is_pinned_to_its_tensors_device(monkeypatch):
    """Triton launches on the thread's current CUDA device, not the tensors': each wrapper
    launches inside kernels.launch.on_device_of (torch.cuda.device on CUDA)."""
    import contextlib

    from pagedbackend.kernels import cache_ops, paged_attention
    from pagedbackend.kernels.compile_check import recorded_launches

    with recorded_launches() as launches:
        pinned: list[range] = []

        @contextlib.contextmanager
        def spy(tensor):
            start = len(launches)
            yield
            pinned.append(range(start, len(launches)))

        for module in (cache_ops, paged_attention):
            monkeypatch.setattr(module, "on_device_of", spy)
        _one_launch_of_each_wrapper()
    assert len(launches) == 5 and sorted(i for span in pinned for i in span) == list(range(5))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_the_second_gpu_run_there_while_the_first_is_current():
    """Every wrapper with cuda:1 tensors while cuda:0 is current: a launch on the wrong device
    faults or writes nothing (the outputs start as NaN)."""
    torch.cuda.set_device(0)
    q, k, v, kc, vc, meta, tables = build_batch([1, 1], [40, 9], 2, 16, 64, 4, seed=5)
    expected = reference(q, k, v, kc, vc, meta, tables, 0.125, None)
    dev = "cuda:1"
    qd, kd, vd, kcd, vcd = (t.to(dev) for t in (q, k, v, kc, vc))
    tables_d, seq_lens, qsl = (t.to(dev) for t in (meta.block_tables, meta.seq_lens, meta.query_start_loc))
    reshape_and_cache(kd, vd, kcd, vcd, meta.slot_mapping.to(dev))
    for splits in (1, 2):
        out = torch.full(q.shape, float("nan"), device=dev)
        if splits == 1:
            unified_attention(out, qd, kcd, vcd, tables_d, seq_lens, qsl, meta.query_start_loc_host, 1, 0.125)
        else:
            split_kv_decode_attention(out, qd, kcd, vcd, tables_d, seq_lens, 40, 0.125, splits)
        assert rel_err(out.cpu(), expected) < 1e-4
    assert torch.cuda.current_device() == 0


def test_compile_check_specialises_like_the_jit():
    """compile_check compiles what a launch would: 16-byte-aligned pointers and multiple-of-16
    strides carry tt.divisibility=16 (so loads vectorise), a misaligned pointer does not, and
    the arguments that change every step (declared do_not_specialize) carry nothing."""
    from pagedbackend.kernels.compile_check import jit_specialization, recorded_launches

    kc = torch.zeros(kv_cache_shape(4, 2, 16, 64))
    slots = torch.arange(3)
    with recorded_launches() as launches:
        k = torch.zeros(3, 2, 64)
        reshape_and_cache(k, k, kc, kc, slots)
        misaligned = torch.zeros(3 * 2 * 64 + 1)[1:].view(3, 2, 64)  # 4 bytes past an aligned address
        reshape_and_cache(misaligned, k, kc, kc, slots)
    aligned, shifted = (jit_specialization(launch) for launch in launches)
    names = list(aligned.signature)
    divisible = {names[path[0]] for path, attrs in aligned.attrs.items() if ["tt.divisibility", 16] in attrs}
    assert {"key_ptr", "value_ptr", "key_cache_ptr", "slot_ptr", "stride_kt", "stride_kh", "stride_cb",
            "stride_cn"} <= divisible
    assert "num_tokens" not in divisible and aligned.signature["num_tokens"] == "i32"
    assert aligned.constexprs["HEAD_DIM"] == 64 and aligned.signature["HEAD_DIM"] == "constexpr"
    shifted_divisible = {names[path[0]] for path, attrs in shifted.attrs.items() if attrs}
    assert "key_ptr" not in shifted_divisible and "value_ptr" in shifted_divisible


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_exactly_the_given_slots(triton_device, dtype):
    num_blocks, heads, block_size, head_dim = 6, 3, 16, 80
    cache_k = torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dtype, device=triton_device)
    cache_v = cache_k.clone()
    g = torch.Generator().manual_seed(7)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:21]
    slots[[3, 11]] = -1  # padding: not written
    k = torch.randn(21, heads, head_dim, generator=g).to(dtype)
    v = torch.randn(21, heads, head_dim, generator=g).to(dtype)
    reshape_and_cache(k.to(triton_device), v.to(triton_device), cache_k, cache_v, slots.to(triton_device))
    cache_k, cache_v = cache_k.cpu(), cache_v.cpu()
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written[slot // block_size, slot % block_size] = True
        assert torch.equal(cache_k[slot // block_size, :, slot % block_size], k[t])
        assert torch.equal(cache_v[slot // block_size, :, slot % block_size], v[t])
    untouched = ~written[:, None, :, None].expand_as(cache_k)
    assert torch.isnan(cache_k[untouched].float()).all() and torch.isnan(cache_v[untouched].float()).all()


# 32 KV heads: a program per (token block, head), where holding every head in one program spilled.
@pytest.mark.parametrize("num_kv_heads,head_dim,block_t", [(1, 64, 16), (5, 96, 16), (32, 128, 16), (8, 80, 4)])
def test_reshape_and_cache_matches_the_layout_reference_for_any_head_count(triton_device, num_kv_heads, head_dim,
                                                                           block_t):
    """Against a torch scatter through layout.slot_to_rows (the layout written down once): a
    non-contiguous key (a view into a fused QKV row), a token count that is not a multiple of
    the token block, padding slots; the caches start as NaN, so any stray or missing write shows."""
    g = torch.Generator().manual_seed(num_kv_heads * head_dim)
    num_blocks, block_size, num_tokens = 5, 16, 37
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[0, 20, 36]] = -1
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=g)
    key, value = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    shape = kv_cache_shape(num_blocks, num_kv_heads, block_size, head_dim)
    expected_k = torch.full(shape, float("nan"))
    expected_v = expected_k.clone()
    keep = slots >= 0
    rows = slot_to_rows(slots[keep], num_kv_heads, block_size)
    expected_k.view(-1, head_dim)[rows] = key[keep].reshape(-1, head_dim)
    expected_v.view(-1, head_dim)[rows] = value[keep].reshape(-1, head_dim)
    cache_k = torch.full(shape, float("nan"), device=triton_device)
    cache_v = cache_k.clone()
    reshape_and_cache(key.to(triton_device), value.to(triton_device), cache_k, cache_v, slots.to(triton_device),
                      block_t=block_t)
    assert torch.isfinite(expected_k).any()
    torch.testing.assert_close(cache_k.cpu(), expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cache_v.cpu(), expected_v, rtol=0, atol=0, equal_nan=True)


def test_copy_blocks_copies_every_layer_in_one_launch(triton_device):
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(3, 2, 8, 2, 16, 64, generator=g).to(triton_device)
    before = cache.clone()
    pairs = [(1, 5), (2, 6), (7, 0)]
    copy_blocks(cache, torch.tensor(pairs, device=triton_device))
    for src, dst in pairs:
        assert torch.equal(cache[:, :, dst], before[:, :, src])
    untouched = [b for b in range(8) if b not in {d for _, d in pairs}]
    assert torch.equal(cache[:, :, untouched], before[:, :, untouched])


def test_every_production_kernel_variant_compiles_for_sm90_and_sm80():
    """Runs in a subprocess: this test session runs Triton in interpreter mode, and compiling
    needs the real JIT. No GPU is involved: compilation goes down to a cubin on the CPU."""
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


@pytest.mark.skipif(not TRITON_INTERPRETING, reason="exact token equality is a CPU-fp32 check (interpreted kernels)")
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_triton_backend_gives_the_torch_backends_greedy_tokens(name, model_dir, make_engine):
    """The whole engine on the Triton kernels (interpreted, fp32 on the CPU, where the two
    backends' greedy tokens must agree exactly; on a GPU, kernel choices per batch shape make
    near-tied logits flip): chunked prefill, decodes, prefix hits, copy-on-write forks;
    mistral adds MQA and a sliding window."""
    from helpers import random_prompts
    from pagedbackend import SamplingParams

    path = model_dir(name)
    shared = random_prompts([40], 1024, seed=31)[0]
    prompts = [shared + [11, 12, 13], shared + [21], random_prompts([70], 1024, seed=32)[0], [5, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=8, n=2)
    outs = {}
    for backend in ("torch", "triton"):
        llm = make_engine(path, "llm", attention_backend=backend, device="cpu", dtype="float32",
                          max_num_batched_tokens=32, max_num_seqs=8, max_model_len=256)
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        result = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
        outs[backend] = [[c.token_ids for c in o.outputs] for o in result]
        stats = llm.llm_engine.get_stats()
        assert stats["prefix_cache_hits"] > 0 and stats["num_chunked_prefill_steps"] > 0
    assert outs["triton"] == outs["torch"]


@pytest.mark.parametrize("num_seqs", [1, 5, 64])
@pytest.mark.parametrize("group, head_dim", [(1, 64), (4, 128), (8, 256)])
def test_a_decode_steps_program_map_is_built_on_the_device_and_equals_the_host_built_one(num_seqs, group, head_dim):
    from pagedbackend.kernels.paged_attention import decode_program_map, program_map, query_block_shape

    _, block_q = query_block_shape(group, 1, head_dim)
    host = program_map(list(range(num_seqs + 1)), block_q, torch.device("cpu"))
    built = decode_program_map(num_seqs, torch.device("cpu"))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(host, built))
