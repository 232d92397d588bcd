"""The transformers modeling path (`model_impl="transformers"`): each architecture's own
transformers code with our paged attention, greedy token-exact with `generate()` (fp32) under
chunked prefill, prefix-cache hits and forced preemption in the same run; the native families
equal on both paths; native Qwen3 equal to both; a model that bypasses the attention interface
refused by name."""

from __future__ import annotations

import pytest

from helpers import hf_greedy, random_prompts
from pagedbackend import EngineArgs, SamplingParams

pytestmark = pytest.mark.slow
MAX_NEW = 10
# Served by the transformers path only (no native implementation).
TRANSFORMERS_ONLY = ["qwen3-moe", "qwen2-moe", "mixtral", "gemma2", "gemma3", "phi3", "phi3-sliding", "olmo2",
                     "granite", "gpt-neox", "stablelm", "cohere", "starcoder2"]
BOTH_PATHS = ["llama", "qwen2", "mistral", "gpt2", "qwen3", "qwen3-sliding"]
# 16 blocks of 16 for 9 prompts up to ~170 tokens, 32-token chunks: preemption, chunking and
# prefix hits (a shared 64-token prefix cached by the first request) in the one run.
STRESS = dict(num_kv_blocks=16, max_num_batched_tokens=32, max_num_seqs=6, max_model_len=192)


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory, tiny_tokenizer):
    from pagedbackend.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("arch-models")
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = build_tiny_model(root / arch, arch, tokenizer=tiny_tokenizer)
        return built[arch]

    return get


def _prompts():
    shared = random_prompts([64], 1000, seed=31)[0]
    return shared, [shared + t for t in random_prompts([1, 9, 30], 1000, seed=32)] + \
        random_prompts([2, 16, 47, 100, 150], 1000, seed=33)


def _run(make_engine, path, impl):
    shared, prompts = _prompts()
    llm = make_engine(path, "llm", model_impl=impl, **STRESS)
    assert llm.llm_engine.config.model_impl == impl
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    first = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": shared}], params, use_tqdm=False)]
    rest = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0, stats
    assert stats["num_chunked_prefill_steps"] > 0, stats
    assert stats["prefix_cache_hits"] >= 64 * 3, stats
    return first + rest, [shared, *prompts]


@pytest.mark.parametrize("arch", TRANSFORMERS_ONLY)
def test_transformers_path_greedy_equals_generate(arch, arch_dir, make_engine):
    path = arch_dir(arch)
    assert EngineArgs(model=str(path)).create_engine_config().model_impl == "transformers"  # auto
    got, prompts = _run(make_engine, path, "transformers")
    assert got == [hf_greedy(path, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("arch", BOTH_PATHS)
def test_native_and_transformers_paths_equal_each_other_and_generate(arch, arch_dir, make_engine):
    path = arch_dir(arch)
    assert EngineArgs(model=str(path)).create_engine_config().model_impl == "native"  # auto
    native, prompts = _run(make_engine, path, "native")
    via_hf, _ = _run(make_engine, path, "transformers")
    assert native == via_hf == [hf_greedy(path, p, MAX_NEW) for p in prompts]


def test_a_model_that_bypasses_the_attention_interface_is_refused_by_name(arch_dir):
    path = arch_dir("falcon")
    with pytest.raises(ValueError, match=r"FalconForCausalLM cannot be served by the transformers path.*"
                                         r"_supports_attention_backend is False"):
        EngineArgs(model=str(path)).create_engine_config()


def test_native_impl_for_an_architecture_without_one_is_an_error(arch_dir):
    with pytest.raises(ValueError, match="has no native implementation"):
        EngineArgs(model=str(arch_dir("olmo2")), model_impl="native").create_engine_config()


def test_sampling_n_beams_and_logprobs_work_on_the_transformers_path(arch_dir, make_engine):
    """The same engine features as the native path: seeded n > 1, logprobs, beams, on Qwen3
    through both paths with identical results."""
    from pagedbackend import BeamSearchParams

    path = arch_dir("qwen3")
    prompt = [{"prompt_token_ids": random_prompts([12], 1000, seed=34)[0]}]
    results = {}
    for impl in ("native", "transformers"):
        llm = make_engine(path, "llm", model_impl=impl)
        sampled = llm.generate(prompt, SamplingParams(temperature=0.8, seed=5, n=3, max_tokens=8, logprobs=2),
                               use_tqdm=False)[0]
        beams = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=6))[0]
        results[impl] = ([c.token_ids for c in sampled.outputs], [s.tokens for s in beams.sequences],
                         [c.cumulative_logprob for c in sampled.outputs])
    native, via_hf = results["native"], results["transformers"]
    assert native[:2] == via_hf[:2]
    assert native[2] == pytest.approx(via_hf[2], abs=1e-4)


def test_readme_architecture_table_is_generated_from_the_registry_and_the_tiny_models():
    from pathlib import Path

    from pagedbackend.models.support import README_HEADING, table_markdown
    from pagedbackend.readme import table_under

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert table_under(readme, README_HEADING) == table_markdown(), (
        "README architecture table out of date: python -m pagedbackend.models.support --write README.md")
