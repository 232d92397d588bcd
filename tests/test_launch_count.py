"""Kernel launches per decoder layer on the CUDA code path, counted on the CPU.

`force_gpu_path()` sends CPU tensors down the CUDA path (F.linear, the fused Triton kernels,
the triton attention backend) with Triton in its interpreter. What would launch on a GPU is
counted twice over: every aten op that does work (a TorchDispatchMode; views and bare
allocations launch nothing) and every Triton kernel launch (by wrapping the interpreter's
launch; torch ops the interpreter itself runs inside a launch are not the model's). Before the
fused kernels a bf16 Llama layer issued 32 launches (RMSNorm 8 ops twice, rotary 6, SiLU-and-mul
2, residual adds 2), Qwen3 49; now 10 and 11 (+1 with split-KV decode); vLLM issues about 10.
Counted under no_grad: under inference_mode a dispatch mode does not see casts.

The same harness checks the CUDA path's numbers: the forced path's hidden states agree with the
CPU path's (torch attention backend, PyTorch element-wise ops) on a mixed prefill/decode step.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from helpers import build_batch, rel_err  # noqa: E402
from pagedbackend.attention.metadata import AttentionMetadata  # noqa: E402
from pagedbackend.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedbackend.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedbackend.kernels.layout import kv_cache_shape  # noqa: E402
from pagedbackend.models.config import ModelConfig  # noqa: E402
from pagedbackend.models.hf_config import HFConfig  # noqa: E402
from pagedbackend.models.base import CausalLM  # noqa: E402
from pagedbackend.models.gpt2 import GPT2LMHeadModel  # noqa: E402
from pagedbackend.models.layers import force_gpu_path  # noqa: E402
from pagedbackend.models.llama import LlamaForCausalLM  # noqa: E402

MAX_LAUNCHES_PER_LAYER = 12
BLOCK_SIZE = 16
# Aten ops that only allocate: the CUDA caching allocator hands out memory without a launch.
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh"}


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an aten op does device work: not an allocation, not a view (an op whose result
    aliases an input without writing it: view, slice, transpose, ...)."""
    if func.overloadpacket.__name__ in _ALLOCATIONS:
        return False
    returns = func._schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class LaunchCounter(TorchDispatchMode):
    """Records, in order, each aten op that would launch a kernel and each Triton launch."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []
        self._inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_triton and launches_kernel(func):
            self.launches.append(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_launches() -> Iterator[LaunchCounter]:
    counter = LaunchCounter()
    real_run = InterpretedFunction.run

    def run(self: InterpretedFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if not warmup:
            counter.launches.append(f"triton.{self.__name__}")
        counter._inside_triton += 1
        try:
            return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter._inside_triton -= 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpretedFunction, "run", run)
        with counter:
            yield counter


def tiny_model(model_type: str = "llama", num_layers: int = 2, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> CausalLM:
    """A Llama-shaped model (GQA 4:2, head_dim 16: the smallest the triton backend takes) with
    random weights; "qwen3" adds the per-head q/k RMSNorm; "gpt2" is GPT-2 (MHA, LayerNorm, GELU)."""
    if model_type == "gpt2":
        hf = HFConfig(dict(model_type="gpt2", n_embd=64, n_layer=num_layers, n_head=4, vocab_size=128,
                           n_positions=256, activation_function="gelu_new"))
        mc = ModelConfig(path=Path("."), hf=hf, architecture="GPT2LMHeadModel", eos_token_ids=())
        model: CausalLM = GPT2LMHeadModel(mc)
    else:
        hf = HFConfig(dict(model_type=model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                           max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu"))
        mc = ModelConfig(path=Path("."), hf=hf, architecture="LlamaForCausalLM", eos_token_ids=())
        model = LlamaForCausalLM(mc)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        p.data.copy_(base + 0.2 * torch.randn(p.shape, generator=g))  # norms near 1, as trained ones are
    return model.eval().to(dtype)


def decoder_layers(model: CausalLM) -> list[torch.nn.Module]:
    return list(model.h if isinstance(model, GPT2LMHeadModel) else model.layers)


def bind_caches(model: CausalLM, backend, num_blocks: int, dtype: torch.dtype, seed: int = 1) -> None:
    """Every layer gets its own random (finite) K/V cache, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.attention_layers():
        shape = kv_cache_shape(num_blocks, layer.num_kv_heads, BLOCK_SIZE, layer.head_dim)
        layer.bind(backend, torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


def step(query_lens: list[int], seq_lens: list[int], model: CausalLM,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """(input_ids, positions, metadata, num_blocks) for one step of the flattened batch."""
    attn = model.attention_layers()[0]
    *_, key_cache, _, meta, _ = build_batch(query_lens, seq_lens, attn.num_kv_heads, BLOCK_SIZE, attn.head_dim,
                                            attn.num_heads, dtype=dtype)
    positions = torch.tensor([p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)])
    input_ids = torch.randint(0, 128, (len(positions),), generator=torch.Generator().manual_seed(2))
    return input_ids, positions, meta, key_cache.shape[0]


def per_layer_launches(model_type: str, dtype: torch.dtype,
                       num_splits: int | None) -> tuple[list[list[str]], list[str]]:
    """Launches of each decoder layer, and of the whole forward, for a decode step of 3 sequences."""
    model = tiny_model(model_type, dtype=dtype)
    input_ids, positions, meta, num_blocks = step([1, 1, 1], [5, 17, 40], model, dtype)
    backend = TritonAttentionBackend(force_num_splits=num_splits)
    bind_caches(model, backend, num_blocks, dtype)
    backend.prepare(meta, model.attention_layers()[0].kv_cache[0])
    marks: list[int] = []
    hooks = [h for layer in decoder_layers(model) for h in (
        layer.register_forward_pre_hook(lambda *_: marks.append(len(counter.launches))),
        layer.register_forward_hook(lambda *_: marks.append(len(counter.launches))))]
    try:
        # no_grad, not inference_mode: under inference_mode a dispatch mode does not see casts (_to_copy).
        with torch.no_grad(), force_gpu_path(), count_launches() as counter:
            model(input_ids, positions, meta)
    finally:
        for h in hooks:
            h.remove()
    layers = [counter.launches[marks[i]:marks[i + 1]] for i in range(0, len(marks), 2)]
    return layers, counter.launches


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("num_splits", [None, 2], ids=["unified-attention", "split-kv-decode"])
def test_decoder_layer_issues_at_most_twelve_launches_on_the_cuda_path(model_type, num_splits):
    layers, total = per_layer_launches(model_type, torch.bfloat16, num_splits)
    assert len(layers) == 2
    for i, launches in enumerate(layers):
        assert len(launches) <= MAX_LAUNCHES_PER_LAYER, f"layer {i}: {len(launches)} launches: {launches}"
    # The fused kernels are what run: no eager element-wise RMSNorm / rotary / activation ops left.
    eager = {"aten.pow", "aten.mean", "aten.rsqrt", "aten.silu", "aten.mul", "aten.add", "aten.sub", "aten.cat"}
    for launches in layers:
        assert not [op for op in launches if op in eager], launches
    # Counted where they run: one cache write and one attention launch (+ the split-KV combine) per layer.
    attention = ("triton._unified_attention_kernel", "triton._split_decode_kernel", "triton._split_reduce_kernel")
    for launches in layers:
        assert launches.count("triton._reshape_and_cache_kernel") == 1
        assert len([op for op in launches if op in attention]) == (1 if num_splits is None else 2), launches
        assert launches.count("triton._rotary_kernel") == (model_type != "gpt2")


def test_counter_counts_work_and_casts_and_ignores_views_and_allocations():
    x = torch.randn(4, 8)
    with torch.no_grad(), count_launches() as counter:
        y = torch.empty_like(x)
        torch.add(x, 1, out=y)
        y.t()[0].view(-1)
        x.sum()
        x.to(torch.bfloat16)
    assert counter.launches == ["aten.add", "aten.sum", "aten._to_copy"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
def test_cuda_path_forward_agrees_with_the_cpu_path(model_type):
    """Mixed step (two decodes, a prompt chunk with cached context), fp32: the forced CUDA path
    (F.linear, fused kernels, triton attention) against the CPU path (torch attention)."""
    query_lens, seq_lens = [1, 1, 6], [5, 17, 22]
    outs = []
    for gpu in (False, True):
        model = tiny_model(model_type, seed=3)
        input_ids, positions, meta, num_blocks = step(query_lens, seq_lens, model, torch.float32)
        backend = TritonAttentionBackend() if gpu else TorchAttentionBackend()
        bind_caches(model, backend, num_blocks, torch.float32)
        backend.prepare(meta, model.attention_layers()[0].kv_cache[0])
        with torch.inference_mode(), force_gpu_path(gpu):
            outs.append(model(input_ids, positions, meta))
    cpu, gpu = outs
    assert torch.isfinite(gpu).all()
    assert rel_err(gpu, cpu.double()) < 1e-5
