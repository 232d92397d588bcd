"""Build a model from a Hugging Face directory and load its weights.

Safetensors only by default (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), read tensor by tensor through `safetensors.safe_open` so peak
memory stays near the model's size. Pickle checkpoints (`pytorch_model*.bin`) can run
arbitrary code when loaded, so they need an explicit `load_format="pt"`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Protocol

import torch
from tqdm.auto import tqdm

from pagedbackend.models.base import CausalLM
from pagedbackend.models.config import ModelConfig
from pagedbackend.models.layers import pack_linear_weights
from pagedbackend.models.registry import get_model_class


class LoadSpec(Protocol):
    """What loading needs from the engine's config (`pagedbackend.config.EngineConfig` is one);
    a protocol, so this package never imports the engine config."""

    model_config: ModelConfig
    load_format: str
    device: str
    dtype: torch.dtype
    model_impl: str  # resolved: "native" or "transformers"


def find_weight_files(path: Path, load_format: str = "auto") -> tuple[str, list[Path]]:
    index = path / "model.safetensors.index.json"
    if load_format in ("auto", "safetensors"):
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"model: {index} is malformed ({e})") from e
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"model: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
            return "safetensors", files
        files = sorted(path.glob("*.safetensors"))
        if files:
            return "safetensors", files
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if load_format == "pt" and pickles:
        return "pt", pickles
    if pickles:
        raise ValueError(f"model: {path} holds only pickle weights ({pickles[0].name}); supported: *.safetensors "
                         "(convert them), or pass load_format='pt' to load pickles you trust")
    raise ValueError(f"model: no weights in {path}; supported: model.safetensors, sharded *.safetensors with "
                     "model.safetensors.index.json, or pytorch_model*.bin with load_format='pt'")


def iterate_weights(kind: str, files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    bar = tqdm(files, desc="Loading weights", unit="file", disable=not progress or len(files) < 1, leave=False)
    for file in bar:
        if kind == "safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types for corrupt files
                if isinstance(e, ValueError) and str(e).startswith("model:"):
                    raise
                raise ValueError(f"model: cannot read {file.name}: {e}") from e
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(config: LoadSpec, progress: bool = True, device: str | None = None) -> CausalLM:
    mc = config.model_config
    device = device or config.device
    if config.model_impl == "transformers":
        from pagedbackend.models.transformers_impl import TransformersCausalLM

        return TransformersCausalLM(mc, config.dtype, device, config.load_format).eval()
    kind, files = find_weight_files(mc.path, config.load_format)
    cls = get_model_class(mc.architecture)
    with torch.device(device), _default_dtype(config.dtype):
        model = cls(mc)
    model.load_weights(iterate_weights(kind, files, progress))
    pack_linear_weights(model)
    return model.eval()
