"""Runs a request set through vLLM's CPU build; executed by `throughput.py --with-vllm` with the
separate virtual environment's Python (vLLM pins its own torch and transformers).

    <vllm-venv>/bin/python benchmarks/vllm_driver.py REQUESTS.json RESULT.json

REQUESTS.json: {"model", "threads", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens",
"repeat", "requests": [{"prompt_token_ids", "max_tokens"}]}. RESULT.json gets the median wall
time of `repeat` timed runs (after a warm-up), the greedy outputs, and vLLM's version.

The driver must stay under `if __name__ == "__main__"`: vLLM spawns worker processes that
re-import this file.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(spec["kv_cache_gib"]))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind" if spec["threads"] > 1 else "0"
    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"], enable_prefix_caching=False,
              skip_tokenizer_init=False, seed=0, enforce_eager=spec.get("enforce_eager", False))
    startup = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in spec["requests"]]
    params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in spec["requests"]]
    llm.generate([TokensPrompt(prompt_token_ids=list(range(10, 74)))] * 4,
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    times, outputs = [], []
    for _ in range(spec["repeat"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        outputs = [list(o.outputs[0].token_ids) for o in outs]
    with open(sys.argv[2], "w") as f:
        json.dump({"seconds": statistics.median(times), "all_seconds": times, "startup_seconds": startup,
                   "outputs": outputs, "vllm_version": vllm.__version__, "threads": spec["threads"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
