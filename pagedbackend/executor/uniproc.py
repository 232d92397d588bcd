"""One model runner, in this process."""

from __future__ import annotations

from pagedbackend.config import EngineConfig
from pagedbackend.model_runner import ModelRunner
from pagedbackend.step import RunnerOutput, SchedulerOutput


class UniprocExecutor:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.runner = ModelRunner(config, progress)
        self.num_blocks = self.runner.num_blocks
        self.num_host_blocks = self.runner.num_host_blocks

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(step)

    def shutdown(self) -> None:
        pass
