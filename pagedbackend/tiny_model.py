"""Build small random-weight models in real Hugging Face layout, with no model hub.

The directory is exactly what `save_pretrained` writes for a published checkpoint
(config.json, generation_config.json, *.safetensors, tokenizer files), so loading it goes
through the same code as a user's Llama. The tokenizer is a byte-level BPE trained offline on
a built-in corpus padded with synthetic words to reach the requested vocabulary.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

ARCHS = ("llama", "mistral", "qwen2", "gpt2")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
PagedAttention stores the key and value cache in fixed-size blocks, like pages of virtual memory.
A block table maps each sequence's logical blocks to physical blocks, so memory is allocated on
demand and shared between sequences that start with the same prompt. Continuous batching lets new
requests join a running batch at every step instead of waiting for the whole batch to finish.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning they sailed out before sunrise and came back at noon with baskets full of fish.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\
Unicode text: café, naïve, façade, jalapeño, Grüße, smørrebrød, 東京, 日本語, 한국어, emoji 🙂🚀✨.
"""


def train_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer (every string encodes; no unknown characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4 * vocab_size)]
    lines = [_CORPUS] * 4 + [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, vocab_size: int, tokenizer: Any, *, hidden_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int | None, intermediate_size: int | None, max_position_embeddings: int,
                tie_word_embeddings: bool | None, sliding_window: int | None, rope_scaling: dict | None,
                init_std: float) -> Any:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=max_position_embeddings, n_embd=hidden_size,
                          n_layer=num_layers, n_head=num_heads, n_inner=intermediate_size,
                          initializer_range=init_std, tie_word_embeddings=True if tie_word_embeddings is None
                          else tie_word_embeddings, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
                  intermediate_size=intermediate_size or 4 * hidden_size,
                  max_position_embeddings=max_position_embeddings, initializer_range=init_std, **ids)
    if rope_scaling:
        common["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=bool(tie_word_embeddings), **common)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=bool(tie_word_embeddings), sliding_window=sliding_window, **common)
    if arch == "qwen2":
        # Small Qwen2 checkpoints tie their embeddings; so does ours unless told otherwise.
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        extra = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 0} if sliding_window else {}
        return Qwen2Config(tie_word_embeddings=tie, **extra, **common)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")


def build_tiny_model(
    out: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool | None = None,
    sliding_window: int | None = None,
    rope_scaling: dict | None = None,
    init_std: float = 0.02,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a random-weight `arch` model and its tokenizer to `out`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or train_tokenizer(vocab_size, seed)
    config = make_config(arch, len(tokenizer), tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, num_kv_heads=None if arch == "gpt2" else num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=tie_word_embeddings, sliding_window=sliding_window,
                         rope_scaling=rope_scaling, init_std=init_std)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out
