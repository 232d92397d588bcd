"""The `pagedbackend` command.

    pagedbackend tiny-model --arch llama --out models/demo-llama
    pagedbackend generate --model models/demo-llama --prompt "Once upon a time" --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from pagedbackend.config import ATTENTION_BACKENDS, EngineArgs


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--seed", type=int, default=0)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model, dtype=ns.dtype, device=ns.device, block_size=ns.block_size,
        num_kv_blocks=ns.num_kv_blocks, kv_cache_memory_fraction=ns.kv_cache_memory_fraction,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len, enable_prefix_caching=not ns.no_prefix_caching,
        enable_chunked_prefill=not ns.no_chunked_prefill, attention_backend=ns.attention_backend, seed=ns.seed,
    )


def cmd_tiny_model(ns: argparse.Namespace) -> int:
    from pagedbackend.tiny_model import build_tiny_model

    rope = json.loads(ns.rope_scaling) if ns.rope_scaling else None
    path = build_tiny_model(
        ns.out, ns.arch, hidden_size=ns.hidden_size, num_layers=ns.num_layers, num_heads=ns.num_heads,
        num_kv_heads=ns.num_kv_heads, intermediate_size=ns.intermediate_size, vocab_size=ns.vocab_size,
        max_position_embeddings=ns.max_position_embeddings, sliding_window=ns.sliding_window,
        rope_scaling=rope, init_std=ns.init_std, seed=ns.seed, max_shard_size=ns.max_shard_size,
        tie_word_embeddings=ns.tie_word_embeddings,
    )
    print(f"wrote a random-weight {ns.arch} model to {path}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from pagedbackend.llm_engine import LLMEngine
    from pagedbackend.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.sample_seed, stop=ns.stop or None, ignore_eos=ns.ignore_eos)
    engine = LLMEngine.from_engine_args(engine_args_from(ns))
    engine.add_request("cli", ns.prompt, params)
    out = sys.stdout
    out.write(ns.prompt)
    out.flush()
    start = time.perf_counter()
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.write(o.outputs[0].delta_text)
            out.flush()
            final = o
    elapsed = time.perf_counter() - start
    if final is not None:
        c = final.outputs[0]
        out.write(f"\n\n[{len(c.token_ids)} tokens in {elapsed:.2f}s, finish_reason={c.finish_reason}]\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedbackend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="build a small random-weight model with an offline-trained tokenizer")
    t.add_argument("--arch", default="llama", choices=("llama", "mistral", "qwen2", "gpt2"))
    t.add_argument("--out", required=True)
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--num-heads", type=int, default=4)
    t.add_argument("--num-kv-heads", type=int, default=2)
    t.add_argument("--intermediate-size", type=int, default=None)
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--max-position-embeddings", type=int, default=1024)
    t.add_argument("--sliding-window", type=int, default=None)
    t.add_argument("--rope-scaling", default=None, help='JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\'')
    t.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--init-std", type=float, default=0.02)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-shard-size", default=None, help="e.g. 200KB to write a sharded checkpoint")
    t.set_defaults(func=cmd_tiny_model)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    _add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sample-seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
