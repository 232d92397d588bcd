"""Greedy output must equal transformers' generate() token for token (fp32), for every
architecture, under the conditions that stress the paged engine: chunked prefill, a KV pool
small enough to force preemption, and prefix-cache hits."""

from __future__ import annotations

import pytest

from conftest import PARITY_MODELS, available_backends
from helpers import hf_greedy, random_prompts
from pagedbackend import SamplingParams

MAX_NEW = 16
BACKENDS = available_backends()
# 17 prompts from 1 to 320 tokens, on and around block edges.
LENGTHS = [1, 2, 15, 16, 17, 31, 33, 47, 64, 80, 100, 129, 160, 200, 257, 301, 320]


def _generate(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _expected(path, prompts):
    return [hf_greedy(path, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_greedy_matches_transformers_with_chunked_prefill(name, backend, model_dir, make_engine):
    path = model_dir(name)
    prompts = random_prompts(LENGTHS, 1024, seed=11)
    llm = make_engine(path, "llm", max_num_batched_tokens=64, max_num_seqs=16, max_model_len=512,
                      attention_backend=backend)
    assert _generate(llm, prompts) == _expected(path, prompts)
    stats = llm.llm_engine.get_stats()
    assert stats["num_chunked_prefill_steps"] > 0
    assert stats["max_batch_seqs"] > 1


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_greedy_matches_transformers_under_forced_preemption(name, backend, mode, model_dir, make_engine):
    path = model_dir(name)
    prompts = random_prompts(LENGTHS, 1024, seed=12)
    # 34 blocks x 16 tokens: barely one max-length sequence, far less than the batch needs.
    llm = make_engine(path, "llm", num_kv_blocks=34, max_num_batched_tokens=128, max_num_seqs=16, max_model_len=512,
                      attention_backend=backend, preemption_mode=mode, swap_space=0.02)
    assert _generate(llm, prompts) == _expected(path, prompts)
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0
    if mode == "swap":  # every preemption swapped (the host pool is large enough), and came back
        assert stats["num_swapped_out"] == stats["num_preemptions"] == stats["num_swapped_in"]
        assert stats["num_free_host_blocks"] == llm.llm_engine.runner.num_host_blocks
    else:
        assert stats["num_swapped_out"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_greedy_matches_transformers_with_prefix_cache_hits(name, backend, model_dir, make_engine):
    path = model_dir(name)
    shared = random_prompts([150], 1024, seed=13)[0]
    tails = random_prompts([1, 3, 16, 20, 37, 60, 5, 9, 90, 2, 17, 33, 44, 55, 66, 77], 1024, seed=14)
    prompts = [shared + t for t in tails] + [shared[:70], shared]
    llm = make_engine(path, "llm", max_num_batched_tokens=256, max_num_seqs=8, max_model_len=512,
                      attention_backend=backend)
    first = _generate(llm, prompts[:1])  # fills the cache with the shared prefix
    rest = _generate(llm, prompts[1:])
    assert first + rest == _expected(path, prompts)
    stats = llm.llm_engine.get_stats()
    assert stats["prefix_cache_hits"] >= 150 // 16 * 16 * (len(prompts) - 2)


def test_rope_scaling_and_sharded_checkpoint_match_transformers(model_dir, make_engine):
    path = model_dir("llama-rope-sharded")
    assert len(list(path.glob("*.safetensors"))) > 1, "the fixture should be sharded"
    assert (path / "model.safetensors.index.json").is_file()
    prompts = random_prompts([3, 40, 130, 250], 1024, seed=15)
    llm = make_engine(path, "llm", max_num_batched_tokens=96, max_num_seqs=4, max_model_len=512)
    assert _generate(llm, prompts) == _expected(path, prompts)


def test_mixed_prefill_and_decode_in_one_step(model_dir, make_engine):
    """A long prompt arriving while others decode is computed in chunks beside their decodes."""
    path = model_dir("llama")
    engine = make_engine(path, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=512)
    short, long = random_prompts([5, 200], 1024, seed=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    engine.add_request("short", {"prompt_token_ids": short}, params)
    engine.step()  # short prefilled
    engine.add_request("long", {"prompt_token_ids": long}, params)
    mixed = 0
    outs = {}
    while engine.has_unfinished_requests():
        sched_out = engine.scheduler.schedule()
        kinds = {item.num_new_tokens == 1 for item in sched_out.scheduled}
        mixed += kinds == {True, False}
        result = engine.executor.execute(sched_out)
        for o in engine._process(engine.scheduler.update(sched_out, result)):
            outs[o.request_id] = o
    assert mixed > 0
    assert outs["short"].outputs[0].token_ids == hf_greedy(path, short, MAX_NEW)
    assert outs["long"].outputs[0].token_ids == hf_greedy(path, long, MAX_NEW)
