"""The interface every attention backend implements, and what each declares it supports.

A backend class states, as class attributes, the device types, dtypes, head sizes, block sizes
and features it handles, and its KV-cache layout (`get_kv_cache_shape`); `supports(...)` checks
a configuration against that declaration (plus what the machine must provide: a compiler, a
package) and returns None or the reason it does not fit. `attention_backend="auto"` takes the
first backend, in a per-device priority order (`pagedbackend.attention.AUTO_PRIORITY`), whose
check passes.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch

from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.kernels.layout import kv_cache_shape


S = TypeVar("S")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class AttentionBackend:
    """Base class: the declarations (override them) and the operations (implement them)."""

    name: ClassVar[str]
    # Device types ("cpu", "cuda") the backend runs on.
    device_types: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    # Head sizes, inclusive; None: no upper bound.
    min_head_size: ClassVar[int] = 1
    max_head_size: ClassVar[int | None] = None
    # KV block sizes; None: any.
    block_sizes: ClassVar[tuple[int, ...] | None] = None
    block_size_note: ClassVar[str] = ""  # why block_sizes is what it is, shown in the rejection
    supports_sliding_window: ClassVar[bool] = True
    supports_logits_soft_cap: ClassVar[bool] = False
    # Query heads per KV head (GQA group), inclusive; None: any.
    max_queries_per_kv: ClassVar[int | None] = None
    # Decode-only steps can be captured as CUDA graphs: for a `meta.cuda_graph` step, prepare()
    # and forward() read only device tensors, with a launch structure fixed by num_seqs and
    # the block_tables width (see AttentionMetadata.cuda_graph). False: the runner replays no
    # graph with this backend (padded decode steps still run, eagerly).
    supports_cuda_graphs: ClassVar[bool] = False

    # ------------------------------------------------------------------ declarations
    @staticmethod
    def get_kv_cache_shape(num_blocks: int, num_kv_heads: int, block_size: int, head_size: int) -> tuple[int, ...]:
        """One layer's key (and value) cache shape; the head-major layout of kernels/layout.py."""
        return kv_cache_shape(num_blocks, num_kv_heads, block_size, head_size)

    @classmethod
    def unavailable_reason(cls, device_type: str) -> str | None:
        """Why the backend cannot run on this machine for `device_type` (a missing package or
        compiler, an unset environment variable), or None."""
        return None

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype, head_size: int, block_size: int,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 num_queries_per_kv: int = 1) -> str | None:
        """None if the backend handles this configuration, else the reason it does not (a
        phrase that reads after the backend's name: "runs on cpu only, but device='cuda'")."""
        device_type = str(device).split(":")[0]
        if device_type not in cls.device_types:
            where = " and ".join(cls.device_types)
            return f"runs on {where} only, but device={device!r}"
        reason = cls.unavailable_reason(device_type)
        if reason is not None:
            return reason
        if dtype not in cls.dtypes:
            names = ", ".join(_dtype_name(d) for d in cls.dtypes)
            return f"supports dtype {names}, not {_dtype_name(dtype)}"
        if head_size < cls.min_head_size or (cls.max_head_size is not None and head_size > cls.max_head_size):
            upper = "" if cls.max_head_size is None else f" to {cls.max_head_size}"
            return f"supports head sizes {cls.min_head_size}{upper}, not {head_size}"
        if cls.block_sizes is not None and block_size not in cls.block_sizes:
            note = f" ({cls.block_size_note})" if cls.block_size_note else ""
            return (f"needs block_size in {', '.join(map(str, cls.block_sizes))}{note}, got {block_size}")
        if sliding_window is not None and not cls.supports_sliding_window:
            return f"does not support sliding-window attention (the model's window is {sliding_window})"
        if logits_soft_cap is not None and not cls.supports_logits_soft_cap:
            return f"does not support attention-logit soft-capping (the model caps at {logits_soft_cap})"
        if cls.max_queries_per_kv is not None and num_queries_per_kv > cls.max_queries_per_kv:
            return (f"supports at most {cls.max_queries_per_kv} query heads per KV head, "
                    f"the model has {num_queries_per_kv}")
        return None

    @classmethod
    def create(cls) -> "AttentionBackend":
        """An instance for the engine (backends needing a loaded kernel override this)."""
        return cls()

    # ------------------------------------------------------------------ operations
    def prepare(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> None:
        """Precompute per-step helpers into `meta.backend_state` (called once per step, before
        the layers run); `key_cache` is any layer's key cache, for its shape and dtype."""
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        key_cache: torch.Tensor,  # get_kv_cache_shape's layout
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Write k/v into the cache at meta.slot_mapping, then attend: each sequence's new
        tokens see its cached context and, causally, each other. `logits_soft_cap` (Gemma 2's
        `attn_logit_softcapping`; None: none) caps the scaled scores before masking and softmax,
        as transformers' eager attention does: scores = cap * tanh((q . k * scale) / cap). Only
        backends declaring `supports_logits_soft_cap` are given one (PagedAttention.attend
        passes it, as a keyword, only when it is not None)."""
        raise NotImplementedError

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer's K and V (copy-on-write); `kv_cache` is
        the runner's stacked [layers, 2, num_blocks, ...] tensor."""
        raise NotImplementedError

    @staticmethod
    def state_of(meta: AttentionMetadata, state_type: type[S]) -> S:
        """`meta.backend_state`, checked to be this backend's (prepare() ran for this step)."""
        state = meta.backend_state
        if not isinstance(state, state_type):
            raise RuntimeError(f"attention metadata holds {type(state).__name__}, not {state_type.__name__}: "
                               "call the backend's prepare(meta, key_cache) once per step before forward()")
        return state
