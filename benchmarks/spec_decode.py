"""Speculative decoding: time per output token (TPOT) and generated tok/s at batch 1, 8 and 64,
without speculation, with n-gram prompt lookup, with a draft model and with the target drafting
for itself, same model, same requests, one invocation.

    python benchmarks/spec_decode.py                       # ~6 minutes on the 2-core dev box
    python benchmarks/spec_decode.py --batch-sizes 1,8 --repeat 3

The target is the reference model (the 56M random-weight Llama of benchmarks/throughput.py). The
draft model is its early exit: a checkpoint of the target's embedding, first --draft-layers
decoder layers, final norm and LM head, written next to it once (a real model directory, loaded
the way any draft is), so its proposals correlate with the target's as a trained draft's would.
The workload copies: each prompt is random tokens followed by the target's own greedy
continuation of them (computed here first, without speculation), so the output goes on
repeating what the prompt holds. A random-weight model's greedy output soon repeats tokens and
short cycles, so this is the high-acceptance case of summarizing or editing, not a realistic
acceptance rate: the per-position acceptance is printed. (Training a small Llama here to copy
spans of real text did not get past 2% copy accuracy in the minutes a benchmark can afford.)

The configurations:
- `none`: no speculation (the baseline every ratio is against, same batch size, same round);
- `ngram`: prompt lookup, k tokens, `prompt_lookup_min`/`max` 1..3;
- `draft`: the early-exit draft proposes k tokens;
- `self`: the target as its own draft: acceptance is 1.0 by construction, the upper bound of the
  mechanism (k + 1 tokens per step); each proposal costs a target-sized forward pass;

all with `disable_by_batch_size` (default 32): at batch 64 no step speculates, so speculation
must cost (nearly) nothing there. Rounds alternate the configurations (A B C D A B C D ...) after
a warm-up round; each cell reports the median of --repeat rounds and the median of the per-round
ratios to `none`. TPOT is each request's mean time between its tokens (vLLM's definition),
median over requests; at batch 1 the requests run one after another. Greedy outputs must be
equal across configurations (checked). Writes benchmarks/out/spec_decode.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, random_token_workload, reference_model  # noqa: E402

CONFIGS = ("none", "ngram", "draft", "self")


def early_exit_draft(target: Path, num_layers: int) -> Path:
    """The target's first `num_layers` decoder layers with its embedding, final norm and LM
    head, saved as a model directory of its own (built once)."""
    from safetensors.torch import load_file, save_file

    out = target.parent / f"{target.name}-first{num_layers}"
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {}
    for path in sorted(target.glob("*.safetensors")):
        for name, tensor in load_file(path).items():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
                continue
            tensors[name] = tensor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for path in target.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json" and path.is_file():
            shutil.copy(path, out / path.name)
    return out


def copy_prompts(model: Path, num: int, random_tokens: int, own_tokens: int) -> list[list[int]]:
    """Random tokens, then the target's own greedy continuation of them: the output that follows
    goes on repeating spans of the prompt."""
    from pagedbackend import LLM, SamplingParams

    heads = [r.prompt_token_ids[:random_tokens] for r in random_token_workload(num, random_tokens, random_tokens)]
    llm = LLM(str(model), max_num_seqs=num, max_model_len=512)
    outs = llm.generate([{"prompt_token_ids": h} for h in heads],
                        SamplingParams(temperature=0.0, max_tokens=own_tokens, ignore_eos=True), use_tqdm=False)
    return [h + o.outputs[0].token_ids for h, o in zip(heads, outs)]


def spec_config(name: str, args) -> dict | None:
    k, off = args.num_speculative_tokens, args.disable_by_batch_size
    if name == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                "disable_by_batch_size": off}
    if name in ("draft", "self"):
        model = args.draft if name == "draft" else args.target
        return {"method": "draft_model", "model": str(model), "num_speculative_tokens": k, "disable_by_batch_size": off}
    return None


def run(llm, prompts: list[list[int]], batch: int, max_tokens: int) -> dict:
    """Generate for `prompts` in groups of `batch` requests at once (one at a time for batch 1)."""
    from pagedbackend import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = llm.llm_engine.get_stats()
    tpots, outputs, generated = [], [], 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + batch]], params, use_tqdm=False)
        for o in outs:
            tpots.append(o.metrics.time_per_output_token)
            outputs.append(o.outputs[0].token_ids)
            generated += len(o.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    after = llm.llm_engine.get_stats()
    drafts = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    steps = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    per_pos = [a - b for a, b in zip(after["spec_decode_accepted_per_position"],
                                     before["spec_decode_accepted_per_position"] + [0] * 64)]
    return {"tpot_ms": 1e3 * statistics.median(tpots), "gen_tok_s": generated / elapsed, "elapsed_s": elapsed,
            "acceptance": accepted / drafts if drafts else None, "verify_steps": steps,
            "accepted_per_position": [round(a / steps, 3) for a in per_pos] if steps else [], "outputs": outputs}


def model_info(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return (f"{path.name}: Llama {config['num_hidden_layers']} layers x {config['hidden_size']}, vocab "
            f"{config['vocab_size']}")


def plot(summary: dict, configs: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(summary)
    width = 0.8 / len(configs)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, c in enumerate(configs):
        values = [summary[b][c]["tpot_lower_x"] or 0.0 for b in batches]
        bars = ax.bar([j + (i - (len(configs) - 1) / 2) * width for j in range(len(batches))], values, width, label=c)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("TPOT x lower than no speculation")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, help="target model directory (default: the reference model)")
    p.add_argument("--draft", type=Path, help="draft model directory (default: the target's early exit)")
    p.add_argument("--draft-layers", type=int, default=2, help="layers of the early-exit draft")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--requests-at-batch-1", type=int, default=4, help="requests run one after another at batch 1")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--random-tokens", type=int, default=64, help="random tokens that start each prompt")
    p.add_argument("--own-tokens", type=int, default=64, help="then the target's own continuation")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--disable-by-batch-size", type=int, default=32)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=OUT / "spec_decode.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pagedbackend import LLM

    args.target = args.target or reference_model()
    args.draft = args.draft or early_exit_draft(args.target, args.draft_layers)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs = args.configs.split(",")
    prompts = copy_prompts(args.target, max(max(batches), args.requests_at_batch_1), args.random_tokens,
                           args.own_tokens)
    print(f"target {model_info(args.target)}\ndraft  {model_info(args.draft)}", flush=True)
    print(f"workload: prompts of {len(prompts[0])} tokens ({args.random_tokens} random, then the target's own "
          f"greedy continuation), {args.max_tokens} greedy tokens each; k={args.num_speculative_tokens}, "
          f"disable_by_batch_size={args.disable_by_batch_size}; torch {torch.__version__}, {args.threads} threads",
          flush=True)
    llms = {c: LLM(str(args.target), speculative_config=spec_config(c, args), max_num_seqs=max(batches),
                   max_model_len=512, enable_prefix_caching=False) for c in configs}
    results: dict[str, dict[str, list[dict]]] = {c: {str(b): [] for b in batches} for c in configs}
    for batch in batches:
        work = prompts[:args.requests_at_batch_1] if batch == 1 else prompts[:batch]
        for c in configs:  # warm-up round
            run(llms[c], work[:batch], batch, 8)
        for _ in range(args.repeat):
            for c in configs:
                results[c][str(batch)].append(run(llms[c], work, batch, args.max_tokens))
                print(f"  batch {batch:>2} {c:<6} TPOT {results[c][str(batch)][-1]['tpot_ms']:7.2f} ms", flush=True)

    reference = {b: results["none"][str(b)][0]["outputs"] for b in batches} if "none" in results else None
    print(f"\n{'batch':>5} {'config':<6} {'TPOT ms':>8} {'x lower':>8} {'gen tok/s':>10} {'x tok/s':>8} "
          f"{'accept':>7}  accepted per position (per verifying step)")
    summary: dict = {}
    equal = True
    for batch in batches:
        base = results.get("none", {}).get(str(batch))
        for c in configs:
            rounds = results[c][str(batch)]
            tpot = statistics.median(r["tpot_ms"] for r in rounds)
            tok_s = statistics.median(r["gen_tok_s"] for r in rounds)
            acc = [r["acceptance"] for r in rounds if r["acceptance"] is not None]
            per_pos = rounds[-1]["accepted_per_position"]
            ratio_tpot = statistics.median(b["tpot_ms"] / r["tpot_ms"] for b, r in zip(base, rounds)) if base else None
            ratio_tok = statistics.median(r["gen_tok_s"] / b["gen_tok_s"] for b, r in zip(base, rounds)) if base else None
            if reference is not None:
                equal &= all(r["outputs"] == reference[batch] for r in rounds)
            summary.setdefault(str(batch), {})[c] = {
                "tpot_ms": tpot, "tpot_lower_x": ratio_tpot, "gen_tok_s": tok_s, "gen_tok_s_x": ratio_tok,
                "acceptance": statistics.median(acc) if acc else None, "accepted_per_position": per_pos,
                "runs_tpot_ms": [round(r["tpot_ms"], 3) for r in rounds]}
            print(f"{batch:>5} {c:<6} {tpot:>8.2f} {ratio_tpot or 0:>8.2f} {tok_s:>10.0f} {ratio_tok or 0:>8.2f} "
                  f"{(f'{statistics.median(acc):.2f}' if acc else '-'):>7}  {per_pos}")
    print(f"greedy outputs equal across configurations: {equal}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"target": model_info(args.target), "draft": model_info(args.draft),
                                    "args": {k: str(v) for k, v in vars(args).items()}, "results": summary,
                                    "outputs_equal": equal}, indent=1))
    plot(summary, configs, args.out.with_suffix(".png"), f"speculative decoding, k={args.num_speculative_tokens}, "
         f"{model_info(args.target)}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
