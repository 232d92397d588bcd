"""SIGTERM / SIGINT against `pagedbackend serve pytriton` and `pagedbackend serve torchserve`
while streams are in flight and the KV pool is full: the command must exit within a stated
bound, leave no process of its tree behind (tritonserver, triton_python_backend_stub and its
helpers; the Java frontend and the Python workers), no shared-memory segment its tree created
and no temporary directory; a second signal forces exit at once.

Every server here binds 127.0.0.1 on free ports and is killed (its whole process group) if a
test fails half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pagedbackend.adapters.ports import free_port
from http_client import stream

pytestmark = pytest.mark.slow

# The bounds this project states (see PyTritonServer.stop and TorchServe.stop); the tests
# allow a little more for a loaded 2-core machine.
PYTRITON_STOP_BOUND_S = 28.0  # PyTritonServer.stop_bound_s (25 s) + interpreter exit
TORCHSERVE_STOP_BOUND_S = 20.0
FORCED_EXIT_BOUND_S = 5.0
# 40 blocks of 16 tokens: 640 tokens of KV for 16 streams of up to 480 tokens each.
SMALL_POOL = ("--num-kv-blocks", "40", "--max-model-len", "512", "--preemption-mode", "swap", "--swap-space", "0.05")


# ------------------------------------------------------------------ process tree helpers
def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """pid -> start time of `root` and all its descendants (by walking /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry))
                starts[int(entry)] = st[3]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo += children.get(pid, [])
    return tree


def alive(tree: dict[int, int]) -> list[str]:
    """The processes of `tree` still running (zombies count as gone), with their command lines."""
    left = []
    for pid, start in tree.items():
        st = _stat(pid)
        if st is not None and st[3] == start and st[0] != "Z":
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            left.append(f"{pid}: {cmd[:160]}")
    return left


def cmdlines(tree: dict[int, int]) -> list[str]:
    out = []
    for pid in tree:
        with contextlib.suppress(OSError):
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return out


def shm_segments(tree: dict[int, int], exclude: int | None = None) -> set[str]:
    """Names under /dev/shm that processes of `tree` (but `exclude`) have mapped or open."""
    names: set[str] = set()
    for pid in tree:
        if pid == exclude:
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line and not line.endswith("(deleted)"):
                    names.add(line.split("/dev/shm/", 1)[1].split()[0])
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/") and not target.endswith("(deleted)"):
                        names.add(target[len("/dev/shm/"):])
    return names


def temp_dirs_of_triton(tree: dict[int, int]) -> set[Path]:
    """Directories Triton made in /tmp for this server: the model repository it writes for a
    model loaded through its repository API (`/tmp/folderXXXXXX`, in the stub's command line)."""
    found = set()
    for cmd in cmdlines(tree):
        for m in re.finditer(r"(/tmp/folder[A-Za-z0-9]{6})/", cmd):
            found.add(Path(m.group(1)))
    return found


def stop_tree_for_good(proc: subprocess.Popen, tree: dict[int, int]) -> None:
    """Test hygiene after a failure: kill whatever of the server is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, start in tree.items():
        st = _stat(pid)
        if st is not None and st[3] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# --------------------------------------------------------------------- server helpers
class ServeCommand:
    """`pagedbackend serve ...` as a subprocess in its own session, output to a file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log_path = tmp_path / "serve.out"
        self._log = open(self.log_path, "wb")
        exe = Path(sys.executable).with_name("pagedbackend")
        self.proc = subprocess.Popen([str(exe), "serve", *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.tree: dict[int, int] = {}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if "Ctrl-C to stop" in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"serve not ready after {timeout}s:\n{self.output()[-4000:]}")

    def signal_and_time(self, sig: int = signal.SIGTERM, timeout: float = 60) -> float:
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - start
        print(f"{signal.Signals(sig).name}: exited with {self.proc.returncode} after {elapsed:.1f}s")
        return elapsed

    def close(self) -> None:
        stop_tree_for_good(self.proc, self.tree)
        self._log.close()


def wait_metrics(url: str, predicate, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            last = {}
            for line in text.splitlines():
                m = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})? ([-+0-9.eEinfNa]+)$", line)
                if m:
                    last[m.group(1)] = float(m.group(3))
            if predicate(last):
                return last
        time.sleep(0.2)
    raise AssertionError(f"metrics never satisfied the condition; last: {last}")


class Streams:
    """N streaming clients in threads; each records its events (lines) and how it ended."""

    def __init__(self, n: int, port: int, path: str, body_of, headers=None) -> None:
        self.events: list[list[str]] = [[] for _ in range(n)]
        self.ended: list[str | None] = [None] * n
        self.threads = [threading.Thread(target=self._run, args=(i, port, path, body_of(i), headers), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i, port, path, body, headers) -> None:
        try:
            for line in stream(port, path, body, headers=headers, timeout=90):
                if line.strip():
                    self.events[i].append(line)
            self.ended[i] = "eof"
        except BaseException as e:  # noqa: BLE001 - a connection the server closes is a fine end
            self.ended[i] = f"{type(e).__name__}: {e}"

    def started(self) -> int:
        return sum(1 for e in self.events if e)

    def join(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [i for i, t in enumerate(self.threads) if t.is_alive()]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------- PyTriton
def start_pytriton(tmp_path: Path, model: Path, *extra: str) -> tuple[ServeCommand, list[int], str]:
    pytest.importorskip("pytriton")
    ports = [free_port() for _ in range(4)]
    cmd = ServeCommand(tmp_path, "pytriton", "--model", str(model), "--name", "llm",
                       "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                       "--engine-metrics-port", str(ports[3]), *extra)
    try:
        text = cmd.wait_ready()
    except BaseException:
        cmd.close()
        raise
    return cmd, ports, text


def sse_body(i: int, max_tokens: int = 480) -> dict:
    return {"text_input": f"client {i} asks for a long story", "stream": True, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True})}


def load_pytriton(cmd: ServeCommand, ports: list[int], n: int = 16) -> Streams:
    """16 long streams: with 40 KV blocks of 16 tokens the pool fills and requests are preempted."""
    streams = Streams(n, ports[0], "/v2/models/llm/generate_stream", sse_body)
    metrics_url = f"http://127.0.0.1:{ports[3]}/metrics"
    wait_metrics(metrics_url, lambda m: m.get("pagedbackend_kv_cache_usage_ratio", 0) >= 0.9
                 and m.get("pagedbackend_num_requests_waiting", 0) + m.get("pagedbackend_preemptions_total", 0) > 0)
    wait_until(lambda: streams.started() >= 4, 60, "streams in flight")
    return streams


def record(cmd: ServeCommand) -> tuple[dict[int, int], set[str], set[Path]]:
    cmd.tree = process_tree(cmd.proc.pid)
    return cmd.tree, shm_segments(cmd.tree), temp_dirs_of_triton(cmd.tree)


def assert_nothing_left(cmd: ServeCommand, tree, shm, tmp_dirs) -> None:
    left = alive(tree)
    assert not left, f"processes left after the serve command exited: {left}\n{cmd.output()[-3000:]}"
    assert not [n for n in shm if (Path("/dev/shm") / n).exists()], f"shared memory left: {shm}"
    assert not [d for d in tmp_dirs if d.exists()], f"temporary directories left: {tmp_dirs}"


def assert_streams_ended_cleanly(streams: Streams) -> None:
    finals = []
    for events, ended in zip(streams.events, streams.ended):
        last = json.loads(events[-1][len("data: "):]) if events and events[-1].startswith("data: ") else {}
        finals.append((last.get("finish_reason"), ended))
    assert all(reason in ("abort", "length") and ended == "eof" for reason, ended in finals), finals
    assert any(reason == "abort" for reason, _ in finals), finals


def test_sigterm_stops_pytriton_under_load_with_a_full_kv_pool(model_dir, tmp_path):
    cmd, ports, text = start_pytriton(tmp_path, model_dir("llama"), *SMALL_POOL)
    try:
        workspace = Path(re.search(r"workspace\s+(\S+)", text).group(1))
        streams = load_pytriton(cmd, ports)
        tree, shm, tmp_dirs = record(cmd)
        tmp_dirs.add(workspace)
        names = " ".join(cmdlines(tree))
        assert "tritonserver" in names and "triton_python_backend_stub" in names, names
        assert shm, "the server's tree maps no shared memory: the check would prove nothing"

        elapsed = cmd.signal_and_time(signal.SIGTERM)
        assert cmd.proc.returncode == 0, (cmd.proc.returncode, elapsed, cmd.output()[-3000:])
        assert elapsed < PYTRITON_STOP_BOUND_S, (elapsed, cmd.output()[-3000:])
        assert_nothing_left(cmd, tree, shm, tmp_dirs)
        # Every client got a clean end: a final event, finish_reason "abort" (or "length").
        assert streams.join(15) == []
        assert_streams_ended_cleanly(streams)
        out = cmd.output()
        assert "stopping Triton" in out and "Traceback" not in out.split("stopping Triton", 1)[1], out[-3000:]
    finally:
        cmd.close()


def test_sigint_stops_pytriton_with_streams_in_flight(model_dir, tmp_path):
    cmd, ports, text = start_pytriton(tmp_path, model_dir("llama"))
    try:
        workspace = Path(re.search(r"workspace\s+(\S+)", text).group(1))
        streams = Streams(8, ports[0], "/v2/models/llm/generate_stream", lambda i: sse_body(i, 900))
        wait_until(lambda: streams.started() == 8, 60, "8 streams in flight")
        tree, shm, tmp_dirs = record(cmd)
        tmp_dirs.add(workspace)
        elapsed = cmd.signal_and_time(signal.SIGINT)
        assert cmd.proc.returncode == 0 and elapsed < PYTRITON_STOP_BOUND_S, (cmd.proc.returncode, elapsed,
                                                                               cmd.output()[-3000:])
        assert_nothing_left(cmd, tree, shm, tmp_dirs)
        assert streams.join(15) == []
        assert_streams_ended_cleanly(streams)
    finally:
        cmd.close()


def test_sigterm_while_pytriton_starts_stops_it_cleanly(model_dir, tmp_path):
    pytest.importorskip("pytriton")
    ports = [free_port() for _ in range(4)]
    cmd = ServeCommand(tmp_path, "pytriton", "--model", str(model_dir("llama")), "--name", "llm",
                       "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                       "--engine-metrics-port", str(ports[3]))
    try:
        wait_until(lambda: "tritonserver" in " ".join(cmdlines(process_tree(cmd.proc.pid))), 120, "tritonserver")
        tree, shm, tmp_dirs = record(cmd)  # Triton is starting and loading the model
        workspaces = {Path(m.group(1)) for c in cmdlines(tree) for m in [re.search(r"(/tmp/pagedbackend-pytriton-\w+)/", c)] if m}
        assert workspaces, cmdlines(tree)
        elapsed = cmd.signal_and_time(signal.SIGTERM)
        # On an idle machine the start can win the race to the signal: then it is an ordinary
        # stop (exit 0); interrupted during start, the command fails (exit 1). Clean either way.
        ready = "Ctrl-C to stop" in cmd.output()
        assert cmd.proc.returncode == (0 if ready else 1) and elapsed < PYTRITON_STOP_BOUND_S, (
            cmd.proc.returncode, elapsed, cmd.output()[-3000:])
        assert_nothing_left(cmd, process_tree_after(tree), shm, tmp_dirs | workspaces)
    finally:
        cmd.close()


def process_tree_after(tree: dict[int, int]) -> dict[int, int]:
    """`tree` plus what was started below its processes since it was recorded."""
    out = dict(tree)
    for pid in tree:
        if alive({pid: tree[pid]}):
            out.update(process_tree(pid))
    return out


def test_second_sigterm_forces_pytriton_to_exit_at_once(model_dir, tmp_path):
    cmd, ports, text = start_pytriton(tmp_path, model_dir("llama"), *SMALL_POOL)
    try:
        workspace = Path(re.search(r"workspace\s+(\S+)", text).group(1))
        streams = load_pytriton(cmd, ports)
        tree, shm, tmp_dirs = record(cmd)
        tmp_dirs.add(workspace)
        cmd.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping Triton" in cmd.output(), 10, "the graceful stop to begin")
        time.sleep(0.3)
        elapsed = cmd.signal_and_time(signal.SIGTERM, timeout=60)
        assert cmd.proc.returncode is not None and elapsed < FORCED_EXIT_BOUND_S, (elapsed, cmd.output()[-3000:])
        assert cmd.proc.returncode == 128 + signal.SIGTERM, cmd.proc.returncode
        assert "forcing exit" in cmd.output()
        assert_nothing_left(cmd, tree, shm, tmp_dirs)
        assert streams.join(15) == []
    finally:
        cmd.close()


# -------------------------------------------------------------------------- TorchServe
def torchserve_config(tmp_path: Path, num_kv_blocks: int = 40) -> Path:
    from pagedbackend.adapters.torchserve.launcher import load_model_config

    cfg = load_model_config()
    cfg["handler"].update(num_kv_blocks=num_kv_blocks, max_model_len=512, max_num_seqs=32)
    path = tmp_path / "model-config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def start_torchserve(tmp_path: Path, model: Path, *extra: str) -> tuple[ServeCommand, list[int], Path]:
    ports = [free_port() for _ in range(3)]
    cmd = ServeCommand(tmp_path, "torchserve", "--model", str(model), "--name", "tiny", "--disable-token-auth",
                       "--port", str(ports[0]), "--management-port", str(ports[1]), "--metrics-port", str(ports[2]),
                       *extra)
    try:
        text = cmd.wait_ready()
    except BaseException:
        cmd.close()
        raise
    workdir = Path(re.search(r"starting TorchServe in (\S+) \.\.\.", text).group(1))
    return cmd, ports, workdir


def ts_body(i: int, max_tokens: int = 480) -> dict:
    return {"prompt": f"client {i} asks for a long story", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}


def java_perf_files(tree: dict[int, int]) -> set[Path]:
    """The JVM's /tmp/hsperfdata_<user>/<pid> file of the frontend (removed when the JVM exits
    normally, left behind by a SIGKILL)."""
    found = set()
    for pid in tree:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/exe").resolve().name == "java":
                found |= set(Path("/tmp").glob(f"hsperfdata_*/{pid}"))
    return found


@pytest.mark.parametrize("full_pool", [False, True], ids=["streams-in-flight", "full-kv-pool"])
def test_sigterm_stops_torchserve_with_streams_in_flight(model_dir, tmp_path, full_pool):
    extra = ("--config", str(torchserve_config(tmp_path))) if full_pool else ()
    cmd, ports, workdir = start_torchserve(tmp_path, model_dir("llama"), *extra)
    try:
        assert workdir.is_dir() and workdir.name.startswith("pagedbackend-torchserve-")
        streams = Streams(16 if full_pool else 6, ports[0], "/predictions/tiny", ts_body)
        wait_until(lambda: streams.started() >= (4 if full_pool else 6), 60, "streams in flight")
        if full_pool:
            wait_metrics(f"http://127.0.0.1:{ports[2]}/metrics",
                         lambda m: m.get("KVCacheUsagePercent", 0) >= 90 and m.get("WaitingRequests", 0) > 0)
        tree = cmd.tree = process_tree(cmd.proc.pid)
        names = " ".join(cmdlines(tree))
        assert "java" in names and "model_service_worker" in names, names
        shm = shm_segments(tree)
        perf = java_perf_files(tree)
        elapsed = cmd.signal_and_time(signal.SIGTERM)
        assert cmd.proc.returncode == 0, (cmd.proc.returncode, elapsed, cmd.output()[-3000:])
        assert elapsed < TORCHSERVE_STOP_BOUND_S, (elapsed, cmd.output()[-3000:])
        assert_nothing_left(cmd, tree, shm, {workdir, *perf})
        assert streams.join(15) == []
    finally:
        cmd.close()


def test_second_sigterm_forces_torchserve_to_exit_at_once(model_dir, tmp_path):
    cmd, ports, workdir = start_torchserve(tmp_path, model_dir("llama"), "--config", str(torchserve_config(tmp_path)))
    try:
        streams = Streams(16, ports[0], "/predictions/tiny", ts_body)
        wait_until(lambda: streams.started() >= 4, 60, "streams in flight")
        tree = cmd.tree = process_tree(cmd.proc.pid)
        perf = java_perf_files(tree)
        cmd.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping TorchServe" in cmd.output(), 10, "the graceful stop to begin")
        time.sleep(0.2)
        elapsed = cmd.signal_and_time(signal.SIGTERM, timeout=60)
        assert cmd.proc.returncode is not None and elapsed < FORCED_EXIT_BOUND_S, (elapsed, cmd.output()[-3000:])
        assert cmd.proc.returncode == 128 + signal.SIGTERM and "forcing exit" in cmd.output()
        assert_nothing_left(cmd, tree, set(), {workdir, *perf})
        assert streams.join(15) == []
    finally:
        cmd.close()
