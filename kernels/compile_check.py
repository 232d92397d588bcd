"""Compile the production kernel variants for real GPUs — no GPU needed.

`triton.compile(..., target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to a cubin
on any machine. That catches what the interpreter cannot (a `tl.dot` with K < 16, an
unsupported dtype combination, too many registers), and `metadata.shared` is checked against
the card's shared-memory limit (the compiler does not reject excess itself).

What is compiled is what the JIT would compile: each variant is a launch recorded from the real
kernel wrapper (`unified_attention`, `split_kv_decode_attention`, `reshape_and_cache`,
`copy_blocks`) on tensors of production shapes, specialised by the JIT's own argument binder.
So the signature, the constexprs and the `tt.divisibility=16` attributes on 16-byte-aligned
pointers and multiple-of-16 integers are the ones a launch gets; without those attributes the
compiler emits scalar loads where the running kernel has vectorised ones, and the check would
measure a different kernel.

    python -m pagedbackend.kernels.compile_check          # every variant, sm_90 and sm_80
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from pagedbackend.kernels import cache_ops, paged_attention
from pagedbackend.kernels.layout import kv_cache_shape

# Shared memory per block (bytes) a kernel may use on each target.
SHARED_LIMIT = {90: 232448, 80: 166912}
TARGETS = (90, 80)
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The kernels the wrappers launch, by module: what `recorded_launches` intercepts.
_LAUNCHED = {cache_ops: ("_reshape_and_cache_kernel", "_copy_blocks_kernel"),
             paged_attention: ("_unified_attention_kernel", "_split_decode_kernel", "_split_reduce_kernel")}


@dataclass
class Launch:
    """One kernel launch as a wrapper made it: the @triton.jit object and its arguments."""

    kernel: Any
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclass(frozen=True)
class Specialization:
    """What the JIT derives from a launch's arguments. `key` is its compile-cache key (with the
    options, which the kernels here never vary): a launch with a new key is a new compile."""

    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list]
    key: tuple


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: Any):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append(Launch(self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, the kernel wrappers of cache_ops and paged_attention record their
    launches (into the yielded list) instead of running them: how compile_check learns exactly
    what a wrapper launches, and how tests see which specialisations a sequence of steps needs.
    Launches are recorded as the compiled path makes them, without the interpreter's
    workarounds, even under TRITON_INTERPRET=1. Not thread-safe: it swaps module attributes,
    and restores them on exit."""
    launches: list[Launch] = []
    saved = [(module, name, getattr(module, name)) for module, names in _LAUNCHED.items() for name in names]
    saved.append((paged_attention, "_interpreting", paged_attention._interpreting))
    try:
        for module, name, kernel in saved[:-1]:
            setattr(module, name, _Recorder(kernel, launches))
        paged_attention._interpreting = lambda: False
        yield launches
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


@functools.lru_cache(maxsize=None)
def jit_function(kernel: Any) -> JITFunction:
    """The JITFunction behind `kernel`: itself, or (under TRITON_INTERPRET=1, where @triton.jit
    gives an InterpretedFunction) one built from the same Python function and decorator options."""
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **kernel.kwargs)


@functools.lru_cache(maxsize=None)
def _binder(kernel: Any, capability: int) -> tuple[Any, Any]:
    backend = make_backend(GPUTarget("cuda", capability, 32))
    fn = jit_function(kernel)
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def jit_specialization(launch: Launch, capability: int = 90) -> Specialization:
    """Specialise a launch the way `JITFunction.run` does: the JIT's binder turns each argument
    into (type, attribute) — pointers and integers get "D" (tt.divisibility=16) when 16-byte
    aligned / a multiple of 16, an integer equal to 1 becomes a constexpr, parameters in
    `do_not_specialize` get neither — and signature, constexprs and attrs are packed as
    `JITFunction._pack_args` packs them (no kernel here takes tuple arguments)."""
    backend, binder = _binder(launch.kernel, capability)
    bound, specialization, _ = binder(*launch.args, **launch.kwargs)
    names = list(bound)
    signature = {name: spec[0] for name, spec in zip(names, specialization)}
    constexprs = {name: bound[name] for name, spec in zip(names, specialization) if spec[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec[1]) for i, spec in enumerate(specialization)
             if spec[0] != "constexpr" and isinstance(spec[1], str)}
    return Specialization(signature, constexprs, attrs, tuple(specialization))


@dataclass
class Variant:
    """A recorded production launch, ready to compile for a target."""

    launch: Launch
    spec: Specialization = field(init=False)

    def __post_init__(self) -> None:
        self.spec = jit_specialization(self.launch)

    @property
    def kernel(self) -> JITFunction:
        return jit_function(self.launch.kernel)

    @property
    def name(self) -> str:
        sig = self.spec.signature
        dtype = sig.get("q_ptr") or next(iter(sig.values()))
        parts = [f"{k}={v}" for k, v in self.spec.constexprs.items() if k not in ("PRECISION", "UPCAST")]
        return f"{self.launch.name}[{dtype}," + ",".join(parts) + "]"


def _tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # Never read (launches are recorded, not run); zeros keep the tensors cheap and defined.
    return torch.zeros(shape, dtype=dtype)


def _unified_launch(dtype: str, head_dim: int, block_size: int, group: int, prefill: bool, window: bool,
                    soft_cap: bool = False, num_kv_heads: int = 8) -> None:
    t = _TORCH[dtype]
    query_lens = [1, 37] if prefill else [1, 1]
    qsl = [0, query_lens[0], sum(query_lens)]
    q = _tensor((qsl[-1], num_kv_heads * group, head_dim), t)
    kc = _tensor(kv_cache_shape(4, num_kv_heads, block_size, head_dim), t)
    paged_attention.unified_attention(
        torch.empty_like(q), q, kc, torch.empty_like(kc), _tensor((2, 128), torch.int32),
        torch.tensor([100, 1000], dtype=torch.int32), torch.tensor(qsl, dtype=torch.int32), qsl, max(query_lens),
        head_dim ** -0.5, 4096 if window else None, logits_soft_cap=50.0 if soft_cap else None)


def _split_launch(dtype: str, head_dim: int, group: int, num_splits: int, soft_cap: bool = False,
                  num_kv_heads: int = 8, block_size: int = 64) -> None:
    t = _TORCH[dtype]
    q = _tensor((2, num_kv_heads * group, head_dim), t)
    kc = _tensor(kv_cache_shape(4, num_kv_heads, block_size, head_dim), t)
    paged_attention.split_kv_decode_attention(
        torch.empty_like(q), q, kc, torch.empty_like(kc), _tensor((2, 128), torch.int32),
        torch.tensor([4096, 3000], dtype=torch.int32), 4096, head_dim ** -0.5, num_splits,
        logits_soft_cap=50.0 if soft_cap else None)


def _cache_launches(dtype: str, num_kv_heads: int, head_dim: int, block_size: int = 16) -> None:
    t = _TORCH[dtype]
    k = _tensor((37, num_kv_heads, head_dim), t)
    kc = _tensor(kv_cache_shape(4, num_kv_heads, block_size, head_dim), t)
    cache_ops.reshape_and_cache(k, torch.empty_like(k), kc, torch.empty_like(kc), torch.arange(37, dtype=torch.int64))
    stacked = _tensor((2, 2, *kv_cache_shape(4, num_kv_heads, block_size, head_dim)), t)
    cache_ops.copy_blocks(stacked, torch.tensor([[0, 1]], dtype=torch.int64))


def production_variants() -> list[Variant]:
    """Every value of every dimension, and the largest tiles (head_dim 256, block 64, fp32,
    prefill rows) where shared memory runs out first; launches that specialise identically
    (a split count is not a constexpr, say) are compiled once."""
    with recorded_launches() as launches:
        for dtype, head_dim in itertools.product(("fp16", "bf16", "fp32"), (64, 80, 96, 128, 256)):
            _unified_launch(dtype, head_dim, 16, 4, prefill=True, window=False)
        for block_size, dtype in itertools.product((32, 64, 128), ("fp16", "fp32")):
            _unified_launch(dtype, 256, block_size, 1, prefill=True, window=False)
        for group in (1, 2, 4, 8):
            _unified_launch("bf16", 128, 16, group, prefill=False, window=False)
        _unified_launch("fp16", 128, 32, 4, prefill=True, window=True)
        # Gemma 2's shapes: head_dim 256, GQA 2, a sliding window on every other layer, soft-capped.
        for prefill, window in itertools.product((True, False), (True, False)):
            _unified_launch("bf16", 256, 16, 2, prefill=prefill, window=window, soft_cap=True)
        _split_launch("bf16", 256, 2, 64, soft_cap=True)
        for dtype, head_dim in itertools.product(("fp16", "bf16", "fp32"), (64, 128, 256)):
            _split_launch(dtype, head_dim, 8, 64 if head_dim == 256 else 4)
        for dtype in ("fp16", "bf16", "fp32"):
            _cache_launches(dtype, 8, 128)
            _cache_launches(dtype, 1, 80)
    variants: dict[tuple[str, tuple], Variant] = {}
    for launch in launches:
        variant = Variant(launch)
        variants.setdefault((launch.name, variant.spec.key), variant)
    return list(variants.values())


def compile_variant(variant: Variant, capability: int):
    """Compile `variant` for sm_`capability` with the specialisation the JIT would give it there."""
    spec = jit_specialization(variant.launch, capability)
    return triton.compile(ASTSource(variant.kernel, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
                          target=GPUTarget("cuda", capability, 32))


def main() -> int:
    failures = 0
    for capability in TARGETS:
        for variant in production_variants():
            start = time.perf_counter()
            try:
                compiled = compile_variant(variant, capability)
            except Exception as e:  # noqa: BLE001 - report every failure, not just the first
                failures += 1
                print(f"sm_{capability} FAIL {variant.name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            shared = compiled.metadata.shared
            ok = shared <= SHARED_LIMIT[capability]
            failures += not ok
            print(f"sm_{capability} {'ok  ' if ok else 'SMEM'} {shared:>7} B  {time.perf_counter() - start:5.2f}s  {variant.name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
