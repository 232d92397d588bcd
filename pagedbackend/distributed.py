"""Tensor-parallel process groups and the collectives the model code calls.

One process per rank. The model code is written column/row-parallel and calls the functions
here at the points where a tensor-parallel run splits weights or combines partial results;
with one rank (no group initialised) they are identities, so the single-device path is the
same code. Two groups, as vLLM does it: `device_group` for the model's tensors (gloo on CPU,
NCCL on CUDA) and `cpu_group` (always gloo) for control: agreeing that a step may go on,
passing a failed rank's message.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

#: torchrun's variables: an `LLM` constructed under torchrun takes its rank from them.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class TPGroup:
    rank: int
    size: int
    local_rank: int
    device_group: Any
    cpu_group: Any
    owns_process_group: bool  # we called init_process_group (and destroy it at shutdown)


_GROUP: TPGroup | None = None


class StepFailed(RuntimeError):
    """A rank failed while preparing a step; every rank raises this for the same step, so the
    step's requests fail everywhere and the ranks stay in step for the next one."""

    def __init__(self, rank: int, what: str, message: str) -> None:
        super().__init__(f"tensor-parallel rank {rank} failed {what}: {message}")
        self.rank = rank


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def init_tensor_parallel(rank: int, size: int, *, init_method: str, device: str, timeout_s: float,
                         local_rank: int | None = None) -> TPGroup:
    """Join (or create) the process group of `size` ranks. An existing default group of the
    same size (TorchServe's torchrun launch, a user's own) is used as is."""
    global _GROUP
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if device.startswith("cuda"):  # NCCL works on the current device: this rank's own GPU
        torch.cuda.set_device(rank if local_rank is None else local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
    if dist.get_world_size() != size:
        raise ValueError(f"tensor_parallel_size={size} but the process group has {dist.get_world_size()} ranks "
                         "(pipeline and data parallelism are not supported: one group of tensor_parallel_size)")
    rank = dist.get_rank()
    device_group = dist.group.WORLD
    cpu_group = device_group if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _GROUP = TPGroup(rank, size, rank if local_rank is None else local_rank, device_group, cpu_group, owns)
    return _GROUP


def destroy_tensor_parallel() -> None:
    global _GROUP
    group, _GROUP = _GROUP, None
    if group is not None and group.owns_process_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def get_tp_group() -> TPGroup | None:
    return _GROUP


def get_tp_rank() -> int:
    return 0 if _GROUP is None else _GROUP.rank


def get_tp_size() -> int:
    return 1 if _GROUP is None else _GROUP.size


def rank_device(device: str) -> str:
    """This rank's device: `cuda` means the rank's own GPU (its local rank)."""
    if _GROUP is not None and device == "cuda":
        return f"cuda:{_GROUP.local_rank}"
    return device


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer across ranks (in place)."""
    if _GROUP is None or _GROUP.size == 1:
        return x
    torch.distributed.all_reduce(x, group=_GROUP.device_group)
    return x


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's slice of the last dimension (vocab-parallel logits), in rank order."""
    if _GROUP is None or _GROUP.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_GROUP.size)]
    torch.distributed.all_gather(parts, x, group=_GROUP.device_group)
    return torch.cat(parts, dim=-1)


def tp_min(value: int) -> int:
    """The smallest of every rank's `value` (e.g. KV blocks that fit: the pool is the same
    size, with the same block ids, on every rank)."""
    if _GROUP is None or _GROUP.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=_GROUP.cpu_group)
    return int(t.item())


@contextlib.contextmanager
def ranks_agree(what: str) -> Iterator[None]:
    """Run the block on every rank, then agree: if any rank raised, every rank raises
    `StepFailed` naming the first such rank and its message. Wrap work that precedes a
    collective, so that a rank failing there never leaves the others waiting in it."""
    if _GROUP is None or _GROUP.size == 1:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - shared with the other ranks below
        error = e
    g = _GROUP
    flag = torch.tensor([g.rank if error is not None else g.size], dtype=torch.int64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=g.cpu_group)
    failed = int(flag.item())
    if failed == g.size:
        return
    message = [f"{type(error).__name__}: {error}" if error is not None else None]
    torch.distributed.broadcast_object_list(message, src=failed, group=g.cpu_group)
    raise StepFailed(failed, what, str(message[0])) from error


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


def kv_head_split(num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(KV heads per rank, replicas of each KV head): split when they divide, replicated when
    there are more ranks than KV heads (MQA at TP=2: both ranks hold the one head)."""
    if tp <= num_kv_heads:
        return divide(num_kv_heads, tp, "num_key_value_heads"), 1
    if tp % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} is neither a divisor nor a multiple of num_key_value_heads="
                         f"{num_kv_heads}: the KV heads cannot be split or replicated evenly")
    return 1, tp // num_kv_heads


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary padded so each rank holds an equal slice of whole 64-row tiles (vLLM pads
    to 64); one rank keeps the checkpoint's size."""
    if tp == 1:
        return vocab_size
    multiple = 64 * tp
    return -(-vocab_size // multiple) * multiple
