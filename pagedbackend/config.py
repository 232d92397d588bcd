"""Engine arguments (vLLM's `EngineArgs` names) and the resolved, validated configuration.

Every setting is declared once, as an `EngineArgs` field made with `setting(...)`: its type (the
annotation), default, help text, choices and limits. Everything else is generated from that
declaration: the checks (`EngineArgs._check_fields`, and each sub-config's own validation), the
command-line flags (`EngineArgs.add_cli_args` / `from_cli_args`), the README's configuration
table (`python -m pagedbackend.config --write README.md`); tests/test_settings.py checks the
table, the flags and the model-config.yaml template against it.

`EngineArgs.create_engine_config()` checks every field (a `ValueError` naming the field and the
allowed values), reads the model directory (`pagedbackend.models.ModelConfig`) and resolves the
"auto" choices, the attention backend included (from the model's head size and window), into an
`EngineConfig` made of typed sub-configs, so nothing invalid reaches the engine loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from pagedbackend.distributed import TORCHRUN_ENV, launched_by_torchrun
from pagedbackend.attention import ATTENTION_BACKEND_CHOICES, AUTO_PRIORITY, BACKENDS, select_attention_backend
from pagedbackend.models.config import DTYPE_NAMES, ModelConfig
from pagedbackend.models.registry import SUPPORTED_ARCHITECTURES, has_native
from pagedbackend.models.transformers_impl import causal_lm_class
from pagedbackend.models.transformers_tp import check_tensor_parallel
from pagedbackend.readme import replace_table
from pagedbackend.models.hf_config import HFConfig
from pagedbackend.scheduler import PREEMPTION_MODES, SCHEDULING_POLICIES
from pagedbackend.spec_decode.config import DraftModelSpec, SpeculativeConfig
from pagedbackend.structured_output.params import StructuredOutputsConfig

logger = logging.getLogger(__name__)

_DTYPES = DTYPE_NAMES  # compatibility alias
ATTENTION_BACKENDS = ATTENTION_BACKEND_CHOICES
LOAD_FORMATS = ("auto", "safetensors", "pt")
MODEL_IMPLS = ("auto", "native", "transformers")
BLOCK_SIZES = (8, 16, 32, 64, 128)
# Default share of memory for the KV cache when neither num_kv_blocks nor a fraction is given.
DEFAULT_KV_FRACTION = {"cuda": 0.9, "cpu": 0.2}
# Default step token budget with chunked prefill (at least max_num_seqs).
DEFAULT_CHUNKED_BUDGET = 2048
DEFAULT_MAX_MODEL_LEN = 2048  # when the model declares no max_position_embeddings


# ---------------------------------------------------------------------------- declaring a setting
def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None,
            minimum: int | float | None = None, check: Callable[[Any], str | None] | None = None,
            doc_default: str | None = None, negative_aliases: tuple[str, ...] = (), expects: str | None = None) -> Any:
    """A dataclass field carrying its documentation and its constraints in `metadata`:
    `help` (the README's "meaning", the flag's help), `choices`, `minimum`, `check` (a custom
    rule: the reason the value is wrong, or None), `doc_default` (how the README and the help
    show a default that is computed, e.g. "derived"), `negative_aliases` (extra spellings of a
    boolean flag's --no-... form), `expects` (what a value of the wrong type is told to be)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
                "check": check, "doc_default": doc_default, "negative_aliases": negative_aliases,
                "expects": expects}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One engine setting as declared: the typed view of an `EngineArgs` field."""

    name: str
    accepts: tuple[type, ...]  # the annotation's types, None excluded; accepts[0] parses the flag
    optional: bool  # None is a valid value (it means "derived")
    default: Any  # dataclasses.MISSING when required
    help: str
    choices: tuple[Any, ...] | None
    minimum: int | float | None
    check: Callable[[Any], str | None] | None
    doc_default: str | None
    negative_aliases: tuple[str, ...]
    expects: str | None = None

    @property
    def type(self) -> type:
        return self.accepts[0]

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def documented_default(self) -> str:
        """The default as the README table writes it."""
        if self.doc_default is not None:
            return self.doc_default
        if self.required:
            return "—"
        value = self.default
        if isinstance(value, bool):
            return f"`{value}`"
        if isinstance(value, str):
            return f"`{value}`"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def validate(self, value: Any) -> None:
        """Raise a ValueError naming the setting when `value` is not allowed."""
        name = self.name
        if value is None:
            if self.optional:
                return
            raise ValueError(f"{name} is required (got None)")
        kind = self.type
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        elif not isinstance(value, self.accepts):
            raise ValueError(f"{name} must be {self.expects or 'a ' + kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{name} must be at least {self.minimum}, got {value}")
        if self.check is not None:
            reason = self.check(value)
            if reason is not None:
                raise ValueError(f"{name} {reason}")


def _check_model(value: Any) -> str | None:
    return None if str(value) else "must be a path to a model directory, got ''"


def _check_device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return None
    return f"must be one of auto, cpu, cuda, cuda:N; got {value!r}"


def _check_fraction(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else f"must be in (0, 1], got {value!r}"


def _check_swap_space(value: float) -> str | None:
    return None if value >= 0 else f"must be a non-negative number of GiB, got {value!r}"


def _check_speculative(value: Any) -> str | None:
    try:
        SpeculativeConfig.parse(value)
    except ValueError as e:
        return str(e).removeprefix("speculative_config").lstrip(": ")
    return None


def _check_structured_outputs(value: Any) -> str | None:
    try:
        StructuredOutputsConfig.parse(value)
    except ValueError as e:
        return str(e).removeprefix("structured_outputs_config").lstrip(": ")
    return None


#: vLLM's names for how the ranks of a tensor-parallel engine are run.
EXECUTOR_BACKENDS = ("uni", "mp", "external_launcher")


# ---------------------------------------------------------------------------- EngineArgs
@dataclass
class EngineArgs:
    """Every engine setting, with vLLM's names where vLLM has one. The declaration order is
    the README table's and the flags' order."""

    model: str | os.PathLike = setting(help="Hugging Face model directory", check=_check_model,
                                       expects="a path to a model directory")
    tokenizer: str | os.PathLike | None = setting(
        None, doc_default="model dir", expects="a path to a tokenizer directory",
        help="tokenizer directory (anything `AutoTokenizer.from_pretrained` loads)")
    dtype: str = setting(
        "auto", choices=("auto", *DTYPE_NAMES),
        help="`auto`, `float32`, `float16`, `bfloat16` (or `fp32`, `half`, `bf16`, ...); `auto` = the "
             "checkpoint's dtype on GPU (a float32 checkpoint runs in bfloat16, float16 where the GPU has no "
             "bfloat16, as vLLM does), float32 on CPU")
    device: str = setting("auto", check=_check_device, help="`auto`, `cpu`, `cuda`, `cuda:N`")
    block_size: int = setting(16, choices=BLOCK_SIZES,
                              help="tokens per KV block (" + ", ".join(map(str, BLOCK_SIZES)) + ")")
    num_kv_blocks: int | None = setting(None, minimum=1, doc_default="derived",
                                        help="size of the KV pool in blocks; overrides the memory fraction")
    kv_cache_memory_fraction: float | None = setting(
        None, check=_check_fraction,
        doc_default=f"{DEFAULT_KV_FRACTION['cuda']:g} GPU / {DEFAULT_KV_FRACTION['cpu']:g} CPU",
        help="on a GPU, the share of the device this engine's weights, activations and KV cache reach together "
             "(vLLM's `gpu_memory_utilization`, per engine); on the CPU, the share of available host memory for the "
             "KV cache; capped at what `max_num_seqs` full-length sequences can use")
    max_num_seqs: int = setting(256, minimum=1, help="sequences computed per step at most")
    max_num_batched_tokens: int | None = setting(
        None, minimum=1, doc_default=f"{DEFAULT_CHUNKED_BUDGET} (chunked)",
        help="token budget of one step (prefill chunks + decodes); default: "
             f"max({DEFAULT_CHUNKED_BUDGET}, `max_num_seqs`) with chunked prefill, else max(`max_model_len`, "
             "`max_num_seqs`)")
    max_model_len: int | None = setting(None, minimum=2, doc_default="model's max positions",
                                        help="prompt + output limit per sequence")
    enable_prefix_caching: bool = setting(
        True, negative_aliases=("--no-prefix-caching",),
        help="reuse KV blocks of identical prefixes (chained block hashes)")
    enable_chunked_prefill: bool = setting(
        True, negative_aliases=("--no-chunked-prefill",),
        help="split long prompts across steps, mixed with decodes")
    attention_backend: str = setting(
        "auto", choices=ATTENTION_BACKEND_CHOICES,
        help="`torch` (reference), `cpu` (native decode kernel), `triton`; `auto` takes the first that fits "
             "the device, dtype, model's head size and window, and block size: "
             + ", ".join(" then ".join(f"`{b}`" for b in order) + f" on {device.upper()}"
                         for device, order in AUTO_PRIORITY.items())
             + " (else an error gives each backend's reason)")
    enforce_eager: bool = setting(
        False,
        help="run every step eagerly: no CUDA graphs (by default decode-only steps on CUDA are padded to a "
             "captured batch size, 1, 2, 4, then multiples of 8 up to `max_num_seqs`, and replayed as CUDA "
             "graphs captured at start)")
    seed: int = setting(0, minimum=0, help="seed of the engine's sampler (per-request `seed` overrides)")
    tensor_parallel_size: int = setting(
        1, minimum=1,
        help="ranks the model is split across, Megatron-style over torch.distributed (gloo on CPU, NCCL on CUDA): "
             "attention heads, MLP and vocabulary divided, each rank holding its own KV shard")
    distributed_executor_backend: str | None = setting(
        None, choices=EXECUTOR_BACKENDS, doc_default="auto",
        help="how the ranks run: `mp` (the engine starts the other ranks as processes), `external_launcher` "
             "(torchrun started every rank; each runs the same engine on the same requests), `uni` (one "
             "rank); default: `uni` for one rank, `external_launcher` under torchrun, else `mp`")
    distributed_timeout_s: float = setting(
        300.0, minimum=1,
        help="seconds a rank waits in a collective before the engine fails naming the rank (a hung worker)")
    load_format: str = setting("auto", choices=LOAD_FORMATS,
                               help="`auto` / `safetensors`, or `pt` to allow pickle weights")
    model_impl: str = setting(
        "auto", choices=MODEL_IMPLS,
        help="`native` (our model code), `transformers` (the model's own transformers modeling code with paged "
             "attention: any decoder whose attention goes through transformers' AttentionInterface), or `auto`: "
             "native when the architecture has it, else transformers")
    scheduling_policy: str = setting(
        "fcfs", choices=SCHEDULING_POLICIES,
        help="`fcfs`, or `priority`: lower `priority` (per request) is served first, preempted last, and may "
             "preempt less urgent running requests to start")
    preemption_mode: str = setting(
        "recompute", choices=PREEMPTION_MODES,
        help="`recompute` (drop the KV, recompute later), or `swap` (copy the blocks to host memory and back; "
             "falls back to recompute when the host pool is full, and for beams)")
    swap_space: float = setting(
        4.0, check=_check_swap_space,
        help="GiB of host memory for swapped-out blocks (allocated only with `preemption_mode=\"swap\"`)")
    max_logprobs: int = setting(20, minimum=0,
                                help="largest `logprobs` / `prompt_logprobs` a request may ask for")
    speculative_config: str | dict | None = setting(
        None, check=_check_speculative, expects="a dict (or its JSON text)",
        help="speculative decoding, vLLM's dict (JSON on the command line): `{\"method\": \"ngram\", "
             "\"num_speculative_tokens\": k, \"prompt_lookup_min\": m, \"prompt_lookup_max\": M}` or "
             "`{\"method\": \"draft_model\", \"model\": DIR, \"num_speculative_tokens\": k}`, optionally "
             "`\"disable_by_batch_size\": N` (no speculation while more than N sequences run or wait); outputs stay the "
             "target model's (greedy: token for token)")
    structured_outputs_config: str | dict | None = setting(
        None, check=_check_structured_outputs, expects="a dict (or its JSON text)",
        help="structured output (JSON schema, regex, choice, EBNF grammar per request), vLLM's dict: "
             "`{\"backend\": \"auto\"}` or `{\"backend\": \"xgrammar\"}` (the one backend; grammars compile on "
             "the submitting thread, cached), and `\"disable_any_whitespace\": true` to make compact JSON (no "
             "optional whitespace) every request's default")
    max_prompt_chars: int | None = setting(
        None, minimum=1, doc_default="derived",
        help="text prompts longer than this are refused before tokenizing; default: twice the characters "
             "`max_model_len` tokens of the vocabulary's longest entries could cover, so only prompts that "
             "cannot fit")

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        return engine_settings()

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

    # ------------------------------------------------------------------ command line
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """One flag per setting: `--block-size`, booleans as `--x/--no-x`, plus the declared
        aliases (`--no-prefix-caching`)."""
        for s in engine_settings():
            text = _plain(s.help)
            if not s.required:
                text += f" (default: {_plain(s.documented_default)})"
            text = text.replace("%", "%%")
            if s.type is bool:
                parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=s.default,
                                    help=text)
                for alias in s.negative_aliases:
                    parser.add_argument(alias, dest=s.name, action="store_false",
                                        help=f"same as --no-{s.flag[2:]}")
                continue
            kwargs: dict[str, Any] = {"dest": s.name, "type": s.type if s.type in (int, float) else str,
                                      "help": text}
            if s.choices is not None:
                kwargs["choices"] = s.choices
            if s.required:
                kwargs["required"] = True
            else:
                kwargs["default"] = s.default
            parser.add_argument(s.flag, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{s.name: getattr(ns, s.name) for s in engine_settings()})

    # ------------------------------------------------------------------ checks
    def _check_fields(self) -> None:
        """Each field against its declaration, and the rules across fields that need no model."""
        for s in engine_settings():
            s.validate(getattr(self, s.name))
        if self.preemption_mode == "swap" and self.swap_space == 0:
            raise ValueError("swap_space must be positive when preemption_mode is 'swap'")

    def _model_impl(self, model_config: ModelConfig) -> str:
        arch = model_config.architecture
        native = has_native(arch)
        if self.model_impl == "native" and not native:
            raise ValueError(f"model_impl='native': {arch} has no native implementation (native: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}); use model_impl='transformers' or 'auto'")
        impl = self.model_impl if self.model_impl != "auto" else ("native" if native else "transformers")
        if impl == "transformers":
            causal_lm_class(model_config)  # refuses, naming why, a model this path would get wrong
        return impl

    def _executor_backend(self) -> str:
        tp, chosen = self.tensor_parallel_size, self.distributed_executor_backend
        if chosen is None:
            if tp == 1:
                return "uni"
            chosen = "external_launcher" if launched_by_torchrun() else "mp"
        if chosen == "uni" and tp > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank; tensor_parallel_size={tp} needs "
                             "'mp' or 'external_launcher'")
        if chosen == "external_launcher":
            world = os.environ.get("WORLD_SIZE")
            if not launched_by_torchrun():
                raise ValueError("distributed_executor_backend='external_launcher' needs the ranks started by torchrun "
                                 "(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); missing: "
                                 + ", ".join(k for k in TORCHRUN_ENV if k not in os.environ))
            if int(world) != tp:
                raise ValueError(f"tensor_parallel_size={tp} but torchrun started WORLD_SIZE={world} ranks")
        return chosen

    def create_engine_config(self) -> "EngineConfig":
        self._check_fields()
        model_config = ModelConfig.from_dir(self.model)

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available (torch.cuda.is_available() is False)")

        dtype = resolve_dtype(self.dtype, model_config.declared_dtype, device)

        max_pos = model_config.max_position_embeddings
        max_model_len = self.max_model_len or max_pos or DEFAULT_MAX_MODEL_LEN
        if max_pos is not None and max_model_len > max_pos:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={max_pos}")

        if self.max_num_batched_tokens is not None:
            max_batched = self.max_num_batched_tokens
        elif self.enable_chunked_prefill:
            max_batched = max(DEFAULT_CHUNKED_BUDGET, self.max_num_seqs)
        else:
            max_batched = max(max_model_len, self.max_num_seqs)
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max_batched, max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill, scheduling_policy=self.scheduling_policy,
            preemption_mode=self.preemption_mode)

        model_impl = self._model_impl(model_config)
        tp = self.tensor_parallel_size
        if tp > 1 and model_impl == "transformers":
            check_tensor_parallel(model_config, tp)  # the model's tensor-parallel plan, dry-run on the meta device
        parallel_config = ParallelConfig(tensor_parallel_size=tp,
                                         distributed_executor_backend=self._executor_backend(),
                                         distributed_timeout_s=float(self.distributed_timeout_s))
        heads_per_rank, kv_heads_per_rank = model_config.heads_per_rank(tp)  # errors name the numbers

        # The backend depends on the model (head size, window, GQA group): chosen here, where
        # the model directory has been read, before any weight is loaded.
        backend = select_attention_backend(
            self.attention_backend, device, dtype, head_size=model_config.head_dim, block_size=self.block_size,
            sliding_window=model_config.sliding_window, logits_soft_cap=model_config.logits_soft_cap,
            num_queries_per_kv=max(1, heads_per_rank // kv_heads_per_rank))

        speculative, draft = self._speculative(model_config, device, dtype, max_model_len, tp)

        kv_fraction = self.kv_cache_memory_fraction
        if kv_fraction is None and self.num_kv_blocks is None:
            kv_fraction = DEFAULT_KV_FRACTION["cuda" if device.startswith("cuda") else "cpu"]

        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                                     kv_cache_memory_fraction=kv_fraction,
                                     enable_prefix_caching=self.enable_prefix_caching,
                                     swap_space=float(self.swap_space)),
            scheduler_config=scheduler_config,
            device_config=DeviceConfig(device=device, dtype=dtype),
            parallel_config=parallel_config,
            load_config=LoadConfig(load_format=self.load_format, model_impl=model_impl),
            tokenizer=str(self.tokenizer or model_config.path),
            attention_backend=backend,
            enforce_eager=self.enforce_eager,
            # CUDA graphs need fixed shapes: decode-only steps padded to a capture size. On the CPU
            # both stay off (eager dynamic shapes are faster there; tests turn padding on).
            padded_decode=device.startswith("cuda") and not self.enforce_eager,
            cuda_graphs=device.startswith("cuda") and not self.enforce_eager,
            seed=self.seed,
            max_logprobs=self.max_logprobs,
            max_prompt_chars=self.max_prompt_chars,
            speculative_config=speculative,
            draft=draft,
            structured_outputs_config=StructuredOutputsConfig.parse(self.structured_outputs_config),
        )

    def _speculative(self, target: ModelConfig, device: str, dtype: torch.dtype, max_model_len: int,
                     tp: int) -> tuple[SpeculativeConfig | None, DraftModelSpec | None]:
        """The parsed `speculative_config`, and for a draft model its resolved spec: its
        directory read and checked against the target (vocabulary, positions) before any
        weight is loaded."""
        if self.speculative_config is None:
            return None, None
        spec = SpeculativeConfig.parse(self.speculative_config)
        if spec.num_speculative_tokens >= max_model_len:
            raise ValueError(f"speculative_config: num_speculative_tokens={spec.num_speculative_tokens} must be "
                             f"below max_model_len={max_model_len}")
        if spec.method != "draft_model":
            return spec, None
        if tp > 1:
            raise ValueError("speculative_config: method 'draft_model' runs on one rank; with tensor_parallel_size="
                             f"{tp} use method 'ngram'")
        try:
            draft = ModelConfig.from_dir(spec.model)
        except ValueError as e:
            raise ValueError(f"speculative_config: model: {e}") from e
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config: the draft model's vocabulary ({draft.vocab_size} tokens, "
                             f"{spec.model}) is not the target's ({target.vocab_size}); a draft must share the "
                             "target's tokenizer")
        positions = draft.max_position_embeddings
        if positions is not None and positions < max_model_len:  # proposals stay within max_model_len
            raise ValueError(f"speculative_config: the draft model handles {positions} positions, fewer than "
                             f"max_model_len={max_model_len}; lower max_model_len")
        impl = "native" if has_native(draft.architecture) else "transformers"
        if impl == "transformers":
            causal_lm_class(draft)
        backend = select_attention_backend(
            self.attention_backend, device, dtype, head_size=draft.head_dim, block_size=self.block_size,
            sliding_window=draft.sliding_window, logits_soft_cap=draft.logits_soft_cap,
            num_queries_per_kv=max(1, draft.num_heads // draft.num_kv_heads))
        return spec, DraftModelSpec(draft, backend, impl, dtype, device, self.load_format)


def resolve_dtype(name: str, declared: torch.dtype | None, device: str) -> torch.dtype:
    """The compute dtype for `dtype=name`. `auto` is vLLM's rule: the checkpoint's dtype, except
    that a float32 (or undeclared) checkpoint runs in bfloat16 on a GPU (float32 gets no tensor
    cores; float16 where the GPU lacks bfloat16), and everything runs in float32 on the CPU
    (half-precision matmuls are far slower than fp32 on CPUs without AMX)."""
    if name != "auto":
        return DTYPE_NAMES[name]
    if not device.startswith("cuda"):
        return torch.float32
    dtype = declared or torch.float32
    if dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        logger.info("dtype='auto': the float32 checkpoint runs in %s on %s (give dtype='float32' to keep it)",
                    _dtype_label(dtype), device)
    return dtype


def _dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cuda_graph_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The decode batch sizes captured as CUDA graphs (vLLM's default list): 1, 2, 4, then every
    multiple of 8, up to the first that holds `max_num_seqs`. A decode step runs padded to the
    smallest size that holds it, so padding wastes at most 7 rows, for one graph per size."""
    sizes: list[int] = []
    size = 1
    while True:
        sizes.append(size)
        if size >= max_num_seqs:
            return tuple(sizes)
        size = size * 2 if size < 8 else size + 8


def _type_args(hint: Any) -> tuple[tuple[type, ...], bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        kinds = tuple(a for a in args if a is not type(None))
        return kinds, len(kinds) < len(args)
    return (hint,), False


@functools.cache
def engine_settings() -> tuple[Setting, ...]:
    """Every EngineArgs setting in declaration order, with its resolved type."""
    hints = typing.get_type_hints(EngineArgs)
    out = []
    for f in dataclasses.fields(EngineArgs):
        accepts, optional = _type_args(hints[f.name])
        m = f.metadata
        out.append(Setting(name=f.name, accepts=accepts, optional=optional, default=f.default, help=m["help"],
                           choices=m["choices"], minimum=m["minimum"], check=m["check"],
                           doc_default=m["doc_default"], negative_aliases=m["negative_aliases"],
                           expects=m["expects"]))
    return tuple(out)


def _setting(name: str) -> Setting:
    return next(s for s in engine_settings() if s.name == name)


def _plain(text: str) -> str:
    return text.replace("`", "")


def _validate_fields(obj: Any, *names: str) -> None:
    """A sub-config checks its fields against the EngineArgs declarations of the same name."""
    for name in names:
        _setting(name).validate(getattr(obj, name))


# ---------------------------------------------------------------------------- resolved sub-configs
@dataclass
class CacheConfig:
    """The KV cache: block size, pool size (blocks, or a memory share), prefix caching, swap pool.
    `num_kv_blocks` is final once the model runner has sized the cache."""

    block_size: int
    num_kv_blocks: int | None
    kv_cache_memory_fraction: float | None
    enable_prefix_caching: bool = True
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks

    def __post_init__(self) -> None:
        _validate_fields(self, "block_size", "num_kv_blocks", "kv_cache_memory_fraction", "enable_prefix_caching",
                         "swap_space")


@dataclass
class SchedulerConfig:
    """What the scheduler needs: per-step limits, the sequence length limit, policies."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            raise ValueError("max_num_batched_tokens must be resolved to an integer in a SchedulerConfig")
        _validate_fields(self, "max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_chunked_prefill",
                         "scheduling_policy", "preemption_mode")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                             f"max_num_seqs={self.max_num_seqs}, or some running requests could not be scheduled")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                             f"max_model_len={self.max_model_len} when enable_chunked_prefill is false (a whole "
                             "prompt must fit one step)")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "uni"  # resolved: never None
    distributed_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _validate_fields(self, "tensor_parallel_size", "distributed_executor_backend", "distributed_timeout_s")
        if (self.distributed_executor_backend == "uni") != (self.tensor_parallel_size == 1):
            raise ValueError(f"distributed_executor_backend={self.distributed_executor_backend!r} does not fit "
                             f"tensor_parallel_size={self.tensor_parallel_size} ('uni' is for one rank only)")


@dataclass
class DeviceConfig:
    """The resolved device ("cpu", "cuda", "cuda:N"; never "auto") and compute dtype."""

    device: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.device == "auto":
            raise ValueError("device must be resolved (cpu, cuda or cuda:N) in a DeviceConfig, got 'auto'")
        _validate_fields(self, "device")
        if self.dtype not in set(DTYPE_NAMES.values()):
            raise ValueError(f"dtype must be one of float32, float16, bfloat16; got {self.dtype!r}")


@dataclass
class LoadConfig:
    load_format: str = "auto"
    model_impl: str = "native"  # resolved: "native" or "transformers"

    def __post_init__(self) -> None:
        _validate_fields(self, "load_format", "model_impl")
        if self.model_impl == "auto":
            raise ValueError("model_impl must be resolved (native or transformers) in LoadConfig")


class _Flat:
    """`EngineConfig.<name>`, read and written through to the sub-config that owns it, so code
    written against the flat config (`config.block_size`, `config.num_kv_blocks = n`) keeps working."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.owner), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.owner), self.name, value)


@dataclass
class EngineConfig:
    """Resolved configuration: the model, typed sub-configs, and the engine-wide settings."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device_config: DeviceConfig
    tokenizer: str
    attention_backend: str  # resolved: a name in pagedbackend.attention.BACKENDS, never "auto"
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    load_config: LoadConfig = field(default_factory=LoadConfig)
    seed: int = 0
    max_logprobs: int = 20
    max_prompt_chars: int | None = None
    enforce_eager: bool = False
    # Decode-only steps run on the model runner's persistent buffers, padded to a capture size
    # (fixed shapes: what a CUDA graph replays). Resolved from the device and enforce_eager;
    # tests set it on the CPU to run the padded path eagerly against the dynamic one.
    padded_decode: bool = False
    # Capture the padded decode steps as CUDA graphs at start (needs padded_decode, and an
    # attention backend declaring supports_cuda_graphs; the runner logs when it has none).
    cuda_graphs: bool = False
    speculative_config: SpeculativeConfig | None = None
    draft: DraftModelSpec | None = None  # resolved for speculative_config's draft_model method
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)

    # Flat views (not dataclass fields: no annotations).
    block_size = _Flat("cache_config")
    num_kv_blocks = _Flat("cache_config")
    kv_cache_memory_fraction = _Flat("cache_config")
    enable_prefix_caching = _Flat("cache_config")
    swap_space = _Flat("cache_config")
    max_num_seqs = _Flat("scheduler_config")
    max_num_batched_tokens = _Flat("scheduler_config")
    max_model_len = _Flat("scheduler_config")
    enable_chunked_prefill = _Flat("scheduler_config")
    scheduling_policy = _Flat("scheduler_config")
    preemption_mode = _Flat("scheduler_config")
    device = _Flat("device_config")
    dtype = _Flat("device_config")
    tensor_parallel_size = _Flat("parallel_config")
    distributed_executor_backend = _Flat("parallel_config")
    distributed_timeout_s = _Flat("parallel_config")
    load_format = _Flat("load_config")
    model_impl = _Flat("load_config")

    def __post_init__(self) -> None:
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be resolved to one of {', '.join(BACKENDS)} in an "
                             f"EngineConfig, got {self.attention_backend!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer must be a path to a tokenizer directory, got {self.tokenizer!r}")
        _validate_fields(self, "seed", "max_logprobs", "max_prompt_chars", "enforce_eager")
        if self.cuda_graphs and not self.padded_decode:
            raise ValueError("cuda_graphs needs padded_decode: a CUDA graph replays the padded decode step's fixed shapes")
        if self.cuda_graphs and self.enforce_eager:
            raise ValueError("cuda_graphs and enforce_eager contradict each other (enforce_eager: no CUDA graphs)")
        if self.preemption_mode == "swap" and self.swap_space == 0:
            raise ValueError("swap_space must be positive when preemption_mode is 'swap'")

    @property
    def cuda_graph_sizes(self) -> tuple[int, ...]:
        """The decode batch sizes the padded path pads to (and, with cuda_graphs, captures)."""
        return cuda_graph_capture_sizes(self.max_num_seqs)


# ---------------------------------------------------------------------------- the README table
README_HEADING = "## Configuration (`EngineArgs`, also `LLM(**kwargs)`)"


def config_table_markdown() -> str:
    """The README's configuration table, one row per setting in declaration order."""
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for s in engine_settings():
        rows.append(f"| `{s.name}` | {s.documented_default} | {s.help} |")
    return "\n".join(rows) + "\n"


def write_readme_table(path: str | os.PathLike) -> bool:
    """Replace the table under README_HEADING with `config_table_markdown()`; True if it changed."""
    return replace_table(path, README_HEADING, config_table_markdown())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedbackend.config",
                                     description="print (or write into a README) the configuration table")
    parser.add_argument("--write", metavar="README", default=None, help="replace the table in this file")
    ns = parser.parse_args(argv)
    if ns.write:
        print(("updated " if write_readme_table(ns.write) else "unchanged: ") + ns.write)
    else:
        sys.stdout.write(config_table_markdown())
    return 0


__all__ = ["ATTENTION_BACKENDS", "BLOCK_SIZES", "CacheConfig", "DeviceConfig", "EngineArgs", "EngineConfig",
           "HFConfig", "LOAD_FORMATS", "LoadConfig", "ModelConfig", "PREEMPTION_MODES", "ParallelConfig",
           "SCHEDULING_POLICIES", "SchedulerConfig", "Setting", "config_table_markdown", "engine_settings",
           "setting"]

if __name__ == "__main__":
    sys.exit(main())
