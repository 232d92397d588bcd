"""The executor seam between the engine core and the model runner(s)."""

from __future__ import annotations

from typing import Protocol

from pagedbackend.step import RunnerOutput, SchedulerOutput


class Executor(Protocol):
    num_blocks: int  # KV blocks per rank (the same block ids on every rank)
    num_host_blocks: int  # host swap-pool blocks

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """Run one step on every rank; the sampled result (from rank 0, or identical on all)."""
        ...

    def shutdown(self) -> None:
        ...
