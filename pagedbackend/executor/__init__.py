"""How a step reaches the model runner(s): `Executor.execute(step) -> RunnerOutput`, plain data
in and out. `UniprocExecutor` runs the one runner in this process; a multi-process executor
(tensor parallelism) sends the same plain step to every rank without the scheduler or the
runner's interface changing."""

from pagedbackend.executor.base import Executor
from pagedbackend.executor.uniproc import UniprocExecutor

__all__ = ["Executor", "UniprocExecutor"]
