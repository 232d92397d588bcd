"""Host work per decode step, with the model made almost free: a 1-layer, 32-wide Llama (real
weights, real loading path) whose forward costs little next to everything around it.

At 1, 64 and 256 running sequences with long contexts, each phase of a decode step is timed
by wrapping the engine's own functions: schedule, prepare (inputs for the model), model
(forward + LM head), sample, update (the scheduler folds the result in), output processing
(detokenization, stop strings, outputs). The engine thread's share is everything but output
processing, which the frontend's output thread does (`AsyncLLMEngine`).

`--compare-with PATH` runs the same measurement, in the same invocation, on another checkout
(e.g. the commit before the core redesign: `git worktree add /tmp/before 45537a0`), so the
table reads before / after. Runs alternate between the two; best and median of `--repeats`.

    python benchmarks/host_overhead.py --compare-with /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("schedule", "prepare", "model", "sample", "update", "output")


def _timed(obj, name: str, phase: str, acc: dict[str, float]) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[phase] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def measure(model: str, num_seqs: int, context: int, steps: int) -> dict[str, float]:
    """Per-step milliseconds of each phase (run inside the checkout being measured)."""
    import torch

    from pagedbackend import EngineArgs, LLMEngine, SamplingParams

    torch.set_num_threads(1)
    max_len = 2 * context + 64  # room to decode through the whole prefill phase and the measured steps
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, max_num_seqs=num_seqs, max_model_len=max_len,
                                                   max_num_batched_tokens=max(2048, num_seqs), seed=0,
                                                   num_kv_blocks=num_seqs * (-(-max_len // 16)) + 8),
                                        progress=False)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_len - context, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(str(i), {"prompt_token_ids": torch.randint(10, 2000, (context,), generator=g).tolist()}, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.prompt_len for s in engine.scheduler.running):
        engine.step()  # prefill everything first: only decode steps are measured
    acc = dict.fromkeys(PHASES, 0.0)
    runner = engine.runner
    new_core = hasattr(engine, "core")
    _timed(engine.scheduler, "schedule", "schedule", acc)
    _timed(engine.scheduler, "update" if new_core else "update_from_output", "update", acc)
    _timed(runner.model, "forward", "model", acc)
    _timed(runner.model, "compute_logits", "model", acc)
    sampler = runner.sampler
    sample_fn = type(sampler).__call__

    def timed_sample(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return sample_fn(self, *a, **k)
        finally:
            acc["sample"] += time.perf_counter() - t0

    type(sampler).__call__ = timed_sample
    _timed(engine.output_processor, "process", "output", acc)
    execute = runner.execute
    total_execute = [0.0]

    def timed_execute(*a, **k):
        t0 = time.perf_counter()
        try:
            return execute(*a, **k)
        finally:
            total_execute[0] += time.perf_counter() - t0

    runner.execute = timed_execute
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    type(sampler).__call__ = sample_fn
    acc["prepare"] = total_execute[0] - acc["model"] - acc["sample"]
    ms = {k: 1000 * v / steps for k, v in acc.items()}
    ms["engine_thread"] = sum(ms[p] for p in PHASES if p not in ("output", "model"))
    ms["wall"] = 1000 * wall / steps
    ms["batch"] = engine.scheduler.stats.last_batch_seqs
    for i in range(num_seqs):
        engine.abort_request(str(i))
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_all_blocks_free()
    return ms


def build_model(path: Path) -> None:
    from pagedbackend.tiny_model import build_tiny_model

    build_tiny_model(path, "llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=2048,
                     max_position_embeddings=8192, seed=0)


def run_in(checkout: Path | None, model: Path, num_seqs: int, context: int, steps: int) -> dict[str, float]:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import host_overhead as h; "
            f"print(json.dumps(h.measure({str(model)!r}, {num_seqs}, {context}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800,
                         cwd=str(checkout) if checkout is not None else None)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=20, help="decode steps measured per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-with", type=Path, default=None, help="another checkout to measure as 'before'")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "host_overhead.json")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "micro-llama"
        build_model(model)
        targets = [("after", None)] + ([("before", ns.compare_with.resolve())] if ns.compare_with else [])
        results: dict[str, dict[int, list[dict]]] = {name: {b: [] for b in ns.batch_sizes} for name, _ in targets}
        for b in ns.batch_sizes:
            for _ in range(ns.repeats):
                for name, checkout in targets:  # alternate: A B A B
                    results[name][b].append(run_in(checkout, model, b, ns.context, ns.steps))
    header = f"{'engine':8} {'seqs':>5} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'engine thr':>10} {'wall':>8}"
    print(f"\nHost time per decode step, ms (median of {ns.repeats}; best in brackets for the engine thread); "
          f"context {ns.context} tokens, 1-layer 32-wide Llama, 1 thread")
    print(header)
    summary = {}
    for name, _ in targets:
        for b in ns.batch_sizes:
            runs = results[name][b]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            best = min(r["engine_thread"] for r in runs)
            summary[f"{name}/{b}"] = {"median": med, "best_engine_thread": best, "runs": runs}
            assert med["batch"] == b, f"{name}: only {med['batch']} of {b} sequences were decoding"
            print(f"{name:8} {b:>5} " + " ".join(f"{med[p]:9.2f}" for p in PHASES)
                  + f" {med['engine_thread']:6.2f} ({best:.2f}) {med['wall']:8.2f}")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {ns.out}")


if __name__ == "__main__":
    main()
