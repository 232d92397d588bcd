"""Offline batch generation with the vLLM-style API.

    python examples/offline_batch.py --model models/demo-llama
"""

import argparse

from pagedbackend import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/demo-llama")
    args = p.parse_args()

    llm = LLM(model=args.model)
    prompts = [
        "Once upon a time",
        "The capital of France is",
        "PagedAttention stores the key and value cache in",
        {"prompt_token_ids": [10, 20, 30, 40]},
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=24),                # greedy
        SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=24),
        SamplingParams(temperature=1.0, top_k=40, n=2, seed=2, max_tokens=24),  # two samples share the prompt's blocks
        SamplingParams(temperature=0.0, max_tokens=8, stop=["."]),
    ]
    for out in llm.generate(prompts, params):
        for c in out.outputs:
            print(f"[{out.request_id}.{c.index}] {out.prompt!r} -> {c.text!r} ({c.finish_reason})")
    print(llm.llm_engine.get_stats())


if __name__ == "__main__":
    main()
