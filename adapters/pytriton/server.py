"""A PyTriton server for a pagedbackend engine, as `pagedbackend serve pytriton` runs it.

Takes care of what bit us when running PyTriton here: the Python-backend helper must load the
running interpreter's libpython (`prefer_running_libpython`), every address is bound to the
configured host (127.0.0.1 by default, not PyTriton's 0.0.0.0), the workspace lives in a fresh
temporary directory that is removed on stop, and engine metrics are served in Prometheus text
format on their own port beside Triton's.

Stopping (`PyTritonServer.stop`) is bounded and leaves nothing behind. PyTriton's own
`Triton.stop()` stops Triton first; with requests still waiting on the engine, Triton's Python
backend stub waits for their answers, Triton gives up after its exit timeout (30 s by
default), exits with the stub still alive and PyTriton then blocks for good joining its
request connector. So the order here is: stop admitting requests, give the running ones
`drain_timeout` seconds, abort the rest in the engine (every stream ends with a final
response, finish_reason "abort") and wait for those answers to reach Triton; then stop Triton
(SIGINT, `triton_exit_timeout` for in-flight work, SIGKILL of its whole process tree after
`triton_stop_timeout`), then the engine. Whatever is left of Triton's process tree
(tritonserver, triton_python_backend_stub and the stub's helper processes), the shared memory
those processes had mapped, the model repository Triton wrote in /tmp (`/tmp/folderXXXXXX`),
the Python backend's `/tmp/python_env_XXXXXX` and the workspace are then removed. `kill()` does
only that last part, at once (for a second Ctrl-C).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import signal
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pagedbackend import AsyncLLMEngine, EngineArgs
from pagedbackend.adapters.ports import free_port
from pagedbackend.adapters.pytriton.repository import ServedModel
from pagedbackend.prometheus import render_many

logger = logging.getLogger(__name__)


def prefer_running_libpython() -> None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH for the Triton processes we
    start. Without it the Python-backend stub can load another libpython3.x (e.g. the
    distribution's) and the model fails to load with `'_thread.RLock' object has no attribute
    '_recursion_count'`."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or not (Path(libdir) / library).exists():
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if not paths or paths[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in paths if p != libdir]])


class MetricsServer:
    """GET /metrics: the engines' stats in Prometheus text format."""

    def __init__(self, host: str, port: int, engines: dict[str, AsyncLLMEngine],
                 versions: dict[str, int] | None = None) -> None:
        engines_ref, versions_ref = engines, versions or {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                # Labels as Triton's vLLM backend sets them: the model and its version.
                body = render_many([(e.get_stats(), {"model": name, "version": str(versions_ref.get(name, 1))})
                                    for name, e in engines_ref.items()]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # keep the server's output quiet
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="pagedbackend-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------ processes, via /proc
def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of `root` and every process below it (walking /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry))
                starts[int(entry)] = st[2]
    tree: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in tree:
            tree[pid] = starts[pid]
            todo += children.get(pid, [])
    return tree


def _running(pid: int, start: int) -> bool:
    """The same process (not a reused pid) and not a zombie."""
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[0] != "Z"


def _kill_all(tree: dict[int, int], sig: int = signal.SIGKILL) -> None:
    for pid, start in tree.items():
        if pid != os.getpid() and _running(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _shm_names(pids) -> set[str]:
    """Names in /dev/shm these processes have mapped or open."""
    names: set[str] = set()
    for pid in pids:
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
    return {n for n in names if n and "/" not in n}


def _forget_shared_memory(names: set[str]) -> None:
    """Tell this process's multiprocessing resource tracker (PyTriton's tensor store attaches
    the stub's segments, which registers them) that these segments are gone, as PyTriton's own
    clean-up does, so that it does not try to remove them again, with a warning, at exit."""
    try:
        from multiprocessing import resource_tracker

        if getattr(resource_tracker._resource_tracker, "_fd", None) is None:
            return
        for name in names:
            resource_tracker.register("/" + name, "shared_memory")
            resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - only a warning at exit is at stake
        logger.debug("could not update the resource tracker", exc_info=True)


_TRITON_TMP_MODEL_DIR = re.compile(r"^(/tmp/folder[A-Za-z0-9]{6})/")


@dataclass
class PyTritonServer:
    """Triton + bound pagedbackend models (one, or `models`: e.g. a Triton vLLM-backend model
    repository, `repository.read_model_repository`) + the engine-metrics endpoint; a context
    manager. `engine` / `model` are the first model's.

    `stop()` returns within `stop_bound_s` seconds (the sum of the timeouts below: 25 s by
    default; it typically takes 4-5 s when idle, and `drain_timeout` plus 4-8 s under load)."""

    engine_args: EngineArgs | None = None
    model_name: str = "pagedbackend"
    models: dict[str, ServedModel] = field(default_factory=dict)  # name -> model; instead of engine_args
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0  # Triton's own metrics
    engine_metrics_port: int = 0
    log_verbose: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)
    # Stopping: running requests may finish for `drain_timeout` s, then are aborted; their
    # streams must end within `abort_timeout` s (else the engine is shut down and their
    # coroutines cancelled, 2 s more). Triton gets `triton_exit_timeout` s to deliver the
    # responses still queued in its Python backend stub (the stub delivers more slowly than the
    # engine generates, so a backlog of a few seconds is normal under load) and unload the
    # model, and `triton_stop_timeout` s in all before its process tree is killed; PyTriton's
    # own clean-up gets `cleanup_timeout` s, the engine thread 2 s.
    drain_timeout: float = 2.0
    abort_timeout: float = 3.0
    triton_exit_timeout: int = 10
    triton_stop_timeout: float = 12.0
    cleanup_timeout: float = 3.0

    def __post_init__(self) -> None:
        for attr in ("http_port", "grpc_port", "metrics_port", "engine_metrics_port"):
            if not getattr(self, attr):
                setattr(self, attr, free_port(self.host))
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._children: dict[int, int] = {}  # Triton's process tree (pid -> start time), as last seen
        self._shm: set[str] = set()  # /dev/shm names that tree had mapped
        self._triton_tmp: set[Path] = set()  # /tmp/folderXXXXXX (Triton's copy of the model repository)
        self._python_envs: set[Path] = set()  # /tmp/python_env_XXXXXX that appeared while Triton started

    @property
    def stop_bound_s(self) -> float:
        return (self.drain_timeout + self.abort_timeout + 2.0 + 1.0 + self.triton_stop_timeout
                + self.cleanup_timeout + 2.0)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self) -> "PyTritonServer":
        prefer_running_libpython()
        from pytriton.triton import Triton, TritonConfig

        from pagedbackend.adapters.pytriton.binding import LLMModel, bind_model

        specs = dict(self.models) or {self.model_name: ServedModel(self.engine_args)}
        if any(spec.args is None for spec in specs.values()):
            raise ValueError("PyTritonServer needs engine_args or models")
        self._tmp = Path(tempfile.mkdtemp(prefix="pagedbackend-pytriton-"))
        extra = {"exit_timeout_secs": self.triton_exit_timeout, **self.extra_config}
        config = TritonConfig(http_address=self.host, http_port=self.http_port, grpc_address=self.host,
                              grpc_port=self.grpc_port, metrics_address=self.host, metrics_port=self.metrics_port,
                              log_verbose=self.log_verbose, log_file=self._tmp / "triton.log", **extra)
        self.engines: dict[str, AsyncLLMEngine] = {}
        self.bound: dict[str, LLMModel] = {}
        try:
            for name, spec in specs.items():
                self.engines[name] = AsyncLLMEngine.from_engine_args(spec.args, progress=False)
            self.engine = next(iter(self.engines.values()))
            self.triton = Triton(config=config, workspace=self._tmp / "workspace")
            with contextlib.suppress(Exception):  # PyTriton internals: the Python backend's shm names
                self._shm_prefix = self.triton._python_backend_config["shm-region-prefix-name"]
            for name, engine in self.engines.items():
                self.bound[name] = bind_model(self.triton, LLMModel(engine), name, specs[name].version)
            self.model = next(iter(self.bound.values()))
            self._envs_before = (time.time(), set(glob.glob("/tmp/python_env_*")))
            self.triton.run()
            self._python_envs = self._new_python_envs()
            self._snapshot()
            self.metrics = MetricsServer(self.host, self.engine_metrics_port, self.engines,
                                         {name: spec.version for name, spec in specs.items()}).start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def workspace(self) -> Path:
        return self._tmp

    @property
    def log_file(self) -> Path:
        return self._tmp / "triton.log"

    # ------------------------------------------------------------------ stopping
    def stop(self) -> None:
        """Stop within `stop_bound_s`: stop admitting, drain then abort the running requests,
        stop Triton (killing its tree if it does not exit), then the engine; remove what Triton
        left (processes, shared memory, temp dirs) and the workspace. Idempotent."""
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
        started = time.monotonic()
        try:
            bound = getattr(self, "bound", {})
            if bound:
                self._end_requests(bound)
            self._stop_part("metrics")
            self._stop_triton()
        finally:
            for engine in getattr(self, "engines", {}).values():
                engine.shutdown(timeout=2.0)
            self._remove_leftovers()
            logger.info("PyTriton server stopped in %.1fs", time.monotonic() - started)

    def kill(self) -> None:
        """Stop now, nothing graceful: kill Triton's process tree, remove its shared memory and
        temp dirs and the workspace. For a second Ctrl-C; the engine is left to the exiting process."""
        self._snapshot()
        _kill_all(self._children)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_running(p, s) for p, s in self._children.items()):
            time.sleep(0.02)
        self._remove_leftovers()

    def _end_requests(self, bound: dict[str, Any]) -> None:
        """Every model stops admitting; running requests get `drain_timeout` to finish (one
        deadline for all models), then are aborted; a model whose requests have not ended
        `abort_timeout` later has its engine shut down (their streams end with an error)."""
        for model in bound.values():
            model.stop_accepting()
        deadline = time.monotonic() + self.drain_timeout
        busy = {name: m for name, m in bound.items() if not m.wait_idle(max(deadline - time.monotonic(), 0.0))}
        if not busy:
            return
        for model in busy.values():
            logger.info("aborting %d running request(s)", model.abort_all())
        deadline = time.monotonic() + self.abort_timeout
        while busy and time.monotonic() < deadline:
            busy = {name: m for name, m in busy.items() if not m.wait_idle(0.25 / len(busy))}
            for model in busy.values():
                model.abort_all()  # also those submitted since
        if busy:
            logger.warning("%d request(s) did not end after the abort; shutting their engine(s) down",
                           sum(len(m.running()) for m in busy.values()))
            for name in busy:
                self.engines[name].shutdown(timeout=1.0)
            for model in busy.values():
                if not model.wait_idle(0.5):
                    model.cancel_all()
                    model.wait_idle(0.5)
        self._wait_answers_sent(1.0)

    def _wait_answers_sent(self, timeout: float) -> None:
        """Wait until PyTriton has handed every finished request's last response to Triton."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):  # PyTriton internals: only a courtesy wait
            connectors = [c for m in self.triton._model_manager.models for c in m._requests_respones_connectors]
            while any(c._responses_queues for c in connectors) and time.monotonic() < deadline:
                time.sleep(0.02)

    def _stop_part(self, name: str) -> None:
        part = getattr(self, name, None)
        if part is not None:
            setattr(self, name, None)
            try:
                part.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                logger.exception("stopping %s failed", name)

    def _tritonserver_pids(self) -> list[int]:
        """Our tritonserver process(es): children of this process running the copy of
        tritonserver in this server's workspace."""
        binary = str(getattr(self, "_tmp", "")) + "/"
        pids = []
        for pid in _descendants(os.getpid()):
            cmd = _cmdline(pid)
            if pid != os.getpid() and cmd and cmd[0].startswith(binary) and cmd[0].endswith("/tritonserver"):
                pids.append(pid)
        return pids

    def _snapshot(self) -> None:
        """Remember Triton's process tree, the shared memory it maps and the temp dirs it uses."""
        if not hasattr(self, "_tmp"):
            return
        tree: dict[int, int] = {}
        for pid in self._tritonserver_pids():
            tree.update(_descendants(pid))
        self._children.update(tree)
        self._shm |= _shm_names(tree)
        for pid in tree:
            for arg in _cmdline(pid):
                m = _TRITON_TMP_MODEL_DIR.match(arg)
                if m:
                    self._triton_tmp.add(Path(m.group(1)))

    def _new_python_envs(self) -> set[Path]:
        """The Python backend's /tmp/python_env_XXXXXX (made when Triton loads the backend, in
        /tmp whatever TMPDIR says, and removed only when Triton exits normally): the ones that
        appeared since this server started Triton."""
        if getattr(self, "_envs_before", None) is None:
            return set()
        since, before = self._envs_before
        found = set()
        for path in set(glob.glob("/tmp/python_env_*")) - before:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ctime >= since - 1:
                    found.add(Path(path))
        return found

    def _stop_triton(self) -> None:
        triton = getattr(self, "triton", None)
        if triton is None:
            return
        self.triton = None
        self._snapshot()
        # PyTriton's stop (SIGINT to tritonserver, then its own clean-up) in a thread of its own:
        # it can block for good, and it waits 30 s + 30 s for Triton.
        stopper = threading.Thread(target=self._pytriton_stop, args=(triton,), name="pytriton-stop", daemon=True)
        stopper.start()
        deadline = time.monotonic() + self.triton_stop_timeout
        while time.monotonic() < deadline and self._tritonserver_pids():
            self._snapshot()
            time.sleep(0.1)
        if self._tritonserver_pids():
            logger.warning("Triton did not exit within %.0fs; killing its processes", self.triton_stop_timeout)
            self._snapshot()
            _kill_all(self._children)
        stopper.join(self.cleanup_timeout)
        if stopper.is_alive():
            logger.warning("PyTriton's clean-up did not finish within %.0fs; leaving it", self.cleanup_timeout)

    def _pytriton_stop(self, triton: Any) -> None:
        try:
            triton.stop()
            self._pytriton_cleaned = True
        except Exception:  # noqa: BLE001 - the caller cleans up regardless
            logger.exception("PyTriton's stop failed")

    def _remove_leftovers(self) -> None:
        """Kill what is left of Triton's tree; remove its shared memory and temp dirs."""
        left = {p: s for p, s in self._children.items() if _running(p, s)}
        if left:
            logger.warning("killing %d process(es) Triton left behind: %s", len(left),
                           ", ".join(f"{p} ({os.path.basename((_cmdline(p) or ['?'])[0])})" for p in left))
            _kill_all(left)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(_running(p, s) for p, s in left.items()):
                time.sleep(0.02)
        if any(_running(p, s) for p, s in self._children.items()):
            return  # still running (not ours to kill?): leave its files alone
        names = set(self._shm)
        prefix = getattr(self, "_shm_prefix", None)
        if prefix:
            names |= {os.path.basename(p) for p in glob.glob(f"/dev/shm/{glob.escape(prefix)}*")}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (Path("/dev/shm") / name).unlink()
        if not getattr(self, "_pytriton_cleaned", False):
            _forget_shared_memory(self._shm)
        for path in self._triton_tmp:
            shutil.rmtree(path, ignore_errors=True)
        for path in self._python_envs or self._new_python_envs():  # empty ones only: rmdir, never rmtree
            with contextlib.suppress(OSError):
                path.rmdir()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> "PyTritonServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
