"""Launching Triton kernels on the device their tensors live on.

A Triton launch goes to the calling thread's *current* CUDA device and stream, not to the device
of the tensors it is given. The engine loop runs on its own thread (current device 0 there) and
TorchServe hands workers GPUs other than 0, so a kernel called with `cuda:1` tensors would run on
GPU 0 with GPU 1 pointers. Every kernel wrapper in this package launches inside
`on_device_of(tensor)`.
"""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which Triton launches run on `tensor`'s CUDA device (and that device's
    current stream); a no-op for CPU tensors (the interpreter runs where the data is)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
