"""Structured output: what a JSON-schema grammar costs. The reference workload (64 requests,
prompts of 64..256 random tokens, 128 new tokens, the 56M random-weight Llama) with 0%, 50% and
100% of the requests constrained to a JSON schema, same engine, one invocation.

    python benchmarks/structured_output.py            # ~4 minutes on the 2-core dev box
    python benchmarks/structured_output.py --repeat 5

The schema (an order record: enums, bounded integers and numbers, an array of objects, a
required note of 400..800 characters) makes every constrained answer run past 128 tokens, so
each constrained request is masked at each of its 128 steps and every configuration generates
exactly 64 x 128 tokens (checked). Greedy, compact JSON (`disable_any_whitespace`).

Reported, per configuration: generated tok/s (best and median of --repeat rounds, which
alternate the configurations A B C A B C ... after a warm-up round; the ratio to 0% is the
median of the per-round ratios), and per step the host time filling the bitmask (xgrammar's
matchers, on the engine loop) and the time applying it to the logits (the sampler). Once per
invocation: the first constrained request's compile time (the vocabulary read into xgrammar,
then the schema compiled) and a cached compile (the lookup a repeated schema costs). Every
constrained output is checked: it is a prefix of JSON the schema allows (truncated at 128
tokens), checked by re-feeding it to a fresh matcher. Writes benchmarks/out/structured_output.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import OUT, random_token_workload, reference_model  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "status": {"enum": ["new", "paid", "shipped", "returned"]},
        "total": {"type": "number", "minimum": 0, "maximum": 10000},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "note": {"type": "string", "minLength": 400, "maxLength": 800},
    },
    "required": ["id", "status", "total", "items", "note"],
    "additionalProperties": False,
}
SHARES = (0.0, 0.5, 1.0)


class Timer:
    """Wraps a function, summing the seconds its calls take (benchmark-side instrumentation)."""

    def __init__(self, owner, name: str, sync: bool = False) -> None:
        self.total, self.calls = 0.0, 0
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = inner(*args, **kwargs)
                if sync and torch.cuda.is_available():
                    torch.cuda.synchronize()
                return result
            finally:
                self.total += time.perf_counter() - start
                self.calls += 1

        setattr(owner, name, timed)

    def take(self) -> tuple[float, int]:
        values = (self.total, self.calls)
        self.total, self.calls = 0.0, 0
        return values


def run(llm, prompts: list[list[int]], share: float, max_tokens: int, constraint, fill: Timer, apply: Timer) -> dict:
    from pagedbackend import SamplingParams

    plain = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    masked = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=constraint)
    num_masked = round(share * len(prompts))
    # Constrained requests spread through the batch (every other one at 50%).
    chosen = set(round(i / share) for i in range(num_masked)) if num_masked else set()
    params = [masked if i in chosen else plain for i in range(len(prompts))]
    steps_before = llm.llm_engine.get_stats()["steps"]
    fill.take(), apply.take()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    steps = llm.llm_engine.get_stats()["steps"] - steps_before
    (fill_s, _), (apply_s, _) = fill.take(), apply.take()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"gen_tok_s": generated / elapsed, "elapsed_s": elapsed, "generated": generated, "steps": steps,
            "fill_ms_per_step": 1e3 * fill_s / steps, "apply_ms_per_step": 1e3 * apply_s / steps,
            "masked_texts": [o.outputs[0].text for i, o in enumerate(outs) if i in chosen]}


def check_prefixes(llm, texts: list[str], constraint) -> int:
    """Each text must be accepted by a fresh matcher of the schema (a prefix of valid JSON)."""
    import xgrammar as xgr

    grammar = llm.llm_engine.grammar_compiler.compile(constraint)
    bad = 0
    for text in texts:
        if not text.startswith('{"id": ') or not xgr.GrammarMatcher(grammar).accept_string(text):
            bad += 1
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: the reference model)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=OUT / "structured_output.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pagedbackend import LLM
    from pagedbackend.structured_output import StructuredOutputsParams
    from pagedbackend.structured_output import bitmask
    from pagedbackend.structured_output.manager import StructuredOutputManager

    model = args.model or reference_model()
    config = json.loads((model / "config.json").read_text())
    work = random_token_workload(args.num_requests, max_tokens=args.max_tokens, vocab_size=config["vocab_size"])
    prompts = [r.prompt_token_ids for r in work]
    llm = LLM(str(model), max_num_seqs=args.num_requests, max_model_len=512, enable_prefix_caching=False)
    print(f"model {model.name}: Llama {config['num_hidden_layers']} layers x {config['hidden_size']}, vocab "
          f"{config['vocab_size']}; {args.num_requests} requests, prompts 64..256 tokens, {args.max_tokens} greedy "
          f"tokens each; torch {torch.__version__}, {args.threads} threads", flush=True)

    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    compiler = llm.llm_engine.grammar_compiler
    start = time.perf_counter()
    compiler._xgrammar_compiler()  # the vocabulary, read once per engine on the first constrained request
    vocab_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile(constraint)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True))
    cached_s = (time.perf_counter() - start) / 100
    print(f"first constrained request: vocabulary {1e3 * vocab_s:.1f} ms + schema compile {1e3 * first_s:.1f} ms; "
          f"cached compile {1e6 * cached_s:.1f} us", flush=True)

    fill = Timer(StructuredOutputManager, "fill")
    apply = Timer(bitmask, "apply_token_bitmask", sync=True)
    import pagedbackend.sampler as sampler_module

    sampler_module.apply_token_bitmask = bitmask.apply_token_bitmask  # the sampler's own reference, now timed

    for share in SHARES:  # warm-up round
        run(llm, prompts[:8], share, 8, constraint, fill, apply)
    rounds: dict[float, list[dict]] = {s: [] for s in SHARES}
    for r in range(args.repeat):
        for share in SHARES:
            res = run(llm, prompts, share, args.max_tokens, constraint, fill, apply)
            rounds[share].append(res)
            print(f"  round {r + 1} {share:>4.0%} constrained: {res['gen_tok_s']:7.0f} tok/s "
                  f"({res['elapsed_s']:.2f} s, {res['steps']} steps)", flush=True)

    expected = args.num_requests * args.max_tokens
    print(f"\n{'constrained':>11} {'best tok/s':>10} {'median':>8} {'x of 0%':>8} {'fill ms/step':>12} "
          f"{'apply ms/step':>13}")
    summary = {}
    ok = True
    for share in SHARES:
        rs = rounds[share]
        ratio = statistics.median(a["gen_tok_s"] / b["gen_tok_s"] for a, b in zip(rs, rounds[0.0]))
        bad = sum(check_prefixes(llm, res["masked_texts"], constraint) for res in rs)
        ok &= bad == 0 and all(res["generated"] == expected for res in rs)
        summary[f"{share:.0%}"] = {
            "best_tok_s": max(x["gen_tok_s"] for x in rs), "median_tok_s": statistics.median(x["gen_tok_s"] for x in rs),
            "ratio_to_unconstrained": ratio, "fill_ms_per_step": statistics.median(x["fill_ms_per_step"] for x in rs),
            "apply_ms_per_step": statistics.median(x["apply_ms_per_step"] for x in rs), "invalid_outputs": bad,
            "runs_tok_s": [round(x["gen_tok_s"], 1) for x in rs]}
        s = summary[f"{share:.0%}"]
        print(f"{share:>11.0%} {s['best_tok_s']:>10.0f} {s['median_tok_s']:>8.0f} {ratio:>8.3f} "
              f"{s['fill_ms_per_step']:>12.2f} {s['apply_ms_per_step']:>13.2f}")
    print(f"compile: vocabulary {1e3 * vocab_s:.1f} ms, first schema {1e3 * first_s:.1f} ms, cached {1e6 * cached_s:.1f} us")
    print(f"every constrained output is a prefix of schema-valid JSON and every run generated {expected} tokens: {ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model.name, "args": {k: str(v) for k, v in vars(args).items()},
                                    "compile_ms": {"vocabulary": 1e3 * vocab_s, "first": 1e3 * first_s,
                                                   "cached": 1e3 * cached_s},
                                    "results": summary, "ok": ok}, indent=1))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
