"""model-config.yaml checks shared by `pagedbackend archive` (fail before packaging) and the
handler's `initialize()` (fail at load), so both say the same thing about the same mistake."""

from __future__ import annotations

from typing import Any

from pagedbackend.config import EngineArgs

# handler: keys that are not EngineArgs fields.
HANDLER_KEYS = ("model_path", "served_model_name", "chat_template", "metrics_interval_s")


def validate_model_config(config: dict[str, Any]) -> None:
    continuous, asynchronous = bool(config.get("continuousBatching")), bool(config.get("asyncCommunication"))
    if continuous == asynchronous:
        raise ValueError("model-config.yaml: set exactly one of continuousBatching: true or asyncCommunication: true")
    if asynchronous and int(config.get("batchSize", 1)) != 1:
        # TorchServe 0.12's async aggregator removes jobs from the map it iterates: two requests
        # collected at once raise ConcurrentModificationException and kill the worker.
        raise ValueError("model-config.yaml: batchSize must be 1 with asyncCommunication (the engine does the "
                         "batching; TorchServe 0.12's async mode crashes the worker with larger batches)")
    handler = dict(config.get("handler") or {})
    known = set(HANDLER_KEYS) | set(EngineArgs.field_names()) - {"model"}
    unknown = sorted(set(handler) - known)
    if unknown:
        raise ValueError(f"model-config.yaml handler: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    for key in HANDLER_KEYS:
        handler.pop(key, None)
    EngineArgs.from_dict({"model": "-", **handler})._check_fields()
