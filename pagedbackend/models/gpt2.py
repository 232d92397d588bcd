"""GPT-2: learned absolute positions, LayerNorm, fused c_attn, GELU MLP, tied LM head. Blocks
carry the residual stream beside the hidden state (see llama.py), so each residual add is
fused into the next LayerNorm on the GPU path.

Checkpoints store GPT-2's projections as `Conv1D` weights ([in, out]); they are transposed
at load into ordinary linear weights ([out, in]).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedbackend.attention.layer import PagedAttention
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.models.config import ModelConfig
from pagedbackend.distributed import divide, get_tp_size
from pagedbackend.models.base import CausalLM
from pagedbackend.models.layers import (ACTIVATIONS, ColumnParallelLinear, LayerNorm, LMHead,
                                        RowParallelLinear, VocabEmbedding)

_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class GPT2Attention(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int):
        super().__init__()
        hf = mc.hf
        hidden = hf.hidden_size
        self.num_heads = divide(mc.num_heads, get_tp_size(), "n_head")
        self.head_dim = hidden // mc.num_heads
        scale = self.head_dim ** -0.5 if hf.get("scale_attn_weights", True) else 1.0
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.c_attn = ColumnParallelLinear(hidden, [hidden, hidden, hidden], bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=scale)

    def forward(self, x, meta):
        t = x.shape[0]
        q, k, v = self.c_attn(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        o = self.attn(q, k, v, meta)
        return self.c_proj(o.reshape(t, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        hidden = mc.hf.hidden_size
        inner = mc.hf.get("n_inner") or 4 * hidden
        act = mc.hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"model: activation_function {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.c_fc = ColumnParallelLinear(hidden, [inner], bias=True)
        self.c_proj = RowParallelLinear(inner, hidden, bias=True)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, eps = mc.hf.hidden_size, mc.hf.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(mc, layer_idx)
        self.ln_2 = LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(mc)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (MLP output, residual stream before it), as LlamaDecoderLayer: the
        previous block's output is added into the residual by this block's ln_1 (one fused
        kernel on the GPU path)."""
        if residual is None:
            residual = h
            h = self.ln_1(h)
        else:
            h, residual = self.ln_1(h, residual)
        h, residual = self.ln_2(self.attn(h, meta), residual)
        return self.mlp(h), residual


class GPT2LMHeadModel(CausalLM):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        hf = mc.hf
        if hf.get("add_cross_attention", False):
            raise ValueError("model: GPT-2 with cross-attention (encoder-decoder use) is not supported")
        hidden = hf.hidden_size
        self.wte = VocabEmbedding(mc.vocab_size, hidden)
        self.wpe = VocabEmbedding(mc.max_position_embeddings or 1024, hidden, parallel=False)
        self.h = nn.ModuleList(GPT2Block(mc, i) for i in range(mc.num_layers))
        self.ln_f = LayerNorm(hidden, eps=hf.get("layer_norm_epsilon", 1e-5))
        self.tied_embeddings = bool(hf.get("tie_word_embeddings", True))
        self.lm_head = LMHead(mc.vocab_size, hidden, self.wte if self.tied_embeddings else None)

    def forward(self, input_ids, positions, meta):
        h = self.wte(input_ids) + self.wpe(positions)
        residual = None
        for block in self.h:
            h, residual = block(h, residual, meta)
        if residual is None:  # no blocks
            return self.ln_f(h)
        h, _ = self.ln_f(h, residual)
        return h

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def transform_weight(self, name, tensor):
        if name.endswith(".weight") and any(f".{c}." in f".{name}" for c in _CONV1D):
            tensor = tensor.t()
        if ".attn.c_attn." in f".{name}":
            # Fused [q | k | v]: hand each part to its shard so a tensor-parallel run splits each.
            for i, part in enumerate(tensor.chunk(3, dim=0)):
                yield f"{name}#{i}", part
            return
        yield name, tensor

    def map_weight_name(self, name):
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers in older checkpoints
        if name == "lm_head.weight":
            return None if self.tied_embeddings else ("lm_head", 0, False)
        name, _, shard = name.partition("#")
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        path, _, kind = name.rpartition(".")
        return path, int(shard or 0), kind == "bias"
