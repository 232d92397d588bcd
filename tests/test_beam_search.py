"""Beam search: token-exact with transformers' `generate(num_beams=...)`, beams sharing KV
blocks through ref counts while they are alive, every block free afterwards."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, hf_model, random_prompts
from pagedbackend import BeamSearchParams
from pagedbackend.errors import InvalidRequest

def hf_beams(path, prompt: list[int], width: int, max_new_tokens: int, **kwargs) -> list[list[int]]:
    """transformers' beam search, all `width` returned sequences (best first), generated part
    only, with the padding after an early-finished hypothesis removed."""
    model = hf_model(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=width, num_return_sequences=width, do_sample=False,
                             max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                             pad_token_id=model.config.pad_token_id, **kwargs)
    eos = model.generation_config.eos_token_id
    pad = model.config.pad_token_id
    sequences = []
    for row, indices in zip(out.sequences, out.beam_indices):
        length = int((indices >= 0).sum())  # tokens this hypothesis really generated
        generated = row[len(prompt):len(prompt) + length].tolist()
        assert all(t in (pad, eos) for t in row[len(prompt) + length:].tolist())
        sequences.append(generated)
    return sequences


def ours(llm, prompt: list[int], width: int, max_tokens: int, **kwargs) -> list[list[int]]:
    (out,) = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(width, max_tokens, **kwargs))
    assert len(out.sequences) == width
    for seq in out.sequences:
        assert seq.tokens[:len(prompt)] == prompt
    return [seq.tokens[len(prompt):] for seq in out.sequences]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_equals_transformers(arch, width, model_dir, make_engine):
    path = model_dir(arch)
    llm = make_engine(path, "llm", block_size=8)
    for prompt in random_prompts([5, 21], 1024, seed=width):
        assert ours(llm, prompt, width, 12) == hf_beams(path, prompt, width, 12)


@pytest.mark.parametrize("length_penalty, early_stopping", [(0.0, False), (2.0, "never"), (-1.0, True)])
def test_beam_search_length_penalty_and_early_stopping_match_transformers(length_penalty, early_stopping,
                                                                          model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm", block_size=8)
    prompt = random_prompts([9], 1024, seed=30)[0]
    expected = hf_beams(path, prompt, 3, 10, length_penalty=length_penalty, early_stopping=early_stopping)
    assert ours(llm, prompt, 3, 10, length_penalty=length_penalty, early_stopping=early_stopping) == expected


def test_beam_search_stops_at_eos_like_transformers(model_dir, make_engine, tmp_path):
    """With EOS made likely, hypotheses finish early and the search stops by transformers'
    early-stopping heuristic rather than at max_tokens."""
    import json

    path = model_dir("llama")
    # Same weights, but EOS is the token this model likes most after these prompts.
    probe = make_engine(path, "llm", block_size=8)
    prompt = random_prompts([6], 1024, seed=31)[0]
    favourite = ours(probe, prompt, 2, 3)[0][1]
    eos_dir = tmp_path / "eos-model"
    eos_dir.mkdir()
    for f in path.iterdir():
        (eos_dir / f.name).symlink_to(f)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = favourite
    (eos_dir / "generation_config.json").unlink()
    (eos_dir / "generation_config.json").write_text(json.dumps(gen))
    llm = make_engine(eos_dir, "llm", block_size=8)
    (out,) = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(4, 20))
    assert any(s.finish_reason == "stop" for s in out.sequences)
    got = [s.tokens[len(prompt):] for s in out.sequences]
    assert got == hf_beams(eos_dir, prompt, 4, 20)


def test_beams_share_prompt_blocks_while_alive_and_free_them_after(model_dir, make_engine):
    path = model_dir("llama")
    engine = make_engine(path, block_size=8)
    prompt = random_prompts([30], 1024, seed=32)[0]
    engine.add_beam_search_request("beam", {"prompt_token_ids": prompt}, BeamSearchParams(4, 10))
    kv = engine.kv_cache_manager
    max_shared = 0
    final = None
    copies = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        copies.extend(out.blocks_to_copy)
        return out

    engine.scheduler.schedule = recording_schedule
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        beams = [s for s in engine.scheduler.running if s.request_id == "beam"]
        if len(beams) == 4:
            prompt_blocks = [kv.blocks(s)[:30 // 8] for s in beams]
            assert all(b == prompt_blocks[0] for b in prompt_blocks)  # the same physical blocks
            max_shared = max(max_shared, min(b.ref_cnt for b in prompt_blocks[0]))
    assert max_shared >= 4
    assert copies  # branched beams wrote into their shared partial block: copy-on-write
    assert final is not None and final.finished and len(final.outputs) == 4
    engine.check_all_blocks_free()


def test_beam_search_under_forced_preemption_still_equals_transformers(model_dir, make_engine):
    path = model_dir("gpt2")
    llm = make_engine(path, "llm", block_size=8, num_kv_blocks=14, max_model_len=64, max_num_seqs=8)
    prompts = random_prompts([20, 17], 1024, seed=33)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(4, 14))
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        assert [s.tokens[len(prompt):] for s in out.sequences] == hf_beams(path, prompt, 4, 14)


def test_beam_search_with_a_pool_too_small_for_all_beams_at_once_still_finishes_exactly(model_dir, make_engine):
    """7 blocks of 8 tokens cannot hold 4 beams of 34 tokens: beams that reported give their
    blocks up for a sibling that still has to compute, and the search completes."""
    path = model_dir("llama")
    llm = make_engine(path, "llm", block_size=8, num_kv_blocks=7, max_model_len=48, max_num_seqs=8)
    prompt = random_prompts([20], 1024, seed=35)[0]
    assert ours(llm, prompt, 4, 14) == hf_beams(path, prompt, 4, 14)
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0


def test_beam_search_params_are_validated_by_name():
    with pytest.raises(InvalidRequest, match="beam_width"):
        BeamSearchParams(0, 5)
    with pytest.raises(InvalidRequest, match="temperature"):
        BeamSearchParams(2, 5, temperature=0.7)
    with pytest.raises(InvalidRequest, match="early_stopping"):
        BeamSearchParams(2, 5, early_stopping="sometimes")


def test_beam_search_mixes_with_ordinary_requests(model_dir, make_engine):
    from pagedbackend import SamplingParams

    path = model_dir("qwen2")
    engine = make_engine(path, block_size=8)
    a, b = random_prompts([12, 25], 1024, seed=34)
    engine.add_beam_search_request("beam", {"prompt_token_ids": a}, BeamSearchParams(2, 8))
    engine.add_request("greedy", {"prompt_token_ids": b}, SamplingParams(temperature=0, max_tokens=8))
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    assert [c.token_ids for c in outs["beam"].outputs] == hf_beams(path, a, 2, 8)
    assert outs["greedy"].outputs[0].token_ids == hf_greedy(path, b, 8)
