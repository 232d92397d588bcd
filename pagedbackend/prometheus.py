"""Engine stats in the Prometheus text exposition format (for adapters whose framework has no
metrics API of its own that the engine can feed, e.g. PyTriton), from `metrics.METRICS`."""

from __future__ import annotations

from typing import Any

from pagedbackend.metrics import METRICS

PREFIX = "pagedbackend_"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels.items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def render(stats: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """One engine's metrics (see `render_many`)."""
    return render_many([(stats, labels or {})])


def render_many(engines: list[tuple[dict[str, Any], dict[str, str]]]) -> str:
    """Every metric of every engine (its stats, its labels: the model's name and version) under
    our name (`pagedbackend_...`), and those Triton's vLLM backend exports under its own `vllm:`
    name as well, so dashboards built for either read the same numbers. Each family is written
    once, with one sample (or bucket set) per engine, as the exposition format requires."""
    lines: list[str] = []
    for m in METRICS:
        for name in (PREFIX + m.prometheus, m.vllm):
            if name is None:
                continue
            samples = [line for stats, labels in engines for line in _samples(name, m, stats.get(m.key), labels)]
            if samples or m.kind != "histogram":
                kind = "counter" if m.kind == "positional" else m.kind
                lines += [f"# HELP {name} {m.help}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


def _samples(name: str, m: Any, value: Any, labels: dict[str, str]) -> list[str]:
    if m.kind == "positional":
        return [f"{name}{_labels(labels, 'position=' + chr(34) + str(i) + chr(34))} {float(v)}"
                for i, v in enumerate(value or ())]
    if m.kind != "histogram":
        return [f"{name}{_labels(labels)} {float(value or 0)}"]
    if not value:
        return []
    lines = []
    for bound, count in zip([*value["buckets"], "+Inf"], value["cumulative_counts"]):
        le = 'le="' + str(bound) + '"'
        lines.append(f"{name}_bucket{_labels(labels, le)} {count}")
    return lines + [f"{name}_sum{_labels(labels)} {value['sum']}", f"{name}_count{_labels(labels)} {value['count']}"]
