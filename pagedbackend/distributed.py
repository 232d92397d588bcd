"""Tensor-parallel process group seam.

Today the engine runs on one device (world size 1), so these are identities. The model code
already calls them at the points where a tensor-parallel run must split weights or reduce
partial results, so adding torch.distributed later changes this module, not the models.
"""

from __future__ import annotations

import torch


def get_tp_rank() -> int:
    return 0


def get_tp_size() -> int:
    return 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer across ranks."""
    if get_tp_size() == 1:
        return x
    torch.distributed.all_reduce(x)
    return x


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator
