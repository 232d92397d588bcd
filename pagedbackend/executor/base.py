"""The executor seam between the engine core and the model runner(s)."""

from __future__ import annotations

from typing import Protocol

from pagedbackend.step import RunnerOutput, SchedulerOutput


class ExecutorDied(RuntimeError):
    """The executor cannot run another step (a tensor-parallel rank died, hung, or failed in
    the middle of the model's collectives): the engine fails every request, not only the
    step's, and refuses new ones. The message names the rank."""


class Executor(Protocol):
    num_blocks: int  # KV blocks per rank (the same block ids on every rank)
    num_host_blocks: int  # host swap-pool blocks

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """Run one step on every rank; the sampled result (identical on every rank). A failure
        every rank agreed on (`StepFailed`) fails the step's requests; `ExecutorDied` is final."""
        ...

    def shutdown(self) -> None:
        ...
