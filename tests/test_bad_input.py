"""Bad input gets a clear ValueError naming the problem, and never disturbs other requests."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import hf_greedy
from pagedbackend import EngineArgs, SamplingParams


@pytest.mark.parametrize("field,value,message", [
    ("n", 0, "n must be at least 1"),
    ("n", 1.5, "n must be an integer"),
    ("temperature", -0.1, "temperature must be non-negative"),
    ("temperature", "hot", "temperature must be a number"),
    ("temperature", float("nan"), "temperature must be finite"),
    ("top_p", 0.0, "top_p must be in"),
    ("top_p", 1.5, "top_p must be in"),
    ("top_k", -2, "top_k must be 0"),
    ("min_p", 2.0, "min_p must be in"),
    ("seed", 2**64, "seed must fit"),
    ("seed", "x", "seed must be an integer"),
    ("max_tokens", 0, "max_tokens must be at least 1"),
    ("min_tokens", -1, "min_tokens must be non-negative"),
    ("stop", [""], "stop must not contain empty strings"),
    ("stop", [1, 2], "stop must be a string or a list of strings"),
    ("stop_token_ids", [-1], "stop_token_ids must be non-negative"),
    ("stop_token_ids", ["a"], "stop_token_ids must be a list of integers"),
    ("ignore_eos", "yes", "ignore_eos must be true or false"),
    ("skip_special_tokens", 1, "skip_special_tokens must be true or false"),
])
def test_invalid_sampling_param_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens must be less than or equal to max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_unknown_sampling_field_from_a_payload_is_named():
    with pytest.raises(ValueError, match="unknown sampling parameter.*temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "float8", "dtype must be one of"),
    ("device", "tpu", "device must be one of"),
    ("block_size", 12, "block_size must be one of"),
    ("num_kv_blocks", 0, "num_kv_blocks must be at least 1"),
    ("kv_cache_memory_fraction", 1.5, "kv_cache_memory_fraction must be in"),
    ("max_num_seqs", 0, "max_num_seqs must be at least 1"),
    ("max_num_batched_tokens", "many", "max_num_batched_tokens must be an integer"),
    ("max_model_len", 1, "max_model_len must be at least 2"),
    ("max_model_len", 10**6, "exceeds the model's max_position_embeddings"),
    ("enable_prefix_caching", "on", "enable_prefix_caching must be true or false"),
    ("attention_backend", "flash", "attention_backend must be one of"),
    ("seed", -1, "seed must be at least 0"),
    ("tensor_parallel_size", 0, "tensor_parallel_size must be at least 1"),
    ("tensor_parallel_size", 3, "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
    ("distributed_executor_backend", "ray", "distributed_executor_backend must be one of"),
    ("distributed_timeout_s", 0, "distributed_timeout_s must be at least 1"),
    ("load_format", "gguf", "load_format must be one of"),
])
def test_invalid_engine_argument_names_the_field(field, value, message, model_dir):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=str(model_dir("llama")), **{field: value}).create_engine_config()


def test_unknown_engine_argument_is_named():
    with pytest.raises(ValueError, match="unknown engine argument.*max_seqs"):
        EngineArgs.from_dict({"model": "x", "max_seqs": 3})


def test_batched_token_budget_below_max_num_seqs_is_rejected(model_dir):
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 must be at least max_num_seqs=16"):
        EngineArgs(model=str(model_dir("llama")), max_num_batched_tokens=8, max_num_seqs=16).create_engine_config()


def test_kv_pool_too_small_for_one_sequence_is_rejected(model_dir, make_engine):
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=512"):
        make_engine(model_dir("llama"), num_kv_blocks=10, max_model_len=512)


def _copy_model(model_dir, tmp_path, name="llama"):
    dst = tmp_path / "model"
    shutil.copytree(model_dir(name), dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        EngineArgs(model=str(tmp_path / "nope")).create_engine_config()


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        EngineArgs(model=str(tmp_path)).create_engine_config()


def test_malformed_config_json(model_dir, tmp_path):
    path = _copy_model(model_dir, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        EngineArgs(model=str(path)).create_engine_config()


def test_an_architecture_transformers_does_not_know_is_named(model_dir, tmp_path):
    path = _copy_model(model_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FrobnicatorForCausalLM"], "frobnicator"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="frobnicator"):
        EngineArgs(model=str(path)).create_engine_config()
    with pytest.raises(ValueError, match="FrobnicatorForCausalLM has no native implementation .native: "
                                         "LlamaForCausalLM"):
        EngineArgs(model=str(path), model_impl="native").create_engine_config()


def test_unsupported_rope_type(model_dir, tmp_path, make_engine):
    path = _copy_model(model_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        make_engine(path)


def test_pickle_only_checkpoint_needs_an_explicit_opt_in(model_dir, tmp_path, make_engine):
    path = _copy_model(model_dir, tmp_path)
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds only pickle weights.*load_format='pt'"):
        make_engine(path)
    llm = make_engine(path, "llm", load_format="pt")
    prompt = [20, 30, 40]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(model_dir("llama"), prompt, 8)


def test_checkpoint_missing_a_weight_is_named(model_dir, tmp_path, make_engine):
    path = _copy_model(model_dir, tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 weight.*layers.1.mlp.gate_up_proj.weight\\[1\\]"):
        make_engine(path)


def test_config_that_does_not_match_the_weights(model_dir, tmp_path, make_engine):
    path = _copy_model(model_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="checkpoint shape .* does not match"):
        make_engine(path)


def test_no_weights_at_all(model_dir, tmp_path, make_engine):
    path = _copy_model(model_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights in"):
        make_engine(path)


@pytest.mark.parametrize("prompt,message", [
    ("", "prompt must not be empty"),
    ({"prompt_token_ids": []}, "prompt_token_ids must not be empty"),
    ({"prompt_token_ids": [5, 100000]}, "token id 100000 is out of range"),
    ({"prompt_token_ids": [5, -1]}, "token id -1 is out of range"),
    ({"prompt_token_ids": "1 2 3"}, "prompt_token_ids must be a list of integers"),
    ({"text": "hi"}, "unknown key"),
    (42, "prompt must be a string or a dict"),
    ({"prompt_token_ids": list(range(10, 74))}, "max_model_len is 64"),
])
def test_bad_prompt_is_rejected_and_the_engine_keeps_serving(prompt, message, model_dir, make_engine):
    path = model_dir("llama")
    engine = make_engine(path, max_model_len=64)
    good = [21, 22, 23, 24]
    engine.add_request("good-1", {"prompt_token_ids": good}, SamplingParams(temperature=0, max_tokens=10))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, SamplingParams(temperature=0, max_tokens=10))
    engine.add_request("good-2", {"prompt_token_ids": good}, SamplingParams(temperature=0, max_tokens=10))
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert done == {"good-1": hf_greedy(path, good, 10), "good-2": hf_greedy(path, good, 10)}


def test_n_larger_than_max_num_seqs_is_rejected(model_dir, make_engine):
    engine = make_engine(model_dir("llama"), max_num_seqs=2)
    with pytest.raises(ValueError, match="n=3 exceeds max_num_seqs=2"):
        engine.add_request("r", "hello", SamplingParams(n=3))
