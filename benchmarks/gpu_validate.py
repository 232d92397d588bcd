#!/usr/bin/env python3
"""One-call GPU validation of pagedbackend (one H100/H200, about 6 minutes).

A GPU machine lent for a check receives only the project checkout, so this script lives in the
project and is adapted as the code changes; `--dry-run` runs every stage on CPU (Triton
interpreter, tiny sizes, ~2-3 minutes) so that a break shows up here, not in the few minutes of
a lent GPU (tests/test_gpu_validate.py runs it).

On the GPU machine (the H200 image has torch 2.11+cu130, triton 3.6 and transformers 5.17
preinstalled and no package registry: install without dependencies), under an 8-minute limit:

    PIP_NO_INDEX=1 python3 -m pip install -q --no-deps --no-build-isolation -e . && \
      PYTHONUNBUFFERED=1 python3 benchmarks/gpu_validate.py --out "$OUT" --budget-s 360

Here, on CPU:

    python benchmarks/gpu_validate.py --dry-run --out /tmp/gv
    python benchmarks/gpu_validate.py --dry-run --stages env,kernels --out /tmp/gv

Stages, each time-boxed, in order of value; every result is appended to OUT/gpu_validate.json
as soon as it exists, so a run cut short still returns what it measured (a stage that would
start after --budget-s is recorded as skipped; one that raises is recorded with its traceback
and the next stage runs; the exit status is 1 if any stage raised):
  env        GPU, driver, torch / triton / transformers versions, SMs, L2
  ceilings   device-to-device copy GB/s (read + write) and bf16 GEMM TFLOP/s on random data
  kernels    the compiled Triton kernels on CUDA tensors against the float64 reference of
             tests/helpers.py (NaN-poisoned outputs, scattered blocks, every dtype, GQA, windows)
  bigindex   a KV slab of more than 2**31 elements: int64 addressing in all four kernels
  bandwidth  decode GB/s (triton.testing.do_bench: L2 flushed, launch gap hidden) vs copy GB/s,
             prefill TFLOP/s, SDPA beside it, and the eager per-launch cost
  recompile  first-call time of split-KV decode as max_seq_len grows (BLOCKS_PER_SPLIT is a constexpr)
  engine     ~1B random Llama (Llama-3.2-1B shape, bf16): tok/s vs HF generate (sequential and
             static batch, HF on the same device), greedy agreement, host/GPU time split per
             step, kernels per step
  async      AsyncLLMEngine's threads on the same engine: concurrent streams vs offline outputs
  pytest     TRITON_INTERPRET=0 subset of the suite (engine on CUDA, HF oracle on CPU); the dry
             run only collects it

What this script touches inside the engine (kept to a few names, so a refactor elsewhere breaks
one line here): the kernels' public functions, `LLMEngine.core.num_steps`, `check_all_blocks_free`,
`scheduler.running / waiting`, and the phase methods listed in `_time_parts` (a renamed one is
reported as "not_found" instead of failing the stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_validate")))
ARGS.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes: checks this script")
ARGS.add_argument("--budget-s", type=float, default=360.0, help="skip stages that would start after this")
ARGS.add_argument("--stages", default="env,ceilings,kernels,bigindex,bandwidth,recompile,engine,async,pytest")
A = ARGS.parse_args()
if A.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: must happen before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
DEV = torch.device("cpu" if A.dry_run else "cuda")
T0 = time.monotonic()
A.out.mkdir(parents=True, exist_ok=True)
RESULTS: dict = {"dry_run": A.dry_run, "stages": {}}
HANDOFF: dict = {}  # the engine stage's LLM, reused by the async stage


def save() -> None:
    (A.out / "gpu_validate.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, flush: bool = True) -> float:
    """Median ms of fn. On CUDA: triton.testing.do_bench, which zeroes a 256 MB buffer before each
    run (L2 flushed, and the launch is queued behind it, so the host's launch gap is hidden)."""
    if DEV.type == "cuda" and flush:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    sync()
    times = []
    for _ in range(3 if A.dry_run else 50):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def to_dev(meta):
    return dataclasses.replace(meta, slot_mapping=meta.slot_mapping.to(DEV), query_start_loc=meta.query_start_loc.to(DEV),
                               seq_lens=meta.seq_lens.to(DEV), block_tables=meta.block_tables.to(DEV), backend_state=None)


# ------------------------------------------------------------------------------------ stages
def stage_env():
    import triton
    import transformers

    info = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    if DEV.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=getattr(p, "L2_cache_size", 0) / 2**20, cc=f"{p.major}.{p.minor}")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,"
                              "temperature.gpu,utilization.gpu", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def stage_ceilings():
    n = (2 if A.dry_run else 2048) * 2**20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), flush=False)
    m = 256 if A.dry_run else 8192
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b, flush=False)
    return {"copy_gbps": round(2 * n / copy_ms / 1e6, 1), "bf16_gemm_tflops": round(2 * m ** 3 / mm_ms / 1e9, 1),
            "copy_bytes": 2 * n, "gemm_m": m}


def stage_kernels():
    from helpers import build_batch, reference, rel_err
    from pagedbackend.kernels.cache_ops import copy_blocks, reshape_and_cache
    from pagedbackend.kernels.paged_attention import split_kv_decode_attention, unified_attention

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    mixed = ([1, 1, 1, 1, 1, 5, 16, 17], [1, 15, 16, 17, 33, 5, 16, 40])
    long = ([1, 1, 1, 120, 33], [700, 513, 17, 600, 33])
    cases = [  # heads, kv heads, block, head_dim, dtype, window, lens
        (8, 2, 16, 64, f32, None, mixed), (8, 1, 16, 64, f32, 12, mixed), (4, 4, 16, 64, f32, None, mixed),
        (4, 2, 32, 80, f32, None, mixed), (4, 2, 32, 256, f32, None, mixed), (4, 1, 64, 64, f32, None, mixed),
        (8, 2, 16, 128, bf16, None, mixed), (32, 8, 16, 128, bf16, None, long), (32, 8, 16, 64, bf16, None, long),
        (8, 2, 32, 128, f16, None, mixed), (4, 4, 16, 80, bf16, None, mixed), (8, 1, 16, 96, f16, 40, long),
        (12, 12, 16, 64, f16, None, mixed), (32, 32, 16, 128, bf16, None, mixed),
    ]
    splits = [(4, 4, 64, None, f32, 2), (8, 2, 80, None, bf16, 4), (8, 1, 64, 40, bf16, 4), (32, 8, 128, None, bf16, 8)]
    if A.dry_run:
        cases, splits = cases[:2] + cases[6:7], splits[:1]
    rows, failures = [], 0
    for h, kvh, bs, d, dt, win, (ql, sl) in cases:
        q, k, v, kc, vc, meta, tables = build_batch(ql, sl, kvh, bs, d, h, dtype=dt, seed=h * d + bs)
        scale = 1 / math.sqrt(d)
        expected = reference(q, k, v, kc, vc, meta, tables, scale, win)
        qd, kd, vd, kcd, vcd, md = q.to(DEV), k.to(DEV), v.to(DEV), kc.to(DEV), vc.to(DEV), to_dev(meta)
        t = time.perf_counter()
        reshape_and_cache(kd, vd, kcd, vcd, md.slot_mapping)
        out = torch.full(q.shape, float("nan"), dtype=dt, device=DEV)
        unified_attention(out, qd, kcd, vcd, md.block_tables, md.seq_lens, md.query_start_loc,
                          md.query_start_loc_host, md.max_query_len, scale, win)
        sync()
        first_s = time.perf_counter() - t
        out = out.cpu()
        written = all(torch.equal(kcd[s // bs, :, s % bs].cpu(), k[i]) and torch.equal(vcd[s // bs, :, s % bs].cpu(), v[i])
                      for i, s in enumerate(meta.slot_mapping.tolist()))
        err = rel_err(out, expected) if torch.isfinite(out).all() else float("nan")
        ok = written and err < tol[dt]
        failures += not ok
        rows.append({"kernel": "unified", "h": h, "kvh": kvh, "bs": bs, "d": d, "dtype": str(dt), "window": win,
                     "rel_err": err, "cache_written": written, "ok": ok, "first_call_s": round(first_s, 2)})
    for h, kvh, d, win, dt, ns in splits:
        sl = [1, 15, 16, 17, 100, 257, 1500]
        q, k, v, kc, vc, meta, tables = build_batch([1] * len(sl), sl, kvh, 16, d, h, dtype=dt, seed=ns * d)
        scale = 1 / math.sqrt(d)
        expected = reference(q, k, v, kc, vc, meta, tables, scale, win)
        qd, kd, vd, kcd, vcd, md = q.to(DEV), k.to(DEV), v.to(DEV), kc.to(DEV), vc.to(DEV), to_dev(meta)
        reshape_and_cache(kd, vd, kcd, vcd, md.slot_mapping)
        out = torch.full(q.shape, float("nan"), dtype=dt, device=DEV)
        split_kv_decode_attention(out, qd, kcd, vcd, md.block_tables, md.seq_lens, max(sl), scale, ns, win)
        out = out.cpu()
        err = rel_err(out, expected) if torch.isfinite(out).all() else float("nan")
        ok = err < tol[dt]
        failures += not ok
        rows.append({"kernel": f"split{ns}", "h": h, "kvh": kvh, "d": d, "dtype": str(dt), "window": win,
                     "rel_err": err, "ok": ok})
    cache = torch.randn(3, 2, 8, 2, 16, 64, device=DEV)
    before = cache.clone()
    pairs = [(1, 5), (2, 6), (7, 0)]
    copy_blocks(cache, torch.tensor(pairs, device=DEV))
    ok = all(torch.equal(cache[:, :, dst], before[:, :, src]) for src, dst in pairs) and \
        torch.equal(cache[:, :, [1, 2, 3, 4, 7]], before[:, :, [1, 2, 3, 4, 7]])
    failures += not ok
    rows.append({"kernel": "copy_blocks", "ok": ok})
    return {"cases": len(rows), "failures": failures, "rows": rows}


def stage_bigindex():
    """Blocks past 2**31 elements of one layer's slab: every kernel must address with int64."""
    from helpers import reference, rel_err
    from pagedbackend.attention.metadata import AttentionMetadata
    from pagedbackend.kernels.cache_ops import copy_blocks, reshape_and_cache
    from pagedbackend.kernels.paged_attention import split_kv_decode_attention, unified_attention

    kvh, bs, d, h, dt = 8, 16, 128, 32, torch.bfloat16
    per_block = kvh * bs * d
    nb = (2**31 // per_block + 64) if not A.dry_run else 80
    big = torch.empty((1, 2, nb, kvh, bs, d), dtype=dt, device=DEV)  # 8.6 GB; only used blocks are filled
    kc, vc = big[0, 0], big[0, 1]
    g = torch.Generator().manual_seed(5)
    seq_lens, q_lens = [300, 40], [1, 40]
    tables = [list(range(nb - 1, nb - 1 - 19, -1)), list(range(nb - 30, nb - 27))]  # highest block ids
    used = sorted({b for t in tables for b in t})
    small_k = torch.randn(len(used), kvh, bs, d, generator=g).to(dt)
    small_v = torch.randn(len(used), kvh, bs, d, generator=g).to(dt)
    kc[used] = small_k.to(DEV)
    vc[used] = small_v.to(DEV)
    remap = {b: i for i, b in enumerate(used)}
    total = sum(q_lens)
    q = torch.randn(total, h, d, generator=g).to(dt)
    k = torch.randn(total, kvh, d, generator=g).to(dt)
    v = torch.randn(total, kvh, d, generator=g).to(dt)
    slots, small_slots = [], []
    for t, ql, s in zip(tables, q_lens, seq_lens):
        for p in range(s - ql, s):
            slots.append(t[p // bs] * bs + p % bs)
            small_slots.append(remap[t[p // bs]] * bs + p % bs)
    width = max(len(t) for t in tables)
    bt = torch.zeros(2, width, dtype=torch.int32)
    sbt = torch.zeros(2, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t)
        sbt[i, :len(t)] = torch.tensor([remap[b] for b in t])
    qsl = [0, 1, 41]

    def meta(slot_list, table):
        return AttentionMetadata(num_decodes=1, num_seqs=2, num_tokens=total, slot_mapping=torch.tensor(slot_list),
                                 query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=table,
                                 max_query_len=40, max_seq_len=300, query_start_loc_host=qsl, seq_lens_host=seq_lens)

    ref_meta = meta(small_slots, sbt)
    expected = reference(q, k, v, small_k, small_v, ref_meta, [[remap[b] for b in t] for t in tables], d ** -0.5, None)
    md = to_dev(meta(slots, bt))
    reshape_and_cache(k.to(DEV), v.to(DEV), kc, vc, md.slot_mapping)
    out = torch.full(q.shape, float("nan"), dtype=dt, device=DEV)
    unified_attention(out, q.to(DEV), kc, vc, md.block_tables, md.seq_lens, md.query_start_loc, qsl, 40, d ** -0.5)
    err_unified = rel_err(out.cpu(), expected)
    # split-KV over the decode sequence alone (row 0)
    out1 = torch.full((1, h, d), float("nan"), dtype=dt, device=DEV)
    split_kv_decode_attention(out1, q[:1].to(DEV), kc, vc, md.block_tables[:1], md.seq_lens[:1], 300, d ** -0.5, 4)
    err_split = rel_err(out1.cpu(), expected[:1])
    copy_blocks(big, torch.tensor([[nb - 1, nb - 2]], device=DEV))
    copied = torch.equal(kc[nb - 2], kc[nb - 1]) and torch.equal(vc[nb - 2], vc[nb - 1])
    slab_elems = nb * per_block
    del big, kc, vc
    return {"slab_elements": slab_elems, "over_2_31": slab_elems > 2**31, "unified_rel_err": err_unified,
            "split_rel_err": err_split, "copy_blocks_ok": copied,
            "ok": err_unified < 1e-2 and err_split < 1e-2 and copied}


def _decode_inputs(b, ctx, h, kvh, d, dt, q_len=1, bs=16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    seq = ctx + q_len
    per_seq = -(-seq // bs)
    nb = b * per_seq
    kc = torch.randn((nb, kvh, bs, d), generator=g, device=DEV, dtype=torch.float32).to(dt)
    vc = torch.randn((nb, kvh, bs, d), generator=g, device=DEV, dtype=torch.float32).to(dt)
    tables = torch.randperm(nb, generator=g, device=DEV).view(b, per_seq).to(torch.int32)
    q = torch.randn((b * q_len, h, d), generator=g, device=DEV, dtype=torch.float32).to(dt)
    starts = [i * q_len for i in range(b + 1)]
    return dict(q=q, kc=kc, vc=vc, tables=tables, seq_lens=torch.full((b,), seq, dtype=torch.int32, device=DEV),
                qsl=torch.tensor(starts, dtype=torch.int32, device=DEV), starts=starts, seq=seq)


def stage_bandwidth():
    import torch.nn.functional as F
    from pagedbackend.kernels.paged_attention import (choose_num_splits, program_map, query_block_shape,
                                                      split_kv_decode_attention, unified_attention)

    copy_gbps = RESULTS["stages"].get("ceilings", {}).get("result", {}).get("copy_gbps")
    dt = torch.bfloat16
    decode = [(1, 1024), (1, 8192), (8, 4096), (64, 1024), (64, 4096), (256, 1024), (256, 2048)]
    heads = [(32, 8, 128), (32, 8, 64)]
    prefill = [(1, 0, 2048), (4, 2048, 512)]
    if A.dry_run:
        decode, heads, prefill = [(2, 64)], [(4, 2, 64)], [(1, 0, 32)]
    rows = []
    for h, kvh, d in heads:
        for b, ctx in decode:
            s = _decode_inputs(b, ctx, h, kvh, d, dt)
            scale = d ** -0.5
            splits = choose_num_splits(b, kvh, s["seq"], 16)
            _, block_q = query_block_shape(h // kvh, 1, d)
            progs = program_map(s["starts"], block_q, DEV)
            out = torch.empty_like(s["q"])

            def ours():
                if splits > 1:
                    split_kv_decode_attention(out, s["q"], s["kc"], s["vc"], s["tables"], s["seq_lens"], s["seq"], scale, splits)
                else:
                    unified_attention(out, s["q"], s["kc"], s["vc"], s["tables"], s["seq_lens"], s["qsl"], s["starts"], 1,
                                      scale, programs=progs)

            ms = bench_ms(ours)
            launches = 2 if splits > 1 else 1
            ours()
            sync()
            t = time.perf_counter()  # eager: back-to-back launches, no flush (host-bound when kernels are short)
            for _ in range(20):
                ours()
            sync()
            eager_us = (time.perf_counter() - t) / 20 * 1e6  # max(launch cost, L2-warm kernel time)
            kv_bytes = 2 * b * s["seq"] * kvh * d * 2 + 2 * s["q"].numel() * 2
            kd = s["kc"][s["tables"].long()].permute(0, 2, 1, 3, 4).reshape(b, kvh, -1, d)[:, :, :s["seq"]].contiguous()
            vd = s["vc"][s["tables"].long()].permute(0, 2, 1, 3, 4).reshape(b, kvh, -1, d)[:, :, :s["seq"]].contiguous()
            qd = s["q"].view(b, 1, h, d).transpose(1, 2)
            try:
                sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True))
            except Exception as e:  # noqa: BLE001
                sdpa_ms = float("nan")
                print("sdpa failed:", e)
            gbps = kv_bytes / ms / 1e6
            rows.append({"case": f"decode b={b} ctx={ctx} h={h}/{kvh} d={d}", "splits": splits, "ms": round(ms, 4),
                         "gbps": round(gbps, 1), "pct_copy_bw": round(100 * gbps / copy_gbps, 1) if copy_gbps else None,
                         "sdpa_ms": round(sdpa_ms, 4), "sdpa_gbps": round(kv_bytes / sdpa_ms / 1e6, 1),
                         "eager_us_per_call": round(eager_us, 1), "launches": launches})
            print(rows[-1], flush=True)
            del s, kd, vd
    for b, ctx, ql in prefill:
        h, kvh, d = (32, 8, 128) if not A.dry_run else (4, 2, 64)
        s = _decode_inputs(b, ctx, h, kvh, d, dt, q_len=ql)
        _, block_q = query_block_shape(h // kvh, ql, d)
        progs = program_map(s["starts"], block_q, DEV)
        out = torch.empty_like(s["q"])
        ms = bench_ms(lambda: unified_attention(out, s["q"], s["kc"], s["vc"], s["tables"], s["seq_lens"], s["qsl"],
                                                s["starts"], ql, d ** -0.5, programs=progs))
        flops = 4 * b * sum(ctx + i + 1 for i in range(ql)) * h * d
        rows.append({"case": f"prefill b={b} ctx={ctx} q={ql} h={h}/{kvh} d={d}", "ms": round(ms, 4),
                     "tflops": round(flops / ms / 1e9, 1)})
        print(rows[-1], flush=True)
    from pagedbackend.kernels.cache_ops import reshape_and_cache

    for kvh, d in ((8, 128), (32, 128)):
        for t in ((256, 8192) if not A.dry_run else (16,)):
            nb = t // 16 + 64
            kc = torch.empty((nb, kvh, 16, d), dtype=dt, device=DEV)
            vc = torch.empty_like(kc)
            k = torch.randn((t, kvh, d), device=DEV).to(dt)
            v = torch.randn_like(k)
            slots = torch.randperm(nb * 16, device=DEV)[:t]
            ms = bench_ms(lambda: reshape_and_cache(k, v, kc, vc, slots))
            moved = 4 * k.numel() * 2
            rows.append({"case": f"reshape_and_cache T={t} kv={kvh} d={d}", "ms": round(ms, 4),
                         "gbps": round(moved / ms / 1e6, 1), "pct_copy_bw": round(100 * moved / ms / 1e6 / copy_gbps, 1)
                         if copy_gbps else None, "sdpa_gbps": float("nan"), "eager_us_per_call": None})
            print(rows[-1], flush=True)
    return {"rows": rows, "copy_gbps": copy_gbps}


def stage_recompile():
    from pagedbackend.kernels.paged_attention import choose_num_splits, split_kv_decode_attention

    rows = []
    h, kvh, d = (32, 8, 128) if not A.dry_run else (4, 2, 64)
    ctxs = [1024, 1025, 1153, 1281, 1409, 1537] if not A.dry_run else [1024, 1153]
    for ctx in ctxs:
        s = _decode_inputs(1, ctx - 1, h, kvh, d, torch.bfloat16, seed=ctx)
        splits = max(2, choose_num_splits(1, kvh, ctx, 16))
        out = torch.empty_like(s["q"])
        times = []
        for _ in range(2):
            t = time.perf_counter()
            split_kv_decode_attention(out, s["q"], s["kc"], s["vc"], s["tables"], s["seq_lens"], ctx, d ** -0.5, splits)
            sync()
            times.append(round((time.perf_counter() - t) * 1e3, 2))
        mb = -(-ctx // 16)
        rows.append({"max_seq_len": ctx, "num_splits": splits, "blocks_per_split": -(-mb // splits),
                     "first_call_ms": times[0], "second_call_ms": times[1]})
        print(rows[-1], flush=True)
    return {"rows": rows}


def _build_1b(path: Path):
    from transformers import AutoModelForCausalLM

    from pagedbackend.tiny_model import make_config, train_tokenizer

    vocab = 1024 if A.dry_run else 32000
    tok = train_tokenizer(vocab, seed=0)
    shape = dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192) \
        if not A.dry_run else dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    cfg = make_config("llama", len(tok), tok, max_position_embeddings=4096, tie_word_embeddings=True,
                      sliding_window=None, rope_scaling=None, init_std=0.02, **shape)
    dtype = torch.float32 if A.dry_run else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    if DEV.type == "cuda":
        torch.cuda.empty_cache()  # else the engine's mem_get_info counts the builder's freed blocks as used
    return n


def _time_parts(engine):
    """Wrap the host-side phases of a step with timers (model forward = launch time on CUDA).

    The phases are named by attribute path from the LLMEngine, so an internal rename only loses
    that phase (listed under "not_found" in the result) instead of failing the whole stage."""
    from collections import defaultdict

    times = defaultdict(list)
    phases = [  # (object path from the engine, method, key in the result)
        ("core.scheduler", "schedule", "schedule"),
        ("runner.batch", "prepare", "prepare_inputs"),
        ("runner", "_tensors", "inputs_to_device"),
        ("runner.model", "forward", "forward_launch"),
        ("runner.model", "compute_logits", "lm_head_launch"),
        ("core.scheduler", "update", "update"),
        ("output_processor", "process", "detokenize_outputs"),
        ("", "step", "step"),
    ]
    wrapped, missing = [], []

    def resolve(path):
        obj = engine
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
        return obj

    for path, name, key in phases:
        obj = resolve(path)
        f = getattr(obj, name, None) if obj is not None else None
        if f is None:
            missing.append(f"{path}.{name}")
            continue

        def w(*a, _f=f, _key=key, **k):
            t = time.perf_counter()
            r = _f(*a, **k)
            times[_key].append(time.perf_counter() - t)
            return r
        setattr(obj, name, w)  # an instance attribute shadows the class's method
        wrapped.append((obj, name))
    # The sampler is called as sampler(...): a call on the instance looks __call__ up on the type.
    sampler_type = type(resolve("runner.sampler"))
    call = sampler_type.__call__

    def sampled(self, *a, **k):
        t = time.perf_counter()
        res = call(self, *a, **k)
        times["sample_and_sync"].append(time.perf_counter() - t)
        return res
    sampler_type.__call__ = sampled

    def restore():
        for obj, name in wrapped:
            delattr(obj, name)
        sampler_type.__call__ = call
    times["not_found"] = missing
    return times, restore


def _profile_steps(engine, n: int):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    sync()
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            engine.step()
        sync()
    wall = time.perf_counter() - t
    from collections import Counter

    kernels = memcpy = 0
    busy_us = 0.0
    names: Counter = Counter()
    for e in prof.events():
        if getattr(e.device_type, "name", "") != "CUDA":
            continue
        if "memcpy" in e.name.lower() or "memset" in e.name.lower():
            memcpy += 1
        else:
            kernels += 1
            names[e.name[:70]] += 1
        busy_us += e.time_range.elapsed_us()
    return {"steps": n, "wall_ms_per_step": round(wall / n * 1e3, 3), "kernels_per_step": kernels / n,
            "memcpy_memset_per_step": memcpy / n, "gpu_busy_ms_per_step": round(busy_us / n / 1e3, 3),
            "gpu_busy_fraction": round(busy_us / 1e6 / wall, 3) if wall else None,
            "top_kernels_per_step": {k: v / n for k, v in names.most_common(12)}}


def stage_engine():
    from transformers import AutoModelForCausalLM

    from pagedbackend import LLM, SamplingParams

    path = Path(tempfile.mkdtemp(prefix="pb1b-"))
    t = time.perf_counter()
    params_n = _build_1b(path)
    res = {"params": params_n, "build_s": round(time.perf_counter() - t, 1)}
    rng = random.Random(0)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    n_req, max_tokens = (256, 128) if not A.dry_run else (8, 8)
    lo, hi = (128, 512) if not A.dry_run else (8, 32)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n_req)]
    t = time.perf_counter()
    llm = LLM(str(path), dtype="float32" if A.dry_run else "bfloat16", max_num_seqs=256, max_num_batched_tokens=8192,
              enable_prefix_caching=False, max_model_len=1024,
              **({"attention_backend": "triton", "num_kv_blocks": 512} if A.dry_run else {}))
    eng = llm.llm_engine
    res.update(load_s=round(time.perf_counter() - t, 1), num_kv_blocks=eng.config.num_kv_blocks,
               attention_backend=eng.config.attention_backend, dtype=str(eng.config.dtype),
               # CUDA-graph decode, where the engine has it (getattr: the setting is new)
               padded_decode=getattr(eng.config, "padded_decode", None),
               cuda_graphs=getattr(eng.config, "cuda_graphs", None))
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()  # first requests pay the Triton JIT compiles (no warm-up in the engine)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    res["first_generate_s"] = round(time.perf_counter() - t, 2)
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)  # warm every shape of the run
    runs = []
    for _ in range(2):
        sync()
        steps0 = eng.core.num_steps
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        sync()
        runs.append((time.perf_counter() - t, eng.core.num_steps - steps0))
    elapsed, steps = min(runs)
    ours = [o.outputs[0].token_ids for o in outs]
    gen = n_req * max_tokens
    res.update(elapsed_s=[round(r[0], 3) for r in runs], steps=steps, gen_tok_s=round(gen / elapsed, 1),
               total_tok_s=round((gen + sum(map(len, prompts))) / elapsed, 1), ms_per_step=round(elapsed / steps * 1e3, 2))
    print({k: res[k] for k in ("gen_tok_s", "ms_per_step", "first_generate_s")}, flush=True)

    # Steady decode at batch 256 and batch 1: host phases and profiler counts. The requests are
    # aborted once measured (finishing them would add nothing but time, 64 steps under the interpreter).
    warm_steps, timed_steps, profiled_steps = (1, 3, 1) if A.dry_run else (3, 10, 3)
    for label, batch in (("b256", n_req), ("b1", 1)):
        ids = [f"{label}-{i}" for i in range(batch)]
        for rid, p in zip(ids, prompts):
            eng.add_request(rid, {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
        while any(s.num_computed_tokens < s.prompt_len for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        for _ in range(warm_steps):
            eng.step()
        times, restore = _time_parts(eng)
        try:
            for _ in range(timed_steps):
                eng.step()
        finally:
            restore()
        missing = times.pop("not_found")
        res[f"host_ms_{label}"] = {k: round(1e3 * statistics.median(v), 3) for k, v in times.items() if v}
        if missing:
            res[f"host_ms_{label}"]["not_found"] = missing
        res[f"profile_{label}"] = _profile_steps(eng, profiled_steps)
        print(label, res[f"host_ms_{label}"], res[f"profile_{label}"], flush=True)
        for rid in ids:
            eng.abort_request(rid)
        eng.check_all_blocks_free()  # aborts must give every block back

    # transformers: sequential (first 4 requests) and static batches of 64 with left padding.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if A.dry_run else torch.bfloat16,
                                              attn_implementation="sdpa").to(DEV).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    seq_n = 4 if not A.dry_run else 2
    with torch.inference_mode():
        sync()
        t = time.perf_counter()
        seq_out = []
        for p in prompts[:seq_n]:
            ids = torch.tensor([p], device=DEV)
            o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
            seq_out.append(o[0, len(p):].tolist())
        sync()
        res["hf_sequential_tok_s"] = round(seq_n * max_tokens / (time.perf_counter() - t), 1)
        bsz = 64 if not A.dry_run else 4
        static_out = []
        sync()
        t = time.perf_counter()
        for i in range(0, n_req, bsz):
            batch = prompts[i:i + bsz]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(batch):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            o = hf.generate(ids.to(DEV), attention_mask=mask.to(DEV), max_new_tokens=max_tokens, do_sample=False)
            static_out += [o[j, width:].tolist() for j in range(len(batch))]
        sync()
        res["hf_static64_tok_s"] = round(gen / (time.perf_counter() - t), 1)

    def prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    res["agree_vs_hf_sequential_exact"] = f"{sum(a == b for a, b in zip(ours, seq_out))}/{seq_n}"
    res["agree_vs_hf_static_exact"] = f"{sum(a == b for a, b in zip(ours, static_out))}/{n_req}"
    res["mean_common_prefix_vs_hf_static"] = round(statistics.mean(prefix(a, b) for a, b in zip(ours, static_out)), 1)
    res["speedup_vs_hf_static64"] = round(res["gen_tok_s"] / res["hf_static64_tok_s"], 2)
    res["speedup_vs_hf_sequential"] = round(res["gen_tok_s"] / res["hf_sequential_tok_s"], 2)
    del hf
    HANDOFF["engine"] = (llm, prompts[:32], ours[:32], max_tokens)
    return res


def stage_async():
    from pagedbackend import AsyncLLMEngine, SamplingParams

    llm, prompts, expected, max_tokens = HANDOFF.pop("engine")
    engine = AsyncLLMEngine(llm.llm_engine)  # the same LLMEngine, now driven by the loop thread
    results: dict[int, list[int]] = {}

    def client(i):
        tokens = []
        for out in engine.submit({"prompt_token_ids": prompts[i]},
                                 SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)):
            tokens = out.outputs[0].token_ids
        results[i] = list(tokens)
    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    elapsed = time.perf_counter() - t
    engine.shutdown()
    same = sum(results.get(i) == list(expected[i]) for i in range(len(prompts)))
    return {"streams": len(prompts), "completed": len(results), "equal_to_offline": f"{same}/{len(prompts)}",
            "elapsed_s": round(elapsed, 2)}


PYTEST_FILES = ["tests/test_parity.py", "tests/test_sampling.py", "tests/test_logprobs.py"]


def stage_pytest():
    """A slice of the suite with compiled kernels (TRITON_INTERPRET=0): the engine tests pick
    CUDA + triton there, the HF oracle stays on CPU. The dry run only collects the same slice
    (the suite itself runs on CPU in CI), which still catches a renamed file or a broken import."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"ran": False, "reason": "pytest is not installed in this Python"}
    remaining = A.budget_s - (time.monotonic() - T0)
    env = {**os.environ, "TRITON_INTERPRET": "1" if A.dry_run else "0"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=10", *PYTEST_FILES,
           "-k", "not cpu"]
    if A.dry_run:
        cmd.append("--collect-only")
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=120")
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30, remaining - 15))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        (A.out / "pytest.log").write_text(out)
        return {"ran": True, "returncode": "timeout", "tail": out[-1500:]}
    log = done.stdout + done.stderr
    (A.out / "pytest.log").write_text(log)
    lines = log.strip().splitlines()
    return {"ran": True, "collect_only": A.dry_run, "returncode": done.returncode,
            "summary": lines[-1] if lines else "", "tail": log[-1500:]}


STAGES = {"env": stage_env, "ceilings": stage_ceilings, "kernels": stage_kernels, "bigindex": stage_bigindex,
          "bandwidth": stage_bandwidth, "recompile": stage_recompile, "engine": stage_engine, "async": stage_async,
          "pytest": stage_pytest}


def main() -> int:
    wanted = [s for s in A.stages.split(",") if s]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        ARGS.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    for name in wanted:
        spent = time.monotonic() - T0
        if spent > A.budget_s:
            RESULTS["stages"][name] = {"skipped": f"budget spent ({spent:.0f}s)"}
            save()
            continue
        if name == "async" and "engine" not in HANDOFF:
            RESULTS["stages"][name] = {"skipped": "needs the engine stage"}
            continue
        print(f"=== {name} (t={spent:.0f}s)", flush=True)
        t = time.perf_counter()
        try:
            RESULTS["stages"][name] = {"result": STAGES[name](), "seconds": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001 - report and go on to the next stage
            RESULTS["stages"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:],
                                       "seconds": round(time.perf_counter() - t, 1)}
            print(traceback.format_exc(), flush=True)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        save()
    HANDOFF.clear()
    save()
    print("\n=== summary (full numbers in gpu_validate.json)")
    for name, st in RESULTS["stages"].items():
        r = st.get("result", {})
        if "error" in st or "skipped" in st:
            print(f"{name:10s} {st.get('error') or st.get('skipped')}")
        elif name == "kernels":
            print(f"{name:10s} {r['cases'] - r['failures']}/{r['cases']} ok; worst rel_err "
                  f"{max((x.get('rel_err') or 0) for x in r['rows']):.2e}")
        elif name == "bandwidth":
            for x in r["rows"]:
                print(f"{name:10s} {x['case']:40s} {x['ms']:8.4f} ms " + (f"{x['gbps']:7.0f} GB/s {x['pct_copy_bw']}% "
                      f"(SDPA {x['sdpa_gbps']:.0f}) eager {x['eager_us_per_call']} us" if "gbps" in x else f"{x['tflops']} TFLOP/s"))
        elif name == "engine":
            keep = ("gen_tok_s", "ms_per_step", "hf_static64_tok_s", "hf_sequential_tok_s", "speedup_vs_hf_static64",
                    "agree_vs_hf_static_exact", "first_generate_s", "profile_b256", "profile_b1")
            print(f"{name:10s} " + json.dumps({k: r.get(k) for k in keep}))
        else:
            print(f"{name:10s} {json.dumps(r)[:400]}")
    return 1 if any("error" in st for st in RESULTS["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
