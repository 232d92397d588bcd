"""Tensor parallelism on this machine: the reference workload at TP=1 (2 threads) and TP=2
(1 thread per rank, gloo over 127.0.0.1), alternating, best and median of `--repeat`.

Prints generated tok/s, the share of rank 0's step time spent in collectives (the model's
all-reduces and the logits all-gather, timed on rank 0: waiting for the other rank included),
the bytes all-reduced / gathered per step, and checks that greedy outputs are identical. Then,
on paper, what the same split costs on NVLink GPUs: per-layer all-reduce size x layers against
an all-reduce bus bandwidth measured elsewhere (`--nvlink-busbw-gbs`, default 360 GB/s: the
order nccl-tests report for H100 NVLink 4 at large sizes) plus a fixed per-call latency, for a
70B-class shape.

On 2 CPU cores TP is not expected to be faster: this measures what it costs, not a speed-up.

    python benchmarks/tensor_parallel.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, random_token_workload, reference_model  # noqa: E402


class CollectiveTimer:
    """Wraps the model's collectives on this rank (rank 0): seconds, calls, bytes."""

    def __init__(self) -> None:
        import pagedbackend.models.layers as layers

        self.layers = layers
        self.seconds = 0.0
        self.bytes = 0
        self.calls = 0
        self._orig = (layers.tp_all_reduce, layers.tp_all_gather)
        layers.tp_all_reduce = self._wrap(layers.tp_all_reduce, gather=False)
        layers.tp_all_gather = self._wrap(layers.tp_all_gather, gather=True)

    def _wrap(self, fn, gather: bool):
        def timed(x):
            t0 = time.perf_counter()
            y = fn(x)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.bytes += (y if gather else x).numel() * x.element_size()
            return y
        return timed

    def reset(self) -> None:
        self.seconds, self.bytes, self.calls = 0.0, 0, 0

    def close(self) -> None:
        self.layers.tp_all_reduce, self.layers.tp_all_gather = self._orig


def run(model: Path, tp: int, requests, args) -> dict:
    from pagedbackend import LLM, SamplingParams

    torch.set_num_threads(args.threads)  # TP=2 gives each rank threads // 2
    llm = LLM(str(model), tensor_parallel_size=tp, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    timer = CollectiveTimer() if tp > 1 else None
    try:
        warm = [{"prompt_token_ids": list(range(10, 74))}] * 4
        llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        steps0 = llm.llm_engine.get_stats()["steps"]
        if timer:
            timer.reset()
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        steps = llm.llm_engine.get_stats()["steps"] - steps0
        llm.llm_engine.check_all_blocks_free()
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"tp": tp, "elapsed_s": elapsed, "gen_tok_s": generated / elapsed, "steps": steps,
                "collective_share": (timer.seconds / elapsed) if timer else 0.0,
                "collective_bytes_per_step": (timer.bytes / steps) if timer else 0,
                "collectives_per_step": (timer.calls / steps) if timer else 0,
                "tokens": [o.outputs[0].token_ids for o in outs]}
    finally:
        if timer:
            timer.close()
        llm.shutdown()


def nvlink_estimate(args) -> list[str]:
    """Decode step of a 70B-class model (Llama-3-70B shape: hidden 8192, 80 layers, bf16) at
    `--decode-batch` sequences: two all-reduces per layer of [batch, hidden], ring algorithm."""
    hidden, layers, elem = args.paper_hidden, args.paper_layers, 2
    size = args.decode_batch * hidden * elem
    lines = [f"\nOn paper: {layers} layers x 2 all-reduces of [{args.decode_batch} x {hidden}] bf16 = "
             f"{size / 2**20:.1f} MiB each, per decode step; all-reduce bus bandwidth {args.nvlink_busbw_gbs:g} GB/s "
             f"(an assumption: nccl-tests on NVLink 4), {args.nvlink_latency_us:g} us latency per call"]
    lines.append(f"{'TP':>4} {'per call us':>12} {'per step ms':>12}")
    for tp in (2, 4, 8):
        # A ring all-reduce moves 2(n-1)/n of the buffer over each GPU's link (nccl-tests'
        # busbw is that traffic per second).
        per_call = 2 * (tp - 1) / tp * size / (args.nvlink_busbw_gbs * 1e9) * 1e6 + args.nvlink_latency_us
        lines.append(f"{tp:>4} {per_call:12.1f} {2 * layers * per_call / 1000:12.2f}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the 56M reference Llama (built if missing)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads in all (TP=2: half per rank)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--paper-hidden", type=int, default=8192)
    p.add_argument("--paper-layers", type=int, default=80)
    p.add_argument("--nvlink-busbw-gbs", type=float, default=360.0)
    p.add_argument("--nvlink-latency-us", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=OUT / "tensor_parallel.json")
    args = p.parse_args()

    model = reference_model(args.model)
    requests = random_token_workload(args.num_requests, max_tokens=args.max_tokens)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeat):
        for tp in (1, 2):  # alternate: the box is shared and noisy
            runs[tp].append(run(model, tp, requests, args))
    same = runs[1][0]["tokens"] == runs[2][0]["tokens"]
    print(f"\nTensor parallelism, {args.num_requests} requests x {args.max_tokens} tokens, {args.threads} threads in all "
          f"(median of {args.repeat}, best in brackets)")
    print(f"{'TP':>3} {'gen tok/s':>18} {'vs TP=1':>8} {'collectives':>12} {'calls/step':>11} {'KiB/step':>9}")
    base = statistics.median(r["gen_tok_s"] for r in runs[1])
    summary = {}
    for tp, rs in runs.items():
        med = statistics.median(r["gen_tok_s"] for r in rs)
        best = max(r["gen_tok_s"] for r in rs)
        share = statistics.median(r["collective_share"] for r in rs)
        calls = statistics.median(r["collectives_per_step"] for r in rs)
        kib = statistics.median(r["collective_bytes_per_step"] for r in rs) / 1024
        print(f"{tp:>3} {med:10.1f} ({best:6.1f}) {med / base:8.2f} {share:11.0%} {calls:11.1f} {kib:9.1f}")
        summary[tp] = {"gen_tok_s_median": med, "gen_tok_s_best": best, "collective_share": share,
                       "collectives_per_step": calls, "collective_kib_per_step": kib}
    print(f"greedy outputs identical at TP=1 and TP=2: {same}")
    for line in nvlink_estimate(args):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
