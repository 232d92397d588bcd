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

from pagedbackend import SamplingParams  # noqa: E402
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
    ({"continuousBatching": True, "handler": {"tool_call_parser": "mistral"}}, "tool_call_parser must be one of"),
    ({"continuousBatching": True, "handler": {"structured_outputs_config": {"backend": "outlines"}}},
     "backend must be one of auto, xgrammar"),
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


def test_an_inline_chat_template_longer_than_a_file_name_and_the_tool_call_parser_load(loaded):
    template = "{% for m in messages %}" + "<|{{ m.role }}|>{{ m.content }}" * 40 + "{% endfor %}"
    h, _ = loaded(chat_template=template)
    assert h.chat_template == template
    assert h.tool_call_parser == "llama3_json"  # auto: the family's (a Llama model)
    h2, _ = loaded(tool_call_parser="hermes")
    assert h2.tool_call_parser == "hermes"


def test_device_type_cpu_puts_the_engine_on_the_cpu(model_dir):
    h = PagedLLMHandler()
    ctx = make_context(model_dir("llama"), handler={}, deviceType="cpu")
    ctx.system_properties["gpu_id"] = 0  # TorchServe would not give one, but even so
    try:
        h.initialize(ctx)
        assert h.engine.engine.config.device == "cpu"
    finally:
        if getattr(h, "engine", None) is not None:
            h.metrics.stop()
            h.engine.shutdown()


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
    real = h.engine.stream

    async def failing(stream):
        async for out in real(stream):
            yield out
            raise RuntimeError("device lost")

    h.engine.stream = failing
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


def test_speculative_decoding_from_the_handler_section_streams_several_tokens_per_step(loaded, model_dir,
                                                                                       make_engine):
    spec = {"method": "draft_model", "model": str(model_dir("llama")), "num_speculative_tokens": 3}
    h, ctx = loaded(speculative_config=spec)
    body = {"prompt": "alpha beta", "max_tokens": 13, "stream": True, "ignore_eos": True, "temperature": 0}
    lines, first = [], True
    for _ in range(100):
        set_batch(ctx, ["a"])
        out = h.handle([{"body": json.dumps(body).encode()} if first else {}], ctx)
        first = False
        lines += [json.loads(line) for line in out[0].splitlines()]
        if ctx.stopping_criteria[0](None):
            break
    ids = [t for line in lines for t in line["token_ids"]]
    expected = make_engine(model_dir("llama"), "llm").generate(
        ["alpha beta"], SamplingParams(max_tokens=13, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert ids == expected.token_ids
    assert max(len(line["token_ids"]) for line in lines) > 1  # a step's delta carried several tokens
    stats = h.engine.get_stats()
    assert stats["spec_decode_num_drafts"] > 0 and stats["spec_decode_acceptance_rate"] == 1.0
    h.metrics.refresh()  # the spec counters go through TorchServe's metrics cache, position dimension included


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


def _step(h, ctx, bodies: dict[str, dict | None], url_paths: dict[str, str] | None = None):
    """One continuous-batching step: {request id: body or None (a continuing request)}.
    Returns {request id: (text, status, content type, stop)} for the requests answered."""
    ids = list(bodies)
    set_batch(ctx, ids, [(url_paths or {}).get(r, "") for r in ids])
    data = [{"body": json.dumps(b).encode()} if b is not None else {} for b in bodies.values()]
    out = h.handle(data, ctx)
    assert len(out) == len(ids)
    answered = {}
    for idx, rid in ctx.request_ids.items():
        answered[rid] = (out[idx], ctx.get_response_status(idx)[0], ctx.get_response_content_type(idx),
                         ctx.stopping_criteria[idx](out[idx]))
    return answered


def test_a_rejection_found_after_a_slow_tokenization_is_still_a_400(loaded, monkeypatch):
    """The soak's 3.6M-token prompt: validation used to finish after the handler had committed
    200 (it waited 1 s); now it runs before the first answer, however long it takes."""
    h, ctx = loaded(max_model_len=64)
    encode = h.engine.tokenizer.encode

    def slow_encode(*a, **k):
        time.sleep(1.3)
        return encode(*a, **k) * 40  # far over max_model_len

    monkeypatch.setattr(h.engine.tokenizer, "encode", slow_encode)
    answered = _step(h, ctx, {"big": {"prompt": "a long text", "stream": True}})
    text, status, content_type, stop = answered["big"]
    assert status == 400 and content_type == "application/json" and stop is None
    assert json.loads(text)["error"]["param"] == "prompt"


@pytest.mark.parametrize("body,param", [({"prompt": "hi", "n": 200000}, "n"),
                                        ({"prompt": "hi", "n": 2, "best_of": 200000, "temperature": 1}, "best_of"),
                                        ({"prompt": "hi", "max_tokens": 10**12}, "max_tokens"),
                                        ({"prompt": "hi", "allowed_token_ids": [10**6]}, "allowed_token_ids")])
def test_limits_are_400s_naming_the_field_at_the_first_step(loaded, body, param):
    h, ctx = loaded()
    text, status, content_type, _ = _step(h, ctx, {"r": body})["r"]
    assert status == 400 and json.loads(text)["error"]["param"] == param


def test_a_stream_has_its_content_type_from_the_first_byte_when_the_first_token_is_slow(loaded, monkeypatch):
    h, ctx = loaded()
    execute = h.engine.engine.runner.execute

    def slow_execute(*a, **k):
        time.sleep(1.3)
        return execute(*a, **k)

    monkeypatch.setattr(h.engine.engine.runner, "execute", slow_execute)
    first = _step(h, ctx, {"s": {"prompt": "hi", "stream": True, "max_tokens": 2},
                           "o": {"prompt": "hi", "stream": True, "max_tokens": 2}},
                  {"o": "v1/completions"})
    assert (first["s"][1], first["s"][2]) == (200, "application/x-ndjson")
    assert (first["o"][1], first["o"][2]) == (200, "text/event-stream")
    for _ in range(100):
        answered = _step(h, ctx, {r: None for r in ("s", "o") if r in first and not first[r][3]})
        first.update(answered)
        if all(v[3] for v in first.values()):
            break
    assert all(v[3] for v in first.values())


def test_a_non_streaming_request_is_answered_once_whole_and_never_holds_the_step(loaded):
    """It is left out of every step's answer until complete (TorchServe keeps it for the next
    step), so the streams beside it get their pieces every step, and its status is its outcome."""
    h, ctx = loaded()
    steps = 0
    answers = _step(h, ctx, {"whole": {"prompt": "hi", "max_tokens": 12, "ignore_eos": True},
                             "s": {"prompt": "hi", "max_tokens": 40, "ignore_eos": True, "stream": True}})
    streamed, whole = answers["s"][0], None
    while whole is None or not answers.get("s", ("", 0, "", True))[3]:
        steps += 1
        assert steps < 400
        pending = {}
        if whole is None:
            pending["whole"] = {"prompt": "hi", "max_tokens": 12, "ignore_eos": True}  # TorchServe re-sends it
        if "s" in answers and not answers["s"][3]:
            pending["s"] = None
        if not pending:
            break
        answers = _step(h, ctx, pending)
        assert "s" not in pending or "s" in answers  # the stream is answered every step
        if "whole" in answers:
            text, status, content_type, stop = answers["whole"]
            assert (status, content_type, stop) == (200, "application/json", None)
            whole = json.loads(text)
        if "s" in answers:
            streamed += answers["s"][0]
    assert len(whole["token_ids"]) == 12
    assert sum(len(json.loads(line)["token_ids"]) for line in streamed.splitlines()) == 40


def test_a_non_streaming_failure_gets_its_error_status_not_200(loaded, monkeypatch):
    h, ctx = loaded()
    real = h.engine.stream

    async def failing(stream):
        async for out in real(stream):
            yield out
            raise RuntimeError("device lost")

    monkeypatch.setattr(h.engine, "stream", failing)
    body = {"prompt": "hi", "max_tokens": 5}
    for _ in range(200):
        answers = _step(h, ctx, {"w": body})
        if "w" in answers:
            break
    text, status, content_type, stop = answers["w"]
    assert status == 500 and content_type == "application/json" and stop is None
    assert "device lost" in json.loads(text)["error"]["message"]


def test_a_large_body_is_tokenized_off_the_step_and_answered_once_open(loaded, monkeypatch):
    """A body over LARGE_BODY_BYTES is parsed and tokenized on a worker thread: the steps go on
    answering the stream beside it while that runs, and the big request gets its (right)
    first answer once it is open."""
    from pagedbackend.adapters.torchserve import handler as handler_module

    h, ctx = loaded(max_prompt_chars=10**7)
    encode = h.engine.tokenizer.encode
    release = __import__("threading").Event()

    def slow_encode(text, *a, **k):
        if len(text) > handler_module.LARGE_BODY_BYTES:
            release.wait(30)
            return encode("a long text that fits", *a, **k)
        return encode(text, *a, **k)

    monkeypatch.setattr(h.engine.tokenizer, "encode", slow_encode)
    big = {"prompt": "word " * (handler_module.LARGE_BODY_BYTES // 4), "stream": True, "max_tokens": 3}
    answers = _step(h, ctx, {"s": {"prompt": "hi", "stream": True, "max_tokens": 30, "ignore_eos": True},
                             "big": big})
    assert "s" in answers and "big" not in answers  # the stream was answered; the big one waits, unanswered
    for _ in range(3):
        answers = _step(h, ctx, {"s": None, "big": big})
        assert "s" in answers and "big" not in answers
    release.set()
    first, done, pending = None, set(), {"s": None, "big": big}
    # Until a deadline, not a step count: once the stream is done a step with only the unopened
    # big request returns at once, and on a loaded box 400 of them can pass before the worker
    # thread has opened it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answers = _step(h, ctx, pending)
        if "big" in answers and first is None:
            first = answers["big"]
            assert (first[1], first[2]) == (200, "application/x-ndjson")
        for rid, (_, _, _, stop) in answers.items():
            if stop:
                done.add(rid)
        pending = {rid: (None if rid != "big" or first else big) for rid in ("s", "big") if rid not in done}
        if not pending:
            break
    assert done == {"s", "big"}


class GatedExecutor(__import__("concurrent.futures").futures.ThreadPoolExecutor):
    """The handler loop's worker threads, held until `gate` is set (a busy machine)."""

    def __init__(self, gate):
        super().__init__(max_workers=2)
        self.gate = gate

    def submit(self, fn, *args, **kwargs):
        def held():
            self.gate.wait(30)
            return fn(*args, **kwargs)
        return super().submit(held)


def test_a_large_body_opened_after_the_next_step_keeps_its_own_route(loaded, monkeypatch):
    """TorchServe reuses one context for every step: the worker thread that opens a large
    body must not read the route from it (by then index 0 is another step's request)."""
    from pagedbackend.adapters.torchserve import handler as handler_module

    h, ctx = loaded(max_prompt_chars=10**7)
    encode = h.engine.tokenizer.encode
    monkeypatch.setattr(h.engine.tokenizer, "encode", lambda text, *a, **k: encode(text[:40], *a, **k))
    gate = __import__("threading").Event()
    h._loop.set_default_executor(GatedExecutor(gate))
    big = {"prompt": "word " * (handler_module.LARGE_BODY_BYTES // 4), "max_tokens": 2, "stream": True}
    assert _step(h, ctx, {"big": big}, {"big": "v1/completions"}) == {}
    answers = _step(h, ctx, {"m": {}, "big": big}, {"m": "v1/models", "big": "v1/completions"})
    assert "big" not in answers and json.loads(answers["m"][0])["object"] == "list"
    set_batch(ctx, ["m2"], ["v1/models"])  # the context now holds another step
    gate.set()
    deadline = time.monotonic() + 30
    while not h._pumps["big"].opened and time.monotonic() < deadline:  # opened before the next step
        time.sleep(0.01)
    for _ in range(200):
        answers = _step(h, ctx, {"big": big}, {"big": "v1/completions"})
        if "big" in answers:
            break
    text, status, content_type, _ = answers["big"]
    assert (status, content_type) == (200, "text/event-stream"), text
    assert text.startswith("data: ") and json.loads(text[6:].split("\n")[0])["object"] == "text_completion"


def test_a_large_body_whose_opening_fails_is_answered_500_not_kept_forever(loaded, monkeypatch):
    from pagedbackend.adapters.torchserve import handler as handler_module

    h, ctx = loaded(max_prompt_chars=10**7)

    def broken_open(*a, **k):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(h, "_open", broken_open)
    big = {"prompt": "word " * (handler_module.LARGE_BODY_BYTES // 4)}
    for _ in range(200):
        answers = _step(h, ctx, {"big": big})
        if "big" in answers:
            break
    text, status, content_type, stop = answers["big"]
    assert status == 500 and content_type == "application/json" and stop is None
    assert "tokenizer crashed" in json.loads(text)["error"]["message"]
