"""How a step reaches the model runner(s): `Executor.execute(step) -> RunnerOutput`, plain data
in and out. `UniprocExecutor` runs the one runner in this process; `MultiprocExecutor` (`mp`)
starts the other tensor-parallel ranks as processes and sends each of them the same plain step;
`ExternalLauncherExecutor` (`external_launcher`) is one of the ranks torchrun started, each
running the same engine. The scheduler and the runner's interface are the same for all three."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedbackend.executor.base import Executor, ExecutorDied

if TYPE_CHECKING:
    from pagedbackend.config import EngineConfig


def make_executor(config: "EngineConfig", progress: bool = True) -> Executor:
    kind = config.distributed_executor_backend
    if kind == "uni":
        from pagedbackend.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config, progress)
    if kind == "mp":
        from pagedbackend.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config, progress)
    if kind == "external_launcher":
        from pagedbackend.executor.external import ExternalLauncherExecutor

        return ExternalLauncherExecutor(config, progress)
    raise ValueError(f"distributed_executor_backend: unknown {kind!r}")


__all__ = ["Executor", "ExecutorDied", "make_executor"]
