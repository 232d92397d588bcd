"""Model archives and a managed TorchServe process.

`build_archive` runs torch-model-archiver with this package's handler and a model-config.yaml
(the template in this directory unless one is given), validating the handler section first.
`TorchServe` starts a server on 127.0.0.1-bound addresses with its own working directory
(TMPDIR, logs, key file: TorchServe finds a running server by `$TMPDIR/.model_server.pid`, so
one directory per server), waits until the model's worker is ready, and stops it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pagedbackend.adapters.ports import free_port
from pagedbackend.adapters.torchserve.config import flatten_handler, validate_model_config

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
HANDLER_FILE = HERE / "handler.py"
CONFIG_TEMPLATE = HERE / "model-config.yaml"

# Quiet logging: TorchServe's default log4j2 config prints every line twice, all to stdout.
# Here each of its loggers writes one rolling file in $LOG_LOCATION / $METRICS_LOCATION.
_LOG_FILES = (  # (appender and file name, directory variable, line pattern)
    ("ts_log", "LOG_LOCATION", "%d{ISO8601} [%-5p] %t %c - %m%n"),
    ("model_log", "LOG_LOCATION", "%d{ISO8601} [%-5p] %c - %m%n"),
    ("access_log", "LOG_LOCATION", "%d{ISO8601} - %m%n"),
    ("ts_metrics", "METRICS_LOCATION", "%d{ISO8601} - %m%n"),
    ("model_metrics", "METRICS_LOCATION", "%d{ISO8601} - %m%n"),
)
_LOGGERS = (("ACCESS_LOG", "access_log"), ("TS_METRICS", "ts_metrics"), ("MODEL_METRICS", "model_metrics"),
            ("MODEL_LOG", "model_log"), ("org.pytorch.serve", "ts_log"))


def _log4j2_config() -> str:
    appenders = "".join(
        f"""    <RollingFile name="{name}" fileName="${{env:{env}:-logs}}/{name}.log"
                 filePattern="${{env:{env}:-logs}}/{name}.%d{{dd-MMM}}.log.gz">
      <PatternLayout pattern="{pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
    </RollingFile>
""" for name, env, pattern in _LOG_FILES)
    loggers = "".join(f'    <Logger name="{logger}" level="info" additivity="false"><AppenderRef ref="{ref}"/></Logger>\n'
                      for logger, ref in _LOGGERS)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Configuration status="WARN">\n  <Appenders>\n'
            f"{appenders}  </Appenders>\n  <Loggers>\n{loggers}"
            '    <Root level="warn"><AppenderRef ref="ts_log"/></Root>\n  </Loggers>\n</Configuration>\n')


def load_model_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    data = yaml.safe_load(Path(path or CONFIG_TEMPLATE).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a YAML mapping")
    return data


def set_tensor_parallel(cfg: dict[str, Any], size: int, parallel_type: str = "custom") -> None:
    """Split the model over `size` ranks: `custom` (one TorchServe worker whose engine starts
    its ranks) or `tp` (TorchServe starts them with torchrun). `custom` is written as
    TorchServe's own LLM launcher writes it, `parallelLevel: N` without `parallelType`:
    TorchServe 0.12's frontend opens `parallelLevel` worker sockets even for `parallelType:
    custom`, so that spelling cannot start (see `config.tensor_parallel_size`)."""
    for key in ("parallelType", "parallelLevel", "torchrun"):
        cfg.pop(key, None)
    cfg["handler"]["tensor_parallel_size"] = size
    if size == 1:
        return
    if parallel_type == "custom":
        cfg.update(parallelLevel=size)
    elif parallel_type == "tp":
        cfg.update(parallelType="tp", torchrun={"nproc-per-node": size})
    else:
        raise ValueError(f"parallel_type must be custom or tp, got {parallel_type!r}")


def build_archive(model: str | os.PathLike, name: str, export_path: str | os.PathLike = "model_store",
                  config: str | os.PathLike | None = None, no_archive: bool = False, version: str = "1.0",
                  model_path: str | os.PathLike | None = None, tensor_parallel_size: int | None = None,
                  parallel_type: str = "custom") -> Path:
    """A .mar (or, with `no_archive`, a directory) holding the handler, the config and the model
    files. With `model_path` (or `handler.model_path` in the config) the model stays where it
    is and the archive only points at it: what you want for large checkpoints."""
    model = Path(model).resolve()
    if not (model / "config.json").is_file():
        raise ValueError(f"model: {model} is not a Hugging Face model directory (no config.json)")
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"name: {name!r} is not a valid model name")
    cfg = load_model_config(config)
    handler = flatten_handler(cfg.get("handler"))  # an upstream vllm_engine_config: section, merged
    cfg["handler"] = handler
    if model_path is not None:
        handler["model_path"] = str(Path(model_path).resolve())
    elif "model_path" in handler and not Path(str(handler["model_path"])).is_absolute():
        # Upstream configs name the model inside their own store ("model/models--org--name/...");
        # here the model given is what the archive holds.
        logger.info("handler.model_path %s (relative) replaced by the packaged model %s", handler.pop("model_path"),
                    model)
    if tensor_parallel_size is None and cfg.get("parallelType") == "custom" and int(cfg.get("parallelLevel", 1)) > 1:
        # Upstream's spelling (examples/large_models/vllm), which TorchServe 0.12 cannot start:
        # archived as the working one, one worker whose engine starts parallelLevel ranks.
        tensor_parallel_size = int(cfg["parallelLevel"])
        if handler.setdefault("tensor_parallel_size", tensor_parallel_size) != tensor_parallel_size:
            raise ValueError(f"model-config.yaml: handler tensor_parallel_size: {handler['tensor_parallel_size']} does "
                             f"not match parallelLevel: {tensor_parallel_size}")
        logger.info("parallelType: custom with parallelLevel: %d archived as parallelLevel: %d (one worker "
                    "starting its ranks; TorchServe 0.12 cannot start the custom spelling)",
                    tensor_parallel_size, tensor_parallel_size)
    if tensor_parallel_size is not None:
        set_tensor_parallel(cfg, tensor_parallel_size, parallel_type)
    validate_model_config(cfg)
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    export = Path(export_path).resolve()
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "model-config.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [archiver, "--model-name", name, "--version", version, "--handler", str(HANDLER_FILE),
               "--config-file", str(cfg_file), "--export-path", str(export), "--force",
               "--archive-format", "no-archive" if no_archive else "default"]
        if "model_path" not in handler:
            cmd += ["--extra-files", str(model)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stderr or done.stdout}")
    return export / name if no_archive else export / f"{name}.mar"


@dataclass
class TorchServe:
    """A TorchServe process with its own working directory; use as a context manager."""

    model_store: Path
    models: dict[str, str]  # name -> archive file (or directory) name in model_store
    workdir: Path
    host: str = "127.0.0.1"
    inference_port: int = 0
    management_port: int = 0
    metrics_port: int = 0
    token_auth: bool = True
    enable_model_api: bool = False
    extra_properties: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        for attr in ("inference_port", "management_port", "metrics_port"):
            if not getattr(self, attr):
                setattr(self, attr, free_port(self.host))
        self.grpc_ports = (free_port(self.host), free_port(self.host))

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TMPDIR"] = str(self.workdir / "tmp")
        env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(self.log_dir)
        bin_dir = str(Path(sys.executable).parent)  # the worker must run this interpreter's packages
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        return env

    def _write_config(self) -> Path:
        props = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": self.host,
            "grpc_management_address": self.host,
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            "metrics_mode": "prometheus",
            "model_metrics_auto_detect": "true",
            "disable_token_authorization": "false" if self.token_auth else "true",
            "enable_model_api": "true" if self.enable_model_api else "false",
            "default_workers_per_model": "1",
            **self.extra_properties,
        }
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def start(self, timeout: float = 300.0) -> "TorchServe":
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("TorchServe needs Java 17 on PATH")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_config = self.workdir / "log4j2.xml"
        log_config.write_text(_log4j2_config())
        cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--ncs", "--foreground",
               "--model-store", str(self.model_store), "--ts-config", str(self._write_config()),
               "--log-config", str(log_config)]
        if self.models:
            cmd += ["--models", *[f"{n}={f}" for n, f in self.models.items()]]
        if not self.token_auth:
            cmd.append("--disable-token-auth")
        if self.enable_model_api:
            cmd.append("--enable-model-api")
        self._stdout = open(self.log_dir / "torchserve.out", "ab")
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdout=self._stdout,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for name in self.models:
                self.wait_ready(name, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def keys(self) -> dict[str, str]:
        """The token-authorization keys TorchServe wrote (empty when auth is off)."""
        if not self.token_auth:
            return {}
        for _ in range(100):
            if self.key_file.is_file():
                try:
                    data = json.loads(self.key_file.read_text())
                    return {k: v["key"] for k, v in data.items() if isinstance(v, dict) and "key" in v}
                except (json.JSONDecodeError, KeyError):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"TorchServe wrote no key file at {self.key_file}")

    def headers(self, api: str = "inference") -> dict[str, str]:
        key = self.keys().get(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def wait_ready(self, name: str, timeout: float = 300.0) -> None:
        """Poll the management API until a worker of `name` is READY."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with code {self.process.returncode}; see {self.log_dir}")
            try:
                req = urllib.request.Request(f"{self.management_url}/models/{name}", headers=self.headers("management"))
                with urllib.request.urlopen(req, timeout=5) as resp:
                    info = json.loads(resp.read())
                workers = info[0].get("workers", []) if info else []
                if any(w.get("status") == "READY" for w in workers):
                    return
                last = str([w.get("status") for w in workers])
            except (urllib.error.URLError, OSError, ValueError, RuntimeError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"model {name} not ready after {timeout:.0f}s (last: {last}); logs in {self.log_dir}")

    def stop(self, timeout: float = 10.0, force: bool = False) -> None:
        """Stop within `timeout` + 3 s, leaving no process behind: SIGTERM to the Java frontend
        (what `torchserve --stop` sends; it stops its workers and in-flight requests end), and
        after `timeout` s (at once with `force`) SIGKILL to whatever is left of the server's
        session: the launcher, the frontend and every Python worker, also those the frontend
        left orphaned. A killed frontend's JVM perf file (/tmp/hsperfdata_<user>/<pid>) is removed."""
        process = getattr(self, "process", None)
        if process is None:
            return
        import contextlib
        import signal

        def stat(pid: int):
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return None
            fields = text[text.rindex(")") + 2:].split()
            return fields[0], int(fields[1]), int(fields[3]), int(fields[19])  # state, ppid, session, start

        def members() -> dict[int, int]:
            """pid -> start time of the launcher, its descendants and the rest of its session
            (started with start_new_session, so orphans of the frontend are found too)."""
            children: dict[int, list[int]] = {}
            starts: dict[int, int] = {}
            session: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit() and (st := stat(int(entry))) is not None:
                    children.setdefault(st[1], []).append(int(entry))
                    starts[int(entry)] = st[3]
                    if st[2] == process.pid:
                        session[int(entry)] = st[3]
            tree: dict[int, int] = {}
            todo = [process.pid]
            while todo:
                pid = todo.pop()
                if pid in starts and pid not in tree:
                    tree[pid] = starts[pid]
                    todo += children.get(pid, [])
            tree.update(session)
            tree.pop(os.getpid(), None)
            return tree

        def running(pid: int, start: int) -> bool:
            st = stat(pid)
            return st is not None and st[3] == start and st[0] != "Z"

        def is_java(pid: int) -> bool:
            try:
                return os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "java"
            except OSError:
                return False

        seen = members()
        javas = {pid for pid in seen if is_java(pid)}
        if not force and process.poll() is None:
            for pid in javas or {process.pid}:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                seen.update(members())
                time.sleep(0.1)
        seen.update(members())
        javas |= {pid for pid in seen if is_java(pid)}
        left = {p: s for p, s in seen.items() if running(p, s)}
        if left:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(running(p, s) for p, s in left.items()):
                time.sleep(0.02)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1.0)
        for pid in javas:
            if pid not in seen or not running(pid, seen[pid]):
                for perf in Path("/tmp").glob(f"hsperfdata_*/{pid}"):  # the JVM's, always in /tmp
                    with contextlib.suppress(OSError):
                        perf.unlink()
        if not any(running(p, s) for p, s in seen.items()):  # as `torchserve --stop` does
            for stale in (self.workdir / "tmp" / ".model_server.pid", self.key_file):
                with contextlib.suppress(OSError):
                    stale.unlink()
        self._stdout.close()
        self.process = None

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
