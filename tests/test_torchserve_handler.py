"""The TorchServe handler driven in-process with TorchServe's own Context and metrics cache
(no Java): load-time config errors, no exception escaping handle(), the continuous-batching
step protocol, and a client dropped between steps."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("ts")
import ts  # noqa: E402
from ts.context import Context, RequestProcessor  # noqa: E402
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402

from pagedbackend.adapters.torchserve.handler import PagedLLMHandler  # noqa: E402
from pagedbackend.adapters.torchserve.launcher import build_archive  # noqa: E402

METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


class FakeSocket:
    """Stands in for the worker's socket to the frontend: records what is sent."""

    def __init__(self):
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))


def make_context(model_dir: Path, mode: str = "continuousBatching", handler: dict | None = None, **extra):
    config = {mode: True, "batchSize": 1 if mode == "asyncCommunication" else 8,
              "handler": {"max_num_seqs": 8, **(handler or {})}, **extra}
    ctx = Context("tiny", str(model_dir), {}, 1, None, "0.12.0", metrics=MetricsCacheYamlImpl(str(METRICS_YAML)),
                  model_yaml_config=config)
    ctx.cl_socket = FakeSocket()
    return ctx


def set_batch(ctx: Context, request_ids: list[str], url_paths: list[str] | None = None):
    ctx.request_ids = {i: rid for i, rid in enumerate(request_ids)}
    ctx.request_processor = [RequestProcessor({"url_path": (url_paths or [""] * len(request_ids))[i]})
                             for i in range(len(request_ids))]
    ctx.metrics.request_ids = ctx.request_ids


@pytest.fixture
def loaded(model_dir):
    handlers = []

    def load(mode="continuousBatching", **handler):
        h = PagedLLMHandler()
        ctx = make_context(model_dir("llama"), mode, handler)
        h.initialize(ctx)
        handlers.append(h)
        return h, ctx

    yield load
    for h in handlers:
        h.metrics.stop()
        h.engine.shutdown()
        h.engine.engine.check_all_blocks_free()


@pytest.mark.parametrize("config,message", [
    ({"continuousBatching": True, "handler": {"max_seqs": 4}}, "unknown key(s) max_seqs"),
    ({"continuousBatching": True, "handler": {"block_size": 12}}, "block_size must be one of"),
    ({"asyncCommunication": True, "batchSize": 8, "handler": {}}, "batchSize must be 1 with asyncCommunication"),
    ({"continuousBatching": True, "asyncCommunication": True}, "exactly one of continuousBatching"),
    ({"handler": {}}, "exactly one of continuousBatching"),
])
def test_bad_model_config_fails_the_load_and_the_archive_naming_the_problem(config, message, model_dir, tmp_path):
    ctx = Context("tiny", str(model_dir("llama")), {}, 1, None, "0.12.0",
                  metrics=MetricsCacheYamlImpl(str(METRICS_YAML)), model_yaml_config=config)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PagedLLMHandler().initialize(ctx)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_archive(model_dir("llama"), "tiny", tmp_path / "store", cfg_file)
    assert not (tmp_path / "store" / "tiny.mar").exists()


def test_model_path_in_the_config_is_used_instead_of_the_archive(loaded, model_dir, tmp_path):
    h, _ = loaded(model_path=str(model_dir("gpt2")))
    assert h.engine.engine.config.model_config.architecture == "GPT2LMHeadModel"


def _drain_async(h, ctx, body, url_path=""):
    set_batch(ctx, ["r-" + str(time.monotonic_ns())], [url_path])
    ret = asyncio.run(h.handle([{"body": body}], ctx))
    return ret, ctx


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b"[1, 2]", b"", b"{\"prompt\": 5}", b"{\"prompt\": \"x\", \"n\": 0}"])
def test_async_handle_answers_bad_bodies_with_400_and_never_raises(loaded, body):
    h, ctx = loaded("asyncCommunication")
    ret, ctx = _drain_async(h, ctx, body)
    assert ctx.get_response_status(0)[0] == 400
    error = json.loads(ret[0])["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_async_failure_after_the_first_piece_is_reported_in_the_stream(loaded):
    h, ctx = loaded("asyncCommunication")
    real = h.engine.generate

    async def failing(prompt, params, request_id, priority=0):
        async for out in real(prompt, params, request_id, priority=priority):
            yield out
            raise RuntimeError("device lost")

    h.engine.generate = failing
    ret, ctx = _drain_async(h, ctx, json.dumps({"prompt": "hi", "stream": True, "max_tokens": 5}).encode())
    assert ret == [""] and ctx.get_response_status(0)[0] == 200
    sent = b"".join(ctx.cl_socket.sent)
    assert b"device lost" in sent and b"internal_error" in sent


def test_continuous_batching_steps_stream_and_stop(loaded):
    h, ctx = loaded()
    texts, finished = {"a": "", "b": ""}, set()
    bodies = {"a": {"prompt": "alpha", "max_tokens": 6, "stream": True, "ignore_eos": True},
              "b": {"prompt": "beta", "max_tokens": 9, "stream": True, "ignore_eos": True}}
    active, first = ["a", "b"], True
    for _ in range(200):
        if not active:
            break
        set_batch(ctx, active)
        data = [{"body": json.dumps(bodies[r]).encode()} if first else {} for r in active]
        first = False
        out = h.handle(data, ctx)
        stops = [crit(None) for crit in ctx.stopping_criteria]
        for rid, text, stop in zip(active, out, stops):
            texts[rid] += text
            if stop:
                finished.add(rid)
        active = [r for r in active if r not in finished]
    assert finished == {"a", "b"}
    counts = {r: sum(len(json.loads(line)["token_ids"]) for line in texts[r].splitlines()) for r in texts}
    assert counts == {"a": 6, "b": 9}


def test_request_dropped_from_the_batch_is_aborted(loaded):
    h, ctx = loaded()
    set_batch(ctx, ["long"])
    h.handle([{"body": json.dumps({"prompt": "x", "max_tokens": 900, "ignore_eos": True, "stream": True}).encode()}],
             ctx)
    set_batch(ctx, ["long"])
    h.handle([{}], ctx)
    assert h.engine.get_stats()["num_running"] == 1
    set_batch(ctx, ["other"])  # TorchServe dropped "long": its client disconnected
    h.handle([{"body": json.dumps({"prompt": "y", "max_tokens": 2}).encode()}], ctx)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = h.engine.get_stats()
        if stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_kv_blocks"]:
            break
        time.sleep(0.05)
    assert stats["num_running"] == 0 and stats["generation_tokens"] < 900


def test_single_step_reply_is_a_plain_response(loaded):
    """A reply complete at its first step must not be marked as a stream (it would hang the
    client in TorchServe 0.12): its stopping criterion answers None."""
    h, ctx = loaded()
    set_batch(ctx, ["m"], ["v1/models"])
    out = h.handle([{"body": b"{}"}], ctx)
    assert json.loads(out[0])["data"][0]["id"] == "tiny"
    assert ctx.stopping_criteria[0](out[0]) is None
