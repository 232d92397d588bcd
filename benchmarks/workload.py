"""Seeded request sets shared by every benchmark, so each engine sees the same requests.

The reference CPU workload (../shared/benchmark-notes.md): 64 requests of random token ids,
prompt lengths uniform in [64, 256], 128 new tokens each, greedy, EOS ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# The 56M-parameter reference shape: hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 32000.
REFERENCE_MODEL = dict(arch="llama", hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                       num_kv_heads=4, vocab_size=32000, max_position_embeddings=2048)


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def random_token_workload(num_requests: int = 64, min_prompt: int = 64, max_prompt: int = 256,
                          max_tokens: int = 128, vocab_size: int = 32000, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    # Ids from 10 up: the bottom of the vocabulary holds the special tokens.
    return [Request([rng.randrange(10, vocab_size) for _ in range(rng.randint(min_prompt, max_prompt))], max_tokens)
            for _ in range(num_requests)]


def reference_model(path: Path | None = None) -> Path:
    """The reference model directory, built once (random weights, offline tokenizer)."""
    from pagedbackend.tiny_model import build_tiny_model

    path = path or OUT / "models" / "llama-56m"
    if not (path / "config.json").is_file():
        print(f"building the reference model in {path} ...", flush=True)
        build_tiny_model(path, **REFERENCE_MODEL)
    return path
