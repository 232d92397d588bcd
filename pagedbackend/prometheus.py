"""Engine stats in the Prometheus text exposition format (for adapters whose framework has no
metrics API of its own that the engine can feed, e.g. PyTriton), from `metrics.METRICS`."""

from __future__ import annotations

from typing import Any

from pagedbackend.metrics import METRICS

PREFIX = "pagedbackend_"


def _labels(labels: dict[str, str], extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in labels.items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def render(stats: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """Every metric under our name (`pagedbackend_...`), and those Triton's vLLM backend exports
    under its own `vllm:` name as well, so dashboards built for either read the same numbers."""
    labels = labels or {}
    lines: list[str] = []
    for m in METRICS:
        for name in (PREFIX + m.prometheus, m.vllm):
            if name is not None:
                lines += _family(name, m, stats.get(m.key), labels)
    return "\n".join(lines) + "\n"


def _family(name: str, m: Any, value: Any, labels: dict[str, str]) -> list[str]:
    if m.kind == "positional":
        lines = [f"# HELP {name} {m.help}", f"# TYPE {name} counter"]
        for i, v in enumerate(value or ()):
            position = f'position="{i}"'
            lines.append(f"{name}{_labels(labels, position)} {float(v)}")
        return lines
    if m.kind != "histogram":
        return [f"# HELP {name} {m.help}", f"# TYPE {name} {m.kind}", f"{name}{_labels(labels)} {float(value or 0)}"]
    if not value:
        return []
    lines = [f"# HELP {name} {m.help}", f"# TYPE {name} histogram"]
    for bound, count in zip([*value["buckets"], "+Inf"], value["cumulative_counts"]):
        le = 'le="' + str(bound) + '"'
        lines.append(f"{name}_bucket{_labels(labels, le)} {count}")
    return lines + [f"{name}_sum{_labels(labels)} {value['sum']}", f"{name}_count{_labels(labels)} {value['count']}"]
