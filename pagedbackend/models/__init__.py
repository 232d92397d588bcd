"""Model implementations and the registry that picks one for a model directory.

`registry` maps a config.json's `architectures` to a class; `config.ModelConfig` is the typed
view of a model directory (it asks the registry for the architecture). This package never
imports `pagedbackend.config`: the engine config is built on top of it.
"""

from __future__ import annotations

from pagedbackend.models.config import DTYPE_NAMES, ModelConfig
from pagedbackend.models.hf_config import HFConfig
from pagedbackend.models.registry import SUPPORTED_ARCHITECTURES, get_model_class, resolve_architecture

__all__ = ["DTYPE_NAMES", "HFConfig", "ModelConfig", "SUPPORTED_ARCHITECTURES", "get_model_class",
           "resolve_architecture"]
