"""Build small random-weight models in real Hugging Face layout, with no model hub.

The directory is exactly what `save_pretrained` writes for a published checkpoint
(config.json, generation_config.json, *.safetensors, tokenizer files), so loading it goes
through the same code as a user's Llama. The tokenizer is a byte-level BPE trained offline on
a built-in corpus padded with synthetic words to reach the requested vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------
# The architecture table. Every arch the builder (and `pagedbackend tiny-model --arch`) offers is
# one row here. The first four go through the original `make_config` branches unchanged (other
# tests depend on their exact bytes); the rest are built by `_new_arch_config` from the row.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyArch:
    """One buildable architecture. Defaults apply only where the caller passes None."""

    config_class: str  # transformers config class name
    features: str  # one line: what a test of this arch exercises
    # Default weight std. 0.2 for the added archs: at 0.02 attention is nearly uniform, so partial
    # rotary, sliding windows and soft-capping barely move the logits and a parity test of them
    # would prove little; at 0.2 each of them changes greedy output, which stays non-degenerate.
    init_std: float = 0.2
    num_layers: int = 2  # default layer count
    tie: bool | None = None  # default tie_word_embeddings (None: the config class's default)
    # Std of the noise added to parameters that init leaves constant (norm weights at 1 or 0,
    # biases at 0), so a model that skips a bias or a norm weight, or uses Gemma's 1 + w where w
    # is meant, does not match. 0 for the original four archs (their bytes are fixed).
    jitter: float = 0.1
    sliding_window: int | None = None  # default window (0 passed by the caller turns it off)
    extra: dict = field(default_factory=dict)  # arch-specific config kwargs
    refused: bool = False  # built only to check that the engine refuses it


_MOE_EXPERT = 32  # default per-expert intermediate size (the dense MLP is 4 * hidden)

TINY_ARCHS: dict[str, TinyArch] = {
    "llama": TinyArch("LlamaConfig", "RoPE, RMSNorm, SwiGLU, GQA; untied head", init_std=0.02, jitter=0.0),
    "mistral": TinyArch("MistralConfig", "Llama layout with an optional sliding window", init_std=0.02,
                        jitter=0.0),
    "qwen2": TinyArch("Qwen2Config", "q/k/v bias, tied embeddings, optional sliding window", init_std=0.02,
                      jitter=0.0),
    "gpt2": TinyArch("GPT2Config", "learned positions, fused c_attn Conv1D, LayerNorm, GELU, MHA",
                     init_std=0.02, jitter=0.0),
    "qwen3": TinyArch("Qwen3Config", "per-head q/k RMSNorm, explicit head_dim, GQA"),
    "qwen3-sliding": TinyArch(
        "Qwen3Config", "q/k RMSNorm + sliding window on layers >= max_window_layers (full, sliding)",
        sliding_window=24, extra={"max_window_layers": 1}),
    "qwen3-moe": TinyArch(
        "Qwen3MoeConfig", "q/k RMSNorm + sparse MoE: 4 experts, top-2, renormalized top-k, every layer",
        extra={"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "norm_topk_prob": True}),
    "qwen2-moe": TinyArch(
        "Qwen2MoeConfig", "q/k/v bias + MoE (4 experts, top-2, no renorm) + sigmoid-gated shared expert",
        extra={"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "norm_topk_prob": False}),
    "mixtral": TinyArch(
        "MixtralConfig", "sparse MoE (4 experts, top-2, w1/w2/w3) + sliding window, GQA",
        sliding_window=24, extra={"num_local_experts": 4, "num_experts_per_tok": 2}),
    # Gemma rows are untied by default: tied, the tiny random model copies its input token (large
    # std) or repeats one token (small std). Pass tie_word_embeddings=True for the tied layout.
    # The soft-caps are far below Gemma-2's 50/30 so that they bend this model's scores.
    "gemma2": TinyArch(
        "Gemma2Config", "attn/final logit soft-capping (10/10), query_pre_attn_scalar 32 != head_dim, "
        "sliding/full alternating, sandwich norms, (1+w) RMSNorm, sqrt(d) embedding scale, GeGLU",
        sliding_window=24, tie=False,
        extra={"attn_logit_softcapping": 10.0, "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 32}),
    "gemma3": TinyArch(
        "Gemma3TextConfig", "text-only Gemma3ForCausalLM: q/k RMSNorm, 2 sliding + 1 full layer, local "
        "(1e4) and global (1e6) RoPE theta, query_pre_attn_scalar 24, sandwich norms",
        num_layers=3, sliding_window=24, tie=False, extra={"query_pre_attn_scalar": 24}),
    "phi3": TinyArch("Phi3Config", "fused qkv_proj and gate_up_proj, partial rotary (factor 0.5)",
                     extra={"partial_rotary_factor": 0.5}),
    "phi3-sliding": TinyArch("Phi3Config", "Phi-3 fused projections + sliding window on every layer",
                             sliding_window=24, extra={"partial_rotary_factor": 0.5}),
    "olmo2": TinyArch("Olmo2Config", "post-norm blocks (norm after attn/MLP), q/k RMSNorm over all heads",
                      init_std=0.15),
    "granite": TinyArch(
        "GraniteConfig", "embedding/residual/attention multipliers and logits_scaling (all != 1)",
        extra={"embedding_multiplier": 4.0, "residual_multiplier": 0.5, "attention_multiplier": 0.0625,
               "logits_scaling": 2.0}),
    "gpt-neox": TinyArch(
        "GPTNeoXConfig", "parallel residual, partial rotary (rotary_pct 0.25), fused query_key_value, MHA",
        init_std=0.3, extra={"use_parallel_residual": True, "partial_rotary_factor": 0.25}),
    "stablelm": TinyArch(
        "StableLmConfig", "LayerNorm, partial rotary (0.25), q/k/v bias, per-head q/k LayerNorm, GQA",
        extra={"use_qkv_bias": True, "qk_layernorm": True, "partial_rotary_factor": 0.25}),
    "cohere": TinyArch(
        "CohereConfig", "parallel attn+MLP off one LayerNorm, interleaved RoPE, logit_scale, q/k norm, tied",
        extra={"logit_scale": 0.25, "use_qk_norm": True}),
    "starcoder2": TinyArch("Starcoder2Config", "biases everywhere, LayerNorm, GELU c_fc/c_proj MLP, GQA, tied",
                           init_std=0.3, extra={"use_bias": True}),
    "falcon": TinyArch("FalconConfig", "unsupported on purpose: the engine must refuse it", refused=True),
}
ARCHS = tuple(TINY_ARCHS)
TINY_ARCH_FEATURES: dict[str, str] = {name: a.features for name, a in TINY_ARCHS.items()}

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
    if arch in TINY_ARCHS:
        return _new_arch_config(arch, vocab_size, ids, hidden_size=hidden_size, num_layers=num_layers,
                                num_heads=num_heads, num_kv_heads=num_kv_heads,
                                intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                                tie_word_embeddings=tie_word_embeddings, sliding_window=sliding_window,
                                rope_scaling=rope_scaling, init_std=init_std)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")


def _new_arch_config(arch: str, vocab_size: int, ids: dict, *, hidden_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int | None, intermediate_size: int | None, max_position_embeddings: int,
                     tie_word_embeddings: bool | None, sliding_window: int | None, rope_scaling: dict | None,
                     init_std: float) -> Any:
    """The config of a table arch other than the original four (see TINY_ARCHS)."""
    import transformers

    spec = TINY_ARCHS[arch]
    cls = getattr(transformers, spec.config_class)
    extra = dict(spec.extra)
    # None: the row's default window; 0: no window.
    window = spec.sliding_window if sliding_window is None else (sliding_window or None)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if "partial_rotary_factor" in extra:
        rope["partial_rotary_factor"] = extra.pop("partial_rotary_factor")
    kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=num_heads, max_position_embeddings=max_position_embeddings,
                              initializer_range=init_std, **ids)
    tie = spec.tie if tie_word_embeddings is None else tie_word_embeddings
    if tie is not None:
        kw["tie_word_embeddings"] = tie
    kv = num_kv_heads or num_heads
    ffn = intermediate_size or 4 * hidden_size
    head_dim = hidden_size // num_heads

    if arch == "falcon":  # Falcon-7B layout: multi-query attention, parallel attn/MLP, rotary
        return cls(ffn_hidden_size=ffn, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                   alibi=False, bias=False, **kw)
    if arch == "gpt-neox":  # multi-head only: no num_key_value_heads
        return cls(intermediate_size=ffn, rope_parameters={**rope, **(rope_scaling or {})}, **extra, **kw)

    kw.update(num_key_value_heads=kv, **extra)
    if arch in ("qwen3", "qwen3-sliding"):
        kw.update(head_dim=head_dim, intermediate_size=ffn)
        if window:
            first = kw.setdefault("max_window_layers", 0)
            kw.update(use_sliding_window=True, sliding_window=window,
                      layer_types=["full_attention" if i < first else "sliding_attention" for i in range(num_layers)])
    elif arch in ("qwen3-moe", "qwen2-moe"):
        kw.update(moe_intermediate_size=intermediate_size or _MOE_EXPERT, intermediate_size=4 * hidden_size)
        if arch == "qwen2-moe":
            kw["shared_expert_intermediate_size"] = 2 * (intermediate_size or _MOE_EXPERT)
        if window:
            kw.update(use_sliding_window=True, sliding_window=window, max_window_layers=num_layers)
    elif arch == "mixtral":
        kw.update(head_dim=head_dim, intermediate_size=intermediate_size or _MOE_EXPERT, sliding_window=window)
    elif arch in ("gemma2", "gemma3"):
        kw.update(head_dim=head_dim, intermediate_size=ffn, sliding_window=window or max_position_embeddings)
        if arch == "gemma2":  # sliding, full, sliding, ...
            kw["layer_types"] = ["sliding_attention" if i % 2 == 0 and window else "full_attention"
                                 for i in range(num_layers)]
        else:  # a full layer every third, the rest sliding; local and global RoPE bases differ
            kw["layer_types"] = ["sliding_attention" if (i + 1) % 3 and window else "full_attention"
                                 for i in range(num_layers)]
            kw["rope_parameters"] = {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0, **(rope_scaling or {})},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            }
            return cls(**kw)
    elif arch in ("phi3", "phi3-sliding"):
        kw.update(intermediate_size=ffn, original_max_position_embeddings=max_position_embeddings,
                  sliding_window=window)
    elif arch == "starcoder2":
        kw.update(intermediate_size=ffn, sliding_window=window)
    else:  # olmo2, granite, stablelm, cohere
        kw["intermediate_size"] = ffn
    kw["rope_parameters"] = {**rope, **(rope_scaling or {})}
    return cls(**kw)


def build_tiny_model(
    out: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool | None = None,
    sliding_window: int | None = None,
    rope_scaling: dict | None = None,
    init_std: float | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a random-weight `arch` model and its tokenizer to `out`; returns the path.

    `arch` is a key of TINY_ARCHS. `num_layers`, `init_std` and `sliding_window` left as None take
    that row's defaults (2 layers and std 0.02 for the original four archs); `sliding_window=0`
    turns a row's default window off. For the MoE archs `intermediate_size` is the per-expert size.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or train_tokenizer(vocab_size, seed)
    spec = TINY_ARCHS[arch]
    num_layers = spec.num_layers if num_layers is None else num_layers
    init_std = spec.init_std if init_std is None else init_std
    config = make_config(arch, len(tokenizer), tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, num_kv_heads=None if arch == "gpt2" else num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=tie_word_embeddings, sliding_window=sliding_window,
                         rope_scaling=rope_scaling, init_std=init_std)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.jitter:
        with torch.no_grad():
            for param in model.parameters():
                if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
                    param.add_(torch.randn_like(param) * spec.jitter)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out
