"""Serves timed runs of one request set through vLLM's CPU build, for `throughput.py --with-vllm`,
which starts it with the separate virtual environment's Python (vLLM pins its own torch and
transformers):

    <vllm-venv>/bin/python benchmarks/vllm_driver.py REQUESTS.json RESULT_FD

The process stays up between runs, so throughput.py can alternate engines (pagedbackend, vLLM,
pagedbackend, vLLM, ...) without paying vLLM's start-up (26-86 s) per run. Protocol:

* REQUESTS.json: {"model", "threads", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens",
  "enforce_eager" (optional), "requests": [{"prompt_token_ids", "max_tokens"}]}.
* After loading and a small warm-up it writes one JSON line {"event": "ready",
  "startup_seconds", "vllm_version", "threads"} to the file descriptor RESULT_FD (inherited from
  the parent; vLLM's own logging owns stdout and stderr, so results never mix with it).
* Then, for each line "run" read on stdin, one timed `generate` of the whole request set (greedy,
  EOS ignored), answered with {"event": "run", "seconds", "outputs"}; "quit" or end of input
  ends the process.

The driver must stay under `if __name__ == "__main__"`: vLLM spawns worker processes that
re-import this file.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    results = os.fdopen(int(sys.argv[2]), "w", buffering=1)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(spec["kv_cache_gib"]))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind" if spec["threads"] > 1 else "0"
    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    def send(**message) -> None:
        results.write(json.dumps(message) + "\n")

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
    send(event="ready", startup_seconds=startup, vllm_version=vllm.__version__, threads=spec["threads"])
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command != "run":
            send(event="error", message=f"unknown command {command!r}")
            continue
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        send(event="run", seconds=seconds, outputs=[list(o.outputs[0].token_ids) for o in outs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
