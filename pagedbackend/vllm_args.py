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

# vLLM arguments this engine cannot honour, and what to do instead.
REFUSED: dict[str, str] = {
    **{key: "LoRA adapters are not supported yet: remove it"
       for key in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_modules")},
    "model": "the model is the deployment's own model path (TorchServe: handler.model_path)",
    "gpu_memory_utilization": "vLLM's share of device memory for weights and KV together; set kv_cache_memory_fraction "
                              "(the KV cache's share) or num_kv_blocks",
    "tokenizer_mode": "the tokenizer is the model directory's (tokenizer.json / tokenizer_config.json)",
    "trust_remote_code": "no checkpoint code is run: model_impl: transformers loads any decoder transformers knows",
}
# Accepted at the one value that is this engine's behaviour (it never logs requests, nor
# stats on a timer: stats are on the metrics endpoints); any other value is refused.
MATCHING: dict[str, Any] = {"disable_log_requests": True, "disable_log_stats": True}


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
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in REFUSED:
            raise ValueError(f"{where}.{key}: {REFUSED[key]}")
        if key in MATCHING:
            if _coerce(key, value, (bool,)) != MATCHING[key]:
                raise ValueError(f"{where}.{key}: only {MATCHING[key]!r} is supported (what this engine does)")
            continue
        if key in extra:
            out[key] = value
            continue
        if key not in settings:
            raise ValueError(f"{where}.{key} is not supported (vLLM would ignore it silently here); supported: "
                             f"{', '.join(sorted({*settings, *MATCHING, *extra}))}")
        try:
            out[key] = _coerce(key, value, settings[key].accepts)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None
    return out

