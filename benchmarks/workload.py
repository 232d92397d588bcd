"""Seeded request sets shared by every benchmark, so each engine sees the same requests.

- `random_token_workload`: the reference CPU workload (../shared/benchmark-notes.md): 64
  requests of random token ids, prompt lengths uniform in [64, 256], 128 new tokens each.
- `sharegpt_workload` / `alpaca_workload`: lengths shaped like the datasets the PagedAttention
  paper measured (ShareGPT: mean 161 input / 338 output tokens, long-tailed; Alpaca: 19 / 58),
  drawn from log-normal distributions with those means and multiplied by `scale` so a CPU run
  takes minutes (clipping the tail at the model's length leaves the means ~4% lower). The texts are random token ids: only lengths matter to an engine's speed.
- `shared_prefix_workload`: many requests behind one long common system prompt.
- `parallel_sampling_workload`: ShareGPT-shaped requests asking for n = 2, 4 or 6 samples.

Every request ignores EOS, so each engine generates exactly `max_tokens` tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# The 56M-parameter reference shape: hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 32000.
REFERENCE_MODEL = dict(arch="llama", hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                       num_kv_heads=4, vocab_size=32000, max_position_embeddings=2048)


# (mean input, mean output, sigma of log input, sigma of log output): the means are the
# PagedAttention paper's; the spreads give its long-tailed shape (ShareGPT's outputs reach ~2k).
DATASET_SHAPES = {"sharegpt": (161, 338, 1.0, 0.8), "alpaca": (19, 58, 0.6, 0.7)}


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int
    n: int = 1


def _ids(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    # Ids from 10 up: the bottom of the vocabulary holds the special tokens.
    return [rng.randrange(10, vocab_size) for _ in range(length)]


def random_token_workload(num_requests: int = 64, min_prompt: int = 64, max_prompt: int = 256,
                          max_tokens: int = 128, vocab_size: int = 32000, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(_ids(rng, rng.randint(min_prompt, max_prompt), vocab_size), max_tokens)
            for _ in range(num_requests)]


def _lognormal(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that the (unclipped) mean is `mean`
    return max(low, min(high, round(rng.lognormvariate(mu, sigma))))


def dataset_lengths(name: str, num_requests: int, scale: float = 1.0, seed: int = 0,
                    max_len: int = 2048) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs shaped like `name` ("sharegpt" or "alpaca")."""
    mean_in, mean_out, sigma_in, sigma_out = DATASET_SHAPES[name]
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_requests):
        prompt = _lognormal(rng, mean_in * scale, sigma_in, 1, max_len // 2)
        output = _lognormal(rng, mean_out * scale, sigma_out, 1, max_len - prompt)
        pairs.append((prompt, output))
    return pairs


def sharegpt_workload(num_requests: int = 64, scale: float = 0.25, vocab_size: int = 32000, seed: int = 0,
                      name: str = "sharegpt", max_len: int = 2048) -> list[Request]:
    rng = random.Random(seed + 1)
    return [Request(_ids(rng, p, vocab_size), o)
            for p, o in dataset_lengths(name, num_requests, scale, seed, max_len)]


def alpaca_workload(num_requests: int = 64, scale: float = 1.0, vocab_size: int = 32000, seed: int = 0) -> list[Request]:
    return sharegpt_workload(num_requests, scale, vocab_size, seed, name="alpaca")


def shared_prefix_workload(num_requests: int = 32, prefix_len: int = 1024, min_suffix: int = 16,
                           max_suffix: int = 64, max_tokens: int = 16, vocab_size: int = 32000,
                           seed: int = 0) -> list[Request]:
    """One long system prompt shared by every request, then a short question of its own."""
    rng = random.Random(seed)
    prefix = _ids(rng, prefix_len, vocab_size)
    return [Request(prefix + _ids(rng, rng.randint(min_suffix, max_suffix), vocab_size), max_tokens)
            for _ in range(num_requests)]


def parallel_sampling_workload(n: int, num_requests: int = 32, scale: float = 0.25, vocab_size: int = 32000,
                               seed: int = 0) -> list[Request]:
    return [Request(r.prompt_token_ids, r.max_tokens, n) for r in sharegpt_workload(num_requests, scale, vocab_size, seed)]


def summary(requests: list[Request]) -> str:
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.max_tokens for r in requests]
    ns = sorted({r.n for r in requests})
    return (f"{len(requests)} requests, prompt mean {sum(prompts) / len(prompts):.0f} (max {max(prompts)}), "
            f"output mean {sum(outputs) / len(outputs):.0f} (max {max(outputs)})" + (f", n={ns}" if ns != [1] else ""))


def reference_model(path: Path | None = None) -> Path:
    """The reference model directory, built once (random weights, offline tokenizer)."""
    from pagedbackend.tiny_model import build_tiny_model

    path = path or OUT / "models" / "llama-56m"
    if not (path / "config.json").is_file():
        print(f"building the reference model in {path} ...", flush=True)
        build_tiny_model(path, **REFERENCE_MODEL)
    return path
