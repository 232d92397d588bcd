"""Attention backends that declare themselves: `auto` takes the first backend (per-device
priority) whose declared support fits the device, dtype, the model's head size and window and
the block size; when none fits, or a named one does not, the error gives the reasons. And the
declarations are true: what a backend declares it accepts, it computes correctly."""

from __future__ import annotations

import inspect
import json
import math
import shutil

import pytest
import torch

from helpers import build_batch, reference, rel_err
from pagedbackend.attention import (AUTO_PRIORITY, BACKENDS, AttentionBackend, CpuAttentionBackend,
                                    TorchAttentionBackend, TorchAttentionState, TritonAttentionBackend,
                                    TritonAttentionState, get_attention_backend, select_attention_backend)
from pagedbackend.attention import triton_backend
from pagedbackend.config import EngineArgs
from pagedbackend.kernels import cpu_native
from pagedbackend.kernels.layout import kv_cache_shape

native = cpu_native.load()
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_native = pytest.mark.skipif(native is None, reason="no C compiler for the native CPU kernel")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _model_with(model_dir, tmp_path, **changes):
    dst = tmp_path / "model"
    shutil.copytree(model_dir("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _no_native(monkeypatch):
    monkeypatch.setattr(cpu_native, "load", lambda: None)


# ---------------------------------------------------------------------------- auto
@needs_native
def test_auto_picks_cpu_on_cpu_fp32_when_the_native_kernel_builds(model_dir):
    config = EngineArgs(model=str(model_dir("llama"))).create_engine_config()
    assert (config.device, config.dtype, config.attention_backend) == ("cpu", torch.float32, "cpu")


def test_auto_picks_torch_on_cpu_without_the_native_kernel(model_dir, monkeypatch):
    _no_native(monkeypatch)
    assert EngineArgs(model=str(model_dir("llama"))).create_engine_config().attention_backend == "torch"


def test_auto_picks_torch_on_cpu_for_half_precision(model_dir):
    # The native kernel is float32 only, so the cpu backend declares float32 only.
    config = EngineArgs(model=str(model_dir("llama")), dtype="bfloat16").create_engine_config()
    assert config.attention_backend == "torch"


def test_auto_priority_per_device():
    assert AUTO_PRIORITY == {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
    assert set(BACKENDS) == {"torch", "cpu", "triton"}
    # What auto would take on CUDA, from the declarations alone (no GPU needed).
    pick = select_attention_backend("auto", "cuda", torch.bfloat16, head_size=128, block_size=16)
    assert pick == ("triton" if HAVE_TRITON else "torch")
    assert select_attention_backend("auto", "cuda:1", torch.bfloat16, head_size=128, block_size=8) == "torch"
    assert select_attention_backend("auto", "cuda", torch.float16, head_size=512, block_size=16) == "torch"


def test_auto_never_picks_the_triton_interpreter_on_cpu(monkeypatch):
    _no_native(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_attention_backend("auto", "cpu", torch.float32, head_size=64, block_size=16) == "torch"


def test_auto_with_nothing_fitting_lists_every_backend_and_its_reason(model_dir, monkeypatch):
    for name, cls in BACKENDS.items():
        monkeypatch.setattr(cls, "supports", classmethod(lambda c, *a, **k: f"is switched off ({c.name} test)"))
    with pytest.raises(ValueError) as info:
        EngineArgs(model=str(model_dir("llama"))).create_engine_config()
    message = str(info.value)
    assert message.startswith("attention_backend='auto': no attention backend fits device='cpu', dtype=float32, "
                              "head_size=16, block_size=16")
    for name in BACKENDS:
        assert f"{name}: " in message and f"is switched off ({name} test)" in message, name


def test_soft_capping_fits_every_backend_and_a_backend_without_it_is_refused(model_dir, tmp_path, monkeypatch):
    path = _model_with(model_dir, tmp_path, attn_logit_softcapping=50.0)
    config = EngineArgs(model=str(path)).create_engine_config()
    assert config.attention_backend == ("cpu" if native is not None else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in _runnable():
        assert select_attention_backend(name, "cpu", torch.float32, head_size=16, block_size=16,
                                        logits_soft_cap=50.0) == name
    # The model's cap reaches the check: a backend declaring no soft-capping says so.
    for cls in BACKENDS.values():
        monkeypatch.setattr(cls, "supports_logits_soft_cap", False)
    with pytest.raises(ValueError) as info:
        EngineArgs(model=str(path)).create_engine_config()
    message = str(info.value)
    assert "logits_soft_cap=50.0" in message
    assert "torch: does not support attention-logit soft-capping (the model caps at 50.0)" in message
    for name in BACKENDS:
        assert f"{name}: " in message, name


# ---------------------------------------------------------------------------- named backends
def test_cpu_backend_on_a_cuda_device_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"attention_backend='cpu' runs on cpu only, but device='cuda'"):
        select_attention_backend("cpu", "cuda", torch.float32, head_size=64, block_size=16)


def test_cpu_backend_without_the_native_kernel(model_dir, monkeypatch):
    _no_native(monkeypatch)
    with pytest.raises(ValueError, match="attention_backend='cpu' needs the native CPU kernel, which could not be "
                                         r"built \(no C compiler\?\); use 'torch'"):
        EngineArgs(model=str(model_dir("llama")), attention_backend="cpu").create_engine_config()
    with pytest.raises(ValueError, match="needs the native CPU kernel"):
        get_attention_backend("cpu")


@needs_native
def test_cpu_backend_with_half_precision_is_refused(model_dir):
    with pytest.raises(ValueError, match="attention_backend='cpu' supports dtype float32, not bfloat16"):
        EngineArgs(model=str(model_dir("llama")), attention_backend="cpu", dtype="bfloat16").create_engine_config()


def test_triton_without_the_package(model_dir, monkeypatch):
    monkeypatch.setattr(triton_backend, "_triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"attention_backend='triton' needs the triton package \(pip install triton\)"):
        EngineArgs(model=str(model_dir("llama")), attention_backend="triton").create_engine_config()


@needs_triton
def test_triton_on_cpu_without_the_interpreter(model_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_backend='triton' on the CPU runs in Triton's interpreter: set "
                                         "TRITON_INTERPRET=1"):
        EngineArgs(model=str(model_dir("llama")), attention_backend="triton").create_engine_config()


@needs_triton
def test_triton_with_blocks_below_16(model_dir):
    with pytest.raises(ValueError, match=r"attention_backend='triton' needs block_size in 16, 32, 64, 128 \(at "
                                         r"least 16: tensor-core dots need 16 rows\), got 8"):
        EngineArgs(model=str(model_dir("llama")), attention_backend="triton", block_size=8).create_engine_config()
    config = EngineArgs(model=str(model_dir("llama")), attention_backend="triton").create_engine_config()
    assert config.attention_backend == "triton"


@needs_triton
def test_head_size_comes_from_the_model(model_dir, tmp_path):
    # head_dim given in config.json wins over hidden_size // num_attention_heads (64 // 4 = 16).
    path = _model_with(model_dir, tmp_path, head_dim=8)
    with pytest.raises(ValueError, match="attention_backend='triton' supports head sizes 16 to 256, not 8"):
        EngineArgs(model=str(path), attention_backend="triton").create_engine_config()
    assert EngineArgs(model=str(path)).create_engine_config().model_config.head_dim == 8
    assert EngineArgs(model=str(model_dir("llama"))).create_engine_config().model_config.head_dim == 16


def test_sliding_window_reaches_the_check(model_dir, monkeypatch):
    seen = {}

    def spy(cls, device, dtype, head_size, block_size, sliding_window=None, logits_soft_cap=None,
            num_queries_per_kv=1):
        seen.update(head_size=head_size, sliding_window=sliding_window, group=num_queries_per_kv)
        return None

    monkeypatch.setattr(TorchAttentionBackend, "supports", classmethod(spy))
    EngineArgs(model=str(model_dir("mistral")), attention_backend="torch").create_engine_config()
    assert seen == {"head_size": 16, "sliding_window": 40, "group": 4}


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="attention_backend must be one of auto, torch, cpu, triton; got 'flash'"):
        select_attention_backend("flash", "cpu", torch.float32, head_size=64, block_size=16)


# ---------------------------------------------------------------------------- the declarations are true
def test_every_backend_declares_its_support():
    for name, cls in BACKENDS.items():
        assert cls.name == name and issubclass(cls, AttentionBackend)
        assert cls.device_types and cls.dtypes
        assert cls.supports_logits_soft_cap is True  # every one implements it: forward() takes the cap
        assert inspect.signature(cls.forward).parameters["logits_soft_cap"].default is None
        assert cls.supports_sliding_window is True
        assert cls.get_kv_cache_shape(10, 2, 16, 64) == kv_cache_shape(10, 2, 16, 64)
    assert CpuAttentionBackend.device_types == ("cpu",) and CpuAttentionBackend.dtypes == (torch.float32,)
    assert (TritonAttentionBackend.min_head_size, TritonAttentionBackend.max_head_size) == (16, 256)
    assert TritonAttentionBackend.block_sizes == (16, 32, 64, 128)


def _runnable() -> list[str]:
    return ["torch"] + (["cpu"] if native is not None else []) + (["triton"] if HAVE_TRITON else [])


def _declared_cases(cls):
    """A sample of what the backend declares it accepts on the CPU: every dtype, the smallest
    and largest head size (256 for unbounded) and a middle one, the smallest and largest block size."""
    heads = sorted({cls.min_head_size if cls.min_head_size > 1 else 8, 80, cls.max_head_size or 256})
    blocks = (8, 128) if cls.block_sizes is None else (min(cls.block_sizes), max(cls.block_sizes))
    cases = [(dtype, 64, 16) for dtype in cls.dtypes]
    cases += [(torch.float32, h, 16) for h in heads] + [(torch.float32, 64, b) for b in blocks]
    return cases


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("name", _runnable())
def test_what_a_backend_declares_it_computes(name, monkeypatch):
    cls = BACKENDS[name]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dtype, head_size, block_size in _declared_cases(cls):
        for window, soft_cap in ((None, None), (24, None), (None, 2.0), (24, 2.0)):
            assert cls.supports("cpu", dtype, head_size, block_size, sliding_window=window,
                                logits_soft_cap=soft_cap, num_queries_per_kv=2) is None
            # Two decodes, a fresh prompt, a chunk with context; block edges crossed.
            q, k, v, kc, vc, meta, tables = build_batch([1, 1, 3, 5], [2, block_size + 1, 3, block_size + 9], 2,
                                                        block_size, head_size, 4, dtype=dtype,
                                                        seed=head_size + block_size)
            expected = reference(q, k, v, kc, vc, meta, tables, 1 / math.sqrt(head_size), window, soft_cap)
            backend = get_attention_backend(name)
            backend.prepare(meta, kc)
            out = backend.forward(q, k, v, kc, vc, meta, 1 / math.sqrt(head_size), window, logits_soft_cap=soft_cap)
            assert torch.isfinite(out).all()
            assert rel_err(out, expected) < TOLERANCE[dtype], (dtype, head_size, block_size, window, soft_cap)


@needs_native
def test_cpu_backend_gqa_limit_is_the_native_kernels():
    assert CpuAttentionBackend.supports("cpu", torch.float32, 16, 16, num_queries_per_kv=64) is None
    assert "at most 64 query heads per KV head" in CpuAttentionBackend.supports("cpu", torch.float32, 16, 16,
                                                                                 num_queries_per_kv=65)
    for group, ok in ((64, True), (65, False)):
        q, k, v, kc, vc, meta, tables = build_batch([1, 1], [5, 9], 1, 16, 16, group)
        for t, slot in enumerate(meta.slot_mapping.tolist()):
            kc[slot // 16, :, slot % 16] = k[t]
            vc[slot // 16, :, slot % 16] = v[t]
        out = torch.empty(q.shape)
        if ok:
            native.paged_decode_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, 0.25, None, 9)
            assert rel_err(out, reference(q, k, v, kc, vc, meta, tables, 0.25, None)) < 1e-5
        else:
            with pytest.raises(RuntimeError):
                native.paged_decode_attention(out, q, kc, vc, meta.block_tables, meta.seq_lens, 0.25, None, 9)


@needs_native
def test_native_kernel_rejects_the_dtypes_the_cpu_backend_does_not_declare():
    q, k, v, kc, vc, meta, _ = build_batch([1, 1], [5, 9], 1, 16, 64, 2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        native.paged_decode_attention(torch.empty(q.shape, dtype=q.dtype), q, kc, vc, meta.block_tables,
                                      meta.seq_lens, 1.0, None, 9)


# ---------------------------------------------------------------------------- typed per-step state
@pytest.mark.parametrize("name", _runnable())
def test_prepare_sets_a_typed_state_and_forward_needs_it(name):
    q, k, v, kc, vc, meta, _ = build_batch([1, 4], [7, 4], 2, 16, 16, 4)
    assert meta.backend_state is None
    backend = get_attention_backend(name)
    with pytest.raises(RuntimeError, match="prepare"):
        backend.forward(q, k, v, kc, vc, meta, 0.25, None)
    backend.prepare(meta, kc)
    expected = TritonAttentionState if name == "triton" else TorchAttentionState
    assert type(meta.backend_state) is expected
    assert not hasattr(meta, "extra")
    backend.forward(q, k, v, kc, vc, meta, 0.25, None)
