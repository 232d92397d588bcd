"""logprobs, prompt_logprobs, best_of, output_kind and truncate_prompt_tokens, with
transformers' logits as the oracle for every reported log-probability."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import hf_greedy, hf_log_softmax, random_prompts
from pagedbackend import RequestOutputKind, SamplingParams
from pagedbackend.errors import InvalidRequest

TOL = 1e-5


def _check_position(entry, token: int, row: torch.Tensor, k: int) -> None:
    """One position's dict against the reference log_softmax row."""
    assert token in entry
    assert abs(entry[token].logprob - row[token].item()) <= TOL
    assert entry[token].rank == int((row > row[token]).sum()) + 1
    top = row.topk(k)
    for value, t in zip(top.values.tolist(), top.indices.tolist()):
        assert t in entry and abs(entry[t].logprob - value) <= TOL
    assert len(entry) in (k, k + 1)  # the chosen token is added when it is not in the top k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sample_logprobs_equal_log_softmax_of_transformers_logits(arch, model_dir, make_engine):
    path = model_dir(arch)
    llm = make_engine(path, "llm", max_num_batched_tokens=16, max_num_seqs=4)  # chunked prefill
    prompts = random_prompts([7, 40], 1024, seed=20)
    params = [SamplingParams(temperature=0, max_tokens=10, logprobs=3),
              SamplingParams(temperature=1.0, seed=4, max_tokens=10, logprobs=0)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, outs):
        c = out.outputs[0]
        ref = hf_log_softmax(path, prompt + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            _check_position(entry, token, ref[len(prompt) + i - 1], sp.logprobs)
            assert entry[token].decoded_token == llm.get_tokenizer().decode([token])
        expected_sum = sum(ref[len(prompt) + i - 1, t].item() for i, t in enumerate(c.token_ids))
        assert abs(c.cumulative_logprob - expected_sum) <= TOL * len(c.token_ids)
    assert outs[0].outputs[0].token_ids == hf_greedy(path, prompts[0], 10)
    assert any(e[t].rank > 1 for t, e in zip(outs[1].outputs[0].token_ids, outs[1].outputs[0].logprobs))


def test_prompt_logprobs_equal_transformers_even_when_chunked_cached_or_preempted(model_dir, make_engine):
    path = model_dir("qwen2")
    llm = make_engine(path, "llm", block_size=8, num_kv_blocks=12, max_num_batched_tokens=24, max_num_seqs=4,
                     max_model_len=96)
    prompts = random_prompts([50, 45, 50], 1024, seed=21)
    prompts[2] = prompts[0]  # a prefix-cache hit would skip the logits we need: it must not
    params = SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        ref = hf_log_softmax(path, prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for p in range(1, len(prompt)):
            _check_position(out.prompt_logprobs[p], prompt[p], ref[p - 1], 2)
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 30)


def test_logprobs_above_max_logprobs_are_rejected_by_name(model_dir, make_engine):
    engine = make_engine(model_dir("llama"), max_logprobs=5)
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InvalidRequest, match=field):
            engine.add_request("r", "hello", SamplingParams(**{field: 6}))


def test_best_of_returns_the_most_likely_of_its_samples(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    prompt = {"prompt_token_ids": random_prompts([11], 1024, seed=22)[0]}
    sample = dict(temperature=1.0, seed=100, max_tokens=12)
    (all_five,) = llm.generate(prompt, SamplingParams(n=5, logprobs=0, **sample), use_tqdm=False)
    (best,) = llm.generate(prompt, SamplingParams(n=2, best_of=5, **sample), use_tqdm=False)
    ranked = sorted(all_five.outputs, key=lambda c: -c.cumulative_logprob)
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in best.outputs] == [0, 1]
    assert math.isclose(best.outputs[0].cumulative_logprob, ranked[0].cumulative_logprob, abs_tol=1e-4)


def _stream(engine, prompt, params) -> list:
    engine.add_request("s", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    return outs


def test_output_kinds_cumulative_delta_and_final_only(model_dir, make_engine):
    engine = make_engine(model_dir("gpt2"))
    prompt = {"prompt_token_ids": random_prompts([6], 1024, seed=23)[0]}
    base = dict(temperature=0, max_tokens=9, logprobs=1)
    cumulative = _stream(engine, prompt, SamplingParams(**base))
    delta = _stream(engine, prompt, SamplingParams(output_kind=RequestOutputKind.DELTA, **base))
    final = _stream(engine, prompt, SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **base))
    full = cumulative[-1].outputs[0]
    assert len(cumulative) == len(delta) == 9 and len(final) == 1
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 10))
    assert all(len(o.outputs[0].token_ids) == 1 and len(o.outputs[0].logprobs) == 1 for o in delta)
    assert [t for o in delta for t in o.outputs[0].token_ids] == full.token_ids
    assert "".join(o.outputs[0].text for o in delta) == full.text
    assert [e for o in delta for e in o.outputs[0].logprobs] == full.logprobs
    assert final[0].finished and final[0].outputs[0].token_ids == full.token_ids
    assert final[0].outputs[0].text == full.text


def test_final_only_stream_yields_one_output_from_the_async_engine(model_dir):
    from pagedbackend import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama"))), progress=False)
    try:
        stream = engine.submit("hello world", SamplingParams(max_tokens=6, temperature=0,
                                                             output_kind=RequestOutputKind.FINAL_ONLY))
        outs = list(stream)
        assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 6
    finally:
        engine.shutdown()
    engine.engine.check_all_blocks_free()


def test_truncate_prompt_tokens_keeps_the_last_tokens(model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm")
    prompt = random_prompts([30], 1024, seed=24)[0]
    (out,) = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8,
                                                                      truncate_prompt_tokens=12), use_tqdm=False)
    assert out.prompt_token_ids == prompt[-12:]
    assert out.outputs[0].token_ids == hf_greedy(path, prompt[-12:], 8)
