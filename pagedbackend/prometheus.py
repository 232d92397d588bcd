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
    labels = labels or {}
    lines = []
    for m in METRICS:
        name = PREFIX + m.prometheus
        if m.kind == "positional":
            lines += [f"# HELP {name} {m.help}", f"# TYPE {name} counter"]
            for i, v in enumerate(stats.get(m.key) or ()):
                position = f'position="{i}"'
                lines.append(f"{name}{_labels(labels, position)} {float(v)}")
            continue
        if m.kind != "histogram":
            lines += [f"# HELP {name} {m.help}", f"# TYPE {name} {m.kind}",
                      f"{name}{_labels(labels)} {float(stats.get(m.key, 0))}"]
            continue
        h = stats.get(m.key)
        if not h:
            continue
        lines += [f"# HELP {name} {m.help}", f"# TYPE {name} histogram"]
        for bound, count in zip([*h["buckets"], "+Inf"], h["cumulative_counts"]):
            le = 'le="' + str(bound) + '"'
            lines.append(f"{name}_bucket{_labels(labels, le)} {count}")
        lines += [f"{name}_sum{_labels(labels)} {h['sum']}", f"{name}_count{_labels(labels)} {h['count']}"]
    return "\n".join(lines) + "\n"
