"""The padded decode path (what CUDA graphs replay), run on the CPU: decode-only steps on the
runner's persistent buffers, padded to the next capture size with rows that write into the
scratch block. Greedy output must stay token-for-token transformers' under chunked prefill
mixed with decodes, prefix-cache hits and preemption; a step replayed from captured work must
take everything it needs from the persistent buffers; swaps through the block-major host pool
must restore blocks exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import PARITY_MODELS, available_backends
from helpers import hf_greedy, random_prompts
from pagedbackend import LLMEngine, SamplingParams
from pagedbackend import model_runner
from pagedbackend.attention.triton_backend import TritonAttentionBackend
from pagedbackend.config import cuda_graph_capture_sizes
from pagedbackend.model_runner import swap_in, swap_out

MAX_NEW = 12
BACKENDS = available_backends()
# The quick run covers GQA (llama) on every backend and MQA with a sliding window (mistral);
# the rest of the parity matrix is marked slow.
QUICK = {("llama", b) for b in BACKENDS} | {("mistral", "torch")}


def _matrix(names, backends):
    return [pytest.param(n, b, id=f"{n}-{b}", marks=() if (n, b) in QUICK else pytest.mark.slow)
            for n in names for b in backends]


@pytest.fixture
def make_padded_engine(make_engine):
    """LLMEngines with padded decode forced on (and CUDA graphs, with `cuda_graphs=True`);
    every block free after the test (conftest's `make_engine`)."""

    def make(model, cuda_graphs: bool = False, **kwargs) -> LLMEngine:
        return make_engine(model, config_overrides={"padded_decode": True, "cuda_graphs": cuda_graphs}, **kwargs)

    return make


def _spy_on_padding(monkeypatch, engine: LLMEngine) -> Counter:
    """(real decodes, padded size) of every padded step the runner fills."""
    padded = engine.runner.padded
    seen: Counter = Counter()
    fill = padded.fill

    def spy(step, size):
        seen[(len(step.seq_lens), size)] += 1
        return fill(step, size)

    monkeypatch.setattr(padded, "fill", spy)
    return seen


def _run(engine: LLMEngine, prompts: list[list[int]], stagger: int = 0) -> list[list[int]]:
    """Greedy outputs; with `stagger`, one prompt joins every `stagger` steps (so prefill
    chunks land beside running decodes)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    pending = list(enumerate(prompts))
    outs: dict[str, list[int]] = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and (not stagger or steps % stagger == 0):
            i, prompt = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        steps += 1
    return [outs[str(i)] for i in range(len(prompts))]


def _expected(path, prompts):
    return [hf_greedy(path, p, MAX_NEW) for p in prompts]


def test_capture_sizes_are_1_2_4_then_multiples_of_8_up_to_max_num_seqs():
    assert cuda_graph_capture_sizes(1) == (1,)
    assert cuda_graph_capture_sizes(3) == (1, 2, 4)
    assert cuda_graph_capture_sizes(5) == (1, 2, 4, 8)
    assert cuda_graph_capture_sizes(16) == (1, 2, 4, 8, 16)
    assert cuda_graph_capture_sizes(17) == (1, 2, 4, 8, 16, 24)
    sizes = cuda_graph_capture_sizes(256)
    assert sizes[:5] == (1, 2, 4, 8, 16) and sizes[-1] == 256 and all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))


@pytest.mark.parametrize("name, backend", _matrix(PARITY_MODELS, BACKENDS))
def test_padded_decode_matches_transformers_with_chunked_prefill_and_prefix_hits(name, backend, model_dir,
                                                                                 make_padded_engine, monkeypatch):
    path = model_dir(name)
    shared = random_prompts([40], 1024, seed=21)[0]
    prompts = random_prompts([1, 17, 33, 70, 130], 1024, seed=22) + [shared + t for t in
                                                                     random_prompts([3, 20], 1024, seed=23)]
    engine = make_padded_engine(path, max_num_batched_tokens=32, max_num_seqs=7, max_model_len=256,
                                attention_backend=backend)
    seen = _spy_on_padding(monkeypatch, engine)
    assert _run(engine, prompts, stagger=3) == _expected(path, prompts)
    stats = engine.get_stats()
    assert stats["num_chunked_prefill_steps"] > 0 and stats["prefix_cache_hits"] > 0
    assert any(n < size for n, size in seen), f"no step was padded: {seen}"
    assert {size for _, size in seen} <= {1, 2, 4, 8}


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("backend", [BACKENDS[0], *(pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS[1:])])
def test_padded_decode_matches_transformers_under_forced_preemption(backend, mode, model_dir, make_padded_engine,
                                                                   monkeypatch):
    path = model_dir("llama")
    prompts = random_prompts([15, 31, 64, 100, 129, 160, 200, 2, 47], 1024, seed=24)
    # 17 blocks x 16 tokens: one max-length sequence, far less than the batch needs.
    engine = make_padded_engine(path, num_kv_blocks=17, max_num_batched_tokens=64, max_num_seqs=9,
                                max_model_len=256, attention_backend=backend, preemption_mode=mode,
                                swap_space=0.02)
    seen = _spy_on_padding(monkeypatch, engine)
    assert _run(engine, prompts) == _expected(path, prompts)
    stats = engine.get_stats()
    assert stats["num_preemptions"] > 0
    if mode == "swap":
        assert stats["num_swapped_in"] > 0
    assert any(n < size for n, size in seen)


@pytest.mark.skipif(TritonAttentionBackend.unavailable_reason("cpu") is not None, reason="no triton interpreter")
def test_the_triton_kernels_take_padded_decode_rows_as_they_are(model_dir, make_padded_engine, monkeypatch):
    """The padding convention needs no case in the kernels: scratch-block slots, length-1 rows,
    full-width block tables (the split-KV decode kernel forced, and the unified one)."""
    path = model_dir("llama")
    prompts = random_prompts([3, 20, 37], 1024, seed=28)
    for splits in (None, 2):
        engine = make_padded_engine(path, max_num_batched_tokens=32, max_num_seqs=3, max_model_len=128,
                                    attention_backend="triton")
        engine.runner.backend.force_num_splits = splits
        seen = _spy_on_padding(monkeypatch, engine)
        assert _run(engine, prompts) == _expected(path, prompts)
        assert any(n < size for n, size in seen)


def test_padded_decode_on_the_transformers_modeling_path_matches_transformers(model_dir, make_padded_engine,
                                                                               monkeypatch):
    path = model_dir("qwen2")
    prompts = random_prompts([5, 23, 60], 1024, seed=27)
    engine = make_padded_engine(path, max_num_batched_tokens=32, max_num_seqs=3, max_model_len=128,
                                model_impl="transformers", attention_backend="torch")
    seen = _spy_on_padding(monkeypatch, engine)
    assert _run(engine, prompts, stagger=2) == _expected(path, prompts)
    assert any(n < size for n, size in seen)


def _eager_capture(recorded: list[int]):
    """A stand-in for CUDA-graph capture on the CPU: the captured step is run once at capture,
    and a replay runs it again. The metadata it closed over keeps the capture's host fields
    (padding lengths, max_seq_len = max_model_len), so a replay is right only if everything
    per step reaches it through the persistent buffers, as a real graph's would."""

    def make(device):
        def capture(step):
            step()

            def replay():
                recorded.append(1)
                step()

            return replay

        return capture

    return make


@pytest.mark.parametrize("name", ["llama", "mistral", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_replayed_decode_steps_read_everything_from_the_persistent_buffers(name, model_dir, make_padded_engine,
                                                                           monkeypatch):
    replays: list[int] = []
    monkeypatch.setattr(model_runner, "make_graph_capture", _eager_capture(replays))
    path = model_dir(name)
    engine = make_padded_engine(path, cuda_graphs=True, max_num_batched_tokens=32, max_num_seqs=6,
                                max_model_len=256, attention_backend="torch")
    runner = engine.runner
    assert sorted(runner._graphs) == [1, 2, 4, 8]
    # Capture ran padding rows only: they wrote the padding block and nothing of the pool.
    assert not runner.kv_cache[:, :, :runner.num_blocks].any()
    assert runner.kv_cache[:, :, runner.padding_block].any()
    prompts = random_prompts([1, 9, 40, 77, 150, 33], 1024, seed=25)
    assert _run(engine, prompts, stagger=2) == _expected(path, prompts)
    assert len(replays) > 10


@pytest.mark.skipif(TritonAttentionBackend.unavailable_reason("cpu") is not None, reason="no triton interpreter")
@pytest.mark.parametrize("splits", [None, 2], ids=["unified-kernel", "split-kv"])
def test_replayed_decode_steps_on_the_triton_kernels_read_everything_from_the_persistent_buffers(
        splits, model_dir, make_padded_engine, monkeypatch):
    """The triton backend declares supports_cuda_graphs: its captured decode (either kernel)
    replays right on steps whose lengths and block tables differ from the capture's."""
    replays: list[int] = []
    monkeypatch.setattr(model_runner, "make_graph_capture", _eager_capture(replays))
    monkeypatch.setattr(TritonAttentionBackend, "__init__",
                        lambda self, force_num_splits=splits, _init=TritonAttentionBackend.__init__:
                        _init(self, force_num_splits))
    path = model_dir("llama")
    engine = make_padded_engine(path, cuda_graphs=True, max_num_batched_tokens=32, max_num_seqs=3,
                                max_model_len=128, attention_backend="triton")
    assert sorted(engine.runner._graphs) == [1, 2, 4]
    prompts = random_prompts([3, 20, 37], 1024, seed=29)
    assert _run(engine, prompts, stagger=2) == _expected(path, prompts)
    assert len(replays) > 10


def test_the_profile_run_leaves_the_kv_cache_and_the_layers_bindings_as_they_were(model_dir, make_padded_engine):
    path = model_dir("llama")
    engine = make_padded_engine(path, max_num_batched_tokens=300, max_num_seqs=4, max_model_len=128,
                                attention_backend="torch")
    runner = engine.runner
    layers = runner.model.attention_layers()
    before = [(layer.backend, layer.kv_cache[0].data_ptr(), layer.kv_cache[1].data_ptr()) for layer in layers]
    assert runner.profile_run() is None  # nothing to measure on the CPU
    assert [(layer.backend, layer.kv_cache[0].data_ptr(), layer.kv_cache[1].data_ptr()) for layer in layers] == before
    assert not runner.kv_cache.any()
    prompts = random_prompts([20, 90], 1024, seed=26)
    assert _run(engine, prompts) == _expected(path, prompts)


@pytest.mark.parametrize("pairs_out, pairs_in", [([(3, 0), (1, 2), (6, 1)], [(2, 5), (0, 4), (1, 0)]),
                                                 ([(0, 0)], [(0, 6)])])
def test_swapping_out_and_back_in_restores_each_block_exactly(pairs_out, pairs_in):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn((3, 2, 8, 2, 4, 5), generator=g)  # [layers, 2, blocks, heads, block, dim]
    host = torch.full((4, 3, 2, 2, 4, 5), float("nan"))  # block-major, as the runner allocates it
    original = kv.clone()
    swap_out(kv, host, pairs_out)
    for src, dst in pairs_out:
        assert torch.equal(host[dst], original[:, :, src])
        assert host[dst].is_contiguous()
    kv.zero_()
    host_of = {dst: src for src, dst in pairs_out}
    swap_in(host, kv, [(h, d) for h, d in pairs_in if h in host_of])
    for h, d in pairs_in:
        if h in host_of:
            assert torch.equal(kv[:, :, d], original[:, :, host_of[h]])
    untouched = [b for b in range(8) if b not in {d for h, d in pairs_in if h in host_of}]
    assert not kv[:, :, untouched].any()
