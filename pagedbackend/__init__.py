"""pagedbackend: a paged-KV-cache LLM engine with vLLM's API, pluggable into TorchServe and PyTriton.

The public names are imported on first use, so that the torch-free parts (the scheduler, the
KV cache manager, the step types) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedbackend.llm",
    "AsyncLLMEngine": "pagedbackend.async_engine",
    "EngineDeadError": "pagedbackend.async_engine",
    "RequestFailedError": "pagedbackend.async_engine",
    "RequestStream": "pagedbackend.async_engine",
    "BeamSearchOutput": "pagedbackend.beam_search",
    "BeamSearchParams": "pagedbackend.beam_search",
    "BeamSearchSequence": "pagedbackend.beam_search",
    "CompletionOutput": "pagedbackend.outputs",
    "Logprob": "pagedbackend.outputs",
    "RequestOutput": "pagedbackend.outputs",
    "EngineArgs": "pagedbackend.config",
    "EngineConfig": "pagedbackend.config",
    "LLMEngine": "pagedbackend.llm_engine",
    "RequestOutputKind": "pagedbackend.sampling_params",
    "SamplingParams": "pagedbackend.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedbackend' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
