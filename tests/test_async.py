"""AsyncLLMEngine: many concurrent streams from asyncio and threads, abort, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from helpers import random_prompts
from pagedbackend import (AsyncLLMEngine, EngineArgs, EngineDeadError, LLMEngine, RequestFailedError,
                          SamplingParams)


@pytest.fixture
def async_engine(model_dir):
    engines = []

    def make(**kwargs):
        kwargs.setdefault("max_num_seqs", 32)
        e = AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama")), **kwargs), progress=False))
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown()
        e.engine.check_all_blocks_free()


def _expected(make_engine, model_dir, prompts, max_tokens):
    llm = make_engine(model_dir("llama"), "llm")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    return [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs]


LENGTHS = [1 + (i * 37) % 200 for i in range(32)]
MAX_TOKENS = [4 + (i * 7) % 29 for i in range(32)]


def test_32_concurrent_asyncio_streams_match_offline_generation(async_engine, make_engine, model_dir):
    prompts = random_prompts(LENGTHS, 1024, seed=21)
    engine = async_engine()

    async def consume(i):
        text, deltas, ids = "", "", []
        async for out in engine.generate({"prompt_token_ids": prompts[i]},
                                         SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i]), f"req-{i}"):
            c = out.outputs[0]
            deltas += c.delta_text
            ids += c.delta_token_ids
            text = c.text
        assert deltas == text and ids == c.token_ids
        return text, c.token_ids

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(32)))

    results = asyncio.run(main())
    assert results == _expected(make_engine, model_dir, prompts, MAX_TOKENS)
    assert engine.get_stats()["max_batch_seqs"] > 1


def test_32_concurrent_thread_streams_match_offline_generation(async_engine, make_engine, model_dir):
    prompts = random_prompts(LENGTHS, 1024, seed=22)
    engine = async_engine()
    results: list = [None] * 32

    def consume(i):
        last = None
        for out in engine.submit({"prompt_token_ids": prompts[i]}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i])):
            last = out
        results[i] = (last.outputs[0].text, last.outputs[0].token_ids)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == _expected(make_engine, model_dir, prompts, MAX_TOKENS)
    assert engine.get_stats()["max_batch_seqs"] > 1


def test_abort_mid_stream_ends_it_and_frees_its_blocks(async_engine):
    engine = async_engine()
    prompts = random_prompts([100, 20, 30], 1024, seed=23)

    async def main():
        async def long_one():
            n = 0
            last = None
            async for out in engine.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=500), "victim"):
                n += 1
                last = out
                if n == 3:
                    await engine.abort("victim")
            return last

        async def short(i):
            last = None
            async for out in engine.generate({"prompt_token_ids": prompts[i]}, SamplingParams(temperature=0, max_tokens=30)):
                last = out
            return last

        return await asyncio.gather(long_one(), short(1), short(2))

    victim, a, b = asyncio.run(main())
    assert victim.finished and victim.outputs[0].finish_reason == "abort"
    assert len(victim.outputs[0].token_ids) < 500
    assert a.outputs[0].finish_reason == b.outputs[0].finish_reason == "length"
    stats = engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_kv_blocks"]


def test_consumer_leaving_the_loop_aborts_the_request(async_engine):
    engine = async_engine()

    async def main():
        async for out in engine.generate("hello there", SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), "leaver"):
            if len(out.outputs[0].token_ids) >= 2:
                break
        for _ in range(200):  # the abort is applied by the engine thread
            if engine.get_stats()["num_running"] == 0 and engine.get_stats()["num_free_blocks"] == engine.get_stats()["num_kv_blocks"]:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_thread_stream_closed_early_aborts_the_request(async_engine):
    engine = async_engine()
    with engine.submit("hello", SamplingParams(max_tokens=400, ignore_eos=True)) as stream:
        next(stream)
    assert not stream.finished  # left early; __exit__ sent the abort
    for out in stream:  # the stream still ends, with the abort
        last = out
    assert last.outputs[0].finish_reason == "abort"


def test_invalid_request_fails_alone_while_others_stream(async_engine):
    engine = async_engine()

    async def good(i):
        last = None
        async for out in engine.generate({"prompt_token_ids": [30 + i] * 8}, SamplingParams(temperature=0, max_tokens=12)):
            last = out
        return last.outputs[0].finish_reason

    async def bad():
        with pytest.raises(ValueError, match="token id 99999 is out of range"):
            async for _ in engine.generate({"prompt_token_ids": [99999]}, SamplingParams()):
                pass
        return "rejected"

    async def main():
        return await asyncio.gather(good(0), bad(), good(1))

    assert asyncio.run(main()) == ["length", "rejected", "length"]


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(async_engine):
    engine = async_engine()
    runner = engine.engine.runner
    real_execute = runner.execute

    def flaky(out):
        if any(item.request_id == "poison" for item in out.scheduled):
            raise RuntimeError("simulated device error")
        return real_execute(out)

    runner.execute = flaky
    with pytest.raises(RequestFailedError, match="simulated device error"):
        for _ in engine.submit("boom", SamplingParams(max_tokens=5), request_id="poison"):
            pass
    last = None
    for last in engine.submit("after", SamplingParams(temperature=0, max_tokens=6)):
        pass
    assert last.outputs[0].finish_reason == "length" and len(last.outputs[0].token_ids) == 6


def test_shutdown_with_requests_in_flight_ends_their_streams_with_an_error(model_dir):
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama"))), progress=False))
    streams = [engine.submit("tell me a long story", SamplingParams(max_tokens=1000, ignore_eos=True)) for _ in range(4)]
    next(streams[0])
    engine.shutdown()
    for stream in streams:
        with pytest.raises(EngineDeadError):
            for _ in stream:
                pass
    engine.engine.check_all_blocks_free()
    with pytest.raises(EngineDeadError):
        engine.submit("too late")
