"""The TorchServe adapter against a real TorchServe 0.12 (Java 17), on free 127.0.0.1 ports,
each server in its own working directory (TMPDIR, logs, key file) and always stopped."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pagedbackend import SamplingParams
from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive, load_model_config
from http_client import metrics, ndjson_text, post, sse_events, start_serve_command, stream, wait_for_metrics

PROMPTS = [" ".join(["word"] * k) + f" number {k}" for k in range(1, 17)]
MAX_TOKENS = [6 + 3 * k for k in range(16)]


@pytest.fixture(scope="module")
def archive(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store")
    build_archive(model_dir("llama"), "tiny", store)
    return store


@pytest.fixture(scope="module")
def cb_server(archive, tmp_path_factory):
    """The template's mode (continuous batching), token auth off, model API on."""
    with TorchServe(archive, {"tiny": "tiny.mar"}, tmp_path_factory.mktemp("ts-cb"), token_auth=False,
                    enable_model_api=True) as server:
        yield server


@pytest.fixture(scope="module")
def async_server(model_dir, tmp_path_factory):
    """asyncCommunication mode, with token authorization left on."""
    store = tmp_path_factory.mktemp("model_store_async")
    cfg = load_model_config()
    cfg.pop("continuousBatching")
    cfg["asyncCommunication"] = True
    cfg["batchSize"] = 1
    cfg_file = store / "async-config.yaml"
    cfg_file.write_text(json.dumps(cfg))  # JSON is YAML
    build_archive(model_dir("llama"), "tiny", store, cfg_file)
    with TorchServe(store, {"tiny": "tiny.mar"}, tmp_path_factory.mktemp("ts-async"), token_auth=True) as server:
        yield server


def offline(make_engine, model_dir, prompts, max_tokens):
    llm = make_engine(model_dir("llama"), "llm")
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                        use_tqdm=False)
    return [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs]


def concurrent_streams(port, prompts, max_tokens, headers=None):
    results = [None] * len(prompts)

    def run(i):
        lines = list(stream(port, "/predictions/tiny", {"prompt": prompts[i], "max_tokens": max_tokens[i],
                                                        "temperature": 0, "ignore_eos": True, "stream": True},
                            headers))
        results[i] = ndjson_text(lines)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_16_concurrent_streams_equal_offline_generation_and_are_batched(cb_server, make_engine, model_dir):
    results = concurrent_streams(cb_server.inference_port, PROMPTS, MAX_TOKENS)
    expected = offline(make_engine, model_dir, PROMPTS, MAX_TOKENS)
    assert [(text, ids) for text, ids, _ in results] == expected
    for (_, ids, last), m in zip(results, MAX_TOKENS):
        assert last["finish_reason"] == "length"
        assert last["usage"]["completion_tokens"] == m == len(ids)
    # The engine computed several requests in one step: continuous batching happened.
    stats = wait_for_metrics(cb_server.metrics_url, lambda s: s.get("EngineMaxBatchSize", 0) > 1)
    assert stats["EngineMaxBatchSize"] > 1


def test_client_disconnect_aborts_the_request_and_frees_its_blocks(cb_server):
    before = metrics(cb_server.metrics_url).get("GeneratedTokens", 0)
    others = [None] * 3

    def other(i):
        lines = list(stream(cb_server.inference_port, "/predictions/tiny",
                            {"prompt": f"other {i}", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                             "stream": True}))
        others[i] = ndjson_text(lines)

    long_stream = stream(cb_server.inference_port, "/predictions/tiny",
                         {"prompt": "tell me everything", "max_tokens": 1000, "ignore_eos": True, "stream": True})
    received = [next(long_stream) for _ in range(3)]
    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    long_stream.close()  # the client goes away mid-stream
    for t in threads:
        t.join(120)
    assert len(received) == 3 and all(o is not None and o[2]["finish_reason"] == "length" for o in others)
    # Every block free again, nothing running, and far fewer than 1000 tokens were generated.
    stats = wait_for_metrics(cb_server.metrics_url, lambda s: s.get("GeneratedTokens", 0) - before >= 3 * 20
                             and s.get("RunningRequests") == 0 and s.get("WaitingRequests") == 0
                             and s.get("KVCacheUsagePercent") == 0.0)
    time.sleep(2.5)  # two more metric refreshes: the aborted request must not be generating any more
    later = metrics(cb_server.metrics_url)
    assert later["GeneratedTokens"] == stats["GeneratedTokens"]
    assert later["KVCacheUsagePercent"] == 0.0 and later["RunningRequests"] == 0
    assert stats["GeneratedTokens"] - before < 3 * 20 + 500
    log = (cb_server.log_dir / "model_log.log").read_text()
    assert "disconnected; aborting it" in log


@pytest.mark.parametrize("body,raw,param,message", [
    ({"prompt": "hi", "temprature": 0.5}, None, "temprature", "unknown sampling parameter"),
    ({"prompt": "hi", "temperature": -1}, None, "temperature", "temperature must be non-negative"),
    ({"prompt": "hi", "max_tokens": "many"}, None, "max_tokens", "max_tokens must be an integer"),
    ({"max_tokens": 5}, None, "prompt", "exactly one of prompt"),
    ({"prompt_token_ids": [42] * 1100}, None, "prompt", "max_model_len"),
    ({"prompt_token_ids": [5, 99999]}, None, "prompt_token_ids", "out of range"),
    (None, "{not json", None, "not valid JSON"),
    # What a hostile soak sent: each used to be a 500, a 200 with an error body, or a 400 without the field.
    (None, '{"prompt": "hi", "n": ' + "9" * 5000 + "}", "n", "n must be an integer, got <a 5000-digit integer>"),
    (None, "[" * 100000 + "]" * 100000, None, "nested too deeply"),
    (None, '{"prompt": "hi", "stop": ' + "[" * 20000 + "]" * 20000 + "}", None, "nested too deeply"),
    (None, '"just a string"', None, "must be a JSON object"),
    ({"prompt": "hi", "n": 200000}, None, "n", "exceeds max_num_seqs"),
    ({"prompt": "hi", "n": 1, "best_of": 200000, "temperature": 1.0}, None, "best_of", "exceeds max_num_seqs"),
    ({"prompt": "hi", "max_tokens": 10**12}, None, "max_tokens", "is too large: 1000000000000"),
    ({"prompt": "hi", "allowed_token_ids": [5000, 6000]}, None, "allowed_token_ids", "out-of-vocab"),
    ({"prompt": "hi", "logit_bias": {"70000": 5}}, None, "logit_bias", "out-of-vocab"),
    ({"prompt": "x" * (3 << 20)}, None, "prompt", "max_prompt_chars"),
])
def test_bad_request_gets_a_4xx_naming_the_field_while_good_streams_finish(cb_server, body, raw, param, message):
    good = [None] * 2

    def run(i):
        good[i] = ndjson_text(list(stream(cb_server.inference_port, "/predictions/tiny",
                                          {"prompt": f"good {i}", "max_tokens": 30, "temperature": 0,
                                           "ignore_eos": True, "stream": True})))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    status, ctype, text = post(cb_server.inference_port, "/predictions/tiny", body, raw=raw)
    for t in threads:
        t.join(120)
    assert status == 400 and ctype.startswith("application/json")
    error = json.loads(text)["error"]
    assert error["param"] == param and message in error["message"]
    assert "Traceback" not in text
    assert all(g[2]["finish_reason"] == "length" and len(g[1]) == 30 for g in good)


def test_a_form_body_from_curl_without_content_type_says_what_to_send(cb_server):
    status, ctype, text = post(cb_server.inference_port, "/predictions/tiny", {"prompt": "hi", "max_tokens": 4},
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and ctype.startswith("application/json")
    assert "Content-Type: application/json" in json.loads(text)["error"]["message"]


def test_non_streaming_answers_are_whole_responses_not_chunked_streams(cb_server):
    """A non-streaming request is answered once, complete (so a failure can still get its
    status), while streams beside it keep flowing."""
    import http.client

    streamed = []
    runner = threading.Thread(target=lambda: streamed.extend(stream(
        cb_server.inference_port, "/predictions/tiny",
        {"prompt": "beside", "max_tokens": 40, "ignore_eos": True, "stream": True})))
    runner.start()
    conn = http.client.HTTPConnection("127.0.0.1", cb_server.inference_port, timeout=120)
    try:
        for path in ("/predictions/tiny", "/predictions/tiny/1.0/v1/completions"):
            conn.request("POST", path, body=json.dumps({"prompt": "whole", "max_tokens": 20, "ignore_eos": True}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("application/json")
            assert resp.getheader("Transfer-Encoding") is None and int(resp.getheader("Content-Length")) == len(body)
            doc = json.loads(body)
            assert len(doc["token_ids"]) == 20 if "token_ids" in doc else doc["usage"]["completion_tokens"] == 20
    finally:
        conn.close()
        runner.join(120)
    assert sum(len(json.loads(line)["token_ids"]) for line in streamed if line.strip()) == 40


def test_unknown_route_is_a_404(cb_server):
    status, _, text = post(cb_server.inference_port, "/predictions/tiny/1.0/v1/embeddings", {"input": "x"})
    assert status == 404 and "unknown route" in json.loads(text)["error"]["message"]


def test_non_streaming_native_answer_is_one_json_document(cb_server, make_engine, model_dir):
    status, ctype, text = post(cb_server.inference_port, "/predictions/tiny",
                               {"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0, "n": 2, "ignore_eos": True})
    assert status == 200 and ctype.startswith("application/json")
    doc = json.loads(text)
    assert (doc["text"], doc["token_ids"]) == offline(make_engine, model_dir, [PROMPTS[3]], [12])[0]
    assert [o["index"] for o in doc["outputs"]] == [0, 1]
    assert doc["usage"] == {"prompt_tokens": doc["usage"]["prompt_tokens"], "completion_tokens": 24,
                            "total_tokens": doc["usage"]["prompt_tokens"] + 24}


def test_openai_completions_and_chat_over_plain_http(cb_server, make_engine, model_dir):
    base = "/predictions/tiny/1.0/v1"
    expected_text = offline(make_engine, model_dir, [PROMPTS[5]], [10])[0][0]
    status, _, text = post(cb_server.inference_port, f"{base}/completions",
                           {"model": "tiny", "prompt": PROMPTS[5], "max_tokens": 10, "temperature": 0,
                            "ignore_eos": True})
    body = json.loads(text)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text and body["usage"]["completion_tokens"] == 10

    lines = list(stream(cb_server.inference_port, f"{base}/completions",
                        {"model": "tiny", "prompt": PROMPTS[5], "max_tokens": 10, "temperature": 0, "stream": True,
                         "ignore_eos": True, "stream_options": {"include_usage": True}}))
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected_text
    assert chunks[-1]["usage"]["completion_tokens"] == 10 and chunks[-2]["choices"][0]["finish_reason"] == "length"

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    status, _, text = post(cb_server.inference_port, f"{base}/chat/completions",
                           {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0,
                            "ignore_eos": True})
    chat = json.loads(text)
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    lines = list(stream(cb_server.inference_port, f"{base}/chat/completions",
                        {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
                         "ignore_eos": True}))
    events = sse_events(lines)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == chat["choices"][0]["message"]["content"]

    status, _, text = post(cb_server.inference_port, f"{base}/chat/completions",
                           {"model": "tiny", "messages": [{"role": "user"}], "max_tokens": 8})
    assert status == 400 and json.loads(text)["error"]["param"] == "messages[0].content"


def test_openai_client_library(cb_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cb_server.inference_url}/predictions/tiny/1.0/v1", api_key="unused")
    extra = {"ignore_eos": True}  # vLLM's sampling extras travel in extra_body, as with vLLM's server
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0,
                                     extra_body=extra)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 7
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="Once upon a time",
                                                                  max_tokens=7, temperature=0, stream=True,
                                                                  extra_body=extra)]
    assert "".join(pieces) == done.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          extra_body=extra)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True)
        if c.choices]
    assert len(deltas) >= 1
    scored = client.completions.create(model="tiny", prompt="Once", max_tokens=3, temperature=0, logprobs=2)
    assert len(scored.choices[0].logprobs.token_logprobs) == 3
    chat_scored = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                                 frequency_penalty=0.5, extra_body=extra)
    content = chat_scored.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=-3)
    assert "temperature" in str(err.value)


def test_metrics_endpoint_shows_the_engine_metrics(cb_server):
    post(cb_server.inference_port, "/predictions/tiny", {"prompt": "metrics please", "max_tokens": 5})
    names = ["KVCacheUsagePercent", "RunningRequests", "WaitingRequests", "Preemptions", "RunningSequences",
             "WaitingSequences", "SwappedSequences", "FreeHostKVBlocks", "SwapOuts", "FreeKVBlocks",
             "PrefixCacheHitRatePercent", "GeneratedTokens", "PromptTokens", "EngineMaxBatchSize",
             "TimeToFirstTokenSeconds_count", "TimePerOutputTokenSeconds_count"]
    stats = wait_for_metrics(cb_server.metrics_url, lambda s: all(n in s for n in names))
    assert stats["GeneratedTokens"] >= 5 and stats["TimeToFirstTokenSeconds_count"] >= 1


def test_archive_registered_through_the_management_api_answers_like_the_started_one(cb_server, model_dir):
    build_archive(model_dir("llama"), "tiny2", cb_server.model_store)
    import urllib.request

    req = urllib.request.Request(f"{cb_server.management_url}/models?url=tiny2.mar&model_name=tiny2"
                                 "&initial_workers=1&synchronous=true", method="POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        assert resp.status == 200
    try:
        body = {"prompt": PROMPTS[7], "max_tokens": 15, "temperature": 0, "ignore_eos": True}
        a = json.loads(post(cb_server.inference_port, "/predictions/tiny", body)[2])
        b = json.loads(post(cb_server.inference_port, "/predictions/tiny2", body)[2])
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{cb_server.management_url}/models/tiny2", method="DELETE"),
                               timeout=120)


def test_async_mode_streams_with_token_authorization(async_server, make_engine, model_dir):
    status, _, text = post(async_server.inference_port, "/predictions/tiny", {"prompt": "x", "max_tokens": 2})
    assert status == 400 and "Token Authorization failed" in text, text  # on by default; TorchServe says 400
    headers = async_server.headers("inference")
    results = concurrent_streams(async_server.inference_port, PROMPTS[:8], MAX_TOKENS[:8], headers)
    assert [(t, ids) for t, ids, _ in results] == offline(make_engine, model_dir, PROMPTS[:8], MAX_TOKENS[:8])
    status, _, text = post(async_server.inference_port, "/predictions/tiny", {"prompt": "x", "top_p": 7}, headers=headers)
    assert status == 400 and json.loads(text)["error"]["param"] == "top_p"
    lines = list(stream(async_server.inference_port, "/predictions/tiny/1.0/v1/completions",
                        {"prompt": "hi", "max_tokens": 4, "stream": True}, headers))
    assert sse_events(lines)[-1] == "[DONE]"


def test_serve_command_archives_starts_answers_and_stops_on_ctrl_c(model_dir, tmp_path):
    import signal

    from pagedbackend.adapters.ports import free_port

    ports = [free_port() for _ in range(3)]
    proc, text = start_serve_command("torchserve", "--model", str(model_dir("llama")), "--name", "tiny",
                                     "--workdir", str(tmp_path / "ts"), "--port", str(ports[0]),
                                     "--management-port", str(ports[1]), "--metrics-port", str(ports[2]))
    try:
        assert "is ready" in text and f"127.0.0.1:{ports[0]}/predictions/tiny" in text, text
        assert f"keys in {tmp_path / 'ts' / 'key_file.json'}" in text  # token authorization stays on
        key = json.loads((tmp_path / "ts" / "key_file.json").read_text())["inference"]["key"]
        status, _, body = post(ports[0], "/predictions/tiny", {"prompt": "hi", "max_tokens": 3},
                               headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
        assert not list((tmp_path / "ts" / "model_store").glob("*.mar"))[0].stat().st_size > 100_000  # weights not copied
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopping TorchServe" in rest
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/ping", timeout=5)


def test_example_client_runs_against_the_server(cb_server):
    import subprocess
    import sys
    from pathlib import Path

    client = Path(__file__).resolve().parents[1] / "examples" / "torchserve" / "client.py"
    done = subprocess.run([sys.executable, str(client), "--url", cb_server.inference_url, "--model", "tiny"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "finish_reason=" in done.stdout and "== the openai client" in done.stdout
