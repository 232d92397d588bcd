"""A PyTriton server for a pagedbackend engine, as `pagedbackend serve pytriton` runs it.

Takes care of what bit us when running PyTriton here: the Python-backend helper must load the
running interpreter's libpython (`prefer_running_libpython`), every address is bound to the
configured host (127.0.0.1 by default, not PyTriton's 0.0.0.0), the workspace lives in a fresh
temporary directory that is removed on stop, and engine metrics are served in Prometheus text
format on their own port beside Triton's.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pagedbackend import AsyncLLMEngine, EngineArgs
from pagedbackend.adapters.ports import free_port
from pagedbackend.prometheus import render


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

    def __init__(self, host: str, port: int, engines: dict[str, AsyncLLMEngine]) -> None:
        engines_ref = engines

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = "".join(render(e.get_stats(), {"model": name}) for name, e in engines_ref.items()).encode()
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


@dataclass
class PyTritonServer:
    """Triton + one bound pagedbackend model + the engine-metrics endpoint; a context manager."""

    engine_args: EngineArgs
    model_name: str = "pagedbackend"
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0  # Triton's own metrics
    engine_metrics_port: int = 0
    log_verbose: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("http_port", "grpc_port", "metrics_port", "engine_metrics_port"):
            if not getattr(self, attr):
                setattr(self, attr, free_port(self.host))

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self) -> "PyTritonServer":
        prefer_running_libpython()
        from pytriton.triton import Triton, TritonConfig

        from pagedbackend.adapters.pytriton.binding import bind_llm

        self._tmp = Path(tempfile.mkdtemp(prefix="pagedbackend-pytriton-"))
        config = TritonConfig(http_address=self.host, http_port=self.http_port, grpc_address=self.host,
                              grpc_port=self.grpc_port, metrics_address=self.host, metrics_port=self.metrics_port,
                              log_verbose=self.log_verbose, log_file=self._tmp / "triton.log", **self.extra_config)
        self.engine = AsyncLLMEngine.from_engine_args(self.engine_args, progress=False)
        try:
            self.triton = Triton(config=config, workspace=self._tmp / "workspace")
            bind_llm(self.triton, self.engine, self.model_name)
            self.triton.run()
            self.metrics = MetricsServer(self.host, self.engine_metrics_port, {self.model_name: self.engine}).start()
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

    def stop(self) -> None:
        for step in ("metrics", "triton"):
            part = getattr(self, step, None)
            if part is not None:
                try:
                    part.stop()
                finally:
                    setattr(self, step, None)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> "PyTritonServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
