"""Train two small Llama models from scratch on CPU that have learned to copy spans of their prompt.

benchmarks/spec_decode.py measures speculative decoding (n-gram prompt lookup, and a draft model).
Both only pay off when the model's output repeats what it has already seen, and a random-weight
model rarely copies anything, so its acceptance rates say nothing. This script trains, in a few
minutes on a laptop-class CPU, a TARGET model and a smaller DRAFT model (sharing one tokenizer)
that do copy, on text every machine has: the Python standard library's top-level `*.py` files.

    python benchmarks/train_copy_model.py                       # defaults: ~4 + ~2 minutes of training
    python benchmarks/train_copy_model.py --target-minutes 1 --draft-minutes 0.5   # a quick try

Steps:

1. a byte-level BPE tokenizer (`tokenizers`) trained on the stdlib text, wrapped as
   `PreTrainedTokenizerFast` with "<s>", "</s>", "<pad>";
2. training samples of `--seq-len` tokens: half are natural text windows, half "copy" samples in
   which a chunk A is followed (after an optional stretch of other text) by a repeat of A or of a
   suffix of A, again and again, so that copying from earlier in the context is strongly rewarded
   and induction heads form quickly;
3. each model trained for a wall-clock budget with AdamW, linear warmup and cosine decay (over
   the budget's elapsed fraction);
4. each saved as safetensors with the tokenizer and a `train_info.json` into `--out`/copy-llama-target
   and `--out`/copy-llama-draft;
5. copy accuracy measured with greedy `generate` on held-out stdlib files: the prompt is a chunk C
   followed by C's first tokens again; the score is the fraction of the generated tokens equal to
   C's continuation, averaged over the prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "models"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


def stdlib_files(holdout_every: int) -> tuple[list[Path], list[Path]]:
    """Top-level stdlib `*.py` files in sorted order, split into (train, held-out)."""
    files = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))
    held = [f for i, f in enumerate(files) if i % holdout_every == holdout_every - 1]
    return [f for f in files if f not in held], held


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts encoded and joined into one 1-D tensor, files separated by EOS."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def window(stream: torch.Tensor, length: int, rng: random.Random) -> torch.Tensor:
    start = rng.randrange(len(stream) - length)
    return stream[start:start + length]


def copy_sample(stream: torch.Tensor, seq_len: int, rng: random.Random) -> torch.Tensor:
    """A chunk A, then repeatedly (other text of random length, A or a suffix of A) up to seq_len.

    A is a text window or, half the time, tokens drawn from scattered positions of the text: those
    cannot be predicted from the preceding tokens, so only copying lowers their loss on a repeat.
    """
    size = rng.randint(8, seq_len // 4)
    if rng.random() < 0.5:
        chunk = window(stream, size, rng)
    else:
        chunk = stream[torch.tensor([rng.randrange(len(stream)) for _ in range(size)])]
    parts = [chunk]
    length = len(chunk)
    while length < seq_len:
        gap = rng.choice([0, 0, rng.randint(1, 32)])
        if gap:
            parts.append(window(stream, gap, rng))
        parts.append(chunk[rng.randrange(len(chunk) // 2 + 1):] if rng.random() < 0.3 else chunk)
        length += gap + len(parts[-1])
    return torch.cat(parts)[:seq_len]


def batch(stream: torch.Tensor, batch_size: int, seq_len: int, copy_fraction: float,
          rng: random.Random) -> torch.Tensor:
    return torch.stack([copy_sample(stream, seq_len, rng) if rng.random() < copy_fraction
                        else window(stream, seq_len, rng) for _ in range(batch_size)])


def build_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    return LlamaForCausalLM(config)


def train(model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace, minutes: float,
          lr: float, name: str, seed: int) -> dict:
    """Train for `minutes` of wall-clock time; returns steps, tokens seen and the final loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    budget = minutes * 60
    model.train()
    start = time.perf_counter()
    step, recent = 0, []
    while (elapsed := time.perf_counter() - start) < budget:
        frac = elapsed / budget
        scale = min(1.0, (step + 1) / args.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        ids = batch(stream, args.batch_size, args.seq_len, args.copy_fraction, rng)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        recent = (recent + [loss.item()])[-20:]
        if step % args.log_every == 0:
            print(f"[{name}] step {step:5d}  loss {loss.item():.3f}  lr {lr * scale:.2e}  {elapsed:6.1f}s", flush=True)
    model.eval()
    return {"steps": step, "tokens_seen": step * args.batch_size * args.seq_len,
            "final_loss": round(sum(recent) / len(recent), 4), "minutes": round((time.perf_counter() - start) / 60, 2)}


@torch.no_grad()
def copy_accuracy(model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> float:
    """Greedy-generate after (C, C[:k]); the fraction of generated tokens equal to C[k:k+n]."""
    rng = random.Random(1234)
    chunks = torch.stack([window(stream, args.eval_chunk, rng) for _ in range(args.eval_prompts)])
    k, n = args.eval_prefix, args.eval_new_tokens
    prompts = torch.cat([chunks, chunks[:, :k]], dim=1)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=model.config.pad_token_id)
    generated = out[:, prompts.shape[1]:]
    return round((generated == chunks[:, k:k + n]).float().mean().item(), 4)


def run_one(name: str, shape: ModelShape, minutes: float, lr: float, seed: int,
            tokenizer: PreTrainedTokenizerFast, train_stream: torch.Tensor, held_stream: torch.Tensor,
            args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    model = build_model(shape, tokenizer, args.max_positions)
    params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {shape}  {params / 1e6:.2f}M parameters, {minutes} minutes", flush=True)
    info = {"name": name, **vars(shape), "vocab_size": len(tokenizer), "max_position_embeddings": args.max_positions,
            "parameters": params, "lr": lr, "batch_size": args.batch_size, "seq_len": args.seq_len,
            **train(model, train_stream, args, minutes, lr, name, seed)}
    info["copy_accuracy"] = copy_accuracy(model, held_stream, args)
    print(f"[{name}] final loss {info['final_loss']}  copy accuracy {info['copy_accuracy']}", flush=True)
    out_dir = args.out / f"copy-llama-{name}"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[{name}] saved to {out_dir}", flush=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent folder of the two model folders")
    parser.add_argument("--target-minutes", type=float, default=4.0)
    parser.add_argument("--draft-minutes", type=float, default=2.0)
    parser.add_argument("--target-shape", type=int, nargs=5, default=[256, 4, 4, 2, 768],
                        metavar=("HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "INTERMEDIATE"))
    parser.add_argument("--draft-shape", type=int, nargs=5, default=[128, 2, 2, 1, 384],
                        metavar=("HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "INTERMEDIATE"))
    parser.add_argument("--target-lr", type=float, default=2e-3)
    parser.add_argument("--draft-lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--copy-fraction", type=float, default=0.5, help="share of samples that are copy samples")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--holdout-every", type=int, default=10, help="every Nth stdlib file is held out for eval")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-chunk", type=int, default=150)
    parser.add_argument("--eval-prefix", type=int, default=10)
    parser.add_argument("--eval-new-tokens", type=int, default=48)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    train_files, held_files = stdlib_files(args.holdout_every)
    train_texts = read_texts(train_files)
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_stream = token_stream(tokenizer, train_texts)
    held_stream = token_stream(tokenizer, read_texts(held_files))
    print(f"tokenizer: {len(tokenizer)} tokens; {len(train_files)} train files ({len(train_stream)} tokens), "
          f"{len(held_files)} held-out ({len(held_stream)} tokens); {time.perf_counter() - start:.1f}s", flush=True)

    results = [run_one(name, ModelShape(*shape), minutes, lr, args.seed + i, tokenizer, train_stream, held_stream, args)
               for i, (name, shape, minutes, lr) in enumerate([
                   ("target", args.target_shape, args.target_minutes, args.target_lr),
                   ("draft", args.draft_shape, args.draft_minutes, args.draft_lr)])]
    for info in results:
        print(f"{info['name']:6s}  {info['parameters'] / 1e6:.2f}M params  {info['steps']} steps  "
              f"{info['minutes']} min  loss {info['final_loss']}  copy accuracy {info['copy_accuracy']}")


if __name__ == "__main__":
    main()
