"""Engine arguments (vLLM's `EngineArgs` names) and the resolved, validated configuration.

`EngineArgs` is what users and adapters write; `EngineArgs.create_engine_config()` checks every
field (a `ValueError` naming the field and the allowed values), reads the model directory and
resolves the "auto" choices, so nothing invalid reaches the engine loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
SCHEDULING_POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")
LOAD_FORMATS = ("auto", "safetensors", "pt")
# Default share of memory for the KV cache when neither num_kv_blocks nor a fraction is given.
DEFAULT_KV_FRACTION = {"cuda": 0.9, "cpu": 0.2}


class HFConfig:
    """Read-only attribute view of a Hugging Face `config.json`, with GPT-2's aliases."""

    _ALIASES = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
    }

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._data and self._data[key] is not None:
            return self._data[key]
        alias = self._ALIASES.get(key)
        if alias is not None and self._data.get(alias) is not None:
            return self._data[alias]
        return default

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        value = self.get(key)
        if value is None:
            raise AttributeError(f"config.json has no {key!r}")
        return value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)


@dataclass
class ModelConfig:
    """What the engine needs to know about a model directory before loading weights."""

    path: Path
    hf: HFConfig
    architecture: str
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model: str | os.PathLike) -> "ModelConfig":
        from pagedbackend.models import resolve_architecture

        path = Path(model)
        if not path.is_dir():
            raise ValueError(
                f"model: {str(model)!r} is not a directory; pass a local Hugging Face model "
                "directory (config.json + *.safetensors)"
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model: {str(path)!r} has no config.json, so it is not a Hugging Face model directory")
        try:
            data = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model: {config_file} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"model: {config_file} must hold a JSON object")
        hf = HFConfig(data)
        architecture = resolve_architecture(hf)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(hf.get(key), int) or hf.get(key) < 1:
                raise ValueError(f"model: config.json field {key!r} must be a positive integer, got {hf.get(key)!r}")
        return cls(path=path, hf=hf, architecture=architecture, eos_token_ids=_read_eos_ids(path, hf))

    @property
    def vocab_size(self) -> int:
        return self.hf.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.hf.get("num_key_value_heads", self.num_heads)

    @property
    def head_dim(self) -> int:
        return self.hf.get("head_dim") or self.hf.hidden_size // self.num_heads

    @property
    def max_position_embeddings(self) -> int | None:
        return self.hf.get("max_position_embeddings")

    @property
    def declared_dtype(self) -> torch.dtype | None:
        name = self.hf.get("dtype") or self.hf.get("torch_dtype")
        return _DTYPES.get(str(name).replace("torch.", "")) if name else None


def _read_eos_ids(path: Path, hf: HFConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what `generate()` stops on), else config.json."""
    value: Any = None
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            value = None
    if value is None:
        value = hf.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    return tuple(int(i) for i in ids)


@dataclass
class EngineArgs:
    """Every engine setting, with vLLM's names where vLLM has one."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks (preemption_mode="swap")
    max_logprobs: int = 20
    # Text prompts longer than this are refused before tokenizing (a 413); default: the most
    # characters max_model_len tokens could ever cover, so only prompts that cannot fit.
    max_prompt_chars: int | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineArgs":
        """From a config mapping (e.g. model-config.yaml's handler section); unknown keys are
        an error that names them, not silently ignored."""
        known = set(cls.field_names())
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "model" not in values:
            raise ValueError("model: the model directory is required")
        return cls(**dict(values))

    def _check_fields(self) -> None:
        def want_int(name: str, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}")

        def want_choice(name: str, choices: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

        def want_bool(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"model must be a path to a model directory, got {self.model!r}")
        want_choice("dtype", ("auto", *_DTYPES))
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}")
        want_int("block_size", 1)
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        want_int("num_kv_blocks", 1, optional=True)
        if self.kv_cache_memory_fraction is not None:
            f = self.kv_cache_memory_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {f!r}")
        want_int("max_num_seqs", 1)
        want_int("max_num_batched_tokens", 1, optional=True)
        want_int("max_model_len", 2, optional=True)
        want_bool("enable_prefix_caching")
        want_bool("enable_chunked_prefill")
        want_choice("attention_backend", ATTENTION_BACKENDS)
        want_int("seed", 0)
        want_int("tensor_parallel_size", 1)
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1 for now (got {self.tensor_parallel_size}); "
                             "tensor parallelism is not implemented yet")
        want_choice("load_format", LOAD_FORMATS)
        want_choice("scheduling_policy", SCHEDULING_POLICIES)
        want_choice("preemption_mode", PREEMPTION_MODES)
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float)) or self.swap_space < 0:
            raise ValueError(f"swap_space must be a non-negative number of GiB, got {self.swap_space!r}")
        if self.preemption_mode == "swap" and self.swap_space == 0:
            raise ValueError("swap_space must be positive when preemption_mode is 'swap'")
        want_int("max_logprobs", 0)
        want_int("max_prompt_chars", 1, optional=True)

    def create_engine_config(self) -> "EngineConfig":
        self._check_fields()
        model_config = ModelConfig.from_dir(self.model)

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available (torch.cuda.is_available() is False)")

        if self.dtype == "auto":
            dtype = model_config.declared_dtype or torch.float32
            if device == "cpu" and dtype != torch.float32:
                dtype = torch.float32  # half-precision matmuls are far slower than fp32 on CPUs without AMX
        else:
            dtype = _DTYPES[self.dtype]

        max_pos = model_config.max_position_embeddings
        max_model_len = self.max_model_len or max_pos or 2048
        if max_pos is not None and max_model_len > max_pos:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={max_pos}")

        if self.max_num_batched_tokens is not None:
            max_batched = self.max_num_batched_tokens
        elif self.enable_chunked_prefill:
            max_batched = max(2048, self.max_num_seqs)
        else:
            max_batched = max(max_model_len, self.max_num_seqs)
        if max_batched < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={max_batched} must be at least max_num_seqs={self.max_num_seqs}, "
                             "or some running requests could not be scheduled")
        if not self.enable_chunked_prefill and max_batched < max_model_len:
            raise ValueError(f"max_num_batched_tokens={max_batched} must be at least max_model_len={max_model_len} "
                             "when enable_chunked_prefill is false (a whole prompt must fit one step)")

        backend = self.attention_backend
        if backend == "auto":
            if device.startswith("cuda"):
                backend = "triton" if _triton_available() else "torch"
            else:
                backend = "cpu" if dtype == torch.float32 and _native_cpu_available() else "torch"
        if backend == "cpu" and device != "cpu":
            raise ValueError(f"attention_backend='cpu' runs on the CPU only, but device={device!r}")
        if backend == "triton":
            if not _triton_available():
                raise ValueError("attention_backend='triton' needs the triton package (pip install triton)")
            if self.block_size < 16:
                raise ValueError(f"block_size must be at least 16 with attention_backend='triton' (tensor-core "
                                 f"dots need 16 rows), got {self.block_size}")
            if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("attention_backend='triton' on the CPU runs in Triton's interpreter: set "
                                 "TRITON_INTERPRET=1 before importing pagedbackend (slow; for tests)")

        kv_fraction = self.kv_cache_memory_fraction
        if kv_fraction is None and self.num_kv_blocks is None:
            kv_fraction = DEFAULT_KV_FRACTION["cuda" if device.startswith("cuda") else "cpu"]

        return EngineConfig(
            model_config=model_config,
            tokenizer=self.tokenizer or str(model_config.path),
            device=device,
            dtype=dtype,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_fraction=kv_fraction,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_chunked_prefill=self.enable_chunked_prefill,
            attention_backend=backend,
            seed=self.seed,
            tensor_parallel_size=self.tensor_parallel_size,
            load_format=self.load_format,
            scheduling_policy=self.scheduling_policy,
            preemption_mode=self.preemption_mode,
            swap_space=float(self.swap_space),
            max_logprobs=self.max_logprobs,
            max_prompt_chars=self.max_prompt_chars,
        )


def _native_cpu_available() -> bool:
    from pagedbackend.kernels import cpu_native

    return cpu_native.load() is not None


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class EngineConfig:
    """Resolved configuration; `num_kv_blocks` is final once the model runner has sized the cache."""

    model_config: ModelConfig
    tokenizer: str
    device: str
    dtype: torch.dtype
    block_size: int
    num_kv_blocks: int | None
    kv_cache_memory_fraction: float | None
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    attention_backend: str
    seed: int
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    swap_space: float = 4.0
    max_logprobs: int = 20
    max_prompt_chars: int | None = None
