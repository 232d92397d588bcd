"""Paged-attention kernel speed on a CUDA GPU, against the memory-bandwidth roofline.

    python benchmarks/kernels.py                 # all cases, fp16
    python benchmarks/kernels.py --dtype bf16 --quick
    python benchmarks/kernels.py --list          # print the cases (works without a GPU)

Decode is memory-bound: the table gives achieved GB/s (K and V read once, plus q and out)
and its fraction of this device's measured device-to-device copy bandwidth (goal: >= 80% at
batch >= 64, context >= 1024). Prefill gives TFLOP/s. Beside each, torch's
scaled_dot_product_attention on the same data gathered into contiguous tensors (the gather is
not timed). Timings are medians over many runs with inputs rotated among copies that together
exceed the L2 cache, so every run reads from HBM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (bytes read + written), the practical roofline."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e9


def build(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """A batch with physically scattered blocks, K/V already cached."""
    seq_len = case.context + case.query
    blocks_per_seq = -(-seq_len // case.block_size)
    num_blocks = case.batch * blocks_per_seq
    shape = (num_blocks, case.num_kv_heads, case.block_size, case.head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    value_cache = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    block_tables = perm.view(case.batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(case.batch * case.query, case.num_heads, case.head_dim, generator=gen, device=device,
                    dtype=torch.float32).to(dtype)
    starts = [i * case.query for i in range(case.batch + 1)]
    seq_lens = torch.full((case.batch,), seq_len, dtype=torch.int32, device=device)
    return dict(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables, seq_lens=seq_lens,
                query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device), query_start_loc_host=starts)


def time_cuda(fn, sets, iters: int) -> float:
    for s in sets:
        fn(s)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        s = sets[i % len(sets)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(s)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def run_case(case: Case, dtype: torch.dtype, device: torch.device, iters: int, l2_bytes: int) -> dict:
    from pagedbackend.kernels.paged_attention import choose_num_splits, split_kv_decode_attention, unified_attention

    gen = torch.Generator(device=device).manual_seed(0)
    first = build(case, dtype, device, gen)
    cache_bytes = 2 * first["key_cache"].numel() * first["key_cache"].element_size()
    copies = max(1, min(8, -(-2 * l2_bytes // max(cache_bytes, 1))))  # rotate past the L2 cache
    sets = [first] + [build(case, dtype, device, gen) for _ in range(copies - 1)]
    scale = case.head_dim ** -0.5
    seq_len = case.context + case.query
    splits = choose_num_splits(case.batch, case.num_kv_heads, seq_len, case.block_size) if case.kind == "decode" else 1

    def ours(s):
        out = torch.empty_like(s["q"])
        if splits > 1:
            split_kv_decode_attention(out, s["q"], s["key_cache"], s["value_cache"], s["block_tables"], s["seq_lens"],
                                      seq_len, scale, splits)
        else:
            unified_attention(out, s["q"], s["key_cache"], s["value_cache"], s["block_tables"], s["seq_lens"],
                              s["query_start_loc"], s["query_start_loc_host"], case.query, scale)

    def gathered(s):
        """K/V per sequence, contiguous [batch, kv_heads, seq_len, d] (built outside the timing)."""
        k = s["key_cache"][s["block_tables"].long()].permute(0, 2, 1, 3, 4).reshape(
            case.batch, case.num_kv_heads, -1, case.head_dim)[:, :, :seq_len]
        v = s["value_cache"][s["block_tables"].long()].permute(0, 2, 1, 3, 4).reshape(
            case.batch, case.num_kv_heads, -1, case.head_dim)[:, :, :seq_len]
        q = s["q"].view(case.batch, case.query, case.num_heads, case.head_dim).transpose(1, 2)
        return q, k.contiguous(), v.contiguous()

    dense = [gathered(s) for s in sets]
    causal = torch.ones(case.query, seq_len, dtype=torch.bool, device=device).tril(seq_len - case.query)

    def sdpa(i):
        q, k, v = dense[i]
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if case.query == 1 else causal,
                                                         enable_gqa=case.num_heads != case.num_kv_heads, scale=scale)

    t_ours = time_cuda(ours, sets, iters)
    t_sdpa = time_cuda(sdpa, list(range(len(sets))), iters)
    elem = first["q"].element_size()
    kv_bytes = 2 * case.batch * seq_len * case.num_kv_heads * case.head_dim * elem
    io_bytes = kv_bytes + 2 * first["q"].numel() * elem
    # Causal prefill: query i sees context + i + 1 keys.
    pairs = case.batch * sum(case.context + i + 1 for i in range(case.query))
    flops = 4 * pairs * case.num_heads * case.head_dim
    return {"case": case.label(), "kind": case.kind, "splits": splits, "ours_ms": t_ours * 1e3, "sdpa_ms": t_sdpa * 1e3,
            "ours_gbps": io_bytes / t_ours / 1e9, "sdpa_gbps": io_bytes / t_sdpa / 1e9,
            "ours_tflops": flops / t_ours / 1e12, "sdpa_tflops": flops / t_sdpa / 1e12}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp16", choices=DTYPES)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--out", type=Path, default=OUT / "kernels.json")
    args = p.parse_args()
    if args.list:
        for c in cases(args.quick):
            print(c.label())
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels are compiled for it); "
              "on CPU, tests/test_triton_kernels.py checks them in the interpreter")
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    bandwidth = copy_bandwidth(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    print(f"{props.name} | {args.dtype} | copy bandwidth {bandwidth:.0f} GB/s | L2 {l2 / 2**20:.0f} MiB | "
          f"torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M')}\n")
    rows = []
    print("| case | splits | ours ms | GB/s | % copy BW | TFLOP/s | SDPA ms | SDPA GB/s | SDPA TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases(args.quick):
        r = run_case(case, DTYPES[args.dtype], device, args.iters, l2)
        r["pct_copy_bw"] = 100 * r["ours_gbps"] / bandwidth
        rows.append(r)
        print(f"| {r['case']} | {r['splits']} | {r['ours_ms']:.3f} | {r['ours_gbps']:.0f} | {r['pct_copy_bw']:.0f}% | "
              f"{r['ours_tflops']:.1f} | {r['sdpa_ms']:.3f} | {r['sdpa_gbps']:.0f} | {r['sdpa_tflops']:.1f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": props.name, "dtype": args.dtype, "copy_bandwidth_gbps": bandwidth,
                                    "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
