"""Sampling and stopping behave as vLLM documents, on a real (tiny) model."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import hf_greedy, random_prompts
from pagedbackend import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def _tokens(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_request_gives_the_same_tokens_alone_and_in_different_batches(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm", max_num_seqs=16)
    target = random_prompts([23], 1024, seed=1)[0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20)
    alone = _tokens(llm, [target], seeded)[0]
    others = random_prompts([5, 40, 77, 3, 120], 1024, seed=2)
    batch1 = _tokens(llm, [others[0], target, others[1]],
                     [SamplingParams(temperature=1.0, max_tokens=30), seeded, GREEDY])[1]
    batch2 = _tokens(llm, others[2:] + [target],
                     [SamplingParams(temperature=0.7, seed=7, max_tokens=9)] * 3 + [seeded])[3]
    assert alone == batch1 == batch2
    different_seed = _tokens(llm, [target], seeded.clone(seed=99))[0]
    assert different_seed != alone


def test_unseeded_sampling_varies(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    prompt = random_prompts([10], 1024, seed=3)[0]
    outs = _tokens(llm, [prompt] * 4, SamplingParams(temperature=1.0, max_tokens=12))
    assert len({tuple(o) for o in outs}) > 1


def test_top_k_one_equals_greedy(model_dir, make_engine):
    path = model_dir("qwen2")
    llm = make_engine(path, "llm")
    prompts = random_prompts([4, 50, 130], 1024, seed=4)
    top1 = _tokens(llm, prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=24, seed=5))
    assert top1 == _tokens(llm, prompts, GREEDY) == [hf_greedy(path, p, 24) for p in prompts]


def test_max_tokens_is_exact_and_reports_length(model_dir, make_engine):
    llm = make_engine(model_dir("gpt2"), "llm")
    out = llm.generate({"prompt_token_ids": [11, 12, 13]}, SamplingParams(temperature=0, max_tokens=7),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length" and out.stop_reason is None


def test_generation_stops_at_max_model_len(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm", max_model_len=40)
    out = llm.generate({"prompt_token_ids": list(range(10, 35))}, SamplingParams(temperature=0, max_tokens=100),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 15 and out.finish_reason == "length"


def test_stop_token_id_ends_the_output_and_is_reported(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    prompt = random_prompts([30], 1024, seed=6)[0]
    free_run = _tokens(llm, [prompt], GREEDY)[0]
    stop_id = free_run[5]
    first = free_run.index(stop_id)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free_run[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_min_tokens_holds_back_stop_tokens(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    prompt = random_prompts([30], 1024, seed=6)[0]
    free_run = _tokens(llm, [prompt], GREEDY)[0]
    stop_id = free_run[0]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id], min_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert stop_id not in out.token_ids[:6]
    assert len(out.token_ids) >= 6


def test_stop_string_across_token_boundaries_is_cut_from_the_text(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    tok = llm.get_tokenizer()
    prompt = random_prompts([12], 1024, seed=8)[0]
    full = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0]
    # A stop string that starts inside one token's text and ends inside a later one's.
    pieces = [tok.decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full.text[start:start + 4]
    assert len(stop) == 4
    cut = full.text.index(stop)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate({"prompt_token_ids": prompt},
                        SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:cut + len(stop)]


def test_streamed_deltas_never_show_part_of_a_stop_string(model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    prompt = random_prompts([12], 1024, seed=8)[0]
    engine.add_request("free", {"prompt_token_ids": prompt}, GREEDY)
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o
    text = final.outputs[0].text
    stop = text[6:10]
    expected = text[:text.index(stop)]
    engine.add_request("s", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24, stop=stop))
    streamed = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            streamed += o.outputs[0].delta_text
            assert o.outputs[0].text == streamed  # cumulative and delta agree at every step
            assert expected.startswith(streamed)  # nothing sent is ever taken back
    assert streamed == expected


@pytest.fixture
def model_with_eos_at(model_dir, tmp_path, make_engine):
    """A copy of the llama model whose EOS id is the greedy first token after `prompt`."""
    src = model_dir("llama")
    prompt = random_prompts([9], 1024, seed=9)[0]
    greedy = hf_greedy(src, prompt, 24)
    dst = tmp_path / "eos-model"
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = greedy[2]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst, prompt, greedy


def test_eos_stops_unless_ignore_eos_and_waits_for_min_tokens(model_with_eos_at, make_engine):
    path, prompt, greedy = model_with_eos_at
    llm = make_engine(path, "llm")
    eos = greedy[2]
    first = greedy.index(eos)

    out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop" and out.stop_reason is None

    out = llm.generate({"prompt_token_ids": prompt}, GREEDY.clone(ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy and out.finish_reason == "length"

    out = llm.generate({"prompt_token_ids": prompt}, GREEDY.clone(min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert eos not in out.token_ids[:first + 2]


def test_n_samples_differ_and_share_the_prompt_blocks(model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    prompt = random_prompts([40], 1024, seed=10)[0]  # 2 full blocks of 16 + a partial one
    engine.add_request("n4", {"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, max_tokens=16))
    engine.step()  # prefill, then the sample forks
    seqs = engine.scheduler.requests["n4"]
    kv = engine.kv_cache_manager
    blocks = [kv.blocks(s) for s in seqs]
    assert all(b[:2] == blocks[0][:2] for b in blocks)
    assert [b.ref_cnt for b in blocks[0][:2]] == [4, 4]
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o
    assert [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1


def test_greedy_samples_after_copy_on_write_all_equal_transformers(model_dir, make_engine):
    path = model_dir("mistral")
    llm = make_engine(path, "llm")
    prompts = random_prompts([40, 17, 63], 1024, seed=11)  # partial last blocks: every fork copies
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(n=3, temperature=0, max_tokens=20),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert [c.token_ids for c in o.outputs] == [hf_greedy(path, p, 20)] * 3
