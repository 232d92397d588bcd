"""Llama and the families built like it: Mistral (sliding window), Qwen2 (q/k/v bias, often
tied embeddings) and Qwen3 (per-head RMSNorm of q and k before RoPE, no bias, optional sliding
window per layer). One module, switched by config fields, as the architectures differ only in
those details.

The decoder layer carries the residual stream beside the hidden state, as vLLM does: each
RMSNorm after the first is `residual += x; x = norm(residual)` (one kernel on the GPU path), q/k
are rotated in place in the qkv projection, and SwiGLU is one kernel, so a layer issues about
ten launches on CUDA (tests/test_launch_count.py) instead of 32 (bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedbackend.attention.layer import PagedAttention
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.models.config import ModelConfig
from pagedbackend.distributed import divide, get_tp_size, kv_head_split
from pagedbackend.models.base import CausalLM
from pagedbackend.models.layers import (ACTIVATIONS, ColumnParallelLinear, LMHead, RMSNorm, RowParallelLinear,
                                        VocabEmbedding, qk_norm_, silu_and_mul)
from pagedbackend.models.rotary import RopeInputs, RotaryEmbedding, rope_parameters


def layer_sliding_windows(mc: ModelConfig) -> list[int | None]:
    """Sliding window per layer, following transformers: `layer_types` when present; else
    Mistral applies `sliding_window` everywhere and Qwen2 only from `max_window_layers` on,
    when `use_sliding_window` is set."""
    hf = mc.hf
    n = mc.num_layers
    window = hf.get("sliding_window")
    model_type = hf.get("model_type", "")
    types = hf.get("layer_types")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * n
    if isinstance(types, list) and len(types) == n:
        return [window if t == "sliding_attention" else None for t in types]
    if model_type == "qwen2":
        start = hf.get("max_window_layers", n)
        return [window if i >= start else None for i in range(n)]
    return [window] * n


class LlamaAttention(nn.Module):
    def __init__(self, mc: ModelConfig, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        hf = mc.hf
        tp = get_tp_size()
        self.num_heads = divide(mc.num_heads, tp, "num_attention_heads")
        self.num_kv_heads, kv_replicas = kv_head_split(mc.num_kv_heads, tp)
        self.head_dim = mc.head_dim
        model_type = hf.get("model_type")
        qwen2 = model_type == "qwen2"
        qkv_bias = bool(hf.get("attention_bias", False)) or qwen2
        o_bias = bool(hf.get("attention_bias", False)) and not qwen2
        # Qwen3: each head's q and k are RMS-normalised (over head_dim) before RoPE.
        qk_norm = model_type == "qwen3"
        eps = hf.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(mc.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(mc.head_dim, eps) if qk_norm else None
        self.qkv_proj = ColumnParallelLinear(
            hf.hidden_size, [mc.num_heads * self.head_dim, mc.num_kv_heads * self.head_dim,
                             mc.num_kv_heads * self.head_dim], bias=qkv_bias, replicas=[1, kv_replicas, kv_replicas])
        self.o_proj = RowParallelLinear(mc.num_heads * self.head_dim, hf.hidden_size, bias=o_bias)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim ** -0.5, sliding_window=sliding_window)
        self._split = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim]

    def forward(self, rope: RopeInputs, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self._split[0], self._split[1]
        qk = qkv[:, :q_size + kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qk = qk_norm_(qk, self.num_heads, self.q_norm, self.k_norm)
        qk = self.rotary.rotate(qk, rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, q_size + kv_size:].view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, meta)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        hf = mc.hf
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"model: hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.fused_silu = act == "silu"  # SwiGLU: silu_and_mul (one kernel on the GPU path)
        bias = bool(hf.get("mlp_bias", False))
        inter = hf.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(hf.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hf.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_silu:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, mc: ModelConfig, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        eps = mc.hf.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(mc.hf.hidden_size, eps)
        self.self_attn = LlamaAttention(mc, rotary, sliding_window)
        self.post_attention_layernorm = RMSNorm(mc.hf.hidden_size, eps)
        self.mlp = LlamaMLP(mc)

    def forward(self, rope: RopeInputs, h: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (MLP output, residual stream before it): the previous layer's
        output is added into the residual by this layer's first norm (None: h is the
        embedding, and becomes the residual). Both tensors may be updated in place."""
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(rope, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    _STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, mc: ModelConfig):
        super().__init__()
        hf = mc.hf
        max_pos = mc.max_position_embeddings or 2048
        rope = rope_parameters(hf)
        self.rotary = RotaryEmbedding(mc.head_dim, max_pos, rope,
                                      float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))))
        self.embed_tokens = VocabEmbedding(mc.vocab_size, hf.hidden_size)
        windows = layer_sliding_windows(mc)
        self.layers = nn.ModuleList(LlamaDecoderLayer(mc, self.rotary, windows[i]) for i in range(mc.num_layers))
        self.norm = RMSNorm(hf.hidden_size, hf.get("rms_norm_eps", 1e-6))
        self.tied_embeddings = bool(hf.get("tie_word_embeddings", False))
        self.lm_head = LMHead(mc.vocab_size, hf.hidden_size, self.embed_tokens if self.tied_embeddings else None)

    def forward(self, input_ids, positions, meta):
        h = self.embed_tokens(input_ids)
        rope = self.rotary.step_inputs(positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(rope, h, residual, meta)
        if residual is None:  # no layers
            return self.norm(h)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def map_weight_name(self, name):
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight":
            return None if self.tied_embeddings else ("lm_head", 0, False)
        if name.startswith("model."):
            name = name[len("model."):]
        path, _, kind = name.rpartition(".")
        is_bias = kind == "bias"
        parent, _, leaf = path.rpartition(".")
        if leaf in self._STACKED:
            fused, shard = self._STACKED[leaf]
            return f"{parent}.{fused}", shard, is_bias
        return path, 0, is_bias
