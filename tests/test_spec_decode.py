"""Speculative decoding in the engine: n-gram and draft-model proposals verified in the target's
steps change nothing they should not (greedy outputs equal transformers' token for token, with
chunked prefill, prefix-cache hits and forced preemption in the same run), the draft-equals-
target case accepts everything, random sampling keeps the target's distribution, and stops,
limits, logprobs, penalties, aborts and the batch-size switch behave as without speculation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import hf_greedy, hf_model, random_prompts
from pagedbackend import EngineArgs, SamplingParams
from pagedbackend.spec_decode.config import SpeculativeConfig

K = 3
MAX_NEW = 20
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# chi-square critical values at significance 0.001 by degrees of freedom (scipy is not a dependency)
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
TINY_VOCAB = 8


def _draft(path: Path, k: int = K) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


def _prompts(seed: int) -> list[list[int]]:
    """Prompts on and around block edges; each repeats a span of itself, so n-gram lookup has
    something to propose from the first step, and the last four start with the same two blocks
    (prefix-cache hits for those admitted after the first of them)."""
    base = random_prompts([1, 5, 16, 17, 1, 15, 48, 97], 1024, seed=seed)
    shared = random_prompts([32], 1024, seed=seed + 1)[0]
    base[4:] = [shared + p for p in base[4:]]
    return [p + p[-min(len(p), 12):] for p in base]


def _greedy(llm, prompts, max_tokens=MAX_NEW, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _record_steps(llm) -> list[tuple[int, int]]:
    """(proposed, accepted) of every verification, as the scheduler counts them."""
    stats = llm.llm_engine.scheduler.spec_stats
    seen: list[tuple[int, int]] = []
    record = stats.record

    def spy(num_proposed: int, num_accepted: int) -> None:
        seen.append((num_proposed, num_accepted))
        record(num_proposed, num_accepted)

    stats.record = spy
    return seen


# ------------------------------------------------------------------ parity with transformers
METHODS = ["ngram", "draft_other", "draft_self"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_greedy_with_speculation_matches_transformers_with_chunked_prefill_prefix_hits_and_preemption(
        name, method, model_dir, make_engine):
    path = model_dir(name)
    spec = {"ngram": NGRAM, "draft_other": _draft(model_dir("llama-mha" if name != "llama-mha" else "llama")),
            "draft_self": _draft(path)}[method]
    # 14 blocks x 16 tokens for 8 sequences of up to 160: preemption is forced.
    llm = make_engine(path, "llm", speculative_config=spec, num_kv_blocks=14, max_num_batched_tokens=48,
                      max_num_seqs=8, max_model_len=224)
    prompts = _prompts(seed=21)
    assert _greedy(llm, prompts) == [hf_greedy(path, p, MAX_NEW) for p in prompts]
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_chunked_prefill_steps"] > 0
    assert stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_drafts"] > 0
    if method == "draft_self":
        assert stats["spec_decode_acceptance_rate"] == 1.0
    if method == "ngram":
        assert stats["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft_other"])
def test_greedy_with_speculation_matches_transformers_under_swap_preemption(method, model_dir, make_engine):
    path = model_dir("qwen2")
    spec = NGRAM if method == "ngram" else _draft(model_dir("llama"))
    llm = make_engine(path, "llm", speculative_config=spec, num_kv_blocks=14, max_num_batched_tokens=48,
                      max_num_seqs=8, max_model_len=224, preemption_mode="swap", swap_space=0.02)
    prompts = _prompts(seed=22)
    assert _greedy(llm, prompts) == [hf_greedy(path, p, MAX_NEW) for p in prompts]
    stats = llm.llm_engine.get_stats()
    assert stats["num_swapped_out"] > 0 and stats["num_swapped_in"] == stats["num_swapped_out"]
    assert stats["spec_decode_num_drafts"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft_other"])
def test_prefix_cache_hits_on_blocks_written_while_proposals_were_rejected_give_the_same_output(
        method, model_dir, make_engine):
    """Blocks enter the prefix cache only once their tokens are verified: a second request whose
    prompt is the first one's prompt and output reuses those blocks and continues exactly."""
    path = model_dir("gpt2")
    spec = NGRAM if method == "ngram" else _draft(model_dir("llama"))
    llm = make_engine(path, "llm", speculative_config=spec, max_model_len=256, block_size=8)
    seen = _record_steps(llm)
    prompts = _prompts(seed=19)[2:6]
    first = _greedy(llm, prompts, max_tokens=40)
    assert sum(m - a for m, a in seen) > 10  # many proposals were rejected while those blocks filled
    hits = llm.llm_engine.get_stats()["prefix_cache_hits"]
    longer = [p + out for p, out in zip(prompts, first)]
    assert _greedy(llm, longer, max_tokens=10) == [hf_greedy(path, p, 10) for p in longer]
    assert llm.llm_engine.get_stats()["prefix_cache_hits"] - hits >= sum(len(p) // 8 * 8 for p in longer) - 8 * 4


def test_target_as_its_own_draft_accepts_every_proposal_and_emits_k_plus_one_per_full_step(model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm", speculative_config=_draft(path), max_model_len=256)
    seen = _record_steps(llm)
    prompts = random_prompts([3, 20, 40, 70], 1024, seed=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(path, p, 30) for p in prompts]
    assert seen and all(accepted == proposed for proposed, accepted in seen)
    full = [s for s in seen if s[0] == K]
    assert full and len(full) >= len(seen) - 2 * len(prompts)  # only the last steps are capped by max_tokens
    stats = llm.llm_engine.get_stats()
    assert stats["spec_decode_acceptance_rate"] == 1.0
    assert stats["spec_decode_accepted_per_position"][K - 1] == len(full)
    # Every verifying step emits accepted + 1 tokens: 29 tokens after the prefill's first.
    assert sum(a + 1 for _, a in seen) <= 29 * len(prompts)
    assert len(seen) < 29 * len(prompts) / 2


# ------------------------------------------------------------------ stops, limits, logprobs
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 7, 9])
def test_max_tokens_is_reached_exactly_when_proposals_would_pass_it(max_tokens, model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm", speculative_config=_draft(path), max_model_len=128)
    prompts = random_prompts([4, 30], 1024, seed=6)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    for o, p in zip(outs, prompts):
        assert o.outputs[0].token_ids == hf_greedy(path, p, max_tokens)
        assert len(o.outputs[0].token_ids) == max_tokens and o.outputs[0].finish_reason == "length"


def test_max_model_len_is_never_passed_by_proposals(model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm", speculative_config=_draft(path), max_model_len=40)
    prompt = random_prompts([30], 1024, seed=7)[0]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(path, prompt, 10)
    assert out.outputs[0].finish_reason == "length"


def test_stop_token_and_stop_string_inside_an_accepted_run_drop_what_follows(model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm", speculative_config=_draft(path), max_model_len=128)
    seen = _record_steps(llm)
    prompt = random_prompts([12], 1024, seed=8)[0]
    reference = hf_greedy(path, prompt, 24)
    # A token first emitted in the middle of a run of K + 1 (positions 1..K+1 are the first run).
    stop_at = next(i for i in range(2, len(reference)) if i % (K + 1) not in (0, K) and reference[i] not in reference[:i])
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[reference[stop_at]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[:stop_at + 1] and out.finish_reason == "stop"
    assert out.stop_reason == reference[stop_at]
    assert seen and all(a == p for p, a in seen)

    tokenizer = llm.llm_engine.tokenizer
    full = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=24),
                        use_tqdm=False)[0].outputs[0]
    text = full.text
    cut = tokenizer.decode(reference[:stop_at + 1])
    stop = text[len(cut) - 2:len(cut)] if len(cut) >= 2 else text[:1]
    if not stop.strip() or text.index(stop) != len(cut) - 2:
        pytest.skip("the tiny tokenizer's text has no stop string unique at that point")
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)


def test_logprobs_of_every_emitted_token_equal_those_without_speculation(model_dir, make_engine):
    path = model_dir("qwen2")
    prompts = _prompts(seed=9)[:4]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=3)
    plain = make_engine(path, "llm", max_model_len=256).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    spec_llm = make_engine(path, "llm", max_model_len=256, speculative_config=_draft(path))
    spec = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert spec_llm.llm_engine.get_stats()["spec_decode_num_accepted_tokens"] > 0
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.outputs[0].logprobs) == len(b.outputs[0].token_ids)
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            for t in pa:
                assert abs(pa[t].logprob - pb[t].logprob) < 1e-4 and pa[t].rank == pb[t].rank
        assert abs(a.outputs[0].cumulative_logprob - b.outputs[0].cumulative_logprob) < 1e-3


@pytest.mark.parametrize("method", ["ngram", "draft_self"])
def test_penalties_bias_min_tokens_and_n_samples_give_the_outputs_they_give_without_speculation(
        method, model_dir, make_engine):
    """Each verified position is processed as if the proposals before it were tokens already:
    penalties count them, min_tokens sees them."""
    path = model_dir("llama")
    prompts = _prompts(seed=10)[:5]
    eos = make_engine(path, "llm", max_model_len=256).llm_engine.config.model_config.eos_token_ids
    cases = [dict(repetition_penalty=1.3), dict(presence_penalty=0.5, frequency_penalty=0.3),
             dict(logit_bias={prompts[2][3]: 2.0}, min_tokens=6), dict(n=2, seed=3)]
    plain = make_engine(path, "llm", max_model_len=256)
    spec_llm = make_engine(path, "llm", max_model_len=256, speculative_config=NGRAM if method == "ngram" else _draft(path))
    for case in cases:
        params = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=list(eos)[:1], **case)
        a = plain.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        b = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b], case
    assert spec_llm.llm_engine.get_stats()["spec_decode_num_drafts"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft_self"])
def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch(method, model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm", max_model_len=256, speculative_config=NGRAM if method == "ngram" else _draft(path))
    prompts = _prompts(seed=17)[:5]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompts[0]}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts], [seeded] + [others] * 4, use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone
    assert llm.llm_engine.get_stats()["spec_decode_num_drafts"] > 0


@pytest.mark.parametrize("prompt_len", [32, 37])  # the samples fork at a block edge, and inside a block
def test_samples_forked_after_lookahead_share_no_block_they_will_write(prompt_len, model_dir, make_engine):
    """A block with no computed token of a sequence is its own (a shared one would be written by
    both samples without a copy: copy-on-write only covers partial blocks of computed tokens)."""
    path = model_dir("llama")
    engine = make_engine(path, max_model_len=256, speculative_config=_draft(path))
    prompt = random_prompts([prompt_len], 1024, seed=18)[0]
    engine.add_request("a", {"prompt_token_ids": prompt},
                       SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=20, ignore_eos=True))
    kv, bs, forked = engine.kv_cache_manager, engine.config.block_size, False
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        forked |= len(running) == 2
        for seq in running:
            for block in kv.blocks(seq)[-(-seq.num_computed_tokens // bs):]:  # past its computed tokens
                assert block.ref_cnt == 1, (seq, block)
    assert forked and engine.get_stats()["spec_decode_num_drafts"] > 0


# ------------------------------------------------------------------ unbiased sampling
def _tiny_vocab_model(out: Path, tokenizer, seed: int) -> Path:
    """A Llama of TINY_VOCAB tokens (a byte-level tokenizer has at least 262, so the model's
    vocabulary is set apart from its tokenizer's; token ids alone are used)."""
    from transformers import AutoModelForCausalLM

    from pagedbackend.tiny_model import make_config

    config = make_config("llama", TINY_VOCAB, tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
                         sliding_window=None, rope_scaling=None, init_std=0.5)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_vocab_models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tiny-vocab")
    return _tiny_vocab_model(root / "target", tiny_tokenizer, 11), _tiny_vocab_model(root / "draft", tiny_tokenizer, 12)


def _exact_second_token(path: Path, prompt: list[int], temperature: float, top_k: int) -> torch.Tensor:
    """p(t2) = sum over t1 of p(t1) p(t2 | t1), from transformers' logits (temperature, then
    the top-k filter, as the request samples)."""
    model = hf_model(path)

    def probs(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.double() / temperature
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)

    with torch.inference_mode():
        p1 = probs(model(torch.tensor([prompt])).logits[0, -1])
        p2 = probs(model(torch.tensor([prompt + [t] for t in range(TINY_VOCAB)])).logits[:, -1])
    return p1 @ p2


def _second_tokens(llm, prompt, temperature, top_k, draws) -> torch.Tensor:
    # max_tokens=3: the second token comes from verifying one proposal (two would pass max_tokens)
    params = [SamplingParams(temperature=temperature, top_k=top_k, max_tokens=3, ignore_eos=True, seed=s)
              for s in range(draws)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * draws, params, use_tqdm=False)
    return torch.bincount(torch.tensor([o.outputs[0].token_ids[1] for o in outs]), minlength=TINY_VOCAB).double()


def _chi_square_exceeds_critical(observed: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at significance 0.001, cells expecting fewer than 5 draws pooled into one
    (the usual rule)."""
    expected = probs * observed.sum()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return statistic > CHI2_CRITICAL_0_001[len(expected) - 1]


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_k", [(1.0, TINY_VOCAB), (0.8, 6)])
def test_sampled_tokens_keep_the_target_distribution_with_a_different_draft(temperature, top_k, tiny_vocab_models,
                                                                           make_engine, monkeypatch):
    target, draft = tiny_vocab_models
    prompt, draws = [1, 5, 3, 2], 3000
    exact = _exact_second_token(target, prompt, temperature, top_k)
    llm = make_engine(target, "llm", speculative_config=_draft(draft, k=2), max_num_seqs=128, max_model_len=64)
    counts = _second_tokens(llm, prompt, temperature, top_k, draws)
    stats = llm.llm_engine.get_stats()
    assert stats["spec_decode_num_drafts"] == draws  # every second token came out of verification
    assert 0.05 < stats["spec_decode_acceptance_rate"] < 0.95  # both accepting and rejecting happened
    assert not _chi_square_exceeds_critical(counts, exact)

    # The control: a verifier that accepts every proposal emits the draft's distribution instead.
    import pagedbackend.spec_decode.verifier as verifier

    real = verifier.rejection_sample

    def accept_all(target_probs, draft_tokens, num_drafts, greedy, draft_probs=None, *args, **kwargs):
        one_hot = torch.nn.functional.one_hot(draft_tokens, target_probs.shape[-1]).to(target_probs.dtype)
        target_probs = torch.cat([one_hot, target_probs[:, -1:]], dim=1)
        return real(target_probs, draft_tokens, num_drafts, greedy, draft_probs, *args, **kwargs)

    monkeypatch.setattr(verifier, "rejection_sample", accept_all)
    biased = _second_tokens(llm, prompt, temperature, top_k, draws)
    assert _chi_square_exceeds_critical(biased, exact)


# ------------------------------------------------------------------ blocks, aborts, load switch
def test_a_draft_model_request_aborted_mid_step_frees_its_blocks_and_draft_state(model_dir, make_engine):
    path = model_dir("llama")
    engine = make_engine(path, speculative_config=_draft(model_dir("llama-mha")), max_model_len=256, num_kv_blocks=40)
    prompts = random_prompts([30, 50, 70], 1024, seed=13)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=40))
    for _ in range(4):
        engine.step()
    victim = engine.scheduler.requests["1"][0]
    assert victim.spec_token_ids  # it holds proposals for its next step
    proposer = engine.runner.proposer
    assert victim.seq_id in proposer.computed
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the runner hears of the last finished sequences with the next step
    assert proposer.computed == {}
    assert engine.runner._draft_probs == {}
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks


@pytest.mark.parametrize("method", ["ngram", "draft_other"])
def test_rejected_proposals_and_unused_lookahead_free_the_blocks_only_they_held(method, model_dir, make_engine):
    """After every step a decoding sequence holds the blocks of its tokens and no more, though
    the step computed (and, for a draft model, reserved lookahead for) up to k positions past
    them; mostly rejected here (another model drafts, or random-weight lookups)."""
    path = model_dir("llama")
    spec = NGRAM if method == "ngram" else _draft(model_dir("llama-mha"), k=6)
    engine = make_engine(path, speculative_config=spec, max_model_len=256, block_size=8)
    for i, p in enumerate(_prompts(seed=16)):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=30))
    kv, checked, rejected = engine.kv_cache_manager, 0, 0
    seen = []
    stats = engine.scheduler.spec_stats
    record = stats.record
    stats.record = lambda m, a: (seen.append((m, a)), record(m, a))
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens == seq.num_tokens - 1:  # decoding (its prompt is computed)
                # the slots of its tokens (the newest one's is allocated when it is computed)
                assert -(-(seq.num_tokens - 1) // 8) <= len(kv.blocks(seq)) <= -(-seq.num_tokens // 8), seq
                checked += 1
    rejected = sum(m - a for m, a in seen)
    assert checked > 50 and rejected > 20


def test_speculation_is_off_while_more_sequences_run_or_wait_than_disable_by_batch_size(model_dir, make_engine):
    path = model_dir("llama")
    spec = {**_draft(path), "disable_by_batch_size": 2}
    engine = make_engine(path, speculative_config=spec, max_model_len=256)
    prompts = random_prompts([10, 20, 30, 40, 50], 1024, seed=14)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p},
                           SamplingParams(temperature=0.0, max_tokens=8 + 6 * i, ignore_eos=True))
    drafts_while_busy, drafts_when_quiet = 0, 0
    while engine.has_unfinished_requests():
        enqueued = len(engine.scheduler.running) + len(engine.scheduler.waiting)
        before = engine.get_stats()["spec_decode_num_drafts"]
        engine.step()
        delta = engine.get_stats()["spec_decode_num_drafts"] - before
        if enqueued > 2:
            drafts_while_busy += delta
        else:
            drafts_when_quiet += delta
    assert drafts_while_busy == 0 and drafts_when_quiet > 0


# ------------------------------------------------------------------ configuration
def test_speculative_config_parses_vllm_keys_and_defaults():
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4}).prompt_lookup_min == 5
    only_max = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    assert SpeculativeConfig.parse('{"model": "/m", "num_speculative_tokens": 2}').method == "draft_model"
    assert SpeculativeConfig.parse({"method": "draft_model", "model": "/m", "num_speculative_tokens": 2}
                                   ).num_lookahead_slots == 2
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).num_lookahead_slots == 0


@pytest.mark.parametrize("value, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of ngram, draft_model"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown key(s) lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min=4 exceeds prompt_lookup_max=2"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ("{not json", "not valid JSON"),
])
def test_invalid_speculative_configs_are_errors_at_start_up(value, message, model_dir):
    with pytest.raises(ValueError, match="speculative_config") as e:
        EngineArgs(model=str(model_dir("llama")), speculative_config=value).create_engine_config()
    assert message in str(e.value)


def test_a_draft_with_another_vocabulary_is_an_error_at_start_up(model_dir, tmp_path, tiny_tokenizer):
    other = _tiny_vocab_model(tmp_path / "other", tiny_tokenizer, 0)
    with pytest.raises(ValueError, match="vocabulary") as e:
        EngineArgs(model=str(model_dir("llama")), speculative_config=_draft(other)).create_engine_config()
    assert f"({TINY_VOCAB} tokens" in str(e.value) and "1024" in str(e.value)


def test_speculative_config_from_the_command_line_and_a_torchserve_handler_section(model_dir):
    import argparse

    from pagedbackend.adapters.torchserve.config import validate_model_config

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", str(model_dir("llama")), "--speculative-config", json.dumps(NGRAM)])
    config = EngineArgs.from_cli_args(ns).create_engine_config()
    assert config.speculative_config == SpeculativeConfig.parse(NGRAM)
    validate_model_config({"continuousBatching": True, "handler": {"speculative_config": NGRAM}})
    with pytest.raises(ValueError, match="speculative_config"):
        validate_model_config({"continuousBatching": True,
                               "handler": {"speculative_config": {"method": "nope", "num_speculative_tokens": 1}}})


def test_spec_decode_metrics_reach_prometheus_with_a_position_label(model_dir, make_engine):
    from pagedbackend.prometheus import render

    path = model_dir("llama")
    llm = make_engine(path, "llm", speculative_config=_draft(path), max_model_len=128)
    _greedy(llm, random_prompts([10], 1024, seed=15))
    text = render(llm.llm_engine.get_stats())
    assert "pagedbackend_spec_decode_num_drafts_total" in text
    assert 'pagedbackend_spec_decode_num_accepted_tokens_per_pos_total{position="2"}' in text
    snapshot = llm.llm_engine.stats_snapshot()
    assert snapshot.spec_decode_acceptance_rate == 1.0
