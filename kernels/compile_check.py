"""Compile the production kernel variants for real GPUs — no GPU needed.

`triton.compile(..., target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to a cubin
on any machine. That catches what the interpreter cannot (a `tl.dot` with K < 16, an
unsupported dtype combination, too many registers), and `metadata.shared` is checked against
the card's shared-memory limit (the compiler does not reject excess itself).

    python -m pagedbackend.kernels.compile_check          # every variant, sm_90 and sm_80
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedbackend.kernels.cache_ops import _copy_blocks_kernel, _reshape_and_cache_kernel
import torch

from pagedbackend.kernels.paged_attention import (_split_decode_kernel, _split_reduce_kernel,
                                                  _unified_attention_kernel, kv_sub_tile, query_block_shape)

# Shared memory per block (bytes) a kernel may use on each target.
SHARED_LIMIT = {90: 232448, 80: 166912}
TARGETS = (90, 80)
_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Variant:
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]

    @property
    def name(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items() if k not in ("PRECISION", "UPCAST")]
        return f"{self.kernel.__name__}[{self.signature['q_ptr' if 'q_ptr' in self.signature else next(iter(self.signature))]}," \
               + ",".join(parts) + "]"


def _with_constexprs(sig: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    return {**sig, **{name: "constexpr" for name in constexprs}}


def unified_variant(dtype: str, head_dim: int, block_size: int, group: int, prefill: bool, window: bool,
                    soft_cap: bool = False) -> Variant:
    block_m, block_q = query_block_shape(group, 2 if prefill else 1, head_dim)
    ptr = _PTR[dtype]
    sig = {"out_ptr": ptr, "q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "block_tables_ptr": "*i32",
           "seq_lens_ptr": "*i32", "query_start_ptr": "*i32", "prog_seq_ptr": "*i32", "prog_qoff_ptr": "*i32",
           "scale": "fp32", "sliding_window": "i32", "soft_cap": "fp32", "stride_qt": "i32", "stride_qh": "i32",
           "stride_ot": "i32", "stride_oh": "i32", "stride_kb": "i64", "stride_kh": "i32", "stride_kn": "i32",
           "stride_bt": "i32"}
    const = {"GROUP": group, "BLOCK_M": block_m, "BLOCK_Q": block_q, "HEAD_DIM": head_dim,
             "D_PAD": triton.next_power_of_2(head_dim), "BLOCK_SIZE": block_size,
             "BLOCK_N": kv_sub_tile(block_size, head_dim, _TORCH[dtype]), "USE_WINDOW": window,
             "USE_SOFT_CAP": soft_cap, "UPCAST": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    return Variant(_unified_attention_kernel, _with_constexprs(sig, const), const)


def split_variants(dtype: str, head_dim: int, group: int, num_splits: int,
                   soft_cap: bool = False) -> list[Variant]:
    ptr = _PTR[dtype]
    d_pad = triton.next_power_of_2(head_dim)
    sig = {"part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "q_ptr": ptr, "k_cache_ptr": ptr,
           "v_cache_ptr": ptr, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "scale": "fp32",
           "sliding_window": "i32", "soft_cap": "fp32", "num_seqs": "i32", "stride_qt": "i32", "stride_qh": "i32",
           "stride_kb": "i64", "stride_kh": "i32", "stride_kn": "i32", "stride_bt": "i32"}
    const = {"NUM_HEADS": 8 * group, "GROUP": group, "BLOCK_M": max(16, triton.next_power_of_2(group)),
             "HEAD_DIM": head_dim, "D_PAD": d_pad, "BLOCK_SIZE": 64, "BLOCK_N": kv_sub_tile(64, head_dim, _TORCH[dtype]),
             "BLOCKS_PER_SPLIT": 16, "USE_WINDOW": False, "USE_SOFT_CAP": soft_cap, "UPCAST": False,
             "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    rsig = {"out_ptr": ptr, "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "num_seqs": "i32",
            "stride_ot": "i32", "stride_oh": "i32"}
    rconst = {"NUM_HEADS": 8 * group, "NUM_SPLITS": num_splits, "HEAD_DIM": head_dim, "D_PAD": d_pad}
    return [Variant(_split_decode_kernel, _with_constexprs(sig, const), const),
            Variant(_split_reduce_kernel, _with_constexprs(rsig, rconst), rconst)]


def cache_variants(dtype: str, num_kv_heads: int, head_dim: int) -> list[Variant]:
    ptr = _PTR[dtype]
    sig = {"key_ptr": ptr, "value_ptr": ptr, "key_cache_ptr": ptr, "value_cache_ptr": ptr, "slot_ptr": "*i64",
           "num_tokens": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
           "stride_cb": "i64", "stride_ch": "i32", "stride_cn": "i32"}
    const = {"NUM_KV_HEADS": num_kv_heads, "HEADS_PAD": triton.next_power_of_2(num_kv_heads), "HEAD_DIM": head_dim,
             "D_PAD": triton.next_power_of_2(head_dim), "BLOCK_SIZE": 16, "BLOCK_T": 16}
    csig = {"cache_ptr": ptr, "pairs_ptr": "*i64", "slab_stride": "i64", "block_numel": "i32"}
    cconst = {"BLOCK": 1024}
    return [Variant(_reshape_and_cache_kernel, _with_constexprs(sig, const), const),
            Variant(_copy_blocks_kernel, _with_constexprs(csig, cconst), cconst)]


def production_variants() -> list[Variant]:
    """Every value of every dimension, and the largest tiles (head_dim 256, block 64, fp32,
    prefill rows) where shared memory runs out first."""
    out = []
    for dtype, head_dim in itertools.product(("fp16", "bf16", "fp32"), (64, 80, 96, 128, 256)):
        out.append(unified_variant(dtype, head_dim, 16, 4, prefill=True, window=False))
    for block_size, dtype in itertools.product((32, 64, 128), ("fp16", "fp32")):
        out.append(unified_variant(dtype, 256, block_size, 1, prefill=True, window=False))
    for group in (1, 2, 4, 8):
        out.append(unified_variant("bf16", 128, 16, group, prefill=False, window=False))
    out.append(unified_variant("fp16", 128, 32, 4, prefill=True, window=True))
    # Gemma 2's shapes: head_dim 256, GQA 2, a sliding window on every other layer, soft-capped.
    for prefill, window in itertools.product((True, False), (True, False)):
        out.append(unified_variant("bf16", 256, 16, 2, prefill=prefill, window=window, soft_cap=True))
    out += split_variants("bf16", 256, 2, 64, soft_cap=True)
    for dtype, head_dim in itertools.product(("fp16", "bf16", "fp32"), (64, 128, 256)):
        out += split_variants(dtype, head_dim, 8, 64 if head_dim == 256 else 4)
    for dtype in ("fp16", "bf16", "fp32"):
        out += cache_variants(dtype, 8, 128) + cache_variants(dtype, 1, 80)
    return out


def compile_variant(variant: Variant, capability: int):
    return triton.compile(ASTSource(variant.kernel, variant.signature, constexprs=variant.constexprs),
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
