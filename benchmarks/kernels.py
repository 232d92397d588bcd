"""Paged-attention kernel speed on a CUDA GPU, against the memory-bandwidth roofline.

    python benchmarks/kernels.py                 # all cases, bf16 (the dtype models run in)
    python benchmarks/kernels.py --dtype fp16 --quick
    python benchmarks/kernels.py --list          # print the cases (works without a GPU)
    python benchmarks/kernels.py --dry-run       # CPU, Triton interpreter, tiny cases: checks the script

Decode is memory-bound: the table gives achieved GB/s (K and V read once, plus q and out) and
its fraction of this device's measured device-to-device copy bandwidth (goal: >= 80% at batch
>= 64, context >= 1024). Prefill gives TFLOP/s. Beside each, torch's
scaled_dot_product_attention on the same data gathered into contiguous tensors (the gather is
not timed), and the largest difference between the two outputs (a fast wrong kernel is no result).

How the timing avoids the two ways such numbers lie (benchmarks on an H200 read its 60 MB L2
and the host's launch gaps before):
* Beyond L2. Each case's inputs are built in as many copies as it takes for the copies together
  to exceed twice this device's L2 cache (`rotation_copies`, from the device's properties), and
  consecutive launches cycle through them, so every launch reads K/V from HBM. A b=1 decode
  case (~4 MB of K/V) gets ~30 copies on an H200; one of several GB gets one.
* No launch gaps. A window of many back-to-back launches is timed between two CUDA events, and
  a spin kernel (`torch.cuda._sleep`) queued in front of the window keeps the GPU busy while the
  host enqueues it, so the events measure GPU execution only, not Python's ~20-40 us per Triton
  launch. The reported time is the median over windows of (window time / launches). Without
  `torch.cuda._sleep` it falls back to `triton.testing.do_bench` (L2 flushed before each call).

Without a GPU the script says so and exits 2, except with --list or --dry-run; on CPU,
tests/test_triton_kernels.py checks the kernels' results in the interpreter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIN_LAUNCHES_PER_WINDOW = 32  # enough that the two events' own cost is noise beside the window


@dataclass
class Case:
    kind: str  # "decode" | "prefill"
    batch: int
    context: int  # tokens per sequence before this step
    query: int  # new tokens per sequence (1 for decode)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16

    def label(self) -> str:
        return (f"{self.kind} b={self.batch} ctx={self.context} q={self.query} "
                f"h={self.num_heads}/{self.num_kv_heads} d={self.head_dim}")

    @property
    def seq_len(self) -> int:
        return self.context + self.query

    def io_bytes(self, elem: int) -> int:
        """Bytes a kernel must move at least: every cached K and V once, q read, out written."""
        kv = 2 * self.batch * self.seq_len * self.num_kv_heads * self.head_dim * elem
        return kv + 2 * self.batch * self.query * self.num_heads * self.head_dim * elem

    def flops(self) -> int:
        """QK^T and PV FLOPs of causal attention: query i of a sequence sees context + i + 1 keys."""
        pairs = self.batch * sum(self.context + i + 1 for i in range(self.query))
        return 4 * pairs * self.num_heads * self.head_dim


def cases(quick: bool) -> list[Case]:
    out = []
    for batch, context in [(1, 1024), (8, 4096), (64, 1024), (64, 4096), (256, 1024), (256, 2048)]:
        for heads, kv_heads, dim in [(32, 8, 128), (32, 32, 128), (16, 16, 64)]:
            out.append(Case("decode", batch, context, 1, heads, kv_heads, dim))
    for batch, context, query in [(1, 0, 2048), (4, 0, 1024), (4, 2048, 512), (16, 0, 512)]:
        out.append(Case("prefill", batch, context, query, 32, 8, 128))
    if quick:
        out = [c for c in out if (c.kind == "decode" and c.batch in (1, 64)) or c.batch == 4]
    return out


def dry_run_cases() -> list[Case]:
    """Tiny shapes for --dry-run: one decode (unified kernel), one split-KV decode, one prefill."""
    return [Case("decode", 2, 64, 1, 4, 2, 64), Case("decode", 1, 1100, 1, 4, 2, 64),
            Case("prefill", 1, 16, 32, 4, 2, 64)]


def rotation_copies(set_bytes: int, l2_bytes: int, budget_bytes: int) -> int:
    """How many copies of one case's inputs to cycle through so the copies together exceed
    twice the L2 cache (with an LRU-ish L2, data touched one working set ago is gone), capped
    by the memory `budget_bytes` allows; at least one."""
    wanted = -(-2 * l2_bytes // max(set_bytes, 1)) + 1  # strictly more than 2x L2
    if set_bytes >= 2 * l2_bytes:
        wanted = 1  # one copy already streams past the cache on every launch
    return max(1, min(wanted, budget_bytes // max(set_bytes, 1)))


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (bytes read + written), the practical roofline."""
    src = torch.empty(1024 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_gpu(lambda _: dst.copy_(src), [None], windows=10, min_launches=4) / 1e9


def build(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
    """A batch with physically scattered blocks, K/V already cached, and the output buffer and
    program map the engine would prepare once per step."""
    blocks_per_seq = -(-case.seq_len // case.block_size)
    num_blocks = case.batch * blocks_per_seq
    shape = (num_blocks, case.num_kv_heads, case.block_size, case.head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    value_cache = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    block_tables = perm.view(case.batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(case.batch * case.query, case.num_heads, case.head_dim, generator=gen, device=device,
                    dtype=torch.float32).to(dtype)
    starts = [i * case.query for i in range(case.batch + 1)]
    seq_lens = torch.full((case.batch,), case.seq_len, dtype=torch.int32, device=device)
    return dict(q=q, out=torch.empty_like(q), key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                seq_lens=seq_lens, query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
                query_start_loc_host=starts)


def set_bytes(s: dict) -> int:
    """Device bytes of one built input set (caches, tables, q, out): what rotation must cover."""
    return sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))


def _spin_cycles_per_second() -> float:
    """Clock of torch.cuda._sleep's spin loop, measured (the SM clock varies with boost)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    torch.cuda._sleep(cycles // 10)  # wake the clock up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def time_gpu(fn, sets: list, windows: int = 15, min_launches: int = MIN_LAUNCHES_PER_WINDOW) -> float:
    """Median seconds per launch of `fn(set)`, cycling through `sets`: see the module docstring.
    Each window launches every set the same number of times."""
    for s in sets:  # compile, first touch
        fn(s)
    torch.cuda.synchronize()
    n = len(sets) * max(1, -(-min_launches // len(sets)))
    if not hasattr(torch.cuda, "_sleep"):
        from triton.testing import do_bench

        it = iter(range(1 << 62))
        return do_bench(lambda: fn(sets[next(it) % len(sets)]), warmup=25, rep=100, return_mode="median") / 1e3
    t = time.perf_counter()  # host time to enqueue one window: the spin in front must outlast it
    for i in range(n):
        fn(sets[i % len(sets)])
    host_s = time.perf_counter() - t
    torch.cuda.synchronize()
    spin = int(min(2 * host_s + 1e-3, 1.0) * _spin_cycles_per_second())
    times = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin)
        start.record()
        for i in range(n):
            fn(sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(times)


def time_cpu(fn, sets: list, windows: int = 3, min_launches: int = 1) -> float:
    """--dry-run's stand-in for time_gpu: wall time per call (meaningless under the interpreter,
    but it drives the same code path)."""
    for s in sets:
        fn(s)
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        for s in sets:
            fn(s)
        times.append((time.perf_counter() - t) / len(sets))
    return statistics.median(times)


def run_case(case: Case, dtype: torch.dtype, device: torch.device, windows: int, l2_bytes: int,
             budget_bytes: int, num_sms: int | None) -> dict:
    from pagedbackend.kernels.paged_attention import (choose_num_splits, program_map, query_block_shape,
                                                      split_kv_decode_attention, unified_attention)

    gen = torch.Generator(device=device).manual_seed(0)
    first = build(case, dtype, device, gen)
    # The SDPA side keeps a gathered dense copy of each set (about as large): half the budget each.
    copies = rotation_copies(set_bytes(first), l2_bytes, budget_bytes // 2)
    sets = [first] + [build(case, dtype, device, gen) for _ in range(copies - 1)]
    scale = case.head_dim ** -0.5
    seq_len = case.seq_len
    splits = (choose_num_splits(case.batch, case.num_kv_heads, seq_len, case.block_size, num_sms=num_sms)
              if case.kind == "decode" else 1)
    _, block_q = query_block_shape(case.num_heads // case.num_kv_heads, case.query, case.head_dim)
    for s in sets:  # computed once per step by the engine and shared by every layer: not timed
        s["programs"] = program_map(s["query_start_loc_host"], block_q, device)

    def ours(s):
        if splits > 1:
            split_kv_decode_attention(s["out"], s["q"], s["key_cache"], s["value_cache"], s["block_tables"],
                                      s["seq_lens"], seq_len, scale, splits)
        else:
            unified_attention(s["out"], s["q"], s["key_cache"], s["value_cache"], s["block_tables"], s["seq_lens"],
                              s["query_start_loc"], s["query_start_loc_host"], case.query, scale,
                              programs=s["programs"])

    def gathered(s):
        """K/V per sequence, contiguous [batch, kv_heads, seq_len, d] (built outside the timing)."""
        tables = s["block_tables"].long()
        k, v = (c[tables].permute(0, 2, 1, 3, 4).reshape(case.batch, case.num_kv_heads, -1, case.head_dim)[:, :, :seq_len]
                for c in (s["key_cache"], s["value_cache"]))
        q = s["q"].view(case.batch, case.query, case.num_heads, case.head_dim).transpose(1, 2)
        return q, k.contiguous(), v.contiguous()

    dense = [gathered(s) for s in sets]
    causal = torch.ones(case.query, seq_len, dtype=torch.bool, device=device).tril(seq_len - case.query)

    def sdpa(dq):
        q, k, v = dq
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if case.query == 1 else causal, enable_gqa=case.num_heads != case.num_kv_heads,
            scale=scale)

    ours(first)
    expected = sdpa(dense[0]).transpose(1, 2).reshape(first["out"].shape)
    max_err = (first["out"].float() - expected.float()).abs().max().item()
    timer = time_gpu if device.type == "cuda" else time_cpu
    t_ours = timer(ours, sets, windows)
    t_sdpa = timer(sdpa, dense, windows)
    elem = first["q"].element_size()
    io, flops = case.io_bytes(elem), case.flops()
    working = copies * set_bytes(first)  # what the paged kernel cycles through (SDPA's copies are as large)
    return {"case": case.label(), "kind": case.kind, "splits": splits, "copies": copies,
            "working_set_mib": round(working / 2**20, 1), "beyond_2x_l2": working > 2 * l2_bytes,
            "ours_ms": t_ours * 1e3, "sdpa_ms": t_sdpa * 1e3, "ours_gbps": io / t_ours / 1e9, "sdpa_gbps": io / t_sdpa / 1e9,
            "ours_tflops": flops / t_ours / 1e12, "sdpa_tflops": flops / t_sdpa / 1e12, "max_abs_err_vs_sdpa": max_err}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--windows", type=int, default=15, help="timed windows per case (median reported)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + Triton interpreter on tiny cases (fp32, a pretend 256 KiB L2): checks the script, times nothing")
    p.add_argument("--memory-fraction", type=float, default=0.25,
                   help="share of free device memory the rotated copies of one case may take")
    p.add_argument("--out", type=Path, default=OUT / "kernels.json")
    args = p.parse_args()
    if args.list:
        for c in cases(args.quick):
            print(c.label())
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        device, dtype, l2, budget, num_sms = torch.device("cpu"), torch.float32, 256 * 2**10, 64 * 2**20, 132
        name, bandwidth, todo = "cpu (dry run: timings are the interpreter's)", float("nan"), dry_run_cases()
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels are compiled for it); --dry-run checks "
              "the script on CPU, and tests/test_triton_kernels.py checks the kernels in the interpreter")
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        dtype, num_sms, name, todo = DTYPES[args.dtype], props.multi_processor_count, props.name, cases(args.quick)
        l2 = getattr(props, "L2_cache_size", 0) or 60 * 2**20
        budget = int(args.memory_fraction * torch.cuda.mem_get_info(device)[0])
        bandwidth = copy_bandwidth(device)
    print(f"{name} | {dtype} | copy bandwidth {bandwidth:.0f} GB/s | L2 {l2 / 2**20:g} MiB (inputs rotated past "
          f"{2 * l2 / 2**20:g} MiB) | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M')}\n")
    rows = []
    print("| case | splits | copies | ours ms | GB/s | % copy BW | TFLOP/s | SDPA ms | SDPA GB/s | SDPA TFLOP/s | max err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in todo:
        r = run_case(case, dtype, device, args.windows, l2, budget, num_sms)
        r["pct_copy_bw"] = 100 * r["ours_gbps"] / bandwidth if bandwidth == bandwidth else None
        rows.append(r)
        pct = f"{r['pct_copy_bw']:.0f}%" if r["pct_copy_bw"] is not None else "-"
        print(f"| {r['case']} | {r['splits']} | {r['copies']} | {r['ours_ms']:.3f} | {r['ours_gbps']:.0f} | {pct} | "
              f"{r['ours_tflops']:.1f} | {r['sdpa_ms']:.3f} | {r['sdpa_gbps']:.0f} | {r['sdpa_tflops']:.1f} | "
              f"{r['max_abs_err_vs_sdpa']:.1e} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "dtype": str(dtype), "dry_run": args.dry_run, "l2_bytes": l2,
                                    "copy_bandwidth_gbps": None if math.isnan(bandwidth) else bandwidth,
                                    "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
