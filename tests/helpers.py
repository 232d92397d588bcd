"""Test helpers: the transformers oracle and prompt generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_HF_MODELS: dict[Path, Any] = {}
_HF_CACHE: dict[tuple, list[int]] = {}


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate() for one prompt (fp32), stopping at EOS as it does."""
    from transformers import AutoModelForCausalLM

    key = (path, tuple(prompt), max_new_tokens)
    if key not in _HF_CACHE:
        if path not in _HF_MODELS:
            _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = _HF_MODELS[path]
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=model.config.pad_token_id or 0)
        _HF_CACHE[key] = out[0, len(prompt):].tolist()
    return _HF_CACHE[key]


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0, low: int = 10) -> list[list[int]]:
    """Random token ids, avoiding the special tokens at the bottom of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]
