"""Fused element-wise kernels for the decoder layer's GPU path, one launch each where eager
PyTorch needs several (vLLM's layernorm, rotary and activation kernels play the same role):

* `rms_norm`: RMSNorm of each row, or of each head of a `[T, heads, D]` view (Qwen3's q and k
  norms, each head with its own of two weights, one launch).
* `fused_add_rms_norm`: `residual += x; x = rms_norm(residual)`, both in place, so the residual
  stream costs no launch of its own.
* `fused_add_layer_norm`: the same residual step with LayerNorm (GPT-2).
* `rotary_embedding_`: rotates q and k heads in place, reading cos/sin straight from the model's
  fp32 tables by position (no per-step gather), rotate-half (NeoX) or interleaved (GPT-J) pairs,
  partial rotary (the dims past `rotary_dim` are left alone).
* `silu_and_mul`: SwiGLU of a fused `[gate | up]` projection into a new `[T, inter]` tensor.

Numerics follow the PyTorch reference that transformers runs, not just its maths: statistics
in fp32, and every intermediate the reference materialises in the model dtype is rounded to
that dtype here too (`_round`), so bf16/fp16 results differ from eager PyTorch only by the
reduction order of the mean. In fp32 the roundings are no-ops. (Compiled, Triton may contract
a multiply and an add into one FMA; that is within the tolerance GPU results are held to.)

Every function takes tensors whose last dimension has unit stride and any row stride, so the
q/k heads of a fused qkv projection are rotated where they lie; each launches on its tensors'
device (pagedbackend.kernels.launch). Tests run these kernels in Triton's interpreter on CPU
tensors against float64 references, and compile them for sm_90 to check for spills.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from pagedbackend.kernels.launch import on_device_of

# Elements one program holds per operand tile of rotary heads: keeps registers in bounds.
_MAX_TILE = 2048


def _num_warps(tile: int) -> int:
    """Warps for a program holding `tile` elements per operand: 8 per thread, as vLLM's 1024-thread
    blocks do for an 8192-wide row (4 warps for a 16K-element row would hold 128 per thread and spill)."""
    return max(1, min(16, tile // 256))


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to `dtype` and back to fp32: where the reference stores an intermediate."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _add_residual(x_ptr, res_ptr, t, stride_xt, stride_rt, offs, mask):
    """Row `t`'s res = x + res, stored back into the residual in the model dtype (as the reference
    keeps the residual stream), returned in fp32 for the norm that follows."""
    dtype = res_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)
    s = _round(x + r, dtype)
    tl.store(res_ptr + t * stride_rt + offs, s.to(dtype), mask=mask)
    return s


@triton.jit
def _rms_norm_kernel(
    x_ptr, out_ptr, w_ptr, w2_ptr, split_head, num_heads, n_cols, eps,
    stride_xt, stride_xh, stride_ot, stride_oh,
    BLOCK: tl.constexpr,
):
    """One program per (token, head) row: out = w * (x * rsqrt(mean(x^2) + eps)).to(dtype),
    with w the second weight for heads from `split_head` on (q and k heads, one launch)."""
    row = tl.program_id(0)
    t = (row // num_heads).to(tl.int64)
    h = (row % num_heads).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if h < split_head:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.load(w2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _round(x * rstd, dtype) * w
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs, y.to(dtype), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, n_cols, eps, stride_xt, stride_rt,
    BLOCK: tl.constexpr,
):
    """One program per row: res = (x + res).to(dtype); x = rms_norm(res), both stored in place."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    s = _add_residual(x_ptr, res_ptr, t, stride_xt, stride_rt, offs, mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _round(s * rstd, res_ptr.dtype.element_ty) * w
    tl.store(x_ptr + t * stride_xt + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_layer_norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, n_cols, eps, stride_xt, stride_rt,
    BLOCK: tl.constexpr,
):
    """One program per row: res = (x + res).to(dtype); x = layer_norm(res) * w + b, in place."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    s = _add_residual(x_ptr, res_ptr, t, stride_xt, stride_rt, offs, mask)
    mean = tl.sum(s, axis=0) / n_cols
    centred = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + t * stride_xt + offs, (centred * rstd * w + b).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr, pos_ptr, cos_ptr, sin_ptr, num_heads, stride_xt, stride_xh, stride_cache,
    ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr,
):
    """Program (token, block of heads): rotate pairs (x1, x2) by the token's angle, in place:
    [x1 cos - x2 sin, x2 cos + x1 sin]. NeoX pairs dims (i, i + rot/2), GPT-J (2i, 2i + 1)."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF_PAD)
    dtype = x_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # The reference casts the fp32 tables to the model dtype before multiplying.
    cos = _round(tl.load(cos_ptr + pos * stride_cache + i, mask=i < ROT_HALF, other=0.0), dtype)
    sin = _round(tl.load(sin_ptr + pos * stride_cache + i, mask=i < ROT_HALF, other=0.0), dtype)
    if IS_NEOX:
        d1 = i
        d2 = i + ROT_HALF
    else:
        d1 = 2 * i
        d2 = 2 * i + 1
    mask = (heads < num_heads)[:, None] & (i < ROT_HALF)[None, :]
    base = x_ptr + t * stride_xt + heads.to(tl.int64)[:, None] * stride_xh
    x1 = tl.load(base + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = _round(x1 * cos[None, :], dtype) - _round(x2 * sin[None, :], dtype)
    o2 = _round(x2 * cos[None, :], dtype) + _round(x1 * sin[None, :], dtype)
    tl.store(base + d1[None, :], o1.to(dtype), mask=mask)
    tl.store(base + d2[None, :], o2.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, n_cols, stride_xt, stride_ot,
    BLOCK: tl.constexpr,
):
    """Program (token, column block): out = silu(gate).to(dtype) * up, gate/up the row's halves."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + t * stride_ot + offs, (act * up).to(dtype), mask=mask)


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must have unit stride (got strides {tuple(x.stride())})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
             second_weight: torch.Tensor | None = None, split_head: int = 0) -> torch.Tensor:
    """RMSNorm over the last dimension of `x`, `[T, D]` or `[T, heads, D]` (any row/head
    strides); `out` (default: a new row-major tensor) may be `x` itself. With `second_weight`,
    heads `split_head:` are scaled by it instead of `weight`: Qwen3's q and k norms, which
    differ only in their weights, in one launch over the q/k heads of the projection."""
    _check_rows("rms_norm x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"rms_norm: x must be [T, D] or [T, heads, D], got shape {tuple(x.shape)}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_rows("rms_norm out", out)
    view_x = x if x.dim() == 3 else x.unsqueeze(1)
    view_o = out if out.dim() == 3 else out.unsqueeze(1)
    num_tokens, num_heads, n_cols = view_x.shape
    if second_weight is None:
        second_weight, split_head = weight, num_heads
    if num_tokens * num_heads == 0:
        return out
    with on_device_of(view_x):
        _rms_norm_kernel[(num_tokens * num_heads,)](
            view_x, view_o, weight, second_weight, split_head, num_heads, n_cols, eps,
            view_x.stride(0), view_x.stride(1), view_o.stride(0), view_o.stride(1),
            BLOCK=triton.next_power_of_2(n_cols), num_warps=_num_warps(triton.next_power_of_2(n_cols)),
        )
    return out


def _fused_add_norm(name: str, kernel: Any, x: torch.Tensor, residual: torch.Tensor, params: tuple,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a fused residual-add + norm kernel over `[T, D]` rows, in place."""
    _check_rows(f"{name} x", x)
    _check_rows(f"{name} residual", residual)
    if x.shape != residual.shape or x.dim() != 2:
        raise ValueError(f"{name}: x {tuple(x.shape)} and residual {tuple(residual.shape)} must both be [T, D]")
    num_tokens, n_cols = x.shape
    if num_tokens:
        block = triton.next_power_of_2(n_cols)
        with on_device_of(x):
            kernel[(num_tokens,)](x, residual, *params, n_cols, eps, x.stride(0), residual.stride(0),
                                  BLOCK=block, num_warps=_num_warps(block))
    return x, residual


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual += x`, then `x = rms_norm(residual)`, in one launch and in place (vLLM's
    semantics): returns `(x, residual)`, the same tensors, updated. Both `[T, D]`."""
    return _fused_add_norm("fused_add_rms_norm", _fused_add_rms_norm_kernel, x, residual, (weight,), eps)


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual += x`, then `x = layer_norm(residual) * weight + bias`, in one launch and in
    place: returns `(x, residual)`, the same tensors, updated. Both `[T, D]`."""
    return _fused_add_norm("fused_add_layer_norm", _fused_add_layer_norm_kernel, x, residual, (weight, bias), eps)


def rotary_embedding_(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                      rotary_dim: int, is_neox_style: bool = True) -> torch.Tensor:
    """Rotate `x`, `[T, heads, head_dim]` (q and k heads side by side, as in a fused qkv
    projection), in place; token t takes row `positions[t]` of `cos_cache`/`sin_cache`,
    `[max_position, rotary_dim / 2]`. Dims past `rotary_dim` are unchanged. Returns `x`."""
    _check_rows("rotary_embedding_ x", x)
    num_tokens, num_heads, head_dim = x.shape
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_embedding_: rotary_dim {rotary_dim} must be even and in (0, {head_dim}]")
    if cos_cache.shape != sin_cache.shape or cos_cache.shape[-1] != rotary_dim // 2 or not cos_cache.is_contiguous() \
            or not sin_cache.is_contiguous():
        raise ValueError(f"rotary_embedding_: cos/sin tables must be contiguous [max_position, {rotary_dim // 2}]")
    if num_tokens == 0:
        return x
    half_pad = triton.next_power_of_2(rotary_dim // 2)
    block_h = min(triton.next_power_of_2(num_heads), max(1, _MAX_TILE // half_pad))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    with on_device_of(x):
        _rotary_kernel[grid](
            x, positions, cos_cache, sin_cache, num_heads, x.stride(0), x.stride(1), cos_cache.stride(0),
            ROT_HALF=rotary_dim // 2, HALF_PAD=half_pad, BLOCK_H=block_h, IS_NEOX=is_neox_style,
            num_warps=_num_warps(block_h * half_pad),
        )
    return x


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of a fused `[T, 2 * inter]` = `[gate | up]` projection: `silu(gate) * up`, into
    `out` (`[T, inter]`, default a new tensor)."""
    _check_rows("silu_and_mul x", x)
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"silu_and_mul: the last dimension ({width}) must be [gate | up], even")
    n_cols = width // 2
    if out is None:
        out = torch.empty((num_tokens, n_cols), dtype=x.dtype, device=x.device)
    _check_rows("silu_and_mul out", out)
    if out.shape != (num_tokens, n_cols):
        raise ValueError(f"silu_and_mul: out must be {(num_tokens, n_cols)}, got {tuple(out.shape)}")
    if num_tokens:
        block = min(triton.next_power_of_2(n_cols), 1024)
        with on_device_of(x):
            _silu_and_mul_kernel[(num_tokens, triton.cdiv(n_cols, block))](
                x, out, n_cols, x.stride(0), out.stride(0), BLOCK=block, num_warps=_num_warps(block),
            )
    return out
