"""Penalties, logit bias, allowed tokens and bad words: equal to transformers' logits
processors on the same logits, and end to end to `generate()` with the same feature."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, random_prompts
from pagedbackend import SamplingParams
from pagedbackend.sampler import Sampler
from pagedbackend.sequence import Sequence

VOCAB = 50


def _seq(params: SamplingParams, prompt: list[int], output: list[int]) -> Sequence:
    seq = Sequence("r", prompt, params, 0.0)
    seq.token_ids.extend(output)
    return seq


def _processed(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    sampler = Sampler("cpu", 0)
    return sampler._process(logits.clone(), sampler.make_batch(seqs, logits.shape[1]))


def _random_history(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def test_repetition_penalty_equals_transformers_processor_per_row():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    penalties = [1.3, 0.7, 1.0, 2.0]  # a row without penalty shares the batch
    histories = [(_random_history(g, 7), _random_history(g, 5)) for _ in penalties]
    seqs = [_seq(SamplingParams(temperature=0, repetition_penalty=p), prompt, out)
            for p, (prompt, out) in zip(penalties, histories)]
    ours = _processed(seqs, logits)
    for row, (p, (prompt, out)) in enumerate(zip(penalties, histories)):
        expected = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([prompt + out]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], expected, rtol=0, atol=1e-6)


def test_logit_bias_equals_transformers_sequence_bias():
    from transformers import SequenceBiasLogitsProcessor

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, VOCAB, generator=g)
    bias = {"3": 5.0, 7: -2.5, 49: 100.0}  # string keys as OpenAI's JSON sends them
    seqs = [_seq(SamplingParams(temperature=0, logit_bias=bias), [1, 2], [4]),
            _seq(SamplingParams(temperature=0), [1, 2], [])]
    ours = _processed(seqs, logits)
    processor = SequenceBiasLogitsProcessor({(int(t),): b for t, b in bias.items()})
    expected = processor(torch.tensor([[1, 2, 4]]), logits[:1].clone())
    torch.testing.assert_close(ours[:1], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], logits[1])


def test_logit_bias_is_clamped_to_openai_range():
    assert SamplingParams(logit_bias={5: 1000}).logit_bias == {5: 100.0}


def test_presence_and_frequency_penalties_follow_openai_definition():
    """OpenAI: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, with c
    the count of j in the generated tokens only (the prompt does not count)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, VOCAB, generator=g)
    prompt = [9, 9, 9, 10]
    outputs = [[1, 1, 2, 5, 1], [], [7, 8, 7]]
    settings = [(0.5, 0.25), (1.0, 1.0), (-0.7, 1.5)]
    seqs = [_seq(SamplingParams(temperature=0, presence_penalty=p, frequency_penalty=f), prompt, out)
            for (p, f), out in zip(settings, outputs)]
    ours = _processed(seqs, logits)
    expected = logits.clone()
    for row, ((p, f), out) in enumerate(zip(settings, outputs)):
        for token in set(out):
            expected[row, token] -= out.count(token) * f + p
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_bad_words_equal_transformers_no_bad_words_processor():
    from transformers import NoBadWordsLogitsProcessor

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, VOCAB, generator=g)
    history = [3, 4, 5, 6, 7]
    bad = [[12], [6, 7, 13], [7, 14], [5, 15], [40, 41]]  # two prefixes match the tail
    seq = _seq(SamplingParams(temperature=0), history[:2], history[2:])
    seq.bad_words_ids = bad
    ours = _processed([seq], logits)
    expected = NoBadWordsLogitsProcessor(bad, eos_token_id=2)(torch.tensor([history]), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert sorted(torch.nonzero(torch.isinf(ours[0])).flatten().tolist()) == [12, 13, 14]


def test_allowed_token_ids_equal_transformers_suppress_tokens():
    from transformers import SuppressTokensLogitsProcessor

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, VOCAB, generator=g)
    allowed = [3, 17, 42]
    seqs = [_seq(SamplingParams(temperature=0, allowed_token_ids=allowed), [1], []),
            _seq(SamplingParams(temperature=0), [1], [])]
    ours = _processed(seqs, logits)
    suppress = [t for t in range(VOCAB) if t not in allowed]
    expected = SuppressTokensLogitsProcessor(suppress)(torch.tensor([[1]]), logits[:1].clone())
    assert torch.equal(ours[:1], expected)
    assert torch.equal(ours[1], logits[1])


# ------------------------------------------------------------------ end to end
def _generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_repetition_penalty_and_logit_bias_match_transformers_generate_in_one_mixed_batch(arch, model_dir, make_engine):
    path = model_dir(arch)
    llm = make_engine(path, "llm")
    prompts = random_prompts([6, 31, 18, 3], 1024, seed=10)
    bias = {p[0]: 6.0 for p in prompts[:1]} | {500: 4.0, 501: -100.0}
    params = [SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.8),
              SamplingParams(temperature=0, max_tokens=16, logit_bias=bias),
              SamplingParams(temperature=0, max_tokens=16, repetition_penalty=0.6, logit_bias=bias),
              SamplingParams(temperature=0, max_tokens=16)]
    expected = [
        hf_greedy(path, prompts[0], 16, repetition_penalty=1.8),
        hf_greedy(path, prompts[1], 16, sequence_bias={(t,): b for t, b in bias.items()}),
        None,  # both features in one row: exercises the batched path (each is checked above)
        hf_greedy(path, prompts[3], 16),
    ]
    got = _generate(llm, prompts, params)
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert got[0] != hf_greedy(path, prompts[0], 16) or got[1] != hf_greedy(path, prompts[1], 16)


def test_bad_words_match_transformers_bad_words_ids(model_dir, make_engine):
    path = model_dir("llama")
    engine = make_engine(path)
    prompt = random_prompts([12], 1024, seed=11)[0]
    plain = hf_greedy(path, prompt, 20)
    tok = engine.tokenizer
    # Greedy decoding would say " block" (one token) and "xy" + "ur" (two tokens) here.
    assert tok.decode(plain[4:5]) == " block" and tok.decode(plain[:2]) == "xyur"
    bad_ids = engine._bad_words_ids(["block", "xyur"])
    assert [plain[4]] in bad_ids and any(len(ids) > 1 for ids in bad_ids)
    got = engine_output_tokens(engine, prompt, SamplingParams(temperature=0, max_tokens=20, bad_words=["block", "xyur"]))
    assert got == hf_greedy(path, prompt, 20, bad_words_ids=bad_ids)
    assert plain[4] not in got and got != plain


def engine_output_tokens(engine, prompt, params) -> list[int]:
    engine.add_request("x", {"prompt_token_ids": prompt}, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return final.outputs[0].token_ids


def test_allowed_token_ids_match_transformers_suppress_tokens(model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm")
    prompt = random_prompts([9], 1024, seed=12)[0]
    allowed = list(range(100, 160))
    (got,) = _generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=12, allowed_token_ids=allowed))
    assert set(got) <= set(allowed)
    suppress = [t for t in range(1024) if t not in allowed]
    assert got == hf_greedy(path, prompt, 12, suppress_tokens=suppress)


def test_sampling_with_penalties_is_seeded_and_avoids_repeats(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    prompt = random_prompts([5], 1024, seed=13)[0]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0)
    a = _generate(llm, [prompt], params)[0]
    b = _generate(llm, [prompt, prompt[:3]], [params, SamplingParams(max_tokens=5)])[0]
    assert a == b


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0), ("logit_bias", {"x": 1}),
                                          ("allowed_token_ids", []), ("bad_words", [""])])
def test_invalid_penalty_fields_are_named(field, value):
    from pagedbackend.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**{field: value})
