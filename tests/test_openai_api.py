"""The OpenAI layer's generation controls: penalties, logit_bias, best_of, priority, and
logprobs rendered in OpenAI's shapes (completions and chat, whole and streamed)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from pagedbackend.errors import InvalidRequest
from pagedbackend.openai_api import complete_openai, parse_chat, parse_completion, stream_openai


@pytest.fixture
def engine(model_dir):
    from pagedbackend import AsyncLLMEngine, EngineArgs

    eng = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama"))), progress=False)
    yield eng
    eng.shutdown()
    eng.engine.check_all_blocks_free()


def _complete(engine, req):
    return asyncio.run(complete_openai(engine, req, "t", "tiny"))


def _stream(engine, req):
    async def collect():
        return [e async for e in stream_openai(engine, req, "t", "tiny")]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_completion_logprobs_have_openai_shape_and_match_the_stream(engine):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = _complete(engine, parse_completion(body))["choices"][0]
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) == 2 and math.isclose(top[token], value)  # greedy: chosen is the top one
    chunks = _stream(engine, parse_completion({**body, "stream": True}))
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_completion_echo_with_logprobs_includes_the_prompt_tokens(engine):
    req = parse_completion({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "logprobs": 1,
                            "echo": True})
    lp = _complete(engine, req)["choices"][0]["logprobs"]
    num_prompt = len(engine.tokenizer.encode("Once upon a time"))
    assert len(lp["tokens"]) == num_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])


def test_chat_logprobs_and_top_logprobs(engine):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    choice = _complete(engine, parse_chat(body, engine.tokenizer))["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted((t["logprob"] for t in entry["top_logprobs"]),
                                                                       reverse=True)
        assert len(entry["top_logprobs"]) == 3 and math.isclose(entry["top_logprobs"][0]["logprob"], entry["logprob"])
    no_lp = _complete(engine, parse_chat({**body, "logprobs": False, "top_logprobs": None}, engine.tokenizer))
    assert no_lp["choices"][0]["logprobs"] is None


def test_penalties_logit_bias_and_best_of_are_accepted_and_applied(engine):
    forced = engine.tokenizer.encode(" the", add_special_tokens=False)[-1]
    out = _complete(engine, parse_completion({"prompt": "x", "max_tokens": 3, "temperature": 0,
                                              "logit_bias": {str(forced): 100}, "frequency_penalty": 0.0,
                                              "presence_penalty": 0.5, "repetition_penalty": 1.0}))
    # +100 beats any logit of this model, and presence_penalty only subtracts 0.5.
    assert engine.tokenizer.encode(out["choices"][0]["text"], add_special_tokens=False)[:1] == [forced]
    best = _complete(engine, parse_completion({"prompt": "x", "max_tokens": 4, "temperature": 1.0, "seed": 3,
                                               "n": 2, "best_of": 4}))
    assert [c["index"] for c in best["choices"]] == [0, 1]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "x", "suffix": "!"}, "suffix"),
    ({"prompt": "x", "priority": "high"}, "priority"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
])
def test_bad_completion_fields_are_named(body, field):
    with pytest.raises(InvalidRequest) as err:
        parse_completion(body)
    assert err.value.param == field


def test_chat_top_logprobs_without_logprobs_is_rejected(engine):
    with pytest.raises(InvalidRequest) as err:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, engine.tokenizer)
    assert err.value.param == "top_logprobs"
