"""vLLM engine-argument dicts written for other deployments, mapped onto `EngineArgs`: TorchServe's
vLLM handler config (`handler.vllm_engine_config`) and Triton vLLM-backend repositories
(`<model>/1/model.json`). Both pass the dict whole to vLLM, which ignores what it does not
know; here each key is the `EngineArgs` field of the same (vLLM) name, a few more are accepted
at the value that describes this engine anyway, and every other key is an error naming it and,
where one exists, what to set instead.
"""

from __future__ import annotations

from typing import Any, Mapping

from pagedbackend.config import engine_settings

LORA_KEYS = ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_modules", "fully_sharded_loras")
# vLLM arguments this engine cannot honour, and what to do instead.
REFUSED: dict[str, str] = {
    **{key: "LoRA adapters are not supported yet: remove it" for key in LORA_KEYS},
    "tokenizer_mode": "the tokenizer is the model directory's (tokenizer.json / tokenizer_config.json)",
    "trust_remote_code": "no checkpoint code is run: model_impl: transformers loads any decoder transformers knows",
}
# vLLM's names for EngineArgs fields named otherwise here. `gpu_memory_utilization` is what
# `kv_cache_memory_fraction` is on a GPU: the share of the device this engine brings its use up
# to (weights, activations and KV).
RENAMED: dict[str, str] = {"gpu_memory_utilization": "kv_cache_memory_fraction"}
# Accepted at the values that describe this engine (it never logs requests; its stats are
# always collected, on the metrics endpoints, never logged on a timer); others are refused.
MATCHING: dict[str, tuple[Any, ...]] = {"disable_log_requests": (True,), "disable_log_stats": (True, False)}


def _coerce(name: str, value: Any, accepts: tuple[type, ...]) -> Any:
    """Triton's model.json often holds booleans and numbers as strings ("true", "0.5")."""
    if not isinstance(value, str) or str in accepts:
        return value
    if bool in accepts and value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        if int in accepts:
            return int(value)
        if float in accepts:
            return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value


def engine_kwargs(values: Mapping[str, Any], where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`EngineArgs` keyword arguments from a vLLM argument dict (`extra`: other keys the
    caller handles, e.g. served_model_name, passed through). `where` prefixes every error."""
    settings = {s.name: s for s in engine_settings()}
    lora_on = _coerce("enable_lora", values.get("enable_lora"), (bool,)) is True
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None and key not in settings:
            continue  # vLLM's "unset" (TorchServe's launcher writes download_dir: null)
        if key in LORA_KEYS and not lora_on:
            continue  # LoRA off (enable_lora false or absent): its sizes change nothing, in vLLM too
        if key in REFUSED:
            raise ValueError(f"{where}.{key}: {REFUSED[key]}")
        if key in MATCHING:
            if _coerce(key, value, (bool,)) not in MATCHING[key]:
                raise ValueError(f"{where}.{key}: only {' or '.join(map(repr, MATCHING[key]))} is supported "
                                 "(what this engine does)")
            continue
        if key in RENAMED:
            if RENAMED[key] in values:
                raise ValueError(f"{where}.{key}: give it or {RENAMED[key]}, not both")
            key = RENAMED[key]
        if key in extra:
            out[key] = value
            continue
        if key not in settings:
            raise ValueError(f"{where}.{key} is not supported (vLLM would ignore it silently here); supported: "
                             f"{', '.join(sorted({*settings, *MATCHING, *extra}))}")
        if key == "model":  # the caller's to place (TorchServe: handler.model_path; Triton: model.json's own)
            raise ValueError(f"{where}.model: give the model where the deployment names it")
        try:
            out[key] = _coerce(key, value, settings[key].accepts)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None
    return out

