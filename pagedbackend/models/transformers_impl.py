"""Any Hugging Face decoder on the paged engine: the model's own transformers modeling code,
with attention routed to our backends through `transformers.AttentionInterface`.

The step's flattened batch goes in as `input_ids` / `position_ids` of shape `[1, T]` with
`use_cache=False`; every attention call lands in `paged_attention_forward`, which finds the
step's metadata in a forward context (a module-level slot set around the forward: some decoder
layers drop extra kwargs) and the layer's KV cache by `module.layer_idx`. transformers builds no
mask for an implementation without a registered mask function, so a packed batch costs no
O(T^2) mask. Only the sampled rows go through the LM head, with the model's own final logit
transforms (Gemma's soft-cap, Granite's scaling, Cohere's scale): `compute_logits` runs the
`*ForCausalLM` forward on the given hidden rows.

Models whose modeling code does not call the interface (`_supports_attention_backend` false:
Falcon, Bloom, MPT, recurrent hybrids) would silently attend without the cache: refused.

With tensor_parallel_size > 1 the loaded model is cut to this rank's shard by
`transformers_tp.shard_model` (the model's `base_model_tp_plan`), the paged-attention slots and
so the KV cache get the per-rank head counts, and a probe forward at start-up checks that every
layer's attention call really carries those counts (a model whose code reshapes by the full
counts fails there, by name, instead of producing wrong tokens).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from pagedbackend.attention.layer import PagedAttention
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.distributed import get_tp_rank, get_tp_size
from pagedbackend.models.base import CausalLM
from pagedbackend.models.config import ModelConfig

IMPL_NAME = "pagedbackend"
# Classes whose flag is False although every attention layer calls the interface (read in their
# transformers 5.24 modeling code; token-exact in tests/test_transformers_path.py). The flag
# also guards hybrids and encoder-decoders, so it stays the rule for everything else.
INTERFACE_DESPITE_FLAG = ("StableLmForCausalLM",)
# The forward context: {"meta": AttentionMetadata, "layers": [PagedAttention]}, or {"probe": [...]}
# while `_probe_heads` runs.
_STEP: dict[str, Any] = {}


def causal_lm_class(mc: ModelConfig) -> type:
    """The transformers `*ForCausalLM` class of this config, checked to route attention through
    the interface; a ValueError naming the architecture otherwise."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(mc.path))
    except (ValueError, KeyError) as e:
        raise ValueError(f"model: architecture {mc.architecture} (model_type {mc.hf.get('model_type')!r}) has no "
                         f"native implementation and transformers cannot read its config: {e}") from None
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"model: architecture {mc.architecture} (model_type {config.model_type!r}) is not a causal "
                         "language model transformers knows, so the transformers path cannot serve it") from None
    if not getattr(cls, "_supports_attention_backend", False) and cls.__name__ not in INTERFACE_DESPITE_FLAG:
        raise ValueError(f"model: {cls.__name__} cannot be served by the transformers path: its modeling code does "
                         "not route attention through transformers' AttentionInterface "
                         "(_supports_attention_backend is False), so paged attention would be bypassed and the "
                         "tokens would be wrong")
    return cls


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention call: q `[1, Hq, T, D]`, k/v `[1, Hkv, T, D]` (after RoPE and
    any q/k norm) -> `([1, T, Hq, D], None)`, through the paged KV cache."""
    if "probe" in _STEP:  # start-up check of the head counts: record, attend to nothing
        _STEP["probe"].append((module, tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    meta: AttentionMetadata = _STEP["meta"]
    layer: PagedAttention = _STEP["layers"][module.layer_idx]
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = layer.attend(q, k, v, meta, scale=scale, sliding_window=sliding_window, logits_soft_cap=softcap)
    return out.unsqueeze(0), None


@contextlib.contextmanager
def _forward_context(meta: AttentionMetadata, layers: nn.ModuleList) -> Iterator[None]:
    _STEP["meta"], _STEP["layers"] = meta, layers
    try:
        yield
    finally:
        _STEP.clear()


class _Hidden(nn.Module):
    """Stands in for the base model so the `*ForCausalLM` forward runs only its head (and
    final logit transforms) on hidden rows computed already."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> "_Output":
        return _Output(last_hidden_state=self.hidden)


class _Output(dict):
    """The base model's output as the `*ForCausalLM` forward reads it: `last_hidden_state`
    (or `[0]`); every other field it may look at (router logits of an MoE, caches) is None."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    def __getitem__(self, key: Any) -> Any:
        return dict.__getitem__(self, "last_hidden_state" if key == 0 else key)


class TransformersCausalLM(CausalLM):
    """A transformers `*ForCausalLM`, loaded by `from_pretrained`, behind our forward contract."""

    def __init__(self, mc: ModelConfig, dtype: torch.dtype, device: str, load_format: str) -> None:
        super().__init__()
        from transformers import AttentionInterface

        cls = causal_lm_class(mc)
        AttentionInterface.register(IMPL_NAME, paged_attention_forward)
        tp = get_tp_size()
        # Weights are materialised once, in the target dtype on the target device; with tensor
        # parallelism on the host first, so that only this rank's shard reaches the device.
        load_device = torch.device(device) if tp == 1 else torch.device("cpu")
        self.hf = cls.from_pretrained(str(mc.path), dtype=dtype, device_map=load_device,
                                      attn_implementation=IMPL_NAME, use_safetensors=load_format != "pt").eval()
        heads, kv_heads, head_dim = mc.num_heads, mc.num_kv_heads, mc.head_dim
        split_attention: list[nn.Module] = []
        if tp > 1:
            from pagedbackend.models.transformers_tp import shard_model

            shard = shard_model(self.hf, self.hf.config, get_tp_rank(), tp, num_heads=heads, num_kv_heads=kv_heads,
                                head_dim=head_dim)
            heads, kv_heads, split_attention = shard.heads_per_rank, shard.kv_heads_per_rank, shard.attention_modules
            self.hf.to(device)
        self.base_prefix = self.hf.base_model_prefix
        self.base = getattr(self.hf, self.base_prefix)
        # One paged-attention slot per decoder layer, for the runner to bind a KV cache to (its
        # head counts size the cache: this rank's heads); scale, window and soft-cap come with
        # each call, from the model's own code.
        self.paged = nn.ModuleList(PagedAttention(heads, kv_heads, head_dim, scale=head_dim ** -0.5)
                                   for _ in range(mc.num_layers))
        if tp > 1:
            self._probe_heads(mc, heads, kv_heads, head_dim, split_attention, device)

    @torch.inference_mode()
    def _probe_heads(self, mc: ModelConfig, heads: int, kv_heads: int, head_dim: int,
                     split_attention: list[nn.Module], device: str) -> None:
        """One two-token forward (every rank runs it: the row-parallel layers all-reduce) whose
        attention calls only record their shapes: each layer must call the interface once,
        with this rank's q and KV head counts and head_dim, and the attention modules that
        were given per-rank counts must be the ones that call it."""
        calls: list[tuple[nn.Module, tuple, tuple, tuple]] = []
        name = mc.architecture
        _STEP["probe"] = calls
        try:
            ids = torch.zeros((1, 2), dtype=torch.long, device=device)
            self.base(input_ids=ids, position_ids=torch.arange(2, device=device)[None], use_cache=False)
        except RuntimeError as e:  # a reshape by the full head counts, a shape mismatch
            raise ValueError(f"tensor_parallel_size={get_tp_size()}: {name}'s forward fails once sharded "
                             f"({type(e).__name__}: {e}): its modeling code does not follow the split, so the "
                             "transformers path cannot serve it with tensor parallelism") from e
        finally:
            _STEP.clear()
        layers = sorted(getattr(m, "layer_idx", -1) for m, *_ in calls)
        if layers != list(range(mc.num_layers)):
            raise ValueError(f"tensor_parallel_size={get_tp_size()}: {name}'s attention calls came from layers "
                             f"{layers}, not once from each of its {mc.num_layers} layers")
        for module, q, k, v in calls:
            got = (q[1], k[1], v[1], q[-1], k[-1])
            if got != (heads, kv_heads, kv_heads, head_dim, head_dim):
                raise ValueError(f"tensor_parallel_size={get_tp_size()}: after sharding, {name} layer "
                                 f"{module.layer_idx} ({type(module).__name__}) attends with q {q}, k {k}, v {v}, not "
                                 f"{heads} q and {kv_heads} KV heads of {head_dim} per rank: its modeling code does "
                                 "not follow the split, so the transformers path cannot serve it with tensor "
                                 "parallelism")
        if split_attention and {id(m) for m, *_ in calls} != {id(m) for m in split_attention}:
            raise ValueError(f"tensor_parallel_size={get_tp_size()}: the modules of {name} that call the attention "
                             "interface are not the attention modules whose heads were split")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        with _forward_context(meta, self.paged):
            out = self.base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        base = self.base
        try:
            setattr(self.hf, self.base_prefix, _Hidden(hidden[None]))
            dummy = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=hidden.device)
            logits = self.hf(input_ids=dummy, use_cache=False, logits_to_keep=0).logits[0]
        finally:
            setattr(self.hf, self.base_prefix, base)
        return logits.contiguous()

    def load_weights(self, weights) -> None:  # from_pretrained loaded them already
        raise NotImplementedError("the transformers path loads its weights with from_pretrained")
