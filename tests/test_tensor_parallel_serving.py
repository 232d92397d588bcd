"""Tensor parallelism through the adapters, against real servers on 127.0.0.1: TorchServe with
`parallelLevel: 2` (one worker; the handler's engine starts its rank) and with `parallelType: tp`
(TorchServe's torchrun starts both ranks, each loads the handler, rank 0 answers), and
`pagedbackend serve pytriton --tensor-parallel-size 2`. Eight concurrent OpenAI-route (or
generate_stream) streams must equal offline greedy generation; no rank outlives its server."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from http_client import sse_events, start_serve_command, stream
from pagedbackend import SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = [" ".join(["word"] * k) + f" number {k}" for k in range(1, 9)]
MAX_TOKENS = [5 + 2 * k for k in range(8)]


def _offline(make_engine, model_dir):
    llm = make_engine(model_dir("llama"), "llm")
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS],
                        use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _concurrently(fn) -> list:
    results: list = [None] * len(PROMPTS)

    def run(i):
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    return results


def _rank_processes() -> list[int]:
    """Live processes that are ranks an engine spawned (`mp`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")), "")
        except OSError:
            continue
        if "Z (zombie)" in state:
            continue
        if "pagedbackend.executor.multiproc" in cmd:
            pids.append(int(proc.name))
    return pids


def _torchserve_completions(port: int) -> list[str]:
    def one(i):
        lines = list(stream(port, "/predictions/tiny/1.0/v1/completions",
                            {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i], "temperature": 0,
                             "ignore_eos": True, "stream": True}, timeout=240))
        events = sse_events(lines)
        assert events[-1] == "[DONE]"
        return "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c["choices"])

    return _concurrently(one)


@pytest.mark.parametrize("parallel_type", ["custom", "tp"])
def test_torchserve_tensor_parallel_streams_equal_offline_greedy(parallel_type, model_dir, make_engine, tmp_path):
    from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive

    store = tmp_path / "store"
    build_archive(model_dir("llama"), "tiny", store, tensor_parallel_size=2, parallel_type=parallel_type)
    expected = _offline(make_engine, model_dir)
    before = set(_rank_processes())
    with TorchServe(store, {"tiny": "tiny.mar"}, tmp_path / "ts", token_auth=False) as server:
        assert _torchserve_completions(server.inference_port) == expected
        log = "".join(p.read_text(errors="replace") for p in server.log_dir.glob("*.log"))
        if parallel_type == "custom":
            assert len(set(_rank_processes()) - before) == 1  # the engine's spawned rank 1
            assert "tensor parallel: 2 ranks (mp)" in log
        else:
            assert "follows rank 0" in log  # rank 1's handler, started by TorchServe's torchrun
    deadline = time.monotonic() + 15
    while set(_rank_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_rank_processes()) - before


def test_archive_writes_the_parallel_settings(model_dir, tmp_path):
    import yaml

    from pagedbackend.adapters.torchserve.launcher import build_archive

    for kind, expected in (("custom", {"parallelLevel": 2}),
                           ("tp", {"parallelType": "tp", "torchrun": {"nproc-per-node": 2}})):
        out = build_archive(model_dir("llama"), f"m{kind}", tmp_path, no_archive=True, tensor_parallel_size=2,
                            parallel_type=kind, model_path=model_dir("llama"))
        cfg = yaml.safe_load(next(out.glob("*.yaml")).read_text())  # the config the archive carries
        assert cfg["handler"]["tensor_parallel_size"] == 2
        assert {k: cfg[k] for k in expected} == expected
        assert kind == "tp" or "parallelType" not in cfg


@pytest.mark.parametrize("config,message", [
    ({"continuousBatching": True, "parallelLevel": 2, "handler": {"tensor_parallel_size": 4}},
     "tensor_parallel_size: 4 does not match parallelLevel: 2"),
    ({"continuousBatching": True, "handler": {"tensor_parallel_size": 2}}, "needs parallelLevel: 2"),
    ({"continuousBatching": True, "parallelType": "pp", "torchrun": {"nproc-per-node": 2}}, "pipeline parallelism"),
])
def test_parallel_settings_that_disagree_are_refused_at_archive_time(config, message, model_dir, tmp_path):
    from pagedbackend.adapters.torchserve.launcher import build_archive

    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        build_archive(model_dir("llama"), "bad", tmp_path / "store", path)


def test_the_custom_spelling_is_archived_as_the_one_torchserve_starts_and_refused_at_load(model_dir, tmp_path):
    """`parallelType: custom` + `parallelLevel: 2` (upstream's spelling) cannot start on
    TorchServe 0.12: `pagedbackend archive` writes the working form; a config that reaches the
    handler as it is (made with torch-model-archiver directly) fails its load, saying why."""
    import yaml

    from pagedbackend.adapters.torchserve.config import validate_model_config
    from pagedbackend.adapters.torchserve.launcher import build_archive

    config = {"continuousBatching": True, "parallelType": "custom", "parallelLevel": 2}
    with pytest.raises(ValueError, match="cannot start on TorchServe 0.12"):
        validate_model_config(config)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config))
    out = build_archive(model_dir("llama"), "tp", tmp_path / "store", path, no_archive=True)
    archived = yaml.safe_load(next(out.glob("*.yaml")).read_text())
    assert archived["parallelLevel"] == 2 and "parallelType" not in archived
    assert archived["handler"]["tensor_parallel_size"] == 2


def test_pytriton_serve_with_tensor_parallel_size_2(model_dir, make_engine):
    from pagedbackend.adapters.ports import free_port

    ports = [free_port() for _ in range(4)]
    expected = _offline(make_engine, model_dir)
    before = set(_rank_processes())
    proc, text = start_serve_command("pytriton", "--model", str(model_dir("llama")), "--name", "llm",
                                     "--tensor-parallel-size", "2",
                                     "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                                     "--metrics-port", str(ports[2]), "--engine-metrics-port", str(ports[3]),
                                     stderr=subprocess.DEVNULL)
    try:
        assert "Ctrl-C to stop" in text, text
        assert len(set(_rank_processes()) - before) == 1

        def one(i):
            lines = list(stream(ports[0], "/v2/models/llm/generate_stream",
                                {"text_input": PROMPTS[i], "stream": True, "exclude_input_in_output": True,
                                 "max_tokens": MAX_TOKENS[i], "temperature": 0, "ignore_eos": True}, timeout=240))
            return "".join(json.loads(e)["text_output"] for e in sse_events(lines))

        assert _concurrently(one) == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert not set(_rank_processes()) - before
