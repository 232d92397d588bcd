"""The fused element-wise kernels (pagedbackend.kernels.fused_ops) in Triton's interpreter
against float64 references — fresh random inputs, NaN-poisoned outputs and guard columns that
must stay untouched, row-strided views like the ones a fused qkv projection hands them, each
dtype — and the CPU paths of layers.py / rotary.py, which must stay bit-identical to the
transformers reference in fp32 (the engine's greedy tokens depend on it)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from helpers import rel_err  # noqa: E402
from pagedbackend.kernels import fused_ops  # noqa: E402
from pagedbackend.models.layers import RMSNorm, force_gpu_path, silu_and_mul  # noqa: E402
from pagedbackend.models.rotary import RotaryEmbedding  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)
ROPE = {"rope_theta": 10000.0, "rope_type": "default"}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def guarded(rows: int, cols: int, guard: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `[rows, cols]` view into a `[rows, cols + guard]` buffer whose guard columns are
    NaN: a kernel that writes past the view's row shows up there."""
    buf = torch.full((rows, cols + guard), float("nan"), dtype=dtype)
    buf[:, :cols] = randn(rows, cols, dtype=dtype, seed=seed)
    return buf, buf[:, :cols]


def rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 80])
def test_rms_norm_kernel_matches_reference_on_row_strided_input(dtype, hidden):
    buf, x = guarded(5, hidden, 7, dtype, seed=hidden)
    w = randn(hidden, dtype=dtype, seed=1)
    out = torch.full((5, hidden), float("nan"), dtype=dtype)
    fused_ops.rms_norm(x, w, 1e-6, out=out)
    assert torch.isfinite(out).all(), "some output element was never written"
    assert rel_err(out, rms_reference(x, w, 1e-6)) < TOLERANCE[dtype]
    assert buf[:, hidden:].isnan().all(), "wrote outside the input rows"


def test_rms_norm_kernel_normalises_q_and_k_heads_in_place_each_with_its_weight():
    """Qwen3's q/k norm: the q and k heads of a [T, q + k + v] projection, normalised where they
    lie in one launch, q heads by one weight and k heads by the other; v untouched."""
    t, q_heads, k_heads, d, v_width = 3, 4, 2, 32, 64
    qk_width = (q_heads + k_heads) * d
    qkv = randn(t, qk_width + v_width, seed=2)
    before = qkv.clone()
    qk = qkv[:, :qk_width].view(t, q_heads + k_heads, d)
    wq, wk = randn(d, seed=3), randn(d, seed=33)
    old = before[:, :qk_width].view(t, q_heads + k_heads, d)
    expected = torch.cat([rms_reference(old[:, :q_heads], wq, 1e-6), rms_reference(old[:, q_heads:], wk, 1e-6)], 1)
    fused_ops.rms_norm(qk, wq, 1e-6, out=qk, second_weight=wk, split_head=q_heads)
    assert rel_err(qk, expected) < 1e-5
    assert torch.equal(qkv[:, qk_width:], before[:, qk_width:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_updates_residual_and_normalises_into_x(dtype):
    hidden = 96
    x_buf, x = guarded(6, hidden, 5, dtype, seed=4)
    r_buf, residual = guarded(6, hidden, 3, dtype, seed=5)
    w = randn(hidden, dtype=dtype, seed=6)
    total = (x.double() + residual.double()).to(dtype)  # the reference keeps the residual in the model dtype
    expected = rms_reference(total, w, 1e-5)
    out, res = fused_ops.fused_add_rms_norm(x, residual, w, 1e-5)
    assert out is x and res is residual, "must update its arguments in place"
    assert rel_err(residual, total.double()) < TOLERANCE[dtype]
    assert rel_err(x, expected) < TOLERANCE[dtype]
    assert x_buf[:, hidden:].isnan().all() and r_buf[:, hidden:].isnan().all(), "wrote outside the rows"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_layer_norm_updates_residual_and_normalises_into_x(dtype):
    hidden = 80
    x_buf, x = guarded(4, hidden, 6, dtype, seed=20)
    r_buf, residual = guarded(4, hidden, 2, dtype, seed=21)
    w, b = randn(hidden, dtype=dtype, seed=22), randn(hidden, dtype=dtype, seed=23)
    total = (x.double() + residual.double()).to(dtype)
    t64 = total.double()
    expected = (t64 - t64.mean(-1, keepdim=True)) * torch.rsqrt(t64.var(-1, unbiased=False, keepdim=True) + 1e-5) \
        * w.double() + b.double()
    out, res = fused_ops.fused_add_layer_norm(x, residual, w, b, 1e-5)
    assert out is x and res is residual, "must update its arguments in place"
    assert rel_err(residual, t64) < TOLERANCE[dtype]
    assert rel_err(x, expected) < TOLERANCE[dtype]
    assert x_buf[:, hidden:].isnan().all() and r_buf[:, hidden:].isnan().all(), "wrote outside the rows"


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """float64 rotation by the tables' angles, written pair by pair (not the code under test)."""
    out = x.double().clone()
    rot, half = rope.rotary_dim, rope.rotary_dim // 2
    cos = rope.cos_cache[positions].double()[:, None, :]
    sin = rope.sin_cache[positions].double()[:, None, :]
    idx = torch.arange(half)
    i1, i2 = (idx, idx + half) if rope.is_neox_style else (2 * idx, 2 * idx + 1)
    x1, x2 = x.double()[..., i1], x.double()[..., i2]
    out[..., i1] = x1 * cos - x2 * sin
    out[..., i2] = x2 * cos + x1 * sin
    assert rot <= x.shape[-1]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("partial", [1.0, 0.5], ids=["full", "partial"])
def test_rotary_kernel_rotates_q_and_k_in_place_inside_the_projection(dtype, neox, partial):
    t, q_heads, kv_heads, d = 5, 4, 2, 64
    rope = RotaryEmbedding(d, 128, ROPE, partial_rotary_factor=partial, is_neox_style=neox)
    qk_width = (q_heads + kv_heads) * d
    qkv = randn(t, qk_width + kv_heads * d, dtype=dtype, seed=7)
    qkv[:, qk_width:] = float("nan")  # v: must not be touched
    before = qkv.clone()
    qk = qkv[:, :qk_width].view(t, q_heads + kv_heads, d)
    positions = torch.tensor([0, 3, 17, 64, 127])
    expected = rotary_reference(qk, positions, rope)
    assert fused_ops.rotary_embedding_(qk, positions, rope.cos_cache, rope.sin_cache, rope.rotary_dim, neox) is qk
    assert rel_err(qk, expected) < TOLERANCE[dtype]
    assert torch.equal(qk[..., rope.rotary_dim:], before[:, :qk_width].view_as(qk)[..., rope.rotary_dim:])
    assert qkv[:, qk_width:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1500])  # 1500: more than one column block per row
def test_silu_and_mul_kernel_matches_reference(dtype, inter):
    x = randn(3, 2 * inter, dtype=dtype, seed=inter)
    gate, up = x.double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    out = torch.full((3, inter), float("nan"), dtype=dtype)
    fused_ops.silu_and_mul(x, out=out)
    assert torch.isfinite(out).all(), "some output element was never written"
    assert rel_err(out, expected) < TOLERANCE[dtype]


def test_kernels_refuse_inputs_whose_rows_are_not_unit_stride():
    x = randn(8, 4).t()  # [4, 8] with stride (1, 4)
    with pytest.raises(ValueError, match="unit stride"):
        fused_ops.rms_norm(x, randn(8), 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        fused_ops.silu_and_mul(x)


# The CPU paths: exactly transformers' arithmetic in fp32.

def test_cpu_rms_norm_and_fused_add_are_bit_identical_to_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hidden = 96
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    ours = RMSNorm(hidden, 1e-5)
    ref.weight.data.copy_(randn(hidden, seed=8))
    ours.weight.data.copy_(ref.weight.data)
    x, residual = randn(7, hidden, seed=9), randn(7, hidden, seed=10)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        total = residual + x
        expected = ref(total)
        out, res = ours(x.clone(), residual)
    assert res is residual and torch.equal(residual, total)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed-view"])
def test_cpu_rotary_is_bit_identical_to_transformers(transposed):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t, heads, d = 6, 3, 32
    rope = RotaryEmbedding(d, 64, ROPE)
    x = randn(heads * d, t, seed=11).t() if transposed else randn(t, heads * d, seed=11)
    x = x.view(t, heads, d)  # the CPU qkv projection is a transposed view (layers.linear)
    positions = torch.tensor([0, 1, 9, 20, 33, 63])
    ours = rope.rotate(x, rope.step_inputs(positions, torch.float32))
    half_cos, half_sin = rope.cos_cache[positions], rope.sin_cache[positions]
    cos, sin = torch.cat([half_cos, half_cos], -1)[None], torch.cat([half_sin, half_sin], -1)[None]
    expected, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos, sin)
    assert ours.is_contiguous()
    assert torch.equal(ours, expected[0].transpose(0, 1))


def test_force_gpu_path_sends_layers_to_the_kernels_and_agrees_with_the_cpu_path():
    hidden = 64
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data.copy_(randn(hidden, seed=12))
    x, residual = randn(4, hidden, seed=13), randn(4, hidden, seed=14)
    gate_up = randn(4, 2 * hidden, seed=15)
    cpu_out, cpu_res = norm(x.clone(), residual.clone())
    cpu_act = silu_and_mul(gate_up)
    calls: list[str] = []
    real_add, real_silu = fused_ops.fused_add_rms_norm, fused_ops.silu_and_mul

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as mp, force_gpu_path():
        mp.setattr(fused_ops, "fused_add_rms_norm", spy("fused_add_rms_norm", real_add))
        mp.setattr(fused_ops, "silu_and_mul", spy("silu_and_mul", real_silu))
        gpu_out, gpu_res = norm(x.clone(), residual.clone())
        gpu_act = silu_and_mul(gate_up)
    assert calls == ["fused_add_rms_norm", "silu_and_mul"]
    assert rel_err(gpu_res, cpu_res.double()) < 1e-6
    assert rel_err(gpu_out, cpu_out.double()) < 1e-5
    assert rel_err(gpu_act, cpu_act.double()) < 1e-5


# Compiled for a real GPU (no GPU needed): what the interpreter cannot check.
_COMPILE_SCRIPT = r'''
import json, os, subprocess, sys, tempfile
import torch, triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagedbackend.kernels import fused_ops
from pagedbackend.kernels.compile_check import Launch, jit_function, jit_specialization

NAMES = ("_rms_norm_kernel", "_fused_add_rms_norm_kernel", "_fused_add_layer_norm_kernel", "_rotary_kernel",
         "_silu_and_mul_kernel")
launches = []

class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

for name in NAMES:
    setattr(fused_ops, name, Recorder(getattr(fused_ops, name)))
# Llama-3-8B shapes: hidden 4096, 32 + 8 heads of 128, intermediate 14336.
for dt in (torch.bfloat16, torch.float32):
    x, w = torch.zeros(8, 4096, dtype=dt), torch.zeros(4096, dtype=dt)
    fused_ops.rms_norm(x, w, 1e-6)
    fused_ops.fused_add_rms_norm(x, x.clone(), w, 1e-6)
    fused_ops.fused_add_layer_norm(x, x.clone(), w, w, 1e-5)
    qk = torch.zeros(8, 48 * 128, dtype=dt)[:, :40 * 128].view(8, 40, 128)
    fused_ops.rms_norm(qk, w[:128], 1e-6, out=qk, second_weight=w[:128], split_head=32)
    table = torch.zeros(4096, 64)
    for neox in (True, False):
        fused_ops.rotary_embedding_(qk, torch.zeros(8, dtype=torch.long), table, table, 128, neox)
    fused_ops.silu_and_mul(torch.zeros(8, 2 * 14336, dtype=dt))
cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
results = []
for launch in launches:
    kwargs = dict(launch.kwargs)
    warps = kwargs.pop("num_warps")
    spec = jit_specialization(Launch(launch.kernel, launch.args, kwargs), 90)
    compiled = triton.compile(ASTSource(jit_function(launch.kernel), spec.signature, constexprs=spec.constexprs,
                                        attrs=spec.attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    results.append([launch.kernel.__name__, [line.strip() for line in usage.splitlines() if "REG:" in line]])
print(json.dumps(results))
'''


def test_fused_kernels_compile_for_sm90_without_register_spills():
    """Each kernel at Llama-3-8B widths, bf16 and fp32, through the whole compiler to an sm_90
    cubin (outside the interpreter, in a subprocess): no local memory (spills) at the warp
    counts the wrappers launch with."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 14  # 7 launches x 2 dtypes
    for name, usage in results:
        assert usage and all("LOCAL:0 " in line for line in usage), (name, usage)


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_fp32_linear_goes_through_onednn_and_matches_a_float64_reference(rows, with_bias, monkeypatch):
    from pagedbackend.models import layers

    assert layers.ONEDNN_LINEAR  # the CPU wheel this project pins ships oneDNN
    seen = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: seen.append(x.shape[0]) or onednn(x, *a))
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(80, 96, generator=g)
    b = torch.randn(80, generator=g) if with_bias else None
    y = layers.linear(x, w, b)
    ref = x.double() @ w.double().t() + (b.double() if with_bias else 0)
    assert seen == [layers.onednn_rows(rows)] and y.shape == (rows, 80) and y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # A transposed (non-contiguous) input gives the same product.
    yt = layers.linear(x.t().contiguous().t(), w, b)
    assert torch.equal(yt, y)


def test_onednn_sees_a_bounded_set_of_row_counts_with_at_most_an_eighth_padding(monkeypatch):
    """oneDNN keeps memory per distinct GEMM shape it has seen (RSS grew ~3.9 MiB per new row
    count, without bound, in the soak): every token count up to the budget must map onto few."""
    from pagedbackend.models import layers

    seen = set()
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: seen.add(x.shape[0]) or onednn(x, *a))
    w = torch.randn(24, 8)
    for rows in range(1, 2049):
        assert layers.linear(torch.randn(rows, 8), w).shape == (rows, 24)
        padded = layers.onednn_rows(rows)
        assert padded >= rows and (rows <= 128 or (padded - rows) * 8 <= rows)
    assert len(seen) == 55


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_loaded_cpu_fp32_linears_are_packed_for_onednn_except_a_tied_lm_head(name, model_dir, make_engine):
    """Packed (oneDNN-blocked) weights replace the plain ones after loading; an LM head tied to
    the embedding keeps the plain tensor the embedding lookup reads. qwen2's tiny model is tied."""
    from pagedbackend.models.layers import ColumnParallelLinear, LMHead, RowParallelLinear

    engine = make_engine(model_dir(name), dtype="float32")
    model = engine.executor.runner.model
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert linears and all(m.weight.is_mkldnn for m in linears)
    head = next(m for m in model.modules() if isinstance(m, LMHead))
    assert head.weight.is_mkldnn != head.tied
    if head.tied:
        assert head.weight is model.embed_tokens.weight
    # A packed weight gives the plain weight's product (float64 reference).
    layer = linears[0]
    g = torch.Generator().manual_seed(1)
    for rows in (1, 5, 64, 300):
        x = torch.randn(rows, layer.input_size, generator=g)
        ref = x.double() @ layer.weight.to_dense().double().t()
        if layer.bias is not None:
            ref += layer.bias.double()
        y = layer(x)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
