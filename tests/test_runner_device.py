"""Device placement, checked on the CPU: `cuda` resolved to one indexed GPU, that GPU made
current on every thread that launches kernels (the runner's and the async engine's loop
thread: Triton launches on the thread's current device, not the tensors'), and dtype="auto"
choosing what vLLM chooses."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from pagedbackend import AsyncLLMEngine, EngineArgs, SamplingParams
from pagedbackend import distributed, model_runner
from pagedbackend.config import resolve_dtype
from pagedbackend.model_runner import pin_device, resolve_device


def test_cuda_resolves_to_the_current_device_of_the_calling_thread(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_resolves_to_a_tensor_parallel_ranks_own_gpu(monkeypatch):
    group = distributed.TPGroup(rank=1, size=2, local_rank=1, device_group=None, cpu_group=None,
                                owns_process_group=False)
    monkeypatch.setattr(distributed, "_GROUP", group)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda") == torch.device("cuda:1")


def test_pinning_sets_the_current_cuda_device_and_leaves_the_cpu_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    pin_device(torch.device("cuda:2"))
    pin_device(torch.device("cpu"))
    assert calls == [torch.device("cuda:2")]


def test_the_runner_and_the_async_engine_thread_pin_the_runners_device(model_dir, make_engine, monkeypatch):
    pinned: list[tuple[str, torch.device]] = []

    def record(device: torch.device) -> None:
        pinned.append((threading.current_thread().name, device))

    # llm_engine imported pin_device by name: patch both places it is looked up.
    monkeypatch.setattr(model_runner, "pin_device", record)
    monkeypatch.setattr("pagedbackend.llm_engine.pin_device", record)
    engine = make_engine(model_dir("llama"), max_num_seqs=2, max_model_len=64)
    assert pinned == [(threading.current_thread().name, torch.device("cpu"))]  # the runner, where it was built
    async_engine = AsyncLLMEngine(engine)
    try:
        out = list(async_engine.submit({"prompt_token_ids": [11, 12, 13]}, SamplingParams(max_tokens=2)))
        assert out[-1].finished
    finally:
        async_engine.shutdown()
    assert ("pagedbackend-engine", torch.device("cpu")) in pinned


@pytest.mark.parametrize("declared, bf16, expected", [
    (torch.float32, True, torch.bfloat16),  # fp32 checkpoints get tensor cores
    (None, True, torch.bfloat16),  # no torch_dtype in config.json: taken as fp32
    (torch.float32, False, torch.float16),  # a GPU without bf16
    (torch.float16, True, torch.float16),  # a half-precision checkpoint keeps its dtype
    (torch.bfloat16, True, torch.bfloat16),
])
def test_auto_dtype_on_cuda_is_the_checkpoints_except_fp32_which_runs_in_bf16(declared, bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", declared, "cuda:0") == expected


@pytest.mark.parametrize("declared", [torch.float32, torch.bfloat16, None])
def test_auto_dtype_on_the_cpu_is_fp32_and_explicit_dtypes_are_kept(declared):
    assert resolve_dtype("auto", declared, "cpu") == torch.float32
    assert resolve_dtype("bf16", declared, "cpu") == torch.bfloat16
    assert resolve_dtype("float32", declared, "cuda") == torch.float32


def test_enforce_eager_and_the_cpu_leave_decode_unpadded(model_dir):
    cpu = EngineArgs(model=str(model_dir("llama"))).create_engine_config()
    assert (cpu.padded_decode, cpu.cuda_graphs, cpu.enforce_eager) == (False, False, False)
    eager = EngineArgs(model=str(model_dir("llama")), enforce_eager=True).create_engine_config()
    assert (eager.padded_decode, eager.cuda_graphs, eager.enforce_eager) == (False, False, True)
    with pytest.raises(ValueError, match="cuda_graphs needs padded_decode"):
        dataclasses.replace(cpu, cuda_graphs=True)
    with pytest.raises(ValueError, match="contradict"):
        dataclasses.replace(eager, padded_decode=True, cuda_graphs=True)


def test_an_eager_step_sends_its_inputs_to_the_device_in_one_upload(model_dir, make_engine, monkeypatch):
    """ids, positions, the attention metadata and the logits rows travel as one buffer (on
    CUDA one pinned, non-blocking copy), not one pageable copy each; on the CPU as views."""
    from pagedbackend import host_upload

    sends = []
    real_send = host_upload.HostUpload.send

    def send(self, device, one_copy):
        out = real_send(self, device, one_copy)
        sends.append((sorted(out), one_copy))
        return out

    monkeypatch.setattr(host_upload.HostUpload, "send", send)
    engine = make_engine(model_dir("llama"))
    engine.add_request("a", {"prompt_token_ids": list(range(5, 40))}, SamplingParams(temperature=0, max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()
    inputs = [names for names, _ in sends if "input_ids" in names]
    assert len(inputs) == 3  # one per step: the prefill and two decodes
    assert all(names == ["block_tables", "input_ids", "logits_indices", "positions", "query_start_loc",
                         "seq_lens", "slot_mapping"] for names in inputs)
    assert all(not one_copy for _, one_copy in sends)  # the CPU wraps its arrays where they lie
