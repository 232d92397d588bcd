"""KV-cache memory waste: how much of the memory a system sets aside for the KV cache holds no
token, and how many requests fit a fixed KV budget.

    python benchmarks/kv_waste.py                 # ShareGPT-shaped lengths at full scale (~1 minute)

pagedbackend's real scheduler and KV cache manager run the workload step by step (a stand-in
model supplies tokens: memory use does not depend on their values). After every step it counts
the physical blocks in use and the token slots in them that hold a computed token (a block
shared by several sequences counts once). Two measures: empty slots / allocated slots summed
over all steps (a time average: what is idle memory at any moment, reservation included), and
the fraction of allocated slots that never hold a token before their block is freed (what is
lost for good: the tail of each sequence's last block). It is compared with a contiguous per-request cache, what systems
that reserve space up front allocate: either the model's maximum length for every sequence,
or (the most favourable static choice) prompt + max_tokens.

Prints tables, writes benchmarks/out/kv_waste.json and kv_waste.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import OUT, Request, parallel_sampling_workload, sharegpt_workload, shared_prefix_workload  # noqa: E402

from pagedbackend.kv_cache_manager import KVCacheManager  # noqa: E402
from pagedbackend.sampling_params import SamplingParams  # noqa: E402
from pagedbackend.scheduler import Scheduler  # noqa: E402
from pagedbackend.sequence import Sequence  # noqa: E402
from pagedbackend.step import RunnerOutput  # noqa: E402

MAX_MODEL_LEN = 2048


def simulate_paged(requests: list[Request], block_size: int, num_blocks: int, prefix_caching: bool,
                   max_num_seqs: int = 256, max_num_batched_tokens: int = 2048) -> dict:
    """Run the workload through the real scheduler; measure slots allocated vs holding a token."""
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    sched = Scheduler(kv, max_num_seqs, max_num_batched_tokens, MAX_MODEL_LEN)
    rng = random.Random(0)
    for i, r in enumerate(requests):
        params = SamplingParams(n=r.n, temperature=1.0, max_tokens=r.max_tokens, ignore_eos=True)
        sched.add_request([Sequence(f"r{i}", r.prompt_token_ids, params, float(i), index=j) for j in range(r.n)])
    allocated = filled = logical = 0
    running_sum = saturated_steps = steps = peak_running = 0
    live: dict[int, int] = {}  # block id -> most slots it has held since it was allocated
    never_held = slots_allocated = 0
    while sched.has_unfinished():
        out = sched.schedule()
        rows = out.sampled_seq_ids()
        sched.update(out, RunnerOutput(rows, [[rng.randrange(10, 32000)] for _ in rows],
                                       [None] * len(rows), [None] * len(rows)))
        fill: dict[int, int] = {}  # block id -> slots holding a computed token
        requests_running = set()
        for seq in sched.running:
            requests_running.add(seq.request_id)
            logical += seq.num_computed_tokens
            for i, block in enumerate(kv.blocks(seq)):
                used = max(0, min(block_size, seq.num_computed_tokens - i * block_size))
                fill[block.block_id] = max(fill.get(block.block_id, 0), used)
        allocated += len(fill) * block_size
        filled += sum(fill.values())
        # A block absent after a step was freed (blocks are only reallocated by the next
        # schedule()): its slots that never held a token are final.
        for block_id in [b for b in live if b not in fill]:
            never_held += block_size - live.pop(block_id)
            slots_allocated += block_size
        for block_id, used in fill.items():
            live[block_id] = max(live.get(block_id, 0), used)
        if sched.waiting:  # saturated: the budget, not the arrivals, limits concurrency
            running_sum += len(requests_running)
            saturated_steps += 1
        peak_running = max(peak_running, len(requests_running))
        steps += 1
    sched.check_all_free()
    never_held += sum(block_size - used for used in live.values())
    slots_allocated += block_size * len(live)
    return {"waste": 1 - filled / allocated, "never_held": never_held / slots_allocated,
            "allocated_per_logical_token": allocated / logical,
            "mean_running_requests": running_sum / max(1, saturated_steps), "peak_running_requests": peak_running,
            "steps": steps, "preemptions": sched.stats.num_preemptions}


def simulate_contiguous(requests: list[Request], budget_tokens: int, reserve: str) -> dict:
    """A cache that reserves each sequence's whole space when the request starts: `max_len`
    (the model's maximum length) or `exact` (prompt + max_tokens). One token per step per
    running sequence after a one-step prefill; FCFS admission while the reservation fits."""
    def reserved(r: Request) -> int:
        return r.n * (MAX_MODEL_LEN if reserve == "max_len" else len(r.prompt_token_ids) + r.max_tokens)

    waiting = list(requests)
    running: list[list] = []  # [request, tokens generated]
    used_budget = 0
    allocated = filled = running_sum = saturated_steps = steps = peak = 0
    while waiting or running:
        while waiting and used_budget + reserved(waiting[0]) <= budget_tokens:
            r = waiting.pop(0)
            used_budget += reserved(r)
            running.append([r, 0])
        if not running:
            raise ValueError(f"budget of {budget_tokens} tokens cannot hold one request")
        for item in running:
            item[1] += 1
        allocated += used_budget
        filled += sum(item[0].n * (len(item[0].prompt_token_ids) + item[1]) for item in running)
        if waiting:
            running_sum += len(running)
            saturated_steps += 1
        peak = max(peak, len(running))
        steps += 1
        for item in [x for x in running if x[1] >= x[0].max_tokens]:
            running.remove(item)
            used_budget -= reserved(item[0])
    # Every request ends holding prompt + max_tokens tokens (EOS is ignored).
    final = sum(r.n * (len(r.prompt_token_ids) + r.max_tokens) for r in requests)
    return {"waste": 1 - filled / allocated, "never_held": 1 - final / sum(reserved(r) for r in requests),
            "mean_running_requests": running_sum / max(1, saturated_steps), "peak_running_requests": peak,
            "steps": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--scale", type=float, default=1.0, help="ShareGPT length scale (1.0 = the dataset's means)")
    p.add_argument("--budget-tokens", type=int, default=65536, help="KV budget for the concurrency comparison")
    p.add_argument("--out", type=Path, default=OUT / "kv_waste.json")
    args = p.parse_args()

    sharegpt = sharegpt_workload(args.num_requests, args.scale)
    workloads = {
        "ShareGPT-shaped": sharegpt,
        **{f"ShareGPT-shaped, n={n}": parallel_sampling_workload(n, args.num_requests // n, args.scale)
           for n in (2, 4, 6)},
        "shared 1024-token prefix": shared_prefix_workload(args.num_requests // 4, max_tokens=128),
    }
    ample = 1 << 20  # blocks: room for everything, so waste is measured without preemption
    rows = []
    print("KV waste: slots allocated but empty, averaged over every step (includes space reserved "
          "ahead of use);\nslots that never hold a token before they are freed; memory per logical "
          "token (< 1 when blocks are shared)\n")
    print("| workload | system | empty (time avg) | never hold a token | allocated / logical tokens |")
    print("|---|---|---:|---:|---:|")
    for wname, reqs in workloads.items():
        for bs in (8, 16, 32):
            for caching in (False, True):
                r = simulate_paged(reqs, bs, ample // bs, caching)
                label = f"pagedbackend, block {bs}" + (", prefix sharing" if caching else "")
                rows.append({"workload": wname, "system": label, **r})
                print(f"| {wname} | {label} | {r['waste']:.1%} | {r['never_held']:.1%} | "
                      f"{r['allocated_per_logical_token']:.2f} |", flush=True)
        for reserve in ("max_len", "exact"):
            r = simulate_contiguous(reqs, 1 << 40, reserve)
            label = f"contiguous, reserve {'max_model_len' if reserve == 'max_len' else 'prompt + max_tokens'}"
            rows.append({"workload": wname, "system": label, **r})
            print(f"| {wname} | {label} | {r['waste']:.1%} | {r['never_held']:.1%} | - |", flush=True)

    print(f"\nRequests running at once within a KV budget of {args.budget_tokens} tokens (ShareGPT-shaped, "
          "mean over the steps while requests were still queued):\n")
    print("| system | mean running | peak running | steps to finish |")
    print("|---|---:|---:|---:|")
    fit = []
    for bs in (16,):
        r = simulate_paged(sharegpt, bs, args.budget_tokens // bs, True, max_num_seqs=1024)
        fit.append({"system": f"pagedbackend, block {bs}", **r})
    for reserve in ("max_len", "exact"):
        r = simulate_contiguous(sharegpt, args.budget_tokens, reserve)
        fit.append({"system": f"contiguous, reserve {'max_model_len' if reserve == 'max_len' else 'prompt + max_tokens'}",
                    **r})
    for r in fit:
        print(f"| {r['system']} | {r['mean_running_requests']:.1f} | {r['peak_running_requests']} | {r['steps']} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "scale": args.scale,
                                    "budget_tokens": args.budget_tokens, "waste": rows, "fit": fit}, indent=2))
    plot(rows, fit, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(rows: list[dict], fit: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    shown = [r for r in rows if r["workload"] == "ShareGPT-shaped"]
    ax1.barh([r["system"] for r in shown], [100 * r["waste"] for r in shown], color="tab:blue")
    ax1.set_xlabel("KV slots allocated but empty (%)")
    ax1.set_title("KV memory waste, ShareGPT-shaped lengths")
    for i, r in enumerate(shown):
        ax1.text(100 * r["waste"] + 0.5, i, f"{100 * r['waste']:.1f}%", va="center")
    ax1.invert_yaxis()
    labels = [r["system"].replace("contiguous, reserve ", "contiguous:\n").replace(", ", "\n") for r in fit]
    ax2.bar(labels, [r["mean_running_requests"] for r in fit], color="tab:green")
    ax2.tick_params(axis="x", labelsize=8)
    ax2.set_ylabel("requests running at once (mean)")
    ax2.set_title("Concurrency in the same KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
