"""One host-to-device copy for the arrays a step sends (shared by the runner and the sampler)."""

from __future__ import annotations

import numpy as np
import torch

# bytes: every array in an upload buffer starts where any view may, and where Triton's pointer
# specialisation (16-byte divisibility) sees it the same whatever the batch size
_ALIGN = 16
_TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32, np.bool_: torch.bool}


class HostUpload:
    """Host arrays bound for the device, sent as one buffer: one host-to-device copy per step
    instead of one per array. On CUDA the buffer is pinned and the copy does not block (a
    pageable or blocking copy synchronises the stream: the host would wait for the forward pass
    before queueing the sampler). The caching host allocator keeps a pinned buffer until the
    copy that reads it has finished, so a later step never overwrites one in flight."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        self._arrays[name] = np.ascontiguousarray(array)

    def send(self, device: torch.device, one_copy: bool) -> dict[str, torch.Tensor]:
        """The arrays as device tensors. `one_copy` False (a CPU device's fast path): each
        array is wrapped where it lies, nothing is copied."""
        if not one_copy:
            return {name: torch.from_numpy(a) for name, a in self._arrays.items()}
        offsets, size = {}, 0
        for name, a in self._arrays.items():
            offsets[name] = size
            size += -(-a.nbytes // _ALIGN) * _ALIGN
        buf = np.empty(max(size, _ALIGN), dtype=np.uint8)
        for name, a in self._arrays.items():
            buf[offsets[name]:offsets[name] + a.nbytes] = a.reshape(-1).view(np.uint8)
        host = torch.from_numpy(buf)
        if device.type == "cuda":
            host = host.pin_memory()  # from the caching host allocator: no cudaHostAlloc per step
        dev = host.to(device, non_blocking=True)
        out = {}
        for name, a in self._arrays.items():
            start = offsets[name]
            dtype = _TORCH_DTYPES[a.dtype.type]
            out[name] = dev[start:start + a.nbytes].view(dtype).view(a.shape)
        return out
