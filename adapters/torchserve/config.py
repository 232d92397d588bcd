"""model-config.yaml checks shared by `pagedbackend archive` (fail before packaging) and the
handler's `initialize()` (fail at load), so both say the same thing about the same mistake."""

from __future__ import annotations

from typing import Any

from pagedbackend.config import EngineArgs
from pagedbackend.structured_output.tool_parsers import TOOL_PARSERS
from pagedbackend.vllm_args import engine_kwargs

# handler: keys that are not EngineArgs fields.
HANDLER_KEYS = ("model_path", "served_model_name", "chat_template", "metrics_interval_s", "tool_call_parser")
# tool_call_parser: vLLM's --tool-call-parser names, or auto (by the model's family).
TOOL_CALL_PARSERS = ("auto", *TOOL_PARSERS)


def flatten_handler(handler: dict[str, Any] | None) -> dict[str, Any]:
    """The handler section in this handler's flat form: an upstream `vllm_engine_config:`
    (TorchServe's examples/large_models/vllm) merged into it, `served_model_name` given as vLLM's
    list reduced to its first name (the one responses carry). Raises ValueError naming a key
    that cannot be honoured."""
    handler = dict(handler or {})
    if handler.get("adapters"):
        raise ValueError("model-config.yaml handler.adapters: LoRA adapters are not supported yet")
    handler.pop("adapters", None)
    nested = handler.pop("vllm_engine_config", None)
    if nested is not None:
        if not isinstance(nested, dict):
            raise ValueError("model-config.yaml handler.vllm_engine_config must be a mapping of vLLM engine arguments")
        where = "model-config.yaml handler.vllm_engine_config"
        nested = dict(nested)
        if "model" in nested:  # upstream's handler takes it in place of model_path
            if "model_path" in handler:
                raise ValueError(f"{where}.model: give handler.model_path or this, not both")
            handler["model_path"] = nested.pop("model")
        for key, value in engine_kwargs(nested, where, extra=("served_model_name",)).items():
            if key in handler:
                raise ValueError(f"{where}.{key} is also set in handler: give it once")
            handler[key] = value
    served = handler.get("served_model_name")
    if isinstance(served, list):
        if not served or not all(isinstance(n, str) and n for n in served):
            raise ValueError("model-config.yaml handler served_model_name must be a name or a non-empty list of names")
        handler["served_model_name"] = served[0]
    return handler


def validate_model_config(config: dict[str, Any]) -> None:
    continuous, asynchronous = bool(config.get("continuousBatching")), bool(config.get("asyncCommunication"))
    if continuous == asynchronous:
        raise ValueError("model-config.yaml: set exactly one of continuousBatching: true or asyncCommunication: true")
    if asynchronous and int(config.get("batchSize", 1)) != 1:
        # TorchServe 0.12's async aggregator removes jobs from the map it iterates: two requests
        # collected at once raise ConcurrentModificationException and kill the worker.
        raise ValueError("model-config.yaml: batchSize must be 1 with asyncCommunication (the engine does the "
                         "batching; TorchServe 0.12's async mode crashes the worker with larger batches)")
    tensor_parallel_size(config)
    handler = flatten_handler(config.get("handler"))
    known = set(HANDLER_KEYS) | set(EngineArgs.field_names()) - {"model"}
    unknown = sorted(set(handler) - known)
    if unknown:
        raise ValueError(f"model-config.yaml handler: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    parser = handler.get("tool_call_parser", "auto")
    if parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"model-config.yaml handler: tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                         f"got {parser!r}")
    for key in HANDLER_KEYS:
        handler.pop(key, None)
    EngineArgs.from_dict({"model": "-", **handler})._check_fields()


def tensor_parallel_size(config: dict[str, Any]) -> int:
    """The engine's ranks, agreeing with how TorchServe is told to run them: `parallelType:
    custom` + `parallelLevel: N` (the handler's engine starts its ranks), or `parallelType: tp` +
    `torchrun: {nproc-per-node: N}` (TorchServe starts them). Unset, it follows those."""
    handler = flatten_handler(config.get("handler"))
    kind = config.get("parallelType")
    if kind in ("tp", "pp", "pptp"):
        if kind != "tp":
            raise ValueError(f"model-config.yaml: parallelType: {kind} (pipeline parallelism) is not supported; "
                             "use tp, or custom")
        torchrun = config.get("torchrun") or {}
        launched = int(torchrun.get("nproc-per-node", 1)) * int(torchrun.get("nnodes", 1))
        source = f"torchrun nproc-per-node x nnodes = {launched}"
    elif kind == "custom":
        level = int(config.get("parallelLevel", 1))
        if level > 1:
            # Verified on 0.12: WorkerThread connects to parallelLevel sockets whatever the
            # type, WorkerLifeCycle starts one process for custom: "Failed to connect to worker".
            raise ValueError(f"model-config.yaml: parallelType: custom with parallelLevel: {level} cannot start on "
                             "TorchServe 0.12 (its frontend then expects one worker socket per level); for an engine "
                             f"that starts its own ranks write parallelLevel: {level} without parallelType (as "
                             "TorchServe's LLM launcher does; `pagedbackend archive --tensor-parallel-size` writes "
                             "that), or use parallelType: tp with torchrun")
        launched, source = None, None
    elif kind is None:
        launched = int(config["parallelLevel"]) if "parallelLevel" in config else None
        source = f"parallelLevel: {launched}"
    else:
        raise ValueError(f"model-config.yaml: parallelType must be custom or tp, got {kind!r}")
    tp = handler.get("tensor_parallel_size", launched or 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"model-config.yaml handler: tensor_parallel_size must be a positive integer, got {tp!r}")
    if launched is not None and tp != launched:
        raise ValueError(f"model-config.yaml: handler tensor_parallel_size: {tp} does not match {source}")
    if launched is None and tp > 1:
        raise ValueError(f"model-config.yaml: tensor_parallel_size: {tp} needs parallelLevel: {tp} (one worker "
                         f"whose engine starts its ranks), or parallelType: tp with torchrun: "
                         f"{{nproc-per-node: {tp}}}")
    return tp
