"""Tensor parallelism for the transformers modeling path: a loaded `*ForCausalLM` cut, in
place, into this rank's shard, following the model's own `base_model_tp_plan`.

Why not transformers' own `tp_plan="auto"`: it wraps every weight in a DTensor on a device
mesh of its own (a dispatch per call, `accelerate` needed), cannot replicate KV heads when the
ranks outnumber them (one KV head at TP=2 is refused), and its plans for fused or fully-normed
projections (Phi-3's `qkv_proj`, OLMo 2's q/k norm) gather the projection's output, so every
rank computes every head and holds the whole KV cache. Here the plan is read the way vLLM
reads it: each matched `nn.Linear` keeps only this rank's rows (`colwise`) or columns
(`rowwise`, its partial sums all-reduced through `pagedbackend.distributed`, the bias added once
after), and the attention modules learn their per-rank head counts, so the paged KV cache of a
rank holds only its heads.

What the plan styles mean here (transformers 5.24's names, `distributed/tensor_parallel.py`):

- `colwise`: output features split; K/V projections (`k_proj`/`v_proj`) split by KV head, or
  replicated by groups of ranks when there are more ranks than KV heads (`kv_head_split`).
- `rowwise`: input features split, output all-reduced, bias added once.
- `colwise_gather_output` / `colwise_rep`: output features split, then all-gathered (full
  output on every rank); `rowwise_split_input` / `rowwise_rep`: the full input sliced, then as
  `rowwise`. Always correct whatever the packing of the output, but heads are not split.
- `packed_colwise`: a fused `[gate; up]` weight, each half split (2-D `nn.Linear` or 3-D MoE
  experts `[experts, 2 * inter, hidden]`); `rowwise` on a 3-D experts weight splits its last
  dimension; `moe_tp_experts` all-reduces the experts module's output (every rank computed its
  slice of every routed expert).
- `replicate`, `replicated_with_grad_allreduce` (a gradient concern only), `embedding_rowwise`,
  `embedding_colwise`: kept whole on every rank (the embedding and the LM head stay replicated:
  the sampler needs the same full-vocabulary logits on every rank, and the `*ForCausalLM`'s
  own final logit transforms then apply unchanged).
- anything else (sequence parallel, MLA, attention sinks, expert parallelism): refused.

Two plans are refined (`REFINED_PLANS`), from reading their modeling code: Phi-3 packs q, k and
v into one `qkv_proj` (`[q | k | v]`, split at `config.num_attention_heads * head_dim`) and gate
and up into `gate_up_proj` (`chunk(2)`), so each part is split on its own; OLMo 2 RMS-normalises
q and k over the whole projection (all heads), so its norms become `_ShardedRMSNorm`, whose
variance is the all-reduced sum of squares over every rank's heads.

Parameters of a head-split attention module that the plan does not name are checked: one of
`[heads, head_dim]` (Cohere's per-head q/k LayerNorm) is sliced to this rank's heads; one that
spans every head some other way is refused, never silently left whole.

Memory: `from_pretrained` materialises the full model in host memory in every rank's process
(its weight conversions, e.g. Mixtral's per-expert tensors fused at load, happen there); each
weight is then replaced by a copy of this rank's slice, so the full tensors are freed before
the model moves to the device, where only the shard (plus the replicated embedding, LM head and
norms) lives.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedbackend.distributed import divide, kv_head_split, tp_all_gather, tp_all_reduce

# Styles from transformers' plans this module implements, grouped by what they do.
COLWISE = "colwise"
ROWWISE = "rowwise"
GATHER_COLWISE = ("colwise_gather_output", "colwise_rep")
SPLIT_INPUT_ROWWISE = ("rowwise_split_input", "rowwise_rep")
PACKED_COLWISE = "packed_colwise"
MOE_EXPERTS = "moe_tp_experts"
REPLICATED = ("replicate", "replicated_with_grad_allreduce", "embedding_rowwise", "embedding_colwise")
# Styles of our own, used by REFINED_PLANS.
QKV_PACKED = "qkv_packed_colwise"  # one Linear holding [q | k | v]: each part split by heads
SHARDED_RMS_NORM = "sharded_rms_norm"  # an RMSNorm over a head-split projection's full width
SUPPORTED_STYLES = frozenset({COLWISE, ROWWISE, *GATHER_COLWISE, *SPLIT_INPUT_ROWWISE, PACKED_COLWISE, MOE_EXPERTS,
                              *REPLICATED, QKV_PACKED, SHARDED_RMS_NORM})

KV_PROJECTIONS = ("k_proj", "v_proj")  # colwise projections that hold KV heads (replicated if need be)
# RMSNorm classes whose forward is exactly `w * x * rsqrt(mean(x^2) + eps)` in fp32 (read in
# transformers 5.24), which `_ShardedRMSNorm` reproduces with the mean taken over every rank.
T5_STYLE_RMS_NORMS = ("Olmo2RMSNorm",)

REFINED_PLANS: dict[str, dict[str, str]] = {
    # Phi3Attention splits qkv at config.num_attention_heads * head_dim (rewritten per rank
    # below); Phi3MLP chunks gate_up_proj's output in two.
    "phi3": {
        "layers.*.self_attn.qkv_proj": QKV_PACKED,
        "layers.*.self_attn.o_proj": ROWWISE,
        "layers.*.mlp.gate_up_proj": PACKED_COLWISE,
        "layers.*.mlp.down_proj": ROWWISE,
    },
    # Olmo2Attention: q_norm(q_proj(x)) over num_heads * head_dim, k_norm likewise, then the view.
    "olmo2": {
        "layers.*.self_attn.q_proj": COLWISE,
        "layers.*.self_attn.k_proj": COLWISE,
        "layers.*.self_attn.v_proj": COLWISE,
        "layers.*.self_attn.q_norm": SHARDED_RMS_NORM,
        "layers.*.self_attn.k_norm": SHARDED_RMS_NORM,
        "layers.*.self_attn.o_proj": ROWWISE,
        "layers.*.mlp.gate_proj": COLWISE,
        "layers.*.mlp.up_proj": COLWISE,
        "layers.*.mlp.down_proj": ROWWISE,
    },
}


def tensor_parallel_plan(config: Any) -> dict[str, str]:
    """The plan this path applies for a transformers config: the config's `base_model_tp_plan`,
    or the refined one where `REFINED_PLANS` has one and the config carries its class's own
    plan (a plan written into config.json is followed as written); a ValueError when there is
    none (nothing says how the model's layers may be split)."""
    plan = getattr(config, "base_model_tp_plan", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFINED_PLANS and plan == getattr(type(config), "base_model_tp_plan", None):
        return dict(REFINED_PLANS[model_type])
    if not plan:
        raise ValueError(f"tensor_parallel_size>1: {_arch(config)} has no tensor-parallel plan "
                         "(its transformers config has no base_model_tp_plan), so the transformers path cannot "
                         "split it; use tensor_parallel_size=1, or model_impl='native' where the architecture has it")
    return dict(plan)


@dataclass
class Heads:
    """The model's head layout and this rank's share of it."""

    heads: int
    kv_heads: int
    head_dim: int
    rank: int
    size: int
    heads_per_rank: int = field(init=False)
    kv_per_rank: int = field(init=False)
    kv_replicas: int = field(init=False)  # ranks holding each KV head (> 1: more ranks than KV heads)

    def __post_init__(self) -> None:
        self.heads_per_rank = divide(self.heads, self.size, "num_attention_heads")
        self.kv_per_rank, self.kv_replicas = kv_head_split(self.kv_heads, self.size)

    def q_rows(self) -> slice:
        """This rank's rows of a q projection (whole heads)."""
        width = self.heads_per_rank * self.head_dim
        return slice(self.rank * width, (self.rank + 1) * width)

    def kv_rows(self) -> slice:
        """This rank's rows of a k or v projection: its KV heads, shared by `kv_replicas` ranks."""
        width = self.kv_per_rank * self.head_dim
        start = (self.rank // self.kv_replicas) * width
        return slice(start, start + width)


@dataclass
class ShardResult:
    """What `shard_model` did: the head counts every attention layer now computes, and the
    attention modules it rewrote (for the caller to check against the modules that really
    call the attention interface)."""

    heads_per_rank: int
    kv_heads_per_rank: int
    head_split: bool
    attention_modules: list[nn.Module] = field(default_factory=list)


# ------------------------------------------------------------------------------ modules
class RowParallelLinear(nn.Module):
    """`y = x W^T + b` holding W's columns for this rank's input slice: the partial products
    are all-reduced and the bias is added once, after the sum. With `split_input` the input
    arrives whole (`rowwise_split_input`) and this rank takes its slice of it first."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, start: int,
                 split_input: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features = in_features  # the full width, as the module it replaces declared it
        self.out_features = weight.shape[0]
        self.start = start
        self.split_input = split_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            x = x.narrow(-1, self.start, self.weight.shape[1])
        y = tp_all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class GatherColumnLinear(nn.Module):
    """`y = x W^T + b` computing this rank's output rows, then all-gathering every rank's rows
    (`colwise_gather_output`): the full output on every rank, whatever its packing."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features = weight.shape[1]
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_all_gather(F.linear(x, self.weight, self.bias))


class _ShardedRMSNorm(nn.Module):
    """An RMSNorm over a projection whose heads are split across ranks (OLMo 2's q/k norm):
    the mean of squares is the all-reduced sum over every rank's slice divided by the full
    width (`size * local width`: when KV heads are replicated each rank holds one of
    `kv_replicas` copies, which that count includes), and each rank scales its own slice."""

    def __init__(self, weight: torch.Tensor, eps: float, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        sum_sq = tp_all_reduce(x.pow(2).sum(-1, keepdim=True))
        x = x * torch.rsqrt(sum_sq / (self.size * x.shape[-1]) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


def _all_reduce_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an experts module whose experts are split: sum the ranks' partial outputs."""
    return tp_all_reduce(output)


# ------------------------------------------------------------------------------ sharding
def _arch(config: Any) -> str:
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    return str(archs[0])


def _is_attention(module: nn.Module) -> bool:
    """An attention module as transformers writes them: `*Attention` with its `layer_idx` (the
    index the paged KV cache is found by). Decoder layers may carry a `layer_idx` too."""
    return hasattr(module, "layer_idx") and "Attention" in type(module).__name__


def _pattern(key: str) -> re.Pattern[str]:
    return re.compile(re.escape(key).replace(r"\*", r"\d+"))


def _piece(t: torch.Tensor, dim: int, rows: slice) -> torch.Tensor:
    """A copy of `t[rows]` along `dim` (a copy, so the full tensor's storage can be freed)."""
    return t.narrow(dim, rows.start, rows.stop - rows.start).clone()


def _even(n: int, size: int, rank: int, what: str) -> slice:
    part = divide(n, size, what)
    return slice(rank * part, (rank + 1) * part)


def _packed(t: torch.Tensor, dim: int, parts: list[slice]) -> torch.Tensor:
    return torch.cat([_piece(t, dim, s) for s in parts], dim=dim)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (root.get_submodule(owner) if owner else root), leaf


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


class _Sharder:
    """Applies a plan to one model for one rank; every refusal names the architecture, the
    module and why."""

    def __init__(self, model: nn.Module, config: Any, plan: dict[str, str], heads: Heads) -> None:
        self.model = model
        self.config = config
        self.plan = plan
        self.h = heads
        self.arch = _arch(config)
        self.base = getattr(model, model.base_model_prefix)
        self.kinds: dict[str, str] = {}  # module name -> "split" | "gather" | "row" | "row_split" | ...
        self.sharded_params: set[str] = set()  # parameter names sliced by parameter-level entries

    def refuse(self, what: str) -> ValueError:
        return ValueError(f"tensor_parallel_size={self.h.size}: {self.arch} cannot be split on the transformers "
                          f"path: {what}")

    # ---------------------------------------------------------------- driver
    def run(self) -> ShardResult:
        modules = dict(self.base.named_modules())
        params = dict(self.base.named_parameters())
        matched = False
        for key, style in self.plan.items():
            pattern = _pattern(key)
            hits_m = [n for n in modules if n and pattern.fullmatch(n)]
            hits_p = [n for n in params if pattern.fullmatch(n)]
            if not hits_m and not hits_p:
                continue  # transformers skips rules that match nothing too (e.g. dense-MLP rules of an all-MoE model)
            matched = True
            if style not in SUPPORTED_STYLES:
                raise self.refuse(f"its plan splits {key} with style {style!r}, which this path does not implement "
                                  f"(supported: {', '.join(sorted(SUPPORTED_STYLES))})")
            for name in hits_p:
                self._param(name, style)
            for name in hits_m:
                self._module(name, style)
        if not matched:
            raise self.refuse("no entry of its tensor-parallel plan matches any of its modules")
        self._check_experts()
        self._check_pairs()
        return self._attention()

    def _check_pairs(self) -> None:
        """Outside attention too, a block whose input projections are split (gate/up) needs the
        row-parallel projection that sums them (down), and the other way round; anything else
        would hand a shard to a layer that expects the whole (or the reverse). Gathered and
        split-input layers take and give whole tensors: correct on their own."""
        blocks: dict[str, set[str]] = {}
        for name, kind in self.kinds.items():
            blocks.setdefault(name.rpartition(".")[0], set()).add(kind)
        for owner, kinds in sorted(blocks.items()):
            if ("split" in kinds) != ("row" in kinds):
                children = sorted(f"{n}: {k}" for n, k in self.kinds.items() if n.rpartition(".")[0] == owner)
                raise self.refuse(f"its plan splits {owner or 'the base model'} inconsistently "
                                  f"({', '.join(children)}): column-split layers need a rowwise layer after them in "
                                  "the same block to sum their shards, and a rowwise layer needs them before it")

    # ---------------------------------------------------------- module rules
    def _module(self, name: str, style: str) -> None:
        module = self.base.get_submodule(name)
        if style in REPLICATED:
            self.kinds[name] = "replicated"
            return
        if style == MOE_EXPERTS:
            self._experts(name, module)
            return
        if style == SHARDED_RMS_NORM:
            self._rms_norm(name, module)
            return
        if not isinstance(module, nn.Linear):
            raise self.refuse(f"its plan splits {name} ({type(module).__name__}) as {style!r}, but only nn.Linear "
                              "layers are split that way here")
        weight, bias = module.weight, module.bias
        h = self.h
        if style == COLWISE:
            rows = self._colwise_rows(name, module)
            module.weight = nn.Parameter(_piece(weight, 0, rows), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(_piece(bias, 0, rows), requires_grad=False)
            module.out_features = rows.stop - rows.start
            self.kinds[name] = "split"
        elif style == PACKED_COLWISE:
            half = divide(module.out_features, 2, f"{name} out_features (packed gate/up)")
            part = divide(half, h.size, f"{name} intermediate size")
            parts = [slice(h.rank * part, (h.rank + 1) * part), slice(half + h.rank * part, half + (h.rank + 1) * part)]
            module.weight = nn.Parameter(_packed(weight, 0, parts), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(_packed(bias, 0, parts), requires_grad=False)
            module.out_features = 2 * part
            self.kinds[name] = "split"
        elif style == QKV_PACKED:
            q = h.heads * h.head_dim
            kv = h.kv_heads * h.head_dim
            if module.out_features != q + 2 * kv:
                raise self.refuse(f"{name} has {module.out_features} output features, not q + k + v = {q + 2 * kv}")
            qs, ks = h.q_rows(), h.kv_rows()
            parts = [qs, slice(q + ks.start, q + ks.stop), slice(q + kv + ks.start, q + kv + ks.stop)]
            module.weight = nn.Parameter(_packed(weight, 0, parts), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(_packed(bias, 0, parts), requires_grad=False)
            module.out_features = sum(p.stop - p.start for p in parts)
            self.kinds[name] = "split"
        elif style in GATHER_COLWISE:
            rows = _even(module.out_features, h.size, h.rank, f"{name} out_features")
            new = GatherColumnLinear(_piece(weight, 0, rows), None if bias is None else _piece(bias, 0, rows),
                                     module.out_features)
            self._replace(name, new)
            self.kinds[name] = "gather"
        elif style == ROWWISE or style in SPLIT_INPUT_ROWWISE:
            cols = _even(module.in_features, h.size, h.rank, f"{name} in_features")
            new = RowParallelLinear(_piece(weight, 1, cols), None if bias is None else bias.detach().clone(),
                                    module.in_features, cols.start, split_input=style != ROWWISE)
            self._replace(name, new)
            self.kinds[name] = "row" if style == ROWWISE else "row_split"
        else:
            raise self.refuse(f"its plan splits {name} ({type(module).__name__}) as {style!r}, which applies to "
                              "parameters, not to this module")

    def _colwise_rows(self, name: str, module: nn.Linear) -> slice:
        h = self.h
        leaf = name.rpartition(".")[2]
        kv_width = h.kv_heads * h.head_dim
        if leaf in KV_PROJECTIONS and module.out_features == kv_width:
            return h.kv_rows()
        if h.kv_replicas > 1 and module.out_features == kv_width and self._in_attention(name):
            # A KV projection we cannot recognise by name: splitting it would cut a KV head in pieces.
            raise self.refuse(f"{name} looks like a KV projection ({kv_width} outputs = {h.kv_heads} KV heads) but "
                              f"is not named {' or '.join(KV_PROJECTIONS)}, and with {h.kv_heads} KV heads on "
                              f"{h.size} ranks its heads must be replicated, not split")
        return _even(module.out_features, h.size, h.rank, f"{name} out_features")

    def _in_attention(self, name: str) -> bool:
        owner = name.rpartition(".")[0]
        return bool(owner) and _is_attention(self.base.get_submodule(owner))

    def _replace(self, name: str, new: nn.Module) -> None:
        owner, leaf = _parent(self.base, name)
        setattr(owner, leaf, new)

    def _rms_norm(self, name: str, module: nn.Module) -> None:
        if type(module).__name__ not in T5_STYLE_RMS_NORMS:
            raise self.refuse(f"{name} is a {type(module).__name__}, not one of the RMSNorms whose variance can be "
                              f"all-reduced here ({', '.join(T5_STYLE_RMS_NORMS)})")
        h = self.h
        width = module.weight.shape[0]
        if width == h.heads * h.head_dim:
            rows = h.q_rows()
        elif width == h.kv_heads * h.head_dim:
            rows = h.kv_rows()
        else:
            raise self.refuse(f"{name} normalises {width} features, neither the q ({h.heads * h.head_dim}) nor the "
                              f"k ({h.kv_heads * h.head_dim}) projection's width")
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        self._replace(name, _ShardedRMSNorm(_piece(module.weight, 0, rows), eps, h.size))
        self.kinds[name] = "split"

    # ------------------------------------------------------------ MoE experts
    def _param(self, name: str, style: str) -> None:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.base.get_submodule(owner_name) if owner_name else self.base
        param = getattr(owner, leaf)
        if style in REPLICATED:
            return
        if param.dim() != 3:
            raise self.refuse(f"its plan splits the parameter {name} of shape {tuple(param.shape)} as {style!r}; "
                              "only 3-D MoE expert weights are split as parameters here")
        if getattr(owner, "is_transposed", False) or getattr(owner, "has_bias", False):
            raise self.refuse(f"the experts module {owner_name} stores transposed weights or has biases "
                              "(is_transposed/has_bias), which this path does not split")
        h = self.h
        if style == PACKED_COLWISE:  # [experts, 2 * inter, hidden]
            two_inter = param.shape[1]
            inter = divide(two_inter, 2, f"{name} packed gate/up rows")
            part = divide(inter, h.size, f"{name} expert intermediate size")
            if getattr(owner, "is_concatenated", True):  # [gate; up]: each half split
                parts = [slice(h.rank * part, (h.rank + 1) * part),
                         slice(inter + h.rank * part, inter + (h.rank + 1) * part)]
                value = _packed(param, 1, parts)
            else:  # [g0, u0, g1, u1, ...]: contiguous pairs
                value = _piece(param, 1, slice(2 * h.rank * part, 2 * (h.rank + 1) * part))
        elif style == COLWISE:  # [experts, out, in]: outputs split
            value = _piece(param, 1, _even(param.shape[1], h.size, h.rank, f"{name} output rows"))
        elif style == ROWWISE:  # [experts, out, in]: inputs split
            value = _piece(param, 2, _even(param.shape[2], h.size, h.rank, f"{name} input columns"))
        else:
            raise self.refuse(f"its plan splits the parameter {name} as {style!r}, which this path does not apply "
                              "to parameters")
        _set_param(owner, leaf, value)
        self.sharded_params.add(name)

    def _experts(self, name: str, module: nn.Module) -> None:
        inter = getattr(module, "intermediate_dim", None)
        if isinstance(inter, int):
            module.intermediate_dim = divide(inter, self.h.size, f"{name} intermediate_dim")
        module.register_forward_hook(_all_reduce_output)
        self.kinds[name] = "experts"

    def _check_experts(self) -> None:
        """Sliced expert weights and the reduction of their output go together: one without the
        other would drop or multiply the experts' contribution."""
        owners = {n.rpartition(".")[0] for n in self.sharded_params}
        reduced = {n for n, k in self.kinds.items() if k == "experts"}
        if owners - reduced:
            raise self.refuse(f"expert weights of {sorted(owners - reduced)[0]} are split but its plan does not "
                              f"all-reduce the module's output ({MOE_EXPERTS!r})")
        if reduced - owners:
            raise self.refuse(f"its plan all-reduces the output of {sorted(reduced - owners)[0]} but splits none of "
                              "its weights")
        for name in sorted(reduced):
            module = self.base.get_submodule(name)
            whole = [p for p, _ in module.named_parameters(recurse=False) if f"{name}.{p}" not in self.sharded_params]
            if whole:
                raise self.refuse(f"the experts module {name} has weights the plan leaves whole ({', '.join(whole)}): "
                                  "every rank would add all of their contribution")

    # -------------------------------------------------------------- attention
    def _attention(self) -> ShardResult:
        """Classify every attention module (the owner, with a `layer_idx`, of planned
        projections): heads split (its input projections `colwise`, its output `rowwise`) or
        computed whole on every rank (gathered projections, `rowwise_split_input` output);
        anything mixed is refused. Split ones get per-rank head counts."""
        h = self.h
        owners: dict[str, list[str]] = {}
        for name, kind in self.kinds.items():
            owner = name.rpartition(".")[0]
            if owner and _is_attention(self.base.get_submodule(owner)):
                owners.setdefault(owner, []).append(name)
        if not owners:
            raise self.refuse("its plan splits no attention module (no planned layer inside an *Attention module "
                              "with a layer_idx)")
        split_modules: list[nn.Module] = []
        layouts = set()
        for owner, children in sorted(owners.items()):
            kinds = {self.kinds[c] for c in children} - {"replicated"}
            if kinds <= {"split", "row"} and "split" in kinds and "row" in kinds:
                module = self.base.get_submodule(owner)
                self._per_head_params(owner, module, children)
                self._rewrite_heads(module)
                split_modules.append(module)
                layouts.add("split")
            elif kinds and kinds <= {"gather", "row_split"}:
                layouts.add("gather")
            else:
                raise self.refuse(f"its plan splits the attention module {owner} inconsistently "
                                  f"({', '.join(sorted(f'{c}: {self.kinds[c]}' for c in children))}): its heads are "
                                  "neither split (q/k/v colwise, output rowwise) nor computed whole (gathered q/k/v, "
                                  "output rowwise_split_input)")
        if len(layouts) > 1:
            raise self.refuse("some attention layers would split their heads and others not; the paged KV cache "
                              "needs one head count for every layer")
        if "split" in layouts:
            return ShardResult(h.heads_per_rank, h.kv_per_rank, True, split_modules)
        return ShardResult(h.heads, h.kv_heads, False, [])

    def _per_head_params(self, owner: str, module: nn.Module, planned: list[str]) -> None:
        """Slice the unplanned per-head parameters of a head-split attention module to this
        rank's heads; refuse any other parameter that spans every head."""
        h = self.h
        planned_prefixes = tuple(c[len(owner) + 1:] + "." for c in planned)
        for pname, param in list(module.named_parameters()):
            if pname.startswith(planned_prefixes):
                continue
            shape = tuple(param.shape)
            if shape == (h.head_dim,):
                continue  # a norm over one head (Qwen3, Gemma 3): the same for every head
            sub, leaf = _parent(module, pname)
            if shape[:2] == (h.heads, h.head_dim):
                _set_param(sub, leaf, _piece(param, 0, slice(h.q_rows().start // h.head_dim,
                                                             h.q_rows().stop // h.head_dim)))
            elif shape[:2] == (h.kv_heads, h.head_dim):
                kv = h.kv_rows()
                _set_param(sub, leaf, _piece(param, 0, slice(kv.start // h.head_dim, kv.stop // h.head_dim)))
            elif any(d in (h.heads, h.kv_heads, h.heads * h.head_dim, h.kv_heads * h.head_dim) for d in shape[:1]):
                raise self.refuse(f"{owner}.{pname} (shape {shape}) spans every attention head and its plan does not "
                                  "say how to split it")

    def _rewrite_heads(self, module: nn.Module) -> None:
        """Per-rank head counts on the attention module and on a private copy of its config:
        most modules reshape with `(..., -1, head_dim)`, but some slice by the counts (Phi-3's
        `qkv[..., :config.num_attention_heads * head_dim]`) or repeat KV heads by
        `num_key_value_groups` (eager attention)."""
        h = self.h
        full = {"num_heads": h.heads, "num_attention_heads": h.heads, "num_key_value_heads": h.kv_heads,
                "num_kv_heads": h.kv_heads, "num_key_value_groups": h.heads // h.kv_heads}
        local = {"num_heads": h.heads_per_rank, "num_attention_heads": h.heads_per_rank,
                 "num_key_value_heads": h.kv_per_rank, "num_kv_heads": h.kv_per_rank,
                 "num_key_value_groups": h.heads_per_rank // h.kv_per_rank}
        for attr, value in local.items():
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == full[attr]:
                setattr(module, attr, value)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            config = copy.copy(config)
            if getattr(config, "head_dim", None) is None:
                config.head_dim = h.head_dim  # a default of hidden_size // num_attention_heads would now be wrong
            config.num_attention_heads = h.heads_per_rank
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = h.kv_per_rank
            module.config = config


def shard_model(model: nn.Module, config: Any, rank: int, size: int, plan: dict[str, str] | None = None,
                num_heads: int | None = None, num_kv_heads: int | None = None,
                head_dim: int | None = None) -> ShardResult:
    """Cut the loaded `*ForCausalLM` `model` down to rank `rank`'s shard of `size`, in place,
    following `plan` (default: `tensor_parallel_plan(config)`). Head counts default to the
    config's. Works on a meta-device model too (a dry run: shapes only, no collective runs).
    A ValueError naming the architecture for anything this path cannot split correctly."""
    plan = tensor_parallel_plan(config) if plan is None else plan
    heads = num_heads or config.num_attention_heads
    kv_heads = num_kv_heads or getattr(config, "num_key_value_heads", None) or heads
    dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    return _Sharder(model, config, plan, Heads(heads, kv_heads, dim, rank, size)).run()


def check_tensor_parallel(model_config: Any, tp: int) -> None:
    """Refuse, at configuration time and before any weight is read, a model the transformers
    path cannot split over `tp` ranks: the plan is applied to the model built on the meta
    device (no memory, no weights), so every refusal `shard_model` would raise at load time
    is raised here, in the process that asked."""
    from transformers import AutoConfig

    from pagedbackend.models.transformers_impl import causal_lm_class

    cls = causal_lm_class(model_config)
    config = AutoConfig.from_pretrained(str(model_config.path))
    tensor_parallel_plan(config)
    with torch.device("meta"):
        model = cls._from_config(config)
    shard_model(model, config, 0, tp, num_heads=model_config.num_heads, num_kv_heads=model_config.num_kv_heads,
                head_dim=model_config.head_dim)
