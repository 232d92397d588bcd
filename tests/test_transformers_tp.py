"""Tensor parallelism on the transformers modeling path (`model_impl="transformers"`,
tensor_parallel_size=2, gloo ranks on 127.0.0.1): greedy output token-exact with transformers'
`generate()` (fp32) for architectures with no native implementation, each with chunked
prefill, prefix-cache hits and forced preemption in the same run and every KV block free after
(the `make_engine` fixture checks); the sharded model's logits equal the full model's for every
architecture with a plan, refined and verbatim plans, KV heads split and replicated; and every
split this path cannot do correctly refused by name, at configuration time, before any weight
is read."""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import model_builder
from helpers import hf_greedy, random_prompts
from pagedbackend import EngineArgs, SamplingParams

pytestmark = pytest.mark.slow
MAX_NEW = 10
# 16 blocks of 16 for 9 prompts up to ~170 tokens, 32-token chunks: preemption, chunking and
# prefix hits (a shared 64-token prefix cached by the first request) in the one run.
STRESS = dict(num_kv_blocks=16, max_num_batched_tokens=32, max_num_seqs=6, max_model_len=192)

# name -> build_tiny_model kwargs. 4 heads and 2 KV heads unless said: one of each per rank.
MODELS: dict[str, dict[str, Any]] = {
    "gemma2": dict(arch="gemma2"),  # soft-capped attention and logits, sliding/full layers
    "granite": dict(arch="granite"),  # embedding/residual/attention multipliers, logits_scaling
    "qwen3-moe": dict(arch="qwen3-moe"),  # 3-D experts split (packed gate/up), output all-reduced
    "olmo2": dict(arch="olmo2"),  # q/k RMSNorm over all heads: variance all-reduced
    # Fused qkv_proj/gate_up_proj split part by part; its one KV head replicated on both ranks.
    "phi3-kv1": dict(arch="phi3", num_kv_heads=1),
    "mixtral": dict(arch="mixtral"),
    "gemma3": dict(arch="gemma3"),
    "phi3": dict(arch="phi3"),
    "gpt-neox": dict(arch="gpt-neox"),
    "cohere": dict(arch="cohere"),  # per-head q/k LayerNorm weights [heads, head_dim] sliced
    "starcoder2": dict(arch="starcoder2"),  # biases on the row-parallel layers: added once
    "qwen2-moe": dict(arch="qwen2-moe"),  # shared expert left whole beside the split experts
    "olmo2-kv1": dict(arch="olmo2", num_kv_heads=1),  # the replicated k_norm's variance
    "cohere-kv1": dict(arch="cohere", num_kv_heads=1),
    "mixtral-kv1": dict(arch="mixtral", num_kv_heads=1),
    "stablelm": dict(arch="stablelm"),  # no base_model_tp_plan
}
ENGINE_ARCHS = ["gemma2", "granite", "qwen3-moe", "olmo2", "phi3-kv1"]


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory, tiny_tokenizer):
    return model_builder(tmp_path_factory.mktemp("tp-models"), tiny_tokenizer, MODELS)


def _with_plan(src: Path, dst: Path, plan: dict[str, str]) -> Path:
    """A copy of a model directory whose config.json carries its own base_model_tp_plan
    (transformers reads it over the class's)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["base_model_tp_plan"] = plan
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _prompts():
    shared = random_prompts([64], 1000, seed=31)[0]
    return shared, [shared + t for t in random_prompts([1, 9, 30], 1000, seed=32)] + \
        random_prompts([2, 16, 47, 100, 150], 1000, seed=33)


def test_the_readme_claims_tp2_for_exactly_the_architectures_run_here():
    from pagedbackend.models.registry import has_native
    from pagedbackend.models.support import TP_VERIFIED, architecture_of

    run_here = {architecture_of(MODELS[name]["arch"]) for name in ENGINE_ARCHS}
    assert run_here == {arch for arch in TP_VERIFIED if not has_native(arch)}


# ------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("name", ENGINE_ARCHS)
def test_tp2_transformers_path_greedy_equals_generate(name, arch_dir, make_engine):
    path = arch_dir(name)
    shared, prompts = _prompts()
    llm = make_engine(path, "llm", tensor_parallel_size=2, model_impl="transformers", **STRESS)
    runner = llm.llm_engine.runner
    attn = runner.model.attention_layers()[0]
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # this rank's heads: the KV cache holds one
    assert runner.kv_cache.shape[0] == len(runner.model.attention_layers())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": shared}], params, use_tqdm=False)]
    got += [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0, stats
    assert stats["num_chunked_prefill_steps"] > 0, stats
    assert stats["prefix_cache_hits"] >= 64 * 3, stats
    assert got == [hf_greedy(path, p, MAX_NEW) for p in [shared, *prompts]]


# ------------------------------------------------------------------------------ sharded forward, two ranks
# (model name, plan, (heads, KV heads) per rank): "own" is what the engine applies (refined where
# REFINED_PLANS has one), "verbatim" the class's base_model_tp_plan as transformers ships it
# (Phi-3 and OLMo 2 gather their q/k/v: heads whole on every rank, weights still split). The
# engine test's architectures are not repeated here.
FORWARD_CASES = [("mixtral", "own", (2, 1)), ("gemma3", "own", (2, 1)), ("phi3", "own", (2, 1)),
                 ("gpt-neox", "own", (2, 2)), ("cohere", "own", (2, 1)), ("starcoder2", "own", (2, 1)),
                 ("qwen2-moe", "own", (2, 1)), ("olmo2-kv1", "own", (2, 1)), ("cohere-kv1", "own", (2, 1)),
                 ("mixtral-kv1", "own", (2, 1)),
                 ("phi3", "verbatim", (4, 2)), ("olmo2", "verbatim", (4, 2)), ("olmo2-kv1", "verbatim", (4, 1))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in getattr(model, model.base_model_prefix).layers.parameters())


def _rank_main(rank: int, port: int, cases: list[tuple[str, str, str]], probe_case: str, out: str) -> None:
    """One rank: shard each model, run its full-sequence forward (transformers' eager attention,
    which repeats KV heads by the rewritten `num_key_value_groups`), compare with the whole
    model; then load `probe_case` through TransformersCausalLM with the per-rank head rewrite
    disabled, which the start-up probe must refuse."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from pagedbackend.distributed import destroy_tensor_parallel, init_tensor_parallel
    from pagedbackend.models import transformers_tp
    from pagedbackend.models.config import ModelConfig
    from pagedbackend.models.transformers_impl import TransformersCausalLM

    init_tensor_parallel(rank, 2, init_method=f"tcp://127.0.0.1:{port}", device="cpu", timeout_s=60)
    results: dict[str, Any] = {}
    ids = torch.tensor([random_prompts([48], 1000, seed=35)[0]])
    try:
        for key, path, which in cases:
            full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
            model = copy.deepcopy(full)
            plan = dict(type(model.config).base_model_tp_plan) if which == "verbatim" else None
            shard = transformers_tp.shard_model(model, model.config, rank, 2, plan=plan)
            with torch.inference_mode():
                want, got = full(ids).logits[0], model(ids).logits[0]
            results[key] = dict(err=(want - got).abs().max().item() / want.abs().max().item(),
                                argmax=bool((want.argmax(-1) == got.argmax(-1)).all()),
                                heads=[shard.heads_per_rank, shard.kv_heads_per_rank],
                                params=_layer_params(model), full_params=_layer_params(full))
        transformers_tp._Sharder._rewrite_heads = lambda self, module: None
        try:
            TransformersCausalLM(ModelConfig.from_dir(probe_case), torch.float32, "cpu", "auto")
            results["probe"] = "loaded"
        except (ValueError, RuntimeError) as e:
            results["probe"] = f"{type(e).__name__}: {e}"
    finally:
        Path(f"{out}.{rank}").write_text(json.dumps(results))
        destroy_tensor_parallel()


def test_sharded_models_compute_the_full_models_logits_on_two_ranks(arch_dir, tmp_path):
    cases = [(f"{name}/{which}", str(arch_dir(name)), which) for name, which, _ in FORWARD_CASES]
    out = str(tmp_path / "results")
    torch.multiprocessing.spawn(_rank_main, args=(_free_port(), cases, str(arch_dir("phi3")), out), nprocs=2)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    for (key, _, _), (_, _, heads) in zip(cases, FORWARD_CASES):
        for rank, results in enumerate(ranks):
            r = results[key]
            assert r["err"] < 1e-5 and r["argmax"], (key, rank, r)
            assert tuple(r["heads"]) == heads, (key, rank, r)
            assert r["params"] < 0.75 * r["full_params"], (key, rank, r)  # the layers keep only their shard
    for results in ranks:
        assert results["probe"].startswith("ValueError: tensor_parallel_size=2: Phi3ForCausalLM's forward fails "
                                           "once sharded"), results["probe"]


# ------------------------------------------------------------------------------ refusals
def _config(path: Path, tp: int = 2) -> Any:
    return EngineArgs(model=str(path), tensor_parallel_size=tp, model_impl="transformers").create_engine_config()


def test_an_architecture_without_a_plan_is_refused_by_name(arch_dir):
    with pytest.raises(ValueError, match=r"StableLmForCausalLM has no tensor-parallel plan.*base_model_tp_plan"):
        _config(arch_dir("stablelm"))
    assert _config(arch_dir("stablelm"), tp=1).model_impl == "transformers"  # one rank serves it


def test_a_plan_that_would_split_a_norm_over_all_heads_is_refused(arch_dir, tmp_path):
    """OLMo 2's q_norm spans every head: q/k/v split without the refined plan's all-reduced
    norm would normalise each rank's half on its own (wrong tokens), so it is refused."""
    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
            "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
    path = _with_plan(arch_dir("olmo2"), tmp_path / "olmo2-naive", plan)
    with pytest.raises(ValueError, match=r"Olmo2ForCausalLM cannot be split on the transformers path: "
                                         r"layers\.0\.self_attn\.q_norm\.weight \(shape \(64,\)\) spans every "
                                         r"attention head"):
        _config(path)


@pytest.mark.parametrize("plan,message", [
    ({"layers.*.self_attn.q_proj": "sequence_parallel"}, r"style 'sequence_parallel', which this path does not"),
    ({"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
      "layers.*.self_attn.v_proj": "colwise"}, r"splits layers\.0\.self_attn inconsistently"),
    ({"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
      "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
      "layers.*.mlp.experts.gate_up_proj": "packed_colwise", "layers.*.mlp.experts.down_proj": "rowwise"},
     r"expert weights of layers\.0\.mlp\.experts are split but its plan does not all-reduce"),
    ({"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
      "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
      "layers.*.mlp.experts": "moe_tp_experts"}, r"all-reduces the output of layers\.0\.mlp\.experts but splits none"),
    ({"embed_tokens": "embedding_rowwise"}, r"splits no attention module"),
], ids=["unsupported-style", "no-row-parallel-output", "experts-unreduced", "experts-unsplit", "attention-unsplit"])
def test_plans_that_cannot_be_applied_correctly_are_refused(plan, message, arch_dir, tmp_path):
    path = _with_plan(arch_dir("mixtral"), tmp_path / "mixtral-plan", plan)
    with pytest.raises(ValueError, match=r"MixtralForCausalLM cannot be split on the transformers path: .*" + message):
        _config(path)


def test_heads_that_do_not_divide_are_refused_naming_the_numbers(arch_dir):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        _config(arch_dir("gemma2"), tp=3)


def test_every_engine_architecture_passes_the_configuration_check(arch_dir):
    for name in ENGINE_ARCHS + ["mixtral", "gemma3", "cohere", "gpt-neox", "starcoder2", "qwen2-moe"]:
        assert _config(arch_dir(name)).tensor_parallel_size == 2, name
