"""`external_launcher`: torchrun started every rank, and every rank builds the same engine and
is given the same requests (vLLM's external launcher). Scheduling is deterministic, so each
rank's scheduler makes the same decisions without being told; the model's collectives keep
the ranks in step, and every rank samples the same tokens from the same gathered logits. So
every rank returns the same outputs."""

from __future__ import annotations

import logging
import os

from pagedbackend.config import EngineConfig
from pagedbackend.distributed import StepFailed, destroy_tensor_parallel, get_tp_group, init_tensor_parallel
from pagedbackend.executor.base import ExecutorDied
from pagedbackend.step import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ExternalLauncherExecutor:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        from pagedbackend.model_runner import ModelRunner

        if get_tp_group() is not None:
            raise RuntimeError("a tensor-parallel engine already runs in this process; shut it down first")
        self.config = config
        group = init_tensor_parallel(int(os.environ["RANK"]), config.tensor_parallel_size, init_method="env://",
                                     device=config.device, timeout_s=config.distributed_timeout_s,
                                     local_rank=int(os.environ["LOCAL_RANK"]))
        self.rank = group.rank
        self._dead: str | None = None
        try:
            self.runner = ModelRunner(config, progress and self.rank == 0)
        except BaseException:
            destroy_tensor_parallel()
            raise
        self.num_blocks = self.runner.num_blocks
        self.num_host_blocks = self.runner.num_host_blocks

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        if self._dead is not None:
            raise ExecutorDied(self._dead)
        try:
            return self.runner.execute(step)
        except StepFailed:
            raise
        except Exception as e:  # noqa: BLE001 - inside the collectives: the ranks are out of step
            self._dead = f"tensor-parallel rank {self.rank} stopped: {type(e).__name__}: {e}"
            logger.error("%s", self._dead)
            raise ExecutorDied(self._dead) from e

    def shutdown(self) -> None:
        destroy_tensor_parallel()
