"""Serving benchmark: a load generator with Poisson arrivals against real servers on 127.0.0.1,
reporting vLLM's `benchmark_serving` metrics — request throughput, output tok/s, and time to
first token (TTFT), time per output token (TPOT) and inter-token latency (ITL) as mean, median
and p99.

    python benchmarks/serving.py                          # all three targets, 128 requests at inf and 4 req/s (~12 minutes)
    python benchmarks/serving.py --targets pagedbackend-torchserve,plain-torchserve --rates inf
    python benchmarks/serving.py --url http://127.0.0.1:8080 --kind torchserve --model-name llm --token KEY

Targets it starts itself (each stopped before the next starts, so they never share the CPU):
- `pagedbackend-torchserve`: pagedbackend's TorchServe handler as `pagedbackend archive` packs it
  (model_store's template: `continuousBatching`, the engine batches every request);
- `plain-torchserve`: the set-up a TorchServe user has today — benchmarks/plain_hf_handler.py,
  transformers `generate` behind TorchServe's own dynamic batching (`batchSize`, `maxBatchDelay`);
- `pagedbackend-pytriton`: `pagedbackend serve pytriton` (Triton's `generate_stream` route).
With `--url`, it measures a server you started instead.

Every request streams (TTFT is the first token's arrival), is greedy and ignores EOS so each
target generates the same number of tokens. Prompts are ShareGPT-shaped lengths (scaled) of
random tokens, decoded to text once and sent as text to every target. Arrivals: a Poisson
process at each rate (`inf` sends all at once), bounded by --num-prompts and --max-seconds.
Prints a table, writes benchmarks/out/serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, reference_model, sharegpt_workload  # noqa: E402

MODEL_NAME = "llm"


@dataclass
class Result:
    sent: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


# ----------------------------------------------------------------------------- clients
def _read_stream(resp, result: Result, tokens_of, expected_tokens: int) -> None:
    """Time each chunk that carries tokens; stop at the chunk that ends the request. A stream
    that ends early or short is an error, not a fast request."""
    last, done = None, False
    while True:
        line = resp.readline()
        if not line:
            break
        n, done = tokens_of(line.decode())
        if n:
            now = time.perf_counter()
            if result.ttft is None:
                result.ttft = now - result.sent
            else:
                result.itl.append(now - last)
            last = now
            result.output_tokens += n
        if done:
            break
    if not done:
        raise RuntimeError(f"stream ended without a finish_reason after {result.output_tokens} tokens")
    if result.output_tokens != expected_tokens:
        raise RuntimeError(f"got {result.output_tokens} tokens, asked for {expected_tokens}")
    result.latency = last - result.sent


def _native_tokens(line: str) -> tuple[int, bool]:
    if not line.strip():
        return 0, False
    chunk = json.loads(line)
    if "error" in chunk:
        raise RuntimeError(chunk["error"])
    return len(chunk.get("token_ids", ())), chunk.get("finish_reason") is not None


def _sse_tokens(line: str) -> tuple[int, bool]:
    if not line.startswith("data:"):
        return 0, False
    event = json.loads(line[len("data:"):])
    if "error" in event:
        raise RuntimeError(event["error"])
    return int(sum(_as_list(event.get("num_output_tokens", 0)))), event.get("finish_reason") not in (None, "", "None")


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _streaming_request(url: str, body: dict, headers: dict, result: Result, tokens_of, max_tokens: int) -> None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=1800)
    try:
        conn.request("POST", parts.path, body=json.dumps(body), headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        _read_stream(resp, result, tokens_of, max_tokens)
    finally:
        conn.close()


def torchserve_client(base_url: str, token: str | None):
    """pagedbackend's native route (the plain handler speaks it too): NDJSON chunks."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def send(prompt: str, max_tokens: int, result: Result) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0.0}
        _streaming_request(f"{base_url}/predictions/{MODEL_NAME}", body, headers, result, _native_tokens, max_tokens)
    return send


def pytriton_client(base_url: str):
    """Triton's `generate_stream` with the vLLM-backend tensor names: SSE events."""
    def send(prompt: str, max_tokens: int, result: Result) -> None:
        body = {"text_input": prompt, "stream": True, "exclude_input_in_output": True,
                "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0})}
        _streaming_request(f"{base_url}/v2/models/{MODEL_NAME}/generate_stream", body, {}, result, _sse_tokens,
                           max_tokens)
    return send


# ------------------------------------------------------------------------- load generator
def run_load(send, prompts: list[tuple[str, int]], rate: float, max_seconds: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s (inf: all at once); one thread per request."""
    rng = random.Random(seed)
    results = [Result() for _ in prompts]
    threads = []

    def one(i: int) -> None:
        prompt, max_tokens = prompts[i]
        results[i].sent = time.perf_counter()
        try:
            send(prompt, max_tokens, results[i])
        except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
            results[i].error = f"{type(e).__name__}: {e}"

    start = time.perf_counter()
    arrival = 0.0
    for i in range(len(prompts)):
        if arrival > max_seconds:
            break
        delay = start + arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        if math.isfinite(rate):
            arrival += rng.expovariate(rate)
    for t, r in zip(threads, results):
        t.join(timeout=max(1.0, start + max_seconds + 600 - time.perf_counter()))
        if t.is_alive() and r.error is None:
            r.error = "no answer within --max-seconds + 600 s"
    done = [r for r in results[:len(threads)] if r.error is None and r.latency is not None]
    errors = [r.error for r in results[:len(threads)] if r.error]
    duration = max(r.sent + r.latency for r in done) - start if done else float("nan")
    return metrics(done, duration, len(threads), errors)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")  # linear, as vLLM reports


def metrics(done: list[Result], duration: float, sent: int, errors: list[str]) -> dict:
    ttft = [r.ttft for r in done if r.ttft is not None]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [x for r in done for x in r.itl]
    out = {"sent": sent, "completed": len(done), "failed": len(errors), "errors": errors[:5],
           "duration_s": duration, "request_throughput": len(done) / duration,
           "output_tok_s": sum(r.output_tokens for r in done) / duration}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        out[f"{name}_mean_ms"] = 1e3 * statistics.fmean(values) if values else float("nan")
        out[f"{name}_median_ms"] = 1e3 * statistics.median(values) if values else float("nan")
        out[f"{name}_p99_ms"] = 1e3 * _pct(values, 99)
    return out


# ------------------------------------------------------------------------------ servers
class _TorchServeTarget:
    """A model archive in a TorchServe of its own; `self.server` is set by the subclass."""

    def __enter__(self):
        self.server.start()
        return torchserve_client(self.server.inference_url, self.server.keys().get("inference"))

    def __exit__(self, *exc) -> None:
        self.server.stop()


class PagedTorchServe(_TorchServeTarget):
    """pagedbackend's handler in TorchServe, archived the way `pagedbackend archive` does."""

    label = "pagedbackend via TorchServe"

    def __init__(self, model: Path, workdir: Path, args) -> None:
        from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive, load_model_config

        cfg = load_model_config()
        cfg["handler"].update({"max_num_seqs": args.max_num_seqs, "enable_prefix_caching": False})
        cfg_file = workdir / "paged-config.yaml"
        import yaml

        cfg_file.write_text(yaml.safe_dump(cfg))
        archive = build_archive(model, MODEL_NAME, workdir / "store", cfg_file, model_path=model)
        self.server = TorchServe(workdir / "store", {MODEL_NAME: archive.name}, workdir / "ts")


class PlainTorchServe(_TorchServeTarget):
    """benchmarks/plain_hf_handler.py with TorchServe's dynamic batching."""

    def __init__(self, model: Path, workdir: Path, args) -> None:
        import yaml

        from pagedbackend.adapters.torchserve.launcher import TorchServe

        self.label = f"transformers handler, TorchServe batchSize {args.plain_batch_size}"
        cfg = {"minWorkers": 1, "maxWorkers": 1, "batchSize": args.plain_batch_size, "jobQueueSize": 1024,
               "maxBatchDelay": args.plain_max_batch_delay_ms, "responseTimeout": 1800,
               "handler": {"threads": args.threads}}
        cfg_file = workdir / "plain-config.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        store = workdir / "plain-store"
        store.mkdir()
        archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
        done = subprocess.run([archiver, "--model-name", MODEL_NAME, "--version", "1.0",
                               "--handler", str(HERE / "plain_hf_handler.py"), "--extra-files", str(model),
                               "--config-file", str(cfg_file), "--export-path", str(store),
                               "--archive-format", "no-archive"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stderr or done.stdout}")
        self.server = TorchServe(store, {MODEL_NAME: MODEL_NAME}, workdir / "plain-ts")


class PagedPyTriton:
    """`pagedbackend serve pytriton` in its own process (the load generator must not share its GIL)."""

    label = "pagedbackend via PyTriton"

    def __init__(self, model: Path, workdir: Path, args) -> None:
        from pagedbackend.adapters.ports import free_port

        self.model, self.args = model, args
        self.ports = [free_port() for _ in range(4)]
        self.log = workdir / "pytriton.log"

    def __enter__(self):
        http, grpc, metrics_port, engine_metrics = self.ports
        cmd = [sys.executable, "-m", "pagedbackend.cli", "serve", "pytriton", "--model", str(self.model),
               "--name", MODEL_NAME, "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics_port), "--engine-metrics-port", str(engine_metrics),
               "--max-num-seqs", str(self.args.max_num_seqs), "--no-prefix-caching"]
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pytriton server exited; see {self.log}:\n{self.log.read_text()[-2000:]}")
                try:
                    if urllib.request.urlopen(f"{url}/v2/models/{MODEL_NAME}/ready", timeout=2).status == 200:
                        return pytriton_client(url)
                except OSError:
                    time.sleep(1)
            raise TimeoutError(f"pytriton not ready; see {self.log}")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


TARGETS = {"pagedbackend-torchserve": PagedTorchServe, "plain-torchserve": PlainTorchServe,
           "pagedbackend-pytriton": PagedPyTriton}


# --------------------------------------------------------------------------------- main
def make_prompts(model: Path, num: int, scale: float, seed: int) -> tuple[list[tuple[str, int]], float]:
    """(text, max_tokens) per request, and the mean prompt length in tokens as the servers will
    see it (random ids decoded to text re-tokenize to somewhat different lengths)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = [(tok.decode(r.prompt_token_ids, skip_special_tokens=True), r.max_tokens)
               for r in sharegpt_workload(num, scale, tok.vocab_size, seed)]
    return prompts, statistics.fmean(len(tok(text)["input_ids"]) for text, _ in prompts)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric, title in ((axes[0], "output_tok_s", "output tok/s"), (axes[1], "ttft_p99_ms", "p99 TTFT (ms, log)"),
                              (axes[2], "tpot_median_ms", "median TPOT (ms)")):
        rates = results["rates"]
        width = 0.8 / max(1, len(results["targets"]))
        for j, (name, per_rate) in enumerate(results["targets"].items()):
            values = [per_rate.get(str(r), {}).get(metric, float("nan")) for r in rates]
            ax.bar([i + (j - (len(results["targets"]) - 1) / 2) * width for i in range(len(rates))], values, width,
                   label=per_rate["label"])
        ax.set_xticks(range(len(rates)), [f"{r} req/s" for r in rates])
        ax.set_title(title)
        if metric == "ttft_p99_ms":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(results["workload"])
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)


def measure_target(name: str, cls, model: Path, tmp: Path, prompts, rates, args) -> dict:
    """Start the target (unless measuring --url), warm it up, run every rate, stop it. A target
    that fails is recorded with its error; the others still run."""
    server = None
    per_rate: dict = {"label": f"{args.kind} at {args.url}" if cls is None else name}
    try:
        if cls is None:
            send = torchserve_client(args.url, args.token) if args.kind == "torchserve" else pytriton_client(args.url)
        else:
            (tmp / name).mkdir()
            candidate = cls(model, tmp / name, args)
            per_rate["label"] = candidate.label
            print(f"starting {candidate.label} ...", flush=True)
            send = candidate.__enter__()
            server = candidate
        send(prompts[0][0], 4, Result(sent=time.perf_counter()))  # warm-up
        for rate in rates:
            r = run_load(send, prompts, rate, args.max_seconds, args.seed)
            per_rate[str(rate)] = r
            print(f"  {rate} req/s: {r['completed']}/{r['sent']} done in {r['duration_s']:.1f}s, "
                  f"{r['output_tok_s']:.0f} out tok/s, TTFT p99 {r['ttft_p99_ms']:.0f} ms"
                  + (f", {r['failed']} failed, e.g. {r['errors'][0][:160]}" if r["failed"] else ""), flush=True)
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        per_rate["error"] = f"{type(e).__name__}: {e}"
        print(f"  {per_rate['label']} failed: {per_rate['error']}", flush=True)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return per_rate


def main() -> None:
    global MODEL_NAME
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: the reference model, built if missing)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    p.add_argument("--url", help="measure this running server instead of starting targets")
    p.add_argument("--kind", choices=("torchserve", "pytriton"), default="torchserve", help="with --url")
    p.add_argument("--model-name", default=MODEL_NAME, help="with --url")
    p.add_argument("--token", help="with --url: TorchServe inference key, if token authorization is on")
    p.add_argument("--rates", default="inf,4", help="comma-separated request rates (req/s); inf = all at once")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--scale", type=float, default=0.25, help="ShareGPT length scale")
    p.add_argument("--max-seconds", type=float, default=300, help="stop sending new requests after this")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--plain-batch-size", type=int, default=16)
    p.add_argument("--plain-max-batch-delay-ms", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for every server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT / "serving.json")
    args = p.parse_args()
    MODEL_NAME = args.model_name
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every server started below
    model = (args.model or reference_model()).resolve()
    rates = [float(r) for r in args.rates.split(",")]
    prompts, prompt_mean = make_prompts(model, args.num_prompts, args.scale, args.seed)
    workload = (f"{len(prompts)} ShareGPT-shaped requests (scale {args.scale}, prompt mean {prompt_mean:.0f}, output mean "
                f"{statistics.fmean(m for _, m in prompts):.0f}, max {max(m for _, m in prompts)} tokens), "
                f"streaming, {args.threads} threads")
    print(f"model {model} | {workload}", flush=True)

    results = {"workload": workload, "rates": [str(r) for r in rates], "targets": {}}
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        if args.url:
            targets = {"url": None}
        else:
            targets = {name: TARGETS[name] for name in args.targets.split(",")}
        for name, cls in targets.items():
            results["targets"][name] = measure_target(name, cls, model, Path(tmp), prompts, rates, args)

    print(f"\n| target | rate | done | req/s | out tok/s | TTFT mean/median/p99 ms | TPOT mean/median/p99 ms "
          f"| ITL mean/median/p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for per_rate in results["targets"].values():
        for rate in results["rates"]:
            if rate not in per_rate:
                print(f"| {per_rate['label']} | {rate} | failed: {per_rate.get('error')} |")
                continue
            r = per_rate[rate]
            print(f"| {per_rate['label']} | {rate} | {r['completed']}/{r['sent']} | {r['request_throughput']:.2f} "
                  f"| {r['output_tok_s']:.0f} | {r['ttft_mean_ms']:.0f} / {r['ttft_median_ms']:.0f} / "
                  f"{r['ttft_p99_ms']:.0f} | {r['tpot_mean_ms']:.1f} / {r['tpot_median_ms']:.1f} / "
                  f"{r['tpot_p99_ms']:.1f} | {r['itl_mean_ms']:.1f} / {r['itl_median_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    paged, plain = results["targets"].get("pagedbackend-torchserve"), results["targets"].get("plain-torchserve")
    if paged and plain:
        for rate in [r for r in results["rates"] if r in paged and r in plain]:
            a, b = paged[rate], plain[rate]
            ratio = a["output_tok_s"] / b["output_tok_s"]
            results.setdefault("paged_vs_plain", {})[rate] = {
                "output_tok_s_ratio": ratio, "ttft_p99_ratio": b["ttft_p99_ms"] / a["ttft_p99_ms"]}
            print(f"at {rate} req/s, through TorchServe: pagedbackend {ratio:.1f}x the plain handler's output tok/s, "
                  f"p99 TTFT {a['ttft_p99_ms']:.0f} vs {b['ttft_p99_ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
