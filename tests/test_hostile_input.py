"""What a hostile soak found in the engine and protocol layers: limits checked before any work,
validation and tokenization on the sender's thread, vLLM's bounds on max_tokens and token ids,
untrusted JSON that cannot crash the parser, one finish chunk per OpenAI choice, and metrics
that say what they count."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from helpers import hf_greedy
from pagedbackend import AsyncLLMEngine, EngineArgs, SamplingParams
from pagedbackend.errors import InvalidRequest
from pagedbackend.openai_api import parse_completion, stream_openai
from pagedbackend.protocol import HugeInteger, load_json, parse_generate

VOCAB = 1024  # the tiny models' vocabulary


@pytest.fixture
def engine(model_dir):
    eng = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama")), max_num_seqs=8), progress=False)
    yield eng
    eng.shutdown()
    eng.engine.check_all_blocks_free()


# ------------------------------------------------------------------ vLLM's bounds
def test_max_tokens_beyond_the_context_is_rejected_with_vllms_message(model_dir):
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama")), max_model_len=64), progress=False)
    try:
        with pytest.raises(InvalidRequest, match=r"'max_tokens' or 'max_completion_tokens' is too large: 1000000000000\. "
                                                 r"This model's maximum context length is 64 tokens and your request "
                                                 r"has 4 input tokens \(1000000000000 > 64 - 4\)") as e:
            engine.submit({"prompt_token_ids": [11, 12, 13, 14]}, SamplingParams(max_tokens=10**12))
        assert e.value.param == "max_tokens"
        outs = list(engine.submit({"prompt_token_ids": [11, 12, 13, 14]},
                                  SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)))
        assert len(outs[-1].outputs[0].token_ids) == 60
    finally:
        engine.shutdown()
    engine.engine.check_all_blocks_free()


def test_offline_generation_still_stops_at_max_model_len_as_vllms_llm_does(model_dir, make_engine):
    engine = make_engine(model_dir("llama"), max_model_len=64)
    engine.add_request("r", {"prompt_token_ids": [11, 12, 13, 14]}, SamplingParams(max_tokens=10**12, ignore_eos=True))
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    (final,) = finals
    assert final.outputs[0].finish_reason == "length" and len(final.outputs[0].token_ids) == 60


@pytest.mark.parametrize("params,field,message", [
    (dict(allowed_token_ids=[VOCAB, VOCAB + 5]), "allowed_token_ids", "out-of-vocab"),
    (dict(allowed_token_ids=[5, 10**9]), "allowed_token_ids", "out-of-vocab"),
    (dict(logit_bias={str(VOCAB + 1): 5.0}), "logit_bias", "out-of-vocab"),
])
def test_token_ids_outside_the_vocabulary_are_rejected(params, field, message, model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    with pytest.raises(InvalidRequest, match=message) as e:
        engine.add_request("r", "hello", SamplingParams(**params))
    assert e.value.param == field
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("params,field", [(dict(n=200000), "n"), (dict(n=2, best_of=200000, temperature=1.0), "best_of")])
def test_samples_over_max_num_seqs_are_rejected_before_any_sequence_exists(params, field, model_dir, make_engine,
                                                                          monkeypatch):
    import pagedbackend.engine_core as engine_core

    engine = make_engine(model_dir("llama"), max_num_seqs=4)

    def no_sequences(*a, **k):
        raise AssertionError("a Sequence was built for a request that was going to be rejected")

    monkeypatch.setattr(engine_core, "Sequence", no_sequences)
    with pytest.raises(InvalidRequest, match=f"{field}=200000 exceeds max_num_seqs=4") as e:
        engine.add_request("r", "hello", SamplingParams(**params))
    assert e.value.param == field


def test_a_prompt_too_long_to_fit_is_rejected_before_tokenizing(model_dir, make_engine, monkeypatch):
    engine = make_engine(model_dir("llama"), max_model_len=64)

    def no_tokenizing(*a, **k):
        raise AssertionError("the tokenizer ran on a prompt that could never fit")

    monkeypatch.setattr(engine.tokenizer, "encode", no_tokenizing)
    with pytest.raises(InvalidRequest, match="characters, more than max_prompt_chars=") as e:
        engine.add_request("r", "x" * (6 << 20), SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="max_model_len is 64"):
        engine.add_request("r", {"prompt_token_ids": [7] * (1 << 20)}, SamplingParams())


def test_the_character_bound_never_rejects_a_prompt_that_fits(model_dir, make_engine, tiny_tokenizer):
    engine = make_engine(model_dir("llama"), max_model_len=64)
    # The longest prompt that still fits, written with the vocabulary's longest tokens.
    longest = max(tiny_tokenizer.get_vocab(), key=len)
    ids = [tiny_tokenizer.convert_tokens_to_ids(longest)] * 62
    text = tiny_tokenizer.decode(ids)
    assert len(tiny_tokenizer.encode(text)) < 64
    engine.add_request("r", text, SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()


def test_max_prompt_chars_is_configurable(model_dir, make_engine):
    engine = make_engine(model_dir("llama"), max_prompt_chars=10)
    with pytest.raises(InvalidRequest, match="max_prompt_chars=10"):
        engine.add_request("r", "a prompt of more than ten characters", SamplingParams())
    with pytest.raises(ValueError, match="max_prompt_chars must be at least 1"):
        EngineArgs(model=str(model_dir("llama")), max_prompt_chars=0).create_engine_config()


# ------------------------------------------------- the sender's thread does the work
def test_a_bad_request_fails_synchronously_for_its_sender_only(engine, model_dir):
    path = model_dir("llama")
    good = engine.submit({"prompt_token_ids": [21, 22, 23]}, SamplingParams(temperature=0, max_tokens=12))
    errors: dict[str, BaseException] = {}

    def send_bad(name, prompt, params):
        try:
            engine.submit(prompt, params)
        except InvalidRequest as e:
            errors[name] = e

    bad = [("huge", "y" * (5 << 20), SamplingParams()), ("n", "hi", SamplingParams(n=200000)),
           ("vocab", "hi", SamplingParams(allowed_token_ids=[VOCAB]))]
    threads = [threading.Thread(target=send_bad, args=b) for b in bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {name: e.param for name, e in errors.items()} == {"huge": "prompt", "n": "n", "vocab": "allowed_token_ids"}
    tokens = [t for out in good for t in out.outputs[0].delta_token_ids]
    assert tokens == hf_greedy(path, [21, 22, 23], 12)


def test_prompts_are_tokenized_on_the_submitting_thread(engine):
    threads = []
    encode = engine.tokenizer.encode

    def recording_encode(*a, **k):
        threads.append(threading.current_thread().name)
        return encode(*a, **k)

    engine.tokenizer.encode = recording_encode
    try:
        list(engine.submit("tokenize me here", SamplingParams(max_tokens=2)))

        async def from_a_coroutine():
            return [o async for o in engine.generate("and from a coroutine", SamplingParams(max_tokens=2))]

        asyncio.run(from_a_coroutine())
    finally:
        del engine.tokenizer.encode
    assert threads and "pagedbackend-engine" not in threads


def test_add_request_raises_at_once_inside_a_coroutine(engine):
    async def main():
        with pytest.raises(InvalidRequest, match="max_tokens"):
            engine.add_request("hello", SamplingParams(max_tokens=10**12))
        stream = engine.add_request("hello", SamplingParams(max_tokens=3, temperature=0))
        return [o async for o in engine.stream(stream)]

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


# --------------------------------------------------------------- untrusted JSON
def test_a_5000_digit_integer_is_an_error_naming_its_field():
    body = load_json(('{"prompt": "hi", "n": ' + "9" * 5000 + "}").encode())
    assert isinstance(body["n"], HugeInteger)
    with pytest.raises(InvalidRequest, match="n must be an integer, got <a 5000-digit integer>") as e:
        parse_generate(body)
    assert e.value.param == "n"


@pytest.mark.parametrize("payload,message", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"prompt": "hi", "stop": ' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("", "request body is empty"),
    ('"just a string"', "must be a JSON object.*got a JSON string"),
    ("[1, 2]", "got a JSON array"),
    ("{bad json", "not valid JSON"),
])
def test_untrusted_bodies_are_clean_400s(payload, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        load_json(payload)
    assert e.value.status == 400


def test_an_infinite_float_is_an_error_naming_its_field():
    with pytest.raises(InvalidRequest, match="temperature must be finite") as e:
        parse_generate(load_json('{"prompt": "hi", "temperature": 1e400}'))
    assert e.value.param == "temperature"


# ------------------------------------------------------------------- OpenAI n > 1
def test_openai_stream_with_n_sends_each_choice_finish_exactly_once(engine):
    req = parse_completion({"prompt": "Once upon a time", "n": 4, "temperature": 1.0, "seed": 3, "stream": True,
                            "max_tokens": 12, "min_tokens": 1, "stop_token_ids": list(range(100, 400))})

    async def collect():
        return [e async for e in stream_openai(engine, req, "t", "tiny")]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    choices = [c for e in events[:-1] for c in json.loads(e[len("data: "):])["choices"]]
    finishes = [c["index"] for c in choices if c["finish_reason"] is not None]
    assert sorted(finishes) == [0, 1, 2, 3]
    for index in range(4):  # nothing of a choice follows its finish chunk
        mine = [c for c in choices if c["index"] == index]
        assert mine[-1]["finish_reason"] is not None


# ------------------------------------------------------------------------ metrics
def test_every_metric_of_the_table_is_in_the_stats_and_rendered(engine):
    from pagedbackend.adapters.torchserve import metrics as ts_metrics
    from pagedbackend.metrics import METRICS
    from pagedbackend.prometheus import render

    list(engine.submit("hello", SamplingParams(max_tokens=3)))
    stats = engine.get_stats()
    assert {m.key for m in METRICS} == set(stats)  # every snapshot field is exported, and only those
    snapshot = engine.stats_snapshot()
    with pytest.raises(Exception):  # frozen
        snapshot.num_running = 3
    assert snapshot.generation_tokens == stats["generation_tokens"] >= 3
    text = render(stats, {"model": "m"})
    for m in METRICS:  # a positional metric is a counter per position
        kind = 'counter' if m.kind == 'positional' else m.kind
        assert f"# TYPE pagedbackend_{m.prometheus} {kind}" in text
        if m.vllm is not None:  # Triton's vLLM backend's name, beside ours
            assert f"# TYPE {m.vllm} {kind}" in text
    exported = (set(ts_metrics.GAUGES) | set(ts_metrics.COUNTERS) | set(ts_metrics.HISTOGRAMS.values())
                | set(ts_metrics.POSITIONAL))
    assert exported == {m.torchserve for m in METRICS}
    assert {"num_swapped", "num_free_host_blocks", "num_running_requests", "num_waiting_requests"} <= {
        m.key for m in METRICS}
    assert "recompute or by swapping" in next(m.help for m in METRICS if m.key == "num_preemptions")


def test_running_and_waiting_count_requests_and_sequences_apart(model_dir, make_engine):
    engine = make_engine(model_dir("llama"), max_num_seqs=4)
    engine.add_request("a", "hello", SamplingParams(n=3, temperature=1.0, max_tokens=4))
    engine.add_request("b", "there", SamplingParams(n=3, temperature=1.0, max_tokens=4))
    engine.step()
    engine.step()
    stats = engine.get_stats()
    assert stats["num_running_requests"] + stats["num_waiting_requests"] == 2
    assert stats["num_running"] >= 3 > stats["num_running_requests"]
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats["num_running_requests"] == stats["num_waiting_requests"] == stats["num_running"] == 0
