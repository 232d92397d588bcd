"""The PyTriton binding against a real Triton server (PyTriton 0.7), on free 127.0.0.1 ports,
with strict output checking, always stopped."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pytriton")
import tritonclient.grpc as grpcclient  # noqa: E402

from pagedbackend import EngineArgs, SamplingParams  # noqa: E402
from pagedbackend.adapters.pytriton import PyTritonServer  # noqa: E402
from http_client import post, start_serve_command, stream  # noqa: E402

PROMPTS = [" ".join(["word"] * k) + f" number {k}" for k in range(1, 17)]
MAX_TOKENS = [6 + 3 * k for k in range(16)]


@pytest.fixture(scope="module")
def server(model_dir):
    with PyTritonServer(EngineArgs(model=str(model_dir("llama")), max_num_seqs=32), model_name="llm") as srv:
        yield srv
        srv.engine.engine  # the fixture below checks blocks after each test


@pytest.fixture
def idle_after(server):
    """After the test, the engine must have nothing running and every block free."""
    yield
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = server.engine.get_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["num_free_blocks"] == stats["num_kv_blocks"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after the test: {server.engine.get_stats()}")


def offline(make_engine, model_dir, prompts, params):
    llm = make_engine(model_dir("llama"), "llm")
    return [(o.outputs[0].text, o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def grpc_inputs(prompt: str, sampling: dict | None = None, stream: bool = True, **flags) -> list:
    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [tensor("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
              tensor("stream", np.array([stream]), "BOOL")]
    if sampling is not None:
        inputs.append(tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES"))
    for name, value in flags.items():
        inputs.append(tensor(name, np.array([value]), "BOOL"))
    return inputs


def grpc_stream_many(url: str, requests: list[tuple[str, dict]], timeout: float = 120) -> dict[str, dict]:
    """Send every request on one gRPC stream (multiplexed, like a real client); collect each
    request's concatenated text, token ids and final finish_reason, or its error."""
    results: dict[str, dict] = {str(i): {"text": "", "ids": [], "finish": None, "error": None} for i in range(len(requests))}
    done: queue.Queue = queue.Queue()

    def callback(result, error):
        if error is not None:
            rid = getattr(error, "request_id", None)
            done.put(("error", str(error)))
            return
        response = result.get_response()
        rid = response.id
        final = response.parameters["triton_final_response"].bool_param
        text = result.as_numpy("text_output")
        if text is not None:
            results[rid]["text"] += b"".join(text).decode()
            results[rid]["ids"] += result.as_numpy("token_ids").tolist()
        reason = result.as_numpy("finish_reason")
        if reason is not None:
            results[rid]["finish"] = reason[0].decode()
        if final:
            done.put(("final", rid))

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    try:
        for i, (prompt, sampling) in enumerate(requests):
            client.async_stream_infer("llm", grpc_inputs(prompt, sampling), request_id=str(i),
                                      enable_empty_final_response=True)
        finished = 0
        while finished < len(requests):
            kind, value = done.get(timeout=timeout)
            if kind == "error":
                raise AssertionError(value)
            finished += 1
    finally:
        client.stop_stream()
        client.close()
    return results


def sse_stream(url: str, body: dict, stop_after: int | None = None, timeout: float = 120) -> list[dict]:
    """The events of a generate_stream call; with `stop_after`, the client goes away after that many."""
    events = []
    port = int(url.rsplit(":", 1)[1])
    with contextlib.closing(stream(port, "/v2/models/llm/generate_stream", body, timeout=timeout)) as lines:
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


def test_16_concurrent_grpc_streams_equal_offline_generation_and_are_batched(server, make_engine, model_dir, idle_after):
    sampling = [{"max_tokens": m, "temperature": 0, "ignore_eos": True} for m in MAX_TOKENS]
    results = grpc_stream_many(server.grpc_url, list(zip(PROMPTS, sampling)))
    expected = offline(make_engine, model_dir, PROMPTS, [SamplingParams(**s) for s in sampling])
    assert [(results[str(i)]["text"], results[str(i)]["ids"]) for i in range(16)] == expected
    assert all(r["finish"] == "length" for r in results.values())
    assert server.engine.get_stats()["max_batch_seqs"] > 1


def test_16_concurrent_sse_streams_equal_offline_generation(server, make_engine, model_dir, idle_after):
    out: list = [None] * 16

    def run(i):
        events = sse_stream(server.http_url, {"text_input": PROMPTS[i], "stream": True, "exclude_input_in_output": True,
                                              "sampling_parameters": json.dumps({"max_tokens": MAX_TOKENS[i],
                                                                                 "temperature": 0, "ignore_eos": True})})
        ids = []
        for e in events:
            ids += e["token_ids"] if isinstance(e["token_ids"], list) else [e["token_ids"]]
        assert "finish_reason" in events[-1], events[-3:]
        out[i] = ("".join(e["text_output"] for e in events), ids, events[-1]["finish_reason"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    expected = offline(make_engine, model_dir, PROMPTS,
                       [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS])
    assert [(text, ids) for text, ids, _ in out] == expected
    assert all(reason == "length" for _, _, reason in out)


def test_seeded_sampling_parameters_give_the_offline_tokens(server, make_engine, model_dir, idle_after):
    sampling = {"seed": 1234, "temperature": 0.8, "top_p": 0.9, "max_tokens": 20, "ignore_eos": True}
    results = grpc_stream_many(server.grpc_url, [(PROMPTS[4], sampling), (PROMPTS[9], {"max_tokens": 30})])
    expected = offline(make_engine, model_dir, [PROMPTS[4]], [SamplingParams(**sampling)])[0]
    assert (results["0"]["text"], results["0"]["ids"]) == expected


@pytest.mark.parametrize("how", ["grpc", "sse"])
def test_client_cancel_aborts_the_request_and_frees_its_blocks(server, how, idle_after):
    before = server.engine.get_stats()["generation_tokens"]
    others: list = [None] * 3

    def other(i):
        others[i] = sse_stream(server.http_url, {"text_input": f"other {i}", "stream": True,
                                                 "exclude_input_in_output": True,
                                                 "sampling_parameters": json.dumps({"max_tokens": 20, "ignore_eos": True})})

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    long_sampling = {"max_tokens": 900, "ignore_eos": True}
    if how == "grpc":
        got: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("llm", grpc_inputs("tell me everything", long_sampling), request_id="long")
        for _ in range(3):
            result, error = got.get(timeout=60)
            assert error is None
        for t in threads:
            t.start()
        client.stop_stream(cancel_requests=True)  # the client cancels its stream
        client.close()
    else:
        for t in threads:
            t.start()
        events = sse_stream(server.http_url, {"text_input": "tell me everything", "stream": True,
                                              "exclude_input_in_output": True,
                                              "sampling_parameters": json.dumps(long_sampling)}, stop_after=3)
        assert len(events) == 3
    for t in threads:
        t.join(120)
    assert all(o is not None and o[-1]["finish_reason"] == "length" for o in others)
    deadline = time.monotonic() + 20
    while server.engine.get_stats()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    generated = server.engine.get_stats()["generation_tokens"] - before
    assert generated < 3 * 20 + 450  # the long request stopped far short of its 900 tokens


@pytest.mark.parametrize("sampling_parameters,message", [
    ("{not json", "sampling_parameters is not valid JSON"),
    (json.dumps({"temprature": 0.5}), "unknown sampling parameter(s): temprature"),
    (json.dumps({"top_p": 3}), "top_p must be in (0, 1]"),
    (json.dumps({"max_tokens": "lots"}), "max_tokens must be a number"),
    (json.dumps(["a list"]), "sampling_parameters must be a JSON object"),
])
def test_invalid_sampling_parameters_get_a_clean_error_while_others_finish(server, sampling_parameters, message,
                                                                          idle_after):
    good: list = [None] * 2

    def run(i):
        good[i] = sse_stream(server.http_url, {"text_input": f"good {i}", "stream": True, "exclude_input_in_output": True,
                                               "sampling_parameters": json.dumps({"max_tokens": 25, "ignore_eos": True})})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    inputs = grpc_inputs("hello")
    sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(np.array([sampling_parameters.encode()], dtype=np.object_))
    client.async_stream_infer("llm", inputs + [sp])
    _, error = got.get(timeout=60)
    client.stop_stream()
    client.close()
    for t in threads:
        t.join(120)
    text = str(error)
    assert message in text
    assert "Traceback" not in text and ".py" not in text
    assert all(g[-1]["finish_reason"] == "length" and sum(e["num_output_tokens"] for e in g) == 25 for g in good)


def grpc_error(url: str, prompt: str = "hello", sampling_parameters: str | None = None,
               parameters: dict | None = None, timeout: float = 60) -> str:
    """Send one streaming request; return the error it gets (fail when it gets none)."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        inputs = grpc_inputs(prompt)
        if sampling_parameters is not None:
            sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
            sp.set_data_from_numpy(np.array([sampling_parameters.encode()], dtype=np.object_))
            inputs.append(sp)
        client.async_stream_infer("llm", inputs, parameters=parameters)
        _, error = got.get(timeout=timeout)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None, "the request was accepted"
    return str(error)


def assert_clean_one_line(text: str, message: str) -> None:
    assert message in text, text[:2000]
    assert "Traceback" not in text and ".py" not in text and 'File "' not in text, text[:2000]
    assert "site-packages" not in text and "pagedbackend/" not in text, text[:2000]
    assert "\n" not in text.strip() and len(text) < 600, text[:2000]


HUGE = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("sampling_parameters,message", [
    ('{"n": %s}' % HUGE, "n must be an integer"),
    ('{"max_tokens": %s, "ignore_eos": true}' % HUGE, "max_tokens must be an integer"),
    ('{"temperature": -%s}' % HUGE, "temperature must be a number"),
    (DEEP, "sampling_parameters is nested too deeply"),
    ('{"stop": %s}' % DEEP, "sampling_parameters is nested too deeply"),
    ('{"stop_token_ids": [%s]}' % HUGE, "stop_token_ids must be a list of integers"),
    (json.dumps({"stop": ["x" * 100_000, 5]}), "stop must be a string or a list of strings"),
])
def test_hostile_sampling_parameters_get_a_clean_one_line_error(server, sampling_parameters, message, idle_after):
    assert_clean_one_line(grpc_error(server.grpc_url, sampling_parameters=sampling_parameters), message)
    # The server keeps serving.
    events = sse_stream(server.http_url, {"text_input": "still there?", "stream": True, "exclude_input_in_output": True,
                                          "sampling_parameters": json.dumps({"max_tokens": 5, "ignore_eos": True})})
    assert sum(e["num_output_tokens"] for e in events) == 5 and events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("field,value,message,http", [
    ("max_tokens", HUGE, "max_tokens must be a number", False),  # over HTTP a typed input: Triton parses it
    ("seed", "-" + HUGE, "seed must be a number", False),
    ("temperature", "warm" * 20_000, "temperature must be a number", False),
    ("stop_token_ids", DEEP, "stop_token_ids is nested too deeply", True),
    ("stop_token_ids", "[%s]" % HUGE, "stop_token_ids must be a list of integers", True),
    ("best_of", HUGE, "best_of must be an integer", True),
    ("presence_penalty", "x" * 50_000, "presence_penalty must be a number", True),
])
def test_hostile_request_parameters_get_a_clean_one_line_error(server, field, value, message, http, idle_after):
    assert_clean_one_line(grpc_error(server.grpc_url, parameters={field: value}), message)
    if http:  # the HTTP generate endpoint turns extra JSON fields into request parameters
        status, _, text = post(server.http_port, "/v2/models/llm/generate", {"text_input": "hi", field: value},
                               timeout=60)
        assert status == 400, (status, text[:500])
        assert_clean_one_line(json.loads(text)["error"], message)


def test_a_too_long_prompt_gets_a_clean_error_naming_text_input(server, idle_after):
    assert_clean_one_line(grpc_error(server.grpc_url, prompt="word " * 200_000), "text_input")


def test_a_client_cannot_send_the_proxys_cancel_command(server, idle_after):
    """`pagedbackend_cancel` is how the proxy reports a client's cancellation: a client sending
    it (with the id of someone else's running request) must not abort that request."""
    got: queue.Queue = queue.Queue()
    victim = grpcclient.InferenceServerClient(server.grpc_url)
    victim.start_stream(callback=lambda result, error: got.put((result, error)))
    victim.async_stream_infer("llm", grpc_inputs("the victim's story", {"max_tokens": 150, "ignore_eos": True}),
                              request_id="victim", enable_empty_final_response=True)
    try:
        result, error = got.get(timeout=60)
        assert error is None
        running = list(server.engine._streams)  # the engine's ids of running requests (the proxy's keys)
        assert len(running) == 1
        target = running[0]
        # Forged as request parameters, over HTTP and gRPC, with and without a guessed marker.
        for extra in ({"pagedbackend_cancel": target}, {"pagedbackend_cancel": target, "pagedbackend_control": "x"},
                      {"pagedbackend_request_key": target}):
            status, _, text = post(server.http_port, "/v2/models/llm/generate",
                                   {"text_input": "attacker", "max_tokens": 2, **extra}, timeout=60)
            assert status == 400 and "reserved" in json.loads(text)["error"], (status, text)
            assert_clean_one_line(json.loads(text)["error"], "reserved")
            assert "reserved" in grpc_error(server.grpc_url, "attacker", parameters=extra)
        ids, finish = [], None
        ids += result.as_numpy("token_ids").tolist()
        while True:
            result, error = got.get(timeout=60)
            assert error is None, error
            if result.as_numpy("token_ids") is not None:
                ids += result.as_numpy("token_ids").tolist()
            reason = result.as_numpy("finish_reason")
            if reason is not None:
                finish = reason[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        victim.stop_stream()
        victim.close()
    assert finish == "length" and len(ids) == 150  # the victim's request ran to the end


def test_http_generate_returns_one_answer_with_the_prompt_unless_excluded(server, make_engine, model_dir, idle_after):
    def generate(body):
        status, _, text = post(server.http_port, "/v2/models/llm/generate", body, timeout=60)
        return status, json.loads(text)

    expected_text = offline(make_engine, model_dir, [PROMPTS[2]],
                            [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)])[0][0]
    # Typed inputs (max_tokens, temperature, ignore_eos) instead of sampling_parameters.
    status, data = generate({"text_input": PROMPTS[2], "max_tokens": 9, "temperature": 0, "ignore_eos": True})
    assert status == 200 and data["text_output"] == PROMPTS[2] + expected_text
    assert data["finish_reason"] == "length" and data["num_output_tokens"] == 9
    status, data = generate({"text_input": PROMPTS[2], "max_tokens": 9, "temperature": 0, "ignore_eos": True,
                             "exclude_input_in_output": True})
    assert status == 200 and data["text_output"] == expected_text
    status, data = generate({"text_input": PROMPTS[2], "stream": True, "exclude_input_in_output": False})
    assert status == 400 and "exclude_input_in_output must be true" in data["error"]


def test_pytriton_decoupled_client_with_typed_inputs(server, idle_after):
    from pytriton.client import DecoupledModelClient

    with DecoupledModelClient(f"grpc://{server.grpc_url}", "llm") as client:
        chunks = list(client.infer_sample(text_input=np.array([b"Once upon a time"]), stream=np.array([True]),
                                          exclude_input_in_output=np.array([True]),
                                          max_tokens=np.array([7], dtype=np.int32),
                                          ignore_eos=np.array([True])))
    assert sum(int(c["num_output_tokens"][0]) for c in chunks) == 7
    assert chunks[-1]["finish_reason"][0] == b"length"
    with DecoupledModelClient(f"grpc://{server.grpc_url}", "llm") as client:
        scored = list(client.infer_sample(text_input=np.array([b"Once upon a time"]), stream=np.array([True]),
                                          exclude_input_in_output=np.array([True]),
                                          return_cumulative_logprob=np.array([True]),
                                          max_tokens=np.array([5], dtype=np.int32),
                                          temperature=np.array([0.0], dtype=np.float32),
                                          ignore_eos=np.array([True])))
    cumulative = [float(c["cumulative_logprob"][0]) for c in scored]
    assert all(b < a < 0 for a, b in zip(cumulative, cumulative[1:]))  # each token adds a negative logprob


def test_engine_metrics_endpoint_in_prometheus_format(server, idle_after):
    import urllib.request

    grpc_stream_many(server.grpc_url, [("metrics please", {"max_tokens": 5})])
    text = urllib.request.urlopen(server.metrics.url, timeout=10).read().decode()
    for name in ("pagedbackend_kv_cache_usage_ratio", "pagedbackend_num_requests_running",
                 "pagedbackend_num_requests_waiting", "pagedbackend_preemptions_total",
                 "pagedbackend_prefix_cache_hit_rate", "pagedbackend_generation_tokens_total",
                 "pagedbackend_time_to_first_token_seconds_bucket", "pagedbackend_time_per_output_token_seconds_count"):
        assert f'{name}{{model="llm"' in text, name
    # Triton's vLLM backend's names, labelled with the model and its version, counting the same.
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_sum",
                 "vllm:request_params_n_count"):
        found = re.search(re.escape(name) + r'\{model="llm",version="1"\} ([0-9.e+]+)', text)
        assert found and float(found.group(1)) > 0, name
    ours = re.search(r'pagedbackend_generation_tokens_total\{model="llm",version="1"\} ([0-9.e+]+)', text)
    assert ours.group(1) == re.search(r'vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)', text).group(1)
    # Triton's own metrics endpoint is up beside it.
    assert "nv_inference_request_success" in urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def test_serve_command_starts_answers_and_stops_cleanly_on_sigterm(model_dir):
    import re
    import signal
    import subprocess
    from pathlib import Path

    from pagedbackend.adapters.ports import free_port

    ports = [free_port() for _ in range(4)]
    proc, text = start_serve_command("pytriton", "--model", str(model_dir("llama")), "--name", "llm",
                                     "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                                     "--metrics-port", str(ports[2]), "--engine-metrics-port", str(ports[3]),
                                     stderr=subprocess.DEVNULL)  # Triton's log: nobody reads it after the banner
    try:
        assert f"127.0.0.1:{ports[0]}/v2/models/llm/generate_stream" in text, text
        workspace = Path(re.search(r"workspace\s+(\S+)", text).group(1))
        assert workspace.is_dir()
        events = sse_stream(f"http://127.0.0.1:{ports[0]}", {"text_input": "hi", "stream": True,
                                                             "exclude_input_in_output": True, "max_tokens": 4})
        assert sum(e["num_output_tokens"] for e in events) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopping Triton" in rest
    assert not workspace.exists()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", ports[0], timeout=5).request("GET", "/v2/health/ready")


@pytest.mark.parametrize("script,url", [("client_tritonclient.py", "{grpc}"), ("client_pytriton.py", "grpc://{grpc}")])
def test_example_clients_run_against_the_server(server, script, url, idle_after):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "pytriton" / script
    done = subprocess.run([sys.executable, str(path), "--url", url.format(grpc=server.grpc_url), "--model", "llm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("cancelled" in done.stdout) if script == "client_tritonclient.py" else ("finish_reason=" in done.stdout)


def test_speculative_config_serves_the_tokens_offline_generation_gives_and_exports_spec_metrics(model_dir,
                                                                                                 make_engine):
    """A second server, drafting with its own model: several tokens per step, the same text."""
    import urllib.request

    path = str(model_dir("llama"))
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 3}
    with PyTritonServer(EngineArgs(model=path, max_num_seqs=8, speculative_config=spec), model_name="llm") as srv:
        events = sse_stream(srv.http_url, {"text_input": PROMPTS[3], "stream": True, "exclude_input_in_output": True,
                                           "sampling_parameters": json.dumps({"max_tokens": 17, "temperature": 0,
                                                                              "ignore_eos": True})})
        ids = []
        for e in events:
            ids += e["token_ids"] if isinstance(e["token_ids"], list) else [e["token_ids"]]
        text = "".join(e["text_output"] for e in events)
        metrics = urllib.request.urlopen(srv.metrics.url, timeout=10).read().decode()
        stats = srv.engine.get_stats()
    assert [(text, ids)] == offline(make_engine, model_dir, [PROMPTS[3]],
                                    [SamplingParams(max_tokens=17, temperature=0, ignore_eos=True)])
    assert len(events) < 17  # streamed deltas carried several tokens
    assert stats["spec_decode_acceptance_rate"] == 1.0
    assert 'pagedbackend_spec_decode_num_accepted_tokens_per_pos_total{model="llm",version="1",position="0"}' in metrics


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def test_structured_outputs_in_sampling_parameters_constrain_generate_stream(server, idle_after):
    """As Triton's vLLM backend takes it: `structured_outputs` inside `sampling_parameters`, as an
    object or as its JSON text; every streamed answer is valid."""
    import jsonschema

    constraints = [{"json": PERSON, "disable_any_whitespace": True},
                   json.dumps({"regex": r"[A-Z]{2}-[0-9]{3}"}),
                   {"choice": ["alpha", "beta", "gamma"]}]
    out: list = [None] * 6

    def run(i):
        sampling = {"max_tokens": 80, "temperature": 1.0, "seed": i, "structured_outputs": constraints[i % 3]}
        events = sse_stream(server.http_url, {"text_input": f"answer {i}", "stream": True,
                                              "exclude_input_in_output": True,
                                              "sampling_parameters": json.dumps(sampling)})
        out[i] = ("".join(e["text_output"] for e in events), events[-1]["finish_reason"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (text, reason) in enumerate(out):
        assert reason == "stop", (i, text)
        if i % 3 == 0:
            jsonschema.validate(json.loads(text), PERSON)
        elif i % 3 == 1:
            assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", text)
        else:
            assert text in ("alpha", "beta", "gamma")


def test_structured_outputs_as_a_typed_input_and_bad_constraints_get_a_clean_error(server, idle_after):
    from pytriton.client import DecoupledModelClient

    with DecoupledModelClient(f"grpc://{server.grpc_url}", "llm") as client:
        chunks = list(client.infer_sample(text_input=np.array([b"pick"]), stream=np.array([True]),
                                          exclude_input_in_output=np.array([True]),
                                          max_tokens=np.array([10], dtype=np.int32),
                                          structured_outputs=np.array([json.dumps({"choice": ["yes", "no"]}).encode()])))
    assert b"".join(b"".join(c["text_output"]) for c in chunks).decode() in ("yes", "no")
    assert chunks[-1]["finish_reason"][0] == b"stop"
    for constraint, message in [({"json": {"type": "objekt"}}, "structured_outputs.json: invalid JSON schema"),
                                ({"regex": "a(b"}, "structured_outputs.regex: invalid regex"),
                                ({"jsn": {}}, "unknown structured_outputs field(s): jsn")]:
        text = grpc_error(server.grpc_url, sampling_parameters=json.dumps({"structured_outputs": constraint}))
        assert_clean_one_line(text, message)
    assert grpc_error(server.grpc_url, sampling_parameters=json.dumps({"guided_json": PERSON})).count(
        "guided_json was removed")
    import urllib.request

    text = urllib.request.urlopen(server.metrics.url, timeout=10).read().decode()
    requests = re.search(r'pagedbackend_structured_output_requests_total\{model="llm"[^}]*\} ([0-9.]+)', text)
    assert requests and float(requests.group(1)) >= 1, text[-3000:]
    assert 'pagedbackend_grammar_compile_seconds_count{model="llm"' in text
    assert 'pagedbackend_grammar_cache_hits_total{model="llm"' in text


def test_return_logprobs_gives_the_vllm_backends_logprobs_new_positions_only_when_streaming(server, make_engine,
                                                                                          model_dir, idle_after):
    from pytriton.client import DecoupledModelClient

    sampling = json.dumps({"max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2})
    with DecoupledModelClient(f"grpc://{server.grpc_url}", "llm") as client:
        chunks = list(client.infer_sample(text_input=np.array([b"Once upon a time"]), stream=np.array([True]),
                                          exclude_input_in_output=np.array([True]),
                                          return_logprobs=np.array([True]), return_num_output_tokens=np.array([True]),
                                          sampling_parameters=np.array([sampling.encode()])))
    streamed, ids = [], []
    for c in chunks:
        positions = json.loads(c["logprobs"][0])
        assert len(positions) == int(c["num_output_tokens"][0])  # the new positions only
        streamed += positions
        ids += c["token_ids"].tolist()
    with DecoupledModelClient(f"grpc://{server.grpc_url}", "llm") as client:
        (whole,) = list(client.infer_sample(text_input=np.array([b"Once upon a time"]), stream=np.array([False]),
                                            exclude_input_in_output=np.array([True]),
                                            return_logprobs=np.array([True]),
                                            sampling_parameters=np.array([sampling.encode()])))
    assert json.loads(whole["logprobs"][0]) == streamed
    offline = make_engine(model_dir("llama"), "llm").generate(
        ["Once upon a time"], SamplingParams(**json.loads(sampling)), use_tqdm=False)[0].outputs[0]
    assert ids == offline.token_ids and len(streamed) == 6
    for token, position, expected in zip(ids, streamed, offline.logprobs):
        chosen = position[str(token)]
        assert list(position)[0] == str(token) and len(position) <= 3  # the chosen token, then the top 2
        assert chosen["logprob"] == pytest.approx(expected[token].logprob, abs=1e-5)
        assert chosen["rank"] == expected[token].rank and chosen["decoded_token"] == expected[token].decoded_token
