"""Shared fixtures: tiny random models in Hugging Face layout (built once per session), an
engine factory that checks the block-free invariant after every test, and transformers'
greedy `generate()` as the correctness oracle."""

from __future__ import annotations

import os

import torch

# Triton kernels run compiled on CUDA and in the interpreter only where there is no GPU. Decided
# before any @triton.jit module is imported: the decorator reads TRITON_INTERPRET at definition.
HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# name -> build_tiny_model kwargs. Together they cover GQA, MHA, MQA, sliding window, q/k/v
# bias, tied and untied heads, rope scaling, sharded checkpoints and GPT-2's layout.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "llama-mha": dict(arch="llama", num_heads=4, num_kv_heads=4, seed=1),
    "mistral": dict(arch="mistral", num_heads=4, num_kv_heads=1, sliding_window=40, seed=2),
    # Tied embeddings at std 0.02 make greedy decoding repeat one token forever (a parity test
    # of that proves little): these use a larger std, so their greedy outputs vary.
    "qwen2": dict(arch="qwen2", num_heads=4, num_kv_heads=2, seed=3, init_std=0.2),
    "gpt2": dict(arch="gpt2", num_heads=4, seed=4, init_std=0.2),
    "llama-rope-sharded": dict(arch="llama", num_heads=4, num_kv_heads=2, seed=5, tie_word_embeddings=True, init_std=0.2,
                               rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                               max_shard_size="300KB"),
}
PARITY_MODELS = ["llama", "llama-mha", "mistral", "qwen2", "gpt2"]


# The device axis: every test taking `device` (or `triton_device`) runs on the CPU and, marked
# `gpu` (`pytest -m gpu` selects them), on CUDA where there is one; here the CUDA cases skip.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Where the test's tensors live: "cpu", or "cuda" (a `gpu` test) when a GPU is present."""
    return request.param


@pytest.fixture
def triton_device(device: str) -> str:
    """`device` for a test that runs Triton kernels: on the CPU only under the interpreter
    (with a GPU present the kernels are compiled, and compiled kernels need CUDA tensors)."""
    if device == "cpu" and not TRITON_INTERPRETING:
        pytest.skip("Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    return device


@pytest.fixture
def to_device() -> Callable:
    """to_device(batch, device): a `helpers.build_batch` tuple with its tensors (metadata
    included) moved to `device`, for tests on the device axis."""
    import dataclasses

    def move(batch: tuple, device: str) -> tuple:
        q, k, v, kc, vc, meta, tables = batch
        meta = dataclasses.replace(meta, **{name: getattr(meta, name).to(device) for name in
                                            ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")})
        return (*(t.to(device) for t in (q, k, v, kc, vc)), meta, tables)

    return move


def available_backends() -> list[str]:
    """Attention backends that can run here; parity tests run on each."""
    from pagedbackend.kernels import cpu_native

    return ["torch"] + (["cpu"] if cpu_native.load() is not None else [])


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from pagedbackend.tiny_model import train_tokenizer

    return train_tokenizer(1024, seed=0)


def model_builder(root: Path, tokenizer, table: dict[str, dict[str, Any]]) -> Callable[[str], Path]:
    """get(name) -> path of the tiny model `table[name]` describes, built under `root` on first use."""
    from pagedbackend.tiny_model import build_tiny_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(root / name, tokenizer=tokenizer, **table[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Callable[[str], Path]:
    """model_dir(name) -> path of that tiny model, built on first use."""
    return model_builder(tmp_path_factory.mktemp("models"), tiny_tokenizer, TINY_MODELS)


@pytest.fixture
def make_engine():
    """Build LLMEngines / LLMs; after the test every one of them must have all blocks free."""
    from pagedbackend import LLM, EngineArgs, LLMEngine

    engines: list[LLMEngine] = []

    def make(model: Path | str, kind: str = "engine", config_overrides: dict | None = None, **kwargs):
        """`config_overrides`: EngineConfig fields set after it is built (paths no EngineArgs
        field selects on this machine, e.g. the padded decode path on the CPU)."""
        kwargs.setdefault("seed", 0)
        if kind == "llm":
            assert not config_overrides, "config_overrides apply to kind='engine'"
            llm = LLM(str(model), **kwargs)
            engines.append(llm.llm_engine)
            return llm
        config = EngineArgs(model=str(model), **kwargs).create_engine_config()
        for name, value in (config_overrides or {}).items():
            setattr(config, name, value)
        engine = LLMEngine(config, progress=False)
        engines.append(engine)
        return engine

    try:
        yield make
        for engine in engines:
            engine.check_all_blocks_free()
    finally:
        for engine in engines:
            engine.shutdown()  # tensor-parallel workers end with the test
