"""Test helpers: the transformers oracle and prompt generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.kernels.layout import kv_cache_shape

_HF_MODELS: dict[Path, Any] = {}
_HF_CACHE: dict[tuple, list[int]] = {}


def hf_model(path: Path) -> Any:
    """The transformers model of a tiny model directory (fp32), loaded once per session."""
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_MODELS[path]


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int, **generate_kwargs: Any) -> list[int]:
    """transformers' greedy generate() for one prompt (fp32), stopping at EOS as it does;
    `generate_kwargs` adds its logits processors (repetition_penalty, sequence_bias, ...)."""
    key = (path, tuple(prompt), max_new_tokens, repr(sorted(generate_kwargs.items())))
    if key not in _HF_CACHE:
        model = hf_model(path)
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=model.config.pad_token_id or 0, **generate_kwargs)
        _HF_CACHE[key] = out[0, len(prompt):].tolist()
    return _HF_CACHE[key]


def hf_log_softmax(path: Path, tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of `tokens` (row p predicts p + 1)."""
    model = hf_model(path)
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0, low: int = 10) -> list[list[int]]:
    """Random token ids, avoiding the special tokens at the bottom of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]


def build_batch(query_lens, seq_lens, num_kv_heads, block_size, head_dim, num_heads, dtype=torch.float32, seed=0):
    """Random q/k/v and a cache whose blocks are scattered; the context part of every sequence
    is already in the cache, the new tokens' K/V are passed in (the backend writes them)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 7
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shape = kv_cache_shape(num_blocks, num_kv_heads, block_size, head_dim)
    key_cache = torch.randn(shape, generator=g, dtype=dtype)
    value_cache = torch.randn(shape, generator=g, dtype=dtype)
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(perm[used:used + n])
        used += n
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = torch.tensor(t)
    total = sum(query_lens)
    q = torch.randn(total, num_heads, head_dim, generator=g, dtype=dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g, dtype=dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g, dtype=dtype)
    slots = []
    for t, ql, s in zip(tables, query_lens, seq_lens):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(s - ql, s)]
    qsl = [0]
    for ql in query_lens:
        qsl.append(qsl[-1] + ql)
    num_decodes = 0  # backends expect the single-token rows first
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        num_seqs=len(seq_lens), num_tokens=total, slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=list(seq_lens))
    return q, k, v, key_cache, value_cache, meta, tables


def reference(q, k, v, key_cache, value_cache, meta, tables, scale, window, soft_cap=None):
    """Plain float64 attention from a cache that has the new tokens written in; `soft_cap`
    caps the scaled scores first, as transformers' eager Gemma 2 does: cap * tanh(s / cap)."""
    kc, vc = key_cache.double().clone(), value_cache.double().clone()
    block_size = kc.shape[2]
    num_heads, num_kv_heads = q.shape[1], kc.shape[1]
    for t, slot in enumerate(meta.slot_mapping.tolist()):
        kc[slot // block_size, :, slot % block_size] = k[t].double()
        vc[slot // block_size, :, slot % block_size] = v[t].double()
    out = torch.empty(q.shape, dtype=torch.float64)
    qsl = meta.query_start_loc_host
    for i, table in enumerate(tables):
        seq_len = meta.seq_lens_host[i]
        keys = kc[table].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, kc.shape[-1])[:, :seq_len]
        values = vc[table].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, kc.shape[-1])[:, :seq_len]
        q_len = qsl[i + 1] - qsl[i]
        for j in range(q_len):
            pos = seq_len - q_len + j
            lo = max(0, pos - window + 1) if window else 0
            for h in range(num_heads):
                kvh = h // (num_heads // num_kv_heads)
                s = (keys[kvh, lo:pos + 1] @ q[qsl[i] + j, h].double()) * scale
                if soft_cap is not None:
                    s = torch.tanh(s / soft_cap) * soft_cap
                out[qsl[i] + j, h] = torch.softmax(s, 0) @ values[kvh, lo:pos + 1]
    return out


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()
