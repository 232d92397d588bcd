"""Triton kernels that move KV-cache data: writing new tokens by slot, copying whole blocks.

Layout: pagedbackend.kernels.layout (per layer `[num_blocks, num_kv_heads, block_size, head_dim]`;
the runner stacks all layers as `[layers, 2, num_blocks, ...]`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedbackend.kernels.launch import on_device_of


# num_tokens changes every step: not specialised on (== 1, % 16), so it never causes a recompile.
@triton.jit(do_not_specialize=["num_tokens"])
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cn,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """A program writes BLOCK_T tokens of one KV head (grid: token blocks x KV heads), so its
    tile is BLOCK_T x D_PAD whatever the number of heads: holding every head in one program
    spilled ~5 KB per thread at 32 KV heads."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    keep = (t < num_tokens) & (slot >= 0)  # a negative slot means: do not write this token
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    d = tl.arange(0, D_PAD)
    mask = keep[:, None] & (d < HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)
    dst = (block * stride_cb + head * stride_ch + offset * stride_cn)[:, None] + d[None, :]
    k = tl.load(key_ptr + (t64 * stride_kt + head * stride_kh)[:, None] + d[None, :], mask=mask)
    tl.store(key_cache_ptr + dst, k, mask=mask)
    v = tl.load(value_ptr + (t64 * stride_vt + head * stride_vh)[:, None] + d[None, :], mask=mask)
    tl.store(value_cache_ptr + dst, v, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, block_t: int = 16) -> None:
    """Write key/value `[T, kv_heads, head_dim]` into the caches at `slot_mapping[T]` (a
    negative slot is skipped)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    _, _, block_size, _ = key_cache.shape
    assert key.stride(2) == 1 and value.stride(2) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    if num_tokens == 0:
        return
    grid = (triton.cdiv(num_tokens, block_t), num_kv_heads)
    with on_device_of(key_cache):
        _reshape_and_cache_kernel[grid](
            key, value, key_cache, value_cache, slot_mapping, num_tokens,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, BLOCK_T=block_t,
        )


@triton.jit
def _copy_blocks_kernel(cache_ptr, pairs_ptr, slab_stride, block_numel, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    slab = tl.program_id(1).to(tl.int64)  # one (layer, K or V) slab of the stacked cache
    chunk = tl.program_id(2)
    src = tl.load(pairs_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(pairs_ptr + 2 * pair + 1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    base = cache_ptr + slab * slab_stride
    tl.store(base + dst * block_numel + offs, tl.load(base + src * block_numel + offs, mask=mask), mask=mask)


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor, block: int = 1024) -> None:
    """Copy blocks `pairs[:, 0] -> pairs[:, 1]` in every layer's K and V, in one launch.
    `kv_cache` is the stacked `[layers, 2, num_blocks, kv_heads, block_size, head_dim]` tensor."""
    assert kv_cache.is_contiguous() and pairs.dim() == 2 and pairs.shape[1] == 2
    if pairs.shape[0] == 0:
        return
    layers, two, num_blocks = kv_cache.shape[:3]
    block_numel = kv_cache[0, 0, 0].numel()
    grid = (pairs.shape[0], layers * two, triton.cdiv(block_numel, block))
    with on_device_of(kv_cache):
        _copy_blocks_kernel[grid](kv_cache, pairs.contiguous(), num_blocks * block_numel, block_numel, BLOCK=block)
