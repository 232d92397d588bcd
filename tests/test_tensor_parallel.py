"""Tensor parallelism over torch.distributed (gloo, ranks as processes on 127.0.0.1): greedy
output at TP=2 token-exact with TP=1 and with transformers for every family (GQA, MHA, q/k/v
bias with tied embeddings, sliding window with one KV head replicated on both ranks, GPT-2),
with chunked prefill, prefix-cache hits and forced preemption in the same run; TP=4; sampling,
n > 1, beams and logprobs the same as one rank; heads that do not divide; failures."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PARITY_MODELS
from helpers import hf_greedy, random_prompts
from pagedbackend import BeamSearchParams, EngineArgs, SamplingParams
from pagedbackend.adapters.ports import free_port

pytestmark = pytest.mark.slow
MAX_NEW = 12
ROOT = Path(__file__).resolve().parents[1]


def _prompts():
    """A shared 80-token prefix (cached by the first run) under varied tails, and prompts on
    and around block edges."""
    shared = random_prompts([80], 1024, seed=21)[0]
    tails = random_prompts([1, 7, 16, 30, 45], 1024, seed=22)
    return shared, [shared + t for t in tails] + random_prompts([2, 17, 33, 64, 129, 150], 1024, seed=23)


def _greedy(llm, prompts, max_tokens=MAX_NEW):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]


# Small pool (16 blocks of 16 for 11 prompts up to 162 tokens), small chunks: preemption,
# chunked prefill and prefix hits all happen in the one run.
STRESS = dict(num_kv_blocks=16, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=192)


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_tp2_greedy_equals_one_rank_and_transformers(name, model_dir, make_engine):
    path = model_dir(name)
    shared, prompts = _prompts()
    expected = [hf_greedy(path, p, MAX_NEW) for p in [shared, *prompts]]
    results = {}
    for tp in (1, 2):
        llm = make_engine(path, "llm", tensor_parallel_size=tp, **STRESS)
        results[tp] = _greedy(llm, [shared]) + _greedy(llm, prompts)
        stats = llm.llm_engine.get_stats()
        assert stats["num_preemptions"] > 0 and stats["num_chunked_prefill_steps"] > 0
        assert stats["prefix_cache_hits"] >= 80 // 16 * 16 * 5
    assert results[2] == expected
    assert results[1] == expected


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-sliding"])
def test_tp2_native_qwen3_equals_transformers(arch, tmp_path, tiny_tokenizer, make_engine):
    from pagedbackend.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / arch, arch, tokenizer=tiny_tokenizer)
    shared, prompts = _prompts()
    llm = make_engine(path, "llm", tensor_parallel_size=2, **STRESS)
    got = _greedy(llm, [shared]) + _greedy(llm, prompts)
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    assert got == [hf_greedy(path, p, MAX_NEW) for p in [shared, *prompts]]


def test_kv_heads_are_replicated_when_ranks_outnumber_them(model_dir, make_engine):
    """mistral has one KV head: at TP=2 each rank holds a copy, its pool sized for one head."""
    llm = make_engine(model_dir("mistral"), "llm", tensor_parallel_size=2, num_kv_blocks=40, max_model_len=256)
    runner = llm.llm_engine.runner
    attn = runner.model.attention_layers()[0]
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert runner.kv_cache.shape[0] == len(runner.model.attention_layers())


def test_tp4_greedy_equals_transformers(model_dir, make_engine):
    path = model_dir("llama-mha")  # 4 heads, 4 KV heads: one of each per rank
    prompts = random_prompts([3, 20, 70], 1024, seed=24)
    llm = make_engine(path, "llm", tensor_parallel_size=4, num_kv_blocks=24, max_num_batched_tokens=32,
                      max_num_seqs=4, max_model_len=128)
    assert _greedy(llm, prompts, 8) == [hf_greedy(path, p, 8) for p in prompts]
    assert llm.llm_engine.get_stats()["num_chunked_prefill_steps"] > 0


def test_sampling_n_beams_and_logprobs_are_the_same_as_one_rank(model_dir, make_engine):
    path = model_dir("llama")
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 40], 1024, seed=25)]
    sampled = [SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, n=3, logprobs=3),
               SamplingParams(temperature=1.0, max_tokens=10, prompt_logprobs=2)]  # engine seed
    beam = BeamSearchParams(beam_width=3, max_tokens=8)
    got = {}
    for tp in (1, 2):
        llm = make_engine(path, "llm", tensor_parallel_size=tp, seed=3)
        outs = [llm.generate(prompts, p, use_tqdm=False) for p in sampled]
        beams = llm.beam_search(prompts, beam)
        got[tp] = (outs, beams)
    (outs1, beams1), (outs2, beams2) = got[1], got[2]
    for batch1, batch2 in zip(outs1, outs2):
        for o1, o2 in zip(batch1, batch2):
            assert [c.token_ids for c in o1.outputs] == [c.token_ids for c in o2.outputs]
            for c1, c2 in zip(o1.outputs, o2.outputs):
                assert math.isclose(c1.cumulative_logprob or 0.0, c2.cumulative_logprob or 0.0, abs_tol=1e-4)
                for lp1, lp2 in zip(c1.logprobs or [], c2.logprobs or []):
                    assert lp1.keys() == lp2.keys()
                    assert all(math.isclose(lp1[t].logprob, lp2[t].logprob, abs_tol=1e-4) for t in lp1)
            if o1.prompt_logprobs is not None:
                for lp1, lp2 in zip(o1.prompt_logprobs[1:], o2.prompt_logprobs[1:]):
                    assert lp1.keys() == lp2.keys()
    assert [[s.tokens for s in b.sequences] for b in beams1] == [[s.tokens for s in b.sequences] for b in beams2]


@pytest.mark.parametrize("tp,message", [(3, "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
                                        (8, "num_attention_heads=4 is not divisible by tensor_parallel_size=8")])
def test_heads_that_do_not_divide_are_an_error_naming_the_numbers(tp, message, model_dir):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=str(model_dir("llama")), tensor_parallel_size=tp).create_engine_config()


def test_kv_heads_neither_dividing_nor_divided_are_an_error(tmp_path, tiny_tokenizer):
    from pagedbackend.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / "m", "llama", num_heads=12, num_kv_heads=3, hidden_size=48,
                            tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 is neither a divisor nor a multiple of "
                                         "num_key_value_heads=3"):
        EngineArgs(model=str(path), tensor_parallel_size=4).create_engine_config()


def test_executor_backend_is_chosen_from_the_launch(model_dir, monkeypatch):
    path = str(model_dir("llama"))
    assert EngineArgs(model=path).create_engine_config().distributed_executor_backend == "uni"
    assert EngineArgs(model=path, tensor_parallel_size=2).create_engine_config().distributed_executor_backend == "mp"
    with pytest.raises(ValueError, match="needs the ranks started by torchrun"):
        EngineArgs(model=path, tensor_parallel_size=2,
                   distributed_executor_backend="external_launcher").create_engine_config()
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    config = EngineArgs(model=path, tensor_parallel_size=2).create_engine_config()
    assert config.distributed_executor_backend == "external_launcher"
    with pytest.raises(ValueError, match="torchrun started WORLD_SIZE=2"):
        EngineArgs(model=path, tensor_parallel_size=4).create_engine_config()


# ------------------------------------------------------------------------------ failures
def test_a_failure_before_the_forward_fails_that_step_on_every_rank_and_serving_goes_on(model_dir, make_engine,
                                                                                        monkeypatch):
    engine = make_engine(model_dir("llama"), tensor_parallel_size=2)
    batch = engine.runner.batch
    prepare = batch.prepare
    calls = {"n": 0}

    def failing_once(out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return prepare(out)

    monkeypatch.setattr(batch, "prepare", failing_once)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [11, 12, 13]}, params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["a"].outputs[0].finish_reason == "error"
    engine.add_request("b", {"prompt_token_ids": [11, 12, 13]}, params)  # the ranks are still in step
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished["b"].outputs[0].token_ids) == 6
    assert all(p.poll() is None for p in engine.executor._procs.values())


def _stream_until_failure(engine_args, break_rank):
    """Stream 4 requests through an AsyncLLMEngine; once each has a token, `break_rank(executor)`."""
    import asyncio

    from pagedbackend import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(engine_args, progress=False)
    executor = engine.engine.executor
    procs = list(executor._procs.values())

    async def run():
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        started = asyncio.Event()
        counts = {}

        async def one(i):
            try:
                async for out in engine.generate({"prompt_token_ids": [10 + i, 20, 30]}, params, f"r{i}"):
                    counts[i] = len(out.outputs[0].token_ids)
                    if len(counts) == 4:
                        started.set()
                    if out.finished:
                        return ("finished", out.outputs[0].finish_reason)
            except Exception as e:  # noqa: BLE001
                return ("error", str(e))
            return ("ended", None)

        tasks = [asyncio.create_task(one(i)) for i in range(4)]
        await asyncio.wait_for(started.wait(), 60)
        break_rank(executor)
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    try:
        results = asyncio.run(run())
        with pytest.raises(Exception, match="not running|died|rank 1"):
            engine.engine.add_request("late", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2))
            asyncio.run(_drain(engine))
    finally:
        engine.shutdown()
    return results, procs, executor


async def _drain(engine):
    async for _ in engine.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2), "late2"):
        pass


def test_a_killed_worker_ends_every_stream_with_an_error_naming_the_rank(model_dir):
    args = EngineArgs(model=str(model_dir("llama")), tensor_parallel_size=2, num_kv_blocks=80)
    start = time.monotonic()
    results, procs, executor = _stream_until_failure(args, lambda ex: os.kill(ex._procs[1].pid, signal.SIGKILL))
    assert time.monotonic() - start < 60
    assert [kind for kind, _ in results] == ["error"] * 4, results
    assert all("rank 1" in detail and "killed by signal 9" in detail for _, detail in results), results
    assert all(p.poll() is not None for p in procs)  # nothing left behind


def test_a_hung_worker_fails_the_engine_after_the_collective_timeout(model_dir):
    args = EngineArgs(model=str(model_dir("llama")), tensor_parallel_size=2, num_kv_blocks=80,
                      distributed_timeout_s=3)
    results, procs, _ = _stream_until_failure(args, lambda ex: os.kill(ex._procs[1].pid, signal.SIGSTOP))
    assert [kind for kind, _ in results] == ["error"] * 4, results
    assert all("rank(s) 1" in detail for _, detail in results), results
    assert all(p.poll() is not None for p in procs)


def test_abort_and_shutdown_free_every_block_and_end_every_rank(model_dir, make_engine):
    engine = make_engine(model_dir("gpt2"), tensor_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i in range(3):
        engine.add_request(str(i), {"prompt_token_ids": [10 + i] * 20}, params)
    for _ in range(4):
        engine.step()
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        engine.step()
        engine.abort_request("2")
    engine.check_all_blocks_free()
    procs = list(engine.executor._procs.values())
    engine.shutdown()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(Exception, match="shut down"):
        engine.add_request("x", {"prompt_token_ids": [1, 2]}, params)
        engine.step()


# ------------------------------------------------------------------------------ torchrun
TORCHRUN_APP = """
import json, sys
from pagedbackend import LLM, SamplingParams
import torch.distributed as dist
model, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model, tensor_parallel_size=2, num_kv_blocks=30, max_num_batched_tokens=64, max_num_seqs=8,
          max_model_len=256)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=12),
                    use_tqdm=False)
rank = dist.get_rank()
with open(f"{out}.{rank}", "w") as f:
    json.dump({"tokens": [o.outputs[0].token_ids for o in outs],
               "backend": llm.llm_engine.config.distributed_executor_backend}, f)
llm.shutdown()
"""


def _torchrun(args, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def _check_ranks(out: Path, path: Path, prompts) -> None:
    import json

    expected = [hf_greedy(path, p, 12) for p in prompts]
    for rank in (0, 1):
        result = json.loads(Path(f"{out}.{rank}").read_text())
        assert result["backend"] == "external_launcher"
        assert result["tokens"] == expected, f"rank {rank}"


def test_torchrun_every_rank_runs_the_engine_and_returns_the_same_outputs(model_dir, tmp_path):
    import json

    path = model_dir("qwen2")
    app = tmp_path / "app.py"
    app.write_text(TORCHRUN_APP)
    prompts = random_prompts([3, 30, 90, 140], 1024, seed=26)
    out = tmp_path / "out"
    done = _torchrun(["--nproc-per-node", "2", "--master-port", str(free_port()), str(app), str(path), str(out),
                      json.dumps(prompts)])
    assert done.returncode == 0, done.stderr[-4000:]
    _check_ranks(out, path, prompts)


def test_torchrun_two_nodes_over_c10d_rendezvous(model_dir, tmp_path):
    import json

    path = model_dir("llama")
    app = tmp_path / "app.py"
    app.write_text(TORCHRUN_APP)
    prompts = random_prompts([4, 50, 100], 1024, seed=27)
    out = tmp_path / "out"
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "tp-test",
              "--rdzv-endpoint", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node-rank", str(n),
                               str(app), str(path), str(out), json.dumps(prompts)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
    try:
        logs = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in nodes] == [0, 0], [err[-3000:] for _, err in logs]
    _check_ranks(out, path, prompts)



LEADER_APP = """
import sys, time
from pagedbackend import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, num_kv_blocks=64, max_model_len=256)
print("workers", *[p.pid for p in llm.llm_engine.executor._procs.values()], flush=True)
while True:  # generating when the signal comes
    llm.generate([{"prompt_token_ids": [11, 12, 13]}], SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in state


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_the_engine_process_ending_ends_every_rank(how, model_dir, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or the engine's
    process killed outright: no rank is left behind."""
    app = tmp_path / "leader.py"
    app.write_text(LEADER_APP)
    proc = subprocess.Popen([sys.executable, str(app), str(model_dir("llama"))], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("workers"), line
        workers = [int(x) for x in line.split()[1:]]
        time.sleep(1.0)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 15
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(w) for w in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tp2_with_ngram_speculation_equals_transformers(name, model_dir, make_engine):
    """Every rank proposes the same n-gram tokens from the same batch, and verifies them in one
    forward pass; the engine reads rank 0's answer."""
    path = model_dir(name)
    shared, prompts = _prompts()
    prompts = [p + p[-12:] for p in prompts]  # each repeats a span: n-gram lookup proposes from the start
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    llm = make_engine(path, "llm", tensor_parallel_size=2, speculative_config=spec, **STRESS)
    assert _greedy(llm, [shared]) + _greedy(llm, prompts) == [hf_greedy(path, p, MAX_NEW) for p in [shared, *prompts]]
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_accepted_tokens"] > 0
