"""Plain-HTTP helpers for tests against real servers (TorchServe, Triton), standard library only,
and a way to start the `pagedbackend serve` command and wait for its ready banner."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any


def post(port: int, path: str, body: Any = None, raw: str | None = None, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, str, str]:
    """(status, content type, body text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def stream(port: int, path: str, body: Any, headers: dict | None = None, timeout: float = 120):
    """Yield the response's lines as they arrive (the connection closes when the caller stops)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        while True:
            line = resp.readline()
            if not line:
                return
            yield line.decode()
    finally:
        conn.close()


def ndjson_text(lines: list[str]) -> tuple[str, list[int], dict]:
    """Concatenated text and token ids of a native stream, and its last chunk."""
    chunks = [json.loads(line) for line in lines if line.strip()]
    return "".join(c["text"] for c in chunks), [t for c in chunks for t in c["token_ids"]], chunks[-1]


def sse_events(lines: list[str]) -> list[Any]:
    return [line[len("data: "):].strip() for line in lines if line.startswith("data: ")]


def metrics(metrics_url: str) -> dict[str, float]:
    """Prometheus samples by metric name (histograms as name_count / name_sum)."""
    text = urllib.request.urlopen(metrics_url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})? ([-+0-9.eEinfNa]+)$", line)
        if m and "_bucket" not in m.group(1):
            out[m.group(1)] = float(m.group(3))
    return out


def wait_for_metrics(metrics_url: str, predicate, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        last = metrics(metrics_url)
        if predicate(last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"metrics never satisfied the condition; last: {last}")


def start_serve_command(*args: str, stderr: int = subprocess.STDOUT) -> tuple[subprocess.Popen, str]:
    """`pagedbackend serve ARGS` in a subprocess, and its output up to the "Ctrl-C to stop" line
    that says the server is ready (or up to its exit, when it fails)."""
    proc = subprocess.Popen([sys.executable, "-m", "pagedbackend.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C to stop" in line:
            break
    return proc, "".join(lines)
