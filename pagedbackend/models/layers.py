"""Building blocks shared by the model families.

Linear layers are written tensor-parallel style (vLLM's column/row split): a column-parallel
layer holds a slice of the output features, a row-parallel one a slice of the input features
and sums partial results across ranks. With one rank they are plain linear layers; each owns a
`load()` that takes a full checkpoint tensor and keeps this rank's slice, so the loading code
does not change when tensor parallelism arrives. Fused projections (q/k/v, gate/up) are one
matmul, which is also what makes them fast on CPU.

Two code paths, chosen per tensor by `gpu_path()`: on CUDA the element-wise work of a decoder
layer goes to the fused Triton kernels of pagedbackend.kernels.fused_ops (residual add + RMSNorm,
SiLU-and-mul, in-place rotary: one launch each, where eager PyTorch needs up to eight); on the
CPU it stays in PyTorch, in the operation order of transformers' reference so fp32 greedy
tokens stay identical, with the temporaries done in place. `force_gpu_path()` runs the CUDA
path on CPU tensors (Triton's interpreter, TRITON_INTERPRET=1): how tests check and count it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pagedbackend.distributed import (divide, get_tp_rank, get_tp_size, padded_vocab_size, tp_all_gather,
                                      tp_all_reduce)


_FORCED_GPU_PATH = False
_FUSED_OPS: ModuleType | None = None


@contextmanager
def force_gpu_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors take the CUDA code path: plain F.linear, Triton kernels
    (which need TRITON_INTERPRET=1 on the CPU). Process-wide, for tests and launch counting."""
    global _FORCED_GPU_PATH
    previous, _FORCED_GPU_PATH = _FORCED_GPU_PATH, enabled
    try:
        yield
    finally:
        _FORCED_GPU_PATH = previous


def gpu_path(x: torch.Tensor) -> bool:
    """Whether `x` takes the CUDA code path (a CUDA tensor, or inside `force_gpu_path()`)."""
    return x.is_cuda or _FORCED_GPU_PATH


def fused_ops() -> ModuleType:
    """pagedbackend.kernels.fused_ops, imported on first use: it needs triton, which CPU-only
    installs may not have and never reach."""
    global _FUSED_OPS
    if _FUSED_OPS is None:
        from pagedbackend.kernels import fused_ops as module

        _FUSED_OPS = module
    return _FUSED_OPS


# oneDNN's fp32 GEMM (torch's mkldnn linear, what vLLM's CPU build uses) runs ~2.2x the rate of
# the MKL torch.mm on the dev box's AMD EPYC (AVX-512) at this engine's shapes, same ~1e-6
# relative error (benchmarks/RESULTS.md). It builds one primitive per distinct row count and
# does not give their memory back (RSS grew ~3.9 MiB per new count, without bound, even with its
# cache capacity lowered), so rows are padded to a bounded set of sizes: `onednn_rows`.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_STEPS_PER_OCTAVE = 8
ONEDNN_PACK_ROWS = 64  # the batch size packed weights are laid out for (they serve every size)
ONEDNN_MIN_ROWS = 16


def onednn_rows(rows: int) -> int:
    """The padded row count for `rows`: itself up to 16 (where a GEMM is bound by streaming the
    weight, and padding would still cost), then a multiple of 16 up to 128, then one of 8 evenly
    spaced sizes per power of two: at most 1/8 of a larger GEMM is padding, and a 2048-token
    budget meets 55 sizes per weight shape."""
    if rows <= ONEDNN_MIN_ROWS:
        return rows
    step = max(ONEDNN_MIN_ROWS, (1 << (rows - 1).bit_length()) // (2 * ONEDNN_STEPS_PER_OCTAVE))
    return -(-rows // step) * step


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ b). On the CPU in fp32 through oneDNN, rows padded to `onednn_rows`; other CPU
    dtypes as (W @ x^T)^T.

    The transposed form has the CPU BLAS see the weight's many output rows as M and the few
    tokens of a decode step as N: 1.3-1.5x faster than the plain form for batches of 32-128
    tokens; its result is a transposed view, which the next linear layer consumes without a
    copy. On GPUs the plain form keeps each head's vector contiguous, which the attention
    kernels' loads need.
    """
    if gpu_path(x):
        return F.linear(x, weight.to_dense() if weight.is_mkldnn else weight, bias)
    if weight.is_mkldnn or (ONEDNN_LINEAR and x.dtype == torch.float32 and x.dim() >= 2):
        if x.dim() > 2:
            return linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
        rows = x.shape[0]
        padded = onednn_rows(rows)
        if padded != rows or not x.is_contiguous():
            full = x.new_empty(padded, x.shape[1])
            full[:rows] = x
            full[rows:] = 0
            x = full
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")[:rows]
    y = torch.mm(weight, x.t()).t()
    return y if bias is None else y + bias


def _copy(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight {name}: checkpoint shape {tuple(loaded.shape)} does not match the "
                         f"model's {tuple(param.shape)} (is config.json right for these weights?)")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks.

    `output_sizes` lists the logical projections fused in this layer (e.g. q, k, v); each is
    split across ranks separately, so `load(tensor, shard=i)` fills projection i. `replicas`
    (per projection) > 1 means more ranks than heads: groups of that many ranks hold the same
    slice (KV heads when tensor_parallel_size > num_key_value_heads).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, replicas: list[int] | None = None):
        super().__init__()
        tp = get_tp_size()
        self.input_size = input_size
        self.replicas = replicas or [1] * len(output_sizes)
        self.output_sizes = [divide(s * r, tp, "output size") for s, r in zip(output_sizes, self.replicas)]
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        out = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def load(self, loaded: torch.Tensor, shard: int = 0, is_bias: bool = False, name: str = "") -> None:
        size, offset = self.output_sizes[shard], self.offsets[shard]
        start = (get_tp_rank() // self.replicas[shard]) * size
        part = loaded.narrow(0, start, size) if get_tp_size() > 1 else loaded
        target = self.bias if is_bias else self.weight
        assert target is not None, f"{name}: layer has no bias"
        _copy(target.narrow(0, offset, size), part, name)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split across ranks; partial sums are
    all-reduced, and the bias is added once after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.input_size = divide(input_size, get_tp_size(), "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:  # the bias goes into the matmul (one addmm on CUDA), as in F.linear
            return linear(x, self.weight, self.bias)
        y = tp_all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load(self, loaded: torch.Tensor, shard: int = 0, is_bias: bool = False, name: str = "") -> None:
        if is_bias:
            assert self.bias is not None, f"{name}: layer has no bias"
            _copy(self.bias, loaded, name)
            return
        if get_tp_size() > 1:
            loaded = loaded.narrow(1, get_tp_rank() * self.input_size, self.input_size)
        _copy(self.weight, loaded, name)


class _VocabSlice:
    """Which rows of the (padded) vocabulary this rank holds: all of them with one rank."""

    def __init__(self, vocab_size: int, parallel: bool):
        tp = get_tp_size() if parallel else 1
        self.vocab_size = vocab_size
        self.parallel = tp > 1
        self.rows = padded_vocab_size(vocab_size, tp) // tp
        self.start = get_tp_rank() * self.rows if self.parallel else 0

    def load(self, weight: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
        if not self.parallel:
            _copy(weight, loaded, name)
            return
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"weight {name}: checkpoint has {loaded.shape[0]} rows, the model's vocab_size is "
                             f"{self.vocab_size} (is config.json right for these weights?)")
        part = loaded[self.start:self.start + self.rows]
        weight.data.zero_()  # the padding rows (past the vocabulary) stay zero
        _copy(weight[:part.shape[0]], part, name)


class VocabEmbedding(nn.Module):
    """Token embedding, vocab-parallel: each rank holds a slice of the (padded) vocabulary's
    rows; ids outside it look up zeros, and the all-reduce sums the one rank that had each id.
    `parallel=False` keeps a full copy on every rank (GPT-2's position embedding)."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: bool = True):
        super().__init__()
        self.slice = _VocabSlice(vocab_size, parallel)
        self.weight = nn.Parameter(torch.empty(self.slice.rows, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.slice.parallel:
            return F.embedding(ids, self.weight)
        local = ids - self.slice.start
        outside = (local < 0) | (local >= self.slice.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return tp_all_reduce(out)

    def load(self, loaded: torch.Tensor, shard: int = 0, is_bias: bool = False, name: str = "") -> None:
        self.slice.load(self.weight, loaded, name)


class LMHead(nn.Module):
    """Projection to vocabulary logits, tied to the embedding when the checkpoint says so.
    Vocab-parallel like the embedding: each rank computes its slice of the logits, and every
    rank gathers the whole row (so sampling is the same computation on every rank)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.slice = _VocabSlice(vocab_size, parallel=True)
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(self.slice.rows, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Contiguous rows: the sampler reduces over the vocabulary, which is slow on a transposed view.
        logits = linear(hidden, self.weight)
        if not self.slice.parallel:
            return logits.contiguous()
        return tp_all_gather(logits)[:, :self.slice.vocab_size].contiguous()

    def load(self, loaded: torch.Tensor, shard: int = 0, is_bias: bool = False, name: str = "") -> None:
        self.slice.load(self.weight, loaded, name)


class RMSNorm(nn.Module):
    """Computed in fp32 and cast back, as Llama's reference does (matters for parity).

    `forward(x)` normalises x (`[..., hidden]`); `forward(x, residual)` is the pre-norm
    residual step `residual += x; return rms_norm(residual), residual` (vLLM's
    fused_add_rms_norm), updating `residual` in place: one kernel on the GPU path, and on the
    CPU no separate `h + x` tensor per layer. x itself may be overwritten (the GPU kernel
    stores the normalised rows into it), so pass a tensor the caller no longer needs.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if gpu_path(x):
            kernels = fused_ops()
            if x.stride(-1) != 1:
                x = x.contiguous()
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._torch_norm(x)
        residual.add_(x)  # == residual + x, bit for bit (IEEE addition commutes)
        return self._torch_norm(residual), residual

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm, same operations in the same order (the mean is the same
        reduction, the products commute), with the [T, 1] temporaries and the weight product
        done in place. Never writes to x (x.float() is x itself in fp32)."""
        dtype = x.dtype
        x32 = x.float()
        scale = x32.pow(2).mean(-1, keepdim=True)
        scale.add_(self.eps).rsqrt_()
        y = (x32 * scale).to(dtype)
        if self.weight.dtype == y.dtype:
            return y.mul_(self.weight)
        return self.weight * y  # the reference's type promotion, for a weight kept in another dtype

    def load(self, loaded: torch.Tensor, shard: int = 0, is_bias: bool = False, name: str = "") -> None:
        _copy(self.weight, loaded, name)


def qk_norm_(qk: torch.Tensor, num_q_heads: int, q_norm: RMSNorm, k_norm: RMSNorm) -> torch.Tensor:
    """Per-head RMSNorm of q and k (Qwen3), in place in `qk` (`[T, q_heads + k_heads, head_dim]`,
    heads side by side as the qkv projection lays them out); returns qk. One kernel for both on
    the GPU path (the norms share eps and differ only in weight), reading and writing the
    projection where it lies."""
    if gpu_path(qk):
        if qk.stride(-1) != 1 or q_norm.eps != k_norm.eps:
            raise ValueError("qk_norm_: needs unit-stride heads and one eps for q and k")
        return fused_ops().rms_norm(qk, q_norm.weight, q_norm.eps, out=qk, second_weight=k_norm.weight,
                                    split_head=num_q_heads)
    q, k = qk[:, :num_q_heads], qk[:, num_q_heads:]
    q.copy_(q_norm(q))
    k.copy_(k_norm(k))
    return qk


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with the residual step of RMSNorm: `forward(x, residual)` is
    `residual += x; return layer_norm(residual), residual`, one kernel on the GPU path (x may be
    overwritten there); on the CPU the in-place add, then PyTorch's layer norm."""

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return super().forward(x)
        if gpu_path(x) and self.weight is not None and self.bias is not None:
            return fused_ops().fused_add_layer_norm(x if x.stride(-1) == 1 else x.contiguous(), residual,
                                                    self.weight, self.bias, self.eps)
        residual.add_(x)  # == residual + x, bit for bit
        return super().forward(residual), residual

    def load(self, loaded: torch.Tensor, shard: int = 0, is_bias: bool = False, name: str = "") -> None:
        _copy(self.bias if is_bias else self.weight, loaded, name)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection, `[T, 2 * inter]` -> `[T, inter]`: one Triton
    kernel on the GPU path; on the CPU silu(gate) then `* up` in place (the reference's
    `act(gate) * up`, one temporary fewer)."""
    if gpu_path(x):
        return fused_ops().silu_and_mul(x if x.stride(-1) == 1 else x.contiguous())
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU. On the GPU path PyTorch's fused tanh-GELU, the same
    formula in one kernel instead of seven; on the CPU transformers' NewGELU, op for op."""
    if gpu_path(x):
        return F.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def pack_linear_weights(model: nn.Module) -> int:
    """Reorders every fp32 CPU linear weight (not a tied LM head: the embedding reads that one)
    into oneDNN's blocked layout, in place of the plain one, so no GEMM reorders it per call:
    10-35% faster GEMMs at this engine's shapes on the dev box (most at decode batch sizes),
    results within fp32 rounding of the plain layout's (parity stays token-exact). Runs after
    loading; returns how many weights it packed."""
    if not ONEDNN_LINEAR:
        return 0
    packed = 0
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, LMHead)):
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.is_mkldnn or weight.dim() != 2:
            continue
        if isinstance(module, LMHead) and module.tied:
            continue
        module.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ONEDNN_PACK_ROWS),
                                     requires_grad=False)
        packed += 1
    return packed
