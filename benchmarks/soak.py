"""Soak test: bounded hostile load against both serving adapters, with every answer checked.

    python benchmarks/soak.py --short                  # ~1 minute per adapter, 12 clients
    python benchmarks/soak.py --long                   # ~5 minutes per adapter, 48 clients (make soak)
    python benchmarks/soak.py --short --targets pytriton --out /tmp/soak.json

For each target (`pagedbackend serve torchserve`, `pagedbackend serve pytriton`) the script
starts the server itself, as a subprocess on free 127.0.0.1 ports with its own temporary
directory, on a tiny random-weight model it builds (or `--model`), once per phase:

- `main` (long mode only): a roomy KV pool;
- `recompute`: a pool of 40 blocks of 16 tokens with preemption by recompute;
- `swap`: the same pool with preemption by swap.

In every phase N clients (12 short / 48 long) send requests for a bounded time and count:
~70% good requests (greedy or seeded sampling, n = 1 or 2; TorchServe: native NDJSON and JSON,
OpenAI completions and chat, streamed (SSE) and not; PyTriton: `generate_stream` SSE, gRPC
streaming with tritonclient, `generate`, gRPC non-streaming), ~20% that disconnect mid-stream
(or right after sending), ~10% bad input drawn from a fixed list of cases (type errors per
field, empty / invalid / non-UTF-8 / non-object bodies, huge numbers, 100000-deep nesting,
unknown fields, n and best_of far over max_num_seqs, a 6+ MB prompt, max_tokens=10**12,
out-of-vocabulary allowed_token_ids / logit_bias, and for PyTriton a client-sent
`pagedbackend_cancel` parameter). In the first phase one client sends every bad case once
before joining the mix, so each case is covered under load.

Checks, each counted per phase (a check passes when it has no failure):

- mismatch / prefix_mismatch: every completed greedy or seeded output equals offline
  `pagedbackend.LLM(...).generate` (token ids where the route returns them, text on OpenAI
  routes); a disconnected request's output is an exact prefix of it;
- finish_count: exactly one finish per choice (and one `[DONE]` at the end of OpenAI streams);
- status_good / status_bad_input / no_5xx / error_body_200: 200 for good requests, 4xx for bad
  input, never 5xx, never 200 with an error body or error event;
- content_type: application/x-ndjson (native streams), text/event-stream (SSE),
  application/json otherwise (errors included; Triton's generate_stream sends errors as an SSE
  event, its protocol), from the response head on;
- PyTriton bodies that Triton's own HTTP server cannot parse (empty, invalid JSON, deep nesting,
  wrong-typed top-level inputs) never reach the binding: they are counted as
  rejected_by_triton with Triton's status, and must still be clean errors;
- clean_errors / names_field: no Python traceback or file path in any error message; the
  error of a bad field names it;
- protocol / timeout / transport: parseable answers, within the time bound, no reset;
- kv_idle: KV usage, running and waiting back to 0 after the load (TorchServe's Prometheus
  endpoint; PyTriton's engine-metrics endpoint); kv_exhaustion_reached: the small-pool
  phases really preempted;
- rss_bounded: the server's RSS (summed over its process tree) grew less than the bound;
- fresh_request: a new request after the load is served and correct;
- shutdown_time / no_process_left (/ workspace_removed): SIGTERM, with one stream in flight,
  stops the server within the bound and leaves no process (nor PyTriton workspace) behind.

Prints a table per target and the failing checks with evidence (case, status, content type,
body excerpt); writes everything to --out (JSON). Exit code 0 only when every check passed.
Every client call has a timeout, every server is stopped in a finally block (SIGTERM, then
SIGKILL of each process of its tree), and a watchdog bounds the whole run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
MODEL_NAME = "soak"

# ----------------------------------------------------------------------------- bounds
REQUEST_TIMEOUT_S = 60.0        # a good request must be answered completely within this
BAD_REQUEST_TIMEOUT_S = 30.0    # a bad request must be refused within this
SOCKET_TIMEOUT_S = 20.0         # connecting and sending may not block longer (reads: the request's time left)
START_TIMEOUT_S = 180.0         # server start (archive, model load, ready banner)
IDLE_TIMEOUT_S = 30.0           # after the load, KV usage / running / waiting must reach 0 within this
SHUTDOWN_LIMIT_S = 20.0         # SIGTERM to exit of the whole process tree (the bound the adapters state)
RSS_GROWTH_LIMIT_MIB = 256.0    # RSS after the load may exceed RSS before it by at most
RSS_GROWTH_LIMIT_FRACTION = 0.5  # max(RSS_GROWTH_LIMIT_MIB, this fraction of RSS before)
BAD_FRACTION = 0.10
DISCONNECT_FRACTION = 0.20
BLOCK_SIZE = 16
SMALL_POOL_BLOCKS = 40
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 256
HUGE_PROMPT_CHARS = 6_200_000   # "6+ MB"; under TorchServe's default 6.5 MB request limit

PHASE_CONFIG = {
    "main": dict(num_kv_blocks=2048, preemption_mode="recompute"),
    "recompute": dict(num_kv_blocks=SMALL_POOL_BLOCKS, preemption_mode="recompute"),
    "swap": dict(num_kv_blocks=SMALL_POOL_BLOCKS, preemption_mode="swap", swap_space=0.05),
}
MODES = {  # clients, [(phase, load seconds, request budget)], watchdog seconds per target
    "short": dict(clients=12, phases=[("recompute", 18, 1500), ("swap", 10, 800)], watchdog=300),
    "long": dict(clients=48, phases=[("main", 170, 40000), ("recompute", 60, 15000), ("swap", 60, 15000)],
                 watchdog=1500),
}

CHECKS = ("mismatch", "prefix_mismatch", "finish_count", "status_good", "status_bad_input", "no_5xx",
          "error_body_200", "content_type", "clean_errors", "names_field", "protocol", "timeout", "transport",
          "server_start", "server_alive", "kv_idle", "kv_exhaustion_reached", "rss_bounded", "fresh_request",
          "shutdown_time", "no_process_left", "workspace_removed")

NDJSON, SSE, JSON_CT = "application/x-ndjson", "text/event-stream", "application/json"
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|site-packages|"
                        r"(?:^|[\s\"'(=])/(?:[\w.\-]+/)+[\w.\-]+\.(?:py|pyc|so)\b|\b[\w\-/]+\.py\", line")


# ============================================================================ model + reference
WORDS = ("the quick brown fox jumps over a lazy dog paged attention stores key value cache in fixed size blocks "
         "like pages of memory once upon time small village by sea there lived an old fisherman and his "
         "daughter every morning they sailed out before sunrise came back at noon with baskets full fish "
         "numbers 0 1 2 42 100 café naïve 東京 🙂").split()


@dataclass
class Spec:
    sid: int
    kind: str                   # "text" | "chat"
    prompt: str                 # the text, or the user message of a chat
    params: dict[str, Any]      # SamplingParams fields, JSON-able
    long: bool = False
    system: str | None = None

    @property
    def n(self) -> int:
        return int(self.params.get("n", 1))

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.prompt}]


def make_catalog(seed: int) -> list[Spec]:
    """Seeded good requests: short ones (greedy 60% / seeded sampling 40%, n = 2 for 20%) and
    long ones (for disconnects). Every one fits the small pool alone (<= 16 blocks)."""
    rng = random.Random(seed)
    specs: list[Spec] = []

    def sampling(params: dict[str, Any]) -> None:
        if rng.random() < 0.6:
            params["temperature"] = 0.0
        else:
            params.update(temperature=0.8, top_p=0.9, seed=rng.randrange(2**31))
            if rng.random() < 0.5:
                params["top_k"] = 20

    for i in range(40):
        params: dict[str, Any] = {"max_tokens": rng.randint(4, 40), "ignore_eos": rng.random() < 0.7}
        sampling(params)
        if rng.random() < 0.2:
            params["n"] = 2
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        kind = "chat" if i % 4 == 3 else "text"
        specs.append(Spec(len(specs), kind, prompt, params,
                          system="be brief" if kind == "chat" and rng.random() < 0.5 else None))
    for i in range(14):
        n = 2 if i % 4 == 1 else 1
        params = {"max_tokens": rng.randint(50, 60) if n == 2 else rng.randint(60, 100), "ignore_eos": True}
        sampling(params)
        if n == 2:
            params["n"] = 2
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))
        specs.append(Spec(len(specs), "chat" if i % 3 == 2 else "text", prompt, params, long=True))
    return specs


@dataclass
class Ref:
    texts: list[str]
    ids: list[list[int]]
    prompt_len: int


def chat_prompt_ids(tokenizer: Any, spec: Spec) -> list[int]:
    """What the OpenAI chat route feeds the engine: the chat template's text, encoded with no
    added special tokens (pagedbackend.openai_api.parse_chat)."""
    text = tokenizer.apply_chat_template(spec.messages(), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def compute_references(model: Path, specs: list[Spec]) -> dict[int, Ref]:
    from pagedbackend import LLM, SamplingParams

    llm = LLM(str(model), seed=0, max_model_len=MAX_MODEL_LEN)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_prompt_ids(tok, s)} if s.kind == "chat" else s.prompt for s in specs]
    outs = llm.generate(prompts, [SamplingParams(**s.params) for s in specs], use_tqdm=False)
    refs = {}
    for s, o in zip(specs, outs):
        samples = sorted(o.outputs, key=lambda c: c.index)
        refs[s.sid] = Ref([c.text for c in samples], [list(c.token_ids) for c in samples], len(o.prompt_token_ids))
    llm.llm_engine.check_all_blocks_free()
    del llm
    return refs


def build_model(out: Path) -> Path:
    from pagedbackend.tiny_model import build_tiny_model

    return build_tiny_model(out, "llama", num_heads=4, num_kv_heads=2)


# ============================================================================ recording
class Stats:
    """Counters and check failures of one phase (thread-safe)."""

    MAX_EXAMPLES = 8

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: Counter = Counter()
        self.bad_status: Counter = Counter()
        self.failures: dict[str, int] = {c: 0 for c in CHECKS}
        self.examples: dict[str, list[dict]] = {c: [] for c in CHECKS}
        self.bad_cases: dict[str, dict] = {}
        self.info: dict[str, Any] = {}

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def fail(self, check: str, case: str, detail: str = "", resp: "Response | None" = None, **extra: Any) -> None:
        example = {"case": case, "detail": detail[:400]}
        if resp is not None:
            example.update(status=resp.status, content_type=resp.ctype, excerpt=resp.excerpt())
        example.update(extra)
        with self.lock:
            self.failures[check] += 1
            if len(self.examples[check]) < self.MAX_EXAMPLES:
                self.examples[check].append(example)

    def bad_case(self, name: str, route: str, status: Any, ctype: str, excerpt: str, failed: list[str]) -> None:
        with self.lock:
            self.bad_status[str(status)] += 1
            entry = self.bad_cases.setdefault(name, {"route": route, "sent": 0, "failed": 0, "statuses": Counter(),
                                                     "failed_checks": [], "example": None})
            entry["sent"] += 1
            entry["statuses"][str(status)] += 1
            if failed:
                entry["failed"] += 1
                entry["failed_checks"] = sorted(set(entry["failed_checks"]) | set(failed))
            if entry["example"] is None or (failed and not entry["example"]["failed"]):
                entry["example"] = {"status": status, "content_type": ctype, "excerpt": excerpt, "failed": failed}

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "counters": dict(self.counters),
                "bad_input_by_status": dict(sorted(self.bad_status.items())),
                "checks": {c: {"passed": self.failures[c] == 0, "failures": self.failures[c],
                               "examples": self.examples[c]} for c in CHECKS},
                "bad_cases": {k: {**v, "statuses": dict(v["statuses"])} for k, v in sorted(self.bad_cases.items())},
                **self.info,
            }


# ============================================================================ HTTP client
@dataclass
class Response:
    status: int | None = None
    ctype: str = ""
    body: bytes = b""
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    disconnected: bool = False
    eof: bool = False
    error: str | None = None
    elapsed: float = 0.0

    def text(self) -> str:
        return self.body.decode("utf-8", "replace") if self.body else "".join(self.lines)

    def excerpt(self, limit: int = 300) -> str:
        text = self.text()
        return text[:limit] + (f"... [{len(text)} chars]" if len(text) > limit else "")

    @property
    def media_type(self) -> str:
        return self.ctype.split(";")[0].strip().lower()


def _close(conn: http.client.HTTPConnection, rst: bool = False) -> None:
    try:
        if rst and conn.sock is not None:  # an abrupt reset instead of an orderly close
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass


def exchange(port: int, path: str, payload: bytes, headers: dict[str, str] | None = None, *, stream: bool = False,
             sse: bool = False, disconnect_after: int | None = None, close_before_answer: bool = False,
             rst: bool = False, timeout: float = REQUEST_TIMEOUT_S, max_body: int = 4 << 20,
             on_line: Callable[[str, float], None] | None = None, content_type: str | None = JSON_CT) -> Response:
    """POST `payload`; read the answer (line by line when `stream` and the status is 200),
    never blocking past `timeout` in total (every read waits at most for the time left). With
    `disconnect_after`, the client goes away after that many data lines."""
    r = Response()
    start = time.monotonic()
    deadline = start + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=min(timeout, SOCKET_TIMEOUT_S))
    hdrs = dict(headers or {})
    if content_type:
        hdrs.setdefault("Content-Type", content_type)
    try:
        conn.request("POST", path, body=payload, headers=hdrs)
        if close_before_answer:
            r.disconnected = True
            return r

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            return remaining

        left()
        resp = conn.getresponse()
        r.status, r.ctype = resp.status, resp.getheader("Content-Type") or ""
        if not stream or r.status != 200:
            chunks, size = [], 0
            while size < max_body:
                if time.monotonic() > deadline:
                    r.error = f"timeout: answer not complete after {timeout:.0f}s"
                    break
                left()
                piece = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not piece:
                    r.eof = True
                    break
                chunks.append(piece)
                size += len(piece)
            r.body = b"".join(chunks)
            return r
        units = 0
        while True:
            if time.monotonic() > deadline:
                r.error = f"timeout: stream still open after {timeout:.0f}s"
                break
            left()
            line = resp.readline(8 << 20)
            if not line:
                r.eof = True
                break
            now = time.monotonic()
            text = line.decode("utf-8", "replace")
            r.lines.append(text)
            r.times.append(now)
            if on_line is not None:
                on_line(text, now)
            if (text.startswith("data:") if sse else bool(text.strip())):
                units += 1
                if disconnect_after is not None and units >= disconnect_after:
                    r.disconnected = True
                    break
    except (socket.timeout, TimeoutError):
        got = "nothing" if r.status is None else f"status {r.status}, {len(r.lines) or len(r.body)} lines/bytes"
        r.error = f"timeout: not answered within {timeout:.0f}s ({got})"
    except (OSError, http.client.HTTPException) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        _close(conn, rst and r.disconnected)
        r.elapsed = time.monotonic() - start
    return r


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode("utf-8", "replace")


def prom_samples(text: str, model_label: str | None = None) -> dict[str, float]:
    """Prometheus samples by name (the first series whose labels mention the model, else any)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$", line)
        if not m or m.group(1).endswith("_bucket"):
            continue
        labels = m.group(2) or ""
        if model_label and labels and model_label not in labels:
            continue
        out.setdefault(m.group(1), float(m.group(3)))
    return out


def error_fields(text: str) -> tuple[dict | None, str, str | None]:
    """(parsed error document, message, param) of an error answer: pagedbackend's
    {"error": {"message", "param"}}, Triton's {"error": "..."} (also as an SSE event), or
    TorchServe's own {"code", "type", "message"}."""
    doc: Any = None
    try:
        doc = json.loads(text)
    except ValueError:
        for line in text.splitlines():
            if line.startswith("data:"):
                try:
                    doc = json.loads(line[5:])
                    break
                except ValueError:
                    pass
    if not isinstance(doc, dict):
        return None, text, None
    err = doc.get("error")
    if isinstance(err, dict):
        return doc, str(err.get("message", "")), err.get("param")
    if isinstance(err, str):
        return doc, err, None
    return doc, str(doc.get("message", "")), None


def is_unclean(text: str) -> bool:
    return bool(_TRACEBACK.search(text))


# ============================================================================ servers
def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


class ServerProcess:
    """A `pagedbackend serve ...` subprocess with its own directory; tracks every process of
    its tree so that none can be left behind."""

    kind = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "t").mkdir(exist_ok=True)
        self.log_path = self.workdir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, float] = {}  # pid -> create time
        self.banner = ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # PyTriton's workspace and every temp file inside workdir (kept short: PyTriton's ZMQ
        # socket paths under it must stay below 108 characters).
        env["TMPDIR"] = str(self.workdir / "t")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env(),
                                     cwd=self.workdir, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.snapshot()
            text = self.log_path.read_text(errors="replace")
            if "Ctrl-C to stop" in text:
                self.banner = text
                self.snapshot()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with code {self.proc.returncode} before it was ready:\n"
                                   + text[-3000:])
            time.sleep(0.3)
        raise TimeoutError(f"{self.kind} server not ready after {timeout:.0f}s; log tail:\n"
                           + self.log_path.read_text(errors="replace")[-3000:] + self.extra_log_tail())

    def extra_log_tail(self) -> str:
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def snapshot(self) -> list[Any]:
        if self.proc is None:
            return []
        procs = _tree(self.proc.pid)
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass
        return procs

    def rss_mib(self) -> float:
        total = 0
        for p in self.snapshot():
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001
                pass
        return total / 2**20

    def leftovers(self) -> list[Any]:
        import psutil

        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                pass
        return left

    def terminate(self, limit: float) -> tuple[float | None, list[str]]:
        """SIGTERM; seconds until the serve process and every process of its tree are gone
        (None if not within `limit`), and what was left (then killed)."""
        if self.proc is None:
            return 0.0, []
        self.snapshot()
        start = time.monotonic()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        elapsed = None
        while time.monotonic() - start < limit:
            if self.proc.poll() is not None and not self.leftovers():
                elapsed = time.monotonic() - start
                break
            self.snapshot() if self.proc.poll() is None else None
            time.sleep(0.1)
        left = [f"pid {p.pid}: {' '.join(p.cmdline())[:160]}" for p in self.leftovers() if _safe(p)]
        self.kill_all()
        return elapsed, left

    def kill_all(self) -> None:
        """SIGKILL every process of the tree still alive (each by its id), reap the serve process."""
        import psutil

        if self.proc is not None and self.proc.poll() is None:
            self.snapshot()
        for p in self.leftovers():
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def ports(self) -> list[int]:
        raise NotImplementedError

    def open_ports(self) -> list[int]:
        open_ = []
        for port in self.ports():
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    open_.append(port)
        return open_


try:  # loaded here, not in the forked child (which must not import anything)
    import ctypes

    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the server's child process, before exec: get SIGTERM (and stop cleanly) if this
    script dies, even by SIGKILL, so that no server outlives its soak."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _safe(p: Any) -> bool:
    try:
        p.cmdline()
        return True
    except Exception:  # noqa: BLE001
        return False


def free_ports(n: int) -> list[int]:
    from pagedbackend.adapters.ports import free_port

    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


class TorchServeProcess(ServerProcess):
    kind = "torchserve"

    def __init__(self, workdir: Path, model: Path, engine: dict[str, Any]) -> None:
        super().__init__(workdir)
        from pagedbackend.adapters.torchserve.launcher import load_model_config

        import yaml

        self.port, self.management_port, self.metrics_port = free_ports(3)
        cfg = load_model_config()
        cfg["handler"] = {**(cfg.get("handler") or {}), "max_num_seqs": MAX_NUM_SEQS, "max_model_len": MAX_MODEL_LEN,
                          "block_size": BLOCK_SIZE, "metrics_interval_s": 0.5, **engine}
        self.config = self.workdir / "model-config.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.model = model
        self.num_blocks = int(engine["num_kv_blocks"])
        self._key: str | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pagedbackend.cli", "serve", "torchserve", "--model", str(self.model),
                "--name", MODEL_NAME, "--config", str(self.config), "--workdir", str(self.workdir / "ts"),
                "--port", str(self.port), "--management-port", str(self.management_port),
                "--metrics-port", str(self.metrics_port), "--timeout", str(int(START_TIMEOUT_S))]

    def env(self) -> dict[str, str]:
        env = super().env()
        jtmp = self.workdir / "jtmp"  # the frontend's extracted archives and worker sockets
        jtmp.mkdir(exist_ok=True)
        env["JAVA_TOOL_OPTIONS"] = f"-Djava.io.tmpdir={jtmp}"
        return env

    def extra_log_tail(self) -> str:
        log = self.workdir / "ts" / "logs" / "model_log.log"
        return ("\nmodel_log tail:\n" + log.read_text(errors="replace")[-2000:]) if log.is_file() else ""

    def ports(self) -> list[int]:
        return [self.port, self.management_port, self.metrics_port]

    @property
    def headers(self) -> dict[str, str]:
        if self._key is None:
            key_file = self.workdir / "ts" / "key_file.json"
            try:
                self._key = json.loads(key_file.read_text())["inference"]["key"]
            except (OSError, ValueError, KeyError):
                self._key = ""
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def engine_state(self) -> dict[str, float]:
        s = prom_samples(get_text(f"http://127.0.0.1:{self.metrics_port}/metrics"), f'ModelName="{MODEL_NAME}"')
        usage = s.get("KVCacheUsagePercent")
        state = {"kv_usage": None if usage is None else usage / 100.0,
                 "leaked_blocks": None if usage is None else round(usage / 100.0 * self.num_blocks),
                 "running": s.get("RunningRequests"), "waiting": s.get("WaitingRequests"),
                 "preemptions": s.get("Preemptions")}
        for name, key in (("RunningSequences", "running_seqs"), ("WaitingSequences", "waiting_seqs"),
                          ("SwappedSequences", "swapped_seqs"), ("SwapOuts", "swap_outs")):
            if name in s:
                state[key] = s[name]
        return state

    def log_files(self) -> list[Path]:
        return [self.log_path, *sorted((self.workdir / "ts" / "logs").glob("*.log"))]


class PyTritonProcess(ServerProcess):
    kind = "pytriton"

    def __init__(self, workdir: Path, model: Path, engine: dict[str, Any]) -> None:
        super().__init__(workdir)
        self.http_port, self.grpc_port, self.metrics_port, self.engine_metrics_port = free_ports(4)
        self.model = model
        self.engine = engine

    def command(self) -> list[str]:
        e = self.engine
        cmd = [sys.executable, "-m", "pagedbackend.cli", "serve", "pytriton", "--model", str(self.model),
               "--name", MODEL_NAME, "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--engine-metrics-port", str(self.engine_metrics_port),
               "--num-kv-blocks", str(e["num_kv_blocks"]), "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", str(MAX_NUM_SEQS), "--block-size", str(BLOCK_SIZE),
               "--preemption-mode", e["preemption_mode"]]
        if "swap_space" in e:
            cmd += ["--swap-space", str(e["swap_space"])]
        return cmd

    def ports(self) -> list[int]:
        return [self.http_port, self.grpc_port, self.metrics_port, self.engine_metrics_port]

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        super().start(timeout)
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL_NAME}/ready"
        deadline = time.monotonic() + 30
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.5)
        raise RuntimeError(f"pytriton printed its ready banner but {url} is not ready ({last}); log tail:\n"
                           + self.log_path.read_text(errors="replace")[-3000:])

    @property
    def workspace(self) -> Path | None:
        m = re.search(r"workspace\s+(\S+)", self.banner)
        return Path(m.group(1)) if m else None

    def engine_state(self) -> dict[str, float]:
        s = prom_samples(get_text(f"http://127.0.0.1:{self.engine_metrics_port}/metrics"), f'model="{MODEL_NAME}"')
        total, free = int(self.engine["num_kv_blocks"]), s.get("pagedbackend_num_kv_blocks_free")
        state = {"kv_usage": s.get("pagedbackend_kv_cache_usage_ratio"),
                 "leaked_blocks": None if free is None else total - int(free),
                 "running": s.get("pagedbackend_num_requests_running"),
                 "waiting": s.get("pagedbackend_num_requests_waiting"),
                 "preemptions": s.get("pagedbackend_preemptions_total")}
        for name, key in (("pagedbackend_num_seqs_running", "running_seqs"),
                          ("pagedbackend_num_seqs_waiting", "waiting_seqs"),
                          ("pagedbackend_num_seqs_swapped", "swapped_seqs"),
                          ("pagedbackend_swap_outs_total", "swap_outs")):
            if name in s:
                state[key] = s[name]
        return state

    def log_files(self) -> list[Path]:
        ws = self.workspace
        return [self.log_path] + ([ws / "triton.log"] if ws is not None else [])


# ============================================================================ request helpers
def _prefix_ok(got: list, want: list) -> bool:
    return want[:len(got)] == got


def _first_diff(got: Any, want: Any) -> str:
    if isinstance(got, str):
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return f"at char {i}: got {got[i:i + 40]!r}, want {want[i:i + 40]!r} (lengths {len(got)} / {len(want)})"
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"at token {i}: got {got[i:i + 10]}, want {want[i:i + 10]} (lengths {len(got)} / {len(want)})"


def check_samples(st: Stats, case: str, got: dict[int, Any], finishes: Counter, ref: Ref, n: int, use_text: bool,
                  completed: bool, resp: Response | None = None) -> None:
    """Compare what a good request received with the offline reference, choice by choice."""
    want_all = ref.texts if use_text else ref.ids
    extra = sorted(set(got) - set(range(n)))
    if extra:
        st.fail("protocol", case, f"choices {extra} beyond n={n}", resp)
    for i in range(n):
        g = got.get(i, "" if use_text else [])
        want = want_all[i]
        if completed:
            if g != want:
                st.fail("mismatch", case, f"choice {i} {_first_diff(g, want)}", resp)
            if finishes[i] != 1:
                st.fail("finish_count", case, f"choice {i} finished {finishes[i]} times", resp)
        elif not _prefix_ok(g, want):
            st.fail("prefix_mismatch", case, f"choice {i} (aborted) {_first_diff(g, want)}", resp)


def check_common(st: Stats, case: str, r: Response, want_ctype: str) -> bool:
    """Transport, status and content type of a good request's answer; False if unusable."""
    if r.error is not None and not r.disconnected:
        st.fail("timeout" if r.error.startswith("timeout") else "transport", case, r.error, r)
        if r.status is None:
            return False
    if r.status is None:
        return r.disconnected
    if r.status >= 500:
        st.fail("no_5xx", case, "good request answered 5xx", r)
    if r.status != 200:
        st.fail("status_good", case, f"good request answered {r.status}", r)
        if is_unclean(r.text()):
            st.fail("clean_errors", case, "traceback or file path in the error", r)
        return False
    if r.media_type != want_ctype:
        st.fail("content_type", case, f"want {want_ctype}", r)
    return True


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


# ============================================================================ targets
class Target:
    """One adapter: its server, its good routes, its bad cases."""

    name = ""

    def __init__(self, model: Path, refs: dict[int, Ref], specs: list[Spec], huge_prompt: str) -> None:
        self.model, self.refs, self.specs, self.huge = model, refs, specs, huge_prompt
        self.server: Any = None

    def text_specs(self, long: bool | None = None) -> list[Spec]:
        return [s for s in self.specs if s.kind == "text" and (long is None or s.long == long)]


class TorchServeTarget(Target):
    name = "torchserve"
    NATIVE = f"/predictions/{MODEL_NAME}"
    CMPL = f"/predictions/{MODEL_NAME}/1.0/v1/completions"
    CHAT = f"/predictions/{MODEL_NAME}/1.0/v1/chat/completions"

    def make_server(self, workdir: Path, engine: dict[str, Any]) -> TorchServeProcess:
        self.server = TorchServeProcess(workdir, self.model, engine)
        return self.server

    # ------------------------------------------------------------- good requests
    def good(self, st: Stats, rng: random.Random, spec: Spec, disconnect: bool) -> None:
        if spec.kind == "chat":
            routes = ["chat_stream"] * 3 + ["chat_json"]
        else:
            routes = ["native_stream"] * 3 + ["native_json"] + ["cmpl_stream"] * 2 + ["cmpl_json"]
        route = rng.choice(routes)
        early_close = disconnect and rng.random() < 0.25
        if disconnect and not early_close:
            route = route.replace("_json", "_stream")
        k = rng.randint(1, 6) if disconnect and not early_close else None
        getattr(self, "_" + route.split("_")[0])(st, rng, spec, route.endswith("stream"), k, early_close)

    def _post(self, path: str, body: dict, stream: bool, k: int | None, early_close: bool, rng: random.Random,
              sse: bool) -> Response:
        return exchange(self.server.port, path, json.dumps(body).encode(), self.server.headers, stream=stream, sse=sse,
                        disconnect_after=k, close_before_answer=early_close, rst=rng.random() < 0.5)

    def _native(self, st, rng, spec, stream, k, early_close) -> None:
        case = f"native {'stream' if stream else 'json'} spec {spec.sid}" + (" (disconnect)" if k or early_close else "")
        r = self._post(self.NATIVE, {"prompt": spec.prompt, **spec.params, "stream": stream}, stream, k, early_close,
                       rng, sse=False)
        self._account(st, r, k, early_close)
        if early_close or not check_common(st, case, r, NDJSON if stream else JSON_CT):
            return
        ref = self.refs[spec.sid]
        got: dict[int, list[int]] = {}
        finishes: Counter = Counter()
        if stream:
            chunks = []
            for line in r.lines:
                if not line.strip():
                    continue
                try:
                    chunks.append(json.loads(line))
                except ValueError:
                    st.fail("protocol", case, f"not a JSON line: {line[:120]!r}", r)
                    return
            for c in chunks:
                if "error" in c:
                    st.fail("error_body_200", case, f"error chunk in a 200 stream: {str(c)[:200]}", r)
                    if is_unclean(json.dumps(c)):
                        st.fail("clean_errors", case, "traceback or file path in the error chunk", r)
                    return
                idx = c.get("index", 0)
                got.setdefault(idx, []).extend(c.get("token_ids", []))
                if c.get("finish_reason") is not None:
                    finishes[idx] += 1
            completed = not r.disconnected
            if completed and (not chunks or "usage" not in chunks[-1]):
                st.fail("protocol", case, "stream did not end with a usage chunk (truncated?)", r)
        else:
            doc = self._json(st, case, r)
            if doc is None:
                return
            for o in doc.get("outputs", []):
                got[o.get("index", 0)] = o.get("token_ids", [])
                finishes[o.get("index", 0)] += o.get("finish_reason") is not None
            completed = True
        check_samples(st, case, got, finishes, ref, spec.n, False, completed, r)

    def _cmpl(self, st, rng, spec, stream, k, early_close) -> None:
        self._openai(st, rng, spec, stream, k, early_close, chat=False)

    def _chat(self, st, rng, spec, stream, k, early_close) -> None:
        self._openai(st, rng, spec, stream, k, early_close, chat=True)

    def _openai(self, st, rng, spec, stream, k, early_close, chat: bool) -> None:
        route = "chat" if chat else "completions"
        case = f"openai {route} {'stream' if stream else 'json'} spec {spec.sid}" + (
            " (disconnect)" if k or early_close else "")
        body: dict[str, Any] = {"model": MODEL_NAME, **spec.params, "stream": stream}
        if chat:
            body["messages"] = spec.messages()
        else:
            body["prompt"] = spec.prompt
        r = self._post(self.CHAT if chat else self.CMPL, body, stream, k, early_close, rng, sse=True)
        self._account(st, r, k, early_close)
        if early_close or not check_common(st, case, r, SSE if stream else JSON_CT):
            return
        got: dict[int, str] = {}
        finishes: Counter = Counter()
        if stream:
            events = [line[5:].strip() for line in r.lines if line.startswith("data:")]
            done = [i for i, e in enumerate(events) if e == "[DONE]"]
            completed = not r.disconnected
            if completed and (len(done) != 1 or done[0] != len(events) - 1):
                st.fail("finish_count", case, f"[DONE] at {done} of {len(events)} events", r)
            for e in events:
                if e == "[DONE]":
                    continue
                try:
                    ev = json.loads(e)
                except ValueError:
                    st.fail("protocol", case, f"not a JSON event: {e[:120]!r}", r)
                    return
                if "error" in ev:
                    st.fail("error_body_200", case, f"error event in a 200 stream: {e[:200]}", r)
                    if is_unclean(e):
                        st.fail("clean_errors", case, "traceback or file path in the error event", r)
                    return
                for ch in ev.get("choices", []):
                    idx = ch.get("index", 0)
                    piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    got[idx] = got.get(idx, "") + (piece or "")
                    if ch.get("finish_reason") is not None:
                        finishes[idx] += 1
        else:
            doc = self._json(st, case, r)
            if doc is None:
                return
            for ch in doc.get("choices", []):
                idx = ch.get("index", 0)
                got[idx] = (ch.get("message") or {}).get("content", "") if chat else ch.get("text", "")
                finishes[idx] += ch.get("finish_reason") is not None
            completed = True
        check_samples(st, case, got, finishes, self.refs[spec.sid], spec.n, True, completed, r)

    @staticmethod
    def _json(st: Stats, case: str, r: Response) -> dict | None:
        try:
            doc = json.loads(r.body)
        except ValueError:
            st.fail("protocol", case, "body is not JSON", r)
            return None
        if not isinstance(doc, dict) or "error" in doc:
            st.fail("error_body_200" if isinstance(doc, dict) else "protocol", case, "200 with an error body", r)
            return None
        return doc

    @staticmethod
    def _account(st: Stats, r: Response, k: int | None, early_close: bool) -> None:
        st.count("requests")
        if k is not None or early_close:
            st.count("aborted" if r.disconnected else "disconnect_missed")
            if not r.disconnected and r.error is None:
                st.count("completed")
        elif r.error is None and r.status == 200:
            st.count("completed")

    def fresh(self, st: Stats) -> None:
        spec = next(s for s in self.specs if s.kind == "text" and not s.long and s.params.get("temperature") == 0.0)
        before = dict(st.failures)
        self._native(st, random.Random(0), spec, True, None, False)
        failed = {c: st.failures[c] - before[c] for c in CHECKS if st.failures[c] != before[c]}
        if failed:
            st.fail("fresh_request", f"native stream spec {spec.sid}", f"failed checks: {failed}")

    def inflight_stream(self) -> Callable[[], Response]:
        body = {"prompt": "tell me everything", "max_tokens": 400, "ignore_eos": True, "stream": True}
        return lambda: exchange(self.server.port, self.NATIVE, json.dumps(body).encode(), self.server.headers,
                                stream=True, timeout=SHUTDOWN_LIMIT_S + 15)

    # ------------------------------------------------------------- bad input
    def bad_cases(self) -> list["BadCase"]:
        N, C, H = self.NATIVE, self.CMPL, self.CHAT
        ok = {"prompt": "hello", "max_tokens": 4}
        ok_chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        cases: list[BadCase] = []

        def add(name, path, body, param, raw=None):
            payload = raw if raw is not None else json.dumps(body).encode()
            cases.append(BadCase(name, path, payload, param))

        for route, path in (("native", N), ("completions", C), ("chat", H)):
            add(f"{route}/empty-body", path, None, None, raw=b"")
            add(f"{route}/invalid-json", path, None, None, raw=b"{not json")
            add(f"{route}/non-utf8", path, None, None, raw=b'{"prompt": "\xff\xfe\xfa"}')
            add(f"{route}/json-string", path, None, None, raw=b'"hello"')
            add(f"{route}/json-array", path, None, None, raw=b'[1, 2, 3]')
            add(f"{route}/deep-nesting-body", path, None, None, raw=b"[" * 100000 + b"]" * 100000)
        add("native/whitespace-body", N, None, None, raw=b"   \n ")
        add("native/truncated-json", N, None, None, raw=b'{"prompt": "hi"')
        add("native/json-number", N, None, None, raw=b"42")
        add("native/json-null", N, None, None, raw=b"null")
        add("native/deep-nesting-field", N, None, None,  # the parser fails before any field is read
            raw=b'{"prompt": "hi", "stop": ' + b"[" * 100000 + b"]" * 100000 + b"}")
        huge_int = "9" * 5000
        for route, path, base in (("native", N, ok), ("completions", C, ok), ("chat", H, ok_chat)):
            body = json.dumps(base)[:-1]
            add(f"{route}/huge-int-n", path, None, "n", raw=(body + f', "n": {huge_int}}}').encode())
            add(f"{route}/huge-int-max_tokens", path, None, "max_tokens",  # (a duplicate key: the last wins)
                raw=(body + f', "max_tokens": {huge_int}}}').encode())
            add(f"{route}/float-1e400-temperature", path, None, "temperature",
                raw=(body + ', "temperature": 1e400}').encode())
            add(f"{route}/unknown-field", path, {**base, "frobnicate": 1}, "frobnicate")
            add(f"{route}/n-200000", path, {**base, "n": 200000}, "n")
            add(f"{route}/max_tokens-1e12", path, {**base, "max_tokens": 10**12}, "max_tokens")
            add(f"{route}/allowed_token_ids-oov", path, {**base, "allowed_token_ids": [5_000_000, 9_999_999]},
                "allowed_token_ids")
            add(f"{route}/logit_bias-oov", path, {**base, "logit_bias": {"99999999": 5}}, "logit_bias")
        add("native/best_of-200000", N, {**ok, "best_of": 200000, "temperature": 1.0}, "best_of")
        add("completions/best_of-200000", C, {**ok, "best_of": 200000, "temperature": 1.0}, "best_of")
        add("native/prompt-6MB", N, {"prompt": self.huge, "max_tokens": 4}, "prompt")
        add("completions/prompt-6MB", C, {"prompt": self.huge, "max_tokens": 4}, "prompt")
        add("chat/content-6MB", H, {"messages": [{"role": "user", "content": self.huge}], "max_tokens": 4}, None)
        add("native/prompt_token_ids-oov", N, {"prompt_token_ids": [5, 99999], "max_tokens": 4}, "prompt_token_ids")
        add("native/prompt_token_ids-too-long", N, {"prompt_token_ids": [42] * 1100, "max_tokens": 4}, "prompt")
        add("native/temperature-negative", N, {**ok, "temperature": -1}, "temperature")
        add("native/top_p-7", N, {**ok, "top_p": 7}, "top_p")
        add("native/no-prompt", N, {"max_tokens": 4}, "prompt")
        add("native/unknown-route", f"/predictions/{MODEL_NAME}/1.0/v1/embeddings", {"input": "x"}, None)
        add("native/unknown-model", "/predictions/no-such-model", ok, None)
        type_errors = {"n": "two", "temperature": "hot", "top_p": [1], "top_k": 1.5, "min_p": "x", "seed": "s",
                       "max_tokens": "many", "min_tokens": {}, "stop": 5, "stop_token_ids": "x", "ignore_eos": "yes",
                       "include_stop_str_in_output": "yes", "skip_special_tokens": 1,
                       "spaces_between_special_tokens": "no", "presence_penalty": "x", "frequency_penalty": [],
                       "repetition_penalty": "x", "logit_bias": [1, 2], "allowed_token_ids": "x", "bad_words": 5,
                       "logprobs": "x", "prompt_logprobs": "x", "best_of": "x", "output_kind": "x",
                       "truncate_prompt_tokens": "x"}
        for f, v in type_errors.items():
            add(f"native/type-{f}", N, {**ok, f: v}, f)
        for f, v in {"prompt": 5, "stream": "yes", "priority": "high"}.items():
            add(f"native/type-{f}", N, {**ok, f: v}, f)
        add("native/type-prompt_token_ids", N, {"prompt_token_ids": "x", "max_tokens": 4}, "prompt_token_ids")
        openai_sampling = ("n", "temperature", "top_p", "seed", "stop", "max_tokens", "top_k", "min_p", "min_tokens",
                           "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
                           "spaces_between_special_tokens", "frequency_penalty", "presence_penalty",
                           "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words",
                           "truncate_prompt_tokens", "prompt_logprobs")
        for f in openai_sampling:
            add(f"completions/type-{f}", C, {**ok, f: type_errors[f]}, f)
        for f, v in {"prompt": 5, "stream": "yes", "echo": "x", "logprobs": "x", "best_of": "x",
                     "stream_options": "x", "priority": "x", "suffix": "x"}.items():
            add(f"completions/type-{f}", C, {**ok, f: v}, f)
        add("completions/logprobs-99", C, {**ok, "logprobs": 99}, "logprobs")
        for f in ("n", "temperature", "max_tokens", "top_p", "seed", "stop"):
            add(f"chat/type-{f}", H, {**ok_chat, f: type_errors[f]}, f)
        add("chat/no-messages", H, {"max_tokens": 4}, "messages")
        add("chat/messages-string", H, {"messages": "hi", "max_tokens": 4}, "messages")
        add("chat/messages-empty", H, {"messages": [], "max_tokens": 4}, "messages")
        add("chat/message-no-content", H, {"messages": [{"role": "user"}], "max_tokens": 4}, "messages[0].content")
        add("chat/message-no-role", H, {"messages": [{"content": "hi"}], "max_tokens": 4}, "messages[0].role")
        add("chat/content-int", H, {"messages": [{"role": "user", "content": 5}], "max_tokens": 4},
            "messages[0].content")
        add("chat/type-max_completion_tokens", H, {**ok_chat, "max_completion_tokens": "x"}, "max_tokens")
        add("chat/response_format-bad-schema", H, {**ok_chat, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}, "structured_outputs.json")
        add("chat/response_format-type", H, {**ok_chat, "response_format": {"type": "xml"}}, "response_format.type")
        add("chat/guided_json", H, {**ok_chat, "guided_json": {"type": "object"}}, "guided_json")
        add("chat/structured_outputs-bad-regex", H, {**ok_chat, "structured_outputs": {"regex": "a(b"}},
            "structured_outputs.regex")
        add("chat/type-logprobs", H, {**ok_chat, "logprobs": "x"}, "logprobs")
        add("chat/top_logprobs-without-logprobs", H, {**ok_chat, "top_logprobs": 2}, "top_logprobs")
        add("chat/tool_choice-unknown-function", H, {**ok_chat, "tools": [{"type": "function", "function": {"name": "f"}}],
                                                     "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice")
        add("chat/tools-not-functions", H, {**ok_chat, "tools": [{"type": "retrieval"}]}, "tools[0]")
        return cases

    def run_bad(self, st: Stats, case: "BadCase") -> None:
        st.count("requests")
        st.count("bad_input")
        r = exchange(self.server.port, case.path, case.payload, self.server.headers, timeout=BAD_REQUEST_TIMEOUT_S,
                     content_type=case.content_type)
        judge_bad_http(st, case.name, r, case.param)


@dataclass
class BadCase:
    name: str
    path: str
    payload: bytes
    param: str | None        # the field the error must name (None: a body-level error)
    content_type: str = JSON_CT


@dataclass
class GrpcBadCase:
    name: str
    prompt: bytes
    sampling: str | None
    param: str | None
    parameters: dict[str, Any] | None = None
    typed: dict[str, tuple[Any, str]] = field(default_factory=dict)  # input -> (numpy array, Triton dtype)


# What Triton's own HTTP server answers for a body it cannot parse, before any model sees it
# (its status and wording; the request never reaches the binding).
TRITON_FRONTEND_ERRORS = ("failed to parse the request JSON buffer", "attempt to get members for non-object",
                          "Number too big to be stored in double", "Unable to parse 'data'",
                          "attempt to access JSON non-")


def judge_bad_http(st: Stats, name: str, r: Response, param: str | None, error_ctypes: tuple[str, ...] = (JSON_CT,)) -> None:
    """A bad request must get a 4xx, an error content type (application/json; Triton's
    generate_stream sends its errors as an SSE event), an error naming the field, no traceback."""
    failed: list[str] = []

    def fail(check: str, detail: str) -> None:
        failed.append(check)
        st.fail(check, name, detail, r)

    if r.status is None:
        fail("timeout" if (r.error or "").startswith("timeout") else "transport", r.error or "no answer")
    else:
        text = r.text()
        doc, message, got_param = error_fields(text)
        if r.status >= 500:
            fail("no_5xx", f"bad input answered {r.status}")
        if not 400 <= r.status < 500:
            fail("status_bad_input", f"bad input answered {r.status}, want 4xx")
        if r.status == 200 and doc is not None and "error" in doc:
            fail("error_body_200", "200 with an error body")
        if r.media_type not in error_ctypes:
            fail("content_type", f"error answered as {r.ctype!r}, want {' or '.join(error_ctypes)}")
        if is_unclean(text):
            fail("clean_errors", "traceback or file path in the error")
        if 400 <= r.status < 500:
            if doc is None:
                fail("protocol", "error body is not a JSON error document")
            elif param is not None and got_param != param and param not in message:
                fail("names_field", f"error does not name {param!r} (param={got_param!r})")
        if r.error is not None:
            fail("timeout" if r.error.startswith("timeout") else "transport", r.error)
    st.bad_case(name, name.split("/")[0], r.status if r.status is not None else (r.error or "no answer")[:40],
                r.ctype, r.excerpt(240), failed)


class PyTritonTarget(Target):
    name = "pytriton"
    STREAM = f"/v2/models/{MODEL_NAME}/generate_stream"
    GENERATE = f"/v2/models/{MODEL_NAME}/generate"

    def make_server(self, workdir: Path, engine: dict[str, Any]) -> PyTritonProcess:
        self.server = PyTritonProcess(workdir, self.model, engine)
        return self.server

    def good(self, st: Stats, rng: random.Random, spec: Spec, disconnect: bool) -> None:
        if spec.kind != "text":
            spec = rng.choice(self.text_specs(spec.long))
        routes = ["sse", "sse", "grpc", "grpc"] + (["generate"] if spec.n == 1 else []) + ["grpc_nonstream"]
        if disconnect:
            routes = ["sse", "grpc"] + (["generate_close"] if rng.random() < 0.2 else [])
        route = rng.choice(routes)
        k = rng.randint(1, 6) if disconnect else None
        if route == "sse":
            self._sse(st, rng, spec, k)
        elif route == "grpc":
            self._grpc(st, rng, spec, True, k)
        elif route == "grpc_nonstream":
            self._grpc(st, rng, spec, False, None)
        else:
            self._generate(st, rng, spec, route == "generate_close")

    def _body(self, rng: random.Random, spec: Spec, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"text_input": spec.prompt, "exclude_input_in_output": True}
        if stream:
            body["stream"] = True
        params = dict(spec.params)
        if rng.random() < 0.3:  # typed inputs instead of JSON for the integer fields
            for key in ("max_tokens", "seed"):
                if key in params:
                    body[key] = params.pop(key)
        body["sampling_parameters"] = json.dumps(params)
        return body

    def _sse(self, st, rng, spec, k) -> None:
        case = f"sse spec {spec.sid}" + (" (disconnect)" if k else "")
        r = exchange(self.server.http_port, self.STREAM, json.dumps(self._body(rng, spec, True)).encode(), stream=True,
                     sse=True, disconnect_after=k, rst=rng.random() < 0.5)
        self._account(st, r.disconnected, r.error is None and r.status == 200, k is not None)
        if not check_common(st, case, r, SSE):
            return
        got: dict[int, list[int]] = {}
        finishes: Counter = Counter()
        events = []
        for line in r.lines:
            if line.startswith("data:"):
                try:
                    events.append(json.loads(line[5:]))
                except ValueError:
                    st.fail("protocol", case, f"not a JSON event: {line[:120]!r}", r)
                    return
        for ev in events:
            if "error" in ev:
                st.fail("error_body_200", case, f"error event in a 200 stream: {str(ev)[:200]}", r)
                if is_unclean(str(ev)):
                    st.fail("clean_errors", case, "traceback or file path in the error event", r)
                return
            self._collect(ev.get("token_ids", []), ev.get("num_output_tokens", 0), ev.get("finish_reason"), got,
                          finishes)
        completed = not r.disconnected
        if completed and not events:
            st.fail("protocol", case, "200 stream with no event", r)
        check_samples(st, case, got, finishes, self.refs[spec.sid], spec.n, False, completed, r)

    @staticmethod
    def _collect(token_ids: Any, counts: Any, finish: Any, got: dict[int, list[int]], finishes: Counter) -> None:
        ids, counts = [int(t) for t in _as_list(token_ids)], [int(c) for c in _as_list(counts)]
        pos = 0
        for i, c in enumerate(counts):
            got.setdefault(i, []).extend(ids[pos:pos + c])
            pos += c
        if finish is not None:
            for i, f in enumerate(_as_list(finish)):
                if f not in (None, "", "None", b"None"):
                    finishes[i] += 1

    def _generate(self, st, rng, spec, close_early: bool) -> None:
        case = f"generate spec {spec.sid}" + (" (disconnect)" if close_early else "")
        r = exchange(self.server.http_port, self.GENERATE, json.dumps(self._body(rng, spec, False)).encode(),
                     close_before_answer=close_early, rst=rng.random() < 0.5)
        self._account(st, r.disconnected, r.error is None and r.status == 200, close_early)
        if close_early or not check_common(st, case, r, JSON_CT):
            return
        try:
            doc = json.loads(r.body)
        except ValueError:
            st.fail("protocol", case, "body is not JSON", r)
            return
        if "error" in doc:
            st.fail("error_body_200", case, "200 with an error body", r)
            return
        got: dict[int, list[int]] = {}
        finishes: Counter = Counter()
        self._collect(doc.get("token_ids", []), doc.get("num_output_tokens", 0), doc.get("finish_reason"), got,
                      finishes)
        check_samples(st, case, got, finishes, self.refs[spec.sid], spec.n, False, True, r)

    # ------------------------------------------------------------- gRPC
    def _grpc_inputs(self, prompt: bytes, stream: bool, sampling: str | None, typed: dict | None = None) -> list:
        import numpy as np
        import tritonclient.grpc as grpcclient

        def tensor(name, value, dtype):
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            return t

        inputs = [tensor("text_input", np.array([prompt], dtype=np.object_), "BYTES"),
                  tensor("stream", np.array([stream]), "BOOL"),
                  tensor("exclude_input_in_output", np.array([True]), "BOOL")]
        if sampling is not None:
            inputs.append(tensor("sampling_parameters", np.array([sampling.encode()], dtype=np.object_), "BYTES"))
        for name, (value, dtype) in (typed or {}).items():
            inputs.append(tensor(name, value, dtype))
        return inputs

    def grpc_call(self, inputs: list, parameters: dict | None = None, cancel_after: int | None = None,
                  timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """One request on its own gRPC stream: its responses (as dicts), error, whether the
        final flag came, and whether the client cancelled."""
        import tritonclient.grpc as grpcclient

        got: queue.Queue = queue.Queue()
        out: dict[str, Any] = {"responses": [], "error": None, "final": 0, "cancelled": False, "timeout": False}
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.server.grpc_port}")
        cancel = False
        try:
            client.start_stream(callback=lambda result, error: got.put((result, error)))
            client.async_stream_infer(MODEL_NAME, inputs, request_id="soak", parameters=parameters,
                                      enable_empty_final_response=True)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    out["timeout"] = True
                    cancel = True
                    break
                try:
                    result, error = got.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if error is not None:
                    out["error"] = str(error)
                    break
                resp = result.get_response()
                final = resp.parameters["triton_final_response"].bool_param if "triton_final_response" in \
                    resp.parameters else False
                item = {}
                for name in ("token_ids", "num_output_tokens", "finish_reason", "text_output"):
                    value = result.as_numpy(name)
                    if value is not None:
                        item[name] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item()
                                      for v in value.reshape(-1)]
                if item:
                    out["responses"].append(item)
                if final:
                    out["final"] += 1
                    break
                if cancel_after is not None and len(out["responses"]) >= cancel_after:
                    out["cancelled"] = cancel = True
                    break
        except Exception as e:  # noqa: BLE001 - reported as a transport failure
            out["error"] = out["error"] or f"client: {type(e).__name__}: {e}"
            cancel = True
        finally:
            _close_grpc(client, cancel)
        return out

    def _grpc(self, st, rng, spec, stream: bool, k: int | None) -> None:
        case = f"grpc {'stream' if stream else 'nonstream'} spec {spec.sid}" + (" (disconnect)" if k else "")
        import numpy as np

        params = dict(spec.params)
        typed = {}
        if rng.random() < 0.3:
            if "max_tokens" in params:
                typed["max_tokens"] = (np.array([params.pop("max_tokens")], dtype=np.int32), "INT32")
            if "seed" in params:
                typed["seed"] = (np.array([params.pop("seed")], dtype=np.int64), "INT64")
        out = self.grpc_call(self._grpc_inputs(spec.prompt.encode(), stream, json.dumps(params), typed),
                             cancel_after=k)
        self._account(st, out["cancelled"], out["error"] is None and not out["timeout"] and out["final"] == 1,
                      k is not None)
        if out["timeout"]:
            st.fail("timeout", case, f"no final response after {REQUEST_TIMEOUT_S:.0f}s")
            return
        if out["error"] is not None:
            st.fail("status_good", case, f"good request refused: {out['error'][:300]}")
            if is_unclean(out["error"]):
                st.fail("clean_errors", case, out["error"][:300])
            return
        got: dict[int, list[int]] = {}
        finishes: Counter = Counter()
        for item in out["responses"]:
            self._collect(item.get("token_ids", []), item.get("num_output_tokens", [0]), item.get("finish_reason"),
                          got, finishes)
        completed = not out["cancelled"]
        if completed and out["final"] != 1:
            st.fail("finish_count", case, f"{out['final']} final responses")
        check_samples(st, case, got, finishes, self.refs[spec.sid], spec.n, False, completed)

    @staticmethod
    def _account(st: Stats, disconnected: bool, ok: bool, wanted_disconnect: bool) -> None:
        st.count("requests")
        if wanted_disconnect:
            st.count("aborted" if disconnected else "disconnect_missed")
            if not disconnected and ok:
                st.count("completed")
        elif ok:
            st.count("completed")

    def fresh(self, st: Stats) -> None:
        spec = next(s for s in self.specs if s.kind == "text" and not s.long and s.params.get("temperature") == 0.0)
        before = dict(st.failures)
        self._sse(st, random.Random(1), spec, None)
        self._grpc(st, random.Random(1), spec, True, None)
        failed = {c: st.failures[c] - before[c] for c in CHECKS if st.failures[c] != before[c]}
        if failed:
            st.fail("fresh_request", f"sse + grpc spec {spec.sid}", f"failed checks: {failed}")

    def inflight_stream(self) -> Callable[[], Response]:
        body = {"text_input": "tell me everything", "stream": True, "exclude_input_in_output": True,
                "sampling_parameters": json.dumps({"max_tokens": 400, "ignore_eos": True})}
        return lambda: exchange(self.server.http_port, self.STREAM, json.dumps(body).encode(), stream=True, sse=True,
                                timeout=SHUTDOWN_LIMIT_S + 15)

    # ------------------------------------------------------------- bad input
    def bad_cases(self) -> list[Any]:
        S = self.STREAM
        cases: list[Any] = []
        base = {"text_input": "hello", "stream": True, "exclude_input_in_output": True}

        def add(name, body, param, raw=None):
            cases.append(BadCase(name, S, raw if raw is not None else json.dumps(body).encode(), param))

        def sp(name, sampling: str, param):
            add(f"http/sampling-{name}", {**base, "sampling_parameters": sampling}, param)

        add("http/empty-body", None, None, raw=b"")
        add("http/invalid-json", None, None, raw=b"{not json")
        add("http/non-utf8", None, None, raw=b'{"text_input": "\xff\xfe\xfa", "stream": true, '
                                             b'"exclude_input_in_output": true}')
        add("http/json-string", None, None, raw=b'"hello"')
        add("http/json-array", None, None, raw=b"[1, 2, 3]")
        add("http/deep-nesting-body", None, None, raw=b"[" * 100000 + b"]" * 100000)
        add("http/no-text_input", {"stream": True, "exclude_input_in_output": True}, "text_input")
        add("http/type-text_input", {**base, "text_input": 5}, "text_input")
        add("http/type-stream", {**base, "stream": "yes"}, "stream")
        add("http/type-max_tokens-typed", {**base, "max_tokens": "lots"}, "max_tokens")
        add("http/type-temperature-typed", {**base, "temperature": "hot"}, "temperature")
        add("http/huge-int-typed-max_tokens", None, "max_tokens",
            raw=json.dumps(base)[:-1].encode() + b', "max_tokens": ' + b"9" * 5000 + b"}")
        add("http/stream-with-input-in-output", {**base, "exclude_input_in_output": False}, "exclude_input_in_output")
        add("http/unknown-field", {**base, "frobnicate": 1}, "frobnicate")
        add("http/client-sent-pagedbackend_cancel", {**base, "pagedbackend_cancel": "0123456789abcdef"},
            "pagedbackend_cancel")
        add("http/prompt-6MB", {**base, "text_input": self.huge}, "text_input")
        sp("invalid-json", "{not json", "sampling_parameters")
        sp("json-array", "[1, 2]", "sampling_parameters")
        sp("json-string", '"hot"', "sampling_parameters")
        sp("huge-int-max_tokens", '{"max_tokens": ' + "9" * 5000 + "}", "max_tokens")
        sp("float-1e400-temperature", '{"temperature": 1e400}', "temperature")
        sp("deep-nesting", "[" * 100000 + "]" * 100000, "sampling_parameters")
        sp("unknown-field", '{"frobnicate": 1}', "frobnicate")
        sp("n-200000", '{"n": 200000}', "n")
        sp("best_of-200000", '{"best_of": 200000, "temperature": 1.0}', "best_of")
        sp("max_tokens-1e12", json.dumps({"max_tokens": 10**12}), "max_tokens")
        sp("allowed_token_ids-oov", json.dumps({"allowed_token_ids": [5_000_000, 9_999_999]}), "allowed_token_ids")
        sp("logit_bias-oov", json.dumps({"logit_bias": {"99999999": 5}}), "logit_bias")
        sp("pagedbackend_cancel", json.dumps({"pagedbackend_cancel": "0123456789abcdef"}), "pagedbackend_cancel")
        type_errors = {"n": "two", "temperature": "hot", "top_p": [1], "top_k": 1.5, "min_p": "x", "seed": "s",
                       "max_tokens": "many", "min_tokens": {}, "stop": 5, "stop_token_ids": "x", "ignore_eos": "yes",
                       "include_stop_str_in_output": "yes", "skip_special_tokens": 1,
                       "spaces_between_special_tokens": "no", "presence_penalty": "x", "frequency_penalty": [],
                       "repetition_penalty": "x", "logit_bias": [1, 2], "allowed_token_ids": "x", "bad_words": 5,
                       "logprobs": "x", "prompt_logprobs": "x", "best_of": "x", "output_kind": "x",
                       "truncate_prompt_tokens": "x"}
        for f, v in type_errors.items():
            sp(f"type-{f}", json.dumps({f: v}), f)
        import numpy as np

        ok_sp = json.dumps({"max_tokens": 4})
        cases += [
            GrpcBadCase("grpc/sampling-type-temperature", b"hello", json.dumps({"temperature": "hot"}), "temperature"),
            GrpcBadCase("grpc/sampling-huge-int", b"hello", '{"n": ' + "9" * 5000 + "}", "n"),
            GrpcBadCase("grpc/sampling-deep-nesting", b"hello", "[" * 100000 + "]" * 100000, "sampling_parameters"),
            GrpcBadCase("grpc/non-utf8-text_input", b"\xff\xfe\xfa", ok_sp, "text_input"),
            GrpcBadCase("grpc/prompt-6MB", self.huge.encode(), ok_sp, "text_input"),
            GrpcBadCase("grpc/unknown-parameter", b"hello", None, "frobnicate", parameters={"frobnicate": 1}),
            GrpcBadCase("grpc/client-sent-pagedbackend_cancel", b"hello", None, "pagedbackend_cancel",
                        parameters={"pagedbackend_cancel": "0123456789abcdef"}),
            GrpcBadCase("grpc/typed-n-200000", b"hello", ok_sp, "n", typed={"n": (np.array([200000], dtype=np.int32),
                                                                                    "INT32")}),
            GrpcBadCase("grpc/typed-max_tokens-int32-max", b"hello", None, "max_tokens",
                        typed={"max_tokens": (np.array([2**31 - 1], dtype=np.int32), "INT32")}),
            GrpcBadCase("grpc/typed-max_tokens-wrong-dtype", b"hello", None, "max_tokens",
                        typed={"max_tokens": (np.array([5], dtype=np.int64), "INT64")}),
        ]
        return cases

    def run_bad(self, st: Stats, case: Any) -> None:
        st.count("requests")
        st.count("bad_input")
        if isinstance(case, BadCase):
            r = exchange(self.server.http_port, case.path, case.payload, timeout=BAD_REQUEST_TIMEOUT_S,
                         content_type=case.content_type)
            text = r.text() if r.status is not None else ""
            if r.status is not None and any(m in text for m in TRITON_FRONTEND_ERRORS):
                # Refused by Triton's HTTP server itself (its status, its message): counted apart,
                # and it must still be clean and leave the engine untouched.
                failed = []
                if is_unclean(text):
                    failed.append("clean_errors")
                    st.fail("clean_errors", case.name, "traceback or file path in the error", r)
                if r.status < 400:
                    failed.append("status_bad_input")
                    st.fail("status_bad_input", case.name, f"Triton accepted it with {r.status}", r)
                st.count("rejected_by_triton")
                st.bad_case(case.name, "triton-frontend", r.status, r.ctype, r.excerpt(240), failed)
                return
            sse = case.path.endswith("/generate_stream")
            judge_bad_http(st, case.name, r, case.param, (JSON_CT, SSE) if sse else (JSON_CT,))
            return
        out = self.grpc_call(self._grpc_inputs(case.prompt, True, case.sampling, case.typed), case.parameters,
                             timeout=BAD_REQUEST_TIMEOUT_S)
        failed: list[str] = []

        def fail(check: str, detail: str) -> None:
            failed.append(check)
            st.fail(check, case.name, detail, excerpt=(out["error"] or str(out["responses"]))[:300])

        message = out["error"] or ""
        if out["timeout"]:
            fail("timeout", f"no answer after {BAD_REQUEST_TIMEOUT_S:.0f}s")
        elif out["error"] is None:
            fail("status_bad_input", f"bad input accepted: {len(out['responses'])} responses, no error")
        else:
            if is_unclean(message):
                fail("clean_errors", "traceback or file path in the error")
            if case.param is not None and case.param not in message:
                fail("names_field", f"error does not name {case.param!r}")
        status = "grpc-error" if out["error"] else ("timeout" if out["timeout"] else "grpc-ok")
        st.bad_case(case.name, "grpc", status, "grpc", (message or str(out["responses"]))[:240], failed)


def _close_grpc(client: Any, cancel: bool) -> None:
    """stop_stream can wait for the server forever; never let it block a client thread long."""
    def close() -> None:
        try:
            client.stop_stream(cancel_requests=cancel)
        except Exception:  # noqa: BLE001
            pass
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=close, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive() and not cancel:
        threading.Thread(target=lambda: client.stop_stream(cancel_requests=True), daemon=True).start()


# ============================================================================ a phase
@dataclass
class PhaseResult:
    target: str
    phase: str
    summary: dict[str, Any]

    @property
    def failed_checks(self) -> list[str]:
        return [c for c, v in self.summary["checks"].items() if not v["passed"]]


def wait_idle(server: Any, timeout: float) -> tuple[bool, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            state = server.engine_state()
        except Exception as e:  # noqa: BLE001
            state = {"error": f"{type(e).__name__}: {e}"}
        keys = ("kv_usage", "running", "waiting", "running_seqs", "waiting_seqs", "swapped_seqs")
        if "error" not in state and state.get("kv_usage") is not None and all(
                (state.get(k) or 0) == 0 for k in keys if k in state) and state.get("running") is not None:
            return True, state
        time.sleep(0.5)
    return False, state


def run_phase(target: Target, phase: str, seconds: float, budget: int, clients: int, workdir: Path, seed: int,
              sweep: bool, log_dir: Path | None) -> PhaseResult:
    st = Stats()
    engine = PHASE_CONFIG[phase]
    st.info["engine"] = dict(engine)
    st.info["clients"] = clients
    print(f"[{target.name}/{phase}] starting server ({engine}) ...", flush=True)
    server = target.make_server(workdir, engine)
    try:
        t0 = time.monotonic()
        try:
            server.start()
        except Exception as e:  # noqa: BLE001 - reported as a failed check; the phase ends here
            st.fail("server_start", phase, str(e)[-1500:])
            return PhaseResult(target.name, phase, st.summary())
        st.info["start_s"] = round(time.monotonic() - t0, 1)
        # Warm-up: one of each route, so one-time allocations are not counted as growth.
        warm = Stats()
        rng = random.Random(seed)
        for spec in [s for s in target.specs if not s.long][:6]:
            target.good(warm, rng, spec, False)
            if any(warm.failures.values()):  # a broken server: do not spend the warm-up's timeouts
                break
        st.info["warmup_failures"] = {c: n for c, n in warm.failures.items() if n}
        st.info["rss_before_mib"] = round(server.rss_mib(), 1)
        try:
            st.info["state_before"] = server.engine_state()
        except Exception as e:  # noqa: BLE001
            st.info["state_before"] = {"error": str(e)}

        cases = target.bad_cases()
        st.info["bad_cases_total"] = len(cases)
        shared = {"sent": 0, "next_case": 0}
        lock = threading.Lock()
        order = list(range(len(cases)))
        random.Random(seed).shuffle(order)
        deadline = time.monotonic() + seconds
        long_specs = [s for s in target.specs if s.long]

        def take() -> bool:
            with lock:
                if shared["sent"] >= budget:
                    return False
                shared["sent"] += 1
                return True

        def next_case() -> Any:
            with lock:
                i = shared["next_case"]
                shared["next_case"] += 1
            return cases[order[i % len(order)]]

        def client(idx: int) -> None:
            crng = random.Random(seed * 1000 + idx)
            try:
                if sweep and idx == 0:  # every bad case once, under load
                    for i in order:
                        if time.monotonic() > deadline + 60:
                            break
                        target.run_bad(st, cases[i])
                while time.monotonic() < deadline and take():
                    x = crng.random()
                    if x < BAD_FRACTION:
                        target.run_bad(st, next_case())
                    elif x < BAD_FRACTION + DISCONNECT_FRACTION:
                        target.good(st, crng, crng.choice(long_specs), True)
                    else:
                        target.good(st, crng, crng.choice(target.specs), False)
                    if not server.alive():
                        break
            except Exception as e:  # noqa: BLE001 - a bug here must not hide as a pass
                st.fail("protocol", f"client {idx}", f"client crashed: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"soak-client-{i}")
                   for i in range(clients)]
        load_start = time.monotonic()
        for t in threads:
            t.start()
        join_deadline = deadline + 60 + REQUEST_TIMEOUT_S + SOCKET_TIMEOUT_S
        for t in threads:
            t.join(max(0.1, join_deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            st.fail("timeout", "load", f"client threads still blocked after the load: {stuck}")
        st.info["load_s"] = round(time.monotonic() - load_start, 1)
        if not server.alive():
            st.fail("server_alive", phase, f"server process exited during the load (code {server.proc.returncode})")

        idle, state = wait_idle(server, IDLE_TIMEOUT_S)
        st.info["state_after"] = state
        st.info["leaked_blocks"] = state.get("leaked_blocks")
        if not idle:
            st.fail("kv_idle", phase, f"not idle {IDLE_TIMEOUT_S:.0f}s after the load: {state}")
        if engine["num_kv_blocks"] == SMALL_POOL_BLOCKS and not (state.get("preemptions") or 0) > 0:
            st.fail("kv_exhaustion_reached", phase, f"no preemption in a {SMALL_POOL_BLOCKS}-block pool: {state}")
        if engine["preemption_mode"] == "swap" and "swap_outs" in state and not state["swap_outs"] > 0:
            st.fail("kv_exhaustion_reached", phase, f"swap mode but no block swapped out: {state}")
        rss_after = server.rss_mib()
        st.info["rss_after_mib"] = round(rss_after, 1)
        limit = max(RSS_GROWTH_LIMIT_MIB, RSS_GROWTH_LIMIT_FRACTION * st.info["rss_before_mib"])
        st.info["rss_growth_limit_mib"] = round(limit, 1)
        if rss_after - st.info["rss_before_mib"] > limit:
            st.fail("rss_bounded", phase, f"RSS grew {rss_after - st.info['rss_before_mib']:.0f} MiB "
                                          f"({st.info['rss_before_mib']:.0f} -> {rss_after:.0f}), limit {limit:.0f}")
        if server.alive():
            target.fresh(st)
        else:
            st.fail("fresh_request", phase, "server is not running")
        # SIGTERM with one stream in flight.
        inflight: dict[str, Any] = {}
        stream_fn = target.inflight_stream()
        thread = threading.Thread(target=lambda: inflight.setdefault("r", stream_fn()), daemon=True)
        thread.start()
        time.sleep(1.0)
        shutdown_s, left = server.terminate(SHUTDOWN_LIMIT_S)
        st.info["shutdown_s"] = None if shutdown_s is None else round(shutdown_s, 2)
        if shutdown_s is None:
            st.fail("shutdown_time", phase, f"still running {SHUTDOWN_LIMIT_S:.0f}s after SIGTERM (killed)")
        thread.join(15)
        r = inflight.get("r")
        st.info["inflight_at_sigterm"] = ("still open 15 s after shutdown" if thread.is_alive() else
                                          f"{len(r.lines)} lines, eof={r.eof}, error={r.error}" if r else "none")
        if thread.is_alive():
            st.fail("shutdown_time", phase, "the in-flight stream was still open 15 s after the server stopped")
        if left:
            st.fail("no_process_left", phase, f"left after SIGTERM (killed): {left}")
        open_ports = server.open_ports()
        if open_ports:
            st.fail("no_process_left", phase, f"ports still accepting connections: {open_ports}")
        if isinstance(server, PyTritonProcess):
            ws = server.workspace
            if ws is not None and ws.exists():
                st.fail("workspace_removed", phase, f"workspace {ws} left after SIGTERM")
        log_tail = server.log_path.read_text(errors="replace")[-4000:]
        st.info["serve_log_tail"] = log_tail[-1500:]
        if is_unclean(log_tail) and "Traceback" in log_tail:
            st.info["serve_log_has_traceback"] = True
    finally:
        server.kill_all()
        result = PhaseResult(target.name, phase, st.summary())
        if log_dir is not None and result.failed_checks:
            keep_logs(server, log_dir / f"{target.name}-{phase}")
    return result


def keep_logs(server: Any, dest: Path, limit: int = 4 << 20) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for f in server.log_files():
            if f.is_file():
                data = f.read_bytes()[-limit:]
                (dest / f.name).write_bytes(data)
    except OSError:
        pass


# ============================================================================ report
def _fmt_status(d: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in d.items()) or "-"


def print_table(target: str, results: list[PhaseResult]) -> None:
    print(f"\n== {target}")
    print("| phase | requests | completed (per s) | aborted | bad input by status | mismatches | leaked blocks | "
          "RSS before/after MiB | shutdown s | failed checks |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        s = r.summary
        c = s["counters"]
        mism = s["checks"]["mismatch"]["failures"] + s["checks"]["prefix_mismatch"]["failures"]
        rate = f" ({c.get('completed', 0) / s['load_s']:.1f})" if s.get("load_s") else ""
        print(f"| {r.phase} | {c.get('requests', 0)} | {c.get('completed', 0)}{rate} | {c.get('aborted', 0)} | "
              f"{_fmt_status(s['bad_input_by_status'])} | {mism} | {s.get('leaked_blocks')} | "
              f"{s.get('rss_before_mib')} / {s.get('rss_after_mib')} | {s.get('shutdown_s')} | "
              f"{', '.join(r.failed_checks) or 'none'} |")


def print_failures(results: list[PhaseResult]) -> None:
    for r in results:
        if not r.failed_checks:
            continue
        print(f"\n-- {r.target}/{r.phase}: failed checks")
        for check in r.failed_checks:
            v = r.summary["checks"][check]
            print(f"  {check}: {v['failures']} failure(s)")
            for ex in v["examples"][:4]:
                bits = [ex.get("case", "")]
                if ex.get("status") is not None or "content_type" in ex:
                    bits.append(f"status={ex.get('status')} ctype={ex.get('content_type')!r}")
                if ex.get("detail"):
                    bits.append(ex["detail"][:200])
                if ex.get("excerpt"):
                    bits.append(f"body={ex['excerpt'][:200]!r}")
                print("    - " + " | ".join(bits))
        bad = {k: v for k, v in r.summary["bad_cases"].items() if v["failed"]}
        if bad:
            print(f"  bad-input cases failing ({len(bad)} of {len(r.summary['bad_cases'])}):")
            for name, v in bad.items():
                ex = v["example"]
                print(f"    - {name}: {', '.join(v['failed_checks'])} | status={ex['status']} "
                      f"ctype={ex['content_type']!r} | {ex['excerpt'][:160]!r}")


# ============================================================================ main
TARGETS = {"torchserve": TorchServeTarget, "pytriton": PyTritonTarget}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--short", action="store_true", help="~1 minute per adapter, 12 clients (default)")
    g.add_argument("--long", action="store_true", help="~5 minutes per adapter, 48 clients")
    p.add_argument("--targets", default="torchserve,pytriton")
    p.add_argument("--phases", default=None, help="e.g. recompute:20,swap:10 (phase:seconds; default: the mode's)")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny llama built here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT / "soak.json")
    p.add_argument("--logs", type=Path, default=OUT / "soak-logs", help="server logs of failing phases go here")
    args = p.parse_args(argv)
    mode = "long" if args.long else "short"
    cfg = MODES[mode]
    clients = args.clients or cfg["clients"]
    phases = cfg["phases"]
    if args.phases:
        budget = {name: b for name, _, b in MODES["long"]["phases"]}
        phases = [(name, float(sec), budget.get(name, 20000))
                  for name, sec in (item.split(":") for item in args.phases.split(","))]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {', '.join(TARGETS)}")

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp" if os.path.isdir("/tmp") else None))
    live: list[Any] = []
    results: list[PhaseResult] = []
    report: dict[str, Any] = {"mode": mode, "clients": clients, "phases": [list(x) for x in phases],
                              "targets": {}, "bounds": {
                                  "request_timeout_s": REQUEST_TIMEOUT_S, "bad_request_timeout_s": BAD_REQUEST_TIMEOUT_S,
                                  "idle_timeout_s": IDLE_TIMEOUT_S, "shutdown_limit_s": SHUTDOWN_LIMIT_S,
                                  "rss_growth_limit_mib": RSS_GROWTH_LIMIT_MIB,
                                  "rss_growth_limit_fraction": RSS_GROWTH_LIMIT_FRACTION,
                                  "bad_fraction": BAD_FRACTION, "disconnect_fraction": DISCONNECT_FRACTION}}

    def write_report(aborted: str | None = None) -> None:
        report["elapsed_s"] = round(time.time() - started, 1)
        report["passed"] = bool(results) and all(not r.failed_checks for r in results) and aborted is None
        report["failed_checks"] = [f"{r.target}/{r.phase}/{c}" for r in results for c in r.failed_checks]
        if aborted:
            report["aborted"] = aborted
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))

    def watchdog_fire() -> None:
        print(f"soak: watchdog: over {limit_s:.0f}s; killing servers and exiting", flush=True)
        for target in live:
            if target.server is not None:
                target.server.kill_all()
        write_report(aborted=f"watchdog after {limit_s:.0f}s")
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(3)

    limit_s = cfg["watchdog"] * len(targets) + 120
    watchdog = threading.Timer(limit_s, watchdog_fire)
    watchdog.daemon = True
    watchdog.start()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        model = args.model
        if model is None:
            print("building the tiny model ...", flush=True)
            model = build_model(tmp / "model")
        model = Path(model).resolve()
        specs = make_catalog(args.seed)
        t0 = time.monotonic()
        refs = compute_references(model, specs)
        print(f"offline references for {len(specs)} requests in {time.monotonic() - t0:.1f}s", flush=True)
        huge = ("lorem ipsum " * (HUGE_PROMPT_CHARS // 12 + 1))[:HUGE_PROMPT_CHARS]
        for name in targets:
            target = TARGETS[name](model, refs, specs, huge)
            live.append(target)
            per: list[PhaseResult] = []
            for i, (phase, seconds, budget) in enumerate(phases):
                res = run_phase(target, phase, seconds, budget, clients, tmp / f"{name[:2]}{i}", args.seed + i,
                                sweep=(i == 0), log_dir=args.logs)
                per.append(res)
                results.append(res)
                print(f"[{name}/{phase}] done: {res.summary['counters']}; failed checks: "
                      f"{', '.join(res.failed_checks) or 'none'}", flush=True)
            report["targets"][name] = {r.phase: r.summary for r in per}
            report["targets"][name]["passed"] = all(not r.failed_checks for r in per)
            write_report()
    except KeyboardInterrupt as e:
        write_report(aborted=f"interrupted ({e})")
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. the model or the references could not be built
        import traceback

        traceback.print_exc()
        write_report(aborted=f"failed: {type(e).__name__}: {e}")
        return 2
    finally:
        watchdog.cancel()
        for target in live:
            if target.server is not None:
                target.server.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)

    for name in targets:
        print_table(name, [r for r in results if r.target == name])
    print_failures(results)
    write_report()
    print(f"\nwrote {args.out}; {'every check passed' if report['passed'] else 'FAILED: ' + ', '.join(report['failed_checks'])}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
