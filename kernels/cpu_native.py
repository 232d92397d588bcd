"""Native CPU kernels, compiled on first use and loaded with ctypes.

The C source ships with the package; it is compiled once per machine with the system C
compiler (`$CC`, else cc/gcc) into a cache directory (`$PAGEDBACKEND_CACHE_DIR`, else
`~/.cache/pagedbackend`), keyed by the source, the flags, the compiler and the CPU's feature
flags, so a shared home directory never serves a library built for another CPU. Without a
compiler (or with `PAGEDBACKEND_NO_NATIVE=1`) `load()` returns None and callers use PyTorch.
ctypes releases the GIL for the call, and OpenMP inside shares the runtime torch has loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
# -fno-math-errno lets GCC vectorize expf (glibc's libmvec); no -ffast-math, which would
# license assumptions about infinities and reassociation beyond what the kernel states.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c11", "-shared", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("PAGEDBACKEND_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedbackend"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    lib = out_dir / f"paged_attention_cpu-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, lib)  # atomic: concurrent builders (several workers) never see half a file
    except subprocess.CalledProcessError as e:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{e.stderr}") from e
    return lib


class NativeKernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.paged_decode_attention_f32
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        fn.argtypes = [p, p, i64, i64, p, p, p, i64, p, i64, i64, i64, i64, i64, f32, f32, i64, i64]
        fn.restype = ctypes.c_int
        self._decode = fn

    def paged_decode_attention(self, out: torch.Tensor, q: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, sliding_window: int | None, max_seq_len: int,
                               logits_soft_cap: float | None = None) -> None:
        """out[s, h] = softmax(q[s, h] . K^T * scale) V over sequence s's cached tokens; with
        `logits_soft_cap` the scores are first capped: cap * tanh(scores / cap)."""
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
        num_seqs, num_heads, head_dim = q.shape
        _, num_kv_heads, block_size, _ = key_cache.shape
        for t in (out, q, key_cache, value_cache):
            if t.dtype != torch.float32 or t.device.type != "cpu":
                raise TypeError("the native CPU kernel takes float32 CPU tensors")
        if not (out.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous()
                and q.stride(2) == 1 and block_tables.stride(1) == 1 and seq_lens.is_contiguous()):
            raise ValueError("paged_decode_attention: unsupported strides")
        if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
            raise TypeError("block_tables and seq_lens must be int32")
        rc = self._decode(out.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), key_cache.data_ptr(),
                          value_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
                          seq_lens.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                          scale, logits_soft_cap or 0.0, sliding_window or 0, max_seq_len)
        if rc != 0:
            raise RuntimeError(f"paged_decode_attention_f32 failed (code {rc})")


@functools.lru_cache(maxsize=1)
def load() -> NativeKernels | None:
    """The compiled kernels, or None (logged once) when they cannot be built here."""
    if os.environ.get("PAGEDBACKEND_NO_NATIVE") == "1":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.warning("no C compiler found: CPU attention uses the slower pure-PyTorch path")
        return None
    try:
        return NativeKernels(ctypes.CDLL(str(_build(cc))))
    except (OSError, RuntimeError) as e:
        logger.warning("native CPU kernels unavailable (%s): using the pure-PyTorch path", e)
        return None
