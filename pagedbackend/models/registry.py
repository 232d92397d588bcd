"""Supported architectures, by the `architectures` name a Hugging Face config.json carries.

The registry is the model side's entry point: `pagedbackend.models.config.ModelConfig` asks it
which class serves a model directory, and the engine config asks `ModelConfig`. Nothing here
imports `pagedbackend.config` (the dependency runs config -> models, never back).
"""

from __future__ import annotations

import importlib

from pagedbackend.models.hf_config import HFConfig

# architecture -> (module, class)
_REGISTRY = {
    "LlamaForCausalLM": ("pagedbackend.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedbackend.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("pagedbackend.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("pagedbackend.models.llama", "LlamaForCausalLM"),
    "GPT2LMHeadModel": ("pagedbackend.models.gpt2", "GPT2LMHeadModel"),
}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

SUPPORTED_ARCHITECTURES = tuple(_REGISTRY)


def resolve_architecture(hf: HFConfig) -> str:
    """The config's architecture: the first one with a native implementation, else the first
    named (the transformers path may serve it)."""
    names = hf.get("architectures") or []
    for name in names:
        if name in _REGISTRY:
            return name
    if not names and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf.get("model_type")]
    if names:
        return names[0]
    raise ValueError(f"model: config.json names no architectures (model_type={hf.get('model_type')!r}); "
                     f"natively supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def has_native(architecture: str) -> bool:
    return architecture in _REGISTRY


def get_model_class(architecture: str):
    module, cls = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), cls)


__all__ = ["SUPPORTED_ARCHITECTURES", "get_model_class", "has_native", "resolve_architecture"]
