"""Prefix caching on a shared system prompt: time-to-first-token and prefill throughput with and
without it, same model, same requests, one invocation.

    python benchmarks/prefix_cache.py                 # 32 requests behind a 1024-token prompt (~3 minutes)

Two scenarios, each run with `enable_prefix_caching` on and off:

- one at a time: the system prompt has been seen once (a warm-up request), then each request
  arrives alone; its TTFT is the prefill of its prompt. This isolates what caching saves.
- all at once: every request arrives together (max_tokens each), the cache empty; TTFT includes
  queueing behind the others, and the requests prefilled in the first step (as many as its
  token budget holds) each compute the shared prefix; the rest hit the cache.

Prefill throughput counts every prompt token the requests carry (cached or not) per second of
prefill, so it is the rate a user sees. Prints a table, writes benchmarks/out/prefix_cache.json
and prefix_cache.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import OUT, reference_model, shared_prefix_workload, summary  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ttft_stats(ttfts: list[float]) -> dict:
    return {"ttft_mean_ms": 1e3 * statistics.fmean(ttfts), "ttft_median_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * _percentile(ttfts, 99)}


def run(model: Path, requests, caching: bool, args) -> dict:
    from pagedbackend import LLM, SamplingParams

    llm = LLM(str(model), enable_prefix_caching=caching, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    greedy = dict(temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)

    # One at a time, after one request of its own has carried the system prompt through the engine.
    warm = requests[0].prompt_token_ids[:args.prefix_len] + list(range(100, 140))
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    ttfts, tokens = [], []
    for prompt in prompts:
        out = llm.generate([prompt], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)[0]
        ttfts.append(out.metrics.time_to_first_token)
        tokens.append(out.outputs[0].token_ids)
    sequential = {**_ttft_stats(ttfts), "prefill_tok_s": prompt_tokens / sum(ttfts)}

    # All at once, starting from an empty cache: the first request computes the prefix.
    if not llm.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be reset: a request still holds blocks")
    stats_before = llm.llm_engine.get_stats()
    start = time.monotonic()
    outs = llm.generate(prompts, [SamplingParams(max_tokens=r.max_tokens, **greedy) for r in requests],
                        use_tqdm=False)
    elapsed = time.monotonic() - start
    stats = llm.llm_engine.get_stats()
    batch_ttfts = [o.metrics.time_to_first_token for o in outs]
    all_first = max(o.metrics.first_token_time for o in outs) - start
    queries = stats["prefix_cache_queries"] - stats_before["prefix_cache_queries"]
    hits = stats["prefix_cache_hits"] - stats_before["prefix_cache_hits"]
    batch = {**_ttft_stats(batch_ttfts), "prefill_tok_s": prompt_tokens / all_first, "elapsed_s": elapsed,
             "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
             "prefix_hit_rate": hits / queries if queries else 0.0}
    llm.llm_engine.check_all_blocks_free()
    first_tokens = [t[0] for t in tokens] + [o.outputs[0].token_ids[0] for o in outs]
    return {"caching": caching, "one_at_a_time": sequential, "all_at_once": batch, "first_tokens": first_tokens}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["one at a time", "all at once"]
    keys = ["one_at_a_time", "all_at_once"]
    width = 0.38
    for ax, metric, title in ((axes[0], "ttft_mean_ms", "mean time to first token (ms, log)"),
                              (axes[1], "prefill_tok_s", "prefill throughput (prompt tok/s)")):
        for offset, name, color in ((-width / 2, "off", "tab:gray"), (width / 2, "on", "tab:blue")):
            values = [results[name][k][metric] for k in keys]
            bars = ax.bar([i + offset for i in range(2)], values, width, label=f"prefix caching {name}", color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(2), labels)
        ax.set_title(title)
        if metric == "ttft_mean_ms":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(results["workload"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: the reference model, built if missing)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=OUT / "prefix_cache.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or reference_model()
    requests = shared_prefix_workload(args.num_requests, args.prefix_len, max_tokens=args.max_tokens)
    workload = f"shared prefix {args.prefix_len} tokens: {summary(requests)}"
    print(f"model {model} | {workload} | torch {torch.__version__}, {args.threads} threads", flush=True)

    results = {"workload": workload, "threads": args.threads}
    for caching in (False, True):
        results["on" if caching else "off"] = run(model, requests, caching, args)
    off, on = results["off"], results["on"]
    same = off["first_tokens"] == on["first_tokens"]
    results["first_tokens_equal"] = same

    print(f"\n{'scenario':<15} {'caching':>8} {'TTFT mean ms':>13} {'median':>8} {'p99':>8} {'prefill tok/s':>14}")
    for key, label in (("one_at_a_time", "one at a time"), ("all_at_once", "all at once")):
        for name in ("off", "on"):
            r = results[name][key]
            print(f"{label:<15} {name:>8} {r['ttft_mean_ms']:>13.1f} {r['ttft_median_ms']:>8.1f} "
                  f"{r['ttft_p99_ms']:>8.1f} {r['prefill_tok_s']:>14.0f}")
    for key, label in (("one_at_a_time", "one at a time"), ("all_at_once", "all at once")):
        speedup = off[key]["ttft_mean_ms"] / on[key]["ttft_mean_ms"]
        results[f"{key}_ttft_speedup"] = speedup
        results[f"{key}_prefill_speedup"] = on[key]["prefill_tok_s"] / off[key]["prefill_tok_s"]
        print(f"{label}: caching gives {speedup:.1f}x lower mean TTFT, "
              f"{results[f'{key}_prefill_speedup']:.1f}x prefill throughput")
    print(f"all at once: prefix-cache hit rate {on['all_at_once']['prefix_hit_rate']:.0%}; "
          f"output {off['all_at_once']['output_tok_s']:.0f} -> {on['all_at_once']['output_tok_s']:.0f} tok/s")
    print(f"greedy first tokens equal with and without caching: {same}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if not same:
        sys.exit("greedy first tokens differ with prefix caching")


if __name__ == "__main__":
    main()
