"""TorchServe model-config.yaml files as TorchServe's own vLLM examples write them
(examples/large_models/vllm: `handler: {model_path, vllm_engine_config: {...}, chat_template}`
with `deviceType`, `asyncCommunication`, `parallelType: custom` + `parallelLevel` at the top)
archive and serve unchanged; each `vllm_engine_config` key is mapped to the engine argument of
the same (vLLM) name, and a key that cannot be honoured fails the archive and the load, named
(upstream ignores unknown keys silently)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from pagedbackend.adapters.torchserve.config import flatten_handler, validate_model_config
from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive
from http_client import post


def upstream_config(model_path: str, *, parallel_level: int = 1, mode: str = "asyncCommunication", **engine) -> dict:
    """The shape of examples/large_models/vllm/llama3/model-config.yaml (and its TP=4 sibling),
    written from its keys: frontend parameters on top, vLLM's engine arguments nested."""
    cfg = {"minWorkers": 1, "maxWorkers": 1, "maxBatchDelay": 100, "startupTimeout": 1200, "deviceType": "gpu",
           mode: True,
           "handler": {"model_path": model_path,
                       "vllm_engine_config": {"max_num_seqs": 16, "max_model_len": 250,
                                              "served_model_name": ["tiny-llama", "llama"], **engine}}}
    if mode == "continuousBatching":
        cfg["batchSize"] = 16
    if parallel_level > 1:
        cfg.update(parallelType="custom", parallelLevel=parallel_level)
        cfg["handler"]["vllm_engine_config"]["tensor_parallel_size"] = parallel_level
    return cfg


def test_vllm_engine_config_keys_map_to_the_engine_arguments_of_the_same_name(model_dir):
    cfg = upstream_config(str(model_dir("llama")), enforce_eager=True, block_size=32, seed=3)
    validate_model_config(cfg)
    flat = flatten_handler(cfg["handler"])
    assert flat == {"model_path": str(model_dir("llama")), "max_num_seqs": 16, "max_model_len": 250,
                    "served_model_name": "tiny-llama", "enforce_eager": True, "block_size": 32, "seed": 3}


@pytest.mark.parametrize("engine,message", [
    ({"gpu_memory_utilization": 1.5}, "kv_cache_memory_fraction must be in"),
    ({"enable_lora": True}, "vllm_engine_config.enable_lora: LoRA adapters are not supported yet"),
    ({"swap_space_gb": 4}, r"vllm_engine_config.swap_space_gb is not supported \(vLLM would ignore it silently"),
    ({"disable_log_requests": False}, "vllm_engine_config.disable_log_requests: only True is supported"),
    ({"block_size": 12}, "block_size must be one of"),
])
def test_a_vllm_engine_config_key_that_cannot_be_honoured_fails_the_archive_naming_it(engine, message, model_dir,
                                                                                     tmp_path):
    cfg_file = tmp_path / "model-config.yaml"
    cfg_file.write_text(yaml.safe_dump(upstream_config(str(model_dir("llama")), **engine)))
    with pytest.raises(ValueError, match=message):
        build_archive(model_dir("llama"), "tiny", tmp_path / "store", cfg_file)
    assert not (tmp_path / "store" / "tiny.mar").exists()


def test_a_key_given_flat_and_nested_and_lora_adapters_are_refused(model_dir):
    cfg = upstream_config(str(model_dir("llama")))
    cfg["handler"]["max_num_seqs"] = 8
    with pytest.raises(ValueError, match="vllm_engine_config.max_num_seqs is also set in handler"):
        validate_model_config(cfg)
    cfg = upstream_config(str(model_dir("llama")))
    cfg["handler"]["adapters"] = {"adapter_1": "adapters/sql"}
    with pytest.raises(ValueError, match="handler.adapters: LoRA adapters are not supported yet"):
        validate_model_config(cfg)


def test_upstreams_tensor_parallel_spelling_is_archived_as_the_one_torchserve_0_12_starts(model_dir, tmp_path):
    cfg_file = tmp_path / "model-config.yaml"
    cfg_file.write_text(yaml.safe_dump(upstream_config(str(model_dir("llama")), parallel_level=2)))
    archive = build_archive(model_dir("llama"), "tiny", tmp_path / "store", cfg_file, no_archive=True)
    archived = yaml.safe_load(next(archive.rglob("model-config.yaml")).read_text())
    assert archived["parallelLevel"] == 2 and "parallelType" not in archived
    assert archived["handler"]["tensor_parallel_size"] == 2 and "vllm_engine_config" not in archived["handler"]


@pytest.mark.parametrize("mode,model_path", [("asyncCommunication", "absolute"),
                                             ("continuousBatching", "model/models--org--tiny/snapshots/abc")])
def test_an_upstream_vllm_example_config_archives_and_serves(mode, model_path, model_dir, tmp_path):
    """With an absolute model_path the archive points at the model; a relative one (upstream
    names the model inside its own store) is replaced by the model packaged into the archive."""
    store = tmp_path / "store"
    cfg_file = tmp_path / "model-config.yaml"
    path = str(model_dir("llama")) if model_path == "absolute" else model_path
    cfg_file.write_text(yaml.safe_dump(upstream_config(path, mode=mode)))
    build_archive(model_dir("llama"), "tiny", store, cfg_file)
    with TorchServe(store, {"tiny": "tiny.mar"}, tmp_path / "ts", token_auth=False) as server:
        status, _, body = post(server.inference_port, "/predictions/tiny/1.0/v1/completions",
                               {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 5,
                                "temperature": 0})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["model"] == "tiny-llama" and answer["usage"]["completion_tokens"] == 5


# ------------------------------------------------------------ Triton vLLM-backend repositories
def write_repository(root, models: dict[str, dict], pbtxt_backend: str = "vllm",
                     versions: dict[str, int] | None = None) -> None:
    """A repository as Triton's vLLM backend documents it: <name>/config.pbtxt, <name>/1/model.json."""
    for name, model_json in models.items():
        version = str((versions or {}).get(name, 1))
        (root / name / version).mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(
            f'backend: "{pbtxt_backend}"\n\n# Disabling batching in Triton, let vLLM handle the batching on its own.\n'
            'max_batch_size: 0\n\nmodel_transaction_policy {\n  decoupled: True\n}\n'
            'instance_group [\n  {\n    count: 1\n    kind: KIND_MODEL\n  }\n]\n'
            'parameters: {\n  key: "REPORT_CUSTOM_METRICS"\n  value: {\n    string_value: "true"\n  }\n}\n')
        (root / name / version / "model.json").write_text(json.dumps(model_json))


def test_a_model_repository_is_read_with_vllm_names_and_strings_for_booleans_and_numbers(model_dir, tmp_path):
    from pagedbackend.adapters.pytriton.repository import read_model_repository

    write_repository(tmp_path, {
        "llama": {"model": str(model_dir("llama")), "disable_log_requests": "true", "enforce_eager": "true",
                  "max_num_seqs": "8", "kv_cache_memory_fraction": "0.05"},
        "qwen": {"model": str(model_dir("qwen2")), "max_model_len": 256},
    })
    (tmp_path / "llama" / "2").mkdir()  # a version without model.json is not a version to serve
    models = read_model_repository(tmp_path)
    assert list(models) == ["llama", "qwen"]
    llama = models["llama"].args
    assert (llama.enforce_eager, llama.max_num_seqs, llama.kv_cache_memory_fraction) == (True, 8, 0.05)
    assert models["qwen"].args.model == str(model_dir("qwen2")) and models["qwen"].args.max_model_len == 256
    assert models["llama"].version == 1


@pytest.mark.parametrize("setup,message", [
    (lambda root, m: write_repository(root, {"a": {"model": m, "tokenizer_mode": "slow"}}),
     r"a/1/model.json.tokenizer_mode: the tokenizer is the model directory's"),
    (lambda root, m: write_repository(root, {"a": {"model": m, "max_num_seqs": "lots"}}),
     "max_num_seqs must be a number"),
    (lambda root, m: write_repository(root, {"a": {"model": m, "speculative_model": "x"}}),
     r"speculative_model is not supported \(vLLM would ignore it silently"),
    (lambda root, m: write_repository(root, {"a": {"model": m}}, pbtxt_backend="onnxruntime"),
     "backend is 'onnxruntime'; only Triton's vLLM backend"),
    (lambda root, m: (write_repository(root, {"a": {"model": m}}),
                      (root / "a" / "1" / "multi_lora.json").write_text('{"sql": "/adapters/sql"}')),
     "multi_lora.json: LoRA adapters are not supported yet"),
    (lambda root, m: write_repository(root, {"a": {"max_num_seqs": 4}}), 'must be a JSON object with "model"'),
    (lambda root, m: None, "holds no model"),
    (lambda root, m: (write_repository(root, {"a": {"model": m}}),
                      (root / "a" / "config.pbtxt").write_text('name: "b"\nbackend: "vllm"\n')),
     "name 'b' is not its directory's"),
])
def test_a_repository_model_that_cannot_be_served_is_an_error_naming_the_file(setup, message, model_dir, tmp_path):
    from pagedbackend.adapters.pytriton.repository import read_model_repository

    setup(tmp_path, str(model_dir("llama")))
    with pytest.raises(ValueError, match=message):
        read_model_repository(tmp_path)


def test_every_model_of_a_repository_is_served_and_answers_like_offline(model_dir, tmp_path, make_engine):
    from pagedbackend import SamplingParams
    from pagedbackend.adapters.pytriton import PyTritonServer
    from pagedbackend.adapters.pytriton.repository import read_model_repository
    from http_client import stream

    write_repository(tmp_path / "repo", {"llama": {"model": str(model_dir("llama")), "enforce_eager": "true"},
                                         "qwen": {"model": str(model_dir("qwen2"))}}, versions={"qwen": 2})
    sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with PyTritonServer(models=read_model_repository(tmp_path / "repo")) as server:
        port = int(server.http_url.rsplit(":", 1)[1])
        for name, arch, version in (("llama", "llama", 1), ("qwen", "qwen2", 2)):
            lines = list(stream(port, f"/v2/models/{name}/versions/{version}/generate_stream", {
                "text_input": "Once upon a time", "stream": True, "exclude_input_in_output": True,
                "sampling_parameters": json.dumps(sampling)}))
            events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
            text = "".join(e["text_output"] for e in events)
            offline = make_engine(model_dir(arch), "llm").generate(["Once upon a time"], SamplingParams(**sampling),
                                                                  use_tqdm=False)[0].outputs[0]
            assert text == offline.text and events[-1]["finish_reason"] == "length"
        import urllib.request

        metrics = urllib.request.urlopen(server.metrics.url, timeout=10).read().decode()
        for name, version in (("llama", 1), ("qwen", 2)):
            assert f'vllm:generation_tokens_total{{model="{name}",version="{version}"}} 6.0' in metrics
        types = [line for line in metrics.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types))  # one family each, a sample per model (the exposition format)
        for engine in server.engines.values():
            engine.engine.check_all_blocks_free()


def test_serve_pytriton_takes_a_model_repository_or_a_model_not_both(model_dir, tmp_path):
    import subprocess
    import sys

    write_repository(tmp_path, {"llama": {"model": str(model_dir("llama"))}})
    done = subprocess.run([sys.executable, "-m", "pagedbackend.cli", "serve", "pytriton", "--model-repository",
                           str(tmp_path), "--max-num-seqs", "4"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "come from its model.json" in done.stderr and "--max-num-seqs" in done.stderr
    done = subprocess.run([sys.executable, "-m", "pagedbackend.cli", "serve", "pytriton"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "--model-repository" in done.stderr


def test_the_gpu_budget_counts_only_this_engines_own_use_as_vllm_instances_do():
    from pagedbackend.model_runner import cuda_kv_budget

    gib = 2**30
    # 80 GiB device; another engine already holds 30 GiB; this one took 10 GiB of weights.
    budget = cuda_kv_budget(0.5, 80 * gib, free_at_start=50 * gib, free_now=40 * gib, activations=2 * gib)
    assert budget == 0.5 * 80 * gib - 10 * gib - 2 * gib  # 28 GiB: its half of the device, whatever others hold
    # Never more than what is free.
    assert cuda_kv_budget(0.9, 80 * gib, 20 * gib, 10 * gib, 1 * gib) == 9 * gib


def test_vllm_names_for_our_settings_and_vllm_defaults_are_accepted(model_dir):
    from pagedbackend.vllm_args import engine_kwargs

    kwargs = engine_kwargs({"gpu_memory_utilization": "0.6", "disable_log_stats": "false", "download_dir": None,
                            "enable_lora": False, "max_loras": 4, "max_num_seqs": 4}, "model.json")
    assert kwargs == {"kv_cache_memory_fraction": 0.6, "max_num_seqs": 4}
    with pytest.raises(ValueError, match="enable_lora: LoRA adapters are not supported yet"):
        engine_kwargs({"enable_lora": "true", "max_loras": 4}, "model.json")
    with pytest.raises(ValueError, match="give it or kv_cache_memory_fraction, not both"):
        engine_kwargs({"gpu_memory_utilization": 0.5, "kv_cache_memory_fraction": 0.5}, "model.json")
    cfg = upstream_config(str(model_dir("llama")))
    cfg["handler"]["vllm_engine_config"]["model"] = cfg["handler"].pop("model_path")  # upstream accepts it here
    assert flatten_handler(cfg["handler"])["model_path"] == str(model_dir("llama"))


@pytest.mark.slow
def test_a_plain_triton_serves_the_repository_with_the_python_backend_model(model_dir, tmp_path, make_engine):
    """The tritonserver PyTriton ships, started on its own (no PyTriton binding) over a
    repository whose model says backend "python" and holds pagedbackend's model.py."""
    import os
    import shutil
    import sys
    import urllib.request
    from pathlib import Path

    import pagedbackend
    from pagedbackend import SamplingParams
    from pagedbackend.adapters.ports import free_port
    from pagedbackend.adapters.pytriton.server import prefer_running_libpython
    from pytriton.server.triton_server import TritonServer
    from pytriton.server.triton_server_config import TritonServerConfig
    from pytriton.triton import TRITONSERVER_DIST_DIR
    from pytriton.utils.distribution import get_libs_path, get_stub_path
    from http_client import stream

    repo = tmp_path / "repo"
    write_repository(repo, {"tiny": {"model": str(model_dir("llama")), "disable_log_requests": "true"}},
                     pbtxt_backend="python")
    shutil.copy(Path(pagedbackend.__file__).parent.parent / "adapters" / "triton_python" / "model.py",
                repo / "tiny" / "1" / "model.py")
    dist = tmp_path / "tritonserver"
    shutil.copytree(TRITONSERVER_DIST_DIR, dist, ignore=shutil.ignore_patterns("python_backend_stubs",
                                                                                 "triton_python_backend_stub"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                dist / "backends" / "python" / "triton_python_backend_stub")
    prefer_running_libpython()
    http, grpc, metrics = free_port(), free_port(), free_port()
    config = TritonServerConfig()
    for key, value in {"model-repository": str(repo), "backend-directory": str(dist / "backends"),
                       "http-address": "127.0.0.1", "http-port": http, "grpc-address": "127.0.0.1",
                       "grpc-port": grpc, "metrics-address": "127.0.0.1", "metrics-port": metrics}.items():
        config[key] = value
    site = [p for p in sys.path if p.endswith("site-packages")]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(site + [str(Path(pagedbackend.__file__).parent.parent)])
    server = TritonServer(path=str(dist / "bin" / "tritonserver"), libs_path=get_libs_path(), config=config)
    try:
        server.start()
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/tiny/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.is_alive() and time.monotonic() < deadline, server._tritonserver_logs[-3000:]
            time.sleep(0.5)
        sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
        lines = list(stream(http, "/v2/models/tiny/generate_stream", {
            "text_input": "Once upon a time", "stream": True, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps(sampling)}))
        events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
        offline = make_engine(model_dir("llama"), "llm").generate(["Once upon a time"], SamplingParams(**sampling),
                                                                  use_tqdm=False)[0].outputs[0]
        assert "".join(e["text_output"] for e in events) == offline.text, events
        status, _, body = post(http, "/v2/models/tiny/generate_stream", {
            "text_input": "x", "stream": True, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps({"temperature": -1})})
        assert status == 400 and "temperature must be non-negative" in body, (status, body)
        lines = list(stream(http, "/v2/models/tiny/generate_stream", {  # and it keeps serving
            "text_input": "Once upon a time", "stream": True, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps(sampling)}))
        assert "".join(json.loads(line[6:])["text_output"] for line in lines if line.startswith("data: ")) == \
            offline.text
    finally:
        server.stop()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_serve_pytriton_model_repository_starts_every_model_and_stops_on_sigterm(model_dir, tmp_path):
    import signal
    import subprocess

    from pagedbackend.adapters.ports import free_port
    from http_client import start_serve_command, stream

    write_repository(tmp_path, {"a": {"model": str(model_dir("llama"))}, "b": {"model": str(model_dir("qwen2"))}})
    ports = [free_port() for _ in range(4)]
    proc, text = start_serve_command("pytriton", "--model-repository", str(tmp_path), "--http-port", str(ports[0]),
                                     "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                                     "--engine-metrics-port", str(ports[3]), stderr=subprocess.DEVNULL)
    try:
        for name in ("a", "b"):
            assert f"model {name!r} is ready" in text and f"/v2/models/{name}/generate_stream" in text, text
            lines = list(stream(ports[0], f"/v2/models/{name}/generate_stream", {
                "text_input": "hi", "stream": True, "exclude_input_in_output": True, "max_tokens": 3,
                "ignore_eos": True}))
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
            assert sum(e["num_output_tokens"] for e in events) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 0
