"""Triton vLLM-backend model repositories, read as they are: every `<name>/` holding a
`config.pbtxt` with `backend: "vllm"` and a version directory (the highest number, Triton's
default policy) with `model.json` — the vLLM engine arguments, passed whole; booleans and numbers
may be strings, as in Triton's samples. Each becomes the `EngineArgs` of one served model.

`model.json` keys map by vLLM's names (`pagedbackend.vllm_args`): one this engine cannot honour
is an error naming the file and the key. A relative `model` path is taken from the version
directory if it exists there, else as given. `multi_lora.json` (adapters) needs LoRA, which is
not implemented yet: a repository holding one is refused, naming it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pagedbackend.config import EngineArgs
from pagedbackend.vllm_args import engine_kwargs

_FIELD = re.compile(r'^\s*(name|backend|platform)\s*:\s*["\']([^"\']*)["\']', re.MULTILINE)


@dataclass(frozen=True)
class ServedModel:
    """One model of a Triton server: its engine arguments and the version it is served as."""

    args: EngineArgs
    version: int = 1


def _pbtxt_fields(text: str) -> dict[str, str]:
    """The top-level string fields of a config.pbtxt that matter here (name, backend)."""
    fields: dict[str, str] = {}
    depth = 0
    for line in text.splitlines():
        if depth == 0:
            m = _FIELD.match(line)
            if m and m.group(1) not in fields:
                fields[m.group(1)] = m.group(2)
        depth += line.count("{") + line.count("[") - line.count("}") - line.count("]")
    return fields


def read_model_repository(path: str | Path, **overrides) -> dict[str, ServedModel]:
    """name -> the served model of every vLLM-backend model in the repository (sorted by name);
    `overrides`: EngineArgs fields set for every model (e.g. device). ValueError naming the
    file for anything it cannot serve."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model repository: {root} is not a directory")
    models: dict[str, ServedModel] = {}
    for model_dir in sorted(p for p in root.iterdir() if (p / "config.pbtxt").is_file()):
        config = model_dir / "config.pbtxt"
        fields = _pbtxt_fields(config.read_text())
        backend = fields.get("backend")
        if backend not in ("vllm", "python"):  # python: this package's model.py, for a plain Triton
            raise ValueError(f"{config}: backend is {backend!r}; only Triton's vLLM backend's models (backend: "
                             "\"vllm\", or \"python\" with pagedbackend's model.py) are served from a repository")
        name = fields.get("name") or model_dir.name
        if name != model_dir.name:
            raise ValueError(f"{config}: name {name!r} is not its directory's ({model_dir.name!r}), as Triton requires")
        versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
                          and (p / "model.json").is_file())
        if not versions:
            raise ValueError(f"{model_dir}: no version directory with a model.json (e.g. {model_dir}/1/model.json)")
        number, version = versions[-1]
        if (version / "multi_lora.json").is_file():
            raise ValueError(f"{version / 'multi_lora.json'}: LoRA adapters are not supported yet")
        models[name] = ServedModel(model_json_args(version, overrides), number)
    if not models:
        raise ValueError(f"model repository: {root} holds no model (no <name>/config.pbtxt)")
    return models


def model_json_args(version: Path, overrides: dict | None = None) -> EngineArgs:
    """The engine arguments of one model version directory's `model.json` (also what the
    Python-backend `model.py` reads inside a plain Triton)."""
    version = Path(version)
    where = str(version / "model.json")
    try:
        values = json.loads((version / "model.json").read_text())
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(values, dict) or not isinstance(values.get("model"), str):
        raise ValueError(f"{where}: must be a JSON object with \"model\" (the model directory)")
    values = dict(values)
    model = Path(values.pop("model"))
    if not model.is_absolute() and (version / model).exists():
        model = version / model
    kwargs = engine_kwargs(values, where)
    args = EngineArgs(model=str(model), **{**kwargs, **(overrides or {})})
    try:
        args._check_fields()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return args
