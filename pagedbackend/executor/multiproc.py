"""`mp`: rank 0 runs in this process (beside the scheduler); ranks 1..N-1 run in processes it
starts. Each step goes to every worker as the same plain data (pickled once, one pipe per
worker) before rank 0 runs it; every rank applies it to its own persistent batch, runs its
shard of the model (the collectives keep them in step) and samples the same tokens from the
same gathered logits. Only rank 0's result is used.

Failures: a rank failing *before* the model's collectives is agreed on by every rank
(`StepFailed`: the step's requests fail, the engine goes on). A rank dying, hanging past
`distributed_timeout_s`, or failing inside the collectives ends the executor (`ExecutorDied`,
naming the rank); every worker is stopped. Workers exit on their own when this process goes
(their pipe reaches end-of-file)."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import secrets
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from pagedbackend.config import EngineConfig
from pagedbackend.distributed import (StepFailed, destroy_tensor_parallel, get_tp_group, init_tensor_parallel,
                                      launched_by_torchrun)
from pagedbackend.executor.base import ExecutorDied
from pagedbackend.step import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # spawning, importing torch and loading a shard of the weights
_STOP = b""  # the message that ends a worker's loop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is not answering"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        from pagedbackend.model_runner import ModelRunner

        if get_tp_group() is not None:
            raise RuntimeError("a tensor-parallel engine already runs in this process; shut it down first "
                               "(one tensor-parallel group per process)")
        self.config = config
        self.size = config.tensor_parallel_size
        self._procs: dict[int, subprocess.Popen] = {}
        self._conns: dict[int, multiprocessing.connection.Connection] = {}
        self._dead: str | None = None
        self._closed = False
        threads = max(1, torch.get_num_threads() // self.size)  # the ranks share this machine's cores
        try:
            if launched_by_torchrun():
                self._attach()  # torchrun started every rank: ranks 1..N-1 run `run_follower`
            else:
                self._spawn(threads)
            self.runner = ModelRunner(config, progress)
            self._expect("ready")
        except BaseException as e:
            reason = self._failure_reason()
            self.shutdown()
            if reason is not None and not isinstance(e, KeyboardInterrupt):
                raise ExecutorDied(f"tensor-parallel startup failed: {reason}") from e
            raise
        self.num_blocks = self.runner.num_blocks
        self.num_host_blocks = self.runner.num_host_blocks
        atexit.register(self.shutdown)
        logger.info("tensor parallel: %d ranks (mp), %d thread(s) each", self.size, threads)

    def _spawn(self, threads: int) -> None:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        for rank in range(1, self.size):
            self._procs[rank], self._conns[rank] = _start_worker(rank)
            self._conns[rank].send((self.config, rank, init_method, threads))
        self._expect("hello")
        torch.set_num_threads(threads)
        init_tensor_parallel(0, self.size, init_method=init_method, device=self.config.device,
                             timeout_s=self.config.distributed_timeout_s)

    def _attach(self) -> None:
        """Rank 0 of a torchrun launch (TorchServe's `parallelType: tp`): the other ranks are
        there already; each connects back to an address given to it over the process group."""
        cfg = self.config
        group = init_tensor_parallel(int(os.environ["RANK"]), self.size, init_method="env://", device=cfg.device,
                                     timeout_s=cfg.distributed_timeout_s, local_rank=int(os.environ["LOCAL_RANK"]))
        if group.rank != 0:
            raise ValueError(f"rank {group.rank} of a torchrun launch follows rank 0: it runs "
                             "pagedbackend.executor.multiproc.run_follower(config), not an engine (or give every "
                             "rank its own engine with distributed_executor_backend='external_launcher')")
        host = os.environ.get("MASTER_ADDR") or "127.0.0.1"
        authkey = secrets.token_bytes(32)
        with mp.connection.Listener((host, 0), authkey=authkey) as listener:
            address = listener.address
            torch.distributed.broadcast_object_list([(address, authkey)], src=0, group=group.cpu_group)
            sock = getattr(getattr(listener, "_listener", None), "_socket", None)
            if sock is not None:
                sock.settimeout(STARTUP_TIMEOUT_S)  # a follower that never connects fails the start
            for _ in range(1, self.size):
                conn = listener.accept()
                kind, rank = conn.recv()  # ("hello", its rank)
                self._conns[int(rank)] = conn

    # ------------------------------------------------------------------ steps
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        if self._dead is not None:
            raise ExecutorDied(self._dead)
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in self._conns.items():
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise self._die(e) from e
        try:
            return self.runner.execute(step)
        except StepFailed:
            raise  # every rank agreed: the step's requests fail, the ranks stay in step
        except Exception as e:  # noqa: BLE001 - inside the collectives: the ranks are out of step
            raise self._die(e) from e

    def _die(self, error: BaseException) -> ExecutorDied:
        reason = self._failure_reason(wait_s=2.0) or f"rank 0 failed: {type(error).__name__}: {error}"
        self._dead = f"tensor-parallel executor stopped: {reason}"
        logger.error("%s", self._dead)
        self._stop_workers()
        return ExecutorDied(self._dead)

    def _failure_reason(self, wait_s: float = 0.0) -> str | None:
        """What a worker reported or how it ended, the lowest rank first; None if all look fine."""
        deadline = time.monotonic() + wait_s
        while True:
            reasons = []
            for rank, conn in self._conns.items():
                report, closed = _poll_report(conn)
                proc = self._procs.get(rank)
                if report is not None:
                    reasons.append(f"rank {rank} failed: {report}")
                elif proc is not None and (closed or proc.poll() is not None):
                    try:
                        proc.wait(1.0)
                    except subprocess.TimeoutExpired:
                        pass
                    reasons.append(f"rank {rank} {_describe_exit(proc.poll())}")
                elif closed:
                    reasons.append(f"rank {rank} closed its connection (its process ended)")
            if reasons or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not reasons and wait_s:
            # Nobody died or reported: a collective timed out on a rank that is stuck.
            alive = ", ".join(str(r) for r in self._conns if r not in self._procs or self._procs[r].poll() is None)
            return (f"no answer from rank(s) {alive} within distributed_timeout_s="
                    f"{self.config.distributed_timeout_s:g} (hung?)")
        return "; ".join(reasons) or None

    def _expect(self, what: str) -> None:
        """Wait for every worker's `what` message, failing early if one dies or reports an error."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = dict(self._conns)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"tensor-parallel rank(s) {sorted(pending)} not {what} after {STARTUP_TIMEOUT_S:g} s")
            mp.connection.wait(list(pending.values()), timeout=min(left, 1.0))
            for rank, conn in list(pending.items()):
                if not conn.poll():
                    continue
                try:
                    kind, detail = conn.recv()
                except (EOFError, OSError):  # its end closed: the process is gone
                    proc = self._procs[rank]
                    proc.wait(5.0)
                    raise RuntimeError(f"tensor-parallel rank {rank} {_describe_exit(proc.poll())} while starting")
                if kind != what:
                    raise RuntimeError(f"tensor-parallel rank {rank} failed while starting: {detail}")
                del pending[rank]

    # --------------------------------------------------------------- shutdown
    def _stop_workers(self) -> None:
        for conn in self._conns.values():
            try:
                conn.send_bytes(_STOP)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs.values():
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2.0)
        for conn in self._conns.values():
            conn.close()
        self._conns = {}

    def shutdown(self) -> None:
        """Stop every worker (bounded: a few seconds, then killed) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        self._dead = self._dead or "the engine was shut down"
        self._stop_workers()
        destroy_tensor_parallel()
        atexit.unregister(self.shutdown)


def _poll_report(conn: multiprocessing.connection.Connection) -> tuple[str | None, bool]:
    """(the error a worker reported, whether its end is closed)."""
    try:
        if conn.poll():
            kind, detail = conn.recv()
            return str(detail), False
    except (EOFError, OSError):
        return None, True
    return None, False


def _start_worker(rank: int) -> tuple[subprocess.Popen, multiprocessing.connection.Connection]:
    """A fresh interpreter running `_worker_main` (not multiprocessing's spawn, which re-imports
    the parent's `__main__`: a script without a main guard, or TorchServe's worker module),
    joined to this process by a socket pair: the worker's death is end-of-file here, ours there."""
    ours, theirs = socket.socketpair()
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    code = f"from pagedbackend.executor.multiproc import _worker_main; _worker_main({theirs.fileno()})"
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env,
                                stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    return proc, multiprocessing.connection.Connection(ours.detach())


def _worker_main(fd: int) -> None:
    """A worker rank: join the group, load this rank's shard, then run every step rank 0 sends
    until it says stop or goes away."""
    from pagedbackend.model_runner import ModelRunner

    conn = multiprocessing.connection.Connection(fd)
    try:
        config, rank, init_method, threads = conn.recv()
        torch.set_num_threads(threads)
        conn.send(("hello", rank))
        init_tensor_parallel(rank, config.tensor_parallel_size, init_method=init_method, device=config.device,
                             timeout_s=config.distributed_timeout_s)
        runner = ModelRunner(config, progress=False)
        conn.send(("ready", rank))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names this rank
        _report_and_exit(conn, e)
        return
    _serve_steps(conn, runner)
    destroy_tensor_parallel()
    os._exit(0)  # skip interpreter teardown (gloo threads, CUDA contexts): nothing is left to flush


def run_follower(config: EngineConfig) -> None:
    """Rank > 0 of a torchrun launch whose rank 0 runs the engine with
    distributed_executor_backend='mp' (TorchServe's `parallelType: tp`, where every rank loads
    the handler): load this rank's shard and run the steps rank 0 sends, until it stops.
    Returns when rank 0 shuts down; exits the process if this rank fails out of step."""
    from pagedbackend.model_runner import ModelRunner

    group = init_tensor_parallel(int(os.environ["RANK"]), config.tensor_parallel_size, init_method="env://",
                                 device=config.device, timeout_s=config.distributed_timeout_s,
                                 local_rank=int(os.environ["LOCAL_RANK"]))
    box: list[Any] = [None]
    torch.distributed.broadcast_object_list(box, src=0, group=group.cpu_group)
    address, authkey = box[0]
    conn = mp.connection.Client(address, authkey=authkey)
    try:
        conn.send(("hello", group.rank))  # names this connection's rank
        runner = ModelRunner(config, progress=False)
        conn.send(("ready", group.rank))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names this rank
        _report_and_exit(conn, e)
        return
    _serve_steps(conn, runner)
    conn.close()
    destroy_tensor_parallel()


def _serve_steps(conn: Any, runner: Any) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError, KeyboardInterrupt):
            return  # rank 0 is gone (or Ctrl-C reached the whole process group)
        if data == _STOP:
            return
        try:
            runner.execute(pickle.loads(data))
        except StepFailed:
            continue  # agreed by every rank: the step failed, the next one comes
        except BaseException as e:  # noqa: BLE001 - out of step with the others: end this rank
            _report_and_exit(conn, e)


def _report_and_exit(conn: Any, error: BaseException) -> None:
    logger.error("tensor-parallel worker failed:\n%s", "".join(traceback.format_exception(error)))
    try:
        conn.send(("error", f"{type(error).__name__}: {error}"))
    except OSError:
        pass
    os._exit(1)
