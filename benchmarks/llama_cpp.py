"""llama.cpp's own batched engine (`llama-batched-bench`) on the reference model, for comparison
with pagedbackend on the reference workload (64 requests, prompts uniform 64..256, 128 new tokens,
greedy, fp32, 2 threads):

    .venv/bin/python benchmarks/llama_cpp.py [--threads 2] [--npl 64] [--out FILE.json]

Everything it needs is built once and cached under benchmarks/out/llamacpp/ (git-ignored):

1. llama.cpp's source: the `llama-cpp-python` sdist from PyPI (`pip download --no-binary :all:
   --no-deps llama-cpp-python`), which vendors llama.cpp under vendor/llama.cpp. `--src` points
   at an already extracted llama.cpp tree instead.
2. The CPU build of the one target needed, `llama-batched-bench` (cmake, a C++ compiler, make;
   -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF, Release). Missing tools fail loudly.
3. The model as GGUF F32 (`convert_hf_to_gguf.py --outtype f32`, with the vendored gguf-py on
   PYTHONPATH and this interpreter's torch/numpy/transformers; nothing is installed anywhere).
   Two patches are applied to the *cached copy* of the converter (conversion/base.py), because
   the reference model's tokenizer is a ByteLevel BPE trained offline with `tokenizers`:
   * `_create_vocab_sentencepiece` imports sentencepiece only after checking that a
     tokenizer.model exists (there is none, and sentencepiece need not be installed), so the
     converter falls through to its BPE path as intended;
   * `get_vocab_base_pre` maps the unknown pre-tokenizer hash to "gpt-2" (the pre-tokenizer is
     ByteLevel with the GPT-2 regex) instead of raising NotImplementedError. batched-bench feeds
     random token ids, so the tokenizer does not affect the measurement at all.

The run: `llama-batched-bench -npp P -ntg 128 -npl 64`, P = the mean prompt length of
`workload.random_token_workload(64, 64, 256, 128)` (154; 64*154 = 9,856 prompt tokens against the
workload's 9,867). batched-bench prefills all B prompts (decoded in -b/-ub sized batches), then
decodes 128 steps of B tokens each, one sequence per request, and reports prompt time T_PP,
generation time T_TG and T = T_PP + T_TG. T is the whole-workload time to compare with our
engine's; generated tok/s = B*128 / T. It does not sample (no argmax over the logits), and all
prompts have the same length, so it is, if anything, slightly favourable to llama.cpp.

Why `-fa off -ctk f32 -ctv f32`: llama.cpp's defaults are flash attention "auto" (on for the CPU)
and an F16 KV cache. Both are inexact against our fp32 engine: K/V are rounded to F16, and the
CPU flash-attention kernel (ggml-cpu ops.cpp, flash_attn_ext) converts Q to K's dot type (F16)
and accumulates softmax(QK)V in an F16 buffer when V is F16. F32 K/V with the plain (non-flash)
attention path is the like-for-like setting. It is not the fastest llama.cpp can do: in one
quiet run each (B=64, 2 threads) the defaults took 7.12 s (T_TG 4.75 s) against 7.88 s here, and
flash attention with F32 K/V 11.24 s; the defaults' speed comes from F16 K/V, i.e. from being
inexact. The KV cache is not unified (llama.cpp's default): each sequence attends only to its own
stream, as in a paged engine. (llama.cpp pads -c per sequence, so n_kv_max reads 32768.)

Timing on a shared machine: llama.cpp's OpenMP threads spin at barriers, so any other process on
the two cores stalls it by several times (seen: 5.5 s -> 108 s generation). Each run therefore
waits (--wait-idle) for the CPUs to be quiet, measures other processes' CPU share during the run
(/proc/stat less the bench's own rusage), warns about contaminated runs, and per batch size the
fastest of --repeat runs is reported; all runs are kept in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, random_token_workload, reference_model  # noqa: E402

CACHE = OUT / "llamacpp"
TARGET = "llama-batched-bench"

# The two converter patches (see the module docstring): (original, replacement) pairs in
# conversion/base.py of the vendored llama.cpp.
PATCH_MARK = "pagedbackend patch"
CONVERTER_PATCHES: list[tuple[str, str]] = [
    (
        "        from sentencepiece import SentencePieceProcessor\n\n"
        "        tokenizer_path = self.dir_model / 'tokenizer.model'\n\n"
        "        if not tokenizer_path.is_file():\n"
        "            raise FileNotFoundError(f\"File not found: {tokenizer_path}\")\n",
        "        tokenizer_path = self.dir_model / 'tokenizer.model'\n\n"
        "        if not tokenizer_path.is_file():\n"
        "            raise FileNotFoundError(f\"File not found: {tokenizer_path}\")\n\n"
        f"        from sentencepiece import SentencePieceProcessor  # {PATCH_MARK}: imported after the check\n",
    ),
    (
        "            raise NotImplementedError(\"BPE pre-tokenizer was not recognized - update get_vocab_base_pre()\")\n",
        f"            res = \"gpt-2\"  # {PATCH_MARK}: offline-trained ByteLevel BPE tokenizer -> GPT-2 pre-tokenizer\n",
    ),
]

ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6 + r"\s*$")
COLUMNS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def die(message: str) -> None:
    raise SystemExit(f"llama_cpp.py: error: {message}")


def run(cmd: list[str], log: Path | None = None, **kwargs) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    if log is None:
        result = subprocess.run(cmd, **kwargs)
    else:
        with open(log, "w") as f:
            result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        tail = ""
        if log is not None and log.is_file():
            tail = "\n" + "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        die(f"command failed with exit status {result.returncode}: {' '.join(map(str, cmd))}"
            + (f" (log: {log})" if log else "") + tail)


def find_source(cache: Path, src: Path | None) -> Path:
    """The llama.cpp source tree: `src`, or the vendored copy in the cached llama-cpp-python sdist."""
    if src is not None:
        if not (src / "CMakeLists.txt").is_file() or not (src / "convert_hf_to_gguf.py").is_file():
            die(f"{src} is not a llama.cpp source tree (no CMakeLists.txt / convert_hf_to_gguf.py)")
        return src
    found = sorted(cache.glob("src/llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    sdist_dir = cache / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--dest", str(sdist_dir), "llama-cpp-python"])
        sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            die(f"pip download left no llama_cpp_python-*.tar.gz in {sdist_dir}")
    print(f"extracting {sdists[-1]} ...", flush=True)
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(cache / "src", filter="data")
    found = sorted(cache.glob("src/llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        die(f"{sdists[-1]} has no vendor/llama.cpp")
    return found[-1].parent


def build(src: Path, build_dir: Path) -> tuple[Path, float]:
    """`llama-batched-bench`, built if missing; (binary, build seconds, 0 when cached)."""
    binary = build_dir / "bin" / TARGET
    if binary.is_file():
        return binary, 0.0
    missing = [tool for tool in ("cmake", "make") if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++/g++/clang++)")
    if missing:
        die("cannot build llama.cpp, missing build tools: " + ", ".join(missing)
            + " (e.g. `apt-get install cmake build-essential`, or `pip install cmake` in a separate venv"
            " and put its bin/ on PATH)")
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF"], log=build_dir / "configure.log")
    run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", TARGET],
        log=build_dir / "build.log")
    if not binary.is_file():
        die(f"the build finished but {binary} is missing (see {build_dir / 'build.log'})")
    return binary, time.perf_counter() - start


def patch_converter(src: Path) -> None:
    path = src / "conversion" / "base.py"
    if not path.is_file():
        die(f"{path} not found: this llama.cpp version's converter layout is unknown to this script")
    text = original = path.read_text()
    for old, new in CONVERTER_PATCHES:
        if new in text:
            continue
        if text.count(old) != 1:
            die(f"cannot patch {path}: expected exactly one occurrence of {old.strip()[:70]!r}")
        text = text.replace(old, new)
    if text != original:
        path.write_text(text)
        print(f"patched {path}", flush=True)


def convert(src: Path, model: Path, gguf: Path) -> None:
    """The HF model as GGUF F32, converted if missing."""
    if gguf.is_file():
        return
    missing = [m for m in ("numpy", "torch", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        die(f"the converter needs {', '.join(missing)} in this interpreter ({sys.executable}); "
            "run this script with the project's .venv/bin/python")
    patch_converter(src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src / "gguf-py"),
                                                                    os.environ.get("PYTHONPATH")])))
    tmp = gguf.with_suffix(".tmp")
    run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
         "--outfile", str(tmp)], log=gguf.with_suffix(".convert.log"), env=env)
    tmp.rename(gguf)


def cpu_sample() -> tuple[int, int]:
    """(total, idle) CPU jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def cpu_busy(seconds: float = 1.0) -> float:
    """The fraction of the machine's CPU time spent busy over `seconds` (from /proc/stat; -1 if unknown)."""
    sample = cpu_sample
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return -1.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(limit: float, threshold: float = 0.1) -> float:
    """Waits up to `limit` seconds for the CPUs to be idle (busy < threshold); the last busy fraction."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def parse_table(text: str) -> list[dict[str, float]]:
    rows = []
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows.append({k: (int(v) if i < 4 else float(v)) for i, (k, v) in enumerate(zip(COLUMNS, m.groups()))})
    return rows


def prepare(model: Path, requests: list, threads: int, npl: list[int], build_dir: Path = CACHE / "build",
            src: Path | None = None, gguf: Path | None = None) -> tuple[list[str], Path, Path, float]:
    """Source, build and GGUF (each only if missing), then the batched-bench command for the
    workload's shape: B sequences of its mean prompt length, its max_tokens each."""
    src = find_source(CACHE, src)
    binary, build_seconds = build(src, build_dir)
    gguf = gguf or CACHE / f"{model.name}-f32.gguf"
    convert(src, model, gguf)
    npp = round(sum(len(r.prompt_token_ids) for r in requests) / len(requests))
    max_tokens = max(r.max_tokens for r in requests)
    longest = max(len(r.prompt_token_ids) for r in requests)
    n_ctx = max(npl) * (longest + max_tokens)  # one stream of prompt + generated tokens per sequence
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
           "-b", "2048", "-ub", "512", "-npp", str(npp), "-ntg", str(max_tokens), "-npl", ",".join(map(str, npl)),
           "-fa", "off", "-ctk", "f32", "-ctv", "f32"]
    return cmd, src, gguf, build_seconds


def run_once(cmd: list[str]) -> tuple[list[dict[str, float]], str]:
    """One batched-bench run: its result rows (one per batch size) and its output."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        die(f"{TARGET} failed with exit status {result.returncode}:\n{output[-4000:]}")
    rows = parse_table(output)
    if not rows:
        die(f"no result table in {TARGET}'s output:\n{output[-4000:]}")
    return rows, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF Llama directory (default: the reference model)")
    parser.add_argument("--out", type=Path, default=CACHE / "batched_bench.json", help="JSON result file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build-dir", type=Path, default=CACHE / "build")
    parser.add_argument("--src", type=Path, default=None, help="an extracted llama.cpp source tree (default: the sdist's)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF F32 file (default: cached next to the build)")
    parser.add_argument("--npl", default="64", help="batch sizes, comma-separated (e.g. 1,16,64); the reference is 64")
    parser.add_argument("--repeat", type=int, default=3, help="runs; per batch size the fastest is reported")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="seconds to wait, before each run, for other load on the CPUs to stop")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    model = (args.model or reference_model()).resolve()
    requests = random_token_workload(args.requests, args.min_prompt, args.max_prompt, args.max_tokens)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    npp = round(prompt_tokens / len(requests))
    npl = [int(n) for n in args.npl.split(",")]
    cmd, src, gguf, build_seconds = prepare(model, requests, args.threads, npl, args.build_dir, args.src, args.gguf)
    print("+ " + " ".join(cmd), flush=True)
    runs: list[dict] = []
    for i in range(args.repeat):
        busy = wait_idle(args.wait_idle)
        if busy >= 0.1:
            print(f"warning: the CPUs were {busy:.0%} busy with other work before run {i + 1}; "
                  "its times are inflated", flush=True)
        # Other processes' share of the CPUs during the run: machine busy time less the bench's own.
        # With OpenMP's spinning barriers, even a little of it stalls llama.cpp badly.
        total0, idle0 = cpu_sample()
        own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_rows, output = run_once(cmd)
        own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        total1, idle1 = cpu_sample()
        ticks = os.sysconf("SC_CLK_TCK")
        own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
        busy_total = ((total1 - total0) - (idle1 - idle0)) / ticks
        other = max(0.0, busy_total - own) / max(1e-9, (total1 - total0) / ticks)
        table = [line for line in output.splitlines() if line.startswith("|")]
        print(f"run {i + 1}/{args.repeat} (other work on the CPUs: {busy:.0%} just before, {other:.0%} during):")
        print("\n".join(table), flush=True)
        if other >= 0.05:
            print(f"warning: other processes used {other:.0%} of the CPUs during run {i + 1}; its times are inflated")
        runs.append({"busy_before": round(busy, 3), "other_load_during": round(other, 3), "rows": run_rows,
                     "table": table})
    # Per batch size, the run with the least total time: other load only ever adds time.
    rows = [dict(min((run["rows"][j] for run in runs), key=lambda r: r["t"])) for j in range(len(runs[0]["rows"]))]

    for row in rows:
        row["generated_tok_per_s"] = row["pl"] * row["tg"] / row["t"]
    print(f"\nworkload: {len(requests)} requests, {prompt_tokens} prompt tokens (batched-bench: "
          f"{max(npl)} x {npp} = {max(npl) * npp}), {args.max_tokens} new tokens each, {args.threads} threads")
    print(f"fastest of {args.repeat} run(s) per batch size:")
    print(f"{'B':>4} {'prompt s':>9} {'generate s':>11} {'whole s':>8} {'gen tok/s':>10}")
    for row in rows:
        print(f"{row['pl']:>4} {row['t_pp']:>9.3f} {row['t_tg']:>11.3f} {row['t']:>8.3f} {row['generated_tok_per_s']:>10.1f}")

    version = src.parents[1].name if src.parent.name == "vendor" else src.name
    record = {
        "engine": "llama.cpp llama-batched-bench", "source": version, "model": str(model), "gguf": str(gguf),
        "threads": args.threads, "command": cmd, "build_seconds": round(build_seconds, 1),
        "workload": {"requests": len(requests), "prompt_tokens": prompt_tokens, "npp": npp,
                     "max_tokens": args.max_tokens},
        "repeat": args.repeat, "rows": rows, "runs": runs,
    }
    reference = [r for r in rows if r["pl"] == len(requests)]
    if reference:
        record["whole_workload_seconds"] = reference[0]["t"]
        record["generated_tok_per_s"] = reference[0]["generated_tok_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
